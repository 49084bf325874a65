# syntax=docker/dockerfile:1
# One image for both modes: `controller` (the operator) and `proxy` (every SpiceProxy pod).
#   docker build -t spice-operator:dev .
# Builder pinned to the Rust release the project is tested with; runtime is distroless,
# non-root, with nothing but the binary, its C runtime and the spice-html5 client pages.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in policy_scale proxy_compare bridge_compare; do echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin spice-operator \
 && strip target/release/spice-operator

# spice-html5 (the browser console) from Debian, as nova's spicehtml5proxy serves it.
FROM debian:bookworm-slim AS html5
RUN apt-get update \
 && apt-get install -y --no-install-recommends spice-html5=0.3.0-2 \
 && rm -rf /var/lib/apt/lists/*

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="spice-operator" \
      org.opencontainers.image.description="SPICE console proxies on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/spice-operator /usr/local/bin/spice-operator
COPY --from=html5 /usr/share/spice-html5 /usr/share/spice-html5
USER 65532:65532
EXPOSE 3128 8080 9090
ENTRYPOINT ["/usr/local/bin/spice-operator"]
CMD ["controller"]
