//! Background aggregation: every `interval`, each target of this rank merges away versions no
//! reader can need any more (`Vos::aggregate_step`), in bounded steps paced to a byte rate so
//! foreground I/O stays responsive.
//!
//! The bound (`aggregation_upto`): the engine's clock minus `margin`, per container, keeping
//! every snapshot the management service lists for it (container snapshots: block volume
//! snapshots and clone parents, KV snapshots, `fs --snapshot`). Why that is enough:
//! - Readers at a recent epoch (a KV transaction's read epoch, a block or fs read racing a
//!   write) read above `now - margin`; one older than the margin that is not at a snapshot is
//!   refused by VOS (`VosError::Aggregated`), never answered from partial history.
//! - Snapshots are taken at an epoch at least every engine's clock (`max_epoch`), so one
//!   created after this pass fetched the list is above `upto`; the margin covers the time
//!   between a snapshot's epoch and its registration (block snapshots wait for the wall clock)
//!   and clock drift between engines (`HLC_MAX_DRIFT_MS_DEFAULT`, 500 ms).
//! - Writes that land below `upto` later need no fence: KV versions resolved at an old commit
//!   epoch (prepared-but-unresolved intents), block writes stamped by a slow client, rebuild
//!   imports. VOS keeps every row a kept read point can return, including extent punch rows
//!   that own bytes, so such a row changes those reads exactly as it would have without
//!   aggregation (the VOS model test writes late on purpose).
//! - Pools with data movement under way (targets `DOWN`, `UPIN`, `DRAIN`, `NEW`) are skipped: rebuild
//!   has the disk, and EC rebuild decodes each stripe version from k shards, which it can only
//!   do for versions no shard has aggregated away yet.
//!
//! Work: a container is looked at only when it got writes at or below `upto` since the last
//! pass, or its snapshot list changed (`Vos::aggregation_due`).

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug)]
pub struct AggregationConfig {
    /// Time between passes; zero turns background aggregation off.
    pub interval: Duration,
    /// How far below the engine's clock a pass stays.
    pub margin: Duration,
    /// Most stored bytes per second a pass reads to examine versions (0: no limit).
    pub bytes_per_s: u64,
    /// Most records one step examines before it yields.
    pub step_records_max: u64,
    /// Most records per second a pass examines (0: no limit): index rows of extent-file
    /// extents are tiny, so a byte rate alone would let a pass run flat out.
    pub records_per_s: u64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig { interval: Duration::from_secs(10), margin: Duration::from_secs(30), bytes_per_s: 64 << 20, step_records_max: 2048, records_per_s: 20_000 }
    }
}

/// Most stored bytes one step reads before it yields.
const STEP_BYTES_MAX: u64 = 16 << 20;
/// The margin may not be shorter than this: clock drift between engines plus the time a
/// snapshot takes from picking its epoch to being listed.
pub const AGGREGATION_MARGIN_MS_MIN: u64 = 2 * strata_types::HLC_MAX_DRIFT_MS_DEFAULT;

#[derive(Default)]
pub(super) struct AggregationCounters {
    passes: AtomicU64,
    containers: AtomicU64,
    records_examined: AtomicU64,
    bytes_examined: AtomicU64,
    records_removed: AtomicU64,
    bytes_reclaimed: AtomicU64,
    skipped_for_movement: AtomicU64,
    errors: AtomicU64,
    last_upto: AtomicU64,
    destroyed_containers: AtomicU64,
    destroyed_bytes: AtomicU64,
}

