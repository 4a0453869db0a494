//! Model-based test: random sequences of updates, punches, reads, enumerations and
//! aggregations at random (out-of-order) epochs must agree with a plain in-memory model.
//! Some writes land below earlier aggregations (late writes, rebuild imports): reads that
//! aggregation promised to keep must still agree, and the others must be refused.

use proptest::prelude::*;
use std::collections::{BTreeSet, HashSet};
use strata_types::{ContId, Epoch, Oid};
use strata_vos::{AggregateLimits, Update, UpdateOp, Vos, VosConfig, VosError};

#[derive(Clone, Debug)]
enum Op {
    Single { o: u8, d: u8, a: u8, v: u8, e: u16 },
    Extent { o: u8, d: u8, a: u8, off: u8, len: u8, fill: u8, e: u16 },
    PunchExtent { o: u8, d: u8, a: u8, off: u8, len: u8, e: u16 },
    PunchAkey { o: u8, d: u8, a: u8, e: u16 },
    PunchDkey { o: u8, d: u8, e: u16 },
    PunchObject { o: u8, e: u16 },
    Read { o: u8, d: u8, a: u8, e: u16 },
    ReadExtent { o: u8, d: u8, a: u8, off: u8, len: u8, e: u16 },
    List { o: u8, e: u16 },
    Aggregate { upto: u16, keep: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0u8..2;
    prop_oneof![
        4 => (k.clone(), k.clone(), k.clone(), any::<u8>(), any::<u16>()).prop_map(|(o, d, a, v, e)| Op::Single { o, d, a, v, e }),
        4 => (k.clone(), k.clone(), k.clone(), 0u8..64, 1u8..40, any::<u8>(), any::<u16>()).prop_map(|(o, d, a, off, len, fill, e)| Op::Extent { o, d, a, off, len, fill, e }),
        1 => (k.clone(), k.clone(), k.clone(), 0u8..64, 1u8..40, any::<u16>()).prop_map(|(o, d, a, off, len, e)| Op::PunchExtent { o, d, a, off, len, e }),
        1 => (k.clone(), k.clone(), k.clone(), any::<u16>()).prop_map(|(o, d, a, e)| Op::PunchAkey { o, d, a, e }),
        1 => (k.clone(), k.clone(), any::<u16>()).prop_map(|(o, d, e)| Op::PunchDkey { o, d, e }),
        1 => (k.clone(), any::<u16>()).prop_map(|(o, e)| Op::PunchObject { o, e }),
        4 => (k.clone(), k.clone(), k.clone(), any::<u16>()).prop_map(|(o, d, a, e)| Op::Read { o, d, a, e }),
        4 => (k.clone(), k.clone(), k.clone(), 0u8..80, 1u8..60, any::<u16>()).prop_map(|(o, d, a, off, len, e)| Op::ReadExtent { o, d, a, off, len, e }),
        2 => (k.clone(), any::<u16>()).prop_map(|(o, e)| Op::List { o, e }),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(upto, keep)| Op::Aggregate { upto, keep }),
    ]
}

#[derive(Clone, Copy, PartialEq)]
enum Scope {
    Object(u8),
    Dkey(u8, u8),
    Akey(u8, u8, u8),
}

#[derive(Default)]
struct Model {
    singles: Vec<((u8, u8, u8), u64, Vec<u8>)>,
    extents: Vec<((u8, u8, u8), u64, u64, u64, Option<Vec<u8>>)>, // key, epoch, off, len, data
    punches: Vec<(Scope, u64)>,
}

