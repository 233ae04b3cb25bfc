"""Validation of paths that come from elsewhere (remote listings, manifests, ids).

Invariant 5: a path from a listing or manifest is untrusted. It must be relative, use forward
slashes, have no empty, ``.`` or ``..`` part, no NUL or backslash, and must not point into
tether's own ``.tether/`` state. Everything is checked before any I/O uses the path.
"""

from __future__ import annotations

import re

from tether.errors import InvalidPath

STATE_DIR = ".tether"
TEMP_MARKER = ".tether-tmp-"
_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_relpath(path: str, *, what: str = "path") -> str:
    """Return ``path`` unchanged if it is a safe relative POSIX path, else raise InvalidPath."""
    if not isinstance(path, str) or not path:
        raise InvalidPath(f"empty {what} refused")
    if "\x00" in path:
        raise InvalidPath(f"{what} {path!r} contains a NUL byte; refused")
    if "\\" in path:
        raise InvalidPath(f"{what} {path!r} contains a backslash; refused")
    if path.startswith("/"):
        raise InvalidPath(f"{what} {path!r} is absolute; refused")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPath(f"{what} {path!r} has an empty, '.' or '..' part; refused")
    if parts[0] == STATE_DIR or parts[0] == ".git":
        raise InvalidPath(f"{what} {path!r} points into {parts[0]}/; refused")
    return path


def check_dataset_id(dataset_id: str) -> str:
    """Ids are `namespace/name` (or `name`); each part a portable file name."""
    if not dataset_id or dataset_id.strip() != dataset_id:
        raise InvalidPath(
            f"dataset id {dataset_id!r} is empty or has surrounding spaces",
            hint="Use an id like `namespace/name`.",
        )
    hint = "Ids look like `namespace/name`: letters, digits, '.', '_', '+' or '-', no '..'."
    try:
        check_relpath(dataset_id, what="dataset id")
    except InvalidPath as exc:
        raise InvalidPath(exc.message, hint=hint) from None
    for part in dataset_id.split("/"):
        if not _ID_PART.fullmatch(part):
            raise InvalidPath(f"dataset id {dataset_id!r}: part {part!r} is not allowed", hint=hint)
    return dataset_id


def sort_key(path: str) -> tuple[str, ...]:
    """Manifest order: component by component, so a directory walk yields entries in order.

    Plain string order would put ``a.b`` before ``a/b`` while a depth-first walk yields ``a/b``
    first; comparing component tuples makes both agree.
    """
    return tuple(path.split("/"))


def is_temp_name(name: str) -> bool:
    """Temporary names tether writes before a rename; never listed as data."""
    return TEMP_MARKER in name and TEMP_MARKER in name.rsplit("/", 1)[-1]


def unsyncable_name_reason(path: str) -> str | None:
    """Why a local file name cannot travel in a manifest (checked at scan time, before upload)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if "\\" in path:
        return "its name contains a backslash"
    return None
