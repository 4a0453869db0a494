//! Counters of the requests a rank serves, by kind, and their rendering with the rank's other
//! counters (`EngineStats`) as a Prometheus text exposition (`strata server --metrics-addr`,
//! `GET /metrics`). Atomics only: recording a request takes no lock and allocates nothing.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use strata_rpc::engine_msg::{EngineReq, EngineStats};
use strata_rpc::kv_msg::KvReq;

/// Request kinds as they are labelled (`kind="..."`); `kind_of` maps every request to one.
const KINDS: [&str; 16] = ["update", "replicate", "fetch", "list_dkeys", "list_akeys", "list_objects", "clock", "scrub", "raw_get", "export", "import", "kv_read", "kv_write", "cap_fetch", "cap_update", "admin"];

/// Upper bounds of the latency buckets, in microseconds (Prometheus `le`, cumulative).
const BUCKETS_US: [u64; 14] = [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 2_500_000, 10_000_000];

fn kind_of(req: &EngineReq) -> usize {
    match req {
        EngineReq::Update { .. } => 0,
        EngineReq::Replicate { .. } => 1,
        EngineReq::Fetch { .. } => 2,
        EngineReq::ListDkeys { .. } => 3,
        EngineReq::ListAkeys { .. } => 4,
        EngineReq::ListObjects { .. } => 5,
        EngineReq::Clock => 6,
        EngineReq::Scrub { .. } => 7,
        EngineReq::RawGet { .. } => 8,
        EngineReq::Export { .. } => 9,
        EngineReq::Import { .. } => 10,
        EngineReq::Kv(KvReq::Get { .. } | KvReq::Scan { .. }) => 11,
        EngineReq::Kv(_) => 12,
        EngineReq::CapFetch { .. } => 13,
        EngineReq::CapUpdate { .. } => 14,
        EngineReq::Stats | EngineReq::PoolVersions { .. } => 15,
    }
}

#[derive(Default)]
struct KindCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Per bucket (not cumulative; summed when rendered), the last one past every bound.
    latency: [AtomicU64; BUCKETS_US.len() + 1],
}

#[derive(Default)]
pub(crate) struct RequestMetrics {
    kinds: [KindCounters; KINDS.len()],
}

/// A request being served; `done` records it.
pub(crate) struct Measuring {
    kind: usize,
    start: std::time::Instant,
}

impl RequestMetrics {
    pub(crate) fn start(&self, req: &EngineReq, payload_bytes: usize) -> Measuring {
        let kind = kind_of(req);
        self.kinds[kind].bytes_in.fetch_add(payload_bytes as u64, Ordering::Relaxed);
        Measuring { kind, start: std::time::Instant::now() }
    }

    pub(crate) fn done(&self, m: Measuring, ok: bool, payload_out: usize) {
        let k = &self.kinds[m.kind];
        let us = u64::try_from(m.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        k.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            k.errors.fetch_add(1, Ordering::Relaxed);
        }
        k.bytes_out.fetch_add(payload_out as u64, Ordering::Relaxed);
        k.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let b = BUCKETS_US.iter().position(|le| us <= *le).unwrap_or(BUCKETS_US.len());
        k.latency[b].fetch_add(1, Ordering::Relaxed);
    }
}

/// One metric family: its help and type lines once, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn head(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) -> &mut Self {
        let _ = if labels.is_empty() { writeln!(self.out, "{name} {v}") } else { writeln!(self.out, "{name}{{{labels}}} {v}") };
        self
    }
}

