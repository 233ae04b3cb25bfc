"""`tether remote import-rclone REMOTE[:PATH]`: reuse a remote from rclone.conf.

Teams that sync with rclone scripts already have their endpoints and keys in ``rclone.conf``;
this turns one of its sections into a tether remote in one command. What is shared (URL,
endpoint, region, storage class) goes to the committed ``tether.toml``; keys go to the
never-committed ``.tether/config.local.toml``, and nothing secret is ever printed.

rclone names a place as ``remote:path`` (``r2:bucket/prefix``, ``hpc:/scratch/data``); the
rclone section does not say which bucket or folder, so the path comes from the argument.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.config import LOCAL_FILE, WORKSPACE_FILE, edit_toml, write_toml_atomic
from tether.errors import ConfigError, UsageError, first_line
from tether.workspace import Workspace, check_remote_name

SUPPORTED_TYPES = ("s3", "sftp")
S3_SHARED = ("endpoint", "region", "storage_class")
S3_SECRET = {
    "access_key_id": "access_key_id",
    "secret_access_key": "secret_access_key",
    "session_token": "session_token",
}


@dataclass
class Imported:
    """A tether remote made from an rclone section: shared options, secrets, and notes."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def default_config_path() -> Path:
    """Where rclone looks: $RCLONE_CONFIG, else ~/.config/rclone/rclone.conf (XDG), else ~/.rclone.conf."""
    env = os.environ.get("RCLONE_CONFIG")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    path = base / "rclone" / "rclone.conf"
    legacy = Path.home() / ".rclone.conf"
    return legacy if not path.exists() and legacy.exists() else path


def read_section(name: str, config: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(config, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"rclone config {config} not found",
            hint="Pass --config PATH (see `rclone config file`), or set RCLONE_CONFIG.",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {config}: {exc.strerror}") from None
    if text.startswith("RCLONE_ENCRYPT_V0:"):
        raise ConfigError(
            f"{config} is encrypted",
            hint="Decrypt it with `rclone config encryption remove` first, or copy the section by hand.",
        )
    try:
        parser.read_string(text, source=str(config))
    except configparser.Error as exc:
        raise ConfigError(f"cannot parse {config}: {first_line(exc)}") from None
    if not parser.has_section(name):
        known = ", ".join(parser.sections()) or "none"
        raise UsageError(f"no remote {name!r} in {config} (it has: {known})")
    return {k.lower(): v.strip() for k, v in parser.items(name)}


def split_spec(spec: str) -> tuple[str, str]:
    """``r2:bucket/prefix`` -> ("r2", "bucket/prefix"); a plain ``r2`` has no path."""
    name, _, path = spec.partition(":")
    return name, path


def convert(spec: str, config: Path) -> Imported:
    """Map one rclone remote (plus the path from ``spec``) onto a tether remote."""
    name, path = split_spec(spec)
    check_remote_name(name)
    section = read_section(name, config)
    kind = section.get("type", "")
    if kind == "s3":
        return _from_s3(name, path, section)
    if kind == "sftp":
        return _from_sftp(name, path, section)
    raise UsageError(
        f"rclone remote {name!r} has type {kind or '(none)'!r}, which tether cannot import",
        hint=f"Supported rclone types: {', '.join(SUPPORTED_TYPES)}. Add others with `tether remote add`.",
    )


def _from_s3(name: str, path: str, section: dict[str, str]) -> Imported:
    path = path.strip("/")
    if not path:
        raise UsageError(
            f"say which bucket (and prefix) of rclone remote {name!r} to use",
            hint=f"For example: tether remote import-rclone {name}:my-bucket/datasets",
        )
    imported = Imported(name, f"s3://{path}")
    provider = section.get("provider", "AWS")
    for key in S3_SHARED:
        if section.get(key):
            imported.options[key] = section[key]
    endpoint = imported.options.get("endpoint")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"  # rclone accepts a bare host name
        imported.options["endpoint"] = endpoint
    if endpoint and endpoint.startswith("http://"):
        imported.options["allow_http"] = True
    if provider == "Cloudflare" and "region" not in imported.options:
        imported.options["region"] = "auto"
    if section.get("force_path_style", "true").lower() == "false":
        imported.options["virtual_hosted_style"] = True
    env_auth = section.get("env_auth", "false").lower() == "true"
    for rclone_key, tether_key in S3_SECRET.items():
        if section.get(rclone_key):
            imported.secrets[tether_key] = section[rclone_key]
    if env_auth and not imported.secrets:
        imported.notes.append("env_auth: credentials come from the environment or ~/.aws, as with rclone")
    elif not imported.secrets:
        imported.notes.append(
            "no keys in the rclone section: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    if provider not in ("AWS", "Cloudflare", "Minio"):
        imported.notes.append(f"provider {provider!r} is imported as a generic S3-compatible store")
    return imported


def _from_sftp(name: str, path: str, section: dict[str, str]) -> Imported:
    host = section.get("host")
    if not host:
        raise ConfigError(f"rclone remote {name!r} (sftp) has no host")
    if not path.startswith("/") or path.strip("/") == "":
        raise UsageError(
            f"give an absolute folder on {host} for rclone remote {name!r}",
            hint=f"For example: tether remote import-rclone {name}:/scratch/$USER/data",
        )
    user = section.get("user")
    port = section.get("port")
    netloc = f"{user}@{host}" if user else host
    if port and port != "22":
        netloc += f":{port}"
    imported = Imported(name, f"ssh://{netloc}{path.rstrip('/')}")
    key_file = section.get("key_file")
    if key_file:
        imported.options["identity_file"] = key_file
    if section.get("pass") or section.get("key_pem") or section.get("key_file_pass"):
        imported.notes.append(
            "password/inline key not imported: tether uses ssh keys and your agent (~/.ssh/config works)"
        )
    return imported


def import_into(ws: Workspace, spec: str, config: Path | None = None) -> tuple[Imported, Path, Path | None]:
    """Write the imported remote: shared options to tether.toml, secrets to config.local.toml.

    Returns the remote and the files written (the local file only when there were secrets).
    """
    imported = convert(spec, (config or default_config_path()).expanduser())
    existing = ws.settings.remotes.get(imported.name)
    if existing is not None:
        raise UsageError(
            f"remote {imported.name!r} already exists ({existing.url}, in {existing.layer})",
            hint=f"Remove it first with `tether remote remove {imported.name}`.",
        )
    shared_path = ws.root / WORKSPACE_FILE
    doc = edit_toml(shared_path)
    doc.setdefault("remotes", {})[imported.name] = {"url": imported.url, **imported.options}
    write_toml_atomic(shared_path, doc)  # first: a local table without a url would be an error
    local_path: Path | None = None
    if imported.secrets:
        local_path = ws.state_dir / LOCAL_FILE
        local = edit_toml(local_path)
        local.setdefault("remotes", {})[imported.name] = dict(imported.secrets)
        write_toml_atomic(local_path, local)
        os.chmod(local_path, 0o600)
    return imported, shared_path, local_path
