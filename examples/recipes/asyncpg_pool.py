"""asyncpg create_pool with a password callable: a current token for every new connection.

Connection settings come from PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE and
PGSSLROOTCERT (asyncpg reads them like libpq); the token from JWTPG_TOKEN_FILE,
JWTPG_TOKEN_COMMAND or JWTPG_PRIVATE_KEY (see jwtpgproxy.client.token_source_from_env).
"""

import asyncio
import os

import asyncpg

from jwtpgproxy.client import token_source_from_env

tokens = token_source_from_env()
# asyncpg has no maximum connection lifetime: expire the pool's connections this often,
# below the time a new connection's token has left at least (the source's refresh margin,
# JWTPG_REFRESH_MARGIN, 60 s by default); each is replaced at its next acquire or release.
EXPIRE_EVERY_SECONDS = float(os.environ.get("POOL_MAX_LIFETIME_SECONDS", "45"))
_expiry_tasks: dict[asyncpg.Pool, asyncio.Task[None]] = {}


async def open_pool() -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        password=tokens.token_async,  # called (and awaited) for each new connection
        max_inactive_connection_lifetime=EXPIRE_EVERY_SECONDS,  # idle ones: closed on time
        min_size=1,
        max_size=4,
    )
    # Keep a reference: the event loop holds tasks only weakly.
    _expiry_tasks[pool] = asyncio.create_task(expire_connections(pool))
    return pool


async def expire_connections(pool: asyncpg.Pool) -> None:
    while True:
        await asyncio.sleep(EXPIRE_EVERY_SECONDS)
        await pool.expire_connections()


async def query_once(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("select pg_backend_pid()"))


async def close_pool(pool: asyncpg.Pool) -> None:
    _expiry_tasks.pop(pool).cancel()
    await pool.close()
