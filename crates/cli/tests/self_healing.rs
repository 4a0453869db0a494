//! Self-healing with real processes: erasure-coded and replicated objects are rebuilt after a
//! SIGKILLed rank (EC cells decoded from k survivors), so later failures within the redundancy
//! lose nothing, also when a rank dies while rebuild runs (and a third after that); scrub finds a
//! corrupted replica and repairs it. More fault domains failed at once than a container's
//! redundancy factor make it unclean: refused (capability-only reads too), not read as absent,
//! until an administrator accepts it; ranks of one host count once.

mod common;

use common::{misplaced_rows, poll, reclaimed, watch_progress, Cluster, Rng};
use std::sync::Arc;
use std::time::Duration;
use strata_client::{Client, ClusterFile, ObjHandle};

const CLASSES: [&str; 4] = ["RP_2G1", "RP_3G1", "EC_2P1G1", "EC_4P2GX"];

fn value(class: usize, i: usize) -> Vec<u8> {
    format!("{}-object{i}-", CLASSES[class]).repeat(1 + i % 5).into_bytes()
}

/// Array bytes of object `i`: a few KiB at an offset that makes the EC path read-modify-write
/// a partial stripe and, for some objects, span two cells.
fn extent(class: usize, i: usize) -> (u64, Vec<u8>) {
    let offset = (i as u64 * 7919) % (200 << 10);
    let len = 1000 + (i * 613) % 6000;
    (offset, (0..len).map(|j| (j as u8) ^ (i as u8) ^ (class as u8 * 17)).collect())
}

/// How many objects of each class carry array data (EC cells cost a full cell per shard).
const WITH_EXTENT: usize = 300;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Run `f(i, object)` for every object, 64 at a time.
async fn in_batches<F, Fut>(objs: &[ObjHandle], f: F)
where
    F: Fn(usize, ObjHandle) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    for (c, chunk) in objs.chunks(64).enumerate() {
        let tasks: Vec<_> = chunk.iter().cloned().enumerate().map(|(j, o)| tokio::spawn(f(c * 64 + j, o))).collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

async fn write_all(objs: &[ObjHandle], class: usize) {
    in_batches(objs, move |i, o| async move {
        o.put(b"d", b"a", &value(class, i)).await.unwrap();
        if i < WITH_EXTENT {
            let (off, data) = extent(class, i);
            o.write(b"arr", b"x", off, &data).await.unwrap();
        }
    })
    .await;
}

async fn check_all(objs: &[ObjHandle], class: usize, after: &'static str) {
    in_batches(objs, move |i, o| async move {
        let got = o.get(b"d", b"a").await.unwrap_or_else(|e| panic!("{} object {i} unreadable after {after}: {e}", CLASSES[class]));
        if got.as_deref() != Some(&value(class, i)[..]) {
            let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
            let again = o.get(b"d", b"a").await.ok().flatten();
            panic!("{} object {i} ({}): single value lost after {after} (at unix ms {at}; read again: {})", CLASSES[class], o.oid, if again.as_deref() == Some(&value(class, i)[..]) { "right" } else { "still wrong" });
        }
        if i < WITH_EXTENT {
            let (off, data) = extent(class, i);
            let (got, _) = o.read(b"arr", b"x", off, data.len() as u64, strata_types::Epoch::MAX).await.unwrap_or_else(|e| panic!("{} object {i} array unreadable after {after}: {e}", CLASSES[class]));
            if got != data {
                let bad: Vec<usize> = (0..data.len()).filter(|j| got[*j] != data[*j]).collect();
                let zeros = bad.iter().all(|j| got[*j] == 0);
                // Post-mortem: where the shards are and what state their targets are in.
                if let Ok(cf) = ClusterFile::locate(None) {
                    if let Ok(client) = Client::connect(&cf).await {
                        if let Ok(pool) = client.pool("tank").await {
                            let states: std::collections::BTreeMap<String, String> = pool.info().map(|i| i.map.targets.iter().map(|t| (t.id.to_string(), t.state.to_string())).collect()).unwrap_or_default();
                            eprintln!("object {}: shards {:?}; targets {states:?}", o.oid, pool.layout(o.oid).map(|l| l.shards().to_vec()));
                        }
                    }
                }
                panic!("{} object {i} ({}): {} of {} array bytes at offset {off} differ after {after} (first at {}, all zero: {zeros})", CLASSES[class], o.oid, bad.len(), data.len(), bad[0]);
            }
        }
    })
    .await;
}

fn target_states(c: &Cluster) -> Vec<String> {
    states_in(&c.json(&["pool", "query", "tank"]))
}

/// The target states of one `pool query` answer.
fn states_in(query: &serde_json::Value) -> Vec<String> {
    query["map"]["targets"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_owned()).collect()
}

/// Rebuild has finished for `out` lost targets: they are all DOWNOUT and none is still DOWN.
fn settled(c: &Cluster, out: usize) -> Option<()> {
    settled_in(&target_states(c), out).then_some(())
}

fn settled_in(s: &[String], out: usize) -> bool {
    s.iter().filter(|x| *x == "DownOut").count() == out && !s.iter().any(|x| x == "Down")
}

fn noticed(c: &Cluster) -> Option<()> {
    target_states(c).iter().any(|x| x == "Down").then_some(())
}

fn setup(c: &Cluster, rt: &tokio::runtime::Runtime, per_class: u64) -> Vec<Vec<ObjHandle>> {
    for (i, class) in CLASSES.iter().enumerate() {
        let rf = if class.starts_with("RP_2") || class.starts_with("EC_2P1") { "1" } else { "2" };
        c.json(&["cont", "create", "tank", &format!("c{i}"), "--oclass", class, "--rf", rf]);
    }
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let mut all = Vec::new();
        for (i, class) in CLASSES.iter().enumerate() {
            let h = client.container("tank", &format!("c{i}")).await.unwrap();
            let objs = h.create_objects(class.parse().unwrap(), per_class).await.unwrap();
            write_all(&objs, i).await;
            all.push(objs);
        }
        all
    })
}

/// Six ranks with 5,000 objects of each class written (`setup`), and the targets per rank.
fn six_ranks_with_objects() -> (Cluster, tokio::runtime::Runtime, Vec<Vec<ObjHandle>>, usize) {
    let c = Cluster::start(&["--ranks", "6", "--heartbeat-timeout-ms", "1500"]);
    // For the post-mortem in check_all (nextest runs each test in its own process).
    unsafe { std::env::set_var("STRATA_CLUSTER", c.cluster_file()) };
    let rt = runtime();
    let objs = setup(&c, &rt, 5000);
    let per_rank = target_states(&c).len() / 6;
    (c, rt, objs, per_rank)
}

#[test]
fn rebuild_decodes_ec_cells_so_failures_within_the_redundancy_lose_nothing() {
    let (c, rt, objs, per_rank) = six_ranks_with_objects();

    c.kill9_rank_dir(1);
    poll("rebuild of the first failure", Duration::from_secs(180), || settled(&c, per_rank));
    c.kill9_rank_dir(2);
    poll("the second failure to be noticed", Duration::from_secs(10), || noticed(&c));
    // Single-failure classes were made whole again by the first rebuild.
    for class in 0..4 {
        rt.block_on(check_all(&objs[class], class, "two failures"));
    }
    poll("rebuild of the second failure", Duration::from_secs(180), || settled(&c, 2 * per_rank));
    c.kill9_rank_dir(3);
    poll("the third failure to be noticed", Duration::from_secs(10), || noticed(&c));
    // RP_3 and EC_4P2 tolerate two lost shards per group; after two rebuilds a third failure
    // takes at most two: spares go to the host holding the fewest of the group's shards, so
    // none holds three (crates/placement/tests/layout.rs). Reads made while the third rebuild
    // runs, or waiting for it, need the first two rebuilds' spares to stay where they were
    // filled when the third failure takes an older shard's spare (it once moved them, and
    // EC_4P2GX arrays read back zeros or garbage).
    for class in [1, 3] {
        rt.block_on(check_all(&objs[class], class, "three failures"));
    }
    poll("rebuild of the third failure", Duration::from_secs(180), || settled(&c, 3 * per_rank));
    for class in [1, 3] {
        rt.block_on(check_all(&objs[class], class, "three failures, rebuilt"));
    }
}

/// What reading back every object of a class found, where some may be lost (more failures
/// than the class survives before its rebuild finished).
#[derive(Debug, Default)]
struct Readback {
    exact: usize,
    /// Reads that failed with an error.
    errors: usize,
    /// Single values that read as absent, arrays whose bytes read as a hole (none written).
    absent: usize,
    /// Reads that returned bytes other than the ones written: never allowed.
    wrong: Vec<String>,
}

