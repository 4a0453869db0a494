//! The management state machine alone: determinism (replicas agree), capacity checks, rank
//! death moving targets DOWN with a new map version.

use std::collections::BTreeMap;
use strata_mgmt::state_machine::MgmtState;
use strata_rpc::mgmt_msg::*;
use strata_types::{ContId, PoolId, Rank};

fn join(i: u32, cap: u64) -> MgmtCmd {
    MgmtCmd::Join {
        uuid: format!("server-{i}"),
        mgmt_addr: String::new(),
        data_addr: format!("127.0.0.1:{}", 20000 + i),
        fault_domain: format!("/host-{i}"),
        labels: BTreeMap::from([("media".to_string(), if i % 2 == 0 { "ssd" } else { "hdd" }.to_string())]),
        targets: 2,
        capacity_bytes: cap,
        access_point: i == 0,
    }
}

fn script() -> Vec<MgmtCmd> {
    let pool = PoolId(uuid::Uuid::from_u128(1));
    vec![
        join(0, 10 << 30),
        join(1, 10 << 30),
        join(2, 10 << 30),
        MgmtCmd::PoolCreate { id: pool, label: "p".into(), size_bytes: 1 << 30, ranks: None, select: None },
        MgmtCmd::ContCreate { id: ContId(uuid::Uuid::from_u128(2)), pool: "p".into(), label: "c".into(), ctype: ContType::Kv, oclass: "RP_3G1".into(), rf: 2, props: BTreeMap::new() },
        MgmtCmd::AllocOids { pool: "p".into(), cont: "c".into(), count: 10 },
        MgmtCmd::SetRankState { rank: Rank(1), state: RankState::Dead },
    ]
}

#[test]
fn replicas_applying_the_same_commands_agree() {
    let (mut a, mut b) = (MgmtState::default(), MgmtState::default());
    for cmd in script() {
        let ra = a.apply(&cmd).map(|r| format!("{r:?}")).map_err(|e| e.to_string());
        let rb = b.apply(&cmd).map(|r| format!("{r:?}")).map_err(|e| e.to_string());
        assert_eq!(ra, rb);
    }
    assert_eq!(a, b);
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
}

#[test]
fn a_dead_rank_takes_its_targets_down_in_a_newer_map() {
    let mut s = MgmtState::default();
    for cmd in script() {
        s.apply(&cmd).unwrap();
    }
    let p = s.pool_by_name("p").unwrap();
    assert_eq!(p.map.version, 2);
    for t in &p.map.targets {
        assert_eq!(t.state == strata_placement::TargetState::Down, t.id.rank == Rank(1));
    }
    // Oid allocation is monotonic.
    let MgmtReply::OidRange { first, .. } = s.apply(&MgmtCmd::AllocOids { pool: "p".into(), cont: "c".into(), count: 5 }).unwrap() else { panic!() };
    assert_eq!(first, 11);
}

