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
information, so nothing is lost for well-behaved sources).
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
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.configure(burst=burst, per_minute=per_minute, max_sources=max_sources)

    def configure(self, *, burst: int, per_minute: float, max_sources: int) -> None:
        """New limits (a reload); the buckets are kept."""
        if burst < 0 or per_minute <= 0 or max_sources < 1:
            raise ValueError("burst >= 0, per_minute > 0 and max_sources >= 1 required")
        self.burst = burst
        self.per_second = per_minute / 60.0
        self.max_sources = max_sources
        while len(self._buckets) > max_sources:
            self._buckets.popitem(last=False)

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, source: str, now: float) -> float | None:
        entry = self._buckets.get(source)
        if entry is None:
            return None
        tokens, at = entry
        return min(float(self.burst), tokens + (now - at) * self.per_second)

    def allows(self, source: str) -> bool:
        """Whether a new connection from ``source`` may try to log in."""
        if not self.enabled:
            return True
        now = self._clock()
        tokens = self._tokens(source, now)
        if tokens is None:
            return True
        if tokens >= self.burst:
            del self._buckets[source]  # full again: forget it
            return True
        return tokens >= 1.0

    def failed(self, source: str) -> bool:
        """Record a failed login from ``source``; True if the source is now throttled."""
        if not self.enabled:
            return False
        now = self._clock()
        tokens = self._tokens(source, now)
        tokens = (float(self.burst) if tokens is None else tokens) - 1.0
        self._buckets[source] = (max(tokens, 0.0), now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return tokens < 1.0

    def retry_after(self, source: str) -> float:
        """Seconds until ``source`` may try again (0 if it may now)."""
        tokens = self._tokens(source, self._clock()) if self.enabled else None
        if tokens is None or tokens >= 1.0:
            return 0.0
        return (1.0 - tokens) / self.per_second
