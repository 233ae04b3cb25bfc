"""`tether remote test NAME`: is this remote usable, and if not, what exactly to fix.

Each check prints PASS, FAIL (with the fix) or SKIP (an earlier check failed and this one
depends on it). The exit code is 0 when all pass, else the exit code of the first failure, the
same one a push would have stopped with. SSH remotes get the whole list (reachability, host
key, authentication, python3, base folder, write permission, free space, clock skew); local
remotes the subset that applies to a path (a clock check still matters on an NFS share: the
server stamps the files).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tether.config import RemoteConfig
from tether.errors import ConfigError, ExitCode, TetherError
from tether.paths import TEMP_MARKER
from tether.remotes import LocalRemote, open_remote
from tether.remotes.objectstore import ObjectStoreRemote, diagnose
from tether.remotes.ssh import SshRemote
from tether.report import human_bytes

MIN_FREE_BYTES = 100 * 1024 * 1024
MAX_SKEW_S = 30.0  # lock leases last 120 s: a larger skew makes other hosts misjudge expiry
SSH_CHECKS = (
    "ssh client",
    "reachability",
    "host key",
    "authentication",
    "python3",
    "base folder",
    "write permission",
    "free space",
    "clock skew",
)
LOCAL_CHECKS = ("base folder", "write permission", "free space", "clock skew")


@dataclass
class Check:
    name: str
    status: str  # PASS, WARN (works, with a caveat and its fix), FAIL or SKIP
    detail: str
    fix: str = ""
    exit_code: int = 0


class Report:
    """Checks in order; after the first failure the rest are skipped, not guessed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.checks: list[Check] = []

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)

    def passed(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "PASS", detail))

    def fail(self, name: str, detail: str, fix: str, code: int = int(ExitCode.UNREACHABLE)) -> None:
        self.checks.append(Check(name, "FAIL", detail, fix, code))

    def fail_error(self, name: str, exc: TetherError) -> None:
        self.fail(name, exc.message, exc.hint, int(exc.exit_code))

    def skip_rest(self) -> None:
        done = {c.name for c in self.checks}
        failed = next(c.name for c in self.checks if c.status == "FAIL")
        for name in self.names:
            if name not in done:
                self.checks.append(Check(name, "SKIP", f"not checked: {failed} failed"))


def exit_code(checks: list[Check]) -> int:
    return next((c.exit_code for c in checks if c.status == "FAIL"), int(ExitCode.OK))


