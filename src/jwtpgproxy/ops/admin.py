"""The operator's HTTP listener: ``/metrics``, ``/healthz`` and ``/readyz``.

Off unless ``METRICS__PORT`` is set. A deliberately tiny HTTP/1.1 responder: GET/HEAD only,
request head capped at 8 KiB and 5 s, one request per connection -- enough for Prometheus,
Docker HEALTHCHECK and Kubernetes probes, and nothing an attacker can make large.

* ``/healthz``: the process is serving (the event loop answers).
* ``/readyz``: it can open a TCP connection to upstream within the probe timeout, and it is
  not shutting down -- so a load balancer stops sending clients to a draining proxy. The
  upstream probe's answer is reused for about a second and shared by concurrent requests
  (:class:`jwtpgproxy.proxy.upstream.CachedProbe`): however often /readyz is asked,
  upstream sees about one connection a second from it.

At most ``MAX_CONNECTIONS`` connections are served at once (the port may be reachable from a
whole cluster network); beyond that new ones are closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from logging import INFO

from ..errors import ConfigError
from ..logs import event

log = logging.getLogger("jwtpgproxy")

_MAX_HEAD = 8192
_READ_TIMEOUT = 5.0
#: Connections served at once (Prometheus, probes and a human need a handful).
MAX_CONNECTIONS = 32
_STATUS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class AdminServer:
    def __init__(
        self,
        host: str,
        port: int,
        render_metrics: Callable[[], Awaitable[bytes]],
        ready: Callable[[], Awaitable[tuple[bool, str]]],
        healthy: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
        *,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        """``render_metrics``: the Prometheus text (one process's, or the sum over workers).
        ``healthy``: liveness beyond "the event loop answers" (e.g. all workers alive)."""
        self.host = host
        self.port = port
        self._render_metrics = render_metrics
        self._ready = ready
        self._healthy = healthy
        self._server: asyncio.Server | None = None
        self._max_connections = max_connections
        self._connections = 0

    async def start(self) -> None:
        # The reader's limit caps the request head: readuntil() fails beyond it.
        try:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, limit=_MAX_HEAD
            )
        except OSError as exc:
            raise ConfigError(
                f"METRICS__HOST/METRICS__PORT: cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from None
        for sock in self._server.sockets:
            address = sock.getsockname()
            event(
                log,
                INFO,
                "admin listening",
                address=address[0],
                port=address[1],
                paths="/metrics,/healthz,/readyz",
            )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self._max_connections:
            writer.close()  # over the cap: no reading, no probing
            return
        self._connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self._connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body, method = await self._respond(head)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            writer.close()
            return
        payload = b"" if method == "HEAD" else body
        writer.write(
            f"HTTP/1.1 {status} {_STATUS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
            + payload
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, str]:
        text = "text/plain; charset=utf-8"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, text, b"bad request\n", "GET"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n", "GET"
        if target == "/metrics":
            body = await self._render_metrics()
            return 200, "text/plain; version=0.0.4; charset=utf-8", body, method
        if target == "/healthz":
            ok, why = self._healthy()
            return (200 if ok else 503), text, f"{why}\n".encode(), method
        if target == "/readyz":
            ok, why = await self._ready()
            return (200 if ok else 503), text, f"{why}\n".encode(), method
        return 404, text, b"not found\n", method
