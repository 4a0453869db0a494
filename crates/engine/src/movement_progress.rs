//! Progress of this rank's data-movement pass (rebuild, resync, drain, extension) per pool, for
//! `EngineReq::Stats` and so `strata pool query` / `pool rebuild --watch`.
//!
//! A pass first sizes its work (objects this rank pushes, and the bytes they carry: stored
//! bytes of each pushed group times its destinations), then moves it, a few objects at a time.
//! Reported values never go down within a map version, even when a failed pass runs again:
//! totals keep their maximum, done counts the most any attempt reached. Bytes done count what
//! was pushed, capped per object at its estimate and topped up to it when the object is done,
//! so done == total exactly when the pass ends.
//! Objects in flight are told apart by the id `begin_object` hands out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use strata_rpc::engine_msg::MovementProgress;
use strata_types::PoolId;

struct Pass {
    version: u64,
    started: Instant,
    finished: Option<Instant>,
    objects_total: u64,
    bytes_total: u64,
    /// This attempt's counts.
    objects_done: u64,
    bytes_done: u64,
    /// Objects being moved, by id: estimate and what was pushed for each so far (capped).
    current: HashMap<u64, (u64, u64)>,
    next_id: u64,
    /// The most an earlier attempt at this version reported.
    floor: (u64, u64),
    /// The error that ended the last failed attempt: shown until something moves again or
    /// the pass ends.
    failure: Option<String>,
}

impl Pass {
    fn new(version: u64, objects_total: u64, bytes_total: u64) -> Pass {
        Pass { version, started: Instant::now(), finished: None, objects_total, bytes_total, objects_done: 0, bytes_done: 0, current: HashMap::new(), next_id: 0, floor: (0, 0), failure: None }
    }

    fn report(&self, pool: PoolId) -> MovementProgress {
        let cur: u64 = self.current.values().map(|(_, n)| n).sum();
        let objects_done = self.objects_done.max(self.floor.0).min(self.objects_total);
        let bytes_done = (self.bytes_done + cur).max(self.floor.1).min(self.bytes_total);
        let end = self.finished.unwrap_or_else(Instant::now);
        let stalled = self.failure.clone().filter(|_| self.finished.is_none());
        MovementProgress { pool, version: self.version, objects_total: self.objects_total, objects_done, bytes_total: self.bytes_total, bytes_done, elapsed_ms: end.duration_since(self.started).as_millis() as u64, done: self.finished.is_some(), stalled }
    }
}

#[derive(Default)]
pub(crate) struct MovementTracker {
    passes: Mutex<HashMap<PoolId, Pass>>,
}

