"""PostgreSQL wire protocol v3: framing, encoding and decoding. Sans-IO: no sockets here.

References are to the PostgreSQL documentation, chapter 55 "Frontend/Backend Protocol"
(55.7 "Message Formats", 55.8 "Error and Notice Message Fields").

Every length a peer claims is checked against a cap *before* anything is buffered for it
(DESIGN.md principle 4), and every decoder raises only :class:`WireError` subclasses on bad
input, so callers have one thing to catch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import MessageTooLarge, WireError

# --- Protocol constants -------------------------------------------------------------------

#: Protocol 3.0 as sent in a StartupMessage: major 3 in the high 16 bits, minor 0.
PROTOCOL_3_0 = 3 << 16
#: Special "protocol versions" of the untyped initial packets (55.7).
CANCEL_REQUEST_CODE = (1234 << 16) | 5678  # 80877102
SSL_REQUEST_CODE = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE = (1234 << 16) | 5680  # 80877104

#: PostgreSQL's own cap on the startup packet (MAX_STARTUP_PACKET_LENGTH in pqcomm.h).
MAX_STARTUP_PACKET_LENGTH = 10000
#: A protocol 3.0 cancel key is 4 bytes; 3.2 allows a key of up to 256 bytes.
MAX_CANCEL_KEY_LENGTH = 256

# Backend authentication request codes ('R' message, 55.7).
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_TYPED_HEADER = struct.Struct("!ci")


# --- Decoded messages ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    #: Parameters in the order the client sent them, without ``_pq_.`` options.
    parameters: dict[str, str]
    #: ``_pq_.*`` protocol options the client asked for (we support none of them).
    protocol_options: tuple[str, ...] = ()

    @property
    def user(self) -> str:
        return self.parameters["user"]

    @property
    def database(self) -> str:
        # PostgreSQL defaults the database to the user name (55.7, StartupMessage).
        return self.parameters.get("database") or self.parameters["user"]


InitialPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


@dataclass(frozen=True, slots=True)
class BackendMessage:
    """A typed message: one tag byte and its body (the length word stripped)."""

    tag: bytes
    body: bytes

    def encode(self) -> bytes:
        return typed_message(self.tag, self.body)


# --- Framing ------------------------------------------------------------------------------


class MessageBuffer:
    """Accumulates bytes from a stream and cuts whole messages out of it.

    ``read_*`` return ``None`` until a whole message is buffered. They check the claimed
    length against ``max_length`` as soon as the length word is complete, so a peer cannot
    make us wait for (or buffer) more than the cap.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_all(self) -> bytes:
        """Everything buffered and not yet consumed (used when switching to splicing)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def peek(self, n: int) -> bytes:
        return bytes(self._buf[:n])

    def read_untyped(self, max_length: int) -> bytes | None:
        """An initial packet: Int32 length (counting itself), then the body. Returns body."""
        if len(self._buf) < 4:
            return None
        (length,) = _INT32.unpack_from(self._buf, 0)
        # PostgreSQL: "invalid length of startup packet" unless 8 <= len <= 10000.
        if length < 8:
            raise WireError(f"invalid length of startup packet: {length}")
        if length > max_length:
            raise MessageTooLarge(f"startup packet of {length} bytes exceeds {max_length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body

    def read_typed(self, max_length: int) -> BackendMessage | None:
        """A typed message: Byte1 tag, Int32 length (counting itself), body."""
        if len(self._buf) < 5:
            return None
        tag, length = _TYPED_HEADER.unpack_from(self._buf, 0)
        if length < 4:
            raise WireError(f"invalid message length {length} for message type {tag!r}")
        if length - 4 > max_length:
            raise MessageTooLarge(
                f"message type {tag!r} of {length - 4} bytes exceeds {max_length}"
            )
        total = length + 1
        if len(self._buf) < total:
            return None
        body = bytes(self._buf[5:total])
        del self._buf[:total]
        return BackendMessage(tag, body)


# --- Decoders -----------------------------------------------------------------------------


def _split_cstrings(data: bytes, what: str) -> list[bytes]:
    """Split NUL-terminated strings; the data must end exactly with a NUL."""
    if not data.endswith(b"\0"):
        raise WireError(f"{what}: missing terminator")
    return data[:-1].split(b"\0")


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not valid UTF-8") from exc


def decode_initial_packet(body: bytes) -> InitialPacket:
    """Decode the body of the first (untyped) packet a client sends."""
    if len(body) < 4:
        raise WireError("startup packet too short")
    (code,) = _UINT32.unpack_from(body, 0)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise WireError("invalid length of SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise WireError("invalid length of GSSENCRequest")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        key_length = len(body) - 8
        if not 4 <= key_length <= MAX_CANCEL_KEY_LENGTH:
            raise WireError(f"invalid length of CancelRequest: {len(body) + 4}")
        (pid,) = _INT32.unpack_from(body, 4)
        return CancelRequest(pid, bytes(body[8:]))
    return decode_startup_message(code, body[4:])


def decode_startup_message(version: int, payload: bytes) -> StartupMessage:
    """Decode StartupMessage parameters: pairs of cstrings, then a final NUL."""
    major, minor = version >> 16, version & 0xFFFF
    if major != 3:
        # Other majors have other layouts (2.0: fixed-size fields); the caller refuses them
        # with 0A000 as PostgreSQL does, so do not misparse them as a protocol violation.
        return StartupMessage(major, minor, {})
    parts = _split_cstrings(payload, "startup packet")
    # After the pairs comes one more NUL, so the split leaves an empty string last.
    if not parts or parts[-1] != b"" or len(parts) % 2 != 1:
        raise WireError("invalid startup packet layout: missing terminator")
    parameters: dict[str, str] = {}
    options: list[str] = []
    for i in range(0, len(parts) - 1, 2):
        name = _utf8(parts[i], "startup parameter name")
        value = _utf8(parts[i + 1], "startup parameter value")
        if not name:
            raise WireError("empty startup parameter name")
        if name.startswith("_pq_."):
            options.append(name)
            continue
        if name in parameters:
            # One value per name: the proxy re-encodes the packet for upstream, and an
            # ambiguity here (which ``user`` wins?) is how parameter smuggling starts.
            raise WireError(f"duplicate startup parameter {name!r}")
        parameters[name] = value
    return StartupMessage(major, minor, parameters, tuple(options))


def decode_password_message(body: bytes) -> str:
    """PasswordMessage ('p'): one cstring. The NUL must be the last byte (as PostgreSQL)."""
    if not body.endswith(b"\0") or b"\0" in body[:-1]:
        raise WireError("invalid password packet size")
    return _utf8(body[:-1], "password")


def decode_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body: (Byte1 code, cstring)*, then NUL (55.8)."""
    fields: dict[str, str] = {}
    pos = 0
    while True:
        if pos >= len(body):
            raise WireError("error fields: missing terminator")
        code = body[pos]
        if code == 0:
            if pos != len(body) - 1:
                raise WireError("error fields: data after terminator")
            return fields
        end = body.find(b"\0", pos + 1)
        if end < 0:
            raise WireError("error fields: unterminated value")
        fields[chr(code)] = body[pos + 1 : end].decode("utf-8", errors="replace")
        pos = end + 1