/// A rank marked dead that is heard from again (never restarted) gets back the targets its
/// death took down, whether or not their rebuild finished; targets an administrator took down
/// stay down, and a rank the administrator excluded does not come back by itself.
#[test]
fn a_rank_heard_from_after_being_marked_dead_gets_its_targets_reintegrated() {
    use strata_placement::TargetState as TS;
    let mut s = MgmtState::default();
    for cmd in script() {
        s.apply(&cmd).unwrap();
    }
    let pool = PoolId(uuid::Uuid::from_u128(1));
    let states = |s: &MgmtState, r: u32| s.pool_by_name("p").unwrap().map.targets.iter().filter(|t| t.id.rank == Rank(r)).map(|t| t.state).collect::<Vec<_>>();
    let rank_state = |s: &MgmtState, r: u32| s.ranks[&Rank(r)].state;
    // Rank 1 died in the script; its rebuild finishes (DOWNOUT), then it is heard from.
    let v = s.pool_by_name("p").unwrap().map.version;
    for r in [0, 2] {
        s.apply(&MgmtCmd::RebuildDone { pool, version: v, rank: Rank(r) }).unwrap();
    }
    assert_eq!(states(&s, 1), vec![TS::DownOut; 2]);
    s.apply(&MgmtCmd::RankReturned { rank: Rank(1) }).unwrap();
    assert_eq!(rank_state(&s, 1), RankState::Joined);
    assert_eq!(states(&s, 1), vec![TS::UpIn; 2], "reintegrated: resynced before it serves reads");
    assert!(s.pool_by_name("p").unwrap().map.version > v, "a newer map, so engines start the resync");
    // Heard from again later (a second heartbeat): nothing changes.
    let v = s.pool_by_name("p").unwrap().map.version;
    s.apply(&MgmtCmd::RankReturned { rank: Rank(1) }).unwrap();
    assert_eq!(s.pool_by_name("p").unwrap().map.version, v);

    // Rank 2: one target excluded by the administrator before the rank died. Only the other
    // one comes back with the rank, before its rebuild finished (DOWN).
    s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(2), index: Some(0), action: TargetAction::Exclude }).unwrap();
    s.apply(&MgmtCmd::SetRankState { rank: Rank(2), state: RankState::Dead }).unwrap();
    assert_eq!(states(&s, 2), vec![TS::Down; 2]);
    s.apply(&MgmtCmd::RankReturned { rank: Rank(2) }).unwrap();
    assert_eq!(states(&s, 2), vec![TS::Down, TS::UpIn], "the administrator's exclusion stays");

    // Rank 0: dead, then excluded by the administrator: it stays out when heard from.
    s.apply(&MgmtCmd::SetRankState { rank: Rank(0), state: RankState::Dead }).unwrap();
    s.apply(&MgmtCmd::SetRankState { rank: Rank(0), state: RankState::Excluded }).unwrap();
    s.apply(&MgmtCmd::RankReturned { rank: Rank(0) }).unwrap();
    assert_eq!(rank_state(&s, 0), RankState::Excluded);
    assert_eq!(states(&s, 0), vec![TS::Down; 2]);
    // An administrator's reintegration of a dead rank's targets takes them off the list: a
    // later return does not act on them again.
    s.apply(&MgmtCmd::SetRankState { rank: Rank(1), state: RankState::Dead }).unwrap();
    s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(1), index: None, action: TargetAction::Reintegrate }).unwrap();
    assert!(s.pool_by_name("p").unwrap().down_at_death.iter().all(|t| t.rank != Rank(1)));
}

#[test]
fn capacity_is_counted_once_per_host_and_refused_when_short() {
    let mut s = MgmtState::default();
    s.apply(&join(0, 4 << 30)).unwrap();
    let mut same_host = join(1, 4 << 30);
    if let MgmtCmd::Join { fault_domain, .. } = &mut same_host {
        *fault_domain = "/host-0".into();
    }
    s.apply(&same_host).unwrap();
    assert_eq!(s.free_bytes(), 4 << 30, "two ranks on one host share its disk");
    let e = s.apply(&MgmtCmd::PoolCreate { id: PoolId::new_random(), label: "big".into(), size_bytes: 5 << 30, ranks: None, select: None }).unwrap_err();
    assert!(e.message.contains("only 4.0 GiB is free"), "{e}");
    assert!(s.pools.is_empty());
    // --select over labels picks only matching targets.
    s.apply(&MgmtCmd::PoolCreate { id: PoolId::new_random(), label: "ssd".into(), size_bytes: 1 << 30, ranks: None, select: Some("media=ssd".into()) }).unwrap();
    assert_eq!(s.pool_by_name("ssd").unwrap().map.targets.len(), 2);
}

