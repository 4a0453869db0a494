//! The RPC layer as a service and its clients see it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use strata_rpc::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[derive(Serialize, Deserialize, Debug)]
enum Req {
    Echo { tag: u64, delay_ms: u64 },
    Fail,
    /// Answers with the payload's distance from a 4 KiB boundary in the server's memory.
    Alignment,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Resp {
    tag: u64,
    len: usize,
}

struct Echo;

impl Handler for Echo {
    type Req = Req;
    type Resp = Resp;
    async fn handle(&self, req: Req, payload: Bytes, _ctx: RequestCtx) -> Result<(Resp, Bytes), RemoteError> {
        match req {
            Req::Echo { tag, delay_ms } => {
                // Simulated work of varying length, so answers come back out of order.
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                Ok((Resp { tag, len: payload.len() }, payload))
            }
            Req::Fail => Err(RemoteError::new(ErrorCode::NotFound, "no such thing")),
            Req::Alignment => Ok((Resp { tag: payload.as_ptr().align_offset(4096) as u64, len: payload.len() }, Bytes::new())),
        }
    }
}

async fn start(cluster: &str) -> (String, tokio::sync::watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(l, Arc::new(Echo), ServerConfig::new(ServiceKind::Engine, cluster), rx));
    (addr, tx)
}

