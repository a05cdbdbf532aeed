//! Randomized and performance tests over generated linearizable histories.

mod common;

use common::{linearizable_history, rich_linearizable_history, Workload};
use kvraft_checker::{
    check, summarize, CheckResult, Input, OpResult, Operation, Output, ReadValue, TxnOpOutput,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Seeds per randomized test; each history is small, so this runs in well under a second.
const SEEDS: u64 = 200;

fn small_workload(rng: &mut StdRng) -> Workload {
    Workload {
        clients: rng.random_range(1..=6),
        keys: rng.random_range(1..=3),
        ops: rng.random_range(1..=150),
        versions: rng.random_bool(0.7),
        unknown_ratio: rng.random_range(0.0..0.15),
        failed_ratio: rng.random_range(0.0..0.1),
    }
}

#[test]
fn t10_generated_linearizable_histories_are_accepted() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = small_workload(&mut rng);
        let history = linearizable_history(&mut rng, workload);
        let result = check(&history);
        assert_eq!(
            result,
            CheckResult::Linearizable,
            "seed {seed} ({workload:?}): {}",
            summarize(&result)
        );
    }
}

#[test]
fn t11_generated_histories_with_a_phantom_read_are_rejected() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = small_workload(&mut rng);
        let mut history = linearizable_history(&mut rng, workload);
        let gets: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].result, OpResult::Ok(Output::Get(_))))
            .collect();
        let Some(&victim) = gets.get(rng.random_range(0..gets.len().max(1))) else {
            continue;
        };
        let phantom = ReadValue {
            value: b"never written".to_vec(),
            version: None,
        };
        history[victim].result = OpResult::Ok(Output::Get(Some(phantom)));
        let CheckResult::Violation(violation) = check(&history) else {
            panic!("seed {seed} ({workload:?}): phantom read at op {victim} accepted");
        };
        assert!(
            violation.ops.contains(&history[victim]),
            "seed {seed}: piece lacks the phantom read:\n{violation}"
        );
        assert_eq!(
            violation.ops.len(),
            1,
            "seed {seed}: a phantom read fails alone:\n{violation}"
        );
    }
}

/// A get whose value came from a completed put with a known version, unique to that put.
fn victim_with_known_put(history: &[Operation], rng: &mut StdRng) -> Option<usize> {
    let put_version = |value: &[u8]| {
        let writers: Vec<&Operation> = history
            .iter()
            .filter(|op| matches!(&op.input, Input::Put { value: v, .. } if v.as_slice() == value))
            .collect();
        match writers.as_slice() {
            [op] => match op.result {
                OpResult::Ok(Output::Put { version }) => version,
                _ => None,
            },
            _ => None,
        }
    };
    let candidates: Vec<usize> = (0..history.len())
        .filter(|&i| match &history[i].result {
            OpResult::Ok(Output::Get(Some(read))) => {
                read.version.is_some() && put_version(&read.value).is_some()
            }
            _ => false,
        })
        .collect();
    candidates
        .get(rng.random_range(0..candidates.len().max(1)))
        .copied()
}

#[test]
fn t12_generated_histories_with_a_shifted_read_version_are_rejected() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = Workload {
            versions: true,
            ..small_workload(&mut rng)
        };
        let mut history = linearizable_history(&mut rng, workload);
        let Some(victim) = victim_with_known_put(&history, &mut rng) else {
            continue;
        };
        if let OpResult::Ok(Output::Get(Some(read))) = &mut history[victim].result {
            let version = read.version.expect("chosen with a version");
            read.version = Some(if rng.random_bool(0.5) {
                version + 1
            } else {
                version - 1
            });
        }
        let result = check(&history);
        let CheckResult::Violation(violation) = result else {
            panic!(
                "seed {seed} ({workload:?}): shifted version at op {victim} not rejected: {}",
                summarize(&result)
            );
        };
        assert!(
            violation.ops.contains(&history[victim]),
            "seed {seed}: piece lacks the shifted read:\n{violation}"
        );
        let again = check(&violation.ops);
        assert!(
            matches!(again, CheckResult::Violation(_)),
            "seed {seed}: the reported piece alone is accepted:\n{violation}"
        );
    }
}

#[test]
fn t13_generated_histories_with_many_timeouts_on_one_key_are_accepted() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = Workload {
            clients: rng.random_range(2..=8),
            keys: 1,
            ops: rng.random_range(10..=200),
            versions: rng.random_bool(0.8),
            unknown_ratio: rng.random_range(0.1..0.4),
            failed_ratio: 0.05,
        };
        let history = linearizable_history(&mut rng, workload);
        let result = check(&history);
        assert_eq!(
            result,
            CheckResult::Linearizable,
            "seed {seed} ({workload:?}): {}",
            summarize(&result)
        );
    }
}

