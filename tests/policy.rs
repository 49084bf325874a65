//! ClusterConsolePolicy end to end: resolution written into status, propagation of a
//! SpiceProxy change to every pool, admission errors, and per-entry errors.
mod common;

use std::time::{Duration, Instant};

use common::*;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use spice_operator::crd::{ClusterConsolePolicy, Source, SpiceProxy};

const T: Duration = Duration::from_secs(30);

fn proxy(ns: &str, name: &str, host: &str) -> SpiceProxy {
    spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  externalAddress: {{host: {host}}}\n  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900, to: 6923}}]}}]\n"
    ))
}

fn policy(yaml: &str) -> ClusterConsolePolicy {
    serde_yaml::from_str(yaml).expect("test policy YAML")
}

/// Deletes a cluster-scoped test policy however the test ends.
struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl").args(["delete", "clusterconsolepolicy", &self.0, "--wait=false"]).output();
    }
}

#[tokio::test]
async fn policy_resolves_every_level_and_follows_spice_proxy_changes_within_two_seconds() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "ccp-e2e").await;
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    spx_api.create(&PostParams::default(), &proxy(&ns.name, "edge", "edge-1.example.com")).await.unwrap();
    wait_for(&spx_api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;

    let name = format!("{}-policy", ns.name);
    let pools: Vec<String> = (0..20).map(|i| format!("{{name: p{i}}}")).collect();
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {name}}}\nspec:\n  defaultProxy: {{url: global.example}}\n  clusters:\n  - name: prod\n    proxy: {{spiceProxyRef: {{name: edge, namespace: {ns}}}}}\n    pools: [{pools}, {{name: direct-pool, proxy: {{direct: true}}}}, {{name: own, proxy: {{url: 'http://own.example:8080'}}}}]\n  - name: lab\n    pools: [{{name: students}}]\n  vmOptOuts: [{{name: vm-1, cluster: prod, pool: p1}}]\n",
        ns = ns.name,
        pools = pools.join(", ")
    );
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &policy(&yaml)).await.unwrap();

    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| is_ready(&s.conditions))).await;
    assert_eq!((st.unresolved, st.resolved_pools, st.observed_generation), (0, 23, Some(1)));
    let pool = |n: &str| st.pools.iter().find(|p| p.name == n).unwrap().clone();
    let p0 = pool("p0");
    assert_eq!((p0.proxy_url.as_deref(), p0.source, p0.proxy_configured), (Some("http://edge-1.example.com:3128"), Source::Cluster, true));
    let d = pool("direct-pool");
    assert_eq!((d.proxy_url.as_deref(), d.source, d.proxy_configured), (None, Source::Pool, false));
    assert_eq!(pool("own").proxy_url.as_deref(), Some("http://own.example:8080"));
    let s = pool("students");
    assert_eq!((s.proxy_url.as_deref(), s.source), (Some("http://global.example:3128"), Source::Global));
    let vm = &st.vms[0];
    assert_eq!((vm.name.as_str(), vm.proxy_url.as_deref(), vm.source), ("vm-1", None, Source::Vm));

    // The SpiceProxy moves: every pool that inherits it must follow within 2 s.
    let started = Instant::now();
    let moved = json!({"spec": {"externalAddress": {"host": "edge-2.example.com", "port": 8080}}});
    spx_api.patch("edge", &PatchParams::default(), &Patch::Merge(&moved)).await.unwrap();
    let expected = "http://edge-2.example.com:8080";
    loop {
        let p = api.get(&name).await.unwrap();
        let st = p.status.unwrap();
        let following = st.pools.iter().filter(|p| p.cluster.as_deref() == Some("prod") && p.name.starts_with('p')).collect::<Vec<_>>();
        if following.len() == 20 && following.iter().all(|p| p.proxy_url.as_deref() == Some(expected)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "pools did not follow the SpiceProxy within 2 s: {:?}", following.first());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("SpiceProxy URL change reached all 20 pools in {:?}", started.elapsed());

    // Deleting the SpiceProxy makes its entries fail, without falling back to the global default.
    spx_api.delete("edge", &DeleteParams::default()).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.unresolved == 21)).await;
    let p0 = st.pools.iter().find(|p| p.name == "p0").unwrap();
    assert_eq!((p0.proxy_url.as_deref(), p0.source), (None, Source::Cluster));
    assert!(p0.error.as_deref().unwrap().contains("does not exist"), "{:?}", p0.error);
    assert_eq!(st.pools.iter().find(|p| p.name == "students").unwrap().proxy_url.as_deref(), Some("http://global.example:3128"));
}

