"""Faults and load against the real PostgreSQL: restarts, terminated backends, fd leaks,
1000 concurrent clients, memory per idle session.

(Upstream down at connect time is covered by test_failures.py and not repeated here.)

Concurrency note: the test cluster has max_connections = 400 and is shared with other test
runs. The 1000-client test therefore connects 1000 clients to the proxy at once (TLS +
startup, all parked at the password prompt, so 1000 sessions are open in the proxy
simultaneously) and then lets at most 200 of them hold an upstream session at any moment (an
asyncio semaphore around password -> queries -> Terminate), so every one of the 1000 logs in
and runs its queries while PostgreSQL never sees more than 200 of them. It logs in upstream as
``trust_user`` over plaintext so that PostgreSQL's own per-connection SCRAM and TLS cost (on
the same 2 CPUs) does not dominate; the proxy's client side (TLS, token check) is the same.
The memory test keeps the realistic path: SCRAM over verified TLS upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest
import uvloop
from harness import (
    Postgres,
    ProxyProcess,
    RawClient,
    postgres_env,
    proxy_dsn,
    rss_kib,
    unverified_client_context,
    wait_for,
    wait_sessions_ended,
)

from jwtpgproxy.protocol import wire

USER = "scram_user"
LOAD_USER = "trust_user"
REPO = Path(__file__).resolve().parents[2]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(target: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _pg_paths() -> tuple[str, str, str]:
    env = postgres_env()
    return env["PGPROXY_TEST_PGBIN"], env["PGPROXY_TEST_PGDATA"], env["PGPROXY_TEST_STATE"]


def _pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    """pg_ctl as the cluster's owner. The server's output goes to start-postgres.sh's log file
    (``-l``): with a pipe, the restarted postmaster would inherit it and run() would wait
    for it forever."""
    bindir, data, state = _pg_paths()
    command = [f"{bindir}/pg_ctl", "-D", data, "-l", f"{state}/log", *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=90,
        check=False,
    )


def _accepts_connections(pg: Postgres) -> bool:
    try:
        with psycopg.connect(pg.superuser_dsn(), connect_timeout=2) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


# --- restarts and terminations ---------------------------------------------------------------


@pytest.mark.restarts_postgres
def test_upstream_restarted_mid_session(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    """``pg_ctl restart -m fast`` under an open session: the client gets PostgreSQL's own
    57P01 (or sees the connection end), the proxy lives on, and once PostgreSQL is back a
    new session through the same proxy works. The shared cluster is back up before return."""
    proxy = start_proxy()
    conn = psycopg.connect(proxy_dsn(proxy, USER, token_for(USER)), autocommit=True)
    assert conn.execute("select 1").fetchone() == (1,)
    try:
        result = _pg_ctl("restart", "-m", "fast", "-w", "-t", "60")
        assert result.returncode == 0, result.stderr
    finally:
        assert wait_for(lambda: _accepts_connections(pg), timeout=60), "PostgreSQL not back"
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select 1")
    assert info.value.sqlstate in (None, "57P01")
    conn.close()
    assert proxy.alive
    with psycopg.connect(proxy_dsn(proxy, USER, token_for(USER))) as fresh:
        assert fresh.execute("select current_user").fetchone() == (USER,)
    assert "Traceback" not in proxy.log()


def test_pg_terminate_backend_relays_57p01(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """An administrator terminates the session's backend: PostgreSQL's FATAL 57P01 reaches
    the client through the splice, and the next connection works."""
    conn = psycopg.connect(proxy_dsn(proxy, USER, token_for(USER)), autocommit=True)
    pid = conn.info.backend_pid
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:
        row = admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,)
    readable, _, _ = select.select([conn.fileno()], [], [], 10)  # PostgreSQL's FATAL
    assert readable, "nothing arrived within 10 s"
    with pytest.raises(psycopg.errors.AdminShutdown) as info:
        conn.execute("select 1")
    assert info.value.sqlstate == "57P01"
    conn.close()
    with psycopg.connect(proxy_dsn(proxy, USER, token_for(USER))) as fresh:
        assert fresh.execute("select 1").fetchone() == (1,)
    assert proxy.alive


# --- descriptor leaks ------------------------------------------------------------------------


def _good(port: int, token: str) -> None:
    client = RawClient(port)
    result = client.login(USER, token)
    assert result.tags[-1] == b"Z", result.messages
    client.send(wire.typed_message(b"Q", b"select 1\0"))
    assert client.read_until_end(stop_tags=(b"Z", b"E")).tags[-1] == b"Z"
    client.send(wire.terminate())
    client.close()


def _bad(port: int, token: str) -> None:
    client = RawClient(port)
    error = client.login(USER, token[:-4] + "AAAA").error()
    assert error is not None and error["C"] == "28P01"
    client.close()


def _abort_at_once(port: int, token: str) -> None:
    socket.create_connection(("127.0.0.1", port)).close()


def _abort_mid_tls(port: int, token: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(wire.ssl_request())
    sock.recv(1)
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a partial ClientHello
    sock.close()


def _abort_after_startup(port: int, token: str) -> None:
    client = RawClient(port)
    client.start_tls()
    client.send(wire.startup_message({"user": USER}))
    client.read_until_end()
    client.close()


def _rst_after_login(port: int, token: str) -> None:
    client = RawClient(port)
    assert client.login(USER, token).tags[-1] == b"Z"
    raw = client.sock
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST, no Terminate


def _rst_mid_query(port: int, token: str) -> None:
    client = RawClient(port)
    assert client.login(USER, token).tags[-1] == b"Z"
    client.send(wire.typed_message(b"Q", b"select pg_sleep(0.2)\0"))
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def _plaintext_refused(port: int, token: str) -> None:
    client = RawClient(port)
    assert client.login(USER, token, tls=False).error() is not None
    client.close()


MIXES = [
    _good,
    _bad,
    _abort_at_once,
    _abort_mid_tls,
    _abort_after_startup,
    _rst_after_login,
    _rst_mid_query,
    _plaintext_refused,
]


def test_no_leaked_file_descriptors(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    """200 mixed connections (good, bad token, aborted at every stage, RST mid-session,
    plaintext refused): the proxy's open descriptors return to where they started."""
    proxy = start_proxy(LOG_LEVEL="INFO")
    assert proxy.process is not None
    pid = proxy.process.pid
    token = token_for(USER)
    _good(proxy.port, token)  # warm-up (lazy imports, first upstream TLS)
    wait_sessions_ended(proxy)
    before = fd_count(pid)
    for i in range(200):
        MIXES[i % len(MIXES)](proxy.port, token)
    settled = wait_for(lambda: fd_count(pid) <= before + 2, timeout=15)
    after = fd_count(pid)
    print(f"proxy fds: before={before} after={after} (200 mixed connections)")
    assert settled, f"fds before={before} after={after}: {sorted(os.listdir(f'/proc/{pid}/fd'))}"
    assert proxy.alive


