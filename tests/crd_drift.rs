//! The committed CRDs are exactly what the Rust types generate (`spice-operator crdgen`).
#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).expect("crds/crds.yaml");
    let generated = spice_operator::crd::crds_yaml();
    assert!(
        committed == generated,
        "crds/crds.yaml is out of date with src/crd/: run `make crds`"
    );
}

#[test]
fn chart_crd_template_matches_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/spice-operator/templates/crds.yaml"))
        .expect("charts/spice-operator/templates/crds.yaml");
    assert!(
        committed == spice_operator::crd::chart_crds_yaml(),
        "the chart's CRD template is out of date with src/crd/: run `make crds`"
    );
}
