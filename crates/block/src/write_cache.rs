//! A bounded write-back cache in front of a writable volume, one per export and shared by all
//! its connections (so FLUSH on any connection covers writes acknowledged on every one, which
//! is what `NBD_FLAG_CAN_MULTI_CONN` promises).
//!
//! NBD (like a disk with a volatile write cache) only promises that a write is durable once a
//! FLUSH sent after its reply has been answered, or when it carried FUA. So:
//! - WRITE is acknowledged once its bytes are in the cache; reads see them at once. The cache
//!   holds the request's own buffer (no copy); a rewrite of dirty bytes replaces them in place,
//!   so a block rewritten many times before its write-back is written back once.
//! - FLUSH writes back everything acknowledged before it and answers once that is durable;
//!   a FUA write does the same for everything up to and including itself.
//! - A background task writes dirty blocks back, oldest first, up to
//!   [`CacheConfig::writeback_parallel`] at once, one update per block holding all its dirty
//!   extents (adjacent writes joined into one extent): when dirty bytes pass half of the bound,
//!   when data has been dirty for [`CacheConfig::max_age`], or at once for FLUSH/FUA waiters.
//! - Dirty plus in-flight bytes are bounded (default [`cache_dirty_bytes_max_default`]); a
//!   write that does not fit waits (backpressure).
//! - What a crash of the server loses: writes acknowledged without FUA and not followed by an
//!   acknowledged FLUSH, exactly what a disk's volatile cache or the page cache under
//!   `nbdkit file` loses; nothing FLUSHed or written with FUA.
//! - TRIM and WRITE_ZEROES go through to the volume: they drop the dirty bytes they cover, wait
//!   for write-backs of their blocks already under way, and hold further write-backs of those
//!   blocks until done, so the volume applies them after every write acknowledged before them
//!   and before every write that arrives meanwhile.
//! - [`WriteBackCache::quiesce`] holds new writes and writes back everything: a snapshot taken
//!   meanwhile is the volume as clients saw it at one instant (see `snapshot_control`).
//!
//! Invariants: at most one write-back per block is in flight (so the volume sees a block's
//! updates in order); a block's bytes are visible to reads from the moment the write is
//! acknowledged until its write-back is durable (dirty first, then in flight, then the volume).

use crate::block_device::{BlockDevice, DevError};
use crate::extent_map::{join_runs, ExtentMap, Piece};
use crate::volume_io::segments;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock};

/// Dirty data per export when memory size is unknown.
pub const CACHE_DIRTY_BYTES_MAX_FALLBACK: u64 = 256 << 20;
/// Most dirty data per export by default, whatever the memory.
pub const CACHE_DIRTY_BYTES_MAX_CAP: u64 = 1 << 30;
/// Share of the machine's memory one export may hold dirty by default (the kernel lets dirty
/// page cache grow to 20% of memory before writers wait).
pub const CACHE_DIRTY_MEMORY_SHARE: u64 = 16;
/// Blocks written back at once per export.
pub const WRITEBACK_PARALLEL_DEFAULT: usize = 32;
/// Dirty data older than this is written back even when the cache is nearly empty (librbd's
/// `rbd_cache_max_dirty_age` is 1 s too).
pub const CACHE_MAX_AGE_DEFAULT: Duration = Duration::from_secs(1);
/// Write-back starts regardless of age once dirty bytes pass 1/this of the bound (the kernel
/// starts background write-back at half of its dirty limit).
const WRITEBACK_START_SHARE: u64 = 2;

/// The default bound on dirty bytes per export: 1/16 of memory, at most 1 GiB (256 MiB when
/// memory size is unknown). A rewrite of dirty bytes only replaces them, so a working set that
/// fits is written back once per [`CACHE_MAX_AGE_DEFAULT`] however often it is rewritten.
pub fn cache_dirty_bytes_max_default() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib << 10)
    });
    match total {
        Some(t) => (t / CACHE_DIRTY_MEMORY_SHARE).clamp(64 << 20, CACHE_DIRTY_BYTES_MAX_CAP),
        None => CACHE_DIRTY_BYTES_MAX_FALLBACK,
    }
}

/// Pause before retrying write-backs after one failed.
const RETRY_AFTER: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Bound on dirty plus in-flight bytes; 0 disables the cache (every write goes through).
    pub dirty_bytes_max: u64,
    pub writeback_parallel: usize,
    pub max_age: Duration,
    /// Clean chunks kept per export for reads (`read_cache`); 0 keeps none.
    pub clean_bytes_max: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { dirty_bytes_max: cache_dirty_bytes_max_default(), writeback_parallel: WRITEBACK_PARALLEL_DEFAULT, max_age: CACHE_MAX_AGE_DEFAULT, clean_bytes_max: crate::read_cache::CACHE_CLEAN_BYTES_MAX_DEFAULT }
    }
}

