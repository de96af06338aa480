"""Fixtures for end-to-end tests: TLS files, proxies in front of the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from harness import (
    KeyPair,
    Postgres,
    ProxyProcess,
    RecordingUpstream,
    cluster_lock,
    mint,
    postgres_env,
    wait_sessions_ended,
    write_self_signed,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pg() -> Postgres:
    """The local test PostgreSQL. test.sh starts it and exports PGPROXY_TEST_*; when pytest
    runs alone, start-postgres.sh is run here (it is idempotent)."""
    env = postgres_env(start=True)
    return Postgres(
        host=env["PGPROXY_TEST_PGHOST"],
        port=int(env["PGPROXY_TEST_PGPORT"]),
        socket_dir=env["PGPROXY_TEST_PGSOCKET"],
        ca=env["PGPROXY_TEST_CA"],
        password=env["PGPROXY_TEST_PASSWORD"],
        bindir=env.get("PGPROXY_TEST_PGBIN", ""),
    )


@pytest.fixture(scope="session")
def keys() -> dict[str, KeyPair]:
    return {
        "ed25519": KeyPair("ed25519", ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        "rsa": KeyPair("rsa", rsa.generate_private_key(65537, 2048), "RS256"),
        "ec": KeyPair("ec", ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "other": KeyPair("other", ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    }


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for the proxy's client-facing TLS."""
    cert_path, key_path = write_self_signed(tmp_path_factory.mktemp("downstream-tls"))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def base_env(pg: Postgres, keys: dict[str, KeyPair], tls_files: tuple[str, str]) -> dict[str, str]:
    """Proxy configuration: three keys (EdDSA, RSA, EC) with a gap in the numbering,
    upstream over verified TLS, client TLS required."""
    certfile, keyfile = tls_files
    return {
        "PUBLIC_KEYS__0": keys["ed25519"].public_pem,
        "PUBLIC_KEYS__1": keys["rsa"].public_pem,
        "PUBLIC_KEYS__7": keys["ec"].public_pem,
        "UPSTREAM__HOST": "localhost",
        "UPSTREAM__PORT": str(pg.port),
        "UPSTREAM__PASSWORD": pg.password,
        "UPSTREAM__SSLMODE": "verify-full",
        "UPSTREAM__SSLROOTCERT": pg.ca,
        "DOWNSTREAM__CERTFILE": certfile,
        "DOWNSTREAM__KEYFILE": keyfile,
    }


ProxyFactory = Callable[..., ProxyProcess]


@pytest.fixture
def start_proxy(tmp_path: Path, base_env: dict[str, str]) -> Iterator[ProxyFactory]:
    """Start a proxy with ``base_env`` updated by keyword overrides (None removes a
    variable); every proxy started is stopped by PID at the end of the test."""
    started: list[ProxyProcess] = []

    def factory(**overrides: str | None) -> ProxyProcess:
        env = dict(base_env)
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        proxy = ProxyProcess(env, tmp_path / f"proxy-{len(started)}.log")
        started.append(proxy)
        return proxy.start()

    yield factory
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]
) -> Iterator[ProxyProcess]:
    """One proxy in front of the real PostgreSQL, shared by a module's tests."""
    process = ProxyProcess(base_env, tmp_path_factory.mktemp("proxy") / "proxy.log")
    with process:
        yield process


@pytest.fixture(scope="module")
def _shared_recording_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def _shared_proxy_to_recorder(
    tmp_path_factory: pytest.TempPathFactory,
    base_env: dict[str, str],
    _shared_recording_upstream: RecordingUpstream,
) -> Iterator[ProxyProcess]:
    env = {
        **{k: v for k, v in base_env.items() if k != "UPSTREAM__SSLROOTCERT"},
        "UPSTREAM__HOST": "127.0.0.1",
        "UPSTREAM__PORT": str(_shared_recording_upstream.port),
        "UPSTREAM__SSLMODE": "disable",
        # The tests count the connections upstream accepts: after a good login a spare
        # would arrive at some moment of the next test (test_operations checks that no
        # spare is opened before a verified login).
        "UPSTREAM__SPARE_CONNECTIONS": "0",
    }
    process = ProxyProcess(env, tmp_path_factory.mktemp("proxy-to-recorder") / "proxy.log")
    with process:
        yield process


@pytest.fixture
def recording_upstream(_shared_recording_upstream: RecordingUpstream) -> RecordingUpstream:
    """A recording listener, shared by a module's tests and reset for each."""
    _shared_recording_upstream.reset()
    return _shared_recording_upstream


@pytest.fixture
def proxy_to_recorder(
    _shared_proxy_to_recorder: ProxyProcess, recording_upstream: RecordingUpstream
) -> ProxyProcess:
    """A proxy whose upstream is the recording listener: shows whether a refused client
    caused any upstream connection at all. Shared by a module's tests: each starts once
    the previous one's sessions have all ended, with a fresh record and its own log."""
    proxy = _shared_proxy_to_recorder
    assert proxy.alive, proxy.log()
    proxy.log_start = 0
    wait_sessions_ended(proxy)
    proxy.log_start = len(proxy.log())
    recording_upstream.reset()
    return proxy


@pytest.fixture
def token_for(keys: dict[str, KeyPair]) -> Callable[..., str]:
    def make(sub: str, key: str = "ed25519", ttl: float = 300, **claims: object) -> str:
        pair = keys[key]
        return mint(pair.private, pair.algorithm, sub, ttl, **claims)

    return make


@pytest.fixture(autouse=True)
def _postgres_cluster_access(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test cluster is shared by the pytest-xdist workers: a test that uses it holds it
    shared, one marked ``restarts_postgres`` holds it alone (the others wait, none fails
    on a cluster that is down for a moment)."""
    if "pg" not in request.fixturenames:
        yield
        return
    pg: Postgres = request.getfixturevalue("pg")
    exclusive = request.node.get_closest_marker("restarts_postgres") is not None
    with cluster_lock(Path(pg.socket_dir).parent, exclusive=exclusive):
        yield


# The tests that hold 100 to 210 upstream sessions at once carry
# ``@pytest.mark.xdist_group("many_upstream_sessions")``: test.sh runs pytest-xdist with
# ``--dist loadgroup``, so they run one after another in one worker and, with what the other
# worker holds, stay under the cluster's max_connections (400).