async fn read_back(objs: &[ObjHandle], class: usize) -> Readback {
    let out = Arc::new(std::sync::Mutex::new(Readback::default()));
    let o2 = out.clone();
    in_batches(objs, move |i, o| {
        let out = o2.clone();
        async move {
            let single = o.get(b"d", b"a").await;
            let array = if i < WITH_EXTENT {
                let (off, data) = extent(class, i);
                Some((o.read(b"arr", b"x", off, data.len() as u64, strata_types::Epoch::MAX).await, off, data))
            } else {
                None
            };
            let mut r = out.lock().unwrap();
            let mut ok = true;
            match single {
                Ok(Some(v)) if v == value(class, i) => {}
                Ok(Some(_)) => r.wrong.push(format!("object {i} ({}): other single value", o.oid)),
                Ok(None) => (r.absent, ok) = (r.absent + 1, false),
                Err(_) => (r.errors, ok) = (r.errors + 1, false),
            }
            match array {
                Some((Ok((got, _)), _, data)) if got == data => {}
                // A read names the bytes that were written (`written`); the rest is a hole and
                // reads as zeros. Bytes it calls written must be the right ones.
                Some((Ok((got, written)), off, data)) => {
                    let wrong_written = written.iter().any(|(s, l)| (*s..s + l).any(|x| got[(x - off) as usize] != data[(x - off) as usize]));
                    let covered: u64 = written.iter().map(|(_, l)| l).sum();
                    if wrong_written || got.iter().enumerate().any(|(j, b)| *b != 0 && !written.iter().any(|(s, l)| (*s..s + l).contains(&(off + j as u64)))) {
                        r.wrong.push(format!("object {i} ({}): other array bytes ({covered} of {} called written)", o.oid, data.len()));
                    } else {
                        (r.absent, ok) = (r.absent + 1, false);
                    }
                }
                Some((Err(_), _, _)) => (r.errors, ok) = (r.errors + 1, false),
                None => {}
            }
            if ok {
                r.exact += 1;
            }
        }
    })
    .await;
    Arc::try_unwrap(out).unwrap().into_inner().unwrap()
}

/// Rebuild progress of the current map version has moved some bytes but not all, and the map
/// still has the failure pending (its targets `Down`): the pass is provably under way.
fn rebuild_midway(c: &Cluster) -> Option<serde_json::Value> {
    let q = c.json(&["pool", "query", "tank"]);
    let g = &q["progress"];
    let n = |f: &str| g[f].as_u64().unwrap_or(0);
    let pending = states_in(&q).iter().any(|s| s == "Down");
    (pending && g["state"] == "rebuilding" && g["version"] == q["map"]["version"] && n("bytes_done") > 0 && n("bytes_done") < n("bytes_total")).then(|| g.clone())
}

#[test]
fn a_failure_during_ec_rebuild_restarts_it_on_the_newer_map() {
    let (c, rt, objs, per_rank) = six_ranks_with_objects();

    c.kill9_rank_dir(1);
    let g = poll("the first rebuild to be part way", Duration::from_secs(60), || rebuild_midway(&c));
    // The second failure, while that pass moves data; excluding the rank at once (as an
    // operator would) rather than waiting out the heartbeat timeout keeps the window small.
    c.kill9_rank_dir(2);
    c.json(&["pool", "exclude", "tank", "--rank", &c.rank_of_dir(2).to_string()]);
    let s = target_states(&c);
    assert_eq!(s.iter().filter(|x| *x == "Down").count(), 2 * per_rank, "the first rebuild finished before the second failure (progress then: {g}); states {s:?}");
    eprintln!("second failure during the first rebuild at {g}");
    poll("rebuild of both failures", Duration::from_secs(300), || settled(&c, 2 * per_rank));
    // Two failures are within the redundancy of RP_3 and EC_4P2.
    for class in [1, 3] {
        rt.block_on(check_all(&objs[class], class, "two failures during rebuild"));
    }
    // RP_2 and EC_2P1 may have lost the objects whose both failed shards were not rebuilt yet:
    // two ranks failed at once are more than their containers' rf 1, so the containers are
    // unclean and every read fails (none reads a lost object as absent, none other bytes).
    for class in [0, 2] {
        let r = rt.block_on(read_back(&objs[class], class));
        eprintln!("{} after two failures during rebuild: {} objects exact; {} reads failed, {} read as absent", CLASSES[class], r.exact, r.errors, r.absent);
        assert!(r.wrong.is_empty(), "{}: {} objects read back other bytes, e.g. {:?}", CLASSES[class], r.wrong.len(), &r.wrong[..r.wrong.len().min(5)]);
        assert_eq!((r.exact, r.absent), (0, 0), "{}: its container is unclean, so every read must fail", CLASSES[class]);
    }
    c.kill9_rank_dir(3);
    poll("the third failure to be noticed", Duration::from_secs(10), || noticed(&c));
    poll("rebuild of the third failure", Duration::from_secs(300), || settled(&c, 3 * per_rank));
    for class in [1, 3] {
        rt.block_on(check_all(&objs[class], class, "a third failure after two during rebuild"));
    }
}

/// Flip a byte of `needle` in every data file under `dir` that holds it; returns how many
/// files were damaged.
fn corrupt_on_disk(dir: &std::path::Path, needle: &[u8]) -> usize {
    let mut stack = vec![dir.to_owned()];
    let mut hits = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            // Bit rot in data files; the journal's own damage is crash recovery's business.
            if p.extension().is_some_and(|x| x == "jnl") {
                continue;
            }
            let mut bytes = std::fs::read(&p).unwrap();
            if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
                bytes[pos + needle.len() / 2] ^= 0x5a;
                std::fs::write(&p, bytes).unwrap();
                eprintln!("damaged {}", p.display());
                hits += 1;
            }
        }
    }
    hits
}

#[test]
fn scrub_finds_and_repairs_a_corrupted_replica_and_ec_cell() {
    let c = Cluster::start(&["--ranks", "4", "--heartbeat-timeout-ms", "3000"]);
    c.json(&["cont", "create", "tank", "rp", "--oclass", "RP_2G1", "--rf", "1"]);
    c.json(&["cont", "create", "tank", "ec", "--oclass", "EC_2P1G1", "--rf", "1"]);
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    // Distinctive, incompressible contents so the bytes can be found in the rank's files.
    let blob = |seed: u64| Rng(seed | 1).bytes(48 << 10);
    let (rp, ec) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let rp = client.container("tank", "rp").await.unwrap().create_object("RP_2G1".parse().unwrap()).await.unwrap();
        let ec = client.container("tank", "ec").await.unwrap().create_object("EC_2P1G1".parse().unwrap()).await.unwrap();
        rp.put(b"d", b"a", &blob(1)).await.unwrap();
        ec.write(b"d", b"x", 0, &blob(2)).await.unwrap();
        (rp, ec)
    });
    // A first scrub flushes every rank's memtables, so the values are in files to damage.
    let clean = c.json(&["pool", "scrub", "tank"]);
    assert_eq!(clean["corrupt"], 0, "a fresh pool scrubs clean: {clean}");
    assert!(clean["records_checked"].as_u64().unwrap() >= 5, "{clean}");

    // Damage one replica of `rp` and the first data cell of `ec`, each on a stopped rank, then
    // restart it so nothing is served from memory.
    let pool = rt.block_on(async { Arc::new(Client::connect(&cf).await.unwrap().pool("tank").await.unwrap()) });
    let rank_dir_of = |t: strata_types::TargetId| -> usize { (0..4).find(|i| c.rank_of_dir(*i) == t.rank.0 as u64).expect("a rank dir for every rank") };
    let victims = [(pool.layout(rp.oid).unwrap().shards()[1].target, blob(1)), (pool.layout(ec.oid).unwrap().shards()[0].target, blob(2))];
    for (target, bytes) in &victims {
        let i = rank_dir_of(*target);
        c.kill9_rank_dir(i);
        assert!(corrupt_on_disk(&c.path().join(format!("rank-{i}")), &bytes[20000..20064]) > 0, "the value is stored uncompressed on rank-{i}");
        let _child = c.restart_rank_dir(i, 3000);
        poll("the restarted rank to serve", Duration::from_secs(30), || {
            // The restarted rank may be the management service itself: not answering is
            // "not yet", not a failure.
            let out = c.cmd(&["system", "query", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            s["ranks"].as_array()?.iter().all(|r| r["state"] == "Joined").then_some(())
        });
    }
    let out = c.cmd(&["pool", "scrub", "tank", "--json"]);
    assert!(out.stderr.is_empty(), "every rank takes part in the scrub: {}", String::from_utf8_lossy(&out.stderr));
    let first: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["corrupt"], 2, "scrub finds both damaged records: {first}");
    assert_eq!(first["repaired"], 2, "and repairs both: {first}");
    assert_eq!(first["lost"], 0, "{first}");
    let second = c.json(&["pool", "scrub", "tank"]);
    assert_eq!(second["corrupt"], 0, "after repair the pool scrubs clean: {second}");
    rt.block_on(async {
        assert_eq!(rp.get(b"d", b"a").await.unwrap(), Some(blob(1)));
        let (got, _) = ec.read(b"d", b"x", 0, 48 << 10, strata_types::Epoch::MAX).await.unwrap();
        assert!(got == blob(2), "EC bytes differ after repair");
    });
}

