//! One binary, several modes: `controller`, `crdgen`, ...

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use spice_operator::controller::{self, Settings};
use spice_operator::metrics::{Metrics, RequestLabel};
use spice_operator::engine::service::{Caches, Engine};
use spice_operator::engine::tls::{self as engine_tls, CertSource};
use spice_operator::tls;
use spice_operator::engine::ConsoleRequest;
use spice_operator::leader::{self, LeaseSettings};
use spice_operator::{admin, crd};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "spice-operator", version, about = "SPICE console proxies on Kubernetes")]
struct Cli {
    /// A file the error that ends the process is also written to, when the file exists:
    /// Kubernetes creates it in every container and reports what it holds as the container's
    /// last termination message (the operator quotes it in a SpiceProxy's status).
    #[arg(long, global = true, env = "SPICE_TERMINATION_LOG", default_value = "/dev/termination-log")]
    termination_log: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile SpiceProxy and ClusterConsolePolicy objects (uses KUBECONFIG or the in-cluster account).
    Controller {
        /// Image the proxy Deployments run unless a SpiceProxy sets spec.image.
        #[arg(long, env = "SPICE_PROXY_IMAGE", default_value = concat!("spice-operator:", env!("CARGO_PKG_VERSION")))]
        proxy_image: String,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "SPICE_ADMIN_ADDR", default_value = "[::]:8080")]
        admin_addr: SocketAddr,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long, env = "SPICE_LOG_JSON")]
        log_json: bool,
        /// Time a stopping controller gives reconciles in flight and the Lease release before it
        /// exits without them (inside the chart's 30 s termination grace period). A second
        /// SIGTERM or Ctrl-C exits at once.
        #[arg(long, env = "SPICE_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
        shutdown_grace_seconds: u64,
        #[command(flatten)]
        lease: LeaseArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the effective proxy of one VM, pool or cluster (JSON), as the engine API does.
    Resolve {
        #[command(flatten)]
        place: Placement,
        #[arg(long)]
        vm: Option<String>,
    },
    /// Write a VM's console descriptor (.vv) with a fresh ticket, as the engine API does.
    Console {
        #[command(flatten)]
        place: Placement,
        #[arg(long)]
        vm: String,
        /// The hypervisor address of the VM's SPICE server.
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        tls_port: Option<u16>,
        /// File holding the SPICE password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PEM file of the CA of the hypervisor's SPICE TLS certificate.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[arg(long)]
        host_subject: Option<String>,
        /// The user's "Enable SPICE Proxy" choice (honoured only when a proxy is configured).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        proxy_enabled: bool,
        /// Ticket lifetime in seconds.
        #[arg(long, default_value_t = 120)]
        ttl: u64,
        /// Where to write the .vv (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Run the SPICE CONNECT proxy (what every SpiceProxy Deployment runs).
    Proxy {
        /// Configuration rendered by the operator into the proxy's ConfigMap.
        #[arg(long, default_value = "/etc/spice-proxy/config/config.json")]
        config: String,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long, env = "SPICE_LOG_JSON")]
        log_json: bool,
    },
    /// Mint a ticket for one console: the password of `proxy=http://USER:TICKET@host:port`.
    Ticket {
        /// Target host and its ports, e.g. 10.0.0.5:5900,5901 (SPICE port and tls-port).
        #[arg(long)]
        target: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 120)]
        ttl: u64,
        /// File holding the signing key (the `current` key of the SpiceProxy's key Secret).
        #[arg(long)]
        key_file: PathBuf,
        /// Who the ticket is for (appears in the proxy's audit lines).
        #[arg(long, default_value = "")]
        subject: String,
    },
    /// Rotate a SpiceProxy's ticket key in two runs, so no replica refuses a ticket: the first
    /// stages a new key (accepted, not signing); the second, once replicas have loaded it, signs
    /// with it and keeps the old one as previous. Uses your kubeconfig (get and patch on the
    /// SpiceProxy's key Secret).
    RotateKey {
        #[arg(long, short)]
        namespace: String,
        /// The SpiceProxy whose key Secret (<name>-keys) to rotate.
        #[arg(long)]
        spiceproxy: String,
        /// How long a staged key waits before it signs: kubelet refreshes mounted Secrets within
        /// about a minute.
        #[arg(long, default_value_t = 120)]
        min_stage_seconds: u64,
    },
    /// Print the CustomResourceDefinitions (YAML), or write them to a file.
    Crdgen {
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Also write them as the Helm chart's CRD template to this file.
        #[arg(long)]
        chart_template: Option<PathBuf>,
    },
}

