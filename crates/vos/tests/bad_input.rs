//! Bad input gets a specific error, never a panic, and loses nothing already acknowledged.

use strata_types::{ContId, Epoch, Oid};
use strata_vos::*;

mod common;
use common::xorshift_bytes;

fn upd(cont: ContId, dkey: &[u8], op: UpdateOp) -> Update {
    Update { cont, oid: Oid::from_u128(1), dkey: dkey.to_vec(), epoch: Epoch(10), op }
}

#[test]
fn oversized_and_empty_inputs_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let c = ContId::new_random();
    vos.update(&[upd(c, b"d", UpdateOp::Single { akey: b"a".to_vec(), value: b"kept".to_vec() })]).unwrap();

    let cases: Vec<(Update, &str)> = vec![
        (upd(c, &vec![b'k'; KEY_BYTES_MAX + 1], UpdateOp::PunchDkey), "dkey is 4097 bytes"),
        (upd(c, b"", UpdateOp::PunchDkey), "dkey must not be empty"),
        (upd(c, b"d", UpdateOp::Single { akey: vec![1; KEY_BYTES_MAX + 1], value: vec![] }), "akey is"),
        (upd(c, b"d", UpdateOp::Single { akey: b"a".to_vec(), value: vec![0; VALUE_BYTES_MAX + 1] }), "single value is"),
        (upd(c, b"d", UpdateOp::Extent { akey: b"x".to_vec(), offset: 0, data: vec![0; EXTENT_BYTES_MAX as usize + 1].into() }), "extent is"),
        (upd(c, b"d", UpdateOp::Extent { akey: b"x".to_vec(), offset: ARRAY_BYTES_MAX, data: vec![1].into() }), "past the array limit"),
        (upd(c, b"d", UpdateOp::Extent { akey: b"x".to_vec(), offset: u64::MAX, data: vec![1].into() }), "past the array limit"),
        (upd(c, b"d", UpdateOp::Extent { akey: b"x".to_vec(), offset: 0, data: vec![].into() }), "extent data must not be empty"),
        (upd(c, b"d", UpdateOp::PunchExtent { akey: b"x".to_vec(), offset: 0, len: u64::MAX / 2 }), "past the array limit"),
    ];
    for (u, needle) in cases {
        // A bad update inside an otherwise good batch refuses the whole batch.
        let good = upd(c, b"d", UpdateOp::Single { akey: b"a".to_vec(), value: b"overwritten?".to_vec() });
        let err = vos.update(&[good, u]).expect_err(needle);
        assert!(err.to_string().contains(needle), "{needle}: got {err}");
    }
    let too_many: Vec<Update> = (0..BATCH_UPDATES_MAX + 1).map(|_| upd(c, b"d", UpdateOp::PunchDkey)).collect();
    assert!(matches!(vos.update(&too_many), Err(VosError::BatchTooLarge { .. })));
    assert!(matches!(vos.fetch_extent(c, Oid::from_u128(1), b"d", b"x", 0, FETCH_BYTES_MAX + 1, Epoch::MAX), Err(VosError::TooLarge { .. })));

    assert_eq!(vos.fetch_single(c, Oid::from_u128(1), b"d", b"a", Epoch::MAX).unwrap().unwrap().1, b"kept");
}

#[test]
fn unknown_containers_and_objects_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let c = ContId::new_random();
    let o = Oid::from_u128(42);
    assert_eq!(vos.fetch_single(c, o, b"d", b"a", Epoch::MAX).unwrap(), None);
    let r = vos.fetch_extent(c, o, b"d", b"a", 100, 10, Epoch::MAX).unwrap();
    assert_eq!(r.data, vec![0; 10]);
    assert!(r.written.is_empty());
    assert!(vos.list_objects(c, Epoch::MAX, None, 10).unwrap().items.is_empty());
    assert!(vos.list_dkeys(c, o, Epoch::MAX, None, 10).unwrap().items.is_empty());
    assert!(vos.list_containers().unwrap().is_empty());
}

