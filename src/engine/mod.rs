//! What a virtualization engine asks for: the effective proxy of one VM, and a ready-to-open
//! console descriptor (`.vv` file) with a fresh target-bound ticket. The pure parts live here
//! (resolution of one VM, request validation, the `.vv` text); `service` adds the Kubernetes
//! lookups, `api` the authenticated HTTPS front, `tls` its certificate.

pub mod api;
pub mod auth_cache;
pub mod service;
pub mod tls;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::crd::{ClusterConsolePolicySpec, ProxyChoice, Source, SpiceProxyRef};
use crate::resolve::{self, Effective, ProxyDirectory};

/// Default lifetime of a ticket: time to *start* the session, as oVirt's 120 s.
pub const DEFAULT_TICKET_TTL: u64 = 120;
pub const MAX_TICKET_TTL: u64 = 600;

/// The effective console settings of one VM: exactly what the policy's status says for its
/// pool (or cluster), with the VM's own opt-out applied.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmResolution {
    pub proxy_url: Option<String>,
    /// Base URL of the browser console (spice-html5); null while no bridge serves this VM.
    pub html5_url: Option<String>,
    pub source: Source,
    /// The "Enable SPICE Proxy" checkbox: offered (and honoured) only when true.
    pub proxy_configured: bool,
    /// The SpiceProxy behind `proxyUrl`, when the deciding level names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spice_proxy: Option<SpiceProxyRef>,
    /// Why the deciding level cannot be used (no other level is tried instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(thiserror::Error, Debug, PartialEq)]
pub enum LookupError {
    #[error("cluster {cluster:?} is not in policy {policy:?}")]
    UnknownCluster { policy: String, cluster: String },
    #[error("pool {pool:?} is not in cluster {cluster:?} of policy {policy:?}")]
    UnknownPool { policy: String, cluster: String, pool: String },
}

/// Resolves one VM: opt-out → none; else pool → cluster → global → none. Pure.
pub fn resolve_vm(
    policy: &str,
    spec: &ClusterConsolePolicySpec,
    proxies: &dyn ProxyDirectory,
    cluster: &str,
    pool: Option<&str>,
    vm: Option<&str>,
) -> Result<VmResolution, LookupError> {
    let c = spec.clusters.iter().find(|c| c.name == cluster).ok_or_else(|| LookupError::UnknownCluster { policy: policy.into(), cluster: cluster.into() })?;
    let p = match pool {
        Some(pool) => Some(c.pools.iter().find(|p| p.name == pool).ok_or_else(|| LookupError::UnknownPool {
            policy: policy.into(),
            cluster: cluster.into(),
            pool: pool.into(),
        })?),
        None => None,
    };
    if let Some(vm) = vm
        && spec.vm_opt_outs.iter().any(|o| o.name == vm && o.cluster == cluster)
    {
        return Ok(VmResolution { proxy_url: None, html5_url: None, source: Source::Vm, proxy_configured: false, spice_proxy: None, error: None });
    }
    let deciding: Option<(Source, &ProxyChoice)> = p
        .and_then(|p| p.proxy.as_ref().map(|c| (Source::Pool, c)))
        .or_else(|| c.proxy.as_ref().map(|c| (Source::Cluster, c)))
        .or_else(|| spec.default_proxy.as_ref().map(|c| (Source::Global, c)));
    let Some((source, choice)) = deciding else {
        return Ok(VmResolution { proxy_url: None, html5_url: None, source: Source::None, proxy_configured: false, spice_proxy: None, error: None });
    };
    let (proxy_url, error) = match resolve::evaluate(choice, proxies) {
        Effective::Proxy(u) => (Some(u), None),
        Effective::Direct => (None, None),
        Effective::Unusable(why) => (None, Some(why)),
    };
    let html5_url = proxy_url.as_ref().and(choice.spice_proxy_ref.as_ref()).and_then(|r| proxies.html5_url(r));
    Ok(VmResolution {
        proxy_configured: proxy_url.is_some(),
        spice_proxy: proxy_url.as_ref().and(choice.spice_proxy_ref.clone()),
        proxy_url,
        html5_url,
        source,
        error,
    })
}

