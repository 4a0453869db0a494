//! Block volumes end to end: a real cluster, `strata block nbd` as its own process, and the
//! standard NBD clients (nbdinfo, qemu-img, fio's nbd engine, nbdfuse + mkfs/fsck/loop mount),
//! plus a raw NBD client for what the tools cannot provoke. Under CI=true a missing tool fails.

mod common;

use common::{poll, Cluster, BIN};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Whether `tool` is installed; under CI=true a missing tool fails the test.
fn have(tool: &str) -> bool {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{tool} is not installed (scripts/test installs it)");
        eprintln!("SKIPPED: {tool} is not installed (run scripts/test)");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `strata block nbd` process; killed on drop.
struct NbdServer {
    child: Child,
    addr: String,
    /// Held open so the server can keep printing.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl NbdServer {
    fn start(c: &Cluster, args: &[&str]) -> NbdServer {
        let mut child = Command::new(BIN)
            .args(["block", "nbd"])
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("STRATA_CLUSTER", c.cluster_file())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("serving nbd://").and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("nbd server printed '{line}'")).to_owned();
        NbdServer { child, addr, _stdout: out }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    #[allow(dead_code)]
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(p: &Path) -> String {
    run(Command::new("sha256sum").arg(p)).split_whitespace().next().unwrap().to_owned()
}

fn block_cluster(extra: &[&str]) -> Cluster {
    let mut args = vec!["--ranks", "3"];
    args.extend_from_slice(extra);
    let c = Cluster::start(&args);
    c.json(&["cont", "create", "tank", "blk", "--type", "block", "--oclass", "RP_3GX"]);
    c
}

#[test]
fn standard_nbd_clients_work_against_volumes() {
    let tools = ["nbdinfo", "qemu-img", "fio", "nbdfuse", "mkfs.ext4", "fsck.ext4", "fusermount3"];
    if !tools.iter().all(|t| have(t)) {
        return;
    }
    let c = block_cluster(&[]);
    let v = c.json(&["block", "create", "tank/blk", "vol", "256M"]);
    assert_eq!(v["size_bytes"], 256 << 20);
    assert_eq!(v["block_bytes"], 512 << 10);
    assert_eq!(v["oclass"], "RP_3GX");
    c.json(&["block", "create", "tank/blk", "small", "64M", "--oclass", "S1", "--block-size", "64K"]);
    let list = c.json(&["block", "list", "tank/blk"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let srv = NbdServer::start(&c, &["tank/blk", "vol", "small"]);

    // nbdinfo: size and flags, and the list of exports.
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo").arg("--json").arg(srv.uri("vol")))).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 256 << 20);
    for (flag, want) in [("is_read_only", false), ("can_flush", true), ("can_fua", true), ("can_trim", true), ("can_zero", true), ("can_multi_conn", true)] {
        assert_eq!(e[flag], want, "{flag}");
    }
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let list: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo").args(["--list", "--json"]).arg(format!("nbd://{}", srv.addr)))).unwrap();
    let names: Vec<&str> = list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["vol", "small"]);

    // qemu-img: a 256 MiB random image in and out, identical.
    let dir = c.path().join("img");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.raw");
    run(Command::new("sh").arg("-c").arg(format!("head -c 256M /dev/urandom > {}", input.display())));
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&input).arg(srv.uri("vol")));
    let output = dir.join("out.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(srv.uri("vol")).arg(&output));
    assert_eq!(sha256(&input), sha256(&output), "image read back differs");
    std::fs::remove_file(&output).unwrap();

    // fio's nbd engine: random writes, then verify every block's crc32c.
    let fio_out = dir.join("fio.json");
    run(Command::new("fio")
        .args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=64m", "--verify=crc32c", "--do_verify=1", "--output-format=json"])
        .arg(format!("--uri={}", srv.uri("small")))
        .arg(format!("--output={}", fio_out.display())));
    let text = std::fs::read_to_string(&fio_out).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error");
    assert_eq!(job["read"]["io_bytes"], 64 << 20, "fio verified every block it wrote");

    // nbdfuse: the volume as a file; mkfs.ext4, fsck -n clean; then a loop mount round trip.
    let fmnt = dir.join("fuse");
    std::fs::create_dir_all(&fmnt).unwrap();
    let mut fuse = Command::new("nbdfuse").arg(fmnt.join("disk")).arg(srv.uri("vol")).spawn().unwrap();
    let disk = fmnt.join("disk");
    poll("nbdfuse to expose the volume", Duration::from_secs(20), || std::fs::metadata(&disk).ok().filter(|m| m.len() == 256 << 20));
    run(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&disk));
    run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&disk));
    if Path::new("/dev/loop-control").exists() {
        let lmnt = dir.join("loop");
        std::fs::create_dir_all(&lmnt).unwrap();
        run(Command::new("mount").args(["-o", "loop"]).arg(&disk).arg(&lmnt));
        run(Command::new("sh").arg("-c").arg(format!("head -c 20M {} > {}/data && echo hello > {}/note && sync", input.display(), lmnt.display(), lmnt.display())));
        run(Command::new("umount").arg(&lmnt));
        run(Command::new("mount").args(["-o", "loop"]).arg(&disk).arg(&lmnt));
        assert_eq!(std::fs::read_to_string(lmnt.join("note")).unwrap(), "hello\n");
        let back = std::fs::read(lmnt.join("data")).unwrap();
        let mut want = vec![0u8; 20 << 20];
        std::fs::File::open(&input).unwrap().read_exact(&mut want).unwrap();
        assert!(back == want, "file read back through the loop mount differs");
        run(Command::new("umount").arg(&lmnt));
        run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&disk));
    }
    run(Command::new("fusermount3").arg("-u").arg(&fmnt));
    let _ = fuse.wait();
    drop(srv);
}

