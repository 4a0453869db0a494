//! `strata`: the one binary. Each command group lives in its own module; this file only
//! parses the command line and dispatches. Exit codes: 0 ok, 1 error, 2 usage.

use clap::{Parser, Subcommand};

// Engines allocate per request (frames, rows, futures); glibc malloc cost ~20% of their CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench_fs;
mod bench_block;
mod bench_kv;
mod bench_obj;
mod bench_rebuild;
mod block_cmd;
mod bench_vos;
mod cluster_cmd;
mod cont_cmd;
mod etcd_peer;
mod fio;
mod fs_cmd;
mod kv_cmd;
mod obj_cmd;
mod output;
mod pool_cmd;
mod proc_stats;
mod server;
mod sim_placement;
mod system_cmd;
mod up;
mod vos_cmd;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a distributed, versioned object store with KV, POSIX and block personalities",
    long_about = "Strata stores objects (128-bit ids, dkey/akey, replication or erasure coding across \
fault domains) and offers a transactional KV store, a FUSE file system and NBD block volumes on top.\n\n\
Start here:\n  strata up                  a local cluster (3 ranks) with a pool 'tank'\n  strata vos demo            versioned object store on this machine, step by step\n  \
strata sim placement       where shards land and how much moves when a target fails\n  \
strata bench vos           durable update rates vs fio on the same disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole cluster on this machine (ranks as child processes) and keep it running.
    Up(up::Args),
    /// Run one rank (a server process): management service if an access point, and its targets.
    Server(server::Args),
    /// Ranks and the management service.
    #[command(subcommand)]
    System(system_cmd::SystemCommand),
    /// Pools: create, list, query, destroy, exclude, reintegrate, drain, extend.
    #[command(subcommand)]
    Pool(pool_cmd::PoolCommand),
    /// Containers and snapshots.
    #[command(subcommand)]
    Cont(cont_cmd::ContCommand),
    /// Objects: create, put, get, punch, list.
    #[command(subcommand)]
    Obj(obj_cmd::ObjCommand),
    /// The node-local versioned object store (one target), for inspection and demos.
    #[command(subcommand)]
    Vos(vos_cmd::VosCommand),
    /// Simulations that need no cluster (placement balance and movement).
    #[command(subcommand)]
    Sim(SimCommand),
    /// Transactional KV stores: get, put, del, cas, scan, txn, snapshots.
    #[command(subcommand)]
    Kv(kv_cmd::KvCommand),
    /// Benchmarks that print figures and the ratio to a baseline run in the same invocation.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// POSIX volumes: mount with FUSE, unmount, file layouts (exNode), reads at a snapshot.
    #[command(subcommand)]
    Fs(fs_cmd::FsCommand),
    /// Block volumes: create, list, info, resize, delete, snapshot, clone, rollback, nbd.
    #[command(subcommand)]
    Block(block_cmd::BlockCommand),
}

#[derive(Subcommand)]
enum SimCommand {
    /// Place objects on a simulated pool: balance, fraction moved on exclude/extend, layouts/s.
    Placement(sim_placement::Args),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Versioned object store on one target vs fio on the same file system.
    Vos(bench_vos::Args),
    /// Objects through a running cluster (any class, size, read/write) vs fio on the engines' disk.
    Obj(bench_obj::Args),
    /// The file system through FUSE: mdtest-style metadata and fio data vs bindfs.
    Fs(bench_fs::Args),
    /// Block volumes over NBD (fio's nbd engine) vs `nbdkit file` on the same disk.
    Block(bench_block::Args),
    /// KV puts/gets/transactions at 16 and 64 clients vs etcd (started here) and plain objects.
    Kv(bench_kv::Args),
    /// Two rebuilds on a cluster it starts: one alone (MiB/s vs fio), one under foreground writes (their rate during vs before).
    Rebuild(bench_rebuild::Args),
}

fn main() {
    // `strata pool query | head` ends quietly, like other Unix tools, instead of panicking on
    // a closed stdout.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(a) => up::run(a),
        Command::Server(a) => server::run(a),
        Command::System(c) => system_cmd::run(c),
        Command::Pool(c) => pool_cmd::run(c),
        Command::Cont(c) => cont_cmd::run(c),
        Command::Obj(c) => obj_cmd::run(c),
        Command::Vos(c) => vos_cmd::run(c),
        Command::Kv(c) => kv_cmd::run(c),
        Command::Sim(SimCommand::Placement(a)) => sim_placement::run(a),
        Command::Bench(BenchCommand::Vos(a)) => bench_vos::run(a),
        Command::Bench(BenchCommand::Obj(a)) => bench_obj::run(a),
        Command::Bench(BenchCommand::Fs(a)) => bench_fs::run(a),
        Command::Fs(c) => fs_cmd::run(c),
        Command::Bench(BenchCommand::Kv(a)) => bench_kv::run(a),
        Command::Bench(BenchCommand::Rebuild(a)) => bench_rebuild::run(a),
        Command::Block(c) => block_cmd::run(c),
        Command::Bench(BenchCommand::Block(a)) => bench_block::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