/// Leader election: with several operator replicas, only the Lease holder reconciles.
#[derive(clap::Args)]
struct LeaseArgs {
    /// Reconcile only while holding the leader Lease (set false for a single replica without RBAC on leases).
    #[arg(long, env = "SPICE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease: the operator's own (the chart passes it from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "SPICE_LEASE_NAME", default_value = "spice-operator-leader")]
    lease_name: String,
    /// This process's identity in the Lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    lease_identity: Option<String>,
    /// A standby takes over this long after the leader's last renewal.
    #[arg(long, env = "SPICE_LEASE_DURATION_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_duration_seconds: u64,
}

/// Where a VM sits in a ClusterConsolePolicy.
#[derive(clap::Args)]
struct Placement {
    /// The ClusterConsolePolicy's name.
    #[arg(long)]
    policy: String,
    #[arg(long)]
    cluster: String,
    #[arg(long)]
    pool: Option<String>,
}

/// The engine API (HTTPS, every replica serves it, leader or not).
#[derive(clap::Args)]
struct ApiArgs {
    /// Address of the engine API; "off" disables it.
    #[arg(long, env = "SPICE_API_ADDR", default_value = "[::]:8443")]
    api_addr: String,
    /// Directory with tls.crt and tls.key (a mounted kubernetes.io/tls Secret). Default: a
    /// certificate generated once into Secret --api-tls-secret, published in --api-ca-configmap.
    #[arg(long, env = "SPICE_API_TLS_DIR")]
    api_tls_dir: Option<PathBuf>,
    #[arg(long, env = "SPICE_API_TLS_SECRET", default_value = "spice-operator-api-tls")]
    api_tls_secret: String,
    #[arg(long, env = "SPICE_API_CA_CONFIGMAP", default_value = "spice-operator-api-ca")]
    api_ca_configmap: String,
    /// DNS names of the generated certificate (comma-separated), e.g. the API Service's.
    #[arg(long, env = "SPICE_API_DNS_NAMES", value_delimiter = ',')]
    api_dns_names: Vec<String>,
    /// How long the API server's yes to a caller's token or to one of its requests is reused
    /// (a revoked token or binding stops working within it); 0 asks every time.
    #[arg(long, env = "SPICE_API_AUTH_CACHE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=300))]
    api_auth_cache_seconds: u64,
    /// Connections the engine API holds at once, TLS handshakes included; one more closes the
    /// longest waiting (one answering a request finishes it first), counted. Lowered, with a
    /// warning, to what the process's open-files limit leaves descriptors for.
    #[arg(long, env = "SPICE_API_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    api_max_connections: u64,
    /// Time a stopping replica goes on serving the engine API while /readyz already fails, so
    /// engines that kube-proxy still sends here meanwhile are answered, not refused (the chart
    /// sets 5); then it stops accepting and finishes the requests in flight. Must be shorter
    /// than --shutdown-grace-seconds, which bounds the whole stop.
    #[arg(long, env = "SPICE_API_SHUTDOWN_DELAY_SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=300))]
    api_shutdown_delay_seconds: u64,
}

