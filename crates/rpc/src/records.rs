//! The payload of `EngineReq::Import` requests and `EngineResp::Exported` answers: a list of
//! stored records, in exactly postcard's encoding of `Vec<ImportRecord>` (a varint count, then
//! per record a bool, a varint length and the key, a varint length and the value).
//!
//! Written with one allocation of the exact size, and read without copying: each key and value
//! is a slice of the received payload (`Bytes`), so a 16 MiB page of extents reaches the object
//! store's extent files without the two copies and page-faulting allocations a serde decode into
//! `Vec<u8>`s costs (a third of the engines' CPU during rebuild by perf).
//!
//! A writer may put a value's bytes on a block boundary of the list (`Writer::record_aligned`),
//! so that the sender reads an extent from disk straight into the message and the receiver
//! writes it to disk from where it arrived (both with `O_DIRECT`, which needs aligned memory):
//! it inserts a **padding record** before it, a punch with an empty key (a real punch row
//! always has a key), which `decode` skips.

use bytes::Bytes;

/// One record as it travels: a punch-index row or a value row, key and value as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSlice {
    pub punch: bool,
    pub key: Bytes,
    pub value: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("record list truncated at byte {at} of {len}")]
    Truncated { at: usize, len: usize },
    #[error("record list: bad varint at byte {at}")]
    Varint { at: usize },
    #[error("record list: bad bool {value} at byte {at}")]
    Bool { at: usize, value: u8 },
    #[error("record list: {extra} bytes after the last record")]
    Trailing { extra: usize },
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes `encode` writes for these records.
pub fn encoded_len<'a>(records: impl Iterator<Item = (bool, &'a [u8], &'a [u8])>) -> usize {
    let mut count = 0u64;
    let mut n = 0;
    for (_, k, v) in records {
        count += 1;
        n += 1 + varint_len(k.len() as u64) + k.len() + varint_len(v.len() as u64) + v.len();
    }
    n + varint_len(count)
}

/// Encode `(punch, key, value)` records (the iterator is walked twice: size, then bytes).
pub fn encode<'a, I>(records: I) -> Vec<u8>
where
    I: Iterator<Item = (bool, &'a [u8], &'a [u8])> + Clone,
{
    let mut out = Vec::with_capacity(encoded_len(records.clone()));
    put_varint(&mut out, records.clone().count() as u64);
    for (punch, k, v) in records {
        out.push(punch as u8);
        put_varint(&mut out, k.len() as u64);
        out.extend_from_slice(k);
        put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(v);
    }
    out
}

/// Bytes `Writer` keeps for the record count: a varint padded to its longest form, so the count
/// can be filled in once the records are written (decoders of varints, postcard's included,
/// read the padded form as the same number).
const COUNT_SLOT: usize = 10;

/// Writes a record list in place, a record at a time, its values appended by the caller
/// straight into the buffer (the object store reads extents into it): no per-record buffer.
pub struct Writer {
    buf: Vec<u8>,
    /// Where the list starts in `buf` (`with_aligned_buffer`).
    start: usize,
    count: u64,
    padding: u64,
}

/// The boundary `Writer::record_aligned` puts values on: the block size of direct I/O.
pub const VALUE_ALIGN: usize = 4096;

/// Bytes of a padding record holding `n` bytes: a punch flag, an empty key and `n` as a
/// two-byte varint (non-canonical below 128, which decoders read as the same number), so
/// every size from 4 to `VALUE_ALIGN + 3` can be made.
const fn padding_bytes(n: usize) -> usize {
    4 + n
}

impl Writer {
    pub fn with_capacity(bytes: usize) -> Writer {
        let mut buf = Vec::with_capacity(COUNT_SLOT + bytes);
        buf.extend_from_slice(&[0u8; COUNT_SLOT]);
        Writer { buf, start: 0, count: 0, padding: 0 }
    }

    /// A writer that fills `buf` (emptied first), keeping its capacity: a caller that reuses
    /// its buffers spares the kernel from zeroing fresh pages for every message.
    pub fn with_buffer(mut buf: Vec<u8>) -> Writer {
        buf.clear();
        buf.extend_from_slice(&[0u8; COUNT_SLOT]);
        Writer { buf, start: 0, count: 0, padding: 0 }
    }

    /// [`Writer::with_buffer`], the list starting on a `VALUE_ALIGN` boundary of memory (after
    /// up to `VALUE_ALIGN - 1` unused bytes: `finish_at` says where), so that values placed by
    /// `record_aligned` lie on block boundaries both here and at a receiver that puts the list
    /// on such a boundary (the RPC layer does for large payloads).
    pub fn with_aligned_buffer(mut buf: Vec<u8>) -> Writer {
        buf.clear();
        let start = buf.as_ptr().align_offset(VALUE_ALIGN).min(buf.capacity());
        buf.resize(start, 0);
        buf.extend_from_slice(&[0u8; COUNT_SLOT]);
        Writer { buf, start, count: 0, padding: 0 }
    }

