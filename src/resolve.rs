//! Policy resolution: pure functions, no I/O. Given a `ClusterConsolePolicySpec` and a way to
//! look up SpiceProxies, compute the effective console proxy of every cluster, pool and
//! opted-out VM, following oVirt's hierarchy: VM opt-out → none; else pool → cluster →
//! global → none. A level that is set but unusable (bad URL, missing or unready SpiceProxy)
//! makes the entry fail with a reason: it never falls back silently to another level.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;

use crate::crd::{ClusterConsolePolicySpec, ProxyChoice, Resolution, Source, SpiceProxyRef};

/// Port SPICE clients assume for an `http://` proxy without a port.
pub const DEFAULT_HTTP_PROXY_PORT: u16 = 3128;

/// Why a proxy URL cannot be handed to a SPICE client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    Empty,
    Https,
    UnsupportedScheme(String),
    Credentials,
    PathOrQuery,
    Ipv6,
    BadHost(String),
    BadPort(String),
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Empty => write!(f, "proxy URL is empty"),
            UrlError::Https => write!(
                f,
                "https:// proxies are not supported: SPICE clients ignore an https proxy and connect directly; use http://host:port"
            ),
            UrlError::UnsupportedScheme(s) => {
                write!(f, "scheme {s}:// is not supported: SPICE clients only use http:// proxies")
            }
            UrlError::Credentials => write!(
                f,
                "credentials (user@) do not belong in a policy URL: tickets are added per console"
            ),
            UrlError::PathOrQuery => write!(
                f,
                "a path, query or fragment after host:port makes SPICE clients drop the proxy and connect directly"
            ),
            UrlError::Ipv6 => write!(
                f,
                "IPv6 literal hosts cannot be parsed by SPICE clients, which then connect directly; use a DNS name"
            ),
            UrlError::BadHost(h) => write!(f, "invalid host {h:?}: expected a DNS name or an IPv4 address"),
            UrlError::BadPort(p) => write!(f, "invalid port {p:?}: expected a number from 1 to 65535"),
        }
    }
}

impl std::error::Error for UrlError {}

/// Parses `[protocol://]host[:port]` as oVirt and spice-gtk do and returns the canonical
/// `http://host:port`, or the reason a SPICE client would not use it.
pub fn normalize_proxy_url(input: &str) -> Result<String, UrlError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UrlError::Empty);
    }
    let rest = match s.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "http" => rest,
            "https" => return Err(UrlError::Https),
            other => return Err(UrlError::UnsupportedScheme(other.to_string())),
        },
        None => s,
    };
    if rest.contains('@') {
        return Err(UrlError::Credentials);
    }
    if rest.contains(['/', '?', '#']) {
        return Err(UrlError::PathOrQuery);
    }
    if rest.starts_with('[') || rest.matches(':').count() > 1 {
        return Err(UrlError::Ipv6);
    }
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, parse_port(p)?),
        None => (rest, DEFAULT_HTTP_PROXY_PORT),
    };
    Ok(format!("http://{}:{port}", validate_host(host)?))
}

fn parse_port(p: &str) -> Result<u16, UrlError> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(UrlError::BadPort(p.to_string())),
    }
}

/// A DNS name (RFC 1123 labels) or a dotted IPv4 address, lower-cased.
pub fn validate_host(host: &str) -> Result<String, UrlError> {
    let bad = || UrlError::BadHost(host.to_string());
    if host.contains(':') {
        return Err(UrlError::Ipv6);
    }
    if host.is_empty() || host.len() > 253 {
        return Err(bad());
    }
    let all_numeric = host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()));
    if all_numeric {
        return host.parse::<Ipv4Addr>().map(|ip| ip.to_string()).map_err(|_| bad());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.split('.').all(label_ok) { Ok(host.to_ascii_lowercase()) } else { Err(bad()) }
}

/// What a level's `ProxyChoice` amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effective {
    Proxy(String),
    Direct,
    Unusable(String),
}

/// Looks up a SpiceProxy: its published URL when Ready, or why it cannot be used.
pub trait ProxyDirectory {
    fn lookup(&self, reference: &SpiceProxyRef) -> Result<String, String>;
    /// The browser console base URL of a Ready SpiceProxy, when it has one.
    fn html5_url(&self, _reference: &SpiceProxyRef) -> Option<String> {
        None
    }
}

