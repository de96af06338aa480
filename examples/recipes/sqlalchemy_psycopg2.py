"""SQLAlchemy 2 with psycopg2: a current token for every new connection.

Connection settings come from libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE and
PGSSLROOTCERT; the token from JWTPG_TOKEN_FILE, JWTPG_TOKEN_COMMAND or JWTPG_PRIVATE_KEY
(see jwtpgproxy.client.token_source_from_env).
"""

import os
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

from jwtpgproxy.client import token_source_from_env

tokens = token_source_from_env()
# Below the time a new connection's token has left at least (the source's refresh margin,
# JWTPG_REFRESH_MARGIN, 60 s by default), so that no connection is handed out after its
# token has expired (with TOKEN__END_SESSIONS_ON_EXPIRY the proxy ends it then).
POOL_RECYCLE_SECONDS = float(os.environ.get("POOL_RECYCLE_SECONDS", "45"))


def open_pool() -> Engine:
    engine = create_engine("postgresql+psycopg2://", pool_recycle=POOL_RECYCLE_SECONDS)

    @event.listens_for(engine, "do_connect")
    def provide_token(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams["password"] = tokens.token()

    return engine


def query_once(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())


def close_pool(engine: Engine) -> None:
    engine.dispose()
