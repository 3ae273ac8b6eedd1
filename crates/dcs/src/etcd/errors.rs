//! etcd's errors as the DCS's: which ones mean "not sent", "lost",
//! "another member", with their causes spelled out for the log.

use super::*;

/// Turns an etcd-client error from `endpoint` into what the caller can act
/// on.
pub(super) fn map_err(error: etcd_client::Error, endpoint: &str) -> DcsError {
    use etcd_client::Error as E;
    let unreachable = |reason: String| DcsError::Unreachable(format!("{endpoint}: {reason}"));
    match &error {
        E::GRpcStatus(status) => match status_error(status) {
            DcsError::Unreachable(reason) => unreachable(reason),
            other => other,
        },
        // A broken connection, or the request or response channel of a
        // stream gone with its connection.
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => {
            unreachable(describe(&error))
        }
        E::InvalidArgs(_) | E::InvalidUri(_) => {
            DcsError::Other(format!("invalid etcd settings: {}", describe(&error)))
        }
        _ => DcsError::Other(describe(&error)),
    }
}

pub(super) fn status_error(status: &tonic::Status) -> DcsError {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::DeadlineExceeded => DcsError::Timeout,
        // etcd's own "request timed out": the outcome is unknown, as with
        // a client-side timeout.
        Code::Unavailable if message.contains("timed out") => DcsError::Timeout,
        Code::Unavailable if message.contains("no leader") => DcsError::Unreachable(format!(
            "the etcd member has no leader, it may be cut off from its quorum ({message})"
        )),
        Code::Unavailable | Code::Cancelled => DcsError::Unreachable(describe_status(status)),
        // tonic makes a status with a source out of a local transport
        // failure (e.g. a connection that died since the last request); etcd
        // never sends one.
        _ if std::error::Error::source(status).is_some() => {
            DcsError::Unreachable(describe_status(status))
        }
        Code::NotFound if message.contains("lease not found") => {
            DcsError::Conflict("the lease no longer exists: it expired or was revoked".into())
        }
        Code::InvalidArgument if message.contains("authentication failed") => DcsError::Other(
            format!("etcd refused the login ({message}): check the etcd username and password"),
        ),
        Code::Unauthenticated | Code::PermissionDenied => DcsError::Other(format!(
            "etcd refused access ({message}): check the etcd username, password and certificates"
        )),
        code => DcsError::Other(format!("etcd answered {code:?}: {message}")),
    }
}

/// Whether the request certainly never reached etcd's state machine, so
/// that sending it to another member cannot apply it twice: the connection
/// could not be made, or the member refused it for lack of a leader.
pub(super) fn is_unsent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && (status.message().contains("no leader")
                    || status.message().contains("connect error"))
        }
        _ => false,
    }
}

/// etcd forgot the token (member restarted, token expired); a fresh
/// client authenticates again.
pub(super) fn is_invalid_token(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(s) if s.message().contains("invalid auth token"))
}

/// An error with its chain of causes: tonic keeps the useful part ("tcp
/// connect error: Connection refused") in the sources.
pub(super) fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => describe_status(status),
        other => with_causes(other.to_string(), std::error::Error::source(other)),
    }
}

pub(super) fn describe_status(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

pub(super) fn with_causes(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // "transport error" and repeats of the message add nothing.
        if cause_text != "transport error" && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
