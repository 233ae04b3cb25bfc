"""The few git questions versioned remotes ask, through the ``git`` command (no shell).

Which commit a revision names, what ``tether.lock`` said at a commit, and which commits a gc
scope covers. Reading the lock file at thousands of commits goes through one
``git cat-file --batch`` process, not one ``git show`` per commit.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

from tether.errors import UsageError


def _git(root: Path, *args: str, input: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, input=input)
    except FileNotFoundError:
        raise UsageError("git is not installed", hint="Install git: revisions are git commits.") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        first = message[0] if message else f"exit {proc.returncode}"
        raise UsageError(f"git {' '.join(args[:2])}: {first}")
    return proc.stdout


def in_repo(root: Path) -> bool:
    try:
        return _git(root, "rev-parse", "--is-inside-work-tree").strip() == b"true"
    except UsageError:
        return False


def rev_parse(root: Path, rev: str) -> str:
    """The commit a revision names (branch, tag, sha, HEAD~2, ...)."""
    if not rev or rev.startswith("-"):
        raise UsageError(f"{rev!r} is not a git revision")
    try:
        return _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    except UsageError:
        raise UsageError(
            f"{rev!r} is not a commit in the git repository at {root}",
            hint="Give a branch, tag or commit (see `git log`).",
        ) from None


def prefix(root: Path) -> str:
    """The workspace's folder relative to the repository's top level ('' at the top)."""
    return _git(root, "rev-parse", "--show-prefix").decode().strip()


def read_files_at(root: Path, commits: Iterable[str], relpath: str) -> dict[str, bytes | None]:
    """``relpath`` (relative to the workspace) at each commit; None where it did not exist."""
    commits = list(dict.fromkeys(commits))
    if not commits:
        return {}
    full = prefix(root) + relpath
    request = "".join(f"{c}:{full}\n" for c in commits).encode()
    data = _git(root, "cat-file", "--batch", input=request)
    found: dict[str, bytes | None] = {}
    pos = 0
    for commit in commits:
        end = data.index(b"\n", pos)
        header = data[pos:end].decode(errors="replace").split()
        pos = end + 1
        if len(header) == 3 and header[1] == "blob":
            size = int(header[2])
            found[commit] = data[pos : pos + size]
            pos += size + 1
        else:
            found[commit] = None  # missing, or not a file there
    return found


def branch_tips(root: Path) -> list[str]:
    out = _git(root, "for-each-ref", "--format=%(objectname)", "refs/heads")
    return out.decode().split()


def tag_commits(root: Path) -> list[str]:
    out = _git(
        root,
        "for-each-ref",
        "--format=%(objecttype) %(objectname) %(*objecttype) %(*objectname)",
        "refs/tags",
    )
    commits = []
    for line in out.decode().splitlines():
        parts = line.split()
        if parts[:1] == ["commit"]:
            commits.append(parts[1])
        elif len(parts) == 4 and parts[2] == "commit":  # an annotated tag of a commit
            commits.append(parts[3])
    return commits


def all_commits(root: Path) -> list[str]:
    return _git(root, "rev-list", "--all").decode().split()


def head(root: Path) -> str | None:
    try:
        return _git(root, "rev-parse", "--verify", "--quiet", "HEAD").decode().strip() or None
    except UsageError:
        return None  # a repository without commits yet


def user_name(root: Path) -> str | None:
    try:
        name = _git(root, "config", "user.name").decode().strip()
    except UsageError:
        return None
    return name or None
