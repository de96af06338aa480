#!/usr/bin/env bash
# A disposable local PostgreSQL cluster for the test suite, benchmarks and the
# quick start.
#
#   ./start-postgres.sh [start|stop|status|env]      (default: start)
#
# start   create (first run) or start (later runs) the cluster, then print the
#         env file (a short human line goes to stderr, so
#         `eval "$(./start-postgres.sh)"` also works). No-op if already running.
# stop    stop the server (pg_ctl stop -m fast); the state dir is kept.
# status  exit 0 if the server is running, 3 otherwise.
# env     print the env file (exit 1 if there is none yet).
#
# Environment:
#   JWTPGPROXY_PG_DIR       state dir (default /tmp/jwtpgproxy-pg-<sha1(repo path)[:12]>)
#   JWTPGPROXY_PG_PORT      TCP port (default: a free port, reused across restarts)
#   JWTPGPROXY_PG_PASSWORD  password of the test roles (default: random, kept in <state>/password)
#
# State dir layout: data/ (cluster), sock/ (unix socket), tls/ (CA + server
# cert), log (server log), env (sourceable PGPROXY_TEST_* variables), password.
#
# Roles (all LOGIN, same password): scram_user (SCRAM), md5_user (MD5-stored,
# md5 auth), cleartext_user (password auth), trust_user (trust auth).
# Database proxytest is owned by scram_user. NOT for production: fsync is off.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
CMD="${1:-start}"

