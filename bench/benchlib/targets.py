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
    metric: str  # "time_ratio": tool/ref median; "speedup": ref/tool median; "seconds"; "throughput_ratio";
    # "traffic:KEY": the tool's median of a traffic counter (connections, ssh_logins, http_requests)
    tool: str
    ref: str | None = None
    limit: float | None = None
    op: str = "<="  # how value compares with limit: "<=", ">=", "<"
    optional: bool = False  # shown only when both tools were run (a tool outside the defaults)

    def value(self, results: dict[tuple[str, str, str], Result]) -> float | None:
        return self.measure(results)[0]

    def measure(self, results: dict[tuple[str, str, str], Result]) -> tuple[float | None, int]:
        """The value and which way it is a bound: 0 exact, +1 the truth is at least the value
        (a tool timed out on the slow side of the ratio), -1 at most the value."""
        mine = _time(results.get((self.kind, self.case, self.tool)))
        if mine is None:
            return None, 0
        mine_s, mine_dir = mine
        if self.metric == "seconds":
            return mine_s, mine_dir
        if self.metric.startswith("traffic:"):
            r = results[(self.kind, self.case, self.tool)]
            traffic = r.median_traffic() if r.measured else None
            key = self.metric.split(":", 1)[1]
            return (traffic[key], 0) if traffic and key in traffic else (None, 0)
        ref = _time(results.get((self.kind, self.case, self.ref or "")))
        if ref is None:
            return None, 0
        ref_s, ref_dir = ref
        if mine_dir and ref_dir:
            return None, 0  # both timed out: nothing to say
        if self.metric == "time_ratio":
            return mine_s / ref_s, mine_dir - ref_dir
        if self.metric == "speedup":
            return ref_s / mine_s, ref_dir - mine_dir
        if self.metric == "throughput_ratio":
            mine_r, ref_r = (
                results[(self.kind, self.case, self.tool)],
                results[(self.kind, self.case, self.ref or "")],
            )
            return (mine_r.bytes / mine_s) / (ref_r.bytes / ref_s), ref_dir - mine_dir
        raise ValueError(f"unknown metric {self.metric!r}")

    def limit_text(self) -> str:
        if self.limit is None:
            return "info"
        unit = " s" if self.metric == "seconds" else "" if self.metric.startswith("traffic:") else "x"
        return f"{self.op} {self.limit:g}{unit}"


def _time(r: Result | None) -> tuple[float, int] | None:
    """A tool's median, or its timeout as a lower bound."""
    if r is None:
        return None
    if r.measured:
        return r.median_s, 0
    if r.status == "timeout" and r.timeout_s is not None:
        return r.timeout_s, 1
    return None


@dataclass(frozen=True)
class Outcome:
    target: Target
    value: float | None
    verdict: str  # PASS | FAIL | info | n/a
    direction: int = 0  # +1: the value is a lower bound (a tool timed out), -1: an upper bound

    @property
    def bound(self) -> str:
        return {1: "> ", -1: "< "}.get(self.direction, "")

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
            "bound": {1: "lower", -1: "upper"}.get(self.direction),
            "verdict": self.verdict,
        }


def _judge(target: Target, value: float | None, direction: int = 0) -> str:
    if value is None:
        return "n/a"
    if target.limit is None:
        return "info"
    ok = {"<=": value <= target.limit, ">=": value >= target.limit, "<": value < target.limit}[target.op]
    if direction == 0:
        return "PASS" if ok else "FAIL"
    # A bound decides only when the truth lies beyond it on the side that settles the verdict.
    wants_big = target.op == ">="
    if (direction > 0) == wants_big:
        return "PASS" if ok else "n/a"
    return "FAIL" if not ok else "n/a"


def _ran(r: Result | None) -> bool:
    """The tool was selected and could run (a failure still counts: its target reads n/a)."""
    return r is not None and r.status not in ("skipped", "n/a")


