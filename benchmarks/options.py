"""Command-line options of ``tspt bench`` and ``python -m benchmarks`` (one definition).

Exit codes: 0 every cell ran; 1 some cell failed (its error is in the results and was
printed); 2 unusable options or the measurement interpreter could not start.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["add_arguments", "run_from_args"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 0,2, found {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more ints >= 0, found {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, found {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, found {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the bench options to ``p`` (used by both entry points)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny data and fewer tensorstore_pt levels: a smoke test (about a minute of CPU without the peers)",
    )
    p.add_argument(
        "--kinds",
        type=_csv,
        default=None,
        metavar="K,K",
        help="data kinds: small,medium,tokens,large,embed,state (default: all; only 'source' with --source)",
    )
    p.add_argument(
        "--systems",
        type=_csv,
        default=None,
        metavar="S,S",
        help="systems to run (default: all; pt-files, the baseline, always runs); see --list",
    )
    p.add_argument(
        "--source",
        default=None,
        metavar="PATH",
        help="benchmark your own data: a .pt file (list or dict of columns), a directory of .pt files, or a store",
    )
    p.add_argument(
        "--layout",
        choices=("rows", "columns"),
        default=None,
        help="how to read a --source .pt file holding a list or tuple of equal-length tensors: rows (one sample "
        "per tensor) or columns (row i of every tensor is sample i); as for tspt pack",
    )
    p.add_argument("--repeats", type=_positive, default=5, help="timed repetitions per measurement (default: 5)")
    p.add_argument("--warmup", type=_positive, default=1, help="untimed warm-up repetitions (default: 1)")
    p.add_argument(
        "--workers", type=_ints, default=(0, 2), metavar="N,N", help="DataLoader worker counts (default: 0,2)"
    )
    p.add_argument("--batch-size", type=_positive, default=32, help="DataLoader batch size (default: 32)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache reads")
    p.add_argument(
        "--random-reads",
        type=_positive,
        default=512,
        metavar="N",
        help="records per random-access pass, the same random subset for every system (default: 512)",
    )
    p.add_argument(
        "--random-cap",
        type=float,
        default=1.0,
        metavar="S",
        help="a random-access pass stops after S seconds; its rate is taken over the reads made (default: 1)",
    )
    p.add_argument(
        "--python",
        default=None,
        metavar="EXE",
        help="interpreter that runs the measurements, e.g. .venv-peers/bin/python where the peers are "
        "installed (default: this one)",
    )
    p.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="where results.json, results.md and the plots go (default: bench-results)",
    )
    p.add_argument(
        "--docs",
        default=None,
        metavar="PATH",
        help="also write the report into this markdown file (e.g. docs/benchmarks.md) between its markers",
    )
    p.add_argument(
        "--workdir", default=None, metavar="DIR", help="where the data is packed (default: a temporary directory)"
    )
    p.add_argument("--keep", action="store_true", help="keep the packed data in --workdir")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the shuffles and the random-access order")
    p.add_argument(
        "--timeout", type=float, default=900.0, metavar="S", help="limit for one measurement, seconds (default: 900)"
    )
    p.add_argument("--list", action="store_true", help="list the data kinds and systems, and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def _list() -> int:
    from .kinds import KIND_NAMES, describe_kind
    from .systems import all_systems

    print("data kinds:")
    for k in KIND_NAMES:
        print(f"  {k:<8} {describe_kind(k)}")
    print("  source   your own data (--source PATH)")
    print("systems:")
    for s in all_systems():
        why = s.unavailable_reason()
        print(f"  {s.name:<13} {s.label}" + (f"  [{why}]" if why else ""))
    return 0


def run_from_args(args: argparse.Namespace, prog: str, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the options describe; print where the results went and the summary."""
    from .report import fmt_bytes, fmt_num, summary_rows, write_docs, write_outputs
    from .runner import BenchConfig, BenchError, run_benchmark
    from .systems import QUICK_SYSTEMS

    if args.list:
        return _list()
    command = " ".join([prog, shlex.join(list(sys.argv[1:] if argv is None else argv))]).strip()
    out = Path(args.out)
    config = BenchConfig(
        quick=args.quick,
        kinds=args.kinds,
        systems=args.systems if args.systems is not None else (list(QUICK_SYSTEMS) if args.quick else None),
        source=args.source,
        source_layout=args.layout,
        repeats=args.repeats,
        warmup=args.warmup,
        workers=tuple(args.workers),
        batch_size=args.batch_size,
        cold=not args.no_cold,
        python=args.python,
        workdir=args.workdir,
        keep=args.keep,
        seed=args.seed,
        timeout_s=args.timeout,
        random_reads=args.random_reads,
        random_cap_s=args.random_cap,
        progress=not args.quiet,
        command=command,
        log_dir=str(out / "logs"),
    )
    from tensorstore_pt.errors import TensorStoreError

    try:
        doc = run_benchmark(config)
    except (BenchError, TensorStoreError) as exc:  # bad options, or a --source that cannot be read
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(doc, out)
    if args.docs:
        write_docs(doc, Path(args.docs), written["plots"])
    failed = [c for c in doc["cells"] if c.get("status") == "failed"]
    print(f"wrote {written['json']}, {written['markdown']}" + "".join(f", {p}" for p in written["plots"]))
    if args.docs:
        print(f"updated {args.docs}")
    for r in summary_rows(doc):
        if r["metric"] in ("bytes_on_disk", "seq_warm_samples_per_s", "loader_w2_samples_per_s"):
            vs_peer = f", x{r['vs_peer']:.2f} vs {r['peer']}" if r["vs_peer"] else ""
            vs_base = f"x{r['vs_baseline']:.2f}" if r["vs_baseline"] else "n/a"
            value = fmt_bytes(r["tspt"]) if r["metric"] == "bytes_on_disk" else f"{fmt_num(r['tspt'])}/s"
            print(f"  {r['kind']:<7} {r['label']:<24} tspt-zstd3 {value:>10}: {vs_base} vs pt-files{vs_peer}")
    print(f"{len(doc['cells']) - len(failed)} of {len(doc['cells'])} cells ran in {doc['elapsed_s']:.0f} s")
    return 1 if failed else 0