/// What the cache needs of the device it writes back to.
pub trait CacheBackend: BlockDevice {
    fn block_bytes(&self) -> u64;
    /// Write disjoint runs `(offset within the block, length)`, ascending, whose bytes are
    /// `payload` in order, as one update, returning once durable.
    fn write_extents(&self, block: u64, runs: Vec<(u64, u64)>, payload: Bytes) -> BoxFuture<'_, Result<(), DevError>>;
    /// Whether writes can still succeed (e.g. the writer lease is still held).
    fn check_writable(&self) -> Result<(), DevError>;
}

#[derive(Default)]
struct BlockState {
    dirty: ExtentMap,
    /// Sequence number of the oldest write in `dirty`, and when it arrived.
    dirty_seq: u64,
    dirty_since: Option<Instant>,
    /// Pieces being written back, and the oldest sequence number among them.
    flushing: Option<(Vec<(u64, Piece)>, u64)>,
}

impl BlockState {
    fn idle(&self) -> bool {
        self.dirty.is_empty() && self.flushing.is_none()
    }
}

#[derive(Default)]
struct State {
    blocks: BTreeMap<u64, BlockState>,
    /// (oldest dirty seq, block) of every block with dirty bytes.
    dirty_order: BTreeSet<(u64, u64)>,
    /// (oldest seq, block) of every block being written back.
    flushing_order: BTreeSet<(u64, u64)>,
    /// Last sequence number given to a write.
    seq: u64,
    /// Dirty plus in-flight bytes.
    bytes: u64,
    /// Dirty data up to this sequence number is written back regardless of thresholds.
    urgent_upto: u64,
    space_waiters: usize,
    inflight: usize,
    /// Failed write-backs so far, and the latest failure.
    errors: u64,
    last_error: Option<DevError>,
    pause_until: Option<Instant>,
    /// TRIM / WRITE_ZEROES under way, as block ranges `[first, end)` (no write-back of those
    /// blocks starts meanwhile) and byte ranges (reads show zeros there over older bytes, so a
    /// read racing the trim sees the writes before it or the trim, never something older).
    zeroing: Vec<((u64, u64), (u64, u64))>,
}

impl State {
    /// The oldest sequence number not yet durable, if any.
    fn oldest_pending(&self) -> Option<u64> {
        let d = self.dirty_order.first().map(|x| x.0);
        let f = self.flushing_order.first().map(|x| x.0);
        match (d, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn zeroing(&self, b: u64) -> bool {
        self.zeroing.iter().any(|((f, e), _)| (*f..*e).contains(&b))
    }

    fn block_mut(&mut self, b: u64) -> &mut BlockState {
        self.blocks.entry(b).or_default()
    }

    fn forget_if_idle(&mut self, b: u64) {
        if self.blocks.get(&b).is_some_and(BlockState::idle) {
            self.blocks.remove(&b);
        }
    }
}

struct Inner<B: CacheBackend> {
    backend: Arc<B>,
    cfg: CacheConfig,
    block_bytes: u64,
    state: Mutex<State>,
    /// Something became durable, space freed or a block finished zeroing.
    changed: Notify,
    /// Wakes the write-back task (which holds it without holding the cache).
    kick: Arc<Notify>,
    /// Writes, trims and zeroes hold it shared; `quiesce` holds it exclusively.
    gate: Arc<RwLock<()>>,
}

/// A write-back cache over `B`; see the module documentation.
pub struct WriteBackCache<B: CacheBackend> {
    inner: Arc<Inner<B>>,
}

/// While held, no write enters the cache (reads go on); dropping it lets them in again.
pub struct Quiesced {
    _gate: OwnedRwLockWriteGuard<()>,
}

impl<B: CacheBackend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self) -> bool {
        self.cfg.dirty_bytes_max > 0
    }

