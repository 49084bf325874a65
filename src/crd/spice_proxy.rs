use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One built-in SPICE proxy: the operator runs it as a Deployment plus Service and
/// reports the URL clients must use in `status.proxyUrl`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "console.spice-operator.io",
    version = "v1alpha1",
    kind = "SpiceProxy",
    plural = "spiceproxies",
    shortname = "spx",
    category = "spice",
    namespaced,
    status = "SpiceProxyStatus",
    // kubectl scale and HorizontalPodAutoscalers work on a SpiceProxy as on a Deployment.
    scale(spec_replicas_path = ".spec.replicas", status_replicas_path = ".status.replicas", label_selector_path = ".status.selector"),
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.proxyUrl"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.service) || !has(self.service.externalTrafficPolicy) || self.service.externalTrafficPolicy != 'Local' || self.service.type != 'NodePort' || has(self.externalAddress)",
     "message": "service.externalTrafficPolicy Local with type NodePort needs externalAddress: only nodes running a proxy replica answer, and the operator cannot know which those will be"}
]))]
pub struct SpiceProxySpec {
    /// Proxy pods to run. Every replica accepts the same tickets (shared key Secret).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// The Service in front of the proxy pods (default: ClusterIP on port 3128).
    #[serde(default)]
    pub service: ServiceSpec,

    /// Address SPICE clients use to reach the proxy. When absent it is derived from the
    /// LoadBalancer ingress, a node address (NodePort) or the in-cluster Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_address: Option<ExternalAddress>,

    /// Hypervisor targets tunnels may reach. Required and non-empty: the proxy is never open.
    /// A change rolls no pods: running replicas use it within about a minute (the kubelet's
    /// ConfigMap sync) and close open tunnels to targets it no longer lists.
    #[schemars(length(min = 1, max = 256))]
    pub allowed_targets: Vec<TargetRule>,

    /// How tunnels are authorised (default: mode Ticket).
    #[serde(default)]
    pub auth: AuthSpec,

    /// Limits and timeouts of every proxy replica. A change of maxTunnels,
    /// maxTunnelsPerClient, idleTimeoutSeconds, halfClosedTimeoutSeconds,
    /// connectTimeoutSeconds, maxAuthFailuresPerClient or authFailureWindowSeconds rolls no
    /// pods: running replicas use it within about a minute, for the tunnels opened from then
    /// on (open tunnels beyond a lowered limit stay open); the two idle timeouts apply to open
    /// tunnels as well, counted from their last activity. A change of the others rolls the
    /// pods.
    #[serde(default)]
    pub limits: ProxyLimits,

    /// The TCP sockets toward clients: send buffer and congestion control (default: the
    /// node's).
    #[serde(default)]
    pub client_socket: ClientSocketSpec,

    /// The browser console path: spice-html5 pages and a WebSocket bridge on their own port,
    /// like OpenStack's spicehtml5proxy. Absent: off. Needs auth mode Ticket (the token in
    /// the console URL names the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html5: Option<Html5Spec>,

    /// A NetworkPolicy that lets the proxy pods connect only to `allowedTargets` (and DNS).
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Container image of the proxy; defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Secrets in this namespace with the registry credentials to pull the proxy image, when
    /// it lives in a private registry (the operator's own pull secrets are in its namespace,
    /// which pods here cannot use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,

