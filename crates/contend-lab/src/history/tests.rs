//! The checker on hand-made histories: each anomaly it claims to find, in a history that has
//! only that anomaly, and clean histories (serial, concurrent but serializable, with unknown
//! and failed operations) that must report nothing.

use std::collections::BTreeMap;

use super::{History, Mop, Op, Recorder, Status};

fn ok(process: usize, mops: Vec<Mop>) -> Op {
    Op::new(process, Status::Ok, mops)
}

fn r<const N: usize>(key: u64, list: [u64; N]) -> Mop {
    Mop::read(key, list)
}

fn a(key: u64, value: u64) -> Mop {
    Mop::append(key, value)
}

/// The anomalies of `ops` by kind.
fn kinds(ops: Vec<Op>) -> BTreeMap<&'static str, u64> {
    History::new(ops).check().counts()
}

fn only(kind: &'static str) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([(kind, 1)])
}

#[test]
fn g0_write_cycle() {
    // T0 and T1 append to x and y; x's order says T0 first, y's says T1 first.
    let ops = vec![
        ok(0, vec![a(1, 1), a(2, 1)]),
        ok(1, vec![a(1, 2), a(2, 2)]),
        ok(2, vec![r(1, [1, 2]), r(2, [2, 1])]),
    ];
    assert_eq!(kinds(ops.clone()), only("G0"));
    let analysis = History::new(ops).check();
    let w = &analysis.anomalies[0].witness;
    assert!(
        w.starts_with("G0 cycle of 2 operations: op 0 -ww-> op 1 -ww-> op 0"),
        "{w}"
    );
    assert!(
        w.contains("ww on key 1: op 1 appended 2 right after op 0's 1"),
        "{w}"
    );
    assert!(
        w.contains("ww on key 2: op 0 appended 1 right after op 1's 2"),
        "{w}"
    );
}

#[test]
fn g1a_aborted_read() {
    let ops = vec![
        Op::new(0, Status::Failed, vec![r(1, []), a(1, 7)]),
        ok(1, vec![r(1, [7])]),
    ];
    assert_eq!(kinds(ops.clone()), only("G1a"));
    let analysis = History::new(ops).check();
    assert_eq!(analysis.anomalies[0].ops, vec![1, 0]);
    assert!(analysis.anomalies[0].witness.contains("which failed"));

    // The same read of an unknown operation's value: it committed, no anomaly.
    let ops = vec![
        Op::new(0, Status::Unknown, vec![r(1, []), a(1, 7)]),
        ok(1, vec![r(1, [7])]),
    ];
    assert_eq!(kinds(ops), BTreeMap::new());
}

#[test]
fn g1b_intermediate_read() {
    // T0 appends 1 then 2 to x; T1 sees x end in 1.
    let ops = vec![ok(0, vec![a(1, 1), a(1, 2)]), ok(1, vec![r(1, [1])])];
    assert_eq!(kinds(ops), only("G1b"));
}

#[test]
fn g1c_circular_information_flow() {
    // Each reads the other's append.
    let ops = vec![
        ok(0, vec![a(1, 1), r(2, [2])]),
        ok(1, vec![a(2, 2), r(1, [1])]),
    ];
    assert_eq!(kinds(ops.clone()), only("G1c"));
    let w = &History::new(ops).check().anomalies[0].witness;
    assert!(w.contains("-wr->"), "{w}");
}

#[test]
fn g_single_read_skew() {
    // T1 sees T0's append to y but not its append to x.
    let ops = vec![
        ok(0, vec![a(1, 1), a(2, 1)]),
        ok(1, vec![r(1, []), r(2, [1])]),
        ok(2, vec![r(1, [1]), r(2, [1])]),
    ];
    assert_eq!(kinds(ops.clone()), only("G-single"));
    let analysis = History::new(ops).check();
    let w = &analysis.anomalies[0].witness;
    assert!(w.contains("op 1 -rw-> op 0 -wr-> op 1"), "{w}");
    assert!(
        w.contains("rw on key 1: op 1 read 0 values, not op 0's 1"),
        "{w}"
    );
    assert!(
        w.contains("wr on key 2: op 1 read 1, appended by op 0"),
        "{w}"
    );
}

