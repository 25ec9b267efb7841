"""Samples/s of the datasets on medium records, through a DataLoader.

Records: a 3x64x64 uint8 image patch (smooth gradients plus noise, so zstd has work to do)
and an int64 label. Each configuration runs one untimed warm-up epoch, then ``--repeats``
timed epochs over the same persistent workers, interleaved with the other configurations'
(so that load from elsewhere on the machine falls on all of them alike); the median is
reported, with the CPU time of all its processes per sample, and the ratios are against
baselines measured in the same run:

- ``iterable_w2 / iterable_w0``  (target >= 1.8 on a 2-core machine)
- ``iterable_w0 / map_seq_w0`` and ``iterable_w2 / map_seq_w2`` (target >= 1.0)

Also measured: the shuffled iterable dataset; the shared-memory batch ring against torch's
own transport (``StoreDataLoader(..., batch_ring=False)``: one new shared-memory segment per
batch tensor, sent as a file descriptor); and the cost of an order that does not depend on
num_workers (chunks of one batch dealt round-robin) against workers that each read long
contiguous runs (chunks of 32 batches; the order then depends on num_workers), both with
torch's transport (a plain DataLoader cannot use the ring).

The machine's own ceiling is measured in the same run: the speedup of two processes over one
on a pure-Python loop (``machine_2proc_speedup``). On a dedicated 2-core machine it is about
2.0; on a shared or throttled one it is lower, and ``iterable_w2 / iterable_w0`` cannot exceed
it, so the report also gives the ratio divided by the ceiling. Each configuration also reports
how many cores it kept busy (CPU seconds of all its processes per wall second): 0 workers
keeps more than one busy (the decode thread), so at equal CPU per sample the 2-worker ratio is
at most ``machine_2proc_speedup / cores_busy(iterable_w0)``, also reported.

Usage::

    python benchmarks/dataset_throughput.py [--records 6000] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, SequentialSampler

import tensorstore_pt as tspt
from tensorstore_pt import StoreDataLoader, StoreDataset, StoreIterableDataset


def patches(n: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (uint8 [3, 64, 64] smooth patch with noise, 0-dim int64 label ``i % 10``) pairs."""
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(-2, 2, size=3)
        base = 128 + 40 * np.sin(a * xx / 16 + b * yy / 16 + c)
        patch = np.stack([base + rng.normal(0, 6, base.shape) + 15 * k for k in range(3)])
        yield torch.from_numpy(np.clip(patch, 0, 255).astype(np.uint8)), torch.tensor(i % 10)