impl Model {
    fn hidden(&self, o: u8, d: u8, a: u8, at: u64) -> Option<u64> {
        self.punches
            .iter()
            .filter(|(s, e)| *e <= at && (*s == Scope::Object(o) || *s == Scope::Dkey(o, d) || *s == Scope::Akey(o, d, a)))
            .map(|(_, e)| *e)
            .max()
    }
    fn single(&self, o: u8, d: u8, a: u8, at: u64) -> Option<Vec<u8>> {
        let best = self.singles.iter().filter(|(k, e, _)| *k == (o, d, a) && *e <= at).max_by_key(|(_, e, _)| *e)?;
        if self.hidden(o, d, a, at).is_some_and(|h| best.1 <= h) {
            return None;
        }
        Some(best.2.clone())
    }
    fn extent(&self, o: u8, d: u8, a: u8, off: u64, len: u64, at: u64) -> (Vec<u8>, Vec<bool>) {
        let h = self.hidden(o, d, a, at);
        let mut rows: Vec<_> = self.extents.iter().filter(|r| r.0 == (o, d, a) && r.1 <= at && h.is_none_or(|h| r.1 > h)).collect();
        rows.sort_by_key(|r| (r.1, r.2));
        let mut data = vec![0u8; len as usize];
        let mut written = vec![false; len as usize];
        for r in rows {
            for b in r.2.max(off)..(r.2 + r.3).min(off + len) {
                let i = (b - off) as usize;
                match &r.4 {
                    Some(bytes) => {
                        data[i] = bytes[(b - r.2) as usize];
                        written[i] = true;
                    }
                    None => {
                        data[i] = 0;
                        written[i] = false;
                    }
                }
            }
        }
        (data, written)
    }
    /// Listed while a read returns something: the single value, or a written byte of the array.
    fn akey_visible(&self, o: u8, d: u8, a: u8, at: u64) -> bool {
        self.single(o, d, a, at).is_some() || self.extent(o, d, a, 0, ARRAY_END, at).1.contains(&true)
    }
}

/// Past the last byte any generated extent or extent punch reaches (offsets < 64, lengths < 40).
const ARRAY_END: u64 = 128;

