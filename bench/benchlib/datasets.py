"""Deterministic benchmark datasets, generated once and reused while their checksums hold.

Every tool must read byte-identical inputs on every run and every machine, so layout and bytes
come from a seeded generator. Regenerating 2 GiB per run would dominate the run time, so a
generated tree is kept under the work dir with a manifest of sizes and SHA-256 digests and is
reused only after every file checks out against it (which doubles as a warm-up read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GENERATOR_VERSION = 1  # bump when the layout or byte stream changes, so old trees are rebuilt
WRITE_CHUNK = 4 * MIB
IGNORED_DIRS = frozenset({".tether"})  # tool state inside a mirrored tree, not dataset content


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate: ``files`` files of ``min_size``..``max_size`` bytes over ``folders`` leaves."""

    name: str
    files: int
    min_size: int
    max_size: int
    folders: int
    seed: int

    @property
    def key(self) -> str:
        """A folder name that changes whenever the bytes would."""
        return (
            f"{self.name}-{self.files}x{self.min_size}-{self.max_size}"
            f"-f{self.folders}-s{self.seed}-g{GENERATOR_VERSION}"
        )


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str


@dataclass
class Dataset:
    """A generated tree on disk with the manifest it was checked against."""

    spec: DatasetSpec
    root: Path
    files: list[FileInfo]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def expected(self) -> dict[str, tuple[int, str]]:
        return {f.path: (f.size, f.sha256) for f in self.files}


SCALES: dict[str, dict[str, DatasetSpec]] = {
    "full": {
        "small": DatasetSpec("small", 20_000, 1 * KIB, 16 * KIB, folders=250, seed=20_000),
        "large": DatasetSpec("large", 4, 512 * MIB, 512 * MIB, folders=0, seed=512),
    },
    "quick": {
        "small": DatasetSpec("small", 2_000, 1 * KIB, 16 * KIB, folders=50, seed=2_000),
        "large": DatasetSpec("large", 4, 16 * MIB, 16 * MIB, folders=0, seed=16),
    },
    "tiny": {
        "small": DatasetSpec("small", 200, 1 * KIB, 16 * KIB, folders=10, seed=200),
        "large": DatasetSpec("large", 4, 1 * MIB, 1 * MIB, folders=0, seed=1),
    },
}


def layout(spec: DatasetSpec) -> list[tuple[str, int]]:
    """Relative paths and sizes, in generation order (file index = position)."""
    rng = random.Random(f"layout:{spec.seed}")
    out = []
    for i in range(spec.files):
        size = rng.randint(spec.min_size, spec.max_size)
        if spec.folders:
            leaf = rng.randrange(spec.folders)
            out.append((f"d{leaf // 25:02d}/s{leaf % 25:02d}/f{i:05d}.bin", size))
        else:
            out.append((f"part-{i:02d}.bin", size))
    return out


def file_chunks(seed: str, size: int) -> Iterable[bytes]:
    """The bytes of one file, in bounded chunks (512 MiB files never sit in memory whole)."""
    rng = random.Random(seed)
    left = size
    while left:
        n = min(left, WRITE_CHUNK)
        yield rng.randbytes(n)
        left -= n


