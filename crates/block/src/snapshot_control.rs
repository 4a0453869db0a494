//! How a snapshot reaches the server exporting a volume for writing, whose write-back cache may
//! hold acknowledged writes the volume does not have yet (the same problem `rbd snap create`
//! solves by notifying the image's watchers).
//!
//! A writing NBD server listens on a small TCP control port and names it in its writer lease's
//! holder (`nbd@host:pid:id ctl=IP:PORT`); the holder string, known only through the
//! management service, also serves as the request's credential. `strata block snapshot` reads
//! the lease, connects and sends `QUIESCE <holder>`: the server holds new writes, writes back
//! everything and answers `OK`. The snapshot command then picks its epoch (above every durable
//! write) and waits for the clock to pass it, and sends `RESUME`: the server lets writes in
//! again (they get later epochs) and answers `RESUMED`. A server answers `EXPIRED` instead if
//! it stopped holding writes because `RESUME` took longer than [`QUIESCE_HOLD_MAX`], so a
//! stalled snapshot command never stalls the volume's clients for long; the snapshot is then
//! refused. Lines are ASCII, `\n`-terminated.

use crate::volume_io::VolumeIo;
use crate::write_cache::WriteBackCache;
use crate::BlockError;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest a server holds writes for one snapshot.
pub const QUIESCE_HOLD_MAX: Duration = Duration::from_secs(5);
/// Longest a snapshot waits for the writer to write back its cache.
pub const QUIESCE_FLUSH_MAX: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LINE_BYTES_MAX: usize = 1024;

type Cache = WriteBackCache<VolumeIo>;

/// The control port of one NBD server: holder name → the cache of the volume it holds.
pub struct ControlServer {
    addr: SocketAddr,
    caches: Mutex<HashMap<String, Weak<Cache>>>,
}

impl ControlServer {
    /// Listen on an ephemeral port of `ip` (the address peers reach this host by).
    pub async fn start(ip: IpAddr) -> std::io::Result<Arc<ControlServer>> {
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let me = Arc::new(ControlServer { addr: l.local_addr()?, caches: Default::default() });
        let weak = Arc::downgrade(&me);
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Some(me) = weak.upgrade() else { return };
                tokio::spawn(async move {
                    if let Err(e) = me.serve(sock).await {
                        tracing::debug!(error = %e, "snapshot control connection ended");
                    }
                });
            }
        });
        Ok(me)
    }

    /// The holder name to take a writer lease under, naming this control port.
    pub fn holder(&self, base: &str) -> String {
        format!("{base} ctl={}", self.addr)
    }

    pub fn register(&self, holder: &str, cache: &Arc<Cache>) {
        let mut m = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(holder.to_owned(), Arc::downgrade(cache));
    }

    async fn serve(&self, sock: TcpStream) -> std::io::Result<()> {
        let (rd, mut wr) = sock.into_split();
        let mut rd = BufReader::new(rd);
        let line = match tokio::time::timeout(CONNECT_TIMEOUT, read_line(&mut rd)).await {
            Ok(l) => l?,
            Err(_) => return Ok(()),
        };
        let Some(holder) = line.strip_prefix("QUIESCE ") else {
            return wr.write_all(b"ERR expected QUIESCE <holder>\n").await;
        };
        let cache = self.caches.lock().unwrap_or_else(|e| e.into_inner()).get(holder).and_then(Weak::upgrade);
        let Some(cache) = cache else {
            return wr.write_all(format!("ERR this server holds no volume as {holder}\n").as_bytes()).await;
        };
        let held = match tokio::time::timeout(QUIESCE_FLUSH_MAX, cache.quiesce()).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => return wr.write_all(format!("ERR writing back the cache failed: {e}\n").as_bytes()).await,
            Err(_) => return wr.write_all(format!("ERR writing back the cache took longer than {QUIESCE_FLUSH_MAX:?}\n").as_bytes()).await,
        };
        drop(cache);
        wr.write_all(b"OK\n").await?;
        match tokio::time::timeout(QUIESCE_HOLD_MAX, read_line(&mut rd)).await {
            Ok(Ok(l)) if l == "RESUME" => {
                drop(held);
                wr.write_all(b"RESUMED\n").await
            }
            // The snapshot command went away: let writes in again.
            Ok(_) => Ok(()),
            Err(_) => {
                drop(held);
                tracing::warn!("a snapshot held writes longer than {QUIESCE_HOLD_MAX:?}; letting them in again (that snapshot is refused)");
                wr.write_all(b"EXPIRED\n").await?;
                let _ = tokio::time::timeout(CONNECT_TIMEOUT, read_line(&mut rd)).await;
                Ok(())
            }
        }
    }
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(rd: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut limited = rd.take(LINE_BYTES_MAX as u64);
    limited.read_until(b'\n', &mut buf).await?;
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line missing or too long"));
    }
    buf.pop();
    String::from_utf8(buf).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

