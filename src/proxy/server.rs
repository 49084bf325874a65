//! The CONNECT proxy: accept, read and check the request head, authorise, check the target
//! against the allow-list, connect, then hand the two sockets to the data path. Every refusal
//! is a specific HTTP answer with a one-line body; every tunnel ends in one JSON audit line.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::allow::{AllowList, canonical, canonical_addr};
use super::config::ProxyConfig;
use super::head::{self, HeadError, MAX_HEAD, Version};
use super::metrics::{Outcome, ProxyMetrics};
use super::proxy_protocol::{self, HeaderError, Origin, ProxyProtocolConfig};
use super::sockopt::Keepalive;
use super::throttle::AuthThrottle;
use super::ticket::{self, TicketError};
use super::tunnel::{self, Activity, Close};
use crate::crd::{AuthMode, ClientSocketSpec, ProxyLimits};
use crate::listener::{Places, Waiting};
use crate::http_answer::{Refusal, refuse, response};

/// Credentials a replica accepts, reloaded from the mounted Secrets.
#[derive(Default, Clone, PartialEq)]
struct Credentials {
    /// Ticket keys: current first, then previous and next (rotation).
    keys: Vec<Vec<u8>>,
    basic: Option<(Vec<u8>, Vec<u8>)>,
}

fn read_credentials(cfg: &ProxyConfig) -> anyhow::Result<Credentials> {
    let mut c = Credentials::default();
    if let Some(dir) = &cfg.keys_dir {
        for name in [ticket::CURRENT_KEY, ticket::PREVIOUS_KEY, ticket::NEXT_KEY] {
            match std::fs::read(format!("{dir}/{name}")) {
                Ok(k) if !k.is_empty() => c.keys.push(k),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("cannot read ticket key {dir}/{name}: {e}"),
            }
        }
    }
    if let Some(dir) = &cfg.basic_dir {
        let read = |n: &str| std::fs::read(format!("{dir}/{n}")).map_err(|e| anyhow::anyhow!("cannot read {dir}/{n}: {e}"));
        c.basic = Some((read("username")?, read("password")?));
    }
    match cfg.auth_mode {
        AuthMode::Ticket if c.keys.is_empty() => anyhow::bail!("auth mode Ticket needs a key file: none found in {:?}", cfg.keys_dir),
        AuthMode::Basic if c.basic.is_none() => anyhow::bail!("auth mode Basic needs basicDir with username and password"),
        _ => Ok(c),
    }
}

pub struct Shared {
    /// The configuration the replica started with (its allow-list and limits as first read).
    pub(crate) cfg: ProxyConfig,
    /// The allow-list in use: the configuration file's, read again as its ConfigMap changes.
    allow: RwLock<AllowList>,
    /// The limits in use: `cfg.limits` with the live ones (`ProxyLimits::with_live_settings_of`)
    /// as the configuration file last gave them.
    limits: RwLock<ProxyLimits>,
    /// The browser port's allowed origins in use, as the configuration file last gave them.
    origins: RwLock<Vec<String>>,
    /// The load balancers trusted to send the PROXY protocol, as the configuration file last
    /// gave them (none when `cfg.proxy_protocol` is off).
    balancers: RwLock<ProxyProtocolConfig>,
    creds: RwLock<Credentials>,
    pub metrics: ProxyMetrics,
    /// Open tunnels, CONNECT and browser bridges alike: `maxTunnels`, or fewer where the
    /// open-files limit leaves room for fewer.
    pub(crate) tunnels: Places,
    /// CONNECT-port connections whose request is not yet read and authorised, which take no
    /// tunnel place: as many as there are tunnel places, the longest waiting closed for a newcomer.
    waiting: Waiting,
    /// Browser-port connections not (yet) bridges: as many as there are tunnel places, the
    /// longest waiting closed for a newcomer.
    pub(crate) html5_connections: Waiting,
    /// Worker threads, for the descriptors a new tunnel limit needs.
    workers: usize,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    /// Failed authentications per client (the same keys as `per_client`).
    auth_failures: AuthThrottle,
    /// Derived once from `cfg.limits`: the listeners and every upstream socket get it.
    keepalive: Keepalive,
    /// The browser side's certificate (`html5.tls`), read again as its Secret is renewed.
    pub(crate) html5_cert: Option<Arc<crate::tls::CertFiles>>,
    /// The bridge's TLS client for hypervisors (`html5.upstreamTls`), its CA read again as its
    /// Secret changes.
    pub(crate) hypervisor_tls: Option<Arc<super::upstream_tls::HypervisorTls>>,
}

/// One audit line per connection. A plain struct, not a JSON map, because it lives as long as
/// the tunnel: idle tunnels should cost as little memory as possible. Never holds a token.
#[derive(serde::Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Audit {
    pub(crate) event: &'static str,
    pub(crate) client: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) subject: Option<String>,
    /// The load balancer that passed the connection on (PROXY protocol); `client` is then
    /// the address it named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) via: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_down: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bytes_early: Option<usize>,
    pub(crate) outcome: &'static str,
    pub(crate) close: String,
    pub(crate) duration_ms: u64,
}

impl Audit {
    /// One structured line on stdout (queued: a stalled stdout must not stop the worker); the
    /// token is never part of it.
    pub(crate) fn emit(&self) {
        crate::log_queue::stdout().line(&serde_json::to_vec(self).expect("audit lines serialise"));
    }
}

/// Who a tunnel was authorised for, for the audit line (never the token itself).
struct Identity {
    user: Option<String>,
    subject: Option<String>,
}

impl Shared {
    /// The limits in use (see `limits`).
    pub(crate) fn limits(&self) -> ProxyLimits {
        *self.limits.read().expect("limits lock")
    }

    /// The timeouts that apply to open tunnels now. (Only they, read when needed: the
    /// tunnel's task carries no copy of the limits while it runs.)
    fn tunnel_timeouts(&self) -> tunnel::Timeouts {
        let limits = self.limits();
        tunnel::Timeouts { idle: limits.idle_timeout(), half_closed: limits.half_closed_timeout() }
    }

    /// 429 while `client` is locked out after too many failed authentications.
    pub(crate) fn auth_lockout(&self, client: IpAddr) -> Option<Refusal> {
        let left = self.auth_failures.locked(client_key(client), Instant::now())?;
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(Refusal { status: 429, body: format!("too many failed authentications from {}: try again in {secs} s", counted_as(client)), retry_after: Some(secs) })
    }

    /// Counts a failed authentication that guessing produces (see `throttle`).
    pub(crate) fn auth_failed(&self, client: IpAddr) {
        let key = client_key(client);
        if self.auth_failures.failed(key, Instant::now()) {
            self.metrics.auth_lockouts.inc();
            let limits = self.limits();
            let window = limits.auth_failure_window();
            tracing::warn!(client = %key, ?window, "locked out after {} failed authentications", limits.max_auth_failures());
        }
    }

    fn authorise(&self, req: &head::Request, client: IpAddr) -> Result<Identity, Refusal> {
        if self.cfg.auth_mode == AuthMode::None {
            return Ok(Identity { user: None, subject: None });
        }
        if let Some(r) = self.auth_lockout(client) {
            return Err(r);
        }
        let Some((user, pass)) = req.proxy_authorization.as_deref().and_then(head::basic_credentials) else {
            return Err(refuse(407, "proxy credentials required (Basic user:ticket in the proxy URL)"));
        };
        let creds = self.creds.read().expect("credentials lock");
        match self.cfg.auth_mode {
            AuthMode::Basic => {
                let (u, p) = creds.basic.as_ref().expect("checked at start");
                // Both compared in constant time; `&` so neither short-circuits.
                let ok = u.as_slice().ct_eq(user.as_bytes()) & p.as_slice().ct_eq(pass.as_bytes());
                if bool::from(ok) {
                    return Ok(Identity { user: Some(user), subject: None });
                }
                self.auth_failed(client);
                Err(refuse(407, "wrong proxy credentials"))
            }
            AuthMode::Ticket => match ticket::verify(&creds.keys, &pass, ticket::now()) {
                Ok(claims) if claims.allows(&req.host, req.port) => Ok(Identity { user: Some(user), subject: Some(claims.subject) }),
                Ok(claims) => Err(refuse(403, format!("ticket is for another target ({} ports {:?})", claims.host, claims.ports))),
                // Signed by us, only stale: no guess.
                Err(TicketError::Expired) => Err(refuse(407, "ticket expired")),
                Err(e @ (TicketError::Malformed | TicketError::BadSignature)) => {
                    self.auth_failed(client);
                    Err(refuse(407, e.to_string()))
                }
                Err(e @ TicketError::NoKey) => Err(refuse(407, e.to_string())),
            },
            AuthMode::None => unreachable!("handled above"),
        }
    }

