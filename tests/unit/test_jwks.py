"""JWKS key sources (jwtpgproxy.auth.jwks): parsing (RFC 7517/7518/8037), fetching, refreshing.

The HTTP tests serve documents from a real local server on 127.0.0.1 (http.server in a
thread) and count its requests, so "one fetch", "at most one refetch" and "keeps the old
keys" are observed at the wire, not assumed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from harness import JwksServer
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from jwtpgproxy.auth.jwks import (
    MAX_KEYS,
    JwksKeySource,
    _Redirects,
    check_url,
    discovery_url,
    fetch_url,
    jwk_to_key,
    parse_jwks,
    redact_url,
)
from jwtpgproxy.auth.policy import Rejection
from jwtpgproxy.auth.tokens import TokenPolicy, TokenVerifier
from jwtpgproxy.errors import ConfigError, JwksError, TokenRejected

NOW = 1_700_000_000.0


@dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    rsa_b: rsa.RSAPrivateKey
    rsa1024: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    p384: ec.EllipticCurvePrivateKey
    p521: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey
    ed25519_b: ed25519.Ed25519PrivateKey
    ed448: ed448.Ed448PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_b=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa1024=rsa.generate_private_key(public_exponent=65537, key_size=1024),
        p256=ec.generate_private_key(ec.SECP256R1()),
        p384=ec.generate_private_key(ec.SECP384R1()),
        p521=ec.generate_private_key(ec.SECP521R1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        ed25519_b=ed25519.Ed25519PrivateKey.generate(),
        ed448=ed448.Ed448PrivateKey.generate(),
    )


def jwk(private: Any, **members: Any) -> dict[str, Any]:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    data.update(members)
    return {k: v for k, v in data.items() if v is not None}


def jwks(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(entries)}


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(NOW) + 300, "iat": int(NOW) - 10, **extra}


def token(private: Any, algorithm: str, kid: str | None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(), private, algorithm=algorithm, headers=headers)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(kid: str) -> str:
    """A junk token naming ``kid``: what anyone can send without a key."""
    header = b64u(json.dumps({"alg": "EdDSA", "kid": kid}).encode())
    payload = b64u(json.dumps(claims()).encode())
    return f"{header}.{payload}.{b64u(b'0' * 64)}"


# --- Parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "algorithms"),
    [
        ("rsa", {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
        ("p256", {"ES256"}),
        ("p384", {"ES384"}),
        ("p521", {"ES512"}),
        ("ed25519", {"EdDSA"}),
        ("ed448", {"EdDSA"}),
    ],
)
def test_parse_each_key_type(keys: Keys, attr: str, algorithms: set[str]) -> None:
    result = parse_jwks(jwks(jwk(getattr(keys, attr), kid="k1")), source="JWKS__URL")
    assert result.skipped == ()
    (key,) = result.keys
    assert key.algorithms == algorithms
    assert key.kid == "k1"
    assert key.name == "JWKS__URL[kid=k1]"


def test_parse_accepts_bytes_str_and_mapping(keys: Keys) -> None:
    document = jwks(jwk(keys.ed25519, kid="a"))
    text = json.dumps(document)
    for form in (document, text, text.encode()):
        assert [k.kid for k in parse_jwks(form, source="S").keys] == ["a"]


def test_alg_restricts_key(keys: Keys) -> None:
    (key,) = parse_jwks(jwks(jwk(keys.rsa, kid="r", alg="PS256")), source="S").keys
    assert key.algorithms == {"PS256"}
    verifier = TokenVerifier([key], TokenPolicy())
    assert verifier.verify(token(keys.rsa, "PS256", "r"), "alice", now=NOW).algorithm == "PS256"
    with pytest.raises(TokenRejected) as info:
        verifier.verify(token(keys.rsa, "RS256", "r"), "alice", now=NOW)
    assert info.value.code is Rejection.ALGORITHM


@pytest.mark.parametrize(
    ("attr", "members", "reason"),
    [
        ("rsa", {"alg": "ES256"}, "alg 'ES256' cannot be used"),
        ("rsa", {"alg": "HS256"}, "alg 'HS256' cannot be used"),
        ("rsa", {"alg": "none"}, "alg 'none'"),
        ("rsa", {"alg": 5}, "alg '5'"),
        ("p256", {"alg": "ES384"}, "cannot be used"),
        ("ed25519", {"alg": "RS256"}, "cannot be used"),
        ("rsa", {"use": "enc"}, "use 'enc'"),
        ("rsa", {"use": "foo"}, "use 'foo'"),
        ("rsa", {"key_ops": ["encrypt"]}, "key_ops"),
        ("rsa", {"key_ops": "verify"}, "key_ops"),
        ("rsa", {"kid": 7}, "kid is not a string"),
        ("rsa1024", {}, "1024 bits is too weak"),
        ("rsa", {"d": "AQAB"}, "private key material"),
        ("ed25519", {"d": "AQAB"}, "private key material"),
        ("p256", {"crv": "P-384"}, "invalid EC key"),
        ("p256", {"x": "AAAA"}, "invalid EC key"),
        ("rsa", {"n": "!!!"}, "invalid RSA key"),
        ("rsa", {"kty": "RSA-X"}, "unsupported kty"),
        ("rsa", {"kty": None}, "kty missing"),
    ],
)
def test_skipped_keys(keys: Keys, attr: str, members: dict[str, Any], reason: str) -> None:
    entry = jwk(getattr(keys, attr), **{"kid": "k", **members})
    if members.get("kty", "") is None:
        entry.pop("kty", None)
    good = jwk(keys.ed25519_b, kid="good")
    result = parse_jwks(jwks(entry, good), source="S")
    # An unusable key never makes the whole document unusable.
    assert [k.kid for k in result.keys] == ["good"]
    (line,) = result.skipped
    assert reason in line, line
    with pytest.raises(ValueError, match=reason.split("'")[0]):
        jwk_to_key(entry, name="S")


def test_use_sig_accepted(keys: Keys) -> None:
    entry = jwk(keys.p256, kid="k", use="sig", key_ops=["verify"])
    assert parse_jwks(jwks(entry), source="S").keys[0].algorithms == {"ES256"}


def test_oct_never_accepted() -> None:
    secret = b64u(b"x" * 64)
    result = parse_jwks(jwks({"kty": "oct", "k": secret, "kid": "s", "alg": "HS256"}), source="S")
    assert result.keys == ()
    assert "symmetric (oct) keys are never accepted" in result.skipped[0]


def test_secp256k1_and_x25519_skipped() -> None:
    k1 = ec.generate_private_key(ec.SECP256K1())
    raw = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    x_jwk = {"kty": "OKP", "crv": "X25519", "x": b64u(raw), "kid": "b"}
    result = parse_jwks(jwks(jwk(k1, kid="a"), x_jwk), source="S")
    assert result.keys == ()
    assert "secp256k1" in result.skipped[0]
    assert len(result.skipped) == 2


def test_duplicate_kid_keeps_first(keys: Keys) -> None:
    result = parse_jwks(
        jwks(jwk(keys.ed25519, kid="k"), jwk(keys.ed25519_b, kid="k"), jwk(keys.p256)),
        source="S",
    )
    assert len(result.keys) == 2
    first = TokenVerifier(result.keys[:1], TokenPolicy())
    first.verify(token(keys.ed25519, "EdDSA", "k"), "alice", now=NOW)
    assert "duplicate kid" in result.skipped[0]
    assert result.keys[1].name == "S[2]"  # no kid: named by position


@pytest.mark.parametrize(
    "entry", [5, "key", None, [], {"kty": "RSA"}, {"kty": "EC", "crv": "P-256"}, {}]
)
def test_garbage_entries_skipped(entry: Any) -> None:
    result = parse_jwks({"keys": [entry]}, source="S")
    assert result.keys == () and len(result.skipped) == 1


@pytest.mark.parametrize(
    "document",
    [b"", b"not json", b"\xff\xfe", b"[]", b'{"keys": {}}', b'{"key": []}', b"[" * 50000],
)
def test_unusable_documents(document: bytes) -> None:
    with pytest.raises(JwksError, match=r"^S: "):
        parse_jwks(document, source="S")


def test_key_count_cap(keys: Keys) -> None:
    entry = jwk(keys.ed25519)
    result = parse_jwks({"keys": [entry] * (MAX_KEYS + 5)}, source="S")
    assert len(result.keys) == MAX_KEYS
    assert f"5 key(s) beyond the first {MAX_KEYS}" in result.skipped[0]


def test_hmac_token_never_verified_by_jwks_key(keys: Keys) -> None:
    # The classic confusion: HS256 "signed" with the published key (its JWK JSON) as secret.
    entry = jwk(keys.rsa, kid="r")
    (key,) = parse_jwks(jwks(entry), source="S").keys
    secret = json.dumps(entry).encode()
    header = b64u(json.dumps({"alg": "HS256", "kid": "r"}).encode())
    signing_input = f"{header}.{b64u(json.dumps(claims()).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64u(signature)}"
    with pytest.raises(TokenRejected) as info:
        TokenVerifier([key], TokenPolicy()).verify(forged, "alice", now=NOW)
    assert info.value.code is Rejection.ALGORITHM


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://issuer.example/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]/jwks",
        "HTTPS://issuer.example",
    ],
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://issuer.example/jwks",
        "file:///etc/jwks.json",
        "ftp://issuer.example/jwks",
        "data:,{}",
        "https:///nohost",
        "issuer.example/jwks",
        "https://issuer.example:99999/",
    ],
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)


def test_allow_http() -> None:
    assert check_url("http://issuer.example/", allow_http=True)
    with pytest.raises(ValueError):
        check_url("file:///x", allow_http=True)


def test_redact_url() -> None:
    assert redact_url("https://u:p@h.example:8443/x?y=1") == "https://***@h.example:8443/x?y=1"
    assert redact_url("https://h.example/x") == "https://h.example/x"


def test_discovery_url() -> None:
    assert (
        discovery_url("https://login.example/tenant/")
        == "https://login.example/tenant/.well-known/openid-configuration"
    )
    assert (
        discovery_url("https://a.example") == "https://a.example/.well-known/openid-configuration"
    )


def _redirect(old: str, new: str) -> None:
    handler = _Redirects(allow_http=False)
    request = urllib.request.Request(old)
    handler.redirect_request(request, None, 302, "Found", None, new)  # type: ignore[arg-type]


def test_redirect_rules() -> None:
    _redirect("https://a.example/x", "https://b.example/y")
    _redirect("http://127.0.0.1/x", "https://b.example/y")
    for old, new in [
        ("https://a.example/x", "http://a.example/y"),
        ("https://a.example/x", "http://127.0.0.1/y"),  # downgrade, even to loopback
        ("https://a.example/x", "file:///etc/passwd"),
        ("https://a.example/x", "ftp://a.example/y"),
    ]:
        with pytest.raises(urllib.error.HTTPError, match=r"refused redirect"):
            _redirect(old, new)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"url": "https://a", "file": "x"}, "exactly one"),
        ({"url": "http://a.example/jwks"}, "plain http"),
        ({"issuer": "file:///x"}, "only http"),
        ({"url": "https://a", "refresh_seconds": 0}, "positive"),
        ({"url": "https://a", "timeout": -1}, "positive"),
    ],
)
def test_source_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=f"^JWKS__X: .*{match}"):
        JwksKeySource(name="JWKS__X", **kwargs)


# --- A local HTTP server ----------------------------------------------------------------------

Server = JwksServer


@pytest.fixture
def server() -> Iterator[Server]:
    instance = Server()
    yield instance
    instance.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- fetch_url --------------------------------------------------------------------------------


def test_fetch_ok(server: Server) -> None:
    server.json("/jwks", {"keys": []})
    assert json.loads(fetch_url(server.url("/jwks"))) == {"keys": []}


def test_fetch_status(server: Server) -> None:
    with pytest.raises(JwksError, match=r"HTTP 404"):
        fetch_url(server.url("/missing"))
    server.routes["/nc"] = (204, {}, b"")
    with pytest.raises(JwksError, match=r"expected 200"):
        fetch_url(server.url("/nc"))


def test_fetch_size_cap_with_length(server: Server) -> None:
    server.routes["/big"] = (200, {}, b"x" * 2000)
    assert len(fetch_url(server.url("/big"), max_bytes=2000)) == 2000
    with pytest.raises(JwksError, match=r"larger than 1999 bytes"):
        fetch_url(server.url("/big"), max_bytes=1999)


def test_fetch_size_cap_without_length(server: Server) -> None:
    # No Content-Length (body until close): reading stops one byte past the cap.
    server.routes["/big"] = (200, {"X-No-Length": "1"}, b"x" * 100_000)
    with pytest.raises(JwksError, match=r"larger than 1000 bytes"):
        fetch_url(server.url("/big"), max_bytes=1000)


def test_fetch_redirect_same_scheme_followed(server: Server) -> None:
    server.json("/jwks", {"keys": []})
    server.routes["/moved"] = (302, {"Location": "/jwks"}, b"")
    assert fetch_url(server.url("/moved")) == b'{"keys": []}'


def test_fetch_redirect_to_file_refused(server: Server) -> None:
    server.routes["/moved"] = (302, {"Location": "file:///etc/passwd"}, b"")
    with pytest.raises(JwksError, match=r"HTTP 302"):
        fetch_url(server.url("/moved"))


def test_fetch_redirect_loop_refused(server: Server) -> None:
    server.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(JwksError):
        fetch_url(server.url("/loop"))
    assert server.counts["/loop"] <= 11


def test_fetch_timeout(server: Server) -> None:
    server.json("/slow", {"keys": []})
    server.delay = 1.0
    started = time.monotonic()
    with pytest.raises(JwksError, match=r"timed out"):
        fetch_url(server.url("/slow"), timeout=0.2)
    assert time.monotonic() - started < 0.9


def test_fetch_connection_refused() -> None:
    with pytest.raises(JwksError, match=r"^http://127.0.0.1:1/"):
        fetch_url("http://127.0.0.1:1/jwks", timeout=2)


def test_fetch_refuses_scheme_before_connecting() -> None:
    with pytest.raises(JwksError, match=r"only http"):
        fetch_url("file:///etc/passwd")


# --- JwksKeySource ----------------------------------------------------------------------------


def test_start_fetches_once_and_verifies(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a"), jwk(keys.rsa, kid="r")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), name="JWKS__URL")
        await source.start()
        try:
            assert server.counts["/jwks"] == 1
            assert [k.kid for k in source.keys] == ["a", "r"]
            assert source.last_error is None
            verifier = TokenVerifier(key_source=source)
            identity = await verifier.verify_async(
                token(keys.ed25519, "EdDSA", "a"), "alice", now=NOW
            )
            assert identity.key_name == "JWKS__URL[kid=a]"
            assert identity.kid == "a"
            verifier.verify(token(keys.rsa, "RS256", "r"), "alice", now=NOW)
            assert server.counts["/jwks"] == 1  # verifying does no I/O
        finally:
            await source.close()

    run(scenario())


def test_start_failure_raises_config_error(server: Server) -> None:
    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/nothing"), name="JWKS__URL")
        with pytest.raises(JwksError) as info:
            await source.start()
        assert isinstance(info.value, ConfigError)
        assert str(info.value).startswith(f"JWKS__URL: {server.url('/nothing')}: HTTP 404")

    run(scenario())


def test_start_with_no_usable_key_fails(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.rsa1024, kid="weak")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), name="JWKS__URL")
        with pytest.raises(JwksError, match=r"no usable signature key.*too weak"):
            await source.start()

    run(scenario())


def test_oversize_document_refused(server: Server, keys: Keys) -> None:
    document = jwks(jwk(keys.ed25519, kid="a"))
    document["padding"] = "x" * 5000
    server.json("/jwks", document)

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), max_bytes=4096)
        with pytest.raises(JwksError, match=r"larger than 4096 bytes"):
            await source.start()
        assert source.keys == ()

    run(scenario())


def test_unknown_kid_refetches_once_then_verifies(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="old")))
    clock = FakeClock()

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), clock=clock, min_refetch_seconds=30)
        await source.start()
        verifier = TokenVerifier(key_source=source)
        try:
            # The issuer publishes a new key and signs with it before our refresh is due.
            clock.now += 31
            server.json("/jwks", jwks(jwk(keys.ed25519, kid="old"), jwk(keys.p256, kid="new")))
            fresh = token(keys.p256, "ES256", "new")
            with pytest.raises(TokenRejected) as info:
                verifier.verify(fresh, "alice", now=NOW)  # sync: no refetch
            assert info.value.code is Rejection.UNKNOWN_KID
            identity = await verifier.verify_async(fresh, "alice", now=NOW)
            assert identity.kid == "new"
            assert server.counts["/jwks"] == 2
            # A kid nobody has: within the interval, no further fetch.
            with pytest.raises(TokenRejected) as info:
                await verifier.verify_async(unsigned("nobody"), "alice", now=NOW)
            assert info.value.code is Rejection.UNKNOWN_KID
            assert server.counts["/jwks"] == 2
            # After the interval, one more.
            clock.now += 31
            with pytest.raises(TokenRejected):
                await verifier.verify_async(unsigned("nobody"), "alice", now=NOW)
            assert server.counts["/jwks"] == 3
        finally:
            await source.close()

    run(scenario())


def test_no_refetch_storm(server: Server, keys: Keys) -> None:
    """1000 junk tokens with random kids, concurrently and then one by one: at most one
    refetch within the minimum interval."""
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))
    clock = FakeClock()

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), clock=clock, min_refetch_seconds=30)
        await source.start()
        verifier = TokenVerifier(key_source=source)
        clock.now += 60  # the start-up fetch no longer blocks a refetch
        server.delay = 0.1  # keep the refetch in flight while the others arrive
        try:

            async def attempt() -> Rejection:
                try:
                    await verifier.verify_async(unsigned(secrets.token_hex(8)), "alice", now=NOW)
                except TokenRejected as exc:
                    return exc.code
                raise AssertionError("junk verified")

            codes = await asyncio.gather(*(attempt() for _ in range(500)))
            server.delay = 0
            for _ in range(500):
                codes.append(await attempt())
            assert set(codes) == {Rejection.UNKNOWN_KID}
            assert server.counts["/jwks"] == 2  # start + exactly one refetch
        finally:
            await source.close()

    run(scenario())


def test_concurrent_refreshes_share_one_fetch(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))
    server.delay = 0.1

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"))
        results = await asyncio.gather(*(source.refresh() for _ in range(50)))
        assert results == [True] * 50
        assert server.counts["/jwks"] == 1
        await source.close()

    run(scenario())


def test_failing_server_keeps_old_keys(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"))
        await source.start()
        before = source.keys
        verifier = TokenVerifier(key_source=source)
        good = token(keys.ed25519, "EdDSA", "a")
        for broken in [
            (500, {}, b"oops"),
            (200, {}, b"not json"),
            (200, {}, json.dumps(jwks({"kty": "oct", "k": "AAAA"})).encode()),
        ]:
            server.routes["/jwks"] = broken
            assert await source.refresh() is False
            assert source.keys is before
            assert source.last_error is not None
            verifier.verify(good, "alice", now=NOW)
        server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))
        assert await source.refresh() is True
        assert source.last_error is None
        assert source.keys is before  # same content: the same tuple
        await source.close()

    run(scenario())


def test_rotation(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="k1")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"))
        await source.start()
        verifier = TokenVerifier(key_source=source)
        old = token(keys.ed25519, "EdDSA", "k1")
        new = token(keys.rsa_b, "RS256", "k2")
        verifier.verify(old, "alice", now=NOW)
        server.json("/jwks", jwks(jwk(keys.rsa_b, kid="k2")))
        assert await source.refresh() is True
        assert [k.kid for k in source.keys] == ["k2"]
        verifier.verify(new, "alice", now=NOW)
        with pytest.raises(TokenRejected) as info:
            verifier.verify(old, "alice", now=NOW)
        assert info.value.code is Rejection.UNKNOWN_KID
        await source.close()

    run(scenario())


def test_background_refresh(server: Server, keys: Keys) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="k1")))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor()  # runs every fetch thread of this source
        loop.set_default_executor(executor)
        source = JwksKeySource(url=server.url("/jwks"), refresh_seconds=0.05)
        await source.start()
        server.json("/jwks", jwks(jwk(keys.ed25519_b, kid="k2")))
        for _ in range(1000):  # at most 10 s, on a loaded machine
            if [k.kid for k in source.keys] == ["k2"]:
                break
            await asyncio.sleep(0.01)
        assert [k.kid for k in source.keys] == ["k2"]
        await source.close()
        # A fetch already in its worker thread at close() may still land: wait for those
        # threads to end (a fresh executor takes any later fetch). After that, nothing
        # new starts within six refresh periods.
        executor.shutdown(wait=True)
        loop.set_default_executor(ThreadPoolExecutor())
        count = server.counts["/jwks"]
        await asyncio.sleep(0.3)
        assert server.counts["/jwks"] == count  # closed: no more fetches

    run(scenario())


def test_discovery(server: Server, keys: Keys) -> None:
    issuer = server.url("/tenant")
    server.json(
        "/tenant/.well-known/openid-configuration",
        {"issuer": issuer, "jwks_uri": server.url("/keys")},
    )
    server.json("/keys", jwks(jwk(keys.p256, kid="e")))

    async def scenario() -> None:
        source = JwksKeySource(issuer=issuer + "/", name="JWKS__OIDC_ISSUER")
        with pytest.raises(JwksError, match=r"not the configured issuer"):
            # The configured issuer has a trailing slash the document's lacks: not identical.
            await source.start()
        source = JwksKeySource(issuer=issuer, name="JWKS__OIDC_ISSUER")
        await source.start()
        assert [k.kid for k in source.keys] == ["e"]
        assert server.counts["/keys"] == 1
        assert "OIDC discovery" in source.location
        await source.close()

    run(scenario())


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ({"issuer": "https://evil.example", "jwks_uri": "/keys"}, "not the configured issuer"),
        ({"jwks_uri": "/keys"}, "not the configured issuer"),
        ({"issuer": "ISSUER"}, "no jwks_uri"),
        ({"issuer": "ISSUER", "jwks_uri": "file:///etc/passwd"}, "jwks_uri refused"),
        ({"issuer": "ISSUER", "jwks_uri": "http://keys.example/jwks"}, "jwks_uri refused"),
        ([], "not a JSON object"),
    ],
)
def test_discovery_refused(server: Server, document: Any, match: str) -> None:
    issuer = server.url("/i")
    text = json.dumps(document).replace("ISSUER", issuer)
    server.routes["/i/.well-known/openid-configuration"] = (200, {}, text.encode())

    async def scenario() -> None:
        source = JwksKeySource(issuer=issuer)
        with pytest.raises(JwksError, match=match):
            await source.start()

    run(scenario())
    assert server.counts["/keys"] == 0


def test_file_source(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(jwk(keys.ed25519, kid="f1"))))

    async def scenario() -> None:
        source = JwksKeySource(file=path, name="JWKS__FILE")
        await source.start()
        assert [k.kid for k in source.keys] == ["f1"]
        path.write_text(json.dumps(jwks(jwk(keys.ed25519_b, kid="f2"))))
        assert await source.refresh()
        assert [k.kid for k in source.keys] == ["f2"]
        path.write_text("{broken")
        assert not await source.refresh()
        assert [k.kid for k in source.keys] == ["f2"]
        await source.close()
        missing = JwksKeySource(file=tmp_path / "nope.json", name="JWKS__FILE")
        with pytest.raises(JwksError, match=r"^JWKS__FILE: .*cannot read"):
            await missing.start()
        big = tmp_path / "big.json"
        big.write_text(" " * 2000)
        with pytest.raises(JwksError, match=r"larger than"):
            await JwksKeySource(file=big, max_bytes=1000).start()

    run(scenario())


def test_pem_keys_and_jwks_together(server: Server, keys: Keys) -> None:
    from cryptography.hazmat.primitives import serialization

    from jwtpgproxy.auth.tokens import load_verification_key

    pem = (
        keys.ed25519_b.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="j")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"))
        await source.start()
        static = load_verification_key(pem, name="PUBLIC_KEYS__0", kid="p")
        verifier = TokenVerifier([static], TokenPolicy(), key_source=source)
        assert verifier.verify(token(keys.ed25519, "EdDSA", "j"), "alice", now=NOW).key_name
        identity = verifier.verify(token(keys.ed25519_b, "EdDSA", "p"), "alice", now=NOW)
        assert identity.key_name == "PUBLIC_KEYS__0"
        # Without a kid, every EdDSA key is tried, configured ones first.
        assert verifier.verify(token(keys.ed25519, "EdDSA", None), "alice", now=NOW).kid is None
        await source.close()

    run(scenario())


def test_start_error_names_setting_then_location(server: Server) -> None:
    server.routes["/jwks"] = (200, {}, b"<html>")

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"), name="JWKS__URL")
        with pytest.raises(JwksError) as info:
            await source.start()
        assert str(info.value).startswith(f"JWKS__URL: {server.url('/jwks')}: not a JSON")

    run(scenario())


def test_credentials_in_url_never_shown(server: Server) -> None:
    url = server.url("/nothing").replace("http://", "http://user:hunter2@")

    async def scenario() -> None:
        source = JwksKeySource(url=url, name="JWKS__URL")
        with pytest.raises(JwksError) as info:
            await source.start()
        assert "hunter2" not in str(info.value)
        assert "hunter2" not in source.location

    run(scenario())


# --- Emergency revocation and staleness (issue 13, item 9) ------------------------------------


def test_empty_key_set_is_an_emergency_revocation(
    server: Server, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """An issuer that publishes {"keys": []} withdraws every key: the old ones must stop
    verifying at the next refresh (they used to stay trusted for ever)."""
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))

    async def scenario() -> None:
        source = JwksKeySource(url=server.url("/jwks"))
        await source.start()
        verifier = TokenVerifier(key_source=source)
        good = token(keys.ed25519, "EdDSA", "a")
        verifier.verify(good, "alice", now=NOW)
        server.json("/jwks", {"keys": []})
        with caplog.at_level(logging.WARNING, logger="jwtpgproxy.jwks"):
            assert await source.refresh() is True
        assert source.keys == ()
        assert source.last_error is None
        assert any("lists no keys" in r.getMessage() for r in caplog.records)
        with pytest.raises(TokenRejected):
            verifier.verify(good, "alice", now=NOW)
        await source.close()

    run(scenario())


def test_keys_of_a_failing_source_are_dropped_after_max_staleness(
    server: Server, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))
    clock = FakeClock()

    async def scenario() -> None:
        source = JwksKeySource(
            url=server.url("/jwks"), clock=clock, refresh_seconds=300, max_staleness_seconds=3600
        )
        await source.start()
        verifier = TokenVerifier(key_source=source)
        good = token(keys.ed25519, "EdDSA", "a")
        server.routes["/jwks"] = (500, {}, b"down")
        clock.now += 3000
        assert await source.refresh() is False
        verifier.verify(good, "alice", now=NOW)  # within the staleness limit: kept
        clock.now += 601
        with caplog.at_level(logging.ERROR, logger="jwtpgproxy.jwks"):
            assert await source.refresh() is False
        assert source.keys == ()
        assert any("keys dropped" in r.getMessage() for r in caplog.records)
        with pytest.raises(TokenRejected):
            verifier.verify(good, "alice", now=NOW)
        server.json("/jwks", jwks(jwk(keys.ed25519, kid="a")))  # back: keys again
        assert await source.refresh() is True
        verifier.verify(good, "alice", now=NOW)
        await source.close()

    run(scenario())


def test_max_staleness_below_refresh_interval_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="maximum staleness"):
        JwksKeySource(
            url="https://issuer.example/jwks", refresh_seconds=600, max_staleness_seconds=60
        )
