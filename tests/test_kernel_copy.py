"""Large files on local disks are copied by the kernel (copy_file_range) and hashed from the
destination's pages (fileio._copy_in_kernel); the no-torn-files rules must hold there exactly as
on the buffered path, and the buffered path must take over wherever the kernel copy cannot run."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import WorkspaceFixture, run_subprocess
from tether import fileio
from tether.errors import VerificationError
from tether.fileio import copy_verified
from tether.paths import TEMP_MARKER
from tether.scan import StatEntry

DS = "ns/ds"
MiB = 1024 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(path: Path) -> StatEntry:
    st = path.stat()
    return StatEntry(path.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


@pytest.fixture
def kernel_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every file of 1 byte or more takes the kernel path; yields the byte counts the kernel
    copied (so a test can tell which path ran)."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", 1)
    copied: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, *args: int) -> int:
        n = real(src, dst, count, *args)
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", counting)
    yield copied


def _payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("step", [fileio.KERNEL_COPY_STEP, 1_000_003], ids=["aligned", "unaligned"])
def test_kernel_copy_writes_and_hashes_exactly_the_source(
    tmp_path: Path, kernel_copies: list[int], monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """An odd step makes every mapping after the first start off a page boundary."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_STEP", step)
    data = _payload(3 * MiB + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    seen: list[int] = []
    got = copy_verified(
        src, tmp_path / "out/dst.bin", digest=_sha(data), mtime_ns=123, label="dst", on_bytes=seen.append
    )
    assert got == _sha(data)
    assert (tmp_path / "out/dst.bin").read_bytes() == data
    assert (tmp_path / "out/dst.bin").stat().st_mtime_ns == 123
    assert sum(kernel_copies) == len(data) and sum(seen) == len(data)
    assert os.listdir(tmp_path / "out") == ["dst.bin"]


def test_kernel_copy_with_a_wrong_digest_promotes_nothing(tmp_path: Path, kernel_copies: list[int]) -> None:
    data = _payload(2 * MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/dst.bin").write_bytes(b"the old version")
    with pytest.raises(VerificationError, match="content hash mismatch"):
        copy_verified(src, tmp_path / "out/dst.bin", digest=_sha(b"other"), mtime_ns=None, label="dst")
    assert kernel_copies, "the kernel path did not run"
    assert os.listdir(tmp_path / "out") == ["dst.bin"]  # no temporary left
    assert (tmp_path / "out/dst.bin").read_bytes() == b"the old version"


@pytest.mark.parametrize("refusal", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_refused_kernel_copy_falls_back_to_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    """Across filesystems (EXDEV) or where the kernel lacks the call, the bytes still arrive."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", 1)
    calls: list[int] = []

    def refuse(*_args: int) -> int:
        calls.append(1)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    data = _payload(2 * MiB + 5)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert copy_verified(src, tmp_path / "dst.bin", digest=_sha(data), mtime_ns=None, label="dst") == _sha(
        data
    )
    assert calls == [1]
    assert (tmp_path / "dst.bin").read_bytes() == data


def test_an_error_after_the_first_kernel_copy_is_raised_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half a file copied then EXDEV is not a refusal to fall back on: the copy fails whole."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", 1)
    monkeypatch.setattr(fileio, "KERNEL_COPY_STEP", MiB)
    real = os.copy_file_range
    calls: list[int] = []

    def fail_second(src: int, dst: int, count: int, *args: int) -> int:
        calls.append(count)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "second call")
        return real(src, dst, count, *args)

    monkeypatch.setattr(os, "copy_file_range", fail_second)
    src = tmp_path / "src.bin"
    src.write_bytes(_payload(3 * MiB))
    with pytest.raises(OSError, match="second call"):
        copy_verified(src, tmp_path / "dst.bin", digest=None, mtime_ns=None, label="dst", expect=_state(src))
    assert sorted(os.listdir(tmp_path)) == ["src.bin"]


@pytest.mark.parametrize(
    ("kind", "suits"),
    [
        ("nfs4", False),
        ("fuse.sshfs", False),
        ("cifs", False),
        ("unknown", False),
        ("xfs", True),
        ("ext4", True),
    ],
)
def test_kernel_copy_runs_on_local_disks_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str, suits: bool
) -> None:
    from tether.remotes import ssh_helper

    monkeypatch.setattr(ssh_helper, "filesystem_type", lambda path: kind)
    monkeypatch.setattr(fileio, "_suits_by_device", {})
    assert fileio.kernel_copy_suits(str(tmp_path)) is suits


def test_the_filesystem_is_looked_up_once_per_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A pull stages large files in many folders of one filesystem: one /proc/mounts read."""
    from tether.remotes import ssh_helper

    looked_up: list[str] = []
    monkeypatch.setattr(ssh_helper, "filesystem_type", lambda path: looked_up.append(path) or "ext4")
    monkeypatch.setattr(fileio, "_suits_by_device", {})
    folders = [tmp_path / f"d{i}" for i in range(5)]
    for folder in folders:
        folder.mkdir()
    assert all(fileio.kernel_copy_suits(str(f)) for f in folders)
    assert looked_up == [str(folders[0])]


def test_small_files_and_unsuited_folders_keep_the_buffered_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(1) or 0)
    src = tmp_path / "src.bin"
    src.write_bytes(b"small")
    copy_verified(src, tmp_path / "a.bin", digest=_sha(b"small"), mtime_ns=None, label="a")
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", 1)
    monkeypatch.setattr(fileio, "kernel_copy_suits", lambda folder: False)
    copy_verified(src, tmp_path / "b.bin", digest=_sha(b"small"), mtime_ns=None, label="b")
    assert calls == []
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == b"small"


# -- end to end through the CLI, in a child process with the threshold lowered -----------------------
KERNEL_ENV = {"TETHER_KERNEL_COPY_MIN": str(MiB)}


def _large_tree() -> dict[str, bytes]:
    rng = random.Random(5)
    return {
        "records.parquet": rng.randbytes(3 * MiB + 123),
        "_derived/big.bin": rng.randbytes(2 * MiB),
        "_derived/small.txt": b"small stays buffered\n",
        "empty.txt": b"",
    }


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_push_and_pull_of_large_files_through_the_kernel_copy(
    ws: WorkspaceFixture, ws2: WorkspaceFixture
) -> None:
    files = _large_tree()
    write_tree(ws.data / DS, files)
    r = run_subprocess(["push", DS, "store", "-y"], cwd=ws.root, env=KERNEL_ENV)
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in _tree(ws.remote_dir / DS).items() if not k.startswith(".tether")} == files
    r = run_subprocess(["pull", DS, "store", "-y"], cwd=ws2.root, env=KERNEL_ENV)
    assert r.exit_code == 0, r.output
    assert _tree(ws2.data / DS) == files
    assert run_subprocess(["diff", DS, "store"], cwd=ws2.root, env=KERNEL_ENV).exit_code == 0


@pytest.mark.parametrize("spec", ["mid_file:2", "before_rename:1"])
def test_push_killed_inside_a_kernel_copy_leaves_nothing_torn(ws: WorkspaceFixture, spec: str) -> None:
    files = _large_tree()
    write_tree(ws.data / DS, files)
    r = run_subprocess(
        ["push", DS, "store", "-y", "--jobs", "1"],
        cwd=ws.root,
        env={**KERNEL_ENV, "TETHER_FAULT_KILL_AT": spec},
    )
    assert r.exit_code == -9, f"checkpoint {spec} was never reached (exit {r.exit_code}):\n{r.output}"
    for path, data in _tree(ws.remote_dir / DS).items():
        if TEMP_MARKER in path or path.startswith(".tether"):
            continue
        assert data == files[path], f"{path} is torn after a kill at {spec}"
    r = run_subprocess(["push", DS, "store", "-y"], cwd=ws.root, env=KERNEL_ENV)
    assert r.exit_code == 0, r.output
    remote = {k: v for k, v in _tree(ws.remote_dir / DS).items() if not k.startswith(".tether")}
    assert remote == files
    assert run_subprocess(["diff", DS, "store"], cwd=ws.root).exit_code == 0
