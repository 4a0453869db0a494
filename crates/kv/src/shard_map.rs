//! The sharding manager: which shard holds a key.
//!
//! A shard function is chosen when the store is created and never changes the shard of an
//! existing key; what changes with membership is which targets hold a shard, and that comes from
//! placement of the shard's dkey. The map carries a version so that a client holding an old map
//! can be told to refresh (a later split of range shards bumps it).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use xxhash_rust::xxh3::xxh3_64;

/// Most shards one store may have; a shard is a dkey, so this bounds per-store dkeys.
pub const SHARDS_MAX: u32 = 4096;
/// Default shard count for `hash` and `prefix` stores.
pub const SHARDS_DEFAULT: u32 = 64;
/// Longest prefix `prefix:N` may use.
pub const PREFIX_BYTES_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardFunction {
    /// xxh3 of the whole key modulo the shard count: even spread, scans touch every shard.
    Hash { shards: u32 },
    /// Shard `i` holds keys in `[split[i-1], split[i])`: ordered, scans touch only the shards
    /// that overlap the range. `split` is strictly increasing; there are `split.len() + 1` shards.
    Range { split: Vec<Vec<u8>> },
    /// xxh3 of the first `len` bytes: keys sharing a prefix live together, so a scan of that
    /// prefix is a one-shard scan.
    Prefix { len: usize, shards: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardMapError {
    #[error("shard function '{input}': {reason}. Use hash[:SHARDS], range:SPLIT1,SPLIT2,... or prefix:N[:SHARDS]")]
    Parse { input: String, reason: String },
}

/// A versioned shard function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Format version of this record (v1).
    pub format: u8,
    pub version: u64,
    pub function: ShardFunction,
}

impl ShardMap {
    pub fn new(function: ShardFunction) -> ShardMap {
        ShardMap { format: 1, version: 1, function }
    }

    pub fn shard_count(&self) -> u32 {
        match &self.function {
            ShardFunction::Hash { shards } | ShardFunction::Prefix { shards, .. } => *shards,
            ShardFunction::Range { split } => split.len() as u32 + 1,
        }
    }

    /// The shard holding `key`.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        let s = match &self.function {
            ShardFunction::Hash { shards } => (xxh3_64(key) % u64::from(*shards)) as u32,
            ShardFunction::Prefix { len, shards } => {
                let p = &key[..key.len().min(*len)];
                (xxh3_64(p) % u64::from(*shards)) as u32
            }
            // Number of split points <= key = index of the shard.
            ShardFunction::Range { split } => split.partition_point(|sp| sp.as_slice() <= key) as u32,
        };
        debug_assert!(s < self.shard_count());
        s
    }

    /// The shards a scan of `[start, end)` must visit, in key order for range stores (so the
    /// results can be concatenated) and in shard order otherwise (results must be merged).
    /// `end = None` means unbounded.
    pub fn shards_for_range(&self, start: &[u8], end: Option<&[u8]>) -> Vec<u32> {
        match &self.function {
            ShardFunction::Range { .. } => {
                let first = self.shard_of(start);
                let last = match end {
                    None => self.shard_count() - 1,
                    // `end` is exclusive: the shard of the last key below `end`.
                    Some(e) if e <= start => return Vec::new(),
                    Some(e) => {
                        let s = self.shard_of(e);
                        match &self.function {
                            ShardFunction::Range { split } if s > 0 && split[s as usize - 1].as_slice() == e => s - 1,
                            _ => s,
                        }
                    }
                };
                (first..=last).collect()
            }
            ShardFunction::Prefix { len, .. } => {
                // A range inside one prefix maps to one shard: `end` shares the prefix, or is at
                // most the first key after every key with that prefix.
                let inside = |e: &[u8]| {
                    let p = &start[..*len];
                    (e.len() >= *len && e[..*len] == *p) || prefix_successor(p).is_some_and(|s| e <= s.as_slice())
                };
                match end {
                    Some(e) if start.len() >= *len && inside(e) => vec![self.shard_of(start)],
                    _ => (0..self.shard_count()).collect(),
                }
            }
            ShardFunction::Hash { .. } => (0..self.shard_count()).collect(),
        }
    }

    /// The dkey under which a shard's keys are stored in the store's KV object.
    pub fn shard_dkey(shard: u32) -> [u8; 5] {
        let b = shard.to_be_bytes();
        [b's', b[0], b[1], b[2], b[3]]
    }
}