/// A minimal NBD client for what the standard tools cannot provoke: fixed newstyle, `OPT_GO`
/// asking for block sizes, simple replies.
struct RawNbd {
    s: std::net::TcpStream,
}

const NBD_READ: u16 = 0;
const NBD_WRITE: u16 = 1;
const NBD_DISC: u16 = 2;
const NBD_FLUSH: u16 = 3;
const NBD_FUA: u16 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const EPERM: u32 = 1;

impl RawNbd {
    /// Negotiate `export`; an error reply comes back as its message.
    fn connect(addr: &str, export: &str) -> Result<RawNbd, String> {
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2 + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&1u16.to_be_bytes());
        opt.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&opt).unwrap();
        for _ in 0..10 {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(|e| e.to_string())?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut data).unwrap();
            match kind {
                1 => return Ok(RawNbd { s }),
                3 => continue,
                _ => return Err(String::from_utf8_lossy(&data).into_owned()),
            }
        }
        panic!("no ACK to OPT_GO");
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut b = 0x25609513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// One simple reply: (error, cookie, data of `data_len` bytes if no error).
    fn reply(&mut self, data_len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x67446698, "reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d)?;
        Ok((err, u64::from_be_bytes(h[8..16].try_into().unwrap()), d))
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> std::io::Result<u32> {
        self.send(NBD_WRITE, flags, 1, offset, data.len() as u32, data)?;
        Ok(self.reply(0)?.0)
    }

    fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
        self.send(NBD_READ, 0, 2, offset, len, &[])?;
        let (e, _, d) = self.reply(len as usize)?;
        Ok(if e == 0 { Ok(d) } else { Err(e) })
    }

    fn disconnect(mut self) {
        let _ = self.send(NBD_DISC, 0, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.s.read_to_end(&mut rest);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 / 7) % 251) as u8).collect()
}