def write_file(path: Path, chunks: Iterable[bytes]) -> str:
    """Write through a temporary name and return the SHA-256 of what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.bench-tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
    os.replace(tmp, path)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def generate(spec: DatasetSpec, root: Path) -> list[FileInfo]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    files = []
    for i, (rel, size) in enumerate(layout(spec)):
        digest = write_file(root / rel, file_chunks(f"content:{spec.seed}:{i}", size))
        files.append(FileInfo(rel, size, digest))
    return files


def _load_manifest(path: Path, spec: DatasetSpec) -> list[FileInfo] | None:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if doc.get("key") != spec.key:
        return None
    return [FileInfo(p, s, d) for p, s, d in doc["files"]]


def _matches(root: Path, files: list[FileInfo]) -> bool:
    """True when the tree on disk holds exactly these files with these digests."""
    return compare_tree(root, {f.path: (f.size, f.sha256) for f in files}, deep=True) is None


def ensure(spec: DatasetSpec, data_dir: Path, log: Callable[[str], None] = print) -> Dataset:
    """Reuse the generated tree when its manifest matches byte for byte; otherwise rebuild it."""
    root = data_dir / spec.key
    manifest = data_dir / f"{spec.key}.json"
    files = _load_manifest(manifest, spec)
    if files is not None and _matches(root, files):
        log(f"dataset {spec.name}: reusing {root} ({len(files)} files, checksums verified)")
        return Dataset(spec, root, files)
    log(f"dataset {spec.name}: generating {spec.files} files into {root}")
    files = generate(spec, root)
    manifest.write_text(json.dumps({"key": spec.key, "files": [[f.path, f.size, f.sha256] for f in files]}))
    return Dataset(spec, root, files)


# -- trees -------------------------------------------------------------------------------------
def list_tree(root: Path, ignore: frozenset[str] = IGNORED_DIRS) -> dict[str, int]:
    """Every regular file below ``root`` as relative path -> size, skipping tool state folders."""
    out: dict[str, int] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ignore]
        rel_folder = os.path.relpath(folder, root)
        for name in names:
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            out[rel] = os.lstat(os.path.join(folder, name)).st_size
    return out


def snapshot(root: Path, deep: bool) -> dict[str, tuple[int, str]]:
    """Sizes, and digests when ``deep`` (else an empty digest), for comparing two trees."""
    return {rel: (size, sha256_file(root / rel) if deep else "") for rel, size in list_tree(root).items()}


def compare_tree(root: Path, expected: dict[str, tuple[int, str]], deep: bool) -> str | None:
    """None when ``root`` holds exactly ``expected``; otherwise a one-line reason.

    Sizes are always checked; digests only when ``deep`` (every file is read), so cheap checks
    can run after every repeat and a full check after the last.
    """
    if not root.is_dir():
        return f"{root} does not exist"
    found = list_tree(root)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        return (
            f"{root}: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    wrong_size = [p for p, (size, _) in expected.items() if found[p] != size]
    if wrong_size:
        return f"{root}: {len(wrong_size)} files with the wrong size (e.g. {wrong_size[:2]})"
    if deep:
        wrong = [p for p, (_, digest) in expected.items() if digest and sha256_file(root / p) != digest]
        if wrong:
            return f"{root}: {len(wrong)} files with the wrong content (e.g. {wrong[:2]})"
    return None


def warm(root: Path) -> int:
    """Read every file once (untimed) so each tool starts from the same, hot, page cache."""
    total = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while chunk := f.read(WRITE_CHUNK):
                    total += len(chunk)
    return total


def copy_tree(source: Path, dest: Path) -> None:
    """An untimed full copy with mtimes kept, so each tool owns a source it may modify.

    ``cp -a`` rather than shutil.copytree: on this class of VM file creation is costly and
    copytree's per-file Python work made the set-up take twice as long.
    """
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{source}/.", f"{dest}/"], check=True)


# -- the 1% change -----------------------------------------------------------------------------
def change_set(dataset: Dataset, fraction: float, repeat: int) -> list[FileInfo]:
    """The files repeat ``repeat`` rewrites: disjoint across repeats, identical for every tool.

    Disjoint, because rsync's quick check compares whole-second mtimes: a file rewritten twice
    within one second with the same size could look unchanged to it.
    """
    count = max(1, round(len(dataset.files) * fraction))
    order = list(dataset.files)
    random.Random(f"change:{dataset.spec.seed}").shuffle(order)
    start = (repeat * count) % len(order)
    picked = order[start : start + count]
    return picked if len(picked) == count else picked + order[: count - len(picked)]


def apply_change(root: Path, dataset: Dataset, files: list[FileInfo], repeat: int) -> None:
    """Rewrite each file with new bytes of the same size (new inode, new mtime), deterministically."""
    for info in files:
        write_file(
            root / info.path, file_chunks(f"change:{dataset.spec.seed}:{repeat}:{info.path}", info.size)
        )
