"""Opt-in session pooling (``POOL__MODE=session``): reuse upstream logins across clients.

Every login through the proxy otherwise forks a PostgreSQL backend and runs a full upstream
login. With session pooling, a client that ends its session cleanly leaves its upstream
connection behind: the proxy resets it with ``DISCARD ALL`` and parks it; the next client
whose verified identity and startup parameters match gets it, and sees the greeting a fresh
login would give (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery).

What makes an end *clean* (:meth:`SessionTracking.clean`) -- anything else closes the
upstream connection, as without pooling:

* the client sent Terminate ('X');
* upstream answered every Query, Sync and FunctionCall the client sent (one ReadyForQuery
  each, 55.2.2/55.2.3), the last ReadyForQuery said idle ('I': no transaction block, not a
  failed one), and no ErrorResponse came after it (a FATAL one is on its way to a close);
* no extended-query message (Parse, Bind, Execute, Describe, Close, Flush) is waiting for
  its Sync: an implicit transaction or a portal would still be open;
* no COPY is in progress (CopyIn/CopyOut/CopyBothResponse since the last ReadyForQuery);
* the proxy did not end the session itself (token expiry, revocation), and upstream sent
  every message whole (the stream is at a message boundary).

The key a parked connection is found under (:class:`PoolKey`): the upstream role, the
database, the token's read-only scope, the protocol version, and every startup parameter the
proxy sends upstream except ``application_name``. ``DISCARD ALL`` runs ``RESET ALL``, which
brings each setting back to its value *from the startup packet* -- so parameters such as
``client_encoding``, ``DateStyle``, ``TimeZone``, ``search_path``, ``options`` or the
``default_transaction_read_only = on`` of a read-only token survive the reset and must match.
``application_name`` is the one that may differ (as PgBouncer does it): the proxy never sends
it in the startup packet of a pooled connection, so its reset value is the server's default.
After the reset the last client's value is SET again (off any client's path: most clients
come back with the same name); a client handed the connection with another value gets it
with ``SET``, one with none gets ``RESET application_name``, before its greeting.

The message tracking this needs runs only for pooled sessions (other sessions keep the
untracked splice halves, byte for byte as before) and is header bookkeeping: one loop step
per message header, and the bodies of ParameterStatus and ReadyForQuery only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from logging import DEBUG, INFO

from ..errors import ProxyError, UpstreamError, WireError
from ..logs import event
from ..protocol import login as login_sm
from ..protocol import wire
from .connection import HandshakeProtocol, Keepalive, read_buffer
from .metrics import Metrics
from .spare import UpstreamSpares
from .splice import (
    EndableHalf,
    Half,
    Splice,
    _BufferedReads,
    is_tls,
)
from .upstream import UpstreamConnection, UpstreamTarget, open_upstream

log = logging.getLogger("jwtpgproxy")

#: The one startup parameter that may differ between clients sharing a backend: it is left
#: out of the upstream startup packet and applied with SET (PgBouncer does the same).
APPLIED_AFTER_RESET = frozenset({"application_name"})
#: The reset run before a connection is parked (see the module docstring for what it covers).
RESET_QUERY = "DISCARD ALL"
#: How long the reset (or a SET application_name) may take before the connection is closed.
RESET_TIMEOUT = 5.0
#: ParameterStatus bodies larger than this make the session unpoolable (never seen in
#: practice: PostgreSQL reports a dozen short settings).
MAX_TRACKED_PARAMETER = 8192

_Z, _S, _E = ord("Z"), ord("S"), ord("E")
_HEADER = struct.Struct("!BI")  # a typed message's tag and length
_TRACKED = frozenset(b"ZSEGHW")  # the backend messages BackendTracker looks into
_COPY_STARTS = frozenset(b"GHW")  # CopyInResponse, CopyOutResponse, CopyBothResponse
# What each frontend message tag means to FrontendTracker (a table: one index per message).
_KIND_SYNC_POINT, _KIND_SYNC, _KIND_NEEDS_SYNC, _KIND_TERMINATE = 1, 2, 3, 4
_FRONTEND_KINDS = tuple(
    _KIND_TERMINATE
    if tag == ord("X")
    else _KIND_SYNC
    if tag == ord("S")
    else _KIND_SYNC_POINT
    if tag in b"QF"
    else _KIND_NEEDS_SYNC
    if tag in b"PBEDCH"
    else 0
    for tag in range(256)
)
# Frontend: Query, Sync and FunctionCall each get one ReadyForQuery; Parse, Bind, Execute,
# Describe, Close and Flush wait for a Sync; X is Terminate.


class PoolMode(enum.StrEnum):
    NONE = "none"
    SESSION = "session"


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Plain values from ``POOL__*`` (see jwtpgproxy.ops.config)."""

    mode: PoolMode = PoolMode.NONE
    #: Parked connections kept per key; a clean end beyond it closes the connection.
    max_idle_per_key: int = 20
    #: Parked connections kept in all (bounds what varied startup parameters can hold).
    max_idle: int = 100
    #: Seconds a connection may stay parked before it is closed.
    idle_timeout: float = 60.0
    #: Seconds after its upstream login a connection is no longer parked or handed out.
    max_lifetime: float = 3600.0

    @property
    def enabled(self) -> bool:
        return self.mode is PoolMode.SESSION


