//! The FUSE file system: kernel requests → [`Namespace`] transactions and [`FileData`] I/O.
//!
//! fuser calls us synchronously from its worker threads; each callback blocks on the mount's
//! tokio runtime (`Handle::block_on`), so several requests run at once, one per fuser thread.
//!
//! Caching and consistency (close-to-open, as NFS):
//! - `open` always re-reads the inode from the metadata store. If its data version moved
//!   since this mount last saw it, the kernel's page cache for the file is dropped (no
//!   `FOPEN_KEEP_CACHE`), so a reader sees everything a writer flushed before its close.
//! - Other attributes and name lookups are cached here for `meta_cache` (default 1 s): a
//!   change by another mount may be seen that late by `stat`, never by `open`+`read`.
//! - Writes are buffered per open file ([`WriteBack`]) and flushed on `flush` (every close),
//!   `fsync`, `release`, and when the buffer passes `write_back_bytes_max`. A flushed write is
//!   durable on every replica (the object store acknowledges only then).
//! - Permission checks are the kernel's (`default_permissions`).
//!
//! Unlinking a file open in this mount keeps its inode as an orphan until the last close.
//! Another mount holding it open loses it at unlink: its reads and flushes fail with `ESTALE`
//! (as on NFS) once it notices, within its `meta_cache` time; the unlinking mount punches the
//! data only [`PUNCH_GRACE`] later, so until then such reads still return the file's bytes,
//! never the zeros of a punched object.

use crate::file_data::{data_oid, DataStore, FileData};
use crate::fs_error::FsError;
use crate::meta_schema::{Inode, Kind};
use crate::meta_store::MetaStore;
use crate::namespace::{now_ns, Namespace, NewNode, Released, RenameMode, SetAttr, FILE_BYTES_MAX, OCLASS_XATTR};
use crate::read_cache::{ReadCache, CACHE_BLOCK_BYTES};
use crate::write_back::WriteBack;
use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use strata_types::Epoch;

/// Entries of one directory listing held for an open directory handle.
pub const DIR_LIST_ENTRIES_MAX: usize = 1 << 20;
const DIR_PAGE_ENTRIES: usize = 1024;
/// Read-ahead window of a sequential reader (a multiple of the cache block; well under the
/// cache so a window is not evicted before it is read): the bytes after the reader's position
/// that are kept on their way from the store, in [`READ_AHEAD_PIECE_BYTES`] pieces, each
/// replaced by the next one as soon as the reader reaches it.
pub const READ_AHEAD_BYTES: u64 = 16 << 20;
const _: () = assert!(READ_AHEAD_BYTES.is_multiple_of(CACHE_BLOCK_BYTES));
/// One background store read of the read-ahead (the default chunk: one engine round trip).
pub const READ_AHEAD_PIECE_BYTES: u64 = 1 << 20;
const _: () = assert!(READ_AHEAD_PIECE_BYTES.is_multiple_of(CACHE_BLOCK_BYTES));
/// Reads in a row that continue the previous one before the mount reads ahead: one
/// sequential-looking read among random ones must not start a window of store reads.
const SEQUENTIAL_RUN_MIN: u32 = 2;
/// How long a mount waits before punching the data of a file it deleted: longer than any
/// other mount's `meta_cache` (clamped to half of it), so a mount that still has the file open
/// notices the deletion (`ESTALE`) before its reads could return punched zeros.
pub const PUNCH_GRACE: Duration = Duration::from_secs(5);
/// Largest write the kernel sends in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct MountOptions {
    pub read_only: bool,
    pub allow_other: bool,
    /// How long attributes and names are trusted here without asking the metadata store.
    pub meta_cache: Duration,
    /// How long the kernel trusts entries and attributes without asking us.
    pub kernel_ttl: Duration,
    /// fuser worker threads (requests served at once).
    pub threads: usize,
    /// Dirty bytes buffered per open file before a flush.
    pub write_back_bytes_max: usize,
    pub fsname: String,
    /// Reported by statfs.
    pub capacity_bytes: u64,
    /// File data cached in the mount (0: none): blocks read, read ahead, and written here
    /// (default [`read_cache_bytes_default`]).
    pub read_cache_bytes: u64,
    /// The kernel's read-ahead window for the mount, KiB (0: the kernel's default, 128).
    pub read_ahead_kb: u32,
    /// Take directory leases (`dir_lease.rs`): creates, unlinks and attribute changes in a
    /// directory this mount alone uses are committed in batches off the syscall path.
    pub dir_leases: bool,
    /// The mount's own read-ahead window per sequential reader (a multiple of 64 KiB, at most
    /// a quarter of `read_cache_bytes`; default [`READ_AHEAD_BYTES`]).
    pub read_ahead_window: u64,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions { read_only: false, allow_other: false, meta_cache: Duration::from_secs(1), kernel_ttl: Duration::ZERO, threads: 4, write_back_bytes_max: 8 << 20, fsname: "strata".into(), capacity_bytes: 1 << 40, read_cache_bytes: read_cache_bytes_default(), read_ahead_kb: 4096, dir_leases: true, read_ahead_window: READ_AHEAD_BYTES }
    }
}

/// Largest default of [`MountOptions::read_cache_bytes`]: the default of a block export's clean
/// cache (`strata_block::read_cache`), so a file system and a block volume on the same client
/// keep as much of their data in memory.
pub const READ_CACHE_BYTES_DEFAULT_MAX: u64 = 1 << 30;

/// The mount's cache by default: [`READ_CACHE_BYTES_DEFAULT_MAX`], or an eighth of the
/// machine's memory where that is less (a small client must not give a mount half its memory).
pub fn read_cache_bytes_default() -> u64 {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let total = if pages > 0 && page > 0 { pages as u64 * page as u64 } else { 0 };
    let cap = if total > 0 { (total / 8).min(READ_CACHE_BYTES_DEFAULT_MAX) } else { 64 << 20 };
    cap / CACHE_BLOCK_BYTES * CACHE_BLOCK_BYTES
}

/// Dirty extents being written to the store in the background (a full write-back buffer).
struct Pending {
    extents: Arc<Vec<(u64, Bytes)>>,
    mtime_ns: i64,
    task: tokio::task::JoinHandle<Result<(), FsError>>,
}

/// Background buffer writes per open file: the writer fills the next buffer meanwhile.
const PENDING_FLUSHES_MAX: usize = 2;

struct OpenState {
    inode: Inode,
    wb: WriteBack,
    /// Older dirty extents on their way to the store; committed (size) at the next flush.
    pending: Vec<Pending>,
    /// The file's size as this mount sees it (store size, buffered writes, local truncates).
    size: u64,
    /// Data changed in the store (punches, truncates, written buffers) since the last commit
    /// of size and data version; `truncated`: the size must be committed exactly, not grown.
    meta_dirty: bool,
    truncated: bool,
    /// End of the furthest byte written and latest change time since the last commit.
    dirty_end: u64,
    dirty_mtime_ns: i64,
    /// Where the last read ended: a read starting near there (the kernel's read-ahead
    /// requests arrive on several threads, not always in order) continues a sequential run.
    read_end: u64,
    /// Reads in a row that continued the previous one.
    seq_run: u32,
    /// Read-ahead pieces on their way from the store, in file order.
    ahead: std::collections::VecDeque<ReadAhead>,
}

