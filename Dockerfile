# Container image for jwt-postgresql-proxy.
#
#   docker build -t jwt-postgresql-proxy .
#   docker run -p 127.0.0.1:6432:5432 -p 127.0.0.1:9187:9187 \
#       -e UPSTREAM__HOST=db.internal -e UPSTREAM__PASSWORD=... -e UPSTREAM__SSLMODE=verify-full \
#       -e PUBLIC_KEYS__0="$(cat public.pem)" \
#       -e DOWNSTREAM__CERTFILE=/tls/server.crt -e DOWNSTREAM__KEYFILE=/tls/server.key \
#       -v "$PWD/tls:/tls:ro" jwt-postgresql-proxy
#
# Configuration is by environment variables only (src/jwtpgproxy/ops/config.py). Nothing secret
# is baked in: the upstream password, the public keys and the TLS certificate and key are
# supplied at run time. docker-compose.yml is a complete local demo; deploy/kubernetes/ has
# Kubernetes examples. Port 9187 serves GET /metrics (Prometheus), /healthz and /readyz.
#
# Base image: pin the Python minor and the Debian release; for reproducible production
# builds pin the digest as well (python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its dependencies under /install ----------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# .dockerignore keeps the context to pyproject.toml, README.md, src/ and docker/.
COPY . .
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --prefix=/install .

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="jwt-postgresql-proxy" \
      org.opencontainers.image.description="Stateless PostgreSQL wire-protocol proxy that authenticates clients by signed JWT" \
      org.opencontainers.image.version="0.1.0"

# A fixed, numeric non-root uid/gid (Kubernetes runAsNonRoot can check it). /keys and
# /issuer belong to it so that a named volume mounted there starts out owned by it: that is
# where docker/gen-certs.sh writes the demo's certificate and keys.
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin proxy \
    && install -d -o 10001 -g 10001 -m 0700 /keys /issuer

COPY --from=build /install /usr/local
COPY --chmod=0755 docker/gen-certs.sh /usr/local/bin/gen-certs

# Only settings that are right for any container: listen on all interfaces of the
# container's own network namespace -- PostgreSQL's port for clients, and the HTTP listener
# (GET /metrics, /healthz, /readyz) that the HEALTHCHECK below and Kubernetes probes use.
# 9187 is only a convention of this project (no registered port; note that the Prometheus
# postgres_exporter also defaults to 9187 -- set METRICS__PORT to something else if one runs
# in the same network namespace). Every ENV here must be a setting of
# jwtpgproxy.ops.config.Settings; tests/test_packaging.py checks it.
ENV DOWNSTREAM__IP=0.0.0.0 \
    DOWNSTREAM__PORT=5432 \
    METRICS__HOST=0.0.0.0 \
    METRICS__PORT=9187
EXPOSE 5432 9187

USER 10001:10001

# Liveness: GET /healthz on the HTTP listener must answer 200, else exit 1 (standard library
# only; a 0.0.0.0/:: listener is probed on loopback; HTTP(S)_PROXY variables are ignored; a
# failure's traceback ends up in "docker inspect" as the reason). Not /readyz: Docker has no
# "unready" state, and an unreachable database must not make the proxy "unhealthy" (and
# restarted by an orchestrator). With METRICS__PORT unset (HTTP listener off) the check fails:
# run with --no-healthcheck (compose: "healthcheck: {disable: true}").
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; h = os.environ.get('METRICS__HOST') or '127.0.0.1'; h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); url = 'http://%s:%s/healthz' % ('[%s]' % h if ':' in h else h, os.environ['METRICS__PORT']); sys.exit(r.build_opener(r.ProxyHandler({})).open(url, timeout=4).status != 200)"]

ENTRYPOINT ["jwt-postgresql-proxy"]