    /// Start write-backs that are due; returns when the next one falls due by age.
    fn start_writebacks(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut st = self.lock();
        if st.pause_until.is_some_and(|p| p > now) {
            return st.pause_until;
        }
        st.pause_until = None;
        let target = self.cfg.dirty_bytes_max / WRITEBACK_START_SHARE;
        let mut started = Vec::new();
        let mut next_due = None;
        while st.inflight < self.cfg.writeback_parallel {
            // Oldest dirty block not already being written back or zeroed.
            let Some(&(seq, b)) = st.dirty_order.iter().find(|(_, b)| st.blocks.get(b).is_some_and(|s| s.flushing.is_none()) && !st.zeroing(*b)) else { break };
            let since = st.blocks.get(&b).and_then(|s| s.dirty_since).unwrap_or(now);
            let due = st.bytes > target || st.space_waiters > 0 || seq <= st.urgent_upto || now >= since + self.cfg.max_age;
            if !due {
                next_due = Some(since + self.cfg.max_age);
                break;
            }
            st.dirty_order.remove(&(seq, b));
            let bs = st.block_mut(b);
            let dirty = std::mem::take(&mut bs.dirty);
            bs.dirty_since = None;
            let pieces = dirty.into_pieces();
            let (runs, payload) = join_runs(&pieces);
            bs.flushing = Some((pieces, seq));
            st.flushing_order.insert((seq, b));
            st.inflight += 1;
            started.push((b, runs, payload));
        }
        drop(st);
        for (b, runs, payload) in started {
            let me = self.clone();
            tokio::spawn(async move {
                let r = me.backend.write_extents(b, runs, payload).await;
                me.finish_writeback(b, r);
            });
        }
        next_due
    }

    fn finish_writeback(&self, b: u64, r: Result<(), DevError>) {
        let mut st = self.lock();
        st.inflight -= 1;
        let Some((extents, seq)) = st.blocks.get_mut(&b).and_then(|s| s.flushing.take()) else {
            debug_assert!(false, "a write-back finished for a block not being written back");
            return;
        };
        st.flushing_order.remove(&(seq, b));
        let flushed: u64 = extents.iter().map(|(_, p)| p.data.len() as u64).sum();
        st.bytes -= flushed;
        if let Err(e) = r {
            tracing::warn!(block = b, error = %e, "write-back failed; keeping the data dirty and retrying");
            st.errors += 1;
            // A lost lease does not come back: retry rarely, for FLUSH to keep failing.
            let pause = if matches!(e, DevError::LeaseLost(_)) { RETRY_AFTER * 25 } else { RETRY_AFTER };
            st.pause_until = Some(Instant::now() + pause);
            st.last_error = Some(e);
            // Back under whatever was written since: newer bytes win.
            let bs = st.block_mut(b);
            let had = !bs.dirty.is_empty();
            let old_seq = bs.dirty_seq;
            let mut added = 0;
            for (o, p) in &extents {
                added += bs.dirty.insert_under(*o, p);
            }
            let new_seq = if had { old_seq.min(seq) } else { seq };
            let now_dirty = !bs.dirty.is_empty();
            if now_dirty {
                bs.dirty_seq = new_seq;
                bs.dirty_since.get_or_insert_with(Instant::now);
            }
            if had {
                st.dirty_order.remove(&(old_seq, b));
            }
            if now_dirty {
                st.dirty_order.insert((new_seq, b));
            }
            st.bytes += added;
        }
        st.forget_if_idle(b);
        drop(st);
        self.changed.notify_waiters();
        self.kick.notify_one();
    }

