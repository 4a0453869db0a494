//! Layout properties a pool relies on: fixed layouts for fixed inputs, distinct fault domains
//! per group, balance, minimal movement on exclude/extend, exact restore on reintegration.

use std::collections::{BTreeMap, HashSet};
use strata_placement::*;
use strata_types::{ObjectClass, ObjectType, Oid, Rank, TargetId};

fn oid(class: &str, seq: u128) -> Oid {
    Oid::new(ObjectType::Array, class.parse::<ObjectClass>().unwrap(), seq)
}

fn targets_of(l: &Layout) -> Vec<String> {
    l.shards().iter().map(|s| s.target.to_string()).collect()
}

#[test]
fn golden_layouts() {
    // Changing any of these relocates every stored object: bump the map format instead.
    let map = PlacementMap::new(&PoolMap::uniform(6, 2, 6), false);
    let got: Vec<Vec<String>> = ["S1", "RP_3G1", "EC_2P1G1", "RP_2G2"].iter().enumerate().map(|(i, c)| targets_of(&map.layout(oid(c, 1000 + i as u128)).unwrap())).collect();
    let golden: Vec<Vec<&str>> = vec![vec!["1:0"], vec!["0:1", "1:1", "3:1"], vec!["4:0", "1:1", "5:1"], vec!["1:0", "3:1", "5:0", "2:1"]];
    assert_eq!(got, golden);
    let dkeys: Vec<usize> = (0..8).map(|i| group_for_dkey(format!("chunk-{i}").as_bytes(), 8)).collect();
    if std::env::var("PRINT_GOLDEN").is_ok() {
        println!("{dkeys:?}");
    }
    assert_eq!(dkeys, GOLDEN_DKEYS);
}

const GOLDEN_DKEYS: [usize; 8] = [1, 5, 7, 1, 7, 7, 7, 6];

fn host_of(map: &PoolMap, t: TargetId) -> String {
    map.target(t).unwrap().domain.to_string()
}

#[test]
fn groups_use_distinct_hosts_then_ranks() {
    // 8 hosts: RP_3 and EC_4P2 groups spread over distinct hosts.
    let pm = PoolMap::uniform(16, 4, 8);
    let map = PlacementMap::new(&pm, false);
    for class in ["RP_3G2", "EC_4P2G1", "RP_2GX"] {
        for seq in 0..2000 {
            let l = map.layout(oid(class, seq)).unwrap();
            for g in l.groups() {
                let hosts: HashSet<String> = g.iter().map(|s| host_of(&pm, s.target)).collect();
                assert_eq!(hosts.len(), g.len(), "{class} seq {seq}: group shares a host: {g:?}");
            }
        }
    }
    // Only 2 hosts but 6 ranks: RP_3 falls back to distinct ranks.
    let pm = PoolMap::uniform(6, 2, 2);
    let map = PlacementMap::new(&pm, false);
    for seq in 0..2000 {
        let l = map.layout(oid("RP_3G1", seq)).unwrap();
        let ranks: HashSet<u32> = l.group(0).iter().map(|s| s.target.rank.0).collect();
        assert_eq!(ranks.len(), 3);
    }
}

#[test]
fn classes_that_do_not_fit_say_what_is_missing() {
    let map = PlacementMap::new(&PoolMap::uniform(3, 1, 3), false);
    let err = map.layout(oid("RP_4G1", 1)).unwrap_err();
    assert!(err.to_string().contains("has only 3 usable targets"), "{err}");
    let err = map.layout(oid("RP_3G2", 1)).unwrap_err();
    assert!(err.to_string().contains("needs 6 targets"), "{err}");
    assert_eq!(map.layout(oid("RP_3GX", 1)).unwrap().group_count(), 1);
    assert_eq!(map.layout(oid("SX", 1)).unwrap().group_count(), 3);
}

