//! The wire frame: a fixed 32-byte header, a postcard-encoded message header, raw payload.
//!
//! ```text
//! magic u32 "STRA" | version u8 | kind u8 | flags u16 | request id u64 | timeout ms u32 |
//! header len u32 | payload len u32 | crc32c u32 (of the 28 bytes before it + message header)
//! ```
//! All integers little-endian. The payload (bulk data) is not covered by the frame crc: the
//! object store checksums data end to end itself, and hashing it twice would cost bandwidth.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: u32 = 0x5354_5241;
pub const FRAME_VERSION: u8 = 1;
pub const FIXED_BYTES: usize = 32;
/// Largest postcard message header.
pub const HEADER_BYTES_MAX: usize = 1 << 20;
/// Largest payload: a 64 MiB fetch plus slack for batch framing.
pub const PAYLOAD_BYTES_MAX: usize = (64 << 20) + (1 << 20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    HelloAck = 2,
    Request = 3,
    Response = 4,
    Error = 5,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloAck,
            3 => FrameKind::Request,
            4 => FrameKind::Response,
            5 => FrameKind::Error,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: FrameKind,
    pub request_id: u64,
    pub timeout_ms: u32,
    pub header: Bytes,
    pub payload: Bytes,
}

/// The fixed part, decoded and validated, before the variable parts are read.
#[derive(Clone, Copy, Debug)]
pub struct FixedHeader {
    pub kind: FrameKind,
    pub request_id: u64,
    pub timeout_ms: u32,
    pub header_len: usize,
    pub payload_len: usize,
    pub crc: u32,
    raw_crc_input: [u8; 28],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}: not a Strata peer")]
    Magic(u32),
    #[error("frame version {0} is not supported (this build speaks {FRAME_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("message header of {0} bytes exceeds the limit of {HEADER_BYTES_MAX}")]
    HeaderTooLarge(usize),
    #[error("payload of {0} bytes exceeds the limit of {PAYLOAD_BYTES_MAX}")]
    PayloadTooLarge(usize),
    #[error("frame checksum mismatch")]
    Checksum,
}

pub fn decode_fixed(b: &[u8; FIXED_BYTES]) -> Result<FixedHeader, FrameError> {
    let mut r = &b[..];
    let magic = r.get_u32_le();
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let version = r.get_u8();
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind_raw = r.get_u8();
    let kind = FrameKind::from_u8(kind_raw).ok_or(FrameError::Kind(kind_raw))?;
    let _flags = r.get_u16_le();
    let request_id = r.get_u64_le();
    let timeout_ms = r.get_u32_le();
    let header_len = r.get_u32_le() as usize;
    let payload_len = r.get_u32_le() as usize;
    let crc = r.get_u32_le();
    if header_len > HEADER_BYTES_MAX {
        return Err(FrameError::HeaderTooLarge(header_len));
    }
    if payload_len > PAYLOAD_BYTES_MAX {
        return Err(FrameError::PayloadTooLarge(payload_len));
    }
    let mut raw_crc_input = [0u8; 28];
    raw_crc_input.copy_from_slice(&b[..28]);
    Ok(FixedHeader { kind, request_id, timeout_ms, header_len, payload_len, crc, raw_crc_input })
}

pub fn verify(fixed: &FixedHeader, header: &[u8]) -> Result<(), FrameError> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed.raw_crc_input), header);
    if crc != fixed.crc {
        return Err(FrameError::Checksum);
    }
    Ok(())
}

/// Encode the fixed part and message header; the payload is written after it as is.
pub fn encode_head(kind: FrameKind, request_id: u64, timeout_ms: u32, header: &[u8], payload_len: usize) -> Bytes {
    debug_assert!(header.len() <= HEADER_BYTES_MAX && payload_len <= PAYLOAD_BYTES_MAX);
    let mut b = BytesMut::with_capacity(FIXED_BYTES + header.len());
    b.put_u32_le(MAGIC);
    b.put_u8(FRAME_VERSION);
    b.put_u8(kind as u8);
    b.put_u16_le(0);
    b.put_u64_le(request_id);
    b.put_u32_le(timeout_ms);
    b.put_u32_le(header.len() as u32);
    b.put_u32_le(payload_len as u32);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), header);
    b.put_u32_le(crc);
    b.put_slice(header);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trip_and_checks() {
        let head = encode_head(FrameKind::Request, 7, 1000, b"hdr", 5);
        let fixed: [u8; FIXED_BYTES] = head[..FIXED_BYTES].try_into().unwrap();
        let f = decode_fixed(&fixed).unwrap();
        assert_eq!((f.kind, f.request_id, f.timeout_ms, f.header_len, f.payload_len), (FrameKind::Request, 7, 1000, 3, 5));
        verify(&f, b"hdr").unwrap();
        assert_eq!(verify(&f, b"hdX"), Err(FrameError::Checksum));
        let mut bad = fixed;
        bad[0] ^= 1;
        assert!(matches!(decode_fixed(&bad), Err(FrameError::Magic(_))));
        let mut bad = fixed;
        bad[4] = 9;
        assert_eq!(decode_fixed(&bad).unwrap_err(), FrameError::Version(9));
        let mut bad = fixed;
        bad[24..28].copy_from_slice(&(PAYLOAD_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(decode_fixed(&bad), Err(FrameError::PayloadTooLarge(_))));
    }
}
