//! `strata-kv`: the transactional key-value layer of seed 002, on top of Strata objects.
//!
//! A KV store is a container of type `kv` holding one KV object. The **sharding manager**
//! ([`shard_map`]) maps a user key to a shard; a shard is one dkey of that object, so it lives
//! in one redundancy group chosen by placement and inherits replication/EC and rebuild from the
//! object layer. Within a shard, user keys are akeys in byte order, so a scan of one shard is an
//! akey enumeration and a scan across shards is a k-way merge.
//!
//! This crate also owns the transaction script language of `strata kv txn` ([`txn_script`]) and
//! the serializability checker used by the fault tests ([`history_check`]).
//!
//! Limits: keys 1..=[`KEY_BYTES_MAX`] bytes, values up to [`VALUE_BYTES_MAX`] bytes, at most
//! [`shard_map::SHARDS_MAX`] shards per store.

pub mod history_check;
pub mod shard_map;
pub mod txn_script;

/// Longest user key; keys are akeys in the object store, which bounds them.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value; larger blobs belong in array objects or the file system.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
