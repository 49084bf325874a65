//! Listening sockets. `bind` and `bind_socket` make `[::]` listen on IPv6 and IPv4 alike, so
//! one default address serves IPv4, dual-stack and IPv6-only clusters. `Admitted` is a listener
//! whose connections are admitted in tasks of their own (a TLS handshake, a PROXY protocol
//! header), so a slow or silent client never holds up the accept loop or the clients behind it;
//! the engine API and the proxy's browser port use it. `serve` is every HTTP server's loop
//! (engine API, browser port, admin ports): axum's, with a time limit on each request head.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Every listener's default: IPv6 and IPv4 on all addresses.
pub const ANY: &str = "[::]";

/// A socket bound to `listen` (`host:port`), given `prepare` (options to set before the bind).
/// On `[::]` it accepts IPv4 too (IPV6_V6ONLY off, whatever `net.ipv6.bindv6only` says; IPv4
/// clients then come as `::ffff:a.b.c.d`, which every user of a peer address canonicalises).
/// On a node without IPv6 it binds `0.0.0.0` instead, with a warning.
pub async fn bind_socket(listen: &str, prepare: impl Fn(&TcpSocket) -> io::Result<()>) -> io::Result<TcpSocket> {
    let addr = tokio::net::lookup_host(listen).await?.next().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing"))?;
    match bind_exactly(addr, &prepare) {
        Err(e) if without_ipv6(addr, &e) => {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            tracing::warn!(%addr, instead = %v4, error = %e, "this node has no IPv6: listening on IPv4 only");
            bind_exactly(v4, &prepare)
        }
        other => other,
    }
}

fn bind_exactly(addr: SocketAddr, prepare: &impl Fn(&TcpSocket) -> io::Result<()>) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if addr.ip() == Ipv6Addr::UNSPECIFIED {
        rustix::net::sockopt::set_ipv6_v6only(&socket, false)?;
    }
    prepare(&socket)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// The error of a kernel booted without IPv6 (no AF_INET6 sockets) or with it disabled (no
/// IPv6 address to bind), for the one address that has an IPv4 equivalent.
fn without_ipv6(addr: SocketAddr, e: &io::Error) -> bool {
    addr.ip() == Ipv6Addr::UNSPECIFIED && matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

/// A listener on `listen` as `bind_socket` binds it; `what` names it in the error.
pub async fn bind(listen: &str, what: &str) -> anyhow::Result<TcpListener> {
    let bound = bind_socket(listen, |s| s.set_reuseaddr(true)).await.and_then(|s| s.listen(1024));
    bound.map_err(|e| anyhow::anyhow!("cannot listen on {listen} ({what}): {e}"))
}

pub struct Admitted<Io, Addr> {
    ready: mpsc::Receiver<(Io, Addr)>,
    local: Addr,
}

/// A number of places with a limit that may change while places are held: a lower limit
/// turns new takers away until enough places are given back, and takes none from their holders.
/// (A semaphore cannot shrink below what is held.)
#[derive(Clone)]
pub struct Places(Arc<PlaceCount>);

struct PlaceCount {
    taken: AtomicUsize,
    limit: AtomicUsize,
}

/// One place, given back on drop.
pub struct Place(Arc<PlaceCount>);

impl Places {
    /// `limit`: at least 1.
    pub fn new(limit: usize) -> Self {
        Places(Arc::new(PlaceCount { taken: AtomicUsize::new(0), limit: AtomicUsize::new(limit.max(1)) }))
    }

    /// A place, or None when as many are taken as the limit.
    pub fn take(&self) -> Option<Place> {
        let limit = self.0.limit.load(Ordering::Relaxed);
        self.0.taken.fetch_update(Ordering::Acquire, Ordering::Relaxed, |taken| (taken < limit).then_some(taken + 1)).ok()?;
        Some(Place(self.0.clone()))
    }

    pub fn limit(&self) -> usize {
        self.0.limit.load(Ordering::Relaxed)
    }

    /// At least 1. Places held beyond a lower limit stay held.
    pub fn set_limit(&self, limit: usize) {
        self.0.limit.store(limit.max(1), Ordering::Relaxed);
    }

    pub fn taken(&self) -> usize {
        self.0.taken.load(Ordering::Relaxed)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::Release);
    }
}

