//! Background aggregation on a real cluster: the same extents rewritten many times lose their
//! old versions, while reads at the newest epoch and at a retained container snapshot stay
//! exactly what a model of the write history says, a late write below the horizon lands as it
//! would have without aggregation, and a read at an aggregated, unretained epoch is refused.

mod common;

use common::{poll, Cluster};
use std::time::Duration;
use strata_client::{Client, ClusterFile, ObjHandle};
use strata_types::Epoch;

const ARRAY_BYTES: usize = 256 << 10;
const DKEYS: usize = 3;
const ROUNDS: usize = 30;

/// One write of the history: at `epoch`, `data` at `offset` (`None`: a punch of `len` bytes).
#[derive(Clone)]
struct Op {
    epoch: Epoch,
    dkey: usize,
    offset: usize,
    len: usize,
    data: Option<Vec<u8>>,
}

/// The bytes of one dkey at `at` (holes read as zero), and which bytes are written.
fn model(history: &[Op], dkey: usize, at: Epoch) -> (Vec<u8>, Vec<bool>) {
    let mut ops: Vec<&Op> = history.iter().filter(|o| o.dkey == dkey && o.epoch <= at).collect();
    ops.sort_by_key(|o| o.epoch);
    let mut bytes = vec![0u8; ARRAY_BYTES];
    let mut written = vec![false; ARRAY_BYTES];
    for o in ops {
        match &o.data {
            Some(d) => {
                bytes[o.offset..o.offset + o.len].copy_from_slice(d);
                written[o.offset..o.offset + o.len].iter_mut().for_each(|w| *w = true);
            }
            None => {
                bytes[o.offset..o.offset + o.len].iter_mut().for_each(|b| *b = 0);
                written[o.offset..o.offset + o.len].iter_mut().for_each(|w| *w = false);
            }
        }
    }
    (bytes, written)
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn dkey(i: usize) -> Vec<u8> {
    format!("block-{i}").into_bytes()
}

async fn check(obj: &ObjHandle, history: &[Op], at: Epoch, check_written: bool, what: &str) {
    for d in 0..DKEYS {
        let (want, want_written) = model(history, d, at);
        let (got, written) = obj.read(&dkey(d), b"b", 0, ARRAY_BYTES as u64, at).await.unwrap_or_else(|e| panic!("{what}: read of dkey {d} at {at}: {e}"));
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(first_bad.is_none(), "{what}: dkey {d} at {at} differs from the model at byte {first_bad:?}");
        if check_written {
            let mut got_written = vec![false; ARRAY_BYTES];
            for (s, l) in written {
                got_written[s as usize..(s + l) as usize].iter_mut().for_each(|w| *w = true);
            }
            assert!(got_written == want_written, "{what}: dkey {d} at {at}: written ranges differ from the model");
        }
    }
}

fn stats(c: &Cluster) -> Vec<serde_json::Value> {
    let s = c.json(&["pool", "stats", "tank"]);
    s["ranks"].as_object().unwrap().values().map(|r| r["aggregation"].clone()).collect()
}

#[test]
fn aggregation_reclaims_rewritten_extents_and_keeps_retained_reads_exact() {
    let c = Cluster::start(&["--ranks", "3", "--aggregate-interval-ms", "300", "--aggregate-margin-ms", "1000"]);
    c.json(&["cont", "create", "tank", "rp", "--oclass", "RP_3G1", "--rf", "2"]);
    c.json(&["cont", "create", "tank", "ec", "--oclass", "EC_2P1G1", "--rf", "1"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let client = rt.block_on(Client::connect(&cf)).unwrap();
    let mut rng = Lcg(7);
    for (cont, class) in [("rp", "RP_3G1"), ("ec", "EC_2P1G1")] {
        let is_ec = cont == "ec";
        let h = rt.block_on(client.container("tank", cont)).unwrap();
        let obj = rt.block_on(h.create_object(class.parse().unwrap())).unwrap();
        let mut history: Vec<Op> = Vec::new();
        let mut snapshot = None;
        let mut mid_epoch = Epoch::ZERO;
        for round in 0..ROUNDS {
            for d in 0..DKEYS {
                // dkey 0 rewrites the very same extent every round; the others overlap at random.
                let (offset, len) = if d == 0 {
                    (0, 64 << 10)
                } else {
                    let len = (16 << 10) + rng.next(48 << 10);
                    (rng.next(ARRAY_BYTES - len), len)
                };
                // One op in eight is a punch (not for EC: its punches are zero writes).
                let punch = !is_ec && d != 0 && rng.next(8) == 0;
                let op = if punch {
                    let epoch = rt.block_on(obj.punch_extent(&dkey(d), b"b", offset as u64, len as u64)).unwrap();
                    Op { epoch, dkey: d, offset, len, data: None }
                } else {
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(round as u8 * 7 + d as u8)).collect();
                    let epoch = rt.block_on(obj.write(&dkey(d), b"b", offset as u64, &data)).unwrap();
                    Op { epoch, dkey: d, offset, len, data: Some(data) }
                };
                history.push(op);
            }
            if round == ROUNDS / 2 {
                let snaps = c.json(&["cont", "snapshot", "create", "tank", cont, "mid"]);
                snapshot = Some(Epoch(snaps["mid"].as_u64().unwrap()));
            }
            if round == ROUNDS * 3 / 4 {
                mid_epoch = history.last().unwrap().epoch;
            }
        }
        let snapshot = snapshot.unwrap();
        let last = history.iter().map(|o| o.epoch).max().unwrap();
        // Every rank has aggregated past the last write.
        poll(&format!("{cont}: aggregation past epoch {last} on every rank"), Duration::from_secs(120), || {
            stats(&c).iter().all(|a| a["last_upto"].as_u64().unwrap() > last.0).then_some(())
        });
        // Each dkey's akey keeps what the snapshot and the newest epoch show; the other
        // versions (most of ROUNDS per dkey and shard) are gone.
        let removed: u64 = stats(&c).iter().map(|a| a["records_removed"].as_u64().unwrap()).sum();
        assert!(removed > 0, "{cont}: aggregation removed nothing");
        rt.block_on(async {
            check(&obj, &history, Epoch::MAX, !is_ec, &format!("{cont} newest")).await;
            check(&obj, &history, snapshot, !is_ec, &format!("{cont} snapshot")).await;
            let refused = obj.read(&dkey(0), b"b", 0, 4096, mid_epoch).await;
            let err = refused.err().unwrap_or_else(|| panic!("{cont}: a read at aggregated epoch {mid_epoch} was answered"));
            assert!(err.to_string().contains("aggregation horizon"), "{cont}: unexpected error {err}");
        });
        if !is_ec {
            // A late write below the horizon (as a slow client or a rebuild import delivers it)
            // shows through exactly where no newer write covers it.
            let late_epoch = Epoch(mid_epoch.0 + 1);
            let data = vec![0xEE; 64 << 10];
            let e = rt.block_on(obj.write_bytes_at(&dkey(1), b"b", 4096, bytes::Bytes::from(data.clone()), Some(late_epoch))).unwrap();
            assert_eq!(e, late_epoch);
            history.push(Op { epoch: late_epoch, dkey: 1, offset: 4096, len: data.len(), data: Some(data) });
            rt.block_on(check(&obj, &history, Epoch::MAX, true, "rp after a late write"));
            rt.block_on(check(&obj, &history, snapshot, true, "rp snapshot after a late write"));
        }
        let per_rank = stats(&c);
        eprintln!("{cont}: {} writes, aggregation per rank: {per_rank:?}", history.len());
    }
    let total_removed: u64 = stats(&c).iter().map(|a| a["records_removed"].as_u64().unwrap()).sum();
    // RP_3G1 keeps 3 copies of ~DKEYS*ROUNDS versions, EC 3 cells of each stripe version: well
    // over half of them are superseded at both kept epochs.
    assert!(total_removed as usize >= DKEYS * ROUNDS * 3, "only {total_removed} versions removed");
}

/// `cont destroy` gives the space back: the engines delete every copy of the destroyed
/// container's data in the background (extent-file blocks punched), while another container
/// of the pool keeps every byte, and a container created afterwards works as usual. So does
/// `pool destroy --force` for the containers of the pool.
#[test]
fn destroying_a_container_frees_its_space_and_keeps_the_others() {
    const VALUES: usize = 48;
    const VALUE_BYTES: usize = 1 << 20;
    let c = Cluster::start(&["--ranks", "3", "--aggregate-interval-ms", "300"]);
    c.json(&["cont", "create", "tank", "doomed", "--oclass", "RP_3G1", "--rf", "2"]);
    c.json(&["cont", "create", "tank", "kept", "--oclass", "RP_3G1", "--rf", "2"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cf = ClusterFile::load(&c.cluster_file()).unwrap();
    let client = rt.block_on(Client::connect(&cf)).unwrap();
    let value = |i: usize, salt: u8| -> Vec<u8> { (0..VALUE_BYTES).map(|j| (j as u8).wrapping_mul(13).wrapping_add(i as u8).wrapping_add(salt)).collect() };
    let (doomed, kept) = rt.block_on(async {
        let doomed = client.container("tank", "doomed").await.unwrap().create_object("RP_3G1".parse().unwrap()).await.unwrap();
        let kept = client.container("tank", "kept").await.unwrap().create_object("RP_3G1".parse().unwrap()).await.unwrap();
        for i in 0..VALUES {
            doomed.write(&dkey(i), b"v", 0, &value(i, 1)).await.unwrap();
            if i % 8 == 0 {
                kept.write(&dkey(i), b"v", 0, &value(i, 2)).await.unwrap();
            }
        }
        (doomed, kept)
    });
    let used = |c: &Cluster| -> u64 { c.json(&["pool", "stats", "tank"])["ranks"].as_object().unwrap().values().map(|r| r["used_bytes"].as_u64().unwrap()).sum() };
    let before = used(&c);
    let doomed_copies = (3 * VALUES * VALUE_BYTES) as u64;
    assert!(before >= doomed_copies, "the cluster holds {before} bytes after writing {doomed_copies} bytes of copies");
    assert_eq!(c.json(&["cont", "destroy", "tank", "doomed"])["destroyed"], "doomed");
    // Every copy deleted (by the engines' own count), and the space given back to the file
    // system (the extent files keep only their preallocation ahead of the next write).
    poll("the destroyed container's copies deleted on every rank", Duration::from_secs(60), || {
        let deleted: u64 = stats(&c).iter().map(|a| a["destroyed_bytes_deleted"].as_u64().unwrap()).sum();
        (deleted >= doomed_copies).then_some(())
    });
    let after = used(&c);
    assert!(before - after.min(before) >= doomed_copies * 9 / 10, "destroying freed only {} of {doomed_copies} bytes ({before} -> {after})", before.saturating_sub(after));
    rt.block_on(async {
        for i in (0..VALUES).step_by(8) {
            assert_eq!(kept.read(&dkey(i), b"v", 0, VALUE_BYTES as u64, Epoch::MAX).await.unwrap().0, value(i, 2), "kept container, dkey {i}");
        }
        // The destroyed container is gone for clients too: it does not open, and a handle
        // opened before the destroy has its writes refused, not acknowledged and then deleted.
        assert!(client.container("tank", "doomed").await.is_err(), "a destroyed container opened");
        let refused = doomed.write(&dkey(0), b"v", 0, &value(0, 5)).await.expect_err("a write to a destroyed container was acknowledged");
        assert!(refused.to_string().contains("destroyed"), "unexpected error: {refused}");
    });
    c.json(&["cont", "create", "tank", "later", "--oclass", "RP_3G1", "--rf", "2"]);
    rt.block_on(async {
        let later = client.container("tank", "later").await.unwrap().create_object("RP_3G1".parse().unwrap()).await.unwrap();
        later.write(b"k", b"v", 0, &value(0, 3)).await.unwrap();
        assert_eq!(later.read(b"k", b"v", 0, VALUE_BYTES as u64, Epoch::MAX).await.unwrap().0, value(0, 3));
    });
    // Nothing more is deleted: the list of destroyed containers names only the destroyed one.
    let deleted_then: u64 = stats(&c).iter().map(|a| a["destroyed_containers_deleted"].as_u64().unwrap()).sum();
    let passes_then: u64 = stats(&c).iter().map(|a| a["passes"].as_u64().unwrap()).sum();
    poll("three more aggregation passes", Duration::from_secs(30), || (stats(&c).iter().map(|a| a["passes"].as_u64().unwrap()).sum::<u64>() >= passes_then + 9).then_some(()));
    assert_eq!(stats(&c).iter().map(|a| a["destroyed_containers_deleted"].as_u64().unwrap()).sum::<u64>(), deleted_then);
    rt.block_on(async {
        for i in (0..VALUES).step_by(8) {
            assert_eq!(kept.read(&dkey(i), b"v", 0, VALUE_BYTES as u64, Epoch::MAX).await.unwrap().0, value(i, 2), "kept container after more passes, dkey {i}");
        }
    });
    // A pool destroyed with its containers: their data goes too (the engines share targets
    // between pools, so only the destroyed containers' rows may go).
    c.json(&["pool", "create", "scratch", "--size", "1G"]);
    c.json(&["cont", "create", "scratch", "s", "--oclass", "RP_3G1", "--rf", "2"]);
    rt.block_on(async {
        let s = client.container("scratch", "s").await.unwrap().create_object("RP_3G1".parse().unwrap()).await.unwrap();
        for i in 0..VALUES / 2 {
            s.write(&dkey(i), b"v", 0, &value(i, 4)).await.unwrap();
        }
    });
    let deleted_before: u64 = stats(&c).iter().map(|a| a["destroyed_bytes_deleted"].as_u64().unwrap()).sum();
    let before = used(&c);
    c.json(&["pool", "destroy", "scratch", "--force"]);
    let scratch_copies = doomed_copies / 2;
    poll("the destroyed pool's copies deleted on every rank", Duration::from_secs(60), || {
        let deleted: u64 = stats(&c).iter().map(|a| a["destroyed_bytes_deleted"].as_u64().unwrap()).sum();
        (deleted >= deleted_before + scratch_copies).then_some(())
    });
    let after = used(&c);
    assert!(before - after.min(before) >= scratch_copies * 9 / 10, "destroying the pool freed only {} of {scratch_copies} bytes ({before} -> {after})", before.saturating_sub(after));
    rt.block_on(async {
        for i in (0..VALUES).step_by(8) {
            assert_eq!(kept.read(&dkey(i), b"v", 0, VALUE_BYTES as u64, Epoch::MAX).await.unwrap().0, value(i, 2), "kept container after the pool's destruction, dkey {i}");
        }
    });
}
