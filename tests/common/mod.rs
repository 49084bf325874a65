//! Shared harness of the integration tests. They run against the real local control plane
//! that `make test` starts (hack/local-cluster.sh) and find through `KUBECONFIG`; the CRDs
//! come from `crds/`, exactly as users apply them. Each test works in its own throwaway
//! namespace labelled `spice-operator-test`, dumped on failure.
#![allow(dead_code)]

pub mod engine_api;
pub mod refusal;
pub mod spice;
pub mod tls;

use std::fmt::Debug;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use spice_operator::controller::{self, Settings};
use spice_operator::metrics::Metrics;
use tokio::sync::watch;

pub const TEST_IMAGE: &str = "spice-operator:test";
/// Where `make test` installs the chart (hack/test.sh); the operator's Lease lives there.
pub const RELEASE_NAMESPACE: &str = "spice-operator-system";

/// Credentials the operator under test uses: `make test` points SPICE_TEST_OPERATOR_KUBECONFIG
/// at a token of the chart's ServiceAccount, so every scenario runs with exactly the chart's
/// RBAC. Without it (a developer's ad-hoc run), the admin kubeconfig.
pub fn operator_kubeconfig() -> Option<std::path::PathBuf> {
    std::env::var_os("SPICE_TEST_OPERATOR_KUBECONFIG").map(Into::into)
}

pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> Client {
    match kubeconfig {
        None => Client::try_default().await.expect("KUBECONFIG must point at a running API server"),
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).expect("operator kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("operator kubeconfig");
            Client::try_from(config).expect("operator client")
        }
    }
}

/// Lifetimes of the tickets the tests mint. Tickets carry wall-clock expiry (replicas share no
/// state), so these stay far from zero: a clock step during a test must not change the outcome.
pub const VALID: i64 = 3600;
pub const EXPIRED: i64 = -3600;

pub async fn client() -> Client {
    if std::env::var_os("KUBECONFIG").is_none() {
        panic!("integration tests need the local control plane: run `make test` (or hack/local-cluster.sh start DIR and export KUBECONFIG=DIR/kubeconfig)");
    }
    Client::try_default().await.expect("KUBECONFIG must point at a running API server")
}

/// An operator running in the background of this test process, in its own runtime so it
/// outlives every test's runtime.
pub struct Operator {
    stop: watch::Sender<bool>,
    done: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    pub metrics: Arc<Metrics>,
}

impl Operator {
    pub fn start() -> Operator {
        Operator::start_with(operator_kubeconfig())
    }

    /// An operator using the credentials in `kubeconfig` (None: the admin's).
    pub fn start_with(kubeconfig: Option<std::path::PathBuf>) -> Operator {
        // RUST_LOG=debug shows the operator's own log lines in a failing test's output.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
        }
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, mut ready_rx) = watch::channel(false);
        let (done_tx, done) = std::sync::mpsc::channel();
        let metrics = Arc::new(Metrics::default());
        let m = metrics.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let client = client_from(kubeconfig.as_deref()).await;
                let settings = Settings { proxy_image: TEST_IMAGE.into() };
                controller::run(client, settings, m, ready_tx, stop_rx).await;
            });
            let _ = done_tx.send(());
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !*ready_rx.borrow_and_update() {
            assert!(Instant::now() < deadline, "operator caches did not sync within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Operator { stop, done: std::sync::Mutex::new(done), metrics }
    }

    /// Stops the operator the way SIGTERM does and waits until it has exited.
    pub fn stop(self) {
        let _ = self.stop.send(true);
        self.done.lock().unwrap().recv_timeout(Duration::from_secs(30)).expect("operator did not stop within 30 s");
    }
}

/// One operator for the whole test binary.
pub fn shared_operator() -> &'static Operator {
    static OP: OnceLock<Operator> = OnceLock::new();
    OP.get_or_init(Operator::start)
}

