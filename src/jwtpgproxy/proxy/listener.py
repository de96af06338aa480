"""The listener: accepts clients, runs a Session for each, enforces limits, reloads, and
shuts down in order.

Limits: beyond ``MAX_CLIENT_CONNECTIONS`` a client gets FATAL 53300 once its startup packet
is read (before any password is asked); beyond ``MAX_PENDING_LOGINS`` connections that have
not finished login, new connections are closed at once -- with the authentication deadline,
this bounds what stalled clients can hold. ``MAX_PENDING_LOGINS_PER_SOURCE`` does the same
per source address (IPv4 address, IPv6 /64), so that one address cannot take every slot;
and a source whose failed logins exhausted its token bucket (``LOGIN_THROTTLE__*``) has its
new connections closed at once until a token has grown back.

Shutdown (SIGTERM, or the first SIGINT): report not-ready at once, keep accepting for
``SHUTDOWN_DELAY`` seconds (while a load balancer notices), stop accepting, let sessions
finish for up to ``SHUTDOWN_TIMEOUT`` seconds, then end the rest: sessions still logging in
get FATAL 57P01 from the proxy; spliced sessions are ended by upstream itself
(pg_terminate_backend), so their clients get PostgreSQL's own FATAL 57P01 at a message
boundary. A second SIGINT exits at once. SIGHUP reloads what lives in files.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from logging import INFO, WARNING

from ..errors import AuthenticationFailed, ConfigError, TokenRevoked
from ..logs import event
from .cancel import CancelRegistry
from .metrics import Metrics
from .pool import Pool
from .runtime import Runtime
from .session import ServerContext, Session
from .spare import UpstreamSpares
from .throttle import FailedLoginThrottle, source_key
from .upstream import CachedProbe, probe_upstream, terminate_backends

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
        reload: Callable[[], Awaitable[Runtime]] | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``reload``: re-read what lives in files and behind URLs and build a new runtime
        (SIGHUP); raises ConfigError to keep the running one. ``reuse_port``: listen with
        SO_REUSEPORT (one of several workers on one port)."""
        self._reload = reload
        self._reuse_port = reuse_port
        self._background: set[asyncio.Task[None]] = set()
        self._tasks: dict[asyncio.Task[None], Session] = {}
        metrics = Metrics(self._live_sessions)
        rate = runtime.limits.cancel_forwards_per_second
        cancels = CancelRegistry(runtime.cancel_keys, metrics, rate)
        self.context = ServerContext(
            runtime,
            cancels,
            metrics,
            pool=Pool(runtime.pool, metrics),
            spares=UpstreamSpares(metrics),
        )
        self._listeners: list[socket.socket] = []
        self._stopping = asyncio.Event()
        #: Sessions accepted that have not finished login, and how many each source has.
        self._pending: set[Session] = set()
        self._pending_by_source: dict[str, int] = defaultdict(int)
        limits = runtime.limits
        self._throttle = FailedLoginThrottle(
            burst=limits.login_throttle_burst,
            per_minute=limits.login_throttle_per_minute,
            max_sources=limits.login_throttle_max_sources,
        )
        self._interrupts = 0
        self._probe = CachedProbe(
            lambda: probe_upstream(self.runtime.upstream, _READY_PROBE_TIMEOUT)
        )

    @property
    def runtime(self) -> Runtime:
        return self.context.runtime

    @property
    def metrics(self) -> Metrics:
        return self.context.metrics

    def _live_sessions(self) -> Iterator[Session]:
        return iter(list(self._tasks.values()))

    async def start(self) -> None:
        """Listen on every configured address.

        The proxy accepts sockets itself rather than through ``loop.create_server``: a
        session must peek at the first byte before any transport reads it, to tell a
        direct TLS ClientHello from a PostgreSQL packet (see Session._accept).
        """
        downstream = self.runtime.downstream
        for host in downstream.hosts:
            listener = _listening_socket(host, downstream.port, reuse_port=self._reuse_port)
            self._listeners.append(listener)
            self._watch(listener)
            address = listener.getsockname()
            event(
                log,
                INFO,
                "listening",
                address=address[0],
                port=address[1],
                tls=downstream.ssl_mode.value,
            )
        watch = asyncio.create_task(self._watch_stalls(), name="stall watch")
        self._background.add(watch)

    # -- accepting --

    def _watch(self, listener: socket.socket) -> None:
        asyncio.get_running_loop().add_reader(listener.fileno(), self._on_acceptable, listener)

    def _on_acceptable(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limits = self.runtime.limits
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                event(log, WARNING, "accept failed", error=exc, pause=_ACCEPT_BACKOFF_SECONDS)
                loop.remove_reader(listener.fileno())
                loop.call_later(_ACCEPT_BACKOFF_SECONDS, self._resume_accepting, listener)
                return
            self.metrics.connections_total.inc()
            if len(self._pending) >= limits.max_pending_logins:
                # Closed without a word: reading even a startup packet costs what the limit
                # is there to bound. The authentication deadline frees the pending ones.
                self.metrics.connections_refused.labels("max_pending_logins").inc()
                event(
                    log,
                    WARNING,
                    "connection refused: too many pending logins",
                    pending=len(self._pending),
                )
                sock.close()
                continue
            source = source_key(address)
            if not self._admit_source(source, limits.max_pending_logins_per_source):
                sock.close()
                continue
            over_limit = len(self._tasks) >= limits.max_client_connections
            if over_limit:
                self.metrics.connections_refused.labels("max_client_connections").inc()
            sock.setblocking(False)
            session = Session(
                self.context,
                sock,
                source=source,
                over_limit=over_limit,
                on_spliced=self._on_spliced,
            )
            self._pending.add(session)
            self._pending_by_source[source] += 1
            self.metrics.connections_open.inc()
            task = loop.create_task(session.run())
            self._tasks[task] = session
            task.add_done_callback(self._on_session_done)

    def _admit_source(self, source: str, max_pending: int) -> bool:
        """Per-source limits at accept(); refusals are closed without a word (reading even
        a startup packet costs what the limits are there to bound)."""
        if self._pending_by_source.get(source, 0) >= max_pending:
            self.metrics.connections_refused.labels("max_pending_logins_per_source").inc()
            event(
                log,
                WARNING,
                "connection refused: too many pending logins from this source",
                source=source,
                pending=self._pending_by_source[source],
            )
            return False
        if not self._throttle.allows(source):
            self.metrics.connections_refused.labels("login_throttle").inc()
            return False
        return True

    def _release_pending(self, session: Session) -> None:
        if session not in self._pending:
            return
        self._pending.remove(session)
        source = session.source
        left = self._pending_by_source[source] - 1
        if left > 0:
            self._pending_by_source[source] = left
        else:
            del self._pending_by_source[source]
        failure = session.failure
        if (
            failure is not None
            and issubclass(failure, AuthenticationFailed)
            and self._throttle.failed(source)
        ):
            self.metrics.login_throttled_sources.inc()
            event(
                log,
                WARNING,
                "source throttled: too many failed logins",
                source=source,
                retry_after=f"{self._throttle.retry_after(source):.0f}s",
            )

    def _on_spliced(self, session: Session) -> None:
        self._release_pending(session)

    def _on_session_done(self, task: asyncio.Task[None]) -> None:
        session = self._tasks.pop(task)
        self.metrics.connections_open.dec()
        self._release_pending(session)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:  # not closed by shutdown()
            self._watch(listener)

    async def _watch_stalls(self) -> None:
        """Report splice directions that hold unsent bytes without progress for longer than
        ``limits.stall_seconds`` -- a peer that stopped reading, or flow control that never
        resumes -- so a stuck session shows up in the log and metrics instead of hanging
        silently. Looks every few seconds; the data path does no work for it."""
        loop = asyncio.get_running_loop()
        reported: set[tuple[Session, str]] = set()
        while True:
            threshold = self.runtime.limits.stall_seconds
            await asyncio.sleep(min(max(threshold / 2, 0.2), 10.0) if threshold else 10.0)
            if not threshold:
                continue
            now = loop.time()
            live = list(self._tasks.values())
            stuck: set[tuple[Session, str]] = set()
            for session in live:
                splice = session.splice
                if splice is None:
                    continue
                for direction, seconds, unsent in splice.stuck(now):
                    if seconds < threshold:
                        continue
                    stuck.add((session, direction))
                    if (session, direction) not in reported:
                        self.metrics.splice_stalls.labels(direction).inc()
                        event(
                            log,
                            WARNING,
                            "splice stalled",
                            direction=direction,
                            unsent_bytes=unsent,
                            seconds=f"{seconds:.0f}",
                            user=session.user,
                            client=session.peer,
                        )
            for session, direction in reported - stuck:
                if session in live:  # ended sessions are not news
                    event(
                        log, INFO, "splice moving again", direction=direction, client=session.peer
                    )
            reported = stuck
            for direction in ("to_upstream", "to_client"):
                count = sum(1 for _, d in stuck if d == direction)
                self.metrics.splice_stalled.labels(direction).set(count)

    # -- health, reload, signals --

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def ready(self) -> tuple[bool, str]:
        """Readiness: accepting, and upstream accepts a TCP connection."""
        if self._stopping.is_set():
            return False, "shutting down"
        return await self._probe()

    def end_revoked_sessions(self) -> None:
        """With end_sessions_on_revocation, end the live sessions whose token the current
        revocation list revokes (called when the list changed)."""
        revocation = self.runtime.verifier.revocation
        if not self.runtime.end_sessions_on_revocation or revocation is None:
            return
        for session in list(self._tasks.values()):
            identity = session.identity
            if identity is not None and revocation.revoked_by(identity.claims) is not None:
                session.end(TokenRevoked("token revoked during the session"))

    def reload(self) -> None:
        """SIGHUP: see :meth:`reload_now`."""
        task = asyncio.get_running_loop().create_task(self.reload_now(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload_now(self) -> None:
        """Rebuild the runtime from what lives in files or behind URLs. A bad new
        configuration is logged and the running one kept; live sessions are untouched,
        except that sessions whose token is now revoked are ended when
        end_sessions_on_revocation is on."""
        if self._reload is None:
            return
        try:
            runtime = await self._reload()
        except ConfigError as exc:
            self.metrics.config_reloads.labels("failed").inc()
            event(log, WARNING, "reload failed: keeping the running configuration", error=exc)
        else:
            self.context.runtime = runtime
            limits = runtime.limits
            self._throttle.configure(
                burst=limits.login_throttle_burst,
                per_minute=limits.login_throttle_per_minute,
                max_sources=limits.login_throttle_max_sources,
            )
            if self.context.pool is not None:
                # Parked connections logged in with the old upstream password, for tokens
                # checked with the old keys: none is handed out after a reload.
                self.context.pool.settings = runtime.pool
                self.context.pool.close_all("reload")
            self.metrics.config_reloads.labels("ok").inc()
            event(log, INFO, "reloaded", sessions=len(self._tasks))
        self.end_revoked_sessions()

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
        delay = self.runtime.limits.shutdown_delay
        if delay:  # not ready already; accept until the load balancer has noticed
            event(log, INFO, "accepting during shutdown delay", seconds=delay)
            await asyncio.sleep(delay)
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
        if self.context.pool is not None:
            self.context.pool.close_all("shutdown")  # and sessions ending now park nothing
        if self.context.spares is not None:
            self.context.spares.close()
        timeout = self.runtime.limits.shutdown_timeout
        if self._tasks:
            event(log, INFO, "draining", sessions=len(self._tasks), timeout=timeout)
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._tasks:
            await self._end_remaining()
        if self.context.pool is not None:
            await self.context.pool.close()
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
            pid, identity, database = session.upstream_pid, session.identity, session.database
            if pid is not None and identity is not None and database is not None:
                groups[(identity.role, database)].append(pid)
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
