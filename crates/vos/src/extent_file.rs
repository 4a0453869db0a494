//! Append-only extent files: array extents of at least `EXTENT_FILE_MIN_BYTES` are written once,
//! into the target's current extent file, and only a reference (file, offset, crc32c of the
//! bytes) goes into the record index. Inline in the LSM they would be written twice (journal,
//! then blob file) and copied more.
//!
//! Layout: `DIR/extents/NNNNNNNN.ext`, raw bytes, each extent at a 4 KiB-aligned offset (so a
//! dead extent's blocks can be freed with a hole punch). A file grows to `EXTENT_FILE_BYTES_MAX`,
//! then the next id starts. The reference, in a record of kind `ValueRef`:
//! `file(4, LE) | offset(8, LE) | crc32c of the bytes(4, LE)` (its length is the record's `len`).
//!
//! Durability: callers write the bytes (`append`, in parallel, each at its own reserved offset),
//! submit the batch with its index rows and a pending-extent row per extent, then `fdatasync`
//! the extent files while the commit lanes sync the journal; the batch is acknowledged when
//! both are durable (two syncs at once instead of one after the other: on this path each sync
//! is several disk round trips). A crash between the two can leave an index row without its
//! bytes: at open, every extent still named by a pending-extent row is checked against its
//! crc32c and its row dropped if the bytes are not all there (`Vos` open). Such a write was
//! never acknowledged; damage to an acknowledged extent is still reported as corruption.
//!
//! Reclaim: when aggregation, or a container's destruction, has durably deleted an index row,
//! the extent's blocks are freed with `fallocate(PUNCH_HOLE)`. Not reclaimed: bytes orphaned by
//! a crash between the extent sync and the index sync, or by a batch refused after its extents
//! were written (there is no scan for unreferenced ranges yet).

use crate::error::VosError;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Extents at least this long go to extent files; smaller ones stay inline in the index.
pub const EXTENT_FILE_MIN_BYTES: usize = 64 << 10;
/// One extent file grows to at most this many bytes before the next one starts.
pub const EXTENT_FILE_BYTES_MAX: u64 = 1 << 30;
/// Extents start at multiples of this, so freeing one frees whole file-system blocks.
pub const EXTENT_ALIGN_BYTES: u64 = 4096;
pub const REF_BYTES: usize = 16;
/// Files appended to at once: concurrent writers to one file serialize on its inode lock.
pub const EXTENT_LANES: usize = 4;
/// A lane's file is preallocated this far ahead of its appends, so that direct writes overwrite
/// allocated blocks instead of extending the file (which the file system serializes).
pub const EXTENT_PREALLOC_BYTES: u64 = 16 << 20;
/// ... but at most this fraction of the file system's free space.
const PREALLOC_FREE_SHARE: u64 = 64;
const DIR: &str = "extents";

const _: () = assert!(EXTENT_FILE_BYTES_MAX >= crate::EXTENT_BYTES_MAX + EXTENT_ALIGN_BYTES);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentRef {
    pub file: u32,
    pub offset: u64,
    pub crc: u32,
}

