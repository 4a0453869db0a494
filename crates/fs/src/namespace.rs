//! The namespace: every metadata operation of the file system as one transaction over the
//! dentry and inode tables ([`crate::meta_schema`]), retried on conflict a bounded number of
//! times. Nothing here knows about FUSE or file data; callers punch the data of the inodes an
//! operation frees after it committed.
//!
//! Invariants kept by every operation:
//! - A dentry names an existing inode; an inode with `nlink > 0` is named by exactly `nlink`
//!   dentries (directories: their own dentry plus `.` plus one `..` per child directory,
//!   i.e. `nlink = 2 + subdirectories`).
//! - A directory's `parent` is the directory whose dentry names it; no directory is its own
//!   ancestor (rename refuses to move one into its subtree).
//! - An inode with `nlink == 0` exists only while open somewhere, and then has an orphan key.

use crate::dir_lease::{apply_setattr, apply_write, new_inode, pause, DirLeases};
use crate::expect_cache::{ExpectCache, Tx};
use crate::fs_error::FsError;
use crate::ino_alloc::InoAlloc;
use crate::meta_schema::*;
use crate::meta_store::{MetaError, MetaStore, MetaTxn};
use std::time::{SystemTime, UNIX_EPOCH};
use strata_types::Epoch;

/// Attempts of one metadata transaction before giving up with `EAGAIN`.
pub const TXN_ATTEMPTS_MAX: u32 = 64;
/// Deepest directory tree the rename loop check walks.
pub const TREE_DEPTH_MAX: u32 = 4096;
/// Largest file: 2^44 bytes (16 TiB) keeps chunk indices and offsets far from overflow.
pub const FILE_BYTES_MAX: u64 = 1 << 44;
/// Symbolic links followed when resolving a path outside the kernel (`strata fs cat`).
pub const SYMLINK_FOLLOW_MAX: u32 = 40;
/// Virtual extended attribute: the object class of a file (settable until it has data) or the
/// class a directory's new children inherit.
pub const OCLASS_XATTR: &[u8] = b"user.strata.oclass";

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

pub fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid(format!("'{}' is not a valid file name", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// What a new inode starts as.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub symlink: Option<Vec<u8>>,
}

/// Attribute changes of `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
    pub ctime_ns: Option<i64>,
}

