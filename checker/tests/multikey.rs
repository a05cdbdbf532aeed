//! Hand-made histories with deletes, txns and scans: accepted ones, and the anomalies the
//! checker must reject (stale CAS, double CAS, lost delete, half-applied transfer, ...).

use kvraft_checker::{
    check, summarize, CheckResult, Compare, CompareOp, Input, OpResult, Operation, Output, TxnOp,
    TxnOpOutput,
};

fn ok(client: u64, input: Input, call_ns: u64, output: Output, return_ns: u64) -> Operation {
    Operation::new(client, input, call_ns, OpResult::Ok(output), return_ns)
}

fn put(client: u64, key: &str, value: &str, call: u64, ret: u64, version: u64) -> Operation {
    ok(
        client,
        Input::put(key, value),
        call,
        Output::put_version(version),
        ret,
    )
}

fn get(client: u64, key: &str, value: &str, version: u64, call: u64, ret: u64) -> Operation {
    ok(
        client,
        Input::get(key),
        call,
        Output::found(value, version),
        ret,
    )
}

fn get_absent(client: u64, key: &str, call: u64, ret: u64) -> Operation {
    ok(client, Input::get(key), call, Output::absent(), ret)
}

fn delete(client: u64, key: &str, call: u64, ret: u64, existed: bool) -> Operation {
    ok(
        client,
        Input::delete(key),
        call,
        Output::deleted(existed),
        ret,
    )
}

/// CAS: if version(k) == `expected` then put(k, value) else get(k).
fn cas_input(key: &str, expected: u64, value: &str) -> Input {
    Input::txn(
        vec![Compare::version(key, CompareOp::Equal, expected)],
        vec![TxnOp::put(key, value)],
        vec![TxnOp::get(key)],
    )
}

fn cas_ok(client: u64, key: &str, expected: u64, value: &str, call: u64, ret: u64) -> Operation {
    ok(
        client,
        cas_input(key, expected, value),
        call,
        Output::txn(true, vec![TxnOpOutput::put_version(expected + 1)]),
        ret,
    )
}

fn assert_linearizable(history: &[Operation]) {
    let result = check(history);
    assert_eq!(result, CheckResult::Linearizable, "{}", summarize(&result));
}

fn assert_violation(history: &[Operation]) -> kvraft_checker::Violation {
    match check(history) {
        CheckResult::Violation(violation) => {
            println!("{violation}");
            violation
        }
        other => panic!("expected a violation, got: {}", summarize(&other)),
    }
}

#[test]
fn t10_cas_on_a_stale_version_is_rejected_and_concurrent_is_accepted() {
    // put v2 acknowledged (version 2) before the CAS expecting version 1 was called.
    let stale = [
        put(1, "k", "a", 0, 10, 1),
        put(2, "k", "b", 20, 30, 2),
        cas_ok(3, "k", 1, "c", 40, 50),
    ];
    assert_violation(&stale);
    // The same CAS concurrent with the second put: CAS first (version 2), then the put
    // would answer 3, so the put answering 3 is consistent.
    assert_linearizable(&[
        put(1, "k", "a", 0, 10, 1),
        put(2, "k", "b", 20, 60, 3),
        cas_ok(3, "k", 1, "c", 25, 50),
    ]);
}

#[test]
fn t11_two_cas_increments_from_the_same_version_both_succeeding_are_rejected() {
    assert_violation(&[
        put(1, "k", "0", 0, 10, 1),
        cas_ok(2, "k", 1, "1", 20, 50),
        cas_ok(3, "k", 1, "1", 20, 50),
    ]);
    // One succeeds, the other sees the new version and fails.
    assert_linearizable(&[
        put(1, "k", "0", 0, 10, 1),
        cas_ok(2, "k", 1, "1", 20, 50),
        ok(
            3,
            cas_input("k", 1, "1"),
            20,
            Output::txn(false, vec![TxnOpOutput::found("1", 2)]),
            50,
        ),
    ]);
}

#[test]
fn t20_deletes() {
    // A delete after an acknowledged put says the key did not exist.
    assert_violation(&[put(1, "k", "a", 0, 10, 1), delete(2, "k", 20, 30, false)]);
    assert_linearizable(&[put(1, "k", "a", 0, 10, 1), delete(2, "k", 20, 30, true)]);
    // A get sees the value after an acknowledged delete, with no later put.
    assert_violation(&[
        put(1, "k", "a", 0, 10, 1),
        delete(2, "k", 20, 30, true),
        get(3, "k", "a", 1, 40, 50),
    ]);
    // A put after a delete creates the key again at version 1.
    let recreated = |version| {
        [
            put(1, "k", "a", 0, 10, 1),
            put(1, "k", "b", 20, 30, 2),
            delete(2, "k", 40, 50, true),
            put(3, "k", "c", 60, 70, version),
            get(3, "k", "c", version, 80, 90),
        ]
    };
    assert_linearizable(&recreated(1));
    assert_violation(&recreated(3));
    // An unknown delete may have applied, or not.
    let unknown = Operation::new(2, Input::delete("k"), 20, OpResult::Unknown, 0);
    assert_linearizable(&[
        put(1, "k", "a", 0, 10, 1),
        unknown.clone(),
        get_absent(3, "k", 40, 50),
    ]);
    assert_linearizable(&[
        put(1, "k", "a", 0, 10, 1),
        unknown,
        get(3, "k", "a", 1, 40, 50),
    ]);
}

