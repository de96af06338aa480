"""The console script's helper commands: keygen, token, and parse_duration."""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import jwt
import pytest

from jwtpgproxy.auth.tokens import TokenPolicy, TokenVerifier, load_verification_key
from jwtpgproxy.errors import ConfigError
from jwtpgproxy.ops.cli import main, parse_duration

EXPECTED_ALGORITHMS = {"ed25519": "EdDSA", "rsa": "RS256", "ec-p256": "ES256"}


@pytest.fixture(scope="module")
def keypairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """One key pair per --type, written by the keygen command itself."""
    directory = tmp_path_factory.mktemp("keys")
    pairs = {}
    for key_type in EXPECTED_ALGORITHMS:
        private = directory / f"{key_type}.key"
        public = directory / f"{key_type}.pub"
        assert (
            main(
                [
                    "keygen",
                    "--type",
                    key_type,
                    "--private-key",
                    str(private),
                    "--public-key",
                    str(public),
                ]
            )
            == 0
        )
        pairs[key_type] = (private, public)
    return pairs


def mint(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["token", *args]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.parametrize("key_type", list(EXPECTED_ALGORITHMS))
def test_keygen_files(keypairs: dict[str, tuple[Path, Path]], key_type: str) -> None:
    private, public = keypairs[key_type]
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    # The private key is written owner-only.
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_verification_key(public.read_text(), name="PUBLIC_KEYS__0")
    assert EXPECTED_ALGORITHMS[key_type] in key.algorithms


def test_keygen_rsa_is_at_least_2048_bits(keypairs: dict[str, tuple[Path, Path]]) -> None:
    key = load_verification_key(keypairs["rsa"][1].read_text(), name="k")
    assert key.key.key_size >= 2048  # type: ignore[union-attr]


def test_keygen_default_type(tmp_path: Path) -> None:
    private, public = tmp_path / "k", tmp_path / "k.pub"
    assert main(["keygen", "--private-key", str(private), "--public-key", str(public)]) == 0
    assert load_verification_key(public.read_text(), name="k").algorithms == {"EdDSA"}


@pytest.mark.parametrize("key_type", list(EXPECTED_ALGORITHMS))
def test_token_verifies(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str], key_type: str
) -> None:
    private, public = keypairs[key_type]
    before = int(time.time())
    token = mint(
        capsys, "--key", str(private), "--sub", "alice", "--ttl", "15m", "--claim", 'roles=["a"]'
    )
    after = int(time.time())
    verifier = TokenVerifier(
        [load_verification_key(public.read_text(), name="PUBLIC_KEYS__0")], TokenPolicy()
    )
    identity = verifier.verify(token, "alice")
    assert identity.role == "alice"
    assert identity.algorithm == EXPECTED_ALGORITHMS[key_type]
    assert identity.claims["roles"] == ["a"]
    assert before <= identity.claims["iat"] <= after
    assert identity.claims["exp"] - identity.claims["iat"] == 900
    # 15 minutes from now it has expired (beyond the 10 s leeway).
    with pytest.raises(Exception, match="expired"):
        verifier.verify(token, "alice", now=after + 900 + 11)


def test_token_kid_alg_and_claims(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keypairs["rsa"]
    token = mint(
        capsys,
        "--key", str(private),
        "--sub", "bob",
        "--ttl", "90",
        "--alg", "PS256",
        "--kid", "key-1",
        "--claim", "n=5",
        "--claim", "text=not json",
        "--claim", "eq=a=b",
    )  # fmt: skip
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "PS256"
    assert header["kid"] == "key-1"
    key = load_verification_key(public.read_text(), name="k", kid="key-1")
    identity = TokenVerifier([key], TokenPolicy()).verify(token, "bob")
    assert identity.claims["n"] == 5
    assert identity.claims["text"] == "not json"
    assert identity.claims["eq"] == "a=b"
    assert identity.claims["exp"] - identity.claims["iat"] == 90


@pytest.mark.parametrize("claim", ["novalue", "=x"])
def test_token_bad_claim(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str], claim: str
) -> None:
    capsys.readouterr()
    code = main(["token", "--key", str(keypairs["ed25519"][0]), "--sub", "a", "--claim", claim])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "--claim" in captured.err


def test_token_bad_ttl(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code = main(["token", "--key", str(keypairs["ed25519"][0]), "--sub", "a", "--ttl", "1w"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "--ttl" in captured.err


def test_token_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["token", "--key", str(tmp_path / "missing.pem"), "--sub", "a"])
    captured = capsys.readouterr()
    assert code == 2
    assert "--key" in captured.err
    assert captured.out == ""


def test_token_with_public_key_refused(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["token", "--key", str(keypairs["ed25519"][1]), "--sub", "a"]) == 2
    assert "--key" in capsys.readouterr().err


def test_token_default_ttl_is_one_hour(
    keypairs: dict[str, tuple[Path, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    token = mint(capsys, "--key", str(keypairs["ed25519"][0]), "--sub", "alice")
    payload = json.loads(jwt.api_jws.base64url_decode(token.split(".")[1]))
    assert payload["exp"] - payload["iat"] == 3600
    assert payload["sub"] == "alice"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172800),
        ("0", 0),
        (" 5m ", 300),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-5", "1.5h", "h", "5 m", "5mm", "1h30m", "1H"])
def test_parse_duration_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--ttl:"):
        parse_duration(text)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_applies_on_glibc() -> None:
    """The daemon limits glibc to two malloc arenas (see tune_malloc)."""
    from jwtpgproxy.ops.cli import tune_malloc

    assert tune_malloc() is True
