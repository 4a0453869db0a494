//! `strata bench block`: fio's `nbd` engine against our NBD server (volumes of each class
//! asked for) and against `nbdkit file` on a file on the same disk, one after the other in the
//! same invocation, for several rounds: 4 KiB random read/write IOPS at iodepth 16 and 1 MiB
//! sequential read/write bandwidth, with the median ratio to nbdkit per pattern.

use crate::cluster_cmd::Conn;
use crate::fio::{self, FioResult};
use crate::output::{emit, parse_size};
use anyhow::{bail, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_block::{BlockContainer, NbdLimits, VolumeExports};
use strata_client::ClusterFile;
use strata_rpc::mgmt_msg::{ContType, MgmtCmd};
use strata_types::{ContId, ObjectClass, Redundancy};

#[derive(clap::Args)]
pub struct Args {
    /// Object classes of the volumes to measure, comma-separated.
    #[arg(long, default_value = "S1,RP_3GX")]
    oclass: String,
    /// Size of each volume and of nbdkit's file (written in full before measuring).
    #[arg(long, default_value = "512M")]
    size: String,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Rounds; figures and ratios are medians over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Read cache of our server per volume (`strata block nbd --cache-clean-max`). `nbdkit
    /// file` reads through the kernel's page cache, which holds all of its file here.
    #[arg(long, default_value = "1G")]
    cache_clean_max: String,
    /// Write-back cache of our server per volume (`strata block nbd --cache-dirty-max`;
    /// default: the server's). `nbdkit file` writes into the kernel's page cache, whose dirty
    /// limit here is 20% of memory.
    #[arg(long)]
    cache_dirty_max: Option<String>,
    /// Patterns to run, comma-separated (default all): 4k-randread-qd16, 4k-randwrite-qd16,
    /// 1m-seqread-qd16, 1m-seqwrite-qd16. Sequential writes need the most free disk: every
    /// version stays until aggregation passes it.
    #[arg(long)]
    patterns: Option<String>,
    #[arg(long, default_value = "tank")]
    pool: String,
    #[command(flatten)]
    conn: Conn,
}

struct Pattern {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    /// IOPS for small blocks, bandwidth for large.
    iops: bool,
}

const PATTERNS: [Pattern; 4] = [
    Pattern { name: "4k-randread-qd16", rw: "randread", bs: "4k", iops: true },
    Pattern { name: "4k-randwrite-qd16", rw: "randwrite", bs: "4k", iops: true },
    Pattern { name: "1m-seqread-qd16", rw: "read", bs: "1m", iops: false },
    Pattern { name: "1m-seqwrite-qd16", rw: "write", bs: "1m", iops: false },
];

#[derive(Serialize, Clone)]
struct Figure {
    /// IOPS for 4 KiB patterns, MB/s (10^6 bytes) for 1 MiB ones.
    value: f64,
    unit: &'static str,
    /// CPU seconds of the server process during the job.
    server_cpu_secs: f64,
}

#[derive(Serialize)]
struct ClassRow {
    oclass: String,
    figure: Figure,
    ratio_median: f64,
    target: Option<String>,
}

#[derive(Serialize)]
struct Row {
    pattern: String,
    nbdkit: Figure,
    strata: Vec<ClassRow>,
}

#[derive(Serialize)]
struct CacheUse {
    volume: String,
    /// Chunks answered from the read cache and chunks read from the volume, over the run.
    hits: u64,
    misses: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct PayloadBuffers {
    reused: u64,
    allocated: u64,
    released_past_bound: u64,
}

#[derive(Serialize)]
struct Report {
    size_bytes: u64,
    cache_clean_bytes_max: u64,
    cache_dirty_bytes_max: u64,
    read_cache: Vec<CacheUse>,
    /// Receive buffers of the NBD server over the run: reused from the pool, newly allocated,
    /// and dropped because the pool was at its bound (many drops = the bound is too small).
    payload_buffers: PayloadBuffers,
    duration_secs: u64,
    rounds: usize,
    rows: Vec<Row>,
}

fn value(p: &Pattern, r: &FioResult) -> f64 {
    if p.iops {
        r.iops
    } else {
        r.bytes_per_sec / 1e6
    }
}

struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    fn start(dir: &Path, file: &Path) -> anyhow::Result<Nbdkit> {
        let socket = dir.join("nbdkit.sock");
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "--unix"])
            .arg(&socket)
            .arg("file")
            .arg(format!("file={}", file.display()))
            .stdout(Stdio::null())
            .spawn()
            .context("starting nbdkit (apt-get install -y nbdkit)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("nbdkit did not create {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nbdkit { child, socket })
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn goal(class: ObjectClass, ratio: f64) -> Option<String> {
    let (bar, what) = match class.redundancy() {
        Redundancy::None => (0.70, "S1 >= 70% of nbdkit file"),
        Redundancy::Replicas(3) => (0.35, "RP_3 >= 35% of nbdkit file"),
        _ => return None,
    };
    Some(format!("{what}: {}", if ratio >= bar { "met" } else { "NOT met" }))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    fio::require()?;
    anyhow::ensure!(Command::new("fio").arg("--enghelp").output().map(|o| String::from_utf8_lossy(&o.stdout).contains("nbd")).unwrap_or(false), "this fio has no nbd engine; install Debian's fio (apt-get install -y fio)");
    anyhow::ensure!((1..=20).contains(&a.rounds) && (1..=600).contains(&a.duration), "--rounds 1..=20, --duration 1..=600");
    let size = parse_size(&a.size)?;
    let patterns: Vec<&Pattern> = match &a.patterns {
        None => PATTERNS.iter().collect(),
        Some(list) => list
            .split(',')
            .map(|n| PATTERNS.iter().find(|p| p.name == n.trim()).ok_or_else(|| anyhow::anyhow!("unknown pattern '{n}'; known: {}", PATTERNS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))))
            .collect::<Result<_, _>>()?,
    };
    let clean_max = parse_size(&a.cache_clean_max)?;
    let dirty_max = match &a.cache_dirty_max {
        Some(s) => parse_size(s)?,
        None => strata_block::write_cache::cache_dirty_bytes_max_default(),
    };
    anyhow::ensure!(size >= 64 << 20 && size % (1 << 20) == 0, "--size must be a whole number of MiB, at least 64M");
    let classes: Vec<ObjectClass> = a.oclass.split(',').map(|c| c.trim().parse()).collect::<Result<_, _>>()?;
    let cluster_path = a.conn.cluster.clone().or_else(|| std::env::var_os("STRATA_CLUSTER").map(Into::into)).unwrap_or_else(ClusterFile::default_path);
    // The engines' directories sit beside the cluster file: nbdkit's file goes on the same disk.
    let dir = cluster_path.parent().map(|p| p.join("bench-block")).unwrap_or_else(|| std::env::temp_dir().join("strata-bench-block"));
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let names: Vec<String> = classes.iter().map(|c| format!("bench-{}", c.to_string().to_lowercase().replace('_', "-"))).collect();
    let socket = dir.join("strata.sock");
    let exports = rt.block_on(async {
        let client = a.conn.client().await?;
        let _ = client.mgmt.write(MgmtCmd::ContCreate { id: ContId::new_random(), pool: a.pool.clone(), label: "bench-block".into(), ctype: ContType::Block, oclass: "S1".into(), rf: 0, props: Default::default() }).await;
        let bc = BlockContainer::open(&client, &a.pool, "bench-block").await?;
        for (name, class) in names.iter().zip(&classes) {
            match bc.get(name).await {
                Ok(m) if m.size_bytes == size => {}
                Ok(_) => {
                    bc.delete(name).await?;
                    bc.create(name, size, strata_block::BLOCK_BYTES_DEFAULT, Some(*class)).await?;
                }
                Err(_) => {
                    bc.create(name, size, strata_block::BLOCK_BYTES_DEFAULT, Some(*class)).await?;
                }
            }
        }
        let exports = Arc::new(VolumeExports::new(bc, names.clone(), false, strata_block::writer_lease::WRITER_LEASE_TTL_MS_DEFAULT, strata_block::CacheConfig { clean_bytes_max: clean_max, dirty_bytes_max: dirty_max, ..Default::default() }).await?);
        let _ = std::fs::remove_file(&socket);
        let l = tokio::net::UnixListener::bind(&socket)?;
        tokio::spawn(strata_block::nbd_server::serve_unix(l, exports.clone(), NbdLimits::default()));
        Ok::<_, anyhow::Error>(exports)
    })?;
    let file = dir.join("nbdkit.img");
    std::fs::File::create(&file)?.set_len(size)?;
    let kit = Nbdkit::start(&dir, &file)?;
    let kit_uri = format!("nbd+unix:///?socket={}", kit.socket.display());
    let our_uri = |n: &str| format!("nbd+unix:///{n}?socket={}", socket.display());
    let base = |rw: &str, bs: &str, uri: &str| vec![format!("rw={rw}"), format!("bs={bs}"), "ioengine=nbd".to_string(), format!("uri={uri}"), format!("size={size}"), "iodepth=16".to_string()];
    let bar = (!a.conn.json).then(|| {
        let b = indicatif::ProgressBar::new((1 + classes.len() as u64) * (1 + (a.rounds * patterns.len()) as u64));
        b.set_style(indicatif::ProgressStyle::with_template("bench block [{bar:30}] {pos}/{len} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        b
    });
    let tick = |msg: String| {
        if let Some(b) = &bar {
            b.set_message(msg);
            b.inc(1);
        }
    };
    // Fill every target once so reads hit written data on both sides.
    tick("filling nbdkit".into());
    fio::run(&dir, "fill-nbdkit", &base("write", "1m", &kit_uri))?;
    for n in &names {
        tick(format!("filling {n}"));
        fio::run(&dir, &format!("fill-{n}"), &base("write", "1m", &our_uri(n)))?;
    }
    // Between jobs (untimed), both servers make their writes durable, so one job's write-back
    // does not run into the next: nbdkit's file is fsynced, our caches are written back.
    let settle = || -> anyhow::Result<()> {
        std::fs::File::open(&file)?.sync_all()?;
        rt.block_on(exports.flush_all())?;
        Ok(())
    };
    settle()?;
    // samples[pattern][0 = nbdkit, 1.. = classes][round]
    let mut samples: Vec<Vec<Vec<Figure>>> = vec![vec![Vec::new(); 1 + classes.len()]; patterns.len()];
    let our_pid = std::process::id();
    for _round in 0..a.rounds {
        for (pi, p) in patterns.iter().enumerate() {
            let mut args = base(p.rw, p.bs, &kit_uri);
            args.extend(["time_based".to_string(), format!("runtime={}", a.duration)]);
            tick(format!("{} nbdkit", p.name));
            let c0 = crate::proc_stats::proc_cpu_secs(kit.child.id());
            let r = fio::run(&dir, &format!("{}-nbdkit", p.name), &args)?;
            samples[pi][0].push(Figure { value: value(p, &r), unit: if p.iops { "IOPS" } else { "MB/s" }, server_cpu_secs: crate::proc_stats::proc_cpu_secs(kit.child.id()) - c0 });
            settle()?;
            for (ci, n) in names.iter().enumerate() {
                let mut args = base(p.rw, p.bs, &our_uri(n));
                args.extend(["time_based".to_string(), format!("runtime={}", a.duration)]);
                tick(format!("{} {n}", p.name));
                let c0 = crate::proc_stats::proc_cpu_secs(our_pid);
                let r = fio::run(&dir, &format!("{}-{n}", p.name), &args)?;
                // Our server runs in this process (the engines are separate processes).
                samples[pi][ci + 1].push(Figure { value: value(p, &r), unit: if p.iops { "IOPS" } else { "MB/s" }, server_cpu_secs: crate::proc_stats::proc_cpu_secs(our_pid) - c0 });
                settle()?;
            }
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(kit);
    let _ = std::fs::remove_file(&file);
    // Taken while the volumes are still open (their caches go with them).
    let read_cache: Vec<CacheUse> = rt.block_on(exports.read_cache_stats()).into_iter().map(|(volume, hits, misses, bytes)| CacheUse { volume, hits, misses, bytes }).collect();
    rt.block_on(exports.release_all());
    let (reused, allocated, released_past_bound) = strata_block::payload_pool::shared().counts();
    let payload_buffers = PayloadBuffers { reused, allocated, released_past_bound };
    let med = |v: &[Figure]| -> Figure {
        let m = fio::median(v.iter().map(|f| f.value).collect());
        Figure { value: m, unit: v[0].unit, server_cpu_secs: fio::median(v.iter().map(|f| f.server_cpu_secs).collect()) }
    };
    let rows: Vec<Row> = patterns
        .iter()
        .enumerate()
        .map(|(pi, p)| {
            let kit = &samples[pi][0];
            Row {
                pattern: p.name.to_string(),
                nbdkit: med(kit),
                strata: classes
                    .iter()
                    .enumerate()
                    .map(|(ci, c)| {
                        let ours = &samples[pi][ci + 1];
                        let ratio = fio::median(ours.iter().zip(kit).map(|(o, k)| o.value / k.value.max(f64::MIN_POSITIVE)).collect());
                        ClassRow { oclass: c.to_string(), figure: med(ours), ratio_median: ratio, target: goal(*c, ratio) }
                    })
                    .collect(),
            }
        })
        .collect();
    let report = Report { size_bytes: size, cache_clean_bytes_max: clean_max, cache_dirty_bytes_max: dirty_max, read_cache, payload_buffers, duration_secs: a.duration, rounds: a.rounds, rows };
    emit(a.conn.json, &report, |r| {
        println!("strata bench block: fio nbd engine, iodepth 16, {} volumes, {} s x {} rounds (medians; ratio = median of per-round ratios)", strata_types::human_bytes(r.size_bytes), r.duration_secs, r.rounds);
        println!("read caches: nbdkit file = the kernel page cache (all of its file); strata = {} of clean chunks per volume", strata_types::human_bytes(r.cache_clean_bytes_max));
        println!("write caches: nbdkit file = the kernel page cache (durable at FLUSH); strata = {} write-back per volume (durable at FLUSH/FUA); both written back between jobs", strata_types::human_bytes(r.cache_dirty_bytes_max));
        for row in &r.rows {
            println!("{:<18} nbdkit file {:>9.0} {:<4} (server cpu {:.1} s)", row.pattern, row.nbdkit.value, row.nbdkit.unit, row.nbdkit.server_cpu_secs);
            for s in &row.strata {
                println!("{:<18} {:<11} {:>9.0} {:<4} (server cpu {:.1} s)  ratio {:.2}x  {}", "", s.oclass, s.figure.value, s.figure.unit, s.figure.server_cpu_secs, s.ratio_median, s.target.as_deref().unwrap_or(""));
            }
        }
        for c in &r.read_cache {
            let total = (c.hits + c.misses).max(1);
            println!("read cache of {}: {} chunk hits, {} misses ({:.0}% hits over the whole run, fills included), {} held", c.volume, c.hits, c.misses, 100.0 * c.hits as f64 / total as f64, strata_types::human_bytes(c.bytes));
        }
        let b = &r.payload_buffers;
        println!("receive buffers: {} reused, {} allocated, {} released past the pool's bound", b.reused, b.allocated, b.released_past_bound);
    })
}
