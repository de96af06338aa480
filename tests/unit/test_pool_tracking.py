"""Session pooling's message tracking: fed whole, in every split and byte by byte."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from jwtpgproxy.protocol import wire
from jwtpgproxy.proxy.pool import (
    BackendTracker,
    FrontendTracker,
    PoolKey,
    SessionTracking,
    pool_key,
)
from jwtpgproxy.proxy.splice import MessageBoundaries


def msg(tag: bytes, body: bytes = b"") -> bytes:
    return wire.typed_message(tag, body)


def ps(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


def rfq(status: bytes) -> bytes:
    return msg(b"Z", status)


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole; byte by byte; and cut in two at every offset."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def backend_after(chunks: list[bytes], tracker: BackendTracker | None = None) -> BackendTracker:
    tracker = tracker or BackendTracker()
    for chunk in chunks:
        assert tracker.advance(chunk) is None
    return tracker


GREETING = (
    msg(b"R", b"\0\0\0\0")
    + ps("application_name", "")
    + ps("TimeZone", "UTC")
    + msg(b"K", b"\0\0\0\x07abcd")
    + rfq(b"I")
)


@pytest.mark.parametrize("chunks", list(chunkings(GREETING)), ids=lambda c: str(len(c)))
def test_backend_greeting_any_split(chunks: list[bytes]) -> None:
    tracker = backend_after(chunks)
    assert tracker.parameters == {"application_name": "", "TimeZone": "UTC"}
    assert (tracker.ready, tracker.status, tracker.at_boundary) == (1, b"I", True)
    assert not (tracker.copy or tracker.error or tracker.overflow)


def test_backend_status_follows_last_ready_for_query_byte_by_byte() -> None:
    stream = (
        rfq(b"I")
        + msg(b"C", b"BEGIN\0")
        + rfq(b"T")
        + msg(b"E", b"SERROR\0C42601\0Mboom\0\0")
        + rfq(b"E")
        + msg(b"C", b"ROLLBACK\0")
        + ps("TimeZone", "Europe/Paris")
        + rfq(b"I")
    )
    tracker = BackendTracker()
    seen = []
    for i in range(len(stream)):
        tracker.advance(stream[i : i + 1])
        seen.append((tracker.ready, tracker.status, tracker.error))
    assert (tracker.ready, tracker.status) == (4, b"I")
    assert tracker.parameters == {"TimeZone": "Europe/Paris"}
    assert tracker.errors == 1 and not tracker.error
    assert (3, b"E", False) in seen and (2, b"T", True) in seen


def test_backend_error_and_copy_last_until_ready_for_query() -> None:
    tracker = backend_after([rfq(b"I"), msg(b"H", b"\0\0\0"), msg(b"d", b"row\n")])
    assert tracker.copy
    tracker.advance(msg(b"c") + msg(b"C", b"COPY 1\0"))
    assert tracker.copy  # until ReadyForQuery
    tracker.advance(rfq(b"I"))
    assert not tracker.copy
    tracker.advance(msg(b"E", b"SFATAL\0C57P01\0Mterminating\0\0"))
    assert tracker.error  # no ReadyForQuery follows a FATAL


def test_backend_is_a_message_boundaries_drop_in() -> None:
    """EndableHalf's contract: stop at the first boundary, same answers as the original."""
    stream = ps("a", "b") + msg(b"D", b"x" * 300) + rfq(b"I")
    for chunks in chunkings(stream):
        ours, theirs = BackendTracker(), MessageBoundaries()
        for chunk in chunks:
            assert ours.advance(chunk, stop_at_boundary=True) == theirs.advance(
                chunk, stop_at_boundary=True
            )
            assert ours.at_boundary == theirs.at_boundary
            ours.advance(chunk[:0])
        for chunk in chunks:
            assert ours.advance(chunk) == theirs.advance(chunk)
            assert ours.at_boundary == theirs.at_boundary


def test_backend_oversized_parameter_status_is_not_kept() -> None:
    tracker = backend_after([ps("search_path", "x" * 10000), rfq(b"I")])
    assert tracker.overflow and "search_path" not in tracker.parameters
    assert tracker.ready == 1 and tracker.at_boundary


