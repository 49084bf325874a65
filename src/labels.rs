//! Every label and annotation the operator sets, in one place (`app.kubernetes.io/*`).

use std::collections::BTreeMap;

pub const FIELD_MANAGER: &str = "spice-operator";
pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const PART_OF: &str = "app.kubernetes.io/part-of";
pub const VERSION: &str = "app.kubernetes.io/version";
/// Pod template annotation: a hash of the proxy configuration, so a change rolls the pods.
pub const CONFIG_HASH: &str = "console.spice-operator.io/config-hash";

/// On every child of a SpiceProxy: the digest of the set applied with it. A set that carries one
/// digest throughout was applied in full, which the operator reads back after a restart.
pub const APPLIED_SET: &str = "console.spice-operator.io/applied-set";

/// `app.kubernetes.io/name` of every proxy pod.
const PROXY_APP: &str = "spice-proxy";

/// A label selector matching the pods of every SpiceProxy (for one watch over all of them).
pub fn all_proxy_pods_selector() -> String {
    format!("{NAME}={PROXY_APP},{MANAGED_BY}={FIELD_MANAGER}")
}

/// Labels that select the pods of one SpiceProxy. Never change these: a Deployment's
/// selector is immutable.
pub fn proxy_selector(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAME.into(), PROXY_APP.into()), (INSTANCE.into(), instance.into())])
}

/// `proxy_selector` as a label selector string (`k=v,k=v`), for list calls and the scale subresource.
pub fn proxy_selector_string(instance: &str) -> String {
    proxy_selector(instance).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Labels on every object made for one SpiceProxy.
pub fn proxy_labels(instance: &str) -> BTreeMap<String, String> {
    let mut labels = proxy_selector(instance);
    labels.insert(COMPONENT.into(), "proxy".into());
    labels.insert(MANAGED_BY.into(), FIELD_MANAGER.into());
    labels.insert(PART_OF.into(), "spice-operator".into());
    labels.insert(VERSION.into(), env!("CARGO_PKG_VERSION").into());
    labels
}
