use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use strata_placement::{PlacementMap, PoolMap};
use strata_rpc::engine_msg::*;
use strata_rpc::mgmt_client::MgmtClient;
use strata_rpc::mgmt_msg::{MgmtQuery, MgmtReply};
use strata_rpc::{ClientConfig, ErrorCode, Handler, RemoteError, RequestCtx, RpcPool, ServiceKind};
use strata_types::{Epoch, Hlc, PoolId, Rank, Redundancy, SystemClock, TargetId};
use crate::ec_rebuild;
use strata_vos::{Update, UpdateOp, Vos, VosConfig, VosError};

#[path = "txn.rs"]
mod txn;
#[path = "capability_check.rs"]
mod capability_check;
#[path = "aggregation.rs"]
pub(crate) mod aggregation;
#[path = "movement_progress.rs"]
mod movement_progress;
#[path = "space_guard.rs"]
mod space_guard;
#[path = "import_batch.rs"]
mod import_batch;
#[path = "background_threads.rs"]
mod background_threads;
#[path = "move_pacing.rs"]
mod move_pacing;
#[path = "ec_cells.rs"]
mod ec_cells;
#[path = "reclaim.rs"]
mod reclaim;
#[path = "request_metrics.rs"]
mod request_metrics;

const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// An import may wait at its destination for the rate it is paced to there (`move_pacing`):
/// a few messages from each source at the floor rate take seconds.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct EngineConfig {
    pub dir: PathBuf,
    pub rank: Rank,
    pub targets: u16,
    pub cluster: String,
    pub vos: VosConfig,
    /// Least bytes per second of rebuild, resync, drain and extension this rank imports while
    /// foreground updates are being written on it: faster while they stay fast, down to this
    /// when imports slow them (0: never paced); unpaced while none are (see `move_pacing`).
    pub rebuild_bytes_per_s: u64,
    pub aggregation: aggregation::AggregationConfig,
    /// New data is refused (`NoSpace`) while the file system under `dir` has less free (0: no
    /// reserve); see `space_guard`.
    pub space_reserve_bytes: u64,
}

struct PoolView {
    map_pool_id: PoolId,
    map: PoolMap,
    placement: Arc<PlacementMap>,
    /// Placement once the map's `NEW` targets join (while the pool is being extended): writes
    /// go to both places and rebalancing moves the rest.
    extended: Option<Arc<PlacementMap>>,
    /// Placement of the map as it stood when data movement last finished (`PoolMap::settled`),
    /// while movement is pending: which spares rebuild has filled.
    settled: Option<Arc<PlacementMap>>,
    addrs: BTreeMap<Rank, String>,
}

impl PoolView {
    /// Per shard of group `g` of `layout`, the target holding its full data, if any (see
    /// `strata_placement::read_source`).
    fn read_sources(&self, oid: strata_types::Oid, layout: &strata_placement::Layout, g: usize) -> Vec<Option<TargetId>> {
        let settled = self.settled.as_ref().and_then(|p| p.layout(oid).ok());
        let sg = settled.as_ref().filter(|l| l.group_count() == layout.group_count()).map(|l| l.group(g));
        let replicated = matches!(layout.class.redundancy(), Redundancy::Replicas(_));
        layout.group(g).iter().enumerate().map(|(i, s)| strata_placement::read_source(&self.map, sg, i, s, replicated)).collect()
    }
}

/// Serializes read-modify-write of one EC stripe: (oid, dkey, akey, stripe).
type StripeKey = (strata_types::Oid, Vec<u8>, Vec<u8>, u64);

/// Updates in flight per (pool, map version they were admitted under).
type Inflight = std::sync::Mutex<HashMap<(PoolId, u64), usize>>;

/// Counts an admitted update until it has written everything (see `Engine::admit`).
struct Admitted<'a> {
    inflight: &'a Inflight,
    done: &'a tokio::sync::Notify,
    key: (PoolId, u64),
    /// Told how long each update took (`move_pacing`).
    pacer: &'a move_pacing::MovePacer,
    started: tokio::time::Instant,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
        drop(m);
        self.pacer.foreground_done(self.started.elapsed());
        self.done.notify_waiters();
    }
}

/// Longest a data-movement pass waits for updates admitted under an older map to finish (they
/// time out on their own after `FORWARD_TIMEOUT`).
const OLDER_UPDATES_WAIT: Duration = Duration::from_secs(30);

pub struct Engine {
    /// Requests served, by kind (`metrics_text`).
    requests: request_metrics::RequestMetrics,
    started: std::time::Instant,
    /// Paces imports by what they do to foreground updates here.
    pacer: move_pacing::MovePacer,
    /// Buffers of the import messages data movement builds (`import_batch`).
    page_buffers: Arc<strata_rpc::buffer_pool::BufferPool>,
    /// Where data movement's disk and copy work runs, below foreground priority.
    background: background_threads::BackgroundThreads,
    inflight: Inflight,
    inflight_done: tokio::sync::Notify,
    /// Signalled when a newer pool map is installed (`map_changed`).
    map_changed: tokio::sync::Notify,
    moved_records: std::sync::atomic::AtomicU64,
    moved_bytes: std::sync::atomic::AtomicU64,
    extension_write_bytes: std::sync::atomic::AtomicU64,
    /// The current data-movement pass's start (this rank's clock once every update admitted
    /// under an older map was applied): records newer than it were written under the pass's
    /// map, so to its destinations already, and are not pushed again.
    pass_since: std::sync::Mutex<Epoch>,
    /// Passes of the background scrub and their findings, for `EngineReq::Stats`.
    scrubbed: std::sync::Mutex<(u64, ScrubCounters)>,
    /// Per pool, the map version this rank last finished rebuilding for.
    rebuilt: std::sync::Mutex<HashMap<PoolId, u64>>,
    stripe_locks: std::sync::Mutex<HashMap<StripeKey, Arc<tokio::sync::Mutex<()>>>>,
    rank: Rank,
    targets: Vec<Arc<Vos>>,
    pools: RwLock<HashMap<PoolId, Arc<PoolView>>>,
    mgmt: MgmtClient,
    peers: RpcPool,
    hlc: Hlc,
    /// Transactional KV state of the shards this rank leads (`txn.rs`).
    kv: txn::KvState,
    aggregation: aggregation::AggregationConfig,
    agg_counters: aggregation::AggregationCounters,
    /// Progress of this rank's rebuild passes, per pool.
    movement: movement_progress::MovementTracker,
    space: space_guard::SpaceGuard,
    /// Keeps requests under newer maps and reclaim's deletes apart (`reclaim.rs`).
    reclaim_gate: reclaim::ReclaimGate,
    reclaim: reclaim::ReclaimCounters,
    /// Targets of this rank seen draining: reclaim empties them once `DOWNOUT`, no others.
    drained: reclaim::DrainedTargets,
    /// Containers destroyed, as of the last aggregation pass: updates to them are refused (a
    /// client that still had one open would otherwise have writes acknowledged that the next
    /// pass deletes).
    destroyed: RwLock<std::collections::HashSet<strata_types::ContId>>,
}

/// A failed push to `t`, as `Unavailable` (the pass tries again later), except a destination
/// out of space, which stays `NoSpace`: that needs a person, and says what to do.
fn push_err(t: TargetId, e: strata_rpc::RpcError) -> RemoteError {
    match e {
        strata_rpc::RpcError::Remote(r) if r.code == ErrorCode::NoSpace => rerr(r.code, format!("rebuild push to {t}: {}", r.message)),
        e => rerr(ErrorCode::Unavailable, format!("rebuild push to {t}: {e}")),
    }
}

fn rerr(code: ErrorCode, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(code, msg)
}

/// Run VOS work on the blocking pool (it may wait for the disk); its error as a remote one.
async fn on_blocking_pool<T: Send + 'static>(f: impl FnOnce() -> Result<T, VosError> + Send + 'static) -> Result<T, RemoteError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?.map_err(vos_err)
}

impl Engine {
    /// VOS work of data movement (export pages, imports) on the movement threads, which run
    /// below foreground priority (`background_threads`); its error as a remote one.
    async fn on_movement_threads<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T, VosError> + Send + 'static) -> Result<T, RemoteError> {
        self.background.run(f).await.ok_or_else(|| rerr(ErrorCode::Internal, "data-movement thread gone"))?.map_err(vos_err)
    }
}

/// One fetch from a target of this engine, as `EngineReq::Fetch` answers it.
fn fetch_local(vos: &Vos, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], fetch: FetchKind, epoch: Epoch) -> Result<(EngineResp, Bytes), VosError> {
    Ok(match fetch {
        FetchKind::Single { akey } => match vos.fetch_single(cont, oid, dkey, &akey, epoch)? {
            Some((e, v)) => (EngineResp::Fetched { found: Some(e), written: vec![(0, v.len() as u64)] }, Bytes::from(v)),
            None => (EngineResp::Fetched { found: None, written: vec![] }, Bytes::new()),
        },
        FetchKind::Extent { akey, offset, len } => {
            let r = vos.fetch_extent(cont, oid, dkey, &akey, offset, len, epoch)?;
            (EngineResp::Fetched { found: None, written: r.written }, Bytes::from(r.data))
        }
    })
}

fn vos_err(e: VosError) -> RemoteError {
    let code = match &e {
        VosError::Corrupt { .. } => ErrorCode::Corrupt,
        VosError::TooLarge { .. } | VosError::Empty { .. } | VosError::ExtentOutOfRange { .. } | VosError::BatchTooLarge { .. } | VosError::Aggregated { .. } => ErrorCode::InvalidArgument,
        VosError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => ErrorCode::NoSpace,
        _ => ErrorCode::Internal,
    };
    rerr(code, e.to_string())
}

