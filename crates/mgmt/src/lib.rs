//! `strata-mgmt`: the management service (DAOS's control plane, Torus's consistent metadata
//! service, Containerfs's volume manager), replicated with Raft (`openraft`) across 1, 3 or 5
//! access points.
//!
//! It owns system membership (ranks, addresses, fault domains, states), pools and their pool
//! maps, containers (type, default object class, redundancy factor, properties, snapshots),
//! object-id allocation and leases. Changes are [`strata_rpc::mgmt_msg::MgmtCmd`]s applied
//! deterministically by [`state_machine::MgmtState::apply`] on every replica; reads are served by
//! the leader after confirming its leadership. Liveness (heartbeats) is leader memory, not
//! replicated: a rank silent past `heartbeat_timeout` is marked dead through Raft and its
//! targets go `DOWN` in every pool.
//!
//! Invariants: applying the same commands in the same order gives the same state (no clocks or
//! randomness in `apply`); an acknowledged change is in a majority's synced log; every pool-map
//! change bumps its version. Limits: labels of 127 characters, 1..=64 targets per rank,
//! 1 Mi object ids per allocation.

pub mod raft_network;
pub mod raft_store;
pub mod service;
pub mod state_machine;

pub use service::{MgmtConfig, MgmtNode};
