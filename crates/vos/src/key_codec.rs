//! Order-preserving key encoding for the record index.
//!
//! `cont(16) | oid(16) | esc(dkey) | esc(akey) | kind(1) | [offset(8)] | !epoch(8)`
//!
//! `esc` escapes 0x00 as 0x00 0xFF and terminates with 0x00 0x01, so that byte-wise order of
//! encoded keys is the byte-wise order of the raw dkeys/akeys (KV range scans rely on it) and no
//! encoded key is a prefix of another. Epochs are stored inverted, so the newest version of a
//! value sorts first and "newest at or below E" is the first row at or after `!E`.

use strata_types::{ContId, Epoch, Oid};

pub const KIND_SINGLE: u8 = b'S';
pub const KIND_EXTENT: u8 = b'E';

pub fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == 0 {
            out.extend_from_slice(&[0, 0xff]);
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Decode one escaped field from the front of `input`; returns the field and the rest.
pub fn take_escaped(input: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        match *input.get(i)? {
            0 => match *input.get(i + 1)? {
                0xff => {
                    out.push(0);
                    i += 2;
                }
                1 => return Some((out, &input[i + 2..])),
                _ => return None,
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
}

pub fn object_prefix(cont: ContId, oid: Oid) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(cont.as_bytes());
    k.extend_from_slice(&oid.to_bytes());
    k
}

pub fn dkey_prefix(cont: ContId, oid: Oid, dkey: &[u8]) -> Vec<u8> {
    let mut k = object_prefix(cont, oid);
    push_escaped(&mut k, dkey);
    k
}

pub fn akey_prefix(cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8]) -> Vec<u8> {
    let mut k = dkey_prefix(cont, oid, dkey);
    push_escaped(&mut k, akey);
    k
}

pub fn single_key(akey_prefix: &[u8], epoch: Epoch) -> Vec<u8> {
    let mut k = Vec::with_capacity(akey_prefix.len() + 9);
    k.extend_from_slice(akey_prefix);
    k.push(KIND_SINGLE);
    k.extend_from_slice(&(!epoch.0).to_be_bytes());
    k
}

pub fn extent_key(akey_prefix: &[u8], offset: u64, epoch: Epoch) -> Vec<u8> {
    let mut k = Vec::with_capacity(akey_prefix.len() + 17);
    k.extend_from_slice(akey_prefix);
    k.push(KIND_EXTENT);
    k.extend_from_slice(&offset.to_be_bytes());
    k.extend_from_slice(&(!epoch.0).to_be_bytes());
    k
}

/// The smallest key greater than every key that starts with `prefix`.
pub fn prefix_successor(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last < 0xff {
            k.push(last + 1);
            return k;
        }
    }
    // All 0xff: no successor; callers bound with an unbounded range instead.
    vec![0xff; prefix.len() + 1]
}

/// A fully decoded record key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordKey {
    pub cont: ContId,
    pub oid: Oid,
    pub dkey: Vec<u8>,
    pub akey: Vec<u8>,
    /// `None` for a single value, `Some(offset)` for an extent.
    pub offset: Option<u64>,
    pub epoch: Epoch,
}

pub fn decode_record_key(k: &[u8]) -> Option<RecordKey> {
    if k.len() < 32 {
        return None;
    }
    let cont = ContId(uuid_from(&k[..16])?);
    let oid = Oid::from_bytes(k[16..32].try_into().ok()?);
    let (dkey, rest) = take_escaped(&k[32..])?;
    let (akey, rest) = take_escaped(rest)?;
    let (&kind, rest) = rest.split_first()?;
    let (offset, rest) = match kind {
        KIND_SINGLE => (None, rest),
        KIND_EXTENT if rest.len() >= 8 => (Some(u64::from_be_bytes(rest[..8].try_into().ok()?)), &rest[8..]),
        _ => return None,
    };
    if rest.len() != 8 {
        return None;
    }
    let epoch = Epoch(!u64::from_be_bytes(rest.try_into().ok()?));
    Some(RecordKey { cont, oid, dkey, akey, offset, epoch })
}

pub fn encode_record_key(r: &RecordKey) -> Vec<u8> {
    let p = akey_prefix(r.cont, r.oid, &r.dkey, &r.akey);
    match r.offset {
        None => single_key(&p, r.epoch),
        Some(off) => extent_key(&p, off, r.epoch),
    }
}

fn uuid_from(b: &[u8]) -> Option<uuid::Uuid> {
    uuid::Uuid::from_slice(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn escaped_order_matches_raw_order(a in proptest::collection::vec(any::<u8>(), 0..12), b in proptest::collection::vec(any::<u8>(), 0..12)) {
            let (mut ea, mut eb) = (Vec::new(), Vec::new());
            push_escaped(&mut ea, &a);
            push_escaped(&mut eb, &b);
            prop_assert_eq!(a.cmp(&b), ea.cmp(&eb));
            prop_assert_eq!(take_escaped(&ea).unwrap().0, a);
        }
        #[test]
        fn record_keys_round_trip(d in proptest::collection::vec(any::<u8>(), 0..8), a in proptest::collection::vec(any::<u8>(), 0..8), off in proptest::option::of(any::<u64>()), e in any::<u64>()) {
            let r = RecordKey { cont: ContId::new_random(), oid: Oid::from_u128(12345), dkey: d, akey: a, offset: off, epoch: Epoch(e) };
            prop_assert_eq!(decode_record_key(&encode_record_key(&r)).unwrap(), r);
        }
    }

    #[test]
    fn newer_versions_sort_first() {
        let p = akey_prefix(ContId::nil(), Oid::from_u128(1), b"d", b"a");
        assert!(single_key(&p, Epoch(10)) < single_key(&p, Epoch(9)));
        assert!(extent_key(&p, 0, Epoch(1)) < extent_key(&p, 1, Epoch(100)));
        assert_eq!(prefix_successor(&[1, 2, 0xff]), vec![1, 3]);
    }
}
