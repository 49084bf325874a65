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
}