impl Engine {
    pub fn open(cfg: &EngineConfig, mgmt: MgmtClient) -> Result<Engine, String> {
        let mut targets = Vec::new();
        for i in 0..cfg.targets {
            let dir = cfg.dir.join(format!("target-{i}"));
            targets.push(Arc::new(Vos::open(&dir, &cfg.vos).map_err(|e| e.to_string())?));
        }
        let hlc = Hlc::open(&cfg.dir.join("hlc"), Box::new(SystemClock), strata_types::HLC_MAX_DRIFT_MS_DEFAULT).map_err(|e| e.to_string())?;
        Ok(Engine { requests: Default::default(), started: std::time::Instant::now(), pacer: move_pacing::MovePacer::new(cfg.rebuild_bytes_per_s), background: background_threads::BackgroundThreads::start(), page_buffers: Arc::new(strata_rpc::buffer_pool::BufferPool::new(import_batch::BUFFERS_KEPT_BYTES)), inflight: Default::default(), inflight_done: tokio::sync::Notify::new(), map_changed: tokio::sync::Notify::new(), moved_records: Default::default(), moved_bytes: Default::default(), extension_write_bytes: Default::default(), pass_since: std::sync::Mutex::new(Epoch::ZERO), scrubbed: Default::default(), rebuilt: std::sync::Mutex::new(HashMap::new()), stripe_locks: std::sync::Mutex::new(HashMap::new()), rank: cfg.rank, targets, pools: RwLock::new(HashMap::new()), mgmt, peers: RpcPool::new(ServiceKind::Engine, Some(cfg.cluster.clone()), ClientConfig::default()), hlc, kv: Default::default(), aggregation: cfg.aggregation.clone(), agg_counters: Default::default(), movement: Default::default(), space: space_guard::SpaceGuard::new(cfg.dir.clone(), cfg.space_reserve_bytes), reclaim_gate: Default::default(), reclaim: Default::default(), drained: Default::default(), destroyed: Default::default() })
    }

    pub fn targets(&self) -> &[Arc<Vos>] {
        &self.targets
    }

    pub fn aggregation_config(&self) -> &aggregation::AggregationConfig {
        &self.aggregation
    }

    pub fn stats(&self) -> EngineStats {
        let used_bytes = self.targets.iter().filter_map(|t| t.space().ok()).map(|s| s.used_bytes).sum();
        let (scrub_passes, scrub) = self.scrubbed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let moved_records = self.moved_records.load(std::sync::atomic::Ordering::Relaxed);
        let moved_bytes = self.moved_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let extension_write_bytes = self.extension_write_bytes.load(std::sync::atomic::Ordering::Relaxed);
        EngineStats { targets: self.targets.len() as u16, used_bytes, aggregation: self.agg_counters.snapshot(), moved_records, moved_bytes, extension_write_bytes, scrub_passes, scrub, movement: self.movement.report(), reclaim: self.reclaim.report() }
    }

    /// This rank's counters and request figures in the Prometheus text format
    /// (`strata server --metrics-addr`).
    pub fn metrics_text(&self) -> String {
        let (free, total) = self.space();
        request_metrics::render(self.rank.0, &self.requests, &self.stats(), free, total, self.started.elapsed())
    }

    /// Free and total bytes of the file system holding the first target.
    pub fn space(&self) -> (u64, u64) {
        self.targets.first().and_then(|t| t.space().ok()).map_or((0, 0), |s| (s.fs_free_bytes, s.fs_total_bytes))
    }

    async fn refresh(&self, pool: PoolId) -> Result<Arc<PoolView>, RemoteError> {
        let info = match self.mgmt.query(MgmtQuery::Pool { pool: pool.to_string() }).await {
            Ok(MgmtReply::Pool(p)) => p,
            Ok(_) => return Err(rerr(ErrorCode::Internal, "unexpected management reply")),
            Err(strata_rpc::RpcError::Remote(e)) => return Err(e),
            Err(e) => return Err(rerr(ErrorCode::Unavailable, format!("cannot reach the management service: {e}"))),
        };
        let extended = info.map.targets.iter().any(|t| t.state == strata_placement::TargetState::New).then(|| Arc::new(PlacementMap::new(&info.map, true)));
        let settled = info.map.settled().map(|m| Arc::new(PlacementMap::new(&m, false)));
        let view = Arc::new(PoolView { map_pool_id: info.id, placement: Arc::new(PlacementMap::new(&info.map, false)), extended, settled, map: info.map, addrs: info.rank_addrs });
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        let keep = match pools.get(&pool) {
            Some(old) if old.map.version > view.map.version => old.clone(),
            _ => view,
        };
        let newer = pools.get(&pool).is_none_or(|old| old.map.version < keep.map.version);
        pools.insert(pool, keep.clone());
        drop(pools);
        if newer {
            self.drained.note(pool, &keep.map, self.rank);
            self.map_changed.notify_one();
        }
        Ok(keep)
    }

    /// Returns once a newer pool map has been installed since the last call (or at once if one
    /// was): data movement starts without waiting for its next tick.
    pub async fn map_changed(&self) {
        self.map_changed.notified().await
    }

    /// Refresh pools whose version moved on (from the management heartbeat answer).
    pub async fn note_pool_versions(&self, versions: &BTreeMap<PoolId, u64>) {
        for (pool, v) in versions {
            let cur = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(pool).map(|p| p.map.version);
            // Unknown pools too: this rank may hold their data (and must rebuild it).
            if cur.is_none_or(|c| c < *v) {
                if let Err(e) = self.refresh(*pool).await {
                    tracing::warn!(%pool, error = %e, "could not refresh pool map");
                }
            }
        }
    }

    async fn view(&self, pool: PoolId, version: u64) -> Result<Arc<PoolView>, RemoteError> {
        let cur = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&pool).cloned();
        let v = match cur {
            Some(v) if v.map.version >= version => v,
            _ => self.refresh(pool).await?,
        };
        if v.map.version > version {
            return Err(rerr(ErrorCode::StaleMap, format!("pool map version {version} is stale; current is {}", v.map.version)));
        }
        if v.map.version < version {
            return Err(rerr(ErrorCode::Unavailable, format!("the management service has not yet shown this engine pool map version {version}")));
        }
        Ok(v)
    }

    /// New bytes that a request would store, checked against the disk-space reserve. Requests
    /// without payload (punches) always pass: they are how space is freed.
    fn admit_bytes(&self, payload: &Bytes) -> Result<(), RemoteError> {
        if payload.is_empty() {
            return Ok(());
        }
        self.space.admit(payload.len() as u64)
    }

    /// `view`, for an update: counted as in flight under its map version until the guard drops,
    /// so a data-movement pass can wait for every update admitted under an older map before it
    /// reads what it moves (`wait_older_updates`); one admitted after sees the newer map.
    async fn admit(&self, pool: PoolId, version: u64) -> Result<(Arc<PoolView>, Admitted<'_>), RemoteError> {
        let view = self.view(pool, version).await?;
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()).entry((pool, version)).or_default() += 1;
        let guard = Admitted { inflight: &self.inflight, done: &self.inflight_done, key: (pool, version), pacer: &self.pacer, started: tokio::time::Instant::now() };
        // A newer map installed between the check and the count: the pass may not have seen
        // this update, so it must not run.
        let now = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&pool).map(|v| v.map.version);
        if now != Some(version) {
            return Err(rerr(ErrorCode::StaleMap, format!("pool map version {version} is stale; current is {}", now.unwrap_or(0))));
        }
        Ok((view, guard))
    }

    /// Wait for this rank's turn to import `bytes` of moved data (`move_pacing`); the import
    /// counts as under way until the returned guard drops.
    async fn pace_import(&self, bytes: u64) -> move_pacing::Importing<'_> {
        let in_flight = !self.inflight.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        self.pacer.take(bytes, in_flight).await
    }

    /// Wait until no update admitted under a map older than `version` is still writing.
    async fn wait_older_updates(&self, pool: PoolId, version: u64) -> Result<(), RemoteError> {
        let deadline = tokio::time::Instant::now() + OLDER_UPDATES_WAIT;
        loop {
            let done = self.inflight_done.notified();
            let busy = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|((p, v), n)| *p == pool && *v < version && *n > 0);
            if !busy {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(rerr(ErrorCode::Unavailable, format!("updates admitted under maps older than version {version} are still writing")));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), done).await;
        }
    }

    /// Where shard `t` of the group of `dkey` goes once the pool's `NEW` targets join, if that
    /// place does not have the shard's data already: writes go there too while the pool is
    /// extended, so rebalancing never chases them. A replica goes to targets not in the group
    /// now; an EC shard to any other target, since a target of the group that takes another
    /// shard index keeps that index's cells in their own offset range (`ec_rebuild::cell_offset`).
    fn extension_of(view: &PoolView, oid: strata_types::Oid, dkey: &[u8], t: TargetId) -> Option<TargetId> {
        let ext = view.extended.as_ref()?;
        let cur = view.placement.layout(oid).ok()?;
        let group = cur.group(cur.group_for_dkey(dkey));
        let i = group.iter().position(|s| s.target == t)?;
        let new = ext.layout(oid).ok()?;
        let to = new.group(new.group_for_dkey(dkey)).get(i)?.target;
        if matches!(cur.class.redundancy(), Redundancy::Erasure { .. }) {
            return (to != t).then_some(to);
        }
        (!group.iter().any(|s| s.target == to)).then_some(to)
    }

    fn target(&self, t: TargetId) -> Result<&Arc<Vos>, RemoteError> {
        if t.rank != self.rank {
            return Err(rerr(ErrorCode::StaleMap, format!("target {t} is not on rank {}; refresh the pool map", self.rank)));
        }
        self.targets.get(t.index as usize).ok_or_else(|| rerr(ErrorCode::NotFound, format!("rank {} has no target {}", self.rank, t.index)))
    }

    fn to_updates(cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], epoch: Epoch, ops: &[WireOp], payload: &Bytes) -> Result<Vec<Update>, RemoteError> {
        let mut at = 0usize;
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            let n = op.payload_len();
            if at + n > payload.len() {
                return Err(rerr(ErrorCode::InvalidArgument, "payload shorter than the ops declare"));
            }
            // A slice of the frame's payload: extent bytes are not copied on their way to VOS.
            let data = payload.slice(at..at + n);
            at += n;
            let op = match op.clone() {
                WireOp::Single { akey, .. } => UpdateOp::Single { akey, value: data.to_vec() },
                WireOp::Extent { akey, offset, .. } => UpdateOp::Extent { akey, offset, data },
                WireOp::PunchExtent { akey, offset, len } => UpdateOp::PunchExtent { akey, offset, len },
                WireOp::PunchAkey { akey } => UpdateOp::PunchAkey { akey },
                WireOp::PunchDkey => UpdateOp::PunchDkey,
                WireOp::PunchObject => UpdateOp::PunchObject,
            };
            out.push(Update { cont, oid, dkey: dkey.to_vec(), epoch, op });
        }
        if at != payload.len() {
            return Err(rerr(ErrorCode::InvalidArgument, "payload longer than the ops declare"));
        }
        Ok(out)
    }

    async fn apply(&self, vos: Arc<Vos>, updates: Vec<Update>) -> Result<(), RemoteError> {
        // A large extent is written to its extent file synchronously inside the first poll
        // (`update_async`). Callers join the local apply with the sends to other replicas in
        // one task, so yield once first: the sends go out, then the local write runs while the
        // replicas receive (it used to delay every replica's start by the local disk write).
        if updates.iter().any(|u| matches!(&u.op, UpdateOp::Extent { data, .. } if data.len() >= LOCAL_WRITE_YIELD_BYTES)) {
            tokio::task::yield_now().await;
        }
        vos.update_async(&updates).await.map_err(vos_err)
    }

    #[allow(clippy::too_many_arguments)]
    async fn update(&self, pool: PoolId, version: u64, cont: strata_types::ContId, oid: strata_types::Oid, dkey: Vec<u8>, epoch: Option<Epoch>, ops: Vec<WireOp>, payload: Bytes) -> Result<EngineResp, RemoteError> {
        let (view, _admitted) = self.admit(pool, version).await?;
        if self.destroyed.read().unwrap_or_else(|e| e.into_inner()).contains(&cont) {
            return Err(rerr(ErrorCode::NotFound, format!("container {cont} was destroyed")));
        }
        let _writing = self.reclaim_gate.enter(pool, version).await;
        let layout = view.placement.layout(oid).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
        let g = layout.group_for_dkey(&dkey);
        let group = layout.group(g).to_vec();
        if let Redundancy::Erasure { data, parity } = layout.class.redundancy() {
            let sources = view.read_sources(oid, &layout, g);
            return self.ec_update(&view, cont, oid, dkey, epoch, ops, payload, &group, &sources, data as usize, parity as usize).await;
        }
        let leader = group[0].target;
        let vos = self.target(leader)?.clone();
        let epoch = match epoch {
            Some(e) => self.hlc.update(e).map(|_| e),
            None => self.hlc.now(),
        }
        .map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
        let updates = Self::to_updates(cont, oid, &dkey, epoch, &ops, &payload)?;
        let mut work = Vec::new();
        let extension: Vec<TargetId> = group.iter().filter_map(|s| Self::extension_of(&view, oid, &dkey, s.target)).collect();
        for t in group[1..].iter().map(|s| s.target).chain(extension.iter().copied()) {
            let (ops, payload, dkey) = (ops.clone(), payload.clone(), dkey.clone());
            let view = view.clone();
            work.push(async move {
                if t.rank == self.rank {
                    let vos = self.target(t)?.clone();
                    let u = Self::to_updates(cont, oid, &dkey, epoch, &ops, &payload)?;
                    return self.apply(vos, u).await;
                }
                let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
                let req = EngineReq::Replicate { pool, map_version: view.map.version, target: t.index, cont, oid, dkey, epoch, ops };
                self.peers.call::<_, EngineResp>(addr, &req, payload, FORWARD_TIMEOUT).await.map(|_| ()).map_err(|e| rerr(ErrorCode::Unavailable, format!("replica {t} did not apply the update: {e}")))
            });
        }
        let extra = extension.len() as u64 * payload.len() as u64;
        let (local, remote) = tokio::join!(self.apply(vos, updates), futures::future::join_all(work));
        local?;
        for r in remote {
            r?;
        }
        self.extension_write_bytes.fetch_add(extra, std::sync::atomic::Ordering::Relaxed);
        Ok(EngineResp::Updated { epoch })
    }
}

