"""The record of an operation: what was actually done, measured after the transfer.

Appended as one JSON line to ``.tether/audit.jsonl`` (and optionally written to a file of the
user's choice). The schema is versioned and documented in docs/format.md.
"""

from __future__ import annotations

import getpass
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether._version import __version__
from tether.plan import TRANSFERS, Change, Plan
from tether.profiles import DatasetProfile

if TYPE_CHECKING:
    from tether.verify import VerifyReport

AUDIT_FORMAT = "tether-audit"
AUDIT_VERSION = 2  # 2: profile, scope, verify, sidecar_check, parts; states diff-only and dry-run


@dataclass
class AuditRecord:
    operation: str  # push | pull | diff
    dataset: str
    remote: str
    remote_url: str
    mode: str
    state: str  # transferred | no-op | dry-run | diff-only | failed
    started: float
    finished: float
    done: Counter[str] = field(default_factory=Counter)  # action -> files
    done_bytes: Counter[str] = field(default_factory=Counter)  # action -> bytes
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    unchanged: int = 0
    reused_staged: int = 0
    skipped_symlinks: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    profile: str | None = None
    scope: dict[str, Any] = field(default_factory=dict)
    verify: str = "sha256"
    sidecar_check: bool = True
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    done_changes: list[Change] = field(default_factory=list)  # not serialised; feeds ``parts``

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def bytes_transferred(self) -> int:
        return self.done_bytes.get("upload", 0) + self.done_bytes.get("download", 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": AUDIT_FORMAT,
            "version": AUDIT_VERSION,
            "tether_version": __version__,
            "operation": self.operation,
            "dataset": self.dataset,
            "remote": self.remote,
            "remote_url": self.remote_url,
            "mode": self.mode,
            "state": self.state,
            "user": getpass.getuser(),
            "host": os.uname().nodename,
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(),
            "finished": datetime.fromtimestamp(self.finished, UTC).isoformat(),
            "seconds": round(self.seconds, 3),
            "files": dict(self.done),
            "bytes": dict(self.done_bytes),
            "bytes_transferred": self.bytes_transferred,
            "throughput_bytes_per_s": round(self.bytes_transferred / self.seconds),
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "reused_staged": self.reused_staged,
            "skipped_symlinks": self.skipped_symlinks,
            "failed": self.failed,
            "verification": self.verification,
            "error": self.error,
            "profile": self.profile,
            "scope": self.scope,
            "verify": self.verify,
            "sidecar_check": self.sidecar_check,
            "parts": self.parts,
        }


def parts_of(
    profile: DatasetProfile, plan: Plan, done: list[Change], verification: VerifyReport | None
) -> dict[str, dict[str, Any]]:
    """Per part of the dataset (primary, each sidecar, each ledger, the rest): what differed,
    what was transferred, and how it was verified, as measured after the run."""
    parts: dict[str, dict[str, Any]] = {}

    def part(name: str) -> dict[str, Any]:
        return parts.setdefault(
            name, {"changed": 0, "transferred_files": 0, "transferred_bytes": 0, "deleted": 0}
        )

    if profile.primary is not None:
        part("primary")["path"] = profile.primary
    for sidecar in profile.sidecars:
        part(f"sidecar:{sidecar}")
    for ledger in profile.append_only:
        part(f"ledger:{ledger.path}")
    for change in plan.changes:
        part(profile.part_of(change.path))["changed"] += 1
    for change in done:
        p = part(profile.part_of(change.path))
        if change.action in TRANSFERS:
            p["transferred_files"] += 1
            p["transferred_bytes"] += change.bytes
        else:
            p["deleted"] += 1
    if verification is not None:
        mismatched = set(verification.mismatches)
        bytes_check = "size" if verification.mode == "size" else "sha256"
        for p in parts.values():
            p["verified"] = bytes_check if p["transferred_files"] else None
        for change in done:
            if change.path in mismatched:
                parts[profile.part_of(change.path)]["ok"] = False
        for path, footers in verification.parquet.items():
            p = parts[profile.part_of(path)]
            p["verified"] = "sha256+parquet"
            p.setdefault("parquet", {})[path] = footers
        for sidecar, result in (verification.sidecars or {}).items():
            p = parts[f"sidecar:{sidecar}"]
            p["sidecar_files"] = result["files"]
            p["sidecar_ok"] = result["ok"]
            p["sidecar_mismatches"] = result["mismatches"]
        for p in parts.values():
            p.setdefault("ok", True)
    return parts


def append(log: Path | None, record: AuditRecord, extra_out: Path | None = None) -> None:
    """Append to the workspace log (None: a dry run, which did nothing worth logging)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.as_json(), sort_keys=True) + "\n")
    if extra_out is not None:
        extra_out.parent.mkdir(parents=True, exist_ok=True)
        extra_out.write_text(json.dumps(record.as_json(), indent=2, sort_keys=True) + "\n")
