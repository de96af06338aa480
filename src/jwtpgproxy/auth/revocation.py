"""A revocation list read from a file: refuse tokens before they expire.

File format -- UTF-8, one entry per line; blank lines and everything from a ``#`` that starts
a word (at the start of the line or after whitespace) to the end of the line are ignored::

    # an incident on 2024-05-01: everything alice holds, and one leaked token
    sub alice before 2024-05-01T12:00:00Z
    jti 0b7c4a57-5c63-4a33-9e3f-2f3b1d5d7e21
    sub mallory                      # every token of this subject, whatever its age
    sub "name with spaces" before 1714564800

* ``jti <value>`` -- the token whose ``jti`` claim equals the value is revoked.
* ``sub <value>`` -- every token whose ``sub`` claim equals the value is revoked.
* ``sub <value> before <time>`` -- tokens of that ``sub`` issued (``iat``) strictly earlier
  than ``<time>`` are revoked; a token of that ``sub`` without ``iat`` counts as revoked, since
  its age cannot be told. ``<time>`` is Unix seconds (``1714564800``, ``1714564800.5``) or an
  RFC 3339 timestamp with a zone (``2024-05-01T12:00:00Z``, ``...+02:00``). No leeway applies.

A value is one word without whitespace, or a JSON string literal (``"..."``) for anything
else (spaces, a leading ``#`` or ``"``). Keywords are lower case. There is deliberately no
bare-value form ("one jti per line"): a line saying just ``alice`` could mean a jti or a
subject, and guessing wrong silently leaves a token valid; such a line is refused with a
:class:`ConfigError` naming ``file:line`` -- as is every other malformed line.

``sub`` is the JWT ``sub`` claim itself, whatever claim names the database role
(:attr:`jwtpgproxy.auth.policy.ClaimPolicy.role_claim`): revocation targets the identity
the issuer vouched for.

Values are compared exactly (case-sensitive, no Unicode normalisation), like the claims.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import ConfigError
from ..logs import event
from .policy import is_numeric_date

log = logging.getLogger("jwtpgproxy.revocation")

MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_ENTRIES = 1_000_000
#: What errors call the file unless the caller names its setting.
DEFAULT_SETTING = "revocation file"

_UNIX_SECONDS = re.compile(r"-?[0-9]{1,16}(\.[0-9]{1,9})?")
# RFC 3339 section 5.6 date-time, time zone required (a naive time is ambiguous).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DECODER = json.JSONDecoder()


def parse_timestamp(text: str) -> float:
    """Unix seconds or an RFC 3339 date-time with a zone; raise ValueError otherwise."""
    if _UNIX_SECONDS.fullmatch(text):
        return float(text)
    if not _RFC3339.fullmatch(text):
        raise ValueError("expected Unix seconds or an RFC 3339 timestamp with a time zone")
    normalised = text.upper().replace(" ", "T")
    if "." in normalised:
        # datetime takes at most 6 fractional digits; finer precision is irrelevant here.
        head, rest = normalised.split(".", 1)
        digits = re.match(r"[0-9]+", rest)
        assert digits is not None
        normalised = f"{head}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end() :]}"
    moment = datetime.datetime.fromisoformat(normalised.replace("Z", "+00:00"))
    return moment.timestamp()


def _words(line: str) -> list[str]:
    """Split a line into words: bare words, or JSON string literals; stop at a comment."""
    words: list[str] = []
    index, end = 0, len(line)
    while True:
        while index < end and line[index].isspace():
            index += 1
        if index >= end or line[index] == "#":
            return words
        if line[index] == '"':
            try:
                value, index = _DECODER.raw_decode(line, index)
            except json.JSONDecodeError:
                raise ValueError("unterminated or invalid quoted value") from None
            if index < end and not line[index].isspace():
                raise ValueError("a quoted value must be followed by whitespace")
            words.append(value)
            continue
        start = index
        while index < end and not line[index].isspace():
            index += 1
        words.append(line[start:index])


@dataclass(frozen=True, slots=True)
class RevocationList:
    """An immutable set of revocation entries. Build with :meth:`load` or :meth:`parse`."""

    jtis: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()
    #: ``sub`` -> tokens issued before this Unix time are revoked.
    subjects_before: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<empty>"

    def __len__(self) -> int:
        return len(self.jtis) + len(self.subjects) + len(self.subjects_before)

    @classmethod
    def parse(
        cls,
        text: str | Iterable[str],
        *,
        source: str = "<string>",
        setting: str = DEFAULT_SETTING,
        max_entries: int = MAX_ENTRIES,
    ) -> RevocationList:
        """Parse the file format above; a bad line raises ConfigError naming source:line."""
        lines = text.splitlines() if isinstance(text, str) else text
        jtis: set[str] = set()
        subjects: set[str] = set()
        before: dict[str, float] = {}
        count = 0
        for number, line in enumerate(lines, start=1):

            def fail(why: str, number: int = number) -> ConfigError:
                return ConfigError(f"{source}:{number}: {why}", setting=setting)

            try:
                words = _words(line)
            except ValueError as exc:
                raise fail(str(exc)) from None
            if not words:
                continue
            keyword, args = words[0], words[1:]
            if keyword not in ("jti", "sub"):
                raise fail(
                    f"unknown keyword {keyword[:20]!r}: expected 'jti <value>', "
                    "'sub <value>' or 'sub <value> before <time>'"
                )
            if not args:
                raise fail(f"'{keyword}' needs a value")
            value = args[0]
            if not value:
                raise fail("empty value")
            count += 1
            if count > max_entries:
                raise fail(f"more than {max_entries} entries")
            if keyword == "jti":
                if len(args) != 1:
                    raise fail("'jti' takes exactly one value (quote values with spaces)")
                jtis.add(value)
            elif len(args) == 1:
                subjects.add(value)
            elif len(args) == 3 and args[1] == "before":
                try:
                    cutoff = parse_timestamp(args[2])
                except ValueError as exc:
                    raise fail(f"bad time after 'before': {exc}") from None
                before[value] = max(cutoff, before.get(value, cutoff))
            else:
                raise fail("expected 'sub <value>' or 'sub <value> before <time>'")
        for subject in subjects:
            before.pop(subject, None)  # revoked outright: the cutoff no longer matters
        return cls(frozenset(jtis), frozenset(subjects), MappingProxyType(before), source)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        setting: str = DEFAULT_SETTING,
        max_bytes: int = MAX_FILE_BYTES,
        max_entries: int = MAX_ENTRIES,
    ) -> RevocationList:
        """Read and parse a revocation file; any problem raises ConfigError naming it."""
        path = Path(path)
        try:
            with path.open("rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ConfigError(f"{path}: not a regular file", setting=setting)
                if info.st_size > max_bytes:
                    raise ConfigError(f"{path}: larger than {max_bytes} bytes", setting=setting)
                data = file.read(max_bytes + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})", setting=setting) from None
        if len(data) > max_bytes:  # grew between fstat() and read()
            raise ConfigError(f"{path}: larger than {max_bytes} bytes", setting=setting)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8", setting=setting) from None
        return cls.parse(text, source=str(path), setting=setting, max_entries=max_entries)

    def revoked_by(self, claims: Mapping[str, Any]) -> str | None:
        """Which kind of entry revokes these claims (log-safe, no values), or None."""
        jti = claims.get("jti")
        if isinstance(jti, str) and jti in self.jtis:
            return f"jti entry in {self.source}"
        subject = claims.get("sub")
        if not isinstance(subject, str):
            return None
        if subject in self.subjects:
            return f"sub entry in {self.source}"
        cutoff = self.subjects_before.get(subject)
        if cutoff is not None:
            issued = claims.get("iat")
            if not is_numeric_date(issued):
                return f"sub-before entry in {self.source} (token has no iat)"
            if issued < cutoff:
                return f"sub-before entry in {self.source}"
        return None

    def is_revoked(self, claims: Mapping[str, Any]) -> bool:
        return self.revoked_by(claims) is not None


class FileSignature(NamedTuple):
    """What changes when a file is edited or replaced; cheap to read (one stat())."""

    mtime_ns: int
    ctime_ns: int  # catches edits that restore the mtime (cp -p, rsync -t)
    size: int
    inode: int
    device: int


def file_signature(path: str | os.PathLike[str]) -> FileSignature | None:
    """The file's :class:`FileSignature`, or None if it cannot be stat()ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileSignature(info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_dev)


