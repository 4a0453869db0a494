//! `strata server`: one rank. Runs the management service if its management address is one of
//! the access points, joins the system (keeping its rank across restarts), serves its targets
//! on the data address, and heartbeats the management leader.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use strata_engine::{Engine, EngineConfig};
use strata_mgmt::{MgmtConfig, MgmtNode};
use strata_rpc::mgmt_client::MgmtClient;
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtReply, MgmtReq, MgmtResp};
use strata_rpc::{ServerConfig, ServiceKind};
use strata_types::Rank;
use tokio::net::TcpListener;

/// Default floor of the data-movement import rate per rank while foreground updates are
/// written there (`engine::move_pacing`: faster while they stay fast; an idle rank imports
/// unpaced). As a fixed rate, `strata bench rebuild` (4 ranks, foreground writers throughout)
/// kept foreground writes at 0.55-0.83x of their rate before the rebuild at 64-128 MiB/s per
/// rank and fell to 0.2-0.47x at 256.
const REBUILD_MIB_PER_S_DEFAULT: u64 = 96;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Args {
    /// TOML file with the same keys as the flags (dir, mgmt_addr, data_addr, access_points,
    /// fault_domain, labels, targets, cluster, heartbeat_timeout_ms, threads,
    /// rebuild_mib_per_s, aggregate_interval_ms, aggregate_margin_ms, aggregate_mib_per_s,
    /// scrub_interval_ms, scrub_mib_per_s, sync_lanes, reserve_mib, metrics_addr);
    /// flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for this rank's targets and state.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Management-network address (required on access points).
    #[arg(long)]
    pub mgmt_addr: Option<String>,
    /// Data-network address engines and clients use.
    #[arg(long)]
    pub data_addr: Option<String>,
    /// Management addresses of the access points, comma-separated, same order everywhere.
    #[arg(long, value_delimiter = ',')]
    pub access_points: Vec<String>,
    /// Fault-domain path, e.g. /zone-a/rack-3/host-7 (default: /<hostname>).
    #[arg(long)]
    pub fault_domain: Option<String>,
    /// Free labels for resource queries, e.g. --label media=ssd.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Targets (storage units) on this rank.
    #[arg(long)]
    pub targets: Option<u16>,
    /// Cluster name; servers and clients of other clusters are refused.
    #[arg(long)]
    pub cluster: Option<String>,
    /// A rank silent for this long is marked dead (access points only).
    #[arg(long)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// Runtime worker threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Least MiB per second this rank imports for rebuild, resync, drain and extension while
    /// foreground writes are in flight on it (0: never paced; default 96): faster as long as
    /// foreground writes stay fast, slower (down to this) when imports slow them; with no
    /// foreground writes, data movement is not paced.
    #[arg(long)]
    pub rebuild_mib_per_s: Option<u64>,
    /// Time between background aggregation passes, which merge away versions no reader needs
    /// (0: off; default 10000).
    #[arg(long)]
    pub aggregate_interval_ms: Option<u64>,
    /// How far below the engine's clock aggregation stays (default 30000, at least 1000):
    /// reads at older epochs that are not container snapshots are refused after it.
    #[arg(long)]
    pub aggregate_margin_ms: Option<u64>,
    /// Most MiB per second aggregation reads to examine versions (0: no limit; default 64).
    #[arg(long)]
    pub aggregate_mib_per_s: Option<u64>,
    /// Time between background scrub passes, which verify the checksum of every stored record
    /// and repair bad ones from healthy shards (0: off; default 86400000, a day).
    #[arg(long)]
    pub scrub_interval_ms: Option<u64>,
    /// Most MiB per second a background scrub pass reads, on average over each target (0: no
    /// limit; default 32).
    #[arg(long)]
    pub scrub_mib_per_s: Option<u64>,
    /// Commit groups per target that may wait for the disk at once (1-16; default 3): with
    /// one, a target's next group waits for the previous fsync to finish.
    #[arg(long)]
    pub sync_lanes: Option<usize>,
    /// Refuse new data (clients see "no space") while the file system under --dir has fewer
    /// MiB free than this, so the storage engine never runs out mid-write (default 256; 0:
    /// no reserve). Reads and deletes still work; writes resume once space is freed.
    #[arg(long)]
    pub reserve_mib: Option<u64>,
    /// Serve this rank's counters for Prometheus at http://ADDR/metrics (requests by kind
    /// with latency histograms, bytes, space, rebuild, aggregation, scrub); default: off.
    /// Example: --metrics-addr 127.0.0.1:9100
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    mgmt_addr: Option<String>,
    data_addr: Option<String>,
    access_points: Option<Vec<String>>,
    fault_domain: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    targets: Option<u16>,
    cluster: Option<String>,
    heartbeat_timeout_ms: Option<u64>,
    threads: Option<usize>,
    rebuild_mib_per_s: Option<u64>,
    aggregate_interval_ms: Option<u64>,
    aggregate_margin_ms: Option<u64>,
    aggregate_mib_per_s: Option<u64>,
    scrub_interval_ms: Option<u64>,
    scrub_mib_per_s: Option<u64>,
    sync_lanes: Option<usize>,
    reserve_mib: Option<u64>,
    metrics_addr: Option<String>,
}

