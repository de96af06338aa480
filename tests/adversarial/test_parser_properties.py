"""Property-based tests (hypothesis) of every sans-IO parser.

Properties, for each of wire.MessageBuffer + the decoders, frontend.FrontendHandshake,
login.UpstreamLogin (with scram.ScramSha256Client) and tokens.TokenVerifier.verify:

* **only our own exceptions escape**: WireError, ProxyError subclasses, ScramError,
  TokenRejected -- never IndexError, struct.error, UnicodeError, RecursionError, ...;
* **caps hold**: a claimed length above the cap raises as soon as the length word is complete,
  before any of the body is sent;
* **valid messages round-trip** through the encoders and decoders;
* **arbitrary splits**: a valid byte stream fed in chunks cut anywhere yields exactly the
  events of feeding it whole (every single cut offset, and hypothesis-chosen cut lists).

Example counts are modest so that the whole file runs in a few seconds; the opt-in
``tests/fuzz/fuzz_parsers.py`` runs the same parsers on 100 000+ inputs each.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jwtpgproxy.auth.tokens import TokenPolicy, TokenVerifier, VerificationKey, algorithms_for_key
from jwtpgproxy.errors import ProxyError, ScramError, TokenRejected
from jwtpgproxy.protocol import frontend, login, wire
from jwtpgproxy.protocol.scram import ScramSha256Client

PROJECT_ERRORS = (wire.WireError, ProxyError, ScramError, TokenRejected)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------------

#: Protocol strings: any text without NUL (cstrings cannot carry it).
cstring_text = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
)
param_name = cstring_text.filter(lambda s: bool(s) and not s.startswith("_pq_."))


def chunks_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


cut_lists = st.lists(st.integers(min_value=0, max_value=4096), max_size=30)


# --- wire: MessageBuffer ---------------------------------------------------------------------


@FAST
@given(data=st.binary(max_size=600), cap=st.integers(min_value=0, max_value=12000))
def test_read_untyped_arbitrary(data: bytes, cap: int) -> None:
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    try:
        while (body := buffer.read_untyped(cap)) is not None:
            assert len(body) + 4 <= cap
            with suppress(wire.WireError):
                wire.decode_initial_packet(body)
    except wire.WireError:
        pass


@FAST
@given(data=st.binary(max_size=600), cap=st.integers(min_value=0, max_value=70000))
def test_read_typed_arbitrary(data: bytes, cap: int) -> None:
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    try:
        while (message := buffer.read_typed(cap)) is not None:
            assert len(message.body) <= cap
            assert len(message.tag) == 1
    except wire.WireError:
        pass


@FAST
@given(cap=st.integers(min_value=9, max_value=20000), data=st.data())
def test_untyped_cap_raises_on_the_header_alone(cap: int, data: st.DataObject) -> None:
    claimed = data.draw(st.integers(min_value=cap + 1, max_value=2**31 - 1))
    buffer = wire.MessageBuffer()
    buffer.feed(struct.pack("!i", claimed)[:3])
    assert buffer.read_untyped(cap) is None  # header incomplete: wait
    buffer.feed(struct.pack("!i", claimed)[3:])
    with pytest.raises(wire.MessageTooLarge):
        buffer.read_untyped(cap)
    # Within the cap: the header alone just waits for the body.
    ok = wire.MessageBuffer()
    ok.feed(struct.pack("!i", data.draw(st.integers(min_value=9, max_value=cap))))
    assert ok.read_untyped(cap) is None


@FAST
@given(
    cap=st.integers(min_value=0, max_value=70000),
    tag=st.binary(min_size=1, max_size=1),
    data=st.data(),
)
def test_typed_cap_raises_on_the_header_alone(cap: int, tag: bytes, data: st.DataObject) -> None:
    claimed = data.draw(st.integers(min_value=cap + 5, max_value=2**31 - 1))
    buffer = wire.MessageBuffer()
    buffer.feed(tag + struct.pack("!i", claimed))
    with pytest.raises(wire.MessageTooLarge):
        buffer.read_typed(cap)


@FAST
@given(negative=st.integers(min_value=-(2**31), max_value=7))
def test_untyped_small_or_negative_lengths(negative: int) -> None:
    buffer = wire.MessageBuffer()
    buffer.feed(struct.pack("!i", negative))
    with pytest.raises(wire.WireError):
        buffer.read_untyped(wire.MAX_STARTUP_PACKET_LENGTH)


@FAST
@given(
    messages=st.lists(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=50)), max_size=8
    ),
    cuts=cut_lists,
)
def test_typed_framing_any_split(messages: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(wire.typed_message(t, b) for t, b in messages)
    buffer = wire.MessageBuffer()
    got = []
    for chunk in chunks_at(stream, cuts):
        buffer.feed(chunk)
        while (message := buffer.read_typed(1000)) is not None:
            got.append((message.tag, message.body))
    assert got == messages
    assert len(buffer) == 0


# --- wire: round trips -----------------------------------------------------------------------


def _one_untyped(packet: bytes) -> bytes:
    buffer = wire.MessageBuffer()
    buffer.feed(packet)
    body = buffer.read_untyped(wire.MAX_STARTUP_PACKET_LENGTH)
    assert body is not None and len(buffer) == 0
    return body


@FAST
@given(
    params=st.dictionaries(param_name, cstring_text, max_size=6),
    options=st.lists(cstring_text.map(lambda s: "_pq_." + s), max_size=3, unique=True),
    minor=st.integers(min_value=0, max_value=0xFFFF),
)
def test_startup_round_trip(params: dict[str, str], options: list[str], minor: int) -> None:
    all_params = {**params, **dict.fromkeys(options, "x")}
    packet = wire.startup_message(all_params, version=(3 << 16) | minor)
    if len(packet) > wire.MAX_STARTUP_PACKET_LENGTH:
        return
    decoded = wire.decode_initial_packet(_one_untyped(packet))
    assert decoded == wire.StartupMessage(3, minor, params, tuple(options))


@FAST
@given(pid=st.integers(-(2**31), 2**31 - 1), key=st.binary(min_size=4, max_size=256))
def test_cancel_request_round_trip(pid: int, key: bytes) -> None:
    decoded = wire.decode_initial_packet(_one_untyped(wire.cancel_request(pid, key)))
    assert decoded == wire.CancelRequest(pid, key)


def test_ssl_and_gssenc_round_trip() -> None:
    assert wire.decode_initial_packet(_one_untyped(wire.ssl_request())) == wire.SSLRequest()
    gss = struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE)
    assert wire.decode_initial_packet(_one_untyped(gss)) == wire.GSSENCRequest()


@FAST
@given(password=cstring_text)
def test_password_round_trip(password: str) -> None:
    message = wire.password_message(password.encode())
    buffer = wire.MessageBuffer()
    buffer.feed(message)
    parsed = buffer.read_typed(100_000)
    assert parsed is not None and parsed.tag == b"p"
    assert wire.decode_password_message(parsed.body) == password


@FAST
@given(
    fields=st.dictionaries(
        st.characters(min_codepoint=1, max_codepoint=127).map(str), cstring_text, max_size=8
    )
)
def test_error_fields_round_trip(fields: dict[str, str]) -> None:
    encoded = wire.error_response(fields)
    assert wire.decode_fields(encoded[5:]) == fields


@FAST
@given(code=st.integers(-(2**31), 2**31 - 1), data=st.binary(max_size=100))
def test_authentication_round_trip(code: int, data: bytes) -> None:
    assert wire.decode_authentication(wire.authentication(code, data)[5:]) == (code, data)


@FAST
@given(
    names=st.lists(
        st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=30),
        max_size=5,
    )
)
def test_sasl_mechanisms_round_trip(names: list[str]) -> None:
    data = b"".join(n.encode() + b"\0" for n in names) + b"\0"
    assert wire.decode_sasl_mechanisms(data) == names


@FAST
@given(name=cstring_text, value=cstring_text)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    body = name.encode() + b"\0" + value.encode() + b"\0"
    assert wire.decode_parameter_status(body) == (name, value)


@FAST
@given(pid=st.integers(-(2**31), 2**31 - 1), key=st.binary(min_size=4, max_size=256))
def test_backend_key_data_round_trip(pid: int, key: bytes) -> None:
    assert wire.decode_backend_key_data(wire.backend_key_data(pid, key)[5:]) == (pid, key)


@FAST
@given(minor=st.integers(0, 0xFFFF), options=st.lists(cstring_text, max_size=5))
def test_negotiate_protocol_version_round_trip(minor: int, options: list[str]) -> None:
    body = wire.negotiate_protocol_version(minor, options)[5:]
    assert wire.decode_negotiate_protocol_version(body) == (3, minor, options)


DECODERS = [
    wire.decode_initial_packet,
    wire.decode_password_message,
    wire.decode_fields,
    wire.decode_authentication,
    wire.decode_sasl_mechanisms,
    wire.decode_parameter_status,
    wire.decode_negotiate_protocol_version,
    wire.decode_backend_key_data,
    lambda b: wire.decode_startup_message(wire.PROTOCOL_3_0, b),
]


@FAST
@given(body=st.binary(max_size=300))
@example(body=b"\x00\x03\x00\x00user\x00")
@example(body=b"\x00\x00\x00\x00\xff\xff\xff\xff")
@example(body=b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00")
def test_decoders_only_raise_wire_error(body: bytes) -> None:
    for decode in DECODERS:
        with suppress(wire.WireError):
            decode(body)


# --- frontend.FrontendHandshake --------------------------------------------------------------

_ACTIVE = (frontend.State.AWAIT_INITIAL, frontend.State.AWAIT_PASSWORD)


def drive_frontend(machine: frontend.FrontendHandshake, chunks: Sequence[bytes]) -> list[Any]:
    """Feed chunks; collect every event but NeedData; complete TLS when asked."""
    events: list[Any] = []
    for chunk in chunks:
        machine.receive_data(chunk)
        while machine.state in _ACTIVE:
            event = machine.next_event()
            if isinstance(event, frontend.NeedData):
                break
            events.append(event)
            if isinstance(event, frontend.StartTLS):
                machine.tls_established()
    return events


MODES = list(frontend.DownstreamSSLMode)


@FAST
@given(
    mode=st.sampled_from(MODES),
    data=st.binary(max_size=400),
    cuts=cut_lists,
    prefix=st.sampled_from([b"", wire.ssl_request(), wire.startup_message({"user": "u"})]),
)
def test_frontend_arbitrary_bytes(
    mode: frontend.DownstreamSSLMode, data: bytes, cuts: list[int], prefix: bytes
) -> None:
    machine = frontend.FrontendHandshake(mode, max_password_length=300)
    try:
        drive_frontend(machine, chunks_at(prefix + data, cuts))
    except ProxyError:
        assert machine.state is frontend.State.FAILED


def _login_stream(password: str = "tok.en.x", **params: str) -> bytes:
    startup = wire.startup_message({"user": "alice", "database": "db", **params})
    return startup + wire.password_message(password.encode())


def _expected_frontend_events(stream: bytes, *, tls: bool) -> list[Any]:
    machine = frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE)
    plain = [wire.ssl_request()] if tls else []
    return drive_frontend(machine, [*plain, stream])


def test_frontend_every_cut_offset() -> None:
    """SSLRequest, then (over TLS) startup + password + a pipelined query, cut at every
    offset into two chunks (and the SSLRequest itself cut at every offset)."""
    query = wire.typed_message(b"Q", b"select 1\0")
    stream = _login_stream(application_name="app") + query
    whole = frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE)
    expected = drive_frontend(whole, [wire.ssl_request(), stream])
    assert [type(e) for e in expected] == [
        frontend.StartTLS,
        frontend.PasswordRequested,
        frontend.PasswordReceived,
    ]
    assert whole.leftover() == query
    ssl = wire.ssl_request()
    for i in range(1, len(ssl)):
        machine = frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE)
        assert drive_frontend(machine, [ssl[:i], ssl[i:], stream]) == expected
    for i in range(len(stream) + 1):
        machine = frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE)
        assert drive_frontend(machine, [ssl, stream[:i], stream[i:]]) == expected, i
        assert machine.leftover() == query


@FAST
@given(
    password=cstring_text,
    params=st.dictionaries(
        param_name.filter(lambda n: n not in ("user", "database", "replication")),
        cstring_text,
        max_size=4,
    ),
    cuts=cut_lists,
    gss_first=st.booleans(),
)
def test_frontend_any_split_same_events(
    password: str, params: dict[str, str], cuts: list[int], gss_first: bool
) -> None:
    stream = _login_stream(password, **params)
    if len(stream) > 9000:
        return
    plain = (struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE) if gss_first else b"") + (
        wire.ssl_request()
    )
    expected = drive_frontend(
        frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE), [plain, stream]
    )
    assert isinstance(expected[-1], frontend.PasswordReceived)
    assert expected[-1].password == password
    machine = frontend.FrontendHandshake(frontend.DownstreamSSLMode.REQUIRE)
    # The plaintext phase may be cut anywhere too, as long as no post-TLS byte joins it.
    got = drive_frontend(machine, [*chunks_at(plain, cuts), *chunks_at(stream, cuts)])
    assert got == expected


@FAST
@given(extra=st.binary(min_size=1, max_size=200), mode=st.sampled_from(MODES[:2]))
def test_frontend_bytes_after_ssl_request_refused(
    extra: bytes, mode: frontend.DownstreamSSLMode
) -> None:
    """CVE-2021-23214: anything buffered behind the SSLRequest is refused (require/allow)."""
    machine = frontend.FrontendHandshake(mode)
    machine.receive_data(wire.ssl_request() + extra)
    with pytest.raises(ProxyError) as info:
        machine.next_event()
    assert info.value.sqlstate == "08P01"


@FAST
@given(cap=st.integers(min_value=10, max_value=70000), data=st.data())
def test_frontend_password_cap_on_header(cap: int, data: st.DataObject) -> None:
    claimed = data.draw(st.integers(min_value=cap + 5, max_value=2**31 - 1))
    machine = frontend.FrontendHandshake(
        frontend.DownstreamSSLMode.DISABLE, max_password_length=cap
    )
    events = drive_frontend(machine, [wire.startup_message({"user": "u"})])
    assert isinstance(events[-1], frontend.PasswordRequested)
    machine.receive_data(b"p" + struct.pack("!i", claimed))
    with pytest.raises(ProxyError) as info:
        machine.next_event()
    assert info.value.sqlstate == "08P01"


# --- login.UpstreamLogin + SCRAM -------------------------------------------------------------

PASSWORD = "upstream-secret"
CLIENT_NONCE = "clientnonceAAAAAAAAAAAAA"
SERVER_NONCE = CLIENT_NONCE + "serverpartBBBB"
SALT = b"0123456789abcdef"
ITERATIONS = 4096


def scram_server_messages(client_first_bare: str, gs2: str = "n,,") -> tuple[bytes, bytes]:
    """A real SCRAM-SHA-256 server's messages for PASSWORD (RFC 5802 section 3)."""
    server_first = f"r={SERVER_NONCE},s={base64.b64encode(SALT).decode()},i={ITERATIONS}"
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), SALT, ITERATIONS)
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={SERVER_NONCE}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(server_key, auth_message, "sha256")
    return server_first.encode(), b"v=" + base64.b64encode(signature)