def decode_authentication(body: bytes) -> tuple[int, bytes]:
    """Authentication* ('R'): Int32 request code, then code-specific data."""
    if len(body) < 4:
        raise WireError("authentication message too short")
    (code,) = _INT32.unpack_from(body, 0)
    return code, bytes(body[4:])


def decode_sasl_mechanisms(data: bytes) -> list[str]:
    """AuthenticationSASL data: a list of cstring mechanism names ended by an empty one."""
    parts = _split_cstrings(data, "SASL mechanism list")
    if not parts or parts[-1] != b"":
        raise WireError("SASL mechanism list: missing terminator")
    return [p.decode("ascii", errors="replace") for p in parts[:-1]]


def decode_parameter_status(body: bytes) -> tuple[str, str]:
    parts = _split_cstrings(body, "ParameterStatus")
    if len(parts) != 2:
        raise WireError("ParameterStatus: expected name and value")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def decode_negotiate_protocol_version(body: bytes) -> tuple[int, int, list[str]]:
    """NegotiateProtocolVersion ('v'): (major, minor, unrecognized option names).

    The first Int32 is a whole ProtocolVersion (see :func:`negotiate_protocol_version`)."""
    if len(body) < 8:
        raise WireError("NegotiateProtocolVersion too short")
    version, count = struct.unpack_from("!Ii", body, 0)
    names = _split_cstrings(body[8:], "NegotiateProtocolVersion") if count else []
    if count < 0 or len(names) != count or (count == 0 and len(body) != 8):
        raise WireError("NegotiateProtocolVersion option count does not match")
    return version >> 16, version & 0xFFFF, [n.decode("utf-8", "replace") for n in names]


