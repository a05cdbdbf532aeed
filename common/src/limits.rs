//! Size limits of keys and values. The client library refuses oversized input before sending
//! anything; servers check again, since not every client is kvslib.

/// Longest key in bytes. Keys are held in memory on every replica and in every log entry.
pub const KEY_BYTES_MAX: usize = 1024;

/// Longest value in bytes. One value must fit in a single gRPC message (4 MiB by default)
/// together with its batch neighbours, so it is kept well below that.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;

/// Checks a key and value against the limits; the error says which one and by how much.
pub fn check_key_value(key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
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
        if value.len() > VALUE_BYTES_MAX {
            return Err(format!(
                "value is {} bytes, longer than the limit of {VALUE_BYTES_MAX} bytes",
                value.len()
            ));
        }
    }
    Ok(())
}
