"""Container packaging: Dockerfile, .dockerignore, docker-compose.yml, docker/ helpers and the
Kubernetes examples in deploy/kubernetes/.

No Docker engine is needed: the files are parsed and checked against the package itself
(``jwtpgproxy.ops.config.Settings`` and ``pyproject.toml``), so a renamed or new setting, a
changed port or a renamed console script shows up here. The compose demo is then replayed
without containers: the "certs" service's script runs for real into temporary "volumes",
the "token" service's command mints a token, the "proxy" service's entrypoint exports the
public key, and the proxy's environment is loaded into a real ``Runtime`` that must accept
that token and complete a TLS handshake that trusts the generated certificate.

The Dockerfile's HEALTHCHECK command is run for real against a small HTTP server. The
Kubernetes manifests are loaded with each proxy container's environment resolved (image
ENV, values, ConfigMap/Secret references) into a real ``Settings``, against which probes,
Service ports, grace periods and mounted files are checked.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pydantic import BaseModel, SecretStr

import jwtpgproxy.proxy.listener
from jwtpgproxy.ops.config import Settings, build_runtime

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
PYPROJECT = ROOT / "pyproject.toml"
CHECKED_SERVICES = ("proxy", "token")  # services that run the proxy's settings code

# --- Is this environment variable a setting? ------------------------------------------------


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _field_path(name: str) -> list[str] | None:
    """``name`` split into Settings field names per the model's env config, or None."""
    config = Settings.model_config
    prefix = config.get("env_prefix") or ""
    delimiter = config.get("env_nested_delimiter") or "__"
    if not config.get("case_sensitive", False):
        name, prefix = name.lower(), prefix.lower()
    if not name.startswith(prefix):
        return None
    return name[len(prefix) :].split(delimiter)


def setting_accepted(name: str) -> bool:
    """Whether Settings reads the environment variable ``name`` (by model introspection)."""
    parts = _field_path(name)
    if not parts:
        return False
    field = Settings.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True  # a scalar, or a whole section / mapping as JSON
    section = _section_model(field.annotation)
    if section is not None:
        return len(parts) == 2 and parts[1] in section.model_fields
    if _is_mapping(field.annotation):
        return len(parts) == 2 and parts[1] != ""
    return False


def _is_secret(name: str) -> bool:
    parts = _field_path(name)
    if not parts or parts[0] not in Settings.model_fields:
        return False
    annotation = Settings.model_fields[parts[0]].annotation
    section = _section_model(annotation)
    if section is not None and len(parts) == 2 and parts[1] in section.model_fields:
        annotation = section.model_fields[parts[1]].annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


@pytest.mark.parametrize(
    "name",
    [
        "UPSTREAM__HOST",
        "upstream__password",
        "UPSTREAM__CHANNEL_BINDING",
        "DOWNSTREAM__CERTFILE",
        "PUBLIC_KEYS__0",
        "PUBLIC_KEY_IDS__primary",
        "TOKEN__LEEWAY_SECONDS",
        "AUTHENTICATION_TIMEOUT",
        "LOG_LEVEL",
    ],
)
def test_setting_accepted(name: str) -> None:
    assert setting_accepted(name)


@pytest.mark.parametrize(
    "name",
    [
        "UPSTREAM__HOSTNAME",
        "DOWNSTREAM__CERT",
        "UPSTREAM_HOST",
        "UPSTREAM__HOST__X",
        "PUBLIC_KEYS__",
        "LOG_LEVEL__X",
        "LOGLEVEL",
        "PATH",
    ],
)
def test_setting_rejected(name: str) -> None:
    assert not setting_accepted(name)


def test_secret_detection_uses_the_model() -> None:
    assert _is_secret("UPSTREAM__PASSWORD")
    assert not _is_secret("UPSTREAM__HOST")


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs; continuations joined, comments and blank lines dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside continuations too
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _env_pairs(rest: str) -> dict[str, str]:
    tokens = shlex.split(rest)
    if tokens and "=" not in tokens[0]:  # legacy "ENV NAME value"
        return {tokens[0]: rest.split(None, 1)[1] if len(tokens) > 1 else ""}
    return dict(token.split("=", 1) for token in tokens)


def _flags(rest: str) -> tuple[dict[str, str], str]:
    """Leading --flag=value options of an instruction, and the remainder."""
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _stages(dockerfile)[-1]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


@pytest.fixture(scope="module")
def console_script(pyproject: dict[str, Any]) -> str:
    scripts = pyproject["project"]["scripts"]
    (name,) = (name for name, target in scripts.items() if target == "jwtpgproxy.ops.cli:main")
    return name


def _image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            env.update(_env_pairs(rest))
    return env


