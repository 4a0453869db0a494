//! Recycled buffers for large WRITE payloads. A payload becomes the write-back cache's copy of
//! the data as it is (no copy), and lives until a rewrite replaces it or its write-back ends;
//! a fresh buffer for every request made the kernel fault in and zero new pages for each one
//! (perf, 1 MiB sequential writes: a third of the server's CPU in `clear_page_erms` under
//! `recv`). Buffers come back here when the last `Bytes` pointing into them drops, and are
//! handed out again without zeroing: reading the socket fills them.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Payloads smaller than this come from the allocator (its small pages are reused anyway).
pub const POOLED_BYTES_MIN: usize = 64 << 10;
/// Free buffers kept, in bytes; more are released to the allocator.
pub const POOL_FREE_BYTES_MAX: usize = 256 << 20;

/// Free buffers by size class (capacities are powers of two from [`POOLED_BYTES_MIN`]).
#[derive(Default)]
pub struct PayloadPool {
    free: Mutex<(Vec<Vec<Vec<u8>>>, usize)>,
    /// Buffers handed out again, new ones allocated, and ones given back past the bound.
    reused: AtomicU64,
    allocated: AtomicU64,
    dropped: AtomicU64,
}

fn class_of(capacity: usize) -> usize {
    (capacity.max(POOLED_BYTES_MIN).next_power_of_two() / POOLED_BYTES_MIN).trailing_zeros() as usize
}

/// The process's pool, shared by every connection (buffers outlive the connection that
/// filled them, in the write-back cache).
pub fn shared() -> &'static Arc<PayloadPool> {
    static POOL: std::sync::OnceLock<Arc<PayloadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(PayloadPool::new)
}

impl PayloadPool {
    pub fn new() -> Arc<PayloadPool> {
        Arc::new(PayloadPool::default())
    }

    /// An empty buffer with room for `len` bytes (its contents are whatever it held before).
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len < POOLED_BYTES_MIN {
            return Vec::with_capacity(len);
        }
        let class = class_of(len);
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut v) = g.0.get_mut(class).and_then(Vec::pop) {
            g.1 -= v.capacity();
            self.reused.fetch_add(1, Ordering::Relaxed);
            v.clear();
            debug_assert!(v.capacity() >= len);
            return v;
        }
        drop(g);
        self.allocated.fetch_add(1, Ordering::Relaxed);
        Vec::with_capacity(len.next_power_of_two())
    }

    fn give_back(&self, v: Vec<u8>) {
        let cap = v.capacity();
        // Only buffers of an exact class size go back (they came from `take`).
        if cap < POOLED_BYTES_MIN || !cap.is_power_of_two() {
            return;
        }
        let class = class_of(cap);
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if g.1 + cap > POOL_FREE_BYTES_MAX {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if g.0.len() <= class {
            g.0.resize_with(class + 1, Vec::new);
        }
        g.0[class].push(v);
        g.1 += cap;
    }

    /// Buffers handed out again, newly allocated, and released past the bound, so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.reused.load(Ordering::Relaxed), self.allocated.load(Ordering::Relaxed), self.dropped.load(Ordering::Relaxed))
    }

    /// Free bytes held for reuse.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Share a filled buffer; it comes back to the pool when the last `Bytes` of it drops.
    pub fn share(self: &Arc<Self>, v: Vec<u8>) -> Bytes {
        if v.capacity() < POOLED_BYTES_MIN {
            return Bytes::from(v);
        }
        Bytes::from_owner(Pooled { v: Some(v), pool: self.clone() })
    }
}

struct Pooled {
    v: Option<Vec<u8>>,
    pool: Arc<PayloadPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.v.as_deref().unwrap_or_default()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(v) = self.v.take() {
            self.pool.give_back(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_slice_drops_and_are_bounded() {
        let pool = PayloadPool::new();
        let mut v = pool.take(1 << 20);
        v.extend_from_slice(&vec![7u8; 1 << 20]);
        let ptr = v.as_ptr();
        let b = pool.share(v);
        let half = b.slice(1 << 19..);
        drop(b);
        assert_eq!(pool.free_bytes(), 0, "a slice still uses the buffer");
        assert!(half.iter().all(|x| *x == 7));
        drop(half);
        assert_eq!(pool.free_bytes(), 1 << 20);
        let again = pool.take(600 << 10);
        assert_eq!(again.as_ptr(), ptr, "the same buffer is handed out again");
        assert!(again.is_empty() && again.capacity() >= 600 << 10);
        assert_eq!(pool.free_bytes(), 0);
        // Small payloads are the allocator's; the free list stays bounded.
        assert_eq!(pool.take(4096).capacity(), 4096);
        let many: Vec<Bytes> = (0..(POOL_FREE_BYTES_MAX >> 20) + 8).map(|_| pool.share(pool.take(1 << 20))).collect();
        drop(many);
        assert_eq!(pool.free_bytes(), POOL_FREE_BYTES_MAX);
    }
}
