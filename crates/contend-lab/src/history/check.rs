//! The checker: version orders from the reads, the dependency graph, its strongly connected
//! components and a classified shortest cycle in each (see the module documentation of
//! [`crate::history`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use super::{History, Key, Mop, Op, Status, Value, show_list};

/// The kinds of anomaly the checker finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AnomalyKind {
    /// A cycle of write dependencies only.
    G0,
    /// A read of a value appended by a failed operation.
    G1a,
    /// A read of a value its writer later overwrote (appended to again) in the same operation.
    G1b,
    /// A cycle of write and read dependencies, at least one of them a read.
    G1c,
    /// A cycle with exactly one anti-dependency.
    GSingle,
    /// A cycle with more than one anti-dependency.
    G2,
    /// Two reads of one key, neither a prefix of the other.
    IncompatibleOrder,
    /// Two committed operations that read the same version of a key and both appended to it.
    LostUpdate,
}

impl AnomalyKind {
    /// Its name in reports: `G0`, `G1a`, `G1b`, `G1c`, `G-single`, `G2`,
    /// `incompatible-order`, `lost-update`.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::G0 => "G0",
            AnomalyKind::G1a => "G1a",
            AnomalyKind::G1b => "G1b",
            AnomalyKind::G1c => "G1c",
            AnomalyKind::GSingle => "G-single",
            AnomalyKind::G2 => "G2",
            AnomalyKind::IncompatibleOrder => "incompatible-order",
            AnomalyKind::LostUpdate => "lost-update",
        }
    }
}

impl std::fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One anomaly and its witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// The operations involved (ids: indexes into [`History::ops`]); for a cycle, in cycle
    /// order.
    pub ops: Vec<usize>,
    /// The witness in words: the operations and, for a cycle, every edge with its key and
    /// value.
    pub witness: String,
}

/// What [`History::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analysis {
    /// Every anomaly found: the non-cycle ones first, then per strongly connected component the
    /// cycles of each kind found in it.
    pub anomalies: Vec<Anomaly>,
    /// Whether the cycle search ran out of its budget before classifying every component (each
    /// component still yields at least one cycle).
    pub truncated: bool,
    /// Strongly connected components of more than one operation.
    pub components: usize,
}

impl Analysis {
    /// Anomalies by kind name.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for a in &self.anomalies {
            *counts.entry(a.kind.as_str()).or_default() += 1;
        }
        counts
    }

    /// The first anomaly of each kind found, cycles first (G0, G1c, G-single, G2), then G1a,
    /// G1b, lost update, incompatible order.
    pub fn examples(&self) -> Vec<&Anomaly> {
        use AnomalyKind::*;
        [
            G0,
            G1c,
            GSingle,
            G2,
            G1a,
            G1b,
            LostUpdate,
            IncompatibleOrder,
        ]
        .into_iter()
        .filter_map(|kind| self.anomalies.iter().find(|a| a.kind == kind))
        .collect()
    }

    /// Anomalies of the kind named `kind` (`G-single`, ...).
    pub fn count(&self, kind: &str) -> u64 {
        self.anomalies
            .iter()
            .filter(|a| a.kind.as_str() == kind)
            .count() as u64
    }
}

/// Edge types, as bits of an edge's mask.
const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const ALL: u8 = WW | WR | RW;

fn dep_name(dep: u8) -> &'static str {
    match dep {
        WW => "ww",
        WR => "wr",
        _ => "rw",
    }
}

/// Why an edge of one type exists: the key, the value behind it and, for `ww` the value
/// before it, for `rw` the length of the list read.
#[derive(Debug, Clone, Copy)]
struct Why {
    key: Key,
    value: Value,
    other: u64,
}

/// An edge between two operations: the types it has, and one reason per type.
#[derive(Debug, Clone, Default)]
struct Edge {
    mask: u8,
    why: [Option<Why>; 3],
}

fn slot(dep: u8) -> usize {
    match dep {
        WW => 0,
        WR => 1,
        _ => 2,
    }
}

/// Edge relaxations the budgeted cycle searches (G-single, G2) may spend over one check.
const SEARCH_BUDGET: u64 = 50_000_000;

