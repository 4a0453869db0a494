//! Wire messages of the data plane (client ↔ engine, engine ↔ engine). Bulk data travels in
//! the frame payload; ops name their byte lengths in it, in order.

use serde::{Deserialize, Serialize};
use strata_types::{ContId, Epoch, Oid, PoolId};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WireOp {
    Single { akey: Vec<u8>, len: u32 },
    Extent { akey: Vec<u8>, offset: u64, len: u32 },
    PunchExtent { akey: Vec<u8>, offset: u64, len: u64 },
    PunchAkey { akey: Vec<u8> },
    PunchDkey,
    PunchObject,
}

impl WireOp {
    /// Payload bytes this op consumes.
    pub fn payload_len(&self) -> usize {
        match self {
            WireOp::Single { len, .. } | WireOp::Extent { len, .. } => *len as usize,
            _ => 0,
        }
    }
}

/// One stored version copied between targets by rebuild.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportRecord {
    pub punch: bool,
    #[serde(with = "crate::byte_vec")]
    pub key: Vec<u8>,
    #[serde(with = "crate::byte_vec")]
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FetchKind {
    Single { akey: Vec<u8> },
    Extent { akey: Vec<u8>, offset: u64, len: u64 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EngineReq {
    /// Client → the group's leader shard: apply at an epoch the leader picks (or `epoch`),
    /// forward to the other replicas, acknowledge when all are durable.
    Update { pool: PoolId, map_version: u64, cont: ContId, oid: Oid, dkey: Vec<u8>, epoch: Option<Epoch>, ops: Vec<WireOp> },
    /// Leader → replica: apply exactly this at this epoch on the named target.
    Replicate { pool: PoolId, map_version: u64, target: u16, cont: ContId, oid: Oid, dkey: Vec<u8>, epoch: Epoch, ops: Vec<WireOp> },
    Fetch { pool: PoolId, map_version: u64, target: u16, cont: ContId, oid: Oid, dkey: Vec<u8>, fetch: FetchKind, epoch: Epoch },
    ListDkeys { pool: PoolId, map_version: u64, target: u16, cont: ContId, oid: Oid, epoch: Epoch, cursor: Option<Vec<u8>>, limit: u32 },
    ListAkeys { pool: PoolId, map_version: u64, target: u16, cont: ContId, oid: Oid, dkey: Vec<u8>, epoch: Epoch, cursor: Option<Vec<u8>>, limit: u32 },
    ListObjects { pool: PoolId, map_version: u64, target: u16, cont: ContId, epoch: Epoch, cursor: Option<Oid>, limit: u32 },
    /// The engine's clock, for snapshot epochs.
    Clock,
    /// Scrub every target of this rank in the pool: verify every record, repair bad ones from
    /// a healthy replica.
    Scrub { pool: PoolId, map_version: u64 },
    /// One stored record by raw key, verified (scrub's repair source).
    RawGet { pool: PoolId, map_version: u64, target: u16, key: Vec<u8> },
    /// One page of the stored records of one object on `target` (postcard `Vec<ImportRecord>`
    /// in the answer's payload, answer `Exported`): keys after `after`, at most `upto`, about
    /// `bytes_max` bytes (see `Vos::export_object_page`); the sources of an EC shard rebuild.
    Export { pool: PoolId, map_version: u64, target: u16, cont: ContId, oid: Oid, after: Option<Vec<u8>>, upto: Option<Vec<u8>>, bytes_max: u64 },
    /// Rebuild: store these records (postcard `Vec<ImportRecord>` in the payload) on `target`,
    /// keeping their epochs.
    Import { pool: PoolId, map_version: u64, target: u16 },
    /// Transactional KV (see `kv_msg`), to the shard's leader.
    Kv(crate::kv_msg::KvReq),
    /// Read with only a capability (`read_cap` of an exNode block): the shard it names, if
    /// the token verifies and `dkey` belongs to its group (see `capability`).
    CapFetch { token: String, dkey: Vec<u8>, fetch: FetchKind, epoch: Epoch },
    /// Write with only a capability (`write_cap`), honoured by the group leader it names.
    CapUpdate { token: String, dkey: Vec<u8>, ops: Vec<WireOp> },
    /// This rank's counters (background aggregation, space used by its targets, data moved,
    /// background scrub).
    Stats,
    /// Management service → engine: these pools' maps are at these versions (pushed when a map
    /// changes, so that rebuild starts without waiting for a heartbeat); answer `Updated`.
    PoolVersions { versions: std::collections::BTreeMap<PoolId, u64> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EngineResp {
    Updated { epoch: Epoch },
    /// `found` is the epoch of the version read (single values); data is the payload.
    Fetched { found: Option<Epoch>, written: Vec<(u64, u64)> },
    Keys { keys: Vec<Vec<u8>>, next: Option<Vec<u8>> },
    Objects { oids: Vec<Oid>, next: Option<Oid> },
    Clock { epoch: Epoch },
    Scrubbed(ScrubCounters),
    /// The record's value is the payload (absent: `found` false).
    Raw { found: bool },
    Kv(crate::kv_msg::KvResp),
    Stats(EngineStats),
    /// A page of `Export`; `truncated`: more records follow its last key.
    Exported { truncated: bool },
}

/// Counters of one rank since it started.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EngineStats {
    pub targets: u16,
    /// Bytes the storage engine of every target holds on disk.
    pub used_bytes: u64,
    pub aggregation: AggregationStats,
    /// Records and bytes (keys and stored values) this rank pushed to other places: rebuild,
    /// resync, drain and extension rebalancing.
    #[serde(default)]
    pub moved_records: u64,
    #[serde(default)]
    pub moved_bytes: u64,
    /// Payload bytes of updates this rank also wrote to their places in the extended layout
    /// while the pool was being extended (the movement rebalancing did not have to do).
    #[serde(default)]
    pub extension_write_bytes: u64,
    /// Completed passes of the periodic background scrub, and what they found.
    #[serde(default)]
    pub scrub_passes: u64,
    #[serde(default)]
    pub scrub: ScrubCounters,
    /// Per pool, this rank's latest data-movement pass (rebuild, resync, drain).
    #[serde(default)]
    pub movement: Vec<MovementProgress>,
    /// Per pool, what this rank's reclaim passes deleted (copies that data movement left on
    /// targets the current map no longer places them on).
    #[serde(default)]
    pub reclaim: Vec<ReclaimProgress>,
}

/// One rank's reclaim of one pool: totals since the rank started, and the latest pass.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReclaimProgress {
    pub pool: PoolId,
    /// The map version of the latest pass that ran to its end (0: none yet); a pass stops
    /// without finishing when the map moves on, and runs again on the newer map once settled.
    pub version_done: u64,
    /// Passes that ran to their end, and passes that stopped because the map moved (or
    /// requests under another map version were writing).
    pub passes: u64,
    pub passes_stopped: u64,
    /// Object shards (an object on one target) with rows deleted, those of them deleted whole,
    /// and the record rows and stored value bytes deleted.
    pub objects: u64,
    pub objects_whole: u64,
    pub records: u64,
    pub bytes: u64,
}

/// One rank's data-movement pass for one pool: work sized before it starts, then done so far.
/// Within a map version no value goes down; `done` passes end with done == total.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MovementProgress {
    pub pool: PoolId,
    /// The map version the pass moves data for.
    pub version: u64,
    /// Objects this rank pushes (as the source of at least one group), and those pushed.
    pub objects_total: u64,
    pub objects_done: u64,
    /// Bytes those objects carry to their destinations (stored bytes of each pushed group
    /// times its destinations; for EC an estimate: decoded cells), and those moved.
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Since the pass for this version started; frozen once done.
    pub elapsed_ms: u64,
    pub done: bool,
    /// Why this rank's last attempt stopped, while no later attempt has moved more (it
    /// retries on its own: e.g. a destination with no space left resumes once space is freed).
    #[serde(default)]
    pub stalled: Option<String>,
}

/// Background aggregation of one rank: versions no reader can need, merged away.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AggregationStats {
    pub passes: u64,
    /// Container passes that had something due (writes or another snapshot list).
    pub containers_aggregated: u64,
    pub records_examined: u64,
    pub bytes_examined: u64,
    pub records_removed: u64,
    /// Payload bytes of the removed versions (the storage engine frees the space when it
    /// compacts).
    pub bytes_reclaimed: u64,
    /// Passes that skipped a pool because data movement was under way.
    pub pools_skipped_for_movement: u64,
    pub errors: u64,
    /// The highest epoch a pass aggregated up to.
    pub last_upto: Epoch,
    /// Destroyed containers whose rows a target of this rank deleted (one per target that held
    /// any), and the stored value bytes those rows had.
    #[serde(default)]
    pub destroyed_containers_deleted: u64,
    #[serde(default)]
    pub destroyed_bytes_deleted: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ScrubCounters {
    pub records_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: u64,
    pub repaired: u64,
    /// Corrupt with no healthy copy to repair from (or not attributable to a record).
    pub lost: u64,
}
