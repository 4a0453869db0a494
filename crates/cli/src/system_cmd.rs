//! `strata system`: ranks and the management service.

use crate::cluster_cmd::{block_on, Conn};
use crate::output::{emit, human_bytes};
use strata_rpc::mgmt_msg::{MgmtCmd, MgmtQuery, MgmtReply, RankState};
use strata_types::Rank;

#[derive(clap::Subcommand)]
pub enum SystemCommand {
    /// Ranks, their addresses and states, and the management leader.
    Query {
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop every rank (or --rank N) cleanly; `strata up` on the same directory starts them again.
    Stop {
        #[arg(long)]
        rank: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Exclude a rank: its targets go DOWN in every pool (rebuild moves its data away).
    Exclude {
        #[arg(long)]
        rank: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Bring an excluded or dead rank back as a member (its pool targets need `pool reintegrate`).
    Reintegrate {
        #[arg(long)]
        rank: u32,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn run(c: SystemCommand) -> anyhow::Result<()> {
    block_on(async move {
        match c {
            SystemCommand::Query { conn } => {
                let MgmtReply::System(s) = conn.query(MgmtQuery::System).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &s, |s| {
                    println!("cluster {}  management leader {}", s.cluster_id, s.leader.clone().unwrap_or("-".into()));
                    println!("{:<5} {:<9} {:<22} {:<12} {:>7} {:>10}  AP", "rank", "state", "data address", "domain", "targets", "capacity");
                    for r in &s.ranks {
                        println!("{:<5} {:<9} {:<22} {:<12} {:>7} {:>10}  {}", r.rank.to_string(), format!("{:?}", r.state).to_lowercase(), r.data_addr, r.fault_domain, r.targets, human_bytes(r.capacity_bytes), if r.access_point { "yes" } else { "" });
                    }
                })
            }
            SystemCommand::Stop { rank, conn } => {
                let list = stop_ranks(&conn, rank).await?;
                emit(conn.json, &serde_json::json!({"stopping": list}), |_| println!("stopping ranks {list:?}; they exit at their next heartbeat"))
            }
            SystemCommand::Exclude { rank, conn } => {
                conn.write(MgmtCmd::SetRankState { rank: Rank(rank), state: RankState::Excluded }).await?;
                emit(conn.json, &serde_json::json!({"rank": rank, "state": "excluded"}), |_| println!("rank {rank} excluded; its targets are DOWN in every pool"))
            }
            SystemCommand::Reintegrate { rank, conn } => {
                conn.write(MgmtCmd::SetRankState { rank: Rank(rank), state: RankState::Joined }).await?;
                emit(conn.json, &serde_json::json!({"rank": rank, "state": "joined"}), |_| println!("rank {rank} is a member again; run `strata pool reintegrate POOL --rank {rank}` for its targets"))
            }
        }
    })
}

/// Record ranks (all, or `rank`) as stopped in the management service, access points last so
/// that it can record the others. A stopped rank is not "silent past the heartbeat timeout":
/// its targets stay in every pool map, and the same ranks starting again serve at once.
pub async fn stop_ranks(conn: &Conn, rank: Option<u32>) -> anyhow::Result<Vec<u32>> {
    let MgmtReply::System(s) = conn.query(MgmtQuery::System).await? else { anyhow::bail!("unexpected reply") };
    let ranks: Vec<Rank> = s.ranks.iter().map(|r| r.rank).filter(|r| rank.is_none_or(|x| x == r.0)).collect();
    anyhow::ensure!(!ranks.is_empty(), "no rank {} in the system", rank.unwrap_or(0));
    let (aps, others): (Vec<Rank>, Vec<Rank>) = ranks.iter().partition(|r| s.ranks.iter().any(|i| i.rank == **r && i.access_point));
    for r in others.iter().chain(aps.iter()) {
        conn.write(MgmtCmd::SetRankState { rank: *r, state: RankState::Stopped }).await?;
    }
    Ok(ranks.iter().map(|r| r.0).collect())
}
