"""Unit tests for tether.paths: untrusted relative paths, dataset ids, manifest order, temp names."""

from __future__ import annotations

import random

import pytest

from tether.errors import ExitCode, InvalidPath
from tether.paths import TEMP_MARKER, check_dataset_id, check_relpath, is_temp_name, sort_key

# -- check_relpath -------------------------------------------------------------------------------

REJECTED_RELPATHS = [
    pytest.param("", id="empty"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("/", id="root"),
    pytest.param("//server/share", id="unc-like"),
    pytest.param("..", id="dotdot"),
    pytest.param("../x", id="dotdot-first"),
    pytest.param("a/../../x", id="dotdot-middle"),
    pytest.param("a/..", id="dotdot-last"),
    pytest.param(".", id="dot"),
    pytest.param("./a", id="dot-first"),
    pytest.param("a/./b", id="dot-middle"),
    pytest.param("a//b", id="empty-part"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..\\x", id="backslash-dotdot"),
    pytest.param("C:\\Windows", id="drive-backslash"),
    pytest.param(".tether", id="state-dir"),
    pytest.param(".tether/index", id="state-index"),
    pytest.param(".tether/lock", id="state-lock"),
    pytest.param(".git", id="git-dir"),
    pytest.param(".git/config", id="git-config"),
]


@pytest.mark.parametrize("path", REJECTED_RELPATHS)
def test_check_relpath_rejects(path: str) -> None:
    with pytest.raises(InvalidPath) as info:
        check_relpath(path)
    assert info.value.exit_code == ExitCode.USAGE
    # InvalidPath is also a ValueError so Python callers can catch the built-in.
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, 5, b"a/b"])
def test_check_relpath_rejects_non_strings(value: object) -> None:
    with pytest.raises(InvalidPath):
        check_relpath(value)  # type: ignore[arg-type]


ACCEPTED_RELPATHS = [
    "a",
    "a/b/c.txt",
    "données/été.csv",
    "日本語/ファイル",
    "emoji/🙂.bin",
    "with space/and more spaces.txt",
    " leading-space",
    "trailing-space ",
    'quote\'s/"double".txt',
    "-leading-dash",
    "--help",
    "a/-n",
    "...",
    "..a",
    "a..",
    ".hidden",
    ".tetherx/file",
    ".gitignore",
    ".github/workflows/ci.yml",
    "sub/.tether-notes",
    "x" * 255,
    "/".join(["d"] * 50),
]


@pytest.mark.parametrize("path", ACCEPTED_RELPATHS)
def test_check_relpath_accepts_and_returns_unchanged(path: str) -> None:
    assert check_relpath(path) is path


def test_check_relpath_message_names_path_and_what() -> None:
    with pytest.raises(InvalidPath, match=r"remote path '\.\./x'"):
        check_relpath("../x", what="remote path")
    with pytest.raises(InvalidPath, match="empty remote path"):
        check_relpath("", what="remote path")


def test_check_relpath_state_dir_only_at_the_top() -> None:
    # A nested `.tether` is not tether's state folder of this tree (scan skips it anyway).
    assert check_relpath("sub/.tether/x") == "sub/.tether/x"
    assert check_relpath("sub/.git/HEAD") == "sub/.git/HEAD"


# -- check_dataset_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset_id",
    ["ns/name", "name", "a.b/c_d-1", "A/B", "0/1", "ns/v1.2+build", "a/b/c", "ns/name.", "n-/m_"],
)
def test_check_dataset_id_accepts(dataset_id: str) -> None:
    assert check_dataset_id(dataset_id) == dataset_id


@pytest.mark.parametrize(
    "dataset_id",
    [
        pytest.param("", id="empty"),
        pytest.param("../x", id="dotdot"),
        pytest.param("ns/..", id="dotdot-last"),
        pytest.param("a//b", id="empty-part"),
        pytest.param("a/", id="trailing-slash"),
        pytest.param("/a", id="absolute"),
        pytest.param(" a", id="leading-space"),
        pytest.param("a ", id="trailing-space"),
        pytest.param("a\n", id="trailing-newline"),
        pytest.param("ns/my data", id="inner-space"),
        pytest.param(".hidden", id="hidden"),
        pytest.param("ns/.hidden", id="hidden-part"),
        pytest.param("_private", id="leading-underscore"),
        pytest.param("-rf", id="leading-dash"),
        pytest.param("+x", id="leading-plus"),
        pytest.param("ns/été", id="non-ascii"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("a:b", id="colon"),
        pytest.param("C:/x", id="drive"),
        pytest.param("ns/na*me", id="glob"),
        pytest.param(".tether/x", id="state-dir"),
        pytest.param(".git", id="git-dir"),
    ],
)
def test_check_dataset_id_rejects(dataset_id: str) -> None:
    with pytest.raises(InvalidPath) as info:
        check_dataset_id(dataset_id)
    assert info.value.hint, "an invalid id error should say what an id looks like"


def test_check_dataset_id_hint_explains_the_shape() -> None:
    with pytest.raises(InvalidPath) as info:
        check_dataset_id("../x")
    assert "namespace/name" in info.value.hint


@pytest.mark.parametrize("dataset_id", ["ns\n/name", "ns/name\n/x"])
def test_check_dataset_id_rejects_newline_inside(dataset_id: str) -> None:
    with pytest.raises(InvalidPath):
        check_dataset_id(dataset_id)


# -- sort_key ------------------------------------------------------------------------------------


def test_sort_key_puts_directory_contents_before_dotted_sibling() -> None:
    # Plain string order says "a.b" < "a/b" ('.' < '/'); a depth-first walk yields a/b first.
    assert "a.b" < "a/b"
    assert sort_key("a/b") < sort_key("a.b")
    assert sort_key("a/z/z") < sort_key("a-b")
    assert sort_key("a/b") < sort_key("a0")


def test_sort_key_orders_like_a_sorted_depth_first_walk() -> None:
    walk_order = [
        "a/b",
        "a/c/d",
        "a/c.txt",
        "a-b",
        "a.b",
        "a0",
        "b",
        "b/c",  # impossible on disk next to file "b", but the key still orders parents first
        "é",
    ]
    shuffled = walk_order[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=sort_key) == walk_order


def test_sort_key_is_componentwise_tuple() -> None:
    assert sort_key("a/b/c") == ("a", "b", "c")
    assert sort_key("x") == ("x",)


# -- is_temp_name --------------------------------------------------------------------------------


def test_is_temp_name() -> None:
    assert TEMP_MARKER == ".tether-tmp-"
    assert is_temp_name(".a.csv.tether-tmp-0123abcd")
    assert is_temp_name("sub/dir/.a.csv.tether-tmp-0123abcd")
    assert not is_temp_name("a.csv")
    assert not is_temp_name("tether-tmp-x")  # needs the leading dot of the marker
    # Only the last component counts: a folder that happens to carry the marker holds data.
    assert not is_temp_name(".x.tether-tmp-1/real.csv")
