//! The metadata store over `strata-kv`: a volume's dentry and inode tables are one KV table of
//! its `posix` container, sharded by the first [`HOME_BYTES`] bytes of the key (the home,
//! `prefix:8`), so one directory's entries and inode are one shard, and one scan.

use crate::commit_outcome::{settle, WriteLog, SETTLE_TIME_MAX};
use crate::meta_schema::{inode_key, HOME_BYTES};
use crate::meta_store::{KeyValue, MetaError, MetaStore, MetaTxn};
use strata_kv::{KvError, KvOptions, KvStore, Txn};
use strata_types::Epoch;

/// The KV table of a volume's metadata (table 0 is the container's general KV store).
/// Metadata format 2; format 1 lived in table 1 (`meta_schema::super_key_format1`).
pub const FS_META_TABLE: u32 = 2;
pub const FS_META_TABLE_FORMAT1: u32 = 1;
/// Shards of the metadata table: directories and inodes spread over this many dkeys.
pub const FS_META_SHARDS: u32 = 64;
/// Concurrent reads when warming the shards up at open.
const WARM_UP_INFLIGHT_MAX: usize = 64;

fn meta_err(e: KvError) -> MetaError {
    tracing::debug!(error = %e, "metadata store");
    match e {
        KvError::Conflict { .. } => MetaError::Conflict,
        KvError::CasFailed { .. } => MetaError::Stale,
        KvError::TooLarge { .. } | KvError::InvalidKey(_) => MetaError::Invalid(e.to_string()),
        KvError::NoSpace(m) => MetaError::Full(m),
        e => MetaError::Unavailable(e.to_string()),
    }
}

/// The first key after every key starting with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut e = prefix.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return Some(e);
        }
    }
    None
}

fn scan_start(prefix: &[u8], after: Option<&[u8]>) -> Vec<u8> {
    match after {
        Some(a) if a >= prefix => {
            let mut s = a.to_vec();
            s.push(0);
            s
        }
        _ => prefix.to_vec(),
    }
}

#[derive(Clone)]
pub struct KvMeta {
    pub kv: KvStore,
}

impl KvMeta {
    pub async fn open(cont: &strata_client::ContHandle) -> Result<KvMeta, MetaError> {
        let shard = format!("prefix:{HOME_BYTES}:{FS_META_SHARDS}").parse().map_err(|e| MetaError::Invalid(format!("{e}")))?;
        let opts = KvOptions { table: FS_META_TABLE, shard: Some(shard), oclass: None };
        Ok(KvMeta { kv: KvStore::open_with(cont, &opts).await.map_err(meta_err)? })
    }

    /// Whether the container holds a volume of metadata format 1 (refused: its keys mean
    /// something else).
    pub async fn holds_format1(cont: &strata_client::ContHandle) -> Result<bool, MetaError> {
        let shard = "prefix:9:64".parse().map_err(|e| MetaError::Invalid(format!("{e}")))?;
        let opts = KvOptions { table: FS_META_TABLE_FORMAT1, shard: Some(shard), oclass: None };
        let old = KvStore::open_with(cont, &opts).await.map_err(meta_err)?;
        Ok(old.get(&crate::meta_schema::super_key_format1()).await.map_err(meta_err)?.is_some())
    }

    /// Touch every shard once, concurrently. A shard's first use on its leader waits out a
    /// clock margin (about a second); paying it for all shards at once at mount time beats
    /// paying it one shard at a time during the first creates.
    pub async fn warm_up(&self) {
        use futures::stream::{self, StreamExt};
        let map = self.kv.shard_map();
        let mut keys: std::collections::BTreeMap<u32, Vec<u8>> = Default::default();
        for n in 0..u64::from(FS_META_SHARDS) * 64 {
            let k = inode_key(u64::MAX - n);
            keys.entry(map.shard_of(&k)).or_insert(k);
            if keys.len() == FS_META_SHARDS as usize {
                break;
            }
        }
        stream::iter(keys.into_values().map(|k| async move { self.kv.get(&k).await }))
            .buffer_unordered(WARM_UP_INFLIGHT_MAX)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "warming a metadata shard up");
                }
            })
            .await;
    }
}

