//! Running `fio` as the baseline peer of a benchmark, in the same invocation, and reading its
//! JSON report. Every benchmark that compares with the local disk goes through here.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// What one fio job measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU seconds fio itself used (user + system).
    pub cpu_secs: f64,
}

pub fn available() -> bool {
    Command::new("fio").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

pub fn require() -> anyhow::Result<()> {
    if !available() {
        bail!("fio is not installed; the baseline needs it: apt-get install -y fio (or pass --no-baseline)");
    }
    Ok(())
}

/// Run one fio job; `args` are fio options without the leading `--` (e.g. `rw=write`).
/// `rw` decides whether read or write figures are reported.
pub fn run(dir: &Path, name: &str, args: &[String]) -> anyhow::Result<FioResult> {
    let out_file = dir.join(format!("fio-{name}.json"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg(format!("--directory={}", dir.display()))
        .arg("--output-format=json")
        .arg(format!("--output={}", out_file.display()))
        .arg("--group_reporting");
    for a in args {
        cmd.arg(format!("--{a}"));
    }
    let status = cmd.status().context("starting fio")?;
    if !status.success() {
        bail!("fio job {name} failed ({status}); args: {args:?}");
    }
    let text = std::fs::read_to_string(&out_file).with_context(|| format!("reading {}", out_file.display()))?;
    // fio may print warnings before the JSON document.
    let start = text.find('{').context("fio wrote no JSON")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    let is_read = args.iter().any(|a| a.starts_with("rw=") && a.contains("read"));
    let side = if is_read { &job["read"] } else { &job["write"] };
    // For jobs that sync after every write, an operation's latency is the write plus the sync.
    let sync = &job["sync"]["lat_ns"]["percentile"];
    let pct = |p: &str| (side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) + sync[p].as_f64().unwrap_or(0.0)) / 1000.0;
    let runtime_s = job["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    let cpu_pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    Ok(FioResult {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bytes_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        cpu_secs: cpu_pct / 100.0 * runtime_s,
    })
}

/// fio's `runtime` option for `secs` seconds. fio reads a bare number as whole seconds, so
/// `runtime=0.5` is not half a second (it ran for 12 s): give it milliseconds.
pub fn runtime_arg(secs: f64) -> String {
    format!("runtime={}ms", (secs * 1000.0).round().max(1.0) as u64)
}

/// CPU seconds (user + system) this process has used so far.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills a plain struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}
