"""Logging: one event per line, as ``name: key=value ...`` text or as JSON lines.

Callers log *events* with fields (``event(log, INFO, "token accepted", user=..., ...)``), so
the JSON format carries real fields rather than a sentence to parse. Fields never hold a
token or a password: callers pass only what is safe, and nothing here formats arbitrary
objects from a session.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


#: Characters that need quoting though printable: they would split or fake a field.
_FIELD_SYNTAX = frozenset(' "=\\')


def _escape(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    code = ord(ch)
    if code < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _text_value(value: object) -> str:
    """A field value as one token of the text format. Values from clients (user names,
    database names, upstream's messages) may hold anything: every non-printable character
    -- CR, ESC (terminal control sequences), U+2028 (a line break to some viewers), lone
    surrogates -- is escaped, so one event is one line and shows what was received."""
    if value is None:
        return "-"
    text = str(value)
    if text and text.isprintable() and not any(ch in _FIELD_SYNTAX for ch in text):
        return text
    escaped = "".join(ch if ch.isprintable() and ch not in '"\\' else _escape(ch) for ch in text)
    return f'"{escaped}"'


class _Event:
    """The message of an event record, rendered only when a handler formats it."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        self.name = name
        self.fields = fields

    def __str__(self) -> str:
        rendered = " ".join(f"{k}={_text_value(v)}" for k, v in self.fields.items())
        return f"{self.name}: {rendered}" if rendered else self.name


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (never a token or a password). The field
    ``exc_info``, an exception, logs its traceback too (for bugs, never for expected
    failures)."""
    if logger.isEnabledFor(level):
        exc_info = fields.pop("exc_info", None)
        logger.log(level, _Event(name, fields), exc_info=exc_info)


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        if self.worker is not None:
            data["worker"] = self.worker
        if isinstance(record.msg, _Event):
            data["event"] = record.msg.name
            data.update(record.msg.fields)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(level: str, fmt: str, worker: int | None = None) -> None:
    """Log to stderr; ``worker``: this process is worker N of several (tagged in each line)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT.replace("%(name)s", name)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
