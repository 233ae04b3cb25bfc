"""The cases, and the loop that runs every tool through one case from the same starting state.

Each case is: an untimed set-up per tool, then ``repeats`` rounds in which every tool in turn is
reset (untimed), settled (untimed: dirty pages flushed, its inputs read once so the page cache
is equally hot for everyone), timed, and checked (the result must be a correct copy, or the
sample does not count). Rounds interleave the tools so a burst of background load hits all of
them, not just one.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from statistics import median

from benchlib import datasets, discard
from benchlib.datasets import Dataset, FileInfo
from benchlib.measure import BenchError, Cmd, Sample, TimedOut, run_all
from benchlib.remotes import RemoteKind
from benchlib.tools import Op, Slot, Tool

CHANGE_FRACTION = 0.01


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str  # "small" | "large"
    op: Op
    summary: str


CASES: tuple[Case, ...] = (
    Case("small-push", "small", Op.PUSH, "initial push of the small files into an empty remote"),
    Case("small-pull", "small", Op.PULL, "initial pull of the small files into an empty second workspace"),
    Case("small-noop", "small", Op.NOOP, "no-op check right after a push (nothing changed)"),
    Case("small-change", "small", Op.CHANGE, "push after rewriting 1% of the small files"),
    Case("large-push", "large", Op.PUSH, "initial push of the large files into an empty remote"),
    Case("large-pull", "large", Op.PULL, "initial pull of the large files into an empty second workspace"),
)
CASE_NAMES = tuple(c.name for c in CASES)


@dataclass
class RunOptions:
    repeats: int
    runs_dir: Path  # scratch space, one folder per (kind, case, tool)
    logs_dir: Path  # every command's stdout/stderr, kept after the run
    timeout: float
    cache: str = "warm"  # "warm": read inputs once before timing; "drop": drop the page cache
    keep: bool = False
    log: Callable[[str], None] = print
    tool_repeats: dict[str, int] = field(default_factory=dict)  # fewer repeats for slow tools
    setup_timeout: float | None = None  # untimed set-up pushes (default: timeout)
    defer_deletes: bool = True  # small-file trees go to the trash, deleted at the end (benchlib.discard)

    def repeats_for(self, tool: str) -> int:
        return min(self.repeats, self.tool_repeats.get(tool, self.repeats))


@dataclass
class Result:
    """Everything measured for one tool in one case against one remote kind."""

    kind: str
    case: Case
    tool: str
    files: int
    bytes: int
    status: str = "ok"  # ok | failed | timeout | skipped (tool missing) | n/a (no such operation)
    reason: str = ""
    timeout_s: float | None = None  # status "timeout": the run took longer than this
    samples: list[Sample] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason

    @property
    def measured(self) -> bool:
        return self.status == "ok" and bool(self.samples)

    @property
    def median_s(self) -> float:
        return median(s.wall_s for s in self.samples)

    @property
    def min_s(self) -> float:
        return min(s.wall_s for s in self.samples)

    @property
    def max_s(self) -> float:
        return max(s.wall_s for s in self.samples)

    @property
    def peak_rss_kib(self) -> int:
        return max(s.maxrss_kib for s in self.samples)

    @property
    def median_cpu_s(self) -> float:
        return median(s.cpu_s for s in self.samples)

    @property
    def median_background_cores(self) -> float:
        return median(s.background_cores for s in self.samples)

    @property
    def throughput_bps(self) -> float:
        return self.bytes / self.median_s if self.median_s > 0 else 0.0

    def step_medians(self) -> list[tuple[str, float]]:
        """Per-command medians for tools that take several commands (dvc add + dvc push)."""
        if not self.samples:
            return []
        labels = [s.label for s in self.samples[0].steps]
        return [(label, median(s.steps[i].wall_s for s in self.samples)) for i, label in enumerate(labels)]

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "remote": self.kind,
            "case": self.case.name,
            "op": self.case.op.value,
            "dataset": self.case.dataset,
            "tool": self.tool,
            "status": self.status,
            "reason": self.reason,
            "files": self.files,
            "bytes": self.bytes,
            "commands": self.commands,
            "samples": [s.as_json() for s in self.samples],
        }
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.measured:
            out |= {
                "median_s": round(self.median_s, 6),
                "min_s": round(self.min_s, 6),
                "max_s": round(self.max_s, 6),
                "peak_rss_kib": self.peak_rss_kib,
                "median_cpu_s": round(self.median_cpu_s, 4),
                "median_background_cores": round(self.median_background_cores, 3),
                "throughput_mib_s": round(self.throughput_bps / datasets.MIB, 2),
                "step_medians_s": {label: round(v, 6) for label, v in self.step_medians()},
            }
            if traffic := self.median_traffic():
                out["median_traffic"] = traffic
        return out

    def median_traffic(self) -> dict[str, float] | None:
        """Median of each traffic counter over the samples (kinds whose server counts)."""
        counted = [s.traffic for s in self.samples if s.traffic is not None]
        if not counted:
            return None
        return {key: median(t[key] for t in counted) for key in counted[0]}


# -- one case -----------------------------------------------------------------------------------
def run_case(
    case: Case,
    kind: RemoteKind,
    dataset: Dataset,
    tools: list[Tool],
    unavailable: dict[str, str],
    opts: RunOptions,
) -> list[Result]:
    """Run every tool through ``case``; a tool that fails is reported, never fatal to the run."""
    results: list[Result] = []
    active: list[tuple[Tool, Slot, Result]] = []
    case_dir = opts.runs_dir / kind.name / case.name
    discard.defer(opts.defer_deletes and case.dataset == "small")
    for tool in tools:
        result = Result(kind.name, case, tool.name, len(dataset.files), dataset.total_bytes)
        results.append(result)
        if tool.name in unavailable:
            result.status, result.reason = "skipped", unavailable[tool.name]
            continue
        if why := tool.not_applicable(case.op, kind.name, case.dataset):
            result.status, result.reason = "n/a", why
            continue
        scratch = case_dir / tool.name
        discard.discard(scratch)
        scratch.mkdir(parents=True)
        slot = Slot(
            scratch,
            kind.location(scratch),
            kind.name,
            f"bench/{case.dataset}",
            opts.logs_dir / kind.name / case.name / tool.name,
            opts.setup_timeout or opts.timeout,
        )
        if _guard(result, "set-up", partial(setup, case, tool, slot, dataset)):
            active.append((tool, slot, result))
    for repeat in range(opts.repeats):
        for tool, slot, result in active:
            if result.status != "ok" or repeat >= opts.repeats_for(tool.name):
                continue
            _guard(
                result,
                f"repeat {repeat + 1}",
                partial(_repeat, case, tool, slot, result, dataset, repeat, opts),
            )
    if not opts.keep:
        discard.discard(case_dir)
    return results


def _guard(result: Result, stage: str, action: Callable[[], object]) -> bool:
    """Run one stage; a tool error marks the tool's row failed instead of ending the run."""
    try:
        action()
    except TimedOut as exc:
        if stage.startswith("repeat"):
            result.status, result.timeout_s = "timeout", exc.seconds
            result.reason = f"{stage}: {exc} (reported as > {exc.seconds:.0f} s; no further repeats)"
        else:
            result.fail(f"{stage}: {exc}")
        return False
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        result.fail(f"{stage}: {exc}")
        return False
    return True


