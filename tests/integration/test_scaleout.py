"""Scale-out: three replicas behind a real HAProxy (deploy/haproxy/haproxy.cfg, as shipped).

The replicas are separate processes on 127.0.0.11-13 sharing one CANCEL__SECRET and the same
ports, as on three hosts; HAProxy (TCP, round robin, health checks on /readyz) listens on
127.0.0.10. In order:

1. 60 sessions run pg_sleep(30); each is cancelled by a CancelRequest sent through HAProxy,
   so most land on a replica that does not hold the session. All end with 57014 within 5 s,
   and pg_stat_activity (direct) shows their backends idle. Random keys cancel nothing.
2. Rolling restart under load: SIGTERM and restart each replica in turn while clients keep
   logging in and committing numbered rows. No login fails; every acknowledged row is there.
3. SIGKILL of a replica: exactly its clients get a connection error; new sessions work;
   every acknowledged row is there.

The figures are printed to the terminal (for the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from harness import KeyPair, Postgres, ProxyProcess, mint
from psycopg import sql

from jwtpgproxy.protocol import wire

HAPROXY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
LB_HOST = "127.0.0.10"
REPLICA_HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
USER = "scram_user"
#: One table per xdist worker (each worker runs its own cluster of replicas).
TABLE = f"scaleout_rows_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
SHUTDOWN_DELAY = 2.0  # > fall x inter in haproxy.cfg (2 x 0.5 s)
#: Row numbers, unique across the tests of this module (the table is shared).
NUMBERS = itertools.count(1)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("haproxy") is None,
        reason="haproxy is not installed (./test.sh installs it with apt-get where it can)",
    ),
]


def http_get_status(host: str, port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _ports_free_on_all(hosts: tuple[str, ...], count: int) -> list[int]:
    """``count`` ports that are free on every one of ``hosts``."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    sock = stack.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port))
        except OSError:
            continue
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Replica:
    name: str
    host: str
    env: dict[str, str]
    directory: Path
    process: ProxyProcess | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        log = self.directory / f"{self.name}-{len(self.logs)}.log"
        self.logs.append(log)
        self.process = ProxyProcess(self.env, log).start()

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs if path.exists())


