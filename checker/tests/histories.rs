//! Hand-made histories with explicit times: accepted ones, and each kind of anomaly the
//! checker must reject (stale read, lost write, double apply, phantom value, time travel).

mod common;

use common::*;
use kvraft_checker::{
    check, check_with_budget, summarize, CheckResult, Input, OpResult, Operation, Output,
};
use std::time::Duration;

fn assert_linearizable(history: &[Operation]) {
    let result = check(history);
    assert_eq!(result, CheckResult::Linearizable, "{}", summarize(&result));
}

/// Asserts a violation and returns the ops of the failing piece.
fn assert_violation(history: &[Operation]) -> Vec<Operation> {
    match check(history) {
        CheckResult::Violation(violation) => {
            println!("{violation}");
            violation.ops
        }
        other => panic!("expected a violation, got: {}", summarize(&other)),
    }
}

#[test]
fn t10_sequential_history_is_linearizable() {
    assert_linearizable(&[
        get_absent(1, 0, 10),
        put(1, "v1", 20, 30, 1),
        get(2, "v1", 1, 40, 50),
        put(2, "v2", 60, 70, 2),
        get(1, "v2", 2, 80, 90),
    ]);
}

#[test]
fn t11_concurrent_puts_and_gets_with_several_valid_orders() {
    // Two overlapping puts: either may win, and a get overlapping both may see either or none.
    let puts = |v1_version, v2_version| {
        [
            put(1, "v1", 0, 100, v1_version),
            put(2, "v2", 10, 90, v2_version),
        ]
    };
    for (v1_version, v2_version, last) in [(1, 2, "v2"), (2, 1, "v1")] {
        let mut history = puts(v1_version, v2_version).to_vec();
        history.push(get_absent(3, 5, 50));
        history.push(get(3, last, 2, 120, 130));
        history.push(get(4, last, 2, 115, 140));
        assert_linearizable(&history);
    }
    // A reader during the puts sees the first winner, a later one the second.
    assert_linearizable(&[
        put(1, "v1", 0, 100, 1),
        put(2, "v2", 10, 90, 2),
        get(3, "v1", 1, 20, 30),
        get(3, "v2", 2, 40, 50),
        get(4, "v2", 2, 45, 60),
    ]);
}

#[test]
fn t12_operations_whose_times_touch_are_concurrent() {
    assert_linearizable(&[put(1, "v1", 0, 50, 1), get_absent(2, 50, 60)]);
}

#[test]
fn t13_keys_are_independent() {
    let history = [
        ok(1, Input::put("a", "1"), 0, Output::put_version(1), 10),
        ok(2, Input::put("b", "1"), 0, Output::put_version(1), 10),
        ok(1, Input::get("a"), 20, Output::found("1", 1), 30),
        ok(2, Input::get("b"), 20, Output::found("1", 1), 30),
    ];
    assert_linearizable(&history);
    let mut stale = history.to_vec();
    stale.push(ok(3, Input::get("b"), 40, Output::absent(), 50));
    let ops = assert_violation(&stale);
    assert!(
        ops.iter().all(|op| op.keys() == [b"b"]),
        "only key b is reported"
    );
}

#[test]
fn t20_stale_read_is_rejected() {
    let history = [
        put(1, "v1", 0, 10, 1),
        put(1, "v2", 20, 30, 2),
        get(2, "v1", 1, 40, 50),
    ];
    assert_violation(&history);
    assert_violation(&[
        put_nv(1, "v1", 0, 10),
        put_nv(1, "v2", 20, 30),
        get_nv(2, "v1", 40, 50),
    ]);
}

#[test]
fn t21_lost_write_is_rejected() {
    assert_violation(&[put(1, "v1", 0, 10, 1), get_absent(2, 20, 30)]);
    assert_violation(&[
        put(1, "v1", 0, 10, 1),
        put(2, "v2", 20, 30, 2),
        get(3, "v1", 1, 40, 50),
    ]);
}

#[test]
fn t22_write_applied_twice_is_rejected_by_versions() {
    let history = [put(1, "v1", 0, 10, 1), get(2, "v1", 2, 20, 30)];
    assert_violation(&history);
    // Without versions the duplicate is invisible: the reason versions exist.
    assert_linearizable(&[put_nv(1, "v1", 0, 10), get_nv(2, "v1", 20, 30)]);
}

#[test]
fn t23_read_of_a_value_never_written_is_rejected() {
    assert_violation(&[put(1, "v1", 0, 10, 1), get(2, "ghost", 1, 5, 30)]);
}

