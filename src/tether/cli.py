"""Command line: arguments, rendering and exit codes. No sync logic lives here.

``main(argv) -> int`` is the only place that prints errors and decides the exit code; the
table from error type to message and hint is :func:`_report_error` (tracebacks only with
``--debug``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import tomllib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape as esc

from tether import sync
from tether._version import __version__
from tether.config import (
    COMMAND_OPTIONS,
    LAYOUTS,
    LOCAL_FILE,
    WORKSPACE_FILE,
    edit_toml,
    is_secret,
    write_toml_atomic,
)
from tether.errors import ExitCode, Interrupted, RefusedError, ScanError, TetherError, UsageError, first_line
from tether.plan import Change, Plan
from tether.progress import NO_PROGRESS, Progress
from tether.remotes import parse_url
from tether.report import diff_json, human_bytes, sync_json, sync_summary_lines
from tether.scan import scan_tree
from tether.workspace import Workspace, check_remote_name

if TYPE_CHECKING:
    from rich.progress import TaskID

# Imported where used, not here: every command pays for what this module imports at start-up,
# and a no-op `diff` is meant to answer in well under a second. tether.cli_versioned (with
# tether.versioned, ~30 ms) loads only for versioned remotes and their commands (_TetherGroup,
# _is_versioned); rich.progress and rich.table (~10 ms) only when bars or a table are drawn.

MAX_LISTED = 40


def _console(*, stderr: bool) -> Console:
    """Off a terminal (logs, pipes) tables get room instead of folding paths at 80 columns."""
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console.width = 200
    return console


out = _console(stderr=False)
err = _console(stderr=True)


class State:
    def __init__(self, debug: bool, quiet: bool) -> None:
        self.debug = debug
        self.quiet = quiet


# -- progress -----------------------------------------------------------------------------------
class BarsProgress(Progress):
    """rich bars on stderr: files, bytes, rate and ETA per stage."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichBars

        self.bars = RichBars(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[files]}"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.task: TaskID | None = None
        self.running = False
        self.files_done, self.files_total = 0, None

    def stage(self, name: str, *, files: int | None = None, bytes: int | None = None) -> None:
        """Show one bar per stage; (re)start the display after a prompt stopped it."""
        if not self.running:
            self.bars.start()
            self.running = True
        if self.task is not None:
            self.bars.remove_task(self.task)
        self.files_done, self.files_total = 0, files
        self.task = self.bars.add_task(name, total=bytes or None, files=self._files_text())

    def _files_text(self) -> str:
        if self.files_total is None:
            return f"{self.files_done} files" if self.files_done else ""
        return f"{self.files_done}/{self.files_total} files"

    def advance(self, *, files: int = 0, bytes: int = 0) -> None:
        if self.task is None:
            return
        if files:
            self.files_done += files
            self.bars.update(self.task, advance=bytes, files=self._files_text())
        else:
            self.bars.advance(self.task, bytes)

    def message(self, text: str) -> None:
        self.bars.console.print(f"[yellow]warning:[/] {text}")

    def close(self) -> None:
        if self.running:
            self.bars.stop()
            self.running = False


class QuietProgress(Progress):
    def message(self, text: str) -> None:
        err.print(f"warning: {text}", markup=False, highlight=False)


def _progress(state: State, as_json: bool) -> Progress:
    if state.quiet or as_json:
        return NO_PROGRESS
    if err.is_terminal:
        return BarsProgress()
    return QuietProgress()


# -- rendering ----------------------------------------------------------------------------------
STATUS_STYLE = {
    "local_only": "green",
    "remote_only": "cyan",
    "modified_local": "green",
    "modified_remote": "cyan",
    "deleted_local": "red",
    "deleted_remote": "red",
    "conflict": "bold red",
    "differs": "yellow",
}


