//! Rotation of a SpiceProxy's ticket key in two steps, so that no replica refuses a ticket:
//! first a new key is staged as `next` (replicas accept it, nothing signs with it yet), and once
//! every replica has it (kubelet refreshes a mounted Secret within about a minute) it becomes
//! `current` and the old one `previous`. Signing with a new key at once would let the engine
//! issue tickets that replicas still holding the old files refuse.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::controller::spice_proxy::key_secret_name;
use crate::proxy::ticket::{CURRENT_KEY, NEXT_KEY, PREVIOUS_KEY};

/// Annotations on the key Secret: when a key was staged, and when the last one was promoted.
pub const STAGED_AT: &str = "console.spice-operator.io/key-staged-at";
pub const ROTATED_AT: &str = "console.spice-operator.io/key-rotated-at";
/// Field manager of `rotate-key`'s writes to the key Secret.
pub const ROTATION_MANAGER: &str = "spice-operator-rotate-key";

/// The longest a ticket the engine issues lives (the key a promotion retires must have signed
/// nothing for that long).
pub const TICKET_LIFETIME_MAX: Duration = Duration::from_secs(crate::engine::MAX_TICKET_TTL);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Add a new key as `next`.
    Stage,
    /// `next` becomes `current`, `current` becomes `previous`.
    Promote,
    /// Not yet: the sentence says why and for how long.
    Wait(String),
}

/// What the next run does, from the Secret's state. `min_stage` is how long a staged key waits
/// for every replica to load it.
pub fn plan(has_next: bool, staged_at: Option<Timestamp>, rotated_at: Option<Timestamp>, now: Timestamp, min_stage: Duration) -> Plan {
    let since = |t: Timestamp| Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO);
    if !has_next {
        return Plan::Stage;
    }
    // A `next` staged by hand carries no time: treated as loaded long ago.
    if let Some(staged) = staged_at.map(since).filter(|s| *s < min_stage) {
        return Plan::Wait(format!(
            "the new key was staged {} s ago and replicas load it when kubelet refreshes the mounted Secret: run again in {} s (or lower --min-stage-seconds)",
            staged.as_secs(),
            (min_stage - staged).as_secs().max(1)
        ));
    }
    if let Some(rotated) = rotated_at.map(since).filter(|r| *r < TICKET_LIFETIME_MAX) {
        return Plan::Wait(format!(
            "the key this would retire signed tickets until {} s ago, and tickets live up to {} s: run again in {} s",
            rotated.as_secs(),
            TICKET_LIFETIME_MAX.as_secs(),
            (TICKET_LIFETIME_MAX - rotated).as_secs().max(1)
        ));
    }
    Plan::Promote
}

/// Runs the next step on SpiceProxy `ns/name`'s key Secret and says what it did. The change is
/// conditional on the Secret's resourceVersion, so two rotations at once cannot lose a key.
pub async fn rotate(client: Client, ns: &str, name: &str, min_stage: Duration) -> anyhow::Result<String> {
    let secret_name = key_secret_name(name);
    let api: Api<Secret> = Api::namespaced(client, ns);
    let secret = api
        .get_opt(&secret_name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no key Secret {ns}/{secret_name}: does SpiceProxy {ns}/{name} exist, and has the operator reconciled it?"))?;
    let data: BTreeMap<String, Vec<u8>> = secret.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let current = data.get(CURRENT_KEY).filter(|k| !k.is_empty()).ok_or_else(|| anyhow::anyhow!("Secret {ns}/{secret_name} has no {CURRENT_KEY} key"))?;
    let annotation = |key: &str| secret.metadata.annotations.as_ref()?.get(key)?.parse::<Timestamp>().ok();
    let next = data.get(NEXT_KEY).filter(|k| !k.is_empty());
    let now = Timestamp::now();
    let resource_version = secret.metadata.resource_version.clone();
    let (patch, done) = match plan(next.is_some(), annotation(STAGED_AT), annotation(ROTATED_AT), now, min_stage) {
        Plan::Wait(why) => anyhow::bail!("not rotating {ns}/{secret_name} yet: {why}"),
        Plan::Stage => {
            let key: [u8; 32] = rand::random();
            (
                json!({"metadata": {"resourceVersion": resource_version, "annotations": {STAGED_AT: now.to_string()}}, "data": {NEXT_KEY: B64.encode(key)}}),
                format!(
                    "staged a new ticket key in Secret {ns}/{secret_name}: replicas accept it once kubelet refreshes the mounted Secret; run this again in {} s to sign with it",
                    min_stage.as_secs()
                ),
            )
        }
        Plan::Promote => (
            json!({
                "metadata": {"resourceVersion": resource_version, "annotations": {STAGED_AT: null, ROTATED_AT: now.to_string()}},
                "data": {CURRENT_KEY: B64.encode(next.expect("planned with a next key")), PREVIOUS_KEY: B64.encode(current), NEXT_KEY: null}
            }),
            format!("rotated Secret {ns}/{secret_name}: tickets are now signed with the new key; the old one stays accepted as {PREVIOUS_KEY} until the next rotation"),
        ),
    };
    // Its own field manager, so the Secret's managedFields say a rotation wrote the keys.
    let pp = PatchParams { field_manager: Some(ROTATION_MANAGER.into()), ..Default::default() };
    match api.patch(&secret_name, &pp, &Patch::Merge(patch)).await {
        Ok(_) => Ok(done),
        Err(kube::Error::Api(e)) if e.code == 409 => anyhow::bail!("Secret {ns}/{secret_name} changed while rotating (another rotation at the same time?): run again"),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_wait_for_replicas_then_promote() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let min = Duration::from_secs(120);
        assert_eq!(plan(false, None, None, t(0), min), Plan::Stage);
        assert_eq!(plan(false, None, Some(t(-5)), t(0), min), Plan::Stage, "staging retires nothing");
        let Plan::Wait(why) = plan(true, Some(t(-30)), None, t(0), min) else { panic!() };
        assert_eq!(why, "the new key was staged 30 s ago and replicas load it when kubelet refreshes the mounted Secret: run again in 90 s (or lower --min-stage-seconds)");
        assert_eq!(plan(true, Some(t(-120)), None, t(0), min), Plan::Promote);
        assert_eq!(plan(true, None, None, t(0), min), Plan::Promote, "a next key staged by hand");
        // Promoting twice within a ticket's lifetime would retire a key that signed live tickets.
        let Plan::Wait(why) = plan(true, Some(t(-200)), Some(t(-400)), t(0), min) else { panic!() };
        assert_eq!(why, "the key this would retire signed tickets until 400 s ago, and tickets live up to 600 s: run again in 200 s");
        assert_eq!(plan(true, Some(t(-200)), Some(t(-600)), t(0), min), Plan::Promote);
        assert_eq!(plan(true, Some(t(0)), None, t(0), Duration::ZERO), Plan::Promote, "--min-stage-seconds 0");
    }
}
