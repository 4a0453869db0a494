//! Directory leases: metadata commits off the syscall path.
//!
//! A mount that creates or unlinks files in a directory takes the directory's **lease**: a KV
//! record next to the directory's entries (`meta_schema::lease_key`) naming this namespace
//! instance, with an expiry it renews. While it holds the lease it alone may change the
//! directory, so it keeps the directory's full listing, the directory's inode and the inodes
//! of the files in it (files whose only link is there) in memory and answers `lookup`,
//! `readdir`, `getattr`, `create`, `unlink`, `setattr` and size commits from there. Changes go
//! to a per-directory log (the dirty keys, merged) that a background tick commits every
//! [`LEASE_TICK`] in one transaction, inline when it reaches [`LEASE_LOG_OPS_MAX`] keys, and
//! at once on `fsync` (of the directory or of a file in it), on a close that wrote data (its
//! size commit), and before any other operation that touches the directory (mkdir, rmdir,
//! rename, link, xattrs: these release the lease and run as plain transactions).
//!
//! Other mounts honour a lease: every metadata transaction that reads a directory as the
//! parent of an operation, or writes an inode, checks the lease of the directory concerned
//! (from the expectation cache: no round trip while it is absent), and plain lookups and
//! listings read the lease key alongside. Finding a live lease of another holder, a mount
//! **recalls** it: it marks the record `wanted` and waits until the holder has committed its
//! log and deleted the record (the holder looks at each tick), or until the record expired;
//! then both stay away from leasing that directory for [`LEASE_BACKOFF`]. So another mount
//! sees everything the holder did before it touched the directory (close-to-open holds: it
//! must look the name up first); attributes it had cached it may see stale for its own
//! `meta_cache` time, as before.
//!
//! Crash rules: a SIGKILLed holder loses what its log had not committed (as a local file system
//! loses un-fsynced metadata); every log commit is one transaction, so the tree stays
//! consistent. Its lease then blocks the directory for other mounts until it expires
//! ([`LEASE_TTL`]). A holder that could not renew in time loses the lease (another mount
//! deletes an expired record before using the directory), and with it its log
//! ([`FsError::LeaseLost`]); it never applies a log over someone else's changes.

use crate::expect_cache::Tx;
use crate::fs_error::FsError;
use crate::meta_schema::*;
use crate::meta_store::{MetaError, MetaStore, MetaTxn};
use crate::namespace::{now_ns, Namespace, NewNode, Released, SetAttr, TXN_ATTEMPTS_MAX};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_types::Epoch;

/// How long a lease lasts unless renewed (a crashed holder blocks its directories that long).
pub const LEASE_TTL: Duration = Duration::from_secs(8);
/// How often the holder commits its logs, renews, and looks for recalls.
pub const LEASE_TICK: Duration = Duration::from_millis(50);
/// A lease unused this long is given back (so other mounts rarely have to recall).
pub const LEASE_IDLE: Duration = Duration::from_secs(1);
/// Directories with more entries are not leased (their listing is held in memory).
pub const LEASE_ENTRIES_MAX: usize = 50_000;
/// Dirty keys of one directory's log before an operation commits it inline.
pub const LEASE_LOG_OPS_MAX: usize = 2_000;
/// After a recall neither side leases that directory for this long (no ping-pong).
pub const LEASE_BACKOFF: Duration = Duration::from_secs(2);
/// A directory too large to lease is not tried again for this long.
const TOO_LARGE_BACKOFF: Duration = Duration::from_secs(60);
/// How often a recalling mount looks whether the holder let go.
const RECALL_POLL: Duration = Duration::from_millis(5);
/// Slots kept before unused ones are pruned.
const SLOTS_PRUNE_AT: usize = 4096;

/// A directory whose lease this namespace holds.
pub(crate) struct Held {
    /// The directory's inode with the log's changes.
    pub(crate) dir: Inode,
    /// Every entry, with the log's changes.
    entries: BTreeMap<Vec<u8>, Dentry>,
    /// Inodes of files in the directory (`parent` is it, `nlink == 1`): nobody else may change
    /// them without recalling the lease, so they are current.
    trusted: HashMap<u64, Inode>,
    /// The log: keys to write (`None`: delete) at the next commit.
    dirty_d: BTreeMap<Vec<u8>, Option<Dentry>>,
    dirty_i: BTreeMap<u64, Option<Inode>>,
    dir_dirty: bool,
    /// Created here and not yet committed: an unlink drops them without a write.
    unsent: HashSet<u64>,
    /// Deleted by the log: their data is punched once the log is committed.
    freed: Vec<Inode>,
    expires_ns: i64,
    last_used: Instant,
    /// A part of the log being committed by the tick without the slot lock.
    in_flight: Option<InFlight>,
}

/// Log entries taken out of a [`Held`] for one commit.
#[derive(Default)]
struct Batch {
    dirty_d: BTreeMap<Vec<u8>, Option<Dentry>>,
    dirty_i: BTreeMap<u64, Option<Inode>>,
    dir: Option<Inode>,
    unsent: HashSet<u64>,
    freed: Vec<Inode>,
}

/// How a commit of a batch ended.
#[derive(Clone, Debug)]
enum Outcome {
    /// Committed; `wanted`: another mount asked for the lease back.
    Done { released: bool, wanted: bool, expires_ns: i64 },
    Lost,
    Failed(String),
}

/// A background commit: its batch (put back into the log if it fails) and its outcome.
struct InFlight {
    batch: Arc<Batch>,
    done: tokio::sync::watch::Receiver<Option<Outcome>>,
}

