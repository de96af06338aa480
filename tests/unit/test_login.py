"""UpstreamLogin (sans-IO upstream login) driven with hand-made server bytes.

Server messages are built from 55.7 "Message Formats"; the SCRAM server is a small
RFC 5802 implementation written here with hashlib/hmac, independent of jwtpgproxy.protocol.scram.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.errors import (
    ConfigError,
    UpstreamAuthenticationFailed,
    UpstreamAuthMethodRefused,
    UpstreamError,
    UpstreamErrorResponse,
    UpstreamProtocolError,
)
from jwtpgproxy.protocol import wire
from jwtpgproxy.protocol.login import (
    ALL_AUTH_METHODS,
    MAX_LOGIN_MESSAGE_LENGTH,
    AuthMethod,
    ChannelBindingPolicy,
    DeriveKeys,
    LoginComplete,
    NeedData,
    Phase,
    Send,
    UpstreamLogin,
    md5_password,
    parse_require_auth,
)

R_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
PARAM = wire.typed_message(b"S", b"server_version\x0016.4\x00")
PARAM2 = wire.typed_message(b"S", b"client_encoding\x00UTF8\x00")
KEY = wire.typed_message(b"K", b"\x00\x00\x30\x39" + b"\xaa\xbb\xcc\xdd")
READY = b"Z\x00\x00\x00\x05I"
NOTICE = wire.typed_message(b"N", b"SNOTICE\x00C00000\x00Mhello\x00\x00")
PASSWORD = "s3cret-Proxy-pw"


def login(**kw: object) -> UpstreamLogin:
    options: dict[str, object] = {
        "user": "alice",
        "password": PASSWORD,
        "parameters": {"user": "alice", "database": "db"},
    }
    options.update(kw)
    return UpstreamLogin(**options)  # type: ignore[arg-type]


def feed(machine: UpstreamLogin, data: bytes) -> object:
    """Feed ``data``; run a DeriveKeys request inline, as the driver does in a thread."""
    machine.receive_data(data)
    event = machine.next_event()
    if isinstance(event, DeriveKeys):
        machine.keys_derived(event.derivation.derive())
        event = machine.next_event()
    return event


def parse_client_message(data: bytes) -> wire.BackendMessage:
    buf = wire.MessageBuffer()
    buf.feed(data)
    message = buf.read_typed(1 << 20)
    assert message is not None and len(buf) == 0
    return message


def error(fields: dict[str, str]) -> bytes:
    return wire.error_response(fields)


# --- Startup ----------------------------------------------------------------------------


def test_startup_bytes() -> None:
    assert login().startup_bytes() == (
        b"\x00\x00\x00\x20\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00"
    )


def test_need_data_initially() -> None:
    machine = login()
    assert machine.next_event() == NeedData()
    assert machine.phase is Phase.AUTHENTICATING


# --- trust ----------------------------------------------------------------------------------


def test_trust() -> None:
    machine = login()
    event = feed(machine, R_OK + PARAM + KEY + PARAM2 + READY)
    assert isinstance(event, LoginComplete)
    assert [m.encode() for m in event.relay] == [R_OK, PARAM, PARAM2, READY]
    assert event.backend_key == (12345, b"\xaa\xbb\xcc\xdd")
    assert event.auth_method == "trust"
    assert machine.phase is Phase.DONE


def test_trust_byte_by_byte() -> None:
    stream = R_OK + PARAM + KEY + READY
    machine = login()
    for byte in stream[:-1]:
        assert feed(machine, bytes([byte])) == NeedData()
    event = feed(machine, stream[-1:])
    assert isinstance(event, LoginComplete)
    assert [m.encode() for m in event.relay] == [R_OK, PARAM, READY]


def test_no_backend_key() -> None:
    event = feed(login(), R_OK + READY)
    assert isinstance(event, LoginComplete)
    assert event.backend_key is None


def test_leftover_after_ready_for_query() -> None:
    machine = login()
    after = NOTICE + wire.typed_message(b"A", b"\0\0\0\1chan\0payload\0")
    event = feed(machine, R_OK + READY + after)
    assert isinstance(event, LoginComplete)
    assert machine.leftover() == after
    assert machine.leftover() == b""


def test_notice_relayed_in_order() -> None:
    event = feed(login(), NOTICE + R_OK + PARAM + NOTICE + READY)
    assert isinstance(event, LoginComplete)
    assert [m.encode() for m in event.relay] == [NOTICE, R_OK, PARAM, NOTICE, READY]


def test_backend_key_twice() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), R_OK + KEY + KEY + READY)


def test_backend_key_bad_length() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), R_OK + wire.typed_message(b"K", b"\0\0\0\1") + READY)


def test_ready_for_query_bad_length() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), R_OK + b"Z\x00\x00\x00\x06II")


@pytest.mark.parametrize("tag", [b"D", b"T", b"R", b"C"])
def test_unexpected_message_after_auth(tag: bytes) -> None:
    machine = login()
    with pytest.raises(UpstreamProtocolError):
        feed(machine, R_OK + wire.typed_message(tag, b"\0\0\0\0"))
    assert machine.phase is Phase.FAILED


def test_malformed_parameter_status() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), R_OK + wire.typed_message(b"S", b"only-name\0"))


# --- cleartext --------------------------------------------------------------------------------


def test_cleartext() -> None:
    machine = login()
    event = feed(machine, b"R\x00\x00\x00\x08\x00\x00\x00\x03")
    # PasswordMessage: 'p', Int32 len, password, NUL.
    assert event == Send(b"p\x00\x00\x00\x14s3cret-Proxy-pw\x00")
    assert PASSWORD not in repr(event)
    assert feed(machine, b"") == NeedData()
    done = feed(machine, R_OK + READY)
    assert isinstance(done, LoginComplete)
    assert done.auth_method == "password"


def test_cleartext_utf8_password() -> None:
    event = feed(login(password="pässwörd"), wire.authentication(3))
    assert isinstance(event, Send)
    assert event.data == wire.typed_message(b"p", "pässwörd".encode() + b"\0")


# --- MD5 ------------------------------------------------------------------------------------


def test_md5_password_known_value() -> None:
    # 55.3.2 / pg_md5_encrypt: "md5" + md5(md5(password + user) + salt), in hex.
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"pw" + b"alice").hexdigest()
    assert inner == "aa7bb6fc2700e717ae61ec5c1567469c"
    expected = b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()
    assert expected == b"md527972593be6fc26d3f4484e91163efdf"
    assert md5_password("pw", "alice", salt) == expected
    assert md5_password("pw", "alice", b"\x01\x02\x03\x05") != expected
    assert md5_password("pw", "bob", salt) != expected


def test_md5_login() -> None:
    machine = login()
    salt = b"\xde\xad\xbe\xef"
    event = feed(machine, b"R\x00\x00\x00\x0c\x00\x00\x00\x05" + salt)
    assert isinstance(event, Send)
    message = parse_client_message(event.data)
    assert message.tag == b"p"
    inner = hashlib.md5((PASSWORD + "alice").encode()).hexdigest()
    assert message.body == b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"
    done = feed(machine, R_OK + READY)
    assert isinstance(done, LoginComplete) and done.auth_method == "md5"


@pytest.mark.parametrize("salt", [b"", b"abc", b"abcde"])
def test_md5_bad_salt_length(salt: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), wire.authentication(5, salt))


def test_md5_refused_when_channel_binding_required() -> None:
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE, tls_server_end_point=b"x" * 32)
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, wire.authentication(5, b"salt"))
    assert machine.phase is Phase.FAILED


def test_cleartext_refused_when_channel_binding_required() -> None:
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE, tls_server_end_point=b"x" * 32)
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, wire.authentication(3))


def test_trust_refused_when_channel_binding_required() -> None:
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE, tls_server_end_point=b"x" * 32)
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, R_OK + READY)


# --- SCRAM --------------------------------------------------------------------------------


class ScramServer:
    """A minimal RFC 5802 / RFC 7677 server side, as PostgreSQL implements it."""

    def __init__(
        self,
        password: str,
        *,
        salt: bytes = b"0123456789abcdef",
        iterations: int = 4096,
        binding: bytes | None = None,
    ) -> None:
        self.salt = salt
        self.iterations = iterations
        self.binding = binding
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        self.client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        self.stored_key = hashlib.sha256(self.client_key).digest()
        self.server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def first(self, initial_response: bytes) -> bytes:
        message = parse_client_message(initial_response)
        assert message.tag == b"p"
        mechanism, _, rest = message.body.partition(b"\0")
        self.mechanism = mechanism.decode()
        (length,) = struct.unpack("!i", rest[:4])
        client_first = rest[4:]
        assert len(client_first) == length
        text = client_first.decode()
        flag, authzid, bare = text.split(",", 2)
        self.gs2_header = f"{flag},{authzid},"
        assert bare.startswith("n=,r=")
        self.client_first_bare = bare
        self.nonce = bare[len("n=,r=") :] + "SERVERnonce+/"
        self.server_first = (
            f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iterations}"
        )
        return wire.authentication(11, self.server_first.encode())

    def final(self, response: bytes, *, tamper: bool = False) -> bytes:
        message = parse_client_message(response)
        assert message.tag == b"p"
        client_final = message.body.decode()
        without_proof, _, proof_b64 = client_final.rpartition(",p=")
        c_attr, r_attr = without_proof.split(",")
        expected_cbind = self.gs2_header.encode() + (self.binding or b"")
        assert c_attr == "c=" + base64.b64encode(expected_cbind).decode()
        assert r_attr == "r=" + self.nonce
        auth_message = ",".join((self.client_first_bare, self.server_first, without_proof))
        signature = hmac.new(self.stored_key, auth_message.encode(), "sha256").digest()
        proof = base64.b64decode(proof_b64)
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        assert hashlib.sha256(recovered).digest() == self.stored_key, "client proof wrong"
        server_signature = hmac.new(self.server_key, auth_message.encode(), "sha256").digest()
        if tamper:
            server_signature = bytes([server_signature[0] ^ 1]) + server_signature[1:]
        return wire.authentication(12, b"v=" + base64.b64encode(server_signature))


def sasl_request(*mechanisms: str) -> bytes:
    return wire.authentication(10, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def test_sasl_request_bytes() -> None:
    assert sasl_request("SCRAM-SHA-256") == (
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    )


def test_scram_full_exchange() -> None:
    server = ScramServer(PASSWORD)
    machine = login()
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    assert isinstance(first, Send)
    assert machine.phase is Phase.SASL
    assert first.data.startswith(b"p\x00\x00\x00")
    assert b"SCRAM-SHA-256\x00" in first.data
    final = feed(machine, server.first(first.data))
    assert isinstance(final, Send)
    assert server.gs2_header == "n,,"
    done = feed(machine, server.final(final.data) + R_OK + PARAM + KEY + READY)
    assert isinstance(done, LoginComplete)
    assert done.auth_method == "scram-sha-256"
    assert [m.encode() for m in done.relay] == [R_OK, PARAM, READY]
    assert done.backend_key == (12345, b"\xaa\xbb\xcc\xdd")
    assert PASSWORD.encode() not in first.data + final.data


def test_scram_wrong_password_detected_by_server() -> None:
    server = ScramServer("another password")
    machine = login()
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    assert isinstance(first, Send)
    final = feed(machine, server.first(first.data))
    assert isinstance(final, Send)
    with pytest.raises(AssertionError, match="client proof wrong"):
        server.final(final.data)


def test_scram_wrong_server_signature() -> None:
    server = ScramServer(PASSWORD)
    machine = login()
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    final = feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    with pytest.raises(UpstreamAuthenticationFailed) as info:
        feed(machine, server.final(final.data, tamper=True) + R_OK + READY)  # type: ignore[attr-defined]
    assert machine.phase is Phase.FAILED
    assert PASSWORD not in info.value.reason
    assert PASSWORD not in info.value.client_message


def test_scram_ok_before_sasl_final() -> None:
    server = ScramServer(PASSWORD)
    machine = login()
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    with pytest.raises(UpstreamAuthenticationFailed, match="skipped"):
        feed(machine, R_OK + READY)


def test_scram_ok_right_after_sasl_request() -> None:
    machine = login()
    feed(machine, sasl_request("SCRAM-SHA-256"))
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, R_OK)


def test_scram_malformed_server_first() -> None:
    machine = login()
    feed(machine, sasl_request("SCRAM-SHA-256"))
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, wire.authentication(11, b"r=not-our-nonce,s=c2FsdA==,i=4096"))


def test_scram_unexpected_code_during_sasl() -> None:
    machine = login()
    feed(machine, sasl_request("SCRAM-SHA-256"))
    with pytest.raises(UpstreamProtocolError):
        feed(machine, wire.authentication(3))


def test_scram_unsupported_mechanisms_only() -> None:
    with pytest.raises(UpstreamAuthenticationFailed, match="no supported SASL"):
        feed(login(), sasl_request("SCRAM-SHA-1", "OAUTHBEARER"))


def test_scram_plus_chosen_when_binding_offered() -> None:
    binding = hashlib.sha256(b"certificate").digest()
    server = ScramServer(PASSWORD, binding=binding)
    machine = login(tls_server_end_point=binding)
    first = feed(machine, sasl_request("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert isinstance(first, Send)
    final = feed(machine, server.first(first.data))
    assert server.mechanism == "SCRAM-SHA-256-PLUS"
    assert server.gs2_header == "p=tls-server-end-point,,"
    assert isinstance(final, Send)
    done = feed(machine, server.final(final.data) + R_OK + READY)
    assert isinstance(done, LoginComplete)
    assert done.auth_method == "scram-sha-256-plus"


def test_scram_plus_required_and_offered() -> None:
    binding = b"\x01" * 32
    server = ScramServer(PASSWORD, binding=binding)
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE, tls_server_end_point=binding)
    first = feed(machine, sasl_request("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"))
    final = feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    assert server.mechanism == "SCRAM-SHA-256-PLUS"
    done = feed(machine, server.final(final.data) + R_OK + READY)  # type: ignore[attr-defined]
    assert isinstance(done, LoginComplete)


def test_scram_y_flag_when_plus_not_offered_but_binding_possible() -> None:
    server = ScramServer(PASSWORD)
    machine = login(tls_server_end_point=b"\x02" * 32)
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    final = feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    assert server.mechanism == "SCRAM-SHA-256"
    assert server.gs2_header == "y,,"
    done = feed(machine, server.final(final.data) + R_OK + READY)  # type: ignore[attr-defined]
    assert isinstance(done, LoginComplete) and done.auth_method == "scram-sha-256"


def test_scram_channel_binding_disabled_ignores_binding_data() -> None:
    server = ScramServer(PASSWORD)
    machine = login(channel_binding=ChannelBindingPolicy.DISABLE, tls_server_end_point=b"\3" * 32)
    first = feed(machine, sasl_request("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    assert server.mechanism == "SCRAM-SHA-256"
    assert server.gs2_header == "n,,"


def test_channel_binding_require_without_plus_offered() -> None:
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE, tls_server_end_point=b"x" * 32)
    with pytest.raises(UpstreamAuthenticationFailed, match="channel binding"):
        feed(machine, sasl_request("SCRAM-SHA-256"))


def test_channel_binding_require_without_binding_data() -> None:
    machine = login(channel_binding=ChannelBindingPolicy.REQUIRE)
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, sasl_request("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))


def test_plus_not_chosen_without_binding_data() -> None:
    server = ScramServer(PASSWORD)
    machine = login()
    first = feed(machine, sasl_request("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    feed(machine, server.first(first.data))  # type: ignore[attr-defined]
    assert server.mechanism == "SCRAM-SHA-256"
    assert server.gs2_header == "n,,"


# --- Errors ---------------------------------------------------------------------------------


def test_password_failed_upstream() -> None:
    machine = login()
    feed(machine, wire.authentication(3))
    fields = {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": 'password authentication failed for user "alice"',
        "F": "auth.c",
        "L": "323",
        "R": "auth_failed",
    }
    with pytest.raises(UpstreamAuthenticationFailed) as info:
        feed(machine, error(fields))
    exc = info.value
    assert exc.sqlstate == "28000"
    assert PASSWORD not in exc.client_message
    assert PASSWORD not in exc.reason
    assert PASSWORD not in str(exc.client_fields())
    assert "auth.c" not in str(exc.client_fields())
    assert machine.phase is Phase.FAILED


def test_password_failed_during_scram() -> None:
    machine = login()
    feed(machine, sasl_request("SCRAM-SHA-256"))
    with pytest.raises(UpstreamAuthenticationFailed):
        feed(machine, error({"S": "FATAL", "C": "28P01", "M": "x"}))


def test_error_response_before_auth_request_relayed() -> None:
    # e.g. "no pg_hba.conf entry" (28000) or "too many connections" (53300)
    with pytest.raises(UpstreamErrorResponse) as info:
        feed(login(), error({"S": "FATAL", "C": "53300", "M": "sorry, too many clients already"}))
    assert info.value.sqlstate == "53300"


def test_error_response_after_auth() -> None:
    fields = {
        "S": "FATAL",
        "V": "FATAL",
        "C": "3D000",
        "M": 'database "nope" does not exist',
        "F": "postinit.c",
        "L": "1030",
        "R": "InitPostgres",
    }
    machine = login()
    with pytest.raises(UpstreamErrorResponse) as info:
        feed(machine, R_OK + error(fields))
    exc = info.value
    assert exc.sqlstate == "3D000"
    assert exc.client_fields() == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "3D000",
        "M": 'database "nope" does not exist',
    }
    assert machine.phase is Phase.FAILED


def test_28p01_after_auth_is_relayed_not_mapped() -> None:
    with pytest.raises(UpstreamErrorResponse):
        feed(login(), R_OK + error({"S": "FATAL", "C": "28P01", "M": "x"}))


def test_malformed_error_response() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), wire.typed_message(b"E", b"SFATAL\0"))


@pytest.mark.parametrize("code", [2, 6, 7, 8, 9, 99, -1])
def test_unsupported_methods(code: int) -> None:
    with pytest.raises(UpstreamAuthenticationFailed) as info:
        feed(login(), wire.authentication(code))
    assert info.value.sqlstate == "28000"


@pytest.mark.parametrize("tag", [b"Z", b"S", b"K", b"D", b"p", b"\x00"])
def test_unexpected_tag_during_auth(tag: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), wire.typed_message(tag, b"I"))


def test_negotiate_protocol_version_refused() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), wire.negotiate_protocol_version(0, ["_pq_.x"]))


def test_startup_asks_for_requested_minor() -> None:
    assert login(protocol_minor=2).startup_bytes()[4:8] == b"\x00\x03\x00\x02"


def test_upstream_negotiates_32_down_to_30() -> None:
    """A PostgreSQL < 18 asked for 3.2 answers NegotiateProtocolVersion(3.0) first."""
    machine = login(protocol_minor=2)
    assert feed(machine, wire.negotiate_protocol_version(0, [])) == NeedData()
    assert machine.protocol_minor == 0
    result = feed(machine, wire.authentication(wire.AUTH_OK) + READY)
    assert isinstance(result, LoginComplete)


@pytest.mark.parametrize(
    "data",
    [
        wire.negotiate_protocol_version(2, []),  # upwards from 3.0
        wire.authentication(wire.AUTH_OK) + wire.negotiate_protocol_version(0, []),  # late
        wire.typed_message(b"v", b"\x00\x04\x00\x00\x00\x00\x00\x00"),  # major 4
    ],
)
def test_negotiate_protocol_version_out_of_bounds(data: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(protocol_minor=0), data)


def test_short_authentication_message() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), b"R\x00\x00\x00\x06\x00\x00")


def test_oversized_message_refused_from_header() -> None:
    machine = login()
    with pytest.raises(UpstreamProtocolError):
        feed(machine, b"S" + struct.pack("!i", MAX_LOGIN_MESSAGE_LENGTH + 5))
    assert machine.phase is Phase.FAILED


def test_invalid_length_refused() -> None:
    with pytest.raises(UpstreamProtocolError):
        feed(login(), b"R\x00\x00\x00\x02")


def test_message_after_done() -> None:
    machine = login()
    assert isinstance(feed(machine, R_OK + READY + READY), LoginComplete)
    with pytest.raises(UpstreamProtocolError):
        machine.next_event()


# --- Fuzz -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from([R_OK, PARAM, KEY, READY, NOTICE, sasl_request("SCRAM-SHA-256")]),
            st.builds(wire.authentication, st.integers(-2, 13), st.binary(max_size=12)),
        ),
        max_size=6,
    ),
    policy=st.sampled_from(list(ChannelBindingPolicy)),
)
def test_fuzz_only_upstream_errors(chunks: list[bytes], policy: ChannelBindingPolicy) -> None:
    machine = login(channel_binding=policy, tls_server_end_point=b"b" * 32)
    for chunk in chunks:
        try:
            event = feed(machine, chunk)
        except UpstreamError:
            assert machine.phase is Phase.FAILED
            return
        if isinstance(event, LoginComplete):
            return
        assert isinstance(event, NeedData | Send)


# --- require_auth (libpq syntax) ------------------------------------------------------------

SAFE = frozenset({AuthMethod.MD5, AuthMethod.SCRAM_SHA_256})


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("", ALL_AUTH_METHODS),
        ("password", {AuthMethod.PASSWORD}),
        ("scram-sha-256, md5", {AuthMethod.SCRAM_SHA_256, AuthMethod.MD5}),
        ("!password,!none", ALL_AUTH_METHODS - {AuthMethod.PASSWORD, AuthMethod.NONE}),
        ("none", {AuthMethod.NONE}),
    ],
)
def test_parse_require_auth(text: str, allowed: set[AuthMethod]) -> None:
    assert parse_require_auth(text) == allowed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("password,!md5", "mixed"),
        ("!md5,password", "mixed"),
        ("md5,md5", "more than once"),
        ("kerberos", "invalid method"),
        ("scram", "invalid method"),
        ("!password,!md5,!gss,!sspi,!scram-sha-256,!oauth,!none", "no method"),
    ],
)
def test_parse_require_auth_errors(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_require_auth(text)
    assert info.value.setting == "require_auth"


@pytest.mark.parametrize(
    ("request_bytes", "method"),
    [
        (wire.authentication(3), "password"),
        (R_OK + READY, "none"),
        (wire.authentication(5, b"salt"), "md5"),
    ],
)
def test_require_auth_refuses_method_before_sending_anything(
    request_bytes: bytes, method: str
) -> None:
    allowed = ALL_AUTH_METHODS - {AuthMethod(method)}
    machine = login(require_auth=allowed)
    with pytest.raises(UpstreamAuthMethodRefused) as info:
        feed(machine, request_bytes)
    exc = info.value
    assert exc.method == method
    assert exc.sqlstate == "28000"  # not 28P01: the client's token was fine
    assert "UPSTREAM__REQUIRE_AUTH" in exc.reason
    assert "UPSTREAM__REQUIRE_AUTH" not in exc.client_message
    assert PASSWORD not in exc.reason
    assert machine.phase is Phase.FAILED


def test_require_auth_refuses_scram() -> None:
    with pytest.raises(UpstreamAuthMethodRefused):
        feed(login(require_auth=frozenset({AuthMethod.MD5})), sasl_request("SCRAM-SHA-256"))


def test_require_auth_allows_listed_methods() -> None:
    machine = login(require_auth=SAFE)
    event = feed(machine, sasl_request("SCRAM-SHA-256"))
    assert isinstance(event, Send)
    machine = login(require_auth=SAFE)
    assert isinstance(feed(machine, wire.authentication(5, b"salt")), Send)


# --- What of upstream's login errors reaches the client (issue 13, item 3) ------------------

LEAKY = {
    "S": "FATAL",
    "V": "FATAL",
    "C": "53300",
    "M": "remaining connection slots are reserved for roles with the SUPERUSER attribute",
    "D": "proxy-internal detail: host 10.9.8.7",
    "H": "hint naming /etc/postgresql/pg_hba.conf",
    "W": "PL/pgSQL function check_login() line 3",
    "s": "internal_schema",
    "t": "secret_table",
    "F": "postinit.c",
    "L": "1030",
    "R": "InitPostgres",
}


def test_login_error_relays_only_severity_sqlstate_message() -> None:
    with pytest.raises(UpstreamErrorResponse) as info:
        feed(login(), R_OK + error(LEAKY))
    exc = info.value
    assert exc.client_fields() == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": LEAKY["M"],
    }
    # ... and the rest goes to the log (the error's reason).
    for name in ("D", "H", "W", "s", "t"):
        assert LEAKY[name] in exc.reason


def test_login_error_of_class_28_gets_a_generic_message() -> None:
    fields = {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28000",
        "M": 'no pg_hba.conf entry for host "10.9.8.7", user "alice", database "db", no encryption',
    }
    with pytest.raises(UpstreamErrorResponse) as info:
        feed(login(), error(fields))
    exc = info.value
    assert exc.sqlstate == "28000"  # kept: sslmode=allow retries with TLS on it
    client = exc.client_fields()
    assert "10.9.8.7" not in str(client)
    assert "pg_hba" not in str(client)
    assert client["C"] == "28000"
    assert "10.9.8.7" in exc.reason  # the operator still sees upstream's words


def test_login_error_odd_severity_becomes_fatal() -> None:
    with pytest.raises(UpstreamErrorResponse) as info:
        feed(login(), error({"S": "HELLO\x1b[2J", "V": "x", "C": "53300", "M": "m"}))
    assert info.value.client_fields()["S"] == "FATAL"
    assert info.value.client_fields()["V"] == "FATAL"


def test_scram_key_derivation_is_handed_to_the_driver_on_a_cache_miss() -> None:
    """PBKDF2 must not run inside the sans-IO machine (on the event loop): a cache miss
    is a DeriveKeys event the driver runs in a thread; a hit needs no derivation."""
    from jwtpgproxy.protocol import scram

    scram.SALTED_KEYS.clear()
    server = ScramServer(PASSWORD, salt=b"derive-off-loop!")
    machine = login()
    first = machine_event(machine, sasl_request("SCRAM-SHA-256"))
    assert isinstance(first, Send)
    derive = machine_event(machine, server.first(first.data))
    assert isinstance(derive, DeriveKeys)
    assert derive.derivation.iterations == 4096
    assert PASSWORD not in repr(derive)
    machine.keys_derived(derive.derivation.derive())
    final = machine.next_event()
    assert isinstance(final, Send)
    done = machine_event(machine, server.final(final.data) + R_OK + READY)
    assert isinstance(done, LoginComplete)
    # The same password, salt and count again: cached, no derivation.
    again = login()
    first = machine_event(again, sasl_request("SCRAM-SHA-256"))
    assert isinstance(first, Send)
    server2 = ScramServer(PASSWORD, salt=b"derive-off-loop!")
    assert isinstance(machine_event(again, server2.first(first.data)), Send)


def test_scram_iteration_cap_passed_to_the_client() -> None:
    server = ScramServer(PASSWORD, iterations=5000)
    machine = login(scram_max_iterations=4096)
    first = feed(machine, sasl_request("SCRAM-SHA-256"))
    assert isinstance(first, Send)
    with pytest.raises(UpstreamAuthenticationFailed, match="iteration count"):
        feed(machine, server.first(first.data))


def machine_event(machine: UpstreamLogin, data: bytes) -> object:
    machine.receive_data(data)
    return machine.next_event()
