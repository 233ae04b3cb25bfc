"""The read-ahead hints: SequentialReadAhead keeps a bounded window queued ahead of a reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tether import readahead
from tether.readahead import SequentialReadAhead

MIB = 1024 * 1024


@pytest.fixture
def advised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append((offset // MIB, length // MIB))

    monkeypatch.setattr(readahead.os, "posix_fadvise", fadvise)
    return calls


def test_the_window_moves_with_the_reader_and_stops_at_the_end(advised: list[tuple[int, int]]) -> None:
    ahead = SequentialReadAhead(3, 0, 100 * MIB)
    ahead.reading(0)
    assert advised == [(0, 16), (16, 16), (32, 16), (48, 16)]  # 64 MiB ahead, in steps of 16
    ahead.reading(1 * MIB)
    assert advised[4:] == [(64, 16)]  # the window's end passed what was asked: one step more
    ahead.reading(10 * MIB)
    assert len(advised) == 5  # 74 MiB is inside what was asked: nothing more
    ahead.reading(99 * MIB)
    assert advised[5:] == [(80, 16), (96, 16)]  # never a window past the file's end
    ahead.reading(100 * MIB)
    assert len(advised) == 7


def test_a_resumed_upload_reads_ahead_from_where_it_starts(advised: list[tuple[int, int]]) -> None:
    SequentialReadAhead(3, 40 * MIB, 50 * MIB).reading(40 * MIB)
    assert advised == [(40, 16)]


def test_a_refused_hint_is_not_asked_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []

    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(offset)
        raise OSError(22, "not supported here")

    monkeypatch.setattr(readahead.os, "posix_fadvise", refuse)
    ahead = SequentialReadAhead(3, 0, 200 * MIB)
    ahead.reading(0)
    ahead.reading(100 * MIB)
    assert calls == [0]


def test_on_a_real_file_the_hints_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(os.urandom(3 * MIB))
    with open(path, "rb", buffering=0) as f:
        ahead = SequentialReadAhead(f.fileno(), 0, 3 * MIB)
        ahead.reading(0)
        assert ahead._enabled and ahead._queued >= 3 * MIB
        assert f.read() == path.read_bytes()
