"""The admin HTTP listener: /readyz probes upstream at most about once a second (the
CachedProbe the daemon and the listener wrap their probe in), and the number of
connections served at once is capped (issue 13, item 10)."""

from __future__ import annotations

import asyncio

from jwtpgproxy.ops.admin import AdminServer
from jwtpgproxy.proxy.upstream import CachedProbe


async def _metrics() -> bytes:
    return b"m 1\n"


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def _port(admin: AdminServer) -> int:
    assert admin._server is not None
    return int(admin._server.sockets[0].getsockname()[1])


def test_readyz_probe_is_cached_and_shared() -> None:
    probes = 0

    async def ready() -> tuple[bool, str]:
        nonlocal probes
        probes += 1
        await asyncio.sleep(0.05)  # a TCP connect to upstream
        return True, "ready"

    async def scenario() -> None:
        admin = AdminServer("127.0.0.1", 0, _metrics, CachedProbe(ready))
        await admin.start()
        port = _port(admin)
        answers = await asyncio.gather(*(_get(port, "/readyz") for _ in range(20)))
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        for _ in range(20):
            assert (await _get(port, "/readyz")).startswith(b"HTTP/1.1 200")
        assert probes == 1  # 40 requests within a second: one upstream connection
        await asyncio.sleep(1.1)
        assert (await _get(port, "/readyz")).startswith(b"HTTP/1.1 200")
        assert probes == 2  # the answer is fresh again after about a second
        admin.close()

    asyncio.run(scenario())


def test_admin_connections_are_capped() -> None:
    async def ready() -> tuple[bool, str]:
        return True, "ready"

    async def scenario() -> None:
        admin = AdminServer("127.0.0.1", 0, _metrics, ready)  # the default cap: 32
        await admin.start()
        port = _port(admin)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(32)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Closed at once, not after the 5 s request-head timeout.
        assert await asyncio.wait_for(reader.read(), 1) == b""
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
        await asyncio.sleep(0.1)
        assert (await _get(port, "/healthz")).startswith(b"HTTP/1.1 200")  # slots free again
        admin.close()

    asyncio.run(scenario())
