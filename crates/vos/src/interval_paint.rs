//! Painting versioned extents in epoch order: which record owns each byte of an array.

use std::collections::BTreeMap;

/// Disjoint intervals `[start, end)` each owned by a record index.
#[derive(Default, Debug)]
pub struct OwnerMap {
    map: BTreeMap<u64, (u64, usize)>,
}

impl OwnerMap {
    /// Give `[start, end)` to `owner`, cutting whatever was there.
    pub fn paint(&mut self, start: u64, end: u64, owner: usize) {
        if start >= end {
            return;
        }
        // Split an interval that begins before `start` and reaches into the range.
        if let Some((&s, &(e, o))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, o));
                if e > end {
                    self.map.insert(end, (e, o));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, o)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, o));
                }
            }
        }
        self.map.insert(start, (end, owner));
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, usize)> + '_ {
        self.map.iter().map(|(&s, &(e, o))| (s, e, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_byte_array(ops in proptest::collection::vec((0u64..64, 1u64..20), 1..20)) {
            let mut m = OwnerMap::default();
            let mut bytes = vec![usize::MAX; 100];
            for (i, (s, l)) in ops.iter().enumerate() {
                m.paint(*s, s + l, i);
                for b in *s..s + l { bytes[b as usize] = i; }
            }
            let mut seen = vec![usize::MAX; 100];
            let mut last_end = 0;
            for (s, e, o) in m.iter() {
                prop_assert!(s >= last_end && s < e);
                last_end = e;
                for b in s..e { seen[b as usize] = o; }
            }
            prop_assert_eq!(seen, bytes);
        }
    }
}
