//! The engine operations against the cluster: read the policy and the SpiceProxies it names,
//! resolve one VM, and issue a console (checked against the proxy's allow-list, with a ticket
//! signed by the proxy's own key). Shared by the HTTPS API and the CLI.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tokio::sync::watch;

use super::{ConsoleRequest, DEFAULT_TICKET_TTL, LookupError, VmResolution, proxy_with_ticket, resolve_vm, use_proxy, validate_request, vv_file};
use crate::controller::policy::{html5_url_of, ready_url_of};
use crate::controller::spice_proxy::{key_secret_name, proxy_config};
use crate::controller::without_failures;
use crate::metrics::Metrics;
use crate::crd::{AuthMode, ClusterConsolePolicy, SpiceProxy, SpiceProxyRef};
use crate::proxy::allow::AllowList;
use crate::proxy::ticket;

#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

impl EngineError {
    pub fn http_status(&self) -> u16 {
        match self {
            EngineError::BadRequest(_) => 400,
            EngineError::NotFound(_) => 404,
            EngineError::Unavailable(_) => 503,
            EngineError::Kube(kube::Error::Api(e)) if e.code == 403 => 502,
            EngineError::Kube(_) => 502,
        }
    }
}

impl From<LookupError> for EngineError {
    fn from(e: LookupError) -> Self {
        EngineError::NotFound(e.to_string())
    }
}

/// A resolved console request, before the ticket is minted (the API authorises in between).
pub struct Prepared {
    pub request: ConsoleRequest,
    pub resolution: VmResolution,
    /// Set when the console goes through a SpiceProxy that wants a ticket.
    pub ticket_for: Option<(SpiceProxyRef, Vec<u8>)>,
    /// The `proxy=` value when no ticket is needed (literal URL, or auth mode None).
    pub plain_proxy: Option<String>,
    /// The SpiceProxy's browser bridge can reach this console: it connects to the plain port,
    /// or to the tls-port when it speaks TLS to hypervisors.
    pub html5_reachable: bool,
}

/// What the engine hands the user.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Console {
    pub vv: String,
    pub html5_url: Option<String>,
    pub resolution: VmResolution,
    /// Unix time the ticket stops opening new sessions; null without a ticket.
    pub ticket_expires: Option<u64>,
}

/// The SpiceProxies a request may look at: the watch cache (the API), or those the policy
/// names, fetched one GET apiece (the CLI).
enum ProxySource<'a> {
    Cached(&'a Store<DeserializeGuard<SpiceProxy>>),
    Fetched(HashMap<SpiceProxyRef, Arc<DeserializeGuard<SpiceProxy>>>),
}

impl ProxySource<'_> {
    fn get(&self, r: &SpiceProxyRef) -> Option<Arc<DeserializeGuard<SpiceProxy>>> {
        match self {
            ProxySource::Cached(store) => store.get(&ObjectRef::new(&r.name).within(&r.namespace)),
            ProxySource::Fetched(map) => map.get(r).cloned(),
        }
    }
}

impl crate::resolve::ProxyDirectory for ProxySource<'_> {
    fn lookup(&self, r: &SpiceProxyRef) -> Result<String, String> {
        ready_url_of(self.get(r).as_deref())
    }

    fn html5_url(&self, r: &SpiceProxyRef) -> Option<String> {
        html5_url_of(self.get(r).as_deref())
    }
}

/// How long a request waits for the watch caches to fill after start, before it is answered 503.
const CACHE_WAIT: Duration = Duration::from_secs(10);

/// Watch caches of every ClusterConsolePolicy (spec only) and SpiceProxy, so a console request
/// reads no object from the API server: before them, every request fetched its policy (hundreds
/// of KiB at a few thousand pools) and each SpiceProxy the policy names, one GET apiece.
/// Every replica keeps its own (the engine API does not wait for leadership).
#[derive(Clone)]
pub struct Caches {
    policies: Store<DeserializeGuard<ClusterConsolePolicy>>,
    proxies: Store<DeserializeGuard<SpiceProxy>>,
    ready: watch::Receiver<bool>,
    started: Instant,
    /// Each watch's last error, cleared by its next event: why the caches are not filled.
    policy_error: LastError,
    proxy_error: LastError,
}

type LastError = Arc<Mutex<Option<String>>>;

