//! The engine API against the local control plane, with the operator binary running as the
//! chart's ServiceAccount: who may get a console (401/403 with a reason), what a bad request
//! gets (404 naming the unknown cluster or pool, 400 for a target outside the allow-list),
//! oVirt's checkbox semantics, one audit line per ticket — and end to end, the issued `.vv`
//! opened by remote-viewer reaches a real qemu SPICE server through the proxy, and fails with
//! a 407 from the proxy once its ticket has expired.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::spice::{Display, active_tunnels, artifact, qemu_with_password, unique_colours};
use common::engine_api::*;
use common::*;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use spice_operator::crd::{ClusterConsolePolicy, SpiceProxy};

const T: Duration = Duration::from_secs(60);

struct Setup {
    ns: TestNamespace,
    policy: String,
    spice_port: u16,
    proxy_port: u16,
}

/// A SpiceProxy whose clients reach a proxy process on `proxy_port` (run from the generated
/// config), allowing only `spice_port` on 127.0.0.1; a policy with a cluster whose pool
/// `desktops` inherits it, a `direct` pool and an opted-out VM.
async fn setup(client: &Client, prefix: &str, spice_port: u16) -> Setup {
    let ns = TestNamespace::new(client, prefix).await;
    let proxy_port = free_port();
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let p = spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: 127.0.0.1, port: {proxy_port}}}\n  allowedTargets: [{{cidr: 127.0.0.1/32, ports: [{{from: {spice_port}}}]}}]\n  html5: {{port: 6082}}\n",
        ns.name
    ));
    spx_api.create(&PostParams::default(), &p).await.unwrap();
    wait_for(&spx_api, "edge", T, |s| s.status.clone().filter(|st| is_ready(&st.conditions))).await;
    let policy = format!("{}-engine", ns.name);
    let ccp: ClusterConsolePolicy = serde_yaml::from_str(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {{name: {policy}}}\nspec:\n  clusters:\n  - name: prod\n    proxy: {{spiceProxyRef: {{name: edge, namespace: {}}}}}\n    pools: [{{name: desktops}}, {{name: kiosks, proxy: {{direct: true}}}}]\n  vmOptOuts: [{{name: private-vm, cluster: prod}}]\n",
        ns.name
    ))
    .unwrap();
    Api::<ClusterConsolePolicy>::all(client.clone()).create(&PostParams::default(), &ccp).await.unwrap();
    Setup { ns, policy, spice_port, proxy_port }
}

async fn teardown(client: &Client, s: &Setup) {
    let _ = Api::<ClusterConsolePolicy>::all(client.clone()).delete(&s.policy, &DeleteParams::default()).await;
    let _ = Api::<ClusterRoleBinding>::all(client.clone()).delete(&format!("{}-engine", s.ns.name), &DeleteParams::default()).await;
}

fn console_body(s: &Setup, pool: &str, vm: &str, host: &str) -> Value {
    json!({"policy": s.policy, "cluster": "prod", "pool": pool, "vm": vm, "host": host, "port": s.spice_port, "password": "s3cret"})
}

fn res_html5(api: &EngineApi, token: &str, s: &Setup, pool: &str) -> Value {
    let r = api.call("GET", &format!("/v1/resolve?policy={}&cluster=prod&pool={pool}&vm=vm1", s.policy), Some(token), None).unwrap();
    serde_json::from_str::<Value>(&r.body).unwrap()["html5Url"].clone()
}

fn proxy_line(vv: &str) -> Option<&str> {
    vv.lines().find_map(|l| l.strip_prefix("proxy="))
}

