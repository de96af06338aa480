"""Attacks through the running proxy daemon: hostile tokens and hostile protocol bytes.

The token families are those of tests/adversarial/test_jwt_attacks.py (RFC 8725, jwt_tool,
PortSwigger), here driven end to end: a representative token of each family is sent as the
password to a proxy whose upstream is a recorder. Each must get exactly PostgreSQL's
``FATAL 28P01 password authentication failed for user "..."``, open no upstream connection,
and leave the proxy alive and serving.

The protocol attacks follow PostgreSQL's own hardening: CVE-2021-23214 (bytes pipelined after
SSLRequest), ProcessStartupPacket()'s length checks, and PgBouncer CVE-2025-12819 (startup
parameters as an injection vector) -- whatever the proxy forwards must be exactly what
PostgreSQL itself would accept or refuse, and the client can never change the role.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from harness import (
    KeyPair,
    Postgres,
    ProxyProcess,
    RawClient,
    RecordingUpstream,
    mint,
    proxy_dsn,
    wait_sessions_ended,
)

from jwtpgproxy.protocol import wire

USER = "scram_user"
UNIFORM = f'password authentication failed for user "{USER}"'
ATTACKER_RSA = rsa.generate_private_key(65537, 2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: bytes, payload: bytes, signature: bytes) -> str:
    return f"{b64(header)}.{b64(payload)}.{b64(signature)}"


def signed_raw(pair: KeyPair, header: bytes, payload: bytes) -> str:
    """Signed with a configured key (EdDSA), but with header/payload bytes as given."""
    signing_input = f"{b64(header)}.{b64(payload)}".encode()
    signature = pair.private.sign(signing_input)  # type: ignore[call-arg]
    return f"{signing_input.decode()}.{b64(signature)}"


def hostile_tokens(keys: dict[str, KeyPair]) -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": USER, "iat": now, "exp": now + 300}
    payload = json.dumps(claims).encode()
    ed = keys["ed25519"]
    pem = keys["rsa"].public_pem.encode()
    hs_header = b64(json.dumps({"alg": "HS256"}).encode())
    hs_input = f"{hs_header}.{b64(payload)}".encode()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_RSA.public_key()))
    tokens = {
        "alg none": raw_token(b'{"alg":"none"}', payload, b""),
        "alg nOnE": raw_token(b'{"alg":"nOnE"}', payload, b""),
        "alg empty": raw_token(b'{"alg":""}', payload, b"x"),
        "HS256 with RSA public key PEM": f"{hs_input.decode()}."
        + b64(hmac.new(pem, hs_input, hashlib.sha256).digest()),
        "ES256 psychic signature r=s=0": raw_token(b'{"alg":"ES256"}', payload, bytes(64)),
        "EdDSA all-zero signature": raw_token(b'{"alg":"EdDSA"}', payload, bytes(64)),
        "empty signature": raw_token(b'{"alg":"EdDSA"}', payload, b""),
        "jwk header injection": jwt.encode(claims, ATTACKER_RSA, "RS256", headers={"jwk": jwk}),
        "jku header injection": jwt.encode(
            claims, ATTACKER_RSA, "RS256", headers={"jku": "http://127.0.0.1:1/jwks.json"}
        ),
        "kid path traversal": jwt.encode(
            claims, ATTACKER_EC, "ES256", headers={"kid": "../../../../dev/null"}
        ),
        "kid sql injection": jwt.encode(
            claims, ATTACKER_EC, "ES256", headers={"kid": "' UNION SELECT 'key' --"}
        ),
        "crit exp": signed_raw(ed, b'{"alg":"EdDSA","crit":["exp"]}', payload),
        "b64 false": signed_raw(ed, b'{"alg":"EdDSA","b64":false,"crit":["b64"]}', payload),
        "sub as array": signed_raw(
            ed, b'{"alg":"EdDSA"}', json.dumps({**claims, "sub": [USER]}).encode()
        ),
        "exp as string": signed_raw(
            ed, b'{"alg":"EdDSA"}', json.dumps({**claims, "exp": str(now + 300)}).encode()
        ),
        "exp NaN": signed_raw(ed, b'{"alg":"EdDSA"}', b'{"sub":"%s","exp":NaN}' % USER.encode()),
        "duplicate alg": signed_raw(ed, b'{"alg":"none","alg":"EdDSA"}', payload),
        "duplicate sub": signed_raw(
            ed,
            b'{"alg":"EdDSA"}',
            b'{"sub":"postgres","sub":"%s","exp":%d}' % (USER.encode(), now + 300),
        ),
        "sub with zero-width joiner": mint(ed.private, "EdDSA", "scram\u200d_user"),
        "sub with Cyrillic homoglyph": mint(ed.private, "EdDSA", "scr\u0430m_user"),
        "sub with trailing NUL": mint(ed.private, "EdDSA", USER + "\u0000"),
        "typ JWE": signed_raw(ed, b'{"alg":"EdDSA","typ":"JWE"}', payload),
        "JWE compact (5 segments)": ".".join(
            b64(x) for x in (b'{"alg":"dir"}', b"", b"iv", b"ct", b"tag")
        ),
        "JWS JSON serialization": json.dumps({"payload": b64(payload), "signatures": []}),
        "nested JWT": signed_raw(
            ed, b'{"alg":"EdDSA","cty":"JWT"}', json.dumps(mint(ed.private, "EdDSA", USER)).encode()
        ),
        "signature with non-alphabet chars": mint(ed.private, "EdDSA", USER) + "!!!!",
    }
    return tokens


def _assert_uniform_28p01(proxy: ProxyProcess, token: str, case: str) -> None:
    client = RawClient(proxy.port)
    try:
        result = client.login(USER, token)
        error = result.error()
        assert error is not None, (case, result.messages)
        assert (error.get("S"), error.get("C"), error.get("M")) == ("FATAL", "28P01", UNIFORM), (
            case,
            error,
        )
        assert set(error) <= {"S", "V", "C", "M"}, (case, error)  # no detail, no hint
        assert client.is_closed(), case
    finally:
        client.close()


def _assert_good_token_still_works(
    proxy: ProxyProcess, recorder: RecordingUpstream, token: str
) -> None:
    assert proxy.alive
    wait_sessions_ended(proxy)
    assert recorder.accepted == 0
    client = RawClient(proxy.port)
    client.login(USER, token)
    client.close()
    deadline = time.monotonic() + 5
    while recorder.accepted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.accepted == 1  # positive control: a good token does reach upstream


def test_hostile_tokens_through_the_proxy(
    proxy_to_recorder: ProxyProcess,
    recording_upstream: RecordingUpstream,
    keys: dict[str, KeyPair],
    token_for: Callable[..., str],
) -> None:
    """Each family of tests/adversarial/test_jwt_attacks.py, once, end to end."""
    tokens = hostile_tokens(keys)
    for case, token in tokens.items():
        _assert_uniform_28p01(proxy_to_recorder, token, case)
    log = proxy_to_recorder.log()
    assert "Traceback" not in log
    assert "internal error" not in log
    for token in tokens.values():
        if len(token) > 40:
            assert token not in log
    _assert_good_token_still_works(proxy_to_recorder, recording_upstream, token_for(USER))


def test_token_just_over_the_cap(
    start_proxy: Callable[..., ProxyProcess],
    recording_upstream: RecordingUpstream,
    keys: dict[str, KeyPair],
    token_for: Callable[..., str],
) -> None:
    """TOKEN__MAX_LENGTH=1024: a 1024-character token gets the normal 28P01 (it is merely
    wrong); one character more makes the PasswordMessage itself oversized -> 08P01, refused
    on its length word. Neither reaches upstream."""
    proxy = start_proxy(
        TOKEN__MAX_LENGTH="1024",
        UPSTREAM__HOST="127.0.0.1",
        UPSTREAM__PORT=str(recording_upstream.port),
        UPSTREAM__SSLMODE="disable",
        UPSTREAM__SSLROOTCERT=None,
        UPSTREAM__SPARE_CONNECTIONS="0",  # the recorder counts connections (conftest.py)
    )
    _assert_uniform_28p01(proxy, "A" * 1024, "at cap")
    for size in (1025, 16385, 10 * 1024 * 1024):
        client = RawClient(proxy.port)
        client.start_tls()
        client.send(wire.startup_message({"user": USER}))
        client.read_until_end()
        client.send(b"p" + struct.pack("!i", size + 5) + b"A" * 100)
        error = client.read_until_end().error()
        assert error is not None and error["C"] == "08P01", size
        client.close()
    _assert_good_token_still_works(proxy, recording_upstream, token_for(USER))


def test_deeply_nested_header_gets_28p01(
    proxy_to_recorder: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    token = raw_token(b'{"alg":"EdDSA","x":' + deep + b"}", b"{}", bytes(64))
    _assert_uniform_28p01(proxy_to_recorder, token, "deep nesting")
    assert "Traceback" not in proxy_to_recorder.log()


def test_lone_surrogate_sub_gets_28p01(
    proxy_to_recorder: ProxyProcess, keys: dict[str, KeyPair]
) -> None:
    """Needs a token signed by a configured key: an issuer that passes through unvalidated
    user input as ``sub`` (JSON escapes allow lone surrogates)."""
    payload = b'{"sub":"scram_user\\udc80","exp":%d}' % (time.time() + 300)
    token = signed_raw(keys["ed25519"], b'{"alg":"EdDSA"}', payload)
    _assert_uniform_28p01(proxy_to_recorder, token, "lone surrogate sub")


# --- protocol attacks ------------------------------------------------------------------------


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket | ssl.SSLSocket, wait: float = 5) -> tuple[bytes, bool]:
    """Everything the proxy sends until it closes (True) or ``wait`` passes (False)."""
    data = b""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except (ConnectionError, ssl.SSLError):
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _error_of(data: bytes) -> dict[str, str] | None:
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    while (message := buffer.read_typed(1 << 20)) is not None:
        if message.tag == b"E":
            return wire.decode_fields(message.body)
    return None


@pytest.mark.parametrize("size", [1, 8, 100, 5000])
@pytest.mark.parametrize("writes", ["one write", "two back-to-back writes"])
def test_ssl_request_injection(
    proxy_to_recorder: ProxyProcess,
    recording_upstream: RecordingUpstream,
    token_for: Callable[..., str],
    size: int,
    writes: str,
) -> None:
    """CVE-2021-23214: plaintext appended to the SSLRequest by a man in the middle. In one
    write it is refused with 08P01 before 'S'; in a second write sent at once it may arrive
    after 'S' -- then it is fed to the TLS handshake, which fails. Either way it is never
    read as a protocol message: no AuthenticationCleartextPassword, nothing upstream."""
    injected = wire.startup_message({"user": "injected_user", "database": "postgres"})
    injected += wire.password_message(token_for("injected_user").encode())
    injected = (injected * (size // len(injected) + 1))[:size]
    sock = _raw(proxy_to_recorder.port)
    if writes == "one write":
        sock.sendall(wire.ssl_request() + injected)
    else:
        sock.sendall(wire.ssl_request())
        sock.sendall(injected)
        # The attacker has nothing more to send. Arriving after 'S', a few bytes are only
        # the start of a TLS record, which the handshake would wait on until the login
        # deadline; the end of the stream makes it fail now.
        sock.shutdown(socket.SHUT_WR)
    data, closed = _read_all(sock)
    sock.close()
    assert closed
    if data[:1] == b"S":
        assert len(data) == 1 or data[1:2] == b"\x15", data[:20]  # at most a TLS alert
    else:
        error = _error_of(data)
        assert error is not None and error["C"] == "08P01", data[:100]
        assert data[:1] == b"E"
    assert "injected_user" not in proxy_to_recorder.log()
    assert proxy_to_recorder.alive
    wait_sessions_ended(proxy_to_recorder)
    assert recording_upstream.accepted == 0


@pytest.mark.parametrize("length", [0, 4, 7, 10001, 2**31 - 1, -1, -(2**31)])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_malformed_startup_length(proxy: ProxyProcess, length: int, tls: bool) -> None:
    """ProcessStartupPacket(): "invalid length of startup packet" unless 8 <= len <= 10000
    -> 08P01, decided on the length word alone (nothing else is sent)."""
    client = RawClient(proxy.port)
    if tls:
        client.start_tls()
    client.send(struct.pack("!i", length) + struct.pack("!I", wire.PROTOCOL_3_0))
    result = client.read_until_end()
    error = result.error()
    assert error is not None and error["C"] == "08P01", (length, result.messages)
    assert client.is_closed()
    assert proxy.alive


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0",
        b"\0\0\0\x50\0\3\0\0user\0",
        wire.ssl_request()[:5],
        b"\x16\x03\x01",  # a TLS record header, then nothing
    ],
    ids=["half length", "half startup", "half SSLRequest", "half ClientHello"],
)
def test_truncated_then_eof(proxy: ProxyProcess, data: bytes) -> None:
    """A partial packet, then the client half-closes: a clean close, no crash."""
    sock = _raw(proxy.port)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    _, closed = _read_all(sock)
    sock.close()
    assert closed
    assert proxy.alive


def _after_startup(proxy: ProxyProcess, user: str = USER) -> RawClient:
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(wire.startup_message({"user": user, "database": "postgres"}))
    assert client.read_until_end().tags == [b"R"]
    return client


@pytest.mark.parametrize("tag", [b"Q", b"E", b"S", b"\0", b"P", b"d", b"F"])
def test_wrong_tag_instead_of_password(proxy: ProxyProcess, tag: bytes) -> None:
    client = _after_startup(proxy)
    client.send(wire.typed_message(tag, b"select 1\0"))
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01", tag
    assert client.is_closed()


def test_terminate_instead_of_password(proxy: ProxyProcess) -> None:
    client = _after_startup(proxy)
    client.send(wire.terminate())
    result = client.read_until_end()
    assert result.closed and result.messages == []
    assert proxy.alive


def test_password_claims_more_then_eof(
    proxy_to_recorder: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    client = _after_startup(proxy_to_recorder)
    client.send(b"p" + struct.pack("!i", 1000) + b"eyJhbGciOi")
    client.sock.close()
    wait_sessions_ended(proxy_to_recorder)
    assert proxy_to_recorder.alive
    assert recording_upstream.accepted == 0


def test_password_claims_less(
    proxy_to_recorder: ProxyProcess,
    recording_upstream: RecordingUpstream,
    token_for: Callable[..., str],
) -> None:
    """The length word covers only a prefix of the token: the prefix is the password (and
    fails), the rest is never interpreted -- nothing reaches upstream."""
    token = token_for(USER).encode()
    client = _after_startup(proxy_to_recorder)
    prefix = token[:20] + b"\0"
    client.send(b"p" + struct.pack("!i", 4 + len(prefix)) + prefix + token[20:] + b"\0")
    error = client.read_until_end().error()
    assert error is not None and (error["C"], error["M"]) == ("28P01", UNIFORM)
    # ... and a length that leaves no NUL at the end of the body is a protocol violation.
    client = _after_startup(proxy_to_recorder)
    client.send(b"p" + struct.pack("!i", 4 + 20) + token + b"\0")
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01"
    wait_sessions_ended(proxy_to_recorder)
    assert recording_upstream.accepted == 0


def test_duplicate_user_refused_before_password(
    proxy_to_recorder: ProxyProcess, recording_upstream: RecordingUpstream
) -> None:
    """Two ``user`` parameters: PostgreSQL would take the last; the proxy refuses the
    ambiguity outright (08P01) before asking for a password."""
    body = struct.pack("!I", wire.PROTOCOL_3_0) + b"user\0scram_user\0user\0postgres\0\0"
    client = RawClient(proxy_to_recorder.port)
    client.start_tls()
    client.send(struct.pack("!i", len(body) + 4) + body)
    result = client.read_until_end()
    assert result.tags == [b"E"]
    error = result.error()
    assert error is not None and error["C"] == "08P01"
    assert recording_upstream.accepted == 0


@pytest.mark.parametrize(
    "body",
    [
        b"user\0scram_user\0\0postgres\0\0",  # NUL where a name should be
        b"user\0scram_user\0database",  # unterminated
        b"user\0scram_\xffuser\0\0",  # not UTF-8
        b"\0",  # no parameters at all
    ],
    ids=["empty name", "unterminated", "bad utf8", "no user"],
)
def test_malformed_startup_parameters(proxy: ProxyProcess, body: bytes) -> None:
    packet = struct.pack("!I", wire.PROTOCOL_3_0) + body
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(struct.pack("!i", len(packet) + 4) + packet)
    result = client.read_until_end()
    assert result.tags == [b"E"], result.messages
    error = result.error()
    assert error is not None and error["C"] in ("08P01", "28000"), error
    assert client.is_closed()


def test_forwarded_startup_is_exactly_what_the_client_sent(
    proxy_to_recorder: ProxyProcess,
    recording_upstream: RecordingUpstream,
    token_for: Callable[..., str],
) -> None:
    """PgBouncer CVE-2025-12819 class: the proxy forwards the client's startup parameters
    (search_path, options, ...) verbatim -- no re-quoting, no interpretation -- so PostgreSQL
    applies its own rules to them; the role is the verified one."""
    params = {
        "database": "postgres",
        "options": "-c search_path=public,pg_catalog -c role=postgres",
        "search_path": '"$user", public; DROP TABLE x; --',
        "application_name": "app' OR '1'='1",
    }
    client = RawClient(proxy_to_recorder.port)
    client.login(USER, token_for(USER), **params)
    client.close()
    deadline = time.monotonic() + 5
    while not recording_upstream.received and time.monotonic() < deadline:
        time.sleep(0.05)
    data = bytes(recording_upstream.received)
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    body = buffer.read_untyped(wire.MAX_STARTUP_PACKET_LENGTH)
    assert body is not None
    forwarded = wire.decode_initial_packet(body)
    assert isinstance(forwarded, wire.StartupMessage)
    assert forwarded.parameters["user"] == USER
    for name, value in params.items():
        assert forwarded.parameters[name] == value


def _describe(exc: psycopg.Error) -> str:
    """The server's FATAL text (psycopg leaves sqlstate unset for connection failures); the
    part before it names host and port, which differ between proxy and direct."""
    text = str(exc)
    return "error " + (text.split("FATAL:", 1)[1].strip() if "FATAL:" in text else text)


def _direct_outcome(pg: Postgres, **params: str) -> str:
    try:
        with psycopg.connect(pg.dsn(), connect_timeout=10, **params) as conn:  # type: ignore[arg-type]
            row = conn.execute("select current_user, session_user").fetchone()
            return f"ok {row}"
    except psycopg.Error as exc:
        return _describe(exc)


def _proxied_outcome(proxy: ProxyProcess, token: str, **params: str) -> str:
    dsn = proxy_dsn(proxy, USER, None)
    try:
        with psycopg.connect(dsn, password=token, connect_timeout=10, **params) as conn:  # type: ignore[arg-type]
            row = conn.execute("select current_user, session_user").fetchone()
            return f"ok {row}"
    except psycopg.Error as exc:
        return _describe(exc)


@pytest.mark.parametrize(
    "params",
    [
        {"options": "-c role=postgres"},
        {"options": "-c session_authorization=postgres"},
        {"options": "-c search_path=public -c default_transaction_read_only=on"},
        {"options": "-c log_statement=all"},  # superuser-only GUC
        {"options": "-c search_path=public;DROP\\ TABLE\\ x"},
        {"application_name": "x'; DROP TABLE y; --"},
        {"options": "--role=postgres"},
    ],
    ids=[
        "role",
        "session_authorization",
        "read-only",
        "suset guc",
        "injection",
        "app name",
        "long form",
    ],
)
def test_dangerous_startup_parameters_match_postgresql(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str], params: dict[str, str]
) -> None:
    """Through the proxy, the outcome (error SQLSTATE, or current_user/session_user) equals
    that of a direct connection with the same parameters: PostgreSQL decides, and the role
    stays the token's."""
    direct = _direct_outcome(pg, **params)
    proxied = _proxied_outcome(proxy, token_for(USER), **params)
    print(f"{params}: direct={direct!r} proxied={proxied!r}")
    # During login the proxy relays severity, SQLSTATE and message only (DETAIL and HINT
    # go to its log), so the direct outcome is compared without them.
    direct = re.sub(r"\n(DETAIL|HINT):.*", "", direct, flags=re.DOTALL)
    assert proxied == direct
    if proxied.startswith("ok"):
        assert proxied == f"ok ('{USER}', '{USER}')"


