//! The browser path, like OpenStack's spicehtml5proxy but stateless: serves the spice-html5
//! client pages and bridges each WebSocket (one per SPICE channel, subprotocol `binary`) to
//! the hypervisor the token names. The token is the same signed, target-bound, expiring
//! ticket as the CONNECT path (`?token=` or the `token` cookie spice_auto.html sets), checked
//! by any replica with the shared key, never logged.
//!
//! Refusals happen before the upgrade, as HTTP answers with a one-line body: 400 not a
//! WebSocket handshake, 401 missing/forged/expired token, 403 foreign Origin (cross-site
//! WebSocket hijacking, CVE-2015-0259) or a target off the allow-list, 429 (`Retry-After`) a
//! client locked out after too many forged tokens (`throttle`), 502/504 upstream, 503 full.
//! The page server never redirects (websockify's `//host` open redirect, CVE-2021-3654).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::metrics::End;
use super::tunnel::{Close, Outside as _};
use crate::http_answer;
use crate::listener::{self, Admitted};
use super::proxy_protocol::{self, Origin};
use super::server::{Audit, ClientSlot, FromOutside, Shared, Tracker};
#[allow(unused_imports)]
use std::sync::atomic::Ordering as _;
use super::ticket;

/// Largest WebSocket message or frame accepted from a browser. spice-html5 sends small
/// messages (input events, acks); anything this big is not a SPICE client.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most bytes read from the hypervisor into one frame for the browser. The buffer exists only
/// while data is in flight, so an idle console costs nothing here.
const READ_CHUNK: usize = 256 * 1024;
/// Room in front of the hypervisor's bytes for the frame header (at most 2 bytes and a 64-bit
/// length), so a frame goes to the browser from the buffer it was read into.
const HEADROOM: usize = 10;
/// The WebSocket layer's read buffer (browser → hypervisor: input events, acks; it grows for a
/// bigger message). tungstenite zero-fills its whole read buffer, so its size is resident
/// memory per connection: 128 KiB by default.
const WS_READ_BUFFER: usize = 4 * 1024;

struct Bridge {
    shared: Arc<Shared>,
    tracker: Tracker,
    cancel: tokio::sync::watch::Receiver<bool>,
    static_dir: PathBuf,
    /// "https" when the browser side is TLS: the only scheme a same-origin page can have.
    scheme: &'static str,
}

/// Serves pages and WebSockets on `listener` until `shutdown` resolves; bridges run as
/// tracked tasks so the proxy's drain waits for them too.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tracker: Tracker,
    cancel: tokio::sync::watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let html5 = shared.cfg.html5.clone().expect("serve is only called with html5 configured");
    let scheme = if html5.tls.is_some() { "https" } else { "http" };
    let bridge = Arc::new(Bridge { shared, tracker, cancel, static_dir: html5.static_dir.into(), scheme });
    let app = axum::Router::new().fallback(handle).with_state(bridge.clone());
    // A page request or WebSocket handshake within the same time as a CONNECT request head.
    let head_timeout = bridge.shared.limits().handshake_timeout();
    let proxy_protocol = bridge.shared.cfg.proxy_protocol.is_some();
    let local = PeerAddr { client: listener.local_addr()?, via: None };
    // Page requests and WebSocket handshakes at once: as many as there are tunnel places (the
    // open-files limit counts a descriptor for each); a bridge, once upgraded, is a tunnel instead.
    let limit = bridge.shared.html5_connections.clone();
    match (&html5.tls, proxy_protocol) {
        (None, false) => listener::serve(listener, app, head_timeout, limit, PeerAddr::direct, shutdown).await,
        (None, pp) => {
            let admitted = Admitted::spawn(listener, local, limit.clone(), admit(bridge.shared.clone(), pp, true, |tcp| async move { Ok(tcp) }));
            listener::serve(admitted, app, head_timeout, limit, |from| from, shutdown).await
        }
        (Some(_), pp) => {
            let cert = bridge.shared.html5_cert.as_ref().expect("loaded when the proxy started");
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config().map_err(std::io::Error::other)?);
            let admitted = Admitted::spawn(listener, local, limit.clone(), admit(bridge.shared.clone(), pp, false, move |tcp| acceptor.accept(tcp)));
            listener::serve(admitted, app, head_timeout, limit, |from| from, shutdown).await
        }
    }
    Ok(())
}

/// Where a browser connection comes from: the client, and with the PROXY protocol the load
/// balancer that passed it on (`client` is then the address the balancer named). Both
/// canonical (an IPv4 client on the `[::]` listener as IPv4), as audit lines and limits need.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr {
    pub client: SocketAddr,
    pub via: Option<SocketAddr>,
}

