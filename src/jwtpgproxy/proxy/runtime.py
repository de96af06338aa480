"""What the listener and every session need, as immutable values.

Built once from the settings by :mod:`jwtpgproxy.ops.config` (and rebuilt on SIGHUP); nothing
in the proxy layer reads a setting or an environment variable. A session keeps the
:class:`Runtime` it started with, so a reload never changes a live session.
"""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass, field

from ..auth.tokens import TokenVerifier
from ..protocol.frontend import DownstreamSSLMode
from .cancel import CancelKeys
from .connection import Keepalive
from .pool import PoolSettings
from .upstream import UpstreamTarget


@dataclass(frozen=True, slots=True)
class Downstream:
    """The client-facing side: where to listen and how to treat clients."""

    hosts: tuple[str, ...]
    port: int
    ssl_mode: DownstreamSSLMode
    ssl_context: ssl.SSLContext | None  # None when ssl_mode is disable
    #: The longest PasswordMessage body accepted (the token plus its NUL).
    max_password_length: int
    allow_replication: bool


@dataclass(frozen=True, slots=True)
class Limits:
    #: From accept() to the end of the upstream login (PostgreSQL authentication_timeout).
    authentication_timeout: float
    #: Client connections at once; beyond it, FATAL 53300 before any password is asked.
    max_client_connections: int
    #: Connections that have not finished login at once; beyond it new ones are closed.
    max_pending_logins: int
    #: How long a stop waits for sessions to end before ending them.
    shutdown_timeout: float
    #: Seconds, sent upstream as PostgreSQL's idle_session_timeout (0 = off).
    idle_session_timeout: float
    #: A splice direction holding unsent bytes without progress this long is reported as
    #: stalled (log line and metric; 0 = off).
    stall_seconds: float = 30.0
    #: After SIGTERM: seconds to keep accepting while /readyz says "not ready", so that a
    #: load balancer stops sending new connections before the listener closes.
    shutdown_delay: float = 0.0
    #: CancelRequests with a 3.0 key for a session of another worker or replica, which
    #: cannot be verified, forwarded per second and source address at most.
    cancel_forwards_per_second: float = 10.0
    #: Connections from one source (IPv4 address, IPv6 /64) not yet logged in, at once.
    max_pending_logins_per_source: int = 32
    #: From accept() to the startup packet (TLS handshake included); much shorter than
    #: authentication_timeout, which also covers the password and the upstream login.
    startup_timeout: float = 10.0
    #: Failed logins per source: a token bucket of ``login_throttle_burst`` tokens (0 =
    #: off) refilled at ``login_throttle_per_minute``, for at most ``..._max_sources``.
    login_throttle_burst: int = 20
    login_throttle_per_minute: float = 10.0
    login_throttle_max_sources: int = 10_000


@dataclass(frozen=True, slots=True)
class Runtime:
    verifier: TokenVerifier
    upstream: UpstreamTarget
    downstream: Downstream
    limits: Limits
    keepalive: Keepalive
    #: The proxy ends a session itself when its token expires / is revoked (FATAL 57P01).
    end_sessions_on_expiry: bool = False
    end_sessions_on_revocation: bool = False
    #: Under CANCEL__SECRET (see jwtpgproxy.proxy.cancel); random if not given.
    cancel_keys: CancelKeys = field(default_factory=lambda: CancelKeys(secrets.token_bytes(32)))
    #: Session pooling (POOL__*); off by default.
    pool: PoolSettings = field(default_factory=PoolSettings)

    @property
    def endable_sessions(self) -> bool:
        """Sessions may have to be ended by the proxy: track upstream's message boundaries."""
        return self.end_sessions_on_expiry or self.end_sessions_on_revocation
