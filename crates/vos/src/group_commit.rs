//! Group commit: a commit lane takes every update batch waiting in the queue, applies them as
//! one engine batch, starts its sync, and waits for the disk while the next lane forms the next
//! group. Concurrent writers therefore share fsyncs instead of serializing on them, and up to
//! `sync_lanes` groups wait for the disk at once (a journal with one sync at a time caps a
//! target at one group per disk flush).
//!
//! Acknowledgements leave in group order, and the first failed sync fails every later group
//! too (the store then refuses writes until reopened): a later group's successful fsync does
//! not prove that an earlier group's bytes reached the disk.

use crate::engine::{EngineOp, KvEngine, PendingSync};
use crate::error::VosError;
use crate::punch_index::{PunchEntry, PunchIndex};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct Job {
    pub ops: Vec<EngineOp>,
    pub punches: Vec<PunchEntry>,
    pub bytes: usize,
    // A oneshot both kinds of caller can wait on: threads block on it, async tasks await it
    // (so an async engine spends no blocking-pool thread, and no thread switch, per update).
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

pub struct GroupCommit {
    tx: Option<mpsc::SyncSender<Job>>,
    lanes: Vec<JoinHandle<()>>,
}

/// Upper bound on sync lanes: more syncs in flight per journal than this gain nothing.
pub const SYNC_LANES_MAX: usize = 16;

impl GroupCommit {
    /// `queue_depth` bounds the batches waiting for the writer; `group_bytes_max` bounds one
    /// group so that a flood of large writes cannot delay the first one's ack without limit;
    /// `sync_lanes` is how many groups may wait for the disk at once.
    pub fn start(engine: Arc<dyn KvEngine>, punches: Arc<PunchIndex>, queue_depth: usize, group_bytes_max: usize, sync_lanes: usize) -> GroupCommit {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_depth.max(1));
        let shared = Arc::new(Lanes {
            intake: Mutex::new(Intake { rx, seq: 0 }),
            order: Mutex::new(AckOrder { next: 0, finished: BTreeMap::new(), failed: None }),
            engine,
            punches,
            group_bytes_max,
        });
        let mut lanes = Vec::new();
        for i in 0..sync_lanes.clamp(1, SYNC_LANES_MAX) {
            let shared = shared.clone();
            match std::thread::Builder::new().name(format!("vos-commit-{i}")).spawn(move || shared.lane_loop()) {
                Ok(t) => lanes.push(t),
                Err(e) => tracing::warn!(error = %e, lane = i, "could not start a commit lane; running with fewer"),
            }
        }
        GroupCommit { tx: Some(tx), lanes }
    }

    /// Submit one atomic batch and wait until it is durable.
    pub fn commit(&self, ops: Vec<EngineOp>, punches: Vec<PunchEntry>, extent_bytes: usize) -> Result<(), VosError> {
        self.submit(ops, punches, extent_bytes)?.wait()
    }

    /// Queue one atomic batch; the caller may work (sync its extent files) while it commits.
    /// `extent_bytes` counts bytes the batch wrote outside the engine, against the group size.
    pub fn submit(&self, ops: Vec<EngineOp>, punches: Vec<PunchEntry>, extent_bytes: usize) -> Result<Committing, VosError> {
        let bytes = ops.iter().map(EngineOp::bytes).sum::<usize>() + extent_bytes;
        let (reply, wait) = tokio::sync::oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(|| VosError::WriterStopped("store closed".into()))?;
        if self.lanes.is_empty() {
            return Err(VosError::WriterStopped("no commit lane could be started".into()));
        }
        tx.send(Job { ops, punches, bytes, reply }).map_err(|_| VosError::WriterStopped("commit lanes exited".into()))?;
        Ok(Committing(wait))
    }
}

/// A submitted batch on its way to the disk.
#[must_use = "the batch is not known to be durable until the wait returns"]
pub struct Committing(tokio::sync::oneshot::Receiver<Result<(), String>>);