def _copies(stage: list[tuple[str, str]]) -> dict[str, str]:
    """COPY destination -> source (build-context copies only)."""
    result: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword not in {"COPY", "ADD"}:
            continue
        flags, rest = _flags(rest)
        if "from" in flags:
            continue
        *sources, destination = shlex.split(rest)
        for source in sources:
            result[destination] = source
    return result


def test_dockerfile_env_are_settings(dockerfile: list[tuple[str, str]]) -> None:
    names = [name for k, rest in dockerfile if k == "ENV" for name in _env_pairs(rest)]
    assert names, "expected ENV defaults such as DOWNSTREAM__PORT"
    assert [name for name in names if not setting_accepted(name)] == []


def test_dockerfile_expose_matches_listeners(final_stage: list[tuple[str, str]]) -> None:
    env = {name.upper(): value for name, value in _image_env(final_stage).items()}
    exposed = {
        port.split("/")[0]
        for keyword, rest in final_stage
        if keyword == "EXPOSE"
        for port in rest.split()
    }
    assert exposed == {env["DOWNSTREAM__PORT"], env["METRICS__PORT"]}
    # Reachable from outside the container: clients, and scrapers / Kubernetes probes.
    assert env.get("DOWNSTREAM__IP") == "0.0.0.0"
    assert env.get("METRICS__HOST") == "0.0.0.0"


def test_dockerfile_runs_as_non_root(final_stage: list[tuple[str, str]]) -> None:
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users, "the image must not run as root"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0", ""}
    assert group not in {"root", "0"}


def test_dockerfile_entrypoint_is_console_script(
    final_stage: list[tuple[str, str]], console_script: str
) -> None:
    (entrypoint,) = [rest for keyword, rest in final_stage if keyword == "ENTRYPOINT"]
    argv = json.loads(entrypoint)  # exec form: signals reach the proxy, not a shell
    assert argv == [console_script]