/// Total bytes the pool's engines pushed to other places (rebuild, drain, rebalancing) or also
/// wrote to the extended layout's places, by their own counters.
async fn moved_bytes(pool: &strata_client::PoolHandle) -> u64 {
    moved_bytes_of_live_ranks(pool, 0).await
}

/// [`moved_bytes`] when `dead` ranks are known not to answer (what they pushed before they died
/// is lost with them).
async fn moved_bytes_of_live_ranks(pool: &strata_client::PoolHandle, dead: usize) -> u64 {
    pool.refresh().await.unwrap();
    let (mut total, mut silent) = (0, 0);
    for r in pool.call_all_engines(&strata_rpc::engine_msg::EngineReq::Stats, Duration::from_secs(10)).await.unwrap() {
        match r {
            Ok((strata_rpc::engine_msg::EngineResp::Stats(s), _)) => total += s.moved_bytes + s.extension_write_bytes,
            Err(e) if silent < dead => {
                silent += 1;
                eprintln!("a dead rank does not report: {e}");
            }
            other => panic!("an engine did not report its counters: {other:?}"),
        }
    }
    total
}

/// Bytes whose placement differs between two maps: for every replicated value, the size times
/// the number of targets of its group under `after` that were not in its group under `before`;
/// for an erasure-coded extent (`ext_write`), a cell for every shard index whose target changed
/// (a target keeping its place in the group under another index needs that index's cell).
fn ideal_moved(before: &strata_placement::PoolMap, after: &strata_placement::PoolMap, values: &[(strata_types::Oid, Vec<u8>, usize)]) -> u64 {
    let (a, b) = (strata_placement::PlacementMap::new(before, false), strata_placement::PlacementMap::new(after, false));
    let mut ideal = 0;
    for (oid, dkey, len) in values {
        let (la, lb) = (a.layout(*oid).unwrap(), b.layout(*oid).unwrap());
        let (ga, gb) = (la.group(la.group_for_dkey(dkey)), lb.group(lb.group_for_dkey(dkey)));
        if is_ec(*oid) {
            ideal += ga.iter().zip(gb).filter(|(x, y)| x.target != y.target).count() as u64 * strata_ec::CELL_BYTES_DEFAULT;
            continue;
        }
        let new = gb.iter().filter(|s| !ga.iter().any(|x| x.target == s.target)).count();
        ideal += (new * len) as u64;
    }
    ideal
}

fn is_ec(oid: strata_types::Oid) -> bool {
    matches!(oid.class().map(|c| c.redundancy()), Ok(strata_types::Redundancy::Erasure { .. }))
}

/// The extension test's write of `v` under `dkey`: a single value, or for an erasure-coded
/// object an extent at offset 0 (one partial stripe: a full cell on every shard).
async fn ext_write(o: &ObjHandle, dkey: &[u8], v: &[u8]) -> Result<(), strata_client::ClientError> {
    if is_ec(o.oid) {
        o.write(dkey, b"x", 0, v).await.map(|_| ())
    } else {
        o.put(dkey, b"a", v).await.map(|_| ())
    }
}

/// What shard `shard` of an erasure-coded object stores for `ext_write(.., v)`.
fn ext_cell(oid: strata_types::Oid, v: &[u8], shard: usize) -> Vec<u8> {
    let Ok(strata_types::Redundancy::Erasure { data, parity }) = oid.class().map(|c| c.redundancy()) else { panic!("{oid} is not erasure-coded") };
    let st = strata_ec::EcStripe::new(data as usize, parity as usize, strata_ec::CELL_BYTES_DEFAULT).unwrap();
    let mut stripe = v.to_vec();
    stripe.resize(st.stripe_bytes() as usize, 0);
    let cells: Vec<&[u8]> = stripe.chunks(st.cell_bytes as usize).collect();
    let parity = st.encode(&cells).unwrap();
    cells.iter().map(|c| c.to_vec()).chain(parity).nth(shard).unwrap()
}

fn ext_value(tag: &str, len: usize) -> Vec<u8> {
    Rng(tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)) | 1).bytes(len)
}

