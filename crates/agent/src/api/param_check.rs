//! PostgreSQL parameters are checked on every member before a change is
//! stored: each member asks its own server (`postgres -C`), its own library
//! directory and its own memory, through `POST /config/check`. Members may
//! differ (a library installed on one node only, a smaller machine), and a
//! parameter one of them cannot start with would take that node down at its
//! next restart, possibly the leader's.

use super::actions::{Refusal, accept, current_view};
use super::{ApiState, Shared};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mainstay_core::dynamic::DynamicConfig;
use mainstay_dcs::Dcs;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// How this node checks parameters: its server and the parameters its own
/// file sets (which win over the cluster's).
#[derive(Clone, Debug, Default)]
pub struct ParamCheck {
    pub bin_dir: PathBuf,
    pub run_as: Option<String>,
    pub file_parameters: BTreeMap<String, String>,
}

/// A member's answer: `(parameter, message)` for each problem.
type Problems = Vec<(String, String)>;

/// This member could not judge the parameters at all (the server's binary
/// could not run, say): unlike a problem found, a reason to retry.
#[derive(Debug, thiserror::Error)]
#[error("the parameter check could not run: {source}")]
pub struct ParamCheckError {
    #[from]
    source: mainstay_pg::Error,
}

impl ParamCheck {
    /// What this node would write for `config`.
    pub fn effective(&self, config: &DynamicConfig) -> BTreeMap<String, String> {
        let mut parameters = config.parameter_texts();
        parameters.extend(self.file_parameters.clone());
        parameters
    }

    /// What this node's server would refuse in `config`: in what it would
    /// write, and in the cluster's values on their own (this node's file may
    /// override a bad one, a node added later may not).
    pub async fn problems(&self, config: &DynamicConfig) -> Result<Problems, ParamCheckError> {
        let mut problems = Problems::new();
        for parameters in [config.parameter_texts(), self.effective(config)] {
            let found =
                mainstay_pg::check_parameters(&self.bin_dir, self.run_as.as_deref(), &parameters)
                    .await?;
            for problem in found {
                let problem = (problem.parameter, problem.message);
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
        }
        Ok(problems)
    }
}

/// `POST /config/check`: this member's verdict on a whole dynamic
/// configuration document. Changes nothing.
pub async fn check_here<D: Dcs>(
    State(state): Shared<D>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let document: Value = match accept(&state.auth, &headers, &body) {
        Ok(document) => document,
        Err(refused) => return refused.into_response(),
    };
    let config = match DynamicConfig::from_json(&document) {
        Ok(config) => config,
        Err(problem) => {
            return Refusal::new(StatusCode::BAD_REQUEST, format!("refused: {problem}"))
                .into_response();
        }
    };
    match state.params.problems(&config).await {
        Ok(problems) => axum::Json(json!({
            "member": state.node().name,
            "problems": problems
                .iter()
                .map(|(parameter, message)| json!({"parameter": parameter, "message": message}))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(err) => Refusal::new(StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    }
}

/// Every member checks `new` (this node locally, the others over their
/// API, concurrently); refused if any member finds a problem or cannot
/// answer, since its verdict is what matters.
pub async fn check_everywhere<D: Dcs>(
    state: &ApiState<D>,
    document: &Value,
    new: &DynamicConfig,
) -> Result<(), Refusal> {
    let view = current_view(state).await?;
    let me = state.node().name.clone();
    let timeout = Duration::from_secs(15);
    let peers: Vec<_> = view
        .members
        .values()
        .map(|m| &m.status)
        // A witness runs no PostgreSQL: nothing to check there.
        .filter(|s| s.name != me && !s.witness)
        .map(|status| {
            let client = state
                .auth
                .peer_client(&status.api_url, timeout, &state.ca_file);
            let (name, document) = (status.name.clone(), document.clone());
            tokio::spawn(async move {
                let answer = client
                    .request(hyper::Method::POST, "/config/check", Some(&document))
                    .await;
                (name, answer)
            })
        })
        .collect();
    let mut found: Vec<String> = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    match state.params.problems(new).await {
        Ok(problems) => found.extend(describe(&me, &problems)),
        Err(reason) => unreachable.push(format!("{me}: {reason}")),
    }
    for peer in peers {
        let Ok((name, answer)) = peer.await else {
            continue;
        };
        match answer {
            Ok(answer) if answer.status.is_success() => {
                let problems: Problems = answer.body["problems"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        let text = |key: &str| p[key].as_str().unwrap_or_default().to_string();
                        (text("parameter"), text("message"))
                    })
                    .collect();
                found.extend(describe(&name, &problems));
            }
            Ok(answer) => unreachable.push(format!("{name}: {} {}", answer.status, answer.text)),
            Err(err) => unreachable.push(format!("{name}: {err}")),
        }
    }
    if !found.is_empty() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "refused: PostgreSQL would not accept these parameters: {}; fix or remove \
                 them (nothing was stored)",
                found.join("; ")
            ),
        ));
    }
    if !unreachable.is_empty() {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "refused: the parameters could not be checked on every member ({}); bring \
                 the member's agent back, or remove a member that is gone for good \
                 (DELETE /members/NAME), then retry (nothing was stored)",
                unreachable.join("; ")
            ),
        ));
    }
    Ok(())
}

fn describe(member: &str, problems: &Problems) -> Vec<String> {
    problems
        .iter()
        .map(|(parameter, message)| {
            if parameter.is_empty() {
                format!("on {member}: {message}")
            } else {
                format!("postgresql.parameters.{parameter} on {member}: {message}")
            }
        })
        .collect()
}
