//! Leases in the management service, used two ways: a volume's **writer lease** (one server
//! exports it for writing at a time; held while any writable connection is open, renewed at a
//! third of its TTL, released on the last disconnect, and simply expiring if the holder dies)
//! and a container's short **metadata lease** that serialises changes to volume records.
//!
//! The holder's local view of validity is conservative: it starts counting the TTL when it
//! *sends* the acquire, so it believes the lease lost no later than the service does.

use crate::BlockError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strata_client::{ClientError, Client};
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtReply};
use strata_rpc::{ErrorCode, RpcError};

pub const WRITER_LEASE_TTL_MS_DEFAULT: u64 = 10_000;
/// A lease this close to expiry is treated as lost (clock steps, renewal jitter).
const LEASE_MARGIN_MS: u64 = 500;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A unique holder name for this process and purpose.
pub fn holder_name(purpose: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into());
    format!("{purpose}@{host}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

pub struct Lease {
    client: Client,
    pub key: String,
    pub holder: String,
    ttl_ms: u64,
    /// Local deadline (ms since the Unix epoch) before which the lease is surely ours.
    valid_until_ms: AtomicU64,
    released: AtomicBool,
}

impl Lease {
    /// Acquire `key` for `holder`; `Held` if someone else holds it.
    pub async fn acquire(client: &Client, key: &str, holder: &str, ttl_ms: u64) -> Result<Arc<Lease>, BlockError> {
        let sent = now_ms();
        match client.mgmt.write(MgmtCmd::LeaseAcquire { key: key.to_owned(), holder: holder.to_owned(), now_ms: sent, ttl_ms }).await {
            Ok(MgmtReply::Lease { .. }) => Ok(Arc::new(Lease {
                client: client.clone(),
                key: key.to_owned(),
                holder: holder.to_owned(),
                ttl_ms,
                valid_until_ms: AtomicU64::new(sent + ttl_ms),
                released: AtomicBool::new(false),
            })),
            Ok(other) => Err(BlockError::Client(ClientError::Invalid(format!("unexpected reply to a lease request: {other:?}")))),
            Err(RpcError::Remote(r)) if r.code == ErrorCode::Conflict => Err(BlockError::Held(r.message)),
            Err(e) => Err(BlockError::Client(e.into())),
        }
    }

    /// Acquire, retrying while another holder has it, up to `wait`.
    pub async fn acquire_waiting(client: &Client, key: &str, holder: &str, ttl_ms: u64, wait: Duration) -> Result<Arc<Lease>, BlockError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match Self::acquire(client, key, holder, ttl_ms).await {
                Err(BlockError::Held(m)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(key, "lease busy ({m}); retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }

    pub fn valid(&self) -> bool {
        !self.released.load(Ordering::Acquire) && now_ms() + LEASE_MARGIN_MS < self.valid_until_ms.load(Ordering::Acquire)
    }

    async fn renew(&self) -> Result<(), BlockError> {
        let sent = now_ms();
        match self.client.mgmt.write(MgmtCmd::LeaseAcquire { key: self.key.clone(), holder: self.holder.clone(), now_ms: sent, ttl_ms: self.ttl_ms }).await {
            Ok(_) => {
                self.valid_until_ms.store(sent + self.ttl_ms, Ordering::Release);
                Ok(())
            }
            Err(RpcError::Remote(r)) if r.code == ErrorCode::Conflict => Err(BlockError::Held(r.message)),
            Err(e) => Err(BlockError::Client(e.into())),
        }
    }

    /// Renew every third of the TTL until released (or until someone else took it).
    pub fn keep_renewed(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = Duration::from_millis((self.ttl_ms / 3).max(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(l) = weak.upgrade() else { return };
                if l.released.load(Ordering::Acquire) {
                    return;
                }
                match l.renew().await {
                    Ok(()) => {}
                    Err(BlockError::Held(m)) => {
                        tracing::error!(key = %l.key, "writer lease lost: {m}; writes now fail");
                        l.released.store(true, Ordering::Release);
                        return;
                    }
                    // Keep trying: the lease stays valid until its deadline passes.
                    Err(e) => tracing::warn!(key = %l.key, error = %e, "lease renewal failed; retrying"),
                }
            }
        });
    }

    pub async fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.client.mgmt.write(MgmtCmd::LeaseRelease { key: self.key.clone(), holder: self.holder.clone() }).await {
            tracing::warn!(key = %self.key, error = %e, "lease release failed; it expires on its own");
        }
    }
}
