"""SCRAM-SHA-256 client (RFC 5802, RFC 7677), as PostgreSQL's server expects it. Sans-IO.

PostgreSQL specifics (docs 55.3.1 "SCRAM-SHA-256 Authentication"):
* the user name in client-first-message is ignored by the server; libpq sends ``n=``;
* the password is normalised with SASLprep (RFC 4013) when that succeeds, else used raw;
* channel binding type ``tls-server-end-point`` (RFC 5929) for SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

from ..errors import ScramError

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"

#: Bounds on what a (possibly hostile) server may make us do.
MAX_ITERATIONS = 1_000_000  # PostgreSQL's default is 4096; PBKDF2 cost is linear in this
MAX_NONCE_LENGTH = 1024
MAX_SALT_LENGTH = 1024
_RAW_NONCE_LENGTH = 18  # as libpq (SCRAM_RAW_NONCE_LEN)
_PRINTABLE = frozenset(range(0x21, 0x7F)) - {ord(",")}


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep the way PostgreSQL's ``pg_saslprep()`` does it.

    Returns the prepared string, or the input unchanged when it contains prohibited or
    unassigned characters (PostgreSQL then uses the raw bytes, so must we).
    """
    if password.isascii():
        return password  # pg_saslprep: pure ASCII needs no processing at all
    # Mapping (RFC 4013 2.1): non-ASCII spaces to SPACE, "commonly mapped to nothing" removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return password
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(ch) for ch in normalized for check in prohibited):
        return password
    # Bidirectional rules (RFC 3454 section 6).
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            return password
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return password
    return normalized


@functools.lru_cache(maxsize=256)
def _salted_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for a password/salt/iteration triple.

    PBKDF2 dominates the cost of a login; the proxy logs in with the same password for every
    session of a role, so the result is cached (the salt and count change only when the
    role's password is reset). The cache holds derived keys, never the password itself.
    """
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return (
        hmac.digest(salted, b"Client Key", "sha256"),
        hmac.digest(salted, b"Server Key", "sha256"),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ScramError(f"invalid base64 in {what}") from exc


def _parse_attributes(message: str, expected: str) -> dict[str, str]:
    """Split ``a=v,b=w`` and check the attribute letters appear exactly as ``expected``."""
    attributes: dict[str, str] = {}
    parts = message.split(",")
    if len(parts) != len(expected):
        raise ScramError(f"expected attributes {','.join(expected)}, got {len(parts)} parts")
    for part, letter in zip(parts, expected, strict=True):
        if len(part) < 2 or part[0] != letter or part[1] != "=":
            raise ScramError(f"expected attribute {letter!r}")
        attributes[letter] = part[2:]
    return attributes


class ScramSha256Client:
    """One SCRAM-SHA-256 exchange: client-first, then server-first, then server-final."""

    def __init__(
        self,
        password: str,
        *,
        channel_binding: bytes | None = None,
        server_supports_binding: bool = False,
        client_nonce: str | None = None,
        username: str = "",
    ) -> None:
        """``channel_binding``: tls-server-end-point data, given only when binding is used.

        ``server_supports_binding`` without binding data gives GS2 flag ``y`` (we could bind
        but think the server cannot); with neither, ``n`` (RFC 5802 section 6).
        """
        self._password = saslprep(password).encode("utf-8")
        self._channel_binding = channel_binding
        if channel_binding is not None:
            self._gs2_header = f"p={CHANNEL_BINDING_TYPE},,"
        elif server_supports_binding:
            self._gs2_header = "y,,"
        else:
            self._gs2_header = "n,,"
        self._nonce = client_nonce or _b64(secrets.token_bytes(_RAW_NONCE_LENGTH))
        self._client_first_bare = f"n={username},r={self._nonce}"
        self._expected_server_signature: bytes | None = None
        self.done = False

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._channel_binding is not None else MECHANISM

    def client_first_message(self) -> bytes:
        return (self._gs2_header + self._client_first_bare).encode("ascii")

    def handle_server_first(self, data: bytes) -> bytes:
        """Check server-first-message; return client-final-message."""
        if self._expected_server_signature is not None:
            raise ScramError("server-first-message received twice")
        try:
            server_first = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ScramError("server-first-message is not ASCII") from exc
        if len(server_first) > MAX_NONCE_LENGTH + MAX_SALT_LENGTH + 64:
            raise ScramError("server-first-message too long")
        attributes = _parse_attributes(server_first, "rsi")
        nonce, salt_b64, iterations_text = attributes["r"], attributes["s"], attributes["i"]
        if (
            not nonce.startswith(self._nonce)
            or len(nonce) <= len(self._nonce)
            or len(nonce) > MAX_NONCE_LENGTH
            or any(ord(ch) not in _PRINTABLE for ch in nonce)
        ):
            raise ScramError("server nonce invalid")
        if len(salt_b64) > MAX_SALT_LENGTH:
            raise ScramError("salt too long")
        salt = _b64decode(salt_b64, "salt")
        if not salt:
            raise ScramError("empty salt")
        if not iterations_text.isdigit() or not 1 <= int(iterations_text) <= MAX_ITERATIONS:
            raise ScramError("iteration count out of range")
        client_key, server_key = _salted_keys(self._password, salt, int(iterations_text))

        cbind_input = self._gs2_header.encode("ascii") + (self._channel_binding or b"")
        without_proof = f"c={_b64(cbind_input)},r={nonce}"
        auth_message = ",".join((self._client_first_bare, server_first, without_proof)).encode(
            "ascii"
        )
        stored_key = hashlib.sha256(client_key).digest()
        client_signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        self._expected_server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def handle_server_final(self, data: bytes) -> None:
        """Verify server-final-message; raises ScramError unless the server proved itself."""
        if self._expected_server_signature is None or self.done:
            raise ScramError("server-final-message out of order")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ScramError("server-final-message is not ASCII") from exc
        if text.startswith("e="):
            raise ScramError(f"server reported SCRAM error: {text[2:80]}")
        attributes = _parse_attributes(text, "v")
        signature = _b64decode(attributes["v"], "server signature")
        # Constant time: a server impersonator must not learn how much of it was right.
        if not hmac.compare_digest(signature, self._expected_server_signature):
            raise ScramError("server signature does not match")
        self.done = True
