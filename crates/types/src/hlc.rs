//! Hybrid logical clock (Kulkarni et al.): epochs close to wall time that still order causally
//! related events across nodes whose clocks disagree by less than the maximum drift.

use crate::epoch::{Epoch, LOGICAL_MAX};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Default for how far ahead of our wall clock a remote timestamp may be before we refuse it.
pub const HLC_MAX_DRIFT_MS_DEFAULT: u64 = 500;

/// How far ahead of the current physical time the persisted high-water mark is pushed, so that
/// only about one write in this many milliseconds of issued epochs touches the disk.
const HWM_WINDOW_MS: u64 = 2_000;

/// The source of physical time; a trait so tests can drive the clock by hand.
pub trait PhysicalClock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// Wall-clock time from the operating system.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl PhysicalClock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HlcError {
    #[error(
        "remote timestamp is {ahead_ms} ms ahead of the local clock (max drift {max_drift_ms} ms); \
         check NTP on both machines or raise the max drift"
    )]
    DriftExceeded { ahead_ms: u64, max_drift_ms: u64 },
    #[error("HLC high-water mark file {path}: {source}")]
    Persist { path: PathBuf, source: std::io::Error },
    #[error("HLC high-water mark file {path} is corrupt ({detail}); restore it or remove it only if no epoch from this node can still be in use")]
    CorruptMark { path: PathBuf, detail: String },
}

struct HlcState {
    last: Epoch,
    /// Physical milliseconds up to which epochs may be issued without persisting again.
    persisted_ms: u64,
}

/// A hybrid logical clock. `now()` issues strictly increasing epochs; `update()` merges a
/// timestamp received from a peer so that our next epoch is after it.
pub struct Hlc {
    clock: Box<dyn PhysicalClock>,
    max_drift_ms: u64,
    state: Mutex<HlcState>,
    mark_path: Option<PathBuf>,
}

impl Hlc {
    /// A clock that is monotonic for the life of this process only.
    pub fn new(clock: Box<dyn PhysicalClock>, max_drift_ms: u64) -> Hlc {
        Hlc { clock, max_drift_ms, state: Mutex::new(HlcState { last: Epoch::ZERO, persisted_ms: u64::MAX }), mark_path: None }
    }

