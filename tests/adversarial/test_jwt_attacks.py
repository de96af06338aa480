"""JWT attack families against tokens.TokenVerifier (unit level, no sockets except the jku trap).

Every hostile token must end in :class:`TokenRejected` -- never another exception, never an
Identity. Each family cites where it comes from:

* RFC 8725 "JSON Web Token Best Current Practices" (section numbers in each docstring);
* the jwt_tool attack playbook (ticarpi/jwt_tool wiki, "Known Exploits and Attacks": -X a
  alg:none, -X k key confusion, -X i inline JWKS, -X s JWKS spoofing / jku, -X p psychic
  signature, kid injection);
* PortSwigger Web Security Academy "JWT attacks" (labs: unverified signature, flawed
  signature verification, jwk / jku header injection, kid path traversal, algorithm
  confusion).

Keys are generated here. Where PyJWT refuses to produce a hostile token, it is assembled by hand
(base64url + signatures from ``cryptography``), so what reaches the verifier is byte-exact.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from harness import JwksServer, self_signed_certificate

from jwtpgproxy.auth.policy import Rejection
from jwtpgproxy.auth.tokens import (
    HmacSecret,
    Identity,
    TokenPolicy,
    TokenVerifier,
    VerificationKey,
    algorithms_for_key,
)
from jwtpgproxy.errors import TokenRejected

NOW = 1_700_000_000.0
USER = "alice"
CLAIMS: dict[str, Any] = {"sub": USER, "iat": int(NOW), "exp": int(NOW) + 300}
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_L = 2**252 + 27742317777372353535851937790883648493

# --- keys and helpers ------------------------------------------------------------------------

ED = ed25519.Ed25519PrivateKey.generate()
RSA = rsa.generate_private_key(65537, 2048)
EC = ec.generate_private_key(ec.SECP256R1())
ATTACKER_ED = ed25519.Ed25519PrivateKey.generate()
ATTACKER_RSA = rsa.generate_private_key(65537, 2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())


def vkey(name: str, private: Any, kid: str | None = None) -> VerificationKey:
    public = private.public_key()
    return VerificationKey(name, public, algorithms_for_key(public, name), kid)


def verifier(*keys: VerificationKey, max_length: int = 16384) -> TokenVerifier:
    return TokenVerifier(list(keys), TokenPolicy(leeway_seconds=10, max_token_length=max_length))


#: The configured keys (no kids): Ed25519, RSA-2048, EC P-256.
ALL = verifier(vkey("ed", ED), vkey("rsa", RSA), vkey("ec", EC))
#: The same keys, each with a kid.
WITH_KIDS = verifier(vkey("ed", ED, "ed-1"), vkey("rsa", RSA, "rsa-1"), vkey("ec", EC, "ec-1"))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_json(value: Any) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def sign(alg: str, private: Any, signing_input: bytes) -> bytes:
    """A JWS signature (RFC 7518 section 3) made with ``cryptography`` directly."""
    if alg == "EdDSA":
        return private.sign(signing_input)
    hash_ = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[2:]]
    if alg.startswith("RS"):
        return private.sign(signing_input, padding.PKCS1v15(), hash_)
    if alg.startswith("PS"):
        pss = padding.PSS(padding.MGF1(hash_), hash_.digest_size)
        return private.sign(signing_input, pss, hash_)
    der = private.sign(signing_input, ec.ECDSA(hash_))
    r, s = decode_dss_signature(der)
    size = (private.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def forge(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes | str = CLAIMS,
    *,
    key: Any = None,
    alg: str | None = None,
    signature: bytes | None = None,
) -> str:
    """header.payload.signature with raw JSON bytes allowed (duplicates, NaN, ...).
    Signed with ``key`` (using ``alg`` or the header's alg) unless ``signature`` is given."""
    payload_bytes = payload.encode() if isinstance(payload, str) else raw_json(payload)
    signing_input = f"{b64(raw_json(header))}.{b64(payload_bytes)}".encode()
    if signature is None:
        assert key is not None
        if alg is None:
            assert isinstance(header, dict)
            alg = header["alg"]
        signature = sign(alg, key, signing_input)
    return f"{signing_input.decode()}.{b64(signature)}"


def rejected(token: str, user: str = USER, v: TokenVerifier = ALL) -> TokenRejected:
    """Assert the token is refused with TokenRejected (any other exception fails the test)."""
    with pytest.raises(TokenRejected) as info:
        v.verify(token, user, now=NOW)
    return info.value


def accepted(token: str, user: str = USER, v: TokenVerifier = ALL) -> Identity:
    identity = v.verify(token, user, now=NOW)
    assert identity.role == user
    return identity


def test_positive_controls() -> None:
    """The builders above make tokens the verifier accepts, so every refusal below is caused
    by the one thing each test changes, not by a broken builder."""
    for alg, key in (("EdDSA", ED), ("RS256", RSA), ("PS384", RSA), ("ES256", EC)):
        accepted(forge({"alg": alg, "typ": "JWT"}, key=key))
        accepted(jwt.encode(CLAIMS, key, algorithm=alg))
    accepted(forge({"alg": "EdDSA", "kid": "ed-1"}, key=ED), v=WITH_KIDS)
    accepted(forge({"alg": "EdDSA", "typ": "at+jwt"}, key=ED))


# --- alg substitution / none -----------------------------------------------------------------


def _public_key_forms() -> dict[str, bytes]:
    public = RSA.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "PEM SPKI": pem,
        "PEM SPKI without trailing newline": pem.rstrip(b"\n"),
        "PEM PKCS1": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ),
        "DER SPKI": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "DER PKCS1": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        ),
        "JWK JSON": jwt.algorithms.RSAAlgorithm.to_jwk(public).encode(),
        "Ed25519 raw public bytes": ED.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
        "empty secret": b"",
    }


