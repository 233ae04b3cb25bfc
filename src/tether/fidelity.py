"""Dataset fidelity: the rules that keep a dataset's parts consistent on both sides.

The pipeline (sync.py) calls these at fixed points: the primary checks before any lock, the
ledger relations before planning (their facts feed the pure planner), the ledger refusals and
the Parquet pre-check before confirmation, and the verification after the transfer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tether.errors import RefusedError, UsageError, VerificationError
from tether.ledger import LedgerCheck, check_ledger
from tether.manifest import Manifest
from tether.plan import TRANSFERS, Action, Change, Direction, Growth, Plan
from tether.verify import (
    NotParquet,
    VerifyReport,
    check_parquet,
    check_sidecars,
    is_parquet_name,
    parquet_shape,
    verify_transfers,
)

if TYPE_CHECKING:
    from tether.sync import Context
    from tether.transfer import Failure


def require_local_primary(ctx: Context) -> None:
    primary = ctx.profile.primary
    if primary is None or ctx.dataset.only not in (None, primary):
        return
    if not (ctx.dataset.path / primary).is_file():
        raise RefusedError(
            f"dataset {ctx.dataset.id!r} has no primary file {primary} locally ({ctx.dataset.path})",
            hint="A dataset without its primary table is incomplete; nothing was locked or sent. "
            "Create or restore it, or fix `primary` in its profile.",
        )


def require_remote_primary(ctx: Context, remote: Manifest) -> None:
    primary = ctx.profile.primary
    if primary is None or ctx.dataset.only not in (None, primary):
        return
    if not any(e.path == primary for e in remote.entries):
        raise RefusedError(
            f"remote {ctx.remote_name!r} has no primary file {primary} for {ctx.dataset.id!r} "
            f"({ctx.remote.url}/{ctx.dataset.id})",
            hint="Nothing was locked or downloaded. Check the dataset id, or push the dataset there first.",
        )


def check_ledgers(ctx: Context, local: Manifest, remote: Manifest, base: Manifest) -> dict[str, LedgerCheck]:
    """How the two copies of each declared append-only ledger relate (in scope and owned)."""
    checks: dict[str, LedgerCheck] = {}
    ledgers = [ledger for ledger in ctx.profile.append_only if ctx.keep(ledger.path)]
    if not ledgers:
        return checks
    local_by, remote_by, base_by = local.by_path(), remote.by_path(), base.by_path()
    for ledger in ledgers:
        check = check_ledger(
            ledger,
            local_by.get(ledger.path),
            remote_by.get(ledger.path),
            ctx.local_reader(ledger.path),
            ctx.remote_reader(ledger.path),
            base_by.get(ledger.path),
        )
        if check is not None:
            checks[ledger.path] = check
    return checks


def growths(checks: dict[str, LedgerCheck]) -> dict[str, Growth]:
    return {path: c.growth for path, c in checks.items() if c.growth is not None}


def refuse_ledgers(plan: Plan, checks: dict[str, LedgerCheck]) -> None:
    """A diverged ledger, or one whose part to be sent is not whole, stops the run (exit 3)."""
    for change in plan.changes:
        check = checks.get(change.path)
        if check is None:
            continue
        if check.growth == Growth.REWRITTEN and change.action == Action.REFUSE:
            longer = (
                "local"
                if change.local and change.remote and change.local.size > change.remote.size
                else "remote"
            )
            raise RefusedError(
                f"append-only ledger {change.path} was truncated or edited since the last sync: "
                f"{check.divergence}",
                paths=[change.path],
                hint="An append-only file only grows, so nothing was changed. Look at both copies; "
                f"if the longer one ({longer}) is right, `tether {'push' if longer == 'local' else 'pull'} "
                f"... --prefer {longer}` restores the other side from it.",
            )
        if check.growth == Growth.DIVERGED:
            raise RefusedError(
                f"append-only ledger {change.path} has diverged: neither copy extends the other "
                f"(first difference at {check.divergence})",
                paths=[change.path],
                hint="Either transfer would drop the other side's records, so nothing was changed. "
                "Reconcile by hand: start from the remote copy, append the records only yours has, "
                "then push.",
            )
        if check.problems and change.action in TRANSFERS:
            raise RefusedError(
                f"append-only ledger {change.path}: {check.problems[0]}",
                paths=[change.path],
                hint="Nothing was transferred. If a job is still writing it, rerun when the record "
                "is complete; otherwise repair the file (each line one JSON object).",
            )


def precheck_parquet(ctx: Context, plan: Plan) -> None:
    """--verify parquet on a file that is not Parquet is an error before anything moves."""
    if ctx.verify != "parquet":
        return
    push = plan.direction == Direction.PUSH
    for change in plan.transfers:
        if change.path != ctx.profile.primary and not is_parquet_name(change.path):
            continue
        entry = change.local if push else change.remote
        read = ctx.local_reader(change.path) if push else ctx.remote_reader(change.path)
        try:
            parquet_shape(read, entry.size)  # type: ignore[union-attr]
        except NotParquet as exc:
            raise UsageError(
                f"--verify parquet cannot check {change.path}: {exc}",
                hint="Use --verify sha256 (the default) or auto for files that are not Parquet.",
            ) from None


def verify_run(ctx: Context, done: list[Change], local: Manifest, remote: Manifest) -> VerifyReport:
    """Check what was transferred in the requested mode, then the sidecars' fidelity."""
    report = verify_transfers(done, local, remote, mode="size" if ctx.verify == "size" else "sha256")
    report.mode = ctx.verify
    if ctx.verify in ("parquet", "auto"):
        tables = [
            c.path
            for c in done
            if c.action in TRANSFERS and (c.path == ctx.profile.primary or is_parquet_name(c.path))
        ]
        check_parquet(
            tables, ctx.local_reader, ctx.remote_reader, local, remote, report, strict=ctx.verify == "parquet"
        )
        for note in report.fallbacks:
            ctx.progress.message(f"--verify auto fell back: {note}")
    if ctx.verify_sidecars:
        report.sidecars = check_sidecars(ctx.profile, ctx.in_scope, local, remote) or None
    else:
        report.sidecar_check = False
    return report


def explain_ledger_failures(ctx: Context, failed: list[Failure]) -> None:
    """A ledger whose bytes no longer match the scan was appended to during the transfer (a job
    is still writing it): say that, not just "hash mismatch"."""
    for failure in failed:
        if ctx.profile.ledger(failure.path) is not None and isinstance(failure.error, VerificationError):
            raise VerificationError(
                f"append-only ledger {failure.path} grew while it was transferred (a job is appending "
                "to it); nothing was promoted",
                paths=[failure.path],
                hint="Both copies are as they were. Rerun: the next run sends the ledger as it is then.",
            )
