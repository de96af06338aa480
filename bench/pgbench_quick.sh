#!/usr/bin/env bash
# A first throughput figure: pgbench select-only through the proxy vs direct PostgreSQL,
# interleaved (direct, proxy, direct, proxy, ...) so machine drift cancels in the ratio.
# Client TLS on in both cases; the proxy talks to upstream in plaintext on localhost.
#
#   bench/pgbench_quick.sh [ROUNDS=3] [SECONDS=10] [CLIENTS=16] [MODE=simple]
#
# Not a test: prints TPS medians and the ratio. The full harness is a later issue.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
rounds=${1:-3} seconds=${2:-10} clients=${3:-16} mode=${4:-simple}
work=$(mktemp -d)
trap 'kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
proxy_pid=

./start-postgres.sh start >/dev/null
# shellcheck disable=SC1090
source <(./start-postgres.sh env)
PATH="$PGPROXY_TEST_PGBIN:$PATH"
[ -x .venv/bin/jwt-postgresql-proxy ] || { python3 -m venv .venv && .venv/bin/pip install -q -e .; }
cli=.venv/bin/jwt-postgresql-proxy

direct="host=127.0.0.1 port=$PGPROXY_TEST_PGPORT user=scram_user dbname=proxytest sslmode=require"
PGPASSWORD=$PGPROXY_TEST_PASSWORD pgbench -q -i -s 10 "$direct" >/dev/null 2>&1

"$cli" keygen --private-key "$work/k.pem" --public-key "$work/p.pem" 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PUBLIC_KEYS__0="$(cat "$work/p.pem")" UPSTREAM__HOST=127.0.0.1 UPSTREAM__PORT=$PGPROXY_TEST_PGPORT \
  UPSTREAM__PASSWORD=$PGPROXY_TEST_PASSWORD UPSTREAM__SSLMODE=disable \
  DOWNSTREAM__PORT=$port DOWNSTREAM__CERTFILE=$work/tls.crt DOWNSTREAM__KEYFILE=$work/tls.key \
  LOG_LEVEL=WARNING "$cli" 2>"$work/proxy.log" &
proxy_pid=$!
sleep 1
token=$("$cli" token --key "$work/k.pem" --sub scram_user --ttl 1h)
through="host=127.0.0.1 port=$port user=scram_user dbname=proxytest sslmode=require"

tps() {  # $1 dsn, $2 password
  PGPASSWORD=$2 pgbench -n -S -M "$mode" -c "$clients" -j 2 -T "$seconds" "$1" 2>/dev/null |
    awk '/^tps = / {print $3}'
}
declare -a d p
for i in $(seq "$rounds"); do
  d+=("$(tps "$direct" "$PGPROXY_TEST_PASSWORD")")
  p+=("$(tps "$through" "$token")")
  echo "round $i: direct ${d[-1]} tps, proxy ${p[-1]} tps"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
md=$(median "${d[@]}") mp=$(median "${p[@]}")
echo "pgbench -S -M $mode -c $clients -j 2 -T $seconds, $rounds rounds interleaved"
echo "median direct: $md tps; median proxy: $mp tps; proxy/direct: $(awk -v a="$mp" -v b="$md" 'BEGIN {printf "%.2f", a/b}')"
