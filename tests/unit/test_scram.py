"""SCRAM-SHA-256 client: RFC 7677 section 3 test vector, RFC 5802 message checks, SASLprep."""

from __future__ import annotations

import base64
import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jwtpgproxy.errors import ScramError
from jwtpgproxy.protocol import scram
from jwtpgproxy.protocol.scram import ScramSha256Client, saslprep

# RFC 7677 section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = f"r={RFC_SERVER_NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

SALT = base64.b64encode(b"saltsalt").decode()


def rfc_client() -> ScramSha256Client:
    return ScramSha256Client("pencil", client_nonce=RFC_NONCE, username="user")


def client(**kw: object) -> ScramSha256Client:
    return ScramSha256Client("pw", client_nonce="abc", **kw)  # type: ignore[arg-type]


def test_rfc7677_vector() -> None:
    c = rfc_client()
    assert c.mechanism == "SCRAM-SHA-256"
    assert c.client_first_message() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert c.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert c.done is False
    c.handle_server_final(RFC_SERVER_FINAL)
    assert c.done is True


def test_postgresql_style_empty_username() -> None:
    c = ScramSha256Client("pw", client_nonce="xyz")
    assert c.client_first_message() == b"n,,n=,r=xyz"


def test_random_nonce_is_base64_of_18_bytes_and_unique() -> None:
    nonces = set()
    for _ in range(50):
        first = ScramSha256Client("pw").client_first_message().decode()
        assert first.startswith("n,,n=,r=")
        nonce = first[len("n,,n=,r=") :]
        assert len(base64.b64decode(nonce, validate=True)) == 18
        nonces.add(nonce)
    assert len(nonces) == 50


def test_wrong_server_signature() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    bad = base64.b64encode(b"\0" * 32)
    with pytest.raises(ScramError, match="signature"):
        c.handle_server_final(b"v=" + bad)
    assert c.done is False


def test_server_signature_one_bit_off() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    raw = bytearray(base64.b64decode(RFC_SERVER_FINAL[2:]))
    raw[-1] ^= 1
    with pytest.raises(ScramError):
        c.handle_server_final(b"v=" + base64.b64encode(bytes(raw)))


def test_server_signature_truncated() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError):
        c.handle_server_final(b"v=" + base64.b64encode(base64.b64decode(RFC_SERVER_FINAL[2:])[:31]))


def test_wrong_password_gives_different_proof() -> None:
    c = ScramSha256Client("pencil2", client_nonce=RFC_NONCE, username="user")
    assert c.handle_server_first(RFC_SERVER_FIRST) != RFC_CLIENT_FINAL
    with pytest.raises(ScramError):
        c.handle_server_final(RFC_SERVER_FINAL)


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=XYZabc123,s=" + SALT.encode() + b",i=4096",  # does not start with our nonce
        b"r=abc,s=" + SALT.encode() + b",i=4096",  # equal to ours: not extended
        b"r=ab,s=" + SALT.encode() + b",i=4096",  # shorter than ours
        b"r=abcde,f,s=" + SALT.encode() + b",i=4096",  # comma splits nonce
        b"r=abc\x7f,s=" + SALT.encode() + b",i=4096",  # non-printable
        b"r=abc def,s=" + SALT.encode() + b",i=4096",  # space is not printable per RFC
        b"r=abc" + b"x" * 1100 + b",s=" + SALT.encode() + b",i=4096",  # too long
    ],
)
def test_bad_server_nonce(server_first: bytes) -> None:
    with pytest.raises(ScramError):
        client().handle_server_first(server_first)


@pytest.mark.parametrize("salt", ["!!!!", "c2FsdA", "c2Fsd=A=", "é", "YW Jj"])
def test_bad_base64_salt(salt: str) -> None:
    with pytest.raises(ScramError):
        client().handle_server_first(f"r=abcd,s={salt},i=4096".encode())


def test_empty_salt() -> None:
    with pytest.raises(ScramError, match="empty salt"):
        client().handle_server_first(b"r=abcd,s=,i=4096")


def test_salt_too_long() -> None:
    salt = base64.b64encode(b"s" * 1000).decode()
    with pytest.raises(ScramError, match="too long"):
        client().handle_server_first(f"r=abcd,s={salt},i=4096".encode())


@pytest.mark.parametrize(
    "iterations",
    ["0", "100001", "1000000", "99999999999999999999", "-1", "+5", "4096a", "", " 4096", "0x10"],
)
def test_bad_iterations(iterations: str) -> None:
    with pytest.raises(ScramError):
        client().handle_server_first(f"r=abcd,s={SALT},i={iterations}".encode())


def test_iterations_bounds_accepted() -> None:
    assert client().handle_server_first(f"r=abcd,s={SALT},i=1".encode()).startswith(b"c=biws,")
    assert scram.DEFAULT_MAX_ITERATIONS == 100_000


