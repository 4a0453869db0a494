//! The management service of one access point: Raft node, RPC handler, heartbeat tracking and
//! dead-rank detection.

use crate::raft_network::MgmtNetworkFactory;
use crate::raft_store::{LogStore, NodeId, StateMachineStore, TypeConfig};
use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_rpc::mgmt_msg::*;
use strata_rpc::{ClientConfig, ErrorCode, Handler, RemoteError, RequestCtx, RpcPool, ServiceKind};
use strata_types::Rank;

#[derive(Clone, Debug)]
pub struct MgmtConfig {
    pub dir: PathBuf,
    pub cluster: String,
    /// Management addresses of all access points, in the same order on every one of them.
    pub access_points: Vec<String>,
    /// This node's index in `access_points`.
    pub index: usize,
    pub heartbeat_timeout: Duration,
}

pub struct MgmtNode {
    pub raft: Raft<TypeConfig>,
    pub sm: StateMachineStore,
    cfg: MgmtConfig,
    heartbeats: Mutex<HashMap<Rank, Instant>>,
    /// When this node last became leader; ranks get a full timeout from then.
    leader_since: Mutex<Option<Instant>>,
    /// Connections to the ranks' engines, to tell them of new pool maps (`push_pool_versions`).
    engines: RpcPool,
}

/// How long a push of new pool map versions to one engine may take; a rank that does not answer
/// learns them at its next heartbeat.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn node_id(index: usize) -> NodeId {
    index as NodeId + 1
}

fn not_leader(leader: Option<String>) -> RemoteError {
    RemoteError::new(ErrorCode::NotLeader, leader.unwrap_or_default())
}

