//! The conformance checks: for chmod, chown, link, mkdir, open, rename, rmdir, symlink,
//! truncate, unlink, utimensat and xattrs, modes, ownership, errno values (EEXIST, ENOENT,
//! ENOTDIR, EISDIR, ENOTEMPTY, EACCES/EPERM for a non-root uid, ENAMETOOLONG, ELOOP, EINVAL),
//! link counts and timestamp updates. Every check runs; the caller fails listing all that did
//! not hold.

use crate::mount::{cstr, errno_of, last_errno, OTHER_UID};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Run a shell command as an unprivileged user; returns its stderr if it failed.
fn as_user(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh").arg("-c").arg(cmd).uid(OTHER_UID).gid(OTHER_UID).env("LC_ALL", "C").output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ctime_ns(p: &Path) -> i128 {
    let m = fs::symlink_metadata(p).unwrap();
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

fn mtime_ns(p: &Path) -> i128 {
    let m = fs::symlink_metadata(p).unwrap();
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

pub struct Checks {
    pub failed: Vec<String>,
    pub passed: usize,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Debug) {
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(format!("{what}: {detail:?}"));
        }
    }
    fn errno(&mut self, what: &str, got: i32, want: i32) {
        self.check(what, got == want, format!("errno {got}, want {want}"));
    }
}