def make_records(n: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    for image, label in patches(n, np.random.default_rng(seed)):
        yield {"image": image, "label": label}


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i
    return time.perf_counter() - t0


def machine_speedup(n: int = 5_000_000, repeats: int = 3) -> float:
    """Median speedup of 2 processes over 1 on a pure-Python loop (2.0 = two free cores)."""
    ctx = multiprocessing.get_context("fork")
    out = []
    with ctx.Pool(2) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            _spin(n)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.map(_spin, [n, n])
            two = time.perf_counter() - t0
            out.append(2 * one / two)
    return statistics.median(out)


class TimedLoader:
    """One loader, kept alive (persistent workers) across interleaved timed epochs: wall
    seconds and CPU seconds (this process and the loader's workers) per epoch.

    Args:
        loader: The loader; its first epoch (the warm-up, untimed) starts the workers.
        count: Samples in a batch (default: the length of its ``label`` tensor).
    """

    def __init__(self, loader: Any, count: Callable[[Any], int] = lambda b: b["label"].numel()) -> None:
        self.loader, self.count_of = loader, count
        self.count = self._epoch()  # warm-up: starts the workers
        self.times: list[float] = []
        self.cpu: list[float] = []

    def _pids(self) -> list[int]:
        it = getattr(self.loader, "_iterator", None)
        workers = getattr(it, "_workers", []) if it is not None else []
        return [os.getpid(), *(w.pid for w in workers)]

    def _epoch(self) -> int:
        return sum(self.count_of(b) for b in self.loader)

    def epoch(self) -> None:
        procs = [psutil.Process(p) for p in self._pids()]
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        t0 = time.perf_counter()
        got = self._epoch()
        self.times.append(time.perf_counter() - t0)
        self.cpu.append(sum(sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0)))
        if got != self.count:
            raise RuntimeError(f"an epoch delivered {got} samples, the warm-up {self.count}")


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

        def iterable(workers: int, shuffle: bool = False, ring: bool = True) -> Any:
            ds = StoreIterableDataset(path, shuffle=shuffle)
            kw = {"persistent_workers": True} if workers else {}
            return StoreDataLoader(ds, batch_size=bs, num_workers=workers, batch_ring=ring, **kw)

        def map_seq(workers: int) -> Any:
            ds = StoreDataset(path)
            kw = {"persistent_workers": True} if workers else {}
            return DataLoader(ds, batch_size=bs, sampler=SequentialSampler(ds), num_workers=workers, **kw)

        def coarse(workers: int) -> Any:
            ds = StoreIterableDataset(path, batch_size=32 * bs)  # long contiguous runs per worker
            return DataLoader(ds, batch_size=bs, num_workers=workers, persistent_workers=True)

        configs = {
            "iterable_w0": TimedLoader(iterable(0)),
            "iterable_w2": TimedLoader(iterable(2)),
            "map_seq_w0": TimedLoader(map_seq(0)),
            "map_seq_w2": TimedLoader(map_seq(2)),
            "iterable_shuffle_w2": TimedLoader(iterable(2, shuffle=True)),
            "iterable_torch_transport_w2": TimedLoader(iterable(2, ring=False)),
            "iterable_coarse_chunks_w2": TimedLoader(coarse(2)),
        }
        # Interleave the timed epochs, so that load from elsewhere falls on every configuration alike.
        ceiling = [machine_speedup()]
        for _ in range(args.repeats):
            for cfg in configs.values():
                cfg.epoch()
        ceiling.append(machine_speedup())
        load = os.getloadavg()

        results: dict[str, Any] = {
            "records": info.records,
            "batch_size": bs,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "loadavg_after": [round(x, 2) for x in load],
            "machine_2proc_speedup": [round(x, 2) for x in ceiling],
            "torch": torch.__version__,
            "samples_per_s": {},
            "cpu_ms_per_sample": {},
            "cores_busy": {},
        }
        for name, cfg in configs.items():
            median_s = statistics.median(cfg.times)
            results["samples_per_s"][name] = cfg.count / median_s
            results["cpu_ms_per_sample"][name] = 1000 * statistics.median(cfg.cpu) / cfg.count
            # CPU seconds per wall second: 1.0 = one core busy the whole epoch
            results["cores_busy"][name] = statistics.median(c / t for c, t in zip(cfg.cpu, cfg.times))
            print(
                f"{name:28s} {cfg.count / median_s:8.0f} samples/s  (median {median_s:.3f} s per epoch, "
                f"{results['cpu_ms_per_sample'][name]:.3f} CPU ms per sample, all processes, "
                f"{results['cores_busy'][name]:.2f} cores busy)",
                flush=True,
            )
        sps = results["samples_per_s"]
        results["ratios"] = {
            "iterable_w2 / iterable_w0": sps["iterable_w2"] / sps["iterable_w0"],
            "iterable_w0 / map_seq_w0": sps["iterable_w0"] / sps["map_seq_w0"],
            "iterable_w2 / map_seq_w2": sps["iterable_w2"] / sps["map_seq_w2"],
            "iterable_shuffle_w2 / iterable_w2": sps["iterable_shuffle_w2"] / sps["iterable_w2"],
            "iterable_w2 / iterable_torch_transport_w2": sps["iterable_w2"] / sps["iterable_torch_transport_w2"],
            "iterable_torch_transport_w2 / iterable_coarse_chunks_w2": sps["iterable_torch_transport_w2"]
            / sps["iterable_coarse_chunks_w2"],
        }
        results["ratios"]["(iterable_w2 / iterable_w0) / machine_2proc_speedup"] = results["ratios"][
            "iterable_w2 / iterable_w0"
        ] / statistics.mean(ceiling)
        # Two workers can at best keep both cores busy; 0 workers already keeps more than one busy
        # (its decode thread runs while the main thread collates, and zstd releases the GIL).
        # At equal CPU per sample, iterable_w2 / iterable_w0 cannot exceed this:
        results["ratios"]["ceiling at equal CPU a sample: machine_2proc_speedup / cores_busy(w0)"] = (
            statistics.mean(ceiling) / results["cores_busy"]["iterable_w0"]
        )
        for k, v in results["ratios"].items():
            print(f"{k:52s} {v:.2f}")
        print(f"machine 2-process speedup (before, after): {ceiling}")
        print(f"load average after the run: {load}")
        for cfg in configs.values():
            del cfg.loader
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
