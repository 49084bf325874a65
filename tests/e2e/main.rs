//! End-to-end scenarios, written once against any kubeconfig where the chart is installed as
//! release `spice-operator` in `spice-operator-system`:
//!
//! - `make e2e-kind` (Docker + kind): the image is built and loaded, `helm install` runs the
//!   operator in the cluster and proxy pods are real; set `E2E_OPERATOR=in-cluster`.
//! - `make test` (here, no kubelet): the chart is installed with no operator pods, and these
//!   tests run the operator binary themselves with a token of the chart's ServiceAccount; the
//!   tunnel runs through a proxy process fed the exact ConfigMap and key Secret the operator
//!   generated for the pods.
#[path = "../common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use spice_operator::crd::{ClusterConsolePolicy, SpiceProxy};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/spice-operator");
const BIN: &str = env!("CARGO_BIN_EXE_spice-operator");
const T: Duration = Duration::from_secs(60);

fn in_cluster() -> bool {
    std::env::var("E2E_OPERATOR").as_deref() == Ok("in-cluster")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Values every release of these tests gets: the image under test in kind, nothing here.
fn image_values() -> Vec<String> {
    match std::env::var("E2E_IMAGE") {
        Ok(image) => {
            let (repo, tag) = image.rsplit_once(':').expect("E2E_IMAGE=repo:tag");
            vec!["--set".into(), format!("image.repository={repo}"), "--set".into(), format!("image.tag={tag}"), "--set".into(), "image.pullPolicy=Never".into()]
        }
        Err(_) => vec![],
    }
}

#[tokio::test]
async fn helm_template_is_accepted_by_the_api_server() {
    let rendered = run(Command::new("helm").args(["template", "spice-operator", CHART, "-n", RELEASE_NAMESPACE, "--kube-version", "1.37.2"]));
    let mut apply = Command::new("kubectl")
        .args(["apply", "--server-side", "--dry-run=server", "--force-conflicts", "--field-manager=e2e-dry-run", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    apply.stdin.take().unwrap().write_all(rendered.as_bytes()).unwrap();
    let out = apply.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the API server rejected the rendered chart:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    for object in ["customresourcedefinition", "clusterrole", "deployment", "serviceaccount", "role", "poddisruptionbudget", "service"] {
        assert!(text.contains(object), "{object} missing from the dry run:\n{text}");
    }
}

#[tokio::test]
async fn helm_install_upgrade_uninstall() {
    let client = client().await;
    let ns = TestNamespace::new(&client, "e2e-helm").await;
    let release = format!("rel-{}", &ns.name[ns.name.len() - 6..]);
    let full = format!("{release}-spice-operator");
    let helm = |args: &[&str]| {
        let mut cmd = Command::new("helm");
        cmd.args(args).args(["-n", &ns.name, "--timeout", "2m"]).args(image_values());
        run(&mut cmd)
    };
    // The CRDs belong to the main release; a second release must not claim them. No operator
    // pods: two releases reconciling the same objects is not a supported setup.
    helm(&["install", &release, CHART, "--wait", "--set", "crds.install=false", "--set", "replicaCount=0"]);
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deploys.get(&full).await.unwrap();
    let ctr = &d.spec.template.spec.as_ref().unwrap().containers[0];
    let env = |c: &k8s_openapi::api::core::v1::Container, k: &str| c.env.iter().flatten().find(|e| e.name == k).and_then(|e| e.value.clone());
    assert_eq!(env(ctr, "RUST_LOG").as_deref(), Some("info"));
    assert!(Api::<ClusterRole>::all(client.clone()).get_opt(&full).await.unwrap().is_some());

    // Changed values take effect.
    helm(&["upgrade", &release, CHART, "--wait", "--reuse-values", "--set", "logLevel=debug", "--set", "metrics.port=9100"]);
    let d = deploys.get(&full).await.unwrap();
    let ctr = &d.spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(env(ctr, "RUST_LOG").as_deref(), Some("debug"));
    assert_eq!(ctr.ports.as_ref().unwrap()[0].container_port, 9100);
    let svc = Api::<Service>::namespaced(client.clone(), &ns.name).get(&format!("{full}-metrics")).await.unwrap();
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 9100);
    if !in_cluster() {
        // kwok runs the pods here: two replicas become Ready and get their disruption budget.
        helm(&["upgrade", &release, CHART, "--wait", "--reuse-values", "--set", "replicaCount=2"]);
        let d = deploys.get(&full).await.unwrap();
        assert_eq!(d.status.unwrap().ready_replicas, Some(2));
        assert!(Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns.name).get_opt(&full).await.unwrap().is_some());
    }
    assert!(run(Command::new("helm").args(["history", &release, "-n", &ns.name])).contains("Upgrade complete"));

    helm(&["uninstall", &release, "--wait"]);
    assert!(deploys.get_opt(&full).await.unwrap().is_none());
    assert!(Api::<ClusterRole>::all(client.clone()).get_opt(&full).await.unwrap().is_none());
    // The CRDs (and so every user's objects) survive any uninstall.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt("spiceproxies.console.spice-operator.io").await.unwrap().is_some());
}

/// The operator for the scenarios: in kind it already runs in the cluster; here the binary,
/// as the chart's ServiceAccount, with leader election on the chart's Lease.
fn scenario_operator() -> Option<OperatorProcess> {
    if in_cluster() {
        return None;
    }
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    Some(OperatorProcess::spawn("e2e", &kubeconfig, &["--lease-name", "spice-operator-leader"]))
}

#[tokio::test]
async fn proxy_serves_ticketed_tunnels_and_policy_hands_out_its_url() {
    let client = client().await;
    let _operator = scenario_operator();
    let ns = TestNamespace::new(&client, "e2e-proxy").await;

    // The tunnel target: in kind the proxy pod's own admin port (a real HTTP server inside the
    // pod network); here a loopback HTTP responder.
    let target_cidr = if in_cluster() { "10.0.0.0/8" } else { "127.0.0.0/8" };
    let target_ports = if in_cluster() { "9090" } else { "1024, to: 65535" };
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let p = spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  replicas: 2\n  externalAddress: {{host: console.example.com}}\n  allowedTargets: [{{cidr: {target_cidr}, ports: [{{from: {target_ports}}}]}}]\n",
        ns.name
    ));
    spx_api.create(&PostParams::default(), &p).await.unwrap();
    let st = wait_for(&spx_api, "edge", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions) && st.ready_replicas == 2)).await;
    assert_eq!(st.proxy_url.as_deref(), Some("http://console.example.com:3128"));

    // The engine reads the URL from the policy.
    let policy_name = format!("{}-policy", ns.name);
    let policy: ClusterConsolePolicy = serde_yaml::from_str(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {policy_name}}}\nspec:\n  defaultProxy: {{spiceProxyRef: {{name: edge, namespace: {}}}}}\n  clusters: [{{name: prod, pools: [{{name: desktops}}]}}]\n",
        ns.name
    ))
    .unwrap();
    let ccp_api: Api<ClusterConsolePolicy> = Api::all(client.clone());
    ccp_api.create(&PostParams::default(), &policy).await.unwrap();
    let cst = wait_for(&ccp_api, &policy_name, T, |c| c.status.clone().filter(|s| is_ready(&s.conditions))).await;
    assert_eq!(cst.pools[0].proxy_url.as_deref(), Some("http://console.example.com:3128"));

    // Tickets are signed with the key Secret the operator made; any replica checks them.
    let key = Api::<Secret>::namespaced(client.clone(), &ns.name).get("edge-keys").await.unwrap().data.unwrap()["current"].0.clone();
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), &key).unwrap();

    let (proxy_addr, target, _keep) = if in_cluster() { through_service(&client, &ns.name).await } else { through_generated_config(&client, &ns.name, key_file.path()).await };
    let ticket = run(Command::new(BIN).args(["ticket", "--target", &format!("{}:{}", target.ip(), target.port()), "--ttl", "60", "--subject", "e2e"]).arg("--key-file").arg(key_file.path()));
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("e2e:{}", ticket.trim()));

    // A ticketed CONNECT reaches the target and carries an HTTP exchange both ways.
    let reply = connect_and_get(proxy_addr, target, Some(&auth));
    assert!(reply.starts_with("HTTP/1.1 200"), "CONNECT refused: {reply}");
    assert!(reply.contains("ok"), "no answer through the tunnel: {reply}");
    // No ticket: 407. Never an open proxy.
    let reply = connect_and_get(proxy_addr, target, None);
    assert!(reply.starts_with("HTTP/1.1 407"), "{reply}");
    // The ticket does not open another target, even an allowed one.
    let other = SocketAddr::new(target.ip(), if target.port() == 9090 { 9091 } else { target.port() + 1 });
    let reply = connect_and_get(proxy_addr, other, Some(&auth));
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");

    let _ = ccp_api.delete(&policy_name, &DeleteParams::default()).await;
}

