"""Everything that must NOT get in, and the proxy's behaviour when things go wrong."""

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
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from harness import (
    KeyPair,
    Postgres,
    ProxyProcess,
    RawClient,
    RecordingUpstream,
    TcpForwarder,
    free_port,
    proxy_dsn,
    wait_for,
    wait_sessions_ended,
)

from jwtpgproxy.protocol import wire


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, object], payload: dict[str, object], signature: bytes) -> str:
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        ]
    )


def bad_tokens(keys: dict[str, KeyPair], token_for: Callable[..., str]) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "scram_user", "exp": now + 300}
    rsa_pem = keys["rsa"].public_pem.encode()
    hs_header = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    hs_signature = hmac.new(rsa_pem, hs_header.encode(), hashlib.sha256).digest()
    return {
        "wrong key": token_for("scram_user", key="other"),
        "expired": token_for("scram_user", ttl=-3600),
        "not yet valid": token_for("scram_user", nbf=now + 3600),
        "sub mismatch": token_for("md5_user"),
        "sub differs in case": token_for("SCRAM_USER"),
        "missing exp": _signed_without_exp(keys["ed25519"]),
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, claims, b""),
        "HS256 with public key PEM as secret": hs_header + "." + b64url(hs_signature),
        "exp as numeric string": token_for("scram_user", exp=str(now + 300)),
        "garbage": "not-a-token",
        "empty": "",
    }


def _signed_without_exp(pair: KeyPair) -> str:
    header = b64url(b'{"alg":"EdDSA","typ":"JWT"}')
    payload = b64url(json.dumps({"sub": "scram_user", "iat": int(time.time())}).encode())
    signing_input = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{b64url(pair.private.sign(signing_input))}"  # type: ignore[call-arg]


def test_bad_tokens_get_uniform_28P01_and_nothing_upstream(
    proxy_to_recorder: ProxyProcess,
    recording_upstream: RecordingUpstream,
    keys: dict[str, KeyPair],
    token_for: Callable[..., str],
) -> None:
    for case, token in bad_tokens(keys, token_for).items():
        client = RawClient(proxy_to_recorder.port)
        result = client.login("scram_user", token)
        error = result.error()
        assert error is not None, case
        # Exactly PostgreSQL's wording and code, the same for every reason.
        assert error["S"] == "FATAL", case
        assert error["C"] == "28P01", case
        assert error["M"] == 'password authentication failed for user "scram_user"', case
        assert client.is_closed(), case
        client.close()
    assert proxy_to_recorder.alive
    wait_sessions_ended(proxy_to_recorder)
    assert recording_upstream.accepted == 0
    log = proxy_to_recorder.log()
    for reason in ("signature", "expired", "not_yet_valid", "subject_mismatch", "claims"):
        assert f'reason="token rejected: {reason}' in log
    assert "algorithm 'none' not allowed" in log
    # No HMAC secret is configured, so an HS256 token has no key at all -- in particular
    # the RSA public key is never tried as an HMAC secret.
    assert "no configured key verifies HS256" in log

    # Positive control: the same proxy does open upstream for a good token, so the zero
    # above is not an artefact of a broken recorder.
    client = RawClient(proxy_to_recorder.port)
    client.login("scram_user", token_for("scram_user"))
    client.close()
    deadline = time.monotonic() + 5
    while recording_upstream.accepted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recording_upstream.accepted == 1


