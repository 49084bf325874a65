//! The chart's ClusterRole is needed rule by rule: an operator whose ServiceAccount lacks one
//! rule fails the matching scenario with a Forbidden condition that names the resource, or, for a
//! watch, counts the failing watch by kind on /metrics. Pods are only read to say why replicas
//! are not ready: without that rule the Ready condition says the pods could not be listed. Events
//! are told, never needed: without that rule the proxy still becomes ready and /metrics counts
//! the refused events. Without the SpiceProxies' rule the engine API answers 503 naming the
//! forbidden watch.
//! (That it is sufficient is shown by every other integration test, which runs the operator
//! with a token of the chart's own ServiceAccount.)
//!
//! One test, cases in sequence: each case runs its own cluster-wide operator.
mod common;

use std::time::{Duration, Instant};

use common::engine_api::*;
use common::*;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spice_operator::crd::SpiceProxy;

/// The ClusterRole `helm install` made in hack/test.sh.
const CHART_CLUSTER_ROLE: &str = "spice-operator";

struct Case {
    /// The rule removed: the first rule whose resources include this one.
    resource: &'static str,
    service: &'static str,
    external_address: bool,
    /// Also create a proxy 15 s after the operator started and expect it handled at once:
    /// the operator watches this resource, and a watch it may not make must delay nothing else.
    late: bool,
    /// The kind the operator watches with this rule, whose failing watch the metrics count.
    watched: Option<&'static str>,
}

#[tokio::test]
async fn every_cluster_role_rule_is_needed_and_its_absence_is_reported_as_forbidden() {
    let client = client().await;
    let chart_role = Api::<ClusterRole>::all(client.clone())
        .get(CHART_CLUSTER_ROLE)
        .await
        .expect("the chart's ClusterRole (make test installs the chart)");
    let cases = [
        Case { resource: "secrets", service: "ClusterIP", external_address: true, late: false, watched: None },
        Case { resource: "configmaps", service: "ClusterIP", external_address: true, late: true, watched: Some("ConfigMap") },
        Case { resource: "deployments", service: "ClusterIP", external_address: true, late: false, watched: Some("Deployment") },
        Case { resource: "poddisruptionbudgets", service: "ClusterIP", external_address: true, late: false, watched: Some("PodDisruptionBudget") },
        Case { resource: "networkpolicies", service: "ClusterIP", external_address: true, late: false, watched: Some("NetworkPolicy") },
        // Only a NodePort proxy without externalAddress reads nodes, to publish a node's address.
        Case { resource: "nodes", service: "NodePort", external_address: false, late: false, watched: None },
    ];
    for case in cases {
        let (ns, op, spx_api) = operator_without(&client, &chart_role, case.resource).await;
        let started = Instant::now();
        let external = if case.external_address { "  externalAddress: {host: edge.example.com}\n" } else { "" };
        let create = |name: &str| {
            spx(&format!(
                "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  service: {{type: {}}}\n{external}  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900}}]}}]\n",
                ns.name, case.service
            ))
        };
        let forbidden = |s: &SpiceProxy| s.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready" && c.reason == "Forbidden").cloned();
        spx_api.create(&PostParams::default(), &create("edge")).await.unwrap();
        let ready = wait_for(&spx_api, "edge", Duration::from_secs(30), forbidden).await;
        assert_eq!(ready.status, "False");
        assert!(ready.message.contains(case.resource) && ready.message.contains("forbidden"), "{}: {}", case.resource, ready.message);
        let st = spx_api.get("edge").await.unwrap().status.unwrap();
        assert_eq!(st.proxy_url, None, "no URL is published while the proxy cannot be set up");
        if let Some(kind) = case.watched {
            let failures = counter(&op, &watch_failures_series(kind));
            assert!(failures.is_some_and(|n| n > 0), "watch failures of {kind} on /metrics: {failures:?}");
        }
        if case.late {
            // kube-runtime backs off all of a controller's triggers together when any one fails,
            // growing to 30 s: a SpiceProxy created 15 s in waited about 10 s to be seen.
            tokio::time::sleep(Duration::from_secs(15).saturating_sub(started.elapsed())).await;
            spx_api.create(&PostParams::default(), &create("late")).await.unwrap();
            let late = wait_for(&spx_api, "late", Duration::from_secs(4), forbidden).await;
            assert!(late.message.contains(case.resource), "late: {}", late.message);
        }
        op.stop();
        cleanup(&client, &ns.name).await;
    }

    // Without the policies' watch no policy resolves, and /metrics says which watch fails.
    let (ns, op, _) = operator_without(&client, &chart_role, "clusterconsolepolicies").await;
    wait_counted(&op, &watch_failures_series("ClusterConsolePolicy")).await;
    op.stop();
    cleanup(&client, &ns.name).await;

    // Without the SpiceProxies' rule the engine API's caches cannot fill: a console request
    // gets a 503 naming the forbidden watch (not "retry in a few seconds"), and once the first
    // 10 s after start are over, at once rather than after a wait of its own; /readyz says so.
    let ns = TestNamespace::new(&client, "rbac-no-spiceproxies").await;
    let kubeconfig = account_without(&client, &chart_role, "spiceproxies", &ns.name).await;
    let api = EngineApi::start_with(&client, &kubeconfig, &["--leader-election=false"]).await;
    let token = service_account_token(&client, &ns.name, "engine", true).await;
    let request = json!({"policy": "any", "cluster": "prod", "vm": "vm1", "host": "10.0.0.5", "port": 5900});
    let first = api.console(&token, &request);
    assert_eq!(first.status, 503, "{}", first.body);
    assert!(first.body.contains("cannot read SpiceProxies") && first.body.contains("forbidden"), "{}", first.body);
    let asked = Instant::now();
    let again = api.console(&token, &request);
    assert!(again.status == 503 && again.body.contains("cannot read SpiceProxies"), "{}", again.body);
    assert!(asked.elapsed() < Duration::from_secs(3), "the second request waited {:?}", asked.elapsed());
    api.assert_metrics_count_every_answer();
    // Nor is the replica ready: a Service sends engines only to replicas that can answer them.
    let readyz = http_get(api.operator.admin_port, "/readyz").unwrap_or_default();
    assert!(readyz.contains("the engine API cannot read SpiceProxies"), "/readyz: {readyz}");
    drop(api);
    let _ = Api::<ClusterRoleBinding>::all(client.clone()).delete(&format!("{}-engine", ns.name), &DeleteParams::default()).await;
    cleanup(&client, &ns.name).await;

    // Without the pods rule a proxy whose pods cannot be scheduled is still handled, and its
    // Ready condition says why it cannot tell more.
    let (ns, op, spx_api) = operator_without(&client, &chart_role, "pods").await;
    spx_api.create(&PostParams::default(), &proxy(&ns.name, "  nodeSelector: {spice-operator-test/pool: nowhere}\n")).await.unwrap();
    let unreadable = |s: &SpiceProxy| s.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready" && c.message.contains("cannot list its pods")).cloned();
    let ready = wait_for(&spx_api, "edge", Duration::from_secs(30), unreadable).await;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ReplicasNotReady"));
    assert!(ready.message.contains("pods") && ready.message.contains("forbidden"), "{}", ready.message);
    wait_counted(&op, &watch_failures_series("Pod")).await;
    op.stop();
    cleanup(&client, &ns.name).await;

    // Without the events rule the proxy still becomes ready; /metrics counts the refused events.
    let (ns, op, spx_api) = operator_without(&client, &chart_role, "events").await;
    spx_api.create(&PostParams::default(), &proxy(&ns.name, "")).await.unwrap();
    wait_for(&spx_api, "edge", Duration::from_secs(30), |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    wait_counted(&op, "spice_operator_event_failures_total").await;
    op.stop();
    cleanup(&client, &ns.name).await;
}

/// A namespace, an operator whose account lacks the rule for `resource`, and the SpiceProxy API there.
async fn operator_without(client: &Client, chart_role: &ClusterRole, resource: &str) -> (TestNamespace, Operator, Api<SpiceProxy>) {
    let ns = TestNamespace::new(client, &format!("rbac-no-{resource}")).await;
    let kubeconfig = account_without(client, chart_role, resource, &ns.name).await;
    let op = Operator::start_with(Some(kubeconfig));
    let api = Api::namespaced(client.clone(), &ns.name);
    (ns, op, api)
}

/// SpiceProxy `edge` with an external address, plus `extra` lines of spec.
fn proxy(ns: &str, extra: &str) -> SpiceProxy {
    spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {ns}}}\nspec:\n  externalAddress: {{host: edge.example.com}}\n{extra}  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900}}]}}]\n"
    ))
}

