"""Versioned remotes end to end through the CLI, on a local-path remote and real git repositories.

Round trips across git commits, dedup, checkout link types and their fallback, the --force
rules, log and diff, gc that never deletes what a kept revision needs, scrub that finds deleted
and corrupted objects (and the next push that repairs them), and a push killed mid-upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Result, WorkspaceFixture, make_workspace, run_subprocess
from tether.versioned.cache import STALE_TEMP_S
from tether.versioned.layout import object_path

DS = "ns/ds"
Tether = Callable[..., Result]


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=Tester", "-c", "user.email=t@example.org", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def versioned_ws(ws: WorkspaceFixture) -> WorkspaceFixture:
    """Turn the fixture workspace into a git repository whose remote `store` is versioned."""
    toml = ws.root / "tether.toml"
    toml.write_text(toml.read_text() + 'layout = "versioned"\n')
    (ws.root / ".gitignore").write_text((ws.root / ".gitignore").read_text() + "/data/\n")
    git(ws.root, "init", "-q", "-b", "main")
    git(ws.root, "config", "user.name", "Tester")
    git(ws.root, "config", "user.email", "t@example.org")
    git(ws.root, "add", "tether.toml", ".gitignore")
    git(ws.root, "commit", "-q", "-m", "workspace")
    return ws


@pytest.fixture
def vws(ws: WorkspaceFixture) -> WorkspaceFixture:
    return versioned_ws(ws)


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".tether" not in p.relative_to(root).parts
    }


def remote_objects(remote_dir: Path) -> set[str]:
    root = remote_dir / "objects"
    return {p.parent.name + p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def remote_snapshots(remote_dir: Path, dataset: str = DS) -> set[str]:
    folder = remote_dir / "snapshots" / dataset
    return {p.name[:-5] for p in folder.glob("*.json")} if folder.exists() else set()


def write_files(ws: WorkspaceFixture, files: dict[str, bytes], dataset: str = DS) -> None:
    for rel, data in files.items():
        ws.write(rel, data, dataset)


def commit_version(
    ws: WorkspaceFixture,
    tether: Tether,
    files: dict[str, bytes],
    message: str,
    *,
    remove: tuple[str, ...] = (),
) -> str:
    """Write files, `tether commit`, `git commit` tether.lock; return the git commit."""
    write_files(ws, files)
    for rel in remove:
        (ws.data / DS / rel).unlink()
    r = tether("commit", DS, "-m", message, cwd=ws.root)
    assert r.exit_code == 0, r.output
    git(ws.root, "add", "tether.lock")
    git(ws.root, "commit", "-q", "-m", message)
    return git(ws.root, "rev-parse", "HEAD")


def clone(ws: WorkspaceFixture, tmp_path: Path, name: str = "clone") -> WorkspaceFixture:
    dest = tmp_path / name
    subprocess.run(["git", "clone", "-q", str(ws.root), str(dest)], check=True)
    return WorkspaceFixture(dest, ws.remote_dir)


def pushed_clone(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether, files: dict[str, bytes]
) -> WorkspaceFixture:
    """Commit ``files``, push them to the versioned remote, and clone the workspace fresh."""
    commit_version(vws, tether, files, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    return clone(vws, tmp_path)


V1 = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 40, "sub/c.txt": b"shared\n"}
V2 = {"a.txt": b"alpha two\n", "d/new.txt": b"new in v2\n"}


# -- the round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("fork_min", ["256", "1"], ids=["in-process", "forked"])
def test_round_trip_across_git_commits(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch, fork_min: str
) -> None:
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", fork_min)
    c1 = commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    c2 = commit_version(vws, tether, V2, "v2", remove=("sub/c.txt",))
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    c3 = commit_version(vws, tether, {"sub/c.txt": b"back, changed\n"}, "v3")
    r = tether("push", DS, "store", "--json", cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["objects"]["upload"] == 1
    expected = {c: tree(vws.data / DS) for c in (c3,)}
    expected[c1] = dict(V1)
    expected[c2] = {**{k: v for k, v in V1.items() if k != "sub/c.txt"}, **V2}

    other = clone(vws, tmp_path)
    r = tether("fetch", DS, "store", "--all-commits", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert "Fetched 3 snapshot(s)" in r.stdout
    assert not (other.data / DS).exists()  # fetch never touches the workspace
    for commit in (c1, c2, c3, c1):
        r = tether("checkout", DS, "--rev", commit, cwd=other.root)
        assert r.exit_code == 0, r.output
        assert tree(other.data / DS) == expected[commit], commit
    # and back to what the working tree's tether.lock names
    assert tether("checkout", DS, cwd=other.root).exit_code == 0
    assert tree(other.data / DS) == expected[c3]
    assert tether("diff", DS, "store", cwd=other.root).exit_code == 0


def test_pull_is_fetch_plus_checkout_and_says_which_snapshot(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    other = pushed_clone(vws, tmp_path, tether, V1)
    r = tether("pull", DS, "store", "--dry-run", "--json", cwd=other.root)
    assert r.exit_code == 0 and json.loads(r.stdout)["files"] == {"create": 3, "replace": 0, "delete": 0}
    assert not (other.data / DS).exists()
    r = tether("pull", DS, "store", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert "named by tether.lock" in r.stdout
    assert tree(other.data / DS) == V1
    assert "Already up to date" in tether("pull", DS, "store", cwd=other.root).stdout

    # a workspace without any tether.lock entry gets the remote's latest snapshot, and records it
    fresh = make_workspace(tmp_path, "fresh", vws.remote_dir)
    toml = fresh.root / "tether.toml"
    toml.write_text(toml.read_text() + 'layout = "versioned"\n')
    r = tether("pull", DS, "store", cwd=fresh.root)
    assert r.exit_code == 0, r.output
    assert "latest snapshot" in r.stdout and "tether.lock has no entry" in r.stdout
    assert tree(fresh.data / DS) == V1
    assert DS in (fresh.root / "tether.lock").read_text()


def test_commit_is_idempotent_and_push_needs_a_commit(vws: WorkspaceFixture, tether: Tether) -> None:
    write_files(vws, V1)
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 2 and "tether commit" in r.stderr
    first = tether("commit", DS, "--json", cwd=vws.root)
    again = tether("commit", DS, "--json", cwd=vws.root)
    assert json.loads(first.stdout)["created"] is True
    assert json.loads(again.stdout)["created"] is False
    assert json.loads(first.stdout)["snapshot"] == json.loads(again.stdout)["snapshot"]
    lock = (vws.root / "tether.lock").read_text()
    assert "version = 1" in lock and f'[datasets."{DS}"]' in lock and "files = 3" in lock


def test_dedup_shared_files_upload_once(vws: WorkspaceFixture, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    r = tether("push", DS, "store", "--json", cwd=vws.root)
    assert json.loads(r.stdout)["objects"]["upload"] == 3
    commit_version(vws, tether, {"a.txt": b"only this changed\n"}, "v2")
    r = tether("push", DS, "store", "--json", cwd=vws.root)
    out = json.loads(r.stdout)
    assert out["objects"] == {"needed": 3, "upload": 1, "upload_bytes": len(b"only this changed\n")}
    assert len(remote_objects(vws.remote_dir)) == 4
    assert len(remote_snapshots(vws.remote_dir)) == 2
    # a second dataset holding the same bytes dedupes against the first
    write_files(vws, {"copy.bin": V1["sub/b.bin"]}, "ns/other")
    assert tether("commit", "ns/other", cwd=vws.root).exit_code == 0
    r = tether("push", "ns/other", "store", "--json", cwd=vws.root)
    assert json.loads(r.stdout)["objects"]["upload"] == 0
    assert len(remote_objects(vws.remote_dir)) == 4
    # pushing again is a no-op
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 0 and "Already up to date" in r.stdout


def test_objects_are_content_addressed_and_checkable(vws: WorkspaceFixture, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    for digest in remote_objects(vws.remote_dir):
        assert hashlib.sha256((vws.remote_dir / object_path(digest)).read_bytes()).hexdigest() == digest
    (sid,) = remote_snapshots(vws.remote_dir)
    record = json.loads((vws.remote_dir / "snapshots" / DS / f"{sid}.json").read_text())
    assert record["format"] == "tether-snapshot" and record["version"] == 1
    assert record["author"] == "Tester" and record["message"] == "v1" and record["parent"] is None
    assert sorted(e["path"] for e in record["entries"]) == sorted(V1)


def test_mirror_only_options_are_refused(vws: WorkspaceFixture, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    for args in (["--mode", "mirror"], ["--prefer", "local"], ["--max-delete", "3"]):
        r = tether("push", DS, "store", *args, cwd=vws.root)
        assert r.exit_code == 2, r.output
        assert "only applies to mirror remotes" in r.stderr
    # Dataset-fidelity options would be ignored on a versioned remote: refused, never silent.
    for command, args in [
        ("push", ["--verify", "parquet"]),
        ("pull", ["--primary-only"]),
        ("push", ["--skip-snapshots"]),
        ("pull", ["--no-verify-sidecars"]),
        ("diff", ["--skip", "_derived"]),
        ("push", ["--strict-id"]),
    ]:
        r = tether(command, DS, "store", *args, cwd=vws.root)
        assert r.exit_code == 2, r.output
        assert f"{args[0]}: only for mirror remotes" in r.stderr, r.stderr


# -- checkout: link types, read-only cache, --force -----------------------------------------------
def _pushed_and_fetched(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> tuple[WorkspaceFixture, str]:
    c1 = commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    commit_version(vws, tether, V2, "v2")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    other = clone(vws, tmp_path)
    assert tether("fetch", DS, "store", "--all-commits", cwd=other.root).exit_code == 0
    return other, c1


@pytest.mark.parametrize("kind", ["hardlink", "symlink", "copy"])
def test_checkout_each_link_type(vws: WorkspaceFixture, tmp_path: Path, tether: Tether, kind: str) -> None:
    other, c1 = _pushed_and_fetched(vws, tmp_path, tether)
    r = tether("checkout", DS, "--rev", c1, "--link", kind, "--json", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["links"] == {kind: 3}
    assert tree(other.data / DS) == V1
    path = other.data / DS / "a.txt"
    cache_file = other.root / ".tether" / "cache" / object_path(hashlib.sha256(V1["a.txt"]).hexdigest())
    assert stat.S_IMODE(cache_file.stat().st_mode) & 0o222 == 0  # cache objects are read-only
    if kind == "hardlink":
        assert path.stat().st_ino == cache_file.stat().st_ino
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0
    elif kind == "symlink":
        assert path.is_symlink() and path.resolve() == cache_file.resolve()
    else:
        assert not path.is_symlink() and path.stat().st_ino != cache_file.stat().st_ino
        assert stat.S_IMODE(path.stat().st_mode) & 0o200  # an independent, writable copy
    # the linked state counts as committed: commit records nothing new, checkout back works
    r = tether("checkout", DS, cwd=other.root)
    assert r.exit_code == 0, r.output
    assert tree(other.data / DS) == {**V1, **V2}
    r = tether("commit", DS, "--json", cwd=other.root)
    assert json.loads(r.stdout)["created"] is False


def test_checkout_falls_back_on_filesystem_errors(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    other, c1 = _pushed_and_fetched(vws, tmp_path, tether)
    # /tmp-style ext4 has no reflink: `reflink,copy` ends up copying
    r = tether("checkout", DS, "--rev", c1, "--link", "reflink,copy", "--json", cwd=other.root)
    assert r.exit_code == 0, r.output
    links = json.loads(r.stdout)["links"]
    assert sum(links.values()) == 3 and set(links) <= {"reflink", "copy"}
    assert tree(other.data / DS) == V1
    # a cache on another filesystem: hard links fail with EXDEV, the next type takes over
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a different filesystem")
    far = make_workspace(tmp_path, "far", vws.remote_dir)
    cache = shm / f"tether-test-cache-{os.getpid()}-{tmp_path.name}"
    toml = far.root / "tether.toml"
    toml.write_text(toml.read_text() + f'layout = "versioned"\n\n[cache]\ndir = "{cache}"\n')
    try:
        (far.root / "tether.lock").write_bytes((other.root / "tether.lock").read_bytes())
        assert tether("fetch", DS, "store", cwd=far.root).exit_code == 0
        assert any(cache.rglob("*")), "the configured cache dir is used"
        r = tether("checkout", DS, "--link", "hardlink,copy", "--json", cwd=far.root)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["links"] == {"copy": 4}
        r = tether("checkout", DS, "--link", "hardlink", "--force", cwd=far.root)
        assert r.exit_code == 0  # nothing left to place
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=False)
        subprocess.run(["rm", "-rf", str(cache)], check=False)


def test_checkout_force_rules(vws: WorkspaceFixture, tmp_path: Path, tether: Tether) -> None:
    other, c1 = _pushed_and_fetched(vws, tmp_path, tether)
    assert tether("checkout", DS, cwd=other.root).exit_code == 0
    data = other.data / DS
    (data / "a.txt").write_bytes(b"my uncommitted edit\n")
    (data / "untracked.txt").write_bytes(b"brand new\n")
    before = tree(data)
    r = tether("checkout", DS, "--rev", c1, "--dry-run", "--force", cwd=other.root)
    assert r.exit_code == 0 and "would create 0, replace 1, delete 2" in r.stdout, r.output
    r = tether("checkout", DS, "--rev", c1, cwd=other.root)
    assert r.exit_code == 3, r.output
    assert "a.txt" in r.stderr and "--force" in r.stderr
    assert "untracked.txt" in r.stderr  # v1 lacks it, so checkout would delete it
    assert tree(data) == before  # nothing touched
    # a change that checkout does not need to touch is no obstacle
    (data / "a.txt").write_bytes(V2["a.txt"])
    (data / "untracked.txt").unlink()
    (data / "d/new.txt").write_bytes(b"edited, but v2 also has d/new.txt\n")
    r = tether("checkout", DS, cwd=other.root)
    assert r.exit_code == 3 and "d/new.txt" in r.stderr
    r = tether("checkout", DS, "--force", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert tree(data) == {**V1, **V2}
    # pull refuses too, and never discards: --force is checkout's alone
    (data / "a.txt").write_bytes(b"again\n")
    r = tether("pull", DS, "store", cwd=other.root)
    assert r.exit_code == 3 and "a.txt" in r.stderr
    assert (data / "a.txt").read_bytes() == b"again\n"


def test_committed_but_unpushed_data_is_kept_in_the_cache(vws: WorkspaceFixture, tether: Tether) -> None:
    c1 = commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    commit_version(vws, tether, {"a.txt": b"committed, never pushed\n"}, "v2")
    assert tether("fetch", DS, "store", "--rev", c1, cwd=vws.root).exit_code == 0
    r = tether("checkout", DS, "--rev", c1, cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert tree(vws.data / DS) == V1
    r = tether("checkout", DS, cwd=vws.root)  # back: the v2 bytes came from the cache
    assert r.exit_code == 0, r.output
    assert (vws.data / DS / "a.txt").read_bytes() == b"committed, never pushed\n"
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0


# -- log and diff ---------------------------------------------------------------------------------
def test_log_and_diff_between_revisions(vws: WorkspaceFixture, tmp_path: Path, tether: Tether) -> None:
    c1 = commit_version(vws, tether, V1, "first version")
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 0, r.output
    c2 = commit_version(vws, tether, V2, "second version", remove=("sub/c.txt",))
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    r = tether("log", DS, "--json", cwd=vws.root)
    snaps = json.loads(r.stdout)["snapshots"]
    assert [s["message"] for s in snaps] == ["second version", "first version"]
    assert snaps[0]["changes"] == {"added": 1, "modified": 1, "deleted": 1}
    assert snaps[1]["changes"] == {"added": 3, "modified": 0, "deleted": 0}
    text = tether("log", DS, cwd=vws.root).stdout
    assert "Tester" in text and "<- tether.lock" in text and "+1 ~1 -1" in text
    r = tether("log", DS, "store", "--json", cwd=vws.root)
    assert [s["message"] for s in json.loads(r.stdout)["snapshots"]] == ["second version", "first version"]

    r = tether("diff", DS, c1, c2, "--json", cwd=vws.root)
    assert r.exit_code == 1
    assert json.loads(r.stdout)["changes"] == {
        "added": ["d/new.txt"],
        "modified": ["a.txt"],
        "deleted": ["sub/c.txt"],
    }
    assert tether("diff", DS, c2, "HEAD", cwd=vws.root).exit_code == 0
    # a clone without the cache reads the small snapshot records from the versioned remote
    other = clone(vws, tmp_path)
    r = tether("diff", DS, "HEAD~1", "HEAD", cwd=other.root)
    assert r.exit_code == 1 and "sub/c.txt" in r.stdout


def test_diff_against_the_remote(vws: WorkspaceFixture, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    r = tether("diff", DS, "store", "--json", cwd=vws.root)
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["remote_latest"] is None and out["push_would_upload"]["objects"] == 3
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    assert tether("diff", DS, "store", cwd=vws.root).exit_code == 0
    vws.write("a.txt", b"edited locally\n")
    r = tether("diff", DS, "store", "--json", cwd=vws.root)
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["changes"]["modified"] == ["a.txt"] and out["uncommitted_changes"] is True


# -- verify (scrub) -------------------------------------------------------------------------------
def test_verify_finds_deleted_and_corrupt_objects_and_push_repairs_them(
    vws: WorkspaceFixture, tether: Tether
) -> None:
    commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    assert tether("verify", DS, "store", "--remote-data", cwd=vws.root).exit_code == 0
    lost = hashlib.sha256(V1["a.txt"]).hexdigest()
    rotten = hashlib.sha256(V1["sub/c.txt"]).hexdigest()
    (vws.remote_dir / object_path(lost)).unlink()
    rotten_path = vws.remote_dir / object_path(rotten)
    rotten_path.chmod(0o644)
    rotten_path.write_bytes(b"shaREd\n")  # same size: only hashing finds it
    # the push inventory still believes everything is there: a plain push changes nothing
    r = tether("verify", DS, "store", cwd=vws.root)
    assert r.exit_code == 4, r.output
    assert lost in r.stdout and rotten not in r.stdout
    r = tether("verify", DS, "store", "--remote-data", "--json", cwd=vws.root)
    assert r.exit_code == 4
    out = json.loads(r.stdout)
    assert set(out["missing"]) == {lost} and set(out["corrupt"]) == {rotten}
    r = tether("push", DS, "store", "--json", cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["objects"]["upload"] == 2
    assert rotten_path.read_bytes() == V1["sub/c.txt"]
    assert tether("verify", DS, "store", "--remote-data", cwd=vws.root).exit_code == 0


def test_fetch_refuses_a_corrupt_object(vws: WorkspaceFixture, tmp_path: Path, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    path = vws.remote_dir / object_path(hashlib.sha256(V1["a.txt"]).hexdigest())
    path.chmod(0o644)
    path.write_bytes(b"ALPHA\n")
    other = clone(vws, tmp_path)
    r = tether("pull", DS, "store", cwd=other.root)
    assert r.exit_code == 4, r.output
    assert not (other.data / DS / "a.txt").exists()
    cache = other.root / ".tether" / "cache" / "objects"
    assert not any(p.read_bytes() == b"ALPHA\n" for p in cache.rglob("*") if p.is_file())


def test_a_fetch_that_meets_a_corrupt_object_keeps_the_verified_ones_and_says_which_failed(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    digest = hashlib.sha256(V1["a.txt"]).hexdigest()
    other = pushed_clone(vws, tmp_path, tether, V1)
    path = vws.remote_dir / object_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"ALPHA\n")
    r = tether("fetch", DS, "store", cwd=other.root)
    assert r.exit_code == 4, r.output
    assert object_path(digest) in r.stderr and "Traceback" not in r.output
    cache = other.root / ".tether" / "cache"
    kept = {p.read_bytes() for p in (cache / "objects").rglob("*") if p.is_file()}
    assert kept == {V1["sub/b.bin"], V1["sub/c.txt"]}  # flushed and named despite the failure
    assert not any((cache / "tmp").iterdir())
    path.write_bytes(V1["a.txt"])
    r = tether("fetch", DS, "store", "--json", cwd=other.root)
    assert r.exit_code == 0, r.output
    objects = json.loads(r.stdout)["objects"]
    assert (objects["cached"], objects["downloaded"]) == (2, 1)


# -- interrupted push -----------------------------------------------------------------------------
@pytest.mark.parametrize("fork_min", ["256", "1"], ids=["in-process", "forked"])
def test_interrupted_push_leaves_no_snapshot_pointing_at_missing_objects(
    vws: WorkspaceFixture, tether: Tether, monkeypatch: pytest.MonkeyPatch, fork_min: str
) -> None:
    """Also with the objects copied by forked workers (TETHER_FORK_MIN_FILES=1; a local disk
    uses them from 256 small files on): a worker's kill is the run's."""
    monkeypatch.setenv("TETHER_FORK_MIN_FILES", fork_min)
    files = {f"f{i:02d}.txt": f"file {i}\n".encode() for i in range(12)}
    commit_version(vws, tether, files, "v1")
    for point in ("before_rename:3", "vpush_uploaded:5", "vpush_before_snapshot:1"):
        r = run_subprocess(["push", DS, "store"], vws.root, env={"TETHER_FAULT_KILL_AT": point})
        assert r.exit_code == -9, r.output
        assert remote_snapshots(vws.remote_dir) == set()  # never a record before its objects
    r = run_subprocess(["push", DS, "store"], vws.root)
    assert r.exit_code == 0, r.output
    assert len(remote_snapshots(vws.remote_dir)) == 1
    assert tether("verify", DS, "store", "--remote-data", cwd=vws.root).exit_code == 0
    assert list((vws.remote_dir / "pushes").glob("*.json")) == []  # killed runs' markers cleared


def test_an_object_failing_with_an_io_error_is_exit_7_and_the_rerun_finishes(
    vws: WorkspaceFixture, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk under one object: one line naming it, exit 7 (rerun), no snapshot that
    names a missing object; the rerun uploads only what is missing and writes the snapshot."""
    from tether.remotes.local import LocalRemote

    files = {"a.txt": b"fine\n", "b.txt": b"lands on a bad sector\n"}
    commit_version(vws, tether, files, "v1")
    bad = object_path(hashlib.sha256(files["b.txt"]).hexdigest())
    real_put = LocalRemote.put_file

    def failing(self: LocalRemote, source: Path, path: str, **kwargs: object) -> None:
        if path == bad:
            raise OSError(5, "Input/output error", path)
        real_put(self, source, path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalRemote, "put_file", failing)
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 7, r.output
    assert f"1 object(s) failed while uploading, first: {bad}: " in r.stderr
    assert "Input/output error" in r.stderr and "Rerun" in r.stderr and "Traceback" not in r.output
    assert remote_snapshots(vws.remote_dir) == set()
    assert len(remote_objects(vws.remote_dir)) == 1
    monkeypatch.undo()
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert "uploaded 1 of 2 objects" in r.stdout
    assert len(remote_snapshots(vws.remote_dir)) == 1


