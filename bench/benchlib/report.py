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
    if r.status == "timeout" and r.timeout_s is not None:
        ratio = f"> {r.timeout_s / tether.median_s:.1f}" if tether and tether.measured else ""
        return [r.case.name, r.tool, f"> {r.timeout_s:.0f}", "", "", "", "", "", ratio, r.reason[:160]]
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
    # The reference is tether's mirror row; in a run without it (--tools tether-v dvc), tether-v's.
    tether = {(r.kind, r.case.name): r for r in results if r.tool == "tether-v"}
    tether |= {(r.kind, r.case.name): r for r in results if r.tool == "tether"}
    return [result_row(r, tether.get((r.kind, r.case.name))) for r in results]


def shown(results: Sequence[Result]) -> list[Result]:
    """Leave out rows of tools that cannot reach this remote kind at all (rclone on a local
    folder, rsync on S3): they would fill every case with n/a."""
    return [r for r in results if not (r.status == "n/a" and "cannot reach" in r.reason)]


TRAFFIC_HEADERS = ("remote", "case", "tool", "ssh logins", "TCP conns", "HTTP reqs", "KiB up", "KiB down")


def traffic_rows(results: Sequence[Result]) -> list[list[str]]:
    """What reached the server per timed run (median): the round-trip story in numbers."""
    rows = []
    for r in results:
        t = r.median_traffic() if r.measured else None
        if not t:
            continue

        def cell(key: str, scale: float = 1.0, t: dict[str, float] = t) -> str:
            return f"{t[key] / scale:,.0f}" if key in t else ""

        rows.append(
            [
                r.kind,
                r.case.name,
                r.tool,
                cell("ssh_logins"),
                cell("connections"),
                cell("http_requests"),
                cell("bytes_up", 1024),
                cell("bytes_down", 1024),
            ]
        )
    return rows


def outcome_row(o: Outcome) -> list[str]:
    if o.value is None:
        value = ""
    elif o.target.metric == "seconds":
        value = f"{o.bound}{o.value:.3f} s"
    elif o.target.metric.startswith("traffic:"):
        value = f"{o.bound}{o.value:,.0f}"
    else:
        value = f"{o.bound}{o.value:.2f}x"
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
        rows = shown([r for r in results if r.kind == kind])
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
    if traffic := traffic_rows(results):
        table = Table(title="Traffic per timed run (median)", title_justify="left")
        for h in TRAFFIC_HEADERS:
            table.add_column(h, justify="left" if h in ("remote", "case", "tool") else "right")
        for row in traffic:
            table.add_row(*row)
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
    print(f"{title}\n{_plain_table(HEADERS, result_rows(shown(results)))}\n")
    if traffic := traffic_rows(results):
        print(f"Traffic per timed run (median)\n{_plain_table(TRAFFIC_HEADERS, traffic)}\n")
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
