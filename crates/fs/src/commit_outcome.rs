//! Settling a metadata commit whose outcome is unknown: the KV layer answers
//! `KvError::Indeterminate` when a commit's answer was lost after it was sent (the shard
//! leader died or the map moved) and its retry was refused, possibly by the commit's own
//! writes. A file-system operation must say whether it happened, so instead of EIO (or a retry
//! that answers EEXIST for a mkdir it made itself) the transaction's written keys are read
//! again, at the newest epoch, until the reads say which:
//!
//! - every write is visible as written: it **committed**;
//! - a read-modify-write of this transaction is visible (a key it read as one value and wrote
//!   as another, e.g. an inode with this operation's ctime in ns, or a lease record with its
//!   new expiry): it committed, and a later transaction changed some of the other keys (KV
//!   commits are atomic: none is ever partly visible);
//! - no write is visible: it **did not commit**, and the caller runs it again as a fresh
//!   transaction ([`MetaError::Conflict`]: nothing was written);
//! - anything else (a read failed, or only keys another transaction could have written the
//!   same way match): read again after a pause, until [`SETTLE_TIME_MAX`]; then EIO with a log
//!   line naming the keys, never a guess.
//!
//! Keys the transaction wrote with the value it had read (or deleted while it read them
//! absent) say nothing either way and are left out.
//!
//! Limits: [`SETTLE_TIME_MAX`] per commit, [`SETTLE_READS_INFLIGHT_MAX`] reads at once.
//! Known gap: a commit every one of whose keys another client changed in the short time
//! between the lost answer and these reads is taken as not committed and runs again.

use crate::meta_store::{MetaError, MetaStore};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use strata_types::Epoch;

/// How long a commit of unknown outcome is re-read before the operation fails with EIO. A
/// shard leader's failover takes a few seconds (its heartbeat timeout plus a map update), and
/// the KV layer retries each read through it on its own.
pub const SETTLE_TIME_MAX: Duration = Duration::from_secs(20);
/// Pause between two rounds of reads that did not decide.
const SETTLE_PAUSE: Duration = Duration::from_millis(200);
/// Concurrent reads of one round (a directory-lease commit writes up to 2,000 keys).
pub const SETTLE_READS_INFLIGHT_MAX: usize = 64;
/// What the mount logs (at info) for each settled commit; the tests look for it.
pub const SETTLED_LOG: &str = "commit answer lost; its outcome was read back";