#[test]
fn g2_write_skew() {
    // Both read x and y empty; one appends to x, the other to y.
    let ops = vec![
        ok(0, vec![r(1, []), r(2, []), a(1, 1)]),
        ok(1, vec![r(1, []), r(2, []), a(2, 2)]),
        ok(2, vec![r(1, [1]), r(2, [2])]),
    ];
    assert_eq!(kinds(ops.clone()), only("G2"));
    let w = &History::new(ops).check().anomalies[0].witness;
    assert_eq!(w.matches("-rw->").count(), 2, "{w}");
}

#[test]
fn g_single_and_g2_in_one_component_are_both_reported() {
    // T0 -rw-> T1 -rw-> T0 (write skew on x, y), and T1 -wr-> T2 -rw-> T1: T2 sees T1's
    // append to z but not its append to w.
    let ops = vec![
        ok(0, vec![r(1, []), r(2, []), a(1, 1)]),
        ok(1, vec![r(1, []), r(2, []), a(2, 2), a(3, 3), a(5, 5)]),
        ok(2, vec![r(3, [3]), r(5, [])]),
        ok(3, vec![r(1, [1]), r(2, [2]), r(3, [3]), r(5, [5])]),
    ];
    let found = kinds(ops);
    assert_eq!(found.get("G-single"), Some(&1), "{found:?}");
    assert_eq!(found.get("G2"), Some(&1), "{found:?}");
}

#[test]
fn incompatible_order() {
    let ops = vec![
        ok(0, vec![a(1, 1)]),
        ok(1, vec![a(1, 2)]),
        ok(2, vec![r(1, [1])]),
        ok(3, vec![r(1, [2])]),
    ];
    assert_eq!(kinds(ops), only("incompatible-order"));
}

#[test]
fn lost_update() {
    // Both read x empty and append; the later write overwrote the earlier one.
    let ops = vec![
        ok(0, vec![r(1, []), a(1, 1)]),
        ok(1, vec![r(1, []), a(1, 2)]),
        ok(2, vec![r(1, [2])]),
    ];
    assert_eq!(kinds(ops), only("lost-update"));
}

#[test]
fn a_serial_history_is_clean() {
    // 200 operations one after the other on 5 keys, each reading two keys and appending to one.
    let mut lists: Vec<Vec<u64>> = vec![Vec::new(); 5];
    let mut ops = Vec::new();
    for i in 0..200u64 {
        let (x, y) = ((i % 5) as usize, ((i * 3 + 1) % 5) as usize);
        let mut mops = vec![
            Mop::read(x as u64, lists[x].clone()),
            Mop::read(y as u64, lists[y].clone()),
        ];
        mops.push(a(x as u64, i + 1));
        lists[x].push(i + 1);
        ops.push(ok((i % 4) as usize, mops).at(i * 10, i * 10 + 5));
    }
    let finals = (0..5).map(|k| Mop::read(k, lists[k as usize].clone()));
    ops.push(ok(super::FINAL_PROCESS, finals.collect()).at(10_000, 10_001));
    let analysis = History::new(ops).check();
    assert!(analysis.anomalies.is_empty(), "{analysis:#?}");
    assert_eq!(analysis.components, 0);
}

#[test]
fn a_concurrent_serializable_history_is_clean() {
    // T0 is invoked first but serialized after T1 (it saw T1's append); T2 overlaps both and
    // reads before either. No real-time order is assumed, so this is serializable: T2, T1, T0.
    let ops = vec![
        ok(0, vec![r(1, [2]), a(2, 1)]).at(0, 100),
        ok(1, vec![r(1, []), a(1, 2)]).at(10, 20),
        ok(2, vec![r(1, []), r(2, [])]).at(5, 200),
        ok(3, vec![r(1, [2]), r(2, [1])]).at(300, 310),
    ];
    assert_eq!(kinds(ops), BTreeMap::new());
}

