use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which SPICE proxy the engine hands to clients, per cluster and VM pool, with oVirt's
/// hierarchy: VM opt-out → none; else pool → cluster → global default → none.
/// The operator writes the effective proxy of every cluster, pool and opted-out VM into status.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "console.spice-operator.io",
    version = "v1alpha1",
    kind = "ClusterConsolePolicy",
    plural = "clusterconsolepolicies",
    shortname = "ccp",
    category = "spice",
    status = "ClusterConsolePolicyStatus",
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".status.defaultProxyUrl"}"#,
    printcolumn = r#"{"name":"Pools","type":"integer","jsonPath":".status.resolvedPools"}"#,
    printcolumn = r#"{"name":"Unresolved","type":"integer","jsonPath":".status.unresolved"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConsolePolicySpec {
    /// Global default for every cluster and pool that does not override it. Absent: no proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_proxy: Option<ProxyChoice>,

    /// Clusters the engine knows, each with its VM pools.
    #[serde(default)]
    #[schemars(length(max = 200))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub clusters: Vec<ClusterEntry>,

    /// VMs whose console never uses a proxy, whatever their pool or cluster says.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub vm_opt_outs: Vec<VmOptOut>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterEntry {
    /// The cluster's name in the engine.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Override for this cluster; absent: inherit the global default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyChoice>,
    /// The cluster's VM pools, each inheriting the cluster's proxy unless it overrides it.
    #[serde(default)]
    #[schemars(length(max = 200))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub pools: Vec<PoolEntry>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolEntry {
    /// The pool's name in the engine, unique within its cluster.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Override for this pool; absent: inherit the cluster's proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyChoice>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmOptOut {
    /// The VM's name in the engine.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Cluster the VM runs in; must be listed in `clusters`.
    #[schemars(length(min = 1, max = 253))]
    pub cluster: String,
    /// Pool the VM belongs to, if any; must be listed in that cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pool: Option<String>,
}

/// Exactly one of `url`, `spiceProxyRef` or `direct: true`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.url) ? 1 : 0) + (has(self.spiceProxyRef) ? 1 : 0) + (has(self.direct) && self.direct ? 1 : 0) == 1",
     "message": "set exactly one of url, spiceProxyRef or direct: true"}
]))]
pub struct ProxyChoice {
    /// `[http://]host[:port]` (default port 3128). SPICE clients ignore an https:// proxy and
    /// connect directly, so only http:// is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!self.lowerAscii().startsWith('https://')",
         "message": "https:// proxies are not supported: SPICE clients ignore an https proxy and connect directly; use http://host:port"},
        {"rule": "!self.contains('://') || self.lowerAscii().startsWith('http://')",
         "message": "only http:// proxies are supported by SPICE clients"}
    ]))]
    pub url: Option<String>,
    /// A SpiceProxy managed by this operator; its `status.proxyUrl` is used once it is Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice_proxy_ref: Option<SpiceProxyRef>,
    /// No proxy at this level: clients connect to the hypervisor directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<bool>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpiceProxyRef {
    /// The SpiceProxy's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace (the policy is cluster-scoped, so it is always given).
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// The level that decided an entry's proxy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Source {
    Pool,
    Cluster,
    Global,
    #[serde(rename = "VM")]
    Vm,
    None,
}

/// The effective console proxy of one cluster, pool or opted-out VM.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resolution {
    /// The cluster's, pool's or VM's name.
    pub name: String,
    /// Cluster of a pool or VM entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Pool of a VM entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `http://host:port`, or null when no proxy applies or the deciding level is unusable.
    pub proxy_url: Option<String>,
    /// Browser console base URL (spice-html5) when the deciding SpiceProxy serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html5_url: Option<String>,
    pub source: Source,
    /// Drives the engine's "Enable SPICE Proxy" checkbox: true when a proxy is configured.
    pub proxy_configured: bool,
    /// Why the deciding level could not be used; no other level is tried instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the operator resolved: written by it only, read by the engine.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConsolePolicyStatus {
    /// The spec generation this status was resolved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (every entry resolved) and Degraded, keyed by type, with reason and message.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Effective global default (for display).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_proxy_url: Option<String>,
    /// The effective proxy of every cluster in the spec.
    #[serde(default)]
    pub clusters: Vec<Resolution>,
    /// The effective proxy of every pool in the spec: what the engine reads.
    #[serde(default)]
    pub pools: Vec<Resolution>,
    /// Every opted-out VM (never a proxy, or an error when its cluster or pool is unknown).
    #[serde(default)]
    pub vms: Vec<Resolution>,
    /// Pools resolved without error.
    #[serde(default)]
    pub resolved_pools: i32,
    /// Entries whose deciding level is unusable.
    #[serde(default)]
    pub unresolved: i32,
}

impl ClusterConsolePolicySpec {
    /// Every SpiceProxy this policy refers to, at any level.
    pub fn proxy_refs(&self) -> impl Iterator<Item = &SpiceProxyRef> {
        let global = self.default_proxy.iter();
        let clusters = self.clusters.iter().flat_map(|c| c.proxy.iter().chain(c.pools.iter().flat_map(|p| p.proxy.iter())));
        global.chain(clusters).filter_map(|choice| choice.spice_proxy_ref.as_ref())
    }
}
