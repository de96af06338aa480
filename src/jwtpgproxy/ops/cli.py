"""The ``jwt-postgresql-proxy`` console script.

* no arguments (or ``serve``): run the proxy daemon, configured by environment variables;
* ``keygen``: write a new signing key pair (for issuers and the quick start);
* ``token``: mint a token with a private key (for issuers, tests and the quick start).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..auth.policy import is_numeric_date
from ..auth.tokens import EC_CURVE_ALGORITHMS, Identity
from ..errors import ConfigError, TokenRejected

PROG = "jwt-postgresql-proxy"
T = TypeVar("T")
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    try:
        if command == "serve":
            return _serve()
        if command == "_worker":
            return _serve(args)
        if command == "keygen":
            return _keygen(args)
        if command == "verify":
            return _verify(args)
        return _token(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the proxy (the default); configured by env vars")
    worker = sub.add_parser("_worker")  # internal: one of WORKERS processes
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--control-dir", required=True)

    keygen = sub.add_parser("keygen", help="write a new signing key pair (PEM)")
    keygen.add_argument("--type", choices=["ed25519", "rsa", "ec-p256"], default="ed25519")
    keygen.add_argument("--private-key", type=Path, required=True, help="private key path")
    keygen.add_argument("--public-key", type=Path, required=True, help="public key path")

    token = sub.add_parser("token", help="mint a token signed with a private key")
    token.add_argument("--key", type=Path, required=True, help="PEM private key")
    token.add_argument("--sub", required=True, help="database role (the token's subject)")
    token.add_argument("--ttl", default="1h", help="lifetime: 90, 90s, 15m, 1h, 2d")
    token.add_argument("--alg", help="signing algorithm (default: by key type)")
    token.add_argument("--kid", help="key id header")
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra claim; VALUE is parsed as JSON when it is valid JSON (repeatable)",
    )
    verify = sub.add_parser(
        "verify",
        help="check a token against the current configuration (the daemon's env vars) "
        "and say which rule passes or fails",
    )
    verify.add_argument("token", nargs="?", default="-", help="the token, or - for stdin")
    verify.add_argument("--user", help="startup user (default: the token's role claim)")
    verify.add_argument("--database", help="startup database (default: the user)")
    return parser


def tune_malloc() -> bool:
    """At most two glibc malloc arenas (as MALLOC_ARENA_MAX=2); True if applied.

    The event loop allocates on one thread; PBKDF2 and DNS run on a few helper threads,
    each of which would otherwise get an arena of its own that is rarely given back.
    glibc's mmap threshold is left alone: fixing it (64 KiB was tried against heap growth
    under churn) also switches off its dynamic adjustment, and every read of 64 KiB or more
    then cost an mmap and a munmap -- 4 243 of each and 2.2x the CPU for 600 MB of COPY
    through the proxy. The growth under churn came from reference cycles, gone since.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_arena_max = -8  # from glibc's <malloc.h>
        return bool(libc.mallopt(m_arena_max, 2))
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune


def _serve(worker_args: argparse.Namespace | None = None) -> int:
    """The daemon: one process, or (WORKERS > 1) a supervisor of worker processes."""
    tune_malloc()
    from ..logs import configure
    from .config import load_settings
    from .daemon import serve, supervise
    from .workers import WorkerInfo

    settings = load_settings()
    worker = None
    if worker_args is not None:
        worker = WorkerInfo(worker_args.index, worker_args.count, worker_args.control_dir)
    configure(settings.log_level, settings.log_format.value, worker.index if worker else None)
    if worker is None and settings.workers > 1:
        return _run(supervise(settings))
    _run(serve(settings, worker))
    return 0


def _run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main)
    return uvloop.run(main)


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if args.type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif args.type == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(args.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    args.public_key.write_bytes(public_pem)
    print(f"wrote {args.private_key} (keep secret) and {args.public_key}", file=sys.stderr)
    return 0


def _describe_time(value: object, now: float) -> str:
    if not is_numeric_date(value):
        return repr(value)
    when = datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="seconds")
    delta = value - now
    relative = f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"
    return f"{value} ({when}, {relative})"


def _unverified_part(token: str, index: int) -> object:
    """Decode a JWS segment for display only (nothing is trusted from it)."""
    try:
        segment = token.split(".")[index]
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _verify(args: argparse.Namespace) -> int:
    from .config import open_runtime

    token = sys.stdin.read().strip() if args.token == "-" else args.token.strip()  # noqa: S105

    async def check() -> tuple[list[str], Identity | TokenRejected]:
        async with open_runtime() as configured:
            verifier = configured.runtime.verifier
            names = [key.name for key in verifier.all_keys()]
            claims = _unverified_part(token, 1)
            user = args.user
            role_claim = verifier.claim_policy.role_claim
            if (
                user is None
                and isinstance(claims, dict)
                and isinstance(claims.get(role_claim), str)
            ):
                user = claims[role_claim]
            try:
                return names, await verifier.verify_async(
                    token, user or "", database=args.database or user
                )
            except TokenRejected as exc:
                return names, exc

    names, result = asyncio.run(check())
    now = time.time()
    header, claims = _unverified_part(token, 0), _unverified_part(token, 1)
    print(f"token: {len(token)} characters (not shown)")
    print(f"header: {json.dumps(header) if header is not None else 'not decodable'}")
    if isinstance(claims, dict):
        for name, value in claims.items():
            shown = (
                _describe_time(value, now) if name in ("exp", "nbf", "iat") else json.dumps(value)
            )
            print(f"claim {name}: {shown}")
    else:
        print("claims: not decodable")
    print(f"keys configured: {', '.join(names) or 'none'}")
    if isinstance(result, TokenRejected):
        print(f"REJECTED: rule {result.code}: {result.detail}")
        return 1
    print(
        f"ACCEPTED: role={result.role} key={result.key_name} alg={result.algorithm} "
        f"read_only={'yes' if result.read_only else 'no'} "
        f"expires {_describe_time(result.expires_at, now)}"
    )
    return 0


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"--ttl: {text!r} is not a duration like 90, 15m, 1h or 2d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _token(args: argparse.Namespace) -> int:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(args.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--key: cannot load PEM private key {args.key}: {exc}") from None
    algorithm = args.alg
    if algorithm is None:
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
            algorithm = "EdDSA"
        elif isinstance(key, rsa.RSAPrivateKey):
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = EC_CURVE_ALGORITHMS.get(key.curve.name, "ES256")
        else:
            raise ConfigError(f"--key: unsupported key type {type(key).__name__}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + parse_duration(args.ttl)}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--claim: expected NAME=VALUE, got {item!r}")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value
    headers = {"kid": args.kid} if args.kid else None
    print(jwt.encode(claims, key, algorithm=algorithm, headers=headers))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
