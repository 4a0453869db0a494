//! `strata-block`: block volumes (seed 004, Torus) and the NBD server that exports them.
//!
//! A **volume** lives in a container of type `block`: an array object of its class (checksums
//! always on: every extent carries a crc32c that the engine verifies on read), dkey = block
//! number (big-endian u64, default 512 KiB blocks), one akey. Its record (size, block size,
//! class, layer stack, snapshots) is a single value in the container's metadata object
//! ([`volume_meta`]). A **snapshot** pins an epoch (also registered as a container snapshot so
//! aggregation keeps its versions); copy-on-write is free because the object store keeps
//! versions. A **clone** is a new object stacked on the parent's snapshot: reads fall through to
//! the parent at the snapshot epoch until the clone writes. **Rollback** stacks a fresh head on
//! the snapshot, so newer snapshots stay readable.
//!
//! The **NBD server** is written here from the protocol document: fixed newstyle negotiation
//! ([`nbd_handshake`]), transmission with many requests in flight and one reply writer
//! ([`nbd_transmission`]). One server at a time may export a volume for writing (a writer lease
//! in the management service, [`writer_lease`]). Writes go through a bounded write-back cache
//! per export ([`write_cache`]), as NBD allows: durable once FLUSHed or sent with FUA.
//!
//! Invariants:
//! - A write is acknowledged once in the export's cache; a FLUSH is answered once every write
//!   acknowledged before it is durable on every replica, a FUA write once it is. TRIM and
//!   WRITE_ZEROES are durable before their reply.
//! - A snapshot taken while a server holds dirty data first asks that server to hold new
//!   writes and write everything back ([`snapshot_control`]), so it is one instant of the
//!   volume as its clients saw it.
//! - All blocks of one NBD request carry one epoch, taken from the writer's HLC; a snapshot
//!   epoch is chosen above every acknowledged write and the wall clock is let pass it.
//! - Limits: requests carry at most [`NbdLimits::payload_bytes_max`]; in-flight bytes per
//!   connection, block operations per volume, options per negotiation and connections per
//!   server are bounded.

pub mod block_device;
pub mod extent_map;
pub mod nbd_handshake;
pub mod nbd_server;
pub mod nbd_transmission;
pub mod nbd_wire;
pub mod payload_pool;
pub mod read_cache;
pub mod volume_admin;
pub mod volume_exports;
pub mod volume_io;
pub mod snapshot_control;
pub mod volume_meta;
pub mod write_cache;
pub mod writer_lease;

#[cfg(test)]
mod nbd_tests;

pub use block_device::{BlockDevice, DevError, ExportDesc, Exports, OpenError};
pub use volume_admin::BlockContainer;
pub use volume_exports::VolumeExports;
pub use volume_io::VolumeIo;
pub use volume_meta::{VolumeMeta, BLOCK_BYTES_DEFAULT};
pub use write_cache::{CacheConfig, WriteBackCache};

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Client(#[from] strata_client::ClientError),
    #[error(transparent)]
    Meta(#[from] volume_meta::MetaError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoSpace(String),
    /// A lease someone else holds.
    #[error("{0}")]
    Held(String),
    /// Refused because something depends on it (clones of a snapshot or volume).
    #[error("{0}")]
    InUse(String),
}

/// Limits of one NBD server.
#[derive(Clone, Debug)]
pub struct NbdLimits {
    /// Largest READ or WRITE payload (advertised as the maximum block size); larger requests
    /// get `EOVERFLOW`.
    pub payload_bytes_max: u32,
    /// Advertised minimum block size, enforced for clients that asked for the constraints.
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    /// Request payload bytes in flight per connection (reads and writes).
    pub inflight_bytes_max: u64,
    /// Largest option data in negotiation, and how many options before transmission.
    pub option_bytes_max: u32,
    pub options_max: u32,
    pub handshake_timeout: Duration,
    pub connections_max: usize,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            payload_bytes_max: PAYLOAD_BYTES_MAX_DEFAULT,
            min_block_bytes: 512,
            preferred_block_bytes: 4096,
            inflight_bytes_max: INFLIGHT_BYTES_MAX_DEFAULT,
            option_bytes_max: 64 << 10,
            options_max: 1024,
            handshake_timeout: Duration::from_secs(30),
            connections_max: 256,
        }
    }
}

/// 32 MiB: what qemu and libnbd clients expect at most by default.
pub const PAYLOAD_BYTES_MAX_DEFAULT: u32 = 32 << 20;
pub const INFLIGHT_BYTES_MAX_DEFAULT: u64 = 128 << 20;
// The in-flight budget holds several maximal requests (transmission also enforces one at least).
const _: () = assert!(INFLIGHT_BYTES_MAX_DEFAULT >= 4 * PAYLOAD_BYTES_MAX_DEFAULT as u64);
