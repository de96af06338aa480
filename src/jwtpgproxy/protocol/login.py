"""Sans-IO login to the upstream PostgreSQL server, as a client (libpq's role).

Feed upstream's bytes in, get bytes to send and, at the end, a :class:`LoginComplete` with
the messages to relay to the client. One method per authentication request code; anything
a PostgreSQL server would not send at that point is an :class:`UpstreamProtocolError`.

Login methods: trust, cleartext password, MD5, SCRAM-SHA-256 and SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import (
    ConfigError,
    UpstreamAuthenticationFailed,
    UpstreamAuthMethodRefused,
    UpstreamErrorResponse,
    UpstreamProtocolError,
    WireError,
)
from . import wire
from .scram import (
    DEFAULT_MAX_ITERATIONS,
    MECHANISM,
    MECHANISM_PLUS,
    SALTED_KEYS,
    KeyDerivation,
    ScramSha256Client,
)

#: Upstream messages during login are small (ParameterStatus, errors); cap them.
MAX_LOGIN_MESSAGE_LENGTH = 65536
#: Everything relayed from one login (ParameterStatus, notices): PostgreSQL sends about
#: 1 KiB; a server sending megabytes before ReadyForQuery is broken or hostile.
MAX_LOGIN_RELAY_BYTES = 1024 * 1024
#: SQLSTATE of a failed password check upstream (invalid_password).
_UPSTREAM_PASSWORD_FAILED = "28P01"  # noqa: S105


class ChannelBindingPolicy(enum.StrEnum):
    """libpq's ``channel_binding``: whether to require SCRAM-SHA-256-PLUS (RFC 5929)."""

    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"


class AuthMethod(enum.StrEnum):
    """libpq's ``require_auth`` method names (libpq docs 34.1.2). gss, sspi and oauth are
    known so that a libpq-style list parses, though the proxy never logs in with them."""

    PASSWORD = "password"  # noqa: S105 (a method name: AuthenticationCleartextPassword)
    MD5 = "md5"
    GSS = "gss"
    SSPI = "sspi"
    SCRAM_SHA_256 = "scram-sha-256"  # with or without channel binding (-PLUS)
    OAUTH = "oauth"
    NONE = "none"  # AuthenticationOk with no authentication exchange ("trust")


ALL_AUTH_METHODS = frozenset(AuthMethod)


def parse_require_auth(text: str) -> frozenset[AuthMethod]:
    """The methods a libpq ``require_auth`` list allows, as libpq reads it: a comma list of
    method names allows exactly those; a list of ``!``-negated names allows every method
    but those; mixing both forms, a name given twice, or an unknown name is an error
    (libpq fe-connect.c). The empty list is libpq's "not set": every method."""
    if not text.strip():
        return ALL_AUTH_METHODS
    names = [part.strip() for part in text.split(",")]
    negated = names[0].startswith("!")
    seen: set[AuthMethod] = set()
    for name in names:
        if name.startswith("!") != negated:
            raise ConfigError(
                "negative methods (!name) cannot be mixed with non-negative ones",
                setting="require_auth",
            )
        bare = name[1:] if negated else name
        try:
            method = AuthMethod(bare)
        except ValueError:
            raise ConfigError(
                f"invalid method {bare!r} (one of {', '.join(m.value for m in AuthMethod)})",
                setting="require_auth",
            ) from None
        if method in seen:
            raise ConfigError(f"method {bare!r} given more than once", setting="require_auth")
        seen.add(method)
    allowed = ALL_AUTH_METHODS - seen if negated else frozenset(seen)
    if not allowed:
        raise ConfigError("allows no method at all", setting="require_auth")
    return allowed


class Phase(enum.Enum):
    AUTHENTICATING = enum.auto()  # startup sent; waiting for an authentication request
    SASL = enum.auto()  # in a SCRAM exchange
    AFTER_AUTH = enum.auto()  # AuthenticationOk received; collecting ParameterStatus etc.
    DONE = enum.auto()  # ReadyForQuery: LoginComplete returned (final)
    FAILED = enum.auto()  # any error (final)