@pytest.mark.parametrize("hs", ["HS256", "HS384", "HS512"])
@pytest.mark.parametrize("form", list(_public_key_forms()))
def test_alg_substitution_public_key_as_hmac_secret(hs: str, form: str) -> None:
    """RS256 -> HS256 key confusion: the attacker MACs the token with the verifier's *public*
    key as the HMAC secret. RFC 8725 2.1/3.1 ("Perform Algorithm Verification"), jwt_tool
    -X k, PortSwigger "algorithm confusion" lab (PEM, DER and JWK forms of the key)."""
    secret = _public_key_forms()[form]
    header = b64(json.dumps({"alg": hs, "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(raw_json(CLAIMS))}".encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[hs]
    token = f"{signing_input.decode()}.{b64(hmac.new(secret, signing_input, digest).digest())}"
    assert rejected(token).code is Rejection.ALGORITHM


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", " EdDSA", "EdDSA ", "eddsa"])
@pytest.mark.parametrize("signature", [b"", b"\0" * 64, b"garbage"], ids=["empty", "zeros", "junk"])
def test_alg_none_and_case_variants(alg: str, signature: bytes) -> None:
    """Unsecured JWS ("alg":"none", RFC 7518 3.6) and case/whitespace variants that naive
    allow-lists compare loosely. RFC 8725 2.1 / 3.1, jwt_tool -X a, PortSwigger "flawed
    signature verification"."""
    assert rejected(forge({"alg": alg, "typ": "JWT"}, signature=signature)).code is (
        Rejection.ALGORITHM
    )


@pytest.mark.parametrize(
    "header",
    [
        {"typ": "JWT"},
        {"alg": None},
        {"alg": ["EdDSA"]},
        {"alg": {"name": "EdDSA"}},
        {"alg": 0},
        {"alg": True},
    ],
    ids=["missing", "null", "array", "object", "int", "bool"],
)
def test_alg_missing_or_not_a_string(header: dict[str, Any]) -> None:
    """Missing/odd-typed alg (RFC 7515 4.1.1: alg is a case-sensitive string).
    RFC 8725 3.1. The token is otherwise signed correctly with the EdDSA key."""
    token = forge(header, key=ED, alg="EdDSA")
    assert rejected(token).code is Rejection.ALGORITHM


# --- key confusion ---------------------------------------------------------------------------


def test_hmac_secret_never_verifies_asymmetric_and_vice_versa() -> None:
    """When an HMAC secret is configured next to public keys, HS256 MACed with the *public*
    key still fails, and an RS256-labelled token MACed with the secret fails: a key is used
    with its own algorithm family only. RFC 8725 3.1 / 2.7."""
    secret = b"s" * 32
    v = TokenVerifier([vkey("rsa", RSA)], TokenPolicy(), hmac_secrets=[HmacSecret("hs", secret)])
    accepted(jwt.encode(CLAIMS, secret, algorithm="HS256"), v=v)  # control
    pem = _public_key_forms()["PEM SPKI"]
    signing_input = f"{b64(raw_json({'alg': 'HS256'}))}.{b64(raw_json(CLAIMS))}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert rejected(f"{signing_input}.{b64(mac)}", v=v).code is Rejection.SIGNATURE
    rs_input = f"{b64(raw_json({'alg': 'RS256'}))}.{b64(raw_json(CLAIMS))}"
    rs_mac = hmac.new(secret, rs_input.encode(), hashlib.sha256).digest()
    assert rejected(f"{rs_input}.{b64(rs_mac)}", v=v).code is Rejection.SIGNATURE


def test_key_confusion_rsa_alg_with_only_ec_key() -> None:
    """An RS256 token (attacker's RSA key) against a verifier holding only an EC key: no key
    of the matching type, so no verification is even attempted. RFC 8725 3.1 ("each key
    MUST be used with exactly one algorithm")."""
    only_ec = verifier(vkey("ec", EC))
    token = forge({"alg": "RS256"}, key=ATTACKER_RSA)
    assert rejected(token, v=only_ec).code is Rejection.ALGORITHM


def test_key_confusion_eddsa_token_vs_rsa_key() -> None:
    """An EdDSA token against an RSA-only verifier. RFC 8725 3.1."""
    only_rsa = verifier(vkey("rsa", RSA))
    assert rejected(forge({"alg": "EdDSA"}, key=ED), v=only_rsa).code is Rejection.ALGORITHM


def test_key_confusion_es384_label_on_p256_key() -> None:
    """ES384 claimed, P-256 key configured (it may only verify ES256). RFC 8725 3.1."""
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert rejected(forge({"alg": "ES384"}, key=p384)).code is Rejection.ALGORITHM


def test_key_confusion_ps_signature_labelled_rs() -> None:
    """A PS256 signature by the right key but labelled RS256 (same key type, other padding)
    must fail the signature check. RFC 8725 2.1."""
    token = forge({"alg": "RS256"}, key=RSA, alg="PS256")
    assert rejected(token).code is Rejection.SIGNATURE


# --- signature malleability / zero signatures ------------------------------------------------


def _split(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def test_ecdsa_high_s_is_accepted_as_the_same_identity() -> None:
    """ECDSA signature malleability: (r, n-s) is as valid as (r, s). PyJWT verifies through
    OpenSSL, which does not enforce low-S, so the verifier accepts it. That is harmless here:
    nothing is keyed on the signature bytes (the proxy has no replay cache keyed on the token
    string), and the identity is the same. Asserted so a change in PyJWT/OpenSSL is noticed.
    RFC 8725 2.5 spirit; jwt_tool notes on ECDSA malleability."""
    token = jwt.encode(CLAIMS, EC, algorithm="ES256")
    header, payload, signature = _split(token)
    raw = _unb64(signature)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    high = r.to_bytes(32, "big") + (P256_ORDER - s).to_bytes(32, "big")
    twin = f"{header}.{payload}.{b64(high)}"
    assert twin != token
    assert accepted(twin).claims == accepted(token).claims


def test_ecdsa_der_signature_instead_of_raw() -> None:
    """JWS ES256 signatures are raw r||s (RFC 7518 3.4); the ASN.1 DER form a generic
    library produces must not be accepted. RFC 8725 3.3."""
    header = b64(b'{"alg":"ES256"}')
    signing_input = f"{header}.{b64(raw_json(CLAIMS))}".encode()
    der = EC.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    assert rejected(f"{signing_input.decode()}.{b64(der)}").code is Rejection.SIGNATURE


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 0), (P256_ORDER, P256_ORDER), (1, 0), (0, 1), (P256_ORDER, 1)],
    ids=["r=s=0", "r=s=n", "s=0", "r=0", "r=n"],
)
def test_ecdsa_psychic_signatures(r: int, s: int) -> None:
    """CVE-2022-21449 "psychic signatures" (Java accepted r=s=0). jwt_tool -X p. The range
    checks 0 < r, s < n must hold. RFC 8725 3.3 ("Validate All Cryptographic Operations")."""
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert rejected(forge({"alg": "ES256"}, signature=signature)).code is Rejection.SIGNATURE


def test_ecdsa_der_encoded_zero_signature() -> None:
    """The DER form of r=s=0, as sent to Java victims of CVE-2022-21449."""
    der = encode_dss_signature(0, 0)
    token = forge({"alg": "ES256"}, signature=der)
    assert rejected(token).code is Rejection.SIGNATURE


def test_ed25519_non_canonical_s_rejected() -> None:
    """Ed25519 malleability: S + L also satisfies the group equation; RFC 8032 5.1.7 requires
    S < L and OpenSSL enforces it, so the twin is refused."""
    token = jwt.encode(CLAIMS, ED, algorithm="EdDSA")
    header, payload, signature = _split(token)
    raw = _unb64(signature)
    s = int.from_bytes(raw[32:], "little") + ED25519_L
    assert s < 2**256
    twin = f"{header}.{payload}.{b64(raw[:32] + s.to_bytes(32, 'little'))}"
    assert rejected(twin).code is Rejection.SIGNATURE


@pytest.mark.parametrize(
    ("alg", "length"),
    [("EdDSA", 0), ("EdDSA", 64), ("RS256", 0), ("RS256", 256), ("ES256", 0), ("ES256", 64)],
)
def test_empty_and_all_zero_signatures(alg: str, length: int) -> None:
    """Empty and all-zero signatures for each key type. jwt_tool -X n ("null signature"),
    PortSwigger "unverified signature"; RFC 8725 2.1."""
    token = forge({"alg": alg}, signature=b"\0" * length)
    assert rejected(token).code in (Rejection.SIGNATURE, Rejection.MALFORMED)


def _good_parts() -> tuple[str, str, str]:
    return _split(jwt.encode(CLAIMS, ED, algorithm="EdDSA"))


def _noncanonical_last_char(signature: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(signature[-1])
    # 64 bytes = 86 chars: the last char carries 2 bits, its low 4 bits are unused.
    return signature[:-1] + alphabet[(index & 0x30) | ((index + 1) & 0x0F)]


SIGNATURE_ENCODING_ATTACKS: dict[str, Callable[[str], str]] = {
    "appended byte": lambda s: b64(_unb64(s) + b"\0"),
    "truncated byte": lambda s: b64(_unb64(s)[:-1]),
    "extra base64 chars": lambda s: s + "AAAA",
    "extra base64 char": lambda s: s + "A",
    "three padding chars": lambda s: s + "===",
    "four padding chars": lambda s: s + "====",
    "padding in the middle": lambda s: s[:40] + "==" + s[40:],
    "non-alphabet chars": lambda s: s[:10] + "!!!!" + s[10:],
    "standard base64 alphabet": lambda s: s.replace("-", "+").replace("_", "/") + "+/+/",
    "embedded whitespace": lambda s: s[:10] + " \t\r\n" + s[10:],
    "non-ASCII chars": lambda s: s[:10] + "\u00e9\u00e9\u00e9\u00e9" + s[10:],
    "non-canonical trailing bits": _noncanonical_last_char,
    "dot appended": lambda s: s + ".",
}


@pytest.mark.parametrize("attack", list(SIGNATURE_ENCODING_ATTACKS))
def test_signature_encoding_tricks(attack: str) -> None:
    """The signature segment re-encoded: appended/stripped bytes, extra or non-alphabet
    base64 characters, non-canonical trailing bits (RFC 4648 3.5). RFC 7515 2 defines
    base64url *without* padding or other characters; RFC 8725 2.6 ("Multiplicity of JSON
    encodings") in spirit."""
    header, payload, signature = _good_parts()
    mutated = SIGNATURE_ENCODING_ATTACKS[attack](signature)
    assert mutated != signature
    rejected(f"{header}.{payload}.{mutated}")


def test_padded_signature_is_accepted_as_the_same_identity() -> None:
    """'=' padding on the signature segment: PyJWT >= 2.12 accepts trailing '=' on purpose
    (some issuers, e.g. AWS ALB, pad), while this verifier refuses padding on the header and
    payload segments. The decoded signature is identical, so the same identity results --
    asserted so that a change is noticed. RFC 7515 section 2 (no padding)."""
    header, payload, signature = _good_parts()
    padded = f"{header}.{payload}.{signature}=="
    assert accepted(padded).claims == accepted(f"{header}.{payload}.{signature}").claims
    rejected(f"{header}=.{payload}.{signature}")
    rejected(f"{header}.{payload}==.{signature}")


# --- header-embedded keys --------------------------------------------------------------------


@pytest.fixture
def http_trap() -> Iterator[JwksServer]:
    """A local HTTP server that counts requests: a followed jku/x5u would show up here."""
    with JwksServer() as server:
        server.json("/jwks.json", {"keys": [_attacker_jwk()]})
        yield server


def _attacker_jwk() -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_RSA.public_key()))
    jwk["kid"] = "rsa-1"  # the kid of a configured key
    return jwk


