//! What a lost erasure-coded shard held, recomputed from the records of surviving shards, and
//! how EC cells are keyed.
//!
//! An EC write stores the cells of a stripe version on the k + p shards under keys that differ
//! only in the offset: shard `i`'s cells sit in its own range of the akey's offsets
//! (`cell_offset`: the shard index above the shard-local offset). So a target may hold cells
//! of two shard indices of one group without their keys meeting: extension gives a target of
//! a group another index, and it serves the old one until the pool switches maps. The cells of
//! one version are found across shards by the key with its offset brought back to shard 0
//! (`key_for_shard(key, 0)`), and any k of them decode the rest. Single values live on data
//! shard 0 and the parity shards; punches live on every shard; both are copied as they are.

use std::collections::BTreeMap;
use strata_ec::EcStripe;
use strata_vos::RawRecord;

/// The records a lost shard must hold again.
#[derive(Debug, Default)]
pub struct RebuiltShard {
    pub records: Vec<RawRecord>,
    /// Stripe versions with fewer than k readable cells among the sources: beyond the
    /// redundancy, they cannot come back.
    pub undecodable: u64,
}

/// Each shard's range of an EC array's stored offsets: shard-local offsets must stay below it
/// (32 TiB a shard), and 20 shards (16 + 4) stay below the object store's array limit.
pub const SHARD_SPAN: u64 = 1 << 45;
const _: () = assert!(20 * SHARD_SPAN <= strata_vos::ARRAY_BYTES_MAX);

/// Where shard `shard` stores the cell bytes at shard-local offset `local`.
pub fn cell_offset(shard: usize, local: u64) -> u64 {
    shard as u64 * SHARD_SPAN + local
}

/// The shard index a stored EC offset belongs to.
pub fn shard_of_offset(stored: u64) -> usize {
    (stored / SHARD_SPAN) as usize
}

/// The shard index of an extent record key (`None` for other rows).
pub fn shard_of_key(key: &[u8]) -> Option<usize> {
    let k = strata_vos::RecordRef { punch: false, key, value: &[] }.record_key()?;
    k.offset.map(shard_of_offset)
}

/// `key` with its cell moved to shard `shard`'s range (extent record keys; other rows' keys are
/// returned as they are). The offset is the 8 bytes before the epoch, the key's last 8.
pub fn key_for_shard(key: &[u8], shard: usize) -> Vec<u8> {
    let mut out = key.to_vec();
    let Some(off) = strata_vos::RecordRef { punch: false, key, value: &[] }.record_key().and_then(|k| k.offset) else { return out };
    let n = out.len();
    out[n - 16..n - 8].copy_from_slice(&cell_offset(shard, off % SHARD_SPAN).to_be_bytes());
    out
}

/// Whether a row of shard `shard` belongs to it: rows without a cell (single values, punches)
/// and cells in its own range. A target may also hold cells of an index an extension took away
/// from it; they are not this shard's.
pub fn own_row(r: &RawRecord, shard: usize) -> bool {
    r.punch || shard_of_key(&r.key).is_none_or(|s| s == shard)
}

/// Whether shard `i` of a k+p group stores single values (see the EC update path).
pub fn holds_singles(k: usize, i: usize) -> bool {
    i == 0 || i >= k
}