/// Checks `history` (see the module documentation).
pub(super) fn check(history: &History) -> Analysis {
    let ops = &history.ops;
    let mut anomalies = Vec::new();

    // Who appended what; which appends were followed by another to the same key in their op.
    let mut writer: HashMap<(Key, Value), usize> = HashMap::new();
    let mut intermediate: HashSet<(Key, Value)> = HashSet::new();
    for (id, op) in ops.iter().enumerate() {
        let mut last: HashMap<Key, Value> = HashMap::new();
        for m in &op.mops {
            if let Mop::Append { key, value } = *m {
                writer.entry((key, value)).or_insert(id);
                if let Some(prev) = last.insert(key, value) {
                    intermediate.insert((key, prev));
                }
            }
        }
    }

    // The trusted reads (ok operations only), per key.
    let mut reads: BTreeMap<Key, Vec<(usize, &[Value])>> = BTreeMap::new();
    for (id, op) in ops.iter().enumerate() {
        if op.status != Status::Ok {
            continue;
        }
        for m in &op.mops {
            if let Mop::Read {
                key,
                list: Some(list),
            } = m
            {
                reads.entry(*key).or_default().push((id, list.as_slice()));
            }
        }
    }

    // G1a and G1b.
    let mut aborted_seen: HashSet<(usize, usize)> = HashSet::new();
    for (key, rs) in &reads {
        for &(reader, list) in rs {
            for v in list {
                if let Some(&w) = writer.get(&(*key, *v))
                    && ops[w].status == Status::Failed
                    && aborted_seen.insert((reader, w))
                {
                    anomalies.push(Anomaly {
                        kind: AnomalyKind::G1a,
                        ops: vec![reader, w],
                        witness: format!(
                            "G1a (aborted read): {} read value {v} of key {key}, appended by {}, \
                             which failed",
                            ops[reader].describe(reader),
                            ops[w].describe(w)
                        ),
                    });
                }
            }
            if let Some(&v) = list.last()
                && intermediate.contains(&(*key, v))
                && let Some(&w) = writer.get(&(*key, v))
                && w != reader
            {
                anomalies.push(Anomaly {
                    kind: AnomalyKind::G1b,
                    ops: vec![reader, w],
                    witness: format!(
                        "G1b (intermediate read): {} read key {key} ending in {v}, which {} \
                         followed with another append to key {key}",
                        ops[reader].describe(reader),
                        ops[w].describe(w)
                    ),
                });
            }
        }
    }

    // Version orders: the longest read of each key; every read must be a prefix of it.
    let mut orders: BTreeMap<Key, &[Value]> = BTreeMap::new();
    let mut prefix_ok: HashSet<(usize, Key)> = HashSet::new();
    for (key, rs) in &reads {
        let Some(&(longest_reader, longest)) = rs.iter().max_by_key(|(_, l)| l.len()) else {
            continue;
        };
        orders.insert(*key, longest);
        let mut clash: Option<(usize, &[Value])> = None;
        for &(reader, list) in rs {
            if longest.starts_with(list) {
                prefix_ok.insert((reader, *key));
            } else if clash.is_none() {
                clash = Some((reader, list));
            }
        }
        if let Some((reader, list)) = clash {
            anomalies.push(Anomaly {
                kind: AnomalyKind::IncompatibleOrder,
                ops: vec![reader, longest_reader],
                witness: format!(
                    "incompatible order of key {key}: {} read {}, {} read {}; neither is a \
                     prefix of the other",
                    ops[reader].who(reader),
                    show_list(list),
                    ops[longest_reader].who(longest_reader),
                    show_list(longest)
                ),
            });
        }
    }

    // Lost updates: committed operations that read the same version of a key and appended to it.
    let mut same_version: BTreeMap<(Key, usize, Option<Value>), Vec<usize>> = BTreeMap::new();
    for (id, op) in ops.iter().enumerate() {
        if op.status != Status::Ok {
            continue;
        }
        let appended: HashSet<Key> = op
            .mops
            .iter()
            .filter_map(|m| match m {
                Mop::Append { key, .. } => Some(*key),
                Mop::Read { .. } => None,
            })
            .collect();
        if appended.is_empty() {
            continue;
        }
        for m in &op.mops {
            if let Mop::Read {
                key,
                list: Some(list),
            } = m
                && appended.contains(key)
            {
                let entry = same_version
                    .entry((*key, list.len(), list.last().copied()))
                    .or_default();
                if entry.last() != Some(&id) {
                    entry.push(id);
                }
            }
        }
    }
    for ((key, len, _), ids) in &same_version {
        if ids.len() < 2 {
            continue;
        }
        let shown: Vec<String> = ids.iter().take(4).map(|&i| ops[i].describe(i)).collect();
        anomalies.push(Anomaly {
            kind: AnomalyKind::LostUpdate,
            ops: ids.clone(),
            witness: format!(
                "lost update of key {key}: {} committed operations read the same version ({len} \
                 values) and appended to it: {}{}",
                ids.len(),
                shown.join("; "),
                if ids.len() > 4 { "; ..." } else { "" }
            ),
        });
    }

    // The dependency graph. Failed operations take no part; unknown ones through their
    // observed writes only (their reads are not in `reads`).
    let mut edges: HashMap<(usize, usize), Edge> = HashMap::new();
    let mut add = |from: usize, to: usize, dep: u8, why: Why| {
        if from == to || ops[from].status == Status::Failed || ops[to].status == Status::Failed {
            return;
        }
        let e = edges.entry((from, to)).or_default();
        e.mask |= dep;
        e.why[slot(dep)].get_or_insert(why);
    };
    for (key, order) in &orders {
        for pair in order.windows(2) {
            if let (Some(&a), Some(&b)) =
                (writer.get(&(*key, pair[0])), writer.get(&(*key, pair[1])))
            {
                let why = Why {
                    key: *key,
                    value: pair[1],
                    other: pair[0],
                };
                add(a, b, WW, why);
            }
        }
        for &(reader, list) in &reads[key] {
            if let Some(&v) = list.last()
                && let Some(&w) = writer.get(&(*key, v))
            {
                let why = Why {
                    key: *key,
                    value: v,
                    other: 0,
                };
                add(w, reader, WR, why);
            }
            if prefix_ok.contains(&(reader, *key))
                && let Some(&next) = order.get(list.len())
                && let Some(&w) = writer.get(&(*key, next))
            {
                let why = Why {
                    key: *key,
                    value: next,
                    other: list.len() as u64,
                };
                add(reader, w, RW, why);
            }
        }
    }

    let graph = Graph::new(ops.len(), &edges);
    let mut budget = SEARCH_BUDGET;
    let mut truncated = false;
    let components = graph.sccs(ALL, None);
    let count = components.len();
    for component in components {
        let local = graph.local(&component);
        for (kind, (first, steps)) in classify(&local, &mut budget, &mut truncated) {
            let global = (
                local.nodes[first],
                steps
                    .into_iter()
                    .map(|(d, v)| (d, local.nodes[v]))
                    .collect(),
            );
            anomalies.push(witness(ops, &edges, kind, &global));
        }
    }
    Analysis {
        anomalies,
        truncated,
        components: count,
    }
}