    /// Resolves the target and keeps only the addresses the allow-list permits.
    pub(crate) async fn allowed_addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let resolved: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match tokio::time::timeout(self.limits().connect_timeout(), tokio::net::lookup_host((host, port))).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(refuse(502, format!("cannot resolve {host}: {e}"))),
                Err(_) => return Err(refuse(504, format!("resolving {host} timed out"))),
            },
        };
        let allowed: Vec<SocketAddr> = {
            let allow = self.allow.read().expect("allow-list lock");
            resolved.iter().filter(|a| allow.permits(a.ip(), a.port())).map(|a| canonical_addr(*a)).collect()
        };
        if allowed.is_empty() {
            let shown: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
            return Err(refuse(403, format!("target {} ({}) is not on the allow-list", head::authority(host, port), shown.join(", "))));
        }
        Ok(allowed)
    }

    /// Whether the allow-list in use still permits an open tunnel's target.
    fn still_permits(&self, target: SocketAddr) -> bool {
        self.allow.read().expect("allow-list lock").permits(target.ip(), target.port())
    }

    /// Ticket keys (current first), as last read from the key Secret.
    pub(crate) fn ticket_keys(&self) -> Vec<Vec<u8>> {
        self.creds.read().expect("credentials lock").keys.clone()
    }

    pub(crate) async fn connect(&self, addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), Refusal> {
        let mut last = refuse(502, "no address to connect to");
        let timeout = self.limits().connect_timeout();
        for addr in addrs {
            // Connect to exactly the address that was checked: no second lookup, no rebinding.
            match connect_within(*addr, timeout, self.keepalive).await {
                Ok(Some(s)) => return Ok((s, *addr)),
                Ok(None) => last = refuse(504, format!("upstream {addr} did not answer within {timeout:?}")),
                Err(e) => {
                    last = upstream_failed(*addr, &e);
                    // Out of descriptors here: the next address would fail the same way.
                    if last.status == 503 {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

/// The answer when connecting to `addr` failed: 502, unless the proxy itself is out of file
/// descriptors or socket memory (503, like a full proxy: nothing the hypervisor did).
fn upstream_failed(addr: SocketAddr, e: &std::io::Error) -> Refusal {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => refuse(503, format!("proxy has no resources left to connect to {addr} ({e}), try again later")),
        _ => refuse(502, format!("upstream {addr} refused the connection: {e}")),
    }
}

/// Connects to `addr`; `None` when it did not answer within `timeout`. The stream has
/// TCP_NODELAY and `keepalive`.
///
/// A hypervisor on the proxy's own network (or loopback) usually completes the TCP handshake
/// within connect(2) itself. A zero-timeout poll sees that, and the stream is ready without a
/// turn of the event loop and without arming the timeout: tokio's own connect does both, and
/// the first timer of a quiet loop also wakes it once more (an eventfd write) to re-plan.
async fn connect_within(addr: SocketAddr, timeout: Duration, keepalive: Keepalive) -> std::io::Result<Option<TcpStream>> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let socket = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC, None)?;
    rustix::net::sockopt::set_tcp_nodelay(&socket, true)?;
    keepalive.apply(&socket)?;
    enum Handshake {
        Connected,
        /// Finished, but maybe refused: SO_ERROR says.
        Settled,
        Pending,
    }
    let handshake = match rustix::net::connect(&socket, &addr) {
        Ok(()) => Handshake::Connected,
        Err(rustix::io::Errno::INPROGRESS) => {
            let mut fds = [PollFd::new(&socket, PollFlags::OUT)];
            // A failed poll (EINTR) only means waiting for the event loop's answer instead.
            match poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })) {
                // Writable with no error or hang-up: connected (a refusal sets POLLERR).
                Ok(1) if fds[0].revents() == PollFlags::OUT => Handshake::Connected,
                Ok(1) => Handshake::Settled,
                _ => Handshake::Pending,
            }
        }
        Err(e) => return Err(e.into()),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    match handshake {
        Handshake::Connected => return Ok(Some(stream)),
        Handshake::Settled => {}
        Handshake::Pending => {
            if tokio::time::timeout(timeout, stream.writable()).await.is_err() {
                return Ok(None);
            }
        }
    }
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(Some(stream)),
    }
}

/// A place in the per-client count, given back on drop.
pub(crate) struct ClientSlot<'a> {
    shared: &'a Shared,
    key: IpAddr,
}

/// What the per-client limit counts by: an IPv4 address, or the /64 of an IPv6 one. A host is
/// usually given a whole /64 and may use any address in it, so counting single IPv6 addresses
/// would let one client open the limit's worth of tunnels from each of them.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

/// The 503 body when the proxy is at its global tunnel limit.
pub(crate) const AT_TUNNEL_LIMIT: &str = "proxy is at its tunnel limit, try again later";

/// What the per-client limits count `ip` by, as a refusal tells the client.
fn counted_as(ip: IpAddr) -> &'static str {
    match canonical(ip) {
        IpAddr::V4(_) => "your address",
        IpAddr::V6(_) => "your address's /64 (IPv6 clients are counted by /64)",
    }
}

/// The 503 body when a client is over the per-client limit.
pub(crate) fn too_many_from(ip: IpAddr) -> String {
    format!("too many tunnels from {}", counted_as(ip))
}

