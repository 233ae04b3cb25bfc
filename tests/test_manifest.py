"""Unit tests for tether.manifest: entries, ordering, and the gzip JSON-lines on-disk form."""

from __future__ import annotations

import gzip
import json

import pytest

from tether.errors import InvalidPath, TetherError
from tether.manifest import (
    DEFAULT_ALGORITHM,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    Entry,
    Manifest,
    ManifestFormatError,
)
from tether.paths import sort_key
from tether.remotes.base import RemoteStat
from tether.sync import _same_version

D1 = "a" * 64
D2 = "b" * 64


def sample() -> Manifest:
    return Manifest.from_entries(
        [
            Entry("z.bin", 3, 1_700_000_000_000_000_000, D1),
            Entry("données/été.csv", 10, 2, D2),
            Entry("empty", 0, 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            Entry("big/file.parquet", 5 * 2**40, 3, D1),
            Entry("a.b", 1, 4, D2),
            Entry("a/b", 1, 5, D1),
            Entry('quote\'s "x" -n', 1, 6, D2),
        ]
    )


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines()]


def raw_manifest(*lines: object, header: dict | None = None) -> bytes:
    head = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "algorithm": "sha256",
        "count": len(lines),
    }
    head.update(header or {})
    body = [json.dumps(head)] + [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return gzip.compress(("\n".join(body) + "\n").encode())


def good_line(path: str = "a", **over: object) -> dict:
    return {"path": path, "size": 1, "mtime_ns": 2, "digest": D1, **over}


# -- round trip and header -----------------------------------------------------------------------


def test_round_trip_preserves_every_field() -> None:
    m = sample()
    back = Manifest.loads(m.dumps())
    assert back == m
    assert back.entries == m.entries
    assert back.algorithm == DEFAULT_ALGORITHM


def test_object_store_entries_keep_their_etag_and_others_write_none() -> None:
    """An index on an object store vouches by (size, ETag): the tag round-trips; entries
    without one are written as before, so indexes on paths and over SSH are unchanged."""
    tagged = Manifest.from_entries(
        [Entry("a", 1, 2, D1, "9b2cf535f27731c974343645a3985328-3"), Entry("b", 1, 2, D2)]
    )
    back = Manifest.loads(tagged.dumps())
    assert back.entries == tagged.entries
    assert [line.get("etag") for line in lines_of(tagged.dumps())[1:]] == [
        "9b2cf535f27731c974343645a3985328-3",
        None,
    ]
    assert Manifest.loads(raw_manifest(good_line())).entries[0].etag is None
    assert (
        Manifest.from_entries([Entry("b", 1, 2, D2)]).dumps()
        == Manifest.from_entries([Entry("b", 1, 2, D2, None)]).dumps()
    )
    assert tagged.with_digests({"a": D2}).entries[0] == Entry(
        "a", 1, 2, D2, "9b2cf535f27731c974343645a3985328-3"
    )


@pytest.mark.parametrize(
    "entry_tag, listed_tag, listed_mtime, trusted",
    [
        ("t1", "t1", 999, True),  # the tag decides: the store's stamp is not the entry's mtime
        ("t1", "t2", 2, False),  # replaced behind our back, even with the same mtime
        ("t1", None, 2, True),  # a listing without tags: by mtime, as entries taken from one
        ("t1", None, 999, False),  # an entry recorded from an upload never matches a stamp
        (None, "t1", 2, True),  # an index written before tags: by mtime
        (None, "t1", 999, False),
    ],
)
def test_an_index_entry_vouches_by_etag_where_both_sides_have_one(
    entry_tag: str | None, listed_tag: str | None, listed_mtime: int, trusted: bool
) -> None:
    entry = Entry("a", 1, 2, D1, entry_tag)
    assert _same_version(entry, RemoteStat("a", 1, listed_mtime, listed_tag)) is trusted


def test_round_trip_of_empty_manifest() -> None:
    back = Manifest.loads(Manifest().dumps())
    assert len(back) == 0
    assert back.total_bytes == 0


def test_header_carries_format_version_algorithm_count_and_bytes() -> None:
    m = sample()
    header = lines_of(m.dumps(dataset="ns/ds"))[0]
    assert header["format"] == MANIFEST_FORMAT
    assert header["version"] == MANIFEST_VERSION
    assert header["algorithm"] == "sha256"
    assert header["count"] == len(m) == 7
    assert header["bytes"] == m.total_bytes
    assert header["dataset"] == "ns/ds"  # extra header fields are carried through


def test_unicode_paths_stored_as_utf8_text() -> None:
    m = Manifest([Entry("données/été.csv", 1, 1, D1)])
    raw = gzip.decompress(m.dumps())
    assert "données/été.csv".encode() in raw


def test_dumps_is_deterministic() -> None:
    assert sample().dumps() == sample().dumps()
    # Insertion order does not matter once sorted.
    shuffled = Manifest.from_entries(reversed(sample().entries))
    assert shuffled.dumps() == sample().dumps()


def test_entries_are_sorted_in_manifest_order() -> None:
    m = sample()
    paths = [e.path for e in m]
    assert paths == sorted(paths, key=sort_key)
    assert paths.index("a/b") < paths.index("a.b")
    written = [line["path"] for line in lines_of(m.dumps())[1:]]
    assert written == paths


def test_loads_sorts_unsorted_input() -> None:
    data = raw_manifest(good_line("b"), good_line("a.b"), good_line("a/b"))
    assert [e.path for e in Manifest.loads(data)] == ["a/b", "a.b", "b"]


def test_loads_keeps_algorithm_from_header() -> None:
    data = raw_manifest(good_line(), header={"algorithm": "sha256"})
    assert Manifest.loads(data).algorithm == "sha256"


def test_manifest_helpers() -> None:
    m = sample()
    assert m.total_bytes == sum(e.size for e in m)
    assert m.by_path()["a/b"].mtime_ns == 5
    assert len(m) == 7


# -- Entry -----------------------------------------------------------------------------------------


def test_same_content_ignores_mtime() -> None:
    a = Entry("x", 3, 1, D1)
    assert a.same_content(Entry("x", 3, 999, D1))
    assert not a.same_content(Entry("x", 3, 1, D2))
    assert not a.same_content(Entry("x", 4, 1, D1))
    assert not a.same_content(None)


def test_entry_as_json() -> None:
    assert Entry("x", 3, 1, D1).as_json() == {"size": 3, "digest": D1}


# -- loads refuses ---------------------------------------------------------------------------------


def test_loads_rejects_wrong_format() -> None:
    with pytest.raises(ManifestFormatError, match="not a tether manifest"):
        Manifest.loads(raw_manifest(good_line(), header={"format": "something-else"}))


def test_loads_rejects_newer_version_and_names_it() -> None:
    with pytest.raises(ManifestFormatError, match="version 2") as info:
        Manifest.loads(raw_manifest(good_line(), header={"version": 2}), source="remote index")
    assert "remote index" in info.value.message
    assert str(MANIFEST_VERSION) in info.value.message
    assert "Upgrade" in info.value.hint


def test_loads_rejects_missing_version() -> None:
    data = gzip.compress(json.dumps({"format": MANIFEST_FORMAT}).encode() + b"\n")
    with pytest.raises(ManifestFormatError, match="version"):
        Manifest.loads(data)


def test_loads_rejects_truncated_file_by_count() -> None:
    data = raw_manifest(good_line("a"), good_line("b"), header={"count": 3})
    with pytest.raises(ManifestFormatError, match="truncated"):
        Manifest.loads(data)


def test_loads_rejects_truncated_gzip_stream() -> None:
    data = sample().dumps()
    with pytest.raises(ManifestFormatError):
        Manifest.loads(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty-bytes"),
        pytest.param(b"\x00\x01garbage\xff" * 10, id="garbage"),
        pytest.param(b"not gzip at all", id="text"),
        pytest.param(gzip.compress(b""), id="empty-gzip"),
        pytest.param(gzip.compress(b"\xff\xfe\xfd\n"), id="not-utf8"),
        pytest.param(gzip.compress(b"{not json\n"), id="bad-header"),
    ],
)
def test_loads_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ManifestFormatError):
        Manifest.loads(data)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("{oops", id="bad-json"),
        pytest.param("", id="blank-line"),
        pytest.param({"path": "a", "size": 1, "mtime_ns": 2}, id="missing-digest"),
        pytest.param({"size": 1, "mtime_ns": 2, "digest": D1}, id="missing-path"),
        pytest.param(good_line(size="big"), id="size-not-int"),
        pytest.param(good_line(mtime_ns=None), id="mtime-null"),
        pytest.param([1, 2, 3], id="list"),
        pytest.param(None, id="null"),
        pytest.param('"just a string"', id="string"),
    ],
)
def test_loads_rejects_malformed_line_with_its_number(line: object) -> None:
    data = raw_manifest(good_line("first"), line)
    with pytest.raises(ManifestFormatError, match="line 3"):
        Manifest.loads(data, source="idx")


