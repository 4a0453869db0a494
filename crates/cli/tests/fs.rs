//! The POSIX file system on a real cluster through real FUSE mounts (`strata fs mount`):
//! file operations with `std::fs` and libc, two mounts of one volume (close-to-open),
//! remount persistence, a SIGKILLed mount keeps what it fsync'd, exNode layouts, reads at a
//! snapshot, and bad input. Needs /dev/fuse and fusermount3: fails under CI=true without them.

mod common;
#[path = "posix/mount.rs"]
mod mount;

use common::{poll, Cluster};
use mount::{errno_of, fuse_available, is_mounted, mount, MountGuard};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Unmount (the command waits for the mount process to exit), then check that the mount
/// process shut down cleanly: its log has no panic.
fn umount(c: &Cluster, mp: &Path) {
    let log = PathBuf::from(format!("/tmp/strata-fs-{}.log", fs::canonicalize(mp).unwrap().display().to_string().replace('/', "_")));
    c.json(&["fs", "umount", mp.to_str().unwrap()]);
    assert!(!is_mounted(mp));
    let text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("the mount's log {}: {e}", log.display()));
    assert!(!text.contains("panicked"), "the mount process panicked: {text}");
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) -> i32 {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn xattr_get(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

#[test]
fn posix_volume_on_a_cluster() {
    if !fuse_available() {
        return;
    }
    let c = Cluster::start(&["--ranks", "3"]);
    c.json(&["cont", "create", "tank", "vol", "--type", "posix", "--oclass", "RP_2G1"]);
    let a = c.path().join("a");
    let b = c.path().join("b");
    let _guard = MountGuard(vec![a.clone(), b.clone()]);
    mount(&c, "tank/vol", &a, &[]);

    // Create, write, read; modes and owners.
    fs::write(a.join("f"), b"hello world").unwrap();
    assert_eq!(fs::read(a.join("f")).unwrap(), b"hello world");
    fs::set_permissions(a.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    let md = fs::metadata(a.join("f")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.len(), md.nlink(), md.uid()), (0o640, 11, 1, 0));
    // Several chunks (1 MiB each) at an odd offset.
    let big: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut f = fs::File::create(a.join("big")).unwrap();
        f.write_all(&big[..1000]).unwrap();
        f.write_all(&big[1000..]).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(fs::read(a.join("big")).unwrap(), big);
    // Rename over an existing file.
    fs::write(a.join("g"), b"old").unwrap();
    fs::rename(a.join("f"), a.join("g")).unwrap();
    assert_eq!(fs::read(a.join("g")).unwrap(), b"hello world");
    assert_eq!(errno_of(fs::metadata(a.join("f"))), libc::ENOENT);
    // Hard and symbolic links.
    fs::hard_link(a.join("g"), a.join("h")).unwrap();
    assert_eq!(fs::metadata(a.join("g")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(a.join("g")).unwrap().ino(), fs::metadata(a.join("h")).unwrap().ino());
    std::os::unix::fs::symlink("g", a.join("s")).unwrap();
    assert_eq!(fs::read_link(a.join("s")).unwrap(), PathBuf::from("g"));
    assert_eq!(fs::read(a.join("s")).unwrap(), b"hello world");
    // Unlink a file that is open: the descriptor still reads it.
    let mut open = fs::File::open(a.join("h")).unwrap();
    fs::remove_file(a.join("g")).unwrap();
    fs::remove_file(a.join("h")).unwrap();
    assert_eq!(errno_of(fs::metadata(a.join("h"))), libc::ENOENT);
    let mut text = String::new();
    open.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello world");
    drop(open);
    // Sparse files and truncate.
    {
        let mut f = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(a.join("sparse")).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        f.sync_all().unwrap();
        assert_eq!(f.metadata().unwrap().len(), (5 << 20) + 4);
        let mut head = vec![1u8; 8192];
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.read_exact(&mut head).unwrap();
        assert!(head.iter().all(|x| *x == 0), "a hole reads as zeros");
        f.set_len(100).unwrap();
        f.set_len(3 << 20).unwrap();
    }
    let sparse = fs::read(a.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 3 << 20);
    assert!(sparse.iter().all(|x| *x == 0), "truncate then extend leaves zeros");
    // Extended attributes, and the object class attribute.
    assert_eq!(xattr_set(&a.join("big"), "user.color", b"blue"), 0);
    assert_eq!(xattr_get(&a.join("big"), "user.color"), Ok(b"blue".to_vec()));
    assert_eq!(xattr_get(&a.join("big"), "user.none"), Err(libc::ENODATA));
    assert_eq!(xattr_get(&a.join("big"), "user.strata.oclass"), Ok(b"RP_2G1".to_vec()));
    // Directories: non-empty rmdir fails; a directory's class is inherited by new files.
    fs::create_dir(a.join("d")).unwrap();
    fs::write(a.join("d/x"), b"x").unwrap();
    assert_eq!(errno_of(fs::remove_dir(a.join("d"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::create_dir(a.join("d"))), libc::EEXIST);
    assert_eq!(errno_of(fs::write(a.join("big/x"), b"")), libc::ENOTDIR);
    assert_eq!(errno_of(fs::write(a.join("n".repeat(256)), b"")), libc::ENAMETOOLONG);
    fs::create_dir(a.join("ec")).unwrap();
    assert_eq!(xattr_set(&a.join("ec"), "user.strata.oclass", b"S1"), 0);
    fs::write(a.join("ec/file"), b"striped").unwrap();
    assert_eq!(xattr_get(&a.join("ec/file"), "user.strata.oclass"), Ok(b"S1".to_vec()));
    assert_eq!(xattr_set(&a.join("ec"), "user.strata.oclass", b"nonsense"), libc::EINVAL);
    fs::remove_file(a.join("d/x")).unwrap();
    fs::remove_dir(a.join("d")).unwrap();
    let mut names: Vec<String> = fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["big", "ec", "s", "sparse"]);
    assert_eq!(fs::metadata(&a).unwrap().nlink(), 3, "root: ., .. and one subdirectory");

    // Layout: an exNode with one replicate segment of two blocks, each with capabilities.
    let out = c.cmd(&["fs", "layout", a.join("big").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["[exnode]", "[view]", "[segment-", "driver = replicate", "class = RP_2G1", "[block-", "read_cap = cap1.", "write_cap = cap1.", "size = 3500000"] {
        assert!(text.contains(needle), "layout lacks '{needle}':\n{text}");
    }
    assert_eq!(text.matches("[block-").count(), 2);
    let j = c.json(&["fs", "layout", a.join("ec/file").to_str().unwrap(), "--format", "json"]);
    assert_eq!(j["segments"][0]["driver"], "stripe");
    assert_eq!(j["blocks"].as_array().unwrap().len(), 1);
    let err = c.fails(&["fs", "layout", a.join("ec").to_str().unwrap()]);
    assert!(err.contains("is a directory"), "{err}");

    // A snapshot, then a change: cat shows either version.
    fs::write(a.join("ver"), b"version one").unwrap();
    c.json(&["cont", "snapshot", "create", "tank", "vol", "v1"]);
    fs::write(a.join("ver"), b"version two, longer").unwrap();
    let out = c.cmd(&["fs", "cat", a.join("ver").to_str().unwrap(), "--snapshot", "v1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "version one", "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.cmd(&["fs", "cat", "tank/vol:/ver"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "version two, longer");
    fs::remove_file(a.join("ver")).unwrap();
    let out = c.cmd(&["fs", "cat", a.join("ver").to_str().unwrap(), "--snapshot", "v1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "version one", "a deleted file is still in the snapshot");
    assert!(c.fails(&["fs", "cat", "tank/vol:/ver"]).contains("no such file"));

    // A second mount of the same volume: close-to-open in both directions.
    mount(&c, "tank/vol", &b, &[]);
    assert_eq!(fs::read(b.join("big")).unwrap(), big);
    fs::write(a.join("shared"), b"from a").unwrap();
    assert_eq!(fs::read(b.join("shared")).unwrap(), b"from a");
    fs::write(b.join("shared"), b"b wrote this, longer").unwrap();
    assert_eq!(fs::read(a.join("shared")).unwrap(), b"b wrote this, longer");
    {
        let mut f = fs::OpenOptions::new().write(true).open(a.join("shared")).unwrap();
        f.write_all(b"A").unwrap();
    }
    assert_eq!(fs::read(b.join("shared")).unwrap(), b"A wrote this, longer");
    fs::create_dir(b.join("from-b")).unwrap();
    assert!(fs::metadata(a.join("from-b")).unwrap().is_dir());
    // A file deleted by b while a has it open: a's reads return its bytes until a notices
    // (its metadata cache time), then fail with ESTALE as on NFS; never punched zeros.
    let doomed: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    fs::write(b.join("doomed"), &doomed).unwrap();
    let f = fs::File::open(a.join("doomed")).unwrap();
    fs::remove_file(b.join("doomed")).unwrap();
    poll("a read of the deleted file to fail with ESTALE", Duration::from_secs(20), || {
        use std::os::unix::fs::FileExt;
        use std::os::unix::io::AsRawFd;
        // Past the kernel's page cache, to the mount.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        let mut buf = vec![0u8; 1 << 20];
        match f.read_exact_at(&mut buf, 1 << 20) {
            Ok(()) => {
                assert!(buf == doomed[1 << 20..2 << 20], "a deleted file read back other bytes than it held");
                None
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
                Some(())
            }
        }
    });
    drop(f);

    // Remount: everything is still there.
    umount(&c, &a);
    umount(&c, &b);
    mount(&c, "tank/vol", &a, &[]);
    assert_eq!(fs::read(a.join("big")).unwrap(), big);
    assert_eq!(fs::read(a.join("shared")).unwrap(), b"A wrote this, longer");
    assert_eq!(xattr_get(&a.join("big"), "user.color"), Ok(b"blue".to_vec()));
    assert_eq!(fs::read_link(a.join("s")).unwrap(), PathBuf::from("g"));

    // Read-only mount refuses writes.
    umount(&c, &a);
    mount(&c, "tank/vol", &a, &["-o", "ro"]);
    assert_eq!(errno_of(fs::write(a.join("nope"), b"x")), libc::EROFS);
    assert_eq!(fs::read(a.join("shared")).unwrap(), b"A wrote this, longer");
    umount(&c, &a);

    // Bad input: a missing mount point, a busy one, a volume of another type, no such volume.
    let missing = c.path().join("missing");
    let err = c.fails(&["fs", "mount", "tank/vol", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist") || err.contains("No such file"), "{err}");
    mount(&c, "tank/vol", &a, &[]);
    let err = c.fails(&["fs", "mount", "tank/vol", a.to_str().unwrap()]);
    assert!(err.contains("already a mount point"), "{err}");
    umount(&c, &a);
    c.json(&["cont", "create", "tank", "plain"]);
    let err = c.fails(&["fs", "mount", "tank/plain", a.to_str().unwrap()]);
    assert!(err.contains("not posix"), "{err}");
    assert!(!is_mounted(&a));
    let out = c.cmd(&["fs", "mount", "tank/vol", a.to_str().unwrap(), "-o", "bogus"]);
    assert_eq!(out.status.code(), Some(2), "bad mount options are usage errors");
    assert!(c.fails(&["fs", "umount", a.to_str().unwrap()]).contains("not mounted"));
}

#[test]
fn fsynced_data_survives_a_killed_mount() {
    if !fuse_available() {
        return;
    }
    let c = Cluster::start(&["--ranks", "3"]);
    c.json(&["cont", "create", "tank", "vol", "--type", "posix"]);
    let a = c.path().join("a");
    let _guard = MountGuard(vec![a.clone()]);
    fs::create_dir_all(&a).unwrap();
    let log = fs::File::create(c.path().join("mount.log")).unwrap();
    let mut child = Command::new(common::BIN)
        .args(["fs", "mount", "tank/vol", a.to_str().unwrap(), "--foreground", "--session-ttl-ms", "2000"])
        .env("STRATA_CLUSTER", c.cluster_file())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    poll("the foreground mount", Duration::from_secs(30), || is_mounted(&a).then_some(()));
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let mut f = fs::File::create(a.join("durable")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    // A file unlinked while open: an orphan of this mount's session, which is alive.
    let mut doomed = fs::File::create(a.join("doomed")).unwrap();
    doomed.write_all(&data[..100_000]).unwrap();
    doomed.sync_all().unwrap();
    fs::remove_file(a.join("doomed")).unwrap();
    let orphans = c.json(&["fs", "orphans", "tank/vol", "--reclaim"]);
    assert_eq!(orphans.as_array().map(|a| a.len()), Some(1), "{orphans}");
    assert_eq!((orphans[0]["alive"].as_bool(), orphans[0]["reclaimed"].as_bool()), (Some(true), Some(false)), "a live mount's orphan is kept: {orphans}");
    // Written but never flushed: may be lost, must not corrupt what was synced.
    f.write_all(b"unsynced tail").unwrap();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    drop(f);
    drop(doomed);
    let _ = Command::new("fusermount3").arg("-uz").arg(&a).status();
    poll("the dead mount to go", Duration::from_secs(10), || (!is_mounted(&a)).then_some(()));
    assert_eq!(c.json(&["fs", "orphans", "tank/vol"]).as_array().map(|a| a.len()), Some(1), "the dead mount left its orphan");
    mount(&c, "tank/vol", &a, &["--session-ttl-ms", "2000"]);
    let got = fs::read(a.join("durable")).unwrap();
    assert!(got.len() >= data.len(), "fsync'd bytes are all there ({} < {})", got.len(), data.len());
    assert_eq!(&got[..data.len()], &data[..]);
    // The new mount reclaims the dead one's orphan once its session has expired.
    poll("the dead mount's orphan to be reclaimed", Duration::from_secs(30), || c.json(&["fs", "orphans", "tank/vol"]).as_array().is_some_and(|a| a.is_empty()).then_some(()));
    // An orphan of this live mount survives a reclaim pass, then goes at its last close.
    let mut kept = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(a.join("kept")).unwrap();
    kept.write_all(b"still readable").unwrap();
    kept.sync_all().unwrap();
    fs::remove_file(a.join("kept")).unwrap();
    let orphans = c.json(&["fs", "orphans", "tank/vol", "--reclaim"]);
    assert_eq!(orphans[0]["alive"].as_bool(), Some(true), "{orphans}");
    let mut text = String::new();
    kept.seek(SeekFrom::Start(0)).unwrap();
    kept.read_to_string(&mut text).unwrap();
    assert_eq!(text, "still readable");
    drop(kept);
    poll("the last close to reclaim the orphan", Duration::from_secs(10), || c.json(&["fs", "orphans", "tank/vol"]).as_array().is_some_and(|a| a.is_empty()).then_some(()));
    umount(&c, &a);
}

#[test]
fn capabilities_grant_one_shard_and_nothing_else() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let c = Cluster::start(&["--ranks", "3"]);
    c.json(&["cont", "create", "tank", "vol", "--type", "posix", "--oclass", "RP_2G1"]);
    let a = c.path().join("a");
    let _guard = MountGuard(vec![a.clone()]);
    mount(&c, "tank/vol", &a, &[]);
    // Three groups of two replicas over six targets; one byte in each of 16 chunks.
    fs::create_dir(a.join("wide")).unwrap();
    assert_eq!(xattr_set(&a.join("wide"), "user.strata.oclass", b"RP_2GX"), 0);
    let f = fs::File::create(a.join("wide/f")).unwrap();
    for i in 0..16u64 {
        f.write_all_at(&[b'a' + i as u8], i << 20).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let path = a.join("wide/f");
    let x = c.json(&["fs", "layout", path.to_str().unwrap(), "--format", "json"]);
    assert_eq!(x["segments"][0]["groups"], 3);
    let blocks = x["blocks"].as_array().unwrap().clone();
    assert_eq!(blocks.len(), 6);
    let leader = blocks.iter().find(|b| b["group"] == 0 && b["shard"] == 0).unwrap();
    let replica = blocks.iter().find(|b| b["group"] == 0 && b["shard"] == 1).unwrap();
    let read_cap = leader["read_cap"].as_str().unwrap();
    let get = |cap: &str, chunk: u64| c.cmd(&["obj", "get", "--cap", cap, "--chunk", &chunk.to_string(), "--akey", "d", "--len", "1"]);
    // The read_cap reads its group's chunks and is refused for the others.
    let mut mine = Vec::new();
    let mut others = 0;
    for i in 0..16u64 {
        let out = get(read_cap, i);
        if out.status.success() {
            assert_eq!(out.stdout, vec![b'a' + i as u8], "chunk {i} through the capability");
            mine.push(i);
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("group"), "chunk {i}: {err}");
            others += 1;
        }
    }
    assert!(!mine.is_empty() && others > 0, "chunks spread over groups: mine {mine:?}, others {others}");
    // The replica's read_cap reads the same chunk from the other target.
    let out = get(replica["read_cap"].as_str().unwrap(), mine[0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, vec![b'a' + mine[0] as u8]);
    // Forged (one digit of the signature changed) and expired tokens are refused.
    let mut forged = read_cap.to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let err = String::from_utf8_lossy(&get(&forged, mine[0]).stderr).into_owned();
    assert!(err.contains("signature"), "{err}");
    let short = c.json(&["fs", "layout", path.to_str().unwrap(), "--format", "json", "--cap-ttl-s", "0"]);
    let expired = short["blocks"][0]["read_cap"].as_str().unwrap().to_string();
    poll("the capability to expire", Duration::from_secs(30), || {
        let err = String::from_utf8_lossy(&get(&expired, 0).stderr).into_owned();
        err.contains("expired").then_some(())
    });
    // Writes: a read_cap cannot write; a non-leader write_cap is refused; the leader's writes.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cf = strata_client::ClusterFile::load(&c.cluster_file()).unwrap();
    rt.block_on(async {
        let client = strata_client::Client::connect(&cf).await.unwrap();
        let dkey = mine[0].to_be_bytes();
        let e = client.cap_write(read_cap, &dkey, b"d", 0, b"X").await.unwrap_err().to_string();
        assert!(e.contains("grants Read"), "{e}");
        let e = client.cap_write(replica["write_cap"].as_str().unwrap(), &dkey, b"d", 0, b"X").await.unwrap_err().to_string();
        assert!(e.contains("leader"), "{e}");
        client.cap_write(leader["write_cap"].as_str().unwrap(), &dkey, b"d", 0, b"Z").await.unwrap();
        let other = (0..16u64).find(|i| !mine.contains(i)).unwrap();
        let e = client.cap_write(leader["write_cap"].as_str().unwrap(), &other.to_be_bytes(), b"d", 0, b"X").await.unwrap_err().to_string();
        assert!(e.contains("group"), "{e}");
    });
    assert_eq!(get(replica["read_cap"].as_str().unwrap(), mine[0]).stdout, b"Z", "the leader replicated the capability write");
    umount(&c, &a);
}

#[test]
fn bench_fs_reports_ratios_against_bindfs() {
    if !fuse_available() {
        return;
    }
    // The baseline: scripts/test installs bindfs.
    if Command::new("bindfs").arg("--version").output().is_err() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "bench fs needs bindfs (apt-get install bindfs)");
        eprintln!("skipping: no bindfs");
        return;
    }
    let c = Cluster::start(&["--ranks", "3"]);
    let v = c.json(&["bench", "fs", "--files", "300", "--size", "4M", "--random-secs", "1", "--runs", "1"]);
    for job in ["create", "stat", "unlink", "seq-write-1m", "seq-read-1m", "rand-write-4k", "rand-read-4k"] {
        let f = &v[job];
        let (s, b, r) = (f["strata"].as_f64().unwrap_or(0.0), f["bindfs"].as_f64().unwrap_or(0.0), f["ratio"].as_f64().unwrap_or(-1.0));
        assert!(s > 0.0 && b > 0.0, "{job}: both sides measured: {f}");
        assert!((r - s / b).abs() < 1e-6 * r.max(1.0), "{job}: ratio is strata/bindfs: {f}");
    }
    assert_eq!(v["create"]["target"].as_f64(), Some(0.5));
    assert_eq!(v["seq-read-1m"]["target"].as_f64(), Some(0.6));
    assert!(v["seq-read-1m"]["met"].is_boolean());
}
