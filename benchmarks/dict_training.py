"""Bounded zstd dictionary training: training seconds and stored bytes vs the training sample.

For each kind (``medium``: 3x64x64 uint8 patches; ``small``: 8x8 digits), the records'
``torch.save`` bytes are the buffer a writer with ``dictionary=True`` collects (its first
``DICT_SAMPLE_BYTES``). Each row trains a 16 KiB dictionary (zstd level 3) and compresses every record with it:
"before" trains on the whole buffer with zstd's COVER parameter search (as the writer did
before the bound, timed once); the bounded rows train on an evenly spread sample of whole
records up to a byte cap with fixed COVER parameters (as ``shardio.train_dictionary`` does).
Printed: training seconds (median of ``--repeats``), stored bytes, and the gain over plain
zstd-3 (no dictionary) measured in the same run.

    python -m benchmarks.dict_training [--repeats 3] [--scale full]

No assertions: this script only prints (docs/benchmarks.md, "Raw frames and bounded
dictionary training").
"""

from __future__ import annotations

import argparse
import statistics
import time

import zstandard

from benchmarks.kinds import build_kind
from tensorstore_pt.serialization import dumps
from tensorstore_pt.shardio import DICT_TRAIN_D, DICT_TRAIN_K, DICT_TRAIN_RECORDS, dictionary_sample
from tensorstore_pt.writer import DICT_SAMPLE_BYTES

CAPS = (256 * 2**10, 2**20, 4 * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", default="full", choices=("full", "quick"))
    parser.add_argument("--kinds", default="medium,small")
    parser.add_argument("--copies", type=int, default=4, help="repeat the kind's records (distinct seeds)")
    args = parser.parse_args()
    for name in args.kinds.split(","):
        raws: list[bytes] = []
        for seed in range(args.copies):
            raws += [dumps(s) for s in build_kind(name, args.scale, seed=seed).samples]
        buffered, total = [], 0
        for r in raws:  # what the writer buffers before it trains
            if total >= DICT_SAMPLE_BYTES:
                break
            buffered.append(r)
            total += len(r)
        plain_c = zstandard.ZstdCompressor(level=3)
        plain = sum(len(plain_c.compress(r)) for r in raws)
        print(
            f"\n{name}: {len(raws)} records, {sum(map(len, raws)) / 1e6:.1f} MB; buffer {len(buffered)} records "
            f"{total / 1e6:.1f} MB; zstd-3 without dictionary: {plain:,} bytes"
        )
        rows = [("before: whole buffer, COVER search", buffered, {}, 1)]
        rows += [
            (f"bounded {cap // 1024} KiB, k={DICT_TRAIN_K} d={DICT_TRAIN_D}",
             dictionary_sample(buffered, cap, DICT_TRAIN_RECORDS), {"k": DICT_TRAIN_K, "d": DICT_TRAIN_D}, args.repeats)
            for cap in CAPS
        ]  # fmt: skip
        for label, sample, params, repeats in rows:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                d = zstandard.train_dictionary(16 * 2**10, sample, level=3, threads=-1, **params)
                times.append(time.perf_counter() - t0)
            c = zstandard.ZstdCompressor(level=3, dict_data=d)
            stored = sum(len(c.compress(r)) for r in raws) + len(d.as_bytes())
            print(
                f"  {label:38s}: {len(sample):5d} records {sum(map(len, sample)) / 1e6:6.2f} MB, "
                f"train {statistics.median(times):6.2f} s, stored {stored:,} bytes, gain {1 - stored / plain:6.1%}"
            )


if __name__ == "__main__":
    main()