impl<'a> ClientSlot<'a> {
    fn take(shared: &'a Shared, ip: IpAddr) -> Option<Self> {
        let key = client_key(ip);
        let mut map = shared.per_client.lock().expect("per-client lock");
        let n = map.entry(key).or_insert(0);
        if *n >= shared.limits().per_client_tunnel_limit() {
            return None;
        }
        *n += 1;
        Some(ClientSlot { shared, key })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.shared.per_client.lock().expect("per-client lock");
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// The same, owned, for a bridge task that outlives the request handler.
pub(crate) struct OwnedClientSlot {
    shared: Arc<Shared>,
    key: IpAddr,
}

impl ClientSlot<'_> {
    pub(crate) fn take_owned(shared: &Arc<Shared>, ip: IpAddr) -> Option<OwnedClientSlot> {
        let slot = ClientSlot::take(shared, ip)?;
        let key = slot.key;
        std::mem::forget(slot); // the count is now held by the owned slot
        Some(OwnedClientSlot { shared: shared.clone(), key })
    }
}

impl Drop for OwnedClientSlot {
    fn drop(&mut self) {
        drop(ClientSlot { shared: &self.shared, key: self.key });
    }
}

enum HeadRead {
    Head(Vec<u8>, Vec<u8>),
    TooLarge,
    Closed,
}

/// Reads until the blank line, starting with the bytes already read (`buf`, after a PROXY
/// protocol header); returns the head and any bytes the client sent after it.
async fn read_head(stream: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<HeadRead> {
    let mut chunk = [0u8; 1024];
    let mut scan_from = 0;
    loop {
        if let Some(end) = head::head_len(&buf[scan_from..]).map(|e| e + scan_from) {
            if end > MAX_HEAD {
                return Ok(HeadRead::TooLarge);
            }
            let rest = buf.split_off(end);
            return Ok(HeadRead::Head(buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Ok(HeadRead::TooLarge);
        }
        scan_from = buf.len().saturating_sub(3);
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(HeadRead::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a PROXY protocol header; returns whom it names and the bytes after it. `Ok(None)`
/// when the load balancer closed without one.
async fn read_proxy_header(stream: &mut TcpStream) -> std::io::Result<Option<Result<(Origin, Vec<u8>), HeaderError>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        match proxy_protocol::parse(&buf) {
            Ok(None) => continue,
            Ok(Some((origin, len))) => return Ok(Some(Ok((origin, buf.split_off(len))))),
            Err(e) => return Ok(Some(Err(e))),
        }
    }
}

pub struct ProxyServer {
    shared: Arc<Shared>,
    /// One SO_REUSEPORT listener per worker thread on the same address: the kernel spreads
    /// new connections over them, and each tunnel lives on one thread for its whole life
    /// (no work stealing, no cross-thread wake-ups on the data path).
    listeners: Vec<std::net::TcpListener>,
    admin: TcpListener,
    /// The browser path (page server + WebSocket bridge), when configured.
    html5: Option<TcpListener>,
    /// The configuration file whose allow-list and live limits are read again as it changes.
    config_file: Option<PathBuf>,
}

impl ProxyServer {
    pub async fn bind(cfg: ProxyConfig) -> anyhow::Result<Self> {
        check_origins(&cfg)?;
        let creds = read_credentials(&cfg)?;
        let defer = cfg.limits.handshake_timeout().as_secs() as u32;
        let keepalive = Keepalive::within(cfg.limits.dead_peer_timeout());
        let client_socket = &cfg.client_socket;
        let listeners = bind_workers(&cfg.listen, cfg.workers, defer, keepalive, client_socket).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
        if let Some(cc) = &client_socket.congestion_control {
            tracing::info!(congestion_control = %cc, "client sockets' congestion control");
        }
        if let Some(asked) = client_socket.send_buffer() {
            // The kernel grants twice the ask (half for its bookkeeping), at most twice
            // net.core.wmem_max: say what the clients' sockets really get.
            let granted = rustix::net::sockopt::socket_send_buffer_size(&listeners[0])?;
            if granted < 2 * asked as usize {
                tracing::warn!(asked, granted, "client send buffer: the kernel granted less than asked (net.core.wmem_max); clients get the smaller buffer");
            } else {
                tracing::info!(asked, granted, "client send buffer");
            }
        }
        let admin = crate::admin::bind(&cfg.admin_listen).await?;
        let (mut html5_cert, mut hypervisor_tls) = (None, None);
        let html5 = match &cfg.html5 {
            Some(h) => {
                if cfg.auth_mode != AuthMode::Ticket {
                    anyhow::bail!("the browser path needs auth mode Ticket: its token names the target");
                }
                if let Some(files) = &h.tls {
                    let cert = crate::tls::CertFiles::load_pair(&files.cert_file, &files.key_file).map_err(|e| anyhow::anyhow!("browser-side TLS: {e:#}"))?;
                    html5_cert = Some(cert);
                }
                if let Some(u) = &h.upstream_tls {
                    let ca = super::upstream_tls::load(&u.ca_file, u.host_subject.clone()).map_err(|e| anyhow::anyhow!("TLS to hypervisors: {e:#}"))?;
                    hypervisor_tls = Some(ca);
                }
                let l = crate::listener::bind(&h.listen, "html5").await?;
                // Browsers sit behind the same NATs and load balancers as SPICE clients, and
                // a slow one queues display updates as a native client does.
                keepalive.apply(&l)?;
                super::sockopt::apply_client_socket(&l, client_socket)?;
                Some(l)
            }
            None => None,
        };
        // The limit the open-files limit leaves room for, raised first if it can be.
        let tunnel_limit = super::open_files::fit(cfg.limits.tunnel_limit(), listeners.len(), html5.is_some());
        let metrics = ProxyMetrics::default();
        metrics.tunnel_limit.set(tunnel_limit as i64);
        metrics.allow_list_rules.set(cfg.allowed_targets.len() as i64);
        let html5_connections = Waiting::new(tunnel_limit, metrics.html5_waiting_connections.clone());
        let shared = Arc::new(Shared {
            allow: RwLock::new(AllowList::new(cfg.allowed_targets.clone())),
            limits: RwLock::new(cfg.limits),
            origins: RwLock::new(cfg.allowed_origins().to_vec()),
            balancers: RwLock::new(cfg.proxy_protocol.clone().unwrap_or_default()),
            tunnels: Places::new(tunnel_limit),
            waiting: Waiting::new(tunnel_limit, metrics.waiting_connections.clone()),
            html5_connections,
            workers: listeners.len(),
            creds: RwLock::new(creds),
            metrics,
            per_client: Mutex::new(HashMap::new()),
            auth_failures: AuthThrottle::new(cfg.limits.max_auth_failures(), cfg.limits.auth_failure_window()),
            keepalive,
            html5_cert,
            hypervisor_tls,
            cfg,
        });
        Ok(Self { shared, listeners, admin, html5, config_file: None })
    }

    /// Reads the allow-list and the live limits from `path` again as it changes (see
    /// `reload_config`).
    pub fn reloading_config_from(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0].local_addr().expect("bound listener")
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener")
    }
    pub fn html5_addr(&self) -> Option<SocketAddr> {
        self.html5.as_ref().map(|l| l.local_addr().expect("bound listener"))
    }

    /// Serves until `shutdown` flips to true, then stops: fails readiness at once, goes on
    /// accepting for the shutdown delay, then stops accepting and lets open tunnels finish
    /// until the drain deadline, then closes what is left.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let ProxyServer { shared, listeners, admin, html5, config_file } = self;
        let (ready_tx, ready_rx) = watch::channel(true);
        let encode = {
            let s = shared.clone();
            Arc::new(move || s.metrics.encode())
        };
        let admin_task = tokio::spawn(crate::admin::serve(admin, encode, crate::admin::ready_while(ready_rx, "draining"), shared.metrics.admin_connections.clone()));
        let reload = tokio::spawn(reload_credentials(shared.clone()));
        let reload_cert = shared.html5_cert.clone().map(|cert| {
            let s = shared.clone();
            cert.keep_reloading("browser-side certificate", move |served| {
                s.metrics.tls_cert_expiry.set(served.not_after);
            })
        });
        let reload_hypervisor_ca = shared.hypervisor_tls.clone().map(|ca| {
            let s = shared.clone();
            ca.keep_reloading("hypervisor CA", move |read| {
                s.metrics.hypervisor_ca_expiry.set(read.not_after);
            })
        });
        // True once the drain deadline passed; a new allow-list also notifies its receivers
        // (with the value unchanged), so every open tunnel checks its target again.
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let reload_config = config_file.map(|path| tokio::spawn(reload_config(shared.clone(), path, cancel_tx.clone())));
        // Flips once the shutdown delay after the stop signal is over: then the listeners close.
        let (stop_accepting_tx, stop_accepting) = watch::channel(false);
        let tracker = Tracker::new();
        let html5_task = html5.map(|l| {
            let mut stop = stop_accepting.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tokio::spawn(super::websocket::serve(shared.clone(), l, tracker.clone(), cancel_rx.clone(), stopped))
        });
        // Released once the drain is over: a worker's runtime (and every tunnel task on it)
        // must live until then.
        let (done_tx, done_rx) = watch::channel(false);
        let mut workers = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let (shared, tracker, cancel, stop, mut done) = (shared.clone(), tracker.clone(), cancel_rx.clone(), stop_accepting.clone(), done_rx.clone());
            // I/O and timers only: enable_all would also run the child-process driver, which
            // looks for orphaned children on every park (seen in profiles of the set-up path).
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
            workers.push(std::thread::Builder::new().name(format!("connect-{i}")).spawn(move || {
                runtime.block_on(async move {
                    tokio::spawn(keep_a_timer_armed(shared.clone()));
                    match TcpListener::from_std(listener) {
                        Ok(l) => accept_loop(shared, l, tracker, cancel, stop).await,
                        Err(e) => tracing::error!(error = %e, "cannot register a listener"),
                    }
                    let _ = done.wait_for(|d| *d).await;
                })
            })?);
        }
        let _ = shutdown.wait_for(|s| *s).await;
        let _ = ready_tx.send(false);
        crate::listener::sleep_shutdown_delay(shared.limits().shutdown_delay(), "still accepting").await;
        let _ = stop_accepting_tx.send(true);
        if let Some(t) = html5_task {
            // Stops accepting at once (the bridges already open are tracked below).
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let deadline = shared.limits().drain();
        tracker.close(); // `wait` resolves once the tracker is closed and empty
        tracing::info!(open = tracker.len(), ?deadline, "draining");
        if tokio::time::timeout(deadline, tracker.wait()).await.is_err() {
            tracing::info!(open = tracker.len(), "drain deadline passed: closing the remaining tunnels");
            let _ = cancel_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
        let _ = done_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join()))).await;
        admin_task.abort();
        reload.abort();
        reload_config.into_iter().for_each(|r| r.abort());
        reload_cert.into_iter().chain(reload_hypervisor_ca).for_each(|r| r.abort());
        Ok(())
    }
}

/// Binds `workers` listeners (default: one per CPU this process may use) to one address with
/// SO_REUSEPORT; with port 0 the first picks the port and the others join it.
/// Accepted sockets inherit TCP_NODELAY, the client keepalive, the send buffer and the
/// congestion control (`client_socket`) from the listener (no setsockopt per tunnel), and
/// TCP_DEFER_ACCEPT hands a connection over only once its request has arrived, so a tunnel
/// starts with its head already readable: no wake-up just to find nothing to read.
/// A client that sends nothing is handed over after about `defer_secs` all the same, and
/// then meets the handshake timeout.
async fn bind_workers(listen: &str, workers: Option<usize>, defer_secs: u32, keepalive: Keepalive, client_socket: &ClientSocketSpec) -> std::io::Result<Vec<std::net::TcpListener>> {
    let n = workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).clamp(1, 64);
    // SO_REUSEPORT would also let another process of this user join a port it listens on and
    // silently take a share of the connections (a second proxy started by mistake, an old one
    // still running on the host network). A bind without it fails on a listening port (and
    // only there: SO_REUSEADDR lets it past connections in TIME_WAIT), so that is "address in
    // use", as for any server. Another listener could slip in between the two binds, but not
    // an operator's mistake.
    if listen.rsplit(':').next() != Some("0") {
        drop(crate::listener::bind_socket(listen, |socket| socket.set_reuseaddr(true)).await?);
    }
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..n {
        // The first binds what `listen` says (port 0: any); the others join it on its port.
        let listen = match out.first() {
            Some(first) => first.local_addr()?.to_string(),
            None => listen.to_string(),
        };
        let socket = crate::listener::bind_socket(&listen, |socket| {
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.set_nodelay(true)?;
            super::sockopt::apply_client_socket(socket, client_socket)?;
            super::sockopt::set_defer_accept(socket, defer_secs)?;
            keepalive.apply(socket)
        })
        .await?;
        out.push(socket.listen(1024)?.into_std()?);
    }
    Ok(out)
}

