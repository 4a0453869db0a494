//! Layouts: where every shard of an object lives, computed from (pool map, oid) alone.
//!
//! Algorithm. The map's targets form a tree: fault-domain components (outermost first), then
//! rank, then target. For a class with `s` shards per group we pick the **spread level**: the
//! highest level of the tree with at least `s` nodes (host before rank before target). For
//! shard `i` of group `g` of an object, jump consistent hash over the nodes of that level
//! (in order of first appearance in the map, which extend only appends to) picks a node,
//! retrying with the next attempt number until the node is not used by the group's earlier
//! shards; then jump hash descends through its children to one target. So:
//! - the shards of a group sit on distinct nodes of the spread level;
//! - the layout ignores target states, so excluding a target changes nothing but the shards
//!   that were on it, which move to a deterministic **spare** (another jump hash over the
//!   healthy targets, avoiding the group's other domains); reintegration restores them;
//! - extend appends nodes, and jump hash moves only about the added fraction of shards.
//!
//! `NEW` targets are left out unless the map is built with `include_new` (rebalance computes
//! both and moves the difference).

use crate::error::PlacementError;
use crate::jump_hash::{jump, mix, shard_key};
use crate::pool_map::{PoolMap, TargetState};
use std::collections::HashMap;
use strata_types::{ObjectClass, Oid, TargetId};
use xxhash_rust::xxh3::xxh3_64;

/// Attempts at finding a distinct node or a spare before giving up.
const ATTEMPTS_MAX: u32 = 256;
const SPARE_SALT: u64 = 0x0053_5041_5245;

struct Node {
    children: Vec<u32>,
    /// Index into the pool map's target list, for leaves.
    target: u32,
}

/// A pool map prepared for fast layout computation. Build once per map version.
pub struct PlacementMap {
    version: u64,
    /// Per target: id, state, and the map version at which it left the layout.
    targets: Vec<(TargetId, TargetState, u64)>,
    nodes: Vec<Node>,
    /// Node ids per tree depth (0 = outermost domain level), in order of first appearance.
    levels: Vec<Vec<u32>>,
    /// For each target index: its node at every depth (for domain distinctness of spares).
    chains: Vec<Vec<u32>>,
    /// Targets taking part in this placement (all but excluded `NEW` ones), in map order: the
    /// range spare candidates are drawn from, so adding `NEW` targets moves no spare until
    /// they join.
    members: Vec<u32>,
    usable: usize,
}

/// One shard of a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLoc {
    pub target: TargetId,
    /// The target the layout gives this shard when every target is healthy.
    pub home: TargetId,
    /// True if `target` is a spare standing in for an unhealthy `home`.
    pub is_spare: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub class: ObjectClass,
    pub map_version: u64,
    group_size: usize,
    shards: Vec<ShardLoc>,
}

impl Layout {
    pub fn group_count(&self) -> usize {
        self.shards.len() / self.group_size
    }
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    pub fn group(&self, g: usize) -> &[ShardLoc] {
        &self.shards[g * self.group_size..(g + 1) * self.group_size]
    }
    pub fn groups(&self) -> impl Iterator<Item = &[ShardLoc]> {
        self.shards.chunks(self.group_size)
    }
    pub fn shards(&self) -> &[ShardLoc] {
        &self.shards
    }
    /// The group holding `dkey`: stable for the life of the object.
    pub fn group_for_dkey(&self, dkey: &[u8]) -> usize {
        group_for_dkey(dkey, self.group_count())
    }
}

/// The group of a dkey among `groups` groups.
pub fn group_for_dkey(dkey: &[u8], groups: usize) -> usize {
    jump(xxh3_64(dkey), groups as u32) as usize
}