#[test]
fn unknown_and_failed_operations_without_anomalies_are_clean() {
    let ops = vec![
        // Unknown, and seen: committed, ordered after op 0.
        ok(0, vec![r(1, []), a(1, 1)]),
        Op::new(1, Status::Unknown, vec![r(1, [1]), a(1, 2)]),
        // Unknown and never seen: nothing. Its "read" is garbage and not trusted.
        Op::new(
            2,
            Status::Unknown,
            vec![
                Mop::Read {
                    key: 1,
                    list: Some(vec![9, 9]),
                },
                a(2, 3),
            ],
        ),
        // Failed and never seen: nothing. Unknown read result.
        Op::new(
            3,
            Status::Failed,
            vec![Mop::Read { key: 1, list: None }, a(1, 4)],
        ),
        ok(4, vec![r(1, [1, 2]), r(2, [])]),
    ];
    let analysis = History::new(ops).check();
    assert!(analysis.anomalies.is_empty(), "{analysis:#?}");
}

#[test]
fn an_unknown_operation_that_was_seen_takes_part_in_cycles() {
    // Write skew where one side's outcome is unknown but its append was read: still G2.
    let ops = vec![
        ok(0, vec![r(1, []), r(2, []), a(1, 1)]),
        Op::new(1, Status::Unknown, vec![r(1, []), r(2, []), a(2, 2)]),
        ok(2, vec![r(1, [1]), r(2, [2])]),
    ];
    // The unknown op's reads are not trusted: only T0 -rw-> T1 is known, no cycle. Jepsen's
    // rule: an unknown op contributes its writes, not its reads.
    assert_eq!(kinds(ops), BTreeMap::new());

    // Its writes count once seen: the read skew of `g_single_read_skew` with the writer's
    // outcome unknown is still a G-single.
    let ops = vec![
        Op::new(0, Status::Unknown, vec![a(1, 1), a(2, 1)]),
        ok(1, vec![r(1, []), r(2, [1])]),
        ok(2, vec![r(1, [1]), r(2, [1])]),
    ];
    assert_eq!(kinds(ops), only("G-single"));
}

#[test]
fn witnesses_describe_operations() {
    let ops = vec![
        ok(0, vec![r(1, []), r(2, []), a(1, 1)]).at(1_000_000, 2_500_000),
        ok(1, vec![r(1, []), r(2, []), a(2, 2)]).at(1_200_000, 2_000_000),
        ok(super::FINAL_PROCESS, vec![r(1, [1]), r(2, [2])]).at(3_000_000, 3_100_000),
    ];
    let analysis = History::new(ops).check();
    let w = &analysis.anomalies[0].witness;
    assert!(
        w.contains("op 0 (worker 0, ok, 1.000-2.500 ms: r 1 [], r 2 [], a 1 1)"),
        "{w}"
    );
    assert!(w.contains("op 1 (worker 1, ok, 1.200-2.000 ms:"), "{w}");
    let long: Vec<u64> = (1..=10).collect();
    assert_eq!(
        ok(super::FINAL_PROCESS, vec![Mop::read(3, long)]).describe(7),
        "op 7 (final read, ok, 0.000-0.000 ms: r 3 [.. 7 8 9 10] (10 values))"
    );
}

#[test]
fn the_recorder_merges_worker_buffers_in_invocation_order() {
    let recorder = Recorder::new(3);
    // Workers beyond the buffers made share one (modulo).
    for (process, at) in [(2, 30), (0, 10), (5, 20), (1, 0)] {
        recorder.record(ok(process, vec![r(1, [])]).at(at, at + 1));
    }
    let history = recorder.take();
    let order: Vec<usize> = history.ops.iter().map(|o| o.process).collect();
    assert_eq!(order, vec![1, 0, 5, 2]);
    assert!(recorder.take().ops.is_empty(), "take empties the buffers");
}