/// Passes a watch through, keeping its last error in `slot` until the next event succeeds.
fn noting_errors<T>(watch: impl Stream<Item = Result<T, watcher::Error>>, slot: LastError) -> impl Stream<Item = Result<T, watcher::Error>> {
    watch.inspect(move |event| *slot.lock().unwrap_or_else(|p| p.into_inner()) = event.as_ref().err().map(watch_error_sentence))
}

/// A watch error as an engine's operator reads it: the API server's own message and code when
/// it answered (kube's text of those carries a debug dump of the whole Status), else kube's.
fn watch_error_sentence(error: &watcher::Error) -> String {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) | watcher::Error::WatchStartFailed(kube::Error::Api(s)) | watcher::Error::WatchFailed(kube::Error::Api(s)) | watcher::Error::WatchError(s) => s,
        other => return other.to_string(),
    };
    format!("{} ({} {})", status.message, status.code, status.reason)
}

impl Caches {
    /// Starts the watches as tasks of the current runtime; they run for as long as it does. A
    /// failing watch backs off and is logged and counted like the controllers' (`without_failures`).
    pub fn start(client: Client, metrics: Arc<Metrics>) -> Caches {
        let (policies, policy_writer) = reflector::store();
        let (proxies, proxy_writer) = reflector::store();
        // The engine resolves from the spec: the status (the largest part of a big policy) and
        // managedFields are not kept.
        let policy_stream = watcher(Api::<DeserializeGuard<ClusterConsolePolicy>>::all(client.clone()), watcher::Config::default()).modify(|g| {
            g.meta_mut().managed_fields = None;
            if let Ok(p) = &mut g.0 {
                p.status = None;
            }
        });
        let proxy_stream = watcher(Api::<DeserializeGuard<SpiceProxy>>::all(client), watcher::Config::default()).modify(|g| g.meta_mut().managed_fields = None);
        let (policy_error, proxy_error) = (LastError::default(), LastError::default());
        let policy_events = noting_errors(reflector::reflector(policy_writer, policy_stream), policy_error.clone());
        let proxy_events = noting_errors(reflector::reflector(proxy_writer, proxy_stream), proxy_error.clone());
        let policy_events = without_failures(policy_events, "ClusterConsolePolicy".into(), metrics.clone());
        let proxy_events = without_failures(proxy_events, "SpiceProxy".into(), metrics);
        tokio::spawn(policy_events.for_each(|_| futures::future::ready(())));
        tokio::spawn(proxy_events.for_each(|_| futures::future::ready(())));
        // The only waiters on the stores' own readiness (which wakes only its last waiter);
        // requests watch `ready`.
        let (ready_tx, ready) = watch::channel(false);
        let (p, x) = (policies.clone(), proxies.clone());
        tokio::spawn(async move {
            if p.wait_until_ready().await.is_ok() && x.wait_until_ready().await.is_ok() {
                let _ = ready_tx.send(true);
            }
        });
        Caches { policies, proxies, ready, started: Instant::now(), policy_error, proxy_error }
    }

    /// Requests in the first seconds after start wait for the first lists; later, caches still
    /// not filled are reported at once, so requests do not pile up behind a failing watch.
    async fn wait_ready(&self) -> Result<(), EngineError> {
        let mut ready = self.ready.clone();
        let wait = CACHE_WAIT.saturating_sub(self.started.elapsed());
        match tokio::time::timeout(wait, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(EngineError::Unavailable(self.why_not_filled())),
        }
    }

    /// Whether both caches have listed everything once, else why not: part of the operator's
    /// readiness, so a replica that cannot answer engines gets no engine traffic.
    pub fn filled(&self) -> Result<(), String> {
        if *self.ready.borrow() { Ok(()) } else { Err(self.why_not_filled()) }
    }

    /// The failing watch and its error (a missing RBAC rule, say), else that the lists are slow.
    fn why_not_filled(&self) -> String {
        for (kind, slot) in [("ClusterConsolePolicies", &self.policy_error), ("SpiceProxies", &self.proxy_error)] {
            if let Some(error) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return format!("the engine API cannot read {kind} from the Kubernetes API: {error}; it keeps retrying");
            }
        }
        "the engine API is still reading ClusterConsolePolicies and SpiceProxies from the Kubernetes API; retry in a few seconds".into()
    }
}

/// Reads policies and SpiceProxies from the watch caches when it has them (the API), from the
/// API server otherwise (the CLI, one request per run). A policy the cache does not hold yet is
/// read from the API server, so one created a moment ago is found; a SpiceProxy missing from the
/// cache is not ready anyway (its readiness arrives through the same watch).
pub struct Engine {
    pub client: Client,
    pub caches: Option<Caches>,
}

