use crate::{ClientError, ClusterFile};
use bytes::Bytes;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use strata_placement::{Layout, PlacementMap};
use strata_rpc::engine_msg::*;
use strata_rpc::mgmt_client::MgmtClient;
use strata_rpc::mgmt_msg::{ContInfo, ContStatus, MgmtCmd, MgmtQuery, MgmtReply, PoolInfo, UncleanCont};
use strata_rpc::{ClientConfig, ErrorCode, RpcError, RpcPool, ServiceKind};
use strata_types::{Epoch, ObjectClass, ObjectType, Oid, TargetId};

/// How long one object operation keeps retrying through map changes and failovers.
pub const OP_DEADLINE: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Client {
    pub mgmt: MgmtClient,
    engines: RpcPool,
    cluster: String,
}

impl Client {
    pub async fn connect(f: &ClusterFile) -> Result<Client, ClientError> {
        Ok(Client {
            mgmt: MgmtClient::new(f.access_points.clone(), Some(f.cluster.clone())),
            engines: RpcPool::new(ServiceKind::Engine, Some(f.cluster.clone()), ClientConfig::default()),
            cluster: f.cluster.clone(),
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub async fn pool(&self, name: &str) -> Result<Arc<PoolHandle>, ClientError> {
        let p = Arc::new(PoolHandle { client: self.clone(), name: name.to_owned(), view: RwLock::new(None) });
        p.refresh().await?;
        Ok(p)
    }

    pub async fn container(&self, pool: &str, cont: &str) -> Result<ContHandle, ClientError> {
        let p = self.pool(pool).await?;
        match self.mgmt.query(MgmtQuery::Cont { pool: pool.to_owned(), cont: cont.to_owned() }).await? {
            MgmtReply::Cont(info) => match &info.status {
                ContStatus::Unclean(reason) => Err(ClientError::Unclean { pool: pool.to_owned(), cont: info.label.clone(), rf: info.rf, reason: reason.clone() }),
                ContStatus::Healthy => Ok(ContHandle { pool: p, info }),
            },
            other => Err(ClientError::Invalid(format!("unexpected reply {other:?}"))),
        }
    }
}

struct PoolView {
    info: PoolInfo,
    placement: Arc<PlacementMap>,
    /// Placement of the map as it stood when data movement last finished (while some is
    /// pending): its spares are the ones known to be filled.
    settled: Option<Arc<PlacementMap>>,
}

impl PoolView {
    fn is_unclean(&self, cont: &ContHandle) -> bool {
        self.info.unclean_conts.iter().any(|u| u.id == cont.info.id)
    }
}

pub struct PoolHandle {
    client: Client,
    name: String,
    view: RwLock<Option<Arc<PoolView>>>,
}

impl PoolHandle {
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let info = match self.client.mgmt.query(MgmtQuery::Pool { pool: self.name.clone() }).await? {
            MgmtReply::Pool(p) => p,
            other => return Err(ClientError::Invalid(format!("unexpected reply {other:?}"))),
        };
        let settled = info.map.settled().map(|m| Arc::new(PlacementMap::new(&m, false)));
        let v = Arc::new(PoolView { placement: Arc::new(PlacementMap::new(&info.map, false)), settled, info });
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Some(v);
        Ok(())
    }

    fn view(&self) -> Result<Arc<PoolView>, ClientError> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| ClientError::Invalid("pool not loaded".into()))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn info(&self) -> Result<PoolInfo, ClientError> {
        Ok(self.view()?.info.clone())
    }

    /// An epoch at least the newest HLC of every reachable engine of the pool: reads at it
    /// see every update acknowledged before this call (the seed's snapshot rule).
    pub async fn max_epoch(&self) -> Result<Epoch, ClientError> {
        let view = self.view()?;
        let mut best = Epoch::ZERO;
        let mut reached = 0;
        for addr in view.info.rank_addrs.values() {
            if let Ok((EngineResp::Clock { epoch }, _)) = self.client.engines.call::<_, EngineResp>(addr, &EngineReq::Clock, Bytes::new(), CALL_TIMEOUT).await {
                best = best.max(epoch);
                reached += 1;
            }
        }
        if reached == 0 {
            return Err(ClientError::Invalid("no engine of the pool answered; cannot pick a snapshot epoch".into()));
        }
        Ok(best)
    }

    pub fn layout(&self, oid: Oid) -> Result<Layout, ClientError> {
        Ok(self.view()?.placement.layout(oid)?)
    }
}

#[derive(Clone)]
pub struct ContHandle {
    pub pool: Arc<PoolHandle>,
    pub info: ContInfo,
}

impl ContHandle {
    /// Allocate a new object id of `class` in this container.
    pub async fn create_object(&self, class: ObjectClass) -> Result<ObjHandle, ClientError> {
        self.create_object_typed(ObjectType::Plain, class).await
    }

