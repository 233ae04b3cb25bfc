"""Run one command the way a user would and measure it: wall time, peak RSS, CPU time.

Peak memory: Linux's ``ru_maxrss`` for a child is the largest resident set of that child *or
any descendant it waited for* (rsync's receiver and generator, DVC's workers), i.e. the peak of
the biggest single process in the tree, not the sum. One catch: the kernel also counts the
memory image a process had just before it called exec, and a child forked from this harness
starts as a copy of a 30-40 MiB Python process, which would swamp ``cp``'s 2 MiB. So commands
run under GNU ``/usr/bin/time -f %M`` (a ~2 MiB C program that forks, execs, ``wait4``s and
reports the child's ``ru_maxrss``); without it, ``os.wait4`` on the direct child is used and the
report says the figure includes the harness's image. CPU time (user+sys of the whole waited-for
tree) and wall time always come from this process's own ``os.wait4`` and clock.

Output goes to log files, never pipes: a chatty tool can never block on a full pipe, and the
logs are kept for a failing run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(Exception):
    """A tool run went wrong (bad exit code, timeout, wrong result); the tool's row shows why."""


class TimedOut(BenchError):
    """A timed command ran past ``--timeout``: reported as "> N s", not as a failure."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


@dataclass(frozen=True)
class Cmd:
    """One command line of a tool, with where and how it runs and what counts as success."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (0,)
    expect_empty_stdout: bool = False  # e.g. rsync --dry-run -i on a tree that is in sync
    expect_empty_stderr: bool = False  # e.g. rclone copy --dry-run (it logs would-be copies there)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or " ".join(
            os.path.basename(a) if i == 0 else a for i, a in enumerate(self.argv[:2])
        )


@dataclass
class Step:
    """The measurement of one command."""

    label: str
    wall_s: float
    maxrss_kib: int
    user_s: float
    sys_s: float
    exit_code: int
    background_cpu_s: float = 0.0  # CPU other processes used meanwhile: the noise indicator

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "wall_s": round(self.wall_s, 6),
            "maxrss_kib": self.maxrss_kib,
            "user_s": round(self.user_s, 4),
            "sys_s": round(self.sys_s, 4),
            "background_cpu_s": round(self.background_cpu_s, 3),
            "exit_code": self.exit_code,
        }


@dataclass
class Sample:
    """One timed repeat: the tool's commands in order (e.g. ``dvc add`` then ``dvc push``)."""

    steps: list[Step]
    traffic: dict[str, int] | None = None  # what reached the server meanwhile (remote kinds that count)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.steps)

    @property
    def maxrss_kib(self) -> int:
        return max((s.maxrss_kib for s in self.steps), default=0)

    @property
    def cpu_s(self) -> float:
        return sum(s.user_s + s.sys_s for s in self.steps)

    @property
    def background_cores(self) -> float:
        """Cores' worth of CPU that other processes used during this sample (0 = quiet machine)."""
        return sum(s.background_cpu_s for s in self.steps) / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "wall_s": round(self.wall_s, 6),
            "maxrss_kib": self.maxrss_kib,
            "cpu_s": round(self.cpu_s, 4),
            "background_cores": round(self.background_cores, 3),
            "steps": [s.as_json() for s in self.steps],
            **({"traffic": self.traffic} if self.traffic is not None else {}),
        }


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used so far (all cores, from /proc/stat).

    Sampled around a command and minus the command's own CPU, it tells how much other work
    (another test suite, a pip install) shared the machine during the sample.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


GNU_TIME = "/usr/bin/time"


def rss_method() -> str:
    """How peak RSS is measured on this machine (printed with the results)."""
    if _gnu_time():
        return "GNU /usr/bin/time %M (ru_maxrss of the tool's process tree, largest single process)"
    return "os.wait4 ru_maxrss of the direct child (includes the harness's ~35 MiB image at spawn)"


def _gnu_time() -> bool:
    return os.access(GNU_TIME, os.X_OK)


def _read_rss(path: Path) -> int | None:
    """GNU time's -o file: an optional "Command exited with..." line, then %M in KiB."""
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        return None
    return int(lines[-1]) if lines and lines[-1].isdigit() else None


def run(cmd: Cmd, log_dir: Path, timeout: float) -> Step:
    """Run ``cmd`` to completion and measure it; raise BenchError on an unexpected outcome."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = log_dir / f"{time.time_ns()}-{os.path.basename(cmd.argv[0])}"
    out_path, err_path, rss_path = (
        stem.with_suffix(".out"),
        stem.with_suffix(".err"),
        stem.with_suffix(".rss"),
    )
    argv = [GNU_TIME, "-f", "%M", "-o", str(rss_path), "--", *cmd.argv] if _gnu_time() else cmd.argv
    env = {**os.environ, **cmd.env}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy_before = machine_busy_s()
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=cmd.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # so a timeout can kill the whole tree
        )
        timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        busy = machine_busy_s() - busy_before
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    rss = _read_rss(rss_path) or usage.ru_maxrss
    own = usage.ru_utime + usage.ru_stime
    step = Step(cmd.name, wall, rss, usage.ru_utime, usage.ru_stime, code, max(0.0, busy - own))
    _check(cmd, step, out_path, err_path, timeout)
    return step


def _check(cmd: Cmd, step: Step, out_path: Path, err_path: Path, timeout: float) -> None:
    if step.exit_code == -signal.SIGKILL and step.wall_s >= timeout:
        raise TimedOut(f"`{cmd.name}` timed out after {timeout:.0f} s", timeout)
    if step.exit_code not in cmd.expect:
        raise BenchError(
            f"`{' '.join(cmd.argv)}` exited {step.exit_code} (expected {'/'.join(map(str, cmd.expect))}): "
            f"{_tail(err_path) or _tail(out_path)}"
        )
    for wanted, path in ((cmd.expect_empty_stdout, out_path), (cmd.expect_empty_stderr, err_path)):
        if wanted and path.stat().st_size:
            raise BenchError(
                f"`{cmd.name}` reported differences on a tree that should be in sync: {_tail(path)}"
            )


def _tail(path: Path, limit: int = 400) -> str:
    try:
        text = path.read_bytes()[-limit:].decode(errors="replace")
    except FileNotFoundError:
        return ""
    return " ".join(text.split())


def run_all(cmds: list[Cmd], log_dir: Path, timeout: float) -> Sample:
    """Run a tool's commands in order as one timed sample."""
    return Sample([run(c, log_dir, timeout) for c in cmds])


def run_untimed(cmds: list[Cmd], log_dir: Path, timeout: float) -> None:
    """Set-up commands: same checks, measurements thrown away."""
    for c in cmds:
        run(c, log_dir, timeout)