    /// Wait until every write up to `seq` is durable; fails if a write-back fails meanwhile.
    async fn wait_durable(&self, seq: u64) -> Result<(), DevError> {
        let errors_before = {
            let mut st = self.lock();
            st.urgent_upto = st.urgent_upto.max(seq);
            st.errors
        };
        self.kick.notify_one();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.lock();
                if st.oldest_pending().is_none_or(|o| o > seq) {
                    return Ok(());
                }
                if st.errors > errors_before {
                    return Err(st.last_error.clone().unwrap_or_else(|| DevError::Io("write-back failed".into())));
                }
            }
            changed.await;
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DevError> {
        self.backend.check_writable()?;
        let _gate = self.gate.read().await;
        if !self.cached() {
            return self.backend.write(offset, data, fua).await;
        }
        let len = data.len() as u64;
        let mut waiting = false;
        let errors_before = self.lock().errors;
        let seq = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = self.lock();
                if waiting {
                    st.space_waiters -= 1;
                    // Write-backs that fail (lease lost, volume full, ranks gone) may never make
                    // room: refuse the write instead of holding the client forever.
                    self.backend.check_writable()?;
                    if st.errors > errors_before && st.bytes + len > self.cfg.dirty_bytes_max {
                        return Err(st.last_error.clone().unwrap_or_else(|| DevError::Io("write-back failed".into())));
                    }
                }
                // An empty cache takes any request (one may exceed the bound on its own).
                if st.bytes + len <= self.cfg.dirty_bytes_max || st.bytes == 0 {
                    st.seq += 1;
                    let seq = st.seq;
                    let now = Instant::now();
                    for s in segments(offset, len, self.block_bytes) {
                        let bs = st.block_mut(s.block);
                        let first = bs.dirty.is_empty();
                        if first {
                            bs.dirty_seq = seq;
                            bs.dirty_since = Some(now);
                        }
                        // A slice of the request's buffer: rewrites replace it, nothing is copied.
                        let grew = bs.dirty.insert(s.off, data.slice(s.buf_off as usize..(s.buf_off + s.len) as usize), len);
                        if first {
                            st.dirty_order.insert((seq, s.block));
                            // The write-back task learns when this block falls due.
                            self.kick.notify_one();
                        }
                        st.bytes += grew;
                    }
                    break seq;
                }
                st.space_waiters += 1;
                waiting = true;
            }
            self.kick.notify_one();
            changed.await;
        };
        if fua {
            self.wait_durable(seq).await
        } else {
            if self.lock().bytes > self.cfg.dirty_bytes_max / WRITEBACK_START_SHARE {
                self.kick.notify_one();
            }
            Ok(())
        }
    }

    async fn zero(&self, offset: u64, len: u64, trim: bool, allocate: bool) -> Result<(), DevError> {
        self.backend.check_writable()?;
        let _gate = self.gate.read().await;
        if !self.cached() {
            return if trim { self.backend.trim(offset, len, true).await } else { self.backend.write_zeroes(offset, len, allocate, true).await };
        }
        let end = offset + len;
        let range = (offset / self.block_bytes, end.div_ceil(self.block_bytes));
        {
            let mut st = self.lock();
            st.zeroing.push((range, (offset, end)));
            // Only blocks the cache holds: a trim of a whole large volume costs nothing here.
            let held: Vec<u64> = st.blocks.range(range.0..range.1).map(|(b, _)| *b).collect();
            for b in held {
                let base = b * self.block_bytes;
                let (x, y) = (offset.max(base) - base, end.min(base + self.block_bytes) - base);
                let bs = st.block_mut(b);
                let removed = bs.dirty.remove_range(x, y);
                let seq = bs.dirty_seq;
                if removed > 0 && bs.dirty.is_empty() {
                    bs.dirty_since = None;
                    st.dirty_order.remove(&(seq, b));
                }
                st.bytes -= removed;
                st.forget_if_idle(b);
            }
        }
        // Write-backs of these blocks already under way land first (their epochs are older).
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.lock().blocks.range(range.0..range.1).any(|(_, b)| b.flushing.is_some()) {
                break;
            }
            changed.await;
        }
        // Always durable before the reply: trims are rare and this keeps their ordering simple.
        let r = if trim { self.backend.trim(offset, len, true).await } else { self.backend.write_zeroes(offset, len, allocate, true).await };
        {
            let mut st = self.lock();
            if let Some(i) = st.zeroing.iter().position(|z| *z == (range, (offset, end))) {
                st.zeroing.swap_remove(i);
            }
        }
        self.changed.notify_waiters();
        self.kick.notify_one();
        r
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DevError> {
        if !self.cached() {
            return self.backend.read(offset, len).await;
        }
        let end = offset + len as u64;
        // Taken before reading the volume: a write-back finishing meanwhile is then in the
        // volume's answer, in this overlay, or both; never in neither.
        let mut overlay: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut dirty: Vec<(u64, Vec<u8>)> = Vec::new();
        {
            let st = self.lock();
            if !st.blocks.is_empty() {
                for s in segments(offset, len as u64, self.block_bytes) {
                    let Some(bs) = st.blocks.get(&s.block) else { continue };
                    let base = s.block * self.block_bytes;
                    let (a, b) = (s.off, s.off + s.len);
                    if let Some((ext, _)) = &bs.flushing {
                        for (o, p) in ext {
                            let d = &p.data;
                            let (x, y) = ((*o).max(a), (*o + d.len() as u64).min(b));
                            if x < y {
                                overlay.push((base + x, d[(x - o) as usize..(y - o) as usize].to_vec()));
                            }
                        }
                    }
                    for (o, d) in bs.dirty.overlapping(a, b) {
                        dirty.push((base + o, d.to_vec()));
                    }
                }
            }
            for (_, (zs, ze)) in &st.zeroing {
                let (x, y) = ((*zs).max(offset), (*ze).min(end));
                if x < y {
                    overlay.push((x, vec![0; (y - x) as usize]));
                }
            }
            overlay.append(&mut dirty);
        }
        let mut out = if covers(&overlay, offset, end) { vec![0u8; len as usize] } else { self.backend.read(offset, len).await? };
        // In-flight parts first, then trims under way, then the newer dirty bytes over them.
        for (o, d) in &overlay {
            let at = (o - offset) as usize;
            out[at..at + d.len()].copy_from_slice(d);
        }
        Ok(out)
    }
}

