"""The listener: accepts clients, runs a Session for each, enforces limits, reloads, and
shuts down in order.

Limits: beyond ``MAX_CLIENT_CONNECTIONS`` a client gets FATAL 53300 once its startup packet
is read (before any password is asked); beyond ``MAX_PENDING_LOGINS`` connections that have
not finished login, new connections are closed at once -- with the authentication deadline,
this bounds what stalled clients can hold.

Shutdown (SIGTERM, or the first SIGINT): stop accepting and report not-ready, let sessions
finish for up to ``SHUTDOWN_TIMEOUT`` seconds, then end the rest: sessions still logging in
get FATAL 57P01 from the proxy; spliced sessions are ended by upstream itself
(pg_terminate_backend), so their clients get PostgreSQL's own FATAL 57P01 at a message
boundary. A second SIGINT exits at once. SIGHUP reloads what lives in files.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
from collections import defaultdict
from collections.abc import Iterator
from logging import INFO, WARNING

from . import wire
from .admin import AdminServer
from .cancel import CancelRegistry, cancel_session
from .config import Runtime, Settings, build_runtime, jwks_source, revocation_file
from .errors import ConfigError, ProxyError
from .jwks import JwksKeySource
from .logs import event
from .metrics import Metrics
from .revocation import RevocationFile, RevocationList
from .session import ServerContext, Session
from .upstream import connect_raw, terminate_backends
from .workers import WorkerInfo, cancel_on_peers, start_control_server

log = logging.getLogger("jwtpgproxy")

#: Connections accepted per readiness callback before yielding to the event loop.
_ACCEPT_BATCH = 64
#: Pause after accept() fails for lack of resources (EMFILE, ENFILE, ENOBUFS), so the loop
#: does not spin on a listener that stays readable.
_ACCEPT_BACKOFF_SECONDS = 0.1
#: After the drain timeout: how long terminated sessions get to end before being aborted.
_TERMINATE_GRACE_SECONDS = 5.0
_READY_PROBE_TIMEOUT = 2.0


class ProxyServer:
    def __init__(
        self,
        runtime: Runtime,
        *,
        key_source: JwksKeySource | None = None,
        revocation: RevocationFile | None = None,
        worker: WorkerInfo | None = None,
    ) -> None:
        """``key_source`` and ``revocation``: the long-lived JWKS source and revocation file
        the runtime's verifier uses; the server refreshes them (SIGHUP, file changes).
        ``worker``: this process is one of several workers (see jwtpgproxy.workers)."""
        self._worker = worker
        self._control: asyncio.AbstractServer | None = None
        self._key_source = key_source
        self._revocation = revocation
        self._background: set[asyncio.Task[None]] = set()
        self._tasks: dict[asyncio.Task[None], Session] = {}
        self.context = ServerContext(runtime, CancelRegistry(), Metrics(self._live_sessions))
        if worker is not None and worker.count > 1:
            self.context.cancel_on_peers = functools.partial(cancel_on_peers, worker)
        self._listeners: list[socket.socket] = []
        self._admin: AdminServer | None = None
        self._stopping = asyncio.Event()
        self._pending = 0  # sessions accepted that have not finished login
        self._interrupts = 0

    @property
    def runtime(self) -> Runtime:
        return self.context.runtime

    @property
    def metrics(self) -> Metrics:
        return self.context.metrics

    def _live_sessions(self) -> Iterator[Session]:
        return iter(list(self._tasks.values()))

    async def start(self) -> None:
        """Listen on every configured address (and the admin address, if configured).

        The proxy accepts sockets itself rather than through ``loop.create_server``: a
        session must peek at the first byte before any transport reads it, to tell a
        direct TLS ClientHello from a PostgreSQL packet (see Session._accept).
        """
        shared = self._worker is not None
        for host in self.runtime.listen_hosts:
            listener = _listening_socket(host, self.runtime.listen_port, reuse_port=shared)
            self._listeners.append(listener)
            self._watch(listener)
            address = listener.getsockname()
            event(
                log,
                INFO,
                "listening",
                address=address[0],
                port=address[1],
                tls=self.runtime.downstream_ssl_mode.value,
            )
        if self._revocation is not None:
            watcher = asyncio.create_task(
                self._revocation.watch(
                    self.runtime.settings.token.revocation_poll_seconds,
                    self._revocation_changed,
                ),
                name="revocation watch",
            )
            self._background.add(watcher)
        if self._worker is not None:
            # The supervisor serves /metrics etc. for all workers, asking each over this.
            self._control = await start_control_server(
                self._worker, self._render_metrics, self._cancel_locally
            )
            return
        metrics = self.runtime.settings.metrics
        if metrics.port is not None:
            self._admin = AdminServer(metrics.host, metrics.port, self._render_metrics, self.ready)
            try:
                await self._admin.start()
            except OSError as exc:
                raise ConfigError(
                    f"METRICS__HOST/METRICS__PORT: cannot listen on {metrics.host}:"
                    f"{metrics.port}: {exc.strerror or exc}"
                ) from None

    # -- accepting --

    def _watch(self, listener: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(listener.fileno(), self._on_acceptable, listener)

    def _on_acceptable(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        settings = self.runtime.settings
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                event(log, WARNING, "accept failed", error=exc, pause=_ACCEPT_BACKOFF_SECONDS)
                loop.remove_reader(listener.fileno())
                loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._resume_accepting, listener)
                return
            self.metrics.connections_total.inc()
            if self._pending >= settings.max_pending_logins:
                # Closed without a word: reading even a startup packet costs what the limit
                # is there to bound. The authentication deadline frees the pending ones.
                self.metrics.connections_refused.labels("max_pending_logins").inc()
                event(
                    log,
                    WARNING,
                    "connection refused: too many pending logins",
                    pending=self._pending,
                )
                sock.close()
                continue
            over_limit = len(self._tasks) >= settings.max_client_connections
            if over_limit:
                self.metrics.connections_refused.labels("max_client_connections").inc()
            sock.setblocking(False)
            session = Session(
                self.context, sock, over_limit=over_limit, on_spliced=self._on_spliced
            )
            self._pending += 1
            self.metrics.connections_open.inc()
            task = loop.create_task(session.run())
            self._tasks[task] = session
            task.add_done_callback(self._on_session_done)

    def _on_spliced(self, session: Session) -> None:
        self._pending -= 1

    def _on_session_done(self, task: asyncio.Task[None]) -> None:
        session = self._tasks.pop(task)
        self.metrics.connections_open.dec()
        if not session.spliced:
            self._pending -= 1

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0 and not self._stopping.is_set():
            self._watch(listener)

    # -- health, reload, signals --

    async def _render_metrics(self) -> bytes:
        return self.metrics.render()

    async def _cancel_locally(self, request: wire.CancelRequest) -> bool:
        """A peer worker received this CancelRequest: forward it if the session is ours."""
        entry = self.context.cancels.match(request)
        if entry is None:
            return False
        await cancel_session(self.runtime.upstream, entry, self.metrics, via="peer worker")
        return True

    async def ready(self) -> tuple[bool, str]:
        """Readiness: accepting, and upstream accepts a TCP connection."""
        if self._stopping.is_set():
            return False, "shutting down"
        try:
            async with asyncio.timeout(_READY_PROBE_TIMEOUT):
                protocol = await connect_raw(self.runtime.upstream)
        except (ProxyError, TimeoutError) as exc:
            return False, f"upstream not reachable: {exc}"
        protocol.close()
        return True, "ready"

    def _revocation_changed(self, revoked: RevocationList) -> None:
        """A new revocation list: with TOKEN__END_SESSIONS_ON_REVOCATION, end the live
        sessions whose token it now revokes."""
        if not self.runtime.settings.token.end_sessions_on_revocation:
            return
        for session in list(self._tasks.values()):
            if session.identity is not None and revoked.is_revoked(session.identity.claims):
                session.end("revoked", "terminating connection because its token was revoked")

    def reload(self) -> None:
        """SIGHUP: see :meth:`reload_now`."""
        task = asyncio.get_running_loop().create_task(self.reload_now(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_now(self) -> None:
        """Re-read everything that lives in files or behind URLs -- the revocation list, the
        JWKS, TLS certificates and keys, CA files -- and rebuild the runtime. A bad new
        configuration is logged and the running one kept; live sessions are untouched,
        except that sessions whose token the new revocation list revokes are ended when
        TOKEN__END_SESSIONS_ON_REVOCATION is on."""
        if self._revocation is not None and await self._revocation.poll(force=True):
            self._revocation_changed(self._revocation.current)
        if self._key_source is not None and not await self._key_source.refresh():
            event(
                log,
                WARNING,
                "JWKS refresh failed: keeping the previous keys",
                source=self._key_source.name,
                error=self._key_source.last_error,
            )
        try:
            runtime = build_runtime(
                self.runtime.settings, key_source=self._key_source, revocation=self._revocation
            )
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failed").inc()
            event(log, WARNING, "reload failed: keeping the running configuration", error=exc)
            return
        self.context.runtime = runtime
        self.metrics.config_reloads.labels("ok").inc()
        event(log, INFO, "reloaded", sessions=len(self._tasks))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _on_sigint(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            event(log, WARNING, "second SIGINT: exiting at once", sessions=len(self._tasks))
            raise SystemExit(1)
        self.request_stop("SIGINT")

    def request_stop(self, why: str = "request") -> None:
        event(log, INFO, "shutdown requested", signal=why, sessions=len(self._tasks))
        self._stopping.set()

    # -- shutdown --

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()
        await self.shutdown()

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            if listener.fileno() >= 0:
                loop.remove_reader(listener.fileno())
                listener.close()

    async def shutdown(self) -> None:
        self._stopping.set()
        self._close_listeners()  # stop accepting; live connections are ours to end
        timeout = self.runtime.settings.shutdown_timeout
        if self._tasks:
            event(log, INFO, "draining", sessions=len(self._tasks), timeout=timeout)
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._tasks:
            await self._end_remaining()
        if self._admin is not None:
            self._admin.close()
        if self._control is not None:
            self._control.close()
        for task in self._background:
            task.cancel()
        event(log, INFO, "shutdown complete")

    async def _end_remaining(self) -> None:
        remaining = dict(self._tasks)
        spliced = [s for s in remaining.values() if s.spliced]
        event(
            log,
            INFO,
            "ending sessions after drain timeout",
            sessions=len(remaining),
            spliced=len(spliced),
        )
        for task, session in remaining.items():
            if not session.spliced:
                task.cancel()  # still logging in: the session sends FATAL 57P01 itself
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for session in spliced:
            if session.role and session.database and session.upstream_pid is not None:
                groups[(session.role, session.database)].append(session.upstream_pid)
        results = await asyncio.gather(
            *(
                terminate_backends(self.runtime.upstream, role, database, pids)
                for (role, database), pids in groups.items()
            ),
            return_exceptions=True,
        )
        for (role, _), result in zip(groups, results, strict=True):
            if isinstance(result, BaseException):
                event(
                    log, WARNING, "could not terminate upstream backends", role=role, error=result
                )
        self.metrics.sessions_ended_by_policy.labels("shutdown").inc(len(spliced))
        _, pending = await asyncio.wait(list(remaining), timeout=_TERMINATE_GRACE_SECONDS)
        for task in pending:
            remaining[task].shutdown_now()
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)


def _listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # workers share the port; the kernel balances connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


async def serve(settings: Settings, worker: WorkerInfo | None = None) -> None:
    """Run the proxy until a signal stops it. Keys behind a JWKS URL are fetched first: a
    proxy that cannot verify any token does not start (ConfigError)."""
    key_source = jwks_source(settings)
    revocation = revocation_file(settings)
    if key_source is not None:
        await key_source.start()
    try:
        runtime = build_runtime(settings, key_source=key_source, revocation=revocation)
        server = ProxyServer(runtime, key_source=key_source, revocation=revocation, worker=worker)
        await server.start()
        with contextlib.suppress(NotImplementedError):
            server.install_signal_handlers()
        await server.serve_until_stopped()
    finally:
        if key_source is not None:
            await key_source.close()
