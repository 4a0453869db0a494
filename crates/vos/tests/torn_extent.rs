//! Extent bytes and their index rows are synced at the same time, so a power loss can leave a
//! row durable without its bytes. Such a write was never acknowledged: the next open must drop
//! the row (readers see the version before it), while damage to an extent that was acknowledged
//! is still reported as corruption, never silently dropped.

use bytes::Bytes;
use std::path::Path;
use strata_types::{ContId, Epoch, Oid};
use strata_vos::*;

mod common;
use common::xorshift_bytes;

const LEN: usize = 1 << 20;

fn pattern(seed: u64) -> Vec<u8> {
    xorshift_bytes(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1, LEN)
}

fn extent(cont: ContId, epoch: u64, data: &[u8]) -> Update {
    Update { cont, oid: Oid::from_u128(3), dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: Bytes::copy_from_slice(data) } }
}

fn single(cont: ContId, epoch: u64) -> Update {
    Update { cont, oid: Oid::from_u128(3), dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Single { akey: b"s".to_vec(), value: b"later".to_vec() } }
}

/// What a power loss does to blocks written but not synced: they read back as zeros.
fn zero_on_disk(dir: &Path, data: &[u8]) {
    let needle = &data[..256];
    for e in std::fs::read_dir(dir.join("extents")).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[pos..pos + data.len()].fill(0);
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("the extent's bytes are in no extent file");
}

#[test]
fn an_extent_whose_bytes_never_reached_the_disk_is_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let c = ContId::new_random();
    let (v1, v2) = (pattern(1), pattern(2));
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        vos.update(&[extent(c, 5, &v1)]).unwrap();
        vos.update(&[single(c, 6)]).unwrap();
        // The power fails after v2's index row is durable, before its pending row is deleted,
        // and (below) before its bytes reached the disk.
        vos.update_then_stop_before_settling(&[extent(c, 7, &v2)]).unwrap();
    }
    zero_on_disk(dir.path(), &v2);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let read = vos.fetch_extent(c, Oid::from_u128(3), b"d", b"a", 0, LEN as u64, Epoch::MAX).unwrap();
    assert!(read.data == v1, "the newest complete version is v1");
    assert_eq!(vos.fetch_single(c, Oid::from_u128(3), b"d", b"s", Epoch::MAX).unwrap().map(|(e, _)| e), Some(Epoch(6)), "other rows are kept");
    let report = vos.verify_all().unwrap();
    assert!(report.corrupt.is_empty() && report.engine_errors.is_empty(), "nothing left corrupt: {report:?}");
    // The store takes writes as before, and the dropped row stays dropped after another open.
    vos.update(&[extent(c, 9, &v2)]).unwrap();
    drop(vos);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    assert!(vos.fetch_extent(c, Oid::from_u128(3), b"d", b"a", 0, LEN as u64, Epoch(8)).unwrap().data == v1);
    assert!(vos.fetch_extent(c, Oid::from_u128(3), b"d", b"a", 0, LEN as u64, Epoch::MAX).unwrap().data == v2);
}

#[test]
fn damage_to_an_acknowledged_extent_is_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let c = ContId::new_random();
    let v1 = pattern(3);
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        vos.update(&[extent(c, 5, &v1)]).unwrap();
        vos.update(&[single(c, 6)]).unwrap();
    }
    zero_on_disk(dir.path(), &v1);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let err = vos.fetch_extent(c, Oid::from_u128(3), b"d", b"a", 0, LEN as u64, Epoch::MAX).expect_err("damaged bytes must not read back");
    assert!(matches!(err, VosError::Corrupt { .. }), "{err}");
}

/// A write's pending-extent row is deleted by a deferred batch that rides along with a later
/// group; `flush` (what scrub runs before it checks) commits it first, so damage found after a
/// crash that follows a flush is corruption, not a torn write.
#[test]
fn after_a_flush_damage_to_an_acknowledged_extent_is_corruption_even_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = ContId::new_random();
    let v1 = pattern(4);
    // Deferred rows never time out here: only the flush can commit them.
    let cfg = VosConfig { deferred_idle_ms: 3_600_000, ..VosConfig::default() };
    {
        let vos = Vos::open(dir.path(), &cfg).unwrap();
        vos.update(&[extent(c, 5, &v1)]).unwrap();
        vos.flush().unwrap();
        vos.stop_losing_deferred_rows();
    }
    zero_on_disk(dir.path(), &v1);
    let vos = Vos::open(dir.path(), &cfg).unwrap();
    let err = vos.fetch_extent(c, Oid::from_u128(3), b"d", b"a", 0, LEN as u64, Epoch::MAX).expect_err("damaged bytes must not read back");
    assert!(matches!(err, VosError::Corrupt { .. }), "{err}");
}
