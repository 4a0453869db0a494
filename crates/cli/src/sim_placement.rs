//! `strata sim placement`: place many objects on a simulated pool and report balance, how much
//! moves when targets are excluded or ranks added, and layout speed. No cluster needed.

use crate::output::emit;
use serde::Serialize;
use std::time::Instant;
use strata_placement::{PlacementMap, PoolMap, TargetState};
use strata_types::{ObjectClass, ObjectType, Oid, TargetId};

#[derive(clap::Args)]
pub struct Args {
    /// Ranks (engines) in the simulated pool.
    #[arg(long, default_value_t = 100)]
    ranks: u32,
    /// Targets per rank.
    #[arg(long, default_value_t = 8)]
    targets: u16,
    /// Hosts the ranks are spread over (fault domains); default: one host per rank.
    #[arg(long)]
    hosts: Option<u32>,
    /// Objects to place.
    #[arg(long, default_value_t = 1_000_000)]
    objects: u64,
    /// Object class, e.g. S1, RP_3G1, EC_4P2GX.
    #[arg(long, default_value = "S1")]
    oclass: String,
    /// Exclude this many targets (spread over the pool) and measure what moves.
    #[arg(long, default_value_t = 0)]
    exclude: u32,
    /// Add this many ranks (extend) and measure what moves.
    #[arg(long, default_value_t = 0)]
    extend: u32,
    /// Objects sampled for the movement measurements (default: all, at most 2,000,000).
    #[arg(long)]
    sample: Option<u64>,
    /// Threads to place with.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also measure layouts/s per core for RP_3G1 at 1,000 and 100,000 targets.
    #[arg(long)]
    bench: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default)]
struct Report {
    ranks: u32,
    targets_per_rank: u16,
    hosts: u32,
    objects: u64,
    oclass: String,
    shards: u64,
    seconds: f64,
    layouts_per_sec: f64,
    layouts_per_sec_per_core: f64,
    max_over_mean: f64,
    ideal_random_max_over_mean: f64,
    balance_vs_ideal_pct: f64,
    exclude: Option<Movement>,
    extend: Option<Movement>,
    bench: Vec<BenchPoint>,
}

#[derive(Serialize)]
struct Movement {
    changed_targets: u32,
    sampled_objects: u64,
    shards_moved: u64,
    fraction_moved: f64,
    ideal_fraction: f64,
    ratio_to_ideal: f64,
    /// Shards that moved although their target did not change state (must be 0 on exclude).
    collateral_moves: u64,
}

#[derive(Serialize)]
struct BenchPoint {
    targets: u32,
    oclass: String,
    layouts_per_sec_per_core: f64,
    target: f64,
    met: bool,
}

fn target_index(t: TargetId, per_rank: u16) -> usize {
    t.rank.0 as usize * per_rank as usize + t.index as usize
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Per-target shard counts for objects `0..n`, placed in parallel.
fn loads(map: &PlacementMap, class: ObjectClass, n: u64, threads: usize, targets: usize, per_rank: u16) -> anyhow::Result<Vec<u64>> {
    let threads = threads.max(1) as u64;
    let parts: Vec<anyhow::Result<Vec<u64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let mut load = vec![0u64; targets];
                    let mut seq = t;
                    while seq < n {
                        let l = map.layout(Oid::new(ObjectType::Array, class, seq as u128))?;
                        for sh in l.shards() {
                            load[target_index(sh.target, per_rank)] += 1;
                        }
                        seq += threads;
                    }
                    Ok(load)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("placement thread panicked")))).collect()
    });
    let mut total = vec![0u64; targets];
    for p in parts {
        for (a, b) in total.iter_mut().zip(p?) {
            *a += b;
        }
    }
    Ok(total)
}