# --- Message tracking (sans-IO) ------------------------------------------------------------


class BackendTracker:
    """Follows upstream's messages by their headers: ReadyForQuery count and status,
    ParameterStatus values, COPY and ErrorResponse since the last ReadyForQuery.

    Also serves as an :class:`~jwtpgproxy.proxy.splice.EndableHalf`'s message boundaries
    (same ``advance``/``at_boundary`` interface), so a session both pooled and endable walks
    upstream's stream once.
    """

    __slots__ = (
        "_body",
        "_header",
        "_remaining",
        "_tag",
        "copy",
        "error",
        "errors",
        "overflow",
        "parameters",
        "ready",
        "status",
    )

    def __init__(self, parameters: Mapping[str, str] | None = None) -> None:
        self._header = bytearray()
        self._remaining = 0
        self._tag = 0
        self._body: bytearray | None = None  # the body being kept (S and Z only)
        #: ReadyForQuery messages seen, and the status byte of the last one.
        self.ready = 0
        self.status = b""
        #: A COPY started / an ErrorResponse came since the last ReadyForQuery.
        self.copy = False
        self.error = False
        #: ErrorResponse messages seen in all.
        self.errors = 0
        #: A message this tracker could not follow (oversized or malformed ParameterStatus).
        self.overflow = False
        #: Upstream's current ParameterStatus values, in the order first reported.
        self.parameters: dict[str, str] = dict(parameters or {})

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def advance(self, data: bytes, *, stop_at_boundary: bool = False) -> int | None:
        """Consume ``data`` (as :meth:`MessageBoundaries.advance
        <jwtpgproxy.proxy.splice.MessageBoundaries.advance>`).

        The fast path -- whole headers in ``data`` -- costs one ``unpack_from`` and a set
        lookup per message; only messages split across reads take the byte-wise path."""
        pos, size = 0, len(data)
        while self._remaining or self._header:  # finish a message split across reads
            if pos >= size:
                return None
            pos = self._continue(data, pos, size)
        if stop_at_boundary:
            return pos
        unpack, tracked, limit = _HEADER.unpack_from, _TRACKED, size - 5
        while pos <= limit:
            tag, length = unpack(data, pos)
            end = pos + 1 + length
            if tag in tracked or length < 4:
                if tag == _Z and length == 5 and end <= size:  # the common case, inline
                    self.ready += 1
                    self.status = data[end - 1 : end]
                    self.copy = self.error = False
                elif length < 4:
                    self.overflow = True  # not PostgreSQL: never reuse this connection
                    end = pos + 5
                elif end <= size:
                    self._whole(tag, data, pos + 5, end)
                else:
                    self._begin(tag, length - 4)
                    pos += 5
                    while self._remaining and pos < size:
                        pos = self._continue(data, pos, size)
                    return None
            elif end > size:
                self._remaining = end - size
                return None
            pos = end
        if pos < size:
            self._header += data[pos:]
        return None

    def _continue(self, data: bytes, pos: int, size: int) -> int:
        """Go on with the message (or header) under way; return the new position."""
        if self._header:
            step = min(5 - len(self._header), size - pos)
            self._header += data[pos : pos + step]
            pos += step
            if len(self._header) == 5:
                tag, length = _HEADER.unpack_from(self._header)
                self._header.clear()
                self._begin(tag, length - 4)
            return pos
        step = min(self._remaining, size - pos)
        if self._body is not None:
            self._body += data[pos : pos + step]
        self._remaining -= step
        pos += step
        if not self._remaining:
            self._finish()
        return pos

    def _whole(self, tag: int, data: bytes, start: int, end: int) -> None:
        """A tracked message wholly inside ``data``."""
        if tag == _Z:
            self.ready += 1
            self.status = data[start : start + 1]
            self.copy = self.error = False
        elif tag == _S:
            if end - start > MAX_TRACKED_PARAMETER:
                self.overflow = True
            else:
                self._parameter(data[start:end])
        elif tag == _E:
            self.error = True
            self.errors += 1
        else:
            self.copy = True

    def _parameter(self, body: bytes) -> None:
        try:
            name, value = wire.decode_parameter_status(body)
        except WireError:
            self.overflow = True
            return
        self.parameters[name] = value

    def _begin(self, tag: int, length: int) -> None:
        self._tag = tag
        self._remaining = max(length, 0)
        if length < 0:
            self.overflow = True  # a length word under 4: not PostgreSQL, never reuse
        if tag in (_Z, _S):
            if length > MAX_TRACKED_PARAMETER:
                self.overflow = True
            else:
                self._body = bytearray()
        elif tag == _E:
            self.error = True
            self.errors += 1
        elif tag in _COPY_STARTS:
            self.copy = True
        if not self._remaining:
            self._finish()

    def _finish(self) -> None:
        body, self._body = self._body, None
        if body is None:
            return
        if self._tag == _Z:
            self.ready += 1
            self.status = bytes(body[:1])
            self.copy = self.error = False
        else:
            self._parameter(bytes(body))