/// Whether the pieces cover `[start, end)` completely.
fn covers(pieces: &[(u64, Vec<u8>)], start: u64, end: u64) -> bool {
    let mut r: Vec<(u64, u64)> = pieces.iter().map(|(o, d)| (*o, *o + d.len() as u64)).collect();
    r.sort_unstable();
    let mut pos = start;
    for (a, b) in r {
        if a > pos {
            return false;
        }
        pos = pos.max(b);
    }
    pos >= end
}

impl<B: CacheBackend> WriteBackCache<B> {
    /// Wrap `backend`; spawns the write-back task (needs a tokio runtime).
    pub fn new(backend: Arc<B>, cfg: CacheConfig) -> WriteBackCache<B> {
        let block_bytes = backend.block_bytes();
        assert!(block_bytes > 0 && cfg.writeback_parallel > 0);
        let inner = Arc::new(Inner { backend, cfg, block_bytes, state: Default::default(), changed: Notify::new(), kick: Arc::new(Notify::new()), gate: Arc::new(RwLock::new(())) });
        if inner.cached() {
            tokio::spawn(writeback_task(Arc::downgrade(&inner), inner.kick.clone()));
        }
        WriteBackCache { inner }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.inner.backend
    }

    /// Dirty plus in-flight bytes.
    pub fn cached_bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    /// Hold new writes, trims and zeroes, then write back everything; reads go on. Writes
    /// resume when the returned guard drops.
    pub async fn quiesce(&self) -> Result<Quiesced, DevError> {
        let gate = self.inner.gate.clone().write_owned().await;
        let seq = self.inner.lock().seq;
        self.inner.wait_durable(seq).await?;
        Ok(Quiesced { _gate: gate })
    }
}

async fn writeback_task<B: CacheBackend>(weak: Weak<Inner<B>>, kick: Arc<Notify>) {
    loop {
        let kicked = kick.notified();
        tokio::pin!(kicked);
        kicked.as_mut().enable();
        let Some(inner) = weak.upgrade() else { return };
        let next_due = inner.start_writebacks();
        drop(inner);
        match next_due {
            Some(t) => {
                let _ = tokio::time::timeout_at(t.into(), kicked).await;
            }
            None => kicked.await,
        }
    }
}

impl<B: CacheBackend> Drop for Inner<B> {
    fn drop(&mut self) {
        // Let the write-back task see the cache is gone.
        self.kick.notify_one();
        let st = self.lock();
        if st.bytes > 0 {
            tracing::error!(bytes = st.bytes, "write cache dropped with data not written back (acknowledged without FLUSH or FUA, so allowed to be lost, but a FLUSH should have preceded)");
        }
    }
}

