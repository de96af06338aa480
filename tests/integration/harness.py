"""Test harness: run the real proxy daemon, fake upstreams, and a raw protocol client."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from jwtpgproxy.protocol import wire


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    socket_dir: str
    ca: str
    password: str
    bindir: str

    def dsn(self, user: str = "scram_user", dbname: str = "postgres", **extra: str) -> str:
        parts = {
            "host": self.host,
            "port": str(self.port),
            "user": user,
            "password": self.password,
            "dbname": dbname,
            "sslmode": "disable",
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"


def read_env_file(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            values[name] = value.strip("'\"")
    return values


@dataclass(frozen=True)
class KeyPair:
    name: str
    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    algorithm: str

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


_CONFIG_PREFIXES = ("PUBLIC_KEY", "UPSTREAM__", "DOWNSTREAM__", "TOKEN__")


def self_signed_certificate(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    common_name: str = "localhost",
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    ca: bool = False,
    days: int = 2,
) -> x509.Certificate:
    """A certificate for ``key`` signed by itself, valid from five minutes ago for ``days``,
    with the given subject alternative names (none: no SAN extension) and, with ``ca``,
    BasicConstraints CA:TRUE."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def write_self_signed(
    directory: Path, common_name: str = "localhost", **options: object
) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate (SAN localhost, 127.0.0.1 unless ``options``,
    passed to :func:`self_signed_certificate`, say otherwise) and its key, as ``cert.pem``
    and ``key.pem`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key, common_name, **options)  # type: ignore[arg-type]
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mint(private_key: object, algorithm: str, sub: str, ttl: float = 300, **claims: object) -> str:
    now = int(time.time())
    payload: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl, **claims}
    return jwt.encode(payload, private_key, algorithm=algorithm)  # type: ignore[arg-type]


class ProxyProcess:
    """The daemon as users run it: ``python -m jwtpgproxy`` configured by env vars.

    Started on a free loopback port; stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = int(env.get("DOWNSTREAM__PORT") or free_port())
        base = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIG_PREFIXES)}
        self.env = {
            **base,
            "DOWNSTREAM__IP": "127.0.0.1",
            "DOWNSTREAM__PORT": str(self.port),
            "SHUTDOWN_TIMEOUT": "2",
            "LOG_LEVEL": "DEBUG",
            # Every test client comes from 127.0.0.1: the per-source limits (failed-login
            # throttling, pending logins per source) would make tests depend on each other.
            # Tests of those limits set them.
            "LOGIN_THROTTLE__BURST": "0",
            "MAX_PENDING_LOGINS_PER_SOURCE": "100000",
            **env,
        }
        self.log_path = log_path
        #: Where :meth:`log` begins: a proxy shared by several tests moves it to the end at
        #: each test's start, so each test reads its own lines only.
        self.log_start = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> ProxyProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jwtpgproxy"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.log()}")
            log = self.log()
            listening = "listening:" in log or '"event": "listening"' in log  # text or JSON
            if listening and self._admin_up():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start within {timeout}s: {self.log()}")

    def _admin_up(self) -> bool:
        """Whether the admin listener (METRICS__PORT), if any, accepts connections: the
        daemon opens it after the "listening" line, so a test using it must wait for it."""
        port = self.env.get("METRICS__PORT")
        if not port:
            return True
        host = self.env.get("METRICS__HOST") or "127.0.0.1"
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[self.log_start :]

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RecordingUpstream:
    """A TCP listener standing in for upstream: records every connection it accepts and
    closes it. Proves that a refused client caused no upstream connection at all.
    :meth:`reset` starts the record afresh (for the next test of a shared one)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self.received = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                self.received += conn.recv(65536)
            conn.close()

    def reset(self) -> None:
        self.accepted = 0
        self.received = bytearray()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class TcpForwarder:
    """A switchable TCP relay on a fixed port (simulates upstream going down and up)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()


@dataclass
class RawResult:
    """What a raw client saw: each backend message (tag, body) until the connection ended."""

    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False

    @property
    def tags(self) -> list[bytes]:
        return [tag for tag, _ in self.messages]

    def error(self) -> dict[str, str] | None:
        for tag, body in self.messages:
            if tag == b"E":
                return wire.decode_fields(body)
        return None


@functools.cache
def unverified_client_context() -> ssl.SSLContext:
    """A TLS client context that checks no certificate (the proxy's is self-signed), made
    once: ``ssl.create_default_context()`` loads the system CA bundle, about 0.1 s of CPU
    per call, which hundreds of test clients would pay for nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawClient:
    """A minimal frontend speaking the protocol by hand, for byte-exact checks."""

    def __init__(self, port: int, *, timeout: float = 10) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def start_tls(self) -> None:
        self.send(wire.ssl_request())
        answer = self.recv_exact(1)
        if answer != b"S":
            raise AssertionError(f"expected S, got {answer!r}")
        assert isinstance(self.sock, socket.socket)
        self.sock = unverified_client_context().wrap_socket(self.sock)

    def read_message(self) -> tuple[bytes, bytes]:
        tag, length = struct.unpack("!ci", self.recv_exact(5))
        return tag, self.recv_exact(length - 4)

    def read_until_end(self, stop_tags: tuple[bytes, ...] = (b"E", b"Z", b"R")) -> RawResult:
        """Collect messages until one of ``stop_tags`` (after reading it) or close."""
        result = RawResult()
        while True:
            try:
                tag, body = self.read_message()
            except (ConnectionError, OSError, struct.error):
                result.closed = True
                return result
            result.messages.append((tag, body))
            if tag in stop_tags:
                return result

    def login(self, user: str, password: str, *, tls: bool = True, **params: str) -> RawResult:
        """SSLRequest (optional), startup, password; returns everything up to the end of
        login (ReadyForQuery or ErrorResponse)."""
        if tls:
            self.start_tls()
        self.send(wire.startup_message({"user": user, "database": "postgres", **params}))
        first = self.read_until_end()
        if first.tags[-1:] != [b"R"]:
            return first
        self.send(wire.password_message(password.encode()))
        rest = self.read_until_end(stop_tags=(b"E", b"Z"))
        rest.messages[:0] = first.messages
        return rest

    def is_closed(self, wait: float = 5) -> bool:
        """Whether the server closes the connection within ``wait`` seconds (anything it
        sends before closing, e.g. an ErrorResponse, is read and discarded)."""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except (ConnectionError, ssl.SSLError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()


# --- One helper each: DSNs, the PostgreSQL environment, RSS, waiting, JWKS servers ----------

REPO = Path(__file__).resolve().parents[2]


def format_dsn(**params: str) -> str:
    """A libpq keyword/value connection string (values here never need quoting)."""
    return " ".join(f"{name}={value}" for name, value in params.items())


def proxy_dsn(proxy: ProxyProcess | int, user: str, token: str | None, **extra: str) -> str:
    """libpq parameters for a client of ``proxy`` (or a port) with ``token`` as password
    (None: no password here, e.g. for psql, which reads it from PGPASSWORD instead of its
    command line), TLS required; ``extra`` adds or overrides parameters."""
    port = proxy if isinstance(proxy, int) else proxy.port
    params = {"host": "127.0.0.1", "port": str(port), "user": user}
    if token is not None:
        params["password"] = token
    params |= {"dbname": "postgres", "sslmode": "require"}
    return format_dsn(**{**params, **extra})


def postgres_env(*, start: bool = False) -> dict[str, str]:
    """The test PostgreSQL's ``PGPROXY_TEST_*`` variables: from the environment (test.sh
    exports them), else from ``start-postgres.sh env``, after ``start-postgres.sh start``
    when ``start`` (it is idempotent)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PGPROXY_TEST_")}
    if "PGPROXY_TEST_PGPORT" in env and "PGPROXY_TEST_PGDATA" in env:
        return env
    script = str(REPO / "start-postgres.sh")
    if start:
        subprocess.run([script, "start"], check=True, timeout=300)
    out = subprocess.run(
        [script, "env"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return read_env_file(out)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of process ``pid`` in KiB from /proc: ``VmRSS`` (resident now) or
    ``VmHWM`` (peak resident)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def wait_for(predicate: Callable[[], object], timeout: float = 10, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed; return its
    last truth value. For conditions with no event to wait on (another process's state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


Response = tuple[int, dict[str, str], bytes]


class JwksServer:
    """A local HTTP server (127.0.0.1, free port) for JWKS, OIDC discovery and traps: serves
    ``routes`` (a response, or a callable returning one, per path; others get 404), counts
    requests per path, and can answer after ``delay`` seconds."""

    def __init__(self) -> None:
        self.routes: dict[str, Response | Callable[[], Response]] = {}
        self.counts: Counter[str] = Counter()
        self.delay = 0.0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.counts[self.path] += 1
                    route = server.routes.get(self.path)
                if server.delay:
                    time.sleep(server.delay)
                if route is None:
                    route = (404, {}, b"not found")
                status, headers, body = route() if callable(route) else route
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers and not headers.get("X-No-Length"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def requests(self) -> int:
        """How many requests arrived, on any path."""
        with self._lock:
            return sum(self.counts.values())

    def json(self, path: str, document: object | Callable[[], object]) -> None:
        """Serve ``document`` (or what the callable returns at request time) as JSON."""

        def respond() -> Response:
            current = document() if callable(document) else document
            body = json.dumps(current).encode()
            return 200, {"Content-Type": "application/json"}, body

        self.routes[path] = respond

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> JwksServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def cluster_lock(directory: Path, *, exclusive: bool, timeout: float = 300) -> Iterator[None]:
    """A readers-writer lock over the shared test cluster, across processes (pytest-xdist
    workers): shared for a test that uses PostgreSQL, exclusive for one that restarts it.
    A writer takes the turnstile first, so readers arriving after it wait and it is not
    starved; every wait is bounded by ``timeout``."""

    def take(file: IO[bytes], operation: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(file, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{file.name} not locked within {timeout:g}s") from None
                time.sleep(0.02)

    with (
        open(directory / "tests-turnstile.lock", "ab") as turnstile,
        open(directory / "tests-cluster.lock", "ab") as lock,
    ):
        take(turnstile, fcntl.LOCK_EX)
        try:
            take(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


def wait_backend_sleeping(pg: Postgres, condition: str, *params: object) -> None:
    """Until a backend matching ``condition`` (SQL on pg_stat_activity, with ``params``) is
    in pg_sleep: the moment to cancel a query, or to act on a busy session (bounded)."""
    import psycopg  # the harness itself needs no client library

    with psycopg.connect(pg.superuser_dsn(), autocommit=True) as admin:

        def sleeping() -> bool:
            query = f"select 1 from pg_stat_activity where wait_event = 'PgSleep' and {condition}"
            return admin.execute(query, params).fetchone() is not None  # type: ignore[arg-type]

        assert wait_for(sleeping, timeout=10), f"no backend in pg_sleep where {condition}"


def wait_sessions_ended(proxy: ProxyProcess, timeout: float = 10) -> None:
    """Until every connection the proxy received has ended (its text log has as many
    ``connection closed`` lines as ``connection received`` ones): after that, none of them
    can still reach upstream, so "nothing reached upstream" can be asserted (bounded)."""

    def ended() -> bool:
        log = proxy.log()
        return log.count(": connection received: ") == log.count(": connection closed: ")

    assert wait_for(ended, timeout=timeout), "sessions still open:\n" + proxy.log()[-3000:]


def http_get(port: int, path: str = "/metrics") -> tuple[int, str]:
    """GET http://127.0.0.1:``port````path`` (the admin listener): status and body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        have = ",".join(sorted((match.group(2) or "").split(","))) if match.group(2) else ""
        if have == wanted:
            return float(match.group(3))
    return 0.0


def node_modules() -> Path | None:
    """A node_modules holding node-postgres (`pg@8`), installed once into a cache directory
    (JWTPG_TEST_NODE_CACHE, else ~/.cache/jwtpgproxy-tests/node) under a file lock, so
    parallel test workers install it once; None without node and npm."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        return None
    cache = Path(
        os.environ.get("JWTPG_TEST_NODE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "jwtpgproxy-tests"
        / "node"
    )
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / "node_modules" / "pg" / "package.json").exists():
            done = subprocess.run(
                ["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "pg@8"],
                check=False,
                timeout=300,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"npm install pg failed: {done.stderr[-2000:]}")
    return cache / "node_modules"


#: Imported at start-up by the proxy under test (PYTHONPATH): keeps all cyclic garbage
#: (gc.DEBUG_SAVEALL) and, on SIGUSR1, writes how much of it is the proxy's, uvloop's or
#: ssl's, by type.
_CYCLIC_GARBAGE_REPORTER = """
import collections, gc, os, signal
gc.set_debug(gc.DEBUG_SAVEALL)
def _report(*_):
    gc.collect()
    ours = collections.Counter(
        type(o).__qualname__ for o in gc.garbage
        if type(o).__module__.split(".")[0] in ("jwtpgproxy", "uvloop", "ssl", "_ssl", "asyncio")
    )
    gc.garbage.clear()
    path = os.environ["GARBAGE_REPORT"]
    with open(path + ".tmp", "w") as f:
        f.write(repr(dict(ours)))
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, _report)
"""


class CyclicGarbage:
    """What a proxy process leaves for the cycle collector: start the proxy with ``env``,
    then :meth:`collect` collects and returns the proxy's share of the garbage by type
    (``"{}"`` when there is none)."""

    def __init__(self, directory: Path) -> None:
        site = directory / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_CYCLIC_GARBAGE_REPORTER)
        self.report = directory / "garbage.txt"
        self.env = {"PYTHONPATH": str(site), "GARBAGE_REPORT": str(self.report)}

    def collect(self, proxy: ProxyProcess) -> str:
        assert proxy.process is not None
        self.report.unlink(missing_ok=True)
        proxy.process.send_signal(signal.SIGUSR1)
        assert wait_for(self.report.exists), "no garbage report within 10 s"
        return self.report.read_text()