def _attacker_cert_b64() -> str:
    cert = self_signed_certificate(ATTACKER_RSA, "attacker", dns_names=(), ip_addresses=())
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


@pytest.mark.parametrize("v", [ALL, WITH_KIDS], ids=["no-kids", "with-kids"])
@pytest.mark.parametrize("field", ["jwk", "jku", "x5u", "x5c", "all"])
def test_header_embedded_keys_are_never_trusted(
    http_trap: JwksServer, field: str, v: TokenVerifier
) -> None:
    """The token carries the attacker's key (inline ``jwk``, ``x5c``) or a URL to it (``jku``,
    ``x5u``) and is signed by that key. RFC 8725 3.10 ("Do Not Trust Received Claims") and
    2.9 (SSRF via header URLs); jwt_tool -X i / -X s; PortSwigger "jwk header injection" and
    "jku header injection". The configured key does not verify -> refused, and no request
    reaches the local HTTP server (requests == 0)."""
    extra: dict[str, Any] = {
        "jwk": _attacker_jwk(),
        "jku": http_trap.url("/jwks.json"),
        "x5u": http_trap.url("/cert.pem"),
        "x5c": [_attacker_cert_b64()],
    }
    chosen = extra if field == "all" else {field: extra[field]}
    token = forge({"alg": "RS256", "kid": "rsa-1", **chosen}, key=ATTACKER_RSA)
    assert rejected(token, v=v).code is Rejection.SIGNATURE
    time.sleep(0.05)
    assert http_trap.requests == 0