#[test]
fn one_million_s1_objects_are_balanced() {
    let pm = PoolMap::uniform(100, 8, 100);
    let map = PlacementMap::new(&pm, false);
    let mut load: BTreeMap<TargetId, u32> = BTreeMap::new();
    let n = 1_000_000u128;
    for seq in 0..n {
        let l = map.layout(oid("S1", seq)).unwrap();
        *load.entry(l.shards()[0].target).or_default() += 1;
    }
    let mean = n as f64 / 800.0;
    let max = *load.values().max().unwrap() as f64;
    assert_eq!(load.len(), 800, "every target gets objects");
    assert!(max / mean <= 1.15, "max/mean {:.3}", max / mean);
}

#[test]
fn excluding_a_target_moves_only_its_shards_and_reintegration_restores() {
    let mut pm = PoolMap::uniform(12, 2, 6);
    let before = PlacementMap::new(&pm, false);
    let victim = TargetId::new(5, 1);
    pm.set_state(victim, TargetState::Down).unwrap();
    let after = PlacementMap::new(&pm, false);
    let mut moved = 0;
    for class in ["S1", "RP_3G1", "EC_4P2G1", "RP_2GX"] {
        for seq in 0..3000 {
            let o = oid(class, seq);
            let (a, b) = (before.layout(o).unwrap(), after.layout(o).unwrap());
            for (x, y) in a.shards().iter().zip(b.shards()) {
                if x.target != y.target {
                    assert_eq!(x.target, victim, "{class}: a shard not on the excluded target moved");
                    assert!(y.is_spare);
                    assert_ne!(y.target, victim);
                    moved += 1;
                } else {
                    assert_ne!(y.target, victim, "a shard stayed on the excluded target");
                }
            }
            // Spares keep groups on distinct targets.
            for g in b.groups() {
                let t: HashSet<TargetId> = g.iter().map(|s| s.target).collect();
                assert_eq!(t.len(), g.len());
            }
        }
    }
    assert!(moved > 0);
    pm.set_state(victim, TargetState::DownOut).unwrap();
    pm.set_state(victim, TargetState::UpIn).unwrap();
    pm.set_state(victim, TargetState::Up).unwrap();
    let back = PlacementMap::new(&pm, false);
    for seq in 0..3000 {
        let o = oid("RP_3G1", seq);
        assert_eq!(before.layout(o).unwrap().shards(), back.layout(o).unwrap().shards());
    }
}

#[test]
fn extending_by_ten_percent_moves_about_ten_percent() {
    let mut pm = PoolMap::uniform(50, 4, 50);
    let extra = PoolMap::uniform(55, 4, 55).targets[200..].to_vec();
    pm.add_targets(extra).unwrap();
    let old = PlacementMap::new(&pm, false);
    let new = PlacementMap::new(&pm, true);
    assert_eq!(old.usable_targets(), 200);
    assert_eq!(new.usable_targets(), 220);
    for class in ["S1", "RP_3G1", "EC_2P1G1"] {
        let (mut moved, mut total) = (0usize, 0usize);
        for seq in 0..20_000 {
            let o = oid(class, seq);
            moved += diff_layouts(&old, &new, o).unwrap().len();
            total += old.layout(o).unwrap().shards().len();
        }
        let frac = moved as f64 / total as f64;
        let ideal = 20.0 / 220.0;
        assert!(frac <= 1.3 * ideal, "{class}: moved {frac:.4}, ideal {ideal:.4}");
        assert!(frac >= 0.5 * ideal, "{class}: new targets got almost nothing ({frac:.4})");
    }
}

#[test]
fn a_spare_stays_put_when_another_target_fails() {
    let mut pm = PoolMap::uniform(12, 2, 12);
    pm.set_state(TargetId::new(3, 0), TargetState::Down).unwrap();
    let one = PlacementMap::new(&pm, false);
    pm.set_state(TargetId::new(7, 1), TargetState::Down).unwrap();
    let two = PlacementMap::new(&pm, false);
    for seq in 0..5000 {
        let o = oid("RP_2G1", seq);
        let (a, b) = (one.layout(o).unwrap(), two.layout(o).unwrap());
        for (x, y) in a.shards().iter().zip(b.shards()) {
            if x.is_spare && x.target != TargetId::new(7, 1) {
                assert_eq!(x.target, y.target, "a spare moved although it did not fail");
            }
        }
    }
}