/// An inode whose last link went away: its data must be punched (or kept while open).
#[derive(Clone, Debug, Default)]
pub struct Released {
    /// Deleted now: punch its data.
    pub freed: Vec<Inode>,
    /// Still open here: kept with an orphan key until the last close.
    pub orphaned: Vec<u64>,
    /// Every inode that lost a link (its cached attributes are stale).
    pub touched: Vec<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameMode {
    pub noreplace: bool,
    pub exchange: bool,
}

pub struct Namespace<S: MetaStore> {
    pub store: S,
    pub root: u64,
    pub chunk_bytes: u64,
    pub default_oclass: String,
    ids: InoAlloc,
    /// This mount's session (lease key), recorded in the orphans it makes.
    session: std::sync::OnceLock<String>,
    /// Last seen committed values, sent as expectations instead of read first.
    pub(crate) known: ExpectCache,
    /// Directory leases held here (`dir_lease.rs`).
    pub(crate) leases: DirLeases,
}

impl<S: MetaStore> Namespace<S> {
    /// Open the volume's namespace, formatting it (superblock and root directory) when empty.
    pub async fn open(store: S, ids: InoAlloc, default_oclass: String, chunk_bytes: u64) -> Result<Namespace<S>, FsError> {
        assert!(chunk_bytes.is_power_of_two() && chunk_bytes >= 4096, "chunk size must be a power of two >= 4 KiB");
        for _ in 0..TXN_ATTEMPTS_MAX {
            if let Some(b) = store.get_at(&super_key(), Epoch::MAX).await? {
                let sb = decode_super(&b)?;
                return Ok(Namespace { store, root: sb.root, chunk_bytes: sb.chunk_bytes, default_oclass, ids, session: std::sync::OnceLock::new(), known: ExpectCache::default(), leases: DirLeases::new() });
            }
            let root = ids.next(store.homes(), &|n| store.home_of(n)).await?;
            let now = now_ns();
            let inode = Inode { ino: root, kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, size: 0, nlink: 2, atime_ns: now, mtime_ns: now, ctime_ns: now, crtime_ns: now, rdev: 0, parent: root, oclass: None, symlink: None, xattrs: Default::default(), data_version: 0 };
            let sb = Superblock { root, chunk_bytes, created_ns: now };
            let mut tx = store.begin().await?;
            if tx.get(&super_key()).await?.is_some() {
                continue;
            }
            tx.put(&inode_key(root), &encode_inode(&inode)).await?;
            tx.put(&super_key(), &encode_super(&sb)).await?;
            match tx.commit().await {
                Ok(_) | Err(MetaError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Contended("format", TXN_ATTEMPTS_MAX))
    }

    /// Run `f` in a transaction, retrying on conflict with a growing, jittered pause. The
    /// first attempt takes what it reads from the expectation cache (`expect_cache.rs`); if an
    /// expectation was wrong, or `f` gave an answer other than success from such values, it
    /// runs again with real reads.
    pub async fn txn<T>(&self, what: &'static str, mut f: impl AsyncFnMut(&mut Tx<'_, S::Txn>) -> Result<T, FsError>) -> Result<T, FsError> {
        let mut use_cache = true;
        for attempt in 0..TXN_ATTEMPTS_MAX {
            let mut tx = Tx::new(self.store.begin().await?, &self.known, use_cache);
            let r = f(&mut tx).await;
            let used_cache = tx.used_cache;
            let failed = match r {
                Ok(v) => match tx.commit().await {
                    Ok(_) => return Ok(v),
                    Err(e) => e,
                },
                Err(FsError::Meta(e)) => e,
                Err(FsError::Leased(dir)) => {
                    // A lease seen in cached values may be gone: look first, then recall.
                    if !used_cache {
                        self.recall(dir).await?;
                    }
                    use_cache = false;
                    continue;
                }
                Err(e) if used_cache => {
                    tracing::debug!(what, error = %e, "answer from cached metadata; checking it with real reads");
                    use_cache = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match failed {
                MetaError::Stale => {
                    use_cache = false;
                    continue;
                }
                MetaError::Conflict => {}
                e => return Err(e.into()),
            }
            tracing::debug!(what, attempt, "metadata transaction conflicted; retrying");
            pause(attempt).await;
        }
        Err(FsError::Contended(what, TXN_ATTEMPTS_MAX))
    }

    /// Name the mount session that files unlinked while open here belong to (once).
    pub fn set_session(&self, key: String) {
        let _ = self.session.set(key);
    }

    fn orphan_record(&self) -> Vec<u8> {
        encode_orphan(&Orphan { session: self.session.get().cloned().unwrap_or_default() })
    }

    /// The inode as of now: from a held lease's memory when one covers it.
    pub async fn inode(&self, ino: u64) -> Result<Inode, FsError> {
        if let Some(i) = self.held_lookup_ino(ino).await {
            return Ok(i);
        }
        self.inode_at(ino, Epoch::MAX).await
    }

    pub async fn inode_at(&self, ino: u64, epoch: Epoch) -> Result<Inode, FsError> {
        let key = inode_key(ino);
        let b = self.store.get_at(&key, epoch).await?;
        if epoch == Epoch::MAX {
            self.known.put(&key, b.as_deref());
        }
        match b {
            Some(b) => Ok(decode_inode(&b)?),
            None => Err(FsError::NotFound),
        }
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Inode, FsError> {
        self.lookup_at(parent, name, Epoch::MAX).await
    }

    pub async fn lookup_at(&self, parent: u64, name: &[u8], epoch: Epoch) -> Result<Inode, FsError> {
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong);
        }
        if epoch == Epoch::MAX {
            if let Some(r) = self.held_lookup(parent, name).await {
                return r;
            }
        }
        let dkey = dentry_key(parent, name);
        let d = if epoch == Epoch::MAX {
            self.read_unleased(parent, || self.store.get_at(&dkey, epoch)).await?
        } else {
            self.store.get_at(&dkey, epoch).await?
        };
        let d = match d {
            Some(b) => decode_dentry(&b)?,
            None => {
                // Tell "no such entry" from "parent is not a directory".
                let p = self.inode_at(parent, epoch).await?;
                return Err(if p.kind == Kind::Dir { FsError::NotFound } else { FsError::NotDir });
            }
        };
        self.inode_at(d.ino, epoch).await
    }

    /// A read of directory `dir`'s current state, with its lease read alongside: if another
    /// mount holds the lease, recall it and read again (its uncommitted changes land first).
    async fn read_unleased<T, F: std::future::Future<Output = Result<T, MetaError>>>(&self, dir: u64, read: impl Fn() -> F) -> Result<T, FsError> {
        let lkey = lease_key(dir);
        for _ in 0..TXN_ATTEMPTS_MAX {
            let (v, l) = futures::join!(read(), self.store.get_at(&lkey, Epoch::MAX));
            if self.foreign_lease(l?.as_deref())? {
                self.recall(dir).await?;
                continue;
            }
            return Ok(v?);
        }
        Err(FsError::Leased(dir))
    }

    /// [`Self::lookup`] in a directory known to exist: one read less for a missing name. When
    /// this mount saw the name before, its dentry and the inode it named are read at once (one
    /// round trip instead of two when the name still names that inode). The directory's lease
    /// is read alongside too; a held one answers from memory.
    pub async fn lookup_known_dir(&self, parent: u64, name: &[u8]) -> Result<Inode, FsError> {
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong);
        }
        if let Some(r) = self.held_lookup(parent, name).await {
            return r;
        }
        let dkey = dentry_key(parent, name);
        let lkey = lease_key(parent);
        let guess = self.known.get(&dkey).flatten().and_then(|b| decode_dentry(&b).ok());
        let mut attempts = 0;
        let (d, guessed) = loop {
            attempts += 1;
            let (d, l, guessed) = match &guess {
                Some(g) => {
                    let ikey = inode_key(g.ino);
                    let (d, l, i) = futures::join!(self.store.get_at(&dkey, Epoch::MAX), self.store.get_at(&lkey, Epoch::MAX), self.store.get_at(&ikey, Epoch::MAX));
                    (d?, l?, Some((g.ino, ikey, i?)))
                }
                None => {
                    let (d, l) = futures::join!(self.store.get_at(&dkey, Epoch::MAX), self.store.get_at(&lkey, Epoch::MAX));
                    (d?, l?, None)
                }
            };
            if self.foreign_lease(l.as_deref())? {
                if attempts >= TXN_ATTEMPTS_MAX {
                    return Err(FsError::Leased(parent));
                }
                self.recall(parent).await?;
                continue;
            }
            break (d, guessed);
        };
        self.known.put(&dkey, d.as_deref());
        let d = match d {
            Some(b) => decode_dentry(&b)?,
            None => return Err(FsError::NotFound),
        };
        match guessed {
            Some((ino, ikey, Some(b))) if ino == d.ino => {
                self.known.put(&ikey, Some(&b));
                Ok(decode_inode(&b)?)
            }
            _ => self.inode(d.ino).await,
        }
    }

    /// Up to `limit` entries of a directory after `after` (a name), in name order.
    pub async fn readdir(&self, dir: u64, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Dentry)>, FsError> {
        if let Some(page) = self.held_readdir(dir, after, limit).await {
            return Ok(page);
        }
        let prefix = dentry_prefix(dir);
        let after_key = after.map(|a| dentry_key(dir, a));
        let kvs = self.read_unleased(dir, || self.store.scan_prefix_at(&prefix, after_key.as_deref(), limit, Epoch::MAX)).await?;
        kvs.into_iter().map(|(k, v)| Ok((dentry_name(&k).to_vec(), decode_dentry(&v)?))).collect()
    }

