//! The file system on a cluster whose engines lose the answer of every Nth one-round KV commit
//! after writing it (the debug-build knob `STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY`, as when a
//! shard leader dies right after a commit): the KV layer then reports the commit
//! indeterminate, and the file system must find out whether it happened instead of answering
//! EIO, or EEXIST for a mkdir that it made itself. Two mounts (one with directory leases, whose
//! background tick commits creates and unlinks, one without) each run a seeded loop of mkdir,
//! create+write, rename, unlink and rmdir in a directory of their own, and every answer is
//! checked against a model; the tree a fresh mount then reads must be the model.
//! Needs /dev/fuse and fusermount3: fails under CI=true without them.

mod common;
#[path = "posix/mount.rs"]
mod mount;

use common::{Cluster, Rng};
use mount::{fuse_available, mount, MountGuard};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Operations per mount, and the time after which a loop stops early (a loaded machine).
const OPS_PER_MOUNT: usize = 250;
const LOOP_TIME_MAX: Duration = Duration::from_secs(150);
/// Names per directory the loop picks from: small, so that EEXIST and ENOENT answers are common.
const NAMES: u64 = 12;
/// What a mount logs when it learned a commit's outcome by reading (`commit_outcome.rs`).
const SETTLED_LOG: &str = "commit answer lost";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    /// Listed, but reading it failed with this errno.
    Unreadable(i32),
}

/// A wrong answer: the operation, what the model expected, what the file system said.
#[derive(Debug)]
struct Wrong {
    op: String,
    expected: i32,
    got: i32,
}

fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn create_write(p: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).open(p)?;
    f.write_all(data)?;
    Ok(())
}

/// What one loop ends with: the model of what its directory must hold, the answers that
/// disagreed with it, and the number of operations run.
type Run = (BTreeMap<String, Node>, Vec<Wrong>, usize);

/// Run the seeded loop in `dir`.
fn run_ops(dir: &Path, seed: u64) -> Run {
    let mut rng = Rng(seed);
    let mut model: BTreeMap<String, Node> = BTreeMap::new();
    let mut wrong = Vec::new();
    let start = Instant::now();
    let mut ops = 0;
    while ops < OPS_PER_MOUNT && start.elapsed() < LOOP_TIME_MAX {
        ops += 1;
        let name = format!("n{}", rng.below(NAMES));
        let p = dir.join(&name);
        let (op, expected, got) = match rng.below(5) {
            0 => {
                let expected = if model.contains_key(&name) { libc::EEXIST } else { 0 };
                let got = errno(fs::create_dir(&p));
                if got == 0 {
                    model.insert(name.clone(), Node::Dir);
                }
                (format!("mkdir {name}"), expected, got)
            }
            1 => {
                let data = format!("{seed}-{ops}").into_bytes();
                let expected = if model.contains_key(&name) { libc::EEXIST } else { 0 };
                let got = errno(create_write(&p, &data));
                if got == 0 {
                    model.insert(name.clone(), Node::File(data));
                }
                (format!("create+write {name}"), expected, got)
            }
            2 => {
                let to = format!("n{}", rng.below(NAMES));
                // Only files move, and only onto a free name or another file.
                let expected = match (model.get(&name), model.get(&to)) {
                    (None, _) => libc::ENOENT,
                    (Some(Node::Dir | Node::Unreadable(_)), _) | (_, Some(Node::Dir | Node::Unreadable(_))) => continue,
                    (Some(Node::File(_)), _) => 0,
                };
                let got = errno(fs::rename(&p, dir.join(&to)));
                if got == 0 {
                    if let Some(n) = model.remove(&name) {
                        model.insert(to.clone(), n);
                    }
                }
                (format!("rename {name} {to}"), expected, got)
            }
            3 => {
                let expected = match model.get(&name) {
                    None => libc::ENOENT,
                    Some(Node::Dir | Node::Unreadable(_)) => continue,
                    Some(Node::File(_)) => 0,
                };
                let got = errno(fs::remove_file(&p));
                if got == 0 {
                    model.remove(&name);
                }
                (format!("unlink {name}"), expected, got)
            }
            _ => {
                let expected = match model.get(&name) {
                    None => libc::ENOENT,
                    Some(Node::File(_) | Node::Unreadable(_)) => continue,
                    Some(Node::Dir) => 0,
                };
                let got = errno(fs::remove_dir(&p));
                if got == 0 {
                    model.remove(&name);
                }
                (format!("rmdir {name}"), expected, got)
            }
        };
        if got != expected {
            wrong.push(Wrong { op, expected, got });
            // Learn what the tree really holds, so that one wrong answer is reported once.
            model = tree(dir);
        }
    }
    (model, wrong, ops)
}