    pub async fn create_object_typed(&self, otype: ObjectType, class: ObjectClass) -> Result<ObjHandle, ClientError> {
        let pool = self.info.pool.to_string();
        let cont = self.info.id.to_string();
        let first = match self.pool.client.mgmt.write(MgmtCmd::AllocOids { pool, cont, count: 1 }).await? {
            MgmtReply::OidRange { first, .. } => first,
            other => return Err(ClientError::Invalid(format!("unexpected reply {other:?}"))),
        };
        let oid = Oid::new(otype, class, first as u128);
        self.pool.layout(oid)?;
        Ok(self.object(oid))
    }

    /// Allocate `count` object ids of `class` with one management round trip.
    pub async fn create_objects(&self, class: ObjectClass, count: u64) -> Result<Vec<ObjHandle>, ClientError> {
        let pool = self.info.pool.to_string();
        let cont = self.info.id.to_string();
        let first = match self.pool.client.mgmt.write(MgmtCmd::AllocOids { pool, cont, count }).await? {
            MgmtReply::OidRange { first, .. } => first,
            other => return Err(ClientError::Invalid(format!("unexpected reply {other:?}"))),
        };
        Ok((first..first + count).map(|s| self.object(Oid::new(ObjectType::Plain, class, s as u128))).collect())
    }

    /// Refuse to go on once the container is unclean (see [`ClientError::Unclean`]).
    pub async fn check_clean(&self) -> Result<(), ClientError> {
        self.clean_view().await.map(|_| ())
    }

    /// The pool view to use for a request, if it does not say the container is unclean. The
    /// mark is applied with the map change that caused it, and every map that could make a
    /// lost object read as absent (its rebuilt, empty spares in place) is at that version or
    /// later, so a request sent under a view checked here never reads such an object as
    /// absent. A view that says unclean is loaded once more: an administrator may have
    /// cleared the status since (that changes no map, so nothing else would refresh it).
    async fn clean_view(&self) -> Result<Arc<PoolView>, ClientError> {
        let view = self.pool.view()?;
        if !view.is_unclean(self) {
            return Ok(view);
        }
        self.pool.refresh().await?;
        let view = self.pool.view()?;
        match view.info.unclean_conts.iter().find(|u| u.id == self.info.id) {
            Some(u) => Err(ClientError::Unclean { pool: self.pool.name.clone(), cont: self.info.label.clone(), rf: self.info.rf, reason: u.reason.clone() }),
            None => Ok(view),
        }
    }