def test_backend_malformed_parameter_status_marks_overflow() -> None:
    tracker = backend_after([msg(b"S", b"no-terminators"), rfq(b"I")])
    assert tracker.overflow


def test_backend_large_data_rows_are_not_copied() -> None:
    tracker = backend_after([msg(b"D", b"y" * 100_000)[:50_000]])
    assert not tracker.at_boundary
    assert tracker._body is None  # bodies of other messages are skipped, never kept


# --- frontend ------------------------------------------------------------------------------


def query(sql: str) -> bytes:
    return msg(b"Q", sql.encode() + b"\0")


EXTENDED = (
    msg(b"P", b"\0select 1\0\0\0")
    + msg(b"B", b"\0\0\0\0\0\0\0\0")
    + msg(b"E", b"\0\0\0\0\0")
    + msg(b"S")
)


def frontend_after(chunks: list[bytes]) -> tuple[FrontendTracker, int | None]:
    tracker = FrontendTracker()
    offset, cut = 0, None
    for chunk in chunks:
        found = tracker.advance(chunk)
        if found is not None and cut is None:
            cut = offset + found
        offset += len(chunk)
    return tracker, cut


@pytest.mark.parametrize(
    "stream, syncs, unsynced",
    [
        (query("select 1"), 2, False),
        (EXTENDED, 2, False),
        (EXTENDED[: -len(msg(b"S"))], 1, True),  # Parse/Bind/Execute waiting for Sync
        (query("copy t from stdin") + msg(b"d", b"1\n") + msg(b"c"), 2, False),
        (msg(b"F", b"\0\0\0\x01" + b"\0" * 8), 2, False),
        (msg(b"P", b"s\0select 1\0\0\0") + msg(b"H"), 1, True),
    ],
)
def test_frontend_counts_sync_points_in_any_split(
    stream: bytes, syncs: int, unsynced: bool
) -> None:
    for chunks in chunkings(stream):
        tracker, cut = frontend_after(chunks)
        assert (tracker.syncs, tracker.unsynced, cut) == (syncs, unsynced, None)


def test_frontend_finds_terminate_at_a_boundary_only() -> None:
    # An 'X' inside a body is data; the Terminate message's tag is found in any split.
    stream = query("select 'X'") + msg(b"d", b"XXXX") + wire.terminate()
    for chunks in chunkings(stream):
        tracker, cut = frontend_after(chunks)
        assert cut == len(stream) - 5 and tracker.terminated
        assert tracker.syncs == 2


def test_frontend_consumes_nothing_after_terminate() -> None:
    tracker = FrontendTracker()
    assert tracker.advance(wire.terminate()) == 0
    assert tracker.advance(query("select 1")) is None
    assert tracker.syncs == 1


# --- clean end -------------------------------------------------------------------------------


def tracking() -> SessionTracking:
    tracked = SessionTracking({}, lambda transport, parameters: None)
    tracked.backend.advance(GREETING)
    return tracked


def test_clean_after_greeting_and_answered_queries() -> None:
    tracked = tracking()
    assert tracked.clean()
    tracked.frontend.advance(query("select 1"))
    assert not tracked.clean()  # in flight
    tracked.backend.advance(msg(b"T", b"\0\0") + msg(b"C", b"SELECT 1\0"))
    assert not tracked.clean()
    tracked.backend.advance(rfq(b"I")[:5])
    assert not tracked.clean()  # ReadyForQuery not whole yet
    tracked.backend.advance(rfq(b"I")[5:])
    assert tracked.clean()


@pytest.mark.parametrize(
    "client, server",
    [
        (query("begin"), msg(b"C", b"BEGIN\0") + rfq(b"T")),  # transaction left open
        (query("select 1/0"), msg(b"E", b"SERROR\0\0") + rfq(b"I") + msg(b"E", b"SFATAL\0\0")),
        (query("copy t to stdout"), msg(b"H", b"\0\0\0") + msg(b"d", b"1\n")),  # mid-COPY
        (EXTENDED[: -len(msg(b"S"))], b""),  # extended query without its Sync
        (query("select 1") + query("select 2"), msg(b"C", b"SELECT 1\0") + rfq(b"I")),
    ],
)
def test_not_clean(client: bytes, server: bytes) -> None:
    tracked = tracking()
    tracked.frontend.advance(client)
    tracked.backend.advance(server)
    assert not tracked.clean()


