"""Configuration: environment variables -> validated, immutable runtime objects.

This is the one place that knows environment-variable names and turns settings into the
objects the proxy runs with (DESIGN.md principle 5). The variable names of the original
jwt-postgresql-proxy are kept (``PUBLIC_KEYS__<i>``, ``UPSTREAM__HOST``, ``UPSTREAM__PORT``,
``UPSTREAM__PASSWORD``, ``DOWNSTREAM__IP``, ``DOWNSTREAM__PORT``, ``DOWNSTREAM__CERTFILE``,
``DOWNSTREAM__KEYFILE``). Everything is checked once at start-up (uvicorn ``Config.load()``
style); a problem becomes a :class:`ConfigError` whose text names the variable, and the daemon
prints that one line.

:func:`open_runtime` is the single entry point, used alike by the daemon, the ``verify``
command and SIGHUP: it owns the long-lived key source (JWKS) and revocation file, yields a
:class:`Configured` whose :attr:`~Configured.runtime` the listener runs with, and whose
:meth:`~Configured.reload` refreshes those sources and builds the next runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..auth.jwks import JwksKeySource
from ..auth.policy import ClaimPolicy
from ..auth.revocation import RevocationFile
from ..auth.tokens import (
    HmacSecret,
    TokenPolicy,
    TokenVerifier,
    VerificationKey,
    load_hmac_secret,
    load_verification_key,
)
from ..errors import ConfigError
from ..logs import event
from ..protocol.frontend import DownstreamSSLMode
from ..protocol.login import (
    ALL_AUTH_METHODS,
    AuthMethod,
    ChannelBindingPolicy,
    parse_require_auth,
)
from ..protocol.scram import DEFAULT_MAX_ITERATIONS, MAX_ITERATIONS
from ..proxy.cancel import MIN_SECRET_BYTES, CancelKeys
from ..proxy.connection import Keepalive
from ..proxy.pool import PoolMode, PoolSettings
from ..proxy.runtime import Downstream, Limits, Runtime
from ..proxy.upstream import UpstreamSSLMode, UpstreamTarget

T = TypeVar("T")
log = logging.getLogger("jwtpgproxy")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamSettings(_Section):
    host: str = Field(min_length=1)
    port: int = Field(default=5432, ge=1, le=65535)
    password: SecretStr
    sslmode: UpstreamSSLMode = UpstreamSSLMode.PREFER
    sslrootcert: Path | None = None
    channel_binding: ChannelBindingPolicy = ChannelBindingPolicy.PREFER
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    allow_replication: bool = False
    #: libpq's require_auth; unset: everything but password and none, unless the
    #: connection is verified TLS or a Unix socket (see upstream_require_auth()).
    require_auth: str | None = None
    #: The highest SCRAM iteration count upstream may ask for (PostgreSQL's default: 4096).
    scram_max_iterations: int = Field(default=DEFAULT_MAX_ITERATIONS, ge=4096, le=MAX_ITERATIONS)
    #: Connections per worker kept connected and TLS-negotiated for the next logins
    #: (jwtpgproxy.proxy.spare); 0: every login connects from scratch.
    spare_connections: int = Field(default=1, ge=0, le=64)
    #: Seconds a spare may wait unused; keep it below PostgreSQL's authentication_timeout.
    spare_idle_timeout: float = Field(default=30.0, gt=0, le=3600)


class DownstreamSettings(_Section):
    ip: str = "127.0.0.1"
    port: int = Field(default=5432, ge=0, le=65535)
    certfile: Path | None = None
    keyfile: Path | None = None
    sslmode: DownstreamSSLMode = DownstreamSSLMode.REQUIRE

    @field_validator("ip")
    @classmethod
    def _ips(cls, value: str) -> str:
        for part in value.split(","):
            try:
                ipaddress.ip_address(part.strip())
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not an IP address") from None
        return value


class MetricsSettings(_Section):
    """The HTTP listener for /metrics, /healthz and /readyz; off unless a port is set."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)


