//! `strata-kv`: the transactional key-value layer of seed 002, on top of Strata objects.
//!
//! A KV store is a container of type `kv` (or `posix`: the file system keeps its metadata in
//! KV tables) holding one object per table, its id derived from the table number (never
//! stored). The **sharding manager** ([`shard_map`]) maps a user key to a shard by the
//! function recorded in the container (`hash` by default, `range`, `prefix`); a shard is one
//! dkey of the table's object, so it lives in one redundancy group chosen by placement and
//! inherits replication and rebuild from the object layer. Within a shard, user keys are akeys
//! in byte order, so a scan of one shard is an akey enumeration and a scan across shards is a
//! k-way merge of per-shard pages at one epoch.
//!
//! Every request for a shard goes to the shard's **leader** (the first replica holding all of
//! its data), which runs the transaction logic (`strata-engine`'s `txn.rs`): locks, intent
//! records, transaction records, resolution. The client side is here: the **transaction
//! cache** ([`Txn`]: buffered writes, reads of its own writes, the read set), one-round commit
//! for one shard, two-phase commit otherwise (the record on the first written key's shard; the
//! commit point is that record saying Committed), snapshots ([`KvStore::snapshot_create`]: an
//! epoch at least every engine's clock, recorded in the management service and so kept from
//! aggregation).
//!
//! **Isolation** (exactly what is guaranteed):
//! - Committed transactions are **serializable** in commit-epoch order: each commits
//!   atomically at one epoch, and if T2 read or overwrote something T1 wrote, T2's epoch is
//!   larger. Reads, scans (phantoms included: a scanned range is validated and locked) and
//!   writes are all covered; write skew is refused.
//! - A transaction reads a consistent snapshot at its read epoch (fixed at `begin`), plus its
//!   own writes. A read-only transaction always commits (at its read epoch); it may miss a
//!   commit that finished, on another client, within the clock uncertainty before it began
//!   (serializable, not strictly serializable across clients). A client always sees its own
//!   earlier commits (its clock merges every epoch it is answered).
//! - Single-key `get` at the newest epoch is linearizable (the shard leader picks the epoch
//!   after every commit it acknowledged). `get_at`/`scan_at` at a snapshot epoch return the same
//!   answer every time.
//! - A commit that fails with [`KvError::Conflict`], [`KvError::CasFailed`] or
//!   [`KvError::Deadline`] wrote nothing. [`KvError::Indeterminate`] and
//!   [`KvError::Unavailable`] from `commit` may or may not have committed (the coordinator or a
//!   replica failed at the commit point); nothing is ever partly visible. A refusal that follows
//!   an attempt whose answer was lost is `Indeterminate`, not `Conflict`: the lost attempt may
//!   have committed, and the refusal may be caused by its own writes.
//! - Conflicts: an older transaction waits for a younger lock holder (up to 3 s), a younger
//!   one aborts at once (wait-die: no deadlocks); readers wait for an undecided transaction
//!   holding a key below their epoch, asking its coordinator, and abort it once it has been
//!   undecided for 4 s (its client died). `put`/`delete`/`cas` retry conflicts themselves.
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
//! [`shard_map::SHARDS_MAX`] shards per store; a transaction buffers at most
//! [`TXN_WRITE_BYTES_MAX`] of writes over [`TXN_WRITES_MAX`] keys and reads at most
//! [`TXN_READS_MAX`] keys and ranges; scans return at most
//! [`txn_script::SCAN_LIMIT_MAX`] keys. Design note: `docs/kv.md`.

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
