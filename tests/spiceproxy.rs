//! SpiceProxy against the real API server: children, readiness through kwok, spec changes,
//! garbage collection, drift repair and admission errors.
mod common;

use std::time::Duration;

use common::refusal::*;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use spice_operator::crd::SpiceProxy;

const T: Duration = Duration::from_secs(30);

fn proxy_yaml(name: &str, ns: &str) -> String {
    format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: 2\n  service: {{type: NodePort}}\n  allowedTargets:\n  - cidr: 10.20.0.0/16\n    ports: [{{from: 5900, to: 5999}}]\n"
    )
}

/// The shared operator, an admin client, a throwaway namespace and, in it, the SpiceProxy
/// `edge` of `proxy_yaml`.
async fn edge_proxy(prefix: &str) -> (kube::Client, TestNamespace, Api<SpiceProxy>) {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, prefix).await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &spx(&proxy_yaml("edge", &ns.name))).await.unwrap();
    (client, ns, api)
}


#[tokio::test]
async fn create_builds_owned_children_and_reports_ready_url() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-create").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let created = api.create(&PostParams::default(), &spx(&proxy_yaml("edge", &ns.name))).await.unwrap();

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = wait_for(&deploys, "edge", T, |d| Some(d.clone())).await;
    let owner = &d.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("SpiceProxy", created.uid().unwrap().as_str(), Some(true)));
    assert_eq!(d.spec.replicas, Some(2));
    let pod = d.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some(TEST_IMAGE));
    assert_eq!(pod.containers[0].args.as_ref().unwrap()[0], "proxy");
    assert_eq!(d.labels()["app.kubernetes.io/managed-by"], "spice-operator");

    // Children are applied one after another: wait for each, never assume the order.
    let svc = wait_for(&Api::<Service>::namespaced(client.clone(), &ns.name), "edge", T, |s| Some(s.clone())).await;
    let svc_spec = svc.spec.unwrap();
    assert_eq!(svc_spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(svc_spec.external_traffic_policy.as_deref(), Some("Cluster"), "the URL names one node, which may run no replica");
    let port = &svc_spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.port, 3128);
    let node_port = port.node_port.expect("node port allocated");

    let cm = wait_for(&Api::<ConfigMap>::namespaced(client.clone(), &ns.name), "edge-config", T, |c| Some(c.clone())).await;
    let cfg = config_of(&cm);
    assert_eq!(cfg.allowed_targets[0].cidr.to_string(), "10.20.0.0/16");
    assert_eq!(cfg.allowed_targets[0].ports, vec![(5900, 5999)]);
    let key = wait_for(&Api::<Secret>::namespaced(client.clone(), &ns.name), "edge-keys", T, |k| Some(k.clone())).await;
    assert_eq!(key.data.unwrap()["current"].0.len(), 32);

    // Egress only to the allowed targets (and DNS), where the network plugin enforces it.
    let np = wait_for(&Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name), "edge-egress", T, |p| Some(p.clone())).await;
    assert_eq!(np.owner_references()[0].uid, created.uid().unwrap());
    let egress = np.spec.unwrap().egress.unwrap();
    assert_eq!(egress[0].to.as_ref().unwrap()[0].ip_block.as_ref().unwrap().cidr, "10.20.0.0/16");
    let ports = egress[0].ports.as_ref().unwrap();
    assert_eq!((ports[0].port.clone(), ports[0].end_port), (Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(5900)), Some(5999)));

    // kwok runs the pods; the URL is a node address plus the node port.
    let status = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| is_rolled_out(&st.conditions))).await;
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(status.observed_generation, Some(1));
    let url = status.proxy_url.unwrap();
    assert!(url == format!("http://127.0.0.11:{node_port}") || url == format!("http://127.0.0.12:{node_port}"), "{url}");
    for t in ["Ready", "Progressing", "Degraded"] {
        let c = status.conditions.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} condition"));
        assert!(!c.reason.is_empty() && !c.message.is_empty() && c.observed_generation == Some(1), "{c:?}");
    }
}

/// Spread constraints reach the scheduler: one it cannot meet names itself in status, and
/// without any the replicas go to different nodes.
#[tokio::test]
async fn replicas_spread_as_the_constraints_say() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-spread").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    // The test nodes carry no zone label, so a strict zone spread can place no pod.
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  replicas: 2\n  externalAddress: {{host: edge.example.com}}\n  topologySpreadConstraints: [{{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}}]\n  allowedTargets: [{{cidr: 10.20.0.0/16, ports: [{{from: 5900}}]}}]\n",
        ns.name
    );
    api.create(&PostParams::default(), &spx(&yaml)).await.unwrap();
    let degraded = wait_for(&api, "edge", T, |s| s.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Degraded" && c.reason == "Unschedulable").cloned()).await;
    assert!(degraded.message.contains("topology spread constraints"), "{}", degraded.message);

    api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"topologySpreadConstraints": null}}))).await.unwrap();
    wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions) && st.ready_replicas == 2)).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name).list(&Default::default()).await.unwrap();
    let nodes: std::collections::BTreeSet<_> = pods.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    assert_eq!(nodes.len(), 2, "both replicas on one node: {nodes:?}");
}

