"""Pack time of compact stores against one record a frame, per kind, across checkouts.

For every round, checkout, kind and option (``compact=True`` and zstd-3 one record a frame),
a fresh process imports ``tensorstore_pt`` (and ``benchmarks.kinds``) from the checkout,
builds the kind as the harness does (shards of a sixth of its raw payload; the harness sizes
each system's shards itself), packs it once to warm up, then 5 times with
``write_store(..., codec="zstd", level=3)`` on the default threads, and reports the median
wall time. Rounds interleave checkouts, kinds and options, so a busy
moment of the machine hits all of them alike; the result is the median over rounds, and the
ratio compact / zstd-3 of each checkout. To compare before and after a change, pass an older
checkout too (``git worktree add /tmp/before <commit>``). No timing assertions: this script
only prints.

With ``--stages``, it prints instead where a compact pack's CPU time goes for each kind, in
this process, on one thread (``time.process_time``, the mean of 2 runs after one to warm up):
``torch.save`` of every sample, proving, choosing the filters, assembling the blocks (grouped
as a compact writer groups them, ``COMPACT_FRAME_BYTES`` of content each), zstd-3 of those
blocks with and without their filters and of each record's own bytes, and zstd decompression
of the three.

Run: python -m benchmarks.pack_compact [--kinds small,tokens,embed,medium,large,state]
     [--rounds 3] [--trees /tmp/before,.] [--stages]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = """
import os, shutil, statistics, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from benchmarks.kinds import build_kind, payload_bytes
from tensorstore_pt import write_store
kind = build_kind(sys.argv[2])
shard = max(1 << 16, sum(payload_bytes(s) for s in kind.samples) // 6)
for name, options in (("compact", {"compact": True}), ("zstd-3", {})):
    times = []
    for _ in range(6):
        d = tempfile.mkdtemp()
        t0 = time.perf_counter()
        write_store(kind.samples, os.path.join(d, "s"), codec="zstd", level=3, max_shard_bytes=shard, **options)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(d)
    print(name, statistics.median(times[1:]))
"""


def stages(kind_name: str) -> dict[str, float]:
    """CPU ms of each stage of a compact pack of ``kind_name`` (see the module docstring)."""
    import time

    import zstandard

    from benchmarks.kinds import build_kind
    from tensorstore_pt import _ptzip, columnar
    from tensorstore_pt.serialization import dumps
    from tensorstore_pt.shardio import FrameGrouper
    from tensorstore_pt.writer import COMPACT_FRAME_BYTES

    kind = build_kind(kind_name)

    def cpu_ms(fn: object) -> float:
        fn()  # type: ignore[operator]
        t0 = time.process_time()
        fn()  # type: ignore[operator]
        fn()  # type: ignore[operator]
        return (time.process_time() - t0) / 2 * 1000

    out = {"torch.save": cpu_ms(lambda: [dumps(s) for s in kind.samples])}
    raws = [dumps(s) for s in kind.samples]
    out["prove"] = cpu_ms(lambda: [_ptzip.prove(r) for r in raws])
    layout = _ptzip.prove(raws[0]).layout  # type: ignore[union-attr]
    grouper = FrameGrouper(COMPACT_FRAME_BYTES)  # blocks as a compact writer groups them
    blocks = []
    for raw in raws:
        parts, nbytes = columnar.proved(raw, layout)
        if parts is None:
            raise SystemExit(f"{kind_name}: some records do not prove; the stages assume they all do")
        blocks.append(grouper.add(parts, nbytes))
    blocks = [b for b in [*blocks, grouper.flush()] if b]
    compress = zstandard.ZstdCompressor(level=3).compress
    decompress = zstandard.ZstdDecompressor().decompress

    def choose() -> list[tuple[tuple[int, int], ...]]:
        memo = columnar.FilterMemo()
        return [columnar.block_filters(b, compress, memo) for b in blocks]

    out["choose the filters"] = cpu_ms(choose)
    filters = choose()
    out["assemble the blocks"] = cpu_ms(lambda: [columnar.assemble_block(b, f) for b, f in zip(blocks, filters)])
    filtered = [bytes(columnar.assemble_block(b, f)) for b, f in zip(blocks, filters)]
    plain = [bytes(columnar.assemble_block(b, tuple((0, 0) for _ in f))) for b, f in zip(blocks, filters)]
    for name, data in (("filtered blocks", filtered), ("unfiltered blocks", plain), ("one record a frame", raws)):
        out[f"zstd-3 of {name}"] = cpu_ms(lambda data=data: [compress(d) for d in data])
        frames = [compress(d) for d in data]
        out[f"decompression of {name}"] = cpu_ms(lambda frames=frames: [decompress(f) for f in frames])
        out[f"bytes of {name}"] = float(sum(len(f) for f in frames))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="small,tokens,embed,medium,large,state")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trees", default=".", help="comma-separated checkouts to import tensorstore_pt from")
    p.add_argument("--stages", action="store_true", help="where a compact pack's CPU time goes, per kind")
    args = p.parse_args()
    if args.stages:
        for kind in args.kinds.split(","):
            for stage, value in stages(kind).items():
                unit = "" if stage.startswith("bytes") else " ms"
                print(f"{kind}: {stage}: {value:,.1f}{unit}")
        return
    trees = [str(Path(t).resolve()) for t in args.trees.split(",")]
    kinds = args.kinds.split(",")
    got: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            for tree in trees:
                out = subprocess.run(
                    [sys.executable, "-W", "ignore", "-c", _CHILD, tree, kind],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                for line in out.splitlines():
                    name, seconds = line.split()
                    got.setdefault((tree, kind, name), []).append(float(seconds))
    print("| kind | checkout | compact s | zstd-3 s | compact / zstd-3 |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        for tree in trees:
            c = statistics.median(got[(tree, kind, "compact")])
            z = statistics.median(got[(tree, kind, "zstd-3")])
            print(f"| {kind} | {tree} | {c:.3f} | {z:.3f} | {c / z:.2f}x |")


if __name__ == "__main__":
    main()
