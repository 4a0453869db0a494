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
//! - A commit whose outcome the store could not learn (its answer lost) is settled inside
//!   `commit` by reading its keys back (`commit_outcome.rs`): callers see success,
//!   [`MetaError::Conflict`] (it did not commit) or, if still unknown after a deadline,
//!   [`MetaError::Unavailable`]; never a guess.

use crate::commit_outcome::WriteLog;
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
    /// A key did not hold the value [`MetaTxn::expect`] said; nothing was applied. The caller
    /// retries reading the real value.
    #[error("metadata changed since it was cached")]
    Stale,
    /// A key or value the store refuses (too large, malformed).
    #[error("metadata store refused the request: {0}")]
    Invalid(String),
    /// The pool's engines are out of space (ENOSPC, not EIO: applications handle that).
    #[error("no space left in the pool for metadata: {0}")]
    Full(String),
}

/// One key/value pair returned by a scan, in key order.
pub type KeyValue = (Vec<u8>, Vec<u8>);

pub trait MetaTxn: Send {
    fn get(&mut self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, MetaError>> + Send;
    fn put(&mut self, key: &[u8], value: &[u8]) -> impl Future<Output = Result<(), MetaError>> + Send;
    fn delete(&mut self, key: &[u8]) -> impl Future<Output = Result<(), MetaError>> + Send;
    /// Commit only if `key` holds `expected` (`None`: absent) at the commit; a later `get` of
    /// `key` answers `expected` without a round trip. A mismatch fails `commit` with
    /// [`MetaError::Stale`].
    fn expect(&mut self, key: &[u8], expected: Option<&[u8]>) -> Result<(), MetaError>;
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
    /// How many shards the store has; keys of inode `ino`'s home (`meta_schema`) live in
    /// shard `home_of(ino) < homes()`. A transaction whose keys share one shard commits in one
    /// round; otherwise the answers only affect speed.
    fn homes(&self) -> u32;
    fn home_of(&self, ino: u64) -> u32;
}

/// Shards the in-memory store pretends to have (so tests exercise the home-aware allocator).
pub const MEM_HOMES: u32 = 8;

/// (epoch, value; `None`: deleted) of one key.
type Version = (u64, Option<Vec<u8>>);

/// Every version of every key, and the epoch counter.
#[derive(Default)]
struct MemState {
    versions: BTreeMap<Vec<u8>, Vec<Version>>,
    epoch: u64,
    /// Commits with writes whose keys (read or written) spanned more than one shard.
    multi_shard_commits: u64,
    /// Test knob ([`MemMetaStore::lose_commit_answers`]): every Nth commit with writes loses
    /// its answer (0: none), and how many commits with writes were counted.
    lose_every: u64,
    commits_counted: u64,
}

fn mem_home_of(ino: u64) -> u32 {
    (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as u32
}

/// The pretend shard of a key: its home's (the first 8 bytes, as the KV store shards them).
fn mem_shard_of_key(key: &[u8]) -> u32 {
    let mut home = [0u8; 8];
    let n = key.len().min(8);
    home[..n].copy_from_slice(&key[..n]);
    mem_home_of(u64::from_be_bytes(home))
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
    checks: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    log: WriteLog,
}

impl MemMetaStore {
    pub fn new() -> MemMetaStore {
        MemMetaStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make every `every`th commit with writes lose its answer, as a KV commit whose shard
    /// leader died after writing it (or before): the first, third, ... such commit is applied,
    /// the others are not, and each is settled by reading its keys back (`commit_outcome.rs`).
    pub fn lose_commit_answers(&self, every: u64) {
        self.lock().lose_every = every;
    }

    /// Commits so far that a sharded store would have run as two-phase commits.
    pub fn multi_shard_commits(&self) -> u64 {
        self.lock().multi_shard_commits
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
        Ok(MemTxn { state: self.state.clone(), start, reads: BTreeSet::new(), scans: Vec::new(), writes: BTreeMap::new(), checks: BTreeMap::new(), log: WriteLog::default() })
    }
    async fn get_at(&self, key: &[u8], epoch: Epoch) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.lock().read(key, epoch.0))
    }
    async fn scan_prefix_at(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize, epoch: Epoch) -> Result<Vec<KeyValue>, MetaError> {
        Ok(self.lock().scan(prefix, after, limit, epoch.0))
    }
    fn homes(&self) -> u32 {
        MEM_HOMES
    }
    fn home_of(&self, ino: u64) -> u32 {
        mem_home_of(ino)
    }
}

impl MetaTxn for MemTxn {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        if let Some(c) = self.checks.get(key) {
            return Ok(c.clone());
        }
        self.reads.insert(key.to_vec());
        let v = self.lock().read(key, self.start);
        self.log.read(key, v.as_deref());
        Ok(v)
    }
    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), MetaError> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        self.log.write(key, Some(value));
        Ok(())
    }
    async fn delete(&mut self, key: &[u8]) -> Result<(), MetaError> {
        self.writes.insert(key.to_vec(), None);
        self.log.write(key, None);
        Ok(())
    }
    fn expect(&mut self, key: &[u8], expected: Option<&[u8]>) -> Result<(), MetaError> {
        self.checks.insert(key.to_vec(), expected.map(<[u8]>::to_vec));
        self.log.read(key, expected);
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
        let store = MemMetaStore { state: self.state.clone() };
        let (lost, r) = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let mut lost = None;
            if !self.writes.is_empty() && st.lose_every > 0 {
                st.commits_counted += 1;
                if st.commits_counted.is_multiple_of(st.lose_every) {
                    // Odd losses were written before the answer was lost, even ones never.
                    lost = Some((st.commits_counted / st.lose_every) % 2 == 1);
                }
            }
            let r = Self::apply(&mut st, self.start, &self.reads, &self.scans, &self.checks, self.writes, lost != Some(false));
            (lost, r)
        };
        match lost {
            None => r,
            Some(_) => {
                crate::commit_outcome::settle(&store, &self.log, "test knob: the commit's answer was lost", crate::commit_outcome::SETTLE_TIME_MAX).await?;
                Ok(Epoch(store.lock().epoch))
            }
        }
    }
}

