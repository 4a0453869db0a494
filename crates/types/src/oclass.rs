//! Object classes: how an object's data is spread (stripe groups) and protected (replicas or
//! erasure-code parity). Names follow DAOS: `S1`, `S2`, `SX`, `RP_3G1`, `RP_2GX`, `EC_4P2G1`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub const REPLICAS_MIN: u8 = 2;
pub const REPLICAS_MAX: u8 = 8;
pub const EC_DATA_MIN: u8 = 2;
pub const EC_DATA_MAX: u8 = 16;
pub const EC_PARITY_MAX: u8 = 4;
pub const GROUPS_MAX: u16 = (1 << 14) - 1;

// The encoding below packs a class into the 24 bits an Oid reserves for it.
const _: () = assert!(REPLICAS_MAX < 32 && EC_DATA_MAX < 32 && EC_PARITY_MAX < 8);

/// How each group of shards protects its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Redundancy {
    /// Plain striping: a group is one shard; losing its target loses the data.
    None,
    /// `n` full copies on `n` distinct fault domains.
    Replicas(u8),
    /// Reed-Solomon with `data` data cells and `parity` parity cells per stripe.
    Erasure { data: u8, parity: u8 },
}

/// How many groups an object's dkeys are spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GroupCount {
    Fixed(u16),
    /// As many groups as the pool's targets allow (`GX` / `SX`).
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectClass {
    redundancy: Redundancy,
    groups: GroupCount,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectClassError {
    #[error("'{input}' is not an object class: {reason}. Classes look like S1, S2, SX, RP_3G1, RP_2GX, EC_4P2G1, EC_2P1GX")]
    Parse { input: String, reason: String },
    #[error("encoded object class {0:#x} is not valid (an object id from a newer version, or corruption)")]
    BadEncoding(u32),
}

impl ObjectClass {
    pub fn striped(groups: GroupCount) -> Result<ObjectClass, ObjectClassError> {
        Self::checked(Redundancy::None, groups)
    }
    pub fn replicated(replicas: u8, groups: GroupCount) -> Result<ObjectClass, ObjectClassError> {
        Self::checked(Redundancy::Replicas(replicas), groups)
    }
    pub fn erasure(data: u8, parity: u8, groups: GroupCount) -> Result<ObjectClass, ObjectClassError> {
        Self::checked(Redundancy::Erasure { data, parity }, groups)
    }

    fn checked(redundancy: Redundancy, groups: GroupCount) -> Result<ObjectClass, ObjectClassError> {
        let oc = ObjectClass { redundancy, groups };
        let fail = |reason: String| Err(ObjectClassError::Parse { input: oc.to_string(), reason });
        match redundancy {
            Redundancy::None => {}
            Redundancy::Replicas(1) => return fail("one replica is no replication; use S1".into()),
            Redundancy::Replicas(n) if !(REPLICAS_MIN..=REPLICAS_MAX).contains(&n) => {
                return fail(format!("replicas must be {REPLICAS_MIN}..={REPLICAS_MAX}, got {n}"))
            }
            Redundancy::Replicas(_) => {}
            Redundancy::Erasure { data, parity } => {
                if !(EC_DATA_MIN..=EC_DATA_MAX).contains(&data) {
                    return fail(format!("EC data cells must be {EC_DATA_MIN}..={EC_DATA_MAX}, got {data}"));
                }
                if parity == 0 || parity > EC_PARITY_MAX {
                    return fail(format!("EC parity cells must be 1..={EC_PARITY_MAX}, got {parity}"));
                }
                if parity > data {
                    return fail(format!("EC parity ({parity}) may not exceed data cells ({data}); use replication instead"));
                }
            }
        }
        if let GroupCount::Fixed(g) = groups {
            if g == 0 || g > GROUPS_MAX {
                return fail(format!("group count must be 1..={GROUPS_MAX} or X, got {g}"));
            }
        }
        Ok(oc)
    }

    pub fn redundancy(&self) -> Redundancy {
        self.redundancy
    }
    pub fn groups(&self) -> GroupCount {
        self.groups
    }

    /// Shards per group: 1 for striping, `n` for replication, `k + p` for EC.
    pub fn group_size(&self) -> usize {
        match self.redundancy {
            Redundancy::None => 1,
            Redundancy::Replicas(n) => n as usize,
            Redundancy::Erasure { data, parity } => (data + parity) as usize,
        }
    }

    /// How many shards of a group may be lost without losing data (the redundancy factor).
    pub fn redundancy_factor(&self) -> usize {
        match self.redundancy {
            Redundancy::None => 0,
            Redundancy::Replicas(n) => n as usize - 1,
            Redundancy::Erasure { parity, .. } => parity as usize,
        }
    }

    /// The group count for a pool with `targets` usable targets, or `None` if one group does
    /// not fit (fewer targets than shards per group).
    pub fn resolve_groups(&self, targets: usize) -> Option<usize> {
        let per = self.group_size();
        if targets < per {
            return None;
        }
        match self.groups {
            GroupCount::Fixed(g) => {
                let g = g as usize;
                if g * per <= targets {
                    Some(g)
                } else {
                    None
                }
            }
            GroupCount::Max => Some((targets / per).min(GROUPS_MAX as usize)),
        }
    }

    /// Packs into 24 bits: kind (2) | n or k (5) | p (3) | groups (14, 0 = X).
    pub fn encode(&self) -> u32 {
        let (kind, a, b) = match self.redundancy {
            Redundancy::None => (0u32, 0u32, 0u32),
            Redundancy::Replicas(n) => (1, n as u32, 0),
            Redundancy::Erasure { data, parity } => (2, data as u32, parity as u32),
        };
        let g = match self.groups {
            GroupCount::Fixed(g) => g as u32,
            GroupCount::Max => 0,
        };
        let v = (kind << 22) | (a << 17) | (b << 14) | g;
        debug_assert!(v < (1 << 24));
        v
    }

    pub fn decode(v: u32) -> Result<ObjectClass, ObjectClassError> {
        if v >= 1 << 24 {
            return Err(ObjectClassError::BadEncoding(v));
        }
        let kind = v >> 22;
        let a = ((v >> 17) & 0x1f) as u8;
        let b = ((v >> 14) & 0x7) as u8;
        let g = (v & 0x3fff) as u16;
        let groups = if g == 0 { GroupCount::Max } else { GroupCount::Fixed(g) };
        let r = match (kind, a, b) {
            (0, 0, 0) => Redundancy::None,
            (1, n, 0) => Redundancy::Replicas(n),
            (2, k, p) => Redundancy::Erasure { data: k, parity: p },
            _ => return Err(ObjectClassError::BadEncoding(v)),
        };
        Self::checked(r, groups).map_err(|_| ObjectClassError::BadEncoding(v))
    }
}

impl fmt::Display for ObjectClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = match self.groups {
            GroupCount::Fixed(g) => g.to_string(),
            GroupCount::Max => "X".to_string(),
        };
        match self.redundancy {
            Redundancy::None => write!(f, "S{g}"),
            Redundancy::Replicas(n) => write!(f, "RP_{n}G{g}"),
            Redundancy::Erasure { data, parity } => write!(f, "EC_{data}P{parity}G{g}"),
        }
    }
}

