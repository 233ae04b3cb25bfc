"""tether's benchmark: one entry point, every tool side by side in one run.

    python bench/run.py [--quick] [--repeat N] [--cases ...] [--tools ...] [--work DIR] [--json-out FILE]

Generates the datasets (seeded, reused while their checksums hold), runs each case for each
tool ``--repeat`` times from the same starting state, prints medians, peak memory, throughput,
ratios and the issue's targets with PASS/FAIL, and writes every raw timing to JSON. See
bench/README.md for what each case times exactly.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import datasets, discard
from benchlib.cases import CASE_NAMES, CASES, Result, RunOptions, run_case
from benchlib.measure import rss_method
from benchlib.remotes import REMOTE_KINDS, RemoteKind
from benchlib.report import print_tables, write_json
from benchlib.targets import TARGETS, Outcome, evaluate
from benchlib.tools import DEFAULT_TOOLS, KNOWN_TOOLS, REPO_DIR, Tool, ToolOptions, make_tool

BENCH_DIR = Path(__file__).resolve().parent
EXIT_TOOL_FAILED = 1
EXIT_USAGE = 2
EXIT_TARGET_FAILED = 3


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def _names(
    values: list[str] | None, known: tuple[str, ...], default: tuple[str, ...], what: str
) -> list[str]:
    """Accept ``--tools a b`` and ``--tools a,b``; reject unknown names early."""
    if not values:
        return list(default)
    names = [n for v in values for n in v.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes: 2,000 small files, 4 x 16 MiB")
    p.add_argument(
        "--scale", choices=sorted(datasets.SCALES), help="dataset sizes (default full; --quick means quick)"
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs per tool and case (median reported)")
    p.add_argument(
        "--cases", nargs="+", metavar="CASE", help=f"cases to run (default all: {', '.join(CASE_NAMES)})"
    )
    p.add_argument(
        "--tools",
        nargs="+",
        metavar="TOOL",
        help=f"tools (default {','.join(DEFAULT_TOOLS)}; also {','.join(KNOWN_TOOLS)})",
    )
    p.add_argument(
        "--remotes",
        nargs="+",
        metavar="KIND",
        help=f"remote kinds (default local; known: {', '.join(REMOTE_KINDS)})",
    )
    p.add_argument("--work", type=Path, default=BENCH_DIR / ".work", help="work dir (data, scratch, logs)")
    p.add_argument("--json-out", type=Path, help="raw timings as JSON (default WORK/results.json)")
    p.add_argument("--tether", help="tether executable (default: this venv, bench/.venv, .venv, PATH)")
    p.add_argument("--dvc", help="dvc executable (default: this venv, bench/.venv, PATH)")
    p.add_argument(
        "--tether-jobs", type=int, help="pass --jobs N to tether push/pull (default: tether's own)"
    )
    p.add_argument(
        "--cache",
        choices=("warm", "drop"),
        default="warm",
        help="before each timed run: read the inputs once (warm, default) or drop the page cache "
        "(drop, root only)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds before a timed command is killed; the row then reads '> N' (no further repeats)",
    )
    p.add_argument(
        "--setup-timeout", type=float, help="seconds for untimed set-up commands (default: --timeout)"
    )
    p.add_argument(
        "--tool-repeat",
        nargs="+",
        default=[],
        metavar="TOOL=N",
        help="fewer repeats for slow tools, e.g. dvc=1 rclone=1 (at most --repeat)",
    )
    p.add_argument("--keep", action="store_true", help="keep each case's scratch folders for inspection")
    p.add_argument(
        "--deletes",
        choices=("defer", "keep", "now"),
        default="defer",
        help="between runs, set small-file trees aside and delete them when the bench ends (defer, "
        "default), or leave them in WORK/trash for you to delete after several benches (keep), "
        "or delete them before each run (now: every tool then creates its files right after "
        "20,000 deletes; see README 'Deletes')",
    )
    p.add_argument(
        "--fail-on-target", action="store_true", help=f"exit {EXIT_TARGET_FAILED} when a target fails"
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.scale = args.scale or ("quick" if args.quick else "full")
    try:
        args.tool_repeat = {
            name: int(n) for item in args.tool_repeat for name, n in [item.split("=", 1)] if int(n) >= 1
        }
    except ValueError:
        p.error("--tool-repeat takes TOOL=N with N >= 1, e.g. dvc=1")
    args.cases = _names(args.cases, CASE_NAMES, CASE_NAMES, "case")
    args.tools = _names(args.tools, KNOWN_TOOLS, DEFAULT_TOOLS, "tool")
    args.remotes = _names(args.remotes, tuple(REMOTE_KINDS), ("local",), "remote kind")
    args.work = args.work.resolve()
    args.json_out = (args.json_out or args.work / "results.json").resolve()
    return args


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()


def meta_info(
    args: argparse.Namespace, tools: list[Tool], data: dict[str, datasets.Dataset]
) -> dict[str, object]:
    """Everything needed to interpret (or distrust) the numbers later."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "scale": args.scale,
        "repeat": args.repeat,
        "cases": args.cases,
        "remotes": args.remotes,
        "cache": args.cache,
        "deletes": args.deletes,
        "timeout_s": args.timeout,
        "tool_repeat": args.tool_repeat,
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_src": bool(_git("status", "--porcelain", "--", "src")),
        "tools": {t.name: {"version": t.version(), "exe": getattr(t, "exe", None)} for t in tools},
        "datasets": {
            name: {"key": d.spec.key, "files": len(d.files), "bytes": d.total_bytes, "root": str(d.root)}
            for name, d in data.items()
        },
        "peak_rss": rss_method(),
        "timing": "wall clock from spawn to exit of each timed command (time.perf_counter); summed over "
        "a tool's commands",
    }


