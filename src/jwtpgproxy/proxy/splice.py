"""After login: copy bytes both ways with no per-message work, respecting backpressure.

Two halves, one per transport. Each forwards every read, whole, to the other transport. When
a transport's write buffer passes its high-water mark, asyncio calls ``pause_writing()`` on
*its* protocol, which pauses reading on the *other* transport, so a slow reader on one side
throttles the fast writer on the other instead of growing memory (uvicorn's FlowControl does
the same). Either side closing closes the other.

Two details of the TLS side, both measured (issue 10, issue 11):

* A half reading from a TLS transport is an :class:`asyncio.BufferedProtocol`: uvloop then
  decrypts straight into one read buffer shared by the whole process (``SSLObject.read(n,
  buffer)``) instead of allocating a 256 KiB bytes object per read and shrinking it
  (``_do_read__copied``), which cost an mmap/mremap/munmap per read under glibc's
  mmap threshold (:data:`jwtpgproxy.proxy.connection.read_buffer` says why sharing is
  safe).
* Writes to a TLS transport go out in pieces of at most :data:`MAX_TLS_RECORD` bytes, as
  PostgreSQL's own server does (it flushes at most PQ_SEND_BUFFER_SIZE = 8192 bytes per
  ``SSL_write``). libpq-based async clients (psycopg 3, ruby-pg) read into a buffer with
  about 8 KiB free; a 16 KiB record leaves decrypted bytes inside the client's OpenSSL
  while it waits for a socket that never becomes readable again -- a hang
  (cockroachdb#147890, psycopg#1107). The same cap applies towards a TLS upstream.

No reference cycles outlive a splice: a transport refers to its protocol (a half), and a
half to both transports, so once both sides are lost each half swaps its transports for
:data:`_GONE`; halves refer to their splice only weakly. An aborted TLS session is then
freed as soon as its last callback returns, not at the cycle collector's next pass with
both TLS layers' buffers (measured: RSS grew 56 MB per 300 aborted sessions before).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from .connection import read_buffer

#: The largest piece written to a TLS transport at once: one TLS record, like PostgreSQL's.
MAX_TLS_RECORD = 8192
#: Write-buffer watermarks for each transport during splicing.
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
#: After one side is gone, how long the other may take to flush and close.
CLOSE_GRACE_SECONDS = 10.0
#: How long end_with() waits for upstream's next message boundary before it aborts both
#: sides (a client that stopped reading holds upstream mid-message for ever).
END_WITH_DEADLINE_SECONDS = 5.0


class MessageBoundaries:
    """Where typed messages (Byte1 tag, Int32 length, body) end in a byte stream.

    Header-only bookkeeping, no copying of bodies; used only for sessions the proxy may
    have to end itself (token expiry, revocation), so that its FATAL goes in *between*
    two of upstream's messages rather than inside one.
    """

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0  # body bytes still to come of the current message

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def advance(self, data: bytes, *, stop_at_boundary: bool = False) -> int | None:
        """Consume ``data``. With ``stop_at_boundary``, stop at the first message boundary
        and return its offset (0 if already at one); otherwise, or if no boundary is
        reached, consume everything and return None."""
        pos, size = 0, len(data)
        while True:
            if stop_at_boundary and self.at_boundary:
                return pos
            if pos >= size:
                return None
            if self._remaining:
                step = min(self._remaining, size - pos)
                self._remaining -= step
                pos += step
                continue
            step = min(5 - len(self._header), size - pos)
            self._header += data[pos : pos + step]
            pos += step
            if len(self._header) == 5:
                length = int.from_bytes(self._header[1:5], "big")
                self._header.clear()
                self._remaining = max(length - 4, 0)


class _GoneTransport:
    """What a half holds instead of its transports once both are lost: every call is a
    no-op (a late call cannot touch a closed connection) and nothing refers back."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Iterable[bytes | memoryview]) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_GONE = cast(asyncio.Transport, _GoneTransport())


def is_tls(transport: asyncio.BaseTransport) -> bool:
    return transport.get_extra_info("ssl_object") is not None


