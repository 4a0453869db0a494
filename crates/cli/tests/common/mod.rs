//! A real cluster for tests: `strata up` as a child process in a temp dir, plus helpers that
//! run the binary and parse its `--json` output. Every wait is a polled deadline.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_strata");

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub up: Option<Child>,
    pub args: Vec<String>,
}

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` has exited far enough that its ports are closed: gone, or a zombie all
/// of whose threads have exited. Not being listed by `pgrep` is not enough: a process being torn
/// down has no command line any more while it still holds its sockets, so a rank restarted at
/// once failed with "address already in use" and a client could still connect to it.
fn exited(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    let zombie = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("Z");
    zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |d| d.count() <= 1)
}

impl Cluster {
    pub fn start(args: &[&str]) -> Cluster {
        let mut c = Cluster::unstarted(args);
        c.launch();
        c
    }

    /// A cluster whose directory exists but which is not running yet (`launch` starts it), so
    /// a test can prepare the directory first (e.g. mount a small file system on it).
    pub fn unstarted(args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new().prefix("strata-test-").tempdir().unwrap();
        Cluster { dir, up: None, args: args.iter().map(|s| s.to_string()).collect() }
    }

    pub fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join(format!("up-{}.log", self.up.is_some() as u8))).unwrap();
        let child = Command::new(BIN)
            .arg("up")
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.up = Some(child);
        let cf = self.cluster_file();
        let logs = self.dir.path().to_owned();
        poll("strata up to report the cluster up", Duration::from_secs(90), || {
            let text = std::fs::read_to_string(logs.join(format!("up-{}.log", 1))).or_else(|_| std::fs::read_to_string(logs.join("up-0.log"))).unwrap_or_default();
            (cf.exists() && text.contains("is up")).then_some(())
        });
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir.path().join("cluster.json")
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new(BIN).args(args).env("STRATA_CLUSTER", self.cluster_file()).output().unwrap()
    }

    /// Run a command that must succeed and print JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cmd(&a);
        assert!(out.status.success(), "strata {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("strata {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Run a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(!out.status.success(), "strata {args:?} should have failed but printed {}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(1), "errors exit with 1");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The pid of the server process of rank directory `rank-{i}`.
    pub fn server_pid(&self, i: usize) -> Option<i32> {
        let needle = format!("{}/rank-{i}", self.dir.path().display());
        let out = Command::new("pgrep").args(["-f", &format!("strata server --dir {needle} ")]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
    }

    pub fn kill9_rank_dir(&self, i: usize) {
        let pid = self.server_pid(i).unwrap_or_else(|| panic!("no server process for rank-{i}"));
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        poll("the killed server to exit", Duration::from_secs(10), || exited(pid).then_some(()));
    }

    /// Start the server of directory `rank-{i}` again by hand, as `strata up` started it.
    pub fn restart_rank_dir(&self, i: usize, heartbeat_ms: u64) -> Child {
        self.restart_rank_dir_with(i, heartbeat_ms, &[])
    }

    /// `restart_rank_dir` with more `strata server` flags.
    pub fn restart_rank_dir_with(&self, i: usize, heartbeat_ms: u64, extra: &[&str]) -> Child {
        let st: Value = serde_json::from_slice(&std::fs::read(self.path().join("up.json")).unwrap()).unwrap();
        let ranks = st["ranks"].as_array().unwrap();
        let aps: Vec<String> = ranks[..st["access_points"].as_u64().unwrap() as usize].iter().map(|r| r["mgmt"].as_str().unwrap().to_owned()).collect();
        let r = &ranks[i];
        let log = std::fs::File::create(self.path().join(format!("restart-{i}.log"))).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "--dir", &self.path().join(format!("rank-{i}")).display().to_string()])
            .args(["--data-addr", r["data"].as_str().unwrap(), "--access-points", &aps.join(",")])
            .args(["--cluster", st["cluster"].as_str().unwrap(), "--fault-domain", &format!("/node-{}", i as u64 / st["ranks_per_host"].as_u64().unwrap_or(1)), "--targets", &st["targets"].to_string()])
            .args(["--heartbeat-timeout-ms", &heartbeat_ms.to_string()])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if i < aps.len() {
            cmd.args(["--mgmt-addr", r["mgmt"].as_str().unwrap()]);
        }
        cmd.spawn().unwrap()
    }

    /// The rank id of the server in directory `rank-{i}`.
    pub fn rank_of_dir(&self, i: usize) -> u64 {
        let id: Value = serde_json::from_slice(&std::fs::read(self.path().join(format!("rank-{i}/server.json"))).unwrap()).unwrap();
        id["rank"].as_u64().unwrap()
    }

    /// Ctrl-C `strata up` and wait for it and its ranks to stop.
    pub fn interrupt(&mut self) {
        if let Some(mut c) = self.up.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let status = poll("strata up to exit", Duration::from_secs(30), || c.try_wait().ok().flatten());
            assert!(status.success(), "strata up exited with {status}");
        }
        poll("all ranks to stop", Duration::from_secs(15), || (0..8).all(|i| self.server_pid(i).is_none()).then_some(()));
        self.up = Some(Command::new("true").spawn().unwrap());
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(c) = &mut self.up {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
        }
        // Any server left behind (e.g. the test panicked mid-way) is killed by its directory.
        let _ = Command::new("pkill").args(["-9", "-f", &format!("strata server --dir {}/", self.dir.path().display())]).status();
        // STRATA_TEST_KEEP=1 keeps the cluster's directory (logs, data) for a post-mortem.
        if std::env::var_os("STRATA_TEST_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept cluster directory {}", dir.keep().display());
        }
    }
}

/// Poll `pool query <pool>` until `finished(query)`, checking data-movement progress on every
/// sample: done never passes total and, within one map version, nothing goes down. Returns the
/// last `progress` and how many samples showed movement part way (0 < bytes done < total).
pub fn watch_progress(c: &Cluster, pool: &str, what: &str, timeout: Duration, finished: impl Fn(&Value) -> bool) -> (Value, usize) {
    let mut last: Option<Value> = None;
    let mut midway = 0;
    let end = poll(what, timeout, || {
        let q = c.json(&["pool", "query", pool]);
        let g = q["progress"].clone();
        let n = |v: &Value, f: &str| v[f].as_u64().unwrap_or_else(|| panic!("progress.{f} missing: {v}"));
        assert!(n(&g, "objects_done") <= n(&g, "objects_total") && n(&g, "bytes_done") <= n(&g, "bytes_total"), "done beyond total: {g}");
        if let Some(l) = last.as_ref().filter(|l| l["version"] == g["version"]) {
            for f in ["objects_done", "objects_total", "bytes_done", "bytes_total"] {
                assert!(n(&g, f) >= n(l, f), "progress.{f} went down: {l} then {g}");
            }
        }
        if n(&g, "bytes_done") > 0 && n(&g, "bytes_done") < n(&g, "bytes_total") {
            midway += 1;
        }
        last = Some(g.clone());
        finished(&q).then_some(g)
    });
    (end, midway)
}

/// Reclaim has run to its end at the pool's current map version on each of the `ranks` ranks
/// that answer, on a settled map: the `reclaim` counters of that `pool query`.
pub fn reclaimed(c: &Cluster, pool: &str, ranks: usize) -> Option<serde_json::Value> {
    let q = c.json(&["pool", "query", pool]);
    let r = q["reclaim"].clone();
    let settled = q["map"]["targets"].as_array()?.iter().all(|t| t["state"] == "Up" || t["state"] == "DownOut");
    (settled && r["version"] == q["map"]["version"] && r["ranks_answered"].as_u64()? == ranks as u64 && r["ranks_done"].as_u64()? == ranks as u64).then_some(r)
}

/// Rows the pool's engines store where its current map does not place them, by the engines'
/// own enumeration: every target lists the objects it holds in each container (`ListObjects`)
/// and exports each one's rows (`Export`). A row belongs on a target when its dkey's group
/// names the target and, erasure-coded, it is a cell in the offset range of the index the
/// target serves there, or a single value on an index that stores them. Returns the misplaced
/// rows (described) and how many objects each target lists (targets of `dead` ranks are not
/// asked).
pub async fn misplaced_rows(pool: &strata_client::PoolHandle, conts: &[strata_types::ContId], any: strata_types::Oid, dead: &[u64]) -> (Vec<String>, std::collections::BTreeMap<strata_types::TargetId, usize>) {
    use strata_rpc::engine_msg::{EngineReq, EngineResp};
    pool.refresh().await.unwrap();
    let map = pool.info().unwrap().map;
    let placement = strata_placement::PlacementMap::new(&map, false);
    let mut misplaced = Vec::new();
    let mut listed = std::collections::BTreeMap::new();
    for t in map.targets.iter().map(|t| t.id).filter(|t| !dead.contains(&(t.rank.0 as u64))) {
        let n = listed.entry(t).or_insert(0usize);
        for &cont in conts {
            let mut cursor = None;
            loop {
                let list = |p, v, t: strata_types::TargetId| EngineReq::ListObjects { pool: p, map_version: v, target: t.index, cont, epoch: strata_types::Epoch::MAX, cursor, limit: 10_000 };
                let (resp, _) = pool.call_engine(any, |_, _| Some(t), list, bytes::Bytes::new(), std::time::Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("target {t} did not list its objects: {e}"));
                let EngineResp::Objects { oids, next } = resp else { panic!("target {t} answered the listing with {resp:?}") };
                *n += oids.len();
                for chunk in oids.chunks(64) {
                    let exports = chunk.iter().map(|&oid| async move {
                        let export = |p, v, t: strata_types::TargetId| EngineReq::Export { pool: p, map_version: v, target: t.index, cont, oid, after: None, upto: None, bytes_max: 64 << 20 };
                        (oid, pool.call_engine(oid, |_, _| Some(t), export, bytes::Bytes::new(), std::time::Duration::from_secs(30)).await)
                    });
                    for (oid, r) in futures::future::join_all(exports).await {
                        let (resp, payload) = r.unwrap_or_else(|e| panic!("target {t} did not export {oid}: {e}"));
                        assert!(matches!(resp, EngineResp::Exported { truncated: false }), "target {t}: export of {oid} answered {resp:?}");
                        let layout = placement.layout(oid).unwrap();
                        for rec in strata_rpc::records::decode(&payload).unwrap().into_iter().filter(|r| !r.punch) {
                            let k = strata_vos::RecordRef { punch: false, key: &rec.key, value: &[] }.record_key().unwrap();
                            let group = layout.group(layout.group_for_dkey(&k.dkey));
                            let here = group.iter().position(|s| s.target == t).is_some_and(|i| match oid.class().unwrap().redundancy() {
                                strata_types::Redundancy::Erasure { data, .. } => match k.offset {
                                    Some(off) => strata_engine::ec_rebuild::shard_of_offset(off) == i,
                                    None => strata_engine::ec_rebuild::holds_singles(data as usize, i),
                                },
                                _ => true,
                            });
                            if !here {
                                misplaced.push(format!("{oid} dkey {} offset {:?} on {t}; its group: {:?}", String::from_utf8_lossy(&k.dkey), k.offset, group.iter().map(|s| s.target.to_string()).collect::<Vec<_>>()));
                            }
                        }
                    }
                }
                match next {
                    Some(o) => cursor = Some(o),
                    None => break,
                }
            }
        }
    }
    (misplaced, listed)
}

/// A small deterministic generator (xorshift64), so a failure names a reproducible seed. The
/// seed must not be zero.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `len` incompressible bytes: the low byte of each next value.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