#[test]
fn t24_read_going_back_in_time_is_rejected() {
    // Each get alone is fine (v2's put overlaps both); together they need v2 before v1.
    let history = [
        put(1, "v1", 0, 10, 1),
        put(2, "v2", 5, 100, 2),
        get(3, "v2", 2, 20, 30),
        get(3, "v1", 1, 40, 50),
    ];
    assert_violation(&history);
    assert_linearizable(&history[..3]);
    assert_linearizable(&[history[0].clone(), history[1].clone(), history[3].clone()]);
}

#[test]
fn t30_unknown_put_may_be_visible_later() {
    let unknown = put_with(1, "v1", 0, OpResult::Unknown);
    assert_linearizable(&[unknown.clone(), get(2, "v1", 1, 5_000, 5_010)]);
    // Even after a later put by the same client, and long after its call.
    assert_linearizable(&[
        unknown,
        put(1, "v2", 400, 500, 1),
        get(2, "v1", 2, 5_000, 5_010),
    ]);
}

#[test]
fn t31_unknown_put_may_never_be_visible() {
    assert_linearizable(&[
        put_with(1, "v1", 0, OpResult::Unknown),
        get_absent(2, 5_000, 5_010),
    ]);
}

#[test]
fn t32_unknown_put_visible_then_gone_is_rejected() {
    let history = [
        put_with(1, "v1", 0, OpResult::Unknown),
        get(2, "v1", 1, 100, 110),
        get_absent(2, 200, 210),
    ];
    assert_violation(&history);
}

#[test]
fn t33_unknown_put_is_not_visible_before_its_call() {
    assert_violation(&[
        get(2, "v1", 1, 0, 10),
        put_with(1, "v1", 20, OpResult::Unknown),
    ]);
}

#[test]
fn t34_failed_put_that_is_visible_is_rejected() {
    assert_violation(&[
        put_with(1, "v1", 0, OpResult::Failed),
        get(2, "v1", 1, 5_000, 5_010),
    ]);
    assert_linearizable(&[
        put_with(1, "v1", 0, OpResult::Failed),
        get_absent(2, 5_000, 5_010),
    ]);
}

#[test]
fn t35_unknown_gets_carry_no_information() {
    let unknown_get = Operation::new(2, Input::get("k"), 20, OpResult::Unknown, 0);
    assert_linearizable(&[put(1, "v1", 0, 10, 1), unknown_get]);
}

#[test]
fn t40_violation_is_shrunk_to_the_failing_piece() {
    // A long valid sequential history with one stale read in the middle.
    let mut history: Vec<Operation> = (1..=100)
        .map(|i| put(1, &format!("v{i}"), i * 100, i * 100 + 10, i))
        .collect();
    history.push(get(2, "v10", 10, 5_020, 5_030));
    let ops = assert_violation(&history);
    assert!(ops.len() <= 3, "piece of {} ops: {ops:?}", ops.len());
    assert!(
        ops.iter().any(|op| op.call_ns == 5_020),
        "the stale get is in the piece"
    );
    assert!(
        ops.windows(2).all(|w| w[0].call_ns <= w[1].call_ns),
        "piece in call order"
    );
}

#[test]
fn t41_summary_and_display_name_the_key_ops_and_times() {
    let CheckResult::Violation(violation) = check(&[put(1, "v1", 0, 10, 1), get_absent(2, 20, 30)])
    else {
        panic!("lost write accepted");
    };
    let shown = violation.to_string();
    assert!(
        shown.starts_with("linearizability violation on key \"k\": "),
        "{shown}"
    );
    assert!(
        shown.contains("client 1 put(\"k\", \"v1\") -> ok v1 [0, 10] ns"),
        "{shown}"
    );
    assert!(
        shown.contains("client 2 get(\"k\") -> absent [20, 30] ns"),
        "{shown}"
    );
    let summary = summarize(&CheckResult::Violation(violation));
    assert!(
        summary.starts_with("NOT linearizable: key \"k\" (2 operations"),
        "{summary}"
    );
    assert!(!summary.contains('\n'), "one line: {summary}");
    assert_eq!(summarize(&CheckResult::Linearizable), "linearizable");
}

#[test]
fn t50_budget_exhaustion_is_inconclusive() {
    // 24 concurrent unversioned puts and a read of a value never written: the search must try
    // every subset of puts before rejecting, far beyond a zero budget.
    let mut history: Vec<Operation> = (0..24)
        .map(|c| put_nv(c, &format!("v{c}"), c, 1_000 + c))
        .collect();
    history.push(get_nv(99, "ghost", 500, 2_000));
    match check_with_budget(&history, Duration::ZERO) {
        CheckResult::Inconclusive { reason } => assert!(reason.contains("key \"k\""), "{reason}"),
        other => panic!("expected inconclusive, got {}", summarize(&other)),
    }
}

