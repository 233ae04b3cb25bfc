"""Foreign prefixes: objects another tool wrote (no tether index) compared without downloading.

Objects are planted with obstore behind tether's back, as `rclone sync` / `aws s3 sync` would;
requests go through a counting proxy, so "no download" is measured, not assumed. rclone serve s3
gives every object its MD5 as ETag; moto gives multipart uploads an ``<md5 of md5s>-N`` ETag.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import obstore
import pytest

from conftest import Result, WorkspaceFixture, make_workspace
from s3servers import S3Server, ThrottlingProxy, get_server
from test_objectstore_cli import add_s3_remote
from tether import sync
from tether.errors import VerificationError
from tether.foreign import EXACT, SIZE_ONLY, compare_with_local, plain_md5
from tether.hashing import HashCache
from tether.manifest import Manifest
from tether.remotes.base import RemoteStat
from tether.remotes.objectstore import ObjectStoreRemote

DS = "ns/ds"
Tether = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in [v for v in os.environ if v.startswith("AWS_") and v != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "_aws_credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "_aws_config"))


@pytest.fixture
def proxied() -> Iterator[Callable[[S3Server], ThrottlingProxy]]:
    proxies: list[ThrottlingProxy] = []

    def make(server: S3Server) -> ThrottlingProxy:
        proxies.append(ThrottlingProxy(server.endpoint))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def _foreign(server: S3Server, prefix: str, files: dict[str, bytes], *, multipart: bool = False) -> None:
    """Put objects as another tool would (no index); multipart=True as `aws s3 sync` does for
    large files."""
    store = server.store()
    for rel, data in files.items():
        obstore.put(store, f"{prefix}/{DS}/{rel}", data, use_multipart=multipart)


def _object_gets(proxy: ThrottlingProxy) -> list[str]:
    """GETs of data objects: not listings (of objects or uploads), not tether's state (index, lock)."""
    listing = ("list-type=2", "uploads=", "/.tether/")
    return [p for m, p in proxy.requests if m == "GET" and not any(s in p for s in listing)]


def _files(n: int) -> dict[str, bytes]:
    return {f"d{i % 4}/f{i:03d}.bin": f"object {i} ".encode() * (i + 3) for i in range(n)}


def _setup(
    tmp_path: Path, server: S3Server, proxy: ThrottlingProxy, files: dict[str, bytes], **put: bool
) -> tuple[WorkspaceFixture, str]:
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, server, endpoint=proxy.endpoint)
    _foreign(server, prefix, files, **put)
    for rel, data in files.items():
        ws.write(rel, data)
    return ws, prefix


def _index(server: S3Server, prefix: str) -> Manifest:
    data = bytes(obstore.get(server.store(), f"{prefix}/{DS}/.tether/index").bytes())
    return Manifest.loads(data)