#[tokio::test]
async fn unknown_reference_is_reported_per_entry_and_others_still_resolve() {
    let operator = shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "ccp-missing").await;
    let name = format!("{}-policy", ns.name);
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {name}}}\nspec:\n  defaultProxy: {{url: 'global.example:3128'}}\n  clusters:\n  - name: c\n    pools:\n    - {{name: ghost, proxy: {{spiceProxyRef: {{name: nope, namespace: {ns}}}}}}}\n    - {{name: fine}}\n",
        ns = ns.name
    );
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &policy(&yaml)).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(1))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "UnresolvedEntries"));
    assert!(ready.message.contains(&format!("pool c/ghost: SpiceProxy {}/nope does not exist", ns.name)), "{}", ready.message);
    let ghost = st.pools.iter().find(|p| p.name == "ghost").unwrap();
    assert_eq!((ghost.proxy_url.as_deref(), ghost.source, ghost.proxy_configured), (None, Source::Pool, false));
    let fine = st.pools.iter().find(|p| p.name == "fine").unwrap();
    assert_eq!(fine.proxy_url.as_deref(), Some("http://global.example:3128"));
    operator.wait_for_metric(&format!("spice_operator_policy_unresolved_entries{{policy=\"{name}\"}} 1")).await;
    // A warning event names the problem (events about cluster-scoped objects live in default).
    let warning = wait_for_event(&client, "default", "ClusterConsolePolicy", &name, "UnresolvedEntries", T).await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.as_deref().unwrap_or_default().contains(&format!("SpiceProxy {}/nope does not exist", ns.name)), "{warning:?}");

    // Creating the missing SpiceProxy resolves the entry without touching the policy.
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    spx_api.create(&PostParams::default(), &proxy(&ns.name, "nope", "found.example.com")).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| is_ready(&s.conditions))).await;
    assert_eq!(st.pools.iter().find(|p| p.name == "ghost").unwrap().proxy_url.as_deref(), Some("http://found.example.com:3128"));
    operator.wait_for_metric(&format!("spice_operator_policy_ready{{policy=\"{name}\"}} 1")).await;
    operator.wait_for_metric(&format!("spice_operator_policy_unresolved_entries{{policy=\"{name}\"}} 0")).await;
    let resolved = wait_for_event(&client, "default", "ClusterConsolePolicy", &name, "Resolved", T).await;
    assert_eq!((resolved.type_.as_deref(), resolved.note.as_deref()), (Some("Normal"), Some("3 entries resolved")), "one cluster and two pools");
}

#[tokio::test]
async fn bad_policies_are_rejected_at_admission_with_the_reason() {
    let client = client().await;
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let cases: &[(&str, &str)] = &[
        ("defaultProxy: {url: 'https://secure.example:3129'}", "SPICE clients ignore an https proxy and connect directly"),
        ("defaultProxy: {url: 'HTTPS://secure.example'}", "connect directly"),
        ("defaultProxy: {url: 'socks5://p:1080'}", "only http://"),
        ("clusters: [{name: c, proxy: {url: 'https://x'}}]", "connect directly"),
        ("clusters: [{name: c, pools: [{name: p, proxy: {url: 'https://x'}}]}]", "connect directly"),
        ("defaultProxy: {url: 'p.example', direct: true}", "exactly one of"),
        ("defaultProxy: {}", "exactly one of"),
        ("clusters: [{name: c}, {name: c}]", "Duplicate value"),
        ("clusters: [{name: c, pools: [{name: p}, {name: p}]}]", "Duplicate value"),
    ];
    for (i, (spec, expected)) in cases.iter().enumerate() {
        let yaml = format!("apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: bad-policy-{i}}}\nspec:\n  {spec}\n");
        let value: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let obj: kube::api::DynamicObject = serde_json::from_value(value).unwrap();
        let dyn_api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &kube::api::ApiResource::erase::<ClusterConsolePolicy>(&()));
        match dyn_api.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "case {i}: {e:?}");
                assert!(e.message.contains(expected), "case {i}: expected {expected:?} in {:?}", e.message);
            }
            other => {
                let _ = api.delete(&format!("bad-policy-{i}"), &DeleteParams::default()).await;
                panic!("case {i} ({spec}) was accepted: {other:?}")
            }
        }
    }
}

