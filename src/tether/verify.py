"""Verification of what a run did, measured after the transfer.

Every file is already hashed while it is written (a mismatch never reaches its final name);
this module checks the outcome once more against fresh manifests of both sides, so the audit
record states what is true afterwards, not what the plan hoped for. On top of that:

* ``--verify parquet`` compares the Parquet footer (rows, columns, schema) of each transferred
  Parquet file as read on both sides, so a table is known to be readable and the same table;
* sidecar fidelity: every synced sidecar folder must hold the same file list and digests on both
  sides after the run, because a derived column that silently differs from its primary is worse
  than a failed sync.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tether.errors import UsageError, VerificationError
from tether.manifest import Entry, Manifest
from tether.plan import Action, Change
from tether.profiles import DatasetProfile

VERIFY_MODES = ("sha256", "size", "parquet", "auto")
PARQUET_MAGIC = b"PAR1"
TAIL_GUESS = 64 * 1024  # one read usually holds the whole footer


@dataclass
class VerifyReport:
    mode: str = "sha256"
    files_verified: int = 0
    bytes_verified: int = 0
    mismatches: list[str] = field(default_factory=list)
    parquet: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> footer facts
    sidecars: dict[str, dict[str, Any]] | None = None  # None: sidecar check off (or no sidecars)
    sidecar_check: bool = True
    fallbacks: list[str] = field(default_factory=list)  # what --verify auto could not honour

    @property
    def sidecar_mismatches(self) -> list[str]:
        return [p for s in (self.sidecars or {}).values() for p in s["mismatches"]]

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.sidecar_mismatches

    def as_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "ok": self.ok,
            "files_verified": self.files_verified,
            "bytes_verified": self.bytes_verified,
            "mismatches": self.mismatches,
            "parquet": self.parquet,
            "sidecar_check": self.sidecar_check,
            "sidecars": self.sidecars,
            "fallbacks": self.fallbacks,
        }


def verify_transfers(
    done: list[Change], local: Manifest, remote: Manifest, *, mode: str = "sha256"
) -> VerifyReport:
    """Each transferred path must now hold the same content on both sides (``size`` mode: the
    same size); each deleted path must be gone from the destination."""
    report = VerifyReport(mode=mode)
    local_by, remote_by = local.by_path(), remote.by_path()
    for change in done:
        lo, re_ = local_by.get(change.path), remote_by.get(change.path)
        if change.action in (Action.DELETE_REMOTE, Action.DELETE_LOCAL):
            gone = re_ if change.action == Action.DELETE_REMOTE else lo
            if gone is not None:
                report.mismatches.append(change.path)
            continue
        same = (
            lo is not None
            and re_ is not None
            and (lo.size == re_.size if mode == "size" else lo.same_content(re_))
        )
        if not same:
            report.mismatches.append(change.path)
            continue
        report.files_verified += 1
        report.bytes_verified += lo.size  # type: ignore[union-attr]
    return report


# -- parquet ------------------------------------------------------------------------------------
ReadRange = Callable[[int, int], bytes]


class NotParquet(Exception):
    pass


def parquet_shape(read: ReadRange, size: int) -> dict[str, Any]:
    """Rows, columns and schema from a Parquet footer, reading only the file's tail."""
    if size < 12:
        raise NotParquet("too small to be a Parquet file")
    tail = read(max(0, size - TAIL_GUESS), min(size, TAIL_GUESS))
    if tail[-4:] != PARQUET_MAGIC:
        raise NotParquet("no Parquet footer (the file does not end in PAR1)")
    footer_len = struct.unpack("<I", tail[-8:-4])[0]
    if footer_len + 8 > size:
        raise NotParquet("its footer length is larger than the file")
    if footer_len + 8 > len(tail):
        tail = read(size - footer_len - 8, footer_len + 8)
    import pyarrow as pa  # imported on use: only parquet verification needs it
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + tail[-(footer_len + 8) :]))
    except (pa.ArrowException, OSError) as exc:
        raise NotParquet(f"its footer cannot be read ({exc})") from None
    return {
        "rows": meta.num_rows,
        "columns": meta.num_columns,
        "schema": str(meta.schema.to_arrow_schema()),
    }


def check_parquet(
    paths: Iterable[str],
    local_read: Callable[[str], ReadRange],
    remote_read: Callable[[str], ReadRange],
    local: Manifest,
    remote: Manifest,
    report: VerifyReport,
    *,
    strict: bool,
) -> None:
    """Compare the footers of ``paths`` on both sides. ``strict`` (``--verify parquet``): a file
    that is not Parquet is an error, never a silent downgrade; otherwise (``auto``) it is
    verified by SHA-256 alone and the fallback is named in ``report.fallbacks``."""
    local_by, remote_by = local.by_path(), remote.by_path()
    for path in paths:
        lo, re_ = local_by.get(path), remote_by.get(path)
        if lo is None or re_ is None:
            continue
        try:
            here = parquet_shape(local_read(path), lo.size)
            there = parquet_shape(remote_read(path), re_.size)
        except NotParquet as exc:
            if not strict:
                report.fallbacks.append(f"{path}: {exc}; verified by sha256 only")
                continue
            raise UsageError(
                f"--verify parquet cannot check {path}: {exc}",
                hint="Use --verify sha256 (the default) or auto for files that are not Parquet.",
            ) from None
        same = here == there
        report.parquet[path] = {"ok": same, "local": here, "remote": there}
        if not same:
            report.mismatches.append(path)


def is_parquet_name(path: str) -> bool:
    return path.endswith((".parquet", ".pq"))


# -- sidecars -----------------------------------------------------------------------------------
def check_sidecars(
    profile: DatasetProfile, in_scope: Callable[[str], bool], local: Manifest, remote: Manifest
) -> dict[str, dict[str, Any]]:
    """Per synced sidecar: the paths whose presence or digest differs between the sides."""
    out: dict[str, dict[str, Any]] = {}
    synced = [s for s in profile.sidecars if in_scope(f"{s}/")]
    if not synced:
        return out
    local_by = _by_sidecar(profile, local.entries)
    remote_by = _by_sidecar(profile, remote.entries)
    for sidecar in synced:
        here, there = local_by.get(sidecar, {}), remote_by.get(sidecar, {})
        mismatches = sorted(
            p for p in here.keys() | there.keys() if p not in here or not here[p].same_content(there.get(p))
        )
        out[sidecar] = {"files": len(here), "ok": not mismatches, "mismatches": mismatches}
    return out


def _by_sidecar(profile: DatasetProfile, entries: Iterable[Entry]) -> dict[str, dict[str, Entry]]:
    out: dict[str, dict[str, Entry]] = {}
    for e in entries:
        sidecar = profile.sidecar_of(e.path)
        if sidecar is not None:
            out.setdefault(sidecar, {})[e.path] = e
    return out


def raise_if_failed(report: VerifyReport) -> None:
    if report.ok:
        return
    if report.mismatches:
        sample = ", ".join(report.mismatches[:5])
        raise VerificationError(
            f"{len(report.mismatches)} file(s) do not match after the transfer: {sample}",
            paths=report.mismatches,
        )
    differing = report.sidecar_mismatches
    names = ", ".join(s for s, r in (report.sidecars or {}).items() if not r["ok"])
    raise VerificationError(
        f"sidecar folder(s) {names} differ between local and remote in {len(differing)} file(s)",
        paths=differing,
        hint="A sidecar must match its dataset on both sides. `tether diff` shows each file; "
        "--mode mirror makes the destination identical; --no-verify-sidecars accepts the "
        "difference (and says so in the audit record).",
    )
