"""JWT verification: keys, HMAC secrets, signature, then the claim policy. No I/O in verify().

Signatures are checked by PyJWT (:class:`jwt.PyJWS`) with an explicit algorithm allow-list
(DESIGN.md principle 9); the claims are checked by :class:`~jwtpgproxy.auth.policy.ClaimPolicy`, a
pure function. Around them, this module adds what PyJWT leaves to the caller, following
RFC 8725 ("JWT Best Current Practices"):

* every algorithm is accepted only with a key of the matching type (3.1, 3.2): EdDSA/RS*/PS*/
  ES* only with public keys, HS* only with secrets configured explicitly *as HMAC secrets*
  (:class:`HmacSecret`) -- so a public key can never become an HMAC secret, and a secret can
  never be asked to verify an asymmetric signature;
* duplicate JSON member names are refused (RFC 7515 section 5.2, RFC 8259 section 4);
* claim types are strict: ``exp``/``nbf``/``iat`` must be JSON numbers (PyJWT accepts
  numeric strings), ``sub`` and ``jti`` strings (3.10 "Use explicit typing" in spirit);
* a ``crit`` header is refused, since we implement no JWS extensions (RFC 7515 4.1.11);
* key references in the header (``jku``, ``jwk``, ``x5u``, ``x5c``) are never followed;
* the revocation list is consulted only after the signature verified, so unauthenticated
  junk cannot probe it.

Keys come from three places, searched together: configured PEM keys, HMAC secrets, and a
:class:`KeySource` (a JWKS, see :mod:`jwtpgproxy.auth.jwks`) whose current key tuple is read on
every call. :meth:`TokenVerifier.verify` never does I/O; :meth:`TokenVerifier.verify_async`
adds the one piece that needs it -- when a token names a ``kid`` no key has, it asks the key
source to refetch (rate-limited there) and retries once if the key set changed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from ..errors import ConfigError, TokenRejected
from .policy import ClaimPolicy, Rejection, check_claim_types

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
#: The same union, for isinstance() checks on keys loaded from PEM or JWK.
PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)

MIN_RSA_BITS = 2048
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
#: The JWS algorithm of each elliptic curve (RFC 7518 3.4): one curve, one algorithm.
EC_CURVE_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: Algorithms verified with public keys.
ASYMMETRIC_ALGORITHMS = frozenset({"EdDSA", *_RSA_ALGORITHMS, *EC_CURVE_ALGORITHMS.values()})
#: Algorithms verified with an HMAC secret, and the secret length each needs: RFC 7518 3.2
#: "A key of the same size as the hash output (for instance, 256 bits for HS256) or larger
#: MUST be used with this algorithm."
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS = frozenset(_HMAC_MIN_BYTES)
MIN_HMAC_SECRET_BYTES = min(_HMAC_MIN_BYTES.values())
_ALL_ALGORITHMS = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
#: ``typ`` values we accept (RFC 7519 5.1, RFC 9068 for access tokens); case-insensitive.
_ACCEPTED_TYPES = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_JWS = jwt.PyJWS(algorithms=sorted(_ALL_ALGORITHMS))


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key, the algorithms it may verify, and its optional key id."""

    name: str  # where it came from: the configuration entry that named it (for logs)
    key: PublicKey = field(repr=False)
    algorithms: frozenset[str]
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class HmacSecret:
    """A shared secret configured explicitly for HS256/384/512.

    Only secrets configured as such ever verify HS* tokens; they never verify anything else.
    The algorithms follow the secret's length (RFC 7518 3.2): 32 bytes allow HS256, 48 also
    HS384, 64 also HS512. Shorter than 32 bytes is refused at construction.
    """

    name: str  # its configuration entry (for logs and errors; never the secret)
    secret: bytes = field(repr=False)
    kid: str | None = None
    algorithms: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_HMAC_SECRET_BYTES:
            raise ConfigError(
                f"{self.name}: HMAC secret of {len(self.secret)} bytes is too short "
                f"(minimum {MIN_HMAC_SECRET_BYTES})"
            )
        try:
            # PyJWT refuses PEM/DER/SSH keys and JWK JSON as HMAC secrets; find out now.
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(self.secret)
        except jwt.InvalidKeyError:
            raise ConfigError(
                f"{self.name}: looks like a public/private key or a JWK, not an HMAC secret"
            ) from None
        allowed = frozenset(a for a, n in _HMAC_MIN_BYTES.items() if len(self.secret) >= n)
        object.__setattr__(self, "algorithms", allowed)