/// Pods that cannot run change nothing on the Deployment a watch would see: the status names the
/// pod and the scheduler's reason, and clears once they run.
#[tokio::test]
async fn pods_that_cannot_run_are_named_in_status_until_they_run() {
    let operator = shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-pods").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: edge.example.com}}\n  nodeSelector: {{spice-operator-test/pool: nowhere}}\n  imagePullSecrets: [{{name: regcred}}]\n  allowedTargets: [{{cidr: 10.20.0.0/16, ports: [{{from: 5900}}]}}]\n",
        ns.name
    );
    api.create(&PostParams::default(), &spx(&yaml)).await.unwrap();
    let condition = |t: &'static str| move |s: &SpiceProxy| s.status.as_ref()?.conditions.iter().find(|c| c.type_ == t).cloned();

    let degraded = wait_for(&api, "edge", T, |s| condition("Degraded")(s).filter(|c| c.reason == "Unschedulable")).await;
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.starts_with("pod edge-") && degraded.message.contains("didn't match Pod's node affinity/selector"), "{}", degraded.message);
    let ready = condition("Ready")(&api.get("edge").await.unwrap()).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ReplicasNotReady"));
    assert!(ready.message.starts_with("0/1 replicas ready; pod edge-") && ready.message.contains("Unschedulable"), "{}", ready.message);
    // /metrics says so for alerts (per SpiceProxy, from the operator's cache).
    let series = |metric: &str, value: u8| format!("spice_operator_spiceproxy_{metric}{{namespace=\"{}\",name=\"edge\"}} {value}", ns.name);
    operator.wait_for_metric(&series("degraded", 1)).await;
    operator.wait_for_metric(&series("ready", 0)).await;
    // kubectl describe tells it too: one warning with the scheduler's reason.
    let warning = wait_for_event(&client, &ns.name, "SpiceProxy", "edge", "Unschedulable", T).await;
    assert_eq!((warning.type_.as_deref(), warning.reporting_controller.as_deref()), (Some("Warning"), Some("spice-operator")));
    assert!(warning.note.as_deref().unwrap_or_default().starts_with("pod edge-"), "{warning:?}");
    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name).get("edge").await.unwrap();
    let pull: Vec<String> = d.spec.template.spec.unwrap().image_pull_secrets.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(pull, ["regcred"]);

    // Once the pods may run anywhere, kwok runs them and the problem is gone from status.
    api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"nodeSelector": null}}))).await.unwrap();
    // Until the rollout completes, the unschedulable pod of the version before is still there.
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| is_rolled_out(&st.conditions))).await;
    let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", "AsExpected"), "{degraded:?}");
    assert_eq!(st.proxy_url.as_deref(), Some("http://edge.example.com:3128"));
    operator.wait_for_metric(&series("ready", 1)).await;
    operator.wait_for_metric(&series("degraded", 0)).await;
    let ready = wait_for_event(&client, &ns.name, "SpiceProxy", "edge", "ProxyReady", T).await;
    assert_eq!(ready.type_.as_deref(), Some("Normal"));
    assert_eq!(ready.note.as_deref(), Some("1/1 replicas ready at http://edge.example.com:3128"));
}

