//! Prometheus metrics of the operator, served on `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::conditions;
use crate::crd::{ClusterConsolePolicy, SpiceProxy};
use crate::listener::WaitingMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabel {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: String,
}

/// An engine API request: its route and the HTTP status of the answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineRequestLabel {
    pub route: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ControllerLabel, Counter>,
    pub failures: Family<ControllerLabel, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
    /// Every HTTP request the operator sends to the Kubernetes API, by method.
    pub api_requests: Family<RequestLabel, Counter<u64, AtomicU64>>,
    /// 1 while this process holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// Watches that failed and are being retried, by kind: a missing RBAC rule shows here.
    pub watch_failures: Family<KindLabel, Counter>,
    /// Kubernetes Events the API server refused (the status still says everything).
    pub event_failures: Counter,
    /// Engine API requests by route and answer (a console issued is a 200 on /v1/console).
    pub engine_requests: Family<EngineRequestLabel, Counter>,
    pub engine_duration: Family<RouteLabel, Histogram>,
    /// TokenReviews and SubjectAccessReviews the engine API sent (recent yes answers are reused).
    pub engine_reviews: Family<KindLabel, Counter>,
    /// The notAfter of the certificate the engine API serves (0 while it serves none), for an
    /// alert before it expires.
    pub engine_api_cert_expiry: Gauge,
    /// Engine API connections open now, and closed to make room for a newer one because
    /// `--api-max-connections` were open (`listener::Waiting`).
    pub engine_connections: WaitingMetrics,
    pub admin_connections: WaitingMetrics,
    /// Per object, from the caches at each scrape (so deleted objects drop out): what alerts
    /// need without a kube-state-metrics configuration for our CRDs.
    spiceproxy_ready: Family<ProxyLabel, Gauge>,
    spiceproxy_degraded: Family<ProxyLabel, Gauge>,
    spiceproxy_desired: Family<ProxyLabel, Gauge>,
    policy_ready: Family<PolicyLabel, Gauge>,
    policy_unresolved: Family<PolicyLabel, Gauge>,
    /// The caches those come from, once the controllers run (a standby has none).
    proxies: OnceLock<Store<DeserializeGuard<SpiceProxy>>>,
    policies: OnceLock<Store<DeserializeGuard<ClusterConsolePolicy>>>,
    /// One scrape at a time: each refills the per-object gauges before encoding them.
    scraping: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("spice_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<ControllerLabel, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let api_requests = Family::<RequestLabel, Counter<u64, AtomicU64>>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed", failures.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", duration.clone());
        registry.register("kube_api_requests", "Requests sent to the Kubernetes API", api_requests.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this process is the leader that reconciles", leader.clone());
        let watch_failures = Family::<KindLabel, Counter>::default();
        registry.register("watch_failures", "Watches that failed and are retried with backoff, by kind", watch_failures.clone());
        let event_failures = Counter::default();
        registry.register("event_failures", "Kubernetes Events that could not be published", event_failures.clone());
        let engine_requests = Family::<EngineRequestLabel, Counter>::default();
        registry.register("engine_requests", "Engine API requests by route and HTTP status of the answer", engine_requests.clone());
        let engine_duration = Family::<RouteLabel, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 14)));
        registry.register("engine_request_duration_seconds", "Time to answer one engine API request, by route", engine_duration.clone());
        let engine_reviews = Family::<KindLabel, Counter>::default();
        registry.register("engine_reviews", "TokenReviews and SubjectAccessReviews the engine API sent, by kind", engine_reviews.clone());
        let engine_api_cert_expiry = Gauge::default();
        registry.register("engine_api_certificate_expiry_timestamp_seconds", "When the certificate the engine API serves expires (seconds since the epoch; 0 while it serves none)", engine_api_cert_expiry.clone());
        let engine_connections = WaitingMetrics::register(
            &mut registry,
            "engine_connections",
            "Engine API connections closed to make room for a newer one because --api-max-connections (engineApi.maxConnections) were open",
            "Engine API connections open now",
        );
        let admin_connections = crate::admin::register_connections(&mut registry);
        let spiceproxy_ready = Family::<ProxyLabel, Gauge>::default();
        registry.register("spiceproxy_ready", "1 while the SpiceProxy's Ready condition is True", spiceproxy_ready.clone());
        let spiceproxy_degraded = Family::<ProxyLabel, Gauge>::default();
        registry.register("spiceproxy_degraded", "1 while the SpiceProxy's Degraded condition is True (or it cannot be decoded)", spiceproxy_degraded.clone());
        let spiceproxy_desired = Family::<ProxyLabel, Gauge>::default();
        registry.register("spiceproxy_desired_replicas", "spec.replicas of the SpiceProxy (0: scaled to zero on purpose, not ready by design)", spiceproxy_desired.clone());
        let policy_ready = Family::<PolicyLabel, Gauge>::default();
        registry.register("policy_ready", "1 while every entry of the ClusterConsolePolicy resolves", policy_ready.clone());
        let policy_unresolved = Family::<PolicyLabel, Gauge>::default();
        registry.register("policy_unresolved_entries", "Clusters, pools and VMs of the ClusterConsolePolicy without a usable proxy", policy_unresolved.clone());
        registry.register("audit_lines_dropped", "Audit lines (issued tickets) lost because stdout did not take them as fast as they came", crate::log_queue::stdout().dropped());
        registry.register("log_lines_dropped", "Log lines (stderr) lost because stderr did not take them as fast as they came", crate::log_queue::stderr_dropped());
        Self {
            registry,
            reconciles,
            failures,
            duration,
            api_requests,
            leader,
            watch_failures,
            event_failures,
            engine_requests,
            engine_duration,
            engine_reviews,
            engine_api_cert_expiry,
            engine_connections,
            admin_connections,
            spiceproxy_ready,
            spiceproxy_degraded,
            spiceproxy_desired,
            policy_ready,
            policy_unresolved,
            proxies: OnceLock::new(),
            policies: OnceLock::new(),
            scraping: Mutex::new(()),
        }
    }
}