@pytest.mark.parametrize(
    "server_first",
    [
        f"m=ext,r=abcd,s={SALT},i=4096",  # mandatory extension (RFC 5802 5.1 "m")
        f"r=abcd,s={SALT},i=4096,x=ext",
        f"r=abcd,s={SALT}",
        f"s={SALT},r=abcd,i=4096",
        f"r=abcd,i=4096,s={SALT}",
        "",
        "r",
        f"rr=abcd,s={SALT},i=4096",
        f"e=other-error,s={SALT},i=4096",
    ],
)
def test_malformed_server_first(server_first: str) -> None:
    with pytest.raises(ScramError):
        client().handle_server_first(server_first.encode())


def test_non_ascii_server_first() -> None:
    with pytest.raises(ScramError, match="ASCII"):
        client().handle_server_first(f"r=abcdé,s={SALT},i=4096".encode())


def test_server_error_in_final() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match="invalid-proof"):
        c.handle_server_final(b"e=invalid-proof")
    assert c.done is False


@pytest.mark.parametrize(
    "final",
    [b"", b"v=", b"v=!!!!", b"x=abc", b"v=" + RFC_SERVER_FINAL[2:] + b",x=1", b"\xff"],
)
def test_malformed_server_final(final: bytes) -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError):
        c.handle_server_final(final)


def test_server_final_before_server_first() -> None:
    with pytest.raises(ScramError, match="out of order"):
        rfc_client().handle_server_final(RFC_SERVER_FINAL)


def test_double_server_first() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(ScramError, match="twice"):
        c.handle_server_first(RFC_SERVER_FIRST)


def test_double_server_final() -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    c.handle_server_final(RFC_SERVER_FINAL)
    with pytest.raises(ScramError):
        c.handle_server_final(RFC_SERVER_FINAL)


# --- Channel binding (RFC 5802 section 6, RFC 5929) -----------------------------------------


def test_channel_binding_plus() -> None:
    binding = bytes(range(32))
    c = ScramSha256Client("pencil", channel_binding=binding, client_nonce=RFC_NONCE)
    assert c.mechanism == "SCRAM-SHA-256-PLUS"
    assert c.client_first_message() == b"p=tls-server-end-point,,n=,r=" + RFC_NONCE.encode()
    final = c.handle_server_first(RFC_SERVER_FIRST).decode()
    expected_c = base64.b64encode(b"p=tls-server-end-point,," + binding).decode()
    assert final.startswith(f"c={expected_c},r={RFC_SERVER_NONCE},p=")


def test_gs2_flag_y_when_server_might_support_binding() -> None:
    c = ScramSha256Client("pencil", server_supports_binding=True, client_nonce=RFC_NONCE)
    assert c.mechanism == "SCRAM-SHA-256"
    assert c.client_first_message() == b"y,,n=,r=" + RFC_NONCE.encode()
    final = c.handle_server_first(RFC_SERVER_FIRST)
    # base64("y,,") == "eSws"
    assert final.startswith(b"c=eSws,r=")


def test_gs2_flag_n_by_default() -> None:
    c = ScramSha256Client("pencil", client_nonce=RFC_NONCE)
    assert c.client_first_message().startswith(b"n,,")
    assert c.handle_server_first(RFC_SERVER_FIRST).startswith(b"c=biws,")  # base64("n,,")


def test_binding_data_changes_proof() -> None:
    a = ScramSha256Client("pencil", channel_binding=b"a" * 32, client_nonce=RFC_NONCE)
    b = ScramSha256Client("pencil", channel_binding=b"b" * 32, client_nonce=RFC_NONCE)
    pa = a.handle_server_first(RFC_SERVER_FIRST).split(b",p=")[1]
    pb = b.handle_server_first(RFC_SERVER_FIRST).split(b",p=")[1]
    assert pa != pb


# --- SASLprep (RFC 4013, as pg_saslprep) ----------------------------------------------------


@pytest.mark.parametrize("password", ["pencil", "", "a b\tc\x07", "P@ss w0rd!"])
def test_saslprep_ascii_unchanged(password: str) -> None:
    assert saslprep(password) == password


def test_saslprep_non_ascii_space_mapped() -> None:
    assert saslprep("a\u00a0b\u3000c") == "a b c"


def test_saslprep_soft_hyphen_removed() -> None:
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("pa\u00adss\u200bword\u00e9") == "password\u00e9"


def test_saslprep_nfkc() -> None:
    assert saslprep("\u2168") == "IX"  # ROMAN NUMERAL NINE -> "IX" (RFC 4013 section 3)
    assert saslprep("\u00aa") == "a"  # FEMININE ORDINAL INDICATOR


def test_saslprep_prohibited_returns_raw() -> None:
    raw = "\u00e9\u0007x"
    assert saslprep(raw) == raw
    raw = "\u00e9\ue000"  # private use
    assert saslprep(raw) == raw