def test_oversized_database_parameter(
    proxy: ProxyProcess, pg: Postgres, token_for: Callable[..., str]
) -> None:
    """A 10 000-byte database name makes the packet exceed 10 000 bytes: 08P01, as
    PostgreSQL. A 9 000-byte one fits; PostgreSQL itself would truncate it to 63 bytes
    (and answer 3D000), the proxy refuses it outright rather than forward a name PostgreSQL
    would read differently -- either way no session is opened."""
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(wire.startup_message({"user": USER, "database": "d" * 10_000}))
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01"
    client.close()
    direct = _direct_outcome(pg, dbname="d" * 9000)
    assert direct == f'error database "{"d" * 63}" does not exist'
    proxied = _proxied_outcome(proxy, token_for(USER), dbname="d" * 9000)
    assert proxied.startswith("error"), proxied
    assert proxy.alive


@pytest.fixture
def long_role(pg: Postgres) -> Iterator[str]:
    """A role whose name is exactly 63 bytes (NAMEDATALEN - 1) with the proxy's password."""
    name = "adv_trunc_" + "a" * 53
    assert len(name) == 63
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as conn:
        conn.execute(f'drop role if exists "{name}"')
        conn.execute(f"create role \"{name}\" login password '{pg.password}'")
    yield name
    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as conn:
        conn.execute(f'drop role if exists "{name}"')


