//! A volume on a running cluster: the `posix` container, its metadata (KV table) and file data
//! (array objects), plus what the CLI needs outside a mount: layouts and reads at an epoch.

use crate::exnode::{self, ExNode, Signer};
use crate::file_data::{data_oid, FileData, ObjData};
use crate::fs_error::FsError;
use crate::ino_alloc::{IdSource, InoAlloc, INO_BATCH};
use crate::kv_meta::KvMeta;
use crate::meta_schema::{Inode, Kind};
use crate::namespace::Namespace;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use strata_client::{Client, ContHandle};
use strata_rpc::capability::{key_to_hex, parse_key, CAP_KEY_BYTES, CAP_KEY_PROP};
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, MgmtQuery, MgmtReply};
use strata_types::{Epoch, ObjectClass};

/// Container property: chunk size of new volumes (bytes, power of two); fixed at format.
pub const CHUNK_PROP: &str = "fs.chunk_bytes";
pub const CHUNK_BYTES_DEFAULT: u64 = 1 << 20;
/// Bytes read from the store per step when copying a file out (`strata fs cat`).
pub const CAT_STEP_BYTES: u64 = 8 << 20;

/// Inode numbers from the container's object-id allocator in the management service.
struct MgmtIds {
    cont: ContHandle,
}

impl IdSource for MgmtIds {
    fn reserve(&self, count: u64) -> Pin<Box<dyn Future<Output = Result<u64, FsError>> + Send + '_>> {
        Box::pin(async move {
            let cmd = MgmtCmd::AllocOids { pool: self.cont.info.pool.to_string(), cont: self.cont.info.id.to_string(), count };
            match self.cont.pool.client().mgmt.write(cmd).await {
                Ok(MgmtReply::OidRange { first, .. }) => Ok(first),
                Ok(other) => Err(FsError::Data(format!("unexpected reply to an id allocation: {other:?}"))),
                Err(e) => Err(FsError::Data(format!("cannot allocate inode numbers: {e}"))),
            }
        })
    }
}

#[derive(Clone)]
pub struct Volume {
    pub cont: ContHandle,
    pub ns: Arc<Namespace<KvMeta>>,
    pub data: Arc<ObjData>,
}

fn client_err(e: impl std::fmt::Display) -> FsError {
    FsError::Data(e.to_string())
}

impl Volume {
    /// Open (formatting on first use) the volume in container `cont` of `pool`.
    pub async fn open(client: &Client, pool: &str, cont: &str) -> Result<Volume, FsError> {
        let cont = client.container(pool, cont).await.map_err(client_err)?;
        if cont.info.ctype != ContType::Posix {
            return Err(FsError::Invalid(format!(
                "container '{}' is of type {}, not posix; create a volume with `strata cont create {pool} NAME --type posix`",
                cont.info.label,
                cont.info.ctype.name()
            )));
        }
        let chunk = match cont.info.props.get(CHUNK_PROP) {
            Some(v) => v.parse::<u64>().ok().filter(|c| c.is_power_of_two() && *c >= 4096 && *c <= 64 << 20).ok_or_else(|| FsError::Invalid(format!("container property {CHUNK_PROP}={v} is not a power of two in 4 KiB..=64 MiB")))?,
            None => CHUNK_BYTES_DEFAULT,
        };
        cont.info.oclass.parse::<ObjectClass>().map_err(|e| FsError::Invalid(format!("container class '{}': {e}", cont.info.oclass)))?;
        let meta = KvMeta::open(&cont).await?;
        meta.warm_up().await;
        use crate::meta_store::MetaStore;
        if meta.get_at(&crate::meta_schema::super_key(), Epoch::MAX).await?.is_none() && KvMeta::holds_format1(&cont).await? {
            return Err(FsError::Invalid(format!(
                "volume '{}' has metadata format 1, which this version no longer reads; copy its files out with an older strata, then recreate it",
                cont.info.label
            )));
        }
        let ids = InoAlloc::new(Arc::new(MgmtIds { cont: cont.clone() }), INO_BATCH);
        let ns = Namespace::open(meta, ids, cont.info.oclass.clone(), chunk).await?;
        Ok(Volume { data: Arc::new(ObjData { cont: cont.clone() }), cont, ns: Arc::new(ns) })
    }

