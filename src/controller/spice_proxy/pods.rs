//! What holds a proxy's pods up, read from the pods themselves, for the status to say.
use super::*;

/// Pods read per diagnosis: a proxy has at most 100 replicas plus one surge.
pub(super) const PODS_READ: u32 = 128;

/// Reads the proxy's pods (list only: no watch, no cache) and says what holds them up.
pub(super) async fn diagnose(client: &kube::Client, ns: &str, name: &str) -> PodDiagnosis {
    let selector = labels::proxy_selector_string(name);
    match Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default().labels(&selector).limit(PODS_READ)).await {
        Ok(pods) => diagnose_pods(&pods.items),
        Err(kube::Error::Api(e)) => PodDiagnosis::Unreadable(format!("{} {}: {}", e.code, e.reason, e.message)),
        Err(e) => PodDiagnosis::Unreadable(e.to_string()),
    }
}

/// Why replicas are not ready, as the scheduler or the kubelet put it on their pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDiagnosis {
    /// Nothing wrong with the pods (starting, or ready).
    NothingWrong,
    /// The first pod (by name) with a problem, and how many others have one.
    Problem { pod: String, reason: String, message: String, others: usize },
    /// The pods could not be listed, e.g. without the rule to list pods.
    Unreadable(String),
}

/// Longest scheduler or kubelet message repeated in a condition.
pub(super) const POD_MESSAGE_MAX: usize = 400;

pub fn diagnose_pods(pods: &[Pod]) -> PodDiagnosis {
    let mut found: Vec<(String, String, String)> =
        pods.iter().filter_map(|p| pod_problem(p).map(|(reason, message)| (p.name_any(), reason, message))).collect();
    found.sort();
    let others = found.len().saturating_sub(1);
    match found.into_iter().next() {
        Some((pod, reason, message)) => PodDiagnosis::Problem { pod, reason, message, others },
        None => PodDiagnosis::NothingWrong,
    }
}

/// A pod's problem: unschedulable, or a container the kubelet cannot start (image pull,
/// crash loop, missing config). States every pod passes through while starting are none.
pub(super) fn pod_problem(pod: &Pod) -> Option<(String, String)> {
    const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False") {
        return Some((condition_reason(c.reason.as_deref(), "Unschedulable"), clip(c.message.as_deref().unwrap_or("not scheduled"))));
    }
    let containers = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    containers.into_iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.clone().filter(|r| !STARTING.contains(&r.as_str()))?;
        // The proxy writes the error that ended it as its termination message: quote its first line.
        let last_exit = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| {
            let said = t.message.as_deref().and_then(|m| m.lines().map(str::trim).find(|l| !l.is_empty()));
            format!(" (last exit code {}{})", t.exit_code, said.map(|m| format!(": {m}")).unwrap_or_default())
        });
        let last_exit = last_exit.unwrap_or_default();
        let message = format!("container {}: {}{last_exit}", c.name, waiting.message.as_deref().unwrap_or(&reason));
        Some((condition_reason(Some(&reason), "ContainerNotStarting"), clip(&message)))
    })
}

/// A reason as a condition's schema accepts it (a letter, then letters, digits and '_').
pub(super) fn condition_reason(reason: Option<&str>, fallback: &str) -> String {
    match reason {
        Some(r) if r.starts_with(|c: char| c.is_ascii_alphabetic()) && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => r.to_string(),
        _ => fallback.to_string(),
    }
}

pub(super) fn clip(message: &str) -> String {
    match message.char_indices().nth(POD_MESSAGE_MAX) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

impl PodDiagnosis {
    /// What the conditions say about the pods, after "n/m replicas ready".
    pub(super) fn detail(&self) -> String {
        match self {
            PodDiagnosis::NothingWrong => String::new(),
            PodDiagnosis::Problem { pod, reason, message, others } => {
                let more = match others {
                    0 => String::new(),
                    1 => " (1 more pod has a problem)".into(),
                    n => format!(" ({n} more pods have a problem)"),
                };
                format!("; pod {pod}: {reason}: {message}{more}")
            }
            PodDiagnosis::Unreadable(why) => format!(" (cannot list its pods to say why: {why})"),
        }
    }
}