impl Committing {
    pub fn wait(self) -> Result<(), VosError> {
        Self::outcome(self.0.blocking_recv())
    }

    pub async fn wait_async(self) -> Result<(), VosError> {
        Self::outcome(self.0.await)
    }

    fn outcome(r: Result<Result<(), String>, tokio::sync::oneshot::error::RecvError>) -> Result<(), VosError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(VosError::Engine(msg)),
            Err(_) => Err(VosError::WriterStopped("commit lane exited before acknowledging".into())),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.lanes.drain(..) {
            let _ = t.join();
        }
    }
}

/// One applied group on its way to the disk.
struct Group {
    seq: u64,
    jobs: Vec<Job>,
    sync: Result<PendingSync, String>,
}

/// Finished groups waiting for every earlier one, so that acknowledgements leave in order.
struct AckOrder {
    next: u64,
    finished: BTreeMap<u64, (Vec<Job>, Result<(), String>)>,
    /// The first failure; every later group fails with it.
    failed: Option<String>,
}

impl AckOrder {
    fn finish(&mut self, punches: &PunchIndex, seq: u64, jobs: Vec<Job>, result: Result<(), String>) {
        self.finished.insert(seq, (jobs, result));
        while let Some((jobs, result)) = self.finished.remove(&self.next) {
            self.next += 1;
            if let (Err(e), None) = (&result, &self.failed) {
                tracing::error!(error = %e, "group commit failed; this store refuses writes until it is reopened");
                self.failed = Some(e.clone());
            }
            match &self.failed {
                Some(e) => {
                    for j in jobs {
                        let _ = j.reply.send(Err(e.clone()));
                    }
                }
                None => {
                    for j in &jobs {
                        for p in &j.punches {
                            punches.insert(p);
                        }
                    }
                    for j in jobs {
                        let _ = j.reply.send(Ok(()));
                    }
                }
            }
        }
    }
}

/// What every lane shares: the queue with the next group's sequence number (one lock, so
/// groups are formed, applied and handed to the OS in sequence order) and the ack order.
struct Lanes {
    intake: Mutex<Intake>,
    order: Mutex<AckOrder>,
    engine: Arc<dyn KvEngine>,
    punches: Arc<PunchIndex>,
    group_bytes_max: usize,
}

struct Intake {
    rx: mpsc::Receiver<Job>,
    seq: u64,
}

