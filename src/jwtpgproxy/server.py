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
import socket

from .cancel import CancelRegistry
from .config import Runtime
from .errors import ConfigError
from .session import Session

log = logging.getLogger("jwtpgproxy")


#: Connections accepted per readiness callback before yielding to the event loop.
_ACCEPT_BATCH = 64
#: Pause after accept() fails for lack of resources (EMFILE, ENFILE, ENOBUFS), so the loop
#: does not spin on a listener that stays readable.
_ACCEPT_BACKOFF_SECONDS = 0.1


class ProxyServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cancels = CancelRegistry()
        self._listeners: list[socket.socket] = []
        self._tasks: dict[asyncio.Task[None], Session] = {}
        self._stopping: asyncio.Event | None = None
        self._interrupts = 0

    @property
    def sessions(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Listen on every configured address.

        The proxy accepts sockets itself rather than through ``loop.create_server``: a
        session must peek at the first byte before any transport reads it, to tell a
        direct TLS ClientHello from a PostgreSQL packet (see Session._accept).
        """
        self._stopping = asyncio.Event()
        for host in self.runtime.listen_hosts:
            listener = _listening_socket(host, self.runtime.listen_port)
            self._listeners.append(listener)
            self._watch(listener)
            address = listener.getsockname()
            log.info(
                "listening: address=%s port=%d tls=%s",
                address[0],
                address[1],
                self.runtime.downstream_ssl_mode.value,
            )

    def _watch(self, listener: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(listener.fileno(), self._on_acceptable, listener)

    def _on_acceptable(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s; pausing %.1fs", exc, _ACCEPT_BACKOFF_SECONDS)
                loop.remove_reader(listener.fileno())
                loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._resume_accepting, listener)
                return
            sock.setblocking(False)
            session = Session(self.runtime, self.cancels, sock)
            task = loop.create_task(session.run())
            self._tasks[task] = session
            task.add_done_callback(self._tasks.pop)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0 and not (self._stopping and self._stopping.is_set()):
            self._watch(listener)

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

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            if listener.fileno() >= 0:
                loop.remove_reader(listener.fileno())
                listener.close()

    async def shutdown(self) -> None:
        self._close_listeners()  # stop accepting; live connections are ours to end
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
        log.info("shutdown complete")


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"DOWNSTREAM__IP/DOWNSTREAM__PORT: cannot listen on {host}:{port}: "
            f"{exc.strerror or exc}"
        ) from None
    return sock


async def serve(runtime: Runtime) -> None:
    server = ProxyServer(runtime)
    await server.start()
    with contextlib.suppress(NotImplementedError):
        server.install_signal_handlers()
    await server.serve_until_stopped()