#[tokio::test]
async fn engine_api_authenticates_authorises_and_reports_bad_requests() {
    let client = client().await;
    let api = EngineApi::start(&client).await;
    let s = setup(&client, "engine-api", 5930).await;
    let ok = service_account_token(&client, &s.ns.name, "engine", true).await;
    let stranger = service_account_token(&client, &s.ns.name, "stranger", false).await;
    let body = console_body(&s, "desktops", "vm1", "127.0.0.1");

    // Authentication and authorisation, each with a reason.
    let r = api.call("POST", "/v1/console", None, Some(&body)).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("no bearer token"), "{}", r.body);
    let r = api.console("not-a-token", &body);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = api.console(&stranger, &body);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains(&format!("system:serviceaccount:{}:stranger may not get clusterconsolepolicies", s.ns.name)), "{}", r.body);

    // An authorised engine gets a .vv with a fresh ticket for exactly this target.
    let r = api.console(&ok, &body);
    assert_eq!((r.status, r.content_type.as_str()), (200, "application/x-virt-viewer"), "{}", r.body);
    let line = proxy_line(&r.body).expect("a proxy= line");
    assert!(line.starts_with("http://console:v1.") && line.ends_with(&format!("@127.0.0.1:{}", s.proxy_port)), "{}", r.body);
    assert!(r.body.contains("\ndelete-this-file=1\n") && r.body.contains("\npassword=s3cret\n"), "{}", r.body);
    // Its caches filled, the replica is ready (they are part of /readyz).
    assert_eq!(http_get(api.operator.admin_port, "/readyz").as_deref(), Some("ready\n"));

    // Unknown names: 404 with the name.
    let mut bad = body.clone();
    bad["cluster"] = "staging".into();
    let r = api.console(&ok, &bad);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("cluster \\\"staging\\\" is not in policy"), "{}", r.body);
    let mut bad = body.clone();
    bad["pool"] = "labs".into();
    let r = api.console(&ok, &bad);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("pool \\\"labs\\\" is not in cluster \\\"prod\\\""), "{}", r.body);
    let r = api.call("GET", "/v1/resolve?policy=nope&cluster=prod", Some(&ok), None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.body.contains("policy \\\"nope\\\" does not exist"), "{}", r.body);

    // A console endpoint the proxy would refuse gets no ticket: 400 with the reason.
    let r = api.console(&ok, &console_body(&s, "desktops", "vm1", "10.1.2.3"));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("10.1.2.3:5930 is outside the allow-list of SpiceProxy") && r.body.contains("127.0.0.1/32 ports 5930"), "{}", r.body);
    let mut other_port = body.clone();
    other_port["tlsPort"] = 5931.into();
    assert_eq!(api.console(&ok, &other_port).status, 400);
    // Malformed input: 400 saying what is wrong, nothing minted.
    let mut bad = body.clone();
    bad["password"] = "x\nproxy=http://evil:1".into();
    let r = api.console(&ok, &bad);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("password contains control characters"), "{}", r.body);
    let r = api.console(&ok, &json!({"policy": s.policy}));
    assert_eq!(r.status, 400, "{}", r.body);

    // oVirt's checkbox: with a proxy configured the user's choice is honoured...
    let res: Value = serde_json::from_str(&api.call("GET", &format!("/v1/resolve?policy={}&cluster=prod&pool=desktops&vm=vm1", s.policy), Some(&ok), None).unwrap().body).unwrap();
    assert_eq!(res["proxyConfigured"], true);
    assert_eq!(res["source"], "Cluster");
    let mut unticked = body.clone();
    unticked["proxyEnabled"] = false.into();
    let r = api.console(&ok, &unticked);
    assert_eq!(r.status, 200);
    assert_eq!(proxy_line(&r.body), None, "{}", r.body);
    // ...without one, proxyConfigured is false and the choice is ignored.
    let res: Value = serde_json::from_str(&api.call("GET", &format!("/v1/resolve?policy={}&cluster=prod&pool=kiosks", s.policy), Some(&ok), None).unwrap().body).unwrap();
    assert_eq!((res["proxyConfigured"].clone(), res["proxyUrl"].clone(), res["source"].clone()), (json!(false), Value::Null, json!("Pool")));
    let r = api.console(&ok, &console_body(&s, "kiosks", "vm2", "10.1.2.3"));
    assert_eq!(r.status, 200);
    assert_eq!(proxy_line(&r.body), None);
    // An opted-out VM never gets a proxy.
    let res: Value = serde_json::from_str(&api.call("GET", &format!("/v1/resolve?policy={}&cluster=prod&pool=desktops&vm=private-vm", s.policy), Some(&ok), None).unwrap().body).unwrap();
    assert_eq!((res["source"].clone(), res["proxyConfigured"].clone()), (json!("VM"), json!(false)));
    assert_eq!(proxy_line(&api.console(&ok, &console_body(&s, "desktops", "private-vm", "127.0.0.1")).body), None);

    // The browser console: html5Url resolved per level like proxyUrl, handed out with a token.
    assert_eq!(res_html5(&api, &ok, &s, "desktops"), json!("http://127.0.0.1:6082/spice_auto.html"));
    assert_eq!(res_html5(&api, &ok, &s, "kiosks"), Value::Null);
    let ccp = Api::<ClusterConsolePolicy>::all(client.clone()).get(&s.policy).await.unwrap().status.unwrap();
    let pool = ccp.pools.iter().find(|p| p.name == "desktops").unwrap();
    assert_eq!(pool.html5_url.as_deref(), Some("http://127.0.0.1:6082/spice_auto.html"));
    let answer = api.console_json(&ok, &body);
    let html5 = answer["html5Url"].as_str().expect("html5Url with a token");
    assert!(html5.starts_with("http://127.0.0.1:6082/spice_auto.html?token=v1."), "{answer}");
    // The VM's SPICE password too: spice-html5 reads it from the URL only.
    assert!(html5.ends_with("&password=s3cret"), "{answer}");
    assert!(answer["vv"].as_str().unwrap().contains("proxy=http://console:v1."));

    // One audit line per ticket (here: the first console and the JSON one), never the ticket.
    let ticket = line.split(':').nth(2).unwrap().split('@').next().unwrap().to_string();
    // Audit lines are written a few milliseconds after they are queued.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (log, issued) = loop {
        let log = api.operator.log_text();
        let issued: Vec<Value> = log.lines().filter(|l| l.contains("\"ticketIssued\"")).map(|l| serde_json::from_str(l).unwrap()).collect();
        if issued.iter().filter(|v| v["policy"] == json!(s.policy)).count() >= 2 || Instant::now() > deadline {
            break (log, issued);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mine: Vec<&Value> = issued.iter().filter(|v| v["policy"] == json!(s.policy)).collect();
    assert_eq!(mine.len(), 2, "{issued:?}");
    assert_eq!(mine[0]["caller"], json!(format!("system:serviceaccount:{}:engine", s.ns.name)));
    assert_eq!((mine[0]["vm"].clone(), mine[0]["target"].clone()), (json!("vm1"), json!("127.0.0.1:5930")));
    assert!(mine[0]["expires"].as_u64().unwrap() > 0);
    assert!(!log.contains(&ticket), "the ticket must never be logged");
    // Every answer above, counted on /metrics by route and status (200, 400, 401, 403, 404).
    api.assert_metrics_count_every_answer();
    teardown(&client, &s).await;
}

