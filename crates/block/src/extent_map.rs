//! Non-overlapping byte extents of one block, for the write-back cache. Extents are pieces of
//! the buffers the NBD requests arrived in (`Bytes` slices, never copied on insert): a later
//! write replaces the bytes it covers by cutting the older pieces around it, so rewrites of
//! dirty bytes coalesce in place of the old ones; ranges can be cut out (TRIM, WRITE_ZEROES)
//! or filled only where nothing newer is (a failed write-back going back under newer writes).
//! Touching pieces stay separate here; the write-back joins them into one extent.
//!
//! Memory: a piece keeps its whole buffer alive. Each piece records the size of that buffer
//! (as the caller knows it: the request's length), and a piece cut to less than
//! 1/[`PIECE_SHARE_MIN`] of it is copied into its own buffer, so the memory held is at most
//! that factor times the bytes held (times the pool's rounding up to a power of two).

use bytes::Bytes;
use std::collections::BTreeMap;

/// A piece must show at least 1/this of the buffer it keeps alive, else it is copied out.
pub const PIECE_SHARE_MIN: u64 = 2;

/// Bytes at some offset, and the size of the buffer they keep alive.
#[derive(Clone, Debug)]
pub struct Piece {
    pub data: Bytes,
    pub buffer_bytes: u64,
}

impl Piece {
    /// A piece of `data`, which is (a slice of) a buffer of `buffer_bytes`; copied into its
    /// own buffer when it would keep too much alive.
    pub fn new(data: Bytes, buffer_bytes: u64) -> Piece {
        let len = data.len() as u64;
        debug_assert!(buffer_bytes >= len);
        if len * PIECE_SHARE_MIN < buffer_bytes {
            Piece { data: Bytes::copy_from_slice(&data), buffer_bytes: len }
        } else {
            Piece { data, buffer_bytes }
        }
    }

    fn slice(&self, a: u64, b: u64) -> Piece {
        Piece::new(self.data.slice(a as usize..b as usize), self.buffer_bytes)
    }
}

#[derive(Default, Debug)]
pub struct ExtentMap {
    /// start offset → piece; no two pieces overlap (they may touch).
    map: BTreeMap<u64, Piece>,
    bytes: u64,
}

impl ExtentMap {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Pieces held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Pieces as `(offset, bytes)`, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(o, p)| (*o, &p.data[..]))
    }

    pub fn into_pieces(self) -> Vec<(u64, Piece)> {
        self.map.into_iter().collect()
    }

    /// The piece starting at or before `off`, if any, as `(start, end)`.
    fn before(&self, off: u64) -> Option<(u64, u64)> {
        self.map.range(..=off).next_back().map(|(s, p)| (*s, *s + p.data.len() as u64))
    }

    /// Write `data` (a slice of a buffer of `buffer_bytes`) at `off`, replacing what it
    /// covers; returns how many bytes the map grew by.
    pub fn insert(&mut self, off: u64, data: Bytes, buffer_bytes: u64) -> u64 {
        if data.is_empty() {
            return 0;
        }
        let len = data.len() as u64;
        let covered = self.remove_range(off, off + len);
        self.map.insert(off, Piece::new(data, buffer_bytes));
        self.bytes += len;
        len - covered
    }

    /// Fill the parts of `[off, off + len)` holding nothing from `piece`; returns bytes added.
    pub fn insert_under(&mut self, off: u64, piece: &Piece) -> u64 {
        let end = off + piece.data.len() as u64;
        let mut gaps = Vec::new();
        let mut pos = off;
        if let Some((_, e)) = self.before(off) {
            pos = pos.max(e);
        }
        for (s, p) in self.map.range(off..end) {
            if *s > pos {
                gaps.push((pos, *s));
            }
            pos = pos.max(s + p.data.len() as u64);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        let mut added = 0;
        for (a, b) in gaps {
            self.map.insert(a, piece.slice(a - off, b - off));
            added += b - a;
        }
        self.bytes += added;
        added
    }

    /// Drop the bytes in `[start, end)`; returns how many were held there.
    pub fn remove_range(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let mut hit: Vec<u64> = Vec::new();
        if let Some((s, e)) = self.before(start) {
            if e > start && s < start {
                hit.push(s);
            }
        }
        hit.extend(self.map.range(start..end).map(|(s, _)| *s));
        let mut removed = 0;
        for s in hit {
            let p = self.map.remove(&s).expect("piece just listed");
            let e = s + p.data.len() as u64;
            let (cut_a, cut_b) = (start.max(s), end.min(e));
            removed += cut_b - cut_a;
            if cut_b < e {
                self.map.insert(cut_b, p.slice(cut_b - s, e - s));
            }
            if cut_a > s {
                self.map.insert(s, p.slice(0, cut_a - s));
            }
        }
        self.bytes -= removed;
        removed
    }

    /// The parts of pieces inside `[start, end)`, as `(offset, bytes)`, ascending.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &[u8])> {
        let first = self.before(start).filter(|(_, e)| *e > start).map(|(s, _)| s).unwrap_or(start);
        self.map.range(first..end).filter_map(move |(s, p)| {
            let e = *s + p.data.len() as u64;
            let (a, b) = ((*s).max(start), e.min(end));
            (a < b).then(|| (a, &p.data[(a - s) as usize..(b - s) as usize]))
        })
    }
}

