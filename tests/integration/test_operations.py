"""Operating the proxy: limits, deadlines, signals, reload, metrics, health, logs."""

from __future__ import annotations

import json
import select
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from harness import (
    KeyPair,
    Postgres,
    ProxyProcess,
    RawClient,
    free_port,
    http_get,
    metric,
    proxy_dsn,
    wait_backend_sleeping,
    wait_for,
    wait_sessions_ended,
    write_self_signed,
)
from test_failures import bad_tokens

from jwtpgproxy.protocol import wire
from jwtpgproxy.proxy.connection import Keepalive, configure_socket


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


# --- Limits and deadlines -------------------------------------------------------------------


def test_connection_limit_gives_53300_while_existing_sessions_work(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(MAX_CLIENT_CONNECTIONS="3")
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))
    held = [psycopg.connect(dsn) for _ in range(3)]
    try:
        for _ in range(20):  # a flood past the limit
            client = RawClient(proxy.port)
            result = client.login("scram_user", token_for("scram_user"))
            error = result.error()
            assert error is not None and error["C"] == "53300"
            assert error["M"] == "sorry, too many clients already"
            assert b"R" not in result.tags  # refused before any password was asked
            client.close()
        for conn in held:  # ...while the existing sessions keep working
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for conn in held:
            conn.close()
    # Once they leave (the proxy has logged their ends), a new client gets in.
    assert wait_for(lambda: proxy.log().count(": connection closed: ") >= 3 + 20), proxy.log()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_stalled_sockets_closed_at_deadline_while_valid_client_connects(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(AUTHENTICATION_TIMEOUT="2")
    stalled = []
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        if i % 2:  # half send a partial startup packet, half nothing at all
            sock.sendall(wire.startup_message({"user": "scram_user"})[:6])
        stalled.append(sock)
    started = time.monotonic()
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    for sock in stalled:
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
    assert time.monotonic() - started < 5
    assert proxy.alive


def test_pending_login_cap_closes_new_connections_until_deadline(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(MAX_PENDING_LOGINS="5", AUTHENTICATION_TIMEOUT="2")
    stalled = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(5)]
    assert wait_for(lambda: proxy.log().count(": connection received: ") >= 5), proxy.log()
    extra = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert extra.recv(1) == b""  # closed at once: the pending-login slots are full
    extra.close()
    for sock in stalled:  # the deadline ends the stalled logins...
        sock.settimeout(10)
        _read_to_end(sock)  # closed by the proxy (a TimeoutError here fails the test)
    # ...and frees their slots once each session is over (its end line is logged).
    assert wait_for(lambda: proxy.log().count(": connection closed: ") >= 5), proxy.log()
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    for sock in stalled:
        sock.close()
    assert "too many pending logins" in proxy.log()


def test_idle_session_timeout_ends_idle_sessions_with_57p05(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(IDLE_SESSION_TIMEOUT="1")
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Busy for longer than the timeout is not idle: a 1.5 s query completes.
        assert conn.execute("select pg_sleep(1.5), 1").fetchone() == ("", 1)
        # Idle: the FATAL arrives on its own, about 1 s later.
        readable, _, _ = select.select([conn.fileno()], [], [], 10)
        assert readable, "no idle-session timeout within 10 s"
        with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
            conn.execute("select 1")


def test_keepalive_socket_options() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())

    class Transport:
        def get_extra_info(self, name: str) -> object:
            return client if name == "socket" else None

    configure_socket(Transport(), Keepalive(idle=42, interval=7, count=3))  # type: ignore[arg-type]
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 42
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    client.close()
    listener.close()


# --- Signals --------------------------------------------------------------------------------


def test_drain_timeout_ends_spliced_sessions_with_57p01(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """After SHUTDOWN_TIMEOUT, a session that is still open is ended by upstream itself, so
    the client reads PostgreSQL's FATAL 57P01 instead of a cut connection."""
    proxy = start_proxy(SHUTDOWN_TIMEOUT="1")
    conn = psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    conn.execute("select 1")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(15) == 0
    with pytest.raises(psycopg.errors.AdminShutdown):
        conn.execute("select 1")
    conn.close()
    log = proxy.log()
    assert "ending sessions after drain timeout" in log
    assert "could not terminate" not in log


def test_second_sigint_exits_at_once(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy = start_proxy(SHUTDOWN_TIMEOUT="60")
    conn = psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGINT)
    assert wait_for(lambda: "draining" in proxy.log()), proxy.log()
    assert proxy.alive  # draining, waiting for the open session
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGINT)
    assert proxy.process.wait(10) != 0
    assert time.monotonic() - started < 5
    conn.close()


def _served_common_name(port: int) -> str:
    client = RawClient(port)
    client.start_tls()
    assert isinstance(client.sock, ssl.SSLSocket)
    der = client.sock.getpeercert(binary_form=True)
    client.close()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_sighup_reloads_certificate_and_keeps_sessions(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str], tmp_path: Path
) -> None:
    cert, key = write_self_signed(tmp_path, "first")
    metrics_port = free_port()
    proxy = start_proxy(
        DOWNSTREAM__CERTFILE=str(cert),
        DOWNSTREAM__KEYFILE=str(key),
        METRICS__PORT=str(metrics_port),
    )
    assert proxy.process is not None
    assert _served_common_name(proxy.port) == "first"
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        staging = tmp_path / "next"
        staging.mkdir()
        new_cert, new_key = write_self_signed(staging, "second")
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reloaded" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _served_common_name(proxy.port) == "second"
        assert conn.execute("select 1").fetchone() == (1,)  # the live session is untouched

        key.write_text("not a key")  # a bad new configuration...
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload failed" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed" in proxy.log()
        assert _served_common_name(proxy.port) == "second"  # ...keeps the running one
        assert conn.execute("select 2").fetchone() == (2,)
    _, text = http_get(metrics_port, "/metrics")
    assert metric(text, "jwtpgproxy_config_reloads_total", result="ok") == 1
    assert metric(text, "jwtpgproxy_config_reloads_total", result="failed") == 1


