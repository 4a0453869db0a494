//! `strata bench rebuild`: on a cluster it starts itself (`strata up` in a directory of its
//! own), write data, then measure two rebuilds, each after excluding one rank:
//! - the rebuild alone, with no client I/O: bytes the engines pushed (their `moved_bytes`
//!   counters) per second, from the exclusion until the management service reports the rebuild
//!   done (start-up included: the ranks learning the new map, sizing the pass, reporting it
//!   done), against fio's bandwidth for the same write pattern and durability
//!   (`FIO_REBUILD_PATTERN`) in the same directory, in the same invocation (target >= 50%);
//! - the rebuild under foreground writers (another rank excluded): their rate during the
//!   rebuild against the same writers just before (target >= 50%), and the rebuild's rate then.
//!
//! Two rebuilds, because the two targets ask different questions. How fast redundancy comes
//! back is the rebuild's own rate, with nothing else asking for the disk. With clients writing,
//! the engines pace imports to keep those writes within a band of their latency without
//! imports (`move_pacing`, floor `--rebuild-mib-per-s`), so the rebuild gets what the clients
//! leave, and the question is what it costs them. On two shared cores the rebuild under writes
//! is bounded by CPU and the pacer, not the disk; it is reported beside the others.
//!
//! The default size moves ~2 GiB in the first rebuild, so that start-up and the ramp up to full
//! speed (~0.5 s) are a small share of it; the report also gives the start-up (exclusion to
//! first bytes moved) and the rate after it.

use crate::fio::{self, FioResult};
use crate::output::{emit, human_bytes, parse_size};
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_client::{Client, ClusterFile, ObjHandle, PoolHandle};
use strata_rpc::engine_msg::{EngineReq, EngineResp};
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, TargetAction};
use strata_types::{ContId, ObjectClass, Rank};

#[derive(clap::Args)]
pub struct Args {
    /// Ranks of the cluster the bench starts (two are excluded, one per rebuild).
    #[arg(long, default_value_t = 4)]
    ranks: u32,
    /// Object class of the data.
    #[arg(long, default_value = "RP_2G1")]
    oclass: String,
    /// Data written before the exclusion.
    #[arg(long, default_value = "4G")]
    size: String,
    /// Bytes per object (one array value each).
    #[arg(long, default_value = "1M")]
    object_size: String,
    /// Foreground writers (64 KiB writes, one in flight each) measured before and during the
    /// second rebuild; 0 runs only the rebuild alone.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Seconds of foreground writes measured before the exclusion.
    #[arg(long, default_value_t = 5)]
    before_secs: u64,
    /// Directory for the cluster and fio's file (default: a new one under the system temp
    /// directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rebuild rate limit of every rank (`strata server --rebuild-mib-per-s`; default: the
    /// server's).
    #[arg(long)]
    rebuild_mib_per_s: Option<u64>,
    /// Skip fio (no baseline ratio for the rebuild rate).
    #[arg(long)]
    no_baseline: bool,
    #[arg(long)]
    json: bool,
}

/// fio's job: what a rebuild's import does to the destination's disk. Extents of 64 KiB and
/// more (the objects here are 1 MiB) go to extent files with direct I/O, and each import of
/// up to 16 MiB is made durable (`fdatasync`) before it is acknowledged: 1 MiB direct writes
/// with an `fdatasync` every 16, one stream. (Buffered writes with one fsync at the end, the
/// earlier baseline, measured the page cache and swung 139-1571 MiB/s between runs.)
const FIO_REBUILD_PATTERN: [&str; 6] = ["rw=write", "bs=1m", "size=512m", "ioengine=psync", "direct=1", "fdatasync=16"];

