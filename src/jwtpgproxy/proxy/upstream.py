"""Open a logged-in connection to the upstream PostgreSQL server.

TCP (or a Unix socket when the host is a directory, as in libpq), then TLS per the target's
``sslmode`` (libpq's meanings), then the sans-IO :class:`~jwtpgproxy.protocol.login.UpstreamLogin`
driven over the connection until ReadyForQuery.
"""

from __future__ import annotations

import asyncio
import enum
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from ..errors import (
    INVALID_AUTHORIZATION_SPECIFICATION,
    ProxyError,
    UpstreamErrorResponse,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from ..protocol import login as login_sm
from ..protocol import wire
from ..protocol.login import ALL_AUTH_METHODS, AuthMethod, ChannelBindingPolicy
from ..protocol.scram import DEFAULT_MAX_ITERATIONS
from .connection import HandshakeProtocol, Keepalive

if TYPE_CHECKING:
    from .spare import UpstreamSpares


class UpstreamSSLMode(enum.StrEnum):
    """libpq's ``sslmode`` meanings (libpq docs 34.19.1, table "SSL Mode Descriptions")."""

    DISABLE = "disable"
    ALLOW = "allow"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and how to reach upstream: built once from the settings."""

    host: str  # a host name or address, or a Unix socket directory (starts with "/")
    port: int
    password: str = field(repr=False)
    sslmode: UpstreamSSLMode
    ssl_context: ssl.SSLContext | None  # None when sslmode is disable
    channel_binding: ChannelBindingPolicy
    connect_timeout: float
    keepalive: Keepalive
    #: The authentication methods upstream may use (libpq's require_auth).
    require_auth: frozenset[AuthMethod] = ALL_AUTH_METHODS
    #: The highest SCRAM iteration count accepted from upstream.
    scram_max_iterations: int = DEFAULT_MAX_ITERATIONS
    #: Connections kept connected and TLS-negotiated for the next logins (proxy.spare).
    spare_connections: int = 1
    #: Seconds a spare may wait unused; below PostgreSQL's authentication_timeout.
    spare_idle_timeout: float = 30.0


_TLS_REQUIRED = frozenset(
    {UpstreamSSLMode.REQUIRE, UpstreamSSLMode.VERIFY_CA, UpstreamSSLMode.VERIFY_FULL}
)


@dataclass(slots=True)
class UpstreamConnection:
    protocol: HandshakeProtocol
    result: login_sm.LoginComplete
    tls: bool
    #: Asynchronous messages upstream sent after ReadyForQuery (to relay to the client).
    leftover: bytes


def describe(target: UpstreamTarget) -> str:
    return f"{target.host}:{target.port}"


async def open_upstream(
    target: UpstreamTarget,
    parameters: Mapping[str, str],
    protocol_minor: int = 0,
    *,
    spares: UpstreamSpares | None = None,
) -> UpstreamConnection:
    """Connect and log in as ``parameters["user"]``, asking for protocol 3.``protocol_minor``
    (upstream may negotiate it down); raise an UpstreamError on failure. With ``spares``, the
    first connection is a spare if one is ready (see :mod:`.spare`)."""
    if target.sslmode is UpstreamSSLMode.ALLOW:
        # libpq "allow": plaintext first; TLS only if the server refuses plaintext.
        try:
            return await _first_attempt(target, parameters, protocol_minor, spares)
        except UpstreamErrorResponse as exc:
            if exc.sqlstate != INVALID_AUTHORIZATION_SPECIFICATION:
                raise
        return await _attempt(target, parameters, protocol_minor, use_tls=True)
    return await _first_attempt(target, parameters, protocol_minor, spares)


async def _first_attempt(
    target: UpstreamTarget,
    parameters: Mapping[str, str],
    protocol_minor: int,
    spares: UpstreamSpares | None,
) -> UpstreamConnection:
    spare = spares.take(target) if spares is not None else None
    if spare is not None:
        protocol, tls = spare
        answered = protocol.bytes_received
        try:
            return await _log_in(protocol, tls, target, parameters, protocol_minor)
        except UpstreamUnavailable:
            if protocol.bytes_received != answered:
                raise
            # Closed before upstream answered anything (authentication_timeout ended the
            # backend as the login began): nothing was said, so a new connection is safe.
    return await _attempt(target, parameters, protocol_minor, use_tls=first_attempt_tls(target))


def first_attempt_tls(target: UpstreamTarget) -> bool:
    """Whether a login's first connection asks for TLS (libpq's sslmode: "allow" tries
    plaintext first, "disable" never asks)."""
    return target.sslmode not in (UpstreamSSLMode.DISABLE, UpstreamSSLMode.ALLOW)


async def _attempt(
    target: UpstreamTarget,
    parameters: Mapping[str, str],
    protocol_minor: int,
    *,
    use_tls: bool,
) -> UpstreamConnection:
    protocol, tls = await connect(target, use_tls=use_tls)
    return await _log_in(protocol, tls, target, parameters, protocol_minor)


async def connect(target: UpstreamTarget, *, use_tls: bool) -> tuple[HandshakeProtocol, bool]:
    """A connection to upstream with nothing sent yet but, with ``use_tls``, SSLRequest and
    the TLS handshake (the sslmode may settle for plaintext); and whether it is TLS. The
    connection is aborted if the TLS step fails."""
    protocol = await connect_raw(target)
    try:
        return protocol, await negotiate_tls(protocol, target) if use_tls else False
    except BaseException:
        protocol.abort()
        raise


async def _log_in(
    protocol: HandshakeProtocol,
    tls: bool,
    target: UpstreamTarget,
    parameters: Mapping[str, str],
    protocol_minor: int,
) -> UpstreamConnection:
    """Drive the login over ``protocol``, connected (and TLS-negotiated when ``tls``) with
    nothing sent yet; aborts it on failure."""
    try:
        binding = _tls_server_end_point(protocol) if tls else None
        machine = login_sm.UpstreamLogin(
            user=parameters["user"],
            password=target.password,
            parameters=parameters,
            channel_binding=target.channel_binding,
            tls_server_end_point=binding,
            protocol_minor=protocol_minor,
            require_auth=target.require_auth,
            scram_max_iterations=target.scram_max_iterations,
        )
        protocol.write(machine.startup_bytes())
        while True:
            event = machine.next_event()
            if isinstance(event, login_sm.Send):
                protocol.write(event.data)
            elif isinstance(event, login_sm.LoginComplete):
                return UpstreamConnection(protocol, event, tls, machine.leftover())
            elif isinstance(event, login_sm.DeriveKeys):
                # PBKDF2 in a thread (hashlib releases the GIL): on the loop it would stall
                # every session of this worker for as long as it runs.
                loop = asyncio.get_running_loop()
                machine.keys_derived(await loop.run_in_executor(None, event.derivation.derive))
            else:
                machine.receive_data(await protocol.read())
    except BaseException:
        protocol.abort()
        raise


async def connect_raw(target: UpstreamTarget) -> HandshakeProtocol:
    """A TCP (or Unix-socket) connection to upstream, nothing sent yet."""
    loop = asyncio.get_running_loop()

    def closed(reason: str) -> ProxyError:
        return UpstreamUnavailable(f"upstream {describe(target)}: {reason}")

    protocol = HandshakeProtocol(target.keepalive, peer_closed=closed)
    try:
        async with asyncio.timeout(target.connect_timeout):
            if target.host.startswith("/"):
                path = os.path.join(target.host, f".s.PGSQL.{target.port}")
                await loop.create_unix_connection(lambda: protocol, path)
            else:
                await loop.create_connection(lambda: protocol, target.host, target.port)
    except TimeoutError:
        raise UpstreamUnavailable(
            f"timeout after {target.connect_timeout:g}s connecting to upstream {describe(target)}"
        ) from None
    except OSError as exc:
        raise UpstreamUnavailable(
            f"cannot connect to upstream {describe(target)}: {exc.strerror or exc}"
        ) from None
    return protocol


async def negotiate_tls(protocol: HandshakeProtocol, target: UpstreamTarget) -> bool:
    """SSLRequest; returns whether the connection is now TLS (55.2.10)."""
    assert target.ssl_context is not None
    protocol.write(wire.ssl_request())
    try:
        async with asyncio.timeout(target.connect_timeout):
            answer = await protocol.read()
    except TimeoutError:
        raise UpstreamUnavailable(
            f"upstream {describe(target)} did not answer SSLRequest"
        ) from None
    if answer[:1] == b"S":
        if len(answer) > 1:
            # CVE-2021-23222: bytes after 'S' and before the TLS handshake were not
            # encrypted; a man in the middle could have injected them. libpq refuses them.
            raise UpstreamProtocolError("upstream sent unencrypted data after SSL response")
        try:
            await protocol.start_tls(
                target.ssl_context,
                server_side=False,
                server_hostname=target.host,
                timeout=target.connect_timeout,
            )
        except (OSError, UpstreamUnavailable, TimeoutError) as exc:
            raise UpstreamUnavailable(
                f"TLS handshake with upstream {describe(target)} failed: {exc}"
            ) from None
        return True
    if answer[:1] == b"N":
        if len(answer) > 1:
            raise UpstreamProtocolError("upstream sent data after refusing SSL")
        if target.sslmode in _TLS_REQUIRED:
            raise UpstreamUnavailable(
                f"upstream {describe(target)} does not support TLS, and "
                f"sslmode {target.sslmode.value} requires it"
            )
        return False
    # A server too old for SSLRequest answers with an ErrorResponse.
    raise UpstreamProtocolError("upstream answered SSLRequest with neither S nor N")


def _tls_server_end_point(protocol: HandshakeProtocol) -> bytes | None:
    """RFC 5929 tls-server-end-point: hash of the server certificate with the hash of its
    signature algorithm (SHA-256 for MD5 and SHA-1). None where that hash is undefined
    (e.g. Ed25519 certificates), as in PostgreSQL's be_tls_get_certificate_hash()."""
    assert protocol.transport is not None
    ssl_object = protocol.transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return None
    try:
        algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    if algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