impl ExtentRef {
    pub fn encode(&self) -> [u8; REF_BYTES] {
        let mut b = [0u8; REF_BYTES];
        b[..4].copy_from_slice(&self.file.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<ExtentRef> {
        if b.len() != REF_BYTES {
            return None;
        }
        Some(ExtentRef {
            file: u32::from_le_bytes(b[..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            crc: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }
}

/// A file an append wrote into; the group commit syncs each one once.
#[derive(Clone)]
pub struct Touched {
    pub id: u32,
    pub file: Arc<File>,
}

struct Tail {
    id: u32,
    file: Arc<File>,
    /// The same file opened with `O_DIRECT` (None where the file system refuses it).
    direct: Option<Arc<File>>,
    next: u64,
    /// End of the preallocated range.
    allocated: u64,
}

/// A range reserved in a lane's file (`ExtentFiles::reserve`).
struct Reserved {
    id: u32,
    file: Arc<File>,
    direct: Option<Arc<File>>,
    offset: u64,
}

/// Bytes an extent of `len` bytes takes in its file: its blocks.
fn aligned_span(len: u64) -> u64 {
    len.div_ceil(EXTENT_ALIGN_BYTES) * EXTENT_ALIGN_BYTES
}

/// Most bytes of extents one direct write of `append_many` carries, unless one extent is
/// longer (this thread's aligned buffer grows to it). Packing 4 MiB per write doubled the cost
/// of the copy into the buffer by perf (a buffer that size no longer stays in the core's
/// cache between writes); what `append_many` saves is the syncs, not the writes.
const PACKED_WRITE_BYTES_MAX: u64 = 1 << 20;
/// Most bytes of one direct write of `append_many` when its extents lie block-aligned in memory
/// (written from where they are, no copy): fewer, larger writes.
const ALIGNED_WRITE_BYTES_MAX: u64 = 4 << 20;
/// `append_many` of more bytes appends extent by extent (a batch of the store is at most 64 MiB).
const APPEND_MANY_BYTES_MAX: u64 = 64 << 20;
const _: () = assert!(APPEND_MANY_BYTES_MAX <= EXTENT_FILE_BYTES_MAX);

/// `datas` laid out block-aligned one after the other (zeros in between) in this thread's
/// aligned buffer and written at `offset` with one direct write; false if that failed. A single
/// extent that already starts on a block boundary and fills whole blocks (the RPC layer
/// receives large payloads that way) goes to the disk from where it is.
/// Whether `d` starts on a block boundary of memory and fills whole blocks: it can go to a direct
/// write from where it is.
fn is_block_aligned(d: &[u8]) -> bool {
    (d.as_ptr() as usize).is_multiple_of(EXTENT_ALIGN_BYTES as usize) && (d.len() as u64).is_multiple_of(EXTENT_ALIGN_BYTES)
}

fn write_packed(direct: &File, datas: &[&[u8]], offset: u64) -> bool {
    if let [d] = datas {
        if is_block_aligned(d) {
            return direct.write_all_at(d, offset).is_ok();
        }
    }
    // Several, each aligned where it lies (an import message places extents so): one vectored
    // write from there, no copy.
    if datas.len() > 1 && datas.len() <= IOV_MAX && datas.iter().all(|d| is_block_aligned(d)) {
        return write_vectored_all_at(direct, datas, offset);
    }
    let span: u64 = datas.iter().map(|d| aligned_span(d.len() as u64)).sum();
    with_scratch(span as usize, |buf| {
        let mut at = 0usize;
        for d in datas {
            let end = at + aligned_span(d.len() as u64) as usize;
            buf[at..at + d.len()].copy_from_slice(d);
            buf[at + d.len()..end].fill(0);
            at = end;
        }
        direct.write_all_at(buf, offset).is_ok()
    })
    .unwrap_or(false)
}

fn open_direct(path: &Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok().map(Arc::new)
}

fn open_direct_read(path: &Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok().map(Arc::new)
}

/// Vectors of one `pwritev` at most (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Write `datas` one after the other at `offset` (`pwritev`, continued after short writes).
fn write_vectored_all_at(f: &File, datas: &[&[u8]], offset: u64) -> bool {
    use std::os::fd::AsRawFd;
    let mut iov: Vec<libc::iovec> = datas.iter().map(|d| libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() }).collect();
    let (mut first, mut at) = (0usize, offset);
    while first < iov.len() {
        // SAFETY: every iovec points into a slice of `datas`, alive for this call; the kernel
        // only reads them.
        let n = unsafe { libc::pwritev(f.as_raw_fd(), iov[first..].as_ptr(), (iov.len() - first) as libc::c_int, at as libc::off_t) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if n == 0 {
            return false;
        }
        let mut n = n as usize;
        at += n as u64;
        while first < iov.len() && n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        }
        if n > 0 {
            // SAFETY: `n` is less than this vector's length: still within its slice.
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n).cast() };
            iov[first].iov_len -= n;
        }
    }
    true
}

/// Read `len` bytes at `offset` with direct I/O into the spare capacity at the end of `out`,
/// if that is block-aligned memory with room for `span` (`len` rounded up to whole blocks), and
/// extend `out` by them; false (and `out` unchanged) otherwise or when the read comes up short.
fn read_direct_into(direct: &File, offset: u64, len: usize, span: usize, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    // SAFETY: pointer arithmetic within the allocation (`start <= capacity`).
    let at = unsafe { out.as_mut_ptr().add(start) };
    if !(at as usize).is_multiple_of(EXTENT_ALIGN_BYTES as usize) || out.capacity() - start < span {
        return false;
    }
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < len {
        // SAFETY: the kernel writes at most `span - done` bytes into the unused capacity behind
        // `start + done` (checked above); nothing reads them unless `set_len` covers them.
        let n = unsafe { libc::pread(direct.as_raw_fd(), at.add(done).cast(), span - done, (offset + done as u64) as libc::off_t) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // Failed, at the end of the file, or short and now unaligned: the caller's other paths
        // (`out` keeps its length).
        if n <= 0 {
            return false;
        }
        done += n as usize;
        if done < len && !done.is_multiple_of(EXTENT_ALIGN_BYTES as usize) {
            return false;
        }
    }
    // SAFETY: the loop above initialised `start..start + len` (at least).
    unsafe { out.set_len(start + len) };
    true
}

/// A 4 KiB-aligned buffer, as `O_DIRECT` needs, for data that is not aligned already (see
/// `append`); zeroed once when allocated, then reused per thread (`with_scratch`).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), EXTENT_ALIGN_BYTES as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes until drop; `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

thread_local! {
    /// Per thread, the aligned buffer direct I/O goes through, kept between calls: a fresh
    /// one per extent cost a page fault and the kernel's zeroing per 4 KiB (by perf a tenth of
    /// an engine's CPU while rebuild moved data).
    static SCRATCH: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Run `f` on this thread's aligned buffer of at least `len` bytes (`None` if it cannot be
/// allocated).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|b| b.layout.size() < len) {
            *slot = AlignedBuf::new(len.next_power_of_two().max(1 << 20));
        }
        slot.as_mut().map(|b| f(&mut b.as_mut_slice()[..len]))
    })
}

pub struct ExtentFiles {
    dir: PathBuf,
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// Direct-read descriptors, opened on first use (`None`: the file system refuses them).
    direct_readers: RwLock<HashMap<u32, Option<Arc<File>>>>,
    lanes: Vec<Mutex<Tail>>,
    next_id: std::sync::atomic::AtomicU32,
    next_lane: std::sync::atomic::AtomicUsize,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VosError + '_ {
    move |source| VosError::Io { path: path.to_owned(), source }
}

fn file_name(id: u32) -> String {
    format!("{id:08}.ext")
}

fn open_rw(path: &Path, create: bool) -> Result<File, VosError> {
    std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), VosError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl ExtentFiles {
    pub fn open(target_dir: &Path) -> Result<ExtentFiles, VosError> {
        let dir = target_dir.join(DIR);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            sync_dir(target_dir)?;
        }
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".ext")).and_then(|n| n.parse::<u32>().ok()) else { continue };
            files.insert(id, Arc::new(open_rw(&entry.path(), false)?));
        }
        // Each lane continues one of the newest files, after whatever the last run left there
        // (a torn tail included: it is never referenced); missing lanes start new files.
        let mut ids: Vec<u32> = files.keys().copied().collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let mut next_id = ids.first().map_or(1, |m| m + 1);
        let mut lanes = Vec::with_capacity(EXTENT_LANES);
        let mut created = false;
        for lane in 0..EXTENT_LANES {
            let (id, file) = match ids.get(lane) {
                Some(id) => (*id, files[id].clone()),
                None => {
                    let id = next_id;
                    next_id += 1;
                    let f = Arc::new(open_rw(&dir.join(file_name(id)), true)?);
                    files.insert(id, f.clone());
                    created = true;
                    (id, f)
                }
            };
            let len = file.metadata().map_err(io_err(&dir))?.len();
            let next = len.div_ceil(EXTENT_ALIGN_BYTES) * EXTENT_ALIGN_BYTES;
            let direct = open_direct(&dir.join(file_name(id)));
            lanes.push(Mutex::new(Tail { id, file, direct, next, allocated: next }));
        }
        if created {
            sync_dir(&dir)?;
        }
        Ok(ExtentFiles { dir, files: RwLock::new(files), direct_readers: RwLock::new(HashMap::new()), lanes, next_id: next_id.into(), next_lane: 0.into() })
    }

    /// Write `data` at a fresh offset (not yet durable: the group commit syncs the file).
    pub fn append(&self, data: &[u8]) -> Result<(ExtentRef, Touched), VosError> {
        self.append_with_crc(data, crc32c::crc32c(data))
    }

    /// [`ExtentFiles::append`] of bytes whose crc32c the caller has just computed (an import
    /// verifying its record), so they are not hashed again.
    pub fn append_with_crc(&self, data: &[u8], crc: u32) -> Result<(ExtentRef, Touched), VosError> {
        debug_assert_eq!(crc, crc32c::crc32c(data), "append_with_crc given another crc");
        let len = data.len() as u64;
        assert!(len > 0 && len <= crate::EXTENT_BYTES_MAX, "extent of {len} bytes");
        let r = self.reserve(aligned_span(len))?;
        // Direct I/O: no copy into the page cache (on this path the kernel's copy into new page
        // cache folios was most of an engine's CPU); the group commit's fdatasync still makes
        // the blocks (and the device cache) durable.
        let direct_done = r.direct.as_ref().is_some_and(|d| write_packed(d, &[data], r.offset));
        if !direct_done {
            self.write_buffered(&r, data, r.offset)?;
        }
        Ok((ExtentRef { file: r.id, offset: r.offset, crc }, Touched { id: r.id, file: r.file }))
    }

    /// Append many extents (bytes and their crc32c) as [`ExtentFiles::append`] would, into one
    /// contiguous range of one file, each at its own aligned offset: a rebuild import of 16
    /// extents costs a few large writes and one file to sync instead of 16 writes spread over
    /// every lane's file (each an `fdatasync`, a device flush, before the import is durable).
    pub fn append_many(&self, items: &[(&[u8], u32)]) -> Result<(Vec<ExtentRef>, Vec<Touched>), VosError> {
        let total: u64 = items.iter().map(|(d, _)| aligned_span(d.len() as u64)).sum();
        if items.len() < 2 || total > APPEND_MANY_BYTES_MAX {
            let mut refs = Vec::with_capacity(items.len());
            let mut touched = Vec::with_capacity(items.len());
            for (d, crc) in items {
                let (x, t) = self.append_with_crc(d, *crc)?;
                refs.push(x);
                touched.push(t);
            }
            return Ok((refs, touched));
        }
        for (d, crc) in items {
            assert!(!d.is_empty() && d.len() as u64 <= crate::EXTENT_BYTES_MAX, "extent of {} bytes", d.len());
            debug_assert_eq!(*crc, crc32c::crc32c(d), "append_many given another crc");
        }
        let r = self.reserve(total)?;
        let mut refs = Vec::with_capacity(items.len());
        let mut at = r.offset;
        let mut i = 0;
        while i < items.len() {
            // The extents of one write: as many as fit `PACKED_WRITE_BYTES_MAX` (at least one),
            // or `ALIGNED_WRITE_BYTES_MAX` of extents that need no copy.
            let (first, start) = (i, at);
            let mut span = 0u64;
            let in_place = is_block_aligned(items[first].0);
            let limit = if in_place { ALIGNED_WRITE_BYTES_MAX } else { PACKED_WRITE_BYTES_MAX };
            while i < items.len() && (i == first || (span + aligned_span(items[i].0.len() as u64) <= limit && is_block_aligned(items[i].0) == in_place)) {
                let len = items[i].0.len() as u64;
                refs.push(ExtentRef { file: r.id, offset: at, crc: items[i].1 });
                span += aligned_span(len);
                at += aligned_span(len);
                i += 1;
            }
            let datas: Vec<&[u8]> = items[first..i].iter().map(|(d, _)| *d).collect();
            if !r.direct.as_ref().is_some_and(|d| write_packed(d, &datas, start)) {
                let mut off = start;
                for d in datas {
                    self.write_buffered(&r, d, off)?;
                    off += aligned_span(d.len() as u64);
                }
            }
        }
        Ok((refs, vec![Touched { id: r.id, file: r.file }]))
    }

    /// A range of `span` bytes (a multiple of `EXTENT_ALIGN_BYTES`) at the end of a lane's file,
    /// preallocated ahead where direct I/O is used.
    fn reserve(&self, span: u64) -> Result<Reserved, VosError> {
        debug_assert!(span.is_multiple_of(EXTENT_ALIGN_BYTES) && span <= EXTENT_FILE_BYTES_MAX);
        let lane = self.next_lane.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.lanes.len();
        let mut t = self.lanes[lane].lock().unwrap_or_else(|e| e.into_inner());
        if t.next + span > EXTENT_FILE_BYTES_MAX {
            let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = self.dir.join(file_name(id));
            let f = Arc::new(open_rw(&path, true)?);
            // The new file must survive a crash before anything it holds is referenced.
            sync_dir(&self.dir)?;
            self.files.write().unwrap_or_else(|e| e.into_inner()).insert(id, f.clone());
            *t = Tail { id, file: f, direct: open_direct(&path), next: 0, allocated: 0 };
        }
        let offset = t.next;
        t.next = offset + span;
        if t.direct.is_some() && t.next > t.allocated {
            // Never more than a small share of what is free: on a nearly full disk the
            // preallocations of every lane of every target would otherwise eat the space
            // reserve (`strata server --reserve-mib`) before any data did.
            let free = crate::store::fs_space(&self.dir).map_or(0, |(_, free)| free);
            let ahead = EXTENT_PREALLOC_BYTES.min(free / PREALLOC_FREE_SHARE) / EXTENT_ALIGN_BYTES * EXTENT_ALIGN_BYTES;
            let to = (t.next + ahead).min(EXTENT_FILE_BYTES_MAX).max(t.next);
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate on a descriptor we own. Failure only costs speed.
            if unsafe { libc::fallocate(t.file.as_raw_fd(), 0, t.allocated as libc::off_t, (to - t.allocated) as libc::off_t) } == 0 {
                t.allocated = to;
            }
        }
        Ok(Reserved { id: t.id, file: t.file.clone(), direct: t.direct.clone(), offset })
    }

    /// Write `data` at `offset` through the page cache and start its write-back (where direct
    /// I/O is refused or failed).
    fn write_buffered(&self, r: &Reserved, data: &[u8], offset: u64) -> Result<(), VosError> {
        r.file.write_all_at(data, offset).map_err(|source| VosError::Io { path: self.dir.join(file_name(r.id)), source })?;
        // Start writing these bytes back now, in parallel with other writers, so the
        // group commit's fdatasync finds little left to write.
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range on a descriptor we own; it touches no memory of ours.
        unsafe {
            libc::sync_file_range(r.file.as_raw_fd(), offset as libc::off64_t, data.len() as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
        }
        Ok(())
    }

    fn file(&self, id: u32) -> Result<Arc<File>, VosError> {
        self.files.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned().ok_or_else(|| VosError::Corrupt { location: format!("extent file {}", file_name(id)), defect: "referenced extent file is missing".into() })
    }

    /// The checksum-verified bytes of one extent.
    pub fn read(&self, r: &ExtentRef, len: u64) -> Result<Vec<u8>, VosError> {
        if len > crate::EXTENT_BYTES_MAX {
            return Err(VosError::Corrupt { location: format!("extent file {}", file_name(r.file)), defect: format!("reference of {len} bytes") });
        }
        // Through the page cache, into memory that is not zeroed first (zeroing a fresh
        // megabyte per read was 9% of an engine serving a sequential file read).
        let mut buf = Vec::new();
        self.read_buffered_append(r, len as usize, &mut buf)?;
        Ok(buf)
    }

    /// A descriptor of extent file `id` opened for direct reads, if the file system allows.
    fn direct_reader(&self, id: u32) -> Option<Arc<File>> {
        if let Some(d) = self.direct_readers.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return d.clone();
        }
        let d = open_direct_read(&self.dir.join(file_name(id)));
        self.direct_readers.write().unwrap_or_else(|e| e.into_inner()).insert(id, d.clone());
        d
    }

    /// Append the checksum-verified bytes of one extent to `out` (no zeroing, no second copy:
    /// data movement builds the record around them); returns their crc32c.
    pub fn read_append(&self, r: &ExtentRef, len: u64, out: &mut Vec<u8>) -> Result<u32, VosError> {
        self.read_append_checked(r, len, out, true)
    }

    /// [`ExtentFiles::read_append`] without hashing the bytes when they are read directly, for
    /// a caller whose receiver verifies them against `r.crc` anyway (a rebuild import checks
    /// every value against its record header, built from `r.crc`): bytes damaged on this disk
    /// are refused there, and hashing each moved megabyte at both ends cost a tenth of a
    /// rebuild's CPU. Returns `r.crc`.
    pub fn read_append_unverified(&self, r: &ExtentRef, len: u64, out: &mut Vec<u8>) -> Result<u32, VosError> {
        self.read_append_checked(r, len, out, false)
    }

    fn read_append_checked(&self, r: &ExtentRef, len: u64, out: &mut Vec<u8>, verify: bool) -> Result<u32, VosError> {
        let at = || format!("extent file {} at {}", file_name(r.file), r.offset);
        if len > crate::EXTENT_BYTES_MAX {
            return Err(VosError::Corrupt { location: at(), defect: format!("reference of {len} bytes") });
        }
        let len = len as usize;
        // Direct I/O first: data movement reads each extent once, and through the page cache
        // that cost more than the copy (folio allocation, readahead, LRU) and evicted what
        // foreground reads use. Extents start 4 KiB-aligned; the file extends to whole blocks.
        if let Some(d) = self.direct_reader(r.file) {
            let span = len.div_ceil(EXTENT_ALIGN_BYTES as usize) * EXTENT_ALIGN_BYTES as usize;
            // Straight into `out` where its end is aligned memory with room for whole blocks
            // (a rebuild's import message places extents so): no copy through the scratch
            // buffer, which was most of the memory traffic of a rebuild's source.
            if read_direct_into(&d, r.offset, len, span, out) {
                let start = out.len() - len;
                let crc = if verify { crc32c::crc32c(&out[start..]) } else { r.crc };
                if crc == r.crc {
                    return Ok(crc);
                }
                out.truncate(start);
                return Err(VosError::Corrupt { location: at(), defect: format!("crc32c mismatch (stored {:#010x}, computed {crc:#010x})", r.crc) });
            }
            let read = with_scratch(span, |buf| {
                let mut done = 0usize;
                while done < len {
                    match d.read_at(&mut buf[done..], r.offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                    // A short direct read leaves the rest unaligned: finish buffered.
                    if !done.is_multiple_of(EXTENT_ALIGN_BYTES as usize) {
                        break;
                    }
                }
                if done >= len {
                    let crc = if verify { crc32c::crc32c(&buf[..len]) } else { r.crc };
                    (crc == r.crc).then(|| out.extend_from_slice(&buf[..len]));
                    Some(crc)
                } else {
                    None
                }
            });
            match read.flatten() {
                Some(crc) if crc == r.crc => return Ok(crc),
                Some(crc) => return Err(VosError::Corrupt { location: at(), defect: format!("crc32c mismatch (stored {:#010x}, computed {crc:#010x})", r.crc) }),
                None => {}
            }
        }
        self.read_buffered_append(r, len, out)
    }

    /// [`ExtentFiles::read_append`] through the page cache; `len` is within bounds.
    fn read_buffered_append(&self, r: &ExtentRef, len: usize, out: &mut Vec<u8>) -> Result<u32, VosError> {
        let at = || format!("extent file {} at {}", file_name(r.file), r.offset);
        let f = self.file(r.file)?;
        out.reserve(len);
        let start = out.len();
        let mut done = 0usize;
        use std::os::fd::AsRawFd;
        while done < len {
            // SAFETY: the kernel writes at most `len - done` bytes into the reserved, unused
            // capacity behind `start + done`; nothing reads those bytes until `set_len` below
            // covers exactly what was written.
            let n = unsafe { libc::pread(f.as_raw_fd(), out.as_mut_ptr().add(start + done).cast(), len - done, (r.offset + done as u64) as libc::off_t) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VosError::Corrupt { location: at(), defect: format!("cannot read {len} bytes: {e}") });
            }
            if n == 0 {
                return Err(VosError::Corrupt { location: at(), defect: format!("file ends {} bytes into a {len}-byte extent", done) });
            }
            done += n as usize;
        }
        // SAFETY: the loop above initialised `start..start + len`.
        unsafe { out.set_len(start + len) };
        let crc = crc32c::crc32c(&out[start..]);
        if crc != r.crc {
            out.truncate(start);
            return Err(VosError::Corrupt { location: at(), defect: format!("crc32c mismatch (stored {:#010x}, computed {crc:#010x})", r.crc) });
        }
        Ok(crc)
    }

    /// Free the blocks of an extent whose index row is durably gone.
    pub fn punch(&self, r: &ExtentRef, len: u64) {
        let Ok(f) = self.file(r.file) else { return };
        use std::os::fd::AsRawFd;
        let span = len.div_ceil(EXTENT_ALIGN_BYTES) * EXTENT_ALIGN_BYTES;
        // SAFETY: fallocate on a file descriptor we own; punching a hole changes no other memory.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, r.offset as libc::off_t, span as libc::off_t) };
        if rc != 0 {
            tracing::debug!(file = r.file, offset = r.offset, error = %std::io::Error::last_os_error(), "could not free a dead extent's blocks");
        }
    }

    /// Bytes the extent files occupy on disk (holes excluded).
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.files.read().unwrap_or_else(|e| e.into_inner()).values().filter_map(|f| f.metadata().ok()).map(|m| m.blocks() * 512).sum()
    }
}

