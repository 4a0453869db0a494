//! `strata-placement`: where every shard of every object lives, computed and never stored.
//!
//! Owns the [`PoolMap`] (a pool's versioned target list with fault domains, labels and checked
//! state transitions), the layout computation ([`PlacementMap::layout`]: jump consistent hash
//! over the fault-domain tree, see `layout.rs` for the algorithm and what moves when), and the
//! resource query language of seed 003 ([`resource_query`]) used to select targets for pools.
//!
//! Pure library: no I/O, no clocks, no randomness; every function is deterministic in its
//! inputs, so clients and engines compute identical layouts from the same map.
//!
//! Invariants:
//! - Shards of one group sit on distinct nodes of the highest tree level that has enough nodes
//!   (host before rank before target).
//! - A target leaving the layout (`DOWN`, `DOWNOUT`, `DRAIN`) moves only the shards that lived
//!   on it; bringing it back restores them exactly.
//! - Every map change bumps `PoolMap::version`.
//!
//! Limits: at most 2^32 targets per map; fault-domain paths of 1 to 8 components.

mod error;
pub mod jump_hash;
mod layout;
mod pool_map;
pub mod resource_query;

pub use error::PlacementError;
pub use layout::{diff_layouts, group_for_dkey, read_source, Layout, PlacementMap, ShardLoc, ShardMove};
pub use pool_map::{FaultDomain, PoolMap, PoolTarget, TargetState, POOL_MAP_FORMAT_V1};