#[tokio::test]
async fn spec_change_updates_children_and_advances_observed_generation() {
    let (client, ns, api) = edge_proxy("spx-change").await;
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let config_hash = |d: &Deployment| d.spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()["console.spice-operator.io/config-hash"].clone();
    let before = deploys.get("edge").await.unwrap();
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns.name);
    let running_pods = || async {
        let list = pods.list(&kube::api::ListParams::default().labels("app.kubernetes.io/instance=edge")).await.unwrap().items;
        let mut uids: Vec<String> = list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).filter_map(|p| p.metadata.uid).collect();
        uids.sort();
        uids
    };
    let pods_before = running_pods().await;
    assert_eq!(pods_before.len(), 2, "{pods_before:?}");

    // A new hypervisor network and raised limits reach the ConfigMap, which running replicas
    // read again, and the network the egress NetworkPolicy; the pod template stays, so no
    // rollout ends open consoles.
    let patch = json!({"spec": {
        "allowedTargets": [
            {"cidr": "10.20.0.0/16", "ports": [{"from": 5900, "to": 5999}]},
            {"cidr": "192.0.2.0/24", "ports": [{"from": 5900}]}
        ],
        "limits": {"maxTunnels": 20000, "idleTimeoutSeconds": 7200}
    }});
    let updated = api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    assert_eq!(updated.metadata.generation, Some(2));
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let cfg = wait_for(&cms, "edge-config", T, |cm| Some(config_of(cm)).filter(|c| c.allowed_targets.len() == 2)).await;
    assert_eq!(cfg.allowed_targets[1].ports, vec![(5900, 5900)]);
    assert_eq!((cfg.limits.max_tunnels, cfg.limits.idle_timeout_seconds), (20000, 7200));
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns.name);
    wait_for(&policies, "edge-egress", T, |p| (p.spec.as_ref()?.egress.as_ref()?.len() == 3).then_some(())).await;
    wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(2) && is_rolled_out(&st.conditions))).await;
    // (The Deployment's generation moves: the API server counts its annotations, and the
    // applied-set digest among them changed. Its template is what rolls pods.)
    let after = wait_for(&deploys, "edge", T, |d| (d.status.as_ref()?.observed_generation == d.metadata.generation).then(|| d.clone())).await;
    assert_eq!(serde_json::to_value(&after.spec.template).unwrap(), serde_json::to_value(&before.spec.template).unwrap(), "an allow-list or live-limit change must not roll the pods");
    assert_eq!(config_hash(&after), config_hash(&before));
    assert_eq!(running_pods().await, pods_before, "the same pods serve on");

    // Everything else that reaches the pods rolls them: a setting the proxy reads only at
    // start (the dead-peer timeout) through the config hash, labels and annotations directly.
    let patch = json!({"spec": {
        "replicas": 3,
        "podLabels": {"team": "vdi"},
        "podAnnotations": {"example.com/owner": "console-team"},
        "service": {"type": "NodePort", "port": 4000},
        "limits": {"deadPeerTimeoutSeconds": 300}
    }});
    let updated = api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let generation = updated.metadata.generation.unwrap();
    assert_eq!(generation, 3);

    let d = wait_for(&deploys, "edge", T, |d| (d.spec.replicas == Some(3)).then(|| d.clone())).await;
    assert_ne!(config_hash(&d), config_hash(&before), "a new dead-peer timeout must roll the pods");
    let svc = Api::<Service>::namespaced(client.clone(), &ns.name);
    wait_for(&svc, "edge", T, |s| (s.spec.as_ref()?.ports.as_ref()?[0].port == 4000).then_some(())).await;
    // Ready says it serves; Progressing=False (Complete) that every replica runs the new template.
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_rolled_out(&st.conditions) && st.ready_replicas == 3)).await;
    assert!(st.conditions.iter().all(|c| c.observed_generation == Some(generation)));
    // The rolled pods carry the extra label and annotation.
    let labelled = pods.list(&kube::api::ListParams::default().labels("team=vdi,app.kubernetes.io/instance=edge")).await.unwrap().items;
    let running: Vec<_> = labelled.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    assert_eq!(running.len(), 3, "{:?}", labelled.iter().map(|p| p.metadata.name.clone()).collect::<Vec<_>>());
    assert!(running.iter().all(|p| p.annotations().get("example.com/owner").map(String::as_str) == Some("console-team")));

    // Turning the NetworkPolicy off deletes it.
    api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"networkPolicy": {"enabled": false}}}))).await.unwrap();
    wait_gone(&policies, "edge-egress", T).await;
}

/// An allow-list change all the way: the SpiceProxy, the operator's ConfigMap, the mounted file
/// (followed here as the kubelet follows it), and a running proxy, which closes the tunnel to
/// the target taken off and lets tunnels through to the one added, with no restart.
/// (Multi-threaded: the follower runs while the test waits in blocking reads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_change_reaches_a_running_proxy_without_a_restart() {
    use std::io::{Read, Write};
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-allow").await;
    // Two hypervisors' SPICE ports, echoing what they get.
    let echo = |ip: &str| {
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut copy = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut conn, &mut copy);
                });
            }
        });
        addr
    };
    let (taken_off, added) = (echo("127.0.0.1"), echo("127.0.0.2"));
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let yaml = format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: edge.example.com}}\n  auth: {{mode: None}}\n  allowedTargets: [{{cidr: 127.0.0.1/32, ports: [{{from: {}}}]}}]\n",
        ns.name,
        taken_off.port()
    );
    api.create(&PostParams::default(), &spx(&yaml)).await.unwrap();
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    let listen = free_port();
    let (_proxy, admin, audit, _dir) = generated_proxy(&client, &ns.name, "edge", listen).await;
    let tunnel = |target: std::net::SocketAddr| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n\r\n").unwrap();
        let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        (String::from_utf8_lossy(&head).into_owned(), s)
    };
    let (head, mut open) = tunnel(taken_off);
    assert!(head.starts_with("HTTP/1.0 200"), "the listed target: {head}");
    open.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    open.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    assert!(tunnel(added).0.starts_with("HTTP/1.0 403"), "a target not listed yet");

    let changed = std::time::Instant::now();
    let patch = json!({"spec": {"allowedTargets": [{"cidr": "127.0.0.2/32", "ports": [{"from": added.port()}]}]}});
    api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    // The operator's apply, the follower's poll and the proxy's 10 s re-read.
    open.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    let ended = open.read_to_end(&mut rest);
    assert!(ended.is_ok() && rest.is_empty(), "the tunnel to the target taken off is closed: {ended:?} {rest:?}");
    eprintln!("the tunnel was closed {:?} after the change", changed.elapsed());
    let (head, _) = tunnel(added);
    assert!(head.starts_with("HTTP/1.0 200"), "the target added: {head}");
    let revoked = http_get(admin, "/metrics").unwrap().lines().find_map(|l| l.strip_prefix("spice_proxy_tunnel_ends_total{reason=\"revoked\"} ")?.parse::<u64>().ok());
    assert_eq!(revoked, Some(1));
    let line = std::iter::from_fn(|| audit.recv_timeout(Duration::from_secs(5)).ok()).find(|l| l.contains("target taken off the allow-list"));
    assert!(line.is_some_and(|l| l.contains(&taken_off.to_string())), "an audit line names the closed tunnel's target");
}

