//! How a receiver's replication thread reaches the leader's agent: the
//! REST API with this agent's own credentials and CA (every agent of a
//! cluster shares them; no second set of secrets), on a small runtime of
//! the thread's own. A file's body is read frame by frame as the receiver
//! writes it, so memory does not grow with the file.

use crate::api::ApiAuth;
use crate::api_client::Session;
use http_body_util::BodyExt;
use hyper::StatusCode;
use hyper::body::Incoming;
use mainstay_files::source::Offer;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct ApiTransport {
    runtime: Arc<tokio::runtime::Runtime>,
    auth: ApiAuth,
    ca_file: Option<PathBuf>,
    /// One connection to the leader, kept from request to request.
    session: Option<Session>,
}

/// The offer's head within this beyond the time the leader may hold the
/// question, and its body (a manifest of up to many thousand entries)
/// within this too.
const OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// A file's first byte, and each next piece, within this.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);

impl ApiTransport {
    pub fn new(auth: ApiAuth, ca_file: Option<PathBuf>) -> io::Result<ApiTransport> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(ApiTransport {
            runtime: Arc::new(runtime),
            auth,
            ca_file,
            session: None,
        })
    }

    /// The kept connection to `leader_url` (a new one for a new leader).
    fn session(&mut self, leader_url: &str) -> &mut Session {
        let base = leader_url.trim_end_matches('/');
        if self.session.as_ref().is_some_and(|s| s.base() != base) {
            self.session = None;
        }
        self.session.get_or_insert_with(|| {
            Session::new(
                self.auth
                    .peer_client(leader_url, PIECE_TIMEOUT, &self.ca_file),
            )
        })
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl mainstay_files::Transport for ApiTransport {
    fn offer(
        &mut self,
        leader_url: &str,
        index: usize,
        receiver: &str,
        applied: Option<(&str, u64)>,
        full: bool,
        wait: Duration,
    ) -> Result<Option<Offer>, String> {
        let mut path = format!(
            "/replication/files/{index}/offer?receiver={}&full={full}&wait={}",
            encode(receiver),
            wait.as_millis()
        );
        if let Some((instance, version)) = applied {
            path.push_str(&format!("&instance={}&version={version}", encode(instance)));
        }
        let runtime = self.runtime.clone();
        let session = self.session(leader_url);
        let within = wait + OFFER_TIMEOUT;
        let exchange = async {
            let response = session
                .get(&path)
                .await
                .map_err(|e| format!("asking the leader for its offer: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the leader's offer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = runtime
            .block_on(async { tokio::time::timeout(within, exchange).await })
            .map_err(|_| format!("the leader's offer did not come within {within:?}"))
            .inspect_err(|_| self.session = None)??;
        match status {
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| format!("the leader's offer does not parse: {e}")),
            status => Err(format!(
                "the leader answered {status} for its offer: {}",
                String::from_utf8_lossy(&body).trim()
            )),
        }
    }

    fn open(
        &mut self,
        leader_url: &str,
        index: usize,
        path: &str,
        offset: u64,
    ) -> io::Result<Box<dyn Read + Send>> {
        let request = format!(
            "/replication/files/{index}/file?path={}&offset={offset}",
            encode(path)
        );
        let runtime = self.runtime.clone();
        let response = runtime
            .block_on(self.session(leader_url).get(&request))
            .map_err(io::Error::other)?;
        if response.status() != StatusCode::OK {
            return Err(io::Error::other(format!(
                "the leader answered {} for {path}",
                response.status()
            )));
        }
        Ok(Box::new(BodyReader {
            runtime: self.runtime.clone(),
            body: response.into_body(),
            piece: hyper::body::Bytes::new(),
        }))
    }
}

/// A response body as a blocking reader, one frame at a time.
struct BodyReader {
    runtime: Arc<tokio::runtime::Runtime>,
    body: Incoming,
    piece: hyper::body::Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            // The timer belongs to the runtime: made inside block_on.
            let body = &mut self.body;
            let next = self
                .runtime
                .block_on(async { tokio::time::timeout(PIECE_TIMEOUT, body.frame()).await });
            match next {
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no data from the leader for {PIECE_TIMEOUT:?}"),
                    ));
                }
                Ok(None) => return Ok(0),
                Ok(Some(Err(e))) => return Err(io::Error::other(e)),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.piece = data;
                    }
                }
            }
        }
        let n = buffer.len().min(self.piece.len());
        buffer[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        Ok(n)
    }
}