def load_hmac_secret(value: str, *, name: str, kid: str | None = None) -> HmacSecret:
    """An HMAC secret from configuration: the UTF-8 bytes of ``value``, or the decoded bytes
    when it starts with ``base64:`` (standard or URL-safe alphabet, padding optional)."""
    if value.startswith("base64:"):
        text = value[len("base64:") :].strip()
        try:
            secret = base64.b64decode(
                text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4),
                validate=True,
            )
        except (binascii.Error, ValueError):
            raise ConfigError(f"{name}: not valid base64 after 'base64:'") from None
    else:
        secret = value.encode("utf-8")
    return HmacSecret(name, secret, kid)


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """Token-level limits. ``leeway_seconds`` is the one place clock skew is configured; the
    claim policy receives it from the verifier."""

    leeway_seconds: float = 10.0
    max_token_length: int = 16384


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: who it lets in, until when, and how."""

    role: str
    #: When the token lapses (``exp``, or ``iat`` + max age for tokens without ``exp``).
    expires_at: float
    key_name: str
    algorithm: str
    claims: Mapping[str, Any] = field(repr=False)
    #: Start the upstream session with ``default_transaction_read_only=on``.
    read_only: bool = False
    jti: str | None = None
    kid: str | None = None


class KeySource(Protocol):
    """Keys that may change at run time (e.g. :class:`jwtpgproxy.auth.jwks.JwksKeySource`)."""

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """The current key set: an immutable snapshot, replaced (never mutated) on refresh."""
        ...

    async def refresh_for_unknown_kid(self) -> bool:
        """Refetch now unless one happened recently; True if a fetch was made or joined."""
        ...


class RevocationCheck(Protocol):
    """E.g. :class:`jwtpgproxy.auth.revocation.RevocationList` or ``RevocationFile``."""

    def revoked_by(self, claims: Mapping[str, Any]) -> str | None:
        """A log-safe description of the entry revoking these claims, or None."""
        ...


# --- Keys ---------------------------------------------------------------------------------


def algorithms_for_key(key: PublicKey, name: str) -> frozenset[str]:
    """The algorithms a key may verify; refuse keys that cannot be used safely."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{name}: RSA key of {key.key_size} bits is too weak (minimum {MIN_RSA_BITS})"
            )
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_CURVE_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            raise ConfigError(f"{name}: unsupported elliptic curve {key.curve.name}")
        return frozenset({algorithm})
    raise ConfigError(f"{name}: unsupported key type {type(key).__name__}")


def load_verification_key(pem: str, *, name: str, kid: str | None = None) -> VerificationKey:
    """Parse a PEM public key (or certificate) from configuration."""
    text = pem.strip()
    if "\\n" in text and "\n" not in text:
        text = text.replace("\\n", "\n")  # one-line env values with escaped newlines
    if "PRIVATE KEY" in text:
        raise ConfigError(
            f"{name}: is a private key; configure the public key only "
            "(the proxy never needs a private key)"
        )
    data = text.encode("ascii", errors="replace")
    try:
        if "BEGIN CERTIFICATE" in text:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{name}: not a PEM public key or certificate ({exc})") from None
    if not isinstance(loaded, PUBLIC_KEY_TYPES):
        raise ConfigError(f"{name}: unsupported key type {type(loaded).__name__}")
    return VerificationKey(name, loaded, algorithms_for_key(loaded, name), kid)