@dataclass
class Cluster:
    replicas: list[Replica]
    haproxy: subprocess.Popen[bytes]
    haproxy_log: Path
    port: int
    admin_port: int
    dsn: Callable[..., str]
    pg: Postgres

    def haproxy_events(self, what: str) -> list[str]:
        """HAProxy's server state changes containing ``what`` (each is logged twice: once
        as ``[WARNING] (pid) : Server ...``, which is the one counted, once raw)."""
        lines = self.haproxy_log.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith("[WARNING]") and what in line]

    def haproxy_says(self, what: str) -> int:
        return len(self.haproxy_events(what))

    def haproxy_retried_connections(self) -> int:
        """Client connections HAProxy had to retry (tcplog's 5th connection counter, with a
        ``+`` when it was redispatched to another server): the server refused it."""
        text = self.haproxy_log.read_text(errors="replace")
        return sum(1 for n in re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) ", text) if n != "0")

    def wait_haproxy(self, what: str, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.haproxy_says(what) < count:
            assert time.monotonic() < deadline, f"HAProxy never logged {what!r} x{count}"
            time.sleep(0.05)

    def cancel_counts(self) -> dict[str, float]:
        """jwtpgproxy_cancel_requests_total by result, summed over the replicas."""
        totals: dict[str, float] = {}
        for replica in self.replicas:
            status, text = http_get_status(replica.host, self.admin_port, "/metrics")
            assert status == 200
            for result, value in re.findall(
                r'^jwtpgproxy_cancel_requests_total\{result="(\w+)"\} (\S+)$', text, re.M
            ):
                totals[result] = totals.get(result, 0) + float(value)
        return totals


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    base_env: dict[str, str],
    pg: Postgres,
    keys: dict[str, KeyPair],
) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("scaleout")
    port, admin_port = _ports_free_on_all((LB_HOST, *REPLICA_HOSTS), 2)
    secret = os.urandom(32).hex()
    replicas = [
        Replica(
            f"replica{i + 1}",
            host,
            {
                **base_env,
                "DOWNSTREAM__IP": host,
                "DOWNSTREAM__PORT": str(port),
                "METRICS__HOST": host,
                "METRICS__PORT": str(admin_port),
                "CANCEL__SECRET": secret,
                "SHUTDOWN_DELAY": str(SHUTDOWN_DELAY),
                "SHUTDOWN_TIMEOUT": "5",
                "LOG_LEVEL": "INFO",
            },
            directory,
        )
        for i, host in enumerate(REPLICA_HOSTS)
    ]
    haproxy_log = directory / "haproxy.log"
    haproxy: subprocess.Popen[bytes] | None = None
    token = mint(keys["ed25519"].private, keys["ed25519"].algorithm, USER, ttl=600)

    def dsn(**extra: str) -> str:
        params = {
            "host": LB_HOST,
            "port": str(port),
            "user": USER,
            "password": token,
            "dbname": "postgres",
            "sslmode": "require",
            "connect_timeout": "5",
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in params.items())

    try:
        for replica in replicas:
            replica.start()
        env = {
            **os.environ,
            "JWTPGPROXY_LISTEN": f"{LB_HOST}:{port}",
            "JWTPGPROXY_ADMIN_PORT": str(admin_port),
            **{f"JWTPGPROXY_REPLICA{i + 1}": f"{r.host}:{port}" for i, r in enumerate(replicas)},
        }
        with haproxy_log.open("wb") as out:
            haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 10
        while True:  # HAProxy takes every replica for up until a check fails
            with contextlib.suppress(OSError), socket.create_connection((LB_HOST, port), 1):
                break
            assert haproxy.poll() is None, haproxy_log.read_text()
            assert time.monotonic() < deadline, "HAProxy did not start listening"
            time.sleep(0.05)
        with psycopg.connect(pg.superuser_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(TABLE)))
            conn.execute(
                sql.SQL("create table {} (n int primary key)").format(sql.Identifier(TABLE))
            )
            conn.execute(
                sql.SQL("grant all on {} to {}").format(sql.Identifier(TABLE), sql.Identifier(USER))
            )
        yield Cluster(replicas, haproxy, haproxy_log, port, admin_port, dsn, pg)
    finally:
        if haproxy is not None:  # by PID: the HAProxy this fixture started
            haproxy.terminate()
            try:
                haproxy.wait(10)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait(5)
        live = [r.process.process for r in replicas if r.process and r.process.process]
        for process in live:  # all at once: each waits SHUTDOWN_DELAY
            if process.poll() is None:
                process.terminate()
        for replica in replicas:
            if replica.process is not None:
                replica.process.stop()
        with contextlib.suppress(psycopg.Error), psycopg.connect(pg.superuser_dsn()) as conn:
            conn.execute(sql.SQL("drop table if exists {}").format(sql.Identifier(TABLE)))


def report(capsys: pytest.CaptureFixture[str], title: str, **figures: object) -> None:
    with capsys.disabled():
        print(f"\n[scale-out] {title}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def backend_states(pg: Postgres, pids: list[int]) -> dict[int, str]:
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "select pid, state from pg_stat_activity where pid = any(%s)", [pids]
        ).fetchall()
    return {pid: state for pid, state in rows}


# --- 1. Cancels through the load balancer ---------------------------------------------------