impl MgmtNode {
    pub async fn start(cfg: MgmtConfig) -> Result<Arc<MgmtNode>, String> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
        let log = LogStore::open(&cfg.dir)?;
        let sm = StateMachineStore::open(&cfg.dir)?;
        let rc = openraft::Config {
            cluster_name: cfg.cluster.clone(),
            heartbeat_interval: 250,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            install_snapshot_timeout: 5000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(2000),
            max_in_snapshot_log_to_keep: 200,
            ..Default::default()
        };
        let rc = Arc::new(rc.validate().map_err(|e| e.to_string())?);
        let net = MgmtNetworkFactory { pool: RpcPool::new(ServiceKind::Mgmt, Some(cfg.cluster.clone()), ClientConfig::default()) };
        let raft = Raft::new(node_id(cfg.index), rc, net, log, sm.clone()).await.map_err(|e| e.to_string())?;
        if cfg.index == 0 {
            // The first access point proposes the initial membership; on a restarted cluster
            // this is refused as already initialized, which is what we want.
            let members: BTreeMap<NodeId, BasicNode> = cfg.access_points.iter().enumerate().map(|(i, a)| (node_id(i), BasicNode { addr: a.clone() })).collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "raft already initialized");
            }
        }
        let engines = RpcPool::new(ServiceKind::Engine, Some(cfg.cluster.clone()), ClientConfig { connect_timeout: PUSH_TIMEOUT, ..ClientConfig::default() });
        let node = Arc::new(MgmtNode { raft, sm, cfg, heartbeats: Mutex::new(HashMap::new()), leader_since: Mutex::new(None), engines });
        let watcher = node.clone();
        tokio::spawn(async move { watcher.watch_ranks().await });
        Ok(node)
    }

    fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.and_then(|id| self.cfg.access_points.get((id as usize).wrapping_sub(1)).cloned())
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(node_id(self.cfg.index))
    }

    pub async fn propose(&self, cmd: MgmtCmd) -> Result<MgmtReply, RemoteError> {
        let before = self.pool_versions().await;
        match self.raft.client_write(cmd).await {
            Ok(r) => {
                if r.data.0.is_ok() {
                    self.push_pool_versions(before).await;
                }
                r.data.0
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(f.leader_node.map(|n| n.addr))),
            Err(e) => Err(RemoteError::new(ErrorCode::Unavailable, format!("management service: {e}"))),
        }
    }

    async fn pool_versions(&self) -> BTreeMap<strata_types::PoolId, u64> {
        self.sm.inner.read().await.state.pools.iter().map(|(id, p)| (*id, p.map.version)).collect()
    }

    /// Tell every joined rank's engine of pool maps that changed since `before`, without
    /// waiting: a rebuild starts when its ranks learn the new map, which by heartbeat alone
    /// took half a heartbeat period on average (0.3 s of a 3 s rebuild in `strata bench
    /// rebuild`), and until then writes go to the old places only.
    async fn push_pool_versions(&self, before: BTreeMap<strata_types::PoolId, u64>) {
        let (versions, addrs) = {
            let g = self.sm.inner.read().await;
            let versions: BTreeMap<strata_types::PoolId, u64> = g.state.pools.iter().map(|(id, p)| (*id, p.map.version)).collect();
            if versions.iter().all(|(id, v)| before.get(id) == Some(v)) {
                return;
            }
            (versions, g.state.ranks.values().filter(|r| r.state == RankState::Joined).map(|r| r.data_addr.clone()).collect::<Vec<_>>())
        };
        for addr in addrs {
            let (engines, req) = (self.engines.clone(), strata_rpc::engine_msg::EngineReq::PoolVersions { versions: versions.clone() });
            tokio::spawn(async move {
                let call = engines.call::<_, strata_rpc::engine_msg::EngineResp>(&addr, &req, Bytes::new(), PUSH_TIMEOUT);
                if let Err(e) = tokio::time::timeout(PUSH_TIMEOUT, call).await.unwrap_or(Err(strata_rpc::RpcError::Timeout(PUSH_TIMEOUT))) {
                    tracing::debug!(%addr, error = %e, "could not push new pool map versions; the rank learns them at its next heartbeat");
                }
            });
        }
    }

    async fn read_state(&self) -> Result<tokio::sync::RwLockReadGuard<'_, crate::raft_store::SmInner>, RemoteError> {
        if let Err(e) = self.raft.ensure_linearizable().await {
            return Err(match e {
                RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f.leader_node.map(|n| n.addr)),
                other => RemoteError::new(ErrorCode::Unavailable, other.to_string()),
            });
        }
        Ok(self.sm.inner.read().await)
    }

    async fn query(&self, q: MgmtQuery) -> Result<MgmtReply, RemoteError> {
        let g = self.read_state().await?;
        let s = &g.state;
        Ok(match q {
            MgmtQuery::System => MgmtReply::System(SystemInfo {
                cluster_id: self.cfg.cluster.clone(),
                leader: self.leader_addr(),
                access_points: self.cfg.access_points.clone(),
                ranks: s.ranks.values().cloned().collect(),
            }),
            MgmtQuery::Pools => MgmtReply::Pools(s.pools.values().map(|p| s.pool_info(p)).collect()),
            MgmtQuery::Pool { pool } => MgmtReply::Pool(s.pool_info(s.pool_by_name(&pool)?)),
            MgmtQuery::Conts { pool } => {
                let pid = s.pool_by_name(&pool)?.id;
                MgmtReply::Conts(s.conts.values().filter(|c| c.pool == pid).cloned().collect())
            }
            MgmtQuery::Cont { pool, cont } => MgmtReply::Cont(s.cont_by_name(&pool, &cont)?.clone()),
            MgmtQuery::Lease { key } => MgmtReply::LeaseHolder(s.leases.get(&key).cloned()),
            MgmtQuery::DestroyedConts => MgmtReply::DestroyedConts(s.destroyed_conts.clone()),
        })
    }

    /// Leader loop: mark ranks dead when silent past the timeout.
    async fn watch_ranks(self: Arc<Self>) {
        let tick = (self.cfg.heartbeat_timeout / 5).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(tick).await;
            if !self.is_leader() {
                *self.leader_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                continue;
            }
            let since = *self.leader_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
            let joined: Vec<Rank> = self.sm.inner.read().await.state.ranks.values().filter(|r| r.state == RankState::Joined).map(|r| r.rank).collect();
            let now = Instant::now();
            let silent: Vec<Rank> = {
                let hb = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
                joined.into_iter().filter(|r| now.duration_since(hb.get(r).copied().unwrap_or(since).max(since)) > self.cfg.heartbeat_timeout).collect()
            };
            for rank in silent {
                tracing::warn!(%rank, timeout_ms = self.cfg.heartbeat_timeout.as_millis() as u64, "rank silent past the heartbeat timeout: marking it dead");
                if let Err(e) = self.propose(MgmtCmd::SetRankState { rank, state: RankState::Dead }).await {
                    tracing::warn!(%rank, error = %e, "could not mark rank dead");
                }
            }
        }
    }

    async fn heartbeat(&self, rank: Rank) -> Result<MgmtResp, RemoteError> {
        if !self.is_leader() {
            return Err(not_leader(self.leader_addr()));
        }
        self.heartbeats.lock().unwrap_or_else(|e| e.into_inner()).insert(rank, Instant::now());
        let (dead, stop, versions) = {
            let g = self.sm.inner.read().await;
            let state = g.state.ranks.get(&rank).map(|r| r.state);
            (state == Some(RankState::Dead), state == Some(RankState::Stopped), g.state.pools.iter().map(|(id, p)| (*id, p.map.version)).collect())
        };
        if dead {
            // The process that was marked dead is alive (a restart re-joins instead): it is a
            // member again and the targets its death took down are reintegrated.
            tracing::warn!(%rank, "rank marked dead is heard from again: reintegrating the targets its death took down");
            if let Err(e) = self.propose(MgmtCmd::RankReturned { rank }).await {
                tracing::warn!(%rank, error = %e, "could not record the rank's return; its next heartbeat tries again");
            }
        }
        Ok(MgmtResp::HeartbeatAck { pool_versions: versions, stop })
    }
}

fn raft_json<T: serde::Serialize>(v: &T) -> Result<(MgmtResp, Bytes), RemoteError> {
    let b = serde_json::to_vec(v).map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?;
    Ok((MgmtResp::Raft, Bytes::from(b)))
}

fn from_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, RemoteError> {
    serde_json::from_slice(b).map_err(|e| RemoteError::new(ErrorCode::InvalidArgument, format!("raft message: {e}")))
}

impl Handler for MgmtNode {
    type Req = MgmtReq;
    type Resp = MgmtResp;

    async fn handle(&self, req: MgmtReq, payload: Bytes, _ctx: RequestCtx) -> Result<(MgmtResp, Bytes), RemoteError> {
        match req {
            MgmtReq::RaftAppend => raft_json(&self.raft.append_entries(from_json(&payload)?).await),
            MgmtReq::RaftVote => raft_json(&self.raft.vote(from_json(&payload)?).await),
            MgmtReq::RaftSnapshot => raft_json(&self.raft.install_snapshot(from_json(&payload)?).await),
            MgmtReq::Write(cmd) => {
                if !self.is_leader() {
                    return Err(not_leader(self.leader_addr()));
                }
                Ok((MgmtResp::Reply(self.propose(cmd).await?), Bytes::new()))
            }
            MgmtReq::Query(q) => Ok((MgmtResp::Reply(self.query(q).await?), Bytes::new())),
            MgmtReq::Heartbeat { rank, .. } => Ok((self.heartbeat(rank).await?, Bytes::new())),
        }
    }
}
