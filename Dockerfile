# syntax=docker/dockerfile:1
#
# ferry-relay / ferry-stun container image.
#
#   docker build -t ferry-relay:dev .
#   docker run --rm -e FERRY_HOSTNAME=relay.example.com \
#       -p 443:8443 -p 80:8080 -p 3478:3478/udp -p 3478:3478/tcp \
#       -v ferry-data:/var/lib/ferry ferry-relay:dev
#
# Stages: chef (Rust + cargo-chef) -> planner (dependency recipe) -> builder (dependencies in
# their own layer, then the workspace) -> runtime (distroless, non-root).
# The dependency layer (`cargo chef cook`) is rebuilt only when Cargo.toml/Cargo.lock change, so
# an edit to relay/src or stun/src rebuilds just the two crates.
#
# Base images are pinned by tag, not by digest: this Dockerfile was written on a machine without
# access to a container registry, so no digest could be looked up and verified. To pin digests,
# run `docker buildx imagetools inspect <image:tag>` and append `@sha256:...` to each FROM.
# Builder and runtime are both Debian 12 (bookworm), so the binaries' glibc matches.

ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: cached until the lock file or a manifest changes. The same package selection
# in both steps, so Cargo resolves the same features and reuses every dependency built here.
RUN cargo chef cook --release --locked -p ferry-relay -p ferry-stun --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p ferry-relay -p ferry-stun \
 && install -D -m 0755 target/release/ferry-relay /out/usr/local/bin/ferry-relay \
 && install -D -m 0755 target/release/ferry-stun /out/usr/local/bin/ferry-stun \
 && install -D -m 0644 docker/ferry-relay.toml /out/etc/ferry/relay.toml \
 && mkdir -p /out-data/var/lib/ferry

# cc-debian12 has glibc, libgcc and CA certificates (ACME, mesh peers, verify URL over HTTPS),
# and no shell. The :nonroot variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/ /
# The server key, the self-signed certificate and the ACME cache live here: mount a volume.
COPY --from=builder --chown=65532:65532 /out-data/ /
USER 65532:65532
WORKDIR /var/lib/ferry
VOLUME ["/var/lib/ferry"]
# Unprivileged ports inside the container (a non-root process cannot bind below 1024 without
# extra capabilities); publish them as 443, 80 and 3478. Metrics stay on 127.0.0.1:9090.
#   8443/tcp DERP (TLS)   8080/tcp captive-portal check + HTTPS redirect + ACME HTTP-01
#   3478/udp+tcp STUN
EXPOSE 8443/tcp 8080/tcp 3478/udp 3478/tcp 3480/udp
# No shell or curl in distroless: the binary checks its own /healthz on the metrics listener.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/ferry-relay", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/ferry-relay"]
# Replace to run with other settings, e.g. `--config /etc/ferry/other.toml`, or use
# `--entrypoint /usr/local/bin/ferry-stun` for STUN alone.
CMD ["--config", "/etc/ferry/relay.toml"]
