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
    block_cluster_rf(extra, None)
}

/// `block_cluster` whose container has redundancy factor `rf` (default: RP_3GX's, 2, which
/// refuses volumes of weaker classes).
fn block_cluster_rf(extra: &[&str], rf: Option<&str>) -> Cluster {
    let mut args = vec!["--ranks", "3"];
    args.extend_from_slice(extra);
    let c = Cluster::start(&args);
    let mut create = vec!["cont", "create", "tank", "blk", "--type", "block", "--oclass", "RP_3GX"];
    if let Some(rf) = rf {
        create.extend(["--rf", rf]);
    }
    c.json(&create);
    c
}

#[test]
fn standard_nbd_clients_work_against_volumes() {
    let tools = ["nbdinfo", "qemu-img", "fio", "nbdfuse", "mkfs.ext4", "fsck.ext4", "fusermount3"];
    if !tools.iter().all(|t| have(t)) {
        return;
    }
    // S1 and EC_2P1GX volumes too: a container that survives no failure.
    let c = block_cluster_rf(&[], Some("0"));
    let v = c.json(&["block", "create", "tank/blk", "vol", "256M"]);
    assert_eq!(v["size_bytes"], 256 << 20);
    assert_eq!(v["block_bytes"], 512 << 10);
    assert_eq!(v["oclass"], "RP_3GX");
    c.json(&["block", "create", "tank/blk", "small", "64M", "--oclass", "S1", "--block-size", "64K"]);
    c.json(&["block", "create", "tank/blk", "ec", "32M", "--oclass", "EC_2P1GX"]);
    let list = c.json(&["block", "list", "tank/blk"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    let srv = NbdServer::start(&c, &["tank/blk", "vol", "small", "ec"]);

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
    assert_eq!(names, ["vol", "small", "ec"]);

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

    // fio's nbd engine: random writes, then verify every block's crc32c; on the erasure-coded
    // volume 16 writes in flight share stripes (per-block locks keep them in epoch order).
    for (export, size) in [("small", 64u64 << 20), ("ec", 32 << 20)] {
        let fio_out = dir.join(format!("fio-{export}.json"));
        run(Command::new("fio")
            .args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--output-format=json"])
            .arg(format!("--size={size}"))
            .arg(format!("--uri={}", srv.uri(export)))
            .arg(format!("--output={}", fio_out.display()))
            // fio leaves its verify state file in the working directory.
            .current_dir(&dir));
        let text = std::fs::read_to_string(&fio_out).unwrap();
        let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
        let job = &report["jobs"][0];
        assert_eq!(job["error"], 0, "fio reported an error on {export}");
        assert_eq!(job["read"]["io_bytes"], size, "fio verified every block it wrote on {export}");
    }

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
    // Capacity is checked against the pool, at create and at resize, with the numbers.
    let e = c.fails(&["block", "create", "tank/blk", "huge", "64T"]);
    assert!(e.contains("needs") && e.contains("of raw space") && e.contains("pool 'tank'"), "{e}");
    let e = c.fails(&["block", "resize", "tank/blk", "vol", "64T"]);
    assert!(e.contains("of raw space"), "{e}");
    assert_eq!(c.json(&["block", "info", "tank/blk", "vol"])["size_bytes"], 64 << 20, "a refused resize leaves the size alone");
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

mod lib_side {
    //! Helpers that use the block library directly (real client, real cluster).
    use std::sync::Arc;
    use strata_block::writer_lease::Lease;
    use strata_block::{BlockContainer, VolumeIo};

    pub async fn open(cf: &std::path::Path) -> BlockContainer {
        let client = strata_client::Client::connect(&strata_client::ClusterFile::load(cf).unwrap()).await.unwrap();
        BlockContainer::open(&client, "tank", "blk").await.unwrap()
    }

    pub async fn writer(bc: &BlockContainer, name: &str) -> Arc<VolumeIo> {
        let lease = Lease::acquire(&bc.client, &bc.writer_lease_key(name), "test-writer", 30_000).await.unwrap();
        Arc::new(VolumeIo::open(&bc.cont, &bc.get(name).await.unwrap(), None, Some(lease)).await.unwrap())
    }

    pub async fn reader(bc: &BlockContainer, name: &str, snap: Option<&str>) -> VolumeIo {
        VolumeIo::open(&bc.cont, &bc.get(name).await.unwrap(), snap, None).await.unwrap()
    }

    pub async fn read_all(v: &VolumeIo) -> Vec<u8> {
        use strata_block::BlockDevice;
        v.read_at(0, v.size_bytes()).await.unwrap()
    }
}

#[test]
fn snapshots_clones_rollback_and_resize() {
    let c = block_cluster(&[]);
    // Default 512 KiB blocks of 64 KiB chunks: the edits below cut through both.
    c.json(&["block", "create", "tank/blk", "base", "8M"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cf = c.cluster_file();
    rt.block_on(async {
        let bc = lib_side::open(&cf).await;
        let m = 1usize << 20;
        let w = lib_side::writer(&bc, "base").await;
        let a = pattern(1, 8 * m);
        w.write_at(0, a.clone().into()).await.unwrap();
        let s1 = c.json(&["block", "snapshot", "tank/blk", "base@s1"]);
        assert!(s1["epoch"].as_u64().unwrap() > 0);

        // After the snapshot: an unaligned write across blocks, a trimmed block, written zeros.
        let mut head = a.clone();
        let b = pattern(2, 100_000);
        w.write_at(m as u64 + 333, b.clone().into()).await.unwrap();
        head[m + 333..m + 333 + b.len()].copy_from_slice(&b);
        w.zero_at(3 * m as u64, 64 << 10, false).await.unwrap();
        head[3 * m..3 * m + (64 << 10)].fill(0);
        w.zero_at(5 * m as u64 + 1000, 5000, true).await.unwrap();
        head[5 * m + 1000..5 * m + 6000].fill(0);
        assert!(lib_side::read_all(&*w).await == head, "the volume reads what was written");
        assert!(lib_side::read_all(&lib_side::reader(&bc, "base", Some("s1")).await).await == a, "the snapshot is unchanged");
        c.json(&["block", "snapshot", "tank/blk", "base@s2"]);

        // A clone reads its parent's snapshot and differs from it only where written.
        c.json(&["block", "clone", "tank/blk", "base@s1", "c1"]);
        let cw = lib_side::writer(&bc, "c1").await;
        assert!(lib_side::read_all(&*cw).await == a, "a fresh clone reads as its snapshot");
        let mut clone = a.clone();
        let cdata = pattern(3, 4096);
        cw.write_at(2 * m as u64, cdata.clone().into()).await.unwrap();
        clone[2 * m..2 * m + 4096].copy_from_slice(&cdata);
        cw.zero_at(6 * m as u64, 64 << 10, false).await.unwrap();
        clone[6 * m..6 * m + (64 << 10)].fill(0);
        cw.zero_at(7 * m as u64 + 512, 512, false).await.unwrap();
        clone[7 * m + 512..7 * m + 1024].fill(0);
        assert!(lib_side::read_all(&*cw).await == clone, "a trim in a clone reads zeros, not the parent");
        assert!(lib_side::read_all(&*w).await == head, "the parent is untouched by its clone");

        // Dependents protect their parents.
        assert!(c.fails(&["block", "delete", "tank/blk", "base"]).contains("has clones: c1"));
        assert!(c.fails(&["block", "snapshot", "tank/blk", "base@s1", "--delete"]).contains("has clones (c1)"));
        c.json(&["block", "snapshot", "tank/blk", "base@s2", "--delete"]);
        c.json(&["block", "snapshot", "tank/blk", "base@s2"]);

        // Rollback needs the writer gone; afterwards the volume reads as s1 and s2 survives.
        let e = c.fails(&["block", "rollback", "tank/blk", "base@s1"]);
        assert!(e.contains("exported for writing"), "{e}");
        drop(w);
        poll("rollback once the writer lease is released", Duration::from_secs(20), || c.cmd(&["block", "rollback", "tank/blk", "base@s1"]).status.success().then_some(()));
        let w = lib_side::writer(&bc, "base").await;
        assert!(lib_side::read_all(&*w).await == a, "rolled back to s1");
        assert!(lib_side::read_all(&lib_side::reader(&bc, "base", Some("s2")).await).await == head, "a newer snapshot survives rollback");
        w.write_at(0, vec![9u8; 4096].into()).await.unwrap();
        assert!(lib_side::read_all(&lib_side::reader(&bc, "base", Some("s1")).await).await == a);
        drop(w);

        // Resize: grow reads zeros; shrink needs --force; shrink-then-grow reads zeros too
        // (neither the old bytes nor the layers below show through).
        let resize = |size: &str, force: bool| {
            let mut args = vec!["block", "resize", "tank/blk", "base", size];
            if force {
                args.push("--force");
            }
            poll("resize once the writer lease is released", Duration::from_secs(20), || {
                let out = c.cmd(&args);
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                (out.status.success() || !err.contains("exported for writing")).then_some((out.status.success(), err))
            })
        };
        assert!(resize("4M", false).1.contains("--force"));
        assert!(resize("16M", false).0);
        let r = lib_side::reader(&bc, "base", None).await;
        let all = lib_side::read_all(&r).await;
        assert_eq!(all.len(), 16 * m);
        assert!(all[..4096].iter().all(|x| *x == 9) && all[4096..8 * m] == a[4096..] && all[8 * m..].iter().all(|x| *x == 0));
        // 4100 KiB: inside a block and inside a chunk.
        assert!(resize("4100K", true).0);
        assert!(resize("8M", false).0);
        let cut = 4100 << 10;
        let all = lib_side::read_all(&lib_side::reader(&bc, "base", None).await).await;
        assert!(all[4096..cut] == a[4096..cut] && all[cut..].iter().all(|x| *x == 0), "shrink then grow reads zeros past the shrink point");
        assert!(lib_side::read_all(&*cw).await == clone, "the clone is untouched by its parent's rollback and resize");
        drop(cw);

        // Capacity is checked against the pool; names are checked.
        let e = c.fails(&["block", "create", "tank/blk", "huge", "1P"]);
        assert!(e.contains("needs") && e.contains("pool 'tank'"), "{e}");
        assert!(c.fails(&["block", "create", "tank/blk", "bad.name", "1M"]).contains("letters, digits"));
        let names: Vec<String> = c.json(&["block", "list", "tank/blk"]).as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_owned()).collect();
        assert_eq!(names, ["base", "c1"]);
        poll("delete of the clone", Duration::from_secs(20), || c.cmd(&["block", "delete", "tank/blk", "c1"]).status.success().then_some(()));
        c.json(&["block", "delete", "tank/blk", "base"]);
        assert!(c.json(&["block", "list", "tank/blk"]).as_array().unwrap().is_empty());
        let snaps = c.json(&["cont", "query", "tank", "blk"]);
        assert!(snaps["snapshots"].as_object().unwrap().is_empty(), "pinned epochs are released with the volume");
    });
}

#[test]
fn a_snapshot_is_one_instant_of_a_volume_under_writes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    // Writers on their own NBD connections to one server (multi-conn), each writing
    // sequence-numbered blocks round-robin over its own slots, while fio writes the other half
    // of the volume through its nbd engine and another process snapshots.
    const WRITERS: u64 = 4;
    const SLOTS: u64 = 64;
    const SLOT_BYTES: u64 = 16 << 10;
    const FIO_AT: u64 = WRITERS * SLOTS * SLOT_BYTES;
    if !have("fio") {
        return;
    }
    let c = block_cluster(&[]);
    const _: () = assert!(2 * FIO_AT == 8 << 20);
    c.json(&["block", "create", "tank/blk", "seq", "8M"]);
    let srv = NbdServer::start(&c, &["tank/blk", "seq"]);
    let fio_dir = c.dir.path().join("fio-load");
    std::fs::create_dir_all(&fio_dir).unwrap();
    let mut fio = Command::new("fio")
        .args(["--name=load", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=8", "--time_based", "--runtime=300"])
        .arg(format!("--offset={FIO_AT}"))
        .arg(format!("--size={FIO_AT}"))
        .arg(format!("--uri={}", srv.uri("seq")))
        .current_dir(&fio_dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting fio");
    // fio's writes are landing (its half of the volume is no longer all zeros).
    let mut probe = RawNbd::connect(&srv.addr, "seq").unwrap();
    poll("fio's writes to land", Duration::from_secs(60), || probe.read(FIO_AT, FIO_AT as u32).ok()?.ok()?.iter().any(|b| *b != 0).then_some(()));
    probe.disconnect();
    let slot_off = |t: u64, k: u64| (t * SLOTS + k) * SLOT_BYTES;
    let content = |t: u64, i: u64| -> Vec<u8> { (0..256).flat_map(|_| t.to_be_bytes().into_iter().chain(i.to_be_bytes())).collect() };
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (addr, stop, total) = (srv.addr.clone(), stop.clone(), total.clone());
            std::thread::spawn(move || {
                let mut w = RawNbd::connect(&addr, "seq").unwrap();
                // (seq, started, acknowledged) of every write, in order.
                let mut log: Vec<(u64, Instant, Instant)> = Vec::new();
                for i in 1..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    assert_eq!(w.write(slot_off(t, i % SLOTS), &content(t, i), 0).unwrap(), 0);
                    log.push((i, started, Instant::now()));
                    total.fetch_add(1, Ordering::Relaxed);
                }
                w.disconnect();
                log
            })
        })
        .collect();
    poll("writes to start", Duration::from_secs(60), || (total.load(Ordering::Relaxed) >= 200).then_some(()));
    let snap_start = Instant::now();
    c.json(&["block", "snapshot", "tank/blk", "seq@mid"]);
    let snap_end = Instant::now();
    assert!(fio.try_wait().unwrap().is_none(), "fio stopped before the snapshot was taken");
    let after = total.load(Ordering::Relaxed);
    poll("writes after the snapshot", Duration::from_secs(60), || (total.load(Ordering::Relaxed) >= after + 200).then_some(()));
    stop.store(true, Ordering::Relaxed);
    let _ = fio.kill();
    let _ = fio.wait();
    let logs: Vec<Vec<(u64, Instant, Instant)>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // Read the snapshot back through the same server (VOLUME@SNAPSHOT is exported read-only).
    let mut r = RawNbd::connect(&srv.addr, "seq@mid").unwrap();
    let snap = r.read(0, (WRITERS * SLOTS * SLOT_BYTES) as u32).unwrap().unwrap();
    r.disconnect();
    let mut cuts = Vec::new();
    for t in 0..WRITERS {
        let seen: Vec<u64> = (0..SLOTS)
            .map(|k| {
                let o = slot_off(t, k) as usize;
                let b = &snap[o..o + 4096];
                if b.iter().all(|x| *x == 0) {
                    return 0;
                }
                let i = u64::from_be_bytes(b[8..16].try_into().unwrap());
                assert!(b == content(t, i), "slot {k} of writer {t} holds a torn or foreign block");
                i
            })
            .collect();
        let cut = *seen.iter().max().unwrap();
        // Within a writer: exactly the writes up to the cut, none after.
        for (k, &i) in seen.iter().enumerate() {
            let want = (1..=cut).rev().find(|j| j % SLOTS == k as u64).unwrap_or(0);
            assert_eq!(i, want, "writer {t} slot {k}: the snapshot holds write {i} but its cut is {cut}");
        }
        for &(i, started, acked) in &logs[t as usize] {
            assert!(!(acked < snap_start && i > cut), "write {i} of writer {t} was acknowledged before the snapshot began but is missing");
            assert!(!(started > snap_end && i <= cut), "write {i} of writer {t} began after the snapshot ended but is in it");
        }
        cuts.push(cut);
    }
    // Across writers: a write in the snapshot implies every write acknowledged before it began.
    for b in 0..WRITERS as usize {
        let Some(&(_, began, _)) = logs[b].iter().find(|(i, _, _)| *i == cuts[b]) else { continue };
        for a in 0..WRITERS as usize {
            for &(i, _, acked) in &logs[a] {
                assert!(!(acked < began && i > cuts[a]), "writer {a}'s write {i} was acknowledged before writer {b}'s write {} began, which is in the snapshot, but it is not", cuts[b]);
            }
        }
    }
    assert!(cuts.iter().all(|c| *c > 0), "every writer had writes in the snapshot: {cuts:?}");
}

#[test]
fn acknowledged_writes_survive_a_killed_server_and_rank() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let c = block_cluster(&["--heartbeat-timeout-ms", "2000"]);
    c.json(&["block", "create", "tank/blk", "vol", "32M"]);
    let mut srv = NbdServer::start(&c, &["tank/blk", "vol", "--lease-ttl-ms", "2000"]);
    let progress = Arc::new(AtomicU64::new(0));
    // Writes known durable: acknowledged with FUA, or acknowledged before an acknowledged FLUSH.
    let durable: Arc<Mutex<Vec<u64>>> = Default::default();
    let writer = {
        let (addr, progress, durable) = (srv.addr.clone(), progress.clone(), durable.clone());
        std::thread::spawn(move || {
            let mut w = RawNbd::connect(&addr, "vol").unwrap();
            let mut unflushed = Vec::new();
            for i in 0..8192u64 {
                let fua = i % 2 == 0;
                match w.write(i * 4096, &pattern(i, 4096), if fua { NBD_FUA } else { 0 }) {
                    Ok(0) if fua => durable.lock().unwrap().push(i),
                    Ok(0) => unflushed.push(i),
                    Ok(e) => panic!("write {i} failed with errno {e}"),
                    Err(_) => return,
                }
                if i % 8 == 7 {
                    if w.send(NBD_FLUSH, 0, 9, 0, 0, &[]).is_err() {
                        return;
                    }
                    match w.reply(0) {
                        Ok((0, _, _)) => durable.lock().unwrap().append(&mut unflushed),
                        _ => return,
                    }
                }
                progress.store(i + 1, Ordering::Relaxed);
            }
        })
    };
    let wait_for = |n: u64| poll("writes to progress", Duration::from_secs(90), || (progress.load(Ordering::Relaxed) >= n).then_some(()));
    wait_for(200);
    c.kill9_rank_dir(1);
    let at_kill = progress.load(Ordering::Relaxed);
    wait_for(at_kill + 200);
    srv.kill9();
    writer.join().unwrap();
    let durable = durable.lock().unwrap().clone();
    assert!(durable.len() >= 400, "only {} writes were durable", durable.len());

    let srv2 = NbdServer::start(&c, &["tank/blk", "vol"]);
    let mut r = poll("a new server to take the writer lease", Duration::from_secs(30), || RawNbd::connect(&srv2.addr, "vol").ok());
    for i in durable {
        assert_eq!(r.read(i * 4096, 4096).unwrap().unwrap(), pattern(i, 4096), "durable write {i} lost");
    }
    r.disconnect();
}

#[test]
fn cached_writes_are_read_at_once_and_written_back_on_flush_and_shutdown() {
    let c = block_cluster(&[]);
    c.json(&["block", "create", "tank/blk", "vol", "16M"]);
    let srv = NbdServer::start(&c, &["tank/blk", "vol"]);
    let ro = NbdServer::start(&c, &["tank/blk", "vol", "--read-only"]);
    let flush = |w: &mut RawNbd| {
        w.send(NBD_FLUSH, 0, 77, 0, 0, &[]).unwrap();
        assert_eq!(w.reply(0).unwrap().0, 0, "FLUSH");
    };
    let mut w = RawNbd::connect(&srv.addr, "vol").unwrap();
    let a = pattern(1, 64 << 10);
    assert_eq!(w.write(0, &a, 0).unwrap(), 0);
    // Another connection to the same server shares its cache (multi-conn).
    let mut w2 = RawNbd::connect(&srv.addr, "vol").unwrap();
    assert_eq!(w2.read(0, 64 << 10).unwrap().unwrap(), a, "an acknowledged write is read at once");
    flush(&mut w2);
    let mut r = RawNbd::connect(&ro.addr, "vol").unwrap();
    assert_eq!(r.read(0, 64 << 10).unwrap().unwrap(), a, "after a FLUSH on any connection another server reads the write");
    // A write and a trim over part of it, no FLUSH, then the server is stopped (SIGTERM): it
    // writes its cache back before it lets go of the volume.
    let b = pattern(2, 10_240);
    assert_eq!(w.write(4096 + 512, &b, 0).unwrap(), 0);
    w2.send(4, 0, 78, 8192, 4096, &[]).unwrap();
    assert_eq!(w2.reply(0).unwrap().0, 0, "TRIM");
    let mut want = a.clone();
    want[4608..4608 + 10_240].copy_from_slice(&b);
    want[8192..12_288].fill(0);
    assert_eq!(w.read(0, 64 << 10).unwrap().unwrap(), want);
    drop(srv);
    assert_eq!(r.read(0, 64 << 10).unwrap().unwrap(), want, "a stopped server wrote back what it acknowledged");
    r.disconnect();
}

#[test]
fn reads_from_the_clean_cache_follow_writes_trims_and_snapshots() {
    const TRIM: u16 = 4;
    const WRITE_ZEROES: u16 = 6;
    let c = block_cluster(&[]);
    c.json(&["block", "create", "tank/blk", "wb", "16M"]);
    c.json(&["block", "create", "tank/blk", "wt", "16M"]);
    // Both caches in front of the volume, and the clean cache alone (writes go through).
    let cached = NbdServer::start(&c, &["tank/blk", "wb"]);
    let through = NbdServer::start(&c, &["tank/blk", "wt", "--cache-dirty-max", "0"]);
    for (srv, vol) in [(&cached, "wb"), (&through, "wt")] {
        let mut w = RawNbd::connect(&srv.addr, vol).unwrap();
        let cmd = |w: &mut RawNbd, kind: u16, offset: u64, len: u32, what: &str| {
            w.send(kind, 0, 9, offset, len, &[]).unwrap();
            assert_eq!(w.reply(0).unwrap().0, 0, "{what} on {vol}");
        };
        let len = 256 << 10;
        let mut want = pattern(10, len);
        assert_eq!(w.write(0, &want, 0).unwrap(), 0);
        cmd(&mut w, NBD_FLUSH, 0, 0, "FLUSH");
        // Small reads load whole chunks into the cache; every later read must see each change.
        for off in [0u64, 4096, 70_000 & !511, 200 << 10] {
            assert_eq!(w.read(off, 4096).unwrap().unwrap(), want[off as usize..off as usize + 4096], "{vol} at {off}");
        }
        let b = pattern(11, 10_240);
        assert_eq!(w.write(4096 + 512, &b, 0).unwrap(), 0);
        want[4608..4608 + 10_240].copy_from_slice(&b);
        assert_eq!(w.read(0, len as u32).unwrap().unwrap(), want, "{vol}: a write over cached chunks");
        cmd(&mut w, NBD_FLUSH, 0, 0, "FLUSH");
        assert_eq!(w.read(0, len as u32).unwrap().unwrap(), want, "{vol}: the same once written back");
        cmd(&mut w, TRIM, 8192, 4096, "TRIM");
        want[8192..12_288].fill(0);
        cmd(&mut w, WRITE_ZEROES, 65_536, 4096, "WRITE_ZEROES");
        want[65_536..69_632].fill(0);
        assert_eq!(w.read(0, len as u32).unwrap().unwrap(), want, "{vol}: trims and zeroes over cached chunks");
        // A snapshot export keeps reading its instant while the head changes under it.
        c.json(&["block", "snapshot", "tank/blk", &format!("{vol}@s")]);
        let mut s = RawNbd::connect(&srv.addr, &format!("{vol}@s")).unwrap();
        assert_eq!(s.read(0, len as u32).unwrap().unwrap(), want, "{vol}@s");
        let at_snapshot = want.clone();
        let d = pattern(12, 4096);
        assert_eq!(w.write(0, &d, NBD_FUA).unwrap(), 0);
        want[..4096].copy_from_slice(&d);
        assert_eq!(w.read(0, len as u32).unwrap().unwrap(), want, "{vol}: the head after the snapshot");
        assert_eq!(s.read(0, len as u32).unwrap().unwrap(), at_snapshot, "{vol}@s again (from its cache)");
        // Taken again under the same name while a connection still holds the old one: a new
        // connection reads the new snapshot, not the old one's cached chunks.
        c.json(&["block", "snapshot", "tank/blk", &format!("{vol}@s"), "--delete"]);
        c.json(&["block", "snapshot", "tank/blk", &format!("{vol}@s")]);
        let mut s2 = RawNbd::connect(&srv.addr, &format!("{vol}@s")).unwrap();
        assert_eq!(s2.read(0, len as u32).unwrap().unwrap(), want, "{vol}@s taken again");
        s2.disconnect();
        s.disconnect();
        w.disconnect();
    }
}

#[test]
fn bench_block_reports_ratios_against_nbdkit() {
    if !["fio", "nbdkit"].iter().all(|t| have(t)) {
        return;
    }
    let c = block_cluster(&["--aggregate-margin-ms", "2000"]);
    let v = c.json(&["bench", "block", "--size", "64M", "--duration", "1", "--rounds", "1", "--cache-clean-max", "64M", "--cache-dirty-max", "32M"]);
    assert_eq!(v["cache_dirty_bytes_max"], 32 << 20);
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["pattern"].as_str().unwrap()).collect();
    assert_eq!(names, ["4k-randread-qd16", "4k-randwrite-qd16", "1m-seqread-qd16", "1m-seqwrite-qd16"]);
    for r in rows {
        let kit = r["nbdkit"]["value"].as_f64().unwrap();
        assert!(kit > 0.0, "nbdkit measured: {r}");
        let classes: Vec<&str> = r["strata"].as_array().unwrap().iter().map(|s| s["oclass"].as_str().unwrap()).collect();
        assert_eq!(classes, ["S1", "RP_3GX"]);
        for s in r["strata"].as_array().unwrap() {
            let ours = s["figure"]["value"].as_f64().unwrap();
            assert!(ours > 0.0, "{r}");
            // One round: the ratio is the round's own.
            assert!((s["ratio_median"].as_f64().unwrap() - ours / kit).abs() < 1e-6 * (ours / kit).max(1.0), "{r}");
            assert!(s["target"].as_str().unwrap().contains("of nbdkit file"), "{r}");
        }
    }
}
