//! The stored form of one version: `fmt(1) | kind(1) | len(8, LE) | crc32c(4, LE) | payload`.
//!
//! Kinds: 0 a value (payload inline), 1 an extent punch, 2 a value in an extent file (payload:
//! the 16-byte reference, `extent_file.rs`).
//!
//! The crc covers the first ten header bytes and the payload, so a flipped bit anywhere in a
//! record (including its kind or length) is detected on read. `len` is the payload length for
//! values and the punched length for extent punches (whose payload is empty).

pub const RECORD_FORMAT_V1: u8 = 1;
pub const HEADER_BYTES: usize = 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Value = 0,
    Punch = 1,
    /// A value whose bytes live in an extent file; the payload is the reference
    /// (`extent_file::ExtentRef`), the length the value's.
    ValueRef = 2,
}

pub fn encode(kind: RecordKind, len: u64, payload: &[u8]) -> Vec<u8> {
    debug_assert!(kind != RecordKind::Value || len == payload.len() as u64);
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.push(RECORD_FORMAT_V1);
    out.push(kind as u8);
    out.extend_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header `encode(Value, len, payload)` puts before a payload whose crc32c is
/// `payload_crc`, computed without another pass over the payload (a materialized extent is read
/// straight behind it).
pub fn value_header(len: u64, payload_crc: u32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0] = RECORD_FORMAT_V1;
    h[1] = RecordKind::Value as u8;
    h[2..10].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c_combine(crc32c::crc32c(&h[..10]), payload_crc, len);
    h[10..14].copy_from_slice(&crc.to_le_bytes());
    h
}

/// CRC-32C (reflected) polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `a * b mod P` over GF(2), both in the reflected representation (bit 31 is x^0).
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `X2N[k]` = x^(2^k) mod P.
const X2N: [u32; 64] = {
    let mut t = [0u32; 64];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 64 {
        t[k] = p;
        p = mul_mod_p(p, p);
        k += 1;
    }
    t
};

/// The crc32c of `A ++ B` from crc32c(A), crc32c(B) and B's length: crc1 times x^(8 len2)
/// mod P, plus crc2 (zlib's `crc32_combine_op` method). A few multiplications per set bit of
/// the length; the crate's own combine squares 32x32 matrices per bit instead (~0.1 ms for a
/// 1 MiB length, which showed as 3% of an engine moving 1 MiB extents).
pub(crate) fn crc32c_combine(crc1: u32, crc2: u32, len2: u64) -> u32 {
    let (mut n, mut k, mut x) = (len2, 3usize, 1u32 << 31);
    while n != 0 {
        if n & 1 != 0 {
            x = mul_mod_p(X2N[k & 63], x);
        }
        n >>= 1;
        k += 1;
    }
    mul_mod_p(x, crc1) ^ crc2
}

/// A decoded, checksum-verified record borrowing its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub len: u64,
    pub payload: &'a [u8],
}

/// Why a stored record could not be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordDefect {
    Truncated,
    UnknownFormat(u8),
    UnknownKind(u8),
    ChecksumMismatch { stored: u32, computed: u32 },
    LengthMismatch,
}

impl std::fmt::Display for RecordDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordDefect::Truncated => write!(f, "record shorter than its header"),
            RecordDefect::UnknownFormat(v) => write!(f, "unknown record format {v}"),
            RecordDefect::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            RecordDefect::ChecksumMismatch { stored, computed } => {
                write!(f, "crc32c mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            RecordDefect::LengthMismatch => write!(f, "length field disagrees with payload"),
        }
    }
}

pub fn decode(bytes: &[u8]) -> Result<Record<'_>, RecordDefect> {
    decode_checked(bytes, false).map(|(r, _)| r)
}

/// [`decode`], also returning the crc32c of the payload alone, from the same single pass over
/// it: an imported value written to an extent file needs it for its reference, and hashing a
/// megabyte twice was a tenth of a rebuild's CPU.
pub fn decode_with_payload_crc(bytes: &[u8]) -> Result<(Record<'_>, u32), RecordDefect> {
    decode_checked(bytes, true)
}

/// With `payload_crc`, the payload is hashed alone and combined with the header's crc (a few
/// GF(2) multiplications, worth it for large payloads only); otherwise hashed after the header
/// and the payload crc returned is 0.
fn decode_checked(bytes: &[u8], payload_crc: bool) -> Result<(Record<'_>, u32), RecordDefect> {
    if bytes.len() < HEADER_BYTES {
        return Err(RecordDefect::Truncated);
    }
    if bytes[0] != RECORD_FORMAT_V1 {
        return Err(RecordDefect::UnknownFormat(bytes[0]));
    }
    let len = u64::from_le_bytes(bytes[2..10].try_into().map_err(|_| RecordDefect::Truncated)?);
    let stored = u32::from_le_bytes(bytes[10..14].try_into().map_err(|_| RecordDefect::Truncated)?);
    let payload = &bytes[HEADER_BYTES..];
    let (computed, payload_crc) = if payload_crc {
        let c = crc32c::crc32c(payload);
        (crc32c_combine(crc32c::crc32c(&bytes[..10]), c, payload.len() as u64), c)
    } else {
        (crc32c::crc32c_append(crc32c::crc32c(&bytes[..10]), payload), 0)
    };
    if stored != computed {
        return Err(RecordDefect::ChecksumMismatch { stored, computed });
    }
    let kind = match bytes[1] {
        0 => RecordKind::Value,
        1 => RecordKind::Punch,
        2 => RecordKind::ValueRef,
        k => return Err(RecordDefect::UnknownKind(k)),
    };
    if (kind == RecordKind::Value && len != payload.len() as u64) || (kind == RecordKind::ValueRef && payload.len() != crate::extent_file::REF_BYTES) {
        return Err(RecordDefect::LengthMismatch);
    }
    Ok((Record { kind, len, payload }, payload_crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let rec = encode(RecordKind::Value, 5, b"hello");
        assert_eq!(decode(&rec).unwrap(), Record { kind: RecordKind::Value, len: 5, payload: b"hello" });
        for i in 0..rec.len() {
            for bit in 0..8 {
                let mut bad = rec.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad).is_err(), "flip of byte {i} bit {bit} went unnoticed");
            }
        }
        assert_eq!(decode(&rec[..5]), Err(RecordDefect::Truncated));
        let payload = vec![0x5au8; 70_000];
        assert_eq!([&value_header(70_000, crc32c::crc32c(&payload))[..], &payload].concat(), encode(RecordKind::Value, 70_000, &payload));
        let punch = encode(RecordKind::Punch, 4096, b"");
        assert_eq!(decode(&punch).unwrap().len, 4096);
        assert_eq!(decode_with_payload_crc(&rec).unwrap().1, crc32c::crc32c(b"hello"));
    }

    #[test]
    fn combine_agrees_with_hashing_the_concatenation() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for split in [0, 1, 7, 10, 4096, 65_536, 99_999, 262_144, 299_999, 300_000] {
            let (a, b) = bytes.split_at(split);
            let whole = crc32c::crc32c(&bytes);
            assert_eq!(crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64), whole, "split at {split}");
        }
        assert_eq!(crc32c_combine(0x1234_5678, 0x9abc_def0, 1 << 20), crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, 1 << 20));
    }
}
