//! Receive buffers for large payloads in memory of their own, mapped in whole 2 MiB pages and
//! advised for transparent huge pages before anything touches it, kept and used again.
//!
//! Why: an engine writes a received extent to disk with `O_DIRECT` from where it arrived. From
//! ordinary 4 KiB pages, a 1 MiB write needs more scatter-gather segments than one request of
//! this machine's virtual disk takes (254), so it reached the device as two requests; from a
//! huge page the bytes are physically contiguous and it is one. fio's direct 1 MiB writes
//! (16 jobs, `fdatasync` each) ran 1.7x as fast from huge pages here. The memory is mapped
//! directly, not taken from the allocator: allocator memory touched before (as 4 KiB pages)
//! stays in 4 KiB pages whatever it is advised later.
//!
//! Huge pages are granted only if the process allows them for advised memory
//! ([`allow_advised_huge_pages`], called by the server at start); without them the buffers
//! still work, in ordinary pages. Kept and lent by the same [`Pool`] as `buffer_pool`'s vectors.

use bytes::buf::UninitSlice;
use bytes::BufMut;
use std::ptr::NonNull;
use crate::buffer_pool::{Pool, PooledBuf, KEPT_BYTES_MAX};
use std::sync::{Arc, LazyLock};

/// Transparent huge pages on x86-64 and aarch64 with 4 KiB base pages.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// A mapping of `cap` bytes (a multiple of `HUGE_PAGE_BYTES`, starting on such a boundary), of
/// which the first `len` are written.
pub struct HugeBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its mapping; `&HugeBuf` only reads the written prefix.
unsafe impl Send for HugeBuf {}
// SAFETY: as above.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    /// A new mapping with room for `bytes` (`None` if the system refuses the memory).
    fn map(bytes: usize) -> Option<HugeBuf> {
        let cap = bytes.max(1).div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
        let span = cap + HUGE_PAGE_BYTES;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return None;
        }
        let base = p as usize;
        let head = base.next_multiple_of(HUGE_PAGE_BYTES) - base;
        let tail = span - head - cap;
        // SAFETY: unmapping the unaligned head and tail of the mapping made above (page-aligned
        // lengths: `span`, `cap` and the alignment are multiples of the page size); the
        // aligned middle stays mapped and is owned by the returned buffer.
        unsafe {
            if head > 0 {
                libc::munmap(p, head);
            }
            if tail > 0 {
                libc::munmap((base + head + cap) as *mut libc::c_void, tail);
            }
        }
        advise_fresh((base + head) as *const u8, cap);
        Some(HugeBuf { ptr: NonNull::new((base + head) as *mut u8)?, cap, len: 0 })
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the mapping were written (`advance_mut` counts only
        // what the writer initialised).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.cap);
        }
    }
}

// SAFETY: `chunk_mut` hands out only the unwritten rest of the mapping, and `advance_mut` moves
// `len` by at most what remains (the caller promises those bytes were written).
unsafe impl BufMut for HugeBuf {
    fn remaining_mut(&self) -> usize {
        self.cap - self.len
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.cap - self.len, "advanced past the buffer's end");
        self.len += cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        // SAFETY: `len..cap` lies within the mapping this buffer owns exclusively.
        unsafe { UninitSlice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), self.cap - self.len) }
    }
}

impl PooledBuf for HugeBuf {
    fn capacity(&self) -> usize {
        self.cap
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    fn as_bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Advise the whole 2 MiB pages inside a fresh allocation (`len` bytes at `ptr`, nothing of it
/// touched yet) for transparent huge pages. Allocator memory that was touched before keeps
/// its 4 KiB pages, so this is a hint that works only for memory the allocator got fresh from
/// the system, as large allocations mostly are.
pub fn advise_fresh(ptr: *const u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE_BYTES);
    let end = (ptr as usize + len) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
    if end > start {
        // SAFETY: advice on whole pages inside an allocation the caller owns; it changes
        // neither the contents nor the mapping's lifetime. Failure costs speed only.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

pub type HugeBufferPool = Pool<HugeBuf>;

/// The pool received payloads use (one per process).
pub static RECEIVE: LazyLock<Arc<HugeBufferPool>> = LazyLock::new(|| Arc::new(HugeBufferPool::new(KEPT_BYTES_MAX)));

impl HugeBufferPool {
    /// An empty buffer with room for at least `bytes`: the smallest kept one that fits, else a
    /// new mapping (`None` if the system refuses it).
    pub fn take(&self, bytes: usize) -> Option<HugeBuf> {
        self.take_kept(bytes).or_else(|| HugeBuf::map(bytes))
    }
}

/// Let memory advised with `MADV_HUGEPAGE` get transparent huge pages in this process, and no
/// other memory. The allocator (mimalloc, built `no_thp`) turns huge pages off for the whole
/// process, because zeroing a fresh 2 MiB page inside whichever request first touched it cost
/// ~10% of an engine's CPU under small writes; receive buffers are kept and used again, so they
/// pay that once. On Linux 6.18 and later huge pages stay off except where advised; on older
/// kernels they are turned back on only if the system's mode grants them to advised memory
/// alone (`madvise`), never where it would grant them to every allocation (`always`). Returns
/// whether advised memory may now get huge pages.
pub fn allow_advised_huge_pages() -> bool {
    const PR_THP_DISABLE_EXCEPT_ADVISED: libc::c_ulong = 1 << 1;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, PR_THP_DISABLE_EXCEPT_ADVISED, 0 as libc::c_ulong, 0 as libc::c_ulong) } == 0 {
        return true;
    }
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !mode.contains("[madvise]") {
        return false;
    }
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_huge_page_aligned_written_through_bufmut_and_come_back_when_dropped() {
        let pool = Arc::new(HugeBufferPool::new(7 << 20));
        let mut b = pool.take(1 << 20).expect("memory");
        assert_eq!(b.capacity(), HUGE_PAGE_BYTES);
        assert_eq!(b.chunk_mut().as_mut_ptr() as usize % HUGE_PAGE_BYTES, 0, "not on a huge page boundary");
        let ptr = b.chunk_mut().as_mut_ptr();
        b.put_slice(b"rows");
        b.put_bytes(7, 5000);
        assert_eq!(b.as_slice().len(), 5004);
        let bytes = pool.lend(b, 0);
        assert_eq!(&bytes[..4], b"rows");
        assert!(bytes[4..].iter().all(|x| *x == 7));
        let clone = bytes.slice(4..10);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a clone still holds it");
        drop(clone);
        assert_eq!(pool.kept(), 1);
        let mut again = pool.take(4096).unwrap();
        assert_eq!((again.chunk_mut().as_mut_ptr(), again.as_slice().len()), (ptr, 0), "the same memory, emptied");
        // A larger request gets a new, larger mapping; the pool keeps no more than its limit.
        let big = pool.take(5 << 20).unwrap();
        assert_eq!(big.capacity(), 6 << 20);
        drop(pool.lend(big, 0));
        drop(pool.lend(again, 0));
        assert_eq!(pool.kept(), 1, "7 MiB kept at most: the 6 MiB one, not the 2 MiB one after it");
    }
}
