//! `#[serde(with = "crate::byte_vec")]` for `Vec<u8>` fields that carry bulk data: serde
//! treats a plain `Vec<u8>` as a sequence and (de)serializes it one byte at a time through a
//! visitor, which was an eighth of the engines' CPU while rebuild moved records. postcard
//! encodes a byte sequence and a byte string the same way (length, then the bytes), so this
//! changes no wire format.

use serde::de::{Error, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    /// Formats that write byte strings as sequences (JSON) still read.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Plain {
        v: Vec<u8>,
    }
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Bulk {
        #[serde(with = "super")]
        v: Vec<u8>,
    }

    #[test]
    fn same_postcard_bytes_as_a_plain_vec_both_ways() {
        let v: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let plain = postcard::to_allocvec(&Plain { v: v.clone() }).unwrap();
        let bulk = postcard::to_allocvec(&Bulk { v: v.clone() }).unwrap();
        assert_eq!(plain, bulk, "the wire format does not change");
        assert_eq!(postcard::from_bytes::<Bulk>(&plain).unwrap().v, v);
        assert_eq!(postcard::from_bytes::<Plain>(&bulk).unwrap().v, v);
    }
}