impl PlacementMap {
    /// Prepare `map`; `NEW` targets take part only if `include_new`.
    pub fn new(map: &PoolMap, include_new: bool) -> PlacementMap {
        let mut nodes = vec![Node { children: Vec::new(), target: u32::MAX }];
        let mut index: HashMap<(u32, String), u32> = HashMap::new();
        let depth = map.targets.iter().map(|t| t.domain.0.len()).max().unwrap_or(0) + 2;
        let mut levels: Vec<Vec<u32>> = vec![Vec::new(); depth];
        let mut chains: Vec<Vec<u32>> = vec![Vec::new(); map.targets.len()];
        let mut targets = Vec::with_capacity(map.targets.len());
        let mut members = Vec::new();
        for (ti, t) in map.targets.iter().enumerate() {
            // The map after extension: NEW targets hold their places as if UP.
            let state = if t.state == TargetState::New && include_new { TargetState::Up } else { t.state };
            targets.push((t.id, state, t.out_since));
            if state == TargetState::New {
                continue;
            }
            members.push(ti as u32);
            // Pad short domain paths so every leaf sits at the same depth.
            let mut path: Vec<String> = t.domain.0.clone();
            while path.len() + 2 < depth {
                path.insert(0, String::new());
            }
            path.push(format!("rank{}", t.id.rank.0));
            path.push(format!("tgt{}", t.id.index));
            let mut parent = 0u32;
            let mut chain = Vec::with_capacity(depth);
            for (d, comp) in path.into_iter().enumerate() {
                let key = (parent, comp);
                let id = match index.get(&key) {
                    Some(&id) => id,
                    None => {
                        let id = nodes.len() as u32;
                        nodes.push(Node { children: Vec::new(), target: u32::MAX });
                        nodes[parent as usize].children.push(id);
                        levels[d].push(id);
                        index.insert(key, id);
                        id
                    }
                };
                chain.push(id);
                parent = id;
            }
            nodes[parent as usize].target = ti as u32;
            chains[ti] = chain;
        }
        let usable = levels.last().map_or(0, |l| l.len());
        PlacementMap { version: map.version, targets, nodes, levels, chains, members, usable }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Targets taking part in layouts (all states but `NEW`, unless included).
    pub fn usable_targets(&self) -> usize {
        self.usable
    }

    /// The layout of `oid`, whose class is encoded in it.
    pub fn layout(&self, oid: Oid) -> Result<Layout, PlacementError> {
        let class = oid.class().map_err(|_| PlacementError::BadOid(oid.to_string()))?;
        self.layout_with_class(oid, class)
    }

    pub fn layout_with_class(&self, oid: Oid, class: ObjectClass) -> Result<Layout, PlacementError> {
        let size = class.group_size();
        if size > self.usable {
            return Err(PlacementError::ClassDoesNotFit { class: class.to_string(), needed: size, have: self.usable });
        }
        let groups = match class.resolve_groups(self.usable) {
            Some(g) => g,
            None => {
                let g = match class.groups() {
                    strata_types::GroupCount::Fixed(g) => g as usize,
                    strata_types::GroupCount::Max => 1,
                };
                return Err(PlacementError::GroupsDoNotFit { class: class.to_string(), groups: g, needed: g * size, have: self.usable });
            }
        };
        // The highest level with enough distinct nodes for one group.
        let spread = self.levels.iter().position(|l| l.len() >= size).unwrap_or(self.levels.len() - 1);
        let level = &self.levels[spread];
        let oh = mix(oid.hi) ^ oid.lo.rotate_left(17);
        let mut shards = Vec::with_capacity(groups * size);
        let mut used: Vec<u32> = Vec::with_capacity(size);
        let mut homes: Vec<u32> = Vec::with_capacity(size);
        for g in 0..groups {
            used.clear();
            homes.clear();
            let gstart = shards.len();
            for i in 0..size {
                let mut chosen = None;
                for attempt in 0..ATTEMPTS_MAX {
                    let node = level[jump(shard_key(oh, g as u32, i as u32, attempt, spread as u64), level.len() as u32) as usize];
                    if !used.contains(&node) {
                        chosen = Some(node);
                        break;
                    }
                }
                // Linear probe as the last resort keeps the result deterministic.
                let node = chosen.unwrap_or_else(|| *level.iter().find(|n| !used.contains(n)).unwrap_or(&level[0]));
                used.push(node);
                let leaf = self.descend(node, shard_key(oh, g as u32, i as u32, 0, 0xdead));
                let ti = self.nodes[leaf as usize].target as usize;
                homes.push(ti as u32);
                let home = self.targets[ti].0;
                shards.push(ShardLoc { target: home, home, is_spare: false });
            }
            // Replace shards on unhealthy targets by spares, replaying the departures in the
            // order they happened (`out_since`): at each one, only the shards whose current
            // place left then take a new spare, seeing where every other shard sits at that
            // point. So a spare moves only if the spare itself leaves: neither finishing a
            // rebuild (DOWN -> DOWNOUT keeps `out_since`) nor a newer failure, including one
            // that takes an older shard's spare, moves or takes a filled spare. For EC that
            // would be corruption: the cells of different shards share record keys.
            let mut cur: Vec<u32> = homes.clone();
            let out_at = |t: u32| {
                let (_, state, since) = self.targets[t as usize];
                (!state.in_layout()).then_some(since)
            };
            while let Some(at) = cur.iter().filter_map(|&t| out_at(t)).min() {
                for i in 0..size {
                    if out_at(cur[i]) != Some(at) {
                        continue;
                    }
                    let spare = self.spare(oh, g, i, spread, &homes, &cur, at)?;
                    // Termination: the spare is healthy or left after `at`.
                    debug_assert!(out_at(spare).is_none_or(|s| s > at));
                    cur[i] = spare;
                    let idx = gstart + i;
                    shards[idx].target = self.targets[spare as usize].0;
                    shards[idx].is_spare = true;
                }
            }
        }
        debug_assert_eq!(shards.len(), groups * size);
        Ok(Layout { class, map_version: self.version, group_size: size, shards })
    }

    fn descend(&self, mut node: u32, key: u64) -> u32 {
        let mut k = key;
        loop {
            let n = &self.nodes[node as usize];
            if n.children.is_empty() {
                return node;
            }
            k = mix(k);
            node = n.children[jump(k, n.children.len() as u32) as usize];
        }
    }

    /// A spare for shard `i` chosen when its place left the layout at map version `at`: a
    /// target that was healthy then (in the layout now, or left after `at`), not already in
    /// the group, preferring the spread-level domain that holds the fewest of the group's other
    /// shards where they sat then (`assigned`). With as many domains as shards every domain
    /// holds one, so this is what stops a third failure from taking three shards of an EC_4P2
    /// group: two spares never share a domain while another has room.
    #[allow(clippy::too_many_arguments)]
    fn spare(&self, oh: u64, g: usize, i: usize, spread: usize, group: &[u32], assigned: &[u32], at: u64) -> Result<u32, PlacementError> {
        let healthy_then = |t: u32| {
            let (_, state, since) = self.targets[t as usize];
            state.in_layout() || since > at
        };
        let taken = group;
        let others: Vec<u32> = assigned.iter().enumerate().filter(|(j, _)| *j != i).filter_map(|(_, &t)| self.chains[t as usize].get(spread).copied()).collect();
        let load = |d: u32| others.iter().filter(|x| **x == d).count();
        let mut best: Option<(usize, u32)> = None;
        // Candidates come from a sequence over the placement's targets that depends only on
        // the shard, and what the choice sees is fixed once the departure at `at` is replayed,
        // so later departures do not change it.
        for attempt in 0..ATTEMPTS_MAX {
            let cand = self.members[jump(shard_key(oh, g as u32, i as u32, attempt, SPARE_SALT), self.members.len() as u32) as usize];
            if !healthy_then(cand) || taken.contains(&cand) || assigned.contains(&cand) {
                continue;
            }
            let l = self.chains[cand as usize].get(spread).copied().map_or(usize::MAX, load);
            if l == 0 {
                return Ok(cand);
            }
            if best.is_none_or(|(b, _)| l < b) {
                best = Some((l, cand));
            }
        }
        best.map(|(_, c)| c)
            .or_else(|| self.members.iter().copied().find(|&c| healthy_then(c) && !taken.contains(&c) && !assigned.contains(&c)))
            .ok_or(PlacementError::NoSpare { oid: format!("{oh:x}"), group: g, shard: i })
    }
}

/// Where shard `idx` of a group (`s`, from the current layout) can be read from, if anywhere:
/// a target that holds the group's full data for it. A replica in its home place does (unless
/// reintegrating: `UPIN` may have missed writes); a draining home does while its spare is
/// filled; a spare does once rebuild for its home finished and it is the spare rebuild
/// filled: while newer movement is pending, the same shard's spare in the settled layout
/// (`settled_group`, from `PoolMap::settled`; for replicas any filled spare will do, since
/// replicas are alike). Readers, EC read-modify-write and EC rebuild decode only from these: a
/// new spare holds only what was written since it became one.
pub fn read_source(map: &PoolMap, settled_group: Option<&[ShardLoc]>, idx: usize, s: &ShardLoc, replicated: bool) -> Option<TargetId> {
    let state = |t: TargetId| map.target(t).map(|x| x.state);
    if !s.is_spare {
        return state(s.target).is_some_and(|x| x.readable()).then_some(s.target);
    }
    if state(s.home) == Some(TargetState::Drain) {
        return Some(s.home);
    }
    let filled = match settled_group {
        None => state(s.home) == Some(TargetState::DownOut),
        Some(g) if replicated => g.iter().any(|x| x.is_spare && x.target == s.target),
        Some(g) => g.get(idx).is_some_and(|x| x.is_spare && x.target == s.target),
    };
    (filled && state(s.target).is_some_and(|x| x.readable())).then_some(s.target)
}

/// One shard that lives on a different target under `new` than under `old`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMove {
    pub group: usize,
    pub shard: usize,
    pub from: TargetId,
    pub to: TargetId,
}

/// The shards of `oid` that move between two maps (rebuild, reintegration, rebalance).
pub fn diff_layouts(old: &PlacementMap, new: &PlacementMap, oid: Oid) -> Result<Vec<ShardMove>, PlacementError> {
    let a = old.layout(oid)?;
    let b = new.layout(oid)?;
    if a.group_count() != b.group_count() {
        // A GX object whose group count changed: every shard is compared by position.
        let n = a.shards.len().min(b.shards.len());
        return Ok((0..n)
            .filter(|&k| a.shards[k].target != b.shards[k].target)
            .map(|k| ShardMove { group: k / b.group_size, shard: k % b.group_size, from: a.shards[k].target, to: b.shards[k].target })
            .collect());
    }
    Ok(a.shards
        .iter()
        .zip(&b.shards)
        .enumerate()
        .filter(|(_, (x, y))| x.target != y.target)
        .map(|(k, (x, y))| ShardMove { group: k / a.group_size, shard: k % a.group_size, from: x.target, to: y.target })
        .collect())
}
