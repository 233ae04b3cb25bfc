"""Invariants 1 (no torn files) and 7 (re-running converges) under faults.

A real ``tether`` child process is SIGKILLed at a deterministic checkpoint
(``TETHER_FAULT_KILL_AT=NAME:N``, see src/tether/faults.py). After the kill every file under
its final name must hold exactly its old or its new bytes, and running the same command again,
without any manual clean-up, must finish the job: both sides byte-identical, ``tether diff``
clean, no temporary files, the lock released.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Result, WorkspaceFixture, make_workspace, run_subprocess, snapshot
from tether import fileio, sync
from tether.errors import ExitCode, TetherError
from tether.hashing import digest_bytes
from tether.lock import lock_path
from tether.manifest import Manifest
from tether.paths import STATE_DIR, TEMP_MARKER

DS = "ns/ds"
KILL = "TETHER_FAULT_KILL_AT"
MIRROR_PUSH = ["push", DS, "store", "--mode", "mirror", "-y"]
MIRROR_PULL = ["pull", DS, "store", "--mode", "mirror", "-y"]


# -- datasets ------------------------------------------------------------------------------------
def make_v1() -> dict[str, bytes]:
    """30 files: empty, small text, nested binaries, and two files larger than the 1 MiB chunk."""
    rng = random.Random(1234)
    files: dict[str, bytes] = {"empty.txt": b""}
    for i in range(8):
        files[f"top{i:02d}.txt"] = (f"row {i};" * (i * 41 + 1)).encode()
    for i in range(12):
        files[f"nested/n{i % 3}/deeper/part{i:02d}.bin"] = rng.randbytes(rng.randint(1, 48 * 1024))
    for i in range(6):
        files[f"tables/t{i}.csv"] = "".join(f"{i},{j},{j * j}\n" for j in range(200 * (i + 1))).encode()
    files["big/blob0.dat"] = rng.randbytes(1_300_000)
    files["big/blob1.dat"] = rng.randbytes(2_200_000)
    files["a/b/c/d/e/leaf.json"] = b'{"k": 1}'
    assert len(files) == 30
    return files


def same_size_change(data: bytes, seed: int) -> bytes:
    new = random.Random(seed).randbytes(len(data))
    assert new != data
    return new


def make_v2(v1: dict[str, bytes]) -> dict[str, bytes]:
    """v1 with 8 overwrites (some of the same size), 9 new files and 4 deletes: 17 uploads."""
    files = dict(v1)
    files["top00.txt"] = b"rewritten, longer than before\n" * 3
    files["top03.txt"] = same_size_change(v1["top03.txt"], 3)
    files["nested/n0/deeper/part00.bin"] = same_size_change(v1["nested/n0/deeper/part00.bin"], 4)
    files["nested/n1/deeper/part04.bin"] = b"shrunk"
    files["big/blob1.dat"] = same_size_change(v1["big/blob1.dat"], 5)  # same size, several chunks
    files["tables/t2.csv"] = v1["tables/t2.csv"] + b"2,extra,row\n"
    files["empty.txt"] = b"not empty any more\n"
    files["a/b/c/d/e/leaf.json"] = b'{"k": 2}'
    rng = random.Random(99)
    for i in range(5):
        files[f"new/f{i}.bin"] = rng.randbytes(rng.randint(1, 32 * 1024))
    files["new/large.bin"] = rng.randbytes(1_200_000)
    files["top99.txt"] = b"new top-level file\n"
    files["nested/n9/x/y.bin"] = rng.randbytes(777)
    files["new/zero.txt"] = b""
    for gone in ("top07.txt", "nested/n2/deeper/part11.bin", "tables/t5.csv", "big/blob0.dat"):
        del files[gone]
    assert len(files) == 35
    return files


V1 = make_v1()
V2 = make_v2(V1)
UPLOADS = sum(1 for p, d in V2.items() if V1.get(p) != d)
DELETES = len(V1.keys() - V2.keys())
assert (UPLOADS, DELETES) == (17, 4)


# -- helpers -------------------------------------------------------------------------------------
def write_tree(root: Path, files: dict[str, bytes], previous: dict[str, bytes] | None = None) -> None:
    """Make ``root`` hold ``files``: write what differs from ``previous``, delete what is gone."""
    previous = previous or {}
    for rel in previous.keys() - files.keys():
        (root / rel).unlink()
    for rel, data in files.items():
        if previous.get(rel) != data:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under its final name below ``root`` (tether's state folders left out)."""
    out: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in names:
            if TEMP_MARKER in name:
                continue
            path = Path(folder, name)
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def temp_files(root: Path) -> list[str]:
    return sorted(
        str(Path(folder, n).relative_to(root))
        for folder, _dirs, names in os.walk(root)
        for n in names
        if TEMP_MARKER in n
    )


