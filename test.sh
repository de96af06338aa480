#!/usr/bin/env bash
# Run the test suite on a fresh machine: venv + deps, local PostgreSQL, lint, pytest.
#
#   ./test.sh [pytest args...]
#
# Environment:
#   RUN_LINT=0        skip `ruff check src tests` and `mypy src`
#   TEST_WORKERS=N    pytest-xdist worker processes (default 2; 0 or 1: one process, as
#                     pytest alone; also implied when the arguments contain -n or -p no:xdist)
#   KEEP_POSTGRES=1   keep the PostgreSQL that this script started running afterwards
#                     (one that was already running is never stopped)
#   JWTPGPROXY_PG_*   passed on to ./start-postgres.sh (state dir, port, password)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$REPO_DIR"

section() { printf '\n=== %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

# --- venv ----------------------------------------------------------------------
section venv
command -v python3 >/dev/null || die "python3 not found"
venv_ok() { [[ -x .venv/bin/python ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; }
if ! venv_ok; then
    rm -rf .venv
    echo "creating .venv with $(python3 --version 2>&1) ($(command -v python3))"
    if ! python3 -m venv .venv; then
        rm -rf .venv
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
            echo "python3 -m venv failed (ensurepip missing?); installing python3-venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq python3-venv
            python3 -m venv .venv || die "python3 -m venv still fails after installing python3-venv"
        else
            die "python3 -m venv failed; install the venv module (Debian/Ubuntu: sudo apt-get install python3-venv)"
        fi
    fi
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python --version

# --- postgres ------------------------------------------------------------------
section postgres
STARTED_PG=0
# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local rc=$?
    if [[ $STARTED_PG -eq 1 ]]; then
        if [[ "${KEEP_POSTGRES:-0}" == 1 ]]; then
            echo "KEEP_POSTGRES=1: leaving PostgreSQL running (stop it with ./start-postgres.sh stop)"
        else
            section "postgres (stop)"
            ./start-postgres.sh stop || true
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ./start-postgres.sh status >/dev/null 2>&1; then
    echo "reusing the PostgreSQL that is already running (it will not be stopped)"
else
    STARTED_PG=1
    ./start-postgres.sh start >/dev/null
fi
# shellcheck source=/dev/null
source <(./start-postgres.sh env)
: "${PGPROXY_TEST_PGPORT:?./start-postgres.sh env did not provide PGPROXY_TEST_PGPORT}"
# The server bin dirs go first on PATH: $PGPROXY_TEST_PGBIN, then /usr/lib/postgresql/*/bin (newest first).
pg_dirs=("$PGPROXY_TEST_PGBIN")
while IFS= read -r d; do
    pg_dirs+=("$d")
done < <(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -rV)
pg_path=""
for d in "${pg_dirs[@]}"; do
    if [[ -d "$d" && ":$pg_path:" != *":$d:"* ]]; then
        pg_path="${pg_path:+$pg_path:}$d"
    fi
done
export PATH="${pg_path:+$pg_path:}$PATH"
env | grep '^PGPROXY_TEST_' | grep -v PASSWORD | sort
echo "PostgreSQL: $(postgres --version 2>/dev/null || echo '?') (PGPROXY_TEST_PGBIN=$PGPROXY_TEST_PGBIN)"

# --- haproxy (tests/integration/test_scaleout.py) ------------------------------
section haproxy
if ! command -v haproxy >/dev/null && [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing haproxy for the scale-out test"
    # Keep Debian's maintainer scripts from starting the packaged service: a
    # policy-rc.d that exits 101 ("action forbidden"), only while installing.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq haproxy >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq haproxy >/dev/null 2>&1; } \
        || echo "could not install haproxy: test_scaleout.py will be skipped"
    if [[ $created_policy -eq 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi
if command -v haproxy >/dev/null; then
    haproxy -v | sed -n 1p  # (not head: its early exit would fail the pipe under pipefail)
else
    echo "haproxy not available (not root, or no apt-get): test_scaleout.py will be skipped"
fi

# --- node (for the node-postgres recipe test) -----------------------------------
# tests/integration/test_recipes.py installs the npm package `pg` into a cache directory
# itself; it needs node and npm, and skips that one recipe (saying why) without them.
section node
if ! command -v npm >/dev/null && [[ "${INSTALL_NODE:-1}" != 0 ]] && [[ $EUID -eq 0 ]] \
    && command -v apt-get >/dev/null; then
    echo "npm not found; installing nodejs and npm (INSTALL_NODE=0 skips this)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; } \
        || echo "could not install nodejs/npm: the node-postgres recipe test will be skipped"
fi
if command -v npm >/dev/null; then
    echo "node $(node --version 2>/dev/null || echo '?'), npm $(npm --version 2>/dev/null || echo '?')"
else
    echo "npm not found: the node-postgres recipe test will be skipped"
fi

# --- lint ----------------------------------------------------------------------
if [[ "${RUN_LINT:-1}" != 0 ]]; then
    section "lint: ruff check src tests"
    lint_failed=0
    .venv/bin/ruff check src tests || lint_failed=1
    section "lint: mypy src"
    .venv/bin/mypy src || lint_failed=1
    [[ $lint_failed -eq 0 ]] || die "lint failed (ruff and/or mypy, see above); RUN_LINT=0 skips it"
else
    section "lint (skipped: RUN_LINT=0)"
fi

# --- pytest --------------------------------------------------------------------
section pytest
# Two workers: most integration tests wait on the proxy, PostgreSQL or a deadline, so the
# second core fills those waits. Tests that must not overlap say so (conftest.py).
workers="${TEST_WORKERS:-2}"
xdist=()
if [[ "$workers" =~ ^[0-9]+$ && "$workers" -gt 1 ]] && ! [[ " $* " =~ \ (-n|--numprocesses|-p\ no:xdist) ]]; then
    xdist=(-n "$workers" --dist loadgroup)
fi
rc=0
.venv/bin/python -m pytest ${xdist[@]+"${xdist[@]}"} "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test.sh: error: pytest collected no tests (exit code 5); treating that as a failure" >&2
    exit 1
fi
exit "$rc"
