"""Spare upstream connections: connected, TLS negotiated, nothing else sent.

Most of an upstream login passes before its first byte: the TCP connect, PostgreSQL forking a
backend, SSLRequest and the TLS handshake took 3.3 ms of a 5.8 ms login (p50, PostgreSQL 15
on loopback with TLS; ``open_upstream`` timed 200 times). None of that depends on who logs
in, so each worker keeps up to ``UpstreamTarget.spare_connections`` such connections ready,
and a login starts at the StartupMessage.

* Only a verified login takes or replenishes a spare: a client without a valid token never
  makes the proxy connect upstream, and an idle proxy holds no spares for long -- one unused
  for ``spare_idle_timeout`` seconds is closed and not replaced until the next login.
* A spare is closed cleanly (TLS close_notify, then FIN): PostgreSQL logs nothing for a
  connection that ends before its startup packet, but it logs an aborted one.
* PostgreSQL ends a backend that has not finished authenticating after its
  ``authentication_timeout`` (60 s by default), so the idle timeout must stay below it. A
  spare upstream closed anyway is skipped; one that closes just as the login starts, before
  upstream has answered anything, is retried once on a new connection (:mod:`.upstream`).
* Spares belong to one :class:`UpstreamTarget`: after a reload (new address, password, TLS
  settings) the old target's spares are closed, never used.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from logging import DEBUG

from ..errors import ProxyError
from ..logs import event
from .connection import HandshakeProtocol
from .metrics import Metrics
from .upstream import UpstreamTarget, connect, first_attempt_tls

log = logging.getLogger("jwtpgproxy")

#: After a spare could not be opened, how long before trying again (upstream is down or
#: refusing: the logins themselves will say so; spares must not add to the load).
RETRY_AFTER_FAILURE_SECONDS = 1.0


@dataclass(slots=True)
class _Spare:
    target: UpstreamTarget
    protocol: HandshakeProtocol
    tls: bool
    timer: asyncio.TimerHandle | None = None


class UpstreamSpares:
    """A worker's spare upstream connections (see the module docstring)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._spares: deque[_Spare] = deque()
        self._opening: set[asyncio.Task[None]] = set()
        self._failed_at = float("-inf")
        self._closed = False

    def __len__(self) -> int:
        return len(self._spares)

    def take(self, target: UpstreamTarget) -> tuple[HandshakeProtocol, bool] | None:
        """A spare for ``target`` (its protocol, and whether it is TLS), or None; either way
        more are opened in the background, up to the target's count."""
        if not target.spare_connections and not self._spares:
            return None  # spares are off: nothing to count
        found: tuple[HandshakeProtocol, bool] | None = None
        while self._spares and found is None:
            spare = self._spares.popleft()
            self._cancel_timer(spare)
            if spare.target is not target or spare.protocol.closed:
                spare.protocol.close()
                self._count("stale")
                continue
            found = (spare.protocol, spare.tls)
        self._count("used" if found is not None else "none")
        self._ready_changed()
        self._replenish(target)
        return found

    def _replenish(self, target: UpstreamTarget) -> None:
        loop = asyncio.get_running_loop()
        if self._closed or loop.time() - self._failed_at < RETRY_AFTER_FAILURE_SECONDS:
            return
        for _ in range(target.spare_connections - len(self._spares) - len(self._opening)):
            task = loop.create_task(self._open(target), name="upstream spare")
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, target: UpstreamTarget) -> None:
        try:
            protocol, tls = await connect(target, use_tls=first_attempt_tls(target))
        except ProxyError as exc:
            self._failed_at = asyncio.get_running_loop().time()
            self._count("failed")
            event(log, DEBUG, "upstream spare connection failed", error=exc)
            return
        if self._closed:
            protocol.close()  # shut down while it was opening
            return
        spare = _Spare(target, protocol, tls)
        loop = asyncio.get_running_loop()
        spare.timer = loop.call_later(target.spare_idle_timeout, self._expire, spare)
        self._spares.append(spare)
        self._ready_changed()

    def _expire(self, spare: _Spare) -> None:
        spare.timer = None
        if spare in self._spares:
            self._spares.remove(spare)
            spare.protocol.close()
            self._count("expired")
            self._ready_changed()

    def close(self) -> None:
        """Shutdown: close every spare and open no more."""
        self._closed = True
        for task in self._opening:
            task.cancel()
        while self._spares:
            spare = self._spares.popleft()
            self._cancel_timer(spare)
            spare.protocol.close()
        self._ready_changed()

    @staticmethod
    def _cancel_timer(spare: _Spare) -> None:
        if spare.timer is not None:
            spare.timer.cancel()
            spare.timer = None

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.upstream_spares.labels(result).inc()

    def _ready_changed(self) -> None:
        if self._metrics is not None:
            self._metrics.upstream_spares_ready.set(len(self._spares))