die() { printf 'start-postgres.sh: error: %s\n' "$*" >&2; exit 1; }
info() { printf 'start-postgres.sh: %s\n' "$*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# --- state dir ---------------------------------------------------------------
if [[ -n "${JWTPGPROXY_PG_DIR:-}" ]]; then
    STATE="$JWTPGPROXY_PG_DIR"
    [[ "$STATE" == /* ]] || STATE="$PWD/$STATE"
else
    STATE="/tmp/jwtpgproxy-pg-$(printf '%s' "$REPO_DIR" | sha1sum | cut -c1-12)"
fi
STATE="${STATE%/}"
DATA="$STATE/data"
SOCK="$STATE/sock"
TLS="$STATE/tls"
LOG="$STATE/log"
ENV_FILE="$STATE/env"
PW_FILE="$STATE/password"

# Server commands run as `postgres` when we are root: never leave them in a cwd
# that user cannot enter (e.g. /root); all paths below are absolute.
cd /

# --- who runs the server -----------------------------------------------------
# fd 9 holds the state-dir lock (see lock_state); it is closed for every server
# command so that the postmaster does not inherit (and keep) the lock.
if [[ $EUID -eq 0 ]]; then
    SERVER_USER=postgres
    as_server() { runuser -u postgres -- "$@" 9>&-; }
else
    SERVER_USER="$(id -un)"
    as_server() { "$@" 9>&-; }
fi

# --- server binaries ---------------------------------------------------------
PGBIN=""
has_server_bins() {  # initdb, pg_ctl, postgres (+ psql, pg_isready used below) all in dir $1
    local b
    for b in initdb pg_ctl postgres psql pg_isready; do
        [[ -x "$1/$b" ]] || return 1
    done
}

find_pgbin() {
    local d
    # PATH first; follow symlinks (e.g. /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl)
    # so that we land in the real bin dir that also has psql and pg_isready.
    if d="$(command -v pg_ctl 2>/dev/null)"; then
        d="$(dirname "$(readlink -f "$d")")"
        if has_server_bins "$d"; then
            PGBIN="$d"
            return 0
        fi
    fi
    d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$d" ]] && has_server_bins "$d"; then
        PGBIN="$d"
        return 0
    fi
    return 1
}

install_postgres() {
    [[ $EUID -eq 0 ]] || die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL (e.g. 'sudo apt-get install -y postgresql') or put its bin dir on PATH"
    command -v apt-get >/dev/null || die "PostgreSQL server binaries not found and apt-get is not available; install PostgreSQL and put its bin dir on PATH"
    info "PostgreSQL server binaries not found; installing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # Like the official postgres Docker image: install postgresql-common first
    # and tell it not to create (and start) a system 'main' cluster on 5432.
    apt-get install -y -qq postgresql-common >&2
    if [[ -f /etc/postgresql-common/createcluster.conf ]]; then
        sed -ri 's/^#?\s*(create_main_cluster)\s*=.*$/\1 = false/' /etc/postgresql-common/createcluster.conf
    fi
    apt-get install -y -qq postgresql >&2
}

need_pgbin() {
    if ! find_pgbin; then
        install_postgres
        find_pgbin || die "PostgreSQL was installed but initdb/pg_ctl/postgres are still not found"
    fi
}

ensure_server_user() {
    [[ $EUID -eq 0 ]] || return 0
    id postgres >/dev/null 2>&1 && return 0
    info "creating system user 'postgres'"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
}

# --- helpers -----------------------------------------------------------------
own() {  # hand files over to the server user (no-op when not root)
    [[ $EUID -eq 0 ]] || return 0
    chown "$SERVER_USER:$SERVER_USER" "$@"
}

is_running() {
    [[ -d "$DATA" ]] || return 1
    [[ -n "$PGBIN" ]] || find_pgbin || return 1
    as_server "$PGBIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

env_value() {  # env_value VAR -> value from the env file (empty if none)
    [[ -r "$ENV_FILE" ]] || return 0
    sed -n "s/^export $1=//p" "$ENV_FILE" | tail -n 1
}

port_is_free() {  # on 127.0.0.1 and (if there is IPv6) on ::1
    python3 -c '
import socket, sys
port = int(sys.argv[1])
for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        s = socket.socket(family)
    except OSError:
        continue
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
    except OSError as e:
        if family == socket.AF_INET or e.errno == getattr(__import__("errno"), "EADDRINUSE"):
            sys.exit(1)
    finally:
        s.close()
' "$1" 2>/dev/null
}

pick_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ipv6_loopback_ok() {
    python3 -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null
}

random_password() {
    python3 -c 'import secrets, string; a = string.ascii_letters + string.digits; print("".join(secrets.choice(a) for _ in range(24)))'
}

pg_version() {
    "$PGBIN/postgres" --version | sed -n 's/^postgres (PostgreSQL) \([^ ]*\).*/\1/p'
}

# --- pieces of the cluster ---------------------------------------------------
resolve_password() {
    if [[ -n "${JWTPGPROXY_PG_PASSWORD:-}" ]]; then
        PASSWORD="$JWTPGPROXY_PG_PASSWORD"
    elif [[ -s "$PW_FILE" ]]; then
        PASSWORD="$(cat "$PW_FILE")"
    else
        PASSWORD="$(random_password)"
    fi
    [[ "$PASSWORD" != *$'\n'* ]] || die "the password must not contain a newline"
}

save_password() {
    (umask 077 && printf '%s\n' "$PASSWORD" >"$PW_FILE.tmp")
    mv -f "$PW_FILE.tmp" "$PW_FILE"
    own "$PW_FILE"
}

make_tls() {
    info "generating TLS CA and server certificate in $TLS"
    rm -rf "$TLS"
    mkdir -p "$TLS"
    chmod 0755 "$TLS"
    local cnf="$TLS/openssl.cnf"
    cat >"$cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no

[dn]
CN = jwtpgproxy test CA

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
    (
        umask 077
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/ca.key" 2>/dev/null
        openssl req -config "$cnf" -new -x509 -sha256 -days 825 -key "$TLS/ca.key" \
            -extensions v3_ca -set_serial "0x$(openssl rand -hex 16)" -out "$TLS/ca.crt"
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS/server.key" 2>/dev/null
        openssl req -config "$cnf" -new -sha256 -key "$TLS/server.key" -subj "/CN=localhost" \
            -out "$TLS/server.csr"
        openssl x509 -req -sha256 -days 825 -in "$TLS/server.csr" \
            -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
            -extfile "$cnf" -extensions v3_server -out "$TLS/server.crt" 2>/dev/null
    )
    rm -f "$TLS/server.csr"
    chmod 0644 "$TLS/ca.crt" "$TLS/server.crt" "$TLS/openssl.cnf"
    chmod 0600 "$TLS/ca.key" "$TLS/server.key"
    own "$TLS/server.key" "$TLS/server.crt"
}

write_hba() {
    cat >"$DATA/pg_hba.conf" <<'EOF'
# Written by start-postgres.sh (rewritten on every start).
# TYPE DATABASE USER           ADDRESS      METHOD
local  all      all                         trust
host   all      trust_user     127.0.0.1/32 trust
host   all      trust_user     ::1/128      trust
host   all      md5_user       127.0.0.1/32 md5
host   all      md5_user       ::1/128      md5
host   all      cleartext_user 127.0.0.1/32 password
host   all      cleartext_user ::1/128      password
host   all      all            127.0.0.1/32 scram-sha-256
host   all      all            ::1/128      scram-sha-256
EOF
    own "$DATA/pg_hba.conf"
    chmod 0600 "$DATA/pg_hba.conf"
}

write_conf() {  # write_conf PORT LISTEN
    cat >"$DATA/jwtpgproxy.conf" <<EOF
# Written by start-postgres.sh (rewritten on every start); included from postgresql.conf.
listen_addresses = '$2'
port = $1
unix_socket_directories = '$SOCK'
max_connections = 400
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = '$TLS/server.crt'
ssl_key_file = '$TLS/server.key'
shared_buffers = 128MB
# A disposable test cluster: durability off for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
logging_collector = off
EOF
    own "$DATA/jwtpgproxy.conf"
    chmod 0600 "$DATA/jwtpgproxy.conf"
    if ! grep -q "^include = 'jwtpgproxy.conf'" "$DATA/postgresql.conf"; then
        printf "\ninclude = 'jwtpgproxy.conf'\n" >>"$DATA/postgresql.conf"
    fi
}

init_cluster() {
    info "initializing a new cluster in $DATA"
    rm -rf "$DATA"
    if ! as_server "$PGBIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C --no-sync >"$STATE/initdb.log" 2>&1; then
        tail -n 30 "$STATE/initdb.log" >&2
        die "initdb failed (full output in $STATE/initdb.log)"
    fi
}

write_env() {  # write_env PORT
    local tmp="$ENV_FILE.tmp"
    (
        umask 077
        {
            printf 'export PGPROXY_TEST_PGHOST=127.0.0.1\n'
            printf 'export PGPROXY_TEST_PGPORT=%s\n' "$1"
            printf 'export PGPROXY_TEST_PGSOCKET=%q\n' "$SOCK"
            printf 'export PGPROXY_TEST_CA=%q\n' "$TLS/ca.crt"
            printf 'export PGPROXY_TEST_PASSWORD=%q\n' "$PASSWORD"
            printf 'export PGPROXY_TEST_PGBIN=%q\n' "$PGBIN"
            printf 'export PGPROXY_TEST_PGDATA=%q\n' "$DATA"
            printf 'export PGPROXY_TEST_STATE=%q\n' "$STATE"
        } >"$tmp"
    )
    mv -f "$tmp" "$ENV_FILE"
    own "$ENV_FILE"
}

server_psql() {  # server_psql PORT DBNAME  (SQL on stdin)
    as_server "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$1" -U postgres -d "$2" \
        -v pw="$PASSWORD" -f -
}

setup_roles() {  # setup_roles PORT  -- idempotent
    server_psql "$1" postgres <<'SQL'
SET client_min_messages = warning;
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['scram_user', 'md5_user', 'cleartext_user', 'trust_user']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
SET password_encryption = 'scram-sha-256';
ALTER ROLE scram_user     LOGIN PASSWORD :'pw';
ALTER ROLE cleartext_user LOGIN PASSWORD :'pw';
ALTER ROLE trust_user     LOGIN PASSWORD :'pw';
SET password_encryption = 'md5';
ALTER ROLE md5_user       LOGIN PASSWORD :'pw';
RESET password_encryption;
SELECT 'CREATE DATABASE proxytest OWNER scram_user'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'proxytest') \gexec
GRANT ALL ON SCHEMA public TO PUBLIC;
SQL
    server_psql "$1" proxytest <<'SQL'
GRANT ALL ON SCHEMA public TO PUBLIC;
SQL
}

wait_ready() {  # wait_ready PORT -- up to 30 s
    local i
    for ((i = 0; i < 60; i++)); do
        if "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$1" -d postgres -U postgres >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# Start the stopped cluster on $PORT. If the port is taken on 127.0.0.1 or ::1
# (PostgreSQL then only warns and listens on the other address) and the port was
# not fixed by JWTPGPROXY_PG_PORT, retry on another free port; if ::1 makes the
# start fail, retry with listen_addresses='127.0.0.1'. Sets PORT.
start_server() {
    local listen log_start new_log started
    if ipv6_loopback_ok; then listen='127.0.0.1,::1'; else listen='127.0.0.1'; fi
    for _ in 1 2 3 4; do
        write_conf "$PORT" "$listen"
        log_start=$(($(wc -l <"$LOG") + 1))
        started=0
        if as_server "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 30 start >/dev/null 2>&1; then
            started=1
        fi
        new_log="$(tail -n +"$log_start" "$LOG")"
        if grep -q 'Address already in use' <<<"$new_log"; then
            if [[ $started -eq 1 ]]; then
                as_server "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
            fi
            if [[ -n "${JWTPGPROXY_PG_PORT:-}" ]]; then
                tail -n 30 <<<"$new_log" >&2
                die "port $PORT (JWTPGPROXY_PG_PORT) is already in use"
            fi
            PORT="$(pick_free_port)"
            info "port was taken; retrying on port $PORT"
            continue
        fi
        if [[ $started -eq 1 ]]; then
            if wait_ready "$PORT"; then
                return 0
            fi
            tail -n +"$log_start" "$LOG" | tail -n 30 >&2
            as_server "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
            die "PostgreSQL started but does not accept connections on 127.0.0.1:$PORT within 30 s (log: $LOG)"
        fi
        if [[ "$listen" == *::1* ]] && grep -q '::1' <<<"$new_log"; then
            info "could not listen on ::1; retrying with listen_addresses='127.0.0.1'"
            listen='127.0.0.1'
            continue
        fi
        break
    done
    echo "--- tail of $LOG ---" >&2
    tail -n +"$log_start" "$LOG" | tail -n 30 >&2
    die "PostgreSQL failed to start (log: $LOG)"
}

print_env() {
    local port
    port="$(env_value PGPROXY_TEST_PGPORT)"
    printf 'PostgreSQL %s running on 127.0.0.1:%s (TLS on, SCRAM) — source %s\n' \
        "$(pg_version)" "$port" "$ENV_FILE" >&2
    cat "$ENV_FILE"
}

lock_state() {
    exec 9>>"$STATE/.lock"
    flock -w 120 9 || die "timed out waiting for another start-postgres.sh on $STATE"
}

# --- commands ------------------------------------------------------------------
cmd_start() {
    need_pgbin
    ensure_server_user
    command -v python3 >/dev/null || die "python3 is required"
    if ! command -v openssl >/dev/null; then
        if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
            die "openssl is required"
        fi
        info "openssl not found; installing it with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >&2 \
            || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >&2; }
    fi

    mkdir -p "$STATE"
    if [[ $EUID -ne 0 && -e "$DATA" && ! -O "$DATA" ]]; then
        die "$DATA belongs to another user; set JWTPGPROXY_PG_DIR to use a different state dir"
    fi
    chmod 0755 "$STATE"
    own "$STATE"
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -w "$STATE"; then
        die "user postgres cannot reach $STATE (a parent directory is not traversable); set JWTPGPROXY_PG_DIR, e.g. under /tmp"
    fi
    lock_state

    if is_running; then
        # Already up: only follow a changed JWTPGPROXY_PG_PASSWORD, then re-print.
        PORT="$(env_value PGPROXY_TEST_PGPORT)"
        local rewrite=0
        if [[ -z "$PORT" ]]; then  # env file lost: the port is line 4 of postmaster.pid
            PORT="$(as_server sed -n 4p "$DATA/postmaster.pid")"
            [[ "$PORT" =~ ^[0-9]+$ ]] || die "server is running but $ENV_FILE is missing; run '$0 stop' and start again"
            rewrite=1
        fi
        resolve_password
        if [[ $rewrite -eq 1 || "$(printf '%q' "$PASSWORD")" != "$(env_value PGPROXY_TEST_PASSWORD)" ]]; then
            info "updating the test roles and $ENV_FILE"
            setup_roles "$PORT"
            save_password
            write_env "$PORT"
        fi
        print_env
        return 0
    fi

    resolve_password
    if [[ ! -f "$DATA/PG_VERSION" ]]; then
        init_cluster
    fi
    if [[ ! -s "$TLS/server.crt" || ! -s "$TLS/server.key" || ! -s "$TLS/ca.crt" ]]; then
        make_tls
    fi
    mkdir -p "$SOCK"
    chmod 0755 "$SOCK"
    touch "$LOG"
    own "$SOCK" "$LOG"
    write_hba

    local old_port
    old_port="$(env_value PGPROXY_TEST_PGPORT)"
    if [[ -n "${JWTPGPROXY_PG_PORT:-}" ]]; then
        PORT="$JWTPGPROXY_PG_PORT"
    elif [[ -n "$old_port" ]] && port_is_free "$old_port"; then
        PORT="$old_port"
    else
        PORT="$(pick_free_port)"
    fi

    start_server
    setup_roles "$PORT"
    save_password
    write_env "$PORT"
    [[ $EUID -ne 0 ]] || chown -R "$SERVER_USER:$SERVER_USER" "$STATE"
    print_env
}

cmd_stop() {
    if [[ ! -d "$DATA" ]]; then
        info "no cluster at $DATA"
        return 0
    fi
    find_pgbin || die "PostgreSQL server binaries not found"
    lock_state
    if ! is_running; then
        info "not running ($DATA)"
        return 0
    fi
    as_server "$PGBIN/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null
    info "stopped ($DATA)"
}

cmd_status() {
    if is_running; then
        info "running on 127.0.0.1:$(env_value PGPROXY_TEST_PGPORT) ($DATA)"
        return 0
    fi
    info "not running ($DATA)"
    return 3
}

cmd_env() {
    [[ -f "$ENV_FILE" ]] || die "no env file at $ENV_FILE; run '$0 start' first"
    cat "$ENV_FILE"
}

case "$CMD" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
