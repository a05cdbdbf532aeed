//! Limits on what a client may send: key and value sizes, client ids, and the window of a
//! session's unacknowledged requests. The client library keeps to them before sending
//! anything; servers check again, since not every client is kvslib (DESIGN.md rule 11).

/// Longest key in bytes. Keys are held in memory on every replica and in every log entry.
pub const KEY_BYTES_MAX: usize = 1024;

/// Longest value in bytes by default (`[server] max_value_bytes` sets it, up to
/// [`VALUE_BYTES_CEILING`]). Every gRPC message limit is derived from it (see
/// [`grpc_message_bytes`]).
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// The largest `max_value_bytes` a config may set.
pub const VALUE_BYTES_CEILING: usize = 16 * 1024 * 1024;

/// Byte budget of one AppendEntries batch (at least one entry is always sent, whatever its
/// size).
pub const BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;

/// The largest gRPC message a process must accept or send: a batch (or a snapshot chunk of
/// `chunk_bytes`) plus one more entry with the largest key and value, plus room for the other
/// fields.
pub fn grpc_message_bytes(max_value_bytes: usize, chunk_bytes: usize) -> usize {
    BATCH_BYTES_MAX.max(chunk_bytes) + max_value_bytes + KEY_BYTES_MAX + 64 * 1024
}

/// Most puts in one `PutBatch` call, and gets in one `GetBatch` (a batch is also bounded by the
/// gRPC message size).
pub const PUT_BATCH_MAX: usize = 256;

/// Longest client id in bytes. It is carried in every session's `RegisterSession` log entry.
pub const CLIENT_ID_BYTES_MAX: usize = 256;

/// Most requests of one session that may be unacknowledged at once: every put carries
/// `ack_seq <= seq < ack_seq + SESSION_WINDOW_MAX`. The server keeps the result of every seq at
/// or above the session's `ack_seq` for retries, so this bounds that memory per session; the
/// client library waits for a slot rather than exceed it.
pub const SESSION_WINDOW_MAX: u64 = 1024;

/// Checks a put's session fields against a session window of `window` requests (at most
/// [`SESSION_WINDOW_MAX`]); the error names the field and the rule it breaks.
pub fn check_put_seq(session_id: u64, seq: u64, ack_seq: u64, window: u64) -> Result<(), String> {
    if session_id == 0 {
        return Err("session_id is 0; register a session first".to_string());
    }
    if seq == 0 {
        return Err("seq is 0; the first seq of a session is 1".to_string());
    }
    if seq == u64::MAX {
        return Err("seq is 2^64 - 1; a session's seqs stay below it".to_string());
    }
    if ack_seq == 0 {
        return Err("ack_seq is 0; it is at least 1 (the first seq)".to_string());
    }
    if ack_seq > seq {
        return Err(format!(
            "ack_seq {ack_seq} is above seq {seq}; ack_seq is the lowest seq still waited for"
        ));
    }
    if seq - ack_seq >= window {
        return Err(format!(
            "seq {seq} is {} above ack_seq {ack_seq}; at most {window} requests of a session \
             may be unacknowledged",
            seq - ack_seq
        ));
    }
    Ok(())
}

/// Checks a client id's length; the error gives the length and the limit.
pub fn check_client_id(client_id: &str) -> Result<(), String> {
    if client_id.len() > CLIENT_ID_BYTES_MAX {
        return Err(format!(
            "client_id is {} bytes, longer than the limit of {CLIENT_ID_BYTES_MAX} bytes",
            client_id.len()
        ));
    }
    Ok(())
}

/// Checks a key and value against the default limits; the error says which one and by how
/// much.
pub fn check_key_value(key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
    check_key_value_within(key, value, VALUE_BYTES_MAX)
}

/// As [`check_key_value`], with values of up to `max_value_bytes`.
pub fn check_key_value_within(
    key: &[u8],
    value: Option<&[u8]>,
    max_value_bytes: usize,
) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".to_string());
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(format!(
            "key is {} bytes, longer than the limit of {KEY_BYTES_MAX} bytes",
            key.len()
        ));
    }
    if let Some(value) = value {
        if value.len() > max_value_bytes {
            return Err(format!(
                "value is {} bytes, longer than the limit of {max_value_bytes} bytes",
                value.len()
            ));
        }
    }
    Ok(())
}