class FrontendTracker:
    """Follows the client's messages by their tags: sync points sent, an extended-query
    sequence waiting for its Sync, and where a Terminate begins."""

    __slots__ = ("_header", "_remaining", "syncs", "terminated", "unsynced")

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0
        #: Messages that each get one ReadyForQuery; the startup packet counts as the first.
        self.syncs = 1
        self.unsynced = False
        self.terminated = False

    def advance(self, data: bytes) -> int | None:
        """Consume ``data``; return the offset of a Terminate message's tag (after which
        this tracker consumes nothing more), or None."""
        if self.terminated:
            return None
        pos, size = 0, len(data)
        while pos < size and (self._remaining or self._header):  # split across reads
            if self._remaining:
                step = min(self._remaining, size - pos)
                self._remaining -= step
                pos += step
                continue
            step = min(5 - len(self._header), size - pos)  # its tag is counted already
            self._header += data[pos : pos + step]
            pos += step
            if len(self._header) == 5:
                self._remaining = max(_HEADER.unpack_from(self._header)[1] - 4, 0)
                self._header.clear()
        unpack, kinds = _HEADER.unpack_from, _FRONTEND_KINDS
        while pos < size:
            tag = data[pos]
            kind = kinds[tag]
            if kind:
                if kind == _KIND_TERMINATE:
                    self.terminated = True
                    return pos
                if kind == _KIND_NEEDS_SYNC:
                    self.unsynced = True
                else:
                    self.syncs += 1
                    if kind == _KIND_SYNC:
                        self.unsynced = False
            if size - pos < 5:
                self._header += data[pos:]
                return None
            end = pos + 1 + max(unpack(data, pos)[1], 4)
            if end > size:
                self._remaining = end - size
                return None
            pos = end
        return None


class SessionTracking:
    """Both directions' trackers of one pooled session, and what to do on a clean end."""

    __slots__ = ("backend", "frontend", "on_clean_end")

    def __init__(
        self,
        parameters: Mapping[str, str],
        on_clean_end: Callable[[asyncio.Transport, dict[str, str]], None],
    ) -> None:
        self.frontend = FrontendTracker()
        self.backend = BackendTracker(parameters)
        #: Set to None when the session ends (no reference from the halves back to it).
        self.on_clean_end: Callable[[asyncio.Transport, dict[str, str]], None] | None = on_clean_end

    def clean(self) -> bool:
        """Whether upstream is idle with nothing of this client's left in it (see the
        module docstring)."""
        backend, frontend = self.backend, self.frontend
        return (
            backend.at_boundary
            and backend.ready == frontend.syncs
            and backend.status == b"I"
            and not backend.copy
            and not backend.error
            and not backend.overflow
            and not frontend.unsynced
        )

    def halves(
        self, splice: Splice, client: asyncio.Transport, upstream: asyncio.Transport
    ) -> tuple[Half, Half]:
        """The splice halves of a pooled session (see :class:`Splice`'s ``halves``)."""
        client_type = BufferedTrackingClientHalf if is_tls(client) else TrackingClientHalf
        upstream_type = BufferedTrackingUpstreamHalf if is_tls(upstream) else TrackingUpstreamHalf
        client_half = client_type(splice, client, upstream)
        upstream_half = upstream_type(splice, upstream, client)
        client_half.tracking = self
        client_half.released = False
        upstream_half.boundaries = self.backend  # type: ignore[assignment]
        return client_half, upstream_half


