//! Transactions: `if <compares> then <ops> else <ops>`, applied atomically as one log entry,
//! exactly once through retries and failovers like a put. Deletes and compare-and-swap are
//! built on them.
//!
//! ```
//! use kvslib::{Compare, Txn, TxnOp};
//! // Take a lock if nobody holds it; otherwise read who does.
//! let take = Txn::new()
//!     .when(Compare::version("lock", kvslib::CmpOp::Equal, 0))
//!     .then(TxnOp::put("lock", "me"))
//!     .otherwise(TxnOp::get("lock"));
//! assert_eq!(take.success.len(), 1);
//! ```

use kvraft_proto as pb;

use crate::Versioned;

/// How a compare relates the key's actual target to the given one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// What a compare looks at, and the value it is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The key's version (0: the key is absent).
    Version(u64),
    /// Revision that created the key (0: absent).
    CreateRevision(u64),
    /// Revision that last changed the key (0: absent).
    ModRevision(u64),
    /// The value, as bytes (Less/Greater in byte order). False on an absent key, whatever
    /// the op.
    Value(Vec<u8>),
}

/// `key`'s target `op` the given one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CmpOp,
    pub target: Target,
}

impl Compare {
    pub fn version(key: impl Into<Vec<u8>>, op: CmpOp, version: u64) -> Compare {
        Compare {
            key: key.into(),
            op,
            target: Target::Version(version),
        }
    }
    pub fn value(key: impl Into<Vec<u8>>, op: CmpOp, value: impl Into<Vec<u8>>) -> Compare {
        Compare {
            key: key.into(),
            op,
            target: Target::Value(value.into()),
        }
    }
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CmpOp, revision: u64) -> Compare {
        Compare {
            key: key.into(),
            op,
            target: Target::ModRevision(revision),
        }
    }
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CmpOp, revision: u64) -> Compare {
        Compare {
            key: key.into(),
            op,
            target: Target::CreateRevision(revision),
        }
    }
}

/// One operation of a transaction branch; each sees the ones before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Every key in `[start, end)` (an empty `end`: no upper bound), at most
    /// [`DELETE_KEYS_PER_ENTRY_MAX`](kvraft_common::limits::DELETE_KEYS_PER_ENTRY_MAX) per
    /// transaction; the result says whether more remain.
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp::Delete { key: key.into() }
    }
    pub fn get(key: impl Into<Vec<u8>>) -> TxnOp {
        TxnOp::Get { key: key.into() }
    }
}

/// A transaction: if every compare holds, `success` runs, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }
    /// Adds a compare (all must hold).
    pub fn when(mut self, compare: Compare) -> Txn {
        self.compares.push(compare);
        self
    }
    /// Adds an op to the branch run when the compares hold.
    pub fn then(mut self, op: TxnOp) -> Txn {
        self.success.push(op);
        self
    }
    /// Adds an op to the branch run when a compare fails.
    pub fn otherwise(mut self, op: TxnOp) -> Txn {
        self.failure.push(op);
        self
    }
}

/// What an applied transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The revision (log index) of the entry that applied it.
    pub revision: u64,
    /// One per op of the branch that ran, in order.
    pub results: Vec<TxnOpOutcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpOutcome {
    /// The key's version after the put.
    Put { version: u64 },
    /// Keys deleted; `more`: keys of the range remain (send the delete again).
    Delete { deleted: u64, more: bool },
    /// The key as this point of the transaction saw it. `value_omitted`: the transaction's
    /// read budget (the cluster's `max_value_bytes` of values in all) was spent, and the
    /// value is left empty.
    Get {
        value: Option<Versioned>,
        value_omitted: bool,
    },
}

/// What [`Client::cas`](crate::Client::cas) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key had the expected version; the value is written.
    Swapped(crate::PutOutcome),
    /// It did not: nothing changed. `current` is the key as it was (absent: `None`).
    Failed { current: Option<Versioned> },
}

pub(crate) fn compare_to_pb(c: &Compare) -> pb::Compare {
    let op = match c.op {
        CmpOp::Equal => pb::CompareOp::Equal,
        CmpOp::NotEqual => pb::CompareOp::NotEqual,
        CmpOp::Less => pb::CompareOp::Less,
        CmpOp::Greater => pb::CompareOp::Greater,
    };
    let (target, number, value) = match &c.target {
        Target::Version(n) => (pb::CompareTarget::Version, *n, Vec::new()),
        Target::CreateRevision(n) => (pb::CompareTarget::CreateRevision, *n, Vec::new()),
        Target::ModRevision(n) => (pb::CompareTarget::ModRevision, *n, Vec::new()),
        Target::Value(v) => (pb::CompareTarget::Value, 0, v.clone()),
    };
    pb::Compare {
        key: c.key.clone().into(),
        target: target as i32,
        op: op as i32,
        number,
        value: value.into(),
    }
}

pub(crate) fn op_to_pb(op: &TxnOp) -> pb::TxnOp {
    use pb::txn_op::Op;
    let op = match op {
        TxnOp::Put { key, value } => Op::Put(pb::TxnPut {
            key: key.clone().into(),
            value: value.clone().into(),
        }),
        TxnOp::Delete { key } => Op::Delete(pb::TxnDelete {
            key: key.clone().into(),
            range_end: Default::default(),
        }),
        TxnOp::DeleteRange { start, end } => Op::Delete(pb::TxnDelete {
            key: start.clone().into(),
            // On the wire an empty range_end deletes one key: "no upper bound" is one zero
            // byte (as in etcd).
            range_end: if end.is_empty() {
                vec![0].into()
            } else {
                end.clone().into()
            },
        }),
        TxnOp::Get { key } => Op::Get(pb::TxnGet {
            key: key.clone().into(),
        }),
    };
    pb::TxnOp { op: Some(op) }
}

pub(crate) fn versioned_of(kv: &pb::KeyValue) -> Versioned {
    Versioned {
        value: kv.value.to_vec(),
        version: kv.version,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
    }
}

/// The outcome in a response; a result missing its payload is the server breaking the
/// protocol, reported as such.
pub(crate) fn outcome_of(resp: &pb::TxnResponse) -> Result<TxnOutcome, String> {
    use pb::txn_op_result::Result as R;
    let mut results = Vec::with_capacity(resp.results.len());
    for (i, r) in resp.results.iter().enumerate() {
        results.push(match &r.result {
            Some(R::Put(p)) => TxnOpOutcome::Put { version: p.version },
            Some(R::Delete(d)) => TxnOpOutcome::Delete {
                deleted: d.deleted,
                more: d.more,
            },
            Some(R::Get(g)) => TxnOpOutcome::Get {
                value: if g.found {
                    Some(g.kv.as_ref().map(versioned_of).unwrap_or_default())
                } else {
                    None
                },
                value_omitted: g.value_omitted,
            },
            None => return Err(format!("transaction result {i} is empty")),
        });
    }
    Ok(TxnOutcome {
        succeeded: resp.succeeded,
        revision: resp.revision,
        results,
    })
}
