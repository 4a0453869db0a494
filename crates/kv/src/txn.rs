//! Client transactions: the **transaction cache** of seed 002. A transaction reads at one
//! epoch (its read epoch, fixed at `begin`), buffers its writes here until `commit`, and reads
//! its own writes from the buffer. `commit` sends the read set and the writes to the shards'
//! leaders: one shard takes the one-round fast path, several take two-phase commit with the
//! transaction record on the first written shard (see `route.rs`).

use crate::error::KvError;
use crate::route::{Prepared, TwoPhase};
use crate::store::{check_range, KvStore};
use crate::{check_key, check_value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use strata_rpc::kv_msg::{KeyRange, TxnId};
use strata_types::Epoch;

/// Bytes of buffered writes (keys and values) one transaction may hold. Intents of one shard
/// are stored as one record, so this also bounds that record under the object store's limit.
pub const TXN_WRITE_BYTES_MAX: usize = 3 << 20;
/// Keys one transaction may write.
pub const TXN_WRITES_MAX: usize = 10_000;
/// Keys and ranges one transaction may read (each is checked and locked at commit).
pub const TXN_READS_MAX: usize = 100_000;
/// Default time from `begin` to the end of `commit`; past it the commit is refused.
pub const TXN_DEADLINE_DEFAULT: Duration = Duration::from_secs(30);

/// One transaction. Drop it (or call [`Txn::abort`]) to abandon it: nothing was written.
pub struct Txn {
    pub(crate) store: KvStore,
    pub(crate) id: TxnId,
    pub(crate) rts: Epoch,
    pub(crate) started: Instant,
    pub(crate) deadline: Duration,
    /// Buffered writes: `None` is a delete.
    pub(crate) writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    pub(crate) write_bytes: usize,
    /// Keys read from the store (not from the buffer).
    pub(crate) reads: BTreeSet<Vec<u8>>,
    pub(crate) ranges: Vec<KeyRange>,
    /// Values keys must have at the commit ([`Txn::expect`]); `None`: absent.
    pub(crate) checks: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

fn new_id() -> TxnId {
    *uuid::Uuid::new_v4().as_bytes()
}

impl Txn {
    pub(crate) fn new(store: KvStore) -> Txn {
        let rts = store.inner.route.now().unwrap_or(Epoch::ZERO);
        Txn { store, id: new_id(), rts, started: Instant::now(), deadline: TXN_DEADLINE_DEFAULT, writes: BTreeMap::new(), write_bytes: 0, reads: BTreeSet::new(), ranges: Vec::new(), checks: BTreeMap::new() }
    }

    /// The epoch every read of this transaction sees.
    pub fn read_epoch(&self) -> Epoch {
        self.rts
    }

    /// Refuse the commit once this much time has passed since `begin`.
    pub fn set_deadline(&mut self, d: Duration) {
        self.deadline = d;
    }

    fn check_reads(&self) -> Result<(), KvError> {
        if self.reads.len() + self.ranges.len() >= TXN_READS_MAX {
            return Err(KvError::TooLarge { what: "transaction read set (keys)", got: self.reads.len() + self.ranges.len() + 1, max: TXN_READS_MAX });
        }
        Ok(())
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        if let Some(c) = self.checks.get(key) {
            return Ok(c.clone());
        }
        self.check_reads()?;
        let (v, _) = self.store.inner.route.get(&self.store.inner.map, key, Some(self.rts)).await?;
        self.reads.insert(key.to_vec());
        Ok(v)
    }

    fn buffer(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), KvError> {
        check_key(key)?;
        if let Some(v) = value {
            check_value(v)?;
        }
        let add = key.len() + value.map_or(0, <[u8]>::len);
        let old = self.writes.get(key).map_or(0, |v| key.len() + v.as_ref().map_or(0, Vec::len));
        let bytes = self.write_bytes - old + add;
        if bytes > TXN_WRITE_BYTES_MAX {
            return Err(KvError::TooLarge { what: "transaction writes", got: bytes, max: TXN_WRITE_BYTES_MAX });
        }
        if old == 0 && self.writes.len() >= TXN_WRITES_MAX {
            return Err(KvError::TooLarge { what: "transaction write count", got: self.writes.len() + 1, max: TXN_WRITES_MAX });
        }
        self.write_bytes = bytes;
        self.writes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.buffer(key, Some(value))
    }

    pub fn delete(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.buffer(key, None)
    }

    /// Compare-and-set inside the transaction: reads `key` (so a concurrent change makes the
    /// commit conflict) and buffers `new` if it equals `expected`, else fails with
    /// [`KvError::CasFailed`] (the transaction stays usable).
    pub async fn cas(&mut self, key: &[u8], expected: Option<&[u8]>, new: Option<&[u8]>) -> Result<(), KvError> {
        let cur = self.get(key).await?;
        if cur.as_deref() != expected {
            return Err(KvError::CasFailed { key: key.to_vec(), current: cur });
        }
        self.buffer(key, new)
    }

    /// Commit only if `key` holds `expected` (`None`: absent) at the commit, without reading it
    /// now: a caller that believes it knows the value (a cache) saves the read's round trip.
    /// A mismatch fails the commit with [`KvError::CasFailed`] carrying the current value;
    /// later `get`s of `key` in this transaction answer `expected`. When the transaction
    /// spans one shard the check travels with its one-round commit; otherwise `commit` reads
    /// the expected keys first (at the read epoch, validated like any read).
    pub fn expect(&mut self, key: &[u8], expected: Option<&[u8]>) -> Result<(), KvError> {
        check_key(key)?;
        if self.checks.len() >= TXN_READS_MAX {
            return Err(KvError::TooLarge { what: "transaction expectations (keys)", got: self.checks.len() + 1, max: TXN_READS_MAX });
        }
        self.checks.insert(key.to_vec(), expected.map(<[u8]>::to_vec));
        Ok(())
    }

    /// Turn expectations into reads (for a commit over several shards, whose prepare carries
    /// no compare-and-set checks).
    async fn checks_to_reads(&mut self) -> Result<(), KvError> {
        for (k, want) in std::mem::take(&mut self.checks) {
            self.check_reads()?;
            let (cur, _) = self.store.inner.route.get(&self.store.inner.map, &k, Some(self.rts)).await?;
            if cur != want {
                return Err(KvError::CasFailed { key: k, current: cur });
            }
            self.reads.insert(k);
        }
        Ok(())
    }

    /// Whether every key this transaction touched lives in one shard.
    fn one_shard(&self) -> bool {
        let map = &self.store.inner.map;
        let mut shards = BTreeSet::new();
        for k in self.writes.keys().chain(self.reads.iter()).chain(self.checks.keys()) {
            shards.insert(map.shard_of(k));
        }
        for r in &self.ranges {
            shards.extend(map.shards_for_range(&r.start, r.end.as_deref()));
        }
        shards.len() <= 1
    }

    /// Keys in `[start, end)` at the read epoch, merged with this transaction's own writes,
    /// in key order, at most `limit`. The scanned range joins the read set: a key inserted
    /// into it by another transaction before this one commits makes the commit conflict.
    pub async fn scan(&mut self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        check_range(start, end, limit)?;
        self.check_reads()?;
        // Buffered deletes may hide stored keys: ask for enough to still fill `limit`.
        let hidden = self.writes.range(start.to_vec()..).take_while(|(k, _)| end.is_none_or(|e| k.as_slice() < e)).count();
        let stored = self.store.inner.route.scan(&self.store.inner.map, start, end, limit.saturating_add(hidden), self.rts).await?;
        let stored_full = stored.len() == limit.saturating_add(hidden);
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        // Stored keys past the last one returned are unknown when the limit cut the scan.
        let known_end: Option<Vec<u8>> = if stored_full { merged.keys().next_back().map(|k| successor(k)) } else { end.map(<[u8]>::to_vec) };
        for (k, v) in self.writes.range(start.to_vec()..) {
            if known_end.as_ref().is_some_and(|e| k >= e) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        let out: Vec<(Vec<u8>, Vec<u8>)> = merged.into_iter().take(limit).collect();
        // What this transaction actually observed: up to the last key returned if `limit`
        // cut it, else the whole range known.
        let observed_end = if out.len() == limit { out.last().map(|(k, _)| successor(k)) } else { known_end };
        self.ranges.push(KeyRange { start: start.to_vec(), end: observed_end });
        Ok(out)
    }

    /// Commit: nothing before this is visible to others. Returns the commit epoch (for a
    /// read-only transaction, its read epoch). A [`KvError::Conflict`] means nothing was
    /// written; run the transaction again.
    pub async fn commit(mut self) -> Result<Epoch, KvError> {
        if self.started.elapsed() > self.deadline {
            return Err(KvError::Deadline { deadline_ms: self.deadline.as_millis() as u64 });
        }
        if !self.checks.is_empty() && (self.writes.is_empty() || !self.one_shard()) {
            self.checks_to_reads().await?;
        }
        if self.writes.is_empty() {
            // Every read was at one epoch on the shard leaders, which never let a commit land
            // at or below an epoch they served: a consistent snapshot, nothing to validate.
            return Ok(self.rts);
        }
        let store = self.store.clone();
        store.inner.route.commit(&store.inner.map, self).await
    }

    /// Abandon the transaction (the same as dropping it; nothing was sent).
    pub fn abort(self) {}

    /// Tests: run phase one of two-phase commit (even on one shard) and stop there, so a test
    /// can act as a client that dies after prepare or right after the commit point.
    #[doc(hidden)]
    pub async fn prepare_two_phase(mut self) -> Result<PreparedTxn, KvError> {
        self.checks_to_reads().await?;
        match self.store.inner.route.prepare(&self.store.inner.map, &self, true).await? {
            Prepared::TwoPhase(p) => Ok(PreparedTxn { store: self.store.clone(), p }),
            Prepared::Committed(_) => Err(KvError::Remote("one-round commit where two phases were asked".into())),
        }
    }
}

/// Tests: a transaction whose intents are durable on every participant, not yet decided.
#[doc(hidden)]
pub struct PreparedTxn {
    store: KvStore,
    p: TwoPhase,
}

impl PreparedTxn {
    /// The epoch the commit would get.
    pub fn proposal(&self) -> Epoch {
        self.p.proposal
    }

    /// Only the commit point (the record), no resolution: a client dying right after it.
    pub async fn decide_only(&self) -> Result<Epoch, KvError> {
        match self.store.inner.route.decide(&self.p).await? {
            strata_rpc::kv_msg::Decision::Committed(c) => Ok(c),
            strata_rpc::kv_msg::Decision::Aborted => Err(KvError::Conflict { key: None, reason: "aborted before its commit point".into() }),
        }
    }

    pub async fn commit(self) -> Result<Epoch, KvError> {
        let d = self.store.inner.route.decide(&self.p).await?;
        self.store.inner.route.finish(&self.p, d).await
    }

    pub async fn abort(self) {
        self.store.inner.route.abort(&self.p.coord, self.p.id, self.p.shards.iter().copied()).await;
    }
}

/// The smallest key greater than `k`.
pub(crate) fn successor(k: &[u8]) -> Vec<u8> {
    let mut s = k.to_vec();
    s.push(0);
    s
}
