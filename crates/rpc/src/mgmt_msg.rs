//! Wire messages of the management service. Changes go through Raft as [`MgmtCmd`]s; reads
//! are [`MgmtQuery`]s answered by the leader from its applied state.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use strata_placement::PoolMap;
use strata_types::{ContId, Epoch, PoolId, Rank};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtReq {
    /// Raft traffic between access points; the openraft message is JSON in the payload.
    RaftAppend,
    RaftVote,
    RaftSnapshot,
    /// A change, replicated through Raft (followers answer `NotLeader` with the leader's address).
    Write(MgmtCmd),
    Query(MgmtQuery),
    /// A rank's liveness report to the leader (not replicated: the leader keeps it in memory).
    Heartbeat { rank: Rank, incarnation: u64, free_bytes: u64, total_bytes: u64 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtResp {
    Ok,
    Raft,
    Reply(MgmtReply),
    /// `stop` asks the rank to shut down cleanly (`strata system stop`).
    HeartbeatAck { pool_versions: BTreeMap<PoolId, u64>, stop: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContType {
    Plain,
    Kv,
    Posix,
    Block,
}

impl std::str::FromStr for ContType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(ContType::Plain),
            "kv" => Ok(ContType::Kv),
            "posix" => Ok(ContType::Posix),
            "block" => Ok(ContType::Block),
            o => Err(format!("unknown container type '{o}' (plain, kv, posix, block)")),
        }
    }
}

impl ContType {
    pub fn name(self) -> &'static str {
        match self {
            ContType::Plain => "plain",
            ContType::Kv => "kv",
            ContType::Posix => "posix",
            ContType::Block => "block",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankState {
    Joined,
    Dead,
    Excluded,
    Stopped,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtCmd {
    /// A server joins (or re-joins: same `uuid` keeps its rank).
    Join { uuid: String, mgmt_addr: String, data_addr: String, fault_domain: String, labels: BTreeMap<String, String>, targets: u16, capacity_bytes: u64, access_point: bool },
    SetRankState { rank: Rank, state: RankState },
    PoolCreate { id: PoolId, label: String, size_bytes: u64, ranks: Option<Vec<Rank>>, select: Option<String> },
    PoolDestroy { pool: String, force: bool },
    /// Exclude / reintegrate / drain targets (`index: None` means every target of the rank).
    PoolTargets { pool: String, rank: Rank, index: Option<u16>, action: TargetAction },
    PoolExtend { pool: String, ranks: Vec<Rank> },
    ContCreate { id: ContId, pool: String, label: String, ctype: ContType, oclass: String, rf: u8, props: BTreeMap<String, String> },
    ContDestroy { pool: String, cont: String },
    SnapshotCreate { pool: String, cont: String, name: String, epoch: Epoch },
    SnapshotDestroy { pool: String, cont: String, name: String },
    /// Reserve `count` object sequence numbers in a container.
    AllocOids { pool: String, cont: String, count: u64 },
    LeaseAcquire { key: String, holder: String, now_ms: u64, ttl_ms: u64 },
    /// A rank finished rebuilding everything it must push for this map version; when every
    /// live rank of the pool has, the DOWN targets become DOWNOUT.
    RebuildDone { pool: PoolId, version: u64, rank: Rank },
    LeaseRelease { key: String, holder: String },
    SetProp { pool: String, cont: String, key: String, value: String },
    /// An administrator accepts the possible loss of an unclean container's data: its status
    /// goes back to healthy and it can be opened again.
    ContMarkHealthy { pool: String, cont: String },
    /// A rank marked dead is heard from again without having restarted (it was alive but
    /// silent past the heartbeat timeout: a stall, a partition): it is a member again, and the
    /// targets its death took down are reintegrated (`UPIN`, resynced, then `UP`), as Ceph
    /// brings back an OSD it marked down. A restarted rank re-joins instead (`Join`) and is
    /// reintegrated by an administrator; one excluded by an administrator stays out.
    RankReturned { rank: Rank },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetAction {
    Exclude,
    Reintegrate,
    Drain,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtQuery {
    System,
    Pools,
    Pool { pool: String },
    Conts { pool: String },
    Cont { pool: String, cont: String },
    /// Who holds a lease (`MgmtReply::LeaseHolder`), e.g. to find a volume's writer.
    Lease { key: String },
    /// Destroyed containers whose data the engines may still hold, oldest first
    /// (`MgmtReply::DestroyedConts`): engines delete what they hold of them in the background.
    DestroyedConts,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RankInfo {
    pub rank: Rank,
    pub uuid: String,
    pub mgmt_addr: String,
    pub data_addr: String,
    pub fault_domain: String,
    pub labels: BTreeMap<String, String>,
    pub targets: u16,
    pub capacity_bytes: u64,
    pub state: RankState,
    pub access_point: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SystemInfo {
    pub cluster_id: String,
    pub leader: Option<String>,
    pub access_points: Vec<String>,
    pub ranks: Vec<RankInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PoolInfo {
    pub id: PoolId,
    pub label: String,
    pub size_bytes: u64,
    pub map: PoolMap,
    /// Data addresses of the pool's ranks, for clients to reach engines.
    pub rank_addrs: BTreeMap<Rank, String>,
    /// Data movement under way (targets DOWN, UPIN or DRAIN), if any.
    #[serde(default)]
    pub rebuild: Option<RebuildStatus>,
    /// Containers of the pool that are unclean (see [`ContStatus`]). Clients read it with
    /// every map refresh, so open handles learn it without a query of their own.
    #[serde(default)]
    pub unclean_conts: Vec<UncleanCont>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UncleanCont {
    pub id: ContId,
    pub label: String,
    pub reason: UncleanReason,
    /// The container's redundancy factor, for the error a reader by capability alone (who
    /// holds no container handle) is given.
    #[serde(default)]
    pub rf: u8,
}

impl UncleanCont {
    /// The refusal of a request about this container's data that names no container handle
    /// (engines answer capability-only requests with it): `Conflict`, since retrying cannot
    /// help until an administrator clears the status, with the container in `detail` so a
    /// client gives its typed error ([`UncleanCont::from_refusal`]).
    pub fn refusal(&self, pool: &str) -> crate::RemoteError {
        crate::RemoteError { code: crate::ErrorCode::Conflict, message: self.reason.explain(pool, &self.label, self.rf), detail: crate::encode(self).ok() }
    }

    /// The unclean container a refusal from [`UncleanCont::refusal`] names.
    pub fn from_refusal(e: &crate::RemoteError) -> Option<UncleanCont> {
        if e.code != crate::ErrorCode::Conflict {
            return None;
        }
        crate::decode(e.detail.as_deref()?).ok()
    }
}

/// Whether a container's objects still have every version they were given (DAOS's container
/// health). A container becomes unclean when more fault domains of its pool have failed
/// targets at once (DOWN, not yet rebuilt) than its redundancy factor, counted at the level
/// its class spreads over: objects may have lost every replica, and reading them would show
/// them as absent. Only an administrator clears it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum ContStatus {
    #[default]
    Healthy,
    Unclean(UncleanReason),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UncleanReason {
    /// The ranks failed at once, not yet rebuilt, when the container was marked.
    pub ranks: Vec<Rank>,
    /// The pool map version whose change marked it.
    pub map_version: u64,
    /// The distinct fault domains those failures fell in, at the level the container's class
    /// spreads over (`strata_placement::spread_domains`); their number is what exceeded the
    /// redundancy factor. Empty in marks made before domains were counted (ranks were).
    #[serde(default)]
    pub domains: Vec<String>,
}

impl UncleanReason {
    /// What a user is told when container `pool/cont` (redundancy factor `rf`) is refused for
    /// this reason: what happened and what to do (the client's `Unclean` error and an engine's
    /// refusal of a capability-only request say the same).
    pub fn explain(&self, pool: &str, cont: &str, rf: u8) -> String {
        format!(
            "container {pool}/{cont} is unclean: {self}, more than its redundancy factor (rf {rf}); objects may be lost. \
             Check with 'strata cont query {pool} {cont}', then 'strata cont set-prop {pool} {cont} --status healthy' to accept the loss and use it"
        )
    }
}

impl std::fmt::Display for UncleanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranks: Vec<String> = self.ranks.iter().map(|r| r.to_string()).collect();
        if self.domains.is_empty() {
            return write!(f, "ranks {} failed before rebuild restored redundancy (pool map version {})", ranks.join(","), self.map_version);
        }
        let n = self.domains.len();
        write!(f, "ranks {} failed in {n} fault domain{} ({}) before rebuild restored redundancy (pool map version {})", ranks.join(","), if n == 1 { "" } else { "s" }, self.domains.join(", "), self.map_version)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RebuildStatus {
    /// The map version being rebuilt for.
    pub version: u64,
    /// Ranks that finished pushing their part, of those that must.
    pub ranks_done: u32,
    pub ranks_total: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ContInfo {
    pub id: ContId,
    pub pool: PoolId,
    pub label: String,
    pub ctype: ContType,
    pub oclass: String,
    pub rf: u8,
    pub props: BTreeMap<String, String>,
    pub snapshots: BTreeMap<String, Epoch>,
    pub next_oid: u64,
    #[serde(default)]
    pub status: ContStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MgmtReply {
    Done,
    Rank(Rank),
    System(SystemInfo),
    Pools(Vec<PoolInfo>),
    Pool(PoolInfo),
    Conts(Vec<ContInfo>),
    Cont(ContInfo),
    OidRange { first: u64, count: u64 },
    Lease { holder: String, expires_ms: u64 },
    /// Holder and expiry (ms since the Unix epoch) of a lease, if one was taken and not
    /// released (it may have expired: compare with the clock).
    LeaseHolder(Option<(String, u64)>),
    /// Destroyed containers and the pools they were in.
    DestroyedConts(Vec<(PoolId, ContId)>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unclean_refusal_carries_the_container_and_says_what_to_do() {
        let u = UncleanCont { id: ContId(uuid::Uuid::from_u128(7)), label: "r1".into(), reason: UncleanReason { ranks: vec![Rank(4), Rank(5)], map_version: 9, domains: vec!["/node-2".into(), "/node-3".into()] }, rf: 1 };
        let e = u.refusal("tank");
        assert!(e.message.contains("container tank/r1 is unclean: ranks 4,5 failed in 2 fault domains (/node-2, /node-3)"), "{}", e.message);
        assert!(e.message.contains("(rf 1)") && e.message.contains("'strata cont set-prop tank r1 --status healthy'"), "{}", e.message);
        assert_eq!(UncleanCont::from_refusal(&e), Some(u));
        // Not retried as a transient error: nothing changes until an administrator acts.
        assert!(!crate::RpcError::Remote(e).is_transient());
        assert_eq!(UncleanCont::from_refusal(&crate::RemoteError::new(crate::ErrorCode::Conflict, "a KV conflict")), None);
    }
}