/// Make every touched file durable, each once.
pub fn sync_touched(touched: &[Touched]) -> Result<(), VosError> {
    let mut done: Vec<u32> = Vec::new();
    for t in touched {
        if !done.contains(&t.id) {
            t.file.sync_data().map_err(|source| VosError::Io { path: PathBuf::from(file_name(t.id)), source })?;
            done.push(t.id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block-aligned bytes are written from where they lie, others through an aligned copy:
    /// both read back exactly, and neighbours are untouched.
    #[test]
    fn aligned_and_unaligned_sources_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let x = ExtentFiles::open(dir.path()).unwrap();
        let mut backing = vec![0u8; (64 << 10) + 8192];
        let at = backing.as_ptr().align_offset(4096);
        for (i, b) in backing.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2654435761).to_be_bytes()[0];
        }
        let aligned = &backing[at..at + (64 << 10)];
        let unaligned = &backing[at + 1..at + 1 + 70_001];
        let (ra, ta) = x.append(aligned).unwrap();
        let (ru, tu) = x.append(unaligned).unwrap();
        let (rb, tb) = x.append(aligned).unwrap();
        sync_touched(&[ta, tu, tb]).unwrap();
        assert_eq!(x.read(&ra, aligned.len() as u64).unwrap(), aligned);
        assert_eq!(x.read(&ru, unaligned.len() as u64).unwrap(), unaligned);
        assert_eq!(x.read(&rb, aligned.len() as u64).unwrap(), aligned);
    }

    /// Many extents appended at once land one after the other in one file, each block-aligned,
    /// and read back exactly; one sync covers them.
    #[test]
    fn many_extents_go_to_one_file_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let x = ExtentFiles::open(dir.path()).unwrap();
        let datas: Vec<Vec<u8>> = [70_000usize, 4 << 20, 64 << 10, 1 << 20, 5000, 3 << 20].iter().enumerate().map(|(i, n)| (0..*n).map(|j| (j as u32).wrapping_mul(2654435761).wrapping_add(i as u32).to_be_bytes()[1]).collect()).collect();
        let items: Vec<(&[u8], u32)> = datas.iter().map(|d| (&d[..], crc32c::crc32c(d))).collect();
        let (refs, touched) = x.append_many(&items).unwrap();
        assert_eq!(touched.len(), 1, "one file to sync");
        sync_touched(&touched).unwrap();
        for (w, (r, d)) in refs.windows(2).zip(refs.iter().zip(&datas)) {
            assert_eq!(r.offset % EXTENT_ALIGN_BYTES, 0);
            assert_eq!(w[1].file, w[0].file);
            assert_eq!(w[1].offset, w[0].offset + aligned_span(d.len() as u64), "not packed one after the other");
        }
        for (r, d) in refs.iter().zip(&datas) {
            assert_eq!(x.read(r, d.len() as u64).unwrap(), *d);
            assert_eq!(r.crc, crc32c::crc32c(d));
        }
        // Later appends do not overlap them.
        let (after, _) = x.append(&datas[0]).unwrap();
        for (r, d) in refs.iter().zip(&datas) {
            assert!(after.file != r.file || after.offset >= r.offset + d.len() as u64 || after.offset + datas[0].len() as u64 <= r.offset, "overlap");
        }
        assert_eq!(x.append_many(&[]).unwrap().0, vec![]);
    }

    #[test]
    fn appends_read_back_aligned_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let x = ExtentFiles::open(dir.path()).unwrap();
        let a = vec![7u8; 70_000];
        let b = vec![9u8; 5000];
        let (ra, ta) = x.append(&a).unwrap();
        let (rb, _) = x.append(&b).unwrap();
        sync_touched(&[ta]).unwrap();
        assert_eq!(ra.offset % EXTENT_ALIGN_BYTES, 0);
        assert_eq!(rb.offset % EXTENT_ALIGN_BYTES, 0);
        assert!(rb.file != ra.file || rb.offset >= ra.offset + a.len() as u64, "extents overlap");
        assert_eq!(x.read(&ra, a.len() as u64).unwrap(), a);
        let mut out = b"head".to_vec();
        assert_eq!(x.read_append(&ra, a.len() as u64, &mut out).unwrap(), crc32c::crc32c(&a));
        assert_eq!(out, [&b"head"[..], &a].concat());
        assert_eq!(ExtentRef::decode(&rb.encode()), Some(rb));
        drop(x);
        // Reopened: appends continue after the old tail, old extents still read.
        let x = ExtentFiles::open(dir.path()).unwrap();
        let mut later = Vec::new();
        for _ in 0..EXTENT_LANES {
            later.push(x.append(&a).unwrap().0);
        }
        for r in &later {
            assert!((r.file != rb.file || r.offset >= rb.offset + b.len() as u64) && (r.file != ra.file || r.offset >= ra.offset + a.len() as u64), "a reopened store overwrote an extent");
        }
        let rc = later[0];
        assert_eq!(x.read(&rb, b.len() as u64).unwrap(), b);
        let path = dir.path().join(DIR).join(file_name(rb.file));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1], rb.offset + 10).unwrap();
        assert!(matches!(x.read(&rb, b.len() as u64), Err(VosError::Corrupt { .. })));
        let mut out = Vec::new();
        assert!(matches!(x.read_append(&rb, b.len() as u64, &mut out), Err(VosError::Corrupt { .. })));
        assert!(out.is_empty(), "a damaged extent's bytes were kept");
        // A punched extent's blocks are freed.
        let before = x.disk_bytes();
        x.punch(&rc, a.len() as u64);
        assert!(x.disk_bytes() < before, "punching freed nothing ({before} bytes before)");
    }
}