def test_header_embedded_configured_key_does_not_help_attacker() -> None:
    """``jwk`` naming the *configured* public key while the attacker signed: still refused."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA.public_key()))
    token = forge({"alg": "RS256", "jwk": jwk}, key=ATTACKER_RSA)
    assert rejected(token).code is Rejection.SIGNATURE


# --- kid abuse -------------------------------------------------------------------------------

KID_ATTACKS: dict[str, Any] = {
    "path traversal": "../../../../../../dev/null",
    "absolute path": "/dev/null",
    "sql injection": "x' UNION SELECT 'AA==' -- ",
    "sql injection 2": "' OR '1'='1",
    "command injection": "key.pem; curl http://127.0.0.1/ | sh",
    "url": "http://127.0.0.1:1/jwks.json",
    "long kid": "k" * 10_000,
    "empty kid": "",
    "NUL in kid": "rsa-1\u0000",
    "kid prefix of real": "rsa-",
    "kid with suffix": "rsa-1 ",
    "int kid": 1,
    "array kid": ["rsa-1"],
    "object kid": {"kid": "rsa-1"},
    "bool kid": True,
    "unknown kid": "no-such-key",
}


@pytest.mark.parametrize("v", [ALL, WITH_KIDS], ids=["no-kids", "with-kids"])
@pytest.mark.parametrize("attack", list(KID_ATTACKS))
def test_kid_abuse(attack: str, v: TokenVerifier) -> None:
    """``kid`` as an injection vector: path traversal (PortSwigger "kid header path
    traversal": sign with an empty/`/dev/null` HMAC key), SQL/command injection, very long,
    non-string, and kids matching no configured key. RFC 8725 2.9 / 3.10; jwt_tool "kid
    injection". Signed by the attacker's RSA key, and also HS256 with an empty secret."""
    kid = KID_ATTACKS[attack]
    rejected(forge({"alg": "RS256", "kid": kid}, key=ATTACKER_RSA), v=v)
    signing_input = f"{b64(raw_json({'alg': 'HS256', 'kid': kid}))}.{b64(raw_json(CLAIMS))}"
    mac = hmac.new(b"", signing_input.encode(), hashlib.sha256).digest()
    rejected(f"{signing_input}.{b64(mac)}", v=v)


def test_kid_naming_another_key_of_the_same_type() -> None:
    """With kids, a token signed by key A but naming key B's kid is checked against B only."""
    other = ed25519.Ed25519PrivateKey.generate()
    v = verifier(vkey("a", ED, "a"), vkey("b", other, "b"))
    accepted(forge({"alg": "EdDSA", "kid": "a"}, key=ED), v=v)
    assert rejected(forge({"alg": "EdDSA", "kid": "b"}, key=ED), v=v).code is Rejection.SIGNATURE


def test_kid_lone_surrogate_with_kids() -> None:
    """A JSON string escape for a lone UTF-16 surrogate ("\\ud800") decodes to a Python str
    that cannot be encoded to UTF-8 strictly. Unauthenticated input (checked before any
    signature): must be TokenRejected. RFC 8725 3.7 ("Use UTF-8"), RFC 8259 8.2."""
    header = b'{"alg":"EdDSA","kid":"\\ud800"}'
    rejected(forge(header, key=ED, alg="EdDSA"), v=WITH_KIDS)


def test_kid_lone_surrogate_without_kids() -> None:
    """Same token, keys without ids: the kid is ignored and the token verifies; the subject
    check then decides (here: the token is for ``alice``, presented as ``bob``)."""
    header = b'{"alg":"EdDSA","kid":"\\ud800"}'
    rejected(forge(header, key=ED, alg="EdDSA"), user="bob")


# --- crit / b64 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "EdDSA", "crit": ["exp"], "exp": 1},
        {"alg": "EdDSA", "crit": ["b64"], "b64": True},
        {"alg": "EdDSA", "crit": []},
        {"alg": "EdDSA", "crit": ["x-unknown"], "x-unknown": 1},
        {"alg": "EdDSA", "crit": "b64"},
        {"alg": "EdDSA", "crit": None},
    ],
    ids=["exp", "b64", "empty", "unknown", "string", "null"],
)
def test_crit_header_refused(header: dict[str, Any]) -> None:
    """``crit`` lists extensions the recipient MUST understand (RFC 7515 4.1.11); we
    implement none, so any crit is refused, even with a valid signature. RFC 8725 3.1."""
    assert rejected(forge(header, key=ED)).code is Rejection.MALFORMED