#[test]
fn new_targets_join_after_rebuild_and_rebalancing_and_ec_pools_are_not_extended() {
    use strata_placement::TargetState as TS;
    let mut s = MgmtState::default();
    for i in 0..4 {
        s.apply(&join(i, 10 << 30)).unwrap();
    }
    let pool = PoolId(uuid::Uuid::from_u128(1));
    s.apply(&MgmtCmd::PoolCreate { id: pool, label: "p".into(), size_bytes: 1 << 30, ranks: Some(vec![Rank(0), Rank(1), Rank(2)]), select: None }).unwrap();
    s.apply(&MgmtCmd::PoolExtend { pool: "p".into(), ranks: vec![Rank(3)] }).unwrap();
    // A rank failing while the extension runs: its rebuild comes first.
    s.apply(&MgmtCmd::SetRankState { rank: Rank(1), state: RankState::Dead }).unwrap();
    let states = |s: &MgmtState, r: u32| s.pool_by_name("p").unwrap().map.targets.iter().filter(|t| t.id.rank == Rank(r)).map(|t| t.state).collect::<Vec<_>>();
    let done = |s: &mut MgmtState| {
        let v = s.pool_by_name("p").unwrap().map.version;
        for r in [0, 2] {
            s.apply(&MgmtCmd::RebuildDone { pool, version: v, rank: Rank(r) }).unwrap();
        }
    };
    done(&mut s);
    assert_eq!(states(&s, 1), vec![TS::DownOut; 2]);
    assert_eq!(states(&s, 3), vec![TS::New; 2], "NEW targets wait until their data has moved");
    assert!(s.pool_info(s.pool_by_name("p").unwrap()).rebuild.is_some(), "the extension shows as data movement");
    done(&mut s);
    assert_eq!(states(&s, 3), vec![TS::Up; 2]);
    assert!(s.pool_info(s.pool_by_name("p").unwrap()).rebuild.is_none());

    s.apply(&MgmtCmd::ContCreate { id: ContId(uuid::Uuid::from_u128(9)), pool: "p".into(), label: "ec".into(), ctype: ContType::Plain, oclass: "EC_2P1G1".into(), rf: 1, props: BTreeMap::new() }).unwrap();
    s.apply(&join(4, 10 << 30)).unwrap();
    // Erasure-coded containers do not stop an extension (each shard index's cells have their
    // own offset range, so a target may take another index of a group it serves).
    s.apply(&MgmtCmd::PoolExtend { pool: "p".into(), ranks: vec![Rank(4)] }).unwrap();
    assert_eq!(states(&s, 4), vec![TS::New; 2]);
}

/// Containers of rf 0, 1 and 2 on five ranks, and a helper reporting every live rank's rebuild
/// done for the pool's current map.
fn five_ranks_three_containers() -> (MgmtState, PoolId) {
    let mut s = MgmtState::default();
    for i in 0..5 {
        s.apply(&join(i, 10 << 30)).unwrap();
    }
    let pool = PoolId(uuid::Uuid::from_u128(1));
    s.apply(&MgmtCmd::PoolCreate { id: pool, label: "p".into(), size_bytes: 1 << 30, ranks: None, select: None }).unwrap();
    for (i, (label, class, rf)) in [("c0", "S1", 0), ("c1", "RP_2G1", 1), ("c2", "RP_3G1", 2)].into_iter().enumerate() {
        s.apply(&MgmtCmd::ContCreate { id: ContId(uuid::Uuid::from_u128(10 + i as u128)), pool: "p".into(), label: label.into(), ctype: ContType::Plain, oclass: class.into(), rf, props: BTreeMap::new() }).unwrap();
    }
    (s, pool)
}

fn rebuild_done(s: &mut MgmtState, pool: PoolId) {
    let p = s.pool_by_name("p").unwrap();
    let (v, live) = (p.map.version, s.rebuild_ranks(p));
    for r in live {
        s.apply(&MgmtCmd::RebuildDone { pool, version: v, rank: r }).unwrap();
    }
}

fn status(s: &MgmtState, cont: &str) -> ContStatus {
    s.cont_by_name("p", cont).unwrap().status.clone()
}

fn dead(s: &mut MgmtState, r: u32) {
    s.apply(&MgmtCmd::SetRankState { rank: Rank(r), state: RankState::Dead }).unwrap();
}

