//! Group commit: one writer thread takes every update batch waiting in its queue, applies them
//! as one engine batch, makes it durable with one `sync`, and only then acknowledges each
//! caller. Concurrent writers therefore share fsyncs instead of serializing on them (the storage
//! engine's own persist calls serialize).

use crate::engine::{EngineOp, KvEngine};
use crate::error::VosError;
use crate::extent_file::{sync_touched, Touched};
use crate::punch_index::{PunchEntry, PunchIndex};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Job {
    pub ops: Vec<EngineOp>,
    pub punches: Vec<PunchEntry>,
    /// Extent files this batch wrote into: synced before its index rows are applied.
    pub touched: Vec<Touched>,
    pub bytes: usize,
    // A oneshot both kinds of caller can wait on: threads block on it, async tasks await it
    // (so an async engine spends no blocking-pool thread, and no thread switch, per update).
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

pub struct GroupCommit {
    tx: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// `queue_depth` bounds the batches waiting for the writer; `group_bytes_max` bounds one
    /// group so that a flood of large writes cannot delay the first one's ack without limit.
    pub fn start(engine: Arc<dyn KvEngine>, punches: Arc<PunchIndex>, queue_depth: usize, group_bytes_max: usize) -> GroupCommit {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_depth.max(1));
        let thread = std::thread::Builder::new()
            .name("vos-group-commit".into())
            .spawn(move || writer_loop(engine, punches, rx, group_bytes_max))
            .ok();
        GroupCommit { tx: Some(tx), thread }
    }

    /// Submit one atomic batch and wait until it is durable.
    pub fn commit(&self, ops: Vec<EngineOp>, punches: Vec<PunchEntry>, touched: Vec<Touched>, extent_bytes: usize) -> Result<(), VosError> {
        let wait = self.submit(ops, punches, touched, extent_bytes)?;
        Self::outcome(wait.blocking_recv())
    }

    /// [`GroupCommit::commit`] for async callers: the task waits, no thread does. Submission
    /// blocks the calling thread only while the writer's queue is full (backpressure; the
    /// writer drains it without help from the caller's runtime).
    pub async fn commit_async(&self, ops: Vec<EngineOp>, punches: Vec<PunchEntry>, touched: Vec<Touched>, extent_bytes: usize) -> Result<(), VosError> {
        let wait = self.submit(ops, punches, touched, extent_bytes)?;
        Self::outcome(wait.await)
    }

    fn submit(&self, ops: Vec<EngineOp>, punches: Vec<PunchEntry>, touched: Vec<Touched>, extent_bytes: usize) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, VosError> {
        let bytes = ops.iter().map(EngineOp::bytes).sum::<usize>() + extent_bytes;
        let (reply, wait) = tokio::sync::oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(|| VosError::WriterStopped("store closed".into()))?;
        if self.thread.is_none() {
            return Err(VosError::WriterStopped("writer thread could not be started".into()));
        }
        tx.send(Job { ops, punches, touched, bytes, reply }).map_err(|_| VosError::WriterStopped("writer thread exited".into()))?;
        Ok(wait)
    }

    fn outcome(r: Result<Result<(), String>, tokio::sync::oneshot::error::RecvError>) -> Result<(), VosError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(VosError::Engine(msg)),
            Err(_) => Err(VosError::WriterStopped("writer thread exited before acknowledging".into())),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer_loop(engine: Arc<dyn KvEngine>, punches: Arc<PunchIndex>, rx: mpsc::Receiver<Job>, group_bytes_max: usize) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.bytes;
        let mut jobs = vec![first];
        while bytes < group_bytes_max {
            match rx.try_recv() {
                Ok(j) => {
                    bytes += j.bytes;
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut ops = Vec::with_capacity(jobs.iter().map(|j| j.ops.len()).sum());
        let mut touched = Vec::new();
        for j in &mut jobs {
            ops.append(&mut j.ops);
            touched.append(&mut j.touched);
        }
        // Extent bytes first: an index row must never be durable before the bytes it names.
        let result = sync_touched(&touched).and_then(|()| engine.apply(ops)).and_then(|()| engine.sync());
        match result {
            Ok(()) => {
                for j in &jobs {
                    for p in &j.punches {
                        punches.insert(p);
                    }
                }
                for j in jobs {
                    let _ = j.reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; every batch in the group is refused");
                let msg = e.to_string();
                for j in jobs {
                    let _ = j.reply.send(Err(msg.clone()));
                }
            }
        }
    }
}
