//! An operator restart loses nothing: status is recomputed from the cluster, changes made
//! while it was down are applied, and no object is duplicated or regenerated.
mod common;

use std::time::Duration;

use common::refusal::*;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use spice_operator::crd::{ClusterConsolePolicy, SpiceProxy};

const T: Duration = Duration::from_secs(30);

/// Each test runs its own cluster-wide operator; two at once would both act on every SpiceProxy.
static ONE_OPERATOR_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An admin client, a throwaway namespace and, in it, the SpiceProxy `edge`.
async fn edge_proxy(prefix: &str) -> (kube::Client, TestNamespace, Api<SpiceProxy>) {
    let client = client().await;
    let ns = TestNamespace::new(&client, prefix).await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let p = spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: edge.example.com}}\n  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900}}]}}]\n",
        ns.name
    ));
    api.create(&PostParams::default(), &p).await.unwrap();
    (client, ns, api)
}

#[tokio::test]
async fn restart_recomputes_status_and_duplicates_nothing() {
    let _one = ONE_OPERATOR_AT_A_TIME.lock().await;
    let (client, ns, spx_api) = edge_proxy("restart").await;
    let op = Operator::start();
    let policy_name = format!("{}-policy", ns.name);
    let policy: ClusterConsolePolicy = serde_yaml::from_str(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {policy_name}}}\nspec:\n  clusters: [{{name: c, proxy: {{spiceProxyRef: {{name: edge, namespace: {}}}}}, pools: [{{name: a}}]}}]\n",
        ns.name
    ))
    .unwrap();
    let ccp_api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    ccp_api.create(&PostParams::default(), &policy).await.unwrap();
    wait_for(&ccp_api, &policy_name, T, |c| c.status.as_ref().filter(|s| is_ready(&s.conditions)).map(|_| ())).await;

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let deploy_uid = deploys.get("edge").await.unwrap().uid();
    let secret_before = secrets.get("edge-keys").await.unwrap();
    let svc_uid = Api::<Service>::namespaced(client.clone(), &ns.name).get("edge").await.unwrap().uid();
    op.stop();

    // While the operator is down: the spec changes, status is wiped, a child disappears.
    spx_api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    spx_api.patch_status("edge", &PatchParams::default(), &Patch::Merge(json!({"status": null}))).await.unwrap();
    cms.delete("edge-config", &DeleteParams::default()).await.unwrap();
    ccp_api
        .patch(&policy_name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"clusters": [{"name": "c", "proxy": {"spiceProxyRef": {"name": "edge", "namespace": ns.name}}, "pools": [{"name": "a"}, {"name": "b"}]}]}})))
        .await
        .unwrap();
    ccp_api.patch_status(&policy_name, &PatchParams::default(), &Patch::Merge(json!({"status": null}))).await.unwrap();

    let op = Operator::start();
    let st = wait_for(&spx_api, "edge", T, |s| {
        s.status.clone().filter(|st| is_ready(&st.conditions) && st.observed_generation == Some(2) && st.ready_replicas == 3)
    })
    .await;
    assert_eq!(st.proxy_url.as_deref(), Some("http://edge.example.com:3128"));
    wait_for(&cms, "edge-config", T, |_| Some(())).await;
    let cst = wait_for(&ccp_api, &policy_name, T, |c| c.status.clone().filter(|s| s.observed_generation == Some(2) && is_ready(&s.conditions))).await;
    assert_eq!(cst.pools.len(), 2);
    assert!(cst.pools.iter().all(|p| p.proxy_url.as_deref() == Some("http://edge.example.com:3128")));

    // Same objects, not new ones; the signing key survived so issued tickets stay valid.
    let selector = ListParams::default().labels("app.kubernetes.io/instance=edge");
    assert_eq!(deploys.list(&selector).await.unwrap().items.len(), 1);
    assert_eq!(deploys.get("edge").await.unwrap().uid(), deploy_uid);
    assert_eq!(Api::<Service>::namespaced(client.clone(), &ns.name).list(&selector).await.unwrap().items.len(), 1);
    assert_eq!(Api::<Service>::namespaced(client.clone(), &ns.name).get("edge").await.unwrap().uid(), svc_uid);
    let secret_after = secrets.get("edge-keys").await.unwrap();
    assert_eq!(secret_after.uid(), secret_before.uid());
    assert_eq!(secret_after.data, secret_before.data);
    assert_eq!(secrets.list(&selector).await.unwrap().items.len(), 1);
    op.stop();
    let _ = ccp_api.delete(&policy_name, &DeleteParams::default()).await;
}

/// The operator keeps what it last applied in memory, so that a change the dry run let through
/// but the real apply refused part-way can be put back. After a restart that record is read
/// back from the children (their stamp and managedFields): here the change and the refusal
/// are both waiting when the new operator starts, so its very first apply is refused.
#[tokio::test]
async fn a_change_refused_part_way_is_put_back_after_a_restart() {
    let _one = ONE_OPERATOR_AT_A_TIME.lock().await;
    let (client, ns, api) = edge_proxy("restart-putback").await;
    let op = Operator::start();
    let url = wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).and_then(|st| st.proxy_url.clone())).await;
    op.stop();

    let before = children_of(&client, &ns.name, "edge").await;
    let policy = refuse_annotated_services_outside_dry_runs(&client, &ns.name).await;
    let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(refused_change())).await.unwrap().metadata.generation.unwrap();
    let op = Operator::start();
    assert_put_back_then_applied(&client, &api, policy, generation, &before, &url).await;
    op.stop();
}
