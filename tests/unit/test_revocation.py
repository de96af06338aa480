"""The revocation list (jwtpgproxy.auth.revocation): grammar, matching, caps, and reloading."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from jwtpgproxy.auth.revocation import (
    FileSignature,
    RevocationFile,
    RevocationList,
    file_signature,
    parse_timestamp,
)
from jwtpgproxy.errors import ConfigError

CUTOFF = 1_714_564_800  # 2024-05-01T12:00:00Z


def parse(text: str) -> RevocationList:
    return RevocationList.parse(text, source="revoked.txt")


def bad_line(text: str, line: int) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"revocation file: revoked.txt:{line}: "), message
    return message


# --- Grammar ----------------------------------------------------------------------------------


def test_example_file() -> None:
    revoked = parse(
        "# incident 2024-05-01\n"
        "\n"
        "sub alice before 2024-05-01T12:00:00Z\n"
        "  jti 0b7c4a57-5c63-4a33-9e3f-2f3b1d5d7e21   # leaked in a ticket\n"
        "sub mallory\n"
        'sub "name with spaces" before 1714564800\n'
        'jti "#hash"\n'
        "\t\n"
    )
    assert revoked.jtis == {"0b7c4a57-5c63-4a33-9e3f-2f3b1d5d7e21", "#hash"}
    assert revoked.subjects == {"mallory"}
    assert dict(revoked.subjects_before) == {"alice": CUTOFF, "name with spaces": CUTOFF}
    assert len(revoked) == 5


def test_empty() -> None:
    assert len(parse("")) == 0
    assert len(parse("# only a comment\n\n   \n")) == 0
    assert len(RevocationList()) == 0


def test_quoted_values_are_json_strings() -> None:
    revoked = parse('jti "a\\"b"\nsub "\\u00e9"\njti "with # inside"')
    assert revoked.jtis == {'a"b', "with # inside"}
    assert revoked.subjects == {"é"}


def test_hash_inside_a_word_is_part_of_it() -> None:
    assert parse("jti a#b").jtis == {"a#b"}


def test_crlf_lines() -> None:
    assert parse("jti a\r\njti b\r\n").jtis == {"a", "b"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("alice", 1),  # a bare value: jti or sub? refused rather than guessed
        ("jti a\nbogus b", 2),
        ("JTI a", 1),  # keywords are lower case
        ("jti", 1),
        ("sub", 1),
        ("jti a b", 1),
        ("sub a b", 1),
        ("sub a before", 1),
        ("sub a after 1", 1),
        ("sub a before 1 extra", 1),
        ("sub a before yesterday", 1),
        ("sub a before 2024-05-01", 1),  # no time
        ("sub a before 2024-05-01T12:00:00", 1),  # no zone
        ("sub a before 2024-13-01T12:00:00Z", 1),
        ('jti "unterminated', 1),
        ('jti "a"b', 1),
        ('jti ""', 1),
        ("\n\n# c\njti #comment-not-a-value", 4),
        ("jti 5\nsub 7 before 1e9", 2),
    ],
)
def test_malformed_lines(text: str, line: int) -> None:
    bad_line(text, line)


def test_error_names_setting_and_is_short() -> None:
    with pytest.raises(ConfigError) as info:
        RevocationList.parse("x" * 10000, source="f", setting="REVOCATION")
    assert str(info.value).startswith("REVOCATION: f:1: unknown keyword")
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1714564800", 1714564800.0),
        ("1714564800.5", 1714564800.5),
        ("0", 0.0),
        ("2024-05-01T12:00:00Z", CUTOFF),
        ("2024-05-01t12:00:00z", CUTOFF),
        ("2024-05-01 12:00:00Z", CUTOFF),
        ("2024-05-01T14:00:00+02:00", CUTOFF),
        ("2024-05-01T12:00:00.250Z", CUTOFF + 0.25),
        ("2024-05-01T12:00:00.123456789Z", CUTOFF + 0.123456),
    ],
)
def test_timestamps(text: str, expected: float) -> None:
    assert parse_timestamp(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "1e9", "0x10", "2024-05-01", "2024-05-01T12:00Z", "12:00:00Z", "+5", "nan"]
)
def test_bad_timestamps(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_entry_cap() -> None:
    RevocationList.parse("jti a\njti b\n", max_entries=2)
    with pytest.raises(ConfigError, match=r":4: more than 2 entries"):
        RevocationList.parse("jti a\njti b\n# c\njti c\n", max_entries=2)


# --- Matching ---------------------------------------------------------------------------------


REVOKED = RevocationList.parse(
    "jti leaked\nsub mallory\nsub alice before 2024-05-01T12:00:00Z\n", source="r.txt"
)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "bob", "jti": "leaked"},
        {"sub": "mallory"},
        {"sub": "mallory", "iat": CUTOFF + 10**6},
        {"sub": "alice", "iat": CUTOFF - 1},
        {"sub": "alice", "iat": CUTOFF - 0.001},
        {"sub": "alice"},  # no iat: age unknown, so revoked
        {"sub": "alice", "iat": "2030"},  # not a number: as good as none
        {"sub": "alice", "iat": True},
    ],
)
def test_revoked(claims: dict[str, Any]) -> None:
    assert REVOKED.is_revoked(claims)
    reason = REVOKED.revoked_by(claims)
    assert reason is not None and "r.txt" in reason
    # The reason names the kind of entry, not the value.
    assert "leaked" not in reason and "mallory" not in reason and "alice" not in reason


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"sub": "bob"},
        {"sub": "bob", "jti": "other"},
        {"sub": "alice", "iat": CUTOFF},  # not earlier than the cutoff
        {"sub": "alice", "iat": CUTOFF + 1},
        {"sub": "Mallory"},
        {"sub": "mallory "},
        {"jti": "LEAKED"},
        {"jti": ["leaked"]},
        {"sub": ["mallory"]},
    ],
)
def test_not_revoked(claims: dict[str, Any]) -> None:
    assert not REVOKED.is_revoked(claims)
    assert REVOKED.revoked_by(claims) is None


def test_reasons_differ_by_kind() -> None:
    reasons = {
        REVOKED.revoked_by({"jti": "leaked"}),
        REVOKED.revoked_by({"sub": "mallory"}),
        REVOKED.revoked_by({"sub": "alice", "iat": 1}),
        REVOKED.revoked_by({"sub": "alice"}),
    }
    assert len(reasons) == 4


def test_latest_cutoff_wins_and_full_revocation_overrides() -> None:
    revoked = parse("sub a before 100\nsub a before 300\nsub a before 200\n")
    assert revoked.subjects_before["a"] == 300
    assert revoked.is_revoked({"sub": "a", "iat": 250})
    revoked = parse("sub a before 100\nsub a\n")
    assert "a" not in revoked.subjects_before
    assert revoked.is_revoked({"sub": "a", "iat": 10**9})


def test_list_is_immutable() -> None:
    with pytest.raises(TypeError):
        REVOKED.subjects_before["x"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        REVOKED.jtis = frozenset()  # type: ignore[misc]


# --- Loading files ----------------------------------------------------------------------------


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("jti a\nsub b\n")
    revoked = RevocationList.load(path)
    assert revoked.jtis == {"a"} and revoked.subjects == {"b"}
    assert revoked.source == str(path)


def test_load_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("jti a\n\nnonsense\n")
    with pytest.raises(ConfigError, match=rf"^revocation file: {path}:3: unknown"):
        RevocationList.load(path)


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^revocation file: .*cannot read"):
        RevocationList.load(tmp_path / "missing")


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^revocation file: "):
        RevocationList.load(tmp_path)


def test_load_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("jti a\n" * 100)
    RevocationList.load(path, max_bytes=600)
    with pytest.raises(ConfigError, match=r"larger than 599 bytes"):
        RevocationList.load(path, max_bytes=599)


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_bytes(b"jti a\njti \xff\n")
    with pytest.raises(ConfigError, match=r":2: not UTF-8"):
        RevocationList.load(path)


# --- Change detection and reload -------------------------------------------------------------


def test_file_signature(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    assert file_signature(path) is None
    path.write_text("jti a\n")
    first = file_signature(path)
    assert isinstance(first, FileSignature)
    assert first == file_signature(path)
    time.sleep(0.02)  # file times tick with the kernel's coarse clock
    path.write_text("jti b\n")  # same size, same inode
    os.utime(path, ns=(first.mtime_ns, first.mtime_ns))  # and the old mtime (cp -p)
    second = file_signature(path)
    assert second is not None
    assert (second.size, second.inode, second.mtime_ns) == (first.size, first.inode, first.mtime_ns)
    assert second != first  # the ctime gives it away


def _bump(path: Path, text: str) -> None:
    """Replace the file atomically (new inode), as deployment tools do."""
    new = path.with_suffix(".new")
    new.write_text(text)
    os.replace(new, path)


def test_revocation_file_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("jti a\n")
    source = RevocationFile(path)
    assert source.is_revoked({"jti": "a"}) and not source.is_revoked({"jti": "b"})
    assert source.reload_if_changed() is False  # unchanged: no work
    _bump(path, "jti b\n")
    assert source.reload_if_changed() is True
    assert source.is_revoked({"jti": "b"}) and not source.is_revoked({"jti": "a"})
    assert source.revoked_by({"jti": "b"}) is not None
    assert source.last_error is None


def test_revocation_file_keeps_old_list_on_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("jti a\n")
    source = RevocationFile(path)
    _bump(path, "jti a\ngarbage line\n")
    assert source.reload_if_changed() is False
    assert source.is_revoked({"jti": "a"})
    assert source.last_error is not None and ":2:" in source.last_error
    # The same broken file is not re-read on every poll; a fixed one is taken.
    assert source.reload_if_changed() is False
    _bump(path, "jti c\n")
    assert source.reload_if_changed() is True
    assert source.is_revoked({"jti": "c"}) and source.last_error is None


def test_revocation_file_deleted_keeps_list(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("sub x\n")
    source = RevocationFile(path)
    path.unlink()
    assert source.reload_if_changed() is False
    assert source.is_revoked({"sub": "x"})
    assert source.last_error is not None and "cannot stat" in source.last_error


def test_revocation_file_force(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("sub x\n")
    source = RevocationFile(path)
    assert source.reload_if_changed(force=True) is True


def test_revocation_file_start_up_error(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("what\n")
    with pytest.raises(ConfigError, match=r":1:"):
        RevocationFile(path)
    with pytest.raises(ConfigError, match=r"cannot read"):
        RevocationFile(tmp_path / "missing")


def test_revocation_file_watch(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("jti a\n")
    source = RevocationFile(path)
    seen: list[RevocationList] = []

    async def scenario() -> None:
        task = asyncio.create_task(source.watch(0.01, seen.append))
        await asyncio.sleep(0.05)
        assert seen == []  # nothing changed
        _bump(path, "jti b\n")
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(seen) == 1 and seen[0].jtis == {"b"}
    assert source.current is seen[0]