/// Blocks `[first, first + blocks)` of a file on their way from the store. Started only while
/// the file has no dirty bytes here and dropped by every change this mount makes to the file
/// (write, truncate, punch) and by an `open` that finds another mount's data, so what it
/// brings back is the file's current content when it is put in the cache.
struct ReadAhead {
    first: u64,
    blocks: u64,
    task: tokio::task::JoinHandle<Result<Vec<(u64, Bytes)>, FsError>>,
}

/// Cache blocks `first..` (`CACHE_BLOCK_BYTES` each, the last possibly shorter at the end of
/// the read) from a store read's pieces (file order, contiguous from `first`'s offset). A
/// block inside one piece is a slice of it (no copy); one spanning pieces (chunks smaller than
/// a block) is assembled.
fn blocks_of(pieces: Vec<(u64, Bytes)>) -> Vec<Bytes> {
    let b = CACHE_BLOCK_BYTES as usize;
    let mut out = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    for (_, mut d) in pieces {
        if !partial.is_empty() {
            let n = (b - partial.len()).min(d.len());
            partial.extend_from_slice(&d.split_to(n));
            if partial.len() == b {
                out.push(Bytes::from(std::mem::take(&mut partial)));
            }
        }
        while d.len() >= b {
            out.push(d.split_to(b));
        }
        if !d.is_empty() {
            partial.extend_from_slice(&d);
        }
    }
    if !partial.is_empty() {
        out.push(Bytes::from(partial));
    }
    out
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OpenState {
    /// Bytes written here that the store may not have yet.
    fn dirty(&self) -> bool {
        !self.wb.is_empty() || !self.pending.is_empty()
    }

    /// Dirty bytes over `out` (the file's bytes from `offset`): in-flight ones, then newer.
    fn overlay(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        for p in &self.pending {
            for (s, d) in p.extents.iter() {
                let e = s + d.len() as u64;
                let (lo, hi) = ((*s).max(offset), e.min(end));
                if lo < hi {
                    out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]);
                }
            }
        }
        self.wb.overlay(offset, out);
    }
}

struct OpenFile {
    opens: u32,
    /// Unlinked while open here: reclaimed at the last close.
    orphaned: bool,
    state: Arc<tokio::sync::Mutex<OpenState>>,
}

struct DirHandle {
    entries: Vec<(Vec<u8>, u64, Kind)>,
}

/// (parent ino, name) of a cached lookup.
type NameKey = (u64, Vec<u8>);

pub struct StrataFs<S: MetaStore, D: DataStore> {
    rt: tokio::runtime::Handle,
    ns: Arc<Namespace<S>>,
    data: FileData<D>,
    opts: MountOptions,
    attrs: Mutex<HashMap<u64, (Inode, Instant)>>,
    names: Mutex<HashMap<NameKey, (u64, Instant)>>,
    open: Mutex<HashMap<u64, OpenFile>>,
    handles: Mutex<HashMap<u64, u64>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    cache: ReadCache,
    /// Data version of each file when this mount last synchronised its page cache with it.
    seen_version: Mutex<HashMap<u64, u64>>,
    /// Data objects of deleted files waiting out [`PUNCH_GRACE`]; punched at once on unmount.
    punches: Arc<Mutex<Vec<strata_types::Oid>>>,
    /// Stops the directory-lease tick thread (unmount).
    lease_stop: Arc<std::sync::atomic::AtomicBool>,
    lease_thread: Option<std::thread::JoinHandle<()>>,
}

/// Punch `oid` (a deleted file's data) after [`PUNCH_GRACE`], unless unmount does it first.
fn punch_later<D: DataStore>(rt: &tokio::runtime::Handle, store: Arc<D>, punches: Arc<Mutex<Vec<strata_types::Oid>>>, oid: strata_types::Oid) {
    lock(&punches).push(oid);
    rt.spawn(async move {
        tokio::time::sleep(PUNCH_GRACE).await;
        let due = {
            let mut p = lock(&punches);
            p.iter().position(|o| *o == oid).map(|at| p.swap_remove(at)).is_some()
        };
        if due {
            if let Err(e) = store.punch_object(oid).await {
                tracing::warn!(?oid, error = %e, "could not punch a deleted file's data");
            }
        }
    });
}

