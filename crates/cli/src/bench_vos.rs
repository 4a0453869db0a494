//! `strata bench vos`: one target's versioned store against fio on the same file system.
//!
//! Patterns (each run for `--seconds`, the whole set repeated `--rounds` times, ours and fio's
//! alternating, the median ratio reported):
//! - 4 KiB durable single-value updates with 1, 16 and 64 concurrent writers (group commit)
//!   vs fio psync 4 KiB writes with fsync after each (qd1, the durable-write floor);
//! - 1 MiB array writes (durable) vs fio 1 MiB writes with fdatasync after each;
//! - 4 KiB fetches from 4 threads vs fio 4 KiB random reads from 4 jobs (buffered, like ours).

use crate::fio::{self, FioResult};
use crate::output::emit;
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_types::{ContId, Epoch, Oid};
use strata_vos::{Update, UpdateOp, Vos, VosConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Directory on the file system to measure (a fresh subdirectory is used and removed).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Seconds per pattern.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds of the whole set; the median ratio over rounds is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the fio baseline (figures only, no ratios).
    #[arg(long)]
    no_baseline: bool,
    /// Commit groups that may wait for the disk at once (as `strata server --sync-lanes`).
    #[arg(long, default_value_t = VosConfig::default().sync_lanes)]
    sync_lanes: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    pattern: String,
    unit: String,
    strata: f64,
    strata_p99_us: f64,
    strata_cpu_secs: f64,
    fio: Option<f64>,
    fio_p99_us: Option<f64>,
    fio_cpu_secs: Option<f64>,
    /// Median over rounds of strata / fio.
    ratio: Option<f64>,
    target: Option<String>,
}

