"""Client-side token sources (jwtpgproxy.client) and the pgpass helper."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from jwtpgproxy import client
from jwtpgproxy.auth.tokens import TokenPolicy, TokenVerifier, load_verification_key
from jwtpgproxy.client import (
    CommandTokenSource,
    FileTokenSource,
    PrivateKeyTokenSource,
    StaticTokenSource,
    TokenSourceError,
    mint_token,
    token_source_from_env,
    unverified_expiry,
)
from jwtpgproxy.errors import ConfigError
from jwtpgproxy.ops.cli import main, write_pgpass

KEY = ed25519.Ed25519PrivateKey.generate()


def token(ttl: float = 300, sub: str = "alice", now: float | None = None) -> str:
    return mint_token(KEY, sub, ttl, now=now)


class Clock:
    """Replaces time.time in jwtpgproxy.client so that expiry is tested without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.time()
        monkeypatch.setattr(client.time, "time", lambda: self.now)


def test_import_without_server_dependencies() -> None:
    code = (
        "import sys, jwtpgproxy.client\n"
        "bad = [m for m in ('uvloop', 'pydantic', 'pydantic_settings', 'prometheus_client',"
        " 'jwtpgproxy.ops.config', 'jwtpgproxy.proxy') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""


def test_mint_token_and_unverified_expiry() -> None:
    public = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    t = mint_token(KEY, "bob", 90, kid="k1", claims={"scope": "db"}, now=1000.7)
    claims = jwt.decode(t, options={"verify_signature": False})
    assert claims == {"sub": "bob", "iat": 1000, "exp": 1090, "scope": "db"}
    assert jwt.get_unverified_header(t) == {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}
    assert unverified_expiry(t) == 1090
    fresh = mint_token(KEY, "bob", 90)
    key = load_verification_key(public.decode(), name="k")
    assert TokenVerifier([key], TokenPolicy()).verify(fresh, "bob").role == "bob"
    for bad in ("", "a.b", "a.!!!.c", "x." + "e30" + ".y"):
        assert unverified_expiry(bad) is None


def test_file_source_rereads_only_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    first = token()
    path.write_text(first + "\n")
    source = FileTokenSource(path)
    assert source.token() == first
    assert source.token() == first
    assert source.fetches == 1  # unchanged file: served from memory
    second = token(sub="bob")
    path.write_text(second + "\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source.token() == second
    assert source.fetches == 2


def test_file_source_sees_kubernetes_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes projects a token as ..data -> ..<timestamp>/token, swapped atomically."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    a, b = token(sub="a"), token(sub="b")
    (tmp_path / "v1" / "token").write_text(a)
    (tmp_path / "v2" / "token").write_text(b)  # same size, maybe same mtime
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "token").symlink_to("..data/token")
    source = FileTokenSource(tmp_path / "token")
    assert source.token() == a
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert source.token() == b


def test_file_source_errors_name_the_file_and_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(TokenSourceError, match=rf"token file {path}: cannot read"):
        FileTokenSource(path).token()
    expired = token(ttl=10, now=time.time() - 60)
    path.write_text(expired)
    with pytest.raises(TokenSourceError) as info:
        FileTokenSource(path).token()
    assert str(path) in str(info.value)
    assert "expired" in str(info.value)
    assert expired not in str(info.value)
    assert expired.split(".")[1] not in repr(info.value)
    path.write_text("two\nlines\n")
    with pytest.raises(TokenSourceError, match="whitespace"):
        FileTokenSource(path).token()
    path.write_text("")
    with pytest.raises(TokenSourceError, match="empty"):
        FileTokenSource(path).token()


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "cmd.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def counting_command(tmp_path: Path, ttl: int = 300, delay: float = 0) -> list[str]:
    """A command that mints a token and counts its runs in tmp_path/runs."""
    pem = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(pem)
    return script(
        tmp_path,
        "import sys, time\n"
        "from pathlib import Path\n"
        "from jwtpgproxy.client import load_private_key, mint_token\n"
        f"d = Path({str(tmp_path)!r})\n"
        "with open(d / 'runs', 'a') as f: f.write('x')\n"
        f"time.sleep({delay})\n"
        "key = load_private_key((d / 'key.pem').read_bytes(), name='k')\n"
        f"print(mint_token(key, 'alice', {ttl}))\n",
    )


def runs(tmp_path: Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text()) if path.exists() else 0


def test_command_source_caches_until_margin_before_exp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    source = CommandTokenSource(counting_command(tmp_path, ttl=300), refresh_margin=60)
    first = source.token()
    assert source.token() == first
    assert runs(tmp_path) == 1
    assert source.expires_at == unverified_expiry(first)
    clock.now += 300 - 61  # still more than the margin left
    assert source.token() == first
    assert runs(tmp_path) == 1
    clock.now += 2  # within the margin: the command runs again
    source.token()
    assert runs(tmp_path) == 2


def test_command_source_without_exp_uses_cache_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    argv = script(
        tmp_path,
        f"open({str(tmp_path / 'runs')!r}, 'a').write('x'); print('opaque-access-token')\n",
    )
    source = CommandTokenSource(argv, cache_seconds=100)
    assert source.token() == "opaque-access-token"
    clock.now += 99
    source.token()
    assert runs(tmp_path) == 1
    clock.now += 2
    source.token()
    assert runs(tmp_path) == 2


def test_command_source_failure_names_command_and_redacts(tmp_path: Path) -> None:
    secret = token()
    argv = script(
        tmp_path,
        f"import sys\nprint({secret!r})\nprint('denied for', {secret!r}, file=sys.stderr)\n"
        "sys.exit(3)\n",
    )
    with pytest.raises(TokenSourceError) as info:
        CommandTokenSource(argv).token()
    text = str(info.value)
    assert text.startswith(f"token command {sys.executable!r}: exited with status 3")
    assert "denied for [token redacted]" in text
    assert secret not in text and secret.split(".")[1] not in text


def test_failed_refresh_keeps_an_unexpired_token_then_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Within the refresh margin a failing command does not break new connections while
    the token in hand is still valid; once it has expired, the failure is raised."""
    clock = Clock(monkeypatch)
    flag = tmp_path / "fail"
    argv = script(
        tmp_path,
        "import sys\nfrom pathlib import Path\n"
        f"if Path({str(flag)!r}).exists():\n"
        "    print('identity provider unavailable', file=sys.stderr); sys.exit(1)\n"
        f"print({token(ttl=100)!r})\n",
    )
    source = CommandTokenSource(argv, refresh_margin=60)
    start = clock.now
    first = source.token()
    flag.touch()
    clock.now += 50  # within the margin: a refresh is due, and fails
    with caplog.at_level("WARNING", logger="jwtpgproxy.client"):
        assert source.token() == first
    assert "identity provider unavailable" in caplog.text
    assert first not in caplog.text
    assert source.last_error is not None and "exited with status 1" in source.last_error
    clock.now += 1  # retried only after a few seconds
    assert source.token() == first
    clock.now += 50  # expired: no token to fall back on
    with pytest.raises(TokenSourceError, match="identity provider unavailable"):
        source.token()
    flag.unlink()
    clock.now = start + 1
    source.invalidate()
    assert source.token() == first  # the command works again
    assert source.last_error is None


def test_command_source_timeout_and_bad_output(tmp_path: Path) -> None:
    slow = script(tmp_path, "import time\ntime.sleep(30)\n")
    started = time.monotonic()
    with pytest.raises(TokenSourceError, match=r"did not finish within 0\.5s"):
        CommandTokenSource(slow, timeout=0.5).token()
    assert time.monotonic() - started < 10
    two = script(tmp_path, "print('a')\nprint('b')\n")
    with pytest.raises(TokenSourceError, match="printed 2 lines"):
        CommandTokenSource(two).token()
    with pytest.raises(TokenSourceError, match="cannot run"):
        CommandTokenSource([str(tmp_path / "missing")]).token()


def test_private_key_source_reuses_then_mints(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    source = PrivateKeyTokenSource(KEY, "alice", ttl=30)  # margin: a third, 10 s
    first = source.token()
    claims = jwt.decode(first, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 30
    assert claims["sub"] == "alice"
    clock.now += 19
    assert source.token() == first
    clock.now += 2
    assert source.token() != first
    assert source.fetches == 2


def test_private_key_source_from_path_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    ec_key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    t = PrivateKeyTokenSource(path, "bob", ttl=60, kid="x").token()
    assert jwt.get_unverified_header(t)["alg"] == "ES384"
    with pytest.raises(TokenSourceError, match=rf"private key {tmp_path / 'nope'}: cannot read"):
        PrivateKeyTokenSource(tmp_path / "nope", "bob")
    with pytest.raises(TokenSourceError, match=r"private key .*sub='bob'.*cannot sign"):
        PrivateKeyTokenSource(path, "bob", algorithm="RS256").token()
    with pytest.raises(ValueError, match="refresh_margin"):
        PrivateKeyTokenSource(path, "bob", ttl=10, refresh_margin=10)


def test_one_refresh_at_a_time_across_threads(tmp_path: Path) -> None:
    source = CommandTokenSource(counting_command(tmp_path, delay=0.3))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(source.token())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert len(set(results)) == 1
    assert runs(tmp_path) == 1


def test_token_async_refreshes_off_the_event_loop(tmp_path: Path) -> None:
    source = CommandTokenSource(counting_command(tmp_path, delay=0.5))

    async def scenario() -> tuple[str, str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        first = await source.token_async()
        second = await source.token_async()  # cached: no thread, no command
        task.cancel()
        return first, second, ticks

    first, second, ticks = asyncio.run(scenario())
    assert first == second
    assert runs(tmp_path) == 1
    assert ticks >= 10  # the loop kept running while the command ran


def test_invalidate_forces_a_new_token(tmp_path: Path) -> None:
    source = CommandTokenSource(counting_command(tmp_path))
    source.token()
    source.invalidate()
    source.token()
    assert runs(tmp_path) == 2


def test_repr_never_shows_the_token() -> None:
    source = StaticTokenSource(token())
    t = source.token()
    assert t not in repr(source)
    assert source() == t  # a plain callable, for drivers taking a password callable


def test_token_source_from_env(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    source = token_source_from_env(
        {"JWTPG_PRIVATE_KEY": str(path), "PGUSER": "carol", "JWTPG_TTL": "3"}
    )
    assert isinstance(source, PrivateKeyTokenSource)
    assert source.ttl == 3 and source.refresh_margin == 1
    assert jwt.decode(source.token(), options={"verify_signature": False})["sub"] == "carol"
    source = token_source_from_env({"JWTPG_TOKEN_FILE": "/x", "JWTPG_REFRESH_MARGIN": "5"})
    assert isinstance(source, FileTokenSource) and source.refresh_margin == 5
    source = token_source_from_env({"JWTPG_TOKEN_COMMAND": "gcloud auth print-identity-token"})
    assert isinstance(source, CommandTokenSource)
    assert source.argv == ["gcloud", "auth", "print-identity-token"]
    assert source.refresh_margin == 60
    with pytest.raises(ConfigError, match="exactly one"):
        token_source_from_env({})
    with pytest.raises(ConfigError, match="exactly one"):
        token_source_from_env({"JWTPG_TOKEN": "a", "JWTPG_TOKEN_FILE": "b"})
    with pytest.raises(ConfigError, match="JWTPG_SUB"):
        token_source_from_env({"JWTPG_PRIVATE_KEY": str(path)})


# --- pgpass ---------------------------------------------------------------------------------


def test_write_pgpass_replaces_own_entry_keeps_others(tmp_path: Path) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text("# comment\nother:5432:*:bob:secret\nh:6432:db:alice:old\n")
    passfile.chmod(0o644)
    write_pgpass(passfile, ["h", "6432", "db", "alice"], "new1")
    write_pgpass(passfile, ["h", "6432", "db", "alice"], "new2")
    write_pgpass(passfile, ["::1", "6432", "*", "alice"], "v6")
    assert passfile.read_text().splitlines() == [
        "# comment",
        "other:5432:*:bob:secret",
        "h:6432:db:alice:new2",
        "\\:\\:1:6432:*:alice:v6",
    ]
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600


def test_pgpass_command_writes_a_working_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = tmp_path / "keys"
    assert main(["keygen", "--alg", "ES256", "--out", str(key_dir)]) == 0
    passfile = tmp_path / "pgpass"
    argv = ["pgpass", "--passfile", str(passfile), "--host", "db.example", "--port", "6432"]
    argv += ["--dbname", "app", "--user", "alice", "--key", str(key_dir / "private.pem")]
    assert main([*argv, "--ttl", "2m"]) == 0
    fields = passfile.read_text().strip().split(":")
    assert fields[:4] == ["db.example", "6432", "app", "alice"]
    public = load_verification_key((key_dir / "public.pem").read_text(), name="k")
    identity = TokenVerifier([public], TokenPolicy()).verify(fields[4], "alice")
    assert identity.expires_at - identity.claims["iat"] == 120
    assert fields[4] not in capsys.readouterr().err
    # A failing source: an error naming it, exit status 1, the passfile unchanged.
    before = passfile.read_text()
    bad = [*argv[:-2], "--token-file", str(tmp_path / "missing")]
    assert main(bad) == 1
    assert "token file" in capsys.readouterr().err
    assert passfile.read_text() == before


def test_pgpass_watch_replaces_tokens(tmp_path: Path) -> None:
    """--watch keeps the entry current: with 3 s tokens the entry changes within seconds."""
    key_dir = tmp_path / "keys"
    assert main(["keygen", "--out", str(key_dir)]) == 0
    passfile = tmp_path / "pgpass"
    process = subprocess.Popen(
        [sys.executable, "-m", "jwtpgproxy.ops.cli", "pgpass", "--watch", "--passfile",
         str(passfile), "--user", "alice", "--key", str(key_dir / "private.pem"),
         "--ttl", "3", "--refresh-margin", "2"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 15
        while len(seen) < 3 and time.monotonic() < deadline:
            if passfile.exists():
                seen.add(passfile.read_text())
            time.sleep(0.1)
        assert len(seen) >= 3
        for text in seen:
            assert unverified_expiry(text.strip().split(":")[4]) is not None
    finally:
        process.terminate()
        process.wait(10)