def setup(case: Case, tool: Tool, slot: Slot, dataset: Dataset) -> None:
    """Untimed: the tool's workspace with its own copy of the data, pushed once if the case needs it."""
    tool.prepare(slot)
    datasets.copy_tree(dataset.root, tool.data_dir(slot))
    if case.op in (Op.PULL, Op.NOOP, Op.CHANGE):
        tool.seed(slot)


def _repeat(
    case: Case, tool: Tool, slot: Slot, result: Result, dataset: Dataset, repeat: int, opts: RunOptions
) -> None:
    changed = reset(case, tool, slot, dataset, repeat)
    cmds = timed_commands(case, tool, slot)
    settle(opts.cache, warm_paths(case, tool, slot))
    before = slot.remote.counters()
    sample = run_all(cmds, slot.logs, opts.timeout)
    after = slot.remote.counters()
    if before is not None and after is not None:
        sample.traffic = {key: after[key] - before[key] for key in after}
    last = repeat == opts.repeats_for(tool.name) - 1
    if problem := verify(case, tool, slot, dataset, changed, deep=last):
        raise BenchError(f"wrong result: {problem}")
    result.samples.append(sample)
    result.commands = result.commands or [c.argv for c in cmds]
    traffic = " ".join(f"{k}={v}" for k, v in (sample.traffic or {}).items())
    opts.log(
        f"  [{slot.kind}] {case.name:<13} {tool.name:<10} {repeat + 1}/{opts.repeats_for(tool.name)}  "
        f"{sample.wall_s:8.3f} s  rss {sample.maxrss_kib / 1024:7.1f} MiB  cpu {sample.cpu_s:7.2f} s  "
        f"other load {sample.background_cores:4.2f} cores  {traffic}".rstrip()
    )


