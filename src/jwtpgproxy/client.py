"""Client side: a current token for every new database connection, and local minting.

Applications hand the proxy a short-lived JWT as the password of each *new* connection. The
usual failure is not the proxy but the application's connection pool, which captures one
password at start-up and fails when that token expires. A :class:`TokenSource` gives the
pool a current token whenever it opens a connection:

* :class:`FileTokenSource` -- a file that something else keeps fresh (a Kubernetes projected
  service-account token, a sidecar); re-read when its inode, size or mtime changes;
* :class:`CommandTokenSource` -- a command that prints a token (``gcloud``/``az``/``vault``
  style); run with a timeout, cached, and run again ``refresh_margin`` seconds before the
  token's ``exp`` (read without verifying: the proxy verifies, the client only schedules);
* :class:`PrivateKeyTokenSource` -- mint locally with a private key the service holds, the
  same code as ``jwt-postgresql-proxy token`` (:func:`mint_token`).

Each source is thread-safe (one lock; one refresh at a time) and asyncio-friendly
(:meth:`TokenSource.token_async` runs a refresh in a thread, never on the event loop). A
source is also a plain callable, so it can be passed where a driver accepts a password
callable (asyncpg). A failing refresh raises :class:`TokenSourceError`, whose text names the
source and the reason and never contains a token.

This module imports only the standard library, PyJWT and cryptography -- not the proxy's
server dependencies (uvloop, pydantic-settings) -- so applications can use it anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import shlex
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .auth.tokens import EC_CURVE_ALGORITHMS
from .errors import ConfigError, TokenSourceError

__all__ = [
    "KEYGEN_ALGORITHMS",
    "CommandTokenSource",
    "FileTokenSource",
    "PrivateKeyTokenSource",
    "StaticTokenSource",
    "TokenSource",
    "TokenSourceError",
    "default_algorithm",
    "generate_private_key",
    "load_private_key",
    "mint_token",
    "token_source_from_env",
    "unverified_expiry",
]

SigningKey: TypeAlias = (
    ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
)

#: The proxy's default TOKEN__MAX_LENGTH is 16384; a little room for larger configurations.
MAX_TOKEN_BYTES = 65536
#: JWS algorithms a generated key is for (RFC 7518 3.1 / RFC 8037), and the key each needs.
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
KEYGEN_ALGORITHMS = ("EdDSA", *_RSA, *_CURVES)
#: RSA keys are generated at 3072 bits (NIST SP 800-57: 128-bit security).
RSA_KEY_BITS = 3072
#: After a failed refresh with a still-valid token in hand, try again after this long.
RETRY_SECONDS = 5.0
_log = logging.getLogger("jwtpgproxy.client")
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


# --- Keys and minting (shared with the ``keygen`` and ``token`` commands) ------------------


def generate_private_key(algorithm: str) -> SigningKey:
    """A new private key for ``algorithm`` (a JWS name: EdDSA, RS256..PS512, ES256..ES512)."""
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm in _RSA:
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    curve = _CURVES.get(algorithm)
    if curve is None:
        raise ConfigError(
            f"unsupported algorithm {algorithm!r} (one of {', '.join(KEYGEN_ALGORITHMS)})",
            setting="--alg",
        )
    return ec.generate_private_key(curve())


def load_private_key(pem: bytes, *, name: str) -> SigningKey:
    """Parse an unencrypted PEM private key; ``name`` says where it came from in errors."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load PEM private key: {exc}", setting=name) from None
    if not isinstance(
        key,
        ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
        | rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey,
    ):
        raise ConfigError(f"unsupported key type {type(key).__name__}", setting=name)
    return key


