"""A malicious (or impersonated) upstream server against the real proxy daemon.

A fake PostgreSQL server (threads, 127.0.0.1, free port) answers the proxy's login with one
misbehaviour per test. The proxy (``python -m jwtpgproxy``) is driven by a raw client with a
*valid* token. For each: the client gets one clean FATAL with the expected SQLSTATE, nothing
the proxy did not validate reaches the client (no upstream bytes, no marker), the proxy stays
alive and keeps serving, and its memory does not balloon.

References: CVE-2021-23222 (libpq processed unencrypted bytes sent after 'S'), RFC 5802
(SCRAM: the server must prove knowledge of the password with its signature), PostgreSQL
protocol 55.2 (message flow during start-up), 55.7 (message formats).
"""

from __future__ import annotations

import base64
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from harness import KeyPair, ProxyProcess, RawClient, RawResult, mint, rss_kib, wait_for

from jwtpgproxy.protocol import wire

MARKER = b"MALICIOUS-UPSTREAM-MARKER"
PASSWORD = "fake-upstream-password"


class Conn:
    """The server side of one proxy->upstream connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(30)
        self.buffer = b""

    def recv_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("proxy closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_untyped(self) -> bytes:
        (length,) = struct.unpack("!i", self.recv_exact(4))
        return self.recv_exact(length - 4)

    def read_typed(self) -> tuple[bytes, bytes]:
        tag, length = struct.unpack("!ci", self.recv_exact(5))
        return tag, self.recv_exact(length - 4)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hold(self) -> None:
        """Keep the connection open, reading and dropping whatever comes, until the proxy
        closes it (bounded by the socket timeout): a stall, or a wait for the verdict."""
        while self.sock.recv(65536):
            pass

    def startup(self, *, answer_ssl: bytes = b"N") -> dict[bytes, bytes]:
        """Read the SSLRequest (answered with ``answer_ssl``) and the StartupMessage."""
        body = self.read_untyped()
        if struct.unpack("!I", body[:4])[0] == wire.SSL_REQUEST_CODE:
            self.send(answer_ssl)
            if answer_ssl != b"N":
                return {}
            body = self.read_untyped()
        parts = body[4:].split(b"\0")
        return dict(zip(parts[0:-2:2], parts[1:-2:2], strict=True))

    def ready(self, *, key: bytes = wire.backend_key_data(7, b"\1\2\3\4")) -> None:
        self.send(
            wire.authentication(wire.AUTH_OK)
            + wire.typed_message(b"S", b"server_version\x0016.0\x00")
            + key
            + wire.typed_message(b"Z", b"I")
        )

    def scram_first(self) -> str:
        """AuthenticationSASL, read the initial response; return the client nonce."""
        self.send(wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
        tag, body = self.read_typed()
        assert tag == b"p"
        mechanism, _, rest = body.partition(b"\0")
        assert mechanism == b"SCRAM-SHA-256"
        client_first = rest[4:].decode()
        return client_first.split("r=", 1)[1]

    def scram_continue(self, nonce: str, *, iterations: int = 4096, suffix: str = "srv") -> None:
        salt = base64.b64encode(b"saltsaltsalt").decode()
        first = f"r={nonce}{suffix},s={salt},i={iterations}".encode()
        self.send(wire.authentication(wire.AUTH_SASL_CONTINUE, first))


Scenario = Callable[[Conn], None]


def trust(c: Conn) -> None:
    c.startup()
    c.ready()
    with contextlib.suppress(OSError, ConnectionError):
        while True:
            tag, _ = c.read_typed()
            if tag == b"X":
                return
            if tag == b"Q":
                c.send(wire.typed_message(b"C", b"SELECT 1\0") + wire.typed_message(b"Z", b"I"))


def scram_bad_signature(c: Conn) -> None:
    c.startup()
    c.scram_continue(c.scram_first())
    c.read_typed()  # client-final
    bogus = base64.b64encode(bytes(32)).decode()
    c.send(wire.authentication(wire.AUTH_SASL_FINAL, f"v={bogus}".encode()))
    c.ready()  # and then pretends all is well


def scram_huge_nonce(c: Conn) -> None:
    c.startup()
    c.scram_continue(c.scram_first(), suffix="N" * 5000)
    c.ready()


def scram_oversized_message(c: Conn) -> None:
    c.startup()
    c.scram_continue(c.scram_first(), suffix="N" * 70_000)
    c.ready()


def scram_iteration_bomb(c: Conn) -> None:
    c.startup()
    c.scram_continue(c.scram_first(), iterations=10**9)
    c.ready()


def ok_before_sasl_final(c: Conn) -> None:
    c.startup()
    c.scram_continue(c.scram_first())
    c.read_typed()
    c.ready()  # AuthenticationOk without AuthenticationSASLFinal


def ok_without_any_sasl_exchange(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"))
    c.read_typed()
    c.ready()


def error_without_sqlstate(c: Conn) -> None:
    c.startup()
    c.send(wire.typed_message(b"E", b"SFATAL\0M" + MARKER + b"\0\0"))


def error_one_megabyte(c: Conn) -> None:
    c.startup()
    c.send(wire.typed_message(b"E", b"SFATAL\0C28000\0M" + MARKER * 42000 + b"\0\0"))


def lying_length_long(c: Conn) -> None:
    c.startup()
    c.send(b"R" + struct.pack("!i", 1000) + b"\0\0\0\0" + MARKER)
    c.sock.close()


def lying_length_short(c: Conn) -> None:
    c.startup()
    c.send(b"R" + struct.pack("!i", 3) + MARKER)
    c.hold()


def lying_length_short_after_auth(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK) + b"S" + struct.pack("!i", 2) + MARKER)
    c.hold()


def ssl_then_plaintext(c: Conn) -> None:
    """CVE-2021-23222: 'S' and, in the same segment, a plaintext 'login succeeded'."""
    c.startup(answer_ssl=b"S" + wire.authentication(wire.AUTH_OK) + MARKER)
    c.hold()


def ssl_then_plaintext_later(c: Conn) -> None:
    """As above, but the plaintext follows 'S' in a separate segment, once the proxy has
    begun its TLS handshake (its ClientHello has arrived)."""
    c.startup(answer_ssl=b"S")
    assert c.sock.recv(1, socket.MSG_PEEK) == b"\x16"  # a TLS handshake record
    c.send(wire.authentication(wire.AUTH_OK) + wire.typed_message(b"Z", b"I") + MARKER)
    c.hold()


def stall(c: Conn) -> None:
    c.startup()
    c.hold()


def stall_mid_scram(c: Conn) -> None:
    c.startup()
    c.scram_first()
    c.hold()


def close_mid_login(c: Conn) -> None:
    c.startup()
    c.scram_first()
    c.sock.close()


def close_after_auth_ok(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK) + wire.typed_message(b"S", b"a\0b\0"))
    c.sock.close()


def parameter_status_100mb(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK) + b"S" + struct.pack("!i", 100 * 1024 * 1024 + 4))
    chunk = b"x" * (1024 * 1024)
    with contextlib.suppress(OSError):
        for _ in range(100):
            c.send(chunk)


def many_parameter_status(c: Conn) -> None:
    """2500 ParameterStatus messages of 60 KB each (150 MB), every one under the per-message
    cap, before ReadyForQuery."""
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK))
    value = b"v" * 60_000
    with contextlib.suppress(OSError):
        for i in range(2500):
            c.send(wire.typed_message(b"S", b"p%d\0" % i + value + b"\0"))
        c.send(wire.typed_message(b"Z", b"I"))
    c.hold()


def many_notices(c: Conn) -> None:
    """2500 NoticeResponses of 60 KB each (150 MB) before ReadyForQuery."""
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK))
    notice = wire.typed_message(b"N", b"SNOTICE\0C00000\0M" + b"n" * 60_000 + b"\0\0")
    with contextlib.suppress(OSError):
        for _ in range(2500):
            c.send(notice)
        c.send(wire.typed_message(b"Z", b"I"))
    c.hold()


def garbage_after_auth(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK) + wire.typed_message(b"D", MARKER))
    c.hold()


def backend_key_twice(c: Conn) -> None:
    c.startup()
    key = wire.backend_key_data(7, b"\1\2\3\4")
    c.ready(key=key + key)


def gss_auth(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_GSS))
    c.hold()


def md5_bad_salt(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_MD5_PASSWORD, b"abc"))
    c.hold()


def negotiate_upwards(c: Conn) -> None:
    c.startup()
    c.send(wire.typed_message(b"v", struct.pack("!Ii", (3 << 16) | 9, 0)))
    c.ready()


def bad_ready_for_query(c: Conn) -> None:
    c.startup()
    c.send(wire.authentication(wire.AUTH_OK) + wire.typed_message(b"Z", b"I" + MARKER))
    c.hold()


def plaintext_error_instead_of_ssl_answer(c: Conn) -> None:
    c.startup(answer_ssl=wire.typed_message(b"E", b"SFATAL\0C0A000\0M" + MARKER + b"\0\0"))
    c.hold()


class FakeUpstream:
    """Runs ``self.scenario`` for every connection the proxy opens."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.scenario: Scenario = trust
        self.connections = 0
        #: One per accepted connection, set once it is over: the scenario has ended and
        #: the proxy has closed its side (or the scenario closed the connection itself).
        self.ended: list[threading.Event] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            ended = threading.Event()
            self.ended.append(ended)
            self.connections += 1
            thread = threading.Thread(
                target=self._serve, args=(sock, self.scenario, ended), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket, scenario: Scenario, ended: threading.Event) -> None:
        conn = Conn(sock)
        try:
            scenario(conn)
            if sock.fileno() != -1:
                conn.hold()  # until the proxy closes its side
        except (OSError, ConnectionError, struct.error):
            pass  # the proxy hung up on us: expected in most scenarios
        except Exception as exc:  # a bug in the fake itself: report it
            self.errors.append(f"{scenario.__name__}: {exc!r}")
        finally:
            sock.close()
            ended.set()

    def last_ended(self, timeout: float = 10) -> bool:
        """Whether the latest connection is over within ``timeout`` seconds."""
        return self.ended[-1].wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._accept.join(2)
        self.listener.close()


