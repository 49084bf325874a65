//! Prometheus metrics of the operator, served on `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: String,
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
        Self { registry, reconciles, failures, duration, api_requests, leader, watch_failures, event_failures }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
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
