//! Scale benchmark on the local control plane (run by `make bench`, which starts the control
//! plane and the release operator and passes OPERATOR_PID / OPERATOR_ADMIN).
//! A policy of 50 clusters × 40 pools (2,000 pools) plus 100 SpiceProxies: time from apply to
//! fully resolved status, time for one global change to reach every inheriting pool, time for
//! a SpiceProxy move to reach its pools, operator peak RSS, and API requests per reconcile;
//! then the engine API's console requests against that policy (latency, rate, API requests each).

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use spice_operator::crd::{ClusterConsolePolicy, ClusterConsolePolicyStatus, SpiceProxy};

const CLUSTERS: usize = 50;
const POOLS: usize = 40;
const PROXIES: usize = 100;
const NS: &str = "bench";
const POLICY: &str = "scale";

fn scrape(admin: &str) -> (f64, f64, f64) {
    let body = std::process::Command::new("curl").args(["-sf", &format!("http://{admin}/metrics")]).output().expect("curl");
    let text = String::from_utf8_lossy(&body.stdout).to_string();
    let sum = |prefix: &str| -> f64 {
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    (
        sum("spice_operator_kube_api_requests_total"),
        sum("spice_operator_reconciles_total{controller=\"clusterconsolepolicy\"}"),
        sum("spice_operator_reconciles_total{controller=\"spiceproxy\"}"),
    )
}

fn rss_kib(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("operator process");
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Waits (watching, not polling) until the policy's status satisfies `done`; returns the time.
async fn until(api: &Api<ClusterConsolePolicy>, started: Instant, limit: Duration, done: impl Fn(&ClusterConsolePolicyStatus) -> bool) -> Duration {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={POLICY}"));
    let mut stream = watcher::watcher(api.clone(), cfg).boxed();
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => panic!("not resolved within {limit:?}"),
            ev = stream.next() => {
                let obj = match ev {
                    Some(Ok(watcher::Event::Apply(o))) | Some(Ok(watcher::Event::InitApply(o))) => o,
                    _ => continue,
                };
                if obj.status.as_ref().is_some_and(&done) {
                    return started.elapsed();
                }
            }
        }
    }
}

fn policy_yaml(global: &str) -> ClusterConsolePolicy {
    let clusters: Vec<_> = (0..CLUSTERS)
        .map(|c| {
            let pools: Vec<_> = (0..POOLS)
                .map(|p| {
                    // The last two pools of every cluster use SpiceProxies (100 in all); the others inherit.
                    if p >= POOLS - 2 {
                        let i = c * 2 + (p - (POOLS - 2));
                        json!({"name": format!("pool-{p}"), "proxy": {"spiceProxyRef": {"name": format!("spx-{i}"), "namespace": NS}}})
                    } else {
                        json!({"name": format!("pool-{p}")})
                    }
                })
                .collect();
            json!({"name": format!("cluster-{c}"), "pools": pools})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "console.spice-operator.io/v1alpha1", "kind": "ClusterConsolePolicy",
        "metadata": {"name": POLICY},
        "spec": {"defaultProxy": {"url": global}, "clusters": clusters}
    }))
    .unwrap()
}