impl AggregationCounters {
    fn add(&self, s: &strata_vos::AggregateStats) {
        self.records_examined.fetch_add(s.records_examined, Ordering::Relaxed);
        self.bytes_examined.fetch_add(s.bytes_examined, Ordering::Relaxed);
        self.records_removed.fetch_add(s.records_removed, Ordering::Relaxed);
        self.bytes_reclaimed.fetch_add(s.bytes_reclaimed, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> AggregationStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AggregationStats {
            passes: g(&self.passes),
            containers_aggregated: g(&self.containers),
            records_examined: g(&self.records_examined),
            bytes_examined: g(&self.bytes_examined),
            records_removed: g(&self.records_removed),
            bytes_reclaimed: g(&self.bytes_reclaimed),
            pools_skipped_for_movement: g(&self.skipped_for_movement),
            errors: g(&self.errors),
            last_upto: Epoch(g(&self.last_upto)),
            destroyed_containers_deleted: g(&self.destroyed_containers),
            destroyed_bytes_deleted: g(&self.destroyed_bytes),
        }
    }
}

/// The epoch a pass may aggregate up to: `margin` of physical time below `now`.
pub fn aggregation_upto(now: Epoch, margin: Duration) -> Epoch {
    let ms = now.physical_ms().saturating_sub(margin.as_millis().min(u64::MAX as u128) as u64);
    Epoch::from_parts(ms, 0)
}

/// Whether a pool's map has data movement under way (then it is not aggregated).
pub fn movement_under_way(map: &PoolMap) -> bool {
    use strata_placement::TargetState as TS;
    map.targets.iter().any(|t| matches!(t.state, TS::Down | TS::UpIn | TS::Drain | TS::New))
}

/// The epochs a container's snapshots pin.
pub fn retained_epochs(info: &strata_rpc::mgmt_msg::ContInfo) -> Vec<Epoch> {
    let mut r: Vec<Epoch> = info.snapshots.values().copied().collect();
    r.sort();
    r.dedup();
    r
}

impl Engine {
    /// One background pass over every pool this rank serves; returns what it removed.
    pub async fn aggregate_tick(&self) -> strata_vos::AggregateStats {
        let cfg = self.aggregation.clone();
        let mut total = strata_vos::AggregateStats::default();
        let pools: Vec<Arc<PoolView>> = self.pools.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let moving: Vec<PoolId> = pools.iter().filter(|v| movement_under_way(&v.map)).map(|v| v.map_pool_id).collect();
        self.delete_destroyed_containers(&moving).await;
        for view in pools {
            if moving.contains(&view.map_pool_id) {
                self.agg_counters.skipped_for_movement.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let conts = match self.mgmt.query(MgmtQuery::Conts { pool: view.map_pool_id.to_string() }).await {
                Ok(strata_rpc::mgmt_msg::MgmtReply::Conts(c)) => c,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(pool = %view.map_pool_id, error = %e, "aggregation: cannot list containers");
                    continue;
                }
            };
            for (i, vos) in self.targets.iter().enumerate() {
                if view.map.target(TargetId { rank: self.rank, index: i as u16 }).is_none() {
                    continue;
                }
                let v = vos.clone();
                let Ok(Ok(on_target)) = tokio::task::spawn_blocking(move || v.list_containers()).await else { continue };
                for info in conts.iter().filter(|c| on_target.contains(&c.id)) {
                    let retained = retained_epochs(info);
                    match self.aggregate_container(vos, info.id, &retained, &cfg).await {
                        Ok(Some(s)) => {
                            total.add(&s);
                            self.agg_counters.containers.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.agg_counters.errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(cont = %info.id, error = %e, "aggregation pass failed; the container stays due");
                        }
                    }
                }
            }
        }
        self.agg_counters.passes.fetch_add(1, Ordering::Relaxed);
        total
    }

