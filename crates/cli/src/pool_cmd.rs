//! `strata pool`: create, list, query, destroy pools and change their maps.

use crate::cluster_cmd::{block_on, Conn};
use crate::output::{emit, human_bytes, parse_size};
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtQuery, MgmtReply, PoolInfo, TargetAction};
use strata_types::{PoolId, Rank};

#[derive(clap::Subcommand)]
pub enum PoolCommand {
    /// Create a pool over the joined ranks (or --ranks), optionally filtered by --select.
    Create {
        label: String,
        /// Capacity to reserve, e.g. 10G (default: 8 GiB or what is free). Refused if larger than the free space.
        #[arg(long)]
        size: Option<String>,
        /// Only these ranks, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ranks: Option<Vec<u32>>,
        /// Resource query choosing targets, e.g. "media=ssd and unique(host)" or the seed's tuple form.
        #[arg(long)]
        select: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pools with their sizes and map versions.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// One pool's map: every target and its state.
    Query {
        pool: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Destroy a pool (refused while it has containers, unless --force).
    Destroy {
        pool: String,
        /// Destroy its containers and their data too.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Mark a rank's targets (or one, with --target) DOWN in this pool.
    Exclude(TargetSel),
    /// Bring excluded targets back (UPIN, then UP once resynced).
    Reintegrate(TargetSel),
    /// Move data off a rank's targets before removing it.
    Drain(TargetSel),
    /// Verify the checksum of every record on every rank now; repair bad ones from replicas.
    Scrub {
        pool: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Counters of every rank serving the pool: space used, background aggregation (versions
    /// and bytes reclaimed).
    Stats {
        pool: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Data movement (rebuild, reintegration, drain) of a pool; --watch draws it until done.
    Rebuild {
        pool: String,
        /// Draw a progress bar (objects, bytes, rate, ETA) until the movement is done.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add ranks to the pool (their targets join as NEW).
    Extend {
        pool: String,
        /// Ranks to add, comma-separated (`strata system query` lists them), e.g. --ranks 4,5.
        #[arg(long, value_delimiter = ',', required = true)]
        ranks: Vec<u32>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Which targets of which pool a map change applies to.
#[derive(clap::Args)]
pub struct TargetSel {
    pool: String,
    /// The rank whose targets change state (`strata system query` lists ranks).
    #[arg(long)]
    rank: u32,
    /// One target of the rank (default: all of them).
    #[arg(long)]
    target: Option<u16>,
    #[command(flatten)]
    conn: Conn,
}

/// `pool query`: the pool's map and rebuild state from the management service, plus what the
/// ranks report: data-movement progress and what the background scrub found since they started.
#[derive(serde::Serialize)]
struct PoolQuery {
    #[serde(flatten)]
    info: PoolInfo,
    progress: Progress,
    /// Copies data movement left where the current map no longer places them, deleted.
    reclaim: ReclaimSummary,
    scrub: BackgroundScrub,
}

/// The ranks' reclaim counters for the pool, summed (totals since each rank started).
#[derive(serde::Serialize, Default)]
struct ReclaimSummary {
    /// The pool map version reclaim is judged against (the current one).
    version: u64,
    ranks_answered: usize,
    /// Ranks whose latest finished pass was at `version`: nothing left to delete there.
    ranks_done: usize,
    passes: u64,
    passes_stopped: u64,
    /// Object shards (an object on one target) with rows deleted; of those deleted whole.
    objects: u64,
    objects_whole: u64,
    records: u64,
    bytes: u64,
}

fn reclaim_summary(p: &PoolInfo, stats: &[strata_rpc::engine_msg::EngineStats]) -> ReclaimSummary {
    let mut out = ReclaimSummary { version: p.map.version, ranks_answered: stats.len(), ..Default::default() };
    for r in stats.iter().flat_map(|s| s.reclaim.iter()).filter(|r| r.pool == p.id) {
        out.ranks_done += (r.version_done == p.map.version) as usize;
        out.passes += r.passes;
        out.passes_stopped += r.passes_stopped;
        out.objects += r.objects;
        out.objects_whole += r.objects_whole;
        out.records += r.records;
        out.bytes += r.bytes;
    }
    out
}

#[derive(serde::Serialize, Default)]
struct BackgroundScrub {
    /// Passes summed over the ranks that answered.
    passes: u64,
    ranks_answered: usize,
    #[serde(flatten)]
    counters: strata_rpc::engine_msg::ScrubCounters,
}

/// Data movement (rebuild, resync, drain) summed over the ranks' passes for one map version:
/// the one being rebuilt, else the latest any rank reports.
#[derive(serde::Serialize, Default, Clone)]
struct Progress {
    /// `rebuilding`, `done` (the latest movement finished) or `idle` (none since the ranks started).
    state: &'static str,
    version: u64,
    /// Ranks that finished their part (management service), of those that must.
    ranks_done: u32,
    ranks_total: u32,
    /// Ranks whose pass for `version` reported.
    ranks_reporting: usize,
    objects_done: u64,
    objects_total: u64,
    bytes_done: u64,
    bytes_total: u64,
    /// Bytes done per second since the earliest pass started.
    rate_bytes_per_s: u64,
    /// Seconds left at that rate (absent when nothing is known yet, or while stalled).
    eta_s: Option<u64>,
    /// Why ranks' passes stopped, while they retry without moving anything (a destination
    /// with no space left, an unreachable rank).
    stalled: Vec<String>,
}

/// Every rank's engine counters (ranks that do not answer are left out).
async fn rank_stats(conn: &Conn, p: &PoolInfo) -> Vec<strata_rpc::engine_msg::EngineStats> {
    use strata_rpc::engine_msg::{EngineReq, EngineResp};
    let Ok(client) = conn.client().await else { return Vec::new() };
    let engines = strata_rpc::RpcPool::new(strata_rpc::ServiceKind::Engine, Some(client.cluster().to_owned()), Default::default());
    let mut out = Vec::new();
    for addr in p.rank_addrs.values() {
        if let Ok((EngineResp::Stats(s), _)) = engines.call::<_, EngineResp>(addr, &EngineReq::Stats, bytes::Bytes::new(), std::time::Duration::from_secs(5)).await {
            out.push(s);
        }
    }
    out
}

fn background_scrub(stats: &[strata_rpc::engine_msg::EngineStats]) -> BackgroundScrub {
    let mut out = BackgroundScrub { ranks_answered: stats.len(), ..Default::default() };
    for s in stats {
        out.passes += s.scrub_passes;
        out.counters.records_checked += s.scrub.records_checked;
        out.counters.bytes_checked += s.scrub.bytes_checked;
        out.counters.corrupt += s.scrub.corrupt;
        out.counters.repaired += s.scrub.repaired;
        out.counters.lost += s.scrub.lost;
    }
    out
}

fn progress(p: &PoolInfo, stats: &[strata_rpc::engine_msg::EngineStats]) -> Progress {
    let passes: Vec<&strata_rpc::engine_msg::MovementProgress> = stats.iter().flat_map(|s| s.movement.iter()).filter(|m| m.pool == p.id).collect();
    let version = match &p.rebuild {
        Some(r) => r.version,
        None => passes.iter().map(|m| m.version).max().unwrap_or(0),
    };
    let mut out = Progress { state: if p.rebuild.is_some() { "rebuilding" } else if passes.is_empty() { "idle" } else { "done" }, version, ..Default::default() };
    if let Some(r) = &p.rebuild {
        (out.ranks_done, out.ranks_total) = (r.ranks_done, r.ranks_total);
    }
    let mut elapsed_ms = 0u64;
    for m in passes.iter().filter(|m| m.version == version) {
        out.ranks_reporting += 1;
        out.objects_done += m.objects_done;
        out.objects_total += m.objects_total;
        out.bytes_done += m.bytes_done;
        out.bytes_total += m.bytes_total;
        elapsed_ms = elapsed_ms.max(m.elapsed_ms);
        out.stalled.extend(m.stalled.clone());
    }
    out.rate_bytes_per_s = out.bytes_done.saturating_mul(1000).checked_div(elapsed_ms).unwrap_or(0);
    let left = out.bytes_total.saturating_sub(out.bytes_done);
    // A stalled pass moves nothing until its cause is gone: no time left can be told.
    out.eta_s = if left == 0 && out.ranks_reporting > 0 { Some(0) } else if out.rate_bytes_per_s > 0 && out.stalled.is_empty() { Some(left.div_ceil(out.rate_bytes_per_s)) } else { None };
    out
}

fn print_progress(g: &Progress) {
    let eta = g.eta_s.map_or("?".to_owned(), |s| format!("{s} s"));
    println!("data movement: {} (map version {}); objects {}/{}; {}/{} at {}/s, ETA {eta}; ranks done {}/{}", g.state, g.version, g.objects_done, g.objects_total, human_bytes(g.bytes_done), human_bytes(g.bytes_total), human_bytes(g.rate_bytes_per_s), g.ranks_done, g.ranks_total);
    for s in &g.stalled {
        println!("data movement stalled, retrying: {s}");
    }
}

fn print_pool(p: &PoolInfo) {
    println!("pool {} ({})  size {}  map version {}", p.label, p.id, human_bytes(p.size_bytes), p.map.version);
    match &p.rebuild {
        Some(r) => println!("rebuild: in progress for map version {}, {}/{} ranks done", r.version, r.ranks_done, r.ranks_total),
        None => println!("rebuild: idle"),
    }
    for u in &p.unclean_conts {
        println!("container {} is unclean: {} (`strata cont query {} {}`)", u.label, u.reason, p.label, u.label);
    }
    println!("{:<8} {:<8} {:<16} {:<22}", "target", "state", "domain", "rank address");
    for t in &p.map.targets {
        println!("{:<8} {:<8} {:<16} {:<22}", t.id.to_string(), t.state.name(), t.domain.to_string(), p.rank_addrs.get(&t.id.rank).cloned().unwrap_or_default());
    }
}

pub fn run(c: PoolCommand) -> anyhow::Result<()> {
    block_on(async move {
        let targets = |t: TargetSel, action| async move {
            let r = t.conn.write(MgmtCmd::PoolTargets { pool: t.pool, rank: Rank(t.rank), index: t.target, action }).await?;
            Ok::<_, anyhow::Error>((t.conn, r))
        };
        let (conn, reply) = match c {
            PoolCommand::Create { label, size, ranks, select, conn } => {
                let size_bytes = size.as_deref().map(parse_size).transpose()?.unwrap_or(0);
                let r = conn.write(MgmtCmd::PoolCreate { id: PoolId::new_random(), label, size_bytes, ranks: ranks.map(|v| v.into_iter().map(Rank).collect()), select }).await?;
                (conn, r)
            }
            PoolCommand::List { conn } => {
                let MgmtReply::Pools(pools) = conn.query(MgmtQuery::Pools).await? else { anyhow::bail!("unexpected reply") };
                return emit(conn.json, &pools, |pools| {
                    println!("{:<16} {:<38} {:>10} {:>8} {:>8}", "label", "uuid", "size", "targets", "version");
                    for p in pools {
                        println!("{:<16} {:<38} {:>10} {:>8} {:>8}", p.label, p.id.to_string(), human_bytes(p.size_bytes), p.map.targets.len(), p.map.version);
                    }
                });
            }
            PoolCommand::Query { pool, conn } => {
                let MgmtReply::Pool(info) = conn.query(MgmtQuery::Pool { pool }).await? else { anyhow::bail!("unexpected reply") };
                let stats = rank_stats(&conn, &info).await;
                let (progress, reclaim, scrub) = (progress(&info, &stats), reclaim_summary(&info, &stats), background_scrub(&stats));
                return emit(conn.json, &PoolQuery { info, progress, reclaim, scrub }, |q| {
                    print_pool(&q.info);
                    print_progress(&q.progress);
                    let r = &q.reclaim;
                    println!("reclaim: {} object shards ({} whole), {} records, {} deleted; ranks done at map version {}: {}/{}", r.objects, r.objects_whole, r.records, human_bytes(r.bytes), r.version, r.ranks_done, r.ranks_answered);
                    let s = &q.scrub;
                    println!("background scrub: {} passes on {}/{} ranks; {} records checked, {} repaired, {} lost", s.passes, s.ranks_answered, q.info.rank_addrs.len(), s.counters.records_checked, s.counters.repaired, s.counters.lost);
                });
            }
            PoolCommand::Destroy { pool, force, conn } => {
                let r = conn.write(MgmtCmd::PoolDestroy { pool: pool.clone(), force }).await?;
                return emit(conn.json, &serde_json::json!({"destroyed": pool}), |_| println!("pool {pool} destroyed")).map(|_| drop(r));
            }
            PoolCommand::Stats { pool, conn } => {
                use strata_rpc::engine_msg::{EngineReq, EngineResp, EngineStats};
                let client = conn.client().await?;
                let p = client.pool(&pool).await?.info()?;
                let engines = strata_rpc::RpcPool::new(strata_rpc::ServiceKind::Engine, Some(client.cluster().to_owned()), Default::default());
                let mut ranks: std::collections::BTreeMap<String, EngineStats> = Default::default();
                for (rank, addr) in &p.rank_addrs {
                    match engines.call::<_, EngineResp>(addr, &EngineReq::Stats, bytes::Bytes::new(), std::time::Duration::from_secs(10)).await {
                        Ok((EngineResp::Stats(s), _)) => {
                            ranks.insert(rank.to_string(), s);
                        }
                        Ok(_) => anyhow::bail!("rank {rank} answered the stats request oddly"),
                        Err(e) => eprintln!("rank {rank} ({addr}) did not answer: {e}"),
                    }
                }
                return emit(conn.json, &serde_json::json!({ "pool": pool, "ranks": ranks }), |_| {
                    println!("{:<6} {:>10} {:>8} {:>14} {:>14} {:>12} {:>16} {:>8}", "rank", "used", "passes", "examined", "removed", "reclaimed", "destroyed conts", "errors");
                    for (rank, s) in &ranks {
                        let a = &s.aggregation;
                        println!("{:<6} {:>10} {:>8} {:>14} {:>14} {:>12} {:>16} {:>8}", rank, human_bytes(s.used_bytes), a.passes, a.records_examined, a.records_removed, human_bytes(a.bytes_reclaimed), human_bytes(a.destroyed_bytes_deleted), a.errors);
                    }
                });
            }
            PoolCommand::Scrub { pool, conn } => {
                let client = conn.client().await?;
                let p = client.pool(&pool).await?.info()?;
                let engines = strata_rpc::RpcPool::new(strata_rpc::ServiceKind::Engine, Some(client.cluster().to_owned()), Default::default());
                let mut total = strata_rpc::engine_msg::ScrubCounters::default();
                for (rank, addr) in &p.rank_addrs {
                    let req = strata_rpc::engine_msg::EngineReq::Scrub { pool: p.id, map_version: p.map.version };
                    match engines.call::<_, strata_rpc::engine_msg::EngineResp>(addr, &req, bytes::Bytes::new(), std::time::Duration::from_secs(600)).await {
                        Ok((strata_rpc::engine_msg::EngineResp::Scrubbed(c), _)) => {
                            total.records_checked += c.records_checked;
                            total.bytes_checked += c.bytes_checked;
                            total.corrupt += c.corrupt;
                            total.repaired += c.repaired;
                            total.lost += c.lost;
                        }
                        Ok(_) => anyhow::bail!("rank {rank} answered the scrub oddly"),
                        Err(e) => eprintln!("rank {rank} ({addr}) not scrubbed: {e}"),
                    }
                }
                return emit(conn.json, &total, |c| {
                    println!("scrub of pool {pool}: {} records ({}) checked, {} corrupt, {} repaired, {} lost", c.records_checked, human_bytes(c.bytes_checked), c.corrupt, c.repaired, c.lost)
                });
            }
            PoolCommand::Rebuild { pool, watch, conn } => {
                let fetch = || async {
                    let p = match conn.query(MgmtQuery::Pool { pool: pool.clone() }).await? {
                        MgmtReply::Pool(p) => p,
                        other => anyhow::bail!("unexpected reply {other:?}"),
                    };
                    let stats = rank_stats(&conn, &p).await;
                    Ok(progress(&p, &stats))
                };
                let mut g = fetch().await?;
                if watch && !conn.json {
                    let bar = indicatif::ProgressBar::new(g.bytes_total.max(1));
                    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
                    // Bounded: a rebuild that takes longer than an hour is left to `pool query`.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
                    while g.state == "rebuilding" && std::time::Instant::now() < deadline {
                        bar.set_length(g.bytes_total.max(1));
                        bar.set_position(g.bytes_done);
                        let stalled = if g.stalled.is_empty() { String::new() } else { format!(" STALLED, retrying: {}", g.stalled.join("; ")) };
                        bar.set_message(format!("rebuild v{}: {}/{} objects, {}/{} ranks{stalled}", g.version, g.objects_done, g.objects_total, g.ranks_done, g.ranks_total));
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        g = fetch().await?;
                    }
                    bar.finish_and_clear();
                }
                return emit(conn.json, &g, print_progress);
            }
            PoolCommand::Exclude(t) => targets(t, TargetAction::Exclude).await?,
            PoolCommand::Reintegrate(t) => targets(t, TargetAction::Reintegrate).await?,
            PoolCommand::Drain(t) => targets(t, TargetAction::Drain).await?,
            PoolCommand::Extend { pool, ranks, conn } => (conn.clone(), conn.write(MgmtCmd::PoolExtend { pool, ranks: ranks.into_iter().map(Rank).collect() }).await?),
        };
        match reply {
            MgmtReply::Pool(p) => emit(conn.json, &p, print_pool),
            other => emit(conn.json, &format!("{other:?}"), |s| println!("{s}")),
        }
    })
}
