//! 128-bit object ids. The top 8 bits are the object type, the next 24 the encoded object
//! class, the low 96 bits are allocated by the container's id allocator. Layouts are computed
//! from the id alone, so the class must travel inside it.

use crate::oclass::{ObjectClass, ObjectClassError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What an object's values look like; decides which APIs apply to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ObjectType {
    /// dkey → akey → single value or array (the general DAOS object).
    Plain = 0,
    /// A flat key-value object (the KV layer's shards).
    Kv = 1,
    /// A byte array: one akey, extents addressed by offset, dkey = chunk index.
    Array = 2,
    /// Objects the system keeps for itself (container metadata, inode tables).
    Internal = 3,
}

impl ObjectType {
    fn from_u8(v: u8) -> Option<ObjectType> {
        Some(match v {
            0 => ObjectType::Plain,
            1 => ObjectType::Kv,
            2 => ObjectType::Array,
            3 => ObjectType::Internal,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            ObjectType::Plain => "plain",
            ObjectType::Kv => "kv",
            ObjectType::Array => "array",
            ObjectType::Internal => "internal",
        }
    }
}

impl FromStr for ObjectType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(ObjectType::Plain),
            "kv" => Ok(ObjectType::Kv),
            "array" => Ok(ObjectType::Array),
            "internal" => Ok(ObjectType::Internal),
            other => Err(format!("unknown object type '{other}' (plain, kv, array, internal)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidParseError {
    #[error("'{input}' is not an object id: {reason}. Ids look like array.RP_3G1.1f2e (type.class.hex)")]
    Syntax { input: String, reason: String },
    #[error("object id has an invalid class: {0}")]
    Class(#[from] ObjectClassError),
}

/// A 128-bit object id. Ordering is by (hi, lo).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Oid {
    pub hi: u64,
    pub lo: u64,
}

/// Low 96 bits available to the id allocator.
pub const OID_SEQ_BITS: u32 = 96;

impl Oid {
    /// Build an id from its type, class and 96-bit sequence number.
    pub fn new(otype: ObjectType, class: ObjectClass, seq: u128) -> Oid {
        assert!(seq < (1u128 << OID_SEQ_BITS), "object sequence {seq:#x} exceeds 96 bits");
        let hi_meta = ((otype as u64) << 56) | ((class.encode() as u64) << 32);
        Oid { hi: hi_meta | (seq >> 64) as u64, lo: seq as u64 }
    }

    pub fn from_u128(v: u128) -> Oid {
        Oid { hi: (v >> 64) as u64, lo: v as u64 }
    }

    pub fn as_u128(self) -> u128 {
        ((self.hi as u128) << 64) | self.lo as u128
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.as_u128().to_be_bytes()
    }

    pub fn from_bytes(b: [u8; 16]) -> Oid {
        Oid::from_u128(u128::from_be_bytes(b))
    }

    /// The object type, or `None` for an id from a newer version.
    pub fn otype(self) -> Option<ObjectType> {
        ObjectType::from_u8((self.hi >> 56) as u8)
    }

    /// The object class encoded in the id.
    pub fn class(self) -> Result<ObjectClass, ObjectClassError> {
        ObjectClass::decode(((self.hi >> 32) & 0xff_ffff) as u32)
    }

    /// The allocator's 96-bit sequence number.
    pub fn seq(self) -> u128 {
        self.as_u128() & ((1u128 << OID_SEQ_BITS) - 1)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.otype(), self.class()) {
            (Some(t), Ok(c)) => write!(f, "{}.{}.{:x}", t.name(), c, self.seq()),
            _ => write!(f, "0x{:032x}", self.as_u128()),
        }
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Oid({self})")
    }
}

impl FromStr for Oid {
    type Err = OidParseError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let syntax = |reason: &str| OidParseError::Syntax { input: input.to_owned(), reason: reason.to_owned() };
        if let Some(hex) = s.strip_prefix("0x") {
            if hex.is_empty() || hex.len() > 32 {
                return Err(syntax("raw form needs 1 to 32 hex digits"));
            }
            return u128::from_str_radix(hex, 16).map(Oid::from_u128).map_err(|_| syntax("bad hex digits"));
        }
        let mut parts = s.splitn(3, '.');
        let (Some(t), Some(c), Some(seq)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(syntax("expected three dot-separated parts"));
        };
        let otype = t.parse::<ObjectType>().map_err(|e| syntax(&e))?;
        let class = c.parse::<ObjectClass>()?;
        if seq.is_empty() || seq.len() > 24 {
            return Err(syntax("sequence needs 1 to 24 hex digits"));
        }
        let seq = u128::from_str_radix(seq, 16).map_err(|_| syntax("sequence is not hex"))?;
        Ok(Oid::new(otype, class, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn type_and_class_survive_in_the_id() {
        let oc: ObjectClass = "EC_4P2GX".parse().unwrap();
        let oid = Oid::new(ObjectType::Array, oc, 0xabc);
        assert_eq!(oid.otype(), Some(ObjectType::Array));
        assert_eq!(oid.class().unwrap(), oc);
        assert_eq!(oid.seq(), 0xabc);
        assert_eq!(oid.to_string(), "array.EC_4P2GX.abc");
        assert_eq!("array.EC_4P2GX.abc".parse::<Oid>().unwrap(), oid);
        assert_eq!(Oid::from_bytes(oid.to_bytes()), oid);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in ["", "array", "array.RP_3G1", "blob.S1.1", "array.RP_0.1", "array.S1.zz", "0x", "0xg", "array.S1.1234567890123456789012345"] {
            assert!(bad.parse::<Oid>().is_err(), "{bad} should not parse");
        }
        // A raw id with an unknown type still prints and parses in raw form.
        let raw = Oid::from_u128(0xff00_0000_0000_0000_0000_0000_0000_0001);
        assert!(raw.to_string().starts_with("0x"));
        assert_eq!(raw.to_string().parse::<Oid>().unwrap(), raw);
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(seq in 0u128..(1u128 << 96), t in 0u8..4, g in 1u16..100, n in 2u8..5) {
            let oc = ObjectClass::replicated(n, crate::GroupCount::Fixed(g)).unwrap();
            let oid = Oid::new(ObjectType::from_u8(t).unwrap(), oc, seq);
            prop_assert_eq!(oid.to_string().parse::<Oid>().unwrap(), oid);
        }
        #[test]
        fn raw_round_trip(v in any::<u128>()) {
            let oid = Oid::from_u128(v);
            prop_assert_eq!(oid.to_string().parse::<Oid>().unwrap(), oid);
        }
    }
}
