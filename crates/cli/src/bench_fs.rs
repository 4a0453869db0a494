//! `strata bench fs`: the file system through a real FUSE mount, against `bindfs` in the same
//! invocation: mdtest-style create/stat/unlink of many files (bindfs over tmpfs, the stable
//! FUSE yardstick) and fio sequential and random I/O (bindfs over a local directory). Both
//! sides are mounted with entry and attribute timeouts of 0, run one after the other, several
//! times; the report gives medians, the ratio strata/bindfs and the CPU each side used.

use crate::cluster_cmd::{pool_cont, Conn};
use crate::fio::{self, median};
use crate::output::{emit, parse_size};
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use strata_fs::fuse_mount::{serve, MountOptions, StrataFs};
use strata_fs::volume::Volume;
use strata_rpc::mgmt_msg::{ContType, MgmtCmd, MgmtQuery, MgmtReply};

#[derive(clap::Args)]
pub struct Args {
    /// Volume to measure (created as a posix container if absent).
    #[arg(long, default_value = "tank/bench-fs")]
    volume: String,
    /// Object class of a volume created here.
    #[arg(long, default_value = "RP_2G1")]
    oclass: String,
    /// Files created, stat'ed and unlinked per run (mdtest style).
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Processes (threads) doing the metadata operations, each in its own directory.
    #[arg(long, default_value_t = 1)]
    meta_threads: usize,
    /// Size of the file fio writes and reads.
    #[arg(long, default_value = "256M")]
    size: String,
    /// Seconds of each random-I/O job.
    #[arg(long, default_value_t = 5)]
    random_secs: u64,
    /// Runs of each side; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Skip bindfs.
    #[arg(long)]
    no_baseline: bool,
    /// FUSE threads of the strata mount (as `strata fs mount --threads`; bindfs runs libfuse's
    /// multi-threaded loop).
    #[arg(long, default_value_t = 4)]
    mount_threads: usize,
    /// Kernel read-ahead of the strata mount, KiB (0: the kernel's default).
    #[arg(long, default_value_t = MountOptions::default().read_ahead_kb)]
    read_ahead_kb: u32,
    /// The strata mount's own read-ahead window per sequential reader, MiB.
    #[arg(long, default_value_t = MountOptions::default().read_ahead_window >> 20)]
    read_ahead_window_mib: u64,
    /// File data the strata mount keeps in memory (read, read ahead and written), MiB.
    #[arg(long, default_value_t = MountOptions::default().read_cache_bytes >> 20)]
    cache_mib: u64,
    /// Mount without directory leases (every metadata change committed before it returns).
    #[arg(long)]
    no_leases: bool,
    /// Only metadata, or only data.
    #[arg(long, value_parser = ["all", "meta", "data"], default_value = "all")]
    only: String,
    /// Backing directory of the metadata baseline (tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    meta_baseline_dir: PathBuf,
    /// Backing directory of the data baseline (a local disk).
    #[arg(long, default_value = "/var/tmp")]
    data_baseline_dir: PathBuf,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Serialize, Default, Clone)]
struct Figure {
    strata: f64,
    bindfs: Option<f64>,
    ratio: Option<f64>,
    /// The bar for the ratio (metadata 50%, sequential data 60%; none for random I/O).
    target: Option<f64>,
    met: Option<bool>,
    unit: &'static str,
    strata_cpu_secs: f64,
    bindfs_cpu_secs: Option<f64>,
}

/// Ratio strata/bindfs that a job should reach.
fn target_of(job: &str) -> Option<f64> {
    match job {
        "create" | "stat" | "unlink" => Some(0.5),
        "seq-write-1m" | "seq-read-1m" => Some(0.6),
        _ => None,
    }
}

fn is_mounted(mp: &Path) -> bool {
    let needle = format!(" {} ", mp.display());
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.contains(&needle))
}

