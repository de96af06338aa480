"""Per-source login limits: source keys and the failed-login token bucket (issue 13, item 5)."""

from __future__ import annotations

import pytest

from jwtpgproxy.proxy.throttle import FailedLoginThrottle, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (("192.0.2.7", 5432), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 5432, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::9", 1, 0, 0), "2001:db8:1:2::/64"),  # same /64, same source
        (("::ffff:192.0.2.7", 1, 0, 0), "192.0.2.7"),
        (("fe80::1%eth0", 1, 0, 1), "fe80::/64"),
        ("", ""),
        (None, "local"),
    ],
)
def test_source_key(address: object, key: str) -> None:
    assert source_key(address) == key


def test_token_bucket_throttles_after_burst_then_refills() -> None:
    clock = Clock()
    throttle = FailedLoginThrottle(burst=3, per_minute=6, max_sources=10, clock=clock)
    assert throttle.allows("a")
    assert throttle.failed("a") is False
    assert throttle.failed("a") is False
    assert throttle.failed("a") is True  # the third failure empties the bucket
    assert not throttle.allows("a")
    assert throttle.allows("b")  # other sources are not affected
    assert throttle.retry_after("a") == pytest.approx(10.0)  # 6 a minute: one per 10 s
    clock.now += 9.9
    assert not throttle.allows("a")
    clock.now += 0.2
    assert throttle.allows("a")
    assert throttle.failed("a") is True  # one token, used: throttled again
    clock.now += 15
    assert throttle.allows("a")
    assert len(throttle) == 1
    clock.now += 60
    assert throttle.allows("a")
    assert len(throttle) == 0  # a full bucket is forgotten


def test_table_is_bounded() -> None:
    clock = Clock()
    throttle = FailedLoginThrottle(burst=1, per_minute=1, max_sources=100, clock=clock)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100
    assert not throttle.allows("10.0.3.231")  # the most recent are kept
    assert throttle.allows("10.0.0.0")  # the oldest forgotten


def test_burst_zero_is_off() -> None:
    throttle = FailedLoginThrottle(burst=0, per_minute=1, max_sources=10)
    for _ in range(100):
        assert throttle.failed("a") is False
    assert throttle.allows("a")
    assert len(throttle) == 0


def test_reconfigure_keeps_buckets_and_shrinks_the_table() -> None:
    clock = Clock()
    throttle = FailedLoginThrottle(burst=1, per_minute=1, max_sources=10, clock=clock)
    for name in "abcde":
        throttle.failed(name)
    throttle.configure(burst=1, per_minute=1, max_sources=2)
    assert len(throttle) == 2
    assert not throttle.allows("e")
