"""Container packaging: Dockerfile, .dockerignore, docker-compose.yml and docker/ helpers.

No Docker engine is needed: the files are parsed and checked against the package itself
(``jwtpgproxy.config.Settings`` and ``pyproject.toml``), so a renamed or new setting, a
changed port or a renamed console script shows up here. The compose demo is then replayed
without containers: the "certs" service's script runs for real into temporary "volumes",
the "token" service's command mints a token, the "proxy" service's entrypoint exports the
public key, and the proxy's environment is loaded into a real ``Runtime`` that must accept
that token and complete a TLS handshake that trusts the generated certificate.
"""

from __future__ import annotations

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
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from jwtpgproxy.config import Settings, build_runtime

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
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
    (name,) = (name for name, target in scripts.items() if target == "jwtpgproxy.cli:main")
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


def test_dockerfile_expose_matches_downstream_port(final_stage: list[tuple[str, str]]) -> None:
    env = {name.upper(): value for name, value in _image_env(final_stage).items()}
    exposed = {
        port.split("/")[0]
        for keyword, rest in final_stage
        if keyword == "EXPOSE"
        for port in rest.split()
    }
    assert exposed == {env["DOWNSTREAM__PORT"]}
    assert env.get("DOWNSTREAM__IP") == "0.0.0.0"  # reachable from outside the container


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


def test_dockerfile_healthcheck_probes_listener(final_stage: list[tuple[str, str]]) -> None:
    (healthcheck,) = [rest for keyword, rest in final_stage if keyword == "HEALTHCHECK"]
    _, command = _flags(healthcheck)
    assert command.startswith("CMD ")
    argv = json.loads(command[4:])
    assert argv[0] in {"python", "python3"}
    argv[0] = sys.executable
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        env = {**os.environ, "DOWNSTREAM__IP": "0.0.0.0", "DOWNSTREAM__PORT": str(port)}
        assert subprocess.run(argv, env=env, timeout=30).returncode == 0
    # The listener is closed now: the probe must fail.
    env = {**os.environ, "DOWNSTREAM__IP": "127.0.0.1", "DOWNSTREAM__PORT": str(port)}
    assert subprocess.run(argv, env=env, timeout=30, stderr=subprocess.DEVNULL).returncode != 0


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


def test_compose_proxy_port_matches_downstream_port(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    port = interpolate(str(service_env(proxy)["DOWNSTREAM__PORT"]))
    (mapping,) = proxy["ports"]
    if isinstance(mapping, Mapping):
        target, host_ip = str(mapping["target"]), str(mapping.get("host_ip", ""))
    else:
        spec = str(mapping).split("/")[0]
        target = spec.rsplit(":", 1)[-1]
        host_ip = spec.rsplit(":", 2)[0] if spec.count(":") >= 2 else ""
    assert target == port
    assert host_ip in {"127.0.0.1", "[::1]", "::1"}, "publish the demo on loopback only"


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
    assert runtime.downstream_ssl_context is not None
    client = ssl.create_default_context(cafile=str(keys / "server.crt"))
    _handshake(client, runtime.downstream_ssl_context, "localhost")
