"""The versioned round trip on every remote kind: a local path, SSH (real sshd) and an S3 store
(rclone serve s3). Commits with different data are pushed, a clone fetches every commit's
snapshot and checks each one out byte for byte; shared files upload once; a deleted object is
found by verify and put back by the next push."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest
import tomlkit

from conftest import Result, WorkspaceFixture, make_workspace
from s3servers import get_server, unique_prefix
from sshd import HOST, SshServer, add_remote, sshd_fixture  # noqa: F401
from test_versioned_cli import DS, clone, commit_version, git, tree, versioned_ws
from tether.versioned.layout import object_path

Tether = Callable[..., Result]


@dataclass
class Setup:
    ws: WorkspaceFixture
    remote: str
    delete_object: Callable[[str], None]
    configure: Callable[[WorkspaceFixture], None]  # the same remote in another workspace


@pytest.fixture(autouse=True)
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in [v for v in os.environ if v.startswith("AWS_") and v != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "_aws_credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "_aws_config"))


def _local_table(root: Path, name: str, table: dict[str, object]) -> None:
    path = root / ".tether" / "config.local.toml"
    path.parent.mkdir(exist_ok=True)
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    doc.setdefault("remotes", {})[name] = table
    path.write_text(tomlkit.dumps(doc))


@pytest.fixture(params=["local", "ssh", "s3"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    ws = versioned_ws(make_workspace(tmp_path))
    kind = request.param
    if kind == "local":

        def delete_local(digest: str) -> None:
            (ws.remote_dir / object_path(digest)).unlink()

        yield Setup(ws, "store", delete_local, lambda other: None)
    elif kind == "ssh":
        sshd: SshServer = request.getfixturevalue("sshd")
        options = {**sshd.options(), "layout": "versioned"}

        def configure_ssh(target: WorkspaceFixture) -> None:
            (target.root / ".tether").mkdir(exist_ok=True)  # a fresh clone has no state folder yet
            add_remote(target.root, "hpc", f"ssh://{HOST}{ws.remote_dir}", options)

        configure_ssh(ws)

        def delete_ssh(digest: str) -> None:
            (ws.remote_dir / object_path(digest)).unlink()

        yield Setup(ws, "hpc", delete_ssh, configure_ssh)
    else:
        server = get_server("rclone")
        prefix = unique_prefix()
        table = {"url": server.url(prefix), **server.options(), "layout": "versioned"}

        def configure_s3(target: WorkspaceFixture) -> None:
            _local_table(target.root, "s3", table)

        configure_s3(ws)

        def delete_s3(digest: str) -> None:
            obstore.delete(server.store(), f"{prefix}/{object_path(digest)}")

        yield Setup(ws, "s3", delete_s3, configure_s3)


V1 = {"a.txt": b"alpha\n", "big.bin": os.urandom(3 * 1024 * 1024), "sub/c.txt": b"shared\n"}
V2 = {"a.txt": b"alpha two\n", "d/new.txt": b"new in v2\n"}
V3 = {"sub/c.txt": b"changed in v3\n"}


def test_round_trip_dedup_and_repair(setup: Setup, tmp_path: Path, tether: Tether) -> None:
    ws, name = setup.ws, setup.remote
    commits, expected, uploads = [], [], []
    for files, remove in ((V1, ()), (V2, ("big.bin",)), (V3, ())):
        commits.append(commit_version(ws, tether, files, f"v{len(commits) + 1}", remove=remove))
        r = tether("push", DS, name, "--json", cwd=ws.root)
        assert r.exit_code == 0, r.output
        uploads.append(json.loads(r.stdout)["objects"]["upload"])
        expected.append(tree(ws.data / DS))
    assert uploads == [3, 2, 1]  # only what each commit changed went up

    other = clone(ws, tmp_path)
    setup.configure(other)
    r = tether("fetch", DS, name, "--all-commits", cwd=other.root)
    assert r.exit_code == 0, r.output
    for commit, want in [*zip(commits, expected, strict=True), (commits[0], expected[0])]:
        r = tether("checkout", DS, "--rev", commit, cwd=other.root)
        assert r.exit_code == 0, r.output
        assert tree(other.data / DS) == want
    assert tether("checkout", DS, cwd=other.root).exit_code == 0
    assert tree(other.data / DS) == expected[-1]
    assert tether("verify", DS, name, "--remote-data", cwd=other.root).exit_code == 0

    # a lost object is found by verify, and the next push from a workspace holding it re-uploads
    lost = hashlib.sha256(expected[-1]["a.txt"]).hexdigest()
    setup.delete_object(lost)
    r = tether("verify", DS, name, cwd=ws.root)
    assert r.exit_code == 4 and lost in r.stdout, r.output
    r = tether("push", DS, name, "--json", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["objects"]["upload"] == 1
    assert tether("verify", DS, name, "--remote-data", cwd=ws.root).exit_code == 0

    # and a fresh clone pulls the current commit's data
    fresh = clone(ws, tmp_path, "fresh")
    setup.configure(fresh)
    r = tether("pull", DS, name, cwd=fresh.root)
    assert r.exit_code == 0, r.output
    assert tree(fresh.data / DS) == expected[-1]
    assert git(fresh.root, "status", "--porcelain") == ""  # pull left tether.lock as committed
