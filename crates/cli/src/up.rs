//! `strata up`: a whole cluster on this machine. Starts the ranks as child processes (each its
//! own directory and 127.0.0.1 ports, and its own simulated host as fault domain so replicated
//! classes can spread, or `--ranks-per-host` of them to a host), waits until every rank has joined, creates a default pool, writes the
//! cluster file and stays in the foreground until Ctrl-C. Run it again on the same directory
//! and the same cluster comes back with its state.

use crate::cluster_cmd::{block_on, Conn};
use crate::system_cmd::stop_ranks;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_client::ClusterFile;
use strata_rpc::mgmt_client::MgmtClient;
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtQuery, MgmtReply, RankState};

#[derive(clap::Args)]
pub struct Args {
    /// Ranks (server processes) to run.
    #[arg(long, default_value_t = 3)]
    ranks: u32,
    /// How many of them run the management service (1 or 3, or 5).
    #[arg(long, default_value_t = 1)]
    access_points: u32,
    /// Targets per rank.
    #[arg(long, default_value_t = 2)]
    targets: u16,
    /// Ranks that share one simulated host (fault domain `/node-{i / N}`), as servers of one
    /// machine would: placement puts no two shards of a group on one host while there are
    /// enough hosts, and a host's ranks failing together count as one failed domain.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    ranks_per_host: u32,
    /// Where the cluster keeps everything (default ~/.strata).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Heartbeat timeout of the ranks, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    heartbeat_timeout_ms: u64,
    /// Label of the pool created on first start ("" for none).
    #[arg(long, default_value = "tank")]
    pool: String,
    /// Size of that pool.
    #[arg(long, default_value = "4G")]
    pool_size: String,
    /// Passed to every rank (`strata server --aggregate-interval-ms`).
    #[arg(long)]
    aggregate_interval_ms: Option<u64>,
    /// Passed to every rank (`strata server --aggregate-margin-ms`).
    #[arg(long)]
    aggregate_margin_ms: Option<u64>,
    /// Passed to every rank (`strata server --scrub-interval-ms`).
    #[arg(long)]
    scrub_interval_ms: Option<u64>,
    /// Passed to every rank (`strata server --rebuild-mib-per-s`).
    #[arg(long)]
    rebuild_mib_per_s: Option<u64>,
    /// Passed to every rank (`strata server --sync-lanes`).
    #[arg(long)]
    sync_lanes: Option<usize>,
    /// Passed to every rank (`strata server --reserve-mib`).
    #[arg(long)]
    reserve_mib: Option<u64>,
    /// Runtime worker threads of every rank (`strata server --threads`).
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
}

#[derive(Serialize, Deserialize)]
struct UpState {
    format: u8,
    cluster: String,
    ranks: Vec<RankPorts>,
    access_points: u32,
    targets: u16,
    #[serde(default = "one")]
    ranks_per_host: u32,
}

fn one() -> u32 {
    1
}

#[derive(Serialize, Deserialize, Clone)]
struct RankPorts {
    mgmt: String,
    data: String,
    /// `GET /metrics` (Prometheus); absent in clusters made before it existed.
    #[serde(default)]
    metrics: Option<String>,
}

