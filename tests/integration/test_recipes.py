"""The recipes in examples/recipes, run unchanged against the real proxy and PostgreSQL.

Tokens live 6 s (TOKEN__LEEWAY_SECONDS=0, so an expired token is refused at once); each
recipe's pool serves queries from several workers for RUN_SECONDS, long enough for at least
three token expiries, with TOKEN__END_SESSIONS_ON_EXPIRY off and on, and the application
must see no error at all. Two controls show that the same measurement does see errors when
the recipe's safeguard is missing: a pool that never recycles its connections (57P01 once
the proxy ends sessions at expiry) and a pool whose password was captured once (28P01).

All runs go at once (each recipe in its own process), so the module takes about
RUN_SECONDS plus start-up. Each test prints its figures: tokens that expired during the
run while the pool kept serving, queries, connections made and errors seen.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from harness import ProxyProcess, node_modules

from jwtpgproxy.client import load_private_key, mint_token, unverified_expiry
from jwtpgproxy.ops.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "examples" / "recipes"
HERE = Path(__file__).resolve().parent
TTL = 6  # token lifetime, seconds
MARGIN = 4  # refresh margin: a new connection's token has at least this long left
LIFETIME = 1.5  # pool recycle / max lifetime, below MARGIN (the slack absorbs slow connects)
RUN_SECONDS = 18.5  # at least three token lifetimes
USER = "scram_user"
MODES = ("expiry-off", "expiry-on")
PYTHON_RECIPES = {
    # recipe file: the token source it is run with
    "sqlalchemy_psycopg.py": "key",
    "sqlalchemy_psycopg2.py": "file",
    "psycopg_pool_sync.py": "cat",
    "psycopg_pool_async.py": "key",
    "asyncpg_pool.py": "command",
}


class Setup:
    def __init__(self, directory: Path, proxies: dict[str, ProxyProcess], certfile: str) -> None:
        self.directory = directory
        self.proxies = proxies
        self.certfile = certfile
        self.private_key = directory / "keys" / "private.pem"
        self.token_file = directory / "token"
        self.bin = Path(sys.executable).parent

    def token_command(self) -> str:
        cli = self.bin / "jwt-postgresql-proxy"
        return shlex.join(
            [str(cli), "token", "--key", str(self.private_key), "--sub", USER, "--ttl", str(TTL)]
        )

    def env(self, mode: str, source: str = "key", **extra: str) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not (k.startswith(("PG", "JWTPG_")) and not k.startswith("PGPROXY_TEST_"))
        }
        sources = {
            "key": {"JWTPG_PRIVATE_KEY": str(self.private_key), "JWTPG_TTL": str(TTL)},
            "file": {"JWTPG_TOKEN_FILE": str(self.token_file)},
            "command": {"JWTPG_TOKEN_COMMAND": self.token_command()},
            # Any command that prints a token; this one reads the sidecar-refreshed file
            # and costs no interpreter start-up per token.
            "cat": {"JWTPG_TOKEN_COMMAND": f"cat {self.token_file}"},
        }
        return {
            **base,
            "PATH": f"{self.bin}{os.pathsep}{base.get('PATH', '')}",
            "PYTHONPATH": str(REPO / "src"),
            "PGHOST": "localhost",
            "PGPORT": str(self.proxies[mode].port),
            "PGUSER": USER,
            "PGDATABASE": "postgres",
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": self.certfile,
            "PGCONNECT_TIMEOUT": "10",
            "JWTPG_REFRESH_MARGIN": str(MARGIN),
            "POOL_RECYCLE_SECONDS": str(LIFETIME),
            "POOL_MAX_LIFETIME_SECONDS": str(LIFETIME),
            **sources[source],
            **extra,
        }


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str], tls_files: tuple[str, str]
) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("recipes")
    assert cli_main(["keygen", "--alg", "EdDSA", "--out", str(directory / "keys")]) == 0
    public_pem = (directory / "keys" / "public.pem").read_text()
    proxies = {
        mode: ProxyProcess(
            {
                **base_env,
                "PUBLIC_KEYS__9": public_pem,
                "TOKEN__LEEWAY_SECONDS": "0",
                "TOKEN__END_SESSIONS_ON_EXPIRY": "true" if mode == "expiry-on" else "false",
                "LOG_LEVEL": "INFO",
            },
            directory / f"proxy-{mode}.log",
        )
        for mode in MODES
    }
    try:
        for proxy in proxies.values():
            proxy.start()
        yield Setup(directory, proxies, tls_files[0])
    finally:
        for proxy in proxies.values():
            proxy.stop()


def write_token_file(setup: Setup) -> None:
    key = load_private_key(setup.private_key.read_bytes(), name="key")
    tmp = setup.token_file.with_suffix(".tmp")
    tmp.write_text(mint_token(key, USER, TTL) + "\n")
    os.replace(tmp, setup.token_file)


def refresh_token_file(setup: Setup, stop: threading.Event) -> None:
    """Stands in for a sidecar: rewrites the token file (atomically) every half second."""
    while not stop.wait(0.5):
        write_token_file(setup)


def run_driver(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=RUN_SECONDS + 90, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return {"crashed": "timeout", "stderr": str(exc.stderr or "")[-3000:]}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"crashed": done.returncode, "stderr": done.stderr[-3000:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_python(recipe: Path, env: dict[str, str]) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / "recipe_driver.py"), str(recipe)]
    argv += ["--seconds", str(RUN_SECONDS), "--workers", "2", "--interval", "0.2"]
    return run_driver(argv, env)


def run_node(setup: Setup, mode: str) -> dict[str, Any]:
    modules = node_modules()
    if modules is None:
        return {"skipped": "npm/node not installed (Debian: apt-get install nodejs npm)"}
    env = setup.env(mode, "cat", NODE_PATH=str(modules))
    argv = ["node", str(HERE / "recipe_driver.js"), str(RECIPES / "node_pg_pool.js")]
    return run_driver([*argv, str(RUN_SECONDS), "2", "0.2"], env)


def psql_loop(
    env: dict[str, str], argv_prefix: list[str], exps: Callable[[], float | None]
) -> dict[str, Any]:
    """Run `psql -c 'select pg_backend_pid()'` over and over for RUN_SECONDS."""
    started, wall_start = time.monotonic(), time.time()
    queries, errors, pids, seen = 0, [], set(), set()
    while time.monotonic() - started < RUN_SECONDS:
        done = subprocess.run(
            [*argv_prefix, "-XAtqc", "select pg_backend_pid()"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode == 0:
            queries += 1
            pids.add(done.stdout.strip())
        else:
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?")
        if (exp := exps()) is not None:
            seen.add(exp)
        time.sleep(0.5)
    wall_end = time.time()
    return {
        "queries": queries,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "backends": len(pids),
        "tokens": len(seen),
        "tokens_expired_during_run": len([e for e in seen if wall_start < e <= wall_end]),
        "seconds": round(time.monotonic() - started, 2),
        "max_gap_seconds": None,
    }


def run_psql_with_token(setup: Setup, mode: str) -> dict[str, Any]:
    """Each run mints its own token; the loop spans RUN_SECONDS, i.e. several lifetimes."""
    if shutil.which("psql") is None:
        return {"skipped": "psql not on PATH (./test.sh puts PostgreSQL's bin dir there)"}
    env = setup.env(mode, "key", JWTPG_TTL=str(TTL))
    started = time.time()
    result = psql_loop(env, ["sh", str(RECIPES / "psql_with_token.sh")], lambda: None)
    result["tokens_expired_during_run"] = int((time.time() - started) // TTL)
    return result


def run_pgpass_watch(setup: Setup, mode: str) -> dict[str, Any]:
    if shutil.which("psql") is None:
        return {"skipped": "psql not on PATH (./test.sh puts PostgreSQL's bin dir there)"}
    passfile = setup.directory / f"pgpass-{mode}"
    env = setup.env(mode, "key", PGPASSFILE=str(passfile), JWTPG_TTL=str(TTL))
    watcher = subprocess.Popen(
        ["sh", str(RECIPES / "pgpass_watch.sh")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not passfile.exists() and time.monotonic() < deadline and watcher.poll() is None:
            time.sleep(0.05)
        if not passfile.exists():
            return {"crashed": watcher.poll(), "stderr": "passfile never written"}

        def exps() -> float | None:
            text = passfile.read_text().strip()
            return unverified_expiry(text.rsplit(":", 1)[-1]) if text else None

        return psql_loop(env, ["psql"], exps)  # no PGPASSWORD: psql reads the passfile
    finally:
        watcher.terminate()
        watcher.wait(10)


def guarded(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One run's failure to start (npm offline, ...) fails that run's test only."""
    try:
        return job()
    except Exception as exc:
        return {"crashed": repr(exc)[:3000]}


