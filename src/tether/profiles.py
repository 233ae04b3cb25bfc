"""Dataset profiles: what a dataset is made of, declared in ``tether.toml``.

A research dataset is a primary table, sidecar folders derived from it and an append-only
event log; syncing it as a bag of files loses the rules that keep those parts consistent. The
shape users and scripts rely on (extend, never rename)::

    [profiles.usr]
    primary = "records.parquet"
    sidecars = ["_derived", "_auxiliary", "_snapshots"]
    append_only = [".events.log"]          # or [{ path = ".events.log", format = "jsonl" }]
    exclude = ["*.tmp"]

    [datasets]
    "densegen/*" = "usr"                   # glob over dataset ids -> profile name
    "densegen/special" = { primary = "table.parquet" }   # or a profile inline

An exact id wins over globs; among globs the longest (most specific) pattern wins.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tether.errors import ConfigError
from tether.paths import check_relpath

LEDGER_FORMATS = ("bytes", "jsonl")


@dataclass(frozen=True)
class Ledger:
    """An append-only file: it may only grow, and both sides must agree on its common prefix."""

    path: str
    format: str = "bytes"  # "jsonl": every line one complete JSON object


@dataclass(frozen=True)
class DatasetProfile:
    name: str | None = None  # None: no profile applies (a plain bag of files)
    primary: str | None = None
    sidecars: tuple[str, ...] = ()
    append_only: tuple[Ledger, ...] = ()
    exclude: tuple[str, ...] = ()

    def sidecar_of(self, path: str) -> str | None:
        """The declared sidecar folder holding ``path``, if any."""
        for sidecar in self.sidecars:
            if path.startswith(f"{sidecar}/"):
                return sidecar
        return None

    def ledger(self, path: str) -> Ledger | None:
        for ledger in self.append_only:
            if ledger.path == path:
                return ledger
        return None

    def part_of(self, path: str) -> str:
        """The audit's name for the part a file belongs to."""
        if path == self.primary:
            return "primary"
        if self.ledger(path) is not None:
            return f"ledger:{path}"
        sidecar = self.sidecar_of(path)
        if sidecar is not None:
            return f"sidecar:{sidecar}"
        return "other"


NO_PROFILE = DatasetProfile()


def profile_for(raw: Mapping[str, Any], dataset_id: str) -> DatasetProfile:
    """The profile that applies to ``dataset_id`` under the merged configuration ``raw``."""
    datasets = raw.get("datasets", {})
    if not isinstance(datasets, Mapping):
        raise ConfigError('[datasets] must be a table of "id or glob" = "profile name"')
    profiles = raw.get("profiles", {})
    if not isinstance(profiles, Mapping):
        raise ConfigError("[profiles] must be a table of [profiles.NAME] tables")
    for name in profiles:  # a typo in an unused profile is still a typo: report it now
        _parse(profiles[name], f"[profiles.{name}]", name)
    pattern = _best_match(datasets, dataset_id)
    if pattern is None:
        return NO_PROFILE
    spec = datasets[pattern]
    where = f'[datasets] "{pattern}"'
    if isinstance(spec, str):
        if spec not in profiles:
            known = ", ".join(sorted(profiles)) or "none defined"
            raise ConfigError(
                f"{where} names profile {spec!r}, which is not defined (profiles: {known})",
                hint=f"Add a [profiles.{spec}] table to tether.toml, or fix the name.",
            )
        return _parse(profiles[spec], f"[profiles.{spec}]", spec)
    if isinstance(spec, Mapping):
        return _parse(spec, where, pattern)
    raise ConfigError(f"{where} must be a profile name or an inline table, not {spec!r}")


def _best_match(datasets: Mapping[str, Any], dataset_id: str) -> str | None:
    if dataset_id in datasets:
        return dataset_id
    globs = [p for p in datasets if fnmatch.fnmatchcase(dataset_id, p)]
    return max(globs, key=len) if globs else None


KNOWN_KEYS = {"primary", "sidecars", "append_only", "exclude"}


def _parse(spec: Any, where: str, name: str) -> DatasetProfile:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(unknown)}",
            hint=f"Known keys: {', '.join(sorted(KNOWN_KEYS))}.",
        )
    primary = spec.get("primary")
    if primary is not None:
        primary = _relpath(primary, f"{where} primary")
    sidecars = tuple(_relpath(s, f"{where} sidecars").rstrip("/") for s in _list(spec, "sidecars", where))
    ledgers = tuple(_ledger(item, where) for item in _list(spec, "append_only", where))
    exclude = _list(spec, "exclude", where)
    if not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"{where} exclude must be a list of glob strings")
    for ledger in ledgers:
        if ledger.path == primary:
            raise ConfigError(f"{where}: {ledger.path!r} cannot be both the primary and append-only")
    return DatasetProfile(name, primary, sidecars, ledgers, tuple(exclude))


def _list(spec: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where} {key} must be a list, not {value!r}")
    return value


def _relpath(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {value!r}")
    try:
        return check_relpath(value.rstrip("/"), what=what)
    except Exception as exc:
        raise ConfigError(f"{what} {value!r} is not a relative path inside the dataset") from exc


def _ledger(item: Any, where: str) -> Ledger:
    if isinstance(item, str):
        return Ledger(_relpath(item, f"{where} append_only"))
    if isinstance(item, Mapping) and isinstance(item.get("path"), str):
        fmt = item.get("format", "bytes")
        if fmt not in LEDGER_FORMATS:
            raise ConfigError(
                f"{where} append_only {item['path']!r} has format {fmt!r}",
                hint=f"Use one of: {', '.join(LEDGER_FORMATS)}.",
            )
        return Ledger(_relpath(item["path"], f"{where} append_only"), fmt)
    raise ConfigError(
        f"{where} append_only entries must be paths or {{ path = ..., format = ... }}, not {item!r}"
    )