    /// [`PoolHandle::call_engine`] for a request about this container's data (the KV layer's
    /// routing): `Err` if the container is unclean, else the call's own result to branch on.
    pub async fn call_engine(
        &self,
        oid: Oid,
        pick: impl FnOnce(&strata_placement::PoolMap, &Layout) -> Option<TargetId>,
        make: impl FnOnce(strata_types::PoolId, u64, TargetId) -> EngineReq,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Result<(EngineResp, Bytes), RpcError>, ClientError> {
        let view = self.clean_view().await?;
        Ok(self.pool.call_engine_in(&view, oid, pick, make, payload, timeout).await)
    }

    pub fn object(&self, oid: Oid) -> ObjHandle {
        ObjHandle { cont: self.clone(), oid }
    }

    /// Objects with data visible at `epoch`, gathered from every target of the pool.
    pub async fn list_objects(&self, epoch: Epoch) -> Result<Vec<Oid>, ClientError> {
        let view = self.clean_view().await?;
        let mut all = std::collections::BTreeSet::new();
        for t in view.info.map.targets.iter().filter(|t| t.state.readable()) {
            let Some(addr) = view.info.rank_addrs.get(&t.id.rank) else { continue };
            let mut cursor = None;
            loop {
                let req = EngineReq::ListObjects { pool: view.info.id, map_version: view.info.map.version, target: t.id.index, cont: self.info.id, epoch, cursor, limit: 1000 };
                match self.pool.client.engines.call::<_, EngineResp>(addr, &req, Bytes::new(), CALL_TIMEOUT).await {
                    Ok((EngineResp::Objects { oids, next }, _)) => {
                        all.extend(oids);
                        if next.is_none() {
                            break;
                        }
                        cursor = next;
                    }
                    Ok(_) => return Err(ClientError::Invalid("unexpected engine reply".into())),
                    // A dead rank's objects are also on its replicas.
                    Err(_) => break,
                }
            }
        }
        Ok(all.into_iter().collect())
    }
}

#[derive(Clone)]
pub struct ObjHandle {
    cont: ContHandle,
    pub oid: Oid,
}

impl ObjHandle {
    async fn retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(Arc<PoolView>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RpcError>>,
    {
        let start = Instant::now();
        loop {
            let view = self.cont.clean_view().await?;
            match op(view).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let retry = e.is_transient() || matches!(&e, RpcError::Remote(r) if r.code == ErrorCode::StaleMap);
                    if !retry {
                        return Err(e.into());
                    }
                    if start.elapsed() > OP_DEADLINE {
                        return Err(ClientError::Deadline(OP_DEADLINE, format!("{what}: {e}")));
                    }
                    tracing::debug!(error = %e, "{what}: refreshing the pool map and retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = self.cont.pool.refresh().await;
                }
            }
        }
    }

    /// The container this object lives in.
    pub fn cont_id(&self) -> strata_types::ContId {
        self.cont.info.id
    }

    fn shards(view: &PoolView, oid: Oid, dkey: &[u8]) -> Result<Vec<TargetId>, RpcError> {
        let layout = view.placement.layout(oid).map_err(|e| RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::InvalidArgument, e.to_string())))?;
        Ok(layout.group(layout.group_for_dkey(dkey)).iter().map(|s| s.target).collect())
    }

    /// The settled layout's shards of the group holding `dkey` (see `PoolView::settled`).
    fn settled_group(view: &PoolView, oid: Oid, dkey: &[u8]) -> Option<Vec<strata_placement::ShardLoc>> {
        let l = view.settled.as_ref()?.layout(oid).ok()?;
        Some(l.group(l.group_for_dkey(dkey)).to_vec())
    }

