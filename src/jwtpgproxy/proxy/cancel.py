"""Cancel requests that find their session on any worker of any replica: self-routing keys.

A CancelRequest (55.2.8 "Canceling Requests in Progress") is a new connection carrying the
process id and secret key from BackendKeyData. Behind a load balancer or SO_REUSEPORT it
lands on any worker of any replica, and only the one holding the session knew upstream's
key. So the key the client is given *is* upstream's key, encrypted under ``CANCEL__SECRET``
(shared by all replicas; without it, one random secret per process tree): whichever worker
receives the request decrypts it and forwards upstream's (pid, key). Nothing else is shared.

Construction (``S`` = CANCEL__SECRET, >= 32 bytes; sub-keys ``HMAC-SHA512(S, label)``):

* The process id stays upstream's real one (pg_backend_pid() and NOTIFY agree with it).
* Protocol 3.2 clients (variable-length keys): ``key = AES-SIV(K1, ad=pid, L || k || 0*)``
  (RFC 5297; k = upstream's key of length L, padded so the key is >= 32 bytes like
  PostgreSQL 18's). The 16-byte synthetic IV is a MAC over pid and k: a key not made by us
  for that pid -- forged, random, or moved to another pid -- fails decryption and is dropped
  before anything is sent upstream.
* Protocol 3.0 clients (exactly 4 bytes) leave no room for a MAC. ``key = P(K2, pid, k)``,
  a 10-round Feistel permutation of 32 bits whose round function is HMAC-SHA256 under K2
  tweaked by pid and round. A key whose pid is a session of this worker is compared (in
  constant time) with the one we gave out, as before; any other decrypts to *some* 4-byte
  key and is forwarded -- PostgreSQL's own exposure to 2**32 guesses -- at most
  ``CANCEL__MAX_FORWARDS_PER_SECOND`` per source address, and counted by outcome.
* A key we cannot carry (a 3.0 client whose upstream used a longer key, or an upstream key
  over 239 bytes) is random and cancels only on the worker holding the session.
* So is the key of a pooled session (POOL__MODE=session): its backend outlives the client,
  and a key derived from (pid, k) alone would be the same for every client of that
  backend -- an earlier client could cancel a later one's queries through any replica.

What the client learns: a pseudorandom permutation or an authenticated ciphertext of k, so
nothing about k or S; knowing its own (pid, key) does not help to forge another pid's key
(SIV's MAC, and a per-pid tweak). A leaked S lets its holder turn a client's key it has seen
into upstream's key, and get guessed 3.2 keys past the MAC -- upstream then checks them as
it would without the proxy. It gives no login, token or password, and upstream's keys stay
random: S never lets anyone cancel a query whose client key they have not seen. Changing S
only breaks cancels of sessions older than the change that land on another worker.

As in PostgreSQL, the canceller gets no reply either way.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ..errors import UpstreamUnavailable
from ..logs import event
from ..protocol import wire
from .connection import HandshakeProtocol
from .metrics import Metrics
from .throttle import SourceBuckets
from .upstream import UpstreamTarget, connect_raw, first_attempt_tls, negotiate_tls

log = logging.getLogger("jwtpgproxy")

MIN_SECRET_BYTES = 32
_MIN_PLAINTEXT = 16  # + AES-SIV's 16-byte tag: a 3.2 key of at least 32 bytes
_MAX_CARRIED = wire.MAX_CANCEL_KEY_LENGTH - 16 - 1  # the tag and the length byte
_ROUNDS = 10
_PID = struct.Struct("!I")
_ROUND = struct.Struct("!IBH")
_HALVES = struct.Struct("!HH")
_FORWARD_TIMEOUT = 10.0
#: Outcomes (metric label ``result``) after which nothing is sent upstream.
DROPPED = frozenset({"unmatched", "forged", "rate_limited"})


class CancelKeys:
    """The keyed transformations between upstream's cancel key and the client's."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cancel secret must have at least {MIN_SECRET_BYTES} bytes")
        self._siv = AESSIV(hmac.digest(secret, b"jwtpgproxy cancel v1 AES-SIV", "sha512"))
        self._prf = hmac.digest(secret, b"jwtpgproxy cancel v1 Feistel", "sha512")

    def client_key(self, pid: int, upstream_key: bytes, protocol_minor: int) -> bytes:
        if protocol_minor < 2:
            if len(upstream_key) == 4:
                return self._permute(pid, upstream_key, range(_ROUNDS))
            return secrets.token_bytes(4)
        if len(upstream_key) > _MAX_CARRIED:
            return secrets.token_bytes(32)
        plaintext = (bytes([len(upstream_key)]) + upstream_key).ljust(_MIN_PLAINTEXT, b"\0")
        return self._siv.encrypt(plaintext, [_PID.pack(pid)])

    def upstream_key(self, pid: int, client_key: bytes) -> bytes | None:
        """Upstream's key from a client's; None for a 3.2 key we did not make for ``pid``."""
        if len(client_key) == 4:
            return self._permute(pid, client_key, reversed(range(_ROUNDS)))
        try:
            plaintext = self._siv.decrypt(client_key, [_PID.pack(pid)])
        except (InvalidTag, ValueError):
            return None
        return plaintext[1 : 1 + plaintext[0]]

    def _permute(self, pid: int, block: bytes, rounds: Iterable[int]) -> bytes:
        # Feistel: (L, R) -> (R, L ^ F_i(R)); halves swapped at the end, so running the
        # rounds in reverse order on the output undoes it.
        left, right = _HALVES.unpack(block)
        for i in rounds:
            f = hmac.digest(self._prf, _ROUND.pack(pid, i, right), "sha256")
            left, right = right, left ^ int.from_bytes(f[:2])
        return _HALVES.pack(right, left)


