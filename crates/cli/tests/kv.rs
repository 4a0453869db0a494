//! Transactional KV with real processes: the CLI end to end, conflicting readers and writers
//! meeting a prepared transaction, list-append histories from several client processes
//! checked for serializability (with a rank and a client SIGKILLed mid-run, and once with
//! isolation deliberately broken to prove the checker fails), and the bank workload whose
//! total never changes in any snapshot.
//!
//! Client processes are this test binary started again on the ignored test `kv_worker`, with
//! its job in the environment; each writes its history as JSON lines, flushed per line, so a
//! SIGKILLed client leaves a readable prefix (an unfinished commit is "indeterminate").

mod common;

use common::{poll, Cluster, Rng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_client::{Client, ClusterFile};
use strata_kv::history_check::{self, MicroOp, Outcome, TxnRecord};
use strata_kv::{KvError, KvStore};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn open_store(cluster_file: &Path, store: &str) -> KvStore {
    let (pool, cont) = store.split_once('/').unwrap();
    let client = Client::connect(&ClusterFile::load(cluster_file).unwrap()).await.unwrap();
    let cont = client.container(pool, cont).await.unwrap();
    KvStore::open(&cont).await.unwrap()
}

/// Two keys of `kv` on different shards.
fn keys_on_two_shards(kv: &KvStore, prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let a = format!("{prefix}-0").into_bytes();
    let b = (1..1000).map(|i| format!("{prefix}-{i}").into_bytes()).find(|k| kv.shard_map().shard_of(k) != kv.shard_map().shard_of(&a)).unwrap();
    (a, b)
}

/// The rank directory (not 0: it runs the management service) whose rank leads the shard of
/// the first key of `candidates` led by such a rank: killing it kills a transaction leader.
fn leader_dir(c: &Cluster, kv: &KvStore, candidates: impl Iterator<Item = Vec<u8>>, ranks: usize) -> (Vec<u8>, usize) {
    let dirs: Vec<(usize, u64)> = (1..ranks).map(|i| (i, c.rank_of_dir(i))).collect();
    for k in candidates {
        let leader = kv.locate(&k).unwrap().leader_rank.unwrap();
        if let Some((i, _)) = dirs.iter().find(|(_, r)| *r == u64::from(leader)) {
            return (k, *i);
        }
    }
    panic!("no key led by a rank outside directory 0");
}

#[test]
fn cli_end_to_end_and_bad_input() {
    let c = Cluster::start(&["--ranks", "3"]);
    let v = c.json(&["kv", "create", "tank/kv"]);
    assert_eq!(v["shard"], "hash:64");
    assert_eq!(v["oclass"], "RP_3GX");
    for (k, val) in [("apple", "1"), ("banana", "2"), ("cherry", "3")] {
        let v = c.json(&["kv", "put", "tank/kv", k, val]);
        assert!(v["epoch"].as_u64().unwrap() > 0);
    }
    assert_eq!(c.json(&["kv", "get", "tank/kv", "banana"])["value"], "2");
    let out = c.cmd(&["kv", "get", "tank/kv", "banana"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
    assert_eq!(c.json(&["kv", "get", "tank/kv", "durian"])["found"], false);
    assert!(c.fails(&["kv", "get", "tank/kv", "durian"]).contains("not found"));

    // Scans cross the 64 hash shards and come back in key order; END is exclusive.
    let rows = c.json(&["kv", "scan", "tank/kv"]);
    let keys: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["apple", "banana", "cherry"]);
    let rows = c.json(&["kv", "scan", "tank/kv", "b", "cherry"]);
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(c.json(&["kv", "scan", "tank/kv", "--limit", "2"]).as_array().unwrap().len(), 2);

    // Compare-and-set: success, failure (exit 1, current value named), create-if-absent.
    assert_eq!(c.json(&["kv", "cas", "tank/kv", "apple", "1", "10"])["swapped"], true);
    let err = c.fails(&["kv", "cas", "tank/kv", "apple", "1", "11"]);
    assert!(err.contains("compare-and-set failed") && err.contains("'10'"), "{err}");
    c.json(&["kv", "cas", "tank/kv", "fig", "-", "7"]);
    assert_eq!(c.json(&["kv", "get", "tank/kv", "fig"])["value"], "7");

    // A snapshot keeps the state of every shard at one epoch.
    let snap = c.json(&["kv", "snapshot", "create", "tank/kv", "before"]);
    assert!(snap["epoch"].as_u64().unwrap() > 0);
    c.json(&["kv", "del", "tank/kv", "banana"]);
    c.json(&["kv", "put", "tank/kv", "apple", "99"]);
    assert_eq!(c.json(&["kv", "get", "tank/kv", "apple", "--at", "before"])["value"], "10");
    assert_eq!(c.json(&["kv", "get", "tank/kv", "banana", "--at", "before"])["value"], "2");
    assert_eq!(c.json(&["kv", "get", "tank/kv", "banana"])["found"], false);
    let then: Vec<String> = c.json(&["kv", "scan", "tank/kv", "--at", "before"]).as_array().unwrap().iter().map(|r| format!("{}={}", r["key"].as_str().unwrap(), r["value"].as_str().unwrap())).collect();
    assert_eq!(then, ["apple=10", "banana=2", "cherry=3", "fig=7"]);
    let list = c.json(&["kv", "snapshot", "list", "tank/kv"]);
    assert_eq!(list["before"], snap["epoch"]);
    let err = c.fails(&["kv", "get", "tank/kv", "apple", "--at", "nosuch"]);
    assert!(err.contains("no snapshot named 'nosuch'"), "{err}");

    // A transaction script: all or nothing, results in order.
    let txn = |script: &str, json: bool| {
        let mut args = vec!["kv", "txn", "tank/kv"];
        if json {
            args.push("--json");
        }
        let mut child = Command::new(common::BIN).args(&args).env("STRATA_CLUSTER", c.cluster_file()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = txn("# move 5\nget apple\nput apple 94\nput \"grape fruit\" 5\ncas cherry 3 4\nscan a c\n", true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["committed"], true);
    assert_eq!(v["results"][0]["value"], "99");
    // The scan sees the transaction's own writes.
    let scanned: Vec<&str> = v["results"][4]["rows"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(scanned, ["apple"]);
    assert_eq!(c.json(&["kv", "get", "tank/kv", "grape fruit"])["value"], "5");
    assert_eq!(c.json(&["kv", "get", "tank/kv", "cherry"])["value"], "4");
    // A failed compare-and-set fails the whole transaction: nothing of it is visible.
    let out = txn("put kiwi 1\ncas cherry 3 5\n", false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compare-and-set failed"));
    assert_eq!(c.json(&["kv", "get", "tank/kv", "kiwi"])["found"], false);
    // Syntax errors name the line; nothing runs.
    let out = txn("put lime 1\nfrobnicate x\n", false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.json(&["kv", "get", "tank/kv", "lime"])["found"], false);

    // A transaction past its deadline: a clear error, nothing written.
    let mut child = Command::new(common::BIN).args(["kv", "txn", "tank/kv", "--deadline-ms", "0"]).env("STRATA_CLUSTER", c.cluster_file()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"put mango 1\nput papaya 2\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("past its deadline"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.json(&["kv", "get", "tank/kv", "mango"])["found"], false);

    // Bad input: oversized key and value, unknown store, wrong container type, bad shard function.
    let long_key = "k".repeat(strata_kv::KEY_BYTES_MAX + 1);
    assert!(c.fails(&["kv", "put", "tank/kv", &long_key, "v"]).contains("key is 1025 bytes; the limit is 1024"));
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), vec![b'x'; strata_kv::VALUE_BYTES_MAX + 1]).unwrap();
    let out = Command::new(common::BIN).args(["kv", "put", "tank/kv", "big"]).env("STRATA_CLUSTER", c.cluster_file()).stdin(std::fs::File::open(big.path()).unwrap()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("value is 1048577 bytes"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(c.fails(&["kv", "get", "tank/nosuch", "a"]).contains("nosuch"));
    c.json(&["cont", "create", "tank", "plain"]);
    assert!(c.fails(&["kv", "get", "tank/plain", "a"]).contains("not kv"));
    assert!(c.fails(&["kv", "create", "tank/bad", "--shard", "modulo:3"]).contains("shard function"));

    // A range-sharded store: `locate` names the shard; scans stay in key order.
    c.json(&["kv", "create", "tank/ranged", "--shard", "range:g,n", "--oclass", "RP_2GX"]);
    for k in ["zebra", "apple", "melon", "kiwi", "grape"] {
        c.json(&["kv", "put", "tank/ranged", k, k]);
    }
    let keys: Vec<String> = c.json(&["kv", "scan", "tank/ranged"]).as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, ["apple", "grape", "kiwi", "melon", "zebra"]);
    assert_eq!(c.json(&["kv", "locate", "tank/ranged", "melon"])["shard"], 1);
    assert_eq!(c.json(&["kv", "locate", "tank/ranged", "zebra"])["shard"], 2);
}

#[test]
fn prepared_transactions_make_readers_ask_the_leader_and_writers_wait() {
    let c = Cluster::start(&["--ranks", "3"]);
    c.json(&["kv", "create", "tank/kv"]);
    rt().block_on(async {
        let kv = open_store(&c.cluster_file(), "tank/kv").await;
        let (k1, k2) = keys_on_two_shards(&kv, "acct");
        kv.put(&k1, b"0").await.unwrap();
        kv.put(&k2, b"0").await.unwrap();

        // An older writer waits for the prepared transaction; a younger one that may hold
        // other locks (two shards: two-phase) aborts at once (wait-die).
        let mut older = kv.begin();
        let mut t1 = kv.begin();
        t1.put(&k1, b"t1").unwrap();
        t1.put(&k2, b"t1").unwrap();
        let p1 = t1.prepare_two_phase().await.unwrap();
        let mut younger = kv.begin();
        younger.put(&k1, b"young").unwrap();
        younger.put(&k2, b"young").unwrap();
        match younger.commit().await {
            Err(e @ KvError::Conflict { .. }) => assert!(e.is_retryable()),
            other => panic!("a younger writer must abort on a prepared key, got {other:?}"),
        }
        older.put(&k1, b"older").unwrap();
        let mut waiter = tokio::spawn(older.commit());
        assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiter).await.is_err(), "the older writer must wait while the key is locked");
        let c1 = p1.commit().await.unwrap();
        let c_older = waiter.await.unwrap().expect("the waiting writer commits once the lock is released");
        assert!(c_older > c1);
        assert_eq!(kv.get(&k1).await.unwrap().as_deref(), Some(&b"older"[..]));
        assert_eq!(kv.get(&k2).await.unwrap().as_deref(), Some(&b"t1"[..]));

        // The client dies right after the commit point: readers meet the intents, ask the
        // transaction's leader (its coordinator shard), learn it committed and resolve it.
        let mut t2 = kv.begin();
        t2.put(&k1, b"t2").unwrap();
        t2.put(&k2, b"t2").unwrap();
        let p2 = t2.prepare_two_phase().await.unwrap();
        let c2 = p2.decide_only().await.unwrap();
        drop(p2);
        assert_eq!(kv.get(&k2).await.unwrap().as_deref(), Some(&b"t2"[..]));
        assert_eq!(kv.get(&k1).await.unwrap().as_deref(), Some(&b"t2"[..]));
        assert_eq!(kv.get_at(&k1, c2.prev()).await.unwrap().as_deref(), Some(&b"older"[..]));

        // The client dies after prepare: after the abandonment timeout a reader aborts it at
        // the coordinator; neither key shows any of it.
        let mut t3 = kv.begin();
        t3.put(&k1, b"t3").unwrap();
        t3.put(&k2, b"t3").unwrap();
        let p3 = t3.prepare_two_phase().await.unwrap();
        drop(p3);
        assert_eq!(kv.get(&k1).await.unwrap().as_deref(), Some(&b"t2"[..]));
        assert_eq!(kv.get(&k2).await.unwrap().as_deref(), Some(&b"t2"[..]));
        kv.put(&k1, b"after").await.unwrap();

        // A read-modify-write that lost the race conflicts instead of overwriting.
        let mut a = kv.begin();
        let mut b = kv.begin();
        assert_eq!(a.get(&k1).await.unwrap().as_deref(), Some(&b"after"[..]));
        assert_eq!(b.get(&k1).await.unwrap().as_deref(), Some(&b"after"[..]));
        a.put(&k1, b"a").unwrap();
        b.put(&k1, b"b").unwrap();
        a.commit().await.unwrap();
        assert!(matches!(b.commit().await, Err(KvError::Conflict { .. })));
        assert_eq!(kv.get(&k1).await.unwrap().as_deref(), Some(&b"a"[..]));

        // Write skew across shards is refused (serializable, not snapshot isolation).
        let mut x = kv.begin();
        let mut y = kv.begin();
        x.get(&k1).await.unwrap();
        y.get(&k2).await.unwrap();
        x.put(&k2, b"x").unwrap();
        y.put(&k1, b"y").unwrap();
        let rx = x.commit().await;
        let ry = y.commit().await;
        assert!(rx.is_ok() != ry.is_ok(), "exactly one of two write-skewed transactions commits: {rx:?} {ry:?}");

        // A transaction past its deadline writes nothing.
        let mut late = kv.begin();
        late.put(&k1, b"late").unwrap();
        late.put(&k2, b"late").unwrap();
        late.set_deadline(Duration::ZERO);
        assert!(matches!(late.commit().await, Err(KvError::Deadline { .. })));
        assert_ne!(kv.get(&k1).await.unwrap().as_deref(), Some(&b"late"[..]));
        assert_ne!(kv.get(&k2).await.unwrap().as_deref(), Some(&b"late"[..]));
    });
}

// ---- worker processes --------------------------------------------------------------------

/// The entry point of client processes started by the tests below (does nothing by itself).
#[test]
#[ignore = "a client process of the multi-process KV tests, started by them"]
fn kv_worker() {
    let Ok(kind) = std::env::var("KV_WORKER") else { return };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let cluster = PathBuf::from(env("KV_CLUSTER"));
    let store = env("KV_STORE");
    let id: u64 = env("KV_ID").parse().unwrap();
    let txns: u64 = env("KV_TXNS").parse().unwrap();
    let keys: u64 = env("KV_KEYS").parse().unwrap();
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(env("KV_OUT")).unwrap();
    rt().block_on(async {
        let kv = open_store(&cluster, &store).await;
        match kind.as_str() {
            "append" => append_worker(&kv, id, txns, keys, &mut out).await,
            "bank" => bank_worker(&kv, id, txns, keys, &mut out).await,
            other => panic!("unknown worker {other}"),
        }
    });
}

fn log(out: &mut std::fs::File, v: Value) {
    let mut line = v.to_string();
    line.push('\n');
    // One write per line: a SIGKILL leaves whole lines and at most one partial last line.
    out.write_all(line.as_bytes()).unwrap();
}

/// What a client does after a conflict: wait a little, more after each failure, jittered so
/// that clients that collided do not collide again.
async fn backoff(attempt: u32, rng: &mut Rng) {
    let cap_ms = (2u64 << attempt.min(6)).min(100);
    tokio::time::sleep(Duration::from_millis(1 + rng.next() % cap_ms)).await;
}

fn parse_list(v: Option<Vec<u8>>) -> Vec<u64> {
    v.map(|b| String::from_utf8(b).unwrap().split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()).unwrap_or_default()
}

/// Definitely not applied: the database said so before or at the commit.
fn definite_abort(e: &KvError, committing: bool) -> bool {
    !committing || matches!(e, KvError::Conflict { .. } | KvError::CasFailed { .. } | KvError::Deadline { .. })
}

async fn append_worker(kv: &KvStore, id: u64, txns: u64, keys: u64, out: &mut std::fs::File) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut next_value = (id + 1) * 10_000_000;
    for t in 0..txns {
        let n = 1 + rng.next() % 4;
        let plan: Vec<(bool, u64)> = (0..n).map(|_| (rng.next() & 1 == 0, rng.next() % keys)).collect();
        for attempt in 0..100 {
            let ops: Vec<(bool, u64, u64)> = plan
                .iter()
                .map(|&(append, key)| {
                    next_value += 1;
                    (append, key, next_value)
                })
                .collect();
            let appends: Vec<Value> = ops.iter().filter(|o| o.0).map(|o| json!([o.1, o.2])).collect();
            let tid = format!("{id}-{t}-{attempt}");
            log(out, json!({"id": tid, "phase": "start", "appends": appends}));
            let mut committing = false;
            let r: Result<Vec<Value>, KvError> = async {
                let mut txn = kv.begin();
                let mut done = Vec::new();
                for &(append, key, value) in &ops {
                    let k = format!("la/{key}");
                    let mut list = parse_list(txn.get(k.as_bytes()).await?);
                    if append {
                        list.push(value);
                        let s: Vec<String> = list.iter().map(u64::to_string).collect();
                        txn.put(k.as_bytes(), s.join(",").as_bytes())?;
                        done.push(json!({"append": [key, value]}));
                    } else {
                        done.push(json!({"read": [key, list]}));
                    }
                }
                committing = true;
                txn.commit().await?;
                Ok(done)
            }
            .await;
            match r {
                Ok(done) => {
                    log(out, json!({"id": tid, "phase": "end", "outcome": "ok", "ops": done}));
                    break;
                }
                Err(e) if definite_abort(&e, committing) => {
                    log(out, json!({"id": tid, "phase": "end", "outcome": "fail", "error": e.to_string()}));
                    backoff(attempt, &mut rng).await;
                }
                Err(e) => {
                    log(out, json!({"id": tid, "phase": "end", "outcome": "info", "error": e.to_string()}));
                    break;
                }
            }
        }
    }
}

async fn bank_worker(kv: &KvStore, id: u64, transfers: u64, accounts: u64, out: &mut std::fs::File) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (id + 7).wrapping_mul(0x9e37_79b9));
    for seq in 0..transfers {
        let a = rng.next() % accounts;
        let b = (a + 1 + rng.next() % (accounts - 1)) % accounts;
        let amount = 1 + rng.next() % 20;
        let record = format!("xfer/{id}/{seq}");
        log(out, json!({"seq": seq, "phase": "start"}));
        for attempt in 0..100 {
            let mut committing = false;
            let r: Result<bool, KvError> = async {
                let mut txn = kv.begin();
                let ka = format!("acct/{a:03}");
                let kb = format!("acct/{b:03}");
                let ba: i64 = String::from_utf8(txn.get(ka.as_bytes()).await?.unwrap()).unwrap().parse().unwrap();
                let bb: i64 = String::from_utf8(txn.get(kb.as_bytes()).await?.unwrap()).unwrap().parse().unwrap();
                if ba < amount as i64 {
                    return Ok(false);
                }
                txn.put(ka.as_bytes(), (ba - amount as i64).to_string().as_bytes())?;
                txn.put(kb.as_bytes(), (bb + amount as i64).to_string().as_bytes())?;
                txn.put(record.as_bytes(), format!("{a} {b} {amount}").as_bytes())?;
                committing = true;
                txn.commit().await?;
                Ok(true)
            }
            .await;
            match r {
                Ok(applied) => {
                    log(out, json!({"seq": seq, "phase": "end", "outcome": if applied { "ok" } else { "skipped" }}));
                    break;
                }
                Err(e) if definite_abort(&e, committing) => backoff(attempt, &mut rng).await,
                Err(e) => {
                    log(out, json!({"seq": seq, "phase": "end", "outcome": "info", "error": e.to_string()}));
                    break;
                }
            }
        }
    }
}

fn spawn_worker(c: &Cluster, kind: &str, store: &str, id: u64, txns: u64, keys: u64, out: &Path) -> Child {
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args(["kv_worker", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KV_WORKER", kind)
        .env("KV_CLUSTER", c.cluster_file())
        .env("KV_STORE", store)
        .env("KV_ID", id.to_string())
        .env("KV_TXNS", txns.to_string())
        .env("KV_KEYS", keys.to_string())
        .env("KV_OUT", out)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_workers(children: &mut [Child], timeout: Duration) {
    let start = Instant::now();
    for ch in children.iter_mut() {
        let left = timeout.saturating_sub(start.elapsed());
        let status = poll("a KV client process to finish", left, || ch.try_wait().unwrap());
        assert!(status.success(), "a KV client process failed: {status}");
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Lines ending with a committed or definite answer, over every file.
fn progress(files: &[PathBuf]) -> usize {
    files.iter().map(|f| lines(f).iter().filter(|v| v["phase"] == "end").count()).sum()
}

fn kill9(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

struct History {
    records: Vec<TxnRecord>,
    /// Appends of committed transactions, and of indeterminate ones, per transaction.
    committed: Vec<Vec<(String, u64)>>,
    indeterminate: Vec<Vec<(String, u64)>>,
    aborted_values: BTreeSet<u64>,
}

fn load_history(files: &[PathBuf]) -> History {
    let mut h = History { records: Vec::new(), committed: Vec::new(), indeterminate: Vec::new(), aborted_values: BTreeSet::new() };
    for f in files {
        let mut starts: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut ends: HashMap<String, Value> = HashMap::new();
        for v in lines(f) {
            let id = v["id"].as_str().unwrap().to_owned();
            if v["phase"] == "start" {
                let appends = v["appends"].as_array().unwrap().iter().map(|a| (a[0].as_u64().unwrap().to_string(), a[1].as_u64().unwrap())).collect();
                starts.insert(id, appends);
            } else {
                ends.insert(id, v);
            }
        }
        for (id, appends) in starts {
            let end = ends.get(&id);
            let outcome = end.map(|e| e["outcome"].as_str().unwrap()).unwrap_or("info");
            let ops: Vec<MicroOp> = match (outcome, end) {
                ("ok", Some(e)) => e["ops"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|op| match op.get("append") {
                        Some(a) => MicroOp::Append { key: a[0].as_u64().unwrap().to_string(), value: a[1].as_u64().unwrap() },
                        None => {
                            let r = &op["read"];
                            MicroOp::Read { key: r[0].as_u64().unwrap().to_string(), values: Some(r[1].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()) }
                        }
                    })
                    .collect(),
                _ => appends.iter().map(|(k, v)| MicroOp::Append { key: k.clone(), value: *v }).collect(),
            };
            let outcome = match outcome {
                "ok" => {
                    h.committed.push(appends);
                    Outcome::Committed
                }
                "fail" => {
                    h.aborted_values.extend(appends.iter().map(|a| a.1));
                    Outcome::Aborted
                }
                _ => {
                    h.indeterminate.push(appends);
                    Outcome::Indeterminate
                }
            };
            h.records.push(TxnRecord { ops, outcome });
        }
    }
    h
}

/// Read every key at one epoch (the final state), add it to the history as a committed
/// read-only transaction, and check: serializable; every committed append present; no
/// aborted append; every indeterminate transaction all or nothing.
fn check_final(c: &Cluster, store: &str, keys: u64, mut h: History) -> history_check::CheckReport {
    let finals: BTreeMap<String, Vec<u64>> = rt().block_on(async {
        let kv = open_store(&c.cluster_file(), store).await;
        let mut t = kv.begin();
        let mut m = BTreeMap::new();
        for k in 0..keys {
            m.insert(k.to_string(), parse_list(t.get(format!("la/{k}").as_bytes()).await.unwrap()));
        }
        m
    });
    h.records.push(TxnRecord { ops: finals.iter().map(|(k, v)| MicroOp::Read { key: k.clone(), values: Some(v.clone()) }).collect(), outcome: Outcome::Committed });
    let present: BTreeSet<(String, u64)> = finals.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), *v))).collect();
    for appends in &h.committed {
        for a in appends {
            assert!(present.contains(a), "committed append {a:?} is missing from the final state");
        }
    }
    for v in present.iter().map(|a| a.1) {
        assert!(!h.aborted_values.contains(&v), "aborted append {v} is visible");
    }
    for appends in &h.indeterminate {
        let seen = appends.iter().filter(|a| present.contains(a)).count();
        assert!(seen == 0 || seen == appends.len(), "a transaction is partly visible: {seen} of {appends:?}");
    }
    let report = history_check::check(&h.records);
    eprintln!("history: {} transactions, {} committed, {} indeterminate, {} dependency edges, {} anomalies", report.txns_checked, h.committed.len(), h.indeterminate.len(), report.edges, report.anomalies.len());
    report
}

fn run_append(c: &Cluster, store: &str, workers: u64, txns: u64, keys: u64) -> (Vec<Child>, Vec<PathBuf>) {
    let files: Vec<PathBuf> = (0..workers).map(|i| c.path().join(format!("{}-append-{i}.jsonl", store.replace('/', "-")))).collect();
    let children = files.iter().enumerate().map(|(i, f)| spawn_worker(c, "append", store, i as u64, txns, keys, f)).collect();
    (children, files)
}

/// A 3-rank cluster whose engines have `knob` (a debug-build environment variable) set,
/// `workers` client processes running `txns` list-append transactions each over `keys` keys;
/// the final state is checked (`check_final`) and the history must be serializable. Returns
/// the numbers of committed and indeterminate transactions.
fn serializable_append_run(knob: Option<(&str, &str)>, workers: u64, txns: u64, keys: u64) -> (usize, usize) {
    if let Some((k, v)) = knob {
        std::env::set_var(k, v);
    }
    let c = Cluster::start(&["--ranks", "3"]);
    if let Some((k, _)) = knob {
        std::env::remove_var(k);
    }
    c.json(&["kv", "create", "tank/la"]);
    let (mut children, files) = run_append(&c, "tank/la", workers, txns, keys);
    wait_workers(&mut children, Duration::from_secs(400));
    let h = load_history(&files);
    let counts = (h.committed.len(), h.indeterminate.len());
    let report = check_final(&c, "tank/la", keys, h);
    assert!(report.is_serializable(), "anomalies: {:?}", report.anomalies.iter().take(5).map(ToString::to_string).collect::<Vec<_>>());
    counts
}

#[test]
fn list_append_histories_are_serializable() {
    // An answer lost to a timeout on a loaded machine ends its transaction indeterminate
    // (not retried): it did its work as far as the client can know.
    let (committed, indeterminate) = serializable_append_run(None, 4, 50, 6);
    assert!(committed + indeterminate >= 150 && committed >= 100, "only {committed} transactions committed ({indeterminate} indeterminate)");
}

/// Two resolvers of one transaction (its client's resolve, and a reader or writer settling
/// it) run at once; the last to finish must not put its version back into the leader's value
/// cache after a later transaction committed a newer one (a stale read, then a lost append).
/// Engines here finish each resolution a random 0-30 ms after its write (a debug-build knob),
/// so on three hot keys the last resolver often finishes after the next commit.
#[test]
fn racing_resolvers_leave_no_stale_cached_value() {
    serializable_append_run(Some(("STRATA_KV_TEST_RESOLVE_JITTER_MS", "30")), 6, 60, 3);
}

/// A one-round commit written by a leader whose answer never reaches the client (the leader
/// died, or a new map moved the shard, and its successor never heard of the transaction): the
/// client's retry meets the commit's own writes and is refused. That must not be reported as
/// a conflict, which promises that nothing was written. Engines here write every 4th one-round
/// commit, forget it and answer with an error (a debug-build knob); the checker then finds no
/// append of a transaction reported as failed in the final state.
#[test]
fn a_commit_whose_answer_was_lost_is_not_reported_as_a_conflict() {
    let (committed, indeterminate) = serializable_append_run(Some(("STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY", "4")), 4, 40, 4);
    assert!(indeterminate > 0, "no transaction ended indeterminate: the knob lost no answer");
    assert!(committed >= 60, "only {committed} transactions committed");
}

#[test]
fn broken_isolation_is_caught_by_the_checker() {
    // Engines of this cluster skip read validation (a debug-build knob): lost updates follow.
    std::env::set_var("STRATA_KV_UNSAFE_SKIP_READ_CHECKS", "1");
    let c = Cluster::start(&["--ranks", "3"]);
    std::env::remove_var("STRATA_KV_UNSAFE_SKIP_READ_CHECKS");
    c.json(&["kv", "create", "tank/la"]);
    let keys = 3;
    let (mut children, files) = run_append(&c, "tank/la", 4, 40, keys);
    wait_workers(&mut children, Duration::from_secs(400));
    let h = load_history(&files);
    let report = history_check::check(&{
        let mut r = h.records;
        let finals: Vec<MicroOp> = rt().block_on(async {
            let kv = open_store(&c.cluster_file(), "tank/la").await;
            let mut out = Vec::new();
            for k in 0..keys {
                out.push(MicroOp::Read { key: k.to_string(), values: Some(parse_list(kv.get(format!("la/{k}").as_bytes()).await.unwrap())) });
            }
            out
        });
        r.push(TxnRecord { ops: finals, outcome: Outcome::Committed });
        r
    });
    eprintln!("anomalies found: {}", report.anomalies.len());
    assert!(!report.is_serializable(), "the checker must flag a history without read validation");
}

#[test]
fn list_append_survives_killed_rank_and_client() {
    let c = Cluster::start(&["--ranks", "5", "--heartbeat-timeout-ms", "2000"]);
    c.json(&["kv", "create", "tank/la", "--oclass", "RP_3GX"]);
    let keys = 8;
    let (mut children, files) = run_append(&c, "tank/la", 4, 80, keys);
    poll("clients to make progress", Duration::from_secs(120), || (progress(&files) >= 40).then_some(()));
    // SIGKILL the rank leading the shard of the first key: the transaction leader (record
    // holder) of every transaction whose first written key it is.
    let kv = rt().block_on(open_store(&c.cluster_file(), "tank/la"));
    let (k, dir) = leader_dir(&c, &kv, (0..keys).map(|k| format!("la/{k}").into_bytes()), 5);
    eprintln!("killing rank directory {dir}, leader of the shard of {}", String::from_utf8_lossy(&k));
    c.kill9_rank_dir(dir);
    poll("clients to make progress after the rank died", Duration::from_secs(180), || (progress(&files) >= 120).then_some(()));
    // A client dies mid-transaction: its intents are aborted by whoever meets them.
    kill9(&mut children[0]);
    wait_workers(&mut children[1..], Duration::from_secs(600));
    let h = load_history(&files);
    let report = check_final(&c, "tank/la", keys, h);
    assert!(report.is_serializable(), "anomalies: {:?}", report.anomalies.iter().take(5).map(ToString::to_string).collect::<Vec<_>>());
}

#[test]
fn bank_total_holds_in_every_snapshot_through_kills() {
    let c = Cluster::start(&["--ranks", "5", "--heartbeat-timeout-ms", "2000"]);
    c.json(&["kv", "create", "tank/bank", "--oclass", "RP_3GX"]);
    let accounts = 100u64;
    let initial = 1000i64;
    let rt = rt();
    let kv = rt.block_on(open_store(&c.cluster_file(), "tank/bank"));
    rt.block_on(async {
        for a in 0..accounts {
            kv.put(format!("acct/{a:03}").as_bytes(), initial.to_string().as_bytes()).await.unwrap();
        }
    });
    let shards: BTreeSet<u32> = (0..accounts).map(|a| kv.shard_map().shard_of(format!("acct/{a:03}").as_bytes())).collect();
    assert!(shards.len() > 40, "100 accounts spread over the shards");
    let files: Vec<PathBuf> = (0..3).map(|i| c.path().join(format!("bank-{i}.jsonl"))).collect();
    let mut children: Vec<Child> = files.iter().enumerate().map(|(i, f)| spawn_worker(&c, "bank", "tank/bank", i as u64, 400, accounts, f)).collect();
    let total = |rows: &[(Vec<u8>, Vec<u8>)]| -> i64 { rows.iter().map(|(_, v)| String::from_utf8_lossy(v).parse::<i64>().unwrap()).sum() };
    let mut snapshots = 0;
    let mut check_snapshot = |phase: &str| {
        let r = rt.block_on(async {
            let name = format!("s{snapshots}-{phase}");
            let e = kv.snapshot_create(&name).await.unwrap();
            let rows = kv.scan_at(b"acct/", Some(b"acct0"), 1000, e).await.unwrap();
            assert_eq!(rows.len() as u64, accounts, "snapshot {name}");
            assert_eq!(total(&rows), accounts as i64 * initial, "total in snapshot {name}");
            let newest = kv.scan(b"acct/", Some(b"acct0"), 1000).await.unwrap();
            assert_eq!(total(&newest), accounts as i64 * initial, "total in a scan of the newest state");
            (e, rows)
        });
        snapshots += 1;
        r
    };
    poll("transfers to start", Duration::from_secs(120), || (progress(&files) >= 20).then_some(()));
    let first = check_snapshot("running");
    // Kill the leader of account 0's shard: the transaction leader of its transfers.
    let (k, dir) = leader_dir(&c, &kv, (0..accounts).map(|a| format!("acct/{a:03}").into_bytes()), 5);
    eprintln!("killing rank directory {dir}, leader of the shard of {}", String::from_utf8_lossy(&k));
    c.kill9_rank_dir(dir);
    check_snapshot("rank-killed");
    poll("transfers to continue after the rank died", Duration::from_secs(180), || (progress(&files) >= 120).then_some(()));
    kill9(&mut children[1]);
    check_snapshot("client-killed");
    // The killed rank comes back and is reintegrated (resynced, then it may lead again),
    // then another rank dies: shards it shares with the reintegrated one depend on the
    // intents and versions the latter received while it was away.
    let states = || -> Vec<String> { c.json(&["pool", "query", "tank"])["map"]["targets"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_owned()).collect() };
    let rank = c.rank_of_dir(dir);
    let mut back = c.restart_rank_dir(dir, 2000);
    poll("the rank to rejoin", Duration::from_secs(60), || c.json(&["system", "query"])["ranks"].as_array().unwrap().iter().all(|r| r["state"] == "Joined").then_some(()));
    c.json(&["pool", "reintegrate", "tank", "--rank", &rank.to_string()]);
    poll("the reintegrated rank to be resynced (UPIN -> UP)", Duration::from_secs(180), || states().iter().all(|x| x == "Up").then_some(()));
    check_snapshot("reintegrated");
    let other = (1..5).find(|&i| i != dir).unwrap();
    c.kill9_rank_dir(other);
    check_snapshot("second-rank-killed");
    wait_workers(&mut [children.remove(2), children.remove(0)], Duration::from_secs(600));
    check_snapshot("done");
    let _ = back.kill();
    let _ = back.wait();
    // A snapshot read never changes, across the failover and everything committed since.
    let again = rt.block_on(kv.scan_at(b"acct/", Some(b"acct0"), 1000, first.0)).unwrap();
    assert!(again == first.1, "the first snapshot reads differently after the failover");

    // Every acknowledged transfer applied exactly once: balances are the initial ones plus
    // exactly the transfers whose records exist, and every acknowledged one has its record.
    rt.block_on(async {
        let records = kv.scan(b"xfer/", Some(b"xfer0"), 100_000).await.unwrap();
        let mut expect: Vec<i64> = vec![initial; accounts as usize];
        for (_, v) in &records {
            let f: Vec<u64> = String::from_utf8_lossy(v).split(' ').map(|x| x.parse().unwrap()).collect();
            expect[f[0] as usize] -= f[2] as i64;
            expect[f[1] as usize] += f[2] as i64;
        }
        let have: BTreeSet<Vec<u8>> = records.iter().map(|(k, _)| k.clone()).collect();
        let mut acked = 0;
        for (i, f) in files.iter().enumerate() {
            for v in lines(f).iter().filter(|v| v["phase"] == "end" && v["outcome"] == "ok") {
                acked += 1;
                let key = format!("xfer/{i}/{}", v["seq"]);
                assert!(have.contains(key.as_bytes()), "acknowledged transfer {key} was lost");
            }
        }
        assert!(acked >= 100, "only {acked} transfers acknowledged");
        let rows = kv.scan(b"acct/", Some(b"acct0"), 1000).await.unwrap();
        for (k, v) in rows {
            let a: usize = String::from_utf8_lossy(&k[5..]).parse().unwrap();
            assert_eq!(String::from_utf8_lossy(&v).parse::<i64>().unwrap(), expect[a], "account {a}: balance is not the initial one plus its recorded transfers");
        }
    });
}

/// Puts in flight while a rank is reintegrated: the shard leader's own replica of a put
/// admitted under the map before the reintegration may still be landing when the leader's
/// resync pass (under the new map) reads its store; the pass must wait for it, or the put
/// never reaches the reintegrated rank. Engines here write the leader's replica 2 s after the
/// others (a debug-build knob standing in for a slow disk under load); the keys live in shards
/// whose first replica is the reintegrated rank, so once it is up again it leads them and
/// every acknowledged put must read back from it.
#[test]
fn kv_puts_in_flight_through_a_reintegration_reach_the_resynced_rank() {
    std::env::set_var("STRATA_KV_TEST_LEADER_WRITE_DELAY_MS", "2000");
    let c = Cluster::start(&["--ranks", "4", "--heartbeat-timeout-ms", "2000"]);
    c.json(&["kv", "create", "tank/re", "--oclass", "RP_3GX"]);
    let rt = rt();
    let kv = rt.block_on(open_store(&c.cluster_file(), "tank/re"));
    // The rank (outside directory 0) that is the first replica of the most keys' shards.
    let candidates: Vec<Vec<u8>> = (0..20_000).map(|i| format!("re/{i:05}").into_bytes()).collect();
    let (dir, rank, keys) = (1..4)
        .map(|dir| {
            let rank = c.rank_of_dir(dir);
            let first = format!("rank {rank} ");
            let keys: Vec<Vec<u8>> = candidates.iter().filter(|k| kv.locate(k).unwrap().replicas[0].starts_with(&first)).cloned().collect();
            (dir, rank, keys)
        })
        .max_by_key(|(_, _, keys)| keys.len())
        .unwrap();
    assert!(keys.len() >= 1000, "keys of shards whose first replica is rank {rank}: {}", keys.len());
    let targets = || -> Vec<Value> { c.json(&["pool", "query", "tank"])["map"]["targets"].as_array().unwrap().clone() };
    c.kill9_rank_dir(dir);
    poll("the killed rank to be rebuilt (DownOut)", Duration::from_secs(120), || {
        let t = targets();
        (t.iter().filter(|t| t["id"]["rank"] == rank).all(|t| t["state"] == "DownOut") && !t.iter().any(|t| t["state"] == "Down")).then_some(())
    });
    // Not a child of `strata up`: stopped by hand, also when an assertion fails.
    struct Stopped(Child);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _back = Stopped(c.restart_rank_dir(dir, 2000));
    poll("the rank to rejoin", Duration::from_secs(60), || c.json(&["system", "query"])["ranks"].as_array().unwrap().iter().all(|r| r["state"] == "Joined").then_some(()));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let writers = 24;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (kv, stop, acked) = (kv.clone(), stop.clone(), acked.clone());
            let mine: Vec<Vec<u8>> = keys.iter().skip(w).step_by(writers).cloned().collect();
            rt.spawn(async move {
                for k in mine {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    // A failed put is indeterminate: only acknowledged ones are checked.
                    if kv.put(&k, &k).await.is_ok() {
                        acked.lock().unwrap().push(k);
                    }
                }
            })
        })
        .collect();
    let count = || acked.lock().unwrap().len();
    poll("puts to be acknowledged before the reintegration", Duration::from_secs(60), || (count() >= writers).then_some(()));
    c.json(&["pool", "reintegrate", "tank", "--rank", &rank.to_string()]);
    poll("the reintegrated rank to be resynced (UPIN -> UP)", Duration::from_secs(180), || targets().iter().all(|t| t["state"] == "Up").then_some(()));
    let after = count();
    poll("puts to be acknowledged after the resync", Duration::from_secs(60), || (count() >= after + writers).then_some(()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });

    let acked = acked.lock().unwrap().clone();
    let fresh = rt.block_on(open_store(&c.cluster_file(), "tank/re"));
    let lost: Vec<String> = rt.block_on(async {
        let mut lost = Vec::new();
        for k in &acked {
            assert_eq!(fresh.locate(k).unwrap().leader_rank.map(u64::from), Some(rank), "the reintegrated rank leads the shard of {}", String::from_utf8_lossy(k));
            if fresh.get(k).await.unwrap().as_deref() != Some(&k[..]) {
                lost.push(String::from_utf8_lossy(k).into_owned());
            }
        }
        lost
    });
    assert!(lost.is_empty(), "{} of {} acknowledged puts are missing on the reintegrated rank that now leads their shards: {:?}", lost.len(), acked.len(), &lost[..lost.len().min(10)]);
}

#[test]
fn bench_kv_compares_with_etcd_and_plain_objects() {
    // The bench starts etcd itself: it must be installed (scripts/test installs etcd-server).
    assert!(Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success()), "etcd is not installed: apt-get install etcd-server");
    let c = Cluster::start(&["--ranks", "3"]);
    let v = c.json(&["bench", "kv", "--clients", "4", "--duration", "0.5", "--reps", "1", "--keys", "64"]);
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 3, "put, get and txn at one client count");
    for p in points {
        assert!(p["median_ops_per_sec"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["etcd_median_ops_per_sec"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["etcd_ratio"].as_f64().is_some());
    }
    assert!(points[0]["object_ratio"].as_f64().is_some() && points[1]["object_ratio"].as_f64().is_some());
    assert!(points.iter().flat_map(|p| p["targets"].as_array().unwrap()).any(|t| t.as_str().unwrap().contains("etcd")));
}