impl PeerAddr {
    /// A connection straight from the client.
    fn direct(peer: SocketAddr) -> Self {
        PeerAddr { client: super::allow::canonical_addr(peer), via: None }
    }
}

/// How the browser port admits a connection, within the handshake timeout: the PROXY protocol
/// header when configured, then `handshake` (TLS, or nothing). `plain`: refusals are answered
/// in HTTP (without TLS a browser can read them).
fn admit<Io, H, Fut>(
    shared: Arc<Shared>,
    proxy_protocol: bool,
    plain: bool,
    handshake: H,
) -> impl Fn(TcpStream, SocketAddr) -> BoxFuture<'static, Option<(Io, PeerAddr)>> + Send + Sync + 'static
where
    Io: Send + 'static,
    H: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<Io>> + Send + 'static,
{
    let limit = shared.limits().handshake_timeout();
    let handshake = Arc::new(handshake);
    move |mut stream, peer| {
        let (shared, handshake) = (shared.clone(), handshake.clone());
        Box::pin(async move {
            let started = Instant::now();
            let from = match proxy_protocol {
                false => PeerAddr::direct(peer),
                true => {
                    let read = tokio::time::timeout(limit, proxy_header(&mut stream, &shared, peer))
                        .await
                        .unwrap_or_else(|_| Err((StatusCode::REQUEST_TIMEOUT, format!("PROXY protocol header not received within {limit:?}"))));
                    match read {
                        Ok(from) => from,
                        Err((status, body)) => {
                            let audit = Audit { event: "websocket", client: Some(PeerAddr::direct(peer).client), ..Default::default() };
                            drop(log_refusal(&shared, audit, started, status, body.clone()));
                            if plain {
                                let refusal = http_answer::refuse(status.as_u16(), body);
                                let _ = stream.write_all(&http_answer::response(http_answer::Version::Http11, &refusal)).await;
                            }
                            return None;
                        }
                    }
                }
            };
            // A browser that cannot finish the TLS handshake sees only a failed connection: the
            // audit line is where an operator finds out why (an old client, a probe, a stall).
            let (outcome, close) = match tokio::time::timeout(limit.saturating_sub(started.elapsed()), handshake(stream)).await {
                Ok(Ok(io)) => return Some((io, from)),
                // A probe, or a browser's spare connection closed unused.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => ("no_request", format!("closed before the TLS handshake finished: {e}")),
                Ok(Err(e)) => ("tls_failed", format!("TLS handshake failed: {e}")),
                Err(_) => ("408", format!("TLS handshake not finished within {limit:?}")),
            };
            shared.metrics.tunnels.get_or_create(&super::metrics::Outcome { outcome }).inc();
            let audit = Audit { event: "websocket", client: Some(from.client), via: from.via, outcome, close, duration_ms: started.elapsed().as_millis() as u64, ..Default::default() };
            audit.emit();
            None
        })
    }
}

/// Reads a PROXY protocol header from a trusted balancer without reading past it (it peeks
/// first): what follows is the browser's own, HTTP or TLS.
async fn proxy_header(stream: &mut TcpStream, shared: &Shared, peer: SocketAddr) -> Result<PeerAddr, (StatusCode, String)> {
    let peer_ip = super::allow::canonical(peer.ip());
    if !shared.trusts_balancer(peer_ip) {
        return Err((StatusCode::FORBIDDEN, format!("{peer_ip} is not a load balancer of this proxy: connections come through one (PROXY protocol)")));
    }
    let io = |e: std::io::Error| (StatusCode::BAD_REQUEST, format!("reading the PROXY protocol header: {e}"));
    let mut buf = vec![0u8; proxy_protocol::MAX_HEADER];
    loop {
        let n = stream.peek(&mut buf).await.map_err(io)?;
        if n == 0 {
            return Err((StatusCode::BAD_REQUEST, "closed before a PROXY protocol header".into()));
        }
        match proxy_protocol::parse(&buf[..n]) {
            Ok(Some((origin, len))) => {
                stream.read_exact(&mut buf[..len]).await.map_err(io)?;
                return Ok(match origin {
                    Origin::Client(a) => PeerAddr { client: super::allow::canonical_addr(a), via: Some(SocketAddr::new(peer_ip, peer.port())) },
                    Origin::Itself => PeerAddr::direct(peer),
                });
            }
            // Part of it so far: a peek returns at once while anything is queued, so wait a
            // little for the rest (balancers send it whole; the caller's timeout bounds this).
            Ok(None) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err((StatusCode::BAD_REQUEST, e.to_string())),
        }
    }
}