def test_error_then_ready_for_query_idle_is_clean() -> None:
    """A failed statement outside a transaction leaves the backend as good as new."""
    tracked = tracking()
    tracked.frontend.advance(query("select 1/0"))
    tracked.backend.advance(msg(b"E", b"SERROR\0C22012\0\0") + rfq(b"I"))
    assert tracked.clean()


# --- key ---------------------------------------------------------------------------------------


def test_pool_key_ignores_application_name_only() -> None:
    base = {"user": "alice", "database": "db", "client_encoding": "UTF8"}
    key = pool_key({**base, "application_name": "a"}, read_only=False, protocol_minor=0)
    assert key == pool_key({**base, "application_name": "b"}, read_only=False, protocol_minor=0)
    assert key == pool_key(base, read_only=False, protocol_minor=0)
    assert isinstance(key, PoolKey) and (key.role, key.database) == ("alice", "db")
    for other in (
        pool_key({**base, "client_encoding": "LATIN1"}, read_only=False, protocol_minor=0),
        pool_key(base, read_only=True, protocol_minor=0),
        pool_key(base, read_only=False, protocol_minor=2),
        pool_key({**base, "database": "other"}, read_only=False, protocol_minor=0),
        pool_key({**base, "user": "bob"}, read_only=False, protocol_minor=0),
    ):
        assert other != key
    assert pool_key({**base, "replication": "true"}, read_only=False, protocol_minor=0) is None


# --- random splits: the fast path (whole headers) and the byte-wise path agree ------------


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, min(40, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


BACKEND_STREAM = (
    GREETING
    + msg(b"T", b"\0\x01a\0" + b"\0" * 18)
    + msg(b"D", b"\0\x01\0\0\0\x05hello")
    + msg(b"C", b"SELECT 1\0")
    + rfq(b"I")
    + msg(b"N", b"SNOTICE\0Mhi\0\0")
    + ps("TimeZone", "Asia/Tokyo")
    + msg(b"H", b"\0\0\0")
    + msg(b"d", b"x" * 1000)
    + msg(b"c")
    + msg(b"C", b"COPY 1\0")
    + rfq(b"T")
    + msg(b"E", b"SERROR\0\0")
    + rfq(b"E")
    + msg(b"A", b"\0\0\0\x01chan\0payload\0")
    + ps("application_name", "psql")
)


def test_backend_random_splits_agree_with_whole() -> None:
    whole = backend_after([BACKEND_STREAM])
    expected = (whole.ready, whole.status, whole.copy, whole.error, whole.errors)
    assert expected == (4, b"E", False, False, 1)
    assert whole.parameters == {
        "application_name": "psql",
        "TimeZone": "Asia/Tokyo",
    }
    rng = random.Random(15)
    for _ in range(300):
        tracker = backend_after(random_chunks(BACKEND_STREAM, rng))
        assert (tracker.ready, tracker.status, tracker.copy, tracker.error, tracker.errors) == (
            expected
        )
        assert tracker.parameters == whole.parameters and tracker.at_boundary
        # Stopping at boundaries (EndableHalf) gives MessageBoundaries' offsets.
        ours, theirs = BackendTracker(), MessageBoundaries()
        for chunk in random_chunks(BACKEND_STREAM, rng):
            assert ours.advance(chunk, stop_at_boundary=True) == theirs.advance(
                chunk, stop_at_boundary=True
            )


def test_frontend_random_splits_agree_with_whole() -> None:
    stream = query("select 1") + EXTENDED + msg(b"d", b"X" * 500) + EXTENDED[:-5]
    stream += wire.terminate()
    rng = random.Random(15)
    for _ in range(300):
        tracker, cut = frontend_after(random_chunks(stream, rng))
        assert (tracker.syncs, tracker.unsynced, cut) == (3, True, len(stream) - 5)


def test_backend_length_word_under_four_is_never_reused() -> None:
    """Not something PostgreSQL sends: the connection is marked, whatever the split."""
    stream = rfq(b"I") + b"D\0\0\0\x02" + rfq(b"I")
    for chunks in chunkings(stream):
        assert backend_after(chunks).overflow