async fn client(addr: &str) -> RpcClient {
    RpcClient::connect(addr, ServiceKind::Engine, Some("c1"), &ClientConfig::default()).await.unwrap()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_large_payload_and_remote_errors() {
    let (addr, _stop) = start("c1").await;
    let c = client(&addr).await;
    assert_eq!(c.cluster(), "c1");
    let big: Vec<u8> = (0..16 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let (r, p): (Resp, Bytes) = c.call(&Req::Echo { tag: 7, delay_ms: 0 }, Bytes::from(big.clone()), T).await.unwrap();
    assert_eq!(r, Resp { tag: 7, len: 16 << 20 });
    assert!(p == big, "payload came back changed");
    let err = c.call::<_, Resp>(&Req::Fail, Bytes::new(), T).await.unwrap_err();
    match err {
        RpcError::Remote(e) => assert_eq!((e.code, e.message.as_str()), (ErrorCode::NotFound, "no such thing")),
        other => panic!("{other}"),
    }
    let too_big = Bytes::from(vec![0u8; frame::PAYLOAD_BYTES_MAX + 1]);
    assert!(matches!(c.call::<_, Resp>(&Req::Echo { tag: 0, delay_ms: 0 }, too_big, T).await, Err(RpcError::TooLarge(_))));
}

/// Large payloads arrive on a 4 KiB boundary (the engine writes extents from them with
/// `O_DIRECT`, no aligning copy) and intact, whatever their size; answers to the client too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_arrive_block_aligned_and_intact() {
    let (addr, _stop) = start("c1").await;
    let c = client(&addr).await;
    for len in [64 << 10, (1 << 20) + 123, 4 << 20] {
        let data: Vec<u8> = (0..len).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        let (r, _): (Resp, Bytes) = c.call(&Req::Alignment, Bytes::from(data.clone()), T).await.unwrap();
        assert_eq!(r, Resp { tag: 0, len: len as usize }, "server side, {len} bytes");
        let (_, p): (Resp, Bytes) = c.call(&Req::Echo { tag: 1, delay_ms: 0 }, Bytes::from(data.clone()), T).await.unwrap();
        assert_eq!(p.as_ptr().align_offset(4096), 0, "client side, {len} bytes");
        assert!(p == data, "{len} bytes came back changed");
    }
}

/// Large payloads are read with a receive low-water mark; small frames right behind them (and
/// a connection left with small frames only) must not stall waiting for bytes that never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_frames_behind_large_ones_are_not_held_back() {
    let (addr, _stop) = start("c1").await;
    let c = client(&addr).await;
    let mut tasks = Vec::new();
    for tag in 0..40u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let len = if tag % 4 == 0 { (1 << 20) + tag as usize } else { 1 + tag as usize };
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ tag) as u8).collect();
            let (r, p): (Resp, Bytes) = c.call(&Req::Echo { tag, delay_ms: 0 }, Bytes::from(data.clone()), T).await.unwrap();
            assert_eq!(r.tag, tag);
            assert!(p == data, "tag {tag}: {len} bytes came back changed");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Alone on the connection afterwards, a one-byte frame still arrives at once.
    let (r, _): (Resp, Bytes) = c.call(&Req::Echo { tag: 99, delay_ms: 0 }, Bytes::from_static(b"x"), Duration::from_secs(2)).await.unwrap();
    assert_eq!(r.tag, 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_in_flight_complete_out_of_order() {
    let (addr, _stop) = start("c1").await;
    let c = client(&addr).await;
    let mut tasks = Vec::new();
    for tag in 0..300u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let delay_ms = (tag * 7919) % 50;
            let (r, p): (Resp, Bytes) = c.call(&Req::Echo { tag, delay_ms }, Bytes::from(tag.to_le_bytes().to_vec()), T).await.unwrap();
            assert_eq!(r.tag, tag);
            assert_eq!(&p[..], &tag.to_le_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_a_vanished_server_are_clean_errors() {
    let (addr, stop) = start("c1").await;
    let c = client(&addr).await;
    let err = c.call::<_, Resp>(&Req::Echo { tag: 1, delay_ms: 2000 }, Bytes::new(), Duration::from_millis(100)).await.unwrap_err();
    assert!(matches!(err, RpcError::Timeout(_)), "{err}");
    assert!(err.is_transient());
    // The connection still works after a timeout.
    let _: (Resp, Bytes) = c.call(&Req::Echo { tag: 2, delay_ms: 0 }, Bytes::new(), T).await.unwrap();
    stop.send(true).unwrap();
    // Once the server is gone, calls fail promptly rather than hang.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.call::<_, Resp>(&Req::Echo { tag: 3, delay_ms: 0 }, Bytes::new(), Duration::from_secs(1)).await {
            Err(RpcError::ConnectionClosed(_)) => break,
            Err(e) if e.is_transient() => {}
            other => assert!(tokio::time::Instant::now() < deadline, "still answered after shutdown: {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "client never saw the connection close");
        tokio::task::yield_now().await;
    }
    let err = RpcClient::connect(&addr, ServiceKind::Engine, None, &ClientConfig::default()).await.err().expect("no server");
    assert!(matches!(err, RpcError::Connect { .. } | RpcError::Handshake { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refuses_wrong_cluster_and_service() {
    let (addr, _stop) = start("c1").await;
    let err = RpcClient::connect(&addr, ServiceKind::Engine, Some("other"), &ClientConfig::default()).await.err().unwrap();
    assert!(err.to_string().contains("belongs to cluster c1"), "{err}");
    assert!(!err.is_transient(), "a refusal is final: {err}");
    let err = RpcClient::connect(&addr, ServiceKind::Mgmt, None, &ClientConfig::default()).await.err().unwrap();
    assert!(err.to_string().contains("serves Engine, not Mgmt"), "{err}");
    // First contact without a cluster id learns it.
    let c = RpcClient::connect(&addr, ServiceKind::Engine, None, &ClientConfig::default()).await.unwrap();
    assert_eq!(c.cluster(), "c1");
}

/// A server that dies while a client connects (it accepted, then reset the connection or went
/// silent before answering the hello) fails the connect with an error callers retry, as a
/// refused connect does: a client reading right after a rank was killed gave up otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_during_the_handshake_is_a_transient_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let mut silent = Vec::new();
        for i in 0.. {
            let (s, _) = listener.accept().await.unwrap();
            match i {
                // Reset: no linger, closed with the hello unread.
                0 => s.set_zero_linger().unwrap(),
                1 => {}
                _ => silent.push(s),
            }
        }
    });
    let cfg = ClientConfig { connect_timeout: Duration::from_millis(300), ..ClientConfig::default() };
    for what in ["reset", "closed", "silent"] {
        let err = RpcClient::connect(&addr, ServiceKind::Engine, None, &cfg).await.err().unwrap_or_else(|| panic!("{what}: connected"));
        assert!(err.is_transient(), "{what}: {err}");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_frames_hurt_nobody_else() {
    let (addr, _stop) = start("c1").await;
    let good = client(&addr).await;
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let hello = {
        let h = postcard::to_allocvec(&Hello { protocol: PROTOCOL_VERSION, service: ServiceKind::Engine, cluster: None }).unwrap();
        frame::encode_head(frame::FrameKind::Hello, 0, 0, &h, 0)
    };
    let mut sent = 0;
    let mut conns = 0;
    while sent < 10_000 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        conns += 1;
        // Half the connections handshake first, so the bad frames hit the request path.
        if conns % 2 == 0 {
            s.write_all(&hello).await.unwrap();
        }
        // A burst of bad frames on this connection; the server closes it at the first one.
        for _ in 0..50 {
            let kind = next() % 6;
            let valid_head = frame::encode_head(frame::FrameKind::Request, next(), 1000, b"\x00\x01", 0);
            let bytes: Vec<u8> = match kind {
                0 => (0..(next() % 64)).map(|_| next() as u8).collect(), // garbage
                1 => valid_head[..(next() as usize % valid_head.len())].to_vec(), // truncated
                2 => {
                    let mut b = valid_head.to_vec();
                    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes()); // oversized payload
                    b
                }
                3 => {
                    let mut b = valid_head.to_vec();
                    let i = next() as usize % b.len();
                    b[i] ^= 0x5a; // bit flips
                    b
                }
                4 => frame::encode_head(frame::FrameKind::Request, 1, 1000, &[0xff; 40], 0).to_vec(), // undecodable message
                _ => frame::encode_head(frame::FrameKind::Response, 1, 1000, b"", 0).to_vec(), // wrong direction
            };
            sent += 1;
            if s.write_all(&bytes).await.is_err() {
                break;
            }
        }
        drop(s);
        if conns % 20 == 0 {
            let (r, _): (Resp, Bytes) = good.call(&Req::Echo { tag: conns, delay_ms: 0 }, Bytes::new(), T).await.expect("a well-behaved client must keep working");
            assert_eq!(r.tag, conns);
        }
    }
    let (r, _): (Resp, Bytes) = good.call(&Req::Echo { tag: 99, delay_ms: 0 }, Bytes::new(), T).await.unwrap();
    assert_eq!(r.tag, 99);
    // New connections are still accepted.
    let fresh = client(&addr).await;
    let _: (Resp, Bytes) = fresh.call(&Req::Echo { tag: 1, delay_ms: 0 }, Bytes::new(), T).await.unwrap();
}

/// A peer that accepts and then never answers the handshake (a stopped process) must delay
/// only its own callers: calls through the same pool to a healthy server go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_peer_does_not_block_a_pool_s_calls_to_others() {
    let (addr, _stop) = start("c1").await;
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let silent = tokio::spawn(async move {
        let (s, _) = hung.accept().await.unwrap();
        let _ = accepted_tx.send(());
        // Hold the connection open without a word until the test ends.
        std::future::pending::<()>().await;
        drop(s);
    });
    let pool = RpcPool::new(ServiceKind::Engine, Some("c1".into()), ClientConfig { connect_timeout: Duration::from_secs(120), ..ClientConfig::default() });
    let (p2, h2) = (pool.clone(), hung_addr.clone());
    let stuck = tokio::spawn(async move { p2.call::<_, Resp>(&h2, &Req::Echo { tag: 1, delay_ms: 0 }, Bytes::new(), T).await });
    // The stuck call is inside its handshake once the silent peer has accepted it.
    tokio::time::timeout(T, accepted_rx).await.expect("the pool never connected to the silent peer").unwrap();
    let healthy = async {
        for tag in 0..20 {
            let (r, _): (Resp, Bytes) = pool.call(&addr, &Req::Echo { tag, delay_ms: 0 }, Bytes::from_static(b"x"), T).await.unwrap();
            assert_eq!(r, Resp { tag, len: 1 });
        }
    };
    // Far below the silent peer's 120 s connect timeout: the healthy calls never waited for it.
    tokio::time::timeout(Duration::from_secs(60), healthy).await.expect("calls to a healthy server waited for a hung peer's handshake");
    assert!(!stuck.is_finished(), "the silent peer cannot have completed a handshake");
    stuck.abort();
    silent.abort();
}