class RevocationFile:
    """The current :class:`RevocationList` of a file, reloaded when the file changes.

    Loaded once at construction (a problem raises ConfigError: refuse to start). Later
    reloads never raise: a file that became unreadable, malformed or was deleted keeps the
    last good list in force (so a typo cannot silently un-revoke everything) and the
    problem is kept in :attr:`last_error` and logged. A file caught mid-write (its signature
    changed while it was read) is not used; the next poll reads it again. Writing the new
    file elsewhere and renaming it into place avoids that window altogether.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        setting: str = DEFAULT_SETTING,
        max_bytes: int = MAX_FILE_BYTES,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.path = Path(path)
        self.setting = setting
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.last_error: str | None = None
        self.signature = file_signature(self.path)
        self.current = self._load()

    def _load(self) -> RevocationList:
        return RevocationList.load(
            self.path,
            setting=self.setting,
            max_bytes=self.max_bytes,
            max_entries=self.max_entries,
        )

    def revoked_by(self, claims: Mapping[str, Any]) -> str | None:
        return self.current.revoked_by(claims)

    def is_revoked(self, claims: Mapping[str, Any]) -> bool:
        return self.current.revoked_by(claims) is not None

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Reload when the file's signature changed (or ``force``); True if the list was
        replaced. Blocking file I/O: call from a thread or use :meth:`poll`."""
        before = file_signature(self.path)
        if before is None:
            self._failed(f"{self.setting}: {self.path}: cannot stat (deleted?)")
            return False
        if before == self.signature and not force:
            return False
        try:
            loaded = self._load()
        except ConfigError as exc:
            self.signature = before  # do not re-read the same broken file on every poll
            self._failed(str(exc))
            return False
        if file_signature(self.path) != before:
            return False  # changed while being read: take it on the next poll
        self.signature = before
        self.current = loaded
        self.last_error = None
        event(log, INFO, "revocation list reloaded", entries=len(loaded), path=str(self.path))
        return True

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            event(
                log,
                WARNING,
                "revocation list not reloaded: keeping the previous one",
                error=message,
            )
        self.last_error = message

    async def poll(self, *, force: bool = False) -> bool:
        """:meth:`reload_if_changed` in a worker thread (a large file takes a while)."""
        return await asyncio.to_thread(self.reload_if_changed, force=force)

    async def watch(
        self,
        interval: float,
        on_change: Callable[[RevocationList], object] | None = None,
    ) -> None:
        """Poll every ``interval`` seconds forever (run it as a task; cancel to stop). After
        each successful reload, call ``on_change(new_list)`` -- e.g. to end live sessions
        whose token is now revoked."""
        while True:
            await asyncio.sleep(interval)
            try:
                changed = await self.poll()
            except Exception as exc:  # never let the watcher die silently
                event(log, ERROR, "revocation list poll failed", exc_info=exc)
                continue
            if changed and on_change is not None:
                on_change(self.current)
