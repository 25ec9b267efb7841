"""Micro benchmark: fastload.fast_loads vs torch.load(weights_only=True), one core.

Each case is a pool of distinct torch.save buffers of one structure (fresh random values,
random labels), the way a store's records look. Case e varies what the pickle holds too
(tensor length, label, id string), so every record has its own pickle and zip layout.
Every round loads the whole pool once with each loader, interleaved, and records the
per-sample time; the result is the median over rounds. Time is the thread's CPU time by
default (``--clock cpu``): on a shared machine, wall time mostly measures the scheduler.
All loaders run in this process one after the other, so the ratio is the number to read.
No timing assertions anywhere: this script only prints.

Loaders:
  torch.load   torch.load(io.BytesIO(buf), weights_only=True)
  fast         fast_loads(buf) with its caches warm (layout pattern and pickle plan known,
               as after the first records of a store; for case e: pickle skeleton known)
  fast cold    fast_loads(buf) after clearing those caches before every call (first sight:
               full zip parse and pickle interpretation)
  fast bytearray  fast_loads(bytearray) for case (d): no copy of the storage

Run: python benchmarks/fastload_micro.py [--rounds 15] [--pool 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from tensorstore_pt import fastload
from tensorstore_pt.fastload import fast_loads


def saved(sample: Any) -> bytes:
    """``torch.save``'s bytes of ``sample``."""
    buf = io.BytesIO()
    torch.save(sample, buf)
    return buf.getvalue()


def make_cases(pool: int) -> dict[str, list[bytes]]:
    g = torch.Generator().manual_seed(0)
    return {
        "a: 128 float32": [saved(torch.randn(128, generator=g)) for _ in range(pool)],
        "b: dict of 3 tensors": [
            saved(
                {
                    "x": torch.randn(16, generator=g),
                    "ids": torch.randint(0, 1000, (4,), generator=g),
                    "mask": torch.rand(16, generator=g) > 0.5,
                }
            )
            for _ in range(pool)
        ],
        "c: (8x8 uint8, int64 label)": [
            saved(
                (
                    torch.randint(0, 256, (8, 8), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (), generator=g),
                )
            )
            for _ in range(pool)
        ],
        "d: 16 MiB float32": [saved(torch.randn(4 * 2**20, generator=g)) for _ in range(2)],
        "e: varying length, label, id": [
            saved(
                {
                    "tokens": torch.randint(0, 30000, (int(torch.randint(20, 200, (), generator=g)),), generator=g),
                    "label": int(torch.randint(0, 200, (), generator=g)),
                    "id": f"sample-{i:06d}",
                }
            )
            for i in range(pool)
        ],
    }


#: The clocks a run can time with: CPU time of this thread, or wall time.
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def per_item_us(clock: Callable[[], float], fn: Callable[[Any], Any], items: list[Any]) -> float:
    """Microseconds of ``clock`` per call of ``fn`` over ``items`` (one pass)."""
    t0 = clock()
    for x in items:
        fn(x)
    return (clock() - t0) / len(items) * 1e6


def _cold(buf: bytes) -> Any:
    fastload._reset_caches()
    return fast_loads(buf)


def run(rounds: int, pool: int, clock: str = "cpu") -> dict[str, dict[str, float]]:
    timer = CLOCKS[clock]
    torch.set_num_threads(1)
    results: dict[str, dict[str, float]] = {}
    for name, bufs in make_cases(pool).items():
        big = name.startswith("d")
        loaders: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
            "torch.load": (lambda b: torch.load(io.BytesIO(b), weights_only=True), bufs),
            "fast": (fast_loads, bufs),
            "fast cold": (_cold, bufs),
        }
        if big:
            arrays = [[bytearray(b) for b in bufs] for _ in range(rounds + 1)]
            loaders["fast bytearray"] = (fast_loads, [])
        for b in bufs:  # warm up: torch's lazy imports, fastload's tables
            fast_loads(b)
            torch.load(io.BytesIO(b), weights_only=True)
        times: dict[str, list[float]] = {k: [] for k in loaders}
        for r in range(rounds):
            for label, (fn, data) in loaders.items():
                if label == "fast bytearray":
                    data = arrays[r]  # a fresh buffer each time: fast_loads takes ownership
                if label in ("fast", "fast bytearray"):
                    for _ in range(fastload._COMPILE_AFTER):  # the cold loader cleared the caches:
                        for b in bufs[:2]:  # refill them as the first records of a store do
                            fast_loads(b)
                times[label].append(per_item_us(timer, fn, data))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = med
        base = med["torch.load"]
        print(f"\n{name}  ({len(bufs[0]):,} bytes per record, median of {rounds} rounds, {clock} time)")
        for label, us in med.items():
            ratio = "" if label == "torch.load" else f"   {base / us:6.1f}x torch.load"
            print(f"  {label:15s} {us:10.1f} us/sample  {1e6 / us:12,.0f} samples/s{ratio}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pool", type=int, default=64, help="distinct buffers per small case")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="thread CPU time or wall time")
    parser.add_argument("--json", help="also write the medians (us per sample) to this file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, 1 thread")
    results = run(args.rounds, args.pool, args.clock)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "clock": args.clock, "us_per_sample": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