/// How often a worker's sentinel timer falls due: before any timer a tunnel arms (its idle
/// timer, and its half-closed one when a side ends), at most every 30 s.
fn sentinel_period(limits: &crate::crd::ProxyLimits) -> Duration {
    (limits.half_closed_timeout().min(limits.idle_timeout()) / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Keeps one timer armed on a worker that falls due before any a tunnel arms. tokio's timer
/// wakes its own driver (an eventfd write, then one more return from epoll_wait) whenever a
/// timer is armed that falls due before every other: on a worker whose only timers are its
/// tunnels' idle timers, that was each new tunnel's and each half-closed one's, two per
/// tunnel. It costs a wake-up every period, which follows the limits in use.
async fn keep_a_timer_armed(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(sentinel_period(&shared.limits())).await;
    }
}

/// One worker's accept loop: every tunnel it accepts runs on this worker's thread.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tracker: Tracker, cancel: watch::Receiver<bool>, mut stop: watch::Receiver<bool>) {
    // One wait for the whole loop: a new one per accept would join and leave the channel's
    // waiter list (a lock shared by every worker) for each connection.
    let stopped = stop.wait_for(|s| *s);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; continue }
                };
                let (shared, cancel) = (shared.clone(), cancel.clone());
                tracker.spawn(handle(shared, stream, peer, cancel));
            }
        }
    }
}

/// Secret volumes are updated in place by the kubelet: pick up rotated keys without a restart.
/// (Not `crate::tls::Reloading`: a missing previous or next key is normal here, not an error.)
async fn reload_credentials(shared: Arc<Shared>) {
    let apply = |read: &Credentials| {
        let mut creds = shared.creds.write().expect("credentials lock");
        if *creds != *read {
            *creds = read.clone();
            tracing::info!(ticket_keys = read.keys.len(), basic = read.basic.is_some(), "using the changed credentials");
        }
        Ok(())
    };
    crate::mounted::follow("credentials", || read_credentials(&shared.cfg), apply).await
}

/// What ends an open tunnel or bridge from outside: the drain deadline, or an allow-list that
/// no longer lists its target; and the timeouts in use, which a changed configuration file may
/// change. A new file notifies `cancel` without changing it.
pub(crate) struct FromOutside<'a> {
    pub(crate) cancel: &'a mut watch::Receiver<bool>,
    pub(crate) shared: &'a Shared,
    pub(crate) target: Option<SocketAddr>,
}

impl tunnel::Outside for FromOutside<'_> {
    fn timeouts(&self) -> tunnel::Timeouts {
        self.shared.tunnel_timeouts()
    }

    fn ends(&mut self) -> Option<Close> {
        // Marks the channel seen, so the check of the target must follow: a new list that
        // came after the handshake's own check is then not missed.
        if *self.cancel.borrow_and_update() {
            return Some(Close::Drained);
        }
        self.target.is_some_and(|t| !self.shared.still_permits(t)).then_some(Close::Revoked)
    }

    async fn changed(&mut self) -> Option<Close> {
        if self.cancel.changed().await.is_err() {
            return Some(Close::Drained);
        }
        self.ends()
    }
}

/// The kubelet updates a ConfigMap volume in place (within about a minute): a changed
/// allow-list and changed live limits (`ProxyLimits::with_live_settings_of`) apply without a
/// restart, since a rollout would end every open console. Open tunnels to targets the new list
/// does not name are closed; open tunnels beyond a lowered limit stay; changed idle and
/// half-closed timeouts apply to open tunnels too, counted from their last activity.
/// The other settings apply when the pod restarts (the operator rolls the pods for them), so a
/// file that changes them only says so. A file that cannot be used changes nothing.
async fn reload_config(shared: Arc<Shared>, path: PathBuf, nudge: watch::Sender<bool>) {
    let read = || std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()));
    // The first read is compared with what is in use, so a change between the start and the
    // first read is not missed.
    let apply = |text: &Vec<u8>| {
        let new = changed_config(text, &shared.cfg).inspect_err(|_| {
            shared.metrics.config_reloads.get_or_create(&Outcome { outcome: "refused" }).inc();
        })?;
        if new.restart_needed {
            tracing::info!("settings that are read at start changed: they apply when this pod restarts");
        }
        let allow_list_changed = shared.use_allow_list(new.allowed_targets);
        let timeouts_before = shared.tunnel_timeouts();
        let limits_changed = shared.use_limits(new.limits);
        let origins_changed = shared.use_origins(new.allowed_origins);
        let balancers_changed = new.balancers.is_some_and(|b| shared.use_balancers(b));
        if allow_list_changed || limits_changed || origins_changed || balancers_changed {
            shared.metrics.config_reloads.get_or_create(&Outcome { outcome: "applied" }).inc();
        }
        // Open tunnels check their target against the new list, and re-plan their idle
        // timeouts with new ones (other limits concern only the next tunnels).
        if allow_list_changed || shared.tunnel_timeouts() != timeouts_before {
            nudge.send_modify(|_| {});
        }
        Ok(())
    };
    crate::mounted::follow("configuration file", read, apply).await
}

