//! `Vos`: one target's versioned object store on top of a `KvEngine`.

use crate::aggregation_horizon::{DirtyBook, Horizon};
use crate::engine::{EngineOp, FjallEngine, FjallTuning, KvEngine, Space};
use crate::error::VosError;
use crate::extent_file::{sync_touched, ExtentFiles, ExtentRef, Touched, EXTENT_FILE_MIN_BYTES};
use crate::group_commit::GroupCommit;
use crate::interval_paint::OwnerMap;
use crate::key_codec::{
    akey_prefix, decode_record_key, dkey_prefix, encode_record_key, extent_key, object_prefix, prefix_successor, single_key,
    take_escaped, RecordKey, KIND_EXTENT, KIND_SINGLE,
};
use crate::punch_index::{PunchEntry, PunchIndex, PunchScope};
use crate::record::{self, RecordKind};
use crate::*;
use std::path::{Path, PathBuf};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use strata_types::{ContId, Epoch, Oid};

#[path = "reclaim.rs"]
mod reclaim;
pub use reclaim::ReclaimStats;

const MARKER_FILE: &str = "STRATA_TARGET";
/// Objects remembered as having their index row; beyond it the set starts over (a forgotten
/// object only costs one more row write).
const INDEXED_OBJECTS_MAX: usize = 100_000;
const DB_DIR: &str = "db";
/// `Meta` rows naming extent rows whose bytes may not be durable yet (see `commit_encoded`):
/// `PENDING_EXTENT_PREFIX | file (4, BE) | offset (8, BE)` -> the record's key.
const PENDING_EXTENT_PREFIX: &[u8] = b"xpend/";

fn pending_extent_key(x: &ExtentRef) -> Vec<u8> {
    [PENDING_EXTENT_PREFIX, &x.file.to_be_bytes(), &x.offset.to_be_bytes()].concat()
}

pub struct Vos {
    path: PathBuf,
    engine: Arc<dyn KvEngine>,
    punches: Arc<PunchIndex>,
    writer: GroupCommit,
    /// Per container: the aggregation horizon (`aggregation_horizon.rs`), mirrored in `Meta`.
    horizons: RwLock<HashMap<ContId, Horizon>>,
    dirty: Mutex<DirtyBook>,
    extents: ExtentFiles,
    /// Objects whose `Objects` index row is durable. Rows are only removed with their
    /// container, so an update to a known object skips rewriting its row: every rewrite is
    /// one more version of the same key in the memtable, which made each insert there compare
    /// long equal keys (a KV store's shards are all one object).
    indexed: Mutex<std::collections::HashSet<(ContId, Oid)>>,
}

/// What aggregation needs of a row: no payload, so an akey with many large versions costs
/// little memory.
struct RowMeta {
    key: RecordKey,
    len: u64,
    stored_bytes: u64,
    extent: Option<ExtentRef>,
}

/// A batch turned into engine rows, punch entries and the extent files it wrote into.
struct Encoded {
    ops: Vec<EngineOp>,
    punches: Vec<PunchEntry>,
    touched: Vec<Touched>,
    /// Its pending-extent rows (one per extent written to an extent file).
    pending: Vec<Vec<u8>>,
    extent_bytes: usize,
    /// Objects whose index row this batch writes (to remember once it is durable).
    indexing: Vec<(ContId, Oid)>,
}

/// A batch queued for commit whose extent files were synced meanwhile (`submit_and_sync_extents`).
struct Submitted {
    committing: crate::group_commit::Committing,
    extents_synced: Result<(), VosError>,
    pending: Vec<Vec<u8>>,
    indexing: Vec<(ContId, Oid)>,
}

struct Row {
    key: RecordKey,
    kind: RecordKind,
    payload: Vec<u8>,
}

/// An array extent's row as a read first sees it: header and inline bytes verified, bytes in an
/// extent file not yet read. A read loads them only if the row still shows in the range it
/// reads: newer versions not yet aggregated (overwrites within the margin, snapshots) would
/// otherwise each cost a read and checksum of their whole extent.
struct ExtentRow {
    raw_key: Vec<u8>,
    key: RecordKey,
    /// `Value` (inline or in an extent file) or `Punch`.
    kind: RecordKind,
    len: u64,
    body: ExtentBody,
}

enum ExtentBody {
    Inline(Vec<u8>),
    File(ExtentRef),
    None,
}

fn corrupt(key: &[u8], defect: impl std::fmt::Display) -> VosError {
    let location = match decode_record_key(key) {
        Some(k) => format!(
            "cont {} oid {} dkey {:?} akey {:?} {} epoch {}",
            k.cont,
            k.oid,
            String::from_utf8_lossy(&k.dkey),
            String::from_utf8_lossy(&k.akey),
            k.offset.map(|o| format!("extent@{o}")).unwrap_or_else(|| "single".into()),
            k.epoch
        ),
        None => format!("key {key:02x?}"),
    };
    VosError::Corrupt { location, defect: defect.to_string() }
}

/// At open: check every extent named by a pending-extent row and drop the index rows whose
/// bytes are not all on disk (a crash after the journal's sync, before the extent file's; see
/// `Vos::commit_encoded`). Returns how many rows were dropped.
fn drop_unsynced_extents(engine: &dyn KvEngine, extents: &ExtentFiles) -> Result<usize, VosError> {
    let end = prefix_successor(PENDING_EXTENT_PREFIX);
    let mut ops = Vec::new();
    let mut dropped = 0;
    for row in engine.scan(Space::Meta, PENDING_EXTENT_PREFIX, Some(&end), false) {
        let (k, record_key) = row?;
        ops.push(EngineOp::Delete(Space::Meta, k));
        // Gone already (aggregated or destroyed), or since rewritten inline: nothing to check.
        let Some(v) = engine.get(Space::Records, &record_key)? else { continue };
        let r = record::decode(&v).map_err(|d| corrupt(&record_key, d))?;
        if r.kind != RecordKind::ValueRef {
            continue;
        }
        if let Err(e) = extents.read(&extent_ref(&record_key, r.payload)?, r.len) {
            tracing::warn!(error = %e, "an unacknowledged extent did not reach the disk; dropping its index row");
            ops.push(EngineOp::Delete(Space::Records, record_key));
            dropped += 1;
        }
    }
    if !ops.is_empty() {
        engine.apply(ops)?;
        engine.sync()?;
    }
    Ok(dropped)
}

fn extent_ref(k: &[u8], payload: &[u8]) -> Result<ExtentRef, VosError> {
    ExtentRef::decode(payload).ok_or_else(|| corrupt(k, "bad extent reference"))
}

fn check_key(what: &'static str, k: &[u8]) -> Result<(), VosError> {
    if k.is_empty() {
        return Err(VosError::Empty { what });
    }
    if k.len() > KEY_BYTES_MAX {
        return Err(VosError::TooLarge { what, got: k.len(), max: KEY_BYTES_MAX });
    }
    Ok(())
}

fn check_extent(offset: u64, len: u64) -> Result<(), VosError> {
    if offset.checked_add(len).is_none_or(|end| end > ARRAY_BYTES_MAX) {
        return Err(VosError::ExtentOutOfRange { offset, len, max: ARRAY_BYTES_MAX });
    }
    Ok(())
}