impl<B: CacheBackend> BlockDevice for WriteBackCache<B> {
    fn size_bytes(&self) -> u64 {
        self.inner.backend.size_bytes()
    }
    fn read_only(&self) -> bool {
        self.inner.backend.read_only()
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<u8>, DevError>> {
        self.inner.read(offset, len).boxed()
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
        self.inner.write(offset, data, fua).boxed()
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
        self.inner.zero(offset, len, true, false).boxed()
    }
    fn write_zeroes(&self, offset: u64, len: u64, allocate: bool, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
        self.inner.zero(offset, len, false, allocate).boxed()
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), DevError>> {
        async move {
            let seq = self.inner.lock().seq;
            self.inner.wait_durable(seq).await?;
            self.inner.backend.flush().await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    type WriteBack = (u64, Vec<(u64, usize)>);

    /// A volume in memory whose write-backs can be held (`gate`) or made to fail.
    struct MemVolume {
        data: Mutex<Vec<u8>>,
        block_bytes: u64,
        /// Every write-back: (block, extents as (offset, len)).
        log: Mutex<Vec<WriteBack>>,
        gate: Semaphore,
        fail: AtomicBool,
        inflight: AtomicUsize,
        inflight_blocks: Mutex<Vec<u64>>,
    }

    impl MemVolume {
        fn new(size: usize, block_bytes: u64) -> Arc<MemVolume> {
            Arc::new(MemVolume { data: Mutex::new(vec![0; size]), block_bytes, log: Default::default(), gate: Semaphore::new(GATE_PERMITS as usize), fail: AtomicBool::new(false), inflight: AtomicUsize::new(0), inflight_blocks: Default::default() })
        }
        fn durable(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    impl BlockDevice for MemVolume {
        fn size_bytes(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Vec<u8>, DevError>> {
            let r = self.data.lock().unwrap()[offset as usize..offset as usize + len as usize].to_vec();
            async move { Ok(r) }.boxed()
        }
        fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            async { Ok(()) }.boxed()
        }
        fn trim(&self, offset: u64, len: u64, _fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            async move {
                let (first, end) = (offset / self.block_bytes, (offset + len).div_ceil(self.block_bytes));
                assert!(!self.inflight_blocks.lock().unwrap().iter().any(|b| (first..end).contains(b)), "a trim overlapped a write-back of its blocks");
                self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
                Ok(())
            }
            .boxed()
        }
        fn write_zeroes(&self, offset: u64, len: u64, _allocate: bool, fua: bool) -> BoxFuture<'_, Result<(), DevError>> {
            self.trim(offset, len, fua)
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), DevError>> {
            async { Ok(()) }.boxed()
        }
    }

    impl CacheBackend for MemVolume {
        fn block_bytes(&self) -> u64 {
            self.block_bytes
        }
        fn write_extents(&self, block: u64, runs: Vec<(u64, u64)>, payload: Bytes) -> BoxFuture<'_, Result<(), DevError>> {
            async move {
                assert_eq!(runs.iter().map(|(_, l)| *l as usize).sum::<usize>(), payload.len());
                let extents = crate::volume_io::run_slices(&runs, &payload);
                self.inflight.fetch_add(1, Ordering::SeqCst);
                self.inflight_blocks.lock().unwrap().push(block);
                let _p = self.gate.acquire().await.unwrap();
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                let mut ib = self.inflight_blocks.lock().unwrap();
                let i = ib.iter().position(|b| *b == block).unwrap();
                ib.swap_remove(i);
                drop(ib);
                if self.fail.load(Ordering::SeqCst) {
                    return Err(DevError::Io("injected".into()));
                }
                let base = block * self.block_bytes;
                let mut d = self.data.lock().unwrap();
                for (o, x) in &extents {
                    assert!(o + x.len() as u64 <= self.block_bytes);
                    d[(base + o) as usize..(base + o) as usize + x.len()].copy_from_slice(x);
                }
                self.log.lock().unwrap().push((block, extents.iter().map(|(o, x)| (*o, x.len())).collect()));
                Ok(())
            }
            .boxed()
        }
        fn check_writable(&self) -> Result<(), DevError> {
            Ok(())
        }
    }

    fn cfg(max: u64, age: Duration) -> CacheConfig {
        CacheConfig { dirty_bytes_max: max, writeback_parallel: 4, max_age: age, clean_bytes_max: 0 }
    }

    fn bytes(seed: u64, len: usize) -> Bytes {
        (0..len).map(|i| (seed.wrapping_mul(131).wrapping_add(i as u64 * 7) % 251) as u8 + 1).collect::<Vec<u8>>().into()
    }

    const GATE_PERMITS: u32 = 1 << 20;
    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn writes_are_read_at_once_durable_after_flush_and_written_back_merged() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = WriteBackCache::new(vol.clone(), cfg(16 << 20, HOUR));
        let mut model = vec![0u8; 1 << 20];
        // Sequential 4 KiB writes filling block 1, and a write across blocks 3 and 4.
        for i in 0..16u64 {
            let d = bytes(i, 4096);
            c.write((64 << 10) + i * 4096, d.clone(), false).await.unwrap();
            model[(64 << 10) + i as usize * 4096..][..4096].copy_from_slice(&d);
        }
        let d = bytes(99, 10_000);
        c.write((4 << 16) - 5000, d.clone(), false).await.unwrap();
        model[(4 << 16) - 5000..][..10_000].copy_from_slice(&d);
        assert!(vol.durable().iter().all(|x| *x == 0), "nothing is written back before it is due");
        assert_eq!(c.read(0, 1 << 20).await.unwrap(), model, "reads see acknowledged writes");
        assert_eq!(c.read((64 << 10) + 100, 3000).await.unwrap(), model[(64 << 10) + 100..][..3000], "a read inside the cache");
        c.flush().await.unwrap();
        assert_eq!(vol.durable(), model);
        assert_eq!(c.cached_bytes(), 0);
        let mut log = vol.log.lock().unwrap().clone();
        log.sort();
        assert_eq!(log, vec![(1, vec![(0, 64 << 10)]), (3, vec![((64 << 10) - 5000, 5000)]), (4, vec![(0, 5000)])], "one update per block, adjacent writes merged");
    }

    #[tokio::test]
    async fn rewrites_of_dirty_bytes_coalesce_into_one_write_back() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = WriteBackCache::new(vol.clone(), cfg(16 << 20, HOUR));
        // A block rewritten over and over (whole, and in 4 KiB pieces) before its write-back.
        for i in 0..100u64 {
            c.write(0, bytes(i, 64 << 10), false).await.unwrap();
            c.write((i % 16) * 4096, bytes(1000 + i, 4096), false).await.unwrap();
        }
        assert_eq!(c.cached_bytes(), 64 << 10, "rewrites replace dirty bytes; the cache does not grow");
        let mut want = bytes(99, 64 << 10).to_vec();
        want[3 * 4096..4 * 4096].copy_from_slice(&bytes(1099, 4096));
        assert_eq!(c.read(0, 64 << 10).await.unwrap(), want);
        c.flush().await.unwrap();
        assert_eq!(vol.durable()[..64 << 10], want[..]);
        assert_eq!(vol.log.lock().unwrap().clone(), vec![(0, vec![(0, 64 << 10)])], "one write-back of one extent for 200 writes");
    }

    #[test]
    fn the_default_bound_follows_memory_within_limits() {
        let d = cache_dirty_bytes_max_default();
        assert!((64 << 20..=CACHE_DIRTY_BYTES_MAX_CAP).contains(&d), "{d}");
        assert_eq!(CacheConfig::default().dirty_bytes_max, d);
    }

    #[tokio::test]
    async fn fua_writes_are_durable_on_return_and_old_data_is_written_back_by_age() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = WriteBackCache::new(vol.clone(), cfg(16 << 20, Duration::from_millis(20)));
        let d = bytes(1, 8192);
        c.write(8192, d.clone(), true).await.unwrap();
        assert_eq!(vol.durable()[8192..16384], d[..]);
        let e = bytes(2, 4096);
        c.write(1 << 19, e.clone(), false).await.unwrap();
        crate::nbd_tests::wait_for("the aged write to be written back", || vol.durable()[1 << 19..(1 << 19) + 4096] == e[..]).await;
    }

