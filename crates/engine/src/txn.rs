//! Transactional KV at the shard leader (seed 002): locks, intents, transaction records,
//! one-round commits and intent resolution.
//!
//! A KV shard is one dkey of a store object. Its **leader** (`kv_msg::kv_leader`: the first
//! replica of the group holding all its data) serves every request for the shard, so one
//! place orders reads, locks and commits:
//! - Akeys of the dkey: `k` + user key → a version per commit (`[1] + value`, or `[0]` for a
//!   delete, so the newest version's epoch is always known); `i` + txn id → the intent record
//!   of a prepared transaction (its reads and writes); `t` + txn id → a transaction record
//!   (the decision) when this shard coordinates.
//! - In memory, per shard: the locks of prepared transactions (write locks per key, read locks
//!   per key and per range), rebuilt from the intent records whenever the shard's state is
//!   (re)created, and the proposal epoch of each.
//!
//! Rules that make it serializable (each commit is atomic at one epoch, and epoch order
//! agrees with the conflict order):
//! - A read at epoch `r` first merges `r` into the leader's clock, so anything the leader
//!   proposes later is above `r`; a write lock whose proposal is at or below `r` makes the
//!   read wait until that transaction is decided and resolved (asking its coordinator,
//!   aborting it when abandoned). So a read at `r` never changes afterwards.
//! - Prepare/commit take every lock first (conflict: the older transaction waits up to a
//!   deadline, the younger aborts at once: wait-die, no deadlocks), then check that nothing
//!   committed after the transaction's read epoch on any key or range it read, then write.
//! - Locks are held from prepare until the decision is applied; the commit epoch is the
//!   largest proposal, above every epoch each participant served before it locked.
//! - A new shard state (restart, change of leader, any map change) serves nothing until its
//!   clock has passed its creation time plus twice the maximum clock drift: whatever an
//!   earlier leader served was below that.

use super::*;
use std::collections::{HashSet, VecDeque};
use std::time::Instant;
use strata_placement::ShardLoc;
use strata_rpc::kv_msg::*;
use strata_types::{ContId, Oid};
use tokio::sync::watch;

/// How long a read waits for an undecided transaction holding a key below its epoch.
const READ_WAIT_MAX: Duration = Duration::from_secs(8);
/// How long an older transaction waits for a younger one's lock before giving up.
const LOCK_WAIT_MAX: Duration = Duration::from_secs(3);
/// Re-check interval while waiting (wake-ups come earlier through the shard's change counter).
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// Least time between two status queries for one undecided transaction by one waiter.
const STATUS_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// A prepared transaction with no decision this long after its proposal is abandoned (its
/// client died): whoever meets it asks the coordinator to abort it.
const ABANDON_MS: u64 = 4_000;
/// Decided outcomes each engine remembers (the participants' transaction cache).
const DECIDED_MAX: usize = 100_000;
/// Transactions one shard may hold prepared at once; beyond it new ones are refused (Busy).
const PREPARED_MAX: usize = 10_000;
/// Values larger than this are not kept in a shard's value cache.
const CACHED_VALUE_BYTES_MAX: usize = 4096;
/// Bytes of cached values over all shards of an engine; a shard that would pass it empties
/// its own cache instead of growing.
const CACHED_BYTES_MAX: usize = 32 << 20;
/// Keys one scan answer carries at most.
const SCAN_PAGE_MAX: usize = 1_000;
/// Pages of the object store one range check may walk.
const RANGE_PAGES_MAX: usize = 10_000;

const KIND_DATA: u8 = b'k';
const KIND_INTENT: u8 = b'i';
const KIND_RECORD: u8 = b't';

fn akey(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(rest.len() + 1);
    a.push(kind);
    a.extend_from_slice(rest);
    a
}

fn encode_version(v: Option<&[u8]>) -> Vec<u8> {
    match v {
        Some(v) => {
            let mut b = Vec::with_capacity(v.len() + 1);
            b.push(1);
            b.extend_from_slice(v);
            b
        }
        None => vec![0],
    }
}

fn decode_version(b: &[u8]) -> Result<Option<Vec<u8>>, RemoteError> {
    match b.first() {
        Some(1) => Ok(Some(b[1..].to_vec())),
        Some(0) if b.len() == 1 => Ok(None),
        _ => Err(rerr(ErrorCode::Corrupt, "KV version record has an unknown format")),
    }
}

fn conflict(key: Option<&[u8]>, reason: impl Into<String>) -> KvResp {
    KvResp::Refused(KvRefusal::Conflict { key: key.map(<[u8]>::to_vec), reason: reason.into() })
}

type ShardKey = (PoolId, ContId, Oid, Vec<u8>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Locks taken, reads being checked; no epoch yet (so readers ignore it).
    Validating,
    /// One-round commit being written at `proposal`.
    Fast,
    /// Intent record being written at `proposal`.
    Writing,
    /// Intent record durable on every replica; waits for the decision.
    Prepared,
}

#[derive(Clone, Debug)]
struct Held {
    coord: Vec<u8>,
    rts: Epoch,
    /// `Epoch::MAX` until the transaction has one.
    proposal: Epoch,
    phase: Phase,
    /// False while (or after failing) writing to every replica: a retry of the same request
    /// writes again (same epoch, same bytes), and a one-round commit is rolled forward by
    /// whoever meets it (some replica may already show it).
    durable: bool,
    /// The last write to the replicas failed.
    failed: bool,
    reads: ReadSet,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

#[derive(Default)]
struct ShardSt {
    held: HashMap<TxnId, Held>,
    write_locks: BTreeMap<Vec<u8>, TxnId>,
    read_locks: BTreeMap<Vec<u8>, Vec<TxnId>>,
    /// Transactions holding range read locks.
    ranged: HashSet<TxnId>,
    /// Transaction records being read or written (one at a time per transaction).
    records_busy: HashSet<TxnId>,
    values: ValueCache,
}

/// The newest committed version of recently used keys, so a read that meets no lock is
/// answered from memory (the participants' cache of seed 002, for values). Only valid because
/// the leader orders every write of its shard: an entry is set while the writer still holds
/// the key's write lock, to the version it made durable, and a read fills it only when no
/// write could have happened since it read the store (`gen` unchanged, no lock, no entry).
#[derive(Default)]
struct ValueCache {
    /// Key → (epoch of its newest version or 0 if none, value or `None` if deleted/absent).
    map: HashMap<Vec<u8>, (Epoch, Option<Vec<u8>>)>,
    bytes: usize,
    /// Bumped whenever entries are dropped (a fill that started earlier must not land).
    gen: u64,
}

impl ValueCache {
    fn cost(k: &[u8], v: &Option<Vec<u8>>) -> usize {
        k.len() + v.as_ref().map_or(0, Vec::len) + 48
    }

