//! Volume administration in one block container: create, list, resize, delete, snapshot,
//! clone, rollback. Every change to a volume record runs under the container's metadata lease;
//! changes that must not race a writer (resize, rollback, delete) also take the volume's writer
//! lease, so they are refused while a server exports the volume for writing.
//!
//! Capacity: the provisioned footprint of every block volume in the pool (size times the
//! class's raw overhead: n for n replicas, (k+p)/k for EC) may not exceed the pool's size.
//! Snapshots and clones share unchanged data, but a clone is provisioned in full because it can
//! be rewritten in full.

use crate::snapshot_control;
use crate::volume_meta::*;
use crate::writer_lease::{holder_name, now_ms, Lease, WRITER_LEASE_TTL_MS_DEFAULT};
use crate::BlockError;
use std::collections::BTreeSet;
use std::time::Duration;
use strata_client::{Client, ContHandle, ObjHandle};
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, MgmtQuery, MgmtReply};
use strata_types::{Epoch, ObjectClass, ObjectType, Oid, Redundancy};

const META_LEASE_TTL_MS: u64 = 30_000;
/// How long an administrative command waits for another one holding the metadata lease.
const META_LEASE_WAIT: Duration = Duration::from_secs(20);
/// Longest wait for the wall clock to pass a snapshot epoch (bounded by the HLC's max drift).
const SNAPSHOT_CLOCK_WAIT: Duration = Duration::from_secs(2);
/// Tries when the volume's writer changes while a snapshot is taken.
const SNAPSHOT_ATTEMPTS: u32 = 3;

/// One block container: its volumes' records and data objects.
#[derive(Clone)]
pub struct BlockContainer {
    pub client: Client,
    pub cont: ContHandle,
    pub pool_name: String,
    pub cont_name: String,
    meta_obj: ObjHandle,
}

/// The raw bytes a volume of `size` provisions in class `class`.
pub fn footprint_bytes(size: u64, class: ObjectClass) -> u64 {
    match class.redundancy() {
        Redundancy::None => size,
        Redundancy::Replicas(n) => size.saturating_mul(n as u64),
        Redundancy::Erasure { data, parity } => (size as u128 * (data as u128 + parity as u128)).div_ceil(data as u128).min(u64::MAX as u128) as u64,
    }
}

impl BlockContainer {
    pub async fn open(client: &Client, pool: &str, cont: &str) -> Result<BlockContainer, BlockError> {
        let h = client.container(pool, cont).await?;
        if h.info.ctype != ContType::Block {
            return Err(BlockError::Invalid(format!(
                "container '{cont}' has type {}, not block; create one with `strata cont create {pool} NAME --type block --oclass RP_3GX`",
                h.info.ctype.name()
            )));
        }
        let class: ObjectClass = h.info.oclass.parse().map_err(|e| BlockError::Invalid(format!("container class: {e}")))?;
        let meta_obj = h.object(Oid::new(ObjectType::Internal, class, 0));
        Ok(BlockContainer { client: client.clone(), pool_name: pool.to_owned(), cont_name: cont.to_owned(), meta_obj, cont: h })
    }

    fn meta_lease_key(&self) -> String {
        format!("block-meta/{}/{}", self.cont.info.pool, self.cont.info.id)
    }

    pub fn writer_lease_key(&self, volume: &str) -> String {
        format!("block-writer/{}/{}/{volume}", self.cont.info.pool, self.cont.info.id)
    }

    /// Run `f` holding the container's metadata lease.
    async fn locked<T>(&self, f: impl std::future::Future<Output = Result<T, BlockError>>) -> Result<T, BlockError> {
        let lease = Lease::acquire_waiting(&self.client, &self.meta_lease_key(), &holder_name("block-admin"), META_LEASE_TTL_MS, META_LEASE_WAIT)
            .await
            .map_err(|e| match e {
                BlockError::Held(m) => BlockError::Held(format!("another volume command is still running on this container ({m}); retry later")),
                e => e,
            })?;
        let r = f.await;
        lease.release().await;
        r
    }

    /// Run `f` holding the volume's writer lease: refused while a server exports it for writing.
    async fn exclusive<T>(&self, volume: &str, f: impl std::future::Future<Output = Result<T, BlockError>>) -> Result<T, BlockError> {
        let lease = Lease::acquire(&self.client, &self.writer_lease_key(volume), &holder_name("block-admin"), WRITER_LEASE_TTL_MS_DEFAULT)
            .await
            .map_err(|e| match e {
                BlockError::Held(m) => BlockError::Held(format!("volume '{volume}' is exported for writing ({m}); disconnect its NBD clients or stop the server first")),
                e => e,
            })?;
        let r = f.await;
        lease.release().await;
        r
    }

