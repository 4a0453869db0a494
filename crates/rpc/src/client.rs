use crate::frame::{self, FrameKind, HEADER_BYTES_MAX, PAYLOAD_BYTES_MAX};
use crate::server::read_frame as read_one_frame;
use crate::{decode, encode, Hello, HelloAck, RemoteError, RpcError, ServiceKind, PROTOCOL_VERSION};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Requests queued for the connection's writer at most.
    pub queue_depth: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { connect_timeout: Duration::from_secs(3), queue_depth: 256 }
    }
}

type Reply = Result<(Bytes, Bytes), RpcError>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Inner {
    addr: String,
    cluster: String,
    tx: mpsc::Sender<(Bytes, Bytes)>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

/// One multiplexed connection; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<Inner>,
}

/// A poisoned lock still holds consistent maps here: every critical section is one insert or remove.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RpcClient {
    pub async fn connect(addr: &str, service: ServiceKind, cluster: Option<&str>, cfg: &ClientConfig) -> Result<RpcClient, RpcError> {
        let cerr = |source| RpcError::Connect { addr: addr.to_owned(), source };
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| cerr(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
            .map_err(cerr)?;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let mut rd = tokio::io::BufReader::with_capacity(crate::server::READ_BUFFER_BYTES, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let hello = encode(&Hello { protocol: PROTOCOL_VERSION, service, cluster: cluster.map(str::to_owned) })?;
        wr.write_all(&frame::encode_head(FrameKind::Hello, 0, 0, &hello, 0)).await.map_err(cerr)?;
        wr.flush().await.map_err(cerr)?;
        // Until the answer starts, a failure is the transport's, as for a refused connect: the
        // server died or reset the connection while it was being made (a rank killed a moment
        // earlier), and callers retry elsewhere. Reported as a refused handshake, it made a
        // read after a failure give up instead of refreshing its map.
        let answered = tokio::time::timeout(cfg.connect_timeout, rd.fill_buf())
            .await
            .map_err(|_| cerr(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to hello")))?
            .map_err(cerr)?;
        if answered.is_empty() {
            return Err(cerr(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed during the handshake")));
        }
        let reply = tokio::time::timeout(cfg.connect_timeout, read_one_frame(&mut rd))
            .await
            .map_err(|_| RpcError::Handshake { addr: addr.to_owned(), reason: "no answer to hello".into() })?
            .map_err(|e| RpcError::Handshake { addr: addr.to_owned(), reason: e })?
            .ok_or_else(|| RpcError::Handshake { addr: addr.to_owned(), reason: "connection closed during handshake".into() })?;
        let cluster_id = match reply.kind {
            FrameKind::HelloAck => decode::<HelloAck>(&reply.header)?.cluster,
            FrameKind::Error => {
                let e: RemoteError = decode(&reply.header)?;
                return Err(RpcError::Handshake { addr: addr.to_owned(), reason: e.message });
            }
            k => return Err(RpcError::Handshake { addr: addr.to_owned(), reason: format!("unexpected {k:?} frame") }),
        };

        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<(Bytes, Bytes)>(cfg.queue_depth.max(1));
        tokio::spawn(async move {
            while let Some((head, payload)) = rx.recv().await {
                if wr.write_all(&head).await.is_err() || wr.write_all(&payload).await.is_err() {
                    return;
                }
                if rx.is_empty() && wr.flush().await.is_err() {
                    return;
                }
            }
        });
        {
            let (pending, closed, addr) = (pending.clone(), closed.clone(), addr.to_owned());
            tokio::spawn(async move {
                loop {
                    match read_one_frame(&mut rd).await {
                        Ok(Some(f)) => {
                            let waiter = lock(&pending).remove(&f.request_id);
                            let Some(w) = waiter else { continue };
                            let reply = match f.kind {
                                FrameKind::Response => Ok((f.header, f.payload)),
                                FrameKind::Error => Err(decode::<RemoteError>(&f.header).map(RpcError::Remote).unwrap_or_else(|e| e)),
                                k => Err(RpcError::Protocol(format!("unexpected {k:?} frame from server"))),
                            };
                            let _ = w.send(reply);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                closed.store(true, Ordering::SeqCst);
                for (_, w) in lock(&pending).drain() {
                    let _ = w.send(Err(RpcError::ConnectionClosed(addr.clone())));
                }
            });
        }
        Ok(RpcClient { inner: Arc::new(Inner { addr: addr.to_owned(), cluster: cluster_id, tx, pending, next_id: AtomicU64::new(1), closed }) })
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The cluster id the server announced in the handshake.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Send `req` with `payload`, wait at most `timeout` for the answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, req: &Req, payload: Bytes, timeout: Duration) -> Result<(Resp, Bytes), RpcError> {
        let header = encode(req)?;
        if header.len() > HEADER_BYTES_MAX || payload.len() > PAYLOAD_BYTES_MAX {
            return Err(RpcError::TooLarge(format!("header {} bytes, payload {} bytes (limits {HEADER_BYTES_MAX}, {PAYLOAD_BYTES_MAX})", header.len(), payload.len())));
        }
        if self.is_closed() {
            return Err(RpcError::ConnectionClosed(self.inner.addr.clone()));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (wtx, wrx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, wtx);
        let timeout_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        let head = frame::encode_head(FrameKind::Request, id, timeout_ms, &header, payload.len());
        if self.inner.tx.send((head, payload)).await.is_err() {
            lock(&self.inner.pending).remove(&id);
            return Err(RpcError::ConnectionClosed(self.inner.addr.clone()));
        }
        match tokio::time::timeout(timeout, wrx).await {
            Ok(Ok(Ok((h, p)))) => Ok((decode(&h)?, p)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(RpcError::ConnectionClosed(self.inner.addr.clone())),
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(RpcError::Timeout(timeout))
            }
        }
    }
}

/// The connection to one address, once made; its lock is held while connecting.
type ConnSlot = Arc<tokio::sync::Mutex<Option<RpcClient>>>;

/// One client per (address, service), reconnecting when a connection has closed.
///
/// Each address has its own slot: a connect to a slow or hung peer (up to the connect
/// timeout) delays only the callers of that peer, never calls to the others.
#[derive(Clone)]
pub struct RpcPool {
    service: ServiceKind,
    cluster: Option<String>,
    cfg: ClientConfig,
    conns: Arc<Mutex<HashMap<String, ConnSlot>>>,
}

impl RpcPool {
    pub fn new(service: ServiceKind, cluster: Option<String>, cfg: ClientConfig) -> RpcPool {
        RpcPool { service, cluster, cfg, conns: Arc::new(Mutex::new(HashMap::new())) }
    }

    pub async fn get(&self, addr: &str) -> Result<RpcClient, RpcError> {
        let slot = lock(&self.conns).entry(addr.to_owned()).or_default().clone();
        // Callers of one address share its connect rather than racing to open several.
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = RpcClient::connect(addr, self.service, self.cluster.as_deref(), &self.cfg).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(&self, addr: &str, req: &Req, payload: Bytes, timeout: Duration) -> Result<(Resp, Bytes), RpcError> {
        let c = self.get(addr).await?;
        c.call(req, payload, timeout).await
    }
}
