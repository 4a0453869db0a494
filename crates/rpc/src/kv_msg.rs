//! Wire messages of the transactional KV layer (client ↔ shard leader, leader ↔ leader). They
//! travel inside `EngineReq::Kv` / `EngineResp::Kv`; values travel in the frame payload, in the
//! order the message lists them.
//!
//! Every request names one shard (a dkey of the store's object) and goes to that shard's
//! **leader** ([`kv_leader`]): the first replica of its group that holds all of its data. The
//! leader serializes everything on the shard (reads, locks, intents, commits), so a read never
//! misses an intent that could still commit below its epoch.

use serde::{Deserialize, Serialize};
use strata_placement::{PoolMap, ShardLoc, TargetState};
use strata_types::{ContId, Epoch, Oid, PoolId, TargetId};

/// A transaction's identity: random, chosen by the client.
pub type TxnId = [u8; 16];

/// Format version of KV messages and of the records the engine stores for them (v1).
pub const KV_FORMAT: u8 = 1;

/// Which shard a request is for; it goes to that shard's leader under `map_version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvShard {
    pub pool: PoolId,
    pub map_version: u64,
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
}

/// One buffered write of a transaction. `Put` values are in the payload, in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum KvWrite {
    Put { key: Vec<u8>, len: u32 },
    Delete { key: Vec<u8> },
}

impl KvWrite {
    pub fn key(&self) -> &[u8] {
        match self {
            KvWrite::Put { key, .. } | KvWrite::Delete { key } => key,
        }
    }
}

/// A scanned key range `[start, end)`; `end = None` is unbounded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// What a transaction read in one shard (checked at prepare: nothing newer than its read
/// epoch may have been committed there, and nothing may be locked for writing).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadSet {
    pub keys: Vec<Vec<u8>>,
    pub ranges: Vec<KeyRange>,
}

impl ReadSet {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty()
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Decision {
    Committed(Epoch),
    Aborted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum KvReq {
    /// Read one key: at `at`, or (None) at an epoch the leader picks, newer than every
    /// commit it acknowledged.
    Get { shard: KvShard, key: Vec<u8>, at: Option<Epoch> },
    /// Keys of `range` at `at`, in order, at most `limit`; values in the payload.
    Scan { shard: KvShard, range: KeyRange, limit: u32, at: Epoch },
    /// A transaction touching one shard, in one round: validate `reads` against `rts`,
    /// evaluate `checks` (compare-and-set: key must hold this value, `None` = absent) on the
    /// newest committed state, then apply `writes` at a fresh epoch.
    Commit1 { shard: KvShard, txn: TxnId, rts: Epoch, reads: ReadSet, checks: Vec<(Vec<u8>, Option<Vec<u8>>)>, writes: Vec<KvWrite> },
    /// Phase one: validate and lock `reads` and `writes`, store the intents durably on every
    /// replica; answers the leader's proposed commit epoch. `coord` is the dkey of the shard
    /// holding the transaction record.
    Prepare { shard: KvShard, txn: TxnId, coord: Vec<u8>, rts: Epoch, reads: ReadSet, writes: Vec<KvWrite> },
    /// At the coordinator shard: record the decision unless another one is already recorded
    /// (a reader may have aborted an abandoned transaction). Answers the recorded decision.
    Decide { shard: KvShard, txn: TxnId, decision: Decision },
    /// Phase two at a participant: turn the intents into versions at the commit epoch, or drop
    /// them; release the locks.
    Resolve { shard: KvShard, txn: TxnId, decision: Decision },
    /// At the coordinator shard: the recorded decision, if any; with `abort_if_undecided`,
    /// record `Aborted` first when there is none (the transaction was abandoned).
    Status { shard: KvShard, txn: TxnId, abort_if_undecided: bool },
    /// At the coordinator shard: every intent is resolved, drop the record.
    Forget { shard: KvShard, txn: TxnId },
}

impl KvReq {
    pub fn shard(&self) -> &KvShard {
        match self {
            KvReq::Get { shard, .. }
            | KvReq::Scan { shard, .. }
            | KvReq::Commit1 { shard, .. }
            | KvReq::Prepare { shard, .. }
            | KvReq::Decide { shard, .. }
            | KvReq::Resolve { shard, .. }
            | KvReq::Status { shard, .. }
            | KvReq::Forget { shard, .. } => shard,
        }
    }
}

/// A logical refusal (the request was understood and the answer is "no"), as opposed to an
/// infrastructure error (a `RemoteError`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum KvRefusal {
    /// Retryable: run the transaction again.
    Conflict { key: Option<Vec<u8>>, reason: String },
    CasFailed { key: Vec<u8>, current: Option<Vec<u8>> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum KvResp {
    /// `found`: the epoch of the version read (value in the payload); `read_at`: the epoch the
    /// read was served at.
    Value { found: Option<Epoch>, read_at: Epoch },
    /// Keys with their value lengths; values concatenated in the payload. `more`: the limit
    /// stopped the scan before the end of the range.
    Scanned { keys: Vec<(Vec<u8>, u32)>, more: bool, read_at: Epoch },
    Committed { epoch: Epoch },
    Prepared { proposal: Epoch },
    Refused(KvRefusal),
    Decided(Decision),
    Status(Option<Decision>),
    Done,
}

/// The leader of a KV shard: the first replica of the group that holds all the group's data
/// (a home replica that is readable, not one still reintegrating; else a spare whose rebuild
/// finished). Client and engine compute it alike from the same map.
pub fn kv_leader(map: &PoolMap, group: &[ShardLoc]) -> Option<TargetId> {
    let state = |t: TargetId| map.target(t).map(|x| x.state);
    if let Some(s) = group.iter().find(|s| !s.is_spare && state(s.target).is_some_and(TargetState::readable)) {
        return Some(s.target);
    }
    // A draining home still holds everything while its spare fills.
    if let Some(s) = group.iter().find(|s| s.is_spare && state(s.home) == Some(TargetState::Drain)) {
        return Some(s.home);
    }
    let pending = map.targets.iter().any(|t| matches!(t.state, TargetState::Down | TargetState::UpIn | TargetState::Drain));
    group.iter().find(|s| s.is_spare && state(s.home) == Some(TargetState::DownOut) && state(s.target).is_some_and(TargetState::readable) && !pending).map(|s| s.target)
}

/// What a participant stores for a prepared transaction (one record per transaction and
/// shard, postcard, under a reserved akey of the shard's dkey): enough to rebuild its locks
/// after a restart or a change of leader, and to apply its writes at commit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntentRecord {
    pub format: u8,
    /// Dkey of the shard holding the transaction record.
    pub coord: Vec<u8>,
    pub rts: Epoch,
    /// The epoch this participant proposed; the commit epoch is the largest proposal.
    pub proposal: Epoch,
    pub reads: ReadSet,
    /// `None` deletes the key.
    pub writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// The transaction record at the coordinator shard: its presence is the decision.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TxnRecord {
    pub format: u8,
    pub decision: Decision,
}