# -- interrupted pull -----------------------------------------------------------------------------
def pull_killed_at(
    point: str,
    files: dict[str, bytes],
    vws: WorkspaceFixture,
    tmp_path: Path,
    tether: Tether,
    already: dict[str, bytes] | None = None,
) -> WorkspaceFixture:
    """Push ``files`` as a snapshot, then kill a fresh clone's first pull at ``point``; the
    clone's dataset folder holds ``already`` before it."""
    commit_version(vws, tether, files, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    other = clone(vws, tmp_path)
    for rel, data in (already or {}).items():
        other.write(rel, data)
    r = run_subprocess(["pull", DS, "store"], other.root, env={"TETHER_FAULT_KILL_AT": point})
    assert r.exit_code == -9, r.output
    return other


def assert_rerun_pulls(other: WorkspaceFixture, files: dict[str, bytes]) -> None:
    r = run_subprocess(["pull", DS, "store"], other.root)
    assert r.exit_code == 0, r.output
    assert tree(other.data / DS) == files


def test_interrupted_pull_changes_nothing_and_the_rerun_reuses_what_it_verified(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    files = {f"f{i:02d}.txt": f"file {i}\n".encode() for i in range(12)}
    other = pull_killed_at("vfetch_object:5", files, vws, tmp_path, tether)
    assert tree(other.data / DS) == {}  # downloads wait in staging until all arrived
    staged = [p for p in (other.root / ".tether" / "staging").rglob("*") if p.is_file()]
    assert len(staged) >= 4
    # A fresh clone's pull stages files at their own paths (one rename places them all).
    assert {p.name for p in staged} <= set(files)
    for p in staged:  # the remote loses them: only a reuse of the staged copies can finish
        (vws.remote_dir / object_path(hashlib.sha256(p.read_bytes()).hexdigest())).unlink()
    assert_rerun_pulls(other, files)


def test_a_rerun_never_promotes_a_link_or_trips_on_a_folder_left_in_staging(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    """What sits at a staging name is reused only if it is a plain file with the right bytes:
    a link to the right bytes is not moved into the dataset, and a folder is cleared."""
    files = {f"d{i % 2}/f{i:02d}.txt": f"file {i}\n".encode() for i in range(12)}
    other = pull_killed_at("vfetch_object:5", files, vws, tmp_path, tether)
    tree_root = other.root / ".tether" / "staging" / "versioned" / DS / "tree"
    assert tree_root.is_dir()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(files["d0/f00.txt"])
    linked, blocked = tree_root / "d0/f00.txt", tree_root / "d1/f01.txt"
    linked.unlink(missing_ok=True)
    linked.symlink_to(outside)
    shutil.rmtree(blocked, ignore_errors=True)
    blocked.unlink(missing_ok=True)
    (blocked / "below").mkdir(parents=True)
    assert_rerun_pulls(other, files)
    placed = [p for p in (other.data / DS).rglob("*") if p.is_symlink()]
    assert placed == []
    assert outside.read_bytes() == files["d0/f00.txt"]


def test_a_fetch_clears_what_a_day_old_killed_fetch_left_in_the_cache(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    other = pushed_clone(vws, tmp_path, tether, V1)
    tmp = other.root / ".tether" / "cache" / "tmp"
    tmp.mkdir(parents=True)
    leftover, recent = tmp / "a.tether-tmp-part", tmp / "b.tether-tmp-part"
    leftover.write_bytes(b"half an object")
    recent.write_bytes(b"another workspace's download")
    day_old = leftover.stat().st_mtime - STALE_TEMP_S - 60
    os.utime(leftover, (day_old, day_old))
    r = tether("fetch", DS, "store", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert not leftover.exists() and recent.exists()
    assert [p.name for p in tmp.iterdir()] == [recent.name]  # every fetched object was adopted


def test_pull_killed_while_placing_files_converges_on_rerun(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    files = {f"d{i % 3}/f{i:02d}.txt": f"file {i}\n".encode() for i in range(12)}
    # A file already there: the dataset folder is not empty, so files are placed one by one.
    already = {"d0/f00.txt": files["d0/f00.txt"]}
    other = pull_killed_at("vcheckout_file:6", files, vws, tmp_path, tether, already)
    placed = tree(other.data / DS)
    assert 1 < len(placed) < len(files) and all(files[p] == d for p, d in placed.items())
    assert_rerun_pulls(other, files)


def test_a_fresh_clones_pull_places_its_whole_staging_tree_in_one_rename(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    """Into a missing dataset folder every file is in place before the first per-file step
    (killed there), verified and complete; files sharing bytes get theirs there too."""
    files = {f"d{i % 3}/f{i:02d}.txt": f"file {i % 10}\n".encode() for i in range(12)}  # 2 pairs alike
    other = pull_killed_at("vcheckout_file:1", files, vws, tmp_path, tether)
    placed = tree(other.data / DS)
    assert len(placed) >= 10 and all(files[p] == d for p, d in placed.items())
    assert_rerun_pulls(other, files)
    assert not (other.root / ".tether" / "staging" / "versioned" / DS).exists()


# -- gc -------------------------------------------------------------------------------------------
def test_gc_needs_a_scope_prints_first_and_keeps_what_revisions_need(
    vws: WorkspaceFixture, tmp_path: Path, tether: Tether
) -> None:
    c1 = commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    git(vws.root, "checkout", "-q", "-b", "experiment")
    commit_version(vws, tether, {"a.txt": b"experiment only\n"}, "exp")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    git(vws.root, "checkout", "-q", "main")
    r = tether("pull", DS, "store", cwd=vws.root)  # the experiment's bytes move into the cache
    assert r.exit_code == 0, r.output
    assert tree(vws.data / DS) == V1
    commit_version(vws, tether, V2, "v2")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    assert len(remote_snapshots(vws.remote_dir)) == 3

    r = tether("gc", "store", cwd=vws.root)
    assert r.exit_code == 2 and "--keep-revs" in r.output
    before = tree(vws.remote_dir)
    r = tether("gc", "store", "--keep-revs", "all-commits", "--dry-run", cwd=vws.root)
    assert r.exit_code == 0 and "would delete 0 snapshot(s) and 0 object(s)" in r.stdout
    # deleting the branch makes its snapshot garbage under every scope
    git(vws.root, "branch", "-q", "-D", "experiment")
    git(vws.root, "reflog", "expire", "--expire=now", "--all")
    git(vws.root, "gc", "-q", "--prune=now")
    r = tether("gc", "store", "--keep-revs", "all-commits", "--dry-run", cwd=vws.root)
    assert "would delete 1 snapshot(s) and 1 object(s)" in r.stdout, r.output
    r = tether("gc", "store", "--keep-revs", "30-days", "--dry-run", cwd=vws.root)
    assert "would delete 0 snapshot(s) and 0 object(s)" in r.stdout, r.output  # made today: kept
    assert tree(vws.remote_dir) == before  # a dry run changes nothing
    r = tether("gc", "store", "--keep-revs", "all-commits", cwd=vws.root)
    assert r.exit_code == 3 and "-y" in r.stderr  # off a terminal, deleting needs -y
    r = tether("gc", "store", "--keep-revs", "all-commits", "-y", cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert "Deleted 1 snapshot(s) and 1 object(s)" in r.stdout
    assert len(remote_snapshots(vws.remote_dir)) == 2
    # `branches` keeps main's tip only: v1 goes, but its objects that v2 still uses stay
    r = tether("gc", "store", "--keep-revs", "branches", "-y", "--json", cwd=vws.root)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["delete_snapshots"]) == 1 and len(out["delete_objects"]) == 1
    assert tether("verify", DS, "store", "--remote-data", cwd=vws.root).exit_code == 0
    other = clone(vws, tmp_path)
    assert tether("pull", DS, "store", cwd=other.root).exit_code == 0
    assert tree(other.data / DS) == tree(vws.data / DS)
    r = tether("fetch", DS, "store", "--rev", c1, cwd=other.root)
    assert r.exit_code == 2 and "not on" in r.stderr


def test_gc_spares_objects_of_a_running_push_and_push_waits_for_gc(
    vws: WorkspaceFixture, tether: Tether
) -> None:
    from tether.lock import Lease
    from tether.remotes import LocalRemote
    from tether.versioned.store import PushMarker

    commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    orphan = vws.remote_dir / "objects" / "ab" / ("c" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"uploaded by a push still running")
    remote = LocalRemote(str(vws.remote_dir), vws.remote_dir)
    with PushMarker(remote, host="elsewhere", dataset=DS):
        r = tether("gc", "store", "--keep-revs", "all-commits", "-y", cwd=vws.root)
        assert r.exit_code == 0, r.output
        assert "spared" in r.stdout
        assert orphan.exists()
    r = tether("gc", "store", "--keep-revs", "all-commits", "-y", cwd=vws.root)
    assert r.exit_code == 0 and not orphan.exists()
    # while gc holds the remote's lock, a push refuses to start (exit 6)
    with Lease(remote, "locks", operation="gc", host="elsewhere"):
        commit_version(vws, tether, {"z.txt": b"z\n"}, "v2")
        r = tether("push", DS, "store", cwd=vws.root)
        assert r.exit_code == 6, r.output
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0


def test_versioned_commands_refuse_a_mirror_remote(ws: WorkspaceFixture, tether: Tether) -> None:
    ws.write("a.txt", b"x")
    for args in (["fetch", DS, "store"], ["verify", DS, "store"], ["gc", "store", "--keep-revs", "branches"]):
        r = tether(*args, cwd=ws.root)
        assert r.exit_code == 2, r.output
        assert "mirror remote" in r.stderr


def test_push_refuses_data_that_changed_after_commit(vws: WorkspaceFixture, tether: Tether) -> None:
    commit_version(vws, tether, V1, "v1")
    vws.write("a.txt", b"edited after the commit\n")
    (vws.data / DS / "sub/c.txt").unlink()
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 3, r.output
    assert "changed or disappeared after `tether commit`" in r.stderr
    assert "a.txt" in r.stderr and "sub/c.txt" in r.stderr
    assert remote_snapshots(vws.remote_dir) == set()  # no record without its objects
    assert tether("commit", DS, cwd=vws.root).exit_code == 0
    r = tether("push", DS, "store", cwd=vws.root)
    assert r.exit_code == 0, r.output
    assert tether("verify", DS, "store", "--remote-data", cwd=vws.root).exit_code == 0


def test_fetch_by_branches_and_tags(vws: WorkspaceFixture, tmp_path: Path, tether: Tether) -> None:
    c1 = commit_version(vws, tether, V1, "v1")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    git(vws.root, "tag", "-a", "release-1", "-m", "first release", c1)
    commit_version(vws, tether, V2, "v2")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    commit_version(vws, tether, V3 := {"z.txt": b"only on main's tip\n"}, "v3")
    assert tether("push", DS, "store", cwd=vws.root).exit_code == 0
    other = clone(vws, tmp_path)
    cached = other.root / ".tether" / "cache" / "objects"

    def cached_digests() -> set[str]:
        return (
            {p.parent.name + p.name for p in cached.rglob("*") if p.is_file()} if cached.exists() else set()
        )

    r = tether("fetch", DS, "store", "--all-tags", "--json", cwd=other.root)
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["snapshots"]) == 1
    assert cached_digests() == {hashlib.sha256(b).hexdigest() for b in V1.values()}
    r = tether("fetch", DS, "store", "--all-branches", "--json", cwd=other.root)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["snapshots"]) == 1 and out["objects"]["cached"] == 2  # a.txt(v1) was replaced
    assert hashlib.sha256(V3["z.txt"]).hexdigest() in cached_digests()
    r = tether("fetch", DS, "store", "--rev", "nonsense-rev", cwd=other.root)
    assert r.exit_code == 2 and "not a commit" in r.stderr
