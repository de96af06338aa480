"""Per-source limits on logins: which "source" a connection counts against, and a token
bucket of failed logins per source.

Keyed by the client's address -- never by user name alone, which would let anyone lock a
user out by failing in their name. An IPv6 client is keyed by its /64: one host commonly
holds a whole /64, so per-address keys would give it 2^64 buckets.

:class:`FailedLoginThrottle` is plain state with an injectable clock (no asyncio, no
sockets): each failed login takes a token from its source's bucket, which refills at
``per_minute`` tokens a minute up to ``burst``; a source whose bucket is empty is throttled
(its new connections are refused) until a token has grown back. The table is bounded: at
``max_sources`` the least recently touched source is forgotten (a full bucket carries no
information, so nothing is lost for well-behaved sources). The buckets themselves are
:class:`SourceBuckets`, which the cancel forwarding limit (jwtpgproxy.proxy.cancel) uses too.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable


def source_key(address: object) -> str:
    """The key a client address counts against: the IPv4 address, or the IPv6 /64 (an
    IPv4-mapped IPv6 address counts as its IPv4 address). Anything else (a Unix socket)
    is one source."""
    host = address[0] if isinstance(address, tuple) and address else address
    if not isinstance(host, str):
        return "local"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class SourceBuckets:
    """Token buckets keyed by source: each holds up to ``burst`` tokens and refills at
    ``per_second``; a source not in the table has a full bucket. At most ``max_sources``
    are kept, the least recently stored forgotten first."""

    def __init__(self, *, burst: float, per_second: float, max_sources: int) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.configure(burst=burst, per_second=per_second, max_sources=max_sources)

    def configure(self, *, burst: float, per_second: float, max_sources: int) -> None:
        """New limits; the buckets are kept (the oldest dropped beyond ``max_sources``)."""
        self.burst, self.per_second, self.max_sources = burst, per_second, max_sources
        self._trim()

    def __len__(self) -> int:
        return len(self._buckets)

    def level(self, source: str, now: float) -> float:
        """``source``'s tokens at ``now``."""
        entry = self._buckets.get(source)
        if entry is None:
            return float(self.burst)
        tokens, at = entry
        return min(float(self.burst), tokens + (now - at) * self.per_second)

    def store(self, source: str, tokens: float, now: float) -> None:
        self._buckets[source] = (tokens, now)
        self._buckets.move_to_end(source)
        self._trim()

    def forget(self, source: str) -> None:
        self._buckets.pop(source, None)

    def take(self, source: str, now: float) -> bool:
        """Take one token from ``source`` if it has one; whether it had."""
        tokens = self.level(source, now)
        allowed = tokens >= 1.0
        self.store(source, tokens - allowed, now)
        return allowed

    def _trim(self) -> None:
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


class FailedLoginThrottle:
    """A token bucket of failed logins per source (see the module docstring).
    ``burst`` 0 turns throttling off."""

    def __init__(
        self,
        *,
        burst: int,
        per_minute: float,
        max_sources: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._buckets = SourceBuckets(burst=0, per_second=1.0, max_sources=1)
        self.configure(burst=burst, per_minute=per_minute, max_sources=max_sources)

    def configure(self, *, burst: int, per_minute: float, max_sources: int) -> None:
        """New limits (a reload); the buckets are kept."""
        if burst < 0 or per_minute <= 0 or max_sources < 1:
            raise ValueError("burst >= 0, per_minute > 0 and max_sources >= 1 required")
        self._buckets.configure(burst=burst, per_second=per_minute / 60.0, max_sources=max_sources)

    @property
    def burst(self) -> float:
        return self._buckets.burst

    @property
    def per_second(self) -> float:
        return self._buckets.per_second

    @property
    def max_sources(self) -> int:
        return self._buckets.max_sources

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allows(self, source: str) -> bool:
        """Whether a new connection from ``source`` may try to log in."""
        if not self.enabled:
            return True
        tokens = self._buckets.level(source, self._clock())
        if tokens >= self.burst:
            self._buckets.forget(source)  # full again: forget it
            return True
        return tokens >= 1.0

    def failed(self, source: str) -> bool:
        """Record a failed login from ``source``; True if the source is now throttled."""
        if not self.enabled:
            return False
        now = self._clock()
        tokens = self._buckets.level(source, now) - 1.0
        self._buckets.store(source, max(tokens, 0.0), now)
        return tokens < 1.0

    def retry_after(self, source: str) -> float:
        """Seconds until ``source`` may try again (0 if it may now)."""
        if not self.enabled:
            return 0.0
        tokens = self._buckets.level(source, self._clock())
        if tokens >= 1.0:
            return 0.0
        return (1.0 - tokens) / self.per_second
