"""Shared fixtures: an isolated workspace with a local-path remote, and CLI runners.

Every test runs with its own user-config dir (TETHER_CONFIG_DIR) and no system config, so a
developer's real configuration never leaks in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tether import faults
from tether.cli import main
from tether.hashing import HashCache
from tether.scan import scan_tree
from tether.workspace import Workspace


@pytest.fixture(autouse=True)
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_CONFIG_DIR", str(tmp_path / "_user_config"))
    monkeypatch.setenv("TETHER_SYSTEM_CONFIG", str(tmp_path / "_no_system_config.toml"))
    monkeypatch.delenv("TETHER_FAULT_KILL_AT", raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclass
class WorkspaceFixture:
    """A workspace at ``root`` with remote ``store`` -> ``remote_dir`` (a local path)."""

    root: Path
    remote_dir: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def write(self, rel: str, content: bytes | str, dataset: str = "ns/ds") -> Path:
        path = self.data / dataset / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def remote_file(self, rel: str, dataset: str = "ns/ds") -> Path:
        return self.remote_dir / dataset / rel

    def workspace(self) -> Workspace:
        return Workspace(self.root)


def make_workspace(base: Path, name: str = "ws", remote_dir: Path | None = None) -> WorkspaceFixture:
    root = base / name
    root.mkdir(parents=True)
    remote_dir = remote_dir or base / "remote"
    remote_dir.mkdir(parents=True, exist_ok=True)
    Workspace.init(root)
    toml = root / "tether.toml"
    toml.write_text(toml.read_text() + f'\n[remotes.store]\nurl = "{remote_dir}"\n')
    return WorkspaceFixture(root, remote_dir)


@pytest.fixture
def ws(tmp_path: Path) -> WorkspaceFixture:
    return make_workspace(tmp_path)


@pytest.fixture
def ws2(tmp_path: Path, ws: WorkspaceFixture) -> WorkspaceFixture:
    """A second workspace (a collaborator's laptop) sharing ``ws``'s remote."""
    return make_workspace(tmp_path, "ws2", ws.remote_dir)


@pytest.fixture
def tether(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run the CLI in-process: ``tether("push", "ns/ds", "store", cwd=ws.root)``."""

    def run(*args: str, cwd: Path | None = None) -> Result:
        capsys.readouterr()
        if cwd is not None:
            monkeypatch.chdir(cwd)
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_subprocess(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> Result:
    """Run tether in a child process (for SIGKILL fault tests)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root`` (tether's state folders left out) with its bytes and mtime:
    compare two snapshots to prove nothing changed."""
    out: dict[str, tuple[bytes, int]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".tether"]
        for name in names:
            path = Path(folder, name)
            out[path.relative_to(root).as_posix()] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


def cached_digests(ws: WorkspaceFixture, dataset: str = "ns/ds") -> dict[str, str]:
    """What the hash cache vouches for in the dataset's current state (path -> digest)."""
    root = ws.data / dataset
    stats = scan_tree(root)
    cache = HashCache(ws.workspace().hash_cache_path)
    try:
        hits = cache.get_many([(f"{root}/{s.path}", s.inode, s.size, s.mtime_ns, s.ctime_ns) for s in stats])
    finally:
        cache.close()
    return {k[len(f"{root}/") :]: v for k, v in hits.items()}


def backdate(root: Path) -> None:
    """Files written just now are racy (the hash cache rightly refuses to vouch for them)."""
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(p.stat().st_mtime_ns - 10**10,) * 2)


def rewrite_keeping_mtime(path: Path) -> None:
    """Same size, same mtime, other bytes (``cp -p`` or ``rsync -t`` over it): only ctime tells."""
    st = path.stat()
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def rewrite_at_checkpoint(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> Callable[[], None]:
    """Rewrite ``path`` keeping its mtime whenever a run passes checkpoint ``name`` (an edit at
    an exact step, no race); the returned function stops it, for the rerun."""
    real = faults.checkpoint

    def rewriting(passed: str) -> None:
        if passed == name:
            rewrite_keeping_mtime(path)
        real(passed)

    monkeypatch.setattr(faults, "checkpoint", rewriting)
    return lambda: monkeypatch.setattr(faults, "checkpoint", real)