/// The scale subresource: `kubectl scale` and a HorizontalPodAutoscaler (kube-controller-manager's
/// own) drive the replicas as on a Deployment, within the schema's limits.
#[tokio::test]
async fn kubectl_scale_and_an_autoscaler_set_the_replicas() {
    let (client, ns, api) = edge_proxy("spx-scale").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);

    // kubectl scale spx edge --replicas=3
    api.patch_scale("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    wait_for(&deploys, "edge", T, |d| (d.spec.replicas == Some(3)).then_some(())).await;
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| st.ready_replicas == 3 && is_ready(&st.conditions)).map(|_| ())).await;
    let scale = api.get_scale("edge").await.unwrap();
    let status = scale.status.unwrap();
    assert_eq!(status.replicas, 3);
    assert_eq!(status.selector.as_deref(), Some("app.kubernetes.io/instance=edge,app.kubernetes.io/name=spice-proxy"));
    let err = api.patch_scale("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 101}}))).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("spec.replicas")), "{err}");

    // An autoscaler's minimum applies even before it has metrics (there is no metrics server here).
    let hpa: k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "edge", "namespace": ns.name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "console.spice-operator.io/v1alpha1", "kind": "SpiceProxy", "name": "edge"},
            "minReplicas": 4, "maxReplicas": 6,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
        }
    }))
    .unwrap();
    Api::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &hpa).await.unwrap();
    let scaled = wait_for(&api, "edge", Duration::from_secs(60), |s| (s.spec.replicas == 4).then(|| s.clone())).await;
    assert!(scaled.metadata.generation.unwrap() > 1);
    wait_for(&deploys, "edge", T, |d| (d.spec.replicas == Some(4)).then_some(())).await;
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| st.ready_replicas == 4 && is_ready(&st.conditions)).map(|_| ())).await;
}

#[tokio::test]
async fn a_load_balancer_keeps_client_addresses_unless_told_otherwise() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-lb").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let yaml = proxy_yaml("edge", &ns.name).replace("service: {type: NodePort}", "service: {type: LoadBalancer}\n  externalAddress: {host: console.example.com}");
    api.create(&PostParams::default(), &spx(&yaml)).await.unwrap();
    let svcs = Api::<Service>::namespaced(client.clone(), &ns.name);
    // Local: the API server gives load balancers a health-check port that answers only on
    // nodes running a replica.
    let spec = wait_for(&svcs, "edge", T, |s| s.spec.clone()).await;
    assert_eq!((spec.type_.as_deref(), spec.external_traffic_policy.as_deref()), (Some("LoadBalancer"), Some("Local")));
    assert!(spec.health_check_node_port.is_some(), "{spec:?}");
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions))).await;
    assert_eq!(st.proxy_url.as_deref(), Some("http://console.example.com:3128"));

    let patch = json!({"spec": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster"}}});
    let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap().metadata.generation.unwrap();
    let spec = wait_for(&svcs, "edge", T, |s| s.spec.clone().filter(|sp| sp.external_traffic_policy.as_deref() == Some("Cluster"))).await;
    assert_eq!(spec.health_check_node_port, None, "released with the Local policy");
    wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_ready(&st.conditions))).await;

    // IP families, on this dual-stack control plane (IPv4 first): PreferDualStack and
    // RequireDualStack get both; dropping the setting goes back to one family.
    let families = |policy: Option<&str>| json!({"spec": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster", "ipFamilyPolicy": policy}}});
    let stack = |s: &Service| {
        let spec = s.spec.as_ref()?;
        Some((spec.ip_family_policy.clone()?, spec.ip_families.clone()?, spec.cluster_ips.as_ref()?.iter().map(|ip| ip.contains(':')).collect::<Vec<_>>()))
    };
    let (v4, dual) = (vec!["IPv4".to_string()], vec!["IPv4".to_string(), "IPv6".to_string()]);
    for (policy, want) in [(Some("PreferDualStack"), &dual), (Some("RequireDualStack"), &dual), (None, &v4)] {
        let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(&families(policy))).await.unwrap().metadata.generation.unwrap();
        let expected = (policy.unwrap_or("SingleStack").to_string(), want.clone(), want.iter().map(|f| f == "IPv6").collect::<Vec<_>>());
        let got = wait_for(&svcs, "edge", T, |s| stack(s).filter(|got| got.0 == expected.0)).await;
        assert_eq!(got, expected, "{policy:?}: policy, families, which cluster IPs are IPv6");
        wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_ready(&st.conditions))).await;
    }
}