#[test]
fn t30_scans() {
    let scan = |call, ret, entries: Vec<(&str, &str, u64)>| {
        ok(9, Input::scan("a", "z"), call, Output::scan(entries), ret)
    };
    // Missed a put acknowledged before the scan was called.
    assert_violation(&[
        put(1, "a", "1", 0, 10, 1),
        put(1, "b", "1", 0, 10, 1),
        scan(20, 30, vec![("a", "1", 1)]),
    ]);
    assert_linearizable(&[
        put(1, "a", "1", 0, 10, 1),
        put(1, "b", "1", 0, 10, 1),
        scan(20, 30, vec![("a", "1", 1), ("b", "1", 1)]),
    ]);
    // Concurrent with the put: either way.
    for entries in [vec![("a", "1", 1)], vec![("a", "1", 1), ("b", "1", 1)]] {
        assert_linearizable(&[
            put(1, "a", "1", 0, 10, 1),
            put(2, "b", "1", 15, 40, 1),
            scan(20, 30, entries),
        ]);
    }
    // A key outside the range in the output is a violation (the store answered wrongly; the
    // history itself is well formed).
    assert_violation(&[
        put(1, "a", "1", 0, 10, 1),
        put(1, "zz", "1", 0, 10, 1),
        scan(20, 30, vec![("a", "1", 1), ("zz", "1", 1)]),
    ]);
    // Keys out of order are a violation too, and an empty end means no upper bound.
    assert_violation(&[
        put(1, "a", "1", 0, 10, 1),
        put(1, "b", "1", 0, 10, 1),
        scan(20, 30, vec![("b", "1", 1), ("a", "1", 1)]),
    ]);
    assert_linearizable(&[
        put(1, "a", "1", 0, 10, 1),
        put(1, "zz", "1", 0, 10, 1),
        ok(
            9,
            Input::scan("b", ""),
            20,
            Output::scan(vec![("zz", "1", 1)]),
            30,
        ),
    ]);
    // A scan after a delete does not show the key.
    assert_violation(&[
        put(1, "a", "1", 0, 10, 1),
        delete(1, "a", 20, 30, true),
        scan(40, 50, vec![("a", "1", 1)]),
    ]);
}

/// Transfer: a -= 10, b += 10, guarded by both versions.
fn transfer(call: u64, ret: u64) -> Operation {
    ok(
        1,
        Input::txn(
            vec![
                Compare::version("a", CompareOp::Equal, 1),
                Compare::version("b", CompareOp::Equal, 1),
            ],
            vec![TxnOp::put("a", "90"), TxnOp::put("b", "110")],
            vec![],
        ),
        call,
        Output::txn(
            true,
            vec![TxnOpOutput::put_version(2), TxnOpOutput::put_version(2)],
        ),
        ret,
    )
}

#[test]
fn t40_half_applied_transfer_seen_by_a_scan_is_rejected() {
    let setup = [put(1, "a", "100", 0, 10, 1), put(1, "b", "100", 0, 10, 1)];
    let scan = |entries: Vec<(&str, &str, u64)>| {
        ok(2, Input::scan("a", "c"), 25, Output::scan(entries), 35)
    };
    let mut half = setup.to_vec();
    half.extend([
        transfer(20, 40),
        scan(vec![("a", "90", 2), ("b", "100", 1)]),
    ]);
    let violation = assert_violation(&half);
    assert_eq!(violation.keys, [b"a".to_vec(), b"b".to_vec()]);
    assert!(
        violation
            .to_string()
            .starts_with("linearizability violation on keys [\"a\", \"b\"]"),
        "{violation}"
    );
    for entries in [
        vec![("a", "100", 1), ("b", "100", 1)],
        vec![("a", "90", 2), ("b", "110", 2)],
    ] {
        let mut whole = setup.to_vec();
        whole.extend([transfer(20, 40), scan(entries)]);
        assert_linearizable(&whole);
    }
}

