//! `strata-vos`: the versioned object store of one target (DAOS's VOS).
//!
//! Data model: container → object (128-bit [`Oid`]) → dkey → akey → either a **single value**
//! or an **array** of byte extents addressed by offset. Every update carries an [`Epoch`]; a read
//! at epoch `E` sees the newest version at or below `E`. Punches (object, dkey, akey, extent
//! range) are versioned tombstones. Enumeration of objects, dkeys, akeys and extents works at
//! any epoch with a cursor. [`Vos::aggregate`] drops versions no read at or above a given epoch,
//! nor at a retained snapshot, can see.
//!
//! Storage: rows in an ordered key-value engine behind the [`KvEngine`] trait (fjall by default,
//! values over 1 KiB separated into blob files so large extents are not rewritten by
//! compaction). Extents of 64 KiB or more are written once to append-only extent files with only
//! a reference in the index (`extent_file.rs`). Row keys are order-preserving (`key_codec`): `cont | oid | dkey | akey | kind |
//! [offset] | !epoch`, so the newest version at or below `E` is one seek, and akeys enumerate in
//! byte order (the KV layer's range scans rely on it).
//!
//! Invariants:
//! - An update batch is atomic and is acknowledged only after it is on stable storage;
//!   concurrent batches share one sync (group commit, `group_commit.rs`).
//! - Every stored record carries a crc32c over its header and payload, checked on every read;
//!   a mismatch is [`VosError::Corrupt`], never data.
//! - A read at epoch `E` returns the same bytes before and after any aggregation whose `upto`
//!   is at most `E` or that retains `E`, and stays so when rows at any epoch are added later
//!   (late writes, rebuild imports): aggregation removes only rows that own no byte (or are not
//!   the newest single value) at every kept read point, so a later row changes those reads
//!   exactly as it would have without aggregation (extent punch rows that own bytes are kept).
//! - A read below a container's aggregation horizon that is not at a snapshot retained by every
//!   aggregation since is refused ([`VosError::Aggregated`]), never answered from partial
//!   history. The horizon is stored in the same batch as the deletions it allows.
//! - The store directory carries a format marker; a foreign or newer directory is refused.
//!
//! Limits (named constants below): dkey/akey 1..=4 KiB, single values up to 4 MiB, one extent
//! up to 4 MiB, arrays up to 2^50 bytes, a fetch up to 64 MiB, a batch up to 64 MiB or 4096
//! updates, 10,000 items per enumeration page. Extents longer than 4 MiB are refused (the array
//! layer above splits at chunk boundaries), which bounds how far back a read must look for
//! overlapping extents.
//!
//! Enumeration lists an akey while a read at the same epoch returns something: its single
//! value, or at least one written byte of its array (an array whose every byte was punched by
//! extent punches is not listed), so aggregation never changes a listing either.
//!
//! Known limits of this version: updates become readable a moment before they are durable
//! (between the engine apply and its sync), as in most group-commit designs; acknowledgement
//! still waits for the sync.

mod engine;
mod error;
mod extent_file;
mod aggregation_horizon;
mod group_commit;
mod interval_paint;
mod key_codec;
mod punch_index;
mod record;
mod store;

pub use engine::{EngineOp, FjallEngine, FjallTuning, KvEngine, PendingSync, RowIter, Space};
pub use group_commit::SYNC_LANES_MAX;
pub use error::VosError;
pub use key_codec::RecordKey;
pub use aggregation_horizon::Horizon;
pub use store::{fs_space, ReclaimStats, Vos};
pub use strata_types::{ContId, Epoch, Oid};

/// Store format written in the target's marker file. 2: large extents in extent files
/// (`extent_file.rs`). 3: erasure-coded cells of shard index i stored at offset i x 2^45 of
/// their array (`engine/src/ec_cells.rs`). Stores of older formats are refused, not upgraded:
/// their EC cells of indexes above 0 would read as holes.
pub const FORMAT_VERSION: u32 = 3;
pub const KEY_BYTES_MAX: usize = 4096;
pub const VALUE_BYTES_MAX: usize = 4 << 20;
pub const EXTENT_BYTES_MAX: u64 = 4 << 20;
pub const ARRAY_BYTES_MAX: u64 = 1 << 50;
pub const FETCH_BYTES_MAX: u64 = 64 << 20;
pub const BATCH_BYTES_MAX: usize = 64 << 20;
pub const BATCH_UPDATES_MAX: usize = 4096;
pub const LIST_LIMIT_MAX: usize = 10_000;
/// An extent punch is split into pieces of at most `EXTENT_BYTES_MAX`; this many at most.
pub const PUNCH_PIECES_MAX: u64 = 256;

