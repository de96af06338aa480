"""Waits that must end (issue 13, item 11): terminate_backends() against an upstream that
says nothing after login, and Splice.end_with() when upstream never reaches a message
boundary."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from jwtpgproxy.errors import UpstreamUnavailable
from jwtpgproxy.protocol import wire
from jwtpgproxy.protocol.login import ChannelBindingPolicy
from jwtpgproxy.proxy import splice as splice_module
from jwtpgproxy.proxy.connection import Keepalive
from jwtpgproxy.proxy.splice import Splice
from jwtpgproxy.proxy.upstream import (
    TERMINATE_TIMEOUT_SECONDS,
    UpstreamSSLMode,
    UpstreamTarget,
    terminate_backends,
)


async def _silent_after_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Trust login, then read the query and never answer it."""
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    await reader.readexactly(length - 4)
    writer.write(
        wire.authentication(wire.AUTH_OK)
        + wire.backend_key_data(7, b"\1\2\3\4")
        + wire.typed_message(b"Z", b"I")
    )
    await writer.drain()
    await reader.read()  # until the proxy hangs up


def test_terminate_backends_has_a_deadline() -> None:
    async def scenario() -> float:
        server = await asyncio.start_server(_silent_after_login, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = UpstreamTarget(
            host="127.0.0.1",
            port=port,
            password="pw",
            sslmode=UpstreamSSLMode.DISABLE,
            ssl_context=None,
            channel_binding=ChannelBindingPolicy.DISABLE,
            connect_timeout=2,
            keepalive=Keepalive(),
        )
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="did not terminate backends"):
            await asyncio.wait_for(terminate_backends(target, "alice", "db", [7], timeout=0.5), 10)
        elapsed = time.monotonic() - started
        server.close()
        return elapsed

    assert asyncio.run(scenario()) < 2
    assert 0 < TERMINATE_TIMEOUT_SECONDS <= 10


async def _transport(sock: socket.socket) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
    return transport


def test_end_with_aborts_when_no_message_boundary_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream stops mid-message (here: silent; in life: paused because the client stopped
    reading): the final message can never be placed, so the session is aborted at the
    deadline instead of living on."""
    monkeypatch.setattr(splice_module, "END_WITH_DEADLINE_SECONDS", 0.3)

    async def scenario() -> float:
        client_end, proxy_client = socket.socketpair()
        upstream_end, proxy_upstream = socket.socketpair()
        for sock in (client_end, upstream_end):
            sock.setblocking(False)
        splice = Splice(
            await _transport(proxy_client), await _transport(proxy_upstream), endable=True
        )
        splice.start(b"", b"")
        # Half a DataRow: the header claims 100 bytes, 10 arrive.
        upstream_end.send(b"D" + struct.pack("!i", 104) + b"x" * 10)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        assert splice.end_with(wire.error_response({"S": "FATAL", "C": "57P01", "M": "bye"}))
        await asyncio.wait_for(splice.wait_closed(), 5)
        elapsed = time.monotonic() - started
        for sock in (client_end, upstream_end):
            sock.close()
        return elapsed

    assert asyncio.run(scenario()) < 2


def test_end_with_at_a_boundary_is_immediate() -> None:
    async def scenario() -> bytes:
        client_end, proxy_client = socket.socketpair()
        upstream_end, proxy_upstream = socket.socketpair()
        splice = Splice(
            await _transport(proxy_client), await _transport(proxy_upstream), endable=True
        )
        splice.start(b"", b"")
        final = wire.error_response({"S": "FATAL", "C": "57P01", "M": "bye"})
        assert splice.end_with(final)
        await asyncio.wait_for(splice.wait_closed(), 5)
        client_end.settimeout(2)
        received = client_end.recv(4096)
        for sock in (client_end, upstream_end):
            sock.close()
        return received

    assert asyncio.run(scenario()).startswith(b"E")