    #[tokio::test]
    async fn a_full_cache_holds_writers_until_write_backs_make_room() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = Arc::new(WriteBackCache::new(vol.clone(), cfg(64 << 10, HOUR)));
        let held = vol.gate.acquire_many(GATE_PERMITS).await.unwrap();
        for i in 0..16u64 {
            c.write(i * (64 << 10), bytes(i, 4096), false).await.unwrap();
        }
        assert_eq!(c.cached_bytes(), 64 << 10);
        let c2 = c.clone();
        let mut w = tokio::spawn(async move { c2.write(1 << 19, bytes(77, 4096), false).await });
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut w).await.is_err(), "a write past the bound waits");
        assert!(c.cached_bytes() <= 64 << 10);
        drop(held);
        w.await.unwrap().unwrap();
        assert_eq!(c.read(1 << 19, 4096).await.unwrap(), bytes(77, 4096)[..]);
        c.flush().await.unwrap();
        assert_eq!(vol.durable()[1 << 19..][..4096], bytes(77, 4096)[..]);
    }

    #[tokio::test]
    async fn trims_supersede_cached_and_in_flight_writes_and_later_writes_supersede_trims() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = Arc::new(WriteBackCache::new(vol.clone(), cfg(16 << 20, HOUR)));
        c.write(0, bytes(1, 128 << 10), false).await.unwrap();
        // Block 0's write-back is held in flight while a trim of it arrives.
        let held = vol.gate.acquire_many(GATE_PERMITS).await.unwrap();
        let c2 = c.clone();
        let flush = tokio::spawn(async move { c2.flush().await });
        crate::nbd_tests::wait_for("write-backs to start", || vol.inflight.load(Ordering::SeqCst) == 2).await;
        let c3 = c.clone();
        let trim = tokio::spawn(async move { c3.trim(4096, 100_000, false).await });
        crate::nbd_tests::wait_for("the trim to start", || !c.inner.lock().zeroing.is_empty()).await;
        // A read racing the trim sees the trim, not the bytes from before the cached write.
        let mut racing = bytes(1, 128 << 10).to_vec();
        racing[4096..104_096].fill(0);
        assert_eq!(c.read(0, 128 << 10).await.unwrap(), racing);
        drop(held);
        trim.await.unwrap().unwrap();
        flush.await.unwrap().unwrap();
        let mut model = bytes(1, 128 << 10).to_vec();
        model[4096..104_096].fill(0);
        model.resize(1 << 20, 0);
        assert_eq!(c.read(0, 1 << 20).await.unwrap(), model);
        c.write(90_000, bytes(5, 4096), false).await.unwrap();
        model[90_000..94_096].copy_from_slice(&bytes(5, 4096));
        c.write_zeroes(200_000, 4096, false, false).await.unwrap();
        assert_eq!(c.read(0, 1 << 20).await.unwrap(), model);
        c.flush().await.unwrap();
        assert_eq!(vol.durable(), model, "the write-back in flight did not undo the trim");
    }

    #[tokio::test]
    async fn a_failed_write_back_fails_flush_keeps_the_data_and_is_retried() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = WriteBackCache::new(vol.clone(), cfg(16 << 20, HOUR));
        vol.fail.store(true, Ordering::SeqCst);
        c.write(0, bytes(1, 4096), false).await.unwrap();
        assert!(c.flush().await.is_err(), "FLUSH reports the failed write-back");
        c.write(2048, bytes(2, 4096), false).await.unwrap();
        let mut model = vec![0u8; 8192];
        model[..4096].copy_from_slice(&bytes(1, 4096));
        model[2048..6144].copy_from_slice(&bytes(2, 4096));
        assert_eq!(c.read(0, 8192).await.unwrap(), model, "failed data stays readable, under newer writes");
        vol.fail.store(false, Ordering::SeqCst);
        c.flush().await.unwrap();
        assert_eq!(vol.durable()[..8192], model[..]);
    }

    #[tokio::test]
    async fn a_writer_waiting_for_room_gets_the_error_when_write_backs_fail() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = WriteBackCache::new(vol.clone(), cfg(64 << 10, HOUR));
        vol.fail.store(true, Ordering::SeqCst);
        for i in 0..16u64 {
            c.write(i * (64 << 10), bytes(i, 4096), false).await.unwrap();
        }
        assert!(c.write(0, bytes(9, 8192), false).await.is_err(), "no room will come: the write fails instead of waiting forever");
        assert_eq!(c.read(0, 4096).await.unwrap(), bytes(0, 4096)[..], "the refused write changed nothing");
    }

    #[tokio::test]
    async fn quiesce_writes_everything_back_and_holds_writes_until_released() {
        let vol = MemVolume::new(1 << 20, 64 << 10);
        let c = Arc::new(WriteBackCache::new(vol.clone(), cfg(16 << 20, HOUR)));
        c.write(4096, bytes(1, 4096), false).await.unwrap();
        let q = c.quiesce().await.unwrap();
        assert_eq!(vol.durable()[4096..8192], bytes(1, 4096)[..]);
        assert_eq!(c.cached_bytes(), 0);
        let c2 = c.clone();
        let mut w = tokio::spawn(async move { c2.write(0, bytes(2, 4096), false).await });
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut w).await.is_err(), "writes wait while quiesced");
        assert_eq!(c.read(4096, 4096).await.unwrap(), bytes(1, 4096)[..], "reads go on");
        drop(q);
        w.await.unwrap().unwrap();
        assert_eq!(c.read(0, 4096).await.unwrap(), bytes(2, 4096)[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_operations_match_a_model_with_write_backs_running() {
        const SIZE: usize = 512 << 10;
        let vol = MemVolume::new(SIZE, 16 << 10);
        // A small bound and age: write-backs run all the time, under the operations.
        let c = WriteBackCache::new(vol.clone(), cfg(48 << 10, Duration::from_millis(1)));
        let mut model = vec![0u8; SIZE];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..3000u64 {
            let off = rnd(SIZE as u64 / 512) * 512;
            let len = (1 + rnd(64)) * 512;
            let len = len.min(SIZE as u64 - off);
            match rnd(10) {
                0..=5 => {
                    let d = bytes(step, len as usize);
                    c.write(off, d.clone(), rnd(8) == 0).await.unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                }
                6 => {
                    c.trim(off, len, false).await.unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                7 => c.flush().await.unwrap(),
                _ => assert_eq!(c.read(off, len as u32).await.unwrap(), model[off as usize..(off + len) as usize], "step {step}"),
            }
            assert!(c.cached_bytes() <= 48 << 10, "the bound holds");
        }
        c.flush().await.unwrap();
        assert_eq!(vol.durable(), model);
    }
}
