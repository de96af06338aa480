#!/usr/bin/env bash
# One command for the benchmark (issue 7): creates what it needs, then runs bench/run.py.
#   bench/run.sh [--rounds 3] [--quick] [--out bench/results/] [--proxy-env WORKERS=2] ...
#   bench/run.sh --check [--unix] [--max-cpu-ratio 1.8]   # ~2 min CPU check; exit 1 = regression
#   bench/run.sh --strace [--unix]                         # syscalls per transaction
# (bench/run.py --help lists every option; bench/README.md explains them.)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ ! -x .venv/bin/jwt-postgresql-proxy ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e .
fi
.venv/bin/python -c 'import matplotlib, psycopg' 2>/dev/null || .venv/bin/pip install -q -r bench/requirements.txt
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
  [ "$(id -u)" -eq 0 ] || { echo "bench/run.sh: pgbouncer missing; install it (apt-get install pgbouncer) or pass --no-pgbouncer" >&2; exit 2; }
  # Keep Debian's pgbouncer service from starting on 6432: a temporary policy-rc.d
  # (only if there is none; an existing one is left alone).
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq pgbouncer || { apt-get update -qq && apt-get install -y -qq pgbouncer; }; } >&2
  [ "$own_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
fi
exec .venv/bin/python bench/run.py "$@"