def evaluate(targets: Iterable[Target], results: list[Result]) -> list[Outcome]:
    by_key = {(r.kind, r.case.name, r.tool): r for r in results}
    ran = {(r.kind, r.case.name) for r in results}
    out = []
    for t in targets:
        if (t.kind, t.case) not in ran:
            continue  # case not selected (--cases) or remote kind not run
        if t.optional and not all(_ran(by_key.get((t.kind, t.case, name))) for name in (t.tool, t.ref)):
            continue  # e.g. tether-v vs DVC when only one of them was selected
        v, direction = t.measure(by_key)
        if v is None and t.limit is None:
            continue  # an informational ratio whose tools were not run: nothing worth a row
        out.append(Outcome(t, v, _judge(t, v, direction), direction))
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


def _t(
    kind: str,
    case: str,
    label: str,
    metric: str,
    ref: str | None = None,
    limit: float | None = None,
    op: str = "<=",
    tool: str = "tether",
) -> Target:
    return Target(kind, case, f"{kind} {label}", metric, tool, ref, limit, op)


# Issue 4 (SSH): the same sshd straight over loopback ("ssh") and through the 20 ms proxy.
SSH_TARGETS: tuple[Target, ...] = (
    # (a) and (e) through the proxy: >= 10x rclone sftp and DVC, no slower than rsync
    *(
        t
        for case, what in (("small-push", "small push"), ("small-pull", "small pull"))
        for t in (
            _t("ssh-20ms", case, f"{what}: rclone sftp / tether time", "speedup", "rclone", 10.0, ">="),
            _t("ssh-20ms", case, f"{what}: DVC / tether time", "speedup", "dvc", 10.0, ">="),
            _t("ssh-20ms", case, f"{what}: tether / rsync time", "time_ratio", "rsync", 1.0),
        )
    ),
    # (a) on loopback: no slower than rsync, within 1.3x of a plain local copy of the same tree
    _t("ssh", "small-push", "small push: tether / rsync time", "time_ratio", "rsync", 1.0),
    _t("ssh", "small-push", "small push: tether / local cp -a time", "time_ratio", "cp", 1.3),
    # (b) >= 90% of the throughput of `cat file | ssh host 'cat > file'` on the same connection
    _t(
        "ssh",
        "large-push",
        "large push: tether / cat|ssh throughput",
        "throughput_ratio",
        "ssh-cat",
        0.9,
        ">=",
    ),
    _t(
        "ssh-20ms",
        "large-push",
        "large push: tether / cat|ssh throughput",
        "throughput_ratio",
        "ssh-cat",
        0.9,
        ">=",
    ),
    # (c) no-op under 1 s on loopback; its round trips must not grow with the file count (the
    # traffic rows: compare a quick and a full run)
    _t("ssh", "small-noop", "small no-op: tether diff wall time", "seconds", None, 1.0, "<"),
    _t("ssh", "small-noop", "small no-op: tether ssh logins", "traffic:ssh_logins"),
    _t("ssh-20ms", "small-noop", "small no-op: tether proxied TCP connections", "traffic:connections"),
    _t("ssh-20ms", "small-noop", "small no-op: tether proxied bytes down", "traffic:bytes_down"),
    # informational
    _t("ssh", "small-pull", "small pull: tether / rsync time", "time_ratio", "rsync"),
    _t("ssh", "small-pull", "small pull: tether / local cp -a time", "time_ratio", "cp"),
    _t("ssh", "small-push", "small push: rclone sftp / tether time", "speedup", "rclone"),
    _t("ssh", "small-push", "small push: DVC / tether time", "speedup", "dvc"),
    _t("ssh", "small-pull", "small pull: rclone sftp / tether time", "speedup", "rclone"),
    _t("ssh", "small-pull", "small pull: DVC / tether time", "speedup", "dvc"),
    _t("ssh", "large-pull", "large pull: tether / ssh cat throughput", "throughput_ratio", "ssh-cat"),
    _t("ssh-20ms", "large-pull", "large pull: tether / ssh cat throughput", "throughput_ratio", "ssh-cat"),
    _t("ssh-20ms", "small-noop", "small no-op: tether diff wall time", "seconds"),
    *(
        t
        for kind in ("ssh", "ssh-20ms")
        for t in (
            _t(kind, "small-noop", "small no-op: tether / rsync --dry-run time", "time_ratio", "rsync"),
            _t(kind, "small-change", "small 1% change: tether / rsync time", "time_ratio", "rsync"),
            _t(kind, "small-change", "small 1% change: rclone / tether time", "speedup", "rclone"),
            _t(kind, "small-change", "small 1% change: DVC / tether time", "speedup", "dvc"),
        )
    ),
)