def test_saslprep_only_mapped_to_nothing_returns_raw() -> None:
    assert saslprep("\u00ad") == "\u00ad"


def test_saslprep_bidi_rules() -> None:
    assert saslprep("\u05d0\u05d1") == "\u05d0\u05d1"  # RandAL only: fine
    mixed = "\u05d0a\u05d1"  # RandAL with L: prohibited, raw
    assert saslprep(mixed) == mixed
    wrong_end = "\u05d01"  # must start and end with RandAL
    assert saslprep(wrong_end) == wrong_end


def test_saslprep_applied_to_password() -> None:
    # A password with a no-break space must hash like the same password with a space.
    a = ScramSha256Client("pen\u00a0cil\u00e9", client_nonce=RFC_NONCE)
    b = ScramSha256Client("pen cil\u00e9", client_nonce=RFC_NONCE)
    assert a.handle_server_first(RFC_SERVER_FIRST) == b.handle_server_first(RFC_SERVER_FIRST)


# --- Properties -------------------------------------------------------------------------------


@settings(max_examples=300)
@given(data=st.binary(max_size=200))
def test_fuzz_server_first_bytes(data: bytes) -> None:
    with contextlib.suppress(ScramError):
        client().handle_server_first(data)


@settings(max_examples=300, deadline=None)
@given(
    nonce_ext=st.text(max_size=10),
    salt=st.one_of(
        st.text(max_size=12), st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode())
    ),
    iterations=st.one_of(st.integers(min_value=-5, max_value=50).map(str), st.text(max_size=4)),
    extra=st.sampled_from(["", ",x=1", ",", "m=1,"]),
)
def test_fuzz_structured_server_first(
    nonce_ext: str, salt: str, iterations: str, extra: str
) -> None:
    message = f"r=abc{nonce_ext},s={salt},i={iterations}"
    message = f"{extra}{message}" if extra.startswith("m") else message + extra
    c = client()
    try:
        final = c.handle_server_first(message.encode("utf-8", "surrogatepass"))
    except ScramError:
        return
    assert final.startswith(b"c=biws,r=abc")


@settings(max_examples=200)
@given(data=st.binary(max_size=100))
def test_fuzz_server_final(data: bytes) -> None:
    c = rfc_client()
    c.handle_server_first(RFC_SERVER_FIRST)
    try:
        c.handle_server_final(data)
    except ScramError:
        assert c.done is False
    else:
        assert data == RFC_SERVER_FINAL


# --- Iteration cap and the salted-key cache (issue 13, item 6) --------------------------------


def test_default_iteration_cap_refuses_a_million() -> None:
    """PostgreSQL's default is 4096; 10^6 costs over half a second of CPU per login."""
    with pytest.raises(ScramError, match="at most 100000"):
        client().handle_server_first(f"r=abcd,s={SALT},i=1000000".encode())
    assert client().handle_server_first(f"r=abcd,s={SALT},i=100000".encode())


def test_iteration_cap_is_configurable() -> None:
    with pytest.raises(ScramError):
        client(max_iterations=4096).handle_server_first(f"r=abcd,s={SALT},i=4097".encode())
    final = client(max_iterations=200_000).handle_server_first(f"r=abcd,s={SALT},i=150000".encode())
    assert final.startswith(b"c=biws,")


def test_salted_key_cache_holds_no_password_bytes() -> None:
    password = "cache-probe-Pa55word-\u00e9"
    scram.SALTED_KEYS.clear()
    ScramSha256Client(password, client_nonce="abc").handle_server_first(
        f"r=abcd,s={SALT},i=4096".encode()
    )
    assert len(scram.SALTED_KEYS) == 1
    held = repr(list(scram.SALTED_KEYS._entries.items()))
    raw = password.encode()
    for entry in scram.SALTED_KEYS._entries:
        for part in entry:
            assert not isinstance(part, bytes) or raw not in part
            assert part != raw
    assert password not in held
    # Not a plain hash of it either: offline guessing needs the per-process key.
    assert hashlib.sha256(raw).digest() not in {entry[0] for entry in scram.SALTED_KEYS._entries}


def test_salted_key_cache_hit_and_bound() -> None:
    cache = scram.SaltedKeyCache(maxsize=2)
    derivations = [scram.KeyDerivation(b"pw", bytes([i]) * 8, 4096) for i in range(3)]
    for d in derivations:
        cache.put(d, (b"c", b"s"))
    assert len(cache) == 2
    assert cache.get(derivations[0]) is None  # the oldest went
    assert cache.get(derivations[2]) == (b"c", b"s")
    assert cache.get(scram.KeyDerivation(b"other", derivations[2].salt, 4096)) is None
    assert "pw" not in repr(derivations[0])
