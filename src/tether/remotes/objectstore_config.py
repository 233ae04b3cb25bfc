"""Configuration of object-store remotes: options, credentials, and the obstore store.

Kept apart from the backend so the rules users meet first (where keys come from, which options
exist, what is refused) read in one place. Secrets only ever live in :class:`Credentials`, whose
repr hides them.
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import obstore
from obstore import exceptions as obx

from tether.errors import ConfigError, first_line
from tether.remotes import objectstore_multipart as mp

if TYPE_CHECKING:
    from tether.config import RemoteConfig
    from tether.remotes import ParsedURL

MiB = 1024 * 1024
DEFAULTS: dict[str, Any] = {
    "connections": 96,  # concurrent uploads of small files (see docs/object-stores.md)
    "download_connections": 192,  # concurrent downloads of small files
    "multipart_threshold": 32 * MiB,
    "part_size": 16 * MiB,
    "part_concurrency": 8,
    "memory_budget": 512 * MiB,  # bytes of file data held in memory by all transfers together
    "timeout": 60,
    "connect_timeout": 10,
    "max_retries": 4,
    "retry_timeout": 30,
}
TETHER_OPTIONS = {
    "endpoint",
    "region",
    "profile",
    "allow_http",
    "virtual_hosted_style",
    "storage_class",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "checksum",
    "conditional_writes",
    "state_dir",
    "layout",  # mirror or versioned: read by tether, not by the store
    *DEFAULTS,
}


# -- settings and credentials -------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """Where the keys came from (for messages) and the keys (never printed)."""

    source: str
    static: mp.StaticCredentials | None = None

    def __repr__(self) -> str:
        return f"Credentials(source={self.source!r})"


@dataclass(frozen=True)
class StoreSettings:
    """A validated object-store remote: location, connection, tuning, credentials."""

    scheme: str
    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    allow_http: bool
    virtual_hosted_style: bool
    storage_class: str | None
    credentials: Credentials
    checksum: bool
    conditional_writes: bool | None  # None: probe the store
    state_dir: Path | None
    connections: int
    download_connections: int
    multipart_threshold: int
    part_size: int
    part_concurrency: int
    memory_budget: int
    timeout: float
    connect_timeout: float
    max_retries: int
    retry_timeout: float
    extra: dict[str, Any] = field(default_factory=dict)  # passed to obstore as-is

    @property
    def where(self) -> str:
        """The endpoint as users know it, for messages."""
        if self.endpoint:
            return self.endpoint
        if self.scheme == "s3":
            return f"AWS S3 ({self.region})"
        return {"gs": "Google Cloud Storage", "az": "Azure Blob Storage"}.get(self.scheme, self.scheme)

    @property
    def s3_endpoint(self) -> str:
        return self.endpoint or f"https://s3.{self.region}.amazonaws.com"


def _bool(name: str, value: Any, remote: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"remote {remote!r}: option {name} must be true or false, not {value!r}")


def _size(name: str, value: Any, remote: str) -> int:
    """Sizes accept integers or strings like ``"16MiB"``/``"64M"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
        if m:
            scale = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB, "T": 1024 * 1024 * MiB}
            return int(m.group(1)) * scale[m.group(2).upper()]
    raise ConfigError(f"remote {remote!r}: option {name} must be a positive size (e.g. 16MiB), not {value!r}")


def _number(name: str, value: Any, remote: str) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"remote {remote!r}: option {name} must be a positive number, not {value!r}")


def aws_files() -> tuple[Path, Path]:
    """The shared credentials and config files, honouring the AWS CLI's environment overrides."""
    home = Path.home()
    creds = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or str(home / ".aws" / "credentials")
    conf = os.environ.get("AWS_CONFIG_FILE") or str(home / ".aws" / "config")
    return Path(creds).expanduser(), Path(conf).expanduser()


def read_profile(name: str) -> dict[str, str] | None:
    """Merge a profile from ~/.aws/credentials (``[name]``) and ~/.aws/config (``[profile name]``)."""
    creds_file, config_file = aws_files()
    found: dict[str, str] = {}
    hit = False
    for path, section in (
        (config_file, "default" if name == "default" else f"profile {name}"),
        (creds_file, name),
    ):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except configparser.Error as exc:
            raise ConfigError(f"cannot parse {path}: {first_line(exc)}") from None
        if parser.has_section(section):
            hit = True
            found.update({k.lower(): v.strip() for k, v in parser.items(section)})
    return found if hit else None


