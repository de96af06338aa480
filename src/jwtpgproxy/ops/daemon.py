"""The daemon: assemble the runtime, the listener and the operator's endpoints, and run
until a signal stops it.

One process serves clients itself, or (``WORKERS`` > 1) supervises worker processes that
each run :func:`serve` on one shared port (see :mod:`jwtpgproxy.ops.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets

from ..proxy.listener import ProxyServer
from ..proxy.upstream import CachedProbe, probe_upstream
from .admin import AdminServer
from .config import Settings, open_runtime, upstream_target
from .workers import Supervisor, WorkerInfo, start_control_server


async def serve(settings: Settings, worker: WorkerInfo | None = None) -> None:
    """Run the proxy until a signal stops it. Keys behind a JWKS URL are fetched first: a
    proxy that cannot verify any token does not start (ConfigError)."""
    async with open_runtime(settings) as configured, contextlib.AsyncExitStack() as stack:
        server = ProxyServer(
            configured.runtime, reload=configured.reload, reuse_port=worker is not None
        )
        await server.start()
        if worker is not None:
            # The supervisor serves /metrics etc. for all workers, asking each over this.
            control = await start_control_server(worker, server.render_metrics)
            stack.callback(control.close)
        elif settings.metrics.port is not None:
            admin = AdminServer(
                settings.metrics.host, settings.metrics.port, server.render_metrics, server.ready
            )
            await admin.start()
            stack.callback(admin.close)
        if configured.revocation is not None:
            watch = asyncio.create_task(
                configured.revocation.watch(
                    settings.token.revocation_poll_seconds,
                    lambda _revoked: server.end_revoked_sessions(),
                ),
                name="revocation watch",
            )
            stack.callback(watch.cancel)
        with contextlib.suppress(NotImplementedError):
            server.install_signal_handlers()
        await server.serve_until_stopped()


async def supervise(settings: Settings) -> int:
    """WORKERS > 1: run that many worker processes and serve the admin endpoints for all."""
    target = upstream_target(settings)  # also checks the upstream settings up front
    # Workers must share the cancel secret (any worker recovers any session's cancel key):
    # without CANCEL__SECRET, one random secret for this process tree.
    secret = {} if settings.cancel.secret else {"CANCEL__SECRET": secrets.token_hex(32)}
    supervisor = Supervisor(
        settings.workers,
        metrics_host=settings.metrics.host,
        metrics_port=settings.metrics.port,
        ready=CachedProbe(functools.partial(probe_upstream, target)),
        env=secret,
    )
    return await supervisor.run()
