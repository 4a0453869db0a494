//! A full disk: ranks refuse new data with a clear "no space" error before their storage
//! engine runs out, keep serving every acknowledged write, and take writes again as soon as
//! space is freed, without a restart.

mod common;

use common::{poll, Cluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use strata_client::{Client, ClusterFile};

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

fn value(i: usize) -> Vec<u8> {
    (0..1usize << 20).map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(2654435761)) as u8).collect()
}

#[test]
fn a_full_disk_refuses_new_data_clearly_keeps_what_was_acknowledged_and_recovers() {
    let mut c = Cluster::unstarted(&["--ranks", "3", "--targets", "1", "--reserve-mib", "48", "--pool-size", "64M"]);
    let disk = SmallDisk::mount(c.path(), 256);
    c.launch();
    c.json(&["cont", "create", "tank", "full", "--oclass", "S1"]);
    // Most of the disk taken by something else, as when another tenant fills it.
    let filler = c.path().join("filler");
    std::fs::write(&filler, vec![7u8; 96 << 20]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let cont = rt.block_on(async { Client::connect(&cf).await.unwrap().container("tank", "full").await.unwrap() });
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