/// A counter's series as /metrics shows it, labels included; None while absent.
fn counter(op: &Operator, series: &str) -> Option<u64> {
    op.metrics.encode().lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn watch_failures_series(kind: &str) -> String {
    format!("spice_operator_watch_failures_total{{kind=\"{kind}\"}}")
}

/// Waits up to 10 s for the series to count something.
async fn wait_counted(op: &Operator, series: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(op, series).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "nothing counted in {series} on /metrics within 10 s:\n{}", op.metrics.encode());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ServiceAccount bound to the chart's ClusterRole minus the rule covering `resource`;
/// returns a kubeconfig with its token.
async fn account_without(client: &Client, chart_role: &ClusterRole, resource: &str, ns: &str) -> std::path::PathBuf {
    let mut role = chart_role.clone();
    let rules = role.rules.as_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| !r.resources.iter().flatten().any(|x| x == resource));
    assert_eq!(rules.len(), before - 1, "the chart has exactly one rule for {resource}");
    let name = format!("{ns}-operator");
    role.metadata = serde_json::from_value(json!({"name": name, "labels": {"spice-operator-test": "true"}})).unwrap();
    Api::<ClusterRole>::all(client.clone()).create(&PostParams::default(), &role).await.unwrap();
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "operator", "namespace": ns}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &sa).await.unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"spice-operator-test": "true"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/sa-kubeconfig.sh")).args([ns, "operator", "1h"]).output().unwrap();
    assert!(out.status.success(), "sa-kubeconfig.sh: {}", String::from_utf8_lossy(&out.stderr));
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}.kubeconfig"));
    std::fs::write(&path, out.stdout).unwrap();
    path
}

async fn cleanup(client: &Client, ns: &str) {
    let name = format!("{ns}-operator");
    let _ = Api::<ClusterRoleBinding>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
    let _ = Api::<ClusterRole>::all(client.clone()).delete(&name, &DeleteParams::default()).await;
}
