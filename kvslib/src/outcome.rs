//! Successful results of puts, gets, transactions and range reads.

/// What a successful put reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// How many puts to this key have been applied since it was created, this one included
    /// (1 for the first).
    pub version: u64,
    /// Log index of the entry that applied this put (its revision); puts are ordered by it.
    pub index: u64,
}

/// A value read together with its counters. Revisions are log indices: the store's revision
/// grows with every applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Puts applied to the key since it was created (a delete ends it; the next put is 1).
    pub version: u64,
    /// Revision of the put that created the key.
    pub create_revision: u64,
    /// Revision of the put that last changed it.
    pub mod_revision: u64,
}

/// A key of a range read with its value (empty for a keys-only read) and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Versioned,
}

/// One page of a range read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// The range holds more keys: read again from `next_key`.
    pub more: bool,
    pub next_key: Vec<u8>,
    /// The store's revision the page was read at.
    pub revision: u64,
}