def render(checks: list[Check]) -> list[str]:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status}  {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':6}{'':<{width}}  fix: {c.fix}")
    return lines


def run_checks(config: RemoteConfig, *, workspace_root: Path | None = None) -> list[Check]:
    remote = open_remote(config, workspace_root=workspace_root)
    try:
        if isinstance(remote, LocalRemote):
            return _local_checks(remote)
        if isinstance(remote, SshRemote):
            return _ssh_checks(remote)
        if isinstance(remote, ObjectStoreRemote):
            return _objectstore_checks(remote)
        report = Report(("reachability",))
        try:
            remote.check()
            report.passed("reachability", f"{remote.url} answers")
        except TetherError as exc:
            report.fail_error("reachability", exc)
        return report.checks
    finally:
        remote.close()


# -- object stores ------------------------------------------------------------------------------
def _objectstore_checks(remote: ObjectStoreRemote) -> list[Check]:
    """The backend runs the probes (it knows its requests); a passing check that still carries a
    fix (e.g. conditional writes not enforced, so the lock is weaker) is shown as a WARN."""
    checks = []
    for name, ok, detail, fix in diagnose(remote):
        status = "FAIL" if not ok else ("WARN" if fix else "PASS")
        checks.append(Check(name, status, detail, fix, 0 if ok else int(ExitCode.UNREACHABLE)))
    return checks


# -- SSH ----------------------------------------------------------------------------------------
# A failure at one stage implies the stages before it worked (ssh checks them in this order).
_IMPLIED = {
    "host key": [("reachability", "the server answered")],
    "authentication": [
        ("reachability", "the server answered"),
        ("host key", "known and matching (checked by ssh against known_hosts)"),
    ],
}


def _ssh_checks(remote: SshRemote) -> list[Check]:
    report = Report(SSH_CHECKS)
    steps: list[Callable[[Report, SshRemote], None]] = [
        _ssh_client,
        _ssh_connect,
        _python,
        _remote_folder,
        _probe,
    ]
    for step in steps:
        try:
            step(report, remote)
        except ConfigError as exc:
            report.fail_error("ssh client", exc)
        except TetherError as exc:
            stage = getattr(exc, "check", "reachability")
            for name, detail in _IMPLIED.get(stage, []):
                report.passed(name, detail)
            report.fail_error(stage, exc)
        if report.failed:
            report.skip_rest()
            break
    return report.checks


def _ssh_client(report: Report, remote: SshRemote) -> None:
    report.passed("ssh client", remote.conn.binary())
    remote.conn.effective()  # a configuration ssh rejects fails here, before any network


def _ssh_connect(report: Report, remote: SshRemote) -> None:
    remote.conn.connect(private=True)  # a real login, not a master an earlier run left
    report.passed("reachability", f"{remote.settings.host} ({remote.conn.where()}) answers")
    report.passed("host key", "known and matching (checked by ssh against known_hosts)")
    mode = "non-interactive" if remote.settings.batch_mode else "interactive (batch_mode = false)"
    report.passed("authentication", f"logged in, {mode}; one connection is reused for the whole run")


def _python(report: Report, remote: SshRemote) -> None:
    version = ".".join(str(v) for v in remote.control().hello.get("python", []))
    report.passed("python3", f"{remote.settings.python} is Python {version}")


def _remote_folder(report: Report, remote: SshRemote) -> None:
    remote.check()
    report.passed("base folder", f"{remote.where()} is a readable folder")


def _probe(report: Report, remote: SshRemote) -> None:
    before = time.time()
    facts, _ = remote.control().call("probe", write=True)
    after = time.time()
    if not facts.get("writable"):
        report.fail(
            "write permission",
            f"cannot create files in {remote.where()}: {facts.get('write_error', 'denied')}",
            "Ask for write access to that folder, or point the remote at one you own "
            f"(`ssh {remote.settings.host} ls -ld PATH` shows its owner and mode).",
        )
        return
    report.passed("write permission", f"created and removed a file in {remote.where()}")
    _free_space(report, facts.get("free"), remote.where(), facts.get("free_error"))
    if not report.failed:
        _clock(report, facts["time"] - (before + after) / 2, f"{remote.settings.host}'s clock")


# -- local paths --------------------------------------------------------------------------------
def _local_checks(remote: LocalRemote) -> list[Check]:
    report = Report(LOCAL_CHECKS)
    try:
        remote.check()
        report.passed("base folder", f"{remote.root} is a readable folder")
    except TetherError as exc:
        report.fail_error("base folder", exc)
        report.skip_rest()
        return report.checks
    probe = remote.root / f".tether-probe{TEMP_MARKER}{secrets.token_hex(6)}"
    try:
        before = time.time()
        probe.write_bytes(b"")
        stamped = probe.stat().st_mtime
        after = time.time()
        probe.unlink()
    except OSError as exc:
        report.fail(
            "write permission",
            f"cannot create files in {remote.root}: {exc.strerror}",
            "Ask for write access to that folder, or point the remote at one you own.",
        )
        report.skip_rest()
        return report.checks
    report.passed("write permission", f"created and removed a file in {remote.root}")
    try:
        free: int | None = shutil.disk_usage(remote.root).free
    except OSError:
        free = None
    _free_space(report, free, str(remote.root), None)
    if not report.failed:
        # A share's server stamps mtimes with its own clock; a local disk agrees with itself.
        _clock(report, stamped - (before + after) / 2, "the file server's clock (mtime of a new file)")
    if report.failed:
        report.skip_rest()
    return report.checks


# -- shared -------------------------------------------------------------------------------------
def _free_space(report: Report, free: int | None, where: str, error: str | None) -> None:
    if free is None:
        report.passed("free space", f"unknown ({error or 'statvfs unavailable'}); not checked")
    elif free < MIN_FREE_BYTES:
        report.fail(
            "free space",
            f"only {human_bytes(free)} free on the device holding {where}",
            "Free some space or ask for a larger quota; a push stops with exit 3 when it runs out.",
            int(ExitCode.REFUSED),
        )
    else:
        report.passed("free space", f"{human_bytes(free)} free")


def _clock(report: Report, skew: float, what: str) -> None:
    if abs(skew) > MAX_SKEW_S:
        report.fail(
            "clock skew",
            f"{what} differs from this machine's by {skew:+.0f}s",
            "Synchronise the clocks (NTP: `timedatectl set-ntp true`); lock leases expire by the clock.",
            int(ExitCode.REFUSED),
        )
    else:
        report.passed("clock skew", f"{skew:+.1f}s (lock leases tolerate up to {MAX_SKEW_S:.0f}s)")


__all__ = ["Check", "exit_code", "render", "run_checks"]