# -- diff ---------------------------------------------------------------------------------------
def test_equal_foreign_prefix_diffs_in_sync_without_downloading(
    tmp_path: Path, tether: Tether, proxied: Callable[[S3Server], ThrottlingProxy]
) -> None:
    rclone = get_server("rclone")
    proxy = proxied(rclone)
    files = _files(30)
    ws, _prefix = _setup(tmp_path, rclone, proxy, files)
    r = tether("diff", DS, "s3", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert _object_gets(proxy) == []
    assert "size only" not in r.output  # every object had an MD5 ETag: all exact
    r = tether("diff", DS, "s3", "--json", cwd=ws.root)
    assert json.loads(r.stdout)["comparisons"] == {path: "exact" for path in files}


def test_one_changed_object_of_the_same_size_is_found_by_md5(
    tmp_path: Path, tether: Tether, proxied: Callable[[S3Server], ThrottlingProxy]
) -> None:
    rclone = get_server("rclone")
    proxy = proxied(rclone)
    files = _files(12)
    ws, prefix = _setup(tmp_path, rclone, proxy, files)
    theirs = b"X" * len(files["d1/f001.bin"])  # same size, other bytes, single-part upload
    _foreign(rclone, prefix, {"d1/f001.bin": theirs})
    proxy.requests.clear()
    r = tether("diff", DS, "s3", "--json", cwd=ws.root)
    assert r.exit_code == 1, r.output
    [change] = json.loads(r.stdout)["changes"]
    assert (change["path"], change["status"]) == ("d1/f001.bin", "differs")
    # only the object that differs is downloaded (to learn the SHA-256 a pull verifies against)
    assert change["remote"]["digest"] == hashlib.sha256(theirs).hexdigest()
    gets = _object_gets(proxy)
    assert len(gets) == 1 and gets[0].endswith("d1/f001.bin"), gets


def test_multipart_objects_compare_by_size_unless_checksum(
    tmp_path: Path, tether: Tether, proxied: Callable[[S3Server], ThrottlingProxy]
) -> None:
    moto = get_server("moto")
    proxy = proxied(moto)
    files = _files(6)
    ws, prefix = _setup(tmp_path, moto, proxy, files, multipart=True)
    # same size, other bytes: a size-only comparison cannot see this, --checksum can
    theirs = b"Y" * len(files["d2/f002.bin"])
    _foreign(moto, prefix, {"d2/f002.bin": theirs}, multipart=True)
    etags = {m["path"]: m["e_tag"] for m in obstore.list(moto.store(), prefix).collect()}
    assert all(plain_md5(e) is None for e in etags.values()), etags  # moto: "<hex>-1"
    proxy.requests.clear()
    r = tether("diff", DS, "s3", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert _object_gets(proxy) == []
    assert "6 object(s) without an MD5 ETag (multipart uploads) were compared by size only" in r.stderr
    assert "--checksum" in r.stderr
    r = tether("diff", DS, "s3", "--json", cwd=ws.root)
    assert json.loads(r.stdout)["comparisons"] == {path: "size-only" for path in files}

    proxy.requests.clear()
    r = tether("diff", DS, "s3", "--checksum", "--json", cwd=ws.root)
    assert r.exit_code == 1, r.output
    assert [c["path"] for c in json.loads(r.stdout)["changes"]] == ["d2/f002.bin"]
    assert len(_object_gets(proxy)) == len(files)  # --checksum downloads every unvouched object


def test_scan_remote_marks_each_comparison(tmp_path: Path) -> None:
    """RemoteState.comparisons: exact (MD5 ETag), size-only (multipart), and nothing for objects
    hashed by download (no local file, another size, an MD5 that differs)."""
    moto = get_server("moto")
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, moto)
    _foreign(moto, prefix, {"exact.txt": b"same", "md5-differs.txt": b"AAAA", "only-there.txt": b"x"})
    _foreign(moto, prefix, {"multi.txt": b"mp", "resized.txt": b"long remote"}, multipart=True)
    for rel, data in {
        "exact.txt": b"same",
        "md5-differs.txt": b"BBBB",
        "multi.txt": b"mp",
        "resized.txt": b"short",
    }.items():
        ws.write(rel, data)
    with sync.open_context(DS, "s3", workspace=ws.root) as ctx:
        state = sync.scan_remote(ctx)
        by_path = state.manifest.by_path()
        assert state.comparisons == {"exact.txt": EXACT, "multi.txt": SIZE_ONLY}
        assert by_path["exact.txt"].digest == hashlib.sha256(b"same").hexdigest()
        assert by_path["md5-differs.txt"].digest == hashlib.sha256(b"AAAA").hexdigest()
        assert by_path["resized.txt"].digest == hashlib.sha256(b"long remote").hexdigest()
    with sync.open_context(DS, "s3", workspace=ws.root, checksum=True) as ctx:
        state = sync.scan_remote(ctx)
        assert state.comparisons == {}  # --checksum: every unvouched object hashed by download


# -- adopting -----------------------------------------------------------------------------------
def test_push_adopts_a_foreign_prefix_and_the_next_diff_gets_only_the_index(
    tmp_path: Path, tether: Tether, proxied: Callable[[S3Server], ThrottlingProxy]
) -> None:
    rclone = get_server("rclone")
    proxy = proxied(rclone)
    files = _files(20)
    ws, prefix = _setup(tmp_path, rclone, proxy, files)
    ws.write("new.txt", "only here")
    r = tether("push", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert _object_gets(proxy) == []  # nothing downloaded to adopt it
    index = _index(rclone, prefix)
    assert {e.path: e.digest for e in index} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in {**files, "new.txt": b"only here"}.items()
    }
    proxy.requests.clear()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0
    assert _object_gets(proxy) == []
    assert [p for m, p in proxy.requests if "/.tether/" in p] == [
        f"/{rclone.bucket}/{prefix}/{DS}/.tether/index"
    ]


def test_no_op_push_writes_the_index_of_an_equal_foreign_prefix(
    tmp_path: Path,
    tether: Tether,
    proxied: Callable[[S3Server], ThrottlingProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moto = get_server("moto")
    proxy = proxied(moto)
    files = _files(5)
    ws, prefix = _setup(tmp_path, moto, proxy, files, multipart=True)
    # the push goes straight to moto (its lock's conditional PUTs do not survive the proxy)
    add_s3_remote(ws, moto, name="direct", prefix=prefix)
    hashed: list[str] = []
    monkeypatch.setattr(ObjectStoreRemote, "hash_files", lambda self, paths, **kw: hashed.extend(paths) or {})
    r = tether("push", DS, "direct", "-y", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert hashed == []  # nothing downloaded to adopt it
    # a size-only adoption: the index vouches with the local SHA-256s from now on
    assert {e.path: e.digest for e in _index(moto, prefix)} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }
    proxy.requests.clear()
    r = tether("diff", DS, "s3", cwd=ws.root)
    assert r.exit_code == 0 and "size only" not in r.output, r.output
    assert _object_gets(proxy) == []


# -- pull ---------------------------------------------------------------------------------------
def test_pull_from_a_foreign_prefix_verifies_and_never_promotes_a_changed_object(
    tmp_path: Path, tether: Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone = get_server("rclone")
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    files = _files(8)
    _foreign(rclone, prefix, files)
    ws.write("d0/f000.bin", files["d0/f000.bin"])  # one file already here: compared, not pulled
    original = ObjectStoreRemote.get_file
    replaced: list[str] = []

    def get_file(self: ObjectStoreRemote, path: str, dest: Path, **kw: object) -> None:
        if not replaced:  # another tool rewrites an object between the scan and its download
            replaced.append(path)
            obstore.put(rclone.store(), f"{prefix}/{path}", b"rewritten mid-pull")
        original(self, path, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ObjectStoreRemote, "get_file", get_file)
    r = tether("pull", DS, "s3", "-y", cwd=ws.root)
    assert r.exit_code == 4, r.output
    assert sorted(p.name for p in (ws.data / DS).rglob("*") if p.is_file()) == ["f000.bin"]
    monkeypatch.setattr(ObjectStoreRemote, "get_file", original)
    assert tether("pull", DS, "s3", "-y", cwd=ws.root).exit_code == 0
    got = {
        p.relative_to(ws.data / DS).as_posix(): p.read_bytes()
        for p in (ws.data / DS).rglob("*")
        if p.is_file()
    }
    rewritten = replaced[0].removeprefix(f"{DS}/")
    assert got == {**files, rewritten: b"rewritten mid-pull"}
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0


def test_first_pull_from_a_foreign_prefix_downloads_each_object_once(
    tmp_path: Path, tether: Tether, proxied: Callable[[S3Server], ThrottlingProxy]
) -> None:
    """A pull needs the bytes anyway: objects it will download are not hashed beforehand (that
    cost a second download each); the download is checked against the listed ETag instead."""
    rclone = get_server("rclone")
    proxy = proxied(rclone)
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone, endpoint=proxy.endpoint)
    files = _files(12)
    _foreign(rclone, prefix, files)
    proxy.requests.clear()
    r = tether("pull", DS, "s3", "-y", "--json", cwd=ws.root)
    assert r.exit_code == 0, r.output
    assert sorted(_object_gets(proxy)) == sorted(f"/{rclone.bucket}/{prefix}/{DS}/{rel}" for rel in files)
    got = {
        p.relative_to(ws.data / DS).as_posix(): p.read_bytes()
        for p in (ws.data / DS).rglob("*")
        if p.is_file()
    }
    assert got == files
    base = Manifest.loads(ws.workspace().base_path("s3", DS).read_bytes())  # real SHA-256s only
    assert {e.path: e.digest for e in base.entries} == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()
    }
    proxy.requests.clear()
    assert tether("diff", DS, "s3", cwd=ws.root).exit_code == 0  # compared by MD5, no download
    assert _object_gets(proxy) == []


def test_pull_raises_verification_error_through_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone = get_server("rclone")
    ws = make_workspace(tmp_path)
    prefix = add_s3_remote(ws, rclone)
    _foreign(rclone, prefix, {"a.txt": b"original"})
    original = ObjectStoreRemote.get_file

    def get_file(self: ObjectStoreRemote, path: str, dest: Path, **kw: object) -> None:
        obstore.put(rclone.store(), f"{prefix}/{path}", b"corrupted")
        original(self, path, dest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ObjectStoreRemote, "get_file", get_file)
    with pytest.raises(VerificationError):
        sync.pull(DS, "s3", workspace=ws.root)
    assert not (ws.data / DS / "a.txt").exists()


# -- units --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("etag", "md5"),
    [
        ('"5d41402abc4b2a76b9719d911017c592"', "5d41402abc4b2a76b9719d911017c592"),
        ("5D41402ABC4B2A76B9719D911017C592", "5d41402abc4b2a76b9719d911017c592"),
        ('"62109206880d38a4010a98e11243924a-1"', None),
        ('W/"5d41402abc4b2a76b9719d911017c592"', None),
        ("0x8DC0FFEE", None),
        ("", None),
        (None, None),
    ],
)
def test_plain_md5(etag: str | None, md5: str | None) -> None:
    assert plain_md5(etag) == md5


def _stat(rel: str, data: bytes, *, etag: str | None = "md5") -> RemoteStat:
    tag = hashlib.md5(data).hexdigest() if etag == "md5" else etag
    return RemoteStat(rel, len(data), 1_700_000_000_000_000_000, tag)


def test_compare_with_local_cases(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    for rel, data in {"same": b"same", "other": b"ours", "multi": b"mp", "resized": b"short"}.items():
        (root / rel).write_bytes(data)
    (root / "link").symlink_to(root / "same")
    listed = [
        _stat("same", b"same"),
        _stat("other", b"xxxx"),
        _stat("multi", b"mp", etag="abc-2"),
        _stat("noetag", b"none", etag=None),
        _stat("resized", b"longer"),
        _stat("link", b"same"),
        _stat("missing/deep", b"x"),
    ]
    cache = HashCache(None)
    compared, rest = compare_with_local(root, listed, cache, cache_prefix="ws/")
    assert {c.entry.path: c.comparison for c in compared} == {"same": EXACT, "multi": SIZE_ONLY}
    assert {c.entry.path: c.entry.digest for c in compared} == {
        "same": hashlib.sha256(b"same").hexdigest(),
        "multi": hashlib.sha256(b"mp").hexdigest(),
    }
    assert [c.entry.mtime_ns for c in compared] == [listed[0].mtime_ns] * 2  # the store's time
    assert sorted(s.path for s in rest) == ["link", "missing/deep", "noetag", "other", "resized"]


def test_compare_with_local_caches_md5s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "f").write_bytes(b"content")
    old = 1_600_000_000_000_000_000  # well before now: not racy
    os.utime(root / "f", ns=(old, old))
    cache = HashCache(tmp_path / "cache.sqlite")
    compared, _ = compare_with_local(root, [_stat("f", b"content")], cache, cache_prefix="x/")
    assert [c.comparison for c in compared] == [EXACT]
    reads: list[Path] = []
    import tether.foreign as foreign

    real = foreign._read_digests
    monkeypatch.setattr(foreign, "_read_digests", lambda p, *a: reads.append(p) or real(p, *a))
    compared, _ = compare_with_local(root, [_stat("f", b"content")], cache, cache_prefix="x/")
    assert [c.comparison for c in compared] == [EXACT] and reads == []
    (root / "f").write_bytes(b"CONTENT")  # same size, new bytes: the cache key no longer matches
    compared, rest = compare_with_local(root, [_stat("f", b"content")], cache, cache_prefix="x/")
    assert compared == [] and [s.path for s in rest] == ["f"] and len(reads) == 1
    cache.close()
