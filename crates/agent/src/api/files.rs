//! The replicated directories over the API: `GET /replication/files`
//! (every directory's state on this node, open like `/cluster`), and, for
//! the other agents only (the API's credentials, even on GET: these are
//! the files themselves), a directory's offer and a file's bytes, streamed
//! in 64 KiB pieces.

use super::{Shared, error};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mainstay_dcs::Dcs;
use serde::Deserialize;
use std::io::Read;
use std::time::Duration;

pub(super) async fn status<D: Dcs>(State(state): Shared<D>) -> Response {
    let status = match state.replication.clone() {
        // Read under the replication's lock: off the runtime's threads.
        Some(replication) => tokio::task::spawn_blocking(move || replication.status()).await,
        None => Ok(serde_json::json!({ "directories": [] })),
    };
    match status {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The credentials first, then the directory's index and the query.
fn authorized<Q>(
    auth: &crate::api::ApiAuth,
    headers: &HeaderMap,
    index: Result<Path<usize>, PathRejection>,
    query: Result<Query<Q>, QueryRejection>,
) -> Result<(usize, Q), Box<Response>> {
    auth.check(headers)
        .map_err(|refusal| Box::new(refusal.into_response()))?;
    match (index, query) {
        (Ok(Path(index)), Ok(Query(query))) => Ok((index, query)),
        (Err(e), _) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("index: {}", e.body_text()),
        ))),
        (_, Err(e)) => Err(Box::new(error(StatusCode::BAD_REQUEST, e.body_text()))),
    }
}

#[derive(Deserialize)]
pub(super) struct OfferQuery {
    receiver: Option<String>,
    instance: Option<String>,
    version: Option<u64>,
    #[serde(default)]
    full: bool,
    /// Milliseconds to hold the question while the offer does not move.
    #[serde(default)]
    wait: u64,
}

/// The longest a receiver's question is held.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Directory `index`'s offer, or 304 when the asker has applied it and
/// it did not move within `wait` milliseconds (at most 10 s).
pub(super) async fn offer<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    index: Result<Path<usize>, PathRejection>,
    query: Result<Query<OfferQuery>, QueryRejection>,
) -> Response {
    let (index, query) = match authorized(&state.auth, &headers, index, query) {
        Ok(parts) => parts,
        Err(refused) => return *refused,
    };
    let Some(replication) = &state.replication else {
        return not_source();
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(query.wait).min(MAX_WAIT);
    let mut moved = replication.offers_moved();
    let query = std::sync::Arc::new(query);
    loop {
        moved.borrow_and_update();
        // The offer is cloned under the replication's lock (the scan
        // thread holds it while it scans): off the runtime's threads.
        let (replication, asked) = (replication.clone(), query.clone());
        // Written out on the blocking pool too: a tree of 100,000 files is
        // an offer of some 15 MB.
        let offer = tokio::task::spawn_blocking(move || {
            let applied = asked.instance.as_deref().zip(asked.version);
            replication
                .offer(index, asked.receiver.as_deref(), applied, asked.full)
                .map(|offer| offer.map(|offer| serde_json::to_vec(&*offer)))
        })
        .await;
        match offer {
            Ok(Some(Some(Ok(json)))) => {
                return (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    json,
                )
                    .into_response();
            }
            Ok(Some(Some(Err(e)))) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            Ok(Some(None)) => {
                let waited = tokio::time::timeout_at(deadline, moved.changed()).await;
                if !matches!(waited, Ok(Ok(()))) {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
            }
            Ok(None) => return not_source(),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// 409, as for other requests sent to the wrong node (not the leader).
fn not_source() -> Response {
    error(
        StatusCode::CONFLICT,
        "this node is not the source of that replicated directory: ask the leader",
    )
}

#[derive(Deserialize)]
pub(super) struct FileQuery {
    path: String,
    /// Where to start: past what a cut transfer delivered.
    #[serde(default)]
    offset: u64,
}

/// A file of the current offer, streamed; 404 for anything else (a path
/// not offered, a link, a directory, a path that climbs out).
pub(super) async fn file<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    index: Result<Path<usize>, PathRejection>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Response {
    let (index, query) = match authorized(&state.auth, &headers, index, query) {
        Ok(parts) => parts,
        Err(refused) => return *refused,
    };
    let Some(replication) = state.replication.clone() else {
        return not_source();
    };
    if !mainstay_files::manifest::valid_relative(&query.path) {
        return error(
            StatusCode::BAD_REQUEST,
            "path: a relative path inside the directory",
        );
    }
    let (relative, offset) = (query.path.clone(), query.offset);
    let opened = tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let (root, _) = replication.file(index, &relative)?;
        let mut file = mainstay_files::apply::open_inside(&root, &relative).ok()?;
        file.seek(SeekFrom::Start(offset)).ok()?;
        Some(file)
    })
    .await;
    let Ok(Some(file)) = opened else {
        return error(
            StatusCode::NOT_FOUND,
            format!("{} is not a file this node offers", query.path),
        );
    };
    // One 64 KiB read at a time, on the blocking pool; the connection's
    // pace bounds what is in memory.
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            let n = file.read(&mut buffer)?;
            buffer.truncate(n);
            Ok::<_, std::io::Error>((buffer, file))
        })
        .await;
        match read {
            Ok(Ok((buffer, _))) if buffer.is_empty() => None,
            Ok(Ok((buffer, file))) => Some((Ok(axum::body::Bytes::from(buffer)), Some(file))),
            Ok(Err(e)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    // Chunked, not a Content-Length: the file may change while it is
    // read; the receiver checks the bytes against the offer's hash.
    Body::from_stream(chunks).into_response()
}
