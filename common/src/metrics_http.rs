//! A minimal HTTP/1.1 responder for Prometheus scrapes: `GET /metrics` answers the text the
//! caller renders, anything else 404 (or 405 for another method). One request per connection
//! (`Connection: close`); written here rather than pulling an HTTP framework in for one route.
//!
//! Bounds: at most [`CONNECTIONS_MAX`] connections at once (others are closed at once), a
//! request head of at most [`HEAD_BYTES_MAX`] bytes read within [`HEAD_TIMEOUT`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CONNECTIONS_MAX: usize = 64;
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metrics server started by [`start`]; dropping it stops it.
pub struct MetricsServer(tokio::task::JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on `addr` (`who` names the process in the error, the address being its
/// `metrics_addr`) and serves scrapes until the returned server is dropped.
pub async fn start<F, Fut>(addr: &str, who: &str, render: F) -> Result<MetricsServer, String>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{who}: cannot listen for metrics on {addr} (metrics_addr): {e}"))?;
    Ok(MetricsServer(tokio::spawn(serve(listener, render))))
}

/// Serves scrapes on `listener` until the task is dropped; `render` makes each answer.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = answer(stream, render).await;
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Reads the request line of `head` (the bytes up to the blank line).
pub fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_BYTES_MAX {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let (status, body) = match route(&head) {
        Route::Metrics => ("200 OK", render().await),
        Route::NotFound => ("404 Not Found", "only /metrics is served\n".to_string()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "use GET\n".to_string()),
        Route::BadRequest => ("400 Bad Request", "not an HTTP/1 request\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_route() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"\x16\x03\x01 garbage"), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    #[tokio::test]
    async fn a_scrape_gets_the_rendered_text() {
        // A port below the ephemeral range (which starts at 32768 here), tried until free.
        let mut port = 20_000 + (std::process::id() % 10_000) as u16;
        let mut listener = None;
        for _ in 0..1_000 {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
                listener = Some(l);
                break;
            }
            port = 10_000 + (port - 9_999) % 20_000;
        }
        let listener = listener.expect("a free port below the ephemeral range");
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, || async { "up 1\n".to_string() }));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nup 1\n"), "{text}");
        server.abort();
    }
}