impl Held {
    fn take_batch(&mut self) -> Batch {
        Batch {
            dirty_d: std::mem::take(&mut self.dirty_d),
            dirty_i: std::mem::take(&mut self.dirty_i),
            dir: std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone()),
            unsent: std::mem::take(&mut self.unsent),
            freed: std::mem::take(&mut self.freed),
        }
    }

    /// Put a batch that failed to commit back under the newer log.
    fn restore(&mut self, b: &Batch) {
        for (k, v) in &b.dirty_d {
            self.dirty_d.entry(k.clone()).or_insert_with(|| *v);
        }
        for (k, v) in &b.dirty_i {
            self.dirty_i.entry(*k).or_insert_with(|| v.clone());
        }
        for ino in &b.unsent {
            if matches!(self.dirty_i.get(ino), Some(Some(_))) {
                self.unsent.insert(*ino);
            }
        }
        self.dir_dirty |= b.dir.is_some();
        let newer = std::mem::replace(&mut self.freed, b.freed.clone());
        self.freed.extend(newer);
    }

    fn dirty(&self) -> bool {
        self.dir_dirty || !self.dirty_d.is_empty() || !self.dirty_i.is_empty()
    }
    fn ops(&self) -> usize {
        self.dirty_d.len() + self.dirty_i.len()
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Held>>>;
pub(crate) type SlotGuard = tokio::sync::OwnedMutexGuard<Option<Held>>;

/// This namespace's leases. Every operation that may change a directory holds the
/// directory's slot lock (so a lease is never taken or given back under it).
pub(crate) struct DirLeases {
    enabled: AtomicBool,
    /// Lease lifetime, ns ([`LEASE_TTL`]; shorter in tests).
    ttl_ns: std::sync::atomic::AtomicI64,
    /// This namespace instance as a lease holder.
    pub(crate) me: u64,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Inode → the held directory whose state holds it (a held directory maps to itself).
    trusted: Mutex<HashMap<u64, u64>>,
    /// Held directory → its parent (to settle a moved or removed subdirectory).
    held_parent: Mutex<HashMap<u64, u64>>,
    backoff: Mutex<HashMap<u64, Instant>>,
    /// Deleted by committed logs: data to punch (drained by the mount).
    freed: Mutex<Vec<Inode>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ttl_ns(d: Duration) -> i64 {
    d.as_nanos() as i64
}

impl DirLeases {
    pub(crate) fn new() -> DirLeases {
        DirLeases { enabled: AtomicBool::new(false), ttl_ns: std::sync::atomic::AtomicI64::new(ttl_ns(LEASE_TTL)), me: rand::random::<u64>() | 1, slots: Mutex::default(), trusted: Mutex::default(), held_parent: Mutex::default(), backoff: Mutex::default(), freed: Mutex::default() }
    }

    fn slot(&self, dir: u64) -> Slot {
        let mut s = lock(&self.slots);
        if s.len() > SLOTS_PRUNE_AT {
            s.retain(|_, v| Arc::strong_count(v) > 1 || v.try_lock().map_or(true, |g| g.is_some()));
        }
        s.entry(dir).or_default().clone()
    }

    fn backing_off(&self, dir: u64) -> bool {
        let mut b = lock(&self.backoff);
        match b.get(&dir) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                b.remove(&dir);
                false
            }
            None => false,
        }
    }

    fn back_off(&self, dir: u64, d: Duration) {
        let mut b = lock(&self.backoff);
        if b.len() > SLOTS_PRUNE_AT {
            let now = Instant::now();
            b.retain(|_, t| *t > now);
        }
        b.insert(dir, Instant::now() + d);
    }

    fn is_held(&self, dir: u64) -> bool {
        lock(&self.held_parent).contains_key(&dir)
    }
}

/// The inode a create makes in `p` (set-group-id directories and inherited classes applied).
pub(crate) fn new_inode(p: &Inode, node: &NewNode, ino: u64, now: i64, default_oclass: &str) -> Inode {
    let mut perm = node.perm & 0o7777;
    let mut gid = node.gid;
    // BSD group semantics on set-group-id directories (as Linux does).
    if p.perm & (libc::S_ISGID as u16) != 0 {
        gid = p.gid;
        if node.kind == Kind::Dir {
            perm |= libc::S_ISGID as u16;
        }
    }
    let oclass = match node.kind {
        Kind::File => Some(p.oclass.clone().unwrap_or_else(|| default_oclass.to_owned())),
        Kind::Dir => p.oclass.clone(),
        _ => None,
    };
    let size = node.symlink.as_ref().map_or(0, |t| t.len() as u64);
    let nlink = if node.kind == Kind::Dir { 2 } else { 1 };
    Inode { ino, kind: node.kind, perm, uid: node.uid, gid, size, nlink, atime_ns: now, mtime_ns: now, ctime_ns: now, crtime_ns: now, rdev: node.rdev, parent: p.ino, oclass, symlink: node.symlink.clone(), xattrs: Default::default(), data_version: 0 }
}

impl<S: MetaStore> Namespace<S> {
    /// Let this namespace take directory leases (a mount with a lease tick running). Without
    /// it, it only honours other holders' leases.
    pub fn enable_leases(&self) {
        self.leases.enabled.store(true, Ordering::Relaxed);
    }

    /// Change the lease lifetime (tests of expiry; every mount must use the same).
    pub fn set_lease_ttl(&self, ttl: Duration) {
        self.leases.ttl_ns.store(ttl_ns(ttl), Ordering::Relaxed);
    }

    fn lease_ttl_ns(&self) -> i64 {
        self.leases.ttl_ns.load(Ordering::Relaxed)
    }

    pub fn disable_leases(&self) {
        self.leases.enabled.store(false, Ordering::Relaxed);
    }

    pub(crate) fn leasing(&self) -> bool {
        self.leases.enabled.load(Ordering::Relaxed)
    }

    /// Directories whose lease this namespace holds now.
    pub fn held_leases(&self) -> usize {
        lock(&self.leases.held_parent).len()
    }

    /// Whether a lease record (as read) belongs to another holder and is live. An expired
    /// one counts as absent (whoever writes next deletes it).
    pub(crate) fn foreign_lease(&self, rec: Option<&[u8]>) -> Result<bool, FsError> {
        Ok(match rec {
            Some(b) => {
                let l = decode_lease(b)?;
                l.holder != self.leases.me && l.expires_ns > now_ns()
            }
            None => false,
        })
    }