impl Engine {
    /// The policy, shared with the cache rather than copied (a big one is hundreds of KiB).
    async fn policy(&self, name: &str) -> Result<Arc<DeserializeGuard<ClusterConsolePolicy>>, EngineError> {
        let cached = match &self.caches {
            Some(caches) => {
                caches.wait_ready().await?;
                caches.policies.get(&ObjectRef::new(name))
            }
            None => None,
        };
        let policy = match cached {
            Some(p) => p,
            None => Api::<ClusterConsolePolicy>::all(self.client.clone())
                .get_opt(name)
                .await?
                .map(|p| Arc::new(DeserializeGuard(Ok(p))))
                .ok_or_else(|| EngineError::NotFound(format!("policy {name:?} does not exist")))?,
        };
        if let Err(invalid) = &policy.0 {
            return Err(EngineError::Unavailable(format!("policy {name:?} cannot be decoded: {}", invalid.error)));
        }
        Ok(policy)
    }

    /// The SpiceProxies the policy names: the cache, or each fetched once.
    async fn proxies(&self, policy: &ClusterConsolePolicy) -> Result<ProxySource<'_>, EngineError> {
        if let Some(caches) = &self.caches {
            return Ok(ProxySource::Cached(&caches.proxies));
        }
        let mut out = HashMap::new();
        for r in policy.spec.proxy_refs() {
            if out.contains_key(r) {
                continue;
            }
            if let Some(p) = Api::<SpiceProxy>::namespaced(self.client.clone(), &r.namespace).get_opt(&r.name).await? {
                out.insert(r.clone(), Arc::new(DeserializeGuard(Ok(p))));
            }
        }
        Ok(ProxySource::Fetched(out))
    }

    async fn resolve_with(&self, policy: &DeserializeGuard<ClusterConsolePolicy>, cluster: &str, pool: Option<&str>, vm: Option<&str>) -> Result<(VmResolution, ProxySource<'_>), EngineError> {
        // `policy` decoded: checked where it was read.
        let Ok(policy) = &policy.0 else { return Err(EngineError::Unavailable("policy cannot be decoded".into())) };
        let proxies = self.proxies(policy).await?;
        let resolution = resolve_vm(&policy.name_any(), &policy.spec, &proxies, cluster, pool, vm)?;
        Ok((resolution, proxies))
    }

    /// The effective proxy of one VM (or pool, or cluster).
    pub async fn resolve(&self, policy: &str, cluster: &str, pool: Option<&str>, vm: Option<&str>) -> Result<VmResolution, EngineError> {
        let policy = self.policy(policy).await?;
        Ok(self.resolve_with(&policy, cluster, pool, vm).await?.0)
    }

    /// Validates, resolves and checks a console request; mints nothing yet.
    pub async fn prepare(&self, request: ConsoleRequest) -> Result<Prepared, EngineError> {
        validate_request(&request).map_err(EngineError::BadRequest)?;
        let policy = self.policy(&request.policy).await?;
        let (resolution, proxies) = self.resolve_with(&policy, &request.cluster, request.pool.as_deref(), Some(&request.vm)).await?;
        if let Some(why) = &resolution.error {
            // Never fall back to another level or to a direct connection.
            return Err(EngineError::Unavailable(format!("the proxy for this VM cannot be used: {why}")));
        }
        let mut prepared = Prepared { request, resolution, ticket_for: None, plain_proxy: None, html5_reachable: false };
        if !use_proxy(&prepared.resolution, prepared.request.proxy_enabled) {
            return Ok(prepared);
        }
        let url = prepared.resolution.proxy_url.clone().expect("a configured proxy has a URL");
        let Some(reference) = prepared.resolution.spice_proxy.clone() else {
            prepared.plain_proxy = Some(url); // a proxy this operator does not run
            return Ok(prepared);
        };
        // The resolution names a SpiceProxy without error only when it was found and decoded.
        let found = proxies.get(&reference);
        let Some(Ok(spx)) = found.as_deref().map(|p| &p.0) else {
            return Err(EngineError::Unavailable(format!("SpiceProxy {}/{} is not readable", reference.namespace, reference.name)));
        };
        check_allowed(&prepared.request, spx).await?;
        prepared.html5_reachable = match &spx.spec.html5 {
            Some(h) if h.upstream_tls.is_some() => prepared.request.tls_port.is_some(),
            Some(_) => prepared.request.port.is_some(),
            None => false,
        };
        match spx.spec.auth.mode {
            AuthMode::None => prepared.plain_proxy = Some(url),
            AuthMode::Basic => {
                return Err(EngineError::BadRequest(format!(
                    "SpiceProxy {}/{} uses Basic authentication, whose shared password must not be handed to users; use auth mode Ticket",
                    reference.namespace, reference.name
                )));
            }
            AuthMode::Ticket => {
                let secret = Api::<Secret>::namespaced(self.client.clone(), &reference.namespace).get_opt(&key_secret_name(&reference.name)).await?;
                let key = secret
                    .and_then(|s| s.data)
                    .and_then(|d| d.get(ticket::CURRENT_KEY).map(|k| k.0.clone()))
                    .ok_or_else(|| EngineError::Unavailable(format!("SpiceProxy {}/{} has no ticket key yet", reference.namespace, reference.name)))?;
                prepared.ticket_for = Some((reference, key));
            }
        }
        Ok(prepared)
    }

    /// Mints the ticket (if any) and writes the `.vv`; one audit line per ticket.
    pub fn issue(prepared: Prepared, caller: &str) -> Console {
        let Prepared { request, resolution, ticket_for, plain_proxy, html5_reachable } = prepared;
        let mut ticket_expires = None;
        let mut html5_url = None;
        let proxy = match (&ticket_for, plain_proxy) {
            (Some((reference, key)), _) => {
                let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TICKET_TTL);
                let ports: Vec<u16> = [request.port, request.tls_port].into_iter().flatten().collect();
                let expires = ticket::now() + ttl;
                let claims = ticket::Claims { host: request.host.to_ascii_lowercase(), ports: ports.clone(), expires, subject: format!("{caller} vm={}", request.vm) };
                let token = ticket::mint(key, &claims);
                ticket_expires = Some(expires);
                audit(caller, &request, reference, &ports, expires);
                if html5_reachable {
                    html5_url = resolution.html5_url.as_deref().map(|base| super::html5_console_url(base, &token, request.password.as_deref()));
                }
                Some(proxy_with_ticket(resolution.proxy_url.as_deref().unwrap_or_default(), &token))
            }
            (None, plain) => plain,
        };
        Console { vv: vv_file(&request, proxy.as_deref()), html5_url, resolution, ticket_expires }
    }
}