#: The longest terminate_backends() may take, login and query included.
TERMINATE_TIMEOUT_SECONDS = 5.0


async def terminate_backends(
    target: UpstreamTarget,
    role: str,
    database: str,
    pids: list[int],
    timeout: float = TERMINATE_TIMEOUT_SECONDS,
) -> None:
    """Ask upstream to end ``pids`` (backends of ``role``) with pg_terminate_backend(),
    within ``timeout`` seconds (UpstreamUnavailable after it: a shutdown must not hang on
    an upstream that accepts the connection and then says nothing).

    The proxy cannot inject an ErrorResponse into a spliced stream -- it does not know where
    messages begin -- but PostgreSQL can: each backend sends FATAL 57P01 "terminating
    connection due to administrator command" at a message boundary and closes, and that
    reaches the client through the splice. A role may terminate its own backends, so the
    proxy logs in as that role, with the password it already uses for it.
    """
    try:
        async with asyncio.timeout(timeout):
            await _terminate_backends(target, role, database, pids)
    except TimeoutError:
        raise UpstreamUnavailable(
            f"upstream {describe(target)} did not terminate backends within {timeout:g}s"
        ) from None


async def _terminate_backends(
    target: UpstreamTarget, role: str, database: str, pids: list[int]
) -> None:
    pid_list = ",".join(str(int(pid)) for pid in pids)  # ints only: nothing to inject
    query = f"SELECT pg_terminate_backend(p) FROM unnest(ARRAY[{pid_list}]::int[]) p"  # noqa: S608
    connection = await open_upstream(target, {"user": role, "database": database})
    protocol = connection.protocol
    try:
        protocol.write(wire.typed_message(b"Q", query.encode("ascii") + b"\0"))
        buffer = wire.MessageBuffer()
        buffer.feed(connection.leftover)
        while True:
            message = buffer.read_typed(login_sm.MAX_LOGIN_MESSAGE_LENGTH)
            if message is None:
                buffer.feed(await protocol.read())
                continue
            if message.tag == b"E":
                raise UpstreamErrorResponse(wire.decode_fields(message.body))
            if message.tag == b"Z":
                break
        protocol.write(wire.terminate())
    except BaseException:
        protocol.abort()  # an error or the deadline: nothing worth flushing
        raise
    protocol.close()