def test_b64_false_refused() -> None:
    """RFC 7797 unencoded payload ("b64": false), with and without crit, signed correctly over
    the unencoded payload and over the encoded one."""
    payload = json.dumps(CLAIMS)
    for header in ({"alg": "EdDSA", "b64": False, "crit": ["b64"]}, {"alg": "EdDSA", "b64": False}):
        h = b64(raw_json(header))
        unencoded_input = f"{h}.{payload}".encode()
        rejected(f"{h}.{b64(payload.encode())}.{b64(ED.sign(unencoded_input))}")
        rejected(f"{h}..{b64(ED.sign(unencoded_input))}")  # detached form
        rejected(forge(header, key=ED))


# --- claim type confusion --------------------------------------------------------------------

EXP = int(NOW) + 300
CLAIM_CONFUSION: dict[str, bytes] = {
    "sub array": b'{"sub":["alice"],"exp":%d}' % EXP,
    "sub object": b'{"sub":{"name":"alice"},"exp":%d}' % EXP,
    "sub int": b'{"sub":1,"exp":%d}' % EXP,
    "sub null": b'{"sub":null,"exp":%d}' % EXP,
    "sub bool": b'{"sub":true,"exp":%d}' % EXP,
    "sub missing": b'{"exp":%d}' % EXP,
    "exp missing": b'{"sub":"alice"}',
    "exp string": b'{"sub":"alice","exp":"%d"}' % EXP,
    "exp bool": b'{"sub":"alice","exp":true}',
    "exp array": b'{"sub":"alice","exp":[%d]}' % EXP,
    "exp object": b'{"sub":"alice","exp":{"v":%d}}' % EXP,
    "exp null": b'{"sub":"alice","exp":null}',
    "exp huge int": b'{"sub":"alice","exp":' + b"9" * 400 + b"}",
    "exp beyond 2^53": b'{"sub":"alice","exp":9007199254740993}',
    "exp huge float": b'{"sub":"alice","exp":1e300}',
    "exp overflow float": b'{"sub":"alice","exp":1e400}',
    "exp too many digits": b'{"sub":"alice","exp":' + b"1" * 5000 + b"}",
    "exp negative": b'{"sub":"alice","exp":-1}',
    "exp negative huge": b'{"sub":"alice","exp":-1e300}',
    "exp NaN": b'{"sub":"alice","exp":NaN}',
    "exp Infinity": b'{"sub":"alice","exp":Infinity}',
    "exp -Infinity": b'{"sub":"alice","exp":-Infinity}',
    "nbf string": b'{"sub":"alice","exp":%d,"nbf":"0"}' % EXP,
    "nbf NaN": b'{"sub":"alice","exp":%d,"nbf":NaN}' % EXP,
    "iat string": b'{"sub":"alice","exp":%d,"iat":"0"}' % EXP,
    "iat object": b'{"sub":"alice","exp":%d,"iat":{}}' % EXP,
    "nbf future": b'{"sub":"alice","exp":%d,"nbf":%d}' % (EXP, EXP),
    "iat future": b'{"sub":"alice","exp":%d,"iat":%d}' % (EXP, EXP),
    "aud present": b'{"sub":"alice","exp":%d,"aud":"db"}' % EXP,
    "payload array": b'[{"sub":"alice","exp":%d}]' % EXP,
    "payload string": b'"alice"',
    "payload number": b"1",
    "payload null": b"null",
    "payload empty": b"",
    "payload not UTF-8": b'{"sub":"\xff","exp":%d}' % EXP,
    "payload UTF-16": json.dumps({"sub": "alice", "exp": EXP}).encode("utf-16"),
    "payload BOM": b'\xef\xbb\xbf{"sub":"alice","exp":%d}' % EXP,
    "trailing data": b'{"sub":"alice","exp":%d} x' % EXP,
}