@contextmanager
def fixed_nonce() -> Iterator[None]:
    def client(password: str, **kwargs: Any) -> ScramSha256Client:
        return ScramSha256Client(password, client_nonce=CLIENT_NONCE, **kwargs)

    with mock.patch.object(login, "ScramSha256Client", client):
        yield


def _after_auth() -> bytes:
    return (
        wire.authentication(wire.AUTH_OK)
        + wire.typed_message(b"S", b"server_version\x0016.0\x00")
        + wire.typed_message(b"N", b"SNOTICE\x00Mhello\x00\x00")
        + wire.typed_message(b"S", b"client_encoding\x00UTF8\x00")
        + wire.backend_key_data(4242, b"\x01\x02\x03\x04")
        + wire.typed_message(b"Z", b"I")
    )


def scram_transcript() -> bytes:
    first, final = scram_server_messages(f"n=,r={CLIENT_NONCE}")
    return (
        wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
        + wire.authentication(wire.AUTH_SASL_CONTINUE, first)
        + wire.authentication(wire.AUTH_SASL_FINAL, final)
        + _after_auth()
    )


TRANSCRIPTS = {
    "scram": scram_transcript,
    "md5": lambda: wire.authentication(wire.AUTH_MD5_PASSWORD, b"salt") + _after_auth(),
    "cleartext": lambda: wire.authentication(wire.AUTH_CLEARTEXT_PASSWORD) + _after_auth(),
    "negotiate+trust": lambda: (
        wire.typed_message(b"v", struct.pack("!Ii", 3 << 16, 0)) + _after_auth()
    ),
}


