use crate::frame::{self, Frame, FrameKind, FIXED_BYTES};
use crate::{decode, encode, ErrorCode, Hello, HelloAck, RemoteError, ServiceKind, PROTOCOL_VERSION};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub service: ServiceKind,
    pub cluster: String,
    pub inflight_requests_max: usize,
    pub handshake_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub connections_max: usize,
}

impl ServerConfig {
    pub fn new(service: ServiceKind, cluster: impl Into<String>) -> ServerConfig {
        ServerConfig { service, cluster: cluster.into(), inflight_requests_max: 256, handshake_timeout: Duration::from_secs(5), connections_max: 1024 }
    }
}

/// What a handler knows about a request besides its message.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    pub peer: SocketAddr,
    /// When the caller stops waiting.
    pub deadline: Instant,
}

pub trait Handler: Send + Sync + 'static {
    type Req: DeserializeOwned + Send + 'static;
    type Resp: Serialize + Send + 'static;
    fn handle(&self, req: Self::Req, payload: Bytes, ctx: RequestCtx) -> impl Future<Output = Result<(Self::Resp, Bytes), RemoteError>> + Send;
}

/// Serve `handler` on `listener` until `shutdown` becomes true.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, cfg: ServerConfig, mut shutdown: watch::Receiver<bool>) {
    let conns = Arc::new(Semaphore::new(cfg.connections_max));
    let cfg = Arc::new(cfg);
    loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let Ok(permit) = conns.clone().acquire_owned().await else { return };
                let (handler, cfg, sd) = (handler.clone(), cfg.clone(), shutdown.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, peer, handler, cfg, sd).await {
                        tracing::warn!(%peer, error = %e, "closing connection");
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Read buffer of a connection (either side).
pub(crate) const READ_BUFFER_BYTES: usize = 64 << 10;

/// The read side of a connection, either end.
pub(crate) type FrameReader = tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>;

pub(crate) async fn read_frame(r: &mut FrameReader) -> Result<Option<Frame>, String> {
    let mut fixed = [0u8; FIXED_BYTES];
    match r.read_exact(&mut fixed).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let f = frame::decode_fixed(&fixed).map_err(|e| e.to_string())?;
    let mut header = BytesMut::zeroed(f.header_len);
    r.read_exact(&mut header).await.map_err(|e| format!("truncated frame header: {e}"))?;
    frame::verify(&f, &header).map_err(|e| e.to_string())?;
    let payload = read_payload(r, f.payload_len).await.map_err(|e| format!("truncated frame payload: {e}"))?;
    Ok(Some(Frame { kind: f.kind, request_id: f.request_id, timeout_ms: f.timeout_ms, header: header.freeze(), payload }))
}

/// Payloads from this size on start on a `PAYLOAD_ALIGN` boundary in memory, so that the
/// engine hands extent bytes to `O_DIRECT` writes without an aligning copy.
const PAYLOAD_ALIGN_FROM_BYTES: usize = 64 << 10;
const PAYLOAD_ALIGN: usize = 4096;

/// `len` bytes, read into memory that is not zeroed first (zeroing a fresh megabyte per write
/// was 4% of an engine's CPU); large payloads into pooled memory, which the kernel need not
/// zero either (see `buffer_pool`).
async fn read_payload(r: &mut FrameReader, len: usize) -> std::io::Result<Bytes> {
    if len >= crate::buffer_pool::POOLED_FROM_BYTES {
        if let Some(mut v) = crate::huge_buffers::RECEIVE.take(len) {
            read_exactly(r, &mut v, len).await?;
            return Ok(crate::huge_buffers::RECEIVE.lend(v, 0));
        }
    }
    let mut buf = if len >= PAYLOAD_ALIGN_FROM_BYTES {
        let mut b = BytesMut::with_capacity(len + PAYLOAD_ALIGN);
        let pad = b.as_ptr().align_offset(PAYLOAD_ALIGN);
        b.put_bytes(0, pad);
        b.advance(pad);
        debug_assert!(b.as_ptr().align_offset(PAYLOAD_ALIGN) == 0 && b.capacity() >= len);
        b
    } else {
        BytesMut::with_capacity(len)
    };
    read_exactly(r, &mut buf, len).await?;
    Ok(buf.freeze())
}

/// Append exactly `n` bytes from `r` to `buf`. A large read arrives in many segments, and
/// each wake-up for a few of them costs a context switch (~50 per 1 MiB replicated write across
/// the engines; switches were the largest item of their CPU profile): the kernel is asked to report the socket readable only
/// once the rest is there (`SO_RCVLOWAT`), and the mark is put back to one byte afterwards, on
/// every path: a mark left behind would stall the next small frame.
async fn read_exactly(r: &mut FrameReader, buf: &mut impl BufMut, n: usize) -> std::io::Result<()> {
    let low_water = n >= PAYLOAD_ALIGN_FROM_BYTES;
    let mut set_low = 1;
    let mut got = 0;
    let mut out = Ok(());
    while got < n {
        let remaining = n - got;
        if low_water && remaining.min(RCVLOWAT_MAX) != set_low {
            set_low = remaining.min(RCVLOWAT_MAX);
            set_rcvlowat(r, set_low);
        }
        match (&mut *r).take(remaining as u64).read_buf(buf).await {
            Ok(0) => {
                out = Err(std::io::ErrorKind::UnexpectedEof.into());
                break;
            }
            Ok(k) => got += k,
            Err(e) => {
                out = Err(e);
                break;
            }
        }
    }
    if set_low != 1 {
        set_rcvlowat(r, 1);
    }
    out
}

/// The largest low-water mark asked for (the kernel also caps it at half the receive buffer,
/// growing the buffer where it may).
const RCVLOWAT_MAX: usize = 4 << 20;

fn set_rcvlowat(r: &FrameReader, bytes: usize) {
    use std::os::fd::AsRawFd;
    let fd = r.get_ref().as_ref().as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt on a socket this connection owns, with a c_int option value. Failure
    // only costs wake-ups.
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
    }
}