def test_overlong_user_cannot_become_its_63_byte_prefix(
    proxy: ProxyProcess, long_role: str, token_for: Callable[..., str]
) -> None:
    """A token for ``<63-byte role>_x`` (sub == startup user, so the proxy's check passes)
    must not log in as ``<63-byte role>``: PostgreSQL's ProcessStartupPacket() truncates the
    user name to NAMEDATALEN-1 bytes. Either the proxy refuses names PostgreSQL would
    truncate, or the session's role equals the token's sub."""
    sub = long_role + "_x"
    dsn = proxy_dsn(proxy, sub, None)
    try:
        with psycopg.connect(dsn, password=token_for(sub), connect_timeout=10) as conn:
            row = conn.execute("select current_user").fetchone()
    except psycopg.OperationalError:
        return  # refused: fine
    assert row == (sub,)


def test_thousands_of_tiny_packets(proxy: ProxyProcess, token_for: Callable[..., str]) -> None:
    """A 9 000-byte startup packet and the password sent one byte per TLS record (~9 500
    writes): the login completes and the session works."""
    client = RawClient(proxy.port)
    client.start_tls()
    stream = wire.startup_message(
        {"user": USER, "database": "postgres", "application_name": "p" * 9000}
    )
    assert len(stream) < wire.MAX_STARTUP_PACKET_LENGTH
    for i in range(len(stream)):
        client.send(stream[i : i + 1])
    assert client.read_until_end().tags == [b"R"]
    password = wire.password_message(token_for(USER).encode())
    for i in range(len(password)):
        client.send(password[i : i + 1])
    result = client.read_until_end(stop_tags=(b"E", b"Z"))
    assert result.tags[-1] == b"Z", result.messages
    query = wire.typed_message(b"Q", b"select 41 + 1\0")
    for i in range(len(query)):
        client.send(query[i : i + 1])
    result = client.read_until_end(stop_tags=(b"E", b"Z"))
    rows = [body for tag, body in result.messages if tag == b"D"]
    assert rows and b"42" in rows[0]
    client.close()
    assert proxy.alive


def test_many_ssl_and_gss_requests_in_a_row(proxy: ProxyProcess) -> None:
    """GSSENCRequest twice, or SSLRequest inside TLS: protocol violations, not loops."""
    client = RawClient(proxy.port)
    gss = struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE)
    client.send(gss)
    assert client.recv_exact(1) == b"N"
    client.send(gss)
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01"
    client = RawClient(proxy.port)
    client.start_tls()
    client.send(wire.ssl_request())
    error = client.read_until_end().error()
    assert error is not None and error["C"] == "08P01"
    assert proxy.alive
