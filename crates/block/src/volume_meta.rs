//! The volume record: one JSON single value per volume in the container's metadata object.
//!
//! Where it lives: object `internal.<container class>.0` of the block container (sequence 0 is
//! never handed out by the container's id allocator), dkey `vol/<name>`, akey `meta`. One dkey
//! per volume keeps volumes independent; changes to any record of a container take the
//! container's metadata lease first (see `volume_admin`), so read-modify-write is safe.
//!
//! Data: block `n` of a volume is dkey `n` (big-endian u64) of its object; within it, chunk `i`
//! (`chunk_bytes`, default 64 KiB) is array akey `c<i as u16>` at chunk-relative offsets.
//!
//! A volume's data is a stack of **layers**: layer 0 is the object it writes (read at the
//! newest epoch); below it, for clones and rolled-back volumes, objects read at a pinned epoch.
//! A byte reads from the first layer that has written it, and only below a layer's
//! `limit_bytes` (a shrink lowers every lower layer's limit, so a later grow reads zeros).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use strata_types::{Epoch, Oid};

/// Format of the record; bumped with a migration on any incompatible change.
pub const VOLUME_FORMAT: u8 = 1;
/// Default block size: the dkey granularity (Torus used 512 KiB blocks).
pub const BLOCK_BYTES_DEFAULT: u32 = 512 << 10;
pub const BLOCK_BYTES_MIN: u32 = 4 << 10;
pub const BLOCK_BYTES_MAX: u32 = 16 << 20;
/// Sizes are multiples of this (the NBD minimum block size we advertise).
pub const SIZE_ALIGN_BYTES: u64 = 512;
/// Largest volume: keeps block numbers and byte offsets far from overflow.
pub const VOLUME_BYTES_MAX: u64 = 1 << 50;
/// Deepest stack of layers (clone of a clone of ..., or rollbacks): every layer can cost a
/// read round trip for blocks the upper ones never wrote.
pub const LAYERS_MAX: usize = 16;
/// Longest volume or snapshot name; container snapshot labels carry both.
pub const NAME_BYTES_MAX: usize = 48;

pub const META_DKEY_PREFIX: &str = "vol/";
pub const META_AKEY: &[u8] = b"meta";
/// Bytes per chunk: a block's data is kept as one array akey per chunk, so that a small read
/// loads (and checksums) only the records of its chunk, not of the whole block.
pub const CHUNK_BYTES_DEFAULT: u32 = 64 << 10;
pub const CHUNK_BYTES_MIN: u32 = 4 << 10;

/// The akey of chunk `i` of a block (dkey = block number, big-endian u64).
pub fn chunk_akey(i: u64) -> [u8; 3] {
    assert!(i < 1 << 16, "chunk index {i} out of range");
    [b'c', (i >> 8) as u8, i as u8]
}

// Every chunk index of the largest block fits the akey's 16 bits.
const _: () = assert!(BLOCK_BYTES_MAX / CHUNK_BYTES_MIN < 1 << 16);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Layer {
    /// Written as text (`array.RP_3GX.1f`), as the CLI prints object ids.
    #[serde(with = "oid_text")]
    pub oid: Oid,
    /// `None`: the newest version (the writable head); otherwise a pinned epoch.
    pub epoch: Option<Epoch>,
    /// Bytes of this layer visible through the stack.
    pub limit_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub epoch: Epoch,
    pub size_bytes: u64,
    /// The stack as it was: the head pinned at `epoch`, then the lower layers.
    pub layers: Vec<Layer>,
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    pub volume: String,
    pub snapshot: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMeta {
    pub format: u8,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes per dkey: the unit of placement.
    pub block_bytes: u32,
    /// Bytes per akey within a block: the unit a read loads.
    pub chunk_bytes: u32,
    pub oclass: String,
    pub layers: Vec<Layer>,
    /// The snapshot this volume was cloned from.
    pub parent: Option<ParentRef>,
    pub snapshots: BTreeMap<String, SnapshotMeta>,
    pub created_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("volume record '{name}' cannot be read ({detail}); it was written by a newer or broken version")]
    Decode { name: String, detail: String },
    #[error("volume record '{name}' has format {found}, this version reads {VOLUME_FORMAT}; upgrade strata")]
    Format { name: String, found: u8 },
}

