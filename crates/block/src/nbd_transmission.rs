//! The NBD transmission phase: one reader parses requests and starts each as its own task
//! (bounded by an in-flight byte budget, which also bounds the request count); one writer task
//! sends the replies in completion order. Bad requests get the protocol's errno and the
//! connection keeps serving; only a broken stream (bad magic, EOF mid-request) ends it, after
//! every started request has finished.

use crate::block_device::{BlockDevice, DevError};
use crate::nbd_wire::*;
use crate::NbdLimits;
use bytes::Bytes;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

/// Bytes per in-flight budget unit; every request costs one unit plus its payload.
const INFLIGHT_UNIT_BYTES: u64 = 64 << 10;

/// Why transmission ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransmissionEnd {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection (between requests or in the middle of one).
    Closed,
    /// A request header with a bad magic: the stream cannot be resynchronised.
    BadMagic,
}

/// Counters of one connection, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnStats {
    pub requests: u64,
    pub errors: u64,
}

type Reply = ([u8; 16], Option<Vec<u8>>);

enum Check {
    Ok,
    /// Reply this errno (any payload has been consumed).
    Err(u32),
}

fn check_range(dev: &dyn BlockDevice, offset: u64, len: u64, past_end: u32, align: Option<u32>) -> Check {
    if offset.checked_add(len).is_none_or(|end| end > dev.size_bytes()) {
        return Check::Err(past_end);
    }
    if let Some(a) = align {
        if !offset.is_multiple_of(a as u64) || !len.is_multiple_of(a as u64) {
            return Check::Err(EINVAL);
        }
    }
    Check::Ok
}