/// The data object of a deleted inode, if it may have one.
fn freed_oid(i: &Inode, default_oclass: &str) -> Option<strata_types::Oid> {
    if i.kind != Kind::File || (i.data_version == 0 && i.size == 0) {
        return None;
    }
    let class = i.oclass.clone().unwrap_or_else(|| default_oclass.to_owned());
    match data_oid(i.ino, &class) {
        Ok(oid) => Some(oid),
        Err(e) => {
            tracing::warn!(ino = i.ino, error = %e, "deleted file has an unusable object class");
            None
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno(e: &FsError) -> Errno {
    if e.errno() == libc::EIO {
        tracing::warn!(error = %e, "file system request failed");
    }
    Errno::from_i32(e.errno())
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn ns_of_time_or_now(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ns(),
        TimeOrNow::SpecificTime(t) => ns_of(t),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

impl<S: MetaStore, D: DataStore> StrataFs<S, D> {
    pub fn new(rt: tokio::runtime::Handle, ns: Arc<Namespace<S>>, data: Arc<D>, mut opts: MountOptions) -> StrataFs<S, D> {
        let chunk = ns.chunk_bytes;
        opts.meta_cache = opts.meta_cache.min(PUNCH_GRACE / 2);
        opts.read_ahead_window = (opts.read_ahead_window / CACHE_BLOCK_BYTES * CACHE_BLOCK_BYTES).clamp(CACHE_BLOCK_BYTES, (opts.read_cache_bytes / 4).max(CACHE_BLOCK_BYTES));
        let cache = ReadCache::new(opts.read_cache_bytes);
        let punches: Arc<Mutex<Vec<strata_types::Oid>>> = Arc::default();
        let lease_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lease_thread = (opts.dir_leases && !opts.read_only)
            .then(|| {
                ns.enable_leases();
                let (ns, store, punches, stop, h) = (ns.clone(), data.clone(), punches.clone(), lease_stop.clone(), rt.clone());
                // A thread of its own: metadata transactions are not `Send` futures.
                std::thread::Builder::new()
                    .name("strata-fs-leases".into())
                    .spawn(move || {
                        h.block_on(async {
                            while !stop.load(Ordering::Relaxed) {
                                tokio::time::sleep(crate::dir_lease::LEASE_TICK).await;
                                for i in ns.lease_tick().await {
                                    if let Some(oid) = freed_oid(&i, &ns.default_oclass) {
                                        punch_later(&h, store.clone(), punches.clone(), oid);
                                    }
                                }
                            }
                        })
                    })
                    .map_err(|e| tracing::error!(error = %e, "could not start the directory lease thread; leases off"))
                    .ok()
            })
            .flatten();
        if lease_thread.is_none() {
            ns.disable_leases();
        }
        StrataFs {
            rt,
            ns,
            data: FileData::new(data, chunk),
            opts,
            attrs: Mutex::default(),
            names: Mutex::default(),
            open: Mutex::default(),
            handles: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            cache,
            seen_version: Mutex::default(),
            punches,
            lease_stop,
            lease_thread,
        }
    }

    /// Whether an open file still exists (`ESTALE` once another mount deleted it), asking the
    /// store at most once per `meta_cache`.
    async fn still_exists(&self, ino: u64) -> Result<(), FsError> {
        if lock(&self.attrs).get(&ino).is_some_and(|(_, t)| t.elapsed() < self.opts.meta_cache) {
            return Ok(());
        }
        match self.ns.inode(ino).await {
            Ok(i) => {
                self.remember(&i);
                Ok(())
            }
            Err(FsError::NotFound) => Err(FsError::Stale),
            Err(e) => Err(e),
        }
    }

    /// FUSE calls the root 1; the volume's root has its own number.
    fn ino_in(&self, i: INodeNo) -> u64 {
        if i.0 == 1 {
            self.ns.root
        } else {
            i.0
        }
    }

    fn ino_out(&self, ino: u64) -> INodeNo {
        INodeNo(if ino == self.ns.root { 1 } else { ino })
    }

    fn attr(&self, i: &Inode) -> FileAttr {
        let blksize = self.ns.chunk_bytes.min(1 << 20) as u32;
        FileAttr {
            ino: self.ino_out(i.ino),
            size: i.size,
            blocks: i.size.div_ceil(512),
            atime: time(i.atime_ns),
            mtime: time(i.mtime_ns),
            ctime: time(i.ctime_ns),
            crtime: time(i.crtime_ns),
            kind: file_type(i.kind),
            perm: i.perm,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize,
            flags: 0,
        }
    }

    fn remember(&self, i: &Inode) {
        lock(&self.attrs).insert(i.ino, (i.clone(), Instant::now()));
    }

    fn forget_ino(&self, ino: u64) {
        lock(&self.attrs).remove(&ino);
    }

    fn forget_name(&self, parent: u64, name: &[u8]) {
        lock(&self.names).remove(&(parent, name.to_vec()));
    }

    fn open_state(&self, ino: u64) -> Option<Arc<tokio::sync::Mutex<OpenState>>> {
        lock(&self.open).get(&ino).map(|o| o.state.clone())
    }

    fn is_open(&self, ino: u64) -> bool {
        lock(&self.open).contains_key(&ino)
    }

    fn mark_orphans(&self, rel: &Released) {
        for ino in &rel.touched {
            self.forget_ino(*ino);
        }
        let inos = &rel.orphaned;
        let mut open = lock(&self.open);
        for ino in inos {
            self.forget_ino(*ino);
            if let Some(o) = open.get_mut(ino) {
                o.orphaned = true;
            }
        }
    }

    /// The inode as this mount sees it: cached within `meta_cache`, with the size and mtime of
    /// buffered writes of an open file.
    async fn inode(&self, ino: u64, fresh: bool) -> Result<Inode, FsError> {
        let cached = if fresh { None } else { lock(&self.attrs).get(&ino).filter(|(_, t)| t.elapsed() < self.opts.meta_cache).map(|(i, _)| i.clone()) };
        let mut i = match cached {
            Some(i) => i,
            None => {
                let i = self.ns.inode(ino).await?;
                self.remember(&i);
                i
            }
        };
        if let Some(st) = self.open_state(ino) {
            let st = st.lock().await;
            i.size = st.size;
            let t = st.wb.mtime_ns.max(st.dirty_mtime_ns);
            if !st.wb.is_empty() || st.meta_dirty {
                i.mtime_ns = i.mtime_ns.max(t);
                i.ctime_ns = i.ctime_ns.max(t);
            }
        }
        Ok(i)
    }

    async fn lookup_name(&self, parent: u64, name: &[u8]) -> Result<Inode, FsError> {
        let key = (parent, name.to_vec());
        let hit = lock(&self.names).get(&key).filter(|(_, t)| t.elapsed() < self.opts.meta_cache).map(|(i, _)| *i);
        if let Some(ino) = hit {
            match self.inode(ino, false).await {
                Ok(i) => return Ok(i),
                Err(FsError::NotFound) => self.forget_name(parent, name),
                Err(e) => return Err(e),
            }
        }
        // The kernel only looks names up in directories: a missing dentry is ENOENT.
        let i = self.ns.lookup_known_dir(parent, name).await?;
        self.remember(&i);
        lock(&self.names).insert(key, (i.ino, Instant::now()));
        self.inode(i.ino, false).await
    }

    fn writable(&self) -> Result<(), FsError> {
        if self.opts.read_only {
            return Err(FsError::Perm("read-only mount"));
        }
        Ok(())
    }

    /// Write the buffered extents of an open file to its object, then record the new size.
    /// Start writing the buffer to the store in the background; wait for the oldest write
    /// when [`PENDING_FLUSHES_MAX`] are in flight.
    async fn flush_in_background(&self, st: &mut OpenState) -> Result<(), FsError> {
        let class = st.inode.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        let oid = data_oid(st.inode.ino, &class)?;
        let mtime_ns = st.wb.mtime_ns;
        let extents = Arc::new(st.wb.take());
        self.cache_written(st.inode.ino, &extents);
        let (data, ext) = (self.data.clone(), extents.clone());
        let task = self.rt.spawn(async move { data.write_extents(oid, &ext).await });
        st.pending.push(Pending { extents, mtime_ns, task });
        while st.pending.len() > PENDING_FLUSHES_MAX {
            let p = st.pending.remove(0);
            if let Err(e) = Self::join(p.task).await {
                // Keep the bytes (older than the buffer's): a later flush may succeed.
                let newer = st.wb.take();
                for (off, d) in p.extents.iter().chain(newer.iter()) {
                    st.wb.write(*off, d, p.mtime_ns);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Keep the whole cache blocks of extents leaving the write-back buffer (slices of them,
    /// no copy): a file read back after it was written, as a reader of what a writer just
    /// closed, is served from here instead of a store round trip (the store wrote them with
    /// `O_DIRECT`, so its first read of each would go to the disk). Called under the file's
    /// state lock, so a later write patches these blocks like any other cached ones; the
    /// bytes are the file's current content whether or not their store write succeeds (a
    /// failed one puts them back into the buffer).
    fn cache_written(&self, ino: u64, extents: &[(u64, Bytes)]) {
        if !self.cache.enabled() {
            return;
        }
        for (off, d) in extents {
            self.cache.put_run(ino, *off, d);
        }
    }

    async fn join(task: tokio::task::JoinHandle<Result<(), FsError>>) -> Result<(), FsError> {
        task.await.map_err(|e| FsError::Data(format!("write task: {e}")))?
    }

    /// Wait for every background write; on failure their bytes go back into the buffer.
    async fn drain_pending(&self, st: &mut OpenState) -> Result<(u64, i64), FsError> {
        let mut end = 0;
        let mut mtime = 0;
        let mut failed = None;
        let pending = std::mem::take(&mut st.pending);
        let newer = st.wb.take();
        for p in pending {
            let r = Self::join(p.task).await;
            end = p.extents.iter().map(|(o, d)| o + d.len() as u64).fold(end, u64::max);
            mtime = mtime.max(p.mtime_ns);
            if let Err(e) = r {
                for (off, d) in p.extents.iter() {
                    st.wb.write(*off, d, p.mtime_ns);
                }
                failed = Some(e);
            }
        }
        for (off, d) in newer {
            st.wb.write(off, &d, mtime);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((end, mtime)),
        }
    }

    /// Write every dirty byte to the store (no metadata commit).
    async fn flush_data(&self, st: &mut OpenState) -> Result<(), FsError> {
        if st.wb.is_empty() && st.pending.is_empty() {
            return Ok(());
        }
        self.still_exists(st.inode.ino).await?;
        let (pending_end, pending_mtime) = self.drain_pending(st).await?;
        let class = st.inode.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        let oid = data_oid(st.inode.ino, &class)?;
        let mtime = st.wb.mtime_ns.max(pending_mtime);
        let extents = st.wb.take();
        self.cache_written(st.inode.ino, &extents);
        let end = extents.iter().map(|(o, d)| o + d.len() as u64).fold(pending_end, u64::max);
        if let Err(e) = self.data.write_extents(oid, &extents).await {
            // Keep the bytes: a later flush may succeed.
            for (off, d) in extents {
                st.wb.write(off, &d, mtime);
            }
            return Err(e);
        }
        st.meta_dirty = true;
        st.dirty_end = st.dirty_end.max(end);
        st.dirty_mtime_ns = st.dirty_mtime_ns.max(mtime);
        Ok(())
    }

    /// Write dirty bytes, then commit size, mtime and data version in one transaction.
    async fn flush_state(&self, st: &mut OpenState) -> Result<(), FsError> {
        self.flush_data(st).await?;
        if !st.meta_dirty {
            return Ok(());
        }
        let exact = st.truncated.then_some(st.size);
        let (end, mtime) = (st.dirty_end.min(st.size), st.dirty_mtime_ns);
        let i = self.ns.commit_write(st.inode.ino, end, mtime, exact).await?;
        st.meta_dirty = false;
        st.truncated = false;
        st.dirty_end = 0;
        lock(&self.seen_version).insert(i.ino, i.data_version);
        self.remember(&i);
        st.size = st.size.max(i.size);
        st.inode = i;
        Ok(())
    }

    async fn flush_ino(&self, ino: u64) -> Result<(), FsError> {
        if let Some(st) = self.open_state(ino) {
            let mut st = st.lock().await;
            self.flush_state(&mut st).await?;
        }
        Ok(())
    }

    /// Punch the data of deleted files in the background, after [`PUNCH_GRACE`]: the inode is
    /// already gone, so nobody can reach the object except a mount that had it open (which
    /// notices within its `meta_cache`); a failure, or a mount killed meanwhile, leaves
    /// unreachable garbage (logged).
    async fn punch_freed(&self, freed: &[Inode]) {
        for i in freed {
            self.forget_ino(i.ino);
            self.cache.drop_file(i.ino);
            lock(&self.seen_version).remove(&i.ino);
            if let Some(oid) = freed_oid(i, &self.ns.default_oclass) {
                punch_later(&self.rt, self.data.store.clone(), self.punches.clone(), oid);
            }
        }
    }

    async fn do_setattr(&self, ino: u64, mut a: SetAttr) -> Result<Inode, FsError> {
        self.writable()?;
        if let Some(size) = a.size {
            if size > FILE_BYTES_MAX {
                return Err(FsError::TooBig(FILE_BYTES_MAX));
            }
            let state = self.open_state(ino);
            let mut guard = match &state {
                Some(s) => Some(s.lock().await),
                None => None,
            };
            let cur = match guard.as_ref() {
                Some(g) => g.inode.clone(),
                None => self.ns.inode(ino).await?,
            };
            if cur.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if cur.kind != Kind::File {
                return Err(FsError::Invalid("only regular files have a size to set".into()));
            }
            let class = cur.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
            let oid = data_oid(ino, &class)?;
            if let Some(g) = guard.as_mut() {
                g.ahead.clear();
                // A background write must not land after the punch below.
                self.drain_pending(g).await?;
            }
            let old = guard.as_ref().map_or(cur.size, |g| g.size.max(cur.size));
            if let Some(g) = guard.as_mut() {
                g.wb.truncate(size);
            }
            self.data.truncate(oid, size, old).await?;
            self.cache.drop_range(ino, size, u64::MAX);
            let now = now_ns();
            if let Some(g) = guard.as_mut() {
                if a.perm.is_none() && a.uid.is_none() && a.gid.is_none() && a.atime_ns.is_none() && a.mtime_ns.is_none() {
                    // An open file: the new size is committed with its next flush (close,
                    // fsync), like its writes.
                    g.size = size;
                    g.meta_dirty = true;
                    g.truncated = true;
                    g.dirty_mtime_ns = g.dirty_mtime_ns.max(now);
                    drop(guard);
                    return self.inode(ino, false).await;
                }
            }
            a.mtime_ns = a.mtime_ns.or(Some(now));
            let i = self.ns.setattr(ino, &a).await?;
            if let Some(g) = guard.as_mut() {
                g.size = size;
                g.inode = i.clone();
            }
            lock(&self.seen_version).insert(ino, i.data_version);
            self.remember(&i);
            return Ok(i);
        }
        let state = if a.mtime_ns.is_some() { self.open_state(ino) } else { None };
        let mut guard = match &state {
            Some(s) => Some(s.lock().await),
            None => None,
        };
        if let Some(g) = guard.as_mut() {
            // Explicit times (tar, cp -p: futimens after writing) must win over the writes
            // before them: commit those first, under the lock that orders them.
            self.flush_state(g).await?;
        }
        let i = self.ns.setattr(ino, &a).await?;
        if let Some(g) = guard.as_mut() {
            g.inode = i.clone();
        }
        self.remember(&i);
        Ok(i)
    }

    async fn make(&self, req: &Request, parent: u64, name: &OsStr, node: NewNode) -> Result<Inode, FsError> {
        self.writable()?;
        let _ = req;
        let i = self.ns.create(parent, name.as_bytes(), node).await?;
        self.forget_ino(parent);
        self.remember(&i);
        lock(&self.names).insert((parent, name.as_bytes().to_vec()), (i.ino, Instant::now()));
        Ok(i)
    }

    /// `created`: the inode this mount just created (already current).
    async fn open_file(&self, ino: u64, created: Option<Inode>) -> Result<(u64, FopenFlags), FsError> {
        // Close-to-open: always the store's current inode, never the cache.
        let fresh = match created {
            Some(i) => i,
            None => self.ns.inode(ino).await?,
        };
        self.remember(&fresh);
        if fresh.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let keep = {
            let mut seen = lock(&self.seen_version);
            let same = seen.get(&ino) == Some(&fresh.data_version);
            seen.insert(ino, fresh.data_version);
            same
        };
        if !keep {
            self.cache.drop_file(ino);
        }
        let state = {
            let mut open = lock(&self.open);
            let e = open.entry(ino).or_insert_with(|| OpenFile { opens: 0, orphaned: false, state: Arc::new(tokio::sync::Mutex::new(OpenState { size: fresh.size, inode: fresh.clone(), wb: WriteBack::with_append_reserve(self.opts.write_back_bytes_max), pending: Vec::new(), meta_dirty: false, truncated: false, dirty_end: 0, dirty_mtime_ns: 0, read_end: 0, seq_run: 0, ahead: Default::default() })) });
            e.opens += 1;
            e.state.clone()
        };
        {
            let mut st = state.lock().await;
            if st.wb.is_empty() {
                st.size = fresh.size;
            }
            st.inode = fresh.clone();
            if !keep {
                st.ahead.clear();
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, ino);
        Ok((fh, if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() }))
    }

    async fn release_file(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        lock(&self.handles).remove(&fh);
        let flushed = self.flush_ino(ino).await;
        let orphan_closed = {
            let mut open = lock(&self.open);
            match open.get_mut(&ino) {
                Some(o) if o.opens > 1 => {
                    o.opens -= 1;
                    false
                }
                Some(_) => open.remove(&ino).is_some_and(|o| o.orphaned),
                None => false,
            }
        };
        if orphan_closed {
            // The last close of a file unlinked while open reclaims it.
            if let Some(i) = self.ns.reclaim_orphan(ino).await? {
                self.punch_freed(&[i]).await;
            }
        }
        flushed
    }

    async fn read_file(&self, ino: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let Some(state) = self.open_state(ino) else {
            // Reads without an open (kernel readahead after release): plain store read.
            let i = self.ns.inode(ino).await?;
            return self.read_at(&i, i.size, offset, size, Epoch::MAX).await.map(Bytes::from);
        };
        let mut st = state.lock().await;
        self.still_exists(ino).await?;
        if !self.cache.enabled() {
            let mut out = self.read_at(&st.inode, st.size, offset, size, Epoch::MAX).await?;
            st.overlay(offset, &mut out);
            return Ok(Bytes::from(out));
        }
        // Near where the last read ended: the kernel's read-ahead requests of one sequential
        // reader are served by several threads and may take the lock out of order.
        let slack = (u64::from(self.opts.read_ahead_kb) << 10).max(2 * u64::from(MAX_WRITE_BYTES));
        let continues = offset <= st.read_end.saturating_add(slack) && offset.saturating_add(slack) >= st.read_end;
        st.seq_run = if continues { st.seq_run.saturating_add(1) } else { 0 };
        let sequential = st.seq_run >= SEQUENTIAL_RUN_MIN;
        let out = self.read_cached(&mut st, offset, size, sequential).await?;
        let end = offset + out.len() as u64;
        st.read_end = if continues { st.read_end.max(end) } else { end };
        Ok(out)
    }

    /// Read through the block cache: cached blocks are copied, each run of missing blocks is
    /// one store read, completed with this mount's dirty bytes before it is cached.
    /// `sequential`: the reader continues a sequential run; then [`READ_AHEAD_BYTES`] after
    /// the request are kept on their way from the store in the background ([`ReadAhead`]
    /// pieces, topped up at every read), so a sequential reader finds its next blocks cached
    /// or arriving instead of paying a store round trip per kernel request.
    async fn read_cached(&self, st: &mut OpenState, offset: u64, size: u32, sequential: bool) -> Result<Bytes, FsError> {
        if offset >= st.size || size == 0 {
            return Ok(Bytes::new());
        }
        let len = u64::from(size).min(st.size - offset);
        let ino = st.inode.ino;
        let class = st.inode.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        let oid = data_oid(ino, &class)?;
        let last = (offset + len - 1) / CACHE_BLOCK_BYTES;
        let out = match self.cache.get_span(ino, offset, len) {
            Some(d) => d,
            None => self.read_blocks(st, oid, offset, len).await?,
        };
        // No overlay needed for hits: writes patch cached blocks under the same state lock.
        if sequential && !st.dirty() {
            self.top_up_read_ahead(st, oid, last + 1);
        } else if !sequential {
            // A random reader: what was fetched ahead for an earlier run is not needed.
            st.ahead.clear();
        }
        Ok(out)
    }

    /// [`StrataFs::read_cached`] when the request is not one slice of a cached run: its
    /// blocks from the cache, the read-ahead, or the store.
    async fn read_blocks(&self, st: &mut OpenState, oid: strata_types::Oid, offset: u64, len: u64) -> Result<Bytes, FsError> {
        let ino = st.inode.ino;
        let b = CACHE_BLOCK_BYTES;
        let first = offset / b;
        let last = (offset + len - 1) / b;
        let mut blocks: Vec<Option<Bytes>> = (first..=last).map(|k| self.cache.get(ino, k)).collect();
        // Store reads this request waited for, clean: one that holds the whole request is
        // the reply as it is (no copy; the usual case of a sequential reader, whose requests
        // match the read-ahead pieces).
        let mut fetched: Vec<(u64, Bytes)> = Vec::new();
        self.collect_read_ahead(st, first, last, &mut blocks, &mut fetched).await;
        let mut k = 0;
        while k < blocks.len() {
            if blocks[k].is_some() {
                k += 1;
                continue;
            }
            let start = k;
            while k < blocks.len() && blocks[k].is_none() {
                k += 1;
            }
            let run_off = (first + start as u64) * b;
            let pieces = self.data.read_pieces(oid, run_off, (k - start) as u64 * b, Epoch::MAX).await?;
            if !st.dirty() {
                fetched.extend(pieces.iter().cloned());
                for (j, v) in self.cache_clean(ino, pieces).into_iter().enumerate() {
                    blocks[start + j] = Some(v);
                }
                continue;
            }
            for (j, v) in blocks_of(pieces).into_iter().enumerate() {
                let mut own = Vec::from(v);
                st.overlay((first + (start + j) as u64) * b, &mut own);
                let v = Bytes::from(own);
                self.cache.put(ino, first + (start + j) as u64, v.clone());
                blocks[start + j] = Some(v);
            }
        }
        let whole = fetched.iter().find(|(o, d)| *o <= offset && offset + len <= o + d.len() as u64).map(|(o, d)| d.slice((offset - o) as usize..(offset - o + len) as usize));
        Ok(match whole {
            Some(d) => d,
            None => Bytes::from(Self::assemble(&blocks, first, offset, len, ino)?),
        })
    }

    /// Cache the blocks of a store read of the file's current bytes (`pieces` in file order,
    /// contiguous, starting on a block) and return them. Pieces of whole blocks are cached as
    /// runs, so a later read inside one is a slice of it ([`ReadCache::get_span`]).
    fn cache_clean(&self, ino: u64, pieces: Vec<(u64, Bytes)>) -> Vec<Bytes> {
        let b = CACHE_BLOCK_BYTES;
        let Some(first) = pieces.first().map(|(o, _)| o / b) else { return Vec::new() };
        if pieces.iter().all(|(o, d)| o.is_multiple_of(b) && (d.len() as u64).is_multiple_of(b)) {
            for (o, d) in &pieces {
                self.cache.put_run(ino, *o, d);
            }
            return blocks_of(pieces);
        }
        let blocks = blocks_of(pieces);
        for (j, v) in blocks.iter().enumerate() {
            self.cache.put(ino, first + j as u64, v.clone());
        }
        blocks
    }

    /// The bytes `[offset, offset + len)` out of blocks `first..` (all present).
    fn assemble(blocks: &[Option<Bytes>], first: u64, offset: u64, len: u64, ino: u64) -> Result<Vec<u8>, FsError> {
        let b = CACHE_BLOCK_BYTES;
        let mut out = Vec::with_capacity(len as usize);
        for (j, blk) in blocks.iter().enumerate() {
            let bs = (first + j as u64) * b;
            let (lo, hi) = (offset.max(bs), (offset + len).min(bs + b));
            match blk {
                Some(blk) => out.extend_from_slice(&blk[(lo - bs) as usize..(hi - bs) as usize]),
                None => return Err(FsError::Data(format!("block {} of inode {ino} missing after its read", first + j as u64))),
            }
        }
        Ok(out)
    }

    /// Move the read-ahead pieces that reached blocks `first..=last` (or that the reader has
    /// passed) into the cache, waiting for those this read needs and does not have; pieces
    /// behind the reader that are not there yet are abandoned. Pieces after `last` stay on
    /// their way.
    async fn collect_read_ahead(&self, st: &mut OpenState, first: u64, last: u64, blocks: &mut [Option<Bytes>], fetched: &mut Vec<(u64, Bytes)>) {
        let ino = st.inode.ino;
        while st.ahead.front().is_some_and(|a| a.first <= last) {
            let Some(mut a) = st.ahead.pop_front() else { break };
            let range = a.first..a.first + a.blocks;
            let needed = (first..=last).any(|k| range.contains(&k) && blocks[(k - first) as usize].is_none());
            if !needed && !a.task.is_finished() {
                if range.end > last + 1 {
                    // Still ahead of the reader in part: keep waiting in the background.
                    st.ahead.push_front(a);
                    break;
                }
                continue;
            }
            // A failed piece is not fatal: its blocks are read again below.
            let Ok(Ok(pieces)) = (&mut a.task).await else { continue };
            fetched.extend(pieces.iter().cloned());
            for (j, v) in self.cache_clean(ino, pieces).into_iter().enumerate() {
                let k = a.first + j as u64;
                if (first..=last).contains(&k) {
                    blocks[(k - first) as usize] = Some(v);
                }
            }
        }
    }

    /// Keep the [`READ_AHEAD_BYTES`] after block `next` on their way from the store: start the
    /// pieces not yet cached or requested. Pieces are aligned to [`READ_AHEAD_PIECE_BYTES`] so
    /// that each is one chunk read (with the default chunk).
    fn top_up_read_ahead(&self, st: &mut OpenState, oid: strata_types::Oid, next: u64) {
        let b = CACHE_BLOCK_BYTES;
        let piece = READ_AHEAD_PIECE_BYTES / b;
        let ino = st.inode.ino;
        let end_block = st.size.div_ceil(b);
        let horizon = (next + self.opts.read_ahead_window / b).min(end_block);
        // Pieces outside the window were started for an earlier position of the reader.
        st.ahead.retain(|a| a.first + a.blocks > next && a.first < horizon);
        let mut from = st.ahead.back().map_or(next, |a| a.first + a.blocks).max(next);
        while from < horizon {
            let to = ((from / piece + 1) * piece).min(end_block);
            while from < to && self.cache.get(ino, from).is_some() {
                from += 1;
            }
            if from < to {
                let data = self.data.clone();
                let (off, bytes) = (from * b, (to - from) * b);
                let task = self.rt.spawn(async move { data.read_pieces(oid, off, bytes, Epoch::MAX).await });
                st.ahead.push_back(ReadAhead { first: from, blocks: to - from, task });
            }
            from = to;
        }
    }

    async fn read_at(&self, i: &Inode, file_size: u64, offset: u64, size: u32, epoch: Epoch) -> Result<Vec<u8>, FsError> {
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(file_size - offset);
        let class = i.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        self.data.read(data_oid(i.ino, &class)?, offset, len, epoch).await
    }

    async fn write_file(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        self.writable()?;
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > FILE_BYTES_MAX) {
            return Err(FsError::TooBig(FILE_BYTES_MAX));
        }
        let state = match self.open_state(ino) {
            Some(s) => s,
            None => return Err(FsError::Invalid("write to a file that is not open".into())),
        };
        let mut st = state.lock().await;
        st.ahead.clear();
        st.wb.write(offset, data, now_ns());
        self.cache.patch(ino, offset, data);
        st.size = st.size.max(offset + data.len() as u64);
        if st.wb.bytes() >= self.opts.write_back_bytes_max {
            self.flush_in_background(&mut st).await?;
        }
        Ok(data.len() as u32)
    }

    async fn list_dir(&self, ino: u64) -> Result<DirHandle, FsError> {
        let dir = self.inode(ino, false).await?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let mut entries = vec![(b".".to_vec(), ino, Kind::Dir), (b"..".to_vec(), dir.parent, Kind::Dir)];
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.ns.readdir(ino, after.as_deref(), DIR_PAGE_ENTRIES).await?;
            let n = page.len();
            for (name, d) in page {
                entries.push((name.clone(), d.ino, d.kind));
                after = Some(name);
            }
            if n < DIR_PAGE_ENTRIES {
                break;
            }
            if entries.len() > DIR_LIST_ENTRIES_MAX {
                return Err(FsError::Invalid(format!("directory has more than {DIR_LIST_ENTRIES_MAX} entries")));
            }
        }
        Ok(DirHandle { entries })
    }

    fn dir_handle(&self, fh: u64, ino: u64) -> Result<Arc<DirHandle>, FsError> {
        if let Some(d) = lock(&self.dirs).get(&fh) {
            return Ok(d.clone());
        }
        // No opendir state (should not happen): list now.
        Ok(Arc::new(self.rt.block_on(self.list_dir(ino))?))
    }

    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl<S: MetaStore, D: DataStore> Filesystem for StrataFs<S, D> {
    fn destroy(&mut self) {
        // Commit what the directory leases hold, and give them back.
        self.lease_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.lease_thread.take() {
            let _ = t.join();
        }
        for i in self.rt.block_on(self.ns.release_leases()) {
            if let Some(oid) = freed_oid(&i, &self.ns.default_oclass) {
                lock(&self.punches).push(oid);
            }
        }
        // Deleted files' data still waiting out the grace: nobody will read it any more.
        let oids = std::mem::take(&mut *lock(&self.punches));
        let store = self.data.store.clone();
        self.rt.block_on(async {
            for oid in oids {
                if let Err(e) = store.punch_object(oid).await {
                    tracing::warn!(?oid, error = %e, "could not punch a deleted file's data at unmount");
                }
            }
        });
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        let _ = config.set_max_readahead(MAX_WRITE_BYTES);
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO | InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = self.ino_in(parent);
        match self.block(self.lookup_name(parent, name.as_bytes())) {
            Ok(i) => reply.entry(&self.opts.kernel_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = self.ino_in(ino);
        match self.block(self.inode(ino, false)) {
            Ok(i) => reply.attr(&self.opts.kernel_ttl, &self.attr(&i)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = self.ino_in(ino);
        let a = SetAttr { perm: mode.map(|m| (m & 0o7777) as u16), uid, gid, size, atime_ns: atime.map(ns_of_time_or_now), mtime_ns: mtime.map(ns_of_time_or_now), ctime_ns: ctime.map(ns_of) };
        let r = self.block(async {
            self.do_setattr(ino, a).await?;
            self.inode(ino, false).await
        });
        match r {
            Ok(i) => reply.attr(&self.opts.kernel_ttl, &self.attr(&i)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = self.ino_in(ino);
        match self.block(self.inode(ino, false)) {
            Ok(i) => match &i.symlink {
                Some(t) => reply.data(t),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let parent = self.ino_in(parent);
        let Some(kind) = Kind::from_mode(mode) else { return reply.error(Errno::EINVAL) };
        if kind == Kind::Dir || kind == Kind::Symlink {
            return reply.error(Errno::EINVAL);
        }
        let node = NewNode { kind, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev, symlink: None };
        match self.block(self.make(req, parent, name, node)) {
            Ok(i) => reply.entry(&self.opts.kernel_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let parent = self.ino_in(parent);
        let node = NewNode { kind: Kind::Dir, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev: 0, symlink: None };
        match self.block(self.make(req, parent, name, node)) {
            Ok(i) => reply.entry(&self.opts.kernel_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = self.ino_in(parent);
        let r = self.block(async {
            self.writable()?;
            let rel = self.ns.unlink(parent, name.as_bytes(), |i| self.is_open(i)).await?;
            self.forget_name(parent, name.as_bytes());
            self.forget_ino(parent);
            self.mark_orphans(&rel);
            self.punch_freed(&rel.freed).await;
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = self.ino_in(parent);
        let r = self.block(async {
            self.writable()?;
            self.ns.rmdir(parent, name.as_bytes()).await?;
            self.forget_name(parent, name.as_bytes());
            self.forget_ino(parent);
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let parent = self.ino_in(parent);
        let node = NewNode { kind: Kind::Symlink, perm: 0o777, uid: req.uid(), gid: req.gid(), rdev: 0, symlink: Some(target.as_os_str().as_bytes().to_vec()) };
        match self.block(self.make(req, parent, link_name, node)) {
            Ok(i) => reply.entry(&self.opts.kernel_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let (parent, newparent) = (self.ino_in(parent), self.ino_in(newparent));
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let mode = RenameMode { noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE), exchange: flags.contains(RenameFlags::RENAME_EXCHANGE) };
        let r = self.block(async {
            self.writable()?;
            let rel = self.ns.rename(parent, name.as_bytes(), newparent, newname.as_bytes(), mode, |i| self.is_open(i)).await?;
            self.forget_name(parent, name.as_bytes());
            self.forget_name(newparent, newname.as_bytes());
            self.forget_ino(parent);
            self.forget_ino(newparent);
            self.mark_orphans(&rel);
            // The moved inode's ctime (and a directory's parent) changed.
            lock(&self.attrs).clear();
            self.punch_freed(&rel.freed).await;
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (ino, newparent) = (self.ino_in(ino), self.ino_in(newparent));
        let r = self.block(async {
            self.writable()?;
            let i = self.ns.link(ino, newparent, newname.as_bytes()).await?;
            self.forget_ino(newparent);
            self.remember(&i);
            self.inode(ino, false).await
        });
        match r {
            Ok(i) => reply.entry(&self.opts.kernel_ttl, &self.attr(&i), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.ino_in(ino);
        if self.opts.read_only && flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.block(self.open_file(ino, None)) {
            Ok((fh, f)) => reply.opened(FileHandle(fh), f),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyData) {
        let ino = self.ino_in(ino);
        match self.block(self.read_file(ino, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, data: &[u8], _write_flags: WriteFlags, _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyWrite) {
        let ino = self.ino_in(ino);
        match self.block(self.write_file(ino, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        match self.block(self.flush_ino(ino)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock_owner: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        match self.block(self.release_file(ino, fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        // The data, its size, and the file's name if its directory's lease still holds it.
        match self.block(async {
            self.flush_ino(ino).await?;
            self.ns.sync_leased(ino).await
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.ino_in(ino);
        match self.block(self.list_dir(ino)) {
            Ok(d) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(d));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let ino = self.ino_in(ino);
        let d = match self.dir_handle(fh.0, ino) {
            Ok(d) => d,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (name, child, kind)) in d.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(self.ino_out(*child), (i + 1) as u64, file_type(*kind), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let ino = self.ino_in(ino);
        let d = match self.dir_handle(fh.0, ino) {
            Ok(d) => d,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (name, child, _)) in d.entries.iter().enumerate().skip(offset as usize) {
            let attr = match self.block(self.inode(*child, false)) {
                Ok(a) => a,
                // Removed since the listing: leave it out.
                Err(FsError::NotFound) => continue,
                Err(e) => return reply.error(errno(&e)),
            };
            if reply.add(self.ino_out(*child), (i + 1) as u64, OsStr::from_bytes(name), &self.opts.kernel_ttl, &self.attr(&attr), Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Changes under the directory's lease are committed now; all others already were.
        let ino = self.ino_in(ino);
        match self.block(self.ns.sync_leased(ino)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = 4096u64;
        let blocks = self.opts.capacity_bytes / bsize;
        reply.statfs(blocks, blocks, blocks, u64::from(u32::MAX), u64::from(u32::MAX), bsize as u32, crate::meta_schema::NAME_BYTES_MAX as u32, bsize as u32);
    }

    fn setxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        let r = self.block(async {
            self.writable()?;
            self.ns.set_xattr(ino, name.as_bytes(), value, flags & libc::XATTR_CREATE != 0, flags & libc::XATTR_REPLACE != 0).await?;
            self.forget_ino(ino);
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = self.ino_in(ino);
        match self.block(self.inode(ino, false)) {
            Ok(i) if name.as_bytes() == OCLASS_XATTR && matches!(i.kind, Kind::File | Kind::Dir) => {
                let class = i.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
                xattr_reply(reply, class.as_bytes(), size)
            }
            Ok(i) => match i.xattrs.get(name.as_bytes()) {
                Some(v) => xattr_reply(reply, v, size),
                None => reply.error(Errno::from_i32(libc::ENODATA)),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = self.ino_in(ino);
        match self.block(self.inode(ino, false)) {
            Ok(i) => {
                let mut names = Vec::new();
                for k in i.xattrs.keys() {
                    names.extend_from_slice(k);
                    names.push(0);
                }
                xattr_reply(reply, &names, size);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        let r = self.block(async {
            self.writable()?;
            self.ns.remove_xattr(ino, name.as_bytes()).await?;
            self.forget_ino(ino);
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        let i = match self.block(self.inode(ino, false)) {
            Ok(i) => i,
            Err(e) => return reply.error(errno(&e)),
        };
        if mask == AccessFlags::F_OK {
            return reply.ok();
        }
        if mask.contains(AccessFlags::W_OK) && self.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        let want = mask.bits() as u16 & 0o7;
        let granted = if req.uid() == 0 {
            // Root may do anything but execute a file nobody may execute.
            if want & 1 != 0 && i.kind != Kind::Dir && i.perm & 0o111 == 0 {
                0o6
            } else {
                0o7
            }
        } else if req.uid() == i.uid {
            (i.perm >> 6) & 7
        } else if req.gid() == i.gid {
            (i.perm >> 3) & 7
        } else {
            i.perm & 7
        };
        if want & !granted == 0 {
            reply.ok()
        } else {
            reply.error(Errno::EACCES)
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let parent = self.ino_in(parent);
        let node = NewNode { kind: Kind::File, perm: (mode & !umask & 0o7777) as u16, uid: req.uid(), gid: req.gid(), rdev: 0, symlink: None };
        let r = self.block(async {
            let i = self.make(req, parent, name, node).await?;
            let _ = flags;
            let (fh, f) = self.open_file(i.ino, Some(i.clone())).await?;
            Ok::<_, FsError>((i, fh, f))
        });
        match r {
            Ok((i, fh, f)) => reply.created(&self.opts.kernel_ttl, &self.attr(&i), Generation(0), FileHandle(fh), f),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let ino = self.ino_in(ino);
        let r = self.block(async {
            self.writable()?;
            let end = offset.checked_add(length).filter(|e| *e <= FILE_BYTES_MAX).ok_or(FsError::TooBig(FILE_BYTES_MAX))?;
            let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
            let punch = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
            if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                return Err(FsError::Invalid("unsupported fallocate mode".into()));
            }
            if let Some(st) = self.open_state(ino) {
                // An open file: punch now, commit size and data version at its next flush.
                let mut st = st.lock().await;
                st.ahead.clear();
                if punch {
                    let class = st.inode.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
                    let hole_end = end.min(st.size);
                    if offset < hole_end {
                        // Buffered bytes in the hole are dropped rather than written first;
                        // those outside it are written later, over ranges the punch does not
                        // touch. A background write must land before the punch.
                        self.still_exists(ino).await?;
                        let (pending_end, _) = self.drain_pending(&mut st).await?;
                        // The size they reached must still be committed (as zeros).
                        st.dirty_end = st.dirty_end.max(pending_end).max(st.wb.end());
                        st.wb.punch(offset, hole_end - offset);
                        self.data.punch_hole(data_oid(ino, &class)?, offset, hole_end - offset).await?;
                        self.cache.zero_range(ino, offset, hole_end - offset);
                    }
                }
                if !keep_size && end > st.size {
                    st.size = end;
                    st.truncated = true;
                }
                st.meta_dirty = true;
                st.dirty_mtime_ns = st.dirty_mtime_ns.max(now_ns());
                return Ok(());
            }
            let cur = self.inode(ino, true).await?;
            if punch {
                let class = cur.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
                let hole_end = end.min(cur.size);
                if offset < hole_end {
                    self.data.punch_hole(data_oid(ino, &class)?, offset, hole_end - offset).await?;
                    self.cache.drop_range(ino, offset, hole_end - offset);
                    self.ns.commit_write(ino, 0, now_ns(), None).await?;
                }
            }
            // Space is never reserved (objects are sparse); extending the size is what shows.
            if !keep_size && end > cur.size {
                self.do_setattr(ino, SetAttr { size: Some(end), ..Default::default() }).await?;
            }
            if let Some(st) = self.open_state(ino) {
                let mut st = st.lock().await;
                if !keep_size {
                    st.size = st.size.max(end);
                }
                if let Ok(i) = self.ns.inode(ino).await {
                    lock(&self.seen_version).insert(ino, i.data_version);
                    st.inode = i;
                }
            }
            self.forget_ino(ino);
            Ok::<_, FsError>(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Mount `fs` on `mountpoint` and serve until unmounted. `on_mounted` runs once the kernel
/// accepted the mount (daemons report readiness there).
pub fn serve<S: MetaStore, D: DataStore>(fs: StrataFs<S, D>, mountpoint: &Path, on_mounted: impl FnOnce(fuser::SessionUnmounter)) -> std::io::Result<()> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![fuser::MountOption::FSName(fs.opts.fsname.clone()), fuser::MountOption::Subtype("strata".into()), fuser::MountOption::DefaultPermissions];
    if fs.opts.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    if fs.opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(fs.opts.threads.max(1));
    config.clone_fd = fs.opts.threads > 1;
    let read_ahead_kb = fs.opts.read_ahead_kb;
    let mut session = fuser::Session::new(fs, mountpoint, &config)?;
    if read_ahead_kb > 0 {
        if let Err(e) = set_read_ahead(mountpoint, read_ahead_kb) {
            tracing::info!(error = %e, "kernel read-ahead of the mount left at its default");
        }
    }
    on_mounted(session.unmount_callable());
    session.run()
}

/// Raise the kernel's read-ahead for the mount (its backing device info). FUSE's INIT reply
/// cannot raise it above the kernel's default (128 KiB), which caps sequential reads at one
/// 128 KiB request per round trip to the mount; with a larger window the kernel sends 1 MiB
/// requests (`MAX_WRITE_BYTES` sizes the request pages). Needs root; the device is found in
/// mountinfo (not by `stat`, which would ask this not yet serving mount).
pub fn set_read_ahead(mountpoint: &Path, kb: u32) -> std::io::Result<()> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let mp = mp.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    // The newest mount on that path is listed last.
    let dev = info.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&mp.as_str())).then(|| f.get(2).map(|d| d.to_string())).flatten()
    }).next_back();
    let dev = dev.ok_or_else(|| std::io::Error::other(format!("{mp} not in /proc/self/mountinfo")))?;
    std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), kb.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_of_slices_whole_pieces_and_assembles_small_chunks() {
        let b = CACHE_BLOCK_BYTES as usize;
        let file: Vec<u8> = (0..4 * b).map(|i| (i % 251) as u8).collect();
        // One 2-block piece: slices of it, no copy.
        let piece = Bytes::copy_from_slice(&file[..2 * b]);
        let out = blocks_of(vec![(0, piece.clone())]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ptr(), piece.as_ptr(), "a block inside one piece is a slice of it");
        assert_eq!(&out[1][..], &file[b..2 * b]);
        // 4 KiB chunks (a volume with small chunks): blocks assembled across pieces.
        let small: Vec<(u64, Bytes)> = file.chunks(4096).enumerate().map(|(i, c)| ((i * 4096) as u64, Bytes::copy_from_slice(c))).collect();
        let out = blocks_of(small);
        assert_eq!(out.len(), 4);
        for (k, blk) in out.iter().enumerate() {
            assert_eq!(&blk[..], &file[k * b..(k + 1) * b], "block {k}");
        }
    }
}
