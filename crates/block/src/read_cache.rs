//! A bounded cache of clean volume chunks, kept by a [`crate::VolumeIo`] that is the only
//! thing able to change what it reads: a writable export's device (the writer lease keeps
//! every other writer out) or a snapshot's (its layers are pinned epochs, never changed).
//! A read-only export of a volume's head is written by another server and keeps no cache.
//!
//! The unit is a whole chunk (the volume's array akey, 64 KiB by default): the engine reads and
//! checksums whole records anyway, so a 4 KiB miss fetches its chunk and the next 15 reads of
//! it are answered from memory. Eviction is CLOCK (a hit sets a bit; the hand gives a set bit a
//! second round), bounded by [`CleanCache::bytes_max`] of chunk data.
//!
//! Coherence with the volume (the only writer is the `VolumeIo` owning this cache):
//! - Every change of the volume (a block's write-back, a write-through, a trim or zeroing) is
//!   bracketed by [`CleanCache::begin_change`]: the chunks it touches are dropped at its start
//!   and stay uncacheable until its guard drops, after the change returned.
//! - A fill (a miss read from the volume) registers first ([`CleanCache::begin_fill`]); a
//!   change of its chunk that starts meanwhile poisons it, and a chunk under change is not
//!   filled at all. So a fill can only insert bytes read while no change of its chunk was
//!   under way, i.e. the chunk's current content.
//! - A change that wrote whole chunks may keep them ([`Change::keep`]) when it ends, unless
//!   another change of them overlapped it in time (then which landed last is unknown here): a
//!   volume written sequentially is read back from memory.
//!
//! Limits: `bytes_max` of chunk data (a chunk larger than it is never cached); the CLOCK queue
//! is compacted when stale entries (dropped chunks) outnumber live ones.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Clean chunks per exported volume, by default: a working set of up to 1 GiB is answered
/// from memory (as the page cache answers for `nbdkit file` or `qemu-nbd`); memory is only
/// taken as chunks are read or written whole.
pub const CACHE_CLEAN_BYTES_MAX_DEFAULT: u64 = 1 << 30;

struct Entry {
    data: Bytes,
    referenced: bool,
    /// Which CLOCK queue item stands for this entry (older items for the chunk are stale).
    qid: u64,
}

#[derive(Default)]
struct State {
    map: HashMap<u64, Entry>,
    clock: VecDeque<(u64, u64)>,
    next_qid: u64,
    bytes: u64,
    /// Chunk ranges `[first, end)` of volume changes under way (one item per change), and
    /// whether another change overlapped it (then its bytes may not be the volume's).
    changing: Vec<((u64, u64), bool)>,
    /// Fills under way per chunk: how many, and whether a change started since the first.
    fills: HashMap<u64, (u32, bool)>,
}

impl State {
    fn changing(&self, chunk: u64) -> bool {
        self.changing.iter().any(|&((a, b), _)| (a..b).contains(&chunk))
    }

    fn drop_range(&mut self, first: u64, end: u64) {
        if end - first <= self.map.len() as u64 {
            for c in first..end {
                if let Some(e) = self.map.remove(&c) {
                    self.bytes -= e.data.len() as u64;
                }
            }
        } else {
            let mut freed = 0;
            self.map.retain(|c, e| {
                let keep = !(first..end).contains(c);
                if !keep {
                    freed += e.data.len() as u64;
                }
                keep
            });
            self.bytes -= freed;
        }
        for (c, f) in self.fills.iter_mut() {
            if (first..end).contains(c) {
                f.1 = true;
            }
        }
    }

    fn insert(&mut self, chunk: u64, data: Bytes, bytes_max: u64) {
        let qid = self.next_qid;
        self.next_qid += 1;
        if let Some(old) = self.map.insert(chunk, Entry { data: data.clone(), referenced: false, qid }) {
            self.bytes -= old.data.len() as u64;
        }
        self.bytes += data.len() as u64;
        self.clock.push_back((chunk, qid));
        while self.bytes > bytes_max {
            let Some((c, q)) = self.clock.pop_front() else { break };
            let Some(e) = self.map.get_mut(&c).filter(|e| e.qid == q) else { continue };
            if e.referenced {
                e.referenced = false;
                self.clock.push_back((c, q));
            } else {
                let len = e.data.len() as u64;
                self.map.remove(&c);
                self.bytes -= len;
            }
        }
        if self.clock.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.clock.retain(|(c, q)| map.get(c).is_some_and(|e| e.qid == *q));
        }
        debug_assert!(self.bytes <= bytes_max);
    }
}

