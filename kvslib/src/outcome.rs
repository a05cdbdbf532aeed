//! Successful results of puts and gets.

/// What a successful put reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// How many puts to this key have been applied, this one included (1 for the first).
    pub version: u64,
    /// Log index of the entry that applied this put; puts are ordered by it.
    pub index: u64,
}

/// A value read together with its version (the number of puts to the key applied so far).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}