fn timed_check(name: &str, workload: Workload, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let history = linearizable_history(&mut rng, workload);
    let started = Instant::now();
    let result = check(&history);
    let elapsed = started.elapsed();
    println!(
        "{name}: {} ops, {workload:?}, seed {seed}: {} in {elapsed:?}",
        history.len(),
        summarize(&result)
    );
    assert_eq!(
        result,
        CheckResult::Linearizable,
        "seed {seed}: {}",
        summarize(&result)
    );
}

#[test]
fn t20_performance_20k_ops_200_keys_8_clients() {
    let workload = Workload {
        clients: 8,
        keys: 200,
        ops: 20_000,
        versions: true,
        unknown_ratio: 0.02,
        failed_ratio: 0.01,
    };
    timed_check("200 keys", workload, 20);
}

#[test]
fn t21_performance_one_hot_key_8_clients_with_timeouts() {
    let workload = Workload {
        clients: 8,
        keys: 1,
        ops: 5_000,
        versions: true,
        unknown_ratio: 0.02,
        failed_ratio: 0.01,
    };
    timed_check("hot key", workload, 21);
}

#[test]
fn t22_performance_one_hot_key_without_versions() {
    let workload = Workload {
        clients: 8,
        keys: 1,
        ops: 5_000,
        versions: false,
        unknown_ratio: 0.01,
        failed_ratio: 0.0,
    };
    timed_check("hot key, no versions", workload, 22);
}

#[test]
fn t30_input_helpers_round_trip_keys() {
    assert_eq!(Input::put("k", "v").keys(), [b"k"]);
    assert_eq!(Input::get(b"k".to_vec()).keys(), [b"k"]);
    assert_eq!(Input::delete("k").keys(), [b"k"]);
}

fn stale_read_in_a_long_hot_key(seed: u64, versions: bool, ops: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let workload = Workload {
        clients: 8,
        keys: 1,
        ops,
        versions,
        unknown_ratio: 0.02,
        failed_ratio: 0.01,
    };
    let mut history = linearizable_history(&mut rng, workload);
    // The last read returns the first acknowledged put's value, long overwritten.
    let first_put = history
        .iter()
        .find(|op| matches!(op.input, Input::Put { .. }) && matches!(op.result, OpResult::Ok(_)))
        .cloned()
        .expect("some put completed");
    let victim = (0..history.len())
        .rev()
        .find(|&i| matches!(history[i].result, OpResult::Ok(Output::Get(Some(_)))))
        .expect("some get completed");
    let Input::Put { value, .. } = first_put.input else {
        unreachable!("chosen as a put")
    };
    history[victim].result = OpResult::Ok(Output::Get(Some(ReadValue {
        value,
        version: Some(1),
    })));
    let started = Instant::now();
    let CheckResult::Violation(violation) = check(&history) else {
        panic!("seed {seed}: stale read accepted")
    };
    println!(
        "{ops}-op hot key (versions: {versions}), stale read: piece of {} ops in {:?}\n{violation}",
        violation.ops.len(),
        started.elapsed()
    );
    assert!(
        violation.ops.contains(&history[victim]),
        "seed {seed}: piece lacks the stale read:\n{violation}"
    );
    assert!(
        violation.ops.len() <= 4,
        "seed {seed}: piece of {} ops:\n{violation}",
        violation.ops.len()
    );
}

#[test]
fn t23_stale_read_in_a_long_hot_key_shrinks_to_a_small_piece() {
    stale_read_in_a_long_hot_key(23, true, 3_000);
}

#[test]
fn t24_stale_read_in_a_long_unversioned_hot_key_is_found_quickly() {
    // Refuting this key exhaustively takes minutes; the local look finds it at once.
    stale_read_in_a_long_hot_key(24, false, 5_000);
}

fn rich_workload(rng: &mut StdRng) -> Workload {
    Workload {
        clients: rng.random_range(1..=5),
        keys: rng.random_range(1..=4),
        ops: rng.random_range(1..=60),
        versions: rng.random_bool(0.7),
        unknown_ratio: rng.random_range(0.0..0.15),
        failed_ratio: rng.random_range(0.0..0.1),
    }
}

#[test]
fn t40_generated_histories_with_deletes_txns_and_scans_are_accepted() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = rich_workload(&mut rng);
        let history = rich_linearizable_history(&mut rng, workload);
        let result = check(&history);
        assert_eq!(
            result,
            CheckResult::Linearizable,
            "seed {seed} ({workload:?}): {}",
            summarize(&result)
        );
    }
}

