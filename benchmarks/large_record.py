"""Large records: a 16 MiB record's full read vs the bare decompression of its frame.

Target (issue "fast path", part 4): ``reader[i]`` (pread + xxh3_64 check + decode into a
preallocated buffer + tensors built over it) within 1.25 x a bare one-shot
``zstandard.ZstdDecompressor().decompress(frame)`` of the same frame, medians of repeated
runs measured in the same process.

    python benchmarks/large_record.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import zstandard

import tensorstore_pt as ts


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    # 16 MiB of float32 with some structure (zstd gets ~1.1-1.2x on it, like real activations).
    record = (torch.randn(4 * 2**20, generator=g) * 0.1).to(torch.float16).to(torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        ts.write_store([record], path, codec="zstd")
        reader = ts.open_store(path)
        row = reader._footer(0).table[0]
        frame = (path / reader.index.shards[0].name).read_bytes()[
            int(row["offset"]) : int(row["offset"] + row["stored"])
        ]
        dctx = zstandard.ZstdDecompressor()
        assert torch.equal(reader[0], record)
        bare = _median_s(lambda: dctx.decompress(frame), args.repeats)
        read = _median_s(lambda: reader[0], args.repeats)
    print(f"record: {record.numel() * 4 / 2**20:.0f} MiB float32, frame {len(frame) / 2**20:.1f} MiB (zstd-3)")
    print(f"bare zstd decompress (median of {args.repeats}): {bare * 1e3:.2f} ms")
    print(f"reader[0] full read  (median of {args.repeats}): {read * 1e3:.2f} ms")
    print(f"ratio: {read / bare:.2f} x (target <= 1.25 x)")


if __name__ == "__main__":
    main()
