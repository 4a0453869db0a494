//! Aggregation bookkeeping of one target: per container, the **horizon** (below which only
//! retained snapshot epochs still read exact history) and which containers got writes that a
//! next aggregation pass has to look at.
//!
//! Horizon rule: a read at `E` is exact iff every aggregation so far either had `upto <= E` or
//! retained `E`. Kept as `(upto, retained)`: `upto` the highest aggregated epoch, `retained` the
//! epochs below it that every aggregation reaching above them retained. Stored in the `Meta`
//! space under `agg` + container id: `fmt(1)=1 | upto(8, LE) | n(4, LE) | n x epoch(8, LE)`.

use std::collections::HashMap;
use strata_types::{ContId, Epoch};

pub const HORIZON_FORMAT_V1: u8 = 1;
/// Retained epochs one horizon keeps at most (a container's snapshots are far fewer).
pub const HORIZON_RETAINED_MAX: usize = 100_000;
const KEY_PREFIX: &[u8] = b"agg";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Horizon {
    pub upto: Epoch,
    /// Sorted, deduplicated, each below `upto`.
    pub retained: Vec<Epoch>,
}

impl Horizon {
    /// Whether a read at `e` still returns exactly what it returned before any aggregation.
    pub fn readable(&self, e: Epoch) -> bool {
        e >= self.upto || self.retained.binary_search(&e).is_ok()
    }

    /// The horizon after one more aggregation at `upto` that kept `retained`: an epoch stays
    /// readable only if it was readable and this aggregation either stayed below it or kept it.
    pub fn advance(&self, upto: Epoch, retained: &[Epoch]) -> Horizon {
        let new_upto = self.upto.max(upto);
        let kept_now = |e: &Epoch| *e >= upto || retained.contains(e);
        let mut r: Vec<Epoch> = retained
            .iter()
            .filter(|e| **e >= self.upto && **e < upto)
            .chain(self.retained.iter().filter(|e| kept_now(e)))
            .copied()
            .filter(|e| *e < new_upto)
            .collect();
        r.sort();
        r.dedup();
        let h = Horizon { upto: new_upto, retained: r };
        debug_assert!(h.retained.iter().all(|e| self.readable(*e) && kept_now(e)));
        h
    }

    pub fn key(cont: ContId) -> Vec<u8> {
        let mut k = KEY_PREFIX.to_vec();
        k.extend_from_slice(cont.as_bytes());
        k
    }