/// What a rank remembers across restarts.
#[derive(Serialize, Deserialize)]
struct Identity {
    format: u8,
    uuid: String,
    cluster: String,
    rank: Option<Rank>,
}

struct Resolved {
    dir: PathBuf,
    mgmt_addr: Option<String>,
    data_addr: String,
    access_points: Vec<String>,
    fault_domain: String,
    labels: BTreeMap<String, String>,
    targets: u16,
    cluster: String,
    heartbeat_timeout: Duration,
    threads: usize,
    rebuild_bytes_per_s: u64,
    aggregation: strata_engine::AggregationConfig,
    scrub_interval: Duration,
    scrub_bytes_per_s: u64,
    vos: strata_vos::VosConfig,
    space_reserve_bytes: u64,
    metrics_addr: Option<String>,
}

/// A day: bit rot is slow, and a pass reads every stored byte.
const SCRUB_INTERVAL_MS_DEFAULT: u64 = 86_400_000;

fn resolve(a: Args) -> anyhow::Result<Resolved> {
    let file = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
            toml::from_str::<FileConfig>(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let mut labels = file.labels.unwrap_or_default();
    for l in &a.labels {
        let (k, v) = l.split_once('=').with_context(|| format!("--label '{l}' must be key=value"))?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into());
    let access_points = if a.access_points.is_empty() { file.access_points.unwrap_or_default() } else { a.access_points };
    if access_points.is_empty() {
        bail!("no access points: pass --access-points HOST:PORT[,..] (the management addresses of 1, 3 or 5 servers)");
    }
    if ![1, 3, 5].contains(&access_points.len()) {
        bail!("{} access points given; use 1, 3 or 5 so that a majority survives failures", access_points.len());
    }
    let r = Resolved {
        dir: a.dir.or(file.dir).context("no --dir: where should this rank keep its data?")?,
        mgmt_addr: a.mgmt_addr.or(file.mgmt_addr),
        data_addr: a.data_addr.or(file.data_addr).context("no --data-addr (e.g. 127.0.0.1:10001)")?,
        access_points,
        fault_domain: a.fault_domain.or(file.fault_domain).unwrap_or(format!("/{host}")),
        labels,
        targets: a.targets.or(file.targets).unwrap_or(2),
        cluster: a.cluster.or(file.cluster).unwrap_or_else(|| "strata".into()),
        heartbeat_timeout: Duration::from_millis(a.heartbeat_timeout_ms.or(file.heartbeat_timeout_ms).unwrap_or(5000)),
        threads: a.threads.or(file.threads).unwrap_or(2).max(1),
        rebuild_bytes_per_s: a.rebuild_mib_per_s.or(file.rebuild_mib_per_s).unwrap_or(REBUILD_MIB_PER_S_DEFAULT) << 20,
        aggregation: {
            let d = strata_engine::AggregationConfig::default();
            let margin_ms = a.aggregate_margin_ms.or(file.aggregate_margin_ms).unwrap_or(d.margin.as_millis() as u64);
            if margin_ms < strata_engine::AGGREGATION_MARGIN_MS_MIN {
                bail!("--aggregate-margin-ms {margin_ms} is below {} ms (clock drift between engines plus snapshot registration)", strata_engine::AGGREGATION_MARGIN_MS_MIN);
            }
            strata_engine::AggregationConfig {
                interval: a.aggregate_interval_ms.or(file.aggregate_interval_ms).map_or(d.interval, Duration::from_millis),
                margin: Duration::from_millis(margin_ms),
                bytes_per_s: a.aggregate_mib_per_s.or(file.aggregate_mib_per_s).map_or(d.bytes_per_s, |m| m << 20),
                ..d
            }
        },
        scrub_interval: Duration::from_millis(a.scrub_interval_ms.or(file.scrub_interval_ms).unwrap_or(SCRUB_INTERVAL_MS_DEFAULT)),
        scrub_bytes_per_s: a.scrub_mib_per_s.or(file.scrub_mib_per_s).unwrap_or(32) << 20,
        vos: {
            let d = strata_vos::VosConfig::default();
            let lanes = a.sync_lanes.or(file.sync_lanes).unwrap_or(d.sync_lanes);
            if !(1..=strata_vos::SYNC_LANES_MAX).contains(&lanes) {
                bail!("--sync-lanes {lanes}: use 1 to {}", strata_vos::SYNC_LANES_MAX);
            }
            strata_vos::VosConfig { sync_lanes: lanes, ..d }
        },
        space_reserve_bytes: a.reserve_mib.or(file.reserve_mib).unwrap_or(256).saturating_mul(1 << 20),
        metrics_addr: a.metrics_addr.or(file.metrics_addr).filter(|m| !m.is_empty()),
    };
    strata_placement::FaultDomain::parse(&r.fault_domain).map_err(|e| anyhow::anyhow!("--fault-domain: {e}"))?;
    Ok(r)
}

/// `GET /metrics` on `listener` until `stop`: the engine's counters in the Prometheus text format.
async fn serve_metrics(listener: TcpListener, engine: Arc<Engine>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let engine = engine.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], engine.metrics_text()) }
        }),
    );
    tokio::spawn(async move {
        let stopped = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
}

fn load_identity(dir: &Path, cluster: &str) -> anyhow::Result<Identity> {
    let path = dir.join("server.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id: Identity = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
            if id.cluster != cluster {
                bail!("{} belongs to cluster '{}', not '{cluster}'; use another --dir or the right --cluster", dir.display(), id.cluster);
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Identity { format: 1, uuid: uuid::Uuid::new_v4().to_string(), cluster: cluster.to_owned(), rank: None }),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_identity(dir: &Path, id: &Identity) -> anyhow::Result<()> {
    let path = dir.join("server.json");
    let tmp = dir.join("server.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(id)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let r = resolve(a)?;
    // Before any thread starts: received payloads go to disk from huge pages (`huge_buffers`).
    let huge = strata_rpc::huge_buffers::allow_advised_huge_pages();
    tracing::debug!(huge_pages = huge, "receive buffers may get transparent huge pages");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(r.threads).enable_all().build()?;
    rt.block_on(serve(r))
}

async fn serve(r: Resolved) -> anyhow::Result<()> {
    std::fs::create_dir_all(&r.dir).with_context(|| format!("creating {}", r.dir.display()))?;
    let mut ident = load_identity(&r.dir, &r.cluster)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let ap_index = r.mgmt_addr.as_ref().and_then(|m| r.access_points.iter().position(|a| a == m));
    if let Some(index) = ap_index {
        let mgmt_addr = r.mgmt_addr.clone().unwrap_or_default();
        let listener = TcpListener::bind(&mgmt_addr).await.with_context(|| format!("binding management address {mgmt_addr}"))?;
        let node = MgmtNode::start(MgmtConfig { dir: r.dir.join("mgmt"), cluster: r.cluster.clone(), access_points: r.access_points.clone(), index, heartbeat_timeout: r.heartbeat_timeout })
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        tokio::spawn(strata_rpc::serve(listener, node, ServerConfig::new(ServiceKind::Mgmt, r.cluster.clone()), stop_rx.clone()));
        tracing::info!(%mgmt_addr, index, "management service started");
    } else if r.mgmt_addr.as_ref().is_some_and(|m| !m.is_empty()) {
        tracing::info!("management address is not an access point; not running the management service");
    }

    let mgmt = MgmtClient::new(r.access_points.clone(), Some(r.cluster.clone())).with_deadline(Duration::from_secs(60));
    let data_listener = TcpListener::bind(&r.data_addr).await.with_context(|| format!("binding data address {}", r.data_addr))?;
    // Bound before joining, like the data address: once the system lists this rank, a scrape
    // waits in the accept queue instead of being refused.
    let metrics_listener = match &r.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding metrics address {addr}"))?),
        None => None,
    };
    let free = {
        let probe = r.dir.clone();
        let vos = strata_vos::Vos::open(&probe.join("target-0"), &strata_vos::VosConfig::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let s = vos.space().map_err(|e| anyhow::anyhow!("{e}"))?;
        s.fs_free_bytes
    };
    let join = MgmtCmd::Join {
        uuid: ident.uuid.clone(),
        mgmt_addr: r.mgmt_addr.clone().unwrap_or_default(),
        data_addr: r.data_addr.clone(),
        fault_domain: r.fault_domain.clone(),
        labels: r.labels.clone(),
        targets: r.targets,
        capacity_bytes: free,
        access_point: ap_index.is_some(),
    };
    let rank = match mgmt.write(join).await.context("joining the system")? {
        MgmtReply::Rank(rank) => rank,
        other => bail!("unexpected answer to join: {other:?}"),
    };
    if ident.rank.is_some_and(|old| old != rank) {
        bail!("this directory was rank {:?} but the system now says rank {rank}; refusing to serve another rank's data", ident.rank);
    }
    ident.rank = Some(rank);
    save_identity(&r.dir, &ident)?;

    let engine = Arc::new(Engine::open(&EngineConfig { dir: r.dir.clone(), rank, targets: r.targets, cluster: r.cluster.clone(), vos: r.vos.clone(), rebuild_bytes_per_s: r.rebuild_bytes_per_s, aggregation: r.aggregation.clone(), space_reserve_bytes: r.space_reserve_bytes }, mgmt.clone()).map_err(|e| anyhow::anyhow!(e))?);
    tokio::spawn(strata_rpc::serve(data_listener, engine.clone(), ServerConfig::new(ServiceKind::Engine, r.cluster.clone()), stop_rx.clone()));
    println!("rank {rank} serving {} targets on {} (cluster {})", r.targets, r.data_addr, r.cluster);
    if let (Some(listener), Some(addr)) = (metrics_listener, &r.metrics_addr) {
        serve_metrics(listener, engine.clone(), stop_rx.clone()).await;
        println!("rank {rank} metrics at http://{addr}/metrics");
    }

    // Heartbeats: a short per-call deadline, so a leader change costs one missed beat.
    let beat = mgmt.clone().with_deadline(Duration::from_secs(2));
    let period = (r.heartbeat_timeout / 5).max(Duration::from_millis(100));
    let hb_engine = engine.clone();
    let (stop_hb, mut stop_req) = tokio::sync::watch::channel(false);
    let is_ap = ap_index.is_some();
    let refreshing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            let (free, total) = hb_engine.space();
            match beat.call(&MgmtReq::Heartbeat { rank, incarnation: 0, free_bytes: free, total_bytes: total }).await {
                Ok(MgmtResp::HeartbeatAck { pool_versions, stop }) => {
                    if stop {
                        println!("rank {rank}: stop requested by the management service");
                        if is_ap {
                            // Keep the management service up a little longer, so the other
                            // ranks can learn of the stop at their next heartbeat.
                            tokio::time::sleep(period * 3).await;
                        }
                        let _ = stop_hb.send(true);
                        return;
                    }
                    // Refreshing a pool map can wait on the management service for its whole
                    // deadline (60 s); the beat must not wait with it, or a slow refresh gets a
                    // live rank declared dead. One refresh at a time: a beat that finds one still
                    // running skips it, and a later beat brings the versions again.
                    if !refreshing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let (engine, running) = (hb_engine.clone(), RefreshRunning(refreshing.clone()));
                        tokio::spawn(async move {
                            engine.note_pool_versions(&pool_versions).await;
                            drop(running);
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
            tokio::time::sleep(period).await;
        }
    });

    // Rebuild runs in the background, one pass at a time.
    let rb = engine.clone();
    tokio::spawn(async move {
        // Failed passes back off (0.5 s doubling to 8 s): a cause that lasts, such as a
        // destination with no space left, would otherwise restart the whole pass twice a second
        // and log each time. `pool query` shows the cause meanwhile (`MovementProgress::stalled`).
        let mut failures = 0u32;
        loop {
            // A new pool map starts a pass at once: writes to the old places only until then
            // are what rebalancing has to copy.
            let wait = Duration::from_millis(500) * (1 << failures.min(4));
            let _ = tokio::time::timeout(wait, rb.map_changed()).await;
            match rb.rebuild_tick().await {
                Ok(_) => failures = 0,
                Err(e) => {
                    if failures % 8 == 0 {
                        tracing::warn!(error = %e, failures = failures + 1, "rebuild pass failed; retrying");
                    } else {
                        tracing::debug!(error = %e, failures = failures + 1, "rebuild pass failed; retrying");
                    }
                    failures += 1;
                }
            }
        }
    });

    // Aggregation runs in the background too, one pass at a time.
    if !r.aggregation.interval.is_zero() {
        let ag = engine.clone();
        let interval = r.aggregation.interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                ag.aggregate_tick().await;
            }
        });
    }

    // So does scrub, paced so it never takes the disk from foreground I/O.
    if !r.scrub_interval.is_zero() {
        let sc = engine.clone();
        let (interval, bytes_per_s) = (r.scrub_interval, r.scrub_bytes_per_s);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                sc.scrub_tick(bytes_per_s).await;
            }
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = stop_req.changed() => {}
    }
    let _ = stop_tx.send(true);
    println!("rank {rank} stopped");
    Ok(())
}

/// Marks the heartbeat's pool-map refresh finished when dropped, also if the refresh panicked
/// (a flag left set would stop every later refresh).
struct RefreshRunning(Arc<std::sync::atomic::AtomicBool>);

impl Drop for RefreshRunning {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}