/// Connections that have not yet sent a request the server accepted (read, and its credentials
/// checked), at most `limit` at once; for `Admitted` and `serve`, every connection from accept
/// (its admission included) to close, each holding a place in turn. One more does not turn the
/// newcomer away: the connection that has waited longest is told to close instead (`serve`
/// finishes a request it is answering first). A flood of silent or trickling connections
/// (slowloris) from enough addresses would otherwise hold every place for the whole request
/// timeout and turn away every real client (a console, an engine, the kubelet's probe); this
/// way it has to open connections faster than `limit` per round trip of a real client to keep
/// one out.
#[derive(Clone)]
pub struct Waiting(Arc<WaitingQueue>);

struct WaitingQueue {
    limit: AtomicUsize,
    /// The next connection's number, and the waiting ones by number: the first waited longest.
    queue: std::sync::Mutex<(u64, BTreeMap<u64, oneshot::Sender<()>>)>,
    metrics: WaitingMetrics,
}

/// A `Waiting` queue's metrics: `<name>_closed_total`, the connections told to close to make
/// room, and `<name>`, the connections waiting now.
#[derive(Clone, Default)]
pub struct WaitingMetrics {
    pub closed: prometheus_client::metrics::counter::Counter,
    pub open: prometheus_client::metrics::gauge::Gauge,
}

impl WaitingMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry, name: &str, closed_help: impl Into<String>, open_help: &str) -> Self {
        let m = WaitingMetrics::default();
        registry.register(format!("{name}_closed"), closed_help, m.closed.clone());
        registry.register(name, open_help, m.open.clone());
        m
    }
}

/// One waiting connection's place, given back on drop.
pub struct WaitingPlace {
    queue: Arc<WaitingQueue>,
    id: u64,
    told: oneshot::Receiver<()>,
}

impl Waiting {
    /// `limit`: at least 1.
    pub fn new(limit: usize, metrics: WaitingMetrics) -> Self {
        let queue = std::sync::Mutex::new((0, BTreeMap::new()));
        Waiting(Arc::new(WaitingQueue { limit: AtomicUsize::new(limit.max(1)), queue, metrics }))
    }

    /// A place for a new connection, made by telling the longest waiting ones to close when
    /// as many wait as the limit (more than one after the limit was lowered).
    pub fn enter(&self) -> WaitingPlace {
        let (tx, told) = oneshot::channel();
        let limit = self.0.limit.load(Ordering::Relaxed);
        let mut guard = self.0.queue.lock().expect("waiting queue lock");
        let (next, waiting) = &mut *guard;
        while waiting.len() >= limit {
            let Some((_, oldest)) = waiting.pop_first() else { break };
            let _ = oldest.send(());
            self.0.metrics.closed.inc();
        }
        let id = *next;
        *next += 1;
        waiting.insert(id, tx);
        self.0.metrics.open.set(waiting.len() as i64);
        WaitingPlace { queue: self.0.clone(), id, told }
    }

    pub fn limit(&self) -> usize {
        self.0.limit.load(Ordering::Relaxed)
    }

    /// At least 1; connections waiting beyond a lower limit are told to close as new ones come.
    pub fn set_limit(&self, limit: usize) {
        self.0.limit.store(limit.max(1), Ordering::Relaxed);
    }
}

