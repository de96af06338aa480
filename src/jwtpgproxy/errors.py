"""The one exception tree of the proxy.

Every error the proxy raises on purpose is an :class:`Error`. Those that end (or refuse) a
client's session are :class:`ProxyError`\\ s: each knows the PostgreSQL ErrorResponse the client
sees (severity, SQLSTATE, message), the reason that goes to the log only, and the reason label
of the ``jwtpgproxy_logins`` metric. The split under it mirrors h11's Local/Remote errors::

    Error
    ├── ConfigError                    a setting is missing or unusable (start-up, reload)
    │   └── JwksError                  a JWKS or discovery document cannot be fetched or used
    ├── TokenSourceError               client side (jwtpgproxy.client): no current token
    └── ProxyError                     ends a session; SQLSTATE XX000 unless a subclass says
        ├── WireError                  malformed or oversized protocol bytes (sans-IO codec)
        │   └── MessageTooLarge        a length word beyond its cap
        ├── ClientError                caused by what the client sent, or did not send
        │   ├── ProtocolViolation            08P01  (WireError from a client, re-raised)
        │   ├── FeatureNotSupported          0A000  protocol 2.0, 4.0
        │   ├── ClientDisconnected           08006  the client went away: nothing is sent
        │   ├── TlsHandshakeFailed           08006  the client's TLS handshake failed
        │   ├── DirectTlsNotAccepted         08006  direct TLS while TLS is disabled
        │   ├── AuthenticationFailed         28P01  always the same text, like auth_failed()
        │   │   └── TokenRejected            28P01  the token failed a rule (label: the rule)
        │   ├── InvalidAuthorization         28000  a startup packet asking for what we refuse
        │   │   └── EncryptionRequired       28000  plaintext while TLS is required
        │   ├── TooManyConnections           53300
        │   └── HandshakeTimeout             57014  login not done within the deadline
        ├── SessionEnded                   57P01  the proxy ends the session itself
        │   ├── ServerShuttingDown               shutdown before the session was spliced
        │   ├── TokenExpired                     TOKEN__END_SESSIONS_ON_EXPIRY
        │   └── TokenRevoked                     TOKEN__END_SESSIONS_ON_REVOCATION
        └── UpstreamError                  08006  caused by the real PostgreSQL server
            ├── UpstreamUnavailable              TCP, TLS, timeout, or upstream hung up
            ├── UpstreamProtocolError      08P01  (WireError from upstream, re-raised)
            ├── UpstreamAuthenticationFailed 28000  the proxy's own login was refused
            │   ├── ScramError                   the SCRAM exchange with upstream failed
            │   └── UpstreamAuthMethodRefused    a method UPSTREAM__REQUIRE_AUTH refuses
            └── UpstreamErrorResponse      (upstream's own SQLSTATE) relayed login error

Errors become bytes in one place: :func:`jwtpgproxy.proxy.session.Session` sends
:meth:`ProxyError.client_fields` as an ErrorResponse and logs :attr:`ProxyError.reason`.
Client-facing text never carries internal details, tokens or passwords (DESIGN.md,
principle 8); ``reason`` may name what exactly went wrong, but never a token or a password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# SQLSTATE codes used by the proxy (PostgreSQL Appendix A, "Error Codes").
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
INVALID_PASSWORD = "28P01"  # noqa: S105 (a SQLSTATE, not a password)
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
FEATURE_NOT_SUPPORTED = "0A000"
TOO_MANY_CONNECTIONS = "53300"
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
INTERNAL_ERROR = "XX000"
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")


class Error(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(Error):
    """A setting is missing or unusable; stops start-up with one line (a reload keeps the
    running configuration).

    ``setting`` names the offending value in the raising module's own terms (a field or
    parameter name); :mod:`jwtpgproxy.ops.config` turns it into the environment variable.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(f"{setting}: {message}" if setting else message)
        self.message = message
        self.setting = setting


class JwksError(ConfigError):
    """A JWKS or discovery document could not be fetched or used. The text names the
    (credential-free) location and the reason."""