fn refuse(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body = body.into();
    body.push('\n');
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn handle(
    State(bridge): State<Arc<Bridge>>,
    ConnectInfo(PeerAddr { client: peer, via }): ConnectInfo<PeerAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    mut request: Request,
) -> Response {
    let wants_upgrade = headers.get(header::UPGRADE).is_some() || uri.path() == "/websockify";
    if !wants_upgrade {
        return page(&bridge.static_dir, &method, uri.path(), &bridge.shared.frame_ancestors()).await;
    }
    let accept = match accept_key(&method, request.version(), &headers) {
        Ok(a) => a,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, format!("not a WebSocket handshake: {why}")),
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(StatusCode::BAD_REQUEST, "not a WebSocket handshake: this connection cannot be upgraded");
    };
    let started = Instant::now();
    let peer_ip = peer.ip();
    let mut audit = Audit { event: "websocket", client: Some(peer), via, ..Default::default() };
    if let Err(why) = bridge.shared.check_origin(&headers, bridge.scheme) {
        return log_refusal(&bridge.shared, audit, started, StatusCode::FORBIDDEN, why);
    }
    let Some(token) = token(&uri, &headers) else {
        return log_refusal(&bridge.shared, audit, started, StatusCode::UNAUTHORIZED, "no token: open the console URL with ?token=<ticket>".into());
    };
    if let Some(r) = bridge.shared.auth_lockout(peer_ip) {
        let mut response = log_refusal(&bridge.shared, audit, started, StatusCode::TOO_MANY_REQUESTS, r.body);
        if let Some(secs) = r.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }
    let keys = bridge.shared.ticket_keys();
    let claims = match ticket::verify(&keys, &token, ticket::now()) {
        Ok(c) => c,
        Err(ticket::TicketError::Expired) => return log_refusal(&bridge.shared, audit, started, StatusCode::UNAUTHORIZED, "token expired: ask for a new console".into()),
        Err(e) => {
            if e != ticket::TicketError::NoKey {
                bridge.shared.auth_failed(peer_ip); // a forged or mangled token: a guess
            }
            return log_refusal(&bridge.shared, audit, started, StatusCode::UNAUTHORIZED, format!("invalid token: {e}"));
        }
    };
    // Engines mint [port, tls-port]: the plain port first, the TLS port last.
    let port = if bridge.shared.hypervisor_tls.is_some() { claims.ports.last() } else { claims.ports.first() };
    let Some(&port) = port else {
        return log_refusal(&bridge.shared, audit, started, StatusCode::UNAUTHORIZED, "the token names no port".into());
    };
    audit.target = Some(super::head::authority(&claims.host, port));
    audit.subject = Some(claims.subject.clone());
    let Some(permit) = bridge.shared.tunnels.take() else {
        return log_refusal(&bridge.shared, audit, started, StatusCode::SERVICE_UNAVAILABLE, super::server::AT_TUNNEL_LIMIT.into());
    };
    let Some(slot) = ClientSlot::take_owned(&bridge.shared, peer_ip) else {
        return log_refusal(&bridge.shared, audit, started, StatusCode::SERVICE_UNAVAILABLE, super::server::too_many_from(peer_ip));
    };
    let addrs = match bridge.shared.allowed_addresses(&claims.host, port).await {
        Ok(a) => a,
        Err(r) => return log_refusal(&bridge.shared, audit, started, StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN), r.body),
    };
    let (upstream, addr) = match bridge.shared.connect(&addrs).await {
        Ok(c) => c,
        Err(r) => return log_refusal(&bridge.shared, audit, started, StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY), r.body),
    };
    audit.upstream = Some(addr);
    let upstream = match &bridge.shared.hypervisor_tls {
        None => Upstream::Plain(upstream),
        Some(hypervisor_tls) => {
            // The CA as read last: a rotated one applies to the next console opened.
            let connector = tokio_rustls::TlsConnector::from(hypervisor_tls.current().config.clone());
            let name = match rustls::pki_types::ServerName::try_from(claims.host.clone()) {
                Ok(n) => n,
                Err(_) => return log_refusal(&bridge.shared, audit, started, StatusCode::BAD_GATEWAY, format!("{} is not a name TLS can check", claims.host)),
            };
            // A tls-port that accepts and never answers holds a tunnel slot only this long.
            let limit = bridge.shared.limits().connect_timeout();
            match tokio::time::timeout(limit, connector.connect(name, upstream)).await {
                Ok(Ok(tls)) => Upstream::Tls(Box::new(tls)),
                Ok(Err(e)) => return log_refusal(&bridge.shared, audit, started, StatusCode::BAD_GATEWAY, format!("TLS to the hypervisor failed: {e}")),
                Err(_) => return log_refusal(&bridge.shared, audit, started, StatusCode::GATEWAY_TIMEOUT, format!("TLS handshake with the hypervisor {addr} timed out after {limit:?}")),
            }
        }
    };
    bridge.shared.metrics.handshake.observe(started.elapsed().as_secs_f64());
    let b = bridge.clone();
    bridge.tracker.spawn(async move {
        let _held = (permit, slot);
        // Resolves once the 101 below is written; fails if the browser went away before.
        let Ok(upgraded) = on_upgrade.await else { return };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE))
            .read_buffer_size(WS_READ_BUFFER)
            .write_buffer_size(0);
        let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        run(&b, socket, upstream, audit, started).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64 is a header value"));
    if offers_binary(&headers) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("binary"));
    }
    response
}

