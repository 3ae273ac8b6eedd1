//! What became of the cluster's PostgreSQL parameters on this node. The REST
//! API checks a change on every member before storing it, but the DCS can
//! be written by other means and a check cannot foresee everything (a
//! certificate file that is missing, memory taken by something else). So a
//! node applies only parameters its own server accepts (`postgres -C`), and
//! when PostgreSQL still does not start with new parameters it falls back to
//! the last ones it started with, says so, and stays out of elections until
//! the configuration is fixed: the primary, of all nodes, must not stay down
//! for a typo.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

type Parameters = BTreeMap<String, String>;

/// A refused set is checked again this often: the operator may have
/// installed the missing library meanwhile.
const RECHECK_REFUSED: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct ParameterGuard {
    last_started: Option<Parameters>,
    refused: Option<Refused>,
    fallback: Option<Fallback>,
}

#[derive(Debug)]
struct Refused {
    parameters: Parameters,
    reason: String,
    at: Instant,
}

#[derive(Debug)]
struct Fallback {
    /// The set PostgreSQL did not start with.
    failed: Parameters,
    /// The set it runs with instead.
    good: Parameters,
    reason: String,
}

/// Whether the wanted parameters may be written now.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Apply,
    /// Keep what the server has (refused, or what failed to start).
    Keep,
    /// The check could not run: try again next turn.
    Retry,
}

impl ParameterGuard {
    /// Decides whether `wanted` replaces `current` (what is written now).
    pub async fn admit(
        &mut self,
        wanted: &Parameters,
        current: &Parameters,
        bin_dir: &Path,
        run_as: Option<&str>,
    ) -> Admission {
        if let Some(fallback) = &self.fallback {
            if fallback.failed == *wanted {
                return Admission::Keep;
            }
            if fallback.good == *wanted {
                info!(
                    "the configuration is back to the parameters PostgreSQL runs with: fallback over"
                );
                self.fallback = None;
            }
        }
        if wanted == current {
            return Admission::Apply;
        }
        if let Some(refused) = &self.refused
            && refused.parameters == *wanted
            && refused.at.elapsed() < RECHECK_REFUSED
        {
            return Admission::Keep;
        }
        match mainstay_pg::check_parameters(bin_dir, run_as, wanted).await {
            Ok(problems) if problems.is_empty() => {
                if self.refused.take().is_some() {
                    info!("PostgreSQL accepts the cluster's parameters now: applying them");
                }
                Admission::Apply
            }
            Ok(problems) => {
                let reason = problems
                    .iter()
                    .map(|p| match p.parameter.as_str() {
                        "" => p.message.clone(),
                        name => format!("{name}: {}", p.message),
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                if self.refused.as_ref().is_none_or(|r| r.reason != reason) {
                    error!(
                        %reason,
                        "the cluster's PostgreSQL parameters are refused by this node's server; \
                         keeping the current ones: fix them with `mainstay ctl edit-config`"
                    );
                }
                self.refused = Some(Refused {
                    parameters: wanted.clone(),
                    reason,
                    at: Instant::now(),
                });
                Admission::Keep
            }
            Err(err) => {
                warn!("cannot check PostgreSQL parameters ({err}); retrying next turn");
                Admission::Retry
            }
        }
    }

    /// PostgreSQL started with `parameters`.
    pub fn started_with(&mut self, parameters: &Parameters) {
        if self
            .fallback
            .as_ref()
            .is_some_and(|f| f.good != *parameters)
        {
            info!("PostgreSQL started with the cluster's parameters: fallback over");
            self.fallback = None;
        }
        self.last_started = Some(parameters.clone());
    }

    /// The set to fall back to when `trying` did not start: the last one
    /// that did, if it differs.
    pub fn fallback_for(&self, trying: &Parameters) -> Option<Parameters> {
        self.last_started.clone().filter(|good| good != trying)
    }

    /// PostgreSQL runs on `good` because it did not start with `failed`.
    pub fn fell_back(&mut self, failed: &Parameters, good: &Parameters, why: &str) {
        let changed: Vec<&str> = failed
            .iter()
            .filter(|(name, value)| good.get(*name) != Some(value))
            .map(|(name, _)| name.as_str())
            .chain(
                good.keys()
                    .filter(|name| !failed.contains_key(*name))
                    .map(String::as_str),
            )
            .collect();
        self.fallback = Some(Fallback {
            failed: failed.clone(),
            good: good.clone(),
            reason: format!(
                "PostgreSQL did not start with the cluster's parameters (changed: {}): {why}",
                changed.join(", ")
            ),
        });
        self.last_started = Some(good.clone());
    }

    /// Why this node must not lead now.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_ref().map(|f| f.reason.as_str())
    }

    /// What `/patroni` and `ctl list` show: a fallback, or refused
    /// parameters.
    pub fn warning(&self) -> Option<String> {
        match (&self.fallback, &self.refused) {
            (Some(fallback), _) => Some(format!(
                "running on fallback parameters: {}",
                fallback.reason
            )),
            (None, Some(refused)) => Some(format!(
                "the cluster's PostgreSQL parameters are not applied here: {}",
                refused.reason
            )),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> Parameters {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_failed_start_falls_back_until_the_configuration_changes_or_starts() {
        let good = set(&[("work_mem", "4MB")]);
        let bad = set(&[("work_mem", "4MB"), ("ssl", "on")]);
        let mut guard = ParameterGuard::default();
        assert_eq!(guard.fallback_for(&bad), None, "nothing started yet");
        guard.started_with(&good);
        assert_eq!(guard.fallback_for(&good), None, "nothing else to try");
        assert_eq!(guard.fallback_for(&bad), Some(good.clone()));
        guard.fell_back(&bad, &good, "could not load server certificate");
        let reason = guard.fallback().unwrap();
        assert!(
            reason.contains("changed: ssl") && reason.contains("certificate"),
            "{reason}"
        );
        assert!(guard.warning().unwrap().contains("fallback"));
        // Restarts on the good set (a failover, say) keep the fallback.
        guard.started_with(&good);
        assert!(guard.fallback().is_some());
        // A start with anything else ends it.
        guard.started_with(&bad);
        assert!(guard.fallback().is_none());
        assert!(guard.warning().is_none());
    }

    #[tokio::test]
    async fn the_failed_set_is_not_written_again_and_reverting_ends_the_fallback() {
        let good = set(&[("work_mem", "4MB")]);
        let bad = set(&[("ssl", "on")]);
        let mut guard = ParameterGuard::default();
        guard.started_with(&good);
        guard.fell_back(&bad, &good, "no certificate");
        let nowhere = Path::new("/nonexistent");
        assert_eq!(
            guard.admit(&bad, &good, nowhere, None).await,
            Admission::Keep
        );
        assert_eq!(
            guard.admit(&good, &good, nowhere, None).await,
            Admission::Apply
        );
        assert!(guard.fallback().is_none());
    }
}