pub fn conformance(m: &Path, c: &mut Checks) {
    let p = |s: &str| m.join(s);
    // --- mkdir
    let root_nlink = fs::metadata(m).unwrap().nlink();
    let before = mtime_ns(m);
    fs::create_dir(p("d")).unwrap();
    c.check("mkdir: parent nlink +1", fs::metadata(m).unwrap().nlink() == root_nlink + 1, fs::metadata(m).unwrap().nlink());
    c.check("mkdir: parent mtime moves", mtime_ns(m) > before, ());
    c.check("mkdir: new dir nlink 2", fs::metadata(p("d")).unwrap().nlink() == 2, ());
    c.errno("mkdir: EEXIST", errno_of(fs::create_dir(p("d"))), libc::EEXIST);
    c.errno("mkdir: ENOENT parent", errno_of(fs::create_dir(p("nope/x"))), libc::ENOENT);
    fs::write(p("file"), b"data").unwrap();
    c.errno("mkdir: ENOTDIR", errno_of(fs::create_dir(p("file/x"))), libc::ENOTDIR);
    c.errno("mkdir: ENAMETOOLONG", errno_of(fs::create_dir(p(&"n".repeat(256)))), libc::ENAMETOOLONG);
    c.check("mkdir: 255-byte name works", fs::create_dir(p(&"n".repeat(255))).is_ok(), ());
    let r = unsafe { libc::mkdir(cstr(&p("m700")).as_ptr(), 0o700) };
    c.check("mkdir: mode", r == 0 && fs::metadata(p("m700")).unwrap().mode() & 0o7777 == 0o700, fs::metadata(p("m700")).map(|m| m.mode()));
    // --- open
    let f = CString::new(p("file").as_os_str().as_bytes()).unwrap();
    c.errno("open: O_CREAT|O_EXCL EEXIST", unsafe { libc::open(f.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o644) }.min(0).abs() * last_errno(), libc::EEXIST);
    c.errno("open: ENOENT", errno_of(fs::File::open(p("missing"))), libc::ENOENT);
    c.errno("open: EISDIR for writing", errno_of(fs::OpenOptions::new().write(true).open(p("d"))), libc::EISDIR);
    c.errno("open: ENOTDIR through a file", errno_of(fs::File::open(p("file/x"))), libc::ENOTDIR);
    fs::write(p("trunc"), b"0123456789").unwrap();
    drop(fs::OpenOptions::new().write(true).truncate(true).open(p("trunc")).unwrap());
    c.check("open: O_TRUNC empties", fs::metadata(p("trunc")).unwrap().len() == 0, ());
    fs::write(p("secret"), b"s").unwrap();
    fs::set_permissions(p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let e = as_user(&format!("cat {}", p("secret").display()));
    c.check("open: EACCES for another uid on 0600", e.as_ref().is_err_and(|e| e.contains("Permission denied")), e);
    fs::set_permissions(p("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    c.check("open: another uid reads 0644", as_user(&format!("cat {} >/dev/null", p("secret").display())).is_ok(), ());
    let e = as_user(&format!("echo x > {}", p("secret").display()));
    c.check("open: EACCES writing another's 0644", e.as_ref().is_err_and(|e| e.contains("Permission denied")), e);
    let e = as_user(&format!("touch {}", p("d/userfile").display()));
    c.check("create: EACCES in another's 0755 directory", e.as_ref().is_err_and(|e| e.contains("Permission denied")), e);
    // --- chmod
    let ct = ctime_ns(&p("file"));
    fs::set_permissions(p("file"), fs::Permissions::from_mode(0o4751)).unwrap();
    c.check("chmod: mode with setuid", fs::metadata(p("file")).unwrap().mode() & 0o7777 == 0o4751, fs::metadata(p("file")).unwrap().mode());
    c.check("chmod: ctime moves", ctime_ns(&p("file")) > ct, ());
    let e = as_user(&format!("chmod 777 {}", p("file").display()));
    c.check("chmod: EPERM for another uid", e.as_ref().is_err_and(|e| e.contains("Operation not permitted")), e);
    // --- chown
    let r = unsafe { libc::chown(cstr(&p("file")).as_ptr(), 1234, 5678) };
    let md = fs::metadata(p("file")).unwrap();
    c.check("chown: owner and group", r == 0 && md.uid() == 1234 && md.gid() == 5678, (md.uid(), md.gid()));
    c.check("chown: clears setuid", md.mode() & 0o4000 == 0, md.mode());
    let e = as_user(&format!("chown {OTHER_UID} {}", p("trunc").display()));
    c.check("chown: EPERM for another uid", e.as_ref().is_err_and(|e| e.contains("Operation not permitted")), e);
    unsafe { libc::chown(cstr(&p("file")).as_ptr(), 0, 0) };
    // --- link
    let ct = ctime_ns(&p("file"));
    fs::hard_link(p("file"), p("d/hard")).unwrap();
    c.check("link: nlink 2", fs::metadata(p("file")).unwrap().nlink() == 2, ());
    c.check("link: ctime moves", ctime_ns(&p("file")) > ct, ());
    c.check("link: same inode", fs::metadata(p("file")).unwrap().ino() == fs::metadata(p("d/hard")).unwrap().ino(), ());
    c.errno("link: EEXIST", errno_of(fs::hard_link(p("file"), p("trunc"))), libc::EEXIST);
    c.errno("link: ENOENT source", errno_of(fs::hard_link(p("missing"), p("x"))), libc::ENOENT);
    c.errno("link: EPERM on a directory", errno_of(fs::hard_link(p("d"), p("dlink"))), libc::EPERM);
    // --- symlink
    std::os::unix::fs::symlink("file", p("sym")).unwrap();
    c.check("symlink: readlink", fs::read_link(p("sym")).unwrap() == Path::new("file"), ());
    c.check("symlink: lstat size is the target length", fs::symlink_metadata(p("sym")).unwrap().len() == 4, ());
    c.check("symlink: follows", fs::read(p("sym")).unwrap() == b"data", ());
    c.errno("symlink: EEXIST", errno_of(std::os::unix::fs::symlink("x", p("sym"))), libc::EEXIST);
    std::os::unix::fs::symlink("loop2", p("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", p("loop2")).unwrap();
    c.errno("symlink: ELOOP", errno_of(fs::File::open(p("loop1"))), libc::ELOOP);
    // --- truncate
    let (mt, ct) = (mtime_ns(&p("trunc")), ctime_ns(&p("trunc")));
    fs::OpenOptions::new().write(true).open(p("trunc")).unwrap().set_len(100_000).unwrap();
    c.check("truncate: extends with zeros", fs::read(p("trunc")).unwrap() == vec![0u8; 100_000], ());
    c.check("truncate: mtime and ctime move", mtime_ns(&p("trunc")) > mt && ctime_ns(&p("trunc")) > ct, ());
    let r = unsafe { libc::truncate(cstr(&p("trunc")).as_ptr(), 10) };
    c.check("truncate: shrinks by path", r == 0 && fs::metadata(p("trunc")).unwrap().len() == 10, ());
    c.errno("truncate: EISDIR", if unsafe { libc::truncate(cstr(&p("d")).as_ptr(), 0) } == 0 { 0 } else { last_errno() }, libc::EISDIR);
    let e = as_user(&format!("truncate -s 0 {}", p("trunc").display()));
    c.check("truncate: EACCES for another uid", e.as_ref().is_err_and(|e| e.contains("Permission denied")), e);
    // --- utimensat
    let ts = [libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 123_456_789 }, libc::timespec { tv_sec: 1_100_000_000, tv_nsec: 987_654_321 }];
    let ct = ctime_ns(&p("trunc"));
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&p("trunc")).as_ptr(), ts.as_ptr(), 0) };
    let md = fs::metadata(p("trunc")).unwrap();
    c.check("utimensat: explicit times with ns", r == 0 && (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()) == (1_000_000_000, 123_456_789, 1_100_000_000, 987_654_321), (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()));
    c.check("utimensat: ctime moves", ctime_ns(&p("trunc")) > ct, ());
    let now = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW }, libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }];
    unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&p("trunc")).as_ptr(), now.as_ptr(), 0) };
    let md = fs::metadata(p("trunc")).unwrap();
    c.check("utimensat: UTIME_NOW / UTIME_OMIT", md.atime() > 1_500_000_000 && md.mtime() == 1_100_000_000, (md.atime(), md.mtime()));
    // --- rename
    fs::write(p("r1"), b"one").unwrap();
    fs::write(p("r2"), b"two").unwrap();
    let before = mtime_ns(m);
    fs::rename(p("r1"), p("r2")).unwrap();
    c.check("rename: over a file", fs::read(p("r2")).unwrap() == b"one" && !p("r1").exists(), ());
    c.check("rename: parent mtime moves", mtime_ns(m) > before, ());
    fs::create_dir(p("e1")).unwrap();
    fs::create_dir(p("e2")).unwrap();
    fs::create_dir(p("full")).unwrap();
    fs::write(p("full/x"), b"").unwrap();
    c.errno("rename: dir over non-empty dir ENOTEMPTY", errno_of(fs::rename(p("e1"), p("full"))), libc::ENOTEMPTY);
    c.errno("rename: file over dir EISDIR", errno_of(fs::rename(p("r2"), p("e2"))), libc::EISDIR);
    c.errno("rename: dir over file ENOTDIR", errno_of(fs::rename(p("e2"), p("r2"))), libc::ENOTDIR);
    c.errno("rename: into its own subdirectory EINVAL", errno_of(fs::rename(p("full"), p("full/x2"))), libc::EINVAL);
    c.errno("rename: ENOENT", errno_of(fs::rename(p("missing"), p("x"))), libc::ENOENT);
    c.check("rename: dir over empty dir", fs::rename(p("e1"), p("e2")).is_ok() && !p("e1").exists(), ());
    let n = fs::metadata(m).unwrap().nlink();
    fs::rename(p("e2"), p("d/e2")).unwrap();
    c.check("rename: moving a dir moves a link", fs::metadata(m).unwrap().nlink() == n - 1 && fs::metadata(p("d")).unwrap().nlink() == 3, (fs::metadata(m).unwrap().nlink(), n));
    c.check("rename: .. follows", fs::metadata(p("d/e2/..")).unwrap().ino() == fs::metadata(p("d")).unwrap().ino(), ());
    // --- rmdir
    c.errno("rmdir: ENOTEMPTY", errno_of(fs::remove_dir(p("full"))), libc::ENOTEMPTY);
    c.errno("rmdir: ENOTDIR", errno_of(fs::remove_dir(p("r2"))), libc::ENOTDIR);
    c.errno("rmdir: ENOENT", errno_of(fs::remove_dir(p("missing"))), libc::ENOENT);
    let n = fs::metadata(p("d")).unwrap().nlink();
    fs::remove_dir(p("d/e2")).unwrap();
    c.check("rmdir: parent nlink -1", fs::metadata(p("d")).unwrap().nlink() == n - 1, ());
    // --- unlink
    fs::remove_file(p("d/hard")).unwrap();
    c.check("unlink: nlink -1", fs::metadata(p("file")).unwrap().nlink() == 1, ());
    c.errno("unlink: EISDIR on a directory", errno_of(fs::remove_file(p("d"))), libc::EISDIR);
    c.errno("unlink: ENOENT", errno_of(fs::remove_file(p("missing"))), libc::ENOENT);
    fs::create_dir(p("sticky")).unwrap();
    fs::set_permissions(p("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(p("sticky/roots"), b"").unwrap();
    let e = as_user(&format!("rm -f {}", p("sticky/roots").display()));
    c.check("unlink: sticky directory protects another's file", e.as_ref().is_err_and(|e| e.contains("Operation not permitted") || e.contains("Permission denied")), e);
    c.check("unlink: another uid creates and removes its own file in a sticky dir", as_user(&format!("touch {0} && rm {0}", p("sticky/mine").display())).is_ok(), ());
    // --- xattr
    let set = |name: &str, v: &[u8], flags: i32| {
        let n = CString::new(name).unwrap();
        if unsafe { libc::setxattr(cstr(&p("file")).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) } == 0 {
            0
        } else {
            last_errno()
        }
    };
    c.errno("xattr: set", set("user.a", b"1", 0), 0);
    c.errno("xattr: XATTR_CREATE on existing EEXIST", set("user.a", b"2", libc::XATTR_CREATE), libc::EEXIST);
    c.errno("xattr: XATTR_REPLACE on missing ENODATA", set("user.b", b"2", libc::XATTR_REPLACE), libc::ENODATA);
    let mut small = [0u8; 1];
    let n = CString::new("user.a").unwrap();
    set("user.a", b"long value", 0);
    let r = unsafe { libc::getxattr(cstr(&p("file")).as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 1) };
    c.errno("xattr: ERANGE for a small buffer", if r < 0 { last_errno() } else { 0 }, libc::ERANGE);
    let mut list = [0u8; 256];
    let r = unsafe { libc::listxattr(cstr(&p("file")).as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    c.check("xattr: list", r > 0 && &list[..r as usize] == b"user.a\0", &list[..r.max(0) as usize]);
    let r = unsafe { libc::removexattr(cstr(&p("file")).as_ptr(), n.as_ptr()) };
    let r2 = unsafe { libc::removexattr(cstr(&p("file")).as_ptr(), n.as_ptr()) };
    c.check("xattr: remove, then ENODATA", r == 0 && r2 < 0 && last_errno() == libc::ENODATA, ());
    // --- bad input: names over 255 bytes for every call that makes a name
    let long = "x".repeat(256);
    c.errno("create: ENAMETOOLONG", errno_of(fs::File::create(p(&long))), libc::ENAMETOOLONG);
    c.errno("rename: ENAMETOOLONG target", errno_of(fs::rename(p("r2"), p(&long))), libc::ENAMETOOLONG);
    c.errno("link: ENAMETOOLONG", errno_of(fs::hard_link(p("r2"), p(&long))), libc::ENAMETOOLONG);
    c.errno("symlink: ENAMETOOLONG", errno_of(std::os::unix::fs::symlink("r2", p(&long))), libc::ENAMETOOLONG);
    c.errno("lookup: ENAMETOOLONG", errno_of(fs::metadata(p(&long))), libc::ENAMETOOLONG);
    c.errno("symlink: target over 4096 bytes ENAMETOOLONG", errno_of(std::os::unix::fs::symlink("t".repeat(4097), p("longtarget"))), libc::ENAMETOOLONG);
    c.check("mount still works after long names", fs::read(p("r2")).map(|d| d == b"one").unwrap_or(false) && !p(&"x".repeat(255)).exists(), ());
    // --- bad input: a path with a NUL never reaches the mount (a C path ends at the NUL; the
    // CLI's paths are refused with EINVAL by the namespace, tested there): EINVAL, nothing made.
    let e = fs::File::create(p("nul\0tail"));
    c.check("create: a path with NUL is EINVAL", e.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::InvalidInput) && !p("nul").exists(), e.map(|_| ()));
    // --- bad input: past the largest file, and the mount keeps working
    let big = fs::OpenOptions::new().write(true).open(p("trunc")).unwrap();
    c.errno("write: EFBIG past 16 TiB", errno_of(big.write_all_at(b"x", 1 << 44)), libc::EFBIG);
    c.errno("truncate: EFBIG past 16 TiB", errno_of(big.set_len((1 << 44) + 1)), libc::EFBIG);
    drop(big);
    c.check("mount still works after bad input", fs::read(p("r2")).map(|d| d == b"one").unwrap_or(false), ());
    // --- mknod fifo
    let r = unsafe { libc::mkfifo(cstr(&p("fifo")).as_ptr(), 0o640) };
    use std::os::unix::fs::FileTypeExt;
    c.check("mknod: fifo", r == 0 && fs::symlink_metadata(p("fifo")).unwrap().file_type().is_fifo(), ());
}