@pytest.fixture(scope="module")
def signer() -> KeyPair:
    return KeyPair("ed25519", ed25519.Ed25519PrivateKey.generate(), "EdDSA")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.close()
    assert not fake.errors, fake.errors


def _proxy(
    tmp: Path,
    signer: KeyPair,
    upstream: FakeUpstream,
    timeout: str = "3",
    require_auth: str | None = "md5,scram-sha-256,none",
    **more: str,
) -> ProxyProcess:
    # The fake answers most scenarios after "trust" (AuthenticationOk at once), which the
    # default UPSTREAM__REQUIRE_AUTH refuses over an unverified path: allow it here, except
    # where a test checks that default (require_auth=None).
    extra = {} if require_auth is None else {"UPSTREAM__REQUIRE_AUTH": require_auth}
    return ProxyProcess(
        {
            **extra,
            "PUBLIC_KEYS__0": signer.public_pem,
            "UPSTREAM__HOST": "127.0.0.1",
            "UPSTREAM__PORT": str(upstream.port),
            "UPSTREAM__PASSWORD": PASSWORD,
            "UPSTREAM__SSLMODE": "prefer",
            "UPSTREAM__CONNECT_TIMEOUT": "3",
            # The fake plays its scenario on every connection it accepts: a spare would be
            # one more that no login uses.
            "UPSTREAM__SPARE_CONNECTIONS": "0",
            "DOWNSTREAM__SSLMODE": "disable",
            "AUTHENTICATION_TIMEOUT": timeout,
            "LOG_LEVEL": "INFO",
            **more,
        },
        tmp / "proxy.log",
    )


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, signer: KeyPair, upstream: FakeUpstream
) -> Iterator[ProxyProcess]:
    with _proxy(tmp_path_factory.mktemp("malicious"), signer, upstream) as process:
        yield process


