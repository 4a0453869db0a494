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
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add ranks to the pool (their targets join as NEW).
    Extend {
        pool: String,
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
    #[arg(long)]
    rank: u32,
    /// One target of the rank (default: all of them).
    #[arg(long)]
    target: Option<u16>,
    #[command(flatten)]
    conn: Conn,
}

/// `pool query`: the pool's map and rebuild state from the management service, plus what the
/// background scrub of its ranks found since they started.
#[derive(serde::Serialize)]
struct PoolQuery {
    #[serde(flatten)]
    info: PoolInfo,
    scrub: BackgroundScrub,
}

#[derive(serde::Serialize, Default)]
struct BackgroundScrub {
    /// Passes summed over the ranks that answered.
    passes: u64,
    ranks_answered: usize,
    #[serde(flatten)]
    counters: strata_rpc::engine_msg::ScrubCounters,
}

/// Sum of the background scrub counters of the pool's ranks (ranks that do not answer are
/// left out and show in `ranks_answered`).
async fn background_scrub(conn: &Conn, p: &PoolInfo) -> BackgroundScrub {
    use strata_rpc::engine_msg::{EngineReq, EngineResp};
    let mut out = BackgroundScrub::default();
    let Ok(client) = conn.client().await else { return out };
    let engines = strata_rpc::RpcPool::new(strata_rpc::ServiceKind::Engine, Some(client.cluster().to_owned()), Default::default());
    for addr in p.rank_addrs.values() {
        if let Ok((EngineResp::Stats(s), _)) = engines.call::<_, EngineResp>(addr, &EngineReq::Stats, bytes::Bytes::new(), std::time::Duration::from_secs(5)).await {
            out.ranks_answered += 1;
            out.passes += s.scrub_passes;
            out.counters.records_checked += s.scrub.records_checked;
            out.counters.bytes_checked += s.scrub.bytes_checked;
            out.counters.corrupt += s.scrub.corrupt;
            out.counters.repaired += s.scrub.repaired;
            out.counters.lost += s.scrub.lost;
        }
    }
    out
}

fn print_pool(p: &PoolInfo) {
    println!("pool {} ({})  size {}  map version {}", p.label, p.id, human_bytes(p.size_bytes), p.map.version);
    match &p.rebuild {
        Some(r) => println!("rebuild: in progress for map version {}, {}/{} ranks done", r.version, r.ranks_done, r.ranks_total),
        None => println!("rebuild: idle"),
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
                let scrub = background_scrub(&conn, &info).await;
                return emit(conn.json, &PoolQuery { info, scrub }, |q| {
                    print_pool(&q.info);
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
                    println!("{:<6} {:>10} {:>8} {:>14} {:>14} {:>12} {:>8}", "rank", "used", "passes", "examined", "removed", "reclaimed", "errors");
                    for (rank, s) in &ranks {
                        let a = &s.aggregation;
                        println!("{:<6} {:>10} {:>8} {:>14} {:>14} {:>12} {:>8}", rank, human_bytes(s.used_bytes), a.passes, a.records_examined, a.records_removed, human_bytes(a.bytes_reclaimed), a.errors);
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
                let fetch = || async { match conn.query(MgmtQuery::Pool { pool: pool.clone() }).await? { MgmtReply::Pool(p) => Ok(p), other => anyhow::bail!("unexpected reply {other:?}") } };
                let mut p = fetch().await?;
                if watch && !conn.json {
                    let bar = indicatif::ProgressBar::new(1);
                    bar.set_style(indicatif::ProgressStyle::with_template("rebuild {msg} [{bar:30}] {pos}/{len} ranks {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
                    // Bounded: a rebuild that takes longer than an hour is left to `pool query`.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
                    while let Some(r) = &p.rebuild {
                        bar.set_length(r.ranks_total as u64);
                        bar.set_position(r.ranks_done as u64);
                        bar.set_message(format!("map v{}", r.version));
                        if std::time::Instant::now() > deadline {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        p = fetch().await?;
                    }
                    bar.finish_and_clear();
                }
                return emit(conn.json, &p.rebuild, |r| match r {
                    Some(r) => println!("rebuild in progress for map version {}: {}/{} ranks done", r.version, r.ranks_done, r.ranks_total),
                    None => println!("no rebuild in progress; pool map version {}", p.map.version),
                });
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