class KeepaliveSettings(_Section):
    """TCP keepalive on both sides: dead peers are noticed in idle + interval * count s."""

    idle: int = Field(default=60, ge=1, le=7200)
    interval: int = Field(default=10, ge=1, le=600)
    count: int = Field(default=6, ge=1, le=50)


class CancelSettings(_Section):
    """Self-routing cancel keys (``CANCEL__*``; see jwtpgproxy.proxy.cancel)."""

    #: Shared by every replica of a deployment; unset: one random secret per process tree.
    secret: SecretStr | None = None
    #: Unverifiable (protocol 3.0) cancels for sessions elsewhere, per source address.
    max_forwards_per_second: float = Field(default=10.0, ge=0, le=100_000)

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes")
        return value


#: The cancel secret of this process when CANCEL__SECRET is unset (a supervisor sets it for
#: its workers), kept across reloads so that keys already given out stay valid.
_PROCESS_CANCEL_SECRET = os.urandom(32)


class LoginThrottleSettings(_Section):
    """Failed logins per source address (``LOGIN_THROTTLE__*``): a token bucket of
    ``burst`` failures (0 = off), refilled at ``per_minute``; a source with an empty bucket
    has its new connections refused. At most ``max_sources`` sources are tracked."""

    burst: int = Field(default=20, ge=0, le=100_000)
    per_minute: float = Field(default=10.0, gt=0, le=100_000)
    max_sources: int = Field(default=10_000, ge=1, le=10_000_000)


class PoolSettingsModel(_Section):
    """Session pooling (``POOL__*``): see jwtpgproxy.proxy.pool and the README."""

    mode: PoolMode = PoolMode.NONE
    max_idle_per_key: int = Field(default=20, ge=1, le=10_000)
    max_idle: int = Field(default=100, ge=1, le=100_000)
    idle_timeout: float = Field(default=60.0, gt=0, le=86400)
    max_lifetime: float = Field(default=3600.0, gt=0, le=7 * 86400)


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class TokenSettings(_Section):
    """Token policy (``TOKEN__*``); see jwtpgproxy.auth.policy.ClaimPolicy for each rule."""

    leeway_seconds: float = Field(default=10.0, ge=0, le=300)
    max_length: int = Field(default=16384, ge=256, le=65535)
    issuer: str | None = None
    audience: str | None = None
    ignore_audience: bool = False
    role_claim: str = Field(default="sub", min_length=1)
    tenant_claim: str | None = None
    tenant: str | None = None
    scope_claim: str = Field(default="scope", min_length=1)
    #: Space- or comma-separated.
    required_scopes: str = ""
    read_only_scope: str | None = None
    databases_claim: str | None = None
    max_lifetime_seconds: float | None = Field(default=None, gt=0)
    require_exp: bool = True
    max_age_seconds: float | None = Field(default=None, gt=0)
    #: Space- or comma-separated claim names that must be present.
    required_claims: str = ""
    #: Shared secrets for HS256/384/512 (AIStore-style issuers), only ever used for HS*.
    hmac_secrets: dict[str, str] = Field(default_factory=dict)
    hmac_secret_ids: dict[str, str] = Field(default_factory=dict)
    revocation_file: Path | None = None
    revocation_poll_seconds: float = Field(default=5.0, gt=0, le=3600)
    #: End live sessions whose token is revoked / whose token expires (FATAL to client).
    end_sessions_on_revocation: bool = False
    end_sessions_on_expiry: bool = False


class JwksSettings(_Section):
    """Keys from a JWKS document: exactly one of file, URL or OIDC issuer (discovery)."""

    file: Path | None = None
    url: str | None = None
    oidc_issuer: str | None = None
    refresh_seconds: float = Field(default=300.0, gt=0, le=86400)
    min_refetch_seconds: float = Field(default=30.0, ge=0, le=86400)
    timeout: float = Field(default=10.0, gt=0, le=120)
    cafile: Path | None = None
    allow_http: bool = False
    #: Keys from a source whose fetches have failed for this long are dropped.
    max_staleness_seconds: float = Field(default=86400.0, gt=0, le=365 * 86400)

    @property
    def configured(self) -> bool:
        return any(v is not None for v in (self.file, self.url, self.oidc_issuer))


