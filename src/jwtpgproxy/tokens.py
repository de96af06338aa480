"""JWT verification with public keys only, and the claim policy. No I/O.

Signatures and the time claims are checked by PyJWT with an explicit algorithm allow-list
(DESIGN.md principle 9). Around it, this module adds what PyJWT leaves to the caller, following
RFC 8725 ("JWT Best Current Practices"):

* every algorithm is accepted only with a key of the matching type (3.1, 3.2);
* HMAC algorithms never reach this path, so a public key can never become an HMAC secret;
* duplicate JSON member names are refused (RFC 7515 section 5.2, RFC 8259 section 4);
* claim types are strict: ``exp``/``nbf``/``iat`` must be JSON numbers (PyJWT accepts
  numeric strings), ``sub`` a string (3.10 "Use explicit typing" in spirit);
* a ``crit`` header is refused, since we implement no JWS extensions (RFC 7515 4.1.11);
* key references in the header (``jku``, ``jwk``, ``x5u``, ``x5c``) are never followed.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import ConfigError

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

MIN_RSA_BITS = 2048
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
#: Every algorithm this path accepts. HS* is deliberately absent.
ALLOWED_ALGORITHMS = frozenset({"EdDSA", *_RSA_ALGORITHMS, *_EC_ALGORITHMS.values()})
#: ``typ`` values we accept (RFC 7519 5.1, RFC 9068 for access tokens); case-insensitive.
_ACCEPTED_TYPES = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


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


class TokenRejected(Exception):
    def __init__(self, code: Rejection, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key, the algorithms it may verify, and its optional key id."""

    name: str  # where it came from, e.g. "PUBLIC_KEYS__0" (for logs)
    key: PublicKey = field(repr=False)
    algorithms: frozenset[str]
    kid: str | None = None


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    leeway_seconds: float = 10.0
    max_token_length: int = 16384


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: who it lets in and until when."""

    role: str
    expires_at: float
    key_name: str
    algorithm: str
    claims: Mapping[str, Any] = field(repr=False)


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
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
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
    if not isinstance(
        loaded,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
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
    if not isinstance(value, dict):
        raise TokenRejected(Rejection.MALFORMED, f"{what} is not a JSON object")
    return value


#: NumericDate bound: a float holds every integer up to 2**53 exactly; anything larger is no
#: date (and Python's int-to-float conversion of e.g. 10**400 would raise OverflowError).
_MAX_NUMERIC_DATE = 2**53


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # Also false for NaN and infinities; compares ints exactly, without float conversion.
    return abs(value) <= _MAX_NUMERIC_DATE


def _check_claim_types(claims: Mapping[str, Any]) -> None:
    for name in ("exp", "nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise TokenRejected(Rejection.CLAIMS, f"claim {name!r} is not a number")
    if "sub" in claims and not isinstance(claims["sub"], str):
        raise TokenRejected(Rejection.CLAIMS, "claim 'sub' is not a string")


# --- Verification -------------------------------------------------------------------------


class TokenVerifier:
    """Verifies tokens against a fixed key set and policy. Immutable once built."""

    def __init__(self, keys: Sequence[VerificationKey], policy: TokenPolicy) -> None:
        if not keys:
            raise ConfigError("PUBLIC_KEYS__0: at least one public key is required")
        self.keys = tuple(keys)
        self.policy = policy
        self._keys_have_ids = any(k.kid is not None for k in self.keys)

    def verify(self, token: str, user: str, *, now: float | None = None) -> Identity:
        """Return the Identity for ``token`` presented by startup user ``user``, or raise
        :class:`TokenRejected`."""
        if len(token) > self.policy.max_token_length:
            raise TokenRejected(Rejection.TOO_LARGE, f"token of {len(token)} characters")
        segments = token.split(".")
        if len(segments) != 3:
            # Also refuses JWE (5 segments) and JWS JSON serialisation.
            raise TokenRejected(Rejection.MALFORMED, f"{len(segments)} segments, expected 3")
        header = _decode_segment(segments[0], "header")
        claims = _decode_segment(segments[1], "payload")

        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALLOWED_ALGORITHMS:
            shown = algorithm[:20] if isinstance(algorithm, str) else type(algorithm).__name__
            raise TokenRejected(Rejection.ALGORITHM, f"algorithm {shown!r} not allowed")
        if "crit" in header:
            raise TokenRejected(Rejection.MALFORMED, "crit header present")
        token_type = header.get("typ")
        if token_type is not None and (
            not isinstance(token_type, str) or token_type.lower() not in _ACCEPTED_TYPES
        ):
            raise TokenRejected(Rejection.MALFORMED, "unexpected typ header")
        _check_claim_types(claims)

        candidates = self._candidates(header, algorithm)
        now = time.time() if now is None else now
        verified: dict[str, Any] | None = None
        used: VerificationKey | None = None
        for key in candidates:
            try:
                verified = self._decode(token, key, algorithm)
            except jwt.InvalidSignatureError:
                continue
            used = key
            break
        if verified is None or used is None:
            raise TokenRejected(
                Rejection.SIGNATURE, f"signature matches none of {len(candidates)} key(s)"
            )
        self._check_times(verified, now)

        subject = verified["sub"]
        # Exact, byte-for-byte, and in constant time.
        if not hmac.compare_digest(subject.encode("utf-8"), user.encode("utf-8")):
            raise TokenRejected(Rejection.SUBJECT_MISMATCH, "sub does not equal startup user")
        return Identity(
            role=subject,
            expires_at=float(verified["exp"]),
            key_name=used.name,
            algorithm=algorithm,
            claims=verified,
        )

    def _candidates(self, header: Mapping[str, Any], algorithm: str) -> list[VerificationKey]:
        matching = [k for k in self.keys if algorithm in k.algorithms]
        kid = header.get("kid")
        if kid is not None and self._keys_have_ids:
            if not isinstance(kid, str):
                raise TokenRejected(Rejection.MALFORMED, "kid is not a string")
            matching = [
                k
                for k in matching
                if k.kid is not None
                and hmac.compare_digest(k.kid.encode("utf-8"), kid.encode("utf-8"))
            ]
            if not matching:
                raise TokenRejected(Rejection.UNKNOWN_KID, "no key with that kid")
        if not matching:
            raise TokenRejected(Rejection.ALGORITHM, f"no configured key verifies {algorithm}")
        return matching

    @staticmethod
    def _decode(token: str, key: VerificationKey, algorithm: str) -> dict[str, Any]:
        """Signature and required-claim presence by PyJWT; map its errors to ours.

        The time claims are checked by :meth:`_check_times` against an explicit clock, so
        PyJWT's own clock-reading checks are switched off here.
        """
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[algorithm],
                options={
                    "require": ["exp", "sub"],
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(Rejection.CLAIMS, str(exc)) from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected(Rejection.AUDIENCE, str(exc)) from exc
        except (jwt.InvalidAlgorithmError, jwt.InvalidKeyError) as exc:
            raise TokenRejected(Rejection.ALGORITHM, str(exc)) from exc
        except jwt.DecodeError as exc:
            raise TokenRejected(Rejection.MALFORMED, str(exc)) from exc
        except jwt.PyJWTError as exc:
            raise TokenRejected(Rejection.CLAIMS, str(exc)) from exc
        return claims

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        """RFC 7519 4.1.4-4.1.6 with the configured leeway (types were checked before)."""
        leeway = self.policy.leeway_seconds
        if now >= claims["exp"] + leeway:
            raise TokenRejected(Rejection.EXPIRED, "token has expired")
        if "nbf" in claims and now + leeway < claims["nbf"]:
            raise TokenRejected(Rejection.NOT_YET_VALID, "token not yet valid (nbf)")
        if "iat" in claims and now + leeway < claims["iat"]:
            raise TokenRejected(Rejection.NOT_YET_VALID, "token issued in the future (iat)")
