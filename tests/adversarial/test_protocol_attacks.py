"""Protocol attacks on the client-facing handshake, sans-IO (frontend.FrontendHandshake).

The same attacks run end to end against the daemon in tests/integration/test_attacks.py;
here every variant is cheap, so the matrix is wider: every DOWNSTREAM__SSLMODE, every split.
References: PostgreSQL ProcessStartupPacket() (src/backend/tcop/backend_startup.c),
CVE-2021-23214, protocol 55.2.1 / 55.7.
"""

from __future__ import annotations

import struct

import pytest

from jwtpgproxy.errors import ClientDisconnected, ProxyError
from jwtpgproxy.protocol import frontend, wire

Mode = frontend.DownstreamSSLMode
GSSENC = struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE)


def run(machine: frontend.FrontendHandshake, data: bytes) -> list[object]:
    events: list[object] = []
    machine.receive_data(data)
    while machine.state in (frontend.State.AWAIT_INITIAL, frontend.State.AWAIT_PASSWORD):
        event = machine.next_event()
        if isinstance(event, frontend.NeedData):
            break
        events.append(event)
        if isinstance(event, frontend.StartTLS):
            machine.tls_established()
    return events


def refused(mode: Mode, data: bytes, *, tls_first: bool = False) -> ProxyError:
    machine = frontend.FrontendHandshake(mode, max_password_length=1024)
    if tls_first:
        run(machine, wire.ssl_request())
    with pytest.raises(ProxyError) as info:
        run(machine, data)
    assert machine.state is frontend.State.FAILED
    return info.value


@pytest.mark.parametrize("mode", [Mode.REQUIRE, Mode.ALLOW])
@pytest.mark.parametrize("size", [1, 3, 4, 7, 8, 9, 100, 5000, 20000])
def test_injection_after_ssl_request(mode: Mode, size: int) -> None:
    """CVE-2021-23214: any byte after the SSLRequest in the same read -> 08P01, no 'S'."""
    injected = (wire.startup_message({"user": "x"}) * 1000)[:size]
    assert refused(mode, wire.ssl_request() + injected).sqlstate == "08P01"


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("length", [0, 1, 4, 7, 10001, 2**31 - 1, -1, -(2**31)])
def test_bad_startup_lengths(mode: Mode, length: int) -> None:
    """ProcessStartupPacket: 8 <= length <= 10000, judged from the length word alone."""
    assert refused(mode, struct.pack("!i", length)).sqlstate == "08P01"


@pytest.mark.parametrize("mode", list(Mode))
def test_second_ssl_request_over_tls_and_second_gssenc(mode: Mode) -> None:
    if mode is not Mode.DISABLE:
        assert refused(mode, wire.ssl_request(), tls_first=True).sqlstate == "08P01"
    assert refused(mode, GSSENC + GSSENC).sqlstate == "08P01"


def test_ssl_requests_in_disable_mode_are_bounded_by_the_timeout_only() -> None:
    """With TLS disabled, each SSLRequest is answered 'N' (PostgreSQL does the same only
    once; a client sending more is merely wasting its authentication_timeout)."""
    machine = frontend.FrontendHandshake(Mode.DISABLE)
    events = run(machine, wire.ssl_request() * 100)
    assert events == [frontend.Reply(b"N")] * 100


@pytest.mark.parametrize(
    ("params", "sqlstate"),
    [
        ({"database": "x"}, "28000"),  # no user
        ({"user": ""}, "28000"),
        ({"user": "u", "replication": "database"}, "28000"),
        ({"user": "u", "replication": "true"}, "28000"),
        ({"user": "u", "replication": "on"}, "28000"),
        ({"user": "u", "replication": "1"}, "28000"),
        ({"user": "u", "replication": " off"}, "28000"),  # anything but plain off: refused
    ],
)
def test_startup_refusals(params: dict[str, str], sqlstate: str) -> None:
    data = wire.startup_message(params)
    assert refused(Mode.REQUIRE, data, tls_first=True).sqlstate == sqlstate


