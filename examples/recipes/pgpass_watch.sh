#!/bin/sh
# For tools that read only the password file: keep the entry for PGHOST:PGPORT:PGDATABASE:
# PGUSER in $PGPASSFILE (default ~/.pgpass) holding a current token until stopped. Other
# entries are kept; the file is replaced atomically with mode 0600, as libpq requires.
# Instead of --key: --token-file PATH, or --token-command "gcloud auth print-identity-token".
set -eu
exec jwt-postgresql-proxy pgpass --watch --key "$JWTPG_PRIVATE_KEY" --ttl "${JWTPG_TTL:-15m}" \
    --refresh-margin "${JWTPG_REFRESH_MARGIN:-300}"
