//! The pool map: the versioned list of a pool's targets with their fault domains, labels and
//! states. Every change goes through a checked transition and bumps the version; engines fence
//! requests by it.

use crate::error::PlacementError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use strata_types::{Rank, TargetId};

pub const POOL_MAP_FORMAT_V1: u8 = 1;

/// States of a target in a pool (DAOS's pool-map states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetState {
    /// Serving its shards.
    Up,
    /// Being reintegrated: in the layout again, its missed data being resynced.
    UpIn,
    /// Failed or excluded; its shards are served by spares while rebuild runs.
    Down,
    /// Excluded and rebuilt: no longer holds anything the pool needs.
    DownOut,
    /// Being drained: its shards move to spares, it still serves reads until done.
    Drain,
    /// Added by extend; joins the layout when rebalancing starts.
    New,
}

impl TargetState {
    pub fn name(self) -> &'static str {
        match self {
            TargetState::Up => "UP",
            TargetState::UpIn => "UPIN",
            TargetState::Down => "DOWN",
            TargetState::DownOut => "DOWNOUT",
            TargetState::Drain => "DRAIN",
            TargetState::New => "NEW",
        }
    }

    /// States this one may move to.
    pub fn allowed_next(self) -> &'static [TargetState] {
        use TargetState::*;
        match self {
            Up => &[Down, Drain],
            UpIn => &[Up, Down],
            Down => &[DownOut, UpIn],
            DownOut => &[UpIn],
            Drain => &[DownOut, Up, Down],
            New => &[Up, UpIn, Down],
        }
    }

    /// Holds its place in the layout (its shards are not moved to spares).
    pub fn in_layout(self) -> bool {
        matches!(self, TargetState::Up | TargetState::UpIn)
    }

    /// Can be read from (a draining target still has all its data).
    pub fn readable(self) -> bool {
        matches!(self, TargetState::Up | TargetState::Drain)
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault-domain path such as `/zone-a/rack-3/host-7`, outermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FaultDomain(pub Vec<String>);

impl FaultDomain {
    pub fn parse(path: &str) -> Result<FaultDomain, PlacementError> {
        let p = path.trim();
        if !p.starts_with('/') {
            return Err(PlacementError::Invalid(format!("fault domain '{path}' must start with '/', e.g. /zone-a/rack-3/host-7")));
        }
        let parts: Vec<String> = p.split('/').skip(1).map(str::to_owned).collect();
        if parts.iter().any(|c| c.is_empty() || c.len() > 64) || parts.len() > 8 {
            return Err(PlacementError::Invalid(format!("fault domain '{path}' needs 1 to 8 non-empty components of at most 64 bytes")));
        }
        Ok(FaultDomain(parts))
    }

    /// Attribute names of the levels, innermost last: `host`, then `rack`, `zone`, then
    /// `domain0`... for deeper levels.
    pub fn named_levels(&self) -> Vec<(String, String)> {
        let n = self.0.len();
        self.0
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let from_bottom = n - 1 - i;
                let name = match from_bottom {
                    0 => "host".to_string(),
                    1 => "rack".to_string(),
                    2 => "zone".to_string(),
                    _ => format!("domain{i}"),
                };
                (name, v.clone())
            })
            .collect()
    }
}

impl fmt::Display for FaultDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.0 {
            write!(f, "/{c}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolTarget {
    pub id: TargetId,
    pub domain: FaultDomain,
    pub labels: BTreeMap<String, String>,
    pub state: TargetState,
    /// The map version at which the target left the layout (went `DOWN` or `DRAIN`); 0 while
    /// it is in. Kept through `DOWN` -> `DOWNOUT`, so spares are assigned in the order their
    /// homes failed, and finishing a rebuild never reorders (and so never moves) a spare.
    #[serde(default)]
    pub out_since: u64,
}

impl PoolTarget {
    /// Attributes the resource query can test: labels, fault-domain levels, `rank`, `target`,
    /// `domain` (the full path) and `state`.
    pub fn attributes(&self) -> BTreeMap<String, String> {
        let mut a = self.labels.clone();
        for (k, v) in self.domain.named_levels() {
            a.insert(k, v);
        }
        a.insert("domain".into(), self.domain.to_string());
        a.insert("rank".into(), self.id.rank.to_string());
        a.insert("target".into(), self.id.to_string());
        a.insert("state".into(), self.state.name().to_string());
        a
    }
}

/// The versioned target list of one pool. Targets are only ever appended (extend), never
/// reordered, which keeps layouts stable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMap {
    pub format: u8,
    pub version: u64,
    pub targets: Vec<PoolTarget>,
}