@pytest.fixture(scope="module")
def results(setup: Setup) -> Iterator[dict[str, dict[str, Any]]]:
    """Every run at once; keyed by `recipe/mode`."""
    stop = threading.Event()
    write_token_file(setup)  # the first token, before anything reads it
    writer = threading.Thread(target=refresh_token_file, args=(setup, stop), daemon=True)
    writer.start()
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    for mode in MODES:
        for recipe, source in PYTHON_RECIPES.items():
            jobs[f"{recipe}/{mode}"] = lambda r=recipe, s=source, m=mode: run_python(
                RECIPES / r, setup.env(m, s)
            )
        jobs[f"node_pg_pool.js/{mode}"] = lambda m=mode: run_node(setup, m)
        jobs[f"psql_with_token.sh/{mode}"] = lambda m=mode: run_psql_with_token(setup, m)
        jobs[f"pgpass_watch.sh/{mode}"] = lambda m=mode: run_pgpass_watch(setup, m)
    jobs["control: no pool_recycle/expiry-on"] = lambda: run_python(
        RECIPES / "sqlalchemy_psycopg.py", setup.env("expiry-on", POOL_RECYCLE_SECONDS="-1")
    )
    jobs["control: password captured once/expiry-off"] = lambda: run_python(
        HERE / "recipe_control_captured.py", setup.env("expiry-off")
    )
    only = os.environ.get("RECIPES_ONLY")  # a substring of the names below, for debugging
    if only:
        jobs = {name: job for name, job in jobs.items() if only in name}
    collected: dict[str, dict[str, Any]] = {}
    # Two waves (one per proxy) keep the load of this module to about half a core each.
    for wave in MODES:
        wave_jobs = {name: job for name, job in jobs.items() if name.endswith(wave)}
        with ThreadPoolExecutor(max_workers=len(wave_jobs)) as executor:
            futures: dict[str, Future[dict[str, Any]]] = {
                name: executor.submit(guarded, job) for name, job in wave_jobs.items()
            }
            collected.update({name: future.result() for name, future in futures.items()})
    stop.set()
    writer.join(5)
    for name, result in collected.items():
        print(describe(name, result), result.get("max_gap_seconds"), file=sys.stderr)
    yield collected