impl MovementTracker {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<PoolId, Pass>) -> T) -> T {
        f(&mut self.passes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A pass for `version` starts, with its sized work.
    pub(crate) fn begin(&self, pool: PoolId, version: u64, objects_total: u64, bytes_total: u64) {
        self.with(|m| match m.get_mut(&pool) {
            Some(p) if p.version == version => {
                let r = p.report(pool);
                p.floor = (r.objects_done, r.bytes_done);
                p.objects_total = p.objects_total.max(objects_total);
                p.bytes_total = p.bytes_total.max(bytes_total);
                (p.objects_done, p.bytes_done, p.finished) = (0, 0, None);
                p.current.clear();
            }
            _ => {
                m.insert(pool, Pass::new(version, objects_total, bytes_total));
            }
        })
    }

    /// An attempt at `version` failed with `error` (the next tick tries again).
    pub(crate) fn failed(&self, pool: PoolId, version: u64, error: String) {
        self.with(|m| {
            let p = m.entry(pool).or_insert_with(|| Pass::new(version, 0, 0));
            if p.version != version {
                *p = Pass::new(version, 0, 0);
            }
            p.failure = Some(error);
        })
    }

    /// An object starts moving; the id names it to `pushed` and `end_object`.
    pub(crate) fn begin_object(&self, pool: PoolId, estimate_bytes: u64) -> u64 {
        self.with(|m| match m.get_mut(&pool) {
            Some(p) => {
                p.next_id += 1;
                p.current.insert(p.next_id, (estimate_bytes, 0));
                p.next_id
            }
            None => 0,
        })
    }

    /// Bytes pushed for object `id` (no-op for one the pass does not track).
    pub(crate) fn pushed(&self, pool: PoolId, id: u64, bytes: u64) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&pool) {
                if let Some((est, n)) = p.current.get_mut(&id) {
                    *n = (*n + bytes).min(*est);
                    p.failure = None;
                }
            }
        })
    }

    pub(crate) fn end_object(&self, pool: PoolId, id: u64) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&pool) {
                if let Some((est, _)) = p.current.remove(&id) {
                    p.objects_done += 1;
                    p.bytes_done += est;
                    p.failure = None;
                }
            }
        })
    }

    /// Objects moved together (`import_batch`), tracked by what they carried, not one by one.
    pub(crate) fn batch_done(&self, pool: PoolId, objects: u64, bytes: u64) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&pool) {
                p.objects_done += objects;
                p.bytes_done += bytes;
                p.failure = None;
            }
        })
    }

    pub(crate) fn finish(&self, pool: PoolId, version: u64) {
        self.with(|m| {
            if let Some(p) = m.get_mut(&pool).filter(|p| p.version == version) {
                debug_assert!(p.current.is_empty(), "an object still moving when the pass ends");
                p.finished = Some(Instant::now());
                // Work sized at the start and all done: the pass moved what it had to.
                p.objects_done = p.objects_total;
                p.bytes_done = p.bytes_total;
            }
        })
    }

    pub(crate) fn report(&self) -> Vec<MovementProgress> {
        self.with(|m| m.iter().map(|(pool, p)| p.report(*pool)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_never_goes_down_and_ends_equal_to_total() {
        let t = MovementTracker::default();
        let pool = PoolId::new_random();
        t.begin(pool, 7, 3, 150);
        let a = t.begin_object(pool, 60);
        let c = t.begin_object(pool, 50);
        t.pushed(pool, a, 80);
        t.pushed(pool, c, 20);
        assert_eq!(t.report()[0].bytes_done, 80, "each object capped at its own estimate");
        t.end_object(pool, a);
        let b = t.begin_object(pool, 40);
        t.pushed(pool, b, 10);
        let before = t.report()[0].clone();
        assert_eq!((before.objects_done, before.bytes_done), (1, 90));
        // The pass fails and runs again: nothing reported goes down.
        t.begin(pool, 7, 3, 140);
        let again = t.report()[0].clone();
        assert_eq!((again.objects_total, again.bytes_total), (3, 150));
        assert_eq!((again.objects_done, again.bytes_done), (1, 90));
        t.pushed(pool, c, 50);
        assert_eq!(t.report()[0].bytes_done, 90, "an object of the failed attempt counts no more");
        for est in [60, 50, 40] {
            let id = t.begin_object(pool, est);
            t.end_object(pool, id);
        }
        t.finish(pool, 7);
        let end = t.report()[0].clone();
        assert!(end.done);
        assert_eq!((end.objects_done, end.bytes_done), (end.objects_total, end.bytes_total));
    }

    #[test]
    fn a_failed_attempt_shows_as_stalled_until_something_moves_again() {
        let t = MovementTracker::default();
        let pool = PoolId::new_random();
        // A failure before any pass of this version was sized still shows.
        t.failed(pool, 3, "rank 1: no space".into());
        assert_eq!((t.report()[0].version, t.report()[0].stalled.as_deref()), (3, Some("rank 1: no space")));
        t.begin(pool, 3, 2, 100);
        assert!(t.report()[0].stalled.is_some(), "a retry that has moved nothing yet is still stalled");
        t.batch_done(pool, 1, 50);
        assert_eq!(t.report()[0].stalled, None, "moving again ends the stall");
        t.failed(pool, 3, "rank 1: no space".into());
        t.begin(pool, 3, 2, 100);
        let id = t.begin_object(pool, 50);
        t.pushed(pool, id, 10);
        assert_eq!(t.report()[0].stalled, None);
        t.end_object(pool, id);
        t.failed(pool, 3, "again".into());
        t.finish(pool, 3);
        assert_eq!(t.report()[0].stalled, None, "a finished pass is not stalled");
        // A newer map's failure replaces the older pass.
        t.failed(pool, 4, "rank 2: unreachable".into());
        let r = t.report()[0].clone();
        assert_eq!((r.version, r.done, r.stalled.as_deref()), (4, false, Some("rank 2: unreachable")));
    }
}
