"""CancelRegistry (the synchronous part of jwtpgproxy.proxy.cancel): 55.2.8 "Canceling Requests"."""

from __future__ import annotations

import pytest

from jwtpgproxy.protocol import wire
from jwtpgproxy.proxy.cancel import SECRET_LENGTH_V30, CancelEntry, CancelRegistry

UPSTREAM_SECRET = b"\x11\x22\x33\x44"


def request(pid: int, secret: bytes) -> wire.CancelRequest:
    return wire.CancelRequest(pid, secret)


def test_register_gives_four_byte_proxy_secret() -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=True)
    assert isinstance(entry, CancelEntry)
    assert SECRET_LENGTH_V30 == 4
    assert len(entry.proxy_secret) == 4
    assert entry.process_id == 4242
    assert entry.upstream_secret == UPSTREAM_SECRET
    assert entry.upstream_tls is True
    assert len(registry) == 1
    # Secrets stay out of repr (they end up in logs otherwise).
    assert repr(entry.proxy_secret) not in repr(entry)
    assert repr(UPSTREAM_SECRET) not in repr(entry)


def test_proxy_secret_is_not_upstream_secret() -> None:
    registry = CancelRegistry()
    secrets = {registry.register(pid, UPSTREAM_SECRET, False).proxy_secret for pid in range(20)}
    assert UPSTREAM_SECRET not in secrets


def test_match_right_pid_and_secret() -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    assert registry.match(request(4242, entry.proxy_secret)) is entry


def test_match_from_decoded_wire_packet() -> None:
    registry = CancelRegistry()
    entry = registry.register(7, UPSTREAM_SECRET, upstream_tls=False)
    packet = wire.decode_initial_packet(wire.cancel_request(7, entry.proxy_secret)[4:])
    assert isinstance(packet, wire.CancelRequest)
    assert registry.match(packet) is entry


def test_upstream_secret_does_not_match() -> None:
    registry = CancelRegistry()
    registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    assert registry.match(request(4242, UPSTREAM_SECRET)) is None


def test_wrong_secret() -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    wrong = bytes([entry.proxy_secret[0] ^ 1]) + entry.proxy_secret[1:]
    assert registry.match(request(4242, wrong)) is None


def test_wrong_pid() -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    assert registry.match(request(4243, entry.proxy_secret)) is None


@pytest.mark.parametrize("suffix", [b"", b"\x00", b"\x00" * 28])
def test_wrong_length_secret(suffix: bytes) -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    assert registry.match(request(4242, entry.proxy_secret[:3])) is None
    if suffix:
        assert registry.match(request(4242, entry.proxy_secret + suffix)) is None


def test_unknown_pid_with_zero_secret() -> None:
    # The dummy compared against for unknown pids must never itself match.
    registry = CancelRegistry()
    assert registry.match(request(1, b"\0\0\0\0")) is None
    registry.register(2, UPSTREAM_SECRET, upstream_tls=False)
    assert registry.match(request(1, b"\0\0\0\0")) is None


def test_unregister_removes() -> None:
    registry = CancelRegistry()
    entry = registry.register(4242, UPSTREAM_SECRET, upstream_tls=False)
    registry.unregister(entry)
    assert len(registry) == 0
    assert registry.match(request(4242, entry.proxy_secret)) is None
    registry.unregister(entry)  # idempotent
    assert len(registry) == 0


def test_reregistered_pid_survives_old_unregister() -> None:
    registry = CancelRegistry()
    old = registry.register(4242, b"old!", upstream_tls=False)
    new = registry.register(4242, b"new!", upstream_tls=True)
    assert len(registry) == 1
    if old.proxy_secret != new.proxy_secret:  # equal with probability 2**-32
        assert registry.match(request(4242, old.proxy_secret)) is None
    registry.unregister(old)
    assert len(registry) == 1
    assert registry.match(request(4242, new.proxy_secret)) is new
    registry.unregister(new)
    assert len(registry) == 0


def test_equal_but_distinct_entry_does_not_unregister() -> None:
    registry = CancelRegistry()
    entry = registry.register(9, UPSTREAM_SECRET, upstream_tls=False)
    twin = CancelEntry(9, entry.proxy_secret, UPSTREAM_SECRET, False)
    assert twin == entry and twin is not entry
    registry.unregister(twin)
    assert registry.match(request(9, entry.proxy_secret)) is entry


def test_many_registrations_distinct_secrets() -> None:
    registry = CancelRegistry()
    entries = [registry.register(pid, UPSTREAM_SECRET, upstream_tls=False) for pid in range(1000)]
    assert len(registry) == 1000
    # 4 random bytes each: one birthday collision among 1000 has probability ~1.2e-4, two
    # ~7e-9, so allow one rather than flake; a constant or counter-like secret still fails.
    assert len({e.proxy_secret for e in entries}) >= 999
    assert len({e.proxy_secret[:2] for e in entries}) > 900  # spread over the whole key
    for entry in entries[::97]:
        assert registry.match(request(entry.process_id, entry.proxy_secret)) is entry