    /// Delete what this rank's targets hold of destroyed containers (of live pools and of
    /// pools destroyed with them), except those of pools in `moving` (data movement under way
    /// reads and pushes containers; a later pass deletes them). Only the management service's
    /// list of destroyed containers is trusted, never the absence of a container from its list
    /// of live ones (a list read before a container's creation lacks it). From this pass on,
    /// client updates to any destroyed container are refused; rows that still reach one (a
    /// rebuild import, a KV write, an update admitted before this pass) are deleted by a later
    /// pass.
    async fn delete_destroyed_containers(&self, moving: &[PoolId]) {
        let destroyed: Vec<strata_types::ContId> = match self.mgmt.query(MgmtQuery::DestroyedConts).await {
            Ok(strata_rpc::mgmt_msg::MgmtReply::DestroyedConts(list)) => {
                *self.destroyed.write().unwrap_or_else(|e| e.into_inner()) = list.iter().map(|(_, c)| *c).collect();
                list.into_iter().filter(|(p, _)| !moving.contains(p)).map(|(_, c)| c).collect()
            }
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list destroyed containers");
                return;
            }
        };
        if destroyed.is_empty() {
            return;
        }
        for (i, vos) in self.targets.iter().enumerate() {
            let (v, ids) = (vos.clone(), destroyed.clone());
            let deleted = tokio::task::spawn_blocking(move || -> Result<Vec<(strata_types::ContId, strata_vos::ReclaimStats)>, VosError> {
                let held = v.list_containers()?;
                ids.into_iter().filter(|c| held.contains(c)).map(|c| Ok((c, v.destroy_container(c)?))).collect()
            })
            .await;
            match deleted {
                Ok(Ok(list)) => {
                    for (cont, s) in list {
                        self.agg_counters.destroyed_containers.fetch_add(1, Ordering::Relaxed);
                        self.agg_counters.destroyed_bytes.fetch_add(s.bytes, Ordering::Relaxed);
                        tracing::info!(%cont, target = i, records = s.records, bytes = s.bytes, "deleted a destroyed container's data");
                    }
                }
                Ok(Err(e)) => {
                    self.agg_counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target = i, error = %e, "deleting destroyed containers failed; the next pass tries again");
                }
                Err(e) => tracing::warn!(target = i, error = %e, "deleting destroyed containers stopped"),
            }
        }
    }

    /// Aggregate one container of one target to its end, step by step; `None` if not due.
    async fn aggregate_container(&self, vos: &Arc<Vos>, cont: strata_types::ContId, retained: &[Epoch], cfg: &AggregationConfig) -> Result<Option<strata_vos::AggregateStats>, VosError> {
        let now = self.hlc.now().map_err(|e| VosError::Engine(e.to_string()))?;
        let upto = aggregation_upto(now, cfg.margin);
        if !vos.aggregation_due(cont, upto, retained) {
            return Ok(None);
        }
        let limits = strata_vos::AggregateLimits { records_max: cfg.step_records_max.max(1), bytes_max: STEP_BYTES_MAX };
        let mut stats = strata_vos::AggregateStats::default();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let (v, r, f) = (vos.clone(), retained.to_vec(), from.take());
            let step = tokio::task::spawn_blocking(move || v.aggregate_step(cont, upto, &r, f.as_deref(), limits)).await.map_err(|e| VosError::Engine(e.to_string())).and_then(|r| r);
            let step = match step {
                Ok(s) => s,
                Err(e) => {
                    vos.aggregation_failed(cont);
                    return Err(e);
                }
            };
            self.agg_counters.add(&step.stats);
            stats.add(&step.stats);
            let by_bytes = if cfg.bytes_per_s > 0 { step.stats.bytes_examined as f64 / cfg.bytes_per_s as f64 } else { 0.0 };
            let by_records = if cfg.records_per_s > 0 { step.stats.records_examined as f64 / cfg.records_per_s as f64 } else { 0.0 };
            tokio::time::sleep(Duration::from_secs_f64(by_bytes.max(by_records))).await;
            match step.next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        // Only a finished pass counts: a reader polling `last_upto` then sees its deletions too.
        self.agg_counters.last_upto.fetch_max(upto.0, Ordering::Relaxed);
        if stats.records_removed > 0 {
            tracing::debug!(%cont, upto = %upto, removed = stats.records_removed, bytes = stats.bytes_reclaimed, "aggregated");
        }
        Ok(Some(stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upto_stays_a_margin_below_the_clock() {
        let now = Epoch::from_parts(100_000, 77);
        let u = aggregation_upto(now, Duration::from_secs(30));
        assert_eq!(u, Epoch::from_parts(70_000, 0));
        assert!(u < now);
        // Every epoch of the same millisecond as `upto`'s, or later, is not aggregated away.
        assert!(Epoch::from_parts(70_000, 1) > u);
        assert_eq!(aggregation_upto(Epoch::from_parts(10, 3), Duration::from_secs(30)), Epoch::ZERO, "young clocks aggregate nothing");
    }

    #[test]
    fn pools_with_movement_are_not_aggregated() {
        use strata_placement::{FaultDomain, PoolMap, PoolTarget, TargetState};
        let t = |rank: u32, state| PoolTarget { id: TargetId { rank: Rank(rank), index: 0 }, domain: FaultDomain::parse(&format!("/h{rank}")).unwrap(), labels: Default::default(), state, out_since: 0 };
        let mut map = PoolMap { format: 1, version: 1, targets: vec![t(0, TargetState::Up), t(1, TargetState::Up), t(2, TargetState::DownOut)] };
        assert!(!movement_under_way(&map), "settled failures do not block aggregation");
        for s in [TargetState::Down, TargetState::UpIn, TargetState::Drain, TargetState::New] {
            map.targets[1].state = s;
            assert!(movement_under_way(&map), "{s:?} means data is moving");
        }
    }

    #[test]
    fn every_snapshot_of_a_container_is_retained() {
        let info = strata_rpc::mgmt_msg::ContInfo {
            id: strata_types::ContId::new_random(),
            pool: PoolId::new_random(),
            label: "c".into(),
            ctype: strata_rpc::mgmt_msg::ContType::Block,
            oclass: "S1".into(),
            rf: 0,
            props: Default::default(),
            snapshots: [("blk.v.s1".to_owned(), Epoch(30)), ("kv-nightly".to_owned(), Epoch(10)), ("again".to_owned(), Epoch(30))].into_iter().collect(),
            next_oid: 1,
            status: Default::default(),
        };
        assert_eq!(retained_epochs(&info), vec![Epoch(10), Epoch(30)]);
    }
}
