"""The text and JSON log formats: one event is one line, whatever a client sent."""

from __future__ import annotations

import json
import logging

import pytest

from jwtpgproxy.logs import JsonFormatter, _Event, event


def render(**fields: object) -> str:
    return str(_Event("connection closed", dict(fields)))


@pytest.mark.parametrize(
    "hostile",
    [
        "alice\rINFO jwtpgproxy: token accepted: user=admin",
        "alice\x1b[2J\x1b[31mred",
        "alice\u2028token accepted",
        "alice\u2029x",
        "alice\x85next line",
        "alice\x00nul",
        "alice\x7fdel",
        "alice\ud800surrogate",
        "alice\u200binvisible",
        "alice\nuser=admin",
    ],
)
def test_text_format_escapes_every_non_printable_character(hostile: str) -> None:
    line = render(user=hostile, client="127.0.0.1:5")
    assert line.isprintable(), repr(line)
    assert line.endswith(" client=127.0.0.1:5")
    # The value is recoverable: quoted, with backslash escapes for what was not printable.
    value = line.split("user=", 1)[1].rsplit(" client=", 1)[0]
    assert value.startswith('"') and value.endswith('"')
    decoded = value[1:-1].encode("ascii", "backslashreplace").decode("unicode_escape")
    assert decoded == hostile


def test_text_format_leaves_plain_values_alone() -> None:
    assert render(user="alice", n=3, none=None) == "connection closed: user=alice n=3 none=-"
    assert render(user="zoë") == "connection closed: user=zoë"


@pytest.mark.parametrize("value", ["", "a b", 'say "hi"', "a=b", "back\\slash"])
def test_text_format_quotes_field_syntax(value: str) -> None:
    line = render(user=value, x=1)
    assert line.endswith(" x=1")
    quoted = line.split("user=", 1)[1].rsplit(" x=", 1)[0]
    assert quoted.startswith('"') and quoted.endswith('"')
    assert quoted[1:-1].replace('\\"', '"').replace("\\\\", "\\") == value


def test_json_format_escapes_line_breaks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("jwtpgproxy.test")
    with caplog.at_level(logging.INFO, logger="jwtpgproxy.test"):
        event(logger, logging.INFO, "connection closed", user="a\u2028b\r\x1bc")
    line = JsonFormatter().format(caplog.records[0])
    assert line.isprintable() and line.isascii()
    assert json.loads(line)["user"] == "a\u2028b\r\x1bc"