#[test]
fn extend_under_writes_then_drain_puts_data_where_placement_says_and_moves_little() {
    // EC_4P2GX has one group on the first 4 ranks' 8 targets and two on 12: dkeys change groups.
    const EXT_CLASSES: [&str; 6] = ["RP_2G1", "RP_3G1", "RP_2GX", "S1", "EC_2P1G1", "EC_4P2GX"];
    // Each EC write stores a 64 KiB cell on every shard: fewer of those objects.
    let objects = |class: &str| if class.starts_with("EC_") { 100 } else { 300 };
    const DKEYS: usize = 3;
    const VALUE_BYTES: usize = 4096;
    // No rank fails here: a long timeout keeps a busy machine from declaring one dead, which
    // loses S1 objects (a draining rank's unpushed ones too) and fails the test for nothing.
    let c = Cluster::start(&["--ranks", "6", "--heartbeat-timeout-ms", "15000"]);
    let ranks: Vec<u64> = (0..6).map(|i| c.rank_of_dir(i)).collect();
    let first4 = ranks[..4].iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
    let last2 = ranks[4..].iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
    c.json(&["pool", "create", "ext", "--size", "2G", "--ranks", &first4]);
    for (i, class) in EXT_CLASSES.iter().enumerate() {
        c.json(&["cont", "create", "ext", &format!("c{i}"), "--oclass", class, "--rf", if *class == "S1" { "0" } else { "1" }]);
    }
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    // (handle, dkey, akey, value) of every acknowledged write.
    type Acked = Vec<(ObjHandle, Vec<u8>, Vec<u8>)>;
    let (pool, objs, base): (Arc<strata_client::PoolHandle>, Vec<Vec<ObjHandle>>, Acked) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let mut objs = Vec::new();
        let mut base = Vec::new();
        for (i, class) in EXT_CLASSES.iter().enumerate() {
            let h = client.container("ext", &format!("c{i}")).await.unwrap();
            let os = h.create_objects(class.parse().unwrap(), objects(class) as u64).await.unwrap();
            let mut tasks = Vec::new();
            for (j, o) in os.iter().enumerate() {
                for d in 0..DKEYS {
                    let (o, dkey) = (o.clone(), format!("k{d}").into_bytes());
                    let v = ext_value(&format!("{class}/{j}/{d}"), VALUE_BYTES);
                    base.push((o.clone(), dkey.clone(), v.clone()));
                    tasks.push(tokio::spawn(async move { ext_write(&o, &dkey, &v).await.unwrap() }));
                }
            }
            for t in tasks {
                t.await.unwrap();
            }
            objs.push(os);
        }
        (client.pool("ext").await.unwrap(), objs, base)
    });
    let map0 = pool.info().unwrap().map;
    let moved0 = rt.block_on(moved_bytes(&pool));

    // Writers keep going through the extension: new dkeys on existing objects.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Writes begun before the extension was asked for: their data had to move.
    let extending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..EXT_CLASSES.len())
        .map(|w| {
            let (objs, stop, written, extending) = (objs[w].clone(), stop.clone(), written.clone(), extending.clone());
            rt.spawn(async move {
                let mut acked: Acked = Vec::new();
                let mut before: Acked = Vec::new();
                let mut n = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let o = objs[(n * 7919) % objs.len()].clone();
                    let dkey = format!("w{w}-{n}").into_bytes();
                    let v = ext_value(&format!("w{w}/{n}"), VALUE_BYTES);
                    let pre = !extending.load(std::sync::atomic::Ordering::SeqCst);
                    if ext_write(&o, &dkey, &v).await.is_ok() {
                        if pre {
                            before.push((o.clone(), dkey.clone(), v.clone()));
                        }
                        acked.push((o, dkey, v));
                        written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    n += 1;
                }
                (acked, before)
            })
        })
        .collect();
    // Let the writers run before the map changes under them.
    poll("writers to start", Duration::from_secs(60), || (written.load(std::sync::atomic::Ordering::Relaxed) >= 50).then_some(()));
    extending.store(true, std::sync::atomic::Ordering::SeqCst);
    let p = c.json(&["pool", "extend", "ext", "--ranks", &last2]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().iter().filter(|t| t["state"] == "New").count(), 4);
    let ext_version = p["map"]["version"].as_u64().unwrap();
    // Extension is data movement like rebuild: `pool query` reports its progress, never going
    // down, and all of it done once the new targets are in.
    let (g, _) = watch_progress(&c, "ext", "the extension to finish (NEW targets UP)", Duration::from_secs(300), |q| q["map"]["targets"].as_array().unwrap().iter().all(|t| t["state"] == "Up"));
    assert!(g["version"].as_u64().unwrap() >= ext_version, "progress of an older pass reported: {g}");
    assert!(g["objects_total"].as_u64().unwrap() > 0 && g["bytes_total"].as_u64().unwrap() > 0, "extension moved data but reported no work: {g}");
    assert_eq!((g["objects_done"].clone(), g["bytes_done"].clone()), (g["objects_total"].clone(), g["bytes_total"].clone()), "extension finished with work left: {g}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut before) = (base.clone(), base.clone());
    for w in writers {
        let (a, b) = rt.block_on(w).unwrap();
        acked.extend(a);
        before.extend(b);
    }
    assert!(acked.len() > base.len(), "writes went on during the extension");
    let moved1 = rt.block_on(moved_bytes(&pool));
    let map1 = pool.info().unwrap().map;
    let sizes = |v: &Acked| v.iter().map(|(o, d, x)| (o.oid, d.clone(), x.len())).collect::<Vec<_>>();
    // Every shard whose place changed, those written while data moved included: the engines'
    // count holds both what rebalancing copied and what updates also wrote to the new places.
    let ideal_extend = ideal_moved(&map0, &map1, &sizes(&acked));

    // Drain one of the original ranks.
    c.json(&["pool", "drain", "ext", "--rank", &ranks[1].to_string()]);
    poll("the drain to finish", Duration::from_secs(300), || {
        let q = c.json(&["pool", "query", "ext"]);
        let t = q["map"]["targets"].as_array().unwrap();
        (t.iter().filter(|t| t["state"] == "DownOut").count() == 2 && t.iter().all(|t| t["state"] == "Up" || t["state"] == "DownOut")).then_some(())
    });
    // Once the map is settled every rank deletes the copies the extension and the drain left
    // where the map no longer places them.
    let reclaim = poll("reclaim to finish on every rank", Duration::from_secs(180), || reclaimed(&c, "ext", 6));
    eprintln!("reclaimed: {reclaim}");
    assert!(reclaim["objects_whole"].as_u64().unwrap() > 0 && reclaim["bytes"].as_u64().unwrap() > 0, "nothing was reclaimed: {reclaim}");
    let moved2 = rt.block_on(moved_bytes(&pool));
    let map2 = pool.info().unwrap().map;
    let ideal_drain = ideal_moved(&map1, &map2, &sizes(&acked));
    let (moved, ideal) = (moved2 - moved0, ideal_extend + ideal_drain);
    eprintln!("moved {moved} bytes (extension {}, drain {}); ideal {ideal} (extension {ideal_extend}, drain {ideal_drain}): {:.3}x; {} writes before the extension, {} during", moved1 - moved0, moved2 - moved1, moved as f64 / ideal as f64, before.len() - base.len(), acked.len() - before.len());
    assert!(ideal > 0 && moved1 > moved0, "the extension moved data");
    assert!(moved as f64 <= 1.3 * ideal as f64, "moved {moved} bytes, more than 1.3x the ideal {ideal}");

    rt.block_on(async {
        pool.refresh().await.unwrap();
        let final_map = strata_placement::PlacementMap::new(&map2, false);
        for (n, (o, dkey, v)) in acked.iter().enumerate() {
            // Nothing lost: reads through the client.
            let got = if is_ec(o.oid) {
                o.read(dkey, b"x", 0, v.len() as u64, strata_types::Epoch::MAX).await.map(|(d, _)| Some(d))
            } else {
                o.get(dkey, b"a").await
            };
            let got = got.unwrap_or_else(|e| panic!("acknowledged write {n} ({}) unreadable: {e}", o.oid));
            assert!(got.as_deref() == Some(&v[..]), "acknowledged write {n} ({}, dkey {}) reads back wrong", o.oid, String::from_utf8_lossy(dkey));
            // Where placement says: every target of the final layout holds it itself (for EC,
            // the cell of its shard index).
            let l = final_map.layout(o.oid).unwrap();
            for (i, s) in l.group(l.group_for_dkey(dkey)).iter().enumerate() {
                let (cont, oid, dkey) = (o.cont_id(), o.oid, dkey.clone());
                let (fetch, want) = if is_ec(oid) {
                    (strata_rpc::engine_msg::FetchKind::Extent { akey: b"x".to_vec(), offset: 0, len: strata_ec::CELL_BYTES_DEFAULT }, ext_cell(oid, v, i))
                } else {
                    (strata_rpc::engine_msg::FetchKind::Single { akey: b"a".to_vec() }, v.clone())
                };
                let r = pool
                    .call_engine(
                        o.oid,
                        |_, _| Some(s.target),
                        |pool, map_version, t| strata_rpc::engine_msg::EngineReq::Fetch { pool, map_version, target: t.index, cont, oid, dkey, fetch: fetch.clone(), epoch: strata_types::Epoch::MAX },
                        bytes::Bytes::new(),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("target {} of write {n} did not answer: {e}", s.target));
                assert!(r.1 == want[..], "write {n} ({}, shard {i}) is not on target {}, where the final map places it", o.oid, s.target);
            }
        }
        // And nowhere else: no copy is left where the final map does not place it.
        let conts: Vec<strata_types::ContId> = objs.iter().map(|os| os[0].cont_id()).collect();
        let (misplaced, listed) = misplaced_rows(&pool, &conts, objs[0][0].oid, &[]).await;
        assert!(misplaced.is_empty(), "{} rows are stored where the final map does not place them, e.g. {:?}", misplaced.len(), &misplaced[..misplaced.len().min(5)]);
        let drained: Vec<_> = listed.iter().filter(|(t, _)| t.rank.0 as u64 == ranks[1]).collect();
        assert!(!drained.is_empty() && drained.iter().all(|(_, n)| **n == 0), "the drained rank's targets still hold objects: {drained:?}");
        assert!(listed.iter().filter(|(t, _)| t.rank.0 as u64 != ranks[1]).all(|(_, n)| *n > 0), "every other target holds data: {listed:?}");
    });
}

/// Reclaim deletes nothing while data still moves: a rank of the original four is killed while
/// the pool is being extended, so a rebuild and the extension run before the map settles; no
/// reclaim runs meanwhile, and afterwards every object reads back exactly and copies are left
/// only where the final map places them.
#[test]
fn a_failure_during_an_extension_loses_nothing_to_reclaim() {
    let c = Cluster::start(&["--ranks", "6", "--heartbeat-timeout-ms", "1500"]);
    unsafe { std::env::set_var("STRATA_CLUSTER", c.cluster_file()) };
    let ranks: Vec<u64> = (0..6).map(|i| c.rank_of_dir(i)).collect();
    let first4 = ranks[..4].iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
    let last2 = ranks[4..].iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",");
    c.json(&["pool", "create", "grow", "--size", "2G", "--ranks", &first4]);
    for (i, class) in CLASSES.iter().enumerate() {
        let rf = if class.starts_with("RP_2") || class.starts_with("EC_2P1") { "1" } else { "2" };
        c.json(&["cont", "create", "grow", &format!("c{i}"), "--oclass", class, "--rf", rf]);
    }
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let (pool, objs) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let mut all = Vec::new();
        for (i, class) in CLASSES.iter().enumerate() {
            let objs = client.container("grow", &format!("c{i}")).await.unwrap().create_objects(class.parse().unwrap(), 1000).await.unwrap();
            write_all(&objs, i).await;
            all.push(objs);
        }
        (client.pool("grow").await.unwrap(), all)
    });
    // The settled pool's first reclaim pass finds nothing out of place.
    let before = poll("the first reclaim pass on every rank", Duration::from_secs(60), || reclaimed(&c, "grow", 4));
    assert_eq!(before["objects"], 0, "{before}");
    let per_rank = target_states(&c).len() / 6;

    c.json(&["pool", "extend", "grow", "--ranks", &last2]);
    c.kill9_rank_dir(2);
    c.json(&["pool", "exclude", "grow", "--rank", &ranks[2].to_string()]);
    let q = c.json(&["pool", "query", "grow"]);
    let s = states_in(&q);
    assert!(s.iter().any(|x| x == "New") && s.iter().any(|x| x == "Down"), "the extension was not under way at the failure: {s:?}");
    // Until the rebuild and the extension are both done, no reclaim pass deletes anything.
    let mut samples = 0;
    poll("the rebuild and the extension to finish", Duration::from_secs(300), || {
        let q = c.json(&["pool", "query", "grow"]);
        let s = states_in(&q);
        let moving = s.iter().any(|x| x == "New" || x == "Down");
        if moving {
            samples += 1;
            assert_eq!(q["reclaim"]["objects"], 0, "reclaim deleted copies while data was moving (states {s:?}): {}", q["reclaim"]);
        }
        (!moving && s.iter().filter(|x| *x == "DownOut").count() == per_rank).then_some(())
    });
    let after = poll("reclaim to finish on every live rank", Duration::from_secs(180), || reclaimed(&c, "grow", 5));
    eprintln!("{samples} samples while data moved; reclaimed afterwards: {after}");
    assert!(after["objects"].as_u64().unwrap() > 0, "the extension's old copies were not reclaimed: {after}");
    for (class, o) in objs.iter().enumerate() {
        rt.block_on(check_all(o, class, "a failure during an extension, then reclaim"));
    }
    rt.block_on(async {
        let conts: Vec<strata_types::ContId> = objs.iter().map(|os| os[0].cont_id()).collect();
        let (misplaced, _) = misplaced_rows(&pool, &conts, objs[0][0].oid, &[ranks[2]]).await;
        assert!(misplaced.is_empty(), "{} rows are stored where the final map does not place them, e.g. {:?}", misplaced.len(), &misplaced[..misplaced.len().min(5)]);
    });
}

