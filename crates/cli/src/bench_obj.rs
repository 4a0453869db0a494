//! `strata bench obj`: object writes or reads through the client library against a running
//! cluster, and (with `--baseline`) fio with the same block size and concurrency on the file
//! system holding the engines, in the same invocation, with the ratios.

use crate::cluster_cmd::Conn;
use anyhow::Context;
use crate::fio;
use crate::output::{emit, parse_size};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_client::ClusterFile;
use strata_rpc::mgmt_msg::{ContType, MgmtCmd};
use strata_types::{ContId, Epoch, ObjectClass};

#[derive(clap::Args)]
pub struct Args {
    /// Object class to measure: S1, RP_3G1, EC_2P1G1, ...
    #[arg(long, default_value = "RP_3G1")]
    oclass: String,
    /// Bytes per operation: 4k, 64k, 1m.
    #[arg(long, default_value = "4k")]
    size: String,
    /// write (durable array writes) or read (of data written first).
    #[arg(long, default_value = "write")]
    op: String,
    /// Concurrent operations in flight.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Seconds to run each side.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Pool to use.
    #[arg(long, default_value = "tank")]
    pool: String,
    /// Also run fio with the same pattern on the engines' file system and print the ratio.
    #[arg(long)]
    baseline: bool,
    /// Rounds of (this bench, then fio), each in a container of its own, reported as medians
    /// (the ratio: the median of the rounds' ratios). Default: 3 with --baseline (a ratio of
    /// one round on a shared disk says little), else 1.
    #[arg(long)]
    rounds: Option<usize>,
    /// Keep the container the bench wrote (named in the report) instead of destroying it at the
    /// end: a 1 MiB write run leaves gigabytes behind.
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Serialize)]
struct Report {
    oclass: String,
    op: String,
    size_bytes: u64,
    threads: usize,
    ops_per_sec: f64,
    mib_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// CPU of this client process only (the engines are separate processes).
    cpu_secs: f64,
    /// CPU of the engines while this bench measured, when they run on this machine (a
    /// `strata up` cluster); None for a remote cluster.
    engine_cpu_secs: Option<f64>,
    fio: Option<fio::FioResult>,
    throughput_ratio: Option<f64>,
    /// Writes only: fio writing each block once into freshly allocated space, with direct I/O
    /// and the same syncs: what the disk gives a store that, like this one, puts every new
    /// version in new space (no overwrite in place), so the disk's allocation cost is in both.
    fio_fresh_space: Option<fio::FioResult>,
    fresh_space_ratio: Option<f64>,
    p99_ratio: Option<f64>,
    target: Option<String>,
    /// The container written, when `--keep` kept it (otherwise it is destroyed at the end).
    kept_container: Option<String>,
    /// Seconds this side ran.
    elapsed_secs: f64,
    /// With more than one round, each round's report (the figures above are their medians).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    per_round: Vec<Report>,
}

/// The median of `f` over `rs` (None when no round has it).
fn median_of(rs: &[Report], f: impl Fn(&Report) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = rs.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| fio::median(v))
}

