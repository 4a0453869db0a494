//! The replicated state of the management service and the deterministic application of
//! commands to it. Every replica applies the same commands in the same order and must reach
//! the same state: no clocks, no randomness, no I/O in here (ids and times come in commands).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use strata_placement::resource_query;
use strata_placement::{FaultDomain, PlacementMap, PoolMap, PoolTarget, TargetState};
use strata_rpc::mgmt_msg::*;
use strata_rpc::{ErrorCode, RemoteError};
use strata_types::{human_bytes, ContId, ObjectClass, PoolId, Rank, TargetId};

/// Longest pool or container label.
pub const LABEL_BYTES_MAX: usize = 127;
/// Most object ids one allocation may reserve.
pub const OID_ALLOC_MAX: u64 = 1 << 20;
/// Pool size used when `pool create` names none (capped by free space).
pub const POOL_SIZE_DEFAULT: u64 = 8 << 30;
/// Destroyed containers the service remembers for the engines to delete. Engines delete them within
/// a pass or two, so only a rank down while this many more containers were destroyed keeps
/// the data of the oldest (space, never another container's data).
pub const DESTROYED_CONTS_KEPT: usize = 4096;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MgmtState {
    pub format: u8,
    pub ranks: BTreeMap<Rank, RankInfo>,
    pub pools: BTreeMap<PoolId, PoolRecord>,
    pub conts: BTreeMap<ContId, ContInfo>,
    pub leases: BTreeMap<String, (String, u64)>,
    /// Containers destroyed (`cont destroy`, or with their pool by `pool destroy --force`),
    /// oldest first, at most `DESTROYED_CONTS_KEPT`: each engine deletes what its targets hold
    /// of them in the background (a container's id is random and never reused, so a late
    /// write to one is deleted by a later pass as well).
    #[serde(default)]
    pub destroyed_conts: Vec<(PoolId, ContId)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PoolRecord {
    pub id: PoolId,
    pub label: String,
    pub size_bytes: u64,
    pub map: PoolMap,
    /// Ranks that finished rebuild for the current map version.
    #[serde(default)]
    pub rebuilt_by: std::collections::BTreeSet<Rank>,
    /// The map version `rebuilt_by` speaks of.
    #[serde(default)]
    pub rebuilt_version: u64,
    /// Targets that failed while holding data (`UP` or `DRAIN` to `DOWN`) and whose data is
    /// not rebuilt yet: kept while `DOWN` or `UPIN` (a target reintegrated before its rebuild
    /// finished counts again if it fails again), dropped at `DOWNOUT` or `UP`. Those now
    /// `DOWN` are the failures that count against containers' redundancy factors.
    #[serde(default)]
    pub unrebuilt: BTreeSet<TargetId>,
    /// Targets a rank's death took down (from a state holding data), still down: reintegrated
    /// if that very process is heard from again (`RankReturned`). An administrator's action on
    /// a target takes it off this list (the administrator decides its state from then on).
    #[serde(default)]
    pub down_at_death: BTreeSet<TargetId>,
}

impl PoolRecord {
    /// Ranks failed at once: with a target that failed holding data, `DOWN`, not rebuilt.
    pub fn failed_ranks(&self) -> BTreeSet<Rank> {
        failed_targets(&self.map, &self.unrebuilt).iter().map(|t| t.rank).collect()
    }

    /// The distinct fault domains of the targets failed at once, at the level a group of
    /// `class` spreads over in this pool (`strata_placement::spread_domains`): no group has two
    /// shards in one of them, so a class that survives `rf` lost shards loses no data while
    /// there are at most `rf`. Ranks of one host count once when groups spread over hosts;
    /// when a group needs more nodes than there are hosts it spreads over ranks (or targets),
    /// and those are counted. A class that does not parse is counted per target (the finest
    /// level, never too few).
    pub fn failed_domains(&self, class: &str) -> BTreeSet<String> {
        let failed = failed_targets(&self.map, &self.unrebuilt);
        if failed.is_empty() {
            return BTreeSet::new();
        }
        let size = class.parse::<ObjectClass>().map_or(usize::MAX, |c| c.group_size());
        let domains = strata_placement::spread_domains(&self.map, size);
        failed.iter().map(|t| domains.get(t).cloned().unwrap_or_else(|| format!("/rank{}/tgt{}", t.rank.0, t.index))).collect()
    }
}

fn failed_targets(map: &PoolMap, unrebuilt: &BTreeSet<TargetId>) -> BTreeSet<TargetId> {
    unrebuilt.iter().filter(|t| map.target(**t).is_some_and(|x| x.state == TargetState::Down)).copied().collect()
}

fn err(code: ErrorCode, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(code, msg)
}

fn check_label(what: &str, label: &str) -> Result<(), RemoteError> {
    let ok = !label.is_empty() && label.len() <= LABEL_BYTES_MAX && label.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(err(ErrorCode::InvalidArgument, format!("{what} label '{label}' must be 1..={LABEL_BYTES_MAX} characters of letters, digits, '-', '_' or '.'")));
    }
    Ok(())
}

