//! Reclaim: delete the copies data movement left behind. Extension copies each shard to its
//! new place, drain and rebuild copy to spares, and none of them deletes the source: after an
//! extension the old targets still hold every moved shard, after a drain the drained target
//! holds everything. Once a pool's map is settled, each rank walks its targets and deletes every
//! row the current map does not place there (`Vos::reclaim_object`).
//!
//! When it is safe, and how it stays so:
//! - Only on a settled map: no target `DOWN`, `UPIN`, `DRAIN` or `NEW` (`movement_under_way`),
//!   so every movement that placed the current copies has finished (the management service
//!   settles the map only once every live rank reported its pass done) and no pass may still
//!   read a copy here as its source. This rank's own passes run in the same task, one at a time.
//! - Updates admitted under older maps are waited for first (`wait_older_updates`): they may
//!   still write old places, and their rows must not land behind the delete.
//! - A newer map may make this target a place again (a failure makes it a spare, a
//!   reintegration an `UPIN` replica) and imports or updates under it may land here while a
//!   delete runs; they would be deleted with the old rows (same record keys). So every request
//!   that writes (updates, replica writes, imports, KV requests) holds a [`Writing`] guard of
//!   the map version it runs under, and each delete holds [`Deleting`] of the pass's version:
//!   a delete starts only while no request under another version of the pool writes and the map
//!   is still the pass's (checked under the gate's lock, after the writers installed their
//!   newer map), and requests under newer versions wait until it ends. Then the pass stops and
//!   runs again once the newer map settles; what that map's movement pushed here is kept.
//! - Only containers of the pool being reclaimed are walked: targets are shared by pools.
//! - A `DOWNOUT` target keeps what it holds unless this process saw it drained
//!   ([`DrainedTargets`]): a rank excluded as failed and back after its rebuild may hold the
//!   only copies of objects that lost more shards than their redundancy (a second failure
//!   during the rebuild), and deleting them would make that loss final; a drained one gave
//!   everything away first.

use super::*;

/// Objects one reclaim delete takes at once (one VOS commit, one sync, for many small objects);
/// requests under a newer map wait for at most that many.
const RECLAIM_OBJECTS_PER_COMMIT: usize = 64;

/// Requests writing per (pool, map version), and the delete under way, if any.
#[derive(Default)]
pub(super) struct ReclaimGate {
    state: std::sync::Mutex<GateState>,
    cleared: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    writers: HashMap<(PoolId, u64), usize>,
    /// The pool and map version of the delete under way.
    deleting: Option<(PoolId, u64)>,
}

/// A request that may write under one map version, registered until it drops.
pub(super) struct Writing<'a> {
    gate: &'a ReclaimGate,
    key: (PoolId, u64),
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if let Some(n) = st.writers.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.writers.remove(&self.key);
            }
        }
    }
}

/// A reclaim delete under way; requests under newer maps wait until it drops.
pub(super) struct Deleting<'a> {
    gate: &'a ReclaimGate,
}

impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        self.gate.lock().deleting = None;
        self.gate.cleared.notify_waiters();
    }
}

impl ReclaimGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a request that may write under map `version` of `pool`, once no delete decided
    /// under an older map of the pool runs. Call it after the request's map is installed
    /// (`Engine::view`), so a delete starting later sees the newer map.
    pub(super) async fn enter(&self, pool: PoolId, version: u64) -> Writing<'_> {
        loop {
            // Created before the check: a delete ending in between still wakes it.
            let cleared = self.cleared.notified();
            {
                let mut st = self.lock();
                if !matches!(st.deleting, Some((p, v)) if p == pool && v < version) {
                    *st.writers.entry((pool, version)).or_default() += 1;
                    return Writing { gate: self, key: (pool, version) };
                }
            }
            cleared.await;
        }
    }

    /// Start a delete decided under map `version` of `pool`: `None` while a request under
    /// another version of the pool is writing, or when `current` (the installed map's version,
    /// asked under the gate's lock) is another.
    pub(super) fn begin_delete(&self, pool: PoolId, version: u64, current: impl FnOnce() -> Option<u64>) -> Option<Deleting<'_>> {
        let mut st = self.lock();
        if st.writers.keys().any(|(p, v)| *p == pool && *v != version) || current() != Some(version) {
            return None;
        }
        st.deleting = Some((pool, version));
        Some(Deleting { gate: self })
    }
}

/// Targets of this rank that this process saw in `DRAIN`, per pool, until they are placed
/// again (`UP`, `UPIN`, `NEW`). Memory only: a restarted rank has seen no drain, so its
/// `DOWNOUT` targets are kept, which costs space but never data.
#[derive(Default)]
pub(super) struct DrainedTargets(std::sync::Mutex<std::collections::HashSet<(PoolId, TargetId)>>);