@pytest.mark.parametrize(
    "path",
    ["../x", "/etc/passwd", "a/../../b", ".tether/lock", ".git/config", "a\\..\\b", "a\x00b", ""],
)
def test_loads_rejects_escaping_entry_path(path: str) -> None:
    with pytest.raises((InvalidPath, ManifestFormatError)):
        Manifest.loads(raw_manifest(good_line(path)))


def test_loads_rejects_non_string_path() -> None:
    with pytest.raises((InvalidPath, ManifestFormatError)):
        Manifest.loads(raw_manifest(good_line(5)))


@pytest.mark.parametrize("header", ["[1]", "5", '"tether-manifest"', "null"])
def test_loads_rejects_non_object_header(header: str) -> None:
    with pytest.raises(ManifestFormatError):
        Manifest.loads(gzip.compress(header.encode() + b"\n"))


@pytest.mark.parametrize("field", ["size", "mtime_ns"])
def test_loads_rejects_infinite_numbers(field: str) -> None:
    line = json.dumps(good_line()).replace(f'"{field}": {good_line()[field]}', f'"{field}": Infinity')
    assert "Infinity" in line
    with pytest.raises(ManifestFormatError):
        Manifest.loads(raw_manifest(line))


def test_dumps_of_undecodable_file_name_round_trips_or_is_refused() -> None:
    # os.scandir yields b"\xff.bin" as "\udcff.bin" on Linux; scan and check_relpath accept it.
    m = Manifest([Entry("\udcff.bin", 1, 1, D1)])
    try:
        data = m.dumps()
    except TetherError:
        return  # a clear refusal would be fine
    assert Manifest.loads(data) == m


