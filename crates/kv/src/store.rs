//! The client side of a KV store: opening it, point operations, scans across shards, snapshots.
//! Transactions are in [`crate::txn`]; the wire traffic goes through [`crate::route`].

use crate::error::KvError;
use crate::route::Route;
use crate::shard_map::{ShardFunction, ShardMap};
use crate::txn::Txn;
use crate::{check_key, check_value, KEY_BYTES_MAX};
use std::collections::BTreeMap;
use std::sync::Arc;
use strata_client::ContHandle;
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, MgmtQuery, MgmtReply};
use strata_types::{Epoch, GroupCount, ObjectClass, ObjectType, Oid, Redundancy, TargetId};

/// Container property holding the store's shard function (`hash:64`, `range:g,n`, `prefix:4`).
pub const PROP_SHARD: &str = "kv.shard";
/// Container property holding the store object's class (default: the container's class
/// spread over as many groups as fit, so shards spread over the pool).
pub const PROP_OCLASS: &str = "kv.oclass";
/// Object sequence numbers at and above this are reserved for KV tables (the container's
/// allocator hands out small numbers from 1), so a table's object id is derived, never stored.
const TABLE_SEQ_BASE: u128 = 1 << 95;

/// How to open a store. The defaults open the container's main store (table 0).
#[derive(Clone, Debug, Default)]
pub struct KvOptions {
    /// Independent stores in one container (e.g. a file system's dentry and inode tables).
    pub table: u32,
    /// Shard function; `None`: the container's `kv.shard` property, else `hash:64`. A table
    /// must always be opened with the same function (the first open of the main table records
    /// it in the container when the container has none).
    pub shard: Option<ShardFunction>,
    /// Object class; `None`: the container's `kv.oclass` property, else the container's class
    /// with `GX` groups.
    pub oclass: Option<ObjectClass>,
}

/// A KV store: cheap to clone, share it between tasks.
#[derive(Clone)]
pub struct KvStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cont: ContHandle,
    pub(crate) oid: Oid,
    pub(crate) map: ShardMap,
    pub(crate) route: Route,
}

/// Where one key lives, for `strata kv locate` and tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyLocation {
    pub shard: u32,
    pub dkey: Vec<u8>,
    pub group: usize,
    /// The shard's leader (serves its reads, locks and transactions).
    pub leader: Option<String>,
    pub leader_rank: Option<u32>,
    pub replicas: Vec<String>,
}

fn default_class(cont_class: &str) -> Result<ObjectClass, KvError> {
    let c: ObjectClass = cont_class.parse().map_err(|e| KvError::NotAStore(format!("container class: {e}")))?;
    Ok(match c.redundancy() {
        Redundancy::Replicas(n) => ObjectClass::replicated(n, GroupCount::Max).unwrap_or(c),
        Redundancy::None => ObjectClass::striped(GroupCount::Max).unwrap_or(c),
        Redundancy::Erasure { .. } => c,
    })
}

impl KvStore {
    /// Open the main store of a container of type `kv` (or `posix`, whose metadata is KV).
    pub async fn open(cont: &ContHandle) -> Result<KvStore, KvError> {
        Self::open_with(cont, &KvOptions::default()).await
    }

    pub async fn open_with(cont: &ContHandle, opts: &KvOptions) -> Result<KvStore, KvError> {
        let info = &cont.info;
        if !matches!(info.ctype, ContType::Kv | ContType::Posix) {
            return Err(KvError::NotAStore(format!("container '{}' is of type {}, not kv; create one with `strata cont create POOL NAME --type kv`", info.label, info.ctype.name())));
        }
        let prop_fn = info.props.get(PROP_SHARD).map(|s| s.parse::<ShardFunction>()).transpose().map_err(|e| KvError::NotAStore(format!("container property {PROP_SHARD}: {e}")))?;
        let function = match (&opts.shard, &prop_fn) {
            (Some(f), Some(p)) if opts.table == 0 && f != p => {
                return Err(KvError::NotAStore(format!("store '{}' shards by {p}, not {f}; open it without a shard function", info.label)));
            }
            (Some(f), _) => f.clone(),
            (None, Some(p)) => p.clone(),
            (None, None) => ShardFunction::Hash { shards: crate::shard_map::SHARDS_DEFAULT },
        };
        if opts.table == 0 && prop_fn.is_none() {
            // Record the function so every later open (and every other client) agrees.
            let cmd = MgmtCmd::SetProp { pool: info.pool.to_string(), cont: info.id.to_string(), key: PROP_SHARD.into(), value: function.to_string() };
            cont.pool.client().mgmt.write(cmd).await.map_err(|e| KvError::Unavailable(format!("cannot record the shard function: {e}")))?;
        }
        let class = match (&opts.oclass, info.props.get(PROP_OCLASS)) {
            (Some(c), _) => *c,
            (None, Some(p)) => p.parse().map_err(|e| KvError::NotAStore(format!("container property {PROP_OCLASS}: {e}")))?,
            (None, None) => default_class(&info.oclass)?,
        };
        if matches!(class.redundancy(), Redundancy::Erasure { .. }) {
            return Err(KvError::NotAStore(format!("KV stores need a replicated (RP_*) or striped (S*) class, not {class}; set the container property {PROP_OCLASS}")));
        }
        let oid = Oid::new(ObjectType::Kv, class, TABLE_SEQ_BASE + u128::from(opts.table));
        cont.pool.layout(oid)?;
        let route = Route::new(cont.clone(), oid);
        Ok(KvStore { inner: Arc::new(Inner { cont: cont.clone(), oid, map: ShardMap::new(function), route }) })
    }

    pub fn shard_map(&self) -> &ShardMap {
        &self.inner.map
    }