/// GET requests this operator process has sent to the Kubernetes API.
fn gets_sent(api: &EngineApi) -> f64 {
    api.counter("spice_operator_kube_api_requests_total{verb=\"GET\"}") as f64
}

/// Polls `answer` (an engine API call) until `done`; how long it took.
fn until_answer(what: &str, limit: Duration, mut answer: impl FnMut() -> Reply, done: impl Fn(&Reply) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let r = answer();
        if done(&r) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what} not seen within {limit:?}; last answer {} {}", r.status, r.body);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn console_requests_read_watch_caches_that_follow_every_change() {
    let client = client().await;
    let api = EngineApi::start(&client).await;
    let s = setup(&client, "engine-cache", 5932).await;
    let token = service_account_token(&client, &s.ns.name, "engine", true).await;
    let resolve = |vm: &str| api.call("GET", &format!("/v1/resolve?policy={}&cluster=prod&pool=desktops&vm={vm}", s.policy), Some(&token), None).unwrap();
    assert_eq!(resolve("vm1").status, 200, "a policy created a moment ago is found");

    // Neither the policy nor its SpiceProxy is fetched per request: of the API requests a
    // console costs, only the key Secret is a GET (reading both objects would be 3 per console).
    let body = console_body(&s, "desktops", "vm1", "127.0.0.1");
    assert_eq!(api.console(&token, &body).status, 200);
    const N: usize = 20;
    let before = gets_sent(&api);
    for _ in 0..N {
        let r = api.console(&token, &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let gets = gets_sent(&api) - before;
    assert!(gets <= (N + N / 2) as f64, "{gets} GET requests for {N} consoles");

    // A change reaches the next requests: a VM opted out, the SpiceProxy moved.
    let ccp_api = Api::<ClusterConsolePolicy>::all(client.clone());
    let patch = json!({"spec": {"vmOptOuts": [{"name": "private-vm", "cluster": "prod"}, {"name": "vm-late", "cluster": "prod"}]}});
    ccp_api.patch(&s.policy, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let took = until_answer("the opt-out", Duration::from_secs(5), || resolve("vm-late"), |r| serde_json::from_str::<Value>(&r.body).unwrap()["source"] == "VM");
    eprintln!("opt-out seen by the engine API after {took:?}");
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &s.ns.name);
    let moved = json!({"spec": {"externalAddress": {"host": "127.0.0.2"}}});
    spx_api.patch("edge", &PatchParams::default(), &Patch::Merge(&moved)).await.unwrap();
    until_answer("the SpiceProxy's new address", Duration::from_secs(30), || resolve("vm1"), |r| {
        serde_json::from_str::<Value>(&r.body).unwrap()["proxyUrl"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.2:"))
    });

    // A deleted policy is gone for the engine API too.
    ccp_api.delete(&s.policy, &DeleteParams::default()).await.unwrap();
    until_answer("the deletion", Duration::from_secs(5), || resolve("vm1"), |r| r.status == 404 && r.body.contains("does not exist"));
    teardown(&client, &s).await;
}

/// TokenReviews or SubjectAccessReviews this operator process's engine API has sent.
fn reviews(api: &EngineApi, kind: &str) -> u64 {
    api.counter(&format!("spice_operator_engine_reviews_total{{kind=\"{kind}\"}}"))
}

/// The API server's yes to an engine's token and to each of its accesses is reused for
/// `--api-auth-cache-seconds` (5 here): 10 consoles cost one TokenReview and two
/// SubjectAccessReviews (the policy, the tickets) instead of 10 and 20; a revoked binding stops
/// working within the 5 s; a no is not kept, so a binding granted after a refusal works at once.
#[tokio::test]
async fn callers_yes_is_reused_briefly_and_a_revoked_binding_stops_working_within_it() {
    let client = client().await;
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    let api = EngineApi::start_with(&client, &kubeconfig, &["--lease-name", "spice-operator-leader", "--api-auth-cache-seconds", "5"]).await;
    let s = setup(&client, "engine-authcache", 5934).await;
    let token = service_account_token(&client, &s.ns.name, "engine", true).await;
    let body = console_body(&s, "desktops", "vm1", "127.0.0.1");
    let first = Instant::now();
    // The engine's watch caches may trail the objects setup just made by a moment (on a fresh
    // API server its watch cache for the CRDs is still filling): the first console waits for
    // them. Its refusals, if any, reuse the same cached yes.
    until_answer("the first console", Duration::from_secs(10), || api.console(&token, &body), |r| r.status == 200);
    for _ in 0..9 {
        let r = api.console(&token, &body);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let took = first.elapsed();
    let (token_reviews, access_reviews) = (reviews(&api, "TokenReview"), reviews(&api, "SubjectAccessReview"));
    eprintln!("10 consoles in {took:?}: {token_reviews} TokenReviews, {access_reviews} SubjectAccessReviews");
    if took < Duration::from_secs(4) {
        assert_eq!((token_reviews, access_reviews), (1, 2), "all 10 consoles within the 5 s");
    } else {
        // A slow machine: some answers expired during the loop, still far fewer than 10 and 20.
        assert!(token_reviews <= 3 && access_reviews <= 6, "{token_reviews} TokenReviews, {access_reviews} SubjectAccessReviews");
    }

    // Revoked: the cached yes may serve requests for what is left of its 5 s, then 403.
    let binding = format!("{}-engine", s.ns.name);
    Api::<ClusterRoleBinding>::all(client.clone()).delete(&binding, &DeleteParams::default()).await.unwrap();
    let revoked = Instant::now();
    until_answer("the revocation", Duration::from_secs(8), || api.console(&token, &body), |r| r.status == 403);
    eprintln!("revocation took effect after {:?} (the cached yes was {:?} old)", revoked.elapsed(), revoked - first);
    assert!(revoked.elapsed() <= Duration::from_secs(5) + Duration::from_secs(1), "a revoked binding worked for {:?}", revoked.elapsed());

    // Granted again: the refusal was not kept, the next request after the API server's own
    // RBAC caught up (milliseconds) is answered 200, well inside the 5 s.
    let out = std::process::Command::new("kubectl")
        .args(["create", "clusterrolebinding", &binding, "--clusterrole", ISSUER_ROLE, "--serviceaccount", &format!("{}:engine", s.ns.name)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let regranted = until_answer("the new binding", Duration::from_secs(3), || api.console(&token, &body), |r| r.status == 200);
    assert!(regranted < Duration::from_secs(2), "a refusal kept for {regranted:?}");
    api.assert_metrics_count_every_answer();
    teardown(&client, &s).await;
}

#[tokio::test]
async fn issued_vv_opens_in_remote_viewer_through_the_proxy_and_expires() {
    let client = client().await;
    // The VM's console has a password, as oVirt sets on every VM: the .vv carries it.
    let (_qemu, spice_port) = qemu_with_password("one-time-pw");
    let api = EngineApi::start(&client).await;
    let s = setup(&client, "engine-vv", spice_port).await;
    let token = service_account_token(&client, &s.ns.name, "engine", true).await;
    let (_proxy, admin, audit, _dir) = generated_proxy(&client, &s.ns.name, "edge", s.proxy_port).await;
    let display = Display::start();
    let blank = artifact("engine-blank.png");
    display.screenshot(&blank);

    // A fresh console: remote-viewer reaches the VM through the proxy with the ticket.
    let r = api.console(&token, &json!({"policy": s.policy, "cluster": "prod", "pool": "desktops", "vm": "vm-e2e", "host": "127.0.0.1", "port": spice_port, "password": "one-time-pw"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let vv = write_vv(&r.body, "fresh");
    let viewer = display.remote_viewer(&vv);
    let deadline = Instant::now() + Duration::from_secs(60);
    while active_tunnels(admin) < 2 {
        assert!(Instant::now() < deadline, "remote-viewer opened no channels through the proxy");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(8));
    let shot = artifact("engine-remote-viewer.png");
    display.screenshot(&shot);
    let (before, after) = (unique_colours(&blank), unique_colours(&shot));
    assert!(before <= 2 && after > 16, "the VM screen did not show: {before} colours before, {after} after ({})", shot.display());
    drop(viewer);
    while let Ok(line) = audit.recv_timeout(Duration::from_secs(3)) {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["outcome"], "ok", "{line}");
        assert!(v["subject"].as_str().unwrap().contains("vm=vm-e2e"), "{line}");
    }

    // The same kind of file once its ticket has expired: the proxy refuses it with 407.
    let r = api.console(&token, &json!({"policy": s.policy, "cluster": "prod", "pool": "desktops", "vm": "vm-e2e", "host": "127.0.0.1", "port": spice_port, "ttlSeconds": 1}));
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(2100));
    let vv = write_vv(&r.body, "expired");
    let _viewer = display.remote_viewer(&vv);
    let line = audit.recv_timeout(Duration::from_secs(30)).expect("the proxy logged the refused attempt");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["outcome"].as_str(), v["close"].as_str()), (Some("407"), Some("407 ticket expired")), "{line}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(active_tunnels(admin), 0, "an expired ticket opened a tunnel");

    // Unticked checkbox: no proxy= line, the console goes direct.
    let r = api.console(&token, &json!({"policy": s.policy, "cluster": "prod", "pool": "desktops", "vm": "vm-e2e", "host": "127.0.0.1", "port": spice_port, "proxyEnabled": false}));
    assert_eq!(proxy_line(&r.body), None, "{}", r.body);
    teardown(&client, &s).await;
}

fn write_vv(body: &str, name: &str) -> PathBuf {
    let path = artifact(&format!("engine-{name}-{}.vv", std::process::id()));
    std::fs::write(&path, body).unwrap();
    assert!(Path::new(&path).exists());
    path
}

/// `engineApi.tlsSecret` renewed in place (cert-manager, then the kubelet updates the volume):
/// the running operator serves the renewal to new connections, and its /metrics tells when the
/// served certificate expires.
#[tokio::test]
async fn a_renewed_engine_api_certificate_is_served_without_a_restart() {
    use common::tls::{connect, localhost_cert, renew_in_place, served, trusting};
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    let dir = tempfile::tempdir().unwrap();
    let ((old, old_key), (renewed, renewed_key)) = (localhost_cert(2030), localhost_cert(2031));
    std::fs::write(dir.path().join("tls.crt"), old.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), old_key.serialize_pem()).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let args = ["--lease-name", "spice-operator-leader", "--api-addr", &addr.to_string(), "--api-tls-dir", dir.path().to_str().unwrap()];
    let operator = OperatorProcess::spawn("engine-tls-renewal", &kubeconfig, &args);
    let config = trusting(&[&old, &renewed]);
    let expiry = || {
        let text = http_get(operator.admin_port, "/metrics").unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("spice_operator_engine_api_certificate_expiry_timestamp_seconds ")?.parse::<i64>().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match connect(addr, &config).await {
            Ok(tls) => break served(&tls),
            Err(e) => assert!(Instant::now() < deadline, "the engine API did not answer over TLS within 30 s: {e}\n{}", operator.log_text()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first, *old.der());
    assert_eq!(expiry(), Some(1_893_456_000), "2030-01-01T00:00:00Z");
    renew_in_place(dir.path(), &renewed, &renewed_key);
    let within = spice_operator::mounted::RELOAD_EVERY + Duration::from_secs(10);
    let deadline = Instant::now() + within;
    while served(&connect(addr, &config).await.unwrap()) != *renewed.der() {
        assert!(Instant::now() < deadline, "the renewed certificate was not served within {within:?}:\n{}", operator.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(expiry(), Some(1_924_992_000), "2031-01-01T00:00:00Z");
    assert!(operator.log_text().contains("engine API certificate: using the renewed files"), "{}", operator.log_text());
}

/// The engine API holds at most `--api-max-connections` connections at once, fewer when the
/// process's open-files limit leaves descriptors for fewer (lowered, with a warning that says
/// so). One more closes the connection that has waited longest, counted: silent connections
/// cannot keep an engine out, and an idle kept-alive one is closed only when it is the oldest.
#[tokio::test]
async fn the_engine_api_holds_no_more_connections_than_its_limit_and_the_open_files_limit_allow() {
    use common::tls::{connect, trusting};
    use tokio::io::AsyncReadExt;
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    let (dir, cert, addr) = engine_api_files();
    let args = ["--lease-name", "spice-operator-leader", "--api-addr", &addr.to_string(), "--api-tls-dir", dir.path().to_str().unwrap(), "--api-max-connections", "3"];
    // 2 × 256 descriptors are kept for the rest of the operator: 514 leave two for the engine API.
    let operator = OperatorProcess::spawn_limited("engine-connection-limit", &kubeconfig, &args, Some((514, 514)));
    let config = trusting(&[&cert]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = connect(addr, &config).await {
        assert!(Instant::now() < deadline, "the engine API did not answer over TLS within 30 s: {e}\n{}", operator.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = operator.log_text();
    assert!(log.contains("leaves descriptors for 2 connections only, fewer than --api-max-connections asks"), "no warning of the lowered limit:\n{log}");
    let (open, closed) = (|| engine_counter(operator.admin_port, "spice_operator_engine_connections"), || engine_counter(operator.admin_port, "spice_operator_engine_connections_closed_total"));
    let until = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "{what} within 5 s: {} open, {} closed", open(), closed());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The readiness connections above give their places back once the server has seen them close.
    until("no connection open", &|| open() == 0);
    let before = closed();

    // The two places: one client mid-handshake (it sends nothing), then one served and kept alive.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    until("the silent client taken in", &|| open() == 1);
    let mut served = connect(addr, &config).await.expect("a TLS handshake beside the silent client");
    let answer = healthz(&mut served).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
    assert_eq!((open(), closed()), (2, before));

    // A third: served at once; the silent client, waiting longest, makes room and is counted.
    let mut third = tokio::time::timeout(Duration::from_secs(5), connect(addr, &config)).await.expect("a TLS handshake within 5 s").expect("a third engine is served");
    assert!(healthz(&mut third).await.starts_with("HTTP/1.1 200"));
    let mut byte = [0u8; 1];
    let gone = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await.expect("the silent client closed within 5 s");
    assert!(matches!(gone, Ok(0) | Err(_)), "the silent client was closed: {gone:?}");
    assert_eq!(closed(), before + 1);
    assert!(healthz(&mut served).await.starts_with("HTTP/1.1 200"), "the kept-alive connection is still served");

    // A fourth: now the kept-alive connection, idle since its answer, has waited longest.
    let mut fourth = tokio::time::timeout(Duration::from_secs(5), connect(addr, &config)).await.expect("a TLS handshake within 5 s").expect("a fourth engine is served");
    assert!(healthz(&mut fourth).await.starts_with("HTTP/1.1 200"));
    let gone = tokio::time::timeout(Duration::from_secs(5), served.read(&mut byte)).await.expect("the idle kept-alive connection closed within 5 s");
    assert!(matches!(gone, Ok(0) | Err(_)), "the idle kept-alive connection was closed: {gone:?}");
    assert_eq!(closed(), before + 2);
    assert!(healthz(&mut third).await.starts_with("HTTP/1.1 200"), "the newer kept-alive connection is still served");
}

/// A stopping replica (a rollout, a drained node) fails /readyz at once, but kube-proxy goes on
/// sending engines to it until it learns of that: for `--api-shutdown-delay-seconds` the
/// engine API still answers new connections, then it stops accepting and the process exits 0.
#[tokio::test]
async fn a_stopping_operator_serves_the_engine_api_for_its_shutdown_delay_while_not_ready() {
    use common::tls::{connect, trusting};
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    let (dir, cert, addr) = engine_api_files();
    let args = ["--lease-name", "spice-operator-leader", "--api-addr", &addr.to_string(), "--api-tls-dir", dir.path().to_str().unwrap(), "--api-shutdown-delay-seconds", "5"];
    let mut operator = OperatorProcess::spawn("engine-shutdown-delay", &kubeconfig, &args);
    let config = trusting(&[&cert]);
    let ready = |port| http_get(port, "/readyz").unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(operator.admin_port) != "ready\n" {
        assert!(Instant::now() < deadline, "not ready within 30 s: {:?}\n{}", ready(operator.admin_port), operator.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    operator.signal("TERM");
    let stopped = Instant::now();
    while !ready(operator.admin_port).contains("stopping") {
        assert!(stopped.elapsed() < Duration::from_secs(2), "/readyz did not fail within 2 s of SIGTERM: {:?}", ready(operator.admin_port));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tls = connect(addr, &config).await.expect("an engine sent here after SIGTERM, within the delay, is answered");
    let answer = healthz(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
    assert!(stopped.elapsed() < Duration::from_secs(5), "the checks above took the whole delay: {:?}", stopped.elapsed());
    refuses_after_the_delay(addr, stopped, Duration::from_secs(5)).await;
    let status = loop {
        if let Some(status) = operator.child.try_wait().unwrap() {
            break status;
        }
        assert!(stopped.elapsed() < Duration::from_secs(12), "still running 12 s after SIGTERM:\n{}", operator.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", operator.log_text());
    assert!(operator.log_text().contains("the engine API still serving for its shutdown delay"), "{}", operator.log_text());
}

/// GET /healthz on an engine API connection (kept alive): the answer, head and body.
async fn healthz(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut answer = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut answer)).await.expect("an answer within 5 s").unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// What `--api-tls-dir` reads (tls.crt and tls.key for localhost, valid until 2030) in a new
/// directory, the certificate, and a free loopback address for the engine API.
fn engine_api_files() -> (tempfile::TempDir, rcgen::Certificate, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::tls::localhost_cert(2030);
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    (dir, cert, std::net::SocketAddr::from(([127, 0, 0, 1], free_port())))
}

/// A counter from the operator's /metrics (0 while it is not there yet).
fn engine_counter(admin_port: u16, series: &str) -> u64 {
    let text = http_get(admin_port, "/metrics").unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse::<f64>().ok()).unwrap_or(0.0) as u64
}
