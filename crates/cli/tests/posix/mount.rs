//! Mounting for the suite: FUSE availability (a failure under CI=true), mounts that are
//! unmounted when a test ends or panics, and errno helpers. `tests/fs.rs` uses it too.

#![allow(dead_code)]

use crate::common::Cluster;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The unprivileged user of the permission checks.
pub const OTHER_UID: u32 = 4242;

pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && Command::new("fusermount3").arg("-V").output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").as_deref() == Ok("true") {
        panic!("FUSE tests need /dev/fuse and fusermount3 (apt-get install fuse3)");
    }
    if !ok {
        eprintln!("skipping: no /dev/fuse or fusermount3 (set CI=true to make this a failure)");
    }
    ok
}

pub fn is_mounted(mp: &Path) -> bool {
    let needle = format!(" {} ", mp.display());
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.contains(&needle))
}

/// Unmounts (lazily) whatever is still mounted when a test ends or panics.
pub struct MountGuard(pub Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        for mp in &self.0 {
            if is_mounted(mp) {
                let _ = Command::new("fusermount3").arg("-uz").arg(mp).status();
            }
        }
    }
}

/// `strata fs mount VOL MP OPTS…` (in the background), creating the mount point.
pub fn mount(c: &Cluster, vol: &str, mp: &Path, extra: &[&str]) {
    fs::create_dir_all(mp).unwrap();
    let mut args = vec!["fs", "mount", vol, mp.to_str().unwrap()];
    args.extend_from_slice(extra);
    let v = c.json(&args);
    assert!(v["pid"].as_u64().is_some(), "mount reports its pid: {v}");
    assert!(is_mounted(mp), "{} is mounted", mp.display());
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

pub fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}