def assert_whole(found: dict[str, bytes], old: dict[str, bytes], new: dict[str, bytes], where: str) -> None:
    """No torn files: each file is byte-for-byte its old or its new version; none is lost."""
    for rel, data in sorted(found.items()):
        assert rel in old or rel in new, f"{where}: unexpected file {rel}"
        assert data in (old.get(rel), new.get(rel)), f"{where}: {rel} is neither old nor new (torn?)"
    lost = sorted((old.keys() & new.keys()) - found.keys())
    assert not lost, f"{where}: files present before and after the change vanished: {lost}"


def assert_index_honest(ws: WorkspaceFixture) -> None:
    """The remote index never vouches for bytes a file does not hold (invariant 2)."""
    index = ws.remote_dir / DS / STATE_DIR / "index"
    if not index.exists():
        return
    manifest = Manifest.loads(index.read_bytes())  # written atomically: always readable
    for entry in manifest:
        path = ws.remote_file(entry.path)
        if not path.exists():
            continue  # a deleted file the index still lists is caught by the listing
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns):
            assert digest_bytes(path.read_bytes()) == entry.digest, f"index vouches wrongly for {entry.path}"


def assert_tree_equal(found: dict[str, bytes], expected: dict[str, bytes], where: str) -> None:
    assert sorted(found) == sorted(expected), f"{where}: file lists differ"
    wrong = sorted(rel for rel in expected if found[rel] != expected[rel])
    assert not wrong, f"{where}: wrong bytes in {wrong}"


