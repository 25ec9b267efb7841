"""Shuffled epochs of the iterable dataset over compact stores, per kind, across checkouts.

Each kind is built as the harness builds it and packed once, compact (``compact=True``, zstd-3,
shards of a sixth of the kind's raw payload, as ``benchmarks.pack_compact`` packs; the harness
sizes each system's shards itself), by the checkout this script runs from. Then
for every round, kind, worker count and checkout, a fresh process imports ``tensorstore_pt``
from that checkout and times ``epochs`` shuffled epochs of
``StoreDataLoader(StoreIterableDataset(store, shuffle=True, seed=0), batch_size=32,
collate_fn=list)`` (each epoch after ``set_epoch(e)``, persistent workers), the harness's
``loader`` op; it reports the median samples/s of the epochs after the first two (which start
the workers and warm the caches). Rounds interleave checkouts, so a busy moment of the machine
hits all of them alike; the result is the median over rounds. To compare before and after a
change, pass an older checkout too (``git worktree add /tmp/before <commit>``): the stores are
format 1.3, which any checkout since compact stores reads. No timing assertions: this script
only prints.

Run: python -m benchmarks.loader_compact [--kinds small,tokens,embed,medium,large,state]
     [--workers 0,2] [--rounds 3] [--epochs 7] [--trees /tmp/before,.]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import statistics, sys, time
sys.path.insert(0, sys.argv[1])
from tensorstore_pt import StoreDataLoader, StoreIterableDataset
store, workers, epochs = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ds = StoreIterableDataset(store, shuffle=True, seed=0)
loader = StoreDataLoader(ds, batch_size=32, num_workers=workers, persistent_workers=workers > 0, collate_fn=list)
rates = []
for epoch in range(epochs):
    ds.set_epoch(epoch)
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in loader)
    rates.append(n / (time.perf_counter() - t0))
print(statistics.median(rates[2:]), n)
"""


def pack(kind_name: str, path: Path) -> int:
    """Pack ``kind_name`` compact at ``path``, shards of a sixth of its raw payload; its record count."""
    from benchmarks.kinds import build_kind, payload_bytes
    from tensorstore_pt import write_store

    kind = build_kind(kind_name)
    shard = max(1 << 16, sum(payload_bytes(s) for s in kind.samples) // 6)
    write_store(kind.samples, path, codec="zstd", level=3, max_shard_bytes=shard, compact=True)
    return len(kind.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="small,tokens,embed,medium,large,state")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=7, help="epochs a process (the first two untimed)")
    parser.add_argument("--trees", default=".", help="checkouts to compare, comma-separated")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f"--epochs: expected at least 3 (two are untimed), found {args.epochs}")
    kinds = args.kinds.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    rates: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {kind: Path(tmp) / kind for kind in kinds}
        counts = {kind: pack(kind, stores[kind]) for kind in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                for w in workers:
                    for tree in trees:
                        out = subprocess.run(
                            [sys.executable, "-W", "ignore", "-c", _CHILD, tree, str(stores[kind]), str(w),
                             str(args.epochs)],
                            capture_output=True, text=True, check=True,
                        ).stdout.split()  # fmt: skip
                        if int(out[1]) != counts[kind]:
                            raise SystemExit(f"{kind}: an epoch gave {out[1]} samples, expected {counts[kind]}")
                        rates.setdefault((kind, w, tree), []).append(float(out[0]))
    print("| kind | workers | " + " | ".join(f"samples/s, {t}" for t in trees) + " |")
    print("|---|---|" + "---|" * len(trees))
    for kind in kinds:
        for w in workers:
            cells = [f"{statistics.median(rates[(kind, w, t)]):,.0f}" for t in trees]
            print(f"| {kind} | {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
