//! Non-overlapping byte extents of one block, for the write-back cache: later writes replace
//! the bytes they cover, adjacent extents merge (so sequential writes become one extent and
//! one large update), and ranges can be cut out (TRIM, WRITE_ZEROES) or filled only where
//! nothing newer is (a failed write-back going back under newer writes).

use std::collections::BTreeMap;

#[derive(Default, Debug)]
pub struct ExtentMap {
    /// start offset → bytes; no two extents overlap or touch.
    map: BTreeMap<u64, Vec<u8>>,
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

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Extents as `(offset, bytes)`, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.map.iter().map(|(o, d)| (*o, d.as_slice()))
    }

    pub fn into_extents(self) -> Vec<(u64, Vec<u8>)> {
        self.map.into_iter().collect()
    }

    /// The extent starting at or before `off`, if any.
    fn before(&self, off: u64) -> Option<(u64, u64)> {
        self.map.range(..=off).next_back().map(|(s, d)| (*s, *s + d.len() as u64))
    }

    /// Write `data` at `off`; returns how many bytes the map grew by.
    pub fn insert(&mut self, off: u64, data: &[u8]) -> u64 {
        if data.is_empty() {
            return 0;
        }
        let end = off + data.len() as u64;
        let next_start = self.map.range(off + 1..).next().map(|(s, _)| *s);
        if let Some((s, e)) = self.before(off) {
            // Inside one extent: overwrite in place.
            if e >= end {
                let v = self.map.get_mut(&s).expect("extent just found");
                v[(off - s) as usize..(end - s) as usize].copy_from_slice(data);
                return 0;
            }
            // Appending at (or over the tail of) an extent with nothing up to `end`: extend it.
            if e >= off && next_start.is_none_or(|n| n > end) {
                let v = self.map.get_mut(&s).expect("extent just found");
                v.truncate((off - s) as usize);
                v.extend_from_slice(data);
                let grew = end - e;
                self.bytes += grew;
                return grew;
            }
        }
        // General case: merge every extent that overlaps or touches [off, end].
        let mut start = off;
        let mut last_end = end;
        let mut parts: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some((s, e)) = self.before(off) {
            if e >= off {
                start = s;
                parts.push((s, self.map.remove(&s).expect("extent just found")));
            }
        }
        let covered: Vec<u64> = self.map.range(off..=end).map(|(s, _)| *s).collect();
        for s in covered {
            let v = self.map.remove(&s).expect("extent just listed");
            last_end = last_end.max(s + v.len() as u64);
            parts.push((s, v));
        }
        let old: u64 = parts.iter().map(|(_, v)| v.len() as u64).sum();
        let mut merged = vec![0u8; (last_end - start) as usize];
        for (s, v) in &parts {
            merged[(s - start) as usize..(s - start) as usize + v.len()].copy_from_slice(v);
        }
        merged[(off - start) as usize..(end - start) as usize].copy_from_slice(data);
        let grew = merged.len() as u64 - old;
        self.map.insert(start, merged);
        self.bytes += grew;
        grew
    }

    /// Fill the parts of `[off, off + data.len())` holding nothing; returns bytes added.
    pub fn insert_under(&mut self, off: u64, data: &[u8]) -> u64 {
        let end = off + data.len() as u64;
        let mut gaps = Vec::new();
        let mut pos = off;
        if let Some((_, e)) = self.before(off) {
            pos = pos.max(e);
        }
        for (s, v) in self.map.range(off..end) {
            if *s > pos {
                gaps.push((pos, *s));
            }
            pos = pos.max(s + v.len() as u64);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        let mut added = 0;
        for (a, b) in gaps {
            added += self.insert(a, &data[(a - off) as usize..(b - off) as usize]);
        }
        added
    }

    /// Drop the bytes in `[start, end)`; returns how many were held there.
    pub fn remove_range(&mut self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let mut hit: Vec<u64> = self.map.range(start..end).map(|(s, _)| *s).collect();
        if let Some((s, e)) = self.before(start) {
            if e > start && s < start {
                hit.insert(0, s);
            }
        }
        let mut removed = 0;
        for s in hit {
            let mut v = self.map.remove(&s).expect("extent just listed");
            let e = s + v.len() as u64;
            let (cut_a, cut_b) = (start.max(s), end.min(e));
            removed += cut_b - cut_a;
            if cut_b < e {
                self.map.insert(cut_b, v[(cut_b - s) as usize..].to_vec());
            }
            if cut_a > s {
                v.truncate((cut_a - s) as usize);
                self.map.insert(s, v);
            }
        }
        self.bytes -= removed;
        removed
    }

    /// The parts of extents inside `[start, end)`, as `(offset, bytes)`.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, &[u8])> {
        let first = self.before(start).filter(|(_, e)| *e > start).map(|(s, _)| s).unwrap_or(start);
        self.map.range(first..end).filter_map(move |(s, v)| {
            let e = *s + v.len() as u64;
            let (a, b) = ((*s).max(start), e.min(end));
            (a < b).then(|| (a, &v[(a - s) as usize..(b - s) as usize]))
        })
    }
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
                assert!(o > le, "extents overlap or touch: {o} after end {le}");
            }
            last_end = Some(o + d.len() as u64);
            for (i, b) in d.iter().enumerate() {
                set[o as usize + i] = true;
                assert_eq!(*b, model.bytes[o as usize + i], "byte {}", o as usize + i);
            }
        }
        assert_eq!(set, model.set);
        assert_eq!(m.bytes(), model.set.iter().filter(|x| **x).count() as u64);
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
            let data = vec![fill; len as usize];
            match rnd(4) {
                0 | 1 => {
                    let before = m.bytes();
                    let grew = m.insert(off, &data);
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
                    m.insert_under(off, &data);
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
    }

    #[test]
    fn sequential_writes_become_one_extent() {
        let mut m = ExtentMap::default();
        for i in 0..128u64 {
            m.insert(i * 4096, &[i as u8; 4096]);
        }
        assert_eq!(m.len(), 1);
        assert_eq!(m.bytes(), 128 * 4096);
    }
}