#[test]
fn no_spare_moves_when_rebuild_finishes() {
    // DOWN -> DOWNOUT triggers no data movement, so it must not move any spare: a spare that
    // moved then would be trusted by readers without ever having been filled. Nor may a newer
    // failure take an older shard's (filled) spare.
    let base = PoolMap::uniform(6, 2, 6);
    for (first, second) in [(0u32, 1u32), (1, 0), (3, 5), (2, 4)] {
        let mut pm = base.clone();
        let set = |pm: &mut PoolMap, r: u32, s: TargetState| {
            for t in 0..2 {
                pm.set_state(TargetId::new(r, t), s).unwrap();
            }
        };
        set(&mut pm, first, TargetState::Down);
        set(&mut pm, first, TargetState::DownOut);
        let first_done = PlacementMap::new(&pm, false);
        set(&mut pm, second, TargetState::Down);
        let rebuilding = PlacementMap::new(&pm, false);
        set(&mut pm, second, TargetState::DownOut);
        let done = PlacementMap::new(&pm, false);
        for class in ["RP_3G1", "EC_4P2G1", "EC_2P1GX"] {
            for seq in 0..3000 {
                let o = oid(class, seq);
                assert_eq!(targets_of(&rebuilding.layout(o).unwrap()), targets_of(&done.layout(o).unwrap()), "{class} seq {seq}: a spare moved when rebuild finished");
                // A newer failure never takes a filled spare away from an older one.
                for (a, b) in first_done.layout(o).unwrap().shards().iter().zip(rebuilding.layout(o).unwrap().shards()) {
                    if a.is_spare && a.target.rank.0 != second {
                        assert_eq!(a.target, b.target, "{class} seq {seq}: the second failure took the first one's spare");
                    }
                }
            }
        }
    }
}

#[test]
fn after_two_failures_no_host_holds_three_shards_of_an_ec_4p2_group() {
    // As many hosts as shards: every host holds one home, so the spares must spread over the
    // survivors, or a third failure could take three shards (one more than the parity).
    // Three targets per host: room on a host for a home and two spares.
    let base = PoolMap::uniform(6, 3, 6);
    for (first, second) in [(0u32, 1u32), (2, 5), (4, 3)] {
        let mut pm = base.clone();
        for (r, s) in [(first, TargetState::Down), (first, TargetState::DownOut), (second, TargetState::Down), (second, TargetState::DownOut)] {
            for t in 0..3 {
                pm.set_state(TargetId::new(r, t), s).unwrap();
            }
        }
        let map = PlacementMap::new(&pm, false);
        for seq in 0..3000 {
            let l = map.layout(oid("EC_4P2G1", seq)).unwrap();
            let mut per_rank: BTreeMap<u32, usize> = BTreeMap::new();
            for s in l.shards() {
                *per_rank.entry(s.target.rank.0).or_default() += 1;
            }
            assert!(per_rank.values().all(|n| *n <= 2), "seq {seq}: a host holds three shards after ranks {first} and {second} failed: {per_rank:?}");
        }
    }
}

#[test]
fn adding_new_targets_changes_no_layout_until_they_join() {
    // Clients keep using the map without NEW targets while data moves, so adding them must not
    // move any home or spare (a spare filled by an earlier rebuild included).
    let mut pm = PoolMap::uniform(4, 2, 4);
    for s in [TargetState::Down, TargetState::DownOut] {
        pm.set_state(TargetId::new(2, 1), s).unwrap();
    }
    let before = PlacementMap::new(&pm, false);
    pm.add_targets(PoolMap::uniform(6, 2, 6).targets[8..].to_vec()).unwrap();
    let during = PlacementMap::new(&pm, false);
    let after = PlacementMap::new(&pm, true);
    let mut moved = 0;
    for class in ["RP_2G1", "RP_3G1", "EC_2P1G1", "RP_2GX"] {
        for seq in 0..2000 {
            let o = oid(class, seq);
            assert_eq!(before.layout(o).unwrap().shards(), during.layout(o).unwrap().shards(), "{class} seq {seq}");
            let a = after.layout(o).unwrap();
            assert!(a.shards().iter().all(|s| s.target != TargetId::new(2, 1)), "the extended map still uses the excluded target");
            moved += diff_layouts(&during, &after, o).unwrap().len();
        }
    }
    assert!(moved > 0, "the new targets get shards once they join");
}