    /// Extra annotations on the proxy pods (a service mesh's opt-out, a scrape annotation...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Extra labels on the proxy pods; the operator's own `app.kubernetes.io/*` keys are taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// PriorityClass of the proxy pods, so consoles survive eviction under pressure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// CPU and memory of the proxy container (as in a PodSpec); the proxy runs one worker per
    /// CPU of its limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Nodes the proxy pods may run on (as in a PodSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the proxy pods tolerate (as in a PodSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod affinity of the proxy pods (as in a PodSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How replicas spread over nodes, zones... (as in a PodSpec). Absent: one replica per node
    /// where possible. An entry without `labelSelector` counts this proxy's own pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

fn default_replicas() -> i32 {
    1
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.nodePort) || self.type == 'NodePort' || self.type == 'LoadBalancer'",
     "message": "nodePort needs service type NodePort or LoadBalancer"},
    {"rule": "!has(self.externalTrafficPolicy) || self.type == 'NodePort' || self.type == 'LoadBalancer'",
     "message": "externalTrafficPolicy needs service type NodePort or LoadBalancer"}
]))]
pub struct ServiceSpec {
    /// ClusterIP (default), NodePort or LoadBalancer, as a Service's type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Service port of the CONNECT proxy. 3128 is what SPICE clients assume for http://.
    #[serde(default = "default_proxy_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Fixed node port (NodePort/LoadBalancer); allocated by Kubernetes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,
    /// Annotations of the Service (a cloud load balancer's settings, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// How traffic from outside reaches the proxy pods (NodePort, LoadBalancer). `Local` keeps
    /// the client's address, which the per-client limit and the audit lines rely on: with
    /// `Cluster`, a node forwarding to a pod elsewhere replaces it with its own, so every
    /// client arriving there shares one per-client count. Default: `Local` for LoadBalancer
    /// (load balancers send only to nodes running a replica), `Cluster` for NodePort (its URL
    /// names one node, which may run none; `Local` with NodePort needs `externalAddress`).
    // Absent, not null, means the default (a null in the enum is no value Kubernetes knows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "TrafficPolicy")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// The load balancer in front of the Service sends the PROXY protocol (v1 or v2; e.g. the
    /// `service.beta.kubernetes.io/aws-load-balancer-proxy-protocol: "*"` annotation), naming
    /// each client, where `Local` cannot keep the client's address. The proxy then accepts
    /// connections only from `trustedCidrs`, each beginning with a header; any other source
    /// could name any address and so escape the per-client limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// The Service's IP families, as its `ipFamilyPolicy`: `SingleStack` (the cluster's first
    /// family; also when absent), `PreferDualStack` or `RequireDualStack`. In a
    /// dual-stack cluster whose first family is IPv6, `PreferDualStack` gets a load balancer the
    /// IPv4 address SPICE clients need (they cannot use an IPv6 literal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "IpFamilyPolicy")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProtocolSpec {
    /// Addresses the load balancers (their health checkers included) connect from, as the
    /// proxy sees them: with `externalTrafficPolicy: Cluster` a node may forward in their place,
    /// so list the nodes' addresses too. A change rolls no pods: running replicas trust the
    /// new list within about a minute, for the next connections.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 64)))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.all(c, isCIDR(c))", "message": "every entry must be a CIDR such as 10.0.0.0/16"}
    ]))]
    pub trusted_cidrs: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl ServiceSpec {
    /// The policy the Service gets: none for ClusterIP, else the one set or the type's default.
    pub fn effective_traffic_policy(&self) -> Option<TrafficPolicy> {
        match self.type_ {
            ServiceType::ClusterIP => None,
            ServiceType::NodePort => Some(self.external_traffic_policy.unwrap_or(TrafficPolicy::Cluster)),
            ServiceType::LoadBalancer => Some(self.external_traffic_policy.unwrap_or(TrafficPolicy::Local)),
        }
    }
}

