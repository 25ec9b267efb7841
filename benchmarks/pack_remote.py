"""Packing straight into an object store: seconds of ``write_store(samples, "s3://...")`` for
``num_workers`` 0 and 2, through the same endpoint as :mod:`benchmarks.remote` (moto's S3
server on 127.0.0.1 behind :mod:`benchmarks.netproxy`: 50 ms a request, 100 MiB/s).

Usage (from the repository root)::

    python -m benchmarks.pack_remote [--records 4096] [--repeats 3] [--latency-ms 50] [--bandwidth-mib 100]

Method: the ``medium`` kind (:mod:`benchmarks.kinds`, 3x64x64 uint8 patches with int labels)
is built once, scaled to ``--records``; each run packs it with zstd and 8 MiB shards into a new
prefix of one bucket, from the first sample handed over until ``index.json`` is committed
(uploads included), in this process (imports and the S3 client are warm after the first run:
that one is not counted). Worker counts run interleaved; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.pack_remote")
    parser.add_argument("--records", type=int, default=4096, help="medium records to pack (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count, median reported (default 3)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added to every request (default 50)")
    parser.add_argument("--bandwidth-mib", type=float, default=100.0, help="bandwidth cap, MiB/s (default 100)")
    args = parser.parse_args(argv)

    import tensorstore_pt as ts

    from .pack_parallel import medium_samples
    from .remote import BUCKET, CREDENTIALS, _Endpoint

    os.environ.update(CREDENTIALS)
    samples = medium_samples(args.records)
    endpoint = _Endpoint(args.latency_ms, int(args.bandwidth_mib * 2**20) if args.bandwidth_mib else None)
    options = {
        "endpoint_url": endpoint.url,
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    times: dict[int, list[float]] = {0: [], 2: []}
    try:
        for rep in range(args.repeats + 1):
            for workers in times:
                start = time.perf_counter()
                info = ts.write_store(
                    samples,
                    f"s3://{BUCKET}/pack-{rep}-w{workers}",
                    codec="zstd",
                    max_shard_bytes=8 * 2**20,
                    num_workers=workers,
                    storage_options=options,
                )
                seconds = time.perf_counter() - start
                if rep:  # the first round warms imports and the client
                    times[workers].append(seconds)
                    print(f"  num_workers={workers} run {rep}: {seconds:.2f} s", file=sys.stderr)
    finally:
        endpoint.close()
    print(
        f"medium records: {args.records:,} into {info.shards} shards of s3:// ({info.file_bytes:,} bytes); "
        f"{args.latency_ms:g} ms a request, {args.bandwidth_mib:g} MiB/s"
    )
    for workers, runs in times.items():
        print(
            f"num_workers={workers}: median {statistics.median(runs):.2f} s (runs {' '.join(f'{x:.2f}' for x in runs)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
