"""Append-only ledgers: which copy extends which, and is the part to be sent well formed.

An event log that a cluster job appends to while a laptop appends to its own copy must never be
"synced" by letting one copy overwrite the other: that silently drops the other side's events.
The only safe transfer is one whose destination is a byte prefix of its source. This module
finds that relation with as little I/O as possible (hash the longer copy's prefix where it
lives; read the other side's bytes only to show where two copies diverged) and validates the
bytes about to be sent when the ledger is declared as JSON lines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tether.manifest import Entry
from tether.plan import Growth
from tether.profiles import Ledger

MAX_RECORD_BYTES = 1024 * 1024  # a JSON-lines record longer than this is reported, not sent
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LedgerCheck:
    path: str
    growth: Growth | None  # None: only one side has it (a first transfer)
    divergence: str | None = None  # where the copies first differ, for the error message
    problems: tuple[str, ...] = ()  # what is wrong with the bytes that would be sent


ReadRange = Callable[[int, int], bytes]  # (offset, length) -> bytes


def prefix_digest(read: ReadRange, length: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < length:
        chunk = read(offset, min(CHUNK, length - offset))
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def local_reader(path: Path) -> ReadRange:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


def relate(
    local: Entry, remote: Entry, read_local: ReadRange, read_remote: ReadRange
) -> tuple[Growth, str | None]:
    """Which copy extends the other (their digests differ). Hashes the longer copy's prefix of
    the shorter one's length; bytes of both are read only to describe a divergence."""
    if remote.size <= local.size and prefix_digest(read_local, remote.size) == remote.digest:
        return Growth.LOCAL_AHEAD, None
    if local.size < remote.size and prefix_digest(read_remote, local.size) == local.digest:
        return Growth.REMOTE_AHEAD, None
    window = min(local.size, remote.size, 64 * MAX_RECORD_BYTES)
    return Growth.DIVERGED, first_difference(read_local(0, window + 1), read_remote(0, window + 1))


def first_difference(local: bytes, remote: bytes) -> str:
    """``line N: local has ... / remote has ...`` for the first line where the copies differ."""
    local_lines, remote_lines = local.split(b"\n"), remote.split(b"\n")
    for number, (lo, re_) in enumerate(zip(local_lines, remote_lines, strict=False), start=1):
        if lo != re_:
            return f"line {number}: local has {_show(lo)}, remote has {_show(re_)}"
    number = min(len(local_lines), len(remote_lines))
    return f"line {number}: the copies differ in length there"


def _show(line: bytes, limit: int = 120) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "…")


def jsonl_problems(read: ReadRange, start: int, end: int) -> list[str]:
    """Problems in the JSON-lines records of bytes ``[start, end)``: each line a complete JSON
    object, the last one terminated, none over MAX_RECORD_BYTES. ``start`` is where the part to
    be sent begins (the destination's length), which is always a record boundary when the
    destination is a valid prefix."""
    problems: list[str] = []
    data = read(start, end - start) if end > start else b""
    line_no = 0
    pos = 0
    while pos < len(data) and len(problems) < 5:
        newline = data.find(b"\n", pos)
        line_no += 1
        if newline < 0:
            size = len(data) - pos
            what = "oversized and unterminated" if size > MAX_RECORD_BYTES else "unterminated"
            problems.append(
                f"the last record ({size} bytes after byte {start + pos}) is {what}: a writer may be "
                "mid-append"
            )
            break
        record = data[pos:newline]
        if len(record) > MAX_RECORD_BYTES:
            problems.append(f"record {line_no} after byte {start} is {len(record)} bytes (limit 1 MiB)")
        elif record.strip():
            try:
                value = json.loads(record)
            except ValueError:
                problems.append(f"record {line_no} after byte {start} is not valid JSON: {_show(record, 60)}")
            else:
                if not isinstance(value, dict):
                    problems.append(f"record {line_no} after byte {start} is not a JSON object")
        pos = newline + 1
    return problems


def cut_since_base(local: Entry, remote: Entry, base: Entry | None, read_local: ReadRange) -> str | None:
    """For copies where one extends the other: did either do anything but append since the last
    sync? Only local bytes are read: the shorter copy is a prefix of the longer, so both extend
    the base exactly when the shorter is at least as long and the local prefix matches it."""
    if base is None:
        return None
    for side, entry in (("remote", remote), ("local", local)):
        if entry.size < base.size:
            return f"the {side} copy is shorter than at the last sync ({entry.size} < {base.size} bytes)"
    if prefix_digest(read_local, base.size) != base.digest:
        return "the copies no longer start with what both held at the last sync (edited)"
    return None


def check_ledger(
    ledger: Ledger,
    local: Entry | None,
    remote: Entry | None,
    read_local: ReadRange,
    read_remote: ReadRange,
    base: Entry | None = None,
) -> LedgerCheck | None:
    """Everything planning needs to know about one declared ledger (None: both copies agree or
    neither exists)."""
    if local is None and remote is None:
        return None
    if local is not None and remote is not None:
        if local.same_content(remote):
            return None
        growth, divergence = relate(local, remote, read_local, read_remote)
        if growth != Growth.DIVERGED:
            cut = cut_since_base(local, remote, base, read_local)
            if cut is not None:
                growth, divergence = Growth.REWRITTEN, cut
    else:
        growth, divergence = None, None
    problems: list[str] = []
    if ledger.format == "jsonl":
        if growth == Growth.LOCAL_AHEAD or (growth is None and local is not None):
            start = remote.size if remote is not None and growth is not None else 0
            problems = jsonl_problems(read_local, start, local.size)  # type: ignore[union-attr]
        elif growth == Growth.REMOTE_AHEAD or (growth is None and remote is not None):
            start = local.size if local is not None and growth is not None else 0
            problems = jsonl_problems(read_remote, start, remote.size)  # type: ignore[union-attr]
    return LedgerCheck(ledger.path, growth, divergence, tuple(problems))