#[test]
fn background_scrub_finds_and_repairs_corruption_without_being_asked() {
    let c = Cluster::start(&["--ranks", "4", "--heartbeat-timeout-ms", "5000", "--scrub-interval-ms", "500"]);
    c.json(&["cont", "create", "tank", "rp", "--oclass", "RP_2G1", "--rf", "1"]);
    c.json(&["cont", "create", "tank", "ec", "--oclass", "EC_2P1G1", "--rf", "1"]);
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let (rp, ec) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let rp = client.container("tank", "rp").await.unwrap().create_object("RP_2G1".parse().unwrap()).await.unwrap();
        let ec = client.container("tank", "ec").await.unwrap().create_object("EC_2P1G1".parse().unwrap()).await.unwrap();
        rp.put(b"d", b"a", &ext_value("bg-rp", 48 << 10)).await.unwrap();
        ec.write(b"d", b"x", 0, &ext_value("bg-ec", 48 << 10)).await.unwrap();
        (rp, ec)
    });
    let scrub = |c: &Cluster| c.json(&["pool", "query", "tank"])["scrub"].clone();
    // Two more passes on every rank: one of them started after the writes, and a pass flushes
    // before it verifies, so the values are in files to damage.
    let start = scrub(&c)["passes"].as_u64().unwrap();
    poll("two background scrub passes on every rank", Duration::from_secs(60), || (scrub(&c)["passes"].as_u64()? >= start + 8).then_some(()));
    let clean = scrub(&c);
    assert_eq!(clean["corrupt"], 0, "a fresh pool scrubs clean: {clean}");
    assert!(clean["records_checked"].as_u64().unwrap() >= 5, "{clean}");

    let pool = rt.block_on(async { Arc::new(Client::connect(&cf).await.unwrap().pool("tank").await.unwrap()) });
    let rank_dir_of = |t: strata_types::TargetId| -> usize { (0..4).find(|i| c.rank_of_dir(*i) == t.rank.0 as u64).expect("a rank dir for every rank") };
    let victims = [(pool.layout(rp.oid).unwrap().shards()[1].target, ext_value("bg-rp", 48 << 10)), (pool.layout(ec.oid).unwrap().shards()[0].target, ext_value("bg-ec", 48 << 10))];
    let mut children = Vec::new();
    for (target, bytes) in &victims {
        let i = rank_dir_of(*target);
        c.kill9_rank_dir(i);
        assert!(corrupt_on_disk(&c.path().join(format!("rank-{i}")), &bytes[20000..20064]) > 0, "the value is stored uncompressed on rank-{i}");
        children.push(c.restart_rank_dir_with(i, 5000, &["--scrub-interval-ms", "500"]));
        poll("the restarted rank to serve", Duration::from_secs(30), || {
            let out = c.cmd(&["system", "query", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            s["ranks"].as_array()?.iter().all(|r| r["state"] == "Joined").then_some(())
        });
    }
    // Nobody calls `pool scrub`: the background passes find and repair both.
    let found = poll("the background scrub to repair both damaged records", Duration::from_secs(120), || {
        let s = scrub(&c);
        (s["repaired"].as_u64()? >= 2 && s["ranks_answered"] == 4).then_some(s)
    });
    assert_eq!(found["corrupt"], 2, "{found}");
    assert_eq!(found["lost"], 0, "{found}");
    // Later passes find nothing more: the repair holds.
    let passes = found["passes"].as_u64().unwrap();
    let later = poll("two more passes on every rank", Duration::from_secs(60), || {
        let s = scrub(&c);
        (s["passes"].as_u64()? >= passes + 8).then_some(s)
    });
    assert_eq!(later["corrupt"], 2, "no new damage found after the repair: {later}");
    rt.block_on(async {
        assert_eq!(rp.get(b"d", b"a").await.unwrap(), Some(ext_value("bg-rp", 48 << 10)));
        let (got, _) = ec.read(b"d", b"x", 0, 48 << 10, strata_types::Epoch::MAX).await.unwrap();
        assert!(got == ext_value("bg-ec", 48 << 10), "EC bytes differ after repair");
    });
    drop(children);
}

/// One array of 200 MiB in one dkey: more than one export answer could carry (EC) and more
/// than rebuild should hold at once. Lose shard 0's rank, let rebuild fill its spare, then lose
/// another home shard's rank: reading the array back needs the rebuilt spare.
fn big_array_rebuilds(class: &str) {
    const BYTES: usize = 200 << 20;
    const CHUNK: usize = 4 << 20;
    let c = Cluster::start(&["--ranks", "4", "--heartbeat-timeout-ms", "5000"]);
    c.json(&["cont", "create", "tank", "big", "--oclass", class, "--rf", "1"]);
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let data = ext_value(class, BYTES);
    let (pool, o) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let o = client.container("tank", "big").await.unwrap().create_object(class.parse().unwrap()).await.unwrap();
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            o.write(b"big", b"a", (i * CHUNK) as u64, chunk).await.unwrap();
        }
        (client.pool("tank").await.unwrap(), o)
    });
    let per_rank = target_states(&c).len() / 4;
    let first = pool.layout(o.oid).unwrap().shards()[0].target.rank.0;
    c.json(&["pool", "exclude", "tank", "--rank", &first.to_string()]);
    // Progress is checked on every sample (see `watch_progress`) and ends with all bytes done.
    let (end, midway) = common::watch_progress(&c, "tank", "rebuild of the 200 MiB shard", Duration::from_secs(600), |q| {
        // Judged on the same answer the progress came from: a second query could see the
        // targets settle after this sample was taken and end the watch on a stale sample.
        settled_in(&states_in(q), per_rank)
    });
    eprintln!("{class}: {midway} progress samples part way; at the end {end}");
    assert_eq!(end["state"], "done", "{end}");
    // EC_2P1: a shard holds half the array.
    assert!(end["bytes_total"].as_u64().unwrap() >= (BYTES / 2) as u64, "the shard is counted: {end}");
    assert_eq!((&end["objects_done"], &end["bytes_done"]), (&end["objects_total"], &end["bytes_total"]), "{end}");
    rt.block_on(pool.refresh()).unwrap();
    let l = pool.layout(o.oid).unwrap();
    assert!(l.shards()[0].is_spare, "shard 0 lives on a spare now");
    let second = l.shards().iter().find(|s| !s.is_spare).unwrap().target.rank.0;
    c.json(&["pool", "exclude", "tank", "--rank", &second.to_string()]);
    poll("the second exclusion to be noticed", Duration::from_secs(10), || noticed(&c));
    rt.block_on(async {
        pool.refresh().await.unwrap();
        for (i, want) in data.chunks(CHUNK).enumerate() {
            let (got, _) = o.read(b"big", b"a", (i * CHUNK) as u64, CHUNK as u64, strata_types::Epoch::MAX).await.unwrap_or_else(|e| panic!("{class}: chunk {i} unreadable: {e}"));
            assert!(got == want, "{class}: chunk {i} of the 200 MiB array differs after its shard was rebuilt");
        }
    });
}

#[test]
fn a_200_mib_replicated_array_rebuilds_page_by_page() {
    big_array_rebuilds("RP_2G1");
}

#[test]
fn a_200_mib_erasure_coded_array_rebuilds_page_by_page() {
    big_array_rebuilds("EC_2P1G1");
}