/// What the engine sends for one console: where the VM's SPICE server listens and the user's
/// choice of the "Enable SPICE Proxy" checkbox.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsoleRequest {
    pub policy: String,
    pub cluster: String,
    #[serde(default)]
    pub pool: Option<String>,
    pub vm: String,
    /// The hypervisor's address of this VM's SPICE server.
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls_port: Option<u16>,
    /// The SPICE password (the VM's console ticket), if the server wants one.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM CA of the hypervisor's SPICE TLS certificate.
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub host_subject: Option<String>,
    /// The user's checkbox; honoured only when a proxy is configured. Default: use it.
    #[serde(default = "yes")]
    pub proxy_enabled: bool,
    #[serde(default)]
    pub title: Option<String>,
    /// Ticket lifetime in seconds (default 120, at most 600).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

fn yes() -> bool {
    true
}

/// Checks a request before anything is looked up or minted; every problem in one message.
pub fn validate_request(r: &ConsoleRequest) -> Result<(), String> {
    let mut problems = Vec::new();
    for (field, value) in [("policy", &r.policy), ("cluster", &r.cluster), ("vm", &r.vm), ("host", &r.host)] {
        if value.is_empty() {
            problems.push(format!("{field} is required"));
        }
    }
    if !r.host.is_empty() && r.host.parse::<IpAddr>().is_err() && resolve::validate_host(&r.host).is_err() {
        problems.push(format!("host {:?} is neither an IP address nor a DNS name", r.host));
    }
    match (r.port, r.tls_port) {
        (None, None) => problems.push("set port, tlsPort or both".into()),
        (Some(0), _) | (_, Some(0)) => problems.push("ports must be 1-65535".into()),
        _ => {}
    }
    if r.ca.is_some() && r.tls_port.is_none() {
        problems.push("ca is only used with tlsPort".into());
    }
    let limits = [("password", &r.password, 255), ("title", &r.title, 255), ("hostSubject", &r.host_subject, 1024), ("ca", &r.ca, 16384)];
    for (field, value, max) in limits {
        let Some(v) = value else { continue };
        if v.len() > max {
            problems.push(format!("{field} is longer than {max} bytes"));
        }
        // A newline would start a new key in the .vv file; only the CA may span lines.
        if v.chars().any(|c| c.is_control() && !(field == "ca" && c == '\n')) {
            problems.push(format!("{field} contains control characters"));
        }
    }
    for (field, value) in [("cluster", &r.cluster), ("vm", &r.vm)] {
        if value.chars().any(char::is_control) {
            problems.push(format!("{field} contains control characters"));
        }
    }
    if let Some(ttl) = r.ttl_seconds
        && (ttl == 0 || ttl > MAX_TICKET_TTL)
    {
        problems.push(format!("ttlSeconds must be 1-{MAX_TICKET_TTL}"));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
}

/// Whether this console goes through the proxy: only when one is configured and the user
/// kept the checkbox ticked (oVirt: the choice is ignored when no proxy is defined).
pub fn use_proxy(resolution: &VmResolution, proxy_enabled: bool) -> bool {
    resolution.proxy_configured && proxy_enabled
}

/// GKeyFile value escaping (what remote-viewer parses): backslash, newline, leading space.
fn keyfile_value(v: &str) -> String {
    let mut out = v.replace('\\', "\\\\").replace('\n', "\\n");
    if out.starts_with(' ') {
        out.replace_range(0..1, "\\s");
    }
    out
}

/// The `.vv` descriptor remote-viewer opens. `proxy` is the full `proxy=` value (with the
/// ticket as password), or None for a direct connection: then there is no `proxy=` line.
pub fn vv_file(r: &ConsoleRequest, proxy: Option<&str>) -> String {
    let mut lines = vec!["[virt-viewer]".to_string(), "type=spice".into(), format!("host={}", r.host)];
    if let Some(p) = r.port {
        lines.push(format!("port={p}"));
    }
    if let Some(p) = r.tls_port {
        lines.push(format!("tls-port={p}"));
    }
    if let Some(pw) = &r.password {
        lines.push(format!("password={}", keyfile_value(pw)));
    }
    if let Some(ca) = &r.ca {
        lines.push(format!("ca={}", keyfile_value(ca.trim_end())));
    }
    if let Some(s) = &r.host_subject {
        lines.push(format!("host-subject={}", keyfile_value(s)));
    }
    if let Some(p) = proxy {
        lines.push(format!("proxy={p}"));
    }
    lines.push(format!("title={}", keyfile_value(r.title.as_deref().unwrap_or(&r.vm))));
    // The file holds a password and a ticket: remote-viewer deletes it once read.
    lines.push("delete-this-file=1".into());
    lines.push("secure-attention=ctrl+alt+end".into());
    lines.push("release-cursor=shift+f12".into());
    lines.push("toggle-fullscreen=shift+f11".into());
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `http://console:<ticket>@host:port` from a published `http://host:port`.
pub fn proxy_with_ticket(proxy_url: &str, ticket: &str) -> String {
    let rest = proxy_url.strip_prefix("http://").unwrap_or(proxy_url);
    format!("http://console:{ticket}@{rest}")
}

/// The browser console's URL: the SpiceProxy's `html5Url` with the ticket as `token` and, when
/// the VM's SPICE server wants one, its `password`. spice_auto.html reads the password from the
/// query only (`spice_query_var`, which decodes `+` as a space and `%XX`); without it, the
/// server refuses the link and the page asks the user for a password they were never told.
pub fn html5_console_url(base: &str, ticket: &str, password: Option<&str>) -> String {
    let mut url = format!("{base}?token={ticket}");
    if let Some(pw) = password {
        url.push_str("&password=");
        url.extend(form_urlencoded::byte_serialize(pw.as_bytes()));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterEntry, PoolEntry, VmOptOut};

    #[test]
    fn the_browser_console_url_carries_the_ticket_and_the_password_encoded() {
        let base = "https://console.example.com:6082/spice_auto.html";
        assert_eq!(html5_console_url(base, "v1.abc", None), format!("{base}?token=v1.abc"));
        // Every character spice_auto.html's query parsing would split or change on is escaped:
        // `&` and `=` (parameters), `+` (a space to it), `%`, `#` (the fragment), spaces, UTF-8.
        assert_eq!(
            html5_console_url(base, "v1.abc", Some("a&b=c+d %e#f é")),
            format!("{base}?token=v1.abc&password=a%26b%3Dc%2Bd+%25e%23f+%C3%A9")
        );
        assert_eq!(html5_console_url(base, "t", Some("")), format!("{base}?token=t&password="));
    }

    fn choice_url(u: &str) -> Option<ProxyChoice> {
        Some(ProxyChoice { url: Some(u.into()), ..Default::default() })
    }
    fn choice_ref(name: &str) -> Option<ProxyChoice> {
        Some(ProxyChoice { spice_proxy_ref: Some(SpiceProxyRef { name: name.into(), namespace: "spice".into() }), ..Default::default() })
    }
    fn spec() -> ClusterConsolePolicySpec {
        ClusterConsolePolicySpec {
            default_proxy: choice_url("global.example.com"),
            clusters: vec![
                ClusterEntry {
                    name: "prod".into(),
                    proxy: choice_ref("edge"),
                    pools: vec![
                        PoolEntry { name: "inherit".into(), proxy: None },
                        PoolEntry { name: "own".into(), proxy: choice_url("http://pool.example.com:8080") },
                        PoolEntry { name: "direct".into(), proxy: Some(ProxyChoice { direct: Some(true), ..Default::default() }) },
                        PoolEntry { name: "broken".into(), proxy: choice_ref("missing") },
                    ],
                },
                ClusterEntry { name: "lab".into(), proxy: None, pools: vec![PoolEntry { name: "p".into(), proxy: None }] },
            ],
            vm_opt_outs: vec![VmOptOut { name: "secret-vm".into(), cluster: "prod".into(), pool: None }],
        }
    }
    fn dir(r: &SpiceProxyRef) -> Result<String, String> {
        if r.name == "edge" { Ok("http://edge.example.com:3128".into()) } else { Err("does not exist".into()) }
    }
    fn one(cluster: &str, pool: Option<&str>, vm: Option<&str>) -> VmResolution {
        resolve_vm("p", &spec(), &dir, cluster, pool, vm).unwrap()
    }

    #[test]
    fn every_level_and_the_vm_opt_out() {
        let r = one("prod", Some("inherit"), Some("vm1"));
        assert_eq!((r.proxy_url.as_deref(), r.source, r.proxy_configured), (Some("http://edge.example.com:3128"), Source::Cluster, true));
        assert_eq!(r.spice_proxy.unwrap().name, "edge");
        let r = one("prod", Some("own"), None);
        assert_eq!((r.proxy_url.as_deref(), r.source, r.spice_proxy), (Some("http://pool.example.com:8080"), Source::Pool, None));
        let r = one("prod", Some("direct"), None);
        assert_eq!((r.proxy_url, r.source, r.proxy_configured), (None, Source::Pool, false));
        let r = one("lab", Some("p"), None);
        assert_eq!((r.proxy_url.as_deref(), r.source), (Some("http://global.example.com:3128"), Source::Global));
        let r = one("prod", Some("own"), Some("secret-vm"));
        assert_eq!((r.proxy_url, r.source, r.proxy_configured), (None, Source::Vm, false));
        // The opt-out is per cluster: a VM of the same name elsewhere is not opted out.
        assert_eq!(one("lab", None, Some("secret-vm")).source, Source::Global);
        let mut s = spec();
        s.default_proxy = None;
        let r = resolve_vm("p", &s, &dir, "lab", Some("p"), None).unwrap();
        assert_eq!((r.proxy_url, r.source, r.proxy_configured), (None, Source::None, false));
    }

    #[test]
    fn a_broken_level_is_reported_never_skipped() {
        let r = one("prod", Some("broken"), None);
        assert_eq!((r.proxy_url, r.source, r.proxy_configured), (None, Source::Pool, false));
        assert!(r.error.unwrap().contains("spice/missing does not exist"));
    }

    #[test]
    fn unknown_names_are_errors_with_the_name() {
        let e = resolve_vm("p", &spec(), &dir, "nope", None, None).unwrap_err();
        assert_eq!(e.to_string(), "cluster \"nope\" is not in policy \"p\"");
        let e = resolve_vm("p", &spec(), &dir, "prod", Some("nope"), None).unwrap_err();
        assert_eq!(e.to_string(), "pool \"nope\" is not in cluster \"prod\" of policy \"p\"");
    }

    #[test]
    fn checkbox_is_honoured_only_when_a_proxy_is_configured() {
        let configured = one("prod", Some("inherit"), None);
        assert!(use_proxy(&configured, true) && !use_proxy(&configured, false));
        let none = one("prod", Some("direct"), None);
        assert!(!use_proxy(&none, true) && !use_proxy(&none, false));
    }

    fn req() -> ConsoleRequest {
        ConsoleRequest {
            policy: "p".into(),
            cluster: "prod".into(),
            vm: "vm1".into(),
            host: "10.0.0.5".into(),
            port: Some(5900),
            tls_port: Some(5901),
            password: Some(" pa\\ss".into()),
            ca: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
            host_subject: Some("O=example,CN=host1".into()),
            proxy_enabled: true,
            ..Default::default()
        }
    }

    #[test]
    fn vv_file_is_what_remote_viewer_parses() {
        let vv = vv_file(&req(), Some("http://console:v1.a.b@edge.example.com:3128"));
        assert!(vv.starts_with("[virt-viewer]\ntype=spice\nhost=10.0.0.5\nport=5900\ntls-port=5901\n"), "{vv}");
        assert!(vv.contains("\npassword=\\spa\\\\ss\n"), "{vv}");
        assert!(vv.contains("\nca=-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\n"), "{vv}");
        assert!(vv.contains("\nproxy=http://console:v1.a.b@edge.example.com:3128\n"));
        assert!(vv.contains("\ndelete-this-file=1\n") && vv.contains("\ntitle=vm1\n"));
        // One key per line, nothing but key=value after the group header.
        assert!(vv.lines().skip(1).all(|l| l.split_once('=').is_some_and(|(k, _)| !k.is_empty() && !k.contains(' '))), "{vv}");
        let direct = vv_file(&req(), None);
        assert!(!direct.contains("proxy="), "{direct}");
    }

    #[test]
    fn requests_are_validated_before_anything_happens() {
        assert_eq!(validate_request(&req()), Ok(()));
        let mut r = req();
        r.password = Some("x\nproxy=http://evil:1".into());
        assert!(validate_request(&r).unwrap_err().contains("password contains control characters"));
        let mut r = req();
        r.port = None;
        r.tls_port = None;
        r.host = "bad host".into();
        r.ttl_seconds = Some(601);
        let e = validate_request(&r).unwrap_err();
        assert!(e.contains("set port, tlsPort") && e.contains("bad host") && e.contains("ttlSeconds"), "{e}");
        let mut r = req();
        r.host = "fd00::5".into();
        assert_eq!(validate_request(&r), Ok(()));
        assert_eq!(proxy_with_ticket("http://edge:3128", "v1.x.y"), "http://console:v1.x.y@edge:3128");
    }
}