/// Back to ClusterIP from NodePort and from a LoadBalancer with `Local`: the node ports and the
/// health-check port the API server allocated (owned by no field manager) must go with the type,
/// or the Service would be refused and the proxy stuck on its old type.
#[tokio::test]
async fn the_service_type_can_go_back_to_cluster_ip() {
    let (client, ns, api) = edge_proxy("spx-type").await;
    let svcs = Api::<Service>::namespaced(client.clone(), &ns.name);
    wait_for(&svcs, "edge", T, |s| s.spec.as_ref()?.ports.as_ref()?[0].node_port).await;
    let cluster_ip = json!({"spec": {"service": {"type": "ClusterIP", "externalTrafficPolicy": null}, "externalAddress": null}});
    let load_balancer = json!({"spec": {"service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}, "externalAddress": {"host": "console.example.com"}}});
    for (from, patch) in [("NodePort", &cluster_ip), ("ClusterIP", &load_balancer), ("LoadBalancer", &cluster_ip)] {
        let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap().metadata.generation.unwrap();
        let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_ready(&st.conditions))).await;
        let spec = svcs.get("edge").await.unwrap().spec.unwrap();
        let node_ports: Vec<_> = spec.ports.iter().flatten().filter_map(|p| p.node_port).collect();
        match spec.type_.as_deref() {
            Some("ClusterIP") => {
                assert_eq!(st.proxy_url, Some(format!("http://edge.{}.svc:3128", ns.name)), "from {from}");
                assert!(node_ports.is_empty() && spec.health_check_node_port.is_none(), "from {from}: {spec:?}");
                assert_eq!((spec.external_traffic_policy, spec.allocate_load_balancer_node_ports), (None, None), "from {from}");
            }
            Some("LoadBalancer") => {
                assert_eq!(st.proxy_url.as_deref(), Some("http://console.example.com:3128"));
                assert!(!node_ports.is_empty() && spec.health_check_node_port.is_some(), "{spec:?}");
            }
            other => panic!("from {from}: type {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_refused_change_changes_nothing_and_says_why() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-refused").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    for name in ["first", "second"] {
        api.create(&PostParams::default(), &spx(&proxy_yaml(name, &ns.name))).await.unwrap();
    }
    for name in ["first", "second"] {
        wait_for(&api, name, T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    }
    let taken = children_of(&client, &ns.name, "first").await.service.ports.unwrap()[0].node_port.unwrap();
    let before = children_of(&client, &ns.name, "second").await;

    // One change for each child: the pods' annotations and the ConfigMap's limit (the
    // Deployment would roll) and a node port the first proxy holds (the Service is refused).
    let change = |node_port: Option<i32>| {
        json!({"spec": {
            "podAnnotations": {"example.com/owner": "console-team"},
            "limits": {"maxTunnels": 77},
            "service": {"type": "NodePort", "nodePort": node_port}
        }})
    };
    let generation = api.patch("second", &PatchParams::default(), &Patch::Merge(&change(Some(taken)))).await.unwrap().metadata.generation.unwrap();
    let st = wait_for(&api, "second", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && !is_ready(&st.conditions))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "ApplyFailed", "{ready:?}");
    assert!(ready.message.contains("422") && ready.message.contains(&format!("{taken}: provided port is already allocated")), "{}", ready.message);
    assert_eq!(st.proxy_url, Some(format!("http://127.0.0.11:{}", before.service.ports.as_ref().unwrap()[0].node_port.unwrap())), "the old URL still works");
    // Retried with backoff and still refused: nothing changed in the meantime either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = children_of(&client, &ns.name, "second").await;
    assert_eq!(after.deployment_generation, before.deployment_generation, "the Deployment was not rolled");
    assert_eq!(after.annotations, before.annotations);
    assert_eq!(after.max_tunnels, before.max_tunnels, "the ConfigMap was not changed");
    assert_eq!(after.service.ports, before.service.ports);

    // With a free port the same change applies in full.
    let generation = api.patch("second", &PatchParams::default(), &Patch::Merge(&change(None))).await.unwrap().metadata.generation.unwrap();
    wait_for(&api, "second", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && is_ready(&st.conditions))).await;
    let after = children_of(&client, &ns.name, "second").await;
    assert!(after.deployment_generation > before.deployment_generation);
    assert_eq!(after.annotations.get("example.com/owner").map(String::as_str), Some("console-team"));
    assert_eq!(after.max_tunnels, 77);
}

/// An admission policy (here a ValidatingAdmissionPolicy, as a policy engine's webhook would)
/// that refuses the Deployment: the ConfigMap, applied before it, must not change either.
#[tokio::test]
async fn an_admission_policy_refusal_changes_nothing() {
    let (client, ns, api) = edge_proxy("spx-admission").await;
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    let before = children_of(&client, &ns.name, "edge").await;

    let expression = "!has(object.spec.template.metadata.annotations) || !('example.com/debug' in object.spec.template.metadata.annotations)";
    let policy = AdmissionPolicy::install(&client, &ns.name, "apps", "deployments", expression, "debug pods are not allowed here").await;
    // The API server takes a moment to load a new policy: wait until a dry run is refused.
    let deploys = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let debug = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {"metadata": {"annotations": {"example.com/debug": "on"}}}}});
    let probe = PatchParams::apply("policy-probe").dry_run();
    let deadline = std::time::Instant::now() + T;
    loop {
        match deploys.patch("edge", &probe, &Patch::Apply(&debug)).await {
            Err(kube::Error::Api(e)) if e.message.contains("debug pods are not allowed here") => break,
            other => assert!(std::time::Instant::now() < deadline, "the admission policy never took effect: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let patch = json!({"spec": {"podAnnotations": {"example.com/debug": "on"}, "limits": {"maxTunnels": 77}}});
    let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap().metadata.generation.unwrap();
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && !is_ready(&st.conditions))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "ApplyFailed", "{ready:?}");
    assert!(ready.message.contains("debug pods are not allowed here"), "{}", ready.message);
    let after = children_of(&client, &ns.name, "edge").await;
    assert_eq!(after.max_tunnels, before.max_tunnels, "the ConfigMap was not changed");
    assert_eq!((after.deployment_generation, after.annotations), (before.deployment_generation, before.annotations), "the Deployment was not changed");
    policy.remove().await;
}