#[test]
fn foreign_or_future_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("important.txt"), b"not yours").unwrap();
    let err = Vos::open(dir.path(), &VosConfig::default()).err().expect("must refuse");
    assert!(matches!(err, VosError::OpenFailed { .. }), "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("important.txt")).unwrap(), b"not yours");

    let dir = tempfile::tempdir().unwrap();
    drop(Vos::open(dir.path(), &VosConfig::default()).unwrap());
    std::fs::write(dir.path().join("STRATA_TARGET"), b"99").unwrap();
    let err = Vos::open(dir.path(), &VosConfig::default()).err().expect("must refuse");
    assert!(matches!(err, VosError::FormatVersion { .. }), "{err}");
    // An older format too: its erasure-coded cells sit where this build does not look.
    std::fs::write(dir.path().join("STRATA_TARGET"), b"2").unwrap();
    let err = Vos::open(dir.path(), &VosConfig::default()).err().expect("must refuse");
    assert!(matches!(err, VosError::FormatVersion { .. }) && err.to_string().contains('2'), "{err}");

    // A target whose engine directory is garbage is refused with the engine's reason.
    let dir = tempfile::tempdir().unwrap();
    drop(Vos::open(dir.path(), &VosConfig::default()).unwrap());
    let db = dir.path().join("db");
    for entry in std::fs::read_dir(&db).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, b"garbage garbage garbage").unwrap();
        }
    }
    match Vos::open(dir.path(), &VosConfig::default()) {
        Err(e) => assert!(matches!(e, VosError::OpenFailed { .. } | VosError::Corrupt { .. }), "{e}"),
        Ok(v) => {
            // If the engine recovers from an empty state, reads must not panic.
            let _ = v.list_containers();
        }
    }
}

#[test]
fn a_flipped_byte_on_disk_reads_as_corrupt_never_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let c = ContId::new_random();
    let o = Oid::from_u128(9);
    // A distinctive 64 KiB value, large enough to live in a blob file after a flush.
    let value = xorshift_bytes(0x9e3779b97f4a7c15, 65536);
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        vos.update(&[Update { cont: c, oid: o, dkey: b"d".to_vec(), epoch: Epoch(5), op: UpdateOp::Single { akey: b"a".to_vec(), value: value.clone() } }]).unwrap();
        vos.flush().unwrap();
    }
    // Find the file holding the value and flip one byte in its middle.
    let needle = &value[30000..30064];
    let mut hit = None;
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            hit = Some((entry, pos + 10));
            break;
        }
    }
    let (file, pos) = hit.expect("the value is stored uncompressed in some file");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[pos] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();

    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let err = vos.fetch_single(c, o, b"d", b"a", Epoch::MAX).expect_err("a corrupted value must not be returned");
    assert!(matches!(err, VosError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("repaired from a replica"), "{err}");
    let report = vos.verify_all().unwrap();
    assert!(!report.corrupt.is_empty() || !report.engine_errors.is_empty(), "scrub must report the corruption");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A read loads only the versions it returns: an older extent wholly overwritten is neither
/// read nor checksummed (each would cost a read of its whole extent), so even damage to it
/// does not fail reads of the newer one; reading at its own epoch still catches the damage.
#[test]
fn a_read_loads_only_the_versions_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (c, o) = (ContId::new_random(), Oid::from_u128(9));
    let bytes = |seed: u64| xorshift_bytes(seed, 65536);
    let (old, new) = (bytes(0x9e3779b97f4a7c15), bytes(0x1234_5678_9abc_def1));
    let put = |vos: &Vos, epoch: u64, data: &[u8], offset: u64| {
        vos.update(&[Update { cont: c, oid: o, dkey: b"d".to_vec(), epoch: Epoch(epoch), op: UpdateOp::Extent { akey: b"a".to_vec(), offset, data: data.to_vec().into() } }]).unwrap();
    };
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        put(&vos, 5, &old, 0);
        put(&vos, 6, &new, 0);
        put(&vos, 7, &old[..4096], 4096);
    }
    let needle = &old[30000..30064];
    let file = walk(&dir.path().join("extents")).into_iter().find(|p| std::fs::read(p).unwrap().windows(needle.len()).any(|w| w == needle)).expect("the old extent is in an extent file");
    let mut b = std::fs::read(&file).unwrap();
    let pos = b.windows(needle.len()).position(|w| w == needle).unwrap();
    b[pos + 10] ^= 0x40;
    std::fs::write(&file, b).unwrap();

    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let mut want = new.clone();
    want[4096..8192].copy_from_slice(&old[..4096]);
    let r = vos.fetch_extent(c, o, b"d", b"a", 0, 65536, Epoch::MAX).unwrap();
    assert_eq!(r.data, want);
    assert_eq!(r.written, vec![(0, 65536)]);
    assert_eq!(vos.fetch_extent(c, o, b"d", b"a", 4096, 4096, Epoch(7)).unwrap().data, old[..4096]);
    assert_eq!(vos.list_extents(c, o, b"d", b"a", Epoch::MAX).unwrap(), vec![(0, 65536)]);
    let err = vos.fetch_extent(c, o, b"d", b"a", 0, 65536, Epoch(5)).expect_err("the damaged version must not be returned");
    assert!(matches!(err, VosError::Corrupt { .. }), "{err}");
}

