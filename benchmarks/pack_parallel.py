"""Parallel packing: records/s of ``write_store(num_workers=N)`` for N = 0, 1, 2, and against
litdata's ``optimize(num_workers=2)`` and MosaicML Streaming's ``MDSWriter`` written in 2
parts by 2 processes + ``merge_index``, on the same medium records, in the same run.

Usage (from the repository root)::

    python -m benchmarks.pack_parallel [--records 8192] [--repeats 3] \\
        [--peers-python .venv-peers/bin/python] [--out results.json]

Method: the parent builds the ``medium`` kind (:mod:`benchmarks.kinds`: 3x64x64 uint8 photo
patches with int labels) once, scaled to ``--records`` records, and saves it as one ``.pt``
list. Every measurement runs in a fresh process (``python -m benchmarks.pack_parallel
--one SYSTEM``): it loads that file (not timed), then times packing into a new directory,
from the first sample handed over to the moment the store (or dataset) is complete on disk,
worker start-up included. Each system runs ``--repeats`` times, interleaved (round-robin, so
a burst of load from other processes hits every system alike); the table gives the median
records/s and input MB/s (tensor bytes), and each one's ratio to ``tspt w1`` (1 worker).
Every sharded system gets the same shard size cap (8 MiB) and zstd at its default level.

Peers run with ``--peers-python`` (a venv with ``litdata`` and ``mosaicml-streaming``; the
repository is put on ``PYTHONPATH`` so the children import the same benchmark code). A peer
that cannot be imported there is reported as unavailable, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

SHARD_BYTES = 8 * 2**20
SYSTEMS = ("tspt-w0", "tspt-w1", "tspt-w2", "litdata-w2", "mds-2parts")
PEERS = {"litdata-w2", "mds-2parts"}


def build_data(records: int, path: Path) -> int:
    """Build the medium kind with ``records`` records, save it to ``path``; return its tensor bytes."""
    import dataclasses

    import numpy as np
    import torch

    from . import kinds

    scale = dataclasses.replace(kinds.SCALES["full"], medium=records)
    builder, _ = kinds._BUILDERS["medium"]
    samples, _ = builder(scale, np.random.default_rng([0, kinds.KIND_NAMES.index("medium")]))
    torch.save(samples, path)
    return sum(s["image"].numel() for s in samples)


# ----------------------------------------------------------------------------- children


def _pack_tspt(samples: list[Any], out: Path, workers: int) -> None:
    import tensorstore_pt as ts

    ts.write_store(samples, out, codec="zstd", max_shard_bytes=SHARD_BYTES, num_workers=workers)


def _pack_litdata(samples: list[Any], out: Path) -> None:
    from .systems.abc import PackOptions
    from .systems.peer_litdata import LitData

    system = LitData()
    system.pack(samples, out, PackOptions(shard_bytes=SHARD_BYTES))
    if system.workers != 2:
        raise RuntimeError("litdata fell back to 1 worker")


def _mds_part(samples: list[Any], out: str) -> None:
    from streaming import MDSWriter

    from .systems._schema import infer_schema
    from .systems.peer_mds import _encoding

    schema = infer_schema(samples)
    columns = {c.name: _encoding(c) for c in schema.columns}
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=SHARD_BYTES) as w:
        for s in samples:
            w.write(schema.flatten(s))


def _pack_mds_2parts(samples: list[Any], out: Path) -> None:
    """Two processes, each an MDSWriter over half of the samples into ``out/<k>``, then
    ``merge_index`` (Streaming's documented way to write one dataset in parallel)."""
    import multiprocessing

    from streaming.base.util import merge_index

    half = len(samples) // 2
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_mds_part, args=(chunk, str(out / str(k))))
        for k, chunk in enumerate((samples[:half], samples[half:]))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"an MDS part writer exited with {p.exitcode}")
    merge_index(str(out), keep_local=True)


def run_one(system: str, data: Path, out: Path) -> float:
    """Load the data, pack it with ``system`` into ``out``; return the seconds packing took."""
    import torch

    samples = torch.load(data, weights_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if system.startswith("tspt-w"):
        _pack_tspt(samples, out, int(system[len("tspt-w") :]))
    elif system == "litdata-w2":
        out.mkdir()
        _pack_litdata(samples, out)
    elif system == "mds-2parts":
        out.mkdir()
        _pack_mds_2parts(samples, out)
    else:
        raise SystemExit(f"unknown system {system!r}; expected one of {SYSTEMS}")
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- parent


def _child(python: str, system: str, data: Path, out: Path, root: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [python, "-m", "benchmarks.pack_parallel", "--one", system, "--data", str(data), "--dest", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.pack_parallel")
    parser.add_argument("--records", type=int, default=8192, help="medium records to pack (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system, median reported (default 3)")
    parser.add_argument("--peers-python", default=".venv-peers/bin/python", help="python of the peers' venv")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dest", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        seconds = run_one(args.one, Path(args.data), Path(args.dest))
        print(json.dumps({"seconds": seconds}))
        return 0

    root = Path(__file__).resolve().parent.parent
    systems = [s for s in args.systems.split(",") if s]
    peers_python = args.peers_python if Path(args.peers_python).exists() else None
    unavailable = {}
    for system, module in (("litdata-w2", "litdata"), ("mds-2parts", "streaming")):
        if system in systems and (peers_python is None or not _available(peers_python, module)):
            unavailable[system] = f"{module} not importable with {args.peers_python}"
    work = Path(tempfile.mkdtemp(prefix="tspt-pack-parallel-"))
    try:
        data = work / "medium.pt"
        tensor_bytes = build_data(args.records, data)
        times: dict[str, list[float]] = {s: [] for s in systems if s not in unavailable}
        errors: dict[str, str] = {}
        for rep in range(args.repeats):
            for system in list(times):
                python = peers_python if system in PEERS else sys.executable
                res = _child(python, system, data, work / f"out-{system}-{rep}", root)  # type: ignore[arg-type]
                if "error" in res:
                    errors[system] = res["error"]
                    del times[system]
                    continue
                times[system].append(res["seconds"])
                print(f"  {system:<11} run {rep + 1}: {res['seconds']:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["tspt-w1"]) if times.get("tspt-w1") else None
    rows = []
    for system in systems:
        if system in times:
            med = statistics.median(times[system])
            rows.append(
                {
                    "system": system,
                    "median_s": med,
                    "records_per_s": args.records / med,
                    "mb_per_s": tensor_bytes / med / 1e6,
                    "vs_tspt_w1": (base / med) if base else None,
                    "runs_s": times[system],
                }
            )
        else:
            rows.append({"system": system, "error": errors.get(system) or unavailable.get(system)})
    print(f"medium records: {args.records:,} x (3x64x64 uint8, int label), {tensor_bytes / 1e6:.1f} MB of tensors; "
          f"median of {args.repeats} runs, each in a fresh process; cpus {os.cpu_count()}")  # fmt: skip
    print("| system | median s | records/s | MB/s in | vs tspt w1 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | - | - | - | {r['error']} |")
        else:
            ratio = f"{r['vs_tspt_w1']:.2f}x" if r["vs_tspt_w1"] else "-"
            print(
                f"| {r['system']} | {r['median_s']:.2f} | {r['records_per_s']:,.0f} | {r['mb_per_s']:.1f} | {ratio} |"
            )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"records": args.records, "repeats": args.repeats, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