@pytest.mark.parametrize("value", ["off", "false", "no", "0", "OFF", "False"])
def test_replication_off_is_fine(value: str) -> None:
    machine = frontend.FrontendHandshake(Mode.DISABLE)
    events = run(machine, wire.startup_message({"user": "u", "replication": value}))
    assert isinstance(events[-1], frontend.PasswordRequested)


@pytest.mark.parametrize(
    "body",
    [
        b"user\0u\0user\0postgres\0\0",  # duplicate user
        b"user\0u\0\0database\0d\0\0",  # empty name mid-list
        b"user\0u\0database",  # unterminated
        b"user\0\xff\xfe\0\0",  # not UTF-8
        b"user\0u",  # no NUL at all
        b"",  # nothing after the version
    ],
)
def test_malformed_startup_layout(body: bytes) -> None:
    packet = struct.pack("!I", wire.PROTOCOL_3_0) + body
    data = struct.pack("!i", len(packet) + 4) + packet
    error = refused(Mode.DISABLE, data)
    assert error.sqlstate in ("08P01", "28000")


@pytest.mark.parametrize("major", [0, 1, 2, 4, 1234, 0xFFFF])
def test_other_protocol_majors(major: int) -> None:
    data = wire.startup_message({"user": "u"}, version=major << 16)
    assert refused(Mode.DISABLE, data).sqlstate == "0A000"


@pytest.mark.parametrize("tag", [b"Q", b"E", b"S", b"\0", b"\xff", b"P", b"d"])
def test_wrong_message_instead_of_password(tag: bytes) -> None:
    data = wire.startup_message({"user": "u"}) + wire.typed_message(tag, b"x\0")
    assert refused(Mode.DISABLE, data).sqlstate == "08P01"


def test_terminate_instead_of_password_is_a_quiet_disconnect() -> None:
    machine = frontend.FrontendHandshake(Mode.DISABLE)
    with pytest.raises(ClientDisconnected):
        run(machine, wire.startup_message({"user": "u"}) + wire.terminate())


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        (1025 + 4, b""),  # one over the cap: refused on the header
        (2**31 - 1, b""),
        (3, b""),  # below the length word itself
        (4, b""),  # empty body: no NUL
        (6, b"ab"),  # no NUL
        (7, b"a\0b"),  # NUL not last
    ],
)
def test_password_length_lies(declared: int, sent: bytes) -> None:
    data = wire.startup_message({"user": "u"}) + b"p" + struct.pack("!i", declared) + sent
    assert refused(Mode.DISABLE, data).sqlstate == "08P01"


def test_password_claims_more_than_sent_waits() -> None:
    """A length word that claims more than has arrived (within the cap): keep waiting (the
    authentication timeout bounds it), nothing is decoded early."""
    machine = frontend.FrontendHandshake(Mode.DISABLE, max_password_length=1024)
    run(machine, wire.startup_message({"user": "u"}))
    assert run(machine, b"p" + struct.pack("!i", 1000) + b"eyJ") == []
    assert machine.state is frontend.State.AWAIT_PASSWORD


def test_password_claims_less_leaves_the_rest_as_leftover() -> None:
    machine = frontend.FrontendHandshake(Mode.DISABLE)
    events = run(
        machine, wire.startup_message({"user": "u"}) + b"p" + struct.pack("!i", 8) + b"abc\0rest"
    )
    assert isinstance(events[-1], frontend.PasswordReceived)
    assert events[-1].password == "abc"
    assert machine.leftover() == b"rest"


def test_thousands_of_one_byte_packets() -> None:
    """A 9 000-byte startup packet and a password fed one byte at a time."""
    data = wire.startup_message({"user": "u", "application_name": "p" * 9000})
    data += wire.password_message(b"t" * 1000)
    machine = frontend.FrontendHandshake(Mode.DISABLE)
    events: list[object] = []
    for i in range(len(data)):
        events += run(machine, data[i : i + 1])
    assert [type(e) for e in events] == [frontend.PasswordRequested, frontend.PasswordReceived]
