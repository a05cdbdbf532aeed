//! How one attempt against one server failed, and what the retry loop should do about it.
//!
//! Servers report errors inside the response (`KvError`); transport problems arrive as a
//! gRPC `Status`. Both are sorted into a [`Failure`] here (pure, tested) so the retry loop in
//! `router.rs` only has to branch on four cases.

use kvraft_proto as pb;
use pb::ErrorCode;

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The operation is over: return this error to the caller.
    Fatal(Error),
    /// The server is not the leader; `leader_id` (0 = unknown) and `term` are its hint.
    NotLeader { leader_id: u32, term: u64 },
    /// The leader is busy with this session (`TOO_MANY_PENDING`): back off, same server.
    Busy(String),
    /// Transport error, `UNAVAILABLE` or an unknown code: try again, possibly elsewhere.
    Retry(String),
}

impl Failure {
    /// Classifies the error field of a response from `addr`; `None` means success.
    pub(crate) fn from_kv_error(err: Option<&pb::KvError>, addr: &str) -> Option<Failure> {
        let err = err?;
        let describe = |what: &str| format!("server {addr}: {what}: {}", err.message);
        let failure = match ErrorCode::try_from(err.code) {
            Ok(ErrorCode::ErrorNone) => return None,
            Ok(ErrorCode::ErrorNotLeader) => Failure::NotLeader {
                leader_id: err.leader_id,
                term: err.term,
            },
            Ok(ErrorCode::ErrorSessionExpired) => Failure::Fatal(Error::SessionExpired),
            Ok(ErrorCode::ErrorStaleRequest) => Failure::Fatal(Error::Stale),
            Ok(ErrorCode::ErrorTooManyPending) => Failure::Busy(describe("too many pending")),
            Ok(ErrorCode::ErrorInvalidArgument) => {
                Failure::Fatal(Error::Rejected(describe("invalid argument")))
            }
            Ok(ErrorCode::ErrorUnavailable) => Failure::Retry(describe("unavailable")),
            Ok(ErrorCode::ErrorCompacted) => Failure::Fatal(Error::Rejected(describe("compacted"))),
            Err(_) => Failure::Retry(describe(&format!("unknown error code {}", err.code))),
        };
        Some(failure)
    }

    /// Classifies a gRPC status from `addr`. Only `InvalidArgument` is final: the request was
    /// refused as a whole. Everything else (connection refused, reset, deadline, a process that
    /// is not a kvraft server) may succeed elsewhere or later.
    pub(crate) fn from_status(status: &tonic::Status, addr: &str) -> Failure {
        let text = format!("server {addr}: {:?}: {}", status.code(), status.message());
        match status.code() {
            tonic::Code::InvalidArgument => Failure::Fatal(Error::Rejected(text)),
            _ => Failure::Retry(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_error(code: i32, leader_id: u32, term: u64) -> pb::KvError {
        pb::KvError {
            code,
            message: "why".into(),
            leader_id,
            term,
        }
    }

    fn classify(code: ErrorCode) -> Option<Failure> {
        Failure::from_kv_error(Some(&kv_error(code as i32, 0, 0)), "a:1")
    }

    #[test]
    fn no_error_is_success() {
        assert_eq!(Failure::from_kv_error(None, "a:1"), None);
        assert_eq!(classify(ErrorCode::ErrorNone), None);
    }

    #[test]
    fn codes_map_to_actions() {
        let hint = kv_error(ErrorCode::ErrorNotLeader as i32, 2, 9);
        assert_eq!(
            Failure::from_kv_error(Some(&hint), "a:1"),
            Some(Failure::NotLeader {
                leader_id: 2,
                term: 9
            })
        );
        assert_eq!(
            classify(ErrorCode::ErrorSessionExpired),
            Some(Failure::Fatal(Error::SessionExpired))
        );
        assert_eq!(
            classify(ErrorCode::ErrorStaleRequest),
            Some(Failure::Fatal(Error::Stale))
        );
        assert!(matches!(
            classify(ErrorCode::ErrorTooManyPending),
            Some(Failure::Busy(_))
        ));
        assert!(matches!(
            classify(ErrorCode::ErrorInvalidArgument),
            Some(Failure::Fatal(Error::Rejected(m))) if m.contains("a:1") && m.contains("why")
        ));
        assert!(matches!(
            classify(ErrorCode::ErrorUnavailable),
            Some(Failure::Retry(_))
        ));
    }

    #[test]
    fn unknown_code_is_retried_not_taken_as_success() {
        let err = kv_error(99, 0, 0);
        assert!(matches!(
            Failure::from_kv_error(Some(&err), "a:1"),
            Some(Failure::Retry(m)) if m.contains("99")
        ));
    }

    #[test]
    fn transport_errors_are_retried() {
        let refused = tonic::Status::unavailable("connection refused");
        assert!(matches!(
            Failure::from_status(&refused, "a:1"),
            Failure::Retry(m) if m.contains("a:1") && m.contains("connection refused")
        ));
        let bad = tonic::Status::invalid_argument("key too long");
        assert!(matches!(
            Failure::from_status(&bad, "a:1"),
            Failure::Fatal(Error::Rejected(_))
        ));
    }
}
