//! Socket helpers shared by the gRPC servers.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

/// Accepted connections with Nagle's algorithm off, for `serve_with_incoming*`. Tonic's
/// builder `tcp_nodelay` applies only to listeners tonic binds itself; without this, a small
/// message that follows another within one round trip waits for the peer's delayed ACK (about
/// 40 ms), which is what a follower's acknowledgement after its fsync does.
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    })
}