impl Metrics {
    /// The SpiceProxy cache the per-proxy gauges are read from (the first one given counts).
    pub fn report_proxies(&self, store: Store<DeserializeGuard<SpiceProxy>>) {
        let _ = self.proxies.set(store);
    }

    pub fn report_policies(&self, store: Store<DeserializeGuard<ClusterConsolePolicy>>) {
        let _ = self.policies.set(store);
    }

    /// Refills the per-object gauges from the caches: a deleted object has no series.
    fn refresh_objects(&self) {
        self.spiceproxy_ready.clear();
        self.spiceproxy_degraded.clear();
        self.spiceproxy_desired.clear();
        for guard in self.proxies.get().map(Store::state).unwrap_or_default() {
            let (meta, conditions, desired) = match &guard.0 {
                Ok(spx) => (&spx.metadata, spx.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default(), spx.spec.replicas),
                Err(invalid) => (&invalid.metadata, &[][..], 0),
            };
            let label = ProxyLabel { namespace: meta.namespace.clone().unwrap_or_default(), name: meta.name.clone().unwrap_or_default() };
            self.spiceproxy_ready.get_or_create(&label).set(i64::from(conditions::is_true(conditions, "Ready")));
            self.spiceproxy_degraded.get_or_create(&label).set(i64::from(guard.0.is_err() || conditions::is_true(conditions, "Degraded")));
            self.spiceproxy_desired.get_or_create(&label).set(i64::from(desired));
        }
        self.policy_ready.clear();
        self.policy_unresolved.clear();
        for guard in self.policies.get().map(Store::state).unwrap_or_default() {
            // Borrowed, not cloned: a policy's status lists every pool.
            let (meta, status) = match &guard.0 {
                Ok(p) => (&p.metadata, p.status.as_ref()),
                Err(invalid) => (&invalid.metadata, None),
            };
            let label = PolicyLabel { policy: meta.name.clone().unwrap_or_default() };
            let ready = status.is_some_and(|s| conditions::is_true(&s.conditions, "Ready"));
            self.policy_ready.get_or_create(&label).set(i64::from(ready));
            self.policy_unresolved.get_or_create(&label).set(i64::from(status.map_or(0, |s| s.unresolved)));
        }
    }