def new_login() -> login.UpstreamLogin:
    return login.UpstreamLogin(
        user="alice",
        password=PASSWORD,
        parameters={"user": "alice", "database": "db"},
        protocol_minor=2,
    )


def drive_login(machine: login.UpstreamLogin, chunks: Sequence[bytes]) -> list[Any]:
    events: list[Any] = []
    for chunk in chunks:
        machine.receive_data(chunk)
        while machine.phase not in (login.Phase.DONE, login.Phase.FAILED):
            event = machine.next_event()
            if isinstance(event, login.NeedData):
                break
            if isinstance(event, login.DeriveKeys):  # the driver runs it in a thread
                machine.keys_derived(event.derivation.derive())
                continue
            events.append(event)
    return events


@pytest.mark.parametrize("name", list(TRANSCRIPTS))
def test_login_transcript_every_cut_offset(name: str) -> None:
    """An upstream login transcript (R10/R11/R12/R0/S/N/S/K/Z for SCRAM) fed whole, then cut
    at every offset into two chunks, then one byte at a time: the same events every time."""
    transcript = TRANSCRIPTS[name]() + wire.typed_message(b"A", b"\0\0\0\1chan\0x\0")
    with fixed_nonce():
        whole = new_login()
        expected = drive_login(whole, [transcript])
        complete = expected[-1]
        assert isinstance(complete, login.LoginComplete)
        assert complete.backend_key == (4242, b"\x01\x02\x03\x04")
        assert [m.tag for m in complete.relay] == [b"R", b"S", b"N", b"S", b"Z"]
        leftover = whole.leftover()
        assert leftover.startswith(b"A")
        for i in range(len(transcript) + 1):
            machine = new_login()
            assert drive_login(machine, [transcript[:i], transcript[i:]]) == expected, i
            assert machine.leftover() == leftover
        machine = new_login()
        one_by_one = [transcript[i : i + 1] for i in range(len(transcript))]
        assert drive_login(machine, one_by_one) == expected