/// The `Sec-WebSocket-Accept` answer to an upgrade request, or why the request is not a
/// WebSocket handshake (RFC 6455 4.2.1): a GET over HTTP/1.1 with `Connection: upgrade`,
/// `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a key.
fn accept_key(method: &Method, version: Version, headers: &HeaderMap) -> Result<String, String> {
    if method != Method::GET {
        return Err(format!("the method must be GET, not {method}"));
    }
    if version != Version::HTTP_11 {
        return Err(format!("the request must be HTTP/1.1, not {version:?}"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the Connection header does not include upgrade".into());
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("the Upgrade header is not websocket".into());
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return Err("Sec-WebSocket-Version must be 13".into());
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or("the Sec-WebSocket-Key header is missing")?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// spice-html5 asks for the `binary` subprotocol (websockify's name for raw bytes); it is
/// answered only when asked for, as a browser refuses a subprotocol it did not offer.
fn offers_binary(headers: &HeaderMap) -> bool {
    has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, "binary")
}

fn log_refusal(shared: &Shared, mut audit: Audit, started: Instant, status: StatusCode, body: String) -> Response {
    let label = super::server::status_label(status.as_u16());
    shared.metrics.tunnels.get_or_create(&super::metrics::Outcome { outcome: label }).inc();
    audit.outcome = label;
    audit.close = format!("{} {body}", status.as_u16());
    audit.duration_ms = started.elapsed().as_millis() as u64;
    audit.emit();
    refuse(status, body)
}

/// The token from `?token=` or the `token` cookie (what spice_auto.html sets).
fn token(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let from_query = uri.query().into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("token=")).map(str::to_string);
    let from_cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix("token=").map(str::to_string))
    };
    from_query.or_else(from_cookie).filter(|t| !t.is_empty())
}

/// An origin as `html5.allowedOrigins` lists it (`https://portal.example.com`, `http://10.0.0.5:8080`,
/// `https://[2001:db8::1]:8443`; a trailing `/` is allowed), normalised to lower case without the
/// slash; or why it is not one. Strict, since it also goes into a `Content-Security-Policy`
/// header, where a `;` or a space would add directives or sources.
pub fn origin(text: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("{text:?} is not an origin such as https://portal.example.com: {why}"));
    let lower = text.trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, authority)) = lower.split_once("://") else { return bad("no scheme") };
    if scheme != "http" && scheme != "https" {
        return bad("the scheme must be http or https");
    }
    let port = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((addr, rest)) = v6.split_once(']') else { return bad("no ']' after the IPv6 address") };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return bad("not an IPv6 address between the brackets");
            }
            match rest.strip_prefix(':') {
                Some(port) => Some(port),
                None if rest.is_empty() => None,
                None => return bad("no path: only scheme, host and port"),
            }
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
            if host.is_empty() || host.starts_with(['.', '-']) || !host.chars().all(name_char) {
                return bad("the host may hold letters, digits, '-' and '.' only, and no path");
            }
            port
        }
    };
    let port_ok = |port: &str| port.bytes().all(|b| b.is_ascii_digit()) && !port.starts_with('0') && port.parse::<u16>().is_ok_and(|p| p > 0);
    if port.is_some_and(|port| !port_ok(port)) {
        return bad("the port must be 1-65535");
    }
    // A browser leaves the scheme's default port out of Origin, so a listed
    // https://portal.example.com:443 must compare equal to the https://portal.example.com it sends.
    let default_port = if scheme == "http" { "80" } else { "443" };
    if port == Some(default_port) {
        return Ok(lower[..lower.len() - default_port.len() - 1].to_string());
    }
    Ok(lower)
}

/// The pages' `Content-Security-Policy` when no origin is listed.
const FRAMED_BY_NONE: &str = "frame-ancestors 'none'";

/// The `Content-Security-Policy` of the console's pages: which pages may show them in a frame.
/// None but the allowed origins (a portal embedding the console, as Horizon embeds nova's),
/// so no other site can frame the console and trick its user into clicks (clickjacking).
pub fn frame_ancestors(allowed: &[String]) -> String {
    let listed: Vec<String> = allowed.iter().filter_map(|o| origin(o).ok()).collect();
    if listed.is_empty() { FRAMED_BY_NONE.into() } else { format!("frame-ancestors {}", listed.join(" ")) }
}

