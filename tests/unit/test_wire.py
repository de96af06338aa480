"""Byte-level tests of jwtpgproxy.protocol.wire (framing, encoders, decoders).

Expected bytes are written by hand from the PostgreSQL documentation, chapter 55
"Frontend/Backend Protocol", section 55.7 "Message Formats" and 55.8 "Error and Notice
Message Fields" -- never computed with the encoder under test.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.protocol import wire

# 55.7: SSLRequest code 80877103 = 0x04D2162F, GSSENCRequest 80877104 = 0x04D21630,
# CancelRequest 80877102 = 0x04D2162E, protocol 3.0 = 196608 = 0x00030000.
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
CANCEL_CODE = b"\x04\xd2\x16\x2e"


def test_protocol_constants() -> None:
    assert wire.PROTOCOL_3_0 == 196608
    assert wire.SSL_REQUEST_CODE == 80877103
    assert wire.GSSENC_REQUEST_CODE == 80877104
    assert wire.CANCEL_REQUEST_CODE == 80877102
    assert wire.MAX_STARTUP_PACKET_LENGTH == 10000


# --- Encoders ---------------------------------------------------------------------------


def test_typed_message() -> None:
    # Byte1 tag, Int32 length counting itself but not the tag, body.
    assert wire.typed_message(b"Z", b"I") == b"Z\x00\x00\x00\x05I"
    assert wire.typed_message(b"X") == b"X\x00\x00\x00\x04"


def test_terminate() -> None:
    # 55.7 Terminate: Byte1('X'), Int32(4).
    assert wire.terminate() == b"X\x00\x00\x00\x04"


def test_startup_message_bytes() -> None:
    # 55.7 StartupMessage: Int32 length, Int32(196608), name/value cstrings, final NUL.
    expected = (
        b"\x00\x00\x00\x20"  # 4 + 4 + 24
        b"\x00\x03\x00\x00"
        b"user\x00alice\x00database\x00db\x00\x00"
    )
    assert wire.startup_message({"user": "alice", "database": "db"}) == expected


def test_startup_message_other_version_and_empty() -> None:
    assert wire.startup_message({}, version=(3 << 16) | 2) == (
        b"\x00\x00\x00\x09\x00\x03\x00\x02\x00"
    )


def test_startup_message_utf8_and_nul_refused() -> None:
    assert wire.startup_message({"user": "é"}) == (
        b"\x00\x00\x00\x11\x00\x03\x00\x00user\x00\xc3\xa9\x00\x00"
    )
    with pytest.raises(ValueError, match="NUL"):
        wire.startup_message({"user": "a\0b"})
    with pytest.raises(ValueError, match="NUL"):
        wire.startup_message({"us\0er": "a"})


def test_ssl_request() -> None:
    assert wire.ssl_request() == SSL_REQUEST


def test_cancel_request_v30() -> None:
    # 55.7 CancelRequest: Int32(16), Int32(80877102), Int32 pid, Int32 secret key.
    assert wire.cancel_request(1234, b"\x01\x02\x03\x04") == (
        b"\x00\x00\x00\x10" + CANCEL_CODE + b"\x00\x00\x04\xd2\x01\x02\x03\x04"
    )


def test_cancel_request_long_key() -> None:
    key = bytes(range(32))
    assert (
        wire.cancel_request(7, key) == b"\x00\x00\x00\x2c" + CANCEL_CODE + b"\x00\x00\x00\x07" + key
    )


def test_password_message() -> None:
    # 55.7 PasswordMessage: Byte1('p'), Int32 length, String password.
    assert wire.password_message(b"secret") == b"p\x00\x00\x00\x0bsecret\x00"
    assert wire.password_message(b"") == b"p\x00\x00\x00\x05\x00"


def test_sasl_initial_response() -> None:
    # 55.7 SASLInitialResponse: 'p', Int32 len, String mechanism, Int32 data length, data.
    data = b"n,,n=,r=abc"
    assert wire.sasl_initial_response("SCRAM-SHA-256", data) == (
        b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0b" + data
    )


def test_sasl_response() -> None:
    assert wire.sasl_response(b"c=biws") == b"p\x00\x00\x00\x0ac=biws"


def test_authentication_messages() -> None:
    # 55.7 AuthenticationOk: Byte1('R'), Int32(8), Int32(0).
    assert wire.authentication(wire.AUTH_OK) == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    # AuthenticationCleartextPassword: Byte1('R'), Int32(8), Int32(3).
    assert wire.authentication_cleartext_password() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    # AuthenticationMD5Password: Byte1('R'), Int32(12), Int32(5), Byte4 salt.
    assert wire.authentication(wire.AUTH_MD5_PASSWORD, b"abcd") == (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"
    )


def test_auth_codes() -> None:
    assert (wire.AUTH_OK, wire.AUTH_CLEARTEXT_PASSWORD, wire.AUTH_MD5_PASSWORD) == (0, 3, 5)
    assert (wire.AUTH_GSS, wire.AUTH_SSPI) == (7, 9)
    assert (wire.AUTH_SASL, wire.AUTH_SASL_CONTINUE, wire.AUTH_SASL_FINAL) == (10, 11, 12)


def test_negotiate_protocol_version() -> None:
    # 55.7 NegotiateProtocolVersion: 'v', Int32 len, Int32 version, Int32 count, names. The
    # version is the whole ProtocolVersion as PostgreSQL sends it (FrontendProtocol): 3.0 is
    # 0x00030000, 3.2 is 0x00030002 -- not the bare minor the docs describe.
    assert wire.negotiate_protocol_version(0, []) == (
        b"v\x00\x00\x00\x0c\x00\x03\x00\x00\x00\x00\x00\x00"
    )
    assert wire.negotiate_protocol_version(2, ["_pq_.a", "_pq_.bb"]) == (
        b"v\x00\x00\x00\x1b\x00\x03\x00\x02\x00\x00\x00\x02_pq_.a\x00_pq_.bb\x00"
    )


def test_decode_negotiate_protocol_version() -> None:
    body = b"\x00\x03\x00\x00\x00\x00\x00\x01_pq_.a\x00"
    assert wire.decode_negotiate_protocol_version(body) == (3, 0, ["_pq_.a"])
    assert wire.decode_negotiate_protocol_version(b"\x00\x03\x00\x02\x00\x00\x00\x00") == (
        3,
        2,
        [],
    )
    for bad in (b"\x00\x03", b"\x00\x03\x00\x00\x00\x00\x00\x02_pq_.a\x00", b"\x00" * 8 + b"x"):
        with pytest.raises(wire.WireError):
            wire.decode_negotiate_protocol_version(bad)


def test_backend_key_data() -> None:
    # 55.7 BackendKeyData: 'K', Int32(12), Int32 pid, Int32 secret.
    assert wire.backend_key_data(42, b"abcd") == b"K\x00\x00\x00\x0c\x00\x00\x00\x2aabcd"


def test_error_response() -> None:
    # 55.7 ErrorResponse: 'E', Int32 len, (Byte1 code, String value)*, Byte1(0).
    data = wire.error_response({"S": "FATAL", "C": "28P01", "M": "x"})
    assert data == b"E\x00\x00\x00\x16SFATAL\x00C28P01\x00Mx\x00\x00"


def test_error_response_drops_nul_bytes() -> None:
    data = wire.error_response({"M": "a\0b\0"})
    assert data == b"E\x00\x00\x00\x09Mab\x00\x00"
    assert wire.decode_fields(data[5:]) == {"M": "ab"}


def test_backend_message_encode() -> None:
    assert wire.BackendMessage(b"S", b"a\0b\0").encode() == b"S\x00\x00\x00\x08a\x00b\x00"


# --- MessageBuffer: untyped ---------------------------------------------------------------


STARTUP = wire.startup_message({"user": "alice", "database": "db", "application_name": "t"})


def test_read_untyped_whole() -> None:
    buf = wire.MessageBuffer()
    buf.feed(STARTUP + b"rest")
    assert buf.read_untyped(10000) == STARTUP[4:]
    assert len(buf) == 4
    assert buf.take_all() == b"rest"
    assert len(buf) == 0


def test_read_untyped_byte_by_byte() -> None:
    buf = wire.MessageBuffer()
    for i, byte in enumerate(STARTUP):
        assert buf.read_untyped(10000) is None, i
        buf.feed(bytes([byte]))
    assert buf.read_untyped(10000) == STARTUP[4:]
    assert len(buf) == 0
    assert buf.read_untyped(10000) is None


@pytest.mark.parametrize("split", range(len(STARTUP) + 1))
def test_read_untyped_every_split(split: int) -> None:
    buf = wire.MessageBuffer()
    buf.feed(STARTUP[:split])
    first = buf.read_untyped(10000)
    buf.feed(STARTUP[split:])
    second = buf.read_untyped(10000) if first is None else None
    assert (first or second) == STARTUP[4:]
    assert first is None or split == len(STARTUP)


def test_read_untyped_two_in_one_feed() -> None:
    buf = wire.MessageBuffer()
    buf.feed(SSL_REQUEST + STARTUP)
    assert buf.read_untyped(10000) == SSL_REQUEST[4:]
    assert buf.read_untyped(10000) == STARTUP[4:]
    assert buf.read_untyped(10000) is None


@pytest.mark.parametrize("length", [-1, 0, 4, 7, -(2**31)])
def test_read_untyped_length_below_8(length: int) -> None:
    buf = wire.MessageBuffer()
    buf.feed(struct.pack("!i", length))
    with pytest.raises(wire.WireError, match="invalid length of startup packet"):
        buf.read_untyped(10000)


def test_read_untyped_length_exactly_8_and_cap() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"\x00\x00\x00\x08abcd")
    assert buf.read_untyped(8) == b"abcd"
    buf.feed(struct.pack("!i", 10000))
    assert buf.read_untyped(10000) is None  # at the cap: wait for the body


def test_read_untyped_huge_claim_raises_from_header_alone() -> None:
    buf = wire.MessageBuffer()
    buf.feed(struct.pack("!i", 1 << 30))  # a 1 GB claim, header only
    with pytest.raises(wire.MessageTooLarge):
        buf.read_untyped(10000)


def test_read_untyped_one_over_cap() -> None:
    buf = wire.MessageBuffer()
    buf.feed(struct.pack("!i", 10001))
    with pytest.raises(wire.MessageTooLarge, match="10001"):
        buf.read_untyped(10000)


def test_message_too_large_is_wire_error() -> None:
    assert issubclass(wire.MessageTooLarge, wire.WireError)


def test_peek_does_not_consume() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"\x16\x03\x01abc")
    assert buf.peek(1) == b"\x16"
    assert buf.peek(100) == b"\x16\x03\x01abc"
    assert len(buf) == 6


# --- MessageBuffer: typed -----------------------------------------------------------------

TYPED = b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"


def test_typed_fixture_is_consistent() -> None:
    assert wire.typed_message(b"S", b"client_encoding\x00UTF8\x00") == TYPED


def test_read_typed_whole_and_next() -> None:
    buf = wire.MessageBuffer()
    buf.feed(TYPED + b"Z\x00\x00\x00\x05I")
    message = buf.read_typed(1000)
    assert message == wire.BackendMessage(b"S", b"client_encoding\x00UTF8\x00")
    assert buf.read_typed(1000) == wire.BackendMessage(b"Z", b"I")
    assert buf.read_typed(1000) is None


def test_read_typed_byte_by_byte() -> None:
    buf = wire.MessageBuffer()
    for byte in TYPED:
        assert buf.read_typed(1000) is None
        buf.feed(bytes([byte]))
    assert buf.read_typed(1000) == wire.BackendMessage(b"S", TYPED[5:])
    assert len(buf) == 0


@pytest.mark.parametrize("split", range(len(TYPED) + 1))
def test_read_typed_every_split(split: int) -> None:
    buf = wire.MessageBuffer()
    buf.feed(TYPED[:split])
    first = buf.read_typed(1000)
    if split < len(TYPED):
        assert first is None
        buf.feed(TYPED[split:])
        first = buf.read_typed(1000)
    assert first == wire.BackendMessage(b"S", TYPED[5:])
    assert len(buf) == 0


def test_read_typed_empty_body() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"X\x00\x00\x00\x04")
    assert buf.read_typed(0) == wire.BackendMessage(b"X", b"")


@pytest.mark.parametrize("length", [3, 0, -1, -(2**31)])
def test_read_typed_length_below_4(length: int) -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"p" + struct.pack("!i", length))
    with pytest.raises(wire.WireError, match="invalid message length"):
        buf.read_typed(1000)


def test_read_typed_huge_claim_raises_from_header_alone() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"p" + struct.pack("!i", 1 << 30))
    with pytest.raises(wire.MessageTooLarge):
        buf.read_typed(16384)


def test_read_typed_cap_is_on_the_body() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"p\x00\x00\x00\x0e" + b"x" * 10)  # body of exactly 10 bytes
    assert buf.read_typed(10) == wire.BackendMessage(b"p", b"x" * 10)
    buf.feed(b"p\x00\x00\x00\x0f")  # body of 11
    with pytest.raises(wire.MessageTooLarge):
        buf.read_typed(10)


def test_read_typed_needs_full_header() -> None:
    buf = wire.MessageBuffer()
    buf.feed(b"p\x7f\xff\xff")  # 4 of the 5 header bytes
    assert buf.read_typed(10) is None


# --- decode_initial_packet ----------------------------------------------------------------


def test_decode_ssl_request() -> None:
    assert wire.decode_initial_packet(SSL_REQUEST[4:]) == wire.SSLRequest()


def test_decode_gssenc_request() -> None:
    assert wire.decode_initial_packet(GSSENC_REQUEST[4:]) == wire.GSSENCRequest()


@pytest.mark.parametrize("prefix", [SSL_REQUEST[4:], GSSENC_REQUEST[4:]])
def test_decode_ssl_gss_with_extra_bytes(prefix: bytes) -> None:
    with pytest.raises(wire.WireError, match="invalid length"):
        wire.decode_initial_packet(prefix + b"\0\0\0\0")


def test_decode_cancel_request_v30() -> None:
    body = CANCEL_CODE + b"\x00\x00\x30\x39" + b"\xde\xad\xbe\xef"
    packet = wire.decode_initial_packet(body)
    assert packet == wire.CancelRequest(12345, b"\xde\xad\xbe\xef")
    assert "dead" not in repr(packet) and "secret" not in repr(packet)


def test_decode_cancel_request_v32_long_key() -> None:
    key = bytes(range(32))
    body = CANCEL_CODE + b"\x00\x00\x00\x01" + key
    assert wire.decode_initial_packet(body) == wire.CancelRequest(1, key)


def test_decode_cancel_request_max_key() -> None:
    key = b"k" * 256
    assert wire.decode_initial_packet(CANCEL_CODE + b"\0\0\0\1" + key).secret_key == key
    with pytest.raises(wire.WireError):
        wire.decode_initial_packet(CANCEL_CODE + b"\0\0\0\1" + key + b"k")


@pytest.mark.parametrize("packet_length", [8, 12, 15, 300])
def test_decode_cancel_request_wrong_length(packet_length: int) -> None:
    body = (CANCEL_CODE + b"\x00" * 400)[: packet_length - 4]
    with pytest.raises(wire.WireError, match="CancelRequest"):
        wire.decode_initial_packet(body)


def test_decode_cancel_request_via_buffer() -> None:
    buf = wire.MessageBuffer()
    buf.feed(wire.cancel_request(99, b"abcd"))
    assert wire.decode_initial_packet(buf.read_untyped(10000) or b"") == wire.CancelRequest(
        99, b"abcd"
    )


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x03\x00"])
def test_decode_initial_packet_too_short(body: bytes) -> None:
    with pytest.raises(wire.WireError, match="too short"):
        wire.decode_initial_packet(body)


def test_decode_startup_message() -> None:
    body = b"\x00\x03\x00\x00user\x00alice\x00database\x00db\x00application_name\x00psql\x00\x00"
    packet = wire.decode_initial_packet(body)
    assert isinstance(packet, wire.StartupMessage)
    assert (packet.major, packet.minor) == (3, 0)
    assert list(packet.parameters.items()) == [
        ("user", "alice"),
        ("database", "db"),
        ("application_name", "psql"),
    ]
    assert packet.protocol_options == ()
    assert packet.user == "alice"
    assert packet.database == "db"


def test_decode_startup_parameter_order_preserved() -> None:
    body = b"\x00\x03\x00\x00zz\x001\x00user\x00u\x00aa\x002\x00\x00"
    packet = wire.decode_initial_packet(body)
    assert isinstance(packet, wire.StartupMessage)
    assert list(packet.parameters) == ["zz", "user", "aa"]


def test_decode_startup_database_defaults_to_user() -> None:
    packet = wire.decode_startup_message(wire.PROTOCOL_3_0, b"user\x00bob\x00\x00")
    assert packet.database == "bob"
    packet = wire.decode_startup_message(wire.PROTOCOL_3_0, b"user\x00bob\x00database\x00\x00\x00")
    assert packet.database == "bob"  # empty database also means "same as user"


def test_decode_startup_version_3_2() -> None:
    packet = wire.decode_initial_packet(b"\x00\x03\x00\x02user\x00a\x00\x00")
    assert isinstance(packet, wire.StartupMessage)
    assert (packet.major, packet.minor) == (3, 2)


def test_decode_startup_protocol_options_separated() -> None:
    body = b"\x00\x03\x00\x00user\x00a\x00_pq_.foo\x001\x00database\x00d\x00_pq_.bar\x00x\x00\x00"
    packet = wire.decode_initial_packet(body)
    assert isinstance(packet, wire.StartupMessage)
    assert packet.parameters == {"user": "a", "database": "d"}
    assert packet.protocol_options == ("_pq_.foo", "_pq_.bar")


def test_decode_startup_empty_parameters() -> None:
    packet = wire.decode_startup_message(wire.PROTOCOL_3_0, b"\x00")
    assert packet.parameters == {}
    with pytest.raises(KeyError):
        _ = packet.user


def test_decode_startup_duplicate_rejected() -> None:
    with pytest.raises(wire.WireError, match="duplicate"):
        wire.decode_initial_packet(b"\x00\x03\x00\x00user\x00a\x00user\x00b\x00\x00")


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # nothing at all
        b"user\x00alice\x00",  # pairs but no final NUL
        b"user\x00alice",  # value unterminated
        b"user\x00\x00",  # name then terminator: odd layout
        b"user\x00alice\x00\x00\x00",  # an extra NUL after the terminator
        b"user",
    ],
)
def test_decode_startup_missing_terminator(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_startup_message(wire.PROTOCOL_3_0, payload)


def test_decode_startup_empty_name() -> None:
    with pytest.raises(wire.WireError, match="empty startup parameter name"):
        wire.decode_startup_message(wire.PROTOCOL_3_0, b"user\x00a\x00\x00x\x00\x00")


@pytest.mark.parametrize(
    "payload",
    [b"us\xffer\x00a\x00\x00", b"user\x00\xc3\x28\x00\x00", b"user\x00\xed\xa0\x80\x00\x00"],
)
def test_decode_startup_invalid_utf8(payload: bytes) -> None:
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.decode_startup_message(wire.PROTOCOL_3_0, payload)


def test_decode_startup_utf8_value() -> None:
    packet = wire.decode_startup_message(wire.PROTOCOL_3_0, "user\0Zoë\0\0".encode())
    assert packet.user == "Zoë"


# --- decode_password_message --------------------------------------------------------------


def test_decode_password_message() -> None:
    assert wire.decode_password_message(b"hunter2\x00") == "hunter2"
    assert wire.decode_password_message(b"\x00") == ""
    assert wire.decode_password_message("pässwörd".encode() + b"\0") == "pässwörd"


@pytest.mark.parametrize("body", [b"", b"abc", b"ab\x00c\x00", b"\x00\x00", b"abc\x00\x00"])
def test_decode_password_message_bad_layout(body: bytes) -> None:
    with pytest.raises(wire.WireError, match="password packet"):
        wire.decode_password_message(body)


def test_decode_password_message_invalid_utf8() -> None:
    with pytest.raises(wire.WireError, match="UTF-8"):
        wire.decode_password_message(b"\xff\xfe\x00")


# --- decode_fields ------------------------------------------------------------------------


def test_decode_fields_error_response() -> None:
    body = (
        b"SFATAL\x00VFATAL\x00C3D000\x00"
        b'Mdatabase "nope" does not exist\x00Fpostinit.c\x00L1030\x00RInitPostgres\x00\x00'
    )
    assert wire.decode_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "3D000",
        "M": 'database "nope" does not exist',
        "F": "postinit.c",
        "L": "1030",
        "R": "InitPostgres",
    }


def test_decode_fields_empty() -> None:
    assert wire.decode_fields(b"\x00") == {}


def test_decode_fields_invalid_utf8_replaced() -> None:
    assert wire.decode_fields(b"M\xff\x00\x00") == {"M": "\ufffd"}


@pytest.mark.parametrize("body", [b"", b"SFATAL\x00", b"SFATAL"])
def test_decode_fields_missing_terminator(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_fields(body)


def test_decode_fields_trailing_data() -> None:
    with pytest.raises(wire.WireError, match="after terminator"):
        wire.decode_fields(b"SFATAL\x00\x00junk")


def test_decode_fields_roundtrip_error_response() -> None:
    fields = {"S": "ERROR", "C": "42601", "M": 'syntax error at or near "é"'}
    assert wire.decode_fields(wire.error_response(fields)[5:]) == fields


# --- other backend decoders ---------------------------------------------------------------


def test_decode_authentication() -> None:
    assert wire.decode_authentication(b"\x00\x00\x00\x00") == (0, b"")
    assert wire.decode_authentication(b"\x00\x00\x00\x05salt") == (5, b"salt")
    assert wire.decode_authentication(b"\xff\xff\xff\xff") == (-1, b"")
    with pytest.raises(wire.WireError):
        wire.decode_authentication(b"\x00\x00\x00")


def test_decode_sasl_mechanisms() -> None:
    data = b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    assert wire.decode_sasl_mechanisms(data) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert wire.decode_sasl_mechanisms(b"\x00") == []


@pytest.mark.parametrize("data", [b"", b"SCRAM-SHA-256", b"SCRAM-SHA-256\x00"])
def test_decode_sasl_mechanisms_unterminated(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_sasl_mechanisms(data)


def test_decode_parameter_status() -> None:
    assert wire.decode_parameter_status(b"server_version\x0016.4\x00") == ("server_version", "16.4")
    assert wire.decode_parameter_status(b"a\x00\x00") == ("a", "")


@pytest.mark.parametrize("body", [b"", b"a\x00", b"a\x00b", b"a\x00b\x00c\x00"])
def test_decode_parameter_status_bad(body: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_parameter_status(body)


def test_decode_backend_key_data() -> None:
    assert wire.decode_backend_key_data(b"\x00\x00\x30\x39abcd") == (12345, b"abcd")
    key = b"x" * 32
    assert wire.decode_backend_key_data(b"\x00\x00\x00\x01" + key) == (1, key)
    assert wire.decode_backend_key_data(b"\x00\x00\x00\x01" + b"y" * 256)[1] == b"y" * 256


@pytest.mark.parametrize("length", [0, 4, 7, 4 + 257])
def test_decode_backend_key_data_bad_length(length: int) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_backend_key_data(b"\x01" * length)


# --- Properties ---------------------------------------------------------------------------


#: Every decoder of a typed message body; each must raise only WireError on any input.
MESSAGE_BODY_DECODERS = (
    wire.decode_password_message,
    wire.decode_fields,
    wire.decode_authentication,
    wire.decode_sasl_mechanisms,
    wire.decode_parameter_status,
    wire.decode_backend_key_data,
)


@settings(max_examples=300)
@given(data=st.binary(max_size=300), cap=st.integers(min_value=0, max_value=400))
def test_fuzz_read_untyped_and_decode(data: bytes, cap: int) -> None:
    buf = wire.MessageBuffer()
    buf.feed(data)
    try:
        body = buf.read_untyped(cap)
        if body is not None:
            assert len(body) >= 4
            wire.decode_initial_packet(body)
    except wire.WireError:
        pass


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_fuzz_read_typed_and_decoders(data: bytes) -> None:
    buf = wire.MessageBuffer()
    buf.feed(data)
    try:
        message = buf.read_typed(200)
    except wire.WireError:
        return
    if message is None:
        return
    assert len(message.body) <= 200
    assert message.encode() == data[: len(message.body) + 5]
    for decoder in MESSAGE_BODY_DECODERS:
        with contextlib.suppress(wire.WireError):
            decoder(message.body)


@settings(max_examples=300)
@given(body=st.binary(max_size=300))
def test_fuzz_decoders_directly(body: bytes) -> None:
    for decoder in (wire.decode_initial_packet, *MESSAGE_BODY_DECODERS):
        with contextlib.suppress(wire.WireError):
            decoder(body)


_names = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
).filter(lambda s: not s.startswith("_pq_."))
_values = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
)


@given(
    parameters=st.dictionaries(_names, _values, max_size=8),
    minor=st.integers(min_value=0, max_value=0xFFFF),
)
def test_roundtrip_startup_message(parameters: dict[str, str], minor: int) -> None:
    packet = wire.startup_message(parameters, version=(3 << 16) | minor)
    buf = wire.MessageBuffer()
    buf.feed(packet)
    body = buf.read_untyped(1 << 20)
    assert body is not None and len(buf) == 0
    decoded = wire.decode_initial_packet(body)
    assert isinstance(decoded, wire.StartupMessage)
    assert (decoded.major, decoded.minor) == (3, minor)
    assert list(decoded.parameters.items()) == list(parameters.items())
    assert decoded.protocol_options == ()


@given(chunks=st.lists(st.integers(min_value=1, max_value=7), max_size=40))
def test_arbitrary_chunking_typed_stream(chunks: list[int]) -> None:
    stream = TYPED + wire.typed_message(b"Z", b"I") + wire.authentication(0)
    expected = [
        wire.BackendMessage(b"S", TYPED[5:]),
        wire.BackendMessage(b"Z", b"I"),
        wire.BackendMessage(b"R", b"\0\0\0\0"),
    ]
    buf = wire.MessageBuffer()
    got = []
    pos = 0
    for size in [*chunks, len(stream)]:
        buf.feed(stream[pos : pos + size])
        pos += size
        while (message := buf.read_typed(100)) is not None:
            got.append(message)
    assert got == expected