    pub fn encode(&self) -> String {
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.refresh_objects();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn api_request_total(&self) -> u64 {
        ["GET", "POST", "PUT", "PATCH", "DELETE"]
            .iter()
            .map(|v| self.api_requests.get_or_create(&RequestLabel { verb: v.to_string() }).get())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn proxy(name: &str, ready: bool, degraded: bool) -> DeserializeGuard<SpiceProxy> {
        let yaml = format!("apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {{name: {name}, namespace: vdi}}\nspec:\n  allowedTargets: [{{cidr: 10.0.0.0/8, ports: [{{from: 5900}}]}}]\n");
        let mut spx: SpiceProxy = serde_yaml::from_str(&yaml).unwrap();
        spx.status = Some(crate::crd::SpiceProxyStatus {
            conditions: vec![conditions::new("Ready", ready, "R", "", None), conditions::new("Degraded", degraded, "D", "", None)],
            ..Default::default()
        });
        DeserializeGuard(Ok(spx))
    }

    #[test]
    fn admin_connections_are_counted_under_the_operators_prefix() {
        let metrics = Metrics::default();
        metrics.admin_connections.closed.inc();
        metrics.admin_connections.open.set(3);
        let text = metrics.encode();
        assert!(text.lines().any(|l| l == "spice_operator_admin_connections_closed_total 1"), "{text}");
        assert!(text.lines().any(|l| l == "spice_operator_admin_connections 3"), "{text}");
    }

    #[test]
    fn per_object_gauges_follow_the_caches_and_drop_deleted_objects() {
        let metrics = Metrics::default();
        assert!(!metrics.encode().contains("spiceproxy_ready{"), "no series before the controllers run");
        let (proxies, mut writer) = reflector::store::<DeserializeGuard<SpiceProxy>>();
        metrics.report_proxies(proxies);
        writer.apply_watcher_event(&watcher::Event::Apply(proxy("edge", true, false)));
        writer.apply_watcher_event(&watcher::Event::Apply(proxy("stuck", false, true)));
        let (policies, mut policy_writer) = reflector::store::<DeserializeGuard<ClusterConsolePolicy>>();
        metrics.report_policies(policies);
        let mut policy: ClusterConsolePolicy = serde_yaml::from_str("apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {name: default}\nspec: {}\n").unwrap();
        policy.status = Some(crate::crd::ClusterConsolePolicyStatus { unresolved: 2, conditions: vec![conditions::new("Ready", false, "UnresolvedEntries", "", None)], ..Default::default() });
        policy_writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(policy))));

        let text = metrics.encode();
        for line in [
            "spice_operator_spiceproxy_ready{namespace=\"vdi\",name=\"edge\"} 1",
            "spice_operator_spiceproxy_degraded{namespace=\"vdi\",name=\"edge\"} 0",
            "spice_operator_spiceproxy_desired_replicas{namespace=\"vdi\",name=\"edge\"} 1",
            "spice_operator_spiceproxy_ready{namespace=\"vdi\",name=\"stuck\"} 0",
            "spice_operator_spiceproxy_degraded{namespace=\"vdi\",name=\"stuck\"} 1",
            "spice_operator_policy_ready{policy=\"default\"} 0",
            "spice_operator_policy_unresolved_entries{policy=\"default\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        writer.apply_watcher_event(&watcher::Event::Delete(proxy("stuck", false, true)));
        let text = metrics.encode();
        assert!(!text.contains("name=\"stuck\""), "a deleted SpiceProxy keeps no series:\n{text}");
        assert!(text.contains("spice_operator_spiceproxy_ready{namespace=\"vdi\",name=\"edge\"} 1"));
    }
}
