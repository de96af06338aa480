"""Real clients (psql, psycopg2, psycopg 3, asyncpg) through the proxy to real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import psycopg2
import pytest
from harness import Postgres, ProxyProcess, RawClient, proxy_dsn, rss_kib, wait_for

from jwtpgproxy.protocol import wire


def psql_binary(pg: Postgres) -> str:
    candidate = os.path.join(pg.bindir, "psql") if pg.bindir else ""
    found = candidate if os.path.exists(candidate) else shutil.which("psql")
    assert found, "psql not found"
    return found


def test_psql_connects_and_queries(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    # Documented way to pass a long token to psql: PGPASSWORD (psql < 14 cut prompts at 100).
    env = {**os.environ, "PGPASSWORD": token_for("scram_user")}
    result = subprocess.run(
        [
            psql_binary(pg),
            proxy_dsn(proxy, "scram_user", None),
            "-Atc",
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    # Upstream sees the verified role, over TLS (UPSTREAM__SSLMODE=verify-full).
    assert result.stdout.strip() == "scram_user|t"


def test_psycopg2(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    conn = psycopg2.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    try:
        with conn.cursor() as cur:
            cur.execute("select current_user, 6 * 7")
            assert cur.fetchone() == ("scram_user", 42)
    finally:
        conn.close()


def test_psycopg3(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        row = conn.execute("select current_user, %s::int + 1", (41,)).fetchone()
        assert row == ("scram_user", 42)


def test_asyncpg(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
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
            # asyncpg uses the extended protocol with prepared statements throughout.
            assert await conn.fetchval("select current_user") == "scram_user"
            assert await conn.fetchval("select $1::int * 2", 21) == 42
        finally:
            await conn.close()

    asyncio.run(main())


@pytest.mark.parametrize("key", ["ed25519", "rsa", "ec"])
def test_each_algorithm(proxy: ProxyProcess, token_for: Callable[..., str], key: str) -> None:
    """EdDSA, RS256 and ES256 tokens, each verified by its own configured key; the EC key
    is PUBLIC_KEYS__7 (a gap in the numbering)."""
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user", key))) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
    assert f"alg={ {'ed25519': 'EdDSA', 'rsa': 'RS256', 'ec': 'ES256'}[key] }" in proxy.log()


def test_token_signed_by_second_of_two_keys(
    start_proxy: Callable[..., ProxyProcess],
    keys: dict[str, object],
    token_for: Callable[..., str],
) -> None:
    """Key rotation: old and new key configured at once; a token of either works."""
    proxy = start_proxy(
        PUBLIC_KEYS__0=keys["other"].public_pem,  # type: ignore[attr-defined]
        PUBLIC_KEYS__1=keys["ed25519"].public_pem,  # type: ignore[attr-defined]
        PUBLIC_KEYS__7=None,
    )
    for key in ("ed25519", "other"):
        with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user", key))) as c:
            assert c.execute("select 1").fetchone() == (1,)
    assert "key=PUBLIC_KEYS__1" in proxy.log()
    assert "key=PUBLIC_KEYS__0" in proxy.log()


@pytest.mark.parametrize(
    ("role", "method"),
    [
        ("scram_user", "scram-sha-256-plus"),
        ("md5_user", "md5"),
        ("cleartext_user", "password"),
        ("trust_user", "trust"),
    ],
)
def test_upstream_login_methods(
    proxy: ProxyProcess, token_for: Callable[..., str], role: str, method: str
) -> None:
    """Each upstream method, as pg_hba.conf of the test server assigns them. SCRAM over
    TLS uses channel binding (SCRAM-SHA-256-PLUS)."""
    with psycopg.connect(proxy_dsn(proxy, role, token_for(role))) as conn:
        assert conn.execute("select current_user").fetchone() == (role,)
    assert f"user={role} database=postgres" in proxy.log()
    assert f"method={method} " in proxy.log()


def test_scram_without_tls_upstream(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(UPSTREAM__SSLMODE="disable", UPSTREAM__SSLROOTCERT=None)
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert row.fetchone() == (False,)
    assert "method=scram-sha-256 tls=False" in proxy.log()


def test_upstream_over_unix_socket(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    """UPSTREAM__HOST as a directory means a Unix socket, as in libpq."""
    proxy = start_proxy(
        UPSTREAM__HOST=pg.socket_dir, UPSTREAM__SSLMODE="disable", UPSTREAM__SSLROOTCERT=None
    )
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


def test_startup_parameters_reach_server(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    dsn = proxy_dsn(
        proxy,
        "scram_user",
        token_for("scram_user"),
        application_name="proxy-test-app",
        options="'-c statement_timeout=4321 -c search_path=pg_catalog'",
        client_encoding="LATIN1",
    )
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select current_setting('application_name'), current_setting('statement_timeout'),"
            " current_setting('search_path'), current_setting('client_encoding')"
        ).fetchone()
        assert row == ("proxy-test-app", "4321ms", "pg_catalog", "LATIN1")
        # The client sees upstream's ParameterStatus values.
        assert conn.info.parameter_status("application_name") == "proxy-test-app"
        assert conn.info.parameter_status("server_version")


def test_backend_pid_matches_and_cancel_works(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    """The client is given upstream's real pid (so pg_backend_pid() agrees) and a cancel
    key of the proxy's; cancel() reaches the right upstream backend."""
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() == (conn.info.backend_pid,)
        started = time.monotonic()
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        timer.join()
        assert time.monotonic() - started < 10
    assert "cancel request forwarded" in proxy.log()