    /// In a transaction about to change (or answer about) directory `dir`: fail with
    /// [`FsError::Leased`] if another mount holds its lease; delete an expired foreign one
    /// (so its holder can never commit a log over this change).
    pub(crate) async fn tx_fence(&self, tx: &mut Tx<'_, S::Txn>, dir: u64) -> Result<(), FsError> {
        let key = lease_key(dir);
        let rec = match tx.seen(&key) {
            Some(v) => v,
            None => tx.get(&key).await?,
        };
        if let Some(b) = rec {
            let l = decode_lease(&b)?;
            if l.holder != self.leases.me {
                if l.expires_ns > now_ns() {
                    return Err(FsError::Leased(dir));
                }
                tx.delete(&key).await?;
            }
        }
        Ok(())
    }

    /// The slot of `dir`, locked; its lease is taken first when `acquire` (a create or
    /// unlink) and this namespace may. Without leases enabled: a private, uncontended lock.
    pub(crate) async fn dir_slot(&self, dir: u64, acquire: bool) -> Result<SlotGuard, FsError> {
        if !self.leasing() {
            return Ok(Arc::new(tokio::sync::Mutex::new(None)).lock_owned().await);
        }
        let mut g = self.leases.slot(dir).lock_owned().await;
        if g.is_none() && acquire && !self.leases.backing_off(dir) {
            if let Some(h) = self.acquire_lease(dir).await? {
                lock(&self.leases.held_parent).insert(dir, h.dir.parent);
                lock(&self.leases.trusted).insert(dir, dir);
                *g = Some(h);
            }
        }
        if let Some(h) = g.as_mut() {
            h.last_used = Instant::now();
            if h.ops() >= LEASE_LOG_OPS_MAX {
                self.flush_slot(dir, &mut g, false).await?;
            }
        }
        Ok(g)
    }

