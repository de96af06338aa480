"""The claim policy: what a token with a valid signature must say to be let in. No I/O.

:class:`ClaimPolicy` is a frozen value built once from the settings; :meth:`ClaimPolicy.evaluate`
is a pure function of the (already signature-checked) claims, the startup user and database,
and an explicit clock. It either returns a :class:`PolicyDecision` or raises
:class:`TokenRejected` with a :class:`Rejection` code -- one code per rule, from a small fixed
set that is safe as a metrics label. Details name the rule and the claim, never a claim's value
beyond what the operator configured, and never the token.

The vocabulary of refusal, :class:`Rejection`, lives here; the exception carrying it,
:class:`jwtpgproxy.errors.TokenRejected`, lives in the one error tree.

Defaults reproduce the behaviour before policies existed: ``exp`` and ``sub`` required, ``sub``
equals the startup user, a token carrying ``aud`` is refused (RFC 7519 4.1.3: a recipient that
does not identify itself with a value in ``aud`` MUST reject the token).
"""

from __future__ import annotations

import enum
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from ..errors import ConfigError, TokenRejected


class Rejection(enum.StrEnum):
    """Why a token was refused: a small fixed set (safe as a log field or metric label)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    ALGORITHM = "algorithm"
    UNKNOWN_KID = "unknown_kid"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    CLAIMS = "claims"
    AUDIENCE = "audience"
    SUBJECT_MISMATCH = "subject_mismatch"
    ISSUER = "issuer"
    TENANT = "tenant"
    SCOPE = "scope"
    DATABASE = "database"
    LIFETIME = "lifetime"
    REVOKED = "revoked"


#: NumericDate bound: a float holds every integer up to 2**53 exactly; anything larger is no
#: date (and Python's int-to-float conversion of e.g. 10**400 would raise OverflowError).
MAX_NUMERIC_DATE = 2**53


def is_numeric_date(value: object) -> TypeGuard[int | float]:
    """A JSON number usable as a NumericDate (RFC 7519 section 2): not a bool, not a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # Also false for NaN and infinities; compares ints exactly, without float conversion.
    return abs(value) <= MAX_NUMERIC_DATE