/// One report of the rounds' medians (ratios: medians of the rounds' ratios, not ratios of
/// medians), the target judged on them.
fn medians(rounds: Vec<Report>, class: ObjectClass) -> Report {
    let m = |f: fn(&Report) -> f64| fio::median(rounds.iter().map(f).collect());
    let fio_median = |pick: fn(&Report) -> Option<&fio::FioResult>| -> Option<fio::FioResult> {
        let fs: Vec<&fio::FioResult> = rounds.iter().filter_map(pick).collect();
        (!fs.is_empty()).then(|| {
            let m = |f: fn(&fio::FioResult) -> f64| fio::median(fs.iter().map(|x| f(x)).collect());
            fio::FioResult { iops: m(|f| f.iops), bytes_per_sec: m(|f| f.bytes_per_sec), p50_us: m(|f| f.p50_us), p99_us: m(|f| f.p99_us), cpu_secs: m(|f| f.cpu_secs) }
        })
    };
    let first = &rounds[0];
    let mut r = Report {
        oclass: first.oclass.clone(),
        op: first.op.clone(),
        size_bytes: first.size_bytes,
        threads: first.threads,
        ops_per_sec: m(|r| r.ops_per_sec),
        mib_per_sec: m(|r| r.mib_per_sec),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        cpu_secs: m(|r| r.cpu_secs),
        engine_cpu_secs: median_of(&rounds, |r| r.engine_cpu_secs),
        fio: fio_median(|r| r.fio.as_ref()),
        throughput_ratio: median_of(&rounds, |r| r.throughput_ratio),
        fio_fresh_space: fio_median(|r| r.fio_fresh_space.as_ref()),
        fresh_space_ratio: median_of(&rounds, |r| r.fresh_space_ratio),
        p99_ratio: median_of(&rounds, |r| r.p99_ratio),
        target: None,
        kept_container: None,
        elapsed_secs: m(|r| r.elapsed_secs),
        per_round: Vec::new(),
    };
    r.target = judge(class, r.size_bytes, &r.op, r.throughput_ratio, r.p99_ratio);
    r.per_round = rounds;
    r
}

/// The target for this pattern, where it names one, judged on these ratios.
fn judge(class: ObjectClass, size: u64, op: &str, throughput_ratio: Option<f64>, p99_ratio: Option<f64>) -> Option<String> {
    let (t, p) = (throughput_ratio?, p99_ratio?);
    let goal = match (class.redundancy(), size, op) {
        (strata_types::Redundancy::None, s, "write") if s >= 1 << 20 => Some(("S1 1 MiB writes >= 0.60x fio", t >= 0.6)),
        (strata_types::Redundancy::Replicas(3), s, "write") if s >= 1 << 20 => Some(("RP_3 1 MiB writes >= 0.25x fio (three copies share one disk)", t >= 0.25)),
        (strata_types::Redundancy::Replicas(3), 4096, "write") => Some(("RP_3 4 KiB update p99 <= 5x fio fsync'd 4 KiB p99", p <= 5.0)),
        _ => None,
    };
    goal.map(|(t, met)| format!("{t}: {}", if met { "met" } else { "NOT met" }))
}

