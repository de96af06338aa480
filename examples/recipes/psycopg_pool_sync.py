"""psycopg 3 ConnectionPool: a current token for every new connection.

Connection settings come from libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE and
PGSSLROOTCERT; the token from JWTPG_TOKEN_FILE, JWTPG_TOKEN_COMMAND or JWTPG_PRIVATE_KEY
(see jwtpgproxy.client.token_source_from_env).
"""

import os
import threading
import time

from psycopg_pool import ConnectionPool

from jwtpgproxy.client import token_source_from_env

tokens = token_source_from_env()
# Below the time a new connection's token has left at least (the source's refresh margin,
# JWTPG_REFRESH_MARGIN, 60 s by default).
MAX_LIFETIME_SECONDS = float(os.environ.get("POOL_MAX_LIFETIME_SECONDS", "45"))
# max_lifetime plus this is what an idle connection may reach: also below the margin.
RETIRE_EVERY_SECONDS = MAX_LIFETIME_SECONDS / 4


def retire_expired(pool: ConnectionPool) -> None:
    """max_lifetime is enforced when a connection is returned to the pool; one that sits
    idle is retired by pool.check(), run here every few seconds."""
    while True:
        time.sleep(RETIRE_EVERY_SECONDS)
        if pool.closed:
            return
        pool.check()  # replaces expired and broken idle connections


def open_pool() -> ConnectionPool:
    pool = ConnectionPool(
        kwargs=lambda: {"password": tokens.token()},  # called for each new connection
        max_lifetime=MAX_LIFETIME_SECONDS,
        check=ConnectionPool.check_connection,  # a broken connection is never handed out
        min_size=1,
        max_size=4,
        open=True,
    )
    threading.Thread(target=retire_expired, args=(pool,), daemon=True).start()
    return pool


def query_once(pool: ConnectionPool) -> int:
    with pool.connection() as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])


def close_pool(pool: ConnectionPool) -> None:
    pool.close()
