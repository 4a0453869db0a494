use serde::{Deserialize, Serialize};
use std::fmt;

/// Bits of an epoch that hold the logical counter; the rest are physical milliseconds.
pub(crate) const LOGICAL_BITS: u32 = 16;
pub(crate) const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;

/// A version timestamp: physical milliseconds since the Unix epoch in the high 48 bits and a
/// logical counter in the low 16 bits (a hybrid logical clock value). Totally ordered; every
/// update in the object store carries one and reads see the newest version at or below theirs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// Before everything: reading at `ZERO` sees nothing.
    pub const ZERO: Epoch = Epoch(0);
    /// After everything: reading at `MAX` sees the newest version.
    pub const MAX: Epoch = Epoch(u64::MAX);

    pub fn from_parts(physical_ms: u64, logical: u16) -> Epoch {
        assert!(physical_ms < (1 << (64 - LOGICAL_BITS)), "physical time {physical_ms} ms overflows an epoch");
        Epoch((physical_ms << LOGICAL_BITS) | u64::from(logical))
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MAX) as u16
    }

    /// The epoch just before this one (saturating at zero).
    pub fn prev(self) -> Epoch {
        Epoch(self.0.saturating_sub(1))
    }

    /// The epoch just after this one (saturating at `MAX`).
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse::<u64>().map(Epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_order_by_physical_then_logical() {
        let a = Epoch::from_parts(1_700_000_000_000, 7);
        assert_eq!(a.physical_ms(), 1_700_000_000_000);
        assert_eq!(a.logical(), 7);
        assert!(Epoch::from_parts(5, 65535) < Epoch::from_parts(6, 0));
        assert!(Epoch::from_parts(5, 1) > Epoch::from_parts(5, 0));
        assert_eq!("42".parse::<Epoch>().unwrap(), Epoch(42));
        assert_eq!(Epoch::ZERO.prev(), Epoch::ZERO);
        assert_eq!(Epoch::MAX.next(), Epoch::MAX);
    }
}