# --- Metrics, health, logs ------------------------------------------------------------------


def test_metrics_after_known_mix_of_logins(
    start_proxy: Callable[..., ProxyProcess],
    pg: Postgres,
    keys: dict[str, object],
    token_for: Callable[..., str],
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(METRICS__PORT=str(metrics_port))
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))
    for _ in range(3):
        with psycopg.connect(dsn) as conn:
            conn.execute("select repeat('x', 10000)").fetchone()
    for token in (token_for("scram_user", ttl=-100), token_for("scram_user", key="other")):
        RawClient(proxy.port).login("scram_user", token)
    with psycopg.connect(dsn) as conn:
        pid = conn.info.backend_pid
        canceller = threading.Thread(
            target=lambda: (wait_backend_sleeping(pg, "pid = %s", pid), conn.cancel())
        )
        canceller.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        canceller.join()
    plain = RawClient(proxy.port)  # refused: no TLS
    plain.login("scram_user", token_for("scram_user"), tls=False)
    wait_sessions_ended(proxy)  # every session counted

    status, text = http_get(metrics_port, "/metrics")
    assert status == 200
    assert metric(text, "jwtpgproxy_logins_total", outcome="success", reason="ok") == 4
    assert metric(text, "jwtpgproxy_logins_total", outcome="failure", reason="expired") == 1
    assert metric(text, "jwtpgproxy_logins_total", outcome="failure", reason="signature") == 1
    assert (
        metric(text, "jwtpgproxy_logins_total", outcome="failure", reason="encryption_required")
        == 1
    )
    assert metric(text, "jwtpgproxy_cancel_requests_total", result="forwarded") == 1
    assert metric(text, "jwtpgproxy_upstream_login_seconds_count") == 4
    assert metric(text, "jwtpgproxy_client_connections_total") == 8  # 4 + 2 + cancel + plain
    assert metric(text, "jwtpgproxy_client_connections_open") == 0
    assert metric(text, "jwtpgproxy_client_bytes_total", direction="to_client") > 30000
    assert metric(text, "jwtpgproxy_client_bytes_total", direction="from_client") > 0
    # Bounded label values only: no user name, token or address in any label.
    assert "scram_user" not in text and "127.0.0.1" not in text and "eyJ" not in text


