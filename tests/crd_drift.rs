//! The committed CRDs are exactly what the Rust types generate (`spice-operator crdgen`).
#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).expect("crds/crds.yaml");
    let generated = spice_operator::crd::crds_yaml();
    assert!(
        committed == generated,
        "crds/crds.yaml is out of date with src/crd/: run `cargo run -- crdgen -o crds/crds.yaml` (or `make crds`)"
    );
}