def default_algorithm(key: SigningKey) -> str:
    """The JWS algorithm a key signs with when none is named."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return EC_CURVE_ALGORITHMS.get(key.curve.name, "ES256")


def mint_token(
    key: SigningKey,
    sub: str,
    ttl_seconds: float,
    *,
    algorithm: str | None = None,
    kid: str | None = None,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Sign ``{"sub", "iat", "exp", **claims}`` with ``key`` (NumericDates in whole seconds,
    RFC 7519 2; ``exp`` is rounded down, so the token never outlives ``ttl_seconds``)."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + int(ttl_seconds)}
    payload.update(claims or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(
        payload,
        key,
        algorithm=algorithm or default_algorithm(key),
        headers=headers,
    )


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim read *without* verifying the signature -- only to decide when to
    fetch the next token; the proxy is the one that verifies. None when absent or invalid."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def _redact(text: str) -> str:
    """A command's stderr for an error message: one line, capped, anything shaped like a JWT
    replaced (a failing command may still print one)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return _JWT_SHAPE.sub("[token redacted]", last)[:300]


# --- Sources -------------------------------------------------------------------------------


class TokenSource(ABC):
    """A current token on demand; subclasses fetch, this class caches and locks.

    A cached token is reused until ``refresh_margin`` seconds before its ``exp``; a token
    without ``exp`` is reused for ``cache_seconds``. A fetched token that has already
    expired is an error (the proxy would refuse it with a less helpful 28P01).
    """

    def __init__(self, description: str, *, refresh_margin: float, cache_seconds: float) -> None:
        if refresh_margin < 0 or cache_seconds < 0:
            raise ValueError("refresh_margin and cache_seconds must not be negative")
        self.description = description
        self.refresh_margin = refresh_margin
        self.cache_seconds = cache_seconds
        #: How many tokens this source has fetched (or minted) so far.
        self.fetches = 0
        self._lock = threading.Lock()
        self._token: str | None = None
        self._valid_until = 0.0  # wall clock: reuse the cached token before this instant
        self._expires_at: float | None = None
        #: The last refresh failure's text (names the source, never a token), if any.
        self.last_error: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"<{type(self).__name__} {self.description}>"

    def __call__(self) -> str:
        return self.token()

    @property
    def valid_until(self) -> float:
        """When the cached token is due for replacement (wall clock; 0 before the first)."""
        return self._valid_until

    @property
    def expires_at(self) -> float | None:
        """The cached token's ``exp`` (unverified), if any."""
        return self._expires_at

    def token(self) -> str:
        """A current token (blocking: may read a file, run a command or sign).

        When a refresh fails while the cached token has not expired yet, that token is
        returned (the failure is logged, and retried a few seconds later): a new
        connection still works, and the refresh margin is there for exactly this. With no
        unexpired token, the failure is raised as :class:`TokenSourceError`.
        """
        with self._lock:
            now = time.time()
            if self._token is not None and self._fresh(now):
                return self._token
            try:
                return self._refresh()
            except TokenSourceError as exc:
                self.last_error = str(exc)
                left = None if self._expires_at is None else self._expires_at - now
                if self._token is None or left is None or left <= 1:
                    raise
                retry = min(RETRY_SECONDS, left / 2)
                _log.warning(
                    "%s; using the current token (expires in %.0fs), retrying in %.0fs",
                    exc,
                    left,
                    retry,
                )
                self._valid_until = now + retry
                return self._token

    async def token_async(self) -> str:
        """A current token without blocking the event loop: the cached one at once, else
        the refresh runs in a worker thread."""
        if self._lock.acquire(blocking=False):
            try:
                if self._token is not None and self._fresh(time.time()):
                    return self._token
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.token)

    def invalidate(self) -> None:
        """Forget the cached token (e.g. after the server refused it)."""
        with self._lock:
            self._token = None

    def _fresh(self, now: float) -> bool:
        return now < self._valid_until

    def _refresh(self) -> str:
        token = self._fetch()
        if not token:
            raise TokenSourceError(f"{self.description}: gave an empty token")
        if any(c.isspace() for c in token) or not token.isascii() or not token.isprintable():
            raise TokenSourceError(
                f"{self.description}: gave a token with whitespace or non-printable "
                "characters (expected one line)"
            )
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenSourceError(
                f"{self.description}: gave {len(token)} bytes (at most {MAX_TOKEN_BYTES})"
            )
        now = time.time()
        expires_at = unverified_expiry(token)
        if expires_at is not None and expires_at <= now:
            raise TokenSourceError(
                f"{self.description}: gave a token that expired {now - expires_at:.0f}s ago"
            )
        self.fetches += 1
        self.last_error = None
        self._token, self._expires_at = token, expires_at
        if expires_at is None:
            self._valid_until = now + self.cache_seconds
        else:
            self._valid_until = min(expires_at - self.refresh_margin, now + 86400)
        return token

    @abstractmethod
    def _fetch(self) -> str:
        """Get a new token, or raise TokenSourceError naming the source."""