@SLOW
@given(name=st.sampled_from(list(TRANSCRIPTS)), cuts=cut_lists)
def test_login_transcript_any_cut_list(name: str, cuts: list[int]) -> None:
    transcript = TRANSCRIPTS[name]()
    with fixed_nonce():
        expected = drive_login(new_login(), [transcript])
        assert drive_login(new_login(), chunks_at(transcript, cuts)) == expected


@FAST
@given(
    prefix_len=st.integers(min_value=0, max_value=400),
    junk=st.binary(max_size=300),
    name=st.sampled_from(list(TRANSCRIPTS)),
)
def test_login_arbitrary_bytes_after_valid_prefix(prefix_len: int, junk: bytes, name: str) -> None:
    """A valid prefix of a transcript, then arbitrary bytes: only UpstreamError escapes."""
    stream = TRANSCRIPTS[name]()[:prefix_len] + junk
    with fixed_nonce():
        machine = new_login()
        try:
            drive_login(machine, [stream])
        except ProxyError:
            assert machine.phase is login.Phase.FAILED


@FAST
@given(data=st.binary(max_size=500), cuts=cut_lists)
def test_login_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    machine = new_login()
    with suppress(ProxyError):
        drive_login(machine, chunks_at(data, cuts))


def test_login_message_cap_on_header() -> None:
    machine = new_login()
    machine.receive_data(b"S" + struct.pack("!i", 100 * 1024 * 1024))
    with pytest.raises(ProxyError) as info:
        machine.next_event()
    assert info.value.sqlstate == "08P01"