    /// A clock that stays monotonic across restarts: it never issues an epoch at or below the
    /// high-water mark stored in `path`, and it writes a new mark (fsynced) before issuing any
    /// epoch beyond the stored one.
    pub fn open(path: &Path, clock: Box<dyn PhysicalClock>, max_drift_ms: u64) -> Result<Hlc, HlcError> {
        let mark_ms = match fs::read_to_string(path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| HlcError::CorruptMark {
                path: path.to_owned(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(HlcError::Persist { path: path.to_owned(), source }),
        };
        // Everything below the mark may have been issued before the restart.
        let last = if mark_ms == 0 { Epoch::ZERO } else { Epoch::from_parts(mark_ms, LOGICAL_MAX as u16) };
        Ok(Hlc {
            clock,
            max_drift_ms,
            state: Mutex::new(HlcState { last, persisted_ms: mark_ms }),
            mark_path: Some(path.to_owned()),
        })
    }

    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// The last epoch issued or observed, without advancing the clock.
    pub fn peek(&self) -> Epoch {
        self.lock().last
    }

    /// Issue a new epoch, strictly greater than every epoch issued or observed before.
    pub fn now(&self) -> Result<Epoch, HlcError> {
        let wall = self.clock.now_ms();
        let mut st = self.lock();
        let next = advance(st.last, wall, st.last.physical_ms());
        self.persist_if_needed(&mut st, next)?;
        st.last = next;
        Ok(next)
    }

    /// Merge a peer's timestamp. Refuses one further ahead of our wall clock than the max
    /// drift (a peer with a broken clock must not drag every epoch into the future).
    pub fn update(&self, remote: Epoch) -> Result<Epoch, HlcError> {
        let wall = self.clock.now_ms();
        if remote.physical_ms() > wall.saturating_add(self.max_drift_ms) {
            return Err(HlcError::DriftExceeded { ahead_ms: remote.physical_ms() - wall, max_drift_ms: self.max_drift_ms });
        }
        let mut st = self.lock();
        let base = st.last.max(remote);
        let next = advance(base, wall, base.physical_ms());
        self.persist_if_needed(&mut st, next)?;
        st.last = next;
        Ok(next)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HlcState> {
        // A panic while holding the lock cannot leave the state half-updated (it is two plain
        // words assigned after all fallible work), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_if_needed(&self, st: &mut HlcState, next: Epoch) -> Result<(), HlcError> {
        let Some(path) = &self.mark_path else { return Ok(()) };
        if next.physical_ms() < st.persisted_ms {
            return Ok(());
        }
        let mark = next.physical_ms() + HWM_WINDOW_MS;
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(mark.to_string().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                if let Ok(d) = fs::File::open(dir) {
                    d.sync_all()?;
                }
            }
            Ok(())
        };
        write().map_err(|source| HlcError::Persist { path: path.to_owned(), source })?;
        st.persisted_ms = mark;
        Ok(())
    }
}

/// The HLC successor of `base` given the wall clock: wall time if it moved past `base`,
/// otherwise `base` plus one logical tick, carrying into the physical part on overflow.
fn advance(base: Epoch, wall_ms: u64, base_ms: u64) -> Epoch {
    let next = if wall_ms > base_ms {
        Epoch::from_parts(wall_ms, 0)
    } else if u64::from(base.logical()) < LOGICAL_MAX {
        Epoch::from_parts(base_ms, base.logical() + 1)
    } else {
        // The logical counter is exhausted: borrow one millisecond from the future.
        Epoch::from_parts(base_ms + 1, 0)
    };
    debug_assert!(next > base);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[derive(Clone)]
    struct ManualClock(Arc<AtomicU64>);
    impl PhysicalClock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    fn manual(ms: u64) -> (ManualClock, Arc<AtomicU64>) {
        let a = Arc::new(AtomicU64::new(ms));
        (ManualClock(a.clone()), a)
    }

    #[test]
    fn now_follows_wall_clock_when_it_advances() {
        let (c, t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        assert_eq!(h.now().unwrap(), Epoch::from_parts(1000, 0));
        t.store(1005, Ordering::SeqCst);
        assert_eq!(h.now().unwrap(), Epoch::from_parts(1005, 0));
    }

    #[test]
    fn now_ticks_logically_when_wall_clock_stalls_or_goes_back() {
        let (c, t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        let a = h.now().unwrap();
        let b = h.now().unwrap();
        assert_eq!(b, Epoch::from_parts(1000, 1));
        t.store(900, Ordering::SeqCst);
        let c2 = h.now().unwrap();
        assert!(a < b && b < c2);
        assert_eq!(c2, Epoch::from_parts(1000, 2));
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let (c, _t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        let mut last = Epoch::ZERO;
        for _ in 0..=LOGICAL_MAX {
            let e = h.now().unwrap();
            assert!(e > last);
            last = e;
        }
        assert_eq!(last, Epoch::from_parts(1000, LOGICAL_MAX as u16));
        let after = h.now().unwrap();
        assert_eq!(after, Epoch::from_parts(1001, 0));
    }

    #[test]
    fn update_moves_past_remote_within_drift() {
        let (c, _t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        let remote = Epoch::from_parts(1400, 9);
        let merged = h.update(remote).unwrap();
        assert_eq!(merged, Epoch::from_parts(1400, 10));
        assert!(h.now().unwrap() > merged);
    }

    #[test]
    fn update_keeps_local_when_remote_is_older() {
        let (c, _t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        let local = h.now().unwrap();
        let merged = h.update(Epoch::from_parts(10, 3)).unwrap();
        assert!(merged > local);
        assert_eq!(merged.physical_ms(), 1000);
    }

    #[test]
    fn update_rejects_remote_past_max_drift() {
        let (c, _t) = manual(1000);
        let h = Hlc::new(Box::new(c), 500);
        let before = h.now().unwrap();
        let err = h.update(Epoch::from_parts(1501, 0)).unwrap_err();
        assert!(matches!(err, HlcError::DriftExceeded { ahead_ms: 501, max_drift_ms: 500 }), "{err}");
        assert!(err.to_string().contains("NTP"));
        // The refused timestamp did not move the clock.
        assert_eq!(h.peek(), before);
        // Exactly at the limit is accepted.
        h.update(Epoch::from_parts(1500, 0)).unwrap();
    }

    #[test]
    fn persisted_mark_keeps_epochs_monotonic_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hlc");
        let (c, t) = manual(10_000);
        let first = {
            let h = Hlc::open(&path, Box::new(c.clone()), 500).unwrap();
            let mut e = h.now().unwrap();
            for _ in 0..100 {
                e = h.now().unwrap();
            }
            e
        };
        // The machine restarts with its clock set back by a minute.
        t.store(5, Ordering::SeqCst);
        let h = Hlc::open(&path, Box::new(c), 500).unwrap();
        let after = h.now().unwrap();
        assert!(after > first, "{after:?} must follow {first:?}");
    }

    #[test]
    fn corrupt_mark_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hlc");
        fs::write(&path, "not a number").unwrap();
        let err = Hlc::open(&path, Box::new(SystemClock), 500).err().expect("must fail");
        assert!(matches!(err, HlcError::CorruptMark { .. }), "{err}");
    }
}