/// Two pools on the same ranks share their targets' stores. A rank dies: each pool's rebuild
/// moves only its own objects, laid out by its own map (a pass that walked every container on a
/// target copied the other pool's objects to places computed from the wrong map, moving about
/// twice the ideal), and both pools read back exactly.
#[test]
fn rebuild_of_one_pool_leaves_another_pools_objects_alone() {
    const OBJECTS: u64 = 200;
    const VALUE_BYTES: usize = 16 << 10;
    let c = Cluster::start(&["--ranks", "4", "--heartbeat-timeout-ms", "1500"]);
    c.json(&["pool", "create", "other", "--size", "1G"]);
    let pools = ["tank", "other"];
    for p in pools {
        c.json(&["cont", "create", p, "rp", "--oclass", "RP_2G1", "--rf", "1"]);
    }
    let rt = runtime();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let v = |p: usize, i: usize| ext_value(&format!("{p}/{i}"), VALUE_BYTES);
    let (handles, objs) = rt.block_on(async {
        let client = Client::connect(&cf).await.unwrap();
        let (mut handles, mut objs) = (Vec::new(), Vec::new());
        for (p, name) in pools.iter().enumerate() {
            let os = client.container(name, "rp").await.unwrap().create_objects("RP_2G1".parse().unwrap(), OBJECTS).await.unwrap();
            for (i, o) in os.iter().enumerate() {
                o.put(b"d", b"a", &v(p, i)).await.unwrap();
            }
            handles.push(client.pool(name).await.unwrap());
            objs.push(os);
        }
        (handles, objs)
    });
    let before: Vec<_> = handles.iter().map(|h| h.info().unwrap().map).collect();
    let moved0 = rt.block_on(moved_bytes(&handles[0]));

    c.kill9_rank_dir(3);
    let states = |p: &str| states_in(&c.json(&["pool", "query", p]));
    let per_rank = states("tank").len() / 4;
    poll("both pools rebuilt", Duration::from_secs(120), || pools.iter().all(|p| settled_in(&states(p), per_rank)).then_some(()));

    let mut ideal = 0;
    for (p, h) in handles.iter().enumerate() {
        rt.block_on(h.refresh()).unwrap();
        let values: Vec<_> = objs[p].iter().map(|o| (o.oid, b"d".to_vec(), VALUE_BYTES)).collect();
        ideal += ideal_moved(&before[p], &h.info().unwrap().map, &values);
    }
    let moved = rt.block_on(moved_bytes_of_live_ranks(&handles[0], 1)) - moved0;
    assert!(ideal > 0, "the dead rank held shards of both pools");
    assert!(moved as f64 <= 1.3 * ideal as f64, "rebuild moved {moved} bytes where {ideal} had to move: another pool's objects moved too");
    rt.block_on(async {
        for (p, os) in objs.iter().enumerate() {
            for (i, o) in os.iter().enumerate() {
                assert_eq!(o.get(b"d", b"a").await.unwrap(), Some(v(p, i)), "pool {} object {i} after rebuild", pools[p]);
            }
        }
    });
}

/// Containers of redundancy factor 0, 1 and 2 (label, class, rf).
const RF_CONTAINERS: [(&str, &str, &str); 3] = [("r0", "S1", "0"), ("r1", "RP_2G1", "1"), ("r2", "RP_3G1", "2")];
const RF_OBJECTS: u64 = 500;

fn rf_value(cont: &str, i: usize) -> Vec<u8> {
    format!("{cont}-object{i}").into_bytes()
}

/// `RF_CONTAINERS` created, each with `RF_OBJECTS` objects holding a single value.
fn rf_containers(c: &Cluster, rt: &tokio::runtime::Runtime, client: &Client) -> Vec<Vec<ObjHandle>> {
    for (label, class, rf) in RF_CONTAINERS {
        c.json(&["cont", "create", "tank", label, "--oclass", class, "--rf", rf]);
    }
    rt.block_on(async {
        let mut all = Vec::new();
        for (label, class, _) in RF_CONTAINERS {
            let objs = client.container("tank", label).await.unwrap().create_objects(class.parse().unwrap(), RF_OBJECTS).await.unwrap();
            in_batches(&objs, move |i, o| async move {
                o.put(b"d", b"a", &rf_value(label, i)).await.unwrap();
            })
            .await;
            all.push(objs);
        }
        all
    })
}

/// A cluster of `ranks` ranks (`extra`: more `strata up` flags) with `RF_CONTAINERS` filled:
/// the setup of the container-health tests.
struct RfSetup {
    c: Cluster,
    rt: tokio::runtime::Runtime,
    per_rank: usize,
    client: Client,
    objs: Vec<Vec<ObjHandle>>,
}

fn rf_setup(ranks: usize, extra: &[&str]) -> RfSetup {
    let n = ranks.to_string();
    let args: Vec<&str> = ["--ranks", n.as_str()].into_iter().chain(extra.iter().copied()).collect();
    let c = Cluster::start(&args);
    let rt = runtime();
    let per_rank = target_states(&c).len() / ranks;
    let client = rt.block_on(Client::connect(&ClusterFile::load(&c.cluster_file()).unwrap())).unwrap();
    let objs = rf_containers(&c, &rt, &client);
    RfSetup { c, rt, per_rank, client, objs }
}

/// Every object reads back its value.
async fn rf_check_exact(objs: &[ObjHandle], label: &'static str, after: &'static str) {
    in_batches(objs, move |i, o| async move {
        let got = o.get(b"d", b"a").await.unwrap_or_else(|e| panic!("{label} object {i} unreadable after {after}: {e}"));
        assert_eq!(got.as_deref(), Some(&rf_value(label, i)[..]), "{label} object {i} after {after}");
    })
    .await;
}

/// Targets failed, rebuilt or not.
fn out_or_down(c: &Cluster) -> usize {
    target_states(c).iter().filter(|s| *s == "Down" || *s == "DownOut").count()
}

fn cont_status(c: &Cluster, cont: &str) -> serde_json::Value {
    c.json(&["cont", "query", "tank", cont])["status"].clone()
}

