//! The engine API as an engine calls it: the operator binary serving it, curl over verified
//! TLS, and the bearer tokens of ServiceAccounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::spice::artifact;
use super::*;

/// The ClusterRole the chart ships for engines (release `spice-operator`, hack/test.sh).
pub const ISSUER_ROLE: &str = "spice-operator-console-issuer";

/// An HTTPS response as curl saw it.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

pub struct EngineApi {
    pub port: u16,
    pub ca: PathBuf,
    pub operator: OperatorProcess,
    /// Every /v1 answer this client got, by route and status: what the operator's
    /// /metrics must have counted.
    answered: Mutex<BTreeMap<(String, u16), u64>>,
}

impl EngineApi {
    /// An operator with the chart's credentials, in the election for the chart's Lease.
    pub async fn start(client: &Client) -> EngineApi {
        let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
        EngineApi::start_with(client, &kubeconfig, &["--lease-name", "spice-operator-leader"]).await
    }

    /// An operator with these credentials and `extra` arguments; answers once its API does.
    pub async fn start_with(client: &Client, kubeconfig: &Path, extra: &[&str]) -> EngineApi {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let args: Vec<&str> = extra.iter().copied().chain(["--api-addr", &addr]).collect();
        let operator = OperatorProcess::spawn(&format!("engine-{port}"), kubeconfig, &args);
        // The generated certificate is published for engines to trust.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
        let cm = wait_for(&cms, "spice-operator-api-ca", Duration::from_secs(30), |c| c.data.clone()).await;
        let ca = artifact(&format!("engine-api-ca-{port}.crt"));
        std::fs::write(&ca, &cm["ca.crt"]).unwrap();
        let api = EngineApi { port, ca, operator, answered: Mutex::default() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.call("GET", "/healthz", None, None).map(|r| r.status) != Some(200) {
            assert!(Instant::now() < deadline, "engine API did not answer over TLS:\n{}", api.operator.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        api
    }

    /// curl, verifying the certificate against the published CA (so TLS is real).
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Option<Reply> {
        let out_file = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "--max-time", "30", "-X", method, "--cacert"]).arg(&self.ca);
        cmd.args(["-o"]).arg(out_file.path()).args(["-w", "%{http_code} %{content_type}"]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data", &b.to_string()]);
        }
        cmd.arg(format!("https://localhost:{}{path}", self.port));
        let out = cmd.output().expect("curl");
        let meta = String::from_utf8_lossy(&out.stdout).to_string();
        let (code, ct) = meta.split_once(' ').unwrap_or((&meta, ""));
        let status: u16 = code.parse().ok().filter(|c| *c != 0)?;
        self.answered_with(path, status);
        Some(Reply { status, content_type: ct.to_string(), body: std::fs::read_to_string(out_file.path()).unwrap_or_default() })
    }

    pub fn console(&self, token: &str, body: &Value) -> Reply {
        self.call("POST", "/v1/console", Some(token), Some(body)).expect("engine API answers")
    }

    /// The console answer as JSON (`Accept: application/json`).
    pub fn console_json(&self, token: &str, body: &Value) -> Value {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "30", "--cacert"])
            .arg(&self.ca)
            .args(["-H", &format!("Authorization: Bearer {token}"), "-H", "Accept: application/json", "-H", "Content-Type: application/json"])
            .args(["--data", &body.to_string(), &format!("https://localhost:{}/v1/console", self.port)])
            .output()
            .unwrap();
        assert!(out.status.success(), "console as JSON failed");
        self.answered_with("/v1/console", 200);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A counter series (labels included) from the operator's /metrics; 0 while absent.
    pub fn counter(&self, series: &str) -> u64 {
        let metrics = http_get(self.operator.admin_port, "/metrics").expect("operator metrics");
        metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
    }

    fn answered_with(&self, path: &str, status: u16) {
        let route = path.split('?').next().unwrap();
        if route.starts_with("/v1/") {
            *self.answered.lock().unwrap().entry((route.to_string(), status)).or_default() += 1;
        }
    }

    /// The operator's /metrics count every engine API answer this client got, by route and
    /// status, and time each one (the histogram's count per route), and nothing else.
    pub fn assert_metrics_count_every_answer(&self) {
        let metrics = http_get(self.operator.admin_port, "/metrics").expect("operator metrics");
        let answered = self.answered.lock().unwrap().clone();
        let mut expected: Vec<String> = answered.iter().map(|((route, code), n)| format!("spice_operator_engine_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}")).collect();
        let mut per_route = BTreeMap::<&str, u64>::new();
        for ((route, _), n) in &answered {
            *per_route.entry(route).or_default() += n;
        }
        expected.extend(per_route.iter().map(|(route, n)| format!("spice_operator_engine_request_duration_seconds_count{{route=\"{route}\"}} {n}")));
        expected.sort();
        let mut counted: Vec<String> = metrics
            .lines()
            .filter(|l| l.starts_with("spice_operator_engine_requests_total{") || l.starts_with("spice_operator_engine_request_duration_seconds_count{"))
            .map(str::to_string)
            .collect();
        counted.sort();
        assert_eq!(counted, expected, "engine API requests on /metrics against the answers this client got");
    }
}

pub async fn service_account_token(client: &Client, ns: &str, name: &str, issuer: bool) -> String {
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &sa).await.unwrap();
    if issuer {
        // `kubectl create clusterrolebinding ... --clusterrole=spice-operator-console-issuer --serviceaccount=ns:name`
        let out = Command::new("kubectl")
            .args(["create", "clusterrolebinding", &format!("{ns}-{name}"), "--clusterrole", ISSUER_ROLE, "--serviceaccount", &format!("{ns}:{name}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = Command::new("kubectl").args(["-n", ns, "create", "token", name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
