"""One client's life: handshake, token verification, upstream login, splice.

The session moves through explicit phases (:class:`Phase`, allowed moves in
:data:`_TRANSITIONS`)::

    ACCEPTED ──▶ TLS_HANDSHAKE ──▶ HANDSHAKE ──▶ VERIFYING ──▶ LOGGING_IN ──▶ SPLICED
       │  direct TLS ▲    │ SSLRequest ▲  │ CancelRequest
       └─────────────┼────┴────────────┘  └──▶ CANCEL
                     └── any phase ──▶ CLOSED

This is the one place where errors become bytes: any :class:`ProxyError` raised before the
splice is sent to the client as an ErrorResponse built from the error's client-facing fields,
and logged with its reason (DESIGN.md principle 3). Nothing reaches upstream before the token
is verified: the upstream connection is opened only after ``verify()`` returned an Identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

from ..auth.tokens import Identity
from ..errors import (
    AuthenticationFailed,
    ClientDisconnected,
    DirectTlsNotAccepted,
    HandshakeTimeout,
    ProtocolViolation,
    ProxyError,
    ServerShuttingDown,
    SessionEnded,
    TlsHandshakeFailed,
    TokenExpired,
    TooManyConnections,
    UpstreamAuthenticationFailed,
)
from ..logs import event
from ..protocol import frontend, wire
from .cancel import CancelEntry, CancelRegistry
from .connection import HandshakeProtocol, format_peer
from .metrics import Metrics
from .pool import Lease, Pool, SessionTracking, pool_key
from .runtime import Runtime
from .spare import UpstreamSpares
from .splice import Splice
from .upstream import UpstreamConnection, describe, open_upstream

log = logging.getLogger("jwtpgproxy")

#: First byte of a TLS record carrying a handshake message (RFC 8446 5.1, ContentType 22).
TLS_HANDSHAKE_RECORD = 0x16


class Phase(enum.Enum):
    ACCEPTED = enum.auto()  # socket accepted, nothing read yet
    TLS_HANDSHAKE = enum.auto()  # a TLS handshake with the client is under way
    HANDSHAKE = enum.auto()  # startup negotiation: SSLRequest, startup packet, password
    CANCEL = enum.auto()  # the connection carried a CancelRequest (no reply, ever)
    VERIFYING = enum.auto()  # checking the token
    LOGGING_IN = enum.auto()  # connecting and logging in to upstream
    SPLICED = enum.auto()  # copying bytes both ways
    CLOSED = enum.auto()  # final


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.ACCEPTED: frozenset({Phase.TLS_HANDSHAKE, Phase.HANDSHAKE}),
    Phase.TLS_HANDSHAKE: frozenset({Phase.HANDSHAKE}),
    Phase.HANDSHAKE: frozenset({Phase.TLS_HANDSHAKE, Phase.CANCEL, Phase.VERIFYING}),
    Phase.CANCEL: frozenset(),
    Phase.VERIFYING: frozenset({Phase.LOGGING_IN}),
    Phase.LOGGING_IN: frozenset({Phase.SPLICED}),
    Phase.SPLICED: frozenset(),
    Phase.CLOSED: frozenset(),
}


async def _peek_first_byte(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Wait until the client sends something; return its first byte without consuming it
    (b"" if the client closed first)."""
    while True:
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return b""
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(slots=True)
class ServerContext:
    """What every session shares. ``runtime`` is replaced on reload (SIGHUP); a session
    keeps the runtime it started with."""

    runtime: Runtime
    cancels: CancelRegistry
    metrics: Metrics
    #: Parked upstream connections (POOL__MODE=session); None when pooling is off.
    pool: Pool | None = None
    #: Connected upstream connections waiting for a login (UPSTREAM__SPARE_CONNECTIONS).
    spares: UpstreamSpares | None = None


@dataclass(slots=True)
class _Startup:
    startup: wire.StartupMessage
    token: str = field(repr=False)
    leftover: bytes