/// Adjacency lists with edge masks.
struct Graph {
    adj: Vec<Vec<(usize, u8)>>,
}

impl Graph {
    fn new(n: usize, edges: &HashMap<(usize, usize), Edge>) -> Graph {
        let mut adj = vec![Vec::new(); n];
        for (&(a, b), e) in edges {
            adj[a].push((b, e.mask));
        }
        for list in &mut adj {
            list.sort_unstable();
        }
        Graph { adj }
    }

    /// Strongly connected components of more than one node over edges with a type in `mask`,
    /// among the nodes with `within[node]` (all when `None`): iterative Tarjan.
    fn sccs(&self, mask: u8, within: Option<&[bool]>) -> Vec<Vec<usize>> {
        const UNSEEN: usize = usize::MAX;
        let n = self.adj.len();
        let inside = |v: usize| within.is_none_or(|w| w[v]);
        let mut index = vec![UNSEEN; n];
        let mut low = vec![0; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut out = Vec::new();
        let mut next = 0;
        for root in 0..n {
            if index[root] != UNSEEN || !inside(root) {
                continue;
            }
            let mut calls: Vec<(usize, usize)> = vec![(root, 0)];
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root);
            on_stack[root] = true;
            while let Some(&mut (v, ref mut pos)) = calls.last_mut() {
                if *pos < self.adj[v].len() {
                    let (w, m) = self.adj[v][*pos];
                    *pos += 1;
                    if m & mask == 0 || !inside(w) {
                        continue;
                    }
                    if index[w] == UNSEEN {
                        index[w] = next;
                        low[w] = next;
                        next += 1;
                        stack.push(w);
                        on_stack[w] = true;
                        calls.push((w, 0));
                    } else if on_stack[w] {
                        low[v] = low[v].min(index[w]);
                    }
                } else {
                    calls.pop();
                    if let Some(&(u, _)) = calls.last() {
                        low[u] = low[u].min(low[v]);
                    }
                    if low[v] == index[v] {
                        let mut component = Vec::new();
                        while let Some(w) = stack.pop() {
                            on_stack[w] = false;
                            component.push(w);
                            if w == v {
                                break;
                            }
                        }
                        if component.len() > 1 {
                            component.sort_unstable();
                            out.push(component);
                        }
                    }
                }
            }
        }
        out
    }

