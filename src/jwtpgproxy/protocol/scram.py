"""SCRAM-SHA-256 client (RFC 5802, RFC 7677), as PostgreSQL's server expects it. Sans-IO.

PostgreSQL specifics (docs 55.3.1 "SCRAM-SHA-256 Authentication"):
* the user name in client-first-message is ignored by the server; libpq sends ``n=``;
* the password is normalised with SASLprep (RFC 4013) when that succeeds, else used raw;
* channel binding type ``tls-server-end-point`` (RFC 5929) for SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import ScramError

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"

#: Bounds on what a (possibly hostile) server may make us do.
#: PostgreSQL's default scram_iterations is 4096; PBKDF2's cost is linear in the count
#: (10^6 took 0.57 s of CPU), so a server -- or whoever answers in its place -- choosing a
#: huge count makes each login that expensive. The default cap is 100000 (about 60 ms).
DEFAULT_MAX_ITERATIONS = 100_000
#: The highest cap a configuration may set.
MAX_ITERATIONS = 10_000_000
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


@dataclass(frozen=True, slots=True)
class KeyDerivation:
    """The PBKDF2 a SCRAM exchange needs (RFC 5802 section 3, SaltedPassword): a pure
    function of its fields, safe to run in a worker thread (hashlib releases the GIL)."""

    password: bytes = field(repr=False)
    salt: bytes
    iterations: int

    def derive(self) -> tuple[bytes, bytes]:
        """(ClientKey, ServerKey)."""
        salted = hashlib.pbkdf2_hmac("sha256", self.password, self.salt, self.iterations)
        return (
            hmac.digest(salted, b"Client Key", "sha256"),
            hmac.digest(salted, b"Server Key", "sha256"),
        )


class SaltedKeyCache:
    """(ClientKey, ServerKey) by password, salt and iteration count, bounded (LRU).

    PBKDF2 dominates the cost of a login; the proxy logs in with the same password for every
    session of a role, so the result is kept (the salt and count change only when the role's
    password is reset). The keys are HMAC(a random per-process key, password), salt, count:
    the cache never holds the password, nor a hash of it that could be attacked offline
    without that key. Used from the event loop's thread only.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._secret = secrets.token_bytes(32)
        self._entries: OrderedDict[tuple[bytes, bytes, int], tuple[bytes, bytes]] = OrderedDict()

    def _key(self, derivation: KeyDerivation) -> tuple[bytes, bytes, int]:
        tag = hmac.digest(self._secret, derivation.password, "sha256")
        return (tag, derivation.salt, derivation.iterations)

    def get(self, derivation: KeyDerivation) -> tuple[bytes, bytes] | None:
        key = self._key(derivation)
        keys = self._entries.get(key)
        if keys is not None:
            self._entries.move_to_end(key)
        return keys

    def put(self, derivation: KeyDerivation, keys: tuple[bytes, bytes]) -> None:
        self._entries[self._key(derivation)] = keys
        self._entries.move_to_end(self._key(derivation))
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


#: The process's cache (one event loop per process).
SALTED_KEYS = SaltedKeyCache()


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
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
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
        self._max_iterations = max_iterations
        self._server_first: tuple[str, str] | None = None  # (server-first, nonce)
        self.done = False

    @property
    def mechanism(self) -> str:
        return MECHANISM_PLUS if self._channel_binding is not None else MECHANISM

    def client_first_message(self) -> bytes:
        return (self._gs2_header + self._client_first_bare).encode("ascii")

    def handle_server_first(self, data: bytes) -> bytes:
        """Check server-first-message; return client-final-message (PBKDF2 inline, cached:
        see :meth:`receive_server_first` to run it elsewhere)."""
        derivation = self.receive_server_first(data)
        keys = SALTED_KEYS.get(derivation)
        if keys is None:
            keys = derivation.derive()
            SALTED_KEYS.put(derivation, keys)
        return self.client_final_message(keys)

    def receive_server_first(self, data: bytes) -> KeyDerivation:
        """Check server-first-message; return the PBKDF2 to run before
        :meth:`client_final_message` (look it up in :data:`SALTED_KEYS` first)."""
        if self._server_first is not None:
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
        if not iterations_text.isdigit() or len(iterations_text) > 10:
            raise ScramError("iteration count out of range")
        iterations = int(iterations_text)
        if not 1 <= iterations <= self._max_iterations:
            raise ScramError(
                f"iteration count {iterations} out of range (at most {self._max_iterations})"
            )
        self._server_first = (server_first, nonce)
        return KeyDerivation(self._password, salt, iterations)

    def client_final_message(self, keys: tuple[bytes, bytes]) -> bytes:
        """client-final-message, from the (ClientKey, ServerKey) of the derivation."""
        if self._server_first is None or self._expected_server_signature is not None:
            raise ScramError("client-final-message out of order")
        server_first, nonce = self._server_first
        client_key, server_key = keys
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
