"""Cancel requests: the client gets upstream's real process id and a secret of the proxy's
own; a CancelRequest matching both is forwarded upstream with upstream's secret.

Upstream's secret never leaves the proxy, so a client cannot cancel (or learn how to cancel)
another client's queries. Secrets are compared in constant time. As in PostgreSQL, the
canceller gets no reply either way (55.2.8 "Canceling Requests in Progress").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from logging import INFO, WARNING

from ..errors import UpstreamUnavailable
from ..logs import event
from ..protocol import wire
from .connection import HandshakeProtocol
from .metrics import Metrics
from .upstream import UpstreamTarget, connect_raw, negotiate_tls

log = logging.getLogger("jwtpgproxy")

#: Protocol 3.0 cancel keys are exactly four bytes; 3.2 allows up to 256 and PostgreSQL 18
#: uses 32, as do we for 3.2 clients.
SECRET_LENGTH_V30 = 4
SECRET_LENGTH_V32 = 32


def secret_length(protocol_minor: int) -> int:
    return SECRET_LENGTH_V30 if protocol_minor < 2 else SECRET_LENGTH_V32


_FORWARD_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class CancelEntry:
    process_id: int
    proxy_secret: bytes = field(repr=False)
    upstream_secret: bytes = field(repr=False)
    upstream_tls: bool


class CancelRegistry:
    """(process id, proxy secret) -> upstream cancel key, for the live sessions."""

    def __init__(self) -> None:
        self._by_pid: dict[int, CancelEntry] = {}

    def __len__(self) -> int:
        return len(self._by_pid)

    def register(
        self,
        process_id: int,
        upstream_secret: bytes,
        upstream_tls: bool,
        length: int = SECRET_LENGTH_V30,
    ) -> CancelEntry:
        proxy_secret = secrets.token_bytes(length)
        entry = CancelEntry(process_id, proxy_secret, upstream_secret, upstream_tls)
        # Upstream process ids are unique among live backends; a stale entry for the same id
        # (its session not yet cleaned up) is replaced by the live one.
        self._by_pid[process_id] = entry
        return entry

    def unregister(self, entry: CancelEntry) -> None:
        if self._by_pid.get(entry.process_id) is entry:
            del self._by_pid[entry.process_id]

    def match(self, request: wire.CancelRequest) -> CancelEntry | None:
        entry = self._by_pid.get(request.process_id)
        # Compare against a dummy when the pid is unknown, so timing does not tell whether a
        # process id is live. A key of another length than ours never matches (3.0 keys
        # are exactly 4 bytes); the length itself is no secret.
        expected = entry.proxy_secret if entry is not None else bytes(len(request.secret_key))
        if hmac.compare_digest(expected, request.secret_key) and entry is not None:
            return entry
        return None


async def cancel_session(
    target: UpstreamTarget, entry: CancelEntry, metrics: Metrics, **log_fields: object
) -> None:
    """A CancelRequest matched ``entry``: count it, log it, forward it upstream."""
    metrics.cancel_requests.labels("forwarded").inc()
    event(
        log,
        INFO,
        "cancel request forwarded",
        pid=entry.process_id,
        upstream_tls=entry.upstream_tls,
        **log_fields,
    )
    await forward_cancel(target, entry)


async def forward_cancel(target: UpstreamTarget, entry: CancelEntry) -> None:
    """Send upstream's CancelRequest on a new connection (over TLS if the session used TLS)
    and wait for upstream to close it, as libpq's PQcancel does."""
    protocol: HandshakeProtocol | None = None
    try:
        async with asyncio.timeout(_FORWARD_TIMEOUT):
            protocol = await connect_raw(target)
            if entry.upstream_tls:
                await negotiate_tls(protocol, target)
            protocol.write(wire.cancel_request(entry.process_id, entry.upstream_secret))
            try:
                while True:
                    await protocol.read()
            except UpstreamUnavailable:
                pass  # upstream closed it: the cancel was delivered
    except TimeoutError:
        event(log, WARNING, "cancel request to upstream timed out", pid=entry.process_id)
    except Exception as exc:  # a failed cancel must not disturb the server
        event(log, WARNING, "cancel request to upstream failed", pid=entry.process_id, error=exc)
    finally:
        if protocol is not None:
            protocol.close()
