//! A full disk: ranks refuse new data with a clear "no space" error before their storage
//! engine runs out, keep serving every acknowledged write, and take writes again as soon as
//! space is freed, without a restart.

mod common;

use common::{poll, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use strata_client::{Client, ClusterFile, ContHandle};

/// A size-limited tmpfs mounted for the test's lifetime (needs root; CI runs as root).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u64) -> SmallDisk {
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir).status().expect("running mount");
        assert!(st.success(), "mounting a {mib} MiB tmpfs at {} failed: this test needs root (CI runs as root)", dir.display());
        SmallDisk(dir.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: servers may still hold files open while the cluster shuts down.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `ranks` ranks (one target each, a 48 MiB reserve) on a tmpfs of `disk_mib`, and a container
/// `cont` of `class` opened by a client on a runtime of its own.
fn small_disk_cluster(ranks: usize, disk_mib: u64, cont: &str, class: &str) -> (Cluster, SmallDisk, tokio::runtime::Runtime, ContHandle) {
    let mut c = Cluster::unstarted(&["--ranks", &ranks.to_string(), "--targets", "1", "--reserve-mib", "48", "--pool-size", "64M"]);
    let disk = SmallDisk::mount(c.path(), disk_mib);
    c.launch();
    c.json(&["cont", "create", "tank", cont, "--oclass", class]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let h = rt.block_on(async { Client::connect(&cf).await.unwrap().container("tank", cont).await.unwrap() });
    (c, disk, rt, h)
}

fn value(i: usize) -> Vec<u8> {
    (0..1usize << 20).map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(2654435761)) as u8).collect()
}

#[test]
fn a_full_disk_refuses_new_data_clearly_keeps_what_was_acknowledged_and_recovers() {
    let (c, disk, rt, cont) = small_disk_cluster(3, 256, "full", "S1");
    // Most of the disk taken by something else, as when another tenant fills it.
    let filler = c.path().join("filler");
    std::fs::write(&filler, vec![7u8; 96 << 20]).unwrap();
    let mut acked = Vec::new();
    let refusal = rt.block_on(async {
        // 256 MiB of disk cannot take 200 more MiB next to the filler: the loop must end refused.
        for i in 0..200 {
            let o = cont.create_object("S1".parse().unwrap()).await.unwrap();
            match o.write(b"d", b"a", 0, &value(i)).await {
                Ok(_) => acked.push(o),
                Err(e) => return e.to_string(),
            }
        }
        panic!("200 MiB were accepted on a 256 MiB disk already holding 96 MiB");
    });
    assert!(refusal.contains("no space for new data") && refusal.contains("--reserve-mib"), "the refusal says what happened and what to do: {refusal}");
    assert!(acked.len() >= 20, "writes were accepted until the reserve: only {}", acked.len());
    // Refused, not broken: everything acknowledged reads back, the CLI says the same thing.
    rt.block_on(async {
        for (i, o) in acked.iter().enumerate() {
            let (got, _) = o.read(b"d", b"a", 0, 1 << 20, strata_types::Epoch::MAX).await.unwrap();
            assert!(got == value(i), "acknowledged object {i} reads back changed");
        }
    });
    // The CLI says the same thing about a write of the size just refused (a smaller one may
    // still fit above the reserve).
    let big = std::env::temp_dir().join(format!("strata-full-disk-{}.bin", std::process::id()));
    std::fs::write(&big, value(999)).unwrap();
    let err = c.fails(&["obj", "put", "tank/full", "--dkey", "d", "--akey", "a", "--oclass", "S1", "--file", big.to_str().unwrap()]);
    let _ = std::fs::remove_file(&big);
    assert!(err.contains("no space for new data"), "{err}");
    // Space comes back: writes are taken again, without restarting anything.
    std::fs::remove_file(&filler).unwrap();
    let o = rt.block_on(cont.create_object("S1".parse().unwrap())).unwrap();
    poll("writes to be accepted again once space is freed", Duration::from_secs(10), || rt.block_on(o.write(b"d", b"a", 0, &value(1000))).ok());
    rt.block_on(async {
        let (got, _) = o.read(b"d", b"a", 0, 1 << 20, strata_types::Epoch::MAX).await.unwrap();
        assert!(got == value(1000));
        let (got, _) = acked[0].read(b"d", b"a", 0, 1 << 20, strata_types::Epoch::MAX).await.unwrap();
        assert!(got == value(0));
    });
    drop(c);
    drop(disk);
}

/// Bytes free for unprivileged use on the file system holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().expect("running df");
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("df output: {out:?}"))
}

#[test]
fn a_rebuild_that_meets_a_full_disk_says_why_it_stalls_and_finishes_once_space_is_freed() {
    let (c, disk, rt, cont) = small_disk_cluster(4, 384, "rb", "RP_2G1");
    let objs = rt.block_on(async {
        let mut objs = Vec::new();
        for i in 0..48 {
            let o = cont.create_object("RP_2G1".parse().unwrap()).await.unwrap();
            o.write(b"d", b"a", 0, &value(i)).await.unwrap();
            objs.push(o);
        }
        objs
    });
    let all_read_back = |when: &str| {
        rt.block_on(async {
            for (i, o) in objs.iter().enumerate() {
                let (got, _) = o.read(b"d", b"a", 0, 1 << 20, strata_types::Epoch::MAX).await.unwrap_or_else(|e| panic!("object {i} {when}: {e}"));
                assert!(got == value(i), "object {i} reads back changed {when}");
            }
        })
    };
    // The disk filled by something else to just above the reserve: the copies the excluded
    // rank held (~24 MiB) cannot all be imported.
    let ballast = c.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; (free_bytes(c.path()) - (48 + 6 << 20)) as usize]).unwrap();
    c.json(&["pool", "exclude", "tank", "--rank", "3"]);
    let stalled = poll("the rebuild to say it is stalled for lack of space", Duration::from_secs(60), || {
        let q = c.json(&["pool", "query", "tank"]);
        let s = q["progress"]["stalled"].as_array().cloned().unwrap_or_default();
        (!s.is_empty()).then_some(q)
    });
    let why = stalled["progress"]["stalled"].to_string();
    assert!(why.contains("NoSpace: rebuild push to") && why.contains("no space for new data") && why.contains("--reserve-mib"), "the stall names its cause and what to do: {why}");
    assert_eq!(stalled["progress"]["state"], "rebuilding", "{stalled}");
    assert!(stalled["progress"]["eta_s"].is_null(), "a stalled rebuild promises no ETA: {stalled}");
    let text = String::from_utf8_lossy(&c.cmd(&["pool", "query", "tank"]).stdout).into_owned();
    assert!(text.contains("data movement stalled, retrying: rank") && text.contains("no space"), "{text}");
    // Stalled, not broken: every object reads, from the surviving copy.
    all_read_back("while the rebuild is stalled");
    // Space comes back: the rebuild goes on by itself and finishes.
    std::fs::remove_file(&ballast).unwrap();
    let done = poll("the rebuild to finish once space is freed", Duration::from_secs(90), || {
        let q = c.json(&["pool", "query", "tank"]);
        let out = q["map"]["targets"].as_array().unwrap().iter().filter(|t| t["id"]["rank"] == 3).all(|t| t["state"] == "DownOut");
        (out && q["rebuild"].is_null()).then_some(q)
    });
    assert_eq!(done["progress"]["stalled"], serde_json::json!([]), "{done}");
    all_read_back("after the rebuild");
    drop(c);
    drop(disk);
}