/// What a running replica takes from a changed configuration file.
struct Changed {
    allowed_targets: Vec<super::config::AllowedTarget>,
    /// The limits in use, with the file's live ones.
    limits: ProxyLimits,
    allowed_origins: Vec<String>,
    /// The trusted load balancers, when the PROXY protocol is on in the file and in use.
    balancers: Option<ProxyProtocolConfig>,
    /// Whether the file also changes settings read at start.
    restart_needed: bool,
}

/// What of a changed configuration file applies at once, and whether it changes anything
/// else (which needs a restart). Never an empty allow-list: that would refuse every console.
fn changed_config(text: &[u8], running: &ProxyConfig) -> anyhow::Result<Changed> {
    let new: ProxyConfig = serde_json::from_slice(text).map_err(|e| anyhow::anyhow!("invalid proxy configuration: {e}"))?;
    if new.allowed_targets.is_empty() {
        anyhow::bail!("allowedTargets is empty");
    }
    if new.proxy_protocol.as_ref().is_some_and(|p| p.trusted.is_empty()) {
        anyhow::bail!("proxyProtocol.trusted is empty: every connection would be refused");
    }
    check_origins(&new)?;
    let restart_needed = new.read_at_start() != running.read_at_start();
    // Turning the PROXY protocol on or off changes how every connection begins: that waits
    // for the restart; while it is on, the balancers it trusts may change.
    let balancers = new.proxy_protocol.clone().filter(|_| running.proxy_protocol.is_some());
    Ok(Changed { limits: running.limits.with_live_settings_of(&new.limits), allowed_origins: new.allowed_origins().to_vec(), allowed_targets: new.allowed_targets, balancers, restart_needed })
}

/// Every `html5.allowedOrigins` entry is an origin (they also go into a header of the pages).
fn check_origins(cfg: &ProxyConfig) -> anyhow::Result<()> {
    for o in cfg.allowed_origins() {
        super::websocket::origin(o).map_err(|why| anyhow::anyhow!("html5.allowedOrigins: {why}"))?;
    }
    Ok(())
}

impl Shared {
    /// Puts `targets` to use for the next tunnels; false when they are the list in use.
    fn use_allow_list(&self, targets: Vec<super::config::AllowedTarget>) -> bool {
        let rules = targets.len();
        if !replace_if_changed(&self.allow, AllowList::new(targets)) {
            return false;
        }
        self.metrics.allow_list_rules.set(rules as i64);
        tracing::info!(rules, "new allow-list in use; open tunnels to targets it does not list are closed");
        true
    }

    /// Puts `origins` to use for the next WebSocket handshakes; false when they are in use.
    fn use_origins(&self, origins: Vec<String>) -> bool {
        let changed = replace_if_changed(&self.origins, origins.clone());
        if changed {
            tracing::info!(?origins, "new allowed origins in use for the browser port");
        }
        changed
    }

    /// Puts `balancers` to use for the next connections; false when they are in use. Open
    /// connections that came through a balancer no longer listed stay open.
    fn use_balancers(&self, balancers: ProxyProtocolConfig) -> bool {
        let trusted = balancers.trusted.clone();
        let changed = replace_if_changed(&self.balancers, balancers);
        if changed {
            tracing::info!(?trusted, "new load balancers trusted to send the PROXY protocol");
        }
        changed
    }

    /// Whether `ip` is a load balancer trusted to send the PROXY protocol.
    pub(crate) fn trusts_balancer(&self, ip: IpAddr) -> bool {
        self.balancers.read().expect("balancers lock").trusts(ip)
    }

    /// The console pages' `Content-Security-Policy`: the allowed origins may frame them.
    pub(crate) fn frame_ancestors(&self) -> String {
        super::websocket::frame_ancestors(&self.origins.read().expect("origins lock"))
    }

    /// Whether a WebSocket handshake's `Origin` may open a console (see `websocket::check_origin`).
    pub(crate) fn check_origin(&self, headers: &axum::http::HeaderMap, scheme: &str) -> Result<(), String> {
        super::websocket::check_origin(headers, scheme, &self.origins.read().expect("origins lock"))
    }

    /// Puts `limits` to use for the next tunnels; false when they are the limits in use.
    fn use_limits(&self, limits: ProxyLimits) -> bool {
        if !replace_if_changed(&self.limits, limits) {
            return false;
        }
        // As at start: no more tunnels than the open-files limit leaves descriptors for.
        let tunnel_limit = super::open_files::fit(limits.tunnel_limit(), self.workers, self.cfg.html5.is_some());
        self.tunnels.set_limit(tunnel_limit);
        self.waiting.set_limit(tunnel_limit);
        self.html5_connections.set_limit(tunnel_limit);
        self.metrics.tunnel_limit.set(tunnel_limit as i64);
        self.auth_failures.set_limits(limits.max_auth_failures(), limits.auth_failure_window());
        tracing::info!(
            tunnel_limit,
            per_client = limits.per_client_tunnel_limit(),
            idle = ?limits.idle_timeout(),
            half_closed = ?limits.half_closed_timeout(),
            connect = ?limits.connect_timeout(),
            auth_failures = limits.max_auth_failures(),
            auth_failure_window = ?limits.auth_failure_window(),
            "new limits in use: timeouts for open tunnels too, the others for the next tunnels"
        );
        true
    }
}

/// Puts `new` in `lock` unless it holds an equal value already; whether it changed.
fn replace_if_changed<T: PartialEq>(lock: &RwLock<T>, new: T) -> bool {
    let mut in_use = lock.write().expect("a reloaded setting's lock");
    if *in_use == new {
        return false;
    }
    *in_use = new;
    true
}

/// Counts spawned tunnel tasks so a drain can wait for them. Its `spawn` wraps the future in
/// a struct, not an async block that would hold the future twice (rust#62958).
pub(crate) use tokio_util::task::TaskTracker as Tracker;

async fn handle(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, mut cancel: watch::Receiver<bool>) {
    let started = Instant::now();
    let peer_ip = canonical(peer.ip());
    let mut audit = Audit { event: "tunnel", client: Some(SocketAddr::new(peer_ip, peer.port())), ..Default::default() };
    let outcome = serve_one(&shared, &mut client, peer_ip, started, &mut audit, &mut cancel).await;
    let (label, close) = match &outcome {
        Ok(Close::NoRequest) => ("no_request", Close::NoRequest.as_str().to_string()),
        Ok(close) => ("ok", close.as_str().to_string()),
        Err((version, r)) => {
            let _ = client.write_all(&response(*version, r)).await;
            let _ = client.shutdown().await;
            (status_label(r.status), format!("{} {}", r.status, r.body))
        }
    };
    if let Ok(Some(end)) = outcome.as_ref().map(Close::end) {
        shared.metrics.ended(end);
    }
    if label == "ok" {
        shared.metrics.tunnels_ok.inc();
    } else {
        shared.metrics.tunnels.get_or_create(&Outcome { outcome: label }).inc();
    }
    // Closed before the audit line is written: with a half-closed tunnel this close is what
    // sends the client its FIN, and a slow log must not hold it back.
    drop(client);
    audit.outcome = label;
    audit.close = close;
    audit.duration_ms = started.elapsed().as_millis() as u64;
    audit.emit();
}

pub(crate) fn status_label(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        403 => "403",
        405 => "405",
        407 => "407",
        408 => "408",
        429 => "429",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "error",
    }
}

type Refused = (Version, Refusal);

