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
from typing import Any, Sequence

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


# --------------------------------------------------------------------------- commands


def _cmd_pack(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .writer import ShardWriter

    from .errors import InvalidOptionError
    from .sources import iter_source

    if args.dict_size is not None and not args.dict:
        raise InvalidOptionError("--dict-size needs --dict")
    total, samples = iter_source(Path(args.src))
    with ShardWriter(
        args.dest,
        codec=args.codec,
        level=args.level,
        max_shard_bytes=args.max_shard_size,
        mode=args.mode,
        dictionary=(args.dict_size or True) if args.dict else False,
        frame_target_bytes=args.frame_size,
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
    from .integrity import verify_store

    report = verify_store(args.store, deep=args.deep)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK if report.ok else EXIT_DAMAGED
    what = "loaded" if report.deep else "verified"
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print(f"OK: {report.location}: {report.records} records in {report.shards} shard(s) {what}")
        return EXIT_OK
    for p in report.problems:
        place = " ".join(x for x in (p.shard or "index.json", f"record {p.record}" if p.record is not None else "") if x)
        print(f"{place}: {p.kind}: expected {p.expected}; found {p.found}")
    print(
        f"DAMAGED: {report.location}: {len(report.problems)} problem(s) in {len(report.damaged_shards)} shard(s); "
        f"{report.records_checked} of {report.records} records and {report.shards_checked} of {report.shards} "
        "shard(s) passed every check",
        file=sys.stderr,
    )
    print(
        f"to repair: run `tspt recover {_quote(report.location)}`: it keeps at least the {report.records_checked} "
        f"record(s) that passed (every record its checksums prove), drops the rest and never deletes a file; "
        f"`tspt recover --dry-run {_quote(report.location)}` shows per shard what it would keep and lose",
        file=sys.stderr,
    )
    return EXIT_DAMAGED


def _quote(path: str) -> str:
    import shlex

    return shlex.quote(path)


def _cmd_recover(args: argparse.Namespace) -> int:
    from .integrity import recover_store

    report = recover_store(args.store, salvage=args.salvage, dry_run=args.dry_run, force=args.force)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK
    verb = "would keep" if report.dry_run else "kept"
    lost = f", {report.records_lost} record(s) lost" if report.records_lost else ""
    print(
        f"{report.location}: index.json was {report.index_before}; {verb} {report.records} records in "
        f"{len(report.kept)} shard(s){lost}"
    )
    if report.shards:
        print("  per shard file (record numbers as they were before recover):")
        width = max(len(o.name) for o in report.shards)
        for o in report.shards:
            held = f"[{o.first_record}, {o.first_record + o.records})" if o.first_record is not None and o.records else "?"
            lost_text = ", ".join(f"[{a}, {b})" for a, b in o.lost) or "none"
            why = f"  ({o.reason})" if o.reason and o.action != "kept" else ""
            print(f"  {o.name:<{width}}  {o.action:<11} records {held:<16} kept {o.kept:<6} lost {lost_text}{why}")
    print("  the recovered store:")
    for k in report.kept:
        src = f" (from {k.source})" if k.source != k.name else ""
        print(f"  {k.how:<9} {k.name}: records [{k.first_record}, {k.first_record + k.records}){src}")
    in_table = {o.name for o in report.shards}
    for q in report.quarantined:
        recs = f", {q.records} records" if q.records else ""
        arrow = "would be quarantined" if report.dry_run else f"-> {q.new_name}"
        why = "" if q.name in in_table else f": {q.reason}"  # the table above says why
        print(f"  quarantined {q.name} {arrow}{recs}{why}")
    if report.index_backup:
        print(f"  kept a copy of the replaced index.json as {report.index_backup}")
    print(f"metadata: {report.metadata}")
    for note in report.notes:
        print(f"note: {note}")
    if not report.changed:
        print("nothing to do: the index already matches the shards")
    elif report.dry_run:
        print("dry run: nothing was changed")
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_path

    options: dict[str, Any] = {"sample_records": args.sample, "max_records": args.max_records, "top": args.top}
    report = audit_path(args.path, **options)
    if args.plot:
        from ._plot import plot_audit

        plot_audit(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK
    print(format_audit(report))
    if args.plot:
        print(f"plot: {args.plot}")
    return EXIT_OK


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def format_audit(report: Any) -> str:
    """Format an :class:`~tensorstore_pt.audit.AuditReport` as text tables."""
    b = report.breakdown
    lines = [
        f"{report.kind.replace('_', ' ')}: {report.source}",
        f"records   {report.records:,} in {report.files:,} file(s)",
        f"on disk   {format_bytes(report.disk_bytes)} ({report.disk_bytes:,} bytes"
        + (f"; {report.allocated_bytes:,} bytes in file-system blocks)" if report.allocated_bytes else ")"),
        f"raw       {format_bytes(report.raw_bytes)} ({report.raw_bytes:,} bytes of torch.save buffers"
        + (")" if report.kind == "store" else ", once packed)"),
    ]
    if report.stored_bytes is not None:
        lines.append(f"stored    {format_bytes(report.stored_bytes)} ({report.stored_bytes:,} bytes, codec {report.codec})")
        lines.append(f"ratio     {report.ratio:.2f} (raw / on disk)")
    if report.shards:
        lines.append("")
        lines.append(f"{'shard':<22}{'records':>9}{'file bytes':>14}{'stored':>14}{'raw':>14}")
        shown = report.shards if len(report.shards) <= 12 else report.shards[:10]
        for sh in shown:
            lines.append(f"{sh.name:<22}{sh.records:>9,}{sh.file_bytes:>14,}{sh.stored_bytes:>14,}{sh.raw_bytes:>14,}")
        if len(shown) < len(report.shards):
            lines.append(f"... {len(report.shards) - len(shown)} more shard(s)")
        for label, n in report.bytes_by_codec.items():
            lines.append(f"codec {label}: {n:,} stored bytes")
    lines += [
        "",
        f"where the raw bytes go ({b.records:,} record(s) analysed, {b.raw_bytes:,} bytes):",
        f"  tensor payload    {b.tensor_bytes:>14,}  {_pct(b.tensor_bytes, b.raw_bytes)}"
        + (f"  (elements need {b.element_bytes:,})" if b.element_bytes != b.tensor_bytes else ""),
        f"  pickle            {b.pickle_bytes:>14,}  {_pct(b.pickle_bytes, b.raw_bytes)}",
        f"  zip container     {b.zip_bytes:>14,}  {_pct(b.zip_bytes, b.raw_bytes)}",
        f"  overhead/record   {b.overhead_bytes / b.records if b.records else 0:>14,.0f}  bytes (pickle + zip)",
        "  by key:   " + ", ".join(f"{k} {v:,} ({_pct(v, b.tensor_bytes).strip()})" for k, v in b.by_key.items()),
        "  by dtype: " + ", ".join(f"{k} {v:,} ({_pct(v, b.tensor_bytes).strip()})" for k, v in b.by_dtype.items()),
        "",
        "largest records:",
    ]
    for r in report.largest:
        extra = f", stored {r.stored_bytes:,}" if r.stored_bytes is not None else ""
        tens = f", tensors {r.tensor_bytes:,} / elements {r.element_bytes:,}" if r.tensor_bytes is not None else ""
        lines.append(f"  {r.record!s:<24} raw {r.raw_bytes:,}{extra}{tens}")
    if report.bloated:
        lines.append(f"bloated records (tensor bytes > elements' bytes; views saved whole): {len(report.bloated)}")
        for r in report.bloated[:10]:
            lines.append(f"  {r.record!s:<24} tensors {r.tensor_bytes:,} bytes for {r.element_bytes:,} element bytes")
    lines += [
        "",
        f"codec projections (measured on {report.projections[0].sample_records if report.projections else 0} "
        f"record(s); torch.load runs at {report.load_mb_s:,.1f} MB/s on these records):",
        f"  {'codec':<14}{'bytes on disk':>16}{'ratio':>8}{'compress MB/s':>15}{'decode MB/s':>13}{'read/record':>13}",
    ]
    for pr in report.projections:
        mark = "  <- recommended" if pr.label == report.recommendation else ""
        lines.append(
            f"  {pr.label:<14}{pr.file_bytes:>16,}{pr.ratio:>8.2f}{pr.compress_mb_s:>15,.0f}{pr.decode_mb_s:>13,.0f}"
            f"{pr.read_bytes_per_record:>13,}{mark}"
        )
    lines += ["", f"recommendation: {report.reason}"]
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _cmd_get(args: argparse.Namespace) -> int:
    from .reader import open_store

    from .errors import InvalidOptionError

    out = Path(args.output)
    if out.is_dir():
        raise InvalidOptionError(f"-o {str(out)!r} is a directory; expected a file path such as record.pt")
    reader = open_store(args.store)
    data = reader.read_bytes(args.index)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
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
    p.add_argument(
        "--dict", action="store_true",
        help="zstd only: train a zstd dictionary on the first records and use it for every frame; "
        "best for many small records",
    )  # fmt: skip
    p.add_argument(
        "--dict-size", type=parse_size, default=None, metavar="SIZE",
        help="dictionary size with --dict (default: 16KiB)",
    )  # fmt: skip
    p.add_argument(
        "--frame-size", type=parse_size, default=None, metavar="SIZE",
        help="put consecutive records into one frame of about SIZE raw bytes (e.g. 64KiB): better ratio, "
        "slower random access (default: one record per frame)",
    )  # fmt: skip
    p.add_argument("--mode", choices=("create", "overwrite", "append"), default="create", help="default: create")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pack)

    p = add("info", "show a store's records, shards, codec, sizes and ratio")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = add(
        "verify",
        "check every shard and record of a store (exit 0 clean, 1 damaged)",
        "Check a store end to end: the index schema; each shard's size and checksum against the index; "
        "headers and footers; every record's checksum, decodability and raw length; record counts. Every "
        "problem is listed with its shard, record, what was expected and what was found.",
    )
    p.add_argument("store")
    p.add_argument("--deep", action="store_true", help="also load every record (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_verify)

    p = add(
        "recover",
        "rebuild index.json from the shards after a crash or a lost index",
        "Rebuild a store from what its shards prove. Every record whose checksums prove it is kept (a "
        "damaged shard's other records too; a shard whose footer is lost is rebuilt from its frames); "
        "records after a lost one are renumbered down, and the per-shard table says which records were "
        "kept and lost. The index is evidence: where it disagrees with the checksummed shard footers, the "
        "footers win. Files that are not kept are quarantined (renamed to NAME.quarantined), never deleted. "
        "Holds the store's lock: refuses while a writer runs. Metadata lost with the index cannot be "
        "recovered.",
    )
    p.add_argument("store")
    p.add_argument("--salvage", action="store_true", help="accepted for compatibility: always on now")
    p.add_argument("--dry-run", action="store_true", help="report what would be done; change nothing")
    p.add_argument(
        "--force", action="store_true",
        help="run even if a temporary file's process id is alive (file systems without locks only)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_recover)

    p = add(
        "audit",
        "where the bytes go, and what packing with each codec would give",
        "Audit a store, a directory of .pt files (one sample each) or one .pt file: bytes per shard and "
        "codec, raw vs stored, tensor payload vs torch.save container overhead by key and dtype, the "
        "largest and bloated records, and projected size and decode speed for each codec candidate.",
    )
    p.add_argument("path", help="a store, a directory of .pt files, or a .pt file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw bar charts (needs matplotlib: pip install tensorstore_pt[plot])")
    p.add_argument("--sample", type=int, default=64, help="records used for codec projections (default: 64)")
    p.add_argument(
        "--max-records", type=int, default=2000,
        help="records analysed for the byte breakdown (default: 2000)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="largest records to list (default: 10)")
    p.set_defaults(func=_cmd_audit)

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
    from .errors import CorruptStoreError, TensorStoreError, UnsafePayloadError

    args = build_parser().parse_args(argv)
    if args.command == "bench":  # recorded in the results as the exact command
        args.bench_argv = list(sys.argv[2:] if argv is None else list(argv)[1:])
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (`tspt info st | head`): stop quietly, as Unix tools do, and
        # keep Python from complaining when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE
    except CorruptStoreError as exc:
        print(f"tspt {args.command}: DAMAGED: {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    except UnsafePayloadError as exc:
        print(f"tspt {args.command}: REFUSED (unsafe payload, not run): {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    except (TensorStoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"tspt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tspt {args.command}: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
