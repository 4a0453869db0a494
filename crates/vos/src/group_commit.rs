//! Group commit: a commit lane takes every update batch waiting in the queue, applies them as
//! one engine batch, starts its sync, and waits for the disk while the next lane forms the next
//! group. Concurrent writers therefore share fsyncs instead of serializing on them, and up to
//! `sync_lanes` groups wait for the disk at once (a journal with one sync at a time caps a
//! target at one group per disk flush).
//!
//! Acknowledgements leave in group order, and the first failed sync fails every later group
//! too (the store then refuses writes until reopened): a later group's successful fsync does
//! not prove that an earlier group's bytes reached the disk.
//!
//! Deferred rows (`defer`) have no waiter and need not be durable soon: they ride along with
//! the next group instead of forcing a journal sync of their own, and are committed alone only
//! when no group comes for `DEFERRED_IDLE_MS` or the store closes.

use crate::engine::{EngineOp, KvEngine, PendingSync};
use crate::error::VosError;
use crate::punch_index::{PunchEntry, PunchIndex};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
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
    shared: Arc<Lanes>,
    lanes: Vec<JoinHandle<()>>,
}

/// Upper bound on sync lanes: more syncs in flight per journal than this gain nothing.
pub const SYNC_LANES_MAX: usize = 16;
/// Deferred rows wait at most this long for a group to ride along with.
pub const DEFERRED_IDLE_MS: u64 = 50;
/// ... and at most this many of them wait: beyond it they form a group at once.
pub const DEFERRED_OPS_MAX: usize = 4096;

impl GroupCommit {
    /// `queue_depth` bounds the batches waiting for the writer; `group_bytes_max` bounds one
    /// group so that a flood of large writes cannot delay the first one's ack without limit;
    /// `sync_lanes` is how many groups may wait for the disk at once; `deferred_idle` is how long
    /// deferred rows wait for a group before they form one alone.
    pub fn start(engine: Arc<dyn KvEngine>, punches: Arc<PunchIndex>, queue_depth: usize, group_bytes_max: usize, sync_lanes: usize, deferred_idle: std::time::Duration) -> GroupCommit {
        let shared = Arc::new(Lanes {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), deferred: Vec::new(), forming: false, seq: 0, closed: false }),
            work: Condvar::new(),
            space: Condvar::new(),
            queue_depth: queue_depth.max(1),
            order: Mutex::new(AckOrder { next: 0, finished: BTreeMap::new(), failed: None }),
            engine,
            punches,
            group_bytes_max,
            deferred_idle: deferred_idle.max(std::time::Duration::from_millis(1)),
        });
        let mut lanes = Vec::new();
        for i in 0..sync_lanes.clamp(1, SYNC_LANES_MAX) {
            let shared = shared.clone();
            match std::thread::Builder::new().name(format!("vos-commit-{i}")).spawn(move || shared.lane_loop()) {
                Ok(t) => lanes.push(t),
                Err(e) => tracing::warn!(error = %e, lane = i, "could not start a commit lane; running with fewer"),
            }
        }
        GroupCommit { shared, lanes }
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
        if self.lanes.is_empty() {
            return Err(VosError::WriterStopped("no commit lane could be started".into()));
        }
        let l = &self.shared;
        let mut q = l.lock_queue();
        // Backpressure: a full queue blocks the submitter (the lanes drain it on their own).
        while q.jobs.len() >= l.queue_depth && !q.closed {
            q = l.space.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.closed {
            return Err(VosError::WriterStopped("store closed".into()));
        }
        q.jobs.push_back(Job { ops, punches, bytes, reply });
        // A lane forming a group looks at the queue again when it is done; wake one only if
        // none is forming (every wake is a context switch on a machine with few cores).
        let wake = !q.forming;
        drop(q);
        if wake {
            l.work.notify_one();
        }
        Ok(Committing(wait))
    }

    /// Tests only: forget the deferred rows, as a power loss before their group would.
    #[doc(hidden)]
    pub fn discard_deferred(&self) {
        self.shared.lock_queue().deferred.clear();
    }

    /// Queue rows that nobody waits for and that may become durable later (a crash before
    /// then must be harmless to the store): they join the next group rather than costing a
    /// journal sync of their own. A store that stops is no loss; a failed group drops them.
    pub fn defer(&self, ops: Vec<EngineOp>) {
        if ops.is_empty() || self.lanes.is_empty() {
            return;
        }
        let l = &self.shared;
        let mut q = l.lock_queue();
        if q.closed {
            return;
        }
        let first = q.deferred.is_empty();
        q.deferred.extend(ops);
        // An idle lane learns of them so that it can time their wait out (or take them now).
        let wake = !q.forming && (first || q.deferred.len() >= DEFERRED_OPS_MAX);
        drop(q);
        if wake {
            l.work.notify_one();
        }
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
        self.shared.lock_queue().closed = true;
        self.shared.work.notify_all();
        self.shared.space.notify_all();
        for t in self.lanes.drain(..) {
            let _ = t.join();
        }
    }
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

