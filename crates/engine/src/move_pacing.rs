//! Pacing of the data movement a rank imports (rebuild, resync, drain, extension), steered by
//! what it does to the foreground updates written on the same rank.
//!
//! A fixed rate whenever foreground updates were being written (the earlier design, like
//! DAOS's rebuild throttle or Ceph's recovery limits) was wrong both ways: 96 MiB/s per rank
//! held `strata bench rebuild` to 0.14-0.19x of the disk's bandwidth while the foreground
//! writers kept 0.7x of their rate, and any fixed rate is too fast for a slower disk. Here the
//! rank measures how long its foreground updates take (admission to the last replica's
//! acknowledgement): a baseline, averaged over updates that ran while no import had run for
//! `QUIET_AFTER`, and, every `ADJUST_EVERY`, the mean of those that ran alongside imports.
//! While imports make updates take longer than `SLOWDOWN_MAX` times the baseline (a
//! closed-loop writer then gets less than about half of its rate), the import rate is cut to
//! `CUT` of what it was; once they stay under `SLOWDOWN_OK` it grows by `GROW` per interval,
//! and imports run unpaced again once the rate made none of them wait for a whole interval. It never goes below the configured floor
//! (`--rebuild-mib-per-s`), so movement always progresses; with no baseline yet (no foreground
//! update seen without imports), busy periods are paced at the floor. Ranks without foreground
//! updates in flight (none ended within `FOREGROUND_RECENT`) import unpaced, as before.
//!
//! The baseline is not refreshed during a long movement pass (imports never stop): a workload
//! that changes meanwhile is judged against the old one. CPU contention is mostly handled
//! elsewhere (movement work runs on niced threads, `background_threads`); what this sees is
//! the rest: the disk, the network copies, the shared commit lanes.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long after a foreground update a rank still counts as busy: the gap between one
/// client's consecutive writes, so a closed-loop writer is not mistaken for an idle rank.
pub(crate) const FOREGROUND_RECENT: Duration = Duration::from_millis(50);
/// Updates that end this long after the last import are baseline samples.
const QUIET_AFTER: Duration = Duration::from_millis(100);
/// Weight of one sample in the baseline's moving average.
const BASELINE_WEIGHT: f64 = 0.05;
/// How often the import rate is reconsidered, given `SAMPLES_MIN` updates alongside imports.
const ADJUST_EVERY: Duration = Duration::from_millis(200);
const SAMPLES_MIN: u64 = 4;
/// Update latency alongside imports, over the baseline, above which imports slow down ...
const SLOWDOWN_MAX: f64 = 1.8;
/// ... and below which they speed up.
const SLOWDOWN_OK: f64 = 1.4;
const CUT: f64 = 0.6;
const GROW: f64 = 1.3;

const _: () = assert!(SLOWDOWN_OK < SLOWDOWN_MAX && CUT < 1.0 && GROW > 1.0);

pub(crate) struct MovePacer {
    /// The configured rate: the least imports are paced to (0: never paced).
    floor_bytes_per_s: u64,
    state: Mutex<State>,
}

struct State {
    /// Imports at most this fast while foreground updates are written (`None`: unpaced).
    rate: Option<f64>,
    /// When the next paced import may start.
    next_free: Instant,
    /// Imports under way, and when the last one ended.
    importing: usize,
    last_import_end: Option<Instant>,
    /// When the last foreground update ended, and how many are in flight.
    last_foreground_end: Option<Instant>,
    /// Moving average of update latency (seconds) with no import nearby.
    baseline_s: Option<f64>,
    /// Since `window_start`: updates alongside imports (count, summed latency) and bytes
    /// imported.
    window_start: Instant,
    window_samples: u64,
    window_latency_s: f64,
    window_import_bytes: u64,
    /// Whether an import waited for its turn in this window.
    window_waited: bool,
}

/// An import under way (from `MovePacer::take`); dropped when it has been written.
pub(crate) struct Importing<'a>(&'a MovePacer);

impl Drop for Importing<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.importing -= 1;
        s.last_import_end = Some(Instant::now());
    }
}

