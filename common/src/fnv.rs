//! FNV-1a, 64 bits: a cheap, stable hash for comparing states across processes and runs
//! (`Admin.Digest`, the simulation's log and state digests). Not for anything an adversary
//! chooses the input of to cause collisions.

/// The hash of nothing; feed bytes with [`fnv1a`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `h` extended by `bytes` (hashing in pieces gives the hash of the concatenation).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hash_as_their_concatenation() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fnv1a(fnv1a(FNV_OFFSET, b"ab"), b"c"),
            fnv1a(FNV_OFFSET, b"abc")
        );
    }
}
