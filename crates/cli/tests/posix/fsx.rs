//! fsx: random writes, truncates, hole punches, reads, fsyncs and reopens on one file,
//! compared with an in-memory model after every read; over two mounts, each reopen switches
//! mount (close-to-open consistency).

use crate::common::Rng;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// fsx: random operations on one file (through `paths`, one per mount, switching mount with
/// a close and an open), compared with an in-memory model after every read.
pub fn fsx(paths: &[PathBuf], ops: usize, seed: u64) {
    const FILE_BYTES_MAX: u64 = 4 << 20;
    const OP_BYTES_MAX: u64 = 96 << 10;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
    let mut model: Vec<u8> = Vec::new();
    let mut which = 0usize;
    let open = |p: &Path| fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p).unwrap();
    let mut f = open(&paths[0]);
    let mut buf = Vec::new();
    // Time per kind of operation, printed at the end (where a slow run spends its time).
    const KINDS: [&str; 7] = ["write", "read", "truncate", "punch", "fsync", "stat", "reopen"];
    let mut spent = [(0u32, std::time::Duration::ZERO); 7];
    let started = std::time::Instant::now();
    for i in 0..ops {
        let w = which;
        let ctx = |what: &str| format!("fsx seed {seed} op {i} {what} (mount {w})");
        let roll = rng.below(100);
        let kind = match roll {
            0..=44 => 0,
            45..=79 => 1,
            80..=87 => 2,
            88..=93 => 3,
            94..=95 => 4,
            96..=98 => 5,
            _ => 6,
        };
        let t0 = std::time::Instant::now();
        match roll {
            0..=44 => {
                let off = rng.below(FILE_BYTES_MAX - OP_BYTES_MAX);
                let len = 1 + rng.below(OP_BYTES_MAX);
                let byte = (rng.next() % 255 + 1) as u8;
                buf.clear();
                buf.extend((0..len).map(|k| byte.wrapping_add(k as u8)));
                f.write_all_at(&buf, off).unwrap_or_else(|e| panic!("{}: {e}", ctx("write")));
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&buf);
            }
            45..=79 => {
                let len = model.len() as u64;
                let off = rng.below(len + 1);
                let n = rng.below(OP_BYTES_MAX).min(len - off);
                let mut got = vec![0u8; n as usize];
                f.read_exact_at(&mut got, off).unwrap_or_else(|e| panic!("{}: {e}", ctx("read")));
                if got != model[off as usize..(off + n) as usize] {
                    let at = got.iter().zip(&model[off as usize..]).position(|(x, y)| x != y).unwrap_or(0);
                    panic!("{}: bytes differ from the model at file offset {}", ctx("read"), off as usize + at);
                }
            }
            80..=87 => {
                let size = rng.below(FILE_BYTES_MAX);
                f.set_len(size).unwrap_or_else(|e| panic!("{}: {e}", ctx("truncate")));
                model.resize(size as usize, 0);
            }
            88..=93 => {
                let len = model.len() as u64;
                let off = rng.below(len + 1);
                let n = rng.below(OP_BYTES_MAX * 4).min(len - off);
                if n > 0 {
                    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, n as i64) };
                    assert_eq!(r, 0, "{}: {}", ctx("punch hole"), std::io::Error::last_os_error());
                    model[off as usize..(off + n) as usize].fill(0);
                }
            }
            94..=95 => f.sync_all().unwrap_or_else(|e| panic!("{}: {e}", ctx("fsync"))),
            96..=98 => {
                assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "{}", ctx("size"));
            }
            _ => {
                // Close, and open again (on the other mount when there are two).
                drop(f);
                which = (which + 1) % paths.len();
                f = open(&paths[which]);
                assert_eq!(f.metadata().unwrap().len(), model.len() as u64, "{}", ctx("size after reopen"));
            }
        }
        spent[kind].0 += 1;
        spent[kind].1 += t0.elapsed();
        if ops >= 10 && (i + 1) % (ops / 10) == 0 {
            eprintln!("fsx seed {seed}: {} ops in {:.1} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    let per_kind: Vec<String> = KINDS.iter().zip(&spent).map(|(k, (n, t))| format!("{k} {n} in {:.1} s", t.as_secs_f64())).collect();
    eprintln!("fsx seed {seed}: {ops} ops on {} mount(s) in {:.1} s ({})", paths.len(), started.elapsed().as_secs_f64(), per_kind.join(", "));
    drop(f);
    let all = fs::read(&paths[0]).unwrap();
    assert!(all == model, "fsx seed {seed}: final contents differ from the model");
}
