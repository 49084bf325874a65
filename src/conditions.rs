//! Status conditions as Kubernetes users expect them: keyed by `type`, with reason, message,
//! `observedGeneration`, and a `lastTransitionTime` that changes only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>, generation: Option<i64>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// The new conditions, each keeping its previous `lastTransitionTime` when its status did not change.
pub fn merge(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for c in &mut next {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// An event a status change is worth (`kubectl describe` shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// The events a status change is worth, so `kubectl describe` tells what happened and when: a
/// warning when Degraded turns true (or its reason changes), a normal event when Ready turns
/// true, and a warning when Ready turns false from true with nothing degraded (a replica lost,
/// say). Any other change, and any re-check that changes neither status nor reason, is worth none.
pub fn transitions(previous: &[Condition], next: &[Condition]) -> Vec<Transition> {
    let find = |conditions: &[Condition], type_: &str| conditions.iter().find(|c| c.type_ == type_).cloned();
    let changed = |type_: &str| {
        let new = find(next, type_)?;
        find(previous, type_).is_none_or(|old| old.status != new.status || old.reason != new.reason).then_some(new)
    };
    let event = |warning, c: Condition| Transition { warning, reason: c.reason, note: c.message };
    let mut events = Vec::new();
    if let Some(degraded) = changed("Degraded").filter(|c| c.status == "True") {
        events.push(event(true, degraded));
    }
    if let Some(ready) = changed("Ready") {
        let was_ready = find(previous, "Ready").is_some_and(|c| c.status == "True");
        if ready.status == "True" {
            events.push(event(false, ready));
        } else if was_ready && !is_true(next, "Degraded") {
            events.push(event(true, ready));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_changes_only_on_a_real_transition() {
        let mut old = new("Ready", true, "A", "m", Some(1));
        old.last_transition_time = Time("2020-01-01T00:00:00Z".parse().unwrap());
        let kept = merge(std::slice::from_ref(&old), vec![new("Ready", true, "B", "other message", Some(2))]);
        assert_eq!(kept[0].last_transition_time, old.last_transition_time);
        assert_eq!((kept[0].reason.as_str(), kept[0].observed_generation), ("B", Some(2)));
        let flipped = merge(std::slice::from_ref(&old), vec![new("Ready", false, "B", "m", Some(2))]);
        assert_ne!(flipped[0].last_transition_time, old.last_transition_time);
        let fresh = merge(&[], vec![new("Degraded", false, "C", "m", None)]);
        assert!(!is_true(&fresh, "Degraded"));
        assert!(is_true(&kept, "Ready"));
    }

    #[test]
    fn events_only_for_transitions_worth_telling() {
        let ready = |ok, reason| new("Ready", ok, reason, format!("ready says {reason}"), None);
        let degraded = |bad, reason| new("Degraded", bad, reason, format!("degraded says {reason}"), None);
        let tell = |warning, reason: &str| Transition { warning, reason: reason.into(), note: if warning && reason != "ReplicasNotReady" { format!("degraded says {reason}") } else { format!("ready says {reason}") } };

        // Created and still starting: nothing to tell yet.
        let starting = vec![ready(false, "ReplicasNotReady"), degraded(false, "AsExpected")];
        assert_eq!(transitions(&[], &starting), []);
        // Ready: one normal event; the same status again (a resync, a re-check): none.
        let up = vec![ready(true, "ProxyReady"), degraded(false, "AsExpected")];
        assert_eq!(transitions(&starting, &up), [tell(false, "ProxyReady")]);
        assert_eq!(transitions(&up, &up), []);
        // A replica lost with nothing degraded: a warning from Ready.
        assert_eq!(transitions(&up, &starting), [tell(true, "ReplicasNotReady")]);
        // Degraded: one warning with its own reason, not a second one from Ready.
        let stuck = vec![ready(false, "ReplicasNotReady"), degraded(true, "Unschedulable")];
        assert_eq!(transitions(&up, &stuck), [tell(true, "Unschedulable")]);
        assert_eq!(transitions(&starting, &stuck), [tell(true, "Unschedulable")]);
        assert_eq!(transitions(&stuck, &stuck), []);
        // A new reason while degraded is a new warning; recovering is told by Ready.
        let pulling = vec![ready(false, "ReplicasNotReady"), degraded(true, "ImagePullBackOff")];
        assert_eq!(transitions(&stuck, &pulling), [tell(true, "ImagePullBackOff")]);
        assert_eq!(transitions(&pulling, &up), [tell(false, "ProxyReady")]);
        assert_eq!(transitions(&pulling, &starting), []);
    }
}