def describe(name: str, result: dict[str, Any]) -> str:
    return (
        f"{name}: survived {result.get('tokens_expired_during_run')} token expiries, "
        f"{result.get('queries')} queries over {result.get('backends')} connections in "
        f"{result.get('seconds')} s, errors seen: {result.get('errors')} "
        f"{result.get('error_samples') or ''}"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "recipe", [*PYTHON_RECIPES, "node_pg_pool.js", "psql_with_token.sh", "pgpass_watch.sh"]
)
def test_recipe_survives_token_expiries(
    results: dict[str, dict[str, Any]], recipe: str, mode: str
) -> None:
    name = f"{recipe}/{mode}"
    if name not in results:
        pytest.skip("not selected by RECIPES_ONLY")
    result = results[name]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert "crashed" not in result, result
    print(describe(f"{recipe} ({mode})", result))
    assert result["errors"] == 0, result
    assert result["tokens_expired_during_run"] >= 3, result
    assert result["seconds"] >= RUN_SECONDS
    if recipe.endswith(".sh"):
        assert result["queries"] >= 3, result  # one psql run after another
    else:
        assert result["queries"] >= 20, result
        # The pool replaced its connections (a new upstream backend each time).
        assert result["backends"] >= 4, result


@pytest.mark.timeout(300)
def test_control_pool_without_recycle_sees_sessions_ended(
    results: dict[str, dict[str, Any]],
) -> None:
    name = "control: no pool_recycle/expiry-on"
    result = results[name]
    assert "crashed" not in result, result
    print(describe(name, result))
    assert result["errors"] > 0, result
    assert any("57P01" in e for e in result["error_samples"]), result


@pytest.mark.timeout(300)
def test_control_password_captured_once_is_refused(results: dict[str, dict[str, Any]]) -> None:
    name = "control: password captured once/expiry-off"
    result = results[name]
    assert "crashed" not in result, result
    print(describe(name, result))
    assert result["errors"] > 0, result
    assert any("password authentication failed" in e for e in result["error_samples"]), result


def test_readme_shows_each_recipe_verbatim() -> None:
    """The README's "Using it from applications" snippets are these files, byte for byte."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", readme, flags=re.DOTALL | re.MULTILINE)
    files = sorted(p for p in RECIPES.iterdir() if p.suffix in {".py", ".js", ".sh"})
    assert len(files) == 8
    for path in files:
        assert path.read_text() in blocks, f"README.md has no code block equal to {path.name}"
