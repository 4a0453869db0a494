//! Raft messages between access points over strata-rpc. The openraft message travels as JSON in
//! the frame payload (management traffic is small; JSON keeps openraft's types opaque to us).

use crate::raft_store::{NodeId, TypeConfig};
use bytes::Bytes;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError as RaftRemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use strata_rpc::mgmt_msg::{MgmtReq, MgmtResp};
use strata_rpc::{RpcError, RpcPool};

pub struct MgmtNetworkFactory {
    pub pool: RpcPool,
}

pub struct MgmtNetwork {
    pool: RpcPool,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for MgmtNetworkFactory {
    type Network = MgmtNetwork;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> MgmtNetwork {
        MgmtNetwork { pool: self.pool.clone(), target, addr: node.addr.clone() }
    }
}

impl MgmtNetwork {
    async fn send<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        kind: MgmtReq,
        req: &Req,
        opt: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let r = self.pool.call::<_, MgmtResp>(&self.addr, &kind, Bytes::from(body), opt.hard_ttl()).await;
        let (_, payload) = r.map_err(|e| match e {
            RpcError::Connect { .. } | RpcError::ConnectionClosed(_) | RpcError::Handshake { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            other => RPCError::Network(NetworkError::new(&other)),
        })?;
        let result: Result<Resp, E> = serde_json::from_slice(&payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RaftRemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for MgmtNetwork {
    async fn append_entries(&mut self, rpc: AppendEntriesRequest<TypeConfig>, option: RPCOption) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(MgmtReq::RaftAppend, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        self.send(MgmtReq::RaftSnapshot, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(MgmtReq::RaftVote, &rpc, &option).await
    }
}
