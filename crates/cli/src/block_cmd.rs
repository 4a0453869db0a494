//! `strata block`: block volumes (create, list, info, resize, delete, snapshot, clone,
//! rollback) and `strata block nbd`, the NBD server that exports them.

use crate::cluster_cmd::{pool_cont, Conn};
use crate::output::{emit, human_bytes, parse_size};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;
use strata_block::volume_meta::split_snap;
use strata_block::writer_lease::WRITER_LEASE_TTL_MS_DEFAULT;
use strata_block::{BlockContainer, NbdLimits, VolumeExports, VolumeMeta};
use strata_types::ObjectClass;

#[derive(clap::Subcommand)]
pub enum BlockCommand {
    /// Create a volume in a block container (`strata cont create POOL CONT --type block`).
    Create {
        /// POOL/CONTAINER
        cont: String,
        name: String,
        /// Size: 10G, 512M, ... (a multiple of 512 bytes).
        size: String,
        /// Bytes per block (one dkey each): a power of two from 4K to 16M.
        #[arg(long, default_value = "512K")]
        block_size: String,
        /// Object class of its data (default: the container's): RP_3GX, EC_4P2GX, S1, ...
        #[arg(long)]
        oclass: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Volumes of a container.
    List {
        cont: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// One volume: size, class, layers, parent, snapshots.
    Info {
        cont: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Grow a volume; shrinking destroys data past the new end and needs --force.
    Resize {
        cont: String,
        name: String,
        size: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a volume and its snapshots (refused while it has clones or a writer).
    Delete {
        cont: String,
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Take a snapshot NAME@SNAP (or delete one with --delete).
    Snapshot {
        cont: String,
        /// VOLUME@SNAPSHOT
        target: String,
        #[arg(long)]
        delete: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// A new volume that starts as NAME@SNAP and reads through to it until written.
    Clone {
        cont: String,
        /// VOLUME@SNAPSHOT
        source: String,
        new_name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a volume read as one of its snapshots again (refused while it has a writer).
    Rollback {
        cont: String,
        /// VOLUME@SNAPSHOT
        target: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Export volumes over NBD until interrupted. Export names are the volume names;
    /// VOLUME@SNAPSHOT exports a snapshot read-only. One server at a time may write a volume.
    Nbd(NbdArgs),
}

#[derive(clap::Args)]
pub struct NbdArgs {
    /// POOL/CONTAINER
    cont: String,
    /// Volumes (or VOLUME@SNAPSHOT) to export; the first is the default export.
    #[arg(required = true)]
    names: Vec<String>,
    /// TCP address to listen on (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:10809", conflicts_with = "socket")]
    listen: String,
    /// Listen on a Unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Export read-only (any number of read-only servers may export a volume).
    #[arg(long)]
    read_only: bool,
    /// Writer lease time-to-live: how long a crashed server keeps others from writing.
    #[arg(long, default_value_t = WRITER_LEASE_TTL_MS_DEFAULT)]
    lease_ttl_ms: u64,
    /// Write-back cache per writable export: most dirty bytes held before writes wait
    /// (default 1/16 of memory, at most 1G). Writes are acknowledged from it and durable
    /// after FLUSH or with FUA, as NBD allows; a crash loses what was written since the last
    /// FLUSH, as a disk's volatile cache or the page cache under `nbdkit file` would. 0 makes
    /// every write durable before its reply.
    #[arg(long)]
    cache_dirty_max: Option<String>,
    /// Read cache per export: clean 64 KiB chunks kept in memory (a miss reads its whole
    /// chunk; chunks written whole are kept). Kept for writable exports (the writer lease keeps
    /// other writers out) and snapshots, not for --read-only exports of a volume another
    /// server writes; 0 keeps none.
    #[arg(long, default_value = "1G")]
    cache_clean_max: String,
    #[command(flatten)]
    conn: Conn,
}

fn print_volume(v: &VolumeMeta) {
    let parent = v.parent.as_ref().map(|p| format!("  clone of {}@{}", p.volume, p.snapshot)).unwrap_or_default();
    println!("{}  {}  class {}  blocks {} KiB  snapshots {}{parent}", v.name, human_bytes(v.size_bytes), v.oclass, v.block_bytes >> 10, v.snapshots.len());
}

fn snap_arg(s: &str) -> anyhow::Result<(&str, &str)> {
    split_snap(s).with_context(|| format!("'{s}' must be VOLUME@SNAPSHOT"))
}

async fn open(conn: &Conn, cont: &str) -> anyhow::Result<BlockContainer> {
    let (pool, c) = pool_cont(cont)?;
    let client = conn.client().await?;
    Ok(BlockContainer::open(&client, &pool, &c).await?)
}

pub fn run(c: BlockCommand) -> anyhow::Result<()> {
    if let BlockCommand::Nbd(a) = c {
        return run_nbd(a);
    }
    crate::cluster_cmd::block_on(async move {
        match c {
            BlockCommand::Create { cont, name, size, block_size, oclass, conn } => {
                let size = parse_size(&size)?;
                let bs = parse_size(&block_size)?;
                anyhow::ensure!(bs <= u32::MAX as u64, "--block-size {block_size} is too large");
                let class = oclass.map(|o| o.parse::<ObjectClass>()).transpose()?;
                let v = open(&conn, &cont).await?.create(&name, size, bs as u32, class).await?;
                emit(conn.json, &v, print_volume)
            }
            BlockCommand::List { cont, conn } => {
                let list = open(&conn, &cont).await?.list().await?;
                emit(conn.json, &list, |l| {
                    if l.is_empty() {
                        println!("no volumes; create one with `strata block create {cont} NAME SIZE`");
                    }
                    for v in l {
                        print_volume(v);
                    }
                })
            }
            BlockCommand::Info { cont, name, conn } => {
                let v = open(&conn, &cont).await?.get(&name).await?;
                emit(conn.json, &v, |v| {
                    print_volume(v);
                    for (i, l) in v.layers.iter().enumerate() {
                        let at = l.epoch.map(|e| format!("at epoch {e}")).unwrap_or_else(|| "newest".into());
                        println!("  layer {i}: object {} {at}, visible below {}", l.oid, human_bytes(l.limit_bytes));
                    }
                    for (n, s) in &v.snapshots {
                        println!("  snapshot {n}: epoch {}, {}", s.epoch, human_bytes(s.size_bytes));
                    }
                })
            }
            BlockCommand::Resize { cont, name, size, force, conn } => {
                let v = open(&conn, &cont).await?.resize(&name, parse_size(&size)?, force).await?;
                emit(conn.json, &v, print_volume)
            }
            BlockCommand::Delete { cont, name, conn } => {
                open(&conn, &cont).await?.delete(&name).await?;
                emit(conn.json, &serde_json::json!({ "deleted": name }), |_| println!("volume {name} deleted"))
            }
            BlockCommand::Snapshot { cont, target, delete, conn } => {
                let (vol, snap) = snap_arg(&target)?;
                let bc = open(&conn, &cont).await?;
                if delete {
                    bc.snapshot_delete(vol, snap).await?;
                    return emit(conn.json, &serde_json::json!({ "deleted": target }), |_| println!("snapshot {target} deleted"));
                }
                let s = bc.snapshot(vol, snap).await?;
                emit(conn.json, &s, |s| println!("snapshot {target} at epoch {} ({})", s.epoch, human_bytes(s.size_bytes)))
            }
            BlockCommand::Clone { cont, source, new_name, conn } => {
                let (vol, snap) = snap_arg(&source)?;
                let v = open(&conn, &cont).await?.clone_volume(vol, snap, &new_name).await?;
                emit(conn.json, &v, print_volume)
            }
            BlockCommand::Rollback { cont, target, conn } => {
                let (vol, snap) = snap_arg(&target)?;
                let v = open(&conn, &cont).await?.rollback(vol, snap).await?;
                emit(conn.json, &v, |v| {
                    println!("volume {} now reads as {target}", v.name);
                })
            }
            BlockCommand::Nbd(_) => unreachable!("handled above"),
        }
    })
}

fn run_nbd(a: NbdArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let bc = open(&a.conn, &a.cont).await?;
        let cache = strata_block::CacheConfig { dirty_bytes_max: match &a.cache_dirty_max {
                Some(s) => parse_size(s)?,
                None => strata_block::write_cache::cache_dirty_bytes_max_default(),
            }, clean_bytes_max: parse_size(&a.cache_clean_max)?, ..Default::default() };
        let exports = Arc::new(VolumeExports::new(bc, a.names.clone(), a.read_only, a.lease_ttl_ms, cache).await?);
        let (serve, uris): (futures_like::Serve, Vec<String>) = if let Some(path) = &a.socket {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
            let uris = a.names.iter().map(|n| format!("nbd+unix:///{n}?socket={}", path.display())).collect();
            (Box::pin(strata_block::nbd_server::serve_unix(l, exports.clone(), NbdLimits::default())), uris)
        } else {
            let l = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("listening on {}", a.listen))?;
            let addr = l.local_addr()?;
            let uris = a.names.iter().map(|n| format!("nbd://{addr}/{n}")).collect();
            (Box::pin(strata_block::nbd_server::serve_tcp(l, exports.clone(), NbdLimits::default())), uris)
        };
        emit(a.conn.json, &serde_json::json!({ "exports": a.names, "uris": uris, "read_only": a.read_only }), |_| {
            for u in &uris {
                println!("serving {u}{}", if a.read_only { " (read-only)" } else { "" });
            }
        })?;
        use std::io::Write;
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = serve => r.context("NBD listener failed")?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        exports.release_all().await;
        if let Some(p) = &a.socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    })
}

mod futures_like {
    pub type Serve = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;
}
