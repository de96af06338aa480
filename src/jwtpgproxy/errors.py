"""One exception tree for the whole proxy.

Every error that can end a client's session is a :class:`ProxyError`. Each knows the
PostgreSQL ErrorResponse the client sees (severity, SQLSTATE, message) and, separately, the
reason that goes to the log only. The split mirrors h11's Local/Remote errors:

* :class:`ClientError` -- the client broke the protocol or failed authentication;
* :class:`UpstreamError` -- the real PostgreSQL server failed or refused us.

Translation to bytes happens once, in :mod:`jwtpgproxy.session`. Client-facing text never
carries internal details, tokens or passwords (DESIGN.md, principle 8).
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
INTERNAL_ERROR = "XX000"
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""

    metric_reason = "internal_error"
    severity: str = "FATAL"
    sqlstate: str = INTERNAL_ERROR
    client_message: str = "internal error in proxy"

    def __init__(self, reason: str, *, client_message: str | None = None) -> None:
        # ``reason`` is for the log: it may name what exactly went wrong, but callers
        # must never put a token or a password in it.
        super().__init__(reason)
        self.reason = reason
        if client_message is not None:
            self.client_message = client_message

    def client_fields(self) -> dict[str, str]:
        """The ErrorResponse fields the client sees (PostgreSQL protocol, 55.8)."""
        return {
            "S": self.severity,
            "V": self.severity,
            "C": self.sqlstate,
            "M": self.client_message,
        }


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


class AuthenticationFailed(ClientError):
    """Token missing, malformed, unverifiable or not allowed.

    The client always sees the same text, whatever the reason -- PostgreSQL's
    ``auth_failed()`` does the same so that a client cannot probe which check failed.
    """

    sqlstate = INVALID_PASSWORD

    def __init__(self, reason: str, *, user: str, metric_reason: str = "invalid_token") -> None:
        super().__init__(reason, client_message=f'password authentication failed for user "{user}"')
        self.user = user
        #: The token Rejection code: a small fixed set, safe as a metrics label.
        self.metric_reason = metric_reason


class InvalidAuthorization(ClientError):
    """The startup packet asks for something this proxy never grants (28000)."""

    metric_reason = "protocol_violation"
    sqlstate = INVALID_AUTHORIZATION_SPECIFICATION
    client_message = "invalid authorization specification"


class EncryptionRequired(ClientError):
    metric_reason = "encryption_required"
    sqlstate = INVALID_AUTHORIZATION_SPECIFICATION
    client_message = "SSL/TLS encryption is required to connect to this proxy"


class TooManyConnections(ClientError):
    metric_reason = "too_many_connections"
    sqlstate = TOO_MANY_CONNECTIONS
    client_message = "sorry, too many clients already"


class ServerShuttingDown(ClientError):
    metric_reason = "shutting_down"
    sqlstate = ADMIN_SHUTDOWN
    client_message = "terminating connection due to administrator command"


class HandshakeTimeout(ClientError):
    metric_reason = "timeout"
    sqlstate = PROTOCOL_VIOLATION
    client_message = "canceling authentication due to timeout"


class UpstreamError(ProxyError):
    """Caused by the real PostgreSQL server, or by failing to reach it."""

    metric_reason = "upstream_error"
    sqlstate = CONNECTION_FAILURE
    client_message = "could not connect to the upstream PostgreSQL server"


class UpstreamUnavailable(UpstreamError):
    """TCP connect, TLS or timeout failure towards upstream."""

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


class UpstreamErrorResponse(UpstreamError):
    """Upstream refused the login with an ErrorResponse that is safe to relay as-is.

    E.g. database does not exist (3D000), too many connections (53300), role may not log in.
    """

    def __init__(self, fields: Mapping[str, str]) -> None:
        message = fields.get("M", "upstream error")
        super().__init__(f"upstream refused login: {fields.get('C', '?????')} {message}")
        self.fields = dict(fields)
        code = fields.get("C", "")
        # A SQLSTATE is five characters of [0-9A-Z]; anything else is replaced.
        self.sqlstate = code if _SQLSTATE.fullmatch(code) else INTERNAL_ERROR
        self.severity = fields.get("S", "FATAL")
        self.client_message = message

    def client_fields(self) -> dict[str, str]:
        # Relay what the server said, minus fields that could leak server internals
        # (file, line, routine) -- they describe upstream's source code, not the client's
        # problem. S, V, C and M are always present in an ErrorResponse (55.8); a server
        # that leaves one out still yields a well-formed FATAL for the client.
        relayed = {k: v for k, v in self.fields.items() if k not in {"F", "L", "R"}}
        relayed["S"] = self.severity
        relayed["V"] = self.fields.get("V", self.severity)
        relayed["C"] = self.sqlstate
        relayed["M"] = self.client_message
        return relayed


class ConfigError(Exception):
    """A setting is missing or unusable; stops start-up with one line."""