/// Most compares of a transaction, and most operations in its two branches together (as
/// etcd's default `max-txn-ops`).
pub const TXN_OPS_MAX: usize = 128;

/// Most keys one transaction deletes (a range delete past it reports `more`, and is sent
/// again): bounds the work of applying one entry whatever range a client names.
pub const DELETE_KEYS_PER_ENTRY_MAX: u64 = 10_000;

/// Most keys one range read returns (and the limit when a request gives none).
pub const RANGE_LIMIT_MAX: u64 = 10_000;

/// The end of the range of every key that starts with `prefix`: the prefix with its last
/// byte below 0xff incremented and what follows dropped; empty (no upper bound) when every
/// byte is 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// A delete's range end as a range bound: `None` for a one-key delete (empty), the empty
/// bound (no upper bound) for a single zero byte, else the end itself.
pub fn delete_range_end(range_end: &[u8]) -> Option<&[u8]> {
    match range_end {
        [] => None,
        [0] => Some(&[]),
        end => Some(end),
    }
}

/// Checks a range's bounds: `start` and `end` within the key length limit, and `end` (when
/// not empty: no upper bound) above `start`.
pub fn check_range(start: &[u8], end: &[u8]) -> Result<(), String> {
    for (name, k) in [("start", start), ("end", end)] {
        if k.len() > KEY_BYTES_MAX {
            return Err(format!(
                "range {name} is {} bytes, longer than the limit of {KEY_BYTES_MAX} bytes",
                k.len()
            ));
        }
    }
    if !end.is_empty() && end <= start {
        return Err("range end is not above its start (an empty end means no upper bound)".into());
    }
    Ok(())
}