    pub fn oid(&self) -> Oid {
        self.inner.oid
    }

    pub fn container(&self) -> &ContHandle {
        &self.inner.cont
    }

    /// The sharding manager's answer to "which node owns this key".
    pub fn locate(&self, key: &[u8]) -> Result<KeyLocation, KvError> {
        check_key(key)?;
        let shard = self.inner.map.shard_of(key);
        let dkey = ShardMap::shard_dkey(shard).to_vec();
        let info = self.inner.cont.pool.info()?;
        let layout = self.inner.cont.pool.layout(self.inner.oid)?;
        let group = layout.group_for_dkey(&dkey);
        let name = |t: TargetId| format!("rank {} target {} ({})", t.rank, t.index, info.rank_addrs.get(&t.rank).map(String::as_str).unwrap_or("?"));
        let leader_target = strata_rpc::kv_msg::kv_leader(&info.map, layout.group(group));
        let replicas = layout.group(group).iter().map(|s| name(s.target)).collect();
        Ok(KeyLocation { shard, dkey, group, leader: leader_target.map(name), leader_rank: leader_target.map(|t| t.rank.0), replicas })
    }

    /// The newest committed value.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        Ok(self.inner.route.get(&self.inner.map, key, None).await?.0)
    }

    /// The value as of `epoch` (a snapshot's epoch, or one a commit returned).
    pub async fn get_at(&self, key: &[u8], epoch: Epoch) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        Ok(self.inner.route.get(&self.inner.map, key, Some(epoch)).await?.0)
    }

    /// Set `key` (one-shard transaction); returns the commit epoch.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Epoch, KvError> {
        check_key(key)?;
        check_value(value)?;
        self.inner.route.write1(&self.inner.map, key, None, Some(value)).await
    }

    /// Delete `key` (absent keys too); returns the commit epoch.
    pub async fn delete(&self, key: &[u8]) -> Result<Epoch, KvError> {
        check_key(key)?;
        self.inner.route.write1(&self.inner.map, key, None, None).await
    }

    /// Atomically: if the value of `key` is `expected` (`None` = absent), set it to `new`
    /// (`None` = delete). Fails with [`KvError::CasFailed`] carrying the current value.
    pub async fn cas(&self, key: &[u8], expected: Option<&[u8]>, new: Option<&[u8]>) -> Result<Epoch, KvError> {
        check_key(key)?;
        if let Some(v) = new {
            check_value(v)?;
        }
        self.inner.route.write1(&self.inner.map, key, Some(expected), new).await
    }

    /// Keys in `[start, end)` (`end = None`: to the last key) with their values, in key order,
    /// at most `limit`, as of the newest epoch: one consistent cut across shards.
    pub async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        let at = self.inner.route.now()?;
        self.scan_at(start, end, limit, at).await
    }

    /// [`KvStore::scan`] as of `epoch`.
    pub async fn scan_at(&self, start: &[u8], end: Option<&[u8]>, limit: usize, epoch: Epoch) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        check_range(start, end, limit)?;
        self.inner.route.scan(&self.inner.map, start, end, limit, epoch).await
    }

    /// Start a transaction reading at a fresh epoch; writes are buffered until `commit`.
    pub fn begin(&self) -> Txn {
        Txn::new(self.clone())
    }

    /// Create a named snapshot: an epoch at least the newest clock of every engine, so it
    /// covers every commit acknowledged before this call; kept from aggregation.
    pub async fn snapshot_create(&self, name: &str) -> Result<Epoch, KvError> {
        if name.is_empty() || name.len() > 128 || name.contains('/') {
            return Err(KvError::InvalidKey(format!("snapshot name '{name}': use 1..=128 characters without '/'")));
        }
        let epoch = self.inner.route.max_epoch().await?;
        let info = &self.inner.cont.info;
        let cmd = MgmtCmd::SnapshotCreate { pool: info.pool.to_string(), cont: info.id.to_string(), name: name.to_owned(), epoch };
        self.inner.cont.pool.client().mgmt.write(cmd).await.map_err(|e| KvError::Unavailable(format!("cannot record snapshot '{name}': {e}")))?;
        Ok(epoch)
    }

    /// Named snapshots of this store's container.
    pub async fn snapshots(&self) -> Result<BTreeMap<String, Epoch>, KvError> {
        let info = &self.inner.cont.info;
        match self.inner.cont.pool.client().mgmt.query(MgmtQuery::Cont { pool: info.pool.to_string(), cont: info.id.to_string() }).await {
            Ok(MgmtReply::Cont(c)) => Ok(c.snapshots),
            Ok(other) => Err(KvError::Remote(format!("unexpected management reply {other:?}"))),
            Err(e) => Err(KvError::Unavailable(format!("cannot list snapshots: {e}"))),
        }
    }

    /// The epoch of a named snapshot, for `get_at` / `scan_at`.
    pub async fn snapshot_epoch(&self, name: &str) -> Result<Epoch, KvError> {
        self.snapshots().await?.get(name).copied().ok_or_else(|| KvError::NoSnapshot { name: name.to_owned() })
    }
}

pub(crate) fn check_range(start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<(), KvError> {
    if start.len() > KEY_BYTES_MAX || end.is_some_and(|e| e.len() > KEY_BYTES_MAX) {
        return Err(KvError::TooLarge { what: "scan bound", got: start.len().max(end.map_or(0, <[u8]>::len)), max: KEY_BYTES_MAX });
    }
    if limit > crate::txn_script::SCAN_LIMIT_MAX {
        return Err(KvError::TooLarge { what: "scan limit", got: limit, max: crate::txn_script::SCAN_LIMIT_MAX });
    }
    Ok(())
}