    /// The subgraph of `nodes` (sorted), renumbered 0.. (`Local::nodes` maps back).
    fn local(&self, nodes: &[usize]) -> Local {
        let id = |v: usize| nodes.binary_search(&v).ok();
        let adj = nodes
            .iter()
            .map(|&v| {
                self.adj[v]
                    .iter()
                    .filter_map(|&(w, m)| id(w).map(|w| (w, m)))
                    .collect()
            })
            .collect();
        Local {
            nodes: nodes.to_vec(),
            graph: Graph { adj },
        }
    }
}

/// One strongly connected component as a graph of its own.
struct Local {
    nodes: Vec<usize>,
    graph: Graph,
}

/// A cycle: its first node, then each step's edge type and the node it reaches (the last
/// step returns to the first node). Local ids.
type Cycle = (usize, Vec<(u8, usize)>);

/// The cycles found in one component, one per kind found: G0, G1c, G-single, G2; when none of
/// the searches succeeded (budget spent), one shortest cycle classified by its edges.
fn classify(local: &Local, budget: &mut u64, truncated: &mut bool) -> Vec<(AnomalyKind, Cycle)> {
    let g = &local.graph;
    let n = local.nodes.len();
    let mut found = Vec::new();

    // G0: a component of the ww-only subgraph; any ww edge inside it closes a cycle.
    // G1c: a component of the ww+wr subgraph with a wr edge inside it.
    for (kind, mask, need) in [(AnomalyKind::G0, WW, WW), (AnomalyKind::G1c, WW | WR, WR)] {
        'components: for sub in g.sccs(mask, None) {
            let mut inside = vec![false; n];
            for &v in &sub {
                inside[v] = true;
            }
            for &a in &sub {
                for &(b, m) in &g.adj[a] {
                    if inside[b] && m & need != 0 {
                        let mut unbounded = u64::MAX;
                        if let Some(path) = search(g, b, a, mask, false, &mut unbounded) {
                            found.push((kind, closed(a, need, b, path)));
                            break 'components;
                        }
                    }
                }
            }
        }
    }

    // G-single: an rw edge a -> b and a path b ~> a of ww and wr edges.
    'single: for a in 0..n {
        for &(b, m) in &g.adj[a] {
            if m & RW == 0 {
                continue;
            }
            if *budget == 0 {
                *truncated = true;
                break 'single;
            }
            if let Some(path) = search(g, b, a, WW | WR, false, budget) {
                found.push((AnomalyKind::GSingle, closed(a, RW, b, path)));
                break 'single;
            }
        }
    }

    // G2: an rw edge a -> b and a path b ~> a with at least one more rw edge, as a simple cycle.
    'g2: for a in 0..n {
        for &(b, m) in &g.adj[a] {
            if m & RW == 0 {
                continue;
            }
            if *budget == 0 {
                *truncated = true;
                break 'g2;
            }
            if let Some(path) = search(g, b, a, ALL, true, budget) {
                let mut seen = vec![false; n];
                seen[a] = true;
                let simple = std::iter::once(b)
                    .chain(path.iter().map(|&(_, v)| v))
                    .take(path.len())
                    .all(|v| !std::mem::replace(&mut seen[v], true));
                if simple {
                    found.push((AnomalyKind::G2, closed(a, RW, b, path)));
                    break 'g2;
                }
            }
        }
    }

    if found.is_empty() {
        // Any shortest cycle through the first edge, classified by what it is made of.
        'any: for a in 0..n {
            for &(b, _) in &g.adj[a] {
                let mut unbounded = u64::MAX;
                let first = g.adj[a]
                    .iter()
                    .find(|(w, _)| *w == b)
                    .map_or(RW, |&(_, m)| prefer(m));
                if let Some(path) = search(g, b, a, ALL, false, &mut unbounded) {
                    let cycle = closed(a, first, b, path);
                    let rw = cycle.1.iter().filter(|(d, _)| *d == RW).count();
                    let wr = cycle.1.iter().any(|(d, _)| *d == WR);
                    let kind = match (rw, wr) {
                        (0, false) => AnomalyKind::G0,
                        (0, true) => AnomalyKind::G1c,
                        (1, _) => AnomalyKind::GSingle,
                        _ => AnomalyKind::G2,
                    };
                    found.push((kind, cycle));
                    break 'any;
                }
            }
        }
    }
    found
}

