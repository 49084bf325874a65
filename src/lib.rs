//! spice-operator: runs SPICE console proxies on Kubernetes and resolves which proxy each VM
//! cluster and pool uses. See README.md for the layout.
pub mod admin;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod labels;
pub mod metrics;
pub mod proxy;
pub mod resolve;
