//! When a replicated directory needs a person: a receiver whose oldest
//! unapplied change is older than the limit (judged on the source, which
//! hears from every receiver), and a receiver that keeps failing files
//! (a full disk, an unreadable file at the source) for longer than the
//! limit. Pure: the caller gives the states and the time.

use crate::follower::FollowerStatus;
use crate::source::ReceiverLag;
use std::time::Duration;

/// One thing to tell operators: who it is about, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trouble {
    pub subject: String,
    pub message: String,
}

/// A source's receivers that are too far behind.
pub fn lagging(path: &str, receivers: &[ReceiverLag], limit: Duration) -> Vec<Trouble> {
    receivers
        .iter()
        .filter(|lag| lag.files_behind > 0 && lag.seconds_behind > limit.as_secs_f64())
        .map(|lag| Trouble {
            subject: lag.receiver.clone(),
            message: format!(
                "{} is {} files ({:.1} MiB) behind on {path}, the oldest change {:.0} s ago \
                 (alert above {} s)",
                lag.receiver,
                lag.files_behind,
                lag.bytes_behind as f64 / (1u64 << 20) as f64,
                lag.seconds_behind,
                limit.as_secs()
            ),
        })
        .collect()
}

/// A receiver (`node`) failing files for longer than `limit` at `now_unix`.
pub fn failing(
    node: &str,
    status: &FollowerStatus,
    limit: Duration,
    now_unix: u64,
) -> Option<Trouble> {
    let since = status.failing_since?;
    let (first, why) = status.failed.first()?;
    let for_secs = now_unix.saturating_sub(since);
    (for_secs > limit.as_secs()).then(|| Trouble {
        subject: node.to_string(),
        message: format!(
            "{node} has failed to receive {} files of {} for {for_secs} s, e.g. {first}: {why}",
            status.failed.len(),
            status.path
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_is_reported_once_its_oldest_change_is_older_than_the_limit() {
        let lag = |receiver: &str, files, seconds| ReceiverLag {
            receiver: receiver.into(),
            version: 3,
            files_behind: files,
            bytes_behind: 3 << 20,
            seconds_behind: seconds,
            last_heard_seconds: 0.5,
        };
        let troubles = lagging(
            "/srv/media",
            &[
                lag("node2", 12, 75.0),
                lag("node3", 1, 5.0),
                lag("node4", 0, 0.0),
            ],
            Duration::from_secs(60),
        );
        assert_eq!(troubles.len(), 1);
        assert_eq!(troubles[0].subject, "node2");
        assert_eq!(
            troubles[0].message,
            "node2 is 12 files (3.0 MiB) behind on /srv/media, the oldest change 75 s ago \
             (alert above 60 s)"
        );
    }

    #[test]
    fn failing_files_are_reported_only_when_they_last() {
        let status = FollowerStatus {
            path: "/srv/media".into(),
            failed: vec![("a/b".into(), "No space left on device".into())],
            failing_since: Some(1_000),
            ..FollowerStatus::default()
        };
        let limit = Duration::from_secs(60);
        assert_eq!(failing("node2", &status, limit, 1_030), None);
        let trouble = failing("node2", &status, limit, 1_090).unwrap();
        assert_eq!(
            trouble.message,
            "node2 has failed to receive 1 files of /srv/media for 90 s, e.g. a/b: No space \
             left on device"
        );
        let fine = FollowerStatus::default();
        assert_eq!(failing("node2", &fine, limit, 5_000), None);
    }
}