def login(proxy: ProxyProcess, signer: KeyPair, *, timeout: float = 15) -> RawResult:
    client = RawClient(proxy.port, timeout=timeout)
    try:
        return client.login("alice", mint(signer.private, "EdDSA", "alice"), tls=False)
    finally:
        client.close()


def assert_clean_fatal(result: RawResult, sqlstate: str) -> dict[str, str]:
    """Exactly: our AuthenticationCleartextPassword, then one FATAL ErrorResponse."""
    assert result.tags == [b"R", b"E"], result.messages
    assert result.messages[0][1] == struct.pack("!i", wire.AUTH_CLEARTEXT_PASSWORD)
    error = result.error()
    assert error is not None
    assert error.get("S") == "FATAL", error
    assert error.get("C") == sqlstate, error
    for _, body in result.messages:
        assert MARKER not in body
    return error


def assert_still_serving(proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream) -> None:
    assert proxy.alive
    upstream.scenario = trust
    result = login(proxy, signer)
    assert result.tags[-1] == b"Z", result.messages


CASES: dict[str, tuple[Scenario, str]] = {
    "bad SCRAM server signature": (scram_bad_signature, "28000"),
    "huge SCRAM nonce (5000 chars)": (scram_huge_nonce, "28000"),
    "SCRAM server-first over the login message cap": (scram_oversized_message, "08P01"),
    "SCRAM iteration count 10^9": (scram_iteration_bomb, "28000"),
    "AuthenticationOk before SASLFinal": (ok_before_sasl_final, "28000"),
    "AuthenticationOk right after SASL start": (ok_without_any_sasl_exchange, "28000"),
    "ErrorResponse of 1 MB": (error_one_megabyte, "08P01"),
    "length claims more, then close": (lying_length_long, "08006"),
    "length below 4": (lying_length_short, "08P01"),
    "length below 4 after AuthenticationOk": (lying_length_short_after_auth, "08P01"),
    "S then plaintext in the same segment (CVE-2021-23222)": (ssl_then_plaintext, "08P01"),
    "S then plaintext after the ClientHello (CVE-2021-23222)": (ssl_then_plaintext_later, "08006"),
    "close mid-SCRAM": (close_mid_login, "08006"),
    "close after AuthenticationOk": (close_after_auth_ok, "08006"),
    "ParameterStatus claiming 100 MB": (parameter_status_100mb, "08P01"),
    "DataRow during login": (garbage_after_auth, "08P01"),
    "BackendKeyData twice": (backend_key_twice, "08P01"),
    "GSSAPI authentication": (gss_auth, "28000"),
    "MD5 salt of 3 bytes": (md5_bad_salt, "08P01"),
    "NegotiateProtocolVersion upwards": (negotiate_upwards, "08P01"),
    "ReadyForQuery of wrong length": (bad_ready_for_query, "08P01"),
    "plaintext ErrorResponse instead of S/N": (plaintext_error_instead_of_ssl_answer, "08P01"),
}