def check_claim_types(claims: Mapping[str, Any], role_claim: str = "sub") -> None:
    """``exp``/``nbf``/``iat`` are JSON numbers (PyJWT accepts numeric strings), ``sub``,
    ``jti`` and the role claim strings; raise TokenRejected otherwise."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and not is_numeric_date(claims[name]):
            raise TokenRejected(Rejection.CLAIMS, f"claim {name!r} is not a number")
    for name in {role_claim, "sub", "jti"}:
        if name in claims and not isinstance(claims[name], str):
            raise TokenRejected(Rejection.CLAIMS, f"claim {name[:40]!r} is not a string")


def parse_scopes(value: object) -> frozenset[str]:
    """Scopes from a claim: a space-separated string (RFC 8693 4.2, RFC 9068 2.2.3) or a JSON
    array of strings (as Okta's ``scp`` and some other issuers send). Raise ValueError
    otherwise."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(item for item in value if item)
    raise ValueError("neither a space-separated string nor an array of strings")


def _equal_utf8(a: str, b: str) -> bool:
    """Constant-time equality of the UTF-8 encodings. A string holding a lone surrogate
    (JSON allows the escape ``"\\udc80"``, RFC 8259 8.2) has no UTF-8 form, so it equals
    nothing -- in particular not a user name that PostgreSQL could receive."""
    try:
        left, right = a.encode("utf-8"), b.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(left, right)


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """What an accepted token grants."""

    role: str
    #: The token carries :attr:`ClaimPolicy.read_only_scope`: the session should start
    #: upstream with ``default_transaction_read_only=on``.
    read_only: bool
    #: When this token stops being accepted: ``exp``, or ``iat + max_age_seconds`` for a
    #: token without ``exp`` (only possible with ``require_exp=False``). Always set, so a
    #: session can always be ended when its token lapses.
    expires_at: float


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """Every claim rule; the defaults are the behaviour before policies were configurable.

    ``databases_claim``: when set, the claim is *required* (a token without it is refused)
    and must be a string or an array of strings, one of which equals the startup database
    exactly. Treating an absent claim as "any database" would silently widen every token an
    issuer mints before it learns to add the claim; refusing is the fail-closed choice.
    """

    #: ``iss`` must be a string equal to this (RFC 7519 4.1.1; exact, case-sensitive).
    issuer: str | None = None
    #: ``aud`` (a string or an array of strings) must contain this (RFC 7519 4.1.3).
    audience: str | None = None
    #: With no ``audience``, accept tokens that carry ``aud`` anyway (not recommended).
    ignore_audience: bool = False
    #: The claim naming the database role; compared byte for byte with the startup user.
    role_claim: str = "sub"
    tenant_claim: str | None = None
    tenant: str | None = None
    scope_claim: str = "scope"
    required_scopes: frozenset[str] = field(default_factory=frozenset)
    read_only_scope: str | None = None
    databases_claim: str | None = None
    #: ``exp - iat`` may not exceed this (so an issuer bug cannot mint year-long tokens).
    max_lifetime_seconds: float | None = None
    require_exp: bool = True
    #: For tokens without ``exp`` (``require_exp=False``): ``now - iat`` may not exceed this.
    max_age_seconds: float | None = None
    required_claims: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        # Accept any iterable of strings for the set-valued fields (e.g. a list from config).
        for name in ("required_scopes", "required_claims"):
            value = getattr(self, name)
            if not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))

    def validate(self) -> ClaimPolicy:
        """Refuse contradictory or unusable settings; return self. A :class:`ConfigError`
        names the offending field in its ``setting`` (e.g. ``max_age_seconds``)."""

        def nonempty(value: str | None, name: str) -> None:
            if value is not None and (not value or value != value.strip()):
                raise ConfigError("must be non-empty, without surrounding spaces", setting=name)

        nonempty(self.issuer, "issuer")
        nonempty(self.audience, "audience")
        nonempty(self.role_claim, "role_claim")
        nonempty(self.tenant_claim, "tenant_claim")
        nonempty(self.scope_claim, "scope_claim")
        nonempty(self.databases_claim, "databases_claim")
        if self.audience is not None and self.ignore_audience:
            raise ConfigError("cannot be set together with an audience", setting="ignore_audience")
        if (self.tenant_claim is None) != (self.tenant is None):
            raise ConfigError("tenant and tenant_claim go together", setting="tenant")
        for name, scopes in (
            ("required_scopes", self.required_scopes),
            (
                "read_only_scope",
                frozenset() if self.read_only_scope is None else {self.read_only_scope},
            ),
        ):
            for scope in scopes:
                if not scope or any(c.isspace() for c in scope):
                    raise ConfigError("a scope must be non-empty without spaces", setting=name)
        for claim in self.required_claims:
            if not claim:
                raise ConfigError("claim names must be non-empty", setting="required_claims")
        for name, seconds in (
            ("max_lifetime_seconds", self.max_lifetime_seconds),
            ("max_age_seconds", self.max_age_seconds),
        ):
            if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
                raise ConfigError("must be a positive number of seconds", setting=name)
        if not self.require_exp and self.max_age_seconds is None:
            raise ConfigError(
                "required when exp is not required (a token without exp must still age out)",
                setting="max_age_seconds",
            )
        return self

    # --- Evaluation ---------------------------------------------------------------------

    def evaluate(
        self,
        claims: Mapping[str, Any],
        *,
        user: str,
        database: str | None = None,
        now: float,
        leeway: float = 0.0,
    ) -> PolicyDecision:
        """Apply every rule to signature-checked ``claims`` for startup ``user``/``database``.

        ``database=None`` means the client sent none: PostgreSQL then uses the user name
        (protocol 55.7, StartupMessage), so that is what is checked. ``leeway`` is the clock
        skew allowed for ``exp``/``nbf``/``iat`` and the maximum age (RFC 7519 4.1.4-4.1.6).
        Raise :class:`TokenRejected`; the first failing rule wins, in this order: claim
        presence and types, times, lifetime, issuer, audience, role, tenant, scopes,
        databases.
        """
        self._check_presence_and_types(claims)
        expires_at = self._check_times(claims, now, leeway)
        self._check_lifetime(claims)
        self._check_issuer(claims)
        self._check_audience(claims)
        role = claims[self.role_claim]
        # Exact, byte-for-byte, and in constant time.
        if not _equal_utf8(role, user):
            raise TokenRejected(
                Rejection.SUBJECT_MISMATCH, f"{self.role_claim} does not equal startup user"
            )
        self._check_tenant(claims)
        read_only = self._check_scopes(claims)
        self._check_databases(claims, user if database is None else database)
        return PolicyDecision(role=role, read_only=read_only, expires_at=expires_at)

    def _check_presence_and_types(self, claims: Mapping[str, Any]) -> None:
        required = [self.role_claim, *sorted(self.required_claims)]
        if self.require_exp:
            required.insert(0, "exp")
        for name in required:
            if name not in claims:
                raise TokenRejected(Rejection.CLAIMS, f"required claim {name[:40]!r} missing")
        check_claim_types(claims, self.role_claim)

    def _check_times(self, claims: Mapping[str, Any], now: float, leeway: float) -> float:
        """RFC 7519 4.1.4-4.1.6 with the leeway; return when the token lapses."""
        if "exp" in claims:
            expires_at = float(claims["exp"])
            if now >= expires_at + leeway:
                raise TokenRejected(Rejection.EXPIRED, "token has expired")
        else:
            # Only reachable with require_exp=False, which validate() ties to max_age_seconds.
            if "iat" not in claims or self.max_age_seconds is None:
                raise TokenRejected(Rejection.CLAIMS, "token without exp needs iat")
            expires_at = float(claims["iat"]) + self.max_age_seconds
            if now >= expires_at + leeway:
                raise TokenRejected(Rejection.EXPIRED, "token without exp is older than max age")
        if "nbf" in claims and now + leeway < claims["nbf"]:
            raise TokenRejected(Rejection.NOT_YET_VALID, "token not yet valid (nbf)")
        if "iat" in claims and now + leeway < claims["iat"]:
            raise TokenRejected(Rejection.NOT_YET_VALID, "token issued in the future (iat)")
        return expires_at

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        limit = self.max_lifetime_seconds
        if limit is None or "exp" not in claims:
            return  # without exp, max_age_seconds bounds the lifetime instead
        if "iat" not in claims:
            raise TokenRejected(Rejection.LIFETIME, "iat required to check the token lifetime")
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > limit:
            raise TokenRejected(
                Rejection.LIFETIME, f"lifetime {lifetime:.0f}s exceeds the maximum {limit:.0f}s"
            )

    def _check_issuer(self, claims: Mapping[str, Any]) -> None:
        if self.issuer is None:
            return
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer != self.issuer:
            what = "missing" if issuer is None else "not the configured issuer"
            raise TokenRejected(Rejection.ISSUER, f"iss {what}")

    def _check_audience(self, claims: Mapping[str, Any]) -> None:
        if "aud" not in claims:
            if self.audience is not None:
                raise TokenRejected(Rejection.AUDIENCE, "aud missing")
            return
        if self.audience is None:
            if self.ignore_audience:
                return
            raise TokenRejected(Rejection.AUDIENCE, "token has aud but no audience is configured")
        audience = claims["aud"]
        # RFC 7519 4.1.3: a string, or an array of strings.
        values = [audience] if isinstance(audience, str) else audience
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise TokenRejected(Rejection.AUDIENCE, "aud is not a string or array of strings")
        if self.audience not in values:
            raise TokenRejected(Rejection.AUDIENCE, "aud does not contain the configured audience")

    def _check_tenant(self, claims: Mapping[str, Any]) -> None:
        if self.tenant_claim is None or self.tenant is None:
            return
        value = claims.get(self.tenant_claim)
        if not isinstance(value, str) or value != self.tenant:
            what = "missing" if value is None else "not the configured tenant"
            raise TokenRejected(Rejection.TENANT, f"claim {self.tenant_claim[:40]!r} {what}")

    def _check_scopes(self, claims: Mapping[str, Any]) -> bool:
        """Required scopes all present; return whether the read-only scope is."""
        if not self.required_scopes and self.read_only_scope is None:
            return False
        name = self.scope_claim[:40]
        if self.scope_claim not in claims:
            if self.required_scopes:
                raise TokenRejected(Rejection.SCOPE, f"claim {name!r} missing")
            return False
        try:
            scopes = parse_scopes(claims[self.scope_claim])
        except ValueError as exc:
            raise TokenRejected(Rejection.SCOPE, f"claim {name!r} is {exc}") from None
        missing = self.required_scopes - scopes
        if missing:
            # The missing names are configuration, not token content: safe to log.
            shown = " ".join(sorted(missing))[:200]
            raise TokenRejected(Rejection.SCOPE, f"required scope(s) missing: {shown}")
        return self.read_only_scope is not None and self.read_only_scope in scopes

    def _check_databases(self, claims: Mapping[str, Any], database: str) -> None:
        if self.databases_claim is None:
            return
        name = self.databases_claim[:40]
        if self.databases_claim not in claims:
            raise TokenRejected(Rejection.DATABASE, f"claim {name!r} missing")
        value = claims[self.databases_claim]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise TokenRejected(
                Rejection.DATABASE, f"claim {name!r} is not a string or array of strings"
            )
        if database not in values:
            raise TokenRejected(Rejection.DATABASE, f"startup database not in claim {name!r}")