def run_kind(
    kind: RemoteKind,
    args: argparse.Namespace,
    tools: list[Tool],
    unavailable: dict[str, str],
    data: dict[str, datasets.Dataset],
) -> list[Result]:
    """Every selected case against one remote kind; the kind's servers live only this long."""
    opts = RunOptions(
        args.repeat,
        args.work / "runs",
        args.work / "logs",
        args.timeout,
        args.cache,
        args.keep,
        log,
        args.tool_repeat,
        args.setup_timeout,
        args.deletes != "now",
    )
    if why := kind.missing():
        log(f"remote kind {kind.name}: skipped ({why})")
        unavailable = {t.name: f"remote kind {kind.name} unavailable: {why}" for t in tools}
    else:
        log(f"remote kind {kind.name}: starting ({kind.description})")
        kind.start(args.work)
    try:
        results = []
        for case in (c for c in CASES if c.name in args.cases):
            log(f"[{kind.name}] {case.name}: {case.summary}")
            results += run_case(case, kind, data[case.dataset], tools, unavailable, opts)
        return results
    finally:
        kind.stop()


def exit_code(results: list[Result], outcomes: list[Outcome], fail_on_target: bool) -> int:
    if any(r.status == "failed" for r in results):
        return EXIT_TOOL_FAILED
    if fail_on_target and any(o.verdict == "FAIL" for o in outcomes):
        return EXIT_TARGET_FAILED
    return 0


def footer(args: argparse.Namespace, data: dict[str, datasets.Dataset], elapsed: float) -> str:
    sizes = "; ".join(
        f"{n}: {len(d.files):,} files, {d.total_bytes / datasets.MIB:,.0f} MiB" for n, d in data.items()
    )
    cache = (
        "warm (dirty pages flushed, then the timed step's inputs read once before every timed run)"
        if args.cache == "warm"
        else "cold (page cache dropped before every timed run)"
    )
    scale_note = (
        ""
        if args.scale == "full"
        else " Targets are defined for the full sizes: verdicts are indicative only."
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    fewer = "".join(f", {n} for {t}" for t, n in args.tool_repeat.items() if n < args.repeat)
    return (
        f"scale {args.scale} ({sizes}); median of {args.repeat} run(s) per tool{fewer}; "
        f"× tether = tool median / tether median; '> N' = killed after --timeout N s.{scale_note}\n"
        f"peak RSS: {rss_method()}; "
        "CPU s: user+sys of the tree; bg cores: CPU other processes used meanwhile, in cores (median; "
        f"above ~0.3 the machine was shared and timings are noisy); cache: {cache}; deletes: "
        + (
            "small-file trees set aside between runs, deleted at the end.\n"
            if args.deletes != "now"
            else "each destination deleted right before its run.\n"
        )
        + f"load average now {load}; whole run {elapsed:.0f} s; raw timings: {args.json_out}"
    )


def precompile_tether() -> None:
    """Measure tether as installed: pip compiles a package's bytecode at install time, but an
    editable checkout is compiled on first import only, and never when PYTHONDONTWRITEBYTECODE
    is set (as in this project's CI image), so every timed run would compile ~40 modules from
    source, about 0.1 s of each command. Compiling once here removes that artefact."""
    compileall.compile_dir(REPO_DIR / "src", quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    precompile_tether()
    shutil.rmtree(args.work / "logs", ignore_errors=True)
    if args.deletes != "keep" and (left := discard.empty_trash_at(args.work / "trash")):
        log(f"deleted {left} tree(s) an earlier run left in {args.work / 'trash'}")
    discard.use_trash(args.work / "trash")
    opts = ToolOptions(args.tether, args.dvc, args.tether_jobs)
    tools = [make_tool(name, opts) for name in args.tools]
    unavailable = {t.name: why for t in tools if (why := t.missing())}
    for name, why in unavailable.items():
        log(f"tool {name}: SKIPPED ({why})")
    needed = dict.fromkeys(c.dataset for c in CASES if c.name in args.cases)
    specs = datasets.SCALES[args.scale]
    data = {name: datasets.ensure(specs[name], args.work / "data", log) for name in needed}
    meta = meta_info(args, tools, data)
    results: list[Result] = []
    for kind_name in args.remotes:
        results += run_kind(REMOTE_KINDS[kind_name](), args, tools, unavailable, data)
    outcomes = evaluate(TARGETS, results)
    if args.deletes == "keep":
        log(f"left the trees set aside between runs in {args.work / 'trash'} (--deletes keep)")
    elif set_aside := discard.empty_trash():
        log(f"deleted the {set_aside} tree(s) set aside between runs")
    elapsed = time.perf_counter() - started
    meta |= {"elapsed_s": round(elapsed, 1), "loadavg_end": os.getloadavg()}
    write_json(args.json_out, meta, results, outcomes)
    print_tables(f"tether bench ({args.scale})", results, outcomes, footer(args, data, elapsed))
    return exit_code(results, outcomes, args.fail_on_target)


if __name__ == "__main__":
    sys.exit(main())