    /// The live holder of lease `key`, if any.
    pub async fn lease_holder(&self, key: &str) -> Result<Option<String>, BlockError> {
        match self.client.mgmt.query(MgmtQuery::Lease { key: key.to_owned() }).await.map_err(strata_client::ClientError::from)? {
            MgmtReply::LeaseHolder(l) => Ok(l.filter(|(_, exp)| *exp > now_ms()).map(|(h, _)| h)),
            other => Err(BlockError::Invalid(format!("unexpected reply to a lease query: {other:?}"))),
        }
    }

    pub async fn get(&self, name: &str) -> Result<VolumeMeta, BlockError> {
        match self.meta_obj.get(&VolumeMeta::dkey(name), META_AKEY).await? {
            Some(b) => Ok(VolumeMeta::decode(name, &b)?),
            None => Err(BlockError::NotFound(format!("no volume '{name}' in {}/{}; `strata block list {}/{}` shows them", self.pool_name, self.cont_name, self.pool_name, self.cont_name))),
        }
    }

    async fn put(&self, m: &VolumeMeta) -> Result<(), BlockError> {
        self.meta_obj.put(&VolumeMeta::dkey(&m.name), META_AKEY, &m.encode()).await?;
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<VolumeMeta>, BlockError> {
        let mut out = Vec::new();
        for d in self.meta_obj.list_dkeys(Epoch::MAX).await? {
            let Some(name) = std::str::from_utf8(&d).ok().and_then(|s| s.strip_prefix(META_DKEY_PREFIX)) else { continue };
            if let Some(b) = self.meta_obj.get(&d, META_AKEY).await? {
                out.push(VolumeMeta::decode(name, &b)?);
            }
        }
        Ok(out)
    }

    /// Refuse a footprint change that would overcommit the pool.
    async fn check_capacity(&self, name: &str, size: u64, class: ObjectClass) -> Result<(), BlockError> {
        let pool = self.cont.pool.info()?;
        let conts = match self.client.mgmt.query(MgmtQuery::Conts { pool: self.pool_name.clone() }).await.map_err(strata_client::ClientError::from)? {
            MgmtReply::Conts(c) => c,
            other => return Err(BlockError::Invalid(format!("unexpected reply {other:?}"))),
        };
        let mut used = 0u64;
        for c in conts.iter().filter(|c| c.ctype == ContType::Block) {
            let bc = if c.id == self.cont.info.id { self.clone() } else { BlockContainer::open(&self.client, &self.pool_name, &c.id.to_string()).await? };
            for v in bc.list().await? {
                if c.id == self.cont.info.id && v.name == name {
                    continue;
                }
                let vc: ObjectClass = v.oclass.parse().map_err(|e| BlockError::Invalid(format!("volume {}: {e}", v.name)))?;
                used = used.saturating_add(footprint_bytes(v.size_bytes, vc));
            }
        }
        let need = footprint_bytes(size, class);
        if used.saturating_add(need) > pool.size_bytes {
            return Err(BlockError::NoSpace(format!(
                "volume '{name}' of {} in class {class} needs {} of raw space, but pool '{}' has {} of which block volumes already provision {}; use a smaller size, a leaner class, or a bigger pool",
                strata_types::human_bytes(size),
                strata_types::human_bytes(need),
                self.pool_name,
                strata_types::human_bytes(pool.size_bytes),
                strata_types::human_bytes(used)
            )));
        }
        Ok(())
    }

    fn check_size(size: u64) -> Result<(), BlockError> {
        if size == 0 || !size.is_multiple_of(SIZE_ALIGN_BYTES) || size > VOLUME_BYTES_MAX {
            return Err(BlockError::Invalid(format!("volume size {size} must be a non-zero multiple of {SIZE_ALIGN_BYTES} bytes up to {}", strata_types::human_bytes(VOLUME_BYTES_MAX))));
        }
        Ok(())
    }

    pub async fn create(&self, name: &str, size: u64, block_bytes: u32, oclass: Option<ObjectClass>) -> Result<VolumeMeta, BlockError> {
        check_name("volume", name).map_err(BlockError::Invalid)?;
        Self::check_size(size)?;
        if !block_bytes.is_power_of_two() || !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&block_bytes) {
            return Err(BlockError::Invalid(format!("block size {block_bytes} must be a power of two from {BLOCK_BYTES_MIN} to {BLOCK_BYTES_MAX}")));
        }
        let class = match oclass {
            Some(c) => c,
            None => self.cont.info.oclass.parse().map_err(|e| BlockError::Invalid(format!("container class: {e}")))?,
        };
        if class.redundancy_factor() < self.cont.info.rf as usize {
            let rf = self.cont.info.rf;
            return Err(BlockError::Invalid(format!(
                "container {}/{} has redundancy factor {rf}, and class {class} survives only {} failure(s): use --oclass RP_{}GX (or EC_2P{rf}GX), or a container created with a lower --rf",
                self.pool_name,
                self.cont_name,
                class.redundancy_factor(),
                rf + 1
            )));
        }
        self.locked(async {
            if self.get(name).await.is_ok() {
                return Err(BlockError::Exists(format!("volume '{name}' already exists in {}/{}", self.pool_name, self.cont_name)));
            }
            self.check_capacity(name, size, class).await?;
            let head = self.cont.create_object_typed(ObjectType::Array, class).await?;
            let m = VolumeMeta {
                format: VOLUME_FORMAT,
                name: name.to_owned(),
                size_bytes: size,
                block_bytes,
                chunk_bytes: CHUNK_BYTES_DEFAULT.min(block_bytes),
                oclass: class.to_string(),
                layers: vec![Layer { oid: head.oid, epoch: None, limit_bytes: size }],
                parent: None,
                snapshots: Default::default(),
                created_ms: now_ms(),
            };
            self.put(&m).await?;
            Ok(m)
        })
        .await
    }

