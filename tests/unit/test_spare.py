"""Spare upstream connections (jwtpgproxy.proxy.spare) against a scripted upstream.

The fake upstream is a thread on 127.0.0.1 that accepts connections and plays, for each one
in turn, the behaviour the test gives it: a login that succeeds (AuthenticationOk, then
ReadyForQuery), a close before or after the StartupMessage, an error. Optionally TLS, to see
how a spare is closed. Every test bounds its waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import write_self_signed
from prometheus_client import generate_latest

from jwtpgproxy.errors import UpstreamErrorResponse, UpstreamUnavailable
from jwtpgproxy.protocol import wire
from jwtpgproxy.protocol.login import ALL_AUTH_METHODS, ChannelBindingPolicy
from jwtpgproxy.proxy.connection import Keepalive
from jwtpgproxy.proxy.metrics import Metrics
from jwtpgproxy.proxy.spare import UpstreamSpares
from jwtpgproxy.proxy.upstream import (
    UpstreamConnection,
    UpstreamSSLMode,
    UpstreamTarget,
    open_upstream,
)

PARAMETERS = {"user": "alice", "database": "app"}
Behaviour = Callable[["Upstream", socket.socket], None]


class Upstream:
    """Connection ``i`` is handled by ``behaviours[i]`` (the last one repeats)."""

    def __init__(self, behaviours: list[Behaviour]) -> None:
        self.behaviours = behaviours
        self.tls: ssl.SSLContext | None = None
        self.accepted = 0
        self._events: dict[int, str] = {}  # what each connection saw, by connection
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._index = threading.local()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            index = self.accepted
            self.accepted += 1
            behaviour = self.behaviours[min(index, len(self.behaviours) - 1)]
            thread = threading.Thread(
                target=self._serve, args=(index, behaviour, conn), daemon=True
            )
            self._threads.append(thread)
            thread.start()

    @property
    def events(self) -> list[str]:
        """What each connection saw, in the order of the connections."""
        return [self._events[i] for i in sorted(self._events)]

    def _serve(self, index: int, behaviour: Behaviour, conn: socket.socket) -> None:
        self._index.value = index
        conn.settimeout(10)
        with contextlib.suppress(OSError), conn:
            if self.tls is not None:
                request = recv_exact(conn, 8)
                assert struct.unpack("!iI", request)[1] == wire.SSL_REQUEST_CODE
                conn.sendall(b"S")
                conn = self.tls.wrap_socket(conn, server_side=True)
            behaviour(self, conn)

    def record(self, event: str) -> None:
        self._events[self._index.value] = event

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(2)
        self._sock.close()
        for thread in self._threads:
            thread.join(2)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_startup(conn: socket.socket) -> bytes:
    (length,) = struct.unpack("!i", recv_exact(conn, 4))
    return recv_exact(conn, length - 4)


def logs_in(upstream: Upstream, conn: socket.socket) -> None:
    read_startup(conn)
    upstream.record("login")
    conn.sendall(
        wire.authentication(wire.AUTH_OK)
        + wire.backend_key_data(4242, b"\1\2\3\4")
        + wire.typed_message(b"Z", b"I")
    )
    with contextlib.suppress(OSError, ConnectionError):
        while conn.recv(65536):
            pass


def closes_at_once(upstream: Upstream, conn: socket.socket) -> None:
    upstream.record("closed at once")


def closes_at_startup(upstream: Upstream, conn: socket.socket) -> None:
    read_startup(conn)
    upstream.record("closed at startup")


def answers_then_closes(upstream: Upstream, conn: socket.socket) -> None:
    read_startup(conn)
    upstream.record("answered, then closed")
    conn.sendall(wire.authentication(wire.AUTH_SASL)[:3])  # part of a message, then EOF


def refuses(upstream: Upstream, conn: socket.socket) -> None:
    read_startup(conn)
    upstream.record("refused")
    conn.sendall(
        wire.error_response({"S": "FATAL", "C": "53300", "M": "sorry, too many clients already"})
    )


def waits_for_close(upstream: Upstream, conn: socket.socket) -> None:
    """Record how the proxy ends a connection it never used: a TLS close_notify (recv
    returns b"") or an abrupt end (an error)."""
    try:
        data = conn.recv(65536)
        upstream.record("clean close" if data == b"" else f"data {data!r}")
    except (ssl.SSLError, OSError) as exc:
        upstream.record(f"abrupt close: {exc.__class__.__name__}")


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(*behaviours: Callable[[Upstream, socket.socket], None]) -> Upstream:
        upstream = Upstream(list(behaviours))
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


def target_for(port: int, **overrides: object) -> UpstreamTarget:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "password": "secret",
        "sslmode": UpstreamSSLMode.DISABLE,
        "ssl_context": None,
        "channel_binding": ChannelBindingPolicy.DISABLE,
        "connect_timeout": 5.0,
        "keepalive": Keepalive(),
        "require_auth": ALL_AUTH_METHODS,
        **overrides,
    }
    return UpstreamTarget(**fields)  # type: ignore[arg-type]


def counted(metrics: Metrics, result: str) -> float:
    prefix = f'jwtpgproxy_upstream_spares_total{{result="{result}"}} '
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def asynchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function to completion on a new event loop, within 30 s."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(30):
                await test(*args, **kwargs)

        asyncio.run(bounded())

    return run


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def login(target: UpstreamTarget, spares: UpstreamSpares) -> UpstreamConnection:
    connection = await open_upstream(target, PARAMETERS, spares=spares)
    assert connection.result.backend_key == (4242, b"\1\2\3\4")
    connection.protocol.close()
    return connection


def spares_and_metrics() -> tuple[UpstreamSpares, Metrics]:
    metrics = Metrics(lambda: iter(()))
    return UpstreamSpares(metrics), metrics


@asynchronous
async def test_the_next_login_starts_on_the_spare_the_last_one_opened(upstreams) -> None:
    upstream = upstreams(logs_in)
    target = target_for(upstream.port)
    spares, metrics = spares_and_metrics()
    await login(target, spares)  # no spare yet: connection 0; connection 1 becomes one
    await until(lambda: len(spares) == 1 and upstream.accepted == 2)
    assert upstream.events == ["login"]
    await login(target, spares)  # on connection 1, opened before this login began
    await until(lambda: len(spares) == 1 and upstream.accepted == 3)  # connection 2
    await until(lambda: len(upstream.events) == 2)
    assert upstream.events == ["login", "login"]
    assert (counted(metrics, "none"), counted(metrics, "used")) == (1, 1)
    spares.close()


@asynchronous
async def test_spares_fill_up_to_the_count_and_no_further(upstreams) -> None:
    upstream = upstreams(logs_in)
    target = target_for(upstream.port, spare_connections=3)
    spares, _ = spares_and_metrics()
    await login(target, spares)
    await until(lambda: len(spares) == 3)
    await login(target, spares)
    await until(lambda: len(spares) == 3 and upstream.accepted == 5)
    await asyncio.sleep(0.1)
    assert upstream.accepted == 5 and len(spares) == 3
    spares.close()


@asynchronous
async def test_no_spares_when_the_count_is_zero(upstreams) -> None:
    upstream = upstreams(logs_in)
    target = target_for(upstream.port, spare_connections=0)
    spares, metrics = spares_and_metrics()
    for _ in range(3):
        await login(target, spares)
    await asyncio.sleep(0.1)
    assert upstream.accepted == 3 and len(spares) == 0
    assert counted(metrics, "used") == counted(metrics, "none") == 0


@asynchronous
async def test_a_spare_upstream_closed_is_skipped(upstreams) -> None:
    upstream = upstreams(logs_in, closes_at_once, logs_in)
    target = target_for(upstream.port)
    spares, metrics = spares_and_metrics()
    await login(target, spares)
    await until(lambda: "closed at once" in upstream.events)
    await asyncio.sleep(0.05)  # the proxy sees the EOF
    await login(target, spares)  # connection 2, not the closed spare
    assert upstream.events == ["login", "closed at once", "login"]
    assert counted(metrics, "stale") == 1 and counted(metrics, "used") == 0
    spares.close()


@asynchronous
async def test_a_spare_that_closes_as_the_login_begins_is_replaced_by_a_new_connection(
    upstreams,
) -> None:
    # authentication_timeout ending the backend just as the StartupMessage goes out:
    # upstream said nothing, so the login goes on over a new connection.
    upstream = upstreams(logs_in, closes_at_startup, logs_in)
    target = target_for(upstream.port)
    spares, metrics = spares_and_metrics()
    await login(target, spares)
    await until(lambda: len(spares) == 1)
    await login(target, spares)
    assert upstream.events == ["login", "closed at startup", "login"]
    assert counted(metrics, "used") == 1
    spares.close()


@pytest.mark.parametrize(
    ("behaviour", "error", "event"),
    [
        (answers_then_closes, UpstreamUnavailable, "answered, then closed"),
        (refuses, UpstreamErrorResponse, "refused"),
    ],
)
@asynchronous
async def test_a_login_upstream_answered_on_a_spare_is_not_repeated(
    upstreams, behaviour, error, event
) -> None:
    upstream = upstreams(logs_in, behaviour, logs_in)
    target = target_for(upstream.port)
    spares, _ = spares_and_metrics()
    await login(target, spares)
    await until(lambda: len(spares) == 1)
    with pytest.raises(error):
        await login(target, spares)
    await asyncio.sleep(0.05)
    assert upstream.events == ["login", event]  # no second StartupMessage anywhere
    spares.close()


@asynchronous
async def test_an_idle_spare_is_closed_with_close_notify_and_not_replaced(
    upstreams, tmp_path: Path
) -> None:
    # PostgreSQL logs an aborted connection ("could not receive data from client") but
    # nothing for one that ends cleanly before its startup packet.
    upstream = upstreams(logs_in, waits_for_close)
    upstream.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream.tls.load_cert_chain(*write_self_signed(tmp_path))
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    target = target_for(
        upstream.port,
        sslmode=UpstreamSSLMode.REQUIRE,
        ssl_context=client,
        spare_idle_timeout=0.3,
    )
    spares, metrics = spares_and_metrics()
    connection = await open_upstream(target, PARAMETERS, spares=spares)
    assert connection.tls
    connection.protocol.close()
    await until(lambda: len(spares) == 1)
    await until(lambda: len(upstream.events) == 2, timeout=5)
    assert upstream.events == ["login", "clean close"]
    assert len(spares) == 0 and counted(metrics, "expired") == 1
    await asyncio.sleep(0.2)
    assert upstream.accepted == 2  # an idle proxy opens no more


@asynchronous
async def test_spares_of_a_replaced_target_are_closed_not_used(upstreams) -> None:
    upstream = upstreams(logs_in)
    old = target_for(upstream.port)
    spares, metrics = spares_and_metrics()
    await login(old, spares)
    await until(lambda: len(spares) == 1)
    new = target_for(upstream.port)  # a reload: equal settings, a new target
    await login(new, spares)
    assert counted(metrics, "stale") == 1 and counted(metrics, "used") == 0
    spares.close()


@asynchronous
async def test_a_failed_spare_is_not_retried_within_a_second() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        target = target_for(port)
        spares, metrics = spares_and_metrics()
        assert spares.take(target) is None
        await until(lambda: counted(metrics, "failed") == 1)
        assert spares.take(target) is None
        await asyncio.sleep(0.1)
        assert counted(metrics, "failed") == 1


@asynchronous
async def test_close_ends_the_spares_and_opens_no_more(upstreams) -> None:
    upstream = upstreams(logs_in, waits_for_close)
    target = target_for(upstream.port)
    spares, _ = spares_and_metrics()
    await login(target, spares)
    await until(lambda: len(spares) == 1)
    spares.close()
    await until(lambda: len(upstream.events) == 2)
    assert len(spares) == 0
    assert spares.take(target) is None
    await asyncio.sleep(0.1)
    assert upstream.accepted == 2
