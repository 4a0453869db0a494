//! A mount's session: a lease in the management service that the mount renews while it lives
//! (every third of its TTL). An orphan (a file unlinked while a mount had it open) records the
//! session of that mount. Its last close there reclaims it; if the mount dies first, any
//! other mount (or `strata fs orphans --reclaim`) reclaims it once the session's lease has
//! expired, so a crashed mount leaks nothing.
//!
//! Liveness is asked of the management service, whose lease table is the one authority: a
//! probe acquires the session's key for 1 ms under a throwaway holder; `Conflict` means the
//! mount still holds it. A mount that could not renew for a whole TTL (cut off from the
//! management service) may lose its orphans: its open descriptors then read `ENOENT`.

use crate::file_data::{data_oid, DataStore};
use crate::fs_error::FsError;
use crate::meta_schema::Kind;
use crate::volume::Volume;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strata_client::Client;
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtReply};
use strata_rpc::{ErrorCode, RpcError};

/// How long a dead mount's orphans wait before another mount may reclaim them.
pub const SESSION_TTL_MS_DEFAULT: u64 = 30_000;
pub const SESSION_TTL_MS_MIN: u64 = 1_000;
/// Orphans examined per reclaim pass (the rest wait for the next pass).
pub const RECLAIM_BATCH_MAX: usize = 1024;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn mgmt_err(what: &str, e: RpcError) -> FsError {
    FsError::Data(format!("{what}: {e}"))
}

async fn acquire(client: &Client, key: &str, holder: &str, ttl_ms: u64) -> Result<bool, FsError> {
    match client.mgmt.write(MgmtCmd::LeaseAcquire { key: key.to_owned(), holder: holder.to_owned(), now_ms: now_ms(), ttl_ms }).await {
        Ok(MgmtReply::Lease { .. }) => Ok(true),
        Ok(other) => Err(FsError::Data(format!("unexpected reply to a lease request: {other:?}"))),
        Err(RpcError::Remote(r)) if r.code == ErrorCode::Conflict => Ok(false),
        Err(e) => Err(mgmt_err("mount session lease", e)),
    }
}

async fn release(client: &Client, key: &str, holder: &str) -> Result<(), FsError> {
    client.mgmt.write(MgmtCmd::LeaseRelease { key: key.to_owned(), holder: holder.to_owned() }).await.map(|_| ()).map_err(|e| mgmt_err("releasing a mount session lease", e))
}

pub struct MountSession {
    client: Client,
    pub key: String,
    holder: String,
    renew: tokio::task::JoinHandle<()>,
}

impl MountSession {
    /// Take a new session lease for this mount of `vol` and keep renewing it; orphans made
    /// through `vol.ns` from now on name it.
    pub async fn start(vol: &Volume, ttl_ms: u64) -> Result<MountSession, FsError> {
        let ttl_ms = ttl_ms.max(SESSION_TTL_MS_MIN);
        let client = vol.cont.pool.client().clone();
        let key = format!("fs-mount/{}/{}/{:016x}", vol.cont.info.pool, vol.cont.info.id, rand::random::<u64>());
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into());
        let holder = format!("strata-fs-mount@{host}:{}", std::process::id());
        if !acquire(&client, &key, &holder, ttl_ms).await? {
            return Err(FsError::Data(format!("mount session {key} is already held (random key collision); mount again")));
        }
        vol.ns.set_session(key.clone());
        let (c, k, h) = (client.clone(), key.clone(), holder.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(ttl_ms / 3)).await;
                match acquire(&c, &k, &h, ttl_ms).await {
                    Ok(true) => {}
                    Ok(false) => tracing::error!(session = %k, "another holder took this mount's session; its unlinked open files may be reclaimed"),
                    Err(e) => tracing::warn!(session = %k, error = %e, "could not renew the mount session; retrying"),
                }
            }
        });
        Ok(MountSession { client, key, holder, renew })
    }

    /// Stop renewing and give the lease up (a clean unmount).
    pub async fn end(self) {
        self.renew.abort();
        if let Err(e) = release(&self.client, &self.key, &self.holder).await {
            tracing::warn!(session = %self.key, error = %e, "could not release the mount session; it expires by itself");
        }
    }
}

impl Drop for MountSession {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// Whether the mount of session `key` is alive (its lease is held).
async fn session_alive(client: &Client, key: &str) -> Result<bool, FsError> {
    if key.is_empty() {
        // An orphan from before sessions: no mount can still claim it.
        return Ok(false);
    }
    let probe = format!("strata-fs-probe:{}:{:08x}", std::process::id(), rand::random::<u32>());
    if acquire(client, key, &probe, 1).await? {
        release(client, key, &probe).await?;
        return Ok(false);
    }
    Ok(true)
}

#[derive(Clone, Debug, Serialize)]
pub struct OrphanState {
    pub ino: u64,
    pub session: String,
    pub alive: bool,
    pub reclaimed: bool,
}

/// Examine up to [`RECLAIM_BATCH_MAX`] orphans; with `reclaim`, delete those whose session
/// is dead (never `own`, this mount's) and punch their data.
pub async fn orphans(vol: &Volume, own: Option<&str>, reclaim: bool) -> Result<Vec<OrphanState>, FsError> {
    let client = vol.cont.pool.client();
    let mut out = Vec::new();
    for (ino, o) in vol.ns.orphans(RECLAIM_BATCH_MAX).await? {
        let alive = own == Some(o.session.as_str()) || session_alive(client, &o.session).await?;
        let mut reclaimed = false;
        if !alive && reclaim {
            if let Some(i) = vol.ns.reclaim_orphan(ino).await? {
                if i.kind == Kind::File && (i.data_version > 0 || i.size > 0) {
                    let class = i.oclass.clone().unwrap_or_else(|| vol.ns.default_oclass.clone());
                    // The inode is gone: a failed punch leaves unreachable garbage, no more.
                    if let Err(e) = vol.data.punch_object(data_oid(ino, &class)?).await {
                        tracing::warn!(ino, error = %e, "could not punch a reclaimed orphan's data");
                    }
                }
                tracing::info!(ino, session = %o.session, "reclaimed the orphan of a dead mount");
            }
            reclaimed = true;
        }
        out.push(OrphanState { ino, session: o.session, alive, reclaimed });
    }
    Ok(out)
}