/// A KV transaction, and what it read and wrote: a commit whose answer was lost is settled by
/// reading its keys back (`commit_outcome.rs`).
pub struct KvMetaTxn {
    txn: Txn,
    meta: KvMeta,
    log: WriteLog,
}

impl MetaStore for KvMeta {
    type Txn = KvMetaTxn;
    async fn begin(&self) -> Result<KvMetaTxn, MetaError> {
        Ok(KvMetaTxn { txn: self.kv.begin(), meta: self.clone(), log: WriteLog::default() })
    }
    async fn get_at(&self, key: &[u8], epoch: Epoch) -> Result<Option<Vec<u8>>, MetaError> {
        if epoch == Epoch::MAX {
            self.kv.get(key).await.map_err(meta_err)
        } else {
            self.kv.get_at(key, epoch).await.map_err(meta_err)
        }
    }
    async fn scan_prefix_at(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize, epoch: Epoch) -> Result<Vec<KeyValue>, MetaError> {
        let start = scan_start(prefix, after);
        let end = prefix_end(prefix);
        if epoch == Epoch::MAX {
            self.kv.scan(&start, end.as_deref(), limit).await.map_err(meta_err)
        } else {
            self.kv.scan_at(&start, end.as_deref(), limit, epoch).await.map_err(meta_err)
        }
    }
    fn homes(&self) -> u32 {
        self.kv.shard_map().shard_count()
    }
    fn home_of(&self, ino: u64) -> u32 {
        self.kv.shard_map().shard_of(&inode_key(ino))
    }
}

impl MetaTxn for KvMetaTxn {
    async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, MetaError> {
        let v = self.txn.get(key).await.map_err(meta_err)?;
        self.log.read(key, v.as_deref());
        Ok(v)
    }
    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), MetaError> {
        self.txn.put(key, value).map_err(meta_err)?;
        self.log.write(key, Some(value));
        Ok(())
    }
    async fn delete(&mut self, key: &[u8]) -> Result<(), MetaError> {
        self.txn.delete(key).map_err(meta_err)?;
        self.log.write(key, None);
        Ok(())
    }
    fn expect(&mut self, key: &[u8], expected: Option<&[u8]>) -> Result<(), MetaError> {
        self.txn.expect(key, expected).map_err(meta_err)?;
        self.log.read(key, expected);
        Ok(())
    }
    async fn scan_prefix(&mut self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, MetaError> {
        let start = scan_start(prefix, after);
        let end = prefix_end(prefix);
        self.txn.scan(&start, end.as_deref(), limit).await.map_err(meta_err)
    }
    async fn commit(self) -> Result<Epoch, MetaError> {
        let KvMetaTxn { txn, meta, log } = self;
        match txn.commit().await {
            Err(KvError::Indeterminate(why)) if !log.is_empty() => {
                settle(&meta, &log, &why, SETTLE_TIME_MAX).await?;
                // An epoch read after the commit was seen (no caller needs the commit's own).
                Ok(meta.kv.begin().read_epoch())
            }
            r => r.map_err(meta_err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_end(b"D\x00\x01"), Some(b"D\x00\x02".to_vec()));
        assert_eq!(prefix_end(b"D\xff"), Some(b"E".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(scan_start(b"Dp", Some(b"Dpa")), b"Dpa\x00".to_vec());
        assert_eq!(scan_start(b"Dp", None), b"Dp".to_vec());
    }

    #[test]
    fn a_pool_out_of_space_for_metadata_is_enospc() {
        let e = crate::FsError::Meta(meta_err(KvError::NoSpace("target 1.0: 200 MiB free, reserve 256 MiB".into())));
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        assert!(e.to_string().contains("reserve 256 MiB"), "{e}");
        assert_eq!(crate::FsError::Meta(meta_err(KvError::Unavailable("rank 2 down".into()))).errno(), libc::EIO);
    }
}