/// The first key after every key starting with `p` (`None` when `p` is all 0xff).
fn prefix_successor(p: &[u8]) -> Option<Vec<u8>> {
    let mut s = p.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

impl fmt::Display for ShardFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardFunction::Hash { shards } => write!(f, "hash:{shards}"),
            ShardFunction::Prefix { len, shards } => write!(f, "prefix:{len}:{shards}"),
            ShardFunction::Range { split } => {
                write!(f, "range:")?;
                for (i, s) in split.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{}", String::from_utf8_lossy(s))?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for ShardFunction {
    type Err = ShardMapError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ShardMapError::Parse { input: input.to_owned(), reason: reason.to_owned() };
        let shards_arg = |s: Option<&str>| -> Result<u32, ShardMapError> {
            match s {
                None => Ok(SHARDS_DEFAULT),
                Some(t) => match t.parse::<u32>() {
                    Ok(n) if (1..=SHARDS_MAX).contains(&n) => Ok(n),
                    _ => Err(err(&format!("shard count must be 1..={SHARDS_MAX}"))),
                },
            }
        };
        let mut parts = input.trim().splitn(2, ':');
        let kind = parts.next().unwrap_or_default();
        let rest = parts.next();
        match kind {
            "hash" => Ok(ShardFunction::Hash { shards: shards_arg(rest)? }),
            "prefix" => {
                let rest = rest.ok_or_else(|| err("prefix needs a length, e.g. prefix:4"))?;
                let (len, shards) = match rest.split_once(':') {
                    Some((l, s)) => (l, Some(s)),
                    None => (rest, None),
                };
                let len = match len.parse::<usize>() {
                    Ok(n) if (1..=PREFIX_BYTES_MAX).contains(&n) => n,
                    _ => return Err(err(&format!("prefix length must be 1..={PREFIX_BYTES_MAX}"))),
                };
                Ok(ShardFunction::Prefix { len, shards: shards_arg(shards)? })
            }
            "range" => {
                let rest = rest.ok_or_else(|| err("range needs split points, e.g. range:g,n,t"))?;
                let split: Vec<Vec<u8>> = rest.split(',').map(|s| s.as_bytes().to_vec()).collect();
                if split.iter().any(|s| s.is_empty()) {
                    return Err(err("empty split point"));
                }
                if split.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(err("split points must be strictly increasing"));
                }
                if split.len() + 1 > SHARDS_MAX as usize {
                    return Err(err(&format!("at most {} split points", SHARDS_MAX - 1)));
                }
                Ok(ShardFunction::Range { split })
            }
            _ => Err(err("unknown shard function")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_display_and_errors() {
        assert_eq!("hash".parse::<ShardFunction>().unwrap(), ShardFunction::Hash { shards: SHARDS_DEFAULT });
        assert_eq!("hash:8".parse::<ShardFunction>().unwrap().to_string(), "hash:8");
        assert_eq!("prefix:3".parse::<ShardFunction>().unwrap().to_string(), format!("prefix:3:{SHARDS_DEFAULT}"));
        assert_eq!("range:g,n".parse::<ShardFunction>().unwrap().to_string(), "range:g,n");
        for bad in ["", "hash:0", "hash:99999", "prefix", "prefix:0", "range", "range:n,g", "range:a,,b", "modulo:3"] {
            let e = bad.parse::<ShardFunction>().expect_err(bad);
            assert!(e.to_string().contains("shard function"), "{e}");
        }
    }

    #[test]
    fn range_shards_follow_split_points() {
        let m = ShardMap::new("range:g,n".parse().unwrap());
        assert_eq!(m.shard_count(), 3);
        assert_eq!(m.shard_of(b"apple"), 0);
        assert_eq!(m.shard_of(b"g"), 1);
        assert_eq!(m.shard_of(b"melon"), 1);
        assert_eq!(m.shard_of(b"n"), 2);
        assert_eq!(m.shard_of(b"zebra"), 2);
        assert_eq!(m.shards_for_range(b"a", Some(b"h")), vec![0, 1]);
        assert_eq!(m.shards_for_range(b"a", Some(b"g")), vec![0]);
        assert_eq!(m.shards_for_range(b"h", None), vec![1, 2]);
        assert!(m.shards_for_range(b"h", Some(b"a")).is_empty());
    }

    #[test]
    fn prefix_keeps_a_prefix_on_one_shard() {
        let m = ShardMap::new("prefix:4:16".parse().unwrap());
        let s = m.shard_of(b"user0001");
        for k in [&b"user"[..], b"user9", b"userzzzz"] {
            assert_eq!(m.shard_of(k), s);
        }
        assert_eq!(m.shards_for_range(b"user0000", Some(b"user9999")), vec![s]);
        // Everything under a prefix: [P, successor(P)) is one shard too.
        assert_eq!(m.shards_for_range(b"user", Some(b"uses")), vec![s]);
        assert_eq!(m.shards_for_range(b"user00", Some(b"uses")), vec![s]);
        assert_eq!(m.shards_for_range(b"user", Some(b"uset")).len(), 16);
        assert_eq!(m.shards_for_range(b"use", Some(b"usf")).len(), 16);
    }

    proptest! {
        #[test]
        fn every_key_has_a_shard_in_range(key in proptest::collection::vec(any::<u8>(), 0..40), n in 1u32..100) {
            for f in [ShardFunction::Hash { shards: n }, ShardFunction::Prefix { len: 3, shards: n }] {
                let m = ShardMap::new(f);
                prop_assert!(m.shard_of(&key) < n);
            }
        }
        #[test]
        fn prefix_scan_visits_the_shard_of_every_key_inside(a in proptest::collection::vec(0u8..4, 0..6), b in proptest::collection::vec(0u8..4, 0..6), k in proptest::collection::vec(0u8..4, 0..6)) {
            let m = ShardMap::new(ShardFunction::Prefix { len: 2, shards: 8 });
            let shards = m.shards_for_range(&a, Some(&b));
            if a <= k && k < b {
                prop_assert!(shards.contains(&m.shard_of(&k)));
            }
        }
        #[test]
        fn range_scan_visits_the_shard_of_every_key_inside(a in "[a-z]{0,4}", b in "[a-z]{0,4}", k in "[a-z]{0,4}") {
            let m = ShardMap::new("range:d,h,p,t".parse().unwrap());
            let shards = m.shards_for_range(a.as_bytes(), Some(b.as_bytes()));
            if a.as_bytes() <= k.as_bytes() && k.as_bytes() < b.as_bytes() {
                prop_assert!(shards.contains(&m.shard_of(k.as_bytes())));
            }
        }
    }
}