fn max_over_mean(load: &[u64]) -> f64 {
    let sum: u64 = load.iter().sum();
    let mean = sum as f64 / load.len().max(1) as f64;
    load.iter().copied().max().unwrap_or(0) as f64 / mean.max(f64::MIN_POSITIVE)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let class: ObjectClass = a.oclass.parse()?;
    anyhow::ensure!(a.ranks > 0 && a.targets > 0, "--ranks and --targets must be at least 1");
    let hosts = a.hosts.unwrap_or(a.ranks).max(1);
    let pm = PoolMap::uniform(a.ranks, a.targets, hosts);
    let map = PlacementMap::new(&pm, false);
    let ntargets = pm.targets.len();
    let mut r = Report { ranks: a.ranks, targets_per_rank: a.targets, hosts, objects: a.objects, oclass: class.to_string(), ..Default::default() };

    let t0 = Instant::now();
    let load = loads(&map, class, a.objects, a.threads, ntargets, a.targets)?;
    r.seconds = t0.elapsed().as_secs_f64();
    r.shards = load.iter().sum();
    r.layouts_per_sec = a.objects as f64 / r.seconds;
    r.layouts_per_sec_per_core = r.layouts_per_sec / a.threads.clamp(1, std::thread::available_parallelism().map_or(1, |n| n.get())) as f64;
    r.max_over_mean = max_over_mean(&load);
    // The same number of shards thrown uniformly at random: what ideal hashing would give.
    let mut ideal = vec![0u64; ntargets];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..r.shards {
        ideal[(xorshift(&mut x) % ntargets as u64) as usize] += 1;
    }
    r.ideal_random_max_over_mean = max_over_mean(&ideal);
    r.balance_vs_ideal_pct = (r.max_over_mean / r.ideal_random_max_over_mean - 1.0) * 100.0;

    let sample = a.sample.unwrap_or(a.objects.min(2_000_000)).min(a.objects);
    if a.exclude > 0 {
        let mut down = pm.clone();
        let step = (ntargets / a.exclude as usize).max(1);
        let victims: Vec<TargetId> = (0..a.exclude as usize).map(|i| pm.targets[(i * step) % ntargets].id).collect();
        for v in &victims {
            down.set_state(*v, TargetState::Down)?;
        }
        let after = PlacementMap::new(&down, false);
        let (mut moved, mut total, mut on_victims, mut collateral) = (0u64, 0u64, 0u64, 0u64);
        for seq in 0..sample {
            let o = Oid::new(ObjectType::Array, class, seq as u128);
            let (x, y) = (map.layout(o)?, after.layout(o)?);
            for (s0, s1) in x.shards().iter().zip(y.shards()) {
                total += 1;
                let was_victim = victims.contains(&s0.target);
                on_victims += was_victim as u64;
                if s0.target != s1.target {
                    moved += 1;
                    collateral += (!was_victim) as u64;
                }
            }
        }
        let frac = moved as f64 / total.max(1) as f64;
        let ideal = on_victims as f64 / total.max(1) as f64;
        r.exclude = Some(Movement { changed_targets: a.exclude, sampled_objects: sample, shards_moved: moved, fraction_moved: frac, ideal_fraction: ideal, ratio_to_ideal: frac / ideal.max(f64::MIN_POSITIVE), collateral_moves: collateral });
    }
    if a.extend > 0 {
        let mut grown = pm.clone();
        let bigger = PoolMap::uniform(a.ranks + a.extend, a.targets, hosts + a.extend * hosts / a.ranks.max(1));
        grown.add_targets(bigger.targets[ntargets..].to_vec())?;
        let old = PlacementMap::new(&grown, false);
        let new = PlacementMap::new(&grown, true);
        let (mut moved, mut total) = (0u64, 0u64);
        for seq in 0..sample {
            let o = Oid::new(ObjectType::Array, class, seq as u128);
            moved += strata_placement::diff_layouts(&old, &new, o)?.len() as u64;
            total += old.layout(o)?.shards().len() as u64;
        }
        let added = grown.targets.len() - ntargets;
        let frac = moved as f64 / total.max(1) as f64;
        let ideal = added as f64 / grown.targets.len() as f64;
        r.extend = Some(Movement { changed_targets: added as u32, sampled_objects: sample, shards_moved: moved, fraction_moved: frac, ideal_fraction: ideal, ratio_to_ideal: frac / ideal, collateral_moves: 0 });
    }
    if a.bench {
        let rp3: ObjectClass = "RP_3G1".parse()?;
        for (ranks, per, goal) in [(100u32, 10u16, 1_000_000.0), (10_000, 10, 300_000.0)] {
            let m = PlacementMap::new(&PoolMap::uniform(ranks, per, ranks), false);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < 1.0 {
                for _ in 0..10_000 {
                    std::hint::black_box(m.layout(Oid::new(ObjectType::Array, rp3, n as u128))?);
                    n += 1;
                }
            }
            let rate = n as f64 / start.elapsed().as_secs_f64();
            r.bench.push(BenchPoint { targets: ranks * per as u32, oclass: "RP_3G1".into(), layouts_per_sec_per_core: rate, target: goal, met: rate >= goal });
        }
    }
    emit(a.json, &r, |r| {
        println!("pool: {} ranks x {} targets on {} hosts ({} targets); {} objects of {}", r.ranks, r.targets_per_rank, r.hosts, ntargets, r.objects, r.oclass);
        println!("placed {} shards in {:.2} s: {:.0} layouts/s ({:.0} per core)", r.shards, r.seconds, r.layouts_per_sec, r.layouts_per_sec_per_core);
        println!("balance: most loaded target holds {:.3} x the mean; ideal random hashing: {:.3} x ({:+.1}%)", r.max_over_mean, r.ideal_random_max_over_mean, r.balance_vs_ideal_pct);
        if let Some(m) = &r.exclude {
            println!("exclude {} targets: {:.4}% of shards moved, ideal {:.4}% ({:.2}x); shards moved off healthy targets: {}", m.changed_targets, m.fraction_moved * 100.0, m.ideal_fraction * 100.0, m.ratio_to_ideal, m.collateral_moves);
        }
        if let Some(m) = &r.extend {
            println!("extend by {} targets: {:.3}% of shards moved, ideal {:.3}% ({:.2}x, bar 1.3x)", m.changed_targets, m.fraction_moved * 100.0, m.ideal_fraction * 100.0, m.ratio_to_ideal);
        }
        for b in &r.bench {
            println!("layouts/s per core, {} at {} targets: {:.0} (target {:.0}: {})", b.oclass, b.targets, b.layouts_per_sec_per_core, b.target, if b.met { "met" } else { "NOT met" });
        }
    })
}