#[test]
fn one_writer_per_volume_and_bad_requests_are_refused() {
    if !have("nbdinfo") {
        return;
    }
    let c = block_cluster(&[]);
    c.json(&["block", "create", "tank/blk", "vol", "64M"]);
    let a = NbdServer::start(&c, &["tank/blk", "vol", "--lease-ttl-ms", "3000"]);
    let mut b = NbdServer::start(&c, &["tank/blk", "vol", "--lease-ttl-ms", "3000"]);
    let ro = NbdServer::start(&c, &["tank/blk", "vol", "--read-only"]);

    let mut w1 = RawNbd::connect(&a.addr, "vol").expect("first writer");
    let data = pattern(1, 1 << 20);
    assert_eq!(w1.write(4 << 20, &data, NBD_FUA).unwrap(), 0);
    // A second connection to the same server shares its lease (multi-conn).
    let mut w2 = RawNbd::connect(&a.addr, "vol").expect("second connection to the writer's server");
    assert_eq!(w2.read(4 << 20, 1 << 20).unwrap().unwrap(), data);

    // Another server is refused, with a clear message, by nbdinfo and by a raw client.
    let err = RawNbd::connect(&b.addr, "vol").err().expect("second writer refused");
    assert!(err.contains("already has a writer") && err.contains("--read-only"), "{err}");
    // libnbd shows the server's message in its debug log only.
    let out = Command::new("nbdinfo").arg(b.uri("vol")).env("LIBNBD_DEBUG", "1").output().unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("already has a writer"), "nbdinfo said: {msg}");
    // Read-only exports are many, see the data, refuse writes.
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo").arg("--json").arg(ro.uri("vol")))).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    let mut r = RawNbd::connect(&ro.addr, "vol").unwrap();
    assert_eq!(r.read(4 << 20, 1 << 20).unwrap().unwrap(), data);
    assert_eq!(r.write(0, &[1; 512], 0).unwrap(), EPERM);
    // Changes that must not race a writer are refused too.
    let e = c.fails(&["block", "resize", "tank/blk", "vol", "128M"]);
    assert!(e.contains("exported for writing"), "{e}");

    // Bad requests to the real server: errors, and the connection keeps serving.
    let end = 64u64 << 20;
    assert_eq!(w1.read(end - 512, 1024).unwrap(), Err(EINVAL), "read past the end");
    assert_eq!(w1.write(end, &[1; 512], 0).unwrap(), ENOSPC, "write past the end");
    assert_eq!(w1.read(0, (32 << 20) + 512).unwrap(), Err(EOVERFLOW), "oversized read");
    assert_eq!(w1.write(0, &vec![9u8; (32 << 20) + 512], 0).unwrap(), EOVERFLOW, "oversized write");
    assert_eq!(w1.read(100, 512).unwrap(), Err(EINVAL), "misaligned read");
    w1.send(77, 0, 3, 0, 512, &[]).unwrap();
    assert_eq!(w1.reply(0).unwrap().0, EINVAL, "unknown command");
    w1.send(NBD_FLUSH, 0, 4, 0, 0, &[]).unwrap();
    assert_eq!(w1.reply(0).unwrap().0, 0);
    assert_eq!(w1.read(4 << 20, 1 << 20).unwrap().unwrap(), data, "nothing refused was written");
    // Unknown export; a bad magic; a client gone mid-write: each ends alone.
    assert!(RawNbd::connect(&a.addr, "nope").err().unwrap().contains("no export 'nope'"));
    let mut bad = RawNbd::connect(&a.addr, "vol").unwrap();
    bad.s.write_all(&[0u8; 28]).unwrap();
    assert!(bad.reply(0).is_err(), "a bad magic closes that connection");
    let mut gone = RawNbd::connect(&a.addr, "vol").unwrap();
    let mut h = 0x25609513u32.to_be_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 0, 1]);
    h.extend_from_slice(&5u64.to_be_bytes());
    h.extend_from_slice(&(8u64 << 20).to_be_bytes());
    h.extend_from_slice(&(1u32 << 20).to_be_bytes());
    gone.s.write_all(&h).unwrap();
    gone.s.write_all(&[7; 1000]).unwrap();
    drop(gone);
    assert_eq!(w2.read(8 << 20, 4096).unwrap().unwrap(), vec![0; 4096], "a half-sent write wrote nothing");

    // After the writer's clients leave, the other server is accepted.
    w1.disconnect();
    w2.disconnect();
    let mut wb = poll("server b to get the writer lease", Duration::from_secs(20), || RawNbd::connect(&b.addr, "vol").ok());
    assert_eq!(wb.read(4 << 20, 1 << 20).unwrap().unwrap(), data);
    assert_eq!(wb.write(0, &[3; 4096], NBD_FUA).unwrap(), 0);
    // A writer that dies keeps the lease only until it expires.
    b.kill9();
    let mut wa = poll("server a to get the lease after b died", Duration::from_secs(30), || RawNbd::connect(&a.addr, "vol").ok());
    assert_eq!(wa.read(0, 4096).unwrap().unwrap(), vec![3; 4096]);
    wa.disconnect();
}
