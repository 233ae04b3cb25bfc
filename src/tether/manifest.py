"""Manifests: the sorted list of a tree's entries, and their on-disk form.

A manifest is what planning compares: local, remote and base. Entries are kept sorted by
:func:`tether.paths.sort_key` so three manifests merge in one streaming pass. The serialised
form is gzip-compressed JSON lines with a header line naming the format version and the digest
algorithm (docs/format.md); readers check both before trusting a single entry.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple

from tether.errors import TetherError
from tether.paths import check_relpath, sort_key

MANIFEST_FORMAT = "tether-manifest"
MANIFEST_VERSION = 1
DEFAULT_ALGORITHM = "sha256"


class Entry(NamedTuple):
    """One file: relative POSIX path, size in bytes, mtime in ns, and content digest (hex)."""

    path: str
    size: int
    mtime_ns: int
    digest: str

    def same_content(self, other: Entry | None) -> bool:
        return other is not None and self.size == other.size and self.digest == other.digest

    def as_json(self) -> dict[str, object]:
        return {"size": self.size, "digest": self.digest}


class ManifestFormatError(TetherError):
    default_hint = (
        "The index was written by a newer tether or is damaged. Upgrade tether; if that does not "
        "help, delete the index: tether rebuilds it from the files on the next run."
    )


@dataclass
class Manifest:
    """A sorted list of entries plus the algorithm that produced their digests."""

    entries: list[Entry] = field(default_factory=list)
    algorithm: str = DEFAULT_ALGORITHM

    @classmethod
    def from_entries(cls, entries: Iterable[Entry], algorithm: str = DEFAULT_ALGORITHM) -> Manifest:
        """Sort into manifest order; a path listed twice is damage, never a second file."""
        ordered = sorted(entries, key=lambda e: sort_key(e.path))
        for before, after in pairwise(ordered):
            if before.path == after.path:
                raise ManifestFormatError(f"path {after.path!r} is listed twice")
        return cls(ordered, algorithm)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def dumps(self, **header_extra: object) -> bytes:
        """Serialise as gzip JSON lines; ``mtime=0`` keeps the bytes reproducible."""
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
            header = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "algorithm": self.algorithm,
                "count": len(self.entries),
                "bytes": self.total_bytes,
                **header_extra,
            }
            gz.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            for e in self.entries:
                line = {"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "digest": e.digest}
                gz.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        return buf.getvalue()

    @classmethod
    def loads(cls, data: bytes, *, source: str = "manifest") -> Manifest:
        """Parse and validate; every path is checked as untrusted input (invariant 5)."""
        try:
            text = gzip.decompress(data).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ManifestFormatError(f"{source} is not a readable tether manifest ({exc})") from None
        lines = text.splitlines()
        if not lines:
            raise ManifestFormatError(f"{source} is empty")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ManifestFormatError(f"{source} has no valid header line") from None
        if header.get("format") != MANIFEST_FORMAT:
            raise ManifestFormatError(f"{source} is not a tether manifest")
        if header.get("version") != MANIFEST_VERSION:
            raise ManifestFormatError(
                f"{source} has format version {header.get('version')}; this tether reads "
                f"version {MANIFEST_VERSION}"
            )
        entries = []
        for n, line in enumerate(lines[1:], start=2):
            try:
                raw = json.loads(line)
                entry = Entry(
                    check_relpath(raw["path"]),
                    int(raw["size"]),
                    int(raw["mtime_ns"]),
                    str(raw["digest"]),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, TetherError):
                    raise
                raise ManifestFormatError(f"{source} line {n} is malformed ({exc})") from None
            entries.append(entry)
        if len(entries) != header.get("count", len(entries)):
            raise ManifestFormatError(
                f"{source} is truncated: header says {header.get('count')} entries, found {len(entries)}"
            )
        return cls.from_entries(entries, header.get("algorithm", DEFAULT_ALGORITHM))