impl Operator {
    /// Waits up to 10 s for /metrics to show `line` exactly (the caches follow the API server).
    pub async fn wait_for_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.metrics.encode().lines().any(|l| l == line) {
            assert!(Instant::now() < deadline, "/metrics never showed {line}:\n{}", self.metrics.encode());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A throwaway labelled namespace; deleted afterwards, its objects dumped if the test failed.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xffffff);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"spice-operator-test": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create test namespace");
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- diagnostics for namespace {} -----", self.name);
            for what in ["spiceproxies,deployments,services,configmaps,pods", "events"] {
                let out = std::process::Command::new("kubectl")
                    .args(["get", what, "-n", &self.name, "-o", "yaml"])
                    .output();
                if let Ok(o) = out {
                    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
                }
            }
            let out = std::process::Command::new("kubectl").args(["get", "clusterconsolepolicies", "-o", "yaml"]).output();
            if let Ok(o) = out {
                eprintln!("{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .output();
    }
}

/// Polls until `check` returns Some, or panics after `timeout` with the last object seen.
pub async fn wait_for<K, T>(api: &Api<K>, name: &str, timeout: Duration, check: impl Fn(&K) -> Option<T>) -> T
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(Some(obj)) = api.get_opt(name).await {
            if let Some(v) = check(&obj) {
                return v;
            }
            last = Some(obj);
        }
        if Instant::now() > deadline {
            panic!("{name}: condition not met within {timeout:?}; last seen: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until the operator published an event with `reason` about the object `kind/name`
/// (events about cluster-scoped objects live in `default`), or panics after `timeout` with the
/// events it did find about that object.
pub async fn wait_for_event(client: &Client, ns: &str, kind: &str, name: &str, reason: &str, timeout: Duration) -> k8s_openapi::api::events::v1::Event {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let about: Vec<_> = api
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name)))
            .collect();
        if let Some(e) = about.iter().find(|e| e.reason.as_deref() == Some(reason)) {
            return e.clone();
        }
        if Instant::now() > deadline {
            let seen: Vec<_> = about.iter().map(|e| (e.type_.clone(), e.reason.clone(), e.note.clone())).collect();
            panic!("no {reason} event about {kind} {ns}/{name} within {timeout:?}; events about it: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until the object is gone.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let deadline = Instant::now() + timeout;
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(Instant::now() < deadline, "{name} still exists after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn spx(yaml: &str) -> spice_operator::crd::SpiceProxy {
    serde_yaml::from_str(yaml).expect("test SpiceProxy YAML")
}

pub fn is_ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conds.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Ready with the rollout complete: Ready alone comes with the first ready replica, while pods of
/// the version before (and their problems) may still be there.
pub fn is_rolled_out(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    is_ready(conds) && conds.iter().any(|c| c.type_ == "Progressing" && c.status == "False" && c.reason == "Complete")
}

/// The real `spice-operator controller` binary in the background, killed (SIGKILL) on drop.
pub struct OperatorProcess {
    pub child: std::process::Child,
    pub admin_port: u16,
    pub identity: String,
    pub log: std::path::PathBuf,
}

impl OperatorProcess {
    pub fn spawn(identity: &str, kubeconfig: &std::path::Path, extra: &[&str]) -> OperatorProcess {
        Self::spawn_limited(identity, kubeconfig, extra, None)
    }

    /// As `spawn`, under the open-files limit `soft:hard` when given (as a container runtime sets it).
    pub fn spawn_limited(identity: &str, kubeconfig: &std::path::Path, extra: &[&str], open_files: Option<(u64, u64)>) -> OperatorProcess {
        let admin_port = free_port();
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{identity}.log"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spice-operator"));
        if let Some(limit) = open_files {
            limit_open_files(&mut command, limit);
        }
        let child = command
            .args(["controller", "--admin-addr", &format!("127.0.0.1:{admin_port}"), "--lease-identity", identity])
            .args(["--lease-namespace", RELEASE_NAMESPACE, "--proxy-image", TEST_IMAGE])
            .args(extra)
            // Each process its own engine API port, so several can run side by side.
            .args(if extra.contains(&"--api-addr") { vec![] } else { vec!["--api-addr".to_string(), format!("127.0.0.1:{}", free_port())] })
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,spice_operator=debug,kube_lease_manager=debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawn spice-operator controller");
        OperatorProcess { child, admin_port, identity: identity.into(), log }
    }

    /// `spice_operator_leader` from /metrics; None while the admin server is not up (or the process is gone).
    pub fn is_leader(&self) -> Option<bool> {
        let body = http_get(self.admin_port, "/metrics")?;
        body.lines().find(|l| l.starts_with("spice_operator_leader ")).map(|l| l.ends_with(" 1"))
    }

    pub fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    /// SIGTERM first, so a leader releases its Lease for the next test; SIGKILL after 10 s.
    fn drop(&mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of operator {} -----\n{}", self.identity, self.log_text());
        }
    }
}

/// Starts `command` under the open-files limit `(soft, hard)`, as a container runtime may.
pub fn limit_open_files(command: &mut std::process::Command, (soft, hard): (u64, u64)) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit(2) is async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
}

/// A connection from `source` (a loopback address other than 127.0.0.1, say).
pub fn connect_from(source: &str, to: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::new(source.parse().unwrap(), 0).into())?;
    socket.connect(&to.into())?;
    let std_stream: std::net::TcpStream = socket.into();
    std_stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(std_stream)
}

/// A port on 127.0.0.1 free now, for a process a test starts, which binds it a moment later.
/// Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768-60999 by default)
/// rather than by binding port 0: every outgoing connection (the control plane's own, the
/// tests running in parallel) takes its source port from that range, and one of them took a
/// port handed out that way before the proxy could listen on it (a CI run of 2026-12-06).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Ports handed out before in this test binary: free until their process binds them, and
    // the tests run in parallel, so two of them must never be given the same one.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Above the ports services commonly use; a random start, so parallel tests rarely meet.
    let (low, high) = (20000u16, ephemeral_low.max(20001));
    for _ in 0..1000 {
        // Every RandomState has keys of its own: a random number without a crate for it.
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = low + (random % u64::from(high - low)) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between {low} and {high} in 1000 tries");
}

