#!/usr/bin/env python3
"""Soak test (opt-in): run the proxy for a while under mixed load and watch for leaks.

    .venv/bin/python bench/soak.py --minutes 10 [--concurrency 40] [--threshold-mb 30]

Starts the local PostgreSQL (./start-postgres.sh start; left running) and the proxy
(``python -m jwtpgproxy``, TLS on both sides, SCRAM upstream), then runs a bounded number of
concurrent workers, each looping over a random mix of: good login + a few queries (asyncpg),
bad token, abort after startup, abort mid-query. Every 10 s it samples the proxy's RSS and
open fd count and prints a table row. After a warm-up (the first 20 % of the run, at least one
sample), it exits 1 if RSS grew by more than --threshold-mb or fds by more than
--threshold-fds between the first post-warm-up sample and the last; or if any good login
failed.

    .venv/bin/python bench/soak.py --churn 10 [--per-phase 750] [--concurrency 40]

Churn mode: the proxy's RSS under connection churn alone. Ten phases, each of --per-phase
sessions that log in (TLS on both sides) and are aborted by the client -- half right after
the startup packet, half in the middle of a query result -- then 2 s of quiet and one RSS
sample. Memory that is freed returns to the same level every phase; a leak, or garbage that
waits for the cycle collector, grows phase after phase. Exits 1 if the last sample exceeds
the first by more than --threshold-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import shlex
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from jwtpgproxy.protocol import wire  # noqa: E402

USER = "scram_user"


def pg_env() -> dict[str, str]:
    script = str(REPO / "start-postgres.sh")
    subprocess.run([script, "start"], check=True, stdout=subprocess.DEVNULL, timeout=300)
    out = subprocess.run(
        [script, "env"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    env = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            env[name] = value.strip("'\"")
    return env


def tls_files(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> tuple[int, int]:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


class Stats:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def good(port: int, token: str, stats: Stats) -> None:
    import asyncpg

    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=USER,
        password=token,
        database="postgres",
        ssl=client_context(),
        timeout=30,
    )
    try:
        for _ in range(random.randint(1, 5)):
            value = random.randint(1, 10**6)
            if await conn.fetchval("select $1::int + 1", value) != value + 1:
                raise AssertionError("wrong result")
    finally:
        await conn.close()


async def _raw_startup(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(wire.ssl_request())
    if await reader.readexactly(1) != b"S":
        raise AssertionError("no TLS")
    await writer.start_tls(client_context())
    writer.write(wire.startup_message({"user": USER, "database": "postgres"}))
    tag, length = struct.unpack("!ci", await reader.readexactly(5))
    await reader.readexactly(length - 4)
    if tag != b"R":
        raise AssertionError(f"expected R, got {tag!r}")
    return reader, writer


async def bad(port: int, token: str, stats: Stats) -> None:
    reader, writer = await _raw_startup(port)
    writer.write(wire.password_message((token[:-6] + "AAAAAA").encode()))
    tag, length = struct.unpack("!ci", await reader.readexactly(5))
    body = await reader.readexactly(length - 4)
    if tag != b"E" or wire.decode_fields(body).get("C") != "28P01":
        raise AssertionError(f"bad token not refused with 28P01: {tag!r}")
    writer.close()


async def abort_after_startup(port: int, token: str, stats: Stats) -> None:
    _, writer = await _raw_startup(port)
    writer.transport.abort()


async def abort_mid_query(port: int, token: str, stats: Stats) -> None:
    reader, writer = await _raw_startup(port)
    writer.write(wire.password_message(token.encode()))
    while True:
        tag, length = struct.unpack("!ci", await reader.readexactly(5))
        await reader.readexactly(length - 4)
        if tag == b"Z":
            break
    writer.write(wire.typed_message(b"Q", b"select pg_sleep(0.05), repeat('x', 100000)\0"))
    await asyncio.sleep(0.01)
    writer.transport.abort()


ACTIONS = [(good, 6), (bad, 2), (abort_after_startup, 1), (abort_mid_query, 1)]


async def worker(port: int, token: str, stats: Stats, stop_at: float) -> None:
    functions = [f for f, _ in ACTIONS]
    weights = [w for _, w in ACTIONS]
    while time.monotonic() < stop_at:
        action = random.choices(functions, weights)[0]
        try:
            await action(port, token, stats)
            stats.add(action.__name__)
        except Exception as exc:
            stats.add(action.__name__ + "_failed")
            if action is good or action is bad:
                stats.failures.append(f"{action.__name__}: {exc!r}"[:200])


async def sampler(pid: int, stop_at: float, samples: list[tuple[float, int, int]]) -> None:
    started = time.monotonic()
    while True:
        rss, fds = proc_status(pid)
        samples.append((time.monotonic() - started, rss, fds))
        elapsed, rss, fds = samples[-1]
        print(f"{elapsed:7.0f}s  {rss / 1024:9.1f} MB  {fds:6d}", flush=True)
        if time.monotonic() + 10 > stop_at + 1:
            return
        await asyncio.sleep(10)


async def run(args: argparse.Namespace, port: int, pid: int, token: str) -> int:
    stats = Stats()
    stop_at = time.monotonic() + args.minutes * 60
    samples: list[tuple[float, int, int]] = []
    print(f"{'elapsed':>8}  {'proxy RSS':>12}  {'fds':>6}")
    await asyncio.gather(
        sampler(pid, stop_at, samples),
        *(worker(port, token, stats, stop_at) for _ in range(args.concurrency)),
    )
    await asyncio.sleep(2)
    rss, fds = proc_status(pid)
    samples.append((samples[-1][0] + 2, rss, fds))
    print(f"{'final':>8}  {rss / 1024:9.1f} MB  {fds:6d}")
    print("operations:", ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items())))
    warm = max(1, int(len(samples) * 0.2))
    base = samples[warm]
    last = samples[-1]
    rss_growth_mb = (last[1] - base[1]) / 1024
    fd_growth = last[2] - base[2]
    print(
        f"after warm-up (sample {warm}, t={base[0]:.0f}s): RSS {rss_growth_mb:+.1f} MB, "
        f"fds {fd_growth:+d}"
    )
    status = 0
    if rss_growth_mb > args.threshold_mb:
        print(f"FAIL: RSS grew by more than {args.threshold_mb} MB")
        status = 1
    if fd_growth > args.threshold_fds:
        print(f"FAIL: fds grew by more than {args.threshold_fds}")
        status = 1
    if stats.failures:
        print(f"FAIL: {len(stats.failures)} good/bad logins misbehaved, e.g. {stats.failures[:3]}")
        status = 1
    return status


async def churn(args: argparse.Namespace, port: int, pid: int, token: str) -> int:
    stats = Stats()
    actions = [abort_after_startup, abort_mid_query]
    samples: list[int] = []
    print(f"{'phase':>6}  {'sessions':>9}  {'proxy RSS':>12}  {'fds':>6}")
    done = 0
    for phase in range(1, args.churn + 1):
        queue = list(range(args.per_phase))

        async def one_worker(queue: list[int]) -> None:
            while queue:
                index = queue.pop()
                action = actions[index % 2]
                try:
                    await action(port, token, stats)
                    stats.add(action.__name__)
                except Exception as exc:
                    stats.add(action.__name__ + "_failed")
                    stats.failures.append(f"{action.__name__}: {exc!r}"[:200])

        await asyncio.gather(*(one_worker(queue) for _ in range(args.concurrency)))
        done += args.per_phase
        await asyncio.sleep(2)
        rss, fds = proc_status(pid)
        samples.append(rss)
        print(f"{phase:6d}  {done:9d}  {rss / 1024:9.1f} MB  {fds:6d}", flush=True)
    print("operations:", ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items())))
    growth_mb = (samples[-1] - samples[0]) / 1024
    print(f"RSS from phase 1 to phase {args.churn}: {growth_mb:+.1f} MB")
    status = 0
    if growth_mb > args.threshold_mb:
        print(f"FAIL: RSS grew by more than {args.threshold_mb} MB")
        status = 1
    if stats.failures:
        print(f"FAIL: {len(stats.failures)} sessions misbehaved, e.g. {stats.failures[:3]}")
        status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--threshold-mb", type=float, default=30)
    parser.add_argument("--threshold-fds", type=int, default=10)
    parser.add_argument("--churn", type=int, default=0, metavar="PHASES")
    parser.add_argument("--per-phase", type=int, default=750)
    parser.add_argument(
        "--proxy-cmd",
        default=f"{sys.executable} -m jwtpgproxy",
        help="command that runs the proxy (e.g. under a profiler); default: %(default)s",
    )
    args = parser.parse_args()
    pg = pg_env()
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        certfile, keyfile = tls_files(Path(tmp))
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("UPSTREAM__", "DOWN"))},
            "PUBLIC_KEYS__0": public.decode(),
            "UPSTREAM__HOST": "localhost",
            "UPSTREAM__PORT": pg["PGPROXY_TEST_PGPORT"],
            "UPSTREAM__PASSWORD": pg["PGPROXY_TEST_PASSWORD"],
            "UPSTREAM__SSLMODE": "verify-full",
            "UPSTREAM__SSLROOTCERT": pg["PGPROXY_TEST_CA"],
            "DOWNSTREAM__IP": "127.0.0.1",
            "DOWNSTREAM__PORT": str(port),
            "DOWNSTREAM__CERTFILE": certfile,
            "DOWNSTREAM__KEYFILE": keyfile,
            "LOG_LEVEL": "WARNING",
        }
        log_path = Path(tmp) / "proxy.log"
        with log_path.open("wb") as log:
            proxy = subprocess.Popen(shlex.split(args.proxy_cmd), env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if proxy.poll() is not None:
                    print(log_path.read_text(), file=sys.stderr)
                    return 2
                with contextlib.suppress(OSError):
                    import socket

                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                time.sleep(0.1)
            now = int(time.time())
            ttl = int(args.minutes * 60) + 600 + args.churn * 600
            token = jwt.encode({"sub": USER, "iat": now, "exp": now + ttl}, key, "EdDSA")
            if args.churn:
                print(f"churn: {args.churn} phases of {args.per_phase} aborted sessions")
                return asyncio.run(churn(args, port, proxy.pid, token))
            print(
                f"soak: {args.minutes:g} min, {args.concurrency} workers, proxy pid {proxy.pid} "
                f"on port {port}, PostgreSQL on {pg['PGPROXY_TEST_PGPORT']}"
            )
            return asyncio.run(run(args, port, proxy.pid, token))
        finally:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
            text = log_path.read_text(errors="replace")
            if "Traceback" in text:
                print("proxy log has a traceback:\n" + text[-3000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
