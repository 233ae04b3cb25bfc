"""Foreign objects: compare what an object store lists with the local files, without downloading.

A prefix filled by ``rclone sync`` or ``aws s3 sync`` has no tether index, and an object store
cannot hash for us, so every object the index cannot vouch for would have to be downloaded to
learn its SHA-256. For an object whose local counterpart has the same size there is a cheaper,
still honest answer:

- a **plain MD5 ETag** (32 hex characters, no ``-N`` multipart suffix: a single-part upload) is
  compared with the local file's MD5. Equal: the object holds the local bytes, so it takes the
  local SHA-256 (comparison ``exact``). Different: it certainly differs, and is left to the
  caller (downloaded and hashed, because a pull verifies against that digest);
- a **multipart ETag**, or none, says nothing about content: with the same size the object is
  taken to hold the local bytes (comparison ``size-only``). ``--checksum`` never takes this path.

Local MD5s are cached next to the SHA-256s (:class:`tether.hashing.HashCache`, same key and
racy-clean rule), so repeated diffs of a prefix not yet adopted do not reread local files.
Nothing here writes anywhere but that cache; the SHA-256 an entry takes is always one computed
from local bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tether.hashing import CHUNK, HashCache
from tether.manifest import Entry
from tether.remotes.base import RemoteStat

EXACT = "exact"  # by the object's MD5 ETag
SIZE_ONLY = "size-only"  # multipart or missing ETag: same size taken as same content
_MD5 = re.compile(r"[0-9a-f]{32}")


def plain_md5(etag: str | None) -> str | None:
    """The MD5 an ETag states, or None: multipart (``…-N``), weak or non-hex ETags state none.

    An ETag that looks like an MD5 but is not one (SSE-KMS, SSE-C) can only fail to match, which
    costs a download, never a wrong answer.
    """
    if not etag:
        return None
    tag = etag.strip().strip('"').lower()
    return tag if _MD5.fullmatch(tag) else None


@dataclass(frozen=True)
class Compared:
    """A listed object judged equal to its local counterpart without reading it."""

    entry: Entry  # the object's path, size and store mtime, with the local file's SHA-256
    comparison: str  # EXACT or SIZE_ONLY


@dataclass(frozen=True)
class _Local:
    stat: RemoteStat
    key: tuple[str, int, int, int, int]  # hash cache key (path, inode, size, mtime_ns, ctime_ns)
    md5: str | None  # the MD5 the object's ETag states, None for a size-only comparison


def compare_with_local(
    root: Path,
    listed: Sequence[RemoteStat],
    cache: HashCache,
    *,
    cache_prefix: str,
    jobs: int = 4,
) -> tuple[list[Compared], list[RemoteStat]]:
    """Split ``listed`` into objects judged equal to ``root/<path>`` and the rest.

    Only objects with a regular local file of the same size are candidates. The rest (no local
    file, another size, an MD5 that differs, a local file changed while it was read) is returned
    for the caller to hash by download, as before.
    """
    candidates: list[_Local] = []
    rest: list[RemoteStat] = []
    for st in listed:
        try:
            lst = os.lstat(root / st.path)
        except (FileNotFoundError, NotADirectoryError):
            rest.append(st)
            continue
        if not stat.S_ISREG(lst.st_mode) or lst.st_size != st.size:
            rest.append(st)
            continue
        key = (cache_prefix + st.path, lst.st_ino, lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns)
        candidates.append(_Local(st, key, plain_md5(st.etag)))
    keys = [c.key for c in candidates]
    shas = cache.get_many(keys)
    md5s = cache.get_many([c.key for c in candidates if c.md5 is not None], kind="md5")

    def digests(c: _Local) -> tuple[str, str | None] | None:
        """(sha256, md5) of the local file as it was listed; None if it changed meanwhile."""
        sha, md5 = shas.get(c.key[0]), md5s.get(c.key[0])
        if sha is not None and (c.md5 is None or md5 is not None):
            return sha, md5
        return _read_digests(root / c.stat.path, c.key, cache)

    compared: list[Compared] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for c, got in zip(candidates, pool.map(digests, candidates), strict=True):
            if got is None or (c.md5 is not None and got[1] != c.md5):
                rest.append(c.stat)
                continue
            st = c.stat
            compared.append(
                Compared(Entry(st.path, st.size, st.mtime_ns, got[0], st.etag), EXACT if c.md5 else SIZE_ONLY)
            )
    cache.flush()
    return compared, rest


def _read_digests(
    path: Path, key: tuple[str, int, int, int, int], cache: HashCache
) -> tuple[str, str] | None:
    """SHA-256 and MD5 in one read; cached only if the file did not change while it was read."""
    started = time.time_ns()
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                md5.update(chunk)
            after = os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    name, inode, size, mtime_ns, ctime_ns = key
    now = (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns)
    if now != (inode, size, mtime_ns, ctime_ns):
        return None  # changed while read: let the caller hash the object instead
    out = sha.hexdigest(), md5.hexdigest()
    cache.put(name, inode, size, mtime_ns, out[0], started, ctime_ns=ctime_ns)
    cache.put(name, inode, size, mtime_ns, out[1], started, ctime_ns=ctime_ns, kind="md5")
    return out