#[test]
fn t50_unknown_cas_is_disambiguated_by_a_later_get() {
    let unknown = Operation::new(2, cas_input("k", 1, "new"), 20, OpResult::Unknown, 0);
    let setup = [put(1, "k", "old", 0, 10, 1), unknown];
    let with = |last: Operation| {
        let mut history = setup.to_vec();
        history.push(last);
        history
    };
    assert_linearizable(&with(get(3, "k", "new", 2, 100, 110)));
    assert_linearizable(&with(get(3, "k", "old", 1, 100, 110)));
    assert_violation(&with(get(3, "k", "new", 3, 100, 110)));
    // Applied, then a later CAS from version 1 cannot succeed.
    let mut history = with(get(3, "k", "new", 2, 100, 110));
    history.push(cas_ok(4, "k", 1, "again", 200, 210));
    assert_violation(&history);
}

#[test]
fn t60_txn_ops_see_the_earlier_ops_of_their_branch() {
    let txn = |seen: TxnOpOutput| {
        ok(
            1,
            Input::txn(
                vec![],
                vec![TxnOp::put("k", "x"), TxnOp::get("k"), TxnOp::delete("k")],
                vec![],
            ),
            0,
            Output::txn(
                true,
                vec![
                    TxnOpOutput::put_version(1),
                    seen,
                    TxnOpOutput::deleted(true),
                ],
            ),
            10,
        )
    };
    assert_linearizable(&[txn(TxnOpOutput::found("x", 1)), get_absent(2, "k", 20, 30)]);
    assert_violation(&[txn(TxnOpOutput::absent())]);
}

#[test]
fn t61_value_compares() {
    let guarded = |op: CompareOp, succeeded: bool| {
        ok(
            1,
            Input::txn(
                vec![Compare::value("k", op, "m")],
                vec![TxnOp::get("k")],
                vec![],
            ),
            20,
            if succeeded {
                Output::txn(true, vec![TxnOpOutput::found("b", 1)])
            } else {
                Output::txn(false, vec![])
            },
            30,
        )
    };
    let setup = put(1, "k", "b", 0, 10, 1);
    assert_linearizable(&[setup.clone(), guarded(CompareOp::Less, true)]);
    assert_violation(&[setup.clone(), guarded(CompareOp::Greater, true)]);
    assert_linearizable(&[setup, guarded(CompareOp::NotEqual, true)]);
    // A value compare on an absent key is false whatever the op.
    let absent = ok(
        1,
        Input::txn(
            vec![Compare::value("k", CompareOp::NotEqual, "m")],
            vec![],
            vec![],
        ),
        0,
        Output::txn(true, vec![]),
        10,
    );
    assert_violation(&[absent]);
}

#[test]
fn t70_malformed_txn_results_are_inconclusive_and_named() {
    let wrong_count = ok(1, cas_input("k", 0, "v"), 0, Output::txn(true, vec![]), 10);
    let wrong_kind = ok(
        1,
        cas_input("k", 0, "v"),
        0,
        Output::txn(true, vec![TxnOpOutput::absent()]),
        10,
    );
    let wrong_output = ok(1, Input::delete("k"), 0, Output::absent(), 10);
    for op in [wrong_count, wrong_kind, wrong_output] {
        match check(std::slice::from_ref(&op)) {
            CheckResult::Inconclusive { reason } => {
                assert!(
                    reason.contains("malformed history: operation 0"),
                    "{reason}"
                )
            }
            other => panic!("expected inconclusive for {op}, got {}", summarize(&other)),
        }
    }
}

#[test]
fn t80_display_of_the_new_operations() {
    let op = ok(
        1,
        cas_input("k", 1, "v"),
        0,
        Output::txn(false, vec![TxnOpOutput::found("w", 2)]),
        10,
    );
    assert_eq!(
        op.to_string(),
        "client 1 txn(if [version(\"k\") == 1] then [put(\"k\", \"v\")] else [get(\"k\")]) -> \
         else [\"w\" v2] [0, 10] ns"
    );
    let op = ok(
        2,
        Input::scan("a", ""),
        0,
        Output::scan(vec![("a", "1", 3)]),
        5,
    );
    assert_eq!(
        op.to_string(),
        "client 2 scan(\"a\", end) -> [\"a\": \"1\" v3] [0, 5] ns"
    );
    let op = ok(3, Input::delete("k"), 0, Output::deleted(true), 5);
    assert_eq!(
        op.to_string(),
        "client 3 delete(\"k\") -> existed true [0, 5] ns"
    );
}

#[test]
fn t62_a_txn_without_compares_must_succeed() {
    let txn = |succeeded| {
        ok(
            1,
            Input::txn(vec![], vec![], vec![]),
            0,
            Output::txn(succeeded, vec![]),
            10,
        )
    };
    assert_linearizable(&[txn(true)]);
    assert_violation(&[txn(false)]);
    // A scan of an empty range that returns nothing is fine.
    assert_linearizable(&[ok(
        1,
        Input::scan("a", "b"),
        0,
        Output::scan(Vec::<(&str, &str, u64)>::new()),
        10,
    )]);
}
