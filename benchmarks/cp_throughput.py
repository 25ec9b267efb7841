"""``tspt cp`` throughput: local -> local (the baseline), local -> S3, S3 -> local through
:class:`benchmarks.netproxy.NetProxy` with added first-byte latency, at 1 and N workers.

    python -m benchmarks.cp_throughput [--mb 64] [--repeats 3] [--latency-ms 0 50] [--workers 1 4]

S3 is moto's server on 127.0.0.1 (``moto[server]``), so absolute numbers say more about moto
than about S3; the latency rows show what parallel workers buy back when every request waits.
Each cell is the median of ``--repeats`` runs; ``ratio`` is against local -> local in the same
run. Every copy runs with ``verify=False`` (the copy's own checks on arrival stay on) so that
the numbers are the transfer alone. ``bytes down`` is what the proxy forwarded to the client
over the store's bytes (1.00x: every byte fetched once).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from typing import Callable

__all__ = ["main"]


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cp_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64, help="store size in MB of incompressible records (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is shown (default 3)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 50.0], help="added latencies (ms)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="worker counts")
    args = parser.parse_args(argv)

    import logging

    import boto3
    import torch
    from moto.server import ThreadedMotoServer

    from tensorstore_pt import copy_store, write_store

    from .netproxy import NetProxy

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    root = tempfile.mkdtemp(prefix="tspt-cp-bench-")
    try:
        src = os.path.join(root, "src")
        g = torch.Generator().manual_seed(0)
        n = max(1, args.mb * 10**6 // 2**20)
        records = ({"x": torch.randint(0, 2**31 - 1, (2**18,), generator=g, dtype=torch.int32)} for _ in range(n))
        write_store(records, src, codec="none", max_shard_bytes=4 * 2**20)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".tspt"))
        rows: list[tuple[str, int, float, str]] = []

        def local_copy(workers: int) -> None:
            dst = os.path.join(root, uuid.uuid4().hex)
            copy_store(src, dst, workers=workers, verify=False)
            shutil.rmtree(dst)

        base = _median_seconds(lambda: local_copy(4), args.repeats)
        rows.append(("local -> local", 4, base, ""))

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            keys = {"key": "testing", "secret": "testing"}
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            endpoint = f"http://127.0.0.1:{port}"
            boto3.client(
                "s3", endpoint_url=endpoint, region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing",
            ).create_bucket(Bucket="cp-bench")  # fmt: skip
            opts = {"endpoint_url": endpoint, **keys}

            def upload() -> None:
                copy_store(src, f"s3://cp-bench/{uuid.uuid4().hex}", dst_storage_options=opts, workers=4, verify=False)

            rows.append(("local -> s3", 4, _median_seconds(upload, args.repeats), ""))
            copy_store(src, "s3://cp-bench/store", dst_storage_options=opts, verify=False)
            for latency in args.latency_ms:
                with NetProxy("127.0.0.1", port, latency_ms=latency) as proxy:
                    via = {**opts, "endpoint_url": proxy.url}
                    for workers in args.workers:
                        proxy.reset_stats()

                        def download(workers: int = workers, via: dict = via) -> None:
                            dst = os.path.join(root, uuid.uuid4().hex)
                            copy_store(
                                "s3://cp-bench/store", dst, src_storage_options=via, workers=workers, verify=False
                            )
                            shutil.rmtree(dst)

                        seconds = _median_seconds(download, args.repeats)
                        stats = proxy.stats()
                        down = stats.bytes_down / args.repeats / size
                        note = (
                            f"{latency:g} ms/request, {stats.requests // args.repeats} requests, {down:.2f}x bytes down"
                        )
                        rows.append(("s3 -> local (proxy)", workers, seconds, note))
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"store: {size / 1e6:.1f} MB in 4 MiB shards, codec none; median of {args.repeats}")
    print(f"{'copy':<22}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'ratio':>7}  notes")
    for what, workers, seconds, note in rows:
        print(f"{what:<22}{workers:>8}{seconds:>9.2f}{size / seconds / 1e6:>8.1f}{base / seconds:>7.2f}  {note}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
