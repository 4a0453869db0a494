//! The FUSE layer through a real kernel mount, over in-memory metadata and data stores: POSIX
//! behaviour seen by `std::fs` and libc, without a cluster. (The same on a real cluster is in
//! `crates/cli/tests/fs.rs`.) Needs /dev/fuse and fusermount3; fails under CI=true without them.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_fs::file_data::MemData;
use strata_fs::fuse_mount::{serve, MountOptions, StrataFs};
use strata_fs::ino_alloc::InoAlloc;
use strata_fs::meta_store::MemMetaStore;
use strata_fs::namespace::Namespace;

fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && std::process::Command::new("fusermount3").arg("-V").output().is_ok();
    if !ok && std::env::var("CI").as_deref() == Ok("true") {
        panic!("FUSE tests need /dev/fuse and fusermount3 (apt-get install fuse3)");
    }
    ok
}

struct Mounted {
    dir: tempfile::TempDir,
    unmounter: fuser::SessionUnmounter,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    _rt: tokio::runtime::Runtime,
}

impl Mounted {
    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmounter.unmount();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mount(chunk: u64) -> Mounted {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ns = rt.block_on(Namespace::open(MemMetaStore::new(), InoAlloc::counter(64), "S1".into(), chunk)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let opts = MountOptions { write_back_bytes_max: 64 << 10, ..Default::default() };
    let fsys = StrataFs::new(rt.handle().clone(), Arc::new(ns), Arc::new(MemData::default()), opts);
    let (tx, rx) = std::sync::mpsc::channel();
    let m2 = mnt.clone();
    let thread = std::thread::spawn(move || serve(fsys, &m2, |u| tx.send(u).unwrap()));
    let unmounter = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("mount within 10 s");
    Mounted { dir, unmounter, thread: Some(thread), _rt: rt }
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

#[test]
fn posix_file_operations_through_the_kernel() {
    if !fuse_available() {
        return;
    }
    let m = mount(4096);
    let p = m.path();
    // Create, write, read back; sizes and modes.
    fs::write(p.join("a"), b"hello world").unwrap();
    assert_eq!(fs::read(p.join("a")).unwrap(), b"hello world");
    let md = fs::metadata(p.join("a")).unwrap();
    assert_eq!(md.len(), 11);
    assert!(md.is_file());
    fs::set_permissions(p.join("a"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(p.join("a")).unwrap().mode() & 0o7777, 0o600);
    // Larger than a chunk and than the write-back limit, at odd offsets.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    fs::write(p.join("big"), &big).unwrap();
    assert_eq!(fs::read(p.join("big")).unwrap(), big);
    // Rename over an existing file.
    fs::write(p.join("b"), b"old").unwrap();
    fs::rename(p.join("a"), p.join("b")).unwrap();
    assert_eq!(fs::read(p.join("b")).unwrap(), b"hello world");
    assert_eq!(errno_of(fs::metadata(p.join("a"))), libc::ENOENT);
    // Hard and symbolic links.
    fs::hard_link(p.join("b"), p.join("c")).unwrap();
    assert_eq!(fs::metadata(p.join("b")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("b", p.join("s")).unwrap();
    assert_eq!(fs::read_link(p.join("s")).unwrap(), PathBuf::from("b"));
    assert_eq!(fs::read(p.join("s")).unwrap(), b"hello world");
    // Unlink an open file: still readable through the descriptor.
    let mut f = fs::File::open(p.join("c")).unwrap();
    fs::remove_file(p.join("b")).unwrap();
    fs::remove_file(p.join("c")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello world");
    drop(f);
    // Truncate and sparse files.
    let mut f = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(p.join("sparse")).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), (1 << 20) + 3);
    let mut head = vec![1u8; 4096];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut head).unwrap();
    assert!(head.iter().all(|b| *b == 0));
    f.set_len(10).unwrap();
    assert_eq!(fs::metadata(p.join("sparse")).unwrap().len(), 10);
    f.set_len(5000).unwrap();
    drop(f);
    assert_eq!(fs::read(p.join("sparse")).unwrap(), vec![0u8; 5000]);
    // Directories.
    fs::create_dir(p.join("d")).unwrap();
    fs::write(p.join("d/x"), b"x").unwrap();
    assert_eq!(errno_of(fs::remove_dir(p.join("d"))), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::create_dir(p.join("d"))), libc::EEXIST);
    assert_eq!(errno_of(fs::write(p.join("big/x"), b"")), libc::ENOTDIR);
    assert_eq!(errno_of(fs::write(p.join("x".repeat(256)), b"")), libc::ENAMETOOLONG);
    let mut names: Vec<String> = fs::read_dir(&p).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["big", "d", "s", "sparse"]);
    fs::remove_file(p.join("d/x")).unwrap();
    fs::remove_dir(p.join("d")).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().nlink(), 2);
    // Extended attributes.
    let path = std::ffi::CString::new(p.join("big").as_os_str().as_encoded_bytes()).unwrap();
    let rc = unsafe { libc::setxattr(path.as_ptr(), c"user.color".as_ptr(), b"blue".as_ptr().cast(), 4, 0) };
    assert_eq!(rc, 0);
    let mut buf = [0u8; 16];
    let n = unsafe { libc::getxattr(path.as_ptr(), c"user.color".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(&buf[..n as usize], b"blue");
    let n = unsafe { libc::getxattr(path.as_ptr(), c"user.none".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENODATA));
    // A fifo.
    let fifo = std::ffi::CString::new(p.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(p.join("fifo")).unwrap().file_type().is_fifo());
}

#[test]
fn a_sequential_reader_sees_writes_made_while_it_reads_ahead() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let m = mount(1 << 20);
    let p = m.path().join("seq");
    let mut model: Vec<u8> = (0..24u32 << 20).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    fs::write(&p, &model).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // The kernel's copies from writing the file dropped: every read below reaches the mount.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut buf = vec![0u8; 1 << 20];
    for round in 0..24u64 {
        let off = round << 20;
        if round == 3 {
            // Inside the window being read ahead, then past it; the kernel's copies dropped so
            // the reads below come from the mount.
            for (at, byte) in [(5u64 << 20, 0xAAu8), (9 << 20, 0xBB), ((14 << 20) + 100, 0xCC)] {
                let w = vec![byte; 70_000];
                f.write_all_at(&w, at).unwrap();
                model[at as usize..at as usize + w.len()].copy_from_slice(&w);
            }
            f.sync_all().unwrap();
            assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        }
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(buf == model[off as usize..(off as usize + buf.len())], "MiB {round} differs from what was written");
    }
}

#[test]
fn a_hole_punched_over_buffered_bytes_that_grew_the_file_keeps_its_size() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let m = mount(4096);
    let p = m.path().join("grown");
    fs::write(&p, vec![1u8; 10_000]).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // Buffered in the mount: grows the file to 14,000 bytes.
    f.write_all_at(&[2u8; 5000], 9000).unwrap();
    // The punch drops the buffered tail instead of writing it; the size it reached stays.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 12_000, 2000) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    drop(f);
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 14_000);
    assert!(got[..9000].iter().all(|b| *b == 1));
    assert!(got[9000..12_000].iter().all(|b| *b == 2));
    assert!(got[12_000..].iter().all(|b| *b == 0));
}