/// Touching pieces joined: `(offset, length)` of each maximal run, and one payload holding the
/// runs' bytes in order (the pieces' own buffer when there is one piece, else one copy).
pub fn join_runs(pieces: &[(u64, Piece)]) -> (Vec<(u64, u64)>, Bytes) {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (o, p) in pieces {
        let l = p.data.len() as u64;
        match runs.last_mut() {
            Some((ro, rl)) if *ro + *rl == *o => *rl += l,
            _ => {
                assert!(runs.last().is_none_or(|(ro, rl)| ro + rl < *o), "pieces overlap or are out of order");
                runs.push((*o, l));
            }
        }
    }
    let payload = match pieces {
        [(_, p)] => p.data.clone(),
        _ => {
            // A recycled buffer: a fresh one per write-back faulted in new pages.
            let pool = crate::payload_pool::shared();
            let mut b = pool.take(pieces.iter().map(|(_, p)| p.data.len()).sum());
            for (_, p) in pieces {
                b.extend_from_slice(&p.data);
            }
            pool.share(b)
        }
    };
    (runs, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map against a plain byte array with a written-or-not mask.
    struct Model {
        bytes: Vec<u8>,
        set: Vec<bool>,
    }

    fn check(m: &ExtentMap, model: &Model) {
        let mut set = vec![false; model.set.len()];
        let mut last_end = None;
        for (o, d) in m.iter() {
            assert!(!d.is_empty());
            if let Some(le) = last_end {
                assert!(o >= le, "pieces overlap: {o} before end {le}");
            }
            last_end = Some(o + d.len() as u64);
            for (i, b) in d.iter().enumerate() {
                set[o as usize + i] = true;
                assert_eq!(*b, model.bytes[o as usize + i], "byte {}", o as usize + i);
            }
        }
        assert_eq!(set, model.set);
        assert_eq!(m.bytes(), model.set.iter().filter(|x| **x).count() as u64);
        for p in m.map.values() {
            assert!(p.data.len() as u64 * PIECE_SHARE_MIN >= p.buffer_bytes, "a piece keeps too large a buffer alive");
        }
    }

    #[test]
    fn random_inserts_removes_and_fills_match_a_byte_model() {
        const N: usize = 4096;
        let mut m = ExtentMap::default();
        let mut model = Model { bytes: vec![0; N], set: vec![false; N] };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..20_000u64 {
            let off = rnd(N as u64);
            let len = 1 + rnd((N as u64 - off).min(300));
            let fill = (step % 251) as u8;
            // Sometimes a slice of a larger request buffer, as a request spanning blocks gives.
            let extra = rnd(3) * len;
            let buf = Bytes::from(vec![fill; (len + extra) as usize]);
            let data = buf.slice(..len as usize);
            match rnd(4) {
                0 | 1 => {
                    let before = m.bytes();
                    let grew = m.insert(off, data, buf.len() as u64);
                    assert_eq!(m.bytes(), before + grew);
                    for i in off..off + len {
                        model.bytes[i as usize] = fill;
                        model.set[i as usize] = true;
                    }
                }
                2 => {
                    let removed = m.remove_range(off, off + len);
                    let was = (off..off + len).filter(|i| model.set[*i as usize]).count() as u64;
                    assert_eq!(removed, was);
                    for i in off..off + len {
                        model.set[i as usize] = false;
                    }
                }
                _ => {
                    m.insert_under(off, &Piece::new(data, buf.len() as u64));
                    for i in off..off + len {
                        if !model.set[i as usize] {
                            model.bytes[i as usize] = fill;
                            model.set[i as usize] = true;
                        }
                    }
                }
            }
            check(&m, &model);
            let (a, b) = (rnd(N as u64), rnd(N as u64));
            let (a, b) = (a.min(b), a.max(b));
            for (o, d) in m.overlapping(a, b) {
                assert!(o >= a && o + d.len() as u64 <= b);
                assert!(d.iter().enumerate().all(|(i, v)| *v == model.bytes[o as usize + i]));
            }
            let seen: u64 = m.overlapping(a, b).map(|(_, d)| d.len() as u64).sum();
            assert_eq!(seen, (a..b).filter(|i| model.set[*i as usize]).count() as u64);
        }
        let pieces = m.into_pieces();
        let (runs, payload) = join_runs(&pieces);
        let mut at = 0usize;
        for (o, l) in runs {
            assert!((o..o + l).all(|i| model.set[i as usize]), "runs cover written bytes only");
            assert_eq!(payload[at..at + l as usize], model.bytes[o as usize..(o + l) as usize]);
            at += l as usize;
        }
        assert_eq!(at, payload.len());
    }

    #[test]
    fn rewrites_share_the_request_buffers_and_sequential_writes_join_into_one_run() {
        let mut m = ExtentMap::default();
        let mut bufs = Vec::new();
        for i in 0..128u64 {
            let b = Bytes::from(vec![i as u8; 4096]);
            m.insert(i * 4096, b.clone(), 4096);
            bufs.push(b);
        }
        // A rewrite replaces the bytes it covers; nothing is copied.
        let again = Bytes::from(vec![7u8; 8192]);
        assert_eq!(m.insert(4096, again.clone(), 8192), 0, "a rewrite does not grow the map");
        assert_eq!(m.bytes(), 128 * 4096);
        assert_eq!(m.overlapping(4096, 4096 + 8192).next().map(|(_, d)| d.as_ptr()), Some(again.as_ptr()), "pieces are the request's buffer");
        let (runs, payload) = join_runs(&m.into_pieces());
        assert_eq!(runs, vec![(0, 128 * 4096)]);
        assert_eq!(payload.len(), 128 * 4096);
        assert_eq!(payload[4096..4096 + 8192], again[..]);
    }

    #[test]
    fn a_small_piece_of_a_large_buffer_is_copied_out() {
        let mut m = ExtentMap::default();
        let big = Bytes::from(vec![1u8; 1 << 20]);
        m.insert(0, big.slice(..4096), 1 << 20);
        let (_, d) = m.overlapping(0, 4096).next().expect("held");
        assert_ne!(d.as_ptr(), big.as_ptr(), "4 KiB of a 1 MiB buffer is copied, not kept");
        m.insert(8192, big.slice(..1 << 19), 1 << 20);
        let (_, d) = m.overlapping(8192, 8193).next().expect("held");
        assert_eq!(d.as_ptr(), big.as_ptr(), "half of the buffer is kept as it is");
    }
}