#[tokio::test]
async fn urls_only_the_operator_can_judge_become_entry_errors() {
    shared_operator();
    let client = client().await;
    let name = format!("ccp-urls-{:06x}", rand::random::<u32>() & 0xffffff);
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {name}}}\nspec:\n  clusters:\n  - name: c\n    pools:\n    - {{name: v6, proxy: {{url: 'http://[fd00::1]:3128'}}}}\n    - {{name: port, proxy: {{url: 'p.example:70000'}}}}\n    - {{name: path, proxy: {{url: 'http://p.example:3128/x'}}}}\n    - {{name: ok, proxy: {{url: 'p.example'}}}}\n"
    );
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &policy(&yaml)).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(1))).await;
    let err = |n: &str| st.pools.iter().find(|p| p.name == n).unwrap().error.clone().unwrap_or_default();
    assert!(err("v6").contains("IPv6"), "{}", err("v6"));
    assert!(err("port").contains("invalid port"), "{}", err("port"));
    assert!(err("path").contains("path"), "{}", err("path"));
    assert_eq!(st.pools.iter().find(|p| p.name == "ok").unwrap().proxy_url.as_deref(), Some("http://p.example:3128"));
    assert_eq!(st.unresolved, 3);
}

#[tokio::test]
async fn a_burst_of_changes_ends_with_the_status_of_the_last_one() {
    let operator = shared_operator();
    let label = spice_operator::metrics::ControllerLabel { controller: "clusterconsolepolicy" };
    let failures = || operator.metrics.failures.get_or_create(&label).get();
    let client = client().await;
    let name = format!("ccp-burst-{:06x}", rand::random::<u32>() & 0xffffff);
    let pools: Vec<String> = (0..200).map(|i| format!("{{name: p{i}}}")).collect();
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {name}}}\nspec:\n  defaultProxy: {{url: g0.example}}\n  clusters:\n  - name: c\n    pools: [{}]\n",
        pools.join(", ")
    );
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &policy(&yaml)).await.unwrap();
    wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(1))).await;

    // Changes faster than the operator writes: it resolves versions that are already outdated,
    // their status writes are refused (409) and must neither land nor count as failures.
    let failed_before = failures();
    let mut generation = 1;
    for i in 1..=15 {
        let change = json!({"spec": {"defaultProxy": {"url": format!("g{i}.example")}}});
        generation = api.patch(&name, &PatchParams::default(), &Patch::Merge(&change)).await.unwrap().metadata.generation.unwrap();
    }
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(generation))).await;
    assert_eq!(st.default_proxy_url.as_deref(), Some("http://g15.example:3128"));
    assert!(st.pools.iter().all(|p| p.proxy_url.as_deref() == Some("http://g15.example:3128")), "{:?}", st.pools.first());
    // It stays there: no late write of an older resolution follows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = api.get(&name).await.unwrap();
    assert_eq!(later.status.unwrap().observed_generation, Some(generation));
    assert_eq!(failures(), failed_before, "a refused outdated write is no failed reconcile");

    // The operator's status writes are under its one field manager.
    let managers: Vec<_> = later.metadata.managed_fields.unwrap_or_default().into_iter().filter(|m| m.subresource.as_deref() == Some("status")).map(|m| m.manager.unwrap_or_default()).collect();
    assert_eq!(managers, ["spice-operator"]);
}

