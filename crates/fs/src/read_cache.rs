//! File data cached in a mount, in blocks of [`CACHE_BLOCK_BYTES`], least recently used out
//! first: blocks read from the store, read ahead, and written here (the write-back buffer's
//! extents as they leave for the store).
//!
//! A cached block holds the file's current bytes as this mount knows them: writes of this
//! mount patch cached blocks as they are buffered, hole punches zero them, truncates drop the
//! blocks past the new size, and an `open` that finds the file's data version moved (another
//! mount wrote) drops the whole file, which keeps close-to-open consistency. A block put as
//! part of a run (a larger buffer: a written extent, a store read) remembers it while unchanged,
//! so a read inside the run is one slice of it instead of a copy of its blocks.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;

pub const CACHE_BLOCK_BYTES: u64 = 64 << 10;

struct Entry {
    /// Often a slice of a larger store read (no copy); a write here makes it its own buffer.
    data: Bytes,
    used: u64,
    /// The larger buffer `data` is a slice of, and the file offset where it starts, while
    /// `data` is that slice unchanged: a read inside it is answered with one slice of it
    /// instead of a copy of its blocks.
    run: Option<(Bytes, u64)>,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<(u64, u64), Entry>,
    tick: u64,
}

pub struct ReadCache {
    inner: Mutex<Inner>,
    capacity_blocks: usize,
}

impl ReadCache {
    pub fn new(capacity_bytes: u64) -> ReadCache {
        ReadCache { inner: Mutex::default(), capacity_blocks: (capacity_bytes / CACHE_BLOCK_BYTES) as usize }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.capacity_blocks > 0
    }

    pub fn get(&self, ino: u64, block: u64) -> Option<Bytes> {
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        g.blocks.get_mut(&(ino, block)).map(|e| {
            e.used = tick;
            e.data.clone()
        })
    }

    /// Cache a whole block (shared with the caller: no copy).
    pub fn put(&self, ino: u64, block: u64, data: Bytes) {
        assert_eq!(data.len() as u64, CACHE_BLOCK_BYTES, "cache blocks are whole");
        if !self.enabled() {
            return;
        }
        let mut g = self.lock();
        Self::insert(&mut g, ino, block, Entry { data, used: 0, run: None });
        self.evict(&mut g);
    }

    /// Cache the whole blocks inside `run`, the file's bytes from `offset` (slices, no copy).
    pub fn put_run(&self, ino: u64, offset: u64, run: &Bytes) {
        if !self.enabled() {
            return;
        }
        let b = CACHE_BLOCK_BYTES;
        let end = offset + run.len() as u64;
        let mut g = self.lock();
        for k in offset.div_ceil(b)..end / b {
            let at = (k * b - offset) as usize;
            Self::insert(&mut g, ino, k, Entry { data: run.slice(at..at + b as usize), used: 0, run: Some((run.clone(), offset)) });
        }
        self.evict(&mut g);
    }

    /// `[offset, offset + len)` as one slice when every block it touches is cached as an
    /// unchanged slice of the same run.
    pub fn get_span(&self, ino: u64, offset: u64, len: u64) -> Option<Bytes> {
        if len == 0 {
            return None;
        }
        let b = CACHE_BLOCK_BYTES;
        let (first, last) = (offset / b, (offset + len - 1) / b);
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        let (run, start) = g.blocks.get(&(ino, first))?.run.clone()?;
        if offset < start || offset + len > start + run.len() as u64 {
            return None;
        }
        for k in first..=last {
            let e = g.blocks.get_mut(&(ino, k))?;
            match &e.run {
                Some((r, s)) if *s == start && r.as_ptr() == run.as_ptr() && r.len() == run.len() => e.used = tick,
                _ => return None,
            }
        }
        Some(run.slice((offset - start) as usize..(offset - start + len) as usize))
    }

    fn insert(g: &mut Inner, ino: u64, block: u64, mut e: Entry) {
        g.tick += 1;
        e.used = g.tick;
        g.blocks.insert((ino, block), e);
    }

    fn evict(&self, g: &mut Inner) {
        if g.blocks.len() > self.capacity_blocks {
            // Evict the least recently used eighth at once: finding the oldest is a scan of
            // the whole cache, which once per insert cost a sequential reader 3% of its CPU.
            // (Plus what a run inserted over the capacity.)
            let mut ages: Vec<u64> = g.blocks.values().map(|e| e.used).collect();
            let evict = (ages.len() - self.capacity_blocks + self.capacity_blocks / 8).clamp(1, ages.len());
            let (_, cutoff, _) = ages.select_nth_unstable(evict - 1);
            let cutoff = *cutoff;
            g.blocks.retain(|_, e| e.used > cutoff);
        }
    }