# Issue 5 (object stores): `rclone serve s3` straight ("s3") and through the 20 ms proxy.
S3_TARGETS: tuple[Target, ...] = (
    *(
        t
        for case, what in (("small-push", "small push"), ("small-pull", "small pull"))
        for t in (
            # through the proxy: >= 2x tuned rclone, >= 10x DVC; on loopback: no slower than either
            _t("s3-20ms", case, f"{what}: rclone (32/32) / tether time", "speedup", "rclone", 2.0, ">="),
            _t("s3-20ms", case, f"{what}: DVC / tether time", "speedup", "dvc", 10.0, ">="),
            _t("s3", case, f"{what}: rclone (32/32) / tether time", "speedup", "rclone", 1.0, ">="),
            _t("s3", case, f"{what}: DVC / tether time", "speedup", "dvc", 1.0, ">="),
        )
    ),
    # large files: >= 90% of a plain concurrent multipart upload with obstore
    _t(
        "s3",
        "large-push",
        "large push: tether / obstore multipart throughput",
        "throughput_ratio",
        "obstore-mp",
        0.9,
        ">=",
    ),
    _t(
        "s3-20ms",
        "large-push",
        "large push: tether / obstore multipart throughput",
        "throughput_ratio",
        "obstore-mp",
        0.9,
        ">=",
    ),
    # a no-op costs only the listing requests: a handful of requests, not one per file
    _t(
        "s3-20ms", "small-noop", "small no-op: tether HTTP requests", "traffic:http_requests", None, 100, "<="
    ),
    # informational
    *(
        t
        for kind in ("s3", "s3-20ms")
        for t in (
            _t(kind, "small-noop", "small no-op: tether diff wall time", "seconds"),
            _t(kind, "small-noop", "small no-op: rclone --dry-run / tether time", "speedup", "rclone"),
            _t(kind, "small-noop", "small no-op: DVC status / tether time", "speedup", "dvc"),
            _t(kind, "small-change", "small 1% change: rclone / tether time", "speedup", "rclone"),
            _t(kind, "small-change", "small 1% change: DVC / tether time", "speedup", "dvc"),
            _t(
                kind,
                "large-pull",
                "large pull: tether / obstore get throughput",
                "throughput_ratio",
                "obstore-mp",
            ),
        )
    ),
    _t(
        "s3-20ms",
        "small-noop",
        "small no-op: rclone --dry-run HTTP requests",
        "traffic:http_requests",
        tool="rclone",
    ),
    _t("s3-20ms", "small-noop", "small no-op: DVC status HTTP requests", "traffic:http_requests", tool="dvc"),
)

# Issue 7 (versioned remotes): tether-v's commit + push and pull against DVC's add + push and
# pull, on local-path and S3 remotes (the issue names both); shown only when both tether-v and
# dvc were run.
VERSIONED_TARGETS: tuple[Target, ...] = tuple(
    Target(kind, case, f"{kind} {label}", "speedup", "tether-v", "dvc", limit, ">=", optional=True)
    for kind in ("local", "s3")
    for case, label, limit in (
        ("small-push", "small push (commit+push): DVC / tether-v time", 5.0),
        ("small-pull", "small pull: DVC / tether-v time", 5.0),
        ("large-push", "large push (commit+push): DVC / tether-v time", 1.0),
        ("large-pull", "large pull: DVC / tether-v time", 1.0),
    )
) + tuple(
    Target(kind, case, f"{kind} {label}", "speedup", "tether-v", "dvc", optional=True)
    for kind in ("local", "s3")
    for case, label in (
        ("small-change", "small 1% change (commit+push): DVC / tether-v time"),
        ("small-noop", "small no-op: DVC status / tether-v diff time"),
    )
)

TARGETS = TARGETS + SSH_TARGETS + S3_TARGETS + VERSIONED_TARGETS
