"""Unit tests for tether.config: layers, merging, typed settings and comment-preserving edits.

The autouse ``isolated_config`` fixture (conftest) points TETHER_CONFIG_DIR and
TETHER_SYSTEM_CONFIG at files below tmp_path that do not exist yet.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tether.config import (
    LOCAL_FILE,
    WORKSPACE_FILE,
    Layers,
    Settings,
    SyncRules,
    deep_merge,
    default_workspace_toml,
    edit_toml,
    is_secret,
    load_layers,
    read_toml,
    system_config_file,
    user_config_file,
    write_toml_atomic,
)
from tether.errors import ConfigError, ExitCode


def settings(raw: dict) -> Settings:
    return Settings.from_layers(Layers(raw))


# -- read_toml -----------------------------------------------------------------------------------


def test_read_toml_missing_file_is_empty_layer(tmp_path: Path) -> None:
    assert read_toml(tmp_path / "nope.toml") == {}


def test_read_toml_parses(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[tether]\ndata_root = "d"\n')
    assert read_toml(p) == {"tether": {"data_root": "d"}}


def test_read_toml_malformed_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[tether\ndata_root = \n")
    with pytest.raises(ConfigError) as info:
        read_toml(p)
    assert str(p) in info.value.message
    assert str(p) in info.value.hint
    assert info.value.exit_code == ExitCode.USAGE


def test_read_toml_unreadable_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret.toml"
    p.write_text("a = 1\n")

    def denied(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, where chmod 0 does not stop reads; fake the refusal instead.
    monkeypatch.setattr("tether.config.open", denied, raising=False)
    with pytest.raises(ConfigError, match="permission denied") as info:
        read_toml(p)
    assert str(p) in info.value.message


def test_read_toml_non_utf8_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        read_toml(p)


# -- deep_merge ----------------------------------------------------------------------------------


def test_deep_merge_tables_merge_values_replace() -> None:
    base = {"a": 1, "t": {"x": 1, "y": {"deep": 1, "keep": 2}}, "lst": [1, 2]}
    over = {"a": 2, "t": {"y": {"deep": 9}, "z": 3}, "lst": [3], "new": True}
    merged = deep_merge(base, over)
    assert merged == {
        "a": 2,
        "t": {"x": 1, "y": {"deep": 9, "keep": 2}, "z": 3},
        "lst": [3],  # lists replace, they do not concatenate
        "new": True,
    }


def test_deep_merge_does_not_mutate_inputs() -> None:
    base = {"t": {"x": 1}}
    over = {"t": {"y": 2}}
    deep_merge(base, over)
    assert base == {"t": {"x": 1}}
    assert over == {"t": {"y": 2}}


def test_deep_merge_value_replaces_table_and_table_replaces_value() -> None:
    assert deep_merge({"t": {"x": 1}}, {"t": 5}) == {"t": 5}
    assert deep_merge({"t": 5}, {"t": {"x": 1}}) == {"t": {"x": 1}}


# -- layers --------------------------------------------------------------------------------------


def test_layer_file_locations_follow_environment(tmp_path: Path) -> None:
    assert user_config_file() == tmp_path / "_user_config" / "config.toml"
    assert system_config_file() == tmp_path / "_no_system_config.toml"


def test_system_layer_defaults_to_etc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_SYSTEM_CONFIG")
    assert system_config_file() == Path("/etc/tether/config.toml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_load_layers_order_system_user_workspace_local(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    system = write(
        tmp_path / "_no_system_config.toml",
        'level = "system"\nsys_only = 1\n[t]\nsystem = 1\nshared = "system"\n',
    )
    user = write(
        tmp_path / "_user_config" / "config.toml", 'level = "user"\n[t]\nuser = 1\nshared = "user"\n'
    )
    workspace = write(root / WORKSPACE_FILE, 'level = "workspace"\n[t]\nws = 1\nshared = "workspace"\n')
    local = write(root / ".tether" / LOCAL_FILE, 'level = "local"\n[t]\nshared = "local"\n')

    layers = load_layers(root)
    assert layers.files == [system, user, workspace, local]
    assert layers.merged["level"] == "local"
    assert layers.merged["sys_only"] == 1
    assert layers.merged["t"] == {"system": 1, "user": 1, "ws": 1, "shared": "local"}

    local.unlink()
    assert load_layers(root).merged["t"]["shared"] == "workspace"
    workspace.unlink()
    assert load_layers(root).merged["t"]["shared"] == "user"
    user.unlink()
    assert load_layers(root).merged["t"]["shared"] == "system"


def test_load_layers_without_workspace_reads_system_and_user_only(tmp_path: Path) -> None:
    write(tmp_path / "_user_config" / "config.toml", "u = 1\n")
    layers = load_layers(None)
    assert len(layers.files) == 2
    assert layers.merged == {"u": 1}


def test_load_layers_all_missing_is_empty(tmp_path: Path) -> None:
    assert load_layers(tmp_path / "nowhere").merged == {}


def test_load_layers_malformed_layer_raises(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / ".tether" / LOCAL_FILE, "= nope\n")
    with pytest.raises(ConfigError, match=LOCAL_FILE):
        load_layers(root)


def test_remote_options_merge_across_layers_and_layer_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    ws_file = write(root / WORKSPACE_FILE, '[remotes.hpc]\nurl = "/mnt/hpc"\njobs = 4\n')
    local = write(root / ".tether" / LOCAL_FILE, '[remotes.hpc]\njobs = 16\nsecret_access_key = "s"\n')
    write(tmp_path / "_user_config" / "config.toml", '[remotes.mine]\nurl = "/home/me/store"\n')
    s = Settings.from_layers(load_layers(root))
    hpc = s.remotes["hpc"]
    assert hpc.url == "/mnt/hpc"
    assert hpc.options == {"jobs": 16, "secret_access_key": "s"}
    assert hpc.layer == str(local)  # the last layer that mentions it
    assert s.remotes["mine"].layer == str(tmp_path / "_user_config" / "config.toml")
    assert ws_file.exists()


# -- Settings --------------------------------------------------------------------------------------


def test_settings_defaults_from_empty_config() -> None:
    s = settings({})
    assert s.data_root == "data"
    assert s.sync == SyncRules(include=("**",), exclude=(), exclude_git_tracked=True)
    assert s.remotes == {}


def test_settings_from_default_workspace_toml() -> None:
    text = default_workspace_toml("datasets")
    assert text.startswith("#")  # the explanatory comment is kept
    s = settings(tomllib.loads(text))
    assert s.data_root == "datasets"
    assert s.sync.include == ("**",)
    assert s.sync.exclude == ()
    assert s.sync.exclude_git_tracked is True
    assert s.remotes == {}
    assert s.raw["tether"]["version"] == 1


def test_settings_reads_values() -> None:
    s = settings(
        {
            "tether": {"data_root": "d"},
            "sync": {"include": ["*.csv"], "exclude": ["tmp/"], "exclude_git_tracked": False},
            "remotes": {"r": {"url": "s3://b/p", "endpoint": "http://x"}},
        }
    )
    assert s.data_root == "d"
    assert s.sync == SyncRules(("*.csv",), ("tmp/",), False)
    assert s.remotes["r"].url == "s3://b/p"
    assert s.remotes["r"].options == {"endpoint": "http://x"}
    assert s.remotes["r"].name == "r"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({}, id="no-url"),
        pytest.param({"jobs": 4}, id="options-only"),
        pytest.param({"url": 5}, id="url-not-string"),
        pytest.param("/just/a/string", id="not-a-table"),
    ],
)
def test_remote_without_url_is_config_error(spec: object) -> None:
    with pytest.raises(ConfigError, match="'hpc' has no url") as info:
        settings({"remotes": {"hpc": spec}})
    assert "[remotes.hpc]" in info.value.hint


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"tether": "x"}, id="tether-not-table"),
        pytest.param({"tether": {"data_root": 3}}, id="data-root-int"),
        pytest.param({"tether": {"data_root": ""}}, id="data-root-empty"),
        pytest.param({"sync": 5}, id="sync-not-table"),
        pytest.param({"sync": {"include": 5}}, id="include-int"),
        pytest.param({"sync": {"exclude": 5}}, id="exclude-int"),
    ],
)
def test_bad_types_are_config_errors(raw: dict) -> None:
    with pytest.raises(ConfigError):
        settings(raw)


@pytest.mark.parametrize(
    "raw",
    [
        # include = "*.csv" becomes ("*", ".", "c", "s", "v"): "*" then includes everything.
        pytest.param({"sync": {"include": "*.csv"}}, id="include-string"),
        pytest.param({"sync": {"exclude": "tmp/"}}, id="exclude-string"),
        pytest.param({"sync": {"include": [1, 2]}}, id="include-ints"),
        # bool("false") is True: the string silently means the opposite.
        pytest.param({"sync": {"exclude_git_tracked": "false"}}, id="git-tracked-string"),
        # AttributeError: 'str' object has no attribute 'items'
        pytest.param({"remotes": "hpc"}, id="remotes-not-table"),
    ],
)
def test_bad_types_are_config_errors_known_gaps(raw: dict) -> None:
    with pytest.raises(ConfigError):
        settings(raw)


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    ["secret_access_key", "password", "SSH_PASSWORD", "token", "session_token", "access_key_id", "key_id"],
)
def test_is_secret(option: str) -> None:
    assert is_secret(option)


@pytest.mark.parametrize("option", ["url", "endpoint", "region", "jobs", "layout", "user", "port"])
def test_is_not_secret(option: str) -> None:
    assert not is_secret(option)


# -- editing ---------------------------------------------------------------------------------------


def test_edit_and_write_preserve_comments_and_layout(tmp_path: Path) -> None:
    p = tmp_path / WORKSPACE_FILE
    original = (
        "# team config: do not touch the data root\n"
        "[tether]\n"
        'data_root = "data"  # inline comment\n'
        "\n"
        "[remotes]\n"
        "# remotes go below\n"
    )
    p.write_text(original)
    doc = edit_toml(p)
    doc["remotes"]["hpc"] = {"url": "/mnt/hpc"}
    write_toml_atomic(p, doc)
    text = p.read_text()
    assert text.startswith(original)
    assert "# inline comment" in text
    assert tomllib.loads(text)["remotes"]["hpc"]["url"] == "/mnt/hpc"
    assert [f.name for f in tmp_path.iterdir()] == [WORKSPACE_FILE]  # no temporary file left


def test_edit_toml_missing_is_empty_document(tmp_path: Path) -> None:
    doc = edit_toml(tmp_path / "nope.toml")
    assert dict(doc) == {}


def test_edit_toml_malformed_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[x\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        edit_toml(p)


def test_write_toml_atomic_creates_parents(tmp_path: Path) -> None:
    p = tmp_path / "a" / "b" / LOCAL_FILE
    doc = edit_toml(p)
    doc["k"] = "v"
    write_toml_atomic(p, doc)
    assert read_toml(p) == {"k": "v"}
    assert sorted(f.name for f in p.parent.iterdir()) == [LOCAL_FILE]


@pytest.mark.parametrize("key", ["ssh_command", "python", "ssh_options", "ssh_config"])
def test_command_options_are_refused_in_the_committed_file(tmp_path: Path, key: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "tether.toml").write_text(f'[remotes.hpc]\nurl = "ssh://h/x"\n{key} = "evil"\n')
    with pytest.raises(ConfigError, match=key) as info:
        Settings.from_layers(load_layers(ws))
    assert "config.local.toml" in info.value.hint


def test_command_options_are_honoured_from_the_local_file(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / ".tether").mkdir(parents=True)
    (ws / "tether.toml").write_text('[remotes.hpc]\nurl = "ssh://h/x"\n')
    (ws / ".tether" / "config.local.toml").write_text('[remotes.hpc]\npython = "module load py; python3"\n')
    settings = Settings.from_layers(load_layers(ws))
    assert settings.remotes["hpc"].options["python"] == "module load py; python3"