pub const DEFAULT_PROXY_PORT: i32 = 3128;
fn default_proxy_port() -> i32 {
    DEFAULT_PROXY_PORT
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self { type_: ServiceType::default(), port: DEFAULT_PROXY_PORT, node_port: None, annotations: None, external_traffic_policy: None, proxy_protocol: None, ip_family_policy: None }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Html5Spec {
    /// Service port of the browser path; 6082 as nova's spicehtml5proxy.
    #[serde(default = "default_html5_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Fixed node port (NodePort/LoadBalancer); allocated by Kubernetes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,
    /// Port browsers use when it differs (externalAddress host, e.g. behind a load balancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub external_port: Option<i32>,
    /// Origins (scheme://host[:port]), besides the console page's own, whose pages may open the
    /// WebSocket or show the console in a frame (e.g. an engine portal embedding the console).
    /// Anything else gets 403, and no other page may frame it. A change rolls no pods: running
    /// replicas use it within about a minute, for the next consoles opened.
    #[serde(default)]
    #[schemars(length(max = 20))]
    pub allowed_origins: Vec<String>,
    /// A kubernetes.io/tls Secret in this namespace: serve https:// and wss:// with it.
    /// Absent: plain ws://, and console tokens travel in clear (a condition says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret: Option<String>,
    /// Reach the hypervisors' SPICE tls-port with TLS (the browser cannot do SPICE TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<UpstreamTlsSpec>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTlsSpec {
    /// A Secret in this namespace whose `ca.crt` signed the hypervisors' SPICE certificates
    /// (one CA or several; read again as the Secret changes, so a rotation needs no restart).
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret: String,
    /// Check the certificate's subject instead of its name, e.g. `O=example,CN=host1`
    /// (spice-gtk's host-subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub host_subject: Option<String>,
}

pub const DEFAULT_HTML5_PORT: i32 = 6082;
fn default_html5_port() -> i32 {
    DEFAULT_HTML5_PORT
}

/// Host (DNS name or IPv4 address) and port clients connect to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalAddress {
    /// DNS name or IPv4 address, without scheme or port.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Defaults to the node port (NodePort) or the Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Defence in depth beside the proxy's own allow-list: even a compromised replica reaches
/// nothing but the hypervisors. Takes effect where the network plugin enforces NetworkPolicies;
/// only egress is restricted (clients and load balancers reach the pods as before).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy (default true). False deletes one made before.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

fn enabled() -> bool {
    true
}

/// Targets a tunnel may reach: an address block and the ports allowed in it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRule {
    /// IPv4 or IPv6 CIDR, e.g. 10.0.0.0/16. A single address needs /32 or /128.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isCIDR(self)", "message": "must be a CIDR such as 10.0.0.0/16"}
    ]))]
    #[schemars(length(min = 1, max = 64))]
    pub cidr: String,
    /// Port ranges in that block; SPICE servers listen on 5900-6923 by default.
    #[schemars(length(min = 1, max = 64))]
    pub ports: Vec<PortRange>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.to) || self.to >= self.from", "message": "to must not be below from"}
]))]
pub struct PortRange {
    /// First port, inclusive.
    #[schemars(range(min = 1, max = 65535))]
    pub from: i32,
    /// Last port, inclusive; defaults to `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub to: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AuthMode {
    /// Signed, target-bound, expiring tickets carried as the Basic password (default).
    #[default]
    Ticket,
    /// Fixed credentials from a Secret.
    Basic,
    /// No authentication; must be chosen explicitly. The allow-list still applies.
    None,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'Basic' || has(self.credentialsSecret)",
     "message": "auth mode Basic needs credentialsSecret (keys username and password)"}
]))]
pub struct AuthSpec {
    /// Ticket (default), Basic or None.
    #[serde(default)]
    pub mode: AuthMode,
    /// Secret in the same namespace with keys `username` and `password` (mode Basic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Limits and timeouts; every one has a default that is safe for SPICE.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyLimits {
    /// Concurrent tunnels per replica.
    #[serde(default = "d_max_tunnels")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_tunnels: i32,
    /// Concurrent tunnels per client and replica. A client is an IPv4 address or an IPv6 /64
    /// (a host may use any address in its /64).
    #[serde(default = "d_max_per_client")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_tunnels_per_client: i32,
    /// Idle time before a tunnel is closed. SPICE servers ping inputs and cursor channels
    /// only every 300 s, so anything shorter silently kills sessions.
    #[serde(default = "d_idle")]
    #[schemars(range(min = 301, max = 604800))]
    pub idle_timeout_seconds: i32,
    /// Time to connect to a hypervisor (and, for the browser bridge with `html5.upstreamTls`,
    /// again for the TLS handshake with it); past it the client gets 504.
    #[serde(default = "d_connect")]
    #[schemars(range(min = 1, max = 300))]
    pub connect_timeout_seconds: i32,
    /// Time a client has to send its complete request head (slowloris guard).
    #[serde(default = "d_head")]
    #[schemars(range(min = 1, max = 300))]
    pub handshake_timeout_seconds: i32,
    /// Time open tunnels get to finish when a pod stops (counted from the end of the
    /// shutdown delay).
    #[serde(default = "d_drain")]
    #[schemars(range(min = 0, max = 86400))]
    pub drain_seconds: i32,
    /// Time a stopping pod goes on accepting new tunnels while it already reports not ready.
    /// Kube-proxy on every node and an external load balancer learn of a pod's removal some
    /// time after the pod itself: connections they send meanwhile (a console opening its
    /// display channel after its main one, a reconnect) would be refused if the proxy stopped
    /// listening at once. Then it stops accepting and drains for `drainSeconds`.
    #[serde(default = "d_shutdown_delay")]
    #[schemars(range(min = 0, max = 300))]
    pub shutdown_delay_seconds: i32,
    /// Time after which a peer that went away without closing (a client's laptop asleep or off
    /// the network, a crashed hypervisor) ends its tunnel: TCP keepalive probes it after
    /// silence, and data it leaves unacknowledged this long closes the tunnel too. Probes come
    /// at least every 60 s, which keeps load balancers' and NATs' idle flows open.
    #[serde(default = "d_dead_peer")]
    #[schemars(range(min = DEAD_PEER_MIN_SECONDS, max = DEAD_PEER_MAX_SECONDS))]
    pub dead_peer_timeout_seconds: i32,
    /// Idle time after which a half-closed tunnel ends: one side sent its FIN (it will send
    /// nothing more) and the other has not closed. Data still moving the other way keeps it
    /// open; without this a peer that never closes would hold the tunnel, and the client's
    /// place, for the whole idle timeout. SPICE peers close both ways at once.
    #[serde(default = "d_half_closed")]
    #[schemars(range(min = 1, max = 604800))]
    pub half_closed_timeout_seconds: i32,
    /// Failed authentications (a wrong Basic password, a forged or mangled ticket) a client may
    /// make within `authFailureWindowSeconds` of its first; the last of them locks it out for
    /// that long: 429 whatever it presents, so credentials cannot be guessed at speed. A
    /// client is an IPv4 address or an IPv6 /64. Expired tickets and missing credentials do
    /// not count. 0 turns it off: only for when every client arrives from one address (a
    /// balancer without the PROXY protocol), where one guesser would lock everyone out.
    #[serde(default = "d_auth_failures")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_auth_failures_per_client: i32,
    /// The time failed authentications are counted over, from a client's first, and how long
    /// the lockout lasts.
    #[serde(default = "d_auth_window")]
    #[schemars(range(min = 1, max = 86400))]
    pub auth_failure_window_seconds: i32,
}

