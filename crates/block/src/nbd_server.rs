//! Accepting NBD connections on TCP or a Unix socket, and running each through negotiation
//! and transmission. Connections are independent: one that misbehaves ends alone.

use crate::block_device::Exports;
use crate::nbd_handshake::{negotiate, HandshakeError, Negotiated};
use crate::nbd_transmission::transmit;
use crate::NbdLimits;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Serve one connection to its end. Errors are the client's and are only logged.
pub async fn serve_connection<S>(mut stream: S, exports: Arc<dyn Exports>, limits: NbdLimits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated = match tokio::time::timeout(limits.handshake_timeout, negotiate(&mut stream, &*exports, &limits)).await {
        Ok(Ok(n)) => n,
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(error = %e, "NBD client left during negotiation");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "NBD negotiation failed");
            return;
        }
        Err(_) => {
            tracing::warn!("NBD negotiation timed out after {:?}", limits.handshake_timeout);
            return;
        }
    };
    let Negotiated::Go { device, name, min_block_bytes } = negotiated else { return };
    let (rd, wr) = tokio::io::split(stream);
    let (end, stats) = transmit(rd, wr, device, min_block_bytes, &limits).await;
    tracing::info!(export = %name, ?end, requests = stats.requests, errors = stats.errors, "NBD connection ended");
}

/// Accept TCP connections forever; at most `connections_max` at once.
pub async fn serve_tcp(listener: tokio::net::TcpListener, exports: Arc<dyn Exports>, limits: NbdLimits) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: keep serving.
                tracing::warn!(error = %e, "accepting an NBD connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refusing NBD connection: {} already open", limits.connections_max);
            continue;
        };
        let (exports, limits) = (exports.clone(), limits.clone());
        tokio::spawn(async move {
            serve_connection(sock, exports, limits).await;
            drop(slot);
        });
    }
}

/// Accept Unix-socket connections, as [`serve_tcp`].
pub async fn serve_unix(listener: tokio::net::UnixListener, exports: Arc<dyn Exports>, limits: NbdLimits) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an NBD connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("refusing NBD connection: {} already open", limits.connections_max);
            continue;
        };
        let (exports, limits) = (exports.clone(), limits.clone());
        tokio::spawn(async move {
            serve_connection(sock, exports, limits).await;
            drop(slot);
        });
    }
}
