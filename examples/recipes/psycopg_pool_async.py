"""psycopg 3 AsyncConnectionPool: a current token for every new connection.

Connection settings come from libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE and
PGSSLROOTCERT; the token from JWTPG_TOKEN_FILE, JWTPG_TOKEN_COMMAND or JWTPG_PRIVATE_KEY
(see jwtpgproxy.client.token_source_from_env).
"""

import asyncio
import os
from typing import Any

from psycopg_pool import AsyncConnectionPool

from jwtpgproxy.client import token_source_from_env

tokens = token_source_from_env()
# Below the time a new connection's token has left at least (the source's refresh margin,
# JWTPG_REFRESH_MARGIN, 60 s by default).
MAX_LIFETIME_SECONDS = float(os.environ.get("POOL_MAX_LIFETIME_SECONDS", "45"))
# max_lifetime plus this is what an idle connection may reach: also below the margin.
RETIRE_EVERY_SECONDS = MAX_LIFETIME_SECONDS / 4
_retire_tasks: dict[AsyncConnectionPool, asyncio.Task[None]] = {}


async def connection_kwargs() -> dict[str, Any]:
    return {"password": await tokens.token_async()}  # never blocks the event loop


async def retire_expired(pool: AsyncConnectionPool) -> None:
    """max_lifetime is enforced when a connection is returned to the pool; one that sits
    idle is retired by pool.check(), run here every few seconds."""
    while True:
        await asyncio.sleep(RETIRE_EVERY_SECONDS)
        if pool.closed:
            return
        await pool.check()  # replaces expired and broken idle connections


async def open_pool() -> AsyncConnectionPool:
    pool = AsyncConnectionPool(
        kwargs=connection_kwargs,  # called for each new connection
        max_lifetime=MAX_LIFETIME_SECONDS,
        check=AsyncConnectionPool.check_connection,  # a broken one is never handed out
        min_size=1,
        max_size=4,
        open=False,
    )
    await pool.open()
    _retire_tasks[pool] = asyncio.create_task(retire_expired(pool))  # keep a reference
    return pool


async def query_once(pool: AsyncConnectionPool) -> int:
    async with pool.connection() as conn:
        cursor = await conn.execute("select pg_backend_pid()")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def close_pool(pool: AsyncConnectionPool) -> None:
    await pool.close()  # first: the retiring task then ends on its own
    _retire_tasks.pop(pool).cancel()