/// The range of `deadPeerTimeoutSeconds`, for the schema, the controller's validation and the
/// proxy's clamp alike: below 10 s the probes would come every second or less, above an hour
/// they would outnumber what the kernel allows (127).
pub const DEAD_PEER_MIN_SECONDS: i32 = 10;
pub const DEAD_PEER_MAX_SECONDS: i32 = 3600;

fn d_max_tunnels() -> i32 {
    10_000
}
fn d_max_per_client() -> i32 {
    256
}
fn d_idle() -> i32 {
    3600
}
fn d_connect() -> i32 {
    10
}
fn d_head() -> i32 {
    10
}
fn d_drain() -> i32 {
    60
}
fn d_shutdown_delay() -> i32 {
    5
}
fn d_dead_peer() -> i32 {
    120
}
fn d_half_closed() -> i32 {
    60
}
fn d_auth_failures() -> i32 {
    10
}
fn d_auth_window() -> i32 {
    300
}
/// The largest `clientSocket.sendBufferBytes`, for the schema, the controller's validation and
/// the proxy's clamp alike.
pub const CLIENT_SEND_BUFFER_MAX: i32 = 16 * 1024 * 1024;

/// The TCP sockets toward SPICE clients, native (CONNECT) and browser alike. Both settings
/// default to the node's own choice; they are set on the listening sockets, which accepted
/// ones inherit, so they cost nothing per tunnel. Measured in docs/proxy-benchmark.md.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSocketSpec {
    /// Send buffer of each client socket (SO_SNDBUF, which the kernel doubles for its
    /// bookkeeping), in bytes; 0 (the default) leaves it to the kernel's autotuning, up to
    /// `net.ipv4.tcp_wmem`'s maximum (often 4 MiB). A size bounds what waits in the kernel for a
    /// slow client: display updates queued there (4 MiB is seconds of lag on a link of a few
    /// Mbit/s) and socket memory, which counts against the pod's memory limit. It also bounds a
    /// display channel to one buffer per round trip (256 KiB: about 80 Mbit/s at 50 ms), and
    /// cost the proxy more CPU per GiB in the benchmark. An ask above `net.core.wmem_max`
    /// (208 KiB unless the node raised it) is cut to it; the proxy logs what it got.
    #[serde(default)]
    #[schemars(range(min = 0, max = CLIENT_SEND_BUFFER_MAX))]
    pub send_buffer_bytes: i32,
    /// TCP congestion control of the client sockets, such as `cubic` or `bbr`; absent: the
    /// node's (`net.ipv4.tcp_congestion_control`). The sending side's algorithm decides how
    /// display data is paced toward clients. `bbr` paces on timers unless the interface has the
    /// `fq` qdisc (a pod's usually has none), which in the benchmark cost the proxy and the
    /// clients' host CPU and halved one stream's rate; `cubic` does not pace. An unprivileged
    /// proxy may only choose what `net.ipv4.tcp_allowed_congestion_control` lists (`reno` and
    /// `cubic` unless the node added others); another name stops it at start with a sentence
    /// saying so, which the SpiceProxy's status then shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,14}$"))]
    pub congestion_control: Option<String>,
}