# --- Strict pre-parsing -------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenRejected(Rejection.MALFORMED, f"duplicate JSON member {key[:40]!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON (RFC 8259 section 6); Python's json accepts them.
    raise TokenRejected(Rejection.MALFORMED, f"non-JSON number {name}")


def _decode_segment(segment: str, what: str) -> dict[str, Any]:
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise TokenRejected(Rejection.MALFORMED, f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise TokenRejected(Rejection.MALFORMED, f"{what} is not JSON") from exc
    except RecursionError:
        # "[[[[..." thousands deep, reachable without any signature (RFC 8259 section 9
        # lets a parser limit nesting; CPython's limit surfaces as RecursionError).
        raise TokenRejected(Rejection.MALFORMED, f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise TokenRejected(Rejection.MALFORMED, f"{what} is not a JSON object")
    return value


# --- Verification -------------------------------------------------------------------------

_Candidate = VerificationKey | HmacSecret


class TokenVerifier:
    """Verifies tokens against keys, secrets and a key source, then applies the policies.

    Immutable once built (the key source's key tuple is read afresh on each call). A new
    policy or revocation list means a new verifier, or a revocation object whose contents
    change behind :class:`RevocationCheck` (``jwtpgproxy.auth.revocation.RevocationFile``).
    """

    def __init__(
        self,
        keys: Sequence[VerificationKey] = (),
        policy: TokenPolicy | None = None,
        *,
        claim_policy: ClaimPolicy | None = None,
        hmac_secrets: Sequence[HmacSecret] = (),
        key_source: KeySource | None = None,
        revocation: RevocationCheck | None = None,
    ) -> None:
        if not keys and not hmac_secrets and key_source is None:
            raise ConfigError("at least one public key, HMAC secret or key source is required")
        self.keys = tuple(keys)
        self.hmac_secrets = tuple(hmac_secrets)
        self.policy = TokenPolicy() if policy is None else policy
        self.claim_policy = (ClaimPolicy() if claim_policy is None else claim_policy).validate()
        self.key_source = key_source
        self.revocation = revocation
        self._static: tuple[_Candidate, ...] = (*self.keys, *self.hmac_secrets)

    def verify(
        self,
        token: str,
        user: str,
        *,
        database: str | None = None,
        now: float | None = None,
    ) -> Identity:
        """Return the Identity for ``token`` presented by startup ``user`` (and ``database``;
        None means the client sent none, so PostgreSQL uses the user name), or raise
        :class:`TokenRejected`. Pure CPU: no I/O, no awaiting."""
        if len(token) > self.policy.max_token_length:
            raise TokenRejected(Rejection.TOO_LARGE, f"token of {len(token)} characters")
        if not token.isascii():  # RFC 7515 7.1: base64url segments and dots, nothing else
            raise TokenRejected(Rejection.MALFORMED, "characters outside ASCII")
        segments = token.split(".")
        if len(segments) != 3:
            # Also refuses JWE (5 segments) and JWS JSON serialisation.
            raise TokenRejected(Rejection.MALFORMED, f"{len(segments)} segments, expected 3")
        header = _decode_segment(segments[0], "header")
        claims = _decode_segment(segments[1], "payload")

        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in _ALL_ALGORITHMS:
            shown = algorithm[:20] if isinstance(algorithm, str) else type(algorithm).__name__
            raise TokenRejected(Rejection.ALGORITHM, f"algorithm {shown!r} not allowed")
        if "crit" in header:
            raise TokenRejected(Rejection.MALFORMED, "crit header present")
        token_type = header.get("typ")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() not in _ACCEPTED_TYPES
        ):
            raise TokenRejected(Rejection.MALFORMED, "unexpected typ header")
        check_claim_types(claims)  # cheap, before any signature work

        candidates = self._candidates(header, algorithm)
        used: _Candidate | None = None
        for candidate in candidates:
            if self._signature_valid(token, candidate, algorithm):
                used = candidate
                break
        if used is None:
            raise TokenRejected(
                Rejection.SIGNATURE, f"signature matches none of {len(candidates)} key(s)"
            )
        # From here on the claims are the issuer's (the signed payload is exactly the segment
        # parsed above).
        if self.revocation is not None:
            entry = self.revocation.revoked_by(claims)
            if entry is not None:
                raise TokenRejected(Rejection.REVOKED, f"revoked by {entry}")
        decision = self.claim_policy.evaluate(
            claims,
            user=user,
            database=database,
            now=time.time() if now is None else now,
            leeway=self.policy.leeway_seconds,
        )
        jti = claims.get("jti")
        kid = header.get("kid")
        return Identity(
            role=decision.role,
            expires_at=decision.expires_at,
            key_name=used.name,
            algorithm=algorithm,
            claims=claims,
            read_only=decision.read_only,
            jti=jti if isinstance(jti, str) else None,
            kid=kid if isinstance(kid, str) else None,
        )

    async def verify_async(
        self,
        token: str,
        user: str,
        *,
        database: str | None = None,
        now: float | None = None,
    ) -> Identity:
        """:meth:`verify`, plus JWKS refetch on an unknown ``kid``.

        If verification fails with UNKNOWN_KID and there is a key source, ask it to refetch
        (:meth:`KeySource.refresh_for_unknown_kid` -- at most one fetch per its minimum
        interval, concurrent callers share it) and verify once more if the key set is not
        the one the first attempt saw. Otherwise the UNKNOWN_KID rejection stands.
        """
        source = self.key_source
        seen = source.keys if source is not None else None
        try:
            return self.verify(token, user, database=database, now=now)
        except TokenRejected as exc:
            if exc.code != Rejection.UNKNOWN_KID or source is None:
                raise
            await source.refresh_for_unknown_kid()
            if source.keys is seen:
                raise
        return self.verify(token, user, database=database, now=now)

    def all_keys(self) -> tuple[_Candidate, ...]:
        """Every key and secret currently in use (configured ones first, then the source's)."""
        if self.key_source is None:
            return self._static
        return (*self._static, *self.key_source.keys)

    def _candidates(self, header: Mapping[str, Any], algorithm: str) -> list[_Candidate]:
        keys = self.all_keys()
        kid = header.get("kid")
        if kid is not None and any(k.kid is not None for k in keys):
            # Keys have ids: a token naming one is checked against that key alone.
            if not isinstance(kid, str):
                raise TokenRejected(Rejection.MALFORMED, "kid is not a string")
            encoded = kid.encode("utf-8", errors="surrogatepass")
            keys = tuple(
                k
                for k in keys
                if k.kid is not None
                and hmac.compare_digest(k.kid.encode("utf-8", errors="surrogatepass"), encoded)
            )
            if not keys:
                raise TokenRejected(Rejection.UNKNOWN_KID, "no key with that kid")
        matching = [k for k in keys if algorithm in k.algorithms]
        if not matching:
            raise TokenRejected(Rejection.ALGORITHM, f"no configured key verifies {algorithm}")
        return matching

    @staticmethod
    def _signature_valid(token: str, candidate: _Candidate, algorithm: str) -> bool:
        """Signature check by PyJWT, restricted to ``algorithm`` and this candidate's type."""
        material: PublicKey | bytes
        if isinstance(candidate, HmacSecret):
            assert algorithm in HMAC_ALGORITHMS  # candidates are filtered by algorithm
            material = candidate.secret
        else:
            assert algorithm in ASYMMETRIC_ALGORITHMS
            material = candidate.key
        try:
            _JWS.decode(token, material, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            return False
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
            raise TokenRejected(Rejection.ALGORITHM, str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise TokenRejected(Rejection.MALFORMED, str(exc)) from exc
        return True