#[tokio::main]
async fn main() {
    let pid = std::env::var("OPERATOR_PID").expect("run through `make bench` (hack/bench.sh)");
    let admin = std::env::var("OPERATOR_ADMIN").expect("OPERATOR_ADMIN");
    let client = Client::try_default().await.expect("KUBECONFIG");
    let ns_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = ns_api.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap()).await;
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), NS);
    let ccp_api: Api<ClusterConsolePolicy> = Api::all(client.clone());

    println!("scale: {CLUSTERS} clusters x {POOLS} pools = {} pools, {PROXIES} SpiceProxies", CLUSTERS * POOLS);
    let (req0, _, spx_rec0) = scrape(&admin);
    let started = Instant::now();
    for i in 0..PROXIES {
        let p: SpiceProxy = serde_json::from_value(json!({
            "apiVersion": "console.spice-operator.io/v1alpha1", "kind": "SpiceProxy",
            "metadata": {"name": format!("spx-{i}"), "namespace": NS},
            "spec": {"externalAddress": {"host": format!("spx-{i}.example.com")},
                     "allowedTargets": [{"cidr": "10.0.0.0/8", "ports": [{"from": 5900, "to": 6923}]}]}
        }))
        .unwrap();
        spx_api.create(&PostParams::default(), &p).await.expect("create SpiceProxy");
    }
    loop {
        let ready = spx_api.list(&Default::default()).await.unwrap().items.iter().filter(|s| s.ready_url().is_ok()).count();
        if ready == PROXIES {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "only {ready} SpiceProxies Ready after 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let proxies_ready = started.elapsed();
    let (req1, ccp_rec1, spx_rec1) = scrape(&admin);
    println!("100 SpiceProxies Ready (Deployment+Service+ConfigMap+Secret each, pods by kwok): {:.2} s", proxies_ready.as_secs_f64());
    println!("  API requests per SpiceProxy reconcile: {:.1} ({} requests / {} reconciles)", (req1 - req0) / (spx_rec1 - spx_rec0), req1 - req0, spx_rec1 - spx_rec0);

    // 1. apply → every pool resolved
    let started = Instant::now();
    ccp_api.create(&PostParams::default(), &policy_yaml("http://global-1.example:3128")).await.expect("create policy");
    let apply_to_resolved = until(&ccp_api, started, Duration::from_secs(60), |s| {
        s.observed_generation == Some(1) && s.resolved_pools as usize == CLUSTERS * POOLS && s.unresolved == 0
    })
    .await;
    let (req2, ccp_rec2, _) = scrape(&admin);
    println!("apply -> all {} pools resolved: {:.3} s (target < 2 s)", CLUSTERS * POOLS, apply_to_resolved.as_secs_f64());

    // 2. one global change → every inheriting pool, three times (one run's spread shows the noise)
    let inheriting = CLUSTERS * (POOLS - 2);
    let mut changes = Vec::new();
    for round in 2..=4 {
        let url = format!("http://global-{round}.example:3128");
        let started = Instant::now();
        let patch = json!({"spec": {"defaultProxy": {"url": url}}});
        ccp_api.patch(POLICY, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        // The change's own write: the API server's cost for the object, before the operator sees it.
        let written = started.elapsed();
        let took = until(&ccp_api, started, Duration::from_secs(60), |s| {
            s.pools.iter().filter(|p| p.proxy_url.as_deref() == Some(url.as_str())).count() == inheriting
        })
        .await;
        println!("  change {}: {:.3} s ({:.3} s of it the change's own PATCH)", round - 1, took.as_secs_f64(), written.as_secs_f64());
        changes.push(took);
    }
    let (req3, ccp_rec3, _) = scrape(&admin);
    changes.sort();
    let global_change = changes[1];
    println!("global change -> all {inheriting} inheriting pools (the other 100 use SpiceProxies): {:.3} s median of 3 (target < 1 s)", global_change.as_secs_f64());

    // 3. a SpiceProxy moves → its pool follows
    let started = Instant::now();
    let moved = json!({"spec": {"externalAddress": {"host": "moved.example.com"}}});
    spx_api.patch("spx-7", &PatchParams::default(), &Patch::Merge(&moved)).await.unwrap();
    let spx_change = until(&ccp_api, started, Duration::from_secs(60), |s| {
        s.pools.iter().any(|p| p.proxy_url.as_deref() == Some("http://moved.example.com:3128"))
    })
    .await;
    println!("SpiceProxy address change -> its pool in the policy status: {:.3} s", spx_change.as_secs_f64());

    let per_policy_reconcile = (req3 - req2) / (ccp_rec3 - ccp_rec2).max(1.0);
    println!(
        "API requests per policy reconcile: {per_policy_reconcile:.1} (initial apply: {} requests over {} reconciles)",
        req2 - req1,
        ccp_rec2 - ccp_rec1
    );
    let before_engine = rss_kib(&pid, "VmHWM:");
    engine_api(&admin).await;

    let hwm = rss_kib(&pid, "VmHWM:");
    let rss = rss_kib(&pid, "VmRSS:");
    println!(
        "operator peak RSS: {:.1} MiB (before the engine API requests {:.1} MiB, now {:.1} MiB; target < 64 MiB)",
        hwm as f64 / 1024.0,
        before_engine as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    let ok = apply_to_resolved < Duration::from_secs(2) && global_change < Duration::from_secs(1) && hwm < 64 * 1024;
    println!("targets {}", if ok { "met" } else { "NOT met" });
}

const CONSOLES: usize = 300;
const PARALLEL: usize = 8;

/// `POST /v1/console` for VMs in SpiceProxy pools of the 2,000-pool policy (each resolved, checked
/// against the allow-list and given a fresh ticket), by curl over kept-alive HTTPS connections:
/// once one at a time (latency), once 8 at a time (rate).
async fn engine_api(admin: &str) {
    let api = std::env::var("OPERATOR_API").expect("OPERATOR_API");
    let ca = std::env::var("OPERATOR_API_CA").expect("OPERATOR_API_CA");
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("kubectl").args(args).output().expect("kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    kubectl(&["-n", NS, "create", "serviceaccount", "engine"]);
    kubectl(&["create", "clusterrolebinding", "bench-engine", "--clusterrole", "cluster-admin", "--serviceaccount", &format!("{NS}:engine")]);
    let token = kubectl(&["-n", NS, "create", "token", "engine"]).trim().to_string();
    let config = std::env::temp_dir().join(format!("spice-bench-consoles-{}.curl", std::process::id()));
    // Transfers are separated by `next` (a trailing one would be a transfer without a URL).
    let mut entries = Vec::new();
    for i in 0..CONSOLES {
        let c = i % CLUSTERS;
        let body = json!({"policy": POLICY, "cluster": format!("cluster-{c}"), "pool": format!("pool-{}", POOLS - 1), "vm": format!("vm-{i}"),
                          "host": format!("10.1.{}.{}", i / 250, i % 250 + 1), "port": 5900, "tlsPort": 5901, "password": "pw"});
        entries.push(format!(
            "url = \"https://{api}/v1/console\"\ncacert = \"{ca}\"\nheader = \"Authorization: Bearer {token}\"\nheader = \"Content-Type: application/json\"\ndata = {}\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}} %{{time_total}} %{{errormsg}}\\n\"\nsilent\nshow-error\n",
            serde_json::to_string(&body.to_string()).unwrap()
        ));
    }
    std::fs::write(&config, entries.join("next\n")).unwrap();
    let run = |parallel: bool| -> (Vec<f64>, Duration) {
        let mut cmd = std::process::Command::new("curl");
        cmd.arg("-sS");
        if parallel {
            cmd.args(["--parallel", "--parallel-max", &PARALLEL.to_string()]);
        }
        let started = Instant::now();
        let out = cmd.arg("-K").arg(&config).output().expect("curl");
        let took = started.elapsed();
        let lines = String::from_utf8_lossy(&out.stdout).to_string();
        let mut times = Vec::new();
        let mut failed = Vec::new();
        for line in lines.lines() {
            let mut fields = line.splitn(3, ' ');
            let (code, t) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
            match code {
                "200" => times.push(t.parse::<f64>().expect("curl write-out")),
                _ => failed.push(line.to_string()),
            }
        }
        assert!(failed.is_empty(), "{} of {CONSOLES} console requests failed ({}): {}", failed.len(), failed[..failed.len().min(5)].join(", "), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && times.len() == CONSOLES, "curl: {}", String::from_utf8_lossy(&out.stderr));
        times.sort_by(f64::total_cmp);
        (times, took)
    };
    run(false); // warm-up: connections, token and caches
    let (req0, _, _) = scrape(admin);
    let (times, _) = run(false);
    let (req1, _, _) = scrape(admin);
    let (_, took) = run(true);
    let _ = std::fs::remove_file(&config);
    let pct = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize] * 1000.0;
    println!(
        "engine API, POST /v1/console on this policy ({CONSOLES} VMs in SpiceProxy pools, ticket each): one at a time median {:.1} ms, p99 {:.1} ms; {PARALLEL} at a time {:.0} consoles/s; {:.1} operator API requests per console",
        pct(0.5),
        pct(0.99),
        CONSOLES as f64 / took.as_secs_f64(),
        (req1 - req0) / CONSOLES as f64
    );
}