/// A port free now; `held` keeps its listener open until every port of the cluster is picked,
/// so that no two ranks (or a rank's two services) are handed the same port.
pub(crate) fn free_port(held: &mut Vec<std::net::TcpListener>) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    held.push(l);
    Ok(port)
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        // SAFETY: plain kill(2) on our own children's pids.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = a.dir.clone().unwrap_or_else(|| ClusterFile::default_path().parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".strata")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state_path = dir.join("up.json");
    let st: UpState = match std::fs::read_to_string(&state_path) {
        Ok(t) => {
            let st: UpState = serde_json::from_str(&t).with_context(|| format!("{} is corrupt", state_path.display()))?;
            println!("restarting cluster {} from {} ({} ranks)", st.cluster, dir.display(), st.ranks.len());
            st
        }
        Err(_) => {
            anyhow::ensure!(a.ranks >= 1 && a.ranks <= 64, "--ranks must be 1..=64");
            anyhow::ensure!([1, 3, 5].contains(&a.access_points) && a.access_points <= a.ranks, "--access-points must be 1, 3 or 5 and at most --ranks");
            let mut ranks = Vec::new();
            let mut held = Vec::new();
            for _ in 0..a.ranks {
                ranks.push(RankPorts { mgmt: format!("127.0.0.1:{}", free_port(&mut held)?), data: format!("127.0.0.1:{}", free_port(&mut held)?), metrics: Some(format!("127.0.0.1:{}", free_port(&mut held)?)) });
            }
            drop(held);
            let st = UpState { format: 1, cluster: format!("strata-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]), ranks, access_points: a.access_points, targets: a.targets, ranks_per_host: a.ranks_per_host };
            std::fs::write(&state_path, serde_json::to_vec_pretty(&st)?)?;
            println!("new cluster {} in {} ({} ranks, {} access point(s))", st.cluster, dir.display(), st.ranks.len(), st.access_points);
            st
        }
    };
    let aps: Vec<String> = st.ranks[..st.access_points as usize].iter().map(|r| r.mgmt.clone()).collect();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for (i, r) in st.ranks.iter().enumerate() {
        let rdir = dir.join(format!("rank-{i}"));
        std::fs::create_dir_all(&rdir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(rdir.join("server.log"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("server")
            .arg("--dir")
            .arg(&rdir)
            .args(["--data-addr", &r.data, "--access-points", &aps.join(","), "--cluster", &st.cluster])
            .args(["--fault-domain", &format!("/node-{}", i as u32 / st.ranks_per_host.max(1)), "--targets", &st.targets.to_string()])
            .args(["--heartbeat-timeout-ms", &a.heartbeat_timeout_ms.to_string(), "--threads", &a.server_threads.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if (i as u32) < st.access_points {
            cmd.args(["--mgmt-addr", &r.mgmt]);
        }
        if let Some(m) = &r.metrics {
            cmd.args(["--metrics-addr", m]);
        }
        if let Some(ms) = a.aggregate_interval_ms {
            cmd.args(["--aggregate-interval-ms", &ms.to_string()]);
        }
        if let Some(m) = a.rebuild_mib_per_s {
            cmd.args(["--rebuild-mib-per-s", &m.to_string()]);
        }
        if let Some(ms) = a.scrub_interval_ms {
            cmd.args(["--scrub-interval-ms", &ms.to_string()]);
        }
        if let Some(ms) = a.aggregate_margin_ms {
            cmd.args(["--aggregate-margin-ms", &ms.to_string()]);
        }
        if let Some(n) = a.sync_lanes {
            cmd.args(["--sync-lanes", &n.to_string()]);
        }
        if let Some(m) = a.reserve_mib {
            cmd.args(["--reserve-mib", &m.to_string()]);
        }
        children.push(cmd.spawn().with_context(|| format!("starting rank {i}"))?);
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let result = wait_and_setup(&a, &st, &aps, &dir);
    if let Err(e) = &result {
        eprintln!("error: {e:#}\nserver logs are in {}/rank-*/server.log", dir.display());
        stop_all(&mut children);
        return result;
    }
    // A rank that dies is reported, not restarted: surviving a lost rank is the point.
    let mut reported = vec![false; children.len()];
    while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
        for (i, c) in children.iter_mut().enumerate() {
            if !reported[i] {
                if let Ok(Some(status)) = c.try_wait() {
                    eprintln!("rank process {i} exited ({status}); see {}/rank-{i}/server.log. The others keep serving.", dir.display());
                    reported[i] = true;
                }
            }
        }
        if reported.iter().all(|r| *r) {
            println!("every rank has stopped (`strata system stop`?); `strata up --dir {}` starts them again", dir.display());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping {} ranks...", children.len());
    // Tell the management service first: ranks that merely exit at different moments would
    // look dead to it (a slow one past the heartbeat timeout), and their targets would then
    // need `pool reintegrate` after the next `strata up`.
    let conn = Conn { cluster: Some(dir.join("cluster.json")), json: false };
    let told = block_on(async { tokio::time::timeout(Duration::from_secs(5), stop_ranks(&conn, None)).await.map_err(|_| anyhow::anyhow!("no answer within 5 s"))?.map(|_| ()) });
    if let Err(e) = told {
        eprintln!("could not record the stop in the management service ({e:#}); stopping the processes anyway");
    }
    stop_all(&mut children);
    println!("stopped; `strata up --dir {}` brings the same cluster back", dir.display());
    Ok(())
}

fn wait_and_setup(a: &Args, st: &UpState, aps: &[String], dir: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mgmt = MgmtClient::new(aps.to_vec(), Some(st.cluster.clone())).with_deadline(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if STOP.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("interrupted while starting");
            }
            if let Ok(MgmtReply::System(s)) = mgmt.query(MgmtQuery::System).await {
                let joined = s.ranks.iter().filter(|r| r.state == RankState::Joined).count();
                if joined >= st.ranks.len() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not come up within 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let file = ClusterFile { format: 1, cluster: st.cluster.clone(), access_points: aps.to_vec() };
        let cf = dir.join("cluster.json");
        file.save(&cf)?;
        let pools = match mgmt.query(MgmtQuery::Pools).await? {
            MgmtReply::Pools(p) => p,
            _ => Vec::new(),
        };
        if pools.is_empty() && !a.pool.is_empty() {
            let size = crate::output::parse_size(&a.pool_size)?;
            mgmt.write(MgmtCmd::PoolCreate { id: strata_types::PoolId::new_random(), label: a.pool.clone(), size_bytes: size, ranks: None, select: None }).await?;
            println!("created pool '{}' ({})", a.pool, crate::output::human_bytes(size));
        }
        let env = if cf == ClusterFile::default_path() { String::new() } else { format!("export STRATA_CLUSTER={}\n  ", cf.display()) };
        println!("cluster {} is up: {} ranks, management at {}", st.cluster, st.ranks.len(), aps.join(","));
        let metrics: Vec<String> = st.ranks.iter().filter_map(|r| r.metrics.as_ref()).map(|m| format!("http://{m}/metrics")).collect();
        if !metrics.is_empty() {
            println!("Prometheus metrics of the ranks: {}", metrics.join(" "));
        }
        let strata = strata_command();
        println!(
            "next, in another terminal (README.md, \"A first session\", goes on from here):\n  {env}{strata} system query\n  {strata} cont create {p} demo --oclass RP_3G1 --rf 2\n  echo hello | {strata} obj put {p}/demo --dkey greeting --akey text   # prints the object id\n  {strata} obj get {p}/demo OID --dkey greeting --akey text\n  {strata} pool query {p}\nCtrl-C stops the cluster.",
            p = a.pool
        );
        Ok(())
    })
}

/// How to run this binary from another terminal: `strata` when that name on `PATH` is this very
/// file (after `cargo install --path crates/cli`), otherwise its full path (`cargo run` leaves it
/// in `target/release`), so the printed commands work when pasted.
fn strata_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else { return "strata".into() };
    let on_path = std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("strata").canonicalize().is_ok_and(|p| p == me)));
    if on_path {
        "strata".into()
    } else {
        me.display().to_string()
    }
}
