#!/usr/bin/env python3
"""Opt-in fuzzer for every sans-IO parser (not collected by pytest: no test_ prefix).

    .venv/bin/python tests/fuzz/fuzz_parsers.py --inputs 100000 [--seed 1] [--only tokens]

For each parser, ``--inputs`` generated inputs: mutations of valid messages (bit flips, byte
replacements, insertions, deletions, duplicated ranges, splices of two seeds, length words set
to interesting values, truncation; for tokens also JSON-level mutations: deep nesting, escapes,
lone surrogates, duplicate members, huge numbers) and purely random bytes. An input passes if
the parser returns or raises the project's own error for it:

    wire_untyped  MessageBuffer.read_untyped + decode_initial_packet      -> WireError
    wire_typed    MessageBuffer.read_typed + every backend/frontend decoder -> WireError
    frontend      FrontendHandshake (every DOWNSTREAM__SSLMODE, random chunking) -> ProxyError
    login         UpstreamLogin (SCRAM/MD5/cleartext/trust transcripts)    -> ProxyError
    scram         ScramSha256Client server-first / server-final            -> ScramError
    tokens        TokenVerifier.verify (with and without key ids)         -> TokenRejected

Any other exception is reported with a minimised reproducer (hex), and the exit status is 1.
Deterministic for a given --seed. SCRAM's iteration cap is lowered to 10 000 while fuzzing
so that a mutated count costs milliseconds, not seconds (it is a cost bound, not parsing).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import itertools

from cryptography.hazmat.primitives.asymmetric import ed25519

from jwtpgproxy.auth.tokens import TokenPolicy, TokenVerifier, VerificationKey, algorithms_for_key
from jwtpgproxy.errors import ProxyError, ScramError, TokenRejected
from jwtpgproxy.protocol import frontend, login, scram, wire
from jwtpgproxy.protocol.scram import ScramSha256Client

INTERESTING_INT32 = [
    0,
    1,
    3,
    4,
    5,
    7,
    8,
    9,
    16,
    255,
    256,
    10000,
    10001,
    65536,
    65537,
    0x7FFFFFFF,
    -1,
    -(2**31),
    80877103,
    80877104,
    80877102,
    196608,
    196610,
]

# --- seeds -----------------------------------------------------------------------------------

CLIENT_NONCE = "fuzzclientnonce0000000000"
PASSWORD = "fuzz-password"


def _scram_server_first() -> bytes:
    return f"r={CLIENT_NONCE}srv,s={base64.b64encode(b'saltsalt').decode()},i=4096".encode()


def _after_auth() -> bytes:
    return (
        wire.authentication(wire.AUTH_OK)
        + wire.typed_message(b"S", b"server_version\x0016.0\x00")
        + wire.typed_message(b"N", b"SNOTICE\x00C00000\x00Mhi\x00\x00")
        + wire.backend_key_data(42, b"\1\2\3\4")
        + wire.typed_message(b"Z", b"I")
    )


UNTYPED_SEEDS = [
    wire.ssl_request(),
    struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE),
    wire.cancel_request(1234, b"\1\2\3\4"),
    wire.cancel_request(1234, bytes(range(32))),
    wire.startup_message({"user": "alice", "database": "db", "application_name": "x"}),
    wire.startup_message({"user": "alice", "_pq_.opt": "1"}, version=(3 << 16) | 2),
    wire.startup_message({"user": "u"}, version=2 << 16),
]
TYPED_SEEDS = [
    wire.password_message(b"eyJhbGciOiJFZERTQSJ9.e30.sig"),
    wire.error_response({"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "no"}),
    wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"),
    wire.authentication(wire.AUTH_MD5_PASSWORD, b"salt"),
    wire.typed_message(b"S", b"client_encoding\0UTF8\0"),
    wire.backend_key_data(1, b"\1\2\3\4"),
    wire.negotiate_protocol_version(0, ["_pq_.x"]),
    wire.typed_message(b"Z", b"I"),
]
LOGIN_SEEDS = [
    wire.authentication(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    + wire.authentication(wire.AUTH_SASL_CONTINUE, _scram_server_first())
    + wire.authentication(wire.AUTH_SASL_FINAL, b"v=" + base64.b64encode(bytes(32)))
    + _after_auth(),
    wire.authentication(wire.AUTH_MD5_PASSWORD, b"salt") + _after_auth(),
    wire.authentication(wire.AUTH_CLEARTEXT_PASSWORD) + _after_auth(),
    wire.typed_message(b"v", struct.pack("!Ii", 3 << 16, 0)) + _after_auth(),
    wire.typed_message(b"E", b"SFATAL\0C3D000\0Mno db\0\0"),
]
FRONTEND_SEEDS = [
    wire.ssl_request(),
    wire.ssl_request()
    + wire.startup_message({"user": "alice", "database": "db"})
    + wire.password_message(b"tok.en.sig"),
    wire.startup_message({"user": "alice", "replication": "database"}),
    struct.pack("!iI", 8, wire.GSSENC_REQUEST_CODE) + wire.ssl_request(),
    wire.cancel_request(7, b"\1\2\3\4"),
    wire.startup_message({"user": "a", "_pq_.x": "y"}, version=(3 << 16) | 7)
    + wire.password_message(b"x"),
]
SCRAM_SEEDS = [_scram_server_first(), b"v=" + base64.b64encode(bytes(32)), b"e=invalid-proof"]

KEY = ed25519.Ed25519PrivateKey.generate()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(header: dict[str, object], claims: dict[str, object]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(KEY.sign(signing_input.encode()))}"


NOW = 1_700_000_000.0
TOKEN_SEEDS = [
    _token({"alg": "EdDSA", "typ": "JWT"}, {"sub": "alice", "exp": NOW + 100}),
    _token({"alg": "EdDSA", "kid": "k1"}, {"sub": "alice", "exp": NOW + 100, "iat": NOW}),
    _token({"alg": "EdDSA"}, {"sub": "alice", "exp": NOW + 100, "nbf": NOW, "jti": "x"}),
]
VERIFIERS = [
    TokenVerifier(
        [VerificationKey("k", KEY.public_key(), algorithms_for_key(KEY.public_key(), "k"))],
        TokenPolicy(max_token_length=8192),
    ),
    TokenVerifier(
        [VerificationKey("k", KEY.public_key(), algorithms_for_key(KEY.public_key(), "k"), "k1")],
        TokenPolicy(max_token_length=8192),
    ),
]

# --- mutation --------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 6))):
        op = rng.randrange(9)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # replace a byte
            buf[rng.randrange(len(buf))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.choice((1, 1, 2, 4, 16, 300)))
        elif op == 3 and buf:  # delete a range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.choice((1, 1, 2, 4, 16))]
        elif op == 4 and buf:  # duplicate a range
            i = rng.randrange(len(buf))
            j = min(len(buf), i + rng.choice((1, 4, 8, 64)))
            buf[j:j] = buf[i:j] * rng.choice((1, 2, 10))
        elif op == 5:  # splice with another seed
            other = rng.choice(seeds)
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
        elif op == 6 and len(buf) >= 4:  # overwrite an int32 (length word or code)
            i = rng.randrange(len(buf) - 3)
            buf[i : i + 4] = struct.pack("!i", rng.choice(INTERESTING_INT32))
        elif op == 7 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 8:  # append another whole seed
            buf += rng.choice(seeds)
    return bytes(buf)


def generate(rng: random.Random, seeds: list[bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.15:
        return rng.randbytes(rng.randrange(0, 200))
    if roll < 0.2:
        return rng.choice(seeds)
    return mutate(rng, rng.choice(seeds), seeds)


JSON_TRICKS = [
    '"\\ud800"',
    '"\\udc80"',
    '"\\u0000"',
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "9" * 400,
    "1" * 5000,
    "[" * 3000 + "]" * 3000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    "true",
    "null",
    "[]",
    "{}",
    '"a"',
    "-0",
    "1.0e-400",
    '"\\uD834\\uDD1E"',
]


def generate_token(rng: random.Random) -> str:
    roll = rng.random()
    seed = rng.choice(TOKEN_SEEDS)
    if roll < 0.1:
        return rng.randbytes(rng.randrange(0, 120)).decode("latin-1")
    if roll < 0.45:  # JSON-level: replace a value or duplicate a member, keep the signature
        header_b64, payload_b64, signature = seed.split(".")
        which = rng.randrange(2)
        segment = (header_b64, payload_b64)[which]
        text = base64.urlsafe_b64decode(segment + "==").decode()
        obj = json.loads(text)
        key = rng.choice([*obj.keys(), "kid", "crit", "typ", "x"])
        trick = rng.choice(JSON_TRICKS)
        if rng.random() < 0.3:
            new = text[:-1] + f',"{key}":{trick}}}'  # duplicate or new member, raw
        else:
            parts = [f'"{k}":{json.dumps(v) if k != key else trick}' for k, v in obj.items()]
            if key not in obj:
                parts.append(f'"{key}":{trick}')
            new = "{" + ",".join(parts) + "}"
        encoded = _b64(new.encode("utf-8", "surrogatepass"))
        segments = [header_b64, payload_b64, signature]
        segments[which] = encoded
        return ".".join(segments)
    raw = mutate(rng, seed.encode(), [s.encode() for s in TOKEN_SEEDS])
    return raw.decode(rng.choice(("latin-1", "utf-8")), errors="replace")


# --- targets ---------------------------------------------------------------------------------


def run_untyped(data: bytes) -> None:
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    with suppress(wire.WireError):
        while (body := buffer.read_untyped(wire.MAX_STARTUP_PACKET_LENGTH)) is not None:
            assert len(body) + 4 <= wire.MAX_STARTUP_PACKET_LENGTH
            with suppress(wire.WireError):
                wire.decode_initial_packet(body)


DECODERS: list[Callable[[bytes], object]] = [
    wire.decode_password_message,
    wire.decode_fields,
    wire.decode_authentication,
    wire.decode_sasl_mechanisms,
    wire.decode_parameter_status,
    wire.decode_negotiate_protocol_version,
    wire.decode_backend_key_data,
    lambda b: wire.decode_startup_message(wire.PROTOCOL_3_0, b),
]


def run_typed(data: bytes) -> None:
    buffer = wire.MessageBuffer()
    buffer.feed(data)
    with suppress(wire.WireError):
        while (message := buffer.read_typed(65536)) is not None:
            for decode in DECODERS:
                with suppress(wire.WireError):
                    decode(message.body)
                with suppress(wire.WireError):
                    decode(message.body[4:])  # R messages: after the auth code


def _chunks(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def run_frontend(data: bytes) -> None:
    mode = list(frontend.DownstreamSSLMode)[len(data) % 3]
    machine = frontend.FrontendHandshake(mode, max_password_length=2048)
    active = (frontend.State.AWAIT_INITIAL, frontend.State.AWAIT_PASSWORD)
    with suppress(ProxyError):
        for chunk in _chunks(data, len(data)):
            machine.receive_data(chunk)
            while machine.state in active:
                event = machine.next_event()
                if isinstance(event, frontend.NeedData):
                    break
                if isinstance(event, frontend.StartTLS):
                    machine.tls_established()
        if machine.state is frontend.State.DONE:
            machine.leftover()


class _FixedNonceClient(ScramSha256Client):
    def __init__(self, password: str, **kwargs: object) -> None:
        super().__init__(password, client_nonce=CLIENT_NONCE, **kwargs)  # type: ignore[arg-type]


def run_login(data: bytes) -> None:
    machine = login.UpstreamLogin(
        user="alice", password=PASSWORD, parameters={"user": "alice"}, protocol_minor=2
    )
    with suppress(ProxyError):
        for chunk in _chunks(data, len(data)):
            machine.receive_data(chunk)
            while machine.phase not in (login.Phase.DONE, login.Phase.FAILED):
                event = machine.next_event()
                if isinstance(event, login.NeedData):
                    break
                if isinstance(event, login.DeriveKeys):  # the proxy runs it in a thread
                    machine.keys_derived(event.derivation.derive())


def run_scram(data: bytes) -> None:
    client = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    with suppress(ScramError):
        client.handle_server_first(data)
        client.handle_server_final(data)
    second = ScramSha256Client(PASSWORD, client_nonce=CLIENT_NONCE)
    second.handle_server_first(_scram_server_first())
    with suppress(ScramError):
        second.handle_server_final(data)


def run_token(token: str) -> None:
    for verifier in VERIFIERS:
        with suppress(TokenRejected):
            identity = verifier.verify(token, "alice", now=NOW)
            assert identity.role == "alice"


@dataclass
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: list[bytes]
    count: int = 0
    seconds: float = 0.0
    failures: dict[str, tuple[bytes, str]] = field(default_factory=dict)


def _token_bytes(token: str) -> bytes:
    return token.encode("utf-8", "surrogatepass")


def _run_token_bytes(data: bytes) -> None:
    run_token(data.decode("utf-8", "surrogatepass"))


TARGETS = [
    Target("wire_untyped", run_untyped, UNTYPED_SEEDS),
    Target("wire_typed", run_typed, TYPED_SEEDS),
    Target("frontend", run_frontend, FRONTEND_SEEDS),
    Target("login", run_login, LOGIN_SEEDS),
    Target("scram", run_scram, SCRAM_SEEDS),
    Target("tokens", _run_token_bytes, [_token_bytes(t) for t in TOKEN_SEEDS]),
]


def _signature(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"


def minimise(run: Callable[[bytes], None], data: bytes, signature: str) -> bytes:
    """Greedy delta debugging: drop chunks while the same failure (type and place) remains."""

    def fails(candidate: bytes) -> bool:
        try:
            run(candidate)
        except Exception as exc:
            return _signature(exc) == signature
        return False

    chunk = max(1, len(data) // 2)
    while chunk >= 1:
        i = 0
        while i < len(data):
            candidate = data[:i] + data[i + chunk :]
            if candidate != data and fails(candidate):
                data = candidate
            else:
                i += chunk
        chunk //= 2
    return data


def fuzz(target: Target, inputs: int, seed: int, deadline: float | None) -> None:
    rng = random.Random(f"{seed}:{target.name}")
    started = time.perf_counter()
    for _ in range(inputs):
        if target.name == "tokens":
            data = _token_bytes(generate_token(rng))
        else:
            data = generate(rng, target.seeds)
        target.count += 1
        try:
            target.run(data)
        except Exception as exc:
            signature = _signature(exc)
            if signature not in target.failures:
                small = minimise(target.run, data, signature)
                target.failures[signature] = (small, f"{type(exc).__name__}: {exc}"[:200])
        if deadline is not None and time.perf_counter() > deadline:
            break
    target.seconds = time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per parser")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", choices=[t.name for t in TARGETS])
    parser.add_argument("--max-seconds", type=float, help="stop each parser after this long")
    args = parser.parse_args(argv)
    scram.MAX_ITERATIONS = 10_000  # see the module docstring
    login.ScramSha256Client = _FixedNonceClient  # type: ignore[misc]  # seeds carry its nonce
    targets = [t for t in TARGETS if not args.only or t.name in args.only]
    print(f"fuzzing {len(targets)} parsers, {args.inputs} inputs each, seed {args.seed}")
    for target in targets:
        deadline = None if args.max_seconds is None else time.perf_counter() + args.max_seconds
        fuzz(target, args.inputs, args.seed, deadline)
        print(
            f"  {target.name:<13} {target.count:>8} inputs {target.seconds:7.1f}s "
            f"{target.count / max(target.seconds, 1e-9):9.0f}/s  "
            f"unexpected: {len(target.failures)}",
            flush=True,
        )
    failed = False
    for target in targets:
        for signature, (data, message) in target.failures.items():
            failed = True
            print(f"\nUNEXPECTED in {target.name}: {signature}\n  {message}")
            print(f"  minimised reproducer ({len(data)} bytes): {data.hex()}")
    total = sum(t.count for t in targets)
    print(
        f"\n{total} inputs, {sum(t.seconds for t in targets):.1f}s, "
        f"{'FAILURES' if failed else 'no unexpected exceptions'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