/// Whether process `pid` holds a TCP socket listening on `port` (any local address), from
/// /proc: the listening sockets' inodes in its network namespace, and its open descriptors.
pub fn listens(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { return false };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 0A is LISTEN.
            let local_port = f.get(1).and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.filter_map(Result::ok).filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|link| inodes.iter().any(|i| link.as_os_str() == i.as_str()))
}

/// Whether process `pid` still runs (it exists and is not a zombie waiting to be reaped).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// A plain HTTP/1.0 GET on loopback; the body, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// A proxy process run from the ConfigMap and key Secret the operator generated for SpiceProxy
/// `name` (what its pods run), listening on loopback `listen`; returns it with its admin port,
/// its audit lines and the directory holding its files. The ConfigMap is mounted as the
/// kubelet mounts it and followed as the kubelet follows it: a change reaches the file.
pub async fn generated_proxy(client: &Client, ns: &str, name: &str, listen: u16) -> (spice::Kill, u16, std::sync::mpsc::Receiver<String>, tempfile::TempDir) {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), ns);
    let config_map = format!("{name}-config");
    let generated = |cm: ConfigMap| cm.data.unwrap_or_default().remove("config.json").unwrap_or_default();
    let mut first = generated(config_maps.get(&config_map).await.unwrap());
    let keys = Api::<Secret>::namespaced(client.clone(), ns).get(&format!("{name}-keys")).await.unwrap().data.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every key of the Secret, as its mount in a pod would show them (current, previous, next).
    for (slot, key) in keys {
        std::fs::write(dir.path().join(slot), key.0).unwrap();
    }
    let (admin, html5) = (free_port(), free_port());
    let keys_dir = dir.path().to_str().unwrap().to_string();
    // The pod's listen addresses and mount paths, moved to loopback ports and this directory.
    let here = move |generated: &str| {
        let mut config: serde_json::Value = serde_json::from_str(generated).unwrap();
        config["listen"] = format!("127.0.0.1:{listen}").into();
        config["adminListen"] = format!("127.0.0.1:{admin}").into();
        config["keysDir"] = keys_dir.clone().into();
        if config.get("html5").is_some_and(|h| !h.is_null()) {
            config["html5"]["listen"] = format!("127.0.0.1:{html5}").into();
        }
        config.to_string()
    };
    let volume = dir.path().join("config");
    std::fs::create_dir(&volume).unwrap();
    publish_config_volume(&volume, 1, &here(&first)).unwrap();
    let (proxy, audit) = spice::proxy_process(&volume.join("config.json"), listen);
    tokio::spawn(async move {
        for version in 2.. {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(cm) = config_maps.get(&config_map).await else { continue };
                let text = generated(cm);
                if text != first {
                    first = text;
                    break;
                }
            }
            // Fails only once the test is over and its directory gone.
            if publish_config_volume(&volume, version, &here(&first)).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(admin, "/readyz").is_none() {
        assert!(Instant::now() < deadline, "proxy from the generated config did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    (proxy, admin, audit, dir)
}

/// Writes `config.json` into `volume` as the kubelet lays out a ConfigMap volume
/// (`publish_volume`).
pub fn publish_config_volume(volume: &std::path::Path, version: u32, text: &str) -> std::io::Result<()> {
    publish_volume(volume, version, &[("config.json", text.as_bytes())])
}

/// Writes `files` into `volume` as the kubelet lays out and updates a ConfigMap or Secret
/// volume: each file is a link to `..data/<name>`, and `..data` a link to a directory per
/// version, swapped with one rename, so a reader never sees half an update; links to files the
/// new version no longer has are removed.
pub fn publish_volume(volume: &std::path::Path, version: u32, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    let versioned = format!("..v{version}");
    std::fs::create_dir(volume.join(&versioned))?;
    for (name, bytes) in files {
        std::fs::write(volume.join(&versioned).join(name), bytes)?;
    }
    std::os::unix::fs::symlink(&versioned, volume.join("..data_tmp"))?;
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data"))?;
    for (name, _) in files {
        match std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    for entry in std::fs::read_dir(volume)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("..") && !files.iter().any(|(f, _)| *f == name) {
            std::fs::remove_file(volume.join(&*name))?;
        }
    }
    Ok(())
}

/// Waits until `addr` refuses connections and checks that this came at the end of a stop's
/// shutdown delay (`delay` after `stopped`): not before it (then new clients would have been
/// refused too early), and within 3 s after it.
pub async fn refuses_after_the_delay(addr: std::net::SocketAddr, stopped: Instant, delay: Duration) {
    let closed_at = loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break stopped.elapsed();
        }
        assert!(stopped.elapsed() < delay + Duration::from_secs(3), "{addr} still accepted {:?} after the stop, with a delay of {delay:?}", stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(closed_at + Duration::from_millis(100) >= delay, "{addr} stopped accepting {closed_at:?} after the stop, before the {delay:?} delay");
}