/// A browser always sends Origin on a WebSocket handshake: it must be this very page's
/// origin (same scheme and host:port) or one the SpiceProxy lists. Clients that are not
/// browsers send none and cannot be hijacked cross-site; the token still decides for them.
pub fn check_origin(headers: &HeaderMap, scheme: &str, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().map_err(|_| "Origin header is not text".to_string())?.trim_end_matches('/').to_ascii_lowercase();
    // Both sides in the form `origin()` gives (lower case, no default port); the list was
    // checked with it when it was read, so an entry it refuses is one that matches nothing.
    let sent = self::origin(&origin).unwrap_or_else(|_| origin.clone());
    if allowed.iter().filter_map(|a| self::origin(a).ok()).any(|a| a == sent) {
        return Ok(());
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    // Same host and port is not enough: an http:// page may not use a wss:// console, nor the
    // reverse. In the same form as the Origin: a Host that names the default port (`:443`, as
    // some balancers pass it on) is still this console's own origin.
    let own = format!("{scheme}://{host}");
    if !host.is_empty() && sent == self::origin(&own).unwrap_or(own) {
        return Ok(());
    }
    Err(format!("cross-origin WebSocket refused: Origin {origin} is not this console's origin {scheme}://{host} nor an allowed origin"))
}

/// The spice-html5 pages: `/` and `/spice_auto.html` are the console; other files by exact
/// name. Path segments are plain names only, so nothing escapes the directory and nothing
/// redirects.
/// `frame_ancestors`: their `Content-Security-Policy` (see `frame_ancestors`).
async fn page(dir: &Path, method: &Method, path: &str, frame_ancestors: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let rel = if path == "/" { "/spice_auto.html" } else { path };
    let segments: Vec<&str> = rel.strip_prefix('/').unwrap_or("").split('/').collect();
    let plain = |s: &&str| !s.is_empty() && !s.starts_with('.') && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if segments.len() > 4 || !segments.iter().all(plain) {
        return refuse(StatusCode::NOT_FOUND, "not found");
    }
    let file = segments.iter().fold(dir.to_path_buf(), |p, s| p.join(s));
    let Ok(bytes) = tokio::fs::read(&file).await else { return refuse(StatusCode::NOT_FOUND, "not found") };
    let bytes = super::client_mend::mend(rel, bytes);
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let ctype = match ext {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    };
    let mut r = Response::new(if method == Method::HEAD { Body::empty() } else { Body::from(bytes) });
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // The console URL carries the token: never send it on as a Referer, never cache the page.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Browsers without CSP's frame-ancestors know only "framed by nobody".
    if frame_ancestors == FRAMED_BY_NONE {
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    }
    if let Ok(csp) = HeaderValue::from_str(frame_ancestors) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    r
}

/// Bytes from the hypervisor behind room for their frame header: what the browser gets as one
/// binary frame, written from this buffer. (tungstenite would copy each payload into its write
/// buffer first: a fifth of the bridge's CPU time at one stream.)
struct Chunk(BytesMut);

impl Chunk {
    fn new(capacity: usize) -> Chunk {
        let mut buf = BytesMut::with_capacity(HEADROOM + capacity);
        buf.put_bytes(0, HEADROOM);
        Chunk(buf)
    }

    fn payload_len(&self) -> usize {
        self.0.len() - HEADROOM
    }

    /// The frame: an unmasked, final binary frame header (RFC 6455 5.2) and the payload.
    fn framed(&mut self) -> &[u8] {
        let (header, used) = frame_header(self.payload_len());
        let start = HEADROOM - used;
        self.0[start..HEADROOM].copy_from_slice(&header[..used]);
        &self.0[start..]
    }
}

/// The header of a final binary frame from a server (never masked) carrying `len` bytes,
/// and how many of its bytes are used: 2, 4 or 10.
fn frame_header(len: usize) -> ([u8; HEADROOM], usize) {
    let mut header = [0u8; HEADROOM];
    header[0] = 0x82; // FIN, opcode 2 (binary)
    let used = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, used)
}