impl MovePacer {
    pub(crate) fn new(floor_bytes_per_s: u64) -> MovePacer {
        let now = Instant::now();
        MovePacer {
            floor_bytes_per_s,
            state: Mutex::new(State { rate: None, next_free: now, importing: 0, last_import_end: None, last_foreground_end: None, baseline_s: None, window_start: now, window_samples: 0, window_latency_s: 0.0, window_import_bytes: 0, window_waited: false }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A foreground update ended after `latency`.
    pub(crate) fn foreground_done(&self, latency: Duration) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last_foreground_end = Some(now);
        let lat = latency.as_secs_f64();
        let near_import = s.importing > 0 || s.last_import_end.is_some_and(|t| now.duration_since(t) < QUIET_AFTER);
        if near_import {
            s.window_samples += 1;
            s.window_latency_s += lat;
        } else {
            s.baseline_s = Some(s.baseline_s.map_or(lat, |b| b + BASELINE_WEIGHT * (lat - b)));
        }
    }

    /// Wait for this rank's turn to import `bytes` of moved data; the import counts as under way
    /// until the returned guard drops. `foreground_in_flight`: updates are running here now
    /// (the caller counts them; recently ended ones are known here).
    pub(crate) async fn take(&self, bytes: u64, foreground_in_flight: bool) -> Importing<'_> {
        let start = {
            let mut s = self.lock();
            s.importing += 1;
            let now = Instant::now();
            let busy = foreground_in_flight || s.last_foreground_end.is_some_and(|t| now.duration_since(t) < FOREGROUND_RECENT);
            self.adjust(&mut s, now);
            s.window_import_bytes += bytes;
            let rate = match (self.floor_bytes_per_s, s.baseline_s) {
                (0, _) => None,
                (floor, None) => Some(floor as f64),
                (_, Some(_)) => s.rate,
            };
            match rate {
                Some(r) if busy => {
                    let start = s.next_free.max(now);
                    s.next_free = start + Duration::from_secs_f64(bytes as f64 / r);
                    s.window_waited |= start > now;
                    Some(start)
                }
                _ => {
                    // Unpaced, and no debt carried into the next paced period.
                    s.next_free = now;
                    None
                }
            }
        };
        let guard = Importing(self);
        if let Some(at) = start {
            tokio::time::sleep_until(at).await;
        }
        guard
    }

    /// Reconsider the rate at the end of a window with enough samples alongside imports.
    fn adjust(&self, s: &mut State, now: Instant) {
        let elapsed = now.duration_since(s.window_start);
        if elapsed < ADJUST_EVERY {
            return;
        }
        if let (Some(base), true) = (s.baseline_s, s.window_samples >= SAMPLES_MIN) {
            let slowdown = s.window_latency_s / s.window_samples as f64 / base.max(1e-6);
            let achieved = s.window_import_bytes as f64 / elapsed.as_secs_f64();
            let floor = self.floor_bytes_per_s as f64;
            s.rate = if slowdown > SLOWDOWN_MAX {
                Some((s.rate.unwrap_or(achieved).min(achieved) * CUT).max(floor))
            } else if slowdown < SLOWDOWN_OK {
                s.rate.map(|r| r * GROW).filter(|_| s.window_waited)
            } else {
                s.rate
            };
            tracing::debug!(slowdown, achieved, rate = ?s.rate, "import pacing");
        }
        s.window_start = now;
        s.window_samples = 0;
        s.window_latency_s = 0.0;
        s.window_import_bytes = 0;
        s.window_waited = false;
    }

    #[cfg(test)]
    fn rate(&self) -> Option<f64> {
        self.lock().rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: the check is on virtual time, deterministic on any machine.
    #[tokio::test(start_paused = true)]
    async fn without_a_baseline_busy_periods_are_paced_at_the_floor_and_idle_ones_not_at_all() {
        let p = MovePacer::new(10 << 20);
        let start = Instant::now();
        for _ in 0..4 {
            drop(p.take(5 << 20, true).await);
        }
        // 20 MiB at 10 MiB/s: the fourth import may start only after 1.5 s of budget is used.
        assert!(start.elapsed() >= Duration::from_millis(1500), "imported too fast: {:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_millis(1600), "paced slower than the rate: {:?}", start.elapsed());
        let idle = Instant::now();
        for _ in 0..4 {
            drop(p.take(5 << 20, false).await);
        }
        assert_eq!(idle.elapsed(), Duration::ZERO, "no foreground: no pacing, and no debt from the busy period");
        let busy_again = Instant::now();
        drop(p.take(5 << 20, true).await);
        assert_eq!(busy_again.elapsed(), Duration::ZERO, "the first import of a busy period starts at once");
        let never = MovePacer::new(0);
        let s2 = Instant::now();
        drop(never.take(1 << 30, true).await);
        assert_eq!(s2.elapsed(), Duration::ZERO, "0 means no limit");
    }

    /// `rounds` times: take an import of `bytes` (waiting for its turn), report `SAMPLES_MIN`
    /// foreground updates of `latency` alongside it, end it, and let an adjustment interval pass.
    async fn import_rounds(p: &MovePacer, rounds: usize, bytes: u64, latency: Duration) {
        for _ in 0..rounds {
            let g = p.take(bytes, true).await;
            for _ in 0..SAMPLES_MIN {
                p.foreground_done(latency);
            }
            drop(g);
            tokio::time::advance(ADJUST_EVERY).await;
        }
    }

    /// With a baseline, imports run unpaced while updates alongside them stay fast; when they
    /// slow down past `SLOWDOWN_MAX`, the rate is cut (never below the floor) and it recovers
    /// to unpaced once they are fast again.
    #[tokio::test(start_paused = true)]
    async fn the_rate_follows_what_imports_do_to_foreground_latency() {
        let p = MovePacer::new(1 << 20);
        for _ in 0..20 {
            p.foreground_done(Duration::from_millis(2));
        }
        // Alongside imports, as fast as the baseline: unpaced.
        let t = Instant::now();
        import_rounds(&p, 10, 8 << 20, Duration::from_millis(2)).await;
        assert_eq!(p.rate(), None);
        assert_eq!(t.elapsed(), ADJUST_EVERY * 10, "an unpaced import waited");
        // Five times slower: cut, repeatedly, down to the floor at most.
        import_rounds(&p, 30, 8 << 20, Duration::from_millis(10)).await;
        let cut = p.rate().expect("paced once updates slowed down");
        assert!(cut >= (1 << 20) as f64, "below the floor: {cut}");
        assert!(cut < (8 << 20) as f64 / ADJUST_EVERY.as_secs_f64(), "not cut: {cut}");
        // Fast again: the rate grows back to unpaced.
        import_rounds(&p, 200, 1 << 20, Duration::from_millis(2)).await;
        assert_eq!(p.rate(), None, "never unpaced again");
    }
}
