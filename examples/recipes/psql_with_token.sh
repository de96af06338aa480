#!/bin/sh
# psql (or pg_dump, pgbench, ...) with a token minted for this one run. Connection settings
# come from PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE=verify-full and PGSSLROOTCERT.
# With an identity provider instead of a key: PGPASSWORD="$(gcloud auth print-identity-token)"
set -eu
PGPASSWORD="$(jwt-postgresql-proxy token --key "$JWTPG_PRIVATE_KEY" --sub "$PGUSER" --ttl "${JWTPG_TTL:-5m}")"
export PGPASSWORD
exec psql "$@"