#[tokio::test]
async fn a_policy_whose_status_cannot_be_stored_says_so_until_it_fits() {
    shared_operator();
    let client = client().await;
    let name = format!("ccp-huge-{:06x}", rand::random::<u32>() & 0xffffff);
    // 12,000 pools: within the schema's limits, but their resolved status (about 1.6 MB) is over
    // etcd's default 1.5 MiB per object.
    let clusters = |n: usize| -> Vec<serde_json::Value> {
        (0..n).map(|c| json!({"name": format!("cluster-{c:03}"), "pools": (0..60).map(|p| json!({"name": format!("pool-{p:03}")})).collect::<Vec<_>>()})).collect()
    };
    let huge: ClusterConsolePolicy = serde_json::from_value(json!({
        "apiVersion": "console.spice-operator.io/v1alpha1", "kind": "ClusterConsolePolicy", "metadata": {"name": name},
        "spec": {"defaultProxy": {"url": "http://global-proxy.example.com:3128"}, "clusters": clusters(200)}
    }))
    .unwrap();
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &huge).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(1))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "StatusTooLarge"));
    assert!(ready.message.starts_with("the resolved status of 200 clusters, 12000 pools and 0 VMs is"), "{}", ready.message);
    assert!(ready.message.contains("split the policy"), "{}", ready.message);
    // Counts stay; no entry is listed that could be read as current.
    assert_eq!((st.resolved_pools, st.unresolved, st.pools.len(), st.clusters.len()), (12000, 0, 0, 0));
    assert_eq!(st.default_proxy_url.as_deref(), Some("http://global-proxy.example.com:3128"));
    let warning = wait_for_event(&client, "default", "ClusterConsolePolicy", &name, "StatusTooLarge", T).await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));

    // Split down to what fits: every entry is listed again.
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"clusters": clusters(2)}}))).await.unwrap();
    let st = wait_for(&api, &name, T, |p| p.status.clone().filter(|s| s.observed_generation == Some(2) && is_ready(&s.conditions))).await;
    assert_eq!((st.pools.len(), st.clusters.len(), st.resolved_pools), (120, 2, 120));
}

/// A SpiceProxy stays published while it serves: a rollout its new pods cannot finish (here
/// unschedulable) leaves the old replica serving, so the policy keeps the proxy's URL for
/// engines while the SpiceProxy says what holds the rollout up.
#[tokio::test]
async fn a_rollout_that_cannot_finish_keeps_the_proxy_published() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "ccp-rollout").await;
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    spx_api.create(&PostParams::default(), &proxy(&ns.name, "edge", "edge.example.com")).await.unwrap();
    wait_for(&spx_api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    let name = format!("{}-policy", ns.name);
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {name}}}\nspec:\n  clusters:\n  - name: prod\n    proxy: {{spiceProxyRef: {{name: edge, namespace: {ns}}}}}\n    pools: [{{name: a}}]\n",
        ns = ns.name
    );
    let api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    let _cleanup = Cleanup(name.clone());
    api.create(&PostParams::default(), &policy(&yaml)).await.unwrap();
    let published = |p: &ClusterConsolePolicy| p.status.as_ref()?.pools.iter().find(|e| e.name == "a")?.proxy_url.clone();
    assert_eq!(wait_for(&api, &name, T, published).await, "http://edge.example.com:3128");

    // New pods that cannot be scheduled: the old one keeps serving (maxUnavailable 0).
    spx_api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeSelector": {"spice-operator-test/pool": "nowhere"}}}))).await.unwrap();
    let condition = |s: &SpiceProxy, t: &str| s.status.as_ref()?.conditions.iter().find(|c| c.type_ == t).cloned();
    let stuck = wait_for(&spx_api, "edge", T, |s| condition(s, "Degraded").filter(|c| c.reason == "Unschedulable").map(|_| s.clone())).await;
    let ready = condition(&stuck, "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "ProxyReady"), "{ready:?}");
    assert!(ready.message.starts_with("1/1 replicas ready at http://edge.example.com:3128; pod edge-") && ready.message.contains("Unschedulable"), "{}", ready.message);
    assert_eq!(condition(&stuck, "Progressing").map(|c| c.reason), Some("RollingOut".to_string()));
    // Policies follow a SpiceProxy within two seconds; three later the URL is still published.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = api.get(&name).await.unwrap();
    assert_eq!(published(&st).as_deref(), Some("http://edge.example.com:3128"), "{:?}", st.status);
    assert!(is_ready(&st.status.unwrap().conditions));
}

