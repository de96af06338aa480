"""Configuration: environment -> Settings -> Runtime, with one-line errors naming the variable."""

from __future__ import annotations

import asyncio
import logging
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
    open_runtime,
    upstream_ssl_context,
)
from jwtpgproxy.protocol.frontend import DownstreamSSLMode
from jwtpgproxy.protocol.login import AuthMethod, ChannelBindingPolicy
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


# --- Cancel keys and shutdown delay (issue 14) ---------------------------------------------


def test_cancel_secret_too_short_is_named(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCEL__SECRET", "x" * 31)
    with pytest.raises(ConfigError, match=r"^CANCEL__SECRET: .*32 bytes"):
        load_settings()


def test_cancel_secret_shared_gives_same_keys_unset_gives_one_per_process(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("CANCEL__SECRET", "s" * 32)
    one, two = build_runtime(load_settings()), build_runtime(load_settings())
    assert one.cancel_keys.client_key(7, b"abcd", 2) == two.cancel_keys.client_key(7, b"abcd", 2)
    assert "s" * 32 not in repr(load_settings())
    env.delenv("CANCEL__SECRET")
    # Unset: random, but the same across reloads of this process (keys already given out
    # stay valid), and different from the configured one.
    three, four = build_runtime(load_settings()), build_runtime(load_settings())
    key = three.cancel_keys.client_key(7, b"abcd", 2)
    assert key == four.cancel_keys.client_key(7, b"abcd", 2)
    assert key != one.cancel_keys.client_key(7, b"abcd", 2)


def test_cancel_rate_and_shutdown_delay(env: pytest.MonkeyPatch) -> None:
    env.setenv("CANCEL__MAX_FORWARDS_PER_SECOND", "0")
    env.setenv("SHUTDOWN_DELAY", "5")
    limits = build_runtime(load_settings()).limits
    assert limits.cancel_forwards_per_second == 0 and limits.shutdown_delay == 5
    env.setenv("SHUTDOWN_DELAY", "-1")
    with pytest.raises(ConfigError, match=r"^SHUTDOWN_DELAY: "):
        load_settings()


# --- UPSTREAM__REQUIRE_AUTH default, verify-ca and sslrootcert=system (issue 13) -------------


@pytest.mark.parametrize(
    ("host", "mode", "rootcert", "cleartext_allowed"),
    [
        ("db.internal", "prefer", False, False),
        ("db.internal", "disable", False, False),
        ("db.internal", "require", False, False),
        ("127.0.0.1", "disable", False, False),  # loopback is not a socket: a peer may bind
        ("db.internal", "require", True, True),  # libpq: require + root cert = verify-ca
        ("db.internal", "verify-ca", True, True),
        ("db.internal", "verify-full", True, True),
        ("/run/postgresql", "disable", False, True),
    ],
)
def test_require_auth_default_depends_on_the_path(
    env: pytest.MonkeyPatch,
    tls_files: tuple[Path, Path],
    host: str,
    mode: str,
    rootcert: bool,
    cleartext_allowed: bool,
) -> None:
    env.setenv("UPSTREAM__HOST", host)
    env.setenv("UPSTREAM__SSLMODE", mode)
    if rootcert:
        env.setenv("UPSTREAM__SSLROOTCERT", str(tls_files[0]))
    allowed = build_runtime(load_settings()).upstream.require_auth
    assert (AuthMethod.PASSWORD in allowed) is cleartext_allowed
    assert (AuthMethod.NONE in allowed) is cleartext_allowed
    assert {AuthMethod.MD5, AuthMethod.SCRAM_SHA_256} <= allowed


def test_require_auth_setting(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__REQUIRE_AUTH", "password,scram-sha-256")
    allowed = build_runtime(load_settings()).upstream.require_auth
    assert allowed == {AuthMethod.PASSWORD, AuthMethod.SCRAM_SHA_256}


@pytest.mark.parametrize("value", ["password,!md5", "md5,md5", "trust"])
def test_require_auth_setting_errors(env: pytest.MonkeyPatch, value: str) -> None:
    env.setenv("UPSTREAM__REQUIRE_AUTH", value)
    assert config_error().startswith("UPSTREAM__REQUIRE_AUTH:")


@pytest.mark.parametrize(
    ("host", "mode", "warned"),
    [
        ("db.internal", "prefer", True),
        ("db.internal", "verify-ca", True),
        ("10.0.0.5", "require", True),
        ("db.internal", "verify-full", False),
        ("localhost", "disable", False),
        ("127.0.0.1", "prefer", False),
        ("::1", "prefer", False),
        ("/run/postgresql", "disable", False),
    ],
)
def test_startup_warning_when_upstream_can_be_intercepted(
    env: pytest.MonkeyPatch,
    tls_files: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    host: str,
    mode: str,
    warned: bool,
) -> None:
    env.setenv("UPSTREAM__HOST", host)
    env.setenv("UPSTREAM__SSLMODE", mode)
    env.setenv("UPSTREAM__SSLROOTCERT", str(tls_files[0]))

    async def start() -> None:
        async with open_runtime():
            pass

    with caplog.at_level(logging.WARNING, logger="jwtpgproxy"):
        asyncio.run(start())
    found = [r for r in caplog.records if "can be intercepted" in r.getMessage()]
    assert bool(found) is warned
    if warned:
        assert "UPSTREAM__SSLMODE=verify-full" in found[0].getMessage()
        assert PASSWORD not in found[0].getMessage()


def test_verify_ca_without_rootcert_is_a_config_error(env: pytest.MonkeyPatch) -> None:
    """Against every public CA without a host-name check, any publicly trusted
    certificate for any name would pass: libpq refuses it, and so do we."""
    env.setenv("UPSTREAM__SSLMODE", "verify-ca")
    text = config_error()
    assert text.startswith("UPSTREAM__SSLROOTCERT:")
    assert "verify-ca" in text


def test_sslrootcert_system_forces_verify_full(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__SSLROOTCERT", "system")
    upstream_settings = build_runtime(load_settings()).upstream
    assert upstream_settings.sslmode is UpstreamSSLMode.VERIFY_FULL
    context = upstream_settings.ssl_context
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    # verified TLS: the default require_auth lets cleartext through
    assert AuthMethod.PASSWORD in upstream_settings.require_auth


@pytest.mark.parametrize("mode", ["disable", "prefer", "require", "verify-ca"])
def test_sslrootcert_system_with_weaker_mode_is_an_error(
    env: pytest.MonkeyPatch, mode: str
) -> None:
    env.setenv("UPSTREAM__SSLROOTCERT", "system")
    env.setenv("UPSTREAM__SSLMODE", mode)
    text = config_error()
    assert text.startswith("UPSTREAM__SSLMODE:")
    assert "verify-full" in text


def test_sslrootcert_system_with_verify_full(env: pytest.MonkeyPatch) -> None:
    env.setenv("UPSTREAM__SSLROOTCERT", "system")
    env.setenv("UPSTREAM__SSLMODE", "verify-full")
    assert build_runtime(load_settings()).upstream.sslmode is UpstreamSSLMode.VERIFY_FULL


def test_jwks_max_staleness_below_refresh_names_the_variable(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text('{"keys": []}')
    env.setenv("JWKS__FILE", str(jwks_file))
    env.setenv("JWKS__REFRESH_SECONDS", "600")
    env.setenv("JWKS__MAX_STALENESS_SECONDS", "60")

    async def start() -> None:
        async with open_runtime():
            pass

    with pytest.raises(ConfigError) as info:
        asyncio.run(start())
    assert str(info.value).startswith("JWKS__MAX_STALENESS_SECONDS:")
