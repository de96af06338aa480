"""POOL__* settings: parsed once into plain values on the runtime; errors name the variable."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwtpgproxy.errors import ConfigError
from jwtpgproxy.ops.config import build_runtime, load_settings
from jwtpgproxy.proxy.pool import PoolMode, PoolSettings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith(("UPSTREAM", "DOWNSTREAM", "PUBLIC_KEY", "TOKEN", "POOL")):
            monkeypatch.delenv(name)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    monkeypatch.setenv("PUBLIC_KEYS__0", pem.decode())
    monkeypatch.setenv("UPSTREAM__HOST", "db.internal")
    monkeypatch.setenv("UPSTREAM__PASSWORD", "pw")
    monkeypatch.setenv("DOWNSTREAM__SSLMODE", "disable")
    return monkeypatch


def test_pooling_is_off_by_default(env: pytest.MonkeyPatch) -> None:
    runtime = build_runtime(load_settings())
    assert runtime.pool == PoolSettings()
    assert runtime.pool.mode is PoolMode.NONE and not runtime.pool.enabled


def test_pool_settings_reach_the_runtime(env: pytest.MonkeyPatch) -> None:
    env.setenv("POOL__MODE", "session")
    env.setenv("POOL__MAX_IDLE_PER_KEY", "3")
    env.setenv("POOL__MAX_IDLE", "7")
    env.setenv("POOL__IDLE_TIMEOUT", "1.5")
    env.setenv("POOL__MAX_LIFETIME", "90")
    pool = build_runtime(load_settings()).pool
    assert pool == PoolSettings(PoolMode.SESSION, 3, 7, 1.5, 90.0)
    assert pool.enabled


@pytest.mark.parametrize(
    "name, value",
    [
        ("POOL__MODE", "transaction"),
        ("POOL__MAX_IDLE_PER_KEY", "0"),
        ("POOL__MAX_IDLE", "0"),
        ("POOL__IDLE_TIMEOUT", "0"),
        ("POOL__MAX_LIFETIME", "-1"),
    ],
)
def test_bad_pool_setting_is_named(env: pytest.MonkeyPatch, name: str, value: str) -> None:
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^{name}:"):
        load_settings()
