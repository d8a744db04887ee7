# syntax=docker/dockerfile:1
# The `dataviz` image: one binary, every role (`dataviz bridge`, `processor`, `writer`,
# `publisher`, `app`, `migrate`, ...), chosen by the command. compose.yaml builds it.
#
#   docker build -t dataviz .
#   docker run --rm dataviz --help

# --- Build ------------------------------------------------------------------------------------
# rust-version in Cargo.toml is the minimum; this is the toolchain CI and developers use.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
# The workspace as it is in git (.dockerignore keeps target/, .local/ and the like out).
COPY . .
# Cache mounts keep the registry and the build directory between builds (BuildKit); the binary
# is copied out of the cache before the step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p dataviz-cli --no-default-features \
    && install -m 0755 target/release/dataviz /usr/local/bin/dataviz

# --- Run --------------------------------------------------------------------------------------
# Same Debian release as the builder (glibc). curl: the health checks of compose.yaml
# (`curl -fsS http://127.0.0.1:9000/healthz`); ca-certificates: TLS to NATS, MQTT, PostgreSQL.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/dataviz --create-home dataviz
COPY --from=builder /usr/local/bin/dataviz /usr/local/bin/dataviz
USER dataviz
WORKDIR /var/lib/dataviz
# Production logs (JSON lines on stderr); compose.yaml sets it too.
ENV APP_ENV=prod
# 8080: the admin site (`dataviz app`); 9000: /healthz, /readyz, /metrics when HTTP_ADDR says so.
EXPOSE 8080 9000
ENTRYPOINT ["dataviz"]
CMD ["--help"]
