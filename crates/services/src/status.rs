//! What the supervisor reports of each service, for the REST API, `ctl`
//! and the metrics.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Not placed on this node now (or not started yet).
    Stopped,
    /// Placed here, waiting for the services it depends on.
    Waiting,
    /// Started, its checks not passed yet.
    Starting,
    /// Running and healthy.
    Running,
    /// Failed; restarts at `retry_at`.
    BackingOff,
    /// Failed more often than its restart limit allows; stays down until
    /// its placement changes or an operator restarts it.
    Failed,
    /// Being stopped (signal, grace, kill).
    Stopping,
}

impl ServiceState {
    /// As the JSON documents and member keys write it.
    pub fn label(self) -> &'static str {
        match self {
            ServiceState::Stopped => "stopped",
            ServiceState::Waiting => "waiting",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::BackingOff => "backing_off",
            ServiceState::Failed => "failed",
            ServiceState::Stopping => "stopping",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub placement: &'static str,
    pub state: ServiceState,
    /// The service's main process while it runs.
    pub pid: Option<i32>,
    /// Restarts after failures since the agent started.
    pub restarts: u64,
    /// Health check failures since the agent started.
    pub check_failures: u64,
    /// The last check's verdict ("ok" or why not), if one ran.
    pub last_check: Option<String>,
    /// Unix time (seconds) the service entered its state.
    pub since: u64,
    /// Why it is backing off or failed, or how its last run ended.
    pub reason: Option<String>,
}

impl ServiceStatus {
    pub fn up(&self) -> bool {
        self.state == ServiceState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_what_serde_writes() {
        for state in [
            ServiceState::Stopped,
            ServiceState::Waiting,
            ServiceState::Starting,
            ServiceState::Running,
            ServiceState::BackingOff,
            ServiceState::Failed,
            ServiceState::Stopping,
        ] {
            let written = serde_json::to_value(state).unwrap();
            assert_eq!(written, state.label());
        }
    }
}