#[test]
fn t51_malformed_history_is_inconclusive_and_named() {
    let backwards = ok(1, Input::get("k"), 50, Output::absent(), 40);
    match check(&[backwards]) {
        CheckResult::Inconclusive { reason } => {
            assert!(reason.contains("returned before it was called"), "{reason}")
        }
        other => panic!("expected inconclusive, got {}", summarize(&other)),
    }
}

#[test]
fn t52_many_unobserved_unknown_puts_do_not_blow_up_a_failing_search() {
    // Without versions, 40 pending puts nobody read would give 2^40 configurations to refute.
    let mut history: Vec<Operation> = (0..40)
        .map(|c| put_with(10 + c, &format!("lost{c}"), c, OpResult::Unknown))
        .collect();
    history.extend([
        put_nv(1, "v1", 0, 10),
        put_nv(1, "v2", 20, 30),
        get_nv(2, "v1", 40, 50),
    ]);
    match check_with_budget(&history, Duration::from_secs(5)) {
        CheckResult::Violation(violation) => assert_eq!(violation.ops.len(), 3, "{violation}"),
        other => panic!("expected a violation, got {}", summarize(&other)),
    }
}

#[test]
fn t36_unknown_put_seen_only_through_versions() {
    // X timed out and nobody read it, but the next put's version shows it was applied.
    let unknown = put_with(2, "x", 5, OpResult::Unknown);
    assert_linearizable(&[
        put(1, "v1", 0, 10, 1),
        unknown.clone(),
        put(1, "v2", 20, 30, 3),
        get(3, "v2", 3, 40, 50),
    ]);
    // Without it, version 3 is unexplained; with it, version 4 is.
    assert_violation(&[put(1, "v1", 0, 10, 1), put(1, "v2", 20, 30, 3)]);
    assert_violation(&[
        put(1, "v1", 0, 10, 1),
        unknown.clone(),
        put(1, "v2", 20, 30, 4),
    ]);
    // It cannot take effect before its call.
    assert_violation(&[
        put(1, "v1", 0, 10, 1),
        put(1, "v2", 20, 30, 3),
        put_with(2, "x", 40, OpResult::Unknown),
    ]);
    // A put without a version: the read of its value fixes it (3: one unknown put before it).
    let unversioned = |read_version| {
        vec![
            put(1, "v1", 0, 10, 1),
            unknown.clone(),
            put_nv(1, "v2", 20, 30),
            get(3, "v2", read_version, 40, 50),
        ]
    };
    assert_linearizable(&unversioned(3));
    assert_linearizable(&unversioned(2));
    assert_violation(&unversioned(4));
}

#[test]
fn t53_unbounded_budget_is_capped_not_overflowed() {
    assert_eq!(
        check_with_budget(&[put(1, "v1", 0, 10, 1)], Duration::MAX),
        CheckResult::Linearizable
    );
}

#[test]
fn t42_explanation_quotes_only_the_end_of_a_long_order() {
    // Puts without versions cannot be shrunk away when versions matter (nothing to renumber).
    let mut history: Vec<Operation> = (1..=20)
        .map(|i| put_nv(1, &format!("v{i}"), i * 100, i * 100 + 10))
        .collect();
    history.push(get(2, "v20", 21, 3_000, 3_010)); // only 20 puts happened
    let CheckResult::Violation(violation) = check(&history) else {
        panic!("version 21 accepted")
    };
    assert_eq!(violation.ops.len(), 21, "{violation}");
    assert!(
        violation
            .explanation
            .contains("[13 earlier operations; client 1 put(\"k\", \"v14\")"),
        "{violation}"
    );
    assert!(
        violation.explanation.contains("\"v19\" (version 19)"),
        "{violation}"
    );
}

#[test]
fn t43_shrinking_renumbers_versions_over_removed_puts() {
    let mut history: Vec<Operation> = (1..=20)
        .map(|i| put(1, &format!("v{i}"), i * 100, i * 100 + 10, i))
        .collect();
    history.push(get(2, "v20", 20, 2_500, 2_510));
    history.push(put(1, "late", 3_000, 3_010, 22)); // version 21 never happened
    let CheckResult::Violation(violation) = check(&history) else {
        panic!("version gap accepted")
    };
    assert_eq!(violation.ops, [history[20 + 1].clone()], "{violation}");
    let note =
        "counted without the 20 left-out puts of versions 1, 2, 3, 4, 5, 6, ... and their reads";
    assert!(violation.explanation.ends_with(note), "{violation}");
}
