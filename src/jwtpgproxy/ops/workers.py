"""Several worker processes on one listening port (``WORKERS``), and their supervisor.

Each worker is a fresh interpreter (``python -m jwtpgproxy _worker``) running the ordinary
server with its listeners opened with SO_REUSEPORT, so the kernel spreads connections over
the workers and each uses a core. The parent process supervises them: it forwards signals,
restarts a worker that dies, stops everything when a worker reports a configuration error,
and serves /metrics (the sum over the workers), /healthz and /readyz itself.

Each worker answers ``M`` on a Unix socket in a private directory (mode 0700) with its
metrics in Prometheus text format. A CancelRequest needs no help from other workers: it
lands on whichever worker the kernel picks, which recovers upstream's key from the client's
(see :mod:`jwtpgproxy.proxy.cancel`) under the one secret the supervisor hands all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

from ..logs import event

log = logging.getLogger("jwtpgproxy")

_PEER_TIMEOUT = 2.0
_MAX_METRICS_BYTES = 8 * 1024 * 1024
#: A worker restarted more often than this within _RESTART_WINDOW means a crash loop.
_MAX_RESTARTS = 5
_RESTART_WINDOW = 60.0
_RESTART_DELAY = 1.0
#: Exit status of a worker that found its configuration unusable (as the CLI uses).
CONFIG_ERROR_EXIT = 2


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    index: int
    count: int
    control_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.control_dir, f"worker-{index}.sock")


# --- In a worker ---------------------------------------------------------------------------


async def start_control_server(
    info: WorkerInfo,
    render_metrics: Callable[[], Awaitable[bytes]],
) -> asyncio.AbstractServer:
    """This worker's control socket (see the module docstring)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_PEER_TIMEOUT):
                command = await reader.readexactly(1)
                if command == b"M":
                    writer.write(await render_metrics())
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    path = info.socket_path(info.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a predecessor that crashed
    return await asyncio.start_unix_server(handle, path=path)


# --- In the supervisor --------------------------------------------------------------------


async def gather_metrics(info: WorkerInfo) -> bytes:
    async def fetch(index: int) -> bytes:
        try:
            async with asyncio.timeout(_PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(info.socket_path(index))
                try:
                    writer.write(b"M")
                    await writer.drain()
                    return await reader.read(_MAX_METRICS_BYTES)
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return b""

    texts = await asyncio.gather(*(fetch(i) for i in range(info.count)))
    return merge_prometheus(t.decode("utf-8", "replace") for t in texts).encode()


def merge_prometheus(texts: Iterable[str]) -> str:
    """Sum samples with the same name and labels across processes' text expositions.

    Right for everything the proxy exports: counters, gauges of things open now, and
    histogram buckets/sums/counts all add up across workers -- except the ``*_created``
    timestamps prometheus-client adds to counters, where the earliest one is the truth.
    """
    comments: dict[str, None] = {}
    samples: dict[str, float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                comments.setdefault(line, None)
                continue
            key, _, text_value = line.rpartition(" ")
            try:
                value = float(text_value)
            except ValueError:
                continue
            if key.split("{", 1)[0].endswith("_created"):
                samples[key] = min(samples.get(key, value), value)
            else:
                samples[key] = samples.get(key, 0.0) + value
    # Keep each family's HELP/TYPE lines before its samples.
    out: list[str] = []
    emitted: set[str] = set()
    for comment in comments:
        out.append(comment)
        parts = comment.split(" ")
        if len(parts) >= 3 and parts[1] == "TYPE":
            family = parts[2]
            for key, value in samples.items():
                name = key.split("{", 1)[0]
                if key not in emitted and (name == family or name.startswith(family + "_")):
                    out.append(f"{key} {value!r}")
                    emitted.add(key)
    out.extend(f"{k} {v!r}" for k, v in samples.items() if k not in emitted)
    return "\n".join(out) + "\n"


class Supervisor:
    """The parent of ``count`` workers."""

    def __init__(
        self,
        count: int,
        *,
        metrics_host: str,
        metrics_port: int | None,
        ready: Callable[[], Awaitable[tuple[bool, str]]],
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``env``: added to the workers' environment (a secret they must share)."""
        self._env = {**os.environ, **(env or {})}
        self.info = WorkerInfo(-1, count, tempfile.mkdtemp(prefix="jwtpgproxy-"))
        os.chmod(self.info.control_dir, 0o700)
        self._metrics_host = metrics_host
        self._metrics_port = metrics_port
        self._ready = ready
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._interrupts = 0
        self._failed: int | None = None  # exit status that ends everything
        self._done = asyncio.Event()

    async def _spawn(self, index: int) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jwtpgproxy",
            "_worker",
            "--index",
            str(index),
            "--count",
            str(self.info.count),
            "--control-dir",
            self.info.control_dir,
            stdin=asyncio.subprocess.DEVNULL,
            env=self._env,
        )
        self._processes[index] = process
        event(log, INFO, "worker started", worker=index, pid=process.pid)
        asyncio.get_running_loop().create_task(self._watch(index, process))

    async def _watch(self, index: int, process: asyncio.subprocess.Process) -> None:
        status = await process.wait()
        if self._processes.get(index) is process:
            del self._processes[index]
        if self._stopping:
            # A worker still starting has no handlers yet: the forwarded signal's default
            # action ends it (status -SIGTERM / -SIGINT). It served nothing; that is clean.
            clean = status in (0, -signal.SIGTERM, -signal.SIGINT)
            if not clean and self._failed is None:
                self._failed = 1
        elif status == CONFIG_ERROR_EXIT:
            event(log, WARNING, "worker refused its configuration: stopping", worker=index)
            self._failed = CONFIG_ERROR_EXIT
            self._stop(signal.SIGTERM)
        else:
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW]
            if len(self._restarts) >= _MAX_RESTARTS:
                event(log, WARNING, "workers keep dying: stopping", worker=index, status=status)
                self._failed = 1
                self._stop(signal.SIGTERM)
            else:
                self._restarts.append(now)
                event(
                    log,
                    WARNING,
                    "worker exited unexpectedly: restarting",
                    worker=index,
                    status=status,
                )
                await asyncio.sleep(_RESTART_DELAY)
                if not self._stopping:
                    await self._spawn(index)
        if not self._processes and self._stopping:
            self._done.set()

    def _stop(self, sig: int) -> None:
        self._stopping = True
        for process in list(self._processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        if not self._processes:
            self._done.set()

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            for process in self._processes.values():
                process.send_signal(signal.SIGHUP)
            return
        if sig == signal.SIGINT:
            self._interrupts += 1
        event(
            log,
            INFO,
            "shutdown requested",
            signal=signal.Signals(sig).name,
            workers=len(self._processes),
        )
        self._stop(sig)  # a second SIGINT reaches the workers too: they exit at once

    def healthy(self) -> tuple[bool, str]:
        alive = len(self._processes)
        if alive == self.info.count:
            return True, "ok"
        return False, f"{alive} of {self.info.count} workers running"

    async def run(self) -> int:
        from .admin import AdminServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        admin = None
        try:
            for index in range(self.info.count):
                await self._spawn(index)
            if self._metrics_port is not None:
                admin = AdminServer(
                    self._metrics_host,
                    self._metrics_port,
                    lambda: gather_metrics(self.info),
                    self._ready_unless_stopping,
                    self.healthy,
                )
                await admin.start()
            await self._done.wait()
        finally:
            if admin is not None:
                admin.close()
            shutil.rmtree(self.info.control_dir, ignore_errors=True)
        event(log, INFO, "shutdown complete", workers=self.info.count)
        return self._failed or 0

    async def _ready_unless_stopping(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        ok, why = self.healthy()
        if not ok:
            return ok, why
        return await self._ready()