/// Foreground write size: small enough to be latency-bound, like most client traffic.
const FOREGROUND_BYTES: usize = 64 << 10;
/// Longest the bench waits for the cluster to start and for the rebuild to finish.
const CLUSTER_START_MAX: Duration = Duration::from_secs(120);
const REBUILD_MAX: Duration = Duration::from_secs(1800);
/// Longest the bench waits on a rebuild whose ranks report they cannot move anything.
const STALLED_MAX: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct Report {
    class: String,
    ranks: u32,
    data_bytes: u64,
    /// The ranks' rebuild rate limit, if the bench set one.
    rebuild_mib_per_s_limit: Option<u64>,
    fio_write_mib_per_s: Option<f64>,
    /// The first rebuild, with no client I/O: how fast redundancy comes back (target: >= 0.5 of
    /// fio's bandwidth).
    alone: RebuildFigures,
    /// The second rebuild (another rank excluded), with foreground writers running: what the
    /// rebuild costs clients (target: their rate >= 0.5 of the rate just before). Absent with
    /// `--writers 0`.
    under_writes: Option<UnderWrites>,
}

#[derive(Serialize)]
struct RebuildFigures {
    excluded_rank: u32,
    /// Bytes the engines pushed for the rebuild.
    rebuild_bytes: u64,
    rebuild_secs: f64,
    /// From the exclusion until the engines' counters first showed bytes moved.
    startup_secs: f64,
    /// Bytes moved per second after the start-up (to the end of the rebuild).
    rebuild_after_startup_mib_per_s: f64,
    rebuild_mib_per_s: f64,
    /// Rebuild rate / fio bandwidth.
    rebuild_vs_fio: Option<f64>,
    /// CPU the engines used from the exclusion until the rebuild was done (with the
    /// foreground writes, if any), and per MiB the rebuild moved.
    engines_cpu_secs: f64,
    engines_cpu_ms_per_mib: f64,
}

#[derive(Serialize)]
struct UnderWrites {
    #[serde(flatten)]
    rebuild: RebuildFigures,
    writers: usize,
    foreground_before_mib_per_s: f64,
    foreground_during_mib_per_s: f64,
    /// Foreground rate during rebuild / before (target >= 0.5).
    foreground_during_vs_before: f64,
    /// Engine CPU per second of foreground writes alone (the window before the exclusion), and
    /// per MiB moved once the foreground writes' share during the rebuild (that rate scaled by
    /// the writes made then) is taken out: the rebuild's own cost.
    engines_cpu_before_per_s: f64,
    rebuild_cpu_ms_per_mib: f64,
}

struct Cluster {
    child: Child,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGINT: `strata up` stops its ranks and exits.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
    }
}