    pub fn file_data(&self) -> FileData<ObjData> {
        FileData::new(self.data.clone(), self.ns.chunk_bytes)
    }

    /// The container's capability key, created on first use (racing creators agree on
    /// whichever write the management service applied last, read back after writing).
    pub async fn cap_key(&self) -> Result<Vec<u8>, FsError> {
        let pool = self.cont.info.pool.to_string();
        let cont = self.cont.info.id.to_string();
        let mgmt = &self.cont.pool.client().mgmt;
        let read = async || match mgmt.query(MgmtQuery::Cont { pool: pool.clone(), cont: cont.clone() }).await {
            Ok(MgmtReply::Cont(info)) => Ok(info.props.get(CAP_KEY_PROP).cloned()),
            Ok(other) => Err(FsError::Data(format!("unexpected reply {other:?}"))),
            Err(e) => Err(client_err(e)),
        };
        if let Some(k) = read().await? {
            return parse_key(&k).map_err(|e| FsError::Invalid(e.to_string()));
        }
        let mut key = [0u8; CAP_KEY_BYTES];
        for b in key.iter_mut() {
            *b = rand::random();
        }
        let cmd = MgmtCmd::SetProp { pool: pool.clone(), cont: cont.clone(), key: CAP_KEY_PROP.into(), value: key_to_hex(&key) };
        mgmt.write(cmd).await.map_err(client_err)?;
        let k = read().await?.ok_or_else(|| FsError::Data("capability key vanished after it was set".into()))?;
        parse_key(&k).map_err(|e| FsError::Invalid(e.to_string()))
    }

    /// The exNode of the file at `path` (relative to the volume root).
    pub async fn layout(&self, path: &str, cap_ttl_ms: u64) -> Result<ExNode, FsError> {
        let i = self.ns.resolve_at(path, Epoch::MAX).await?;
        if i.kind != Kind::File {
            return Err(if i.kind == Kind::Dir { FsError::IsDir } else { FsError::Invalid(format!("'{path}' is a {}, which has no data layout", i.kind.name())) });
        }
        let class_name = i.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        let class: ObjectClass = class_name.parse().map_err(|e| FsError::Invalid(format!("class {class_name}: {e}")))?;
        let oid = data_oid(i.ino, &class_name)?;
        let layout = self.cont.pool.layout(oid).map_err(client_err)?;
        let info = self.cont.pool.info().map_err(client_err)?;
        let key = self.cap_key().await?;
        let signer = Signer { key: &key, pool: self.cont.info.pool, cont: self.cont.info.id, expires_ms: strata_rpc::capability::now_ms() + cap_ttl_ms };
        let addr_of = |rank: u32| info.rank_addrs.get(&strata_types::Rank(rank)).cloned().unwrap_or_default();
        Ok(exnode::build(path, i.ino, i.size, i.data_version, oid, class, self.ns.chunk_bytes, &layout, addr_of, &signer))
    }

    /// The file at `path` as of `epoch`: its inode then, and a reader of its bytes then.
    pub async fn file_at(&self, path: &str, epoch: Epoch) -> Result<Inode, FsError> {
        let i = self.ns.resolve_at(path, epoch).await?;
        match i.kind {
            Kind::File => Ok(i),
            Kind::Dir => Err(FsError::IsDir),
            k => Err(FsError::Invalid(format!("'{path}' is a {}", k.name()))),
        }
    }

    /// Copy the file's bytes as of `epoch` to `out`, [`CAT_STEP_BYTES`] at a time.
    pub async fn cat_at(&self, i: &Inode, epoch: Epoch, out: &mut dyn std::io::Write) -> Result<u64, FsError> {
        let class = i.oclass.clone().unwrap_or_else(|| self.ns.default_oclass.clone());
        let oid = data_oid(i.ino, &class)?;
        let fd = self.file_data();
        let mut pos = 0;
        while pos < i.size {
            let n = CAT_STEP_BYTES.min(i.size - pos);
            let buf = fd.read(oid, pos, n, epoch).await?;
            out.write_all(&buf).map_err(|e| FsError::Data(format!("writing the output: {e}")))?;
            pos += n;
        }
        Ok(pos)
    }
}