impl DrainedTargets {
    /// Note the states a newly installed map gives this rank's targets.
    pub(super) fn note(&self, pool: PoolId, map: &PoolMap, rank: Rank) {
        use strata_placement::TargetState as TS;
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for t in map.targets.iter().filter(|t| t.id.rank == rank) {
            match t.state {
                TS::Drain => {
                    seen.insert((pool, t.id));
                }
                TS::Up | TS::UpIn | TS::New => {
                    seen.remove(&(pool, t.id));
                }
                TS::Down | TS::DownOut => {}
            }
        }
    }

    /// Whether reclaim may empty target `t` of `pool`, in state `state`.
    fn may_reclaim(&self, pool: PoolId, t: TargetId, state: strata_placement::TargetState) -> bool {
        state != strata_placement::TargetState::DownOut || self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(&(pool, t))
    }
}

/// Per pool, what reclaim did on this rank (`EngineReq::Stats`).
#[derive(Default)]
pub(super) struct ReclaimCounters(std::sync::Mutex<HashMap<PoolId, ReclaimProgress>>);

impl ReclaimCounters {
    fn with<T>(&self, pool: PoolId, f: impl FnOnce(&mut ReclaimProgress) -> T) -> T {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(pool).or_insert_with(|| ReclaimProgress { pool, version_done: 0, passes: 0, passes_stopped: 0, objects: 0, objects_whole: 0, records: 0, bytes: 0 }))
    }

    fn version_done(&self, pool: PoolId) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&pool).map_or(0, |p| p.version_done)
    }

    pub(super) fn report(&self) -> Vec<ReclaimProgress> {
        let mut v: Vec<ReclaimProgress> = self.0.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.sort_by_key(|p| p.pool);
        v
    }
}

/// Whether target `me` holds row `key` of an object laid out as `layout`: its dkey's group
/// places `me`, and for erasure coding the row is a cell in the offset range of the index `me`
/// serves there (`ec_rebuild::cell_offset`), or a single value on an index that stores them.
pub(super) fn placed_here(layout: &strata_placement::Layout, me: TargetId, key: &strata_vos::RecordKey) -> bool {
    let group = layout.group(layout.group_for_dkey(&key.dkey));
    let Some(i) = group.iter().position(|s| s.target == me) else { return false };
    match layout.class.redundancy() {
        Redundancy::Erasure { data: k, .. } => match key.offset {
            Some(off) => ec_rebuild::shard_of_offset(off) == i,
            None => ec_rebuild::holds_singles(k as usize, i),
        },
        _ => true,
    }
}

/// What a pass does with one object of one target.
#[derive(Debug, PartialEq, Eq)]
enum Reclaim {
    /// Every row is placed here.
    Keep,
    /// No group places this target: every row, punches and index row go.
    Whole,
    /// Some rows may not be placed here: each is checked (`placed_here`).
    Rows,
}

fn plan(layout: &strata_placement::Layout, me: TargetId) -> Reclaim {
    let mine = layout.groups().filter(|g| g.iter().any(|s| s.target == me)).count();
    if mine == 0 {
        return Reclaim::Whole;
    }
    // An EC target may hold cells of another index (an extension gave it another place in
    // the group): only its rows tell.
    if mine == layout.group_count() && !matches!(layout.class.redundancy(), Redundancy::Erasure { .. }) {
        return Reclaim::Keep;
    }
    Reclaim::Rows
}

/// Why a reclaim pass ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PassEnd {
    /// It walked everything.
    Done,
    /// The map moved on (or requests under another map were writing): run again later.
    Stopped,
    /// The pool is not settled, or this version was reclaimed already.
    NotDue,
}

