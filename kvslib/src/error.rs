//! Errors of client operations, and which of them are definite.
//!
//! A linearizability checker needs to know whether a failed operation may still have taken
//! effect: [`Error::is_definite`] is true only when it certainly did not (the input was refused
//! before sending, or the server refused it without applying it). A timeout is never definite:
//! the request may have been applied and only the answer lost.

/// Why a put, get, session registration or leader query failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The key or value breaks a size limit; refused before anything was sent.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The operation's deadline (`client.op_timeout_ms`) passed, retries and failovers included.
    /// The operation MAY OR MAY NOT have taken effect: a put can have been applied with its
    /// answer lost. `last_error` is the last reason an attempt failed.
    #[error("{op} timed out (it may or may not have taken effect); last error: {last_error}")]
    Timeout {
        op: &'static str,
        last_error: String,
    },

    /// The server no longer knows this client's session (expired or lost). The operation failed
    /// (if a put, it may have been applied before the session expired); a new session is
    /// registered, so the next operation can succeed.
    #[error("session expired; later operations use a new session")]
    SessionExpired,

    /// The server refused the request as invalid (`INVALID_ARGUMENT`); it was not applied and
    /// retrying it will not help.
    #[error("rejected by the server: {0}")]
    Rejected(String),

    /// The server no longer holds this put's result: its seq is below the session's
    /// acknowledged watermark. It MAY OR MAY NOT have been applied (the server cannot tell any
    /// more). kvslib never abandons a seq it still retries, so this follows only a put it gave
    /// up on.
    #[error("request refused as stale; it may or may not have been applied")]
    Stale,

    /// The coord could not be asked and no leader is known from earlier.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// True when the operation certainly did NOT take effect.
    pub fn is_definite(&self) -> bool {
        matches!(self, Error::InvalidInput(_) | Error::Rejected(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_are_definite() {
        assert!(Error::InvalidInput("key is empty".into()).is_definite());
        assert!(Error::Rejected("bad".into()).is_definite());
        assert!(!Error::Stale.is_definite(), "the result is gone, not known");
        let timeout = Error::Timeout {
            op: "Put",
            last_error: "connection refused".into(),
        };
        assert!(!timeout.is_definite());
        assert!(timeout.to_string().contains("may or may not"), "{timeout}");
        assert!(!Error::SessionExpired.is_definite());
        assert!(!Error::Unavailable("coord down".into()).is_definite());
    }
}