fn unmount(mp: &Path) {
    let _ = Command::new("umount").arg(mp).status();
    let start = Instant::now();
    while is_mounted(mp) && start.elapsed() < Duration::from_secs(10) {
        let _ = Command::new("umount").arg("-l").arg(mp).status();
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Bindfs {
    mp: PathBuf,
    src: PathBuf,
    pid: u32,
}

impl Bindfs {
    fn start(backing: &Path, tag: &str) -> anyhow::Result<Bindfs> {
        let src = backing.join(format!("strata-bench-{tag}-{}", std::process::id()));
        let mp = std::env::temp_dir().join(format!("strata-bench-bindfs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&src).with_context(|| format!("{}", src.display()))?;
        std::fs::create_dir_all(&mp)?;
        // Foreground so we own the process and can read its CPU time.
        // The FUSE settings of the strata mount: timeouts 0, 1 MiB requests; both serve
        // requests on several threads. The kernel read-ahead stays at its default (128 KiB)
        // for bindfs: the strata mount's 4 MiB window halves bindfs's sequential reads here.
        let max = strata_fs::fuse_mount::MAX_WRITE_BYTES;
        let o = format!("big_writes,entry_timeout=0,attr_timeout=0,negative_timeout=0,max_write={max},max_readahead={max}");
        let child = Command::new("bindfs").args(["-f", "-o", &o]).arg(&src).arg(&mp).spawn().context("starting bindfs (apt-get install -y bindfs, or pass --no-baseline)")?;
        let start = Instant::now();
        while !is_mounted(&mp) {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("bindfs did not mount {} within 10 s", mp.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Bindfs { mp, src, pid: child.id() })
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        unmount(&self.mp);
        let _ = std::fs::remove_dir(&self.mp);
        let _ = std::fs::remove_dir_all(&self.src);
    }
}

/// (creates/s, stats/s, unlinks/s) for `files` files in `dir`, over `threads` threads.
fn meta_run(dir: &Path, files: usize, threads: usize) -> anyhow::Result<[f64; 3]> {
    std::fs::create_dir_all(dir)?;
    let per = files.div_ceil(threads);
    let dirs: Vec<PathBuf> = (0..threads).map(|t| dir.join(format!("t{t}"))).collect();
    for d in &dirs {
        std::fs::create_dir(d)?;
    }
    let mut rates = [0.0; 3];
    for (phase, rate) in rates.iter_mut().enumerate() {
        let start = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let hs: Vec<_> = dirs
                .iter()
                .map(|d| {
                    s.spawn(move || -> std::io::Result<()> {
                        for i in 0..per {
                            let p = d.join(format!("f{i}"));
                            match phase {
                                0 => drop(std::fs::File::create(&p)?),
                                1 => {
                                    std::fs::metadata(&p)?;
                                }
                                _ => std::fs::remove_file(&p)?,
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().map_err(|_| anyhow::anyhow!("benchmark thread panicked"))??;
            }
            Ok(())
        })?;
        *rate = (per * threads) as f64 / start.elapsed().as_secs_f64();
    }
    for d in &dirs {
        std::fs::remove_dir(d)?;
    }
    std::fs::remove_dir(dir)?;
    Ok(rates)
}

const DATA_JOBS: [(&str, &str); 4] = [("seq-write-1m", "MB/s"), ("seq-read-1m", "MB/s"), ("rand-write-4k", "IOPS"), ("rand-read-4k", "IOPS")];

fn data_run(dir: &Path, size: u64, random_secs: u64) -> anyhow::Result<[f64; 4]> {
    std::fs::create_dir_all(dir)?;
    let common = |rw: &str, bs: &str| vec![format!("rw={rw}"), format!("bs={bs}"), format!("size={size}"), "ioengine=psync".into(), "filename=bench.dat".into()];
    let mut out = [0.0; 4];
    let mut a = common("write", "1M");
    a.push("end_fsync=1".into());
    out[0] = fio::run(dir, "seqwrite", &a)?.bytes_per_sec / 1e6;
    let mut a = common("read", "1M");
    a.push("invalidate=1".into());
    out[1] = fio::run(dir, "seqread", &a)?.bytes_per_sec / 1e6;
    let mut a = common("randwrite", "4k");
    a.extend(["time_based=1".into(), format!("runtime={random_secs}"), "fsync_on_close=1".into()]);
    out[2] = fio::run(dir, "randwrite", &a)?.iops;
    let mut a = common("randread", "4k");
    a.extend(["time_based=1".into(), format!("runtime={random_secs}"), "invalidate=1".into()]);
    out[3] = fio::run(dir, "randread", &a)?.iops;
    std::fs::remove_file(dir.join("bench.dat"))?;
    for f in std::fs::read_dir(dir)? {
        let f = f?;
        if f.file_name().to_string_lossy().starts_with("fio-") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.files > 0 && a.files <= 10_000_000, "--files must be 1..=10,000,000");
    anyhow::ensure!((1..=64).contains(&a.meta_threads), "--meta-threads must be 1..=64");
    anyhow::ensure!((1..=20).contains(&a.runs), "--runs must be 1..=20");
    let size = parse_size(&a.size)?;
    anyhow::ensure!((1 << 20..=64 << 30).contains(&size), "--size must be 1M..=64G");
    let (do_meta, do_data) = (a.only != "data", a.only != "meta");
    if do_data {
        fio::require()?;
    }
    if !a.no_baseline && Command::new("bindfs").arg("--version").output().is_err() {
        bail!("bindfs is not installed; the baseline needs it: apt-get install -y bindfs (or pass --no-baseline)");
    }
    let (pool, cont) = pool_cont(&a.volume)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let vol = rt.block_on(async {
        let client = a.conn.client().await?;
        match client.mgmt.query(MgmtQuery::Cont { pool: pool.clone(), cont: cont.clone() }).await {
            Ok(MgmtReply::Cont(info)) => anyhow::ensure!(info.ctype == ContType::Posix, "{} is a {} container, not posix", a.volume, info.ctype.name()),
            _ => {
                let cmd = MgmtCmd::ContCreate { id: strata_types::ContId::new_random(), pool: pool.clone(), label: cont.clone(), ctype: ContType::Posix, oclass: a.oclass.clone(), rf: 0, props: BTreeMap::new() };
                client.mgmt.write(cmd).await.context("creating the benchmark volume")?;
            }
        }
        Volume::open(&client, &pool, &cont).await.map_err(|e| anyhow::anyhow!("volume {}: {e}", a.volume))
    })?;
    let mp = std::env::temp_dir().join(format!("strata-bench-fs-{}", std::process::id()));
    std::fs::create_dir_all(&mp)?;
    let opts = MountOptions { kernel_ttl: Duration::ZERO, fsname: format!("strata:{}", a.volume), dir_leases: !a.no_leases, threads: a.mount_threads.clamp(1, 64), read_ahead_kb: a.read_ahead_kb, read_ahead_window: a.read_ahead_window_mib.clamp(1, 64) << 20, read_cache_bytes: a.cache_mib.min(1 << 20) << 20, ..Default::default() };
    let fs = StrataFs::new(rt.handle().clone(), vol.ns.clone(), vol.data.clone(), opts);
    let (tx, rx) = std::sync::mpsc::channel();
    let mp2 = mp.clone();
    let server = std::thread::spawn(move || serve(fs, &mp2, move |u| drop(tx.send(u))));
    let mut unmounter = rx.recv_timeout(Duration::from_secs(30)).context("the strata mount did not come up")?;

    let mut report: BTreeMap<String, Figure> = BTreeMap::new();
    let mut collect = |name: &str, unit: &'static str, s: Vec<f64>, b: Vec<f64>, s_cpu: f64, b_cpu: Option<f64>| {
        let sm = median(s);
        let bm = (!b.is_empty()).then(|| median(b));
        let ratio = bm.map(|b| if b > 0.0 { sm / b } else { 0.0 });
        let target = target_of(name);
        let met = ratio.zip(target).map(|(r, t)| r >= t);
        report.insert(name.to_string(), Figure { strata: sm, bindfs: bm, ratio, target, met, unit, strata_cpu_secs: s_cpu, bindfs_cpu_secs: b_cpu });
    };
    let result = (|| -> anyhow::Result<()> {
        if do_meta {
            let bind = if a.no_baseline { None } else { Some(Bindfs::start(&a.meta_baseline_dir, "meta")?) };
            let (mut s, mut b) = (vec![vec![]; 3], vec![vec![]; 3]);
            let (mut s_cpu, mut b_cpu) = (0.0, 0.0);
            for r in 0..a.runs {
                let c0 = fio::self_cpu_secs();
                let rs = meta_run(&mp.join(format!("md-{r}")), a.files, a.meta_threads)?;
                s_cpu += fio::self_cpu_secs() - c0;
                for i in 0..3 {
                    s[i].push(rs[i]);
                }
                if let Some(bf) = &bind {
                    let c0 = crate::proc_stats::proc_cpu_secs(bf.pid);
                    let rb = meta_run(&bf.mp.join(format!("md-{r}")), a.files, a.meta_threads)?;
                    b_cpu += crate::proc_stats::proc_cpu_secs(bf.pid) - c0;
                    for i in 0..3 {
                        b[i].push(rb[i]);
                    }
                }
                eprintln!("run {r}: strata create/stat/unlink {:.0}/{:.0}/{:.0} per s{}", rs[0], rs[1], rs[2], b[0].last().map(|_| format!("; bindfs {:.0}/{:.0}/{:.0}", b[0][r], b[1][r], b[2][r])).unwrap_or_default());
            }
            let runs = a.runs as f64;
            for (i, name) in ["create", "stat", "unlink"].iter().enumerate() {
                collect(name, "ops/s", s[i].clone(), b[i].clone(), s_cpu / runs / 3.0, bind.as_ref().map(|_| b_cpu / runs / 3.0));
            }
        }
        if do_data {
            let bind = if a.no_baseline { None } else { Some(Bindfs::start(&a.data_baseline_dir, "data")?) };
            let (mut s, mut b) = (vec![vec![]; 4], vec![vec![]; 4]);
            let (mut s_cpu, mut b_cpu) = (0.0, 0.0);
            for r in 0..a.runs {
                let c0 = fio::self_cpu_secs();
                let rs = data_run(&mp.join(format!("data-{r}")), size, a.random_secs)?;
                s_cpu += fio::self_cpu_secs() - c0;
                for i in 0..4 {
                    s[i].push(rs[i]);
                }
                if let Some(bf) = &bind {
                    let c0 = crate::proc_stats::proc_cpu_secs(bf.pid);
                    let rb = data_run(&bf.mp.join(format!("data-{r}")), size, a.random_secs)?;
                    b_cpu += crate::proc_stats::proc_cpu_secs(bf.pid) - c0;
                    for i in 0..4 {
                        b[i].push(rb[i]);
                    }
                }
                eprintln!("run {r}: strata {:.0} MB/s w, {:.0} MB/s r, {:.0} IOPS rw, {:.0} IOPS rr{}", rs[0], rs[1], rs[2], rs[3], b[0].last().map(|_| format!("; bindfs {:.0}, {:.0}, {:.0}, {:.0}", b[0][r], b[1][r], b[2][r], b[3][r])).unwrap_or_default());
            }
            let runs = a.runs as f64;
            for (i, (name, unit)) in DATA_JOBS.iter().enumerate() {
                collect(name, unit, s[i].clone(), b[i].clone(), s_cpu / runs / 4.0, bind.as_ref().map(|_| b_cpu / runs / 4.0));
            }
        }
        Ok(())
    })();
    let _ = unmounter.unmount();
    let _ = server.join();
    let _ = std::fs::remove_dir(&mp);
    result?;
    emit(a.conn.json, &report, |r| {
        println!("{:<14} {:>12} {:>12} {:>8} {:>12} {:>10} {:>10}", "job", "strata", "bindfs", "ratio", "target", "cpu s", "bindfs cpu");
        for (name, f) in r {
            let b = f.bindfs.map_or("-".into(), |b| format!("{b:.0}"));
            let ratio = f.ratio.map_or("-".into(), |x| format!("{:.0}%", x * 100.0));
            let target = match (f.target, f.met) {
                (Some(t), Some(true)) => format!(">={:.0}% met", t * 100.0),
                (Some(t), Some(false)) => format!(">={:.0}% MISS", t * 100.0),
                (Some(t), None) => format!(">={:.0}%", t * 100.0),
                (None, _) => "-".into(),
            };
            let bc = f.bindfs_cpu_secs.map_or("-".into(), |c| format!("{c:.2}"));
            println!("{name:<14} {:>12.0} {b:>12} {ratio:>8} {target:>12} {:>10.2} {bc:>10}  {}", f.strata, f.strata_cpu_secs, f.unit);
        }
        println!("medians of {} runs; ratio = strata / bindfs (same invocation); cpu = seconds per job, strata's whole process (client + FUSE server), bindfs's process", a.runs);
    })
}