impl WaitingPlace {
    /// Resolves when this connection must close to make room for a newer one.
    pub async fn told_to_close(&mut self) {
        if (&mut self.told).await.is_err() {
            // Its entry is gone only when this place is dropped: never told.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for WaitingPlace {
    fn drop(&mut self) {
        let mut guard = self.queue.queue.lock().expect("waiting queue lock");
        guard.1.remove(&self.id);
        self.queue.metrics.open.set(guard.1.len() as i64);
    }
}

impl<Io: Send + 'static, Addr: Send + 'static> Admitted<Io, Addr> {
    /// Accepts on `tcp` and runs `admit` for each connection in a task of its own; what it
    /// returns is served, `None` is dropped. `admit` bounds its own time; a connection told to
    /// close to make room (`limit`) is dropped mid-admission.
    pub fn spawn<F, Fut>(tcp: TcpListener, local: Addr, limit: Waiting, admit: F) -> Self
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<(Io, Addr)>> + Send + 'static,
    {
        let (tx, ready) = mpsc::channel(64);
        let admit = Arc::new(admit);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if tx.is_closed() {
                    return;
                }
                let mut place = limit.enter();
                let (tx, admitted) = (tx.clone(), admit(stream, peer));
                tokio::spawn(async move {
                    let conn = tokio::select! {
                        biased;
                        conn = admitted => conn,
                        () = place.told_to_close() => return,
                    };
                    // `serve` takes a place of its own for the connection it is handed.
                    drop(place);
                    if let Some(conn) = conn {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        Self { ready, local }
    }
}

/// TLS, each handshake within `limit`.
pub fn tls(tcp: TcpListener, config: Arc<rustls::ServerConfig>, limit: Duration, connections: Waiting) -> std::io::Result<Admitted<TlsStream<TcpStream>, SocketAddr>> {
    let local = tcp.local_addr()?;
    let acceptor = TlsAcceptor::from(config);
    Ok(Admitted::spawn(tcp, local, connections, move |stream, peer| {
        let handshake = acceptor.accept(stream);
        async move { Some((tokio::time::timeout(limit, handshake).await.ok()?.ok()?, peer)) }
    }))
}

impl<Io, Addr> axum::serve::Listener for Admitted<Io, Addr>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Addr: Clone + Send + 'static,
{
    type Io = Io;
    type Addr = Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local.clone())
    }
}

/// Serves `router` on `listener` as `axum::serve` does (HTTP/1.1, WebSocket upgrades, each
/// connection's `info(addr)` as the `ConnectInfo` handlers extract), plus what axum::serve lacks:
/// each request head must arrive within `head_timeout`, counted from when the connection opens
/// or last finished a response, so a connection that sends no request, or sends its head a line
/// at a time (slowloris), is closed then. Without it such connections are kept for as long as
/// the client likes, each holding a descriptor, and enough of them exhaust the process's
/// descriptors (the proxy's tunnels included). At most `limit` connections are served at once
/// (an upgraded one leaves the count: it is the handler's, with limits of its own); for one
/// more, the longest waiting is closed, or once it has answered the request in hand
/// (`Waiting`). At `shutdown` it stops accepting, lets requests in flight finish and closes
/// idle connections.
pub async fn serve<L, C>(
    mut listener: L,
    router: axum::Router,
    head_timeout: Duration,
    limit: Waiting,
    info: impl Fn(L::Addr) -> C,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
    C: Clone + Send + Sync + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(head_timeout);
    let connections = tokio_util::task::TaskTracker::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let mut place = limit.enter();
        let (router, connect_info) = (router.clone(), axum::extract::ConnectInfo(info(addr)));
        // From a request's head until its answer's body is sent: a connection told to close to
        // make room finishes that first.
        let busy = Arc::new(AtomicBool::new(false));
        let service = hyper::service::service_fn({
            let busy = busy.clone();
            move |request: hyper::Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(connect_info.clone());
                busy.store(true, Ordering::Relaxed);
                let (answer, busy) = (router.clone().oneshot(request), Busy(Some(busy.clone())));
                async move { answer.await.map(|response| busy.until_sent(response)) }
            }
        });
        let conn = http.serve_connection(TokioIo::new(io), service).with_upgrades();
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
                () = place.told_to_close() => {
                    if !busy.load(Ordering::Relaxed) {
                        return; // waiting for a request head: closed as it is dropped
                    }
                    conn.as_mut().graceful_shutdown();
                }
            }
            let _ = conn.await;
            drop(place);
        });
    }
    let _ = stop.send(true);
    connections.close();
    connections.wait().await;
}

/// Marks a connection busy until the body of its answer has been sent (or dropped).
struct Busy(Option<Arc<AtomicBool>>);