use tokio::io::AsyncReadExt;

/// The address this host reaches `peer` from (no packet is sent); loopback if unknown.
pub async fn local_ip_towards(peer: &str) -> IpAddr {
    let fallback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Ok(mut addrs) = tokio::net::lookup_host(peer).await else { return fallback };
    let Some(addr) = addrs.next() else { return fallback };
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse().expect("literal") } else { "[::]:0".parse().expect("literal") };
    let Ok(s) = tokio::net::UdpSocket::bind(bind).await else { return fallback };
    if s.connect(addr).await.is_err() {
        return fallback;
    }
    s.local_addr().map(|a| a.ip()).unwrap_or(fallback)
}

/// A writer holding its writes for a snapshot; [`Quiesced::resume`] lets them in again.
pub struct Quiesced {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    holder: String,
}

/// Ask the writer named by a lease `holder` to hold writes and write back its cache. `None`
/// if the holder has no control port (it keeps no cache: a library writer, or an
/// administrative command holding the lease).
pub async fn quiesce(holder: &str) -> Result<Option<Quiesced>, BlockError> {
    let Some((_, addr)) = holder.split_once(" ctl=") else { return Ok(None) };
    let unreachable = |e: String| BlockError::Invalid(format!("the volume's writer ({holder}) holds acknowledged writes in its cache but could not be asked to write them back: {e}; retry, or stop that server (its lease expires 10 s after it dies)"));
    let sock = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer from {addr} within {CONNECT_TIMEOUT:?}"))),
    };
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    wr.write_all(format!("QUIESCE {holder}\n").as_bytes()).await.map_err(|e| unreachable(e.to_string()))?;
    let line = match tokio::time::timeout(QUIESCE_FLUSH_MAX + CONNECT_TIMEOUT, read_line(&mut rd)).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable("no answer".into())),
    };
    match line.strip_prefix("ERR ") {
        _ if line == "OK" => Ok(Some(Quiesced { rd, wr, holder: holder.to_owned() })),
        Some(m) => Err(BlockError::Invalid(format!("the volume's writer ({holder}) refused to hold writes for the snapshot: {m}"))),
        None => Err(unreachable(format!("unexpected answer '{line}'"))),
    }
}

impl Quiesced {
    /// Let writes in again; fails if the writer had already stopped holding them.
    pub async fn resume(mut self) -> Result<(), BlockError> {
        let _ = self.wr.write_all(b"RESUME\n").await;
        let line = tokio::time::timeout(CONNECT_TIMEOUT, read_line(&mut self.rd)).await;
        match line {
            Ok(Ok(l)) if l == "RESUMED" => Ok(()),
            Ok(Ok(l)) if l == "EXPIRED" => Err(BlockError::Invalid(format!(
                "the volume's writer ({}) stopped holding writes after {QUIESCE_HOLD_MAX:?}, before the snapshot's epoch was settled; retry the snapshot",
                self.holder
            ))),
            other => Err(BlockError::Invalid(format!("the volume's writer ({}) did not confirm it held writes until the snapshot's epoch was settled ({other:?}); retry the snapshot", self.holder))),
        }
    }
}