/// Records for shard `dest` from `sources` (shard index, that shard's records of the group).
/// Sources may be incomplete (a spare rebuilt earlier, or not yet): each stripe version decodes
/// from whichever k cells exist, and a source's corrupt record is treated as missing.
pub fn rebuild_ec_shard(st: &EcStripe, sources: &[(usize, Vec<RawRecord>)], dest: usize) -> RebuiltShard {
    let (k, p) = (st.k, st.p);
    assert!(dest < k + p, "shard {dest} outside a {k}+{p} group");
    let mut verbatim: BTreeMap<Vec<u8>, RawRecord> = BTreeMap::new();
    let mut stripes: BTreeMap<Vec<u8>, Vec<Option<Vec<u8>>>> = BTreeMap::new();
    let mut template: BTreeMap<Vec<u8>, RawRecord> = BTreeMap::new();
    for (idx, records) in sources {
        if *idx == dest || *idx >= k + p {
            continue;
        }
        for r in records.iter().filter(|r| own_row(r, *idx)) {
            if r.punch {
                verbatim.entry(r.key.clone()).or_insert_with(|| r.clone());
                continue;
            }
            let Some(key) = r.record_key() else { continue };
            match (key.offset, r.payload()) {
                // Extent cell: collect it under its stripe version.
                (Some(_), Ok(Some(cell))) => {
                    let version = key_for_shard(&r.key, 0);
                    let slots = stripes.entry(version.clone()).or_insert_with(|| vec![None; k + p]);
                    slots[*idx] = Some(cell.to_vec());
                    template.entry(version).or_insert_with(|| r.clone());
                }
                // Single value (or an extent punch row): a copy, from a shard that holds it.
                (None, Ok(_)) if holds_singles(k, dest) && holds_singles(k, *idx) => {
                    verbatim.entry(r.key.clone()).or_insert_with(|| r.clone());
                }
                (Some(_), Ok(None)) => {
                    let key = key_for_shard(&r.key, dest);
                    verbatim.entry(key.clone()).or_insert_with(|| RawRecord { key, ..r.clone() });
                }
                _ => {}
            }
        }
    }
    let mut out = RebuiltShard { records: verbatim.into_values().collect(), undecodable: 0 };
    let (keys, mut cells): (Vec<Vec<u8>>, Vec<Vec<Option<Vec<u8>>>>) = stripes.into_iter().unzip();
    let decoded = st.reconstruct_many(&mut cells);
    for ((key, cells), ok) in keys.into_iter().zip(cells).zip(decoded) {
        if ok.is_err() {
            out.undecodable += 1;
            continue;
        }
        if let (Some(cell), Some(t)) = (cells[dest].as_deref(), template.get(&key)) {
            let mut r = t.with_payload(cell);
            r.key = key_for_shard(&key, dest);
            out.records.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{ContId, Epoch, Oid};
    use strata_vos::{Update, UpdateOp, Vos, VosConfig};

    /// Real shards: k + p VOS targets holding the cells of a few stripe versions, written the
    /// way the EC update path writes them.
    fn shards(st: &EcStripe, versions: &[(u64, u8)]) -> (Vec<tempfile::TempDir>, Vec<Vec<RawRecord>>) {
        let (cont, oid) = (ContId::new_random(), Oid::from_u128(77));
        let mut dirs = Vec::new();
        let mut vos = Vec::new();
        for _ in 0..st.k + st.p {
            let d = tempfile::tempdir().unwrap();
            vos.push(Vos::open(d.path(), &VosConfig::default()).unwrap());
            dirs.push(d);
        }
        for &(epoch, fill) in versions {
            let data: Vec<u8> = (0..st.stripe_bytes()).map(|i| (i as u8).wrapping_mul(31) ^ fill).collect();
            let cells: Vec<&[u8]> = data.chunks(st.cell_bytes as usize).collect();
            let parity = st.encode(&cells).unwrap();
            let all: Vec<Vec<u8>> = cells.iter().map(|c| c.to_vec()).chain(parity).collect();
            for (i, cell) in all.into_iter().enumerate() {
                vos[i].update(&[Update { cont, oid, dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Extent { akey: b"a".to_vec(), offset: cell_offset(i, 0), data: cell.into() } }]).unwrap();
                if holds_singles(st.k, i) {
                    vos[i].update(&[Update { cont, oid, dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Single { akey: b"s".to_vec(), value: vec![fill; 10] } }]).unwrap();
                }
            }
        }
        let exports = vos.iter().map(|v| v.export_object(cont, oid).unwrap()).collect();
        (dirs, exports)
    }

    #[test]
    fn every_lost_shard_comes_back_byte_for_byte_from_any_k_survivors() {
        let st = EcStripe::new(4, 2, 4096).unwrap();
        let (_dirs, exports) = shards(&st, &[(10, 1), (20, 2), (30, 3)]);
        for dest in 0..6 {
            // Lose `dest` and one more shard: k survivors remain.
            let other = (dest + 1) % 6;
            let sources: Vec<(usize, Vec<RawRecord>)> = (0..6).filter(|i| *i != dest && *i != other).map(|i| (i, exports[i].clone())).collect();
            let rebuilt = rebuild_ec_shard(&st, &sources, dest);
            assert_eq!(rebuilt.undecodable, 0);
            let mut got = rebuilt.records;
            got.sort_by(|a, b| a.key.cmp(&b.key));
            assert_eq!(got, exports[dest], "shard {dest} differs after rebuild");
        }
    }

    #[test]
    fn cells_of_another_index_on_a_source_are_not_taken_for_its_own() {
        // After an extension gave target 1 shard 0's place too, it holds shard 0's cells (of
        // other content) besides its own, in shard 0's range.
        let st = EcStripe::new(2, 1, 4096).unwrap();
        let (_dirs, exports) = shards(&st, &[(10, 1), (20, 2)]);
        let (_other, foreign) = shards(&st, &[(10, 9), (20, 8)]);
        let mut one = exports[1].clone();
        // Same container as the real shards (keys start with it): same record keys.
        let cont = exports[1][0].key[..16].to_vec();
        one.extend(foreign[0].iter().filter(|r| shard_of_key(&r.key) == Some(0)).map(|r| {
            let mut r = r.clone();
            r.key[..16].copy_from_slice(&cont);
            r
        }));
        one.sort_by(|a, b| a.key.cmp(&b.key));
        assert!(one.len() > exports[1].len());
        let rebuilt = rebuild_ec_shard(&st, &[(1, one), (2, exports[2].clone())], 0);
        assert_eq!(rebuilt.undecodable, 0);
        let mut got = rebuilt.records;
        got.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got, exports[0], "shard 0 must come back from shard 1's own cells only");
    }

    #[test]
    fn keys_move_between_shard_ranges_and_back() {
        let st = EcStripe::new(4, 2, 4096).unwrap();
        let (_dirs, exports) = shards(&st, &[(10, 1)]);
        for r in exports[3].iter().filter(|r| r.record_key().is_some_and(|k| k.offset.is_some())) {
            assert_eq!(shard_of_key(&r.key), Some(3));
            let k0 = key_for_shard(&r.key, 0);
            assert_eq!(k0, exports[0].iter().find(|x| shard_of_key(&x.key) == Some(0)).unwrap().key);
            assert_eq!(key_for_shard(&k0, 3), r.key);
        }
        let single = exports[0].iter().find(|r| shard_of_key(&r.key).is_none()).unwrap();
        assert_eq!(key_for_shard(&single.key, 5), single.key, "single values have no shard range");
    }

    #[test]
    fn fewer_than_k_cells_are_counted_not_invented() {
        let st = EcStripe::new(2, 1, 4096).unwrap();
        let (_dirs, exports) = shards(&st, &[(10, 1)]);
        let rebuilt = rebuild_ec_shard(&st, &[(1, exports[1].clone())], 0);
        assert_eq!(rebuilt.undecodable, 1);
        assert!(rebuilt.records.iter().all(|r| r.record_key().is_none_or(|k| k.offset.is_none())), "no cell may be made up");
    }

    #[test]
    fn a_corrupt_source_cell_is_treated_as_missing() {
        let st = EcStripe::new(2, 1, 4096).unwrap();
        let (_dirs, exports) = shards(&st, &[(10, 1)]);
        let mut bad = exports[1].clone();
        for r in bad.iter_mut() {
            if r.record_key().is_some_and(|k| k.offset.is_some()) {
                let n = r.value.len();
                r.value[n - 1] ^= 0xff;
            }
        }
        // Shard 0 from {1 (corrupt), 2}: only one good cell, so nothing decodes.
        let rebuilt = rebuild_ec_shard(&st, &[(1, bad), (2, exports[2].clone())], 0);
        assert_eq!(rebuilt.undecodable, 1);
    }
}