def _render_changes(changes: Sequence[Change], action_of: Callable[[Change], str], show_all: bool) -> None:
    if not changes:
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("status")
    table.add_column("action")
    table.add_column("size", justify="right")
    table.add_column("path", overflow="fold")
    table.add_column("why", style="dim", overflow="fold")
    shown = changes if show_all else changes[:MAX_LISTED]
    for c in shown:
        side = c.local or c.remote
        size = c.bytes or (side.size if side else 0)
        style = STATUS_STYLE.get(c.status.value, "")
        why = c.reason if c.action.value in ("skip", "refuse") else ""
        table.add_row(
            f"[{style}]{c.status.value}[/]", esc(action_of(c)), human_bytes(size), esc(c.path), esc(why)
        )
    out.print(table)
    if len(changes) > len(shown):
        out.print(f"… and {len(changes) - len(shown)} more (--all lists every file, --json for scripts)")


def _render_plan(plan: Plan, title: str, show_all: bool, table: bool = True) -> None:
    counts = ", ".join(f"{n} {a}" for a, n in plan.action_counts().items() if a != "none")
    size = human_bytes(sum(plan.action_bytes().get(a, 0) for a in ("upload", "download")))
    out.print(
        f"[bold]{title}[/]: {counts or 'nothing to do'}; {size} to transfer; {plan.unchanged_files} unchanged"
    )
    if table:
        _render_changes(plan.changes, lambda c: c.action.value, show_all)


def _emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _confirmer(yes: bool, state: State, as_json: bool, show_all: bool) -> sync.Confirm:
    """Ask on a terminal; off a terminal, overwrites and deletes need -y (invariant 3)."""

    def confirm(plan: Plan) -> bool:
        if yes:
            return True
        risky = len(plan.overwrites) + len(plan.deletes)
        if sys.stdin.isatty() and not as_json:
            return click.confirm(f"Proceed with this {plan.direction.value}?", default=False, err=True)
        if risky:
            raise RefusedError(
                f"this {plan.direction.value} overwrites or deletes {risky} file(s) and there is no "
                "terminal to confirm it",
                paths=[c.path for c in plan.overwrites + plan.deletes],
                hint="Review with `tether diff`, then rerun with -y to confirm.",
            )
        return True

    return confirm


