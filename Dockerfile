# syntax=docker/dockerfile:1
#
# One multi-stage Dockerfile for every agentgate image.
#
#   docker build --target audit-store -t agentgate-audit-store .
#   docker build --target agentgate   -t agentgate .            # the CLI; also the default target
#
# Stages:
#   builder      compiles the whole workspace in release (every `agentgate*` binary at once)
#   runtime      the common base of every image: Debian slim, CA certificates, a non-root user,
#                /var/lib/agentgate for data, /etc/agentgate for configuration
#   audit-store  agentgate-audit-store (authz, approvals, pg-proxy, ssh-proxy likewise)
#   agentgate    the `agentgate` CLI (`agentgate up` runs every service in one process)
#
# Adding a service (authz, approvals, pg-proxy, ...): its binary `agentgate-<name>` is already
# built by the builder stage and copied to /out; add one stage like `audit-store` below.
#
# The images carry no configuration: pass `--config FILE` (mount the file) and/or
# AGENTGATE_* environment variables. See docs/operations.md.
#
# Needs BuildKit (the default builder since Docker Engine 23 and in Compose v2; with older
# engines set DOCKER_BUILDKIT=1) for the cache mounts that keep rebuilds incremental.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder

# The rust image already has gcc/cc and make. libclang is for bindgen (pg_query); protoc is
# vendored by the build (protoc-bin-vendored), so no protobuf-compiler.
# Unpinned on purpose: bookworm only ever ships security fixes, and pinned versions vanish.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*

# Strip debug info from the shipped binaries (the workspace keeps line tables in release for
# local profiling); symbols stay, so backtraces still name functions.
# `--build-arg CARGO_PROFILE_RELEASE_STRIP=none` keeps everything.
ARG CARGO_PROFILE_RELEASE_STRIP=debuginfo
ENV CARGO_PROFILE_RELEASE_STRIP=${CARGO_PROFILE_RELEASE_STRIP} \
    CARGO_TERM_COLOR=never

WORKDIR /src
COPY . .

# The registry and target directories are cache mounts (not part of the image), so the
# binaries are copied out to /out in the same step.
RUN --mount=type=cache,id=agentgate-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=agentgate-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=agentgate-target,target=/src/target,sharing=locked \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && find target/release -maxdepth 1 -type f -perm -u+x \
        \( -name agentgate -o -name 'agentgate-*' \) -exec cp -v {} /out/ \;

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates: TLS to Postgres, OTLP collectors, OIDC issuers. Nothing else is needed.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid (10001), so Kubernetes `runAsUser`/`fsGroup` and volume ownership agree.
# /var/lib/agentgate belongs to it: a fresh named volume mounted there inherits the owner.
# /var/lib/agentgate-spool likewise: a proxy's own state (audit spool, host key, generated
# certificate) when the shared data directory is mounted read-only (docker-compose).
RUN groupadd --system --gid 10001 agentgate \
 && useradd --system --uid 10001 --gid agentgate --no-create-home \
        --home-dir /var/lib/agentgate --shell /usr/sbin/nologin agentgate \
 && install -d -o agentgate -g agentgate -m 0750 /var/lib/agentgate /var/lib/agentgate-spool \
 && install -d -m 0755 /etc/agentgate

WORKDIR /var/lib/agentgate
# Holds the signing key (unless configured elsewhere) and the SQLite store when no Postgres
# URL is set: mount a volume here, or it goes away with the container.
VOLUME ["/var/lib/agentgate"]
USER 10001:10001

# ---------------------------------------------------------------------------------------------
FROM runtime AS audit-store
COPY --from=builder /out/agentgate-audit-store /usr/local/bin/agentgate-audit-store
# 7403: gRPC (ingest, query, verify, export); 9464: Prometheus /metrics when
# telemetry.metrics_address is set. The built-in default listen address is loopback: set
# audit_store.listen = "0.0.0.0:7403" (or AGENTGATE_AUDIT_STORE__LISTEN) in a container.
EXPOSE 7403 9464
ENTRYPOINT ["/usr/local/bin/agentgate-audit-store"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS authz
COPY --from=builder /out/agentgate-authz /usr/local/bin/agentgate-authz
# 7404: gRPC (tokens, sessions, grants, access requests); 9464: /metrics.
EXPOSE 7404 9464
ENTRYPOINT ["/usr/local/bin/agentgate-authz"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS approvals
COPY --from=builder /out/agentgate-approvals /usr/local/bin/agentgate-approvals
# 7405: gRPC (create, review, watch); 9464: /metrics.
EXPOSE 7405 9464
ENTRYPOINT ["/usr/local/bin/agentgate-approvals"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS pg-proxy
COPY --from=builder /out/agentgate-pg-proxy /usr/local/bin/agentgate-pg-proxy
# 6432: Postgres for agents (set pg_proxy.listen = "0.0.0.0:6432" in a container, with
# pg_proxy.tls for agents off the host); 9464: /metrics.
EXPOSE 6432 9464
ENTRYPOINT ["/usr/local/bin/agentgate-pg-proxy"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS ssh-proxy
COPY --from=builder /out/agentgate-ssh-proxy /usr/local/bin/agentgate-ssh-proxy
# 2222: SSH for agents (set ssh_proxy.listen = "0.0.0.0:2222" in a container); its host key
# is generated once in /var/lib/agentgate (ssh-proxy-host-key) unless ssh_proxy.host_key
# names one; 9464: /metrics.
EXPOSE 2222 9464
ENTRYPOINT ["/usr/local/bin/agentgate-ssh-proxy"]

# Later proxies follow the same pattern.

# ---------------------------------------------------------------------------------------------
# The CLI: operator commands (`agentgate audit verify BUNDLE`, `agentgate dev certs`, ...) and
# `agentgate up`, every service in one process. Last stage, so it is the default target.
# The default command keeps its data in /var/lib/agentgate (not under $HOME) and, with no
# --config, listens on loopback only: pass `up --config FILE --data-dir /var/lib/agentgate`
# with non-loopback listen addresses to serve other containers.
FROM runtime AS agentgate
COPY --from=builder /out/agentgate /usr/local/bin/agentgate
ENTRYPOINT ["/usr/local/bin/agentgate"]
CMD ["up", "--data-dir", "/var/lib/agentgate"]