/// Checks a transaction's shape: at most [`TXN_OPS_MAX`] compares and operations, keys
/// within their limit, an op in every slot, and the keys and values it writes at most
/// `max_value_bytes` in all (the entry must fit one replication message). The error names
/// the compare or op, by branch and position.
pub fn check_txn(
    compares: &[kvraft_proto::Compare],
    success: &[kvraft_proto::TxnOp],
    failure: &[kvraft_proto::TxnOp],
    max_value_bytes: usize,
) -> Result<(), String> {
    use kvraft_proto::txn_op::Op;
    if compares.len() > TXN_OPS_MAX {
        return Err(format!(
            "{} compares; a transaction has at most {TXN_OPS_MAX}",
            compares.len()
        ));
    }
    if success.len() + failure.len() > TXN_OPS_MAX {
        return Err(format!(
            "{} operations in the two branches; a transaction has at most {TXN_OPS_MAX}",
            success.len() + failure.len()
        ));
    }
    if success.is_empty() && failure.is_empty() {
        return Err("the transaction has no operation in either branch".into());
    }
    for (i, c) in compares.iter().enumerate() {
        check_key_value(&c.key, None).map_err(|e| format!("compare {i}: {e}"))?;
        if kvraft_proto::CompareTarget::try_from(c.target).is_err() {
            return Err(format!("compare {i}: unknown target {}", c.target));
        }
        if kvraft_proto::CompareOp::try_from(c.op).is_err() {
            return Err(format!("compare {i}: unknown op {}", c.op));
        }
        if c.value.len() > max_value_bytes {
            return Err(format!(
                "compare {i}: value is {} bytes, longer than the limit of {max_value_bytes} bytes",
                c.value.len()
            ));
        }
    }
    let mut written = 0usize;
    for (branch, ops) in [("success", success), ("failure", failure)] {
        for (i, op) in ops.iter().enumerate() {
            let at = |e: String| format!("{branch} op {i}: {e}");
            match &op.op {
                None => return Err(at("no operation set".into())),
                Some(Op::Put(p)) => {
                    check_key_value_within(&p.key, Some(&p.value), max_value_bytes).map_err(at)?;
                    written += p.key.len() + p.value.len();
                }
                Some(Op::Delete(d)) => match delete_range_end(&d.range_end) {
                    None => check_key_value(&d.key, None).map_err(at)?,
                    Some(end) => check_range(&d.key, end).map_err(at)?,
                },
                Some(Op::Get(g)) => check_key_value(&g.key, None).map_err(at)?,
            }
        }
    }
    if written > max_value_bytes + KEY_BYTES_MAX {
        return Err(format!(
            "the transaction's puts carry {written} bytes of keys and values; at most \
             {} in all (max_value_bytes plus one key)",
            max_value_bytes + KEY_BYTES_MAX
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    const W: u64 = SESSION_WINDOW_MAX;

    #[test]
    fn put_seq_rules_name_the_field() {
        assert_eq!(check_put_seq(1, 1, 1, W), Ok(()));
        assert_eq!(check_put_seq(1, SESSION_WINDOW_MAX, 1, W), Ok(()));
        assert!(check_put_seq(0, 1, 1, W)
            .unwrap_err()
            .starts_with("session_id"));
        assert!(check_put_seq(1, 0, 0, W).unwrap_err().starts_with("seq"));
        assert!(check_put_seq(1, 5, 0, W)
            .unwrap_err()
            .starts_with("ack_seq"));
        assert!(check_put_seq(1, 1, u64::MAX, W)
            .unwrap_err()
            .contains("above seq"));
        let far = check_put_seq(1, u64::MAX - 1, 1, W).unwrap_err();
        assert!(far.contains("unacknowledged"), "{far}");
        assert_eq!(
            check_put_seq(u64::MAX, u64::MAX - 1, u64::MAX - 1, W),
            Ok(())
        );
        assert!(check_put_seq(1, u64::MAX, u64::MAX, W)
            .unwrap_err()
            .starts_with("seq"));
        assert!(check_put_seq(1, SESSION_WINDOW_MAX + 1, 1, W).is_err());
    }

    #[test]
    fn client_id_length_is_bounded() {
        assert_eq!(check_client_id(""), Ok(()));
        assert_eq!(check_client_id(&"c".repeat(CLIENT_ID_BYTES_MAX)), Ok(()));
        let err = check_client_id(&"c".repeat(CLIENT_ID_BYTES_MAX + 1)).unwrap_err();
        assert!(err.starts_with("client_id is 257 bytes"), "{err}");
    }

    #[test]
    fn prefix_ends_and_ranges() {
        assert_eq!(prefix_end(b"app/"), b"app0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert!(prefix_end(b"\xff\xff").is_empty(), "no upper bound");
        assert!(prefix_end(b"").is_empty());
        assert!(check_range(b"a", b"b").is_ok());
        assert!(check_range(b"", b"").is_ok());
        assert!(check_range(b"b", b"a").unwrap_err().contains("not above"));
        assert!(check_range(b"b", b"b").is_err());
        assert!(check_range(&[b'k'; KEY_BYTES_MAX + 1], b"")
            .unwrap_err()
            .contains("start"));
        assert_eq!(delete_range_end(b""), None);
        assert_eq!(delete_range_end(&[0]), Some(&b""[..]));
        assert_eq!(delete_range_end(b"z"), Some(&b"z"[..]));
    }

    #[test]
    fn transaction_shapes_are_checked_with_the_op_named() {
        use kvraft_proto::{txn_op::Op, Compare, TxnGet, TxnOp, TxnPut};
        let put = |k: &[u8], v: usize| TxnOp {
            op: Some(Op::Put(TxnPut {
                key: k.to_vec().into(),
                value: vec![0; v].into(),
            })),
        };
        let get = TxnOp {
            op: Some(Op::Get(TxnGet {
                key: b"k".to_vec().into(),
            })),
        };
        assert!(check_txn(&[], &[put(b"k", 10)], std::slice::from_ref(&get), 100).is_ok());
        assert!(check_txn(&[], &[], &[], 100)
            .unwrap_err()
            .contains("no operation"));
        let e = check_txn(&[], &[put(b"", 1)], &[], 100).unwrap_err();
        assert!(e.starts_with("success op 0: key is empty"), "{e}");
        let e = check_txn(&[], std::slice::from_ref(&get), &[TxnOp { op: None }], 100).unwrap_err();
        assert!(e.starts_with("failure op 0"), "{e}");
        let many = vec![get.clone(); TXN_OPS_MAX + 1];
        assert!(check_txn(&[], &many, &[], 100)
            .unwrap_err()
            .contains("at most 128"));
        let e = check_txn(&[], &vec![put(b"a", 100); 12], &[], 100).unwrap_err();
        assert!(e.contains("in all"), "{e}");
        let bad = Compare {
            key: b"k".to_vec().into(),
            target: 9,
            ..Default::default()
        };
        assert!(check_txn(&[bad], &[get], &[], 100)
            .unwrap_err()
            .contains("unknown target 9"));
    }
}