    /// Bytes of the list written so far, padding included.
    pub fn written_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Frame one record and return the buffer its `value_len` value bytes must be appended to.
    pub fn record(&mut self, punch: bool, key: &[u8], value_len: usize) -> &mut Vec<u8> {
        self.count += 1;
        self.buf.push(punch as u8);
        put_varint(&mut self.buf, key.len() as u64);
        self.buf.extend_from_slice(key);
        put_varint(&mut self.buf, value_len as u64);
        &mut self.buf
    }

    /// [`Writer::record`] of a value whose byte `at` (e.g. past a header of its own) is to lie on
    /// a `VALUE_ALIGN` boundary of the list: a padding record goes first when needed.
    pub fn record_aligned(&mut self, punch: bool, key: &[u8], value_len: usize, at: usize) -> &mut Vec<u8> {
        let framing = 1 + varint_len(key.len() as u64) + key.len() + varint_len(value_len as u64);
        let mut need = (VALUE_ALIGN - (self.written_bytes() + framing + at) % VALUE_ALIGN) % VALUE_ALIGN;
        if need != 0 {
            if need < padding_bytes(0) {
                need += VALUE_ALIGN;
            }
            let n = need - padding_bytes(0);
            debug_assert!(n < 1 << 14);
            self.padding += 1;
            self.buf.extend_from_slice(&[1, 0, (n as u8 & 0x7f) | 0x80, (n >> 7) as u8]);
            self.buf.resize(self.buf.len() + n, 0);
        }
        self.record(punch, key, value_len)
    }

    /// Records written (padding records not counted).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The list: the count filled in.
    pub fn finish(self) -> Vec<u8> {
        let (buf, start) = self.finish_at();
        assert_eq!(start, 0, "a list written from an aligned start is read with finish_at");
        buf
    }

    /// The buffer and where the list starts in it (0 but after `with_aligned_buffer`).
    pub fn finish_at(mut self) -> (Vec<u8>, usize) {
        let v = self.count + self.padding;
        for (i, b) in self.buf[self.start..self.start + COUNT_SLOT].iter_mut().enumerate() {
            let bits = ((v >> (7 * i)) & 0x7f) as u8;
            *b = if i + 1 < COUNT_SLOT { bits | 0x80 } else { bits };
        }
        (self.buf, self.start)
    }
}

struct Reader<'a> {
    buf: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, RecordsError> {
        let b = *self.buf.get(self.at).ok_or(RecordsError::Truncated { at: self.at, len: self.buf.len() })?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, RecordsError> {
        let start = self.at;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RecordsError::Varint { at: start })
    }

    fn slice(&mut self) -> Result<Bytes, RecordsError> {
        let n = self.varint()?;
        let end = usize::try_from(n).ok().and_then(|n| self.at.checked_add(n)).filter(|e| *e <= self.buf.len()).ok_or(RecordsError::Truncated { at: self.at, len: self.buf.len() })?;
        let s = self.buf.slice(self.at..end);
        self.at = end;
        Ok(s)
    }
}

