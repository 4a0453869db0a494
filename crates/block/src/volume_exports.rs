//! The NBD exports of one `strata block nbd` server: named volumes (writable unless the server
//! is read-only) and `VOLUME@SNAPSHOT` (always read-only). All connections to one writable
//! volume share one device (a write-back cache over the volume) and one writer lease; the
//! lease is taken when the first of them opens and released when the last closes, after the
//! cache was written back. A writing server also runs a snapshot control port
//! ([`crate::snapshot_control`]) named in its lease.

use crate::block_device::{BlockDevice, ExportDesc, Exports, OpenError};
use crate::volume_admin::BlockContainer;
use crate::volume_io::{ReleaseTracker, VolumeIo};
use crate::snapshot_control::{local_ip_towards, ControlServer};
use crate::volume_meta::split_snap;
use crate::write_cache::{CacheConfig, WriteBackCache};
use crate::writer_lease::{holder_name, Lease};
use crate::BlockError;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub struct VolumeExports {
    bc: BlockContainer,
    names: Vec<String>,
    read_only: bool,
    lease_ttl_ms: u64,
    cache: CacheConfig,
    writers: tokio::sync::Mutex<HashMap<String, Weak<WriteBackCache<VolumeIo>>>>,
    /// Snapshot exports, shared by their connections (and so is their clean-chunk cache).
    /// Keyed by export name, with the snapshot's record: a snapshot deleted and taken again
    /// under the same name is another device.
    snapshots: tokio::sync::Mutex<HashMap<String, (crate::volume_meta::SnapshotMeta, Weak<VolumeIo>)>>,
    releases: Arc<ReleaseTracker>,
    /// Started with the first writable open.
    control: tokio::sync::OnceCell<Arc<ControlServer>>,
}

fn open_err(e: BlockError) -> OpenError {
    match e {
        BlockError::NotFound(m) => OpenError::Unknown(m),
        BlockError::Held(m) => OpenError::Policy(m),
        e => OpenError::Unavailable(e.to_string()),
    }
}

impl VolumeExports {
    /// Check that every export exists now (a typo fails at start, not at first connect).
    pub async fn new(bc: BlockContainer, names: Vec<String>, read_only: bool, lease_ttl_ms: u64, cache: CacheConfig) -> Result<VolumeExports, BlockError> {
        for n in &names {
            let (vol, snap) = split_snap(n).map(|(v, s)| (v, Some(s))).unwrap_or((n.as_str(), None));
            let m = bc.get(vol).await?;
            if let Some(s) = snap {
                if !m.snapshots.contains_key(s) {
                    return Err(BlockError::NotFound(format!("volume '{vol}' has no snapshot '{s}'")));
                }
            }
        }
        Ok(VolumeExports { bc, names, read_only, lease_ttl_ms, cache, writers: Default::default(), snapshots: Default::default(), releases: Default::default(), control: Default::default() })
    }

    /// Write back every open volume's cache and release its writer lease (the server is
    /// stopping).
    pub async fn release_all(&self) {
        let devs: Vec<Arc<WriteBackCache<VolumeIo>>> = self.writers.lock().await.values().filter_map(Weak::upgrade).collect();
        for d in devs {
            if let Err(e) = d.flush().await {
                tracing::error!(volume = %d.backend().name, error = %e, "writing back the cache at shutdown failed; writes not flushed by the client are lost");
            }
            d.backend().release_lease().await;
        }
    }

    /// Write back every open volume's cache (benchmarks settle between jobs with it).
    pub async fn flush_all(&self) -> Result<(), crate::block_device::DevError> {
        let devs: Vec<Arc<WriteBackCache<VolumeIo>>> = self.writers.lock().await.values().filter_map(Weak::upgrade).collect();
        for d in devs {
            d.flush().await?;
        }
        Ok(())
    }

    /// Read-cache statistics of the writable volumes open now: (volume, hits, misses, bytes).
    pub async fn read_cache_stats(&self) -> Vec<(String, u64, u64, u64)> {
        let devs: Vec<(String, Arc<WriteBackCache<VolumeIo>>)> = self.writers.lock().await.iter().filter_map(|(n, d)| d.upgrade().map(|d| (n.clone(), d))).collect();
        devs.into_iter().filter_map(|(n, d)| d.backend().read_cache_stats().map(|(h, m, b)| (n, h, m, b))).collect()
    }

    async fn control(&self) -> Result<&Arc<ControlServer>, BlockError> {
        self.control
            .get_or_try_init(|| async {
                // Listen where the cluster reaches this host from.
                let peer = self.bc.cont.pool.info()?.rank_addrs.values().next().cloned().unwrap_or_default();
                let ip = local_ip_towards(&peer).await;
                ControlServer::start(ip).await.map_err(|e| BlockError::Invalid(format!("starting the snapshot control port on {ip}: {e}")))
            })
            .await
    }

