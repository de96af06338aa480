"""Protocol completeness: cancel, direct TLS, protocol 3.2, channel binding, transparency.

Every test runs real drivers through the proxy to the real local PostgreSQL and, where the
question is "does it behave as if talking to PostgreSQL", compares with a direct connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import psycopg2
import psycopg2.extensions
import pytest
from harness import (
    Postgres,
    ProxyProcess,
    RawClient,
    proxy_dsn,
    unverified_client_context,
    wait_backend_sleeping,
)
from test_clients import psql_binary

from jwtpgproxy.protocol import wire

# --- Cancel -----------------------------------------------------------------------------


def _assert_cancels(
    run_query: Callable[[], None], cancel: Callable[[], None], pg: Postgres, backend_pid: int
) -> None:
    """``run_query`` runs pg_sleep(30); ``cancel`` fires from a thread once the backend is
    in the sleep; the query must end with SQLSTATE 57014 within a few seconds."""

    def cancel_when_sleeping() -> None:
        wait_backend_sleeping(pg, "pid = %s", backend_pid)
        cancel()

    canceller = threading.Thread(target=cancel_when_sleeping)
    started = time.monotonic()
    canceller.start()
    try:
        run_query()
    finally:
        canceller.join()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg3_cancel(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str], method: str
) -> None:
    """cancel() is libpq's PQcancel (plaintext); cancel_safe() is libpq 17's encrypted
    cancel API, which sends the CancelRequest over TLS like the session itself."""
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        pid = conn.info.backend_pid

        def query() -> None:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")

        _assert_cancels(query, getattr(conn, method), pg, pid)
        # The session is usable afterwards (psycopg had opened a transaction).
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
    expected_tls = " tls=True" if method == "cancel_safe" else " tls=False"  # not upstream_tls
    line = next(x for x in proxy.log().splitlines() if f"cancel request forwarded: pid={pid} " in x)
    assert expected_tls in line


def test_psycopg2_cancel(proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]) -> None:
    conn = psycopg2.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    try:
        with conn.cursor() as cur:

            def query() -> None:
                with pytest.raises(psycopg2.errors.QueryCanceled):
                    cur.execute("select pg_sleep(30)")

            _assert_cancels(query, conn.cancel, pg, conn.get_backend_pid())
    finally:
        conn.close()


def test_psql_ctrl_c_cancels(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    process = subprocess.Popen(
        [
            psql_binary(pg),
            proxy_dsn(proxy, "scram_user", None, application_name="psql-ctrl-c"),
            "-c",
            "select pg_sleep(30)",
        ],
        env={**os.environ, "PGPASSWORD": token_for("scram_user")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_backend_sleeping(pg, "application_name = 'psql-ctrl-c'")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)  # what Ctrl-C does: psql sends a CancelRequest
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert time.monotonic() - started < 5
    assert "canceling statement due to user request" in stderr
    assert process.returncode == 1


def test_asyncpg_timeout_cancels_server_side(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="scram_user",
            password=token_for("scram_user"),
            database="postgres",
            ssl="require",
        )
        try:
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(30)", timeout=1)
            # If the cancel had not reached the server, this would wait ~29 s for the sleep.
            started = time.monotonic()
            assert await conn.fetchval("select 42", timeout=10) == 42
            assert time.monotonic() - started < 3
        finally:
            await conn.close()

    asyncio.run(main())


@pytest.mark.xdist_group("many_upstream_sessions")  # see conftest.py
def test_100_concurrent_cancels_hit_only_their_own_sessions(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    token = token_for("scram_user")

    async def main() -> None:
        conns = await asyncio.gather(
            *(
                asyncpg.connect(
                    host="127.0.0.1",
                    port=proxy.port,
                    user="scram_user",
                    password=token,
                    database="postgres",
                    ssl="require",
                )
                for _ in range(100)
            )
        )
        try:
            pids = [c.get_server_pid() for c in conns]
            assert len(set(pids)) == 100
            tasks = [asyncio.create_task(c.fetchval("select pg_sleep(60)")) for c in conns]
            # Every backend in its sleep (bounded), then cancel half of them.
            await asyncio.to_thread(
                wait_backend_sleeping, pg, "pid = any(%s) having count(*) = %s", pids, len(pids)
            )
            cancelled = set(pids[::2])
            for conn, task in zip(conns, tasks, strict=True):
                if conn.get_server_pid() in cancelled:
                    task.cancel()  # asyncpg sends a CancelRequest for the running query
            admin = await asyncpg.connect(
                host=pg.host,
                port=pg.port,
                user="scram_user",
                password=pg.password,
                database="postgres",
                ssl=False,
            )
            try:
                # Poll (a loaded machine may take a while) until every cancelled session is
                # idle; the others sleep for a minute, so they stay distinguishable.
                for _ in range(150):
                    rows = await admin.fetch(
                        "select pid, state from pg_stat_activity where pid = any($1::int[])",
                        pids,
                    )
                    state = {row["pid"]: row["state"] for row in rows}
                    if all(state.get(pid) == "idle" for pid in cancelled):
                        break
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()
            assert all(state[pid] == "idle" for pid in cancelled), state
            assert all(state[pid] == "active" for pid in set(pids) - cancelled), state
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await asyncio.gather(*(c.close(timeout=5) for c in conns), return_exceptions=True)

    asyncio.run(main())


def test_cancel_key_lengths_follow_protocol_version(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    """3.0 clients get a 4-byte key; 3.2 clients a 32-byte one (as PostgreSQL 18). Either
    way the pid is upstream's and the secret is not upstream's."""
    for minor, key_length in ((0, 4), (2, 32)):
        client = RawClient(proxy.port)
        client.start_tls()
        client.send(
            wire.startup_message({"user": "scram_user", "database": "postgres"}, (3 << 16) | minor)
        )
        assert client.read_until_end().tags == [b"R"]
        client.send(wire.password_message(token_for("scram_user").encode()))
        result = client.read_until_end(stop_tags=(b"E", b"Z"))
        keys = [body for tag, body in result.messages if tag == b"K"]
        assert len(keys) == 1 and len(keys[0]) == 4 + key_length, (minor, result.tags)
        assert b"v" not in result.tags  # 3.0 and 3.2 are both spoken as asked
        pid = int.from_bytes(keys[0][:4], "big")
        client.send(wire.typed_message(b"Q", b"select pg_backend_pid()\0"))
        rows = client.read_until_end(stop_tags=(b"Z",))
        data_rows = [body for tag, body in rows.messages if tag == b"D"]
        assert data_rows and str(pid).encode() in data_rows[0]
        client.close()


# --- LISTEN/NOTIFY and backend pid ---------------------------------------------------------


def test_notify_carries_own_pid_and_reaches_other_sessions(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn, autocommit=True) as notifier,
    ):
        listener.execute("listen proxy_channel")
        # A session's own NOTIFY arrives with its own pid, which equals backend_pid.
        listener.execute("notify proxy_channel, 'self'")
        own = next(listener.notifies(timeout=5, stop_after=1))
        assert (own.payload, own.pid) == ("self", listener.info.backend_pid)
        # A NOTIFY from another session reaches the listener, with the sender's pid.
        notifier.execute("notify proxy_channel, 'other'")
        other = next(listener.notifies(timeout=5, stop_after=1))
        assert (other.payload, other.pid) == ("other", notifier.info.backend_pid)
        assert notifier.execute("select pg_backend_pid()").fetchone() == (
            notifier.info.backend_pid,
        )


# --- Direct TLS ------------------------------------------------------------------------------


def test_direct_tls_with_psycopg3(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """libpq 17+ sslnegotiation=direct: a TLS ClientHello first, no SSLRequest."""
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"), sslnegotiation="direct")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        assert conn.info.pgconn.ssl_in_use

        def query() -> None:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")

        # The CancelRequest also uses direct TLS.
        _assert_cancels(query, conn.cancel_safe, pg, conn.info.backend_pid)


def test_direct_tls_without_alpn_refused(proxy: ProxyProcess) -> None:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with unverified_client_context().wrap_socket(raw) as tls:  # no ALPN offered
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
    assert data[:1] == b"E"
    fields = wire.decode_fields(data[5:])
    assert fields["C"] == "08P01"
    assert "ALPN" in fields["M"]


def test_direct_tls_refused_when_tls_disabled(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(
        DOWNSTREAM__SSLMODE="disable", DOWNSTREAM__CERTFILE=None, DOWNSTREAM__KEYFILE=None
    )
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"), sslnegotiation="direct")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5)
    assert proxy.alive


# --- Protocol version negotiation ---------------------------------------------------------


def test_protocol_32_with_psycopg3(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """The client speaks 3.2 with the proxy; upstream (PostgreSQL 15) negotiates 3.0 with the
    proxy; the session works, and cancel works with the 3.2-length key."""
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"), max_protocol_version="3.2")
    with psycopg.connect(dsn) as conn:
        assert conn.info.pgconn.protocol_version == 3
        assert conn.info.pgconn.full_protocol_version == 30002  # 3.2, as the client asked
        assert conn.execute("select current_user").fetchone() == ("scram_user",)

        def query() -> None:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(30)")

        _assert_cancels(query, conn.cancel_safe, pg, conn.info.backend_pid)


def test_pq_options_answered_with_negotiate_protocol_version(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(
        wire.startup_message(
            {"user": "scram_user", "database": "postgres", "_pq_.made_up": "1"}, (3 << 16) | 7
        )
    )
    first = client.read_until_end()
    assert first.tags == [b"v", b"R"]
    version, count = int.from_bytes(first.messages[0][1][:4], "big"), first.messages[0][1][4:8]
    assert version == (3 << 16) | 2 and count == b"\0\0\0\1"
    assert first.messages[0][1][8:] == b"_pq_.made_up\0"
    client.send(wire.password_message(token_for("scram_user").encode()))
    assert client.read_until_end(stop_tags=(b"E", b"Z")).tags[-1] == b"Z"
    client.close()


# --- Channel binding ----------------------------------------------------------------------


def test_channel_binding_required_refuses_non_scram_upstream(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(UPSTREAM__CHANNEL_BINDING="require")
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "method=scram-sha-256-plus" in proxy.log()
    for role in ("trust_user", "md5_user"):
        error = RawClient(proxy.port).login(role, token_for(role)).error()
        assert error is not None and error["C"] == "28000", role
    assert "channel binding required" in proxy.log()


def test_channel_binding_disabled_uses_plain_scram(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(UPSTREAM__CHANNEL_BINDING="disable")
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "method=scram-sha-256 tls=True" in proxy.log()


# --- Transparency -------------------------------------------------------------------------

_REPORTED = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
    "integer_datetimes",
]


def test_parameter_status_equals_upstreams(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    extra = {
        "application_name": "transparency",
        "options": "'-c DateStyle=SQL,DMY -c TimeZone=Pacific/Auckland -c IntervalStyle=iso_8601'",
        "client_encoding": "WIN1252",
    }
    through = proxy_dsn(proxy, "scram_user", token_for("scram_user"), **extra)
    direct = pg.dsn("scram_user", **extra)
    with psycopg.connect(through) as p, psycopg.connect(direct) as d:
        for name in _REPORTED:
            assert p.info.parameter_status(name) == d.info.parameter_status(name), name
        assert p.info.parameter_status("DateStyle") == "SQL, DMY"
        assert p.info.parameter_status("TimeZone") == "Pacific/Auckland"
        query = (
            "select current_setting('DateStyle'), current_setting('TimeZone'),"
            " current_setting('IntervalStyle'), current_setting('client_encoding'),"
            " current_setting('application_name'), now()::text <> ''"
        )
        assert p.execute(query).fetchone() == d.execute(query).fetchone()


def test_extended_protocol_matches_direct(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """asyncpg: Parse/Bind/Describe/Execute with binary types, prepared statements, errors
    inside the extended protocol and recovery -- the same through the proxy as direct."""

    async def run(**connect: object) -> list[object]:
        conn = await asyncpg.connect(database="postgres", **connect)  # type: ignore[arg-type]
        try:
            statement = await conn.prepare(
                "select $1::int8 + 1, $2::text || '!', $3::numeric * 2, $4::jsonb -> 'k',"
                " $5::bytea, $6::timestamptz"
            )
            import datetime
            import decimal

            moment = datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.UTC)
            row = await statement.fetchrow(
                41, "hi", decimal.Decimal("1.25"), '{"k": [1, 2]}', b"\x00\xff", moment
            )
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetchval("select 1 / $1::int", 0)
            many = await conn.fetch("select i, i * i from generate_series(1, $1::int) i", 500)
            return [tuple(row), len(many), many[-1][1], await conn.fetchval("select 7")]
        finally:
            await conn.close()

    via_proxy = asyncio.run(
        run(
            host="127.0.0.1",
            port=proxy.port,
            user="scram_user",
            password=token_for("scram_user"),
            ssl="require",
        )
    )
    direct = asyncio.run(
        run(host=pg.host, port=pg.port, user="scram_user", password=pg.password, ssl=False)
    )
    assert via_proxy == direct
    assert via_proxy[1:] == [500, 250000, 7]


def test_50mb_bytea_round_trip(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    payload = os.urandom(50 * 1024 * 1024)
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        echoed = conn.execute("select %b::bytea", (payload,), binary=True).fetchone()
        assert echoed is not None and echoed[0] == payload
        conn.execute("create temp table blobs (b bytea)")
        conn.execute("insert into blobs values (%b)", (payload,))
        assert conn.execute("select md5(b) from blobs").fetchone() == (
            __import__("hashlib").md5(payload).hexdigest(),
        )


def test_10000_statement_pipeline(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    """psycopg 3 pipeline mode: 10 000 statements sent without waiting for results."""
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        conn.execute("create temp table piped (i int)")
        with conn.pipeline(), conn.cursor() as cur:
            for i in range(10_000):
                cur.execute("insert into piped values (%s)", (i,))
        assert conn.execute("select count(*), sum(i) from piped").fetchone() == (
            10_000,
            sum(range(10_000)),
        )
