"""Micro benchmark: container-free records (_ptzip) against torch.save and a memory copy, one core.

Each case is a pool of distinct torch.save buffers of one structure (fresh random values),
the way a store's records look. Every round runs each operation over the whole pool,
interleaved, and records the time per record; the result is the median over rounds.
Time is the thread's CPU time by default (``--clock cpu``): on a shared machine, wall time
mostly measures the scheduler. No timing assertions: this script only prints.

Operations:
  torch.save      torch.save(sample, io.BytesIO()) and getvalue(): what a writer does today
  memcpy          bytes(memoryview(buf)): one copy of the whole buffer into new memory, the floor
  split           _ptzip.split(buf)
  rebuild         _ptzip.rebuild(parts) (templates warm, as after a store's first records)
  split+rebuild   both
  prove           _ptzip.prove(buf): split, rebuild, compare (what the writer pays per record)
  meta->bytes     decode_meta(meta, storages, layout) then rebuild: what read_bytes pays
  dumps           tensorstore_pt.serialization.dumps(sample): what a writer pays per record (check,
                  compact, torch.save; or, for a plain shape seen before, its proved save
                  template around the sample's storages: the same bytes)

Cases: digits (8x8 uint8 image, 0-dim int64 label), patch (3x64x64 uint8, 0-dim label),
4 MiB float32 (a 1-D tensor of 2**20 values), and patches with Python int labels of 1000
classes (1000 records, whatever ``--pool``).

Run: python benchmarks/ptzip_micro.py [--rounds 15] [--pool 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from tensorstore_pt import _ptzip, serialization

from benchmarks.fastload_micro import CLOCKS, per_item_us, saved


def make_cases(pool: int) -> dict[str, list[Any]]:
    g = torch.Generator().manual_seed(0)
    return {
        "digits: (8x8 uint8, label)": [
            (torch.randint(0, 17, (8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (), generator=g))
            for _ in range(pool)
        ],
        "patch: (3x64x64 uint8, label)": [
            (
                torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (), generator=g),
            )
            for _ in range(pool)
        ],
        "4 MiB float32": [torch.randn(2**20, generator=g) for _ in range(min(pool, 4))],
        # Python int labels of 1000 classes, each once: a template per label value would not fit
        # the template cache (512 shapes); the label's value is patched into one template instead.
        "patch, 1000 int classes: {image, label}": [
            {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g), "label": int(c)}
            for c in torch.randperm(1000, generator=g)
        ],
    }


def run(rounds: int, pool: int, clock_name: str = "cpu") -> dict[str, dict[str, float]]:
    clock = CLOCKS[clock_name]
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    for name, samples in make_cases(pool).items():
        bufs = [saved(s) for s in samples]
        parts = [_ptzip.prove(b) for b in bufs]
        if any(p is None for p in parts):
            raise SystemExit(f"{name}: a buffer did not prove; nothing to measure")
        metas = [(_ptzip.encode_meta(p), b"".join(bytes(s) for s in p.storages), p.layout) for p in parts]
        ops: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
            "torch.save": (saved, samples),
            "memcpy": (lambda b: bytes(memoryview(b)), bufs),
            "split": (_ptzip.split, bufs),
            "rebuild": (_ptzip.rebuild, parts),
            "split+rebuild": (lambda b: _ptzip.rebuild(_ptzip.split(b)), bufs),
            "prove": (_ptzip.prove, bufs),
            "meta->bytes": (lambda m: _ptzip.rebuild(_ptzip.decode_meta(*m)), metas),
            "dumps": (serialization.dumps, samples),
        }
        if [serialization.dumps(s) for s in samples] != bufs:
            raise SystemExit(f"{name}: dumps did not give torch.save's bytes")
        for fn, items in ops.values():  # warm up: templates, torch's lazy imports
            fn(items[0])
        times: dict[str, list[float]] = {k: [] for k in ops}
        for _ in range(rounds):
            for label, (fn, items) in ops.items():
                times[label].append(per_item_us(clock, fn, items))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = med
        meta_bytes = len(metas[0][0]) - len(parts[0].pickle)
        print(
            f"\n{name}  ({len(bufs[0]):,} bytes per record: pickle {len(parts[0].pickle)}, storages "
            f"{parts[0].storage_bytes:,}, meta header {meta_bytes}; median of {rounds} rounds, {clock_name} time)"
        )
        save, copy = med["torch.save"], med["memcpy"]
        for label, us in med.items():
            print(f"  {label:14s} {us:10.2f} us/record   {us / save:7.3f}x torch.save   {us / copy:7.2f}x memcpy")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pool", type=int, default=64, help="distinct records per small case")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="thread CPU time or wall time")
    parser.add_argument("--json", help="also write the medians (us per record) to this file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, 1 thread")
    results = run(args.rounds, args.pool, args.clock)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "clock": args.clock, "us_per_record": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