class Half(asyncio.BaseProtocol):
    """Receives from ``own`` transport and writes to ``peer`` transport.

    A streaming protocol by duck typing (``data_received``, as :class:`asyncio.Protocol`),
    but not a subclass of it: the event loops take a protocol that is an instance of
    ``asyncio.Protocol`` for a plain one even when it offers ``get_buffer()``, and
    :class:`BufferedHalf` must be seen as buffered."""

    __slots__ = ("_seen", "_splice", "_write", "bytes", "own", "peer", "stuck_since")

    def __init__(self, splice: Splice, own: asyncio.Transport, peer: asyncio.Transport) -> None:
        self._splice = weakref.ref(splice)
        self.own = own
        self.peer = peer
        self.bytes = 0
        self._write = self._write_in_records if is_tls(peer) else peer.write
        #: Since when ``peer`` has held unsent bytes without progress (see stuck_for()).
        self.stuck_since: float | None = None
        self._seen = (0, 0)

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self._write(data)

    def _write_in_records(self, data: bytes) -> None:
        if len(data) <= MAX_TLS_RECORD:
            self.peer.write(data)
            return
        view = memoryview(data)  # slices of immutable bytes: no copies, safe to keep
        self.peer.writelines(
            [view[i : i + MAX_TLS_RECORD] for i in range(0, len(data), MAX_TLS_RECORD)]
        )

    def stuck_for(self, now: float) -> float:
        """Seconds this direction has held unsent bytes with no progress at all: nothing
        flushed (the peer's write buffer is as full as at the last look) and nothing new
        accepted. Called now and then from outside the hot path; 0.0 while moving."""
        seen = (self.peer.get_write_buffer_size(), self.bytes)
        if seen[0] == 0 or seen != self._seen:
            self._seen = seen
            self.stuck_since = now if seen[0] else None
            return 0.0
        return 0.0 if self.stuck_since is None else now - self.stuck_since

    def eof_received(self) -> bool | None:
        # PostgreSQL has no half-closed state: end of stream from one side ends the session.
        splice = self._splice()
        if splice is not None:
            splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        splice = self._splice()
        if splice is not None:
            splice.side_lost(self)
        else:  # the session is gone already; close what is left
            self.peer.close()

    def peer_lost(self) -> None:
        """``peer`` is gone: what still arrives from ``own`` has nowhere to go (writing it
        to a closed TLS transport would only log a warning per write)."""
        self.peer = _GONE
        self._write = _GONE.write

    def release(self) -> None:
        """Both sides are lost: drop the transports (see the module docstring)."""
        self.own = _GONE
        self.peer_lost()

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()


class _BufferedReads:
    """Mixin: read through the shared buffer (asyncio.BufferedProtocol's interface), then
    forward as :meth:`Half.data_received` does. Copying ``nbytes`` out is what frees the
    shared buffer for the next read -- and costs far less than the 256 KiB allocation it
    replaces."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(read_buffer[:nbytes].tobytes())  # type: ignore[attr-defined]


class EndableHalf(Half):
    """The upstream -> client half of a session the proxy may end: it tracks message
    boundaries so :meth:`end_with` can put a final message between two of upstream's."""

    __slots__ = ("_deadline", "_ended", "_final", "boundaries")

    def __init__(self, splice: Splice, own: asyncio.Transport, peer: asyncio.Transport) -> None:
        super().__init__(splice, own, peer)
        self.boundaries = MessageBoundaries()
        self._final: bytes | None = None
        self._ended = False
        self._deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return  # the client has its final message; nothing of upstream's follows it
        if self._final is None:
            self.boundaries.advance(data)
            super().data_received(data)
            return
        cut = self.boundaries.advance(data, stop_at_boundary=True)
        if cut is None:
            super().data_received(data)
            return
        super().data_received(data[:cut])
        self._deliver_final()

    @property
    def ending(self) -> bool:
        """The proxy is ending (or has ended) this session with a final message."""
        return self._ended or self._final is not None

    def end_with(self, final: bytes) -> None:
        """Send ``final`` to the client at the next message boundary, then close both."""
        if self._ended or self._final is not None:
            return
        self._final = final
        if self.boundaries.at_boundary:
            self._deliver_final()
            return
        # No boundary may ever come (upstream paused because the client stopped reading,
        # or silent mid-message): then the session ends without its final message.
        self._deadline = asyncio.get_running_loop().call_later(
            END_WITH_DEADLINE_SECONDS, self._end_overdue
        )

    def _end_overdue(self) -> None:
        self._deadline = None
        splice = self._splice()
        if splice is not None:
            splice.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def release(self) -> None:
        self._cancel_deadline()  # the session is over: the timer must not keep us
        super().release()

    def _deliver_final(self) -> None:
        assert self._final is not None
        self._ended = True
        self._cancel_deadline()
        self.peer.write(self._final)
        splice = self._splice()
        if splice is not None:
            splice.close()


class BufferedHalf(_BufferedReads, Half, asyncio.BufferedProtocol):
    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        # The hot path: one Python frame per read (no call through data_received()).
        self.bytes += nbytes
        self._write(read_buffer[:nbytes].tobytes())


class BufferedEndableHalf(_BufferedReads, EndableHalf, asyncio.BufferedProtocol):
    __slots__ = ()


