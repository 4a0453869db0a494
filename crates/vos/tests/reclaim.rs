//! Reclaim of an object shard a target no longer serves (`Vos::reclaim_object`): the rows go
//! durably (a restart does not bring them back), extent-file blocks are freed, other objects
//! and kept rows read as before, and the object can be written or imported again afterwards.

mod common;

use common::xorshift_bytes;
use std::os::unix::fs::MetadataExt;
use strata_vos::{ContId, Epoch, Oid, Update, UpdateOp, Vos, VosConfig};

fn extent_file_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("extents")).map(|d| d.map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()).unwrap_or(0)
}

fn put(vos: &Vos, cont: ContId, oid: Oid, dkey: &[u8], epoch: u64, op: UpdateOp) {
    vos.update(&[Update { cont, oid, dkey: dkey.to_vec(), epoch: Epoch(epoch), op }]).unwrap();
}

fn big(seed: u64) -> UpdateOp {
    UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: xorshift_bytes(seed, 1 << 20).into() }
}

fn single(v: &[u8]) -> UpdateOp {
    UpdateOp::Single { akey: b"s".to_vec(), value: v.to_vec() }
}

#[test]
fn deleting_an_object_removes_every_row_durably_and_frees_its_extents() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let (gone, stays) = (Oid::from_u128(0x10), Oid::from_u128(0x11));
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for e in 1..=4 {
        put(&vos, cont, gone, format!("d{e}").as_bytes(), 10 * e, big(e));
        put(&vos, cont, gone, b"s", 10 * e + 1, single(&[e as u8; 100]));
    }
    put(&vos, cont, gone, b"s", 60, UpdateOp::PunchDkey);
    put(&vos, cont, stays, b"d", 70, big(9));
    put(&vos, cont, stays, b"s", 71, single(b"kept"));
    let before = extent_file_bytes(dir.path());
    let s = vos.delete_object(cont, gone).unwrap();
    assert!(s.object_removed, "{s:?}");
    // Four 1 MiB extents and four small values (extent punch rows: none).
    assert_eq!(s.records, 8, "{s:?}");
    assert_eq!(s.bytes, 4 * (1 << 20) + 4 * 100, "{s:?}");
    assert!(extent_file_bytes(dir.path()) + (4 << 20) <= before, "the deleted extents' blocks were not freed: {before} then {}", extent_file_bytes(dir.path()));
    let check = |vos: &Vos| {
        assert_eq!(vos.list_stored_objects(cont, None, 10).unwrap().items, vec![stays]);
        assert!(vos.export_object(cont, gone).unwrap().is_empty(), "rows of the deleted object are left");
        for e in 1..=4u64 {
            assert!(vos.fetch_extent(cont, gone, format!("d{e}").as_bytes(), b"a", 0, 1 << 20, Epoch::MAX).unwrap().written.is_empty());
        }
        assert_eq!(vos.fetch_single(cont, gone, b"s", b"s", Epoch(45)).unwrap(), None);
        assert_eq!(vos.fetch_extent(cont, stays, b"d", b"a", 0, 1 << 20, Epoch::MAX).unwrap().data, xorshift_bytes(9, 1 << 20));
        assert_eq!(vos.fetch_single(cont, stays, b"s", b"s", Epoch::MAX).unwrap(), Some((Epoch(71), b"kept".to_vec())));
    };
    check(&vos);
    drop(vos);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    check(&vos);
    // The only object of a container: the container no longer lists either.
    vos.delete_object(cont, stays).unwrap();
    assert!(vos.list_containers().unwrap().is_empty());
    // Deleting what is not there deletes nothing.
    assert_eq!(vos.delete_object(cont, gone).unwrap().records, 0);
}

/// Only the selected rows go (the dkeys of groups the target no longer holds); the object, its
/// punches and the other rows stay and read as before.
#[test]
fn reclaiming_some_dkeys_keeps_the_rest_of_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let oid = Oid::from_u128(0x20);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for d in 0..6u8 {
        put(&vos, cont, oid, &[d], 10 + d as u64, single(&[d; 50]));
        put(&vos, cont, oid, &[d], 20 + d as u64, big(d as u64 + 1));
    }
    put(&vos, cont, oid, &[1], 40, UpdateOp::PunchAkey { akey: b"s".to_vec() });
    let odd = |k: &strata_vos::RecordKey| k.dkey[0] % 2 == 1;
    let s = vos.reclaim_object(cont, oid, &odd).unwrap();
    assert!(!s.object_removed);
    assert_eq!(s.records, 6);
    assert_eq!(vos.list_stored_objects(cont, None, 10).unwrap().items, vec![oid]);
    for d in 0..6u8 {
        let single = vos.fetch_single(cont, oid, &[d], b"s", Epoch::MAX).unwrap();
        let ext = vos.fetch_extent(cont, oid, &[d], b"a", 0, 1 << 20, Epoch::MAX).unwrap();
        if d % 2 == 1 {
            assert_eq!(single, None, "dkey {d}");
            assert!(ext.written.is_empty(), "dkey {d}");
        } else {
            assert_eq!(single, Some((Epoch(10 + d as u64), vec![d; 50])), "dkey {d}");
            assert_eq!(ext.data, xorshift_bytes(d as u64 + 1, 1 << 20), "dkey {d}");
        }
    }
    // The akey punch of dkey 1 is kept: history at older epochs is still hidden by it once
    // an import brings the rows back.
    let punches = vos.export_object(cont, oid).unwrap().into_iter().filter(|r| r.punch).count();
    assert_eq!(punches, 1);
}