const _: () = assert!(VALUE_BYTES_MAX <= BATCH_BYTES_MAX && EXTENT_BYTES_MAX as usize <= BATCH_BYTES_MAX);

/// Per-target tuning. Defaults are small because tests run a dozen targets on one machine.
#[derive(Clone, Debug)]
pub struct VosConfig {
    pub cache_bytes: u64,
    pub engine_threads: usize,
    /// Batches that may wait for the group-commit writer.
    pub queue_depth: usize,
    /// Bytes one commit group may gather before it is written.
    pub group_bytes_max: usize,
    /// Commit groups that may wait for the disk at once (see `group_commit`).
    pub sync_lanes: usize,
    /// Longest a pending-extent row's delete waits to ride along with a later group
    /// (`group_commit::DEFERRED_IDLE_MS`; see ARCHITECTURE.md on the window this leaves).
    pub deferred_idle_ms: u64,
}

impl Default for VosConfig {
    fn default() -> Self {
        VosConfig { cache_bytes: 16 << 20, engine_threads: 1, queue_depth: 1024, group_bytes_max: 64 << 20, sync_lanes: 3, deferred_idle_ms: group_commit::DEFERRED_IDLE_MS }
    }
}

/// One change in an update batch.
#[derive(Clone, Debug)]
pub struct Update {
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub epoch: Epoch,
    pub op: UpdateOp,
}

#[derive(Clone, Debug)]
pub enum UpdateOp {
    Single { akey: Vec<u8>, value: Vec<u8> },
    /// `Bytes`, so an RPC payload reaches the extent file without a copy.
    Extent { akey: Vec<u8>, offset: u64, data: bytes::Bytes },
    PunchExtent { akey: Vec<u8>, offset: u64, len: u64 },
    PunchAkey { akey: Vec<u8> },
    PunchDkey,
    PunchObject,
}

/// Bytes of an array range and which parts of it were written (the rest are holes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentRead {
    pub data: Vec<u8>,
    /// `(offset, len)` of written ranges, absolute offsets, merged, ascending.
    pub written: Vec<(u64, u64)>,
}

/// One page of an enumeration; pass `next` back as the cursor for the following page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<T>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggregateStats {
    pub records_examined: u64,
    /// Stored bytes read to examine them (what a rate limit paces).
    pub bytes_examined: u64,
    pub records_removed: u64,
    pub bytes_reclaimed: u64,
}

impl AggregateStats {
    pub fn add(&mut self, o: &AggregateStats) {
        self.records_examined += o.records_examined;
        self.bytes_examined += o.bytes_examined;
        self.records_removed += o.records_removed;
        self.bytes_reclaimed += o.bytes_reclaimed;
    }
}

/// Bounds on one `Vos::aggregate_step`: it stops after the akey that crosses either limit, so
/// a background pass can yield to foreground I/O between steps.
#[derive(Clone, Copy, Debug)]
pub struct AggregateLimits {
    pub records_max: u64,
    pub bytes_max: u64,
}

impl AggregateLimits {
    pub const UNLIMITED: AggregateLimits = AggregateLimits { records_max: u64::MAX, bytes_max: u64::MAX };
}

/// What one step did and where the next one starts (`None`: the container is done).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggregateStep {
    pub stats: AggregateStats,
    pub next: Option<Vec<u8>>,
}

