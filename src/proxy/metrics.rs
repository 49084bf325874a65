//! Prometheus metrics of a proxy replica.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use crate::listener::WaitingMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ending {
    pub reason: &'static str,
}

/// Why an open tunnel ended: both sides closed, the idle or half-closed timeout, the drain
/// deadline, or an error on either side (a reset, or a peer the keepalive found dead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Finished,
    Idle,
    HalfClosed,
    Drained,
    /// A new allow-list no longer listed the target.
    Revoked,
    Error,
}

impl End {
    const ALL: [End; 6] = [End::Finished, End::Idle, End::HalfClosed, End::Drained, End::Revoked, End::Error];
    fn label(self) -> &'static str {
        match self {
            End::Finished => "finished",
            End::Idle => "idle",
            End::HalfClosed => "half_closed",
            End::Drained => "drained",
            End::Revoked => "revoked",
            End::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

pub struct ProxyMetrics {
    registry: Registry,
    pub active: Gauge,
    pub tunnels: Family<Outcome, Counter>,
    pub bytes: Family<Direction, Counter>,
    pub handshake: Histogram,
    /// The series every tunnel touches, looked up once rather than per tunnel.
    pub tunnels_ok: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    /// Bytes (either way) that moved by splice(2), a subset of `bytes`.
    pub spliced: Counter,
    /// One series per `End`, indexed by it, created up front.
    ends: [Counter; End::ALL.len()],
    /// Clients locked out after too many failed authentications (someone guessing).
    pub auth_lockouts: Counter,
    /// Tunnels open at once before 503: `maxTunnels`, or fewer where the open-files limit is lower.
    pub tunnel_limit: Gauge,
    /// The notAfter of the browser-side certificate (0 without one), for an alert before it expires.
    pub tls_cert_expiry: Gauge,
    /// When the last hypervisor CA certificate (html5.upstreamTls) expires (0 without one).
    pub hypervisor_ca_expiry: Gauge,
    /// Browser-port connections open now that are not (yet) bridges, and those closed to make
    /// room for a newer one.
    pub html5_waiting_connections: WaitingMetrics,
    /// CONNECT-port connections waiting for their request to be accepted now, and those told
    /// to close before it was, to make room for a newer one (`listener::Waiting`).
    pub waiting_connections: WaitingMetrics,
    pub admin_connections: WaitingMetrics,
    /// Changed configuration files read while running: applied (their allow-list or live
    /// limits) or refused.
    pub config_reloads: Family<Outcome, Counter>,
    /// Rules in the allow-list in use.
    pub allow_list_rules: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("spice_proxy");
        let active = Gauge::default();
        let tunnels = Family::<Outcome, Counter>::default();
        let bytes = Family::<Direction, Counter>::default();
        let handshake = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register("active_tunnels", "Tunnels open now", active.clone());
        let tunnel_limit = Gauge::default();
        registry.register("tunnel_limit", "Tunnels open at once before 503: maxTunnels, or fewer where the open-files limit is lower", tunnel_limit.clone());
        registry.register("tunnels", "Tunnel requests by outcome (ok, or the HTTP status refused with)", tunnels.clone());
        registry.register("bytes", "Bytes moved, client_to_server (up) and server_to_client (down)", bytes.clone());
        let spliced = Counter::default();
        registry.register("spliced_bytes", "Bytes of those that moved by splice(2), never entering user space", spliced.clone());
        registry.register("handshake_seconds", "Time from accept to the 200 reply", handshake.clone());
        let tunnels_ok = tunnels.get_or_create(&Outcome { outcome: "ok" }).clone();
        let bytes_up = bytes.get_or_create(&Direction { direction: "up" }).clone();
        let bytes_down = bytes.get_or_create(&Direction { direction: "down" }).clone();
        let ended = Family::<Ending, Counter>::default();
        registry.register("tunnel_ends", "Tunnels that were open, by why they ended: finished, idle, half_closed, drained, revoked (target taken off the allow-list), error", ended.clone());
        let ends = End::ALL.map(|end| ended.get_or_create(&Ending { reason: end.label() }).clone());
        let auth_lockouts = Counter::default();
        registry.register("auth_lockouts", "Clients locked out (429) after too many failed authentications", auth_lockouts.clone());
        registry.register("audit_lines_dropped", "Audit lines lost because stdout did not take them as fast as they came (the log says how many, where)", crate::log_queue::stdout().dropped());
        registry.register("log_lines_dropped", "Log lines (stderr) lost because stderr did not take them as fast as they came (the log says how many, where)", crate::log_queue::stderr_dropped());
        let tls_cert_expiry = Gauge::default();
        registry.register("tls_certificate_expiry_timestamp_seconds", "When the browser-side certificate (html5.tlsSecret) expires (seconds since the epoch; 0 without one)", tls_cert_expiry.clone());
        let hypervisor_ca_expiry = Gauge::default();
        registry.register(
            "hypervisor_ca_expiry_timestamp_seconds",
            "When the last of the hypervisor CA certificates (html5.upstreamTls.caSecret) expires (seconds since the epoch; 0 without them)",
            hypervisor_ca_expiry.clone(),
        );
        let html5_waiting_connections = WaitingMetrics::register(
            &mut registry,
            "html5_waiting_connections",
            "Browser-port connections that were not bridges, closed before a request of theirs was being answered, to make room for a newer one: as many were open as the tunnel limit (a flood of slow or silent connections)",
            "Browser-port connections open now that are not bridges (TLS handshakes, page requests, WebSocket handshakes, kept-alive connections)",
        );
        let waiting_connections = WaitingMetrics::register(
            &mut registry,
            "waiting_connections",
            "CONNECT-port connections closed (408) before their request was accepted, to make room for a newer one: as many were waiting for theirs as the tunnel limit (a flood of slow or silent connections)",
            "CONNECT-port connections open now whose request is not yet read and authorised (they hold no tunnel place)",
        );
        let admin_connections = crate::admin::register_connections(&mut registry);
        let config_reloads = Family::<Outcome, Counter>::default();
        // Both series from the start, so an alert on refusals has a zero to compare with.
        for outcome in ["applied", "refused"] {
            let _ = config_reloads.get_or_create(&Outcome { outcome });
        }
        registry.register(
            "config_reloads",
            "Changed configuration files read while running, by outcome: applied (a new allow-list or new live limits in use), or refused (the file could not be used; what is in use stays)",
            config_reloads.clone(),
        );
        let allow_list_rules = Gauge::default();
        registry.register("allow_list_rules", "Rules in the allow-list in use", allow_list_rules.clone());
        Self {
            registry,
            active,
            tunnels,
            bytes,
            handshake,
            tunnels_ok,
            bytes_up,
            bytes_down,
            spliced,
            ends,
            auth_lockouts,
            tunnel_limit,
            tls_cert_expiry,
            hypervisor_ca_expiry,
            html5_waiting_connections,
            waiting_connections,
            admin_connections,
            config_reloads,
            allow_list_rules,
        }
    }
}

impl ProxyMetrics {
    /// Counts an open tunnel's end.
    pub fn ended(&self, end: End) {
        self.ends[end as usize].inc();
    }
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_is_counted_under_its_own_reason() {
        let m = ProxyMetrics::default();
        for (n, end) in End::ALL.into_iter().enumerate() {
            (0..=n).for_each(|_| m.ended(end));
        }
        let text = m.encode();
        for (n, end) in End::ALL.into_iter().enumerate() {
            let series = format!("spice_proxy_tunnel_ends_total{{reason=\"{}\"}} {}", end.label(), n + 1);
            assert!(text.lines().any(|l| l == series), "{series} missing from\n{text}");
        }
    }
}