def test_logins_start_on_a_spare_upstream_connection(
    start_proxy: Callable[..., ProxyProcess],
    keys: dict[str, KeyPair],
    token_for: Callable[..., str],
) -> None:
    """After a login the worker holds one upstream connection, connected and TLS-verified,
    for the next; the next login uses it; unused, it is closed after its idle timeout."""
    metrics_port = free_port()
    proxy = start_proxy(METRICS__PORT=str(metrics_port), UPSTREAM__SPARE_IDLE_TIMEOUT="1.5")
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))

    def sample(name: str, **labels: str) -> float:
        return metric(http_get(metrics_port)[1], name, **labels)

    for token in bad_tokens(keys, token_for).values():
        RawClient(proxy.port).login("scram_user", token)
    time.sleep(0.2)
    # A client without a valid token never makes the proxy connect upstream, spares included.
    assert sample("jwtpgproxy_upstream_spares_total", result="none") == 0
    assert sample("jwtpgproxy_upstream_spares_ready") == 0
    with psycopg.connect(dsn) as conn:
        first = conn.execute("select pg_backend_pid()").fetchone()
    assert wait_for(lambda: sample("jwtpgproxy_upstream_spares_ready") == 1)
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "select pg_backend_pid(), ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()[1]
        assert conn.execute("select pg_backend_pid()").fetchone() != first
    assert sample("jwtpgproxy_upstream_spares_total", result="none") == 1
    assert sample("jwtpgproxy_upstream_spares_total", result="used") == 1
    assert wait_for(lambda: sample("jwtpgproxy_upstream_spares_total", result="expired") == 1)
    assert sample("jwtpgproxy_upstream_spares_ready") == 0


def test_healthz_and_readyz(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    metrics_port = free_port()
    proxy = start_proxy(METRICS__PORT=str(metrics_port), SHUTDOWN_TIMEOUT="10")
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    assert http_get(metrics_port, "/readyz") == (200, "ready\n")
    assert http_get(metrics_port, "/nope")[0] == 404
    # Not ready while draining (a session holds the shutdown open).
    conn = psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: http_get(metrics_port, "/readyz")[0] == 503)
    status, body = http_get(metrics_port, "/readyz")
    assert (status, body) == (503, "shutting down\n")
    assert http_get(metrics_port, "/healthz")[0] == 200
    conn.close()
    assert proxy.process.wait(10) == 0

    down_metrics = free_port()
    down = start_proxy(
        METRICS__PORT=str(down_metrics),
        UPSTREAM__HOST="127.0.0.1",
        UPSTREAM__PORT=str(free_port()),
        UPSTREAM__SSLMODE="disable",
        UPSTREAM__SSLROOTCERT=None,
    )
    status, body = http_get(down_metrics, "/readyz")
    assert status == 503 and body.startswith("upstream not reachable")
    assert http_get(down_metrics, "/healthz")[0] == 200
    assert down.alive


def test_admin_listener_rejects_junk(start_proxy: Callable[..., ProxyProcess]) -> None:
    metrics_port = free_port()
    proxy = start_proxy(METRICS__PORT=str(metrics_port))
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
        sock.sendall(b"X" * 20000)  # no end of head within the 8 KiB cap
        assert sock.recv(100) == b""
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405")
    assert http_get(metrics_port, "/healthz")[0] == 200
    assert proxy.alive


