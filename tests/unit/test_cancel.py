"""Self-routing cancel keys (jwtpgproxy.proxy.cancel), byte by byte, and the registry that
decides what a CancelRequest is: 55.2.8 "Canceling Requests in Progress"."""

from __future__ import annotations

import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.protocol import wire
from jwtpgproxy.proxy.cancel import CancelEntry, CancelKeys, CancelRegistry
from jwtpgproxy.proxy.metrics import Metrics

SECRET = bytes(range(32))
KEY30 = b"\x11\x22\x33\x44"
KEY32 = bytes(range(100, 132))  # PostgreSQL 18's 32-byte keys


def keys(secret: bytes = SECRET) -> CancelKeys:
    return CancelKeys(secret)


# --- The construction ----------------------------------------------------------------------


def test_secret_shorter_than_32_bytes_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CancelKeys(b"x" * 31)


def test_v32_key_is_aes_siv_of_length_key_padding_with_pid_as_associated_data() -> None:
    """The documented construction, recomputed independently: AES-SIV (RFC 5297) under
    HMAC-SHA512(S, label), plaintext L || k || zero padding to 16 bytes, ad = pid."""
    k1 = hmac.digest(SECRET, b"jwtpgproxy cancel v1 AES-SIV", "sha512")
    expected = AESSIV(k1).encrypt(b"\x04" + KEY30 + bytes(11), [struct.pack("!I", 4242)])
    assert keys().client_key(4242, KEY30, 2) == expected
    assert len(expected) == 32  # like PostgreSQL 18's keys
    long = keys().client_key(4242, KEY32, 2)
    assert long == AESSIV(k1).encrypt(b"\x20" + KEY32, [struct.pack("!I", 4242)])
    assert len(long) == 16 + 1 + 32


@pytest.mark.parametrize(
    "upstream",
    [KEY30, KEY32, bytes(range(7)), bytes(range(239))],
    ids=["4 bytes", "32 bytes", "7 bytes", "239 bytes"],  # the same ids in every xdist worker
)
def test_v32_round_trip(upstream: bytes) -> None:
    client = keys().client_key(77, upstream, 2)
    assert 32 <= len(client) <= wire.MAX_CANCEL_KEY_LENGTH
    assert keys().upstream_key(77, client) == upstream
    # Another process tree with the same secret (another replica) recovers it too.
    assert CancelKeys(bytes(SECRET)).upstream_key(77, client) == upstream


def test_v30_round_trip_over_many_keys_and_pids() -> None:
    k = keys()
    for pid in (1, 2, 4242, 2**31 - 1, 2**32 - 1):
        for upstream in (
            KEY30,
            b"\0\0\0\0",
            b"\xff\xff\xff\xff",
            *(os.urandom(4) for _ in range(50)),
        ):
            client = k.client_key(pid, upstream, 0)
            assert len(client) == 4
            assert k.upstream_key(pid, client) == upstream


@settings(max_examples=300, deadline=None)
@given(
    pid=st.integers(0, 2**32 - 1),
    upstream=st.binary(min_size=4, max_size=239),
    tamper=st.integers(0, 255 * 8),
)
def test_property_round_trip_and_any_tampering_detected(
    pid: int, upstream: bytes, tamper: int
) -> None:
    k = keys()
    client = k.client_key(pid, upstream, 2)
    assert k.upstream_key(pid, client) == upstream
    i, bit = divmod(tamper, 8)
    i %= len(client)
    forged = client[:i] + bytes([client[i] ^ (1 << bit)]) + client[i + 1 :]
    assert k.upstream_key(pid, forged) is None
    if len(upstream) == 4:
        assert k.upstream_key(pid, k.client_key(pid, upstream, 0)) == upstream


