//! Clean file data cached in a mount, in blocks of [`CACHE_BLOCK_BYTES`], least recently used
//! out first.
//!
//! A cached block holds the file's current bytes as this mount knows them: writes of this
//! mount patch cached blocks as they are buffered, truncates and hole punches drop the blocks
//! they touch, and an `open` that finds the file's data version moved (another mount wrote)
//! drops the whole file, which keeps close-to-open consistency.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Mutex;

pub const CACHE_BLOCK_BYTES: u64 = 64 << 10;

struct Entry {
    /// Often a slice of a larger store read (no copy); a write here makes it its own buffer.
    data: Bytes,
    used: u64,
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
        g.tick += 1;
        let used = g.tick;
        g.blocks.insert((ino, block), Entry { data, used });
        if g.blocks.len() > self.capacity_blocks {
            // Evict the least recently used eighth at once: finding the oldest is a scan of
            // the whole cache, which once per insert cost a sequential reader 3% of its CPU.
            let mut ages: Vec<u64> = g.blocks.values().map(|e| e.used).collect();
            let evict = ((self.capacity_blocks / 8).max(1) - 1).min(ages.len() - 1);
            let (_, cutoff, _) = ages.select_nth_unstable(evict);
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
            }
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
}