impl LeaseArgs {
    fn settings(&self) -> Option<LeaseSettings> {
        self.leader_election.then(|| LeaseSettings {
            namespace: self.lease_namespace.clone(),
            name: self.lease_name.clone(),
            identity: self.lease_identity.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            }),
            duration_seconds: self.lease_duration_seconds,
            // Renew a third of the way before expiry: two renewal attempts fit in every lease.
            grace_seconds: (self.lease_duration_seconds / 3).max(1),
        })
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    // Queued, as the audit log is: a stalled reader of stderr must not block a worker.
    // Colours only for a terminal: a pod's log is a file, where escape codes are noise.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colours).with_writer(spice_operator::log_queue::stderr_writer(json));
    if json { builder.json().init() } else { builder.init() }
    // A panic's message is written in place: the log lines before it come first.
    let print_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        spice_operator::log_queue::flush_all(Duration::from_secs(1));
        print_panic(info)
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // glibc gives every thread that allocates its own arena; with tokio's workers that doubles
    // the operator's resident memory for no speed gain here. One arena keeps RSS low
    // (measured by `make bench`: 60 MiB → about 40 MiB peak with 2,000 pools). The proxy keeps
    // an arena per worker thread: its threads allocate on every tunnel set-up, and one shared
    // arena would make them queue on its lock.
    #[cfg(target_env = "gnu")]
    if !matches!(cli.command, Command::Proxy { .. }) {
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let termination_log = cli.termination_log.clone();
    let result = runtime.block_on(async_main(cli));
    // The lines still queued, before the error that ends the process: a stream that stays
    // blocked does not keep the process.
    spice_operator::log_queue::flush_all(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spice-operator: {e:#}");
            write_termination_message(&termination_log, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes `message` to the termination-message file if it exists (never creates one: outside a
/// container that path is not ours). Best effort: the message is on stderr already.
fn write_termination_message(file: &std::path::Path, message: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).truncate(true).open(file) {
        use std::io::Write as _;
        let _ = writeln!(f, "{message}");
    }
}

async fn async_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crdgen { output, chart_template } => crdgen(output, chart_template),
        Command::Proxy { config, log_json } => {
            init_tracing(log_json);
            spice_operator::proxy::server::run_from_file(&config).await
        }
        Command::Ticket { target, ttl, key_file, subject } => mint_ticket(&target, ttl, &key_file, subject),
        Command::Controller { proxy_image, admin_addr, log_json, shutdown_grace_seconds, lease, api } => {
            init_tracing(log_json);
            let namespace = lease.lease_namespace.clone();
            let grace = Duration::from_secs(shutdown_grace_seconds);
            if api.api_addr != "off" && api.api_shutdown_delay_seconds >= shutdown_grace_seconds {
                anyhow::bail!(
                    "--api-shutdown-delay-seconds ({}) must be shorter than --shutdown-grace-seconds ({shutdown_grace_seconds}), which bounds the whole stop",
                    api.api_shutdown_delay_seconds
                );
            }
            run_controller(Settings { proxy_image }, admin_addr, lease.settings(), api, namespace, grace).await
        }
        Command::RotateKey { namespace, spiceproxy, min_stage_seconds } => rotate_key(&namespace, &spiceproxy, min_stage_seconds).await,
        Command::Resolve { place, vm } => cli_resolve(&place.policy, &place.cluster, place.pool.as_deref(), vm.as_deref()).await,
        Command::Console { place: Placement { policy, cluster, pool }, vm, host, port, tls_port, password_file, ca_file, host_subject, proxy_enabled, ttl, output } => {
            let read = |p: Option<PathBuf>| -> anyhow::Result<Option<String>> {
                p.map(|p| std::fs::read_to_string(&p).map(|s| s.trim_end_matches('\n').to_string()).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display())))
                    .transpose()
            };
            match (read(password_file), read(ca_file)) {
                (Ok(password), Ok(ca)) => {
                    let request = ConsoleRequest {
                        policy, cluster, pool, vm, host, port, tls_port, password, ca,
                        host_subject, proxy_enabled, title: None, ttl_seconds: Some(ttl),
                    };
                    cli_console(request, output).await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
    }
}

fn mint_ticket(target: &str, ttl: u64, key_file: &std::path::Path, subject: String) -> anyhow::Result<()> {
    use spice_operator::proxy::ticket;
    let (host, ports) = target.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("--target must be HOST:PORT[,PORT], got {target:?}"))?;
    let ports = ports
        .split(',')
        .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| anyhow::anyhow!("invalid port {p:?} in --target")))
        .collect::<anyhow::Result<Vec<u16>>>()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        anyhow::bail!("--target has no host");
    }
    if ttl == 0 {
        anyhow::bail!("--ttl must be at least 1 second");
    }
    let key = std::fs::read(key_file).map_err(|e| anyhow::anyhow!("cannot read key file {}: {e}", key_file.display()))?;
    if key.is_empty() {
        anyhow::bail!("key file {} is empty", key_file.display());
    }
    let claims = ticket::Claims { host: host.to_ascii_lowercase(), ports, expires: ticket::now() + ttl, subject };
    println!("{}", ticket::mint(&key, &claims));
    Ok(())
}

fn crdgen(output: Option<PathBuf>, chart_template: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = chart_template {
        std::fs::write(&path, crd::chart_crds_yaml()).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    let yaml = crd::crds_yaml();
    match output {
        Some(path) => std::fs::write(&path, yaml).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display())),
        None => {
            print!("{yaml}");
            Ok(())
        }
    }
}

