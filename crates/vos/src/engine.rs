//! The storage-engine seam: a small ordered key-value interface with a written contract, so a
//! test backend can drop unsynced writes or fail the n-th one, and the default backend (fjall)
//! can be swapped without touching the versioning logic.
//!
//! Contract for every implementation:
//! - `apply` is atomic: after a crash either all of its operations are present or none.
//! - Operations become visible to `get`/`scan` when `apply` returns, durable only when a later
//!   `sync` returns; `sync` makes every operation applied before it durable.
//! - Operations applied in one order are recovered in that order (no later op without an
//!   earlier one).
//! - `scan` yields keys in byte order (reverse order when asked), start inclusive, end exclusive.

use crate::error::VosError;
use std::ops::Bound;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Versioned values and extents (see `key_codec`).
    Records,
    /// Object, dkey and akey punches.
    Punches,
    /// One row per object ever written in a container.
    Objects,
    /// Store metadata (format version).
    Meta,
}

pub enum EngineOp {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
}

impl EngineOp {
    pub fn bytes(&self) -> usize {
        match self {
            EngineOp::Put(_, k, v) => k.len() + v.len(),
            EngineOp::Delete(_, k) => k.len(),
        }
    }
}

pub type Row = (Vec<u8>, Vec<u8>);
pub type RowIter<'a> = Box<dyn Iterator<Item = Result<Row, VosError>> + 'a>;

pub trait KvEngine: Send + Sync {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, VosError>;
    fn scan<'a>(&'a self, space: Space, start: &[u8], end: Option<&[u8]>, reverse: bool) -> RowIter<'a>;
    /// Keys only, in order, without reading separated values: scrub lists keys this way so that
    /// a damaged value file is attributed to the record it belongs to.
    fn scan_keys<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = Result<Vec<u8>, VosError>> + 'a>;
    fn apply(&self, ops: Vec<EngineOp>) -> Result<(), VosError>;
    fn sync(&self) -> Result<(), VosError>;
    fn disk_bytes(&self) -> u64;
    /// Move everything buffered in memory into the engine's sorted files (a checkpoint).
    fn flush(&self) -> Result<(), VosError>;
}

/// Tuning of the fjall backend; small defaults because one machine runs many targets in tests.
#[derive(Clone, Debug)]
pub struct FjallTuning {
    pub cache_bytes: u64,
    pub worker_threads: usize,
}

pub struct FjallEngine {
    db: fjall::Database,
    records: fjall::Keyspace,
    punches: fjall::Keyspace,
    objects: fjall::Keyspace,
    meta: fjall::Keyspace,
}

pub(crate) fn map_fjall(e: fjall::Error) -> VosError {
    match e {
        fjall::Error::Storage(fjall::LsmError::ChecksumMismatch { got, expected }) => VosError::Corrupt {
            location: "storage engine block".into(),
            defect: format!("block checksum mismatch (got {got:?}, expected {expected:?})"),
        },
        fjall::Error::Storage(fjall::LsmError::Decompress(_))
        | fjall::Error::Storage(fjall::LsmError::InvalidTrailer)
        | fjall::Error::Storage(fjall::LsmError::InvalidHeader(_))
        | fjall::Error::Storage(fjall::LsmError::InvalidTag(_))
        | fjall::Error::Decompress(_)
        | fjall::Error::InvalidTrailer
        | fjall::Error::InvalidTag(_) => VosError::Corrupt { location: "storage engine file".into(), defect: e.to_string() },
        other => VosError::Engine(other.to_string()),
    }
}

impl FjallEngine {
    pub fn open(dir: &Path, tuning: &FjallTuning) -> Result<FjallEngine, VosError> {
        let db = fjall::Database::builder(dir)
            .cache_size(tuning.cache_bytes)
            .worker_threads(tuning.worker_threads.max(1))
            // fjall LZ4-compresses journal entries over 4 KiB by default: incompressible array
            // data then costs ~30% of an engine's CPU on the write path (profiled under
            // `strata bench block`), for nothing.
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(|e| VosError::OpenFailed { path: dir.to_owned(), reason: e.to_string() })?;
        let open_ks = |name: &str, separate: bool| {
            db.keyspace(name, || {
                let o = fjall::KeyspaceCreateOptions::default();
                if separate {
                    // Extents are mostly incompressible user data and carry their own crc; compressing
                    // them costs CPU on the write path for nothing.
                    o.with_kv_separation(Some(fjall::KvSeparationOptions::default().compression(fjall::CompressionType::None)))
                } else {
                    o
                }
            })
            .map_err(|e| VosError::OpenFailed { path: dir.to_owned(), reason: e.to_string() })
        };
        Ok(FjallEngine {
            records: open_ks("records", true)?,
            punches: open_ks("punches", false)?,
            objects: open_ks("objects", false)?,
            meta: open_ks("meta", false)?,
            db,
        })
    }

    fn ks(&self, space: Space) -> &fjall::Keyspace {
        match space {
            Space::Records => &self.records,
            Space::Punches => &self.punches,
            Space::Objects => &self.objects,
            Space::Meta => &self.meta,
        }
    }
}

impl KvEngine for FjallEngine {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, VosError> {
        Ok(self.ks(space).get(key).map_err(map_fjall)?.map(|v| v.to_vec()))
    }

    fn scan<'a>(&'a self, space: Space, start: &[u8], end: Option<&[u8]>, reverse: bool) -> RowIter<'a> {
        let range = (Bound::Included(start.to_vec()), end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())));
        let it = self.ks(space).range::<Vec<u8>, _>(range);
        let map = |g: fjall::Guard| g.into_inner().map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(map_fjall);
        if reverse {
            Box::new(it.rev().map(map))
        } else {
            Box::new(it.map(map))
        }
    }

    fn scan_keys<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = Result<Vec<u8>, VosError>> + 'a> {
        Box::new(self.ks(space).iter().map(|g: fjall::Guard| g.into_inner_if(|_| false).map(|(k, _)| k.to_vec()).map_err(map_fjall)))
    }

    fn apply(&self, ops: Vec<EngineOp>) -> Result<(), VosError> {
        let mut batch = self.db.batch();
        for op in ops {
            match op {
                EngineOp::Put(s, k, v) => batch.insert(self.ks(s), k, v),
                EngineOp::Delete(s, k) => batch.remove(self.ks(s), k),
            }
        }
        batch.commit().map_err(map_fjall)
    }

    fn sync(&self) -> Result<(), VosError> {
        self.db.persist(fjall::PersistMode::SyncData).map_err(map_fjall)
    }

    fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    fn flush(&self) -> Result<(), VosError> {
        for ks in [&self.records, &self.punches, &self.objects, &self.meta] {
            ks.rotate_memtable_and_wait().map_err(map_fjall)?;
        }
        Ok(())
    }
}
