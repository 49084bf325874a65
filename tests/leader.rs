//! Leader election with two real operator processes (the binary, as the chart runs it, with
//! the chart's ServiceAccount and its Lease Role): only one reconciles; when it is killed the
//! standby takes over within 15 s and finishes the change made meanwhile; the two never both
//! report leadership; a graceful stop releases the Lease.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use spice_operator::crd::SpiceProxy;

/// The Lease name the chart's Role allows (and the binary's default).
const LEASE: &str = "spice-operator-leader";

#[tokio::test]
async fn standby_takes_over_within_15_seconds_and_two_leaders_never_overlap() {
    let client = client().await;
    let kubeconfig = operator_kubeconfig().unwrap_or_else(|| std::env::var_os("KUBECONFIG").unwrap().into());
    let args = ["--lease-name", LEASE, "--lease-duration-seconds", "10"];
    let procs = Arc::new([OperatorProcess::spawn("leader-test-a", &kubeconfig, &args), OperatorProcess::spawn("leader-test-b", &kubeconfig, &args)]);

    // Sample both processes' leader gauge every 50 ms for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (overlaps, samples) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let sampler = {
        let (procs, stop, overlaps, samples) = (procs.clone(), stop.clone(), overlaps.clone(), samples.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if procs.iter().all(|p| p.is_leader() == Some(true)) {
                    overlaps.fetch_add(1, Ordering::Relaxed);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Exactly one becomes the leader, and the Lease names it. (A Lease left by an earlier run
    // may have to expire first.)
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let states: Vec<Option<bool>> = procs.iter().map(|p| p.is_leader()).collect();
        if let Some(i) = states.iter().position(|s| *s == Some(true)) {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader within 30 s: {states:?}\n{}\n{}", procs[0].log_text(), procs[1].log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let standby = 1 - leader;
    assert_eq!(procs[standby].is_leader(), Some(false), "the standby serves /metrics and reports it is not the leader");
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert_eq!(holder(leases.get(LEASE).await.unwrap()), procs[leader].identity);

    // The leader reconciles.
    let ns = TestNamespace::new(&client, "leader").await;
    let spx_api: Api<SpiceProxy> = Api::namespaced(client.clone(), &ns.name);
    let p = spx(&format!(
        "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: edge, namespace: {}}}\nspec:\n  externalAddress: {{host: edge.example.com}}\n  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900}}]}}]\n",
        ns.name
    ));
    spx_api.create(&PostParams::default(), &p).await.unwrap();
    wait_for(&spx_api, "edge", Duration::from_secs(30), |s| s.status.clone().filter(|st| is_ready(&st.conditions))).await;

    // Kill the leader outright (no lease release) and change the spec right away.
    procs[leader].signal("KILL");
    let killed = Instant::now();
    spx_api.patch("edge", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 2}}))).await.unwrap();
    let st = wait_for(&spx_api, "edge", Duration::from_secs(30), |s| {
        s.status.clone().filter(|st| st.observed_generation == Some(2) && st.ready_replicas == 2 && is_ready(&st.conditions))
    })
    .await;
    let takeover = killed.elapsed();
    assert_eq!(st.proxy_url.as_deref(), Some("http://edge.example.com:3128"));
    assert!(takeover < Duration::from_secs(15), "the standby finished the pending change only after {takeover:?}");
    assert_eq!(procs[standby].is_leader(), Some(true));
    assert_eq!(holder(leases.get(LEASE).await.unwrap()), procs[standby].identity);
    eprintln!("standby took over and finished the pending change {takeover:?} after the leader was killed");

    // A graceful stop releases the Lease so the next replica need not wait for it to expire.
    procs[standby].signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while procs[standby].is_leader().is_some() {
        assert!(Instant::now() < deadline, "operator did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(holder(leases.get(LEASE).await.unwrap()), "", "the Lease was not released on SIGTERM");

    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(samples.load(Ordering::Relaxed) > 100, "too few samples to judge overlap");
    assert_eq!(overlaps.load(Ordering::Relaxed), 0, "two processes reported leadership at the same time");
}