@FAST
@given(data=st.binary(max_size=300))
def test_scram_server_first_arbitrary(data: bytes) -> None:
    client = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    with suppress(ScramError):
        client.handle_server_first(data)


@FAST
@given(
    suffix=st.text(max_size=30),
    salt=st.text(max_size=40),
    iterations=st.one_of(
        st.text(max_size=6),
        st.sampled_from(["0", "-1", "1000000001", "1" + "0" * 100, "4096 ", "+4096", "0x10"]),
        st.integers(min_value=1, max_value=4096).map(str),
    ),
    extra=st.sampled_from(["", ",m=ext", ",", ",e=oops"]),
)
def test_scram_server_first_structured(suffix: str, salt: str, iterations: str, extra: str) -> None:
    client = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    message = f"r={CLIENT_NONCE}{suffix},s={salt},i={iterations}{extra}"
    try:
        final = client.handle_server_first(message.encode("utf-8", "surrogatepass"))
    except ScramError:
        return
    assert final.startswith(b"c=biws,r=" + CLIENT_NONCE.encode())


@FAST
@given(data=st.binary(max_size=200))
def test_scram_server_final_arbitrary(data: bytes) -> None:
    client = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    first, _ = scram_server_messages(f"n=,r={CLIENT_NONCE}")
    client.handle_server_first(first)
    with pytest.raises(ScramError):
        client.handle_server_final(data)
    assert not client.done