/// Waits for the hypervisor to send, then reads what is there into a fresh buffer. None at EOF.
async fn read_chunk(up: &tokio::net::tcp::OwnedReadHalf) -> std::io::Result<Option<Chunk>> {
    loop {
        up.readable().await?;
        let mut chunk = Chunk::new(READ_CHUNK);
        match up.try_read_buf(&mut chunk.0) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(chunk)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The hypervisor connection: plain TCP, or TLS to its tls-port.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

enum UpReader {
    Plain(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpReader {
    async fn read_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        match self {
            UpReader::Plain(r) => read_chunk(r).await,
            UpReader::Tls(r) => {
                let mut chunk = Chunk::new(64 * 1024);
                match r.read_buf(&mut chunk.0).await? {
                    0 => Ok(None),
                    _ => Ok(Some(chunk)),
                }
            }
        }
    }
}

/// The browser's WebSocket, on the connection hyper hands over after the 101.
type BrowserSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Moves bytes both ways until either side closes, the idle timeout passes, or the drain
/// deadline cancels the bridge. Closing is propagated: a WebSocket Close shuts the upstream's
/// write side; upstream EOF sends Close 1000.
async fn run(bridge: &Bridge, mut ws: BrowserSocket, upstream: Upstream, mut audit: Audit, started: Instant) {
    let shared = &bridge.shared;
    shared.metrics.active.inc();
    let (mut up_r, mut up_w): (UpReader, Box<dyn tokio::io::AsyncWrite + Send + Unpin>) = match upstream {
        Upstream::Plain(s) => {
            let (r, w) = s.into_split();
            (UpReader::Plain(r), Box::new(w))
        }
        Upstream::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            (UpReader::Tls(r), Box::new(w))
        }
    };
    let (mut bytes_up, mut bytes_down) = (0u64, 0u64);
    let mut cancel = bridge.cancel.clone();
    let mut outside = FromOutside { cancel: &mut cancel, shared, target: audit.upstream };
    let mut ended_from_outside = outside.ends();
    let mut idle = outside.timeouts().idle;
    // When a message last went either way: the idle timeout counts from there, also when a
    // changed configuration file changes it.
    let mut last = tokio::time::Instant::now();
    // A frame to the browser cut short (it stopped reading, or went): nothing more may follow.
    let mut torn = false;
    let (end, close) = loop {
        if let Some(why) = ended_from_outside.take() {
            // The audit line says what the tunnel's would; the browser gets a Close code.
            let (code, reason, end, close) = match why {
                Close::Revoked => (CloseCode::Policy, "target no longer allowed", End::Revoked, "target taken off the allow-list"),
                _ => (CloseCode::Away, "proxy shutting down", End::Drained, "drain deadline"),
            };
            let _ = ws.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
            break (end, close);
        }
        let quiet_until = last + idle;
        tokio::select! {
            msg = tokio::time::timeout_at(quiet_until, ws.next()) => match msg {
                Err(_) => break (End::Idle, "idle timeout"),
                Ok(None) => break (End::Error, "client gone"),
                Ok(Some(Err(e))) => {
                    // Say why before hanging up: 1009 for an oversized message, 1002 otherwise.
                    let too_big = matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_));
                    let (code, reason) = if too_big { (CloseCode::Size, "message too big") } else { (CloseCode::Protocol, "protocol error") };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Close(Some(CloseFrame { code, reason: reason.into() })))).await;
                    break (End::Error, reason);
                }
                Ok(Some(Ok(Message::Binary(data)))) => {
                    bytes_up += data.len() as u64;
                    if up_w.write_all(&data).await.is_err() {
                        break (End::Error, "upstream write failed");
                    }
                }
                Ok(Some(Ok(Message::Text(_)))) => {
                    let _ = ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Unsupported, reason: "SPICE over WebSocket is binary".into() }))).await;
                    break (End::Error, "text frame");
                }
                Ok(Some(Ok(Message::Close(_)))) => {
                    // The hypervisor sees EOF. RFC 6455: after a Close nothing more may be
                    // sent to the browser (the WebSocket layer answers the Close itself).
                    let _ = up_w.shutdown().await;
                    break (End::Finished, "client closed");
                }
                Ok(Some(Ok(_))) => {} // ping/pong: answered by the WebSocket layer
            },
            read = tokio::time::timeout_at(quiet_until, up_r.read_chunk()) => match read {
                Err(_) => break (End::Idle, "idle timeout"),
                Ok(Err(_)) | Ok(Ok(None)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "upstream closed".into() })))).await;
                    break (End::Finished, "upstream closed");
                }
                Ok(Ok(Some(mut chunk))) => {
                    bytes_down += chunk.payload_len() as u64;
                    // A browser that stops reading stalls this send, and so the reads from
                    // the hypervisor: nothing piles up here. Past the idle timeout it is gone.
                    // A control frame the WebSocket layer could not finish (a pong) goes first.
                    let sent = tokio::time::timeout(idle, async {
                        ws.flush().await.map_err(std::io::Error::other)?;
                        let browser = ws.get_mut();
                        browser.write_all(chunk.framed()).await?;
                        // With TLS to the browser the last records may wait in the session.
                        browser.flush().await
                    });
                    match sent.await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            torn = true;
                            break (End::Error, "client gone");
                        }
                        Err(_) => {
                            torn = true;
                            break (End::Error, "client stopped reading");
                        }
                    }
                }
            },
            // Nothing moved: `last` stays, and the idle timeout is read anew.
            changed = outside.changed() => {
                ended_from_outside = changed;
                idle = outside.timeouts().idle;
                continue;
            }
        }
        last = tokio::time::Instant::now();
    };
    // Lets the WebSocket layer send its answer to a client's Close before the socket drops.
    if !torn {
        // (The sink's close, which flushes that answer; `WebSocketStream::close` sends a Close
        // and fails once the browser's has arrived.)
        let _ = tokio::time::timeout(Duration::from_secs(2), SinkExt::close(&mut ws)).await;
    }
    // Counted before the active gauge drops, so a bridge no longer active has its end counted.
    shared.metrics.ended(end);
    shared.metrics.active.dec();
    shared.metrics.bytes_up.inc_by(bytes_up);
    shared.metrics.bytes_down.inc_by(bytes_down);
    shared.metrics.tunnels_ok.inc();
    audit.bytes_up = Some(bytes_up);
    audit.bytes_down = Some(bytes_down);
    audit.outcome = "ok";
    audit.close = close.to_string();
    audit.duration_ms = started.elapsed().as_millis() as u64;
    audit.emit();
}