def test_random_cancel_key_does_nothing(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        pid = conn.info.backend_pid
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(wire.cancel_request(pid, os.urandom(4)))
            assert sock.recv(1) == b""  # closed with no reply, as PostgreSQL does
        conn.execute("set statement_timeout = 0")
        assert conn.execute("select pg_sleep(0.3), 1").fetchone() == ("", 1)
    assert "cancel request ignored" in proxy.log()


@pytest.mark.xdist_group("many_upstream_sessions")  # see conftest.py
def test_200_concurrent_clients(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    token = token_for("scram_user")

    async def one(i: int) -> tuple[int, int]:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=proxy.port,
            user="scram_user",
            password=token,
            database="postgres",
            ssl="require",
            timeout=60,
        )
        try:
            # Hold the connection so that all 200 overlap.
            pid = await conn.fetchval("select pg_backend_pid() from pg_sleep(0.5)")
            value = await conn.fetchval("select $1::int", i)
            return pid, value
        finally:
            await conn.close()

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(main())
    assert [value for _, value in results] == list(range(200))
    assert len({pid for pid, _ in results}) == 200


def _copy_digest(dsn: str, rows: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        query = (
            f"COPY (SELECT i, md5(i::text), repeat('x', 60) FROM generate_series(1, {rows}) i)"
            " TO STDOUT"
        )
        with cur.copy(query) as copy:
            for chunk in copy:
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()


def test_copy_100mb_to_stdout_byte_identical(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    rows = 1_050_000  # ~100 bytes per row
    through = _copy_digest(proxy_dsn(proxy, "scram_user", token_for("scram_user")), rows)
    direct = _copy_digest(pg.dsn("scram_user"), rows)
    assert through[0] >= 100 * 1024 * 1024
    assert through == direct


def test_copy_from_stdin(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    payload = b"".join(b"%d\trow %d\n" % (i, i) for i in range(200_000))
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        conn.execute("create temp table t (id int, label text)")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN") as copy:
            for start in range(0, len(payload), 65536):
                copy.write(payload[start : start + 65536])
        row = conn.execute("select count(*), sum(id) from t").fetchone()
        assert row == (200_000, sum(range(200_000)))


def test_backpressure_slow_reader_does_not_grow_proxy_memory(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """A client that stops reading during a 300 MB result: the proxy must stop reading
    upstream (pause_reading) instead of buffering the result in memory. The moment to look
    is when the backend itself waits to write (wait_event ClientWrite): from then on the
    proxy reads nothing more, so what it holds is all it will hold; a proxy that kept
    reading would never leave the backend waiting and would grow instead."""
    assert proxy.process is not None
    client = RawClient(proxy.port)
    login = client.login("scram_user", token_for("scram_user"))
    assert login.tags[-1] == b"Z"
    backend_pid = next(
        struct.unpack("!i", body[:4])[0] for tag, body in login.messages if tag == b"K"
    )
    query = "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 300000)) TO STDOUT"
    before = rss_kib(proxy.process.pid)
    client.send(wire.typed_message(b"Q", query.encode() + b"\0"))
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:

        def backend_blocked_on_write() -> bool:
            row = admin.execute(
                "select wait_event from pg_stat_activity where pid = %s", (backend_pid,)
            ).fetchone()
            return row is not None and row[0] == "ClientWrite"

        assert wait_for(backend_blocked_on_write, timeout=30), "upstream never had to wait"
    grown = rss_kib(proxy.process.pid) - before
    assert grown < 32 * 1024, f"proxy RSS grew by {grown} KiB while the client was not reading"
    # Now read it all: nothing was lost while paused.
    total = 0
    while True:
        tag, body = client.read_message()
        if tag == b"d":
            total += len(body)
        elif tag == b"Z":
            break
        else:
            assert tag in (b"H", b"c", b"C"), tag
    assert total == 300000 * 1001
    client.close()


# --- UPSTREAM__REQUIRE_AUTH (issue 13, item 1) -------------------------------------------------


@pytest.mark.parametrize(
    ("role", "method"), [("cleartext_user", "password"), ("trust_user", "none")]
)
def test_cleartext_and_trust_upstream_refused_by_default_without_verified_tls(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str], role: str, method: str
) -> None:
    """Upstream over plaintext TCP (no verification possible): whoever answers could ask
    for the proxy's password in clear, or skip authentication to get the queries. By
    default the proxy refuses both, with a clear 28000 (not 28P01: the client's token was
    fine) and a log line naming the setting that would allow it."""
    proxy = start_proxy(
        UPSTREAM__HOST="127.0.0.1", UPSTREAM__SSLMODE="disable", UPSTREAM__SSLROOTCERT=None
    )
    client = RawClient(proxy.port)
    try:
        fields = client.login(role, token_for(role)).error()
    finally:
        client.close()
    assert fields is not None
    assert fields["C"] == "28000"
    assert "configured to refuse" in fields["M"]
    log = proxy.log()
    assert f"authentication method {method}, which UPSTREAM__REQUIRE_AUTH" in log
    # Nothing else still works the default way: SCRAM and MD5 prove nothing in clear.
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


def test_require_auth_allows_cleartext_and_trust_when_set(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """The operator who trusts the path says so, in libpq's require_auth syntax."""
    proxy = start_proxy(
        UPSTREAM__HOST="127.0.0.1",
        UPSTREAM__SSLMODE="disable",
        UPSTREAM__SSLROOTCERT=None,
        UPSTREAM__REQUIRE_AUTH="password,none",
    )
    for role in ("cleartext_user", "trust_user"):
        with psycopg.connect(proxy_dsn(proxy, role, token_for(role))) as conn:
            assert conn.execute("select current_user").fetchone() == (role,)
    # ... and a list without scram-sha-256 now refuses SCRAM.
    with pytest.raises(psycopg.OperationalError, match="configured to refuse"):
        psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))


def test_unix_socket_upstream_allows_trust_by_default(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(
        UPSTREAM__HOST=pg.socket_dir, UPSTREAM__SSLMODE="disable", UPSTREAM__SSLROOTCERT=None
    )
    with psycopg.connect(proxy_dsn(proxy, "md5_user", token_for("md5_user"))) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5_user",)
    assert "can be intercepted" not in proxy.log()