impl ClientSocketSpec {
    /// `None`: the kernel's autotuning (0, or a negative value in a hand-written file).
    /// Clamped like the schema: at most 16 MiB.
    pub fn send_buffer(&self) -> Option<u32> {
        (self.send_buffer_bytes > 0).then(|| self.send_buffer_bytes.min(CLIENT_SEND_BUFFER_MAX) as u32)
    }
}

/// The limits as durations and counts. The proxy also reads its config from a file that the CRD
/// schema never validated, so each is clamped to the smallest value that still means something.
impl ProxyLimits {
    /// At least 1, as the schema says.
    pub fn tunnel_limit(&self) -> usize {
        self.max_tunnels.max(1) as usize
    }
    /// At least 1, as the schema says: a negative count cast as it is would wrap to about four
    /// billion, no per-client limit at all.
    pub fn per_client_tunnel_limit(&self) -> u32 {
        self.max_tunnels_per_client.max(1) as u32
    }
    pub fn idle_timeout(&self) -> Duration {
        seconds_at_least(self.idle_timeout_seconds, 1)
    }
    pub fn connect_timeout(&self) -> Duration {
        seconds_at_least(self.connect_timeout_seconds, 1)
    }
    pub fn handshake_timeout(&self) -> Duration {
        seconds_at_least(self.handshake_timeout_seconds, 1)
    }
    pub fn drain(&self) -> Duration {
        seconds_at_least(self.drain_seconds, 0)
    }
    /// Clamped like the schema: 0 to 300 s.
    pub fn shutdown_delay(&self) -> Duration {
        seconds_at_least(self.shutdown_delay_seconds.min(300), 0)
    }
    /// Clamped to the schema's range (`DEAD_PEER_MIN_SECONDS`..=`DEAD_PEER_MAX_SECONDS`).
    pub fn dead_peer_timeout(&self) -> Duration {
        seconds_at_least(self.dead_peer_timeout_seconds.min(DEAD_PEER_MAX_SECONDS), DEAD_PEER_MIN_SECONDS)
    }
    /// Clamped like the schema: at most 86,400 s, at least 1 s.
    pub fn auth_failure_window(&self) -> Duration {
        seconds_at_least(self.auth_failure_window_seconds.min(86_400), 1)
    }
    /// Negative values (only a hand-written file could hold one) mean off, as 0 does.
    pub fn max_auth_failures(&self) -> u32 {
        self.max_auth_failures_per_client.max(0) as u32
    }
    /// Never longer than the idle timeout, which applies to every tunnel.
    pub fn half_closed_timeout(&self) -> Duration {
        seconds_at_least(self.half_closed_timeout_seconds, 1).min(self.idle_timeout())
    }