#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::WebSocket;

    #[test]
    fn an_allowed_origin_is_scheme_host_and_port_only() {
        for (given, normalised) in [
            ("https://portal.example.com", "https://portal.example.com"),
            ("HTTPS://Portal.Example.com:8443/", "https://portal.example.com:8443"),
            ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
            ("https://[2001:DB8::1]:8443", "https://[2001:db8::1]:8443"),
            ("http://[::1]", "http://[::1]"),
            // The scheme's default port is what a browser leaves out of Origin.
            ("https://portal.example.com:443", "https://portal.example.com"),
            ("HTTP://10.0.0.5:80/", "http://10.0.0.5"),
            ("https://[::1]:443", "https://[::1]"),
            ("http://portal.example.com:443", "http://portal.example.com:443"),
            ("https://portal.example.com:80", "https://portal.example.com:80"),
        ] {
            assert_eq!(origin(given).as_deref(), Ok(normalised), "{given}");
        }
        for bad in [
            "portal.example.com",
            "ftp://portal.example.com",
            "https://",
            "https://portal.example.com/app",
            "https://portal.example.com; script-src *",
            "https://a.example https://b.example",
            "https://*.example.com",
            "https://portal.example.com:0",
            "https://portal.example.com:65536",
            "https://portal.example.com:+80",
            "https://portal.example.com:",
            "https://[2001:db8::zz]",
            "https://[::1]x",
            "https://-portal.example.com",
        ] {
            let e = origin(bad).unwrap_err();
            assert!(e.contains("is not an origin such as https://portal.example.com: "), "{bad}: {e}");
        }
    }

    #[test]
    fn a_websocket_from_a_listed_origin_matches_however_the_list_spells_it() {
        let handshake = |origin: Option<&str>, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
            }
            h
        };
        let listed = ["HTTPS://Portal.Example.com:443/".to_string(), "http://10.0.0.5:8080".to_string()];
        for sent in ["https://portal.example.com", "http://10.0.0.5:8080"] {
            assert_eq!(check_origin(&handshake(Some(sent), "console:6082"), "http", &listed), Ok(()), "{sent}");
        }
        // Not a browser (no Origin), or the console's own page: the token decides.
        assert_eq!(check_origin(&handshake(None, "console:6082"), "http", &[]), Ok(()));
        assert_eq!(check_origin(&handshake(Some("http://console:6082"), "console:6082"), "http", &[]), Ok(()));
        // The console's own origin however Host spells the default port.
        assert_eq!(check_origin(&handshake(Some("https://console.example.com"), "console.example.com:443"), "https", &[]), Ok(()));
        assert_eq!(check_origin(&handshake(Some("https://console.example.com:443"), "console.example.com"), "https", &[]), Ok(()));
        assert!(check_origin(&handshake(Some("https://console.example.com"), "console.example.com:443"), "http", &[]).is_err(), "another scheme");
        for sent in ["http://portal.example.com", "https://portal.example.com:8443", "http://10.0.0.5", "https://console:6082", "null"] {
            let e = check_origin(&handshake(Some(sent), "console:6082"), "http", &listed).unwrap_err();
            assert!(e.starts_with("cross-origin WebSocket refused: Origin "), "{sent}: {e}");
        }
    }

    #[test]
    fn only_the_allowed_origins_may_frame_the_console() {
        assert_eq!(frame_ancestors(&[]), "frame-ancestors 'none'");
        let portals = ["https://Portal.example.com/".to_string(), "http://10.0.0.5:8080".to_string()];
        assert_eq!(frame_ancestors(&portals), "frame-ancestors https://portal.example.com http://10.0.0.5:8080");
    }

    #[tokio::test]
    async fn pages_say_who_may_frame_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("spice_auto.html"), "<html></html>").unwrap();
        let framed_by_none = page(dir.path(), &Method::GET, "/", &frame_ancestors(&[])).await;
        let h = framed_by_none.headers();
        assert_eq!((h["x-frame-options"].to_str().unwrap(), h[header::CONTENT_SECURITY_POLICY].to_str().unwrap()), ("DENY", "frame-ancestors 'none'"));
        let portal = page(dir.path(), &Method::GET, "/", &frame_ancestors(&["https://portal.example.com".into()])).await;
        let h = portal.headers();
        assert!(h.get("x-frame-options").is_none(), "X-Frame-Options has no allow-list: it would forbid the portal too");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], "frame-ancestors https://portal.example.com");
    }

    #[test]
    fn the_token_in_the_url_wins_over_a_cookie_left_by_another_console() {
        let uri = |u: &str| u.parse::<Uri>().unwrap();
        let mut cookies = HeaderMap::new();
        cookies.insert(header::COOKIE, HeaderValue::from_static("lang=en; token=v1.other-vm"));
        assert_eq!(token(&uri("/websockify?token=v1.this-vm"), &cookies).as_deref(), Some("v1.this-vm"));
        assert_eq!(token(&uri("/websockify?x=1&token=v1.this-vm"), &HeaderMap::new()).as_deref(), Some("v1.this-vm"));
        // Only the cookie (a page that does not put it in the URL), or nothing at all.
        assert_eq!(token(&uri("/websockify"), &cookies).as_deref(), Some("v1.other-vm"));
        assert_eq!(token(&uri("/websockify?token="), &HeaderMap::new()), None);
        assert_eq!(token(&uri("/websockify"), &HeaderMap::new()), None);
    }

    #[test]
    fn a_chunk_reaches_a_websocket_client_as_one_binary_message_of_its_bytes() {
        // Each length a header can have: 7 bits, 16 bits, 64 bits, and their edges.
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, READ_CHUNK] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut chunk = Chunk::new(len);
            chunk.0.extend_from_slice(&payload);
            assert_eq!(chunk.payload_len(), len);
            let wire = chunk.framed().to_vec();
            let mut client = WebSocket::from_raw_socket(std::io::Cursor::new(wire), Role::Client, None);
            match client.read() {
                Ok(Message::Binary(got)) => assert!(got[..] == payload[..], "{len} bytes: payload changed"),
                other => panic!("{len} bytes: {other:?}"),
            }
            // The whole frame was one message: nothing left over.
            assert!(client.read().is_err(), "{len} bytes: more than one frame");
        }
    }

    #[test]
    fn the_upgrade_is_answered_as_rfc_6455_says_and_anything_else_is_named() {
        let handshake = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, HeaderValue::from_static(value));
            }
            h
        };
        let good = [("connection", "keep-alive, Upgrade"), ("upgrade", "websocket"), ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")];
        // The worked example of RFC 6455 section 1.3.
        assert_eq!(accept_key(&Method::GET, Version::HTTP_11, &handshake(&good)).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let refused = |method: Method, version: Version, pairs: &[(&'static str, &'static str)]| accept_key(&method, version, &handshake(pairs)).unwrap_err();
        assert!(refused(Method::POST, Version::HTTP_11, &good).contains("GET"));
        assert!(refused(Method::GET, Version::HTTP_10, &good).contains("HTTP/1.1"));
        assert!(refused(Method::GET, Version::HTTP_11, &[good[1], good[2], good[3], ("connection", "keep-alive")]).contains("Connection"));
        assert!(refused(Method::GET, Version::HTTP_11, &[good[0], good[2], good[3], ("upgrade", "h2c")]).contains("Upgrade"));
        assert!(refused(Method::GET, Version::HTTP_11, &[good[0], good[1], good[3], ("sec-websocket-version", "8")]).contains("Sec-WebSocket-Version"));
        assert!(refused(Method::GET, Version::HTTP_11, &good[..3]).contains("Sec-WebSocket-Key"));
        // The subprotocol is named back only when the browser offered it.
        assert!(offers_binary(&handshake(&[("sec-websocket-protocol", "base64, binary")])));
        assert!(!offers_binary(&handshake(&[("sec-websocket-protocol", "base64")])));
        assert!(!offers_binary(&HeaderMap::new()));
    }
}
