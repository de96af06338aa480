"""FrontendHandshake: the client-facing handshake state machine, fed hand-made bytes.

Flows follow PostgreSQL's ProcessStartupPacket() and the protocol docs, 55.2 "Message Flow"
(55.2.10 "SSL Session Encryption", 55.2.11 "GSSAPI Session Encryption") and 55.7
"Message Formats".
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.errors import (
    ClientDisconnected,
    ClientError,
    EncryptionRequired,
    FeatureNotSupported,
    InvalidAuthorization,
    ProtocolViolation,
)
from jwtpgproxy.protocol import wire
from jwtpgproxy.protocol.frontend import (
    CancelReceived,
    DownstreamSSLMode,
    FrontendHandshake,
    NeedData,
    PasswordReceived,
    PasswordRequested,
    Reply,
    StartTLS,
    State,
)

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
# 55.7 AuthenticationCleartextPassword: Byte1('R'), Int32(8), Int32(3).
AUTH_CLEARTEXT = b"R\x00\x00\x00\x08\x00\x00\x00\x03"
STARTUP = b"\x00\x00\x00\x20\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00"
PASSWORD = b"p\x00\x00\x00\x0bhunter\x00"

ALL_MODES = list(DownstreamSSLMode)


def startup(params: dict[str, str], version: int = wire.PROTOCOL_3_0) -> bytes:
    return wire.startup_message(params, version)


def handshake(
    mode: DownstreamSSLMode = DownstreamSSLMode.REQUIRE, **kw: object
) -> FrontendHandshake:
    return FrontendHandshake(mode, **kw)  # type: ignore[arg-type]


def over_tls(
    mode: DownstreamSSLMode = DownstreamSSLMode.REQUIRE, **kw: object
) -> FrontendHandshake:
    """A handshake that has completed SSLRequest -> 'S' -> TLS."""
    hs = handshake(mode, **kw)
    hs.receive_data(SSL_REQUEST)
    assert hs.next_event() == StartTLS(b"S")
    hs.tls_established()
    return hs


def test_startup_constant_matches_encoder() -> None:
    assert startup({"user": "alice", "database": "db"}) == STARTUP


def test_password_constant_matches_encoder() -> None:
    assert wire.password_message(b"hunter") == PASSWORD


def test_tls_client_hello_as_first_bytes_refused_at_once() -> None:
    # A direct-TLS ClientHello (sslnegotiation=direct) read as a startup packet claims a
    # length of ~370 MB: the handshake must refuse it from the first 4 bytes, not wait.
    hs = handshake(DownstreamSSLMode.ALLOW)
    hs.receive_data(b"\x16\x03\x01\x02")
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


def test_initial_state() -> None:
    hs = handshake()
    assert hs.state is State.AWAIT_INITIAL
    assert hs.tls is False
    assert hs.next_event() == NeedData()


# --- SSLRequest ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [DownstreamSSLMode.REQUIRE, DownstreamSSLMode.ALLOW])
def test_ssl_request_starts_tls(mode: DownstreamSSLMode) -> None:
    hs = handshake(mode)
    hs.receive_data(SSL_REQUEST)
    event = hs.next_event()
    assert event == StartTLS()
    assert isinstance(event, StartTLS) and event.data == b"S"
    assert hs.state is State.TLS_PENDING
    hs.tls_established()
    assert hs.tls is True
    assert hs.state is State.AWAIT_INITIAL
    assert hs.next_event() == NeedData()


def test_ssl_request_refused_when_disabled() -> None:
    hs = handshake(DownstreamSSLMode.DISABLE)
    hs.receive_data(SSL_REQUEST)
    assert hs.next_event() == Reply(b"N")
    assert hs.state is State.AWAIT_INITIAL
    assert hs.tls is False
    hs.receive_data(STARTUP)
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.data == AUTH_CLEARTEXT


def test_ssl_request_disabled_then_startup_in_same_feed() -> None:
    # No TLS begins after 'N', so pipelined bytes are fine (libpq does not do it, but they
    # are not an injection risk).
    hs = handshake(DownstreamSSLMode.DISABLE)
    hs.receive_data(SSL_REQUEST + STARTUP)
    assert hs.next_event() == Reply(b"N")
    assert isinstance(hs.next_event(), PasswordRequested)


@pytest.mark.parametrize("mode", [DownstreamSSLMode.REQUIRE, DownstreamSSLMode.ALLOW])
@pytest.mark.parametrize("extra", [b"\x00", STARTUP, b"\x16\x03\x01\x00\x05"])
def test_cve_2021_23214_bytes_after_ssl_request(mode: DownstreamSSLMode, extra: bytes) -> None:
    hs = handshake(mode)
    hs.receive_data(SSL_REQUEST + extra)
    with pytest.raises(ProtocolViolation) as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"
    assert "unencrypted data after SSL request" in info.value.reason
    assert hs.state is State.FAILED


def test_ssl_request_split_across_feeds_is_fine() -> None:
    hs = handshake()
    hs.receive_data(SSL_REQUEST[:3])
    assert hs.next_event() == NeedData()
    hs.receive_data(SSL_REQUEST[3:])
    assert hs.next_event() == StartTLS()


def test_ssl_request_after_tls_is_violation() -> None:
    hs = over_tls()
    hs.receive_data(SSL_REQUEST)
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


def test_tls_established_outside_tls_pending() -> None:
    hs = handshake()
    with pytest.raises(RuntimeError):
        hs.tls_established()


# --- GSSENCRequest ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_gssenc_answered_n(mode: DownstreamSSLMode) -> None:
    hs = handshake(mode)
    hs.receive_data(GSSENC_REQUEST)
    assert hs.next_event() == Reply(b"N")
    assert hs.state is State.AWAIT_INITIAL


def test_gssenc_then_ssl_then_startup() -> None:
    # libpq with gssencmode=prefer sends GSSENCRequest first, then SSLRequest after 'N'.
    hs = handshake(DownstreamSSLMode.REQUIRE)
    hs.receive_data(GSSENC_REQUEST)
    assert hs.next_event() == Reply(b"N")
    hs.receive_data(SSL_REQUEST)
    assert hs.next_event() == StartTLS()
    hs.tls_established()
    hs.receive_data(STARTUP)
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.data == AUTH_CLEARTEXT


def test_second_gssenc_is_violation() -> None:
    hs = handshake(DownstreamSSLMode.ALLOW)
    hs.receive_data(GSSENC_REQUEST + GSSENC_REQUEST)
    assert hs.next_event() == Reply(b"N")
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


def test_gssenc_after_tls_is_violation() -> None:
    hs = over_tls()
    hs.receive_data(GSSENC_REQUEST)
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


# --- StartupMessage -----------------------------------------------------------------------


def test_plaintext_startup_refused_under_require() -> None:
    hs = handshake(DownstreamSSLMode.REQUIRE)
    hs.receive_data(STARTUP + PASSWORD)
    events = []
    with pytest.raises(EncryptionRequired) as info:
        while True:
            events.append(hs.next_event())
    assert info.value.sqlstate == "28000"
    assert info.value.client_fields()["C"] == "28000"
    # Nothing that asks for a password (or carries an auth request) was produced.
    assert events == []
    assert hs.state is State.FAILED


def test_plaintext_startup_refused_after_gss_n_under_require() -> None:
    hs = handshake(DownstreamSSLMode.REQUIRE)
    hs.receive_data(GSSENC_REQUEST + STARTUP)
    assert hs.next_event() == Reply(b"N")
    with pytest.raises(EncryptionRequired):
        hs.next_event()


@pytest.mark.parametrize("mode", [DownstreamSSLMode.ALLOW, DownstreamSSLMode.DISABLE])
def test_plaintext_startup_accepted(mode: DownstreamSSLMode) -> None:
    hs = handshake(mode)
    hs.receive_data(STARTUP)
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.data == AUTH_CLEARTEXT
    assert hs.tls is False


@pytest.mark.parametrize("mode", [DownstreamSSLMode.REQUIRE, DownstreamSSLMode.ALLOW])
def test_full_tls_flow(mode: DownstreamSSLMode) -> None:
    hs = over_tls(mode)
    hs.receive_data(STARTUP)
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.data == AUTH_CLEARTEXT
    assert event.startup.user == "alice"
    assert event.startup.database == "db"
    assert hs.state is State.AWAIT_PASSWORD
    assert hs.next_event() == NeedData()
    hs.receive_data(PASSWORD)
    received = hs.next_event()
    assert isinstance(received, PasswordReceived)
    assert received.password == "hunter"
    assert received.startup is event.startup
    assert "hunter" not in repr(received)
    assert hs.state is State.DONE
    assert hs.leftover() == b""


def test_startup_fed_byte_by_byte() -> None:
    hs = over_tls()
    for byte in STARTUP:
        assert hs.next_event() == NeedData()
        hs.receive_data(bytes([byte]))
    assert isinstance(hs.next_event(), PasswordRequested)
    for byte in PASSWORD:
        assert hs.next_event() == NeedData()
        hs.receive_data(bytes([byte]))
    event = hs.next_event()
    assert isinstance(event, PasswordReceived) and event.password == "hunter"


def test_minor_version_32_is_spoken_without_negotiation() -> None:
    """3.2 (PostgreSQL 18) is supported: no NegotiateProtocolVersion, straight to auth."""
    hs = over_tls()
    hs.receive_data(startup({"user": "alice"}, version=(3 << 16) | 2))
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.data == AUTH_CLEARTEXT
    assert (event.startup.major, event.startup.minor) == (3, 2)
    assert hs.protocol_minor == 2


def test_minor_version_above_32_gets_negotiate_protocol_version() -> None:
    hs = over_tls()
    hs.receive_data(startup({"user": "alice"}, version=(3 << 16) | 9))
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    # NegotiateProtocolVersion: 'v', Int32(12), Int32 0x00030002 (3.2), Int32 0 options.
    npv = b"v\x00\x00\x00\x0c\x00\x03\x00\x02\x00\x00\x00\x00"
    assert event.data == npv + AUTH_CLEARTEXT
    assert hs.protocol_minor == 2


def test_direct_tls_handshake_starts_encrypted() -> None:
    """sslnegotiation=direct: TLS is up before the first packet, so a plaintext-refusing
    mode accepts the startup, and an SSLRequest inside TLS is a violation."""
    hs = handshake(DownstreamSSLMode.REQUIRE, direct_tls=True)
    hs.receive_data(STARTUP)
    assert isinstance(hs.next_event(), PasswordRequested)
    hs = handshake(DownstreamSSLMode.REQUIRE, direct_tls=True)
    hs.receive_data(SSL_REQUEST)
    with pytest.raises(ProtocolViolation):
        hs.next_event()


def test_pq_options_get_negotiate_protocol_version() -> None:
    hs = over_tls()
    hs.receive_data(startup({"user": "alice", "_pq_.x": "1", "_pq_.yz": "2"}))
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    npv = b"v\x00\x00\x00\x1b\x00\x03\x00\x00\x00\x00\x00\x02_pq_.x\x00_pq_.yz\x00"
    assert event.data.startswith(npv)
    assert event.data == npv + AUTH_CLEARTEXT
    assert event.startup.parameters == {"user": "alice"}


@pytest.mark.parametrize("major", [2, 4, 1, 0])
def test_unsupported_major_version(major: int) -> None:
    hs = handshake(DownstreamSSLMode.ALLOW)
    hs.receive_data(startup({"user": "alice"}, version=major << 16))
    with pytest.raises(FeatureNotSupported) as info:
        hs.next_event()
    assert info.value.sqlstate == "0A000"
    assert f"unsupported frontend protocol {major}.0" in info.value.client_message
    assert hs.state is State.FAILED


def test_unsupported_major_checked_before_encryption() -> None:
    hs = handshake(DownstreamSSLMode.REQUIRE)
    hs.receive_data(startup({"user": "alice"}, version=4 << 16))
    with pytest.raises(FeatureNotSupported):
        hs.next_event()


def test_real_protocol_2_startup_packet_gets_feature_not_supported() -> None:
    # A protocol 2.0 StartupPacket is fixed-size: Int32(296), Int32(0x00020000), then
    # LimString64 database, LimString32 user, LimString64 options, 64 unused, 64 tty.
    body = (
        struct.pack("!I", 2 << 16)
        + b"db".ljust(64, b"\0")
        + b"alice".ljust(32, b"\0")
        + b"\0" * 64 * 3
    )
    packet = struct.pack("!i", len(body) + 4) + body
    assert len(packet) == 296
    hs = handshake(DownstreamSSLMode.ALLOW)
    hs.receive_data(packet)
    with pytest.raises(FeatureNotSupported):  # PostgreSQL: FATAL 0A000
        hs.next_event()


@pytest.mark.parametrize("params", [{}, {"database": "db"}, {"user": ""}])
def test_missing_user(params: dict[str, str]) -> None:
    hs = over_tls()
    hs.receive_data(startup(params))
    with pytest.raises(InvalidAuthorization) as info:
        hs.next_event()
    assert info.value.sqlstate == "28000"
    assert "user name" in info.value.client_message
    assert hs.state is State.FAILED


@pytest.mark.parametrize("value", ["true", "database", "on", "yes", "1", "TRUE"])
def test_replication_refused(value: str) -> None:
    hs = over_tls()
    hs.receive_data(startup({"user": "alice", "replication": value}))
    with pytest.raises(InvalidAuthorization) as info:
        hs.next_event()
    assert info.value.sqlstate == "28000"
    assert "replication" in info.value.client_message
    assert hs.state is State.FAILED


@pytest.mark.parametrize("value", ["false", "off", "no", "0", "FALSE", "Off"])
def test_replication_off_accepted(value: str) -> None:
    hs = over_tls()
    hs.receive_data(startup({"user": "alice", "replication": value}))
    event = hs.next_event()
    assert isinstance(event, PasswordRequested)
    assert event.startup.parameters["replication"] == value


@pytest.mark.parametrize("value", ["true", "database"])
def test_replication_allowed_when_configured(value: str) -> None:
    hs = over_tls(allow_replication=True)
    hs.receive_data(startup({"user": "alice", "replication": value}))
    assert isinstance(hs.next_event(), PasswordRequested)


def test_duplicate_startup_parameter_is_violation() -> None:
    hs = over_tls()
    hs.receive_data(b"\x00\x00\x00\x17\x00\x03\x00\x00user\x00a\x00user\x00b\x00\x00")
    with pytest.raises(ProtocolViolation, match="duplicate"):
        hs.next_event()


def test_startup_packet_over_10000_bytes_refused() -> None:
    hs = over_tls()
    hs.receive_data(struct.pack("!i", 10001))  # only the length word
    with pytest.raises(ProtocolViolation) as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"
    assert hs.state is State.FAILED


def test_startup_packet_of_exactly_10000_bytes_accepted() -> None:
    filler = "x" * (10000 - len(startup({"user": "alice", "application_name": ""})))
    packet = startup({"user": "alice", "application_name": filler})
    assert len(packet) == 10000
    hs = over_tls()
    hs.receive_data(packet)
    assert isinstance(hs.next_event(), PasswordRequested)


@pytest.mark.parametrize("length", [0, 4, 7, -1])
def test_startup_packet_length_below_8(length: int) -> None:
    hs = handshake()
    hs.receive_data(struct.pack("!i", length))
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


# --- CancelRequest ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
def test_cancel_request(mode: DownstreamSSLMode) -> None:
    hs = handshake(mode)
    hs.receive_data(b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\x01\x02\x03\x04")
    event = hs.next_event()
    assert event == CancelReceived(wire.CancelRequest(12345, b"\x01\x02\x03\x04"))
    assert hs.state is State.CANCEL
    with pytest.raises(RuntimeError):
        hs.next_event()


def test_cancel_request_wrong_length() -> None:
    hs = handshake()
    hs.receive_data(b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x30\x39")
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


# --- PasswordMessage ----------------------------------------------------------------------


def test_password_pipelined_with_startup() -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + PASSWORD)
    assert isinstance(hs.next_event(), PasswordRequested)
    event = hs.next_event()
    assert isinstance(event, PasswordReceived) and event.password == "hunter"


def test_leftover_after_password() -> None:
    query = b"Q\x00\x00\x00\x0dselect 1\x00"
    hs = over_tls()
    hs.receive_data(STARTUP + PASSWORD + query[:4])
    assert isinstance(hs.next_event(), PasswordRequested)
    assert isinstance(hs.next_event(), PasswordReceived)
    hs.receive_data(query[4:])
    assert hs.leftover() == query
    assert hs.leftover() == b""


def test_leftover_before_done_is_an_error() -> None:
    hs = over_tls()
    with pytest.raises(RuntimeError):
        hs.leftover()


def test_password_over_cap_refused_before_body() -> None:
    hs = over_tls(max_password_length=100)
    hs.receive_data(STARTUP)
    assert isinstance(hs.next_event(), PasswordRequested)
    hs.receive_data(b"p" + struct.pack("!i", 4 + 101))  # header only
    with pytest.raises(ProtocolViolation) as info:
        hs.next_event()
    assert info.value.sqlstate == "08P01"
    assert hs.state is State.FAILED


def test_password_huge_claim_refused_with_default_cap() -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + b"p" + struct.pack("!i", 1 << 30))
    assert isinstance(hs.next_event(), PasswordRequested)
    with pytest.raises(ProtocolViolation):
        hs.next_event()


def test_password_at_cap_accepted() -> None:
    hs = over_tls(max_password_length=100)
    hs.receive_data(STARTUP + wire.password_message(b"t" * 99))
    assert isinstance(hs.next_event(), PasswordRequested)
    event = hs.next_event()
    assert isinstance(event, PasswordReceived) and event.password == "t" * 99


def test_terminate_instead_of_password() -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + b"X\x00\x00\x00\x04")
    assert isinstance(hs.next_event(), PasswordRequested)
    with pytest.raises(ClientDisconnected):
        hs.next_event()
    assert hs.state is State.FAILED


@pytest.mark.parametrize("tag", [b"Q", b"P", b"\x00", b"E"])
def test_wrong_tag_instead_of_password(tag: bytes) -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + tag + b"\x00\x00\x00\x05\x00")
    assert isinstance(hs.next_event(), PasswordRequested)
    with pytest.raises(ProtocolViolation, match="expected password response"):
        hs.next_event()
    assert hs.state is State.FAILED


@pytest.mark.parametrize("body", [b"abc", b"a\x00b\x00", b"\xff\x00"])
def test_malformed_password_message(body: bytes) -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + wire.typed_message(b"p", body))
    assert isinstance(hs.next_event(), PasswordRequested)
    with pytest.raises(ProtocolViolation):
        hs.next_event()
    assert hs.state is State.FAILED


def test_utf8_password() -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + wire.password_message("pässwörd".encode()))
    hs.next_event()
    event = hs.next_event()
    assert isinstance(event, PasswordReceived) and event.password == "pässwörd"


def test_next_event_after_done_or_failed() -> None:
    hs = over_tls()
    hs.receive_data(STARTUP + PASSWORD)
    hs.next_event()
    hs.next_event()
    with pytest.raises(RuntimeError):
        hs.next_event()
    failed = handshake()
    failed.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolViolation):
        failed.next_event()
    with pytest.raises(RuntimeError):
        failed.next_event()


# --- Fuzz -----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    mode=st.sampled_from(ALL_MODES),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([SSL_REQUEST, GSSENC_REQUEST, STARTUP, PASSWORD]),
        ),
        max_size=6,
    ),
)
def test_fuzz_only_client_errors(mode: DownstreamSSLMode, chunks: list[bytes]) -> None:
    hs = handshake(mode)
    for chunk in chunks:
        hs.receive_data(chunk)
        try:
            for _ in range(10):
                event = hs.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, StartTLS):
                    hs.tls_established()
                elif isinstance(event, PasswordReceived | CancelReceived):
                    return
                elif isinstance(event, PasswordRequested):
                    assert event.data.endswith(AUTH_CLEARTEXT)
                    if mode is DownstreamSSLMode.REQUIRE:
                        assert hs.tls
        except ClientError:
            assert hs.state is State.FAILED
            return


@pytest.mark.parametrize("field", ["user", "database"])
def test_names_postgresql_would_truncate_are_refused(field: str) -> None:
    """NAMEDATALEN: PostgreSQL truncates user and database names to 63 bytes, so a token
    checked against the full name would open a different role or database."""
    params = {"user": "alice", "database": "db"}
    params[field] = "é" * 32  # 64 bytes in UTF-8, 32 characters
    hs = over_tls()
    hs.receive_data(startup(params))
    with pytest.raises(InvalidAuthorization) as info:
        hs.next_event()
    assert info.value.sqlstate == "28000"
    params[field] = "a" * 63  # exactly the limit is fine
    hs = over_tls()
    hs.receive_data(startup(params))
    assert isinstance(hs.next_event(), PasswordRequested)