@pytest.mark.xdist_group("scaleout")  # one worker runs them in turn: one table
def test_cancels_through_load_balancer_reach_sessions_on_any_replica(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = 60

    async def main() -> tuple[dict[str, float], dict[str, float], list[float], float]:
        # Half speak protocol 3.0 (4-byte keys: unverifiable elsewhere, rate-limited), half
        # 3.2 (keys carrying a MAC); each cancels the libpq way of its kind.
        conns = [
            await psycopg.AsyncConnection.connect(
                cluster.dsn(**({"max_protocol_version": "3.2"} if i % 2 else {})),
                autocommit=True,
            )
            for i in range(sessions)
        ]
        try:
            pids = [c.info.backend_pid for c in conns]
            assert len(set(pids)) == sessions

            async def sleep(conn: psycopg.AsyncConnection[object]) -> tuple[str | None, float]:
                try:
                    await conn.execute("select pg_sleep(30)")
                except psycopg.errors.QueryCanceled as exc:
                    return exc.sqlstate, time.monotonic()
                return None, time.monotonic()

            tasks = [asyncio.create_task(sleep(c)) for c in conns]
            deadline = time.monotonic() + 10
            while list(backend_states(cluster.pg, pids).values()).count("active") < sessions:
                assert time.monotonic() < deadline, "not all sessions started pg_sleep"
                await asyncio.sleep(0.1)

            # Random keys for every pid, through HAProxy: 32-byte ones fail the MAC on any
            # replica; 4-byte ones for a session elsewhere are forwarded (rate-limited) with
            # a key upstream rejects.
            before_random = cluster.cancel_counts()
            shuffled = list(enumerate(pids))
            random.Random(13).shuffle(shuffled)  # else each lands on its own replica
            for i, pid in shuffled:
                random_key = os.urandom(4 if i % 6 == 0 else 32)
                with socket.create_connection((LB_HOST, cluster.port), 5) as sock:
                    sock.sendall(wire.cancel_request(pid, random_key))
                    assert sock.recv(1) == b""
            await asyncio.sleep(1.2)  # time to act, and for the rate limit to refill
            states = backend_states(cluster.pg, pids)
            assert list(states.values()).count("active") == sessions, states
            after_random = cluster.cancel_counts()

            # In shuffled order: round robin would otherwise send cancel i to the replica
            # that got session i (60 random-key connections went before, 60 = 0 mod 3).
            order = list(range(sessions))
            random.Random(14).shuffle(order)
            started = time.monotonic()
            sent = [0.0] * sessions

            async def cancel(i: int) -> None:
                sent[i] = time.monotonic()
                if i % 2:
                    await conns[i].cancel_safe()  # libpq 17+: over TLS, like the session
                else:
                    await asyncio.to_thread(conns[i].cancel)  # PQcancel: plaintext

            cancels = []
            for i in order:  # 20 ms apart, each without waiting for the previous one
                cancels.append(asyncio.create_task(cancel(i)))
                await asyncio.sleep(0.02)
            await asyncio.gather(*cancels)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
            assert [code for code, _ in results] == ["57014"] * sessions
            span = max(ended for _, ended in results) - started
            assert span < 5, span
            latencies = [ended - sent[i] for i, (_, ended) in enumerate(results)]
            states = backend_states(cluster.pg, pids)
            assert set(states) == set(pids) and "active" not in states.values(), states
            assert set(states.values()) == {"idle"}
            return (
                diff(after_random, before_random),
                diff(cluster.cancel_counts(), after_random),
                latencies,
                span,
            )
        finally:
            for conn in conns:
                await conn.close()

    def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) != b.get(k, 0)}

    random_counts, counts, latencies, span = asyncio.run(main())
    # Random keys: nothing went upstream that a MAC could stop; nothing was cancelled.
    assert random_counts.get("forged", 0) + random_counts.get("unmatched", 0) >= 50
    assert "routed" not in random_counts and "forwarded" not in random_counts
    local = counts.get("forwarded", 0)
    elsewhere = counts.get("routed", 0) + counts.get("routed_unverified", 0)
    assert local + elsewhere == sessions, counts
    assert counts.get("rate_limited", 0) == 0 and counts.get("forged", 0) == 0, counts
    assert counts.get("routed", 0) > 0 and counts.get("routed_unverified", 0) > 0, counts
    report(
        capsys,
        "cancels",
        sent=sessions,
        landed_on_another_replica=int(elsewhere),
        of_which_32_byte_verified=int(counts.get("routed", 0)),
        succeeded_57014=sessions,
        cancel_to_57014_seconds_max=f"{max(latencies):.3f}",
        all_60_ended_seconds_after_first_cancel=f"{span:.2f}",
        random_keys_sent=sessions,
        random_keys_cancelled=0,
        random_by_outcome={k: int(v) for k, v in sorted(random_counts.items())},
    )


# --- 2. Rolling restart and 3. SIGKILL, under a client load ---------------------------------


class Load:
    """Client threads that log in through HAProxy, insert the next number, commit, and
    disconnect, until stopped."""

    def __init__(self, dsn: str, threads: int = 3) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.logins = 0
        self.failed_logins: list[tuple[float, str]] = []  # (monotonic time, error)
        self.session_errors: list[str] = []
        self.acknowledged: set[int] = set()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                number = next(NUMBERS)
                self.logins += 1
            try:
                conn = psycopg.connect(self._dsn)
            except psycopg.Error as exc:
                with self._lock:
                    self.failed_logins.append((time.monotonic(), str(exc).strip()))
                continue
            try:
                with conn:
                    conn.execute(
                        sql.SQL("insert into {} values (%s)").format(sql.Identifier(TABLE)),
                        [number],
                    )
                # The with block committed: acknowledged.
                with self._lock:
                    self.acknowledged.add(number)
            except psycopg.Error as exc:
                with self._lock:
                    self.session_errors.append(str(exc).strip())
            finally:
                conn.close()

    def found(self, pg: Postgres) -> set[int]:
        with psycopg.connect(pg.superuser_dsn()) as conn:
            query = sql.SQL("select n from {}").format(sql.Identifier(TABLE))
            return {n for (n,) in conn.execute(query).fetchall()}