impl Lanes {
    /// A lane forms a group, applies it and starts its sync while it holds the intake, then
    /// lets go and waits for the disk, so the next lane forms the next group meanwhile. The
    /// lane that applied a group also waits for its sync: no thread hand-off between the two
    /// (on a loaded machine each hand-off is a wake-up on the commit's critical path).
    fn lane_loop(&self) {
        loop {
            let g = {
                let mut intake = self.intake.lock().unwrap_or_else(|e| e.into_inner());
                let Ok(first) = intake.rx.recv() else { return };
                let mut bytes = first.bytes;
                let mut jobs = vec![first];
                while bytes < self.group_bytes_max {
                    match intake.rx.try_recv() {
                        Ok(j) => {
                            bytes += j.bytes;
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
                let seq = intake.seq;
                intake.seq += 1;
                let sync = self.apply_and_begin_sync(&mut jobs);
                Group { seq, jobs, sync }
            };
            let result = g.sync.and_then(|p| p.wait().map_err(|e| e.to_string()));
            self.order.lock().unwrap_or_else(|e| e.into_inner()).finish(&self.punches, g.seq, g.jobs, result);
        }
    }

    fn apply_and_begin_sync(&self, jobs: &mut [Job]) -> Result<PendingSync, String> {
        // Nothing more is applied after a failed sync: its bytes may be missing from the
        // journal, and later bytes must not become durable without them.
        if let Some(e) = self.order.lock().unwrap_or_else(|e| e.into_inner()).failed.clone() {
            return Err(e);
        }
        let mut ops = Vec::with_capacity(jobs.iter().map(|j| j.ops.len()).sum());
        for j in jobs.iter_mut() {
            ops.append(&mut j.ops);
        }
        self.engine.apply(ops).and_then(|()| self.engine.begin_sync()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FjallEngine, FjallTuning, RowIter, Space};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fjall, except that the `fail_at`-th `begin_sync` fails (as a full disk would).
    struct FailingSync {
        inner: FjallEngine,
        calls: AtomicUsize,
        fail_at: usize,
    }

    impl KvEngine for FailingSync {
        fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, VosError> {
            self.inner.get(space, key)
        }
        fn scan<'a>(&'a self, space: Space, start: &[u8], end: Option<&[u8]>, reverse: bool) -> RowIter<'a> {
            self.inner.scan(space, start, end, reverse)
        }
        fn scan_keys<'a>(&'a self, space: Space) -> Box<dyn Iterator<Item = Result<Vec<u8>, VosError>> + 'a> {
            self.inner.scan_keys(space)
        }
        fn apply(&self, ops: Vec<EngineOp>) -> Result<(), VosError> {
            self.inner.apply(ops)
        }
        fn sync(&self) -> Result<(), VosError> {
            self.inner.sync()
        }
        fn begin_sync(&self) -> Result<PendingSync, VosError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == self.fail_at {
                return Err(VosError::Engine("injected: no space left on device".into()));
            }
            self.inner.begin_sync()
        }
        fn disk_bytes(&self) -> u64 {
            self.inner.disk_bytes()
        }
        fn flush(&self) -> Result<(), VosError> {
            self.inner.flush()
        }
    }

    fn put(k: u32) -> Vec<EngineOp> {
        vec![EngineOp::Put(Space::Meta, k.to_be_bytes().to_vec(), vec![k as u8; 100])]
    }

    fn tuning() -> FjallTuning {
        FjallTuning { cache_bytes: 1 << 20, worker_threads: 1 }
    }

    #[test]
    fn a_failed_sync_fails_every_later_commit_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FailingSync { inner: FjallEngine::open(dir.path(), &tuning()).unwrap(), calls: AtomicUsize::new(0), fail_at: 2 });
        let gc = GroupCommit::start(engine, Arc::new(PunchIndex::default()), 16, 1 << 20, 3);
        let outcomes: Vec<bool> = (0..6).map(|k| gc.commit(put(k), Vec::new(), 0).is_ok()).collect();
        // The engine would sync the later groups fine; they fail because an earlier one did.
        assert_eq!(outcomes, [true, true, false, false, false, false]);
    }

    #[test]
    fn concurrent_commits_through_several_lanes_are_all_acknowledged_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (threads, per_thread) = (8u32, 150u32);
        {
            let engine = Arc::new(FjallEngine::open(dir.path(), &tuning()).unwrap());
            let gc = Arc::new(GroupCommit::start(engine.clone(), Arc::new(PunchIndex::default()), 16, 1 << 20, 3));
            std::thread::scope(|s| {
                for t in 0..threads {
                    let gc = gc.clone();
                    s.spawn(move || {
                        for i in 0..per_thread {
                            gc.commit(put(t * per_thread + i), Vec::new(), 0).unwrap();
                        }
                    });
                }
            });
            // Acknowledged means visible too.
            for k in 0..threads * per_thread {
                assert_eq!(engine.get(Space::Meta, &k.to_be_bytes()).unwrap(), Some(vec![k as u8; 100]), "key {k}");
            }
        }
        let engine = FjallEngine::open(dir.path(), &tuning()).unwrap();
        for k in 0..threads * per_thread {
            assert_eq!(engine.get(Space::Meta, &k.to_be_bytes()).unwrap(), Some(vec![k as u8; 100]), "key {k} after reopen");
        }
    }
}
