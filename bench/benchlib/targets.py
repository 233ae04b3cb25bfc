"""The issues' performance targets as data, checked against one run's results.

A target names a remote kind, a case, the tool measured and (for ratios) the tool it is
measured against, and a limit; a limit of None makes it an informational ratio, shown but not
judged. Later issues append their own rows (e.g. kind "ssh" or "s3") without touching the code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from benchlib.cases import Result


@dataclass(frozen=True)
class Target:
    kind: str
    case: str
    label: str
    metric: str  # "time_ratio": tool/ref median; "speedup": ref/tool median; "seconds"; "throughput_ratio"
    tool: str
    ref: str | None = None
    limit: float | None = None
    op: str = "<="  # how value compares with limit: "<=", ">=", "<"

    def value(self, results: dict[tuple[str, str, str], Result]) -> float | None:
        mine = results.get((self.kind, self.case, self.tool))
        if mine is None or not mine.measured:
            return None
        if self.metric == "seconds":
            return mine.median_s
        other = results.get((self.kind, self.case, self.ref or ""))
        if other is None or not other.measured:
            return None
        if self.metric == "time_ratio":
            return mine.median_s / other.median_s
        if self.metric == "speedup":
            return other.median_s / mine.median_s
        if self.metric == "throughput_ratio":
            return mine.throughput_bps / other.throughput_bps
        raise ValueError(f"unknown metric {self.metric!r}")

    def limit_text(self) -> str:
        if self.limit is None:
            return "info"
        unit = " s" if self.metric == "seconds" else "x"
        return f"{self.op} {self.limit:g}{unit}"


@dataclass(frozen=True)
class Outcome:
    target: Target
    value: float | None
    verdict: str  # PASS | FAIL | info | n/a

    def as_json(self) -> dict[str, object]:
        t = self.target
        return {
            "remote": t.kind,
            "case": t.case,
            "label": t.label,
            "metric": t.metric,
            "tool": t.tool,
            "ref": t.ref,
            "limit": t.limit,
            "op": t.op,
            "value": None if self.value is None else round(self.value, 4),
            "verdict": self.verdict,
        }


def _judge(target: Target, value: float | None) -> str:
    if value is None:
        return "n/a"
    if target.limit is None:
        return "info"
    ok = {"<=": value <= target.limit, ">=": value >= target.limit, "<": value < target.limit}[target.op]
    return "PASS" if ok else "FAIL"


def evaluate(targets: Iterable[Target], results: list[Result]) -> list[Outcome]:
    by_key = {(r.kind, r.case.name, r.tool): r for r in results}
    ran = {(r.kind, r.case.name) for r in results}
    out = []
    for t in targets:
        if (t.kind, t.case) not in ran:
            continue  # case not selected (--cases) or remote kind not run
        v = t.value(by_key)
        if v is None and t.limit is None:
            continue  # an informational ratio whose tools were not run: nothing worth a row
        out.append(Outcome(t, v, _judge(t, v)))
    return out


# Issue 3 (local-path remotes). Ratios read as named: "tether / rsync" is tether's time over rsync's.
TARGETS: tuple[Target, ...] = (
    Target(
        "local", "small-push", "small push: tether / rsync time", "time_ratio", "tether", "rsync", 1.3, "<="
    ),
    Target(
        "local", "small-pull", "small pull: tether / rsync time", "time_ratio", "tether", "rsync", 1.3, "<="
    ),
    Target("local", "small-pull", "small pull: DVC / tether time", "speedup", "tether", "dvc", 4.0, ">="),
    Target("local", "small-noop", "small no-op: tether diff wall time", "seconds", "tether", None, 1.0, "<"),
    Target(
        "local",
        "large-push",
        "large push: tether / cp throughput",
        "throughput_ratio",
        "tether",
        "cp",
        0.9,
        ">=",
    ),
    Target(
        "local",
        "large-pull",
        "large pull: tether / cp throughput",
        "throughput_ratio",
        "tether",
        "cp",
        0.9,
        ">=",
    ),
    # informational: the other ratios worth watching
    Target("local", "small-push", "small push: DVC / tether time", "speedup", "tether", "dvc"),
    Target("local", "small-push", "small push: tether / cp time", "time_ratio", "tether", "cp"),
    Target(
        "local", "small-noop", "small no-op: tether / rsync --dry-run time", "time_ratio", "tether", "rsync"
    ),
    Target("local", "small-noop", "small no-op: DVC status / tether diff time", "speedup", "tether", "dvc"),
    Target("local", "small-change", "small 1% change: tether / rsync time", "time_ratio", "tether", "rsync"),
    Target("local", "small-change", "small 1% change: DVC / tether time", "speedup", "tether", "dvc"),
    Target(
        "local", "large-push", "large push: tether / rsync throughput", "throughput_ratio", "tether", "rsync"
    ),
    Target(
        "local",
        "large-push",
        "large push: tether / cp+sync throughput",
        "throughput_ratio",
        "tether",
        "cp+sync",
    ),
    Target(
        "local",
        "large-pull",
        "large pull: tether / cp+sync throughput",
        "throughput_ratio",
        "tether",
        "cp+sync",
    ),
    Target("local", "large-push", "large push: DVC / tether time", "speedup", "tether", "dvc"),
    Target("local", "large-pull", "large pull: DVC / tether time", "speedup", "tether", "dvc"),
)