@pytest.mark.xdist_group("scaleout")  # one worker runs them in turn: one table
def test_rolling_restart_under_load_fails_no_login(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    retried_before = cluster.haproxy_retried_connections()
    with Load(cluster.dsn()) as load:
        time.sleep(0.5)
        for replica in cluster.replicas:
            assert replica.process is not None
            replica.process.stop(signal.SIGTERM)  # by PID; waits for the drain
            assert replica.process.process is not None
            assert replica.process.process.returncode == 0, replica.log()
            replica.start()
            # Back in rotation before the next one goes.
            cluster.wait_haproxy(f"Server jwtpgproxy/{replica.name} is UP", 1)
        time.sleep(0.5)
    found = load.found(cluster.pg)
    missing = load.acknowledged - found
    retried = cluster.haproxy_retried_connections() - retried_before
    downs = cluster.haproxy_events("is DOWN")
    report(
        capsys,
        "rolling restart",
        seconds=f"{time.monotonic() - started:.1f}",
        connections_haproxy_retried=retried,
        logins_attempted=load.logins,
        logins_failed=len(load.failed_logins),
        session_errors=len(load.session_errors),
        rows_committed=len(load.acknowledged),
        rows_found=len(found & load.acknowledged),
    )
    assert load.failed_logins == [], load.failed_logins[:5]
    assert load.session_errors == [], load.session_errors[:5]
    assert not missing, sorted(missing)[:10]
    assert len(load.acknowledged) > 30
    # Each replica went out of rotation because /readyz said 503 (SHUTDOWN_DELAY), before
    # it refused a connection: HAProxy never had to retry one.
    assert len(downs) == 3 and all("code: 503" in line for line in downs), downs
    assert retried == 0
    for replica in cluster.replicas:
        assert replica.log().count("shutdown complete") == 1
        assert "accepting during shutdown delay" in replica.log()


@pytest.mark.xdist_group("scaleout")  # one worker runs them in turn: one table
def test_sigkilled_replica_loses_only_its_own_clients(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    # Opened one after the other with every replica up: round robin puts 3 on each.
    held = [psycopg.connect(cluster.dsn(), autocommit=True) for _ in range(9)]
    victim = cluster.replicas[1]
    try:
        pids = [conn.info.backend_pid for conn in held]
        downs = cluster.haproxy_says("is DOWN")
        retried_before = cluster.haproxy_retried_connections()
        with Load(cluster.dsn()) as load:
            time.sleep(0.5)
            assert victim.process is not None and victim.process.process is not None
            os.kill(victim.process.process.pid, signal.SIGKILL)  # the replica we started
            victim.process.process.wait(5)
            killed_at = time.monotonic()
            cluster.wait_haproxy("is DOWN", downs + 1)
            noticed_at = time.monotonic()
            logins_before = load.logins
            acknowledged_before = len(load.acknowledged)
            time.sleep(1.0)
            logins_after_down = load.logins - logins_before
            committed_after_down = len(load.acknowledged) - acknowledged_before
        broken, working = [], []
        for conn, pid in zip(held, pids, strict=True):
            try:
                conn.execute("select 1")
                working.append(pid)
            except psycopg.OperationalError:
                broken.append(pid)
        # Upstream's backends of exactly the broken sessions are gone.
        deadline = time.monotonic() + 5
        while set(backend_states(cluster.pg, pids)) != set(working):
            assert time.monotonic() < deadline, (backend_states(cluster.pg, pids), working)
            time.sleep(0.1)
        found = load.found(cluster.pg)
        report(
            capsys,
            "SIGKILL",
            held_sessions=len(held),
            broken=len(broken),
            still_working=len(working),
            logins_attempted=load.logins,
            logins_failed=len(load.failed_logins),
            failed_login_errors=[e.splitlines()[0][-60:] for _, e in load.failed_logins],
            session_errors=len(load.session_errors),
            logins_after_haproxy_noticed=logins_after_down,
            commits_after_haproxy_noticed=committed_after_down,
            connections_haproxy_retried=cluster.haproxy_retried_connections() - retried_before,
            seconds_to_notice=f"{noticed_at - killed_at:.2f}",
            rows_committed=len(load.acknowledged),
            rows_found=len(found & load.acknowledged),
        )
        assert len(broken) == 3 and len(working) == 6, (broken, working)
        # Only logins racing the kill may fail; none once HAProxy noticed.
        assert [e for t, e in load.failed_logins if t > noticed_at] == [], load.failed_logins
        assert committed_after_down > 0 and len(load.session_errors) <= 3, load.session_errors
        assert not load.acknowledged - found
    finally:
        for conn in held:
            conn.close()
        victim.start()