def assert_converged(tether, ws: WorkspaceFixture, expected: dict[str, bytes]) -> None:
    assert_tree_equal(tree(ws.data / DS), expected, "local")
    assert_tree_equal(tree(ws.remote_dir / DS), expected, "remote")
    assert temp_files(ws.remote_dir) == [], "temporary files left on the remote"
    assert temp_files(ws.data) == [], "temporary files left in the local dataset"
    assert_index_honest(ws)
    r = tether("diff", DS, "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert_lock_released(ws)


def assert_lock_released(ws: WorkspaceFixture) -> None:
    """Checked last, so that the known bug below masks no other failure."""
    assert not (ws.remote_dir / lock_path(DS)).exists(), "the killed run's lock is still on the remote"


# A kill after the last data write leaves nothing to do, so the rerun stops before the lock
# ("Already up to date") and never removes the dead run's lock record.


def run_killed(args: list[str], ws: WorkspaceFixture, spec: str) -> Result:
    r = run_subprocess(args, cwd=ws.root, env={KILL: spec})
    assert r.exit_code == -9, f"checkpoint {spec} was never reached (exit {r.exit_code}):\n{r.output}"
    return r


def ok(tether, ws: WorkspaceFixture, args: list[str]) -> Result:
    r = tether(*args, cwd=ws.root)
    assert r.exit_code == 0, r.output
    return r


# -- push killed at every checkpoint -------------------------------------------------------------
PUSH_KILLS = [
    "locked:1",
    "before_rename:1",
    f"before_rename:{UPLOADS}",
    "uploaded:1",
    "uploaded:15",
    f"uploaded:{UPLOADS}",
    "deleted_remote:1",
    f"deleted_remote:{DELETES}",
    "before_index:1",
    "before_base:1",
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", PUSH_KILLS)
def test_push_killed_then_rerun_converges(ws: WorkspaceFixture, tether, spec: str) -> None:
    dataset = ws.data / DS
    write_tree(dataset, V1)
    ok(tether, ws, MIRROR_PUSH)
    write_tree(dataset, V2, V1)

    run_killed(MIRROR_PUSH, ws, spec)

    assert_whole(tree(ws.remote_dir / DS), V1, V2, f"remote after kill at {spec}")
    assert_index_honest(ws)
    assert tree(dataset) == V2  # a push never touches the local data
    if spec.startswith("before_rename"):
        assert temp_files(ws.remote_dir), "the kill should have left a temporary file to clean up"
    ok(tether, ws, MIRROR_PUSH)
    assert_converged(tether, ws, V2)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["before_rename:8", "uploaded:15", "before_index:1"])
def test_first_push_killed_then_rerun_converges(ws: WorkspaceFixture, tether, spec: str) -> None:
    """Killed while the remote has no copy yet (no index, no base)."""
    write_tree(ws.data / DS, V1)
    run_killed(["push", DS, "store", "-y"], ws, spec)
    assert_whole(tree(ws.remote_dir / DS), {}, V1, f"remote after kill at {spec}")
    ok(tether, ws, ["push", DS, "store", "-y"])
    assert_converged(tether, ws, V1)


# -- pull killed at every checkpoint -------------------------------------------------------------
def setup_pull(tether, ws: WorkspaceFixture, ws2: WorkspaceFixture) -> Path:
    """ws2 holds V1 from an earlier pull; the remote now holds V2."""
    write_tree(ws.data / DS, V1)
    ok(tether, ws, MIRROR_PUSH)
    ok(tether, ws2, MIRROR_PULL)
    write_tree(ws.data / DS, V2, V1)
    ok(tether, ws, MIRROR_PUSH)
    assert tree(ws.remote_dir / DS) == V2
    return ws2.data / DS


BEFORE_PROMOTION = [
    "locked:1",
    "before_rename:1",
    f"before_rename:{UPLOADS}",
    "downloaded:1",
    "downloaded:9",
    f"downloaded:{UPLOADS}",
]
PULL_KILLS = [
    *BEFORE_PROMOTION,
    "promoted:1",
    "promoted:10",
    "deleted_local:1",
    f"deleted_local:{DELETES}",
    "before_base:1",
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", PULL_KILLS)
def test_pull_killed_then_rerun_converges(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, spec: str
) -> None:
    dataset = setup_pull(tether, ws, ws2)
    before = snapshot(dataset)
    base = ws2.workspace().base_path("store", DS)
    base_before = base.read_bytes()

    run_killed(MIRROR_PULL, ws2, spec)

    assert_whole(tree(dataset), V1, V2, f"local after kill at {spec}")
    if spec.startswith("before_rename"):
        # Staging is written in place (never a real name): the verified file waits there.
        staged = [p for p in ws2.workspace().staging_dir.rglob("*") if p.is_file()]
        assert staged, "expected a staged file"
    if spec in BEFORE_PROMOTION:
        # Interrupted before promotion: the previous local dataset is exactly as it was.
        assert snapshot(dataset) == before
        assert base.read_bytes() == base_before
    assert tree(ws.remote_dir / DS) == V2  # a pull never touches the remote data

    ok(tether, ws2, MIRROR_PULL)
    assert_tree_equal(tree(dataset), V2, "local after rerun")
    assert temp_files(dataset) == []
    assert temp_files(ws2.workspace().staging_dir) == []
    assert tether("diff", DS, "store", cwd=ws2.root).exit_code == 0
    assert tether("diff", DS, "store", cwd=ws.root).exit_code == 0
    assert_lock_released(ws)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["downloaded:9", "promoted:1", f"promoted:{len(V1)}", "before_base:1"])
def test_first_pull_killed_then_rerun_converges(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, spec: str
) -> None:
    """Into an empty workspace, where the staged tree is promoted by one rename."""
    write_tree(ws.data / DS, V1)
    ok(tether, ws, MIRROR_PUSH)
    run_killed(["pull", DS, "store", "-y"], ws2, spec)
    dataset = ws2.data / DS
    assert_whole(tree(dataset), {}, V1, f"local after kill at {spec}")
    if spec.startswith("downloaded"):
        assert tree(dataset) == {}
    ok(tether, ws2, ["pull", DS, "store", "-y"])
    assert_tree_equal(tree(dataset), V1, "local after rerun")
    assert temp_files(ws2.root) == []
    assert tree(ws2.workspace().staging_dir) == {}
    assert tether("diff", DS, "store", cwd=ws2.root).exit_code == 0


@pytest.mark.parametrize(("spec", "staged"), [("downloaded:5", 5), ("before_rename:6", 6)])
def test_pull_rerun_reuses_verified_staged_files(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, spec: str, staged: int
) -> None:
    """One download at a time makes the number of files staged before the kill exact."""
    dataset = setup_pull(tether, ws, ws2)
    before = snapshot(dataset)
    run_killed([*MIRROR_PULL, "--jobs", "1"], ws2, spec)
    assert snapshot(dataset) == before

    r = ok(tether, ws2, [*MIRROR_PULL, "--jobs", "1", "--json"])
    audit = json.loads(r.stdout)["audit"]
    assert audit["reused_staged"] == staged
    assert audit["state"] == "transferred"
    assert audit["files"] == {"download": UPLOADS, "delete_local": DELETES}
    assert audit["verification"]["ok"] is True
    assert_tree_equal(tree(dataset), V2, "local after rerun")
    assert temp_files(ws2.root) == []


def test_pull_rerun_summary_mentions_reused_files(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    setup_pull(tether, ws, ws2)
    run_killed([*MIRROR_PULL, "--jobs", "1"], ws2, "downloaded:3")
    r = ok(tether, ws2, [*MIRROR_PULL, "--jobs", "1"])
    assert "Reused 3 file(s)" in r.stdout


def test_interrupted_pull_leaves_previous_local_dataset_unchanged(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    """Killed after every file arrived in staging but before the first promotion."""
    dataset = setup_pull(tether, ws, ws2)
    (dataset / "local-notes.txt").write_text("mine, never synced before\n")  # local_only: kept
    before = snapshot(dataset)
    base = ws2.workspace().base_path("store", DS)
    base_before = base.read_bytes()
    run_killed(["pull", DS, "store", "-y"], ws2, f"downloaded:{UPLOADS}")
    assert snapshot(dataset) == before
    assert base.read_bytes() == base_before
    staged = tree(ws2.workspace().staging_dir / "store" / DS)
    assert staged == {p: d for p, d in V2.items() if V1.get(p) != d}  # all verified, none promoted


def test_staging_of_an_interrupted_pull_does_not_linger(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    """A collaborator reverts the change before the interrupted pull is rerun."""
    setup_pull(tether, ws, ws2)
    run_killed(MIRROR_PULL, ws2, f"downloaded:{UPLOADS}")
    write_tree(ws.data / DS, V1, V2)
    ok(tether, ws, MIRROR_PUSH)
    r = ok(tether, ws2, MIRROR_PULL)
    assert "Already up to date" in r.stdout
    assert tree(ws2.data / DS) == V1
    leftover = tree(ws2.workspace().staging_dir)
    assert leftover == {}, f"{len(leftover)} staged file(s), {sum(map(len, leftover.values()))} bytes left"


def test_a_folder_left_in_staging_where_a_file_now_goes_does_not_block_the_pull(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    """An interrupted pull staged ``a/old.txt``; since then ``a`` became a file on the remote.
    The staged folder is tether's scratch: the rerun replaces it and converges (it used to
    fail with "Is a directory" on every rerun)."""
    ws.write("a", "now a file\n")
    ok(tether, ws, ["push", DS, "store", "-y"])
    leftover = ws2.workspace().staging_dir / "store" / DS / "a"
    leftover.mkdir(parents=True)
    (leftover / "old.txt").write_text("staged by the interrupted run\n")
    ok(tether, ws2, ["pull", DS, "store", "-y"])
    assert (ws2.data / DS / "a").read_text() == "now a file\n"
    assert tree(ws2.workspace().staging_dir) == {}


# -- the same kills with small files copied by forked worker processes -------------------------
# Local disks copy many small files in worker processes (tether.forked); the datasets here are
# below the size where that starts, so TETHER_FORK_MIN_FILES=1 makes these runs use them. A
# checkpoint hit in a worker kills the whole run, and the workers die with it.
FORKED = {"TETHER_FORK_MIN_FILES": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["before_rename:3", "mid_file:2", "uploaded:7", "before_index:1"])
def test_forked_push_killed_then_rerun_converges(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", "1")
    dataset = ws.data / DS
    write_tree(dataset, V1)
    ok(tether, ws, MIRROR_PUSH)
    write_tree(dataset, V2, V1)

    r = run_subprocess(MIRROR_PUSH, cwd=ws.root, env={KILL: spec, **FORKED})
    assert r.exit_code == -9, f"checkpoint {spec} was never reached (exit {r.exit_code}):\n{r.output}"

    assert_whole(tree(ws.remote_dir / DS), V1, V2, f"remote after kill at {spec}")
    assert_index_honest(ws)
    ok(tether, ws, MIRROR_PUSH)
    assert_converged(tether, ws, V2)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["before_rename:2", "downloaded:4", "promoted:3", "before_base:1"])
def test_forked_pull_killed_then_rerun_converges(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", "1")
    dataset = setup_pull(tether, ws, ws2)
    before = snapshot(dataset)

    r = run_subprocess(MIRROR_PULL, cwd=ws2.root, env={KILL: spec, **FORKED})
    assert r.exit_code == -9, f"checkpoint {spec} was never reached (exit {r.exit_code}):\n{r.output}"

    assert_whole(tree(dataset), V1, V2, f"local after kill at {spec}")
    if not spec.startswith(("promoted", "before_base")):
        assert snapshot(dataset) == before
    ok(tether, ws2, MIRROR_PULL)
    assert_tree_equal(tree(dataset), V2, "local after rerun")
    assert temp_files(ws2.root) == []
    assert tether("diff", DS, "store", cwd=ws2.root).exit_code == 0


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_a_killed_copying_worker_interrupts_the_run_and_the_rerun_converges(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    """The kernel kills one forked worker (out of memory, say) while the run goes on: the run
    says so with exit 130, promotes nothing it did not verify, and the rerun finishes."""
    import tether.remotes.local as local_backend

    dataset = setup_pull(tether, ws, ws2) if direction == "pull" else ws.data / DS
    if direction == "push":
        write_tree(dataset, V1)
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", "1")
    me = os.getpid()
    real = local_backend.copy_verified

    def dies_in_a_worker(*args, **kwargs):  # type: ignore[no-untyped-def]
        if os.getpid() != me and kwargs.get("label", "").endswith("part04.bin"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_backend, "copy_verified", dies_in_a_worker)
    where = ws2 if direction == "pull" else ws
    before = snapshot(dataset)
    r = tether(direction, DS, "store", "--mode", "mirror", "-y", cwd=where.root)
    assert r.exit_code == ExitCode.INTERRUPTED == 130, r.output
    assert "a copying process ended early" in r.output and "exit -9" in r.output
    assert "Rerun the same command" in r.output
    assert "Traceback" not in r.output
    if direction == "pull":
        assert snapshot(dataset) == before  # nothing promoted
        assert_whole(tree(dataset), V1, V2, "local after the worker died")
    else:
        assert_whole(tree(ws.remote_dir / DS), {}, V1, "remote after the worker died")
        assert_index_honest(ws)

    monkeypatch.setattr(local_backend, "copy_verified", real)
    ok(tether, where, [direction, DS, "store", "--mode", "mirror", "-y"])
    expected = V2 if direction == "pull" else V1
    assert_tree_equal(tree(dataset), expected, "after the rerun")
    assert_tree_equal(tree(ws.remote_dir / DS), expected, "remote after the rerun")
    assert temp_files(where.root) == [] and temp_files(ws.remote_dir) == []


# -- full disk -----------------------------------------------------------------------------------
def _mount_tmpfs(target: Path, size: str) -> str | None:
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        return "no mount command"
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """``tmpfs(folder, "2m")`` mounts a small tmpfs on an existing folder; unmounted afterwards.

    Skips when mounting is not permitted (needs root or CAP_SYS_ADMIN), except on CI.
    """
    mounted: list[Path] = []

    def mount(target: Path, size: str) -> Path:
        error = _mount_tmpfs(target, size)
        if error is not None:
            message = f"cannot mount a tmpfs for the full-disk test (needs root/CAP_SYS_ADMIN): {error}"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", str(target)], check=False, capture_output=True)
            if os.path.ismount(target):
                subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_export_is_pulled_without_the_lock(
    tmp_path: Path, tether, tmpfs: Callable[[Path, str], Path]
) -> None:
    """A dataset on a read-only mount (an NFS export, a snapshot): no lock record can be made,
    so the pull goes ahead without it and says so; nothing is written there."""
    export = tmp_path / "export"
    export.mkdir()
    tmpfs(export, "16m")
    ws = make_workspace(tmp_path, remote_dir=export)
    files = {f"d{i % 2}/f{i}.bin": os.urandom(100 + i) for i in range(8)}
    for rel, data in files.items():
        ws.write(rel, data)
    assert tether("push", DS, "store", "-y", cwd=ws.root).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(export)], check=True)
    reader = make_workspace(tmp_path, "reader", remote_dir=export)
    r = tether("pull", DS, "store", "-y", cwd=reader.root)
    assert r.exit_code == 0, r.output
    assert "read-only" in r.stderr, r.stderr
    assert {rel: (reader.data / DS / rel).read_bytes() for rel in files} == files


def remount(target: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(target)], check=True)


@pytest.mark.parametrize(
    "kernel_copy_min", [fileio.KERNEL_COPY_MIN, 100_000], ids=["buffered", "kernel-copy"]
)
@pytest.mark.parametrize("fork_min", ["256", "1"], ids=["in-process", "forked"])
def test_full_remote_disk_fails_clearly_and_rerun_converges(
    ws: WorkspaceFixture, tmpfs, tether, monkeypatch: pytest.MonkeyPatch, fork_min: str, kernel_copy_min: int
) -> None:
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", fork_min)
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", kernel_copy_min)  # the big files: 600 kB each
    tmpfs(ws.remote_dir, "2m")
    dataset = ws.data / DS
    old = {f"small/s{i}.txt": f"small file {i}\n".encode() * 50 for i in range(5)}
    write_tree(dataset, old)
    ok(tether, ws, ["push", DS, "store", "-y"])

    rng = random.Random(7)
    new = dict(old)
    new["small/s0.txt"] = b"overwritten\n"
    new["small/s1.txt"] = same_size_change(old["small/s1.txt"], 11)
    for i in range(6):
        new[f"big/b{i}.bin"] = rng.randbytes(600_000)  # 3.6 MB in all: twice the disk
    write_tree(dataset, new, old)

    r = tether("push", DS, "store", "-y", cwd=ws.root)
    assert r.exit_code == ExitCode.REFUSED == 3, r.output
    assert "no space left" in r.output
    assert "Traceback" not in r.output
    assert_whole(tree(ws.remote_dir / DS), old, new, "remote after ENOSPC")
    assert_index_honest(ws)
    assert temp_files(ws.remote_dir) == [], "a failed write left its temporary file behind"
    assert not (ws.remote_dir / lock_path(DS)).exists()
    audit = json.loads((ws.root / ".tether" / "audit.jsonl").read_text().splitlines()[-1])
    assert audit["state"] == "failed" and "no space left" in audit["error"]

    remount(ws.remote_dir, "16m")
    ok(tether, ws, ["push", DS, "store", "-y"])
    assert_converged(tether, ws, new)


def test_a_disk_too_full_for_the_base_folder_is_disk_full_and_rerun_converges(
    ws: WorkspaceFixture, tmp_path: Path, tmpfs, tether
) -> None:
    """Seen in a bench run: the disk filled after a pull promoted its files, and the folder for
    its base could not be made. That is exit 3 naming the disk, not an unclassified I/O error;
    the verified files stay, and a rerun with space records the base and is in step."""
    write_tree(ws.data / DS, {"a.txt": b"alpha\n", "b/c.txt": b"gamma\n"})
    ok(tether, ws, ["push", DS, "store", "-y"])
    ws2 = make_workspace(tmp_path, "ws2", ws.remote_dir)
    bases = ws2.root / ".tether" / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    tmpfs(bases, "64k,nr_inodes=1")  # no inode left for a folder
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == ExitCode.REFUSED, r.output
    assert "no space left on the device holding" in r.stderr and "bases" in r.stderr
    assert (ws2.data / DS / "a.txt").read_bytes() == b"alpha\n"  # verified and kept
    assert_lock_released(ws)

    remount(bases, "64k,nr_inodes=64")
    ok(tether, ws2, ["pull", DS, "store", "-y"])
    assert tether("diff", DS, "store", cwd=ws2.root).exit_code == 0


@pytest.mark.parametrize(
    "kernel_copy_min", [fileio.KERNEL_COPY_MIN, 100_000], ids=["buffered", "kernel-copy"]
)
def test_full_local_disk_during_pull_promotes_nothing_and_rerun_converges(
    ws: WorkspaceFixture, tmp_path: Path, tmpfs, tether, monkeypatch: pytest.MonkeyPatch, kernel_copy_min: int
) -> None:
    """The pulling workspace (its dataset and its staging folder) lives on a 2 MiB disk."""
    monkeypatch.setattr(fileio, "KERNEL_COPY_MIN", kernel_copy_min)
    small = tmp_path / "small"
    small.mkdir()
    tmpfs(small, "2m")
    ws2 = make_workspace(small, "ws2", ws.remote_dir)
    old = {"a.txt": b"first version\n", "b/c.txt": b"kept\n"}
    write_tree(ws.data / DS, old)
    ok(tether, ws, ["push", DS, "store", "-y"])
    ok(tether, ws2, ["pull", DS, "store", "-y"])

    rng = random.Random(8)
    new = {**old, "a.txt": b"second version\n"}
    for i in range(6):
        new[f"big/b{i}.bin"] = rng.randbytes(600_000)
    write_tree(ws.data / DS, new, old)
    ok(tether, ws, ["push", DS, "store", "-y"])

    dataset = ws2.data / DS
    before = snapshot(dataset)
    r = tether("pull", DS, "store", "-y", cwd=ws2.root)
    assert r.exit_code == ExitCode.REFUSED, r.output
    assert "no space left" in r.output
    assert snapshot(dataset) == before  # nothing promoted
    assert temp_files(ws2.root) == []
    assert_lock_released(ws)

    remount(small, "16m")
    ok(tether, ws2, ["pull", DS, "store", "-y"])
    assert_tree_equal(tree(dataset), new, "local after rerun")
    assert tether("diff", DS, "store", cwd=ws2.root).exit_code == 0


# -- source changed during a push ----------------------------------------------------------------
OLD_NS = 1_600_000_000 * 10**9  # long ago: the hash cache trusts digests of such files


def _prepare_changed_source(ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ws.root)
    ws.write("other.txt", "left alone\n")
    path = ws.write("data.bin", b"A" * 4096)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    ok(tether, ws, ["push", DS, "store", "-y"])
    path.write_bytes(b"B" * 4096)  # the change the user means to push
    os.utime(path, ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    return path


def _push_rewriting(ws: WorkspaceFixture, path: Path, data: bytes, keep_stat: bool) -> TetherError:
    """Push; between the plan and the upload (at the confirm step) ``path`` is rewritten."""

    def confirm(plan) -> bool:
        st = path.stat()
        path.write_bytes(data)
        if keep_stat:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return True

    with pytest.raises(TetherError) as err:
        sync.push(DS, "store", workspace=ws.root, confirm=confirm)
    return err.value


def test_source_resized_after_plan_is_refused(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _prepare_changed_source(ws, tether, monkeypatch)
    err = _push_rewriting(ws, path, b"C" * 5000, keep_stat=False)
    assert err.exit_code == ExitCode.REFUSED, err
    assert "data.bin" in err.message
    assert ws.remote_file("data.bin").read_bytes() == b"A" * 4096  # old version intact
    assert temp_files(ws.remote_dir) == []
    assert_index_honest(ws)
    ok(tether, ws, ["push", DS, "store", "-y"])
    assert ws.remote_file("data.bin").read_bytes() == b"C" * 5000


def test_source_rewritten_with_same_size_and_mtime_is_not_uploaded(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Size and mtime cannot see this change; the hash computed while uploading does."""
    path = _prepare_changed_source(ws, tether, monkeypatch)
    err = _push_rewriting(ws, path, b"C" * 4096, keep_stat=True)
    assert err.exit_code in (ExitCode.REFUSED, ExitCode.VERIFY_FAILED), err
    assert "data.bin" in err.message
    assert ws.remote_file("data.bin").read_bytes() == b"A" * 4096  # neither B's digest nor C's bytes
    assert temp_files(ws.remote_dir) == []
    assert_index_honest(ws)
    # --checksum rehashes the source and pushes what the file holds now.
    ok(tether, ws, ["push", DS, "store", "-y", "--checksum"])
    assert ws.remote_file("data.bin").read_bytes() == b"C" * 4096
    assert tether("diff", DS, "store", "--checksum", cwd=ws.root).exit_code == 0


def test_rerun_after_same_size_rewrite_converges_without_checksum(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _prepare_changed_source(ws, tether, monkeypatch)
    _push_rewriting(ws, path, b"C" * 4096, keep_stat=True)
    r = tether("push", DS, "store", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("data.bin").read_bytes() == b"C" * 4096


def test_a_staged_file_with_wrong_bytes_is_never_reused(
    ws: WorkspaceFixture, ws2: WorkspaceFixture, tether
) -> None:
    """Staging is written in place; a torn or tampered staged file fails its rehash and is
    downloaded again instead of promoted."""
    dataset = setup_pull(tether, ws, ws2)
    run_killed([*MIRROR_PULL, "--jobs", "1"], ws2, "downloaded:5")
    staged = sorted(p for p in ws2.workspace().staging_dir.rglob("*") if p.is_file())
    assert len(staged) == 5
    size = staged[0].stat().st_size
    staged[0].write_bytes(b"\0" * size)  # same size, wrong bytes (a torn write)
    r = ok(tether, ws2, [*MIRROR_PULL, "--jobs", "1", "--json"])
    assert json.loads(r.stdout)["audit"]["reused_staged"] == 4
    assert_tree_equal(tree(dataset), V2, "local after rerun")