def test_unknown_digest_algorithm_in_header_is_refused() -> None:
    with pytest.raises(ManifestFormatError, match="md5"):
        Manifest.loads(raw_manifest(good_line(), header={"algorithm": "md5"}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", -1),
        ("size", True),
        ("digest", None),
        ("digest", "xyz"),
        ("mtime_ns", "1"),
        ("etag", 5),
        ("etag", ""),
        ("etag", "x" * 257),
        ("etag", "a\nb"),
    ],
)
def test_loads_rejects_bad_field_values(field: str, value: object) -> None:
    line = good_line()
    line[field] = value
    with pytest.raises(ManifestFormatError):
        Manifest.loads(raw_manifest(json.dumps(line)))


def test_windows_drive_like_names_are_ordinary_posix_names() -> None:
    m = Manifest([Entry("C:/x", 1, 1, D1), Entry("t:1", 1, 1, D1)])
    assert Manifest.loads(m.dumps()) == m


def test_manifest_format_error_is_a_tether_error() -> None:
    assert issubclass(ManifestFormatError, TetherError)


@pytest.mark.parametrize("name", ["a\u2028b", "x\x85y", "tab\there", "new\nline", "cr\rname"])
def test_names_with_line_separators_round_trip(name: str) -> None:
    m = Manifest([Entry(name, 1, 1, D1), Entry("z", 2, 2, D2)])
    assert Manifest.loads(m.dumps()) == m


def test_a_line_holding_two_records_is_malformed() -> None:
    two = json.dumps(good_line("a")) + "," + json.dumps(good_line("b"))
    with pytest.raises(ManifestFormatError, match="line 2"):
        Manifest.loads(raw_manifest(two, good_line("c")))