async fn serve_one(
    shared: &Shared,
    client: &mut TcpStream,
    peer_ip: IpAddr,
    started: Instant,
    audit: &mut Audit,
    cancel: &mut watch::Receiver<bool>,
) -> Result<Close, Refused> {
    let v10 = Version::Http10;
    // Until its request is read and authorised a connection takes no tunnel place, only a
    // waiting one: silent connections cannot turn away clients that bring a ticket.
    let mut waiting = shared.waiting.enter();
    // Boxed like the opening below: its buffers must not stay in every tunnel's task.
    let accepted = tokio::select! {
        biased;
        accepted = Box::pin(accept_request(shared, client, peer_ip, audit, started)) => accepted?,
        () = waiting.told_to_close() => return Err((v10, refuse(408, made_room(shared.waiting.limit(), started.elapsed())))),
    };
    drop(waiting);
    let Some(Accepted { request, leftover, slot: _slot }) = accepted else {
        return Ok(Close::NoRequest);
    };
    let Some(_permit) = shared.tunnels.take() else {
        return Err((request.version, refuse(503, AT_TUNNEL_LIMIT)));
    };
    let mut upstream = Box::pin(open(shared, client, audit, request, leftover)).await?;
    shared.metrics.handshake.observe(started.elapsed().as_secs_f64());
    shared.metrics.active.inc();
    let activity = Activity::default();
    let close = tunnel::run(client, &mut upstream, shared.cfg.data_path, &activity, &mut FromOutside { cancel, shared, target: audit.upstream }).await;
    shared.metrics.active.dec();
    let (up, down) = (activity.up.load(Ordering::Relaxed), activity.down.load(Ordering::Relaxed));
    shared.metrics.bytes_up.inc_by(up);
    shared.metrics.bytes_down.inc_by(down);
    shared.metrics.spliced.inc_by(activity.spliced.load(Ordering::Relaxed));
    audit.bytes_up = Some(up);
    audit.bytes_down = Some(down);
    Ok(close)
}

/// The answer of a connection closed to make room for a newer one.
fn made_room(limit: usize, waited: Duration) -> String {
    format!("closed to make room: {limit} connections were waiting to send a request (the tunnel limit), and this one had waited longest ({} ms)", waited.as_millis())
}

/// A request read and authorised, and the client's place in its per-client count.
struct Accepted<'a> {
    request: head::Request,
    /// Bytes the client sent after its request head, for the upstream.
    leftover: Vec<u8>,
    slot: ClientSlot<'a>,
}

/// Reads a PROXY protocol header when configured, then the request head, all within the
/// handshake timeout from `started`; checks it and authorises it. `None` when the client went
/// away without a request.
async fn accept_request<'a>(shared: &'a Shared, client: &mut TcpStream, peer_ip: IpAddr, audit: &mut Audit, started: Instant) -> Result<Option<Accepted<'a>>, Refused> {
    let v10 = Version::Http10;
    // One deadline for the whole request: a PROXY protocol header, then the head.
    let deadline = tokio::time::Instant::from_std(started) + shared.limits().handshake_timeout();
    let (client_ip, early) = match &shared.cfg.proxy_protocol {
        None => (peer_ip, Vec::with_capacity(512)),
        Some(_) => {
            if !shared.trusts_balancer(peer_ip) {
                return Err((v10, refuse(403, format!("{peer_ip} is not a load balancer of this proxy: connections come through one (PROXY protocol)"))));
            }
            match tokio::time::timeout_at(deadline, read_proxy_header(client)).await {
                Err(_) => return Err((v10, refuse(408, format!("PROXY protocol header not received within {:?}", shared.limits().handshake_timeout())))),
                Ok(Err(_) | Ok(None)) => return Ok(None),
                Ok(Ok(Some(Err(e)))) => return Err((v10, refuse(400, e.to_string()))),
                Ok(Ok(Some(Ok((origin, rest))))) => match origin {
                    Origin::Client(addr) => {
                        let ip = canonical(addr.ip());
                        // The audit line names the client; the balancer's own address moves to `via`.
                        audit.via = audit.client.replace(SocketAddr::new(ip, addr.port()));
                        (ip, rest)
                    }
                    Origin::Itself => (peer_ip, rest),
                },
            }
        }
    };
    let Some(slot) = ClientSlot::take(shared, client_ip) else {
        return Err((v10, refuse(503, too_many_from(client_ip))));
    };
    let (head, leftover) = match tokio::time::timeout_at(deadline, read_head(client, early)).await {
        Err(_) => return Err((v10, refuse(408, format!("request head not received within {:?}", shared.limits().handshake_timeout())))),
        Ok(Err(_)) | Ok(Ok(HeadRead::Closed)) => return Ok(None),
        Ok(Ok(HeadRead::TooLarge)) => return Err((v10, refuse(400, format!("request head larger than {MAX_HEAD} bytes")))),
        Ok(Ok(HeadRead::Head(h, rest))) => (h, rest),
    };
    let request = match head::parse(&head) {
        Ok(r) => r,
        Err(e @ HeadError::NotConnect { version, .. }) => return Err((version, refuse(405, e.to_string()))),
        Err(e) => return Err((v10, refuse(400, e.to_string()))),
    };
    audit.target = Some(head::authority(&request.host, request.port));
    let who = shared.authorise(&request, client_ip).map_err(|r| (request.version, r))?;
    audit.user = who.user;
    audit.subject = who.subject;
    Ok(Some(Accepted { request, leftover, slot }))
}

/// Connects to the target of an accepted request, if the allow-list permits it, and answers 200.
async fn open(shared: &Shared, client: &mut TcpStream, audit: &mut Audit, request: head::Request, leftover: Vec<u8>) -> Result<TcpStream, Refused> {
    let version = request.version;
    let addrs = shared.allowed_addresses(&request.host, request.port).await.map_err(|r| (version, r))?;
    let (mut upstream, addr) = shared.connect(&addrs).await.map_err(|r| (version, r))?;
    audit.upstream = Some(addr);
    // Success: the status line and a blank line, nothing more; then the client speaks first.
    let ok = format!("{} 200 Connection established\r\n\r\n", version.as_str());
    client.write_all(ok.as_bytes()).await.map_err(|e| (version, refuse(400, e.to_string())))?;
    if !leftover.is_empty() {
        // Bytes a client sent before our reply belong to the upstream, in order.
        upstream.write_all(&leftover).await.map_err(|e| (version, refuse(502, e.to_string())))?;
        audit.bytes_early = Some(leftover.len());
    }
    Ok(upstream)
}

