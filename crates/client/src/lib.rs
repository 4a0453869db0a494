//! `strata-client`: the client library. Connects through a cluster file, opens pools and
//! containers via the management service, computes object layouts locally from the pool map
//! and talks to engines directly.
//!
//! Updates go to the group's leader shard; reads go to any shard of the group, trying the next
//! one when a replica is unreachable (degraded reads). A `StaleMap` answer, or an unreachable
//! engine, refreshes the pool map from the management service and retries until the
//! operation's deadline ([`OP_DEADLINE`]).
//!
//! An unclean container (more fault domains failed at once than its redundancy factor, so
//! objects may be lost) is refused at open and by every handle's next operation
//! ([`ClientError::Unclean`]); handles learn the status with the pool map, not by a query of
//! their own. Engines refuse requests by capability alone for it, with the same error.
//!
//! ```no_run
//! # async fn demo() -> Result<(), strata_client::ClientError> {
//! use strata_client::{Client, ClusterFile};
//! let client = Client::connect(&ClusterFile::locate(None)?).await?;
//! let cont = client.container("tank", "photos").await?;
//! let obj = cont.create_object("RP_3G1".parse().unwrap()).await?;
//! obj.put(b"dkey", b"akey", b"hello").await?;
//! assert_eq!(obj.get(b"dkey", b"akey").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

mod cluster_file;
mod object;

pub use cluster_file::ClusterFile;
pub use object::{Client, ContHandle, ObjHandle, PoolHandle, OP_DEADLINE};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cluster file: {0}")]
    ClusterFile(String),
    #[error(transparent)]
    Rpc(#[from] strata_rpc::RpcError),
    #[error("{0}")]
    Placement(#[from] strata_placement::PlacementError),
    #[error("{0}")]
    Invalid(String),
    #[error("gave up after {0:?}: {1}")]
    Deadline(std::time::Duration, String),
    /// More fault domains of the pool failed at once than the container's redundancy factor:
    /// objects may have lost every copy and would read as absent. Refused until an
    /// administrator accepts the loss (DAOS's `-DER_RF`).
    #[error("{}", reason.explain(pool, cont, *rf))]
    Unclean { pool: String, cont: String, rf: u8, reason: strata_rpc::mgmt_msg::UncleanReason },
}
