"""The ``tspt`` command line. Formatting only: the logic lives in the library modules.

Exit codes (all commands):
    0  success (``verify``: the store is clean)
    1  the store is damaged, or a record could not be read
    2  unusable input: bad arguments, no such path, not a store, unsupported format
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2

_EPILOG = """exit codes:
  0  success (verify: the store is clean)
  1  the store is damaged, or a record could not be read
  2  unusable input: bad arguments, no such path, not a store, unsupported format
"""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Parse ``"64MiB"`` (IEC, powers of 1024), ``"100MB"`` (SI, powers of 1000) or ``"4096"`` (bytes)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 64MiB, 100MB or 4096 (bytes), found {text!r}")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes >= 1, found {text!r}")
    return int(value)


def format_bytes(n: int) -> str:
    """Format a byte count with IEC units (KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- pack sources


def _is_column(v: Any) -> bool:
    import torch

    return isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0)


def _load_pt(path: Path) -> Any:
    """torch.load a user's .pt with weights_only=True, turning refusals into typed errors."""
    import pickle

    import torch

    from .errors import UnsupportedSampleError

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedSampleError(
            f"{str(path)!r}: torch.load(weights_only=True) refuses this file ({first}); re-save it with only "
            "tensors and builtin containers (e.g. torch.from_numpy for numpy arrays)"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        from .errors import InvalidOptionError

        raise InvalidOptionError(f"{str(path)!r}: not a readable torch.save file ({exc})") from exc


def iter_source(src: Path) -> tuple[int, Iterator[Any]]:
    """Open a pack source; return (number of samples, iterator of samples).

    A source is a ``.pt`` file holding a list/tuple of samples, a ``.pt`` file holding a dict
    of equal-length tensors or lists (one sample per row), or a directory of ``.pt`` files,
    one sample each, in natural sort order. Files are loaded with ``weights_only=True``.

    Raises:
        InvalidOptionError: The source has another shape.
        StoreNotFoundError: The path does not exist.
    """
    import torch

    from .errors import InvalidOptionError, StoreNotFoundError

    if not src.exists():
        raise StoreNotFoundError(f"pack source {str(src)!r} does not exist")
    if src.is_dir():
        files = sorted((p for p in src.iterdir() if p.suffix == ".pt" and p.is_file()), key=lambda p: _natural_key(p.name))
        if not files:
            raise InvalidOptionError(f"pack source {str(src)!r}: expected .pt files in the directory, found none")
        return len(files), (_load_pt(f) for f in files)
    obj = _load_pt(src)
    if isinstance(obj, (list, tuple)):
        return len(obj), iter(obj)
    if isinstance(obj, dict) and obj:
        lengths = {k: len(v) for k, v in obj.items() if _is_column(v)}
        if len(lengths) != len(obj) or len(set(lengths.values())) != 1:
            raise InvalidOptionError(
                f"pack source {str(src)!r}: a dict must map every key to a tensor or list of one common "
                f"length (one sample per row), found lengths {lengths} for keys {list(obj)}"
            )
        n = next(iter(lengths.values()))
        return n, ({k: v[i] for k, v in obj.items()} for i in range(n))
    raise InvalidOptionError(
        f"pack source {str(src)!r}: expected a list/tuple of samples or a dict of equal-length columns, "
        f"found {type(obj).__name__}"
    )


# --------------------------------------------------------------------------- commands


def _cmd_pack(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .writer import ShardWriter

    total, samples = iter_source(Path(args.src))
    with ShardWriter(
        args.dest,
        codec=args.codec,
        level=args.level,
        max_shard_bytes=args.max_shard_size,
        mode=args.mode,
    ) as writer:
        with tqdm(total=total, unit="rec", disable=args.quiet, dynamic_ncols=True, file=sys.stderr) as bar:
            for sample in samples:
                writer.write(sample)
                bar.update(1)
                if bar.n % 64 == 0 or bar.n == total:
                    rate = bar.format_dict.get("rate") or 0.0
                    mb_s = rate * writer.raw_bytes_written / max(writer.records_written, 1) / 1e6
                    bar.set_postfix_str(f"{mb_s:.1f} MB/s raw", refresh=False)
    info = writer.close()
    print(
        f"packed {info.records} records into {info.shards} shard(s) at {info.location}: "
        f"{format_bytes(info.raw_bytes)} raw -> {format_bytes(info.file_bytes)} on disk "
        f"(ratio {info.ratio:.2f}, codec {info.codec})"
    )
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from .reader import open_store

    info = open_store(args.store, verify=False).info()
    if args.json:
        d = dict(info.__dict__)
        d["ratio"] = info.ratio
        print(json.dumps(d, indent=2))
        return EXIT_OK
    rows = [
        ("store", info.location),
        ("format", f"{info.format_version[0]}.{info.format_version[1]}"),
        ("records", f"{info.records:,}"),
        ("shards", f"{info.shards:,}"),
        ("codec", json.dumps(info.codec)),
        ("raw", f"{format_bytes(info.raw_bytes)} ({info.raw_bytes:,} bytes)"),
        ("stored", f"{format_bytes(info.stored_bytes)} ({info.stored_bytes:,} bytes)"),
        ("on disk", f"{format_bytes(info.file_bytes)} ({info.file_bytes:,} bytes, shards only)"),
        ("ratio", f"{info.ratio:.2f} (raw / on disk)"),
        ("metadata", json.dumps(info.metadata)),
        ("created by", json.dumps(info.created_by)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .reader import open_store

    reader = open_store(args.store, verify=False)
    reader.verify()
    print(f"OK: {reader.location}: {len(reader)} records in {reader.info().shards} shard(s) verified")
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    from .reader import open_store

    reader = open_store(args.store)
    data = reader.read_bytes(args.index)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    print(f"wrote record {args.index} ({len(data):,} bytes, a torch.save file) to {out}")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.options import run_from_args

    return run_from_args(args, "tspt bench", args.bench_argv)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workdir=args.workdir, repeats=args.repeats)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .codecs import CODEC_IDS

    parser = argparse.ArgumentParser(
        prog="tspt",
        description="tensorstore_pt: pack, inspect and verify sharded, compressed PyTorch sample stores.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"tspt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=description or help_, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    p = add(
        "pack",
        "pack .pt samples into a store",
        "Pack samples into a store. SRC is a .pt file holding a list/tuple of samples, a .pt file holding "
        "a dict of equal-length tensors or lists (one sample per row), or a directory of .pt files (one "
        "sample each, natural sort order). .pt files are loaded with weights_only=True.",
    )
    p.add_argument("src", help="a .pt file or a directory of .pt files")
    p.add_argument("dest", help="the store directory to create")
    p.add_argument("--codec", choices=CODEC_IDS, default="zstd", help="frame codec (default: zstd)")
    p.add_argument("--level", type=int, default=None, help="codec level (default: zstd 3, lz4 0)")
    p.add_argument(
        "--max-shard-size", type=parse_size, default=64 * 2**20, metavar="SIZE",
        help="shard size cap, e.g. 64MiB (IEC), 100MB (SI) or bytes (default: 64MiB)",
    )  # fmt: skip
    p.add_argument("--mode", choices=("create", "overwrite", "append"), default="create", help="default: create")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)

    p = add("info", "show a store's records, shards, codec, sizes and ratio")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = add("verify", "check every shard and record of a store (exit 0 clean, 1 damaged)")
    p.add_argument("store")
    p.set_defaults(func=_cmd_verify)

    p = add("get", "write one record as a .pt file (its exact torch.save bytes)")
    p.add_argument("store")
    p.add_argument("index", type=int, help="record position (negative counts from the end)")
    p.add_argument("-o", "--output", required=True, help="output .pt path")
    p.set_defaults(func=_cmd_get)

    p = add(
        "demo",
        "pack the scikit-learn digits dataset with each codec and compare to one .pt file per sample",
    )
    p.add_argument("--workdir", default=None, help="where to write stores (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=5, help="timed read repetitions; the median is shown (default: 5)")
    p.set_defaults(func=_cmd_demo)

    p = add(
        "bench",
        "benchmark tensorstore_pt against torch.save files and the peers (same as python -m benchmarks)",
        "Run the benchmark matrix: data kinds x systems (one torch.save file per sample, one torch.save of "
        "the list, tensorstore_pt codecs, and MosaicML Streaming, litdata and WebDataset when installed) x "
        "metrics (bytes on disk, pack time, sequential and random reads warm and cold, DataLoader "
        "throughput, peak RSS). Writes results.json, results.md and PNG plots; see docs/benchmarks.md. "
        "Exit status 1 means some cell failed.",
    )
    from benchmarks.options import add_arguments as _add_bench_arguments

    _add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tspt``; return the exit code (see the module docstring)."""
    from .errors import CorruptStoreError, TensorStoreError

    args = build_parser().parse_args(argv)
    if args.command == "bench":  # recorded in the results as the exact command
        args.bench_argv = list(sys.argv[2:] if argv is None else list(argv)[1:])
    try:
        return int(args.func(args))
    except CorruptStoreError as exc:
        print(f"tspt {args.command}: DAMAGED: {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    except (TensorStoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"tspt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tspt {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