fn start_cluster(a: &Args) -> anyhow::Result<Cluster> {
    let (dir, temp) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("strata-bench-rebuild-").tempdir()?;
            (t.path().to_owned(), Some(t))
        }
    };
    let log = std::fs::File::create(dir.join("up.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(m) = a.rebuild_mib_per_s {
        cmd.args(["up", "--rebuild-mib-per-s", &m.to_string()]);
    } else {
        cmd.arg("up");
    }
    let child = cmd
        .arg("--dir")
        .arg(&dir)
        .args(["--ranks", &a.ranks.to_string(), "--heartbeat-timeout-ms", "3000"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting strata up")?;
    Ok(Cluster { child, dir, _temp: temp })
}

async fn connect(dir: &Path) -> anyhow::Result<(Client, Arc<PoolHandle>)> {
    let deadline = Instant::now() + CLUSTER_START_MAX;
    loop {
        let attempt = async {
            let cf = ClusterFile::load(&dir.join("cluster.json"))?;
            let client = Client::connect(&cf).await?;
            let pool = client.pool("tank").await?;
            anyhow::ensure!(pool.info()?.rank_addrs.len() > 1, "ranks still joining");
            Ok::<_, anyhow::Error>((client, pool))
        };
        match attempt.await {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() > deadline => bail!("the cluster in {} did not come up in {CLUSTER_START_MAX:?}: {e:#} (see up.log there)", dir.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

async fn moved_bytes(pool: &PoolHandle) -> anyhow::Result<u64> {
    Ok(movement_stats(pool).await?.0)
}

/// Bytes the engines moved so far, and why ranks' passes are stalled (if they are).
async fn movement_stats(pool: &PoolHandle) -> anyhow::Result<(u64, Vec<String>)> {
    let (mut total, mut stalled) = (0, Vec::new());
    let id = pool.info()?.id;
    for r in pool.call_all_engines(&EngineReq::Stats, Duration::from_secs(10)).await? {
        if let Ok((EngineResp::Stats(s), _)) = r {
            total += s.moved_bytes;
            stalled.extend(s.movement.into_iter().filter(|m| m.pool == id).filter_map(|m| m.stalled));
        }
    }
    Ok((total, stalled))
}

/// Foreground writers: 64 KiB writes to fresh dkeys, one in flight per writer, adding the
/// bytes of each acknowledged write to `bytes`.
fn spawn_writers(objs: Vec<ObjHandle>, bytes: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    objs.into_iter()
        .enumerate()
        .map(|(w, o)| {
            let (bytes, stop) = (bytes.clone(), stop.clone());
            tokio::spawn(async move {
                let data = vec![w as u8 ^ 0x3c; FOREGROUND_BYTES];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    o.write(&n.to_be_bytes(), b"f", 0, &data).await?;
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    n += 1;
                }
                Ok(())
            })
        })
        .collect()
}

/// Exclude `victim` and wait until its targets are `DOWNOUT` and no rebuild runs.
async fn rebuild_after_excluding(client: &Client, pool: &PoolHandle, victim: Rank, engines_cpu: &dyn Fn() -> f64, fio_mib: Option<f64>) -> anyhow::Result<RebuildFigures> {
    let cpu0 = engines_cpu();
    let moved0 = moved_bytes(pool).await?;
    let t0 = Instant::now();
    client.mgmt.write(MgmtCmd::PoolTargets { pool: "tank".into(), rank: victim, index: None, action: TargetAction::Exclude }).await?;
    let (mut first_moved, mut stalled_since): (Option<f64>, Option<Instant>) = (None, None);
    loop {
        let (moved, stalled) = movement_stats(pool).await?;
        if first_moved.is_none() && moved > moved0 {
            first_moved = Some(t0.elapsed().as_secs_f64());
        }
        // A rebuild that cannot go on (a full disk) retries for ever; the bench stops.
        match (stalled.is_empty(), stalled_since) {
            (true, _) => stalled_since = None,
            (false, None) => stalled_since = Some(Instant::now()),
            (false, Some(t)) if t.elapsed() > STALLED_MAX => bail!("the rebuild has been stalled for {STALLED_MAX:?}: {}", stalled.join("; ")),
            (false, Some(_)) => {}
        }
        pool.refresh().await?;
        let info = pool.info()?;
        let out = info.map.targets.iter().filter(|t| t.id.rank == victim).all(|t| t.state == strata_placement::TargetState::DownOut);
        if out && info.rebuild.is_none() {
            break;
        }
        anyhow::ensure!(t0.elapsed() < REBUILD_MAX, "rebuild did not finish in {REBUILD_MAX:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let engines_cpu_secs = engines_cpu() - cpu0;
    let rebuild_bytes = moved_bytes(pool).await? - moved0;
    let startup = first_moved.unwrap_or(secs);
    let rate = mib(rebuild_bytes as f64 / secs);
    Ok(RebuildFigures {
        excluded_rank: victim.0,
        rebuild_bytes,
        rebuild_secs: secs,
        startup_secs: startup,
        rebuild_after_startup_mib_per_s: mib(rebuild_bytes as f64 / (secs - startup).max(1e-3)),
        rebuild_mib_per_s: rate,
        rebuild_vs_fio: fio_mib.map(|f| rate / f),
        engines_cpu_secs,
        engines_cpu_ms_per_mib: engines_cpu_secs * 1000.0 / mib(rebuild_bytes as f64).max(1.0),
    })
}

fn mib(bytes: f64) -> f64 {
    bytes / (1 << 20) as f64
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let class: ObjectClass = a.oclass.parse()?;
    let size = parse_size(&a.size)?;
    let object_size = parse_size(&a.object_size)?;
    anyhow::ensure!((4096..=4 << 20).contains(&object_size), "--object-size must be 4 KiB ..= 4 MiB");
    anyhow::ensure!(size >= object_size, "--size must hold at least one object");
    anyhow::ensure!(a.writers <= 256, "--writers must be 0..=256 (0: only the rebuild alone)");
    // One rank excluded for the rebuild alone, another for the one under writes.
    let exclusions = if a.writers > 0 { 2 } else { 1 };
    let ranks_needed = class.group_size() as u32 + exclusions;
    anyhow::ensure!(a.ranks >= ranks_needed, "{class} needs {} ranks plus {exclusions} to exclude; pass --ranks {ranks_needed}", class.group_size());
    if !a.no_baseline {
        fio::require()?;
    }
    let cluster = start_cluster(&a)?;
    // fio first, on the disk the ranks will use, before they load it.
    let fio_result: Option<FioResult> = if a.no_baseline {
        None
    } else {
        let d = cluster.dir.join("fio");
        std::fs::create_dir_all(&d)?;
        let r = fio::run(&d, "seqwrite", &FIO_REBUILD_PATTERN.map(String::from))?;
        let _ = std::fs::remove_dir_all(&d);
        Some(r)
    };
    let fio_mib = fio_result.as_ref().map(|f| mib(f.bytes_per_sec));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(async {
        let (client, pool) = connect(&cluster.dir).await?;
        client.mgmt.write(MgmtCmd::ContCreate { id: ContId::new_random(), pool: "tank".into(), label: "bench".into(), ctype: ContType::Plain, oclass: class.to_string(), rf: class.redundancy_factor() as u8, props: Default::default() }).await?;
        let cont = client.container("tank", "bench").await?;
        let count = size / object_size;
        let objs = cont.create_objects(class, count).await?;
        let data = Arc::new(vec![0xa5u8; object_size as usize]);
        if !a.json {
            eprintln!("writing {} in {count} objects of {class}", human_bytes(count * object_size));
        }
        for chunk in objs.chunks(8) {
            let tasks: Vec<_> = chunk.iter().cloned().map(|o| {
                let data = data.clone();
                tokio::spawn(async move { o.write(b"0", b"a", 0, &data).await })
            }).collect();
            for t in tasks {
                t.await??;
            }
        }
        let engine_pids = crate::proc_stats::local_listener_pids(pool.info()?.rank_addrs.values().map(String::as_str));
        let engines_cpu = || engine_pids.iter().map(|&p| crate::proc_stats::proc_cpu_secs(p)).sum::<f64>();
        let ranks: Vec<Rank> = pool.info()?.rank_addrs.keys().rev().take(exclusions as usize).copied().collect();
        anyhow::ensure!(ranks.len() == exclusions as usize, "only {} ranks joined", ranks.len());

        if !a.json {
            eprintln!("excluding rank {}; rebuilding with no client I/O", ranks[0]);
        }
        let alone = rebuild_after_excluding(&client, &pool, ranks[0], &engines_cpu, fio_mib).await?;

        let under_writes = if a.writers > 0 {
            let fg_objs = cont.create_objects(class, a.writers as u64).await?;
            let (bytes, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
            let writers = spawn_writers(fg_objs, bytes.clone(), stop.clone());
            let (t, cpu_before0) = (Instant::now(), engines_cpu());
            tokio::time::sleep(Duration::from_secs(a.before_secs)).await;
            let before_secs = t.elapsed().as_secs_f64();
            let before = bytes.swap(0, Ordering::Relaxed) as f64 / before_secs;
            let engines_cpu_before_per_s = (engines_cpu() - cpu_before0) / before_secs;
            if !a.json {
                eprintln!("excluding rank {}; rebuilding under {} foreground writers", ranks[1], a.writers);
            }
            let rebuild = rebuild_after_excluding(&client, &pool, ranks[1], &engines_cpu, fio_mib).await?;
            let during = bytes.load(Ordering::Relaxed) as f64 / rebuild.rebuild_secs;
            stop.store(true, Ordering::Relaxed);
            for w in writers {
                w.await??;
            }
            let fg_share = during / before.max(1.0);
            Some(UnderWrites {
                writers: a.writers,
                foreground_before_mib_per_s: mib(before),
                foreground_during_mib_per_s: mib(during),
                foreground_during_vs_before: fg_share,
                engines_cpu_before_per_s,
                rebuild_cpu_ms_per_mib: (rebuild.engines_cpu_secs - engines_cpu_before_per_s * rebuild.rebuild_secs * fg_share).max(0.0) * 1000.0 / mib(rebuild.rebuild_bytes as f64).max(1.0),
                rebuild,
            })
        } else {
            None
        };
        Ok::<_, anyhow::Error>(Report {
            class: class.to_string(),
            ranks: a.ranks,
            data_bytes: count * object_size,
            rebuild_mib_per_s_limit: a.rebuild_mib_per_s,
            fio_write_mib_per_s: fio_mib,
            alone,
            under_writes,
        })
    })?;
    drop(cluster);
    emit(a.json, &report, |r| {
        println!("rebuild of {} ({} of data, {} ranks): one rank excluded with no client I/O, then another under foreground writes", r.class, human_bytes(r.data_bytes), r.ranks);
        println!("{:<44} {:>9} {:>9} {:>7} {:>7}", "measure", "Strata", "baseline", "ratio", "target");
        let fio = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}x"));
        println!("{:<44} {:>9.1} {:>9} {:>7} {:>7}", "rebuild alone: MiB/s vs fio direct+sync", r.alone.rebuild_mib_per_s, fio(r.fio_write_mib_per_s), ratio(r.alone.rebuild_vs_fio), ">= 0.50");
        if let Some(u) = &r.under_writes {
            println!("{:<44} {:>9.1} {:>9.1} {:>6.2}x {:>7}", format!("under {} writers: foreground during vs before", u.writers), u.foreground_during_mib_per_s, u.foreground_before_mib_per_s, u.foreground_during_vs_before, ">= 0.50");
            println!("{:<44} {:>9.1} {:>9} {:>7} {:>7}", format!("under {} writers: rebuild MiB/s vs fio", u.writers), u.rebuild.rebuild_mib_per_s, fio(r.fio_write_mib_per_s), ratio(u.rebuild.rebuild_vs_fio), "-");
        }
        println!("rebuild rate = bytes moved / time from the exclusion to done");
        let phases = [Some(("alone", &r.alone)), r.under_writes.as_ref().map(|u| ("under writes", &u.rebuild))];
        for (name, f) in phases.into_iter().flatten() {
            println!("{name}: rank {} excluded; moved {} in {:.1} s ({:.2} s start-up, then {:.1} MiB/s); engines used {:.1} CPU s ({:.1} ms per MiB moved)", f.excluded_rank, human_bytes(f.rebuild_bytes), f.rebuild_secs, f.startup_secs, f.rebuild_after_startup_mib_per_s, f.engines_cpu_secs, f.engines_cpu_ms_per_mib);
        }
        if let Some(u) = &r.under_writes {
            println!("foreground writes alone cost the engines {:.2} CPU s per s; without their share, the rebuild under writes cost {:.1} ms of CPU per MiB moved", u.engines_cpu_before_per_s, u.rebuild_cpu_ms_per_mib);
        }
    })
}