def test_dockerfile_base_image_and_labels(
    dockerfile: list[tuple[str, str]], pyproject: dict[str, Any]
) -> None:
    args = {}
    for keyword, rest in dockerfile:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    stage_names = set()
    for keyword, rest in dockerfile:
        if keyword != "FROM":
            continue
        image, *alias = rest.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), image)
        if image not in stage_names:
            match = re.fullmatch(r"python:3\.(\d+)-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image)
            assert match, f"base image {image!r}: pin the Python minor and Debian release"
            need = re.search(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
            assert need and int(match.group(1)) >= int(need.group(1))
        if alias:
            stage_names.add(alias[-1])
    labels = [rest for keyword, rest in dockerfile if keyword == "LABEL"]
    version = [v for rest in labels for k, v in _env_pairs(rest).items() if k.endswith(".version")]
    assert version in ([], [pyproject["project"]["version"]])


def _healthcheck(stage: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    (healthcheck,) = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    flags, command = _flags(healthcheck)
    assert command.startswith("CMD "), "exec form, not NONE or a shell string"
    return flags, json.loads(command[4:])


def test_dockerfile_healthcheck_checks_healthz(final_stage: list[tuple[str, str]]) -> None:
    flags, argv = _healthcheck(final_stage)
    assert argv[:2] in (["python", "-c"], ["python3", "-c"])  # the image's own interpreter
    code = argv[2]
    assert "/healthz" in code  # liveness, not /readyz: a down database is not a sick proxy
    assert "METRICS__PORT" in code  # follows the setting, whatever port it is given
    assert "METRICS__PORT" in {name.upper() for name in _image_env(final_stage)}
    for name in ("interval", "timeout", "start-period"):
        assert _duration(flags[name]) > 0, name


class _HealthServer(http.server.ThreadingHTTPServer):
    status = 200
    paths: list[str]


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    server: _HealthServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server(status: int) -> Iterator[_HealthServer]:
    server = _HealthServer(("127.0.0.1", 0), _HealthHandler)
    server.status, server.paths = status, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return int(listener.getsockname()[1])  # closed again: nothing listens there


@pytest.mark.parametrize("metrics_host", ["0.0.0.0", "127.0.0.1"])
@pytest.mark.parametrize(
    ("status", "healthy"), [(200, True), (204, False), (404, False), (503, False)]
)
def test_dockerfile_healthcheck_runs(
    final_stage: list[tuple[str, str]], metrics_host: str, status: int, healthy: bool
) -> None:
    _, argv = _healthcheck(final_stage)
    argv = [sys.executable, *argv[1:]]
    env = {k: v for k, v in os.environ.items() if not setting_accepted(k)}
    env.update(_image_env(final_stage))
    env["METRICS__HOST"] = metrics_host
    # A proxy in the environment must not be used for the loopback probe.
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = f"http://127.0.0.1:{_free_port()}"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    with _http_server(status) as server:
        env["METRICS__PORT"] = str(server.server_address[1])
        ran = subprocess.run(argv, env=env, timeout=30, capture_output=True, text=True)
    assert (ran.returncode == 0) is healthy, ran.stderr
    assert server.paths == ["/healthz"]


def test_dockerfile_healthcheck_fails_without_listener(final_stage: list[tuple[str, str]]) -> None:
    _, argv = _healthcheck(final_stage)
    env = {k: v for k, v in os.environ.items() if not setting_accepted(k)}
    env.update(_image_env(final_stage))
    env["METRICS__PORT"] = str(_free_port())
    ran = subprocess.run([sys.executable, *argv[1:]], env=env, timeout=30, capture_output=True)
    assert ran.returncode != 0


# --- .dockerignore ------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches parent dirs."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _glob_regex(pattern)))
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_build_context_has_what_the_build_copies(final_stage: list[tuple[str, str]]) -> None:
    needed = ["pyproject.toml", *(str(p.relative_to(ROOT)) for p in ROOT.glob("src/**/*.py"))]
    assert [path for path in needed if dockerignored(path)] == []
    for source in _copies(final_stage).values():
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), source
    assert dockerignored(".git/config")
    assert dockerignored("src/jwtpgproxy/__pycache__/cli.cpython-311.pyc")


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # in the "test" extra
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, against ``env``."""
    env = env or {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(0) == "$":
            raise ValueError(f"invalid interpolation in {value!r}: write $$ for a literal $")
        name = match.group("braced") or match.group("plain")
        op, default = match.group("op"), match.group("default") or ""
        if name in env and (env[name] or op != ":-"):
            return env[name]
        return default if op in {":-", "-"} else ""

    pattern = r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}|\$(?P<plain>\w+)|\$"
    return re.sub(pattern, replace, value)


def service_env(service: Mapping[str, Any]) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    environment = service.get("environment") or {}
    if isinstance(environment, Mapping):
        env.update({k: None if v is None else str(v) for k, v in environment.items()})
    else:
        for item in environment:
            name, sep, value = str(item).partition("=")
            env[name] = value if sep else None
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        text = value if isinstance(value, str) else " ".join(map(str, value))
        for name in re.findall(r"\bexport\s+([A-Za-z_]\w*)", text):
            env.setdefault(name, None)
    return env


def _argv(service: Mapping[str, Any], key: str) -> list[str]:
    value = service.get(key) or []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def test_compose_interpolation_is_valid(compose: dict[str, Any]) -> None:
    for text in _strings(compose):
        interpolate(text)  # raises on a bare "$" (compose would reject or mangle it)
    with pytest.raises(ValueError):
        interpolate('export X="$(cat f)"')
    assert interpolate("${A:-x} $${B} ${C}", {"C": "c"}) == "x ${B} c"


def test_compose_has_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose
    assert {"certs", "postgres", "proxy", "token"} <= set(compose["services"])


@pytest.mark.parametrize("service", CHECKED_SERVICES)
def test_compose_env_are_settings(compose: dict[str, Any], service: str) -> None:
    names = service_env(compose["services"][service])
    assert [name for name in names if not setting_accepted(name)] == []


def test_compose_proxy_sets_required_settings(compose: dict[str, Any]) -> None:
    names = {name.lower() for name in service_env(compose["services"]["proxy"])}
    delimiter = Settings.model_config.get("env_nested_delimiter") or "__"
    for field_name, field in Settings.model_fields.items():
        section = _section_model(field.annotation)
        if not field.is_required() or field_name in names:
            continue
        assert section is not None, f"{field_name.upper()} is required"
        for sub_name, sub in section.model_fields.items():
            if sub.is_required():
                assert f"{field_name}{delimiter}{sub_name}" in names, sub_name
    assert any(name.startswith("public_keys" + delimiter) for name in names)


def _port_mappings(service: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(host_ip, container port) of each published port."""
    mappings = []
    for mapping in service.get("ports") or []:
        if isinstance(mapping, Mapping):
            target, host_ip = str(mapping["target"]), str(mapping.get("host_ip", ""))
        else:
            spec = interpolate(str(mapping)).split("/")[0]
            target = spec.rsplit(":", 1)[-1]
            host_ip = spec.rsplit(":", 2)[0] if spec.count(":") >= 2 else ""
        mappings.append((host_ip, target))
    return mappings


def test_compose_proxy_port_matches_downstream_port(
    compose: dict[str, Any], final_stage: list[tuple[str, str]]
) -> None:
    proxy = compose["services"]["proxy"]
    env = {k.upper(): v for k, v in _image_env(final_stage).items()}
    env.update({k.upper(): interpolate(v or "") for k, v in service_env(proxy).items()})
    mappings = _port_mappings(proxy)
    assert env["DOWNSTREAM__PORT"] in [target for _, target in mappings]
    for host_ip, target in mappings:
        assert target in {env["DOWNSTREAM__PORT"], env["METRICS__PORT"]}, target
        assert host_ip in {"127.0.0.1", "[::1]", "::1"}, "publish the demo on loopback only"


def _duration(value: str) -> float:
    """A Docker / compose duration ("1m30s", "35s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


#: After SHUTDOWN_TIMEOUT the proxy ends the remaining sessions (pg_terminate_backend) and
#: waits this long more at worst (proxy/listener.py: the terminate grace, then 2 s for the tasks).
AFTER_DRAIN_SECONDS = (
    float(getattr(jwtpgproxy.proxy.listener, "_TERMINATE_GRACE_SECONDS", 5.0)) + 2.0
)
SHUTDOWN_TIMEOUT_DEFAULT = float(Settings.model_fields["shutdown_timeout"].default)


def test_compose_proxy_stops_within_grace_period(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    shutdown = interpolate(service_env(proxy).get("SHUTDOWN_TIMEOUT") or "")
    shutdown_timeout = float(shutdown) if shutdown else SHUTDOWN_TIMEOUT_DEFAULT
    grace = _duration(str(proxy.get("stop_grace_period", "10s")))
    assert grace > shutdown_timeout + AFTER_DRAIN_SECONDS, "SIGKILL would cut the drain short"


def test_compose_proxy_health_check_is_healthz(
    compose: dict[str, Any], final_stage: list[tuple[str, str]]
) -> None:
    proxy = compose["services"]["proxy"]
    healthcheck = proxy.get("healthcheck") or {}
    assert not healthcheck.get("disable")
    test = healthcheck.get("test")
    if test:  # otherwise the image's HEALTHCHECK (tested above)
        assert "/healthz" in (test if isinstance(test, str) else " ".join(test))
    env = {k.upper(): v for k, v in _image_env(final_stage).items()}
    env.update({k.upper(): interpolate(v or "") for k, v in service_env(proxy).items()})
    assert env.get("METRICS__PORT", "").isdigit(), "the health check needs the HTTP listener"


def test_compose_upstream_is_a_healthy_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    proxy = services["proxy"]
    host = interpolate(str(service_env(proxy)["UPSTREAM__HOST"]))
    assert host in services
    assert proxy["depends_on"][host]["condition"] == "service_healthy"
    assert "healthcheck" in services[host]
    assert "ports" not in services[host], "the database is reached through the proxy only"
    assert proxy["depends_on"]["certs"]["condition"] == "service_completed_successfully"


def test_compose_passwords_only_interpolated(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for service in CHECKED_SERVICES:
        for name, value in service_env(services[service]).items():
            if _is_secret(name) or "password" in name.lower():
                assert value is not None and re.fullmatch(r"\$\{\w+(:?-[^}]*)?\}", value), name
    # The database and the proxy take the password from the same variable.
    upstream = service_env(services["proxy"])["UPSTREAM__PASSWORD"]
    assert service_env(services["postgres"])["POSTGRES_PASSWORD"] == upstream


def test_compose_token_is_a_tool(compose: dict[str, Any], console_script: str) -> None:
    token = compose["services"]["token"]
    assert token.get("profiles") == ["tools"]
    argv = _argv(token, "entrypoint") + _argv(token, "command")
    assert argv[:2] == [console_script, "token"]
    assert interpolate(argv[argv.index("--sub") + 1]) == "postgres"


def test_compose_referenced_files_exist(compose: dict[str, Any], dockerfile: Any) -> None:
    copies = _copies(_stages(dockerfile)[-1])
    resolved = set()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile_name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (ROOT / context / (dockerfile_name or "Dockerfile")).is_file(), name
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, Mapping) else volume
            source = str(source).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source}"
        for argv in (_argv(service, "entrypoint"), _argv(service, "command")):
            if argv and argv[0] in copies:
                path = ROOT / copies[argv[0]]
                assert path.is_file() and os.access(path, os.X_OK), f"{name}: {path}"
                resolved.add(copies[argv[0]])
    assert "docker/gen-certs.sh" in resolved
    for script in (ROOT / "docker").glob("*.sh"):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


# --- The demo, replayed without containers --------------------------------------------------


class Demo:
    """Named volumes as temporary directories; services' paths mapped into them."""

    def __init__(self, compose: dict[str, Any], root: Path) -> None:
        self.compose = compose
        self.root = root
        for volume in compose.get("volumes") or {}:
            (root / volume).mkdir()

    def mounts(self, service: str) -> Iterator[tuple[str, Path]]:
        for volume in self.compose["services"][service].get("volumes") or []:
            source, target = str(volume).split(":")[:2]
            if source in (self.compose.get("volumes") or {}):
                yield target, self.root / source

    def map(self, service: str, text: str) -> str:
        for target, directory in self.mounts(service):
            text = re.sub(rf"(?<![\w/]){re.escape(target)}(?=/|\s|\"|'|$)", str(directory), text)
        return text

    def argv(self, service: str) -> list[str]:
        spec = self.compose["services"][service]
        return [self.map(service, interpolate(a)) for a in _argv(spec, "entrypoint")] + [
            self.map(service, interpolate(a)) for a in _argv(spec, "command")
        ]


@pytest.fixture
def tool_env() -> dict[str, str]:
    bindir = Path(sys.executable).parent
    if shutil.which("jwt-postgresql-proxy", path=str(bindir)) is None:
        pytest.skip("console script not installed beside this interpreter")
    env = {k: v for k, v in os.environ.items() if not setting_accepted(k)}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["PYTHON"] = sys.executable
    return env


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(20):
        for end in (c, s):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not complete")


def test_compose_demo_replayed(
    compose: dict[str, Any],
    dockerfile: Any,
    tool_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    demo = Demo(compose, tmp_path)
    copies = _copies(_stages(dockerfile)[-1])

    # certs: the real script, twice.
    certs = demo.argv("certs")
    certs[0] = str(ROOT / copies[_argv(compose["services"]["certs"], "entrypoint")[0]])
    for name, value in service_env(compose["services"]["certs"]).items():
        tool_env[name] = interpolate(value or "")
    subprocess.run(certs, env=tool_env, check=True, timeout=120, capture_output=True)
    keys, issuer = tmp_path / "proxy-keys", tmp_path / "issuer-key"
    assert sorted(_snapshot(keys)) == ["public.pem", "server.crt", "server.key"]
    assert sorted(_snapshot(issuer)) == ["private.pem"]
    for secret in (keys / "server.key", issuer / "private.pem"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = _snapshot(tmp_path)
    subprocess.run(certs, env=tool_env, check=True, timeout=120, capture_output=True)
    assert _snapshot(tmp_path) == before, "a second run must change nothing"
    # A lost public key is derived again from the kept private key.
    public = (keys / "public.pem").read_bytes()
    (keys / "public.pem").unlink()
    subprocess.run(certs, env=tool_env, check=True, timeout=120, capture_output=True)
    assert (keys / "public.pem").read_bytes() == public

    # token: mint with the service's own command line.
    token_argv = demo.argv("token")
    minted = subprocess.run(
        token_argv, env=tool_env, check=True, timeout=60, capture_output=True, text=True
    )
    token = minted.stdout.strip()

    # proxy: run its entrypoint with a stand-in for the console script that dumps the env.
    proxy = compose["services"]["proxy"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "jwt-postgresql-proxy"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n"
    )
    fake.chmod(0o755)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    env.update({k: demo.map("proxy", interpolate(v or "")) for k, v in service_env(proxy).items()})
    ran = subprocess.run(
        demo.argv("proxy"), env=env, check=True, timeout=60, capture_output=True, text=True
    )
    seen = json.loads(ran.stdout)
    assert seen["argv"] == []  # the daemon: no sub-command
    assert seen["env"]["PUBLIC_KEYS__0"] == public.decode().strip()

    for name in list(os.environ):
        if setting_accepted(name):
            monkeypatch.delenv(name)
    for name in service_env(proxy):
        monkeypatch.setenv(name, seen["env"][name])
    runtime = build_runtime(Settings())  # type: ignore[call-arg]
    sub = interpolate(token_argv[token_argv.index("--sub") + 1])
    assert runtime.verifier.verify(token, sub).role == sub
    assert runtime.downstream.ssl_context is not None
    client = ssl.create_default_context(cafile=str(keys / "server.crt"))
    _handshake(client, runtime.downstream.ssl_context, "localhost")


# --- Kubernetes examples (deploy/kubernetes/) -------------------------------------------------

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def manifests() -> list[tuple[str, Manifest]]:
    """(file, object) for every YAML document under deploy/kubernetes/."""
    yaml = pytest.importorskip("yaml")
    objects = []
    for path in sorted([*KUBERNETES.rglob("*.yaml"), *KUBERNETES.rglob("*.yml")]):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict) and "kind" in document, path
                objects.append((str(path.relative_to(KUBERNETES)), document))
    assert objects, "expected example manifests under deploy/kubernetes/"
    return objects


def _find(objects: list[tuple[str, Manifest]], kind: str, name: str) -> Manifest | None:
    for _, obj in objects:
        if obj["kind"] == kind and obj.get("metadata", {}).get("name") == name:
            return obj
    return None


def _object_data(obj: Manifest) -> dict[str, str]:
    """A Secret's or ConfigMap's keys and (decoded) values."""
    data = {k: str(v) for k, v in (obj.get("stringData") or {}).items()}
    for field in ("data", "binaryData"):
        for key, value in (obj.get(field) or {}).items():
            encoded = obj["kind"] == "Secret" or field == "binaryData"
            data.setdefault(key, base64.b64decode(value).decode() if encoded else str(value))
    return data


def _pod_templates(obj: Manifest) -> list[Manifest]:
    """The pod template(s) ({"metadata", "spec"}) of a workload object."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind == "Pod":
        return [obj]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec["template"]]
    return []


def _image_repository(image: str) -> str:
    image = image.split("@", 1)[0]
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        image = name
    return image.rsplit("/", 1)[-1]


def _container_env(container: Manifest, objects: list[tuple[str, Manifest]]) -> dict[str, str]:
    """The container's own environment, with ConfigMap/Secret references resolved."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        for ref_name, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if ref_name in source:
                obj = _find(objects, kind, source[ref_name]["name"])
                assert obj is not None, f"envFrom: no {kind} {source[ref_name]['name']}"
                prefix = source.get("prefix", "")
                env.update({prefix + k: v for k, v in _object_data(obj).items()})
    for item in container.get("env") or []:
        value_from = item.get("valueFrom")
        if value_from is None:
            env[item["name"]] = str(item.get("value", ""))
            continue
        for ref_name, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
            if ref_name in value_from:
                ref = value_from[ref_name]
                obj = _find(objects, kind, ref["name"])
                if obj is not None and ref["key"] in _object_data(obj):
                    env[item["name"]] = _object_data(obj)[ref["key"]]
        env.setdefault(item["name"], "x")  # fieldRef etc.: some value at run time
    return env


def _settings_from(env: Mapping[str, str]) -> Settings:
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()  # type: ignore[call-arg]


@dataclass
class ProxyContainer:
    where: str  # "file: Kind/name/container" for messages
    pod: Manifest  # the pod template
    container: Manifest
    env: dict[str, str]  # the image's ENV overlaid with the container's
    settings: Settings

    @property
    def spec(self) -> Manifest:
        return dict(self.pod.get("spec") or {})


@pytest.fixture(scope="module")
def proxy_containers(
    manifests: list[tuple[str, Manifest]],
    final_stage: list[tuple[str, str]],
    pyproject: dict[str, Any],
) -> list[ProxyContainer]:
    image_env = _image_env(final_stage)
    found = []
    for file, obj in manifests:
        for pod in _pod_templates(obj):
            for container in (pod.get("spec") or {}).get("containers") or []:
                if _image_repository(container["image"]) != pyproject["project"]["name"]:
                    continue
                where = f"{file}: {obj['kind']}/{obj['metadata']['name']}/{container['name']}"
                env = {**image_env, **_container_env(container, manifests)}
                try:
                    settings = _settings_from(env)
                except Exception as exc:  # a pydantic ValidationError, with the variable
                    raise AssertionError(f"{where}: settings do not load: {exc}") from None
                found.append(ProxyContainer(where, pod, container, env, settings))
    assert found, "no container runs the proxy image in deploy/kubernetes/"
    return found


def _container_port(container: Manifest, port: int | str) -> int | None:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    numbers = [p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port]
    return numbers[0] if len(numbers) == 1 else None


def test_kubernetes_env_are_settings(proxy_containers: list[ProxyContainer]) -> None:
    for proxy in proxy_containers:
        names = [item["name"] for item in proxy.container.get("env") or []]
        assert [name for name in names if not setting_accepted(name)] == [], proxy.where
        assert len({name.upper() for name in names}) == len(names), f"{proxy.where}: duplicate"
        keys = [k for k in proxy.env if k.upper().startswith("PUBLIC_KEYS__")]
        assert keys, f"{proxy.where}: no PUBLIC_KEYS__<i>"


def test_kubernetes_passwords_come_from_secrets(proxy_containers: list[ProxyContainer]) -> None:
    for proxy in proxy_containers:
        for item in proxy.container.get("env") or []:
            if _is_secret(item["name"]) or "password" in item["name"].lower():
                assert "secretKeyRef" in (item.get("valueFrom") or {}), proxy.where


def test_kubernetes_probes_use_the_metrics_port(proxy_containers: list[ProxyContainer]) -> None:
    for proxy in proxy_containers:
        metrics = proxy.settings.metrics
        assert metrics.port, f"{proxy.where}: METRICS__PORT must be set for the probes"
        # The kubelet probes the pod IP: a loopback-only listener would fail every probe.
        assert metrics.host in {"0.0.0.0", "::"}, proxy.where
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            http_get = (proxy.container.get(probe) or {}).get("httpGet")
            assert http_get, f"{proxy.where}: {probe} must be an httpGet"
            assert http_get["path"] == path, f"{proxy.where}: {probe}"
            assert http_get.get("scheme", "HTTP") == "HTTP", f"{proxy.where}: {probe}"
            port = _container_port(proxy.container, http_get["port"])
            assert port == metrics.port, f"{proxy.where}: {probe} port {http_get['port']}"
        annotations = (proxy.pod.get("metadata") or {}).get("annotations") or {}
        if "prometheus.io/port" in annotations:
            assert annotations["prometheus.io/port"] == str(metrics.port), proxy.where
            assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", proxy.where


def test_kubernetes_container_ports_match_settings(proxy_containers: list[ProxyContainer]) -> None:
    for proxy in proxy_containers:
        declared = {p["containerPort"] for p in proxy.container.get("ports") or []}
        assert declared == {proxy.settings.downstream.port, proxy.settings.metrics.port}
        assert proxy.settings.downstream.ip not in {"127.0.0.1", "::1"}, proxy.where


def test_kubernetes_services_reach_the_proxy(
    manifests: list[tuple[str, Manifest]], proxy_containers: list[ProxyContainer]
) -> None:
    """A Service in front of a proxy pod: 5432 -> DOWNSTREAM__PORT; nothing past the proxy."""
    checked = 0
    for file, service in manifests:
        if service["kind"] != "Service" or not service["spec"].get("selector"):
            continue
        selector = service["spec"]["selector"]
        for proxy in proxy_containers:
            labels = (proxy.pod.get("metadata") or {}).get("labels") or {}
            if not selector.items() <= labels.items():
                continue
            where = f"{file}: Service/{service['metadata']['name']} -> {proxy.where}"
            proxy_ports = {proxy.settings.downstream.port, proxy.settings.metrics.port}
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                number = _container_port(proxy.container, target)
                # Every port leads to the proxy: PostgreSQL in the same pod stays behind it.
                assert number in proxy_ports, f"{where}: port {port['port']} -> {target}"
                if port["port"] == 5432:
                    assert number == proxy.settings.downstream.port, where
                    checked += 1
    assert checked, "no Service exposes a proxy on port 5432"


def _image_uid(stage: list[tuple[str, str]]) -> int:
    users = [rest for keyword, rest in stage if keyword == "USER"]
    uid = users[-1].partition(":")[0]
    assert uid.isdigit(), "a numeric USER, so that runAsNonRoot can verify it"
    return int(uid)


def test_kubernetes_security_context(
    proxy_containers: list[ProxyContainer], final_stage: list[tuple[str, str]]
) -> None:
    for proxy in proxy_containers:
        pod_context = proxy.spec.get("securityContext") or {}
        context = {
            **{k: v for k, v in pod_context.items() if k.startswith("run")},
            **(proxy.container.get("securityContext") or {}),
        }
        assert context.get("runAsNonRoot") is True, proxy.where
        assert context.get("runAsUser") == _image_uid(final_stage), proxy.where
        assert context.get("allowPrivilegeEscalation") is False, proxy.where
        assert context.get("readOnlyRootFilesystem") is True, proxy.where
        assert not context.get("privileged"), proxy.where
        assert "ALL" in (context.get("capabilities") or {}).get("drop", []), proxy.where


def _pre_stop_seconds(container: Manifest) -> float:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    if len(command) == 2 and posixpath.basename(command[0]) == "sleep":
        return float(command[1])
    assert not pre_stop, f"unrecognised preStop hook {pre_stop}"
    return 0.0


def test_kubernetes_grace_period_outlasts_the_drain(
    proxy_containers: list[ProxyContainer],
) -> None:
    for proxy in proxy_containers:
        grace = proxy.spec.get("terminationGracePeriodSeconds", 30)
        needed = _pre_stop_seconds(proxy.container) + proxy.settings.shutdown_timeout
        assert grace > needed + AFTER_DRAIN_SECONDS, f"{proxy.where}: SIGKILL cuts the drain"


def test_kubernetes_runs_the_console_script(
    proxy_containers: list[ProxyContainer], console_script: str
) -> None:
    for proxy in proxy_containers:
        command = [str(c) for c in proxy.container.get("command") or []]
        args = [str(a) for a in proxy.container.get("args") or []]
        if not command:
            assert args == [], f"{proxy.where}: arguments make the console script a sub-command"
            continue
        if posixpath.basename(command[0]) == console_script:
            assert command[1:] + args == [], proxy.where
            continue
        # A shell wrapper must exec the daemon, so that SIGTERM reaches it.
        text = " ".join(command + args)
        assert re.search(rf"\bexec\s+{re.escape(console_script)}\b", text), proxy.where


def _references(node: Any) -> Iterator[tuple[str, str, str | None, bool]]:
    """(kind, name, key or None, optional) of every Secret/ConfigMap reference in ``node``."""
    if isinstance(node, list):
        for item in node:
            yield from _references(item)
        return
    if not isinstance(node, Mapping):
        return
    for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
        if field in node:
            ref = node[field]
            yield kind, ref["name"], ref["key"], bool(ref.get("optional"))
    for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
        if field in node:
            yield kind, node[field]["name"], None, bool(node[field].get("optional"))
    for field, kind, name_field in (
        ("secret", "Secret", "secretName"),  # volume
        ("secret", "Secret", "name"),  # projected volume source
        ("configMap", "ConfigMap", "name"),
    ):
        source = node.get(field)
        if isinstance(source, Mapping) and name_field in source:
            optional = bool(source.get("optional"))
            yield kind, source[name_field], None, optional
            for item in source.get("items") or []:
                yield kind, source[name_field], item["key"], optional
    for value in node.values():
        yield from _references(value)


def test_kubernetes_references_resolve(manifests: list[tuple[str, Manifest]]) -> None:
    seen = 0
    for file, obj in manifests:
        for kind, name, key, optional in _references(obj.get("spec")):
            seen += 1
            target = _find(manifests, kind, name)
            if optional and target is None:
                continue
            assert target is not None, f"{file}: no {kind} {name!r} in deploy/kubernetes/"
            if key is not None:
                assert key in _object_data(target), f"{file}: {kind} {name!r} has no key {key!r}"
    assert seen, "expected Secret/ConfigMap references"


def test_kubernetes_files_are_mounted(
    proxy_containers: list[ProxyContainer], manifests: list[tuple[str, Manifest]]
) -> None:
    """DOWNSTREAM__CERTFILE etc. lie on a read-only mount of a Secret/ConfigMap with that key."""
    for proxy in proxy_containers:
        volumes = {v["name"]: v for v in proxy.spec.get("volumes") or []}
        settings = proxy.settings
        paths = [settings.downstream.certfile, settings.downstream.keyfile]
        paths.append(settings.upstream.sslrootcert)
        for path in [str(p) for p in paths if p is not None]:
            mounts = [
                m
                for m in proxy.container.get("volumeMounts") or []
                if path.startswith(m["mountPath"].rstrip("/") + "/") or path == m["mountPath"]
            ]
            assert mounts, f"{proxy.where}: {path} is on no volume"
            mount = max(mounts, key=lambda m: len(m["mountPath"]))
            assert mount.get("readOnly") is True, f"{proxy.where}: {mount['mountPath']}"
            volume = volumes[mount["name"]]
            key = mount.get("subPath") or path[len(mount["mountPath"].rstrip("/")) + 1 :]
            for field, kind, name_field in (
                ("secret", "Secret", "secretName"),
                ("configMap", "ConfigMap", "name"),
            ):
                if field in volume:
                    items = volume[field].get("items")
                    if items:
                        (key,) = [i["key"] for i in items if i.get("path", i["key"]) == key]
                    obj = _find(manifests, kind, volume[field][name_field])
                    assert obj is not None and key in _object_data(obj), f"{proxy.where}: {path}"
                    break
            else:
                raise AssertionError(f"{proxy.where}: {path} is not from a Secret/ConfigMap")


def test_kubernetes_secrets_are_placeholders(manifests: list[tuple[str, Manifest]]) -> None:
    for file, obj in manifests:
        if obj["kind"] == "Secret":
            for key, value in _object_data(obj).items():
                assert "REPLACE-ME" in value, f"{file}: Secret {obj['metadata']['name']}/{key}"


def test_kubernetes_kustomization(
    manifests: list[tuple[str, Manifest]], pyproject: dict[str, Any]
) -> None:
    kustomizations = [(file, obj) for file, obj in manifests if obj["kind"] == "Kustomization"]
    for file, kustomization in kustomizations:
        base = KUBERNETES / posixpath.dirname(file)
        for resource in kustomization.get("resources") or []:
            assert (base / resource).exists(), f"{file}: {resource}"
        for image in kustomization.get("images") or []:
            assert image["name"] == pyproject["project"]["name"], file
        kubectl = shutil.which("kubectl")
        if kubectl is not None:  # "kubectl kustomize" works offline
            subprocess.run(
                [kubectl, "kustomize", str(base)], check=True, capture_output=True, timeout=60
            )
    readme = (KUBERNETES / "README.md").read_text()
    for path in sorted({file for file, _ in manifests}):
        assert f"`{path}`" in readme, f"deploy/kubernetes/README.md does not mention {path}"
