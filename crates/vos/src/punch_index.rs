//! Object, dkey and akey punches, kept in memory (they are few) and persisted in the
//! `Punches` space. A version is hidden at read epoch `E` when a punch at or below `E` covers
//! it and is at least as new as the version.

use crate::key_codec::{object_prefix, push_escaped, take_escaped};
use std::collections::HashMap;
use std::sync::RwLock;
use strata_types::{ContId, Epoch, Oid};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PunchScope {
    Object,
    Dkey(Vec<u8>),
    Akey(Vec<u8>, Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PunchEntry {
    pub cont: ContId,
    pub oid: Oid,
    pub scope: PunchScope,
    pub epoch: Epoch,
}

impl PunchEntry {
    pub fn encode_key(&self) -> Vec<u8> {
        let mut k = object_prefix(self.cont, self.oid);
        match &self.scope {
            PunchScope::Object => k.push(0),
            PunchScope::Dkey(d) => {
                k.push(1);
                push_escaped(&mut k, d);
            }
            PunchScope::Akey(d, a) => {
                k.push(2);
                push_escaped(&mut k, d);
                push_escaped(&mut k, a);
            }
        }
        k.extend_from_slice(&(!self.epoch.0).to_be_bytes());
        k
    }

    pub fn decode_key(k: &[u8]) -> Option<PunchEntry> {
        if k.len() < 33 + 8 {
            return None;
        }
        let cont = ContId(uuid::Uuid::from_slice(&k[..16]).ok()?);
        let oid = Oid::from_bytes(k[16..32].try_into().ok()?);
        let (level, rest) = (k[32], &k[33..]);
        let (scope, rest) = match level {
            0 => (PunchScope::Object, rest),
            1 => {
                let (d, rest) = take_escaped(rest)?;
                (PunchScope::Dkey(d), rest)
            }
            2 => {
                let (d, rest) = take_escaped(rest)?;
                let (a, rest) = take_escaped(rest)?;
                (PunchScope::Akey(d, a), rest)
            }
            _ => return None,
        };
        let epoch = Epoch(!u64::from_be_bytes(rest.try_into().ok()?));
        Some(PunchEntry { cont, oid, scope, epoch })
    }
}

#[derive(Default)]
struct ObjectPunches {
    object: Vec<Epoch>,
    dkeys: HashMap<Vec<u8>, Vec<Epoch>>,
    akeys: HashMap<(Vec<u8>, Vec<u8>), Vec<Epoch>>,
}

fn newest_at_or_below(list: &[Epoch], e: Epoch) -> Option<Epoch> {
    list.iter().copied().filter(|p| *p <= e).max()
}

#[derive(Default)]
pub struct PunchIndex {
    objects: RwLock<HashMap<(ContId, Oid), ObjectPunches>>,
}

impl PunchIndex {
    pub fn insert(&self, p: &PunchEntry) {
        let mut map = self.objects.write().unwrap_or_else(|e| e.into_inner());
        let o = map.entry((p.cont, p.oid)).or_default();
        let list = match &p.scope {
            PunchScope::Object => &mut o.object,
            PunchScope::Dkey(d) => o.dkeys.entry(d.clone()).or_default(),
            PunchScope::Akey(d, a) => o.akeys.entry((d.clone(), a.clone())).or_default(),
        };
        if !list.contains(&p.epoch) {
            list.push(p.epoch);
        }
    }

    /// Forget an object's punches (its rows were deleted: `Vos::reclaim_object`).
    pub fn remove_object(&self, cont: ContId, oid: Oid) {
        self.objects.write().unwrap_or_else(|e| e.into_inner()).remove(&(cont, oid));
    }

    pub fn remove_container(&self, cont: ContId) {
        let mut map = self.objects.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|(c, _), _| *c != cont);
    }

    /// The newest punch at or below `at` that covers `(dkey, akey)` (either may be `None` to ask
    /// about a whole object or dkey).
    pub fn covering(&self, cont: ContId, oid: Oid, dkey: Option<&[u8]>, akey: Option<&[u8]>, at: Epoch) -> Option<Epoch> {
        let map = self.objects.read().unwrap_or_else(|e| e.into_inner());
        let o = map.get(&(cont, oid))?;
        let mut best = newest_at_or_below(&o.object, at);
        if let Some(d) = dkey {
            best = best.max(o.dkeys.get(d).and_then(|l| newest_at_or_below(l, at)));
            if let Some(a) = akey {
                best = best.max(o.akeys.get(&(d.to_vec(), a.to_vec())).and_then(|l| newest_at_or_below(l, at)));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for scope in [PunchScope::Object, PunchScope::Dkey(vec![0, 1]), PunchScope::Akey(b"d".to_vec(), vec![])] {
            let p = PunchEntry { cont: ContId::new_random(), oid: Oid::from_u128(7), scope, epoch: Epoch(99) };
            assert_eq!(PunchEntry::decode_key(&p.encode_key()).unwrap(), p);
        }
    }

    #[test]
    fn covering_takes_the_newest_applicable_punch() {
        let idx = PunchIndex::default();
        let (c, o) = (ContId::nil(), Oid::from_u128(1));
        idx.insert(&PunchEntry { cont: c, oid: o, scope: PunchScope::Object, epoch: Epoch(5) });
        idx.insert(&PunchEntry { cont: c, oid: o, scope: PunchScope::Dkey(b"d".to_vec()), epoch: Epoch(8) });
        assert_eq!(idx.covering(c, o, Some(b"d"), Some(b"a"), Epoch(4)), None);
        assert_eq!(idx.covering(c, o, Some(b"d"), Some(b"a"), Epoch(6)), Some(Epoch(5)));
        assert_eq!(idx.covering(c, o, Some(b"d"), Some(b"a"), Epoch(9)), Some(Epoch(8)));
        assert_eq!(idx.covering(c, o, Some(b"x"), None, Epoch(9)), Some(Epoch(5)));
    }
}