def test_scram_iteration_bomb_refused_fast() -> None:
    """A server asking for 10**9 PBKDF2 iterations is refused before any hashing."""
    client = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    message = f"r={SERVER_NONCE},s={base64.b64encode(SALT).decode()},i=1000000000"
    with pytest.raises(ScramError):
        client.handle_server_first(message.encode())


# --- tokens.TokenVerifier.verify -------------------------------------------------------------

_KEY = ed25519.Ed25519PrivateKey.generate()
_VKEY = VerificationKey("k", _KEY.public_key(), algorithms_for_key(_KEY.public_key(), "k"))
_VKEY_KID = VerificationKey(
    "k", _KEY.public_key(), algorithms_for_key(_KEY.public_key(), "k"), kid="kid-1"
)
VERIFIERS = [
    TokenVerifier([_VKEY], TokenPolicy(max_token_length=4096)),
    TokenVerifier([_VKEY_KID], TokenPolicy(max_token_length=4096)),
]
NOW = 1_700_000_000.0

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
header_strategy = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["EdDSA", "RS256", "ES256", "HS256", "none", "", "eddsa"])
        | json_values,
        "typ": st.sampled_from(["JWT", "at+jwt", "JWE"]) | json_values,
        "kid": st.sampled_from(["kid-1", "../../x"]) | json_values,
        "crit": json_values,
        "jku": json_values,
    },
)
claims_strategy = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from(["alice", "bob"]) | json_values,
        "exp": st.sampled_from([NOW + 100, NOW - 100]) | json_values,
        "nbf": json_values,
        "iat": json_values,
        "aud": json_values,
    },
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@FAST
@given(token=st.text(max_size=300))
@example(token="a.b.c")
@example(token="..")
@example(token="e30.e30.")
def test_verify_arbitrary_text(token: str) -> None:
    for verifier in VERIFIERS:
        with pytest.raises(TokenRejected):
            verifier.verify(token, "alice", now=NOW)


@FAST
@given(header=header_strategy, claims=claims_strategy, signature=st.binary(max_size=80))
def test_verify_structured_unsigned(
    header: dict[str, Any], claims: dict[str, Any], signature: bytes
) -> None:
    encoded = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    token = f"{encoded}.{b64(signature)}"
    for verifier in VERIFIERS:
        with pytest.raises(TokenRejected):
            verifier.verify(token, "alice", now=NOW)


@FAST
@given(header=header_strategy, claims=claims_strategy, user=st.sampled_from(["alice", "bob"]))
def test_verify_structured_signed(
    header: dict[str, Any], claims: dict[str, Any], user: str
) -> None:
    """Correctly signed, arbitrary header and claims: either an Identity whose role is the
    user (and then the claims are sane), or TokenRejected -- nothing else."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    token = f"{signing_input}.{b64(_KEY.sign(signing_input.encode()))}"
    for verifier in VERIFIERS:
        try:
            identity = verifier.verify(token, user, now=NOW)
        except TokenRejected:
            continue
        assert identity.role == user == claims["sub"]
        assert header["alg"] == "EdDSA"
        assert isinstance(claims["exp"], int | float) and claims["exp"] > NOW - 10
        assert "crit" not in header and "aud" not in claims


@FAST
@given(data=st.data())
def test_verify_mutated_valid_token(data: st.DataObject) -> None:
    """A valid token with one character replaced, inserted or deleted: the result is either
    the same identity (the mutation was a no-op) or TokenRejected."""
    header = b64(json.dumps({"alg": "EdDSA"}).encode())
    signing_input = f"{header}.{b64(json.dumps({'sub': 'alice', 'exp': NOW + 100}).encode())}"
    token = f"{signing_input}.{b64(_KEY.sign(signing_input.encode()))}"
    position = data.draw(st.integers(0, len(token)))
    char = data.draw(st.characters())
    operation = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    if operation == "replace":
        mutated = token[:position] + char + token[position + 1 :]
    elif operation == "insert":
        mutated = token[:position] + char + token[position:]
    else:
        mutated = token[:position] + token[position + 1 :]
    for verifier in VERIFIERS:
        try:
            identity = verifier.verify(mutated, "alice", now=NOW)
        except TokenRejected:
            continue
        assert identity.role == "alice"