impl Engine {
    /// Apply `ops` on one shard's target (local or remote) at `epoch`, and on its place in
    /// the extended layout while the pool is being extended.
    #[allow(clippy::too_many_arguments)]
    async fn send_to(&self, view: &PoolView, pool: PoolId, t: TargetId, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], epoch: Epoch, ops: Vec<WireOp>, payload: Bytes) -> Result<(), RemoteError> {
        match Self::extension_of(view, oid, dkey, t) {
            None => self.send_one(view, pool, t, cont, oid, dkey, epoch, ops, payload).await,
            Some(to) => {
                let n = payload.len() as u64;
                let (a, b) = tokio::join!(self.send_one(view, pool, t, cont, oid, dkey, epoch, ops.clone(), payload.clone()), self.send_one(view, pool, to, cont, oid, dkey, epoch, ops, payload));
                if b.is_ok() {
                    self.extension_write_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                a.and(b)
            }
        }
    }

    /// Apply `ops` on one target (local or remote) at `epoch`.
    #[allow(clippy::too_many_arguments)]
    async fn send_one(&self, view: &PoolView, pool: PoolId, t: TargetId, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], epoch: Epoch, ops: Vec<WireOp>, payload: Bytes) -> Result<(), RemoteError> {
        if t.rank == self.rank {
            let vos = self.target(t)?.clone();
            let u = Self::to_updates(cont, oid, dkey, epoch, &ops, &payload)?;
            return self.apply(vos, u).await;
        }
        let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
        let req = EngineReq::Replicate { pool, map_version: view.map.version, target: t.index, cont, oid, dkey: dkey.to_vec(), epoch, ops };
        self.peers.call::<_, EngineResp>(addr, &req, payload, FORWARD_TIMEOUT).await.map(|_| ()).map_err(|e| rerr(ErrorCode::Unavailable, format!("shard {t} did not apply the update: {e}")))
    }

    /// Read `len` bytes at shard-local `offset` of one target (local or remote), newest version.
    #[allow(clippy::too_many_arguments)]
    async fn read_cell(&self, view: &PoolView, pool: PoolId, t: TargetId, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], akey: &[u8], offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        if t.rank == self.rank {
            let vos = self.target(t)?.clone();
            let shard = Self::ec_shard_of(view, oid, dkey, t);
            let (dkey, fetch) = (dkey.to_vec(), FetchKind::Extent { akey: akey.to_vec(), offset, len });
            return on_blocking_pool(move || ec_cells::fetch_shard(&vos, cont, oid, &dkey, fetch, Epoch::MAX, shard)).await.map(|(_, data)| data.to_vec());
        }
        let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
        let req = EngineReq::Fetch { pool, map_version: view.map.version, target: t.index, cont, oid, dkey: dkey.to_vec(), fetch: FetchKind::Extent { akey: akey.to_vec(), offset, len }, epoch: Epoch::MAX };
        let (_, data) = self.peers.call::<_, EngineResp>(addr, &req, Bytes::new(), FORWARD_TIMEOUT).await.map_err(|e| rerr(ErrorCode::Unavailable, format!("shard {t}: {e}")))?;
        Ok(data.to_vec())
    }

    /// The current cells of stripe `s`, decoding from parity when data shards are missing;
    /// `sources` says where each shard's full data is (`PoolView::read_sources`): a spare not
    /// yet rebuilt would answer zeros for cells it never got.
    #[allow(clippy::too_many_arguments)]
    async fn read_stripe(&self, view: &PoolView, pool: PoolId, sources: &[Option<TargetId>], st: &strata_ec::EcStripe, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], akey: &[u8], s: u64) -> Result<Vec<Vec<u8>>, RemoteError> {
        let mut cells: Vec<Option<Vec<u8>>> = vec![None; st.k + st.p];
        let reads = sources.iter().enumerate().filter_map(|(i, t)| t.map(|t| (i, t))).map(|(i, t)| async move { (i, self.read_cell(view, pool, t, cont, oid, dkey, akey, s * st.cell_bytes, st.cell_bytes).await) });
        for (i, r) in futures::future::join_all(reads).await {
            if let Ok(c) = r {
                cells[i] = Some(c);
            }
        }
        st.reconstruct(&mut cells).map_err(|e| rerr(ErrorCode::Unavailable, e.to_string()))?;
        Ok(cells.into_iter().take(st.k).map(|c| c.unwrap_or_default()).collect())
    }

    /// EC update, run by the group's leader (the first parity shard): stripes are encoded
    /// whole; a partial stripe is read, merged and re-encoded under the stripe's lock, so
    /// concurrent writes to different bytes of one stripe never lose each other.
    #[allow(clippy::too_many_arguments)]
    async fn ec_update(&self, view: &Arc<PoolView>, cont: strata_types::ContId, oid: strata_types::Oid, dkey: Vec<u8>, epoch: Option<Epoch>, ops: Vec<WireOp>, payload: Bytes, group: &[strata_placement::ShardLoc], sources: &[Option<TargetId>], k: usize, p: usize) -> Result<EngineResp, RemoteError> {
        let pool = view.map_pool_id;
        let leader = group[k].target;
        self.target(leader)?;
        let st = strata_ec::EcStripe::new(k, p, strata_ec::CELL_BYTES_DEFAULT).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
        // Without a caller-chosen epoch, each stripe takes its epoch under its lock: a stripe
        // written later must carry a newer epoch, or an older full-stripe version written
        // after it would hide it.
        let given = epoch;
        let next_epoch = || match given {
            Some(e) => self.hlc.update(e).map(|_| e).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string())),
            None => self.hlc.now().map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string())),
        };
        let mut epoch = next_epoch()?;
        let mut at = 0usize;
        for op in ops {
            let n = op.payload_len();
            let data = payload.get(at..at + n).ok_or_else(|| rerr(ErrorCode::InvalidArgument, "payload shorter than the ops declare"))?.to_vec();
            at += n;
            let (akey, offset, bytes): (Vec<u8>, u64, Vec<u8>) = match op {
                WireOp::Extent { akey, offset, .. } => (akey, offset, data),
                WireOp::PunchExtent { akey, offset, len } => {
                    if len > 64 << 20 {
                        return Err(rerr(ErrorCode::InvalidArgument, "EC extent punch over 64 MiB; punch the dkey instead"));
                    }
                    (akey, offset, vec![0; len as usize])
                }
                single_or_punch => {
                    // Single values and key/object punches go to the p + 1 shards that hold
                    // single values (data shard 0 and the parity shards), or to all for punches.
                    let all = !matches!(single_or_punch, WireOp::Single { .. });
                    let idx: Vec<usize> = if all { (0..k + p).collect() } else { std::iter::once(0).chain(k..k + p).collect() };
                    let sends = idx.into_iter().map(|i| self.send_to(view, pool, group[i].target, cont, oid, &dkey, epoch, vec![single_or_punch.clone()], Bytes::from(data.clone())));
                    for r in futures::future::join_all(sends).await {
                        r?;
                    }
                    continue;
                }
            };
            if st.stripes(offset, bytes.len() as u64).end * st.cell_bytes > ec_rebuild::SHARD_SPAN {
                return Err(rerr(ErrorCode::InvalidArgument, format!("EC arrays end at {} bytes ({} per shard)", ec_rebuild::SHARD_SPAN * k as u64, ec_rebuild::SHARD_SPAN)));
            }
            for s in st.stripes(offset, bytes.len() as u64) {
                let key: StripeKey = (oid, dkey.clone(), akey.clone(), s);
                let lock = self.stripe_locks.lock().unwrap_or_else(|e| e.into_inner()).entry(key.clone()).or_default().clone();
                let guard = lock.lock().await;
                epoch = next_epoch()?;
                let sb = st.stripe_bytes();
                let mut stripe = if st.covers_stripe(offset, bytes.len() as u64, s) { vec![0u8; sb as usize] } else { self.read_stripe(view, pool, sources, &st, cont, oid, &dkey, &akey, s).await?.concat() };
                let lo = offset.max(s * sb);
                let hi = (offset + bytes.len() as u64).min((s + 1) * sb);
                stripe[(lo - s * sb) as usize..(hi - s * sb) as usize].copy_from_slice(&bytes[(lo - offset) as usize..(hi - offset) as usize]);
                let cells: Vec<&[u8]> = stripe.chunks(st.cell_bytes as usize).collect();
                let parity = st.encode(&cells).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
                let all: Vec<Vec<u8>> = cells.iter().map(|c| c.to_vec()).chain(parity).collect();
                let sends = all.into_iter().enumerate().map(|(i, cell)| {
                    // Each shard's cells in its own offset range (`ec_rebuild::cell_offset`).
                    let op = WireOp::Extent { akey: akey.clone(), offset: ec_rebuild::cell_offset(i, s * st.cell_bytes), len: cell.len() as u32 };
                    self.send_to(view, pool, group[i].target, cont, oid, &dkey, epoch, vec![op], Bytes::from(cell))
                });
                let results = futures::future::join_all(sends).await;
                drop(guard);
                {
                    let mut locks = self.stripe_locks.lock().unwrap_or_else(|e| e.into_inner());
                    if locks.get(&key).is_some_and(|l| Arc::strong_count(l) <= 2) {
                        locks.remove(&key);
                    }
                }
                for r in results {
                    r?;
                }
            }
        }
        Ok(EngineResp::Updated { epoch })
    }
}