# --- 1000 concurrent clients -----------------------------------------------------------------


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    tag, length = struct.unpack("!ci", header)
    return tag, await reader.readexactly(length - 4)


async def _until(reader: asyncio.StreamReader, stop: bytes) -> list[tuple[bytes, bytes]]:
    messages = []
    while True:
        tag, body = await _read_message(reader)
        messages.append((tag, body))
        if tag == b"E":
            raise AssertionError(f"error: {wire.decode_fields(body)}")
        if tag == stop:
            return messages


class _Barrier:
    """All clients connected at once -- or, as soon as one of them fails before getting
    there, nobody waits any more (the failure is reported; the test never hangs on it)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.arrived = 0
        self.released = asyncio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == self.total:
            self.released.set()

    def breaks(self) -> None:
        self.released.set()


async def _one_client(
    index: int,
    port: int,
    token: str,
    context: ssl.SSLContext,
    barrier: _Barrier,
    upstream_slots: asyncio.Semaphore,
    queries: int,
) -> None:
    arrived = False
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(wire.ssl_request())
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(context)
        writer.write(wire.startup_message({"user": LOAD_USER, "database": "postgres"}))
        tag, _ = await _read_message(reader)
        assert tag == b"R"
        arrived = True
        barrier.arrive()
        await barrier.released.wait()  # every client is connected to the proxy at this point
        async with upstream_slots:
            writer.write(wire.password_message(token.encode()))
            await _until(reader, b"Z")
            for q in range(queries):
                writer.write(wire.typed_message(b"Q", f"select {index} * 1000 + {q}\0".encode()))
                rows = [b for t, b in await _until(reader, b"Z") if t == b"D"]
                assert len(rows) == 1 and rows[0].endswith(str(index * 1000 + q).encode())
            writer.write(wire.terminate())
            await writer.drain()
    finally:
        if not arrived:
            barrier.breaks()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@pytest.mark.xdist_group("many_upstream_sessions")  # see conftest.py
def test_1000_concurrent_clients(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """1000 TLS clients connected to the proxy at once; each then logs in and runs 3 queries
    with at most 200 upstream sessions at a time (see the module docstring). Zero errors.

    Bounded: a client that fails before all are connected releases the others at once, and
    the whole run has a deadline, so a loaded machine gives a failure, never a hang. The
    clients run on uvloop with one TLS context, so the test's own cost stays small next to
    the proxy's."""
    raise_nofile(8192)
    total, slots, queries, deadline = 1000, 200, 3, 90.0
    proxy = start_proxy(
        LOG_LEVEL="INFO",
        UPSTREAM__SSLMODE="disable",
        UPSTREAM__SSLROOTCERT=None,
        # trust over plaintext: the loopback test server is trusted, so say so.
        UPSTREAM__REQUIRE_AUTH="none",
        AUTHENTICATION_TIMEOUT="120",
        # 1000 TLS handshakes at once on a shared 2-core machine: some startup packets
        # arrive after the default 10 s STARTUP_TIMEOUT.
        STARTUP_TIMEOUT="120",
        MAX_CLIENT_CONNECTIONS="2000",
        MAX_PENDING_LOGINS="2000",
    )
    assert proxy.process is not None
    token = token_for(LOAD_USER, ttl=600)
    context = unverified_client_context()

    async def main() -> tuple[list[BaseException | None], float, int]:
        barrier = _Barrier(total)
        upstream_slots = asyncio.Semaphore(slots)
        peak_fds = 0

        async def watch() -> None:
            nonlocal peak_fds
            while True:
                peak_fds = max(peak_fds, fd_count(proxy.process.pid))  # type: ignore[union-attr]
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline):
                results = await asyncio.gather(
                    *(
                        _one_client(i, proxy.port, token, context, barrier, upstream_slots, queries)
                        for i in range(total)
                    ),
                    return_exceptions=True,
                )
        finally:
            watcher.cancel()
        return list(results), time.monotonic() - started, peak_fds

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            results, elapsed, peak_fds = runner.run(main())
        except TimeoutError:
            pytest.fail(f"1000 clients not done within {deadline:g}s")
    errors = [r for r in results if r is not None]
    print(
        f"1000 clients: {elapsed:.1f}s, {total * queries} queries, errors={len(errors)}, "
        f"proxy peak fds={peak_fds}"
    )
    assert not errors, errors[:5]
    assert peak_fds > total  # they really were connected at the same time
    assert proxy.alive