@pytest.mark.parametrize("case", list(CLAIM_CONFUSION))
def test_claim_type_confusion(case: str) -> None:
    """Claims of the wrong JSON type, non-JSON numbers, huge values; all signed with the
    right key, so only the claim policy stands in the way. RFC 7519 2 (NumericDate is a JSON
    number), RFC 8725 3.11/3.12 (explicit typing), RFC 8259 6 (NaN/Infinity are not JSON)."""
    rejected(forge({"alg": "EdDSA"}, CLAIM_CONFUSION[case], key=ED))


def test_claim_float_exp_is_fine() -> None:
    """Positive control for the table above: a fractional NumericDate is valid JSON."""
    accepted(forge({"alg": "EdDSA"}, b'{"sub":"alice","exp":%d.5}' % EXP, key=ED))


# --- duplicate members -----------------------------------------------------------------------

DUPLICATES: dict[str, tuple[bytes, bytes]] = {
    "two alg, none first": (b'{"alg":"none","alg":"EdDSA"}', raw_json(CLAIMS)),
    "two alg, none last": (b'{"alg":"EdDSA","alg":"none"}', raw_json(CLAIMS)),
    "two alg, same": (b'{"alg":"EdDSA","alg":"EdDSA"}', raw_json(CLAIMS)),
    "two kid": (b'{"alg":"EdDSA","kid":"x","kid":"ed-1"}', raw_json(CLAIMS)),
    "two sub, user second": (
        b'{"sub":"mallory","sub":"alice","exp":%d}' % EXP,
        b"",
    ),
    "two sub, user first": (b'{"sub":"alice","sub":"mallory","exp":%d}' % EXP, b""),
    "two exp": (b'{"sub":"alice","exp":1,"exp":%d}' % EXP, b""),
    "escaped duplicate": (b'{"alg":"EdDSA","al\\u0067":"none"}', raw_json(CLAIMS)),
    "nested duplicate": (b'{"alg":"EdDSA","x":{"a":1,"a":2}}', raw_json(CLAIMS)),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
@pytest.mark.parametrize("v", [ALL, WITH_KIDS], ids=["no-kids", "with-kids"])
def test_duplicate_json_members(case: str, v: TokenVerifier) -> None:
    """Duplicate member names: parsers disagree on which one wins (first vs last), the
    classic JSON parser-differential. RFC 7515 5.2 (MUST reject or use a parser that returns
    only the lexically last member), RFC 8725 2.6 / 3.12, RFC 8259 4. Signed correctly."""
    first, second = DUPLICATES[case]
    if second:  # duplicate in the header
        token = forge(first, second, key=ED, alg="EdDSA")
    else:  # duplicate in the payload
        token = forge({"alg": "EdDSA"}, first, key=ED)
    assert rejected(token, v=v).code is Rejection.MALFORMED


# --- Unicode tricks --------------------------------------------------------------------------

UNICODE_TRICKS: dict[str, tuple[str, str]] = {
    "NFC sub, NFD user": ("jos\u00e9", "jose\u0301"),
    "NFD sub, NFC user": ("jose\u0301", "jos\u00e9"),
    "zero-width joiner": ("ali\u200dce", "alice"),
    "zero-width space": ("alice\u200b", "alice"),
    "Cyrillic a homoglyph": ("\u0430lice", "alice"),
    "fullwidth": ("\uff41lice", "alice"),
    "trailing NUL": ("alice\u0000", "alice"),
    "leading NUL": ("\u0000alice", "alice"),
    "trailing space": ("alice ", "alice"),
    "case": ("Alice", "alice"),
    "Kelvin sign vs k": ("\u212aate", "Kate"),
    "dotless i": ("\u0131van", "ivan"),
    "RTL override": ("\u202ealice", "alice"),
}


@pytest.mark.parametrize("case", list(UNICODE_TRICKS))
def test_unicode_sub_vs_user(case: str) -> None:
    """sub and the startup user must be equal byte for byte: no normalisation (NFC/NFD, case
    folding, NFKC), no stripping of invisible characters. RFC 8725 3.8 ("Validate Issuer and
    Subject"); Unicode TR36 (confusables). The matching token is accepted (control)."""
    sub, user = UNICODE_TRICKS[case]
    token = forge({"alg": "EdDSA"}, {"sub": sub, "exp": EXP}, key=ED)
    assert rejected(token, user=user).code is Rejection.SUBJECT_MISMATCH
    if "\u0000" not in user:
        assert accepted(token, user=sub).role == sub


def test_unicode_lone_surrogate_sub() -> None:
    """A signed token whose sub is a lone surrogate: the subject comparison must refuse it,
    not crash. RFC 8725 3.7 ("Use UTF-8"), RFC 8259 8.2."""
    token = forge({"alg": "EdDSA"}, b'{"sub":"alice\\udc80","exp":%d}' % EXP, key=ED)
    rejected(token)


# --- deep nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_json(where: str) -> None:
    """JSON nested 5000 deep ("[[[[...]]]]", ~13 KB as base64url, under the 16 KB cap). No
    signature is needed to reach the parser. RFC 8259 9 (implementations may limit nesting);
    a classic parser DoS."""
    deep = b"[" * 5000 + b"]" * 5000
    header = b'{"alg":"EdDSA","x":' + deep + b"}" if where == "header" else b'{"alg":"EdDSA"}'
    payload = b'{"sub":"alice","exp":1,"x":' + deep + b"}" if where == "payload" else CLAIMS
    rejected(forge(header, payload, signature=b"\0" * 64))


def test_moderately_nested_json_is_fine() -> None:
    """Nesting well under the interpreter's recursion limit parses and is refused normally."""
    deep = b"[" * 200 + b"]" * 200
    rejected(forge(b'{"alg":"EdDSA","x":' + deep + b"}", signature=b"\0" * 64))


# --- size ------------------------------------------------------------------------------------


def _token_of_length(length: int) -> str:
    base = forge({"alg": "EdDSA"}, {**CLAIMS, "pad": ""}, key=ED)
    pad = 0
    while True:
        token = forge({"alg": "EdDSA"}, {**CLAIMS, "pad": "x" * pad}, key=ED)
        if len(token) >= length:
            break
        pad += max(1, (length - len(token)) * 3 // 4)
    while len(token) > length:
        pad -= 1
        token = forge({"alg": "EdDSA"}, {**CLAIMS, "pad": "x" * pad}, key=ED)
    assert len(base) <= len(token) <= length
    return token


def test_token_at_and_over_the_cap() -> None:
    """A signed token exactly at TOKEN__MAX_LENGTH is accepted; one character over is
    refused as too large (before any parsing)."""
    v = verifier(vkey("ed", ED), max_length=4096)
    at_cap = _token_of_length(4096)
    # base64 granularity: the length may land a few chars short; pad via payload only
    accepted(at_cap, v=v)
    over = at_cap + "A" * (4097 - len(at_cap))
    assert len(over) == 4097
    assert rejected(over, v=v).code is Rejection.TOO_LARGE


def test_ten_megabyte_token_refused_quickly() -> None:
    """A 10 MB token: refused by length alone, in well under a second."""
    token = forge({"alg": "EdDSA"}, {**CLAIMS, "pad": "x" * 10_000_000}, signature=b"\0" * 64)
    started = time.perf_counter()
    assert rejected(token).code is Rejection.TOO_LARGE
    assert time.perf_counter() - started < 0.5


# --- wrong token type / serialisation --------------------------------------------------------

WRONG_TYPES: dict[str, Callable[[], str]] = {
    "typ JWE": lambda: forge({"alg": "EdDSA", "typ": "JWE"}, key=ED),
    "typ JOSE+JSON": lambda: forge({"alg": "EdDSA", "typ": "JOSE+JSON"}, key=ED),
    "typ secevent": lambda: forge({"alg": "EdDSA", "typ": "secevent+jwt"}, key=ED),
    "typ not string": lambda: forge({"alg": "EdDSA", "typ": ["JWT"]}, key=ED),
    "JWE compact": lambda: ".".join(
        [
            b64(b'{"alg":"RSA-OAEP","enc":"A256GCM"}'),
            b64(b"k" * 256),
            b64(b"iv" * 6),
            b64(b"ciphertext"),
            b64(b"tag" * 5),
        ]
    ),
    "JWE header, 3 segments": lambda: forge(
        {"alg": "RSA-OAEP", "enc": "A256GCM"}, signature=b"x" * 32
    ),
    "JWS JSON serialization": lambda: json.dumps(
        {
            "payload": b64(raw_json(CLAIMS)),
            "signatures": [{"protected": b64(b'{"alg":"EdDSA"}'), "signature": b64(b"s" * 64)}],
        }
    ),
    "flattened JSON serialization": lambda: json.dumps(
        {
            "payload": b64(raw_json(CLAIMS)),
            "protected": b64(b'{"alg":"EdDSA"}'),
            "signature": b64(b"s" * 64),
        }
    ),
    "two segments": lambda: ".".join(jwt.encode(CLAIMS, ED, algorithm="EdDSA").split(".")[:2]),
    "four segments": lambda: jwt.encode(CLAIMS, ED, algorithm="EdDSA") + ".AAAA",
    "empty": lambda: "",
    "dots only": lambda: "..",
    "bearer prefix": lambda: "Bearer " + jwt.encode(CLAIMS, ED, algorithm="EdDSA"),
    "trailing newline": lambda: jwt.encode(CLAIMS, ED, algorithm="EdDSA") + "\n",
    "header not an object": lambda: forge(b'["alg","EdDSA"]', key=ED, alg="EdDSA"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_token_type(case: str) -> None:
    """JWE (5 segments, RFC 7516), JWS JSON serialisation (RFC 7515 7.2), odd ``typ``s:
    cross-JWT confusion, RFC 8725 2.8 / 3.11 ("Use Explicit Typing")."""
    rejected(WRONG_TYPES[case]())


def test_nested_jwt_refused() -> None:
    """A nested JWT (cty "JWT", RFC 7519 5.2 / 7.2 step 8): the outer token, signed by the
    right key, carries a whole inner JWT as its payload. The payload is then a JSON string,
    not a claims object -> refused; the inner token's claims are never used. RFC 8725 3.3."""
    inner = jwt.encode(CLAIMS, ED, algorithm="EdDSA")
    rejected(forge({"alg": "EdDSA", "cty": "JWT"}, inner.encode(), key=ED))
    rejected(forge({"alg": "EdDSA", "cty": "JWT"}, json.dumps(inner).encode(), key=ED))
    # An inner token signed by the attacker inside an outer one signed by us changes nothing.
    evil = jwt.encode({**CLAIMS, "sub": "postgres"}, ATTACKER_ED, algorithm="EdDSA")
    rejected(forge({"alg": "EdDSA", "cty": "JWT"}, json.dumps(evil).encode(), key=ED), "postgres")


def test_every_rejection_is_tokenrejected_never_identity() -> None:
    """A sweep over every hostile token of this module against both verifiers: nothing but
    TokenRejected, whichever verifier, whatever the input."""
    tokens: list[tuple[str, str]] = []
    for case, builder in WRONG_TYPES.items():
        tokens.append((case, builder()))
    for case, payload in CLAIM_CONFUSION.items():
        tokens.append((case, forge({"alg": "EdDSA"}, payload, key=ED)))
    header, payload, signature = _good_parts()
    for case, mutate in SIGNATURE_ENCODING_ATTACKS.items():
        tokens.append((case, f"{header}.{payload}.{mutate(signature)}"))
    for v in (ALL, WITH_KIDS):
        for case, token in tokens:
            try:
                identity = v.verify(token, USER, now=NOW)
            except TokenRejected:
                continue
            except Exception as exc:
                raise AssertionError(
                    f"{case}: {type(exc).__name__} instead of TokenRejected"
                ) from exc
            pytest.fail(f"{case}: accepted as {identity!r}")