    /// Configured names, and `VOLUME@SNAPSHOT` of any configured volume (snapshots taken
    /// while the server runs are exported too).
    fn known(&self, name: &str) -> Result<(), OpenError> {
        let vol = split_snap(name).map(|(v, _)| v);
        if self.names.iter().any(|n| n == name || Some(n.as_str()) == vol) {
            Ok(())
        } else {
            Err(OpenError::Unknown(format!("no export '{name}'; this server exports: {} (and their VOLUME@SNAPSHOT)", self.names.join(", "))))
        }
    }

    async fn open_volume(&self, name: &str) -> Result<Arc<dyn BlockDevice>, BlockError> {
        let (vol, snap) = split_snap(name).map(|(v, s)| (v, Some(s))).unwrap_or((name, None));
        let meta = self.bc.get(vol).await?;
        if snap.is_some() {
            let mut snapshots = self.snapshots.lock().await;
            let now = snap.and_then(|s| meta.snapshots.get(s));
            if let Some(d) = snapshots.get(name).filter(|(m, _)| Some(m) == now).and_then(|(_, d)| d.upgrade()) {
                return Ok(d);
            }
            snapshots.retain(|_, (_, d)| d.strong_count() > 0);
            let dev = Arc::new(VolumeIo::open(&self.bc.cont, &meta, snap, None).await?.with_read_cache(self.cache.clean_bytes_max));
            if let Some(m) = now {
                snapshots.insert(name.to_owned(), (m.clone(), Arc::downgrade(&dev)));
            }
            return Ok(dev);
        }
        if self.read_only {
            // Another server may write this volume: no clean cache (`with_read_cache` keeps none).
            return Ok(Arc::new(VolumeIo::open(&self.bc.cont, &meta, None, None).await?));
        }
        let mut writers = self.writers.lock().await;
        // Connections share the device while its lease holds; one that lost its lease (renewal
        // failed past expiry) is left to its connections and a new lease is sought.
        if let Some(d) = writers.get(vol).and_then(Weak::upgrade).filter(|d| d.backend().writable_now()) {
            return Ok(d);
        }
        let key = self.bc.writer_lease_key(vol);
        self.releases.wait(&key).await;
        let control = self.control().await?;
        // A holder name per open: a stale device's late release can never drop a newer lease.
        let holder = control.holder(&holder_name("nbd"));
        let lease = Lease::acquire(&self.bc.client, &key, &holder, self.lease_ttl_ms).await.map_err(|e| match e {
            BlockError::Held(m) => BlockError::Held(format!("volume '{vol}' already has a writer ({m}); export it --read-only here, or retry once the other server's clients disconnect")),
            e => e,
        })?;
        // Re-read the record under the lease: a resize or rollback may have finished meanwhile.
        let meta = self.bc.get(vol).await?;
        let mut dev = match VolumeIo::open(&self.bc.cont, &meta, None, Some(lease.clone())).await {
            Ok(d) => d,
            Err(e) => {
                lease.release().await;
                return Err(e);
            }
        };
        lease.keep_renewed();
        dev.track_releases(self.releases.clone());
        let dev = dev.with_read_cache(self.cache.clean_bytes_max);
        let dev = Arc::new(WriteBackCache::new(Arc::new(dev), self.cache.clone()));
        control.register(&holder, &dev);
        writers.insert(vol.to_owned(), Arc::downgrade(&dev));
        Ok(dev)
    }
}

impl Exports for VolumeExports {
    fn list(&self) -> Vec<(String, String)> {
        self.names.iter().map(|n| (n.clone(), format!("strata volume {}/{}/{n}", self.bc.pool_name, self.bc.cont_name))).collect()
    }

    fn default_name(&self) -> Option<String> {
        self.names.first().cloned()
    }

    fn describe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<ExportDesc, OpenError>> {
        async move {
            self.known(name)?;
            let (vol, snap) = split_snap(name).map(|(v, s)| (v, Some(s))).unwrap_or((name, None));
            let m = self.bc.get(vol).await.map_err(open_err)?;
            let size = match snap {
                Some(s) => m.snapshots.get(s).map(|x| x.size_bytes).ok_or_else(|| OpenError::Unknown(format!("volume '{vol}' has no snapshot '{s}'")))?,
                None => m.size_bytes,
            };
            Ok(ExportDesc {
                name: name.to_owned(),
                description: format!("strata volume {}/{}/{name}, class {}, {} KiB blocks", self.bc.pool_name, self.bc.cont_name, m.oclass, m.block_bytes >> 10),
                size_bytes: size,
                read_only: self.read_only || snap.is_some(),
            })
        }
        .boxed()
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn BlockDevice>, OpenError>> {
        async move {
            self.known(name)?;
            self.open_volume(name).await.map_err(open_err)
        }
        .boxed()
    }
}
