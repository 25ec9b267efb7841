"""Per-worker private memory (USS) of StoreIterableDataset with many tiny records.

Setup (the issue's): 1,000,000 tiny records (one 0-dim int64 tensor each), a shuffled
StoreIterableDataset, a StoreDataLoader with 4 persistent workers, 3 epochs. The USS (unique
set size: pages only that process maps, as psutil reports it) of every worker is sampled at
the middle and at the end of each epoch. Flat numbers across epochs show that nothing
accumulates; comparing with ``--records 200000`` shows that nothing grows with the store.
Most of a worker's USS is the parent's memory copied on write as the worker runs (Python's
cycle collector writes to every object it visits); ``--gc-freeze`` calls ``gc.freeze()``
before the workers fork, which keeps the collector off those pages.

The store is written once under ``--dir`` and reused by later runs (writing 1M records takes
a few minutes).

Usage::

    python benchmarks/dataset_memory.py [--records 1000000] [--workers 4] [--epochs 3] \\
        [--dir /tmp/tspt-bench] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

import tensorstore_pt as tspt
from tensorstore_pt import StoreDataLoader, StoreIterableDataset

MiB = 2**20


def uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/tspt-bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="call gc.freeze() before the workers fork, so that the collector does not copy the parent's pages",
    )
    args = parser.parse_args(argv)

    path = args.dir / f"tiny-{args.records}"
    if not (path / "index.json").exists():
        t0 = time.perf_counter()
        tspt.write_store((torch.tensor(i) for i in range(args.records)), path, mode="overwrite")
        print(f"wrote {args.records} records in {time.perf_counter() - t0:.0f} s", flush=True)
    info = tspt.open_store(path).info()
    print(f"store: {info.records} records, {info.shards} shards, {info.file_bytes / MiB:.1f} MiB", flush=True)

    main_before = uss(os.getpid())
    ds = StoreIterableDataset(path, shuffle=True, seed=0)
    main_after = uss(os.getpid())
    if args.gc_freeze:
        gc.freeze()
    loader = StoreDataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=True)
    batches_per_epoch = len(loader)
    samples: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        delivered = 0
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            delivered += batch.numel()
            if i == batches_per_epoch // 2:
                samples.append(_sample(loader, epoch, "mid"))
        samples.append(_sample(loader, epoch, "end"))
        if delivered != info.records:
            raise RuntimeError(f"epoch {epoch} delivered {delivered} samples, expected {info.records}")
        print(
            f"epoch {epoch}: {delivered} samples in {time.perf_counter() - t0:.0f} s; worker USS MiB "
            f"mid {samples[-2]['worker_uss_mib']} end {samples[-1]['worker_uss_mib']}",
            flush=True,
        )
    result = {
        "records": info.records,
        "workers": args.workers,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "gc_freeze": args.gc_freeze,
        "block_records": ds.block_records,
        "window_records": ds.window_records,
        "shared_table_mib": round(info.records * 32 / MiB, 1),
        "main_uss_mib_before_dataset": round(main_before / MiB, 1),
        "main_uss_mib_after_dataset": round(main_after / MiB, 1),
        "samples": samples,
        "max_worker_uss_mib": max(max(s["worker_uss_mib"]) for s in samples),
        "seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _sample(loader: StoreDataLoader, epoch: int, when: str) -> dict[str, Any]:
    workers = loader._iterator._workers  # type: ignore[union-attr]  # persistent workers
    return {
        "epoch": epoch,
        "when": when,
        "worker_uss_mib": [round(uss(w.pid) / MiB, 1) for w in workers],
        "main_uss_mib": round(uss(os.getpid()) / MiB, 1),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