impl PoolMap {
    pub fn new(targets: Vec<PoolTarget>) -> Result<PoolMap, PlacementError> {
        let mut m = PoolMap { format: POOL_MAP_FORMAT_V1, version: 1, targets: Vec::new() };
        m.push_targets(targets)?;
        Ok(m)
    }

    fn push_targets(&mut self, targets: Vec<PoolTarget>) -> Result<(), PlacementError> {
        for t in targets {
            if self.targets.iter().any(|x| x.id == t.id) {
                return Err(PlacementError::DuplicateTarget(t.id));
            }
            self.targets.push(t);
        }
        Ok(())
    }

    /// A map of `ranks` ranks with `targets_per_rank` targets each, rank `r` in domain
    /// `/host-{r % hosts}`; for tests and the simulator.
    pub fn uniform(ranks: u32, targets_per_rank: u16, hosts: u32) -> PoolMap {
        let mut targets = Vec::with_capacity(ranks as usize * targets_per_rank as usize);
        for r in 0..ranks {
            for i in 0..targets_per_rank {
                targets.push(PoolTarget {
                    id: TargetId::new(r, i),
                    domain: FaultDomain(vec![format!("host-{}", r % hosts.max(1))]),
                    labels: BTreeMap::new(),
                    state: TargetState::Up,
                    out_since: 0,
                });
            }
        }
        PoolMap { format: POOL_MAP_FORMAT_V1, version: 1, targets }
    }

    pub fn target(&self, id: TargetId) -> Option<&PoolTarget> {
        self.targets.iter().find(|t| t.id == id)
    }

    pub fn index_of(&self, id: TargetId) -> Option<usize> {
        self.targets.iter().position(|t| t.id == id)
    }

    /// Move one target to a new state; illegal transitions are refused and change nothing.
    /// Whether data movement is pending: some target is `DOWN` (rebuild), `UPIN` (resync) or
    /// `DRAIN`.
    pub fn movement_pending(&self) -> bool {
        self.targets.iter().any(|t| matches!(t.state, TargetState::Down | TargetState::UpIn | TargetState::Drain))
    }

    /// The map as it stood when data movement last finished: pending `DOWN` and `DRAIN`
    /// targets back to `UP`, `UPIN` back to `DOWNOUT`; `None` if nothing is pending. Every
    /// spare in this map's layouts had been filled, which is how readers tell a rebuilt spare
    /// from one that a newer failure just put in place.
    pub fn settled(&self) -> Option<PoolMap> {
        if !self.movement_pending() {
            return None;
        }
        let mut m = self.clone();
        for t in &mut m.targets {
            t.state = match t.state {
                TargetState::Down | TargetState::Drain => {
                    t.out_since = 0;
                    TargetState::Up
                }
                // Back out of the layout as it was (its spares were placed before later ones).
                TargetState::UpIn => TargetState::DownOut,
                s => s,
            };
        }
        Some(m)
    }

    pub fn set_state(&mut self, id: TargetId, to: TargetState) -> Result<(), PlacementError> {
        let t = self.targets.iter_mut().find(|t| t.id == id).ok_or(PlacementError::UnknownTarget(id))?;
        let from = t.state;
        if !from.allowed_next().contains(&to) {
            return Err(PlacementError::IllegalTransition {
                target: id,
                from: from.name().into(),
                to: to.name().into(),
                allowed: from.allowed_next().iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            });
        }
        self.version += 1;
        t.out_since = match (from.in_layout(), to.in_layout()) {
            (true, false) => self.version,
            (_, true) => 0,
            (false, false) => t.out_since,
        };
        t.state = to;
        Ok(())
    }