impl MemTxn {
    /// Validate and (when `apply`) write; the result a commit would answer.
    fn apply(st: &mut MemState, start: u64, reads: &BTreeSet<Vec<u8>>, scans: &[Vec<u8>], checks: &BTreeMap<Vec<u8>, Option<Vec<u8>>>, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>, apply: bool) -> Result<Epoch, MetaError> {
        if checks.iter().any(|(k, want)| st.read(k, u64::MAX) != *want) {
            return Err(MetaError::Stale);
        }
        if reads.iter().any(|k| st.changed_after(k, start)) {
            return Err(MetaError::Conflict);
        }
        for p in scans {
            let hit = st.versions.range(p.clone()..).take_while(|(k, _)| k.starts_with(p)).any(|(_, v)| v.last().is_some_and(|(e, _)| *e > start));
            if hit {
                return Err(MetaError::Conflict);
            }
        }
        if writes.is_empty() || !apply {
            return Ok(Epoch(start));
        }
        let shards: BTreeSet<u32> = writes.keys().chain(reads.iter()).chain(checks.keys()).chain(scans.iter()).map(|k| mem_shard_of_key(k)).collect();
        if shards.len() > 1 {
            st.multi_shard_commits += 1;
        }
        st.epoch += 1;
        let e = st.epoch;
        for (k, v) in writes {
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
            // Expectations: met, the commit applies; missed, nothing does.
            let mut t5 = s.begin().await.unwrap();
            t5.expect(b"a", Some(b"2")).unwrap();
            assert_eq!(t5.get(b"a").await.unwrap().as_deref(), Some(&b"2"[..]));
            t5.put(b"b", b"1").await.unwrap();
            t5.commit().await.unwrap();
            let mut t6 = s.begin().await.unwrap();
            t6.expect(b"a", Some(b"1")).unwrap();
            t6.put(b"b", b"2").await.unwrap();
            assert_eq!(t6.commit().await, Err(MetaError::Stale));
            assert_eq!(s.get_at(b"b", Epoch::MAX).await.unwrap().as_deref(), Some(&b"1"[..]));
        });
    }
}