/// The race the dry run leaves open (a node port taken, a rule changed, between rehearsal and
/// apply), made certain: a policy that lets dry runs pass refuses the Service for real, after
/// the ConfigMap and the Deployment took the change. The operator puts them back.
#[tokio::test]
async fn a_refusal_the_dry_run_did_not_foresee_is_rolled_back() {
    let (client, ns, api) = edge_proxy("spx-rollback").await;
    let url = wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).and_then(|st| st.proxy_url.clone())).await;
    let before = children_of(&client, &ns.name, "edge").await;
    let policy = refuse_annotated_services_outside_dry_runs(&client, &ns.name).await;
    let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(refused_change())).await.unwrap().metadata.generation.unwrap();
    assert_put_back_then_applied(&client, &api, policy, generation, &before, &url).await;
}

#[tokio::test]
async fn what_the_operator_applied_is_read_back_exactly() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-readback").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let yaml = proxy_yaml("edge", &ns.name)
        + "  html5: {port: 6082, allowedOrigins: [https://portal.example.com]}
  podLabels: {team: vdi}
  podAnnotations: {example.com/owner: console-team}
  service: {type: NodePort, annotations: {example.com/lb: internal}}
  limits: {maxTunnels: 500}
";
    let created = api.create(&PostParams::default(), &spx(&yaml.replace("  service: {type: NodePort}\n", ""))).await.unwrap();
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    // Another writer's label on the Deployment is not part of what the operator applied.
    let deploys = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    deploys.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"example.com/added": "by-hand"}}}))).await.unwrap();

    let uid = created.uid().unwrap();
    let applied = spice_operator::controller::spice_proxy::read_applied(&client, &ns.name, "edge", &uid).await.unwrap().expect("a set applied in full");
    let children = applied.children().unwrap();
    assert!(children.network_policy.is_some() && children.service.spec.as_ref().unwrap().ports.as_ref().unwrap().len() == 2, "all five, html5 port included");
    assert!(!children.deployment.labels().contains_key("example.com/added"));
    assert_eq!(children.deployment.metadata.resource_version, None, "only what was applied, no server fields");
    assert_eq!(children.unstamped().digest().unwrap(), applied.digest(), "read back exactly as applied");
    // Another SpiceProxy's uid owns none of them.
    assert!(spice_operator::controller::spice_proxy::read_applied(&client, &ns.name, "edge", "not-the-owner").await.unwrap().is_none());
}

#[tokio::test]
async fn a_namespace_quota_is_named_and_changes_nothing() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-quota").await;
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-load-balancers"},
        "spec": {"hard": {"services.loadbalancers": "0"}}
    }))
    .unwrap();
    let quotas = Api::namespaced(client.clone(), &ns.name);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // Admission refuses everything quota'd until the quota controller has counted the namespace.
    wait_for(&quotas, "no-load-balancers", T, |q: &k8s_openapi::api::core::v1::ResourceQuota| q.status.as_ref()?.used.as_ref().map(|_| ())).await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &spx(&proxy_yaml("edge", &ns.name).replace("{type: NodePort}", "{type: ClusterIP}"))).await.unwrap();
    wait_for(&api, "edge", T, |s| s.status.as_ref().filter(|st| is_ready(&st.conditions)).map(|_| ())).await;
    let before = children_of(&client, &ns.name, "edge").await;

    let patch = json!({"spec": {
        "limits": {"maxTunnels": 77},
        "service": {"type": "LoadBalancer"},
        "externalAddress": {"host": "console.example.com"}
    }});
    let generation = api.patch("edge", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap().metadata.generation.unwrap();
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(generation) && !is_ready(&st.conditions))).await;
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "QuotaExceeded", "{ready:?}");
    assert!(ready.message.contains("exceeded quota: no-load-balancers") && ready.message.contains("services.loadbalancers"), "{}", ready.message);
    // kubectl describe says it too, as a warning for the namespace's owner to act on.
    let warning = wait_for_event(&client, &ns.name, "SpiceProxy", "edge", "QuotaExceeded", T).await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.as_deref().unwrap_or_default().contains("exceeded quota: no-load-balancers"), "{warning:?}");
    let after = children_of(&client, &ns.name, "edge").await;
    assert_eq!(after.max_tunnels, before.max_tunnels, "the ConfigMap was not changed");
    assert_eq!(after.deployment_generation, before.deployment_generation, "the Deployment was not rolled");
    assert_eq!(after.service.type_.as_deref(), Some("ClusterIP"));
}

