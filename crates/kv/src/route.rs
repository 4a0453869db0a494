//! The KV client's wire side: every request goes to the leader of its shard (computed from
//! the pool map, `kv_msg::kv_leader`), through map changes and failovers until the operation
//! deadline. Here too is the client half of commit: the one-round fast path for one shard, and
//! two-phase commit with the transaction record on the first written shard otherwise.

use crate::error::KvError;
use crate::shard_map::ShardMap;
use crate::txn::{successor, Txn};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use strata_client::ContHandle;
use strata_rpc::engine_msg::{EngineReq, EngineResp};
use strata_rpc::kv_msg::*;
use strata_rpc::{ErrorCode, RpcError};
use strata_types::{Epoch, Hlc, Oid, SystemClock};

/// One attempt's wait for an engine.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one operation keeps retrying through map changes, failovers and busy keys.
const OP_DEADLINE: Duration = Duration::from_secs(40);
/// Keys one scan request asks a shard for.
const SCAN_PAGE: usize = 1000;
/// Attempts one call makes at most (each bounded by `CALL_TIMEOUT`; the deadline cuts first).
const ATTEMPTS_MAX: u32 = 1000;

pub(crate) struct Route {
    cont: ContHandle,
    oid: Oid,
    /// The client's clock: every epoch an engine answers is merged, so a transaction begun
    /// after a commit returned reads at or above that commit.
    hlc: Hlc,
}

fn rpc_err(e: RpcError) -> KvError {
    match e {
        RpcError::Remote(r) => match r.code {
            ErrorCode::InvalidArgument => KvError::Remote(r.message),
            ErrorCode::NotFound => KvError::NotAStore(r.message),
            ErrorCode::NoSpace => KvError::NoSpace(r.message),
            _ => KvError::Unavailable(r.message),
        },
        other => KvError::Unavailable(other.to_string()),
    }
}

fn refusal(r: KvRefusal) -> KvError {
    match r {
        KvRefusal::Conflict { key, reason } => KvError::Conflict { key, reason },
        KvRefusal::CasFailed { key, current } => KvError::CasFailed { key, current },
    }
}

/// A one-round commit's refusal, unless an earlier attempt of the same commit failed after it
/// was sent (`call_noting_failures`): then the refusal may be caused by that attempt's own
/// writes, so the outcome is not known.
fn commit_refusal(r: KvRefusal, earlier_attempt_failed: bool) -> KvError {
    if earlier_attempt_failed {
        let why = match &r {
            KvRefusal::Conflict { reason, .. } => reason.clone(),
            KvRefusal::CasFailed { .. } => "the compare-and-set found another value".into(),
        };
        return KvError::Indeterminate(format!("an earlier attempt of this commit got no answer and the retry was refused ({why}): the earlier one may have committed; read the keys to find out"));
    }
    refusal(r)
}

/// A one-round commit's failure. When an earlier attempt of it was sent and its answer lost
/// (`call_noting_failures`), that attempt may have committed whatever ends the later ones:
/// a refused retry (unclean container, no space), or no answer until the deadline. Reporting
/// those as they are would tell the caller that nothing was written (`Unavailable` even says
/// "run it again"), and a transaction run again could be applied twice.
fn commit_failure(e: KvError, earlier_attempt_failed: bool) -> KvError {
    if !earlier_attempt_failed {
        return e;
    }
    let then = match &e {
        KvError::Client(strata_client::ClientError::Unclean { .. }) => format!("the retry was refused ({e}); the earlier one may have committed: once the container is usable, read the keys to find out"),
        _ => format!("the retries then failed ({e}); the earlier one may have committed: read the keys to find out"),
    };
    KvError::Indeterminate(format!("an earlier attempt of this commit got no answer and {then}"))
}

fn new_txn_id() -> TxnId {
    *uuid::Uuid::new_v4().as_bytes()
}