def decode_backend_key_data(body: bytes) -> tuple[int, bytes]:
    """BackendKeyData ('K'): Int32 process id, then the secret key (4 bytes in 3.0)."""
    if not 8 <= len(body) <= 4 + MAX_CANCEL_KEY_LENGTH:
        raise WireError(f"BackendKeyData of invalid length {len(body)}")
    (pid,) = _INT32.unpack_from(body, 0)
    return pid, bytes(body[4:])


# --- Encoders -----------------------------------------------------------------------------


def typed_message(tag: bytes, body: bytes = b"") -> bytes:
    return tag + _INT32.pack(len(body) + 4) + body


def _cstring(value: str) -> bytes:
    raw = value.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("NUL byte in a protocol string")
    return raw + b"\0"


def startup_message(parameters: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    payload = b"".join(_cstring(k) + _cstring(v) for k, v in parameters.items()) + b"\0"
    return _INT32.pack(len(payload) + 8) + _UINT32.pack(version) + payload


def ssl_request() -> bytes:
    return _INT32.pack(8) + _UINT32.pack(SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    return (
        _INT32.pack(12 + len(secret_key))
        + _UINT32.pack(CANCEL_REQUEST_CODE)
        + _INT32.pack(process_id)
        + secret_key
    )


def password_message(password: bytes) -> bytes:
    return typed_message(b"p", password + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return typed_message(b"p", _cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return typed_message(b"p", data)


def authentication(code: int, data: bytes = b"") -> bytes:
    return typed_message(b"R", _INT32.pack(code) + data)


def authentication_cleartext_password() -> bytes:
    return authentication(AUTH_CLEARTEXT_PASSWORD)


def negotiate_protocol_version(newest_minor: int, unrecognized: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion ('v'): the newest 3.x we support, and options we don't.

    The docs call the first field the "newest minor protocol version", but PostgreSQL sends
    the whole ProtocolVersion (``FrontendProtocol``: major << 16 | minor) and libpq and pgJDBC
    read it that way, so that is what goes on the wire.
    """
    options = list(unrecognized)
    body = _UINT32.pack((3 << 16) | newest_minor) + _INT32.pack(len(options))
    body += b"".join(_cstring(o) for o in options)
    return typed_message(b"v", body)


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return typed_message(b"K", _INT32.pack(process_id) + secret_key)


def error_response(fields: Mapping[str, str]) -> bytes:
    """ErrorResponse ('E'). NUL bytes in values would cut the field short; drop them."""
    body = b"".join(
        code.encode("ascii") + value.replace("\0", "").encode("utf-8") + b"\0"
        for code, value in fields.items()
    )
    return typed_message(b"E", body + b"\0")


def terminate() -> bytes:
    return typed_message(b"X")
