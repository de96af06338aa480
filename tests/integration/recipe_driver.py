"""Run a Python recipe from examples/recipes as an application would, and report.

    python recipe_driver.py RECIPE.py --seconds 10 --workers 3 --interval 0.05

The recipe module is imported from its file, unchanged; it provides ``open_pool()``,
``query_once(pool)`` and ``close_pool(pool)`` (all sync or all async) and a ``tokens``
source. Workers query through the pool until the time is up; every exception is an error
seen by the application. One JSON line on stdout: queries, errors (with samples), backends
(distinct pg_backend_pid values: connections made), the ``exp`` of every token the source
handed out, and the longest gap between successful queries.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.util
import inspect
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queries = 0
        self.errors: list[str] = []
        self.pids: set[int] = set()
        self.successes: list[float] = []
        self.exps: set[float] = set()

    def ok(self, pid: int) -> None:
        with self.lock:
            self.queries += 1
            self.pids.add(pid)
            self.successes.append(time.monotonic())

    def failed(self, exc: BaseException) -> None:
        cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None) or ""
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        with self.lock:
            self.errors.append(f"{type(exc).__name__} {code} {text}".strip())

    def report(self, started: float, ended: float, wall_start: float, wall_end: float) -> str:
        marks = [started, *sorted(self.successes), ended]
        gap = max(b - a for a, b in itertools.pairwise(marks))
        expired = sorted(e for e in self.exps if wall_start < e <= wall_end)
        return json.dumps(
            {
                "queries": self.queries,
                "errors": len(self.errors),
                "error_samples": sorted(set(self.errors))[:5],
                "backends": len(self.pids),
                "tokens": len(self.exps),
                "tokens_expired_during_run": len(expired),
                "seconds": round(ended - started, 2),
                "max_gap_seconds": round(gap, 2),
            }
        )


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_tokens(module: Any, stats: Stats, stop: threading.Event) -> None:
    while not stop.is_set():
        exp = module.tokens.expires_at
        if exp is not None:
            with stats.lock:
                stats.exps.add(exp)
        stop.wait(0.05)


def run_sync(module: Any, args: argparse.Namespace, stats: Stats) -> None:
    pool = module.open_pool()
    deadline = time.monotonic() + args.seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                stats.ok(module.query_once(pool))
            except Exception as exc:
                stats.failed(exc)
            time.sleep(args.interval)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    module.close_pool(pool)


async def run_async(module: Any, args: argparse.Namespace, stats: Stats) -> None:
    pool = await module.open_pool()
    deadline = time.monotonic() + args.seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            try:
                stats.ok(await module.query_once(pool))
            except Exception as exc:
                stats.failed(exc)
            await asyncio.sleep(args.interval)

    await asyncio.gather(*(worker() for _ in range(args.workers)))
    await asyncio.wait_for(module.close_pool(pool), 10)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    # A run that hangs shows where, and ends, instead of holding the test to its timeout.
    faulthandler.dump_traceback_later(args.seconds + 45, exit=True)
    module = load(args.recipe)
    stats = Stats()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_tokens, args=(module, stats, stop), daemon=True)
    sampler.start()
    started, wall_start = time.monotonic(), time.time()
    if inspect.iscoroutinefunction(module.open_pool):
        asyncio.run(run_async(module, args, stats))
    else:
        run_sync(module, args, stats)
    ended, wall_end = time.monotonic(), time.time()
    stop.set()
    sampler.join(2)
    print(stats.report(started, ended, wall_start, wall_end), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
