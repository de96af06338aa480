"""Verification keys from a JWKS (RFC 7517): a file, a URL, or an OIDC issuer's discovery.

:func:`parse_jwks` is pure: a JWKS document in, :class:`VerificationKey`\\ s out, with the same
rules as configured PEM keys (:func:`jwtpgproxy.auth.tokens.algorithms_for_key`: RSA >= 2048 bits,
EC P-256/P-384/P-521, Ed25519/Ed448) plus what a JWK can say about itself:

* ``alg`` restricts the key to that one algorithm (a key whose ``alg`` does not fit its type
  is skipped) -- RFC 8725 3.1 "each key MUST be used with exactly one algorithm";
* ``use`` other than ``sig``, and ``key_ops`` without ``verify``, are skipped (RFC 7517 4.2,
  4.3): an encryption key must not verify signatures;
* symmetric ``oct`` keys are *never* taken from a JWKS (a published key is no secret), nor
  keys carrying private members (``d``...): a JWKS is public by definition, so either is a
  mistake on the issuer's side;
* unsupported or malformed keys are skipped with a reason, not fatal, so one exotic key in
  a provider's set does not lock everybody out; duplicate ``kid``\\ s keep the first key.

:class:`JwksKeySource` keeps the current key set for :class:`jwtpgproxy.auth.tokens.TokenVerifier`
(it satisfies :class:`jwtpgproxy.auth.tokens.KeySource`): one fetch at :meth:`~JwksKeySource.start`,
a background refresh, and rate-limited refetches when tokens name an unknown ``kid``. HTTP is
the stdlib's urllib in a worker thread, with a size cap, a total deadline, http/https only,
plain http only to loopback unless allowed, and no redirect to another scheme or from https
down to http. Header-supplied key locations (``jku``, ``x5u``) are never used: the location
is configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPMessage
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ..errors import ConfigError, JwksError
from ..logs import event
from .tokens import PUBLIC_KEY_TYPES, VerificationKey, algorithms_for_key

log = logging.getLogger("jwtpgproxy.jwks")

#: Largest JWKS or discovery document read; reading stops one byte beyond.
MAX_DOCUMENT_BYTES = 1024 * 1024
#: Keys considered per document; real providers publish a handful.
MAX_KEYS = 100
_MAX_REDIRECTS = 5
#: Members that only a private or symmetric JWK has (RFC 7518 6.2.2, 6.3.2, 6.4.1; RFC 8037).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_USER_AGENT = "jwt-postgresql-proxy (JWKS fetch)"


@dataclass(frozen=True, slots=True)
class JwksParseResult:
    keys: tuple[VerificationKey, ...]
    #: One log line per key not used: which one and why.
    skipped: tuple[str, ...]


# --- Parsing ------------------------------------------------------------------------------


class _Skip(Exception):
    pass


def _label(source: str, index: int, kid: str | None) -> str:
    if kid is None:
        return f"{source}[{index}]"
    shown = kid if len(kid) <= 64 and kid.isprintable() else repr(kid[:64])
    return f"{source}[kid={shown}]"


def jwk_to_key(jwk: object, *, name: str) -> VerificationKey:
    """One JWK (a parsed JSON object) as a VerificationKey named ``name``; raise ValueError
    with the reason when it must not or cannot be used."""
    try:
        return _jwk_to_key(jwk, name)
    except _Skip as exc:
        raise ValueError(str(exc)) from None


def _jwk_to_key(jwk: object, name: str) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise _Skip("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _Skip("kid is not a string")
    kty = jwk.get("kty")
    if not isinstance(kty, str):
        raise _Skip("kty missing or not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise _Skip(f"use {str(use)[:20]!r} is not 'sig'")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _Skip("key_ops does not include 'verify'")
    if kty == "oct":
        raise _Skip("symmetric (oct) keys are never accepted from a JWKS")
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise _Skip("contains private key material; a JWKS must hold public keys only")
    loaders: dict[str, Callable[[dict[str, Any]], object]] = {
        "RSA": RSAAlgorithm.from_jwk,
        "EC": ECAlgorithm.from_jwk,
        "OKP": OKPAlgorithm.from_jwk,
    }
    loader = loaders.get(kty)
    if loader is None:
        raise _Skip(f"unsupported kty {kty[:20]!r}")
    try:
        key = loader(jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise _Skip(f"invalid {kty} key ({str(exc)[:100]})") from None
    if not isinstance(key, PUBLIC_KEY_TYPES):
        raise _Skip(f"unsupported key type {type(key).__name__}")
    try:
        algorithms = algorithms_for_key(key, name)
    except ConfigError as exc:
        raise _Skip(str(exc).removeprefix(f"{name}: ")) from None
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in algorithms:
            raise _Skip(f"alg {str(alg)[:20]!r} cannot be used with this {kty} key")
        algorithms = frozenset({alg})
    return VerificationKey(name, key, algorithms, kid)


def parse_jwks(
    document: bytes | str | Mapping[str, Any], *, source: str, location: str | None = None
) -> JwksParseResult:
    """The usable signature keys of a JWKS document; raise :class:`JwksError` (naming
    ``location``, default ``source``) when the document itself is unusable (not JSON, no
    ``keys`` array). Keys are named ``<source>[kid=<kid>]`` (or ``<source>[<index>]`` without
    a kid) for the logs."""
    where = source if location is None else location
    if isinstance(document, Mapping):
        parsed: object = document
    else:
        try:
            text = document.decode("utf-8") if isinstance(document, bytes) else document
            parsed = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise JwksError(f"{where}: not a JSON document ({str(exc)[:100]})") from None
    if not isinstance(parsed, Mapping) or not isinstance(parsed.get("keys"), list):
        raise JwksError(f"{where}: not a JWKS (a JSON object with a 'keys' array)")
    entries: list[object] = parsed["keys"]
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    kids: set[str] = set()
    if len(entries) > MAX_KEYS:
        skipped.append(f"{source}: {len(entries) - MAX_KEYS} key(s) beyond the first {MAX_KEYS}")
    for index, entry in enumerate(entries[:MAX_KEYS]):
        raw_kid = entry.get("kid") if isinstance(entry, dict) else None
        kid = raw_kid if isinstance(raw_kid, str) else None
        name = _label(source, index, kid)
        try:
            key = _jwk_to_key(entry, name)
        except _Skip as exc:
            skipped.append(f"{name}: skipped: {exc}")
            continue
        if key.kid is not None:
            if key.kid in kids:
                skipped.append(f"{name}: skipped: duplicate kid (the first key with it is used)")
                continue
            kids.add(key.kid)
        keys.append(key)
    return JwksParseResult(tuple(keys), tuple(skipped))


def _fingerprint(keys: tuple[VerificationKey, ...]) -> tuple[tuple[object, ...], ...]:
    return tuple(
        (
            k.name,
            k.kid,
            tuple(sorted(k.algorithms)),
            k.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        )
        for k in keys
    )


# --- Fetching -----------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without user:password@ (for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_http: bool = False) -> str:
    """Return ``url`` if it may be fetched: https, or http to a loopback host (or any host
    with ``allow_http``: plain http lets anyone on the path substitute the keys). Raise
    ValueError with the reason otherwise."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"invalid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise ValueError("only http:// and https:// URLs with a host are allowed")
    if scheme == "http" and not allow_http and not _is_loopback(host):
        raise ValueError("plain http is allowed only to a loopback address; use https")
    return url


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most a few redirects, to http(s) only, never from https down to http."""

    max_redirections = _MAX_REDIRECTS

    def __init__(self, allow_http: bool) -> None:
        self.allow_http = allow_http

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        reason = None
        try:
            check_url(newurl, allow_http=self.allow_http)
        except ValueError as exc:
            reason = str(exc)
        if reason is None and (
            urlsplit(req.full_url).scheme.lower() == "https"
            and urlsplit(newurl).scheme.lower() != "https"
        ):
            reason = "redirect from https to http"
        if reason is not None:
            raise urllib.error.HTTPError(
                redact_url(newurl), code, f"refused redirect: {reason}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(
    url: str,
    *,
    timeout: float = 10.0,
    max_bytes: int = MAX_DOCUMENT_BYTES,
    ssl_context: ssl.SSLContext | None = None,
    allow_http: bool = False,
) -> bytes:
    """GET ``url`` and return the body (blocking; run it in a thread). Raise
    :class:`JwksError` naming the redacted URL on any failure: not 200, larger than
    ``max_bytes``, slower than ``timeout`` seconds in total, refused scheme or redirect."""
    shown = redact_url(url)
    try:
        check_url(url, allow_http=allow_http)
    except ValueError as exc:
        raise JwksError(f"{shown}: {exc}") from None
    deadline = time.monotonic() + timeout
    opener = urllib.request.OpenerDirector()
    # Proxies from the environment apply, except to loopback addresses.
    proxies: dict[str, str] | None = {} if _is_loopback(urlsplit(url).hostname) else None
    for handler in (
        urllib.request.ProxyHandler(proxies),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=ssl_context or ssl.create_default_context()),
        _Redirects(allow_http),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    request = urllib.request.Request(  # noqa: S310 (scheme checked above)
        url, headers={"Accept": "application/json", "User-Agent": _USER_AGENT}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            status = response.status
            if status != 200:
                raise JwksError(f"{shown}: HTTP status {status}, expected 200")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise JwksError(f"{shown}: document larger than {max_bytes} bytes")
            body = bytearray()
            while len(body) <= max_bytes:
                if time.monotonic() > deadline:
                    raise JwksError(f"{shown}: timed out after {timeout:g}s")
                chunk = response.read1(min(65536, max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
    except urllib.error.HTTPError as exc:
        raise JwksError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise JwksError(f"{shown}: {exc.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise JwksError(f"{shown}: {type(exc).__name__}: {exc}") from None
    if len(body) > max_bytes:
        raise JwksError(f"{shown}: document larger than {max_bytes} bytes")
    return bytes(body)


def read_file(path: str | os.PathLike[str], *, max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """Read a local JWKS file with the same size cap (blocking). Raise JwksError."""
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise JwksError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise JwksError(f"{path}: document larger than {max_bytes} bytes")
    return data


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 section 4: the issuer with any terminating "/" removed,
    then "/.well-known/openid-configuration"."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def jwks_uri_from_discovery(document: bytes, *, issuer: str, allow_http: bool = False) -> str:
    """The ``jwks_uri`` of a discovery document whose ``issuer`` is exactly ``issuer``
    (OIDC Discovery 4.3: it MUST be identical, else the document MUST NOT be used)."""
    shown = redact_url(discovery_url(issuer))
    try:
        parsed = json.loads(document.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JwksError(f"{shown}: not a JSON document") from None
    if not isinstance(parsed, dict):
        raise JwksError(f"{shown}: not a JSON object")
    if parsed.get("issuer") != issuer:
        raise JwksError(f"{shown}: its issuer is not the configured issuer {issuer!r}")
    uri = parsed.get("jwks_uri")
    if not isinstance(uri, str):
        raise JwksError(f"{shown}: no jwks_uri")
    try:
        return check_url(uri, allow_http=allow_http)
    except ValueError as exc:
        raise JwksError(f"{shown}: jwks_uri refused: {exc}") from None


# --- The key source -----------------------------------------------------------------------


class JwksKeySource:
    """The current keys of one JWKS location, kept fresh in the background.

    Exactly one of ``file``, ``url`` or ``issuer`` (OIDC discovery on every fetch, so a
    changed ``jwks_uri`` is followed). ``name`` labels the keys and errors (the caller's
    name for this source, e.g. the setting that configured it). Life cycle::

        source = JwksKeySource(url="https://issuer.example/jwks.json", name="issuer JWKS")
        await source.start()        # one fetch; JwksError if it fails or yields no key
        verifier = TokenVerifier(..., key_source=source)
        ...
        await source.close()

    A refresh that fails, or yields only unusable keys, keeps the previous key set (an
    issuer's outage must not lock everybody out), records :attr:`last_error` and logs it;
    the next attempt is ``min_refetch_seconds`` later (at most ``refresh_seconds``) -- but
    keys last fetched more than ``max_staleness_seconds`` ago are dropped (None: never), so
    keys an issuer withdrew do not stay trusted for ever behind a source that fails. A
    document whose ``keys`` array is empty is not a failure: it is how an issuer revokes
    every key at once, and the key set becomes empty. :attr:`keys` is
    replaced by a new tuple only when the set actually changed, so ``keys is old`` tells a
    caller whether a refetch brought anything new.
    """

    def __init__(
        self,
        *,
        file: str | os.PathLike[str] | None = None,
        url: str | None = None,
        issuer: str | None = None,
        name: str = "JWKS",
        refresh_seconds: float = 300.0,
        min_refetch_seconds: float = 30.0,
        timeout: float = 10.0,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        allow_http: bool = False,
        max_staleness_seconds: float | None = 86400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        given = [v for v in (file, url, issuer) if v is not None]
        if len(given) != 1:
            raise ConfigError(f"{name}: exactly one of a JWKS file, URL or OIDC issuer")
        if not refresh_seconds > 0 or not min_refetch_seconds >= 0 or not timeout > 0:
            raise ConfigError(f"{name}: refresh, refetch and timeout seconds must be positive")
        if max_staleness_seconds is not None and not max_staleness_seconds > refresh_seconds:
            raise ConfigError(
                f"{name}: the maximum staleness must exceed the refresh interval "
                f"({refresh_seconds:g}s), or keys would be dropped between two refreshes",
                setting="max_staleness_seconds",
            )
        for value in (url, issuer):
            if value is not None:
                try:
                    check_url(value, allow_http=allow_http)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {redact_url(value)}: {exc}") from None
        self.file = None if file is None else Path(file)
        self.url = url
        self.issuer = issuer
        self.name = name
        self.refresh_seconds = refresh_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.ssl_context = ssl_context
        self.allow_http = allow_http
        self.max_staleness_seconds = max_staleness_seconds
        self._clock = clock
        #: When the last fetch succeeded (clock time), None before the first.
        self._last_success: float | None = None
        self._dropped_stale = False

        self._keys: tuple[VerificationKey, ...] = ()
        self._fingerprint: tuple[tuple[object, ...], ...] = ()
        #: Why the last attempt failed (None if it succeeded), for logs and health checks.
        self.last_error: str | None = None
        #: Why keys of the last good document were not used.
        self.skipped: tuple[str, ...] = ()
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def location(self) -> str:
        """Where the keys come from (credential-free), for logs."""
        if self.file is not None:
            return str(self.file)
        if self.url is not None:
            return redact_url(self.url)
        assert self.issuer is not None
        return f"{redact_url(self.issuer)} (OIDC discovery)"

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """The current key set (an immutable snapshot); empty once stale."""
        if self._stale():
            return ()
        return self._keys

    def _stale(self) -> bool:
        return (
            self.max_staleness_seconds is not None
            and self._last_success is not None
            and self._clock() - self._last_success > self.max_staleness_seconds
        )

    async def start(self) -> None:
        """Fetch once and start the background refresh. Raise :class:`JwksError` (naming the
        location) when that first fetch fails or yields no usable key."""
        if not await self.refresh():
            raise JwksError(f"{self.name}: {self.last_error}")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"jwks refresh {self.name}")

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch in flight; True if it succeeded. Never raises for
        fetch problems (see :attr:`last_error`). Use it on SIGHUP, or once in a CLI."""
        task = self._inflight
        if task is None:
            self._last_attempt = self._clock()
            task = asyncio.create_task(self._fetch_and_swap(), name=f"jwks fetch {self.name}")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        # Shielded: a cancelled caller (a client that hung up) does not cancel the fetch
        # other callers are waiting for.
        return await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def refresh_for_unknown_kid(self) -> bool:
        """A token named a kid no current key has: refetch, unless a fetch started less than
        ``min_refetch_seconds`` ago -- however many such tokens arrive, concurrent callers
        share one fetch and later ones within the interval get none (no refetch storm from
        junk tokens with random kids). True if a fetch was made or joined and succeeded."""
        if (
            self._inflight is None
            and self._last_attempt is not None
            and self._clock() - self._last_attempt < self.min_refetch_seconds
        ):
            return False
        return await self.refresh()

    async def close(self) -> None:
        """Stop the background refresh (an in-flight fetch thread ends at its timeout)."""
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self._inflight = None

    async def _run(self) -> None:
        while True:
            interval = self.refresh_seconds
            if self.last_error is not None:  # retry sooner after a failure
                interval = min(interval, max(self.min_refetch_seconds, 1.0))
            last = self._last_attempt
            delay = interval if last is None else last + interval - self._clock()
            await asyncio.sleep(min(max(delay, 0.0), interval))
            # A fetch made meanwhile (an unknown kid, SIGHUP) restarts the period.
            if self._last_attempt == last:
                await self.refresh()

    async def _fetch_and_swap(self) -> bool:
        try:
            document = await self._fetch_document()
            result = parse_jwks(document, source=self.name, location=self.location)
            if not result.keys and result.skipped:
                # Keys listed, none usable: more likely a problem than a decision.
                reasons = "; ".join(result.skipped[:5])
                raise JwksError(f"{self.location}: no usable signature key ({reasons})")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # JwksError, or a bug: never kill the refresher
            message = (
                str(exc)
                if isinstance(exc, JwksError)
                else (f"{self.location}: unexpected {type(exc).__name__}: {exc}")
            )
            stale = self._stale()
            if message != self.last_error and not stale:
                event(
                    log,
                    WARNING,
                    "JWKS fetch failed: keeping the previous keys",
                    source=self.name,
                    keys=len(self._keys),
                    error=message,
                )
            if stale and not self._dropped_stale:
                self._dropped_stale = True
                event(
                    log,
                    ERROR,
                    "JWKS keys dropped: no successful fetch within the maximum staleness",
                    source=self.name,
                    keys=len(self._keys),
                    max_staleness=f"{self.max_staleness_seconds:g}s",
                    error=message,
                )
            self.last_error = message
            return False
        first = self._last_success is None
        self._last_success = self._clock()
        if self._dropped_stale:
            self._dropped_stale = False
            event(log, INFO, "JWKS keys fetched again after being dropped", source=self.name)
        if not result.keys and (first or self._keys):
            # An issuer's emergency revocation of every key: honoured, loudly.
            event(
                log,
                WARNING,
                "JWKS lists no keys: every token this source would verify is refused",
                source=self.name,
                location=self.location,
            )
        fingerprint = _fingerprint(result.keys)
        if fingerprint != self._fingerprint:
            if self._keys:
                event(log, INFO, "JWKS key set changed", source=self.name, keys=len(result.keys))
            self._keys = result.keys
            self._fingerprint = fingerprint
        if result.skipped != self.skipped:
            for line in result.skipped:
                event(log, WARNING, "JWKS key skipped", source=self.name, detail=line)
        self.skipped = result.skipped
        self.last_error = None
        return True

    async def _fetch_document(self) -> bytes:
        if self.file is not None:
            return await asyncio.to_thread(read_file, self.file, max_bytes=self.max_bytes)
        url = self.url
        if url is None:
            assert self.issuer is not None
            discovery = await asyncio.to_thread(self._get, discovery_url(self.issuer))
            url = jwks_uri_from_discovery(discovery, issuer=self.issuer, allow_http=self.allow_http)
        return await asyncio.to_thread(self._get, url)

    def _get(self, url: str) -> bytes:
        return fetch_url(
            url,
            timeout=self.timeout,
            max_bytes=self.max_bytes,
            ssl_context=self.ssl_context,
            allow_http=self.allow_http,
        )