def test_asyncpg_sees_invalid_password_error(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    async def main() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(
                host="127.0.0.1",
                port=proxy.port,
                user="scram_user",
                password=token_for("scram_user", ttl=-100),
                database="postgres",
                ssl="require",
            )
        assert info.value.sqlstate == "28P01"

    import asyncio

    asyncio.run(main())


def test_plaintext_client_refused_before_password(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    client = RawClient(proxy.port)
    result = client.login("scram_user", token_for("scram_user"), tls=False)
    # No AuthenticationCleartextPassword was sent: the FATAL comes first.
    assert result.tags == [b"E"]
    error = result.error()
    assert error is not None
    assert error["C"] == "28000"
    assert "encryption is required" in error["M"]
    assert client.is_closed()

    with pytest.raises(psycopg.OperationalError, match="encryption is required"):
        psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"), sslmode="disable"))


def test_plaintext_allowed_when_configured(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(
        DOWNSTREAM__SSLMODE="disable", DOWNSTREAM__CERTFILE=None, DOWNSTREAM__KEYFILE=None
    )
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"), sslmode="prefer")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select current_user").fetchone() == ("scram_user",)
        assert conn.info.pgconn.ssl_in_use is False


def test_bytes_pipelined_after_ssl_request_are_refused(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    """CVE-2021-23214: a man in the middle appends a plaintext startup packet to the
    client's SSLRequest. The proxy must not answer 'S' and then act on those bytes."""
    client = RawClient(proxy.port)
    injected = wire.startup_message({"user": "scram_user", "database": "postgres"})
    client.send(wire.ssl_request() + injected)
    result = client.read_until_end()
    assert result.tags == [b"E"]
    error = result.error()
    assert error is not None and error["C"] == "08P01"
    assert client.is_closed()
    assert "unencrypted data after SSL request" in proxy.log()


def test_gssenc_request_answered_n_then_tls_works(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    client = RawClient(proxy.port)
    client.send(wire.ssl_request()[:4] + (80877104).to_bytes(4, "big"))  # GSSENCRequest
    assert client.recv_exact(1) == b"N"
    result = client.login("scram_user", token_for("scram_user"))
    assert result.tags[-1] == b"Z"
    assert b"K" in result.tags
    client.close()


def test_protocol_violations(proxy: ProxyProcess) -> None:
    cases = {
        "oversized startup": (20000).to_bytes(4, "big") + b"\0\3\0\0",
        "protocol 2.0": wire.startup_message({"user": "u"}, version=2 << 16),
        "protocol 4.0": wire.startup_message({"user": "u"}, version=4 << 16),
        "length below 8": (4).to_bytes(4, "big"),
    }
    expected = {
        "oversized startup": "08P01",
        "protocol 2.0": "0A000",
        "protocol 4.0": "0A000",
        "length below 8": "08P01",
    }
    for name, data in cases.items():
        client = RawClient(proxy.port)
        if name.startswith("protocol"):
            client.start_tls()
        client.send(data)
        result = client.read_until_end()
        error = result.error()
        assert error is not None, name
        assert error["C"] == expected[name], name
        assert client.is_closed(), name
    assert proxy.alive


def test_password_message_over_cap_refused(
    start_proxy: Callable[..., ProxyProcess], recording_upstream: RecordingUpstream
) -> None:
    proxy = start_proxy(TOKEN__MAX_LENGTH="1024")
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(wire.startup_message({"user": "scram_user"}))
    assert client.read_until_end().tags == [b"R"]
    # Claim a 100 MB password: refused on the header, before any body is sent.
    client.send(b"p" + (100 * 1024 * 1024).to_bytes(4, "big"))
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01"
    assert client.is_closed()


def test_replication_connections_refused(
    proxy: ProxyProcess, token_for: Callable[..., str]
) -> None:
    client = RawClient(proxy.port)
    result = client.login("scram_user", token_for("scram_user"), replication="database")
    error = result.error()
    assert error is not None and error["C"] == "28000"
    assert b"R" not in result.tags  # refused before the password is asked


def test_authentication_timeout_closes_stalled_clients(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(AUTHENTICATION_TIMEOUT="1")
    silent = RawClient(proxy.port)  # connects and says nothing
    halfway = RawClient(proxy.port)
    halfway.start_tls()
    halfway.send(wire.startup_message({"user": "scram_user"}))  # never sends the password
    started = time.monotonic()
    assert silent.is_closed(wait=5)
    assert halfway.is_closed(wait=5)
    assert time.monotonic() - started < 4
    # ...and a well-behaved client still gets in.
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_authentication_timeout_is_fatal_57014_like_postgresql(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """PostgreSQL answers a login that outlives authentication_timeout with FATAL 57014
    "canceling authentication due to timeout"; so does the proxy."""
    proxy = start_proxy(AUTHENTICATION_TIMEOUT="1")
    client = RawClient(proxy.port)
    try:
        client.start_tls()
        client.send(wire.startup_message({"user": "scram_user"}))
        assert client.read_message()[0] == b"R"  # asked for the password; never sent
        result = client.read_until_end(stop_tags=(b"E",))
    finally:
        client.close()
    fields = result.error()
    assert fields is not None
    assert (fields["S"], fields["C"]) == ("FATAL", "57014")
    assert fields["M"] == "canceling authentication due to timeout"


def test_upstream_down_gives_08006_then_recovers(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    port = free_port()
    proxy = start_proxy(
        UPSTREAM__HOST="127.0.0.1",
        UPSTREAM__PORT=str(port),
        UPSTREAM__SSLMODE="disable",
        UPSTREAM__SSLROOTCERT=None,
    )
    client = RawClient(proxy.port)
    error = client.login("scram_user", token_for("scram_user")).error()
    assert error is not None
    assert error["C"] == "08006"
    assert "could not connect to the upstream" in error["M"]
    assert proxy.alive

    forwarder = TcpForwarder(port, (pg.host, pg.port))
    forwarder.start()
    try:
        with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
            assert conn.execute("select current_user").fetchone() == ("scram_user",)
    finally:
        forwarder.stop()


def test_wrong_upstream_password_is_a_server_side_error(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    secret = "definitely-wrong-upstream-password"
    proxy = start_proxy(UPSTREAM__PASSWORD=secret)
    client = RawClient(proxy.port)
    result = client.login("scram_user", token_for("scram_user"))
    error = result.error()
    assert error is not None
    assert error["C"] == "28000"
    assert "could not log in to the upstream" in error["M"]
    assert secret not in json.dumps(error)
    assert secret not in proxy.log()


def test_upstream_errors_relayed(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    with pytest.raises(psycopg.OperationalError, match='database "no_such_db" does not exist'):
        psycopg.connect(
            proxy_dsn(proxy, "scram_user", token_for("scram_user"), dbname="no_such_db")
        )
    client = RawClient(proxy.port)
    client.sock.settimeout(10)
    result = client.login("scram_user", token_for("scram_user"), database="no_such_db")
    error = result.error()
    assert error is not None and error["C"] == "3D000"
    assert "F" not in error and "R" not in error  # upstream's source locations stripped


def test_logs_hold_no_secrets(
    start_proxy: Callable[..., ProxyProcess],
    pg: Postgres,
    keys: dict[str, KeyPair],
    token_for: Callable[..., str],
) -> None:
    proxy = start_proxy()
    good = token_for("scram_user")
    with psycopg.connect(proxy_dsn(proxy, "scram_user", good)) as conn:
        conn.execute("select 1")
    bad = bad_tokens(keys, token_for)
    for token in bad.values():
        RawClient(proxy.port).login("scram_user", token).error()
    assert proxy.stop() == 0
    log = proxy.log()
    assert "connection closed: user=scram_user" in log
    for token in [good, *bad.values()]:
        if len(token) > 10:
            assert token not in log
            assert token.split(".")[-1] not in log or len(token.split(".")[-1]) < 10
    assert pg.password not in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"UPSTREAM__PASSWORD": None}, "UPSTREAM__PASSWORD: required but not set"),
        ({"UPSTREAM__PORT": "not-a-port"}, "UPSTREAM__PORT:"),
        ({"UPSTREAM__SSLMODE": "sometimes"}, "UPSTREAM__SSLMODE:"),
        ({"DOWNSTREAM__CERTFILE": "/nonexistent/cert.pem"}, "DOWNSTREAM__CERTFILE"),
        ({"PUBLIC_KEYS__0": "garbage"}, "PUBLIC_KEYS__0: not a PEM public key"),
        ({"DOWNSTREAM__IP": "not-an-ip"}, "DOWNSTREAM__IP:"),
    ],
)
def test_bad_configuration_is_one_line_and_nonzero_exit(
    base_env: dict[str, str], overrides: dict[str, str | None], expected: str
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PUBLIC_KEY", "UPSTREAM__", "DOWNSTREAM__"))
    }
    env.update(base_env)
    env["DOWNSTREAM__PORT"] = str(free_port())
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = subprocess.run(
        [sys.executable, "-m", "jwtpgproxy"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_private_key_given_as_public_key_refused(
    base_env: dict[str, str], keys: dict[str, KeyPair]
) -> None:
    env = {**os.environ, **base_env, "PUBLIC_KEYS__0": keys["ed25519"].private_pem.decode()}
    result = subprocess.run(
        [sys.executable, "-m", "jwtpgproxy"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "PUBLIC_KEYS__0: is a private key" in result.stderr
    assert "PRIVATE KEY" not in result.stderr


def test_sigterm_drains_open_session_then_exits_zero(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(SHUTDOWN_TIMEOUT="10")
    conn = psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    conn.execute("begin")
    conn.execute("create temp table drained (x int)")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "draining" in proxy.log()), proxy.log()
    # Not accepting any more...
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")), connect_timeout=2)
    # ...but the open session finishes its transaction.
    conn.execute("insert into drained values (1)")
    conn.execute("commit")
    conn.close()
    assert proxy.process.wait(10) == 0
    assert "shutdown complete" in proxy.log()