def resolve_credentials(options: dict[str, Any], remote: str) -> tuple[Credentials, dict[str, str]]:
    """Find S3 keys in the usual places, most specific first; return them and the profile used.

    Order: this remote's own options (``.tether/config.local.toml``), an explicit ``profile``,
    the environment, then ``AWS_PROFILE`` or the ``default`` profile. Nothing found: obstore's
    own chain (instance metadata, web identity, container credentials) gets its chance.
    """
    key = options.get("access_key_id")
    secret = options.get("secret_access_key")
    if key or secret:
        if not (key and secret):
            raise ConfigError(
                f"remote {remote!r} sets only one of access_key_id / secret_access_key",
                hint="Set both in .tether/config.local.toml (never in tether.toml).",
            )
        token = options.get("session_token")
        return Credentials("remote options", mp.StaticCredentials(str(key), str(secret), token)), {}
    explicit = options.get("profile")
    if explicit:
        profile = read_profile(str(explicit))
        if profile is None:
            creds_file, config_file = aws_files()
            raise ConfigError(
                f"remote {remote!r}: AWS profile {explicit!r} not found in {creds_file} or {config_file}",
                hint="Create it with `aws configure --profile NAME`, or fix the profile option.",
            )
        return _profile_credentials(str(explicit), profile, remote), profile
    env_key, env_secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    name = os.environ.get("AWS_PROFILE") or "default"
    profile = read_profile(name) or {}
    if env_key and env_secret:
        static = mp.StaticCredentials(env_key, env_secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        return Credentials("environment (AWS_ACCESS_KEY_ID)", static), profile
    if profile:
        return _profile_credentials(name, profile, remote), profile
    return Credentials(
        "the default AWS credential chain (no keys found in options, environment or profiles)"
    ), {}


def _profile_credentials(name: str, profile: dict[str, str], remote: str) -> Credentials:
    key, secret = profile.get("aws_access_key_id"), profile.get("aws_secret_access_key")
    if key and secret:
        static = mp.StaticCredentials(key, secret, profile.get("aws_session_token") or None)
        return Credentials(f"AWS profile {name!r}", static)
    indirect = [k for k in ("role_arn", "sso_session", "sso_start_url", "credential_process") if k in profile]
    if indirect:
        raise ConfigError(
            f"remote {remote!r}: AWS profile {name!r} uses {indirect[0]}, which tether cannot resolve itself",
            hint=f"Export temporary keys first: eval $(aws configure export-credentials --profile {name} "
            "--format env), then rerun.",
        )
    return Credentials(f"AWS profile {name!r} (no keys in it)")


def _is_loopback_or_private(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private


def build_settings(
    config: RemoteConfig, parsed: ParsedURL, *, state_dir: Path | None = None
) -> StoreSettings:
    """Validate a remote's options into settings; errors name the option and the remote."""
    opts = dict(config.options)
    name = config.name
    scheme = parsed.scheme
    if parsed.port is not None or parsed.user is not None:
        raise ConfigError(
            f"remote {name!r}: {scheme}:// URLs take no user or port ({config.url})",
            hint="Put the server in the endpoint option: --set endpoint=http://host:9000",
        )
    bucket = parsed.host or ""
    prefix = parsed.path.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"remote {name!r}: prefix {prefix!r} has an empty, '.' or '..' part")
    extra = {k: v for k, v in opts.items() if k not in TETHER_OPTIONS}
    tuning = {k: opts.get(k, v) for k, v in DEFAULTS.items()}
    credentials = Credentials("the store's own configuration (options or environment)")
    profile: dict[str, str] = {}
    region = str(opts.get("region") or "")
    endpoint = opts.get("endpoint")
    if scheme == "s3":
        credentials, profile = resolve_credentials(opts, name)
        endpoint = (
            endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or profile.get("endpoint_url")
        )
        region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or profile.get("region")
            or ("auto" if endpoint and "r2.cloudflarestorage.com" in str(endpoint) else "us-east-1")
        )
    allow_http = _bool("allow_http", opts.get("allow_http", False), name)
    if endpoint:
        endpoint = str(endpoint).rstrip("/")
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"remote {name!r}: endpoint {endpoint!r} is not an http(s) URL",
                hint="For example https://<account>.r2.cloudflarestorage.com or http://127.0.0.1:9000",
            )
        if parts.scheme == "http" and not allow_http:
            where = (
                "a loopback/private address" if _is_loopback_or_private(parts.hostname) else "a public host"
            )
            raise ConfigError(
                f"remote {name!r}: endpoint {endpoint} is plain http ({where}) and allow_http is not set",
                hint=f"If that is intended (a local or private MinIO), add allow_http = true to "
                f"[remotes.{name}] in tether.toml.",
            )
    if scheme == "s3" and credentials.static is None and endpoint and not extra.get("skip_signature"):
        # obstore's fallback chain would ask the EC2 metadata service, which only exists on AWS.
        raise ConfigError(
            f"remote {name!r}: no S3 credentials found for {endpoint}",
            hint="Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile (profile option or "
            "AWS_PROFILE), or access_key_id/secret_access_key in .tether/config.local.toml.",
        )
    checksum = opts.get("checksum", "sha256")
    if checksum not in ("sha256", "off", True, False):
        raise ConfigError(f"remote {name!r}: checksum must be 'sha256' or 'off', not {checksum!r}")
    conditional = opts.get("conditional_writes", "auto")
    cond = None if conditional == "auto" else _bool("conditional_writes", conditional, name)
    state = opts.get("state_dir")
    return StoreSettings(
        scheme=scheme,
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint or None,
        region=region,
        allow_http=allow_http,
        virtual_hosted_style=_bool("virtual_hosted_style", opts.get("virtual_hosted_style", False), name),
        storage_class=opts.get("storage_class"),
        credentials=credentials,
        checksum=checksum in ("sha256", True),
        conditional_writes=cond,
        state_dir=Path(state).expanduser() if state else state_dir,
        connections=int(_number("connections", tuning["connections"], name)),
        download_connections=int(_number("download_connections", tuning["download_connections"], name)),
        multipart_threshold=max(
            mp.MIN_PART, _size("multipart_threshold", tuning["multipart_threshold"], name)
        ),
        part_size=max(mp.MIN_PART, _size("part_size", tuning["part_size"], name)),
        part_concurrency=int(_number("part_concurrency", tuning["part_concurrency"], name)),
        memory_budget=_size("memory_budget", tuning["memory_budget"], name),
        timeout=_number("timeout", tuning["timeout"], name),
        connect_timeout=_number("connect_timeout", tuning["connect_timeout"], name),
        max_retries=int(_number("max_retries", tuning["max_retries"], name)),
        retry_timeout=_number("retry_timeout", tuning["retry_timeout"], name),
        extra=extra,
    )


