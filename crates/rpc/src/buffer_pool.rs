//! Large message buffers used again instead of freed.
//!
//! A large payload (an import of up to 16 MiB, a 1 MiB write) in freshly allocated memory
//! made the kernel zero every page on first touch: in a rebuild profile that was ~40% of the
//! engines' CPU, more than receiving, checksumming and writing the bytes. The import messages
//! data movement builds take their memory from a [`BufferPool`] and give it back when the last
//! `Bytes` clone is dropped (received payloads of `POOLED_FROM_BYTES` or more use the
//! huge-page pool of `huge_buffers` instead).
//! Capacities are whole multiples of `CLASS_BYTES`; a request gets the smallest kept buffer that
//! fits. The pool keeps at most `KEPT_BYTES_MAX` of idle buffers (so a process that moved data
//! once keeps at most that resident).

use bytes::Bytes;
use std::sync::{Arc, Mutex};

/// Payloads from this size on are received into pooled buffers.
pub const POOLED_FROM_BYTES: usize = 1 << 20;
/// Bytes of idle buffers a pool keeps by default.
pub(crate) const KEPT_BYTES_MAX: usize = 96 << 20;
/// Capacities are rounded up to this.
const CLASS_BYTES: usize = 64 << 10;

/// Memory a [`Pool`] keeps and lends: plain vectors here, huge-page mappings in `huge_buffers`.
pub trait PooledBuf: Send + Sync + 'static {
    fn capacity(&self) -> usize;
    /// Forget the contents (the memory stays).
    fn clear(&mut self);
    fn as_bytes(&self) -> &[u8];
}

impl PooledBuf for Vec<u8> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }

    fn clear(&mut self) {
        Vec::clear(self)
    }

    fn as_bytes(&self) -> &[u8] {
        self
    }
}

/// Idle buffers kept for use again, at most `kept_bytes_max` of them; a request gets the
/// smallest kept one that fits.
pub struct Pool<B: PooledBuf> {
    free: Mutex<Vec<B>>,
    kept_bytes_max: usize,
}

pub type BufferPool = Pool<Vec<u8>>;

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool::new(KEPT_BYTES_MAX)
    }
}

/// A buffer lent out as message bytes (`buf[start..]`); back to the pool when dropped.
struct Lent<B: PooledBuf> {
    buf: Option<B>,
    start: usize,
    pool: Arc<Pool<B>>,
}

impl<B: PooledBuf> AsRef<[u8]> for Lent<B> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.as_bytes()[self.start..])
    }
}

impl<B: PooledBuf> Drop for Lent<B> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

impl<B: PooledBuf> Pool<B> {
    /// A pool that keeps at most `kept_bytes_max` of idle buffers.
    pub fn new(kept_bytes_max: usize) -> Pool<B> {
        Pool { free: Mutex::new(Vec::new()), kept_bytes_max }
    }

    /// The smallest kept buffer with room for `bytes`, emptied.
    pub(crate) fn take_kept(&self, bytes: usize) -> Option<B> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let best = free.iter().enumerate().filter(|(_, b)| b.capacity() >= bytes).min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
        let mut b = free.swap_remove(best?);
        b.clear();
        Some(b)
    }

    fn put(&self, buf: B) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let kept: usize = free.iter().map(PooledBuf::capacity).sum();
        if buf.capacity() > 0 && kept + buf.capacity() <= self.kept_bytes_max {
            free.push(buf);
        }
    }

    /// `buf[start..]` as message bytes that return `buf` to this pool once dropped.
    pub fn lend(self: &Arc<Self>, buf: B, start: usize) -> Bytes {
        assert!(start <= buf.as_bytes().len(), "lent range starts past the buffer");
        Bytes::from_owner(Lent { buf: Some(buf), start, pool: self.clone() })
    }

    /// Drop every kept buffer.
    pub fn clear(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free.lock().unwrap().len()
    }
}

impl BufferPool {
    /// An empty buffer with room for at least `bytes` (the smallest kept one that fits, else
    /// a new one; capacities are whole multiples of `CLASS_BYTES`). A new one's whole 2 MiB
    /// pages are advised for huge pages: extents are read into these buffers with `O_DIRECT`,
    /// and from 4 KiB pages a 1 MiB read reaches this machine's disk as two requests.
    pub fn take(&self, bytes: usize) -> Vec<u8> {
        let class = bytes.div_ceil(CLASS_BYTES) * CLASS_BYTES;
        self.take_kept(class).unwrap_or_else(|| {
            let v = Vec::with_capacity(class);
            crate::huge_buffers::advise_fresh(v.as_ptr(), v.capacity());
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_buffer_comes_back_once_its_last_clone_is_dropped() {
        let pool = Arc::new(BufferPool::default());
        let mut b = pool.take(3 << 20);
        assert!(b.capacity() >= 3 << 20);
        let ptr = b.as_ptr();
        b.extend_from_slice(b"..rows");
        let bytes = pool.lend(b, 2);
        assert_eq!(&bytes[..], b"rows");
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a clone still holds it");
        drop(clone);
        assert_eq!(pool.kept(), 1);
        let small = pool.take(1 << 20);
        assert_eq!((small.as_ptr(), small.len()), (ptr, 0), "the same memory, emptied");
        assert!(pool.take(8 << 20).capacity() >= 8 << 20, "too small a kept buffer is not handed out");
        pool.put(small);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit() {
        let pool = BufferPool::default();
        for _ in 0..(KEPT_BYTES_MAX / (16 << 20)) + 3 {
            pool.put(Vec::with_capacity(16 << 20));
        }
        assert_eq!(pool.kept(), KEPT_BYTES_MAX / (16 << 20));
    }
}