    /// Grow, or (with `force`) shrink: blocks past the new end are punched, and lower layers
    /// are clipped so a later grow reads zeros there.
    pub async fn resize(&self, name: &str, size: u64, force: bool) -> Result<VolumeMeta, BlockError> {
        Self::check_size(size)?;
        self.locked(self.exclusive(name, async {
            let mut m = self.get(name).await?;
            if size < m.size_bytes && !force {
                return Err(BlockError::Invalid(format!(
                    "shrinking '{name}' from {} to {} destroys the data past the new end; pass --force if that is intended",
                    strata_types::human_bytes(m.size_bytes),
                    strata_types::human_bytes(size)
                )));
            }
            let class: ObjectClass = m.oclass.parse().map_err(|e| BlockError::Invalid(format!("{e}")))?;
            if size > m.size_bytes {
                self.check_capacity(name, size, class).await?;
            } else if size < m.size_bytes {
                let head = self.cont.object(m.head());
                let bs = m.block_bytes as u64;
                let first_gone = size.div_ceil(bs);
                for d in head.list_dkeys(Epoch::MAX).await? {
                    let Ok(b) = <[u8; 8]>::try_from(d.as_slice()) else { continue };
                    if u64::from_be_bytes(b) >= first_gone {
                        head.punch_dkey(&d).await?;
                    }
                }
                if !size.is_multiple_of(bs) {
                    let ops = crate::volume_io::punch_ops(size % bs, bs - size % bs, bs, m.chunk_bytes as u64);
                    head.update_ops_at(&(size / bs).to_be_bytes(), ops, bytes::Bytes::new(), None).await?;
                }
                for l in m.layers.iter_mut() {
                    l.limit_bytes = l.limit_bytes.min(size);
                }
            }
            m.layers[0].limit_bytes = m.layers[0].limit_bytes.max(size);
            m.size_bytes = size;
            self.put(&m).await?;
            Ok(m)
        }))
        .await
    }

