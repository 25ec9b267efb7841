"""How well StoreIterableDataset's shuffle separates records that are neighbours in the store.

For a store layout (records, shard size, block and window sizes, as the dataset picks them
by default for the record size given), this computes the epoch order and reports:

- ``neighbour distance``: for store neighbours (i, i+1), how many positions apart they are
  in the epoch order (median, mean, 10th percentile), and the fraction that land in the same
  batch of ``--batch-size`` (distance < batch size);
- ``blocks per batch``: distinct blocks among the samples of a batch (a full shuffle of a
  large store gives about ``batch_size``);
- ``displacement``: ``|position - record| / N`` (about 1/3 for a full shuffle, 0 unshuffled).

Pure numpy; no store is written. Usage::

    python benchmarks/dataset_shuffle_quality.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tensorstore_pt._partition import BlockLayout, EpochOrder
from tensorstore_pt.dataset import default_block_window

# (name, records, compressed bytes a record, records a shard)
CASES = [
    ("tiny records (1M x ~600 B)", 1_000_000, 600, 100_000),
    ("medium records (100k x 3x64x64 uint8, ~11 KiB)", 100_000, 11_600, 5_500),
    ("large records (20k x ~600 KiB)", 20_000, 600 * 1024, 100),
]


def measure(records: int, record_bytes: int, shard_records: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    block, window = default_block_window(records, records * record_bytes)
    first = np.arange(0, records, shard_records, dtype=np.int64)
    bounds = np.stack([first, np.minimum(first + shard_records, records)], axis=1)
    layout = BlockLayout.build(bounds, block, window)
    order = EpochOrder(layout, shuffle=True, seed=seed, epoch=0).all_records()
    pos = np.empty_like(order)
    pos[order] = np.arange(records)
    dist = np.abs(np.diff(pos))
    block_of = np.repeat(np.arange(len(layout.starts)), layout.lengths)
    nb = records // batch_size
    per_batch = block_of[order[: nb * batch_size]].reshape(nb, batch_size)
    distinct = np.array([len(np.unique(r)) for r in per_batch[: min(nb, 2000)]])
    return {
        "records": records,
        "block_records": block,
        "window_records": window,
        "neighbour_distance_median": float(np.median(dist)),
        "neighbour_distance_mean": float(dist.mean()),
        "neighbour_distance_p10": float(np.percentile(dist, 10)),
        "neighbours_in_same_batch": float((dist < batch_size).mean()),
        "blocks_per_batch_mean": float(distinct.mean()),
        "displacement_mean_over_n": float(np.abs(pos - np.arange(records)).mean() / records),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {}
    for name, n, rb, sr in CASES:
        r = measure(n, rb, sr, args.batch_size)
        results[name] = r
        print(
            f"{name}: block {r['block_records']}, window {r['window_records']}; neighbour distance median "
            f"{r['neighbour_distance_median']:.0f}, mean {r['neighbour_distance_mean']:.0f}, p10 "
            f"{r['neighbour_distance_p10']:.0f}; same batch {100 * r['neighbours_in_same_batch']:.2f}%; "
            f"blocks per batch of {args.batch_size}: {r['blocks_per_batch_mean']:.1f}; displacement/N "
            f"{r['displacement_mean_over_n']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
