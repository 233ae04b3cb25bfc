"""Remote URLs and the one place that turns a configured remote into a backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tether.config import RemoteConfig
from tether.errors import ConfigError, UsageError
from tether.remotes.base import Capabilities, ErrorKind, Remote, RemoteStat
from tether.remotes.local import LocalRemote

__all__ = [
    "Capabilities",
    "ErrorKind",
    "LocalRemote",
    "ParsedURL",
    "Remote",
    "RemoteStat",
    "open_remote",
    "parse_url",
]

KNOWN_SCHEMES = {"file", "ssh", "s3", "gs", "az"}
AVAILABLE_SCHEMES = {"file", "ssh", "s3", "gs", "az"}


@dataclass(frozen=True)
class ParsedURL:
    scheme: str
    host: str | None
    path: str
    user: str | None = None
    port: int | None = None


def parse_url(url: str, *, base_dir: Path | None = None) -> ParsedURL:
    """Parse a remote URL; plain paths (absolute, relative, ``~``) are local remotes."""
    if not url or not url.strip():
        raise UsageError("remote URL is empty", hint="Give a path, file://, ssh:// or s3:// URL.")
    if "://" not in url:
        if ":" in url.split("/", 1)[0] and not url.startswith(("/", ".", "~")):
            # scp-like host:path shorthand
            host, _, path = url.partition(":")
            user, _, hostname = host.rpartition("@")
            if not hostname or not path:
                raise UsageError(f"remote URL {url!r} needs a host and a path (host:path)")
            return ParsedURL("ssh", hostname, path, user or None)
        path = Path(url).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return ParsedURL("file", None, str(path))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in KNOWN_SCHEMES:
        raise UsageError(
            f"unknown URL scheme {scheme!r} in {url!r}",
            hint="Use a path, file:///abs/path, ssh://user@host/path or s3://bucket/prefix.",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file URL {url!r} names a host; use file:///absolute/path")
        return ParsedURL("file", None, unquote(parts.path) or "/")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"remote URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise UsageError(f"remote URL {url!r} has no host or bucket")
    if parts.password is not None:
        raise UsageError(
            f"remote URL for {parts.hostname!r} contains a password",
            hint="Never put secrets in URLs (they end up in tether.toml and shell history); "
            "use keys, an agent, or .tether/config.local.toml.",
        )
    if scheme == "ssh" and parts.path in ("", "/"):
        raise UsageError(f"ssh URL {url!r} needs an absolute base path, e.g. ssh://host/scratch/data")
    return ParsedURL(scheme, parts.hostname, unquote(parts.path), parts.username, port)


def open_remote(config: RemoteConfig, *, workspace_root: Path | None = None) -> Remote:
    if "layout" in config.options:  # tether's own option (mirror/versioned), not the backend's
        config = dataclasses.replace(
            config, options={k: v for k, v in config.options.items() if k != "layout"}
        )
    parsed = parse_url(config.url, base_dir=workspace_root)
    if parsed.scheme == "file":
        return LocalRemote(config.url, Path(parsed.path))
    if parsed.scheme == "ssh":
        from tether.remotes.ssh import open_ssh_remote  # imported on use: local runs never pay for it

        return open_ssh_remote(config, parsed, base_dir=workspace_root)
    if parsed.scheme in ("s3", "gs", "az"):
        from tether.remotes.objectstore import open_objectstore_remote  # imported on use, like ssh

        return open_objectstore_remote(config, parsed, workspace_root=workspace_root)
    if parsed.scheme in KNOWN_SCHEMES - AVAILABLE_SCHEMES:
        raise ConfigError(
            f"remote {config.name!r} uses {parsed.scheme}://, which this version of tether cannot open yet",
            hint="Local/NFS paths and SSH remotes work today; object-store remotes are on the way.",
        )
    raise ConfigError(f"remote {config.name!r}: unsupported URL {config.url!r}")  # pragma: no cover