#[tokio::test]
async fn deleting_the_spice_proxy_garbage_collects_its_objects() {
    let (client, ns, api) = edge_proxy("spx-delete").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    wait_for(&deploys, "edge", T, |_| Some(())).await;
    wait_for(&secrets, "edge-keys", T, |_| Some(())).await;
    api.delete("edge", &DeleteParams::foreground()).await.unwrap();
    wait_gone(&api, "edge", T).await;
    wait_gone(&deploys, "edge", T).await;
    wait_gone(&svcs, "edge", T).await;
    wait_gone(&cms, "edge-config", T).await;
    wait_gone(&secrets, "edge-keys", T).await;
    wait_gone(&Api::<NetworkPolicy>::namespaced(client.clone(), &ns.name), "edge-egress", T).await;
}

#[tokio::test]
async fn manual_edits_of_owned_objects_are_reverted() {
    let (client, ns, _) = edge_proxy("spx-drift").await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for(&deploys, "edge", T, |_| Some(())).await;

    // Someone scales by hand and swaps the image, as `kubectl edit` would.
    let edit = json!({"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "proxy", "image": "evil:latest"}]}}}});
    deploys.patch("edge", &PatchParams::default(), &Patch::Strategic(&edit)).await.unwrap();
    let d = wait_for(&deploys, "edge", T, |d| {
        let image = d.spec.template.spec.as_ref()?.containers[0].image.clone();
        (d.spec.replicas == Some(2) && image.as_deref() == Some(TEST_IMAGE)).then(|| d.clone())
    })
    .await;
    assert_eq!(d.spec.replicas, Some(2));

    // A deleted ConfigMap comes back too.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let old_uid = wait_for(&cms, "edge-config", T, |c| Some(c.uid())).await;
    cms.delete("edge-config", &DeleteParams::default()).await.unwrap();
    wait_for(&cms, "edge-config", T, |cm| (cm.uid() != old_uid).then_some(())).await;
}

#[tokio::test]
async fn invalid_specs_are_rejected_at_admission_with_a_clear_message() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-invalid").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let cases: &[(&str, &str)] = &[
        ("allowedTargets: []", "allowedTargets"),
        ("allowedTargets: [{cidr: 10.0.0.0/33, ports: [{from: 5900}]}]", "must be a CIDR"),
        ("allowedTargets: [{cidr: not-a-cidr, ports: [{from: 5900}]}]", "must be a CIDR"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 6000, to: 5900}]}]", "to must not be below from"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 70000}]}]", "65535"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: []}]", "ports"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  auth: {mode: Basic}", "needs credentialsSecret"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  auth: {mode: Open}", "Unsupported value"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {idleTimeoutSeconds: 60}", "301"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {deadPeerTimeoutSeconds: 5}", "greater than or equal to 10"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {halfClosedTimeoutSeconds: 0}", "greater than or equal to 1"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {authFailureWindowSeconds: 0}", "greater than or equal to 1"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {maxAuthFailuresPerClient: -1}", "greater than or equal to 0"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  limits: {shutdownDelaySeconds: 301}", "less than or equal to 300"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  clientSocket: {sendBufferBytes: 16777217}", "less than or equal to 16777216"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  clientSocket: {sendBufferBytes: -1}", "greater than or equal to 0"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  clientSocket: {congestionControl: \"cubic; reboot\"}", "should match"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {type: ClusterIP, nodePort: 30000}", "nodePort needs service type"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {externalTrafficPolicy: Local}", "externalTrafficPolicy needs service type NodePort or LoadBalancer"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {type: NodePort, externalTrafficPolicy: Local}", "Local with type NodePort needs externalAddress"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {type: LoadBalancer, externalTrafficPolicy: Nearest}", "Unsupported value"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {type: LoadBalancer, proxyProtocol: {trustedCidrs: []}}", "should have at least 1 items"),
        ("allowedTargets: [{cidr: 10.0.0.0/8, ports: [{from: 5900}]}]\n  service: {type: LoadBalancer, proxyProtocol: {trustedCidrs: [10.0.0.0/8, lb.example.com]}}", "every entry must be a CIDR"),
    ];
    for (i, (spec, expected)) in cases.iter().enumerate() {
        let yaml = format!("apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: bad-{i}, namespace: {}}}\nspec:\n  {spec}\n", ns.name);
        let value: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        let obj: kube::api::DynamicObject = serde_json::from_value(value).unwrap();
        let dyn_api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &kube::api::ApiResource::erase::<SpiceProxy>(&()));
        match dyn_api.create(&PostParams::default(), &obj).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "case {i}: {e:?}");
                assert!(e.message.contains(expected), "case {i}: expected {expected:?} in {:?}", e.message);
            }
            other => panic!("case {i} ({spec}) was accepted: {other:?}"),
        }
    }
    assert!(api.list(&Default::default()).await.unwrap().items.is_empty(), "nothing may be stored");
}

