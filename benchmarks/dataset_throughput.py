"""Samples/s of the datasets on medium records, through a DataLoader.

Records: a 3x64x64 uint8 image patch (smooth gradients plus noise, so zstd has work to do)
and an int64 label. Each configuration runs one untimed warm-up epoch, then ``--repeats``
timed epochs over the same persistent workers; the median is reported, and the ratios are
against baselines measured in the same run:

- ``iterable_w2 / iterable_w0``  (target >= 1.8 on a 2-core machine)
- ``iterable_w0 / map_seq_w0`` and ``iterable_w2 / map_seq_w2`` (target >= 1.0)

Also measured: the shuffled iterable dataset, and the cost of an order that does not depend
on num_workers (chunks of one batch dealt round-robin) against workers that each read long
contiguous runs (chunks of 32 batches; the order then depends on num_workers).

Usage::

    python benchmarks/dataset_throughput.py [--records 6000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

import tensorstore_pt as tspt
from tensorstore_pt import StoreDataLoader, StoreDataset, StoreIterableDataset


def make_records(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(-2, 2, size=3)
        base = 128 + 40 * np.sin(a * xx / 16 + b * yy / 16 + c)
        patch = np.stack([base + rng.normal(0, 6, base.shape) + 15 * k for k in range(3)])
        yield {"image": torch.from_numpy(np.clip(patch, 0, 255).astype(np.uint8)), "label": torch.tensor(i % 10)}


def run_epochs(make_loader: Callable[[], Any], repeats: int) -> tuple[float, int]:
    loader = make_loader()
    count = sum(b["label"].numel() for b in loader)  # warm-up (starts persistent workers)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = sum(b["label"].numel() for b in loader)
        times.append(time.perf_counter() - t0)
        if got != count:
            raise RuntimeError(f"an epoch delivered {got} samples, the warm-up {count}")
    del loader
    return statistics.median(times), count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "medium"
        t0 = time.perf_counter()
        info = tspt.write_store(make_records(args.records), path, codec="zstd")
        print(
            f"store: {info.records} records, {info.shards} shards, raw {info.raw_bytes / 2**20:.1f} MiB, "
            f"files {info.file_bytes / 2**20:.1f} MiB (ratio {info.ratio:.2f}), "
            f"written in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        bs = args.batch_size
        loaders: dict[str, Callable[[], Any]] = {}

        def iterable(workers: int, shuffle: bool = False) -> Callable[[], Any]:
            def make() -> Any:
                ds = StoreIterableDataset(path, shuffle=shuffle)
                kw = {"persistent_workers": True} if workers else {}
                return _Repeat(StoreDataLoader(ds, batch_size=bs, num_workers=workers, **kw), ds)

            return make

        def map_seq(workers: int) -> Callable[[], Any]:
            def make() -> Any:
                ds = StoreDataset(path)
                kw = {"persistent_workers": True} if workers else {}
                return DataLoader(ds, batch_size=bs, sampler=SequentialSampler(ds), num_workers=workers, **kw)

            return make

        def coarse(workers: int) -> Callable[[], Any]:
            def make() -> Any:
                ds = StoreIterableDataset(path, batch_size=32 * bs)  # long contiguous runs per worker
                return DataLoader(ds, batch_size=bs, num_workers=workers, persistent_workers=True)

            return make

        loaders["iterable_w0"] = iterable(0)
        loaders["iterable_w2"] = iterable(2)
        loaders["map_seq_w0"] = map_seq(0)
        loaders["map_seq_w2"] = map_seq(2)
        loaders["iterable_shuffle_w2"] = iterable(2, shuffle=True)
        loaders["iterable_coarse_chunks_w2"] = coarse(2)

        results: dict[str, Any] = {
            "records": info.records,
            "batch_size": bs,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "samples_per_s": {},
        }
        for name, make in loaders.items():
            median_s, count = run_epochs(make, args.repeats)
            results["samples_per_s"][name] = count / median_s
            print(f"{name:28s} {count / median_s:10.0f} samples/s  (median {median_s:.3f} s per epoch)", flush=True)
        sps = results["samples_per_s"]
        results["ratios"] = {
            "iterable_w2 / iterable_w0": sps["iterable_w2"] / sps["iterable_w0"],
            "iterable_w0 / map_seq_w0": sps["iterable_w0"] / sps["map_seq_w0"],
            "iterable_w2 / map_seq_w2": sps["iterable_w2"] / sps["map_seq_w2"],
            "iterable_shuffle_w2 / iterable_w2": sps["iterable_shuffle_w2"] / sps["iterable_w2"],
            "iterable_w2 / iterable_coarse_chunks_w2": sps["iterable_w2"] / sps["iterable_coarse_chunks_w2"],
        }
        for k, v in results["ratios"].items():
            print(f"{k:42s} {v:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


class _Repeat:
    """A StoreDataLoader iterated once per epoch (it advances epochs by itself)."""

    def __init__(self, loader: StoreDataLoader, ds: StoreIterableDataset) -> None:
        self.loader, self.ds = loader, ds

    def __iter__(self):
        return iter(self.loader)


if __name__ == "__main__":
    main(sys.argv[1:])