impl Engine {
    /// The version of the pool map this rank has installed.
    fn installed_version(&self, pool: PoolId) -> Option<u64> {
        self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&pool).map(|v| v.map.version)
    }

    /// The pool's containers, from the management service: targets are shared by pools, so a
    /// pass over one pool must leave the others' containers alone.
    pub(super) async fn pool_containers(&self, pool: strata_types::PoolId) -> Result<std::collections::HashSet<strata_types::ContId>, RemoteError> {
        match self.mgmt.query(MgmtQuery::Conts { pool: pool.to_string() }).await {
            Ok(MgmtReply::Conts(c)) => Ok(c.into_iter().map(|c| c.id).collect()),
            Ok(_) => Err(rerr(ErrorCode::Internal, "unexpected management reply")),
            Err(e) => Err(rerr(ErrorCode::Unavailable, format!("cannot list the pool's containers: {e}"))),
        }
    }

    /// One reclaim pass over this rank's targets for a pool whose map is settled and not yet
    /// reclaimed at its version (see the module doc).
    pub(super) async fn reclaim_pool(&self, view: &Arc<PoolView>) -> Result<PassEnd, RemoteError> {
        let (pool, version) = (view.map_pool_id, view.map.version);
        if aggregation::movement_under_way(&view.map) || view.extended.is_some() || view.settled.is_some() || self.reclaim.version_done(pool) == version {
            return Ok(PassEnd::NotDue);
        }
        self.wait_older_updates(pool, version).await?;
        let conts = self.pool_containers(pool).await?;
        let before = self.reclaim.with(pool, |p| p.clone());
        for (i, vos) in self.targets.iter().enumerate() {
            let me = TargetId { rank: self.rank, index: i as u16 };
            // A target of this rank the pool does not use holds none of its data.
            let Some(state) = view.map.target(me).map(|t| t.state) else { continue };
            if !self.drained.may_reclaim(pool, me, state) {
                tracing::info!(%pool, target = %me, "reclaim keeps what this DOWNOUT target holds: it was excluded, not drained (`pool reintegrate` brings it back, resynced)");
                continue;
            }
            let v = vos.clone();
            let on_target = on_blocking_pool(move || v.list_containers()).await?;
            for cont in on_target.into_iter().filter(|c| conts.contains(c)) {
                let mut cursor = None;
                loop {
                    let v = vos.clone();
                    let page = on_blocking_pool(move || v.list_stored_objects(cont, cursor, WALK_PAGE_OBJECTS)).await?;
                    let mut batch: Vec<(strata_types::Oid, strata_placement::Layout)> = Vec::new();
                    for oid in page.items {
                        if self.installed_version(pool) != Some(version) {
                            return Ok(self.reclaim_stopped(pool, version, "the pool map moved on"));
                        }
                        // An object of an unknown class is left alone.
                        let Ok(layout) = view.placement.layout(oid) else { continue };
                        if plan(&layout, me) == Reclaim::Keep {
                            continue;
                        }
                        batch.push((oid, layout));
                        if batch.len() >= RECLAIM_OBJECTS_PER_COMMIT && !self.reclaim_batch(pool, version, me, vos, cont, std::mem::take(&mut batch)).await? {
                            return Ok(self.reclaim_stopped(pool, version, "the pool map moved on, or requests under another map version are writing"));
                        }
                    }
                    if !batch.is_empty() && !self.reclaim_batch(pool, version, me, vos, cont, batch).await? {
                        return Ok(self.reclaim_stopped(pool, version, "the pool map moved on, or requests under another map version are writing"));
                    }
                    match page.next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
            }
        }
        let after = self.reclaim.with(pool, |p| {
            p.version_done = version;
            p.passes += 1;
            p.clone()
        });
        tracing::info!(%pool, version, objects = after.objects - before.objects, bytes = after.bytes - before.bytes, "reclaim pass done on this rank");
        Ok(PassEnd::Done)
    }

    /// Delete from target `me` the rows of `batch` (objects of `cont` with their layouts) that
    /// the pass's map does not place there, in one VOS call under the gate (`begin_delete`).
    /// `false`: the gate refused (the map moved, or requests under another version write).
    #[allow(clippy::too_many_arguments)]
    async fn reclaim_batch(&self, pool: PoolId, version: u64, me: TargetId, vos: &Arc<Vos>, cont: strata_types::ContId, batch: Vec<(strata_types::Oid, strata_placement::Layout)>) -> Result<bool, RemoteError> {
        let Some(deleting) = self.reclaim_gate.begin_delete(pool, version, || self.installed_version(pool)) else { return Ok(false) };
        let v = vos.clone();
        let oids: Vec<strata_types::Oid> = batch.iter().map(|(o, _)| *o).collect();
        let layouts: HashMap<strata_types::Oid, strata_placement::Layout> = batch.into_iter().collect();
        // Objects no group places here lose every row: `placed_here` is false for all of them.
        // On the movement threads: reclaim is background work, below foreground priority.
        let r = self.on_movement_threads(move || v.reclaim_objects(cont, &oids, &|k| layouts.get(&k.oid).is_some_and(|l| !placed_here(l, me, k)))).await;
        drop(deleting);
        for s in r?.into_iter().filter(|s| s.records > 0 || s.object_removed) {
            self.reclaim.with(pool, |p| {
                p.objects += 1;
                p.objects_whole += s.object_removed as u64;
                p.records += s.records;
                p.bytes += s.bytes;
            });
        }
        Ok(true)
    }

    fn reclaim_stopped(&self, pool: PoolId, version: u64, why: &str) -> PassEnd {
        self.reclaim.with(pool, |p| p.passes_stopped += 1);
        tracing::info!(%pool, version, why, "reclaim pass stopped; it runs again on the settled map");
        PassEnd::Stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn requests_under_newer_maps_wait_for_a_delete_and_deletes_wait_for_them() {
        let gate = ReclaimGate::default();
        let (pool, other) = (PoolId::new_random(), PoolId::new_random());
        // Requests under the pass's own map, or of another pool, do not stop a delete.
        let same = gate.enter(pool, 5).await;
        let elsewhere = gate.enter(other, 9).await;
        let d = gate.begin_delete(pool, 5, || Some(5)).expect("nothing under another version writes");
        // While it runs, a request under an older or the same map goes on...
        drop(gate.enter(pool, 4).now_or_never().expect("older requests do not wait"));
        drop(gate.enter(pool, 5).now_or_never().expect("requests under the pass's map do not wait"));
        drop(gate.enter(other, 6).now_or_never().expect("other pools do not wait"));
        // ...and one under a newer map waits until it ends.
        let mut newer = Box::pin(gate.enter(pool, 6));
        assert!(newer.as_mut().now_or_never().is_none(), "a request under a newer map wrote during a delete");
        drop(d);
        let newer = newer.now_or_never().expect("the request goes on once the delete ended");
        // While it writes, no delete under the older map starts.
        assert!(gate.begin_delete(pool, 5, || Some(5)).is_none(), "a delete started while a newer request writes");
        drop(newer);
        assert!(gate.begin_delete(pool, 5, || Some(6)).is_none(), "a delete started on a map that moved on");
        drop((same, elsewhere));
        assert!(gate.begin_delete(pool, 5, || Some(5)).is_some());
    }

    fn layout(class: &str, ranks: u32) -> (strata_placement::Layout, strata_types::Oid, strata_placement::PoolMap) {
        use strata_placement::{FaultDomain, PoolMap, PoolTarget, TargetState};
        let targets = (0..ranks).flat_map(|r| (0..2u16).map(move |i| (r, i))).map(|(r, i)| PoolTarget { id: TargetId { rank: Rank(r), index: i }, domain: FaultDomain::parse(&format!("/h{r}")).unwrap(), labels: Default::default(), state: TargetState::Up, out_since: 0 }).collect();
        let map = PoolMap { format: 1, version: 1, targets };
        let p = PlacementMap::new(&map, false);
        let oid = strata_types::Oid::new(strata_types::ObjectType::Plain, class.parse().unwrap(), 77);
        (p.layout(oid).unwrap(), oid, map)
    }

    fn key(oid: strata_types::Oid, dkey: &[u8], offset: Option<u64>) -> strata_vos::RecordKey {
        strata_vos::RecordKey { cont: strata_types::ContId::nil(), oid, dkey: dkey.to_vec(), akey: b"a".to_vec(), offset, epoch: Epoch(1) }
    }

    #[test]
    fn rows_are_placed_where_their_group_and_shard_index_say() {
        let (l, oid, map) = layout("RP_2G1", 4);
        let group: Vec<TargetId> = l.group(0).iter().map(|s| s.target).collect();
        let outside = map.targets.iter().map(|t| t.id).find(|t| !group.contains(t)).unwrap();
        assert_eq!(plan(&l, group[0]), Reclaim::Keep);
        assert_eq!(plan(&l, outside), Reclaim::Whole);
        assert!(placed_here(&l, group[1], &key(oid, b"d", None)));
        assert!(!placed_here(&l, outside, &key(oid, b"d", Some(0))));

        let (l, oid, _) = layout("EC_2P1G1", 4);
        let t: Vec<TargetId> = l.group(0).iter().map(|s| s.target).collect();
        assert_eq!(plan(&l, t[1]), Reclaim::Rows, "an EC shard may hold another index's cells");
        let cell = |i: usize| key(oid, b"d", Some(ec_rebuild::cell_offset(i, 4096)));
        assert!(placed_here(&l, t[1], &cell(1)));
        assert!(!placed_here(&l, t[1], &cell(0)), "a cell of another index was kept");
        // Single values live on data shard 0 and the parity shards only.
        assert!(placed_here(&l, t[0], &key(oid, b"d", None)));
        assert!(!placed_here(&l, t[1], &key(oid, b"d", None)));
        assert!(placed_here(&l, t[2], &key(oid, b"d", None)));
    }
}
