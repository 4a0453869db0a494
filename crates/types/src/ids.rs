use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum IdParseError {
    #[error("'{input}' is not a UUID ({source}); pass a UUID or a label")]
    Uuid { input: String, source: uuid::Error },
    #[error("'{input}' is not a rank: expected a number from 0 to {max}")]
    Rank { input: String, max: u32 },
    #[error("'{input}' is not a target: expected RANK:INDEX, e.g. 3:1")]
    Target { input: String },
}

macro_rules! uuid_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The UUID of a ", $what, "; labels are resolved to it by the management service.")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new_random() -> Self {
                $name(Uuid::new_v4())
            }
            pub fn nil() -> Self {
                $name(Uuid::nil())
            }
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim())
                    .map($name)
                    .map_err(|source| IdParseError::Uuid { input: s.to_owned(), source })
            }
        }
    };
}

uuid_id!(PoolId, "pool");
uuid_id!(ContId, "container");

/// The rank of an engine (one server process) in the system. Assigned by the management
/// service when the server first joins and kept across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Rank(pub u32);

impl Rank {
    /// Ranks above this are refused; it keeps rank ids printable and bounded in maps.
    pub const MAX: u32 = 1 << 24;
}

impl fmt::Display for Rank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Rank {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<u32>() {
            Ok(r) if r <= Rank::MAX => Ok(Rank(r)),
            _ => Err(IdParseError::Rank { input: s.to_owned(), max: Rank::MAX }),
        }
    }
}

/// A target: one storage unit of an engine with its own store and write path, named by the
/// engine's rank and the target's index within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TargetId {
    pub rank: Rank,
    pub index: u16,
}

impl TargetId {
    pub fn new(rank: u32, index: u16) -> TargetId {
        TargetId { rank: Rank(rank), index }
    }
}

impl fmt::Display for TargetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.rank, self.index)
    }
}

impl FromStr for TargetId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || IdParseError::Target { input: s.to_owned() };
        let (r, i) = s.trim().split_once(':').ok_or_else(err)?;
        let rank = r.parse::<Rank>().map_err(|_| err())?;
        let index = i.parse::<u16>().map_err(|_| err())?;
        Ok(TargetId { rank, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let p = PoolId::new_random();
        assert_eq!(p.to_string().parse::<PoolId>().unwrap(), p);
        let c = ContId::new_random();
        assert_eq!(c.to_string().parse::<ContId>().unwrap(), c);
        assert!("pool-x".parse::<PoolId>().unwrap_err().to_string().contains("label"));
        let t = TargetId::new(7, 3);
        assert_eq!(t.to_string(), "7:3");
        assert_eq!("7:3".parse::<TargetId>().unwrap(), t);
        assert!("7".parse::<TargetId>().is_err());
        assert!("x:1".parse::<TargetId>().is_err());
        assert!("-1".parse::<Rank>().is_err());
        assert!(format!("{}", Rank::MAX + 1).parse::<Rank>().is_err());
    }
}