    /// These limits with the ones a running proxy takes from a changed configuration file
    /// replaced by `changed`'s: the tunnel limits, the idle, half-closed and connect timeouts
    /// and the authentication throttle. The others are read at start: the dead-peer and
    /// handshake timeouts are set on the listening sockets, the drain and shutdown delay make
    /// the pod's grace period. Listed here, so a new limit is read at start until it is
    /// listed.
    pub fn with_live_settings_of(self, changed: &ProxyLimits) -> ProxyLimits {
        ProxyLimits {
            max_tunnels: changed.max_tunnels,
            max_tunnels_per_client: changed.max_tunnels_per_client,
            idle_timeout_seconds: changed.idle_timeout_seconds,
            half_closed_timeout_seconds: changed.half_closed_timeout_seconds,
            connect_timeout_seconds: changed.connect_timeout_seconds,
            max_auth_failures_per_client: changed.max_auth_failures_per_client,
            auth_failure_window_seconds: changed.auth_failure_window_seconds,
            ..self
        }
    }
}

fn seconds_at_least(seconds: i32, min: i32) -> Duration {
    Duration::from_secs(seconds.max(min) as u64)
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_tunnels: d_max_tunnels(),
            max_tunnels_per_client: d_max_per_client(),
            idle_timeout_seconds: d_idle(),
            connect_timeout_seconds: d_connect(),
            handshake_timeout_seconds: d_head(),
            drain_seconds: d_drain(),
            shutdown_delay_seconds: d_shutdown_delay(),
            dead_peer_timeout_seconds: d_dead_peer(),
            half_closed_timeout_seconds: d_half_closed(),
            max_auth_failures_per_client: d_auth_failures(),
            auth_failure_window_seconds: d_auth_window(),
        }
    }
}

/// What the operator observed of the proxy it runs: written by it only.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpiceProxyStatus {
    /// `http://host:port`, exactly what a SPICE client accepts; absent until known and valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_url: Option<String>,
    /// Base URL of the browser console (`http://host:port/spice_auto.html`); engines append
    /// `?token=<ticket>`. Absent unless spec.html5 is set and the proxy is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html5_url: Option<String>,
    /// Proxy pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Proxy pods that exist (the scale subresource's status.replicas).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the proxy pods, for the scale subresource (HorizontalPodAutoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (serving at proxyUrl: at least one replica ready), Progressing (False with reason
    /// Complete once every replica runs the current spec), Degraded and (with html5)
    /// Html5Encrypted, keyed by type, with reason and message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

impl SpiceProxy {
    /// The browser console base URL, only when Ready (like `ready_url`).
    pub fn ready_html5_url(&self) -> Option<&str> {
        self.ready_url().ok()?;
        self.status.as_ref()?.html5_url.as_deref()
    }