class TrackingClientHalf(Half):
    """Client -> upstream, tracking the client's messages. On a clean Terminate the
    Terminate is not forwarded: upstream's connection leaves the splice for the pool."""

    __slots__ = ("released", "tracking")

    tracking: SessionTracking
    released: bool

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.released:
            return  # nothing may follow a Terminate; nowhere to send it
        # Whatever precedes the Terminate in the same read was not answered yet (cut > 0).
        tracking = self.tracking
        if tracking.frontend.advance(data) == 0 and tracking.clean() and self._release():
            return
        self._write(data)

    def _release(self) -> bool:
        splice, on_clean_end = self._splice(), self.tracking.on_clean_end
        if splice is None or on_clean_end is None:
            return False
        upstream = splice.release_upstream()
        if upstream is None:  # the proxy is ending this session (expiry, revocation)
            return False
        self.released = True
        on_clean_end(upstream, self.tracking.backend.parameters)
        self.own.close()  # the client's Terminate is answered by closing, as PostgreSQL does
        return True


class TrackingUpstreamHalf(EndableHalf):
    """Upstream -> client; its message boundaries are the session's BackendTracker."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self._final is not None or self._ended:
            EndableHalf.data_received(self, data)
            return
        # EndableHalf's common case in one frame: the hot path of a pooled session.
        self.boundaries.advance(data)
        self.bytes += len(data)
        self._write(data)


class BufferedTrackingClientHalf(_BufferedReads, TrackingClientHalf, asyncio.BufferedProtocol):
    __slots__ = ()

    def buffer_updated(self, nbytes: int) -> None:
        # TrackingClientHalf.data_received in this frame: the hot path from a TLS client.
        data = read_buffer[:nbytes].tobytes()
        self.bytes += nbytes
        if self.released:
            return
        tracking = self.tracking
        if tracking.frontend.advance(data) == 0 and tracking.clean() and self._release():
            return
        self._write(data)


class BufferedTrackingUpstreamHalf(_BufferedReads, TrackingUpstreamHalf, asyncio.BufferedProtocol):
    __slots__ = ()


# --- The pool ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolKey:
    role: str
    database: str
    read_only: bool
    protocol_minor: int
    #: Every startup parameter sent upstream, except those in APPLIED_AFTER_RESET, sorted.
    parameters: tuple[tuple[str, str], ...]


def pool_key(
    parameters: Mapping[str, str], *, read_only: bool, protocol_minor: int
) -> PoolKey | None:
    """The key for a login with these upstream startup parameters; None for a connection
    that is never pooled (replication)."""
    if "replication" in parameters:
        return None
    kept = tuple(sorted((k, v) for k, v in parameters.items() if k not in APPLIED_AFTER_RESET))
    return PoolKey(
        role=parameters["user"],
        database=parameters.get("database", parameters["user"]),
        read_only=read_only,
        protocol_minor=protocol_minor,
        parameters=kept,
    )


class _UpstreamProtocol(HandshakeProtocol):
    """The protocol of an upstream connection outside a splice (reset, parked, handed out).
    While parked, anything from upstream -- bytes (a FATAL from pg_terminate_backend),
    end of stream, loss -- means it is no longer usable: the pool is told at once."""

    def __init__(self, keepalive: Keepalive) -> None:
        super().__init__(keepalive, peer_closed=lambda reason: UpstreamError(reason))
        self.on_activity: Callable[[str], None] | None = None

    def attach(self, transport: asyncio.Transport) -> None:
        """Take over ``transport`` from a splice half (no connection_made for that)."""
        self.transport = transport
        self.connected = True
        transport.set_protocol(self)
        transport.resume_reading()  # a paused splice may have left it paused

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        if self.on_activity is not None:
            self.on_activity("closed_by_upstream")

    def eof_received(self) -> bool | None:
        result = super().eof_received()
        if self.on_activity is not None:
            self.on_activity("closed_by_upstream")
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_activity is not None:
            self.on_activity("closed_by_upstream")


@dataclass(slots=True, eq=False)
class Lease:
    """An upstream connection of the pool's, in use by one session."""

    key: PoolKey
    backend_key: tuple[int, bytes] | None
    tls: bool
    created: float  # loop time of the upstream login
    generation: int
    reused: bool
    #: The server's application_name for this connection when none is SET (what the
    #: reset brings it back to): given to clients that send no application_name.
    default_application_name: str | None = None


