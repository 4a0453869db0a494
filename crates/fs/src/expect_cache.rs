//! Values of metadata keys as this client last saw them committed, used as **expectations**:
//! a transaction that would read a key held here instead sends "this key still holds V" with
//! its commit ([`MetaTxn::expect`]), saving the read's round trip. A create in a directory this
//! mount just listed, created in or looked a name up in is then one round trip: the commit,
//! which checks the directory's inode and the name's absence under the shard leader's locks.
//!
//! Nothing here ever answers a user: a stale entry only makes a commit fail with
//! [`MetaError::Stale`](crate::meta_store::MetaError::Stale), and the operation runs again with
//! real reads (`Namespace::txn`). An answer a transaction derives from expected values without
//! committing (`EEXIST`, `ENOENT`, ...) is likewise checked with real reads before it is given.

use crate::meta_store::{KeyValue, MetaError, MetaTxn};
use std::collections::HashMap;
use std::sync::Mutex;
use strata_types::Epoch;

/// Bytes of keys and values held; past it the cache starts over (a cache miss costs one read).
pub const EXPECT_CACHE_BYTES_MAX: usize = 32 << 20;
/// Larger values (inodes with big extended attributes) are not held.
pub const EXPECT_VALUE_BYTES_MAX: usize = 4096;

#[derive(Default)]
struct Inner {
    /// Key → value (`None`: the key was absent).
    map: HashMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
}

#[derive(Default)]
pub struct ExpectCache {
    inner: Mutex<Inner>,
}

fn entry_bytes(k: &[u8], v: &Option<Vec<u8>>) -> usize {
    k.len() + v.as_ref().map_or(0, Vec::len) + 32
}

impl ExpectCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(value)` when the key's last seen state is known (`Some(None)`: absent).
    pub fn get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.lock().map.get(key).cloned()
    }

    /// Remember a committed state of `key`.
    pub fn put(&self, key: &[u8], value: Option<&[u8]>) {
        let mut g = self.lock();
        if let Some(old) = g.map.remove(key) {
            g.bytes -= entry_bytes(key, &old);
        }
        if value.is_some_and(|v| v.len() > EXPECT_VALUE_BYTES_MAX) {
            return;
        }
        let v = value.map(<[u8]>::to_vec);
        let add = entry_bytes(key, &v);
        if g.bytes + add > EXPECT_CACHE_BYTES_MAX {
            g.map.clear();
            g.bytes = 0;
        }
        g.bytes += add;
        g.map.insert(key.to_vec(), v);
    }
}

/// A metadata transaction that takes what it would read from an [`ExpectCache`] as
/// expectations (when `use_cache`), and records what it read and wrote so the cache learns the
/// committed state.
pub struct Tx<'a, T: MetaTxn> {
    inner: T,
    cache: &'a ExpectCache,
    use_cache: bool,
    /// Some value came from the cache (unvalidated until the commit).
    pub(crate) used_cache: bool,
    /// Reads and writes in order: the state of these keys as of a successful commit.
    seen: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl<'a, T: MetaTxn> Tx<'a, T> {
    pub fn new(inner: T, cache: &'a ExpectCache, use_cache: bool) -> Tx<'a, T> {
        Tx { inner, cache, use_cache, used_cache: false, seen: Vec::new() }
    }

    /// The value this transaction last read or wrote at `key`, if it did.
    pub fn seen(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.seen.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
}

impl<T: MetaTxn> MetaTxn for Tx<'_, T> {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        if self.use_cache {
            if let Some(v) = self.cache.get(key) {
                self.inner.expect(key, v.as_deref())?;
                self.used_cache = true;
                self.seen.push((key.to_vec(), v.clone()));
                return Ok(v);
            }
        }
        let v = self.inner.get(key).await?;
        self.seen.push((key.to_vec(), v.clone()));
        Ok(v)
    }
    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), MetaError> {
        self.inner.put(key, value).await?;
        self.seen.push((key.to_vec(), Some(value.to_vec())));
        Ok(())
    }
    async fn delete(&mut self, key: &[u8]) -> Result<(), MetaError> {
        self.inner.delete(key).await?;
        self.seen.push((key.to_vec(), None));
        Ok(())
    }
    fn expect(&mut self, key: &[u8], expected: Option<&[u8]>) -> Result<(), MetaError> {
        self.inner.expect(key, expected)
    }
    async fn scan_prefix(&mut self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, MetaError> {
        self.inner.scan_prefix(prefix, after, limit).await
    }
    async fn commit(self) -> Result<Epoch, MetaError> {
        let (cache, seen) = (self.cache, self.seen);
        let r = self.inner.commit().await;
        if r.is_ok() {
            // Reads were validated and expectations met at the commit: all of it is the
            // state the commit left.
            for (k, v) in seen {
                cache.put(&k, v.as_deref());
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_absent_keys_and_starts_over_when_full() {
        let c = ExpectCache::default();
        assert_eq!(c.get(b"k"), None);
        c.put(b"k", None);
        assert_eq!(c.get(b"k"), Some(None));
        c.put(b"k", Some(b"v"));
        assert_eq!(c.get(b"k"), Some(Some(b"v".to_vec())));
        c.put(b"big", Some(&vec![0u8; EXPECT_VALUE_BYTES_MAX + 1]));
        assert_eq!(c.get(b"big"), None);
        let v = vec![1u8; EXPECT_VALUE_BYTES_MAX];
        for n in 0..(EXPECT_CACHE_BYTES_MAX / EXPECT_VALUE_BYTES_MAX + 1) {
            c.put(format!("k{n}").as_bytes(), Some(&v));
        }
        assert!(c.lock().bytes <= EXPECT_CACHE_BYTES_MAX);
        assert_eq!(c.get(b"k"), None, "the cache started over");
    }
}
