//! `strata-kv`: the transactional key-value layer of seed 002, on top of Strata objects.
//!
//! A KV store is a container of type `kv` holding one KV object. The **sharding manager**
//! ([`shard_map`]) maps a user key to a shard; a shard is one dkey of that object, so it lives
//! in one redundancy group chosen by placement and inherits replication/EC and rebuild from the
//! object layer. Within a shard, user keys are akeys in byte order, so a scan of one shard is an
//! akey enumeration and a scan across shards is a k-way merge.
//!
//! API (stable; the file system builds on it):
//! ```no_run
//! # async fn demo(cont: strata_client::ContHandle) -> Result<(), strata_kv::KvError> {
//! use strata_kv::{KvError, KvStore};
//! let kv = KvStore::open(&cont).await?;
//! kv.put(b"alice", b"100").await?;
//! kv.cas(b"alice", Some(b"100"), Some(b"90")).await?;
//! let rows = kv.scan(b"a", Some(b"b"), 100).await?;
//! loop {
//!     let mut t = kv.begin();
//!     let a = t.get(b"alice").await?;
//!     t.put(b"bob", b"10")?;
//!     match t.commit().await {
//!         Ok(epoch) => break,
//!         Err(e) if e.is_retryable() => continue,
//!         Err(e) => return Err(e),
//!     }
//! }
//! let snap = kv.snapshot_create("nightly").await?;
//! let old = kv.get_at(b"alice", snap).await?;
//! # Ok(()) }
//! ```
//!
//! This crate also owns the transaction script language of `strata kv txn` ([`txn_script`]) and
//! the serializability checker used by the fault tests ([`history_check`]).
//!
//! Limits: keys 1..=[`KEY_BYTES_MAX`] bytes, values up to [`VALUE_BYTES_MAX`] bytes, at most
//! [`shard_map::SHARDS_MAX`] shards per store.

mod error;
pub mod history_check;
mod route;
pub mod shard_map;
mod store;
mod txn;
pub mod txn_script;

pub use error::KvError;
pub use store::{KeyLocation, KvOptions, KvStore, PROP_OCLASS, PROP_SHARD};
pub use strata_rpc::kv_msg::TxnId;
pub use strata_types::Epoch;
pub use txn::{PreparedTxn, Txn, TXN_DEADLINE_DEFAULT, TXN_READS_MAX, TXN_WRITES_MAX, TXN_WRITE_BYTES_MAX};

/// Longest user key; keys are akeys in the object store, which bounds them.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value; larger blobs belong in array objects or the file system.
pub const VALUE_BYTES_MAX: usize = 1 << 20;

pub(crate) fn check_key(key: &[u8]) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::InvalidKey("keys must not be empty".into()));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(KvError::TooLarge { what: "key", got: key.len(), max: KEY_BYTES_MAX });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(KvError::TooLarge { what: "value", got: value.len(), max: VALUE_BYTES_MAX });
    }
    Ok(())
}

/// A key for messages: as text when printable, else hex.
pub fn show_key(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("'{s}'"),
        _ => format!("0x{}", k.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}