    pub fn key_prefix() -> &'static [u8] {
        KEY_PREFIX
    }

    pub fn cont_of_key(k: &[u8]) -> Option<ContId> {
        let b = k.strip_prefix(KEY_PREFIX)?;
        Some(ContId(uuid::Uuid::from_slice(b).ok()?))
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.retained.len() <= HORIZON_RETAINED_MAX, "horizon keeps {} retained epochs", self.retained.len());
        let mut v = Vec::with_capacity(13 + 8 * self.retained.len());
        v.push(HORIZON_FORMAT_V1);
        v.extend_from_slice(&self.upto.0.to_le_bytes());
        v.extend_from_slice(&(self.retained.len() as u32).to_le_bytes());
        for e in &self.retained {
            v.extend_from_slice(&e.0.to_le_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<Horizon> {
        let (&fmt, rest) = v.split_first()?;
        if fmt != HORIZON_FORMAT_V1 || rest.len() < 12 {
            return None;
        }
        let upto = Epoch(u64::from_le_bytes(rest[..8].try_into().ok()?));
        let n = u32::from_le_bytes(rest[8..12].try_into().ok()?) as usize;
        let body = &rest[12..];
        if n > HORIZON_RETAINED_MAX || body.len() != n * 8 {
            return None;
        }
        let retained: Vec<Epoch> = body.chunks_exact(8).map(|c| Epoch(u64::from_le_bytes(c.try_into().unwrap_or_default()))).collect();
        if retained.windows(2).any(|w| w[0] >= w[1]) || retained.last().is_some_and(|e| *e >= upto) {
            return None;
        }
        Some(Horizon { upto, retained })
    }
}

/// Epochs written into each container since an aggregation pass last covered them, so that
/// background passes skip containers with nothing new (in memory; every container is dirty
/// after a restart).
#[derive(Default)]
pub struct DirtyBook {
    /// Lowest and highest epoch written since the last pass took them.
    dirty: HashMap<ContId, (Epoch, Epoch)>,
    /// Retained epochs of the last pass, per container: a change (a snapshot destroyed) makes
    /// versions removable without any write.
    last_retained: HashMap<ContId, Vec<Epoch>>,
}

impl DirtyBook {
    pub fn note_write(&mut self, cont: ContId, epoch: Epoch) {
        let e = self.dirty.entry(cont).or_insert((epoch, epoch));
        e.0 = e.0.min(epoch);
        e.1 = e.1.max(epoch);
    }

    pub fn note_all(&mut self, cont: ContId) {
        self.note_write(cont, Epoch::ZERO);
        self.note_write(cont, Epoch::MAX);
    }

    pub fn forget(&mut self, cont: ContId) {
        self.dirty.remove(&cont);
        self.last_retained.remove(&cont);
    }

    /// Whether a pass at `upto` keeping `retained` has work; if so, takes what it covers
    /// (writes above `upto` stay due for a later pass).
    pub fn take_due(&mut self, cont: ContId, upto: Epoch, retained: &[Epoch]) -> bool {
        let mut r = retained.to_vec();
        r.sort();
        r.dedup();
        let retained_changed = self.last_retained.get(&cont) != Some(&r);
        let writes_due = self.dirty.get(&cont).is_some_and(|(lo, _)| *lo <= upto);
        if !writes_due && !retained_changed {
            return false;
        }
        if let Some((_, hi)) = self.dirty.remove(&cont) {
            if hi > upto {
                self.dirty.insert(cont, (upto.next(), hi));
            }
        }
        self.last_retained.insert(cont, r);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The stored horizon answers exactly "every aggregation was at or below E, or kept E".
        #[test]
        fn horizon_matches_the_history_of_aggregations(aggs in proptest::collection::vec((0u64..50, proptest::collection::vec(0u64..50, 0..4)), 1..8)) {
            let mut h = Horizon::default();
            for (upto, keep) in &aggs {
                let keep: Vec<Epoch> = keep.iter().map(|e| Epoch(*e)).collect();
                h = h.advance(Epoch(*upto), &keep);
                prop_assert_eq!(Horizon::decode(&h.encode()), Some(h.clone()));
            }
            for e in 0..60u64 {
                let exact = aggs.iter().all(|(u, keep)| e >= *u || keep.contains(&e));
                prop_assert_eq!(h.readable(Epoch(e)), exact, "epoch {}", e);
            }
        }
    }

    #[test]
    fn bad_horizon_records_are_refused() {
        let h = Horizon { upto: Epoch(10), retained: vec![Epoch(3), Epoch(7)] };
        let good = h.encode();
        assert!(Horizon::decode(&good[..good.len() - 1]).is_none());
        let mut newer = good.clone();
        newer[0] = 2;
        assert!(Horizon::decode(&newer).is_none());
        let above = Horizon { upto: Epoch(5), retained: vec![Epoch(7)] }.encode();
        assert!(Horizon::decode(&above).is_none(), "a retained epoch at or above upto is not a horizon");
    }

    #[test]
    fn dirty_book_runs_a_pass_only_when_something_is_due() {
        let mut b = DirtyBook::default();
        let c = ContId::new_random();
        assert!(b.take_due(c, Epoch(100), &[]), "first pass: retained set unknown");
        assert!(!b.take_due(c, Epoch(200), &[]), "nothing written since");
        b.note_write(c, Epoch(150));
        b.note_write(c, Epoch(250));
        assert!(!b.take_due(c, Epoch(140), &[]), "writes all above upto");
        assert!(b.take_due(c, Epoch(200), &[]));
        assert!(!b.take_due(c, Epoch(200), &[]), "what is left is above upto");
        assert!(b.take_due(c, Epoch(260), &[]), "the write above the last pass's upto is still due");
        assert!(!b.take_due(c, Epoch(300), &[]));
        assert!(b.take_due(c, Epoch(300), &[Epoch(5)]), "a new snapshot list is work");
        assert!(b.take_due(c, Epoch(300), &[]), "a destroyed snapshot frees versions");
        b.note_write(c, Epoch(10));
        assert!(b.take_due(c, Epoch(300), &[]), "a late write below the horizon is due");
    }
}