    /// Resolve an absolute path (relative to the volume root) at an epoch, following symlinks.
    pub async fn resolve_at(&self, path: &str, epoch: Epoch) -> Result<Inode, FsError> {
        // The kernel never passes a NUL; a path typed or scripted to the CLI might.
        if path.contains('\0') {
            return Err(FsError::Invalid(format!("path {path:?} contains a NUL byte")));
        }
        let mut pending: Vec<Vec<u8>> = path.split('/').filter(|c| !c.is_empty()).map(|c| c.as_bytes().to_vec()).rev().collect();
        let mut cur = self.inode_at(self.root, epoch).await?;
        let mut follows = 0;
        while let Some(c) = pending.pop() {
            if c == b"." {
                continue;
            }
            if c == b".." {
                cur = self.inode_at(cur.parent, epoch).await?;
                continue;
            }
            if cur.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            let next = self.lookup_at(cur.ino, &c, epoch).await?;
            if next.kind == Kind::Symlink {
                follows += 1;
                if follows > SYMLINK_FOLLOW_MAX {
                    return Err(FsError::Loop);
                }
                let target = next.symlink.clone().unwrap_or_default();
                if target.starts_with(b"/") {
                    return Err(FsError::Invalid("absolute symbolic links point outside the volume".into()));
                }
                pending.extend(target.split(|b| *b == b'/').filter(|c| !c.is_empty()).map(|c| c.to_vec()).rev());
                continue;
            }
            cur = next;
        }
        Ok(cur)
    }

    async fn tx_inode(&self, tx: &mut Tx<'_, S::Txn>, ino: u64) -> Result<Inode, FsError> {
        match tx.get(&inode_key(ino)).await? {
            Some(b) => Ok(decode_inode(&b)?),
            None => Err(FsError::NotFound),
        }
    }

    /// A directory an operation changes (or answers about): fenced by its lease.
    async fn tx_dir(&self, tx: &mut Tx<'_, S::Txn>, ino: u64) -> Result<Inode, FsError> {
        let d = self.tx_inode(tx, ino).await?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if d.nlink == 0 {
            return Err(FsError::NotFound);
        }
        self.tx_fence(tx, ino).await?;
        Ok(d)
    }

    async fn tx_dentry(&self, tx: &mut Tx<'_, S::Txn>, parent: u64, name: &[u8]) -> Result<Option<Dentry>, FsError> {
        match tx.get(&dentry_key(parent, name)).await? {
            Some(b) => Ok(Some(decode_dentry(&b)?)),
            None => Ok(None),
        }
    }

    /// Write an existing inode: fenced by the lease that may cover it (a directory's own, a
    /// file's directory's).
    async fn tx_put(&self, tx: &mut Tx<'_, S::Txn>, i: &Inode) -> Result<(), FsError> {
        self.tx_fence(tx, if i.kind == Kind::Dir { i.ino } else { i.parent }).await?;
        Ok(tx.put(&inode_key(i.ino), &encode_inode(i)).await?)
    }

    /// Drop one link of `i` (already loaded); delete it when none remain unless it is open.
    async fn tx_drop_link(&self, tx: &mut Tx<'_, S::Txn>, mut i: Inode, now: i64, is_open: &impl Fn(u64) -> bool, orphan: &[u8], rel: &mut Released) -> Result<(), FsError> {
        i.nlink = i.nlink.saturating_sub(if i.kind == Kind::Dir { i.nlink } else { 1 });
        i.ctime_ns = now;
        rel.touched.push(i.ino);
        if i.nlink > 0 {
            return self.tx_put(tx, &i).await;
        }
        if i.kind != Kind::Dir && is_open(i.ino) {
            tx.put(&orphan_key(i.ino), orphan).await?;
            rel.orphaned.push(i.ino);
            return self.tx_put(tx, &i).await;
        }
        tx.delete(&inode_key(i.ino)).await?;
        rel.freed.push(i);
        Ok(())
    }

    /// A number for a new inode in `parent`: a file's lives in its directory's shard (its
    /// create and unlink are one-shard transactions); a directory's is spread over the shards.
    async fn new_ino(&self, parent: u64, kind: Kind) -> Result<u64, FsError> {
        let home_of = |n| self.store.home_of(n);
        if kind == Kind::Dir {
            self.ids.next(self.store.homes(), &home_of).await
        } else {
            self.ids.next_in(self.store.home_of(parent), &home_of).await
        }
    }

    pub async fn create(&self, parent: u64, name: &[u8], node: NewNode) -> Result<Inode, FsError> {
        check_name(name)?;
        if let Some(t) = &node.symlink {
            if t.is_empty() || t.len() > SYMLINK_BYTES_MAX || t.contains(&0) {
                return Err(FsError::Invalid("symbolic link target must be 1..=4096 bytes without NUL".into()));
            }
        }
        let ino = self.new_ino(parent, node.kind).await?;
        // Files, links and special files are made under the directory's lease when this mount
        // holds or can take it; a directory (a new shard, the parent's link count) is a
        // transaction, after the parent's lease was given back.
        let mut g = self.dir_slot(parent, node.kind != Kind::Dir).await?;
        if g.is_some() {
            if node.kind != Kind::Dir {
                let h = g.as_mut().expect("checked");
                return self.create_held(parent, h, name, &node, ino);
            }
            self.flush_slot(parent, &mut g, true).await?;
        }
        self.txn("create", async |tx| {
            let mut p = self.tx_dir(tx, parent).await?;
            if self.tx_dentry(tx, parent, name).await?.is_some() {
                return Err(FsError::Exists);
            }
            let now = now_ns();
            let i = new_inode(&p, &node, ino, now, &self.default_oclass);
            // A new inode: nothing to fence.
            tx.put(&inode_key(i.ino), &encode_inode(&i)).await?;
            tx.put(&dentry_key(parent, name), &encode_dentry(Dentry { ino, kind: node.kind })).await?;
            p.mtime_ns = now;
            p.ctime_ns = now;
            if node.kind == Kind::Dir {
                p.nlink += 1;
            }
            self.tx_put(tx, &p).await?;
            Ok(i)
        })
        .await
    }