@dataclass(frozen=True, slots=True)
class CancelEntry:
    process_id: int
    client_key: bytes = field(repr=False)
    upstream_key: bytes = field(repr=False)
    upstream_tls: bool


class CancelRegistry:
    """This worker's live sessions by upstream pid, and a token bucket per source (IPv4 address,
    IPv6 /64: jwtpgproxy.proxy.throttle.source_key)
    (a bounded table) for the cancels that cannot be verified."""

    def __init__(
        self, keys: CancelKeys, metrics: Metrics, rate: float = 10.0, max_sources: int = 4096
    ) -> None:
        self.keys, self._metrics = keys, metrics
        self._forwards = SourceBuckets(
            burst=max(1.0, rate) if rate > 0 else 0.0, per_second=rate, max_sources=max_sources
        )
        self._by_pid: dict[int, CancelEntry] = {}

    def register(
        self, pid: int, upstream_key: bytes, tls: bool, minor: int, *, routable: bool = True
    ) -> CancelEntry:
        """The client's key for upstream's (``pid``, ``upstream_key``): self-routing, or
        with ``routable=False`` random (valid on this worker only; pooled sessions)."""
        if routable:
            client_key = self.keys.client_key(pid, upstream_key, minor)
        else:
            client_key = secrets.token_bytes(4 if minor < 2 else 32)
        entry = CancelEntry(pid, client_key, upstream_key, tls)
        # Upstream pids are unique among live backends; a stale entry for the same pid
        # (its session not yet cleaned up) is replaced by the live one.
        self._by_pid[pid] = entry
        return entry

    def unregister(self, entry: CancelEntry) -> None:
        if self._by_pid.get(entry.process_id) is entry:
            del self._by_pid[entry.process_id]

    def resolve(self, request: wire.CancelRequest, source: str) -> tuple[str, bytes, bool | None]:
        """(outcome, upstream's key, upstream TLS or None for "as the settings say")."""
        pid, key = request.process_id, request.secret_key
        entry = self._by_pid.get(pid)
        if entry is not None:  # ours: we know exactly which key we gave out
            matched = hmac.compare_digest(entry.client_key, key)
            return ("forwarded" if matched else "unmatched"), entry.upstream_key, entry.upstream_tls
        upstream_key = self.keys.upstream_key(pid, key)
        if upstream_key is None:
            return "forged", b"", None
        if len(key) != 4:
            return "routed", upstream_key, None
        if not self.allow(source):
            return "rate_limited", b"", None
        return "routed_unverified", upstream_key, None

    def allow(self, source: str, now: float | None = None) -> bool:
        """Whether an unverifiable cancel from ``source`` may be forwarded now."""
        return self._forwards.take(source, time.monotonic() if now is None else now)

    async def handle(
        self, request: wire.CancelRequest, target: UpstreamTarget, *, source: str, **fields: object
    ) -> None:
        """Count, log and (unless dropped) forward a CancelRequest received from ``source``."""
        outcome, upstream_key, tls = self.resolve(request, source)
        self._metrics.cancel_requests.labels(outcome).inc()
        pid = request.process_id
        if outcome in DROPPED:
            event(log, INFO, "cancel request ignored", pid=pid, reason=outcome, **fields)
            return
        if tls is None:  # a session held elsewhere: TLS unless the settings try plaintext first
            tls = target.ssl_context is not None and first_attempt_tls(target)
        event(log, INFO, "cancel request forwarded", pid=pid, route=outcome, **fields)
        await forward_cancel(target, pid, upstream_key, tls)


async def forward_cancel(target: UpstreamTarget, pid: int, key: bytes, tls: bool) -> None:
    """Send upstream's CancelRequest on a new connection (over TLS if asked) and wait for
    upstream to close it, as libpq's PQcancel does."""
    protocol: HandshakeProtocol | None = None
    try:
        async with asyncio.timeout(_FORWARD_TIMEOUT):
            protocol = await connect_raw(target)
            if tls:
                await negotiate_tls(protocol, target)
            protocol.write(wire.cancel_request(pid, key))
            try:
                while True:
                    await protocol.read()
            except UpstreamUnavailable:
                pass  # upstream closed it: the cancel was delivered
    except TimeoutError:
        event(log, WARNING, "cancel request to upstream timed out", pid=pid)
    except Exception as exc:  # a failed cancel must not disturb the server
        event(log, WARNING, "cancel request to upstream failed", pid=pid, error=exc)
    finally:
        if protocol is not None:
            protocol.close()