/// Everything a rank reports, as Prometheus text exposition format 0.0.4.
pub(crate) fn render(rank: u32, req: &RequestMetrics, s: &EngineStats, fs_free_bytes: u64, fs_total_bytes: u64, uptime: Duration) -> String {
    let mut out = String::with_capacity(16 << 10);
    let r = format!("rank=\"{rank}\"");
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        Family::head(out, name, "gauge", help).sample(name, &r, v);
    };
    gauge(&mut out, "strata_engine_targets", "Targets (storage units) this rank serves.", u64::from(s.targets));
    gauge(&mut out, "strata_engine_used_bytes", "Bytes the targets of this rank hold on disk.", s.used_bytes);
    gauge(&mut out, "strata_engine_fs_free_bytes", "Free bytes of the file system under this rank's directory.", fs_free_bytes);
    gauge(&mut out, "strata_engine_fs_size_bytes", "Size of the file system under this rank's directory.", fs_total_bytes);
    gauge(&mut out, "strata_engine_uptime_seconds", "Seconds since this rank's engine started.", uptime.as_secs());
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        Family::head(out, name, "counter", help).sample(name, &r, v);
    };
    counter(&mut out, "strata_engine_moved_bytes_total", "Bytes this rank pushed to other places (rebuild, resync, drain, extension).", s.moved_bytes);
    counter(&mut out, "strata_engine_moved_records_total", "Records this rank pushed to other places.", s.moved_records);
    counter(&mut out, "strata_engine_aggregation_passes_total", "Background aggregation passes.", s.aggregation.passes);
    counter(&mut out, "strata_engine_aggregation_records_removed_total", "Versions aggregation merged away.", s.aggregation.records_removed);
    counter(&mut out, "strata_engine_aggregation_bytes_reclaimed_total", "Payload bytes of the versions aggregation removed.", s.aggregation.bytes_reclaimed);
    counter(&mut out, "strata_engine_aggregation_errors_total", "Aggregation passes that failed.", s.aggregation.errors);
    counter(&mut out, "strata_engine_scrub_passes_total", "Completed background scrub passes.", s.scrub_passes);
    counter(&mut out, "strata_engine_scrub_bytes_checked_total", "Bytes scrub verified.", s.scrub.bytes_checked);
    counter(&mut out, "strata_engine_scrub_corrupt_total", "Records scrub found corrupt.", s.scrub.corrupt);
    counter(&mut out, "strata_engine_scrub_repaired_total", "Corrupt records scrub repaired from a healthy shard.", s.scrub.repaired);
    counter(&mut out, "strata_engine_scrub_lost_total", "Corrupt records with no healthy shard to repair from.", s.scrub.lost);

    let pool_rows = |out: &mut String, name: &str, kind: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
        let mut f = Family::head(out, name, kind, help);
        for (pool, v) in rows {
            f.sample(name, &format!("{r},pool=\"{pool}\""), v);
        }
    };
    pool_rows(&mut out, "strata_engine_movement_bytes_total", "gauge", "Bytes this rank's latest data-movement pass of the pool has to push.", &mut s.movement.iter().map(|m| (m.pool.to_string(), m.bytes_total)));
    pool_rows(&mut out, "strata_engine_movement_bytes_done", "gauge", "Bytes that pass pushed so far.", &mut s.movement.iter().map(|m| (m.pool.to_string(), m.bytes_done)));
    pool_rows(&mut out, "strata_engine_movement_done", "gauge", "1 once that pass finished.", &mut s.movement.iter().map(|m| (m.pool.to_string(), u64::from(m.done))));
    pool_rows(&mut out, "strata_engine_reclaim_bytes_total", "counter", "Stored bytes reclaim deleted (copies movement left where the map no longer places them).", &mut s.reclaim.iter().map(|m| (m.pool.to_string(), m.bytes)));

    let per_kind = |out: &mut String, name: &str, help: &str, get: &dyn Fn(&KindCounters) -> u64| {
        let mut f = Family::head(out, name, "counter", help);
        for (i, k) in req.kinds.iter().enumerate() {
            f.sample(name, &format!("{r},kind=\"{}\"", KINDS[i]), get(k));
        }
    };
    per_kind(&mut out, "strata_engine_requests_total", "Requests served, by kind.", &|k| k.requests.load(Ordering::Relaxed));
    per_kind(&mut out, "strata_engine_request_errors_total", "Requests answered with an error, by kind.", &|k| k.errors.load(Ordering::Relaxed));
    per_kind(&mut out, "strata_engine_request_bytes_in_total", "Payload bytes received with requests, by kind.", &|k| k.bytes_in.load(Ordering::Relaxed));
    per_kind(&mut out, "strata_engine_request_bytes_out_total", "Payload bytes sent with answers, by kind.", &|k| k.bytes_out.load(Ordering::Relaxed));

    let name = "strata_engine_request_duration_seconds";
    let mut f = Family::head(&mut out, name, "histogram", "Time from a request's arrival to its answer, by kind.");
    for (i, k) in req.kinds.iter().enumerate() {
        let labels = format!("{r},kind=\"{}\"", KINDS[i]);
        let mut cumulative = 0u64;
        for (b, le) in BUCKETS_US.iter().enumerate() {
            cumulative += k.latency[b].load(Ordering::Relaxed);
            f.sample(&format!("{name}_bucket"), &format!("{labels},le=\"{}\"", *le as f64 / 1e6), cumulative);
        }
        cumulative += k.latency[BUCKETS_US.len()].load(Ordering::Relaxed);
        f.sample(&format!("{name}_bucket"), &format!("{labels},le=\"+Inf\""), cumulative);
        f.sample(&format!("{name}_sum"), &labels, k.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        f.sample(&format!("{name}_count"), &labels, cumulative);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).unwrap_or_else(|| panic!("no {series} in\n{text}")).parse().unwrap()
    }

    #[test]
    fn requests_are_counted_by_kind_with_a_cumulative_histogram() {
        let m = RequestMetrics::default();
        let clock = EngineReq::Clock;
        for ok in [true, true, false] {
            let t = m.start(&clock, 10);
            m.done(t, ok, 100);
        }
        let text = render(3, &m, &EngineStats::default(), 5, 9, Duration::from_secs(2));
        let l = "rank=\"3\",kind=\"clock\"";
        assert_eq!(value(&text, &format!("strata_engine_requests_total{{{l}}}")), 3.0);
        assert_eq!(value(&text, &format!("strata_engine_request_errors_total{{{l}}}")), 1.0);
        assert_eq!(value(&text, &format!("strata_engine_request_bytes_in_total{{{l}}}")), 30.0);
        assert_eq!(value(&text, &format!("strata_engine_request_bytes_out_total{{{l}}}")), 300.0);
        assert_eq!(value(&text, &format!("strata_engine_request_duration_seconds_bucket{{{l},le=\"+Inf\"}}")), 3.0);
        assert_eq!(value(&text, &format!("strata_engine_request_duration_seconds_count{{{l}}}")), 3.0);
        assert_eq!(value(&text, "strata_engine_fs_free_bytes{rank=\"3\"}"), 5.0);
        // Buckets never decrease, and every family is declared once before its samples.
        let buckets: Vec<f64> = text.lines().filter(|x| x.starts_with(&format!("strata_engine_request_duration_seconds_bucket{{{l}"))).map(|x| x.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert_eq!(buckets.len(), BUCKETS_US.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_owned()), "declared twice: {line}");
            } else if !line.starts_with('#') {
                let series = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| series.strip_suffix(s)).filter(|f| declared.contains(*f)).unwrap_or(series);
                assert!(declared.contains(family), "sample before its TYPE line: {line}");
            }
        }
        // Kinds with no request still report zeros, so rates start at a known value.
        assert_eq!(value(&text, "strata_engine_requests_total{rank=\"3\",kind=\"update\"}"), 0.0);
    }
}