    pub async fn unlink(&self, parent: u64, name: &[u8], is_open: impl Fn(u64) -> bool) -> Result<Released, FsError> {
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong);
        }
        let orphan = self.orphan_record();
        let mut g = self.dir_slot(parent, true).await?;
        if let Some(h) = g.as_mut() {
            if let Some(rel) = self.unlink_held(parent, h, name, &is_open).await? {
                return Ok(rel);
            }
            self.flush_slot(parent, &mut g, true).await?;
        }
        self.txn("unlink", async |tx| {
            let mut p = self.tx_dir(tx, parent).await?;
            let d = self.tx_dentry(tx, parent, name).await?.ok_or(FsError::NotFound)?;
            if d.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            let i = self.tx_inode(tx, d.ino).await?;
            tx.delete(&dentry_key(parent, name)).await?;
            let now = now_ns();
            let mut rel = Released::default();
            self.tx_drop_link(tx, i, now, &is_open, &orphan, &mut rel).await?;
            p.mtime_ns = now;
            p.ctime_ns = now;
            self.tx_put(tx, &p).await?;
            Ok(rel)
        })
        .await
    }

    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong);
        }
        if name == b"." {
            return Err(FsError::Invalid("cannot remove '.'".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let _g = self.settle(&[parent], true).await?;
        self.txn("rmdir", async |tx| {
            let mut p = self.tx_dir(tx, parent).await?;
            let d = self.tx_dentry(tx, parent, name).await?.ok_or(FsError::NotFound)?;
            if d.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            // Another mount may hold the child's lease with entries not yet committed.
            self.tx_fence(tx, d.ino).await?;
            if !tx.scan_prefix(&dentry_prefix(d.ino), None, 1).await?.is_empty() {
                return Err(FsError::NotEmpty);
            }
            tx.delete(&dentry_key(parent, name)).await?;
            tx.delete(&inode_key(d.ino)).await?;
            let now = now_ns();
            p.nlink = p.nlink.saturating_sub(1).max(2);
            p.mtime_ns = now;
            p.ctime_ns = now;
            self.tx_put(tx, &p).await?;
            Ok(())
        })
        .await
    }

    /// Is `dir` equal to `ancestor` or below it?
    async fn tx_is_within(&self, tx: &mut Tx<'_, S::Txn>, root: u64, mut dir: u64, ancestor: u64) -> Result<bool, FsError> {
        for _ in 0..TREE_DEPTH_MAX {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == root {
                return Ok(false);
            }
            dir = self.tx_inode(tx, dir).await?.parent;
        }
        Err(FsError::Invalid(format!("directory tree deeper than {TREE_DEPTH_MAX} levels")))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn rename(&self, parent: u64, name: &[u8], new_parent: u64, new_name: &[u8], mode: RenameMode, is_open: impl Fn(u64) -> bool) -> Result<Released, FsError> {
        check_name(new_name)?;
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong);
        }
        if mode.noreplace && mode.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE and RENAME_EXCHANGE exclude each other".into()));
        }
        let root = self.root;
        let orphan = self.orphan_record();
        let _g = self.settle(&[parent, new_parent], true).await?;
        self.txn("rename", async |tx| {
            let mut rel = Released::default();
            let mut sp = self.tx_dir(tx, parent).await?;
            let src = self.tx_dentry(tx, parent, name).await?.ok_or(FsError::NotFound)?;
            if parent == new_parent && name == new_name {
                return Ok(rel);
            }
            let mut dp = if new_parent == parent { None } else { Some(self.tx_dir(tx, new_parent).await?) };
            let dst = self.tx_dentry(tx, new_parent, new_name).await?;
            if src.kind == Kind::Dir && new_parent != parent && self.tx_is_within(tx, root, new_parent, src.ino).await? {
                return Err(FsError::Invalid("cannot move a directory into itself".into()));
            }
            let now = now_ns();
            let mut moved = self.tx_inode(tx, src.ino).await?;
            if mode.exchange {
                let dst = dst.ok_or(FsError::NotFound)?;
                if dst.kind == Kind::Dir && new_parent != parent && self.tx_is_within(tx, root, parent, dst.ino).await? {
                    return Err(FsError::Invalid("cannot move a directory into itself".into()));
                }
                let mut other = self.tx_inode(tx, dst.ino).await?;
                tx.put(&dentry_key(parent, name), &encode_dentry(dst)).await?;
                tx.put(&dentry_key(new_parent, new_name), &encode_dentry(src)).await?;
                if let Some(dp) = dp.as_mut() {
                    // Each directory moved across parents changes both parents' link counts.
                    if moved.kind == Kind::Dir {
                        moved.parent = new_parent;
                        sp.nlink -= 1;
                        dp.nlink += 1;
                    }
                    if other.kind == Kind::Dir {
                        other.parent = parent;
                        dp.nlink -= 1;
                        sp.nlink += 1;
                    }
                }
                other.ctime_ns = now;
                self.tx_put(tx, &other).await?;
            } else {
                if let Some(dst) = dst {
                    if mode.noreplace {
                        return Err(FsError::Exists);
                    }
                    if dst.ino == src.ino {
                        // Both names link the same inode: POSIX says do nothing.
                        return Ok(rel);
                    }
                    let victim = self.tx_inode(tx, dst.ino).await?;
                    match (src.kind == Kind::Dir, victim.kind == Kind::Dir) {
                        (true, false) => return Err(FsError::NotDir),
                        (false, true) => return Err(FsError::IsDir),
                        (true, true) => {
                            if !tx.scan_prefix(&dentry_prefix(victim.ino), None, 1).await?.is_empty() {
                                return Err(FsError::NotEmpty);
                            }
                            let target_parent = dp.as_mut().unwrap_or(&mut sp);
                            target_parent.nlink = target_parent.nlink.saturating_sub(1).max(2);
                        }
                        (false, false) => {}
                    }
                    self.tx_drop_link(tx, victim, now, &is_open, &orphan, &mut rel).await?;
                }
                tx.delete(&dentry_key(parent, name)).await?;
                tx.put(&dentry_key(new_parent, new_name), &encode_dentry(src)).await?;
                if moved.kind != Kind::Dir && moved.nlink == 1 {
                    // A file's only directory (whose lease covers its inode).
                    moved.parent = new_parent;
                }
                if let Some(dp) = dp.as_mut() {
                    if moved.kind == Kind::Dir {
                        moved.parent = new_parent;
                        sp.nlink = sp.nlink.saturating_sub(1).max(2);
                        dp.nlink += 1;
                    }
                }
            }
            moved.ctime_ns = now;
            self.tx_put(tx, &moved).await?;
            sp.mtime_ns = now;
            sp.ctime_ns = now;
            self.tx_put(tx, &sp).await?;
            if let Some(mut dp) = dp {
                dp.mtime_ns = now;
                dp.ctime_ns = now;
                self.tx_put(tx, &dp).await?;
            }
            Ok(rel)
        })
        .await
    }

    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Inode, FsError> {
        check_name(new_name)?;
        let mut dirs = vec![new_parent];
        dirs.extend(self.lease_dir_of(ino));
        let g = self.settle(&dirs, false).await?;
        let r = self.txn("link", async |tx| {
            let mut i = self.tx_inode(tx, ino).await?;
            if i.kind == Kind::Dir {
                return Err(FsError::Perm("hard links to directories are not allowed"));
            }
            if i.nlink == 0 {
                return Err(FsError::NotFound);
            }
            let mut dp = self.tx_dir(tx, new_parent).await?;
            if self.tx_dentry(tx, new_parent, new_name).await?.is_some() {
                return Err(FsError::Exists);
            }
            let now = now_ns();
            i.nlink += 1;
            i.ctime_ns = now;
            self.tx_put(tx, &i).await?;
            tx.put(&dentry_key(new_parent, new_name), &encode_dentry(Dentry { ino, kind: i.kind })).await?;
            dp.mtime_ns = now;
            dp.ctime_ns = now;
            self.tx_put(tx, &dp).await?;
            Ok(i)
        })
        .await;
        drop(g);
        r
    }

    /// Change attributes. A size change here is metadata only: the caller punches data beyond
    /// a shrunk size before calling.
    pub async fn setattr(&self, ino: u64, a: &SetAttr) -> Result<Inode, FsError> {
        if a.size.is_some_and(|s| s > FILE_BYTES_MAX) {
            return Err(FsError::TooBig(FILE_BYTES_MAX));
        }
        let now = now_ns();
        // A size change commits at once (data changed: another mount's next open must see it).
        if let Some(i) = self.change_trusted(ino, a.size.is_some(), |i| apply_setattr(i, a, now)).await? {
            return Ok(i);
        }
        let g = self.settle(&self.lease_dir_of(ino).into_iter().collect::<Vec<_>>(), false).await?;
        let r = self
            .txn("setattr", async |tx| {
                let mut i = self.tx_inode(tx, ino).await?;
                apply_setattr(&mut i, a, now_ns())?;
                self.tx_put(tx, &i).await?;
                Ok(i)
            })
            .await;
        drop(g);
        if let Ok(i) = &r {
            self.untrust(i).await;
        }
        r
    }

    /// Record flushed data: the size grows to at least `end` (or becomes `exact` after a
    /// truncate) and the data version moves.
    pub async fn commit_write(&self, ino: u64, end: u64, mtime_ns: i64, exact: Option<u64>) -> Result<Inode, FsError> {
        if let Some(i) = self.change_trusted(ino, true, |i| {
            apply_write(i, end, mtime_ns, exact);
            Ok(())
        })
        .await?
        {
            return Ok(i);
        }
        let r = self
            .txn("write", async |tx| {
                let mut i = self.tx_inode(tx, ino).await?;
                apply_write(&mut i, end, mtime_ns, exact);
                self.tx_put(tx, &i).await?;
                Ok(i)
            })
            .await;
        if let Ok(i) = &r {
            self.untrust(i).await;
        }
        r
    }

    /// Delete an orphan (unlinked while open) at its last close; returns it for data punching.
    pub async fn reclaim_orphan(&self, ino: u64) -> Result<Option<Inode>, FsError> {
        self.txn("reclaim", async |tx| {
            let Some(b) = tx.get(&inode_key(ino)).await? else { return Ok(None) };
            let i = decode_inode(&b)?;
            if i.nlink > 0 {
                tx.delete(&orphan_key(ino)).await?;
                return Ok(None);
            }
            tx.delete(&inode_key(ino)).await?;
            tx.delete(&orphan_key(ino)).await?;
            Ok(Some(i))
        })
        .await
    }

    /// Up to `limit` orphans (unlinked while open) with the session that holds each open.
    pub async fn orphans(&self, limit: usize) -> Result<Vec<(u64, Orphan)>, FsError> {
        let kvs = self.store.scan_prefix_at(&orphan_prefix(), None, limit, Epoch::MAX).await?;
        let mut out = Vec::with_capacity(kvs.len());
        for (k, v) in kvs {
            let Some(ino) = orphan_ino(&k) else { continue };
            out.push((ino, decode_orphan(&v)?));
        }
        Ok(out)
    }

    pub async fn set_xattr(&self, ino: u64, name: &[u8], value: &[u8], create: bool, replace: bool) -> Result<(), FsError> {
        if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
            return Err(FsError::Range);
        }
        if value.len() > XATTR_VALUE_BYTES_MAX {
            return Err(FsError::TooBig(XATTR_VALUE_BYTES_MAX as u64));
        }
        let _g = self.settle(&self.lease_dir_of(ino).into_iter().collect::<Vec<_>>(), false).await?;
        if name == OCLASS_XATTR {
            let class = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<strata_types::ObjectClass>().ok()).ok_or_else(|| FsError::Invalid(format!("'{}' is not an object class (e.g. RP_2G1, EC_2P1G1, S1)", String::from_utf8_lossy(value))))?;
            return self
                .txn("setclass", async |tx| {
                    let mut i = self.tx_inode(tx, ino).await?;
                    match i.kind {
                        Kind::Dir => {}
                        Kind::File if i.size == 0 && i.data_version == 0 => {}
                        Kind::File => return Err(FsError::Invalid("the object class of a file is fixed once it has data".into())),
                        _ => return Err(FsError::Invalid("only files and directories have an object class".into())),
                    }
                    i.oclass = Some(class.to_string());
                    i.ctime_ns = now_ns();
                    self.tx_put(tx, &i).await
                })
                .await;
        }
        self.txn("setxattr", async |tx| {
            let mut i = self.tx_inode(tx, ino).await?;
            let exists = i.xattrs.contains_key(name);
            if create && exists {
                return Err(FsError::Exists);
            }
            if replace && !exists {
                return Err(FsError::NoXattr);
            }
            let old = i.xattrs.get(name).map_or(0, |v| name.len() + v.len());
            if i.xattrs_bytes() - old + name.len() + value.len() > XATTRS_BYTES_MAX {
                return Err(FsError::NoSpace(XATTRS_BYTES_MAX));
            }
            i.xattrs.insert(name.to_vec(), value.to_vec());
            i.ctime_ns = now_ns();
            self.tx_put(tx, &i).await
        })
        .await
    }

    pub async fn remove_xattr(&self, ino: u64, name: &[u8]) -> Result<(), FsError> {
        let _g = self.settle(&self.lease_dir_of(ino).into_iter().collect::<Vec<_>>(), false).await?;
        self.txn("removexattr", async |tx| {
            let mut i = self.tx_inode(tx, ino).await?;
            if i.xattrs.remove(name).is_none() {
                return Err(FsError::NoXattr);
            }
            i.ctime_ns = now_ns();
            self.tx_put(tx, &i).await
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::meta_store::MemMetaStore;

    /// Run `f` to completion on a one-thread runtime (shared with `dir_lease`'s tests).
    pub(crate) fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime").block_on(f)
    }

    pub(crate) fn file() -> NewNode {
        NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0, symlink: None }
    }
    pub(crate) fn dir() -> NewNode {
        NewNode { kind: Kind::Dir, perm: 0o755, uid: 0, gid: 0, rdev: 0, symlink: None }
    }

    async fn ns() -> Namespace<MemMetaStore> {
        Namespace::open(MemMetaStore::new(), InoAlloc::counter(16), "RP_2G1".into(), 1 << 20).await.unwrap()
    }

    #[test]
    fn create_lookup_unlink_and_link_counts() {
        block(async {
            let ns = ns().await;
            let r = ns.root;
            let a = ns.create(r, b"a", file()).await.unwrap();
            assert!(matches!(ns.create(r, b"a", file()).await, Err(FsError::Exists)));
            assert_eq!(ns.lookup(r, b"a").await.unwrap().ino, a.ino);
            let d = ns.create(r, b"d", dir()).await.unwrap();
            assert_eq!(ns.inode(r).await.unwrap().nlink, 3);
            ns.link(a.ino, d.ino, b"b").await.unwrap();
            assert_eq!(ns.inode(a.ino).await.unwrap().nlink, 2);
            assert!(matches!(ns.rmdir(r, b"d").await, Err(FsError::NotEmpty)));
            assert!(matches!(ns.unlink(r, b"d", |_| false).await, Err(FsError::IsDir)));
            assert!(ns.unlink(r, b"a", |_| false).await.unwrap().freed.is_empty());
            let rel = ns.unlink(d.ino, b"b", |_| false).await.unwrap();
            assert_eq!(rel.freed.len(), 1);
            assert!(matches!(ns.inode(a.ino).await, Err(FsError::NotFound)));
            ns.rmdir(r, b"d").await.unwrap();
            assert_eq!(ns.inode(r).await.unwrap().nlink, 2);
            assert!(matches!(ns.lookup(a.ino, b"x").await, Err(FsError::NotFound)));
            assert!(matches!(ns.create(r, &[b'x'; 256], file()).await, Err(FsError::NameTooLong)));
            assert_eq!(ns.readdir(r, None, 10).await.unwrap().len(), 0);
        });
    }

    /// Every other commit loses its answer (alternately written and not): each operation
    /// still answers what happened, never EIO, never EEXIST for its own directory.
    #[test]
    fn operations_whose_commit_answer_was_lost_answer_what_happened() {
        block(async {
            let ns = ns().await;
            ns.store.lose_commit_answers(2);
            let r = ns.root;
            for n in 0..20 {
                let (d, f, g) = (format!("d{n}"), format!("f{n}"), format!("g{n}"));
                ns.create(r, d.as_bytes(), dir()).await.unwrap();
                assert!(matches!(ns.create(r, d.as_bytes(), dir()).await, Err(FsError::Exists)));
                let i = ns.create(r, f.as_bytes(), file()).await.unwrap();
                ns.setattr(i.ino, &SetAttr { perm: Some(0o600), ..Default::default() }).await.unwrap();
                ns.rename(r, f.as_bytes(), r, g.as_bytes(), RenameMode::default(), |_| false).await.unwrap();
                let moved = ns.lookup(r, g.as_bytes()).await.unwrap();
                assert_eq!((moved.ino, moved.perm), (i.ino, 0o600));
                assert!(matches!(ns.lookup(r, f.as_bytes()).await, Err(FsError::NotFound)));
                ns.link(i.ino, r, f.as_bytes()).await.unwrap();
                assert_eq!(ns.unlink(r, g.as_bytes(), |_| false).await.unwrap().freed.len(), 0);
                assert_eq!(ns.unlink(r, f.as_bytes(), |_| false).await.unwrap().freed.len(), 1);
                assert!(matches!(ns.unlink(r, g.as_bytes(), |_| false).await, Err(FsError::NotFound)));
                ns.rmdir(r, d.as_bytes()).await.unwrap();
                assert!(matches!(ns.rmdir(r, d.as_bytes()).await, Err(FsError::NotFound)));
            }
            assert!(ns.readdir(r, None, 100).await.unwrap().is_empty());
            assert_eq!(ns.inode(r).await.unwrap().nlink, 2);
        });
    }

    #[test]
    fn file_operations_within_a_directory_are_one_shard_transactions() {
        block(async {
            let ns = ns().await;
            let d = ns.create(ns.root, b"d", dir()).await.unwrap();
            let e = ns.create(ns.root, b"e", dir()).await.unwrap();
            // Directories spread over the shards.
            let mut homes = std::collections::BTreeSet::new();
            for n in 0..32 {
                homes.insert(ns.store.home_of(ns.create(d.ino, format!("sub{n}").as_bytes(), dir()).await.unwrap().ino));
            }
            assert!(homes.len() > 1, "directories all landed in one shard");
            let before = ns.store.multi_shard_commits();
            for n in 0..50 {
                let name = format!("f{n}");
                let f = ns.create(e.ino, name.as_bytes(), file()).await.unwrap();
                assert_eq!(ns.store.home_of(f.ino), ns.store.home_of(e.ino));
                ns.setattr(f.ino, &SetAttr { perm: Some(0o600), ..Default::default() }).await.unwrap();
                ns.rename(e.ino, name.as_bytes(), e.ino, format!("g{n}").as_bytes(), RenameMode::default(), |_| false).await.unwrap();
            }
            ns.create(e.ino, b"l", NewNode { kind: Kind::Symlink, symlink: Some(b"g1".to_vec()), ..file() }).await.unwrap();
            for n in 0..50 {
                assert_eq!(ns.unlink(e.ino, format!("g{n}").as_bytes(), |_| false).await.unwrap().freed.len(), 1);
            }
            assert_eq!(ns.store.multi_shard_commits(), before, "a file operation within one directory needed two-phase commit");
            // A hard link into another directory and a move there still work (two shards).
            let f = ns.create(e.ino, b"h", file()).await.unwrap();
            ns.link(f.ino, d.ino, b"h2").await.unwrap();
            ns.rename(e.ino, b"h", d.ino, b"h3", RenameMode::default(), |_| false).await.unwrap();
            assert_eq!(ns.inode(f.ino).await.unwrap().nlink, 2);
            ns.unlink(d.ino, b"h2", |_| false).await.unwrap();
            assert_eq!(ns.unlink(d.ino, b"h3", |_| false).await.unwrap().freed.len(), 1);
            assert!(ns.store.multi_shard_commits() > before);
        });
    }

    #[test]
    fn a_second_client_changing_what_the_first_cached_is_seen_by_its_transactions() {
        block(async {
            let store = MemMetaStore::new();
            let ids = InoAlloc::counter(16);
            let a = Namespace::open(store.clone(), ids.clone(), "RP_2G1".into(), 1 << 20).await.unwrap();
            let b = Namespace::open(store.clone(), ids, "RP_2G1".into(), 1 << 20).await.unwrap();
            let d = a.create(a.root, b"d", dir()).await.unwrap();
            a.create(d.ino, b"f", file()).await.unwrap();
            assert!(matches!(a.lookup_known_dir(d.ino, b"g").await, Err(FsError::NotFound)));
            // b changes the directory a has cached (its inode, "f", "g").
            b.create(d.ino, b"g", file()).await.unwrap();
            b.unlink(d.ino, b"f", |_| false).await.unwrap();
            b.create(d.ino, b"sub", dir()).await.unwrap();
            // a's cached beliefs ("f" exists, "g" does not) must not decide its answers.
            a.create(d.ino, b"f", file()).await.unwrap();
            assert!(matches!(a.create(d.ino, b"g", file()).await, Err(FsError::Exists)));
            assert_eq!(a.lookup_known_dir(d.ino, b"g").await.unwrap().nlink, 1);
            a.unlink(d.ino, b"g", |_| false).await.unwrap();
            assert!(matches!(a.unlink(d.ino, b"g", |_| false).await, Err(FsError::NotFound)));
            // b's subdirectory counted once in the link count, whatever a had cached.
            a.create(d.ino, b"sub2", dir()).await.unwrap();
            assert_eq!(b.inode(d.ino).await.unwrap().nlink, 4);
            let names: Vec<Vec<u8>> = b.readdir(d.ino, None, 10).await.unwrap().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, vec![b"f".to_vec(), b"sub".to_vec(), b"sub2".to_vec()]);
        });
    }

    #[test]
    fn bad_names_and_paths_are_refused_with_their_errno() {
        block(async {
            let ns = ns().await;
            let r = ns.root;
            let long = vec![b'n'; NAME_BYTES_MAX + 1];
            for bad in [&b"a\0b"[..], b"a/b", b"", b".", b".."] {
                let e = ns.create(r, bad, file()).await.unwrap_err();
                assert_eq!(e.errno(), libc::EINVAL, "{bad:?}: {e}");
            }
            assert_eq!(ns.create(r, &long, file()).await.unwrap_err().errno(), libc::ENAMETOOLONG);
            ns.create(r, &long[..NAME_BYTES_MAX], file()).await.unwrap();
            let f = ns.create(r, b"f", file()).await.unwrap();
            assert_eq!(ns.link(f.ino, r, &long).await.unwrap_err().errno(), libc::ENAMETOOLONG);
            assert_eq!(ns.rename(r, b"f", r, &long, RenameMode::default(), |_| false).await.unwrap_err().errno(), libc::ENAMETOOLONG);
            let e = ns.resolve_at("/f\0/x", Epoch::MAX).await.unwrap_err();
            assert!(e.errno() == libc::EINVAL && e.to_string().contains("NUL"), "{e}");
            // Nothing was half-made: the namespace still works.
            assert_eq!(ns.resolve_at("/f", Epoch::MAX).await.unwrap().ino, f.ino);
            assert_eq!(ns.readdir(r, None, 10).await.unwrap().len(), 2);
        });
    }

    #[test]
    fn unlink_of_an_open_file_orphans_it_until_reclaimed() {
        block(async {
            let ns = ns().await;
            let a = ns.create(ns.root, b"a", file()).await.unwrap();
            let rel = ns.unlink(ns.root, b"a", |i| i == a.ino).await.unwrap();
            assert_eq!(rel.orphaned, vec![a.ino]);
            assert_eq!(ns.inode(a.ino).await.unwrap().nlink, 0);
            assert_eq!(ns.orphans(10).await.unwrap().iter().map(|o| o.0).collect::<Vec<_>>(), vec![a.ino]);
            assert!(ns.reclaim_orphan(a.ino).await.unwrap().is_some());
            assert!(ns.orphans(10).await.unwrap().is_empty());
        });
    }

    #[test]
    fn rename_over_files_and_directories() {
        block(async {
            let ns = ns().await;
            let r = ns.root;
            let a = ns.create(r, b"a", file()).await.unwrap();
            let b = ns.create(r, b"b", file()).await.unwrap();
            let rel = ns.rename(r, b"a", r, b"b", RenameMode::default(), |_| false).await.unwrap();
            assert_eq!(rel.freed.iter().map(|i| i.ino).collect::<Vec<_>>(), vec![b.ino]);
            assert_eq!(ns.lookup(r, b"b").await.unwrap().ino, a.ino);
            let d1 = ns.create(r, b"d1", dir()).await.unwrap();
            let d2 = ns.create(r, b"d2", dir()).await.unwrap();
            ns.create(d2.ino, b"x", file()).await.unwrap();
            assert!(matches!(ns.rename(r, b"d1", r, b"d2", RenameMode::default(), |_| false).await, Err(FsError::NotEmpty)));
            assert!(matches!(ns.rename(r, b"d1", r, b"b", RenameMode::default(), |_| false).await, Err(FsError::NotDir)));
            assert!(matches!(ns.rename(r, b"b", r, b"d1", RenameMode::default(), |_| false).await, Err(FsError::IsDir)));
            assert!(matches!(ns.rename(r, b"d1", r, b"b", RenameMode { noreplace: true, exchange: false }, |_| false).await, Err(FsError::Exists)));
            // Into its own subtree.
            let sub = ns.create(d1.ino, b"sub", dir()).await.unwrap();
            assert!(matches!(ns.rename(r, b"d1", sub.ino, b"x", RenameMode::default(), |_| false).await, Err(FsError::Invalid(_))));
            // Move a directory across parents: link counts follow.
            ns.rename(d1.ino, b"sub", d2.ino, b"sub", RenameMode::default(), |_| false).await.unwrap();
            assert_eq!(ns.inode(d1.ino).await.unwrap().nlink, 2);
            assert_eq!(ns.inode(d2.ino).await.unwrap().nlink, 3);
            assert_eq!(ns.inode(sub.ino).await.unwrap().parent, d2.ino);
            // Exchange a file and a directory.
            ns.rename(r, b"b", d2.ino, b"sub", RenameMode { noreplace: false, exchange: true }, |_| false).await.unwrap();
            assert_eq!(ns.lookup(r, b"b").await.unwrap().ino, sub.ino);
            assert_eq!(ns.lookup(d2.ino, b"sub").await.unwrap().ino, a.ino);
            assert_eq!(ns.inode(d2.ino).await.unwrap().nlink, 2);
            assert_eq!(ns.inode(sub.ino).await.unwrap().parent, r);
            let got = ns.resolve_at("/d2/sub", Epoch::MAX).await.unwrap();
            assert_eq!(got.ino, a.ino);
        });
    }

    #[test]
    fn concurrent_creates_in_one_directory_all_land() {
        let ns = std::sync::Arc::new(block(ns()));
        // Threads with their own runtimes: the commits really race.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ns = ns.clone();
                std::thread::spawn(move || {
                    block(async {
                        for i in 0..8 {
                            ns.create(ns.root, format!("f{t}-{i}").as_bytes(), file()).await.unwrap();
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        block(async {
            assert_eq!(ns.readdir(ns.root, None, 100).await.unwrap().len(), 32);
            let page = ns.readdir(ns.root, Some(b"f1"), 5).await.unwrap();
            assert_eq!(page.len(), 5);
            assert!(page.iter().all(|(n, _)| n.as_slice() > &b"f1"[..]));
        });
    }

    #[test]
    fn xattrs_respect_create_replace_and_limits() {
        block(async {
            let ns = ns().await;
            let a = ns.create(ns.root, b"a", file()).await.unwrap();
            ns.set_xattr(a.ino, b"user.k", b"v", true, false).await.unwrap();
            assert!(matches!(ns.set_xattr(a.ino, b"user.k", b"v", true, false).await, Err(FsError::Exists)));
            assert!(matches!(ns.set_xattr(a.ino, b"user.z", b"v", false, true).await, Err(FsError::NoXattr)));
            assert_eq!(ns.inode(a.ino).await.unwrap().xattrs.get(&b"user.k"[..]).map(|v| v.as_slice()), Some(&b"v"[..]));
            ns.remove_xattr(a.ino, b"user.k").await.unwrap();
            assert!(matches!(ns.remove_xattr(a.ino, b"user.k").await, Err(FsError::NoXattr)));
        });
    }
}