/// A deleted object is written again later (the target becomes one of its places under a newer
/// map): the new write lists it again, and an import of its old rows brings them back whole.
#[test]
fn a_deleted_object_can_be_written_and_imported_again() {
    let (src_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cont = ContId::new_random();
    let oid = Oid::from_u128(0x30);
    let src = Vos::open(src_dir.path(), &VosConfig::default()).unwrap();
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for v in [&src, &vos] {
        put(v, cont, oid, b"d", 10, big(3));
        put(v, cont, oid, b"d", 11, single(b"old"));
        put(v, cont, oid, b"d", 12, UpdateOp::PunchExtent { akey: b"a".to_vec(), offset: 0, len: 4096 });
    }
    vos.delete_object(cont, oid).unwrap();
    assert!(vos.list_stored_objects(cont, None, 10).unwrap().items.is_empty());
    // An update after the delete must write the object's index row again.
    put(&vos, cont, oid, b"e", 20, single(b"new"));
    assert_eq!(vos.list_stored_objects(cont, None, 10).unwrap().items, vec![oid], "a write after the delete left its object unlisted");
    vos.import(&src.export_object(cont, oid).unwrap()).unwrap();
    drop(vos);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    assert_eq!(vos.list_stored_objects(cont, None, 10).unwrap().items, vec![oid]);
    for e in [10, 11, 12, u64::MAX] {
        assert_eq!(vos.fetch_extent(cont, oid, b"d", b"a", 0, 1 << 20, Epoch(e)).unwrap(), src.fetch_extent(cont, oid, b"d", b"a", 0, 1 << 20, Epoch(e)).unwrap(), "epoch {e}");
        assert_eq!(vos.fetch_single(cont, oid, b"d", b"s", Epoch(e)).unwrap(), src.fetch_single(cont, oid, b"d", b"s", Epoch(e)).unwrap(), "epoch {e}");
    }
    assert_eq!(vos.fetch_single(cont, oid, b"e", b"s", Epoch::MAX).unwrap(), Some((Epoch(20), b"new".to_vec())));
}

/// An object of more rows than one delete batch holds goes whole.
#[test]
fn an_object_larger_than_one_delete_batch_goes_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let oid = Oid::from_u128(0x40);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for chunk in 0..25u64 {
        let batch: Vec<Update> = (0..1000u64).map(|i| Update { cont, oid, dkey: (chunk * 1000 + i).to_be_bytes().to_vec(), epoch: Epoch(5), op: single(b"x") }).collect();
        vos.update(&batch).unwrap();
    }
    let s = vos.delete_object(cont, oid).unwrap();
    assert_eq!((s.records, s.object_removed), (25_000, true));
    drop(vos);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    assert!(vos.export_object(cont, oid).unwrap().is_empty());
    assert!(vos.list_containers().unwrap().is_empty());
}

/// Several objects in one call (one commit): each loses exactly its selected rows, in order.
#[test]
fn several_objects_are_reclaimed_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let (whole, part, untouched) = (Oid::from_u128(0x50), Oid::from_u128(0x51), Oid::from_u128(0x52));
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for oid in [whole, part, untouched] {
        for d in 0..4u8 {
            put(&vos, cont, oid, &[d], 10, single(&[d; 10]));
        }
    }
    let select = |k: &strata_vos::RecordKey| k.oid == whole || (k.oid == part && k.dkey[0] < 2);
    let s = vos.reclaim_objects(cont, &[whole, part, untouched], &select).unwrap();
    assert_eq!(s.iter().map(|s| (s.records, s.object_removed)).collect::<Vec<_>>(), vec![(4, true), (2, false), (0, false)]);
    drop(vos);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    assert_eq!(vos.list_stored_objects(cont, None, 10).unwrap().items, vec![part, untouched]);
    for d in 0..4u8 {
        assert_eq!(vos.fetch_single(cont, part, &[d], b"s", Epoch::MAX).unwrap().is_some(), d >= 2, "dkey {d}");
        assert!(vos.fetch_single(cont, untouched, &[d], b"s", Epoch::MAX).unwrap().is_some());
    }
}
