"""An asyncio Protocol for the handshake phase of either side of a session.

Until login completes, bytes are needed one step at a time by the sans-IO state machines, so
this protocol buffers what arrives and lets the session ``await read()``. It supports the TLS
upgrade in place (``loop.start_tls``) and, once login is done, :meth:`detach` hands the
transport over to the splice protocol with whatever was buffered but not yet consumed.

Reads go through :data:`read_buffer`, one buffer for the whole process: the event loop runs
one callback at a time, and every reader copies what it got out of it before returning. With
a buffered protocol uvloop's TLS transport decrypts into that buffer (``SSLObject.read(n,
buffer)``); with a plain one it would allocate a 256 KiB bytes object for every read.

The protocol lets go of its transport once the connection is lost or handed over: a
transport refers to its protocol, so holding it longer would make a reference cycle, and an
abandoned TLS connection would then wait for the cycle collector with its buffers.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ..errors import ClientDisconnected, ProtocolViolation, ProxyError

#: Stop reading from the peer when this much is buffered and unread (handshake only).
_READ_HIGH_WATER = 65536
#: Size of :data:`read_buffer`: as large as uvloop's own read buffer for plain sockets.
READ_BUFFER_SIZE = 256 * 1024
#: The process's one read buffer for buffered protocols (see the module docstring).
read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive timing: first probe after ``idle`` s, then every ``interval`` s, the
    peer is declared dead after ``count`` unanswered probes."""

    idle: int = 60
    interval: int = 10
    count: int = 6


class HandshakeProtocol(asyncio.BufferedProtocol):
    def __init__(
        self,
        keepalive: Keepalive | None = None,
        *,
        peer_closed: Callable[[str], ProxyError] = ClientDisconnected,
    ) -> None:
        """``peer_closed``: the error to raise when the peer is gone while the session needs
        it -- :class:`ClientDisconnected` for a client, an UpstreamError for upstream."""
        self._keepalive = keepalive or Keepalive()
        self._peer_closed = peer_closed
        self.transport: asyncio.Transport | None = None
        #: Whether the event loop ever gave this protocol a transport.
        self.connected = False
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self.bytes_received = 0
        self.bytes_sent = 0

    # -- asyncio.Protocol callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connected = True
        configure_socket(self.transport, self._keepalive)

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._buffer += read_buffer[:nbytes]
        self.bytes_received += nbytes
        if len(self._buffer) > _READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._read_paused = True
        self._wake_reader()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake_reader()
        return False  # close the transport (no half-open connections in this protocol)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        self.transport = None
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- session interface --

    @property
    def closed(self) -> bool:
        return self._lost

    async def read(self) -> bytes:
        """Return what is buffered, waiting for at least one byte. Raise at end of stream."""
        while not self._buffer:
            if self._eof:
                raise self._peer_closed("connection closed by peer")
            loop = asyncio.get_running_loop()
            self._data_waiter = loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._read_paused and self.transport is not None and not self._lost:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self._lost or self.transport.is_closing():
            raise self._peer_closed("cannot write: connection closed")
        self.transport.write(data)
        self.bytes_sent += len(data)

    async def drain(self) -> None:
        if self._lost:
            raise self._peer_closed("connection lost")
        if not self._write_paused:
            return
        loop = asyncio.get_running_loop()
        self._drain_waiter = loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Upgrade to TLS in place; the buffer must be empty (checked by the callers)."""
        assert self.transport is not None
        if self._buffer:
            raise ProtocolViolation("unencrypted data buffered before TLS handshake")
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if new_transport is None:
            raise self._peer_closed("connection closed during TLS handshake")
        self.transport = new_transport

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the transport (for splicing) with the bytes not consumed yet."""
        transport = self.transport
        assert transport is not None
        self.transport = None
        leftover = bytes(self._buffer)
        self._buffer.clear()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        return transport, leftover

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _wake_reader(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)


def format_peer(sock: socket.socket) -> str:
    """``host:port`` (``[v6]:port``) of the peer, for logs."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) or "local"


def configure_socket(transport: asyncio.BaseTransport, keepalive: Keepalive) -> None:
    """TCP_NODELAY (small protocol messages must not wait for Nagle) and keepalive, so a
    peer that vanished without a FIN (a NAT timeout, a dead host) is noticed."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS has only TCP_KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    except OSError:
        pass  # the peer may already be gone; the next read will tell