/// Descriptors of the operator besides the engine API's connections (one each): the admin
/// port's, and as many again for the API server connections (watches, the client's pool), the
/// files it reads and the runtime's own.
const ENGINE_API_FILES: spice_operator::open_files::Need = spice_operator::open_files::Need { per_connection: 1, reserved: 2 * admin::MAX_CONNECTIONS as u64 };

async fn run_controller(settings: Settings, admin_addr: SocketAddr, lease: Option<LeaseSettings>, api: ApiArgs, namespace: String, shutdown_grace: Duration) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let client = counting_client(metrics.clone()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The engine API's watch caches, on every replica: until they are filled the replica is not ready.
    let engine_caches = (api.api_addr != "off").then(|| Caches::start(client.clone(), metrics.clone()));
    let engine_api = if let Some(caches) = engine_caches.clone() {
        let source = match api.api_tls_dir {
            Some(dir) => CertSource::Files(dir),
            None => CertSource::Generated { namespace, secret: api.api_tls_secret, ca_config_map: api.api_ca_configmap, dns_names: api.api_dns_names },
        };
        let server_config = match &source {
            // A Secret of the user's (cert-manager's, say) is renewed in place: serve each renewal.
            CertSource::Files(dir) => {
                let files = tls::CertFiles::load_pair(dir.join("tls.crt"), dir.join("tls.key")).map_err(|e| anyhow::anyhow!("engine API certificate: {e:#}"))?;
                let expiry = metrics.engine_api_cert_expiry.clone();
                files.keep_reloading("engine API certificate", move |served| {
                    expiry.set(served.not_after);
                });
                files.server_config()?
            }
            // Generated once, valid until 2036, never renewed.
            CertSource::Generated { namespace, secret, ca_config_map, dns_names } => {
                let (cert, key) = engine_tls::generated(&client, namespace, secret, ca_config_map, dns_names).await.map_err(|e| anyhow::anyhow!("engine API certificate: {e:#}"))?;
                metrics.engine_api_cert_expiry.set(tls::not_after(&cert)?);
                tls::server_config(&cert, &key)?
            }
        };
        let tcp = spice_operator::listener::bind(&api.api_addr, "--api-addr").await?;
        // The bound address: `[::]` may have fallen back to 0.0.0.0 on a node without IPv6.
        tracing::info!(addr = %tcp.local_addr()?, "engine API listening (HTTPS)");
        // Engines hold a few connections each; the default thousand at once is far past any of them.
        let max_connections = spice_operator::open_files::fit(api.api_max_connections as usize, ENGINE_API_FILES, "--api-max-connections", "connections");
        let connections = spice_operator::listener::Waiting::new(max_connections, metrics.engine_connections.clone());
        // The TLS handshake within 10 s, then each request head within 10 s: engines send at once.
        let within = Duration::from_secs(10);
        let listener = spice_operator::listener::tls(tcp, server_config, within, connections.clone())?;
        let router = spice_operator::engine::api::router(client.clone(), caches, metrics.clone(), Duration::from_secs(api.api_auth_cache_seconds));
        // Served on after the stop signal for the delay (not ready by then), then no new
        // connections; requests in flight finish.
        let mut stopping = stop_rx.clone();
        let delay = Duration::from_secs(api.api_shutdown_delay_seconds);
        let stop_accepting = async move {
            let _ = stopping.wait_for(|s| *s).await;
            spice_operator::listener::sleep_shutdown_delay(delay, "the engine API still serving").await;
        };
        Some(tokio::spawn(async move {
            spice_operator::listener::serve(listener, router, within, connections, |_| (), stop_accepting).await;
            anyhow::Ok(())
        }))
    } else {
        None
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin_connections = metrics.admin_connections.clone();
    let encode = {
        let m = metrics.clone();
        Arc::new(move || m.encode())
    };
    let synced = admin::ready_while(ready_rx, "caches not synced yet");
    let stop_seen = stop_rx.clone();
    let readiness: admin::Readiness = Arc::new(move || {
        let engine = engine_caches.as_ref().map_or(Ok(()), Caches::filled);
        let stopping = if *stop_seen.borrow() { Err("stopping".to_string()) } else { Ok(()) };
        let why: Vec<String> = [stopping, synced(), engine].into_iter().filter_map(Result::err).collect();
        if why.is_empty() { Ok(()) } else { Err(why.join("; ")) }
    });
    let admin_listener = admin::bind(&admin_addr.to_string()).await?;
    let admin_addr = admin_listener.local_addr()?; // what was bound, after any IPv4 fallback
    let admin = tokio::spawn(admin::serve(admin_listener, encode, readiness, admin_connections));
    let mut stopping = stop_rx.clone();
    spice_operator::on_stop_signals(move || {
        tracing::info!(grace = ?shutdown_grace, "shutting down: finishing reconciles in flight");
        let _ = stop_tx.send(true);
    });
    tracing::info!(%admin_addr, image = %settings.proxy_image, leader_election = lease.is_some(), "controller starting");
    let reconcile = async move {
        match lease {
            None => {
                metrics.leader.set(1);
                controller::run(client, settings, metrics, ready_tx, stop_rx).await;
                Ok(())
            }
            Some(lease) => {
                // A standby is healthy and ready to take over, so it reports ready too.
                let _ = ready_tx.send(true);
                let m = metrics.clone();
                leader::run_as_leader(client.clone(), &lease, &metrics, stop_rx, move |stop| async move {
                    let (synced, _) = watch::channel(false);
                    controller::run(client, settings, m, synced, stop).await
                })
                .await
                .map_err(anyhow::Error::from)
            }
        }
    };
    // Reconciles and the Lease release talk to the API server; when it has gone (a local
    // control plane stopped together with the operator, a network cut) those calls wait for
    // their own long timeouts, so the stop is bounded here.
    let grace_over = async move {
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(shutdown_grace).await;
    };
    // After the stop signal reconciles end (and the Lease is released) at once, the engine API
    // after its shutdown delay and the requests in flight: the process ends when both have. A
    // lost Lease (an error) ends it at once.
    let work = async move {
        let engine_api = async move {
            match engine_api {
                Some(task) => task.await?,
                None => Ok(()),
            }
        };
        futures::future::try_join(reconcile, engine_api).await.map(|_| ())
    };
    tokio::select! {
        res = work => res,
        res = admin => res?,
        _ = grace_over => {
            tracing::warn!(grace = ?shutdown_grace, "reconciles, the Lease release or engine API requests did not finish within the shutdown grace; exiting without them");
            Ok(())
        }
    }
}

async fn rotate_key(namespace: &str, spiceproxy: &str, min_stage_seconds: u64) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| anyhow::anyhow!("no Kubernetes configuration found (set KUBECONFIG): {e}"))?;
    let done = spice_operator::rotation::rotate(client, namespace, spiceproxy, Duration::from_secs(min_stage_seconds)).await?;
    println!("{done}");
    Ok(())
}

