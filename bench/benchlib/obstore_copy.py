"""The S3 baseline: a plain concurrent multipart upload (and a streamed download) with obstore.

    python obstore_copy.py put|get ENDPOINT BUCKET KEY_PREFIX LOCAL_DIR

``put`` uploads the files below LOCAL_DIR 96 at a time (all four large files at once), each as a
multipart upload of 16 MiB parts with 8 parts in flight (tether's object-store defaults), to
KEY_PREFIX/<relative path>. ``get``
lists KEY_PREFIX and streams every object into LOCAL_DIR, 192 at a time. No listing of the
destination, no hashing, no verification: the bytes alone, as fast as the library moves them.
Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import obstore
from obstore.store import S3Store

PART = 16 * 1024 * 1024
PARTS_IN_FLIGHT = 8


def store(endpoint: str, bucket: str) -> S3Store:
    return S3Store(
        bucket,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )


FILES_IN_FLIGHT = 96  # tether's object-store defaults for many files: connections ...
DOWNLOADS_IN_FLIGHT = 192  # ... and download_connections


async def put(s: S3Store, prefix: str, root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    gate = asyncio.Semaphore(FILES_IN_FLIGHT)

    async def one(path: Path) -> None:
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        async with gate:
            await obstore.put_async(s, key, path, chunk_size=PART, max_concurrency=PARTS_IN_FLIGHT)

    await asyncio.gather(*(one(p) for p in files))


async def get(s: S3Store, prefix: str, root: Path) -> None:
    keys = [meta["path"] for batch in obstore.list(s, prefix + "/") for meta in batch]
    gate = asyncio.Semaphore(DOWNLOADS_IN_FLIGHT)

    async def one(key: str) -> None:
        dest = root / key[len(prefix) + 1 :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        async with gate:
            result = await obstore.get_async(s, key)
            with open(dest, "wb") as f:
                async for chunk in result.stream(min_chunk_size=PART):
                    f.write(chunk)

    await asyncio.gather(*(one(k) for k in keys))


def main(argv: list[str]) -> int:
    op, endpoint, bucket, prefix, local = argv
    s = store(endpoint, bucket)
    root = Path(local)
    if op == "put":
        asyncio.run(put(s, prefix, root))
    elif op == "get":
        root.mkdir(parents=True, exist_ok=True)
        asyncio.run(get(s, prefix, root))
    else:
        raise SystemExit(f"unknown operation {op!r} (put or get)")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Skip interpreter teardown: obstore's runtime threads sometimes abort (SIGABRT, no message)
    # while Python finalises after asyncio.run; the work is complete and files are closed here.
    sys.stdout.flush()
    os._exit(code)