#[tokio::test]
async fn address_spice_clients_cannot_use_is_a_condition_and_nothing_is_applied() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-v6").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let mut p = spx(&proxy_yaml("v6", &ns.name));
    p.spec.external_address = Some(spice_operator::crd::ExternalAddress { host: "fd00::5".into(), port: None });
    api.create(&PostParams::default(), &p).await.unwrap();
    let st = wait_for(&api, "v6", T, |s| s.status.clone().filter(|st| !st.conditions.is_empty())).await;
    let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "InvalidSpec"));
    assert!(degraded.message.contains("IPv6"), "{}", degraded.message);
    assert_eq!(st.proxy_url, None);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(deploys.get_opt("v6").await.unwrap().is_none(), "an invalid spec must not be applied");

    // Fixing the spec applies it and clears the condition.
    let fix = json!({"spec": {"externalAddress": {"host": "console.example.com"}}});
    api.patch("v6", &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    let st = wait_for(&api, "v6", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions))).await;
    assert_eq!(st.proxy_url.as_deref().map(|u| u.starts_with("http://console.example.com:")), Some(true));
}

/// A Secret the pods would mount that does not exist: the pods would wait in ContainerCreating
/// with nothing in the Deployment saying why. Nothing is applied until it exists; a Secret
/// deleted once the proxy runs is named too, while the running replicas keep serving and
/// engines keep the URL.
#[tokio::test]
async fn a_missing_secret_is_named_and_nothing_is_applied_until_it_exists() {
    shared_operator();
    let client = client().await;
    let ns = TestNamespace::new(&client, "spx-secret").await;
    let api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let mut p = spx(&proxy_yaml("edge", &ns.name));
    p.spec.external_address = Some(spice_operator::crd::ExternalAddress { host: "console.example.com".into(), port: None });
    p.spec.html5 = Some(serde_json::from_value(json!({"upstreamTls": {"caSecret": "hv-ca"}})).unwrap());
    api.create(&PostParams::default(), &p).await.unwrap();
    let why = format!("html5.upstreamTls.caSecret: Secret {}/hv-ca does not exist", ns.name);
    let condition = |st: &spice_operator::crd::SpiceProxyStatus, t: &str| {
        st.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())).unwrap()
    };
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| !st.conditions.is_empty())).await;
    assert_eq!(condition(&st, "Degraded"), ("True".into(), "SecretNotFound".into(), why.clone()));
    assert_eq!(condition(&st, "Ready").1, "SecretNotFound");
    assert_eq!(st.proxy_url, None);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(deploys.get_opt("edge").await.unwrap().is_none(), "nothing is applied while the Secret is missing");
    // kubectl describe tells it too.
    let warning = wait_for_event(&client, &ns.name, "SpiceProxy", "edge", "SecretNotFound", T).await;
    assert_eq!((warning.type_.as_deref(), warning.note.as_deref()), (Some("Warning"), Some(why.as_str())));

    // The Secret appears: found on the next look (every 10 s), applied, and the proxy becomes Ready.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ca: Secret = serde_json::from_value(json!({"metadata": {"name": "hv-ca"}, "stringData": {"ca.crt": "-----BEGIN CERTIFICATE-----\n"}})).unwrap();
    secrets.create(&PostParams::default(), &ca).await.unwrap();
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions) && st.ready_replicas == 2)).await;
    assert_eq!(condition(&st, "Degraded").0, "False");
    let url = st.proxy_url.clone().expect("a URL once Ready");

    // Deleted while the proxy runs, then a change: the change waits, and the URL stays.
    secrets.delete("hv-ca", &DeleteParams::default()).await.unwrap();
    api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    let st = wait_for(&api, "edge", T, |s| s.status.clone().filter(|st| st.observed_generation == Some(2))).await;
    assert_eq!(condition(&st, "Degraded"), ("True".into(), "SecretNotFound".into(), why.clone()));
    assert_eq!(condition(&st, "Progressing"), ("False".into(), "SecretNotFound".into(), "changes are applied once the Secret exists".into()));
    assert_eq!((condition(&st, "Ready").0, st.proxy_url.as_deref(), st.ready_replicas), ("True".into(), Some(url.as_str()), 2));
    assert_eq!(deploys.get("edge").await.unwrap().spec.replicas, Some(2), "the change waits for the Secret");
}

