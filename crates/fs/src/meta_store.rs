//! The contract the file system needs from its metadata store: serializable transactions over
//! byte keys with prefix scans, plus point reads at an epoch for snapshots.
//!
//! Two implementations: [`MemMetaStore`] (optimistic concurrency in memory, for unit tests and
//! the conformance of the namespace logic) and the one over `strata-kv` (`kv_meta.rs`).
//!
//! Contract every implementation keeps:
//! - A transaction reads a consistent snapshot and sees its own writes.
//! - `commit` applies all writes atomically or none; if another commit changed anything this
//!   transaction read (keys or scanned prefixes) since it began, `commit` fails with
//!   [`MetaError::Conflict`] and applies nothing. Callers retry a bounded number of times.
//! - Dropping an uncommitted transaction applies nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use strata_types::Epoch;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    /// Another transaction changed what this one read; retrying may succeed.
    #[error("metadata transaction conflict")]
    Conflict,
    /// The store could not be reached or answered with an error.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// A key or value the store refuses (too large, malformed).
    #[error("metadata store refused the request: {0}")]
    Invalid(String),
}

/// One key/value pair returned by a scan, in key order.
pub type KeyValue = (Vec<u8>, Vec<u8>);

pub trait MetaTxn: Send {
    fn get(&mut self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, MetaError>> + Send;
    fn put(&mut self, key: &[u8], value: &[u8]) -> impl Future<Output = Result<(), MetaError>> + Send;
    fn delete(&mut self, key: &[u8]) -> impl Future<Output = Result<(), MetaError>> + Send;
    /// Up to `limit` pairs whose key starts with `prefix` and sorts after `after` (if given).
    fn scan_prefix(&mut self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> impl Future<Output = Result<Vec<KeyValue>, MetaError>> + Send;
    /// Apply every write atomically; returns the commit epoch.
    fn commit(self) -> impl Future<Output = Result<Epoch, MetaError>> + Send;
}

pub trait MetaStore: Send + Sync + 'static {
    type Txn: MetaTxn;
    fn begin(&self) -> impl Future<Output = Result<Self::Txn, MetaError>> + Send;
    /// The newest value at or below `epoch`, outside any transaction (snapshot reads).
    fn get_at(&self, key: &[u8], epoch: Epoch) -> impl Future<Output = Result<Option<Vec<u8>>, MetaError>> + Send;
    /// Prefix scan at `epoch`, outside any transaction.
    fn scan_prefix_at(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize, epoch: Epoch) -> impl Future<Output = Result<Vec<KeyValue>, MetaError>> + Send;
}

/// (epoch, value; `None`: deleted) of one key.
type Version = (u64, Option<Vec<u8>>);

/// Every version of every key, and the epoch counter.
#[derive(Default)]
struct MemState {
    versions: BTreeMap<Vec<u8>, Vec<Version>>,
    epoch: u64,
}

impl MemState {
    fn read(&self, key: &[u8], at: u64) -> Option<Vec<u8>> {
        self.versions.get(key)?.iter().rev().find(|(e, _)| *e <= at).and_then(|(_, v)| v.clone())
    }
    fn changed_after(&self, key: &[u8], since: u64) -> bool {
        self.versions.get(key).is_some_and(|v| v.last().is_some_and(|(e, _)| *e > since))
    }
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize, at: u64) -> Vec<KeyValue> {
        let mut out = Vec::new();
        for (k, _) in self.versions.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if after.is_some_and(|a| k.as_slice() <= a) {
                continue;
            }
            if let Some(v) = self.read(k, at) {
                out.push((k.clone(), v));
            }
        }
        out
    }
}

/// In-memory store with optimistic concurrency control: serializable because a commit is
/// refused when any key read, or any key under a scanned prefix, changed after the
/// transaction's start epoch.
#[derive(Clone, Default)]
pub struct MemMetaStore {
    state: Arc<Mutex<MemState>>,
}

