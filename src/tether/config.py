"""Layered configuration: system < user < workspace ``tether.toml`` < ``.tether/config.local.toml``.

Later layers win key by key (tables merge, values replace). The workspace file is committed and
shared by the team; the local file is for personal overrides and secrets and is never committed.
Writes go through tomlkit so a user's comments and layout in ``tether.toml`` survive
``tether remote add``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs

from tether.errors import ConfigError
from tether.fileio import write_bytes_atomic

if TYPE_CHECKING:
    import tomlkit

WORKSPACE_FILE = "tether.toml"
LOCAL_FILE = "config.local.toml"
SYSTEM_FILE = Path("/etc/tether/config.toml")
CONFIG_VERSION = 1


def user_config_file() -> Path:
    override = os.environ.get("TETHER_CONFIG_DIR")
    base = Path(override) if override else Path(platformdirs.user_config_dir("tether"))
    return base / "config.toml"


def system_config_file() -> Path:
    override = os.environ.get("TETHER_SYSTEM_CONFIG")
    return Path(override) if override else SYSTEM_FILE


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one layer; a missing file is an empty layer, a malformed one a clear error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", hint=f"Fix the syntax in {path}.") from None
    except PermissionError:
        raise ConfigError(f"cannot read {path}: permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text", hint=f"Save {path} as UTF-8.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file") from None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Layers:
    """The merged view plus where each layer came from (for `remote show` and errors)."""

    merged: dict[str, Any]
    files: list[Path] = field(default_factory=list)


def load_layers(workspace_root: Path | None) -> Layers:
    files = [system_config_file(), user_config_file()]
    if workspace_root is not None:
        files += [workspace_root / WORKSPACE_FILE, workspace_root / ".tether" / LOCAL_FILE]
    merged: dict[str, Any] = {}
    for path in files:
        merged = deep_merge(merged, read_toml(path))
    return Layers(merged, files)


@dataclass(frozen=True)
class SyncRules:
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()
    exclude_git_tracked: bool = True


@dataclass(frozen=True)
class RemoteConfig:
    name: str
    url: str
    options: dict[str, Any]
    layer: str  # which file defined it (for `remote show`)

    @property
    def layout(self) -> str:
        """``mirror`` (files at their own paths) or ``versioned`` (content-addressed snapshots)."""
        return str(self.options.get("layout", "mirror"))


SECRET_WORDS = (
    "secret",
    "password",
    "passphrase",
    "token",
    "key_id",
    "access_key",
    "api_key",
    "private_key",
    "credential",
)


def is_secret(option: str) -> bool:
    lowered = option.lower()
    return any(word in lowered for word in SECRET_WORDS)


@dataclass
class Settings:
    """Typed view of the merged configuration that the rest of tether reads."""

    data_root: str
    sync: SyncRules
    remotes: dict[str, RemoteConfig]
    raw: dict[str, Any]

    @classmethod
    def from_layers(cls, layers: Layers) -> Settings:
        raw = layers.merged
        core = raw.get("tether", {})
        if not isinstance(core, Mapping):
            raise ConfigError("[tether] must be a table")
        data_root = core.get("data_root", "data")
        if not isinstance(data_root, str) or not data_root:
            raise ConfigError("[tether] data_root must be a non-empty string")
        version = core.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(
                f"tether.toml has config version {version!r}; this tether understands {CONFIG_VERSION}",
                hint="Upgrade tether (pip install -U tether-data).",
            )
        sync_raw = raw.get("sync", {})
        if not isinstance(sync_raw, Mapping):
            raise ConfigError("[sync] must be a table")
        git_tracked = sync_raw.get("exclude_git_tracked", True)
        if not isinstance(git_tracked, bool):
            raise ConfigError(
                f"[sync] exclude_git_tracked must be true or false, not {git_tracked!r}",
                hint="Write it without quotes: exclude_git_tracked = false",
            )
        sync = SyncRules(
            include=_glob_list(sync_raw, "include", ["**"]),
            exclude=_glob_list(sync_raw, "exclude", []),
            exclude_git_tracked=git_tracked,
        )
        remotes_raw = raw.get("remotes", {})
        if not isinstance(remotes_raw, Mapping):
            raise ConfigError("[remotes] must be a table of [remotes.NAME] tables")
        _refuse_committed_commands(layers.files)
        remotes: dict[str, RemoteConfig] = {}
        for name, spec in remotes_raw.items():
            if not isinstance(spec, Mapping) or not isinstance(spec.get("url"), str):
                raise ConfigError(
                    f"remote {name!r} has no url",
                    hint=f'Give it one: [remotes.{name}] url = "/path/or/ssh://host/path"',
                )
            options = {k: v for k, v in spec.items() if k != "url"}
            if options.get("layout", "mirror") not in LAYOUTS:
                raise ConfigError(
                    f"remote {name!r} has layout {options['layout']!r}",
                    hint=f'Use one of: {", ".join(LAYOUTS)} (e.g. layout = "versioned").',
                )
            layer = _defining_layer(layers.files, name)
            remotes[name] = RemoteConfig(name, spec["url"], options, layer)
        return cls(data_root, sync, remotes, raw)


LAYOUTS = ("mirror", "versioned")

# Options that decide which programs run (locally, or on the cluster under your account).
COMMAND_OPTIONS = ("ssh_command", "python", "ssh_options", "ssh_config")


def _refuse_committed_commands(files: list[Path]) -> None:
    """A committed tether.toml reaches everyone who clones the project; `tether diff` must not
    run a command a stranger wrote there. Such options belong to the user's own layers."""
    for path in files:
        if path.name != WORKSPACE_FILE:
            continue
        remotes = read_toml(path).get("remotes", {})
        for name, spec in remotes.items() if isinstance(remotes, Mapping) else ():
            found = [k for k in COMMAND_OPTIONS if isinstance(spec, Mapping) and k in spec]
            if found:
                raise ConfigError(
                    f"remote {name!r} sets {', '.join(found)} in {path}, which is committed and shared: "
                    "tether does not run commands from it",
                    hint=f"Move those keys to .tether/config.local.toml under [remotes.{name}] (or to "
                    "your user config), where only you decide what runs.",
                )


def _glob_list(table: Mapping[str, Any], key: str, default: list[str]) -> tuple[str, ...]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"[sync] {key} must be a list of glob strings, not {value!r}",
            hint=f'Write it as a list: {key} = ["*.csv"]',
        )
    return tuple(value)


def _defining_layer(files: list[Path], remote: str) -> str:
    found = "?"
    for path in files:
        if remote in read_toml(path).get("remotes", {}):
            found = str(path)
    return found


def default_workspace_toml(data_root: str) -> str:
    import tomlkit  # here and below: only commands that write TOML pay its 5 ms of import

    doc = tomlkit.document()
    doc.add(tomlkit.comment("tether workspace: git owns code, tether owns data."))
    core = tomlkit.table()
    core["version"] = CONFIG_VERSION
    core["data_root"] = data_root
    doc["tether"] = core
    sync = tomlkit.table()
    sync["include"] = ["**"]
    sync["exclude"] = []
    sync["exclude_git_tracked"] = True
    doc["sync"] = sync
    doc["remotes"] = tomlkit.table()
    return tomlkit.dumps(doc)


def edit_toml(path: Path) -> tomlkit.TOMLDocument:
    import tomlkit

    try:
        return tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def write_toml_atomic(path: Path, doc: tomlkit.TOMLDocument) -> None:
    import tomlkit

    write_bytes_atomic(path, tomlkit.dumps(doc).encode())
