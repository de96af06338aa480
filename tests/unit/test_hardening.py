"""Small hardening checks (issue 13): secrets stay out of reprs."""

from __future__ import annotations

from jwtpgproxy.protocol import wire
from jwtpgproxy.proxy.session import _Startup

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW5ldmVyLWxvZ2dlZA"


def test_startup_repr_has_no_token() -> None:
    """A _Startup in a traceback, a debugger or a log line must not show the token."""
    startup = wire.StartupMessage(3, 0, {"user": "alice", "database": "db"})
    received = _Startup(startup, TOKEN, b"")
    assert TOKEN not in repr(received)
    assert TOKEN[:20] not in repr(received)
    assert "alice" in repr(received)  # the rest is still useful