    /// Pin the volume's current content: every write acknowledged before this call is in the
    /// snapshot, none issued after it returns is, and it is the volume at one instant (a
    /// writing server's cache is written back first, see `snapshot_control`).
    pub async fn snapshot(&self, name: &str, snap: &str) -> Result<SnapshotMeta, BlockError> {
        check_name("snapshot", snap).map_err(BlockError::Invalid)?;
        self.locked(async {
            let mut m = self.get(name).await?;
            if m.snapshots.contains_key(snap) {
                return Err(BlockError::Exists(format!("volume '{name}' already has a snapshot '{snap}'")));
            }
            let key = self.writer_lease_key(name);
            let mut attempt = 0;
            let epoch = loop {
                attempt += 1;
                // A writing NBD server may hold acknowledged writes in its cache: it holds new
                // writes and writes everything back until the epoch is settled.
                let holder = self.lease_holder(&key).await?;
                let held = match &holder {
                    Some(h) => snapshot_control::quiesce(h).await?,
                    None => None,
                };
                // Engines have seen (and merged into their clocks) the epoch of every durable
                // write, so the max over them covers every acknowledged one now.
                let epoch = self.cont.pool.max_epoch().await?;
                // The writer takes epochs from an HLC that is never behind the wall clock: once
                // the wall clock passes the snapshot epoch, every later write lands after it.
                let deadline = tokio::time::Instant::now() + SNAPSHOT_CLOCK_WAIT;
                while now_ms() <= epoch.physical_ms() {
                    if tokio::time::Instant::now() > deadline {
                        return Err(BlockError::Invalid(format!("the engines' clocks are more than {SNAPSHOT_CLOCK_WAIT:?} ahead of this machine's; check NTP")));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if let Some(q) = held {
                    q.resume().await?;
                }
                // A writer that took the lease after it was looked up was not held: its cache
                // may have written back part of what it acknowledged below the epoch.
                if self.lease_holder(&key).await? == holder {
                    break epoch;
                }
                if attempt >= SNAPSHOT_ATTEMPTS {
                    return Err(BlockError::Invalid(format!("volume '{name}' changed writers while the snapshot was taken, {attempt} times; retry")));
                }
            };
            let pin = VolumeMeta::pin_label(name, snap);
            self.client
                .mgmt
                .write(MgmtCmd::SnapshotCreate { pool: self.pool_name.clone(), cont: self.cont.info.id.to_string(), name: pin, epoch })
                .await
                .map_err(strata_client::ClientError::from)?;
            let mut layers = m.layers.clone();
            layers[0].epoch = Some(epoch);
            layers[0].limit_bytes = m.size_bytes;
            let s = SnapshotMeta { epoch, size_bytes: m.size_bytes, layers, created_ms: now_ms() };
            m.snapshots.insert(snap.to_owned(), s.clone());
            self.put(&m).await?;
            Ok(s)
        })
        .await
    }

    fn clones_of<'a>(all: &'a [VolumeMeta], name: &str, snap: Option<&str>) -> Vec<&'a VolumeMeta> {
        all.iter().filter(|v| v.parent.as_ref().is_some_and(|p| p.volume == name && snap.is_none_or(|s| p.snapshot == s))).collect()
    }

    pub async fn snapshot_delete(&self, name: &str, snap: &str) -> Result<(), BlockError> {
        self.locked(async {
            let mut m = self.get(name).await?;
            if !m.snapshots.contains_key(snap) {
                return Err(BlockError::NotFound(format!("volume '{name}' has no snapshot '{snap}'")));
            }
            let all = self.list().await?;
            let clones = Self::clones_of(&all, name, Some(snap));
            if !clones.is_empty() {
                let names: Vec<&str> = clones.iter().map(|c| c.name.as_str()).collect();
                return Err(BlockError::InUse(format!("snapshot {name}@{snap} has clones ({}); delete them first", names.join(", "))));
            }
            m.snapshots.remove(snap);
            self.put(&m).await?;
            self.unpin(name, snap).await;
            Ok(())
        })
        .await
    }

    async fn unpin(&self, name: &str, snap: &str) {
        let cmd = MgmtCmd::SnapshotDestroy { pool: self.pool_name.clone(), cont: self.cont.info.id.to_string(), name: VolumeMeta::pin_label(name, snap) };
        if let Err(e) = self.client.mgmt.write(cmd).await {
            tracing::warn!(volume = name, snapshot = snap, error = %e, "could not unpin the snapshot epoch; `strata cont snapshot destroy` removes it");
        }
    }