/// Replaces a value some completed read (get, txn get or scan) returned with one never
/// written; the index of the op changed, if any.
fn plant_phantom(history: &mut [Operation], rng: &mut StdRng) -> Option<usize> {
    let phantom = || ReadValue {
        value: b"never written".to_vec(),
        version: None,
    };
    let readers: Vec<usize> = (0..history.len())
        .filter(|&i| match &history[i].result {
            OpResult::Ok(Output::Get(Some(_))) => true,
            OpResult::Ok(Output::Scan(entries)) => !entries.is_empty(),
            OpResult::Ok(Output::Txn { results, .. }) => results
                .iter()
                .any(|r| matches!(r, TxnOpOutput::Get(Some(_)))),
            _ => false,
        })
        .collect();
    let victim = *readers.get(rng.random_range(0..readers.len().max(1)))?;
    match &mut history[victim].result {
        OpResult::Ok(Output::Get(read)) => *read = Some(phantom()),
        OpResult::Ok(Output::Scan(entries)) => {
            let n = rng.random_range(0..entries.len());
            entries[n].1 = phantom();
        }
        OpResult::Ok(Output::Txn { results, .. }) => {
            for result in results.iter_mut() {
                if let TxnOpOutput::Get(read @ Some(_)) = result {
                    *read = Some(phantom());
                    break;
                }
            }
        }
        _ => unreachable!("chosen as a read"),
    }
    Some(victim)
}

#[test]
fn t41_generated_histories_with_deletes_txns_and_scans_and_a_phantom_read_are_rejected() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = rich_workload(&mut rng);
        let mut history = rich_linearizable_history(&mut rng, workload);
        let Some(victim) = plant_phantom(&mut history, &mut rng) else {
            continue;
        };
        let result = check(&history);
        let CheckResult::Violation(violation) = result else {
            panic!(
                "seed {seed} ({workload:?}): phantom read at op {victim} not rejected: {}",
                summarize(&result)
            );
        };
        assert!(
            violation.ops.contains(&history[victim]),
            "seed {seed}: piece lacks the phantom read:\n{violation}"
        );
        let again = check(&violation.ops);
        assert!(
            matches!(again, CheckResult::Violation(_)),
            "seed {seed}: the reported piece alone is accepted:\n{violation}"
        );
    }
}

#[test]
fn t42_generated_histories_with_a_flipped_delete_after_quiet_are_rejected() {
    // A delete called after every other op returned, answering the opposite of the truth.
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = Workload {
            unknown_ratio: 0.0,
            ..rich_workload(&mut rng)
        };
        let mut history = rich_linearizable_history(&mut rng, workload);
        let end = history.iter().map(|op| op.return_ns).max().unwrap_or(0) + 10;
        let mut registers = Default::default();
        let mut ordered: Vec<&Operation> = history.iter().collect();
        ordered.sort_by_key(|op| op.call_ns);
        // Replay to learn whether key0 exists at the end: only from a sequential history.
        if workload.clients != 1 {
            continue;
        }
        for op in ordered {
            if let OpResult::Ok(_) = op.result {
                common::run(&mut registers, &op.input, true);
            }
        }
        let existed = registers.contains_key(b"key0".as_slice());
        history.push(Operation::new(
            99,
            Input::delete("key0"),
            end,
            OpResult::Ok(Output::deleted(!existed)),
            end + 5,
        ));
        let result = check(&history);
        assert!(
            matches!(result, CheckResult::Violation(_)),
            "seed {seed} ({workload:?}): flipped delete not rejected: {}",
            summarize(&result)
        );
    }
}

/// Whether `recorded` is what the model answered, a version the source left out matching any.
fn output_matches(model: &Output, recorded: &Output) -> bool {
    let version = |m: &Option<u64>, r: &Option<u64>| r.is_none() || m == r;
    let read = |m: &Option<ReadValue>, r: &Option<ReadValue>| match (m, r) {
        (None, None) => true,
        (Some(m), Some(r)) => m.value == r.value && version(&m.version, &r.version),
        _ => false,
    };
    match (model, recorded) {
        (Output::Put { version: m }, Output::Put { version: r }) => version(m, r),
        (Output::Get(m), Output::Get(r)) => read(m, r),
        (Output::Delete { existed: m }, Output::Delete { existed: r }) => m == r,
        (
            Output::Txn {
                succeeded: ms,
                results: mr,
            },
            Output::Txn {
                succeeded: rs,
                results: rr,
            },
        ) => {
            ms == rs
                && mr.len() == rr.len()
                && mr.iter().zip(rr).all(|pair| match pair {
                    (TxnOpOutput::Put { version: m }, TxnOpOutput::Put { version: r }) => {
                        version(m, r)
                    }
                    (TxnOpOutput::Delete { existed: m }, TxnOpOutput::Delete { existed: r }) => {
                        m == r
                    }
                    (TxnOpOutput::Get(m), TxnOpOutput::Get(r)) => read(m, r),
                    _ => false,
                })
        }
        (Output::Scan(m), Output::Scan(r)) => {
            m.len() == r.len()
                && m.iter().zip(r).all(|((mk, mv), (rk, rv))| {
                    mk == rk && read(&Some(mv.clone()), &Some(rv.clone()))
                })
        }
        _ => false,
    }
}