TIMEOUT_MESSAGE = "canceling authentication due to timeout"


@pytest.mark.parametrize("case", list(CASES))
def test_malicious_upstream(
    case: str, proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """Refused on the misbehaviour itself, not by the authentication deadline (3 s): a
    PBKDF2 bomb computed, or a wait for bytes that never come, would end in the timeout's
    error instead; and the proxy closes the upstream connection."""
    scenario, sqlstate = CASES[case]
    upstream.scenario = scenario
    before = upstream.connections
    result = login(proxy, signer)
    assert upstream.connections == before + 1  # the valid token did reach upstream
    error = assert_clean_fatal(result, sqlstate)
    if sqlstate == "28000":
        assert error["M"] == "the proxy could not log in to the upstream PostgreSQL server"
    assert error["M"] != TIMEOUT_MESSAGE, case
    assert upstream.last_ended(), f"{case}: the proxy kept the upstream connection open"
    assert_still_serving(proxy, signer, upstream)


@pytest.mark.parametrize("scenario", [stall, stall_mid_scram], ids=["after-startup", "mid-scram"])
def test_stalled_upstream_hits_authentication_timeout(
    scenario: Scenario, proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """Upstream goes silent mid-login: the configured deadline (AUTHENTICATION_TIMEOUT=3)
    ends the login with the timeout's FATAL, and the proxy hangs up on upstream."""
    upstream.scenario = scenario
    result = login(proxy, signer)
    error = assert_clean_fatal(result, "57014")  # as PostgreSQL: canceling authentication
    assert error["M"] == TIMEOUT_MESSAGE
    assert upstream.last_ended(), "the proxy kept the stalled upstream connection open"
    assert wait_for(lambda: "authentication not completed within 3s" in proxy.log())
    assert_still_serving(proxy, signer, upstream)


def test_error_without_sqlstate_gets_one(
    proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """An upstream ErrorResponse lacking the always-present C field (55.8: S, V, C, M are
    always present): the client must still get a FATAL with a SQLSTATE."""
    upstream.scenario = error_without_sqlstate
    result = login(proxy, signer)
    assert result.tags == [b"R", b"E"]
    error = result.error()
    assert error is not None
    assert error.get("S") == "FATAL"
    assert len(error.get("C", "")) == 5, error


@pytest.fixture(scope="module")
def memory_proxy(
    tmp_path_factory: pytest.TempPathFactory, signer: KeyPair, upstream: FakeUpstream
) -> Iterator[ProxyProcess]:
    """A proxy with a login deadline (30 s) long enough for 150 MB, for the memory cases."""
    tmp = tmp_path_factory.mktemp("malicious-memory")
    with _proxy(tmp, signer, upstream, timeout="30") as process:
        yield process


def _memory_case(
    proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream, scenario: Scenario
) -> tuple[RawResult, int]:
    """Run ``scenario``; return the client's result and the growth of the proxy's peak RSS
    (VmHWM) in KiB. The peak is reset first (``/proc/PID/clear_refs``), so what earlier
    cases did on the same proxy neither hides nor adds to this one's growth."""
    assert proxy.process is not None
    pid = proxy.process.pid
    upstream.scenario = trust
    login(proxy, signer)  # warm up: imports, TLS contexts, first session
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = rss_kib(pid, "VmHWM")
    upstream.scenario = scenario
    result = login(proxy, signer, timeout=60)
    assert upstream.last_ended(timeout=60), "the proxy kept the upstream connection open"
    growth = rss_kib(pid, "VmHWM") - baseline
    print(f"{scenario.__name__}: proxy peak RSS growth {growth / 1024:.1f} MB")
    assert_still_serving(proxy, signer, upstream)
    return result, growth


def test_100mb_parameter_status_does_not_grow_memory(
    memory_proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream
) -> None:
    result, growth = _memory_case(memory_proxy, signer, upstream, parameter_status_100mb)
    assert_clean_fatal(result, "08P01")
    assert growth < 100 * 1024


@pytest.mark.parametrize("scenario", [many_parameter_status, many_notices], ids=["S", "N"])
def test_many_small_login_messages_do_not_grow_memory(
    memory_proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream, scenario: Scenario
) -> None:
    """150 MB of login-phase messages, each under the per-message cap: the proxy must bound
    the total it buffers before ReadyForQuery (DESIGN.md principle 4: every buffer has a
    cap) -- refuse with 08P01 -- rather than hold it all in memory."""
    _, growth = _memory_case(memory_proxy, signer, upstream, scenario)
    assert growth < 100 * 1024


def test_man_in_the_middle_gets_no_cleartext_password_by_default(
    tmp_path: Path, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """The classic downgrade with the default settings (UPSTREAM__SSLMODE=prefer): the man
    in the middle answers the SSLRequest with N, then asks for the password in clear. The
    proxy must refuse before sending it; and a "trust" answer must get no query either."""
    received: list[bytes] = []

    def ask_cleartext(c: Conn) -> None:
        c.startup()
        c.send(wire.authentication(wire.AUTH_CLEARTEXT_PASSWORD))
        with contextlib.suppress(OSError, ConnectionError, struct.error):
            received.append(c.read_typed()[1])

    with _proxy(tmp_path, signer, upstream, require_auth=None) as proxy:
        upstream.scenario = ask_cleartext
        error = assert_clean_fatal(login(proxy, signer), "28000")
        assert "configured to refuse" in error["M"]
        assert all(PASSWORD.encode() not in body for body in received), received
        upstream.scenario = trust
        result = login(proxy, signer)
        assert result.tags == [b"R", b"E"], result.messages
        assert result.error() is not None and result.error()["C"] == "28000"
        assert "UPSTREAM__REQUIRE_AUTH" in proxy.log()


@pytest.mark.parametrize("sqlstate", ["28000", "53300"])
def test_login_error_details_are_not_relayed(
    sqlstate: str, proxy: ProxyProcess, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """Upstream's ErrorResponse during login carries DETAIL, HINT, WHERE and, for class 28,
    a message naming the proxy's address and pg_hba rules: the client gets severity,
    SQLSTATE and message only (for 28xxx a generic message); the log keeps everything."""
    message = f'no pg_hba.conf entry for host "10.9.8.7" {MARKER.decode()}'

    def refuse(c: Conn) -> None:
        c.startup()
        fields = {
            "S": "FATAL",
            "V": "FATAL",
            "C": sqlstate,
            "M": message,
            "D": "DETAIL-" + MARKER.decode(),
            "H": "HINT-" + MARKER.decode(),
            "W": "WHERE-" + MARKER.decode(),
        }
        c.send(wire.error_response(fields))

    upstream.scenario = refuse
    result = login(proxy, signer)
    error = result.error()
    assert error is not None
    assert set(error) == {"S", "V", "C", "M"}, error
    assert error["C"] == sqlstate
    if sqlstate.startswith("28"):
        assert_clean_fatal(result, sqlstate)  # no marker, no address
        assert "10.9.8.7" not in error["M"]
    else:
        assert error["M"] == message
    assert wait_for(lambda: "DETAIL-" + MARKER.decode() in proxy.log())
    assert_still_serving(proxy, signer, upstream)


def test_scram_pbkdf2_does_not_stall_other_sessions(
    tmp_path: Path, signer: KeyPair, upstream: FakeUpstream
) -> None:
    """A login whose upstream asks for 10^6 SCRAM iterations (allowed here by raising
    UPSTREAM__SCRAM_MAX_ITERATIONS) costs about half a second of PBKDF2. It must run off
    the event loop: a session already spliced keeps answering meanwhile."""
    derivation_started = threading.Event()

    def expensive_scram(c: Conn) -> None:
        c.startup()
        c.scram_continue(c.scram_first(), iterations=1_000_000, suffix="pbkdf2")
        derivation_started.set()
        c.read_typed()  # client-final-message, once PBKDF2 is done

    with _proxy(tmp_path, signer, upstream, UPSTREAM__SCRAM_MAX_ITERATIONS="1000000") as proxy:
        upstream.scenario = trust
        live = RawClient(proxy.port)
        assert live.login("alice", mint(signer.private, "EdDSA", "alice"), tls=False).tags[-1] == (
            b"Z"
        )
        upstream.scenario = expensive_scram
        expensive = threading.Thread(target=login, args=(proxy, signer), daemon=True)
        expensive.start()
        assert derivation_started.wait(10)
        latencies = []
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            started = time.monotonic()
            live.send(wire.typed_message(b"Q", b"select 1\0"))
            assert live.read_until_end(stop_tags=(b"Z",)).tags[-1] == b"Z"
            latencies.append(time.monotonic() - started)
        expensive.join(15)
        live.close()
        print(f"round trips during PBKDF2: {len(latencies)}, worst {max(latencies) * 1000:.0f} ms")
        assert max(latencies) < 0.25, latencies
