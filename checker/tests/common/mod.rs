//! Shared helpers of the checker's tests: terse constructors for hand-made histories and a
//! generator of linearizable histories from a simulated sequential map of registers.

#![allow(dead_code)] // each test binary uses a subset

use kvraft_checker::{Input, OpResult, Operation, Output};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::HashMap;

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
    let mut clocks = vec![0u64; workload.clients as usize];
    let mut planned: Vec<Planned> = (0..workload.ops)
        .map(|n| plan(rng, workload, &mut clocks, n))
        .collect();
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].effect_ns.is_some())
        .collect();
    order.sort_by_key(|&i| planned[i].effect_ns);
    let mut registers: HashMap<Vec<u8>, (Vec<u8>, u64)> = HashMap::new();
    for i in order {
        apply(&mut registers, &mut planned[i].op, workload.versions);
    }
    planned.into_iter().map(|p| p.op).collect()
}

fn plan(rng: &mut StdRng, workload: Workload, clocks: &mut [u64], n: usize) -> Planned {
    let client = rng.random_range(0..workload.clients);
    let call_ns = clocks[client as usize] + rng.random_range(0..50);
    let key = format!("key{}", rng.random_range(0..workload.keys)).into_bytes();
    let input = if rng.random_bool(0.5) {
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
fn apply(registers: &mut HashMap<Vec<u8>, (Vec<u8>, u64)>, op: &mut Operation, versions: bool) {
    let version = |v: u64| versions.then_some(v);
    let output = match &op.input {
        Input::Put { key, value } => {
            let entry = registers.entry(key.clone()).or_insert((Vec::new(), 0));
            *entry = (value.clone(), entry.1 + 1);
            Output::Put {
                version: version(entry.1),
            }
        }
        Input::Get { key } => {
            Output::Get(
                registers
                    .get(key)
                    .map(|(value, v)| kvraft_checker::ReadValue {
                        value: value.clone(),
                        version: version(*v),
                    }),
            )
        }
    };
    if let OpResult::Ok(_) = op.result {
        op.result = OpResult::Ok(output);
    }
}
