//! Write-back buffer of one open file: dirty byte ranges not yet in the object store.
//!
//! Ranges never overlap and adjacent ones merge, so a sequential writer builds one extent that
//! is flushed as whole chunks. Reads overlay the buffer on what the store returns. The owner
//! flushes when [`WriteBack::bytes`] passes its limit, on fsync, flush (close) and release.

use std::collections::BTreeMap;

#[derive(Default, Debug)]
pub struct WriteBack {
    /// start offset → bytes; non-overlapping, non-adjacent.
    extents: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    /// Latest write time (ns), the file's mtime once flushed.
    pub mtime_ns: i64,
    /// Room an extent takes at once when a write first appends to it (the owner's flush
    /// threshold): a sequential writer's buffer then grows without being copied by each
    /// doubling (7 MiB of copies per 8 MiB buffer). 0: ordinary growth.
    pub append_reserve: usize,
}

impl WriteBack {
    pub fn with_append_reserve(append_reserve: usize) -> WriteBack {
        WriteBack { append_reserve, ..Default::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// End of the furthest dirty byte (0 when clean).
    pub fn end(&self) -> u64 {
        self.extents.iter().next_back().map_or(0, |(s, d)| s + d.len() as u64)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], now_ns: i64) {
        if data.is_empty() {
            return;
        }
        self.mtime_ns = self.mtime_ns.max(now_ns);
        let end = offset + data.len() as u64;
        // Sequential writers append to the last extent: grow it in place.
        if let Some((s, d)) = self.extents.iter_mut().next_back() {
            if *s + d.len() as u64 == offset {
                if d.capacity() - d.len() < data.len() {
                    d.reserve_exact(self.append_reserve.max(d.len() + data.len()) - d.len());
                }
                d.extend_from_slice(data);
                self.bytes += data.len();
                return;
            }
        }
        // Inside one extent (a random writer over a file it has mostly rewritten): in place,
        // not a copy of the whole extent.
        if let Some((s, d)) = self.extents.range_mut(..=offset).next_back() {
            if *s + d.len() as u64 >= end {
                let at = (offset - *s) as usize;
                d[at..at + data.len()].copy_from_slice(data);
                return;
            }
        }
        // Every extent touching [offset, end] (adjacent included) merges into one.
        let first = self.extents.range(..=offset).next_back().filter(|(s, d)| *s + d.len() as u64 >= offset).map(|(s, _)| *s);
        let start = first.unwrap_or(offset);
        let touching: Vec<u64> = self.extents.range(start..=end).map(|(s, _)| *s).collect();
        let mut merged_end = end;
        for s in &touching {
            merged_end = merged_end.max(s + self.extents[s].len() as u64);
        }
        let new_start = start.min(offset);
        let mut buf = vec![0u8; (merged_end - new_start) as usize];
        for s in touching {
            let d = self.extents.remove(&s).unwrap_or_default();
            self.bytes -= d.len();
            buf[(s - new_start) as usize..(s - new_start) as usize + d.len()].copy_from_slice(&d);
        }
        buf[(offset - new_start) as usize..(end - new_start) as usize].copy_from_slice(data);
        self.bytes += buf.len();
        self.extents.insert(new_start, buf);
    }

    /// Copy dirty bytes over `out`, which holds the file's bytes from `offset`.
    pub fn overlay(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        let from = self.extents.range(..offset).next_back().map_or(offset, |(s, _)| *s);
        for (s, d) in self.extents.range(from..end) {
            let e = s + d.len() as u64;
            let lo = (*s).max(offset);
            let hi = e.min(end);
            if lo < hi {
                out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]);
            }
        }
    }

    /// Forget dirty bytes at or beyond `size` (a truncate).
    pub fn truncate(&mut self, size: u64) {
        let doomed: Vec<u64> = self.extents.range(size..).map(|(s, _)| *s).collect();
        for s in doomed {
            let d = self.extents.remove(&s).unwrap_or_default();
            self.bytes -= d.len();
        }
        if let Some((s, d)) = self.extents.range_mut(..size).next_back() {
            let keep = (size - s) as usize;
            if d.len() > keep {
                self.bytes -= d.len() - keep;
                d.truncate(keep);
            }
        }
    }

    /// Forget dirty bytes in `[offset, offset + len)` (a hole punched there: the store's
    /// punch makes them zeros, so they need not be written first).
    pub fn punch(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if len == 0 {
            return;
        }
        let from = self.extents.range(..offset).next_back().map_or(offset, |(s, _)| *s);
        let touched: Vec<u64> = self.extents.range(from..end).filter(|(s, d)| *s + d.len() as u64 > offset).map(|(s, _)| *s).collect();
        for s in touched {
            let d = self.extents.remove(&s).unwrap_or_default();
            self.bytes -= d.len();
            let e = s + d.len() as u64;
            if s < offset {
                let left = d[..(offset - s) as usize].to_vec();
                self.bytes += left.len();
                self.extents.insert(s, left);
            }
            if e > end {
                let right = d[(end - s) as usize..].to_vec();
                self.bytes += right.len();
                self.extents.insert(end, right);
            }
        }
    }

    /// Take every dirty extent, leaving the buffer clean (as `Bytes`, so the mount's cache and
    /// the store write can share them without a copy).
    pub fn take(&mut self) -> Vec<(u64, bytes::Bytes)> {
        self.bytes = 0;
        std::mem::take(&mut self.extents)
            .into_iter()
            .map(|(o, mut d)| {
                // The cache may keep it: no reserve held for bytes never written.
                if d.capacity() > 2 * d.len() {
                    d.shrink_to_fit();
                }
                (o, bytes::Bytes::from(d))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec((0u64..200, 1usize..50, any::<u8>(), 0u8..4), 1..60)) {
            let mut wb = WriteBack::with_append_reserve(100);
            let mut model = vec![None::<u8>; 300];
            for (off, len, byte, kind) in ops {
                if kind == 0 {
                    wb.truncate(off);
                    for m in model.iter_mut().skip(off as usize) { *m = None; }
                } else if kind == 1 {
                    wb.punch(off, len as u64);
                    for m in model.iter_mut().skip(off as usize).take(len) { *m = None; }
                } else {
                    wb.write(off, &vec![byte; len], 1);
                    for m in model.iter_mut().skip(off as usize).take(len) { *m = Some(byte); }
                }
                let mut out = vec![0xAAu8; 300];
                wb.overlay(0, &mut out);
                for (i, m) in model.iter().enumerate() {
                    prop_assert_eq!(out[i], m.unwrap_or(0xAA), "byte {}", i);
                }
                prop_assert_eq!(wb.bytes(), model.iter().filter(|m| m.is_some()).count());
                let mut part = vec![0xAAu8; 37];
                wb.overlay(100, &mut part);
                for i in 0..37 { prop_assert_eq!(part[i], model[100 + i].unwrap_or(0xAA)); }
            }
        }
    }
}