#[test]
fn a_third_failure_moves_only_the_spares_it_took() {
    // When a third failure takes an older shard's spare, that shard's new spare must neither
    // take nor move the filled spare of a shard that left later: readers would trust the one
    // and rebuild would decode another shard's cells (same record keys) as its own.
    let base = PoolMap::uniform(6, 2, 6);
    for (first, second, third) in [(1u32, 2u32, 3u32), (0, 1, 2), (5, 3, 1), (2, 4, 0)] {
        let mut pm = base.clone();
        for (r, s) in [(first, TargetState::Down), (first, TargetState::DownOut), (second, TargetState::Down), (second, TargetState::DownOut)] {
            assert_eq!(pm.set_rank_state(Rank(r), s), 2);
        }
        let settled = PlacementMap::new(&pm, false);
        pm.set_rank_state(Rank(third), TargetState::Down);
        let rebuilding = PlacementMap::new(&pm, false);
        let mut took = 0;
        for class in ["EC_4P2GX", "EC_4P2G1", "RP_3G1"] {
            for seq in 0..3000 {
                let o = oid(class, seq);
                let (a, b) = (settled.layout(o).unwrap(), rebuilding.layout(o).unwrap());
                for (x, y) in a.shards().iter().zip(b.shards()) {
                    if x.target.rank.0 != third {
                        assert_eq!(x.target, y.target, "{class} seq {seq}: failures {first},{second},{third}: a shard that did not fail moved");
                    } else if x.is_spare {
                        took += 1;
                    }
                }
                for g in b.groups() {
                    let t: HashSet<TargetId> = g.iter().map(|s| s.target).collect();
                    assert_eq!(t.len(), g.len(), "{class} seq {seq}: a target holds two shards of a group");
                }
            }
        }
        assert!(took > 0, "failures {first},{second},{third}: the third failure took some older spares");
    }
}

#[test]
fn spread_domains_name_the_level_groups_spread_over_so_no_group_has_two_shards_in_one() {
    // 3 hosts of 2 ranks: groups of up to 3 shards spread over hosts, larger ones over ranks.
    let pm = PoolMap::uniform(6, 2, 3);
    let map = PlacementMap::new(&pm, false);
    for (class, size, level) in [("RP_2G1", 2, "host"), ("EC_2P1G1", 3, "host"), ("EC_4P2G1", 6, "rank")] {
        let domains = spread_domains(&pm, size);
        assert_eq!(domains.len(), pm.targets.len());
        let distinct: HashSet<&String> = domains.values().collect();
        assert_eq!(distinct.len(), if level == "host" { 3 } else { 6 }, "{class}: {domains:?}");
        let r0 = &domains[&TargetId::new(0, 1)];
        assert_eq!(r0, &if level == "host" { "/host-0".to_string() } else { "/host-0/rank0".to_string() });
        for seq in 0..2000 {
            let l = map.layout(oid(class, seq)).unwrap();
            for g in l.groups() {
                let used: HashSet<&String> = g.iter().map(|s| &domains[&s.target]).collect();
                assert_eq!(used.len(), g.len(), "{class} seq {seq}: two shards in one domain: {g:?}");
            }
        }
    }
    // One rank: replicas sit on its targets, so each target is a domain of its own.
    let one = PoolMap::uniform(1, 2, 1);
    let d = spread_domains(&one, 2);
    assert_eq!(d.values().cloned().collect::<Vec<_>>(), ["/host-0/rank0/tgt0", "/host-0/rank0/tgt1"]);
}
