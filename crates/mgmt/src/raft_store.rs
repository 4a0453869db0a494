//! Durable Raft log and vote (fjall, synced on every append) and the state machine with its
//! snapshots (a JSON file written atomically). After a restart the state machine is rebuilt from
//! the last snapshot plus the committed log.

use crate::state_machine::MgmtState;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtReply};
use strata_rpc::RemoteError;

/// What applying one command produced; travels back to the proposer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResult(pub Result<MgmtReply, RemoteError>);

openraft::declare_raft_types!(
    pub TypeConfig:
        D = MgmtCmd,
        R = ApplyResult,
);

pub type NodeId = u64;
type SErr = StorageError<NodeId>;

fn io_err(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::fmt::Display) -> SErr {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

fn fj(verb: ErrorVerb) -> impl Fn(fjall::Error) -> SErr {
    move |e| io_err(ErrorSubject::Logs, verb, e)
}

struct LogInner {
    db: fjall::Database,
    log: fjall::Keyspace,
    meta: fjall::Keyspace,
}

#[derive(Clone)]
pub struct LogStore {
    inner: Arc<LogInner>,
}

impl LogStore {
    pub fn open(dir: &Path) -> Result<LogStore, String> {
        let db = fjall::Database::builder(dir.join("raft-log")).cache_size(4 << 20).worker_threads(1).open().map_err(|e| format!("raft log at {}: {e}", dir.display()))?;
        let log = db.keyspace("log", fjall::KeyspaceCreateOptions::default).map_err(|e| e.to_string())?;
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).map_err(|e| e.to_string())?;
        Ok(LogStore { inner: Arc::new(LogInner { db, log, meta }) })
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, SErr> {
        match self.inner.meta.get(key).map_err(fj(ErrorVerb::Read))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e)),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(v).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.inner.meta.insert(key, bytes).map_err(fj(ErrorVerb::Write))?;
        self.inner.db.persist(fjall::PersistMode::SyncData).map_err(fj(ErrorVerb::Write))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let mut out = Vec::new();
        for g in self.inner.log.range(start.to_be_bytes()..end.to_be_bytes()) {
            let v = g.value().map_err(fj(ErrorVerb::Read))?;
            out.push(serde_json::from_slice(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("purged")?;
        let last = match self.inner.log.last_key_value() {
            None => last_purged,
            Some(g) => {
                let v = g.value().map_err(fj(ErrorVerb::Read))?;
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(e.log_id)
            }
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.inner.db.batch();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.insert(&self.inner.log, e.log_id.index.to_be_bytes(), v);
        }
        let r = batch.commit().and_then(|()| self.inner.db.persist(fjall::PersistMode::SyncData));
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let mut batch = self.inner.db.batch();
        for g in self.inner.log.range(log_id.index.to_be_bytes()..) {
            let k = g.key().map_err(fj(ErrorVerb::Read))?;
            batch.remove(&self.inner.log, k);
        }
        batch.commit().map_err(fj(ErrorVerb::Write))?;
        self.inner.db.persist(fjall::PersistMode::SyncData).map_err(fj(ErrorVerb::Write))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.put_meta("purged", &log_id)?;
        let mut batch = self.inner.db.batch();
        for g in self.inner.log.range(..=log_id.index.to_be_bytes()) {
            let k = g.key().map_err(fj(ErrorVerb::Read))?;
            batch.remove(&self.inner.log, k);
        }
        batch.commit().map_err(fj(ErrorVerb::Write))?;
        self.inner.db.persist(fjall::PersistMode::SyncData).map_err(fj(ErrorVerb::Write))
    }
}

#[derive(Serialize, Deserialize, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

pub struct SmInner {
    pub state: MgmtState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

/// The applied state, shared with the service for reads.
#[derive(Clone)]
pub struct StateMachineStore {
    pub inner: Arc<tokio::sync::RwLock<SmInner>>,
    path: PathBuf,
}

impl StateMachineStore {
    pub fn open(dir: &Path) -> Result<StateMachineStore, String> {
        let path = dir.join("mgmt-snapshot.json");
        let mut inner = SmInner { state: MgmtState::default(), last_applied: None, membership: StoredMembership::default(), snapshot: None, snapshot_seq: 0 };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let snap: StoredSnapshot = serde_json::from_slice(&bytes).map_err(|e| format!("management snapshot {} is corrupt: {e}", path.display()))?;
                inner.state = serde_json::from_slice(&snap.data).map_err(|e| format!("management snapshot {} is corrupt: {e}", path.display()))?;
                inner.last_applied = snap.meta.last_log_id;
                inner.membership = snap.meta.last_membership.clone();
                inner.snapshot = Some(snap);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
        Ok(StateMachineStore { inner: Arc::new(tokio::sync::RwLock::new(inner)), path })
    }

    fn save(&self, snap: &StoredSnapshot) -> Result<(), SErr> {
        let bytes = serde_json::to_vec(snap).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let tmp = self.path.with_extension("tmp");
        let w = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(d) = self.path.parent() {
                std::fs::File::open(d)?.sync_all()?;
            }
            Ok(())
        };
        w().map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let snap = {
            let mut g = self.inner.write().await;
            let data = serde_json::to_vec(&g.state).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
            g.snapshot_seq += 1;
            let id = format!("{}-{}", g.last_applied.map_or(0, |l| l.index), g.snapshot_seq);
            let snap = StoredSnapshot { meta: SnapshotMeta { last_log_id: g.last_applied, last_membership: g.membership.clone(), snapshot_id: id }, data };
            g.snapshot = Some(snap.clone());
            snap
        };
        self.save(&snap)?;
        Ok(Snapshot { meta: snap.meta, snapshot: Box::new(Cursor::new(snap.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), SErr> {
        let g = self.inner.read().await;
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut g = self.inner.write().await;
        let mut out = Vec::new();
        for e in entries {
            g.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(ApplyResult(Ok(MgmtReply::Done))),
                EntryPayload::Normal(cmd) => {
                    let r = g.state.apply(&cmd);
                    out.push(ApplyResult(r));
                }
                EntryPayload::Membership(m) => {
                    g.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(ApplyResult(Ok(MgmtReply::Done)));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, BasicNode>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let state: MgmtState = serde_json::from_slice(&data).map_err(|e| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        let snap = StoredSnapshot { meta: meta.clone(), data };
        self.save(&snap)?;
        let mut g = self.inner.write().await;
        g.state = state;
        g.last_applied = meta.last_log_id;
        g.membership = meta.last_membership.clone();
        g.snapshot = Some(snap);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let g = self.inner.read().await;
        Ok(g.snapshot.clone().map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
