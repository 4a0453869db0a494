//! The NBD negotiation phase, fixed newstyle: the server greets, the client sends options
//! (`LIST`, `INFO`, `GO`, `EXPORT_NAME`, `ABORT`; anything else gets `ERR_UNSUP`) until one
//! starts transmission or ends the session. Every option is length-checked before parsing and
//! the number of options per session is bounded.

use crate::block_device::{BlockDevice, Exports, OpenError};
use crate::nbd_wire::*;
use crate::NbdLimits;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How negotiation ended.
pub enum Negotiated {
    /// Transmission starts on this device.
    Go {
        device: Arc<dyn BlockDevice>,
        name: String,
        /// The client asked for block size constraints, so it promised to honour them:
        /// misaligned requests get `EINVAL`. Otherwise any byte alignment is served.
        min_block_bytes: Option<u32>,
    },
    /// The client sent `NBD_OPT_ABORT` (or gave up politely).
    Aborted,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("client asked for export '{name}' with NBD_OPT_EXPORT_NAME, which cannot carry an error: {reason}")]
    ExportNameRefused { name: String, reason: String },
}

/// Transmission flags of an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

fn block_size_info(limits: &NbdLimits) -> Vec<u8> {
    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    b.extend_from_slice(&limits.min_block_bytes.to_be_bytes());
    b.extend_from_slice(&limits.preferred_block_bytes.to_be_bytes());
    b.extend_from_slice(&limits.payload_bytes_max.to_be_bytes());
    b
}

fn export_info(size: u64, flags: u16) -> Vec<u8> {
    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// Parsed `NBD_OPT_INFO` / `NBD_OPT_GO` data: export name and the info types requested.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("option data of {} bytes is shorter than the 6 the format needs", data.len()));
    }
    let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err(format!("export name length {name_len} runs past the option data"));
    }
    let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| "export name is not UTF-8".to_string())?.to_owned();
    let rest = &rest[name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    if rest.len() != 2 * n {
        return Err(format!("{n} info requests need {} bytes but {} follow", 2 * n, rest.len()));
    }
    Ok((name, rest.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&option_reply(option, kind, data)).await
}

async fn discard<S: AsyncRead + Unpin>(s: &mut S, mut len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    // Bounded: at most len / 64 KiB reads of a u32 length.
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        s.read_exact(&mut buf[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Run the negotiation phase on a fresh connection.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, exports: &dyn Exports, limits: &NbdLimits) -> Result<Negotiated, HandshakeError> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greet).await?;
    s.flush().await?;
    let cflags = s.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    for _ in 0..limits.options_max {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!("option magic {magic:#x} is not IHAVEOPT")));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > limits.option_bytes_max {
            discard(s, len as u64).await?;
            if option == OPT_EXPORT_NAME {
                return Err(HandshakeError::ExportNameRefused { name: "?".into(), reason: format!("name of {len} bytes") });
            }
            reply(s, option, REP_ERR_TOO_BIG, format!("option data of {len} bytes exceeds {} bytes", limits.option_bytes_max).as_bytes()).await?;
            s.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| HandshakeError::Protocol("export name is not UTF-8".into()))?;
                let name = resolve(exports, &name);
                let device = exports.open(&name).await.map_err(|e| HandshakeError::ExportNameRefused { name: name.clone(), reason: e.to_string() })?;
                let mut b = device.size_bytes().to_be_bytes().to_vec();
                b.extend_from_slice(&transmission_flags(device.read_only()).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                return Ok(Negotiated::Go { device, name, min_block_bytes: None });
            }
            OPT_ABORT => {
                // The client may already have closed; the acknowledgement is best effort.
                let _ = reply(s, option, REP_ACK, b"").await;
                let _ = s.flush().await;
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, option, REP_ERR_INVALID, b"NBD_OPT_LIST carries no data").await?;
                } else {
                    for (name, desc) in exports.list() {
                        let mut b = (name.len() as u32).to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        b.extend_from_slice(desc.as_bytes());
                        reply(s, option, REP_SERVER, &b).await?;
                    }
                    reply(s, option, REP_ACK, b"").await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let (name, infos) = match parse_info_request(&data) {
                    Ok(v) => v,
                    Err(e) => {
                        reply(s, option, REP_ERR_INVALID, e.as_bytes()).await?;
                        s.flush().await?;
                        continue;
                    }
                };
                let name = resolve(exports, &name);
                let (size, ro, desc, device) = if option == OPT_GO {
                    match exports.open(&name).await {
                        Ok(d) => (d.size_bytes(), d.read_only(), None, Some(d)),
                        Err(e) => {
                            reply(s, option, open_error_code(&e), e.to_string().as_bytes()).await?;
                            s.flush().await?;
                            continue;
                        }
                    }
                } else {
                    match exports.describe(&name).await {
                        Ok(d) => (d.size_bytes, d.read_only, Some(d.description), None),
                        Err(e) => {
                            reply(s, option, open_error_code(&e), e.to_string().as_bytes()).await?;
                            s.flush().await?;
                            continue;
                        }
                    }
                };
                reply(s, option, REP_INFO, &export_info(size, transmission_flags(ro))).await?;
                for t in &infos {
                    match *t {
                        INFO_NAME => {
                            let mut b = INFO_NAME.to_be_bytes().to_vec();
                            b.extend_from_slice(name.as_bytes());
                            reply(s, option, REP_INFO, &b).await?;
                        }
                        INFO_DESCRIPTION => {
                            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            b.extend_from_slice(desc.clone().unwrap_or_default().as_bytes());
                            reply(s, option, REP_INFO, &b).await?;
                        }
                        // Block sizes are always sent below; unknown types are ignored as the
                        // protocol asks.
                        _ => {}
                    }
                }
                reply(s, option, REP_INFO, &block_size_info(limits)).await?;
                reply(s, option, REP_ACK, b"").await?;
                s.flush().await?;
                if let Some(device) = device {
                    let asked = infos.contains(&INFO_BLOCK_SIZE);
                    return Ok(Negotiated::Go { device, name, min_block_bytes: asked.then_some(limits.min_block_bytes) });
                }
            }
            OPT_STARTTLS => reply(s, option, REP_ERR_UNSUP, b"TLS is not supported; connect over 127.0.0.1 or a Unix socket").await?,
            other => reply(s, option, REP_ERR_UNSUP, format!("option {other} is not supported").as_bytes()).await?,
        }
        s.flush().await?;
    }
    Err(HandshakeError::Protocol(format!("more than {} options without starting transmission", limits.options_max)))
}

fn resolve(exports: &dyn Exports, name: &str) -> String {
    if name.is_empty() {
        exports.default_name().unwrap_or_default()
    } else {
        name.to_owned()
    }
}

fn open_error_code(e: &OpenError) -> u32 {
    match e {
        OpenError::Unknown(_) => REP_ERR_UNKNOWN,
        OpenError::Policy(_) => REP_ERR_POLICY,
        OpenError::Unavailable(_) => REP_ERR_SHUTDOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_checks_every_length() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&d).unwrap(), ("vol".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]));
        // Too short, name past the end, wrong count of info requests.
        assert!(parse_info_request(&d[..5]).is_err());
        let mut long = d.clone();
        long[3] = 200;
        assert!(parse_info_request(&long).is_err());
        let mut extra = d.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        let mut empty = 0u32.to_be_bytes().to_vec();
        empty.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse_info_request(&empty).unwrap(), (String::new(), vec![]));
    }
}
