//! Transactional KV at the shard leader (seed 002).

use super::*;
use strata_rpc::kv_msg::KvReq;

#[derive(Default)]
pub(super) struct KvState {}

impl Engine {
    pub(super) async fn kv(&self, req: KvReq, _payload: Bytes) -> Result<(EngineResp, Bytes), RemoteError> {
        let _ = &self.kv;
        Err(rerr(ErrorCode::Unavailable, format!("KV request {:?} is not served by this engine version", std::mem::discriminant(&req))))
    }
}
