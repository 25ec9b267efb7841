"""End to end: reading small dict samples from a store against ``torch.load`` of the same records.

The samples are ``{"input": 100 float32, "target": 0-dim int64, "aux": 50 float32}`` (issue
14's case). One store per option (zstd-3 one record a frame, zstd-3 with 64 KiB frames, zstd-3
``compact``), each read whole through the public API (an ordered pass over the reader, each
sample dropped as it comes, as the baseline drops its own; footers included) from a warm page cache; the baseline is ``torch.load(io.BytesIO(raw),
weights_only=True)`` of every record's ``torch.save`` bytes, held in memory (no file I/O for
it at all). Every pass runs in this process, interleaved per round; the result is the median
over rounds of the per-sample CPU time of the thread (``time.thread_time``), and the ratio of
the baseline's to each store's. No timing assertions: this script only prints.

Run: python benchmarks/small_dict_e2e.py [--records 4000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tensorstore_pt as ts

OPTIONS = {
    "zstd-3": {},
    "zstd-3+frames": {"frame_target_bytes": 64 * 2**10},
    "zstd-3+compact": {"compact": True},
}


def samples(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"input": torch.randn(100, generator=g), "target": torch.tensor(i % 10), "aux": torch.randn(50, generator=g)}
        for i in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    data = samples(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        readers = {}
        for name, options in OPTIONS.items():
            ts.write_store(data, Path(tmp) / name, codec="zstd", level=3, **options)
            readers[name] = ts.open_store(Path(tmp) / name)
        raws = [readers["zstd-3"].read_bytes(i) for i in range(args.records)]
        sizes = {name: r.info().file_bytes for name, r in readers.items()}

        def baseline() -> None:
            for raw in raws:
                torch.load(io.BytesIO(raw), weights_only=True)

        def read_all(reader: ts.StoreReader) -> None:
            for _ in reader:  # each sample dropped as it comes, as the baseline drops its own
                pass

        passes = {"torch.load": baseline, **{name: (lambda r=r: read_all(r)) for name, r in readers.items()}}
        for fn in passes.values():  # warm-up: page cache, plans
            fn()
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.rounds):
            for name, fn in passes.items():
                start = time.thread_time()
                fn()
                times[name].append((time.thread_time() - start) / args.records)
    base = statistics.median(times["torch.load"])
    print(f"{args.records} records, median of {args.rounds} rounds, CPU us a sample (thread time):")
    print(f"  {'torch.load':<16} {base * 1e6:8.2f} us   x1.00")
    for name in OPTIONS:
        t = statistics.median(times[name])
        print(f"  {name:<16} {t * 1e6:8.2f} us   x{base / t:.2f} vs torch.load   {sizes[name]:,} bytes on disk")


if __name__ == "__main__":
    main()