class Settings(BaseSettings):
    """Every setting, as environment variables with ``__`` between the nesting levels."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    public_keys: dict[str, str] = Field(default_factory=dict)
    #: Optional key ids, matched against a token's ``kid`` header: PUBLIC_KEY_IDS__<i>.
    public_key_ids: dict[str, str] = Field(default_factory=dict)
    upstream: UpstreamSettings
    downstream: DownstreamSettings = DownstreamSettings()
    token: TokenSettings = TokenSettings()
    jwks: JwksSettings = JwksSettings()
    #: From accept() to the end of the upstream login (PostgreSQL authentication_timeout).
    authentication_timeout: float = Field(default=60.0, gt=0, le=600)
    #: How long SIGTERM waits for sessions to end before closing them.
    shutdown_timeout: float = Field(default=30.0, ge=0, le=3600)
    #: After SIGTERM: seconds of not-ready while still accepting (load balancers notice).
    shutdown_delay: float = Field(default=0.0, ge=0, le=600)
    #: Client connections at once; beyond it, FATAL 53300 before any password is asked.
    max_client_connections: int = Field(default=1000, ge=1, le=1_000_000)
    #: Connections that have not finished login at once (slowloris bound); beyond it new
    #: connections are closed at once.
    max_pending_logins: int = Field(default=256, ge=1, le=100_000)
    #: The same, per source address (IPv4 address or IPv6 /64): a few hundred silent
    #: sockets from one address must not lock everybody else out.
    max_pending_logins_per_source: int = Field(default=32, ge=1, le=100_000)
    #: Seconds from accept() to the startup packet (TLS handshake included).
    startup_timeout: float = Field(default=10.0, gt=0, le=600)
    login_throttle: LoginThrottleSettings = LoginThrottleSettings()
    #: Seconds; sent upstream as PostgreSQL's idle_session_timeout (0 = off).
    idle_session_timeout: float = Field(default=0, ge=0, le=7 * 86400)
    #: Seconds a splice direction may hold unsent bytes without progress before it is
    #: logged and counted as stalled (0 = off).
    stall_warning_seconds: float = Field(default=30.0, ge=0, le=86400)
    keepalive: KeepaliveSettings = KeepaliveSettings()
    metrics: MetricsSettings = MetricsSettings()
    cancel: CancelSettings = CancelSettings()
    pool: PoolSettingsModel = PoolSettingsModel()
    #: Worker processes sharing the listening port (SO_REUSEPORT); 1 = a single process.
    workers: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level


# --- Building the runtime ---------------------------------------------------------------


def _env_name(loc: tuple[Any, ...]) -> str:
    return "__".join(str(part) for part in loc).upper()


def load_settings() -> Settings:
    """Read settings from the process environment; errors name the variable."""
    try:
        return Settings()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _env_name(tuple(first["loc"]))
        message = "required but not set" if first["type"] == "missing" else first["msg"]
        raise ConfigError(f"{name}: {message}") from None


def _downstream_ssl_context(settings: DownstreamSettings) -> ssl.SSLContext | None:
    if settings.sslmode is DownstreamSSLMode.DISABLE:
        return None
    if settings.certfile is None:
        raise ConfigError("DOWNSTREAM__CERTFILE: required unless DOWNSTREAM__SSLMODE=disable")
    if settings.keyfile is None:
        raise ConfigError("DOWNSTREAM__KEYFILE: required unless DOWNSTREAM__SSLMODE=disable")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ALPN "postgresql" is what PostgreSQL 17 servers advertise (55.2.9 "SSL Session
    # Encryption"); clients that do not ask for ALPN are unaffected.
    context.set_alpn_protocols(["postgresql"])
    try:
        context.load_cert_chain(str(settings.certfile), str(settings.keyfile))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"DOWNSTREAM__CERTFILE/DOWNSTREAM__KEYFILE: file not found: {exc.filename}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"DOWNSTREAM__CERTFILE/DOWNSTREAM__KEYFILE: cannot load certificate and key ({exc})"
        ) from None
    return context


#: ``UPSTREAM__SSLROOTCERT=system``: the system's trusted CAs (libpq 16), which forces
#: verify-full: with the public CAs any certificate for any name would pass verify-ca.
SSLROOTCERT_SYSTEM = "system"


def _system_roots(settings: UpstreamSettings) -> bool:
    return settings.sslrootcert is not None and str(settings.sslrootcert) == SSLROOTCERT_SYSTEM


def upstream_sslmode(settings: UpstreamSettings) -> UpstreamSSLMode:
    """The sslmode in force, checked as libpq does (libpq docs 34.19.1).

    ``sslrootcert=system`` makes verify-full the default and any weaker mode given
    explicitly an error; verify-ca needs a root certificate file, since against the public
    CAs without host-name checking any publicly trusted certificate would pass."""
    mode = settings.sslmode
    if _system_roots(settings):
        if "sslmode" not in settings.model_fields_set:
            return UpstreamSSLMode.VERIFY_FULL
        if mode is not UpstreamSSLMode.VERIFY_FULL:
            raise ConfigError(
                f"UPSTREAM__SSLMODE: {mode.value} may not be used with "
                "UPSTREAM__SSLROOTCERT=system (use verify-full)"
            )
    elif mode is UpstreamSSLMode.VERIFY_CA and settings.sslrootcert is None:
        raise ConfigError(
            "UPSTREAM__SSLROOTCERT: required with UPSTREAM__SSLMODE=verify-ca (a CA file; "
            "for the system CAs use UPSTREAM__SSLROOTCERT=system, which checks host names)"
        )
    return mode


def upstream_ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | None:
    """An SSLContext implementing libpq's sslmode semantics for the upstream connection.

    allow/prefer/require encrypt without verifying -- except that "require" with a root
    certificate behaves like verify-ca, as in libpq (libpq docs 34.19.1). verify-ca uses
    UPSTREAM__SSLROOTCERT; verify-full uses it or, when it is unset or ``system``, the
    system CAs.
    """
    mode = upstream_sslmode(settings)
    if mode is UpstreamSSLMode.DISABLE:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = mode is UpstreamSSLMode.VERIFY_FULL
    verify = mode in (UpstreamSSLMode.VERIFY_CA, UpstreamSSLMode.VERIFY_FULL) or (
        mode is UpstreamSSLMode.REQUIRE and settings.sslrootcert is not None
    )
    if not verify:
        context.verify_mode = ssl.CERT_NONE
        return context
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if settings.sslrootcert is not None and not _system_roots(settings):
            context.load_verify_locations(cafile=str(settings.sslrootcert))
        else:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"UPSTREAM__SSLROOTCERT: cannot load CA certificates ({exc})") from None
    return context


def _tls_verified(settings: UpstreamSettings, mode: UpstreamSSLMode) -> bool:
    """Whether upstream's certificate is checked against a CA (libpq verify-ca or
    stricter; "require" with a root certificate is verify-ca, as in libpq)."""
    return mode in (UpstreamSSLMode.VERIFY_CA, UpstreamSSLMode.VERIFY_FULL) or (
        mode is UpstreamSSLMode.REQUIRE and settings.sslrootcert is not None
    )


def upstream_require_auth(settings: UpstreamSettings) -> frozenset[AuthMethod]:
    """UPSTREAM__REQUIRE_AUTH, or its default.

    The default refuses ``password`` (the proxy's password in clear to whoever answers)
    and ``none`` (trust: every query to whoever answers) unless upstream is a Unix socket
    or TLS with a verified certificate -- where nobody can sit in the middle."""
    if settings.require_auth is not None and settings.require_auth.strip():
        try:
            return parse_require_auth(settings.require_auth)
        except ConfigError as exc:
            raise ConfigError(exc.message, setting="UPSTREAM__REQUIRE_AUTH") from None
    if settings.host.startswith("/") or _tls_verified(settings, upstream_sslmode(settings)):
        return ALL_AUTH_METHODS
    return ALL_AUTH_METHODS - {AuthMethod.PASSWORD, AuthMethod.NONE}


def _is_local(host: str) -> bool:
    if host.startswith("/") or host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_upstream_interceptable(settings: UpstreamSettings) -> None:
    """Start-up warning: over the network without verify-full, whoever sits between the
    proxy and upstream can relay the proxy's login -- the one password that opens every
    role -- to the real server, or (below verify-ca) read it."""
    mode = upstream_sslmode(settings)
    if not _is_local(settings.host) and mode is not UpstreamSSLMode.VERIFY_FULL:
        event(
            log,
            WARNING,
            "upstream connection can be intercepted: the proxy's login to upstream can be "
            "relayed by anyone in the middle; set UPSTREAM__SSLMODE=verify-full",
            upstream=settings.host,
            sslmode=mode.value,
        )


def _key_order(index: str) -> tuple[int, str]:
    """PUBLIC_KEYS__2 before PUBLIC_KEYS__10: numeric indexes in numeric order."""
    return (int(index), index) if index.isdigit() else (1 << 62, index)


def _indexed(
    values: dict[str, str],
    ids: dict[str, str],
    prefix: str,
    ids_prefix: str,
    load: Callable[..., T],
) -> list[T]:
    """Load ``<prefix>__<i>`` values in index order, each with its ``<ids_prefix>__<i>``
    key id; an id without a value is a configuration error."""
    unknown = set(ids) - set(values)
    if unknown:
        index = min(unknown, key=_key_order)
        raise ConfigError(f"{ids_prefix}__{index}: no {prefix}__{index} to name")
    return [
        load(values[index], name=f"{prefix}__{index}", kid=ids.get(index))
        for index in sorted(values, key=_key_order)
    ]


def _verification_keys(settings: Settings) -> list[VerificationKey]:
    return _indexed(
        settings.public_keys,
        settings.public_key_ids,
        "PUBLIC_KEYS",
        "PUBLIC_KEY_IDS",
        load_verification_key,
    )


def _names(text: str) -> frozenset[str]:
    return frozenset(part for part in text.replace(",", " ").split() if part)


def claim_policy(token: TokenSettings) -> ClaimPolicy:
    try:
        return ClaimPolicy(
            issuer=token.issuer,
            audience=token.audience,
            ignore_audience=token.ignore_audience,
            role_claim=token.role_claim,
            tenant_claim=token.tenant_claim,
            tenant=token.tenant,
            scope_claim=token.scope_claim,
            required_scopes=_names(token.required_scopes),
            read_only_scope=token.read_only_scope,
            databases_claim=token.databases_claim,
            max_lifetime_seconds=token.max_lifetime_seconds,
            require_exp=token.require_exp,
            max_age_seconds=token.max_age_seconds,
            required_claims=_names(token.required_claims),
        ).validate()
    except ConfigError as exc:
        raise _as_token_setting(exc) from None


def _as_token_setting(exc: ConfigError) -> ConfigError:
    """A ClaimPolicy field name -> its TOKEN__ variable (the settings use the same names)."""
    if exc.setting is None:
        return exc
    return ConfigError(exc.message, setting=f"TOKEN__{exc.setting.upper()}")


def _hmac_secrets(token: TokenSettings) -> list[HmacSecret]:
    return _indexed(
        token.hmac_secrets,
        token.hmac_secret_ids,
        "TOKEN__HMAC_SECRETS",
        "TOKEN__HMAC_SECRET_IDS",
        load_hmac_secret,
    )


def _jwks_source(settings: Settings) -> JwksKeySource | None:
    """The JWKS key source the settings ask for (not started), or None."""
    jwks = settings.jwks
    if not jwks.configured:
        return None
    given = [
        n
        for n, v in (("FILE", jwks.file), ("URL", jwks.url), ("OIDC_ISSUER", jwks.oidc_issuer))
        if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(
            f"JWKS__{given[1]}: set only one of JWKS__FILE, JWKS__URL, JWKS__OIDC_ISSUER"
        )
    context = None
    if jwks.cafile is not None:
        try:
            context = ssl.create_default_context(cafile=str(jwks.cafile))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"JWKS__CAFILE: cannot load CA certificates ({exc})") from None
    try:
        return JwksKeySource(
            file=jwks.file,
            url=jwks.url,
            issuer=jwks.oidc_issuer,
            name=f"JWKS__{given[0]}",
            refresh_seconds=jwks.refresh_seconds,
            min_refetch_seconds=jwks.min_refetch_seconds,
            timeout=jwks.timeout,
            ssl_context=context,
            allow_http=jwks.allow_http,
            max_staleness_seconds=jwks.max_staleness_seconds,
        )
    except ConfigError as exc:
        if exc.setting == "max_staleness_seconds":
            raise ConfigError(exc.message, setting="JWKS__MAX_STALENESS_SECONDS") from None
        raise


def _revocation_file(settings: Settings) -> RevocationFile | None:
    path = settings.token.revocation_file
    return None if path is None else RevocationFile(path, setting="TOKEN__REVOCATION_FILE")


def build_runtime(
    settings: Settings,
    *,
    key_source: JwksKeySource | None = None,
    revocation: RevocationFile | None = None,
) -> Runtime:
    """Turn settings into the runtime objects; raise ConfigError naming the variable.

    ``key_source`` (JWKS) and ``revocation`` are the long-lived sources owned by
    :func:`open_runtime`; a reload passes the same ones.
    """
    token = settings.token
    policy = claim_policy(token)
    if settings.jwks.oidc_issuer and token.issuer is None:
        # Tokens from an OIDC issuer name it in iss; without an explicit TOKEN__ISSUER,
        # the discovered issuer is the one to require.
        policy = dataclasses.replace(policy, issuer=settings.jwks.oidc_issuer).validate()
    keys = _verification_keys(settings)
    secrets = _hmac_secrets(token)
    if not keys and not secrets and key_source is None:
        raise ConfigError(
            "PUBLIC_KEYS__0: at least one key is required "
            "(PUBLIC_KEYS__<i>, TOKEN__HMAC_SECRETS__<i> or a JWKS)"
        )
    verifier = TokenVerifier(
        keys,
        TokenPolicy(leeway_seconds=token.leeway_seconds, max_token_length=token.max_length),
        claim_policy=policy,
        hmac_secrets=secrets,
        key_source=key_source,
        revocation=revocation,
    )
    upstream = upstream_target(settings)
    down = settings.downstream
    if settings.workers > 1 and down.port == 0:
        raise ConfigError("WORKERS: more than one worker needs a fixed DOWNSTREAM__PORT")
    return Runtime(
        verifier=verifier,
        upstream=upstream,
        downstream=Downstream(
            hosts=tuple(part.strip() for part in down.ip.split(",")),
            port=down.port,
            ssl_mode=down.sslmode,
            ssl_context=_downstream_ssl_context(down),
            # The PasswordMessage body is the token and its terminating NUL.
            max_password_length=token.max_length + 1,
            allow_replication=settings.upstream.allow_replication,
        ),
        limits=Limits(
            authentication_timeout=settings.authentication_timeout,
            max_client_connections=settings.max_client_connections,
            max_pending_logins=settings.max_pending_logins,
            shutdown_timeout=settings.shutdown_timeout,
            idle_session_timeout=settings.idle_session_timeout,
            stall_seconds=settings.stall_warning_seconds,
            shutdown_delay=settings.shutdown_delay,
            cancel_forwards_per_second=settings.cancel.max_forwards_per_second,
            max_pending_logins_per_source=settings.max_pending_logins_per_source,
            startup_timeout=settings.startup_timeout,
            login_throttle_burst=settings.login_throttle.burst,
            login_throttle_per_minute=settings.login_throttle.per_minute,
            login_throttle_max_sources=settings.login_throttle.max_sources,
        ),
        keepalive=upstream.keepalive,
        end_sessions_on_expiry=token.end_sessions_on_expiry,
        end_sessions_on_revocation=token.end_sessions_on_revocation,
        cancel_keys=_cancel_keys(settings.cancel),
        pool=PoolSettings(
            mode=settings.pool.mode,
            max_idle_per_key=settings.pool.max_idle_per_key,
            max_idle=settings.pool.max_idle,
            idle_timeout=settings.pool.idle_timeout,
            max_lifetime=settings.pool.max_lifetime,
        ),
    )


def _cancel_keys(settings: CancelSettings) -> CancelKeys:
    if settings.secret is None:
        return CancelKeys(_PROCESS_CANCEL_SECRET)
    return CancelKeys(settings.secret.get_secret_value().encode())


def upstream_target(settings: Settings) -> UpstreamTarget:
    """Where and how to reach upstream (also used by the worker supervisor's /readyz)."""
    up = settings.upstream
    if up.sslrootcert is not None and not _system_roots(up) and not up.sslrootcert.is_file():
        raise ConfigError(f"UPSTREAM__SSLROOTCERT: file not found: {up.sslrootcert}")
    sslmode = upstream_sslmode(up)
    if up.channel_binding is ChannelBindingPolicy.REQUIRE and sslmode in (
        UpstreamSSLMode.DISABLE,
        UpstreamSSLMode.ALLOW,
        UpstreamSSLMode.PREFER,
    ):
        raise ConfigError(
            "UPSTREAM__CHANNEL_BINDING: require needs UPSTREAM__SSLMODE=require or stricter"
        )
    return UpstreamTarget(
        host=up.host,
        port=up.port,
        password=up.password.get_secret_value(),
        sslmode=sslmode,
        ssl_context=upstream_ssl_context(up),
        channel_binding=up.channel_binding,
        connect_timeout=up.connect_timeout,
        keepalive=Keepalive(
            settings.keepalive.idle, settings.keepalive.interval, settings.keepalive.count
        ),
        require_auth=upstream_require_auth(up),
        scram_max_iterations=up.scram_max_iterations,
        spare_connections=up.spare_connections,
        spare_idle_timeout=up.spare_idle_timeout,
    )


@dataclass(slots=True)
class Configured:
    """The settings, the runtime built from them, and the long-lived sources it uses."""

    settings: Settings
    runtime: Runtime
    key_source: JwksKeySource | None
    revocation: RevocationFile | None

    async def reload(self) -> Runtime:
        """Re-read what lives in files or behind URLs -- the revocation list, the JWKS, TLS
        certificates and keys, CA files -- and build the next runtime (also kept as
        :attr:`runtime`). Raise ConfigError (the running runtime stays) when the result is
        unusable. A revocation file or JWKS that fails to load keeps its last good
        contents, as between reloads."""
        if self.revocation is not None:
            await self.revocation.poll(force=True)
        if self.key_source is not None and not await self.key_source.refresh():
            event(
                log,
                WARNING,
                "JWKS refresh failed: keeping the previous keys",
                source=self.key_source.name,
                error=self.key_source.last_error,
            )
        self.runtime = build_runtime(
            self.settings, key_source=self.key_source, revocation=self.revocation
        )
        return self.runtime


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings | None = None) -> AsyncIterator[Configured]:
    """Settings (from the environment unless given) -> a :class:`Configured`, with its
    JWKS source fetched and refreshing in the background until the block ends. Raise
    ConfigError naming the variable: a proxy that cannot verify any token does not start."""
    settings = load_settings() if settings is None else settings
    warn_if_upstream_interceptable(settings.upstream)
    key_source = _jwks_source(settings)
    revocation = _revocation_file(settings)
    if key_source is not None:
        await key_source.start()
    try:
        runtime = build_runtime(settings, key_source=key_source, revocation=revocation)
        yield Configured(settings, runtime, key_source, revocation)
    finally:
        if key_source is not None:
            await key_source.close()