fn oid(o: u8) -> Oid {
    Oid::from_u128(0x100 + o as u128)
}
fn name(prefix: u8, i: u8) -> Vec<u8> {
    vec![prefix, b'0' + i]
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let cont = ContId::new_random();
    let mut m = Model::default();
    let mut used = HashSet::new();
    // Reads are compared only where aggregation promised to keep history.
    let mut aggregations: Vec<(u64, BTreeSet<u64>)> = Vec::new();
    let floor = |aggs: &Vec<(u64, BTreeSet<u64>)>| aggs.iter().map(|a| a.0).max().unwrap_or(0);
    let comparable = |aggs: &Vec<(u64, BTreeSet<u64>)>, e: u64| aggs.iter().all(|(u, r)| e >= *u || r.contains(&e));
    let mut fresh = |raw: u16, aggs: &Vec<(u64, BTreeSet<u64>)>| {
        // One write in four is late: at any epoch, possibly below what was aggregated.
        let mut e = if raw.is_multiple_of(4) { raw as u64 / 4 % (floor(aggs) + 1) } else { floor(aggs) + 1 + raw as u64 };
        while !used.insert(e) {
            e += 1;
        }
        e
    };
    let upd = |o: u8, d: u8, e: u64, op: UpdateOp| Update { cont, oid: oid(o), dkey: name(b'd', d), epoch: Epoch(e), op };
    for op in ops {
        match op {
            Op::Single { o, d, a, v, e } => {
                let e = fresh(e, &aggregations);
                let value = vec![v; 1 + (v % 7) as usize];
                vos.update(&[upd(o, d, e, UpdateOp::Single { akey: name(b'a', a), value: value.clone() })]).unwrap();
                m.singles.push(((o, d, a), e, value));
            }
            Op::Extent { o, d, a, off, len, fill, e } => {
                let e = fresh(e, &aggregations);
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i)).collect();
                vos.update(&[upd(o, d, e, UpdateOp::Extent { akey: name(b'x', a), offset: off as u64, data: data.clone().into() })]).unwrap();
                m.extents.push(((o, d, a), e, off as u64, len as u64, Some(data)));
            }
            Op::PunchExtent { o, d, a, off, len, e } => {
                let e = fresh(e, &aggregations);
                vos.update(&[upd(o, d, e, UpdateOp::PunchExtent { akey: name(b'x', a), offset: off as u64, len: len as u64 })]).unwrap();
                m.extents.push(((o, d, a), e, off as u64, len as u64, None));
            }
            Op::PunchAkey { o, d, a, e } => {
                let e = fresh(e, &aggregations);
                // Punch both the single-value akey and the array akey of the same index.
                vos.update(&[upd(o, d, e, UpdateOp::PunchAkey { akey: name(b'a', a) }), upd(o, d, e, UpdateOp::PunchAkey { akey: name(b'x', a) })]).unwrap();
                m.punches.push((Scope::Akey(o, d, a), e));
            }
            Op::PunchDkey { o, d, e } => {
                let e = fresh(e, &aggregations);
                vos.update(&[upd(o, d, e, UpdateOp::PunchDkey)]).unwrap();
                m.punches.push((Scope::Dkey(o, d), e));
            }
            Op::PunchObject { o, e } => {
                let e = fresh(e, &aggregations);
                vos.update(&[upd(o, 0, e, UpdateOp::PunchObject)]).unwrap();
                m.punches.push((Scope::Object(o), e));
            }
            Op::Read { o, d, a, e } => {
                let e = e as u64 + floor(&aggregations) / 2;
                if !comparable(&aggregations, e) {
                    prop_assert!(matches!(vos.fetch_single(cont, oid(o), &name(b'd', d), &name(b'a', a), Epoch(e)), Err(VosError::Aggregated { .. })), "read below the horizon at {} answered", e);
                    continue;
                }
                let got = vos.fetch_single(cont, oid(o), &name(b'd', d), &name(b'a', a), Epoch(e)).unwrap().map(|(_, v)| v);
                prop_assert_eq!(got, m.single(o, d, a, e), "single {} {} {} at {}", o, d, a, e);
            }
            Op::ReadExtent { o, d, a, off, len, e } => {
                let e = e as u64 + floor(&aggregations) / 2;
                if !comparable(&aggregations, e) {
                    prop_assert!(matches!(vos.fetch_extent(cont, oid(o), &name(b'd', d), &name(b'x', a), off as u64, len as u64, Epoch(e)), Err(VosError::Aggregated { .. })), "extent read below the horizon at {} answered", e);
                    continue;
                }
                let got = vos.fetch_extent(cont, oid(o), &name(b'd', d), &name(b'x', a), off as u64, len as u64, Epoch(e)).unwrap();
                let (data, written) = m.extent(o, d, a, off as u64, len as u64, e);
                prop_assert_eq!(&got.data, &data, "extent data at {}", e);
                let mut got_written = vec![false; len as usize];
                for (s, l) in &got.written {
                    for b in *s..s + l {
                        got_written[(b - off as u64) as usize] = true;
                    }
                }
                prop_assert_eq!(got_written, written, "written map at {}", e);
            }
            Op::List { o, e } => {
                let e = e as u64 + floor(&aggregations) / 2;
                if !comparable(&aggregations, e) {
                    prop_assert!(matches!(vos.list_dkeys(cont, oid(o), Epoch(e), None, 100), Err(VosError::Aggregated { .. })), "listing below the horizon at {} answered", e);
                    continue;
                }
                let got = vos.list_dkeys(cont, oid(o), Epoch(e), None, 100).unwrap().items;
                let want: Vec<Vec<u8>> =
                    (0..2).filter(|&d| (0..2).any(|a| m.akey_visible(o, d, a, e))).map(|d| name(b'd', d)).collect();
                prop_assert_eq!(got, want, "dkeys of {} at {}", o, e);
            }
            Op::Aggregate { upto, keep } => {
                let upto = floor(&aggregations) + upto as u64 / 4;
                let retained: BTreeSet<u64> = [keep as u64 % (upto + 1)].into_iter().collect();
                let r: Vec<Epoch> = retained.iter().map(|e| Epoch(*e)).collect();
                if keep % 2 == 0 {
                    vos.aggregate(cont, Epoch(upto), &r).unwrap();
                } else {
                    // In small steps, as the background worker runs it.
                    let limits = AggregateLimits { records_max: 1 + keep as u64 % 3, bytes_max: u64::MAX };
                    let mut from: Option<Vec<u8>> = None;
                    loop {
                        let step = vos.aggregate_step(cont, Epoch(upto), &r, from.as_deref(), limits).unwrap();
                        match step.next {
                            Some(n) => from = Some(n),
                            None => break,
                        }
                    }
                }
                aggregations.push((upto, retained));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn vos_agrees_with_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}

/// The horizon survives a restart: a reopened store still refuses reads whose history is gone,
/// and still answers exactly at the retained epoch and above the horizon.
#[test]
fn horizon_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let o = Oid::from_u128(0x300);
    let put = |vos: &Vos, e: u64, fill: u8| vos.update(&[Update { cont, oid: o, dkey: b"d".to_vec(), epoch: Epoch(e), op: UpdateOp::Extent { akey: b"x".to_vec(), offset: 0, data: vec![fill; 100].into() } }]).unwrap();
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        for e in 1..=20 {
            put(&vos, e * 10, e as u8);
        }
        let stats = vos.aggregate(cont, Epoch(150), &[Epoch(50)]).unwrap();
        assert_eq!(stats.records_examined, 20);
        assert_eq!(stats.records_removed, 13, "kept: epoch 50 (retained), 150 (upto) and the 6 above");
    }
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    let read = |e: u64| vos.fetch_extent(cont, o, b"d", b"x", 0, 100, Epoch(e)).map(|r| r.data);
    assert!(read(55).map_err(|e| e.to_string()).unwrap_err().contains("aggregation horizon"));
    assert_eq!(read(50).unwrap(), vec![5u8; 100]);
    assert_eq!(read(150).unwrap(), vec![15u8; 100]);
    assert_eq!(read(165).unwrap(), vec![16u8; 100]);
    assert_eq!(read(u64::MAX).unwrap(), vec![20u8; 100]);
    assert!(matches!(read(149), Err(VosError::Aggregated { .. })));
}