class StaticTokenSource(TokenSource):
    """One fixed token (for tools and tests; it stops working when it expires)."""

    def __init__(self, token: str, *, description: str = "static token") -> None:
        super().__init__(description, refresh_margin=0, cache_seconds=86400)
        self._static = token.strip()

    def _fetch(self) -> str:
        return self._static


class FileTokenSource(TokenSource):
    """A token in a file that something else refreshes; read again whenever the file's
    device, inode, size or modification time changes (so both rewrites in place and the
    Kubernetes atomic symlink swap are seen), and otherwise served from memory."""

    def __init__(self, path: str | os.PathLike[str], *, refresh_margin: float = 0) -> None:
        self.path = Path(path)
        super().__init__(f"token file {self.path}", refresh_margin=refresh_margin, cache_seconds=0)
        self._identity: tuple[int, int, int, int] | None = None

    def _fresh(self, now: float) -> bool:
        if self.last_error is not None and now < self._valid_until:
            return True  # the last read failed: keep the unexpired token until the retry
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # _fetch reports it
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return identity == self._identity and (
            self._expires_at is None or now < self._expires_at - self.refresh_margin
        )

    def _fetch(self) -> str:
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                data = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise TokenSourceError(f"{self.description}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_TOKEN_BYTES:
            raise TokenSourceError(f"{self.description}: larger than {MAX_TOKEN_BYTES} bytes")
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            return data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise TokenSourceError(f"{self.description}: is not ASCII text") from None


class CommandTokenSource(TokenSource):
    """A command that prints a token on stdout (``gcloud auth print-identity-token``,
    ``az account get-access-token --query accessToken -o tsv``, ``vault read -field=token``).

    Run without a shell, with stdin closed and a ``timeout``; its token is reused until
    ``refresh_margin`` seconds before its ``exp`` (or for ``cache_seconds`` if it has none).
    A non-zero exit, a timeout or an empty output raises :class:`TokenSourceError` with the
    command's name and the last line of its stderr (anything shaped like a token removed).
    """

    def __init__(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 30,
        refresh_margin: float = 60,
        cache_seconds: float = 300,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if not self.argv:
            raise ValueError("empty command")
        self.timeout = timeout
        self.env = dict(env) if env is not None else None
        super().__init__(
            f"token command {self.argv[0]!r}",
            refresh_margin=refresh_margin,
            cache_seconds=cache_seconds,
        )

    def _fetch(self) -> str:
        try:
            done = subprocess.run(  # noqa: S603 - the application's own configured command
                self.argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TokenSourceError(
                f"{self.description}: did not finish within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise TokenSourceError(f"{self.description}: cannot run: {exc.strerror}") from None
        if done.returncode != 0:
            stderr = _redact(done.stderr.decode("utf-8", "replace"))
            raise TokenSourceError(
                f"{self.description}: exited with status {done.returncode}"
                + (f": {stderr}" if stderr else "")
            )
        lines = [line for line in done.stdout.decode("ascii", "replace").splitlines() if line]
        if len(lines) != 1:
            raise TokenSourceError(
                f"{self.description}: printed {len(lines)} lines on stdout, expected one token"
            )
        return lines[0].strip()


class PrivateKeyTokenSource(TokenSource):
    """Mint tokens locally with a private key the service holds (see :func:`mint_token`).

    Each token lives ``ttl`` seconds and is reused until ``refresh_margin`` seconds before it
    expires (default: a third of ``ttl``), so a connection opened with it has at least that
    long before the token expires."""

    def __init__(
        self,
        key: SigningKey | bytes | str | os.PathLike[str],
        sub: str,
        *,
        ttl: float = 300,
        refresh_margin: float | None = None,
        algorithm: str | None = None,
        kid: str | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least 1 second")
        if isinstance(key, bytes):
            description, self.key = "private key (PEM)", load_private_key(key, name="key")
        elif isinstance(key, str | os.PathLike):
            path = Path(key)
            description = f"private key {path}"
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise TokenSourceError(f"{description}: cannot read: {exc.strerror}") from None
            self.key = load_private_key(pem, name=str(path))
        else:
            description, self.key = "private key", key
        self.sub, self.ttl = sub, ttl
        self.algorithm, self.kid = algorithm, kid
        self.claims = dict(claims or {})
        margin = ttl / 3 if refresh_margin is None else refresh_margin
        if margin >= ttl:
            raise ValueError("refresh_margin must be below ttl")
        super().__init__(f"{description} (sub={sub!r})", refresh_margin=margin, cache_seconds=0)

    def _fetch(self) -> str:
        try:
            return mint_token(
                self.key,
                self.sub,
                self.ttl,
                algorithm=self.algorithm,
                kid=self.kid,
                claims=self.claims,
            )
        except Exception as exc:  # PyJWT/cryptography: wrong algorithm for the key, ...
            raise TokenSourceError(f"{self.description}: cannot sign: {exc}") from None


def token_source_from_env(
    environ: Mapping[str, str] | None = None, *, default_sub: str | None = None
) -> TokenSource:
    """The source configured by environment variables (the recipes use this), exactly one of:

    ``JWTPG_TOKEN_FILE``      path of a token file kept fresh by something else;
    ``JWTPG_TOKEN_COMMAND``   a command line (split like a POSIX shell, run without one);
    ``JWTPG_PRIVATE_KEY``     path of a PEM private key: mint locally, ``sub`` from
                              ``JWTPG_SUB`` (default: ``PGUSER``), lifetime ``JWTPG_TTL``
                              seconds (default 300), algorithm ``JWTPG_ALG``, ``JWTPG_KID``;
    ``JWTPG_TOKEN``           one fixed token.

    ``JWTPG_REFRESH_MARGIN`` (seconds, default 60 for a file or a command, a third of the
    lifetime for a key): a new connection gets a token with at least that long left.
    """
    env = os.environ if environ is None else environ
    chosen = [n for n in _ENV_KINDS if env.get(n)]
    if len(chosen) != 1:
        raise ConfigError(
            f"set exactly one of {', '.join(_ENV_KINDS)} (found {', '.join(chosen) or 'none'})"
        )
    margin_text = env.get("JWTPG_REFRESH_MARGIN")
    margin = float(margin_text) if margin_text else None
    name = chosen[0]
    value = env[name]
    if name == "JWTPG_TOKEN_FILE":
        return FileTokenSource(value, refresh_margin=60 if margin is None else margin)
    if name == "JWTPG_TOKEN_COMMAND":
        return CommandTokenSource(value, refresh_margin=60 if margin is None else margin)
    if name == "JWTPG_PRIVATE_KEY":
        sub = env.get("JWTPG_SUB") or env.get("PGUSER") or default_sub
        if not sub:
            raise ConfigError("JWTPG_PRIVATE_KEY needs JWTPG_SUB or PGUSER (the role)")
        return PrivateKeyTokenSource(
            value,
            sub,
            ttl=float(env.get("JWTPG_TTL") or 300),
            refresh_margin=margin,
            algorithm=env.get("JWTPG_ALG") or None,
            kid=env.get("JWTPG_KID") or None,
        )
    return StaticTokenSource(value, description="JWTPG_TOKEN")


_ENV_KINDS = ("JWTPG_TOKEN_FILE", "JWTPG_TOKEN_COMMAND", "JWTPG_PRIVATE_KEY", "JWTPG_TOKEN")