impl MgmtState {
    pub fn pool_by_name(&self, name: &str) -> Result<&PoolRecord, RemoteError> {
        if let Ok(id) = name.parse::<PoolId>() {
            if let Some(p) = self.pools.get(&id) {
                return Ok(p);
            }
        }
        self.pools.values().find(|p| p.label == name).ok_or_else(|| err(ErrorCode::NotFound, format!("no pool '{name}'; `strata pool list` shows the pools")))
    }

    fn pool_id(&self, name: &str) -> Result<PoolId, RemoteError> {
        Ok(self.pool_by_name(name)?.id)
    }

    /// Remember a destroyed container for the engines to delete its data (the oldest is
    /// forgotten past `DESTROYED_CONTS_KEPT`).
    fn note_destroyed(&mut self, pool: PoolId, cont: ContId) {
        self.destroyed_conts.push((pool, cont));
        let over = self.destroyed_conts.len().saturating_sub(DESTROYED_CONTS_KEPT);
        self.destroyed_conts.drain(..over);
    }

    pub fn cont_by_name(&self, pool: &str, cont: &str) -> Result<&ContInfo, RemoteError> {
        let pid = self.pool_id(pool)?;
        if let Ok(id) = cont.parse::<ContId>() {
            if let Some(c) = self.conts.get(&id).filter(|c| c.pool == pid) {
                return Ok(c);
            }
        }
        self.conts
            .values()
            .find(|c| c.pool == pid && c.label == cont)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no container '{cont}' in pool '{pool}'; `strata cont list {pool}` shows them")))
    }

    pub fn pool_info(&self, p: &PoolRecord) -> PoolInfo {
        let rank_addrs = p.map.ranks().into_iter().filter_map(|r| self.ranks.get(&r).map(|i| (r, i.data_addr.clone()))).collect();
        let pending = p.map.targets.iter().any(|t| matches!(t.state, TargetState::Down | TargetState::UpIn | TargetState::Drain | TargetState::New));
        let rebuild = pending.then(|| {
            let live = self.rebuild_ranks(p);
            let done = if p.rebuilt_version == p.map.version { live.iter().filter(|r| p.rebuilt_by.contains(r)).count() } else { 0 };
            RebuildStatus { version: p.map.version, ranks_done: done as u32, ranks_total: live.len() as u32 }
        });
        let unclean_conts = self
            .conts
            .values()
            .filter(|c| c.pool == p.id)
            .filter_map(|c| match &c.status {
                ContStatus::Unclean(reason) => Some(UncleanCont { id: c.id, label: c.label.clone(), reason: reason.clone(), rf: c.rf }),
                ContStatus::Healthy => None,
            })
            .collect();
        PoolInfo { id: p.id, label: p.label.clone(), size_bytes: p.size_bytes, map: p.map.clone(), rank_addrs, rebuild, unclean_conts }
    }

    /// Ranks that must push for a rebuild of `p`: alive, with a target holding data.
    pub fn rebuild_ranks(&self, p: &PoolRecord) -> Vec<Rank> {
        p.map.ranks().into_iter().filter(|r| self.ranks.get(r).is_some_and(|i| i.state == RankState::Joined)).filter(|r| p.map.targets.iter().any(|t| t.id.rank == *r && t.state.readable())).collect()
    }

