//! `strata cont`: containers and their snapshots.

use crate::cluster_cmd::{block_on, Conn};
use crate::output::emit;
use std::collections::BTreeMap;
use strata_rpc::mgmt_msg::{ContInfo, ContType, MgmtCmd, MgmtQuery, MgmtReply};
use strata_types::ContId;

#[derive(clap::Subcommand)]
pub enum ContCommand {
    /// Create a container: plain objects, a KV store, a POSIX volume or block volumes.
    Create {
        pool: String,
        label: String,
        #[arg(long = "type", default_value = "plain")]
        ctype: String,
        /// Default object class of its objects.
        #[arg(long, default_value = "RP_2G1")]
        oclass: String,
        /// Redundancy factor: how many failures its objects must survive (refuses weaker classes).
        #[arg(long, default_value_t = 0)]
        rf: u8,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a pool's containers: label, id, type, class, redundancy factor, snapshots.
    List {
        pool: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// One container's properties and its snapshots.
    Query {
        pool: String,
        cont: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Destroy a container and everything in it (engines free its space).
    Destroy {
        pool: String,
        cont: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Named snapshots: an epoch kept from aggregation and readable later.
    #[command(subcommand)]
    Snapshot(SnapCommand),
}

#[derive(clap::Subcommand)]
pub enum SnapCommand {
    /// Snapshot the container now under NAME: its epoch (printed) stays readable (`obj get --epoch`, `kv ... --at NAME`) until destroyed.
    Create {
        pool: String,
        cont: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// The container's snapshots: name and epoch.
    List {
        pool: String,
        cont: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Drop a snapshot: aggregation may then merge away the versions only it kept.
    Destroy {
        pool: String,
        cont: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn print_cont(c: &ContInfo) {
    println!("container {} ({})  type {}  class {}  rf {}  snapshots {}", c.label, c.id, c.ctype.name(), c.oclass, c.rf, c.snapshots.len());
}

pub fn run(c: ContCommand) -> anyhow::Result<()> {
    block_on(async move {
        match c {
            ContCommand::Create { pool, label, ctype, oclass, rf, conn } => {
                let ctype: ContType = ctype.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                let MgmtReply::Cont(info) = conn.write(MgmtCmd::ContCreate { id: ContId::new_random(), pool, label, ctype, oclass, rf, props: BTreeMap::new() }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info, print_cont)
            }
            ContCommand::List { pool, conn } => {
                let MgmtReply::Conts(list) = conn.query(MgmtQuery::Conts { pool }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &list, |l| {
                    for c in l {
                        print_cont(c);
                    }
                })
            }
            ContCommand::Query { pool, cont, conn } => {
                let MgmtReply::Cont(info) = conn.query(MgmtQuery::Cont { pool, cont }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info, |c| {
                    print_cont(c);
                    for (n, e) in &c.snapshots {
                        println!("  snapshot {n} at epoch {e}");
                    }
                })
            }
            ContCommand::Destroy { pool, cont, conn } => {
                conn.write(MgmtCmd::ContDestroy { pool, cont: cont.clone() }).await?;
                emit(conn.json, &serde_json::json!({"destroyed": cont}), |_| println!("container {cont} destroyed"))
            }
            ContCommand::Snapshot(SnapCommand::Create { pool, cont, name, conn }) => {
                let epoch = conn.client().await?.pool(&pool).await?.max_epoch().await?;
                let MgmtReply::Cont(info) = conn.write(MgmtCmd::SnapshotCreate { pool, cont, name: name.clone(), epoch }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info.snapshots, |_| println!("snapshot {name} at epoch {epoch}"))
            }
            ContCommand::Snapshot(SnapCommand::List { pool, cont, conn }) => {
                let MgmtReply::Cont(info) = conn.query(MgmtQuery::Cont { pool, cont }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info.snapshots, |s| {
                    for (n, e) in s {
                        println!("{n}\t{e}");
                    }
                })
            }
            ContCommand::Snapshot(SnapCommand::Destroy { pool, cont, name, conn }) => {
                conn.write(MgmtCmd::SnapshotDestroy { pool, cont, name: name.clone() }).await?;
                emit(conn.json, &serde_json::json!({"destroyed": name}), |_| println!("snapshot {name} destroyed"))
            }
        }
    })
}
