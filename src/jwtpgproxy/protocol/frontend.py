"""Sans-IO state machine for the client side of the handshake.

Bytes in (:meth:`FrontendHandshake.receive_data`), events out
(:meth:`FrontendHandshake.next_event`). The driver (:mod:`jwtpgproxy.proxy.session`) writes
the bytes each event carries and performs the TLS upgrade when told to; it never interprets
client bytes itself.

The flow follows PostgreSQL's ``ProcessStartupPacket()`` (src/backend/tcop/backend_startup.c):

    AWAIT_INITIAL --SSLRequest--> TLS_PENDING --tls_established()--> AWAIT_INITIAL (tls)
    AWAIT_INITIAL --GSSENCRequest--> AWAIT_INITIAL ('N' sent)
    AWAIT_INITIAL --CancelRequest--> CANCEL (final)
    AWAIT_INITIAL --StartupMessage--> AWAIT_PASSWORD (cleartext password requested)
    AWAIT_PASSWORD --PasswordMessage--> DONE (final)
    any --error--> FAILED (final)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..errors import (
    ClientDisconnected,
    ClientError,
    EncryptionRequired,
    FeatureNotSupported,
    InvalidAuthorization,
    ProtocolViolation,
    WireError,
)
from . import wire

#: Newest protocol minor version the proxy speaks to clients: 3.2 (PostgreSQL 18), whose only
#: change is a variable-length cancel key -- and the client's key is made by the proxy.
NEWEST_MINOR = 2


class DownstreamSSLMode(enum.StrEnum):
    """How the proxy treats client encryption."""

    REQUIRE = "require"  # plaintext clients get a FATAL before any password is asked
    ALLOW = "allow"  # TLS offered, plaintext accepted
    DISABLE = "disable"  # no TLS at all (e.g. a sidecar on localhost)


class State(enum.Enum):
    AWAIT_INITIAL = enum.auto()
    TLS_PENDING = enum.auto()
    AWAIT_PASSWORD = enum.auto()
    DONE = enum.auto()
    CANCEL = enum.auto()
    FAILED = enum.auto()


#: The allowed transitions, in one table (h11 ``_state.py`` style).
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.AWAIT_INITIAL: frozenset(
        {State.TLS_PENDING, State.AWAIT_INITIAL, State.AWAIT_PASSWORD, State.CANCEL}
    ),
    State.TLS_PENDING: frozenset({State.AWAIT_INITIAL}),
    State.AWAIT_PASSWORD: frozenset({State.DONE}),
    State.DONE: frozenset(),
    State.CANCEL: frozenset(),
    State.FAILED: frozenset(),
}


# --- Events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedData:
    """Nothing to do until more bytes arrive."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Write ``data`` to the client, then ask for the next event."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Write ``data`` (b"S"), run the server-side TLS handshake, call tls_established()."""

    data: bytes = b"S"


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """A CancelRequest: act on it and close the connection without a reply."""

    request: wire.CancelRequest


@dataclass(frozen=True, slots=True)
class PasswordRequested:
    """The startup packet is accepted: write ``data`` (auth request) and wait."""

    startup: wire.StartupMessage
    data: bytes


@dataclass(frozen=True, slots=True)
class PasswordReceived:
    startup: wire.StartupMessage
    password: str = field(repr=False)


Event = NeedData | Reply | StartTLS | CancelReceived | PasswordRequested | PasswordReceived


_REPLICATION_OFF = frozenset({"false", "off", "no", "0"})
#: PostgreSQL names are at most NAMEDATALEN - 1 = 63 bytes; ProcessStartupPacket() silently
#: truncates longer user and database names.
MAX_NAME_BYTES = 63


class FrontendHandshake:
    """The client-facing half of a session, up to the PasswordMessage."""

    def __init__(
        self,
        ssl_mode: DownstreamSSLMode,
        *,
        max_password_length: int = 16384,
        allow_replication: bool = False,
        direct_tls: bool = False,
    ) -> None:
        """``direct_tls``: the connection began with a TLS handshake (PostgreSQL 17
        ``sslnegotiation=direct``), so it is encrypted before the first packet."""
        self.ssl_mode = ssl_mode
        self.max_password_length = max_password_length
        self.allow_replication = allow_replication
        self.state = State.AWAIT_INITIAL
        self.tls = direct_tls
        #: The protocol minor version agreed with the client (3.x), known after startup.
        self.protocol_minor = 0
        self._gss_answered = False
        self._buffer = wire.MessageBuffer()
        self._startup: wire.StartupMessage | None = None

    # -- driver interface --

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(data)

    def tls_established(self) -> None:
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_established() outside TLS_PENDING")
        self.tls = True
        self._move(State.AWAIT_INITIAL)

    def leftover(self) -> bytes:
        """Bytes after the PasswordMessage (a client may pipeline queries, as PostgreSQL
        allows); they go to upstream once it is logged in."""
        if self.state is not State.DONE:
            raise RuntimeError("leftover() before the handshake is done")
        return self._buffer.take_all()

    def next_event(self) -> Event:
        try:
            return self._next_event()
        except WireError as exc:
            self.state = State.FAILED
            raise ProtocolViolation(str(exc)) from exc
        except ClientError:
            self.state = State.FAILED
            raise

    # -- internals --

    def _move(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal handshake transition {self.state} -> {new}")
        self.state = new

    def _next_event(self) -> Event:
        if self.state is State.AWAIT_INITIAL:
            return self._on_initial()
        if self.state is State.AWAIT_PASSWORD:
            return self._on_password()
        raise RuntimeError(f"next_event() in state {self.state}")

    def _on_initial(self) -> Event:
        body = self._buffer.read_untyped(wire.MAX_STARTUP_PACKET_LENGTH)
        if body is None:
            return NeedData()
        packet = wire.decode_initial_packet(body)
        if isinstance(packet, wire.SSLRequest):
            return self._on_ssl_request()
        if isinstance(packet, wire.GSSENCRequest):
            if self.tls or self._gss_answered:
                raise ProtocolViolation("GSSENCRequest after encryption negotiation")
            self._gss_answered = True
            self._move(State.AWAIT_INITIAL)
            return Reply(b"N")  # GSSAPI encryption is not offered; the client carries on
        if isinstance(packet, wire.CancelRequest):
            self._move(State.CANCEL)
            return CancelReceived(packet)
        return self._on_startup(packet)

    def _on_ssl_request(self) -> Event:
        if self.tls:
            raise ProtocolViolation("SSLRequest received over TLS")
        if self.ssl_mode is DownstreamSSLMode.DISABLE:
            self._move(State.AWAIT_INITIAL)
            return Reply(b"N")
        if self._buffer:
            # CVE-2021-23214: bytes sent after the SSLRequest but before the TLS handshake
            # were not encrypted and could be injected by a man in the middle; PostgreSQL
            # refuses them, and so do we.
            raise ProtocolViolation("received unencrypted data after SSL request")
        self._move(State.TLS_PENDING)
        return StartTLS()

    def _on_startup(self, startup: wire.StartupMessage) -> Event:
        if startup.major != 3:
            raise FeatureNotSupported(
                f"unsupported frontend protocol {startup.major}.{startup.minor}",
                client_message=(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    f"server supports 3.0 to 3.{NEWEST_MINOR}"
                ),
            )
        if self.ssl_mode is DownstreamSSLMode.REQUIRE and not self.tls:
            raise EncryptionRequired("plaintext startup refused: TLS is required")
        if not startup.parameters.get("user"):
            raise InvalidAuthorization(
                "no user name in startup packet",
                client_message="no PostgreSQL user name specified in startup packet",
            )
        for what, name in (("user", startup.user), ("database", startup.database)):
            if len(name.encode("utf-8")) > MAX_NAME_BYTES:
                # PostgreSQL would truncate it and log in as (or open) a *different* name
                # than the one the token was checked against -- e.g. the role named by its
                # first 63 bytes. Refuse instead.
                raise InvalidAuthorization(
                    f"{what} name longer than {MAX_NAME_BYTES} bytes",
                    client_message=f"{what} name is longer than {MAX_NAME_BYTES} bytes",
                )
        replication = startup.parameters.get("replication")
        if (
            replication is not None
            and replication.lower() not in _REPLICATION_OFF
            and not self.allow_replication
        ):
            raise InvalidAuthorization(
                "replication connection refused by configuration",
                client_message="replication connections are not allowed through this proxy",
            )
        reply = b""
        self.protocol_minor = min(startup.minor, NEWEST_MINOR)
        if startup.minor > NEWEST_MINOR or startup.protocol_options:
            # 55.2.1: the server answers NegotiateProtocolVersion and carries on at the
            # newest version both support; the client decides whether to continue.
            reply = wire.negotiate_protocol_version(self.protocol_minor, startup.protocol_options)
        self._startup = startup
        self._move(State.AWAIT_PASSWORD)
        return PasswordRequested(startup, reply + wire.authentication_cleartext_password())

    def _on_password(self) -> Event:
        message = self._buffer.read_typed(self.max_password_length)
        if message is None:
            return NeedData()
        assert self._startup is not None
        if message.tag == b"X":
            raise ClientDisconnected("client sent Terminate instead of a password")
        if message.tag != b"p":
            raise ProtocolViolation(f"expected password response, got message type {message.tag!r}")
        password = wire.decode_password_message(message.body)
        self._move(State.DONE)
        return PasswordReceived(self._startup, password)
