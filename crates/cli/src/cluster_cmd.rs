//! Shared plumbing of the commands that talk to a running cluster.

use std::path::PathBuf;
use strata_client::{Client, ClusterFile};
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtQuery, MgmtReply};

#[derive(clap::Args, Clone, Debug)]
pub struct Conn {
    /// Cluster file (default: $STRATA_CLUSTER, then ~/.strata/cluster.json written by `strata up`).
    #[arg(long, global = true)]
    pub cluster: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    pub async fn client(&self) -> anyhow::Result<Client> {
        let f = ClusterFile::locate(self.cluster.as_deref())?;
        Ok(Client::connect(&f).await?)
    }

    pub async fn query(&self, q: MgmtQuery) -> anyhow::Result<MgmtReply> {
        Ok(self.client().await?.mgmt.query(q).await?)
    }

    pub async fn write(&self, c: MgmtCmd) -> anyhow::Result<MgmtReply> {
        Ok(self.client().await?.mgmt.write(c).await?)
    }
}

pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// Split `POOL/CONT`.
pub fn pool_cont(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((p, c)) if !p.is_empty() && !c.is_empty() => Ok((p.to_owned(), c.to_owned())),
        _ => anyhow::bail!("'{s}' must be POOL/CONTAINER, e.g. tank/demo"),
    }
}