    /// A new volume that reads through to `name@snap` until it writes.
    pub async fn clone_volume(&self, name: &str, snap: &str, new: &str) -> Result<VolumeMeta, BlockError> {
        check_name("volume", new).map_err(BlockError::Invalid)?;
        self.locked(async {
            let parent = self.get(name).await?;
            let s = parent.snapshots.get(snap).ok_or_else(|| BlockError::NotFound(format!("volume '{name}' has no snapshot '{snap}'; `strata block info` lists them")))?;
            if self.get(new).await.is_ok() {
                return Err(BlockError::Exists(format!("volume '{new}' already exists")));
            }
            if s.layers.len() + 1 > LAYERS_MAX {
                return Err(BlockError::Invalid(format!("a clone of {name}@{snap} would stack {} layers (limit {LAYERS_MAX})", s.layers.len() + 1)));
            }
            let class: ObjectClass = parent.oclass.parse().map_err(|e| BlockError::Invalid(format!("{e}")))?;
            self.check_capacity(new, s.size_bytes, class).await?;
            let head = self.cont.create_object_typed(ObjectType::Array, class).await?;
            let mut layers = vec![Layer { oid: head.oid, epoch: None, limit_bytes: s.size_bytes }];
            layers.extend(s.layers.iter().cloned());
            let m = VolumeMeta {
                format: VOLUME_FORMAT,
                name: new.to_owned(),
                size_bytes: s.size_bytes,
                block_bytes: parent.block_bytes,
                chunk_bytes: parent.chunk_bytes,
                oclass: parent.oclass.clone(),
                layers,
                parent: Some(ParentRef { volume: name.to_owned(), snapshot: snap.to_owned() }),
                snapshots: Default::default(),
                created_ms: now_ms(),
            };
            self.put(&m).await?;
            Ok(m)
        })
        .await
    }

    /// Make the volume read as `name@snap` again. The current head is kept (newer snapshots
    /// still read it); writes go to a fresh head stacked on the snapshot.
    pub async fn rollback(&self, name: &str, snap: &str) -> Result<VolumeMeta, BlockError> {
        self.locked(self.exclusive(name, async {
            let mut m = self.get(name).await?;
            let s = m.snapshots.get(snap).ok_or_else(|| BlockError::NotFound(format!("volume '{name}' has no snapshot '{snap}'")))?.clone();
            if s.layers.len() + 1 > LAYERS_MAX {
                return Err(BlockError::Invalid(format!("rollback would stack {} layers (limit {LAYERS_MAX}); clone the snapshot instead", s.layers.len() + 1)));
            }
            let class: ObjectClass = m.oclass.parse().map_err(|e| BlockError::Invalid(format!("{e}")))?;
            let head = self.cont.create_object_typed(ObjectType::Array, class).await?;
            let mut layers = vec![Layer { oid: head.oid, epoch: None, limit_bytes: s.size_bytes }];
            layers.extend(s.layers.iter().cloned());
            m.layers = layers;
            m.size_bytes = s.size_bytes;
            self.put(&m).await?;
            Ok(m)
        }))
        .await
    }

    /// Delete a volume, its snapshots and the objects no other volume reads.
    pub async fn delete(&self, name: &str) -> Result<(), BlockError> {
        self.locked(async {
            let m = self.get(name).await?;
            let all = self.list().await?;
            let clones = Self::clones_of(&all, name, None);
            if !clones.is_empty() {
                let names: Vec<String> = clones.iter().map(|c| format!("{} (from @{})", c.name, c.parent.as_ref().map(|p| p.snapshot.as_str()).unwrap_or(""))).collect();
                return Err(BlockError::InUse(format!("volume '{name}' has clones: {}; delete them first", names.join(", "))));
            }
            self.exclusive(name, self.delete_unlocked(m, all)).await
        })
        .await
    }

    async fn delete_unlocked(&self, m: VolumeMeta, all: Vec<VolumeMeta>) -> Result<(), BlockError> {
        let name = m.name.as_str();
        {
            let mut shared: BTreeSet<Oid> = BTreeSet::new();
            for v in all.iter().filter(|v| v.name != name) {
                shared.extend(v.layers.iter().map(|l| l.oid));
                shared.extend(v.snapshots.values().flat_map(|s| s.layers.iter().map(|l| l.oid)));
            }
            let mut mine: BTreeSet<Oid> = m.layers.iter().map(|l| l.oid).collect();
            mine.extend(m.snapshots.values().flat_map(|s| s.layers.iter().map(|l| l.oid)));
            // The record goes first: a crash afterwards leaves unreachable objects, never a
            // volume whose data is half gone.
            self.meta_obj.punch_dkey(&VolumeMeta::dkey(name)).await?;
            for oid in mine.difference(&shared) {
                self.cont.object(*oid).punch().await?;
            }
            for snap in m.snapshots.keys() {
                self.unpin(name, snap).await;
            }
            Ok(())
        }
    }
}