    /// Move every target of `rank` that can make the transition; returns how many moved. The
    /// version is bumped once if anything changed.
    pub fn set_rank_state(&mut self, rank: Rank, to: TargetState) -> usize {
        let mut n = 0;
        let version = self.version + 1;
        for t in self.targets.iter_mut().filter(|t| t.id.rank == rank) {
            if t.state.allowed_next().contains(&to) {
                t.out_since = match (t.state.in_layout(), to.in_layout()) {
                    (true, false) => version,
                    (_, true) => 0,
                    (false, false) => t.out_since,
                };
                t.state = to;
                n += 1;
            }
        }
        if n > 0 {
            self.version = version;
        }
        n
    }

    /// Extend: append targets in state `NEW`; bumps the version.
    pub fn add_targets(&mut self, mut targets: Vec<PoolTarget>) -> Result<(), PlacementError> {
        for t in &mut targets {
            t.state = TargetState::New;
        }
        let before = self.targets.len();
        if let Err(e) = self.push_targets(targets) {
            self.targets.truncate(before);
            return Err(e);
        }
        self.version += 1;
        Ok(())
    }

    pub fn ranks(&self) -> Vec<Rank> {
        let mut r: Vec<Rank> = self.targets.iter().map(|t| t.id.rank).collect();
        r.sort();
        r.dedup();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_map_undoes_pending_movement() {
        let mut m = PoolMap::uniform(4, 1, 4);
        assert!(m.settled().is_none(), "nothing pending: nothing to undo");
        m.set_state(TargetId::new(0, 0), TargetState::Down).unwrap();
        m.set_state(TargetId::new(0, 0), TargetState::DownOut).unwrap();
        m.set_state(TargetId::new(1, 0), TargetState::Down).unwrap();
        m.set_state(TargetId::new(2, 0), TargetState::Drain).unwrap();
        let s = m.settled().expect("movement pending");
        let st = |m: &PoolMap, r| m.target(TargetId::new(r, 0)).unwrap().state;
        assert_eq!((st(&s, 0), st(&s, 1), st(&s, 2), st(&s, 3)), (TargetState::DownOut, TargetState::Up, TargetState::Up, TargetState::Up));
        m.set_state(TargetId::new(0, 0), TargetState::UpIn).unwrap();
        assert_eq!(st(&m.settled().unwrap(), 0), TargetState::DownOut, "a reintegrating target was out when movement last finished");
    }

    #[test]
    fn transitions_are_checked_and_bump_the_version() {
        let mut m = PoolMap::uniform(2, 2, 2);
        let t = TargetId::new(1, 0);
        assert_eq!(m.version, 1);
        m.set_state(t, TargetState::Down).unwrap();
        assert_eq!(m.version, 2);
        let err = m.set_state(t, TargetState::Up).unwrap_err();
        assert!(err.to_string().contains("cannot go from DOWN to UP"), "{err}");
        assert!(err.to_string().contains("DOWNOUT, UPIN"), "{err}");
        assert_eq!(m.version, 2, "a refused transition changes nothing");
        m.set_state(t, TargetState::DownOut).unwrap();
        m.set_state(t, TargetState::UpIn).unwrap();
        m.set_state(t, TargetState::Up).unwrap();
        assert_eq!(m.version, 5);
        assert!(matches!(m.set_state(TargetId::new(9, 0), TargetState::Down), Err(PlacementError::UnknownTarget(_))));
    }

    #[test]
    fn extend_appends_new_targets_and_refuses_duplicates() {
        let mut m = PoolMap::uniform(2, 1, 2);
        let extra = PoolMap::uniform(3, 1, 3).targets[2..].to_vec();
        m.add_targets(extra.clone()).unwrap();
        assert_eq!(m.targets.len(), 3);
        assert_eq!(m.targets[2].state, TargetState::New);
        assert!(matches!(m.add_targets(extra), Err(PlacementError::DuplicateTarget(_))));
        assert_eq!(m.targets.len(), 3);
    }

    #[test]
    fn fault_domains_parse_and_name_levels() {
        let d = FaultDomain::parse("/zone-a/rack-3/host-7").unwrap();
        assert_eq!(d.to_string(), "/zone-a/rack-3/host-7");
        let names: Vec<String> = d.named_levels().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec!["zone", "rack", "host"]);
        for bad in ["", "zone", "/", "/a//b"] {
            assert!(FaultDomain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let mut m = PoolMap::uniform(3, 2, 3);
        m.set_state(TargetId::new(1, 1), TargetState::Down).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<PoolMap>(&json).unwrap(), m);
    }
}