fn tree(dir: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let p = e.path();
        let node = match (e.file_type(), fs::read(&p)) {
            (Ok(t), _) if t.is_dir() => Node::Dir,
            (_, Ok(data)) => Node::File(data),
            (_, Err(e)) => Node::Unreadable(e.raw_os_error().unwrap_or(-1)),
        };
        out.insert(name, node);
    }
    out
}

#[test]
fn file_operations_answer_what_happened_when_commit_answers_are_lost() {
    if !fuse_available() {
        return;
    }
    std::env::set_var("STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY", "5");
    let c = Cluster::start(&["--ranks", "3"]);
    std::env::remove_var("STRATA_KV_TEST_LOSE_COMMIT_ANSWER_EVERY");
    c.json(&["cont", "create", "tank", "vol", "--type", "posix", "--oclass", "RP_2G1"]);
    let (a, b, check) = (c.path().join("a"), c.path().join("b"), c.path().join("check"));
    let _guard = MountGuard(vec![a.clone(), b.clone(), check.clone()]);
    let (log_a, log_b) = (c.path().join("mount-a.log"), c.path().join("mount-b.log"));
    // The settling is logged at info (the mounts log warnings only by default).
    std::env::set_var("STRATA_LOG", "warn,strata_fs=info");
    mount(&c, "tank/vol", &a, &["--log", log_a.to_str().unwrap()]);
    mount(&c, "tank/vol", &b, &["-o", "noleases", "--log", log_b.to_str().unwrap()]);
    std::env::remove_var("STRATA_LOG");
    // Created with retries: a wrong answer here is not what this test is about.
    for (mp, d) in [(&a, "leased"), (&b, "plain")] {
        common::poll("the test directory to exist", Duration::from_secs(30), || fs::create_dir(mp.join(d)).is_ok().then_some(()).or_else(|| fs::metadata(mp.join(d)).ok().map(|_| ())));
    }

    let workers: Vec<_> = [(a.join("leased"), 1u64), (b.join("plain"), 2u64)].into_iter().map(|(dir, seed)| std::thread::spawn(move || (dir.clone(), run_ops(&dir, seed)))).collect();
    let results: Vec<(PathBuf, Run)> = workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect();

    // A fresh mount reads what was committed (the leased mount commits its log at unmount).
    for mp in [&a, &b] {
        c.json(&["fs", "umount", mp.to_str().unwrap()]);
    }
    mount(&c, "tank/vol", &check, &["-o", "noleases"]);
    let mut failures = Vec::new();
    for (dir, (model, wrong, ops)) in &results {
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        eprintln!("{name}: {ops} operations, {} wrong answers", wrong.len());
        for w in wrong {
            failures.push(format!("{name}: {} answered {} ({}) where the model expected {} ({})", w.op, w.got, std::io::Error::from_raw_os_error(w.got), w.expected, std::io::Error::from_raw_os_error(w.expected)));
        }
        let held = tree(&check.join(&name));
        if &held != model {
            failures.push(format!("{name}: the tree holds {held:?}, the answers said {model:?}"));
        }
    }
    c.json(&["fs", "umount", check.to_str().unwrap()]);
    assert!(failures.is_empty(), "{} wrong answers or tree differences:\n{}", failures.len(), failures.join("\n"));
    // The knob did lose answers, and the mounts settled them by reading.
    let settled: usize = [&log_a, &log_b].iter().map(|l| fs::read_to_string(l).unwrap_or_default().matches(SETTLED_LOG).count()).sum();
    assert!(settled > 0, "no commit answer was lost: the knob did nothing");
    eprintln!("{settled} commits with a lost answer settled by reading");
}
