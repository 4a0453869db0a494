//! Protocol tests of the NBD server against an in-memory device, driven by a hand-written
//! client over an in-process pipe: negotiation, every command, and malformed input.

use crate::block_device::mem::{MemDevice, MemExports};
use crate::nbd_server::serve_connection;
use crate::nbd_wire::*;
use crate::NbdLimits;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const SIZE: usize = 1 << 20;

fn exports(ro: bool) -> Arc<MemExports> {
    Arc::new(MemExports { devs: vec![("vol".into(), Arc::new(MemDevice { data: Mutex::new(vec![0; SIZE]), ro })), ("other".into(), Arc::new(MemDevice { data: Mutex::new(vec![7; 4096]), ro: true }))] })
}

fn limits() -> NbdLimits {
    NbdLimits { payload_bytes_max: 64 << 10, inflight_bytes_max: 1 << 20, ..NbdLimits::default() }
}

struct TestClient {
    s: DuplexStream,
    server: tokio::task::JoinHandle<()>,
}

async fn connect(ex: Arc<MemExports>) -> TestClient {
    let (a, mut b) = tokio::io::duplex(4 << 20);
    let server = tokio::spawn(serve_connection(a, ex, limits()));
    assert_eq!(b.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(b.read_u64().await.unwrap(), IHAVEOPT);
    let hflags = b.read_u16().await.unwrap();
    assert_eq!(hflags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    b.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await.unwrap();
    TestClient { s: b, server }
}

impl TestClient {
    async fn option(&mut self, opt: u32, data: &[u8]) {
        self.s.write_u64(IHAVEOPT).await.unwrap();
        self.s.write_u32(opt).await.unwrap();
        self.s.write_u32(data.len() as u32).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let opt = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (opt, kind, d)
    }

    /// GO (or INFO) for `name` asking for `infos`; returns (size, flags, block sizes) or the
    /// error reply type and message.
    async fn go(&mut self, opt: u32, name: &str, infos: &[u16]) -> Result<(u64, u16, Option<(u32, u32, u32)>), (u32, String)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(opt, &d).await;
        let (mut size, mut flags, mut bs) = (0, 0, None);
        for _ in 0..10 {
            let (o, kind, data) = self.reply().await;
            assert_eq!(o, opt);
            match kind {
                REP_ACK => return Ok((size, flags, bs)),
                REP_INFO => match u16::from_be_bytes([data[0], data[1]]) {
                    INFO_EXPORT => {
                        size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                    INFO_BLOCK_SIZE => {
                        let u = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                        bs = Some((u(2), u(6), u(10)));
                    }
                    _ => {}
                },
                e => return Err((e, String::from_utf8_lossy(&data).into_owned())),
            }
        }
        panic!("no ACK after 10 replies");
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let r = Request { flags, kind, cookie, offset, len };
        self.s.write_all(&r.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// A simple reply: (error, cookie), reading `data_len` bytes of data on success.
    async fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        assert_eq!(self.s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let err = self.s.read_u32().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let mut d = vec![0; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).await.unwrap();
        (err, cookie, d)
    }
}

#[tokio::test]
async fn negotiation_lists_describes_and_refuses_what_it_must() {
    let mut c = connect(exports(false)).await;
    c.option(OPT_LIST, b"").await;
    let mut names = Vec::new();
    loop {
        let (_, kind, d) = c.reply().await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["vol", "other"]);
    // LIST with data is invalid; unknown and TLS options are unsupported; the session goes on.
    c.option(OPT_LIST, b"x").await;
    assert_eq!(c.reply().await.1, REP_ERR_INVALID);
    c.option(99, b"abc").await;
    assert_eq!(c.reply().await.1, REP_ERR_UNSUP);
    c.option(OPT_STARTTLS, b"").await;
    assert_eq!(c.reply().await.1, REP_ERR_UNSUP);
    // Oversized option data is consumed and refused.
    c.option(OPT_INFO, &vec![0u8; 100 << 10]).await;
    assert_eq!(c.reply().await.1, REP_ERR_TOO_BIG);
    // A malformed INFO (name length past the end).
    c.option(OPT_INFO, &[0, 0, 0, 50, b'v', 0, 0]).await;
    assert_eq!(c.reply().await.1, REP_ERR_INVALID);
    let (code, msg) = c.go(OPT_INFO, "nope", &[]).await.unwrap_err();
    assert_eq!(code, REP_ERR_UNKNOWN);
    assert!(msg.contains("nope"), "{msg}");
    let (size, flags, bs) = c.go(OPT_INFO, "other", &[INFO_BLOCK_SIZE]).await.unwrap();
    assert_eq!(size, 4096);
    assert!(flags & TFLAG_READ_ONLY != 0 && flags & TFLAG_SEND_TRIM == 0);
    assert_eq!(bs, Some((512, 4096, 64 << 10)));
    // The empty name is the default (first) export.
    let (size, flags, _) = c.go(OPT_GO, "", &[INFO_BLOCK_SIZE]).await.unwrap();
    assert_eq!(size, SIZE as u64);
    assert_eq!(flags, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES);
    c.request(CMD_DISC, 0, 0, 0, 0, b"").await;
    c.server.await.unwrap();
}

#[tokio::test]
async fn export_name_and_abort() {
    let mut c = connect(exports(false)).await;
    c.option(OPT_EXPORT_NAME, b"other").await;
    assert_eq!(c.s.read_u64().await.unwrap(), 4096);
    assert!(c.s.read_u16().await.unwrap() & TFLAG_READ_ONLY != 0);
    c.request(CMD_READ, 0, 1, 0, 4096, b"").await;
    let (e, _, d) = c.simple(4096).await;
    assert_eq!((e, d), (0, vec![7; 4096]));

    // EXPORT_NAME cannot carry an error: an unknown name closes the connection.
    let mut c = connect(exports(false)).await;
    c.option(OPT_EXPORT_NAME, b"missing").await;
    assert!(c.s.read_u8().await.is_err());
    c.server.await.unwrap();

    let mut c = connect(exports(false)).await;
    c.option(OPT_ABORT, b"").await;
    assert_eq!(c.reply().await.1, REP_ACK);
    c.server.await.unwrap();
}

#[tokio::test]
async fn many_requests_in_flight_and_every_command() {
    let mut c = connect(exports(false)).await;
    c.go(OPT_GO, "vol", &[]).await.unwrap();
    // 64 writes of 4 KiB sent before any reply is read.
    for i in 0..64u64 {
        c.request(CMD_WRITE, if i % 2 == 0 { CMD_FLAG_FUA } else { 0 }, 1000 + i, i * 4096, 4096, &vec![i as u8 + 1; 4096]).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    for _ in 0..64 {
        let (e, cookie, _) = c.simple(0).await;
        assert_eq!(e, 0);
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (1000..1064).collect::<Vec<_>>());
    c.request(CMD_FLUSH, 0, 1, 0, 0, b"").await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(CMD_READ, 0, 2, 4096 * 5, 8192, b"").await;
    let (_, _, d) = c.simple(8192).await;
    assert_eq!(&d[..4096], &[6u8; 4096][..]);
    assert_eq!(&d[4096..], &[7u8; 4096][..]);
    c.request(CMD_TRIM, 0, 3, 4096 * 5, 4096, b"").await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4, 4096 * 6, 4096, b"").await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(CMD_READ, 0, 5, 4096 * 5, 3 * 4096, b"").await;
    let (_, _, d) = c.simple(3 * 4096).await;
    assert!(d[..8192].iter().all(|b| *b == 0));
    assert!(d[8192..].iter().all(|b| *b == 8));
    c.request(CMD_DISC, 0, 0, 0, 0, b"").await;
    c.server.await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_keeps_serving() {
    let ex = exports(false);
    let mut c = connect(ex.clone()).await;
    c.go(OPT_GO, "vol", &[INFO_BLOCK_SIZE]).await.unwrap();
    let end = SIZE as u64;
    // Past the end: EINVAL for reads, ENOSPC for writes (whose payload is still consumed).
    c.request(CMD_READ, 0, 1, end - 512, 1024, b"").await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    c.request(CMD_WRITE, 0, 2, end, 512, &[1; 512]).await;
    assert_eq!(c.simple(0).await.0, ENOSPC);
    c.request(CMD_TRIM, 0, 3, u64::MAX - 10, 512, b"").await;
    assert_eq!(c.simple(0).await.0, ENOSPC);
    // Oversized: EOVERFLOW, and a write's payload is drained so the stream stays in sync.
    c.request(CMD_READ, 0, 4, 0, 128 << 10, b"").await;
    assert_eq!(c.simple(0).await.0, EOVERFLOW);
    c.request(CMD_WRITE, 0, 5, 0, 128 << 10, &vec![9; 128 << 10]).await;
    assert_eq!(c.simple(0).await.0, EOVERFLOW);
    // Misaligned (this client asked for block sizes), unknown command, unknown flag.
    c.request(CMD_READ, 0, 6, 100, 512, b"").await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    c.request(42, 0, 7, 0, 512, b"").await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    c.request(CMD_READ, 1 << 9, 8, 0, 512, b"").await;
    assert_eq!(c.simple(0).await.0, EINVAL);
    // Still serving, and nothing was written by the refused requests.
    c.request(CMD_READ, 0, 9, 0, 512, b"").await;
    let (e, cookie, d) = c.simple(512).await;
    assert_eq!((e, cookie), (0, 9));
    assert!(d.iter().all(|b| *b == 0));

    // Read-only export: writes are EPERM.
    let mut r = connect(ex.clone()).await;
    r.go(OPT_GO, "other", &[]).await.unwrap();
    r.request(CMD_WRITE, 0, 1, 0, 512, &[1; 512]).await;
    assert_eq!(r.simple(0).await.0, EPERM);

    // A bad magic ends that connection only.
    let mut bad = connect(ex.clone()).await;
    bad.go(OPT_GO, "vol", &[]).await.unwrap();
    let mut h = Request { flags: 0, kind: CMD_READ, cookie: 1, offset: 0, len: 512 }.encode();
    h[0] = 0;
    bad.s.write_all(&h).await.unwrap();
    assert!(bad.s.read_u32().await.is_err());
    bad.server.await.unwrap();

    // A client that disconnects in the middle of a write's payload: nothing is written.
    let mut gone = connect(ex.clone()).await;
    gone.go(OPT_GO, "vol", &[]).await.unwrap();
    let h = Request { flags: 0, kind: CMD_WRITE, cookie: 1, offset: 8192, len: 4096 }.encode();
    gone.s.write_all(&h).await.unwrap();
    gone.s.write_all(&[5; 100]).await.unwrap();
    drop(gone.s);
    gone.server.await.unwrap();

    c.request(CMD_READ, 0, 10, 8192, 4096, b"").await;
    let (e, _, d) = c.simple(4096).await;
    assert_eq!(e, 0);
    assert!(d.iter().all(|b| *b == 0));
    c.request(CMD_DISC, 0, 0, 0, 0, b"").await;
    c.server.await.unwrap();
}

#[tokio::test]
async fn without_block_size_negotiation_any_alignment_is_served() {
    let mut c = connect(exports(false)).await;
    c.go(OPT_GO, "vol", &[]).await.unwrap();
    c.request(CMD_WRITE, 0, 1, 3, 5, b"hello").await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(CMD_READ, 0, 2, 0, 9, b"").await;
    assert_eq!(c.simple(9).await.2, b"\0\0\0hello\0");
}

/// Poll `f` until it holds (20 s at most).
pub(crate) async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