    /// Copy `data` (bytes of the file from `offset`) into the blocks that are cached.
    pub fn patch(&self, ino: u64, offset: u64, data: &[u8]) {
        if data.is_empty() || !self.enabled() {
            return;
        }
        let end = offset + data.len() as u64;
        let mut g = self.lock();
        for b in offset / CACHE_BLOCK_BYTES..end.div_ceil(CACHE_BLOCK_BYTES) {
            if let Some(e) = g.blocks.get_mut(&(ino, b)) {
                let bs = b * CACHE_BLOCK_BYTES;
                let (lo, hi) = (offset.max(bs), end.min(bs + CACHE_BLOCK_BYTES));
                // Copies the block only while it is shared (a slice of a store read, or
                // held by a reader); a block patched before is written in place.
                let mut own = Vec::from(std::mem::take(&mut e.data));
                own[(lo - bs) as usize..(hi - bs) as usize].copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
                e.data = Bytes::from(own);
                e.run = None;
            }
        }
    }

    /// Zero `[offset, offset + len)` in the blocks that are cached (a hole punched there).
    pub fn zero_range(&self, ino: u64, offset: u64, len: u64) {
        let b = CACHE_BLOCK_BYTES;
        let end = offset.saturating_add(len);
        let zeros = [0u8; CACHE_BLOCK_BYTES as usize];
        let mut at = offset;
        while at < end {
            let n = (b - at % b).min(end - at);
            self.patch(ino, at, &zeros[..n as usize]);
            at += n;
        }
    }

    /// Forget the blocks overlapping `[offset, offset + len)`.
    pub fn drop_range(&self, ino: u64, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let (first, last) = (offset / CACHE_BLOCK_BYTES, end.div_ceil(CACHE_BLOCK_BYTES));
        let mut g = self.lock();
        if last - first > g.blocks.len() as u64 {
            g.blocks.retain(|(i, b), _| *i != ino || *b < first || *b >= last);
        } else {
            for b in first..last {
                g.blocks.remove(&(ino, b));
            }
        }
    }

    pub fn drop_file(&self, ino: u64) {
        self.lock().blocks.retain(|(i, _), _| *i != ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_drops_and_evicts_least_recently_used() {
        let c = ReadCache::new(2 * CACHE_BLOCK_BYTES);
        let b = CACHE_BLOCK_BYTES as usize;
        c.put(1, 0, Bytes::from(vec![0; b]));
        c.put(1, 1, Bytes::from(vec![0; b]));
        c.patch(1, CACHE_BLOCK_BYTES - 2, b"abcd");
        assert_eq!(&c.get(1, 0).unwrap()[b - 2..], b"ab");
        assert_eq!(&c.get(1, 1).unwrap()[..2], b"cd");
        c.get(1, 0);
        c.put(2, 0, Bytes::from(vec![7; b]));
        assert!(c.get(1, 1).is_none(), "the least recently used block went");
        assert!(c.get(1, 0).is_some());
        c.drop_range(1, 10, 1);
        assert!(c.get(1, 0).is_none());
        c.drop_file(2);
        assert!(c.get(2, 0).is_none());
        c.drop_range(3, 0, u64::MAX);
    }

    #[test]
    fn a_read_inside_one_unchanged_run_is_one_slice_of_it() {
        let b = CACHE_BLOCK_BYTES;
        let c = ReadCache::new(16 * b);
        let run = Bytes::from((0..4 * b + 100).map(|i| i as u8).collect::<Vec<u8>>());
        // From offset 100: blocks 1..=4 are whole inside the run, block 0 is not.
        c.put_run(1, 100, &run);
        assert!(c.get(1, 0).is_none());
        assert_eq!(&c.get(1, 1).unwrap()[..], &run[(b - 100) as usize..(2 * b - 100) as usize]);
        let span = c.get_span(1, b + 10, 2 * b).unwrap();
        assert_eq!(&span[..], &run[(b + 10 - 100) as usize..(3 * b + 10 - 100) as usize]);
        assert_eq!(span.as_ptr(), run[(b + 10 - 100) as usize..].as_ptr(), "a slice, not a copy");
        // Past the run's end, or over a patched block: no span.
        assert!(c.get_span(1, 4 * b, b).is_none());
        c.patch(1, 2 * b, b"x");
        assert!(c.get_span(1, b, 2 * b).is_none());
        assert_eq!(c.get(1, 2).unwrap()[0], b'x');
        assert!(c.get_span(1, 3 * b, b).is_some());
        // A run larger than the whole cache keeps only what fits.
        c.put_run(2, 0, &Bytes::from(vec![1u8; 32 * b as usize]));
        assert!(c.lock().blocks.len() <= 16);
    }
}
