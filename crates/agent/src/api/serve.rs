//! Connections to the REST API: how many, how slow, and what a panic turns
//! into. The API shares the agent's runtime with the HA loop, so no client
//! may hold resources without a bound: a connection that does not send its
//! request in time is closed, the number of open connections is capped, and
//! a request body must arrive within the same time as its header.

use super::error;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Bodies are small JSON documents; 2 MiB leaves room for a large
/// configuration while a client cannot make the agent buffer more.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The bounds on API clients, from `[api]` in the node's file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Time to send a complete request header, counted from the connection's
    /// start or from the previous response (so it is also how long an idle
    /// keep-alive connection stays open), and again to send the body.
    pub header_timeout: Duration,
    /// Open connections at once; the next one is closed at once.
    pub max_connections: usize,
}

/// Why the API cannot serve: a startup error for the agent.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "cannot listen on api.listen = \"{listen}\": {source}; choose a free address and port \
         in the [api] section"
    )]
    Bind {
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the API's address; a failure is a startup error for the agent.
pub async fn bind(listen: std::net::SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })
}

/// Serves until the task is aborted; HTTPS when `tls` is given.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
) {
    let app = app
        .layer(axum::middleware::from_fn(move |request, next| {
            read_body_in_time(request, next, limits.header_timeout)
        }))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refused = Arc::new(AtomicU64::new(0));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!("REST API accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Responses go out in several writes (head, then body pieces): with
        // Nagle's algorithm a kept-alive connection would wait for the
        // peer's delayed ACK between them, 40 ms a response.
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closing at once tells the client now, where waiting in the
            // backlog would look like a hung agent to a health check.
            drop(tcp);
            if refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000) {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    "REST API connection refused: api.max_connections are open"
                );
            }
            continue;
        };
        let (tls, app) = (tls.clone(), app.clone());
        let connection = async move {
            let _slot = slot;
            match tls {
                None => serve_connection(tcp, peer, app, limits).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(tcp));
                    match handshake.await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, app, limits).await,
                        _ => tracing::debug!(%peer, "TLS handshake failed or timed out"),
                    }
                }
            }
        };
        // A handler's lines (a panic's too) carry the server's span.
        tokio::spawn(connection.in_current_span());
    }
}

/// The address a request came from, for handlers that record who asked.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub std::net::SocketAddr);

async fn serve_connection<I>(io: I, peer: std::net::SocketAddr, app: Router, limits: Limits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = tower::ServiceExt::map_request(
        app,
        move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ClientAddress(peer));
            request
        },
    );
    let service = hyper_util::service::TowerToHyperService::new(app);
    // hyper starts this timer whenever the connection waits for a request
    // head, so it bounds a slow header and an idle keep-alive alike.
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// Reads the whole body (bounded in size and time) before a handler runs,
/// so a client trickling its body holds no handler and no lock.
async fn read_body_in_time(request: Request, next: Next, within: Duration) -> Response {
    let (parts, body) = request.into_parts();
    let collected = tokio::time::timeout(within, Limited::new(body, MAX_BODY_BYTES).collect());
    let bytes = match collected.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
            );
        }
        Ok(Err(err)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {err}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within api.header_timeout ({} s)",
                    within.as_secs_f64()
                ),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// A panic in a handler is a bug; the client still gets an answer and the
/// log says where, instead of a connection closed without a word.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    tracing::error!("BUG: a REST API handler panicked: {what}");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error (a bug, please report it with the agent's log): {what}"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn planted_bug() -> &'static str {
        panic!("planted")
    }

    async fn start(limits: Limits) -> std::net::SocketAddr {
        let app = Router::new()
            .route("/panic", get(planted_bug))
            .route("/echo", post(|body: axum::body::Bytes| async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, None, limits));
        address
    }

    async fn exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer));
        let _ = read.await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_millis(300),
        max_connections: 4,
    };

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_a_reason() {
        let address = start(LIMITS).await;
        let answer = exchange(
            address,
            b"GET /panic HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        assert!(answer.contains("planted"), "{answer}");
        // The server goes on.
        let answer = exchange(
            address,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size_and_time() {
        let address = start(LIMITS).await;
        let huge = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(huge.as_bytes()).await.unwrap();
        let _ = stream.write_all(&vec![b'x'; MAX_BODY_BYTES + 1]).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

        // Half a body, then nothing: 408 after the header timeout.
        let started = std::time::Instant::now();
        let answer = exchange(
            address,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn slow_headers_and_extra_connections_are_closed() {
        let address = start(LIMITS).await;
        let mut held = Vec::new();
        for _ in 0..LIMITS.max_connections {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(b"GET /echo HTTP/1.1\r\n").await.unwrap();
            held.push(stream);
        }
        // Over the cap: closed without an answer.
        let answer = exchange(address, b"GET /panic HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(answer, "");
        // The slow ones are closed once the header timeout passes.
        let started = std::time::Instant::now();
        for stream in &mut held {
            let mut buf = [0u8; 256];
            let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open");
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // Slots are free again.
        let answer = exchange(
            address,
            b"GET /panic HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    }
}
