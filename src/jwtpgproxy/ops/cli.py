"""The ``jwt-postgresql-proxy`` console script.

* no arguments (or ``serve``): run the proxy daemon, configured by environment variables;
* ``keygen``: write a new signing key pair (for issuers and the quick start);
* ``token``: mint a token with a private key (for issuers, tests and the quick start);
* ``pgpass``: keep a current token in a libpq password file (for psql and other tools);
* ``verify``: say whether the configured proxy would accept a token, and why.
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
from ..auth.tokens import Identity
from ..client import (
    KEYGEN_ALGORITHMS,
    CommandTokenSource,
    FileTokenSource,
    PrivateKeyTokenSource,
    TokenSource,
)
from ..errors import ConfigError, TokenRejected, TokenSourceError

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
        if command == "pgpass":
            return _pgpass(args)
        return _token(args)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    except TokenSourceError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the proxy (the default); configured by env vars")
    worker = sub.add_parser("_worker")  # internal: one of WORKERS processes
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--control-dir", required=True)

    keygen = sub.add_parser(
        "keygen",
        help="write a new signing key pair (PEM); never over an existing file or symlink",
    )
    keygen.add_argument(
        "--alg",
        choices=KEYGEN_ALGORITHMS,
        help="the JWS algorithm the key is for, as in `token --alg` (default: EdDSA)",
    )
    keygen.add_argument(
        "--out", type=Path, help="directory for private.pem (mode 0600) and public.pem"
    )
    keygen.add_argument("--type", choices=list(_OLD_KEY_TYPES), help="older form of --alg")
    keygen.add_argument("--private-key", type=Path, help="private key path (instead of --out)")
    keygen.add_argument("--public-key", type=Path, help="public key path (instead of --out)")
    keygen.add_argument(
        "--force", action="store_true", help="replace existing files (by rename, atomically)"
    )

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
    pgpass = sub.add_parser(
        "pgpass",
        help="write a current token into a libpq password file (for tools that read only "
        "the passfile); --watch keeps it current",
    )
    pgpass.add_argument(
        "--passfile",
        type=Path,
        help="default: $PGPASSFILE, else ~/.pgpass (other entries are kept)",
    )
    pgpass.add_argument("--host", help="entry's host (default: $PGHOST, else *)")
    pgpass.add_argument("--port", help="entry's port (default: $PGPORT, else *)")
    pgpass.add_argument("--dbname", help="entry's database (default: $PGDATABASE, else *)")
    pgpass.add_argument("--user", help="entry's user (default: $PGUSER)")
    source = pgpass.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", type=Path, help="PEM private key: mint tokens locally")
    source.add_argument("--token-file", type=Path, help="a token file kept fresh elsewhere")
    source.add_argument("--token-command", help="a command that prints a token")
    pgpass.add_argument("--sub", help="with --key: the token's subject (default: the user)")
    pgpass.add_argument("--ttl", default="15m", help="with --key: token lifetime (15m)")
    pgpass.add_argument("--alg", help="with --key: signing algorithm (default: by key type)")
    pgpass.add_argument("--kid", help="with --key: key id header")
    pgpass.add_argument(
        "--refresh-margin",
        type=float,
        help="seconds before exp to replace the token (default: a third of --ttl with "
        "--key, 60 with --token-command, 0 with --token-file)",
    )
    pgpass.add_argument("--watch", action="store_true", help="keep the entry current until stopped")
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


_OLD_KEY_TYPES = {"ed25519": "EdDSA", "rsa": "RS256", "ec-p256": "ES256"}


def _keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from ..client import generate_private_key

    if args.alg is not None and args.type is not None:
        raise ConfigError("--alg and --type name the same thing; give one")
    if args.out is not None:
        if args.private_key is not None or args.public_key is not None:
            raise ConfigError("--out writes private.pem and public.pem; leave out the paths")
        _make_private_dir(args.out)
        private_path, public_path = args.out / "private.pem", args.out / "public.pem"
    elif args.private_key is not None and args.public_key is not None:
        private_path, public_path = args.private_key, args.public_key
    else:
        raise ConfigError("keygen needs --out DIR, or both --private-key and --public-key")
    algorithm = args.alg or _OLD_KEY_TYPES[args.type or "ed25519"]
    if not args.force:
        for path in (private_path, public_path):
            if os.path.lexists(path):
                raise ConfigError(f"{path} exists; not overwritten (--force replaces it)")
    private = generate_private_key(algorithm)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_new_file(private_path, private_pem, 0o600, replace=args.force)
    try:
        write_new_file(public_path, public_pem, 0o644, replace=args.force)
    except BaseException:
        if not args.force:
            private_path.unlink(missing_ok=True)  # ours: created with O_EXCL just above
        raise
    print(
        f"wrote {private_path} (keep secret, mode 0600) and {public_path} for {algorithm}",
        file=sys.stderr,
    )
    return 0


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}", setting="--out") from None
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory", setting="--out")


def write_new_file(path: Path, data: bytes, mode: int, *, replace: bool = False) -> None:
    """Write ``data`` to a file that did not exist, with exactly ``mode``.

    ``O_EXCL`` refuses an existing file (whose mode would otherwise be kept, e.g. a private
    key left world-readable) and any symlink, dangling or not, which ``O_NOFOLLOW`` also
    refuses; ``fchmod`` sets the mode whatever the umask. With ``replace`` the data goes to
    a new file beside ``path`` that is then renamed over it: rename replaces a symlink
    itself, never its target, and readers never see a half-written file.
    """
    target = path
    if replace:
        target = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{path} exists; not overwritten (--force replaces it)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


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
    from ..client import load_private_key, mint_token

    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.key}: {exc.strerror}", setting="--key") from None
    key = load_private_key(pem, name="--key")
    claims: dict[str, Any] = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--claim: expected NAME=VALUE, got {item!r}")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value
    print(
        mint_token(
            key,
            args.sub,
            parse_duration(args.ttl),
            algorithm=args.alg,
            kid=args.kid,
            claims=claims,
        )
    )
    return 0


def _pgfield(value: str) -> str:
    """A libpq passfile field: ``:`` and ``\\`` are escaped with a backslash (libpq 34.16)."""
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _passfile_entry_key(line: str) -> list[str] | None:
    """The four escaped key fields of a passfile line (None for comments/short lines)."""
    if not line or line.startswith("#"):
        return None
    fields, current, escaped = [], "", False
    for char in line:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
            if len(fields) == 4:
                return fields
        else:
            current += char
    return None


def write_pgpass(passfile: Path, fields: Sequence[str], token: str) -> None:
    """Put ``host:port:dbname:user:token`` into ``passfile``: an entry with the same four
    fields is replaced, every other line kept; written to a new file (0600, which libpq
    requires) renamed over the old one, so a client never reads half a file."""
    key = [_pgfield(f) for f in fields]
    lines: list[str] = []
    try:
        with open(passfile, encoding="utf-8") as handle:
            lines = [
                line for line in handle.read().splitlines() if _passfile_entry_key(line) != key
            ]
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {passfile}: {exc.strerror}", setting="--passfile") from None
    lines.append(":".join([*key, _pgfield(token)]))
    write_new_file(passfile, ("\n".join(lines) + "\n").encode("utf-8"), 0o600, replace=True)


def _pgpass(args: argparse.Namespace) -> int:
    user = args.user or os.environ.get("PGUSER")
    if not user:
        raise ConfigError("--user (or PGUSER) is required: the entry's role")
    fields = [
        args.host or os.environ.get("PGHOST") or "*",
        args.port or os.environ.get("PGPORT") or "*",
        args.dbname or os.environ.get("PGDATABASE") or "*",
        user,
    ]
    passfile = args.passfile or Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    margin = args.refresh_margin
    source: TokenSource
    if args.key is not None:
        source = PrivateKeyTokenSource(
            args.key,
            args.sub or user,
            ttl=parse_duration(args.ttl),
            refresh_margin=margin,
            algorithm=args.alg,
            kid=args.kid,
        )
    elif args.token_file is not None:
        source = FileTokenSource(args.token_file, refresh_margin=margin or 0)
    else:
        source = CommandTokenSource(
            args.token_command, refresh_margin=60 if margin is None else margin
        )
    try:
        return _pgpass_loop(args, source, passfile, fields)
    except KeyboardInterrupt:
        return 130


def _pgpass_loop(
    args: argparse.Namespace, source: TokenSource, passfile: Path, fields: list[str]
) -> int:
    written: str | None = None
    failures = 0
    while True:
        try:
            token = source.token()
            if token != written:
                write_pgpass(passfile, fields, token)
                written = token
            failures = 0
        except (TokenSourceError, ConfigError) as exc:
            if not args.watch:
                raise
            failures += 1
            delay = min(2.0 ** (failures - 1), 30.0)
            print(f"{PROG}: pgpass: {exc}; retrying in {delay:g}s", file=sys.stderr)
            time.sleep(delay)
            continue
        if not args.watch:
            print(f"wrote the entry for {':'.join(fields)} to {passfile}", file=sys.stderr)
            return 0
        # Wake when the token is due for replacement; a token file is polled every second
        # (its writer decides when it changes).
        cap = 1.0 if isinstance(source, FileTokenSource) else 30.0
        time.sleep(min(max(source.valid_until - time.time(), 0.2), cap))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
