//! Shared helpers of the checker's tests: terse constructors for hand-made histories and a
//! generator of linearizable histories from a simulated sequential map of registers.

#![allow(dead_code)] // each test binary uses a subset

use kvraft_checker::history::in_range;
use kvraft_checker::{
    Compare, CompareOp, CompareTarget, Input, OpResult, Operation, Output, ReadValue, TxnOp,
    TxnOpOutput,
};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::BTreeMap;

/// A put that returned `version`.
pub fn put(client: u64, value: &str, call_ns: u64, return_ns: u64, version: u64) -> Operation {
    ok(
        client,
        Input::put("k", value),
        call_ns,
        Output::put_version(version),
        return_ns,
    )
}

/// A get that returned `value` at `version`.
pub fn get(client: u64, value: &str, version: u64, call_ns: u64, return_ns: u64) -> Operation {
    ok(
        client,
        Input::get("k"),
        call_ns,
        Output::found(value, version),
        return_ns,
    )
}

/// A get that found the key absent.
pub fn get_absent(client: u64, call_ns: u64, return_ns: u64) -> Operation {
    ok(
        client,
        Input::get("k"),
        call_ns,
        Output::absent(),
        return_ns,
    )
}

/// A put without a known version.
pub fn put_nv(client: u64, value: &str, call_ns: u64, return_ns: u64) -> Operation {
    ok(
        client,
        Input::put("k", value),
        call_ns,
        Output::put_unversioned(),
        return_ns,
    )
}

/// A get without a known version.
pub fn get_nv(client: u64, value: &str, call_ns: u64, return_ns: u64) -> Operation {
    ok(
        client,
        Input::get("k"),
        call_ns,
        Output::found_unversioned(value),
        return_ns,
    )
}

pub fn put_with(client: u64, value: &str, call_ns: u64, result: OpResult) -> Operation {
    Operation::new(
        client,
        Input::put("k", value),
        call_ns,
        result,
        call_ns + 1_000,
    )
}

pub fn ok(client: u64, input: Input, call_ns: u64, output: Output, return_ns: u64) -> Operation {
    Operation::new(client, input, call_ns, OpResult::Ok(output), return_ns)
}

/// Shape of a generated history.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub clients: u64,
    pub keys: usize,
    pub ops: usize,
    /// Whether outputs carry versions.
    pub versions: bool,
    /// Probability that an operation times out (unknown), and that it is refused (failed).
    pub unknown_ratio: f64,
    pub failed_ratio: f64,
}

/// One generated operation before outputs are known: when it takes effect, if it does.
struct Planned {
    op: Operation,
    effect_ns: Option<u64>,
}

/// A linearizable history: every client issues operations one after another with random
/// gaps and latencies; each takes effect at a random point inside its interval (an unknown put
/// at a random point after its call, or never), and outputs come from applying the effects in
/// time order to a sequential map of registers.
pub fn linearizable_history(rng: &mut StdRng, workload: Workload) -> Vec<Operation> {
    history_of(rng, workload, false)
}

/// Like [`linearizable_history`], with every kind of operation ([`rich_input`]).
pub fn rich_linearizable_history(rng: &mut StdRng, workload: Workload) -> Vec<Operation> {
    history_of(rng, workload, true)
}

fn history_of(rng: &mut StdRng, workload: Workload, rich: bool) -> Vec<Operation> {
    let mut clocks = vec![0u64; workload.clients as usize];
    let mut planned: Vec<Planned> = (0..workload.ops)
        .map(|n| plan(rng, workload, &mut clocks, n, rich))
        .collect();
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].effect_ns.is_some())
        .collect();
    order.sort_by_key(|&i| planned[i].effect_ns);
    let mut registers = Registers::new();
    for i in order {
        apply(&mut registers, &mut planned[i].op, workload.versions);
    }
    planned.into_iter().map(|p| p.op).collect()
}

fn plan(rng: &mut StdRng, workload: Workload, clocks: &mut [u64], n: usize, rich: bool) -> Planned {
    let client = rng.random_range(0..workload.clients);
    let call_ns = clocks[client as usize] + rng.random_range(0..50);
    let key = format!("key{}", rng.random_range(0..workload.keys)).into_bytes();
    let input = if rich {
        rich_input(rng, workload.keys, format!("c{client}-{n}").into_bytes())
    } else if rng.random_bool(0.5) {
        Input::Put {
            key,
            value: format!("c{client}-{n}").into_bytes(),
        }
    } else {
        Input::Get { key }
    };
    let roll: f64 = rng.random();
    let (result, effect_ns, return_ns) = if roll < workload.unknown_ratio {
        let effect = rng
            .random_bool(0.5)
            .then(|| call_ns + rng.random_range(0..2_000));
        (OpResult::Unknown, effect, call_ns + 300)
    } else if roll < workload.unknown_ratio + workload.failed_ratio {
        (OpResult::Failed, None, call_ns + rng.random_range(0..100))
    } else {
        let effect = call_ns + rng.random_range(0..100);
        (
            OpResult::Ok(Output::put_unversioned()),
            Some(effect),
            effect + rng.random_range(0..100),
        )
    };
    clocks[client as usize] = return_ns + 1;
    Planned {
        op: Operation::new(client, input, call_ns, result, return_ns),
        effect_ns,
    }
}

