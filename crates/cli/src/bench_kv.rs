//! `strata bench kv`: puts, gets and two-key transactions through the KV layer at several
//! client counts, against etcd (started here, fsync on, same client count, same value size)
//! and against plain object updates/fetches of the same keys, in one invocation, repeated,
//! with median ratios and the CPU each side used.

use crate::cluster_cmd::Conn;
use crate::etcd_peer::{Etcd, EtcdConn};
use crate::fio;
use crate::output::emit;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_client::ObjHandle;
use strata_kv::shard_map::ShardMap;
use strata_kv::{KvError, KvStore};
use strata_rpc::mgmt_msg::{ContType, MgmtCmd};
use strata_types::{ContId, ObjectClass, ObjectType, Oid};

/// Most clients one point may use.
const CLIENTS_MAX: usize = 1024;
/// Attempts one benchmark transaction makes before it counts as failed.
const TXN_ATTEMPTS_MAX: u32 = 100;

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent clients per point, comma separated.
    #[arg(long, default_value = "16,64", value_delimiter = ',')]
    clients: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Repetitions of every point (ratios are the median over them).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Keys the operations pick from (written before measuring).
    #[arg(long, default_value_t = 4096)]
    keys: u64,
    #[arg(long, default_value = "tank")]
    pool: String,
    /// Object class of the bench store and object (default: RP_3GX with 3+ ranks, else RP_2GX).
    /// etcd runs with as many members as the class has replicas (one for S*): the same number
    /// of fsynced copies per write.
    #[arg(long)]
    oclass: Option<String>,
    /// Skip the etcd comparison.
    #[arg(long)]
    no_etcd: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Clone, Serialize, Default)]
struct Sample {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU seconds per 1000 operations: of this client process, and of the peer's server
    /// process (etcd) when it is one process.
    client_cpu_ms_per_op: f64,
    server_cpu_ms_per_op: Option<f64>,
}

#[derive(Serialize)]
struct Point {
    clients: usize,
    op: &'static str,
    strata: Vec<Sample>,
    object: Vec<Sample>,
    etcd: Vec<Sample>,
    median_ops_per_sec: f64,
    median_p99_ms: f64,
    etcd_median_ops_per_sec: Option<f64>,
    etcd_median_p99_ms: Option<f64>,
    /// Median over repetitions of strata / etcd ops per second.
    etcd_ratio: Option<f64>,
    /// Median over repetitions of KV / plain-object ops per second.
    object_ratio: Option<f64>,
    targets: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    store: String,
    oclass: String,
    etcd_members: usize,
    value_bytes: usize,
    keys: u64,
    duration_secs: f64,
    reps: usize,
    points: Vec<Point>,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)] as f64 / 1000.0
}

fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

fn next(r: &mut u64) -> u64 {
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    *r
}

