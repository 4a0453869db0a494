//! `strata-engine`: the data-plane server of one rank (DAOS's engine).
//!
//! Owns the rank's targets (one [`strata_vos::Vos`] each), the pool maps it serves under, and
//! the replication protocol: the client sends an update to the group's leader shard (the first
//! shard of the group in the current layout); the leader picks the epoch from its hybrid
//! logical clock, writes locally and forwards to the other replicas in parallel, and
//! acknowledges only after every replica in the current map has made it durable.
//!
//! Fencing: every request names the pool-map version the client used. An engine holding a
//! newer map refuses with `StaleMap` (the client refreshes and retries); an engine holding an
//! older one first fetches the newer map from the management service.
//!
//! Limits: requests as `strata-rpc` bounds them; updates per request 4096 (VOS batch limit).
//! Erasure-coded updates are serialized per stripe by the group's first parity shard.
//!
//! Self-healing lives here too: rebuild (replicas copied, EC cells decoded from k survivors by
//! [`ec_rebuild`]), reintegration resync, drain, and scrub with repair from healthy shards.
//! Background aggregation (`aggregation.rs`) merges away versions below the engine's clock
//! minus a margin, keeping every container snapshot.

pub mod ec_rebuild;
mod engine;

pub use engine::aggregation::{aggregation_upto, AggregationConfig, AGGREGATION_MARGIN_MS_MIN};
pub use engine::{Engine, EngineConfig};
