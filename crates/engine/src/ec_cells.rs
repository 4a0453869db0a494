//! Erasure-coded cells in the engine: which shard index a target serves for a dkey (its cells
//! are stored in that index's offset range, `ec_rebuild::cell_offset`), fetches in shard-local
//! offsets, and EC rebuild's paging over every source shard at once.

use super::*;
use std::collections::VecDeque;

impl Engine {
    /// The shard index target `t` serves for `dkey` of EC object `oid` under `view`: its place in
    /// the group, or the draining home a shard is read from while its spare fills (`None` for
    /// other classes, or a target that serves no shard of the group).
    pub(super) fn ec_shard_of(view: &PoolView, oid: strata_types::Oid, dkey: &[u8], t: TargetId) -> Option<usize> {
        // The class is in the oid: other classes' fetches compute no layout.
        if !matches!(oid.class().map(|c| c.redundancy()), Ok(Redundancy::Erasure { .. })) {
            return None;
        }
        let layout = view.placement.layout(oid).ok()?;
        let group = layout.group(layout.group_for_dkey(dkey));
        group.iter().position(|s| s.target == t).or_else(|| group.iter().position(|s| s.is_spare && s.home == t))
    }
}

/// One fetch from a target of this engine, as `EngineReq::Fetch` answers it; an extent of an EC
/// shard (`shard`) is asked for and answered in shard-local offsets.
pub(super) fn fetch_shard(vos: &Vos, cont: strata_types::ContId, oid: strata_types::Oid, dkey: &[u8], fetch: FetchKind, epoch: Epoch, shard: Option<usize>) -> Result<(EngineResp, Bytes), VosError> {
    let (Some(i), FetchKind::Extent { akey, offset, len }) = (shard, &fetch) else { return fetch_local(vos, cont, oid, dkey, fetch, epoch) };
    if offset.saturating_add(*len) > ec_rebuild::SHARD_SPAN {
        return Err(VosError::ExtentOutOfRange { offset: *offset, len: *len, max: ec_rebuild::SHARD_SPAN });
    }
    let base = ec_rebuild::cell_offset(i, 0);
    let r = vos.fetch_extent(cont, oid, dkey, akey, base + offset, *len, epoch)?;
    let written = r.written.into_iter().map(|(o, l)| (o - base, l)).collect();
    Ok((EngineResp::Fetched { found: None, written }, Bytes::from(r.data)))
}

/// One source shard of an EC rebuild page by page: its own rows (`ec_rebuild::own_row`) keyed
/// by stripe version (`key_for_shard(key, 0)`), read ahead of the others at most a page.
struct SourcePages {
    shard: usize,
    target: TargetId,
    /// The raw key the next page starts after.
    after: Option<Vec<u8>>,
    /// Rows read and not yet decoded, by version key.
    rows: VecDeque<(Vec<u8>, strata_vos::RawRecord)>,
    /// Every own row up to this version key has been read (`None`: none yet).
    frontier: Option<Vec<u8>>,
    done: bool,
}

impl Engine {
    /// EC cells are decoded, not copied: gather the group's records from every readable shard
    /// and compute each destination shard's records from them.
    ///
    /// Paging: every stripe version must be decoded from all its cells at once, so rows are
    /// decoded up to the smallest version key every source has read through (`frontier`); the
    /// source that is behind reads its next page. A source may also hold cells of another index
    /// (from an extension): they are skipped but still paged over.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn rebuild_ec_group(&self, view: &PoolView, cont: strata_types::ContId, oid: strata_types::Oid, layout: &strata_placement::Layout, g: usize, group: &[strata_placement::ShardLoc], dests: &[TargetId], k: usize, p: usize, id: u64) -> Result<u64, RemoteError> {
        let st = strata_ec::EcStripe::new(k, p, strata_ec::CELL_BYTES_DEFAULT).map_err(|e| rerr(ErrorCode::Internal, e.to_string()))?;
        // Only shards holding their full data are decoded from: a spare not yet filled (or
        // one a newer failure just put in place) lacks older stripe versions, and reading it
        // as its index could mix in whatever else it holds.
        let mut sources: Vec<SourcePages> = view.read_sources(oid, layout, g).into_iter().enumerate().filter_map(|(i, t)| t.map(|t| SourcePages { shard: i, target: t, after: None, rows: VecDeque::new(), frontier: None, done: false })).collect();
        let in_group = |r: &strata_vos::RawRecord| r.dkey().is_none_or(|d| layout.group_for_dkey(&d) == g);
        let mut pushed = 0;
        loop {
            // Sources that are behind (none read yet, or at the smallest frontier) read a page.
            let behind: Option<Option<Vec<u8>>> = sources.iter().filter(|s| !s.done).map(|s| s.frontier.clone()).min();
            let reads = sources.iter().enumerate().filter(|(_, s)| !s.done && Some(&s.frontier) == behind.as_ref()).map(|(n, s)| {
                let (t, after) = (s.target, s.after.clone());
                async move { (n, t, self.export_page(view, t, cont, oid, after, None).await) }
            });
            for (n, t, r) in futures::future::join_all(reads).await {
                let s = &mut sources[n];
                match r {
                    Ok((records, truncated)) => {
                        s.after = records.iter().rev().find(|x| !x.punch).map(|x| x.key.clone()).or(s.after.take());
                        s.done = !truncated;
                        let shard = s.shard;
                        for r in records.into_iter().filter(|r| ec_rebuild::own_row(r, shard) && in_group(r)) {
                            let version = ec_rebuild::key_for_shard(&r.key, 0);
                            if !r.punch {
                                s.frontier = Some(version.clone());
                            }
                            s.rows.push_back((version, r));
                        }
                    }
                    // Damaged records: the others may still decode every stripe.
                    Err(e) if e.code == ErrorCode::Corrupt => {
                        tracing::warn!(shard = %t, error = %e, "EC rebuild source damaged; decoding from the others");
                        s.done = true;
                    }
                    // A shard the map calls readable did not answer: decoding without it could
                    // leave stripes out while the pass reports success, so the pass fails and
                    // runs again (on a newer map if the shard is gone).
                    Err(e) => return Err(e),
                }
            }
            // Rows up to the smallest frontier of a source with more to read are complete.
            let upto: Option<Vec<u8>> = match sources.iter().filter(|s| !s.done).map(|s| s.frontier.clone()).min() {
                None => None,
                Some(None) => continue,
                Some(Some(f)) => Some(f),
            };
            let page: Vec<(usize, Vec<strata_vos::RawRecord>)> = sources
                .iter_mut()
                .map(|s| {
                    let n = s.rows.iter().take_while(|(v, r)| r.punch || upto.as_ref().is_none_or(|u| v <= u)).count();
                    (s.shard, s.rows.drain(..n).map(|(_, r)| r).collect())
                })
                .collect();
            pushed += self.push_ec_page(view, &st, oid, g, group, dests, &page, id).await?;
            if upto.is_none() {
                return Ok(pushed);
            }
        }
    }
}
