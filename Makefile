# The two commands of the README: `make demo` and `make test`.
.PHONY: demo test unit build crds tools bench bench-proxy bench-bridge fuzz e2e-kind image

demo:            ## Local control plane + operator + examples; Ctrl-C stops everything
	hack/demo.sh

test:            ## Unit tests, then integration tests against a real local control plane
	hack/test.sh

unit:            ## Unit tests only (no cluster)
	cargo test --lib --test crd_drift

build:
	cargo build --release

crds:            ## Regenerate crds/ from the Rust types
	cargo run --quiet -- crdgen -o crds/crds.yaml --chart-template charts/spice-operator/templates/crds.yaml

tools:           ## Build the control-plane binaries into the cache (hack/tools.sh)
	hack/tools.sh

bench:           ## Scale benchmark of policy resolution on the local control plane
	hack/bench.sh

bench-proxy:     ## CONNECT proxy vs HAProxy (splice), squid, tinyproxy on loopback
	hack/bench-proxy.sh

bench-bridge:    ## WebSocket bridge vs websockify on loopback
	hack/bench-bridge.sh

fuzz:            ## Every cargo-fuzz target for FUZZ_SECONDS (default 300) each; needs nightly
	hack/fuzz.sh

e2e-kind:        ## tests/e2e against a kind cluster running the image (needs Docker + kind)
	hack/e2e-kind.sh

image:           ## Build the container image (needs Docker)
	docker build -t spice-operator:dev .
