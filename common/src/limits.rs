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
}
