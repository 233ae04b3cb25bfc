"""The object-store backend against real S3 servers (rclone serve s3, moto) on 127.0.0.1.

The conformance suite (test_remote_conformance.py) covers the protocol; these tests cover what
is specific to object stores: configuration and credentials, multipart uploads and ranged
downloads, hostile keys in listings, conditional writes, error mapping, clean-up of abandoned
uploads and `tether remote test`'s checks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import obstore
import pytest

from s3servers import S3Server, ThrottlingProxy, get_server, s3_remote, unique_prefix
from tether.config import RemoteConfig
from tether.errors import (
    ConfigError,
    InvalidPath,
    RemotePermissionError,
    RemoteUnavailable,
    VerificationError,
)
from tether.remotes import objectstore_multipart as mp
from tether.remotes import open_remote, parse_url
from tether.remotes.objectstore import ObjectStoreRemote, OrderedHasher, build_settings, diagnose
from tether.scan import StatEntry

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def no_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the developer's AWS setup: empty profile files, no AWS_* variables."""
    for var in [v for v in os.environ if v.startswith("AWS_") and v != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "_aws_credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "_aws_config"))


@pytest.fixture
def rclone(tmp_path: Path) -> Iterator[S3Server]:
    yield get_server("rclone")


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[S3Server]:
    yield get_server("moto")


def _remote(server: S3Server, tmp: Path, prefix: str | None = None, **options: object) -> ObjectStoreRemote:
    config = RemoteConfig("os", server.url(prefix), server.options(**options), "test")
    remote = open_remote(config, workspace_root=tmp)
    assert isinstance(remote, ObjectStoreRemote)
    return remote


def _file(tmp: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _settings(url: str, tmp: Path, **options: object):  # type: ignore[no-untyped-def]
    return build_settings(RemoteConfig("r", url, dict(options), "test"), parse_url(url), state_dir=tmp)


# -- configuration and credentials (no server needed) -------------------------------------------
def test_credentials_from_remote_options_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    s = _settings("s3://b/p", tmp_path, access_key_id="OPTKEY", secret_access_key="OPTSECRET")
    assert s.credentials.static is not None
    assert s.credentials.static.access_key_id == "OPTKEY"
    assert s.credentials.source == "remote options"
    assert "OPTSECRET" not in repr(s)


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s = _settings("s3://b/p", tmp_path, allow_http=True)
    assert s.credentials.static is not None and s.credentials.static.access_key_id == "ENVKEY"
    assert (s.endpoint, s.region) == ("http://127.0.0.1:9", "eu-west-3")


def test_credentials_from_aws_profile_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "_aws_credentials").write_text(
        "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = DEFSECRET\n"
        "[team]\naws_access_key_id = TEAMKEY\naws_secret_access_key = TEAMSECRET\n"
    )
    (tmp_path / "_aws_config").write_text(
        "[profile team]\nregion = eu-central-1\nendpoint_url = https://minio.example.org\n"
    )
    s = _settings("s3://b/p", tmp_path, profile="team")
    assert s.credentials.static is not None and s.credentials.static.access_key_id == "TEAMKEY"
    assert (s.region, s.endpoint) == ("eu-central-1", "https://minio.example.org")
    assert "team" in s.credentials.source
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert _settings("s3://b/p", tmp_path).credentials.static.access_key_id == "TEAMKEY"  # type: ignore[union-attr]
    monkeypatch.delenv("AWS_PROFILE")
    assert _settings("s3://b/p", tmp_path).credentials.static.access_key_id == "DEFKEY"  # type: ignore[union-attr]


def test_profile_problems_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "_aws_config").write_text("[profile sso]\nsso_session = corp\nregion = us-east-1\n")
    with pytest.raises(ConfigError, match="not found"):
        _settings("s3://b/p", tmp_path, profile="missing")
    with pytest.raises(ConfigError, match="sso_session") as info:
        _settings("s3://b/p", tmp_path, profile="sso")
    assert "export-credentials" in info.value.hint


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"endpoint": "http://127.0.0.1:9000", "access_key_id": "k", "secret_access_key": "s"}, "allow_http"),
        ({"endpoint": "http://127.0.0.1:9000", "allow_http": True}, "no S3 credentials"),
        ({"endpoint": "ftp://x", "access_key_id": "k", "secret_access_key": "s"}, "not an http"),
        ({"access_key_id": "k"}, "only one of"),
        ({"part_size": "lots"}, "part_size"),
        ({"allow_http": "maybe"}, "allow_http"),
        ({"download_connections": "lots"}, "download_connections"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _settings("s3://b/p", tmp_path, **options)


def test_r2_defaults_region_auto_and_sizes_parse(tmp_path: Path) -> None:
    s = _settings(
        "s3://b/p",
        tmp_path,
        endpoint="https://acc.r2.cloudflarestorage.com",
        access_key_id="k",
        secret_access_key="s",
        part_size="32MiB",
        multipart_threshold="64M",
    )
    assert (s.region, s.part_size, s.multipart_threshold) == ("auto", 32 * MiB, 64 * MiB)


def test_unknown_option_is_config_error(tmp_path: Path) -> None:
    config = RemoteConfig(
        "r", "s3://b/p", {"acess_key": "typo", "access_key_id": "k", "secret_access_key": "s"}, "t"
    )
    with pytest.raises(ConfigError, match="acess_key"):
        open_remote(config, workspace_root=tmp_path)


# -- transfers ----------------------------------------------------------------------------------
def test_multipart_upload_and_ranged_download(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, part_size="5MiB", multipart_threshold="6MiB")
    data = os.urandom(23 * MiB + 123)
    src, digest = _file(tmp_path, "big.bin", data)
    seen: list[int] = []
    remote.put_file(src, "ds/big.bin", digest=digest, mtime_ns=0, on_bytes=seen.append)
    assert sum(seen) == len(data)
    [stat] = list(remote.list_files("ds"))
    assert stat.size == len(data)
    # five parts: AWS and moto say "<md5 of md5s>-5"; rclone serves the whole file's MD5
    assert stat.etag in (hashlib.md5(data).hexdigest(), stat.etag.split("-")[0] + "-5")
    dest = tmp_path / "staging" / "big.bin"
    got: list[int] = []
    remote.get_file(
        "ds/big.bin", dest, digest=digest, mtime_ns=1_700_000_000_000_000_000, on_bytes=got.append
    )
    assert dest.read_bytes() == data
    assert sum(got) == len(data)
    assert dest.stat().st_mtime_ns == 1_700_000_000_000_000_000
    assert list(rclone.client().list_uploads(remote.key(""))) == []
    assert not list((tmp_path / ".tether" / "multipart").glob("*.json"))


def test_a_part_is_read_in_slices_into_both_hashes(tmp_path: Path) -> None:
    """Each slice feeds the file's hash and the part's; a short last part stops at the end."""
    data = os.urandom(2 * mp.HASH_SLICE + 5 * 1024 + 7)
    src, digest = _file(tmp_path, "f.bin", data)
    whole = hashlib.sha256()
    buffer = bytearray(mp.HASH_SLICE + 3)  # a part size that is no multiple of the slice
    parts: list[tuple[int, str]] = []
    with open(src, "rb", buffering=0) as f:
        while True:
            got, part_hash = mp._read_part(f, buffer, whole)
            if not got:
                break
            parts.append((got, part_hash.hexdigest()))
    step = len(buffer)
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    assert parts == [(len(p), hashlib.sha256(p).hexdigest()) for p in pieces]
    assert whole.hexdigest() == digest


def test_reused_part_buffers_carry_each_part_intact(
    rclone: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One part in flight at a time: every part after the first is read into a buffer a sent
    part left. The object, its digest and the checksum sent with every part must be right."""
    remote = _remote(rclone, tmp_path, part_size="5MiB", multipart_threshold="6MiB", part_concurrency=1)
    data = os.urandom(21 * MiB + 11)
    src, digest = _file(tmp_path, "big.bin", data)
    st = os.stat(src)
    expect = StatEntry("big.bin", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    sent: dict[int, str] = {}
    real_upload_part = mp.S3Client.upload_part

    def recording(self, key, upload_id, number, body, sha256_b64):  # type: ignore[no-untyped-def]
        sent[number] = sha256_b64
        return real_upload_part(self, key, upload_id, number, body, sha256_b64)

    monkeypatch.setattr(mp.S3Client, "upload_part", recording)
    assert remote.put_file_hashing(src, "ds/big.bin", expect=expect, mtime_ns=0) == digest
    step = 5 * MiB
    parts = [data[i : i + step] for i in range(0, len(data), step)]
    assert sent == {
        n: base64.b64encode(hashlib.sha256(p).digest()).decode() for n, p in enumerate(parts, start=1)
    }
    assert remote.hash_files(["ds/big.bin"], use_cache=False) == {"ds/big.bin": digest}


def test_interrupted_upload_of_a_file_changed_since_starts_over(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, part_size="5MiB", multipart_threshold="6MiB", part_concurrency=1)
    src, digest = _file(tmp_path, "big.bin", os.urandom(16 * MiB))

    def cut(n: int) -> None:
        raise ConnectionResetError("link dropped")  # the first part's progress call: mid-upload

    with pytest.raises(ConnectionResetError):
        remote.put_file(src, "ds/big.bin", digest=digest, mtime_ns=0, on_bytes=cut)
    [journal] = mp.journals(tmp_path / ".tether", remote.describe())
    assert len(journal.parts) == 1
    new_data = os.urandom(16 * MiB)  # same size, new content (and mtime): that upload is useless now
    src.write_bytes(new_data)
    new_digest = hashlib.sha256(new_data).hexdigest()
    remote.put_file(src, "ds/big.bin", digest=new_digest, mtime_ns=0)
    assert remote.hash_files(["ds/big.bin"]) == {"ds/big.bin": new_digest}
    assert list(rclone.client().list_uploads(remote.key(""))) == []
    assert mp.journals(tmp_path / ".tether", remote.describe()) == []


def test_multipart_with_a_wrong_digest_is_aborted(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, part_size="5MiB", multipart_threshold="6MiB")
    src, _ = _file(tmp_path, "big.bin", os.urandom(12 * MiB))
    with pytest.raises(VerificationError):
        remote.put_file(src, "ds/big.bin", digest="0" * 64, mtime_ns=0)
    assert list(remote.list_files("ds")) == []
    assert list(rclone.client().list_uploads(remote.key(""))) == []
    assert not list((tmp_path / ".tether" / "multipart").glob("*.json"))


def test_ranged_download_with_a_wrong_digest_leaves_nothing(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, part_size="5MiB", multipart_threshold="6MiB")
    src, digest = _file(tmp_path, "big.bin", os.urandom(11 * MiB))
    remote.put_file(src, "ds/big.bin", digest=digest, mtime_ns=0)
    dest = tmp_path / "staging" / "big.bin"
    with pytest.raises(VerificationError):
        remote.get_file("ds/big.bin", dest, digest="f" * 64, mtime_ns=0)
    assert os.listdir(dest.parent) == []


def test_streamed_multipart_without_static_keys_path(moto: S3Server, tmp_path: Path) -> None:
    """obstore's own multipart path (used for GCS/Azure and S3 without static keys) verifies too."""
    remote = _remote(moto, tmp_path, part_size="5MiB", multipart_threshold="6MiB")
    remote._client = None  # what a remote with instance-role credentials has
    src, digest = _file(tmp_path, "big.bin", os.urandom(11 * MiB))
    with pytest.raises(VerificationError):
        remote.put_file(src, "ds/bad.bin", digest="0" * 64, mtime_ns=0)
    remote.put_file(src, "ds/big.bin", digest=digest, mtime_ns=0)
    assert [s.path for s in remote.list_files("ds")] == ["big.bin"]
    assert remote.hash_files(["ds/big.bin"]) == {"ds/big.bin": digest}


def test_listing_pages_and_plain_md5_etags(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path)
    store = rclone.store()
    keys = [remote.key(f"ds/f{i:04d}") for i in range(1030)]  # more than one 1000-key page
    threads = [
        threading.Thread(target=lambda ks=keys[i::16]: [obstore.put(store, k, k.encode()) for k in ks])
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    listed = list(remote.list_files("ds"))
    assert len(listed) == 1030
    first = next(s for s in listed if s.path == "f0000")
    assert first.etag == hashlib.md5(remote.key("ds/f0000").encode()).hexdigest()


def test_a_dataset_with_folders_is_listed_a_stream_per_folder(rclone: S3Server, tmp_path: Path) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        prefix = unique_prefix()
        remote = _remote(rclone, tmp_path, prefix, endpoint=proxy.endpoint)
        store = rclone.store()
        files = ["top.txt", "d0/a", "d0/b", "d1/x/y/deep", "d2/c", "_derived/e.parquet"]
        for rel in [*files, ".tether/index"]:
            obstore.put(store, remote.key(f"ds/{rel}"), rel.encode())
        obstore.put(store, remote.key("ds-other/not-mine"), b"a sibling dataset, never listed")
        proxy.requests.clear()
        listed = list(remote.list_files("ds"))
        assert sorted(st.path for st in listed) == sorted(files)
        assert {st.path: st.size for st in listed} == {rel: len(rel) for rel in files}
        lists = [parse_qs(urlsplit(p).query) for m, p in proxy.requests if "list-type=2" in p]
        assert len(lists) == len(proxy.requests)
        folder_lists = sorted(q["prefix"][0] for q in lists if "delimiter" not in q)
        # each top-level folder once (tether's state folder too: its keys are dropped as ever)
        base = remote.key("ds")
        assert folder_lists == sorted(f"{base}/{name}/" for name in (".tether", "_derived", "d0", "d1", "d2"))
    finally:
        proxy.close()


def test_a_flat_dataset_or_one_folder_is_listed_in_one_stream(rclone: S3Server, tmp_path: Path) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        remote = _remote(rclone, tmp_path, endpoint=proxy.endpoint)
        store = rclone.store()
        for rel in ("only/a", "only/b/c"):
            obstore.put(store, remote.key(f"ds/{rel}"), b"x")
        proxy.requests.clear()
        assert sorted(st.path for st in remote.list_files("ds")) == ["only/a", "only/b/c"]
        undelimited = [p for _m, p in proxy.requests if "delimiter" not in p]
        assert len(undelimited) == 1, proxy.requests  # the probe, then the dataset's one stream
    finally:
        proxy.close()


# -- hostile keys -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "d0/../../x"], ids=["top", "in-a-folder"])
def test_a_key_escaping_the_dataset_is_refused(moto: S3Server, tmp_path: Path, bad: str) -> None:
    remote = _remote(moto, tmp_path)
    for fine in ("d0/a", "d1/b"):  # folders: each listed on its own stream
        obstore.put(moto.store(), remote.key(f"ds/{fine}"), b"fine")
    moto.client().request("PUT", remote.key("ds") + "/" + bad, body=b"evil")
    with pytest.raises(InvalidPath, match=r"\.\."):
        list(remote.list_files("ds"))


def test_a_backslash_key_is_refused(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path)
    obstore.put(rclone.store(), remote.key("ds") + "/a\\b", b"x")
    with pytest.raises(InvalidPath, match="backslash"):
        list(remote.list_files("ds"))


# -- conditional writes -------------------------------------------------------------------------
def test_conditional_create_on_a_store_that_enforces_it(moto: S3Server, tmp_path: Path) -> None:
    prefix = unique_prefix()
    a, b = _remote(moto, tmp_path, prefix), _remote(moto, tmp_path, prefix)
    wins: list[bool] = []
    barrier = threading.Barrier(2)

    def take(remote: ObjectStoreRemote, data: bytes) -> None:
        barrier.wait()
        wins.append(remote.create_exclusive("ds/.tether/lock", data))

    threads = [threading.Thread(target=take, args=(r, d)) for r, d in ((a, b"a"), (b, b"b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, True]
    assert a.capabilities.conditional_create is True
    assert not a.notices


def test_conditional_create_falls_back_and_says_so(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path)
    assert remote.create_exclusive("ds/.tether/lock", b"one") is True
    assert remote.create_exclusive("ds/.tether/lock", b"two") is False
    assert remote.read_bytes("ds/.tether/lock") == b"one"
    assert remote.capabilities.conditional_create is False
    assert any("does not enforce conditional writes" in n for n in remote.notices)
    assert [s.path for s in remote.list_files("ds")] == []  # the probe object was removed


# -- errors -------------------------------------------------------------------------------------
def test_wrong_credentials(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, secret_access_key="not-the-secret-xyz")
    with pytest.raises(RemotePermissionError) as info:
        remote.check()
    assert "SignatureDoesNotMatch" in info.value.message
    assert "remote options" in info.value.message
    assert "not-the-secret-xyz" not in info.value.message + info.value.hint


def test_missing_bucket_is_unavailable_not_missing_file(rclone: S3Server, tmp_path: Path) -> None:
    config = RemoteConfig("os", "s3://no-such-bucket/p", rclone.options(), "test")
    remote = open_remote(config, workspace_root=tmp_path)
    with pytest.raises(RemoteUnavailable, match="'no-such-bucket' does not exist"):
        remote.check()
    with pytest.raises(RemoteUnavailable):  # not FileNotFoundError: "no index" would be a lie
        remote.read_bytes("ds/.tether/index")


def test_unreachable_endpoint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"endpoint": f"http://127.0.0.1:{port}", "allow_http": True, "access_key_id": "k"}
    options |= {"secret_access_key": "s", "max_retries": 1, "retry_timeout": 2}
    remote = open_remote(RemoteConfig("os", "s3://b/p", options, "t"), workspace_root=tmp_path)
    with pytest.raises(RemoteUnavailable, match="cannot reach"):
        remote.check()


def test_throttling_is_retried_then_reported(rclone: S3Server, tmp_path: Path) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        remote = _remote(rclone, tmp_path, endpoint=proxy.endpoint, max_retries=2, retry_timeout=5)
        src, digest = _file(tmp_path, "a", b"payload")
        proxy.fail_next(2, "PUT")
        remote.put_file(src, "ds/a", digest=digest, mtime_ns=0)  # two 503s, then success
        assert proxy.throttled == 2
        assert remote.read_bytes("ds/a") == b"payload"
        proxy.always = True
        with pytest.raises(RemoteUnavailable, match="throttling") as info:
            remote.put_file(src, "ds/b", digest=digest, mtime_ns=0)
        assert "--jobs" in info.value.hint
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("status", "code", "error", "words"),
    [
        (403, "RequestTimeTooSkewed", RemotePermissionError, ["clock", "15 minutes"]),
        (403, "AccessDenied", RemotePermissionError, ["access denied to s3://"]),
        (403, "InvalidAccessKeyId", RemotePermissionError, ["rejected the credentials"]),
        (400, "AuthorizationHeaderMalformed", RemotePermissionError, ["rejected the credentials"]),
        (404, "NoSuchBucket", RemoteUnavailable, ["does not exist"]),
    ],
)
def test_store_errors_become_one_line_tether_errors(
    rclone: S3Server, tmp_path: Path, status: int, code: str, error: type, words: list[str]
) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        remote = _remote(rclone, tmp_path, endpoint=proxy.endpoint, max_retries=1, retry_timeout=2)
        proxy.canned = (status, code)
        with pytest.raises(error) as info:
            remote.check()
        assert "\n" not in info.value.message and info.value.hint
        for word in words:
            assert word in info.value.message
        if code == "AuthorizationHeaderMalformed":
            assert "region" in info.value.hint
    finally:
        proxy.close()


def test_a_store_refusing_checksum_headers_gets_uploads_without_them(
    rclone: S3Server, tmp_path: Path
) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        proxy.reject_header = "x-amz-checksum-sha256"
        remote = _remote(
            rclone, tmp_path, endpoint=proxy.endpoint, part_size="5MiB", multipart_threshold="6MiB"
        )
        small, small_digest = _file(tmp_path, "small", b"small")
        remote.put_file(small, "ds/small", digest=small_digest, mtime_ns=0)
        assert any("refused the x-amz-checksum-sha256 header" in n for n in remote.notices)
        proxy.reject_header = "x-amz-checksum-algorithm"  # the multipart create, on a fresh remote
        fresh = _remote(
            rclone,
            tmp_path,
            remote.settings.prefix,
            endpoint=proxy.endpoint,
            part_size="5MiB",
            multipart_threshold="6MiB",
        )
        big, big_digest = _file(tmp_path, "big", os.urandom(11 * MiB))
        fresh.put_file(big, "ds/big", digest=big_digest, mtime_ns=0)
        assert any("refused the x-amz-checksum-sha256 header" in n for n in fresh.notices)
        assert fresh.hash_files(["ds/big", "ds/small"]) == {"ds/big": big_digest, "ds/small": small_digest}
    finally:
        proxy.close()


def test_gcs_and_azure_remotes_open_without_network(tmp_path: Path) -> None:
    gcs = open_remote(RemoteConfig("g", "gs://bucket/pre", {}, "t"), workspace_root=tmp_path)
    assert isinstance(gcs, ObjectStoreRemote) and gcs.key("ds/a") == "pre/ds/a"
    azure = open_remote(RemoteConfig("a", "az://container/pre", {"account_name": "acct"}, "t"))
    assert isinstance(azure, ObjectStoreRemote)
    with pytest.raises(ConfigError, match="Account must be specified"):
        open_remote(RemoteConfig("a", "az://container/pre", {}, "t"))


# -- clean-up and diagnostics -------------------------------------------------------------------
def test_cleanup_aborts_abandoned_uploads_but_keeps_resumable_ones(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path)
    client = rclone.client()
    abandoned = client.create_multipart(remote.key("ds/gone.bin"), checksum=False, storage_class=None)
    mine = client.create_multipart(remote.key("ds/mine.bin"), checksum=False, storage_class=None)
    journal = mp.Journal(
        mp.journal_path(tmp_path / ".tether", remote.describe(), remote.key("ds/mine.bin"), tmp_path / "m"),
        remote.describe(),
        remote.key("ds/mine.bin"),
        mine,
        5 * MiB,
        str(tmp_path / "m"),
        1,
        1,
        "0" * 64,
        False,
    )
    journal.save()
    assert remote.cleanup_temp("ds") == 1
    left = [u for _k, u, _i in client.list_uploads(remote.key(""))]
    assert left == [mine] and abandoned not in left
    client.abort_multipart(remote.key("ds/mine.bin"), mine)
    remote.cleanup_temp("ds")  # the journal's upload is gone: the journal goes too
    assert not journal.path.exists()  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["rclone", "moto"])
def test_diagnose_passes_on_working_stores(kind: str, tmp_path: Path) -> None:
    remote = s3_remote(tmp_path, kind=kind)
    checks = diagnose(remote)
    names = [c[0] for c in checks]
    assert names == [
        "credentials",
        "bucket access",
        "put",
        "list",
        "get",
        "clock skew",
        "delete",
        "conditional writes",
    ]
    assert all(ok for _n, ok, _d, _f in checks), checks
    conditional = checks[-1][2]
    assert ("enforced" in conditional) if kind == "moto" else ("not enforced" in conditional)


def test_diagnose_lists_one_page_however_full_the_prefix(rclone: S3Server, tmp_path: Path) -> None:
    proxy = ThrottlingProxy(rclone.endpoint)
    try:
        remote = _remote(rclone, tmp_path, endpoint=proxy.endpoint)
        store = rclone.store()
        keys = [remote.key(f"ds{i % 3}/f{i:04d}") for i in range(1030)]  # two pages' worth
        threads = [
            threading.Thread(target=lambda ks=keys[i::16]: [obstore.put(store, k, b"x") for k in ks])
            for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        proxy.requests.clear()
        assert all(ok for _n, ok, _d, _f in diagnose(remote))
        lists = [p for m, p in proxy.requests if m == "GET" and "list-type=2" in p]
        assert len(lists) == 2, lists  # the check's, then the list step's: one page each
    finally:
        proxy.close()


def test_diagnose_reports_bad_credentials(rclone: S3Server, tmp_path: Path) -> None:
    remote = _remote(rclone, tmp_path, secret_access_key="wrong-secret-abc")
    [(name, ok, detail, fix)] = diagnose(remote)
    assert (name, ok) == ("credentials", False)
    assert "SignatureDoesNotMatch" in detail and fix
    assert "wrong-secret-abc" not in detail + fix


def test_ordered_hasher_hashes_parts_written_out_of_order_from_the_file(tmp_path: Path) -> None:
    """Parts land in any order; the digest is of the file's bytes in order, read back from disk
    (what was written, not what was received), and a part may not run ahead of the window."""
    data = os.urandom(10 * 1000 + 7)
    span = 1000
    count = -(-len(data) // span)
    path = tmp_path / "f"
    path.write_bytes(bytes(len(data)))
    fd = os.open(path, os.O_RDWR)
    try:
        hasher = OrderedHasher(fd, len(data), span, window=count)
        order = [3, 0, 10, 1, 2, 5, 4, 9, 8, 6, 7]
        for i in order:
            os.pwrite(fd, data[i * span : (i + 1) * span], i * span)
            hasher.written(i)
        assert hasher.cursor == count
        assert hasher.hasher.hexdigest() == hashlib.sha256(data).hexdigest()
        # the bytes on disk are what gets hashed: a part damaged after its write, before its turn
        damaged = OrderedHasher(fd, len(data), span, window=count)
        damaged.written(1)
        os.pwrite(fd, bytes([data[span + 5] ^ 0xFF]), span + 5)
        damaged.written(0)
        for i in range(2, count):
            damaged.written(i)
        on_disk = path.read_bytes()
        assert on_disk != data and damaged.hasher.hexdigest() == hashlib.sha256(on_disk).hexdigest()
        narrow = OrderedHasher(fd, len(data), span, window=2)
        assert narrow.wait_turn(1)
        narrow.fail()
        assert not narrow.wait_turn(5)  # past the window: waits, and a failure ends the wait
    finally:
        os.close(fd)