#: The allowed transitions, in one table (as frontend's): trust, cleartext and MD5 go
#: straight from AUTHENTICATING to AFTER_AUTH; SCRAM passes through SASL. Any error moves
#: to FAILED, from any phase.
_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.AUTHENTICATING: frozenset({Phase.SASL, Phase.AFTER_AUTH}),
    Phase.SASL: frozenset({Phase.AFTER_AUTH}),
    Phase.AFTER_AUTH: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class NeedData:
    pass


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LoginComplete:
    """Upstream is ready for queries.

    ``relay`` holds, in order, the messages to pass to the client (AuthenticationOk,
    ParameterStatus, NoticeResponse, ReadyForQuery) -- except BackendKeyData, which is
    kept apart in ``backend_key`` because the session decides what the client is given.
    """

    relay: tuple[wire.BackendMessage, ...]
    backend_key: tuple[int, bytes] | None
    auth_method: str


@dataclass(frozen=True, slots=True)
class DeriveKeys:
    """Run ``derivation`` (PBKDF2: up to tens of milliseconds, more with a large iteration
    count) away from the event loop, then pass its result to :meth:`UpstreamLogin.keys_derived`.
    Only returned when the salted keys are not cached already."""

    derivation: KeyDerivation


Event = NeedData | Send | LoginComplete | DeriveKeys