/// Most bytes one object-shard export answer carries (the RPC frame limit bounds it too).
const EXPORT_BYTES_MAX: usize = strata_rpc::frame::PAYLOAD_BYTES_MAX;

/// Most bytes of records one rebuild import message carries.
const IMPORT_BYTES_MAX: usize = 16 << 20;

/// Extents from this size on are written to disk inside `Vos::update_async`'s first poll (the
/// store's extent-file threshold): `Engine::apply` lets sibling sends go first.
const LOCAL_WRITE_YIELD_BYTES: usize = 64 << 10;

/// Bytes of one object shard that data movement holds at a time (per source shard): objects of
/// any size move page by page (plus at most one record, itself at most 4 MiB).
const EXPORT_PAGE_BYTES: usize = 16 << 20;
const _: () = assert!(EXPORT_PAGE_BYTES + (8 << 20) < EXPORT_BYTES_MAX, "a page and its last record fit one answer");

/// Room reserved in a page's buffer beyond `EXPORT_PAGE_BYTES` (the page stops after the
/// record that crosses it: one extent of at most 4 MiB, its key and framing), so that it is
/// written without a reallocation. Capacity never written is never touched.
const PAGE_SLACK_BYTES: usize = strata_vos::EXTENT_BYTES_MAX as usize + (64 << 10);

/// Objects one data-movement pass moves at once: while one waits for its destination's durable
/// import, others read their pages and cross the network, so the source's disk, the network
/// and the destination's disk work at the same time. Each holds at most a page (and, for EC, a
/// page per source shard) in memory.
const MOVE_OBJECTS_IN_FLIGHT: usize = 4;

/// Object ids listed per page while walking a target.
const WALK_PAGE_OBJECTS: usize = 1000;

/// One object a target of this rank stores: the unit data movement plans and moves.
#[derive(Clone)]
struct StoredObject {
    me: TargetId,
    vos: Arc<Vos>,
    cont: strata_types::ContId,
    oid: strata_types::Oid,
}

/// The walk every data-movement pass (rebuild, resync, drain, extension) makes over what this
/// rank stores: its targets whose state lets them be sources, their containers, and every
/// object with a stored row (visible or not: the history of a punched object is still read at
/// older epochs), a page of ids at a time.
struct ObjectWalk {
    targets: std::collections::VecDeque<(TargetId, Arc<Vos>)>,
    /// Containers of the front target not yet walked (`None`: not listed yet).
    conts: Option<std::collections::VecDeque<strata_types::ContId>>,
    /// The pool's containers: targets are shared by pools, and another pool's objects planned
    /// with this pool's layout would be copied to places nothing reads them from.
    pool_conts: Arc<std::collections::HashSet<strata_types::ContId>>,
    cont: Option<strata_types::ContId>,
    page: std::collections::VecDeque<strata_types::Oid>,
    /// Where the container's next page starts, if it has more.
    cursor: Option<strata_types::Oid>,
}

impl ObjectWalk {
    fn new(engine: &Engine, view: &PoolView, pool_conts: Arc<std::collections::HashSet<strata_types::ContId>>, source: impl Fn(strata_placement::TargetState) -> bool) -> ObjectWalk {
        let targets = engine.targets.iter().enumerate().map(|(i, v)| (TargetId { rank: engine.rank, index: i as u16 }, v.clone())).filter(|(t, _)| view.map.target(*t).is_some_and(|x| source(x.state))).collect();
        ObjectWalk { targets, conts: None, pool_conts, cont: None, page: Default::default(), cursor: None }
    }

    async fn next(&mut self) -> Result<Option<StoredObject>, RemoteError> {
        loop {
            let Some((me, vos)) = self.targets.front().cloned() else { return Ok(None) };
            if let Some(cont) = self.cont {
                if let Some(oid) = self.page.pop_front() {
                    return Ok(Some(StoredObject { me, vos, cont, oid }));
                }
                if let Some(c) = self.cursor.take() {
                    self.fill(&vos, cont, Some(c)).await?;
                    continue;
                }
                self.cont = None;
            }
            if self.conts.is_none() {
                let v = vos.clone();
                let on_target = on_blocking_pool(move || v.list_containers()).await?;
                self.conts = Some(on_target.into_iter().filter(|c| self.pool_conts.contains(c)).collect());
            }
            match self.conts.as_mut().and_then(|c| c.pop_front()) {
                Some(cont) => {
                    self.cont = Some(cont);
                    self.fill(&vos, cont, None).await?;
                }
                None => {
                    self.targets.pop_front();
                    self.conts = None;
                }
            }
        }
    }

    /// The next object and the rest of the page of ids it came in, all of one target and
    /// container.
    async fn next_page(&mut self) -> Result<Option<Vec<StoredObject>>, RemoteError> {
        let Some(first) = self.next().await? else { return Ok(None) };
        let (me, vos, cont) = (first.me, first.vos.clone(), first.cont);
        let mut out = Vec::with_capacity(1 + self.page.len());
        out.push(first);
        out.extend(self.page.drain(..).map(|oid| StoredObject { me, vos: vos.clone(), cont, oid }));
        Ok(Some(out))
    }

    async fn fill(&mut self, vos: &Arc<Vos>, cont: strata_types::ContId, cursor: Option<strata_types::Oid>) -> Result<(), RemoteError> {
        let v = vos.clone();
        let page = on_blocking_pool(move || v.list_stored_objects(cont, cursor, WALK_PAGE_OBJECTS)).await?;
        self.page = page.items.into();
        self.cursor = page.next;
        Ok(())
    }
}

/// Which data-movement pass runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PassKind {
    /// Rebuild, resync and drain (`rebuild_plan`).
    Rebuild,
    /// Extension onto `NEW` targets (`rebalance_pool`).
    Extend,
}

/// What a pass does with one object.
enum ObjectPlan {
    /// Groups to push, each with its destinations.
    Rebuild(strata_placement::Layout, Vec<(usize, Vec<TargetId>)>),
    /// Current and extended layouts.
    Extend(strata_placement::Layout, strata_placement::Layout),
}

