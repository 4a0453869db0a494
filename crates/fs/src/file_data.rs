//! File data: one array object per file; byte `o` of the file lives in chunk `o / chunk_bytes`
//! (the dkey, 8 bytes big-endian) at offset `o % chunk_bytes` of the akey [`DATA_AKEY`].
//! A hole is a chunk or range never written: it costs nothing and reads as zeros.
//!
//! [`DataStore`] is the chunk-level contract (the object store, or memory in tests);
//! [`FileData`] splits byte ranges into chunks and runs chunk I/O concurrently, bounded by
//! [`CHUNK_IO_INFLIGHT_MAX`].

use crate::fs_error::FsError;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use strata_types::{Epoch, ObjectClass, ObjectType, Oid};

pub const DATA_AKEY: &[u8] = b"d";
/// Chunk reads or writes in flight for one file operation.
pub const CHUNK_IO_INFLIGHT_MAX: usize = 8;
/// Chunks punched one by one when shrinking a file; beyond this the object's dkeys are listed
/// instead (a sparse multi-terabyte file must not cost millions of punches).
pub const PUNCH_BY_INDEX_MAX: u64 = 4096;
/// Extents of one chunk sent in one update (small random writes coalesce per chunk).
pub const EXTENTS_PER_UPDATE_MAX: usize = 1024;

/// The data object of inode `ino` with class `class`: the inode number is its sequence.
pub fn data_oid(ino: u64, class: &str) -> Result<Oid, FsError> {
    let c: ObjectClass = class.parse().map_err(|e| FsError::Invalid(format!("object class '{class}': {e}")))?;
    Ok(Oid::new(ObjectType::Array, c, u128::from(ino)))
}

pub fn chunk_dkey(chunk: u64) -> [u8; 8] {
    chunk.to_be_bytes()
}