/// Run `op` from `clients` tasks for `dur`; each task owns the state `init` made for it.
async fn drive<S, I, IF, O, OF>(clients: usize, dur: Duration, server_cpu: Option<&dyn Fn() -> f64>, init: I, op: O) -> anyhow::Result<Sample>
where
    S: Send + 'static,
    I: Fn(usize) -> IF,
    IF: Future<Output = anyhow::Result<S>>,
    O: Fn(S) -> OF + Send + Sync + 'static,
    OF: Future<Output = anyhow::Result<S>> + Send,
{
    let mut states = Vec::with_capacity(clients);
    for i in 0..clients {
        states.push(init(i).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let op = Arc::new(op);
    let (cpu0, scpu0) = (fio::self_cpu_secs(), server_cpu.map(|f| f()));
    let start = Instant::now();
    let tasks: Vec<_> = states
        .into_iter()
        .map(|mut s| {
            let (stop, op) = (stop.clone(), op.clone());
            tokio::spawn(async move {
                let mut lat: Vec<u32> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    s = op(s).await?;
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok::<_, anyhow::Error>(lat)
            })
        })
        .collect();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let n = lat.len().max(1) as f64;
    Ok(Sample {
        ops_per_sec: lat.len() as f64 / elapsed,
        p50_ms: pct(&lat, 0.50),
        p99_ms: pct(&lat, 0.99),
        client_cpu_ms_per_op: (fio::self_cpu_secs() - cpu0) * 1000.0 / n,
        server_cpu_ms_per_op: server_cpu.zip(scpu0).map(|(f, c0)| (f() - c0) * 1000.0 / n),
    })
}

async fn kv_txn(kv: &KvStore, a: &[u8], b: &[u8], value: &[u8]) -> anyhow::Result<()> {
    for _ in 0..TXN_ATTEMPTS_MAX {
        let mut t = kv.begin();
        let r: Result<(), KvError> = async {
            t.get(a).await?;
            t.get(b).await?;
            t.put(a, value)?;
            t.put(b, value)?;
            t.commit().await.map(|_| ())
        }
        .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("a benchmark transaction conflicted {TXN_ATTEMPTS_MAX} times")
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    fio::median(v.into_iter().collect())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!a.clients.is_empty() && a.clients.iter().all(|c| (1..=CLIENTS_MAX).contains(c)), "--clients must be 1..={CLIENTS_MAX} each");
    anyhow::ensure!((1..=20).contains(&a.reps), "--reps must be 1..=20");
    anyhow::ensure!(a.duration > 0.0 && a.duration <= 600.0, "--duration must be in (0, 600] seconds");
    anyhow::ensure!(a.value_bytes <= strata_kv::VALUE_BYTES_MAX, "--value-bytes at most {}", strata_kv::VALUE_BYTES_MAX);
    anyhow::ensure!((2..=1_000_000).contains(&a.keys), "--keys must be 2..=1000000");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let class: ObjectClass = match &a.oclass {
        Some(c) => c.parse()?,
        None => {
            let ranks = rt.block_on(async { Ok::<_, anyhow::Error>(a.conn.client().await?.pool(&a.pool).await?.info()?.map.ranks().len()) })?;
            if ranks >= 3 { "RP_3GX" } else { "RP_2GX" }.parse()?
        }
    };
    // The same durability on both sides: as many etcd members (each fsyncing) as replicas.
    let members = match class.redundancy() {
        strata_types::Redundancy::Replicas(n) => n as usize,
        _ => 1,
    };
    let etcd = if a.no_etcd {
        None
    } else {
        let cluster = a.conn.cluster.clone().or_else(|| std::env::var_os("STRATA_CLUSTER").map(Into::into)).unwrap_or_else(strata_client::ClusterFile::default_path);
        // etcd's data goes next to the cluster's, on the same file system as the engines.
        let parent = cluster.parent().map(|p| p.to_path_buf()).unwrap_or_else(std::env::temp_dir);
        Some(Etcd::start(&parent, members)?)
    };
    let dur = Duration::from_secs_f64(a.duration);
    let value = Arc::new(vec![0x6bu8; a.value_bytes]);
    let report = rt.block_on(async {
        let client = a.conn.client().await?;
        let label = format!("bench-kv-{}", class.to_string().to_lowercase().replace('_', "-"));
        let props = BTreeMap::from([(strata_kv::PROP_OCLASS.to_owned(), class.to_string())]);
        // Reuse the store of an earlier run (AlreadyExists is fine).
        let _ = client.mgmt.write(MgmtCmd::ContCreate { id: ContId::new_random(), pool: a.pool.clone(), label: label.clone(), ctype: ContType::Kv, oclass: class.to_string(), rf: class.redundancy_factor() as u8, props }).await;
        let cont = client.container(&a.pool, &label).await.context("opening the bench store")?;
        let kv = KvStore::open(&cont).await?;
        let map = kv.shard_map().clone();
        // Engines on this machine (a `strata up` cluster) have their CPU counted like etcd's.
        let info = client.pool(&a.pool).await?.info()?;
        let engine_pids = crate::proc_stats::local_listener_pids(info.rank_addrs.values().map(String::as_str));
        let engines_cpu = || engine_pids.iter().map(|&p| crate::proc_stats::proc_cpu_secs(p)).sum::<f64>();
        let engines_cpu: Option<&dyn Fn() -> f64> = (!engine_pids.is_empty()).then_some(&engines_cpu);
        // The same keys as plain object updates: one object of the same class, dkey = the
        // key's shard, akey = the key (what the KV layer stores, minus transactions).
        let obj: ObjHandle = cont.object(Oid::new(ObjectType::Plain, class, 1 << 94));
        let prefill = |i: u64| {
            let (kv, obj, value, map) = (kv.clone(), obj.clone(), value.clone(), map.clone());
            async move {
                let k = key(i);
                kv.put(&k, &value).await?;
                obj.put(&ShardMap::shard_dkey(map.shard_of(&k)), &k, &value).await?;
                Ok::<_, anyhow::Error>(())
            }
        };
        let bar = (!a.conn.json).then(|| indicatif::ProgressBar::new(a.keys).with_message("writing keys"));
        for chunk in (0..a.keys).collect::<Vec<_>>().chunks(64) {
            let tasks: Vec<_> = chunk.iter().map(|&i| tokio::spawn(prefill(i))).collect();
            for t in tasks {
                t.await??;
            }
            if let Some(b) = &bar {
                b.inc(chunk.len() as u64);
            }
        }
        if let Some(e) = &etcd {
            let mut c = EtcdConn::connect(&e.addrs[0]).await?;
            for i in 0..a.keys {
                c.put(&key(i), &value).await?;
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let keys = a.keys;
        let mut points = Vec::new();
        for &clients in &a.clients {
            for op in ["put", "get", "txn"] {
                let mut p = Point { clients, op, strata: vec![], object: vec![], etcd: vec![], median_ops_per_sec: 0.0, median_p99_ms: 0.0, etcd_median_ops_per_sec: None, etcd_median_p99_ms: None, etcd_ratio: None, object_ratio: None, targets: vec![] };
                for rep in 0..a.reps {
                    if !a.conn.json {
                        eprint!("\r{clients} clients, {op}, repetition {}/{}   ", rep + 1, a.reps);
                    }
                    let seed = |i: usize| 0x9e37_79b9_7f4a_7c15u64 ^ ((i as u64 + 1) << 20) ^ rep as u64;
                    // Strata KV.
                    let (kv2, v2) = (kv.clone(), value.clone());
                    let s = drive(clients, dur, engines_cpu, |i| { let kv = kv2.clone(); let v = v2.clone(); async move { Ok((kv, v, seed(i))) } }, move |(kv, v, mut r)| async move {
                        let k = key(next(&mut r) % keys);
                        match op {
                            "put" => drop(kv.put(&k, &v).await?),
                            "get" => drop(kv.get(&k).await?),
                            _ => {
                                let k2 = key(next(&mut r) % keys);
                                if k2 != k {
                                    kv_txn(&kv, &k, &k2, &v).await?;
                                }
                            }
                        }
                        Ok((kv, v, r))
                    })
                    .await?;
                    p.strata.push(s);
                    // Plain objects (no transactions to compare with).
                    if op != "txn" {
                        let (o2, v2, m2) = (obj.clone(), value.clone(), map.clone());
                        let s = drive(clients, dur, engines_cpu, |i| { let (o, v, m) = (o2.clone(), v2.clone(), m2.clone()); async move { Ok((o, v, m, seed(i))) } }, move |(o, v, m, mut r)| async move {
                            let k = key(next(&mut r) % keys);
                            let d = ShardMap::shard_dkey(m.shard_of(&k));
                            if op == "put" {
                                o.put(&d, &k, &v).await?;
                            } else {
                                o.get(&d, &k).await?;
                            }
                            Ok((o, v, m, r))
                        })
                        .await?;
                        p.object.push(s);
                    }
                    if let Some(e) = &etcd {
                        let (addrs, v2) = (e.addrs.clone(), value.clone());
                        let cpu = || e.cpu_secs();
                        // Clients spread over the members, as etcd clients balance endpoints.
                        let s = drive(clients, dur, Some(&cpu), |i| { let (addr, v) = (addrs[i % addrs.len()].clone(), v2.clone()); async move { Ok((EtcdConn::connect(&addr).await?, v, seed(i))) } }, move |(mut c, v, mut r)| async move {
                            let k = key(next(&mut r) % keys);
                            match op {
                                "put" => c.put(&k, &v).await?,
                                "get" => drop(c.get(&k).await?),
                                _ => {
                                    let k2 = key(next(&mut r) % keys);
                                    if k2 != k {
                                        c.transfer(&k, &k2, &v).await?;
                                    }
                                }
                            }
                            Ok((c, v, r))
                        })
                        .await?;
                        p.etcd.push(s);
                    }
                }
                p.median_ops_per_sec = median(p.strata.iter().map(|s| s.ops_per_sec));
                p.median_p99_ms = median(p.strata.iter().map(|s| s.p99_ms));
                if !p.etcd.is_empty() {
                    p.etcd_median_ops_per_sec = Some(median(p.etcd.iter().map(|s| s.ops_per_sec)));
                    p.etcd_median_p99_ms = Some(median(p.etcd.iter().map(|s| s.p99_ms)));
                    p.etcd_ratio = Some(median(p.strata.iter().zip(&p.etcd).map(|(s, e)| s.ops_per_sec / e.ops_per_sec.max(f64::MIN_POSITIVE))));
                }
                if !p.object.is_empty() {
                    p.object_ratio = Some(median(p.strata.iter().zip(&p.object).map(|(s, o)| s.ops_per_sec / o.ops_per_sec.max(f64::MIN_POSITIVE))));
                }
                let mut target = |what: String, met: bool| p.targets.push(format!("{what}: {}", if met { "met" } else { "NOT met" }));
                match op {
                    "put" => {
                        if let Some(r) = p.etcd_ratio {
                            target(format!("puts >= 2x etcd ({r:.2}x)"), r >= 2.0);
                        }
                        if let Some(r) = p.object_ratio {
                            target(format!("puts >= 0.8x plain objects ({r:.2}x)"), r >= 0.8);
                        }
                    }
                    "get" => {
                        if let Some(r) = p.etcd_ratio {
                            target(format!("gets >= 3x etcd ({r:.2}x)"), r >= 3.0);
                        }
                        if let Some(r) = p.object_ratio {
                            target(format!("gets >= 1.0x plain objects ({r:.2}x)"), r >= 1.0);
                        }
                    }
                    _ => {}
                }
                points.push(p);
            }
        }
        if !a.conn.json {
            eprint!("\r{:60}\r", "");
        }
        Ok::<_, anyhow::Error>(Report { store: format!("{}/{label}", a.pool), oclass: class.to_string(), etcd_members: if a.no_etcd { 0 } else { members }, value_bytes: a.value_bytes, keys: a.keys, duration_secs: a.duration, reps: a.reps, points })
    })?;
    drop(etcd);
    emit(a.conn.json, &report, |r| {
        println!("strata bench kv: store {} ({}), etcd with {} member(s), {} B values over {} keys, {} x {:.0} s per point; medians", r.store, r.oclass, r.etcd_members, r.value_bytes, r.keys, r.reps, r.duration_secs);
        println!("{:>7} {:>4} | {:>9} {:>8} {:>7} | {:>9} {:>8} {:>7} | {:>6} | {:>9} {:>6}", "clients", "op", "kv ops/s", "p99 ms", "cpu/op", "etcd op/s", "p99 ms", "cpu/op", "ratio", "obj ops/s", "kv/obj");
        for p in &r.points {
            let cpu = |v: &[Sample]| median(v.iter().map(|s| s.client_cpu_ms_per_op + s.server_cpu_ms_per_op.unwrap_or(0.0)));
            let opt = |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
            println!(
                "{:>7} {:>4} | {:>9.0} {:>8.2} {:>7.3} | {:>9} {:>8} {:>7} | {:>6} | {:>9} {:>6}",
                p.clients,
                p.op,
                p.median_ops_per_sec,
                p.median_p99_ms,
                cpu(&p.strata),
                opt(p.etcd_median_ops_per_sec, 0),
                opt(p.etcd_median_p99_ms, 2),
                if p.etcd.is_empty() { "-".into() } else { format!("{:.3}", cpu(&p.etcd)) },
                opt(p.etcd_ratio, 2),
                if p.object.is_empty() { "-".into() } else { format!("{:.0}", median(p.object.iter().map(|s| s.ops_per_sec))) },
                opt(p.object_ratio, 2),
            );
        }
        println!("cpu/op: ms of CPU per operation, the client's (this process) plus the servers' (etcd's members; Strata's engines when they run on this machine)");
        for p in &r.points {
            for t in &p.targets {
                println!("target ({} clients): {t}", p.clients);
            }
        }
    })?;
    Ok(())
}