impl Engine {
    /// One pass of rebuild (replicated objects): for every pool whose map has `DOWN` targets and
    /// that this rank has not finished for the current version, push every object shard that
    /// moved to a spare, from the group's first non-spare replica, then tell the management
    /// service. Returns how many records were pushed. Called periodically by the server.
    pub async fn rebuild_tick(&self) -> Result<u64, RemoteError> {
        let pools: Vec<Arc<PoolView>> = self.pools.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut pushed = 0;
        for view in pools {
            let version = view.map.version;
            let rebuilding = view.map.movement_pending();
            if !rebuilding && view.extended.is_none() {
                // A settled map: delete what earlier movement left where it no longer belongs.
                if let Err(e) = self.reclaim_pool(&view).await {
                    tracing::warn!(pool = %view.map_pool_id, error = %e, "reclaim pass failed; the next tick retries");
                }
                continue;
            }
            if self.rebuilt.lock().unwrap_or_else(|e| e.into_inner()).get(&view.map_pool_id) == Some(&version) {
                continue;
            }
            self.wait_older_updates(view.map_pool_id, version).await?;
            // Rebuild first: extension rebalances a pool whose data is where its map says.
            let moved = if rebuilding { self.rebuild_pool(&view).await } else { self.rebalance_pool(&view).await };
            // Shown by `pool query` while it lasts: the pass retries on its own, and a cause
            // outside it (a destination with no space left) needs a person to see it.
            let (n, complete) = moved.inspect_err(|e| self.movement.failed(view.map_pool_id, version, format!("rank {}: {e}", self.rank.0)))?;
            pushed += n;
            if complete {
                match self.mgmt.write(strata_rpc::mgmt_msg::MgmtCmd::RebuildDone { pool: view.map_pool_id, version, rank: self.rank }).await {
                    Ok(_) => {
                        self.rebuilt.lock().unwrap_or_else(|e| e.into_inner()).insert(view.map_pool_id, version);
                        tracing::info!(pool = %view.map_pool_id, version, records = n, "rebuild done on this rank");
                    }
                    Err(e) => tracing::warn!(error = %e, "could not report rebuild completion"),
                }
            }
        }
        Ok(pushed)
    }

    /// The shape of every data-movement pass: walk what this rank stores (`ObjectWalk`), plan
    /// each object (`plan_object`: nothing to push, or what to do and the bytes it carries),
    /// size the whole pass first for progress reports, then move the planned objects. Rebuild
    /// of replicated objects goes through `import_batch` (many small objects to one import
    /// message); EC objects and extension move one object at a time, `MOVE_OBJECTS_IN_FLIGHT`
    /// at once. Returns the records pushed.
    async fn movement_pass(&self, view: &Arc<PoolView>, kind: PassKind) -> Result<u64, RemoteError> {
        use futures::StreamExt;
        let pool = view.map_pool_id;
        let source = |s: strata_placement::TargetState| match kind {
            // A resyncing (UPIN) target lists what it has; `rebuild_plan` decides.
            PassKind::Rebuild => s.readable() || s == strata_placement::TargetState::UpIn,
            PassKind::Extend => s.readable(),
        };
        // Every update applied here so far is older (`wait_older_updates` ran, and applying
        // merges an update's epoch into this clock); later ones went to the new places too.
        let since = self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
        *self.pass_since.lock().unwrap_or_else(|e| e.into_inner()) = since;
        let (mut objects, mut bytes) = (0u64, 0u64);
        let conts = Arc::new(self.pool_containers(pool).await?);
        let mut walk = ObjectWalk::new(self, view, conts.clone(), source);
        // A page of objects is sized in one trip to the blocking pool, not one per object.
        while let Some(page) = walk.next_page().await? {
            let v = view.clone();
            let (n, b) = on_blocking_pool(move || {
                let (mut n, mut b) = (0u64, 0u64);
                for o in &page {
                    if let Some((_, estimate)) = Self::plan_object_blocking(&v, kind, o)? {
                        n += 1;
                        b += estimate;
                    }
                }
                Ok((n, b))
            })
            .await?;
            objects += n;
            bytes += b;
        }
        self.movement.begin(pool, view.map.version, objects, bytes);
        tracing::info!(%pool, version = view.map.version, objects, bytes, "data movement pass sized; moving");
        let mut walk = ObjectWalk::new(self, view, conts, source);
        let pushed = if kind == PassKind::Rebuild {
            self.rebuild_batched(view, since, &mut walk).await?
        } else {
            let mut inflight = futures::stream::FuturesUnordered::new();
            let (mut walked, mut pushed) = (false, 0u64);
            loop {
                while !walked && inflight.len() < MOVE_OBJECTS_IN_FLIGHT {
                    match walk.next().await? {
                        Some(o) => inflight.push(self.move_object(view, kind, o)),
                        None => walked = true,
                    }
                }
                match inflight.next().await {
                    Some(r) => pushed += r?,
                    None => break,
                }
            }
            pushed
        };
        self.movement.finish(pool, view.map.version);
        Ok(pushed)
    }

    /// What `kind` of pass does with object `o`, and the bytes it will push for it.
    async fn plan_object(&self, view: &Arc<PoolView>, kind: PassKind, o: &StoredObject) -> Result<Option<(ObjectPlan, u64)>, RemoteError> {
        let (view, o) = (view.clone(), o.clone());
        on_blocking_pool(move || Self::plan_object_blocking(&view, kind, &o)).await
    }

    /// [`Engine::plan_object`] on the calling thread (it reads the object's index rows).
    fn plan_object_blocking(view: &PoolView, kind: PassKind, o: &StoredObject) -> Result<Option<(ObjectPlan, u64)>, VosError> {
        let Ok(cur) = view.placement.layout(o.oid) else { return Ok(None) };
        if kind == PassKind::Rebuild {
            let plan = Self::rebuild_plan(view, o.me, o.oid, &cur);
            if plan.is_empty() {
                return Ok(None);
            }
            let l = cur.clone();
            let per_group = o.vos.object_stored_bytes(o.cont, o.oid, l.group_count(), |d| l.group_for_dkey(d))?;
            let estimate = plan.iter().map(|(g, dests)| per_group[*g] * dests.len() as u64).sum();
            return Ok(Some((ObjectPlan::Rebuild(cur, plan), estimate)));
        }
        let Some(Ok(new)) = view.extended.as_ref().map(|e| e.layout(o.oid)) else { return Ok(None) };
        let same = |a: &[strata_placement::ShardLoc], b: &[strata_placement::ShardLoc]| a.iter().map(|s| s.target).eq(b.iter().map(|s| s.target));
        if cur.group_count() == new.group_count() && cur.groups().zip(new.groups()).all(|(a, b)| !a.iter().any(|s| s.target == o.me) || same(a, b)) {
            return Ok(None);
        }
        // Stored bytes per (current group, new group) pair, times the destinations the pass
        // gives that pair's records.
        let ng = new.group_count();
        let per_pair = o.vos.object_stored_bytes(o.cont, o.oid, cur.group_count() * ng, |d| cur.group_for_dkey(d) * ng + new.group_for_dkey(d))?;
        let mut estimate = 0;
        for (i, b) in per_pair.iter().enumerate().filter(|(_, b)| **b > 0) {
            estimate += b * Self::extension_dests(view, &cur, &new, o.me, i / ng, i % ng).len() as u64;
        }
        if estimate == 0 {
            return Ok(None);
        }
        Ok(Some((ObjectPlan::Extend(cur, new), estimate)))
    }

    /// Plan and move one object, counting its progress.
    async fn move_object(&self, view: &Arc<PoolView>, kind: PassKind, o: StoredObject) -> Result<u64, RemoteError> {
        let pool = view.map_pool_id;
        let Some((plan, estimate)) = self.plan_object(view, kind, &o).await? else { return Ok(0) };
        let id = self.movement.begin_object(pool, estimate);
        let n = match plan {
            ObjectPlan::Rebuild(layout, groups) => self.push_object(view, &o, &layout, groups, id).await?,
            ObjectPlan::Extend(cur, new) => self.extend_object(view, &o, &cur, &new, id).await?,
        };
        self.movement.end_object(pool, id);
        Ok(n)
    }

    /// Rebuild, resync and drain of every object shard this rank is a source of.
    async fn rebuild_pool(&self, view: &Arc<PoolView>) -> Result<(u64, bool), RemoteError> {
        Ok((self.movement_pass(view, PassKind::Rebuild).await?, true))
    }

