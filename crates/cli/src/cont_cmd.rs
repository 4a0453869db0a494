//! `strata cont`: containers and their snapshots.

use crate::cluster_cmd::{block_on, Conn};
use crate::output::emit;
use std::collections::BTreeMap;
use strata_rpc::mgmt_msg::{ContInfo, ContStatus, ContType, MgmtCmd, MgmtQuery, MgmtReply};
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
        /// Redundancy factor: how many fault domains (hosts; ranks when the class has more
        /// shards than the pool has hosts) may fail at once (before rebuild restores
        /// redundancy) without losing data; weaker object classes are refused, and more
        /// failures mark the container unclean. Default: what --oclass survives (RP_2G1: 1).
        #[arg(long)]
        rf: Option<u8>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a pool's containers: label, id, type, class, redundancy factor, snapshots.
    List {
        pool: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// One container's properties, status (healthy, or unclean and why) and snapshots.
    Query {
        pool: String,
        cont: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change a container's properties. Today: --status healthy, to accept the loss of an
    /// unclean container's data and use it again.
    SetProp {
        pool: String,
        cont: String,
        /// `healthy`: clear the unclean status. A container is marked unclean when ranks in
        /// more fault domains (hosts, or ranks when its class has more shards than the pool has
        /// hosts) failed at once than its redundancy factor (before rebuild restored
        /// redundancy): objects that had every copy on those ranks may be gone, and after this they read
        /// as absent (or as older versions), with no error. Reintegrating the ranks later does
        /// not reliably bring their data back (reads may be served by spares that never had
        /// it). Check what the container holds afterwards.
        #[arg(long)]
        status: String,
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
    println!("container {} ({})  type {}  class {}  rf {}  snapshots {}  status {}", c.label, c.id, c.ctype.name(), c.oclass, c.rf, c.snapshots.len(), status_line(&c.status));
}

/// `healthy`, or `unclean (why)`.
pub fn status_line(s: &ContStatus) -> String {
    match s {
        ContStatus::Healthy => "healthy".into(),
        ContStatus::Unclean(why) => format!("unclean ({why})"),
    }
}

pub fn run(c: ContCommand) -> anyhow::Result<()> {
    block_on(async move {
        match c {
            ContCommand::Create { pool, label, ctype, oclass, rf, conn } => {
                let ctype: ContType = ctype.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                // By default a container promises what its class delivers, so a failure the
                // class survives does not make it unclean. (A bad class is refused by the
                // management service, with its message.)
                let class_rf = oclass.parse::<strata_types::ObjectClass>().map_or(0, |c| c.redundancy_factor());
                let rf = rf.unwrap_or(class_rf.min(u8::MAX.into()) as u8);
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
                let MgmtReply::Cont(info) = conn.query(MgmtQuery::Cont { pool: pool.clone(), cont }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info, |c| {
                    print_cont(c);
                    if let ContStatus::Unclean(_) = c.status {
                        println!("  objects may be lost; `strata cont set-prop {pool} {} --status healthy` accepts that and lets clients open it again", c.label);
                    }
                    for (n, e) in &c.snapshots {
                        println!("  snapshot {n} at epoch {e}");
                    }
                })
            }
            ContCommand::SetProp { pool, cont, status, conn } => {
                anyhow::ensure!(status == "healthy", "--status takes only 'healthy' (the management service marks containers unclean itself)");
                let MgmtReply::Cont(info) = conn.write(MgmtCmd::ContMarkHealthy { pool, cont }).await? else { anyhow::bail!("unexpected reply") };
                emit(conn.json, &info, print_cont)
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