pub struct MemTxn {
    state: Arc<Mutex<MemState>>,
    start: u64,
    reads: BTreeSet<Vec<u8>>,
    scans: Vec<Vec<u8>>,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl MemMetaStore {
    pub fn new() -> MemMetaStore {
        MemMetaStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemTxn {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MetaStore for MemMetaStore {
    type Txn = MemTxn;
    async fn begin(&self) -> Result<MemTxn, MetaError> {
        let start = self.lock().epoch;
        Ok(MemTxn { state: self.state.clone(), start, reads: BTreeSet::new(), scans: Vec::new(), writes: BTreeMap::new() })
    }
    async fn get_at(&self, key: &[u8], epoch: Epoch) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.lock().read(key, epoch.0))
    }
    async fn scan_prefix_at(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize, epoch: Epoch) -> Result<Vec<KeyValue>, MetaError> {
        Ok(self.lock().scan(prefix, after, limit, epoch.0))
    }
}

impl MetaTxn for MemTxn {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        self.reads.insert(key.to_vec());
        Ok(self.lock().read(key, self.start))
    }
    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), MetaError> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }
    async fn delete(&mut self, key: &[u8]) -> Result<(), MetaError> {
        self.writes.insert(key.to_vec(), None);
        Ok(())
    }
    async fn scan_prefix(&mut self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, MetaError> {
        self.scans.push(prefix.to_vec());
        // Merge own writes over the snapshot so the transaction sees them.
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.lock().scan(prefix, after, usize::MAX, self.start).into_iter().collect();
        for (k, w) in self.writes.range(prefix.to_vec()..).take_while(|(k, _)| k.starts_with(prefix)) {
            if after.is_some_and(|a| k.as_slice() <= a) {
                continue;
            }
            match w {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
    async fn commit(self) -> Result<Epoch, MetaError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.reads.iter().any(|k| st.changed_after(k, self.start)) {
            return Err(MetaError::Conflict);
        }
        for p in &self.scans {
            let hit = st.versions.range(p.clone()..).take_while(|(k, _)| k.starts_with(p)).any(|(_, v)| v.last().is_some_and(|(e, _)| *e > self.start));
            if hit {
                return Err(MetaError::Conflict);
            }
        }
        if self.writes.is_empty() {
            return Ok(Epoch(self.start));
        }
        st.epoch += 1;
        let e = st.epoch;
        for (k, v) in self.writes {
            st.versions.entry(k).or_default().push((e, v));
        }
        Ok(Epoch(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    #[test]
    fn conflicting_commits_are_refused_and_snapshots_read_old_values() {
        block(async {
            let s = MemMetaStore::new();
            let mut t = s.begin().await.unwrap();
            t.put(b"a", b"1").await.unwrap();
            let e1 = t.commit().await.unwrap();
            let mut t1 = s.begin().await.unwrap();
            let mut t2 = s.begin().await.unwrap();
            assert_eq!(t1.get(b"a").await.unwrap().as_deref(), Some(&b"1"[..]));
            t1.put(b"a", b"2").await.unwrap();
            t2.get(b"a").await.unwrap();
            t2.put(b"a", b"3").await.unwrap();
            t1.commit().await.unwrap();
            assert_eq!(t2.commit().await, Err(MetaError::Conflict));
            assert_eq!(s.get_at(b"a", e1).await.unwrap().as_deref(), Some(&b"1"[..]));
            assert_eq!(s.get_at(b"a", Epoch::MAX).await.unwrap().as_deref(), Some(&b"2"[..]));
            // A scan conflicts with an insert under its prefix.
            let mut t3 = s.begin().await.unwrap();
            assert_eq!(t3.scan_prefix(b"d", None, 10).await.unwrap().len(), 0);
            t3.put(b"x", b"1").await.unwrap();
            let mut t4 = s.begin().await.unwrap();
            t4.put(b"d1", b"1").await.unwrap();
            t4.commit().await.unwrap();
            assert_eq!(t3.commit().await, Err(MetaError::Conflict));
        });
    }
}