    /// Push one object's planned groups: EC groups decoded, replicated ones copied page by page
    /// to all their destinations at once.
    async fn push_object(&self, view: &PoolView, o: &StoredObject, layout: &strata_placement::Layout, plan: Vec<(usize, Vec<TargetId>)>, id: u64) -> Result<u64, RemoteError> {
        let mut pushed = 0;
        for (g, spares) in plan {
            let group = layout.group(g);
            if let Redundancy::Erasure { data: k, parity: p } = layout.class.redundancy() {
                pushed += self.rebuild_ec_group(view, o.cont, o.oid, layout, g, group, &spares, k as usize, p as usize, id).await?;
                continue;
            }
            // The group's rows, read into an import message as they are exported; one message
            // goes to every destination.
            let groups = layout.group_count();
            let since = *self.pass_since.lock().unwrap_or_else(|e| e.into_inner());
            let keep = Arc::new(move |r: strata_vos::RecordRef<'_>| r.record_key().is_none_or(|k| k.epoch <= since) && r.dkey().is_none_or(|d| strata_placement::group_for_dkey(&d, groups) == g));
            let mut n = 0u64;
            let mut page = Self::encoded_page(&o.vos, o.cont, o.oid, None, keep.clone()).await?;
            loop {
                let (payload, info) = page;
                let pushes = futures::future::join_all(spares.iter().map(|t| self.import_encoded(view, *t, payload.clone(), &info, id)));
                // The next page is read while this one is pushed: a large object streams.
                let (results, following) = match info.next.clone() {
                    Some(after) => {
                        let (r, f) = tokio::join!(pushes, Self::encoded_page(&o.vos, o.cont, o.oid, Some(after), keep.clone()));
                        (r, Some(f))
                    }
                    None => (pushes.await, None),
                };
                for r in results {
                    r?;
                    n += info.records;
                }
                match following {
                    Some(f) => page = f?,
                    None => break,
                }
            }
            pushed += n;
            tracing::debug!(oid = %o.oid, group = g, to = ?spares, records = n, "replicas pushed");
        }
        Ok(pushed)
    }

    /// The groups of `oid` that target `me` must push in this rebuild pass, each with its
    /// destinations.
    fn rebuild_plan(view: &PoolView, me: TargetId, oid: strata_types::Oid, layout: &strata_placement::Layout) -> Vec<(usize, Vec<TargetId>)> {
        let mut plan = Vec::new();
        for (g, group) in layout.groups().enumerate() {
            // The pusher holds the full data: a replica in its home place, else a
            // spare rebuilt in an earlier round (its home is DOWNOUT).
            use strata_placement::TargetState as TS;
            let state = |t: TargetId| view.map.target(t).map(|x| x.state);
            // A reintegrating (UPIN) replica may have missed writes: not a source.
            // A draining home still has everything: it is the source of its spare.
            let drained = group.iter().find(|s| s.is_spare && state(s.home) == Some(TS::Drain)).map(|s| strata_placement::ShardLoc { target: s.home, home: s.home, is_spare: false });
            let readable = |s: &&strata_placement::ShardLoc| state(s.target).is_some_and(|x| x.readable());
            let pushers: Vec<TargetId> = match layout.class.redundancy() {
                // EC decodes from every readable shard, so a pusher only has to
                // list the object. Single values live only on shard 0 and the
                // parity shards, so only those are sure to: the first of them that
                // holds its full data pushes (one pusher, so each destination gets
                // its cells once). Only when none does, every readable holder
                // pushes what it lists: a spare may be new and empty, and imports
                // are idempotent.
                Redundancy::Erasure { data: k, .. } => {
                    let k = k as usize;
                    let full = view.read_sources(oid, layout, g);
                    let holders: Vec<TargetId> = group.iter().enumerate().filter(|(i, s)| ec_rebuild::holds_singles(k, *i) && readable(s)).map(|(_, s)| s.target).collect();
                    match group.iter().enumerate().find(|(i, s)| ec_rebuild::holds_singles(k, *i) && full[*i] == Some(s.target)) {
                        Some((_, s)) => vec![s.target],
                        None if holders.is_empty() => group.iter().find(|s| readable(s)).map(|s| s.target).into_iter().collect(),
                        None => holders,
                    }
                }
                _ => match group.iter().find(|s| !s.is_spare && readable(s)).or(drained.as_ref()) {
                    Some(s) => vec![s.target],
                    // No home replica left: every spare pushes what it lists. One
                    // may be new and empty, or hold only writes since it became a
                    // spare; imports only add versions, so a partial push is
                    // harmless and the filled one completes the others.
                    None => group.iter().filter(|s| s.is_spare && readable(s)).map(|s| s.target).collect(),
                },
            };
            if !pushers.contains(&me) {
                continue;
            }
            // Spares that rebuild has not filled yet (a filled one, per the
            // settled layout, needs nothing) and UPIN replicas, which resync:
            // push to all of them (imports are idempotent: same keys, same epochs).
            let filled = view.read_sources(oid, layout, g);
            let spares: Vec<TargetId> = group.iter().enumerate().filter(|(i, s)| s.target != me && filled[*i] != Some(s.target) && (s.is_spare || state(s.target) == Some(TS::UpIn))).map(|(_, s)| s.target).collect();
            if spares.is_empty() {
                continue;
            }
            plan.push((g, spares));
        }
        plan
    }

    /// Extension: move what this rank holds to where the map with its `NEW` targets joined
    /// puts it. Runs only on a map with no other movement pending, so every place of the
    /// current layout holds its data: the first readable replica of a group copies its records
    /// to the group's new targets; each EC shard copies its own cells to its new place (to a
    /// target of the group too when it takes another index there: each index's cells have
    /// their own offset range, `ec_rebuild::cell_offset`). Records newer than the
    /// pass's start were written to both places already (`extension_of`) and are skipped.
    /// Sized first like the other passes, so `pool query` shows its progress.
    async fn rebalance_pool(&self, view: &Arc<PoolView>) -> Result<(u64, bool), RemoteError> {
        if view.extended.is_none() {
            return Ok((0, true));
        }
        let pool = view.map_pool_id;
        let pushed = self.movement_pass(view, PassKind::Extend).await?;
        tracing::info!(%pool, records = pushed, "extension rebalancing done on this rank");
        Ok((pushed, true))
    }

    /// Where extension sends this rank's records of current group `cg` that fall in group `ng`
    /// of the extended layout (see `rebalance_pool`).
    fn extension_dests(view: &PoolView, cur: &strata_placement::Layout, new: &strata_placement::Layout, me: TargetId, cg: usize, ng: usize) -> Vec<TargetId> {
        let (cg, ng) = (cur.group(cg), new.group(ng));
        let Some(idx) = cg.iter().position(|s| s.target == me) else { return Vec::new() };
        if matches!(cur.class.redundancy(), Redundancy::Erasure { .. }) {
            let to = ng[idx].target;
            return if to == me { Vec::new() } else { vec![to] };
        }
        let readable = |t: TargetId| view.map.target(t).is_some_and(|x| x.state.readable());
        if cg.iter().find(|s| readable(s.target)).map(|s| s.target) != Some(me) {
            return Vec::new();
        }
        ng.iter().map(|s| s.target).filter(|t| !cg.iter().any(|c| c.target == *t)).collect()
    }

    /// Extension of one object: its records older than the pass's start, page by page, each to
    /// its places in the extended layout.
    async fn extend_object(&self, view: &PoolView, o: &StoredObject, cur: &strata_placement::Layout, new: &strata_placement::Layout, id: u64) -> Result<u64, RemoteError> {
        let since = *self.pass_since.lock().unwrap_or_else(|e| e.into_inner());
        let mut pushed = 0u64;
        let mut page = Self::local_page(&o.vos, o.cont, o.oid, None).await?;
        loop {
            let (records, next) = page;
            let mut out: BTreeMap<TargetId, Vec<&strata_vos::RawRecord>> = BTreeMap::new();
            for r in &records {
                if r.record_key().is_some_and(|k| k.epoch > since) {
                    continue;
                }
                let dests: Vec<TargetId> = match r.dkey() {
                    // Object punches live on every shard: every new place needs one.
                    None => new.shards().iter().map(|s| s.target).filter(|t| !cur.shards().iter().any(|c| c.target == *t)).collect(),
                    Some(d) => {
                        // Cells of an index this target no longer serves are not its shard's.
                        let cg = cur.group_for_dkey(&d);
                        if ec_rebuild::shard_of_key(&r.key).is_some_and(|sh| matches!(cur.class.redundancy(), Redundancy::Erasure { .. }) && cur.group(cg).iter().position(|s| s.target == o.me) != Some(sh)) {
                            continue;
                        }
                        Self::extension_dests(view, cur, new, o.me, cg, new.group_for_dkey(&d))
                    }
                };
                for t in dests {
                    out.entry(t).or_default().push(r);
                }
            }
            let pushes = futures::future::join_all(out.iter().map(|(t, recs)| self.import_all(view, *t, recs, id)));
            // The next page is read while this one is pushed.
            let (results, following) = match next {
                Some(after) => {
                    let (r, f) = tokio::join!(pushes, Self::local_page(&o.vos, o.cont, o.oid, Some(after)));
                    (r, Some(f))
                }
                None => (pushes.await, None),
            };
            for r in results {
                pushed += r?;
            }
            match following {
                Some(f) => page = f?,
                None => return Ok(pushed),
            }
        }
    }

    /// The records `dests` need from one page of EC sources, decoded and pushed.
    #[allow(clippy::too_many_arguments)]
    async fn push_ec_page(&self, view: &PoolView, st: &strata_ec::EcStripe, oid: strata_types::Oid, g: usize, group: &[strata_placement::ShardLoc], dests: &[TargetId], sources: &[(usize, Vec<strata_vos::RawRecord>)], id: u64) -> Result<u64, RemoteError> {
        let mut pushed = 0;
        for (j, s) in group.iter().enumerate().filter(|(_, s)| dests.contains(&s.target)) {
            let rebuilt = ec_rebuild::rebuild_ec_shard(st, sources, j);
            if rebuilt.undecodable > 0 {
                // Beyond the redundancy (or a bug): readers will find these versions missing.
                tracing::error!(%oid, shard = j, stripes = rebuilt.undecodable, "stripe versions with fewer than k readable cells besides this shard were not rebuilt");
            }
            tracing::debug!(%oid, group = g, shard = j, to = %s.target, records = rebuilt.records.len(), sources = ?sources.iter().map(|(i, r)| (*i, r.len())).collect::<Vec<_>>(), "EC shard rebuilt");
            let records: Vec<&strata_vos::RawRecord> = rebuilt.records.iter().collect();
            pushed += self.import_all(view, s.target, &records, id).await?;
        }
        Ok(pushed)
    }

    /// One page of an object shard's records on target `t`, local or remote (see
    /// `Vos::export_object_page`); returns the rows and whether more follow.
    #[allow(clippy::too_many_arguments)]
    async fn export_page(&self, view: &PoolView, t: TargetId, cont: strata_types::ContId, oid: strata_types::Oid, after: Option<Vec<u8>>, upto: Option<Vec<u8>>) -> Result<(Vec<strata_vos::RawRecord>, bool), RemoteError> {
        if t.rank == self.rank {
            let vos = self.target(t)?.clone();
            return on_blocking_pool(move || vos.export_object_page(cont, oid, after.as_deref(), upto.as_deref(), EXPORT_PAGE_BYTES)).await;
        }
        let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
        let req = EngineReq::Export { pool: view.map_pool_id, map_version: view.map.version, target: t.index, cont, oid, after, upto, bytes_max: EXPORT_PAGE_BYTES as u64 };
        let (resp, payload) = self.peers.call::<_, EngineResp>(addr, &req, Bytes::new(), FORWARD_TIMEOUT).await.map_err(|e| rerr(ErrorCode::Unavailable, format!("export from {t}: {e}")))?;
        let EngineResp::Exported { truncated } = resp else { return Err(rerr(ErrorCode::Internal, format!("export from {t}: unexpected answer"))) };
        let records = strata_rpc::records::decode(&payload).map_err(|e| rerr(ErrorCode::Internal, format!("export from {t}: {e}")))?;
        Ok((records.into_iter().map(|r| strata_vos::RawRecord { punch: r.punch, key: r.key.to_vec(), value: r.value.to_vec() }).collect(), truncated))
    }

    /// One page of an object shard on this rank's target `vos` (see `export_page`), and the
    /// key the next page starts after, if any.
    async fn local_page(vos: &Arc<Vos>, cont: strata_types::ContId, oid: strata_types::Oid, after: Option<Vec<u8>>) -> Result<(Vec<strata_vos::RawRecord>, Option<Vec<u8>>), RemoteError> {
        let v = vos.clone();
        let (records, truncated) = on_blocking_pool(move || v.export_object_page(cont, oid, after.as_deref(), None, EXPORT_PAGE_BYTES)).await?;
        let next = if truncated { records.iter().rev().find(|r| !r.punch).map(|r| r.key.clone()) } else { None };
        Ok((records, next))
    }

    /// One page of an object shard on this rank's target `vos`, the rows `keep` accepts written
    /// straight into an import message (`strata_rpc::records`), and what it holds.
    async fn encoded_page(vos: &Arc<Vos>, cont: strata_types::ContId, oid: strata_types::Oid, after: Option<Vec<u8>>, keep: Arc<dyn Fn(strata_vos::RecordRef<'_>) -> bool + Send + Sync>) -> Result<(Bytes, strata_vos::ExportedPage), RemoteError> {
        let v = vos.clone();
        on_blocking_pool(move || {
            let mut sink = import_batch::ImportSink(strata_rpc::records::Writer::with_capacity(EXPORT_PAGE_BYTES + PAGE_SLACK_BYTES));
            let page = v.export_object_page_to(cont, oid, after.as_deref(), EXPORT_PAGE_BYTES, &*keep, &mut sink)?;
            Ok((Bytes::from(sink.0.finish()), page))
        })
        .await
    }

    /// Push one import message (`encoded_page`) to target `t`.
    async fn import_encoded(&self, view: &PoolView, t: TargetId, payload: Bytes, page: &strata_vos::ExportedPage, id: u64) -> Result<(), RemoteError> {
        if page.records == 0 {
            return Ok(());
        }
        let pool = view.map_pool_id;
        if t.rank == self.rank {
            let _importing = self.pace_import(page.bytes).await;
            let vos = self.target(t)?.clone();
            let records = strata_rpc::records::decode(&payload).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
            self.on_movement_threads(move || {
                let refs: Vec<strata_vos::RecordRef<'_>> = records.iter().map(|r| strata_vos::RecordRef { punch: r.punch, key: &r.key, value: &r.value }).collect();
                vos.import_refs(&refs)
            })
            .await?;
        } else {
            let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
            let req = EngineReq::Import { pool, map_version: view.map.version, target: t.index };
            self.peers.call::<_, EngineResp>(addr, &req, payload, IMPORT_TIMEOUT).await.map_err(|e| push_err(t, e))?;
        }
        self.moved_records.fetch_add(page.records, std::sync::atomic::Ordering::Relaxed);
        self.moved_bytes.fetch_add(page.bytes, std::sync::atomic::Ordering::Relaxed);
        self.movement.pushed(pool, id, page.bytes);
        Ok(())
    }

    /// Push `records` to target `t` in messages of at most `IMPORT_BYTES_MAX`; returns how many.
    async fn import_all(&self, view: &PoolView, t: TargetId, records: &[&strata_vos::RawRecord], id: u64) -> Result<u64, RemoteError> {
        let mut n = 0;
        for batch in batches(records) {
            self.import_to(view, t, batch, id).await?;
            n += batch.len() as u64;
        }
        Ok(n)
    }

    async fn import_to(&self, view: &PoolView, t: TargetId, records: &[&strata_vos::RawRecord], id: u64) -> Result<(), RemoteError> {
        let pool = view.map_pool_id;
        let bytes: u64 = records.iter().map(|r| (r.key.len() + r.value.len()) as u64).sum();
        let _importing = if t.rank == self.rank { Some(self.pace_import(bytes).await) } else { None };
        self.import_raw(view, t, records).await?;
        self.moved_records.fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.moved_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.movement.pushed(pool, id, bytes);
        Ok(())
    }

    async fn import_raw(&self, view: &PoolView, t: TargetId, records: &[&strata_vos::RawRecord]) -> Result<(), RemoteError> {
        if t.rank == self.rank {
            let vos = self.target(t)?.clone();
            let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if !multi {
                let owned: Vec<strata_vos::RawRecord> = records.iter().map(|r| (*r).clone()).collect();
                return on_blocking_pool(move || vos.import(&owned)).await;
            }
            let refs: Vec<strata_vos::RecordRef<'_>> = records.iter().map(|r| r.as_ref()).collect();
            // The records are borrowed: import on this worker thread, telling the runtime to
            // move its other tasks elsewhere meanwhile (no copy of up to 16 MiB to hand over).
            return tokio::task::block_in_place(|| vos.import_refs(&refs)).map_err(vos_err);
        }
        let addr = view.addrs.get(&t.rank).ok_or_else(|| rerr(ErrorCode::Unavailable, format!("no address for rank {}", t.rank)))?;
        let payload = strata_rpc::records::encode(records.iter().map(|r| (r.punch, &r.key[..], &r.value[..])));
        let req = EngineReq::Import { pool: view.map_pool_id, map_version: view.map.version, target: t.index };
        self.peers.call::<_, EngineResp>(addr, &req, Bytes::from(payload), IMPORT_TIMEOUT).await.map(|_| ()).map_err(|e| push_err(t, e))
    }
}

impl Engine {
    /// One background scrub pass over every pool this rank serves that has no data movement
    /// under way (a spare being filled is not yet a repair source), reading at most
    /// `bytes_per_s` on average over each target (0: no limit); adds to the counters
    /// `EngineReq::Stats` reports.
    pub async fn scrub_tick(&self, bytes_per_s: u64) {
        let pools: Vec<Arc<PoolView>> = self.pools.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut total = ScrubCounters::default();
        for view in pools.iter().filter(|v| !v.map.movement_pending() && v.extended.is_none()) {
            match self.scrub_paced(view.map_pool_id, view.map.version, bytes_per_s).await {
                Ok(c) => {
                    total.records_checked += c.records_checked;
                    total.bytes_checked += c.bytes_checked;
                    total.corrupt += c.corrupt;
                    total.repaired += c.repaired;
                    total.lost += c.lost;
                }
                Err(e) => tracing::warn!(pool = %view.map_pool_id, error = %e, "background scrub pass failed; the next one retries"),
            }
        }
        let mut s = self.scrubbed.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.1.records_checked += total.records_checked;
        s.1.bytes_checked += total.bytes_checked;
        s.1.corrupt += total.corrupt;
        s.1.repaired += total.repaired;
        s.1.lost += total.lost;
    }

    /// Scrub this rank's targets for one pool (see `EngineReq::Scrub`).
    pub async fn scrub(&self, pool: PoolId, version: u64) -> Result<ScrubCounters, RemoteError> {
        self.scrub_paced(pool, version, 0).await
    }

    async fn scrub_paced(&self, pool: PoolId, version: u64, bytes_per_s: u64) -> Result<ScrubCounters, RemoteError> {
        let view = self.view(pool, version).await?;
        let mut c = ScrubCounters::default();
        for (i, vos) in self.targets.iter().enumerate() {
            let me = TargetId { rank: self.rank, index: i as u16 };
            if view.map.target(me).is_none() {
                continue;
            }
            let v = vos.clone();
            let started = tokio::time::Instant::now();
            // Check what is on disk, not what sits in memory.
            let report = on_blocking_pool(move || v.flush().and_then(|()| v.verify_all())).await?;
            if bytes_per_s > 0 {
                // One target is verified in one go: pace by resting after it.
                tokio::time::sleep_until(started + Duration::from_secs_f64(report.bytes_checked as f64 / bytes_per_s as f64)).await;
            }
            c.records_checked += report.records_checked;
            c.bytes_checked += report.bytes_checked;
            c.corrupt += (report.corrupt.len() + report.engine_errors.len()) as u64;
            c.lost += report.engine_errors.len() as u64;
            for bad in report.corrupt {
                let Some(key) = bad.key else {
                    c.lost += 1;
                    continue;
                };
                tracing::warn!(target = %me, oid = %key.oid, defect = %bad.defect, "scrub found a corrupt record");
                let mut repaired = false;
                if let Some(good) = self.repair_source(&view, me, &key, &bad.raw_key).await {
                    let v = vos.clone();
                    repaired = tokio::task::spawn_blocking(move || v.import(&[good])).await.map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?.is_ok();
                }
                if repaired {
                    tracing::info!(target = %me, oid = %key.oid, "scrub repaired the record from healthy shards");
                    c.repaired += 1;
                } else {
                    tracing::error!(target = %me, oid = %key.oid, "scrub could not repair the record: no healthy shard has it");
                    c.lost += 1;
                }
            }
        }
        Ok(c)
    }
}

impl Engine {
    /// A healthy copy of the record `raw_key` of shard `me`: a replica's copy, or for EC the cell
    /// decoded from the same stripe version on the other shards (single values: a copy from
    /// another shard that holds them).
    async fn repair_source(&self, view: &PoolView, me: TargetId, key: &strata_vos::RecordKey, raw_key: &[u8]) -> Option<strata_vos::RawRecord> {
        let layout = view.placement.layout(key.oid).ok()?;
        let group = layout.group(layout.group_for_dkey(&key.dkey)).to_vec();
        let mine = group.iter().position(|s| s.target == me)?;
        let readable = |t: TargetId| view.map.target(t).is_some_and(|x| x.state.readable());
        let others = group.iter().enumerate().filter(|(i, s)| *i != mine && readable(s.target));
        match layout.class.redundancy() {
            // A cell of an index this target no longer serves (left by an extension) has no
            // stripe to be decoded from.
            Redundancy::Erasure { .. } if key.offset.is_some_and(|o| ec_rebuild::shard_of_offset(o) != mine) => None,
            Redundancy::Erasure { data: k, parity: p } if key.offset.is_some() => {
                let (k, p) = (k as usize, p as usize);
                let st = strata_ec::EcStripe::new(k, p, strata_ec::CELL_BYTES_DEFAULT).ok()?;
                let mut cells: Vec<Option<Vec<u8>>> = vec![None; k + p];
                let mut template = None;
                // The same stripe version's cells sit in each shard's own offset range.
                for (i, s) in others {
                    if let Some(r) = self.raw_get(view, s.target, &ec_rebuild::key_for_shard(raw_key, i)).await {
                        if let Ok(Some(cell)) = r.payload() {
                            cells[i] = Some(cell.to_vec());
                            template = Some(r);
                        }
                    }
                }
                st.reconstruct(&mut cells).ok()?;
                let mut repaired = template?.with_payload(cells[mine].as_deref()?);
                repaired.key = raw_key.to_vec();
                Some(repaired)
            }
            Redundancy::Erasure { data: k, .. } => {
                for (_, s) in others.filter(|(i, _)| ec_rebuild::holds_singles(k as usize, *i)) {
                    if let Some(r) = self.raw_get(view, s.target, raw_key).await {
                        return Some(r);
                    }
                }
                None
            }
            _ => {
                for (_, s) in others {
                    if let Some(r) = self.raw_get(view, s.target, raw_key).await {
                        return Some(r);
                    }
                }
                None
            }
        }
    }

    /// One verified record of another shard, if it has it.
    async fn raw_get(&self, view: &PoolView, t: TargetId, raw_key: &[u8]) -> Option<strata_vos::RawRecord> {
        if t.rank == self.rank {
            let (vos, k) = (self.target(t).ok()?.clone(), raw_key.to_vec());
            return tokio::task::spawn_blocking(move || vos.get_raw(&k)).await.ok()?.ok()?;
        }
        let addr = view.addrs.get(&t.rank)?;
        let req = EngineReq::RawGet { pool: view.map_pool_id, map_version: view.map.version, target: t.index, key: raw_key.to_vec() };
        match self.peers.call::<_, EngineResp>(addr, &req, Bytes::new(), FORWARD_TIMEOUT).await {
            Ok((EngineResp::Raw { found: true }, value)) => Some(strata_vos::RawRecord { punch: false, key: raw_key.to_vec(), value: value.to_vec() }),
            _ => None,
        }
    }
}

/// An import message as the object store's export writes it.
struct RecordsSink(strata_rpc::records::Writer);

impl strata_vos::RecordSink for RecordsSink {
    fn record(&mut self, punch: bool, key: &[u8], value_len: usize) -> &mut Vec<u8> {
        self.0.record(punch, key, value_len)
    }
}

/// Split records into messages of at most `IMPORT_BYTES_MAX`.
fn batches<'a, 'r>(records: &'a [&'r strata_vos::RawRecord]) -> Vec<&'a [&'r strata_vos::RawRecord]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let n = r.key.len() + r.value.len();
        if bytes + n > IMPORT_BYTES_MAX && i > start {
            out.push(&records[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += n;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}

impl Handler for Engine {
    type Req = EngineReq;
    type Resp = EngineResp;

    async fn handle(&self, req: EngineReq, payload: Bytes, ctx: RequestCtx) -> Result<(EngineResp, Bytes), RemoteError> {
        let m = self.requests.start(&req, payload.len());
        let r = self.serve(req, payload, ctx).await;
        self.requests.done(m, r.is_ok(), r.as_ref().map_or(0, |(_, b)| b.len()));
        r
    }
}

impl Engine {
    async fn serve(&self, req: EngineReq, payload: Bytes, _ctx: RequestCtx) -> Result<(EngineResp, Bytes), RemoteError> {
        match req {
            EngineReq::Update { pool, map_version, cont, oid, dkey, epoch, ops } => {
                self.admit_bytes(&payload)?;
                Ok((self.update(pool, map_version, cont, oid, dkey, epoch, ops, payload).await?, Bytes::new()))
            }
            EngineReq::Replicate { pool, map_version, target, cont, oid, dkey, epoch, ops } => {
                self.admit_bytes(&payload)?;
                let _admitted = self.admit(pool, map_version).await?;
                let _writing = self.reclaim_gate.enter(pool, map_version).await;
                self.hlc.update(epoch).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let u = Self::to_updates(cont, oid, &dkey, epoch, &ops, &payload)?;
                self.apply(vos, u).await?;
                Ok((EngineResp::Updated { epoch }, Bytes::new()))
            }
            EngineReq::Fetch { pool, map_version, target, cont, oid, dkey, fetch, epoch } => {
                let view = self.view(pool, map_version).await?;
                let t = TargetId { rank: self.rank, index: target };
                let vos = self.target(t)?.clone();
                let shard = Self::ec_shard_of(&view, oid, &dkey, t);
                on_blocking_pool(move || ec_cells::fetch_shard(&vos, cont, oid, &dkey, fetch, epoch, shard)).await
            }
            EngineReq::ListDkeys { pool, map_version, target, cont, oid, epoch, cursor, limit } => {
                self.view(pool, map_version).await?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let p = on_blocking_pool(move || vos.list_dkeys(cont, oid, epoch, cursor.as_deref(), limit as usize)).await?;
                Ok((EngineResp::Keys { keys: p.items, next: p.next }, Bytes::new()))
            }
            EngineReq::ListAkeys { pool, map_version, target, cont, oid, dkey, epoch, cursor, limit } => {
                self.view(pool, map_version).await?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let p = on_blocking_pool(move || vos.list_akeys(cont, oid, &dkey, epoch, cursor.as_deref(), limit as usize)).await?;
                Ok((EngineResp::Keys { keys: p.items, next: p.next }, Bytes::new()))
            }
            EngineReq::ListObjects { pool, map_version, target, cont, epoch, cursor, limit } => {
                self.view(pool, map_version).await?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let p = on_blocking_pool(move || vos.list_objects(cont, epoch, cursor, limit as usize)).await?;
                Ok((EngineResp::Objects { oids: p.items, next: p.next }, Bytes::new()))
            }
            EngineReq::Import { pool, map_version, target } => {
                self.admit_bytes(&payload)?;
                self.view(pool, map_version).await?;
                let _writing = self.reclaim_gate.enter(pool, map_version).await;
                let _importing = self.pace_import(payload.len() as u64).await;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                // Keys and values stay slices of the request's payload until VOS writes them.
                let records = strata_rpc::records::decode(&payload).map_err(|e| rerr(ErrorCode::InvalidArgument, format!("import records: {e}")))?;
                self.on_movement_threads(move || {
                    let refs: Vec<strata_vos::RecordRef<'_>> = records.iter().map(|r| strata_vos::RecordRef { punch: r.punch, key: &r.key, value: &r.value }).collect();
                    vos.import_refs(&refs)
                })
                .await?;
                Ok((EngineResp::Updated { epoch: Epoch::ZERO }, Bytes::new()))
            }
            EngineReq::Export { pool, map_version, target, cont, oid, after, upto, bytes_max } => {
                self.view(pool, map_version).await?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let bytes_max = (bytes_max as usize).min(EXPORT_PAGE_BYTES);
                let (payload, truncated) = on_blocking_pool(move || {
                    if upto.is_some() {
                        let (records, truncated) = vos.export_object_page(cont, oid, after.as_deref(), upto.as_deref(), bytes_max)?;
                        return Ok((strata_rpc::records::encode(records.iter().map(|r| (r.punch, &r.key[..], &r.value[..]))), truncated));
                    }
                    // Written in place: no buffer per record.
                    let mut sink = RecordsSink(strata_rpc::records::Writer::with_capacity(bytes_max + PAGE_SLACK_BYTES));
                    let page = vos.export_object_page_to(cont, oid, after.as_deref(), bytes_max, &|_| true, &mut sink)?;
                    Ok((sink.0.finish(), page.next.is_some()))
                })
                .await?;
                if payload.len() > EXPORT_BYTES_MAX {
                    return Err(rerr(ErrorCode::Internal, format!("an export page of object {oid} came to {} bytes, more than one answer carries ({EXPORT_BYTES_MAX})", payload.len())));
                }
                Ok((EngineResp::Exported { truncated }, Bytes::from(payload)))
            }
            EngineReq::Scrub { pool, map_version } => Ok((EngineResp::Scrubbed(self.scrub(pool, map_version).await?), Bytes::new())),
            EngineReq::RawGet { pool, map_version, target, key } => {
                self.view(pool, map_version).await?;
                let vos = self.target(TargetId { rank: self.rank, index: target })?.clone();
                let r = on_blocking_pool(move || vos.get_raw(&key)).await?;
                Ok(match r {
                    Some(rec) => (EngineResp::Raw { found: true }, Bytes::from(rec.value)),
                    None => (EngineResp::Raw { found: false }, Bytes::new()),
                })
            }
            EngineReq::Clock => Ok((EngineResp::Clock { epoch: self.hlc.now().map_err(|e| rerr(ErrorCode::Internal, e.to_string()))? }, Bytes::new())),
            EngineReq::Kv(r) => {
                if matches!(r, strata_rpc::kv_msg::KvReq::Commit1 { .. } | strata_rpc::kv_msg::KvReq::Prepare { .. }) {
                    self.admit_bytes(&payload)?;
                }
                // KV requests write the shard's replicas here (the leader's own write is local).
                let (pool, version) = (r.shard().pool, r.shard().map_version);
                let _writing = self.reclaim_gate.enter(pool, version).await;
                self.kv(r, payload).await
            }
            EngineReq::CapFetch { token, dkey, fetch, epoch } => self.cap_fetch(&token, dkey, fetch, epoch).await,
            EngineReq::CapUpdate { token, dkey, ops } => {
                self.admit_bytes(&payload)?;
                Ok((self.cap_update(&token, dkey, ops, payload).await?, Bytes::new()))
            }
            EngineReq::Stats => Ok((EngineResp::Stats(self.stats()), Bytes::new())),
            EngineReq::PoolVersions { versions } => {
                self.note_pool_versions(&versions).await;
                Ok((EngineResp::Updated { epoch: Epoch::ZERO }, Bytes::new()))
            }
        }
    }
}