/// Serve requests until the client disconnects. `align`: the minimum block size the client
/// agreed to, if it asked for block size constraints.
pub async fn transmit<R, W>(mut rd: R, wr: W, dev: Arc<dyn BlockDevice>, align: Option<u32>, limits: &NbdLimits) -> (TransmissionEnd, ConnStats)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let units_total = (limits.inflight_bytes_max / INFLIGHT_UNIT_BYTES).max(1 + limits.payload_bytes_max as u64 / INFLIGHT_UNIT_BYTES) as u32;
    let budget = Arc::new(Semaphore::new(units_total as usize));
    let (tx, mut rx) = mpsc::channel::<Reply>(units_total as usize);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, wr);
        while let Some((head, data)) = rx.recv().await {
            let mut r = w.write_all(&head).await;
            if let (Ok(()), Some(d)) = (&r, &data) {
                r = w.write_all(d).await;
            }
            // Flush when no other reply is waiting, so replies batch under load.
            if r.is_ok() && rx.is_empty() {
                r = w.flush().await;
            }
            if r.is_err() {
                // The client is gone; keep draining so request tasks never block.
                while rx.recv().await.is_some() {}
                return;
            }
        }
        let _ = w.flush().await;
    });
    let pool = crate::payload_pool::shared();
    let mut stats = ConnStats::default();
    let ro = dev.read_only();
    let end = loop {
        let mut head = [0u8; REQUEST_BYTES];
        if rd.read_exact(&mut head).await.is_err() {
            break TransmissionEnd::Closed;
        }
        let Some(req) = Request::parse(&head) else {
            tracing::warn!("NBD request with a bad magic; closing the connection");
            break TransmissionEnd::BadMagic;
        };
        stats.requests += 1;
        let len = req.len as u64;
        let known_flags = CMD_FLAG_FUA | if req.kind == CMD_WRITE_ZEROES { CMD_FLAG_NO_HOLE } else { 0 };
        let mut payload: Option<Bytes> = None;
        let check = match req.kind {
            CMD_WRITE => {
                if req.len > limits.payload_bytes_max {
                    // Consume the payload to stay in sync; bounded by a u32 length.
                    if discard(&mut rd, len).await.is_err() {
                        break TransmissionEnd::Closed;
                    }
                    Check::Err(EOVERFLOW)
                } else {
                    // Read into spare capacity of a recycled buffer: zeroing a buffer about to
                    // be overwritten, or faulting in fresh pages for it, was a visible share
                    // of the server's CPU under large writes.
                    let mut buf = pool.take(req.len as usize);
                    let mut part = (&mut rd).take(len);
                    let complete = loop {
                        if buf.len() == req.len as usize {
                            break true;
                        }
                        match part.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => break false,
                            Ok(_) => {}
                        }
                    };
                    if !complete {
                        // Disconnected mid-request: nothing of it was acknowledged.
                        break TransmissionEnd::Closed;
                    }
                    payload = Some(pool.share(buf));
                    if ro {
                        Check::Err(EPERM)
                    } else {
                        check_range(&*dev, req.offset, len, ENOSPC, align)
                    }
                }
            }
            CMD_READ if req.len > limits.payload_bytes_max => Check::Err(EOVERFLOW),
            CMD_READ => check_range(&*dev, req.offset, len, EINVAL, align),
            CMD_FLUSH => Check::Ok,
            CMD_TRIM | CMD_WRITE_ZEROES if ro => Check::Err(EPERM),
            CMD_TRIM | CMD_WRITE_ZEROES => check_range(&*dev, req.offset, len, ENOSPC, align),
            CMD_DISC => break TransmissionEnd::Disconnect,
            other => {
                tracing::debug!(command = other, "unknown NBD command");
                Check::Err(EINVAL)
            }
        };
        let check = match check {
            Check::Ok if req.flags & !known_flags != 0 => Check::Err(EINVAL),
            c => c,
        };
        if let Check::Err(errno) = check {
            stats.errors += 1;
            if tx.send((simple_reply(errno, req.cookie), None)).await.is_err() {
                break TransmissionEnd::Closed;
            }
            continue;
        }
        let cost = 1 + if matches!(req.kind, CMD_READ | CMD_WRITE) { len / INFLIGHT_UNIT_BYTES } else { 0 };
        let Ok(permit) = budget.clone().acquire_many_owned(cost as u32).await else { break TransmissionEnd::Closed };
        let (dev, tx) = (dev.clone(), tx.clone());
        let fua = req.flags & CMD_FLAG_FUA != 0;
        tokio::spawn(async move {
            let r: Result<Option<Vec<u8>>, DevError> = match req.kind {
                CMD_READ => dev.read(req.offset, req.len).await.map(Some),
                CMD_WRITE => dev.write(req.offset, payload.unwrap_or_default(), fua).await.map(|()| None),
                CMD_FLUSH => dev.flush().await.map(|()| None),
                CMD_TRIM => dev.trim(req.offset, len, fua).await.map(|()| None),
                CMD_WRITE_ZEROES => dev.write_zeroes(req.offset, len, req.flags & CMD_FLAG_NO_HOLE != 0, fua).await.map(|()| None),
                _ => unreachable!("only checked commands are started"),
            };
            let reply = match r {
                Ok(data) => (simple_reply(0, req.cookie), data),
                Err(e) => {
                    tracing::warn!(command = command_name(req.kind), offset = req.offset, len = req.len, error = %e, "NBD request failed");
                    (simple_reply(e.errno(), req.cookie), None)
                }
            };
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    // Every started request finishes (and is answered if the client still listens) before the
    // connection closes: the whole budget is free only when no request holds a part of it.
    let _ = budget.acquire_many(units_total).await;
    // Write back what this connection's writes left in a cache, whether the client said
    // goodbye or vanished: nothing it was told is written should wait on another client.
    if !ro {
        if let Err(e) = dev.flush().await {
            tracing::warn!(error = %e, "writing back cached writes at disconnect failed");
        }
    }
    drop(tx);
    let _ = writer.await;
    (end, stats)
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        rd.read_exact(&mut buf[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}