    /// Shards that hold the group's full data: a spare does only once rebuild has finished
    /// (its home target is `DOWNOUT`); until then it holds only what was written since.
    fn readable_shards(view: &PoolView, oid: Oid, dkey: &[u8]) -> Result<Vec<TargetId>, RpcError> {
        let layout = view.placement.layout(oid).map_err(|e| RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::InvalidArgument, e.to_string())))?;
        let group = layout.group(layout.group_for_dkey(dkey));
        let settled = Self::settled_group(view, oid, dkey);
        let replicated = matches!(oid.class().map(|c| c.redundancy()), Ok(strata_types::Redundancy::Replicas(_)));
        Ok(group.iter().enumerate().filter_map(|(i, s)| strata_placement::read_source(&view.info.map, settled.as_deref(), i, s, replicated)).collect())
    }

    async fn update(&self, dkey: &[u8], ops: Vec<WireOp>, payload: Bytes) -> Result<Epoch, ClientError> {
        self.update_at(dkey, ops, payload, None).await
    }

    /// An update at a caller-chosen epoch (`None`: the leader picks one). A writer that issues
    /// its own epochs from one clock orders its updates across groups the way it issued them.
    async fn update_at(&self, dkey: &[u8], ops: Vec<WireOp>, payload: Bytes, at: Option<Epoch>) -> Result<Epoch, ClientError> {
        let client = self.cont.pool.client.clone();
        let cont = self.cont.info.id;
        self.retry("update", |view| {
            let (client, ops, payload, oid) = (client.clone(), ops.clone(), payload.clone(), self.oid);
            async move {
                let shards = Self::shards(&view, oid, dkey)?;
                // EC groups are led by their first parity shard, replicated ones by shard 0.
                let leader = match oid.class().map(|c| c.redundancy()) {
                    Ok(strata_types::Redundancy::Erasure { data, .. }) => shards[data as usize],
                    _ => shards[0],
                };
                let addr = view.info.rank_addrs.get(&leader.rank).cloned().unwrap_or_default();
                let req = EngineReq::Update { pool: view.info.id, map_version: view.info.map.version, cont, oid, dkey: dkey.to_vec(), epoch: at, ops };
                match client.engines.call::<_, EngineResp>(&addr, &req, payload, CALL_TIMEOUT).await? {
                    (EngineResp::Updated { epoch }, _) => Ok(epoch),
                    _ => Err(RpcError::Protocol("unexpected engine reply".into())),
                }
            }
        })
        .await
    }

    async fn fetch(&self, dkey: &[u8], fetch: FetchKind, epoch: Epoch) -> Result<(Option<Epoch>, Vec<(u64, u64)>, Bytes), ClientError> {
        let client = self.cont.pool.client.clone();
        let cont = self.cont.info.id;
        self.retry("fetch", |view| {
            let (client, fetch, oid) = (client.clone(), fetch.clone(), self.oid);
            async move {
                let mut shards = Self::readable_shards(&view, oid, dkey)?;
                if let (Ok(strata_types::Redundancy::Erasure { data, .. }), FetchKind::Single { .. }) = (oid.class().map(|c| c.redundancy()), &fetch) {
                    let all = Self::shards(&view, oid, dkey)?;
                    let holders: Vec<TargetId> = std::iter::once(all[0]).chain(all[data as usize..].iter().copied()).collect();
                    shards.retain(|t| holders.contains(t));
                }
                if shards.is_empty() {
                    return Err(RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::Unavailable, "every replica of this group is down or not yet rebuilt")));
                }
                let mut last = None;
                // Any replica can answer; spread reads by dkey and fall through on failure.
                let start = dkey.iter().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(*b as usize)) % shards.len();
                for i in 0..shards.len() {
                    let t = shards[(start + i) % shards.len()];
                    let Some(addr) = view.info.rank_addrs.get(&t.rank) else { continue };
                    let req = EngineReq::Fetch { pool: view.info.id, map_version: view.info.map.version, target: t.index, cont, oid, dkey: dkey.to_vec(), fetch: fetch.clone(), epoch };
                    match client.engines.call::<_, EngineResp>(addr, &req, Bytes::new(), CALL_TIMEOUT).await {
                        Ok((EngineResp::Fetched { found, written }, data)) => return Ok((found, written, data)),
                        Ok(_) => return Err(RpcError::Protocol("unexpected engine reply".into())),
                        Err(RpcError::Remote(r)) if r.code != ErrorCode::Corrupt && r.code != ErrorCode::Unavailable => return Err(RpcError::Remote(r)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or(RpcError::ConnectionClosed("no replica reachable".into())))
            }
        })
        .await
    }

    /// Set a single value; returns the epoch it was written at (durable on every replica).
    pub async fn put(&self, dkey: &[u8], akey: &[u8], value: &[u8]) -> Result<Epoch, ClientError> {
        let ops = vec![WireOp::Single { akey: akey.to_vec(), len: value.len() as u32 }];
        self.update(dkey, ops, Bytes::copy_from_slice(value)).await
    }

    pub async fn get(&self, dkey: &[u8], akey: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.get_at(dkey, akey, Epoch::MAX).await
    }

    pub async fn get_at(&self, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<Option<Vec<u8>>, ClientError> {
        let (found, _, data) = self.fetch(dkey, FetchKind::Single { akey: akey.to_vec() }, epoch).await?;
        Ok(found.map(|_| data.to_vec()))
    }

    pub async fn write(&self, dkey: &[u8], akey: &[u8], offset: u64, data: &[u8]) -> Result<Epoch, ClientError> {
        let ops = vec![WireOp::Extent { akey: akey.to_vec(), offset, len: data.len() as u32 }];
        self.update(dkey, ops, Bytes::copy_from_slice(data)).await
    }

    /// Several extents of one array akey in one update: one round trip, one epoch.
    pub async fn write_extents(&self, dkey: &[u8], akey: &[u8], extents: &[(u64, &[u8])]) -> Result<Epoch, ClientError> {
        let ops = extents.iter().map(|(offset, d)| WireOp::Extent { akey: akey.to_vec(), offset: *offset, len: d.len() as u32 }).collect();
        let mut payload = Vec::with_capacity(extents.iter().map(|(_, d)| d.len()).sum());
        for (_, d) in extents {
            payload.extend_from_slice(d);
        }
        self.update(dkey, ops, Bytes::from(payload)).await
    }

    pub async fn read(&self, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch) -> Result<(Vec<u8>, Vec<(u64, u64)>), ClientError> {
        let (data, written) = self.read_bytes(dkey, akey, offset, len, epoch).await?;
        Ok((Vec::from(data), written))
    }

    /// As [`ObjHandle::read`], the bytes as received (no copy for a replicated object): a
    /// caller that keeps them, like a file system's block cache, slices them instead.
    pub async fn read_bytes(&self, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch) -> Result<(Bytes, Vec<(u64, u64)>), ClientError> {
        if let Ok(strata_types::Redundancy::Erasure { data, parity }) = self.oid.class().map(|c| c.redundancy()) {
            let client = self.cont.pool.client.clone();
            return self.retry("EC read", |view| {
                let client = client.clone();
                async move { self.ec_read(&client, &view, dkey, akey, offset, len, epoch, data as usize, parity as usize).await }
            })
            .await
            .map(|(d, w)| (Bytes::from(d), w));
        }
        let (_, written, data) = self.fetch(dkey, FetchKind::Extent { akey: akey.to_vec(), offset, len }, epoch).await?;
        Ok((data, written))
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_cell(&self, client: &Client, view: &PoolView, t: TargetId, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch) -> Result<(Vec<u8>, Vec<(u64, u64)>), RpcError> {
        let addr = view.info.rank_addrs.get(&t.rank).ok_or_else(|| RpcError::ConnectionClosed(format!("rank {}", t.rank)))?;
        let req = EngineReq::Fetch { pool: view.info.id, map_version: view.info.map.version, target: t.index, cont: self.cont.info.id, oid: self.oid, dkey: dkey.to_vec(), fetch: FetchKind::Extent { akey: akey.to_vec(), offset, len }, epoch };
        match client.engines.call::<_, EngineResp>(addr, &req, Bytes::new(), CALL_TIMEOUT).await? {
            (EngineResp::Fetched { written, .. }, data) => Ok((data.to_vec(), written)),
            _ => Err(RpcError::Protocol("unexpected engine reply".into())),
        }
    }

    /// Read an EC extent: each part from the data shard holding it; a stripe with a missing
    /// data shard is decoded from any k surviving cells (degraded read).
    #[allow(clippy::too_many_arguments)]
    async fn ec_read(&self, client: &Client, view: &PoolView, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch, k: usize, p: usize) -> Result<(Vec<u8>, Vec<(u64, u64)>), RpcError> {
        let st = strata_ec::EcStripe::new(k, p, strata_ec::CELL_BYTES_DEFAULT).map_err(|e| RpcError::Protocol(e.to_string()))?;
        let layout = view.placement.layout(self.oid).map_err(|e| RpcError::Protocol(e.to_string()))?;
        let group = layout.group(layout.group_for_dkey(dkey)).to_vec();
        let settled = Self::settled_group(view, self.oid, dkey);
        let sources: Vec<Option<TargetId>> = group.iter().enumerate().map(|(i, s)| strata_placement::read_source(&view.info.map, settled.as_deref(), i, s, false)).collect();
        let mut out = vec![0u8; len as usize];
        let mut written: Vec<(u64, u64)> = Vec::new();
        let spans = st.spans(offset, len);
        let mut degraded: std::collections::BTreeSet<u64> = Default::default();
        for sp in &spans {
            let Some(source) = sources[sp.cell] else {
                degraded.insert(sp.stripe);
                continue;
            };
            match self.fetch_cell(client, view, source, dkey, akey, sp.shard_offset, sp.buf.len() as u64, epoch).await {
                Ok((data, w)) => {
                    out[sp.buf.clone()].copy_from_slice(&data);
                    for (ws, wl) in w {
                        // Back from shard-local offsets to the object's offsets.
                        let g = offset + sp.buf.start as u64 + ws.saturating_sub(sp.shard_offset);
                        written.push((g, wl));
                    }
                }
                Err(RpcError::Remote(r)) if r.code != ErrorCode::Unavailable && r.code != ErrorCode::Corrupt => return Err(RpcError::Remote(r)),
                Err(_) => {
                    degraded.insert(sp.stripe);
                }
            }
        }
        for s in degraded {
            let mut cells: Vec<Option<Vec<u8>>> = vec![None; k + p];
            for i in 0..k + p {
                if let Some(source) = sources[i] {
                    if let Ok((c, _)) = self.fetch_cell(client, view, source, dkey, akey, s * st.cell_bytes, st.cell_bytes, epoch).await {
                        cells[i] = Some(c);
                    }
                }
            }
            st.reconstruct(&mut cells).map_err(|e| RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::Unavailable, e.to_string())))?;
            for sp in spans.iter().filter(|sp| sp.stripe == s) {
                let cell = cells[sp.cell].as_deref().unwrap_or_default();
                let from = (sp.shard_offset - s * st.cell_bytes) as usize;
                out[sp.buf.clone()].copy_from_slice(&cell[from..from + sp.buf.len()]);
                written.push((offset + sp.buf.start as u64, sp.buf.len() as u64));
            }
        }
        written.sort_unstable();
        Ok((out, written))
    }

    /// Several ops on one dkey in one round trip, at `epoch` (`None`: the leader picks);
    /// `payload` holds the data of the ops that carry any, in order.
    pub async fn update_ops_at(&self, dkey: &[u8], ops: Vec<WireOp>, payload: Bytes, epoch: Option<Epoch>) -> Result<Epoch, ClientError> {
        let need: usize = ops.iter().map(|o| o.payload_len()).sum();
        if need != payload.len() {
            return Err(ClientError::Invalid(format!("ops declare {need} payload bytes but {} were given", payload.len())));
        }
        self.update_at(dkey, ops, payload, epoch).await
    }

    /// Write an extent from a shared buffer (no copy) at `epoch` (`None`: the leader picks).
    pub async fn write_bytes_at(&self, dkey: &[u8], akey: &[u8], offset: u64, data: Bytes, epoch: Option<Epoch>) -> Result<Epoch, ClientError> {
        let ops = vec![WireOp::Extent { akey: akey.to_vec(), offset, len: data.len() as u32 }];
        self.update_at(dkey, ops, data, epoch).await
    }

    /// Punch `len` bytes of an array at `offset`: reads see a hole there.
    pub async fn punch_extent_at(&self, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Option<Epoch>) -> Result<Epoch, ClientError> {
        self.update_at(dkey, vec![WireOp::PunchExtent { akey: akey.to_vec(), offset, len }], Bytes::new(), epoch).await
    }

    pub async fn punch_dkey_at(&self, dkey: &[u8], epoch: Option<Epoch>) -> Result<Epoch, ClientError> {
        self.update_at(dkey, vec![WireOp::PunchDkey], Bytes::new(), epoch).await
    }

    pub async fn punch_dkey(&self, dkey: &[u8]) -> Result<Epoch, ClientError> {
        self.update(dkey, vec![WireOp::PunchDkey], Bytes::new()).await
    }

    pub async fn punch_akey(&self, dkey: &[u8], akey: &[u8]) -> Result<Epoch, ClientError> {
        self.update(dkey, vec![WireOp::PunchAkey { akey: akey.to_vec() }], Bytes::new()).await
    }

    /// Punch `[offset, offset + len)` of an array akey: it reads as zeros afterwards.
    pub async fn punch_extent(&self, dkey: &[u8], akey: &[u8], offset: u64, len: u64) -> Result<Epoch, ClientError> {
        self.update(dkey, vec![WireOp::PunchExtent { akey: akey.to_vec(), offset, len }], Bytes::new()).await
    }

    /// Punch the whole object: every group records the punch.
    pub async fn punch(&self) -> Result<(), ClientError> {
        let layout = self.cont.pool.layout(self.oid)?;
        for g in 0..layout.group_count() {
            // Any dkey that maps to group g carries the object punch to that group.
            let dkey = (0u64..).map(|i| i.to_be_bytes()).find(|d| layout.group_for_dkey(d) == g).unwrap_or_default();
            self.update(&dkey, vec![WireOp::PunchObject], Bytes::new()).await?;
        }
        Ok(())
    }

    /// Dkeys visible at `epoch`, merged over the object's groups.
    pub async fn list_dkeys(&self, epoch: Epoch) -> Result<Vec<Vec<u8>>, ClientError> {
        let client = self.cont.pool.client.clone();
        let cont = self.cont.info.id;
        self.retry("list", |view| {
            let (client, oid) = (client.clone(), self.oid);
            async move {
                let layout = view.placement.layout(oid).map_err(|e| RpcError::Protocol(e.to_string()))?;
                let settled = view.settled.as_ref().and_then(|p| p.layout(oid).ok());
                let mut all = std::collections::BTreeSet::new();
                for (g, group) in layout.groups().enumerate() {
                    let mut done = false;
                    let mut last = None;
                    let sg = settled.as_ref().map(|l| l.group(g));
                    let replicated = matches!(oid.class().map(|c| c.redundancy()), Ok(strata_types::Redundancy::Replicas(_)));
                    for t in group.iter().enumerate().filter_map(|(i, s)| strata_placement::read_source(&view.info.map, sg, i, s, replicated)) {
                        let Some(addr) = view.info.rank_addrs.get(&t.rank) else { continue };
                        let mut cursor = None;
                        let r: Result<(), RpcError> = async {
                            loop {
                                let req = EngineReq::ListDkeys { pool: view.info.id, map_version: view.info.map.version, target: t.index, cont, oid, epoch, cursor: cursor.clone(), limit: 1000 };
                                match client.engines.call::<_, EngineResp>(addr, &req, Bytes::new(), CALL_TIMEOUT).await? {
                                    (EngineResp::Keys { keys, next }, _) => {
                                        all.extend(keys);
                                        if next.is_none() {
                                            return Ok(());
                                        }
                                        cursor = next;
                                    }
                                    _ => return Err(RpcError::Protocol("unexpected engine reply".into())),
                                }
                            }
                        }
                        .await;
                        match r {
                            Ok(()) => {
                                done = true;
                                break;
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    if !done {
                        return Err(last.unwrap_or(RpcError::ConnectionClosed("no replica reachable".into())));
                    }
                }
                Ok(all.into_iter().collect())
            }
        })
        .await
    }
}

impl ObjHandle {
    /// Akeys of one dkey visible at `epoch`, in byte order, after `cursor`, at most `limit`.
    /// Returns the keys and whether more may follow.
    pub async fn list_akeys(&self, dkey: &[u8], epoch: Epoch, cursor: Option<Vec<u8>>, limit: u32) -> Result<(Vec<Vec<u8>>, Option<Vec<u8>>), ClientError> {
        let client = self.cont.pool.client.clone();
        let cont = self.cont.info.id;
        self.retry("list akeys", |view| {
            let (client, oid, cursor) = (client.clone(), self.oid, cursor.clone());
            async move {
                let mut last = None;
                for t in Self::readable_shards(&view, oid, dkey)? {
                    let Some(addr) = view.info.rank_addrs.get(&t.rank) else { continue };
                    let req = EngineReq::ListAkeys { pool: view.info.id, map_version: view.info.map.version, target: t.index, cont, oid, dkey: dkey.to_vec(), epoch, cursor: cursor.clone(), limit };
                    match client.engines.call::<_, EngineResp>(addr, &req, Bytes::new(), CALL_TIMEOUT).await {
                        Ok((EngineResp::Keys { keys, next }, _)) => return Ok((keys, next)),
                        Ok(_) => return Err(RpcError::Protocol("unexpected engine reply".into())),
                        Err(RpcError::Remote(r)) if r.code != ErrorCode::Corrupt && r.code != ErrorCode::Unavailable => return Err(RpcError::Remote(r)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or(RpcError::ConnectionClosed("no replica reachable".into())))
            }
        })
        .await
    }
}

impl PoolHandle {
    /// One engine request under the current pool map, for layers above objects (the KV layer)
    /// that route by their own rules: `pick` chooses the target from the map and the object's
    /// layout, `make` builds the request for (pool id, map version, target). No retries: the
    /// caller branches on the error (refresh on `StaleMap`, retry on transient ones).
    pub async fn call_engine(
        &self,
        oid: Oid,
        pick: impl FnOnce(&strata_placement::PoolMap, &Layout) -> Option<TargetId>,
        make: impl FnOnce(strata_types::PoolId, u64, TargetId) -> EngineReq,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(EngineResp, Bytes), RpcError> {
        let view = self.view().map_err(|e| RpcError::Protocol(e.to_string()))?;
        self.call_engine_in(&view, oid, pick, make, payload, timeout).await
    }

    async fn call_engine_in(
        &self,
        view: &PoolView,
        oid: Oid,
        pick: impl FnOnce(&strata_placement::PoolMap, &Layout) -> Option<TargetId>,
        make: impl FnOnce(strata_types::PoolId, u64, TargetId) -> EngineReq,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(EngineResp, Bytes), RpcError> {
        let layout = view.placement.layout(oid).map_err(|e| RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::InvalidArgument, e.to_string())))?;
        let t = pick(&view.info.map, &layout).ok_or_else(|| RpcError::Remote(strata_rpc::RemoteError::new(ErrorCode::Unavailable, "no readable replica holds this shard (every replica down or not yet rebuilt)")))?;
        let addr = view.info.rank_addrs.get(&t.rank).ok_or_else(|| RpcError::ConnectionClosed(format!("no address for rank {}", t.rank)))?;
        let req = make(view.info.id, view.info.map.version, t);
        self.client.engines.call::<_, EngineResp>(addr, &req, payload, timeout).await
    }

    /// Ask every engine of the pool's map, in parallel; answers in rank order (errors included).
    pub async fn call_all_engines(&self, req: &EngineReq, timeout: Duration) -> Result<Vec<Result<(EngineResp, Bytes), RpcError>>, ClientError> {
        let view = self.view()?;
        let calls = view.info.rank_addrs.values().map(|addr| self.client.engines.call::<_, EngineResp>(addr, req, Bytes::new(), timeout));
        Ok(futures::future::join_all(calls).await)
    }
}

impl Client {
    /// The engine address of the shard a capability names (the token's claims, unverified:
    /// the engine verifies) and the pool's label.
    async fn cap_target(&self, token: &str) -> Result<(String, String), ClientError> {
        let claims = strata_rpc::capability::peek(token).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let info = match self.mgmt.query(MgmtQuery::Pool { pool: claims.pool.to_string() }).await? {
            MgmtReply::Pool(p) => p,
            other => return Err(ClientError::Invalid(format!("unexpected reply {other:?}"))),
        };
        let addr = info.rank_addrs.get(&claims.target.rank).cloned().ok_or_else(|| ClientError::Invalid(format!("rank {} of the capability is not in the pool", claims.target.rank)))?;
        Ok((addr, info.label))
    }

    /// An engine's answer to a capability-only request; its refusal for an unclean container
    /// (the engine checks, since no handle does) as [`ClientError::Unclean`].
    async fn cap_call(&self, token: &str, req: &EngineReq, payload: Bytes) -> Result<(EngineResp, Bytes), ClientError> {
        let (addr, pool) = self.cap_target(token).await?;
        let r = self.engines.call::<_, EngineResp>(&addr, req, payload, CALL_TIMEOUT).await;
        if let Err(strata_rpc::RpcError::Remote(e)) = &r {
            if let Some(u) = UncleanCont::from_refusal(e) {
                return Err(ClientError::Unclean { pool, cont: u.label, rf: u.rf, reason: u.reason });
            }
        }
        Ok(r?)
    }

    /// Read with only a capability (a `read_cap`): `(found epoch, written extents, data)`.
    pub async fn cap_fetch(&self, token: &str, dkey: &[u8], fetch: FetchKind, epoch: Epoch) -> Result<(Option<Epoch>, Vec<(u64, u64)>, Bytes), ClientError> {
        let req = EngineReq::CapFetch { token: token.to_owned(), dkey: dkey.to_vec(), fetch, epoch };
        match self.cap_call(token, &req, Bytes::new()).await? {
            (EngineResp::Fetched { found, written }, data) => Ok((found, written, data)),
            _ => Err(ClientError::Invalid("unexpected engine reply".into())),
        }
    }

    /// Write an extent with only a capability (a leader block's `write_cap`).
    pub async fn cap_write(&self, token: &str, dkey: &[u8], akey: &[u8], offset: u64, data: &[u8]) -> Result<Epoch, ClientError> {
        let ops = vec![WireOp::Extent { akey: akey.to_vec(), offset, len: data.len() as u32 }];
        let req = EngineReq::CapUpdate { token: token.to_owned(), dkey: dkey.to_vec(), ops };
        match self.cap_call(token, &req, Bytes::copy_from_slice(data)).await? {
            (EngineResp::Updated { epoch }, _) => Ok(epoch),
            _ => Err(ClientError::Invalid("unexpected engine reply".into())),
        }
    }
}
