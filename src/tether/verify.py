"""Verification of what a run did, measured after the transfer.

Every file is already hashed while it is written (a mismatch never reaches its final name);
this module checks the outcome once more against fresh manifests of both sides, so the audit
record states what is true afterwards, not what the plan hoped for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether.errors import VerificationError
from tether.manifest import Manifest
from tether.plan import Change


@dataclass
class VerifyReport:
    mode: str = "sha256"
    files_verified: int = 0
    bytes_verified: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "ok": self.ok,
            "files_verified": self.files_verified,
            "bytes_verified": self.bytes_verified,
            "mismatches": self.mismatches,
        }


def verify_transfers(done: list[Change], local: Manifest, remote: Manifest) -> VerifyReport:
    """Each transferred path must now hold the same content on both sides; each deleted path
    must be gone from the destination."""
    report = VerifyReport()
    local_by, remote_by = local.by_path(), remote.by_path()
    for change in done:
        lo, re_ = local_by.get(change.path), remote_by.get(change.path)
        if change.action.value.startswith("delete"):
            gone = re_ if change.action.value == "delete_remote" else lo
            if gone is not None:
                report.mismatches.append(change.path)
            continue
        if lo is None or not lo.same_content(re_):
            report.mismatches.append(change.path)
            continue
        report.files_verified += 1
        report.bytes_verified += lo.size
    return report


def raise_if_failed(report: VerifyReport) -> None:
    if report.ok:
        return
    sample = ", ".join(report.mismatches[:5])
    raise VerificationError(
        f"{len(report.mismatches)} file(s) do not match after the transfer: {sample}",
        paths=report.mismatches,
    )