impl Vos {
    /// Open (or create) the store in `dir`. A non-empty directory that is not a Strata target,
    /// or one written by an unknown format version, is refused.
    pub fn open(dir: &Path, cfg: &VosConfig) -> Result<Vos, VosError> {
        let io = |source| VosError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let marker = dir.join(MARKER_FILE);
        match std::fs::read_to_string(&marker) {
            Ok(text) => {
                if text.trim() != FORMAT_VERSION.to_string() {
                    return Err(VosError::FormatVersion { path: dir.to_owned(), found: text.trim().to_owned(), supported: FORMAT_VERSION });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = std::fs::read_dir(dir).map_err(io)?.next().is_none();
                if !empty {
                    return Err(VosError::OpenFailed {
                        path: dir.to_owned(),
                        reason: format!("directory is not empty and has no {MARKER_FILE} marker; point --dir at an empty directory or an existing target"),
                    });
                }
                std::fs::write(&marker, FORMAT_VERSION.to_string()).map_err(|source| VosError::Io { path: marker.clone(), source })?;
                if let Ok(d) = std::fs::File::open(dir) {
                    d.sync_all().map_err(io)?;
                }
            }
            Err(source) => return Err(VosError::Io { path: marker, source }),
        }
        let db_dir = dir.join(DB_DIR);
        let tuning = FjallTuning { cache_bytes: cfg.cache_bytes, worker_threads: cfg.engine_threads };
        let engine: Arc<dyn KvEngine> = Arc::new(FjallEngine::open(&db_dir, &tuning)?);
        Self::with_engine(dir, engine, cfg)
    }

    /// Open on any engine that honours the `KvEngine` contract (tests inject faults this way).
    pub fn with_engine(dir: &Path, engine: Arc<dyn KvEngine>, cfg: &VosConfig) -> Result<Vos, VosError> {
        let punches = Arc::new(PunchIndex::default());
        for row in engine.scan(Space::Punches, &[], None, false) {
            let (k, _) = row?;
            let p = PunchEntry::decode_key(&k).ok_or_else(|| VosError::Corrupt { location: "punch index".into(), defect: format!("undecodable punch key {k:02x?}") })?;
            punches.insert(&p);
        }
        let mut horizons = HashMap::new();
        let prefix = Horizon::key_prefix();
        for row in engine.scan(Space::Meta, prefix, Some(&prefix_successor(prefix)), false) {
            let (k, v) = row?;
            let bad = || VosError::Corrupt { location: "aggregation horizon".into(), defect: format!("undecodable horizon row {k:02x?}") };
            let cont = Horizon::cont_of_key(&k).ok_or_else(bad)?;
            horizons.insert(cont, Horizon::decode(&v).ok_or_else(bad)?);
        }
        let extents = ExtentFiles::open(dir)?;
        let dropped = drop_unsynced_extents(engine.as_ref(), &extents)?;
        if dropped > 0 {
            tracing::warn!(target_dir = %dir.display(), dropped, "dropped extent rows whose bytes did not reach the disk before a crash (never acknowledged)");
        }
        let writer = GroupCommit::start(engine.clone(), punches.clone(), cfg.queue_depth, cfg.group_bytes_max, cfg.sync_lanes, std::time::Duration::from_millis(cfg.deferred_idle_ms));
        let vos = Vos { path: dir.to_owned(), engine, punches, writer, horizons: RwLock::new(horizons), dirty: Mutex::new(DirtyBook::default()), extents, indexed: Mutex::default() };
        // What happened before the restart is unknown: every container is due once.
        for cont in vos.list_containers()? {
            vos.dirty().note_all(cont);
        }
        Ok(vos)
    }

    fn decode_row(&self, k: Vec<u8>, v: &[u8]) -> Result<Row, VosError> {
        let key = decode_record_key(&k).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
        let r = record::decode(v).map_err(|d| corrupt(&k, d))?;
        if r.kind == RecordKind::ValueRef {
            let payload = self.extents.read(&extent_ref(&k, r.payload)?, r.len).map_err(|e| corrupt(&k, e))?;
            return Ok(Row { key, kind: RecordKind::Value, payload });
        }
        Ok(Row { key, kind: r.kind, payload: r.payload.to_vec() })
    }

    /// A stored record as another target can use it: an extent-file reference becomes the
    /// inline value it names (verified).
    fn materialize(&self, k: &[u8], v: Vec<u8>) -> Result<Vec<u8>, VosError> {
        let r = record::decode(&v).map_err(|d| corrupt(k, d))?;
        if r.kind != RecordKind::ValueRef {
            return Ok(v);
        }
        let x = extent_ref(k, r.payload)?;
        let mut out = Vec::with_capacity(record::HEADER_BYTES + r.len.min(EXTENT_BYTES_MAX) as usize);
        out.extend_from_slice(&[0u8; record::HEADER_BYTES]);
        let crc = self.extents.read_append(&x, r.len, &mut out).map_err(|e| corrupt(k, e))?;
        out[..record::HEADER_BYTES].copy_from_slice(&record::value_header(r.len, crc));
        Ok(out)
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, DirtyBook> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The aggregation horizon of a container (default: nothing aggregated).
    pub fn horizon(&self, cont: ContId) -> Horizon {
        self.horizons.read().unwrap_or_else(|e| e.into_inner()).get(&cont).cloned().unwrap_or_default()
    }

    /// Refuse a read whose history aggregation may have removed.
    fn check_readable(&self, cont: ContId, epoch: Epoch) -> Result<(), VosError> {
        let map = self.horizons.read().unwrap_or_else(|e| e.into_inner());
        match map.get(&cont) {
            Some(h) if !h.readable(epoch) => Err(VosError::Aggregated { cont, epoch, horizon: h.upto }),
            _ => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Apply a batch atomically; returns once it is on stable storage.
    pub fn update(&self, batch: &[Update]) -> Result<(), VosError> {
        let e = self.encode_batch(batch)?;
        self.commit_encoded(e)
    }

    /// Tests only: [`Vos::update`], then stop as a power loss would right after the syncs,
    /// before the batch's pending-extent rows are deleted (`tests/torn_extent.rs`).
    #[doc(hidden)]
    pub fn update_then_stop_before_settling(self, batch: &[Update]) -> Result<(), VosError> {
        let s = self.submit_and_sync_extents(self.encode_batch(batch)?)?;
        s.extents_synced?;
        s.committing.wait()
    }

    /// Tests only: stop as a power loss would, losing the deferred rows (pending-extent deletes)
    /// that no group has taken yet.
    #[doc(hidden)]
    pub fn stop_losing_deferred_rows(self) {
        self.writer.discard_deferred();
    }

    /// Commit an encoded batch. Extent bytes and their index rows are synced at the same time,
    /// not one after the other: the lanes sync the journal while this thread syncs the extent
    /// files the batch wrote into, and the batch is acknowledged once both are durable. A crash
    /// in between can leave an index row durable without its bytes; the batch's pending-extent
    /// rows name those rows, and the next open checks each one against its checksum and drops
    /// the row if its bytes are not all there (`drop_unsynced_extents`). Such a row was never
    /// acknowledged. Pending rows of synced extents are deleted right after (`settle`).
    fn commit_encoded(&self, e: Encoded) -> Result<(), VosError> {
        let s = self.submit_and_sync_extents(e)?;
        let committed = s.committing.wait();
        self.settle(committed.and(s.extents_synced), s.pending, s.indexing)
    }

    /// The first half of `commit_encoded`, for blocking and async callers alike: queue the
    /// batch, then sync its extent files while the lanes commit it.
    fn submit_and_sync_extents(&self, e: Encoded) -> Result<Submitted, VosError> {
        let committing = self.writer.submit(e.ops, e.punches, e.extent_bytes)?;
        Ok(Submitted { committing, extents_synced: sync_touched(&e.touched), pending: e.pending, indexing: e.indexing })
    }

    fn settle(&self, outcome: Result<(), VosError>, pending: Vec<Vec<u8>>, indexing: Vec<(ContId, Oid)>) -> Result<(), VosError> {
        // On failure the pending rows stay: the next open checks those extents.
        outcome?;
        if !pending.is_empty() {
            // Delete them soon, riding along with the next group rather than costing a
            // journal sync of their own (`GroupCommit::defer`): while a pending row is there,
            // damage to its acknowledged extent would read at the next open as a torn write
            // and drop the row instead of being found and repaired by scrub. If the store stops
            // first, the next open checks those extents: whole.
            self.writer.defer(pending.into_iter().map(|k| EngineOp::Delete(Space::Meta, k)).collect());
        }
        self.note_indexed(indexing);
        Ok(())
    }

    fn indexed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<(ContId, Oid)>> {
        self.indexed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index rows to write for the objects of a batch: one per object not known to have one.
    /// Only rows made durable are remembered (`note_indexed`), so a failed commit cannot leave
    /// an object whose records nothing lists.
    fn index_rows(&self, objects: impl Iterator<Item = (ContId, Oid)>, ops: &mut Vec<EngineOp>) -> Vec<(ContId, Oid)> {
        let known = self.indexed();
        let mut new = std::collections::HashSet::new();
        for o in objects {
            if !known.contains(&o) && new.insert(o) {
                ops.push(EngineOp::Put(Space::Objects, object_prefix(o.0, o.1), Vec::new()));
            }
        }
        new.into_iter().collect()
    }

    fn note_indexed(&self, objects: Vec<(ContId, Oid)>) {
        if objects.is_empty() {
            return;
        }
        let mut known = self.indexed();
        if known.len() + objects.len() > INDEXED_OBJECTS_MAX {
            known.clear();
        }
        known.extend(objects);
    }

    /// [`Vos::update`] for async callers: encoding (checksums, copies) runs on the caller's
    /// task, and the task, not a thread, waits for the group commit.
    pub async fn update_async(&self, batch: &[Update]) -> Result<(), VosError> {
        // Large extents are written to extent files while encoding: blocking I/O, kept off the
        // runtime's worker threads where the runtime allows it.
        let big = batch.iter().any(|u| matches!(&u.op, UpdateOp::Extent { data, .. } if data.len() >= EXTENT_FILE_MIN_BYTES));
        let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        // Encode (writing extents), submit, then sync the extent files while the lanes sync the
        // journal (`commit_encoded`), all in one blocking section.
        let start = || self.encode_batch(batch).and_then(|e| self.submit_and_sync_extents(e));
        let s = if big && multi { tokio::task::block_in_place(start)? } else { start()? };
        let committed = s.committing.wait_async().await;
        self.settle(committed.and(s.extents_synced), s.pending, s.indexing)
    }

    /// Check a batch against the limits and turn it into engine rows and punch entries.
    fn encode_batch(&self, batch: &[Update]) -> Result<Encoded, VosError> {
        if batch.len() > BATCH_UPDATES_MAX {
            return Err(VosError::BatchTooLarge { got: 0, ops: batch.len(), max_bytes: BATCH_BYTES_MAX, max_ops: BATCH_UPDATES_MAX });
        }
        let mut ops = Vec::with_capacity(batch.len() * 2);
        let mut punches = Vec::new();
        let mut touched = Vec::new();
        let mut pending = Vec::new();
        let mut bytes = 0usize;
        let mut extent_bytes = 0usize;
        let total: usize = batch.iter().map(|u| match &u.op {
            UpdateOp::Single { value, .. } => value.len(),
            UpdateOp::Extent { data, .. } => data.len(),
            _ => 0,
        }).sum();
        if total > BATCH_BYTES_MAX {
            return Err(VosError::BatchTooLarge { got: total, ops: batch.len(), max_bytes: BATCH_BYTES_MAX, max_ops: BATCH_UPDATES_MAX });
        }
        for u in batch {
            check_key("dkey", &u.dkey)?;
            let p = |akey: &[u8]| akey_prefix(u.cont, u.oid, &u.dkey, akey);
            match &u.op {
                UpdateOp::Single { akey, value } => {
                    check_key("akey", akey)?;
                    if value.len() > VALUE_BYTES_MAX {
                        return Err(VosError::TooLarge { what: "single value", got: value.len(), max: VALUE_BYTES_MAX });
                    }
                    bytes += value.len();
                    ops.push(EngineOp::Put(Space::Records, single_key(&p(akey), u.epoch), record::encode(RecordKind::Value, value.len() as u64, value)));
                }
                UpdateOp::Extent { akey, offset, data } => {
                    check_key("akey", akey)?;
                    if data.is_empty() {
                        return Err(VosError::Empty { what: "extent data" });
                    }
                    if data.len() as u64 > EXTENT_BYTES_MAX {
                        return Err(VosError::TooLarge { what: "extent", got: data.len(), max: EXTENT_BYTES_MAX as usize });
                    }
                    check_extent(*offset, data.len() as u64)?;
                    bytes += data.len();
                    let key = extent_key(&p(akey), *offset, u.epoch);
                    let value = if data.len() >= EXTENT_FILE_MIN_BYTES {
                        let (r, t) = self.extents.append(data)?;
                        touched.push(t);
                        extent_bytes += data.len();
                        pending.push(pending_extent_key(&r));
                        ops.push(EngineOp::Put(Space::Meta, pending_extent_key(&r), key.clone()));
                        record::encode(RecordKind::ValueRef, data.len() as u64, &r.encode())
                    } else {
                        record::encode(RecordKind::Value, data.len() as u64, data)
                    };
                    ops.push(EngineOp::Put(Space::Records, key, value));
                }
                UpdateOp::PunchExtent { akey, offset, len } => {
                    check_key("akey", akey)?;
                    check_extent(*offset, *len)?;
                    if *len > EXTENT_BYTES_MAX * PUNCH_PIECES_MAX {
                        return Err(VosError::TooLarge { what: "extent punch (punch whole dkeys instead)", got: *len as usize, max: (EXTENT_BYTES_MAX * PUNCH_PIECES_MAX) as usize });
                    }
                    let mut off = *offset;
                    while off < offset + len {
                        let piece = (offset + len - off).min(EXTENT_BYTES_MAX);
                        ops.push(EngineOp::Put(Space::Records, extent_key(&p(akey), off, u.epoch), record::encode(RecordKind::Punch, piece, &[])));
                        off += piece;
                    }
                }
                UpdateOp::PunchAkey { akey } => {
                    check_key("akey", akey)?;
                    punches.push(PunchEntry { cont: u.cont, oid: u.oid, scope: PunchScope::Akey(u.dkey.clone(), akey.clone()), epoch: u.epoch });
                }
                UpdateOp::PunchDkey => punches.push(PunchEntry { cont: u.cont, oid: u.oid, scope: PunchScope::Dkey(u.dkey.clone()), epoch: u.epoch }),
                UpdateOp::PunchObject => punches.push(PunchEntry { cont: u.cont, oid: u.oid, scope: PunchScope::Object, epoch: u.epoch }),
            }
        }
        let indexing = self.index_rows(batch.iter().map(|u| (u.cont, u.oid)), &mut ops);
        if bytes > BATCH_BYTES_MAX {
            return Err(VosError::BatchTooLarge { got: bytes, ops: batch.len(), max_bytes: BATCH_BYTES_MAX, max_ops: BATCH_UPDATES_MAX });
        }
        for p in &punches {
            ops.push(EngineOp::Put(Space::Punches, p.encode_key(), Vec::new()));
        }
        {
            let mut d = self.dirty();
            for u in batch {
                d.note_write(u.cont, u.epoch);
            }
        }
        Ok(Encoded { ops, punches, touched, pending, extent_bytes, indexing })
    }

    /// The newest single value of `akey` at or below `epoch`, with the epoch it was written at.
    pub fn fetch_single(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<Option<(Epoch, Vec<u8>)>, VosError> {
        self.check_readable(cont, epoch)?;
        let p = akey_prefix(cont, oid, dkey, akey);
        let hidden_upto = self.punches.covering(cont, oid, Some(dkey), Some(akey), epoch);
        let mut end = p.clone();
        end.push(KIND_SINGLE + 1);
        let Some(row) = self.engine.scan(Space::Records, &single_key(&p, epoch), Some(&end), false).next() else {
            return Ok(None);
        };
        let (k, v) = row?;
        let row = self.decode_row(k, &v)?;
        if hidden_upto.is_some_and(|h| row.key.epoch <= h) || row.kind == RecordKind::Punch {
            return Ok(None);
        }
        Ok(Some((row.key.epoch, row.payload)))
    }

    /// Rows of one akey's extents that may overlap `[offset, end)`, visible at `epoch`, oldest
    /// first; bytes in extent files are left unread (`load_extent`).
    fn extent_rows(&self, p: &[u8], offset: u64, end: Option<u64>, epoch: Epoch, hidden_upto: Option<Epoch>) -> Result<Vec<ExtentRow>, VosError> {
        // An extent starting more than EXTENT_BYTES_MAX before `offset` cannot reach it.
        let from = extent_key(p, offset.saturating_sub(EXTENT_BYTES_MAX - 1), Epoch::MAX);
        let to = match end {
            Some(e) => extent_key(p, e, Epoch::MAX),
            None => {
                let mut t = p.to_vec();
                t.push(KIND_EXTENT + 1);
                t
            }
        };
        let mut rows = Vec::new();
        for r in self.engine.scan(Space::Records, &from, Some(&to), false) {
            let (k, v) = r?;
            let key = decode_record_key(&k).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
            if key.epoch > epoch || hidden_upto.is_some_and(|h| key.epoch <= h) {
                continue;
            }
            // Every row's header is verified (a flipped length would change which rows show).
            let rec = record::decode(&v).map_err(|d| corrupt(&k, d))?;
            let start = key.offset.unwrap_or(0);
            if start + rec.len <= offset {
                continue;
            }
            let (kind, body) = match rec.kind {
                RecordKind::Value => (RecordKind::Value, ExtentBody::Inline(rec.payload.to_vec())),
                RecordKind::ValueRef => (RecordKind::Value, ExtentBody::File(extent_ref(&k, rec.payload)?)),
                RecordKind::Punch => (RecordKind::Punch, ExtentBody::None),
            };
            let len = rec.len;
            rows.push(ExtentRow { raw_key: k, key, kind, len, body });
        }
        rows.sort_by_key(|r| r.key.epoch);
        Ok(rows)
    }

    /// The bytes of a value row, read from its extent file (and verified) if they live there.
    fn load_extent(&self, row: &mut ExtentRow) -> Result<(), VosError> {
        if let ExtentBody::File(r) = &row.body {
            let bytes = self.extents.read(r, row.len).map_err(|e| corrupt(&row.raw_key, e))?;
            row.body = ExtentBody::Inline(bytes);
        }
        Ok(())
    }

    /// Read `[offset, offset + len)` of an array akey at `epoch`; holes read as zeros.
    pub fn fetch_extent(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch) -> Result<ExtentRead, VosError> {
        check_extent(offset, len)?;
        self.check_readable(cont, epoch)?;
        if len > FETCH_BYTES_MAX {
            return Err(VosError::TooLarge { what: "fetch", got: len as usize, max: FETCH_BYTES_MAX as usize });
        }
        let p = akey_prefix(cont, oid, dkey, akey);
        let hidden = self.punches.covering(cont, oid, Some(dkey), Some(akey), epoch);
        let mut rows = self.extent_rows(&p, offset, Some(offset + len), epoch, hidden)?;
        let mut owners = OwnerMap::default();
        for (i, r) in rows.iter().enumerate() {
            let s = r.key.offset.unwrap_or(0);
            owners.paint(s.max(offset), (s + r.len).min(offset + len), i);
        }
        let spans: Vec<(u64, u64, usize)> = owners.iter().collect();
        if let [(s, e, i)] = spans[..] {
            if s == offset && e == offset + len && rows[i].kind != RecordKind::Punch {
                // One extent holds the whole range (a file system's chunk read): its bytes
                // are the answer, without zeroing and copying a second buffer.
                let r = &mut rows[i];
                self.load_extent(r)?;
                let ExtentBody::Inline(payload) = std::mem::replace(&mut r.body, ExtentBody::None) else { unreachable!("a value row's bytes were just loaded") };
                let rs = r.key.offset.unwrap_or(0);
                let mut data = payload;
                data.truncate((e - rs) as usize);
                data.drain(..(s - rs) as usize);
                return Ok(ExtentRead { data, written: vec![(offset, len)] });
            }
        }
        let mut data = vec![0u8; len as usize];
        let mut written = Vec::new();
        for (s, e, i) in spans {
            let r = &mut rows[i];
            if r.kind == RecordKind::Punch {
                continue;
            }
            self.load_extent(r)?;
            let ExtentBody::Inline(payload) = &r.body else { unreachable!("a value row's bytes were just loaded") };
            let rs = r.key.offset.unwrap_or(0);
            data[(s - offset) as usize..(e - offset) as usize].copy_from_slice(&payload[(s - rs) as usize..(e - rs) as usize]);
            match written.last_mut() {
                Some((ws, wl)) if *ws + *wl == s => *wl += e - s,
                _ => written.push((s, e - s)),
            }
        }
        Ok(ExtentRead { data, written })
    }

    /// The written ranges of an array akey at `epoch`, merged, in offset order.
    pub fn list_extents(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<Vec<(u64, u64)>, VosError> {
        self.check_readable(cont, epoch)?;
        let p = akey_prefix(cont, oid, dkey, akey);
        let hidden = self.punches.covering(cont, oid, Some(dkey), Some(akey), epoch);
        let rows = self.extent_rows(&p, 0, None, epoch, hidden)?;
        let mut owners = OwnerMap::default();
        for (i, r) in rows.iter().enumerate() {
            let s = r.key.offset.unwrap_or(0);
            owners.paint(s, s + r.len, i);
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e, i) in owners.iter() {
            if rows[i].kind == RecordKind::Punch {
                continue;
            }
            match out.last_mut() {
                Some((os, ol)) if *os + *ol == s => *ol += e - s,
                _ => out.push((s, e - s)),
            }
        }
        Ok(out)
    }

    /// One past the last written byte of an array akey at `epoch` (0 if none).
    pub fn array_size(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<u64, VosError> {
        Ok(self.list_extents(cont, oid, dkey, akey, epoch)?.last().map_or(0, |(s, l)| s + l))
    }

    fn akey_visible(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<bool, VosError> {
        if self.fetch_single(cont, oid, dkey, akey, epoch)?.is_some() {
            return Ok(true);
        }
        let p = akey_prefix(cont, oid, dkey, akey);
        let hidden = self.punches.covering(cont, oid, Some(dkey), Some(akey), epoch);
        // Headers only: a value in an extent file is visible without reading its bytes (reading
        // them made every object listing read each object's first extent from disk).
        let mut end = p.clone();
        end.push(KIND_EXTENT + 1);
        // An array is visible while some byte is written at `epoch`, as reads see it: counting
        // any value row instead listed an array whose bytes were all punched by extent punches
        // until aggregation removed the rows under the punches, so a listing at one epoch
        // changed when aggregation ran.
        let mut rows: Vec<(Epoch, u64, u64, bool)> = Vec::new();
        let mut punched = false;
        for r in self.engine.scan(Space::Records, &extent_key(&p, 0, Epoch::MAX), Some(&end), false) {
            let (k, v) = r?;
            let key = decode_record_key(&k).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
            if key.epoch > epoch || hidden.is_some_and(|h| key.epoch <= h) {
                continue;
            }
            let rec = record::decode(&v).map_err(|d| corrupt(&k, d))?;
            let value = rec.kind != RecordKind::Punch;
            // Rows come in offset order, newest first at one offset, so a punch hiding a value
            // row's first byte came before it: with none seen yet, that byte is written.
            if value && !punched {
                return Ok(true);
            }
            punched |= !value;
            let start = key.offset.unwrap_or(0);
            rows.push((key.epoch, start, start + rec.len, value));
        }
        rows.sort_by_key(|r| r.0);
        let mut owners = OwnerMap::default();
        for (i, r) in rows.iter().enumerate() {
            owners.paint(r.1, r.2, i);
        }
        let written = owners.iter().any(|(_, _, i)| rows[i].3);
        Ok(written)
    }

    /// Distinct escaped fields that follow `prefix` in record keys, starting after `cursor`.
    fn next_field(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Vec<u8>>, VosError> {
        let start = match after {
            Some(field) => {
                let mut k = prefix.to_vec();
                crate::key_codec::push_escaped(&mut k, field);
                prefix_successor(&k)
            }
            None => prefix.to_vec(),
        };
        let end = prefix_successor(prefix);
        match self.engine.scan(Space::Records, &start, Some(&end), false).next() {
            None => Ok(None),
            Some(r) => {
                let (k, _) = r?;
                let (field, _) = take_escaped(&k[prefix.len()..]).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
                Ok(Some(field))
            }
        }
    }

    /// Akeys of a dkey that have data visible at `epoch`, in byte order, after `cursor`.
    pub fn list_akeys(&self, cont: ContId, oid: Oid, dkey: &[u8], epoch: Epoch, cursor: Option<&[u8]>, limit: usize) -> Result<Page<Vec<u8>>, VosError> {
        self.check_readable(cont, epoch)?;
        let prefix = dkey_prefix(cont, oid, dkey);
        let mut out = Vec::new();
        let mut at = cursor.map(|c| c.to_vec());
        while out.len() < limit.min(LIST_LIMIT_MAX) {
            let Some(akey) = self.next_field(&prefix, at.as_deref())? else { return Ok(Page { items: out, next: None }) };
            if self.akey_visible(cont, oid, dkey, &akey, epoch)? {
                out.push(akey.clone());
            }
            at = Some(akey);
        }
        Ok(Page { next: out.last().cloned(), items: out })
    }

    fn dkey_visible(&self, cont: ContId, oid: Oid, dkey: &[u8], epoch: Epoch) -> Result<bool, VosError> {
        Ok(!self.list_akeys(cont, oid, dkey, epoch, None, 1)?.items.is_empty())
    }

    /// Dkeys of an object that have data visible at `epoch`, in byte order, after `cursor`.
    pub fn list_dkeys(&self, cont: ContId, oid: Oid, epoch: Epoch, cursor: Option<&[u8]>, limit: usize) -> Result<Page<Vec<u8>>, VosError> {
        self.check_readable(cont, epoch)?;
        let prefix = object_prefix(cont, oid);
        let mut out = Vec::new();
        let mut at = cursor.map(|c| c.to_vec());
        while out.len() < limit.min(LIST_LIMIT_MAX) {
            let Some(dkey) = self.next_field(&prefix, at.as_deref())? else { return Ok(Page { items: out, next: None }) };
            if self.dkey_visible(cont, oid, &dkey, epoch)? {
                out.push(dkey.clone());
            }
            at = Some(dkey);
        }
        Ok(Page { next: out.last().cloned(), items: out })
    }

    /// Objects of a container with data visible at `epoch`, in id order, after `cursor`.
    pub fn list_objects(&self, cont: ContId, epoch: Epoch, cursor: Option<Oid>, limit: usize) -> Result<Page<Oid>, VosError> {
        self.check_readable(cont, epoch)?;
        let start = match cursor {
            Some(o) => prefix_successor(&object_prefix(cont, o)),
            None => cont.as_bytes().to_vec(),
        };
        let end = prefix_successor(cont.as_bytes());
        let mut out = Vec::new();
        for r in self.engine.scan(Space::Objects, &start, Some(&end), false) {
            let (k, _) = r?;
            let oid = Oid::from_bytes(k.get(16..32).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt(&k, "bad object index key"))?);
            if !self.list_dkeys(cont, oid, epoch, None, 1)?.items.is_empty() {
                out.push(oid);
                if out.len() >= limit.min(LIST_LIMIT_MAX) {
                    return Ok(Page { next: Some(oid), items: out });
                }
            }
        }
        Ok(Page { items: out, next: None })
    }

    /// Objects of a container with any stored row (visible or not: punched objects keep the
    /// history readers at older epochs need), in id order, after `cursor`. Data movement copies
    /// every version, so it walks these, and checks no visibility (no record is read).
    pub fn list_stored_objects(&self, cont: ContId, cursor: Option<Oid>, limit: usize) -> Result<Page<Oid>, VosError> {
        let start = match cursor {
            Some(o) => prefix_successor(&object_prefix(cont, o)),
            None => cont.as_bytes().to_vec(),
        };
        let end = prefix_successor(cont.as_bytes());
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        let mut out = Vec::new();
        for r in self.engine.scan(Space::Objects, &start, Some(&end), false) {
            let (k, _) = r?;
            let oid = Oid::from_bytes(k.get(16..32).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt(&k, "bad object index key"))?);
            out.push(oid);
            if out.len() >= limit {
                return Ok(Page { next: Some(oid), items: out });
            }
        }
        Ok(Page { items: out, next: None })
    }

    /// Every container with at least one object ever written on this target.
    pub fn list_containers(&self) -> Result<Vec<ContId>, VosError> {
        let mut out = Vec::new();
        let mut start = Vec::new();
        while let Some(r) = self.engine.scan(Space::Objects, &start, None, false).next() {
            let (k, _) = r?;
            let cont = ContId(uuid::Uuid::from_slice(k.get(..16).unwrap_or_default()).map_err(|_| corrupt(&k, "bad object index key"))?);
            out.push(cont);
            start = prefix_successor(cont.as_bytes());
        }
        Ok(out)
    }

    /// Remove everything a container holds on this target, durably, freeing the extent-file
    /// blocks of its extents; returns the record rows and stored value bytes deleted.
    pub fn destroy_container(&self, cont: ContId) -> Result<ReclaimStats, VosError> {
        self.indexed().retain(|(c, _)| *c != cont);
        let end = prefix_successor(cont.as_bytes());
        let mut ops = Vec::new();
        let mut dead: Vec<(ExtentRef, u64)> = Vec::new();
        let mut stats = ReclaimStats { object_removed: true, ..Default::default() };
        for space in [Space::Records, Space::Punches, Space::Objects] {
            for r in self.engine.scan(space, cont.as_bytes(), Some(&end), false) {
                let (k, v) = r?;
                if space == Space::Records {
                    stats.count_deleted(&v, &mut dead);
                }
                ops.push(EngineOp::Delete(space, k));
                if ops.len() >= 10_000 {
                    self.writer.commit(std::mem::take(&mut ops), Vec::new(), 0)?;
                    self.free_extents(&mut dead);
                }
            }
        }
        ops.push(EngineOp::Delete(Space::Meta, Horizon::key(cont)));
        self.writer.commit(ops, Vec::new(), 0)?;
        self.free_extents(&mut dead);
        self.punches.remove_container(cont);
        self.horizons.write().unwrap_or_else(|e| e.into_inner()).remove(&cont);
        self.dirty().forget(cont);
        Ok(stats)
    }

    /// Drop versions at or below `upto` that no read at `upto` or at a retained snapshot epoch
    /// can see any more; punched data is reclaimed. Reads at `upto`, above it, and at every
    /// retained epoch return exactly what they returned before; other reads below `upto` are
    /// refused from then on.
    pub fn aggregate(&self, cont: ContId, upto: Epoch, retained: &[Epoch]) -> Result<AggregateStats, VosError> {
        let mut stats = AggregateStats::default();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let step = self.aggregate_step(cont, upto, retained, from.as_deref(), AggregateLimits::UNLIMITED)?;
            stats.add(&step.stats);
            match step.next {
                Some(n) => from = Some(n),
                None => return Ok(stats),
            }
        }
    }

    /// Whether a background pass over `cont` at `upto` keeping `retained` has anything to do
    /// (writes at or below `upto` since the last pass, or another snapshot list); if so the
    /// caller must run the pass to its end (or call `aggregation_failed`).
    pub fn aggregation_due(&self, cont: ContId, upto: Epoch, retained: &[Epoch]) -> bool {
        self.dirty().take_due(cont, upto, retained)
    }

    /// A pass taken by `aggregation_due` did not finish: the container is due again.
    pub fn aggregation_failed(&self, cont: ContId) {
        self.dirty().note_all(cont);
    }

    /// One bounded piece of `aggregate`: whole akeys from record key `from` (the container's
    /// start if `None`) until `limits` are crossed. The horizon moves (in memory, then durably
    /// in the same batch as the deletions) before anything is deleted.
    pub fn aggregate_step(&self, cont: ContId, upto: Epoch, retained: &[Epoch], from: Option<&[u8]>, limits: AggregateLimits) -> Result<AggregateStep, VosError> {
        let mut points: Vec<Epoch> = retained.iter().copied().filter(|e| *e <= upto).collect();
        points.push(upto);
        points.sort();
        points.dedup();
        let horizon = {
            let mut map = self.horizons.write().unwrap_or_else(|e| e.into_inner());
            let h = map.entry(cont).or_default();
            *h = h.advance(upto, retained);
            h.clone()
        };
        let mut stats = AggregateStats::default();
        let end = prefix_successor(cont.as_bytes());
        let mut start = match from {
            Some(f) if f.starts_with(cont.as_bytes()) => f.to_vec(),
            _ => cont.as_bytes().to_vec(),
        };
        let mut ops = Vec::new();
        let mut dead: Vec<(ExtentRef, u64)> = Vec::new();
        let next = loop {
            if stats.records_examined >= limits.records_max || stats.bytes_examined >= limits.bytes_max {
                break Some(start);
            }
            // One akey at a time: find the next akey prefix, then gather its rows.
            let Some(first) = self.engine.scan(Space::Records, &start, Some(&end), false).next() else { break None };
            let (k, _) = first?;
            let key = decode_record_key(&k).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
            let p = akey_prefix(key.cont, key.oid, &key.dkey, &key.akey);
            let mut rows = Vec::new();
            for r in self.engine.scan(Space::Records, &p, Some(&prefix_successor(&p)), false) {
                let (k, v) = r?;
                let key = decode_record_key(&k).ok_or_else(|| corrupt(&k, "undecodable record key"))?;
                let rec = record::decode(&v).map_err(|d| corrupt(&k, d))?;
                stats.bytes_examined += v.len() as u64;
                let extent = if rec.kind == RecordKind::ValueRef { Some(extent_ref(&k, rec.payload)?) } else { None };
                let stored_bytes = if extent.is_some() { rec.len } else { rec.payload.len() as u64 };
                rows.push(RowMeta { key, len: rec.len, stored_bytes, extent });
            }
            stats.records_examined += rows.len() as u64;
            let keep = Self::rows_to_keep(&rows, upto, &points, |at| self.punches.covering(key.cont, key.oid, Some(&key.dkey), Some(&key.akey), at));
            for (i, r) in rows.iter().enumerate() {
                if !keep[i] {
                    stats.records_removed += 1;
                    stats.bytes_reclaimed += r.stored_bytes;
                    ops.push(EngineOp::Delete(Space::Records, encode_record_key(&r.key)));
                    dead.extend(r.extent.map(|x| (x, r.len)));
                }
            }
            start = prefix_successor(&p);
        };
        if !ops.is_empty() {
            ops.push(EngineOp::Put(Space::Meta, Horizon::key(cont), horizon.encode()));
            self.writer.commit(ops, Vec::new(), 0)?;
            self.free_extents(&mut dead);
        }
        Ok(AggregateStep { stats, next })
    }

    /// Free the blocks of extents whose index rows were durably deleted.
    fn free_extents(&self, dead: &mut Vec<(ExtentRef, u64)>) {
        for (r, len) in dead.drain(..) {
            self.extents.punch(&r, len);
        }
    }

    /// Which rows of one akey a read at a kept point (`points`: `upto` and the retained epochs
    /// below it) may return, plus every row above `upto`. An extent punch row that owns bytes at
    /// a point is kept even with nothing older beneath it: an older row arriving later (a late
    /// write, a rebuild import of a version this target missed) must stay hidden by it.
    fn rows_to_keep(rows: &[RowMeta], upto: Epoch, points: &[Epoch], covering: impl Fn(Epoch) -> Option<Epoch>) -> Vec<bool> {
        let mut keep: Vec<bool> = rows.iter().map(|r| r.key.epoch > upto).collect();
        for &at in points {
            let hidden = covering(at);
            let visible = |r: &RowMeta| r.key.epoch <= at && hidden.is_none_or(|h| r.key.epoch > h);
            // Single values: the newest visible row is what a read at `at` returns.
            if let Some(i) = rows.iter().enumerate().filter(|(_, r)| r.key.offset.is_none() && visible(r)).max_by_key(|(_, r)| r.key.epoch).map(|(i, _)| i) {
                keep[i] = true;
            }
            // Extents: every row owning at least one byte at `at`.
            let mut order: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].key.offset.is_some() && visible(&rows[i])).collect();
            order.sort_by_key(|&i| rows[i].key.epoch);
            let mut owners = OwnerMap::default();
            for i in order {
                let s = rows[i].key.offset.unwrap_or(0);
                owners.paint(s, s + rows[i].len, i);
            }
            for (_, _, i) in owners.iter() {
                keep[i] = true;
            }
        }
        keep
    }

    /// Every stored row of an object (all versions, punches included), for copying a shard
    /// to another target version-for-version (rebuild, reintegration).
    pub fn export_object(&self, cont: ContId, oid: Oid) -> Result<Vec<RawRecord>, VosError> {
        let p = object_prefix(cont, oid);
        let end = prefix_successor(&p);
        let mut out = Vec::new();
        for space in [Space::Records, Space::Punches] {
            for r in self.engine.scan(space, &p, Some(&end), false) {
                let (key, value) = r?;
                let value = if space == Space::Records { self.materialize(&key, value)? } else { value };
                out.push(RawRecord { punch: space == Space::Punches, key, value });
            }
        }
        Ok(out)
    }

    /// Bytes `export_object` would carry for an object (keys and values as exported, extents
    /// in extent files counted by their length, not read), per dkey group: `group_of(dkey)`
    /// must be below `groups`. Data movement sizes its work with it before it starts.
    pub fn object_stored_bytes(&self, cont: ContId, oid: Oid, groups: usize, group_of: impl Fn(&[u8]) -> usize) -> Result<Vec<u64>, VosError> {
        let p = object_prefix(cont, oid);
        let end = prefix_successor(&p);
        let mut out = vec![0u64; groups];
        for r in self.engine.scan(Space::Records, &p, Some(&end), false) {
            let (key, value) = r?;
            let k = decode_record_key(&key).ok_or_else(|| corrupt(&key, "undecodable record key"))?;
            let r = record::decode(&value).map_err(|d| corrupt(&key, d))?;
            let value_bytes = if r.kind == RecordKind::ValueRef { record::HEADER_BYTES as u64 + r.len } else { value.len() as u64 };
            let g = group_of(&k.dkey);
            assert!(g < groups, "group {g} of {groups}");
            out[g] += key.len() as u64 + value_bytes;
        }
        Ok(out)
    }

    /// One page of `export_object`, so an object of any size moves in bounded memory: stored
    /// records with raw keys after `after` and at most `upto`, in key order, stopping once
    /// `bytes_max` bytes are taken (at least one record). The object's punches come with the
    /// page that reaches the end (`upto` `None`, not truncated). Returns the rows and whether
    /// the page stopped early (the next one starts after its last row's key). Shards of one
    /// object share record keys, so a page range means the same versions on each.
    pub fn export_object_page(&self, cont: ContId, oid: Oid, after: Option<&[u8]>, upto: Option<&[u8]>, bytes_max: usize) -> Result<(Vec<RawRecord>, bool), VosError> {
        let p = object_prefix(cont, oid);
        let start = match after {
            Some(a) => [a, &[0u8][..]].concat(),
            None => p.clone(),
        };
        let end = match upto {
            Some(u) => [u, &[0u8][..]].concat(),
            None => prefix_successor(&p),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in self.engine.scan(Space::Records, &start, Some(&end), false) {
            if bytes >= bytes_max && !out.is_empty() {
                return Ok((out, true));
            }
            let (key, value) = r?;
            // Extents kept in extent files travel as their bytes, like inline ones.
            let value = self.materialize(&key, value)?;
            bytes += key.len() + value.len();
            out.push(RawRecord { punch: false, key, value });
        }
        if upto.is_none() {
            let end = prefix_successor(&p);
            for r in self.engine.scan(Space::Punches, &p, Some(&end), false) {
                let (key, value) = r?;
                out.push(RawRecord { punch: true, key, value });
            }
        }
        Ok((out, false))
    }

    /// [`Vos::export_object_page`] written into `sink` (no buffer per record: an extent is
    /// read from its extent file straight into the sink's buffer), keeping only the rows
    /// `keep` accepts (`keep` sees no values: they are not read for rows it refuses). The
    /// page stops once `bytes_max` bytes were written (at least one row); its `next` is the
    /// last row looked at, kept or not. Punches come with the page that reaches the end.
    pub fn export_object_page_to(&self, cont: ContId, oid: Oid, after: Option<&[u8]>, bytes_max: usize, keep: &dyn Fn(RecordRef<'_>) -> bool, sink: &mut dyn RecordSink) -> Result<ExportedPage, VosError> {
        let p = object_prefix(cont, oid);
        let start = match after {
            Some(a) => [a, &[0u8][..]].concat(),
            None => p.clone(),
        };
        let end = prefix_successor(&p);
        let mut page = ExportedPage::default();
        let mut last: Option<Vec<u8>> = None;
        let verify = !sink.receiver_verifies();
        for r in self.engine.scan(Space::Records, &start, Some(&end), false) {
            if page.bytes >= bytes_max as u64 && page.records > 0 {
                page.next = last;
                return Ok(page);
            }
            let (key, value) = r?;
            if keep(RecordRef { punch: false, key: &key, value: &[] }) {
                let rec = record::decode(&value).map_err(|d| corrupt(&key, d))?;
                if rec.kind == RecordKind::ValueRef {
                    // Extents kept in extent files travel as their bytes, like inline ones.
                    let x = extent_ref(&key, rec.payload)?;
                    if rec.len > EXTENT_BYTES_MAX {
                        return Err(corrupt(&key, format!("extent reference of {} bytes", rec.len)));
                    }
                    let buf = sink.record_aligned(false, &key, record::HEADER_BYTES + rec.len as usize, record::HEADER_BYTES);
                    let at = buf.len();
                    buf.extend_from_slice(&[0u8; record::HEADER_BYTES]);
                    let read = if verify { self.extents.read_append(&x, rec.len, buf) } else { self.extents.read_append_unverified(&x, rec.len, buf) };
                    let crc = read.map_err(|e| corrupt(&key, e))?;
                    buf[at..at + record::HEADER_BYTES].copy_from_slice(&record::value_header(rec.len, crc));
                    page.bytes += (key.len() + record::HEADER_BYTES) as u64 + rec.len;
                } else {
                    sink.record(false, &key, value.len()).extend_from_slice(&value);
                    page.bytes += (key.len() + value.len()) as u64;
                }
                page.records += 1;
            }
            last = Some(key);
        }
        for r in self.engine.scan(Space::Punches, &p, Some(&end), false) {
            let (key, value) = r?;
            if keep(RecordRef { punch: true, key: &key, value: &value }) {
                sink.record(true, &key, value.len()).extend_from_slice(&value);
                page.records += 1;
                page.bytes += (key.len() + value.len()) as u64;
            }
        }
        Ok(page)
    }

    /// Store rows exported by `export_object` on another target (verified first), durably.
    pub fn import(&self, records: &[RawRecord]) -> Result<(), VosError> {
        let refs: Vec<RecordRef<'_>> = records.iter().map(RawRecord::as_ref).collect();
        self.import_refs(&refs)
    }

    /// [`Vos::import`] of borrowed rows. Extents of `EXTENT_FILE_MIN_BYTES` or more go to extent
    /// files as the update path puts them (one direct write, a reference in the index), not
    /// inline into the LSM, which writes them twice (journal, then blob file) and copies them
    /// more: rebuild, resync and drain import at disk speed. Rows that reference an extent file
    /// are refused: they name another target's files (exports carry the bytes).
    pub fn import_refs(&self, records: &[RecordRef<'_>]) -> Result<(), VosError> {
        let mut ops = Vec::with_capacity(records.len() + 1);
        let mut punches = Vec::new();
        let mut objects = Vec::new();
        let mut pending = Vec::new();
        let mut extent_bytes = 0usize;
        // Verified first, every row; then the extents all go to one place of one extent file
        // (`append_many`), so the import syncs one file.
        let mut rows = Vec::with_capacity(records.len());
        let mut to_file: Vec<(&[u8], u32)> = Vec::new();
        for r in records {
            if r.punch {
                let p = PunchEntry::decode_key(r.key).ok_or_else(|| corrupt(r.key, "undecodable punch key"))?;
                objects.push((p.cont, p.oid));
                self.dirty().note_write(p.cont, p.epoch);
                punches.push(p);
                rows.push(None);
            } else {
                let k = decode_record_key(r.key).ok_or_else(|| corrupt(r.key, "undecodable record key"))?;
                // One pass over the value both verifies it and gives its crc for an extent file.
                let (rec, payload_crc) = record::decode_with_payload_crc(r.value).map_err(|d| corrupt(r.key, d))?;
                if rec.kind == RecordKind::ValueRef {
                    return Err(corrupt(r.key, "an imported row references an extent file of another target"));
                }
                objects.push((k.cont, k.oid));
                self.dirty().note_write(k.cont, k.epoch);
                let file = rec.kind == RecordKind::Value && k.offset.is_some() && (EXTENT_FILE_MIN_BYTES..=EXTENT_BYTES_MAX as usize).contains(&rec.payload.len());
                rows.push(file.then_some((to_file.len(), rec.len)));
                if file {
                    to_file.push((rec.payload, payload_crc));
                    extent_bytes += rec.payload.len();
                }
            }
        }
        let (refs, touched) = self.extents.append_many(&to_file)?;
        for (r, row) in records.iter().zip(rows) {
            if r.punch {
                ops.push(EngineOp::Put(Space::Punches, r.key.to_vec(), Vec::new()));
                continue;
            }
            let value = match row {
                Some((i, len)) => {
                    let x = &refs[i];
                    pending.push(pending_extent_key(x));
                    ops.push(EngineOp::Put(Space::Meta, pending_extent_key(x), r.key.to_vec()));
                    record::encode(RecordKind::ValueRef, len, &x.encode())
                }
                None => r.value.to_vec(),
            };
            ops.push(EngineOp::Put(Space::Records, r.key.to_vec(), value));
        }
        let indexing = self.index_rows(objects.into_iter(), &mut ops);
        self.commit_encoded(Encoded { ops, punches, touched, pending, extent_bytes, indexing })
    }

    /// One stored row by its raw key, checksum-verified (scrub repairs from a replica's copy).
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<RawRecord>, VosError> {
        match self.engine.get(Space::Records, key)? {
            None => Ok(None),
            Some(value) => {
                let value = self.materialize(key, value)?;
                Ok(Some(RawRecord { punch: false, key: key.to_vec(), value }))
            }
        }
    }

    /// Verify the checksum of every stored record; report the bad ones. Keys are listed first
    /// and each value read on its own, so damage below us (a value file failing its own check)
    /// is still reported against the record it hit, which scrub can then repair.
    pub fn verify_all(&self) -> Result<ScrubReport, VosError> {
        let mut report = ScrubReport::default();
        for k in self.engine.scan_keys(Space::Records) {
            let k = match k {
                Ok(k) => k,
                Err(e @ VosError::Corrupt { .. }) => {
                    report.engine_errors.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            report.records_checked += 1;
            let defect = match self.engine.get(Space::Records, &k) {
                Ok(Some(v)) => match self.materialize(&k, v) {
                    Ok(v) => {
                        report.bytes_checked += v.len() as u64;
                        None
                    }
                    Err(VosError::Corrupt { defect, .. }) => Some(defect),
                    Err(e) => return Err(e),
                },
                // Deleted since the key was listed (aggregation): nothing to check.
                Ok(None) => None,
                Err(VosError::Corrupt { defect, .. }) => Some(defect),
                Err(e) => return Err(e),
            };
            if let Some(defect) = defect {
                report.corrupt.push(CorruptRecord { key: decode_record_key(&k), raw_key: k, defect });
            }
        }
        Ok(report)
    }

    /// Checkpoint: write buffered rows into the engine's sorted files so that recovery after a
    /// restart replays less.
    pub fn flush(&self) -> Result<(), VosError> {
        // Deferred rows (pending-extent deletes) first: a flush is what scrub runs before it
        // checks, and what a caller runs to have everything on disk, so after it no pending row
        // of an acknowledged extent is left for a crash to turn into a "torn write".
        self.writer.submit(Vec::new(), Vec::new(), 0)?.wait()?;
        self.engine.flush()
    }

    /// Space used by this target and free on its file system.
    pub fn space(&self) -> Result<SpaceInfo, VosError> {
        let (total, free) = fs_space(&self.path).map_err(|source| VosError::Io { path: self.path.clone(), source })?;
        Ok(SpaceInfo { used_bytes: self.engine.disk_bytes() + self.extents.disk_bytes(), fs_total_bytes: total, fs_free_bytes: free })
    }
}

/// `(total, available to unprivileged writers)` bytes of the file system holding `path`.
pub fn fs_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a plain struct statvfs fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}