def test_v30_is_a_permutation_tweaked_by_pid() -> None:
    k = keys()
    outputs = {k.client_key(9, i.to_bytes(4), 0) for i in range(0, 2**32, 2**32 // 4096)}
    assert len(outputs) == 4096  # a bijection never collides
    assert k.client_key(9, KEY30, 0) != k.client_key(10, KEY30, 0)
    # A client's own (pid, key) says nothing of another pid's: decrypting it under another
    # pid gives an unrelated upstream key.
    assert k.upstream_key(10, k.client_key(9, KEY30, 0)) != KEY30


def test_forged_v32_key_rejected_bit_by_bit() -> None:
    k = keys()
    client = k.client_key(4242, KEY32, 2)
    for i in range(len(client)):
        for bit in (0x01, 0x80):
            forged = client[:i] + bytes([client[i] ^ bit]) + client[i + 1 :]
            assert k.upstream_key(4242, forged) is None
    assert k.upstream_key(4243, client) is None  # moved to another pid
    assert k.upstream_key(4242, client[:-1]) is None
    assert k.upstream_key(4242, client + b"\0") is None
    for _ in range(200):
        assert k.upstream_key(4242, os.urandom(32)) is None
    for length in (5, 15, 16, 17, 256):
        assert k.upstream_key(4242, bytes(length)) is None


def test_different_secret_gives_different_key_and_recovers_nothing() -> None:
    a, b = keys(), keys(b"\x01" + SECRET[1:])
    assert a.client_key(4242, KEY30, 0) != b.client_key(4242, KEY30, 0)
    assert a.client_key(4242, KEY32, 2) != b.client_key(4242, KEY32, 2)
    assert b.upstream_key(4242, a.client_key(4242, KEY32, 2)) is None
    assert b.upstream_key(4242, a.client_key(4242, KEY30, 0)) != KEY30


def test_upstream_key_never_appears_in_client_key() -> None:
    k = keys()
    for pid in range(1, 300):
        for upstream, minor in ((KEY30, 0), (KEY30, 2), (KEY32, 2)):
            client = k.client_key(pid, upstream, minor)
            assert upstream not in client
            assert upstream[:4] not in client
    # Deterministic: a client learns nothing from reconnecting to the same backend.
    assert k.client_key(5, KEY32, 2) == k.client_key(5, KEY32, 2)


def test_keys_that_cannot_be_carried_are_random() -> None:
    k = keys()
    # A 3.0 client whose upstream handed out a long key; an upstream key over 239 bytes.
    first, second = k.client_key(1, KEY32, 0), k.client_key(1, KEY32, 0)
    assert len(first) == 4 and first != second
    huge = os.urandom(240)
    assert len(k.client_key(1, huge, 2)) == 32
    assert k.upstream_key(1, k.client_key(1, huge, 2)) is None


# --- The registry: what a CancelRequest is ------------------------------------------------


def registry_of(rate: float = 10.0, max_sources: int = 4096) -> CancelRegistry:
    return CancelRegistry(keys(), Metrics(lambda: iter(())), rate, max_sources)


def request(pid: int, key: bytes) -> wire.CancelRequest:
    return wire.CancelRequest(pid, key)


def test_local_session_matches_exactly() -> None:
    registry = registry_of()
    entry = registry.register(4242, KEY30, True, 0)
    assert isinstance(entry, CancelEntry)
    assert repr(entry.client_key) not in repr(entry) and repr(KEY30) not in repr(entry)
    assert registry.resolve(request(4242, entry.client_key), "a") == ("forwarded", KEY30, True)
    wrong = bytes([entry.client_key[0] ^ 1]) + entry.client_key[1:]
    assert registry.resolve(request(4242, wrong), "a")[0] == "unmatched"
    assert registry.resolve(request(4242, KEY30), "a")[0] == "unmatched"  # upstream's own


def test_session_of_another_replica_is_routed() -> None:
    mine, theirs = registry_of(), registry_of()
    v32 = theirs.register(50, KEY32, True, 2).client_key
    v30 = theirs.register(51, KEY30, True, 0).client_key
    assert mine.resolve(request(50, v32), "a") == ("routed", KEY32, None)
    assert mine.resolve(request(51, v30), "a") == ("routed_unverified", KEY30, None)
    assert mine.resolve(request(50, os.urandom(32)), "a")[0] == "forged"


def test_pooled_backend_keys_are_per_client_and_local() -> None:
    """A pooled backend (same pid, same upstream key) serves one client after another:
    each gets a key of its own, and no replica other than the one holding the session can
    turn an earlier client's key into upstream's."""
    mine, elsewhere = registry_of(), registry_of()
    for minor, upstream_key in ((2, KEY32), (0, KEY30)):
        first = mine.register(70, upstream_key, True, minor, routable=False).client_key
        second = mine.register(70, upstream_key, True, minor, routable=False).client_key
        assert first != second and len(first) == (32 if minor else 4)
        assert mine.resolve(request(70, second), "a") == ("forwarded", upstream_key, True)
        assert mine.resolve(request(70, first), "a")[0] == "unmatched"
        outcome, recovered, _ = elsewhere.resolve(request(70, first), "a")
        assert recovered != upstream_key, outcome


def test_unverifiable_forwards_limited_per_source() -> None:
    registry = registry_of(rate=3)
    outcomes = [registry.resolve(request(60, os.urandom(4)), "10.0.0.1")[0] for _ in range(5)]
    assert outcomes == ["routed_unverified"] * 3 + ["rate_limited"] * 2
    assert registry.resolve(request(60, os.urandom(4)), "10.0.0.2")[0] == "routed_unverified"
    # 3.2 keys carry their own proof: never limited.
    v32 = registry_of().register(61, KEY32, False, 2).client_key
    assert all(registry.resolve(request(61, v32), "10.0.0.1")[0] == "routed" for _ in range(20))
    assert registry_of(rate=0).resolve(request(60, KEY30), "x")[0] == "rate_limited"


def test_limiter_refills_and_table_is_bounded() -> None:
    limiter = registry_of(rate=2, max_sources=100)
    assert [limiter.allow("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("a", now=0.5) and not limiter.allow("a", now=0.5)
    for i in range(1000):
        limiter.allow(f"s{i}", now=1.0)
    assert len(limiter._forwards) <= 100


def test_unregister_and_reregistered_pid() -> None:
    registry = registry_of()
    old = registry.register(4242, b"old!", False, 0)
    new = registry.register(4242, b"new!", True, 0)
    registry.unregister(old)  # the stale session's cleanup keeps the live entry
    assert registry.resolve(request(4242, new.client_key), "a") == ("forwarded", b"new!", True)
    registry.unregister(new)
    # Gone from this worker: now decrypted like any other replica's key.
    assert registry.resolve(request(4242, new.client_key), "a") == (
        "routed_unverified",
        b"new!",
        None,
    )