/// An export for an import does not hash extents it reads (the importer verifies them), so
/// damage on the source disk must be refused where the rows land: never stored there with a
/// fresh checksum.
#[test]
fn a_damaged_extent_exported_for_import_is_refused_by_the_import() {
    struct ForImport(Vec<(bool, Vec<u8>, Vec<u8>)>);
    impl strata_vos::RecordSink for ForImport {
        fn record(&mut self, punch: bool, key: &[u8], _len: usize) -> &mut Vec<u8> {
            self.0.push((punch, key.to_vec(), Vec::new()));
            &mut self.0.last_mut().expect("just pushed").2
        }
        fn receiver_verifies(&self) -> bool {
            true
        }
    }
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (c, o) = (ContId::new_random(), Oid::from_u128(11));
    let data = xorshift_bytes(0x5151_7a7a_0101_f0f0, 1 << 20);
    {
        let vos = Vos::open(src_dir.path(), &VosConfig::default()).unwrap();
        vos.update(&[Update { cont: c, oid: o, dkey: b"d".to_vec(), epoch: Epoch(5), op: UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: data.clone().into() } }]).unwrap();
    }
    let export = |vos: &Vos| {
        let mut sink = ForImport(Vec::new());
        vos.export_object_page_to(c, o, None, 16 << 20, &|_| true, &mut sink).map(|_| sink.0)
    };
    let import = |rows: &[(bool, Vec<u8>, Vec<u8>)]| {
        let dst = Vos::open(dst_dir.path(), &VosConfig::default()).unwrap();
        let refs: Vec<strata_vos::RecordRef<'_>> = rows.iter().map(|(p, k, v)| strata_vos::RecordRef { punch: *p, key: k, value: v }).collect();
        (dst.import_refs(&refs), dst)
    };
    // Undamaged, the rows import and read back.
    let rows = export(&Vos::open(src_dir.path(), &VosConfig::default()).unwrap()).unwrap();
    let (r, dst) = import(&rows);
    r.unwrap();
    assert_eq!(dst.fetch_extent(c, o, b"d", b"a", 0, 1 << 20, Epoch::MAX).unwrap().data, data);
    drop(dst);
    std::fs::remove_dir_all(dst_dir.path()).unwrap();
    std::fs::create_dir_all(dst_dir.path()).unwrap();

    let needle = &data[500_000..500_064];
    let file = walk(&src_dir.path().join("extents")).into_iter().find(|p| std::fs::read(p).unwrap().windows(needle.len()).any(|w| w == needle)).expect("the extent is in an extent file");
    let mut b = std::fs::read(&file).unwrap();
    let pos = b.windows(needle.len()).position(|w| w == needle).unwrap();
    b[pos + 3] ^= 0x08;
    std::fs::write(&file, b).unwrap();
    // Where direct reads are refused the export reads through the page cache and checks the
    // bytes itself; either way nothing damaged is stored.
    let rows = match export(&Vos::open(src_dir.path(), &VosConfig::default()).unwrap()) {
        Ok(rows) => rows,
        Err(e) => return assert!(matches!(e, VosError::Corrupt { .. }), "{e}"),
    };
    let (r, dst) = import(&rows);
    assert!(matches!(r, Err(VosError::Corrupt { .. })), "a damaged extent was imported: {r:?}");
    assert!(dst.fetch_extent(c, o, b"d", b"a", 0, 1 << 20, Epoch::MAX).unwrap().written.is_empty(), "the import stored something");
}