async fn connection<H: Handler>(stream: TcpStream, peer: SocketAddr, handler: Arc<H>, cfg: Arc<ServerConfig>, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    // Buffered: a small frame's three parts (fixed head, header, payload) and any frames
    // behind it come in one read instead of three; large payloads bypass the buffer.
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    // Handshake.
    let hello = tokio::time::timeout(cfg.handshake_timeout, read_frame(&mut rd)).await.map_err(|_| "no handshake in time".to_string())??;
    let Some(hello) = hello else { return Ok(()) };
    if hello.kind != FrameKind::Hello {
        return Err(format!("expected a hello frame, got {:?}", hello.kind));
    }
    let h: Hello = decode(&hello.header).map_err(|e| e.to_string())?;
    let refusal = if h.protocol != PROTOCOL_VERSION {
        Some(format!("protocol version {} is not supported (server speaks {PROTOCOL_VERSION})", h.protocol))
    } else if h.service != cfg.service {
        Some(format!("this address serves {:?}, not {:?}", cfg.service, h.service))
    } else if h.cluster.as_ref().is_some_and(|c| *c != cfg.cluster) {
        Some(format!("this server belongs to cluster {}, the client asked for {}", cfg.cluster, h.cluster.unwrap_or_default()))
    } else {
        None
    };
    if let Some(reason) = refusal {
        let err = encode(&RemoteError::new(ErrorCode::PermissionDenied, reason.clone())).map_err(|e| e.to_string())?;
        let head = frame::encode_head(FrameKind::Error, hello.request_id, 0, &err, 0);
        let _ = wr.write_all(&head).await;
        let _ = wr.flush().await;
        return Err(format!("refused handshake: {reason}"));
    }
    let ack = encode(&HelloAck { protocol: PROTOCOL_VERSION, cluster: cfg.cluster.clone() }).map_err(|e| e.to_string())?;
    wr.write_all(&frame::encode_head(FrameKind::HelloAck, hello.request_id, 0, &ack, 0)).await.map_err(|e| e.to_string())?;
    wr.flush().await.map_err(|e| e.to_string())?;

    // Responses go through one writer task so that concurrent handlers never interleave bytes.
    let (tx, mut rx) = mpsc::channel::<(Bytes, Bytes)>(cfg.inflight_requests_max);
    let writer = tokio::spawn(async move {
        while let Some((head, payload)) = rx.recv().await {
            if wr.write_all(&head).await.is_err() || wr.write_all(&payload).await.is_err() {
                return;
            }
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
    });
    let inflight = Arc::new(Semaphore::new(cfg.inflight_requests_max));
    let result = loop {
        let frame = tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            f = read_frame(&mut rd) => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if frame.kind != FrameKind::Request {
            break Err(format!("unexpected {:?} frame from a client", frame.kind));
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else { break Ok(()) };
        let (handler, tx) = (handler.clone(), tx.clone());
        let deadline = Instant::now() + Duration::from_millis(frame.timeout_ms.max(1) as u64);
        tokio::spawn(async move {
            let id = frame.request_id;
            let result = match decode::<H::Req>(&frame.header) {
                Err(e) => Err(RemoteError::new(ErrorCode::InvalidArgument, format!("request does not decode: {e}"))),
                Ok(_) if Instant::now() > deadline => Err(RemoteError::new(ErrorCode::Timeout, "request expired before it ran")),
                Ok(req) => handler.handle(req, frame.payload, RequestCtx { peer, deadline }).await,
            };
            let out = match result.map(|(resp, payload)| (encode(&resp), payload)) {
                Ok((Ok(h), payload)) => (frame::encode_head(FrameKind::Response, id, 0, &h, payload.len()), payload),
                Ok((Err(e), _)) => error_frame(id, &RemoteError::new(ErrorCode::Internal, e.to_string())),
                Err(re) => error_frame(id, &re),
            };
            let _ = tx.send(out).await;
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}

fn error_frame(id: u64, e: &RemoteError) -> (Bytes, Bytes) {
    let body = postcard::to_allocvec(e).unwrap_or_default();
    (frame::encode_head(FrameKind::Error, id, 0, &body, 0), Bytes::new())
}
