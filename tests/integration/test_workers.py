"""WORKERS > 1: several processes on one SO_REUSEPORT listener, one supervisor."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from harness import (
    Postgres,
    ProxyProcess,
    free_port,
    http_get,
    proxy_dsn,
    wait_backend_sleeping,
    wait_for,
)

from jwtpgproxy.ops.workers import merge_prometheus


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """worker index -> pid, the latest start of each."""
    found: dict[int, int] = {}
    for index, pid in re.findall(r"worker started: worker=(\d+) pid=(\d+)", proxy.log()):
        found[int(index)] = int(pid)
    return found


def start_workers(start_proxy: Callable[..., ProxyProcess], **env: str) -> tuple[ProxyProcess, int]:
    metrics_port = free_port()
    proxy = start_proxy(
        WORKERS="2", DOWNSTREAM__PORT=str(free_port()), METRICS__PORT=str(metrics_port), **env
    )
    assert wait_for(lambda: proxy.log().count("]: listening:") >= 2), proxy.log()
    assert len(worker_pids(proxy)) == 2
    return proxy, metrics_port


def _cancel_when_sleeping(pg: Postgres, conn: psycopg.Connection[object]) -> None:
    wait_backend_sleeping(pg, "pid = %s", conn.info.backend_pid)
    conn.cancel()


def test_workers_share_the_port_and_cancel_across_workers(
    start_proxy: Callable[..., ProxyProcess], pg: Postgres, token_for: Callable[..., str]
) -> None:
    proxy, metrics_port = start_workers(start_proxy)
    dsn = proxy_dsn(proxy, "scram_user", token_for("scram_user"))
    cancelled = 0
    for _ in range(16):
        with psycopg.connect(dsn) as conn:
            canceller = threading.Thread(target=_cancel_when_sleeping, args=(pg, conn))
            canceller.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(10)")
            canceller.join()
            cancelled += 1
    log = proxy.log()
    # Both workers served clients...
    assert "[worker 0]: token accepted" in log and "[worker 1]: token accepted" in log
    # ...and cancels that landed on the other worker were forwarded by it, recovering
    # upstream's key under the secret the supervisor gave both workers (16 cancels all
    # landing on their own session's worker has probability 2**-16).
    assert "route=routed_unverified" in log
    status, text = http_get(metrics_port)
    assert status == 200
    merged = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert merged['jwtpgproxy_logins_total{outcome="success",reason="ok"}'] == 16
    cancels = {
        result: merged.get(f'jwtpgproxy_cancel_requests_total{{result="{result}"}}', 0)
        for result in ("forwarded", "routed_unverified", "unmatched", "rate_limited")
    }
    assert cancels["forwarded"] + cancels["routed_unverified"] == 16, cancels
    assert cancels["routed_unverified"] > 0 and cancels["unmatched"] == 0, cancels
    created = merged['jwtpgproxy_logins_created{outcome="success",reason="ok"}']
    assert abs(created - time.time()) < 120  # a timestamp, not a sum of timestamps


def test_crashed_worker_is_restarted(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy, metrics_port = start_workers(start_proxy)
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    victim = worker_pids(proxy)[1]
    os.kill(victim, signal.SIGKILL)  # by PID: the worker we started
    assert wait_for(lambda: worker_pids(proxy).get(1, victim) != victim), proxy.log()
    assert "worker exited unexpectedly: restarting" in proxy.log()
    assert wait_for(lambda: http_get(metrics_port, "/healthz")[0] == 200)
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    for _ in range(6):
        with psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user"))) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_sigterm_drains_all_workers_and_exits_zero(
    start_proxy: Callable[..., ProxyProcess], token_for: Callable[..., str]
) -> None:
    proxy, metrics_port = start_workers(start_proxy, SHUTDOWN_TIMEOUT="10")
    conn = psycopg.connect(proxy_dsn(proxy, "scram_user", token_for("scram_user")))
    conn.execute("create temp table t (x int)")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: http_get(metrics_port, "/readyz")[0] == 503)
    conn.execute("insert into t values (1)")
    conn.commit()
    conn.close()
    assert proxy.process.wait(15) == 0
    assert proxy.log().count("shutdown complete") == 3  # two workers and the supervisor


def test_worker_configuration_error_stops_everything(
    start_proxy: Callable[..., ProxyProcess], tmp_path: object
) -> None:
    with pytest.raises(RuntimeError, match="exited with 2"):
        start_proxy(
            WORKERS="2",
            DOWNSTREAM__PORT=str(free_port()),
            DOWNSTREAM__CERTFILE="/nonexistent/cert.pem",
        )


def test_merge_prometheus_sums_samples_and_keeps_earliest_created() -> None:
    a = (
        '# HELP c Things\n# TYPE c counter\nc_total{k="x"} 2.0\nc_created{k="x"} 100.0\n'
        "# HELP g Open\n# TYPE g gauge\ng 3.0\n"
    )
    b = '# HELP c Things\n# TYPE c counter\nc_total{k="x"} 5.0\nc_created{k="x"} 90.0\n'
    b += 'c_total{k="y"} 1.0\n# HELP g Open\n# TYPE g gauge\ng 4.0\n'
    merged = merge_prometheus([a, b])
    lines = merged.splitlines()
    assert 'c_total{k="x"} 7.0' in lines
    assert 'c_total{k="y"} 1.0' in lines
    assert 'c_created{k="x"} 90.0' in lines
    assert "g 7.0" in lines
    assert lines.count("# TYPE c counter") == 1
    assert lines.index("# TYPE c counter") < lines.index('c_total{k="x"} 7.0')