impl<F: Fn(&SpiceProxyRef) -> Result<String, String>> ProxyDirectory for F {
    fn lookup(&self, reference: &SpiceProxyRef) -> Result<String, String> {
        self(reference)
    }
}

pub fn evaluate(choice: &ProxyChoice, proxies: &dyn ProxyDirectory) -> Effective {
    let set = [choice.url.is_some(), choice.spice_proxy_ref.is_some(), choice.direct == Some(true)];
    if set.iter().filter(|s| **s).count() != 1 {
        return Effective::Unusable("set exactly one of url, spiceProxyRef or direct: true".into());
    }
    if let Some(url) = &choice.url {
        return match normalize_proxy_url(url) {
            Ok(u) => Effective::Proxy(u),
            Err(e) => Effective::Unusable(format!("url {url:?}: {e}")),
        };
    }
    if let Some(r) = &choice.spice_proxy_ref {
        return match proxies.lookup(r) {
            // Re-check what a SpiceProxy publishes: an unusable URL must never reach a client.
            Ok(url) => match normalize_proxy_url(&url) {
                Ok(u) => Effective::Proxy(u),
                Err(e) => Effective::Unusable(format!("SpiceProxy {}/{} publishes {url:?}: {e}", r.namespace, r.name)),
            },
            Err(why) => Effective::Unusable(format!("SpiceProxy {}/{} {why}", r.namespace, r.name)),
        };
    }
    Effective::Direct
}

/// The resolved status content of one policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resolved {
    pub default_proxy_url: Option<String>,
    pub clusters: Vec<Resolution>,
    pub pools: Vec<Resolution>,
    pub vms: Vec<Resolution>,
}

