"""Unit tests for tether.scan: manifest-ordered walk, refusal of links and special files."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tether.errors import ExitCode, ScanError, TetherError
from tether.hashing import HashCache, hash_entries
from tether.manifest import Manifest
from tether.paths import sort_key
from tether.scan import ScanReport, StatEntry, scan_tree


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def paths(entries: list[StatEntry]) -> list[str]:
    return [e.path for e in entries]


def test_scan_returns_sorted_manifest_order(tmp_path: Path) -> None:
    names = ["a.b", "a/b", "a/c/d", "a-b", "a0", "b", "é", "Z", "sub/deeper/x", "sub.txt", "sub/y"]
    for n in reversed(names):
        touch(tmp_path / n)
    got = paths(scan_tree(tmp_path))
    assert got == sorted(names, key=sort_key)
    assert got.index("a/b") < got.index("a.b")
    assert got.index("sub/y") < got.index("sub.txt")


def test_scan_records_size_mtime_inode(tmp_path: Path) -> None:
    f = touch(tmp_path / "d" / "f.bin", b"12345")
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    (entry,) = scan_tree(tmp_path)
    st = f.stat()
    assert entry == StatEntry("d/f.bin", 5, 1_600_000_000_123_456_789, st.st_ino, st.st_ctime_ns)


def test_scan_includes_empty_and_hidden_files_but_not_empty_dirs(tmp_path: Path) -> None:
    touch(tmp_path / "empty", b"")
    touch(tmp_path / ".hidden")
    (tmp_path / "emptydir" / "nested").mkdir(parents=True)

    def entry(name: str) -> StatEntry:
        st = (tmp_path / name).stat()
        return StatEntry(name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    assert scan_tree(tmp_path) == [entry(".hidden"), entry("empty")]
    assert entry("empty").size == 0


def test_scan_never_lists_state_or_git(tmp_path: Path) -> None:
    touch(tmp_path / ".tether" / "index")
    touch(tmp_path / ".git" / "HEAD")
    touch(tmp_path / "sub" / ".tether" / "lock")  # tether state at any depth is skipped
    touch(tmp_path / ".gitignore")
    touch(tmp_path / ".tether-notes")
    touch(tmp_path / "data.csv")
    assert paths(scan_tree(tmp_path)) == [".gitignore", ".tether-notes", "data.csv"]


def test_scan_empty_and_missing_roots(tmp_path: Path) -> None:
    assert scan_tree(tmp_path) == []
    assert scan_tree(tmp_path / "missing") == []


def test_scan_keep_predicate_gets_relative_posix_paths(tmp_path: Path) -> None:
    for n in ["keep.csv", "drop.txt", "sub/keep2.csv", "sub/drop.txt"]:
        touch(tmp_path / n)
    seen: list[str] = []

    def keep(rel: str) -> bool:
        seen.append(rel)
        return rel.endswith(".csv")

    assert paths(scan_tree(tmp_path, keep=keep)) == ["keep.csv", "sub/keep2.csv"]
    assert sorted(seen) == ["drop.txt", "keep.csv", "sub/drop.txt", "sub/keep2.csv"]


# -- symlinks and special files ------------------------------------------------------------------


def test_symlinks_are_refused_and_all_are_listed(tmp_path: Path) -> None:
    target = touch(tmp_path.parent / f"{tmp_path.name}-outside" / "secret")
    touch(tmp_path / "ok.csv")
    (tmp_path / "link_file").symlink_to(target)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link_dir").symlink_to(target.parent, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing-here")
    with pytest.raises(ScanError) as info:
        scan_tree(tmp_path)
    err = info.value
    assert sorted(err.paths) == ["dangling", "link_file", "sub/link_dir"]
    assert err.exit_code == ExitCode.USAGE == 2
    for p in err.paths:
        assert p in err.message
    assert "3 symlink" in err.message
    assert "--skip-symlinks" in err.hint


def test_scan_error_message_samples_many_paths(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"l{i}").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ScanError) as info:
        scan_tree(tmp_path)
    assert len(info.value.paths) == 8  # all of them, for the caller
    assert "and 3 more" in info.value.message


def test_skip_symlinks_reports_them(tmp_path: Path) -> None:
    touch(tmp_path / "ok.csv")
    (tmp_path / "l1").symlink_to(tmp_path / "ok.csv")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "l2").symlink_to(tmp_path / "d", target_is_directory=True)  # a loop
    report = ScanReport()
    assert paths(scan_tree(tmp_path, skip_symlinks=True, report=report)) == ["ok.csv"]
    assert report.skipped_symlinks == ["d/l2", "l1"]


def test_skip_symlinks_without_report_argument(tmp_path: Path) -> None:
    (tmp_path / "l").symlink_to(tmp_path / "nowhere")
    assert scan_tree(tmp_path, skip_symlinks=True) == []


def test_fifo_is_refused_even_with_skip_symlinks(tmp_path: Path) -> None:
    touch(tmp_path / "ok.csv")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "l").symlink_to(tmp_path / "ok.csv")
    report = ScanReport()
    with pytest.raises(ScanError) as info:
        scan_tree(tmp_path, skip_symlinks=True, report=report)
    assert info.value.paths == ["pipe"]
    assert "FIFOs" in info.value.hint


def test_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    except OSError:  # pragma: no cover - path too long for AF_UNIX
        pytest.skip("cannot bind a unix socket here")
    try:
        with pytest.raises(ScanError) as info:
            scan_tree(tmp_path)
        assert info.value.paths == ["s"]
    finally:
        sock.close()


def test_excluded_special_files_are_not_refused(tmp_path: Path) -> None:
    touch(tmp_path / "ok.csv")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "link").symlink_to(tmp_path / "nowhere")
    report = ScanReport()

    def keep(rel: str) -> bool:
        return rel != "pipe" and not rel.startswith("cache/")

    assert paths(scan_tree(tmp_path, keep=keep, report=report)) == ["ok.csv"]
    assert report.skipped_symlinks == []


def test_symlinked_state_dir_is_ignored(tmp_path: Path) -> None:
    (tmp_path / ".tether").symlink_to(tmp_path / "nowhere")
    assert scan_tree(tmp_path) == []


# -- names the rest of tether refuses ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(b"t:1", id="drive-like"),
        pytest.param(b"a\\b", id="backslash"),
        pytest.param(b"\xff.bin", id="not-utf8"),
    ],
)
def test_scanned_names_survive_a_manifest_round_trip_or_are_refused(tmp_path: Path, name: bytes) -> None:
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as f:
        f.write(b"data")
    try:
        stats = scan_tree(tmp_path)
    except TetherError:
        return  # refused up front, before anything is transferred: fine
    manifest = Manifest(hash_entries(tmp_path, stats, HashCache(None)))
    assert Manifest.loads(manifest.dumps()) == manifest


def test_keep_may_arrive_while_the_tree_is_walked(tmp_path: Path) -> None:
    from concurrent.futures import Future

    (tmp_path / "tracked.txt").write_text("x")
    (tmp_path / "data.bin").write_text("y")
    os.symlink("data.bin", tmp_path / "tracked-link")
    later: Future[Callable[[str], bool]] = Future()
    later.set_result(lambda rel: not rel.startswith("tracked"))
    # the link is not tether's (keep rejects it), so it is not refused either
    assert [e.path for e in scan_tree(tmp_path, keep=later)] == ["data.bin"]