/// Exhaustive oracle: some order of the completed ops and a subset of the unknown ones
/// respecting real time whose model outputs match.
fn brute_force(history: &[Operation]) -> bool {
    let ops: Vec<&Operation> = history
        .iter()
        .filter(|op| !matches!(op.result, OpResult::Failed))
        .collect();
    fn go(ops: &[&Operation], done: &mut Vec<bool>, registers: &common::Registers) -> bool {
        let limit = (0..ops.len())
            .filter(|&i| !done[i] && matches!(ops[i].result, OpResult::Ok(_)))
            .map(|i| ops[i].return_ns)
            .min();
        let Some(limit) = limit else {
            return true;
        };
        for i in 0..ops.len() {
            if done[i] || ops[i].call_ns > limit {
                continue;
            }
            let mut next = registers.clone();
            let model = common::run(&mut next, &ops[i].input, true);
            if let OpResult::Ok(recorded) = &ops[i].result {
                if !output_matches(&model, recorded) {
                    continue;
                }
            }
            done[i] = true;
            let found = go(ops, done, &next);
            done[i] = false;
            if found {
                return true;
            }
        }
        false
    }
    go(&ops, &mut vec![false; ops.len()], &Default::default())
}

#[test]
fn t43_small_rich_histories_agree_with_an_exhaustive_oracle() {
    let (mut accepted, mut rejected) = (0, 0);
    for seed in 0..3000 {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = Workload {
            clients: rng.random_range(1..=3),
            keys: rng.random_range(1..=3),
            ops: rng.random_range(1..=7),
            versions: rng.random_bool(0.7),
            unknown_ratio: 0.15,
            failed_ratio: 0.05,
        };
        let mut history = rich_linearizable_history(&mut rng, workload);
        if rng.random_bool(0.6) {
            // Answer one op from the state after a random subset of the others.
            let victim = rng.random_range(0..history.len());
            if let OpResult::Ok(_) = history[victim].result {
                let mut registers = common::Registers::default();
                for op in &history {
                    if rng.random_bool(0.5) {
                        common::run(&mut registers, &op.input, true);
                    }
                }
                let output = common::run(&mut registers, &history[victim].input, workload.versions);
                history[victim].result = OpResult::Ok(output);
            }
        }
        let expected = brute_force(&history);
        let result = check(&history);
        let got = match &result {
            CheckResult::Linearizable => true,
            CheckResult::Violation(_) => false,
            CheckResult::Inconclusive { reason } => panic!("seed {seed}: inconclusive: {reason}"),
        };
        if expected {
            accepted += 1;
        } else {
            rejected += 1;
        }
        assert_eq!(
            got,
            expected,
            "seed {seed}: checker says {}, oracle {expected}; history:\n{}",
            summarize(&result),
            history
                .iter()
                .map(|op| format!("  {op}\n"))
                .collect::<String>()
        );
    }
    assert!(
        accepted > 100 && rejected > 50,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn t44_performance_rich_component_8_keys_300_ops() {
    for seed in 0..5 {
        let mut rng = StdRng::seed_from_u64(seed);
        let workload = Workload {
            clients: 4,
            keys: 8,
            ops: 300,
            versions: true,
            unknown_ratio: 0.03,
            failed_ratio: 0.01,
        };
        let history = rich_linearizable_history(&mut rng, workload);
        let started = Instant::now();
        let result = check(&history);
        println!(
            "rich, 8 keys, seed {seed}: {} in {:?}",
            summarize(&result),
            started.elapsed()
        );
        assert_eq!(
            result,
            CheckResult::Linearizable,
            "seed {seed}: {}",
            summarize(&result)
        );
        let mut broken = history;
        let Some(victim) = plant_phantom(&mut broken, &mut rng) else {
            continue;
        };
        let started = Instant::now();
        let result = check(&broken);
        println!(
            "  with a phantom read: {} in {:?}",
            summarize(&result),
            started.elapsed()
        );
        let CheckResult::Violation(violation) = result else {
            panic!("seed {seed}: phantom read at {victim} accepted");
        };
        assert!(violation.ops.contains(&broken[victim]), "{violation}");
    }
}
