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
        Ok(reed_solomon_simd::encode(self.k, self.p, data)?)
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
            let original = cells[..self.k].iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, c.as_slice())));
            let recovery = cells[self.k..].iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, c.as_slice())));
            let restored = reed_solomon_simd::decode(self.k, self.p, original, recovery)?;
            for (i, cell) in restored {
                debug_assert!(cells[i].is_none());
                cells[i] = Some(cell);
            }
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