impl Resolved {
    pub fn entries(&self) -> impl Iterator<Item = &Resolution> {
        self.clusters.iter().chain(&self.pools).chain(&self.vms)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Resolution> {
        self.entries().filter(|e| e.error.is_some())
    }
}

/// One level's verdict: where it came from, what it amounts to, and its browser console URL.
#[derive(Clone)]
struct Level {
    source: Source,
    effective: Effective,
    html5_url: Option<String>,
}

fn level(source: Source, choice: &ProxyChoice, proxies: &dyn ProxyDirectory) -> Level {
    let effective = evaluate(choice, proxies);
    let html5_url = match (&effective, &choice.spice_proxy_ref) {
        (Effective::Proxy(_), Some(r)) => proxies.html5_url(r),
        _ => None,
    };
    Level { source, effective, html5_url }
}

fn entry(name: &str, cluster: Option<&str>, pool: Option<&str>, level: &Level) -> Resolution {
    let (source, eff) = (level.source, &level.effective);
    let (proxy_url, error) = match eff {
        Effective::Proxy(u) => (Some(u.clone()), None),
        Effective::Direct => (None, None),
        Effective::Unusable(why) => (None, Some(why.clone())),
    };
    Resolution {
        name: name.to_string(),
        cluster: cluster.map(str::to_string),
        pool: pool.map(str::to_string),
        proxy_configured: proxy_url.is_some(),
        proxy_url,
        html5_url: level.html5_url.clone(),
        source,
        error,
    }
}

/// Resolves every cluster, pool and opted-out VM of a policy.
/// Each level's choice is evaluated once, so a global change costs one lookup, not one per pool.
pub fn resolve(spec: &ClusterConsolePolicySpec, proxies: &dyn ProxyDirectory) -> Resolved {
    let global = spec.default_proxy.as_ref().map(|c| level(Source::Global, c, proxies));
    let none = Level { source: Source::None, effective: Effective::Direct, html5_url: None };
    let mut out = Resolved {
        default_proxy_url: match &global {
            Some(Level { effective: Effective::Proxy(u), .. }) => Some(u.clone()),
            _ => None,
        },
        ..Default::default()
    };
    let mut known_pools: HashSet<(&str, &str)> = HashSet::new();
    for cluster in &spec.clusters {
        let cluster_level = match &cluster.proxy {
            Some(c) => level(Source::Cluster, c, proxies),
            None => global.clone().unwrap_or_else(|| none.clone()),
        };
        out.clusters.push(entry(&cluster.name, None, None, &cluster_level));
        for pool in &cluster.pools {
            known_pools.insert((&cluster.name, &pool.name));
            let pool_level = match &pool.proxy {
                Some(c) => level(Source::Pool, c, proxies),
                None => cluster_level.clone(),
            };
            out.pools.push(entry(&pool.name, Some(&cluster.name), None, &pool_level));
        }
    }
    for vm in &spec.vm_opt_outs {
        let known_cluster = spec.clusters.iter().any(|c| c.name == vm.cluster);
        let effective = match &vm.pool {
            _ if !known_cluster => {
                Effective::Unusable(format!("VM {} names cluster {:?}, which this policy does not list", vm.name, vm.cluster))
            }
            Some(p) if !known_pools.contains(&(vm.cluster.as_str(), p.as_str())) => Effective::Unusable(format!(
                "VM {} names pool {p:?}, which cluster {:?} does not list",
                vm.name, vm.cluster
            )),
            _ => Effective::Direct,
        };
        out.vms.push(entry(&vm.name, Some(&vm.cluster), vm.pool.as_deref(), &Level { source: Source::Vm, effective, html5_url: None }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterEntry, PoolEntry, VmOptOut};
    use std::collections::HashMap;

    fn url(u: &str) -> Option<ProxyChoice> {
        Some(ProxyChoice { url: Some(u.into()), ..Default::default() })
    }
    fn direct() -> Option<ProxyChoice> {
        Some(ProxyChoice { direct: Some(true), ..Default::default() })
    }
    fn spx(ns: &str, name: &str) -> Option<ProxyChoice> {
        Some(ProxyChoice {
            spice_proxy_ref: Some(SpiceProxyRef { name: name.into(), namespace: ns.into() }),
            ..Default::default()
        })
    }
    fn pool(name: &str, proxy: Option<ProxyChoice>) -> PoolEntry {
        PoolEntry { name: name.into(), proxy }
    }
    fn cluster(name: &str, proxy: Option<ProxyChoice>, pools: Vec<PoolEntry>) -> ClusterEntry {
        ClusterEntry { name: name.into(), proxy, pools }
    }

    struct Dir(HashMap<(String, String), Result<String, String>>);
    impl ProxyDirectory for Dir {
        fn lookup(&self, r: &SpiceProxyRef) -> Result<String, String> {
            self.0.get(&(r.namespace.clone(), r.name.clone())).cloned().unwrap_or_else(|| Err("does not exist".into()))
        }
    }
    fn dir(entries: &[(&str, &str, Result<&str, &str>)]) -> Dir {
        Dir(entries
            .iter()
            .map(|(ns, n, r)| ((ns.to_string(), n.to_string()), r.map(str::to_string).map_err(str::to_string)))
            .collect())
    }
    fn empty() -> Dir {
        dir(&[])
    }
    fn find<'a>(list: &'a [Resolution], name: &str) -> &'a Resolution {
        list.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no entry {name}"))
    }

    /// A directory where SpiceProxy spice/edge also serves browser consoles.
    struct WithHtml5;
    impl ProxyDirectory for WithHtml5 {
        fn lookup(&self, r: &SpiceProxyRef) -> Result<String, String> {
            if r.name == "edge" { Ok("http://edge.example.com:3128".into()) } else { Ok("http://other.example.com:3128".into()) }
        }
        fn html5_url(&self, r: &SpiceProxyRef) -> Option<String> {
            (r.name == "edge").then(|| "http://edge.example.com:6082/spice_auto.html".into())
        }
    }

    #[test]
    fn html5_url_follows_the_deciding_level_only() {
        let spec = ClusterConsolePolicySpec {
            default_proxy: spx("spice", "edge"),
            clusters: vec![
                cluster("inherits", None, vec![pool("p", None), pool("literal", url("squid.example.com")), pool("other", spx("spice", "other"))]),
                cluster("direct", direct(), vec![pool("q", None)]),
            ],
            vm_opt_outs: vec![VmOptOut { name: "vm".into(), cluster: "inherits".into(), pool: None }],
        };
        let r = resolve(&spec, &WithHtml5);
        let html5 = |list: &[Resolution], n: &str| find(list, n).html5_url.clone();
        assert_eq!(html5(&r.pools, "p").as_deref(), Some("http://edge.example.com:6082/spice_auto.html"));
        assert_eq!(html5(&r.clusters, "inherits").as_deref(), Some("http://edge.example.com:6082/spice_auto.html"));
        // A literal URL proxy, a SpiceProxy without the browser path, direct and opted-out VMs: none.
        assert_eq!(html5(&r.pools, "literal"), None);
        assert_eq!(html5(&r.pools, "other"), None);
        assert_eq!(html5(&r.pools, "q"), None);
        assert_eq!(html5(&r.vms, "vm"), None);
    }

    #[test]
    fn url_defaults_scheme_and_port() {
        assert_eq!(normalize_proxy_url("proxy.example.com").unwrap(), "http://proxy.example.com:3128");
        assert_eq!(normalize_proxy_url("Proxy.Example.com:8080").unwrap(), "http://proxy.example.com:8080");
        assert_eq!(normalize_proxy_url("http://10.1.2.3").unwrap(), "http://10.1.2.3:3128");
        assert_eq!(normalize_proxy_url("HTTP://p:1").unwrap(), "http://p:1");
        assert_eq!(normalize_proxy_url("  p.example:65535 ").unwrap(), "http://p.example:65535");
        assert_eq!(normalize_proxy_url("p.example.:80").unwrap(), "http://p.example:80");
    }

    #[test]
    fn https_and_other_schemes_are_rejected_with_the_reason() {
        let e = normalize_proxy_url("https://proxy.example.com:3129").unwrap_err();
        assert_eq!(e, UrlError::Https);
        assert!(e.to_string().contains("ignore an https proxy and connect directly"), "{e}");
        assert_eq!(normalize_proxy_url("HTTPS://p").unwrap_err(), UrlError::Https);
        assert_eq!(normalize_proxy_url("socks5://p:1080").unwrap_err(), UrlError::UnsupportedScheme("socks5".into()));
        assert_eq!(normalize_proxy_url("ftp://p").unwrap_err(), UrlError::UnsupportedScheme("ftp".into()));
    }

    #[test]
    fn urls_spice_gtk_cannot_parse_are_rejected() {
        assert_eq!(normalize_proxy_url("").unwrap_err(), UrlError::Empty);
        assert_eq!(normalize_proxy_url("http://p:3128/").unwrap_err(), UrlError::PathOrQuery);
        assert_eq!(normalize_proxy_url("http://p:3128/x").unwrap_err(), UrlError::PathOrQuery);
        assert_eq!(normalize_proxy_url("p:3128?a=b").unwrap_err(), UrlError::PathOrQuery);
        assert_eq!(normalize_proxy_url("p#frag").unwrap_err(), UrlError::PathOrQuery);
        assert_eq!(normalize_proxy_url("http://u:pw@p:3128").unwrap_err(), UrlError::Credentials);
        assert_eq!(normalize_proxy_url("http://[::1]:3128").unwrap_err(), UrlError::Ipv6);
        assert_eq!(normalize_proxy_url("fd00::1").unwrap_err(), UrlError::Ipv6);
        assert_eq!(normalize_proxy_url("http://[fd00::1]").unwrap_err(), UrlError::Ipv6);
    }

    #[test]
    fn ports_out_of_range_are_rejected() {
        for p in ["0", "65536", "99999", "-1", "", "80a", "+80", " 80"] {
            assert_eq!(normalize_proxy_url(&format!("p:{p}")).unwrap_err(), UrlError::BadPort(p.into()), "port {p:?}");
        }
        assert_eq!(normalize_proxy_url("p:1").unwrap(), "http://p:1");
    }

    #[test]
    fn bad_hosts_are_rejected() {
        for h in ["-p", "p-", "p_q", "a..b", "300.1.1.1", "1.2.3", "ex ample", "é.example", ":3128"] {
            assert!(normalize_proxy_url(h).is_err(), "host {h:?} accepted");
        }
        let long = "a".repeat(64);
        assert!(normalize_proxy_url(&long).is_err());
        assert!(normalize_proxy_url(&"a".repeat(63)).is_ok());
    }

    fn full_policy() -> ClusterConsolePolicySpec {
        ClusterConsolePolicySpec {
            default_proxy: url("global.example"),
            clusters: vec![
                cluster("inherits", None, vec![pool("p-inherit", None), pool("p-own", url("pool.example:9000"))]),
                cluster(
                    "own",
                    url("http://cluster.example:3000"),
                    vec![pool("q-inherit", None), pool("q-direct", direct()), pool("q-ref", spx("ns", "edge"))],
                ),
                cluster("direct", direct(), vec![pool("r-inherit", None), pool("r-own", url("pool2.example"))]),
            ],
            vm_opt_outs: vec![VmOptOut { name: "vm-42".into(), cluster: "own".into(), pool: Some("q-inherit".into()) }],
        }
    }

    #[test]
    fn every_level_and_its_precedence() {
        let proxies = dir(&[("ns", "edge", Ok("http://edge.example:3128"))]);
        let r = resolve(&full_policy(), &proxies);
        assert_eq!(r.default_proxy_url.as_deref(), Some("http://global.example:3128"));

        let c = find(&r.clusters, "inherits");
        assert_eq!((c.proxy_url.as_deref(), c.source, c.proxy_configured), (Some("http://global.example:3128"), Source::Global, true));
        let c = find(&r.clusters, "own");
        assert_eq!((c.proxy_url.as_deref(), c.source), (Some("http://cluster.example:3000"), Source::Cluster));
        let c = find(&r.clusters, "direct");
        assert_eq!((c.proxy_url.as_deref(), c.source, c.proxy_configured), (None, Source::Cluster, false));

        let expect = [
            ("p-inherit", Some("http://global.example:3128"), Source::Global),
            ("p-own", Some("http://pool.example:9000"), Source::Pool),
            ("q-inherit", Some("http://cluster.example:3000"), Source::Cluster),
            ("q-direct", None, Source::Pool),
            ("q-ref", Some("http://edge.example:3128"), Source::Pool),
            ("r-inherit", None, Source::Cluster),
            ("r-own", Some("http://pool2.example:3128"), Source::Pool),
        ];
        assert_eq!(r.pools.len(), expect.len());
        for (name, url, source) in expect {
            let p = find(&r.pools, name);
            assert_eq!((p.proxy_url.as_deref(), p.source, p.proxy_configured), (url, source, url.is_some()), "pool {name}");
            assert_eq!(p.error, None, "pool {name}");
            assert!(p.cluster.is_some());
        }
        let vm = find(&r.vms, "vm-42");
        assert_eq!((vm.proxy_url.as_deref(), vm.source, vm.proxy_configured), (None, Source::Vm, false));
        assert_eq!((vm.cluster.as_deref(), vm.pool.as_deref()), (Some("own"), Some("q-inherit")));
        assert_eq!(r.errors().count(), 0);
    }

    #[test]
    fn nothing_configured_means_source_none() {
        let spec = ClusterConsolePolicySpec {
            clusters: vec![cluster("c", None, vec![pool("p", None)])],
            ..Default::default()
        };
        let r = resolve(&spec, &empty());
        for e in r.entries() {
            assert_eq!((e.proxy_url.as_deref(), e.source, e.proxy_configured, e.error.as_deref()), (None, Source::None, false, None));
        }
        assert_eq!(r.default_proxy_url, None);
    }

    #[test]
    fn direct_global_means_no_proxy_from_global() {
        let spec = ClusterConsolePolicySpec {
            default_proxy: direct(),
            clusters: vec![cluster("c", None, vec![pool("p", None), pool("q", url("q.example"))])],
            ..Default::default()
        };
        let r = resolve(&spec, &empty());
        assert_eq!((find(&r.pools, "p").source, find(&r.pools, "p").proxy_url.clone()), (Source::Global, None));
        assert_eq!(find(&r.pools, "q").proxy_url.as_deref(), Some("http://q.example:3128"));
    }

    #[test]
    fn missing_or_unready_reference_fails_without_fallback() {
        let spec = ClusterConsolePolicySpec {
            default_proxy: url("global.example"),
            clusters: vec![cluster(
                "c",
                spx("ns", "missing"),
                vec![pool("inherit", None), pool("unready", spx("ns", "slow")), pool("fine", url("ok.example"))],
            )],
            ..Default::default()
        };
        let proxies = dir(&[("ns", "slow", Err("is not Ready (Progressing: 0/1 replicas ready)"))]);
        let r = resolve(&spec, &proxies);
        let c = find(&r.clusters, "c");
        assert_eq!((c.proxy_url.clone(), c.source, c.proxy_configured), (None, Source::Cluster, false));
        assert_eq!(c.error.as_deref(), Some("SpiceProxy ns/missing does not exist"));
        let p = find(&r.pools, "inherit");
        assert_eq!((p.proxy_url.clone(), p.source), (None, Source::Cluster), "must not fall back to global");
        assert!(p.error.as_deref().unwrap().contains("ns/missing"));
        let p = find(&r.pools, "unready");
        assert_eq!(p.source, Source::Pool);
        assert!(p.error.as_deref().unwrap().contains("is not Ready"), "{:?}", p.error);
        let p = find(&r.pools, "fine");
        assert_eq!((p.proxy_url.as_deref(), p.error.clone()), (Some("http://ok.example:3128"), None));
        assert_eq!(r.errors().count(), 3);
    }

    #[test]
    fn bad_url_at_one_level_leaves_other_entries_resolved() {
        let spec = ClusterConsolePolicySpec {
            default_proxy: url("global.example"),
            clusters: vec![
                cluster("bad", url("https://secure.example"), vec![pool("b1", None)]),
                cluster("good", None, vec![pool("g1", None), pool("v6", url("[fd00::1]:3128"))]),
            ],
            ..Default::default()
        };
        let r = resolve(&spec, &empty());
        let b = find(&r.pools, "b1");
        assert_eq!((b.proxy_url.clone(), b.source), (None, Source::Cluster));
        assert!(b.error.as_deref().unwrap().contains("connect directly"));
        assert_eq!(find(&r.pools, "g1").proxy_url.as_deref(), Some("http://global.example:3128"));
        assert!(find(&r.pools, "v6").error.as_deref().unwrap().contains("IPv6"));
    }

    #[test]
    fn unusable_spice_proxy_url_is_not_published() {
        let spec = ClusterConsolePolicySpec { default_proxy: spx("ns", "v6"), ..Default::default() };
        let spec = ClusterConsolePolicySpec { clusters: vec![cluster("c", None, vec![])], ..spec };
        let r = resolve(&spec, &dir(&[("ns", "v6", Ok("http://[fd00::1]:3128"))]));
        assert_eq!(r.default_proxy_url, None);
        assert!(find(&r.clusters, "c").error.as_deref().unwrap().contains("IPv6"));
    }

    #[test]
    fn choice_with_several_or_no_fields_is_unusable() {
        let both = ProxyChoice { url: Some("a".into()), direct: Some(true), ..Default::default() };
        assert!(matches!(evaluate(&both, &empty()), Effective::Unusable(_)));
        assert!(matches!(evaluate(&ProxyChoice::default(), &empty()), Effective::Unusable(_)));
        let direct_false = ProxyChoice { direct: Some(false), ..Default::default() };
        assert!(matches!(evaluate(&direct_false, &empty()), Effective::Unusable(_)));
    }

    #[test]
    fn vm_opt_out_wins_and_unknown_places_are_reported() {
        let mut spec = full_policy();
        spec.vm_opt_outs = vec![
            VmOptOut { name: "in-cluster".into(), cluster: "inherits".into(), pool: None },
            VmOptOut { name: "ghost-cluster".into(), cluster: "nope".into(), pool: None },
            VmOptOut { name: "ghost-pool".into(), cluster: "own".into(), pool: Some("p-inherit".into()) },
        ];
        let r = resolve(&spec, &dir(&[("ns", "edge", Ok("http://edge.example:3128"))]));
        let v = find(&r.vms, "in-cluster");
        assert_eq!((v.proxy_url.clone(), v.source, v.error.clone()), (None, Source::Vm, None));
        assert!(find(&r.vms, "ghost-cluster").error.as_deref().unwrap().contains("\"nope\""));
        assert!(find(&r.vms, "ghost-pool").error.as_deref().unwrap().contains("\"p-inherit\""));
    }

    #[test]
    fn every_reference_is_found_for_the_watch_mapping() {
        let refs: Vec<_> = full_policy().proxy_refs().cloned().collect();
        assert_eq!(refs, vec![SpiceProxyRef { name: "edge".into(), namespace: "ns".into() }]);
    }
}
