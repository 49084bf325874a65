//! Leader election with two real operator processes (the binary, as the chart runs it, with
//! the chart's ServiceAccount and its Lease Role): only one reconciles; when it is killed the
//! standby takes over within 15 s and finishes the change made meanwhile; the two never both
//! report leadership; a graceful stop releases the Lease; a stop with the API server silent
//! ends within the shutdown grace, or at once on a second signal.
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
    // Its admin port may come up a moment after the leader's (each first loads the engine API's
    // certificate): it must, and say it is not the leader.
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs[standby].is_leader().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A TCP relay in front of the API server that can go silent: it keeps every connection open
/// but passes no more bytes, as an API server whose etcd has gone (or a cut network) does.
struct FreezableRelay {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
}

impl FreezableRelay {
    async fn start(to: std::net::SocketAddr) -> FreezableRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, frozen) = (listener.local_addr().unwrap(), Arc::new(AtomicBool::new(false)));
        let f = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else { continue };
                let ((client_in, client_out), (server_in, server_out)) = (client.into_split(), server.into_split());
                tokio::spawn(Self::pump(client_in, server_out, f.clone()));
                tokio::spawn(Self::pump(server_in, client_out, f.clone()));
            }
        });
        FreezableRelay { addr, frozen }
    }

    async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, frozen: Arc<AtomicBool>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            while frozen.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await; // holds the bytes
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// The admin kubeconfig's text and the port of its loopback API server.
fn admin_kubeconfig() -> (String, u16) {
    let text = std::fs::read_to_string(std::env::var_os("KUBECONFIG").unwrap()).unwrap();
    let port = text.lines().find_map(|l| l.trim_start().strip_prefix(SERVER_PREFIX)).expect("a loopback API server").trim().parse().unwrap();
    (text, port)
}

const SERVER_PREFIX: &str = "server: https://127.0.0.1:";

/// The admin kubeconfig with its server moved to the relay (the certificate names 127.0.0.1,
/// which the relay's address is too).
fn kubeconfig_through(relay_port: u16, dir: &std::path::Path) -> std::path::PathBuf {
    let (text, api_port) = admin_kubeconfig();
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text.replace(&format!("{SERVER_PREFIX}{api_port}"), &format!("{SERVER_PREFIX}{relay_port}"))).unwrap();
    path
}

/// Waits for the process to exit; its exit status, or None after `within`.
async fn exit_within(p: &mut OperatorProcess, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn a_stopping_operator_whose_api_server_hangs_exits_within_its_grace_and_at_once_on_a_second_signal() {
    let dir = tempfile::tempdir().unwrap();
    for (case, lease) in [("grace", "spice-operator-grace-test"), ("twice", "spice-operator-twice-test")] {
        let relay = FreezableRelay::start(std::net::SocketAddr::from(([127, 0, 0, 1], admin_kubeconfig().1))).await;
        let kubeconfig = kubeconfig_through(relay.addr.port(), dir.path());
        // Admin credentials and Leases of its own: the chart's Role names only the real Lease,
        // and the leader-election test in this binary uses that one.
        let grace = if case == "grace" { "3" } else { "60" };
        let mut p = OperatorProcess::spawn(&format!("shutdown-{case}"), &kubeconfig, &["--lease-name", lease, "--shutdown-grace-seconds", grace]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.is_leader() != Some(true) {
            assert!(Instant::now() < deadline, "{case}: not the leader within 30 s\n{}", p.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The API server stops answering; the Lease release on the way out cannot complete.
        relay.frozen.store(true, Ordering::Relaxed);
        p.signal("TERM");
        let signalled = Instant::now();
        let status = if case == "grace" {
            exit_within(&mut p, Duration::from_secs(15)).await
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(matches!(p.child.try_wait(), Ok(None)), "twice: exited before its grace without a second signal");
            p.signal("TERM");
            exit_within(&mut p, Duration::from_secs(3)).await
        };
        let took = signalled.elapsed();
        let log = p.log_text();
        let status = status.unwrap_or_else(|| panic!("{case}: still running {took:?} after SIGTERM with the API server silent\n{log}"));
        if case == "grace" {
            assert!(took >= Duration::from_secs(3) && status.success(), "{case}: exited after {took:?} with {status}\n{log}");
            assert!(log.contains("did not finish within the shutdown grace"), "{case}: says why it left\n{log}");
        } else {
            assert_eq!(status.code(), Some(1), "{case}: a second signal exits with status 1\n{log}");
            assert!(log.contains("second stop signal"), "{case}\n{log}");
        }
        relay.frozen.store(false, Ordering::Relaxed);
    }
}
