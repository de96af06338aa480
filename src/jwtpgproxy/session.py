"""One client's life: handshake, token verification, upstream login, splice.

This is the one place where errors become bytes: any :class:`ProxyError` raised before the
splice is sent to the client as an ErrorResponse built from the error's client-facing fields,
and logged with its reason (DESIGN.md principle 3). Nothing reaches upstream before the token
is verified: the upstream connection is opened only after ``verify()`` returned an Identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import frontend, wire
from .cancel import CancelEntry, CancelRegistry, forward_cancel, secret_length
from .config import Runtime
from .connection import ConnectionClosed, HandshakeProtocol, format_peer
from .errors import (
    AuthenticationFailed,
    ClientDisconnected,
    HandshakeTimeout,
    ProtocolViolation,
    ProxyError,
    ServerShuttingDown,
    UpstreamAuthenticationFailed,
)
from .splice import Splice
from .tokens import Identity, TokenRejected
from .upstream import UpstreamConnection, describe, open_upstream

log = logging.getLogger("jwtpgproxy")

#: First byte of a TLS record carrying a handshake message (RFC 8446 5.1, ContentType 22).
TLS_HANDSHAKE_RECORD = 0x16


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
class _Startup:
    startup: wire.StartupMessage
    token: str
    leftover: bytes


class Session:
    def __init__(
        self,
        runtime: Runtime,
        cancels: CancelRegistry,
        sock: socket.socket,
        *,
        on_spliced: Callable[[Session], None] | None = None,
    ) -> None:
        """``sock``: a just-accepted, non-blocking client socket, owned from now on."""
        self.runtime = runtime
        self.cancels = cancels
        self._sock = sock
        self.client = HandshakeProtocol()  # connected to ``sock`` by _accept()
        self.peer = format_peer(sock)
        self.user: str | None = None
        self.database: str | None = None
        self._splice: Splice | None = None
        self._upstream: UpstreamConnection | None = None
        self._cancel_entry: CancelEntry | None = None
        self._on_spliced = on_spliced
        self._tls_handshaking = False
        self.protocol_minor = 0

    @property
    def spliced(self) -> bool:
        return self._splice is not None

    async def run(self) -> None:
        started = time.monotonic()
        log.info("connection received: client=%s", self.peer)
        try:
            await self._run()
        except ProxyError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ServerShuttingDown("session cancelled at shutdown"))
            raise
        except Exception:
            # A bug of ours: log it (tracebacks hold no token: we never format locals) and
            # give the client a generic error, never the details.
            log.exception("internal error: client=%s user=%s", self.peer, self.user)
            self._fail(ProxyError("internal error"))
        finally:
            self._cleanup()
            log.info(
                "connection closed: user=%s database=%s client=%s duration=%.3fs "
                "bytes_from_client=%d bytes_to_client=%d",
                self.user,
                self.database,
                self.peer,
                time.monotonic() - started,
                self.bytes_from_client,
                self.bytes_to_client,
            )

    @property
    def bytes_from_client(self) -> int:
        spliced = self._splice.bytes_from_client if self._splice else 0
        return self.client.bytes_received + spliced

    @property
    def bytes_to_client(self) -> int:
        spliced = self._splice.bytes_to_client if self._splice else 0
        return self.client.bytes_sent + spliced

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(self.runtime.settings.authentication_timeout):
                direct_tls = await self._accept()
                received = await self._client_handshake(direct_tls)
                if received is None:
                    return  # a CancelRequest: handled, no reply
                identity = self._verify(received)
                upstream = await self._login_upstream(received.startup, identity)
        except TimeoutError:
            raise HandshakeTimeout(
                f"authentication not completed within "
                f"{self.runtime.settings.authentication_timeout:g}s"
            ) from None
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
            context = self.runtime.downstream_ssl_context
            if context is None:
                raise ClientDisconnected("direct TLS attempted, but DOWNSTREAM__SSLMODE=disable")
        self._tls_handshaking = context is not None
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: self.client,
                self._sock,
                ssl=context,
                ssl_handshake_timeout=(
                    self.runtime.settings.authentication_timeout if context else None
                ),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ClientDisconnected(f"direct TLS handshake with client failed: {exc}") from None
        finally:
            self._tls_handshaking = False
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
        machine = frontend.FrontendHandshake(
            self.runtime.downstream_ssl_mode,
            max_password_length=self.runtime.settings.token.max_length + 1,
            allow_replication=self.runtime.settings.upstream.allow_replication,
            direct_tls=direct_tls,
        )
        while True:
            event = machine.next_event()
            if isinstance(event, frontend.NeedData):
                try:
                    machine.receive_data(await self.client.read())
                except ConnectionClosed:
                    raise ClientDisconnected(
                        "client closed the connection during handshake"
                    ) from None
            elif isinstance(event, frontend.Reply):
                self.client.write(event.data)
            elif isinstance(event, frontend.StartTLS):
                await self._start_client_tls(event)
                machine.tls_established()
            elif isinstance(event, frontend.PasswordRequested):
                self.user = event.startup.user
                self.database = event.startup.database
                self.client.write(event.data)
            elif isinstance(event, frontend.PasswordReceived):
                self.protocol_minor = machine.protocol_minor
                return _Startup(event.startup, event.password, machine.leftover())
            else:  # CancelReceived
                await self._handle_cancel(event.request, tls=machine.tls)
                return None

    async def _start_client_tls(self, event: frontend.StartTLS) -> None:
        context = self.runtime.downstream_ssl_context
        assert context is not None  # the machine only asks for TLS when it is configured
        self.client.write(event.data)
        self._tls_handshaking = True
        try:
            await self.client.start_tls(
                context,
                server_side=True,
                timeout=self.runtime.settings.authentication_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionClosed) as exc:
            raise ClientDisconnected(f"TLS handshake with client failed: {exc}") from None
        finally:
            self._tls_handshaking = False

    def _verify(self, received: _Startup) -> Identity:
        startup = received.startup
        try:
            identity = self.runtime.verifier.verify(received.token, startup.user)
        except TokenRejected as exc:
            raise AuthenticationFailed(f"token rejected: {exc}", user=startup.user) from None
        log.info(
            "token accepted: user=%s database=%s client=%s alg=%s key=%s expires_in=%.0fs",
            startup.user,
            startup.database,
            self.peer,
            identity.algorithm,
            identity.key_name,
            identity.expires_at - time.time(),
        )
        return identity

    async def _login_upstream(
        self, startup: wire.StartupMessage, identity: Identity
    ) -> UpstreamConnection:
        # Every startup parameter the client sent is forwarded; the role is the verified
        # one (equal to the startup user, checked in verify()).
        parameters = dict(startup.parameters)
        parameters["user"] = identity.role
        upstream = await open_upstream(self.runtime.upstream, parameters, self.protocol_minor)
        self._upstream = upstream
        log.info(
            "upstream login: user=%s database=%s client=%s upstream=%s method=%s tls=%s",
            self.user,
            self.database,
            self.peer,
            describe(self.runtime.upstream),
            upstream.result.auth_method,
            upstream.tls,
        )
        return upstream

    async def _splice_with(self, upstream: UpstreamConnection, client_leftover: bytes) -> None:
        to_client = bytearray()
        for message in upstream.result.relay:
            if message.tag == b"Z" and upstream.result.backend_key is not None:
                to_client += self._backend_key_data(upstream)
            to_client += message.encode()
        to_client += upstream.leftover

        client_transport, client_rest = self.client.detach()
        upstream_transport, upstream_rest = upstream.protocol.detach()
        if self.client.closed or upstream.protocol.closed:
            raise ClientDisconnected("a side closed while login completed")
        self._splice = Splice(client_transport, upstream_transport)
        self._splice.start(bytes(to_client) + upstream_rest, client_leftover + client_rest)
        if self._on_spliced is not None:
            self._on_spliced(self)
        await self._splice.wait_closed()

    def _backend_key_data(self, upstream: UpstreamConnection) -> bytes:
        assert upstream.result.backend_key is not None
        pid, upstream_secret = upstream.result.backend_key
        self._cancel_entry = self.cancels.register(
            pid, upstream_secret, upstream.tls, secret_length(self.protocol_minor)
        )
        return wire.backend_key_data(pid, self._cancel_entry.proxy_secret)

    async def _handle_cancel(self, request: wire.CancelRequest, *, tls: bool) -> None:
        entry = self.cancels.match(request)
        if entry is None:
            log.info("cancel request ignored: no such session: client=%s tls=%s", self.peer, tls)
            return
        log.info(
            "cancel request forwarded: pid=%d client=%s tls=%s upstream_tls=%s",
            entry.process_id,
            self.peer,
            tls,
            entry.upstream_tls,
        )
        await forward_cancel(self.runtime.upstream, entry)

    def _fail(self, exc: ProxyError) -> None:
        if isinstance(exc, AuthenticationFailed | UpstreamAuthenticationFailed):
            log.warning(
                "authentication failed: user=%s database=%s client=%s reason=%s",
                self.user,
                self.database,
                self.peer,
                exc.reason,
            )
        elif isinstance(exc, ClientDisconnected):
            log.info("client gone: client=%s reason=%s", self.peer, exc.reason)
        else:
            log.warning(
                "session failed: user=%s database=%s client=%s sqlstate=%s reason=%s",
                self.user,
                self.database,
                self.peer,
                exc.sqlstate,
                exc.reason,
            )
        if self._splice is not None or self._tls_handshaking:
            return  # mid-stream or mid-TLS-handshake: no protocol message fits in here
        if not isinstance(exc, ClientDisconnected) and not self.client.closed:
            with contextlib.suppress(ConnectionClosed):
                self.client.write(wire.error_response(exc.client_fields()))

    def _cleanup(self) -> None:
        if self._cancel_entry is not None:
            self.cancels.unregister(self._cancel_entry)
        if self._splice is None:
            self.client.close()
            if self.client.transport is None:
                self._sock.close()  # never got a transport: the socket is still ours
            if self._upstream is not None:
                self._upstream.protocol.abort()
        else:
            self._splice.close()

    def shutdown_now(self) -> None:
        """Close this session at once (shutdown after the drain timeout)."""
        if self._splice is not None:
            self._splice.abort()
