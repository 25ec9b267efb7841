"""Bytes fetched and peak local disk of one epoch streamed through the node-local shard cache.

    python -m benchmarks.cache_epoch [--mib 32] [--shards 16] [--workers 2] [--s3]

The "remote" store is a local store (or, with ``--s3``, the same store uploaded to a moto S3
server on 127.0.0.1) behind a Storage wrapper that counts the shard bytes it serves (in a
file, so DataLoader workers add up). A thread samples the cache's usage (under its accounting
lock) every 2 ms. Prints one Markdown table row per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import tensorstore_pt as ts
from tensorstore_pt.cache import ShardCache
from tensorstore_pt.storage import LocalStorage, ReadHandle, Storage

from .storage_wrap import ForwardingHandle, ForwardingStorage


class _Counted(ForwardingHandle):
    def __init__(self, inner: ReadHandle, log: str) -> None:
        super().__init__(inner)
        self.log = log

    def read_range(self, offset: int, length: int) -> bytes:
        data = self.inner.read_range(offset, length)
        with open(self.log, "a") as f:
            f.write(f"{len(data)}\n")
        return data


class CountingStorage(ForwardingStorage):
    """A store that looks remote (whatever it wraps) and logs the shard bytes it serves."""

    def __init__(self, inner: Storage, log: Path) -> None:
        super().__init__(inner, f"counted+{inner.location}")
        self.log = str(log)

    def open(self, name: str) -> ReadHandle:
        h = self.inner.open(name)
        return _Counted(h, self.log) if name.endswith(".tspt") else h


def fetched(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


def run(store: Storage, work: Path, limit: int | None, shuffle: bool, workers: int, tag: str) -> dict[str, Any]:
    log = work / f"log-{tag}"
    cache_dir = work / f"cache-{tag}"
    remote = CountingStorage(store, log)
    ds = ts.StoreIterableDataset(remote, shuffle=shuffle, cache_dir=cache_dir, cache_limit_bytes=limit)
    opened = fetched(log)  # footers read while opening (not part of the epoch)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        cache = ShardCache(cache_dir)
        while not stop.is_set():
            peak[0] = max(peak[0], cache.usage_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    n = sum(len(b["x"]) for b in ts.StoreDataLoader(ds, batch_size=32, num_workers=workers))
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return {"records": n, "opened": opened, "epoch": fetched(log) - opened, "peak": peak[0], "s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--s3", action="store_true", help="read the store from a moto S3 server on 127.0.0.1")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tspt-cache-bench-"))
    store = work / "store"
    record_bytes = 16 * 2**10
    n = args.mib * 2**20 // record_bytes
    g = torch.Generator().manual_seed(0)
    ts.write_store(
        ({"x": torch.randint(0, 2**31, (record_bytes // 4,), generator=g, dtype=torch.int32)} for _ in range(n)),
        store,
        codec="none",
        max_shard_bytes=args.mib * 2**20 // args.shards,
    )
    index = ts.open_store(store).index
    total = sum(s.file_bytes for s in index.shards)
    largest = max(s.file_bytes for s in index.shards)
    source: Storage = LocalStorage(store)
    server = None
    if args.s3:
        source, server = _upload_to_moto(store)
    print(
        f"store: {n} records, {len(index.shards)} shards, {total} shard bytes (largest {largest}) at "
        f"{source.location}; {args.workers} workers"
    )
    print(
        "| shuffle | cache_limit_bytes | records | fetched at open (footers) | fetched in the epoch / store | peak cache disk | epoch s |"
    )
    print("|---|---|---|---|---|---|---|")
    for shuffle in (False, True):
        for limit in (None, max(total // 4, 2 * (2 + 1) * largest)):
            r = run(source, work, limit, shuffle, args.workers, f"{int(shuffle)}-{limit}")
            print(
                f"| {shuffle} | {limit if limit else 'none'} | {r['records']} | {r['opened']} | "
                f"{r['epoch']} ({r['epoch'] / total:.3f}x) | {r['peak']} ({r['peak'] / total:.2f}x store) | {r['s']:.2f} |"
            )
    if server is not None:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)


def _upload_to_moto(store: Path) -> tuple[Storage, Any]:
    """Start moto's S3 server on a free port of 127.0.0.1 and copy the store into a bucket."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from tensorstore_pt.storage import storage_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(var, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bench")
    for p in sorted(store.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            client.upload_file(str(p), "bench", f"store/{p.name}")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return storage_for("s3://bench/store", options), server


if __name__ == "__main__":
    main()