/// Decode a record list; keys and values are slices of `payload` (no copy). Padding records
/// (see the module doc) are skipped.
pub fn decode(payload: &Bytes) -> Result<Vec<RecordSlice>, RecordsError> {
    let mut r = Reader { buf: payload, at: 0 };
    let count = r.varint()?;
    // Each record takes at least three bytes: a count beyond that is a lie, not an allocation.
    let mut out = Vec::with_capacity((count as usize).min(payload.len() / 3));
    for _ in 0..count {
        let at = r.at;
        let punch = match r.byte()? {
            0 => false,
            1 => true,
            value => return Err(RecordsError::Bool { at, value }),
        };
        let key = r.slice()?;
        let value = r.slice()?;
        if punch && key.is_empty() {
            continue;
        }
        out.push(RecordSlice { punch, key, value });
    }
    if r.at != payload.len() {
        return Err(RecordsError::Trailing { extra: payload.len() - r.at });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_msg::ImportRecord;

    #[test]
    fn same_bytes_as_postcard_and_decoded_as_slices() {
        let recs = vec![
            ImportRecord { punch: false, key: b"k1".to_vec(), value: vec![7u8; 300] },
            ImportRecord { punch: true, key: vec![1u8; 200], value: vec![] },
            ImportRecord { punch: false, key: vec![], value: vec![9u8; 70_000] },
        ];
        let ours = encode(recs.iter().map(|r| (r.punch, &r.key[..], &r.value[..])));
        assert_eq!(ours, postcard::to_allocvec(&recs).unwrap(), "not postcard's encoding");
        assert_eq!(ours.len(), encoded_len(recs.iter().map(|r| (r.punch, &r.key[..], &r.value[..]))));
        let payload = Bytes::from(ours);
        let back = decode(&payload).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in recs.iter().zip(&back) {
            assert_eq!((a.punch, &a.key[..], &a.value[..]), (b.punch, &b.key[..], &b.value[..]));
        }
        // Slices of the payload, not copies.
        let base = payload.as_ptr() as usize;
        assert!((back[2].value.as_ptr() as usize) >= base && (back[2].value.as_ptr() as usize) < base + payload.len());
        assert_eq!(decode(&Bytes::from(encode(std::iter::empty()))).unwrap(), vec![]);
    }

    #[test]
    fn a_list_written_in_place_decodes_here_and_in_postcard() {
        let recs = vec![
            ImportRecord { punch: false, key: b"k1".to_vec(), value: vec![7u8; 300] },
            ImportRecord { punch: true, key: vec![1u8; 200], value: vec![] },
        ];
        let mut w = Writer::with_capacity(1000);
        for r in &recs {
            let len = r.value.len();
            let buf = w.record(r.punch, &r.key, len);
            buf.extend_from_slice(&r.value);
        }
        assert_eq!(w.count(), 2);
        let bytes = w.finish();
        let back = decode(&Bytes::from(bytes.clone())).unwrap();
        assert_eq!(back.iter().map(|r| (r.punch, r.key.to_vec(), r.value.to_vec())).collect::<Vec<_>>(), recs.iter().map(|r| (r.punch, r.key.clone(), r.value.clone())).collect::<Vec<_>>());
        let pc: Vec<ImportRecord> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(pc.len(), 2);
        assert_eq!(decode(&Bytes::from(Writer::with_capacity(0).finish())).unwrap(), vec![]);
    }

    /// Values written with `record_aligned` start their aligned part on a block boundary of the
    /// list, and the list decodes to the records alone (padding skipped), whatever came before.
    #[test]
    fn aligned_values_land_on_block_boundaries_and_padding_is_not_a_record() {
        for small in [0usize, 1, 100, 4000, 4093, 4095, 5000] {
            let mut w = Writer::with_aligned_buffer(Vec::with_capacity(64 << 10));
            let b = w.record(false, b"small", small);
            b.resize(b.len() + small, 3);
            let mut aligned_at = Vec::new();
            for (i, header) in [(0usize, 0usize), (1, 16), (2, 7)] {
                let key = vec![i as u8 + 1; 10 + i * 60];
                let len = header + 8192;
                let buf = w.record_aligned(false, &key, len, header);
                aligned_at.push(buf.len() + header);
                buf.resize(buf.len() + len, i as u8);
            }
            w.record(true, b"punch", 0);
            let (buf, start) = w.finish_at();
            assert_eq!((buf.as_ptr() as usize + start) % VALUE_ALIGN, 0, "the list does not start aligned");
            for at in &aligned_at {
                assert_eq!((at - start) % VALUE_ALIGN, 0, "a value's aligned part is off a boundary of the list (after {small} bytes)");
            }
            let back = decode(&Bytes::copy_from_slice(&buf[start..])).unwrap();
            let keys: Vec<Vec<u8>> = back.iter().map(|r| r.key.to_vec()).collect();
            assert_eq!(keys, vec![b"small".to_vec(), vec![1; 10], vec![2; 70], vec![3; 130], b"punch".to_vec()]);
            assert_eq!(back[2].value.len(), 16 + 8192);
            assert!(back[2].value.iter().all(|b| *b == 1));
        }
    }

    #[test]
    fn damaged_lists_are_refused_not_misread() {
        let recs = [ImportRecord { punch: false, key: b"key".to_vec(), value: vec![1u8; 1000] }];
        let good = encode(recs.iter().map(|r| (r.punch, &r.key[..], &r.value[..])));
        for cut in 0..good.len() {
            assert!(decode(&Bytes::copy_from_slice(&good[..cut])).is_err(), "a list cut at {cut} decoded");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(decode(&Bytes::from(extra)), Err(RecordsError::Trailing { extra: 1 }));
        let mut bad_bool = good.clone();
        bad_bool[1] = 2;
        assert!(matches!(decode(&Bytes::from(bad_bool)), Err(RecordsError::Bool { value: 2, .. })));
        // A count claiming more records than the bytes hold fails without a huge allocation.
        let mut liar = vec![0xff; 9];
        liar.push(0x01);
        assert!(decode(&Bytes::from(liar)).is_err());
    }
}
