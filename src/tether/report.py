"""Plans and results as data for `--json` and as short human text. Pure: no printing."""

from __future__ import annotations

from typing import Any

from tether.manifest import Entry
from tether.plan import Change, Plan
from tether.sync import DiffResult, SyncResult

UNITS = ("B", "KB", "MB", "GB", "TB")
DONE_LABELS = {
    "upload": "uploaded",
    "download": "downloaded",
    "delete_remote": "deleted on remote",
    "delete_local": "deleted locally",
}


def human_bytes(n: float) -> str:
    for unit in UNITS:
        if abs(n) < 1000 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def _side(entry: Entry | None) -> dict[str, Any] | None:
    return entry.as_json() if entry else None


def change_json(change: Change, action: Any = None) -> dict[str, Any]:
    return {
        "path": change.path,
        "status": change.status.value,
        "action": action if action is not None else change.action.value,
        "local": _side(change.local),
        "remote": _side(change.remote),
        "reason": change.reason,
    }


def plan_summary(plan: Plan) -> dict[str, Any]:
    return {
        "status": plan.status_counts(),
        "action": plan.action_counts(),
        "bytes": plan.action_bytes(),
        "local_files": plan.local_files,
        "remote_files": plan.remote_files,
    }


def diff_json(result: DiffResult) -> dict[str, Any]:
    """Both directions at once: each change's action is {"push": ..., "pull": ...}."""
    pull_by_path = {c.path: c for c in result.pull.changes}
    changes = [
        change_json(c, {"push": c.action.value, "pull": pull_by_path[c.path].action.value})
        | {"reason": {"push": c.reason, "pull": pull_by_path[c.path].reason}}
        for c in result.push.changes
    ]
    return {
        "dataset": result.dataset.id,
        "remote": result.remote_name,
        "direction": "both",
        "in_sync": result.in_sync,
        "local_exists": result.local_exists,
        "remote_exists": result.remote_exists,
        "summary": {
            "status": result.push.status_counts(),
            "action": {"push": result.push.action_counts(), "pull": result.pull.action_counts()},
            "bytes": {"push": result.push.action_bytes(), "pull": result.pull.action_bytes()},
            "local_files": result.push.local_files,
            "remote_files": result.push.remote_files,
        },
        "changes": changes,
        "ledgers": [
            {
                "path": check.path,
                "growth": check.growth.value if check.growth else None,
                "divergence": check.divergence,
                "problems": list(check.problems),
            }
            for check in result.ledgers
        ],
        "parts": result.record.parts if result.record else {},
        "comparisons": result.comparisons,
    }


def sync_json(result: SyncResult) -> dict[str, Any]:
    rec = result.record
    return {
        "dataset": rec.dataset,
        "remote": rec.remote,
        "direction": rec.operation,
        "state": rec.state,
        "summary": plan_summary(result.plan),
        "changes": [change_json(c) for c in result.plan.changes],
        "comparisons": result.comparisons,
        "audit": rec.as_json(),
    }


def _sidecar_lines(v: dict[str, Any]) -> list[str]:
    if not v.get("sidecar_check", True):
        return ["Sidecar verification skipped (--no-verify-sidecars)."]
    sidecars = v.get("sidecars") or {}
    if not sidecars:
        return []
    good = [f"{name} ({r['files']} files)" for name, r in sidecars.items() if r["ok"]]
    bad = [f"{name}: {len(r['mismatches'])} differ" for name, r in sidecars.items() if not r["ok"]]
    return [
        "Sidecars identical on both sides: "
        + (", ".join(good) or "none")
        + (f"; DIFFERENT: {', '.join(bad)}" if bad else "")
        + "."
    ]


def sync_summary_lines(result: SyncResult) -> list[str]:
    rec = result.record
    if rec.state == "no-op" and rec.skipped:
        return [
            f"Nothing to {rec.operation}: {rec.unchanged} file(s) already equal, {rec.skipped} left alone "
            f"by --mode {rec.mode} or the sync rules (`tether diff {rec.dataset} {rec.remote}` says why)."
        ]
    if rec.state == "no-op":
        return [f"Already up to date: {rec.dataset} ({rec.unchanged} files) with {rec.remote}."]
    verb = {"push": "Pushed", "pull": "Pulled"}[rec.operation]
    if rec.state == "dry-run":
        verb = f"Dry run, nothing changed. Would have {verb.lower()}"
    counts = rec.done if rec.state != "dry-run" else result.plan.action_counts()
    sizes = rec.done_bytes if rec.state != "dry-run" else result.plan.action_bytes()
    parts = [
        f"{counts[action]} {label} ({human_bytes(sizes.get(action, 0))})"
        for action, label in DONE_LABELS.items()
        if counts.get(action)
    ]
    lines = [
        f"{verb} {rec.dataset} {'to' if rec.operation == 'push' else 'from'} {rec.remote}: "
        + (", ".join(parts) or "nothing")
    ]
    if rec.skipped:
        lines.append(f"{rec.skipped} file(s) left alone (see `tether diff` for why).")
    if rec.state in ("transferred", "failed"):
        v = rec.verification
        if v:
            lines.append(
                f"Verified ({v['mode']}): {v['files_verified']} file(s), "
                f"{human_bytes(v['bytes_verified'])}; "
                + ("all match." if not v["mismatches"] else f"{len(v['mismatches'])} MISMATCH(ES).")
            )
    if rec.state in ("transferred", "failed", "no-op") and rec.verification:
        lines += _sidecar_lines(rec.verification)
        rate = rec.bytes_transferred / rec.seconds
        lines.append(
            f"{rec.seconds:.2f} s, {human_bytes(rate)}/s."
            + (
                f" Reused {rec.reused_staged} file(s) staged by an interrupted run."
                if rec.reused_staged
                else ""
            )
        )
        if rec.failed:
            lines.append(f"{len(rec.failed)} file(s) FAILED; rerun to finish.")
    return lines
