//! The built-in SPICE proxy run by every SpiceProxy Deployment (`spice-operator proxy`).
pub mod config;