/// One JSON line on stdout per issued ticket: who, which VM, which target, until when.
/// Never the ticket itself.
fn audit(caller: &str, r: &ConsoleRequest, spx: &SpiceProxyRef, ports: &[u16], expires: u64) {
    let line = serde_json::json!({
        "event": "ticketIssued",
        "time": ticket::now(),
        "caller": caller,
        "policy": r.policy,
        "cluster": r.cluster,
        "pool": r.pool,
        "vm": r.vm,
        "target": format!("{}:{}", r.host, ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")),
        "spiceProxy": format!("{}/{}", spx.namespace, spx.name),
        "expires": expires,
    });
    crate::log_queue::stdout().line(line.to_string().as_bytes());
}

/// The console endpoint must be on the proxy's allow-list, so no ticket is issued that the
/// proxy would refuse later. Names are resolved the way the proxy resolves them.
async fn check_allowed(r: &ConsoleRequest, spx: &SpiceProxy) -> Result<(), EngineError> {
    let allow = AllowList::new(proxy_config(&spx.spec).allowed_targets);
    let addresses: Vec<IpAddr> = match r.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((r.host.as_str(), 0))).await {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            _ => return Err(EngineError::BadRequest(format!("host {:?} does not resolve", r.host))),
        },
    };
    let rules: Vec<String> = spx.spec.allowed_targets.iter().map(|t| {
        let ports: Vec<String> = t.ports.iter().map(|p| match p.to { Some(to) if to != p.from => format!("{}-{to}", p.from), _ => p.from.to_string() }).collect();
        format!("{} ports {}", t.cidr, ports.join(","))
    }).collect();
    for port in [r.port, r.tls_port].into_iter().flatten() {
        if !addresses.iter().any(|ip| allow.permits(*ip, port)) {
            return Err(EngineError::BadRequest(format!(
                "console endpoint {} is outside the allow-list of SpiceProxy {}/{} ({}); the proxy would refuse it",
                crate::proxy::head::authority(&r.host, port),
                spx.namespace().unwrap_or_default(),
                spx.name_any(),
                rules.join("; ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden() -> watcher::Error {
        let status = kube::core::Status { code: 403, reason: "Forbidden".into(), message: "spiceproxies is forbidden: User \"op\" cannot list".into(), ..Default::default() };
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    #[tokio::test]
    async fn a_failing_watch_is_named_by_the_api_servers_message_until_it_succeeds() {
        let slot = LastError::default();
        let events = futures::stream::iter([Err(forbidden()), Err(watcher::Error::NoResourceVersion), Ok(())]);
        let mut noted = std::pin::pin!(noting_errors(events, slot.clone()));
        let mut seen = Vec::new();
        while noted.next().await.is_some() {
            seen.push(slot.lock().unwrap().clone());
        }
        assert_eq!(
            seen,
            [
                Some("spiceproxies is forbidden: User \"op\" cannot list (403 Forbidden)".to_string()),
                Some("no metadata.resourceVersion in watch result (does resource support watch?)".to_string()),
                None
            ]
        );
    }

    /// Filled caches holding these objects as the watches would deliver them (JSON), each
    /// decoded through the same guard, so a malformed one is kept as undecodable.
    fn filled_caches(policies: &[serde_json::Value], proxies: &[serde_json::Value]) -> Caches {
        fn store_of<K>(objects: &[serde_json::Value]) -> Store<DeserializeGuard<K>>
        where
            K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
        {
            let (store, mut writer) = reflector::store::<DeserializeGuard<K>>();
            for object in objects {
                writer.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(object.clone()).expect("a guard decodes any object with metadata")));
            }
            store
        }
        let (_, ready) = watch::channel(true);
        Caches { policies: store_of(policies), proxies: store_of(proxies), ready, started: Instant::now(), policy_error: LastError::default(), proxy_error: LastError::default() }
    }

    /// An engine whose API server is unreachable: everything it answers came from the caches.
    fn cached_engine(caches: Caches) -> Engine {
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        Engine { client, caches: Some(caches) }
    }

    fn policy(name: &str, spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"apiVersion": "console.spice-operator.io/v1alpha1", "kind": "ClusterConsolePolicy", "metadata": {"name": name}, "spec": spec})
    }

    fn console(policy: &str) -> ConsoleRequest {
        ConsoleRequest { policy: policy.into(), cluster: "prod".into(), vm: "vm1".into(), host: "10.10.0.5".into(), port: Some(5900), proxy_enabled: true, ..Default::default() }
    }

    // The CRD schemas let no such object in today; these guards are for objects stored under an
    // older or newer schema than this build's types.
    #[tokio::test]
    async fn a_cached_policy_or_spiceproxy_that_cannot_be_decoded_is_a_503_naming_it() {
        let caches = filled_caches(
            &[
                policy("broken", serde_json::json!({"defaultProxy": {"url": 5}})),
                policy("good", serde_json::json!({"defaultProxy": {"spiceProxyRef": {"name": "edge", "namespace": "vdi"}}, "clusters": [{"name": "prod"}]})),
            ],
            &[serde_json::json!({"apiVersion": "console.spice-operator.io/v1alpha1", "kind": "SpiceProxy", "metadata": {"name": "edge", "namespace": "vdi"}, "spec": {"allowedTargets": "everything"}})],
        );
        let engine = cached_engine(caches);

        let broken = engine.prepare(console("broken")).await.err().expect("an undecodable policy is refused");
        assert_eq!(broken.http_status(), 503);
        let said = broken.to_string();
        assert!(said.starts_with("policy \"broken\" cannot be decoded: "), "{said}");
        assert!(said.contains("integer `5`"), "names serde's reason: {said}");

        let through = engine.prepare(console("good")).await.err().expect("a console through an undecodable SpiceProxy is refused");
        assert_eq!(through.http_status(), 503);
        let said = through.to_string();
        assert!(said.starts_with("the proxy for this VM cannot be used: "), "{said}");
        assert!(said.contains("vdi/edge") && said.contains("cannot be decoded: "), "names the SpiceProxy and why: {said}");

        let resolved = engine.resolve("good", "prod", None, Some("vm1")).await.unwrap();
        assert_eq!(resolved.proxy_url, None, "no URL from an undecodable SpiceProxy");
        assert!(resolved.error.as_deref().is_some_and(|e| e.contains("cannot be decoded")), "{resolved:?}");
    }
}
