"""Prometheus metrics (prometheus-client), in a registry of the server's own.

Label values come from small fixed sets only -- never a user name, token, key id or client
address -- so cardinality stays bounded whatever clients send (DESIGN.md principle 8).
Byte counters are summed at scrape time from the live sessions plus the closed ones, so the
splice hot path does no metrics work at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: The reason label of a successful login; failures use their error's metric_reason.
LOGIN_OK = "ok"


class ByteCounts(Protocol):
    @property
    def bytes_from_client(self) -> int: ...

    @property
    def bytes_to_client(self) -> int: ...


class _BytesCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        from_client, to_client = self._metrics.closed_bytes
        for session in self._metrics.live_sessions():
            from_client += session.bytes_from_client
            to_client += session.bytes_to_client
        family = CounterMetricFamily(
            "jwtpgproxy_client_bytes",
            "Bytes received from and sent to clients",
            labels=["direction"],
        )
        family.add_metric(["from_client"], from_client)
        family.add_metric(["to_client"], to_client)
        yield family


class Metrics:
    def __init__(self, live_sessions: Callable[[], Iterator[ByteCounts]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.live_sessions = live_sessions
        self.closed_bytes = [0, 0]
        r = self.registry
        self.connections_open = Gauge(
            "jwtpgproxy_client_connections_open", "Client connections open now", registry=r
        )
        self.connections_total = Counter(
            "jwtpgproxy_client_connections", "Client connections accepted", registry=r
        )
        self.connections_refused = Counter(
            "jwtpgproxy_client_connections_refused",
            "Client connections refused before login by a limit",
            ["limit"],
            registry=r,
        )
        self.login_throttled_sources = Counter(
            "jwtpgproxy_login_throttled_sources",
            "Times a source address was throttled for its failed logins",
            registry=r,
        )
        self.logins = Counter(
            "jwtpgproxy_logins",
            "Login attempts by outcome and failure reason",
            ["outcome", "reason"],
            registry=r,
        )
        self.upstream_login_seconds = Histogram(
            "jwtpgproxy_upstream_login_seconds",
            "Upstream connect, TLS and login time",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.upstream_spares = Counter(
            "jwtpgproxy_upstream_spares",
            "Spare upstream connections: logins that found one ready (used) or not (none), "
            "and spares closed unused (expired, stale) or not opened (failed)",
            ["result"],
            registry=r,
        )
        self.upstream_spares_ready = Gauge(
            "jwtpgproxy_upstream_spares_ready", "Spare upstream connections ready now", registry=r
        )
        self.cancel_requests = Counter(
            "jwtpgproxy_cancel_requests",
            "Cancel requests received, by result",
            ["result"],
            registry=r,
        )
        self.sessions_ended_by_policy = Counter(
            "jwtpgproxy_sessions_ended_by_policy",
            "Sessions the proxy ended itself, by reason",
            ["reason"],
            registry=r,
        )
        self.splice_stalls = Counter(
            "jwtpgproxy_splice_stalls",
            "Splice directions found holding unsent bytes without progress, by direction",
            ["direction"],
            registry=r,
        )
        self.splice_stalled = Gauge(
            "jwtpgproxy_splice_stalled",
            "Splice directions stalled now, by direction",
            ["direction"],
            registry=r,
        )
        self.config_reloads = Counter(
            "jwtpgproxy_config_reloads", "Configuration reloads, by result", ["result"], registry=r
        )
        # Session pooling (POOL__MODE=session); all zero when it is off.
        self.pool_hits = Counter(
            "jwtpgproxy_pool_hits", "Logins served by a parked upstream connection", registry=r
        )
        self.pool_misses = Counter(
            "jwtpgproxy_pool_misses",
            "Pooled logins that found no parked upstream connection and logged in upstream",
            registry=r,
        )
        self.pool_parked = Gauge(
            "jwtpgproxy_pool_parked", "Upstream connections parked now", registry=r
        )
        self.pool_resets = Counter(
            "jwtpgproxy_pool_resets",
            "Upstream connections reset (DISCARD ALL) after a clean end, by result",
            ["result"],
            registry=r,
        )
        self.pool_discards = Counter(
            "jwtpgproxy_pool_discards",
            "Pooled upstream connections closed instead of parked or handed out, by reason",
            ["reason"],
            registry=r,
        )
        r.register(_BytesCollector(self))

    def session_closed(self, session: ByteCounts) -> None:
        self.closed_bytes[0] += session.bytes_from_client
        self.closed_bytes[1] += session.bytes_to_client

    def login_succeeded(self) -> None:
        self.logins.labels("success", LOGIN_OK).inc()

    def login_failed(self, reason: str) -> None:
        self.logins.labels("failure", reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