/// The type shown for an edge of mask `m` when any will do: ww, then wr, then rw.
fn prefer(m: u8) -> u8 {
    [WW, WR, RW].into_iter().find(|d| m & d != 0).unwrap_or(RW)
}

/// The cycle `a -dep-> b` followed by `path` (from `b` back to `a`).
fn closed(a: usize, dep: u8, b: usize, path: Vec<(u8, usize)>) -> Cycle {
    let mut steps = vec![(dep, b)];
    steps.extend(path);
    (a, steps)
}

/// A shortest path from `from` to `to` over edges with a type in `allowed`, as (edge type,
/// node) steps; with `need_rw`, one that takes at least one rw edge. Each edge relaxation
/// costs one unit of `budget`; `None` when there is no such path or the budget ran out.
fn search(
    g: &Graph,
    from: usize,
    to: usize,
    allowed: u8,
    need_rw: bool,
    budget: &mut u64,
) -> Option<Vec<(u8, usize)>> {
    let n = g.adj.len();
    let state = |v: usize, f: bool| v * 2 + usize::from(f);
    let goal = state(to, need_rw);
    let start = state(from, false);
    if start == goal {
        return Some(Vec::new());
    }
    // parent[state] = (previous state, edge type)
    let mut parent: HashMap<usize, (usize, u8)> = HashMap::new();
    let mut seen = vec![false; n * 2];
    seen[start] = true;
    let mut queue = VecDeque::from([start]);
    while let Some(s) = queue.pop_front() {
        let (v, f) = (s / 2, s % 2 == 1);
        for &(w, m) in &g.adj[v] {
            for dep in [WW, WR, RW] {
                if m & dep & allowed == 0 {
                    continue;
                }
                if *budget == 0 {
                    return None;
                }
                *budget -= 1;
                let next = state(w, f || (need_rw && dep == RW));
                if seen[next] {
                    continue;
                }
                seen[next] = true;
                parent.insert(next, (s, dep));
                if next == goal {
                    let mut steps = Vec::new();
                    let mut at = goal;
                    while at != start {
                        let (prev, dep) = parent[&at];
                        steps.push((dep, at / 2));
                        at = prev;
                    }
                    steps.reverse();
                    return Some(steps);
                }
                queue.push_back(next);
            }
        }
    }
    None
}

/// The anomaly of `cycle` (global operation ids) in words: the kind, then each operation and
/// the edge that leads from it to the next, with the key and value behind the edge.
fn witness(
    ops: &[Op],
    edges: &HashMap<(usize, usize), Edge>,
    kind: AnomalyKind,
    cycle: &Cycle,
) -> Anomaly {
    let (first, steps) = cycle;
    let mut ids = vec![*first];
    ids.extend(
        steps
            .iter()
            .map(|&(_, v)| v)
            .take(steps.len().saturating_sub(1)),
    );
    let mut chain = format!("op {first}");
    for &(dep, v) in steps {
        let _ = write!(chain, " -{}-> op {v}", dep_name(dep));
    }
    let mut text = format!("{kind} cycle of {} operations: {chain}", ids.len());
    let mut from = *first;
    for &(dep, to) in steps {
        let _ = write!(text, "\n  {}", ops[from].describe(from));
        let why = edges.get(&(from, to)).and_then(|e| e.why[slot(dep)]);
        if let Some(w) = why {
            let _ = match dep {
                WW => write!(
                    text,
                    "\n    ww on key {}: op {to} appended {} right after op {from}'s {}",
                    w.key, w.value, w.other
                ),
                WR => write!(
                    text,
                    "\n    wr on key {}: op {to} read {}, appended by op {from}",
                    w.key, w.value
                ),
                _ => write!(
                    text,
                    "\n    rw on key {}: op {from} read {} values, not op {to}'s {}, which comes next",
                    w.key, w.other, w.value
                ),
            };
        }
        from = to;
    }
    Anomaly {
        kind,
        ops: ids,
        witness: text,
    }
}
