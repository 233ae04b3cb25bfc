"""The benchmark harness still runs end to end (bench/run.py at its smallest scale).

Not a timing test: it only proves the harness and the CLI contract it drives (init, remote add,
push, pull, diff) still fit together, and that the JSON carries medians. DVC is left out so the
test needs nothing beyond the project's own venv, rsync and cp.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "bench" / "run.py"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (bash bench/setup.sh)")
def test_bench_runs_at_tiny_scale_and_writes_medians(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    tether = Path(sys.executable).parent / "tether"
    cmd = [sys.executable, str(RUN), "--scale", "tiny", "--repeat", "1", "--tools", "tether,rsync,cp"]
    cmd += ["--work", str(tmp_path / "work"), "--json-out", str(out), "--tether", str(tether)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Targets" in done.stdout
    doc = json.loads(out.read_text())
    by_key = {(r["case"], r["tool"]): r for r in doc["results"]}
    for case in ("small-push", "small-pull", "small-noop", "small-change", "large-push", "large-pull"):
        tether_row = by_key[(case, "tether")]
        assert tether_row["status"] == "ok", tether_row["reason"]
        assert tether_row["median_s"] > 0
        assert len(tether_row["samples"]) == 1
        assert by_key[(case, "rsync")]["median_s"] > 0
    assert by_key[("large-push", "cp")]["throughput_mib_s"] > 0
    assert by_key[("small-noop", "cp")]["status"] == "n/a"
    assert {t["verdict"] for t in doc["targets"]} <= {"PASS", "FAIL", "info", "n/a"}
    assert doc["meta"]["deletes"] == "defer"
    assert not (tmp_path / "work" / "trash").exists()  # what was set aside is gone at the end


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="sshd not installed")
@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed (bash bench/setup.sh)")
def test_bench_ssh_and_s3_kinds_through_the_latency_proxy(tmp_path: Path) -> None:
    """The SSH and S3 remote kinds start their servers and the 20 ms proxy, run tether and the
    baselines, and count the no-op's traffic at the proxy."""
    out = tmp_path / "results.json"
    tether = Path(sys.executable).parent / "tether"
    cmd = [sys.executable, str(RUN), "--scale", "tiny", "--repeat", "1", "--remotes", "ssh-20ms", "s3-20ms"]
    cmd += ["--cases", "small-noop", "large-push", "--tools", "tether,rsync,ssh-cat,obstore-mp"]
    cmd += ["--work", str(tmp_path / "work"), "--json-out", str(out), "--tether", str(tether)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    by_key = {(r["remote"], r["case"], r["tool"]): r for r in doc["results"]}
    for kind in ("ssh-20ms", "s3-20ms"):
        for case in ("small-noop", "large-push"):
            row = by_key[(kind, case, "tether")]
            assert row["status"] == "ok", row["reason"]
            assert row["samples"][0]["traffic"]["connections"] >= 1
    assert by_key[("ssh-20ms", "small-noop", "tether")]["median_traffic"]["ssh_logins"] == 1
    assert by_key[("ssh-20ms", "large-push", "ssh-cat")]["status"] == "ok"
    assert by_key[("s3-20ms", "large-push", "obstore-mp")]["status"] == "ok"
    assert by_key[("s3-20ms", "small-noop", "rsync")]["status"] == "n/a"


@pytest.mark.slow
def test_bench_deletes_keep_leaves_the_set_aside_trees(tmp_path: Path) -> None:
    """--deletes keep: the copies replaced between repeats stay in WORK/trash after the run,
    for several benches in a row; the next run with the default deletes them first."""
    work = tmp_path / "work"
    cmd = [sys.executable, str(RUN), "--scale", "tiny", "--repeat", "2", "--tools", "cp"]
    cmd += ["--cases", "small-push", "--work", str(work), "--json-out", str(tmp_path / "r.json")]
    done = subprocess.run([*cmd, "--deletes", "keep"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kept = list((work / "trash").iterdir())
    assert kept and all(tree.is_dir() for tree in kept)  # set aside, not deleted
    assert "left the trees set aside" in done.stdout + done.stderr
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"deleted {len(kept)} tree(s) an earlier run left" in again.stdout + again.stderr
    assert not (work / "trash").exists()


def _bench_cases():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from benchlib import cases
    finally:
        sys.path.pop(0)
    return cases


def test_page_reporting_wait_is_a_no_op_without_the_kernel_module(tmp_path: Path) -> None:
    """On a machine without free page reporting the bench never waits, however long it may."""
    cases = _bench_cases()
    began = time.monotonic()
    cases.wait_for_page_reporting(first_pass=60, timeout=60, counters_in=tmp_path / "absent")
    assert time.monotonic() - began < 30


def test_page_reporting_wait_ends_when_no_pass_comes(tmp_path: Path) -> None:
    """Nothing freed, so no reporting pass: the wait ends after ``first_pass`` seconds."""
    cases = _bench_cases()
    (tmp_path / "passes").write_text("7\n")
    (tmp_path / "reported_kib").write_text("1024\n")
    began = time.monotonic()
    cases.wait_for_page_reporting(first_pass=0.3, timeout=60, counters_in=tmp_path)
    assert 0.3 <= time.monotonic() - began < 30


def test_discard_sets_small_file_trees_aside_and_deletes_the_rest(tmp_path: Path) -> None:
    """benchlib.discard: no inode is freed between runs of a small-file case (ext4 without a
    journal makes files created after a mass delete slow); everything goes at the end."""
    sys.path.insert(0, str(REPO / "bench"))
    from benchlib import discard

    trash = tmp_path / "trash"
    discard.use_trash(trash)
    tree = tmp_path / "copy"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f.txt").write_text("x")
    inode = (tree / "d" / "f.txt").stat().st_ino
    discard.defer(True)
    discard.discard(tree)
    assert not tree.exists()
    (aside,) = trash.iterdir()
    assert (aside / "d" / "f.txt").stat().st_ino == inode  # moved, not copied or freed
    big = tmp_path / "large"
    big.mkdir()
    discard.defer(False)
    discard.discard(big)
    assert not big.exists() and len(list(trash.iterdir())) == 1
    assert discard.empty_trash() == 1
    assert not trash.exists()


def test_discard_deletes_at_once_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from benchlib import discard

    discard.use_trash(tmp_path / "trash")
    discard.defer(True)
    monkeypatch.setattr(discard, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free + (1 << 40))
    tree = tmp_path / "copy"
    tree.mkdir()
    (tree / "f.txt").write_text("x")
    discard.discard(tree)
    assert not tree.exists() and list((tmp_path / "trash").iterdir()) == []
    discard.defer(False)


def test_closing_the_latency_proxy_with_open_connections_leaves_no_pending_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every bench log ended in "Task was destroyed but it is pending!" tracebacks: the proxy's
    loop stopped before its cancelled pipes had finished."""
    import gc
    import socket

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from benchlib.latency import LatencyProxy
    finally:
        sys.path.pop(0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        proxy = LatencyProxy(server.getsockname()[1], 0.001)
        clients = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        for client in clients:
            client.sendall(b"x" * 1000)
        for conn in accepted:  # the bytes went through: both pipes of each connection are running
            assert conn.recv(1000)
        with caplog.at_level("ERROR", logger="asyncio"):
            proxy.close()
            gc.collect()
        for sock in clients + accepted:
            sock.close()
    assert "destroyed but it is pending" not in caplog.text
