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
use std::path::{Path, PathBuf};

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
    /// The first half of `sync`, for a caller that wants to apply more while this sync runs:
    /// quickly hand everything applied so far to the OS and return the wait for it to reach the
    /// disk. Waits may run at once on several threads (that is the point: one journal then has
    /// several syncs in flight, where `sync` holds the journal for the whole of one).
    fn begin_sync(&self) -> Result<PendingSync, VosError> {
        self.sync()?;
        Ok(PendingSync(None))
    }
    fn disk_bytes(&self) -> u64;
    /// Move everything buffered in memory into the engine's sorted files (a checkpoint).
    fn flush(&self) -> Result<(), VosError>;
}

/// What [`KvEngine::begin_sync`] hands out: the wait for bytes already given to the OS.
#[must_use = "nothing is durable until the wait returns"]
pub struct PendingSync(Option<(std::fs::File, PathBuf)>);

impl PendingSync {
    /// Block until everything applied before `begin_sync` is durable.
    pub fn wait(self) -> Result<(), VosError> {
        match self.0 {
            None => Ok(()),
            Some((file, path)) => file.sync_data().map_err(|source| VosError::Io { path, source }),
        }
    }

    /// The file this wait syncs (for tests of which journal that is).
    pub fn path(&self) -> Option<&Path> {
        self.0.as_ref().map(|(_, p)| p.as_path())
    }
}

/// Tuning of the fjall backend; small defaults because one machine runs many targets in tests.
#[derive(Clone, Debug)]
pub struct FjallTuning {
    pub cache_bytes: u64,
    pub worker_threads: usize,
}

pub struct FjallEngine {
    db: fjall::Database,
    dir: PathBuf,
    /// Number of the journal file fjall appends to (`<dir>/<n>.jnl`; see `begin_sync`).
    active_journal: std::sync::Mutex<u64>,
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
        let active_journal = std::sync::Mutex::new(newest_journal(dir)?);
        Ok(FjallEngine {
            dir: dir.to_owned(),
            active_journal,
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

    /// fjall's own `persist` holds its journal lock through the fsync, so a target could
    /// have one sync in flight at a time and every write queued behind it. Instead: flush the
    /// journal's buffer to the OS (under the lock, quick) and fsync the journal file through a
    /// descriptor of our own, outside the lock. Which file: fjall appends to `<n>.jnl` and
    /// rotates to `<n+1>.jnl` only after a full sync of `<n>`, so when `<n+1>` exists our bytes
    /// are either durable already (in `<n>`) or in a newer file; the newest is always right.
    /// A fresh descriptor per wait, opened before the fsync: a writeback error is reported to
    /// every descriptor open when it happened, so no concurrent wait can swallow another's.
    fn begin_sync(&self) -> Result<PendingSync, VosError> {
        self.db.persist(fjall::PersistMode::Buffer).map_err(map_fjall)?;
        let mut n = self.active_journal.lock().unwrap_or_else(|e| e.into_inner());
        while journal_path(&self.dir, *n + 1).exists() {
            *n += 1;
        }
        let path = journal_path(&self.dir, *n);
        let file = std::fs::File::open(&path).map_err(|source| VosError::Io { path: path.clone(), source })?;
        Ok(PendingSync(Some((file, path))))
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

fn journal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n}.jnl"))
}

/// The highest-numbered journal fjall left in `dir` (the one it appends to).
fn newest_journal(dir: &Path) -> Result<u64, VosError> {
    let entries = std::fs::read_dir(dir).map_err(|source| VosError::Io { path: dir.to_owned(), source })?;
    let mut newest = None;
    for e in entries {
        let e = e.map_err(|source| VosError::Io { path: dir.to_owned(), source })?;
        let name = e.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".jnl")).and_then(|n| n.parse::<u64>().ok()) {
            newest = newest.max(Some(n));
        }
    }
    newest.ok_or_else(|| VosError::OpenFailed { path: dir.to_owned(), reason: "fjall opened it but left no journal file (*.jnl) in it".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(path: &Path, needle: &[u8]) -> bool {
        std::fs::read(path).unwrap().windows(needle.len()).any(|w| w == needle)
    }

    fn marker(i: u8) -> Vec<u8> {
        (0..512u32).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i)).collect()
    }

    /// `begin_sync` fsyncs a file fjall does not name to us: check that it is the journal the
    /// latest batch went to, also after fjall rotates its journal (it does at a flush once the
    /// journal passes 64 MB) and after a reopen.
    #[test]
    fn begin_sync_syncs_the_journal_that_holds_the_latest_batch() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = FjallTuning { cache_bytes: 1 << 20, worker_threads: 1 };
        let check = |e: &FjallEngine, i: u8| {
            let m = marker(i);
            e.apply(vec![EngineOp::Put(Space::Meta, vec![i], m.clone())]).unwrap();
            let p = e.begin_sync().unwrap();
            let path = p.path().unwrap().to_owned();
            assert!(contains(&path, &m), "batch {i}: {} does not hold the batch just written", path.display());
            assert_eq!(journal_path(dir.path(), newest_journal(dir.path()).unwrap()), path, "batch {i}: the newest journal");
            p.wait().unwrap();
            path
        };
        let e = FjallEngine::open(dir.path(), &tuning).unwrap();
        let first = check(&e, 1);
        for j in 0..66u32 {
            e.apply(vec![EngineOp::Put(Space::Meta, [b"fill".as_slice(), &j.to_be_bytes()].concat(), vec![j as u8; 1 << 20])]).unwrap();
        }
        e.flush().unwrap();
        let rotated = check(&e, 2);
        assert_ne!(first, rotated, "fjall rotated its journal and begin_sync followed");
        drop(e);
        let e = FjallEngine::open(dir.path(), &tuning).unwrap();
        check(&e, 3);
    }
}