/// `spice-operator proxy --config FILE`: serve until SIGTERM/SIGINT, then drain.
pub async fn run_from_file(path: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read proxy configuration {path}: {e}"))?;
    let cfg: ProxyConfig = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid proxy configuration {path}: {e}"))?;
    if cfg.allowed_targets.is_empty() {
        anyhow::bail!("allowedTargets is empty: refusing to run an open proxy");
    }
    let server = ProxyServer::bind(cfg).await?.reloading_config_from(path);
    tracing::info!(listen = %server.local_addr(), admin = %server.admin_addr(), "proxy serving");
    let (tx, rx) = watch::channel(false);
    // Open tunnels drain until the deadline, or until a second signal.
    crate::on_stop_signals(move || {
        let _ = tx.send(true);
    });
    server.run(rx).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ProxyLimits;
    use crate::proxy::config::ProxyConfig;

    #[test]
    fn a_proxy_out_of_descriptors_answers_503_not_a_bad_gateway() {
        let addr: SocketAddr = "10.0.0.5:5900".parse().unwrap();
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let r = upstream_failed(addr, &std::io::Error::from_raw_os_error(errno));
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(r.body.starts_with("proxy has no resources left to connect to 10.0.0.5:5900 (") && r.body.ends_with("try again later"), "{}", r.body);
        }
        let refused = upstream_failed(addr, &std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(refused.status, 502);
        assert!(refused.body.starts_with("upstream 10.0.0.5:5900 refused the connection: "), "{}", refused.body);
    }

    fn shared(per_client: i32, limits: serde_json::Value) -> Arc<Shared> {
        let mut cfg: ProxyConfig = serde_json::from_value(serde_json::json!({
            "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0", "allowedTargets": [], "authMode": "None", "limits": limits,
        }))
        .unwrap();
        cfg.limits.max_tunnels_per_client = per_client;
        let metrics = ProxyMetrics::default();
        Arc::new(Shared {
            allow: RwLock::new(AllowList::new(vec![])),
            limits: RwLock::new(cfg.limits),
            origins: RwLock::new(Vec::new()),
            balancers: RwLock::new(ProxyProtocolConfig::default()),
            tunnels: Places::new(10),
            waiting: Waiting::new(10, metrics.waiting_connections.clone()),
            html5_connections: Waiting::new(10, metrics.html5_waiting_connections.clone()),
            workers: 1,
            creds: RwLock::new(Credentials::default()),
            metrics,
            per_client: Mutex::new(HashMap::new()),
            auth_failures: AuthThrottle::new(cfg.limits.max_auth_failures(), cfg.limits.auth_failure_window()),
            keepalive: Keepalive::within(cfg.limits.dead_peer_timeout()),
            html5_cert: None,
            hypervisor_tls: None,
            cfg,
        })
    }

    #[test]
    fn a_changed_file_gives_its_allow_list_live_limits_origins_and_balancers_and_says_whether_a_restart_is_needed() {
        let running: ProxyConfig = serde_json::from_value(serde_json::json!({
            "listen": "0.0.0.0:3128", "adminListen": "0.0.0.0:9090", "authMode": "Ticket", "limits": {},
            "allowedTargets": [{"cidr": "10.0.0.0/24", "ports": [[5900, 5999]]}],
        }))
        .unwrap();
        let file = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = serde_json::to_value(&running).unwrap();
            edit(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        let wider = changed_config(&file(&|v| v["allowedTargets"].as_array_mut().unwrap().push(serde_json::json!({"cidr": "10.1.0.0/24", "ports": [[5900, 5900]]}))), &running).unwrap();
        assert_eq!(wider.allowed_targets.len(), 2);
        assert_eq!(wider.limits, running.limits);
        assert!(!wider.restart_needed, "only the allow-list changed");
        // Every live limit at once: all of them apply, none needs a restart.
        let live = [
            ("maxTunnels", 5),
            ("maxTunnelsPerClient", 2),
            ("idleTimeoutSeconds", 7200),
            ("halfClosedTimeoutSeconds", 30),
            ("connectTimeoutSeconds", 3),
            ("maxAuthFailuresPerClient", 0),
            ("authFailureWindowSeconds", 60),
        ];
        let raised = changed_config(&file(&|v| live.iter().for_each(|(k, n)| v["limits"][k] = (*n).into())), &running).unwrap();
        assert!(!raised.restart_needed, "live limits only");
        assert_eq!(raised.allowed_targets, running.allowed_targets);
        let l = raised.limits;
        let got = [l.max_tunnels, l.max_tunnels_per_client, l.idle_timeout_seconds, l.half_closed_timeout_seconds, l.connect_timeout_seconds, l.max_auth_failures_per_client, l.auth_failure_window_seconds];
        assert_eq!(got.to_vec(), live.iter().map(|(_, n)| *n).collect::<Vec<_>>());
        // Each limit read at start: a restart, and the limit in use stays as it was.
        for key in ["deadPeerTimeoutSeconds", "handshakeTimeoutSeconds", "drainSeconds", "shutdownDelaySeconds"] {
            let c = changed_config(&file(&|v| v["limits"][key] = 42.into()), &running).unwrap();
            assert!(c.restart_needed, "{key} is read at start");
            assert_eq!(c.limits, running.limits, "{key} must not change the limits in use");
        }
        // The browser port's allowed origins apply at once too; the port itself is read at start.
        let mut browser = running.clone();
        browser.html5 = Some(serde_json::from_value(serde_json::json!({"listen": "0.0.0.0:6082", "allowedOrigins": ["https://a.example"]})).unwrap());
        let mut more = serde_json::to_value(&browser).unwrap();
        more["html5"]["allowedOrigins"] = serde_json::json!(["https://a.example", "https://b.example"]);
        let c = changed_config(&serde_json::to_vec(&more).unwrap(), &browser).unwrap();
        assert!(!c.restart_needed, "origins only");
        assert_eq!(c.allowed_origins, ["https://a.example", "https://b.example"]);
        assert!(changed_config(&serde_json::to_vec(&browser).unwrap(), &running).unwrap().restart_needed, "a browser port added");
        // Refused whole, as the operator never writes one: the pages' CSP header would carry it.
        more["html5"]["allowedOrigins"] = serde_json::json!(["https://a.example", "https://b.example; script-src *"]);
        let injected = changed_config(&serde_json::to_vec(&more).unwrap(), &browser).err().unwrap();
        assert!(injected.to_string().starts_with("html5.allowedOrigins: \"https://b.example; script-src *\" is not an origin"), "{injected}");
        // The load balancers trusted to send the PROXY protocol apply at once; turning the
        // protocol on or off waits for the restart.
        let mut balanced = running.clone();
        balanced.proxy_protocol = Some(ProxyProtocolConfig { trusted: vec!["10.9.0.0/24".parse().unwrap()] });
        let mut moved = serde_json::to_value(&balanced).unwrap();
        moved["proxyProtocol"]["trusted"] = serde_json::json!(["10.9.0.0/24", "10.9.1.0/24"]);
        let c = changed_config(&serde_json::to_vec(&moved).unwrap(), &balanced).unwrap();
        assert!(!c.restart_needed, "trusted balancers only");
        assert_eq!(c.balancers.unwrap().trusted.len(), 2);
        let on = changed_config(&serde_json::to_vec(&balanced).unwrap(), &running).unwrap();
        assert!(on.restart_needed && on.balancers.is_none(), "the PROXY protocol turned on waits for the restart");
        let off = changed_config(&serde_json::to_vec(&running).unwrap(), &balanced).unwrap();
        assert!(off.restart_needed && off.balancers.is_none(), "the PROXY protocol turned off waits for the restart");
        moved["proxyProtocol"]["trusted"] = serde_json::json!([]);
        let nobody = changed_config(&serde_json::to_vec(&moved).unwrap(), &balanced).err().unwrap();
        assert_eq!(nobody.to_string(), "proxyProtocol.trusted is empty: every connection would be refused");
        let other = changed_config(&file(&|v| v["authMode"] = "Basic".into()), &running).unwrap();
        assert!(other.restart_needed, "the auth mode is read at start");
        let empty = changed_config(&file(&|v| v["allowedTargets"] = serde_json::json!([])), &running).err().unwrap();
        assert_eq!(empty.to_string(), "allowedTargets is empty");
        let garbled = changed_config(b"{\"listen\": ", &running).err().unwrap();
        assert!(garbled.to_string().starts_with("invalid proxy configuration: "), "{garbled}");
    }

    /// TCP_NODELAY, and the keepalive and user timeout that find a dead peer within `dead_peer`.
    fn assert_nodelay_and_keepalive(socket: &TcpStream, dead_peer: Duration, side: &str) {
        use rustix::net::sockopt;
        let want = Keepalive::within(dead_peer);
        assert!(socket.nodelay().unwrap(), "{side}: TCP_NODELAY");
        assert!(sockopt::socket_keepalive(socket).unwrap(), "{side}: SO_KEEPALIVE");
        assert_eq!(sockopt::tcp_keepidle(socket).unwrap(), want.idle, "{side}");
        assert_eq!(sockopt::tcp_keepintvl(socket).unwrap(), want.interval, "{side}");
        assert_eq!(sockopt::tcp_keepcnt(socket).unwrap(), want.probes, "{side}");
        assert_eq!(sockopt::tcp_user_timeout(socket).unwrap() as u128, dead_peer.as_millis(), "{side}");
    }

    #[tokio::test]
    async fn accepted_clients_inherit_nodelay_the_keepalive_and_the_send_buffer_from_the_listener() {
        let dead_peer = Duration::from_secs(ProxyLimits::default().dead_peer_timeout_seconds as u64);
        let client_socket = ClientSocketSpec { send_buffer_bytes: 64 * 1024, congestion_control: Some("reno".into()) };
        let listeners = bind_workers("127.0.0.1:0", Some(1), 5, Keepalive::within(dead_peer), &client_socket).await.unwrap();
        let listener = TcpListener::from_std(listeners.into_iter().next().unwrap()).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        client.write_all(b"x").await.unwrap(); // TCP_DEFER_ACCEPT hands over only once data came
        let (accepted, _) = listener.accept().await.unwrap();
        assert_nodelay_and_keepalive(&accepted, dead_peer, "client side");
        // Linux doubles what it grants (and 64 KiB is below every node's net.core.wmem_max).
        assert_eq!(rustix::net::sockopt::socket_send_buffer_size(&accepted).unwrap(), 128 * 1024, "the send buffer asked for");
        // reno: built into every kernel, and allowed to unprivileged processes.
        assert_eq!(rustix::net::sockopt::tcp_congestion(&accepted).unwrap(), "reno");
    }

    #[tokio::test]
    async fn a_congestion_control_the_kernel_refuses_stops_the_proxy_with_a_sentence() {
        let client_socket = ClientSocketSpec { congestion_control: Some("nosuchcc".into()), ..Default::default() };
        let err = bind_workers("127.0.0.1:0", Some(1), 5, Keepalive::within(Duration::from_secs(120)), &client_socket).await.unwrap_err();
        assert!(err.to_string().starts_with("clientSocket.congestionControl \"nosuchcc\": the kernel refused it"), "{err}");
        assert!(err.to_string().contains("net.ipv4.tcp_allowed_congestion_control"), "{err}");
    }

    #[tokio::test]
    async fn the_configured_client_socket_reaches_every_listener() {
        let keys = tempfile::tempdir().unwrap();
        std::fs::write(keys.path().join(ticket::CURRENT_KEY), b"0123456789abcdef0123456789abcdef").unwrap();
        let cfg = |client_socket: serde_json::Value| -> ProxyConfig {
            serde_json::from_value(serde_json::json!({
                "listen": "127.0.0.1:0", "adminListen": "127.0.0.1:0", "allowedTargets": [], "authMode": "Ticket", "limits": {},
                "keysDir": keys.path(), "clientSocket": client_socket, "workers": 2, "html5": {"listen": "127.0.0.1:0"},
            }))
            .unwrap()
        };
        let send_buffer = |server: &ProxyServer| -> Vec<usize> {
            let html5 = server.html5.as_ref().expect("the browser port is configured");
            server.listeners.iter().map(|l| rustix::net::sockopt::socket_send_buffer_size(l).unwrap()).chain([rustix::net::sockopt::socket_send_buffer_size(html5).unwrap()]).collect()
        };
        let server = ProxyServer::bind(cfg(serde_json::json!({"sendBufferBytes": 65536, "congestionControl": "reno"}))).await.unwrap();
        assert_eq!(send_buffer(&server), [128 * 1024; 3], "both CONNECT listeners and the browser port");
        let html5 = server.html5.as_ref().unwrap();
        for cc in server.listeners.iter().map(|l| rustix::net::sockopt::tcp_congestion(l).unwrap()).chain([rustix::net::sockopt::tcp_congestion(html5).unwrap()]) {
            assert_eq!(cc, "reno");
        }
        // Left to the kernel by default: the listeners keep their starting size, never twice an ask.
        let server = ProxyServer::bind(cfg(serde_json::json!({}))).await.unwrap();
        let fresh = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unset = rustix::net::sockopt::socket_send_buffer_size(&fresh).unwrap();
        assert_eq!(send_buffer(&server), [unset; 3]);
    }

    #[tokio::test]
    async fn without_a_send_buffer_size_the_kernel_autotunes_the_client_side() {
        let listeners = bind_workers("127.0.0.1:0", Some(1), 5, Keepalive::within(Duration::from_secs(120)), &ClientSocketSpec::default()).await.unwrap();
        let listener = TcpListener::from_std(listeners.into_iter().next().unwrap()).unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        client.write_all(b"x").await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        // Unlocked, the kernel sizes it from the connection (on loopback's 64 KiB segments,
        // past net.ipv4.tcp_wmem's starting figure at once) up to tcp_wmem's maximum.
        let wmem: Vec<usize> = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap().split_whitespace().map(|v| v.parse().unwrap()).collect();
        let got = rustix::net::sockopt::socket_send_buffer_size(&accepted).unwrap();
        assert!(got > wmem[1] && got <= wmem[2], "autotuned within tcp_wmem {wmem:?}: {got}");
    }

    #[tokio::test]
    async fn upstream_connections_have_nodelay_and_the_configured_keepalive() {
        let hypervisor = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A timeout other than the default, 600 s: 9 probes, the first after 60 s of silence, then 60 s apart.
        let s = shared(1, serde_json::json!({"deadPeerTimeoutSeconds": 600}));
        let (upstream, _) = s.connect(&[hypervisor.local_addr().unwrap()]).await.expect("connected");
        assert_eq!(rustix::net::sockopt::tcp_keepcnt(&upstream).unwrap(), 9);
        assert_nodelay_and_keepalive(&upstream, Duration::from_secs(600), "upstream side");
    }

    #[test]
    fn the_sentinel_timer_falls_due_before_any_timer_a_tunnel_arms() {
        let limits = |half_closed: i32, idle: i32| ProxyLimits { half_closed_timeout_seconds: half_closed, idle_timeout_seconds: idle, ..Default::default() };
        assert_eq!(sentinel_period(&ProxyLimits::default()), Duration::from_secs(30), "defaults: half-closed 60 s, idle 3600 s");
        assert_eq!(sentinel_period(&limits(10, 3600)), Duration::from_secs(5));
        assert_eq!(sentinel_period(&limits(600, 301)), Duration::from_secs(30), "at most 30 s");
        assert_eq!(sentinel_period(&limits(1, 3600)), Duration::from_secs(1), "at least 1 s");
        for (half_closed, idle) in [(7, 400), (60, 3600), (3, 301), (900, 900)] {
            let l = limits(half_closed, idle);
            assert!(sentinel_period(&l) < l.half_closed_timeout().min(l.idle_timeout()), "{half_closed} {idle}");
        }
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        // A v4-mapped address counts with the IPv4 address it is, not with ::ffff:0:0/64.
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(too_many_from("::ffff:192.0.2.7".parse().unwrap()), "too many tunnels from your address");
        assert!(too_many_from("2001:db8::1".parse().unwrap()).contains("/64"));
    }

    #[test]
    fn the_per_client_limit_spans_a_64_and_every_slot_gives_its_place_back() {
        let s = shared(2, serde_json::json!({}));
        let (a, b, c) = ("2001:db8::1".parse().unwrap(), "2001:db8::2:3".parse().unwrap(), "2001:db8::ffff".parse().unwrap());
        let first = ClientSlot::take(&s, a).expect("first tunnel");
        let second = ClientSlot::take_owned(&s, b).expect("second tunnel, other address of the /64");
        assert!(ClientSlot::take(&s, c).is_none(), "a third address of the same /64 is over the limit of 2");
        assert!(ClientSlot::take(&s, "2001:db8:0:1::1".parse().unwrap()).is_some(), "another /64 has its own count");
        drop(second);
        let third = ClientSlot::take(&s, c).expect("the owned slot gave its place back to the /64");
        drop((first, third));
        assert!(s.per_client.lock().unwrap().is_empty(), "no count is left behind");
    }
}