/// `spice-operator rotate-key`: the first run stages a key that replicas accept before anything
/// signs with it; the second signs with it and keeps the old one, so tickets issued before keep
/// working; a rotation that would retire a key whose tickets may still live is refused.
#[tokio::test]
async fn the_ticket_key_rotates_in_two_steps_without_refusing_a_ticket() {
    let client = client().await;
    let _operator = scenario_operator();
    let ns = TestNamespace::new(&client, "e2e-rotate").await;
    let p = spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: console.example.com}}\n  allowedTargets: [{{cidr: 127.0.0.0/8, ports: [{{from: 1024, to: 65535}}]}}]\n",
        ns.name
    ));
    Api::<SpiceProxy>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &p).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let original = wait_for(&secrets, "edge-keys", T, |s| Some(s.data.clone()?.get("current")?.0.clone())).await;
    let rotate = |extra: &[&str]| Command::new(BIN).args(["rotate-key", "-n", &ns.name, "--spiceproxy", "edge"]).args(extra).output().unwrap();
    let slots = |s: &Secret| s.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect::<std::collections::BTreeMap<_, _>>();
    // Tickets signed with `key` through a replica run from the Secret as it is now: the statuses.
    let statuses = |keys: Vec<Vec<u8>>| {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            let (proxy, target, _keep) = through_generated_config(&client, &ns, std::path::Path::new("")).await;
            let mut out = Vec::new();
            for key in keys {
                let key_file = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(key_file.path(), &key).unwrap();
                let ticket = run(Command::new(BIN).args(["ticket", "--target", &target.to_string(), "--ttl", "600"]).arg("--key-file").arg(key_file.path()));
                let auth = base64::engine::general_purpose::STANDARD.encode(format!("u:{}", ticket.trim()));
                out.push(connect_and_get(proxy, target, Some(&auth)).split(' ').nth(1).unwrap_or_default().to_string());
            }
            out
        }
    };

    // 1. Stage: nothing signs with the new key yet, but replicas already accept it.
    let out = rotate(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("staged a new ticket key"), "{}", String::from_utf8_lossy(&out.stdout));
    let keys = slots(&secrets.get("edge-keys").await.unwrap());
    let staged = keys["next"].clone();
    assert_eq!((keys["current"].clone(), staged.len()), (original.clone(), 32));
    assert_ne!(staged, original);
    assert_eq!(statuses(vec![original.clone(), staged.clone(), b"some-other-key".to_vec()]).await, ["200", "200", "407"]);

    // 2. Too early to sign with it: a sentence and a failing exit code, nothing changed.
    let out = rotate(&[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was staged") && String::from_utf8_lossy(&out.stderr).contains("run again in"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(slots(&secrets.get("edge-keys").await.unwrap()), keys);

    // 3. Promote: the staged key signs; the old one stays accepted for tickets issued before.
    let out = rotate(&["--min-stage-seconds", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated = secrets.get("edge-keys").await.unwrap();
    let keys = slots(&rotated);
    assert_eq!((keys.get("current"), keys.get("previous"), keys.get("next")), (Some(&staged), Some(&original), None));
    let annotations = rotated.metadata.annotations.unwrap_or_default();
    assert!(annotations.contains_key("console.spice-operator.io/key-rotated-at") && !annotations.contains_key("console.spice-operator.io/key-staged-at"), "{annotations:?}");
    // managedFields tell a rotation's writes from anyone else's.
    let managers: Vec<_> = rotated.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.iter().any(|m| m == "spice-operator-rotate-key"), "{managers:?}");
    assert_eq!(statuses(vec![staged.clone(), original.clone()]).await, ["200", "200"]);

    // 4. Another promotion now would retire the original key while its tickets may still live.
    assert!(rotate(&[]).status.success(), "staging again retires nothing");
    let out = rotate(&["--min-stage-seconds", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tickets live up to 600 s"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(slots(&secrets.get("edge-keys").await.unwrap()).get("previous"), Some(&original));
}

/// CONNECT through the proxy; with a 200, send `GET /healthz` in the tunnel. Returns all bytes read.
fn connect_and_get(proxy: SocketAddr, target: SocketAddr, auth: Option<&str>) -> String {
    let mut s = TcpStream::connect(proxy).expect("proxy reachable");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth.map(|a| format!("Proxy-Authorization: Basic {a}\r\n")).unwrap_or_default();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let mut out = String::from_utf8_lossy(&head).into_owned();
    if out.starts_with("HTTP/1.1 200") {
        write!(s, "GET /healthz HTTP/1.0\r\nHost: target\r\n\r\n").unwrap();
    }
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    out.push_str(&rest);
    out
}

/// Things that must live as long as the tunnel test.
type Keep = Vec<Box<dyn std::any::Any>>;

/// kind: port-forward to the Service; the target is a proxy pod's admin port.
async fn through_service(client: &Client, ns: &str) -> (SocketAddr, SocketAddr, Keep) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default().labels("app.kubernetes.io/instance=edge")).await.unwrap();
    let ip = pods.items.iter().find_map(|p| p.status.as_ref()?.pod_ip.clone()).expect("a proxy pod with an IP");
    let local = free_port();
    let pf = Command::new("kubectl")
        .args(["port-forward", "-n", ns, "svc/edge", &format!("{local}:3128")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], local).into();
    common::spice::wait_port(pf.id(), local, "kubectl port-forward");
    (addr, SocketAddr::new(ip.parse().unwrap(), 9090), vec![Box::new(Killed(pf))])
}

/// Here: a proxy process run from the ConfigMap and key Secret the operator generated
/// (listen addresses moved to loopback ports); the target is a loopback HTTP responder.
async fn through_generated_config(client: &Client, ns: &str, _key_file: &std::path::Path) -> (SocketAddr, SocketAddr, Keep) {
    let listen = free_port();
    let (proxy, _admin, _audit, dir) = generated_proxy(client, ns, "edge", listen).await;
    let responder = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = responder.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in responder.incoming().flatten().take(8) {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    (([127, 0, 0, 1], listen).into(), target, vec![Box::new(proxy), Box::new(dir)])
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