fn parse_groups(s: &str) -> Result<GroupCount, String> {
    if s.eq_ignore_ascii_case("x") {
        return Ok(GroupCount::Max);
    }
    s.parse::<u16>().map(GroupCount::Fixed).map_err(|_| format!("group count '{s}' is not a number or X"))
}

fn parse_count(s: &str, what: &str) -> Result<u8, String> {
    s.parse::<u8>().map_err(|_| format!("{what} '{s}' is not a small number"))
}

impl FromStr for ObjectClass {
    type Err = ObjectClassError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim().to_ascii_uppercase();
        let perr = |reason: String| ObjectClassError::Parse { input: input.to_owned(), reason };
        let (redundancy, groups) = if let Some(rest) = s.strip_prefix("RP_") {
            // RP_3 is shorthand for RP_3G1.
            let (n, g) = rest.split_once('G').unwrap_or((rest, "1"));
            (Redundancy::Replicas(parse_count(n, "replica count").map_err(perr)?), parse_groups(g).map_err(perr)?)
        } else if let Some(rest) = s.strip_prefix("EC_") {
            let (k, rest) = rest.split_once('P').ok_or_else(|| perr("EC classes need P<parity>, e.g. EC_4P2G1".into()))?;
            let (p, g) = rest.split_once('G').unwrap_or((rest, "1"));
            let data = parse_count(k, "EC data count").map_err(perr)?;
            let parity = parse_count(p, "EC parity count").map_err(perr)?;
            (Redundancy::Erasure { data, parity }, parse_groups(g).map_err(perr)?)
        } else if let Some(rest) = s.strip_prefix('S') {
            (Redundancy::None, parse_groups(rest).map_err(perr)?)
        } else {
            return Err(perr("unknown prefix".into()));
        };
        ObjectClass::checked(redundancy, groups).map_err(|e| match e {
            ObjectClassError::Parse { reason, .. } => perr(reason),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_classes_parse_and_display() {
        for (text, size, rf) in [
            ("S1", 1, 0),
            ("S2", 1, 0),
            ("SX", 1, 0),
            ("RP_2G1", 2, 1),
            ("RP_3G1", 3, 2),
            ("RP_3GX", 3, 2),
            ("EC_2P1G1", 3, 1),
            ("EC_4P2GX", 6, 2),
            ("EC_16P4G2", 20, 4),
        ] {
            let oc: ObjectClass = text.parse().unwrap();
            assert_eq!(oc.to_string(), text);
            assert_eq!(oc.group_size(), size, "{text}");
            assert_eq!(oc.redundancy_factor(), rf, "{text}");
            assert_eq!(ObjectClass::decode(oc.encode()).unwrap(), oc);
        }
        assert_eq!("rp_3".parse::<ObjectClass>().unwrap().to_string(), "RP_3G1");
        assert_eq!("ec_2p1".parse::<ObjectClass>().unwrap().to_string(), "EC_2P1G1");
    }

    #[test]
    fn nonsense_classes_are_refused_with_reasons() {
        for bad in ["RP_0", "RP_1", "RP_9G1", "EC_0P1", "EC_4P9", "EC_2P3", "EC_4P0", "S0", "RP_3G0", "X1", "", "EC_4", "SY", "RP_3G99999"] {
            let err = bad.parse::<ObjectClass>().expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains("is not an object class"), "{bad}: {msg}");
        }
        assert!("RP_1".parse::<ObjectClass>().unwrap_err().to_string().contains("use S1"));
        assert!("EC_4P9".parse::<ObjectClass>().unwrap_err().to_string().contains("parity"));
    }

    #[test]
    fn resolve_groups_fits_or_says_no() {
        let rp3: ObjectClass = "RP_3GX".parse().unwrap();
        assert_eq!(rp3.resolve_groups(10), Some(3));
        assert_eq!(rp3.resolve_groups(2), None);
        let ec: ObjectClass = "EC_4P2G2".parse().unwrap();
        assert_eq!(ec.resolve_groups(12), Some(2));
        assert_eq!(ec.resolve_groups(11), None);
        assert_eq!("SX".parse::<ObjectClass>().unwrap().resolve_groups(7), Some(7));
    }

    #[test]
    fn bad_encodings_are_refused() {
        assert!(ObjectClass::decode(1 << 24).is_err());
        assert!(ObjectClass::decode(3 << 22).is_err());
        assert!(ObjectClass::decode((1 << 22) | (1 << 17)).is_err()); // RP_1
    }

    proptest! {
        #[test]
        fn any_valid_encoding_round_trips(v in 0u32..(1 << 24)) {
            if let Ok(oc) = ObjectClass::decode(v) {
                prop_assert_eq!(oc.encode(), v);
                prop_assert_eq!(oc.to_string().parse::<ObjectClass>().unwrap(), oc);
            }
        }
        #[test]
        fn parsing_never_panics(s in ".{0,16}") {
            let _ = s.parse::<ObjectClass>();
        }
    }
}
