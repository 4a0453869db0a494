//! 64-bit inode numbers, handed out from batches reserved in one round trip, sorted by the
//! metadata shard they live in (their **home**).
//!
//! The source is the container's object-id allocator in the management service (so an inode
//! number is also the sequence number of the file's data object), or a local counter in
//! tests. A file is created with a number whose home is its directory's home
//! (`Namespace::create`), so the create is a one-shard transaction; a batch spreads evenly
//! over the homes, so the numbers of other homes are kept (up to [`PER_HOME_KEPT_MAX`] each)
//! for later creates elsewhere and the rest skipped: uniqueness matters, density does not
//! (a create in one busy directory uses one number in `homes` of the 64-bit space).

use crate::fs_error::FsError;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Numbers reserved per round trip to the source: about 256 per home with 64 homes, so a
/// create-heavy directory goes to the management service once per ~256 creates.
pub const INO_BATCH: u64 = 16 * 1024;
/// Numbers of one home kept for later (a batch brings `INO_BATCH / homes`); the rest of a
/// batch is skipped. Bounds the allocator's memory to `homes * PER_HOME_KEPT_MAX` numbers.
pub const PER_HOME_KEPT_MAX: usize = 1024;
/// Below this many numbers left in a home, the next batch is reserved in the background, so a
/// create-heavy directory does not wait for the management service every ~256 creates.
pub const PREFETCH_BELOW: usize = 96;
/// Reservations one allocation may make before giving up (a home no number of a batch maps
/// to would otherwise loop forever; with an even hash the first batch always has some).
const RESERVE_ATTEMPTS_MAX: u32 = 16;

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

#[derive(Default)]
struct Pool {
    /// Unused numbers by home.
    by_home: HashMap<u32, Vec<u64>>,
    /// Home the next home-less allocation (a directory) comes from: rotates, so directories
    /// spread over the shards.
    next_home: u32,
    /// First numbers of batches reserved in the background, not yet sorted into homes.
    prefetched: Vec<u64>,
    prefetching: bool,
}

#[derive(Clone)]
pub struct InoAlloc {
    source: Arc<dyn IdSource>,
    batch: u64,
    pool: Arc<Mutex<Pool>>,
}

impl InoAlloc {
    pub fn new(source: Arc<dyn IdSource>, batch: u64) -> InoAlloc {
        assert!(batch > 0);
        InoAlloc { source, batch, pool: Arc::new(Mutex::new(Pool::default())) }
    }

    /// A process-local counter starting at 2 (tests and in-memory volumes).
    pub fn counter(batch: u64) -> InoAlloc {
        InoAlloc::new(Arc::new(Counter(AtomicU64::new(2))), batch)
    }

    /// Reserve one more batch and sort it into homes.
    async fn refill(&self, pool: &mut Pool, home_of: &(dyn Fn(u64) -> u32 + Sync)) -> Result<(), FsError> {
        let first = self.source.reserve(self.batch).await?;
        self.sort_in(pool, first, home_of);
        Ok(())
    }

    fn sort_in(&self, pool: &mut Pool, first: u64, home_of: &(dyn Fn(u64) -> u32 + Sync)) {
        // FUSE reserves 0, and 1 names the root there: neither is ever a (non-root) inode.
        for n in first.max(2)..first.saturating_add(self.batch) {
            let list = pool.by_home.entry(home_of(n)).or_default();
            if list.len() < PER_HOME_KEPT_MAX {
                list.push(n);
            }
        }
    }

    /// Reserve the next batch in the background (one at a time), when a runtime is there.
    fn prefetch(&self, pool: &mut Pool) {
        if pool.prefetching {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        pool.prefetching = true;
        let (source, batch, shared) = (self.source.clone(), self.batch, self.pool.clone());
        rt.spawn(async move {
            let r = source.reserve(batch).await;
            let mut p = shared.lock().await;
            p.prefetching = false;
            match r {
                Ok(first) => p.prefetched.push(first),
                Err(e) => tracing::debug!(error = %e, "background inode number reservation failed; the next create reserves"),
            }
        });
    }

    /// A number whose home is `home` (a file created in a directory of that home).
    pub async fn next_in(&self, home: u32, home_of: &(dyn Fn(u64) -> u32 + Sync)) -> Result<u64, FsError> {
        let mut pool = self.pool.lock().await;
        for first in std::mem::take(&mut pool.prefetched) {
            self.sort_in(&mut pool, first, home_of);
        }
        for _ in 0..RESERVE_ATTEMPTS_MAX {
            if let Some(n) = pool.by_home.get_mut(&home).and_then(Vec::pop) {
                debug_assert_eq!(home_of(n), home);
                if pool.by_home.get(&home).is_some_and(|l| l.len() < PREFETCH_BELOW) {
                    self.prefetch(&mut pool);
                }
                return Ok(n);
            }
            self.refill(&mut pool, home_of).await?;
        }
        Err(FsError::Data(format!("no inode number of metadata shard {home} in {RESERVE_ATTEMPTS_MAX} batches of {}", self.batch)))
    }

    /// Any number, taking homes in turn (directories: their entries spread over the shards).
    pub async fn next(&self, homes: u32, home_of: &(dyn Fn(u64) -> u32 + Sync)) -> Result<u64, FsError> {
        let home = {
            let mut pool = self.pool.lock().await;
            pool.next_home = (pool.next_home + 1) % homes.max(1);
            pool.next_home
        };
        self.next_in(home, home_of).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_in_the_asked_home() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let a = InoAlloc::counter(64);
            let home_of = |n: u64| (n % 5) as u32;
            let mut seen = std::collections::HashSet::new();
            for i in 0..500u64 {
                let n = if i % 3 == 0 { a.next(5, &home_of).await.unwrap() } else { a.next_in((i % 5) as u32, &home_of).await.unwrap() };
                assert!(n >= 2);
                if i % 3 != 0 {
                    assert_eq!(home_of(n), (i % 5) as u32);
                }
                assert!(seen.insert(n), "{n} handed out twice");
            }
        });
    }
}
