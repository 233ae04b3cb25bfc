"""Unit tests for tether.workspace: discovery, init, dataset resolution, listing and ownership."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tether.config import WORKSPACE_FILE
from tether.errors import ExitCode, InvalidPath, UsageError, WorkspaceNotFound
from tether.paths import check_dataset_id
from tether.workspace import Dataset, Workspace, check_remote_name, find_root


def make_ws(base: Path, name: str = "ws", data_root: str = "data") -> Workspace:
    root = base / name
    root.mkdir(parents=True)
    ws, created = Workspace.init(root, data_root=data_root)
    assert created
    return ws


def touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def set_sync(ws: Workspace, body: str) -> Workspace:
    """Replace the [sync] table of the workspace file and reload."""
    toml = ws.root / WORKSPACE_FILE
    text = toml.read_text()
    start = text.index("[sync]")
    end = text.index("[remotes]")
    toml.write_text(text[:start] + "[sync]\n" + body + "\n\n" + text[end:])
    return Workspace(ws.root)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=a@b", "-c", "user.name=t", "-c", "init.defaultBranch=main", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


# -- find_root -----------------------------------------------------------------------------------


def test_find_root_walks_up(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    deep = ws.root / "data" / "ns" / "ds" / "sub"
    deep.mkdir(parents=True)
    assert find_root(deep) == ws.root
    assert find_root(ws.root) == ws.root
    assert Workspace.find(deep).root == ws.root


def test_find_root_defaults_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_ws(tmp_path)
    monkeypatch.chdir(ws.data_root)
    assert find_root() == ws.root


def test_find_root_stops_at_nearest_workspace(tmp_path: Path) -> None:
    outer = make_ws(tmp_path, "outer")
    inner = make_ws(outer.root, "inner")
    assert find_root(inner.root / "data") == inner.root


def test_workspace_not_found_outside(tmp_path: Path) -> None:
    folder = tmp_path / "plain" / "folder"
    folder.mkdir(parents=True)
    with pytest.raises(WorkspaceNotFound) as info:
        find_root(folder)
    assert info.value.exit_code == ExitCode.USAGE == 2
    assert "tether init" in info.value.hint
    assert str(folder) in info.value.message
    assert isinstance(info.value, FileNotFoundError)


def test_a_folder_named_tether_toml_is_not_a_workspace(tmp_path: Path) -> None:
    (tmp_path / "x" / WORKSPACE_FILE).mkdir(parents=True)
    with pytest.raises(WorkspaceNotFound):
        find_root(tmp_path / "x")


# -- init ----------------------------------------------------------------------------------------


def test_init_creates_files(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    assert (ws.root / WORKSPACE_FILE).is_file()
    assert ws.state_dir.is_dir()
    assert (ws.state_dir / ".gitignore").read_text().splitlines()[-1] == "*"
    assert (ws.root / ".gitignore").read_text() == "# tether local state\n/.tether/\n"
    assert ws.data_root == ws.root / "data"
    assert ws.data_root.is_dir()


def test_init_is_idempotent_and_keeps_user_edits(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    toml = ws.root / WORKSPACE_FILE
    toml.write_text(toml.read_text() + "# my edit\n")
    gitignore_before = (ws.root / ".gitignore").read_text()
    ws2, created = Workspace.init(ws.root, data_root="other")
    assert not created
    assert toml.read_text().endswith("# my edit\n")
    assert ws2.settings.data_root == "data"  # the existing file wins over the argument
    assert (ws.root / ".gitignore").read_text() == gitignore_before
    assert not (ws.root / "other").exists()


def test_init_custom_data_root(tmp_path: Path) -> None:
    ws = make_ws(tmp_path, data_root="datasets")
    assert ws.data_root == ws.root / "datasets"
    assert ws.data_root.is_dir()


def test_init_appends_to_gitignore_without_trailing_newline_once(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / ".gitignore").write_text("node_modules\n*.pyc")
    Workspace.init(root)
    Workspace.init(root)
    assert (root / ".gitignore").read_text() == "node_modules\n*.pyc\n# tether local state\n/.tether/\n"


def test_init_leaves_gitignore_that_already_lists_state(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / ".gitignore").write_text("/.tether/\nbuild/\n")
    Workspace.init(root)
    assert (root / ".gitignore").read_text() == "/.tether/\nbuild/\n"


def test_state_locations(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    assert ws.hash_cache_path.parent == ws.state_dir
    assert ws.staging_dir.parent == ws.state_dir
    assert ws.audit_log == ws.state_dir / "audit.jsonl"
    assert ws.base_path("store", "ns/ds") == ws.state_dir / "bases" / "store" / "ns/ds.manifest"
    with pytest.raises(UsageError):
        ws.base_path("../x", "ns/ds")


# -- resolve -------------------------------------------------------------------------------------


def test_resolve_id_under_data_root(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    (ws.data_root / "ns" / "ds").mkdir(parents=True)
    assert ws.resolve("ns/ds", cwd=ws.root) == Dataset("ns/ds", ws.data_root / "ns" / "ds")


def test_resolve_id_that_does_not_exist_yet(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    assert ws.resolve("ns/new", cwd=ws.root) == Dataset("ns/new", ws.data_root / "ns" / "new")


def test_resolve_flat_name(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    assert ws.resolve("flat", cwd=ws.root) == Dataset("flat", ws.data_root / "flat")
    (ws.data_root / "flat").mkdir()
    assert ws.resolve("flat", cwd=ws.root) == Dataset("flat", ws.data_root / "flat")


def test_resolve_flat_name_prefers_data_root_over_cwd_folder(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    (ws.data_root / "images").mkdir()
    (ws.root / "images").mkdir()
    assert ws.resolve("images", cwd=ws.root) == Dataset("images", ws.data_root / "images")


def test_resolve_relative_and_absolute_path_inside_data_root(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    ds = ws.data_root / "ns" / "ds"
    ds.mkdir(parents=True)
    assert ws.resolve("data/ns/ds", cwd=ws.root) == Dataset("ns/ds", ds)
    assert ws.resolve(str(ds), cwd=tmp_path) == Dataset("ns/ds", ds)
    assert ws.resolve("ds", cwd=ds.parent) == Dataset("ns/ds", ds)
    assert ws.resolve(".", cwd=ds) == Dataset("ns/ds", ds)


def test_resolve_path_outside_workspace(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    outside = tmp_path / "scratch" / "run42"
    outside.mkdir(parents=True)
    assert ws.resolve(str(outside), cwd=ws.root) == Dataset("run42", outside)
    assert ws.resolve(str(outside), dataset_id="lab/run42", cwd=ws.root) == Dataset("lab/run42", outside)
    assert ws.resolve(".", cwd=outside) == Dataset("run42", outside)


def test_resolve_path_outside_with_unusable_name_needs_an_id(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    outside = tmp_path / "my data"
    outside.mkdir()
    with pytest.raises(InvalidPath):
        ws.resolve(str(outside), cwd=ws.root)
    assert ws.resolve(str(outside), dataset_id="my-data", cwd=ws.root).id == "my-data"


def test_resolve_path_with_explicit_id_inside_data_root(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    ds = ws.data_root / "ns" / "ds"
    ds.mkdir(parents=True)
    assert ws.resolve(str(ds), dataset_id="other/id", cwd=ws.root) == Dataset("other/id", ds)


def test_resolve_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_ws(tmp_path)
    home = tmp_path / "home"
    (home / "stuff").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert ws.resolve("~/stuff", cwd=ws.root) == Dataset("stuff", home / "stuff")


def test_resolve_refuses_workspace_root_and_its_parents(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    with pytest.raises(UsageError, match="workspace itself"):
        ws.resolve(".", cwd=ws.root)
    with pytest.raises(UsageError, match="workspace itself"):
        ws.resolve(str(ws.root), cwd=tmp_path)
    with pytest.raises(UsageError, match="workspace itself"):
        ws.resolve(str(tmp_path), cwd=ws.root)
    with pytest.raises((UsageError, InvalidPath)):  # ".." reads as an id here, and is refused as one
        ws.resolve("..", cwd=ws.root)


def test_resolve_refuses_state_folder(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    (ws.state_dir / "bases").mkdir()
    with pytest.raises(InvalidPath, match="state folder"):
        ws.resolve(".tether", cwd=ws.root)
    with pytest.raises(InvalidPath, match="state folder"):
        ws.resolve(str(ws.state_dir / "bases"), cwd=tmp_path)


def test_resolve_refuses_data_root_itself(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    with pytest.raises((InvalidPath, UsageError), match="data root"):
        ws.resolve("data", cwd=ws.root)
    with pytest.raises((InvalidPath, UsageError), match="data root"):
        ws.resolve(".", cwd=ws.data_root)


def test_resolve_ignores_a_tab_completed_trailing_slash(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    assert ws.resolve("ns/ds/", cwd=ws.root).id == "ns/ds"


@pytest.mark.parametrize("target", ["../x", "ns//ds", " ns", "/", "ns/.hidden", ""])
def test_resolve_invalid_ids(tmp_path: Path, target: str) -> None:
    ws = make_ws(tmp_path)
    with pytest.raises((InvalidPath, UsageError)):
        ws.resolve(target, cwd=ws.root)


def test_resolve_invalid_explicit_id(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    outside = tmp_path / "x"
    outside.mkdir()
    with pytest.raises(InvalidPath):
        ws.resolve(str(outside), dataset_id="../escape", cwd=ws.root)


# -- list_datasets ---------------------------------------------------------------------------------


def test_list_datasets(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    d = ws.data_root
    touch(d / "ns" / "b" / "f")
    touch(d / "ns" / "a" / "sub" / "f")
    touch(d / "ns" / ".hidden" / "f")
    touch(d / "flat" / "file.csv")
    touch(d / "flat" / "sub" / "g")  # a flat dataset with files keeps its subfolders
    (d / "empty").mkdir()
    touch(d / "loose.txt")  # a file directly in the data root belongs to no dataset
    assert ws.list_datasets() == [
        Dataset("empty", d / "empty"),
        Dataset("flat", d / "flat"),
        Dataset("ns/a", d / "ns" / "a"),
        Dataset("ns/b", d / "ns" / "b"),
    ]


def test_list_datasets_without_data_root(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    ws.data_root.rmdir()
    assert ws.list_datasets() == []


def test_list_datasets_ids_are_valid(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    touch(ws.data_root / ".cache" / "f")
    touch(ws.data_root / "ns" / "ds" / "f")
    for ds in ws.list_datasets():
        check_dataset_id(ds.id)


# -- ownership -------------------------------------------------------------------------------------


def test_ownership_default_keeps_everything_outside_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # even if /tmp sits in a repo
    ws = make_ws(tmp_path)
    ds = ws.resolve("ns/ds", cwd=ws.root)
    touch(ds.path / "a.csv")
    keep = ws.ownership(ds)
    assert keep("a.csv")
    assert keep("deep/er/b.bin")
    assert keep(".hidden")


def test_ownership_missing_dataset_folder(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    keep = ws.ownership(ws.resolve("ns/none", cwd=ws.root))
    assert keep("anything")


def test_ownership_include_and_exclude_patterns(tmp_path: Path) -> None:
    ws = set_sync(
        make_ws(tmp_path),
        'include = ["*.csv", "*.bak", "raw/"]\nexclude = ["tmp/", "*.bak", "!keep.bak", "/top.csv"]',
    )
    keep = ws.ownership(ws.resolve("ns/ds", cwd=ws.root))
    assert keep("a.csv")
    assert keep("deep/b.csv")  # gitignore-style: a bare pattern matches at any depth
    assert keep("raw/image.png")
    assert not keep("notes.txt")
    assert not keep("tmp/a.csv")
    assert not keep("deep/tmp/a.csv")
    assert not keep("x.bak")
    assert keep("keep.bak")  # negation re-includes
    assert not keep("top.csv")  # anchored to the dataset root
    assert keep("sub/top.csv")


def test_ownership_empty_include_means_everything(tmp_path: Path) -> None:
    ws = set_sync(make_ws(tmp_path), "include = []")
    assert ws.ownership(ws.resolve("ns/ds", cwd=ws.root))("x/y")


def test_ownership_excludes_git_tracked_files(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    ds = ws.resolve("ns/ds", cwd=ws.root)
    touch(ds.path / "tracked.csv")
    touch(ds.path / "sub dir" / "été tracked.csv")
    touch(ds.path / "staged.csv")
    touch(ds.path / "untracked.csv")
    git(ws.root, "init", "-q")
    git(ws.root, "add", "data/ns/ds/tracked.csv", "data/ns/ds/sub dir/été tracked.csv")
    git(ws.root, "commit", "-q", "-m", "code")
    git(ws.root, "add", "data/ns/ds/staged.csv")
    keep = ws.ownership(ds)
    assert not keep("tracked.csv")
    assert not keep("sub dir/été tracked.csv")  # -z output: no quoting of unicode or spaces
    assert not keep("staged.csv")  # in the index counts as tracked
    assert keep("untracked.csv")

    ws2 = set_sync(ws, "exclude_git_tracked = false")
    keep2 = ws2.ownership(ds)
    assert keep2("tracked.csv")
    assert keep2("sub dir/été tracked.csv")
    assert keep2("untracked.csv")


def test_ownership_git_tracked_for_dataset_outside_workspace_repo(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    other = tmp_path / "repo"
    touch(other / "data" / "t.csv")
    touch(other / "data" / "u.csv")
    git(other, "init", "-q")
    git(other, "add", "data/t.csv")
    git(other, "commit", "-q", "-m", "x")
    keep = ws.ownership(ws.resolve(str(other / "data"), dataset_id="x/data", cwd=ws.root))
    assert not keep("t.csv")
    assert keep("u.csv")


def test_ownership_without_git_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_ws(tmp_path)
    ds = ws.resolve("ns/ds", cwd=ws.root)
    touch(ds.path / "a.csv")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert ws.ownership(ds)("a.csv")


# -- check_remote_name -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hpc", "r2", "a.b_c-d", "S3", "0"])
def test_check_remote_name_accepts(name: str) -> None:
    assert check_remote_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a/b", "a b", "é", "../x", "a:b", "a\\b"])
def test_check_remote_name_rejects(name: str) -> None:
    with pytest.raises(UsageError) as info:
        check_remote_name(name)
    assert info.value.exit_code == ExitCode.USAGE
    assert "hpc" in info.value.hint


def test_check_remote_name_rejects_trailing_newline() -> None:
    with pytest.raises(UsageError):
        check_remote_name("hpc\n")