/// Applies `op` to the registers and, if it completed, fills in its output.
fn apply(registers: &mut Registers, op: &mut Operation, versions: bool) {
    let output = run(registers, &op.input, versions);
    if let OpResult::Ok(_) = op.result {
        op.result = OpResult::Ok(output);
    }
}

/// The sequential map of registers: key -> (value, version).
pub type Registers = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

fn read(registers: &Registers, key: &[u8], versions: bool) -> Option<ReadValue> {
    registers.get(key).map(|(value, v)| ReadValue {
        value: value.clone(),
        version: versions.then_some(*v),
    })
}

fn put_in(registers: &mut Registers, key: &[u8], value: &[u8]) -> u64 {
    let entry = registers.entry(key.to_vec()).or_insert((Vec::new(), 0));
    *entry = (value.to_vec(), entry.1 + 1);
    entry.1
}

fn holds(registers: &Registers, compare: &Compare) -> bool {
    let actual = registers.get(&compare.key);
    let ordering = match &compare.target {
        CompareTarget::Version(v) => actual.map_or(0, |(_, version)| *version).cmp(v),
        CompareTarget::Value(v) => match actual {
            None => return false,
            Some((value, _)) => value.cmp(v),
        },
    };
    match compare.op {
        CompareOp::Equal => ordering.is_eq(),
        CompareOp::NotEqual => ordering.is_ne(),
        CompareOp::Less => ordering.is_lt(),
        CompareOp::Greater => ordering.is_gt(),
    }
}

/// The output of `input` applied to the registers (versions left out unless `versions`).
pub fn run(registers: &mut Registers, input: &Input, versions: bool) -> Output {
    let version = |v: u64| versions.then_some(v);
    match input {
        Input::Put { key, value } => Output::Put {
            version: version(put_in(registers, key, value)),
        },
        Input::Get { key } => Output::Get(read(registers, key, versions)),
        Input::Delete { key } => Output::Delete {
            existed: registers.remove(key).is_some(),
        },
        Input::Txn {
            compares,
            success,
            failure,
        } => {
            let succeeded = compares.iter().all(|c| holds(registers, c));
            let branch = if succeeded { success } else { failure };
            let results = branch
                .iter()
                .map(|op| match op {
                    TxnOp::Put { key, value } => TxnOpOutput::Put {
                        version: version(put_in(registers, key, value)),
                    },
                    TxnOp::Delete { key } => TxnOpOutput::Delete {
                        existed: registers.remove(key).is_some(),
                    },
                    TxnOp::Get { key } => TxnOpOutput::Get(read(registers, key, versions)),
                })
                .collect();
            Output::Txn { succeeded, results }
        }
        Input::Scan { start, end } => Output::Scan(
            registers
                .iter()
                .filter(|(key, _)| in_range(key, start, end))
                .map(|(key, (value, v))| {
                    let read = ReadValue {
                        value: value.clone(),
                        version: version(*v),
                    };
                    (key.clone(), read)
                })
                .collect(),
        ),
    }
}

/// A random operation of any kind over `keys` keys: puts, gets, deletes, CAS txns, two-key
/// transfers and scans.
pub fn rich_input(rng: &mut StdRng, keys: usize, value: Vec<u8>) -> Input {
    let key = |rng: &mut StdRng| format!("key{}", rng.random_range(0..keys)).into_bytes();
    match rng.random_range(0..100) {
        0..30 => Input::Put {
            key: key(rng),
            value,
        },
        30..50 => Input::Get { key: key(rng) },
        50..60 => Input::Delete { key: key(rng) },
        60..75 => {
            let k = key(rng);
            Input::txn(
                vec![Compare::version(
                    k.clone(),
                    CompareOp::Equal,
                    rng.random_range(0..3),
                )],
                vec![TxnOp::put(k.clone(), value)],
                vec![TxnOp::get(k)],
            )
        }
        75..85 => {
            let (a, b) = (key(rng), key(rng));
            Input::txn(
                vec![Compare::value(a.clone(), CompareOp::Greater, "c")],
                vec![
                    TxnOp::put(a.clone(), value.clone()),
                    TxnOp::put(b.clone(), value),
                    TxnOp::get(a),
                ],
                vec![TxnOp::delete(b)],
            )
        }
        _ => {
            let (mut lo, mut hi) = (rng.random_range(0..keys), rng.random_range(0..=keys));
            if lo > hi {
                std::mem::swap(&mut lo, &mut hi);
            }
            let end = if hi == keys {
                Vec::new()
            } else {
                format!("key{hi}").into_bytes()
            };
            Input::scan(format!("key{lo}"), end)
        }
    }
}
