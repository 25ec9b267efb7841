"""Parallel packing: records/s of ``write_store(num_workers=N)`` for N = 0, 1, 2, and against
litdata's ``optimize(num_workers=2)`` and MosaicML Streaming's ``MDSWriter`` written in 2
parts by 2 processes + ``merge_index`` (and tensorstore_pt's own 2 parts + ``merge_stores``),
on the same medium records, in the same run; and a control of what 2 processes give on this
machine at all (``control-1p``/``control-2p``: zstd-3 of the same image bytes in 1 process, or
split between 2), since a shared 2-core machine seldom gives 2x; and ``tspt pack DIR --workers
N`` (``tspt-dir-wN``) of the same samples saved one per ``.pt`` file, reading included.

Usage (from the repository root)::

    python -m benchmarks.pack_parallel [--records 8192] [--repeats 3] \\
        [--peers-python .venv-peers/bin/python] [--out results.json]

Method: the parent builds the ``medium`` kind (:mod:`benchmarks.kinds`: 3x64x64 uint8 photo
patches with int labels) once, scaled to ``--records`` records, and saves it as one ``.pt``
list. Every measurement runs in a fresh process (``python -m benchmarks.pack_parallel
--one SYSTEM``): it loads that file and imports the system's modules (not timed), then
times packing into a new directory,
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
SYSTEMS = (
    "tspt-w0",
    "tspt-w1",
    "tspt-w2",
    "tspt-2parts",
    "litdata-w2",
    "mds-2parts",
    "control-1p",
    "control-2p",
    "tspt-dir-w0",
    "tspt-dir-w1",
    "tspt-dir-w2",
)
PEERS = {"litdata-w2", "mds-2parts"}


def medium_samples(records: int) -> list[Any]:
    """The medium kind (:mod:`benchmarks.kinds`) scaled to ``records`` records."""
    import dataclasses

    import numpy as np

    from . import kinds

    scale = dataclasses.replace(kinds.SCALES["full"], medium=records)
    builder, _ = kinds._BUILDERS["medium"]
    samples, _ = builder(scale, np.random.default_rng([0, kinds.KIND_NAMES.index("medium")]))
    return samples


def build_data(records: int, path: Path, files: Path | None = None) -> int:
    """Build the medium kind with ``records`` records, save it to ``path`` (and, with
    ``files``, each sample to its own ``.pt`` file in that directory); return its tensor bytes."""
    import torch

    samples = medium_samples(records)
    torch.save(samples, path)
    if files is not None:
        files.mkdir()
        for i, sample in enumerate(samples):
            torch.save(sample, files / f"{i:06d}.pt")
    return sum(s["image"].numel() for s in samples)


# ----------------------------------------------------------------------------- children


def _pack_tspt(samples: list[Any], out: Path, workers: int) -> None:
    import tensorstore_pt as ts

    ts.write_store(samples, out, codec="zstd", max_shard_bytes=SHARD_BYTES, num_workers=workers)


def _pack_tspt_dir(files: Path, out: Path, workers: int) -> None:
    """``tspt pack DIR DEST --workers N``, as a user runs it (the CLI's own code, in this
    process): files read and loaded, the size warning's look at the first files, progress off."""
    from tensorstore_pt.cli import main

    code = main(["pack", str(files), str(out), "--max-shard-size", str(SHARD_BYTES), "--workers", str(workers), "-q"])
    if code != 0:
        raise RuntimeError(f"tspt pack exited with {code}")


def _tspt_part(samples: list[Any], out: str) -> None:
    import tensorstore_pt as ts

    ts.write_store(samples, out, codec="zstd", max_shard_bytes=SHARD_BYTES, num_threads=1)


def _pack_tspt_2parts(samples: list[Any], out: Path) -> None:
    """Two processes each write half of the samples as a part, then ``merge_stores`` moves
    them into one store (the parts + merge recipe, as MDS's 2 parts + merge_index)."""
    import multiprocessing

    import tensorstore_pt as ts

    half = len(samples) // 2
    parts = [str(out / "_parts" / str(k)) for k in range(2)]
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_tspt_part, args=(chunk, part))
        for chunk, part in zip((samples[:half], samples[half:]), parts)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a tspt part writer exited with {p.exitcode}")
    ts.merge_stores(parts, out)


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


def _compress_all(blobs: list[bytes]) -> None:
    import zstandard

    c = zstandard.ZstdCompressor(level=3)
    for b in blobs:
        c.compress(b)


def _control(samples: list[Any], processes: int) -> float:
    """The 2-core machine's own parallel speedup, as a yardstick for the ratios: zstd-3 of
    each sample's image bytes (the largest part of a worker's work), all in this process
    (1) or split in halves between 2 forked processes; the seconds, process start included."""
    import multiprocessing

    blobs = [s["image"].numpy().tobytes() for s in samples]
    start = time.perf_counter()
    if processes == 1:
        _compress_all(blobs)
        return time.perf_counter() - start
    ctx = multiprocessing.get_context("fork")
    half = len(blobs) // 2
    procs = [ctx.Process(target=_compress_all, args=(part,)) for part in (blobs[:half], blobs[half:])]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.perf_counter() - start


def run_one(system: str, data: Path, out: Path) -> float:
    """Load the data, pack it with ``system`` into ``out``; return the seconds packing took.
    The ``tspt-dir-*`` systems pack the directory of one-sample files next to ``data``
    instead (reading them is timed)."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    if system.startswith("tspt-dir-w"):
        import tensorstore_pt.cli
        import tensorstore_pt.writer  # noqa: F401

        start = time.perf_counter()
        _pack_tspt_dir(data.parent / "files", out, int(system[len("tspt-dir-w") :]))
        return time.perf_counter() - start
    samples = torch.load(data, weights_only=True)
    # Imports are not timed (the library's lazy imports, the peers' packages).
    if system.startswith("tspt"):
        import tensorstore_pt.merge
        import tensorstore_pt.writer  # noqa: F401
    elif system == "litdata-w2":
        import litdata  # noqa: F401
    elif system == "mds-2parts":
        import streaming  # noqa: F401
        import streaming.base.util  # noqa: F401
    if system.startswith("control-"):
        return _control(samples, int(system[len("control-") : -1]))
    start = time.perf_counter()
    if system.startswith("tspt-w"):
        _pack_tspt(samples, out, int(system[len("tspt-w") :]))
    elif system == "tspt-2parts":
        _pack_tspt_2parts(samples, out)
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
        dirs = any(s.startswith("tspt-dir-") for s in systems)
        tensor_bytes = build_data(args.records, data, work / "files" if dirs else None)
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
    # Per round (the same minute of machine load), 2 processes against 1: tensorstore_pt's
    # workers, and the control's perfectly parallel compression.
    speedups = {}
    for name, one, two in (("tspt w2 / w1", "tspt-w1", "tspt-w2"), ("control 2p / 1p", "control-1p", "control-2p")):
        if times.get(one) and times.get(two):
            per_round = [a / b for a, b in zip(times[one], times[two])]
            speedups[name] = {"median": statistics.median(per_round), "rounds": per_round}
            print(f"{name}: {statistics.median(per_round):.2f}x (rounds: {' '.join(f'{x:.2f}' for x in per_round)})")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"records": args.records, "repeats": args.repeats, "rows": rows, "speedups": speedups}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
