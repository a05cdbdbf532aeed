//! The recorder: concurrent clients record a history the checker can judge.

use kvraft_checker::{check, summarize, CheckResult, HistoryRecorder, Input, OpResult, Output};
use std::sync::{Arc, Mutex};
use std::thread;

/// The register under test: value and version, behind a lock so every operation is atomic.
type Register = Arc<Mutex<Option<(Vec<u8>, u64)>>>;

#[test]
fn t10_threads_record_a_linearizable_history_of_a_mutex_register() {
    let recorder = HistoryRecorder::new();
    let register: Register = Arc::default();
    let threads: Vec<_> = (0..4u64)
        .map(|client| {
            let (recorder, register) = (recorder.clone(), register.clone());
            thread::spawn(move || {
                for n in 0..50 {
                    let value = format!("c{client}-{n}").into_bytes();
                    let id = recorder.invoke(client, Input::put("k", value.clone()));
                    let version = {
                        let mut register = register.lock().expect("no panics while held");
                        let version = register.as_ref().map_or(0, |(_, v)| *v) + 1;
                        *register = Some((value, version));
                        version
                    };
                    recorder.complete(id, OpResult::Ok(Output::put_version(version)));
                    let id = recorder.invoke(client, Input::get("k"));
                    let seen = register.lock().expect("no panics while held").clone();
                    let output = seen.map_or(Output::absent(), |(value, version)| {
                        Output::found(value, version)
                    });
                    recorder.complete(id, OpResult::Ok(output));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let history = recorder.history();
    assert_eq!(history.len(), 400);
    let result = check(&history);
    assert_eq!(result, CheckResult::Linearizable, "{}", summarize(&result));
}

#[test]
fn t11_uncompleted_operations_are_unknown_and_times_are_ordered() {
    let recorder = HistoryRecorder::default();
    let first = recorder.invoke(1, Input::put("k", "v"));
    let _pending = recorder.invoke(2, Input::put("k", "w"));
    recorder.complete(first, OpResult::Ok(Output::put_version(1)));
    let history = recorder.history();
    assert_eq!(history[1].result, OpResult::Unknown);
    assert!(history[0].call_ns <= history[1].call_ns);
    assert!(history[1].call_ns <= history[0].return_ns);
}

#[test]
#[should_panic(expected = "completed twice")]
fn t12_completing_twice_is_a_bug() {
    let recorder = HistoryRecorder::new();
    let id = recorder.invoke(1, Input::get("k"));
    recorder.complete(id, OpResult::Ok(Output::absent()));
    recorder.complete(id, OpResult::Ok(Output::absent()));
}
