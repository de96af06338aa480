# Container image for jwt-postgresql-proxy.
#
#   docker build -t jwt-postgresql-proxy .
#   docker run -p 127.0.0.1:6432:5432 \
#       -e UPSTREAM__HOST=db.internal -e UPSTREAM__PASSWORD=... -e UPSTREAM__SSLMODE=verify-full \
#       -e PUBLIC_KEYS__0="$(cat public.pem)" \
#       -e DOWNSTREAM__CERTFILE=/tls/server.crt -e DOWNSTREAM__KEYFILE=/tls/server.key \
#       -v "$PWD/tls:/tls:ro" jwt-postgresql-proxy
#
# Configuration is by environment variables only (src/jwtpgproxy/config.py). Nothing secret
# is baked in: the upstream password, the public keys and the TLS certificate and key are
# supplied at run time. docker-compose.yml is a complete local demo.
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
# container's own network namespace, on PostgreSQL's port. (Every ENV here must be a setting
# of jwtpgproxy.config.Settings; tests/test_packaging.py checks it.)
ENV DOWNSTREAM__IP=0.0.0.0 \
    DOWNSTREAM__PORT=5432
EXPOSE 5432

USER 10001:10001

# Liveness: the listener accepts TCP connections (each probe shows in the log as a client
# that connected and left). A later issue adds an HTTP /healthz endpoint; switch to it then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket; ip = os.environ.get('DOWNSTREAM__IP', '127.0.0.1').split(',')[0].strip(); host = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(ip, ip); socket.create_connection((host, int(os.environ.get('DOWNSTREAM__PORT', '5432'))), 3).close()"]

ENTRYPOINT ["jwt-postgresql-proxy"]