/// The object index lists every object with data, however often it was written (updates to a
/// known object skip its index row), after a restart, after an import, and again after its
/// container was destroyed and the object written anew.
#[test]
fn object_index_lists_written_objects_across_reopen_destroy_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let (a, b, c) = (Oid::from_u128(0x400), Oid::from_u128(0x401), Oid::from_u128(0x402));
    let put = |vos: &Vos, o: Oid, e: u64| vos.update(&[Update { cont, oid: o, dkey: b"d".to_vec(), epoch: Epoch(e), op: UpdateOp::Single { akey: b"a".to_vec(), value: vec![e as u8] } }]).unwrap();
    let listed = |vos: &Vos| vos.list_objects(cont, Epoch::MAX, None, 100).unwrap().items;
    {
        let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
        for e in 1..=50 {
            put(&vos, a, e);
        }
        put(&vos, b, 60);
        assert_eq!(listed(&vos), vec![a, b]);
        vos.destroy_container(cont).unwrap();
        assert!(listed(&vos).is_empty(), "a destroyed container lists nothing");
        put(&vos, a, 70);
        assert_eq!(listed(&vos), vec![a], "an object written after its container was destroyed is indexed again");
    }
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    assert_eq!(listed(&vos), vec![a]);
    put(&vos, a, 80);
    let other = tempfile::tempdir().unwrap();
    let src = Vos::open(other.path(), &VosConfig::default()).unwrap();
    put(&src, c, 90);
    put(&src, c, 91);
    let rows = src.export_object(cont, c).unwrap();
    vos.import(&rows).unwrap();
    assert_eq!(listed(&vos), vec![a, c]);
}