    /// Set `k`'s newest version (not cached when too large or over the engine's budget; a
    /// fill that started earlier can then not land either).
    fn set(&mut self, total: &std::sync::atomic::AtomicUsize, k: &[u8], e: Epoch, v: Option<Vec<u8>>) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((_, old)) = self.map.remove(k) {
            let c = Self::cost(k, &old);
            self.bytes -= c;
            total.fetch_sub(c, Relaxed);
        }
        let c = Self::cost(k, &v);
        if v.as_ref().is_some_and(|v| v.len() > CACHED_VALUE_BYTES_MAX) {
            self.gen += 1;
        } else if total.load(Relaxed) + c > CACHED_BYTES_MAX {
            self.clear(total);
        } else {
            total.fetch_add(c, Relaxed);
            self.bytes += c;
            self.map.insert(k.to_vec(), (e, v));
        }
    }

    /// Drop `k` (its newest version is not known any more).
    fn forget(&mut self, total: &std::sync::atomic::AtomicUsize, k: &[u8]) {
        if let Some((_, old)) = self.map.remove(k) {
            let c = Self::cost(k, &old);
            self.bytes -= c;
            total.fetch_sub(c, std::sync::atomic::Ordering::Relaxed);
        }
        self.gen += 1;
    }

    fn clear(&mut self, total: &std::sync::atomic::AtomicUsize) {
        total.fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
        self.map.clear();
        self.bytes = 0;
        self.gen += 1;
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap_or_else(|e| e.into_inner());
        self.cached_total.fetch_sub(st.values.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ShardSt {
    /// A transaction other than `me` whose locks conflict with reading `reads` and writing
    /// `writes`, with the key.
    fn conflict(&self, me: &TxnId, reads: &ReadSet, writes: &[&[u8]]) -> Option<(TxnId, Vec<u8>)> {
        let other = |t: &TxnId| t != me;
        for k in reads.keys.iter().map(Vec::as_slice).chain(writes.iter().copied()) {
            if let Some(t) = self.write_locks.get(k).filter(|t| other(t)) {
                return Some((*t, k.to_vec()));
            }
        }
        for r in &reads.ranges {
            let hit = self.write_locks.range(r.start.clone()..).take_while(|(k, _)| r.end.as_ref().is_none_or(|e| *k < e)).find(|(_, t)| other(t));
            if let Some((k, t)) = hit {
                return Some((*t, k.clone()));
            }
        }
        for k in writes {
            if let Some(t) = self.read_locks.get(*k).and_then(|ts| ts.iter().find(|t| other(t))) {
                return Some((*t, k.to_vec()));
            }
            for t in self.ranged.iter().filter(|t| other(t)) {
                if self.held.get(t).is_some_and(|h| h.reads.ranges.iter().any(|r| r.contains(k))) {
                    return Some((*t, k.to_vec()));
                }
            }
        }
        None
    }

    fn acquire(&mut self, txn: TxnId, h: Held) {
        for (k, _) in &h.writes {
            let prev = self.write_locks.insert(k.clone(), txn);
            assert!(prev.is_none_or(|p| p == txn), "write lock granted twice");
        }
        for k in &h.reads.keys {
            let v = self.read_locks.entry(k.clone()).or_default();
            if !v.contains(&txn) {
                v.push(txn);
            }
        }
        if !h.reads.ranges.is_empty() {
            self.ranged.insert(txn);
        }
        self.held.insert(txn, h);
    }

    fn release(&mut self, txn: &TxnId) -> Option<Held> {
        let h = self.held.remove(txn)?;
        for (k, _) in &h.writes {
            if self.write_locks.get(k) == Some(txn) {
                self.write_locks.remove(k);
            }
        }
        for k in &h.reads.keys {
            if let Some(v) = self.read_locks.get_mut(k) {
                v.retain(|t| t != txn);
                if v.is_empty() {
                    self.read_locks.remove(k);
                }
            }
        }
        self.ranged.remove(txn);
        Some(h)
    }
}

/// The KV state of one shard this rank leads, valid for one pool-map version.
struct Shard {
    map_version: u64,
    target: TargetId,
    /// Serve nothing before the clock passes this (physical ms).
    ready_at_ms: u64,
    /// Requests hold it shared; a newer state takes it exclusively (and marks this one
    /// retired) before loading, so nothing in flight on the old state is missed.
    gate: Arc<tokio::sync::RwLock<bool>>,
    loaded: tokio::sync::OnceCell<()>,
    prev: std::sync::Mutex<Option<Arc<Shard>>>,
    st: std::sync::Mutex<ShardSt>,
    /// Bumped on every release; waiters subscribe before checking, so no wake-up is lost.
    changed: watch::Sender<u64>,
    /// The engine's count of cached value bytes (`KvState::cached_bytes`).
    cached_total: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shard {
    fn st(&self) -> std::sync::MutexGuard<'_, ShardSt> {
        // Every critical section leaves the maps consistent before any call that can panic.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[derive(Default)]
struct Decided {
    map: HashMap<TxnId, Decision>,
    order: VecDeque<TxnId>,
}

#[derive(Default)]
pub(super) struct KvState {
    shards: std::sync::Mutex<HashMap<ShardKey, Arc<Shard>>>,
    decided: std::sync::Mutex<Decided>,
    cached_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl KvState {
    fn decided(&self, txn: &TxnId) -> Option<Decision> {
        self.decided.lock().unwrap_or_else(|e| e.into_inner()).map.get(txn).copied()
    }
    fn remember(&self, txn: TxnId, d: Decision) {
        let mut c = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        if c.map.insert(txn, d).is_none() {
            c.order.push_back(txn);
            while c.order.len() > DECIDED_MAX {
                if let Some(old) = c.order.pop_front() {
                    c.map.remove(&old);
                }
            }
        }
    }
}

/// Everything a request on one shard needs.
struct Ctx {
    view: Arc<PoolView>,
    pool: PoolId,
    cont: ContId,
    oid: Oid,
    dkey: Vec<u8>,
    group: Vec<ShardLoc>,
    vos: Arc<Vos>,
    shard: Arc<Shard>,
    _gate: tokio::sync::OwnedRwLockReadGuard<bool>,
}

impl Engine {
    pub(super) async fn kv(&self, req: KvReq, payload: Bytes) -> Result<(EngineResp, Bytes), RemoteError> {
        let ctx = self.kv_ctx(req.shard()).await?;
        let resp = match req {
            KvReq::Get { key, at, .. } => return self.kv_get(&ctx, key, at).await,
            KvReq::Scan { range, limit, at, .. } => return self.kv_scan(&ctx, range, limit, at).await,
            KvReq::Commit1 { txn, rts, reads, checks, writes, .. } => self.kv_lock_and_write(&ctx, txn, None, rts, reads, checks, writes, payload).await?,
            KvReq::Prepare { txn, coord, rts, reads, writes, .. } => self.kv_lock_and_write(&ctx, txn, Some(coord), rts, reads, Vec::new(), writes, payload).await?,
            KvReq::Decide { txn, decision, .. } => KvResp::Decided(self.kv_record(&ctx, txn, Some(decision)).await?.unwrap_or(decision)),
            KvReq::Status { txn, abort_if_undecided, .. } => KvResp::Status(self.kv_record(&ctx, txn, abort_if_undecided.then_some(Decision::Aborted)).await?),
            KvReq::Resolve { txn, decision, .. } => {
                self.kv_resolve(&ctx, txn, decision).await?;
                KvResp::Done
            }
            KvReq::Forget { txn, .. } => {
                let e = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
                self.kv_write(&ctx, e, vec![WireOp::PunchAkey { akey: akey(KIND_RECORD, &txn) }], Bytes::new()).await?;
                KvResp::Done
            }
        };
        Ok((EngineResp::Kv(resp), Bytes::new()))
    }

    /// Check this rank leads the shard under the request's map, and get its loaded state.
    async fn kv_ctx(&self, sh: &KvShard) -> Result<Ctx, RemoteError> {
        for _ in 0..4 {
            let view = self.view(sh.pool, sh.map_version).await?;
            let layout = view.placement.layout(sh.oid).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
            let group = layout.group(layout.group_for_dkey(&sh.dkey)).to_vec();
            let leader = kv_leader(&view.map, &group).ok_or_else(|| rerr(ErrorCode::Unavailable, "no replica of this KV shard holds all its data (rebuild pending)"))?;
            let vos = self.target(leader)?.clone();
            let key: ShardKey = (view.map_pool_id, sh.cont, sh.oid, sh.dkey.clone());
            let shard = {
                let mut shards = self.kv.shards.lock().unwrap_or_else(|e| e.into_inner());
                match shards.get(&key) {
                    Some(s) if s.map_version == view.map.version && s.target == leader => s.clone(),
                    Some(s) if s.map_version > view.map.version => return Err(rerr(ErrorCode::StaleMap, format!("pool map version {} is stale", view.map.version))),
                    _ => {
                        let now = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
                        let prev = shards.remove(&key);
                        let s = Arc::new(Shard {
                            map_version: view.map.version,
                            target: leader,
                            ready_at_ms: now.physical_ms() + 2 * self.hlc.max_drift_ms(),
                            gate: Arc::new(tokio::sync::RwLock::new(false)),
                            loaded: tokio::sync::OnceCell::new(),
                            prev: std::sync::Mutex::new(prev),
                            st: std::sync::Mutex::new(ShardSt::default()),
                            changed: watch::channel(0).0,
                            cached_total: self.kv.cached_bytes.clone(),
                        });
                        shards.insert(key, s.clone());
                        s
                    }
                }
            };
            self.kv_load(&shard, &vos, sh.cont, sh.oid, &sh.dkey).await?;
            let gate = shard.gate.clone().read_owned().await;
            if *gate {
                continue;
            }
            return Ok(Ctx { pool: view.map_pool_id, view, cont: sh.cont, oid: sh.oid, dkey: sh.dkey.clone(), group, vos, shard, _gate: gate });
        }
        Err(rerr(ErrorCode::Unavailable, "the KV shard's state keeps changing (pool map moving); retry"))
    }

    /// First use of a shard state: retire the previous one, wait out the clock margin, load
    /// the locks of every prepared transaction from its intent records.
    async fn kv_load(&self, shard: &Arc<Shard>, vos: &Arc<Vos>, cont: ContId, oid: Oid, dkey: &[u8]) -> Result<(), RemoteError> {
        shard
            .loaded
            .get_or_try_init(|| async {
                let prev = shard.prev.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(p) = prev {
                    let mut g = tokio::time::timeout(READ_WAIT_MAX + LOCK_WAIT_MAX, p.gate.write()).await.map_err(|_| rerr(ErrorCode::Unavailable, "old KV shard state still busy"))?;
                    *g = true;
                    // Retired: let it go (a failed load keeps it, to retire it on the next try).
                    *shard.prev.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                for _ in 0..1000 {
                    let now = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?.physical_ms();
                    if now > shard.ready_at_ms {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(shard.ready_at_ms + 1 - now)).await;
                }
                let (v, dkey) = (vos.clone(), dkey.to_vec());
                let records = tokio::task::spawn_blocking(move || -> Result<Vec<(TxnId, IntentRecord)>, VosError> {
                    let mut out = Vec::new();
                    let mut cursor: Option<Vec<u8>> = None;
                    for _ in 0..RANGE_PAGES_MAX {
                        let page = v.list_akeys(cont, oid, &dkey, Epoch::MAX, cursor.as_deref(), 1000)?;
                        for a in &page.items {
                            if a.first() != Some(&KIND_INTENT) {
                                return Ok(out);
                            }
                            let Ok(txn) = TxnId::try_from(&a[1..]) else { continue };
                            if let Some((_, b)) = v.fetch_single(cont, oid, &dkey, a, Epoch::MAX)? {
                                match postcard::from_bytes::<IntentRecord>(&b) {
                                    Ok(r) if r.format == KV_FORMAT => out.push((txn, r)),
                                    _ => tracing::error!(?txn, "undecodable KV intent record; its locks are lost"),
                                }
                            }
                        }
                        match page.next {
                            Some(n) => cursor = Some(n),
                            None => break,
                        }
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?
                .map_err(vos_err)?;
                let mut st = shard.st();
                for (txn, r) in records {
                    // On this replica, not known to be on every replica of this state's map: a
                    // prepare whose write failed on some (a replica that had moved to a newer
                    // map refuses it) is retried by its client under the new map, and must
                    // write the intent again (same epoch, same bytes) before answering, or a
                    // replica without it could lead the shard later and never apply the
                    // transaction's writes there.
                    st.acquire(txn, Held { coord: r.coord, rts: r.rts, proposal: r.proposal, phase: Phase::Prepared, durable: false, failed: true, reads: r.reads, writes: r.writes });
                }
                Ok::<(), RemoteError>(())
            })
            .await
            .map(|_| ())
    }

    /// Apply `ops` at `epoch` on every replica of the shard (the leader included).
    async fn kv_write(&self, ctx: &Ctx, epoch: Epoch, ops: Vec<WireOp>, payload: Bytes) -> Result<(), RemoteError> {
        // Counted as an update admitted under the request's map until every replica has it, as
        // `update` is: a data-movement pass under a newer map waits for it before it reads this
        // store (`wait_older_updates`). Without that, a write still landing on the leader's own
        // replica when a pass had read the shard reached neither the pass's destinations (they
        // were not replicas under its map) nor the pass's copy, and was lost with the old
        // places (an acknowledged transfer vanished after a reintegration). The other replicas
        // count their part themselves (`Replicate` admits). Once a newer map is installed the
        // write is refused before it lands anywhere, and the request is retried under it.
        let (_, _admitted) = self.admit(ctx.pool, ctx.view.map.version).await?;
        let late = leader_write_delay();
        let sends = ctx.group.iter().map(|s| {
            let (ops, payload) = (ops.clone(), payload.clone());
            async move {
                if s.target == ctx.shard.target {
                    if let Some(d) = late {
                        tokio::time::sleep(d).await;
                    }
                }
                self.send_to(&ctx.view, ctx.pool, s.target, ctx.cont, ctx.oid, &ctx.dkey, epoch, ops, payload).await
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }

    fn kv_read_epoch(&self, at: Option<Epoch>) -> Result<Epoch, RemoteError> {
        match at {
            None | Some(Epoch::MAX) => self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string())),
            Some(e) => self.hlc.update(e).map(|_| e).map_err(|e| rerr(ErrorCode::InvalidArgument, format!("read epoch: {e}"))),
        }
    }

    async fn kv_get(&self, ctx: &Ctx, key: Vec<u8>, at: Option<Epoch>) -> Result<(EngineResp, Bytes), RemoteError> {
        let deadline = Instant::now() + READ_WAIT_MAX;
        let answer = |r: Epoch, newest: Option<(Epoch, Option<Vec<u8>>)>| match newest {
            Some((e, Some(v))) if e > Epoch::ZERO => (EngineResp::Kv(KvResp::Value { found: Some(e), read_at: r }), Bytes::from(v)),
            _ => (EngineResp::Kv(KvResp::Value { found: None, read_at: r }), Bytes::new()),
        };
        loop {
            let mut rx = ctx.shard.changed.subscribe();
            let (r, blocker, gen) = {
                let st = ctx.shard.st();
                let r = self.kv_read_epoch(at)?;
                let b = st.write_locks.get(&key).and_then(|t| st.held.get(t).filter(|h| h.proposal <= r).map(|h| (*t, h.clone())));
                if b.is_none() {
                    if let Some((e, v)) = st.values.map.get(&key).filter(|(e, _)| *e <= r) {
                        return Ok(answer(r, Some((*e, v.clone()))));
                    }
                }
                (r, b, st.values.gen)
            };
            if let Some((t, h)) = blocker {
                self.kv_settle(ctx, t, &h, deadline, &mut rx).await?;
                continue;
            }
            let (v, cont, oid, dkey, a) = (ctx.vos.clone(), ctx.cont, ctx.oid, ctx.dkey.clone(), akey(KIND_DATA, &key));
            let found = on_blocking_pool(move || v.fetch_single(cont, oid, &dkey, &a, r)).await?;
            let newest = match found {
                Some((e, b)) => Some((e, decode_version(&b)?)),
                None => None,
            };
            if at.is_none() {
                // Read at the leader's clock: nothing newer existed unless a write came since.
                let mut st = ctx.shard.st();
                if st.values.gen == gen && !st.values.map.contains_key(&key) && !st.write_locks.contains_key(&key) {
                    let (e, v) = newest.clone().unwrap_or((Epoch::ZERO, None));
                    st.values.set(&ctx.shard.cached_total, &key, e, v);
                }
            }
            return Ok(answer(r, newest));
        }
    }

    async fn kv_scan(&self, ctx: &Ctx, range: KeyRange, limit: u32, at: Epoch) -> Result<(EngineResp, Bytes), RemoteError> {
        let deadline = Instant::now() + READ_WAIT_MAX;
        let limit = (limit as usize).min(SCAN_PAGE_MAX);
        loop {
            let mut rx = ctx.shard.changed.subscribe();
            let (r, blocker) = {
                let st = ctx.shard.st();
                let r = self.kv_read_epoch(Some(at))?;
                let b = st
                    .write_locks
                    .range(range.start.clone()..)
                    .take_while(|(k, _)| range.end.as_ref().is_none_or(|e| *k < e))
                    .find_map(|(_, t)| st.held.get(t).filter(|h| h.proposal <= r).map(|h| (*t, h.clone())));
                (r, b)
            };
            if let Some((t, h)) = blocker {
                self.kv_settle(ctx, t, &h, deadline, &mut rx).await?;
                continue;
            }
            let (v, cont, oid, dkey, rg) = (ctx.vos.clone(), ctx.cont, ctx.oid, ctx.dkey.clone(), range.clone());
            let (rows, more) = on_blocking_pool(move || scan_vos(&v, cont, oid, &dkey, &rg, limit, r)).await?;
            let mut payload = Vec::with_capacity(rows.iter().map(|(_, v)| v.len()).sum());
            let keys = rows
                .into_iter()
                .map(|(k, v)| {
                    payload.extend_from_slice(&v);
                    (k, v.len() as u32)
                })
                .collect();
            return Ok((EngineResp::Kv(KvResp::Scanned { keys, more, read_at: r }), Bytes::from(payload)));
        }
    }

    /// A request met `txn`'s lock: wait for it, or settle it (apply a known decision, ask the
    /// coordinator, abort it when abandoned). Returns when the caller should look again;
    /// an error once `deadline` passed.
    async fn kv_settle(&self, ctx: &Ctx, txn: TxnId, h: &Held, deadline: Instant, rx: &mut watch::Receiver<u64>) -> Result<(), RemoteError> {
        if Instant::now() >= deadline {
            return Err(rerr(ErrorCode::Busy, "key locked by a transaction that is still undecided; retry"));
        }
        let wait = |rx: &mut watch::Receiver<u64>| {
            let mut rx = rx.clone();
            async move {
                let _ = tokio::time::timeout(WAIT_SLICE, rx.changed()).await;
            }
        };
        if h.phase == Phase::Fast && h.failed {
            return self.kv_resolve(ctx, txn, Decision::Committed(h.proposal)).await;
        }
        if h.phase != Phase::Prepared {
            wait(rx).await;
            return Ok(());
        }
        let decision = match self.kv.decided(&txn) {
            Some(d) => Some(d),
            None => {
                let age_ms = self.hlc.peek().physical_ms().saturating_sub(h.proposal.physical_ms());
                self.kv_ask_status(ctx, txn, &h.coord, age_ms > ABANDON_MS).await?
            }
        };
        match decision {
            Some(d) => self.kv_resolve(ctx, txn, d).await,
            None => {
                // Undecided: ask again no sooner than this, unless the lock goes first.
                tokio::time::sleep(STATUS_INTERVAL_MIN).await;
                wait(rx).await;
                Ok(())
            }
        }
    }

    /// The decision recorded at `txn`'s coordinator shard (aborting it first if asked).
    async fn kv_ask_status(&self, ctx: &Ctx, txn: TxnId, coord: &[u8], abort: bool) -> Result<Option<Decision>, RemoteError> {
        let sh = KvShard { pool: ctx.pool, map_version: ctx.view.map.version, cont: ctx.cont, oid: ctx.oid, dkey: coord.to_vec() };
        let layout = ctx.view.placement.layout(ctx.oid).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
        let group = layout.group(layout.group_for_dkey(coord));
        let leader = kv_leader(&ctx.view.map, group).ok_or_else(|| rerr(ErrorCode::Unavailable, "the transaction's coordinator shard has no leader"))?;
        if leader.rank == self.rank {
            if coord == ctx.dkey.as_slice() {
                return self.kv_record(ctx, txn, abort.then_some(Decision::Aborted)).await;
            }
            let cctx = Box::pin(self.kv_ctx(&sh)).await?;
            return self.kv_record(&cctx, txn, abort.then_some(Decision::Aborted)).await;
        }
        let addr = ctx.view.addrs.get(&leader.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", leader.rank)))?;
        let req = EngineReq::Kv(KvReq::Status { shard: sh, txn, abort_if_undecided: abort });
        match self.peers.call::<_, EngineResp>(addr, &req, Bytes::new(), FORWARD_TIMEOUT).await {
            Ok((EngineResp::Kv(KvResp::Status(d)), _)) => Ok(d),
            Ok(_) => Err(rerr(ErrorCode::Protocol, "unexpected answer to a transaction status query")),
            Err(e) => Err(rerr(ErrorCode::Unavailable, format!("transaction coordinator unreachable: {e}"))),
        }
    }

    /// Read the transaction record; with `want`, write it when there is none. The answer is
    /// the recorded decision (decisions never change once written).
    async fn kv_record(&self, ctx: &Ctx, txn: TxnId, want: Option<Decision>) -> Result<Option<Decision>, RemoteError> {
        tracing::debug!(txn = ?txn[..4], ?want, "KV record");
        if let Some(d) = self.kv.decided(&txn) {
            return Ok(Some(d));
        }
        let deadline = Instant::now() + LOCK_WAIT_MAX;
        // Record accesses are short (one read, maybe one write): poll rather than wake.
        let mut mine = false;
        for _ in 0..10_000 {
            if ctx.shard.st().records_busy.insert(txn) {
                mine = true;
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if !mine {
            return Err(rerr(ErrorCode::Busy, "transaction record busy"));
        }
        let result = async {
            let (v, cont, oid, dkey, a) = (ctx.vos.clone(), ctx.cont, ctx.oid, ctx.dkey.clone(), akey(KIND_RECORD, &txn));
            if let Some((_, b)) = on_blocking_pool(move || v.fetch_single(cont, oid, &dkey, &a, Epoch::MAX)).await? {
                let rec: TxnRecord = postcard::from_bytes(&b).map_err(|e| rerr(ErrorCode::Corrupt, format!("transaction record: {e}")))?;
                return Ok(Some(rec.decision));
            }
            let Some(d) = want else { return Ok(None) };
            if let Decision::Committed(c) = d {
                // Snapshots take the newest clock over engines: make sure it covers `c`.
                self.hlc.update(c).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
            }
            let rec = postcard::to_allocvec(&TxnRecord { format: KV_FORMAT, decision: d }).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
            let e = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
            let op = WireOp::Single { akey: akey(KIND_RECORD, &txn), len: rec.len() as u32 };
            self.kv_write(ctx, e, vec![op], Bytes::from(rec)).await?;
            Ok(Some(d))
        }
        .await;
        ctx.shard.st().records_busy.remove(&txn);
        if let Ok(Some(d)) = &result {
            self.kv.remember(txn, *d);
        }
        result
    }

    /// Apply a decision to this shard: write the versions at the commit epoch (or not), drop
    /// the intent record, release the locks. Idempotent.
    async fn kv_resolve(&self, ctx: &Ctx, txn: TxnId, d: Decision) -> Result<(), RemoteError> {
        tracing::debug!(txn = ?txn[..4], ?d, "KV resolve");
        let held = ctx.shard.st().held.get(&txn).cloned();
        let locked = held.is_some();
        let writes = match held {
            Some(h) => h.writes,
            None => {
                // Not in memory: written after this state loaded, or already resolved.
                let (v, cont, oid, dkey, a) = (ctx.vos.clone(), ctx.cont, ctx.oid, ctx.dkey.clone(), akey(KIND_INTENT, &txn));
                match on_blocking_pool(move || v.fetch_single(cont, oid, &dkey, &a, Epoch::MAX)).await? {
                    Some((_, b)) => postcard::from_bytes::<IntentRecord>(&b).map_err(|e| rerr(ErrorCode::Corrupt, format!("intent record: {e}")))?.writes,
                    None => {
                        self.kv.remember(txn, d);
                        return Ok(());
                    }
                }
            }
        };
        let punch = WireOp::PunchAkey { akey: akey(KIND_INTENT, &txn) };
        match d {
            Decision::Committed(c) => {
                self.hlc.update(c).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
                let mut ops = Vec::with_capacity(writes.len() + 1);
                let mut payload = Vec::new();
                for (k, v) in &writes {
                    let b = encode_version(v.as_deref());
                    ops.push(WireOp::Single { akey: akey(KIND_DATA, k), len: b.len() as u32 });
                    payload.extend_from_slice(&b);
                }
                // The intent was written at this shard's proposal, at or below `c`: a punch at
                // `c` hides it in the same atomic batch as the versions.
                ops.push(punch);
                self.kv_write(ctx, c, ops, Bytes::from(payload)).await?;
            }
            Decision::Aborted => {
                let e = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
                self.kv_write(ctx, e, vec![punch], Bytes::new()).await?;
            }
        }
        if let Some(d) = resolve_jitter() {
            tokio::time::sleep(d).await;
        }
        {
            let mut st = ctx.shard.st();
            // Another resolver of the same transaction (its client's resolve and a reader
            // settling it run at once) may have finished first and released the locks while
            // this one wrote the same versions; a later transaction may then have committed
            // newer versions of these keys and cached them. Setting the entries now would put
            // this older version back as the newest: a stale read, and a lost update once a
            // transaction wrote on top of what it read.
            let locked = locked && st.held.contains_key(&txn);
            if let Decision::Committed(c) = d {
                for (k, v) in &writes {
                    // Under the write lock the commit is the key's newest version; without it
                    // (resolved from the intent record, or by another resolver) the entry may
                    // be stale: drop it.
                    if locked {
                        st.values.set(&ctx.shard.cached_total, k, c, v.clone());
                    } else {
                        st.values.forget(&ctx.shard.cached_total, k);
                    }
                }
            }
            st.release(&txn);
        }
        self.kv.remember(txn, d);
        ctx.shard.bump();
        Ok(())
    }

    /// Commit1 (`coord = None`) or Prepare: take the locks, check the reads, then write the
    /// versions (one round) or the intent record (phase one).
    #[allow(clippy::too_many_arguments)]
    async fn kv_lock_and_write(&self, ctx: &Ctx, txn: TxnId, coord: Option<Vec<u8>>, rts: Epoch, mut reads: ReadSet, checks: Vec<(Vec<u8>, Option<Vec<u8>>)>, writes: Vec<KvWrite>, payload: Bytes) -> Result<KvResp, RemoteError> {
        match self.kv.decided(&txn) {
            Some(Decision::Committed(c)) if coord.is_none() => return Ok(KvResp::Committed { epoch: c }),
            // A prepare after the decision can only be a stray duplicate: never lock again.
            Some(Decision::Committed(_)) => return Err(rerr(ErrorCode::InvalidArgument, "prepare of a transaction that already committed")),
            Some(Decision::Aborted) => return Ok(conflict(None, "the transaction was already aborted")),
            _ => {}
        }
        let mut at = 0usize;
        let mut wv: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(writes.len());
        for w in writes {
            match w {
                KvWrite::Put { key, len } => {
                    let v = payload.get(at..at + len as usize).ok_or_else(|| rerr(ErrorCode::InvalidArgument, "payload shorter than the writes declare"))?;
                    at += len as usize;
                    wv.push((key, Some(v.to_vec())));
                }
                KvWrite::Delete { key } => wv.push((key, None)),
            }
        }
        if at != payload.len() {
            return Err(rerr(ErrorCode::InvalidArgument, "payload longer than the writes declare"));
        }
        if skip_read_checks() {
            reads = ReadSet::default();
        }
        // A compare-and-set key is read at the newest state: lock it like a read.
        for (k, _) in &checks {
            if !reads.keys.contains(k) {
                reads.keys.push(k.clone());
            }
        }
        let wkeys: Vec<&[u8]> = wv.iter().map(|(k, _)| k.as_slice()).collect();
        let deadline = Instant::now() + LOCK_WAIT_MAX;
        loop {
            let mut rx = ctx.shard.changed.subscribe();
            let retried = ctx.shard.st().held.get(&txn).cloned();
            if let Some(h) = retried {
                // A retried request: the first one holds the locks.
                return match (h.phase, coord.is_some()) {
                    (Phase::Prepared, true) if h.durable => Ok(KvResp::Prepared { proposal: h.proposal }),
                    (Phase::Prepared, true) | (Phase::Fast, false) if h.failed => self.kv_rewrite(ctx, txn, h).await,
                    _ => Err(rerr(ErrorCode::Busy, "this transaction is already being committed on this shard")),
                };
            }
            let blocker = {
                let mut st = ctx.shard.st();
                if st.held.contains_key(&txn) {
                    return Err(rerr(ErrorCode::Busy, "this transaction is already being committed on this shard"));
                }
                if st.held.len() >= PREPARED_MAX {
                    return Err(rerr(ErrorCode::Busy, format!("{PREPARED_MAX} transactions already prepared on this shard")));
                }
                match st.conflict(&txn, &reads, &wkeys) {
                    None => {
                        let h = Held { coord: coord.clone().unwrap_or_default(), rts, proposal: Epoch::MAX, phase: Phase::Validating, durable: false, failed: false, reads: reads.clone(), writes: wv.clone() };
                        st.acquire(txn, h);
                        None
                    }
                    Some((t, k)) => Some((t, k, st.held.get(&t).cloned())),
                }
            };
            let Some((t, k, h)) = blocker else { break };
            let Some(h) = h else { continue };
            tracing::debug!(txn = ?txn[..4], holder = ?t[..4], phase = ?h.phase, "KV lock conflict");
            let decided = self.kv.decided(&t).is_some();
            let abandoned = h.phase == Phase::Prepared && self.hlc.peek().physical_ms().saturating_sub(h.proposal.physical_ms()) > ABANDON_MS;
            if decided || abandoned {
                self.kv_settle(ctx, t, &h, deadline, &mut rx).await.map_err(|_| ()).ok();
                continue;
            }
            // Wait-die: an older transaction waits for a younger one; a younger one aborts. A
            // one-round commit holds no lock anywhere while it waits, so it cannot be part of
            // a deadlock: it always waits.
            let may_wait = coord.is_none() || (rts, txn) < (h.rts, t);
            if !may_wait || Instant::now() >= deadline {
                return Ok(conflict(Some(&k), if may_wait { "key stayed locked by another transaction past the wait deadline" } else { "key locked by an older transaction" }));
            }
            if h.phase == Phase::Prepared {
                // It may be decided already: settle it rather than wait for its resolve.
                self.kv_settle(ctx, t, &h, deadline, &mut rx).await.map_err(|_| ()).ok();
            } else {
                let _ = tokio::time::timeout(WAIT_SLICE, rx.changed()).await;
            }
        }
        // Locks held: check what was read.
        let verdict = if reads.is_empty() && checks.is_empty() {
            Ok(None)
        } else {
            let (v, cont, oid, dkey, reads, checks) = (ctx.vos.clone(), ctx.cont, ctx.oid, ctx.dkey.clone(), reads.clone(), checks.clone());
            on_blocking_pool(move || validate(&v, cont, oid, &dkey, rts, &reads, &checks)).await
        };
        let refusal = match verdict {
            Ok(r) => r,
            Err(e) => {
                ctx.shard.st().release(&txn);
                ctx.shard.bump();
                return Err(e);
            }
        };
        if let Some(r) = refusal {
            ctx.shard.st().release(&txn);
            ctx.shard.bump();
            return Ok(KvResp::Refused(r));
        }
        let h = {
            let mut st = ctx.shard.st();
            let p = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
            let h = st.held.get_mut(&txn).ok_or_else(|| rerr(ErrorCode::Internal, "transaction lost its locks while committing"))?;
            h.proposal = p;
            h.phase = if coord.is_some() { Phase::Writing } else { Phase::Fast };
            h.clone()
        };
        self.kv_rewrite(ctx, txn, h).await
    }

    /// Write a locked transaction's versions (one round, at its proposal) or its intent
    /// record to every replica, then finish: release (one round) or mark prepared. A failure
    /// keeps the locks, marked failed, for a retry or a roll-forward.
    async fn kv_rewrite(&self, ctx: &Ctx, txn: TxnId, h: Held) -> Result<KvResp, RemoteError> {
        let fast = h.phase == Phase::Fast;
        let written = if fast {
            let mut ops = Vec::with_capacity(h.writes.len());
            let mut payload = Vec::new();
            for (k, v) in &h.writes {
                let b = encode_version(v.as_deref());
                ops.push(WireOp::Single { akey: akey(KIND_DATA, k), len: b.len() as u32 });
                payload.extend_from_slice(&b);
            }
            self.kv_write(ctx, h.proposal, ops, Bytes::from(payload)).await
        } else {
            let rec = IntentRecord { format: KV_FORMAT, coord: h.coord.clone(), rts: h.rts, proposal: h.proposal, reads: h.reads.clone(), writes: h.writes.clone() };
            let b = postcard::to_allocvec(&rec).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
            let op = WireOp::Single { akey: akey(KIND_INTENT, &txn), len: b.len() as u32 };
            // At the proposal, so that a punch at the commit epoch hides it.
            self.kv_write(ctx, h.proposal, vec![op], Bytes::from(b)).await
        };
        let mut st = ctx.shard.st();
        let Some(cur) = st.held.get_mut(&txn) else {
            // Resolved meanwhile (an abort by the client, a roll-forward by a reader).
            drop(st);
            return match self.kv.decided(&txn) {
                Some(Decision::Committed(c)) if fast => Ok(KvResp::Committed { epoch: c }),
                _ => Ok(conflict(None, "the transaction was resolved while it was being written")),
            };
        };
        match written {
            Ok(()) if fast => {
                for (k, v) in &h.writes {
                    st.values.set(&ctx.shard.cached_total, k, h.proposal, v.clone());
                }
                st.release(&txn);
                drop(st);
                if lose_commit_answer() {
                    // As a newly elected leader would: no memory of the transaction.
                    ctx.shard.bump();
                    return Err(rerr(ErrorCode::Unavailable, "test knob STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY: this commit was written and its answer dropped"));
                }
                self.kv.remember(txn, Decision::Committed(h.proposal));
                ctx.shard.bump();
                Ok(KvResp::Committed { epoch: h.proposal })
            }
            Ok(()) => {
                cur.phase = Phase::Prepared;
                cur.durable = true;
                cur.failed = false;
                drop(st);
                ctx.shard.bump();
                Ok(KvResp::Prepared { proposal: h.proposal })
            }
            Err(e) => {
                // Some replicas may hold it: never undo, only redo (same epoch, same bytes).
                if !fast {
                    cur.phase = Phase::Prepared;
                }
                cur.failed = true;
                drop(st);
                ctx.shard.bump();
                Err(e)
            }
        }
    }
}

/// Test builds only: with `STRATA_KV_UNSAFE_SKIP_READ_CHECKS` set in an engine's environment,
/// commits ignore read sets (no read locks, no validation), which allows lost updates and
/// write skew: the fault tests use it to prove the history checker catches broken isolation.
fn skip_read_checks() -> bool {
    cfg!(debug_assertions) && std::env::var_os("STRATA_KV_UNSAFE_SKIP_READ_CHECKS").is_some()
}

/// Test builds only: with `STRATA_KV_TEST_LEADER_WRITE_DELAY_MS` set in an engine's
/// environment, a shard leader writes its own replica of every KV write that long after the
/// other replicas (a slow local disk, stretched): the fault tests use it to widen the window in
/// which a write admitted under one pool map is still landing when a newer map's data
/// movement reads the leader's store.
fn leader_write_delay() -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let ms: u64 = std::env::var("STRATA_KV_TEST_LEADER_WRITE_DELAY_MS").ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// Test builds only: with `STRATA_KV_TEST_RESOLVE_JITTER_MS` set to N in an engine's
/// environment, each resolution finishes a random 0..N ms after its write: of two resolvers
/// of one transaction running at once, the last then often finishes after the next commit of
/// the same keys (the race the value cache must survive).
fn resolve_jitter() -> Option<Duration> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let n: u64 = std::env::var("STRATA_KV_TEST_RESOLVE_JITTER_MS").ok()?.parse().ok()?;
    let ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    Some(Duration::from_millis(u64::from(ns) % n.max(1)))
}

/// Test builds only: with `STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY` set to N in an engine's
/// environment, every Nth one-round commit is written, then forgotten and answered with an
/// error, as when a leader dies after writing it and its successor never heard of it: the
/// client's retry then meets the commit's own writes.
fn lose_commit_answer() -> bool {
    static COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if !cfg!(debug_assertions) {
        return false;
    }
    let Some(n) = std::env::var("STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY").ok().and_then(|v| v.parse::<u64>().ok()) else { return false };
    (COMMITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1).is_multiple_of(n.max(1))
}

/// The newest version's epoch of a user key (deletes included), if any.
fn newest(v: &Vos, cont: ContId, oid: Oid, dkey: &[u8], key: &[u8]) -> Result<Option<(Epoch, Option<Vec<u8>>)>, VosError> {
    match v.fetch_single(cont, oid, dkey, &akey(KIND_DATA, key), Epoch::MAX)? {
        Some((e, b)) => Ok(Some((e, decode_version(&b).map_err(|e| VosError::Corrupt { location: "KV version record".into(), defect: e.message })?))),
        None => Ok(None),
    }
}

/// Nothing committed after `rts` on what was read, and every compare-and-set matches.
fn validate(v: &Vos, cont: ContId, oid: Oid, dkey: &[u8], rts: Epoch, reads: &ReadSet, checks: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<Option<KvRefusal>, VosError> {
    for (k, want) in checks {
        let cur = newest(v, cont, oid, dkey, k)?.and_then(|(_, v)| v);
        if cur != *want {
            return Ok(Some(KvRefusal::CasFailed { key: k.clone(), current: cur }));
        }
    }
    for k in &reads.keys {
        if checks.iter().any(|(c, _)| c == k) {
            continue;
        }
        if let Some((e, _)) = newest(v, cont, oid, dkey, k)? {
            if e > rts {
                return Ok(Some(KvRefusal::Conflict { key: Some(k.clone()), reason: "written by another transaction after this one read it".into() }));
            }
        }
    }
    for r in &reads.ranges {
        let mut cursor = range_cursor(r);
        if let Some(k) = &cursor.1 {
            if let Some((e, _)) = newest(v, cont, oid, dkey, k)? {
                if e > rts {
                    return Ok(Some(KvRefusal::Conflict { key: Some(k.clone()), reason: "a key in a scanned range changed after the scan".into() }));
                }
            }
        }
        for _ in 0..RANGE_PAGES_MAX {
            let page = v.list_akeys(cont, oid, dkey, Epoch::MAX, Some(&cursor.0), 1000)?;
            for a in &page.items {
                let Some(k) = a.strip_prefix(&[KIND_DATA]) else { return Ok(None) };
                if !r.contains(k) {
                    break;
                }
                if let Some((e, _)) = newest(v, cont, oid, dkey, k)? {
                    if e > rts {
                        return Ok(Some(KvRefusal::Conflict { key: Some(k.to_vec()), reason: "a key in a scanned range changed after the scan".into() }));
                    }
                }
            }
            let past_end = page.items.last().and_then(|a| a.strip_prefix(&[KIND_DATA])).is_some_and(|k| !r.contains(k));
            match page.next {
                Some(n) if !past_end => cursor.0 = n,
                _ => break,
            }
        }
    }
    Ok(None)
}

/// Where to list a range from: the akey cursor to list after, and the start key itself when
/// it must be checked on its own (listing is exclusive of the cursor).
fn range_cursor(r: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    if r.start.is_empty() {
        // Every data akey is above the one-byte `KIND_DATA` prefix alone.
        (vec![KIND_DATA], None)
    } else {
        (akey(KIND_DATA, &r.start), Some(r.start.clone()))
    }
}

/// Live keys of `range` at `at`, in order, at most `limit`; and whether more remain.
fn scan_vos(v: &Vos, cont: ContId, oid: Oid, dkey: &[u8], range: &KeyRange, limit: usize, at: Epoch) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, bool), VosError> {
    let mut out = Vec::new();
    let (mut cursor, first) = range_cursor(range);
    if let Some(k) = first {
        if range.contains(&k) {
            if let Some((_, b)) = v.fetch_single(cont, oid, dkey, &akey(KIND_DATA, &k), at)? {
                if let Some(val) = decode_version(&b).map_err(|e| VosError::Corrupt { location: "KV version record".into(), defect: e.message })? {
                    out.push((k, val));
                }
            }
        }
    }
    for _ in 0..RANGE_PAGES_MAX {
        if out.len() >= limit {
            return Ok((out, true));
        }
        let page = v.list_akeys(cont, oid, dkey, at, Some(&cursor), (limit - out.len()).clamp(16, 1000))?;
        for a in &page.items {
            let Some(k) = a.strip_prefix(&[KIND_DATA]) else { return Ok((out, false)) };
            if !range.contains(k) {
                return Ok((out, false));
            }
            if let Some((_, b)) = v.fetch_single(cont, oid, dkey, a, at)? {
                if let Some(val) = decode_version(&b).map_err(|e| VosError::Corrupt { location: "KV version record".into(), defect: e.message })? {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push((k.to_vec(), val));
                }
            }
        }
        match page.next {
            Some(n) => cursor = n,
            None => return Ok((out, false)),
        }
    }
    Ok((out, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(reads: &[&[u8]], ranges: &[(&[u8], Option<&[u8]>)], writes: &[&[u8]]) -> Held {
        Held {
            coord: vec![],
            rts: Epoch(1),
            proposal: Epoch(2),
            phase: Phase::Prepared,
            durable: true,
            failed: false,
            reads: ReadSet { keys: reads.iter().map(|k| k.to_vec()).collect(), ranges: ranges.iter().map(|(s, e)| KeyRange { start: s.to_vec(), end: e.map(<[u8]>::to_vec) }).collect() },
            writes: writes.iter().map(|k| (k.to_vec(), Some(b"v".to_vec()))).collect(),
        }
    }

    fn rs(keys: &[&[u8]], ranges: &[(&[u8], Option<&[u8]>)]) -> ReadSet {
        held(keys, ranges, &[]).reads
    }

    #[test]
    fn locks_conflict_as_two_phase_locking_says() {
        let (t1, t2) = ([1u8; 16], [2u8; 16]);
        let mut st = ShardSt::default();
        st.acquire(t1, held(&[b"r"], &[(b"m", Some(b"p"))], &[b"w"]));
        // Reads share; a read of a written key, a write of a read key, a write into a read range conflict.
        assert!(st.conflict(&t2, &rs(&[b"r"], &[]), &[]).is_none());
        assert_eq!(st.conflict(&t2, &rs(&[b"w"], &[]), &[]).map(|c| c.1), Some(b"w".to_vec()));
        assert_eq!(st.conflict(&t2, &rs(&[], &[]), &[b"r"]).map(|c| c.1), Some(b"r".to_vec()));
        assert_eq!(st.conflict(&t2, &rs(&[], &[]), &[b"n"]).map(|c| c.1), Some(b"n".to_vec()));
        assert!(st.conflict(&t2, &rs(&[], &[]), &[b"p"]).is_none(), "range ends are exclusive");
        assert_eq!(st.conflict(&t2, &rs(&[], &[(b"a", None)]), &[]).map(|c| c.0), Some(t1), "a scan over a written key");
        // Its own locks never conflict; released locks are gone.
        assert!(st.conflict(&t1, &rs(&[b"w"], &[(b"a", None)]), &[b"r", b"n"]).is_none());
        assert!(st.release(&t1).is_some());
        assert!(st.conflict(&t2, &rs(&[b"w"], &[(b"a", None)]), &[b"r", b"n"]).is_none());
        assert!(st.write_locks.is_empty() && st.read_locks.is_empty() && st.ranged.is_empty() && st.held.is_empty());
    }

    #[test]
    fn versions_encode_deletes_and_refuse_garbage() {
        assert_eq!(decode_version(&encode_version(Some(b"x"))).unwrap(), Some(b"x".to_vec()));
        assert_eq!(decode_version(&encode_version(Some(b""))).unwrap(), Some(vec![]));
        assert_eq!(decode_version(&encode_version(None)).unwrap(), None);
        assert!(decode_version(&[]).is_err() && decode_version(&[7, 1]).is_err() && decode_version(&[0, 0]).is_err());
    }
}
