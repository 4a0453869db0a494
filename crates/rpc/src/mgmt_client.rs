//! Talking to the management service: find the leader among the access points, follow
//! `NotLeader` hints, retry transient failures until a deadline.

use crate::mgmt_msg::{MgmtCmd, MgmtQuery, MgmtReply, MgmtReq, MgmtResp};
use crate::{ClientConfig, ErrorCode, RpcError, RpcPool, ServiceKind};
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One call's own timeout; the overall deadline bounds the retries.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct MgmtClient {
    access_points: Vec<String>,
    pool: RpcPool,
    leader: Arc<Mutex<Option<String>>>,
    deadline: Duration,
}

impl MgmtClient {
    pub fn new(access_points: Vec<String>, cluster: Option<String>) -> MgmtClient {
        MgmtClient { access_points, pool: RpcPool::new(ServiceKind::Mgmt, cluster, ClientConfig::default()), leader: Arc::new(Mutex::new(None)), deadline: Duration::from_secs(20) }
    }

    /// How long a call keeps retrying (leader elections, restarts) before giving up.
    pub fn with_deadline(mut self, d: Duration) -> MgmtClient {
        self.deadline = d;
        self
    }

    pub fn access_points(&self) -> &[String] {
        &self.access_points
    }

    pub async fn call(&self, req: &MgmtReq) -> Result<MgmtResp, RpcError> {
        let start = Instant::now();
        let mut attempt = 0usize;
        let mut last_err = None;
        while start.elapsed() < self.deadline {
            let hint = self.leader.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let addr = hint.unwrap_or_else(|| self.access_points[attempt % self.access_points.len()].clone());
            attempt += 1;
            match self.pool.call::<_, MgmtResp>(&addr, req, Bytes::new(), CALL_TIMEOUT).await {
                Ok((resp, _)) => {
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    return Ok(resp);
                }
                Err(RpcError::Remote(e)) if e.code == ErrorCode::NotLeader => {
                    let next = (!e.message.is_empty() && e.message != addr).then(|| e.message.clone());
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = next;
                    last_err = Some(RpcError::Remote(e));
                }
                Err(e) if e.is_transient() || matches!(e, RpcError::Handshake { .. }) && !e.to_string().contains("belongs to cluster") => {
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
            // Back off a little between rounds over all access points (elections take ~1 s).
            if attempt % self.access_points.len().max(1) == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Err(last_err.unwrap_or(RpcError::Timeout(self.deadline)))
    }

    pub async fn write(&self, cmd: MgmtCmd) -> Result<MgmtReply, RpcError> {
        match self.call(&MgmtReq::Write(cmd)).await? {
            MgmtResp::Reply(r) => Ok(r),
            other => Err(RpcError::Protocol(format!("unexpected answer {other:?}"))),
        }
    }

    pub async fn query(&self, q: MgmtQuery) -> Result<MgmtReply, RpcError> {
        match self.call(&MgmtReq::Query(q)).await? {
            MgmtResp::Reply(r) => Ok(r),
            other => Err(RpcError::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
}
