//! Forwarding etcd's watch events, with the require-leader option and a
//! progress check, so that a silent or cut-off member is noticed.

use super::*;

/// Forwards watch events until the stream breaks or the receiver goes away.
///
/// require-leader makes etcd cancel the stream when its member loses the
/// quorum, but a frozen or unreachable etcd sends nothing at all, which is
/// indistinguishable from a quiet cluster. So after a request timeout
/// without a message the task asks for a progress report (etcd answers with
/// an empty response), and a second one of silence ends the watch with an
/// error. A broken watch also moves requests to the next member.
pub(super) async fn forward_watch(
    mut watcher: Watcher,
    mut stream: WatchStream,
    tx: mpsc::Sender<WatchEvent>,
    inner: Weak<Inner>,
    member: usize,
) {
    let Some((prefix, quiet)) = inner
        .upgrade()
        .map(|i| (i.prefix.clone(), i.request_timeout))
    else {
        return;
    };
    let mut probing = false;
    let error = loop {
        let next = tokio::select! {
            _ = tx.closed() => {
                // Nobody listens; the stream ends when `watcher` is dropped.
                let _ = watcher.cancel().await;
                return;
            }
            next = tokio::time::timeout(quiet, stream.message()) => next,
        };
        let response = match next {
            Err(_) if probing => {
                break format!(
                    "etcd sent nothing for {:?}, not even an answer to a progress request",
                    quiet * 2
                );
            }
            Err(_) => {
                if let Err(e) = watcher.request_progress().await {
                    break format!("cannot probe the watch stream: {}", describe(&e));
                }
                probing = true;
                continue;
            }
            Ok(Err(e)) => break format!("watch stream failed: {}", describe(&e)),
            Ok(Ok(None)) => break "etcd closed the watch stream".to_string(),
            Ok(Ok(Some(response))) => response,
        };
        probing = false;
        if response.canceled() {
            break if response.compact_revision() != 0 {
                format!(
                    "etcd cancelled the watch: history compacted up to revision {}",
                    response.compact_revision()
                )
            } else {
                format!("etcd cancelled the watch: {}", response.cancel_reason())
            };
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .map_or(KeyKind::Other, KeyKind::from_relative);
            let change = WatchEvent::Changed {
                key,
                deleted: event.event_type() == EventType::Delete,
                revision: kv.mod_revision(),
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    };
    let error = match inner.upgrade() {
        Some(inner) => {
            let error = format!("{}: {error}", inner.members[member].endpoint);
            inner.fail_over(member, &DcsError::Unreachable(error.clone()));
            error
        }
        None => error,
    };
    tracing::debug!(%error, "etcd watch ended");
    let _ = tx.send(WatchEvent::Error(error)).await;
}