    /// Bytes free for new pools: capacity counted once per host, minus every pool's size.
    pub fn free_bytes(&self) -> u64 {
        let mut per_host: BTreeMap<&str, u64> = BTreeMap::new();
        for r in self.ranks.values().filter(|r| r.state == RankState::Joined) {
            let e = per_host.entry(r.fault_domain.as_str()).or_default();
            *e = (*e).max(r.capacity_bytes);
        }
        let cap: u64 = per_host.values().sum();
        cap.saturating_sub(self.pools.values().map(|p| p.size_bytes).sum())
    }

    fn targets_of(&self, r: &RankInfo) -> Result<Vec<PoolTarget>, RemoteError> {
        let domain = FaultDomain::parse(&r.fault_domain).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        Ok((0..r.targets).map(|i| PoolTarget { id: TargetId { rank: r.rank, index: i }, domain: domain.clone(), labels: r.labels.clone(), state: TargetState::Up, out_since: 0 }).collect())
    }

    pub fn apply(&mut self, cmd: &MgmtCmd) -> Result<MgmtReply, RemoteError> {
        self.format = 1;
        // Containers are judged in the very command that changes a map, so no reader ever
        // sees a map with the failure but the container still healthy.
        let changes_maps = matches!(cmd, MgmtCmd::SetRankState { .. } | MgmtCmd::PoolTargets { .. } | MgmtCmd::PoolExtend { .. } | MgmtCmd::RebuildDone { .. } | MgmtCmd::RankReturned { .. });
        let before: BTreeMap<PoolId, PoolMap> = if changes_maps { self.pools.iter().map(|(id, p)| (*id, p.map.clone())).collect() } else { BTreeMap::new() };
        let versions: Vec<(PoolId, u64)> = self.pools.iter().map(|(id, p)| (*id, p.map.version)).collect();
        let reply = self.apply_cmd(cmd)?;
        if changes_maps {
            self.judge_failures(&before);
        } else {
            assert!(versions.iter().all(|(id, v)| self.pools.get(id).is_none_or(|p| p.map.version == *v)), "{cmd:?} changed a pool map without judging its failures");
        }
        Ok(reply)
    }

    /// After map changes from `before`: track the targets that failed holding data, and mark
    /// unclean every healthy container of a pool where a new failure makes the fault domains
    /// failed at once (`PoolRecord::failed_domains`, at its class's level) more than its
    /// redundancy factor. A failure after the earlier ones were rebuilt does not add to them
    /// (their targets are `DOWNOUT`, their data back on spares).
    fn judge_failures(&mut self, before: &BTreeMap<PoolId, PoolMap>) {
        for (id, old) in before {
            let Some(p) = self.pools.get_mut(id) else { continue };
            if p.map.version == old.version {
                continue;
            }
            let failed_before = failed_targets(old, &p.unrebuilt);
            for t in &p.map.targets {
                if t.state == TargetState::Down && old.target(t.id).is_some_and(|o| o.state.readable()) {
                    p.unrebuilt.insert(t.id);
                }
            }
            let map = &p.map;
            p.unrebuilt.retain(|t| map.target(*t).is_some_and(|x| matches!(x.state, TargetState::Down | TargetState::UpIn)));
            // Only a new failure judges: a container an administrator cleared stays so
            // while the failures it was cleared for are still pending.
            if failed_targets(&p.map, &p.unrebuilt).is_subset(&failed_before) {
                continue;
            }
            let p = &self.pools[id];
            let ranks: Vec<Rank> = p.failed_ranks().into_iter().collect();
            let mut domains_of: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
            for c in self.conts.values_mut().filter(|c| c.pool == *id && c.status == ContStatus::Healthy) {
                let domains = domains_of.entry(c.oclass.as_str()).or_insert_with(|| p.failed_domains(&c.oclass));
                if usize::from(c.rf) < domains.len() {
                    c.status = ContStatus::Unclean(UncleanReason { ranks: ranks.clone(), map_version: p.map.version, domains: domains.iter().cloned().collect() });
                }
            }
        }
    }

