//! How a receiver's replication thread reaches the leader's agent: the
//! REST API with this agent's own credentials and CA (every agent of a
//! cluster shares them; no second set of secrets), on a small runtime of
//! the thread's own. A file's body is read frame by frame as the receiver
//! writes it, so memory does not grow with the file.

use crate::api::ApiAuth;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, StatusCode};
use mainstay_files::source::Offer;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct ApiTransport {
    runtime: Arc<tokio::runtime::Runtime>,
    auth: ApiAuth,
    ca_file: Option<PathBuf>,
}

/// The offer (a manifest of up to many thousand entries) within this.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
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
    ) -> Result<Option<Offer>, String> {
        let client = self
            .auth
            .peer_client(leader_url, OFFER_TIMEOUT, &self.ca_file);
        let mut path = format!(
            "/replication/files/{index}/offer?receiver={}&full={full}",
            encode(receiver)
        );
        if let Some((instance, version)) = applied {
            path.push_str(&format!("&instance={}&version={version}", encode(instance)));
        }
        let answer = self
            .runtime
            .block_on(client.get(&path))
            .map_err(|e| format!("asking the leader for its offer: {e}"))?;
        match answer.status {
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::OK => serde_json::from_str(&answer.text)
                .map(Some)
                .map_err(|e| format!("the leader's offer does not parse: {e}")),
            status => Err(format!(
                "the leader answered {status} for its offer: {}",
                answer.text.trim()
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
        let client = self
            .auth
            .peer_client(leader_url, PIECE_TIMEOUT, &self.ca_file);
        let request = format!(
            "/replication/files/{index}/file?path={}&offset={offset}",
            encode(path)
        );
        let response = self
            .runtime
            .block_on(client.response(Method::GET, &request, None, ""))
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