class UpstreamLogin:
    def __init__(
        self,
        *,
        user: str,
        password: str,
        parameters: Mapping[str, str],
        channel_binding: ChannelBindingPolicy = ChannelBindingPolicy.PREFER,
        tls_server_end_point: bytes | None = None,
        protocol_minor: int = 0,
        require_auth: frozenset[AuthMethod] = ALL_AUTH_METHODS,
        scram_max_iterations: int = DEFAULT_MAX_ITERATIONS,
    ) -> None:
        """``parameters``: the startup parameters to send (must include ``user``).

        ``require_auth``: the authentication methods upstream may use (libpq's
        ``require_auth``, see :func:`parse_require_auth`); any other is refused before a
        password -- or, for ``none``, a query -- is sent.

        ``tls_server_end_point``: RFC 5929 channel binding data of the TLS connection
        (None when the connection is plaintext or the certificate's hash is unknown).

        ``protocol_minor``: the 3.x version to ask for; upstream may negotiate it down.
        """
        self._user = user
        self._password = password
        self._parameters = dict(parameters)
        self._binding_policy = channel_binding
        self._binding_data = tls_server_end_point
        self._requested_minor = protocol_minor
        self._require_auth = require_auth
        self._scram_max_iterations = scram_max_iterations
        self._derivation: KeyDerivation | None = None
        self._ready: Send | None = None  # client-final-message once the keys are derived
        #: The protocol minor version in force with upstream (after any negotiation).
        self.protocol_minor = protocol_minor
        self._first_message = True
        self._buffer = wire.MessageBuffer()
        self._phase = Phase.AUTHENTICATING
        self._scram: ScramSha256Client | None = None
        self._method = "trust"
        self._relay: list[wire.BackendMessage] = []
        self._relay_bytes = 0
        self._backend_key: tuple[int, bytes] | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    def startup_bytes(self) -> bytes:
        version = (3 << 16) | self._requested_minor
        return wire.startup_message(self._parameters, version)

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(data)

    def leftover(self) -> bytes:
        """Bytes received after ReadyForQuery (asynchronous messages): relay them."""
        return self._buffer.take_all()

    def keys_derived(self, keys: tuple[bytes, bytes]) -> None:
        """The result of the :class:`DeriveKeys` returned last."""
        if self._derivation is None or self._scram is None:
            raise RuntimeError("keys_derived() without a pending DeriveKeys")
        SALTED_KEYS.put(self._derivation, keys)
        self._derivation = None
        self._ready = Send(wire.sasl_response(self._scram.client_final_message(keys)))

    def next_event(self) -> Event:
        if self._derivation is not None:
            raise RuntimeError("next_event() before keys_derived()")
        if self._ready is not None:
            ready, self._ready = self._ready, None
            return ready
        try:
            while True:
                message = self._buffer.read_typed(MAX_LOGIN_MESSAGE_LENGTH)
                if message is None:
                    return NeedData()
                event = self._on_message(message)
                if event is not None:
                    return event
        except WireError as exc:
            self._phase = Phase.FAILED
            raise UpstreamProtocolError(f"upstream sent malformed data: {exc}") from exc
        except Exception:
            self._phase = Phase.FAILED
            raise

    def _move(self, new: Phase) -> None:
        if new not in _TRANSITIONS[self._phase]:
            raise RuntimeError(f"illegal login transition {self._phase} -> {new}")
        self._phase = new

    # -- dispatch --

    def _on_message(self, message: wire.BackendMessage) -> Event | None:
        if self._phase is Phase.DONE:
            raise UpstreamProtocolError("upstream message after ReadyForQuery during login")
        first, self._first_message = self._first_message, False
        tag = message.tag
        if tag == b"E":
            self._on_error(wire.decode_fields(message.body))
        if tag == b"N":
            self._keep(message)
            return None
        if self._phase is Phase.AFTER_AUTH:
            return self._after_auth(message)
        if tag == b"v":
            if not first:
                raise UpstreamProtocolError("NegotiateProtocolVersion out of order")
            return self._on_negotiate_protocol_version(message.body)
        if tag != b"R":
            raise UpstreamProtocolError(f"unexpected message {tag!r} during authentication")
        code, data = wire.decode_authentication(message.body)
        if self._phase is Phase.SASL:
            return self._on_sasl(code, data, message)
        return self._on_auth_request(code, data, message)

    def _on_negotiate_protocol_version(self, body: bytes) -> Event | None:
        """NegotiateProtocolVersion: upstream speaks an older 3.x than we asked (55.7).
        PostgreSQL sends it first, before any authentication request, and only downwards."""
        major, minor, unrecognized = wire.decode_negotiate_protocol_version(body)
        if major != 3 or minor > self._requested_minor or unrecognized:
            # Only downwards within 3.x; and we send no _pq_ options, so none to refuse.
            raise UpstreamProtocolError(f"upstream negotiated protocol {major}.{minor} unasked")
        self.protocol_minor = minor
        return None

    def _keep(self, message: wire.BackendMessage) -> None:
        """Hold a message to relay to the client once login completes (bounded in total)."""
        self._relay_bytes += len(message.body) + 5
        if self._relay_bytes > MAX_LOGIN_RELAY_BYTES:
            raise UpstreamProtocolError(
                f"upstream sent over {MAX_LOGIN_RELAY_BYTES} bytes of messages during login"
            )
        self._relay.append(message)

    def _on_error(self, fields: dict[str, str]) -> None:
        if self._phase in (Phase.AUTHENTICATING, Phase.SASL) and (
            fields.get("C") == _UPSTREAM_PASSWORD_FAILED
        ):
            # Our password for this role was refused: a server-side misconfiguration. The
            # client must not see it as *its* password failing, nor upstream's wording.
            raise UpstreamAuthenticationFailed(
                f"upstream refused the proxy's {self._method} login for role "
                f"{self._user!r}: {fields.get('M', '')}"
            )
        raise UpstreamErrorResponse(fields)

    def _on_auth_request(
        self, code: int, data: bytes, message: wire.BackendMessage
    ) -> Event | None:
        self._require_binding_possible(code)
        if code == wire.AUTH_OK:
            # No authentication exchange at all: "trust" upstream -- or a man in the middle
            # that wants the session's queries without knowing any password.
            self._require_method(AuthMethod.NONE)
            return self._authenticated(message)
        if code == wire.AUTH_CLEARTEXT_PASSWORD:
            self._require_method(AuthMethod.PASSWORD)
            self._method = "password"
            return Send(wire.password_message(self._password.encode("utf-8")))
        if code == wire.AUTH_MD5_PASSWORD:
            self._require_method(AuthMethod.MD5)
            if len(data) != 4:
                raise UpstreamProtocolError("MD5 salt of invalid length")
            self._method = "md5"
            return Send(wire.password_message(md5_password(self._password, self._user, data)))
        if code == wire.AUTH_SASL:
            self._require_method(AuthMethod.SCRAM_SHA_256)
            return self._start_sasl(wire.decode_sasl_mechanisms(data))
        raise UpstreamAuthenticationFailed(
            f"upstream asks for authentication method {code}, which the proxy does not support"
        )

    def _require_method(self, method: AuthMethod) -> None:
        if method not in self._require_auth:
            raise UpstreamAuthMethodRefused(method.value, sorted(self._require_auth))

    def _require_binding_possible(self, code: int) -> None:
        if self._binding_policy is ChannelBindingPolicy.REQUIRE and code != wire.AUTH_SASL:
            # libpq: channel_binding=require refuses any method that cannot bind -- including
            # "trust" (AuthenticationOk straight away), which is how a man in the middle
            # would skip SCRAM altogether.
            raise UpstreamAuthenticationFailed(
                f"channel binding required, but upstream authenticated with method {code}"
            )

    def _start_sasl(self, mechanisms: list[str]) -> Event:
        binding = self._binding_data
        if self._binding_policy is ChannelBindingPolicy.DISABLE:
            binding = None
        if binding is not None and MECHANISM_PLUS in mechanisms:
            self._scram = ScramSha256Client(
                self._password,
                channel_binding=binding,
                max_iterations=self._scram_max_iterations,
            )
            self._method = "scram-sha-256-plus"
        elif self._binding_policy is ChannelBindingPolicy.REQUIRE:
            raise UpstreamAuthenticationFailed(
                "channel binding required, but upstream offers no SCRAM-SHA-256-PLUS over TLS"
            )
        elif MECHANISM in mechanisms:
            # GS2 flag "y" when we could bind but the server did not offer PLUS: the server
            # then detects a downgrade by a man in the middle (RFC 5802 section 6).
            self._scram = ScramSha256Client(
                self._password,
                server_supports_binding=binding is not None,
                max_iterations=self._scram_max_iterations,
            )
            self._method = "scram-sha-256"
        else:
            raise UpstreamAuthenticationFailed(
                f"upstream offers no supported SASL mechanism ({', '.join(mechanisms)[:100]})"
            )
        self._move(Phase.SASL)
        return Send(
            wire.sasl_initial_response(self._scram.mechanism, self._scram.client_first_message())
        )

    def _on_sasl(self, code: int, data: bytes, message: wire.BackendMessage) -> Event | None:
        assert self._scram is not None
        if code == wire.AUTH_SASL_CONTINUE:
            derivation = self._scram.receive_server_first(data)
            keys = SALTED_KEYS.get(derivation)
            if keys is None:
                self._derivation = derivation
                return DeriveKeys(derivation)
            return Send(wire.sasl_response(self._scram.client_final_message(keys)))
        if code == wire.AUTH_SASL_FINAL:
            self._scram.handle_server_final(data)
            return None
        if code == wire.AUTH_OK:
            if not self._scram.done:
                # A server that skips SASLFinal has not proved it knows the password: it
                # could be an impersonator (libpq refuses this too).
                raise UpstreamAuthenticationFailed("upstream skipped SCRAM server verification")
            return self._authenticated(message)
        raise UpstreamProtocolError(f"unexpected authentication request {code} during SASL")

    def _authenticated(self, message: wire.BackendMessage) -> Event | None:
        """AuthenticationOk: relay it; ParameterStatus etc. follow until ReadyForQuery."""
        self._move(Phase.AFTER_AUTH)
        self._keep(message)
        return None

    def _after_auth(self, message: wire.BackendMessage) -> Event | None:
        tag = message.tag
        if tag == b"S":
            wire.decode_parameter_status(message.body)  # well-formed, or WireError
            self._keep(message)
            return None
        if tag == b"K":
            if self._backend_key is not None:
                raise UpstreamProtocolError("BackendKeyData sent twice")
            self._backend_key = wire.decode_backend_key_data(message.body)
            return None
        if tag == b"Z":
            if len(message.body) != 1:
                raise UpstreamProtocolError("ReadyForQuery of invalid length")
            self._keep(message)
            self._move(Phase.DONE)
            return LoginComplete(
                relay=tuple(self._relay),
                backend_key=self._backend_key,
                auth_method=self._method,
            )
        raise UpstreamProtocolError(f"unexpected message {tag!r} after authentication")


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """``"md5" + md5(md5(password + user) + salt)`` in hex (55.3.2 / pg_md5_encrypt)."""
    inner = hashlib.md5(password.encode("utf-8") + user.encode("utf-8"), usedforsecurity=False)
    outer = hashlib.md5(inner.hexdigest().encode("ascii") + salt, usedforsecurity=False)
    return b"md5" + outer.hexdigest().encode("ascii")
