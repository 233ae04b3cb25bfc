"""Workspace discovery, dataset resolution and ownership rules.

A workspace is found like git finds a repository: walk up from the current folder to the first
one holding ``tether.toml``. Ownership: git owns code, tether owns data, so a file that git
tracks is never synced by tether unless the user says ``exclude_git_tracked = false``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tether.config import (
    WORKSPACE_FILE,
    RemoteConfig,
    Settings,
    default_workspace_toml,
    load_layers,
)
from tether.errors import ConfigError, InvalidPath, UnknownRemote, UsageError, WorkspaceNotFound
from tether.paths import STATE_DIR, check_dataset_id

_REMOTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_remote_name(name: str) -> str:
    if not _REMOTE_NAME.fullmatch(name or ""):
        raise UsageError(
            f"remote name {name!r} is not allowed",
            hint="Use letters, digits, '.', '_' or '-', e.g. `hpc` or `r2`.",
        )
    return name


def find_root(start: Path | None = None) -> Path:
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / WORKSPACE_FILE).is_file():
            return folder
    raise WorkspaceNotFound(f"no tether workspace (tether.toml) in {start} or any parent folder")


@dataclass(frozen=True)
class Dataset:
    """A directory synced as one unit, addressed remotely as ``<remote>/<id>/``.

    ``only`` narrows a run to one file of it (file mode: TARGET was a file).
    """

    id: str
    path: Path
    only: str | None = None


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.settings = Settings.from_layers(load_layers(self.root))

    @classmethod
    def find(cls, start: Path | None = None) -> Workspace:
        return cls(find_root(start))

    @classmethod
    def init(cls, root: Path, data_root: str = "data") -> tuple[Workspace, bool]:
        """Create the workspace files; idempotent. Returns (workspace, created)."""
        root = root.resolve()
        if not data_root.strip():
            raise UsageError("--data-root must name a folder", hint="e.g. `tether init --data-root data`")
        toml = root / WORKSPACE_FILE
        created = not toml.exists()
        if created:
            toml.write_text(default_workspace_toml(data_root))
        state = root / STATE_DIR
        state.mkdir(exist_ok=True)
        # Everything in .tether/ is machine-local state (bases, caches, secrets).
        (state / ".gitignore").write_text("# tether's local state: never commit it.\n*\n")
        gitignore = root / ".gitignore"
        existing = gitignore.read_text() if gitignore.exists() else ""
        if "/.tether/" not in existing.splitlines():
            sep = "" if not existing or existing.endswith("\n") else "\n"
            gitignore.write_text(f"{existing}{sep}# tether local state\n/.tether/\n")
        ws = cls(root)
        ws.data_root.mkdir(parents=True, exist_ok=True)
        return ws, created

    # -- locations -------------------------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def data_root(self) -> Path:
        return (self.root / self.settings.data_root).resolve()

    def base_path(self, remote: str, dataset_id: str) -> Path:
        return self.state_dir / "bases" / check_remote_name(remote) / f"{dataset_id}.manifest"

    def remote_index_path(self, remote: str, dataset_id: str) -> Path:
        """This machine's copy of a remote's index (a cache: see sync.scan_remote)."""
        return self.state_dir / "remote-index" / check_remote_name(remote) / f"{dataset_id}.index"

    @property
    def hash_cache_path(self) -> Path:
        return self.state_dir / "hashcache.sqlite"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.jsonl"

    def remote(self, name: str) -> RemoteConfig:
        """The configured remote NAME, or an error that lists the known ones."""
        check_remote_name(name)
        config = self.settings.remotes.get(name)
        if config is None:
            known = ", ".join(sorted(self.settings.remotes)) or "none configured"
            raise UnknownRemote(f"unknown remote {name!r} (known: {known})")
        return config

    # -- datasets --------------------------------------------------------------------------
    def resolve(
        self, target: str, *, dataset_id: str | None = None, cwd: Path | None = None, strict: bool = False
    ) -> Dataset:
        """A dataset id (``ns/name`` under the data root), a path to a dataset directory, a path
        to one file in a dataset (file mode), or a bare name that matches one local dataset.

        ``strict`` (``--strict-id``, ``TETHER_STRICT_ID=1``) accepts only an explicit
        ``namespace/name`` id: scripts that run from anywhere must never sync a guessed dataset.
        """
        if strict:
            return self._strict(target, dataset_id)
        cwd = cwd or Path.cwd()
        if len(target) > 1:
            target = target.rstrip("/")  # a tab-completed `ns/ds/` means `ns/ds`
        as_path = Path(target).expanduser()
        as_path = as_path if as_path.is_absolute() else cwd / as_path
        if target not in ("", ".") and as_path.is_dir() and (os.sep in target or not self._is_id_dir(target)):
            return self._dataset_from_dir(as_path.resolve(), dataset_id)
        if target == ".":
            return self._dataset_from_dir(cwd.resolve(), dataset_id)
        if as_path.is_file() and not as_path.is_symlink():
            return self._dataset_from_file(as_path.resolve(), dataset_id)
        if os.sep in target and not as_path.exists() and self._looks_like_path(target, cwd):
            # A file not here yet, inside a dataset that is: file mode, so it can be pulled.
            wanted = Path(os.path.normpath(as_path))
            for ds in self.list_datasets():
                if ds.path in wanted.parents:
                    return Dataset(ds.id, ds.path, wanted.relative_to(ds.path).as_posix())
        if dataset_id is None and "/" not in target and not self._is_id_dir(target):
            matches = [ds for ds in self.list_datasets() if ds.id.rsplit("/", 1)[-1] == target]
            if len(matches) > 1:
                raise UsageError(
                    f"{target!r} matches {len(matches)} datasets: {', '.join(ds.id for ds in matches)}",
                    hint="Name the one you mean with its full `namespace/name` id.",
                )
            if matches:
                return matches[0]
        ds_id = check_dataset_id(dataset_id or target)
        return Dataset(ds_id, self.data_root / ds_id)

    @staticmethod
    def _looks_like_path(target: str, cwd: Path) -> bool:
        """``ns/ds`` is an id; ``data/ns/ds/x.bin`` (its first part exists here), ``./x`` or an
        absolute path is a path."""
        first = target.split(os.sep, 1)[0]
        return target.startswith((os.sep, "~")) or first in (".", "..") or (cwd / first).is_dir()

    def _strict(self, target: str, dataset_id: str | None) -> Dataset:
        ds_id = dataset_id or target
        if "/" not in ds_id or ds_id.startswith(("/", ".", "~")) or ds_id.endswith("/"):
            raise UsageError(
                f"--strict-id needs an explicit `namespace/name` dataset id, not {ds_id!r}",
                hint="Name the dataset by its id, e.g. `densegen/my_dataset` (no paths, no bare names).",
            )
        check_dataset_id(ds_id)
        return Dataset(ds_id, self.data_root / ds_id)

    def _dataset_from_file(self, path: Path, dataset_id: str | None) -> Dataset:
        """File mode: the dataset holding ``path`` (by its place under the data root, else its
        folder), narrowed to that one file."""
        if dataset_id is not None:
            folder = self.data_root / check_dataset_id(dataset_id)
            if folder not in path.parents:
                folder = path.parent
        else:
            folder = next((ds.path for ds in self.list_datasets() if ds.path in path.parents), path.parent)
        dataset = self._dataset_from_dir(folder, dataset_id)
        return Dataset(dataset.id, dataset.path, path.relative_to(folder).as_posix())

    def _is_id_dir(self, target: str) -> bool:
        return (self.data_root / target).is_dir()

    def _dataset_from_dir(self, path: Path, dataset_id: str | None) -> Dataset:
        if path == self.root or path in self.root.parents:
            raise UsageError(f"{path} is the workspace itself, not a dataset folder")
        if path == self.data_root:
            raise UsageError(
                f"{path} is the data root, not a dataset folder",
                hint="Name a dataset inside it, e.g. `namespace/name` (see `tether ls`).",
            )
        if self.state_dir in (path, *path.parents):
            raise InvalidPath(f"{path} is inside tether's state folder")
        if dataset_id is None:
            try:
                dataset_id = path.relative_to(self.data_root).as_posix()
            except ValueError:
                dataset_id = path.name
        return Dataset(check_dataset_id(dataset_id), path)

    def list_datasets(self) -> list[Dataset]:
        """Leaf-most folders under the data root that hold files directly or are `ns/name`."""
        found: list[Dataset] = []
        root = self.data_root
        if not root.is_dir():
            return found
        for ns in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            children = [c for c in ns.iterdir() if not c.name.startswith(".")]
            has_files = any(c.is_file() for c in children)
            subdirs = sorted(c for c in children if c.is_dir())
            if has_files or not subdirs:
                found.append(Dataset(ns.name, ns))
            else:
                found += [Dataset(f"{ns.name}/{d.name}", d) for d in subdirs]
        return found

    # -- ownership -------------------------------------------------------------------------
    def ownership(self, dataset: Dataset) -> Callable[[str], bool]:
        """Predicate over dataset-relative paths: does tether own (sync) this file?"""
        rules = self.settings.sync
        tracked = self._git_tracked(dataset.path) if rules.exclude_git_tracked else frozenset()
        if tuple(rules.include) in ((), ("**",)) and not rules.exclude:
            return lambda rel: rel not in tracked  # the default rules: no pattern matching per file

        import pathspec  # here: 10 ms of start-up that the default rules never need

        include = pathspec.GitIgnoreSpec.from_lines(rules.include or ["**"])
        exclude = pathspec.GitIgnoreSpec.from_lines(rules.exclude)

        def keep(rel: str) -> bool:
            return include.match_file(rel) and not exclude.match_file(rel) and rel not in tracked

        return keep

    def _git_tracked(self, folder: Path) -> frozenset[str]:
        if not folder.is_dir():
            return frozenset()
        try:
            proc = subprocess.run(
                ["git", "-C", str(folder), "ls-files", "-z", "--", "."],
                capture_output=True,
            )
        except FileNotFoundError:
            return frozenset()  # no git installed: nothing can be tracked
        if proc.returncode != 0:
            message = proc.stderr.decode(errors="replace").strip()
            first_line = message.splitlines()[0] if message else "?"
            if "not a git repository" in message:
                return frozenset()
            # Guessing "nothing is tracked" here would sync files git owns.
            raise ConfigError(
                f"git could not list tracked files in {folder}: {first_line}",
                hint="Fix the git error (e.g. `git config --global --add safe.directory PATH`), or set "
                "`exclude_git_tracked = false` under [sync] if git should not decide ownership.",
            )
        return frozenset(p for p in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if p)

    @cached_property
    def hostname(self) -> str:
        return os.uname().nodename