/// Wire form of buffered writes: ops plus their values concatenated.
fn wire_writes(writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> (Vec<KvWrite>, Bytes) {
    let mut payload = Vec::with_capacity(writes.iter().map(|(_, v)| v.as_ref().map_or(0, Vec::len)).sum());
    let ops = writes
        .iter()
        .map(|(k, v)| match v {
            Some(v) => {
                payload.extend_from_slice(v);
                KvWrite::Put { key: k.clone(), len: v.len() as u32 }
            }
            None => KvWrite::Delete { key: k.clone() },
        })
        .collect();
    (ops, Bytes::from(payload))
}

/// A transaction after phase one.
pub(crate) enum Prepared {
    /// One shard: committed in the same round.
    Committed(Epoch),
    TwoPhase(TwoPhase),
}

pub(crate) struct TwoPhase {
    pub(crate) id: TxnId,
    pub(crate) coord: Vec<u8>,
    pub(crate) shards: Vec<u32>,
    pub(crate) proposal: Epoch,
}

/// Send one request to the leader of shard `dkey`, retrying through stale maps, failovers
/// and busy keys until the deadline.
async fn call(cont: &ContHandle, oid: Oid, dkey: &[u8], make: impl Fn(KvShard) -> KvReq, payload: Bytes) -> Result<(KvResp, Bytes), KvError> {
    call_noting_failures(cont, oid, dkey, make, payload, &mut false).await
}

/// `call`, setting `sent_and_failed` when an attempt failed after it was sent (answered or
/// not in the end, so that a commit's caller can judge a refusal or an error). Such an
/// attempt may have been carried out with only its answer lost (a leader that wrote a
/// one-round commit, then died or lost its place in a new map): its retry can find the
/// commit's own writes and be refused for them, and a new leader does not remember the
/// transaction. Only a failed connection (the request never left) is known not to have run;
/// a stale-map or busy answer may come from a leader that already wrote some replicas.
async fn call_noting_failures(cont: &ContHandle, oid: Oid, dkey: &[u8], make: impl Fn(KvShard) -> KvReq, payload: Bytes, sent_and_failed: &mut bool) -> Result<(KvResp, Bytes), KvError> {
    let start = Instant::now();
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS_MAX {
        let cont_id = cont.info.id;
        // An unclean container (fault domains lost beyond its redundancy) is refused, not read.
        let r = cont
            .call_engine(
                oid,
                |map, layout| kv_leader(map, layout.group(layout.group_for_dkey(dkey))),
                |pool, map_version, _| EngineReq::Kv(make(KvShard { pool, map_version, cont: cont_id, oid, dkey: dkey.to_vec() })),
                payload.clone(),
                CALL_TIMEOUT,
            )
            .await?;
        let e = match r {
            Ok((EngineResp::Kv(resp), data)) => return Ok((resp, data)),
            Ok(other) => return Err(KvError::Remote(format!("unexpected engine reply {other:?}"))),
            Err(e) => e,
        };
        *sent_and_failed |= !matches!(e, RpcError::Connect { .. });
        let stale = matches!(&e, RpcError::Remote(r) if r.code == ErrorCode::StaleMap);
        let busy = matches!(&e, RpcError::Remote(r) if r.code == ErrorCode::Busy);
        if !(stale || e.is_transient()) {
            return Err(rpc_err(e));
        }
        last = e.to_string();
        if start.elapsed() > OP_DEADLINE {
            break;
        }
        if !stale {
            tokio::time::sleep(Duration::from_millis((20 * u64::from(attempt)).min(500))).await;
        }
        if !busy {
            if let Err(e) = cont.pool.refresh().await {
                tracing::debug!(error = %e, "KV: pool map refresh failed; retrying");
            }
        }
    }
    Err(KvError::Unavailable(format!("gave up after {:?}: {last}", start.elapsed())))
}

struct Participant {
    reads: ReadSet,
    checks: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Route {
    pub(crate) fn new(cont: ContHandle, oid: Oid) -> Route {
        Route { cont, oid, hlc: Hlc::new(Box::new(SystemClock), strata_types::HLC_MAX_DRIFT_MS_DEFAULT) }
    }

    pub(crate) fn now(&self) -> Result<Epoch, KvError> {
        self.hlc.now().map_err(|e| KvError::Remote(e.to_string()))
    }

    fn observe(&self, e: Epoch) {
        // An epoch too far ahead of our wall clock is not merged; reads stay correct (the
        // engines order them), only read-your-writes across clients would suffer.
        let _ = self.hlc.update(e);
    }

    async fn call(&self, dkey: &[u8], make: impl Fn(KvShard) -> KvReq, payload: Bytes) -> Result<(KvResp, Bytes), KvError> {
        call(&self.cont, self.oid, dkey, make, payload).await
    }

    /// An epoch at or above every engine's clock (the seed's snapshot rule). Engines that do
    /// not answer (dead) are skipped: every commit they acknowledged was also merged into the
    /// clocks of its other replicas. The client's own clock covers what it saw committed.
    pub(crate) async fn max_epoch(&self) -> Result<Epoch, KvError> {
        let start = Instant::now();
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS_MAX {
            let answers = self.cont.pool.call_all_engines(&EngineReq::Clock, CALL_TIMEOUT).await?;
            let mut best = None;
            for a in answers {
                match a {
                    Ok((EngineResp::Clock { epoch }, _)) => best = best.max(Some(epoch)),
                    Ok(_) => last = "unexpected answer to a clock query".into(),
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(e) = best {
                let e = e.max(self.hlc.peek());
                self.observe(e);
                return Ok(e);
            }
            if start.elapsed() > OP_DEADLINE {
                break;
            }
            // Connections to restarted engines reopen on the next call; a new map may list
            // new addresses.
            tokio::time::sleep(Duration::from_millis((50 * u64::from(attempt)).min(500))).await;
            let _ = self.cont.pool.refresh().await;
        }
        Err(KvError::Unavailable(format!("no engine of the pool answered a clock query; cannot pick a snapshot epoch ({last})")))
    }

    pub(crate) async fn get(&self, map: &ShardMap, key: &[u8], at: Option<Epoch>) -> Result<(Option<Vec<u8>>, Epoch), KvError> {
        let dkey = ShardMap::shard_dkey(map.shard_of(key));
        match self.call(&dkey, |shard| KvReq::Get { shard, key: key.to_vec(), at }, Bytes::new()).await? {
            (KvResp::Value { found, read_at }, data) => {
                self.observe(read_at);
                Ok((found.map(|_| data.to_vec()), read_at))
            }
            (other, _) => Err(KvError::Remote(format!("unexpected answer to a get: {other:?}"))),
        }
    }

    /// A one-key transaction in one round (put, delete, compare-and-set). A conflict with a
    /// transaction holding the key is retried until the deadline: these carry no reads, so
    /// running them again is always right.
    pub(crate) async fn write1(&self, map: &ShardMap, key: &[u8], cas: Option<Option<&[u8]>>, value: Option<&[u8]>) -> Result<Epoch, KvError> {
        let dkey = ShardMap::shard_dkey(map.shard_of(key));
        let txn = new_txn_id();
        let (writes, payload) = wire_writes(&[(key.to_vec(), value.map(<[u8]>::to_vec))]);
        let checks: Vec<(Vec<u8>, Option<Vec<u8>>)> = cas.map(|e| vec![(key.to_vec(), e.map(<[u8]>::to_vec))]).unwrap_or_default();
        let start = Instant::now();
        let mut failed_before = false;
        for attempt in 1..=ATTEMPTS_MAX {
            let rts = self.now()?;
            let req = |shard| KvReq::Commit1 { shard, txn, rts, reads: ReadSet::default(), checks: checks.clone(), writes: writes.clone() };
            let (resp, _) = call_noting_failures(&self.cont, self.oid, &dkey, req, payload.clone(), &mut failed_before).await.map_err(|e| commit_failure(e, failed_before))?;
            match resp {
                KvResp::Committed { epoch } => {
                    self.observe(epoch);
                    return Ok(epoch);
                }
                // A conflict here is another transaction's lock (a compare-and-set's value check
                // answers CasFailed), and writing the same value again is always right.
                KvResp::Refused(KvRefusal::Conflict { key, reason }) => {
                    if start.elapsed() > OP_DEADLINE {
                        return Err(commit_refusal(KvRefusal::Conflict { key, reason }, failed_before));
                    }
                    tokio::time::sleep(Duration::from_millis((5 * u64::from(attempt)).min(200))).await;
                }
                KvResp::Refused(r) => return Err(commit_refusal(r, failed_before)),
                other => return Err(KvError::Remote(format!("unexpected answer to a commit: {other:?}"))),
            }
        }
        Err(commit_refusal(KvRefusal::Conflict { key: Some(key.to_vec()), reason: "kept conflicting".into() }, failed_before))
    }

    async fn scan_page(&self, shard: u32, start: &[u8], end: Option<&[u8]>, limit: usize, at: Epoch) -> Result<(VecDeque<(Vec<u8>, Vec<u8>)>, bool), KvError> {
        let dkey = ShardMap::shard_dkey(shard);
        let range = KeyRange { start: start.to_vec(), end: end.map(<[u8]>::to_vec) };
        match self.call(&dkey, |shard| KvReq::Scan { shard, range: range.clone(), limit: limit as u32, at }, Bytes::new()).await? {
            (KvResp::Scanned { keys, more, read_at }, data) => {
                self.observe(read_at);
                let mut at = 0usize;
                let mut rows = VecDeque::with_capacity(keys.len());
                for (k, n) in keys {
                    let v = data.get(at..at + n as usize).ok_or_else(|| KvError::Remote("scan answer shorter than its keys declare".into()))?;
                    at += n as usize;
                    rows.push_back((k, v.to_vec()));
                }
                Ok((rows, more))
            }
            (other, _) => Err(KvError::Remote(format!("unexpected answer to a scan: {other:?}"))),
        }
    }

    /// Keys of `[start, end)` at `at` over every shard that may hold some, merged in key order.
    pub(crate) async fn scan(&self, map: &ShardMap, start: &[u8], end: Option<&[u8]>, limit: usize, at: Epoch) -> Result<Vec<(Vec<u8>, Vec<u8>)>, KvError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let page = limit.min(SCAN_PAGE);
        let shards = map.shards_for_range(start, end);
        let firsts = futures::future::join_all(shards.iter().map(|s| self.scan_page(*s, start, end, page, at))).await;
        struct Cursor {
            shard: u32,
            rows: VecDeque<(Vec<u8>, Vec<u8>)>,
            more: bool,
        }
        let mut curs = Vec::with_capacity(shards.len());
        for (s, r) in shards.iter().zip(firsts) {
            let (rows, more) = r?;
            curs.push(Cursor { shard: *s, rows, more });
        }
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit {
            for c in curs.iter_mut().filter(|c| c.rows.is_empty() && c.more) {
                let from = out.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| successor(k)).unwrap_or_else(|| start.to_vec());
                let (rows, more) = self.scan_page(c.shard, &from, end, page, at).await?;
                c.rows = rows;
                c.more = more;
            }
            let Some(best) = curs.iter_mut().filter(|c| !c.rows.is_empty()).min_by(|a, b| a.rows[0].0.cmp(&b.rows[0].0)) else { break };
            if let Some(row) = best.rows.pop_front() {
                out.push(row);
            }
            if best.rows.is_empty() && best.more {
                // Refill from just after this shard's last key on the next turn.
                let last = out.last().map(|(k, _)| k.clone()).unwrap_or_default();
                let (rows, more) = self.scan_page(best.shard, &successor(&last), end, page, at).await?;
                best.rows = rows;
                best.more = more;
            }
        }
        Ok(out)
    }

    /// Commit a transaction with writes.
    pub(crate) async fn commit(&self, map: &ShardMap, txn: Txn) -> Result<Epoch, KvError> {
        let p = match self.prepare(map, &txn, false).await? {
            Prepared::Committed(e) => return Ok(e),
            Prepared::TwoPhase(p) => p,
        };
        if txn.started.elapsed() > txn.deadline {
            self.abort(&p.coord, p.id, p.shards.iter().copied()).await;
            return Err(KvError::Deadline { deadline_ms: txn.deadline.as_millis() as u64 });
        }
        let d = self.decide(&p).await?;
        self.finish(&p, d).await
    }

    /// Phase one (or the whole one-round commit when one shard is involved and `force_2pc`
    /// is off). On failure every participant is told to drop its intents.
    pub(crate) async fn prepare(&self, map: &ShardMap, txn: &Txn, force_2pc: bool) -> Result<Prepared, KvError> {
        let mut parts: BTreeMap<u32, Participant> = BTreeMap::new();
        let new = || Participant { reads: ReadSet::default(), checks: Vec::new(), writes: Vec::new() };
        for (k, v) in &txn.writes {
            parts.entry(map.shard_of(k)).or_insert_with(new).writes.push((k.clone(), v.clone()));
        }
        for k in &txn.reads {
            parts.entry(map.shard_of(k)).or_insert_with(new).reads.keys.push(k.clone());
        }
        for r in &txn.ranges {
            for s in map.shards_for_range(&r.start, r.end.as_deref()) {
                parts.entry(s).or_insert_with(new).reads.ranges.push(r.clone());
            }
        }
        for (k, v) in &txn.checks {
            parts.entry(map.shard_of(k)).or_insert_with(new).checks.push((k.clone(), v.clone()));
        }
        let (id, rts) = (txn.id, txn.rts);
        if parts.len() == 1 && !force_2pc {
            let (shard, p) = parts.into_iter().next().expect("one participant");
            let (writes, payload) = wire_writes(&p.writes);
            let req = |s| KvReq::Commit1 { shard: s, txn: id, rts, reads: p.reads.clone(), checks: p.checks.clone(), writes: writes.clone() };
            let mut failed_before = false;
            let answer = call_noting_failures(&self.cont, self.oid, &ShardMap::shard_dkey(shard), req, payload, &mut failed_before).await;
            return match answer.map_err(|e| commit_failure(e, failed_before))? {
                (KvResp::Committed { epoch }, _) => {
                    self.observe(epoch);
                    Ok(Prepared::Committed(epoch))
                }
                (KvResp::Refused(r), _) => Err(commit_refusal(r, failed_before)),
                (other, _) => Err(KvError::Remote(format!("unexpected answer to a commit: {other:?}"))),
            };
        }
        // `Txn::commit` turned the checks of a multi-shard transaction into reads.
        assert!(txn.checks.is_empty(), "compare-and-set checks reached a two-phase commit");
        // Two-phase commit; the record lives on the shard of the first written key.
        let first = txn.writes.keys().next().ok_or_else(|| KvError::Remote("two-phase commit without writes".into()))?;
        let coord = ShardMap::shard_dkey(map.shard_of(first)).to_vec();
        let prepares = parts.iter().map(|(shard, p)| {
            let (writes, payload) = wire_writes(&p.writes);
            let coord = coord.clone();
            async move {
                let req = |s| KvReq::Prepare { shard: s, txn: id, coord: coord.clone(), rts, reads: p.reads.clone(), writes: writes.clone() };
                self.call(&ShardMap::shard_dkey(*shard), req, payload).await
            }
        });
        let mut proposal = Epoch::ZERO;
        let mut failure: Option<KvError> = None;
        for r in futures::future::join_all(prepares).await {
            match r {
                Ok((KvResp::Prepared { proposal: p }, _)) => proposal = proposal.max(p),
                Ok((KvResp::Refused(r), _)) => failure = failure.or(Some(refusal(r))),
                Ok((other, _)) => failure = failure.or(Some(KvError::Remote(format!("unexpected answer to a prepare: {other:?}")))),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        let shards: Vec<u32> = parts.keys().copied().collect();
        if let Some(f) = failure {
            self.abort(&coord, id, shards.into_iter()).await;
            return Err(f);
        }
        Ok(Prepared::TwoPhase(TwoPhase { id, coord, shards, proposal }))
    }

    /// The commit point: record Committed at the coordinator, unless a reader aborted the
    /// transaction first (the recorded decision is the answer).
    pub(crate) async fn decide(&self, p: &TwoPhase) -> Result<Decision, KvError> {
        match self.call(&p.coord, |s| KvReq::Decide { shard: s, txn: p.id, decision: Decision::Committed(p.proposal) }, Bytes::new()).await {
            Ok((KvResp::Decided(d), _)) => Ok(d),
            Ok((other, _)) => Err(KvError::Indeterminate(format!("unexpected answer to the commit decision: {other:?}"))),
            Err(e) => Err(KvError::Indeterminate(format!("the coordinator did not confirm the commit: {e}"))),
        }
    }

    /// Phase two: every participant applies the decision; then the record can go.
    pub(crate) async fn finish(&self, p: &TwoPhase, d: Decision) -> Result<Epoch, KvError> {
        let id = p.id;
        let resolves = p.shards.iter().map(|s| async move { self.call(&ShardMap::shard_dkey(*s), move |sh| KvReq::Resolve { shard: sh, txn: id, decision: d }, Bytes::new()).await });
        let all_resolved = futures::future::join_all(resolves).await.iter().all(Result::is_ok);
        match d {
            Decision::Committed(c) => {
                self.observe(c);
                if all_resolved {
                    // Every intent is gone: nobody will ask for the record again. Not on the
                    // commit's path; a record left behind (the client exited) is harmless.
                    let (cont, oid, coord) = (self.cont.clone(), self.oid, p.coord.clone());
                    tokio::spawn(async move {
                        let _ = call(&cont, oid, &coord, |s| KvReq::Forget { shard: s, txn: id }, Bytes::new()).await;
                    });
                }
                Ok(c)
            }
            Decision::Aborted => Err(KvError::Conflict { key: None, reason: "aborted by another client that found this transaction stalled".into() }),
        }
    }

    /// Record the abort (so that readers meeting a stray intent settle it at once) and drop
    /// the intents everywhere; best effort: leftovers are aborted when met.
    pub(crate) async fn abort(&self, coord: &[u8], id: TxnId, shards: impl Iterator<Item = u32>) {
        let decide = self.call(coord, |s| KvReq::Decide { shard: s, txn: id, decision: Decision::Aborted }, Bytes::new());
        let d = match decide.await {
            Ok((KvResp::Decided(d), _)) => d,
            _ => Decision::Aborted,
        };
        let shards: Vec<u32> = shards.collect();
        let resolves = shards.iter().map(|s| async move { self.call(&ShardMap::shard_dkey(*s), move |sh| KvReq::Resolve { shard: sh, txn: id, decision: d }, Bytes::new()).await });
        futures::future::join_all(resolves).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_out_of_space_is_no_space_and_not_retried() {
        let r = |code, message: &str| RpcError::Remote(strata_rpc::RemoteError { code, message: message.into(), detail: None });
        let full = rpc_err(r(ErrorCode::NoSpace, "target 1.0: 200 MiB free, reserve 256 MiB"));
        assert!(matches!(full, KvError::NoSpace(_)), "{full:?}");
        assert!(!full.is_retryable(), "retrying cannot help until space is freed");
        assert!(full.to_string().contains("reserve 256 MiB"), "{full}");
        assert!(rpc_err(r(ErrorCode::Internal, "busy")).is_retryable());
    }

    fn unclean() -> KvError {
        let reason = strata_rpc::mgmt_msg::UncleanReason { ranks: vec![strata_types::Rank(4), strata_types::Rank(6)], map_version: 12, domains: vec!["/node-2".into(), "/node-3".into()] };
        KvError::Client(strata_client::ClientError::Unclean { pool: "tank".into(), cont: "kv1".into(), rf: 1, reason })
    }

    #[test]
    fn an_unclean_container_met_by_a_commit_retry_after_a_lost_answer_is_indeterminate() {
        // First attempt refused: nothing was sent, so nothing was written.
        let first = commit_failure(unclean(), false);
        assert!(matches!(first, KvError::Client(strata_client::ClientError::Unclean { .. })), "{first:?}");
        assert!(!first.is_retryable());
        // A retry after an attempt whose answer was lost: that one may have committed.
        let retry = commit_failure(unclean(), true);
        assert!(matches!(retry, KvError::Indeterminate(_)), "{retry:?}");
        assert!(!retry.is_retryable(), "running the transaction again could apply it twice");
        let msg = retry.to_string();
        assert!(msg.starts_with("commit outcome unknown:") && msg.contains("container tank/kv1 is unclean") && msg.contains("--status healthy") && msg.contains("read the keys"), "{msg}");
    }

    #[test]
    fn a_commit_whose_retries_fail_after_a_lost_answer_is_indeterminate_not_retryable() {
        // Without a lost answer the error is what it says: nothing was written.
        for e in [KvError::Unavailable("gave up".into()), KvError::NoSpace("full".into())] {
            let kind = std::mem::discriminant(&e);
            assert_eq!(std::mem::discriminant(&commit_failure(e, false)), kind);
        }
        assert!(commit_failure(KvError::Unavailable("gave up".into()), false).is_retryable());
        // After one: the lost attempt may have committed, so neither "retry" nor "nothing was
        // written" is true.
        for e in [KvError::Unavailable("gave up after 30s: no answer within 5s".into()), KvError::NoSpace("full".into()), KvError::Remote("engine failed".into())] {
            let shown = e.to_string();
            let got = commit_failure(e, true);
            assert!(matches!(got, KvError::Indeterminate(_)), "{got:?}");
            assert!(!got.is_retryable(), "running the transaction again could apply it twice");
            let msg = got.to_string();
            assert!(msg.contains(&shown) && msg.contains("read the keys"), "{msg}");
        }
    }
}