/// The writes of one transaction and, for the keys it read before writing, what it read: what
/// [`settle`] needs to recognise the transaction's own writes.
#[derive(Default, Debug)]
pub struct WriteLog {
    /// Key → the last value written (`None`: deleted).
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Key → the first value read or expected (`None`: absent), for keys read before written.
    read: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl WriteLog {
    /// Note a value the transaction read or expected (the first one counts: later reads of a
    /// key it wrote see its own write).
    pub fn read(&mut self, key: &[u8], value: Option<&[u8]>) {
        if !self.writes.contains_key(key) && !self.read.contains_key(key) {
            self.read.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        }
    }

    pub fn write(&mut self, key: &[u8], value: Option<&[u8]>) {
        self.writes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes that tell a committed transaction from one that did not commit: all but
    /// those that leave a key as the transaction read it.
    fn telling(&self) -> impl Iterator<Item = (&Vec<u8>, &Option<Vec<u8>>, bool)> {
        self.writes.iter().filter_map(|(k, w)| match self.read.get(k) {
            Some(r) if r == w => None,
            Some(_) => Some((k, w, w.is_some())),
            None => Some((k, w, false)),
        })
    }
}

/// A metadata key for a log line: its home (an inode number), then the rest as text.
fn show_key(k: &[u8]) -> String {
    match k.split_first_chunk::<8>() {
        Some((home, rest)) => format!("{}:{}", u64::from_be_bytes(*home), String::from_utf8_lossy(rest)),
        None => String::from_utf8_lossy(k).into_owned(),
    }
}

/// What one round of reads says about the transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Committed,
    NotCommitted,
    Unknown(String),
}

/// Judge one round: `now` holds the current value of every telling key.
fn judge(log: &WriteLog, now: &BTreeMap<Vec<u8>, Option<Vec<u8>>>) -> Verdict {
    let (mut seen, mut missing, mut own_seen) = (0usize, 0usize, false);
    for (k, w, read_modify_write) in log.telling() {
        match now.get(k) {
            Some(v) if v == w => {
                seen += 1;
                own_seen |= read_modify_write;
            }
            Some(_) => missing += 1,
            None => return Verdict::Unknown(format!("key {} was not read", show_key(k))),
        }
    }
    if missing == 0 || own_seen {
        Verdict::Committed
    } else if seen == 0 {
        Verdict::NotCommitted
    } else {
        Verdict::Unknown(format!("{seen} of {} writes are visible, none of them one only this transaction makes", seen + missing))
    }
}

/// Read the telling keys once, at the newest epoch.
async fn read_round<S: MetaStore>(store: &S, log: &WriteLog) -> Result<BTreeMap<Vec<u8>, Option<Vec<u8>>>, MetaError> {
    use futures::stream::{self, StreamExt};
    let keys: Vec<Vec<u8>> = log.telling().map(|t| t.0.clone()).collect();
    let mut reads = stream::iter(keys).map(|k| async move { store.get_at(&k, Epoch::MAX).await.map(|v| (k, v)) }).buffer_unordered(SETTLE_READS_INFLIGHT_MAX);
    let mut now = BTreeMap::new();
    while let Some(r) = reads.next().await {
        let (k, v) = r?;
        now.insert(k, v);
    }
    Ok(now)
}

/// Find out whether the transaction whose writes `log` holds committed, after its commit
/// ended indeterminate (`why`). `Ok(())`: it did. `Err(Conflict)`: it did not (nothing was
/// written; run it again). `Err(Unavailable)`: still unknown after `time_max` (logged).
pub async fn settle<S: MetaStore>(store: &S, log: &WriteLog, why: &str, time_max: Duration) -> Result<(), MetaError> {
    let start = Instant::now();
    let mut rounds = 0u32;
    loop {
        rounds += 1;
        let verdict = match read_round(store, log).await {
            Ok(now) => judge(log, &now),
            Err(e) => Verdict::Unknown(format!("reading the keys back: {e}")),
        };
        match verdict {
            Verdict::Committed => {
                tracing::info!(keys = log.writes.len(), rounds, why, "{SETTLED_LOG}: it committed");
                return Ok(());
            }
            Verdict::NotCommitted => {
                tracing::info!(keys = log.writes.len(), rounds, why, "{SETTLED_LOG}: it did not commit; running it again");
                return Err(MetaError::Conflict);
            }
            Verdict::Unknown(what) if start.elapsed() + SETTLE_PAUSE >= time_max => {
                let keys: Vec<String> = log.writes.keys().take(8).map(|k| show_key(k)).collect();
                tracing::error!(keys = ?keys, rounds, why, last = %what, "a metadata commit's answer was lost and reading its keys back for {time_max:?} did not tell whether it committed; answering EIO");
                return Err(MetaError::Unavailable(format!("the outcome of a metadata commit is unknown ({why}); its keys did not tell within {time_max:?}: {what}")));
            }
            Verdict::Unknown(what) => {
                tracing::debug!(rounds, what, "outcome of a metadata commit still unknown; reading again");
                tokio::time::sleep(SETTLE_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kvs: &[(&[u8], Option<&[u8]>)]) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        kvs.iter().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect()
    }

    /// A mkdir: the parent's inode read and rewritten, a new name and inode written blind.
    fn mkdir_log() -> WriteLog {
        let mut l = WriteLog::default();
        l.read(b"parent", Some(b"p-mtime-1"));
        l.read(b"name", None);
        l.write(b"parent", Some(b"p-mtime-2"));
        l.write(b"name", Some(b"ino-7"));
        l.write(b"inode-7", Some(b"dir"));
        l
    }

    #[test]
    fn all_writes_visible_is_committed_none_is_not() {
        let l = mkdir_log();
        assert_eq!(judge(&l, &state(&[(b"parent", Some(b"p-mtime-2")), (b"name", Some(b"ino-7")), (b"inode-7", Some(b"dir"))])), Verdict::Committed);
        assert_eq!(judge(&l, &state(&[(b"parent", Some(b"p-mtime-1")), (b"name", None), (b"inode-7", None)])), Verdict::NotCommitted);
    }

    #[test]
    fn another_clients_name_is_not_taken_for_ours() {
        // Another mount created the same name for its own inode: nothing of ours is there.
        let l = mkdir_log();
        assert_eq!(judge(&l, &state(&[(b"parent", Some(b"p-mtime-other")), (b"name", Some(b"ino-9")), (b"inode-7", None)])), Verdict::NotCommitted);
    }

    #[test]
    fn a_later_change_of_some_keys_still_shows_the_commit() {
        let l = mkdir_log();
        // Committed, then another mount changed the parent: the name it found free and
        // filled is ours.
        assert_eq!(judge(&l, &state(&[(b"parent", Some(b"p-mtime-3")), (b"name", Some(b"ino-7")), (b"inode-7", Some(b"dir"))])), Verdict::Committed);
        // Committed, then the name was removed again: the parent still holds our write.
        assert_eq!(judge(&l, &state(&[(b"parent", Some(b"p-mtime-2")), (b"name", None), (b"inode-7", None)])), Verdict::Committed);
        // Only a key written blind is visible: another transaction could have written it.
        let v = judge(&l, &state(&[(b"parent", Some(b"p-mtime-3")), (b"name", None), (b"inode-7", Some(b"dir"))]));
        assert!(matches!(v, Verdict::Unknown(_)), "{v:?}");
    }

    #[test]
    fn unchanged_keys_tell_nothing() {
        let mut l = WriteLog::default();
        l.read(b"same", Some(b"v"));
        l.write(b"same", Some(b"v"));
        l.read(b"gone", None);
        l.write(b"gone", None);
        l.write(b"new", Some(b"x"));
        assert_eq!(l.telling().count(), 1);
        assert_eq!(judge(&l, &state(&[(b"new", None)])), Verdict::NotCommitted);
    }

    #[test]
    fn a_key_first_read_after_its_write_counts_as_blind() {
        let mut l = WriteLog::default();
        l.write(b"k", Some(b"new"));
        l.read(b"k", Some(b"new"));
        assert_eq!(l.telling().collect::<Vec<_>>(), vec![(&b"k".to_vec(), &Some(b"new".to_vec()), false)]);
    }
}
