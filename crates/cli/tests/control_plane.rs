//! Control plane with real processes: Raft failover of the management service, restart with
//! state intact, every pool/container/system command through the binary with `--json`, and
//! bad input refused without changing state.

mod common;

use common::{poll, Cluster, BIN};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn up_state(c: &Cluster) -> Value {
    serde_json::from_slice(&std::fs::read(c.path().join("up.json")).unwrap()).unwrap()
}

/// What a restart must keep of the pools (states move on by themselves: rebuild runs).
fn pool_identity(v: &Value) -> Vec<(String, String, u64, Vec<String>)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let targets = p["map"]["targets"].as_array().unwrap().iter().map(|t| t["id"].to_string()).collect();
            (p["id"].as_str().unwrap().to_owned(), p["label"].as_str().unwrap().to_owned(), p["size_bytes"].as_u64().unwrap(), targets)
        })
        .collect()
}

fn labels(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|p| p["label"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn management_leader_sigkill_fails_over_and_loses_nothing() {
    let c = Cluster::start(&["--ranks", "3", "--access-points", "3", "--heartbeat-timeout-ms", "3000"]);
    c.json(&["pool", "create", "p2", "--size", "1G"]);
    c.json(&["cont", "create", "p2", "c1", "--oclass", "RP_2G1"]);
    c.json(&["cont", "snapshot", "create", "p2", "c1", "s1"]);
    let sys = c.json(&["system", "query"]);
    let leader = sys["leader"].as_str().unwrap().to_owned();
    let st = up_state(&c);
    let idx = st["ranks"].as_array().unwrap().iter().position(|r| r["mgmt"] == leader.as_str()).expect("leader is an access point");
    c.kill9_rank_dir(idx);
    let t0 = Instant::now();
    let sys = poll("a new management leader", Duration::from_secs(20), || {
        let out = c.cmd(&["system", "query", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["leader"].as_str().is_some_and(|l| l != leader)).then_some(v)
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "failover took {:?}", t0.elapsed());
    assert!(sys["leader"].as_str().unwrap() != leader);
    // Nothing acknowledged was lost.
    assert!(labels(&c.json(&["pool", "list"])).contains(&"p2".to_string()));
    assert_eq!(labels(&c.json(&["cont", "list", "p2"])), vec!["c1"]);
    assert!(c.json(&["cont", "snapshot", "list", "p2", "c1"])["s1"].is_u64());
    // Writes still work with two of three access points.
    c.json(&["cont", "create", "p2", "c2"]);

    // The killed access point rejoins with its rank and catches up.
    let r = &st["ranks"][idx];
    let aps: Vec<String> = st["ranks"].as_array().unwrap()[..3].iter().map(|r| r["mgmt"].as_str().unwrap().to_owned()).collect();
    let log = std::fs::File::create(c.path().join("rejoin.log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["server", "--dir", &c.path().join(format!("rank-{idx}")).display().to_string()])
        .args(["--data-addr", r["data"].as_str().unwrap(), "--mgmt-addr", r["mgmt"].as_str().unwrap(), "--access-points", &aps.join(",")])
        .args(["--cluster", st["cluster"].as_str().unwrap(), "--fault-domain", &format!("/node-{idx}"), "--targets", "2", "--heartbeat-timeout-ms", "3000"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    poll("the old leader to rejoin", Duration::from_secs(30), || {
        let s = c.json(&["system", "query"]);
        s["ranks"].as_array().unwrap().iter().all(|r| r["state"] == "Joined").then_some(())
    });
    assert_eq!(c.json(&["system", "query"])["ranks"].as_array().unwrap().len(), 3, "it kept its rank instead of joining as a new one");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn commands_json_restart_and_bad_input() {
    let mut c = Cluster::start(&["--ranks", "3", "--heartbeat-timeout-ms", "3000"]);
    // Newcomer path: the default pool is there.
    assert_eq!(labels(&c.json(&["pool", "list"])), vec!["tank"]);
    let p = c.json(&["pool", "create", "small", "--size", "64M", "--ranks", "0,1"]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().len(), 4);
    let v1 = p["map"]["version"].as_u64().unwrap();
    let p = c.json(&["pool", "extend", "small", "--ranks", "2"]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().len(), 6);
    assert!(p["map"]["targets"].as_array().unwrap().iter().any(|t| t["state"] == "New"));
    assert!(p["map"]["version"].as_u64().unwrap() > v1);
    let p = c.json(&["pool", "exclude", "small", "--rank", "1"]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().iter().filter(|t| t["state"] == "Down").count(), 2);
    let p = c.json(&["pool", "reintegrate", "small", "--rank", "1"]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().iter().filter(|t| t["state"] == "UpIn").count(), 2);
    let p = c.json(&["pool", "drain", "small", "--rank", "0", "--target", "1"]);
    assert_eq!(p["map"]["targets"].as_array().unwrap().iter().filter(|t| t["state"] == "Drain").count(), 1);
    let sel = c.json(&["pool", "create", "picky", "--size", "64M", "--select", "unique(host)"]);
    assert_eq!(sel["map"]["targets"].as_array().unwrap().len(), 3, "one target per host");

    for (label, ty) in [("objs", "plain"), ("kv1", "kv"), ("fs1", "posix"), ("vols", "block")] {
        let cont = c.json(&["cont", "create", "tank", label, "--type", ty, "--oclass", "RP_2G1", "--rf", "1"]);
        assert_eq!(cont["label"], label);
    }
    assert_eq!(labels(&c.json(&["cont", "list", "tank"])).len(), 4);
    assert_eq!(c.json(&["cont", "query", "tank", "kv1"])["ctype"], "Kv");
    c.json(&["cont", "snapshot", "create", "tank", "objs", "before"]);
    assert!(c.json(&["cont", "snapshot", "list", "tank", "objs"])["before"].is_u64());
    c.json(&["cont", "snapshot", "destroy", "tank", "objs", "before"]);
    c.json(&["cont", "destroy", "tank", "vols"]);
    c.json(&["pool", "destroy", "picky"]);
    let sys = c.json(&["system", "query"]);
    assert_eq!(sys["ranks"].as_array().unwrap().len(), 3);
    c.json(&["system", "exclude", "--rank", "2"]);
    c.json(&["system", "reintegrate", "--rank", "2"]);

    // Bad input: clear errors, exit code 1, state unchanged.
    let before_pools = c.json(&["pool", "list"]);
    let before_conts = c.json(&["cont", "list", "tank"]);
    for (args, needle) in [
        (vec!["pool", "query", "nope"], "no pool 'nope'"),
        (vec!["pool", "create", "tank"], "already exists"),
        (vec!["pool", "create", "huge", "--size", "900P"], "is free"),
        (vec!["pool", "create", "bad label!"], "must be 1..=127 characters"),
        (vec!["pool", "destroy", "tank"], "still has 3 container(s)"),
        (vec!["cont", "create", "tank", "objs"], "already has a container named 'objs'"),
        (vec!["cont", "create", "tank", "weak", "--oclass", "S1", "--rf", "1"], "refuses object class S1"),
        (vec!["cont", "create", "tank", "fat", "--oclass", "RP_8G1"], "needs 8 targets"),
        (vec!["cont", "create", "tank", "odd", "--oclass", "RP_0"], "is not an object class"),
        (vec!["cont", "query", "tank", "ghost"], "no container 'ghost'"),
        (vec!["pool", "create", "sel", "--select", "1:a:9:b:1"], "KEY_OP '9'"),
    ] {
        let err = c.fails(&args);
        assert!(err.contains(needle), "strata {args:?}: {err}");
    }
    assert_eq!(pool_identity(&c.json(&["pool", "list"])), pool_identity(&before_pools));
    assert_eq!(c.json(&["cont", "list", "tank"]), before_conts);

    // A client of another cluster is refused at the handshake.
    let mut cf: Value = serde_json::from_slice(&std::fs::read(c.cluster_file()).unwrap()).unwrap();
    cf["cluster"] = "someone-else".into();
    let other = c.path().join("other.json");
    std::fs::write(&other, cf.to_string()).unwrap();
    let out = Command::new(BIN).args(["pool", "list", "--cluster", &other.display().to_string()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to cluster"), "{}", String::from_utf8_lossy(&out.stderr));

    // A malformed server config names the key and the line.
    let cfg = c.path().join("bad.toml");
    std::fs::write(&cfg, "dir = \"/tmp/x\"\ntargets = \"two\"\n").unwrap();
    let out = Command::new(BIN).args(["server", "--config", &cfg.display().to_string()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("line 2") && err.contains("targets"), "{err}");
    std::fs::write(&cfg, "dir = \"/tmp/x\"\ntargetz = 2\n").unwrap();
    let out = Command::new(BIN).args(["server", "--config", &cfg.display().to_string()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("targetz"), "{}", String::from_utf8_lossy(&out.stderr));
    // Usage errors exit with 2.
    assert_eq!(Command::new(BIN).args(["pool", "frobnicate"]).output().unwrap().status.code(), Some(2));

    // A server configured for another cluster, pointed at our access points, is refused.
    let st = up_state(&c);
    let ap = st["ranks"][0]["mgmt"].as_str().unwrap().to_owned();
    let stray = c.path().join("stray");
    let out = Command::new(BIN)
        .args(["server", "--dir", &stray.display().to_string(), "--data-addr", "127.0.0.1:0", "--access-points", &ap, "--cluster", "someone-else"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to cluster"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.json(&["system", "query"])["ranks"].as_array().unwrap().len(), 3);
    // A copy of a running rank's directory (same server identity) is refused: no rank collision.
    let copy = c.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(c.path().join("rank-1/server.json"), copy.join("server.json")).unwrap();
    let out = Command::new(BIN)
        .args(["server", "--dir", &copy.display().to_string(), "--data-addr", "127.0.0.1:0", "--access-points", &ap, "--cluster", st["cluster"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.json(&["system", "query"])["ranks"].as_array().unwrap().len(), 3);

    // Ctrl-C, then `strata up` again on the same directory: the same state comes back.
    let pools = c.json(&["pool", "list"]);
    // A target already out may finish its rebuild (DOWN -> DOWNOUT) meanwhile; what must not
    // happen is a serving target going out because its rank stopped in an orderly way.
    let states = |q: &Value| q["map"]["targets"].as_array().unwrap().iter().map(|t| (t["id"].to_string(), matches!(t["state"].as_str(), Some("Down" | "DownOut")))).collect::<Vec<_>>();
    let before_restart = states(&c.json(&["pool", "query", "tank"]));
    c.interrupt();
    c.launch();
    assert_eq!(pool_identity(&c.json(&["pool", "list"])), pool_identity(&pools));
    // An orderly stop is no failure: no target changed state (none needs reintegrating).
    assert_eq!(states(&c.json(&["pool", "query", "tank"])), before_restart);
    assert_eq!(labels(&c.json(&["cont", "list", "tank"])).len(), 3);

    // `system stop` stops every rank cleanly and `strata up` exits by itself; up again restores.
    c.json(&["system", "stop"]);
    let mut up = c.up.take().unwrap();
    let status = poll("strata up to exit after system stop", Duration::from_secs(30), || up.try_wait().ok().flatten());
    assert!(status.success());
    poll("every rank to exit", Duration::from_secs(10), || (0..3).all(|i| c.server_pid(i).is_none()).then_some(()));
    c.up = Some(Command::new("true").spawn().unwrap());
    c.launch();
    assert_eq!(pool_identity(&c.json(&["pool", "list"])), pool_identity(&pools));
    let sys = c.json(&["system", "query"]);
    assert!(sys["ranks"].as_array().unwrap().iter().all(|r| r["state"] == "Joined"), "{sys}");
}