/// See the module documentation.
pub struct CleanCache {
    bytes_max: u64,
    st: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A change of chunks `[first, end)` under way; dropping it (after the change returned, or
/// failed) lets them be cached again.
pub struct Change<'a> {
    cache: &'a CleanCache,
    range: (u64, u64),
    /// Whole chunks' new content, kept when the change ends (`Change::keep`).
    keep: Vec<(u64, Bytes)>,
}

/// A fill of one chunk under way; [`Fill::finish`] inserts what was read unless a change of
/// the chunk started meanwhile.
pub struct Fill<'a> {
    cache: &'a CleanCache,
    chunk: u64,
    done: bool,
}

impl CleanCache {
    pub fn new(bytes_max: u64) -> CleanCache {
        CleanCache { bytes_max, st: Mutex::default(), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// Chunk data held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Reads answered from the cache and reads that went to the volume, so far (chunks).
    pub fn hits_misses(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    /// The cached content of `chunk`.
    pub fn get(&self, chunk: u64) -> Option<Bytes> {
        let mut st = self.lock();
        match st.map.get_mut(&chunk) {
            Some(e) => {
                e.referenced = true;
                let d = e.data.clone();
                drop(st);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(d)
            }
            None => {
                drop(st);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Announce a fill of `chunk` before reading it from the volume; `None` if a change of it
    /// is under way (read it without caching).
    pub fn begin_fill(&self, chunk: u64) -> Option<Fill<'_>> {
        let mut st = self.lock();
        if st.changing(chunk) {
            return None;
        }
        st.fills.entry(chunk).or_insert((0, false)).0 += 1;
        Some(Fill { cache: self, chunk, done: false })
    }

    /// Announce a change of chunks `[first, end)` before sending it to the volume.
    pub fn begin_change(&self, first: u64, end: u64) -> Change<'_> {
        assert!(first <= end);
        let mut st = self.lock();
        let mut overlapped = false;
        for ((a, b), o) in st.changing.iter_mut() {
            if *a < end && first < *b {
                *o = true;
                overlapped = true;
            }
        }
        st.changing.push(((first, end), overlapped));
        st.drop_range(first, end);
        Change { cache: self, range: (first, end), keep: Vec::new() }
    }

    /// Forget everything (the writer lease was lost: someone else may write the volume).
    pub fn clear(&self) {
        let mut st = self.lock();
        st.map.clear();
        st.clock.clear();
        st.bytes = 0;
        for f in st.fills.values_mut() {
            f.1 = true;
        }
    }
}

impl Fill<'_> {
    /// The chunk's content as read from the volume.
    pub fn finish(mut self, data: Bytes) {
        self.done = true;
        let mut st = self.cache.lock();
        let poisoned = Self::leave(&mut st, self.chunk);
        if !poisoned && data.len() as u64 <= self.cache.bytes_max {
            st.insert(self.chunk, data, self.cache.bytes_max);
        }
    }

    /// Unregister; whether the fill was poisoned.
    fn leave(st: &mut State, chunk: u64) -> bool {
        let f = st.fills.get_mut(&chunk).expect("a fill under way is registered");
        let poisoned = f.1;
        f.0 -= 1;
        if f.0 == 0 {
            st.fills.remove(&chunk);
        }
        poisoned
    }
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.cache.lock();
            Self::leave(&mut st, self.chunk);
        }
    }
}

impl Change<'_> {
    /// The change succeeded and wrote `data` as the whole of `chunk` (within its range): keep it
    /// as the chunk's content, unless another change of these chunks overlapped this one (which
    /// of them the volume shows last is then not known here).
    pub fn keep(&mut self, chunk: u64, data: Bytes) {
        assert!((self.range.0..self.range.1).contains(&chunk));
        self.keep.push((chunk, data));
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        let i = st.changing.iter().position(|(r, _)| *r == self.range).expect("a change under way is registered");
        let (_, overlapped) = st.changing.swap_remove(i);
        // Nothing could be filled meanwhile; dropping again also covers a change that failed
        // half-way (its chunks hold an unknown mix now, read afresh from the volume).
        st.drop_range(self.range.0, self.range.1);
        if !overlapped {
            // (A change that started after this one and is still under way marked it.)
            for (c, d) in std::mem::take(&mut self.keep) {
                if d.len() as u64 <= self.cache.bytes_max {
                    st.insert(c, d, self.cache.bytes_max);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(v: u8) -> Bytes {
        Bytes::from(vec![v; 100])
    }

    #[test]
    fn a_fill_is_kept_and_a_change_drops_it() {
        let c = CleanCache::new(1000);
        assert!(c.get(3).is_none());
        c.begin_fill(3).unwrap().finish(chunk(1));
        assert_eq!(c.get(3).unwrap(), chunk(1));
        drop(c.begin_change(2, 4));
        assert!(c.get(3).is_none());
        assert_eq!(c.bytes(), 0);
        assert_eq!(c.hits_misses(), (1, 2));
    }

    #[test]
    fn a_fill_overlapping_a_change_is_not_kept() {
        let c = CleanCache::new(1000);
        // The change starts during the fill: what the fill read may predate it.
        let f = c.begin_fill(5).unwrap();
        let ch = c.begin_change(5, 6);
        f.finish(chunk(1));
        assert!(c.get(5).is_none());
        // While the change is under way the chunk is not filled at all.
        assert!(c.begin_fill(5).is_none());
        // Chunks outside the change are.
        c.begin_fill(6).unwrap().finish(chunk(2));
        drop(ch);
        // The change started and finished during this fill: not kept either.
        let f = c.begin_fill(5).unwrap();
        drop(c.begin_change(0, 10));
        f.finish(chunk(3));
        assert!(c.get(5).is_none());
        assert!(c.get(6).is_none(), "the second change dropped chunk 6");
        // After the change, a fresh fill is kept.
        c.begin_fill(5).unwrap().finish(chunk(4));
        assert_eq!(c.get(5).unwrap(), chunk(4));
    }

    #[test]
    fn a_poisoned_fill_spoils_concurrent_fills_of_the_chunk_only_until_they_end() {
        let c = CleanCache::new(1000);
        let a = c.begin_fill(1).unwrap();
        drop(c.begin_change(1, 2));
        let b = c.begin_fill(1).unwrap();
        b.finish(chunk(1));
        a.finish(chunk(1));
        assert!(c.get(1).is_none(), "conservative while an older fill of the chunk was under way");
        c.begin_fill(1).unwrap().finish(chunk(2));
        assert_eq!(c.get(1).unwrap(), chunk(2));
        // An abandoned fill unregisters.
        drop(c.begin_fill(7).unwrap());
        c.begin_fill(7).unwrap().finish(chunk(7));
        assert_eq!(c.get(7).unwrap(), chunk(7));
    }

    #[test]
    fn the_bound_holds_and_referenced_chunks_get_a_second_round() {
        let c = CleanCache::new(1000);
        for i in 0..10 {
            c.begin_fill(i).unwrap().finish(chunk(i as u8));
        }
        assert_eq!(c.bytes(), 1000);
        assert!(c.get(0).is_some());
        c.begin_fill(10).unwrap().finish(chunk(10));
        assert_eq!(c.bytes(), 1000);
        assert!(c.get(0).is_some(), "chunk 0 was referenced: chunk 1 goes first");
        assert!(c.get(1).is_none());
        // A chunk larger than the whole cache is never held.
        c.begin_fill(99).unwrap().finish(Bytes::from(vec![0u8; 1001]));
        assert!(c.get(99).is_none());
        assert!(c.bytes() <= 1000);
        // Many invalidations and refills keep the queue bounded.
        for r in 0..10_000u64 {
            drop(c.begin_change(r % 10, r % 10 + 1));
            c.begin_fill(r % 10).unwrap().finish(chunk(1));
        }
        let st = c.lock();
        assert!(st.clock.len() <= 2 * st.map.len() + 65, "{} queue items for {} chunks", st.clock.len(), st.map.len());
        assert_eq!(st.bytes, st.map.values().map(|e| e.data.len() as u64).sum::<u64>());
    }

    #[test]
    fn a_wide_change_drops_every_chunk_in_it_and_clear_drops_all() {
        let c = CleanCache::new(10_000);
        for i in [0, 5, 1_000_000] {
            c.begin_fill(i).unwrap().finish(chunk(1));
        }
        drop(c.begin_change(1, u64::MAX / 2));
        assert!(c.get(0).is_some());
        assert!(c.get(5).is_none() && c.get(1_000_000).is_none());
        let f = c.begin_fill(9).unwrap();
        c.clear();
        f.finish(chunk(9));
        assert!(c.get(0).is_none() && c.get(9).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_change_keeps_what_it_wrote_unless_another_overlapped_it() {
        let c = CleanCache::new(10_000);
        let mut ch = c.begin_change(0, 2);
        ch.keep(0, chunk(1));
        assert!(c.get(0).is_none(), "not before the change returned");
        drop(ch);
        assert_eq!(c.get(0).unwrap(), chunk(1));
        // Two changes of chunk 3 under way at once: neither knows which landed last.
        let mut a = c.begin_change(3, 4);
        let mut b = c.begin_change(2, 5);
        a.keep(3, chunk(2));
        b.keep(3, chunk(3));
        drop(b);
        assert!(c.get(3).is_none());
        drop(a);
        assert!(c.get(3).is_none());
        // A change that started after this one ended is no conflict.
        let mut a = c.begin_change(3, 4);
        a.keep(3, chunk(4));
        drop(a);
        assert_eq!(c.get(3).unwrap(), chunk(4));
        // A fill under way across a kept change is poisoned (it may have read the old bytes).
        let f = c.begin_fill(6).unwrap();
        let mut a = c.begin_change(6, 7);
        a.keep(6, chunk(5));
        drop(a);
        f.finish(chunk(0));
        assert_eq!(c.get(6).unwrap(), chunk(5));
    }

    /// Writers and readers race over a small volume in memory, the way `VolumeIo` brackets
    /// them; afterwards every cached chunk equals the volume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_fills_and_changes_never_leave_stale_chunks() {
        use std::sync::Arc;
        const CHUNKS: u64 = 8;
        let vol = Arc::new(Mutex::new(vec![0u8; CHUNKS as usize]));
        let cache = Arc::new(CleanCache::new(4 * 100));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (vol, cache) = (vol.clone(), cache.clone());
            tasks.push(tokio::spawn(async move {
                let mut x = t * 7919 + 1;
                for i in 0..2000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let c = (x >> 33) % CHUNKS;
                    if t % 2 == 0 {
                        // Changes of one or two chunks, some keeping what they wrote.
                        let end = (c + 1 + (x >> 40) % 2).min(CHUNKS);
                        let mut ch = cache.begin_change(c, end);
                        tokio::task::yield_now().await;
                        let v = (t * 100 + i % 100) as u8;
                        {
                            let mut vol = vol.lock().unwrap();
                            for k in c..end {
                                vol[k as usize] = v;
                            }
                        }
                        if (x >> 50) % 2 == 0 {
                            ch.keep(c, Bytes::from(vec![v; 100]));
                        }
                        tokio::task::yield_now().await;
                        drop(ch);
                    } else {
                        // Invariant: a cached chunk equals the volume at every instant.
                        let hit = {
                            let v = vol.lock().unwrap();
                            let hit = cache.get(c);
                            if let Some(d) = &hit {
                                assert_eq!(d[0], v[c as usize], "chunk {c} is stale");
                            }
                            hit.is_some()
                        };
                        if !hit {
                            let f = cache.begin_fill(c);
                            tokio::task::yield_now().await;
                            let v = vol.lock().unwrap()[c as usize];
                            for _ in 0..(x >> 20) % 4 {
                                tokio::task::yield_now().await;
                            }
                            if let Some(f) = f {
                                f.finish(Bytes::from(vec![v; 100]));
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let vol = vol.lock().unwrap();
        for c in 0..CHUNKS {
            if let Some(d) = cache.get(c) {
                assert_eq!(d[0], vol[c as usize], "chunk {c} is stale");
            }
        }
    }
}