# --- memory per idle session -----------------------------------------------------------------


@pytest.mark.xdist_group("many_upstream_sessions")  # see conftest.py
def test_memory_per_idle_authenticated_connection(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """200 idle, authenticated asyncpg sessions (TLS on both sides, SCRAM upstream): RSS
    delta / 200. (200, not more: the cluster's 400 connections are shared with other runs.)"""
    raise_nofile(8192)
    proxy = start_proxy(LOG_LEVEL="INFO", MAX_CLIENT_CONNECTIONS="2000")
    assert proxy.process is not None
    pid = proxy.process.pid
    token = token_for(USER, ttl=600)
    context = unverified_client_context()
    count = 200

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user=USER,
            password=token,
            database="postgres",
            ssl=context,
            statement_cache_size=0,
        )

    def closed(sessions: int) -> None:
        """Until the proxy has logged the end of ``sessions`` sessions (bounded)."""
        assert wait_for(lambda: proxy.log().count(": connection closed: ") >= sessions, timeout=30)

    async def main() -> tuple[int, int, int]:
        warm = [await connect() for _ in range(10)]
        for conn in warm:
            assert await conn.fetchval("select 1") == 1
            await conn.close()
        await asyncio.to_thread(closed, 10)
        before = rss_kib(pid)
        gate = asyncio.Semaphore(50)

        async def one() -> asyncpg.Connection:
            async with gate:
                conn = await connect()
                assert await conn.fetchval("select 1") == 1
                return conn

        conns = await asyncio.gather(*(one() for _ in range(count)))
        during = rss_kib(pid)  # every session is open and has answered a query
        await asyncio.gather(*(c.close() for c in conns))
        await asyncio.to_thread(closed, 10 + count)
        return before, during, rss_kib(pid)

    before, during, after = asyncio.run(main())
    per_connection = (during - before) / count
    print(
        f"proxy RSS: before={before} KB, with {count} idle sessions={during} KB "
        f"({per_connection:.1f} KB per session), after closing={after} KB"
    )
    assert per_connection < 512, per_connection
    assert proxy.alive
