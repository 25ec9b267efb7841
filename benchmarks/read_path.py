"""Before/after check of the store's read and write paths between two source trees.

Used when a change touches the per-record path (the shard-I/O layer, the writer's commit
protocol): each tree is measured in a fresh process (``PYTHONPATH=<tree>``), the trees
interleaved over ``--repeats`` rounds so that load from elsewhere falls on both alike, and the
median of each is reported with the ratio ``tree / first tree``.

Measured through the public API, on one store written once (3x64x64 uint8 patches and an
int64 label, zstd level 3, shards of 4 MiB so the data spans several shards):

- ``pack``: records/s of ``write_store`` (a fresh store each round);
- ``seq``: records/s of ``open_store(...)[i]`` for every i in order;
- ``random``: records/s of ``store[i]`` for a fixed random permutation of 2,000 positions.

Usage::

    python benchmarks/read_path.py --trees OLD_TREE NEW_TREE [--records 4000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import numpy as np
import torch
import tensorstore_pt as ts

what, store, records, scratch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def samples(n):
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(0, 200, 64 * 64).reshape(64, 64)
    for i in range(n):
        noise = torch.randint(0, 24, (3, 64, 64), generator=g)
        yield ((base + noise).clamp(0, 255).to(torch.uint8), torch.tensor(i % 10))

if what == "write":
    ts.write_store(samples(records), store, codec="zstd", level=3, max_shard_bytes=4 * 2**20)
    print(json.dumps({}))
elif what == "pack":
    t = time.perf_counter()
    ts.write_store(samples(records), scratch, codec="zstd", level=3, max_shard_bytes=4 * 2**20, mode="overwrite")
    print(json.dumps({"pack": records / (time.perf_counter() - t)}))
else:
    r = ts.open_store(store)
    n = len(r)
    t = time.perf_counter()
    for i in range(n):
        r[i]
    seq = n / (time.perf_counter() - t)
    order = np.random.default_rng(0).permutation(n)[:2000].tolist()
    r2 = ts.open_store(store)
    t = time.perf_counter()
    for i in order:
        r2[i]
    rnd = len(order) / (time.perf_counter() - t)
    print(json.dumps({"seq": seq, "random": rnd}))
"""


def _run(tree: str, *args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", nargs="+", required=True, help="source trees (the first is the baseline)")
    p.add_argument("--records", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        _run(args.trees[-1], "write", store, str(args.records), "")
        results: dict[str, dict[str, list[float]]] = {t: {"pack": [], "seq": [], "random": []} for t in args.trees}
        for _ in range(args.repeats):
            for t in args.trees:
                for k, v in _run(t, "read", store, str(args.records), "").items():
                    results[t][k].append(v)
                scratch = os.path.join(tmp, "pack")
                results[t]["pack"].append(_run(t, "pack", store, str(args.records), scratch)["pack"])
    base = args.trees[0]
    table = {t: {k: statistics.median(v) for k, v in m.items()} for t, m in results.items()}
    print(f"{'tree':<40} {'pack rec/s':>12} {'seq rec/s':>12} {'random rec/s':>13}   ratios vs {base}")
    for t, m in table.items():
        ratios = " ".join(f"{k} {m[k] / table[base][k]:.3f}" for k in ("pack", "seq", "random"))
        print(f"{t:<40} {m['pack']:>12,.0f} {m['seq']:>12,.0f} {m['random']:>13,.0f}   {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"records": args.records, "repeats": args.repeats, "medians": table, "runs": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