class ProxyError(Error):
    """An error that ends or refuses a client's session."""

    metric_reason = "internal_error"
    severity: str = "FATAL"
    sqlstate: str = INTERNAL_ERROR
    client_message: str = "internal error in proxy"

    def __init__(self, reason: str, *, client_message: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if client_message is not None:
            self.client_message = client_message

    def client_fields(self, user: str | None = None) -> dict[str, str]:
        """The ErrorResponse fields the client sees (PostgreSQL protocol, 55.8).
        ``user``: the startup user, for messages that name it."""
        return {
            "S": self.severity,
            "V": self.severity,
            "C": self.sqlstate,
            "M": self.client_message,
        }


# --- Codec ---------------------------------------------------------------------------------


class WireError(ProxyError):
    """Malformed or oversized protocol data, from the sans-IO codec (:mod:`..protocol.wire`).

    The state machine that fed the bytes re-raises it as :class:`ProtocolViolation` (from a
    client) or :class:`UpstreamProtocolError` (from upstream), so the client sees who broke
    the protocol."""

    metric_reason = "protocol_violation"
    sqlstate = PROTOCOL_VIOLATION
    client_message = "invalid frontend message"


class MessageTooLarge(WireError):
    pass


# --- Client side ---------------------------------------------------------------------------


class ClientError(ProxyError):
    """Caused by what the client sent (or did not send)."""


class ProtocolViolation(ClientError):
    metric_reason = "protocol_violation"
    sqlstate = PROTOCOL_VIOLATION
    client_message = "invalid frontend message"


class FeatureNotSupported(ClientError):
    metric_reason = "protocol_violation"
    sqlstate = FEATURE_NOT_SUPPORTED
    client_message = "feature not supported"


class ClientDisconnected(ClientError):
    """The client went away; nothing can be sent to it."""

    metric_reason = "client_disconnected"
    sqlstate = CONNECTION_FAILURE
    client_message = "connection closed"


class TlsHandshakeFailed(ClientDisconnected):
    """The client's TLS handshake failed; no ErrorResponse fits inside a handshake."""

    metric_reason = "tls_handshake_failed"


class DirectTlsNotAccepted(ClientDisconnected):
    """A direct TLS ClientHello while TLS is disabled: closed, as PostgreSQL does."""

    metric_reason = "tls_disabled"


class AuthenticationFailed(ClientError):
    """The client's password (its token) was not accepted.

    The client always sees the same text, whatever the reason -- PostgreSQL's
    ``auth_failed()`` does the same so that a client cannot probe which check failed.
    """

    metric_reason = "invalid_token"
    sqlstate = INVALID_PASSWORD

    def client_fields(self, user: str | None = None) -> dict[str, str]:
        fields = super().client_fields(user)
        fields["M"] = f'password authentication failed for user "{user or ""}"'
        return fields


class TokenRejected(AuthenticationFailed):
    """A token was refused. ``code`` (a :class:`jwtpgproxy.auth.policy.Rejection`, from a
    small fixed set) is the metric label; ``detail`` is for the log."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"token rejected: {code}: {detail}")
        self.code = code
        self.detail = detail
        self.metric_reason = str(code)


class InvalidAuthorization(ClientError):
    """The startup packet asks for something this proxy never grants (28000)."""

    metric_reason = "protocol_violation"
    sqlstate = INVALID_AUTHORIZATION_SPECIFICATION
    client_message = "invalid authorization specification"


class EncryptionRequired(InvalidAuthorization):
    metric_reason = "encryption_required"
    client_message = "SSL/TLS encryption is required to connect to this proxy"


class TooManyConnections(ClientError):
    metric_reason = "too_many_connections"
    sqlstate = TOO_MANY_CONNECTIONS
    client_message = "sorry, too many clients already"


class HandshakeTimeout(ClientError):
    """Login not done within AUTHENTICATION_TIMEOUT: PostgreSQL's own answer is FATAL
    57014 "canceling authentication due to timeout" (postmaster's StartupPacketTimeout /
    authentication_timeout handling), so drivers treat it alike."""

    metric_reason = "timeout"
    sqlstate = QUERY_CANCELED
    client_message = "canceling authentication due to timeout"


# --- Ended by the proxy --------------------------------------------------------------------


class SessionEnded(ProxyError):
    """The proxy ends the session itself (AdminShutdown, 57P01)."""

    metric_reason = "shutting_down"
    sqlstate = ADMIN_SHUTDOWN
    client_message = "terminating connection due to administrator command"


class ServerShuttingDown(SessionEnded):
    pass


class TokenExpired(SessionEnded):
    metric_reason = "expired"
    client_message = "terminating connection because its token expired"


class TokenRevoked(SessionEnded):
    metric_reason = "revoked"
    client_message = "terminating connection because its token was revoked"


# --- Upstream side -------------------------------------------------------------------------


class UpstreamError(ProxyError):
    """Caused by the real PostgreSQL server, or by failing to reach it."""

    metric_reason = "upstream_error"
    sqlstate = CONNECTION_FAILURE
    client_message = "could not connect to the upstream PostgreSQL server"


class UpstreamUnavailable(UpstreamError):
    """TCP connect, TLS or timeout failure towards upstream, or upstream hung up."""

    metric_reason = "upstream_unavailable"


class UpstreamProtocolError(UpstreamError):
    """Upstream sent something a PostgreSQL server would not send."""

    sqlstate = PROTOCOL_VIOLATION
    client_message = "upstream PostgreSQL server sent an invalid response"


class UpstreamAuthenticationFailed(UpstreamError):
    """The proxy's own login to upstream failed (wrong password, method not allowed).

    The client did nothing wrong; this is a server-side misconfiguration, so the client
    sees a clear server-side error and never the proxy's password or upstream's wording.
    """

    metric_reason = "upstream_auth_failed"
    sqlstate = INVALID_AUTHORIZATION_SPECIFICATION
    client_message = "the proxy could not log in to the upstream PostgreSQL server"


class ScramError(UpstreamAuthenticationFailed):
    """The SCRAM exchange with upstream failed: the server's messages are malformed, or
    its signature is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"SCRAM exchange with upstream failed: {reason}")