class Session:
    def __init__(
        self,
        context: ServerContext,
        sock: socket.socket,
        *,
        source: str,
        over_limit: bool = False,
        on_spliced: Callable[[Session], None] | None = None,
    ) -> None:
        """``sock``: a just-accepted, non-blocking client socket, owned from now on.
        ``source``: what the client's address counts against in per-source limits
        (jwtpgproxy.proxy.throttle.source_key).

        ``over_limit``: the server is at its client limit; once the startup packet is read
        the client gets FATAL 53300, before any password is asked (as PostgreSQL does).
        """
        self._context = context
        self.runtime = context.runtime
        self._over_limit = over_limit
        self._on_spliced = on_spliced
        self._sock = sock
        self.client = HandshakeProtocol(self.runtime.keepalive)  # connected by _accept()
        self.peer = format_peer(sock)
        self.source = source
        self.phase = Phase.ACCEPTED
        #: The client's startup packet, once read.
        self.startup: wire.StartupMessage | None = None
        #: The verified token (its claims decide revocation of a live session).
        self.identity: Identity | None = None
        self.upstream: UpstreamConnection | None = None
        self._splice: Splice | None = None
        self._cancel_entry: CancelEntry | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self.protocol_minor = 0
        #: The class of the error that ended the session before the splice (a class, not
        #: the exception: its traceback would tie the session into a reference cycle).
        self.failure: type[ProxyError] | None = None
        #: The startup-packet deadline while it runs, lifted once the startup packet is in
        #: (held only meanwhile: the Timeout refers to this session's task).
        self._startup_deadline: asyncio.Timeout | None = None
        #: The pooled upstream connection this session uses (session pooling only).
        self._lease: Lease | None = None
        self._tracking: SessionTracking | None = None
        self._released = False

    def _move(self, new: Phase) -> None:
        if new not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"illegal session transition {self.phase} -> {new}")
        self.phase = new

    @property
    def user(self) -> str | None:
        return self.startup.user if self.startup is not None else None

    @property
    def database(self) -> str | None:
        return self.startup.database if self.startup is not None else None

    @property
    def splice(self) -> Splice | None:
        return self._splice

    @property
    def spliced(self) -> bool:
        return self._splice is not None

    @property
    def upstream_pid(self) -> int | None:
        """Upstream's backend process id, once logged in."""
        if self.upstream is None or self.upstream.result.backend_key is None:
            return None
        return self.upstream.result.backend_key[0]

    @property
    def bytes_from_client(self) -> int:
        spliced = self._splice.bytes_from_client if self._splice else 0
        return self.client.bytes_received + spliced

    @property
    def bytes_to_client(self) -> int:
        spliced = self._splice.bytes_to_client if self._splice else 0
        return self.client.bytes_sent + spliced

    async def run(self) -> None:
        started = time.monotonic()
        event(log, INFO, "connection received", client=self.peer)
        try:
            await self._run()
        except ProxyError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ServerShuttingDown("session cancelled at shutdown"))
            raise
        except Exception as exc:
            # A bug of ours: log it (tracebacks hold no token: we never format locals) and
            # give the client a generic error, never the details.
            event(log, ERROR, "internal error", client=self.peer, user=self.user, exc_info=exc)
            self._fail(ProxyError("internal error"))
        finally:
            self._cleanup()
            self._context.metrics.session_closed(self)
            event(
                log,
                INFO,
                "connection closed",
                user=self.user,
                database=self.database,
                client=self.peer,
                duration=f"{time.monotonic() - started:.3f}s",
                bytes_from_client=self.bytes_from_client,
                bytes_to_client=self.bytes_to_client,
            )

    async def _run(self) -> None:
        limits = self.runtime.limits
        timeout = limits.authentication_timeout
        startup_expired = False
        try:
            async with asyncio.timeout(timeout):
                # A shorter deadline until the startup packet is in: a silent socket holds
                # a pending-login slot for seconds, not for the whole login deadline.
                try:
                    async with asyncio.timeout(min(limits.startup_timeout, timeout)) as startup:
                        self._startup_deadline = startup
                        direct_tls = await self._accept()
                        received = await self._client_handshake(direct_tls)
                finally:
                    startup_expired = startup.expired()
                    self._startup_deadline = startup = None  # type: ignore[assignment]
                if received is None:
                    return  # a CancelRequest: handled, no reply
                self._move(Phase.VERIFYING)
                identity = self.identity = await self._verify(received)
                self._move(Phase.LOGGING_IN)
                upstream = await self._login_upstream(received.startup, identity)
        except TimeoutError:
            if startup_expired:
                raise HandshakeTimeout(
                    f"no startup packet within {limits.startup_timeout:g}s"
                ) from None
            raise HandshakeTimeout(f"authentication not completed within {timeout:g}s") from None
        await self._splice_with(upstream, received.leftover)

    async def _accept(self) -> bool:
        """Create the client transport; returns whether the client began with TLS directly.

        PostgreSQL 17 clients with ``sslnegotiation=direct`` send a TLS ClientHello as their
        first bytes instead of an SSLRequest (55.2.10). The first byte is peeked, not read,
        so the TLS layer then reads the whole ClientHello itself.
        """
        loop = asyncio.get_running_loop()
        first = await _peek_first_byte(loop, self._sock)
        if not first:
            raise ClientDisconnected("closed before sending anything")
        context = None
        if first[0] == TLS_HANDSHAKE_RECORD:
            context = self.runtime.downstream.ssl_context
            if context is None:
                raise DirectTlsNotAccepted("direct TLS attempted, but TLS is disabled")
            self._move(Phase.TLS_HANDSHAKE)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: self.client,
                self._sock,
                ssl=context,
                ssl_handshake_timeout=(
                    self.runtime.limits.authentication_timeout if context else None
                ),
            )
        except (OSError, ssl.SSLError) as exc:
            raise TlsHandshakeFailed(f"direct TLS handshake with client failed: {exc}") from None
        self._move(Phase.HANDSHAKE)
        if context is None:
            return False
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "postgresql":
            # Without ALPN a direct TLS connection could be a cross-protocol attack, so
            # PostgreSQL refuses it; so do we (over TLS, which is up by now).
            raise ProtocolViolation(
                "direct TLS connection without ALPN postgresql",
                client_message="received direct SSL connection request without ALPN "
                "protocol negotiation extension",
            )
        return True

    async def _client_handshake(self, direct_tls: bool) -> _Startup | None:
        downstream = self.runtime.downstream
        machine = frontend.FrontendHandshake(
            downstream.ssl_mode,
            max_password_length=downstream.max_password_length,
            allow_replication=downstream.allow_replication,
            direct_tls=direct_tls,
        )
        while True:
            step = machine.next_event()
            if isinstance(step, frontend.NeedData):
                machine.receive_data(await self.client.read())
            elif isinstance(step, frontend.Reply):
                self.client.write(step.data)
            elif isinstance(step, frontend.StartTLS):
                await self._start_client_tls(step)
                machine.tls_established()
            elif isinstance(step, frontend.PasswordRequested):
                if self._startup_deadline is not None:
                    self._startup_deadline.reschedule(None)  # authentication_timeout rules
                self.startup = step.startup
                if self._over_limit:
                    raise TooManyConnections("max_client_connections reached")
                self.client.write(step.data)
            elif isinstance(step, frontend.PasswordReceived):
                self.protocol_minor = machine.protocol_minor
                return _Startup(step.startup, step.password, machine.leftover())
            else:  # CancelReceived
                if self._startup_deadline is not None:
                    self._startup_deadline.reschedule(None)  # forwarding has its own
                self._move(Phase.CANCEL)
                await self._handle_cancel(step.request, tls=machine.tls)
                return None

    async def _start_client_tls(self, step: frontend.StartTLS) -> None:
        context = self.runtime.downstream.ssl_context
        assert context is not None  # the machine only asks for TLS when it is configured
        self.client.write(step.data)
        self._move(Phase.TLS_HANDSHAKE)
        try:
            await self.client.start_tls(
                context, server_side=True, timeout=self.runtime.limits.authentication_timeout
            )
        except (OSError, ssl.SSLError, ClientDisconnected) as exc:
            raise TlsHandshakeFailed(f"TLS handshake with client failed: {exc}") from None
        self._move(Phase.HANDSHAKE)

    async def _verify(self, received: _Startup) -> Identity:
        startup = received.startup
        # Async only for the rare unknown-kid case: one JWKS refetch, then one retry.
        identity = await self.runtime.verifier.verify_async(
            received.token, startup.user, database=startup.database
        )
        event(
            log,
            INFO,
            "token accepted",
            user=startup.user,
            database=startup.database,
            client=self.peer,
            alg=identity.algorithm,
            key=identity.key_name,
            kid=identity.kid,
            jti=identity.jti,
            read_only=identity.read_only,
            expires_in=f"{identity.expires_at - time.time():.0f}s",
        )
        return identity

    async def _login_upstream(
        self, startup: wire.StartupMessage, identity: Identity
    ) -> UpstreamConnection:
        # Every startup parameter the client sent is forwarded; the role is the verified
        # one (equal to the startup user, checked in verify()).
        parameters = dict(startup.parameters)
        parameters["user"] = identity.role
        if identity.read_only:
            # The token's read-only scope: set after the client's own parameters, so no
            # startup parameter of the client's can undo it.
            parameters["default_transaction_read_only"] = "on"
        idle = self.runtime.limits.idle_session_timeout
        if idle:
            # PostgreSQL ends a session idle outside a transaction with FATAL 57P05 at a
            # message boundary -- which the proxy cannot find without parsing the stream.
            # Sent after the client's own parameters, so it overrides theirs.
            parameters["idle_session_timeout"] = f"{round(idle * 1000)}ms"
        started = time.monotonic()
        target = self.runtime.upstream
        pool = self._context.pool
        key = (
            pool_key(parameters, read_only=identity.read_only, protocol_minor=self.protocol_minor)
            if pool is not None and pool.enabled and self.runtime.pool.enabled
            else None
        )
        if pool is not None and key is not None:
            upstream, self._lease = await pool.connect(
                target,
                parameters,
                read_only=identity.read_only,
                protocol_minor=self.protocol_minor,
                key=key,
                on_login=self._context.metrics.upstream_login_seconds.observe,
                spares=self._context.spares,
            )
            self.upstream = upstream
            if self._lease.reused:
                event(
                    log,
                    INFO,
                    "upstream connection reused",
                    user=self.user,
                    database=self.database,
                    client=self.peer,
                    pid=self.upstream_pid,
                    seconds=f"{time.monotonic() - started:.4f}",
                )
                return upstream
        else:
            upstream = self.upstream = await open_upstream(
                target, parameters, self.protocol_minor, spares=self._context.spares
            )
            self._context.metrics.upstream_login_seconds.observe(time.monotonic() - started)
        event(
            log,
            INFO,
            "upstream login",
            user=self.user,
            database=self.database,
            client=self.peer,
            upstream=describe(target),
            method=upstream.result.auth_method,
            tls=upstream.tls,
            seconds=f"{time.monotonic() - started:.4f}",
        )
        return upstream

    async def _splice_with(self, upstream: UpstreamConnection, client_leftover: bytes) -> None:
        to_client = bytearray()
        for message in upstream.result.relay:
            if message.tag == b"Z" and upstream.result.backend_key is not None:
                to_client += self._backend_key_data(upstream)
            to_client += message.encode()
        to_client += upstream.leftover

        if self.client.closed or upstream.protocol.closed:
            raise ClientDisconnected("a side closed while login completed")
        halves = None
        if self._lease is not None:
            parameters = {}
            for message in upstream.result.relay:
                if message.tag == b"S":
                    name, value = wire.decode_parameter_status(message.body)
                    parameters[name] = value
            self._tracking = SessionTracking(parameters, self._on_clean_end)
            halves = self._tracking.halves
        client_transport, client_rest = self.client.detach()
        upstream_transport, upstream_rest = upstream.protocol.detach()
        self._splice = Splice(
            client_transport,
            upstream_transport,
            endable=self.runtime.endable_sessions,
            halves=halves,
        )
        self._splice.start(bytes(to_client) + upstream_rest, client_leftover + client_rest)
        self._move(Phase.SPLICED)
        self._context.metrics.login_succeeded()
        if self.runtime.end_sessions_on_expiry and self.identity is not None:
            loop = asyncio.get_running_loop()
            delay = max(self.identity.expires_at - time.time(), 0.0)
            self._expiry_timer = loop.call_later(
                delay, self.end, TokenExpired("token expired during the session")
            )
        if self._on_spliced is not None:
            self._on_spliced(self)
        await self._splice.wait_closed()

    def _on_clean_end(self, transport: asyncio.Transport, parameters: dict[str, str]) -> None:
        """The client ended cleanly: upstream's connection goes back to the pool."""
        pool, lease = self._context.pool, self._lease
        assert pool is not None and lease is not None
        self._released = True
        pool.release(lease, transport, parameters, self.runtime.keepalive)

    def _pool_outcome(self) -> None:
        """A pooled session that did not give its connection back: count why."""
        pool, splice, tracking = self._context.pool, self._splice, self._tracking
        if pool is None or self._lease is None or self._released:
            return
        if splice is None or tracking is None:
            reason = "login_failed"
        elif splice.ending:
            reason = "ended_by_proxy"
        elif tracking.frontend.terminated:
            reason = "not_idle"
        else:
            reason = "no_terminate"
        pool.discard(reason)

    def _backend_key_data(self, upstream: UpstreamConnection) -> bytes:
        assert upstream.result.backend_key is not None
        pid, upstream_secret = upstream.result.backend_key
        # A pooled backend serves one client after another: its clients get keys of their
        # own, not ones derived from the backend's (see jwtpgproxy.proxy.cancel).
        self._cancel_entry = self._context.cancels.register(
            pid, upstream_secret, upstream.tls, self.protocol_minor, routable=self._lease is None
        )
        return wire.backend_key_data(pid, self._cancel_entry.client_key)

    async def _handle_cancel(self, request: wire.CancelRequest, *, tls: bool) -> None:
        await self._context.cancels.handle(
            request, self.runtime.upstream, source=self.source, client=self.peer, tls=tls
        )

    def _fail(self, exc: ProxyError) -> None:
        """Log ``exc`` and, where the protocol allows, send it to the client."""
        if self.phase is not Phase.SPLICED:
            self.failure = type(exc)
        fields = {"user": self.user, "database": self.database, "client": self.peer}
        if isinstance(exc, AuthenticationFailed | UpstreamAuthenticationFailed):
            event(log, WARNING, "authentication failed", **fields, reason=exc.reason)
        elif isinstance(exc, ClientDisconnected):
            event(log, INFO, "client gone", client=self.peer, reason=exc.reason)
        else:
            event(
                log, WARNING, "session failed", **fields, sqlstate=exc.sqlstate, reason=exc.reason
            )
        phase, self.phase = self.phase, Phase.CLOSED
        if phase is Phase.SPLICED:
            return  # mid-stream: no protocol message fits in here
        if phase is not Phase.CANCEL:
            self._context.metrics.login_failed(exc.metric_reason)
        if phase is Phase.TLS_HANDSHAKE:
            return  # mid-TLS-handshake: an ErrorResponse would only garble it
        if not isinstance(exc, ClientDisconnected) and not self.client.closed:
            with contextlib.suppress(ClientDisconnected):
                self.client.write(wire.error_response(exc.client_fields(self.user)))

    def end(self, reason: SessionEnded) -> None:
        """End a spliced session for a policy reason: the client reads ``reason`` (FATAL
        57P01) between two of upstream's messages, then both sides close."""
        if self._splice is None:
            return
        final = wire.error_response(reason.client_fields(self.user))
        if self._splice.end_with(final):
            self._context.metrics.sessions_ended_by_policy.labels(reason.metric_reason).inc()
            event(
                log,
                INFO,
                "session ended by policy",
                reason=reason.metric_reason,
                user=self.user,
                database=self.database,
                client=self.peer,
            )

    def _cleanup(self) -> None:
        self.phase = Phase.CLOSED
        self._pool_outcome()
        if self._tracking is not None:
            self._tracking.on_clean_end = None  # no cycle session -> splice -> half -> session
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._cancel_entry is not None:
            self._context.cancels.unregister(self._cancel_entry)
        if self._splice is None:
            self.client.close()
            if not self.client.connected:
                self._sock.close()  # never got a transport: the socket is still ours
            if self.upstream is not None:
                self.upstream.protocol.abort()
        else:
            self._splice.close()

    def shutdown_now(self) -> None:
        """Close this session at once (shutdown after the drain timeout)."""
        if self._splice is not None:
            self._splice.abort()
