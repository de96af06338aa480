"""After login: copy bytes both ways with no per-message work, respecting backpressure.

Two :class:`Half` protocols, one per transport. Each forwards every read, whole, to the other
transport. When a transport's write buffer passes its high-water mark, asyncio calls
``pause_writing()`` on *its* protocol, which pauses reading on the *other* transport, so a slow
reader on one side throttles the fast writer on the other instead of growing memory
(uvicorn's FlowControl does the same). Either side closing closes the other.
"""

from __future__ import annotations

import asyncio

#: Write-buffer watermarks for each transport during splicing.
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
#: After one side is gone, how long the other may take to flush and close.
CLOSE_GRACE_SECONDS = 10.0


class Half(asyncio.Protocol):
    """Receives from ``own`` transport and writes to ``peer`` transport."""

    __slots__ = ("_splice", "bytes", "own", "peer")

    def __init__(self, splice: Splice, own: asyncio.Transport, peer: asyncio.Transport) -> None:
        self._splice = splice
        self.own = own
        self.peer = peer
        self.bytes = 0

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.peer.write(data)

    def eof_received(self) -> bool | None:
        # PostgreSQL has no half-closed state: end of stream from one side ends the session.
        self._splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.side_lost(self)

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class Splice:
    """Splices a client transport and an upstream transport until either closes."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        self._one_lost: asyncio.Future[None] = loop.create_future()
        self._both_lost: asyncio.Future[None] = loop.create_future()
        self._lost = 0
        self.client_half = Half(self, client, upstream)  # client -> upstream
        self.upstream_half = Half(self, upstream, client)  # upstream -> client
        for transport in (client, upstream):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def start(self, to_client: bytes, to_upstream: bytes) -> None:
        """Switch both transports to splicing; first send what was read but not relayed."""
        client, upstream = self.client_half.own, self.upstream_half.own
        client.set_protocol(self.client_half)
        upstream.set_protocol(self.upstream_half)
        if to_client:
            client.write(to_client)
        if to_upstream:
            self.client_half.bytes += len(to_upstream)
            upstream.write(to_upstream)
        # A close that is already under way reaches the new protocol: asyncio looks the
        # protocol up when it delivers connection_lost. The caller checks that neither
        # handshake protocol saw the connection lost before calling start().

    @property
    def bytes_from_client(self) -> int:
        return self.client_half.bytes

    @property
    def bytes_to_client(self) -> int:
        return self.upstream_half.bytes

    def side_lost(self, half: Half) -> None:
        self._lost += 1
        half.peer.close()  # flushes what is buffered, then closes
        for future in (self._one_lost, self._both_lost)[: self._lost]:
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        for half in (self.client_half, self.upstream_half):
            half.own.close()

    def abort(self) -> None:
        for half in (self.client_half, self.upstream_half):
            half.own.abort()

    async def wait_closed(self) -> None:
        """Until both sides are gone. If one side does not drain within a grace period
        after the other closed, it is aborted, so a stuck peer cannot pin the session."""
        await asyncio.shield(self._one_lost)
        try:
            async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                await asyncio.shield(self._both_lost)
        except TimeoutError:
            self.abort()
            await self._both_lost
