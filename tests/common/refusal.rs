//! Refused changes: what the children look like, an admission policy that refuses, and the
//! put-back scenario that tests/spiceproxy.rs runs with one operator throughout and
//! tests/restart.rs across a restart.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{DeleteParams, PostParams};
use kube::Api;
use serde_json::{Value, json};
use spice_operator::crd::SpiceProxy;
use spice_operator::proxy::config::ProxyConfig;

use super::{is_ready, wait_for};

const T: Duration = Duration::from_secs(30);

pub fn config_of(cm: &ConfigMap) -> ProxyConfig {
    serde_json::from_str(&cm.data.as_ref().unwrap()["config.json"]).unwrap()
}

/// What a refused change must leave alone: every child as it was, not a Deployment rolled to a
/// configuration its Service never got (the operator rehearses a changed apply with a dry run).
#[derive(Debug)]
pub struct Children {
    pub deployment_generation: i64,
    pub annotations: std::collections::BTreeMap<String, String>,
    pub max_tunnels: i32,
    pub service: k8s_openapi::api::core::v1::ServiceSpec,
}

pub async fn children_of(client: &kube::Client, ns: &str, name: &str) -> Children {
    let d = Api::<Deployment>::namespaced(client.clone(), ns).get(name).await.unwrap();
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get(&format!("{name}-config")).await.unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), ns).get(name).await.unwrap();
    Children {
        deployment_generation: d.metadata.generation.unwrap(),
        annotations: d.spec.template.metadata.unwrap().annotations.unwrap_or_default(),
        max_tunnels: config_of(&cm).limits.max_tunnels,
        service: svc.spec.unwrap(),
    }
}

/// A ValidatingAdmissionPolicy bound to one test namespace: what a policy engine does, but
/// evaluated by the API server itself, so no webhook server is needed. Cluster-wide, so each
/// test removes its own.
pub struct AdmissionPolicy {
    name: String,
    client: kube::Client,
}

impl AdmissionPolicy {
    pub async fn install(client: &kube::Client, ns: &str, api_group: &str, resource: &str, expression: &str, message: &str) -> Self {
        let name = format!("{ns}-{resource}");
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": [api_group], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"], "resources": [resource]}]},
                "validations": [{"expression": expression, "message": message}]
            }
        }))
        .unwrap();
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
            }
        }))
        .unwrap();
        Api::<ValidatingAdmissionPolicy>::all(client.clone()).create(&PostParams::default(), &policy).await.unwrap();
        Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()).create(&PostParams::default(), &binding).await.unwrap();
        Self { name, client: client.clone() }
    }

    pub async fn remove(self) {
        Api::<ValidatingAdmissionPolicyBinding>::all(self.client.clone()).delete(&self.name, &DeleteParams::default()).await.unwrap();
        Api::<ValidatingAdmissionPolicy>::all(self.client).delete(&self.name, &DeleteParams::default()).await.unwrap();
    }
}

/// Refuses, for real but never in a dry run, any Service of namespace `ns` annotated
/// `example.com/refuse`: a refusal the operator's rehearsal cannot foresee, as a node port
/// taken between the two. Returns once the API server enforces it.
pub async fn refuse_annotated_services_outside_dry_runs(client: &kube::Client, ns: &str) -> AdmissionPolicy {
    let expression = "request.dryRun || !has(object.metadata.annotations) || !('example.com/refuse' in object.metadata.annotations)";
    let policy = AdmissionPolicy::install(client, ns, "", "services", expression, "refused outside dry runs").await;
    // Wait until the policy refuses a real create (a throwaway Service, deleted if let through).
    let svcs = Api::<Service>::namespaced(client.clone(), ns);
    let probe: Service = serde_json::from_value(json!({
        "metadata": {"name": "probe", "annotations": {"example.com/refuse": "yes"}},
        "spec": {"ports": [{"port": 1}]}
    }))
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        match svcs.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(e)) if e.message.contains("refused outside dry runs") => return policy,
            Ok(_) => {
                svcs.delete("probe", &DeleteParams::default()).await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
        assert!(std::time::Instant::now() < deadline, "the admission policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A change of the ConfigMap, the pod template and the Service (applied in that order), the
/// last one refused by `refuse_annotated_services_outside_dry_runs`.
pub fn refused_change() -> Value {
    json!({"spec": {
        "podAnnotations": {"example.com/new": "on"},
        "limits": {"maxTunnels": 77},
        "service": {"annotations": {"example.com/refuse": "yes"}}
    }})
}

/// SpiceProxy `edge` at `generation`, which holds `refused_change`: the objects already changed
/// are put back as `before`, the URL published stays, nothing is tried again before the retry,
/// and once `policy` is removed the whole change is applied.
pub async fn assert_put_back_then_applied(client: &kube::Client, api: &Api<SpiceProxy>, policy: AdmissionPolicy, generation: i64, before: &Children, url: &str) {
    let ns = api.namespace().unwrap().to_string();
    let st = wait_for(api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && !is_ready(&st.conditions))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "ApplyFailed", "{ready:?}");
    assert!(ready.message.contains("refused outside dry runs") && ready.message.contains("put back as they were"), "{}", ready.message);
    assert_eq!(st.proxy_url.as_deref(), Some(url), "the URL published stays");
    let after = children_of(client, &ns, "edge").await;
    assert_eq!(after.max_tunnels, before.max_tunnels, "the ConfigMap is as it was");
    assert_eq!(after.annotations, before.annotations, "the pod template is as it was");
    assert!(after.deployment_generation > before.deployment_generation, "the Deployment did take the change before the Service was refused");
    assert_eq!(after.service, before.service, "the Service is as it was");
    // Putting back changes the Deployment, whose watch event triggers a reconcile at once: that
    // one must not try the change again (the Deployment would flip between the two versions).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = children_of(client, &ns, "edge").await;
    assert_eq!((later.deployment_generation, later.max_tunnels), (after.deployment_generation, after.max_tunnels), "nothing tried again before the retry");

    // With the policy gone, the retry applies the whole change.
    policy.remove().await;
    wait_for(api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_ready(&st.conditions))).await;
    let applied = children_of(client, &ns, "edge").await;
    assert_eq!(applied.max_tunnels, 77);
    assert_eq!(applied.annotations.get("example.com/new").map(String::as_str), Some("on"));
}