impl VolumeMeta {
    pub fn encode(&self) -> Vec<u8> {
        assert_eq!(self.format, VOLUME_FORMAT);
        assert!(!self.layers.is_empty() && self.layers.len() <= LAYERS_MAX && self.layers[0].epoch.is_none());
        serde_json::to_vec(self).expect("a volume record always serializes")
    }

    pub fn decode(name: &str, b: &[u8]) -> Result<VolumeMeta, MetaError> {
        let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| MetaError::Decode { name: name.into(), detail: e.to_string() })?;
        let found = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u8;
        if found != VOLUME_FORMAT {
            return Err(MetaError::Format { name: name.into(), found });
        }
        let m: VolumeMeta = serde_json::from_value(v).map_err(|e| MetaError::Decode { name: name.into(), detail: e.to_string() })?;
        let geometry_ok = (BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&m.block_bytes)
            && m.chunk_bytes >= CHUNK_BYTES_MIN
            && m.chunk_bytes.is_power_of_two()
            && m.block_bytes.is_multiple_of(m.chunk_bytes);
        if m.layers.is_empty() || m.layers.len() > LAYERS_MAX || m.layers[0].epoch.is_some() || !geometry_ok {
            return Err(MetaError::Decode { name: name.into(), detail: "layers or block size out of bounds".into() });
        }
        Ok(m)
    }

    pub fn dkey(name: &str) -> Vec<u8> {
        format!("{META_DKEY_PREFIX}{name}").into_bytes()
    }

    /// Label of the container snapshot that pins a volume snapshot's epoch.
    pub fn pin_label(volume: &str, snapshot: &str) -> String {
        format!("blk.{volume}.{snapshot}")
    }

    pub fn head(&self) -> Oid {
        self.layers[0].oid
    }
}

mod oid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use strata_types::Oid;

    pub fn serialize<S: Serializer>(o: &Oid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(o)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Oid, D::Error> {
        let t = String::deserialize(d)?;
        t.parse().map_err(serde::de::Error::custom)
    }
}

/// Volume and snapshot names: letters, digits, '-' and '_' (no '.' or '@', which separate).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= NAME_BYTES_MAX && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} name '{name}' must be 1..={NAME_BYTES_MAX} letters, digits, '-' or '_'"))
    }
}

/// Split `NAME@SNAP`.
pub fn split_snap(s: &str) -> Option<(&str, &str)> {
    s.split_once('@').filter(|(v, n)| !v.is_empty() && !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> VolumeMeta {
        VolumeMeta {
            format: VOLUME_FORMAT,
            name: "v".into(),
            size_bytes: 1 << 30,
            block_bytes: BLOCK_BYTES_DEFAULT,
            chunk_bytes: CHUNK_BYTES_DEFAULT,
            oclass: "RP_3GX".into(),
            layers: vec![Layer { oid: Oid::new(strata_types::ObjectType::Array, "RP_3GX".parse().unwrap(), 0x1f), epoch: None, limit_bytes: 1 << 30 }],
            parent: None,
            snapshots: BTreeMap::new(),
            created_ms: 5,
        }
    }

    #[test]
    fn record_round_trips_and_refuses_other_formats() {
        let m = meta();
        assert_eq!(VolumeMeta::decode("v", &m.encode()).unwrap(), m);
        assert!(String::from_utf8(m.encode()).unwrap().contains("\"array.RP_3GX.1f\""));
        let mut v: serde_json::Value = serde_json::from_slice(&m.encode()).unwrap();
        v["format"] = 2.into();
        assert!(matches!(VolumeMeta::decode("v", v.to_string().as_bytes()), Err(MetaError::Format { found: 2, .. })));
        assert!(VolumeMeta::decode("v", b"{").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("volume", "db-01_a").is_ok());
        for bad in ["", "a.b", "a@b", "a/b", &"x".repeat(49)] {
            assert!(check_name("volume", bad).is_err(), "{bad}");
        }
        assert_eq!(split_snap("v@s"), Some(("v", "s")));
        assert_eq!(split_snap("v@"), None);
        assert_eq!(split_snap("v"), None);
    }
}