def reset(case: Case, tool: Tool, slot: Slot, dataset: Dataset, repeat: int) -> list[FileInfo]:
    """Bring the slot to the case's starting state; return the files a change case rewrote."""
    if case.op is Op.PUSH:
        tool.reset_push(slot)
    elif case.op is Op.PULL:
        tool.reset_pull(slot)
    elif case.op is Op.CHANGE:
        changed = datasets.change_set(dataset, CHANGE_FRACTION, repeat)
        datasets.apply_change(tool.data_dir(slot), dataset, changed, repeat)
        return changed
    return []


def timed_commands(case: Case, tool: Tool, slot: Slot) -> list[Cmd]:
    if case.op in (Op.PUSH, Op.CHANGE):
        return tool.push(slot)
    if case.op is Op.PULL:
        return tool.pull(slot)
    return tool.noop(slot)


def warm_paths(case: Case, tool: Tool, slot: Slot) -> list[Path]:
    """What the timed step reads: the local copy for pushes, the remote for pulls, both for no-ops."""
    remote = slot.remote.local_path()
    local = [tool.data_dir(slot)]
    if case.op is Op.PULL:
        return [remote] if remote else []
    if case.op is Op.NOOP:
        return local + ([remote] if remote else [])
    return local


def settle(cache: str, paths: list[Path]) -> None:
    """Equal cache conditions for every tool before the clock starts.

    Always flush dirty pages first, so a tool that syncs (tether flushes before writing its
    index) never pays for the set-up's writes. Then either read the inputs once (``warm``, the
    default) or drop the page cache (``drop``; needs root, and is refused where not allowed).
    """
    os.sync()
    if cache == "drop":
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            raise BenchError(f"--cache drop: cannot drop the page cache here ({exc})") from exc
        wait_for_page_reporting()
        return
    for path in paths:
        datasets.warm(path)


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


def wait_for_page_reporting(
    first_pass: float = 4.0, timeout: float = 10.0, *, counters_in: Path = PAGE_REPORTING
) -> None:
    """Let a VM hand the memory just freed back to its host before the clock starts.

    With free page reporting (virtio-balloon, as on the project's VM) the guest reports free
    memory to the host about two seconds after it was freed, and the host unbacks it; touching
    it again then costs a host page fault per page. Dropping the page cache, or deleting the
    previous run's copy, frees gigabytes. A tool that finished within those two seconds wrote
    into still-backed memory, and a slower-starting one had the rug pulled mid-run: cp -a of
    four 512 MiB files took 1.6-1.8 s right after a drop and 7.7-9.2 s once reporting had run
    (2026-12-02). Waiting until the reporting pass is over gives every tool the same state.
    Polls the kernel's own counters (passes, reported_kib); no-op where they do not exist.
    A pass starts within the kernel's two-second reporting delay or not at all (nothing was
    freed), so at most ``first_pass`` seconds go by waiting for one.
    """
    passes, reported = counters_in / "passes", counters_in / "reported_kib"
    if not passes.exists() or not reported.exists():
        return

    def counters() -> tuple[str, str]:
        return passes.read_text(), reported.read_text()

    start, began = counters(), time.monotonic()
    while counters() == start:
        if time.monotonic() - began > first_pass:
            return
        time.sleep(0.1)
    deadline = time.monotonic() + timeout
    last, still_since = counters(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < 0.5:
        time.sleep(0.1)
        now = counters()
        if now != last:
            last, still_since = now, time.monotonic()


def verify(
    case: Case, tool: Tool, slot: Slot, dataset: Dataset, changed: list[FileInfo], deep: bool
) -> str | None:
    """Is the copy right? Sizes every repeat, every byte (SHA-256) after the last one."""
    if case.op is Op.NOOP:
        return None  # the command's exit code (and rsync's empty itemized list) is the check
    if case.op is Op.PULL:
        return datasets.compare_tree(tool.pulled_dir(slot), dataset.expected(), deep)
    mirror = tool.mirror(slot)
    if mirror is None:
        return tool.check_remote(slot, len(dataset.files))
    source = tool.data_dir(slot)
    if case.op is Op.PUSH:
        return datasets.compare_tree(mirror, dataset.expected(), deep)
    expected = datasets.snapshot(source, deep)
    if not deep:  # cheap check still reads the files this repeat rewrote
        for info in changed:
            expected[info.path] = (info.size, datasets.sha256_file(source / info.path))
    return datasets.compare_tree(mirror, expected, deep=True)  # empty digests are not read
