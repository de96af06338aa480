"""Token verification (jwtpgproxy.auth.tokens): algorithms, claims, key selection, key loading.

Hostile tokens are crafted by hand (base64url + signatures with `cryptography`) where PyJWT
would refuse to produce them. References: RFC 7515 (JWS), RFC 7519 (JWT), RFC 8725 (JWT BCP).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.auth.policy import ClaimPolicy, Rejection
from jwtpgproxy.auth.revocation import RevocationList
from jwtpgproxy.auth.tokens import (
    HmacSecret,
    Identity,
    TokenPolicy,
    TokenVerifier,
    VerificationKey,
    load_hmac_secret,
    load_verification_key,
)
from jwtpgproxy.errors import ConfigError, TokenRejected

NOW = 1_700_000_000.0


def public_pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private: Any) -> str:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass
class Keys:
    ed25519: ed25519.Ed25519PrivateKey
    ed25519_b: ed25519.Ed25519PrivateKey
    rsa: rsa.RSAPrivateKey
    rsa1024: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        ed25519_b=ed25519.Ed25519PrivateKey.generate(),
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa1024=rsa.generate_private_key(public_exponent=65537, key_size=1024),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
    )


def vkey(private: Any, name: str = "PUBLIC_KEYS__0", kid: str | None = None) -> VerificationKey:
    return load_verification_key(public_pem(private), name=name, kid=kid)


def verifier(
    *keys: VerificationKey, leeway: float = 10.0, max_length: int = 16384
) -> TokenVerifier:
    return TokenVerifier(keys, TokenPolicy(leeway_seconds=leeway, max_token_length=max_length))


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 300, "iat": int(NOW) - 10}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any] | str, payload: dict[str, Any] | str, sign: Any = None) -> str:
    """A compact JWS from raw JSON text (so duplicates/NaN survive); sign(signing_input)."""
    h = header if isinstance(header, str) else json.dumps(header)
    p = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64u(h.encode())}.{b64u(p.encode())}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64u(signature)}"


def ed_signer(key: ed25519.Ed25519PrivateKey) -> Any:
    return key.sign


def accept(v: TokenVerifier, token: str, user: str = "alice") -> Identity:
    """Assert the token is accepted for ``user``, with the claims it carries: the role, the
    lapse time (``exp``) and the algorithm of its header."""
    identity = v.verify(token, user, now=NOW)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert identity.role == user
    assert identity.claims == payload
    assert identity.expires_at == payload["exp"]
    assert identity.algorithm == jwt.get_unverified_header(token)["alg"]
    return identity


def reject(v: TokenVerifier, token: str, code: Rejection, user: str = "alice") -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        v.verify(token, user, now=NOW)
    assert info.value.code is code, info.value
    # The token itself never appears in the error text.
    assert token not in str(info.value)
    assert token.split(".")[-1] not in str(info.value) or not token.split(".")[-1]
    return info.value


# --- Valid tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "algorithm"),
    [
        ("ed25519", "EdDSA"),
        ("rsa", "RS256"),
        ("rsa", "RS384"),
        ("rsa", "RS512"),
        ("rsa", "PS256"),
        ("p256", "ES256"),
        ("p384", "ES384"),
    ],
)
def test_valid_token(keys: Keys, attr: str, algorithm: str) -> None:
    private = getattr(keys, attr)
    token = jwt.encode(claims(), private, algorithm=algorithm)
    identity = verifier(vkey(private)).verify(token, "alice", now=NOW)
    assert isinstance(identity, Identity)
    assert identity.role == "alice"
    assert identity.expires_at == NOW + 300
    assert identity.algorithm == algorithm
    assert identity.key_name == "PUBLIC_KEYS__0"
    assert identity.claims["sub"] == "alice"
    assert "alice" not in repr(identity).replace("role='alice'", "")


def test_wrong_key(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.SIGNATURE)


def test_second_of_two_keys(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA")
    v = verifier(vkey(keys.ed25519, "PUBLIC_KEYS__0"), vkey(keys.ed25519_b, "PUBLIC_KEYS__1"))
    assert v.verify(token, "alice", now=NOW).key_name == "PUBLIC_KEYS__1"


def test_mixed_key_types(keys: Keys) -> None:
    v = verifier(vkey(keys.rsa, "A"), vkey(keys.p256, "B"), vkey(keys.ed25519, "C"))
    assert (
        v.verify(jwt.encode(claims(), keys.p256, algorithm="ES256"), "alice", now=NOW).key_name
        == "B"
    )
    assert (
        v.verify(jwt.encode(claims(), keys.rsa, algorithm="RS256"), "alice", now=NOW).key_name
        == "A"
    )


def test_tampered_payload(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    h, _, s = token.split(".")
    forged = f"{h}.{b64u(json.dumps(claims(sub='bob')).encode())}.{s}"
    reject(verifier(vkey(keys.ed25519)), forged, Rejection.SIGNATURE, user="bob")


# --- Time claims ------------------------------------------------------------------------------


def test_expired_beyond_leeway(keys: Keys) -> None:
    token = jwt.encode(claims(exp=int(NOW) - 11), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519), leeway=10), token, Rejection.EXPIRED)


def test_expired_at_exact_boundary(keys: Keys) -> None:
    token = jwt.encode(claims(exp=int(NOW) - 10), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519), leeway=10), token, Rejection.EXPIRED)


def test_expired_within_leeway(keys: Keys) -> None:
    token = jwt.encode(claims(exp=int(NOW) - 9), keys.ed25519, algorithm="EdDSA")
    assert verifier(vkey(keys.ed25519), leeway=10).verify(token, "alice", now=NOW).role == "alice"


def test_zero_leeway(keys: Keys) -> None:
    token = jwt.encode(claims(exp=int(NOW)), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519), leeway=0), token, Rejection.EXPIRED)
    token = jwt.encode(claims(exp=int(NOW) + 1), keys.ed25519, algorithm="EdDSA")
    accept(verifier(vkey(keys.ed25519), leeway=0), token)


def test_float_exp(keys: Keys) -> None:
    token = jwt.encode(claims(exp=NOW + 0.5), keys.ed25519, algorithm="EdDSA")
    assert verifier(vkey(keys.ed25519)).verify(token, "alice", now=NOW).expires_at == NOW + 0.5


def test_nbf_in_future(keys: Keys) -> None:
    token = jwt.encode(claims(nbf=int(NOW) + 60), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.NOT_YET_VALID)


def test_nbf_within_leeway(keys: Keys) -> None:
    token = jwt.encode(claims(nbf=int(NOW) + 5), keys.ed25519, algorithm="EdDSA")
    accept(verifier(vkey(keys.ed25519)), token)


def test_iat_in_future(keys: Keys) -> None:
    token = jwt.encode(claims(iat=int(NOW) + 60), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.NOT_YET_VALID)


def test_missing_iat_ok(keys: Keys) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(NOW) + 60}, keys.ed25519, algorithm="EdDSA")
    accept(verifier(vkey(keys.ed25519)), token)


def test_missing_exp(keys: Keys) -> None:
    token = jwt.encode({"sub": "alice"}, keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.CLAIMS)


def test_missing_sub(keys: Keys) -> None:
    token = jwt.encode({"exp": int(NOW) + 60}, keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.CLAIMS)


def test_default_clock_is_now(keys: Keys) -> None:
    token = jwt.encode(claims(exp=int(NOW) + 60), keys.ed25519, algorithm="EdDSA")
    # NOW is in 2023: with the real clock the token has long expired.
    with pytest.raises(TokenRejected) as info:
        verifier(vkey(keys.ed25519)).verify(token, "alice")
    assert info.value.code is Rejection.EXPIRED


# --- Subject ------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["bob", "Alice", "ALICE", "alice ", " alice", "alice\0", ""])
def test_sub_mismatch(keys: Keys, user: str) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.SUBJECT_MISMATCH, user=user)


def test_unicode_sub(keys: Keys) -> None:
    token = jwt.encode(claims(sub="zoë"), keys.ed25519, algorithm="EdDSA")
    assert verifier(vkey(keys.ed25519)).verify(token, "zoë", now=NOW).role == "zoë"
    # NFC vs NFD is a different role name: exact bytes only.
    reject(verifier(vkey(keys.ed25519)), token, Rejection.SUBJECT_MISMATCH, user="zoe\u0308")


# --- Claim types (checked before PyJWT; signed correctly so only the type is wrong) -------


@pytest.mark.parametrize(
    "payload",
    [
        '{"sub":"alice","exp":"9999999999"}',
        '{"sub":"alice","exp":true}',
        '{"sub":"alice","exp":null}',
        '{"sub":"alice","exp":[9999999999]}',
        '{"sub":"alice","exp":1e400}',
        '{"sub":"alice","exp":9999999999,"nbf":"0"}',
        '{"sub":"alice","exp":9999999999,"iat":false}',
        '{"sub":12345,"exp":9999999999}',
        '{"sub":null,"exp":9999999999}',
        '{"sub":["alice"],"exp":9999999999}',
    ],
)
def test_claim_types(keys: Keys, payload: str) -> None:
    token = craft({"alg": "EdDSA", "typ": "JWT"}, payload, ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.CLAIMS)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_huge_integer_time_claim(keys: Keys, claim: str) -> None:
    payload = claims()
    payload[claim] = 10**400
    # Unsigned: anyone can send this, no key needed.
    token = craft({"alg": "EdDSA"}, json.dumps(payload), lambda _: b"\0" * 64)
    with pytest.raises(TokenRejected):
        verifier(vkey(keys.ed25519)).verify(token, "alice", now=NOW)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_payload(keys: Keys, constant: str) -> None:
    payload = f'{{"sub":"alice","exp":9999999999,"x":{constant}}}'
    token = craft({"alg": "EdDSA"}, payload, ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_nan_in_exp(keys: Keys) -> None:
    token = craft({"alg": "EdDSA"}, '{"sub":"alice","exp":NaN}', ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_duplicate_member_in_payload(keys: Keys) -> None:
    payload = '{"sub":"a","sub":"alice","exp":9999999999}'
    token = craft({"alg": "EdDSA", "typ": "JWT"}, payload, ed_signer(keys.ed25519))
    # Sanity: the signature is right, only the duplicate is wrong.
    assert jwt.decode(token, keys.ed25519.public_key(), algorithms=["EdDSA"])["sub"] == "alice"
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_duplicate_member_in_header(keys: Keys) -> None:
    token = craft('{"alg":"EdDSA","alg":"EdDSA"}', claims(), ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_nested_duplicate_member(keys: Keys) -> None:
    payload = '{"sub":"alice","exp":9999999999,"x":{"a":1,"a":2}}'
    token = craft({"alg": "EdDSA"}, payload, ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


@pytest.mark.parametrize("payload", ['["sub"]', '"alice"', "42", "null", "{"])
def test_payload_not_an_object(keys: Keys, payload: str) -> None:
    token = craft({"alg": "EdDSA"}, payload, ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_extra_claims_kept(keys: Keys) -> None:
    token = jwt.encode(claims(roles=["a"], scope="db"), keys.ed25519, algorithm="EdDSA")
    identity = verifier(vkey(keys.ed25519)).verify(token, "alice", now=NOW)
    assert identity.claims["roles"] == ["a"]
    assert identity.claims["scope"] == "db"


@pytest.mark.parametrize("aud", ["x", ["x", "y"]])
def test_aud_present_is_refused(keys: Keys, aud: Any) -> None:
    # RFC 7519 4.1.3: a recipient that does not identify itself with a value in "aud"
    # MUST reject the token; the proxy has no audience of its own (PyJWT enforces this).
    token = jwt.encode(claims(aud=aud), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.AUDIENCE)


# --- Algorithms (RFC 8725 section 2.1 / 3.1) -----------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none(keys: Keys, alg: str) -> None:
    token = craft({"alg": alg, "typ": "JWT"}, claims())
    assert token.endswith(".")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.ALGORITHM)


@pytest.mark.parametrize(
    "header", [{"typ": "JWT"}, {"alg": None}, {"alg": 256}, {"alg": ["EdDSA"]}]
)
def test_alg_missing_or_not_string(keys: Keys, header: dict[str, Any]) -> None:
    token = craft(header, claims(), ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.ALGORITHM)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_with_public_key_as_secret(keys: Keys, alg: str) -> None:
    pem = public_pem(keys.rsa).encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    token = craft(
        {"alg": alg, "typ": "JWT"},
        claims(),
        lambda signing_input: hmac.new(pem, signing_input, digest).digest(),
    )
    reject(verifier(vkey(keys.rsa)), token, Rejection.ALGORITHM)


def test_es256_against_rsa_key_only(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.p256, algorithm="ES256")
    reject(verifier(vkey(keys.rsa)), token, Rejection.ALGORITHM)


def test_rs256_against_ed25519_key_only(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.rsa, algorithm="RS256")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.ALGORITHM)


def _es384_raw_signer(key: ec.EllipticCurvePrivateKey) -> Any:
    def sign(signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    return sign


def test_es384_signature_labelled_es256(keys: Keys) -> None:
    token = craft({"alg": "ES256", "typ": "JWT"}, claims(), _es384_raw_signer(keys.p384))
    # Sanity: the same bytes labelled ES384 verify.
    good = craft({"alg": "ES384", "typ": "JWT"}, claims(), _es384_raw_signer(keys.p384))
    accept(verifier(vkey(keys.p384)), good)
    # The P-384 key verifies ES384 only.
    reject(verifier(vkey(keys.p384)), token, Rejection.ALGORITHM)
    # With a P-256 key present too, the ES256 check fails on the signature.
    with pytest.raises(TokenRejected) as info:
        verifier(vkey(keys.p256), vkey(keys.p384)).verify(token, "alice", now=NOW)
    assert info.value.code in {Rejection.SIGNATURE, Rejection.MALFORMED}


def test_es256_signed_with_p384_key_refused(keys: Keys) -> None:
    def sign(signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(keys.p384.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    token = craft({"alg": "ES256"}, claims(), sign)
    reject(verifier(vkey(keys.p384)), token, Rejection.ALGORITHM)


def test_crit_header(keys: Keys) -> None:
    token = craft({"alg": "EdDSA", "crit": ["exp"]}, claims(), ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", "application/jwt"])
def test_typ_accepted(keys: Keys, typ: str) -> None:
    token = craft({"alg": "EdDSA", "typ": typ}, claims(), ed_signer(keys.ed25519))
    accept(verifier(vkey(keys.ed25519)), token)


@pytest.mark.parametrize("typ", ["JWE", "secevent+jwt", "", 1, ["JWT"], True])
def test_typ_refused(keys: Keys, typ: Any) -> None:
    token = craft({"alg": "EdDSA", "typ": typ}, claims(), ed_signer(keys.ed25519))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


def test_header_key_references_not_followed(keys: Keys) -> None:
    # A jwk header carrying the attacker's own key must not be used to verify.
    attacker = ed25519.Ed25519PrivateKey.generate()
    raw = attacker.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    header = {"alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}}
    token = craft(header, claims(), ed_signer(attacker))
    reject(verifier(vkey(keys.ed25519)), token, Rejection.SIGNATURE)


# --- Shape ------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [1, 2, 4, 5])
def test_segment_count(keys: Keys, segments: int) -> None:
    token = ".".join(["eyJhbGciOiJFZERTQSJ9"] * segments)
    reject(verifier(vkey(keys.ed25519)), token, Rejection.MALFORMED)


@pytest.mark.parametrize("char", ["\ud800", "\u00e9", "\u2028"])
def test_non_ascii_anywhere_is_malformed(keys: Keys, char: str) -> None:
    """Also in the signature segment, which PyJWT would encode as UTF-8 (a lone surrogate
    made that raise UnicodeEncodeError, found by test_verify_mutated_valid_token)."""
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token[:-2] + char + token[-1], Rejection.MALFORMED)


def test_empty_token(keys: Keys) -> None:
    with pytest.raises(TokenRejected) as info:
        verifier(vkey(keys.ed25519)).verify("", "alice", now=NOW)
    assert info.value.code is Rejection.MALFORMED


@pytest.mark.parametrize("bad", ["!", "+", "/", "=", " ", "é", "\n"])
def test_non_base64url_header_or_payload(keys: Keys, bad: str) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    h, p, s = token.split(".")
    reject(verifier(vkey(keys.ed25519)), f"{h[:5]}{bad}{h[5:]}.{p}.{s}", Rejection.MALFORMED)
    reject(verifier(vkey(keys.ed25519)), f"{h}.{p[:5]}{bad}{p[5:]}.{s}", Rejection.MALFORMED)


@pytest.mark.parametrize("bad", ["!!!!", "====", "é", "+/", " "])
def test_non_base64url_signature(keys: Keys, bad: str) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    h, p, s = token.split(".")
    with pytest.raises(TokenRejected):
        verifier(vkey(keys.ed25519)).verify(f"{h}.{p}.{s[:10]}{bad}{s[10:]}", "alice", now=NOW)
    with pytest.raises(TokenRejected):
        verifier(vkey(keys.ed25519)).verify(f"{h}.{p}.{s}{bad}", "alice", now=NOW)


def test_padded_segment_refused(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    h, p, s = token.split(".")
    padded = h + "=" * (-len(h) % 4)
    if padded != h:
        reject(verifier(vkey(keys.ed25519)), f"{padded}.{p}.{s}", Rejection.MALFORMED)


def test_impossible_base64_length(keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    h, p, s = token.split(".")
    extra = "A" * ((1 - len(p)) % 4)  # make len(p) % 4 == 1
    reject(verifier(vkey(keys.ed25519)), f"{h}.{p}{extra}.{s}", Rejection.MALFORMED)


def test_too_large(keys: Keys) -> None:
    token = jwt.encode(claims(pad="x" * 20000), keys.ed25519, algorithm="EdDSA")
    error = reject(verifier(vkey(keys.ed25519)), token, Rejection.TOO_LARGE)
    assert "x" * 50 not in str(error)
    # Exactly at the configured maximum is allowed.
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    accept(verifier(vkey(keys.ed25519), max_length=len(token)), token)
    reject(verifier(vkey(keys.ed25519), max_length=len(token) - 1), token, Rejection.TOO_LARGE)


def test_too_large_checked_before_parsing(keys: Keys) -> None:
    reject(verifier(vkey(keys.ed25519), max_length=300), "!" * 301, Rejection.TOO_LARGE)


# --- kid ----------------------------------------------------------------------------------


def test_kid_selects_key(keys: Keys) -> None:
    v = verifier(
        vkey(keys.ed25519, "PUBLIC_KEYS__0", kid="one"),
        vkey(keys.ed25519_b, "PUBLIC_KEYS__1", kid="two"),
    )
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "two"})
    assert v.verify(token, "alice", now=NOW).key_name == "PUBLIC_KEYS__1"
    # The kid names the other key: that key alone is tried, and fails.
    wrong = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "one"})
    reject(v, wrong, Rejection.SIGNATURE)


def test_unknown_kid(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, kid="one"))
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "three"})
    reject(v, token, Rejection.UNKNOWN_KID)


def test_kid_case_sensitive(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, kid="one"))
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "ONE"})
    reject(v, token, Rejection.UNKNOWN_KID)


def test_kid_not_a_string(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, kid="1"))
    token = craft({"alg": "EdDSA", "kid": 1}, claims(), ed_signer(keys.ed25519))
    reject(v, token, Rejection.MALFORMED)


def test_no_kid_in_token_tries_all_keys_with_ids(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, "A", kid="one"), vkey(keys.ed25519_b, "B", kid="two"))
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA")
    assert v.verify(token, "alice", now=NOW).key_name == "B"


def test_kid_ignored_when_keys_have_no_ids(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, "A"), vkey(keys.ed25519_b, "B"))
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "whatever"})
    assert v.verify(token, "alice", now=NOW).key_name == "B"


def test_kid_and_algorithm_both_filter(keys: Keys) -> None:
    v = verifier(vkey(keys.rsa, "A", kid="k"), vkey(keys.ed25519, "B", kid="k"))
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "k"})
    assert v.verify(token, "alice", now=NOW).key_name == "B"


# --- Verifier construction and errors -----------------------------------------------------


def test_verifier_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="at least one public key"):
        TokenVerifier([], TokenPolicy())


def test_rejection_values_are_fixed() -> None:
    assert {r.value for r in Rejection} == {
        "malformed",
        "too_large",
        "algorithm",
        "unknown_kid",
        "signature",
        "expired",
        "not_yet_valid",
        "claims",
        "audience",
        "subject_mismatch",
        "issuer",
        "tenant",
        "scope",
        "database",
        "lifetime",
        "revoked",
    }


def test_errors_never_contain_token_parts(keys: Keys) -> None:
    secret_sub = "sub-" + "q" * 30
    cases = [
        jwt.encode(claims(sub=secret_sub), keys.ed25519_b, algorithm="EdDSA"),  # signature
        jwt.encode(claims(sub=secret_sub, exp=1), keys.ed25519, algorithm="EdDSA"),  # expired
        jwt.encode(claims(sub=secret_sub), keys.ed25519, algorithm="EdDSA"),  # mismatch
        craft({"alg": "EdDSA"}, {"sub": secret_sub}, ed_signer(keys.ed25519)),  # no exp
    ]
    v = verifier(vkey(keys.ed25519))
    for token in cases:
        with pytest.raises(TokenRejected) as info:
            v.verify(token, "alice", now=NOW)
        text = str(info.value) + info.value.detail
        assert token not in text
        for part in token.split("."):
            if part:
                assert part not in text
        assert secret_sub not in text


# --- load_verification_key ------------------------------------------------------------------


def test_load_each_key_type(keys: Keys) -> None:
    assert load_verification_key(public_pem(keys.ed25519), name="K").algorithms == {"EdDSA"}
    assert load_verification_key(public_pem(keys.p256), name="K").algorithms == {"ES256"}
    assert load_verification_key(public_pem(keys.p384), name="K").algorithms == {"ES384"}
    rsa_algs = load_verification_key(public_pem(keys.rsa), name="K").algorithms
    assert rsa_algs == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    for algs in (rsa_algs,):
        assert not any(a.startswith("HS") for a in algs)


def test_load_keeps_name_and_kid(keys: Keys) -> None:
    key = load_verification_key(public_pem(keys.ed25519), name="PUBLIC_KEYS__3", kid="k1")
    assert (key.name, key.kid) == ("PUBLIC_KEYS__3", "k1")


@pytest.mark.parametrize("attr", ["ed25519", "rsa", "p256"])
def test_private_key_refused(keys: Keys, attr: str) -> None:
    pem = private_pem(getattr(keys, attr))
    with pytest.raises(ConfigError) as info:
        load_verification_key(pem, name="PUBLIC_KEYS__7")
    text = str(info.value)
    assert text.startswith("PUBLIC_KEYS__7:")
    assert "private key" in text
    assert pem.splitlines()[1] not in text


def test_traditional_rsa_private_key_refused(keys: Keys) -> None:
    pem = keys.rsa.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    assert "BEGIN RSA PRIVATE KEY" in pem
    with pytest.raises(ConfigError, match="PUBLIC_KEYS__0"):
        load_verification_key(pem, name="PUBLIC_KEYS__0")


def test_rsa_1024_refused(keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"^PUBLIC_KEYS__1: RSA key of 1024 bits"):
        load_verification_key(public_pem(keys.rsa1024), name="PUBLIC_KEYS__1")


def test_secp256k1_refused() -> None:
    pem = public_pem(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(ConfigError, match=r"^PUBLIC_KEYS__2: .*secp256k1"):
        load_verification_key(pem, name="PUBLIC_KEYS__2")


def test_x25519_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    pem = public_pem(x25519.X25519PrivateKey.generate())
    with pytest.raises(ConfigError, match=r"^PUBLIC_KEYS__0: unsupported key type"):
        load_verification_key(pem, name="PUBLIC_KEYS__0")


def test_certificate_accepted(keys: Keys) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.p256.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(keys.p256, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key = load_verification_key(pem, name="PUBLIC_KEYS__0")
    assert key.algorithms == {"ES256"}
    token = jwt.encode(claims(), keys.p256, algorithm="ES256")
    assert verifier(key).verify(token, "alice", now=NOW).role == "alice"


def test_one_line_escaped_pem_accepted(keys: Keys) -> None:
    one_line = public_pem(keys.ed25519).strip().replace("\n", "\\n")
    assert "\n" not in one_line
    key = load_verification_key(one_line, name="PUBLIC_KEYS__0")
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA")
    assert verifier(key).verify(token, "alice", now=NOW).role == "alice"


def test_surrounding_whitespace_accepted(keys: Keys) -> None:
    key = load_verification_key("\n  " + public_pem(keys.ed25519) + "\n\n", name="K")
    identity = accept(verifier(key), jwt.encode(claims(), keys.ed25519, algorithm="EdDSA"))
    assert identity.key_name == "K"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVx user@host",
        "é",
    ],
)
def test_garbage_refused(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_verification_key(text, name="PUBLIC_KEYS__4")
    assert str(info.value).startswith("PUBLIC_KEYS__4:")


# --- Property -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(token=st.text(max_size=200))
def test_fuzz_arbitrary_strings(keys: Keys, token: str) -> None:
    try:
        verifier(vkey(keys.ed25519)).verify(token, "alice", now=NOW)
    except TokenRejected:
        return
    raise AssertionError("an arbitrary string verified")


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers(-(10**20), 10**20)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "x5u"]), _json_values, max_size=4
    ),
    payload=st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "x"]), _json_values, max_size=6
    ),
)
def test_fuzz_structured_tokens_signed(
    keys: Keys, header: dict[str, Any], payload: dict[str, Any]
) -> None:
    token = craft(header, payload, ed_signer(keys.ed25519))
    try:
        identity = verifier(vkey(keys.ed25519, kid="k")).verify(token, "alice", now=NOW)
    except TokenRejected:
        return
    assert identity.role == "alice"
    assert header.get("alg") == "EdDSA"


# --- HMAC secrets (configured explicitly; RFC 8725 3.1, RFC 7518 3.2) -------------------------

SECRET32 = b"k" * 32
SECRET64 = bytes(range(64))


def hs_token(secret: bytes, alg: str = "HS256", kid: str | None = None, **extra: Any) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return craft(header, claims(**extra), lambda s: hmac.new(secret, s, digest).digest())


def hs_verifier(*secrets: HmacSecret, keys: tuple[VerificationKey, ...] = ()) -> TokenVerifier:
    return TokenVerifier(keys, TokenPolicy(), hmac_secrets=secrets)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_secret_verifies(alg: str) -> None:
    secret = HmacSecret("TOKEN__HMAC_SECRETS__0", SECRET64)
    identity = hs_verifier(secret).verify(hs_token(SECRET64, alg), "alice", now=NOW)
    assert (identity.algorithm, identity.key_name) == (alg, "TOKEN__HMAC_SECRETS__0")


def test_hmac_pyjwt_interop() -> None:
    token = jwt.encode(claims(), SECRET32, algorithm="HS256")
    assert hs_verifier(HmacSecret("S", SECRET32)).verify(token, "alice", now=NOW).role == "alice"


def test_hmac_wrong_secret() -> None:
    v = hs_verifier(HmacSecret("S", SECRET32))
    reject(v, hs_token(b"j" * 32), Rejection.SIGNATURE)


@pytest.mark.parametrize(
    ("length", "algorithms"),
    [(32, {"HS256"}), (47, {"HS256"}), (48, {"HS256", "HS384"}), (64, {"HS256", "HS384", "HS512"})],
)
def test_hmac_algorithms_follow_secret_length(length: int, algorithms: set[str]) -> None:
    assert HmacSecret("S", b"x" * length).algorithms == algorithms


def test_hmac_short_secret_cannot_do_hs512() -> None:
    v = hs_verifier(HmacSecret("S", SECRET32))
    reject(v, hs_token(SECRET32, "HS512"), Rejection.ALGORITHM)


@pytest.mark.parametrize("length", [0, 1, 16, 31])
def test_hmac_secret_too_short(length: int) -> None:
    with pytest.raises(ConfigError, match=rf"^TOKEN__HMAC_SECRETS__3: HMAC secret of {length} "):
        HmacSecret("TOKEN__HMAC_SECRETS__3", b"x" * length)


def test_hmac_secret_that_is_a_key_refused(keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"^TOKEN__HMAC_SECRETS__0: looks like"):
        HmacSecret("TOKEN__HMAC_SECRETS__0", public_pem(keys.rsa).encode())


def test_hmac_secret_not_in_repr() -> None:
    secret = HmacSecret("S", b"supersecretsupersecretsupersecret!")
    assert b"supersecret".decode() not in repr(secret)


def test_load_hmac_secret() -> None:
    assert load_hmac_secret("p" * 32, name="S").secret == b"p" * 32
    raw = bytes(range(48))
    for text in (base64.b64encode(raw).decode(), b64u(raw)):
        loaded = load_hmac_secret("base64:" + text, name="S", kid="k")
        assert (loaded.secret, loaded.kid) == (raw, "k")
    with pytest.raises(ConfigError, match=r"^S: not valid base64"):
        load_hmac_secret("base64:!!!!", name="S")
    with pytest.raises(ConfigError, match=r"^S: HMAC secret of 3 bytes"):
        load_hmac_secret("base64:AAAA", name="S")


def test_hs_token_never_verified_with_public_key(keys: Keys) -> None:
    # HMAC "signed" with the PEM of a configured public key: with public keys only the
    # algorithm is refused; with an HMAC secret too, only that secret is tried.
    pem = public_pem(keys.rsa).encode()
    token = hs_token(pem)
    reject(verifier(vkey(keys.rsa)), token, Rejection.ALGORITHM)
    both = hs_verifier(HmacSecret("S", SECRET32), keys=(vkey(keys.rsa),))
    reject(both, token, Rejection.SIGNATURE)
    assert both.verify(hs_token(SECRET32), "alice", now=NOW).key_name == "S"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_asymmetric_token_never_verified_with_secret(alg: str) -> None:
    # An asymmetric alg whose "signature" is an HMAC of the input: no secret is tried.
    token = craft({"alg": alg}, claims(), lambda s: hmac.new(SECRET64, s, hashlib.sha256).digest())
    reject(hs_verifier(HmacSecret("S", SECRET64)), token, Rejection.ALGORITHM)


def test_hmac_kid_selection(keys: Keys) -> None:
    v = hs_verifier(
        HmacSecret("S0", SECRET32, kid="s0"),
        HmacSecret("S1", b"m" * 32, kid="s1"),
        keys=(vkey(keys.ed25519, "P0", kid="p0"),),
    )
    assert v.verify(hs_token(b"m" * 32, kid="s1"), "alice", now=NOW).key_name == "S1"
    reject(v, hs_token(b"m" * 32, kid="s0"), Rejection.SIGNATURE)
    reject(v, hs_token(b"m" * 32, kid="zz"), Rejection.UNKNOWN_KID)
    # The kid names an Ed25519 key; an HS256 token naming it is refused by algorithm.
    reject(v, hs_token(b"m" * 32, kid="p0"), Rejection.ALGORITHM)
    # No kid: all HMAC secrets are tried.
    assert v.verify(hs_token(b"m" * 32), "alice", now=NOW).key_name == "S1"


def test_kid_across_pem_and_hmac_without_ids(keys: Keys) -> None:
    # No key has an id: the token's kid is ignored, all keys of the algorithm are tried.
    v = hs_verifier(HmacSecret("S", SECRET32), keys=(vkey(keys.ed25519, "P"),))
    assert v.verify(hs_token(SECRET32, kid="x"), "alice", now=NOW).key_name == "S"
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "x"})
    assert v.verify(token, "alice", now=NOW).key_name == "P"


def test_verifier_with_only_hmac_secrets() -> None:
    TokenVerifier(hmac_secrets=[HmacSecret("S", SECRET32)])


# --- Claim policy through the verifier ---------------------------------------------------------


def test_claim_policy_applied(keys: Keys) -> None:
    v = TokenVerifier(
        [vkey(keys.ed25519)],
        TokenPolicy(),
        claim_policy=ClaimPolicy(
            issuer="iss", audience="proxy", databases_claim="dbs", read_only_scope="ro"
        ),
    )
    good = claims(iss="iss", aud="proxy", dbs=["app"], scope="ro", jti="j-1")
    token = jwt.encode(good, keys.ed25519, algorithm="EdDSA")
    identity = v.verify(token, "alice", database="app", now=NOW)
    assert identity.read_only is True
    assert identity.jti == "j-1"
    reject_db = pytest.raises(TokenRejected)
    with reject_db as info:
        v.verify(token, "alice", database="other", now=NOW)
    assert info.value.code is Rejection.DATABASE
    bad = jwt.encode({**good, "iss": "x"}, keys.ed25519, algorithm="EdDSA")
    reject(v, bad, Rejection.ISSUER)


def test_invalid_claim_policy_refused_at_construction(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="max_age_seconds"):
        TokenVerifier([vkey(keys.ed25519)], claim_policy=ClaimPolicy(require_exp=False))


def test_token_without_exp_when_allowed(keys: Keys) -> None:
    v = TokenVerifier(
        [vkey(keys.ed25519)],
        claim_policy=ClaimPolicy(require_exp=False, max_age_seconds=60),
    )
    token = jwt.encode({"sub": "alice", "iat": int(NOW) - 30}, keys.ed25519, algorithm="EdDSA")
    assert v.verify(token, "alice", now=NOW).expires_at == NOW + 30
    reject(v, jwt.encode({"sub": "alice"}, keys.ed25519, algorithm="EdDSA"), Rejection.CLAIMS)


def test_identity_defaults(keys: Keys) -> None:
    identity = verifier(vkey(keys.ed25519)).verify(
        jwt.encode(claims(), keys.ed25519, algorithm="EdDSA"), "alice", now=NOW
    )
    assert (identity.read_only, identity.jti, identity.kid) == (False, None, None)


def test_jti_must_be_string(keys: Keys) -> None:
    token = jwt.encode(claims(jti=5), keys.ed25519, algorithm="EdDSA")
    reject(verifier(vkey(keys.ed25519)), token, Rejection.CLAIMS)


def test_deeply_nested_json_refused(keys: Keys) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    token = craft({"alg": "EdDSA"}, f'{{"sub":"alice","x":{deep}}}', lambda _: b"\0" * 64)
    reject(verifier(vkey(keys.ed25519), max_length=10**6), token, Rejection.MALFORMED)


# --- Revocation through the verifier -----------------------------------------------------------


def test_revoked_after_signature(keys: Keys) -> None:
    revoked = RevocationList.parse("jti leaked\nsub mallory\n", source="r.txt")
    v = TokenVerifier([vkey(keys.ed25519)], revocation=revoked)
    good = jwt.encode(claims(jti="fine"), keys.ed25519, algorithm="EdDSA")
    assert accept(v, good).jti == "fine"
    error = reject(
        v, jwt.encode(claims(jti="leaked"), keys.ed25519, algorithm="EdDSA"), Rejection.REVOKED
    )
    assert "r.txt" in error.detail and "leaked" not in error.detail
    # A forged token naming a revoked jti is a signature failure: the list is not consulted
    # for unauthenticated input.
    forged = jwt.encode(claims(jti="leaked"), keys.ed25519_b, algorithm="EdDSA")
    reject(v, forged, Rejection.SIGNATURE)
    reject(
        v,
        jwt.encode(claims(sub="mallory"), keys.ed25519, algorithm="EdDSA"),
        Rejection.REVOKED,
        user="mallory",
    )


def test_revocation_consulted_only_after_signature(keys: Keys) -> None:
    calls: list[Any] = []

    class Spy:
        def revoked_by(self, claims: Any) -> str | None:
            calls.append(claims)
            return None

    v = TokenVerifier([vkey(keys.ed25519)], revocation=Spy())
    reject(v, jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA"), Rejection.SIGNATURE)
    reject(v, craft({"alg": "none"}, claims()), Rejection.ALGORITHM)
    assert calls == []
    accept(v, jwt.encode(claims(), keys.ed25519, algorithm="EdDSA"))
    assert len(calls) == 1


# --- Key sources and verify_async --------------------------------------------------------------


class FakeSource:
    def __init__(self, *keys: VerificationKey) -> None:
        self.keys: tuple[VerificationKey, ...] = tuple(keys)
        self.next: tuple[VerificationKey, ...] | None = None
        self.refetches = 0

    async def refresh_for_unknown_kid(self) -> bool:
        self.refetches += 1
        if self.next is None:
            return False
        self.keys, self.next = self.next, None
        return True


def test_key_source_read_on_each_call(keys: Keys) -> None:
    source = FakeSource(vkey(keys.ed25519, "J1", kid="a"))
    v = TokenVerifier(key_source=source)
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "b"})
    reject(v, token, Rejection.UNKNOWN_KID)
    source.keys = (vkey(keys.ed25519_b, "J2", kid="b"),)
    assert v.verify(token, "alice", now=NOW).key_name == "J2"


def test_verify_async_refetches_on_unknown_kid(keys: Keys) -> None:
    source = FakeSource(vkey(keys.ed25519, "J1", kid="a"))
    v = TokenVerifier(key_source=source)
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "b"})
    source.next = (vkey(keys.ed25519, "J1", kid="a"), vkey(keys.ed25519_b, "J2", kid="b"))
    identity = asyncio.run(v.verify_async(token, "alice", now=NOW))
    assert identity.key_name == "J2" and source.refetches == 1


def test_verify_async_no_retry_when_keys_unchanged(keys: Keys) -> None:
    source = FakeSource(vkey(keys.ed25519, "J1", kid="a"))
    v = TokenVerifier(key_source=source)
    token = jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "b"})
    with pytest.raises(TokenRejected) as info:
        asyncio.run(v.verify_async(token, "alice", now=NOW))
    assert info.value.code is Rejection.UNKNOWN_KID
    assert source.refetches == 1


def test_verify_async_other_failures_do_not_refetch(keys: Keys) -> None:
    source = FakeSource(vkey(keys.ed25519, "J1", kid="a"))
    v = TokenVerifier(key_source=source)
    for token in (
        jwt.encode(claims(), keys.ed25519_b, algorithm="EdDSA", headers={"kid": "a"}),
        jwt.encode(claims(exp=1), keys.ed25519, algorithm="EdDSA", headers={"kid": "a"}),
        "garbage",
    ):
        with pytest.raises(TokenRejected):
            asyncio.run(v.verify_async(token, "alice", now=NOW))
    assert source.refetches == 0
    good = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "a"})
    assert asyncio.run(v.verify_async(good, "alice", now=NOW)).kid == "a"


def test_verify_async_without_source(keys: Keys) -> None:
    v = verifier(vkey(keys.ed25519, kid="a"))
    token = jwt.encode(claims(), keys.ed25519, algorithm="EdDSA", headers={"kid": "b"})
    with pytest.raises(TokenRejected) as info:
        asyncio.run(v.verify_async(token, "alice", now=NOW))
    assert info.value.code is Rejection.UNKNOWN_KID


def test_all_keys_order(keys: Keys) -> None:
    source = FakeSource(vkey(keys.ed25519, "J"))
    secret = HmacSecret("S", SECRET32)
    v = TokenVerifier([vkey(keys.p256, "P")], hmac_secrets=[secret], key_source=source)
    assert [k.name for k in v.all_keys()] == ["P", "S", "J"]