def test_json_logs_hold_fields_and_no_secrets(
    start_proxy: Callable[..., ProxyProcess],
    pg: Postgres,
    keys: dict[str, object],
    token_for: Callable[..., str],
) -> None:
    proxy = start_proxy(LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    good = token_for("scram_user")
    with psycopg.connect(proxy_dsn(proxy, "scram_user", good)) as conn:
        conn.execute("select 1")
    bad = bad_tokens(keys, token_for)  # type: ignore[arg-type]
    for token in bad.values():
        RawClient(proxy.port).login("scram_user", token)
    assert proxy.stop() == 0
    lines = proxy.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    events = {r.get("event") for r in records}
    assert {"listening", "connection received", "token accepted", "upstream login"} <= events
    accepted = next(r for r in records if r.get("event") == "token accepted")
    assert accepted["user"] == "scram_user" and accepted["alg"] == "EdDSA"
    failures = [r for r in records if r.get("event") == "authentication failed"]
    assert len(failures) == len(bad)
    text = proxy.log()
    for token in [good, *[t for t in bad.values() if len(t) > 10]]:
        assert token not in text
    assert pg.password not in text
    assert "Traceback" not in text


# --- Per-source limits (issue 13, item 5) ------------------------------------------------------


def _connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the proxy (127.0.0.1) from the loopback address ``source``."""
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_at_once(sock: socket.socket, within: float = 1.0) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_pending_logins_are_capped_per_source(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """Silent sockets from one address fill that address's slots only: another address
    (here 127.0.0.2) still logs in while the first is refused at once."""
    proxy = start_proxy(MAX_PENDING_LOGINS_PER_SOURCE="3", AUTHENTICATION_TIMEOUT="30")
    silent = [_connect_from("127.0.0.3", proxy.port) for _ in range(3)]
    time.sleep(0.3)
    extra = _connect_from("127.0.0.3", proxy.port)
    assert _closed_at_once(extra)
    extra.close()
    with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    for sock in silent:
        sock.close()
    assert "too many pending logins from this source: source=127.0.0.3" in proxy.log()


def test_startup_packet_has_its_own_shorter_deadline(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A socket that sends nothing is closed after STARTUP_TIMEOUT, long before the whole
    login's AUTHENTICATION_TIMEOUT; a client that sent its startup packet has the rest."""
    proxy = start_proxy(STARTUP_TIMEOUT="1", AUTHENTICATION_TIMEOUT="60")
    silent = RawClient(proxy.port)
    halfway = RawClient(proxy.port)
    halfway.start_tls()
    halfway.send(wire.startup_message({"user": "scram_user"}))
    assert halfway.read_message()[0] == b"R"  # the password is asked for
    started = time.monotonic()
    assert silent.is_closed(wait=5)
    assert time.monotonic() - started < 3
    assert not halfway.is_closed(wait=1.5)  # 2.5 s after connecting: still waited for
    silent.close()
    halfway.close()
    assert "no startup packet within 1s" in proxy.log()


def test_failed_logins_are_throttled_per_source(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    """After LOGIN_THROTTLE__BURST failed logins an address has its new connections refused
    at once (counted in metrics); the right token from another address still works."""
    metrics_port = free_port()
    proxy = start_proxy(
        LOGIN_THROTTLE__BURST="3",
        LOGIN_THROTTLE__PER_MINUTE="1",
        METRICS__PORT=str(metrics_port),
    )
    for _ in range(3):
        client = RawClient(proxy.port)
        fields = client.login("scram_user", "not-a-token").error()
        client.close()
        assert fields is not None and fields["C"] == "28P01"
    time.sleep(0.2)
    refused = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    assert _closed_at_once(refused)
    refused.close()
    other = _connect_from("127.0.0.2", proxy.port)  # another address: unaffected
    assert not _closed_at_once(other, within=0.5)
    other.close()
    assert "source throttled: too many failed logins: source=127.0.0.1" in proxy.log()
    _, text = http_get(metrics_port)
    assert metric(text, "jwtpgproxy_client_connections_refused_total", limit="login_throttle") == 1
    assert metric(text, "jwtpgproxy_login_throttled_sources_total") == 1
