//! What a lost erasure-coded shard held, recomputed from the records of surviving shards.
//!
//! An EC write stores every cell of a stripe version under the same record key (same dkey,
//! akey, epoch and shard-local offset) on each of the k + p shards, so the cells of one
//! version are found by key across shards and any k of them decode the rest. Single values
//! live on data shard 0 and the parity shards; punches live on every shard; both are copied.

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
        for r in records {
            if r.punch {
                verbatim.entry(r.key.clone()).or_insert_with(|| r.clone());
                continue;
            }
            let Some(key) = r.record_key() else { continue };
            match (key.offset, r.payload()) {
                // Extent cell: collect it under its stripe version.
                (Some(_), Ok(Some(cell))) => {
                    let slots = stripes.entry(r.key.clone()).or_insert_with(|| vec![None; k + p]);
                    slots[*idx] = Some(cell.to_vec());
                    template.entry(r.key.clone()).or_insert_with(|| r.clone());
                }
                // Single value (or an extent punch row): a copy, from a shard that holds it.
                (None, Ok(_)) if holds_singles(k, dest) && holds_singles(k, *idx) => {
                    verbatim.entry(r.key.clone()).or_insert_with(|| r.clone());
                }
                (Some(_), Ok(None)) => {
                    verbatim.entry(r.key.clone()).or_insert_with(|| r.clone());
                }
                _ => {}
            }
        }
    }
    let mut out = RebuiltShard { records: verbatim.into_values().collect(), undecodable: 0 };
    for (key, mut cells) in stripes {
        if st.reconstruct(&mut cells).is_err() {
            out.undecodable += 1;
            continue;
        }
        if let (Some(cell), Some(t)) = (cells[dest].as_deref(), template.get(&key)) {
            out.records.push(t.with_payload(cell));
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
                vos[i].update(&[Update { cont, oid, dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: cell.into() } }]).unwrap();
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
