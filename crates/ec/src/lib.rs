//! `strata-ec`: erasure-coded stripes, shared by the engine (which encodes on update) and the
//! client (which decodes on a degraded read), so neither depends on the other.
//!
//! Geometry: an object class `EC_kPp` stores a dkey's array index space in **stripes** of `k`
//! data **cells** of `cell_bytes` each. Byte `x` of the dkey lives in stripe
//! `x / (k * cell_bytes)`, data cell `(x / cell_bytes) % k`, at offset `x % cell_bytes` within
//! the cell. Shard `i < k` stores data cell `i` of every stripe; shard `k + j` stores parity
//! cell `j`. On its shard, a cell of stripe `s` is at shard-local offset `s * cell_bytes`, so a
//! shard is itself a dense array and holes stay holes.
//!
//! Invariants: parity is always computed over whole cells (missing bytes are zero, exactly as
//! holes read); any `k` of the `k + p` cells of a stripe reconstruct all of them.
//! Limits: `k` in 2..=16, `p` in 1..=4 (from `strata-types`), `cell_bytes` even and at most
//! [`CELL_BYTES_MAX`].

use std::ops::Range;

/// Default cell: large enough that a 1 MiB write on EC_4P2 is four full stripes' worth of
/// cells, small enough that a 4 KiB partial write reads back only 256 KiB.
pub const CELL_BYTES_DEFAULT: u64 = 64 * 1024;
pub const CELL_BYTES_MAX: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EcError {
    #[error("EC_{k}P{p} stripe has only {have} of the {k} cells needed to reconstruct it (too many shards lost)")]
    TooFewCells { k: usize, p: usize, have: usize },
    #[error("cell {index} has {got} bytes, expected {want}")]
    CellSize { index: usize, got: usize, want: usize },
    #[error("invalid EC geometry: {0}")]
    Geometry(String),
    #[error("reed-solomon: {0}")]
    Codec(#[from] reed_solomon_simd::Error),
}

/// The geometry and codec of one EC class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcStripe {
    pub k: usize,
    pub p: usize,
    pub cell_bytes: u64,
}

/// The part of a user extent that falls in one data cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellSpan {
    pub stripe: u64,
    /// Data cell index (= shard index) in `0..k`.
    pub cell: usize,
    /// Offset on the shard (shard-local array index).
    pub shard_offset: u64,
    /// The bytes of the caller's buffer this span covers.
    pub buf: Range<usize>,
}

impl EcStripe {
    pub fn new(k: usize, p: usize, cell_bytes: u64) -> Result<EcStripe, EcError> {
        if !(2..=16).contains(&k) || !(1..=4).contains(&p) || p > k {
            return Err(EcError::Geometry(format!("k={k} p={p}")));
        }
        if cell_bytes == 0 || !cell_bytes.is_multiple_of(2) || cell_bytes > CELL_BYTES_MAX {
            return Err(EcError::Geometry(format!("cell_bytes={cell_bytes} must be even and 2..={CELL_BYTES_MAX}")));
        }
        Ok(EcStripe { k, p, cell_bytes })
    }

    pub fn stripe_bytes(&self) -> u64 {
        self.k as u64 * self.cell_bytes
    }

    /// The stripes touched by `[offset, offset + len)`.
    pub fn stripes(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / self.stripe_bytes()..(offset + len - 1) / self.stripe_bytes() + 1
    }

    /// True if `[offset, offset + len)` covers stripe `s` entirely.
    pub fn covers_stripe(&self, offset: u64, len: u64, s: u64) -> bool {
        let start = s * self.stripe_bytes();
        offset <= start && offset + len >= start + self.stripe_bytes()
    }

