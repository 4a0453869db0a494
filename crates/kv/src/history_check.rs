//! A serializability checker for list-append histories, in the style of Elle (Kingsbury and
//! Alvaro, VLDB 2020).
//!
//! Each transaction appends unique values to lists and reads whole lists. Because every append
//! is unique and a list only grows, a read reveals the order of all appends before it, so the
//! checker can recover each key's version order and infer write-write, write-read and
//! read-write dependencies between transactions without trusting the database. A cycle in that
//! graph is a serializability violation: G0 (write cycle), G1c (cycle of writes and reads),
//! G2 (a cycle with an anti-dependency, e.g. write skew). It also reports reads of aborted
//! writes (G1a), of intermediate states (G1b), of values nobody wrote, lists that are not
//! prefixes of one order, and a transaction that does not see its own appends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

pub type Key = String;
pub type Value = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MicroOp {
    Append { key: Key, value: Value },
    /// `values` is what the read returned (`None` when the transaction failed before it).
    Read { key: Key, values: Option<Vec<Value>> },
}

/// What the client knows about a transaction's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    /// Definitely not applied (the database said so).
    Aborted,
    /// Unknown (timeout, crash): it may or may not have committed.
    Indeterminate,
}

#[derive(Clone, Debug)]
pub struct TxnRecord {
    pub ops: Vec<MicroOp>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DepKind {
    WriteWrite,
    WriteRead,
    ReadWrite,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anomaly {
    DuplicateAppend { key: Key, value: Value },
    GarbageRead { txn: usize, key: Key, value: Value },
    AbortedRead { txn: usize, writer: usize, key: Key, value: Value },
    IntermediateRead { txn: usize, writer: usize, key: Key, value: Value },
    IncompatibleOrder { key: Key, a: Vec<Value>, b: Vec<Value> },
    InternalInconsistency { txn: usize, key: Key, detail: String },
    /// A dependency cycle; `kind` is G0, G1c or G2.
    Cycle { kind: &'static str, txns: Vec<usize>, edges: Vec<DepKind> },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::Cycle { kind, txns, edges } => {
                write!(f, "{kind} cycle:")?;
                for (t, e) in txns.iter().zip(edges) {
                    write!(f, " T{t} -{e:?}->")?;
                }
                write!(f, " T{}", txns[0])
            }
            other => write!(f, "{other:?}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub anomalies: Vec<Anomaly>,
    pub txns_checked: usize,
    pub edges: usize,
}

impl CheckReport {
    pub fn is_serializable(&self) -> bool {
        self.anomalies.is_empty()
    }
}

/// Check a history. Transaction ids in the report are indices into `history`.
pub fn check(history: &[TxnRecord]) -> CheckReport {
    let mut report = CheckReport { txns_checked: history.len(), ..Default::default() };
    // Who appended each (key, value), and at which position among that txn's appends to the key.
    let mut writer: HashMap<(&str, Value), usize> = HashMap::new();
    let mut last_append: HashMap<(usize, &str), Value> = HashMap::new();
    for (t, rec) in history.iter().enumerate() {
        for op in &rec.ops {
            if let MicroOp::Append { key, value } = op {
                if writer.insert((key.as_str(), *value), t).is_some() {
                    report.anomalies.push(Anomaly::DuplicateAppend { key: key.clone(), value: *value });
                }
                last_append.insert((t, key.as_str()), *value);
            }
        }
    }
    // A transaction counts as committed if the client saw it commit or anyone saw its writes.
    let mut committed: Vec<bool> = history.iter().map(|r| r.outcome == Outcome::Committed).collect();
    for rec in history.iter().filter(|r| r.outcome == Outcome::Committed) {
        for op in &rec.ops {
            if let MicroOp::Read { key, values: Some(vs) } = op {
                for v in vs {
                    if let Some(&w) = writer.get(&(key.as_str(), *v)) {
                        if history[w].outcome == Outcome::Indeterminate {
                            committed[w] = true;
                        }
                    }
                }
            }
        }
    }

    // Per-key version order: the longest committed read; every read must be a prefix of it.
    let mut order: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for rec in history.iter().filter(|r| r.outcome == Outcome::Committed) {
        for op in &rec.ops {
            if let MicroOp::Read { key, values: Some(vs) } = op {
                let cur = order.entry(key.as_str()).or_default();
                if vs.len() > cur.len() {
                    *cur = vs.clone();
                }
            }
        }
    }
    for (t, rec) in history.iter().enumerate().filter(|(_, r)| r.outcome == Outcome::Committed) {
        let mut own: HashMap<&str, Vec<Value>> = HashMap::new();
        for op in &rec.ops {
            match op {
                MicroOp::Append { key, value } => own.entry(key.as_str()).or_default().push(*value),
                MicroOp::Read { key, values: Some(vs) } => {
                    let full = &order[key.as_str()];
                    if vs.len() > full.len() || full[..vs.len()] != vs[..] {
                        report.anomalies.push(Anomaly::IncompatibleOrder { key: key.clone(), a: vs.clone(), b: full.clone() });
                    }
                    if let Some(mine) = own.get(key.as_str()) {
                        if !vs.ends_with(mine) {
                            report.anomalies.push(Anomaly::InternalInconsistency {
                                txn: t,
                                key: key.clone(),
                                detail: format!("read {vs:?} misses own appends {mine:?}"),
                            });
                        }
                    }
                    for v in vs {
                        match writer.get(&(key.as_str(), *v)) {
                            None => report.anomalies.push(Anomaly::GarbageRead { txn: t, key: key.clone(), value: *v }),
                            Some(&w) if history[w].outcome == Outcome::Aborted => {
                                report.anomalies.push(Anomaly::AbortedRead { txn: t, writer: w, key: key.clone(), value: *v })
                            }
                            _ => {}
                        }
                    }
                    // Reading another txn's non-final append to a key is reading an intermediate state.
                    if let Some(&v) = vs.last() {
                        if let Some(&w) = writer.get(&(key.as_str(), v)) {
                            if w != t && last_append.get(&(w, key.as_str())) != Some(&v) {
                                report.anomalies.push(Anomaly::IntermediateRead { txn: t, writer: w, key: key.clone(), value: v });
                            }
                        }
                    }
                }
                MicroOp::Read { values: None, .. } => {}
            }
        }
    }

    // Dependency graph over committed transactions.
    let n = history.len();
    let mut edges: Vec<HashMap<usize, DepKind>> = vec![HashMap::new(); n];
    let add = |from: usize, to: usize, kind: DepKind, edges: &mut Vec<HashMap<usize, DepKind>>| {
        if from != to && committed[from] && committed[to] {
            // Keep the "strongest" label for classification: ww < wr < rw.
            let e = edges[from].entry(to).or_insert(kind);
            if kind < *e {
                *e = kind;
            }
        }
    };
    for (key, vs) in &order {
        for w in vs.windows(2) {
            if let (Some(&a), Some(&b)) = (writer.get(&(*key, w[0])), writer.get(&(*key, w[1]))) {
                add(a, b, DepKind::WriteWrite, &mut edges);
            }
        }
    }
    for (t, rec) in history.iter().enumerate().filter(|(_, r)| r.outcome == Outcome::Committed) {
        for op in &rec.ops {
            if let MicroOp::Read { key, values: Some(vs) } = op {
                let full = &order[key.as_str()];
                if let Some(&w) = vs.last().and_then(|v| writer.get(&(key.as_str(), *v))) {
                    add(w, t, DepKind::WriteRead, &mut edges);
                }
                // The next version after what we read was installed by someone who overwrote us.
                if vs.len() < full.len() && full[..vs.len()] == vs[..] {
                    if let Some(&w) = writer.get(&(key.as_str(), full[vs.len()])) {
                        add(t, w, DepKind::ReadWrite, &mut edges);
                    }
                }
            }
        }
    }
    report.edges = edges.iter().map(|e| e.len()).sum();
    for scc in strongly_connected(&edges) {
        if scc.len() > 1 {
            report.anomalies.push(describe_cycle(&scc, &edges));
        }
    }
    report
}

/// Tarjan's algorithm, iterative so that long histories do not overflow the stack.
fn strongly_connected(edges: &[HashMap<usize, DepKind>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let adj: Vec<Vec<usize>> = edges.iter().map(|m| m.keys().copied().collect()).collect();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut next = 0;
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut call: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut i)) = call.last_mut() {
            if *i < adj[v].len() {
                let w = adj[v][*i];
                *i += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                call.pop();
                if let Some(&(parent, _)) = call.last() {
                    low[parent] = low[parent].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut comp = Vec::new();
                    loop {
                        let w = stack.pop().expect("Tarjan stack holds the component");
                        on_stack[w] = false;
                        comp.push(w);
                        if w == v {
                            break;
                        }
                    }
                    out.push(comp);
                }
            }
        }
    }
    out
}

/// Find one concrete cycle inside a strongly connected component (BFS back to the start).
fn describe_cycle(scc: &[usize], edges: &[HashMap<usize, DepKind>]) -> Anomaly {
    let members: HashSet<usize> = scc.iter().copied().collect();
    let start = scc[0];
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut closing = None;
    'bfs: while let Some(v) = queue.pop_front() {
        for &w in edges[v].keys() {
            if !members.contains(&w) {
                continue;
            }
            if w == start {
                closing = Some(v);
                break 'bfs;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    let mut path = vec![closing.expect("an SCC of size > 1 has a cycle through any member")];
    while *path.last().unwrap_or(&start) != start {
        let last = *path.last().unwrap_or(&start);
        path.push(prev[&last]);
    }
    path.reverse(); // start ... closing
    let kinds: Vec<DepKind> =
        path.iter().enumerate().map(|(i, &v)| edges[v][&path[(i + 1) % path.len()]]).collect();
    let kind = if kinds.contains(&DepKind::ReadWrite) {
        "G2"
    } else if kinds.contains(&DepKind::WriteRead) {
        "G1c"
    } else {
        "G0"
    };
    Anomaly::Cycle { kind, txns: path, edges: kinds }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ap(k: &str, v: u64) -> MicroOp {
        MicroOp::Append { key: k.into(), value: v }
    }
    fn rd(k: &str, vs: &[u64]) -> MicroOp {
        MicroOp::Read { key: k.into(), values: Some(vs.to_vec()) }
    }
    fn ok(ops: Vec<MicroOp>) -> TxnRecord {
        TxnRecord { ops, outcome: Outcome::Committed }
    }

    #[test]
    fn a_serial_history_is_clean() {
        let h = vec![ok(vec![ap("x", 1)]), ok(vec![rd("x", &[1]), ap("x", 2)]), ok(vec![rd("x", &[1, 2])])];
        let r = check(&h);
        assert!(r.is_serializable(), "{:?}", r.anomalies);
        assert!(r.edges >= 2);
    }

    #[test]
    fn write_skew_is_g2() {
        // Both read both keys empty, each appends to a different key: no serial order explains it.
        let h = vec![
            ok(vec![rd("x", &[]), rd("y", &[]), ap("x", 1)]),
            ok(vec![rd("x", &[]), rd("y", &[]), ap("y", 1)]),
            ok(vec![rd("x", &[1]), rd("y", &[1])]),
        ];
        let r = check(&h);
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::Cycle { kind: "G2", .. })), "{:?}", r.anomalies);
    }

