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
const SPARE_SALT: u64 = 0x5350_4152_45;

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
    /// Healthy targets (in layout), for spares.
    healthy: Vec<u32>,
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
        let mut healthy = Vec::new();
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
            if state.in_layout() {
                healthy.push(ti as u32);
            }
        }
        let usable = levels.last().map_or(0, |l| l.len());
        PlacementMap { version: map.version, targets, nodes, levels, chains, healthy, members, usable }
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
            // Replace shards on unhealthy targets by spares, leaving the others in place.
            let mut cur: Vec<u32> = homes.clone();
            // In the order the homes left the layout: an older spare (filled by an earlier
            // rebuild) is never taken by a newer failure, which matters most for EC, whose
            // cells of different shards share record keys. The order survives DOWN -> DOWNOUT,
            // so finishing a rebuild moves no spare (nothing would refill it).
            let mut order: Vec<usize> = (0..size).filter(|&i| !self.targets[homes[i] as usize].1.in_layout()).collect();
            order.sort_by_key(|&i| (self.targets[homes[i] as usize].2, i));
            for i in order {
                let idx = gstart + i;
                // `cur` holds the homes and the spares of shards that left earlier: a newer
                // failure never changes this shard's spare.
                let spare = self.spare(oh, g, i, spread, &homes, &cur)?;
                cur[i] = spare;
                shards[idx].target = self.targets[spare as usize].0;
                shards[idx].is_spare = true;
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

    /// A healthy target not already in the group, preferring the spread-level domain that
    /// holds the fewest of the group's other shards where they sit now (`assigned`: homes
    /// still in place and the spares of shards that left earlier). With as many domains as
    /// shards every domain holds one, so this is what stops a third failure from taking three
    /// shards of an EC_4P2 group: two spares never share a domain while another has room.
    fn spare(&self, oh: u64, g: usize, i: usize, spread: usize, group: &[u32], assigned: &[u32]) -> Result<u32, PlacementError> {
        if self.healthy.is_empty() {
            return Err(PlacementError::NoSpare { oid: format!("{oh:x}"), group: g, shard: i });
        }
        let taken = group;
        let others: Vec<u32> = assigned.iter().enumerate().filter(|(j, _)| *j != i).filter_map(|(_, &t)| self.chains[t as usize].get(spread).copied()).collect();
        let load = |d: u32| others.iter().filter(|x| **x == d).count();
        let mut best: Option<(usize, u32)> = None;
        // Candidates come from a sequence over the placement's targets that depends only on
        // the shard, and `assigned` holds only shards that left the layout before this one
        // (spares are assigned in `out_since` order), so the spare changes only if the spare
        // itself fails or an older shard comes back: newer failures leave it in place (and
        // with it the data rebuild put there).
        for attempt in 0..ATTEMPTS_MAX {
            let cand = self.members[jump(shard_key(oh, g as u32, i as u32, attempt, SPARE_SALT), self.members.len() as u32) as usize];
            let usable = self.targets[cand as usize].1.in_layout();
            if !usable || taken.contains(&cand) || assigned.contains(&cand) {
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
            .or_else(|| self.healthy.iter().copied().find(|c| !taken.contains(c) && !assigned.contains(c)))
            .ok_or(PlacementError::NoSpare { oid: format!("{oh:x}"), group: g, shard: i })
    }
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