    /// Split a user extent into per-cell spans, in order.
    pub fn spans(&self, offset: u64, len: u64) -> Vec<CellSpan> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let cell_global = pos / self.cell_bytes;
            let in_cell = pos % self.cell_bytes;
            let take = (self.cell_bytes - in_cell).min(end - pos);
            let stripe = cell_global / self.k as u64;
            out.push(CellSpan {
                stripe,
                cell: (cell_global % self.k as u64) as usize,
                shard_offset: stripe * self.cell_bytes + in_cell,
                buf: (pos - offset) as usize..(pos - offset + take) as usize,
            });
            pos += take;
        }
        out
    }

    /// Parity cells of one stripe from its `k` data cells (each exactly `cell_bytes`).
    pub fn encode(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>, EcError> {
        assert_eq!(data.len(), self.k, "encode takes exactly k data cells");
        for (i, c) in data.iter().enumerate() {
            if c.len() as u64 != self.cell_bytes {
                return Err(EcError::CellSize { index: i, got: c.len(), want: self.cell_bytes as usize });
            }
        }
        CODEC.with(|c| {
            let mut c = c.borrow_mut();
            let (k, p, bytes) = (self.k, self.p, self.cell_bytes as usize);
            let enc = reused(&mut c.encoder, |e| e.reset(k, p, bytes), || reed_solomon_simd::ReedSolomonEncoder::new(k, p, bytes))?;
            for cell in data {
                enc.add_original_shard(cell)?;
            }
            let parity: Vec<Vec<u8>> = enc.encode()?.recovery_iter().map(<[u8]>::to_vec).collect();
            Ok(parity)
        })
    }

    /// Fill in every missing cell of a stripe (`cells[0..k]` data, `cells[k..k+p]` parity) from
    /// any `k` present ones.
    pub fn reconstruct(&self, cells: &mut [Option<Vec<u8>>]) -> Result<(), EcError> {
        assert_eq!(cells.len(), self.k + self.p, "reconstruct takes k + p cell slots");
        let have = cells.iter().filter(|c| c.is_some()).count();
        if have < self.k {
            return Err(EcError::TooFewCells { k: self.k, p: self.p, have });
        }
        for (i, c) in cells.iter().enumerate() {
            if let Some(c) = c {
                if c.len() as u64 != self.cell_bytes {
                    return Err(EcError::CellSize { index: i, got: c.len(), want: self.cell_bytes as usize });
                }
            }
        }
        let data_missing = cells[..self.k].iter().any(|c| c.is_none());
        if data_missing {
            CODEC.with(|c| {
                let mut c = c.borrow_mut();
                let (k, p, bytes) = (self.k, self.p, self.cell_bytes as usize);
                let dec = reused(&mut c.decoder, |d| d.reset(k, p, bytes), || reed_solomon_simd::ReedSolomonDecoder::new(k, p, bytes))?;
                for (i, cell) in cells.iter().enumerate() {
                    match cell {
                        Some(b) if i < self.k => dec.add_original_shard(i, b)?,
                        Some(b) => dec.add_recovery_shard(i - self.k, b)?,
                        None => {}
                    }
                }
                for (i, cell) in dec.decode()?.restored_original_iter() {
                    debug_assert!(cells[i].is_none());
                    cells[i] = Some(cell.to_vec());
                }
                Ok::<_, EcError>(())
            })?;
        }
        if cells[self.k..].iter().any(|c| c.is_none()) {
            let data: Vec<&[u8]> = cells[..self.k].iter().map(|c| c.as_deref().unwrap_or_default()).collect();
            let parity = self.encode(&data)?;
            for (j, par) in parity.into_iter().enumerate() {
                if cells[self.k + j].is_none() {
                    cells[self.k + j] = Some(par);
                }
            }
        }
        debug_assert!(cells.iter().all(|c| c.is_some()));
        Ok(())
    }

    /// [`EcStripe::reconstruct`] of many stripes. Stripes missing the same cells are decoded
    /// together, their cells laid end to end (the code works byte position by byte position):
    /// the codec's fixed cost per call (its error locator is a transform over the whole field,
    /// whatever the cell size) was most of an EC rebuild's CPU when paid per 64 KiB cell.
    pub fn reconstruct_many(&self, stripes: &mut [Vec<Option<Vec<u8>>>]) -> Vec<Result<(), EcError>> {
        let n = self.k + self.p;
        let mut out: Vec<Result<(), EcError>> = (0..stripes.len()).map(|_| Ok(())).collect();
        let mut groups: std::collections::BTreeMap<Vec<bool>, Vec<usize>> = Default::default();
        for s in 0..stripes.len() {
            let cells = &stripes[s];
            let whole = cells.len() == n && cells.iter().flatten().all(|c| c.len() as u64 == self.cell_bytes);
            let mask: Vec<bool> = cells.iter().map(Option::is_some).collect();
            if !whole || mask.iter().filter(|x| **x).count() < self.k || mask.iter().all(|x| *x) {
                // Misfits and complete stripes take the single-stripe path (its errors, or nothing to do).
                out[s] = self.reconstruct(&mut stripes[s]);
            } else {
                groups.entry(mask).or_default().push(s);
            }
        }
        let per_call = (RECONSTRUCT_BATCH_BYTES / self.cell_bytes).max(1) as usize;
        for (mask, members) in groups {
            for chunk in members.chunks(per_call) {
                let joined = EcStripe { cell_bytes: self.cell_bytes * chunk.len() as u64, ..*self };
                let join = |i: usize| {
                    let mut v = Vec::with_capacity(joined.cell_bytes as usize);
                    for &s in chunk {
                        v.extend_from_slice(stripes[s][i].as_deref().unwrap_or_default());
                    }
                    v
                };
                let mut cells: Vec<Option<Vec<u8>>> = mask.iter().enumerate().map(|(i, has)| has.then(|| join(i))).collect();
                match joined.reconstruct(&mut cells) {
                    Ok(()) => {
                        for (i, cell) in cells.iter().enumerate().filter(|(i, _)| !mask[*i]) {
                            let cell = cell.as_deref().expect("reconstruct fills every cell");
                            for (j, &s) in chunk.iter().enumerate() {
                                let at = j * self.cell_bytes as usize;
                                stripes[s][i] = Some(cell[at..at + self.cell_bytes as usize].to_vec());
                            }
                        }
                    }
                    Err(_) => {
                        for &s in chunk {
                            out[s] = self.reconstruct(&mut stripes[s]);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Bytes per shard of one joined decode in [`EcStripe::reconstruct_many`].
const RECONSTRUCT_BATCH_BYTES: u64 = 4 << 20;

/// The codec's encoder and decoder, kept per thread and reset for each use: made afresh per
/// call (as `reed_solomon_simd::encode`/`decode` do) their work buffers were allocated and
/// zeroed every time, page faults and all.
#[derive(Default)]
struct Codec {
    encoder: Option<reed_solomon_simd::ReedSolomonEncoder>,
    decoder: Option<reed_solomon_simd::ReedSolomonDecoder>,
}

thread_local! {
    static CODEC: std::cell::RefCell<Codec> = std::cell::RefCell::new(Codec::default());
}

/// The codec part kept in `slot`, reset for this use, or a new one.
fn reused<T>(slot: &mut Option<T>, reset: impl FnOnce(&mut T) -> Result<(), reed_solomon_simd::Error>, new: impl FnOnce() -> Result<T, reed_solomon_simd::Error>) -> Result<&mut T, EcError> {
    match slot {
        Some(t) => {
            reset(t)?;
            Ok(t)
        }
        None => Ok(slot.insert(new()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cells_of(st: &EcStripe, seed: u8) -> Vec<Vec<u8>> {
        (0..st.k).map(|i| (0..st.cell_bytes).map(|b| (b as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8)).collect()).collect()
    }

    #[test]
    fn spans_cover_the_extent_in_order() {
        let st = EcStripe::new(4, 2, 8).unwrap();
        let spans = st.spans(5, 30);
        assert_eq!(spans.first().unwrap().buf.start, 0);
        assert_eq!(spans.last().unwrap().buf.end, 30);
        for w in spans.windows(2) {
            assert_eq!(w[0].buf.end, w[1].buf.start);
        }
        // byte 5: stripe 0, cell 0, offset 5; byte 33: stripe 1 (32..64), cell 0, shard offset 8 + 1.
        assert_eq!(spans[0], CellSpan { stripe: 0, cell: 0, shard_offset: 5, buf: 0..3 });
        assert_eq!(spans.last().unwrap(), &CellSpan { stripe: 1, cell: 0, shard_offset: 8, buf: 27..30 });
        assert_eq!(st.stripes(5, 30), 0..2);
        assert!(st.covers_stripe(0, 32, 0) && !st.covers_stripe(1, 32, 0));
    }

    #[test]
    fn any_k_cells_rebuild_the_stripe() {
        let st = EcStripe::new(4, 2, 1024).unwrap();
        let data = cells_of(&st, 7);
        let refs: Vec<&[u8]> = data.iter().map(|c| c.as_slice()).collect();
        let parity = st.encode(&refs).unwrap();
        let full: Vec<Vec<u8>> = data.iter().chain(parity.iter()).cloned().collect();
        for a in 0..6 {
            for b in a + 1..6 {
                let mut cells: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
                cells[a] = None;
                cells[b] = None;
                st.reconstruct(&mut cells).unwrap();
                assert_eq!(cells.into_iter().map(|c| c.unwrap()).collect::<Vec<_>>(), full, "lost {a},{b}");
            }
        }
        let mut three_lost: Vec<Option<Vec<u8>>> = full.iter().cloned().map(Some).collect();
        three_lost[0] = None;
        three_lost[1] = None;
        three_lost[5] = None;
        assert!(matches!(st.reconstruct(&mut three_lost), Err(EcError::TooFewCells { have: 3, .. })));
    }

    #[test]
    fn many_stripes_reconstruct_as_each_would_alone() {
        // EC_4P2, 12 stripes: losses of 0, 1, 2 (several patterns, so several joined decodes,
        // one holding more stripes than a call takes) and 3 cells (an error), and a short cell.
        let st = EcStripe::new(4, 2, 1 << 20).unwrap();
        let full: Vec<Vec<Vec<u8>>> = (0..12u8)
            .map(|seed| {
                let data = cells_of(&st, seed);
                let refs: Vec<&[u8]> = data.iter().map(|c| c.as_slice()).collect();
                let parity = st.encode(&refs).unwrap();
                data.into_iter().chain(parity).collect()
            })
            .collect();
        let lost: [&[usize]; 12] = [&[], &[1], &[1], &[1], &[1], &[1], &[0, 5], &[0, 5], &[4], &[2, 3], &[0, 1, 2], &[3]];
        let mut stripes: Vec<Vec<Option<Vec<u8>>>> = full.iter().zip(lost).map(|(f, l)| f.iter().enumerate().map(|(i, c)| (!l.contains(&i)).then(|| c.clone())).collect()).collect();
        stripes[11][0].as_mut().unwrap().truncate(100);
        let results = st.reconstruct_many(&mut stripes);
        for (s, r) in results.iter().enumerate() {
            match s {
                10 => assert!(matches!(r, Err(EcError::TooFewCells { have: 3, .. })), "{r:?}"),
                11 => assert!(matches!(r, Err(EcError::CellSize { index: 0, .. })), "{r:?}"),
                _ => {
                    assert!(r.is_ok(), "stripe {s}: {r:?}");
                    assert!(stripes[s].iter().zip(&full[s]).all(|(got, want)| got.as_ref() == Some(want)), "stripe {s} rebuilt wrong");
                }
            }
        }
    }

    #[test]
    fn bad_geometry_and_cell_sizes_are_errors() {
        assert!(EcStripe::new(1, 1, 64).is_err());
        assert!(EcStripe::new(4, 5, 64).is_err());
        assert!(EcStripe::new(4, 2, 63).is_err());
        let st = EcStripe::new(2, 1, 64).unwrap();
        let short = vec![0u8; 10];
        let ok = vec![0u8; 64];
        assert!(matches!(st.encode(&[&ok, &short]), Err(EcError::CellSize { index: 1, .. })));
    }

    proptest! {
        #[test]
        fn spans_partition_any_extent(k in 2usize..8, cell in 1u64..64, off in 0u64..10_000, len in 0u64..5_000) {
            let st = EcStripe::new(k, 1, cell * 2).unwrap();
            let spans = st.spans(off, len);
            let total: usize = spans.iter().map(|s| s.buf.len()).sum();
            prop_assert_eq!(total as u64, len);
            for s in &spans {
                let x = off + s.buf.start as u64;
                prop_assert_eq!(s.stripe, x / st.stripe_bytes());
                prop_assert_eq!(s.cell as u64, (x / st.cell_bytes) % k as u64);
                prop_assert!(s.shard_offset % st.cell_bytes + s.buf.len() as u64 <= st.cell_bytes);
            }
        }
    }
}