# -- error table --------------------------------------------------------------------------------
def _report_error(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, Interrupted):
        err.print(exc.message, markup=False, highlight=False)  # the user's choice, not an error
        return int(exc.exit_code)
    if isinstance(exc, click.Abort):
        err.print("No answer at the prompt; nothing was changed.")
        return int(ExitCode.INTERRUPTED)
    if isinstance(exc, TetherError):
        err.print(f"[bold red]error:[/] {esc(exc.message)}", highlight=False)
        paths = getattr(exc, "paths", None) or []
        for p in paths[:10]:
            err.print(f"  {p}", markup=False, highlight=False)
        if len(paths) > 10:
            err.print(f"  … and {len(paths) - 10} more", highlight=False)
        if exc.hint:
            err.print(f"[bold]hint:[/] {esc(exc.hint)}", highlight=False)
        return int(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted; nothing half-written was left under a real name. Rerun to finish.")
        return int(ExitCode.INTERRUPTED)
    if isinstance(exc, click.ClickException):
        exc.show(file=sys.stderr)
        return int(ExitCode.USAGE)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(f"[bold red]error:[/] {esc(str(exc.strerror or exc))}{esc(where)}", highlight=False)
        err.print("[bold]hint:[/] rerun with --debug for details; completed files are kept.")
        return int(ExitCode.TRANSFER_FAILED)  # an I/O error no class names: rerun, not refused
    err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {esc(first_line(exc))}", highlight=False)
    err.print("[bold]hint:[/] rerun with --debug and report the traceback.")
    return int(ExitCode.INTERNAL)


# -- commands -----------------------------------------------------------------------------------
EXIT_CODES_HELP = (
    "Exit codes: 0 ok or in sync; 1 diff found differences; 2 usage or config error; "
    "3 refused for safety (conflict, unseen change, --max-delete, empty source, stale plan, "
    "disk full); 4 verification failed; 5 remote unreachable or login failed; 6 locked; "
    "7 files failed to transfer (I/O error; rerun); 70 internal error; 130 declined or interrupted."
)


class _TetherGroup(click.Group):
    """The top-level group; it adds the versioned-only commands (commit, fetch, checkout, log,
    gc, verify) the first time click looks past the built-in ones: listing commands (``--help``)
    or a name that is not built in. A mirror ``diff``/``push``/``pull`` never imports them."""

    _versioned_added = False

    def _add_versioned(self) -> None:
        if not self._versioned_added:
            self._versioned_added = True
            from tether import cli_versioned

            cli_versioned.register(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_versioned()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._versioned_added:
            self._add_versioned()
            command = super().get_command(ctx, cmd_name)
        return command


def _is_versioned(remote_name: str) -> bool:
    """True when REMOTE is configured with ``layout = "versioned"`` (as
    ``cli_versioned.is_versioned``, without importing it for every mirror remote)."""
    return Workspace.find().remote(remote_name).layout == "versioned"


@click.group(
    cls=_TetherGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP
)
@click.version_option(__version__, prog_name="tether")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Keep datasets in step between this workspace and remotes: diff, push, pull."""
    ctx.obj = State(debug, quiet)


@cli.command()
@click.option("--data-root", default="data", show_default=True, help="Folder holding datasets.")
def init(data_root: str) -> None:
    """Create a workspace (tether.toml, .tether/) in the current folder."""
    ws, created = Workspace.init(Path.cwd(), data_root)
    what = "Created" if created else "Already a workspace:"
    out.print(f"{what} {ws.root / WORKSPACE_FILE} (data root {ws.settings.data_root}/)", markup=False)
    out.print("Next: `tether remote add NAME URL`, then `tether diff DATASET NAME`.")


@cli.group()
def remote() -> None:
    """Add, list, show and remove remotes."""


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE`: VALUE is read as a TOML value (true, 22, 3.5, ["-o", "X=y"]) when it
    is one, else kept as a string, so `--set port=2222` and `--set user=alice` both do the obvious."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r} is not KEY=VALUE")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            with contextlib.suppress(tomllib.TOMLDecodeError):  # not a TOML value: keep the string
                value = tomllib.loads(f"v = {raw}")["v"]
        values[key.strip()] = value
    return values


def _portable_url(url: str, ws: Workspace) -> str:
    """A relative path means relative to where the user stands; store it relative to the
    workspace root, so the committed tether.toml works from any folder and any clone."""
    parsed = parse_url(url, base_dir=Path.cwd())
    if parsed.scheme == "file" and "://" not in url and not Path(url).expanduser().is_absolute():
        return os.path.relpath(parsed.path, ws.root)
    return url


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A remote option.")
@click.option(
    "--local", "local_only", is_flag=True, help="Write to .tether/config.local.toml (not committed)."
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    help="mirror: files at their own paths (default); versioned: content-addressed snapshots.",
)
def remote_add(name: str, url: str, sets: tuple[str, ...], local_only: bool, layout: str | None) -> None:
    """Add remote NAME at URL (a path, file://, ssh:// or s3://)."""
    ws = Workspace.find()
    check_remote_name(name)
    url = _portable_url(url, ws)
    target = ws.state_dir / LOCAL_FILE if local_only else ws.root / WORKSPACE_FILE
    existing = ws.settings.remotes.get(name)
    # --local may override a definition from a lower layer (user, system, tether.toml);
    # anything else with the same name is a duplicate.
    if existing is not None and (not local_only or existing.layer == str(target)):
        raise UsageError(
            f"remote {name!r} already exists ({existing.url}, in {existing.layer})",
            hint=f"Remove it first with `tether remote remove {name}`, or override it for this "
            "machine only with --local.",
        )
    options = _parse_sets(sets)
    if layout is not None and layout != "mirror":
        options["layout"] = layout
    local_file = ws.state_dir / LOCAL_FILE
    # Secrets never go into the committed file; command-running options are refused there.
    private = {k: v for k, v in options.items() if is_secret(k) or k in COMMAND_OPTIONS}
    if target == local_file:
        private = {}
    shared = {k: v for k, v in options.items() if k not in private}
    doc = edit_toml(target)
    doc.setdefault("remotes", {})[name] = {"url": url, **shared}
    write_toml_atomic(target, doc)
    if private:
        local_doc = edit_toml(local_file)
        local_doc.setdefault("remotes", {})[name] = private
        write_toml_atomic(local_file, local_doc)
        local_file.chmod(0o600)
    note = f"; overrides the one in {existing.layer}" if existing is not None else ""
    out.print(f"Added remote {name} -> {url} (in {target.relative_to(ws.root)}){note}", markup=False)
    if private:
        out.print(
            f"{', '.join(sorted(private))} went to {local_file.relative_to(ws.root)} (never committed).",
            markup=False,
        )


@remote.command("list")
def remote_list() -> None:
    """List configured remotes."""
    ws = Workspace.find()
    if not ws.settings.remotes:
        out.print("No remotes. Add one with `tether remote add NAME URL`.")
        return
    for name, cfg in sorted(ws.settings.remotes.items()):
        out.print(f"{name}\t{cfg.url}", markup=False, highlight=False)


@remote.command("show")
@click.argument("name")
def remote_show(name: str) -> None:
    """Show a remote's URL, options (secrets masked) and where it is defined."""
    ws = Workspace.find()
    cfg = ws.remote(name)
    out.print(f"name: {cfg.name}\nurl: {cfg.url}\ndefined in: {cfg.layer}", markup=False, highlight=False)
    for key, value in sorted(cfg.options.items()):
        shown = "****" if is_secret(key) else json.dumps(value) if not isinstance(value, str) else value
        out.print(f"{key}: {shown}", markup=False, highlight=False)


@remote.command("remove")
@click.argument("name")
def remote_remove(name: str) -> None:
    """Remove a remote from the file that defines it (data on the remote is not touched)."""
    ws = Workspace.find()
    ws.remote(name)
    removed = False
    for path in (ws.root / WORKSPACE_FILE, ws.state_dir / LOCAL_FILE):
        if not path.exists():
            continue
        doc = edit_toml(path)
        if name in doc.get("remotes", {}):
            del doc["remotes"][name]
            write_toml_atomic(path, doc)
            removed = True
    if not removed:
        raise UsageError(
            f"remote {name!r} is defined outside this workspace, in {ws.settings.remotes[name].layer}",
            hint="Edit that file to remove it.",
        )
    out.print(f"Removed remote {name}; its data was not touched.", markup=False)
    still = Workspace(ws.root).settings.remotes.get(name)
    if still is not None:
        out.print(f"Note: {name} is still defined in {still.layer} -> {still.url}", markup=False)


@remote.command("test")
@click.argument("name")
def remote_test(name: str) -> None:
    """Check remote NAME: reachability, host key, login, python3, write access, space, clock.

    Prints PASS/FAIL/SKIP per check with the fix; exits 0 when all pass, else with the exit
    code of the first failure (5 for connection, login or permission problems).
    """
    from tether import doctor  # imported on use: it loads the SSH backend

    ws = Workspace.find()
    checks = doctor.run_checks(ws.remote(name), workspace_root=ws.root)
    for line in doctor.render(checks):
        out.print(line, markup=False, highlight=False)
    raise SystemExit(doctor.exit_code(checks))


@remote.command("import-rclone")
@click.argument("name", metavar="NAME[:PATH]")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="rclone.conf to read (default: $RCLONE_CONFIG or ~/.config/rclone/rclone.conf).",
)
def remote_import_rclone(name: str, config_path: Path | None) -> None:
    """Import rclone remote NAME (s3 or sftp) as a tether remote of the same name.

    Give the bucket or folder the rclone way: `r2:my-bucket/datasets`, `hpc:/scratch/data`.
    Keys go to .tether/config.local.toml (never committed), the rest to tether.toml.
    """
    from tether import rclone_import

    ws = Workspace.find()
    imported, shared, local = rclone_import.import_into(ws, name, config_path)
    out.print(
        f"Added remote {imported.name} -> {imported.url} (in {shared.relative_to(ws.root)})", markup=False
    )
    if local is not None:
        out.print(f"Credentials written to {local.relative_to(ws.root)} (not committed)", markup=False)
    for note in imported.notes:
        out.print(f"Note: {note}", markup=False, highlight=False)


@cli.command("ls")
def list_datasets() -> None:
    """List local datasets with file counts and bytes."""
    ws = Workspace.find()
    datasets = ws.list_datasets()
    if not datasets:
        out.print(f"No datasets under {ws.data_root}.", markup=False)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("dataset")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    for ds in datasets:
        # Count what a push would sync: ownership rules applied, links left out.
        try:
            entries = scan_tree(ds.path, keep=ws.ownership(ds), skip_symlinks=True)
        except ScanError as exc:
            table.add_row(esc(ds.id), "?", f"refused: {len(exc.paths)} special file(s)")
            continue
        table.add_row(esc(ds.id), str(len(entries)), human_bytes(sum(e.size for e in entries)))
    out.print(table)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--no-verify-sidecars",
        "no_verify_sidecars",
        is_flag=True,
        help="Do not fail when a sidecar folder differs between the sides (the audit says so).",
    )(f)
    f = click.option(
        "--skip-snapshots", is_flag=True, help="Leave the _snapshots sidecar out (same as --skip _snapshots)."
    )(f)
    f = click.option(
        "--skip", "skip", multiple=True, metavar="SIDECAR", help="Leave a sidecar folder out (repeatable)."
    )(f)
    f = click.option("--primary-only", is_flag=True, help="Only the dataset's primary file.")(f)
    f = click.option(
        "--strict-id",
        is_flag=True,
        help="TARGET must be an explicit namespace/name id (also TETHER_STRICT_ID=1).",
    )(f)
    f = click.option("--id", "dataset_id", help="Dataset id when TARGET is a folder outside the data root.")(
        f
    )
    f = click.option("--checksum", is_flag=True, help="Rehash every file on both sides (ignore caches).")(f)
    f = click.option(
        "--skip-symlinks", is_flag=True, help="Leave symlinks out with a warning instead of failing."
    )(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (no bars).")(f)
    f = click.option("--all", "show_all", is_flag=True, help="List every changed file.")(f)
    return f


def _refuse_mirror_only(**given: bool) -> None:
    """Dataset-fidelity options act on mirror remotes; on a versioned one they would be ignored,
    and an option that cannot be honoured is an error, never a silent no-op."""
    used = [f"--{name.replace('_', '-')}" for name, on in given.items() if on]
    if used:
        raise UsageError(
            f"{', '.join(used)}: only for mirror remotes; this remote is versioned",
            hint="A versioned push or pull moves a whole snapshot, verified by SHA-256; drop the option.",
        )


def _selection(
    *,
    dataset_id: str | None,
    checksum: bool,
    skip_symlinks: bool,
    strict_id: bool,
    primary_only: bool,
    skip: tuple[str, ...],
    skip_snapshots: bool,
    no_verify_sidecars: bool,
) -> dict[str, Any]:
    """The options every dataset command shares, as sync's keyword arguments."""
    return {
        "dataset_id": dataset_id,
        "checksum": checksum,
        "skip_symlinks": skip_symlinks,
        "strict_id": strict_id,
        "primary_only": primary_only,
        "skip": (*skip, "_snapshots") if skip_snapshots else skip,
        "verify_sidecars": not no_verify_sidecars,
    }


@cli.command()
@click.argument("target")
@click.argument("remote_name", metavar="REMOTE|REV1")
@click.argument("rev2", metavar="[REV2]", required=False)
@click.option("--mode", type=click.Choice(["new", "update", "mirror"]), default="update", show_default=True)
@click.option(
    "--audit-json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the audit record (state diff-only) to this file.",
)
@_common
@click.pass_obj
def diff(
    state: State,
    target: str,
    remote_name: str,
    rev2: str | None,
    mode: str,
    audit_json_out: Path | None,
    as_json: bool,
    show_all: bool,
    **selection: Any,
) -> None:
    """Show what differs between TARGET and REMOTE, in both directions. Changes nothing.

    Exit 0 when in sync, 1 when something differs. With two git revisions instead of a
    remote (`tether diff TARGET REV1 REV2`), compare the snapshots tether.lock names at each.
    """
    common = {
        "dataset_id": selection["dataset_id"],
        "checksum": selection["checksum"],
        "as_json": as_json,
        "show_all": show_all,
    }
    if rev2 is not None:
        from tether import cli_versioned

        cli_versioned.diff_revisions(state, target, remote_name, rev2, **common)
        return
    if _is_versioned(remote_name):
        from tether import cli_versioned

        _refuse_mirror_only(
            primary_only=selection["primary_only"],
            skip=bool(selection["skip"]),
            skip_snapshots=selection["skip_snapshots"],
            strict_id=selection["strict_id"],
        )
        cli_versioned.diff_remote(
            state, target, remote_name, skip_symlinks=selection["skip_symlinks"], **common
        )
        return
    progress = _progress(state, as_json)
    try:
        result = sync.diff(
            target,
            remote_name,
            progress=progress,
            mode=sync.Mode(mode),
            audit_out=audit_json_out,
            **_selection(**selection),
        )
    finally:
        progress.close()
    if as_json:
        _emit_json(diff_json(result))
    elif result.in_sync:
        out.print(
            f"In sync: {result.dataset.id} ({result.push.unchanged_files} files) with {result.remote_name}."
        )
    else:
        pull_by = {c.path: c for c in result.pull.changes}
        push_counts = ", ".join(f"{n} {a}" for a, n in result.push.action_counts().items() if a != "none")
        pull_counts = ", ".join(f"{n} {a}" for a, n in result.pull.action_counts().items() if a != "none")
        out.print(f"[bold]{result.dataset.id}[/] vs [bold]{result.remote_name}[/] ({esc(result.remote_url)})")
        out.print(
            f"push would: {push_counts or 'nothing'}; "
            f"{human_bytes(sum(result.push.action_bytes().get(a, 0) for a in ('upload',)))} up"
        )
        out.print(
            f"pull would: {pull_counts or 'nothing'}; "
            f"{human_bytes(sum(result.pull.action_bytes().get(a, 0) for a in ('download',)))} down"
        )
        _render_changes(
            result.push.changes,
            lambda c: f"push:{c.action.value} pull:{pull_by[c.path].action.value}",
            show_all,
        )
    raise SystemExit(int(ExitCode.OK if result.in_sync else ExitCode.DIFFERENCES))


def _sync_command(direction: str) -> Callable[..., None]:
    @click.argument("target")
    @click.argument("remote_name", metavar="REMOTE")
    @click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--dry-run", is_flag=True, help="Show the plan and stop.")
    @click.option(
        "--mode",
        type=click.Choice(["new", "update", "mirror"]),
        default="update",
        show_default=True,
        help="new: only create missing files; update: also replace changed ones; "
        "mirror: also delete what the source lacks.",
    )
    @click.option(
        "--max-delete", default="50%", show_default=True, help="Refuse plans deleting more (N or N%)."
    )
    @click.option(
        "--prefer", type=click.Choice(["local", "remote"]), help="Resolve conflicts and unseen changes."
    )
    @click.option("--jobs", type=click.IntRange(1, 256), help="Parallel transfers.")
    @click.option(
        "--verify",
        type=click.Choice(["sha256", "size", "parquet", "auto"]),
        default="sha256",
        show_default=True,
        help="How transferred files are checked afterwards (parquet: also compare Parquet footers; "
        "auto: the strongest available, with a warning when it falls back).",
    )
    @click.option(
        "--audit-json-out",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write the audit record to this file.",
    )
    @_common
    @click.pass_obj
    def command(
        state: State,
        target: str,
        remote_name: str,
        yes: bool,
        dry_run: bool,
        mode: str,
        max_delete: str,
        prefer: str | None,
        jobs: int | None,
        audit_json_out: Path | None,
        verify: str,
        as_json: bool,
        show_all: bool,
        **selection: Any,
    ) -> None:
        if _is_versioned(remote_name):
            from tether import cli_versioned

            _refuse_mirror_only(
                verify=verify != "sha256",
                primary_only=selection["primary_only"],
                skip=bool(selection["skip"]),
                skip_snapshots=selection["skip_snapshots"],
                no_verify_sidecars=selection["no_verify_sidecars"],
                strict_id=selection["strict_id"],
            )
            cli_versioned.sync_command(
                direction,
                state,
                target,
                remote_name,
                yes=yes,
                dry_run=dry_run,
                mode=mode,
                max_delete=max_delete,
                prefer=prefer,
                jobs=jobs,
                audit_json_out=audit_json_out,
                dataset_id=selection["dataset_id"],
                checksum=selection["checksum"],
                skip_symlinks=selection["skip_symlinks"],
                as_json=as_json,
                show_all=show_all,
            )
            return
        progress = _progress(state, as_json)
        shown: list[bool] = []
        ask = _confirmer(yes, state, as_json, show_all)

        def confirm(plan: Plan) -> bool:
            progress.close()
            will_ask = not yes and sys.stdin.isatty()
            if not as_json and not state.quiet and not shown:
                # The full table when a person decides; one line when -y or a script already did.
                _render_plan(plan, f"{direction} plan", show_all, table=will_ask or show_all)
                shown.append(True)
            return ask(plan)

        run = sync.push if direction == "push" else sync.pull
        try:
            result = run(
                target,
                remote_name,
                mode=mode,
                prefer=prefer,
                max_delete=max_delete,
                jobs=jobs,
                dry_run=dry_run,
                confirm=confirm,
                # Nobody reads the plan before it runs: it is made under the remote's lock.
                reviewed=not yes and sys.stdin.isatty() and not as_json,
                progress=progress,
                audit_out=audit_json_out,
                verify=verify,
                **_selection(**selection),
            )
        except Interrupted:
            raise
        finally:
            progress.close()
        if as_json:
            _emit_json(sync_json(result))
            if result.refusal is not None:
                raise result.refusal
            return
        if result.state == "dry-run":
            _render_plan(result.plan, f"{direction} plan", show_all)
        if result.refusal is not None:
            raise result.refusal  # the plan above, then why a real run would stop (exit 3)
        for line in sync_summary_lines(result):
            out.print(line, highlight=False, markup=False)

    command.__doc__ = (
        "Upload local changes of TARGET to REMOTE."
        if direction == "push"
        else "Download REMOTE's changes of TARGET, staged and verified before promotion."
    )
    return command


cli.command("push")(_sync_command("push"))
cli.command("pull")(_sync_command("pull"))


@cli.group()
def lock() -> None:
    """Inspect or break the remote lock of a dataset."""


@lock.command("status")
@click.argument("target")
@click.argument("remote_name", metavar="REMOTE")
def lock_status(target: str, remote_name: str) -> None:
    """Show who holds the lock on TARGET at REMOTE."""
    record = sync.lock_status(target, remote_name)
    if record is None:
        out.print("unlocked")
    else:
        out.print(f"locked by {record.describe()}", highlight=False, markup=False)


@lock.command("break")
@click.argument("target")
@click.argument("remote_name", metavar="REMOTE")
@click.option("--force", is_flag=True, help="Break even a lock that has not expired.")
def lock_break(target: str, remote_name: str, force: bool) -> None:
    """Break a stale (expired or dead) lock on TARGET at REMOTE."""
    record = sync.lock_break(target, remote_name, force=force)
    out.print(
        "no lock to break" if record is None else f"broke the lock of {record.describe()}", highlight=False
    )


GLOBAL_FLAGS = ("--debug", "-q", "--quiet")


def _hoist_global_flags(args: list[str]) -> list[str]:
    """Accept `--debug` and `-q` after the subcommand too (`tether push ds r -q`)."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    rest = [a for a in args[:end] if a not in GLOBAL_FLAGS]
    return flags + rest + args[end:]


# Fewer young-generation collections: a run over 20,000 files allocates a few hundred thousand
# small objects (manifest entries, stats) that form no reference cycles. With Python's default
# (700) a cold no-op diff ran ~300 collections, 2 of them full (80-160 ms of 0.7-1.0 s); with
# 10,000 it ran ~20, none full (50-80 ms), and finished first in 5 of 6 interleaved pairs.
GC_THRESHOLDS = (10_000, 10, 10)


def main(argv: Sequence[str] | None = None) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    args = _hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="tether", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show(file=sys.stderr)
        return int(ExitCode.USAGE)
    except BaseException as exc:  # the one place errors become messages and exit codes
        return _report_error(exc, debug)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
