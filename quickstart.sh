#!/usr/bin/env bash
# Quick start: a local PostgreSQL, a signing key pair, a TLS certificate, the proxy, a token,
# and a psql query through the proxy -- on a fresh machine, in one command.
#
#   ./quickstart.sh          run the demo, then stop the proxy (PostgreSQL keeps running)
#   ./quickstart.sh --keep   leave the proxy running and print how to connect
set -euo pipefail

repo=$(cd "$(dirname "$0")" && pwd)
cd "$repo"
keep=0
[ "${1:-}" = "--keep" ] && keep=1
state="$repo/.quickstart"
mkdir -p "$state"

echo "=== 1. PostgreSQL (./start-postgres.sh)"
./start-postgres.sh start >/dev/null
# shellcheck disable=SC1090
source <(./start-postgres.sh env)
echo "PostgreSQL on 127.0.0.1:$PGPROXY_TEST_PGPORT with roles scram_user, md5_user, ..."

echo "=== 2. Python environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv .venv
    else
      echo "python3 -m venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e .; } \
    >"$state/pip.log" 2>&1; then
  cat "$state/pip.log" >&2
  exit 1
fi
proxy_cli=.venv/bin/jwt-postgresql-proxy

echo "=== 3. Signing key pair and the proxy's TLS certificate"
if [ ! -f "$state/signing-private.pem" ]; then
  "$proxy_cli" keygen --type ed25519 --force \
    --private-key "$state/signing-private.pem" --public-key "$state/signing-public.pem"
fi
if [ ! -f "$state/proxy.crt" ]; then
  # ECDSA P-256: cheaper TLS handshakes than RSA.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$state/proxy.key" -out "$state/proxy.crt" 2>/dev/null
  chmod 600 "$state/proxy.key"
fi

echo "=== 4. The proxy"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PUBLIC_KEYS__0="$(cat "$state/signing-public.pem")"
export UPSTREAM__HOST=localhost UPSTREAM__PORT="$PGPROXY_TEST_PGPORT"
export UPSTREAM__PASSWORD="$PGPROXY_TEST_PASSWORD"
export UPSTREAM__SSLMODE=verify-full UPSTREAM__SSLROOTCERT="$PGPROXY_TEST_CA"
export DOWNSTREAM__IP=127.0.0.1 DOWNSTREAM__PORT="$port"
export DOWNSTREAM__CERTFILE="$state/proxy.crt" DOWNSTREAM__KEYFILE="$state/proxy.key"
"$proxy_cli" >"$state/proxy.log" 2>&1 &
proxy_pid=$!
echo "$proxy_pid" >"$state/proxy.pid"
stop_proxy() { kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true; }
[ "$keep" = 1 ] || trap stop_proxy EXIT
for _ in $(seq 100); do
  grep -q "listening:" "$state/proxy.log" && break
  kill -0 "$proxy_pid" 2>/dev/null || { cat "$state/proxy.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "listening:" "$state/proxy.log" || { echo "proxy did not start" >&2; cat "$state/proxy.log" >&2; exit 1; }
echo "proxy (pid $proxy_pid) on 127.0.0.1:$port, log in $state/proxy.log"

echo "=== 5. A token for role scram_user, valid 15 minutes"
token=$("$proxy_cli" token --key "$state/signing-private.pem" --sub scram_user --ttl 15m)
echo "${token:0:24}... (${#token} characters)"

echo "=== 6. psql through the proxy"
psql_bin=$(command -v psql || echo "$PGPROXY_TEST_PGBIN/psql")
PGPASSWORD="$token" "$psql_bin" \
  "host=127.0.0.1 port=$port user=scram_user dbname=postgres sslmode=require" \
  -c "select current_user, inet_server_port() as upstream_port, (select ssl from pg_stat_ssl where pid = pg_backend_pid()) as upstream_tls"

echo "=== done"
if [ "$keep" = 1 ]; then
  cat <<EOF
The proxy keeps running (pid $proxy_pid; stop it with: kill $proxy_pid).
Connect again with:
  PGPASSWORD="\$($proxy_cli token --key $state/signing-private.pem --sub scram_user --ttl 15m)" \\
    psql "host=127.0.0.1 port=$port user=scram_user dbname=postgres sslmode=require"
EOF
else
  echo "proxy log:"
  sed 's/^/  /' "$state/proxy.log"
fi