    /// The published URL, only when the proxy is Ready (some replica serves).
    pub fn ready_url(&self) -> Result<&str, String> {
        let status = self.status.as_ref().ok_or("has no status yet")?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        match ready {
            Some(c) if c.status == "True" => {
                status.proxy_url.as_deref().ok_or_else(|| "is Ready but publishes no proxyUrl".into())
            }
            Some(c) => Err(format!("is not Ready ({}: {})", c.reason, c.message)),
            None => Err("is not Ready yet".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientSocketSpec, ProxyLimits};
    use std::time::Duration;

    #[test]
    fn limits_from_an_unvalidated_file_are_clamped_to_something_usable() {
        // A config file the schema never saw may hold 0 or negative values: a zero timeout
        // would refuse every client at once, a negative drain would wrap to centuries.
        let l = ProxyLimits { idle_timeout_seconds: 0, connect_timeout_seconds: -5, handshake_timeout_seconds: 0, drain_seconds: -1, shutdown_delay_seconds: -2, dead_peer_timeout_seconds: 0, half_closed_timeout_seconds: -3, ..Default::default() };
        assert_eq!(l.idle_timeout(), Duration::from_secs(1));
        assert_eq!(l.connect_timeout(), Duration::from_secs(1));
        assert_eq!(l.handshake_timeout(), Duration::from_secs(1));
        assert_eq!(l.drain(), Duration::ZERO);
        assert_eq!(l.shutdown_delay(), Duration::ZERO);
        assert_eq!(ProxyLimits { shutdown_delay_seconds: 100_000, ..Default::default() }.shutdown_delay(), Duration::from_secs(300));
        assert_eq!(ProxyLimits::default().shutdown_delay(), Duration::from_secs(5));
        assert_eq!(l.dead_peer_timeout(), Duration::from_secs(10));
        assert_eq!(ProxyLimits { dead_peer_timeout_seconds: i32::MAX, ..Default::default() }.dead_peer_timeout(), Duration::from_secs(3600));
        assert_eq!(l.half_closed_timeout(), Duration::from_secs(1));
        // A half-closed tunnel is still a tunnel: the idle timeout caps it.
        let long = ProxyLimits { half_closed_timeout_seconds: 7200, idle_timeout_seconds: 600, ..Default::default() };
        assert_eq!(long.half_closed_timeout(), Duration::from_secs(600));
        assert_eq!(ProxyLimits::default().half_closed_timeout(), Duration::from_secs(60));
        let d = ProxyLimits::default();
        assert_eq!(d.idle_timeout(), Duration::from_secs(d.idle_timeout_seconds as u64));
        assert!(d.idle_timeout() > Duration::from_secs(300), "SPICE pings inputs and cursor only every 300 s");
        assert_eq!(d.handshake_timeout(), Duration::from_secs(10));
        let socket = |bytes: i32| ClientSocketSpec { send_buffer_bytes: bytes, ..Default::default() }.send_buffer();
        assert_eq!(ClientSocketSpec::default().send_buffer(), None, "the kernel's autotuning by default");
        assert_eq!(socket(262_144), Some(262_144));
        assert_eq!(socket(-1), None);
        assert_eq!(socket(i32::MAX), Some(16 << 20));
        let counts = ProxyLimits { max_tunnels: -1, max_tunnels_per_client: -1, ..Default::default() };
        assert_eq!((counts.tunnel_limit(), counts.per_client_tunnel_limit()), (1, 1), "a negative count must not wrap into no limit at all");
        let zero = ProxyLimits { max_tunnels: 0, max_tunnels_per_client: 0, ..Default::default() };
        assert_eq!((zero.tunnel_limit(), zero.per_client_tunnel_limit()), (1, 1));
        assert_eq!((d.tunnel_limit(), d.per_client_tunnel_limit()), (10_000, 256));
    }
}