def _half_type(own: asyncio.Transport, *, endable: bool = False) -> type[Half]:
    """The half reading from ``own``: buffered reads from TLS, plain ones otherwise (for a
    plain socket uvloop already reads into a buffer of its own and makes one bytes object;
    buffered reads would only add a Python call)."""
    if is_tls(own):
        return BufferedEndableHalf if endable else BufferedHalf
    return EndableHalf if endable else Half


#: Builds a splice's (client -> upstream, upstream -> client) halves.
HalvesFactory = Callable[["Splice", asyncio.Transport, asyncio.Transport], tuple[Half, Half]]


class Splice:
    """Splices a client transport and an upstream transport until either closes."""

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        endable: bool = False,
        halves: HalvesFactory | None = None,
    ) -> None:
        """``endable``: the proxy may end this session itself (see :meth:`end_with`); costs
        a little header bookkeeping per upstream message. ``halves``: builds (client half,
        upstream half) instead of the plain ones (session pooling's tracking halves)."""
        loop = asyncio.get_running_loop()
        self._one_lost: asyncio.Future[None] = loop.create_future()
        self._both_lost: asyncio.Future[None] = loop.create_future()
        self._lost = 0
        #: Upstream's transport was taken out of this splice (see release_upstream()).
        self._released = False
        if halves is not None:
            self.client_half, self.upstream_half = halves(self, client, upstream)
        else:
            self.client_half = _half_type(client)(self, client, upstream)  # client -> upstream
            self.upstream_half = _half_type(upstream, endable=endable)(self, upstream, client)
        for transport in (client, upstream):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def start(self, to_client: bytes, to_upstream: bytes) -> None:
        """Switch both transports to splicing; first send what was read but not relayed."""
        client, upstream = self.client_half.own, self.upstream_half.own
        client.set_protocol(self.client_half)
        upstream.set_protocol(self.upstream_half)
        # As if each side had just sent them: counted, cut into records, boundaries kept.
        if to_client:
            self.upstream_half.data_received(to_client)
        if to_upstream:
            self.client_half.data_received(to_upstream)
        # A close that is already under way reaches the new protocol: asyncio looks the
        # protocol up when it delivers connection_lost. The caller checks that neither
        # handshake protocol saw the connection lost before calling start().

    def stuck(self, now: float) -> Iterator[tuple[str, float, int]]:
        """(direction, seconds, unsent bytes) of each direction that holds unsent bytes and
        has made no progress since the last look (see :meth:`Half.stuck_for`)."""
        for direction, half in (
            ("to_upstream", self.client_half),
            ("to_client", self.upstream_half),
        ):
            seconds = half.stuck_for(now)
            if seconds:
                yield direction, seconds, half.peer.get_write_buffer_size()

    @property
    def bytes_from_client(self) -> int:
        return self.client_half.bytes

    @property
    def bytes_to_client(self) -> int:
        return self.upstream_half.bytes

    def side_lost(self, half: Half) -> None:
        self._lost += 1
        half.peer.close()  # flushes what is buffered, then closes
        other = self.upstream_half if half is self.client_half else self.client_half
        other.peer_lost()  # after release_upstream(): the client half lets go of upstream
        if self._lost >= 2:
            self.client_half.release()
            self.upstream_half.release()
        for future in (self._one_lost, self._both_lost)[: self._lost]:
            if not future.done():
                future.set_result(None)

    def release_upstream(self) -> asyncio.Transport | None:
        """Take upstream's transport out of the splice, open (session pooling: the client
        ended cleanly); None if the proxy is ending this session itself. The caller sets
        the transport's protocol before returning to the event loop; for this splice,
        upstream's side counts as gone."""
        if self._released or self.ending:
            return None
        half = self.upstream_half
        transport = half.own  # before side_lost(), which may let the halves drop it
        self._released = True
        self.side_lost(half)
        return transport

    def _own_transports(self) -> Iterator[asyncio.Transport]:
        yield self.client_half.own
        if not self._released:
            yield self.upstream_half.own

    @property
    def ending(self) -> bool:
        """The proxy is ending (or has ended) this session itself."""
        half = self.upstream_half
        return isinstance(half, EndableHalf) and half.ending

    def end_with(self, final: bytes) -> bool:
        """Give the client ``final`` (an ErrorResponse) between two of upstream's messages,
        then close; False if this splice was not built ``endable``."""
        if not isinstance(self.upstream_half, EndableHalf):
            return False
        self.upstream_half.end_with(final)
        return True

    def close(self) -> None:
        for transport in self._own_transports():
            transport.close()

    def abort(self) -> None:
        for transport in self._own_transports():
            transport.abort()

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