async def probe_upstream(target: UpstreamTarget, timeout: float = 2.0) -> tuple[bool, str]:
    """Readiness: does upstream accept a TCP connection within ``timeout`` seconds?"""
    try:
        async with asyncio.timeout(timeout):
            protocol = await connect_raw(target)
    except (ProxyError, TimeoutError) as exc:
        return False, f"upstream not reachable: {exc}"
    protocol.close()
    return True, "ready"


class CachedProbe:
    """A readiness probe whose answer is reused for ``seconds`` and shared by concurrent
    callers: however often /readyz is asked (its port may be open to a whole network),
    upstream sees about one probe connection per ``seconds``."""

    def __init__(
        self, probe: Callable[[], Awaitable[tuple[bool, str]]], seconds: float = 1.0
    ) -> None:
        self._probe = probe
        self._seconds = seconds
        self._answer: tuple[float, tuple[bool, str]] | None = None
        self._inflight: asyncio.Task[tuple[bool, str]] | None = None

    async def __call__(self) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        if self._answer is not None and loop.time() - self._answer[0] < self._seconds:
            return self._answer[1]
        if self._inflight is None:
            self._inflight = loop.create_task(self._run())
        # Shielded: a caller that goes away does not cancel the probe others wait for.
        return await asyncio.shield(self._inflight)

    async def _run(self) -> tuple[bool, str]:
        try:
            answer = await self._probe()
            self._answer = (asyncio.get_running_loop().time(), answer)
            return answer
        finally:
            self._inflight = None