pub trait DataStore: Send + Sync + 'static {
    fn write_chunk(&self, oid: Oid, chunk: u64, offset: u64, data: &[u8]) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Several `(offset, bytes)` extents of one chunk at once (`Bytes`: one extent goes out
    /// as it is, without a copy into a payload).
    fn write_chunk_extents(&self, oid: Oid, chunk: u64, extents: &[(u64, Bytes)]) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Exactly `len` bytes; holes read as zeros. `Bytes` so that a reader keeping them (the
    /// mount's block cache) slices what the store sent instead of copying it.
    fn read_chunk(&self, oid: Oid, chunk: u64, offset: u64, len: u64, epoch: Epoch) -> impl Future<Output = Result<Bytes, FsError>> + Send;
    fn punch_chunk(&self, oid: Oid, chunk: u64) -> impl Future<Output = Result<(), FsError>> + Send;
    fn punch_range(&self, oid: Oid, chunk: u64, offset: u64, len: u64) -> impl Future<Output = Result<(), FsError>> + Send;
    /// Chunks holding data (any order).
    fn chunks(&self, oid: Oid) -> impl Future<Output = Result<Vec<u64>, FsError>> + Send;
    fn punch_object(&self, oid: Oid) -> impl Future<Output = Result<(), FsError>> + Send;
}

pub struct FileData<D: DataStore> {
    pub store: Arc<D>,
    pub chunk_bytes: u64,
}

impl<D: DataStore> Clone for FileData<D> {
    fn clone(&self) -> Self {
        FileData { store: self.store.clone(), chunk_bytes: self.chunk_bytes }
    }
}

impl<D: DataStore> FileData<D> {
    pub fn new(store: Arc<D>, chunk_bytes: u64) -> FileData<D> {
        assert!(chunk_bytes.is_power_of_two());
        FileData { store, chunk_bytes }
    }

    /// `(chunk, offset in chunk, range in the caller's buffer)` pieces of `[offset, offset+len)`.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / self.chunk_bytes;
            let in_chunk = pos % self.chunk_bytes;
            let n = (self.chunk_bytes - in_chunk).min(end - pos);
            out.push((chunk, in_chunk, (pos - offset) as usize..(pos - offset + n) as usize));
            pos += n;
        }
        out
    }

    pub async fn write(&self, oid: Oid, offset: u64, data: &[u8]) -> Result<(), FsError> {
        let pieces = self.pieces(offset, data.len() as u64);
        stream::iter(pieces.into_iter().map(|(c, o, r)| self.store.write_chunk(oid, c, o, &data[r])))
            .buffer_unordered(CHUNK_IO_INFLIGHT_MAX)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Write many extents: grouped per chunk, one update per chunk (up to
    /// [`EXTENTS_PER_UPDATE_MAX`] extents), [`CHUNK_IO_INFLIGHT_MAX`] updates in flight.
    pub async fn write_extents(&self, oid: Oid, extents: &[(u64, Bytes)]) -> Result<(), FsError> {
        let mut per_chunk: std::collections::BTreeMap<u64, Vec<(u64, Bytes)>> = Default::default();
        for (off, d) in extents {
            for (c, o, r) in self.pieces(*off, d.len() as u64) {
                per_chunk.entry(c).or_default().push((o, d.slice(r)));
            }
        }
        let mut batches = Vec::new();
        for (c, list) in &per_chunk {
            for b in list.chunks(EXTENTS_PER_UPDATE_MAX) {
                batches.push((*c, b));
            }
        }
        // A plain loop rather than a stream of closures: the future must be `Send` for
        // background flushes, which closures over borrowed slices defeat.
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut todo = batches.into_iter();
        loop {
            while inflight.len() < CHUNK_IO_INFLIGHT_MAX {
                let Some((c, b)) = todo.next() else { break };
                inflight.push(self.store.write_chunk_extents(oid, c, b));
            }
            match inflight.next().await {
                Some(r) => r?,
                None => return Ok(()),
            }
        }
    }

    pub async fn read(&self, oid: Oid, offset: u64, len: u64, epoch: Epoch) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::with_capacity(len as usize);
        for (_, d) in self.read_pieces(oid, offset, len, epoch).await? {
            out.extend_from_slice(&d);
        }
        Ok(out)
    }

    /// `[offset, offset+len)` as one `(file offset, bytes)` piece per chunk, in file order,
    /// each exactly as long as its part of the range (the chunks read concurrently).
    pub async fn read_pieces(&self, oid: Oid, offset: u64, len: u64, epoch: Epoch) -> Result<Vec<(u64, Bytes)>, FsError> {
        let pieces = self.pieces(offset, len);
        let mut parts: Vec<(u64, Bytes)> = stream::iter(pieces.into_iter().map(|(c, o, r)| async move {
            let want = r.len();
            let mut d = self.store.read_chunk(oid, c, o, want as u64, epoch).await?;
            if d.len() != want {
                // The contract says exactly `len`; a short answer is a hole at the end.
                let mut v = Vec::from(d);
                v.resize(want, 0);
                d = Bytes::from(v);
            }
            Ok::<_, FsError>((offset + r.start as u64, d))
        }))
        .buffer_unordered(CHUNK_IO_INFLIGHT_MAX)
        .try_collect()
        .await?;
        parts.sort_unstable_by_key(|(o, _)| *o);
        Ok(parts)
    }

    /// Make `[new_size, old_size)` a hole after a truncate.
    pub async fn truncate(&self, oid: Oid, new_size: u64, old_size: u64) -> Result<(), FsError> {
        if new_size >= old_size {
            return Ok(());
        }
        let first_whole = new_size.div_ceil(self.chunk_bytes);
        let last = old_size.div_ceil(self.chunk_bytes);
        let doomed: Vec<u64> = if last - first_whole <= PUNCH_BY_INDEX_MAX {
            (first_whole..last).collect()
        } else {
            self.store.chunks(oid).await?.into_iter().filter(|c| *c >= first_whole).collect()
        };
        // The partial chunk's tail and the whole chunks are different dkeys: all at once.
        let partial = (!new_size.is_multiple_of(self.chunk_bytes)).then(|| (new_size / self.chunk_bytes, new_size % self.chunk_bytes));
        let tail = async {
            match partial {
                Some((c, o)) => self.store.punch_range(oid, c, o, self.chunk_bytes - o).await,
                None => Ok(()),
            }
        };
        let whole = stream::iter(doomed.into_iter().map(|c| self.store.punch_chunk(oid, c))).buffer_unordered(CHUNK_IO_INFLIGHT_MAX).try_collect::<Vec<()>>();
        let (t, w) = futures::join!(tail, whole);
        t?;
        w?;
        Ok(())
    }

    /// Zero `[offset, offset+len)` inside the file (fallocate punch-hole).
    pub async fn punch_hole(&self, oid: Oid, offset: u64, len: u64) -> Result<(), FsError> {
        // Chunks are independent objects' keys: their punches run concurrently.
        stream::iter(self.pieces(offset, len).into_iter().map(|(c, o, r)| async move {
            if o == 0 && r.len() as u64 == self.chunk_bytes {
                self.store.punch_chunk(oid, c).await
            } else {
                self.store.punch_range(oid, c, o, r.len() as u64).await
            }
        }))
        .buffer_unordered(CHUNK_IO_INFLIGHT_MAX)
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }
}