struct Measured {
    value: f64,
    p99_us: f64,
    cpu_secs: f64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Run `threads` workers doing `op(thread, i)` for `secs`; returns ops/s and p99 latency.
fn drive(threads: usize, secs: f64, op: impl Fn(usize, u64) -> anyhow::Result<()> + Sync) -> anyhow::Result<Measured> {
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let cpu0 = fio::self_cpu_secs();
    let start = Instant::now();
    let lats: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, count, op) = (&stop, &count, &op);
                s.spawn(move || -> anyhow::Result<Vec<u32>> {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        op(t, i)?;
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        count.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))).collect::<anyhow::Result<Vec<_>>>()
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let mut all: Vec<u32> = lats.into_iter().flatten().collect();
    all.sort_unstable();
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or(0) as f64;
    Ok(Measured { value: count.load(Ordering::Relaxed) as f64 / elapsed, p99_us: p99, cpu_secs: fio::self_cpu_secs() - cpu0 })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let baseline = !args.no_baseline;
    if baseline {
        fio::require()?;
    }
    let root = tempfile::Builder::new().prefix("strata-bench-vos-").tempdir_in(&args.dir).with_context(|| format!("creating a directory under {}", args.dir.display()))?;
    let vos = Arc::new(Vos::open(&root.path().join("target"), &VosConfig { sync_lanes: args.sync_lanes, ..VosConfig::default() })?);
    let fio_dir = root.path().join("fio");
    std::fs::create_dir_all(&fio_dir)?;
    let cont = ContId::new_random();
    let epoch = AtomicU64::new(1);
    let secs = args.seconds;
    let rt = fio::runtime_arg(secs);

    // Prepare data for the fetch pattern: 4096 values of 4 KiB.
    let keys = 4096u64;
    let oid_read = Oid::from_u128(2);
    for chunk in (0..keys).collect::<Vec<_>>().chunks(256) {
        let batch: Vec<Update> = chunk
            .iter()
            .map(|k| Update { cont, oid: oid_read, dkey: k.to_be_bytes().to_vec(), epoch: Epoch(epoch.fetch_add(1, Ordering::Relaxed)), op: UpdateOp::Single { akey: b"v".to_vec(), value: vec![*k as u8; 4096] } })
            .collect();
        vos.update(&batch)?;
    }

    type Ours<'a> = Box<dyn Fn() -> anyhow::Result<Measured> + 'a>;
    struct Pattern<'a> {
        name: &'static str,
        unit: &'static str,
        ours: Ours<'a>,
        fio: Vec<String>,
        fio_bytes: bool,
        target: Option<(&'static str, f64)>,
    }
    let value4k = vec![0xabu8; 4096];
    let value1m = vec![0xcdu8; 1 << 20];
    let update4k = |writers: usize| -> Ours<'_> {
        let (vos, epoch, value4k) = (vos.clone(), &epoch, &value4k);
        Box::new(move || {
            drive(writers, secs, |t, i| {
                let e = epoch.fetch_add(1, Ordering::Relaxed);
                let u = Update { cont, oid: Oid::from_u128(1), dkey: format!("{t}-{}", i % 1000).into_bytes(), epoch: Epoch(e), op: UpdateOp::Single { akey: b"v".to_vec(), value: value4k.clone() } };
                Ok(vos.update(&[u])?)
            })
        })
    };
    let fio_4k_fsync = vec!["rw=write".into(), "bs=4k".into(), "size=64m".into(), "ioengine=psync".into(), "fsync=1".into(), "time_based".into(), rt.clone()];
    let patterns: Vec<Pattern> = vec![
        Pattern { name: "4k update, 1 writer", unit: "ops/s", ours: update4k(1), fio: fio_4k_fsync.clone(), fio_bytes: false, target: None },
        Pattern { name: "4k update, 16 writers", unit: "ops/s", ours: update4k(16), fio: fio_4k_fsync.clone(), fio_bytes: false, target: None },
        Pattern { name: "4k update, 64 writers", unit: "ops/s", ours: update4k(64), fio: fio_4k_fsync, fio_bytes: false, target: Some((">= 10x fio fsync-per-write", 10.0)) },
        Pattern {
            name: "1 MiB array write",
            unit: "MiB/s",
            ours: {
                let (vos, epoch, value1m) = (vos.clone(), &epoch, &value1m);
                Box::new(move || {
                    drive(1, secs, |_, i| {
                        let e = epoch.fetch_add(1, Ordering::Relaxed);
                        let u = Update { cont, oid: Oid::from_u128(3), dkey: (i % 256).to_be_bytes().to_vec(), epoch: Epoch(e), op: UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: value1m.clone().into() } };
                        Ok(vos.update(&[u])?)
                    })
                })
            },
            fio: vec!["rw=write".into(), "bs=1m".into(), "size=1g".into(), "ioengine=psync".into(), "fdatasync=1".into(), "time_based".into(), rt.clone()],
            fio_bytes: true,
            target: Some((">= 0.70x fio synced 1 MiB writes", 0.7)),
        },
        Pattern {
            name: "4k fetch, 4 threads",
            unit: "ops/s",
            ours: {
                let vos = vos.clone();
                Box::new(move || {
                    drive(4, secs, |t, i| {
                        let mut x = (t as u64 + 1) * 0x9e37_79b9 + i;
                        let k = xorshift(&mut x) % keys;
                        let v = vos.fetch_single(cont, oid_read, &k.to_be_bytes(), b"v", Epoch::MAX)?;
                        anyhow::ensure!(v.is_some_and(|(_, v)| v.len() == 4096), "prepared key {k} missing");
                        Ok(())
                    })
                })
            },
            fio: vec!["rw=randread".into(), "bs=4k".into(), "size=64m".into(), "ioengine=psync".into(), "numjobs=4".into(), "time_based".into(), rt.clone()],
            fio_bytes: false,
            target: None,
        },
    ];

    let mut rows: Vec<Row> = Vec::new();
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); patterns.len()];
    let mut ours_runs: Vec<Vec<Measured>> = (0..patterns.len()).map(|_| Vec::new()).collect();
    let mut fio_runs: Vec<Vec<FioResult>> = vec![Vec::new(); patterns.len()];
    for round in 0..args.rounds.max(1) {
        for (i, p) in patterns.iter().enumerate() {
            if !args.json {
                eprintln!("round {}/{}: {}", round + 1, args.rounds.max(1), p.name);
            }
            // One 1 MiB write per op, so ops/s is MiB/s for the array pattern.
            let m = (p.ours)()?;
            if baseline {
                let f = fio::run(&fio_dir, &format!("p{i}"), &p.fio)?;
                let fv = if p.fio_bytes { f.bytes_per_sec / (1u64 << 20) as f64 } else { f.iops };
                if fv > 0.0 {
                    ratios[i].push(m.value / fv);
                }
                fio_runs[i].push(f);
            }
            ours_runs[i].push(m);
        }
    }
    for (i, p) in patterns.iter().enumerate() {
        let ours_v = fio::median(ours_runs[i].iter().map(|m| m.value).collect());
        let ours_p99 = fio::median(ours_runs[i].iter().map(|m| m.p99_us).collect());
        let ours_cpu = fio::median(ours_runs[i].iter().map(|m| m.cpu_secs).collect());
        let (fv, fp99, fcpu) = if baseline {
            let f = &fio_runs[i];
            let v = fio::median(f.iter().map(|r| if p.fio_bytes { r.bytes_per_sec / (1u64 << 20) as f64 } else { r.iops }).collect());
            (Some(v), Some(fio::median(f.iter().map(|r| r.p99_us).collect())), Some(fio::median(f.iter().map(|r| r.cpu_secs).collect())))
        } else {
            (None, None, None)
        };
        let ratio = if ratios[i].is_empty() { None } else { Some(fio::median(ratios[i].clone())) };
        rows.push(Row {
            pattern: p.name.into(),
            unit: p.unit.into(),
            strata: ours_v,
            strata_p99_us: ours_p99,
            strata_cpu_secs: ours_cpu,
            fio: fv,
            fio_p99_us: fp99,
            fio_cpu_secs: fcpu,
            ratio,
            target: p.target.map(|(t, goal)| format!("{t}: {}", match ratio { Some(r) if r >= goal => "met", Some(_) => "NOT met", None => "no baseline" })),
        });
    }
    emit(args.json, &rows, |rows| {
        println!("strata bench vos: one target on {} ({} round(s) of {secs} s per pattern; median)", args.dir.display(), args.rounds.max(1));
        println!("{:<24} {:>7} {:>12} {:>10} {:>12} {:>10} {:>8}  target", "pattern", "unit", "strata", "p99 us", "fio", "p99 us", "ratio");
        for r in rows {
            println!(
                "{:<24} {:>7} {:>12.1} {:>10.0} {:>12} {:>10} {:>8}  {}",
                r.pattern,
                r.unit,
                r.strata,
                r.strata_p99_us,
                r.fio.map_or("-".into(), |v| format!("{v:.1}")),
                r.fio_p99_us.map_or("-".into(), |v| format!("{v:.0}")),
                r.ratio.map_or("-".into(), |v| format!("{v:.2}x")),
                r.target.clone().unwrap_or_default()
            );
        }
        println!("fio jobs: 4k psync write + fsync each (qd1); 1 MiB psync write + fdatasync each; 4k psync randread x4 (buffered)");
    })
}