/// Rebuild's copy of a shard: every version of large and small extents, single values and
/// punches imported on another target reads back the same at every epoch (after a restart
/// too); large extents land in the target's extent files, not inline in the index; rows that
/// name another target's extent file are refused; a punched object is still listed for data
/// movement (its history is needed by readers at older epochs) though not for readers.
#[test]
fn imported_shards_read_the_same_at_every_epoch_with_large_extents_in_extent_files() {
    let (src_dir, dst_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cont = ContId::new_random();
    let (big, punched) = (Oid::from_u128(0x500), Oid::from_u128(0x501));
    let src = Vos::open(src_dir.path(), &VosConfig::default()).unwrap();
    let up = |oid: Oid, e: u64, op: UpdateOp| src.update(&[Update { cont, oid, dkey: b"d".to_vec(), epoch: Epoch(e), op }]).unwrap();
    let ext = |off: u64, len: usize, fill: u8| UpdateOp::Extent { akey: b"a".to_vec(), offset: off, data: vec![fill; len].into() };
    up(big, 10, ext(0, 1 << 20, 1));
    up(big, 20, ext(512 << 10, 1 << 20, 2));
    up(big, 30, ext(100, 1000, 3));
    up(big, 40, UpdateOp::Single { akey: b"s".to_vec(), value: vec![4; 70_000] });
    up(big, 50, UpdateOp::PunchExtent { akey: b"a".to_vec(), offset: 0, len: 4096 });
    up(punched, 10, ext(0, 100 << 10, 5));
    up(punched, 20, UpdateOp::PunchObject);
    let dst = Vos::open(dst_dir.path(), &VosConfig::default()).unwrap();
    let extent_file_bytes = |dir: &std::path::Path| -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir.join("extents")).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()
    };
    let before = extent_file_bytes(dst_dir.path());
    for oid in [big, punched] {
        let rows = src.export_object(cont, oid).unwrap();
        let refs: Vec<strata_vos::RecordRef<'_>> = rows.iter().map(|r| r.as_ref()).collect();
        dst.import_refs(&refs).unwrap();
    }
    assert!(extent_file_bytes(dst_dir.path()) >= before + (2 << 20) + (100 << 10), "large imported extents are not in extent files");
    let check = |dst: &Vos| {
        for e in [5, 10, 15, 20, 30, 40, 50, u64::MAX] {
            for oid in [big, punched] {
                let a = src.fetch_extent(cont, oid, b"d", b"a", 0, 2 << 20, Epoch(e)).unwrap();
                assert_eq!(dst.fetch_extent(cont, oid, b"d", b"a", 0, 2 << 20, Epoch(e)).unwrap(), a, "extent of {oid} at epoch {e}");
                assert_eq!(dst.fetch_single(cont, oid, b"d", b"s", Epoch(e)).unwrap(), src.fetch_single(cont, oid, b"d", b"s", Epoch(e)).unwrap());
            }
        }
        assert_eq!(dst.export_object(cont, big).unwrap(), src.export_object(cont, big).unwrap(), "a copy of a copy differs");
        assert_eq!(dst.list_objects(cont, Epoch::MAX, None, 10).unwrap().items, vec![big], "readers see the punched object");
        assert_eq!(dst.list_stored_objects(cont, None, 10).unwrap().items, vec![big, punched], "data movement misses the punched object's history");
    };
    check(&dst);
    drop(dst);
    let dst = Vos::open(dst_dir.path(), &VosConfig::default()).unwrap();
    check(&dst);
    // A row naming an extent file (of whatever target) is never imported.
    let key = src.export_object(cont, big).unwrap().into_iter().find(|r| !r.punch).unwrap().key;
    let mut forged = vec![1u8, 2];
    forged.extend_from_slice(&(1u64 << 20).to_le_bytes());
    let payload = [0u8; 16];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&forged), &payload);
    forged.extend_from_slice(&crc.to_le_bytes());
    forged.extend_from_slice(&payload);
    let r = dst.import_refs(&[strata_vos::RecordRef { punch: false, key: &key, value: &forged }]);
    assert!(matches!(r, Err(VosError::Corrupt { .. })), "{r:?}");
}

