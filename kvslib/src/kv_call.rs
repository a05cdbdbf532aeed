//! One traced call of the `Kv` service, shared by register, put and get: ship the trace events
//! the request's token covers, call, continue the trace from the answer's token, and turn an
//! error answer into a [`Failure`] the retry loop understands.

use std::future::Future;

use kvraft_proto as pb;
use kvraft_tracing::Trace;

use crate::failure::Failure;

/// What every `Kv` answer carries besides its payload.
pub(crate) trait KvReply {
    fn kv_error(&self) -> Option<&pb::KvError>;
    fn trace_token(&self) -> &[u8];
}

macro_rules! kv_reply {
    ($($t:ty),*) => {$(
        impl KvReply for $t {
            fn kv_error(&self) -> Option<&pb::KvError> {
                self.error.as_ref()
            }
            fn trace_token(&self) -> &[u8] {
                &self.trace_token
            }
        }
    )*};
}

kv_reply!(
    pb::RegisterSessionResponse,
    pb::PutResponse,
    pb::GetResponse,
    pb::TxnResponse,
    pb::RangeResponse
);

/// Runs `call` against server `addr`; an answer carrying an error comes back as `Err`.
pub(crate) async fn kv_call<R, F, Fut>(
    addr: &str,
    trace: Option<&Trace>,
    call: F,
) -> Result<R, Failure>
where
    R: KvReply,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    if let Some(t) = trace {
        t.tracer().flush().await;
    }
    kv_answer(addr, trace, call).await
}

/// [`kv_call`] for a call whose sender flushes the tracer itself before the request leaves
/// (a request lane, once for every request of a batch).
pub(crate) async fn kv_answer<R, F, Fut>(
    addr: &str,
    trace: Option<&Trace>,
    call: F,
) -> Result<R, Failure>
where
    R: KvReply,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let response = call()
        .await
        .map_err(|status| Failure::from_status(&status, addr))?
        .into_inner();
    if let Some(t) = trace {
        t.tracer().receive_token(response.trace_token());
    }
    if let Some(failure) = Failure::from_kv_error(response.kv_error(), addr) {
        return Err(failure);
    }
    Ok(response)
}
