//! POSIX behaviour of a real strata mount, our own suite (`cargo nextest run -p strata-cli
//! --test posix`). It is a test of the `strata-cli` crate because it drives the real binary
//! (`strata up`, `strata fs mount`) through the shared cluster harness in `tests/common`.
//! - `conformance`: modes, ownership, errno values, link counts and timestamps per call;
//! - `fsx`: 100,000 random writes, truncates, punches and reads against a model, on one mount,
//!   and 100,000 more over two (close-to-open);
//! - `source_tree`: a real source tree (a `.crate` from the cargo cache) untarred into the
//!   mount, compared with `diff -r` and a checksum manifest from a second mount, then
//!   `cargo build --offline` of a small crate inside the mount and its binary run from there.
//!
//! Needs /dev/fuse and fusermount3: fails under CI=true without them.

#[path = "../common/mod.rs"]
mod common;
mod conformance;
mod fsx;
mod mount;
mod source_tree;

use common::Cluster;
use mount::{fuse_available, mount, MountGuard};
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// Aggregation of the suite's cluster: every second, versions older than two seconds. fsx
/// rewrites one file 100,000 times; with the default 30 s margin its extent history (and the
/// cost of every read) would grow for the whole run.
const AGGREGATION: [&str; 4] = ["--aggregate-interval-ms", "1000", "--aggregate-margin-ms", "2000"];

#[test]
fn posix_conformance_and_random_operations() {
    if !fuse_available() {
        return;
    }
    let c = Cluster::start(&[&["--ranks", "3"][..], &AGGREGATION[..]].concat());
    c.json(&["cont", "create", "tank", "vol", "--type", "posix"]);
    let (a, b) = (c.path().join("a"), c.path().join("b"));
    let _guard = MountGuard(vec![a.clone(), b.clone()]);
    for mp in [&a, &b] {
        mount(&c, "tank/vol", mp, &["-o", "allow_other"]);
    }
    // The unprivileged user needs to reach the mount point.
    fs::set_permissions(c.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(a.join("suite")).unwrap();
    let mut checks = conformance::Checks { failed: vec![], passed: 0 };
    conformance::conformance(&a.join("suite"), &mut checks);
    assert!(checks.failed.is_empty(), "{} of {} POSIX checks failed:\n{}", checks.failed.len(), checks.failed.len() + checks.passed, checks.failed.join("\n"));

    let ops: usize = std::env::var("STRATA_FSX_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    // Both at once, on their own files: each mostly waits for durable round trips, so
    // together they take about as long as the longer one (CI time), and mount `a` serves
    // two files' operations concurrently.
    std::thread::scope(|s| {
        let one = s.spawn(|| fsx::fsx(&[a.join("fsx-one")], ops, 1));
        fsx::fsx(&[a.join("fsx-two"), b.join("fsx-two")], ops, 1000);
        if let Err(p) = one.join() {
            std::panic::resume_unwind(p);
        }
    });
    for mp in [&a, &b] {
        c.json(&["fs", "umount", mp.to_str().unwrap()]);
    }
}

#[test]
fn source_tree_untars_compares_and_builds() {
    if !fuse_available() {
        return;
    }
    let c = Cluster::start(&["--ranks", "3"]);
    c.json(&["cont", "create", "tank", "vol", "--type", "posix"]);
    let (a, b) = (c.path().join("a"), c.path().join("b"));
    let _guard = MountGuard(vec![a.clone(), b.clone()]);
    mount(&c, "tank/vol", &a, &[]);
    mount(&c, "tank/vol", &b, &[]);
    source_tree::untar_and_compare(&c, &a, &b);
    source_tree::cargo_build_in_mount(&a);
    for mp in [&a, &b] {
        c.json(&["fs", "umount", mp.to_str().unwrap()]);
    }
}