/// fio writing `threads` fallocated files once each (not time-based: a file that wrapped around
/// would turn into overwrites), sized for `duration` at a fast disk's rate but at most an eighth
/// of the free space; direct I/O and an fdatasync per write.
fn fresh_space_args(dir: &std::path::Path, size: u64, threads: usize, duration: f64) -> Vec<String> {
    let free = strata_vos::fs_space(dir).map_or(0, |(_, free)| free);
    let want = (duration.max(1.0) * (1u64 << 30) as f64) as u64 / threads as u64;
    let per_job = want.min(free / 8 / threads as u64).max(size * 16) / size * size;
    vec![
        "rw=write".into(),
        format!("bs={size}"),
        "ioengine=psync".into(),
        "direct=1".into(),
        "fallocate=native".into(),
        format!("numjobs={threads}"),
        format!("size={per_job}"),
        fio::runtime_arg(duration),
        "fdatasync=1".into(),
    ]
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let class: ObjectClass = a.oclass.parse()?;
    let size = parse_size(&a.size)?;
    anyhow::ensure!(size > 0 && size <= 4 << 20, "--size must be 1 B ..= 4 MiB");
    anyhow::ensure!(a.op == "write" || a.op == "read", "--op is write or read");
    anyhow::ensure!((1..=1024).contains(&a.threads), "--threads must be 1..=1024");
    if a.baseline {
        fio::require()?;
    }
    let rounds = a.rounds.unwrap_or(if a.baseline { 3 } else { 1 });
    anyhow::ensure!((1..=20).contains(&rounds), "--rounds must be 1..=20");
    anyhow::ensure!(!a.keep || rounds == 1, "--keep keeps the container of one round: pass --rounds 1 with it");
    let cluster_path = a.conn.cluster.clone().or_else(|| std::env::var_os("STRATA_CLUSTER").map(Into::into)).unwrap_or_else(ClusterFile::default_path);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut reports = Vec::with_capacity(rounds);
    for i in 0..rounds {
        if rounds > 1 && !a.conn.json {
            eprintln!("round {}/{rounds}", i + 1);
        }
        reports.push(one_round(&a, class, size, &cluster_path, &rt)?);
        // The round's container is deleted by the engines' next aggregation pass: let it
        // finish, so it slows neither the next round nor a bench run after this one (a
        // deletion under fio's baseline made one round's ratio 0.46x instead of 0.26x).
        if !a.keep {
            if !a.conn.json {
                eprintln!("waiting for the engines to delete the round's container");
            }
            rt.block_on(wait_for_aggregation_passes(&a))?;
        }
    }
    let r = if rounds == 1 { reports.pop().context("no round ran")? } else { medians(reports, class) };
    emit(a.conn.json, &r, |r| {
        if !r.per_round.is_empty() {
            for (i, x) in r.per_round.iter().enumerate() {
                let ratio = x.throughput_ratio.map(|t| format!("  ratio {t:.2}x, p99 {:.2}x", x.p99_ratio.unwrap_or(0.0))).unwrap_or_default();
                println!("round {}: {:>8.1} MiB/s  p99 {:>7.0} us{ratio}", i + 1, x.mib_per_sec, x.p99_us);
            }
            println!("medians of {} rounds (ratios: the median of the rounds' ratios):", r.per_round.len());
        }
        println!("strata bench obj: {} {} of {} B, {} in flight, {:.1} s", r.oclass, r.op, r.size_bytes, r.threads, r.elapsed_secs);
        let engines = r.engine_cpu_secs.map(|s| format!(", engines {s:.1} s")).unwrap_or_default();
        println!("strata: {:>10.0} ops/s {:>8.1} MiB/s  p50 {:>7.0} us  p99 {:>7.0} us  p999 {:>7.0} us  cpu: client {:.1} s{engines}", r.ops_per_sec, r.mib_per_sec, r.p50_us, r.p99_us, r.p999_us, r.cpu_secs);
        if let Some(f) = &r.fio {
            println!("fio:    {:>10.0} ops/s {:>8.1} MiB/s  p50 {:>7.0} us  p99 {:>7.0} us  cpu {:.1} s  (psync, {}{} jobs)", f.iops, f.bytes_per_sec / (1 << 20) as f64, f.p50_us, f.p99_us, f.cpu_secs, if r.op == "write" { "fdatasync each, " } else { "" }, r.threads);
            println!("ratio:  throughput {:.2}x, p99 latency {:.2}x", r.throughput_ratio.unwrap_or(0.0), r.p99_ratio.unwrap_or(0.0));
        }
        if let (Some(g), Some(x)) = (&r.fio_fresh_space, r.fresh_space_ratio) {
            println!("fio, fresh space: {:>4.0} ops/s {:>8.1} MiB/s  p99 {:>7.0} us  (direct, fallocated file written once, fdatasync each)", g.iops, g.bytes_per_sec / (1 << 20) as f64, g.p99_us);
            println!("ratio:  throughput {x:.2}x of fio into fresh space (every write here is a new version in new space)");
        }
        if let Some(t) = &r.target {
            println!("target: {t}");
        }
        if let Some(c) = &r.kept_container {
            println!("kept container {c} (`strata cont destroy` frees it)");
        }
    })?;
    Ok(())
}

