//! Wire side of the KV client (first version: plain object operations, no isolation yet;
//! replaced by the shard-leader protocol).

use crate::error::KvError;
use crate::shard_map::ShardMap;
use crate::txn::Txn;
use strata_client::{ContHandle, ObjHandle};
use strata_types::{Epoch, Hlc, Oid, SystemClock};

pub(crate) struct Route {
    obj: ObjHandle,
    hlc: Hlc,
}

fn akey(key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(key.len() + 1);
    a.push(b'k');
    a.extend_from_slice(key);
    a
}

impl Route {
    pub(crate) fn new(cont: ContHandle, oid: Oid) -> Route {
        Route { obj: cont.object(oid), hlc: Hlc::new(Box::new(SystemClock), strata_types::HLC_MAX_DRIFT_MS_DEFAULT) }
    }

    pub(crate) fn now(&self) -> Result<Epoch, KvError> {
        self.hlc.now().map_err(|e| KvError::Remote(e.to_string()))
    }

    pub(crate) async fn max_epoch(&self) -> Result<Epoch, KvError> {
        Ok(self.now()?)
    }

    pub(crate) async fn get(&self, map: &ShardMap, key: &[u8], at: Option<Epoch>) -> Result<(Option<Vec<u8>>, Epoch), KvError> {
        let dkey = ShardMap::shard_dkey(map.shard_of(key));
        let at = at.unwrap_or(Epoch::MAX);
        Ok((self.obj.get_at(&dkey, &akey(key), at).await?, at))
    }

    pub(crate) async fn write1(&self, map: &ShardMap, key: &[u8], cas: Option<Option<&[u8]>>, value: Option<&[u8]>) -> Result<Epoch, KvError> {
        let dkey = ShardMap::shard_dkey(map.shard_of(key));
        if let Some(expected) = cas {
            let cur = self.obj.get(&dkey, &akey(key)).await?;
            if cur.as_deref() != expected {
                return Err(KvError::CasFailed { key: key.to_vec(), current: cur });
            }
        }
        let e = match value {
            Some(v) => self.obj.put(&dkey, &akey(key), v).await?,
            None => self.obj.punch_akey(&dkey, &akey(key)).await?,
        };
        let _ = self.hlc.update(e);
        Ok(e)
    }

    pub(crate) async fn scan(&self, map: &ShardMap, start: &[u8], end: Option<&[u8]>, limit: usize, at: Epoch) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        let mut all = std::collections::BTreeMap::new();
        for shard in map.shards_for_range(start, end) {
            let dkey = ShardMap::shard_dkey(shard);
            let mut cursor = None;
            for _ in 0..10_000 {
                let (keys, next) = self.obj.list_akeys(&dkey, at, cursor.clone(), 1000).await?;
                for a in keys {
                    let Some(k) = a.strip_prefix(b"k") else { continue };
                    if k >= start && end.is_none_or(|e| k < e) {
                        if let Some(v) = self.obj.get_at(&dkey, &a, at).await? {
                            all.insert(k.to_vec(), v);
                        }
                    }
                }
                match next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
        }
        Ok(all.into_iter().take(limit).collect())
    }

    pub(crate) async fn commit(&self, map: &ShardMap, txn: Txn) -> Result<Epoch, KvError> {
        let mut last = Epoch::ZERO;
        for (k, v) in &txn.writes {
            last = last.max(self.write1(map, k, None, v.as_deref()).await?);
        }
        Ok(last)
    }
}