/// The in-place export pages through an object in bounded pages and, concatenated, carries
/// exactly the rows `export_object` does that the filter keeps (extents read back from extent
/// files with valid records), punches last.
#[test]
fn in_place_export_pages_carry_exactly_the_kept_rows() {
    struct Collect(Vec<(bool, Vec<u8>, Vec<u8>)>, Vec<u8>);
    impl strata_vos::RecordSink for Collect {
        fn record(&mut self, punch: bool, key: &[u8], _len: usize) -> &mut Vec<u8> {
            if !self.1.is_empty() || !self.0.is_empty() {
                let v = std::mem::take(&mut self.1);
                if let Some(last) = self.0.last_mut() {
                    last.2 = v;
                }
            }
            self.0.push((punch, key.to_vec(), Vec::new()));
            &mut self.1
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cont = ContId::new_random();
    let oid = Oid::from_u128(0x600);
    let vos = Vos::open(dir.path(), &VosConfig::default()).unwrap();
    for d in 0..12u64 {
        let op = if d % 3 == 0 { UpdateOp::Single { akey: b"s".to_vec(), value: vec![d as u8; 100] } } else { UpdateOp::Extent { akey: b"a".to_vec(), offset: 0, data: vec![d as u8; 300 << 10].into() } };
        vos.update(&[Update { cont, oid, dkey: d.to_be_bytes().to_vec(), epoch: Epoch(10 + d), op }]).unwrap();
    }
    vos.update(&[Update { cont, oid, dkey: 5u64.to_be_bytes().to_vec(), epoch: Epoch(40), op: UpdateOp::PunchDkey }]).unwrap();
    let keep = |r: strata_vos::RecordRef<'_>| r.dkey().is_some_and(|d| d[7] % 2 == 1);
    let want: Vec<(bool, Vec<u8>, Vec<u8>)> = vos.export_object(cont, oid).unwrap().into_iter().filter(|r| keep(r.as_ref())).map(|r| (r.punch, r.key, r.value)).collect();
    let mut got = Vec::new();
    let (mut after, mut pages) = (None::<Vec<u8>>, 0);
    loop {
        let mut sink = Collect(Vec::new(), Vec::new());
        let page = vos.export_object_page_to(cont, oid, after.as_deref(), 600 << 10, &keep, &mut sink).unwrap();
        if let Some(last) = sink.0.last_mut() {
            last.2 = std::mem::take(&mut sink.1);
        }
        assert_eq!(page.records as usize, sink.0.len());
        assert!(page.bytes <= (600 << 10) + (300 << 10) + 200, "page of {} bytes", page.bytes);
        got.extend(sink.0);
        pages += 1;
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert!(pages >= 2, "one page only");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "paged in-place export differs from export_object");
    assert!(got.last().unwrap().0, "the dkey punch comes last");
}

/// An array whose every byte was punched by an extent punch lists as empty, before and after an
/// aggregation that removed the rows under the punch (it used to list until then: the proptest
/// above met this once in a few thousand cases).
#[test]
fn an_array_punched_byte_for_byte_lists_the_same_before_and_after_aggregation() {
    run(vec![
        Op::Extent { o: 0, d: 0, a: 0, off: 0, len: 5, fill: 1, e: 1 },
        Op::PunchExtent { o: 0, d: 0, a: 0, off: 0, len: 10, e: 5 },
        Op::Extent { o: 0, d: 1, a: 1, off: 20, len: 10, fill: 2, e: 9 },
        Op::PunchExtent { o: 0, d: 1, a: 1, off: 25, len: 10, e: 13 },
        Op::List { o: 0, e: 30 },
        Op::Aggregate { upto: 100, keep: 0 },
        Op::List { o: 0, e: 30 },
    ])
    .unwrap();
}