/// What every lane shares: the queue (with the flag that lets one lane at a time form and
/// apply a group, so groups are applied and handed to the OS in sequence order) and the ack
/// order.
struct Lanes {
    queue: Mutex<Queue>,
    /// Idle lanes wait here for jobs.
    work: Condvar,
    /// Submitters wait here while the queue is full.
    space: Condvar,
    queue_depth: usize,
    order: Mutex<AckOrder>,
    engine: Arc<dyn KvEngine>,
    punches: Arc<PunchIndex>,
    group_bytes_max: usize,
    /// How long deferred rows wait for a group (`GroupCommit::start`).
    deferred_idle: std::time::Duration,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Rows committed with the next group (`GroupCommit::defer`).
    deferred: Vec<EngineOp>,
    forming: bool,
    seq: u64,
    closed: bool,
}

impl Lanes {
    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lane forms a group, applies it and starts its sync, then waits for the disk while
    /// another lane forms the next group. The lane that applied a group also waits for its
    /// sync, and idle lanes sleep until there is work nobody else is taking: no thread
    /// hand-off on the commit's path (on a loaded machine each is a wake-up that waits for a
    /// core).
    fn lane_loop(&self) {
        let mut q = self.lock_queue();
        let idle = self.deferred_idle;
        loop {
            if !q.forming && !q.jobs.is_empty() {
                q = self.form_and_commit(q);
                continue;
            }
            // Deferred rows alone form a group when they pile up or the store closes, or when
            // nothing else came for `idle` (the timed wait below).
            let deferred_due = !q.deferred.is_empty() && (q.closed || q.deferred.len() >= DEFERRED_OPS_MAX);
            if !q.forming && deferred_due {
                q = self.form_and_commit(q);
                continue;
            }
            if q.closed && q.jobs.is_empty() && q.deferred.is_empty() {
                // Lanes that went to sleep while this one committed the last rows re-check.
                drop(q);
                self.work.notify_all();
                return;
            }
            if q.forming || q.deferred.is_empty() {
                q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let (g, waited) = self.work.wait_timeout(q, idle).unwrap_or_else(|e| e.into_inner());
            q = g;
            if waited.timed_out() && !q.forming && !q.deferred.is_empty() {
                q = self.form_and_commit(q);
            }
        }
    }

    /// Form a group from the queue (with every deferred row), apply it, start its sync, let the
    /// next lane form while this one waits for the disk, then acknowledge in order. Called with
    /// the queue locked and not forming; returns it locked.
    fn form_and_commit<'a>(&'a self, mut q: std::sync::MutexGuard<'a, Queue>) -> std::sync::MutexGuard<'a, Queue> {
        {
            debug_assert!(!q.forming);
            q.forming = true;
            let was_full = q.jobs.len() >= self.queue_depth;
            let mut bytes = 0;
            let mut jobs = Vec::new();
            while bytes < self.group_bytes_max {
                let Some(j) = q.jobs.pop_front() else { break };
                bytes += j.bytes;
                jobs.push(j);
            }
            let deferred = std::mem::take(&mut q.deferred);
            let seq = q.seq;
            q.seq += 1;
            drop(q);
            if was_full {
                self.space.notify_all();
            }
            let sync = self.apply_and_begin_sync(&mut jobs, deferred);
            q = self.lock_queue();
            q.forming = false;
            let more = !q.jobs.is_empty();
            drop(q);
            if more {
                self.work.notify_one();
            }
            let result = sync.and_then(|p| p.wait().map_err(|e| e.to_string()));
            self.order.lock().unwrap_or_else(|e| e.into_inner()).finish(&self.punches, seq, jobs, result);
        }
        self.lock_queue()
    }

    fn apply_and_begin_sync(&self, jobs: &mut [Job], deferred: Vec<EngineOp>) -> Result<PendingSync, String> {
        // Nothing more is applied after a failed sync: its bytes may be missing from the
        // journal, and later bytes must not become durable without them.
        if let Some(e) = self.order.lock().unwrap_or_else(|e| e.into_inner()).failed.clone() {
            return Err(e);
        }
        let mut ops = deferred;
        ops.reserve(jobs.iter().map(|j| j.ops.len()).sum());
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
        let gc = GroupCommit::start(engine, Arc::new(PunchIndex::default()), 16, 1 << 20, 3, std::time::Duration::from_millis(DEFERRED_IDLE_MS));
        let outcomes: Vec<bool> = (0..6).map(|k| gc.commit(put(k), Vec::new(), 0).is_ok()).collect();
        // The engine would sync the later groups fine; they fail because an earlier one did.
        assert_eq!(outcomes, [true, true, false, false, false, false]);
    }

    /// Deferred rows ride along with the next group, are committed alone when no group comes,
    /// and are committed when the store closes.
    #[test]
    fn deferred_rows_join_the_next_group_or_land_alone_or_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let key = |k: u32| k.to_be_bytes().to_vec();
        {
            let engine = Arc::new(FjallEngine::open(dir.path(), &tuning()).unwrap());
            let gc = GroupCommit::start(engine.clone(), Arc::new(PunchIndex::default()), 16, 1 << 20, 3, std::time::Duration::from_millis(DEFERRED_IDLE_MS));
            gc.defer(put(1000));
            gc.commit(put(1), Vec::new(), 0).unwrap();
            assert!(engine.get(Space::Meta, &key(1000)).unwrap().is_some(), "a deferred row is in place once a later commit is acknowledged");
            gc.defer(put(1001));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while engine.get(Space::Meta, &key(1001)).unwrap().is_none() {
                assert!(std::time::Instant::now() < deadline, "a deferred row with no group to join was never committed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gc.defer(vec![EngineOp::Delete(Space::Meta, key(1)), EngineOp::Put(Space::Meta, key(1002), vec![7])]);
        }
        let engine = FjallEngine::open(dir.path(), &tuning()).unwrap();
        for k in [1000, 1001, 1002] {
            assert!(engine.get(Space::Meta, &key(k)).unwrap().is_some(), "deferred row {k} after close and reopen");
        }
        assert_eq!(engine.get(Space::Meta, &key(1)).unwrap(), None, "a deferred delete made at close");
    }

    #[test]
    fn concurrent_commits_through_several_lanes_are_all_acknowledged_and_kept() {
        commit_concurrently(16, 1 << 20);
    }

    /// A queue of two and groups of one batch: submitters block on the full queue, lanes take
    /// turns forming one-batch groups, and still nothing is lost or acknowledged early.
    #[test]
    fn a_full_queue_and_tiny_groups_lose_nothing() {
        commit_concurrently(2, 1);
    }

    fn commit_concurrently(queue_depth: usize, group_bytes_max: usize) {
        let dir = tempfile::tempdir().unwrap();
        let (threads, per_thread) = (8u32, 150u32);
        {
            let engine = Arc::new(FjallEngine::open(dir.path(), &tuning()).unwrap());
            let gc = Arc::new(GroupCommit::start(engine.clone(), Arc::new(PunchIndex::default()), queue_depth, group_bytes_max, 3, std::time::Duration::from_millis(DEFERRED_IDLE_MS)));
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
