//! Identifier newtypes. Zero is reserved as "none" for every one of them on the wire, which is
//! why server ids start at 1, terms start at 1 and the first log entry has index 1.

use std::fmt;

/// A server id from the cluster config (1..=255 in practice; 0 means "no server").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// A term (epoch) issued by the coord. Terms are never reused; 0 means "before any term".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// A position in the replicated log; the first entry has index 1, 0 means "empty log".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogIndex(pub u64);

impl NodeId {
    pub const NONE: NodeId = NodeId(0);
    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl Term {
    /// The next term; saturates at the largest (the coord refuses to go past it rather than
    /// wrap to a term already used).
    pub fn next(self) -> Term {
        Term(self.0.saturating_add(1))
    }
}

impl LogIndex {
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
}

/// `index + n`: the entry `n` places later (overflow is a bug, checked in debug builds).
impl std::ops::Add<u64> for LogIndex {
    type Output = LogIndex;
    fn add(self, n: u64) -> LogIndex {
        LogIndex(self.0 + n)
    }
}

/// `index - n`: the entry `n` places earlier (underflow is a bug, checked in debug builds).
impl std::ops::Sub<u64> for LogIndex {
    type Output = LogIndex;
    fn sub(self, n: u64) -> LogIndex {
        LogIndex(self.0 - n)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