#[test]
fn ranks_failed_at_once_beyond_rf_make_containers_unclean_until_an_admin_clears_them() {
    let (mut s, pool) = five_ranks_three_containers();
    dead(&mut s, 1);
    let v1 = s.pool_by_name("p").unwrap().map.version;
    assert_eq!(status(&s, "c0"), ContStatus::Unclean(UncleanReason { ranks: vec![Rank(1)], map_version: v1 }), "rf 0 survives no failure");
    assert_eq!(status(&s, "c1"), ContStatus::Healthy);
    // A second failure before the first is rebuilt: two at once.
    dead(&mut s, 2);
    let v2 = s.pool_by_name("p").unwrap().map.version;
    assert_eq!(status(&s, "c1"), ContStatus::Unclean(UncleanReason { ranks: vec![Rank(1), Rank(2)], map_version: v2 }));
    assert_eq!(status(&s, "c0"), ContStatus::Unclean(UncleanReason { ranks: vec![Rank(1)], map_version: v1 }), "the first reason stays");
    assert_eq!(status(&s, "c2"), ContStatus::Healthy);
    let info = s.pool_info(s.pool_by_name("p").unwrap());
    assert_eq!(info.unclean_conts.iter().map(|u| u.label.as_str()).collect::<Vec<_>>(), vec!["c0", "c1"]);

    // Rebuild finishing, then reintegration, clears nothing.
    rebuild_done(&mut s, pool);
    assert!(s.pool_by_name("p").unwrap().failed_ranks().is_empty());
    for r in [1, 2] {
        s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(r), index: None, action: TargetAction::Reintegrate }).unwrap();
    }
    rebuild_done(&mut s, pool);
    assert!(matches!(status(&s, "c1"), ContStatus::Unclean(_)));
    // Only the administrator does.
    s.apply(&MgmtCmd::ContMarkHealthy { pool: "p".into(), cont: "c1".into() }).unwrap();
    assert_eq!(status(&s, "c1"), ContStatus::Healthy);
    assert!(matches!(status(&s, "c0"), ContStatus::Unclean(_)));
    assert!(s.apply(&MgmtCmd::ContMarkHealthy { pool: "p".into(), cont: "nope".into() }).is_err());
}

#[test]
fn a_failure_after_the_earlier_rebuild_finished_does_not_add_to_it() {
    let (mut s, pool) = five_ranks_three_containers();
    dead(&mut s, 1);
    rebuild_done(&mut s, pool);
    dead(&mut s, 2);
    assert_eq!(s.pool_by_name("p").unwrap().failed_ranks(), [Rank(2)].into());
    assert_eq!(status(&s, "c1"), ContStatus::Healthy);
    // Rank 1's targets reintegrating (its data is on spares) and failing again do not count.
    rebuild_done(&mut s, pool);
    s.apply(&MgmtCmd::SetRankState { rank: Rank(1), state: RankState::Joined }).unwrap();
    s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(1), index: None, action: TargetAction::Reintegrate }).unwrap();
    dead(&mut s, 3);
    dead(&mut s, 1);
    assert_eq!(s.pool_by_name("p").unwrap().failed_ranks(), [Rank(3)].into());
    assert_eq!(status(&s, "c1"), ContStatus::Healthy);
}

#[test]
fn a_rank_reintegrated_before_its_rebuild_finished_counts_again_when_it_fails_again() {
    let (mut s, _pool) = five_ranks_three_containers();
    dead(&mut s, 1);
    s.apply(&MgmtCmd::SetRankState { rank: Rank(1), state: RankState::Joined }).unwrap();
    s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(1), index: None, action: TargetAction::Reintegrate }).unwrap();
    assert!(s.pool_by_name("p").unwrap().failed_ranks().is_empty(), "back with its data");
    dead(&mut s, 2);
    assert_eq!(status(&s, "c1"), ContStatus::Healthy);
    // Nothing rebuilt rank 1's data elsewhere yet: failing again makes two at once.
    dead(&mut s, 1);
    assert!(matches!(status(&s, "c1"), ContStatus::Unclean(UncleanReason { ref ranks, .. }) if *ranks == vec![Rank(1), Rank(2)]));
    // A draining rank holds data too.
    s.apply(&MgmtCmd::PoolTargets { pool: "p".into(), rank: Rank(3), index: None, action: TargetAction::Drain }).unwrap();
    dead(&mut s, 3);
    assert_eq!(s.pool_by_name("p").unwrap().failed_ranks(), [Rank(1), Rank(2), Rank(3)].into());
    assert!(matches!(status(&s, "c2"), ContStatus::Unclean(_)));
}