@dataclass(slots=True, eq=False)
class _Parked:
    lease: Lease
    protocol: _UpstreamProtocol = field(repr=False)
    parameters: dict[str, str]
    timer: asyncio.TimerHandle | None = None


class Pool:
    """Parked upstream connections by :class:`PoolKey`, most recently parked first."""

    def __init__(self, settings: PoolSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._idle: dict[PoolKey, deque[_Parked]] = {}
        self._count = 0
        self._generation = 0
        self._shutting_down = False
        self._resets: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def __len__(self) -> int:
        return self._count

    def parked_pids(self) -> list[int]:
        return [
            p.lease.backend_key[0]
            for queue in self._idle.values()
            for p in queue
            if p.lease.backend_key is not None
        ]

    # -- handing out --

    async def connect(
        self,
        target: UpstreamTarget,
        parameters: Mapping[str, str],
        *,
        read_only: bool,
        protocol_minor: int,
        key: PoolKey,
        on_login: Callable[[float], None] | None = None,
        spares: UpstreamSpares | None = None,
    ) -> tuple[UpstreamConnection, Lease]:
        """A logged-in upstream connection for ``parameters`` (the full upstream startup
        parameters): a parked one if there is one, else a new login. Either way the
        returned connection's ``result.relay`` is the greeting to give the client, and
        application_name is the client's."""
        application_name = parameters.get("application_name")
        while not self._shutting_down and (parked := self._take(key)) is not None:
            try:
                connection = await self._hand_out(parked, application_name)
            except (ProxyError, TimeoutError, OSError) as exc:
                self._discard(parked.protocol, "reset_failed", error=exc)
                continue
            self._metrics.pool_hits.inc()
            return connection, parked.lease
        self._metrics.pool_misses.inc()
        started = time.monotonic()
        startup = {k: v for k, v in parameters.items() if k not in APPLIED_AFTER_RESET}
        fresh = await open_upstream(target, startup, protocol_minor, spares=spares)
        if on_login is not None:
            on_login(time.monotonic() - started)
        loop = asyncio.get_running_loop()
        lease = Lease(
            key=key,
            backend_key=fresh.result.backend_key,
            tls=fresh.tls,
            created=loop.time(),
            generation=self._generation,
            reused=False,
        )
        tracker = BackendTracker()
        tracker.advance(b"".join(m.encode() for m in fresh.result.relay))
        lease.default_application_name = tracker.parameters.get("application_name")
        notices = tuple(m for m in fresh.result.relay if m.tag == b"N")
        leftover = fresh.leftover
        if application_name is not None and application_name != tracker.parameters.get(
            "application_name"
        ):
            # Asynchronous messages after the login's ReadyForQuery come before the SET's
            # answer: follow them (so the stream stays aligned), but do not relay them.
            tracker.advance(leftover)
            leftover = b""
            try:
                async with asyncio.timeout(RESET_TIMEOUT):
                    await _apply_settings(fresh.protocol, tracker, application_name, None)
            except BaseException:
                fresh.protocol.abort()
                raise
        greeting = _greeting(tracker.parameters, fresh.result, notices)
        return UpstreamConnection(fresh.protocol, greeting, fresh.tls, leftover), lease

    def _take(self, key: PoolKey) -> _Parked | None:
        queue = self._idle.get(key)
        now = asyncio.get_running_loop().time()
        while queue:
            parked = queue.pop()
            self._forget(parked, queue, key)
            if parked.protocol.closed:
                self._discard(parked.protocol, "closed_by_upstream")
            elif now - parked.lease.created >= self.settings.max_lifetime:
                self._discard(parked.protocol, "max_lifetime")
            else:
                return parked
        return None

    async def _hand_out(self, parked: _Parked, application_name: str | None) -> UpstreamConnection:
        protocol = parked.protocol
        protocol.on_activity = None
        tracker = BackendTracker(parked.parameters)
        lease = parked.lease
        async with asyncio.timeout(RESET_TIMEOUT):
            await _apply_settings(
                protocol, tracker, application_name, lease.default_application_name
            )
        lease.reused = True
        result = login_sm.LoginComplete(
            relay=(), backend_key=lease.backend_key, auth_method="pooled"
        )
        return UpstreamConnection(
            protocol, _greeting(tracker.parameters, result, ()), lease.tls, b""
        )

    # -- giving back --

    def release(
        self,
        lease: Lease,
        transport: asyncio.Transport,
        parameters: dict[str, str],
        keepalive: Keepalive,
    ) -> None:
        """A session ended cleanly on ``transport`` (just taken out of its splice): reset
        the connection in the background and park it, or close it."""
        protocol = _UpstreamProtocol(keepalive)
        protocol.attach(transport)
        task = asyncio.get_running_loop().create_task(
            self._reset_and_park(lease, protocol, dict(parameters)), name="pool reset"
        )
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _reset_and_park(
        self, lease: Lease, protocol: _UpstreamProtocol, parameters: dict[str, str]
    ) -> None:
        loop = asyncio.get_running_loop()
        if self._shutting_down or lease.generation != self._generation:
            self._discard(protocol, "shutdown" if self._shutting_down else "reload")
            return
        if loop.time() - lease.created >= self.settings.max_lifetime:
            self._discard(protocol, "max_lifetime")
            return
        tracker = BackendTracker(parameters)
        previous = parameters.get("application_name")
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                await _simple_query(protocol, tracker, RESET_QUERY)
                lease.default_application_name = tracker.parameters.get("application_name")
                if previous is not None and previous != lease.default_application_name:
                    # Off the next client's path: most clients reconnect with the same
                    # application_name, and then need no SET when handed this connection.
                    await _apply_settings(protocol, tracker, previous, None)
        except asyncio.CancelledError:
            protocol.abort()
            raise
        except (ProxyError, TimeoutError, OSError) as exc:
            self._metrics.pool_resets.labels("failed").inc()
            self._discard(protocol, "reset_failed", error=exc)
            return
        self._metrics.pool_resets.labels("ok").inc()
        if self._shutting_down or lease.generation != self._generation:
            self._discard(protocol, "shutdown" if self._shutting_down else "reload")
            return
        queue = self._idle.setdefault(lease.key, deque())
        if len(queue) >= self.settings.max_idle_per_key or self._count >= self.settings.max_idle:
            if not queue:
                del self._idle[lease.key]
            self._discard(protocol, "full")
            return
        parked = _Parked(lease, protocol, tracker.parameters)
        protocol.on_activity = lambda reason: self._on_parked_activity(parked, reason)
        queue.append(parked)
        self._count += 1
        self._metrics.pool_parked.set(self._count)
        remaining_life = self.settings.max_lifetime - (loop.time() - lease.created)
        if self.settings.idle_timeout <= remaining_life:
            parked.timer = loop.call_later(
                self.settings.idle_timeout, self._expire, parked, "idle_timeout"
            )
        else:
            parked.timer = loop.call_later(remaining_life, self._expire, parked, "max_lifetime")
        event(
            log,
            DEBUG,
            "upstream connection parked",
            pid=lease.backend_key[0] if lease.backend_key else None,
            parked=self._count,
        )

    def _on_parked_activity(self, parked: _Parked, reason: str) -> None:
        if self._remove(parked):
            self._discard(parked.protocol, reason)

    def _expire(self, parked: _Parked, reason: str) -> None:
        parked.timer = None
        if self._remove(parked):
            self._discard(parked.protocol, reason)

    def _remove(self, parked: _Parked) -> bool:
        queue = self._idle.get(parked.lease.key)
        if queue is None or parked not in queue:
            return False
        queue.remove(parked)
        self._forget(parked, queue, parked.lease.key)
        return True

    def _forget(self, parked: _Parked, queue: deque[_Parked], key: PoolKey) -> None:
        """Bookkeeping once ``parked`` left ``queue``."""
        parked.protocol.on_activity = None
        if parked.timer is not None:
            parked.timer.cancel()
            parked.timer = None
        if not queue:
            self._idle.pop(key, None)
        self._count -= 1
        self._metrics.pool_parked.set(self._count)

    def discard(self, reason: str) -> None:
        """A pooled session ended without a clean end: count why (its connection is
        closed by the session, as without pooling)."""
        self._metrics.pool_discards.labels(reason).inc()

    def _discard(self, protocol: HandshakeProtocol, reason: str, **fields: object) -> None:
        self._metrics.pool_discards.labels(reason).inc()
        event(log, DEBUG, "upstream connection discarded", reason=reason, **fields)
        if protocol.transport is not None and not protocol.closed:
            with contextlib.suppress(ProxyError, OSError):
                protocol.write(wire.terminate())  # a polite goodbye: no "unexpected EOF"
        protocol.close()

    def close_all(self, reason: str) -> None:
        """Close every parked connection (reload: new password or keys; shutdown); those in
        use are not parked again when their session ends."""
        self._generation += 1
        if reason == "shutdown":
            self._shutting_down = True
        parked = [p for queue in self._idle.values() for p in queue]
        for item in parked:
            self._remove(item)
            self._discard(item.protocol, reason)
        if parked:
            event(log, INFO, "parked upstream connections closed", reason=reason, count=len(parked))

    async def close(self) -> None:
        """Shutdown: close everything, including resets under way."""
        self.close_all("shutdown")
        for task in list(self._resets):
            task.cancel()
        if self._resets:
            await asyncio.wait(list(self._resets), timeout=1)


def _greeting(
    parameters: Mapping[str, str],
    result: login_sm.LoginComplete,
    notices: tuple[wire.BackendMessage, ...],
) -> login_sm.LoginComplete:
    """What a client sees after its password, as from a fresh login: AuthenticationOk, the
    current ParameterStatus values, any notices of the login, then ReadyForQuery 'I'
    (BackendKeyData is added by the session, before ReadyForQuery)."""
    relay = [wire.BackendMessage(b"R", wire.AUTH_OK.to_bytes(4, "big"))]
    relay += [
        wire.BackendMessage(b"S", name.encode() + b"\0" + value.encode() + b"\0")
        for name, value in parameters.items()
    ]
    relay += notices
    relay.append(wire.BackendMessage(b"Z", b"I"))
    return login_sm.LoginComplete(
        relay=tuple(relay), backend_key=result.backend_key, auth_method=result.auth_method
    )


async def _apply_settings(
    protocol: HandshakeProtocol,
    tracker: BackendTracker,
    application_name: str | None,
    default: str | None,
) -> None:
    """Give the connection the client's application_name (APPLIED_AFTER_RESET) -- or, for a
    client that sent none, the server's ``default`` -- unless upstream already reports it.
    (``default`` None: the connection has no other value than the default yet.)"""
    current = tracker.parameters.get("application_name")
    if application_name is None:
        if default is None or current == default:
            return
        await _simple_query(protocol, tracker, "RESET application_name")
    elif application_name != current:
        literal = _dollar_quote(application_name)
        await _simple_query(protocol, tracker, f"SET application_name = {literal}")


def _dollar_quote(value: str) -> str:
    """A dollar-quoted literal (4.1.2.4): independent of standard_conforming_strings, which
    a client may have turned off in its startup packet."""
    for n in itertools.count():
        tag = f"$q{n}$"
        if tag not in value:
            return f"{tag}{value}{tag}"
    raise AssertionError("unreachable")


async def _simple_query(protocol: HandshakeProtocol, tracker: BackendTracker, sql: str) -> None:
    """Run ``sql`` as a simple Query; track upstream's ParameterStatus; raise unless it ends
    with ReadyForQuery 'I' and no error."""
    if "\0" in sql:
        raise UpstreamError("query with a NUL byte")
    protocol.write(wire.typed_message(b"Q", sql.encode("utf-8") + b"\0"))
    ready, errors = tracker.ready + 1, tracker.errors
    while tracker.ready < ready:
        tracker.advance(await protocol.read())
    failed = tracker.errors != errors or tracker.overflow
    if failed or not tracker.at_boundary or tracker.status != b"I":
        raise UpstreamError(f"{sql.split(' ')[0]} did not leave upstream idle")
