"""The printed tables (rich when available, plain text otherwise) and the JSON of raw timings.

Rows are (case, tool) pairs rather than one column per tool, so adding a tool or a remote kind
adds rows and never widens the table past a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchlib.cases import Result
from benchlib.datasets import MIB
from benchlib.targets import Outcome

HEADERS = (
    "case",
    "tool",
    "median s",
    "min–max s",
    "peak RSS MiB",
    "CPU s",
    "bg cores",
    "MiB/s",
    "× tether",
    "notes",
)
TARGET_HEADERS = ("target", "value", "limit", "verdict")


def _fmt_s(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def result_row(r: Result, tether: Result | None) -> list[str]:
    if not r.measured:
        return [r.case.name, r.tool, r.status.upper(), "", "", "", "", "", "", r.reason[:160]]
    ratio = f"{r.median_s / tether.median_s:.2f}" if tether and tether.measured else ""
    steps = r.step_medians()
    notes = " + ".join(f"{label} {_fmt_s(v)}" for label, v in steps) if len(steps) > 1 else ""
    show_rate = r.case.op.value in ("push", "pull")
    return [
        r.case.name,
        r.tool,
        _fmt_s(r.median_s),
        f"{_fmt_s(r.min_s)}–{_fmt_s(r.max_s)}",
        f"{r.peak_rss_kib / 1024:.0f}",
        f"{r.median_cpu_s:.2f}",
        f"{r.median_background_cores:.2f}",
        f"{r.throughput_bps / MIB:.0f}" if show_rate else "",
        ratio,
        notes,
    ]


def result_rows(results: Sequence[Result]) -> list[list[str]]:
    tether = {(r.kind, r.case.name): r for r in results if r.tool == "tether"}
    return [result_row(r, tether.get((r.kind, r.case.name))) for r in results]


def outcome_row(o: Outcome) -> list[str]:
    if o.value is None:
        value = ""
    elif o.target.metric == "seconds":
        value = f"{o.value:.3f} s"
    else:
        value = f"{o.value:.2f}x"
    return [o.target.label, value, o.target.limit_text(), o.verdict]


def print_tables(title: str, results: Sequence[Result], outcomes: Sequence[Outcome], footer: str) -> None:
    try:
        from rich.console import Console
    except ImportError:
        _print_plain(title, results, outcomes, footer)
        return
    _print_rich(Console(width=None if sys.stdout.isatty() else 160), title, results, outcomes, footer)


def _print_rich(
    console: object, title: str, results: Sequence[Result], outcomes: Sequence[Outcome], footer: str
) -> None:
    from rich.table import Table

    kinds = dict.fromkeys(r.kind for r in results)
    for kind in kinds:
        rows = [r for r in results if r.kind == kind]
        table = Table(title=f"{title} — remote: {kind}", title_justify="left")
        for h in HEADERS:
            table.add_column(
                h, justify="left" if h in ("case", "tool", "notes") else "right", overflow="fold"
            )
        last_case = None
        for r, row in zip(rows, result_rows(rows), strict=True):
            if last_case is not None and r.case.name != last_case:
                table.add_section()
            last_case = r.case.name
            table.add_row(*row, style="dim" if not r.measured else None)
        console.print(table)  # type: ignore[attr-defined]
    if outcomes:
        table = Table(title="Targets", title_justify="left")
        for h in TARGET_HEADERS:
            table.add_column(h, justify="left" if h == "target" else "right")
        colours = {"PASS": "bold green", "FAIL": "bold red"}
        for o in outcomes:
            row = outcome_row(o)
            row[3] = f"[{colours[o.verdict]}]{o.verdict}[/]" if o.verdict in colours else o.verdict
            table.add_row(*row)
        console.print(table)  # type: ignore[attr-defined]
    console.print(footer, highlight=False)  # type: ignore[attr-defined]


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _print_plain(title: str, results: Sequence[Result], outcomes: Sequence[Outcome], footer: str) -> None:
    print(f"{title}\n{_plain_table(HEADERS, result_rows(results))}\n")
    if outcomes:
        print(f"Targets\n{_plain_table(TARGET_HEADERS, [outcome_row(o) for o in outcomes])}\n")
    print(footer)


def write_json(
    path: Path, meta: dict[str, object], results: Sequence[Result], outcomes: Sequence[Outcome]
) -> None:
    doc = {
        "meta": meta,
        "results": [r.as_json() for r in results],
        "targets": [o.as_json() for o in outcomes],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