# -- obstore construction -----------------------------------------------------------------------
def _client_options(s: StoreSettings) -> dict[str, Any]:
    return {
        "allow_http": s.allow_http,
        "timeout": f"{int(s.timeout)}s",
        "connect_timeout": f"{int(s.connect_timeout)}s",
        "pool_max_idle_per_host": str(max(s.connections, s.download_connections, 16)),
        "user_agent": "tether",
    }


def _retry_config(s: StoreSettings) -> dict[str, Any]:
    return {
        "max_retries": s.max_retries,
        "retry_timeout": timedelta(seconds=s.retry_timeout),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }


def make_store(s: StoreSettings, *, checksum: bool = False) -> Any:
    """An obstore store for the bucket (no prefix: tether builds keys itself)."""
    try:
        if s.scheme == "s3":
            config: dict[str, Any] = {
                "region": s.region,
                "virtual_hosted_style_request": s.virtual_hosted_style,
            }
            if s.endpoint:
                config["endpoint"] = s.endpoint
            if checksum:
                config["checksum_algorithm"] = "sha256"
            config.update(s.extra)
            provider = None
            if s.credentials.static is not None:
                static = s.credentials.static

                def provider() -> dict[str, Any]:  # a provider, so stray AWS_* env never mixes in
                    return {
                        "access_key_id": static.access_key_id,
                        "secret_access_key": static.secret_access_key,
                        "token": static.session_token,
                        "expires_at": None,
                    }

            return obstore.store.S3Store(
                s.bucket,
                config=config,
                client_options=_client_options(s),
                retry_config=_retry_config(s),
                credential_provider=provider,
            )
        if s.scheme == "gs":
            return obstore.store.GCSStore(
                s.bucket, config=s.extra, client_options=_client_options(s), retry_config=_retry_config(s)
            )
        return obstore.store.AzureStore(
            s.bucket, config=s.extra, client_options=_client_options(s), retry_config=_retry_config(s)
        )
    except obx.UnknownConfigurationKeyError as exc:
        bad = re.search(r"key: '([^']+)'", str(exc))
        known = ", ".join(sorted(TETHER_OPTIONS))
        raise ConfigError(
            f"unknown option {bad.group(1) if bad else '?'!r} for a {s.scheme}:// remote",
            hint=f"tether's options: {known}; other keys go to obstore's {s.scheme} configuration.",
        ) from None
    except (obx.BaseError, ValueError) as exc:
        raise ConfigError(f"cannot configure the {s.scheme}:// store: {first_line(exc)}") from None
