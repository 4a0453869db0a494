//! Block volumes end to end: a real cluster, `strata block nbd` as its own process, and the
//! standard NBD clients (nbdinfo, qemu-img, fio's nbd engine, nbdfuse + mkfs/fsck/loop mount),
//! plus a raw NBD client for what the tools cannot provoke. Under CI=true a missing tool fails.

mod common;

use common::{poll, Cluster, BIN};
use std::io::{BufRead, BufReader, Read};
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