#[test]
fn ranks_lost_at_once_beyond_rf_make_containers_unclean_instead_of_reading_absent() {
    let RfSetup { c, rt, per_rank, client, objs } = rf_setup(6, &["--heartbeat-timeout-ms", "1500"]);
    // A KV store (rf 1 by default for its class) open before the failures: its handle too.
    c.json(&["kv", "create", "tank/kv1", "--oclass", "RP_2GX"]);
    let kv = rt.block_on(async { strata_kv::KvStore::open(&client.container("tank", "kv1").await.unwrap()).await.unwrap() });
    rt.block_on(kv.put(b"k", b"v")).unwrap();

    // Both ranks die before either is noticed: the first one's rebuild cannot finish before
    // the second is marked (the second, still joined, would have to report it), so they count
    // as failed at once whatever order the management service notices them in.
    let (a, b) = (c.rank_of_dir(1), c.rank_of_dir(2));
    c.kill9_rank_dir(1);
    c.kill9_rank_dir(2);
    poll("both failures to be noticed", Duration::from_secs(30), || (out_or_down(&c) == 2 * per_rank).then_some(()));
    // Rebuild finishing puts empty spares in place of objects that had both copies there:
    // without the unclean mark they would now read as absent.
    poll("rebuild of both failures", Duration::from_secs(180), || settled(&c, 2 * per_rank));

    let ranks = serde_json::json!([a.min(b), a.max(b)]);
    assert_eq!(cont_status(&c, "r1")["unclean"]["ranks"], ranks);
    assert!(cont_status(&c, "r0")["unclean"].is_object(), "rf 0 survives no failure");
    assert_eq!(cont_status(&c, "r2"), "healthy");
    let human = String::from_utf8_lossy(&c.cmd(&["cont", "query", "tank", "r1"]).stdout).into_owned();
    assert!(human.contains(&format!("status unclean (ranks {},{} failed in 2 fault domains (/node-1, /node-2) before rebuild restored redundancy", a.min(b), a.max(b))), "{human}");
    let pool = c.json(&["pool", "query", "tank"]);
    let mut listed: Vec<&str> = pool["unclean_conts"].as_array().unwrap().iter().map(|u| u["label"].as_str().unwrap()).collect();
    listed.sort();
    assert_eq!(listed, ["kv1", "r0", "r1"]);

    // Opening fails with what happened and what to do.
    for label in ["r0", "r1"] {
        let e = rt.block_on(client.container("tank", label)).err().unwrap_or_else(|| panic!("{label} opened while unclean"));
        assert!(matches!(e, strata_client::ClientError::Unclean { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("container tank/{label} is unclean")) && msg.contains(&format!("'strata cont set-prop tank {label} --status healthy'")), "{msg}");
    }
    let e = rt.block_on(client.container("tank", "r1")).err().unwrap().to_string();
    assert!(e.contains(&format!("ranks {},{} failed", a.min(b), a.max(b))) && e.contains("(rf 1)"), "{e}");
    let oid = objs[1][0].oid.to_string();
    let err = c.fails(&["obj", "get", "tank/r1", &oid, "--dkey", "d", "--akey", "a"]);
    assert!(err.contains("is unclean"), "{err}");
    let err = c.fails(&["kv", "get", "tank/kv1", "k"]);
    assert!(err.contains("is unclean"), "{err}");
    // Handles opened before fail too: nothing reads as absent.
    for (k, (label, _, _)) in RF_CONTAINERS.iter().enumerate().take(2) {
        for (i, o) in objs[k].iter().enumerate().take(50) {
            match rt.block_on(o.get(b"d", b"a")) {
                Err(strata_client::ClientError::Unclean { .. }) => {}
                other => panic!("{label} object {i} through a handle opened before: {other:?}"),
            }
        }
    }
    match rt.block_on(kv.get(b"k")) {
        Err(strata_kv::KvError::Client(strata_client::ClientError::Unclean { .. })) => {}
        other => panic!("KV get through a store opened before: {other:?}"),
    }
    // Two failures are within rf 2: every object reads back, through the old handles and a new one.
    rt.block_on(rf_check_exact(&objs[2], "r2", "two failures at once"));
    let fresh = rt.block_on(client.container("tank", "r2")).unwrap();
    let again: Vec<ObjHandle> = objs[2].iter().map(|o| fresh.object(o.oid)).collect();
    rt.block_on(rf_check_exact(&again, "r2", "two failures at once (new handle)"));

    // The administrator accepts the loss: the container opens again, and what is read is
    // either the value written or absent (lost), never other bytes.
    assert!(c.fails(&["cont", "set-prop", "tank", "r1", "--status", "unclean"]).contains("only 'healthy'"));
    assert_eq!(c.json(&["cont", "set-prop", "tank", "r1", "--status", "healthy"])["status"], "healthy");
    let h = rt.block_on(client.container("tank", "r1")).unwrap();
    let (mut exact, mut absent) = (0, 0);
    for (i, o) in objs[1].iter().enumerate() {
        for handle in [o.clone(), h.object(o.oid)] {
            match rt.block_on(handle.get(b"d", b"a")) {
                Ok(Some(v)) if v == rf_value("r1", i) => exact += 1,
                Ok(None) => absent += 1,
                other => panic!("r1 object {i} after the loss was accepted: {other:?}"),
            }
        }
    }
    eprintln!("r1 after two failures at once, accepted: {exact} reads exact, {absent} absent");
    assert!(exact > 0);
    assert!(matches!(rt.block_on(client.container("tank", "r0")), Err(strata_client::ClientError::Unclean { .. })), "clearing one container clears only that one");
}

#[test]
fn a_failure_after_the_rebuild_finished_leaves_rf_1_containers_healthy() {
    let RfSetup { c, rt, per_rank, client, objs } = rf_setup(5, &["--heartbeat-timeout-ms", "1500"]);
    c.kill9_rank_dir(1);
    poll("rebuild of the first failure", Duration::from_secs(180), || settled(&c, per_rank));
    c.kill9_rank_dir(2);
    // (Few objects: its rebuild may be over before a poll sees it DOWN.)
    poll("the second failure to be noticed", Duration::from_secs(10), || (out_or_down(&c) == 2 * per_rank).then_some(()));
    assert_eq!(cont_status(&c, "r1"), "healthy");
    assert_eq!(cont_status(&c, "r2"), "healthy");
    assert_eq!(cont_status(&c, "r0")["unclean"]["ranks"], serde_json::json!([c.rank_of_dir(1)]));
    let fresh = rt.block_on(client.container("tank", "r1")).unwrap();
    let again: Vec<ObjHandle> = objs[1].iter().map(|o| fresh.object(o.oid)).collect();
    rt.block_on(rf_check_exact(&objs[1], "r1", "a failure after the first was rebuilt"));
    rt.block_on(rf_check_exact(&again, "r1", "a failure after the first was rebuilt (new handle)"));
    poll("rebuild of the second failure", Duration::from_secs(180), || settled(&c, 2 * per_rank));
    rt.block_on(rf_check_exact(&again, "r1", "both rebuilt"));
    assert_eq!(cont_status(&c, "r1"), "healthy");
}

/// A read capability for the copy of `o`'s value (dkey "d") on a home target of one of `ranks`.
fn read_cap_on(rt: &tokio::runtime::Runtime, client: &Client, key: &[u8], cont: strata_types::ContId, o: &ObjHandle, ranks: &[u64]) -> Option<String> {
    let pool = rt.block_on(client.pool("tank")).unwrap();
    let shard = *pool.layout(o.oid).unwrap().group(0).iter().find(|s| !s.is_spare && ranks.contains(&u64::from(s.target.rank.0)))?;
    let claims = strata_rpc::capability::CapClaims {
        version: 1,
        pool: pool.info().unwrap().id,
        cont,
        oid: o.oid,
        target: shard.target,
        group: 0,
        rights: strata_rpc::capability::CapRights::Read,
        expires_ms: strata_rpc::capability::now_ms() + 3_600_000,
    };
    Some(strata_rpc::capability::sign(key, &claims))
}

#[test]
fn ranks_of_one_host_lost_at_once_count_once_against_the_redundancy_factor() {
    // Four hosts of two ranks (/node-0 .. /node-3). Heartbeats are long: failures are declared
    // with `pool exclude`, in the order the test needs, right after the SIGKILLs.
    let RfSetup { c, rt, per_rank, client, objs } = rf_setup(8, &["--ranks-per-host", "2", "--heartbeat-timeout-ms", "60000"]);
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let rank = |dir: usize| c.rank_of_dir(dir);
    let exclude = |dir: usize| {
        c.json(&["pool", "exclude", "tank", "--rank", &rank(dir).to_string()]);
    };
    let sorted = |dirs: &[usize]| {
        let mut v: Vec<u64> = dirs.iter().map(|d| rank(*d)).collect();
        v.sort();
        serde_json::json!(v)
    };
    // r1 gets a capability key (as file-system containers have), and a read capability for a
    // copy on a rank that survives everything below (dirs 0, 1 and 7).
    let key = [7u8; 32];
    let mgmt = strata_rpc::mgmt_client::MgmtClient::new(cf.access_points.clone(), Some(cf.cluster.clone()));
    let set_key = strata_rpc::mgmt_msg::MgmtCmd::SetProp { pool: "tank".into(), cont: "r1".into(), key: strata_rpc::capability::CAP_KEY_PROP.into(), value: strata_rpc::capability::key_to_hex(&key) };
    rt.block_on(mgmt.write(set_key)).unwrap();
    let survivors = [rank(0), rank(1), rank(7)];
    let r1_id = rt.block_on(client.container("tank", "r1")).unwrap().info.id;
    let (capped, cap) = objs[1].iter().enumerate().find_map(|(i, o)| read_cap_on(&rt, &client, &key, r1_id, o, &survivors).map(|t| (i, t))).expect("some RP_2G1 object has a copy on a surviving rank");
    let cap_get = |cap: &str| c.cmd(&["obj", "get", "--cap", cap, "--dkey", "d", "--akey", "a"]);
    let out = cap_get(&cap);
    assert_eq!(out.stdout, rf_value("r1", capped), "the capability reads while healthy: {}", String::from_utf8_lossy(&out.stderr));

    // Both ranks of /node-1 at once: the second is excluded while the first one's rebuild cannot
    // have finished (the second, still joined, owes its part of it).
    c.kill9_rank_dir(2);
    c.kill9_rank_dir(3);
    exclude(2);
    exclude(3);
    assert_eq!(out_or_down(&c), 2 * per_rank);
    let r0 = cont_status(&c, "r0");
    assert_eq!((&r0["unclean"]["ranks"], &r0["unclean"]["domains"]), (&sorted(&[2]), &serde_json::json!(["/node-1"])), "rf 0 survives no failure (marked at the first): {r0}");
    assert_eq!(cont_status(&c, "r1"), "healthy", "two ranks of one host hold at most one copy of an RP_2G1 group");
    assert_eq!(cont_status(&c, "r2"), "healthy");
    let fresh = rt.block_on(client.container("tank", "r1")).unwrap();
    let again: Vec<ObjHandle> = objs[1].iter().map(|o| fresh.object(o.oid)).collect();
    rt.block_on(rf_check_exact(&objs[1], "r1", "one host lost (degraded)"));
    rt.block_on(rf_check_exact(&again, "r1", "one host lost (degraded, new handle)"));
    // Once rebuilt, an object that had both copies there would read as absent: none does.
    poll("rebuild of /node-1", Duration::from_secs(180), || settled(&c, 2 * per_rank));
    rt.block_on(rf_check_exact(&again, "r1", "one host lost, rebuilt"));
    rt.block_on(rf_check_exact(&objs[2], "r2", "one host lost, rebuilt"));

    // /node-2 and a rank of /node-3 die together. The host is excluded first: still one
    // domain; its rebuild cannot finish while dir 6, still joined, owes its part, so excluding
    // dir 6 makes two domains failed at once.
    for dir in [4, 5, 6] {
        c.kill9_rank_dir(dir);
    }
    exclude(4);
    exclude(5);
    assert_eq!(cont_status(&c, "r1"), "healthy", "one host failed (the earlier one is rebuilt)");
    let s = target_states(&c);
    assert_eq!((s.iter().filter(|x| *x == "Down").count(), s.iter().filter(|x| *x == "DownOut").count()), (2 * per_rank, 2 * per_rank), "dir 6 was not failed yet when r1 was checked: {s:?}");
    exclude(6);
    let r1 = cont_status(&c, "r1");
    assert_eq!((&r1["unclean"]["ranks"], &r1["unclean"]["domains"]), (&sorted(&[4, 5, 6]), &serde_json::json!(["/node-2", "/node-3"])), "{r1}");
    assert_eq!(cont_status(&c, "r2"), "healthy", "two domains are within rf 2");
    let human = String::from_utf8_lossy(&c.cmd(&["cont", "query", "tank", "r1"]).stdout).into_owned();
    assert!(human.contains("failed in 2 fault domains (/node-2, /node-3) before rebuild restored redundancy"), "{human}");
    rt.block_on(rf_check_exact(&objs[2], "r2", "two domains lost at once"));
    match rt.block_on(again[0].get(b"d", b"a")) {
        Err(strata_client::ClientError::Unclean { .. }) => {}
        other => panic!("r1 through an open handle once unclean: {other:?}"),
    }

    // A read by capability alone names no handle; it is refused all the same, with the error
    // an open would give, and served again once the loss is accepted.
    let err = c.fails(&["obj", "get", "--cap", &cap, "--dkey", "d", "--akey", "a"]);
    assert!(err.contains("container tank/r1 is unclean") && err.contains("'strata cont set-prop tank r1 --status healthy'"), "{err}");
    let fetch = strata_rpc::engine_msg::FetchKind::Single { akey: b"a".to_vec() };
    match rt.block_on(client.cap_fetch(&cap, b"d", fetch.clone(), strata_types::Epoch::MAX)) {
        Err(strata_client::ClientError::Unclean { pool, cont, rf: 1, reason }) => assert_eq!((pool.as_str(), cont.as_str(), reason.domains.len()), ("tank", "r1", 2)),
        other => panic!("a capability read of an unclean container: {other:?}"),
    }
    assert_eq!(c.json(&["cont", "set-prop", "tank", "r1", "--status", "healthy"])["status"], "healthy");
    let (found, _, data) = rt.block_on(client.cap_fetch(&cap, b"d", fetch, strata_types::Epoch::MAX)).unwrap();
    assert!(found.is_some());
    assert_eq!(&data[..], &rf_value("r1", capped)[..]);
}

/// A rank that stalls past the heartbeat timeout (SIGSTOP: a long pause, a partition) is marked
/// dead and rebuilt around; when the same process answers again it is reintegrated by itself
/// (as Ceph marks a returning OSD up again): its targets are resynced and come back `UP`, the
/// writes it missed read back, and the objects only it held (S1) are not lost.
#[test]
fn a_rank_marked_dead_while_alive_is_reintegrated_when_heard_from_again() {
    let RfSetup { c, rt, per_rank, client, objs } = rf_setup(5, &["--heartbeat-timeout-ms", "3000"]);
    // Not an access point: the management service keeps its leader.
    let up: serde_json::Value = serde_json::from_slice(&std::fs::read(c.path().join("up.json")).unwrap()).unwrap();
    let dir = 4;
    assert!(up["access_points"].as_u64().unwrap() <= dir as u64, "rank-{dir} is an access point: {up}");
    let rank = c.rank_of_dir(dir);
    let pid = c.server_pid(dir).expect("the server of rank-4");
    let rank_state = |c: &Cluster| c.json(&["system", "query"])["ranks"].as_array().unwrap().iter().find(|r| r["rank"].as_u64() == Some(rank)).map(|r| r["state"].as_str().unwrap().to_owned());
    // SAFETY: signals to a child process of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    poll("the stalled rank to be marked dead", Duration::from_secs(30), || (rank_state(&c).as_deref() == Some("Dead")).then_some(()));
    poll("rebuild around the stalled rank", Duration::from_secs(180), || settled(&c, per_rank));
    // Writes it misses while away.
    let v2 = |i: usize| format!("r1-object{i}-while-away").into_bytes();
    rt.block_on(in_batches(&objs[1], move |i, o| async move {
        o.put(b"d", b"a", &v2(i)).await.unwrap_or_else(|e| panic!("r1 object {i}: write while a rank is away: {e}"));
    }));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    poll("the returned rank's targets to be resynced and UP", Duration::from_secs(180), || target_states(&c).iter().all(|s| s == "Up").then_some(()));
    assert_eq!(rank_state(&c).as_deref(), Some("Joined"));
    rt.block_on(in_batches(&objs[1], move |i, o| async move {
        assert_eq!(o.get(b"d", b"a").await.unwrap().as_deref(), Some(&v2(i)[..]), "r1 object {i} after the rank returned");
    }));
    // rf 0 was marked unclean when the rank was lost, and stays so until an administrator
    // says otherwise; then every object only that rank held is there.
    assert_eq!(cont_status(&c, "r0")["unclean"]["ranks"], serde_json::json!([rank]));
    c.json(&["cont", "set-prop", "tank", "r0", "--status", "healthy"]);
    let fresh = rt.block_on(client.container("tank", "r0")).unwrap();
    let again: Vec<ObjHandle> = objs[0].iter().map(|o| fresh.object(o.oid)).collect();
    rt.block_on(rf_check_exact(&again, "r0", "the stalled rank returned"));
    rt.block_on(rf_check_exact(&objs[2], "r2", "the stalled rank returned"));
}

#[test]
fn bench_rebuild_measures_the_rebuild_alone_and_under_writes_against_fio() {
    // The baseline runs fio itself: it must be installed (scripts/test installs fio).
    assert!(std::process::Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success()), "fio is not installed: apt-get install fio");
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("c");
    let out = std::process::Command::new(common::BIN)
        .args(["bench", "rebuild", "--size", "96M", "--writers", "2", "--before-secs", "1", "--json", "--dir"])
        .arg(&cluster_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let fio = v["fio_write_mib_per_s"].as_f64().unwrap_or_else(|| panic!("fio ran: {v}"));
    assert!(fio > 0.0, "{v}");
    // RP_2G1 on 4 ranks: a rank holds about half of the 96 MiB's two copies; the first
    // rebuild moves what the excluded rank held, the second what the next one held by then.
    let alone = &v["alone"];
    let moved = alone["rebuild_bytes"].as_u64().unwrap();
    assert!((24 << 20..=96 << 20).contains(&moved), "the rebuild alone moved {moved} bytes: {v}");
    let rate = alone["rebuild_mib_per_s"].as_f64().unwrap();
    assert!((alone["rebuild_vs_fio"].as_f64().unwrap() - rate / fio).abs() < 1e-9, "{v}");
    let under = &v["under_writes"];
    assert_ne!(under["excluded_rank"], alone["excluded_rank"], "each rebuild excludes another rank: {v}");
    assert!(under["rebuild_bytes"].as_u64().unwrap() >= 24 << 20, "{v}");
    assert_eq!(under["writers"], 2, "{v}");
    let (before, during) = (under["foreground_before_mib_per_s"].as_f64().unwrap(), under["foreground_during_mib_per_s"].as_f64().unwrap());
    assert!(before > 0.0 && during > 0.0, "the writers wrote before and during the rebuild: {v}");
    assert!((under["foreground_during_vs_before"].as_f64().unwrap() - during / before).abs() < 0.01, "{v}");
    // The bench stops the cluster it started.
    common::poll("the bench's ranks to exit", Duration::from_secs(30), || {
        let ps = std::process::Command::new("pgrep").args(["-f", &cluster_dir.display().to_string()]).output().unwrap();
        ps.stdout.is_empty().then_some(())
    });
    // Bad input gets a clear error, not a panic.
    let out = std::process::Command::new(common::BIN).args(["bench", "rebuild", "--ranks", "3", "--no-baseline"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--ranks 4"), "{out:?}");
}