/// Wait until every rank of the pool finished two more aggregation passes (so one that started
/// after this call ran whole: it deleted the container the last round destroyed). Gives up,
/// saying so, after 60 s, or after 25 s in which no rank finished any (aggregation turned
/// off: `--aggregate-interval-ms 0`).
async fn wait_for_aggregation_passes(a: &Args) -> anyhow::Result<()> {
    use strata_rpc::engine_msg::{EngineReq, EngineResp};
    let pool = a.conn.client().await?.pool(&a.pool).await?;
    let passes = || async {
        let answers = pool.call_all_engines(&EngineReq::Stats, Duration::from_secs(10)).await?;
        Ok::<Vec<Option<u64>>, anyhow::Error>(answers.into_iter().map(|r| match r {
            Ok((EngineResp::Stats(s), _)) => Some(s.aggregation.passes),
            _ => None,
        }).collect())
    };
    let start_passes = passes().await?;
    let t0 = Instant::now();
    loop {
        let now = passes().await?;
        // A rank that does not answer is not waited for.
        let done = now.iter().zip(&start_passes).all(|(n, s)| match (n, s) {
            (Some(n), Some(s)) => *n >= s + 2,
            _ => true,
        });
        if done {
            return Ok(());
        }
        let moved = now.iter().zip(&start_passes).any(|(n, s)| n != s);
        if t0.elapsed() > Duration::from_secs(60) || (!moved && t0.elapsed() > Duration::from_secs(25)) {
            eprintln!("warning: the engines' aggregation passes (which delete the last round's container) did not finish in time; the next round may share the disk with that deletion");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One round: a container of its own, this bench, fio (with `--baseline`), the container
/// destroyed (unless `--keep`).
fn one_round(a: &Args, class: ObjectClass, size: u64, cluster_path: &std::path::Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<Report> {
    // A container of its own per run: runs never see each other's data, and it can be destroyed.
    let cont_id = ContId::new_random();
    let cont_label = format!("bench-{}-{}", class.to_string().to_lowercase().replace('_', "-"), cont_id.as_bytes()[..4].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let created = AtomicBool::new(false);
    let measured = rt.block_on(async {
        let client = a.conn.client().await?;
        let created_now = client.mgmt.write(MgmtCmd::ContCreate { id: cont_id, pool: a.pool.clone(), label: cont_label.clone(), ctype: ContType::Plain, oclass: class.to_string(), rf: class.redundancy_factor() as u8, props: Default::default() }).await;
        created.store(created_now.is_ok(), Ordering::Relaxed);
        created_now?;
        let cont = client.container(&a.pool, &cont_label).await?;
        let objs = cont.create_objects(class, a.threads as u64).await?;
        // Engines on this machine have their CPU counted too: on shared cores it is what a
        // figure cost, as fio's CPU is what the baseline's cost.
        let engine_pids = crate::proc_stats::local_listener_pids(client.pool(&a.pool).await?.info()?.rank_addrs.values().map(String::as_str));
        let engines_cpu = || (!engine_pids.is_empty()).then(|| engine_pids.iter().map(|&p| crate::proc_stats::proc_cpu_secs(p)).sum::<f64>());
        // `Bytes`, written with `write_bytes_at`: the payload goes to the socket from here, as an
        // application holding its data in `Bytes` (the file system, block volumes) sends it;
        // `write(&[u8])` would copy every op's bytes first, which fio does not do either.
        let data = bytes::Bytes::from(vec![0x5au8; size as usize]);
        let dkeys = 64u64;
        if a.op == "read" {
            for o in &objs {
                for d in 0..dkeys {
                    o.write(&d.to_be_bytes(), b"a", 0, &data).await?;
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let bar = (!a.conn.json).then(|| {
            let b = indicatif::ProgressBar::new((a.duration * 10.0) as u64);
            b.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            b.set_message(format!("{} {} {} x{}", class, a.op, a.size, a.threads));
            b
        });
        let (cpu0, engines_cpu0) = (fio::self_cpu_secs(), engines_cpu());
        let start = Instant::now();
        let tasks: Vec<_> = objs
            .into_iter()
            .map(|o| {
                let (stop, data, op) = (stop.clone(), data.clone(), a.op.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let d = (i % dkeys).to_be_bytes();
                        if op == "write" {
                            o.write_bytes_at(&d, b"a", 0, data.clone(), None).await?;
                        } else {
                            o.read_bytes(&d, b"a", 0, data.len() as u64, Epoch::MAX).await?;
                        }
                        lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        i += 1;
                    }
                    Ok::<_, strata_client::ClientError>(lat)
                })
            })
            .collect();
        let ticks = (a.duration * 10.0) as u64;
        for _ in 0..ticks {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(b) = &bar {
                b.inc(1);
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let engine_cpu = engines_cpu().zip(engines_cpu0).map(|(b, a)| b - a);
        Ok::<_, anyhow::Error>((lat, start.elapsed().as_secs_f64(), fio::self_cpu_secs() - cpu0, engine_cpu))
    });
    // Destroyed after fio's runs, not before: freeing gigabytes while fio measures the disk
    // would slow the baseline.
    let destroy = || -> anyhow::Result<()> {
        if a.keep || !created.load(Ordering::Relaxed) {
            return Ok(());
        }
        rt.block_on(a.conn.write(MgmtCmd::ContDestroy { pool: a.pool.clone(), cont: cont_label.clone() })).map(|_| ()).with_context(|| format!("destroying the bench's container {}/{cont_label} (destroy it with `strata cont destroy`)", a.pool))
    };
    let (lat, elapsed, cpu, engine_cpu) = match measured {
        Ok(m) => m,
        Err(e) => {
            // The measurement's error is the one to report; a failed clean-up only adds to it.
            if let Err(d) = destroy() {
                return Err(e.context(format!("{d:#}")));
            }
            return Err(e);
        }
    };
    let mut lat = lat;
    lat.sort_unstable();
    let ops = lat.len() as f64 / elapsed;
    let mut r = Report {
        oclass: class.to_string(),
        op: a.op.clone(),
        size_bytes: size,
        threads: a.threads,
        ops_per_sec: ops,
        mib_per_sec: ops * size as f64 / (1 << 20) as f64,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        p999_us: pct(&lat, 0.999),
        cpu_secs: cpu,
        engine_cpu_secs: engine_cpu,
        fio: None,
        throughput_ratio: None,
        fio_fresh_space: None,
        fresh_space_ratio: None,
        p99_ratio: None,
        target: None,
        kept_container: a.keep.then(|| format!("{}/{cont_label}", a.pool)),
        elapsed_secs: elapsed,
        per_round: Vec::new(),
    };
    let compared = if a.baseline { compare_with_fio(a, class, size, cluster_path, &mut r) } else { Ok(()) };
    let cleaned = destroy();
    compared?;
    cleaned?;
    Ok(r)
}

/// fio with the same pattern on the engines' file system (and, for writes, into fresh space),
/// the ratios, and the target where it names one.
fn compare_with_fio(a: &Args, class: ObjectClass, size: u64, cluster_path: &std::path::Path, r: &mut Report) -> anyhow::Result<()> {
    let dir = cluster_path.parent().map(|p| p.join("fio-baseline")).unwrap_or_else(|| std::env::temp_dir().join("strata-fio-baseline"));
    std::fs::create_dir_all(&dir)?;
    let rw = if a.op == "write" { "rw=write" } else { "rw=randread" };
    let mut args = vec![rw.to_string(), format!("bs={size}"), "ioengine=psync".into(), format!("numjobs={}", a.threads), "size=64m".into(), "time_based".into(), fio::runtime_arg(a.duration)];
    if a.op == "write" {
        args.push("fdatasync=1".into());
    }
    let f = fio::run(&dir, "obj", &args)?;
    let _ = std::fs::remove_dir_all(&dir);
    if a.op == "write" {
        std::fs::create_dir_all(&dir)?;
        let g = fio::run(&dir, "obj-fresh", &fresh_space_args(&dir, size, a.threads, a.duration))?;
        let _ = std::fs::remove_dir_all(&dir);
        r.fresh_space_ratio = Some(r.ops_per_sec / g.iops.max(f64::MIN_POSITIVE));
        r.fio_fresh_space = Some(g);
    }
    r.throughput_ratio = Some(r.ops_per_sec / f.iops.max(f64::MIN_POSITIVE));
    r.p99_ratio = Some(r.p99_us / f.p99_us.max(1.0));
    r.target = judge(class, size, &a.op, r.throughput_ratio, r.p99_ratio);
    r.fio = Some(f);
    Ok(())
}