    /// Take the lease of `dir` and load its listing; `None` when another mount holds it or the
    /// directory is gone or too large (the caller takes the transactional path).
    async fn acquire_lease(&self, dir: u64) -> Result<Option<Held>, FsError> {
        for attempt in 0..TXN_ATTEMPTS_MAX {
            let mut tx = Tx::new(self.store.begin().await?, &self.known, false);
            if self.foreign_lease(tx.get(&lease_key(dir)).await?.as_deref())? {
                return Ok(None);
            }
            let Some(b) = tx.get(&inode_key(dir)).await? else { return Ok(None) };
            let d = decode_inode(&b)?;
            if d.kind != Kind::Dir || d.nlink == 0 {
                return Ok(None);
            }
            let kvs = tx.scan_prefix(&dentry_prefix(dir), None, LEASE_ENTRIES_MAX + 1).await?;
            if kvs.len() > LEASE_ENTRIES_MAX {
                self.leases.back_off(dir, TOO_LARGE_BACKOFF);
                return Ok(None);
            }
            let mut entries = BTreeMap::new();
            for (k, v) in kvs {
                entries.insert(dentry_name(&k).to_vec(), decode_dentry(&v)?);
            }
            let expires_ns = now_ns() + self.lease_ttl_ns();
            tx.put(&lease_key(dir), &encode_lease(&DirLease { holder: self.leases.me, expires_ns, wanted: false })).await?;
            match tx.commit().await {
                Ok(_) => {
                    tracing::debug!(dir, entries = entries.len(), "took a directory lease");
                    return Ok(Some(Held { dir: d, entries, trusted: HashMap::new(), dirty_d: BTreeMap::new(), dirty_i: BTreeMap::new(), dir_dirty: false, unsent: HashSet::new(), freed: Vec::new(), expires_ns, last_used: Instant::now(), in_flight: None }));
                }
                Err(MetaError::Conflict) => pause(attempt).await,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Commit the log of the held directory in `g` (renewing the lease), and give the lease
    /// back when `release` or when another mount asked for it. Waits for a background commit
    /// in flight first (commits of one directory are never reordered).
    pub(crate) async fn flush_slot(&self, dir: u64, g: &mut SlotGuard, release: bool) -> Result<(), FsError> {
        self.finish_in_flight(dir, g).await?;
        let Some(h) = g.as_mut() else { return Ok(()) };
        let batch = h.take_batch();
        let r = self.commit_batch(dir, &batch, true, release).await;
        self.settle_outcome(dir, g, &batch, Self::outcome(r))
    }

    fn outcome(r: Result<(bool, bool, i64), FsError>) -> Outcome {
        match r {
            Ok((released, wanted, expires_ns)) => Outcome::Done { released, wanted, expires_ns },
            Err(FsError::LeaseLost(_)) => Outcome::Lost,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Apply how a commit of `batch` ended to the held state in `g`.
    fn settle_outcome(&self, dir: u64, g: &mut SlotGuard, batch: &Batch, o: Outcome) -> Result<(), FsError> {
        match o {
            Outcome::Done { released, wanted, expires_ns } => {
                lock(&self.leases.freed).extend(batch.freed.iter().cloned());
                if wanted {
                    tracing::debug!(dir, "another mount recalled a directory lease");
                    self.leases.back_off(dir, LEASE_BACKOFF);
                }
                if released {
                    self.drop_held(dir, g);
                } else if let Some(h) = g.as_mut() {
                    h.expires_ns = expires_ns;
                }
                Ok(())
            }
            Outcome::Lost => {
                tracing::error!(dir, "lost a directory lease; dropping its uncommitted changes");
                self.drop_held(dir, g);
                Err(FsError::LeaseLost(dir))
            }
            Outcome::Failed(e) => {
                // The log stays; the next tick or operation tries again.
                if let Some(h) = g.as_mut() {
                    h.restore(batch);
                }
                Err(FsError::Meta(MetaError::Unavailable(e)))
            }
        }
    }

    /// Wait for the background commit in flight in `g`, if any, and apply its outcome; a
    /// recall it found is answered now (the log committed and the lease given back).
    async fn finish_in_flight(&self, dir: u64, g: &mut SlotGuard) -> Result<(), FsError> {
        let Some(f) = g.as_mut().and_then(|h| h.in_flight.take()) else { return Ok(()) };
        let mut rx = f.done.clone();
        let o = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Outcome::Failed("background commit vanished".into())),
            Err(_) => Outcome::Failed("background commit vanished".into()),
        };
        let wanted = matches!(o, Outcome::Done { wanted: true, .. });
        let r = self.settle_outcome(dir, g, &f.batch, o);
        if r.is_ok() && wanted {
            return Box::pin(self.flush_slot(dir, g, true)).await;
        }
        r
    }

    /// The tick's commit of `dir`'s log: the batch is taken under the slot lock, committed
    /// without it (operations on the directory go on meanwhile), and its outcome applied by
    /// whoever next holds the lock after it ended.
    async fn commit_in_background(&self, dir: u64) {
        let slot = self.leases.slot(dir);
        let (batch, tx) = {
            let mut g = slot.clone().lock_owned().await;
            let done = g.as_ref().and_then(|h| h.in_flight.as_ref()).is_some_and(|f| f.done.borrow().is_some());
            if done {
                if let Err(e) = self.finish_in_flight(dir, &mut g).await {
                    tracing::warn!(dir, error = %e, "directory lease commit failed; retrying at the next tick");
                }
            }
            let Some(h) = g.as_mut() else { return };
            if h.in_flight.is_some() || !h.dirty() {
                return;
            }
            let batch = Arc::new(h.take_batch());
            let (tx, rx) = tokio::sync::watch::channel(None);
            h.in_flight = Some(InFlight { batch: batch.clone(), done: rx });
            (batch, tx)
        };
        let r = self.commit_batch(dir, &batch, false, false).await;
        let _ = tx.send(Some(Self::outcome(r)));
        let mut g = slot.lock_owned().await;
        if let Err(e) = self.finish_in_flight(dir, &mut g).await {
            tracing::warn!(dir, error = %e, "directory lease commit failed; retrying at the next tick");
        }
    }

    fn drop_held(&self, dir: u64, g: &mut SlotGuard) {
        if let Some(h) = g.take() {
            let mut t = lock(&self.leases.trusted);
            t.remove(&dir);
            for ino in h.trusted.keys() {
                t.remove(ino);
            }
        }
        lock(&self.leases.held_parent).remove(&dir);
    }

    /// One transaction: the batch's keys, and the lease renewed or deleted. `may_release`:
    /// nothing newer than the batch is logged (the slot lock is held), so a recall can be
    /// answered by deleting the lease in the same commit. Returns (released, recalled,
    /// new expiry).
    async fn commit_batch(&self, dir: u64, b: &Batch, may_release: bool, release: bool) -> Result<(bool, bool, i64), FsError> {
        let me = self.leases.me;
        for attempt in 0..TXN_ATTEMPTS_MAX {
            let mut tx = Tx::new(self.store.begin().await?, &self.known, false);
            let rec = match tx.get(&lease_key(dir)).await? {
                Some(b) => decode_lease(&b)?,
                None => return Err(FsError::LeaseLost(dir)),
            };
            if rec.holder != me {
                return Err(FsError::LeaseLost(dir));
            }
            let release = may_release && (release || rec.wanted);
            for (name, d) in &b.dirty_d {
                match d {
                    Some(d) => tx.put(&dentry_key(dir, name), &encode_dentry(*d)).await?,
                    None => tx.delete(&dentry_key(dir, name)).await?,
                }
            }
            for (ino, i) in &b.dirty_i {
                match i {
                    Some(i) => tx.put(&inode_key(*ino), &encode_inode(i)).await?,
                    None => tx.delete(&inode_key(*ino)).await?,
                }
            }
            if let Some(d) = &b.dir {
                tx.put(&inode_key(dir), &encode_inode(d)).await?;
            }
            let expires_ns = now_ns() + self.lease_ttl_ns();
            if release {
                tx.delete(&lease_key(dir)).await?;
            } else {
                tx.put(&lease_key(dir), &encode_lease(&DirLease { holder: me, expires_ns, wanted: rec.wanted && !may_release })).await?;
            }
            match tx.commit().await {
                Ok(_) => return Ok((release, rec.wanted, expires_ns)),
                Err(MetaError::Conflict) => pause(attempt).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Contended("lease commit", TXN_ATTEMPTS_MAX))
    }

    /// Ask the holder of `dir`'s lease to give it back and wait until it did (or the lease
    /// expired: then delete it).
    pub(crate) async fn recall(&self, dir: u64) -> Result<(), FsError> {
        self.leases.back_off(dir, LEASE_BACKOFF);
        let key = lease_key(dir);
        let deadline = Instant::now() + Duration::from_nanos(self.lease_ttl_ns() as u64) + Duration::from_secs(2);
        loop {
            for attempt in 0..TXN_ATTEMPTS_MAX {
                let mut tx = Tx::new(self.store.begin().await?, &self.known, false);
                let l = match tx.get(&key).await? {
                    None => return Ok(()),
                    Some(b) => decode_lease(&b)?,
                };
                if l.holder == self.leases.me {
                    return Ok(());
                }
                let expired = l.expires_ns <= now_ns();
                if expired {
                    tx.delete(&key).await?;
                } else if !l.wanted {
                    tx.put(&key, &encode_lease(&DirLease { wanted: true, ..l })).await?;
                } else {
                    break;
                }
                match tx.commit().await {
                    Ok(_) if expired => return Ok(()),
                    Ok(_) => break,
                    Err(MetaError::Conflict) => pause(attempt).await,
                    Err(e) => return Err(e.into()),
                }
            }
            tracing::debug!(dir, "waiting for another mount to give a directory lease back");
            loop {
                if Instant::now() > deadline {
                    return Err(FsError::Leased(dir));
                }
                tokio::time::sleep(RECALL_POLL).await;
                match self.store.get_at(&key, Epoch::MAX).await? {
                    None => {
                        self.known.put(&key, None);
                        return Ok(());
                    }
                    Some(b) if decode_lease(&b)?.expires_ns <= now_ns() => break,
                    Some(_) => {}
                }
            }
        }
    }

    /// The inode `ino` of a file in the held directory `dir`: trusted from memory, or read and
    /// then trusted if only this directory links it.
    async fn held_inode(&self, dir: u64, h: &mut Held, ino: u64) -> Result<Inode, FsError> {
        if let Some(i) = h.trusted.get(&ino) {
            return Ok(i.clone());
        }
        let i = self.inode_at(ino, Epoch::MAX).await?;
        if i.kind != Kind::Dir && i.nlink == 1 && i.parent == dir {
            h.trusted.insert(ino, i.clone());
            lock(&self.leases.trusted).insert(ino, dir);
        }
        Ok(i)
    }

    /// Create under the held lease `h` of `dir`.
    pub(crate) fn create_held(&self, dir: u64, h: &mut Held, name: &[u8], node: &NewNode, ino: u64) -> Result<Inode, FsError> {
        if h.entries.contains_key(name) {
            return Err(FsError::Exists);
        }
        let now = now_ns();
        let i = new_inode(&h.dir, node, ino, now, &self.default_oclass);
        let d = Dentry { ino, kind: node.kind };
        h.entries.insert(name.to_vec(), d);
        h.dirty_d.insert(name.to_vec(), Some(d));
        h.dirty_i.insert(ino, Some(i.clone()));
        h.unsent.insert(ino);
        h.trusted.insert(ino, i.clone());
        lock(&self.leases.trusted).insert(ino, dir);
        h.dir.mtime_ns = now;
        h.dir.ctime_ns = now;
        h.dir_dirty = true;
        Ok(i)
    }

    /// Unlink under the held lease; `Ok(None)`: not a case the log handles (several links,
    /// open here): the caller commits it as a transaction.
    pub(crate) async fn unlink_held(&self, dir: u64, h: &mut Held, name: &[u8], is_open: &impl Fn(u64) -> bool) -> Result<Option<Released>, FsError> {
        let d = *h.entries.get(name).ok_or(FsError::NotFound)?;
        if d.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let i = self.held_inode(dir, h, d.ino).await?;
        if i.nlink != 1 || i.parent != dir || is_open(i.ino) {
            return Ok(None);
        }
        h.entries.remove(name);
        h.dirty_d.insert(name.to_vec(), None);
        h.trusted.remove(&i.ino);
        lock(&self.leases.trusted).remove(&i.ino);
        if h.unsent.remove(&i.ino) {
            // Never committed: nothing to delete, no data written through the store's inode.
            h.dirty_i.remove(&i.ino);
            if i.kind == Kind::File && (i.data_version > 0 || i.size > 0) {
                h.freed.push(i.clone());
            }
        } else {
            h.dirty_i.insert(i.ino, None);
            h.freed.push(i.clone());
        }
        let now = now_ns();
        h.dir.mtime_ns = now;
        h.dir.ctime_ns = now;
        h.dir_dirty = true;
        Ok(Some(Released { touched: vec![i.ino], ..Default::default() }))
    }

    /// Change a trusted inode under its directory's lease: `Ok(None)` if it is not trusted
    /// (any more). `commit`: commit the log before returning (file data changed: another mount
    /// opening the file next must see its size).
    pub(crate) async fn change_trusted(&self, ino: u64, commit: bool, f: impl FnOnce(&mut Inode) -> Result<(), FsError>) -> Result<Option<Inode>, FsError> {
        if !self.leasing() {
            return Ok(None);
        }
        let Some(dir) = lock(&self.leases.trusted).get(&ino).copied().filter(|d| *d != ino) else { return Ok(None) };
        let mut g = self.leases.slot(dir).lock_owned().await;
        let Some(h) = g.as_mut() else { return Ok(None) };
        let Some(i) = h.trusted.get_mut(&ino) else { return Ok(None) };
        let mut new = i.clone();
        f(&mut new)?;
        *i = new.clone();
        h.dirty_i.insert(ino, Some(new.clone()));
        h.last_used = Instant::now();
        if commit {
            self.flush_slot(dir, &mut g, false).await?;
        }
        Ok(Some(new))
    }

    /// `ino` from memory when a held lease covers it (a held directory or a trusted inode).
    pub(crate) async fn held_lookup_ino(&self, ino: u64) -> Option<Inode> {
        if !self.leasing() {
            return None;
        }
        let dir = lock(&self.leases.trusted).get(&ino).copied()?;
        let g = self.leases.slot(dir).lock_owned().await;
        let h = g.as_ref()?;
        if ino == dir {
            return Some(h.dir.clone());
        }
        h.trusted.get(&ino).cloned()
    }

    /// `name` in `dir` from memory when this namespace holds `dir`'s lease.
    pub(crate) async fn held_lookup(&self, dir: u64, name: &[u8]) -> Option<Result<Inode, FsError>> {
        if !self.leasing() || !self.leases.is_held(dir) {
            return None;
        }
        let mut g = self.leases.slot(dir).lock_owned().await;
        let h = g.as_mut()?;
        h.last_used = Instant::now();
        Some(match h.entries.get(name).copied() {
            None => Err(FsError::NotFound),
            Some(d) => self.held_inode(dir, h, d.ino).await,
        })
    }

    /// Entries of a held directory after `after`, from memory.
    pub(crate) async fn held_readdir(&self, dir: u64, after: Option<&[u8]>, limit: usize) -> Option<Vec<(Vec<u8>, Dentry)>> {
        if !self.leasing() || !self.leases.is_held(dir) {
            return None;
        }
        let mut g = self.leases.slot(dir).lock_owned().await;
        let h = g.as_mut()?;
        h.last_used = Instant::now();
        let range = match after {
            Some(a) => h.entries.range::<[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => h.entries.range::<[u8], _>(..),
        };
        Some(range.take(limit).map(|(n, d)| (n.clone(), *d)).collect())
    }

    /// Before an operation that changes `dirs` as transactions: commit and give back their
    /// leases (and, with `children`, those of held subdirectories of them), and hold their
    /// slots until the returned guards drop, so no lease is taken meanwhile.
    pub(crate) async fn settle(&self, dirs: &[u64], children: bool) -> Result<Vec<SlotGuard>, FsError> {
        if !self.leasing() {
            return Ok(Vec::new());
        }
        let mut all = dirs.to_vec();
        if children {
            all.extend(lock(&self.leases.held_parent).iter().filter(|(_, p)| dirs.contains(p)).map(|(d, _)| *d));
        }
        all.sort_unstable();
        all.dedup();
        let mut guards = Vec::with_capacity(all.len());
        for d in all {
            let mut g = self.leases.slot(d).lock_owned().await;
            if g.is_some() {
                self.flush_slot(d, &mut g, true).await?;
            }
            guards.push(g);
        }
        Ok(guards)
    }

    /// The held directory whose state covers inode `ino` (itself if it is one).
    pub(crate) fn lease_dir_of(&self, ino: u64) -> Option<u64> {
        if !self.leasing() {
            return None;
        }
        lock(&self.leases.trusted).get(&ino).copied()
    }

    /// After a transaction changed inode `i`: forget a trusted copy a lookup may have taken
    /// meanwhile. Call with no slot guard held.
    pub(crate) async fn untrust(&self, i: &Inode) {
        if !self.leasing() {
            return;
        }
        let dir = if i.kind == Kind::Dir { i.ino } else { i.parent };
        let mut g = self.leases.slot(dir).lock_owned().await;
        if let Some(h) = g.as_mut() {
            if h.trusted.remove(&i.ino).is_some() {
                lock(&self.leases.trusted).remove(&i.ino);
            }
        }
    }

    /// Make the log covering `ino` (a held directory, or a file in one) durable: `fsync`.
    pub async fn sync_leased(&self, ino: u64) -> Result<(), FsError> {
        let Some(dir) = self.lease_dir_of(ino) else { return Ok(()) };
        let mut g = self.leases.slot(dir).lock_owned().await;
        self.flush_slot(dir, &mut g, false).await
    }

    /// The holder's periodic work: commit logs, renew, give back idle or recalled leases.
    /// Returns inodes whose deletion was committed (their data is to be punched).
    pub async fn lease_tick(&self) -> Vec<Inode> {
        let dirs: Vec<u64> = lock(&self.leases.held_parent).keys().copied().collect();
        for dir in dirs {
            let mut g = self.leases.slot(dir).lock_owned().await;
            let Some(h) = g.as_ref() else { continue };
            let idle = h.last_used.elapsed() >= LEASE_IDLE;
            let renew = h.expires_ns - now_ns() < self.lease_ttl_ns() / 2;
            let r = if idle || renew {
                self.flush_slot(dir, &mut g, idle).await
            } else if h.dirty() || h.in_flight.is_some() {
                drop(g);
                self.commit_in_background(dir).await;
                Ok(())
            } else {
                match self.store.get_at(&lease_key(dir), Epoch::MAX).await {
                    Ok(Some(b)) if decode_lease(&b).is_ok_and(|l| l.holder == self.leases.me && !l.wanted) => Ok(()),
                    // Recalled (or lost: the commit finds out).
                    Ok(_) => self.flush_slot(dir, &mut g, true).await,
                    Err(e) => Err(e.into()),
                }
            };
            if let Err(e) = r {
                tracing::warn!(dir, error = %e, "directory lease commit failed; retrying at the next tick");
            }
        }
        std::mem::take(&mut *lock(&self.leases.freed))
    }

    /// Commit every log and give every lease back (unmount). Returns inodes to punch.
    pub async fn release_leases(&self) -> Vec<Inode> {
        let dirs: Vec<u64> = lock(&self.leases.held_parent).keys().copied().collect();
        for dir in dirs {
            let mut g = self.leases.slot(dir).lock_owned().await;
            if let Err(e) = self.flush_slot(dir, &mut g, true).await {
                tracing::warn!(dir, error = %e, "could not commit a directory's changes at unmount");
            }
        }
        std::mem::take(&mut *lock(&self.leases.freed))
    }
}

/// Growing, jittered pause between conflicting attempts.
pub(crate) async fn pause(attempt: u32) {
    let base_us = 50u64 << attempt.min(8);
    tokio::time::sleep(Duration::from_micros(base_us + rand::random_range(0..base_us))).await;
}

/// [`SetAttr`] applied to an inode (the transaction's and the lease's path share it).
pub(crate) fn apply_setattr(i: &mut Inode, a: &SetAttr, now: i64) -> Result<(), FsError> {
    if let Some(p) = a.perm {
        i.perm = p & 0o7777;
    }
    if a.uid.is_some() || a.gid.is_some() {
        // chown clears set-user/group-id on non-directories (as Linux does).
        if i.kind != Kind::Dir {
            i.perm &= !(libc::S_ISUID as u16);
            if i.perm & (libc::S_IXGRP as u16) != 0 {
                i.perm &= !(libc::S_ISGID as u16);
            }
        }
        i.uid = a.uid.unwrap_or(i.uid);
        i.gid = a.gid.unwrap_or(i.gid);
    }
    if let Some(s) = a.size {
        if i.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if i.kind != Kind::File {
            return Err(FsError::Invalid("only regular files have a size to set".into()));
        }
        if s != i.size {
            i.data_version += 1;
        }
        i.size = s;
        i.mtime_ns = now;
    }
    if let Some(t) = a.atime_ns {
        i.atime_ns = t;
    }
    if let Some(t) = a.mtime_ns {
        i.mtime_ns = t;
    }
    i.ctime_ns = a.ctime_ns.unwrap_or(now);
    Ok(())
}

/// A size commit (flushed data) applied to an inode.
pub(crate) fn apply_write(i: &mut Inode, end: u64, mtime_ns: i64, exact: Option<u64>) {
    i.size = match exact {
        Some(s) => s.max(end),
        None => i.size.max(end),
    };
    i.mtime_ns = i.mtime_ns.max(mtime_ns);
    i.ctime_ns = i.ctime_ns.max(mtime_ns);
    i.data_version += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ino_alloc::InoAlloc;
    use crate::meta_store::MemMetaStore;
    use crate::namespace::tests::{block, dir, file};
    use crate::namespace::RenameMode;
    use std::cell::Cell;

    /// Two mounts of one volume: `a` takes leases, `b` only honours them.
    async fn two() -> (Namespace<MemMetaStore>, Namespace<MemMetaStore>) {
        let store = MemMetaStore::new();
        let ids = InoAlloc::counter(16);
        let a = Namespace::open(store.clone(), ids.clone(), "RP_2G1".into(), 1 << 20).await.unwrap();
        let b = Namespace::open(store, ids, "RP_2G1".into(), 1 << 20).await.unwrap();
        a.enable_leases();
        (a, b)
    }

    /// What is committed in the store (no lease consulted).
    async fn committed(ns: &Namespace<MemMetaStore>, dir: u64) -> Vec<Vec<u8>> {
        ns.store.scan_prefix_at(&dentry_prefix(dir), None, 100_000, Epoch::MAX).await.unwrap().into_iter().map(|(k, _)| dentry_name(&k).to_vec()).collect()
    }

    /// Run `f` while `holder` ticks (as its mount's lease thread would).
    async fn with_ticks<T>(holder: &Namespace<MemMetaStore>, f: impl std::future::Future<Output = T>) -> T {
        let done = Cell::new(false);
        let ticks = async {
            while !done.get() {
                tokio::time::sleep(Duration::from_millis(2)).await;
                holder.lease_tick().await;
            }
        };
        let work = async {
            let r = f.await;
            done.set(true);
            r
        };
        futures::join!(work, ticks).0
    }

    #[test]
    fn creates_and_unlinks_under_a_lease_are_committed_in_batches() {
        block(async {
            let (a, _) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            for n in 0..100 {
                a.create(d.ino, format!("f{n}").as_bytes(), file()).await.unwrap();
            }
            assert_eq!(a.held_leases(), 1);
            assert!(committed(&a, d.ino).await.is_empty(), "creates under a lease went to the store one by one");
            // The holder answers from its log.
            assert_eq!(a.lookup_known_dir(d.ino, b"f7").await.unwrap().nlink, 1);
            assert!(matches!(a.create(d.ino, b"f7", file()).await, Err(FsError::Exists)));
            assert_eq!(a.readdir(d.ino, None, 1000).await.unwrap().len(), 100);
            assert_eq!(a.readdir(d.ino, Some(b"f98"), 1000).await.unwrap().len(), 1);
            a.lease_tick().await;
            assert_eq!(committed(&a, d.ino).await.len(), 100);
            for n in 0..50 {
                a.unlink(d.ino, format!("f{n}").as_bytes(), |_| false).await.unwrap();
            }
            assert!(matches!(a.unlink(d.ino, b"f1", |_| false).await, Err(FsError::NotFound)));
            assert_eq!(committed(&a, d.ino).await.len(), 100);
            a.lease_tick().await;
            assert_eq!(committed(&a, d.ino).await.len(), 50);
            // The committed directory inode carries the log's times.
            let stored = a.inode_at(d.ino, Epoch::MAX).await.unwrap();
            assert_eq!(stored, a.inode(d.ino).await.unwrap());
            // Created and unlinked before any commit: never written at all.
            a.create(d.ino, b"tmp", file()).await.unwrap();
            a.unlink(d.ino, b"tmp", |_| false).await.unwrap();
            a.lease_tick().await;
            assert_eq!(committed(&a, d.ino).await.len(), 50);
            // Given back when idle, with everything committed.
            a.release_leases().await;
            assert_eq!(a.held_leases(), 0);
            assert!(a.store.get_at(&lease_key(d.ino), Epoch::MAX).await.unwrap().is_none());
        });
    }

    /// Lease commits (the tick's, and the last one giving the lease back) whose answer the
    /// store loses, alternately written and not: every logged change is committed once.
    #[test]
    fn lease_commits_whose_answer_was_lost_keep_every_change() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            a.store.lose_commit_answers(2);
            for n in 0..40 {
                a.create(d.ino, format!("f{n}").as_bytes(), file()).await.unwrap();
                if n % 4 == 3 {
                    a.lease_tick().await;
                }
            }
            for n in 0..10 {
                a.unlink(d.ino, format!("f{n}").as_bytes(), |_| false).await.unwrap();
                a.lease_tick().await;
            }
            a.release_leases().await;
            assert_eq!(a.held_leases(), 0);
            let mut names = committed(&b, d.ino).await;
            names.sort();
            let mut want: Vec<Vec<u8>> = (10..40).map(|n| format!("f{n}").into_bytes()).collect();
            want.sort();
            assert_eq!(names, want);
            assert!(a.store.get_at(&lease_key(d.ino), Epoch::MAX).await.unwrap().is_none());
            assert_eq!(b.inode(d.ino).await.unwrap(), a.inode_at(d.ino, Epoch::MAX).await.unwrap());
        });
    }

    #[test]
    fn another_mount_recalls_the_lease_and_sees_every_change() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            let f = a.create(d.ino, b"f", file()).await.unwrap();
            a.setattr(f.ino, &SetAttr { perm: Some(0o600), ..Default::default() }).await.unwrap();
            a.create(d.ino, b"gone", file()).await.unwrap();
            a.lease_tick().await;
            a.unlink(d.ino, b"gone", |_| false).await.unwrap();
            // b looks up a name only a's log has: it recalls the lease and finds it.
            let got = with_ticks(&a, b.lookup_known_dir(d.ino, b"f")).await.unwrap();
            assert_eq!((got.ino, got.perm), (f.ino, 0o600));
            assert_eq!(a.held_leases(), 0, "the recalled lease was not given back");
            assert!(matches!(b.lookup_known_dir(d.ino, b"gone").await, Err(FsError::NotFound)));
            // a stays away for a while: its next create is a plain transaction, seen by b.
            a.create(d.ino, b"g", file()).await.unwrap();
            assert_eq!(a.held_leases(), 0);
            assert_eq!(b.lookup_known_dir(d.ino, b"g").await.unwrap().nlink, 1);
        });
    }

    #[test]
    fn a_transaction_of_another_mount_waits_for_the_holders_log() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            a.create(d.ino, b"x", file()).await.unwrap();
            // b's create of the same name must see a's uncommitted one.
            let r = with_ticks(&a, b.create(d.ino, b"x", file())).await;
            assert!(matches!(r, Err(FsError::Exists)), "{r:?}");
            b.create(d.ino, b"y", file()).await.unwrap();
            let names: Vec<Vec<u8>> = b.readdir(d.ino, None, 10).await.unwrap().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, vec![b"x".to_vec(), b"y".to_vec()]);
            // And b's change of an inode a trusted (a chmod) recalls too.
            let (a2, b2) = two().await;
            let d2 = a2.create(a2.root, b"d", dir()).await.unwrap();
            let f = a2.create(d2.ino, b"f", file()).await.unwrap();
            a2.lease_tick().await;
            with_ticks(&a2, b2.setattr(f.ino, &SetAttr { perm: Some(0o640), ..Default::default() })).await.unwrap();
            assert_eq!(a2.inode(f.ino).await.unwrap().perm, 0o640);
        });
    }

    #[test]
    fn a_crashed_holder_loses_only_its_uncommitted_changes() {
        block(async {
            let (a, b) = two().await;
            a.set_lease_ttl(Duration::from_millis(100));
            b.set_lease_ttl(Duration::from_millis(100));
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            let kept = a.create(d.ino, b"kept", file()).await.unwrap();
            a.sync_leased(kept.ino).await.unwrap();
            a.create(d.ino, b"lost", file()).await.unwrap();
            drop(a); // SIGKILL: no commit, the lease record stays until it expires.
            assert_eq!(b.lookup_known_dir(d.ino, b"kept").await.unwrap().ino, kept.ino);
            assert!(matches!(b.lookup_known_dir(d.ino, b"lost").await, Err(FsError::NotFound)));
            b.create(d.ino, b"lost", file()).await.unwrap();
            assert_eq!(b.readdir(d.ino, None, 10).await.unwrap().len(), 2);
            assert!(b.store.get_at(&lease_key(d.ino), Epoch::MAX).await.unwrap().is_none());
        });
    }

    #[test]
    fn a_holder_that_missed_its_renewal_never_commits_over_the_new_state() {
        block(async {
            let (a, b) = two().await;
            a.set_lease_ttl(Duration::from_millis(50));
            b.set_lease_ttl(Duration::from_millis(50));
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            a.create(d.ino, b"f", file()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
            // b finds the lease expired, takes the directory over and creates "f" itself.
            let mine = b.create(d.ino, b"f", file()).await.unwrap();
            a.lease_tick().await;
            assert_eq!(a.held_leases(), 0);
            assert_eq!(b.lookup_known_dir(d.ino, b"f").await.unwrap().ino, mine.ino);
            assert_eq!(a.lookup_known_dir(d.ino, b"f").await.unwrap().ino, mine.ino);
        });
    }

    #[test]
    fn other_operations_settle_the_lease_first() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            let f = a.create(d.ino, b"f", file()).await.unwrap();
            a.create(d.ino, b"g", file()).await.unwrap();
            // mkdir: the parent's link count and entries are a transaction after the log.
            let sub = a.create(d.ino, b"sub", dir()).await.unwrap();
            assert_eq!(a.held_leases(), 0);
            assert_eq!(committed(&a, d.ino).await.len(), 3);
            // Files in the subdirectory under its lease, then rename one out and rmdir.
            a.create(sub.ino, b"s", file()).await.unwrap();
            a.rename(d.ino, b"f", sub.ino, b"f2", RenameMode::default(), |_| false).await.unwrap();
            assert_eq!(a.inode(f.ino).await.unwrap().parent, sub.ino);
            assert!(matches!(a.rmdir(d.ino, b"sub").await, Err(FsError::NotEmpty)));
            a.unlink(sub.ino, b"s", |_| false).await.unwrap();
            a.unlink(sub.ino, b"f2", |_| false).await.unwrap();
            a.rmdir(d.ino, b"sub").await.unwrap();
            a.link(a.lookup_known_dir(d.ino, b"g").await.unwrap().ino, d.ino, b"h").await.unwrap();
            assert_eq!(a.inode(d.ino).await.unwrap().nlink, 2);
            a.release_leases().await;
            // b sees the same tree without any lease.
            let names: Vec<Vec<u8>> = b.readdir(d.ino, None, 10).await.unwrap().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, vec![b"g".to_vec(), b"h".to_vec()]);
            assert_eq!(b.inode(d.ino).await.unwrap().nlink, 2);
            assert_eq!(b.lookup_known_dir(d.ino, b"h").await.unwrap().nlink, 2);
            assert!(matches!(b.inode(sub.ino).await, Err(FsError::NotFound)));
            assert!(b.orphans(10).await.unwrap().is_empty());
        });
    }

    #[test]
    fn operations_go_on_while_the_tick_commits() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            for n in 0..10 {
                a.create(d.ino, format!("f{n:02}").as_bytes(), file()).await.unwrap();
            }
            let work = async {
                for n in 10..60 {
                    a.create(d.ino, format!("f{n:02}").as_bytes(), file()).await.unwrap();
                    tokio::task::yield_now().await;
                }
                for n in 0..20 {
                    a.unlink(d.ino, format!("f{n:02}").as_bytes(), |_| false).await.unwrap();
                }
            };
            futures::join!(a.lease_tick(), a.lease_tick(), work);
            a.lease_tick().await;
            a.lease_tick().await;
            let want: Vec<Vec<u8>> = (20..60).map(|n| format!("f{n:02}").into_bytes()).collect();
            assert_eq!(committed(&a, d.ino).await, want);
            a.release_leases().await;
            assert_eq!(b.readdir(d.ino, None, 100).await.unwrap().len(), 40);
            assert_eq!(b.inode(d.ino).await.unwrap(), a.inode(d.ino).await.unwrap());
        });
    }

    #[test]
    fn size_commits_under_a_lease_are_durable_at_once() {
        block(async {
            let (a, b) = two().await;
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            let f = a.create(d.ino, b"f", file()).await.unwrap();
            // A close that wrote data: the create and the size land together, no tick needed.
            a.commit_write(f.ino, 4096, now_ns(), None).await.unwrap();
            let i = b.inode_at(f.ino, Epoch::MAX).await.unwrap();
            assert_eq!((i.size, i.data_version), (4096, 1));
            assert_eq!(committed(&b, d.ino).await, vec![b"f".to_vec()]);
            // Unlinking it later frees its data once the unlink is committed.
            a.unlink(d.ino, b"f", |_| false).await.unwrap();
            let freed = a.lease_tick().await;
            assert_eq!(freed.iter().map(|i| i.ino).collect::<Vec<_>>(), vec![f.ino]);
        });
    }
}