class UpstreamAuthMethodRefused(UpstreamAuthenticationFailed):
    """Upstream asked for an authentication method the proxy is not allowed to use there
    (libpq's ``require_auth``): cleartext ``password`` or ``none`` (trust) over a connection
    a man in the middle could sit on. Nothing was sent: no password, no query."""

    metric_reason = "upstream_auth_method_refused"
    client_message = (
        "the upstream PostgreSQL server asked for an authentication method "
        "the proxy is configured to refuse"
    )

    def __init__(self, method: str, allowed: list[str]) -> None:
        # The one setting that decides it is named here (the log line is read by the
        # operator, who can allow the method there if the path to upstream is trusted).
        super().__init__(
            f"upstream asked for authentication method {method}, which UPSTREAM__REQUIRE_AUTH "
            f"does not allow (allowed: {','.join(allowed)}); use UPSTREAM__SSLMODE=verify-full "
            f"or a Unix socket, or add {method} to UPSTREAM__REQUIRE_AUTH if the path to "
            "upstream is trusted"
        )
        self.method = method


class UpstreamErrorResponse(UpstreamError):
    """Upstream refused the login with an ErrorResponse; the client gets part of it.

    E.g. database does not exist (3D000), too many connections (53300), role may not log in.
    Only severity, SQLSTATE and message reach the client (an allow-list): upstream's DETAIL,
    HINT, WHERE, schema/table names and source location describe the server and the proxy's
    place in its configuration, not the client's problem -- they go to the log, in
    ``reason``. For authentication-class errors (SQLSTATE class 28), whose messages name the
    proxy's address and pg_hba.conf rules (``no pg_hba.conf entry for host "10.0.0.5"...``),
    even the message is replaced by a generic one.
    """

    #: The fields relayed to the client (55.8 "Error and Notice Message Fields").
    RELAYED_FIELDS = frozenset({"S", "V", "C", "M"})
    #: Longest log rendering of one of upstream's fields.
    _LOG_FIELD_CHARS = 500

    def __init__(self, fields: Mapping[str, str]) -> None:
        code = fields.get("C", "")
        message = fields.get("M", "upstream error")
        kept = " ".join(
            f"{name}={value[: self._LOG_FIELD_CHARS]!r}"
            for name, value in fields.items()
            if name not in {"S", "V", "C", "M"}
        )
        super().__init__(
            f"upstream refused login: {code or '?????'} {message}" + (f" [{kept}]" if kept else "")
        )
        self.fields = dict(fields)
        # A SQLSTATE is five characters of [0-9A-Z]; anything else is replaced.
        self.sqlstate = code if _SQLSTATE.fullmatch(code) else INTERNAL_ERROR
        # Login errors are FATAL (the connection ends); anything else a server sends in S
        # is not relayed as if it meant something.
        severity = fields.get("S", "FATAL")
        self.severity = severity if severity in {"ERROR", "FATAL", "PANIC"} else "FATAL"
        if self.sqlstate.startswith("28"):
            self.client_message = "the upstream PostgreSQL server refused the proxy's login"
        else:
            self.client_message = message

    def client_fields(self, user: str | None = None) -> dict[str, str]:
        # S, V, C and M are always present in an ErrorResponse (55.8); a server that leaves
        # one out still yields a well-formed FATAL for the client.
        return {
            "S": self.severity,
            "V": self.severity,
            "C": self.sqlstate,
            "M": self.client_message,
        }


# --- Client library ------------------------------------------------------------------------


class TokenSourceError(Error):
    """A client-side token source (:mod:`jwtpgproxy.client`) could not give a current token.

    The text names the source (a file path, a command's name, a key file) and the reason;
    it never contains a token."""
