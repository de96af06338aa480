"""The listener: accepts clients, runs a Session for each, shuts down in order.

Shutdown (SIGTERM, or the first SIGINT): stop accepting, let sessions finish for up to
``SHUTDOWN_TIMEOUT`` seconds, then close the rest. Sessions still in their handshake get
FATAL 57P01. A second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from .cancel import CancelRegistry
from .config import Runtime
from .connection import HandshakeProtocol
from .session import Session

log = logging.getLogger("jwtpgproxy")


class ProxyServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cancels = CancelRegistry()
        self._servers: list[asyncio.Server] = []
        self._tasks: dict[asyncio.Task[None], Session] = {}
        self._stopping: asyncio.Event | None = None
        self._interrupts = 0

    @property
    def sessions(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for host in self.runtime.listen_hosts:
            server = await loop.create_server(
                lambda: HandshakeProtocol(on_connection_made=self._accept),
                host=host,
                port=self.runtime.listen_port,
                reuse_address=True,
                backlog=1024,
            )
            self._servers.append(server)
            for sock in server.sockets:
                address = sock.getsockname()
                log.info(
                    "listening: address=%s port=%d tls=%s",
                    address[0],
                    address[1],
                    self.runtime.downstream_ssl_mode.value,
                )

    def _accept(self, protocol: HandshakeProtocol) -> None:
        session = Session(self.runtime, self.cancels, protocol)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks[task] = session
        task.add_done_callback(self._tasks.pop)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("second SIGINT: exiting at once")
            raise SystemExit(1)
        self.request_stop("SIGINT")

    def request_stop(self, why: str = "request") -> None:
        log.info("shutdown requested: signal=%s sessions=%d", why, len(self._tasks))
        if self._stopping is not None:
            self._stopping.set()

    async def serve_until_stopped(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        for server in self._servers:
            server.close()  # stop accepting; live connections are ours to end
        timeout = self.runtime.settings.shutdown_timeout
        if self._tasks:
            log.info("draining: sessions=%d timeout=%gs", len(self._tasks), timeout)
            await asyncio.wait(list(self._tasks), timeout=timeout)
        remaining = list(self._tasks.items())
        if remaining:
            log.info("closing sessions after drain timeout: sessions=%d", len(remaining))
            for task, session in remaining:
                session.shutdown_now()
                task.cancel()
            await asyncio.wait([task for task, _ in remaining], timeout=5)
        for server in self._servers:
            await server.wait_closed()
        log.info("shutdown complete")


async def serve(runtime: Runtime) -> None:
    server = ProxyServer(runtime)
    await server.start()
    with contextlib.suppress(NotImplementedError):
        server.install_signal_handlers()
    await server.serve_until_stopped()
