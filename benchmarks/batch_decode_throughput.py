"""Samples/s of StoreDataLoader with batch decoding on and off, for four kinds of small records.

Kinds (deterministic stand-ins, zstd stores):

- ``small_dict``: ``{"input": float32[100], "target": int64 0-dim, "aux": float32[50]}``;
- ``small_tuple``: ``(uint8 8x8 image, int64 0-dim label)``, like sklearn's digits;
- ``tokens``: one int64 tensor of 10-100 token ids (variable length, so a list collate);
- ``medium``: ``(uint8 3x64x64 patch, int64 0-dim label)``.

For each kind, four loaders: ``num_workers`` 0 and 2, each with batch decoding as before this
change (the internal switch ``tensorstore_pt._shared_batches.BATCH_DECODE = "dicts"``: workers
decode plain dict-of-tensor batches in one go, the ``num_workers=0`` decode thread loads record
by record) and as now (``"all"``). Workers are persistent and keep the switch they were forked
with; each loader runs one untimed warm-up epoch (it also makes the decoder's plans), then
``--repeats`` timed epochs, interleaved with every other loader's, and the median is reported,
with the CPU time of all the loader's processes per sample (steadier than samples/s on a shared
machine, where other load changes wall time from one epoch to the next).

Usage::

    python benchmarks/batch_decode_throughput.py [--records 12000] [--repeats 5] [--json out.json]
    python benchmarks/batch_decode_throughput.py --compact   # and each kind from a compact store
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import default_collate

import tensorstore_pt as tspt
import tensorstore_pt._shared_batches as sb
from tensorstore_pt import StoreDataLoader, StoreIterableDataset

from benchmarks.dataset_throughput import TimedLoader, patches


def list_collate(batch: list[Any]) -> list[Any]:
    return list(batch)


def small_dict(n: int, rng: np.random.Generator) -> Iterator[Any]:
    for i in range(n):
        yield {
            "input": torch.from_numpy(rng.standard_normal(100).astype(np.float32)),
            "target": torch.tensor(i % 10),
            "aux": torch.from_numpy(rng.standard_normal(50).astype(np.float32)),
        }


def small_tuple(n: int, rng: np.random.Generator) -> Iterator[Any]:
    for i in range(n):
        yield torch.from_numpy(rng.integers(0, 17, (8, 8), dtype=np.uint8)), torch.tensor(i % 10)


def tokens(n: int, rng: np.random.Generator) -> Iterator[Any]:
    for _ in range(n):
        yield torch.from_numpy(rng.zipf(1.3, int(rng.integers(10, 101))).clip(0, 50_000).astype(np.int64))


KINDS: dict[str, tuple[Callable[[int, np.random.Generator], Iterator[Any]], Any, Callable[[Any], int], float]] = {
    # name: (records, collate, samples in a batch, share of --records)
    "small_dict": (small_dict, default_collate, lambda b: len(b["target"]), 1.0),
    "small_tuple": (small_tuple, default_collate, lambda b: len(b[1]), 1.0),
    "tokens": (tokens, list_collate, len, 1.0),
    "medium": (patches, default_collate, lambda b: len(b[1]), 0.25),
}


class _Config(TimedLoader):
    """A StoreDataLoader over ``path`` timed with ``sb.BATCH_DECODE`` set to ``mode``."""

    def __init__(
        self, path: Path, collate: Any, count: Callable[[Any], int], workers: int, mode: str, batch_size: int
    ) -> None:
        self.mode = mode
        sb.BATCH_DECODE = mode  # workers fork with it (persistent), num_workers=0 reads it per epoch
        kw = {"persistent_workers": True} if workers else {}
        ds = StoreIterableDataset(path)
        super().__init__(
            StoreDataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, **kw), count
        )

    def _epoch(self) -> int:
        sb.BATCH_DECODE = self.mode
        return super()._epoch()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    parser.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--compact",
        action="store_true",
        help="also read each kind from a compact store (format 1.3, columnar frames), batch decoding on, "
        "interleaved with the others; printed against 'after' (the zstd store, one record a frame)",
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    results: dict[str, Any] = {
        "records": args.records,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "samples_per_s": {},
        "cpu_us_per_sample": {},
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        configs: dict[str, _Config] = {}
        for kind in kinds:
            make, collate, count, share = KINDS[kind]
            path = Path(tmp) / kind
            n = max(1, int(args.records * share))
            data = list(make(n, np.random.default_rng(0)))
            tspt.write_store(data, path, codec="zstd")
            if args.compact:
                tspt.write_store(data, Path(tmp) / f"{kind}-compact", codec="zstd", compact=True)
            for workers in (0, 2):
                for label, mode in (("before", "dicts"), ("after", "all")):
                    configs[f"{kind} w{workers} {label}"] = _Config(
                        path, collate, count, workers, mode, args.batch_size
                    )
                if args.compact:
                    configs[f"{kind} w{workers} compact"] = _Config(
                        Path(tmp) / f"{kind}-compact", collate, count, workers, "all", args.batch_size
                    )
        sb.BATCH_DECODE = "all"
        for _ in range(args.repeats):
            for cfg in configs.values():
                cfg.epoch()
        sb.BATCH_DECODE = "all"
        sps, cpu = results["samples_per_s"], results["cpu_us_per_sample"]
        for name, cfg in configs.items():
            sps[name] = cfg.count / statistics.median(cfg.times)
            cpu[name] = 1e6 * statistics.median(cfg.cpu) / cfg.count  # all the loader's processes
        print(
            f"{'kind':12s} {'workers':>7s} {'samples/s before':>17s} {'after':>8s} {'ratio':>6s}   "
            f"{'CPU us/sample before':>21s} {'after':>6s}"
        )
        ratios: dict[str, float] = {}
        for kind in kinds:
            for workers in (0, 2):
                before, after = sps[f"{kind} w{workers} before"], sps[f"{kind} w{workers} after"]
                ratios[f"{kind} w{workers} after/before"] = after / before
                print(
                    f"{kind:12s} {workers:7d} {before:17.0f} {after:8.0f} {after / before:6.2f}   "
                    f"{cpu[f'{kind} w{workers} before']:21.1f} {cpu[f'{kind} w{workers} after']:6.1f}"
                )
            ratios[f"{kind} after: w0/w2"] = sps[f"{kind} w0 after"] / sps[f"{kind} w2 after"]
            if args.compact:
                for workers in (0, 2):
                    after, comp = sps[f"{kind} w{workers} after"], sps[f"{kind} w{workers} compact"]
                    ratios[f"{kind} w{workers} compact/after"] = comp / after
                    print(
                        f"{kind:12s} {workers:7d} {'compact store:':>17s} {comp:8.0f} {comp / after:6.2f}   "
                        f"{'':21s} {cpu[f'{kind} w{workers} compact']:6.1f}"
                    )
        results["ratios"] = ratios
        results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"load average after the run: {results['loadavg_after']}")
        for cfg in configs.values():
            del cfg.loader
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