/// A stored row as it is on disk, for shard copies between targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub punch: bool,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A stored row borrowed from wherever it arrived (an RPC payload), for [`Vos::import_refs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub punch: bool,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl RecordRef<'_> {
    /// The decoded key of a value row (`None` for punch-index rows or an undecodable key).
    pub fn record_key(&self) -> Option<RecordKey> {
        if self.punch {
            None
        } else {
            key_codec::decode_record_key(self.key)
        }
    }

    /// The dkey this row belongs to; `None` for an object-level punch (it covers every dkey).
    pub fn dkey(&self) -> Option<Vec<u8>> {
        if self.punch {
            match punch_index::PunchEntry::decode_key(self.key)?.scope {
                punch_index::PunchScope::Object => None,
                punch_index::PunchScope::Dkey(d) | punch_index::PunchScope::Akey(d, _) => Some(d),
            }
        } else {
            key_codec::decode_record_key(self.key).map(|k| k.dkey)
        }
    }
}

/// Where [`Vos::export_object_page_to`] writes the records it exports: the caller frames each
/// one, and the value's bytes are appended straight to the caller's buffer.
pub trait RecordSink {
    /// A record follows: frame `punch`, `key` and a value of `value_len` bytes, and return the
    /// buffer exactly `value_len` value bytes are then appended to.
    fn record(&mut self, punch: bool, key: &[u8], value_len: usize) -> &mut Vec<u8>;

    /// [`RecordSink::record`] of a value whose byte `at` (an extent's first, past its record
    /// header) the sink may place on a block boundary of its buffer: an extent is then read from
    /// disk straight into it (`O_DIRECT`), not through a copy, when the buffer's memory there is
    /// aligned too.
    fn record_aligned(&mut self, punch: bool, key: &[u8], value_len: usize, at: usize) -> &mut Vec<u8> {
        let _ = at;
        self.record(punch, key, value_len)
    }

    /// Whether every value is verified against its record header where it lands (a rebuild
    /// import does: `Vos::import_refs`). Then an extent read from an extent file is not hashed
    /// here: its header is built from the stored checksum, so bytes damaged on this disk are
    /// refused by the receiver.
    fn receiver_verifies(&self) -> bool {
        false
    }
}

/// What [`Vos::export_object_page_to`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportedPage {
    pub records: u64,
    /// Key and value bytes written.
    pub bytes: u64,
    /// The key the next page starts after; `None` when the object is done.
    pub next: Option<Vec<u8>>,
}

impl RawRecord {
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef { punch: self.punch, key: &self.key, value: &self.value }
    }

    /// The dkey this row belongs to; `None` for an object-level punch (it covers every dkey).
    pub fn dkey(&self) -> Option<Vec<u8>> {
        self.as_ref().dkey()
    }

    /// The decoded key of a value row (`None` for punch-index rows or an undecodable key).
    pub fn record_key(&self) -> Option<RecordKey> {
        if self.punch {
            None
        } else {
            key_codec::decode_record_key(&self.key)
        }
    }

    /// The checksum-verified payload of a stored value (`Ok(None)` for punch rows and extent
    /// punches, which carry no bytes).
    pub fn payload(&self) -> Result<Option<&[u8]>, VosError> {
        if self.punch {
            return Ok(None);
        }
        let r = record::decode(&self.value).map_err(|d| VosError::Corrupt { location: format!("record {}", hex_prefix(&self.key)), defect: d.to_string() })?;
        Ok((r.kind == record::RecordKind::Value).then_some(r.payload))
    }

    /// A value row with this row's key and another payload (an EC cell decoded for a different
    /// shard of the same stripe version).
    pub fn with_payload(&self, payload: &[u8]) -> RawRecord {
        RawRecord { punch: false, key: self.key.clone(), value: record::encode(record::RecordKind::Value, payload.len() as u64, payload) }
    }
}

#[derive(Clone, Debug)]
pub struct CorruptRecord {
    pub key: Option<RecordKey>,
    pub raw_key: Vec<u8>,
    pub defect: String,
}

#[derive(Clone, Debug, Default)]
pub struct ScrubReport {
    pub records_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<CorruptRecord>,
    /// Corruption the storage engine itself detected (a block it could not read).
    pub engine_errors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceInfo {
    pub used_bytes: u64,
    pub fs_total_bytes: u64,
    pub fs_free_bytes: u64,
}

fn hex_prefix(k: &[u8]) -> String {
    k.iter().take(48).map(|b| format!("{b:02x}")).collect()
}
