"""Configuration: environment -> Settings -> Runtime, with one-line errors naming the variable."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from harness import write_self_signed

from jwtpgproxy.errors import ConfigError
from jwtpgproxy.ops.config import (
    Settings,
    UpstreamSettings,
    build_runtime,
    load_settings,
    upstream_ssl_context,
)
from jwtpgproxy.protocol.frontend import DownstreamSSLMode
from jwtpgproxy.protocol.login import ChannelBindingPolicy
from jwtpgproxy.proxy.upstream import UpstreamSSLMode

PASSWORD = "Upstream-Pa55word-never-shown"
_PREFIXES = ("UPSTREAM", "DOWNSTREAM", "PUBLIC_KEYS", "PUBLIC_KEY_IDS", "TOKEN")
_TOP_LEVEL = {"AUTHENTICATION_TIMEOUT", "SHUTDOWN_TIMEOUT", "LOG_LEVEL"}


def _pem(private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


KEY_A = ed25519.Ed25519PrivateKey.generate()
KEY_B = ed25519.Ed25519PrivateKey.generate()
KEY_C = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean environment with the minimal valid configuration."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(_PREFIXES) or upper in _TOP_LEVEL:
            monkeypatch.delenv(name)
    monkeypatch.setenv("PUBLIC_KEYS__0", _pem(KEY_A))
    monkeypatch.setenv("UPSTREAM__HOST", "db.internal")
    monkeypatch.setenv("UPSTREAM__PASSWORD", PASSWORD)
    monkeypatch.setenv("DOWNSTREAM__SSLMODE", "disable")
    return monkeypatch


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_self_signed(tmp_path, ip_addresses=(), ca=True, days=30)


def config_error() -> str:
    with pytest.raises(ConfigError) as info:
        build_runtime(load_settings())
    text = str(info.value)
    assert "\n" not in text
    assert PASSWORD not in text
    return text


# --- Minimal and defaults ---------------------------------------------------------------------


def test_minimal_env(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    runtime = build_runtime(settings)
    assert runtime.upstream.host == "db.internal"
    assert runtime.upstream.port == 5432
    assert runtime.upstream.password == PASSWORD
    assert PASSWORD not in repr(runtime.upstream)
    assert runtime.upstream.sslmode is UpstreamSSLMode.PREFER
    assert runtime.upstream.channel_binding is ChannelBindingPolicy.PREFER
    assert isinstance(runtime.upstream.ssl_context, ssl.SSLContext)
    assert runtime.downstream.hosts == ("127.0.0.1",)
    assert runtime.downstream.port == 5432
    assert runtime.downstream.ssl_mode is DownstreamSSLMode.DISABLE
    assert runtime.downstream.ssl_context is None
    assert [k.name for k in runtime.verifier.keys] == ["PUBLIC_KEYS__0"]
    assert runtime.verifier.policy.leeway_seconds == 10.0
    assert runtime.limits.authentication_timeout == 60.0
    assert runtime.downstream.max_password_length == 16385


def test_settings_frozen(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen
        settings.log_level = "DEBUG"  # type: ignore[misc]


def test_lower_case_names_accepted(env: pytest.MonkeyPatch) -> None:
    env.delenv("UPSTREAM__HOST")
    env.setenv("upstream__host", "lower.example")
    assert load_settings().upstream.host == "lower.example"


def test_other_settings(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__PORT", "6432")
    env.setenv("UPSTREAM__CONNECT_TIMEOUT", "2.5")
    env.setenv("TOKEN__LEEWAY_SECONDS", "0")
    env.setenv("TOKEN__MAX_LENGTH", "4096")
    env.setenv("LOG_LEVEL", "debug")
    env.setenv("DOWNSTREAM__PORT", "0")
    runtime = build_runtime(load_settings())
    assert runtime.upstream.port == 6432
    assert runtime.upstream.connect_timeout == 2.5
    assert runtime.verifier.policy.leeway_seconds == 0
    assert runtime.verifier.policy.max_token_length == 4096
    assert runtime.downstream.max_password_length == 4097
    assert runtime.downstream.port == 0


def test_bad_log_level(env: pytest.MonkeyPatch) -> None:
    env.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match=r"^LOG_LEVEL:"):
        load_settings()


# --- Public keys ----------------------------------------------------------------------------


def test_public_keys_with_gap(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUBLIC_KEYS__5", _pem(KEY_B))
    runtime = build_runtime(load_settings())
    assert [k.name for k in runtime.verifier.keys] == ["PUBLIC_KEYS__0", "PUBLIC_KEYS__5"]


def test_public_keys_numeric_order(env: pytest.MonkeyPatch) -> None:
    env.delenv("PUBLIC_KEYS__0")
    env.setenv("PUBLIC_KEYS__10", _pem(KEY_A))
    env.setenv("PUBLIC_KEYS__2", _pem(KEY_B))
    env.setenv("PUBLIC_KEYS__1", _pem(KEY_C))
    runtime = build_runtime(load_settings())
    assert [k.name for k in runtime.verifier.keys] == [
        "PUBLIC_KEYS__1",
        "PUBLIC_KEYS__2",
        "PUBLIC_KEYS__10",
    ]
    assert runtime.verifier.keys[0].algorithms == {"ES256"}


def test_public_key_one_line_escaped(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUBLIC_KEYS__0", _pem(KEY_A).strip().replace("\n", "\\n"))
    assert len(build_runtime(load_settings()).verifier.keys) == 1


def test_public_key_ids(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUBLIC_KEYS__1", _pem(KEY_B))
    env.setenv("PUBLIC_KEY_IDS__1", "second")
    keys = build_runtime(load_settings()).verifier.keys
    assert [(k.name, k.kid) for k in keys] == [
        ("PUBLIC_KEYS__0", None),
        ("PUBLIC_KEYS__1", "second"),
    ]


def test_public_key_id_without_key(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUBLIC_KEY_IDS__3", "orphan")
    assert config_error().startswith("PUBLIC_KEY_IDS__3:")


def test_no_public_keys(env: pytest.MonkeyPatch) -> None:
    env.delenv("PUBLIC_KEYS__0")
    assert config_error().startswith("PUBLIC_KEYS__0:")


def test_bad_public_key_named(env: pytest.MonkeyPatch) -> None:
    env.setenv("PUBLIC_KEYS__4", "not a key")
    assert config_error().startswith("PUBLIC_KEYS__4:")


def test_private_key_as_public_key_named(env: pytest.MonkeyPatch) -> None:
    private = KEY_B.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    env.setenv("PUBLIC_KEYS__2", private)
    text = config_error()
    assert text.startswith("PUBLIC_KEYS__2:")
    assert private.splitlines()[1] not in text


# --- Upstream -------------------------------------------------------------------------------


def test_missing_upstream_password(env: pytest.MonkeyPatch) -> None:
    env.delenv("UPSTREAM__PASSWORD")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("UPSTREAM__PASSWORD:")
    assert str(info.value) == "UPSTREAM__PASSWORD: required but not set"


def test_missing_upstream_host(env: pytest.MonkeyPatch) -> None:
    env.delenv("UPSTREAM__HOST")
    with pytest.raises(ConfigError, match=r"^UPSTREAM__HOST:"):
        load_settings()


def test_empty_upstream_host(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__HOST", "")
    with pytest.raises(ConfigError, match=r"^UPSTREAM__HOST:"):
        load_settings()


@pytest.mark.parametrize("port", ["abc", "0", "65536", "-1", "5432.5"])
def test_bad_upstream_port(env: pytest.MonkeyPatch, port: str) -> None:
    env.setenv("UPSTREAM__PORT", port)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("UPSTREAM__PORT:")
    assert PASSWORD not in str(info.value)


def test_bad_upstream_sslmode(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__SSLMODE", "verify_full")
    with pytest.raises(ConfigError, match=r"^UPSTREAM__SSLMODE:"):
        load_settings()


def test_unknown_upstream_variable(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__SSLMOD", "require")  # typo
    with pytest.raises(ConfigError, match=r"^UPSTREAM__SSLMOD:"):
        load_settings()


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
def test_all_upstream_sslmodes_parse(env: pytest.MonkeyPatch, mode: str) -> None:
    env.setenv("UPSTREAM__SSLMODE", mode)
    assert load_settings().upstream.sslmode == mode


def test_sslrootcert_missing_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("UPSTREAM__SSLMODE", "verify-full")
    env.setenv("UPSTREAM__SSLROOTCERT", str(tmp_path / "nope.crt"))
    assert config_error().startswith("UPSTREAM__SSLROOTCERT:")


def test_sslrootcert_not_a_certificate(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.crt"
    bogus.write_text("not a certificate\n")
    env.setenv("UPSTREAM__SSLMODE", "verify-ca")
    env.setenv("UPSTREAM__SSLROOTCERT", str(bogus))
    assert config_error().startswith("UPSTREAM__SSLROOTCERT:")


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
def test_channel_binding_require_needs_tls(env: pytest.MonkeyPatch, mode: str) -> None:
    env.setenv("UPSTREAM__SSLMODE", mode)
    env.setenv("UPSTREAM__CHANNEL_BINDING", "require")
    assert config_error().startswith("UPSTREAM__CHANNEL_BINDING:")


def test_channel_binding_require_with_require(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__SSLMODE", "require")
    env.setenv("UPSTREAM__CHANNEL_BINDING", "require")
    runtime = build_runtime(load_settings())
    assert runtime.upstream.channel_binding is ChannelBindingPolicy.REQUIRE


def test_bad_channel_binding(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__CHANNEL_BINDING", "always")
    with pytest.raises(ConfigError, match=r"^UPSTREAM__CHANNEL_BINDING:"):
        load_settings()


# --- upstream_ssl_context (libpq sslmode semantics) -----------------------------------------


def upstream(**kw: object) -> UpstreamSettings:
    return UpstreamSettings(host="h", password=PASSWORD, **kw)  # type: ignore[arg-type]


def test_ssl_context_disable() -> None:
    assert upstream_ssl_context(upstream(sslmode="disable")) is None


@pytest.mark.parametrize("mode", ["allow", "prefer", "require"])
def test_ssl_context_no_verification(mode: str) -> None:
    context = upstream_ssl_context(upstream(sslmode=mode))
    assert context is not None
    assert context.verify_mode is ssl.CERT_NONE
    assert context.check_hostname is False
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_ssl_context_require_with_rootcert_is_verify_ca(tls_files: tuple[Path, Path]) -> None:
    certfile, _ = tls_files
    context = upstream_ssl_context(upstream(sslmode="require", sslrootcert=certfile))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is False
    assert len(context.get_ca_certs()) == 1


def test_ssl_context_verify_ca(tls_files: tuple[Path, Path]) -> None:
    context = upstream_ssl_context(upstream(sslmode="verify-ca", sslrootcert=tls_files[0]))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is False


def test_ssl_context_verify_full(tls_files: tuple[Path, Path]) -> None:
    context = upstream_ssl_context(upstream(sslmode="verify-full", sslrootcert=tls_files[0]))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert len(context.get_ca_certs()) == 1


def test_ssl_context_verify_full_system_cas() -> None:
    context = upstream_ssl_context(upstream(sslmode="verify-full"))
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_runtime_upstream_context_matches_mode(
    env: pytest.MonkeyPatch, tls_files: tuple[Path, Path]
) -> None:
    env.setenv("UPSTREAM__SSLMODE", "verify-full")
    env.setenv("UPSTREAM__SSLROOTCERT", str(tls_files[0]))
    runtime = build_runtime(load_settings())
    assert runtime.upstream.ssl_context is not None
    assert runtime.upstream.ssl_context.check_hostname is True
    env.setenv("UPSTREAM__SSLMODE", "disable")
    env.delenv("UPSTREAM__SSLROOTCERT")
    assert build_runtime(load_settings()).upstream.ssl_context is None


# --- Downstream -----------------------------------------------------------------------------


def test_downstream_require_without_certfile(env: pytest.MonkeyPatch) -> None:
    env.setenv("DOWNSTREAM__SSLMODE", "require")
    assert config_error().startswith("DOWNSTREAM__CERTFILE:")


def test_downstream_default_is_require(env: pytest.MonkeyPatch) -> None:
    env.delenv("DOWNSTREAM__SSLMODE")
    assert load_settings().downstream.sslmode is DownstreamSSLMode.REQUIRE
    assert config_error().startswith("DOWNSTREAM__CERTFILE:")


def test_downstream_require_without_keyfile(
    env: pytest.MonkeyPatch, tls_files: tuple[Path, Path]
) -> None:
    env.setenv("DOWNSTREAM__SSLMODE", "require")
    env.setenv("DOWNSTREAM__CERTFILE", str(tls_files[0]))
    assert config_error().startswith("DOWNSTREAM__KEYFILE:")


@pytest.mark.parametrize("mode", ["require", "allow"])
def test_downstream_tls(env: pytest.MonkeyPatch, tls_files: tuple[Path, Path], mode: str) -> None:
    env.setenv("DOWNSTREAM__SSLMODE", mode)
    env.setenv("DOWNSTREAM__CERTFILE", str(tls_files[0]))
    env.setenv("DOWNSTREAM__KEYFILE", str(tls_files[1]))
    runtime = build_runtime(load_settings())
    context = runtime.downstream.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert runtime.downstream.ssl_mode == mode


def test_downstream_cert_missing_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("DOWNSTREAM__SSLMODE", "require")
    env.setenv("DOWNSTREAM__CERTFILE", str(tmp_path / "missing.crt"))
    env.setenv("DOWNSTREAM__KEYFILE", str(tmp_path / "missing.key"))
    assert config_error().startswith("DOWNSTREAM__CERTFILE")


def test_downstream_key_does_not_match_cert(
    env: pytest.MonkeyPatch, tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    env.setenv("DOWNSTREAM__SSLMODE", "require")
    env.setenv("DOWNSTREAM__CERTFILE", str(tls_files[0]))
    env.setenv("DOWNSTREAM__KEYFILE", str(other))
    assert config_error().startswith("DOWNSTREAM__CERTFILE/DOWNSTREAM__KEYFILE:")


def test_downstream_disable_without_certs(env: pytest.MonkeyPatch) -> None:
    runtime = build_runtime(load_settings())
    assert runtime.downstream.ssl_context is None


def test_downstream_bad_sslmode(env: pytest.MonkeyPatch) -> None:
    env.setenv("DOWNSTREAM__SSLMODE", "prefer")
    with pytest.raises(ConfigError, match=r"^DOWNSTREAM__SSLMODE:"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "hosts"),
    [
        ("127.0.0.1,::1", ("127.0.0.1", "::1")),
        ("0.0.0.0", ("0.0.0.0",)),
        (" 10.0.0.1 , ::", ("10.0.0.1", "::")),
    ],
)
def test_downstream_ip(env: pytest.MonkeyPatch, value: str, hosts: tuple[str, ...]) -> None:
    env.setenv("DOWNSTREAM__IP", value)
    assert build_runtime(load_settings()).downstream.hosts == hosts


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1,", "256.0.0.1", "", "::1,example.com"])
def test_downstream_bad_ip(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("DOWNSTREAM__IP", value)
    with pytest.raises(ConfigError, match=r"^DOWNSTREAM__IP:"):
        load_settings()


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_downstream_bad_port(env: pytest.MonkeyPatch, port: str) -> None:
    env.setenv("DOWNSTREAM__PORT", port)
    with pytest.raises(ConfigError, match=r"^DOWNSTREAM__PORT:"):
        load_settings()


# --- Secrets ----------------------------------------------------------------------------------


def test_password_never_shown(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    runtime = build_runtime(settings)
    for text in (
        str(settings),
        repr(settings),
        str(settings.upstream),
        repr(settings.upstream),
        repr(runtime.upstream),
        repr(runtime),
        settings.model_dump_json(),
    ):
        assert PASSWORD not in text


def test_settings_can_be_built_directly() -> None:
    settings = Settings(
        upstream=upstream(), public_keys={"0": _pem(KEY_A)}, downstream={"sslmode": "disable"}
    )  # type: ignore[arg-type]
    assert build_runtime(settings).upstream.host == "h"