    fn apply_cmd(&mut self, cmd: &MgmtCmd) -> Result<MgmtReply, RemoteError> {
        match cmd {
            MgmtCmd::Join { uuid, mgmt_addr, data_addr, fault_domain, labels, targets, capacity_bytes, access_point } => {
                FaultDomain::parse(fault_domain).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                if *targets == 0 || *targets > 64 {
                    return Err(err(ErrorCode::InvalidArgument, format!("a rank needs 1..=64 targets, got {targets}")));
                }
                if let Some(existing) = self.ranks.values().find(|r| r.uuid != *uuid && (r.data_addr == *data_addr || (!mgmt_addr.is_empty() && r.mgmt_addr == *mgmt_addr)) && r.state != RankState::Stopped && r.state != RankState::Dead) {
                    return Err(err(ErrorCode::AlreadyExists, format!("address {data_addr} / {mgmt_addr} is already used by rank {} (a different server); give this server its own addresses", existing.rank)));
                }
                if let Some(r) = self.ranks.values_mut().find(|r| r.uuid == *uuid) {
                    if r.state == RankState::Joined && r.data_addr != *data_addr {
                        return Err(err(
                            ErrorCode::AlreadyExists,
                            format!("rank {} (server {uuid}) is already running at {}; was this directory copied from another server? If it crashed, wait until it is marked dead", r.rank, r.data_addr),
                        ));
                    }
                    // A restart: same rank, maybe new addresses; targets stay as they were.
                    r.mgmt_addr = mgmt_addr.clone();
                    r.data_addr = data_addr.clone();
                    r.capacity_bytes = *capacity_bytes;
                    if r.state != RankState::Excluded {
                        r.state = RankState::Joined;
                    }
                    return Ok(MgmtReply::Rank(r.rank));
                }
                let rank = Rank(self.ranks.keys().next_back().map_or(0, |r| r.0 + 1));
                self.ranks.insert(
                    rank,
                    RankInfo { rank, uuid: uuid.clone(), mgmt_addr: mgmt_addr.clone(), data_addr: data_addr.clone(), fault_domain: fault_domain.clone(), labels: labels.clone(), targets: *targets, capacity_bytes: *capacity_bytes, state: RankState::Joined, access_point: *access_point },
                );
                Ok(MgmtReply::Rank(rank))
            }
            MgmtCmd::SetRankState { rank, state } => {
                let r = self.ranks.get_mut(rank).ok_or_else(|| err(ErrorCode::NotFound, format!("no rank {rank}; `strata system query` lists the ranks")))?;
                r.state = *state;
                if matches!(state, RankState::Dead | RankState::Excluded) {
                    for p in self.pools.values_mut() {
                        // NEW targets hold nothing the pool needs yet, and marking them DOWN
                        // would put them in the layout as failed homes: they stay NEW, and the
                        // extension waits for the rank to come back.
                        if p.map.targets.iter().any(|t| t.id.rank == *rank && t.state != TargetState::New) {
                            if *state == RankState::Dead {
                                let holding = p.map.targets.iter().filter(|t| t.id.rank == *rank && !matches!(t.state, TargetState::New | TargetState::Down | TargetState::DownOut));
                                let ids: Vec<TargetId> = holding.map(|t| t.id).collect();
                                p.down_at_death.extend(ids);
                            }
                            p.map.set_rank_state(*rank, TargetState::Down);
                        }
                    }
                }
                Ok(MgmtReply::Done)
            }
            MgmtCmd::RankReturned { rank } => {
                let r = self.ranks.get_mut(rank).ok_or_else(|| err(ErrorCode::NotFound, format!("no rank {rank}; `strata system query` lists the ranks")))?;
                // Only from Dead: a rank excluded or stopped meanwhile stays as it was put.
                if r.state != RankState::Dead {
                    return Ok(MgmtReply::Done);
                }
                r.state = RankState::Joined;
                for p in self.pools.values_mut() {
                    let mine: Vec<TargetId> = p.down_at_death.iter().copied().filter(|t| t.rank == *rank).collect();
                    let mut next = p.map.clone();
                    for t in &mine {
                        p.down_at_death.remove(t);
                        if next.target(*t).is_some_and(|x| matches!(x.state, TargetState::Down | TargetState::DownOut)) {
                            next.set_state(*t, TargetState::UpIn).map_err(|e| err(ErrorCode::Internal, format!("reintegrating target {t:?} of returned rank {rank}: {e}")))?;
                        }
                    }
                    p.map = next;
                }
                Ok(MgmtReply::Done)
            }
            MgmtCmd::PoolCreate { id, label, size_bytes, ranks, select } => {
                check_label("pool", label)?;
                if self.pools.values().any(|p| p.label == *label) {
                    return Err(err(ErrorCode::AlreadyExists, format!("a pool named '{label}' already exists")));
                }
                let chosen: Vec<&RankInfo> = match ranks {
                    Some(list) => {
                        let mut v = Vec::new();
                        for r in list {
                            let info = self.ranks.get(r).ok_or_else(|| err(ErrorCode::NotFound, format!("no rank {r}")))?;
                            if info.state != RankState::Joined {
                                return Err(err(ErrorCode::Unavailable, format!("rank {r} is {:?}, not joined", info.state)));
                            }
                            v.push(info);
                        }
                        v
                    }
                    None => self.ranks.values().filter(|r| r.state == RankState::Joined).collect(),
                };
                if chosen.is_empty() {
                    return Err(err(ErrorCode::Unavailable, "no joined ranks to build a pool on; start servers first"));
                }
                let mut targets = Vec::new();
                for r in &chosen {
                    targets.extend(self.targets_of(r)?);
                }
                if let Some(q) = select {
                    let query = resource_query::parse(q).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                    let cands: Vec<(TargetId, BTreeMap<String, String>)> = targets.iter().map(|t| (t.id, t.attributes())).collect();
                    let keep = resource_query::select(&query, &cands, None).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                    targets.retain(|t| keep.contains(&t.id));
                    if targets.is_empty() {
                        return Err(err(ErrorCode::InvalidArgument, format!("no target satisfies --select '{q}'")));
                    }
                }
                let free = self.free_bytes();
                let size = if *size_bytes == 0 { POOL_SIZE_DEFAULT.min(free) } else { *size_bytes };
                if size == 0 || size > free {
                    return Err(err(ErrorCode::NoSpace, format!("pool '{label}' needs {} but only {} is free across the system; pass a smaller --size or add servers", human_bytes(size.max(1)), human_bytes(free))));
                }
                let map = PoolMap::new(targets).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                self.pools.insert(*id, PoolRecord { id: *id, label: label.clone(), size_bytes: size, map, rebuilt_by: Default::default(), rebuilt_version: 0, unrebuilt: BTreeSet::new(), down_at_death: BTreeSet::new() });
                Ok(MgmtReply::Pool(self.pool_info(&self.pools[id])))
            }
            MgmtCmd::PoolDestroy { pool, force } => {
                let id = self.pool_id(pool)?;
                let n = self.conts.values().filter(|c| c.pool == id).count();
                if n > 0 && !force {
                    return Err(err(ErrorCode::Conflict, format!("pool '{pool}' still has {n} container(s); destroy them or pass --force")));
                }
                let gone: Vec<ContId> = self.conts.values().filter(|c| c.pool == id).map(|c| c.id).collect();
                for c in gone {
                    self.conts.remove(&c);
                    self.note_destroyed(id, c);
                }
                self.pools.remove(&id);
                Ok(MgmtReply::Done)
            }
            MgmtCmd::PoolTargets { pool, rank, index, action } => {
                let id = self.pool_id(pool)?;
                let p = self.pools.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "pool vanished"))?;
                let ids: Vec<TargetId> = p.map.targets.iter().filter(|t| t.id.rank == *rank && index.is_none_or(|i| t.id.index == i)).map(|t| t.id).collect();
                if ids.is_empty() {
                    return Err(err(ErrorCode::NotFound, format!("pool '{pool}' has no target on rank {rank}{}", index.map(|i| format!(" index {i}")).unwrap_or_default())));
                }
                let mut next = p.map.clone();
                for t in ids {
                    p.down_at_death.remove(&t);
                    let cur = next.target(t).map(|x| x.state).unwrap_or(TargetState::Up);
                    let steps: &[TargetState] = match (action, cur) {
                        (TargetAction::Exclude, TargetState::Down | TargetState::DownOut) => &[],
                        (TargetAction::Exclude, _) => &[TargetState::Down],
                        (TargetAction::Drain, _) => &[TargetState::Drain],
                        (TargetAction::Reintegrate, TargetState::Up) => &[],
                        (TargetAction::Reintegrate, TargetState::Drain) => &[TargetState::Up],
                        (TargetAction::Reintegrate, _) => &[TargetState::UpIn],
                    };
                    for s in steps {
                        next.set_state(t, *s).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                    }
                }
                p.map = next;
                Ok(MgmtReply::Pool(self.pool_info(&self.pools[&id])))
            }
            MgmtCmd::PoolExtend { pool, ranks } => {
                let id = self.pool_id(pool)?;
                let mut add = Vec::new();
                for r in ranks {
                    let info = self.ranks.get(r).ok_or_else(|| err(ErrorCode::NotFound, format!("no rank {r}")))?;
                    add.extend(self.targets_of(info)?);
                }
                let p = self.pools.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "pool vanished"))?;
                p.map.add_targets(add).map_err(|e| err(ErrorCode::AlreadyExists, e.to_string()))?;
                Ok(MgmtReply::Pool(self.pool_info(&self.pools[&id])))
            }
            MgmtCmd::ContCreate { id, pool, label, ctype, oclass, rf, props } => {
                check_label("container", label)?;
                let pid = self.pool_id(pool)?;
                if self.conts.values().any(|c| c.pool == pid && c.label == *label) {
                    return Err(err(ErrorCode::AlreadyExists, format!("pool '{pool}' already has a container named '{label}'")));
                }
                let class: ObjectClass = oclass.parse().map_err(|e: strata_types::ObjectClassError| err(ErrorCode::InvalidArgument, e.to_string()))?;
                if class.redundancy_factor() < *rf as usize {
                    return Err(err(
                        ErrorCode::InvalidArgument,
                        format!("container redundancy factor {rf} refuses object class {class}, which survives only {} failure(s); use e.g. RP_{}G1 or EC_2P{}G1", class.redundancy_factor(), rf + 1, rf),
                    ));
                }
                let pm = PlacementMap::new(&self.pools[&pid].map, false);
                if class.group_size() > pm.usable_targets() {
                    return Err(err(ErrorCode::InvalidArgument, format!("object class {class} needs {} targets but pool '{pool}' has {}", class.group_size(), pm.usable_targets())));
                }
                // Born healthy even while ranks are failed: what it gets is written to the
                // places the current map gives, and only a later failure can take it.
                let info = ContInfo { id: *id, pool: pid, label: label.clone(), ctype: *ctype, oclass: class.to_string(), rf: *rf, props: props.clone(), snapshots: BTreeMap::new(), next_oid: 1, status: ContStatus::Healthy };
                self.conts.insert(*id, info.clone());
                Ok(MgmtReply::Cont(info))
            }
            MgmtCmd::ContDestroy { pool, cont } => {
                let (id, pid) = {
                    let c = self.cont_by_name(pool, cont)?;
                    (c.id, c.pool)
                };
                self.conts.remove(&id);
                self.note_destroyed(pid, id);
                Ok(MgmtReply::Done)
            }
            MgmtCmd::SnapshotCreate { pool, cont, name, epoch } => {
                check_label("snapshot", name)?;
                let id = self.cont_by_name(pool, cont)?.id;
                let c = self.conts.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "container vanished"))?;
                if c.snapshots.contains_key(name) {
                    return Err(err(ErrorCode::AlreadyExists, format!("container '{cont}' already has a snapshot '{name}'")));
                }
                c.snapshots.insert(name.clone(), *epoch);
                Ok(MgmtReply::Cont(c.clone()))
            }
            MgmtCmd::SnapshotDestroy { pool, cont, name } => {
                let id = self.cont_by_name(pool, cont)?.id;
                let c = self.conts.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "container vanished"))?;
                c.snapshots.remove(name).ok_or_else(|| err(ErrorCode::NotFound, format!("no snapshot '{name}' in container '{cont}'")))?;
                Ok(MgmtReply::Done)
            }
            MgmtCmd::AllocOids { pool, cont, count } => {
                if *count == 0 || *count > OID_ALLOC_MAX {
                    return Err(err(ErrorCode::InvalidArgument, format!("allocate 1..={OID_ALLOC_MAX} object ids at a time")));
                }
                let id = self.cont_by_name(pool, cont)?.id;
                let c = self.conts.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "container vanished"))?;
                let first = c.next_oid;
                c.next_oid += count;
                Ok(MgmtReply::OidRange { first, count: *count })
            }
            MgmtCmd::LeaseAcquire { key, holder, now_ms, ttl_ms } => {
                if let Some((h, exp)) = self.leases.get(key) {
                    if h != holder && *exp > *now_ms {
                        return Err(err(ErrorCode::Conflict, format!("{key} is held by {h} for another {} ms", exp - now_ms)));
                    }
                }
                self.leases.insert(key.clone(), (holder.clone(), now_ms + ttl_ms));
                Ok(MgmtReply::Lease { holder: holder.clone(), expires_ms: now_ms + ttl_ms })
            }
            MgmtCmd::RebuildDone { pool, version, rank } => {
                let live = match self.pools.get(pool) {
                    Some(p) => self.rebuild_ranks(p),
                    None => return Err(err(ErrorCode::NotFound, format!("no pool {pool}"))),
                };
                let p = self.pools.get_mut(pool).ok_or_else(|| err(ErrorCode::NotFound, format!("no pool {pool}")))?;
                if p.map.version != *version {
                    // A report for an older map: rebuild restarts on the newer one.
                    return Ok(MgmtReply::Done);
                }
                if p.rebuilt_version != *version {
                    p.rebuilt_by.clear();
                    p.rebuilt_version = *version;
                }
                p.rebuilt_by.insert(*rank);
                if live.iter().all(|r| p.rebuilt_by.contains(r)) {
                    // Rebuilt: DOWN targets are out for good; resynced UPIN targets serve again.
                    // Extension comes after: engines rebalance onto NEW targets only once no
                    // other movement is pending, so NEW targets join only on a report for a map
                    // without any.
                    let rebuilding = p.map.movement_pending();
                    let moves: Vec<(TargetId, TargetState)> = p
                        .map
                        .targets
                        .iter()
                        .filter_map(|t| match t.state {
                            TargetState::Down | TargetState::Drain => Some((t.id, TargetState::DownOut)),
                            TargetState::UpIn => Some((t.id, TargetState::Up)),
                            TargetState::New if !rebuilding => Some((t.id, TargetState::Up)),
                            _ => None,
                        })
                        .collect();
                    for (t, s) in moves {
                        p.map.set_state(t, s).map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
                    }
                    p.rebuilt_by.clear();
                }
                Ok(MgmtReply::Done)
            }
            MgmtCmd::LeaseRelease { key, holder } => {
                if self.leases.get(key).is_some_and(|(h, _)| h == holder) {
                    self.leases.remove(key);
                }
                Ok(MgmtReply::Done)
            }
            MgmtCmd::SetProp { pool, cont, key, value } => {
                let id = self.cont_by_name(pool, cont)?.id;
                let c = self.conts.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "container vanished"))?;
                c.props.insert(key.clone(), value.clone());
                Ok(MgmtReply::Cont(c.clone()))
            }
            MgmtCmd::ContMarkHealthy { pool, cont } => {
                let id = self.cont_by_name(pool, cont)?.id;
                let c = self.conts.get_mut(&id).ok_or_else(|| err(ErrorCode::NotFound, "container vanished"))?;
                c.status = ContStatus::Healthy;
                Ok(MgmtReply::Cont(c.clone()))
            }
        }
    }
}
