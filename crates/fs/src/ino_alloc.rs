//! 64-bit inode numbers, handed out from batches reserved in one round trip.
//!
//! The source is the container's object-id allocator in the management service (so an inode
//! number is also the sequence number of the file's data object), or a local counter in
//! tests. Numbers of a batch a mount never used are simply skipped: uniqueness matters,
//! density does not.

use crate::fs_error::FsError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Inode numbers reserved per round trip to the source.
pub const INO_BATCH: u64 = 1024;

/// Reserves `count` consecutive numbers and returns the first.
pub trait IdSource: Send + Sync + 'static {
    fn reserve(&self, count: u64) -> Pin<Box<dyn Future<Output = Result<u64, FsError>> + Send + '_>>;
}

struct Counter(AtomicU64);

impl IdSource for Counter {
    fn reserve(&self, count: u64) -> Pin<Box<dyn Future<Output = Result<u64, FsError>> + Send + '_>> {
        let first = self.0.fetch_add(count, Ordering::Relaxed);
        Box::pin(async move { Ok(first) })
    }
}

#[derive(Clone)]
pub struct InoAlloc {
    source: Arc<dyn IdSource>,
    batch: u64,
    /// Next unused number and the end of the reserved range.
    range: Arc<Mutex<(u64, u64)>>,
}

impl InoAlloc {
    pub fn new(source: Arc<dyn IdSource>, batch: u64) -> InoAlloc {
        assert!(batch > 0);
        InoAlloc { source, batch, range: Arc::new(Mutex::new((0, 0))) }
    }

    /// A process-local counter starting at 2 (tests and in-memory volumes).
    pub fn counter(batch: u64) -> InoAlloc {
        InoAlloc::new(Arc::new(Counter(AtomicU64::new(2))), batch)
    }

    pub async fn next(&self) -> Result<u64, FsError> {
        let mut r = self.range.lock().await;
        if r.0 >= r.1 {
            let first = self.source.reserve(self.batch).await?;
            *r = (first, first + self.batch);
        }
        // FUSE reserves 0, and 1 names the root there: neither is ever a (non-root) inode.
        while r.0 <= 1 && r.0 < r.1 {
            r.0 += 1;
        }
        if r.0 >= r.1 {
            let first = self.source.reserve(self.batch).await?.max(2);
            *r = (first, first + self.batch);
        }
        let ino = r.0;
        r.0 += 1;
        Ok(ino)
    }
}
