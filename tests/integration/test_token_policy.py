"""Token policy and key management end to end: issuer styles, JWKS/OIDC, rotation on
SIGHUP, HMAC secrets, revocation and expiry of live sessions, read-only scope, the verify
command. Each accepted style has a failing twin, and every failure is the uniform 28P01
with the reason in the log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import (
    JwksServer,
    KeyPair,
    ProxyProcess,
    RawClient,
    free_port,
    mint,
    proxy_dsn,
    wait_for,
)

USER = "scram_user"


def refused(proxy: ProxyProcess, token: str, reason: str, **params: str) -> None:
    """The token is refused with the uniform 28P01, and the log names ``reason``."""
    error = RawClient(proxy.port).login(USER, token, **params).error()
    assert error is not None
    assert (error["C"], error["M"]) == (
        "28P01",
        f'password authentication failed for user "{USER}"',
    )
    assert wait_for(lambda: f"token rejected: {reason}" in proxy.log(), timeout=3), proxy.log()


def accepted(proxy: ProxyProcess, token: str, **params: str) -> str:
    with psycopg.connect(proxy_dsn(proxy, USER, token, **params)) as conn:
        row = conn.execute("select current_user").fetchone()
        assert row is not None
        return str(row[0])


# --- A JWKS / OIDC issuer on 127.0.0.1 --------------------------------------------------


class Issuer(JwksServer):
    """Serves OIDC discovery and a JWKS document (replaceable), counting requests."""

    def __init__(self) -> None:
        super().__init__()
        self.jwks: dict[str, Any] = {"keys": []}
        self.json(
            "/.well-known/openid-configuration",
            {"issuer": self.base_url, "jwks_uri": self.url("/jwks")},
        )
        self.json("/jwks", lambda: self.jwks)

    def publish(self, *pairs: tuple[str, Any]) -> None:
        keys = []
        for kid, private in pairs:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
            jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
            keys.append(jwk)
        self.jwks = {"keys": keys}


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    served = Issuer()
    yield served
    served.close()


def oidc_token(private: Any, kid: str, iss: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": USER, "iat": now, "exp": now + 300, "iss": iss, "aud": "pgproxy", **claims}
    return jwt.encode(payload, private, algorithm="RS256", headers={"kid": kid})


# --- Identity-provider (OIDC) style ---------------------------------------------------------


def test_oidc_style_with_discovery_kid_iss_aud(
    start_proxy: Callable[..., ProxyProcess], issuer: Issuer
) -> None:
    key_a = rsa.generate_private_key(65537, 2048)
    issuer.publish(("key-a", key_a))
    proxy = start_proxy(
        PUBLIC_KEYS__0=None,
        PUBLIC_KEYS__1=None,
        PUBLIC_KEYS__7=None,
        JWKS__OIDC_ISSUER=issuer.base_url,
        JWKS__MIN_REFETCH_SECONDS="60",
        TOKEN__AUDIENCE="pgproxy",
    )
    assert accepted(proxy, oidc_token(key_a, "key-a", issuer.base_url)) == USER
    # Failing twins: wrong iss, wrong aud, unknown kid.
    refused(proxy, oidc_token(key_a, "key-a", "https://evil.example"), "issuer")
    refused(proxy, oidc_token(key_a, "key-a", issuer.base_url, aud="other-service"), "audience")
    jwks_fetches = issuer.counts["/jwks"]
    stranger = rsa.generate_private_key(65537, 2048)
    for _ in range(5):  # a storm of unknown kids causes at most one refetch
        refused(proxy, oidc_token(stranger, "who-knows", issuer.base_url), "unknown_kid")
    assert issuer.counts["/jwks"] - jwks_fetches <= 1


def test_key_rotation_by_sighup_with_session_open(
    start_proxy: Callable[..., ProxyProcess], issuer: Issuer
) -> None:
    old, new = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    issuer.publish(("old", old))
    proxy = start_proxy(
        PUBLIC_KEYS__0=None,
        PUBLIC_KEYS__1=None,
        PUBLIC_KEYS__7=None,
        JWKS__URL=issuer.url("/jwks"),
        JWKS__MIN_REFETCH_SECONDS="3600",  # only SIGHUP may bring the new keys
        TOKEN__ISSUER=issuer.base_url,
        TOKEN__AUDIENCE="pgproxy",
    )
    session = psycopg.connect(proxy_dsn(proxy, USER, oidc_token(old, "old", issuer.base_url)))
    try:
        issuer.publish(("new", new))  # the issuer rotates: the old key is gone
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in proxy.log(), timeout=5), proxy.log()
        assert accepted(proxy, oidc_token(new, "new", issuer.base_url)) == USER
        refused(proxy, oidc_token(old, "old", issuer.base_url), "unknown_kid")
        # The session opened before the rotation is untouched.
        assert session.execute("select 1").fetchone() == (1,)
    finally:
        session.close()


# --- Neon style: RS256, scope and tenant claims ---------------------------------------


def test_neon_style_scope_and_tenant(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair]
) -> None:
    rsa_key = keys["rsa"]
    proxy = start_proxy(
        TOKEN__TENANT_CLAIM="tenant_id",
        TOKEN__TENANT="0f0e4bd6c2cd4ff3a4d6a2e1f5a7d3c1",
        TOKEN__REQUIRED_SCOPES="tenant",
    )

    def neon(**claims: Any) -> str:
        base = {"scope": "tenant", "tenant_id": "0f0e4bd6c2cd4ff3a4d6a2e1f5a7d3c1"}
        return mint(rsa_key.private, "RS256", USER, **{**base, **claims})

    assert accepted(proxy, neon()) == USER
    refused(proxy, neon(tenant_id="aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), "tenant")
    refused(proxy, neon(scope="pageserverapi"), "scope")


# --- ClusterCockpit style: EdDSA, roles array, iat, no exp -----------------------------


def _cc_token(pair: KeyPair, iat: float, **claims: Any) -> str:
    payload = {"sub": USER, "roles": ["user", "api"], "iat": int(iat), **claims}
    return jwt.encode(payload, pair.private, algorithm="EdDSA")  # type: ignore[arg-type]


def test_clustercockpit_style_without_exp(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair]
) -> None:
    strict = start_proxy()
    refused(strict, _cc_token(keys["ed25519"], time.time()), "claims")  # exp required by default
    relaxed = start_proxy(
        TOKEN__REQUIRE_EXP="false", TOKEN__MAX_AGE_SECONDS="3600", TOKEN__REQUIRED_CLAIMS="roles"
    )
    assert accepted(relaxed, _cc_token(keys["ed25519"], time.time())) == USER
    refused(relaxed, _cc_token(keys["ed25519"], time.time() - 7200), "expired")  # too old
    no_roles = jwt.encode(
        {"sub": USER, "iat": int(time.time())}, keys["ed25519"].private, algorithm="EdDSA"
    )
    refused(relaxed, no_roles, "claims")


# --- AIStore style: HS256 shared secret, 24 h TTL, revocation ---------------------------

SECRET = "aistore-shared-secret-of-at-least-32-bytes!"


def _hs_token(ttl: float = 86400, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": USER, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def test_aistore_style_hmac_and_revocation_file(
    start_proxy: Callable[..., ProxyProcess], tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# revoked tokens\njti already-revoked\n")
    proxy = start_proxy(
        TOKEN__HMAC_SECRETS__0=SECRET,
        TOKEN__REVOCATION_FILE=str(revoked),
        TOKEN__REVOCATION_POLL_SECONDS="0.2",
    )
    assert accepted(proxy, _hs_token(jti="fine")) == USER
    refused(proxy, _hs_token(jti="already-revoked"), "revoked")
    refused(
        proxy,
        jwt.encode({"sub": USER, "exp": int(time.time()) + 60}, "x" * 40, "HS256"),
        "signature",
    )
    # The file changes: the next login with that token is refused, without a restart.
    reloads = proxy.log().count("revocation list reloaded")
    revoked.write_text("jti already-revoked\njti fine\n")
    assert wait_for(lambda: proxy.log().count("revocation list reloaded") > reloads)
    refused(proxy, _hs_token(jti="fine"), "revoked")
    # Key confusion: an HS256 token "signed" with the configured RSA public key's PEM as
    # the HMAC secret never verifies -- public keys are never HMAC secrets.
    rsa_pem = keys["rsa"].public_pem
    header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').rstrip(b"=").decode()
    payload = (
        base64.urlsafe_b64encode(json.dumps({"sub": USER, "exp": int(time.time()) + 60}).encode())
        .rstrip(b"=")
        .decode()
    )
    forged_sig = hmac.new(rsa_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    forged = (
        f"{header}.{payload}." + base64.urlsafe_b64encode(forged_sig.digest()).rstrip(b"=").decode()
    )
    refused(proxy, forged, "signature")


def test_revocation_ends_live_session_with_readable_fatal(
    start_proxy: Callable[..., ProxyProcess], tmp_path: Path
) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    metrics_port = str(free_port())
    proxy = start_proxy(
        TOKEN__HMAC_SECRETS__0=SECRET,
        TOKEN__REVOCATION_FILE=str(revoked),
        TOKEN__REVOCATION_POLL_SECONDS="0.2",
        TOKEN__END_SESSIONS_ON_REVOCATION="true",
        METRICS__PORT=metrics_port,
    )
    keep = psycopg.connect(proxy_dsn(proxy, USER, _hs_token(jti="keep")))
    cut = psycopg.connect(proxy_dsn(proxy, USER, _hs_token(jti="cut")))
    try:
        revoked.write_text("jti cut\n")
        assert wait_for(lambda: "session ended by policy: reason=revoked" in proxy.log())
        with pytest.raises(psycopg.errors.AdminShutdown, match="token was revoked"):
            cut.execute("select 1")
        assert keep.execute("select 1").fetchone() == (1,)  # only the revoked one ends
    finally:
        keep.close()
        cut.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert 'jwtpgproxy_sessions_ended_by_policy_total{reason="revoked"} 1.0' in text


def test_expiry_ends_live_session_between_messages(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair]
) -> None:
    """With TOKEN__END_SESSIONS_ON_EXPIRY the session ends when exp passes -- even in the
    middle of a large COPY, the FATAL lands between two messages, so the client reads a
    clean error instead of a garbled stream."""
    proxy = start_proxy(TOKEN__END_SESSIONS_ON_EXPIRY="true", TOKEN__LEEWAY_SECONDS="0")
    pair = keys["ed25519"]
    idle = psycopg.connect(proxy_dsn(proxy, USER, mint(pair.private, pair.algorithm, USER, 3)))
    busy = psycopg.connect(proxy_dsn(proxy, USER, mint(pair.private, pair.algorithm, USER, 3)))
    lasting = psycopg.connect(proxy_dsn(proxy, USER, mint(pair.private, pair.algorithm, USER)))
    try:
        received = 0
        # A set-returning function in the select list streams (ProjectSet); in FROM it
        # would be materialized in full before the first row.
        copy_query = "COPY (SELECT repeat('x', 200), generate_series(1, 50000000)) TO STDOUT"
        with (
            pytest.raises(psycopg.errors.AdminShutdown, match="token expired"),
            busy.cursor() as cur,
            cur.copy(copy_query) as copy,
        ):
            for chunk in copy:
                received += len(chunk)
        assert received > 1_000_000  # it was streaming when the token expired
        # The idle session's token (same 3 s lifetime) expires too: its end is logged.
        assert wait_for(lambda: proxy.log().count("session ended by policy: reason=expired") >= 2)
        with pytest.raises(psycopg.errors.AdminShutdown, match="token expired"):
            idle.execute("select 1")
        assert lasting.execute("select 1").fetchone() == (1,)
    finally:
        for conn in (idle, busy, lasting):
            conn.close()
    assert "session ended by policy: reason=expired" in proxy.log()


# --- Read-only scope, databases, role claim, lifetime --------------------------------------


def test_read_only_scope_cannot_be_undone_by_startup_parameter(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair]
) -> None:
    proxy = start_proxy(TOKEN__READ_ONLY_SCOPE="db:read")
    pair = keys["ed25519"]
    reader = mint(pair.private, pair.algorithm, USER, scope="db:read other")
    writer = mint(pair.private, pair.algorithm, USER, scope="other")
    options = "'-c default_transaction_read_only=off'"
    with psycopg.connect(proxy_dsn(proxy, USER, reader, options=options)) as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("on",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("create temp table t (x int)")
    with psycopg.connect(proxy_dsn(proxy, USER, writer)) as conn:
        assert conn.execute("show default_transaction_read_only").fetchone() == ("off",)


def test_databases_claim_role_claim_and_max_lifetime(
    start_proxy: Callable[..., ProxyProcess], keys: dict[str, KeyPair]
) -> None:
    pair = keys["ed25519"]
    proxy = start_proxy(
        TOKEN__DATABASES_CLAIM="dbs",
        TOKEN__ROLE_CLAIM="preferred_username",
        TOKEN__MAX_LIFETIME_SECONDS="3600",
    )

    def token(ttl: float = 300, **claims: Any) -> str:
        base = {"preferred_username": USER, "dbs": ["postgres", "proxytest"]}
        return mint(pair.private, pair.algorithm, "someone-else", ttl, **{**base, **claims})

    assert accepted(proxy, token()) == USER
    assert accepted(proxy, token(), dbname="proxytest") == USER
    refused(proxy, token(dbs=["proxytest"]), "database")
    refused(proxy, token(preferred_username="md5_user"), "subject_mismatch")
    refused(proxy, token(ttl=7200), "lifetime")


# --- The verify command --------------------------------------------------------------------


def test_verify_command_names_the_failing_rule(
    base_env: dict[str, str], keys: dict[str, KeyPair]
) -> None:
    pair = keys["ed25519"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PUBLIC_KEY", "UPSTREAM__", "DOWNSTREAM__", "TOKEN__"))
    }
    env.update(base_env)
    env["TOKEN__ISSUER"] = "https://issuer.example"
    good = mint(pair.private, pair.algorithm, USER, iss="https://issuer.example")
    bad = mint(pair.private, pair.algorithm, USER, iss="https://elsewhere.example")

    def run(token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jwtpgproxy", "verify", "-"],
            input=token,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    assert "ACCEPTED: role=scram_user key=PUBLIC_KEYS__0 alg=EdDSA" in ok.stdout
    assert 'claim iss: "https://issuer.example"' in ok.stdout
    assert good not in ok.stdout
    no = run(bad)
    assert no.returncode == 1
    assert "REJECTED: rule issuer:" in no.stdout
    assert bad not in no.stdout