impl Busy {
    fn until_sent(mut self, response: axum::response::Response) -> axum::response::Response {
        use http_body_util::BodyExt;
        if response.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
            // Busy for good: the connection is the handler's once upgraded.
            self.0 = None;
            return response;
        }
        response.map(|body| axum::body::Body::new(body.map_frame(move |frame| {
            let _ = &self;
            frame
        })))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(busy) = &self.0 {
            busy.store(false, Ordering::Relaxed);
        }
    }
}

/// Waits out a server's shutdown delay, saying so (`serving`: what goes on meanwhile). After the
/// stop signal a server stays reachable, not ready, until Services and load balancers have
/// stopped sending it new connections, which must not be refused.
pub async fn sleep_shutdown_delay(delay: Duration, serving: &str) {
    if !delay.is_zero() {
        tracing::info!(?delay, "stopping: not ready, {serving} for its shutdown delay");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ipv6_wildcard_falls_back_and_only_for_a_missing_ipv6() {
        let any6: SocketAddr = "[::]:3128".parse().unwrap();
        let no_family = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        let no_address = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(without_ipv6(any6, &no_family) && without_ipv6(any6, &no_address));
        assert!(!without_ipv6(any6, &io::Error::from_raw_os_error(libc::EADDRINUSE)), "a port in use is reported, not hidden");
        assert!(!without_ipv6("[::1]:3128".parse().unwrap(), &no_address), "a specific address is what was asked for");
        assert!(!without_ipv6("0.0.0.0:3128".parse().unwrap(), &no_family));
    }

    #[tokio::test]
    async fn the_ipv6_wildcard_accepts_ipv4_and_ipv6_clients() {
        let listener = bind("[::]:0", "test").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for client in ["127.0.0.1", "::1"] {
            let connect = TcpStream::connect((client, port));
            let (accepted, connected) = tokio::join!(listener.accept(), connect);
            connected.unwrap_or_else(|e| panic!("{client}: {e}"));
            let peer = accepted.unwrap().1.ip();
            assert_eq!(crate::proxy::allow::canonical(peer).to_string(), client, "{client} arrives as {peer}");
        }
    }

    #[test]
    fn a_full_waiting_queue_closes_the_longest_waiting_connections_not_the_newcomer() {
        use futures::FutureExt;
        let told = |p: &mut WaitingPlace| p.told_to_close().now_or_never().is_some();
        let metrics = WaitingMetrics::default();
        let (closed, count) = (metrics.closed.clone(), metrics.open.clone());
        let waiting = Waiting::new(2, metrics);
        let (mut a, mut b) = (waiting.enter(), waiting.enter());
        assert!(!told(&mut a) && !told(&mut b), "room for both");
        let mut c = waiting.enter();
        assert!(told(&mut a), "the longest waiting makes room");
        assert!(!told(&mut b) && !told(&mut c));
        assert_eq!((count.get(), closed.get()), (2, 1));
        drop((a, b));
        let mut d = waiting.enter();
        assert!(!told(&mut c) && !told(&mut d), "a place given back is room enough");
        waiting.set_limit(1);
        let mut e = waiting.enter();
        assert!(told(&mut c) && told(&mut d), "a lowered limit: as many close as it takes");
        assert!(!told(&mut e));
        assert_eq!((count.get(), closed.get()), (1, 3));
        drop((c, d, e));
        assert_eq!(count.get(), 0, "every place was given back");
        waiting.set_limit(0);
        assert_eq!(waiting.limit(), 1, "at least one place");
    }

    #[test]
    fn a_lower_limit_turns_new_takers_away_and_keeps_the_places_held() {
        let places = Places::new(2);
        let (a, b) = (places.take().unwrap(), places.take().unwrap());
        assert!(places.take().is_none(), "at the limit");
        places.set_limit(3);
        let c = places.take().expect("a raised limit has room at once");
        places.set_limit(1);
        assert_eq!(places.taken(), 3, "nothing held is taken back");
        drop(a);
        assert!(places.take().is_none(), "two held, limit 1");
        drop((b, c));
        let d = places.take().expect("room once enough were given back");
        assert!(places.take().is_none());
        drop(d);
        assert_eq!(places.taken(), 0);
        places.set_limit(0);
        assert_eq!(places.limit(), 1, "at least one place");
    }
}