    #[test]
    fn lost_update_is_caught() {
        // Both read [], both append; a later read shows only one order: T0 -rw-> T1 and T1 -rw-> T0.
        let h = vec![
            ok(vec![rd("x", &[]), ap("x", 1)]),
            ok(vec![rd("x", &[]), ap("x", 2)]),
            ok(vec![rd("x", &[1, 2])]),
        ];
        assert!(!check(&h).is_serializable());
    }

    #[test]
    fn aborted_intermediate_and_garbage_reads() {
        let h = vec![
            TxnRecord { ops: vec![ap("x", 1)], outcome: Outcome::Aborted },
            ok(vec![rd("x", &[1])]),
            ok(vec![ap("y", 1), ap("y", 2)]),
            ok(vec![rd("y", &[1])]),
            ok(vec![rd("z", &[9])]),
        ];
        let r = check(&h);
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::AbortedRead { .. })));
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::IntermediateRead { .. })));
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::GarbageRead { .. })));
    }

    #[test]
    fn incompatible_orders_and_own_writes() {
        let h = vec![ok(vec![ap("x", 1)]), ok(vec![ap("x", 2)]), ok(vec![rd("x", &[1, 2])]), ok(vec![rd("x", &[2, 1])]), ok(vec![ap("w", 5), rd("w", &[])])];
        let r = check(&h);
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::IncompatibleOrder { .. })));
        assert!(r.anomalies.iter().any(|a| matches!(a, Anomaly::InternalInconsistency { .. })));
    }

    #[test]
    fn indeterminate_writes_seen_by_others_count_as_committed() {
        let h = vec![
            TxnRecord { ops: vec![rd("x", &[]), ap("x", 1)], outcome: Outcome::Indeterminate },
            ok(vec![rd("x", &[1]), ap("y", 1)]),
            ok(vec![rd("y", &[1]), rd("x", &[1])]),
        ];
        assert!(check(&h).is_serializable());
    }

    /// Execute random transactions against a model; `isolation_broken` lets each transaction read
    /// from a stale snapshot and still commit (what a database without conflict checks does).
    fn simulate(seed: u64, txns: usize, isolation_broken: bool) -> Vec<TxnRecord> {
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let keys = ["a", "b", "c"];
        let mut db: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut snapshots: Vec<HashMap<&str, Vec<u64>>> = vec![db.clone()];
        let mut out = Vec::new();
        for t in 0..txns {
            let view = if isolation_broken { snapshots[(next() as usize) % snapshots.len()].clone() } else { db.clone() };
            let mut local = view;
            let mut ops = Vec::new();
            let mut writes = Vec::new();
            for j in 0..(1 + next() % 4) {
                let k = keys[(next() % 3) as usize];
                if next() % 2 == 0 {
                    ops.push(rd(k, local.get(k).map(|v| v.as_slice()).unwrap_or(&[])));
                } else {
                    let v = (t * 10 + j as usize) as u64 + 1;
                    local.entry(k).or_default().push(v);
                    ops.push(ap(k, v));
                    writes.push((k, v));
                }
            }
            for (k, v) in writes {
                db.entry(k).or_default().push(v);
            }
            snapshots.push(db.clone());
            out.push(ok(ops));
        }
        // A final read of everything fixes the version order.
        out.push(ok(keys.iter().map(|k| rd(k, db.get(k).map(|v| v.as_slice()).unwrap_or(&[]))).collect()));
        out
    }

    proptest! {
        #[test]
        fn serial_executions_are_always_clean(seed in any::<u64>(), n in 1usize..40) {
            let h = simulate(seed, n, false);
            let r = check(&h);
            prop_assert!(r.is_serializable(), "{:?}", r.anomalies);
        }
    }

    #[test]
    fn broken_isolation_is_found() {
        let found = (0..20).filter(|s| !check(&simulate(*s, 60, true)).is_serializable()).count();
        assert!(found >= 15, "checker found anomalies in only {found}/20 broken histories");
    }
}
