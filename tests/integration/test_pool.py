"""Session pooling (POOL__MODE=session) against the real PostgreSQL: reuse really happens,
nothing of one client's session state reaches the next, and unclean ends never hand a
backend on. Each isolation case also runs with pooling off, as the control."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from harness import (
    CyclicGarbage,
    KeyPair,
    Postgres,
    ProxyProcess,
    RawClient,
    free_port,
    mint,
    node_modules,
)

from jwtpgproxy.protocol import wire

USER = "scram_user"
READ_SCOPE = "db:read"


@dataclass
class Proxied:
    process: ProxyProcess
    metrics_port: int
    pooled: bool

    @property
    def port(self) -> int:
        return self.process.port

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while True:  # the admin listener may start just after the proxy's "listening"
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    return str(reply.read().decode())
            except urllib.error.URLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        sample = f"{name}{{{wanted}}}" if wanted else name
        for line in self.metrics().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def resets(self) -> float:
        """Resets so far, once none is under way (a previous test's client may still be
        being reset: its count must not be taken for the next client's)."""
        last = self.metric("jwtpgproxy_pool_resets_total", result="ok")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.15)
            now = self.metric("jwtpgproxy_pool_resets_total", result="ok")
            if now == last:
                break
            last = now
        return last

    def wait_parked(self, resets_before: float, timeout: float = 10) -> None:
        """Until one more connection was reset (and so parked: the pool parks it in the
        same event-loop step, and /metrics is served by the same loop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.resets() > resets_before:
                return
            time.sleep(0.02)
        raise AssertionError(f"no connection parked after {timeout}s:\n{self.metrics()}")

    def settle(self, resets_before: float) -> None:
        """After a client left: wait until its connection is parked (pooling on); with
        pooling off there is nothing to wait for."""
        if self.pooled:
            self.wait_parked(resets_before)


def _start(
    factory: pytest.TempPathFactory, base_env: dict[str, str], mode: str
) -> Iterator[Proxied]:
    metrics_port = free_port()
    env = {
        **base_env,
        "POOL__MODE": mode,
        "METRICS__PORT": str(metrics_port),
        "TOKEN__READ_ONLY_SCOPE": READ_SCOPE,
    }
    process = ProxyProcess(env, factory.mktemp(f"pool-{mode}") / "proxy.log")
    with process:
        yield Proxied(process, metrics_port, mode == "session")


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> Iterator[Proxied]:
    yield from _start(tmp_path_factory, base_env, "session")


@pytest.fixture(scope="module")
def unpooled(
    tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]
) -> Iterator[Proxied]:
    yield from _start(tmp_path_factory, base_env, "none")


@pytest.fixture(params=["session", "none"])
def either(request: pytest.FixtureRequest) -> Proxied:
    """The pooled proxy and, as the control, the same proxy with pooling off."""
    return request.getfixturevalue("pooled" if request.param == "session" else "unpooled")


@pytest.fixture(scope="module")
def token(keys: dict[str, KeyPair]) -> Callable[..., str]:
    def make(read_only: bool = False) -> str:
        pair = keys["ed25519"]
        scope = READ_SCOPE if read_only else "other"
        return mint(pair.private, pair.algorithm, USER, scope=scope)

    return make


@pytest.fixture(scope="module")
def member_role(pg: Postgres) -> str:
    """A role scram_user may SET ROLE to."""
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as conn:
        conn.execute(
            "do $$ begin if not exists (select 1 from pg_roles where rolname = 'pool_member')"
            " then create role pool_member; end if; end $$"
        )
        conn.execute("grant pool_member to scram_user")
    return "pool_member"


def dsn(proxied: Proxied, token: str, **extra: str) -> str:
    params = {
        "host": "127.0.0.1",
        "port": str(proxied.port),
        "user": USER,
        "password": token,
        "dbname": "postgres",
        "sslmode": "require",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in params.items())


def connect(proxied: Proxied, token: str, **extra: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn(proxied, token, **extra), autocommit=True)


def backend_pid(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(str(row[0]))


def one(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> object:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


# --- Isolation: each kind of session state, set by one client, gone for the next ----------


@dataclass(frozen=True)
class Leak:
    name: str
    setup: tuple[str, ...]
    #: A query that shows the state: its value with the state set, and on a fresh backend.
    probe: str
    when_set: object
    fresh: object


LEAKS = [
    Leak(
        "temp_table",
        ("create temp table pool_leak (x int)", "insert into pool_leak values (1)"),
        "select to_regclass('pg_temp.pool_leak') is not null",
        True,
        False,
    ),
    Leak(
        "sql_prepare",
        ("prepare pool_leak_stmt as select 1",),
        "select count(*) from pg_prepared_statements where name = 'pool_leak_stmt'",
        1,
        0,
    ),
    Leak(
        "set",
        ("set statement_timeout = '12345ms'", "set search_path = pg_catalog"),
        "select current_setting('statement_timeout') || ' ' || current_setting('search_path')",
        "12345ms pg_catalog",
        '0 "$user", public',
    ),
    Leak(
        "advisory_lock",
        ("select pg_advisory_lock(4242)",),
        "select count(*) from pg_locks where locktype = 'advisory' and objid = 4242",
        1,
        0,
    ),
    Leak(
        "listen",
        ("listen pool_leak_channel",),
        "select count(*) from pg_listening_channels()",
        1,
        0,
    ),
    Leak(
        "cursor_with_hold",
        ("declare pool_leak_cursor cursor with hold for select 1",),
        "select count(*) from pg_cursors where name = 'pool_leak_cursor'",
        1,
        0,
    ),
    Leak(
        "custom_setting",
        ("select set_config('app.tenant', 'tenant-a', false)",),
        "select coalesce(current_setting('app.tenant', true), '')",
        "tenant-a",
        "",
    ),
]


def _leaves_then_next_checks(
    proxied: Proxied,
    token: Callable[..., str],
    act: Callable[[psycopg.Connection[tuple[object, ...]]], None],
    check: Callable[[psycopg.Connection[tuple[object, ...]]], None],
    **extra: str,
) -> None:
    with connect(proxied, token(), **extra) as first:
        pid = backend_pid(first)
        act(first)
        mark = proxied.resets()
    proxied.settle(mark)
    with connect(proxied, token()) as second:
        # Reuse really happened with pooling on; never with it off (the control).
        assert (backend_pid(second) == pid) is proxied.pooled
        check(second)


@pytest.mark.parametrize("leak", LEAKS, ids=lambda leak: leak.name)
def test_state_does_not_leak(either: Proxied, token: Callable[..., str], leak: Leak) -> None:
    def act(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        for sql in leak.setup:
            conn.execute(sql)
        assert one(conn, leak.probe) == leak.when_set

    def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert one(conn, leak.probe) == leak.fresh

    _leaves_then_next_checks(either, token, act, check)


def test_protocol_level_prepared_statement_does_not_leak(
    either: Proxied, token: Callable[..., str]
) -> None:
    """psycopg 3 with prepare=True: Parse of a named statement, not SQL PREPARE."""

    def act(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        conn.execute("select %s::int", (1,), prepare=True)
        count = one(conn, "select count(*) from pg_prepared_statements where not from_sql")
        assert count == 1

    def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert one(conn, "select count(*) from pg_prepared_statements") == 0

    _leaves_then_next_checks(either, token, act, check)


def test_set_role_does_not_leak(
    either: Proxied, token: Callable[..., str], member_role: str
) -> None:
    def act(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        conn.execute(f"set role {member_role}")
        assert one(conn, "select current_user") == member_role

    def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert one(conn, "select current_user") == USER
        assert one(conn, "select session_user") == USER

    _leaves_then_next_checks(either, token, act, check)


def test_application_name_is_each_clients_own(either: Proxied, token: Callable[..., str]) -> None:
    """application_name may differ between clients sharing a backend: the server and the
    ParameterStatus the client got both show the client's own value, or the default."""

    def act(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert conn.info.parameter_status("application_name") == "app-one"
        assert one(conn, "show application_name") == "app-one"

    def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        assert conn.info.parameter_status("application_name") == ""
        assert one(conn, "show application_name") == ""

    _leaves_then_next_checks(either, token, act, check, application_name="app-one")
    # While parked a connection keeps its last client's name (no SET for a client that
    # comes back with it); a client with another name, or none, still gets its own.
    for name in ("app-two", "app-two", None, "app-two"):
        extra = {"application_name": name} if name else {}
        with connect(either, token(), **extra) as conn:
            assert conn.info.parameter_status("application_name") == (name or "")
            activity = "select application_name from pg_stat_activity where pid = pg_backend_pid()"
            assert one(conn, activity) == (name or "")
            mark = either.resets()
        either.settle(mark)


def test_parameter_status_changed_in_a_session_is_reset_for_the_next(
    either: Proxied, token: Callable[..., str]
) -> None:
    """The greeting of a reused backend carries the values after the reset, not those the
    previous client saw last."""

    def act(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"

    def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
        server = one(conn, "show timezone")
        assert server != "Asia/Tokyo"
        assert conn.info.parameter_status("TimeZone") == server

    _leaves_then_next_checks(either, token, act, check)


def test_read_only_token_state_never_reaches_a_writable_client(
    either: Proxied, token: Callable[..., str]
) -> None:
    with connect(either, token(read_only=True)) as reader:
        reader_pid = backend_pid(reader)
        assert one(reader, "show default_transaction_read_only") == "on"
        mark = either.resets()
    either.settle(mark)
    with connect(either, token()) as writer:
        # Read-only and writable sessions have different pool keys: never the same backend.
        assert backend_pid(writer) != reader_pid
        assert one(writer, "show default_transaction_read_only") == "off"
        writer.execute("create temp table pool_rw (x int)")


def test_read_only_cannot_be_undone_for_the_next_read_only_client(
    either: Proxied, token: Callable[..., str]
) -> None:
    with connect(either, token(read_only=True)) as reader:
        pid = backend_pid(reader)
        reader.execute("set session characteristics as transaction read write")
        assert one(reader, "show default_transaction_read_only") == "off"
        mark = either.resets()
    either.settle(mark)
    with connect(either, token(read_only=True)) as reader:
        assert (backend_pid(reader) == pid) is either.pooled
        assert one(reader, "show default_transaction_read_only") == "on"
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("create temp table pool_ro (x int)")


# --- Unclean ends never hand a backend on -------------------------------------------------------


def _raw_session(proxied: Proxied, token: str) -> tuple[RawClient, int]:
    client = RawClient(proxied.port)
    result = client.login(USER, token)
    assert result.tags[-1:] == [b"Z"], result.messages
    pid = next(int.from_bytes(body[:4], "big") for tag, body in result.messages if tag == b"K")
    return client, pid


def _next_pid(proxied: Proxied, token: Callable[..., str]) -> int:
    with connect(proxied, token()) as conn:
        return backend_pid(conn)


def test_client_leaving_mid_transaction_does_not_hand_on_its_backend(
    pooled: Proxied, token: Callable[..., str]
) -> None:
    before = pooled.metric("jwtpgproxy_pool_discards_total", reason="not_idle")
    with connect(pooled, token()) as conn:
        pid = backend_pid(conn)
        conn.execute("begin")
        conn.execute("create temp table pool_tx (x int)")
        conn.close()  # Terminate with the transaction open (leaving the block would commit)
    assert _wait_metric(pooled, "jwtpgproxy_pool_discards_total", before + 1, reason="not_idle")
    assert _next_pid(pooled, token) != pid


def test_client_vanishing_mid_transaction_does_not_hand_on_its_backend(
    pooled: Proxied, token: Callable[..., str]
) -> None:
    client, pid = _raw_session(pooled, token())
    client.send(wire.typed_message(b"Q", b"begin\0"))
    assert client.read_until_end(stop_tags=(b"Z",)).messages[-1] == (b"Z", b"T")
    client.close()  # no Terminate
    time.sleep(0.2)
    assert _next_pid(pooled, token) != pid


def test_client_terminating_mid_copy_does_not_hand_on_its_backend(
    pooled: Proxied, token: Callable[..., str]
) -> None:
    before = pooled.metric("jwtpgproxy_pool_discards_total", reason="not_idle")
    client, pid = _raw_session(pooled, token())
    client.send(wire.typed_message(b"Q", b"copy (select 1) to stdout\0"))
    client.send(wire.typed_message(b"Q", b"create temp table pool_copy (x int)\0"))
    assert client.read_message()[0] in (b"H", b"G")
    client.send(wire.terminate())  # answers still in flight: not idle
    client.close()
    assert _wait_metric(pooled, "jwtpgproxy_pool_discards_total", before + 1, reason="not_idle")
    assert _next_pid(pooled, token) != pid


def test_client_terminating_during_copy_in_does_not_hand_on_its_backend(
    pooled: Proxied, token: Callable[..., str]
) -> None:
    with connect(pooled, token()) as setup:
        setup.execute("create table if not exists pool_copy_in (x int)")
    client, pid = _raw_session(pooled, token())
    client.send(wire.typed_message(b"Q", b"copy pool_copy_in from stdin\0"))
    assert client.read_message()[0] == b"G"
    client.send(wire.typed_message(b"d", b"1\n"))
    client.send(wire.terminate())
    client.close()
    time.sleep(0.3)
    assert _next_pid(pooled, token) != pid


def _wait_metric(proxied: Proxied, name: str, value: float, **labels: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proxied.metric(name, **labels) >= value:
            return True
        time.sleep(0.02)
    return False


def test_terminated_parked_backend_is_never_handed_out(
    pooled: Proxied, token: Callable[..., str], pg: Postgres
) -> None:
    with connect(pooled, token()) as conn:
        pid = backend_pid(conn)
        mark = pooled.resets()
    pooled.wait_parked(mark)
    before = pooled.metric("jwtpgproxy_pool_discards_total", reason="closed_by_upstream")
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:
        assert one(admin, f"select pg_terminate_backend({pid})") is True
    assert _wait_metric(
        pooled, "jwtpgproxy_pool_discards_total", before + 1, reason="closed_by_upstream"
    )
    with connect(pooled, token()) as conn:
        assert backend_pid(conn) != pid
        assert one(conn, "select 6 * 7") == 42


def test_cancel_on_a_reused_backend(pooled: Proxied, token: Callable[..., str]) -> None:
    with connect(pooled, token()) as conn:
        pid = backend_pid(conn)
        mark = pooled.resets()
    pooled.wait_parked(mark)
    hits = pooled.metric("jwtpgproxy_pool_hits_total")
    with connect(pooled, token()) as conn:
        assert backend_pid(conn) == pid == conn.info.backend_pid
        assert pooled.metric("jwtpgproxy_pool_hits_total") == hits + 1
        started = time.monotonic()
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        timer.join()
        assert time.monotonic() - started < 10
        assert one(conn, "select 1") == 1


def test_reload_closes_parked_connections(pooled: Proxied, token: Callable[..., str]) -> None:
    with connect(pooled, token()) as conn:
        pid = backend_pid(conn)
        mark = pooled.resets()
    pooled.wait_parked(mark)
    assert pooled.process.process is not None
    pooled.process.process.send_signal(1)  # SIGHUP
    assert _wait_metric(pooled, "jwtpgproxy_pool_discards_total", 1, reason="reload")
    assert pooled.metric("jwtpgproxy_pool_parked") == 0
    assert _next_pid(pooled, token) != pid


def test_idle_timeout_and_max_lifetime(
    start_proxy: Callable[..., ProxyProcess], token: Callable[..., str]
) -> None:
    metrics_port = free_port()
    process = start_proxy(
        POOL__MODE="session",
        POOL__IDLE_TIMEOUT="0.5",
        POOL__MAX_LIFETIME="2",
        METRICS__PORT=str(metrics_port),
    )
    proxied = Proxied(process, metrics_port, True)
    with connect(proxied, token()) as conn:
        pid = backend_pid(conn)
        mark = proxied.resets()
    proxied.wait_parked(mark)
    assert _wait_metric(proxied, "jwtpgproxy_pool_discards_total", 1, reason="idle_timeout")
    assert _next_pid(proxied, token) != pid
    # Max lifetime: reused while young, closed once 2 s old however busy.
    with connect(proxied, token()) as conn:
        pid = backend_pid(conn)
    reused = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.15)  # the reset after each client; well under the idle timeout
        if proxied.metric("jwtpgproxy_pool_discards_total", reason="max_lifetime") >= 1:
            break
        with connect(proxied, token()) as conn:
            reused += backend_pid(conn) == pid
    assert reused >= 1
    assert proxied.metric("jwtpgproxy_pool_discards_total", reason="max_lifetime") >= 1
    with connect(proxied, token()) as conn:
        assert backend_pid(conn) != pid


def test_pooling_off_is_untouched(unpooled: Proxied, token: Callable[..., str]) -> None:
    with connect(unpooled, token()) as conn:
        backend_pid(conn)
    assert unpooled.metric("jwtpgproxy_pool_misses_total") == 0
    assert unpooled.metric("jwtpgproxy_pool_hits_total") == 0


# --- Real clients through a pooled proxy -----------------------------------------------------


def _twice(pooled: Proxied, run: Callable[[], int]) -> None:
    """Run a client twice; the second run gets the first one's backend."""
    mark = pooled.resets()
    first = run()
    pooled.wait_parked(mark)
    assert run() == first


def test_psql(pooled: Proxied, token: Callable[..., str], pg: Postgres) -> None:
    candidate = os.path.join(pg.bindir, "psql") if pg.bindir else ""
    psql = candidate if os.path.exists(candidate) else shutil.which("psql")
    assert psql

    def run() -> int:
        result = subprocess.run(
            [
                psql,
                f"host=127.0.0.1 port={pooled.port} user={USER} dbname=postgres sslmode=require",
                "-Atc",
                "select pg_backend_pid()",
            ],
            env={**os.environ, "PGPASSWORD": token()},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    _twice(pooled, run)


def test_psycopg3(pooled: Proxied, token: Callable[..., str]) -> None:
    def run() -> int:
        with psycopg.connect(dsn(pooled, token())) as conn:
            row = conn.execute("select pg_backend_pid(), %s::int + 1", (41,)).fetchone()
            assert row is not None and row[1] == 42
            return int(row[0])

    _twice(pooled, run)


def test_asyncpg(pooled: Proxied, token: Callable[..., str]) -> None:
    async def main() -> int:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=pooled.port,
            user=USER,
            password=token(),
            database="postgres",
            ssl="require",
        )
        try:
            assert await conn.fetchval("select $1::int * 2", 21) == 42
            return int(await conn.fetchval("select pg_backend_pid()"))
        finally:
            await conn.close()

    _twice(pooled, lambda: asyncio.run(main()))


JDBC_JAR = Path.home() / ".m2/repository/org/postgresql/postgresql/42.7.13/postgresql-42.7.13.jar"
JDBC_SOURCE = """
import java.sql.*;
public class PoolJdbc {
    public static void main(String[] args) throws Exception {
        try (Connection c = DriverManager.getConnection(args[0], args[1], args[2]);
             PreparedStatement s = c.prepareStatement("select pg_backend_pid(), ?::int * 2")) {
            s.setInt(1, 21);
            try (ResultSet r = s.executeQuery()) {
                r.next();
                if (r.getInt(2) != 42) throw new AssertionError("bad result");
                System.out.println(r.getInt(1));
            }
        }
    }
}
"""


def test_jdbc(pooled: Proxied, token: Callable[..., str], tmp_path: Path) -> None:
    java = shutil.which("java")
    if java is None or not JDBC_JAR.exists():
        pytest.skip("java or the PostgreSQL JDBC driver is not installed")
    source = tmp_path / "PoolJdbc.java"
    source.write_text(JDBC_SOURCE)
    url = f"jdbc:postgresql://127.0.0.1:{pooled.port}/postgres?sslmode=require"

    def run() -> int:
        result = subprocess.run(
            [java, "-cp", str(JDBC_JAR), str(source), url, USER, token()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    _twice(pooled, run)


NODE_SOURCE = """
const { Client } = require('pg');
(async () => {
  const client = new Client({ host: '127.0.0.1', port: Number(process.argv[2]),
    user: process.argv[3], password: process.env.PGPASSWORD, database: 'postgres',
    ssl: { rejectUnauthorized: false } });
  await client.connect();
  const r = await client.query('select pg_backend_pid() as pid, $1::int * 2 as v', [21]);
  if (r.rows[0].v !== 42) throw new Error('bad result');
  console.log(r.rows[0].pid);
  await client.end();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def test_node_postgres(pooled: Proxied, token: Callable[..., str], tmp_path: Path) -> None:
    node, modules = shutil.which("node"), node_modules()
    if node is None or modules is None:
        pytest.skip("node/npm not installed (Debian: apt-get install nodejs npm)")
    script = tmp_path / "pool_node.js"
    script.write_text(NODE_SOURCE)

    def run() -> int:
        result = subprocess.run(
            [node, str(script), str(pooled.port), USER],
            env={**os.environ, "PGPASSWORD": token(), "NODE_PATH": str(modules)},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    _twice(pooled, run)


def test_pooled_sessions_leave_no_reference_cycles(
    start_proxy: Callable[..., ProxyProcess], token: Callable[..., str], tmp_path: Path
) -> None:
    """As test_data_path's check, with pooling: sessions that park their connection, that
    reuse one, that leave mid-transaction or are aborted mid-result leave no cyclic garbage
    (the parked connections themselves are alive, not garbage)."""
    garbage = CyclicGarbage(tmp_path)
    metrics_port = free_port()
    process = start_proxy(
        **garbage.env,
        LOG_LEVEL="INFO",
        POOL__MODE="session",
        METRICS__PORT=str(metrics_port),
    )
    proxied = Proxied(process, metrics_port, True)
    sessions = 0
    for _ in range(4):
        mark = proxied.resets()
        client, _ = _raw_session(proxied, token())  # parks, then reuses
        client.send(wire.typed_message(b"Q", b"select 1\0"))
        client.read_until_end((b"Z",))
        client.send(wire.terminate())
        client.close()
        proxied.wait_parked(mark)
        client, _ = _raw_session(proxied, token())  # leaves mid-transaction
        client.send(wire.typed_message(b"Q", b"begin\0"))
        client.read_until_end((b"Z",))
        client.send(wire.terminate())
        client.close()
        client, _ = _raw_session(proxied, token())  # aborted in the middle of a result
        client.send(wire.typed_message(b"Q", b"select repeat('x', 3000000)\0"))
        client.recv_exact(1)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        sessions += 3
    deadline = time.monotonic() + 20
    while process.log().count("connection closed:") < sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.log().count("connection closed:") == sessions
    assert proxied.metric("jwtpgproxy_pool_hits_total") >= 3
    assert process.process is not None
    report = garbage.collect(process)
    assert report == "{}", report


def test_shutdown_closes_parked_connections(
    start_proxy: Callable[..., ProxyProcess], token: Callable[..., str], pg: Postgres
) -> None:
    metrics_port = free_port()
    process = start_proxy(POOL__MODE="session", METRICS__PORT=str(metrics_port))
    proxied = Proxied(process, metrics_port, True)
    mark = proxied.resets()
    with connect(proxied, token()) as conn:
        pid = backend_pid(conn)
    proxied.wait_parked(mark)
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:
        alive = f"select count(*) from pg_stat_activity where pid = {pid}"
        assert one(admin, alive) == 1
        assert process.stop() == 0
        deadline = time.monotonic() + 10
        while one(admin, alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert one(admin, alive) == 0
    assert "parked upstream connections closed: reason=shutdown count=1" in process.log()


def test_session_ended_by_token_expiry_does_not_hand_on_its_backend(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair], token: Callable[..., str]
) -> None:
    metrics_port = free_port()
    process = start_proxy(
        POOL__MODE="session",
        METRICS__PORT=str(metrics_port),
        TOKEN__END_SESSIONS_ON_EXPIRY="true",
    )
    proxied = Proxied(process, metrics_port, True)
    pair = keys["ed25519"]
    short = mint(pair.private, pair.algorithm, USER, ttl=2)
    with connect(proxied, short) as conn:
        pid = backend_pid(conn)
        time.sleep(3)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    assert _wait_metric(proxied, "jwtpgproxy_pool_discards_total", 1, reason="ended_by_proxy")
    assert proxied.metric("jwtpgproxy_pool_parked") == 0
    assert _next_pid(proxied, token) != pid


def test_previous_clients_cancel_key_does_not_reach_the_next_client(
    pooled: Proxied, token: Callable[..., str]
) -> None:
    """A reused backend gets a new client secret: the client that left cannot cancel the
    queries of the one that came after it."""
    mark = pooled.resets()
    client = RawClient(pooled.port)
    result = client.login(USER, token())
    key = next(body for tag, body in result.messages if tag == b"K")
    pid, old_secret = int.from_bytes(key[:4], "big"), key[4:]
    client.send(wire.terminate())
    client.close()
    pooled.wait_parked(mark)
    with connect(pooled, token()) as conn:
        assert backend_pid(conn) == pid
        done: list[object] = []
        worker = threading.Thread(
            target=lambda: done.append(one(conn, "select pg_sleep(2) is null")), daemon=True
        )
        worker.start()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", pooled.port), timeout=5) as sock:
            sock.sendall(wire.cancel_request(pid, old_secret))
            assert sock.recv(1) == b""
        worker.join(10)
        assert done == [False]  # pg_sleep returns void: "is null" is false; not canceled