/// Chunks in memory, newest data only (tests of everything above the object store).
#[derive(Default)]
pub struct MemData {
    chunks: Mutex<HashMap<(Oid, u64), Vec<u8>>>,
}

impl MemData {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Oid, u64), Vec<u8>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DataStore for MemData {
    async fn write_chunk(&self, oid: Oid, chunk: u64, offset: u64, data: &[u8]) -> Result<(), FsError> {
        let mut m = self.lock();
        let c = m.entry((oid, chunk)).or_default();
        let end = offset as usize + data.len();
        if c.len() < end {
            c.resize(end, 0);
        }
        c[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    async fn write_chunk_extents(&self, oid: Oid, chunk: u64, extents: &[(u64, Bytes)]) -> Result<(), FsError> {
        for (o, d) in extents {
            self.write_chunk(oid, chunk, *o, d).await?;
        }
        Ok(())
    }
    async fn read_chunk(&self, oid: Oid, chunk: u64, offset: u64, len: u64, _epoch: Epoch) -> Result<Bytes, FsError> {
        let m = self.lock();
        let mut out = vec![0u8; len as usize];
        if let Some(c) = m.get(&(oid, chunk)) {
            let s = (offset as usize).min(c.len());
            let e = (offset as usize + len as usize).min(c.len());
            out[..e - s].copy_from_slice(&c[s..e]);
        }
        Ok(Bytes::from(out))
    }
    async fn punch_chunk(&self, oid: Oid, chunk: u64) -> Result<(), FsError> {
        self.lock().remove(&(oid, chunk));
        Ok(())
    }
    async fn punch_range(&self, oid: Oid, chunk: u64, offset: u64, len: u64) -> Result<(), FsError> {
        if let Some(c) = self.lock().get_mut(&(oid, chunk)) {
            let s = (offset as usize).min(c.len());
            let e = (offset as usize + len as usize).min(c.len());
            c[s..e].fill(0);
        }
        Ok(())
    }
    async fn chunks(&self, oid: Oid) -> Result<Vec<u64>, FsError> {
        Ok(self.lock().keys().filter(|(o, _)| *o == oid).map(|(_, c)| *c).collect())
    }
    async fn punch_object(&self, oid: Oid) -> Result<(), FsError> {
        self.lock().retain(|(o, _), _| *o != oid);
        Ok(())
    }
}

/// Chunks as extents of array objects in a Strata container.
pub struct ObjData {
    pub cont: strata_client::ContHandle,
}

fn data_err(e: strata_client::ClientError) -> FsError {
    match &e {
        strata_client::ClientError::Rpc(strata_rpc::RpcError::Remote(r)) if r.code == strata_rpc::ErrorCode::NoSpace => FsError::StoreFull(r.message.clone()),
        _ => FsError::Data(e.to_string()),
    }
}

impl DataStore for ObjData {
    async fn write_chunk(&self, oid: Oid, chunk: u64, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.cont.object(oid).write(&chunk_dkey(chunk), DATA_AKEY, offset, data).await.map_err(data_err)?;
        Ok(())
    }
    async fn write_chunk_extents(&self, oid: Oid, chunk: u64, extents: &[(u64, Bytes)]) -> Result<(), FsError> {
        let obj = self.cont.object(oid);
        if let [(offset, d)] = extents {
            // A sequential writer's chunk: the buffer itself is the payload.
            obj.write_bytes_at(&chunk_dkey(chunk), DATA_AKEY, *offset, d.clone(), None).await.map_err(data_err)?;
            return Ok(());
        }
        let refs: Vec<(u64, &[u8])> = extents.iter().map(|(o, d)| (*o, &d[..])).collect();
        obj.write_extents(&chunk_dkey(chunk), DATA_AKEY, &refs).await.map_err(data_err)?;
        Ok(())
    }
    async fn read_chunk(&self, oid: Oid, chunk: u64, offset: u64, len: u64, epoch: Epoch) -> Result<Bytes, FsError> {
        let (d, _) = self.cont.object(oid).read_bytes(&chunk_dkey(chunk), DATA_AKEY, offset, len, epoch).await.map_err(data_err)?;
        Ok(d)
    }
    async fn punch_chunk(&self, oid: Oid, chunk: u64) -> Result<(), FsError> {
        self.cont.object(oid).punch_dkey(&chunk_dkey(chunk)).await.map_err(data_err)?;
        Ok(())
    }
    async fn punch_range(&self, oid: Oid, chunk: u64, offset: u64, len: u64) -> Result<(), FsError> {
        self.cont.object(oid).punch_extent(&chunk_dkey(chunk), DATA_AKEY, offset, len).await.map_err(data_err)?;
        Ok(())
    }
    async fn chunks(&self, oid: Oid) -> Result<Vec<u64>, FsError> {
        let keys = self.cont.object(oid).list_dkeys(Epoch::MAX).await.map_err(data_err)?;
        Ok(keys.iter().filter_map(|k| <[u8; 8]>::try_from(k.as_slice()).ok()).map(u64::from_be_bytes).collect())
    }
    async fn punch_object(&self, oid: Oid) -> Result<(), FsError> {
        self.cont.object(oid).punch().await.map_err(data_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_chunk_boundaries_and_truncate_makes_holes() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let fd = FileData::new(Arc::new(MemData::default()), 4096);
            let oid = data_oid(7, "S1").unwrap();
            let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            fd.write(oid, 1000, &data).await.unwrap();
            assert_eq!(fd.read(oid, 1000, 10_000, Epoch::MAX).await.unwrap(), data);
            assert_eq!(fd.read(oid, 0, 1000, Epoch::MAX).await.unwrap(), vec![0; 1000]);
            fd.truncate(oid, 5000, 11_000).await.unwrap();
            let got = fd.read(oid, 0, 11_000, Epoch::MAX).await.unwrap();
            assert_eq!(&got[1000..5000], &data[..4000]);
            assert!(got[5000..].iter().all(|b| *b == 0));
            let mut chunks = fd.store.chunks(oid).await.unwrap();
            chunks.sort();
            assert_eq!(chunks, vec![0, 1]);
        });
    }
}

#[cfg(test)]
mod data_error_tests {
    use super::*;

    /// A full pool reaches applications as ENOSPC (they handle it), any other store error as EIO.
    #[test]
    fn a_full_pool_is_enospc_and_other_store_errors_are_eio() {
        let remote = |code| strata_client::ClientError::Rpc(strata_rpc::RpcError::Remote(strata_rpc::RemoteError { code, message: "target 0.1: 200 MiB free, reserve 256 MiB".into(), detail: None }));
        let full = data_err(remote(strata_rpc::ErrorCode::NoSpace));
        assert_eq!(full.errno(), libc::ENOSPC, "{full}");
        assert!(full.to_string().contains("reserve 256 MiB"), "{full}");
        assert_eq!(data_err(remote(strata_rpc::ErrorCode::Corrupt)).errno(), libc::EIO);
    }
}
