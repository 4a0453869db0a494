//! `strata`: the one binary. Each command group lives in its own module; this file only
//! parses the command line and dispatches. Exit codes: 0 ok, 1 error, 2 usage.

use clap::{Parser, Subcommand};

mod bench_vos;
mod fio;
mod output;
mod sim_placement;
mod vos_cmd;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a distributed, versioned object store with KV, POSIX and block personalities",
    long_about = "Strata stores objects (128-bit ids, dkey/akey, replication or erasure coding across \
fault domains) and offers a transactional KV store, a FUSE file system and NBD block volumes on top.\n\n\
Start here:\n  strata vos demo            versioned object store on this machine, step by step\n  \
strata sim placement       where shards land and how much moves when a target fails\n  \
strata bench vos           durable update rates vs fio on the same disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node-local versioned object store (one target), for inspection and demos.
    #[command(subcommand)]
    Vos(vos_cmd::VosCommand),
    /// Simulations that need no cluster (placement balance and movement).
    #[command(subcommand)]
    Sim(SimCommand),
    /// Benchmarks that print figures and the ratio to a baseline run in the same invocation.
    #[command(subcommand)]
    Bench(BenchCommand),
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vos(c) => vos_cmd::run(c),
        Command::Sim(SimCommand::Placement(a)) => sim_placement::run(a),
        Command::Bench(BenchCommand::Vos(a)) => bench_vos::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
