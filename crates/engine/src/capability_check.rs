//! Requests that carry only a capability (seed 003's `read_cap` / `write_cap`, minted by
//! `strata fs layout`): the engine verifies the token with its container's key and serves it
//! for the one shard it names, nothing else.
//!
//! A read capability reads the named target's copy of its group (for erasure-coded objects, the
//! cell the target holds, in shard-local offsets). A write capability writes through the
//! group's leader (so replicas stay identical); it is honoured only when it names the leader.
//! Neither is served for an unclean container (`UncleanCont::refusal`, as handles are refused).

use super::{on_blocking_pool, rerr, Engine, PoolView};
use bytes::Bytes;
use std::sync::Arc;
use strata_rpc::capability::{self, CapClaims, CapRights, CAP_KEY_PROP};
use strata_rpc::engine_msg::{EngineResp, FetchKind, WireOp};
use strata_rpc::mgmt_msg::{ContStatus, MgmtQuery, MgmtReply, UncleanCont};
use strata_rpc::{ErrorCode, RemoteError};
use strata_types::{Epoch, PoolId, Redundancy};

fn denied(msg: impl Into<String>) -> RemoteError {
    rerr(ErrorCode::PermissionDenied, msg)
}

impl Engine {
    async fn current_view(&self, pool: PoolId) -> Result<Arc<PoolView>, RemoteError> {
        let cur = self.pools.read().unwrap_or_else(|e| e.into_inner()).get(&pool).cloned();
        match cur {
            Some(v) => Ok(v),
            None => self.refresh(pool).await,
        }
    }

    /// Verify `token` for `rights` on `dkey`; returns its claims and the pool view.
    async fn check_cap(&self, token: &str, rights: CapRights, dkey: &[u8]) -> Result<(CapClaims, Arc<PoolView>), RemoteError> {
        let unverified = capability::peek(token).map_err(|e| denied(e.to_string()))?;
        let info = match self.mgmt.query(MgmtQuery::Cont { pool: unverified.pool.to_string(), cont: unverified.cont.to_string() }).await {
            Ok(MgmtReply::Cont(info)) => info,
            Ok(_) => return Err(rerr(ErrorCode::Internal, "unexpected management reply")),
            Err(e) => return Err(rerr(ErrorCode::Unavailable, format!("cannot fetch the container's capability key: {e}"))),
        };
        let key = info.props.get(CAP_KEY_PROP).ok_or_else(|| denied("the container has no capability key; no capability of it is valid"))?;
        let key = capability::parse_key(key).map_err(|e| denied(e.to_string()))?;
        let claims = capability::verify(&key, token, capability::now_ms()).map_err(|e| denied(e.to_string()))?;
        // Capability-only requests name no container handle, so no client refuses them for an
        // unclean container: here they are, from the status fetched just now (a lost object
        // would read as absent, or a write go to a container that may have lost data).
        if let ContStatus::Unclean(reason) = &info.status {
            return Err(UncleanCont { id: info.id, label: info.label.clone(), reason: reason.clone(), rf: info.rf }.refusal(&claims.pool.to_string()));
        }
        if claims.rights != rights {
            return Err(denied(capability::CapError::Rights { granted: claims.rights, wanted: rights }.to_string()));
        }
        if claims.target.rank != self.rank {
            return Err(denied(format!("the capability is for a shard on rank {}, not rank {}", claims.target.rank, self.rank)));
        }
        let view = self.current_view(claims.pool).await?;
        let layout = view.placement.layout(claims.oid).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
        let g = layout.group_for_dkey(dkey);
        if g as u32 != claims.group || !layout.group(g).iter().any(|s| s.target == claims.target) {
            return Err(denied(format!("the capability is for group {} on target {}; this dkey belongs to group {g}", claims.group, claims.target)));
        }
        Ok((claims, view))
    }

    pub(super) async fn cap_fetch(&self, token: &str, dkey: Vec<u8>, fetch: FetchKind, epoch: Epoch) -> Result<(EngineResp, Bytes), RemoteError> {
        let (claims, view) = self.check_cap(token, CapRights::Read, &dkey).await?;
        let vos = self.target(claims.target)?.clone();
        let (cont, oid) = (claims.cont, claims.oid);
        let shard = Self::ec_shard_of(&view, oid, &dkey, claims.target);
        on_blocking_pool(move || super::ec_cells::fetch_shard(&vos, cont, oid, &dkey, fetch, epoch, shard)).await
    }

    pub(super) async fn cap_update(&self, token: &str, dkey: Vec<u8>, ops: Vec<WireOp>, payload: Bytes) -> Result<EngineResp, RemoteError> {
        let (claims, view) = self.check_cap(token, CapRights::Write, &dkey).await?;
        let layout = view.placement.layout(claims.oid).map_err(|e| rerr(ErrorCode::InvalidArgument, e.to_string()))?;
        let group = layout.group(layout.group_for_dkey(&dkey));
        let leader = match layout.class.redundancy() {
            Redundancy::Erasure { data, .. } => group[data as usize].target,
            _ => group[0].target,
        };
        if leader != claims.target {
            return Err(denied(format!("write capabilities are honoured by the group's leader ({leader}); this one names {}", claims.target)));
        }
        self.update(claims.pool, view.map.version, claims.cont, claims.oid, dkey, None, ops, payload).await
    }
}