async fn cli_resolve(policy: &str, cluster: &str, pool: Option<&str>, vm: Option<&str>) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| anyhow::anyhow!("no Kubernetes configuration found (set KUBECONFIG): {e}"))?;
    let r = Engine { client, caches: None }.resolve(policy, cluster, pool, vm).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

/// The CLI runs with the caller's own credentials: RBAC on the policy, the SpiceProxy and its
/// key Secret applies directly. The audit line names the caller (SelfSubjectReview).
async fn cli_console(request: ConsoleRequest, output: Option<PathBuf>) -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let client = kube::Client::try_default().await.map_err(|e| anyhow::anyhow!("no Kubernetes configuration found (set KUBECONFIG): {e}"))?;
    let me = kube::Api::<SelfSubjectReview>::all(client.clone())
        .create(&Default::default(), &SelfSubjectReview::default())
        .await
        .ok()
        .and_then(|r| r.status?.user_info?.username)
        .unwrap_or_else(|| "cli".into());
    let prepared = Engine { client, caches: None }.prepare(request).await?;
    let console = Engine::issue(prepared, &me);
    match output {
        Some(path) => std::fs::write(&path, &console.vv).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
        None => print!("{}", console.vv),
    }
    if let Some(url) = console.html5_url {
        eprintln!("browser console: {url}");
    }
    Ok(())
}

/// A client that counts every request it sends, for `/metrics` and the scale benchmark.
async fn counting_client(metrics: Arc<Metrics>) -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await.map_err(|e| anyhow::anyhow!("no Kubernetes configuration found (set KUBECONFIG): {e}"))?;
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        metrics.api_requests.get_or_create(&RequestLabel { verb: req.method().to_string() }).inc();
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&layer).build())
}

