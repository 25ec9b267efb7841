"""The ``tspt`` command line. Formatting only: the logic lives in the library modules.

Exit codes (all commands):
    0  success (``verify``: the store is clean)
    1  the store is damaged, or a record could not be read
    2  unusable input: bad arguments, no such path, not a store, unsupported format; or the
       system refused a path or a file operation (a name too long, a read-only file system, an
       I/O error), named in the message
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
  2  unusable input: bad arguments, no such path, not a store, unsupported format, a .pt file
     holding something torch.load(weights_only=True) refuses; or the system refused a path or a
     file operation (a name too long, a read-only file system, an I/O error), named in the message
verify: 0 clean, 1 damaged, 2 unusable input (not a store, no such path)
"""

#: Each command's own exit codes, shown at the end of its --help.
_EXIT_CODES = {
    "pack": (
        "0  packed",
        "2  unusable input: bad arguments, no such source, an empty, ambiguous or unsafe source (a numpy\n"
        "     array or custom class in a .pt file), a destination that exists (see --mode) or is not writable",
        "130  interrupted: nothing was published",
    ),
    "merge": (
        "0  merged (or already merged: a re-run changes nothing)",
        "1  a part's shard is damaged (found while planning: nothing was changed)",
        "2  unusable input: bad arguments, a part missing, not committed or written with another codec config,\n"
        "     a destination that holds a store, an unfinished merge of other parts",
        "130  interrupted: nothing was published; run the same command again to finish",
    ),
    "info": ("0  shown", "1  the index or a shard footer is damaged", "2  not a store, no such path"),
    "verify": (
        "0  the store is clean",
        "1  the store is damaged (every problem is listed)",
        "2  unusable input: not a store, no such path",
    ),
    "recover": (
        "0  recovered, or nothing to do",
        "1  damage recover refuses to repair on its own; nothing was changed",
        "2  unusable input: not a store, no such path, the store is busy (another writer holds its lock)",
    ),
    "audit": (
        "0  the report was printed",
        "1  a store's record is damaged",
        "2  unusable input: no such path, not a store or .pt source, unsafe .pt content, bad options",
    ),
    "get": (
        "0  the record was written",
        "1  the record is damaged",
        "2  unusable input: index out of range, not a store, the output exists (see --force) or is a directory",
    ),
    "cp": (
        "0  copied (or already there) and verified",
        "1  the source is damaged, or a file arrived twice with the wrong checksum; nothing was committed",
        "2  unusable input: no such store, a destination holding another store (see --overwrite), bad options",
        "130  interrupted: nothing was committed; run the same command again to resume",
    ),
    "demo": ("0  every store verified clean and every sample read back bit-exact", "1  a check failed"),
    "bench": ("0  every cell ran", "1  some cell failed", "2  bad arguments"),
}


def _epilog(command: str) -> str:
    return "exit codes:\n" + "\n".join(f"  {line}" for line in _EXIT_CODES[command]) + "\n"


#: Below this shard size, every shard's header, footer, index entry and file open weigh on
#: each record (a warning, not a refusal: tests and tiny stores may want it).
MIN_SENSIBLE_SHARD_BYTES = 64 * 2**10

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


def _codec_text(codec: dict[str, Any]) -> str:
    """The codec as the index writes it (JSON), with a dictionary by name and size."""
    plain = {k: v for k, v in codec.items() if k != "dict"}
    text = json.dumps(plain)
    d = codec.get("dict")
    if isinstance(d, dict):
        text += f", dictionary {d.get('name')} ({d.get('bytes', 0):,} bytes)"
    return text


def _shards_text(n: int) -> str:
    return f"{n:,} shard{'s' if n != 1 else ''} + index"


def _rate_text(n_bytes: float, seconds: float) -> str:
    """A rate in MB/s (10**6 bytes a second), or kB/s below 1 MB/s: never a moving rate shown as 0.0."""
    if seconds <= 0 or n_bytes <= 0:
        return "- MB/s"
    rate = n_bytes / seconds / 1e6
    if rate >= 100:
        return f"{rate:,.0f} MB/s"
    if rate >= 1:
        return f"{rate:.1f} MB/s"
    return f"{rate * 1000:.{1 if rate >= 0.001 else 3}f} kB/s"


def progress_text(in_bytes: int, out_bytes: int, seconds: float) -> str:
    """The progress bar's rates: tensor bytes read in, stored bytes written out.

    ``out`` reads ``pending`` while nothing has been stored yet (the writer is training its
    dictionary, or the first frames are still being compressed).
    """
    out = f"{_rate_text(out_bytes, seconds)} stored" if out_bytes else "stored: pending"
    return f"in {_rate_text(in_bytes, seconds)} of tensors, out {out}"


def _note(text: str) -> None:
    print(text, file=sys.stderr)


#: Storage options whose values are always text (credentials, endpoints, names): a secret of
#: digits such as ``secret=12345678`` must not become the int 12345678.
TEXT_STORAGE_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "password",
        "username",
        "endpoint_url",
        "profile",
        "region_name",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "project",
    }
)


def parse_storage_options(items: Sequence[str] | None) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` (repeatable) -> a storage_options dict, or None if none.

    VALUE is parsed as JSON when it parses (``true``, ``3``, ``{"a": 1}``), else kept as a
    string; the values of :data:`TEXT_STORAGE_OPTIONS` (``key``, ``secret``, ``endpoint_url``...)
    are always kept as strings. A dotted KEY (``client_kwargs.region_name``) makes nested dicts.

    Raises:
        InvalidOptionError: An item without ``=``, an empty key, or a key both a value and a
            parent of another key.
    """
    from .errors import InvalidOptionError

    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise InvalidOptionError(
                f"--storage-option: expected KEY=VALUE such as endpoint_url=http://127.0.0.1:9000, found {item!r}"
            )
        try:
            value: Any = text if parts[-1] in TEXT_STORAGE_OPTIONS else json.loads(text)
        except ValueError:
            value = text
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidOptionError(f"--storage-option {item!r}: {part!r} was already given a value")
        if isinstance(node.get(parts[-1]), dict):
            raise InvalidOptionError(f"--storage-option {item!r}: {key!r} already holds nested options")
        node[parts[-1]] = value
    return out


def _cmd_pack(args: argparse.Namespace) -> int:
    import itertools
    import time

    from tqdm import tqdm

    from .errors import InvalidOptionError
    from .sources import FileRows, open_source
    from .writer import ShardWriter

    if args.dict_size is not None and not args.dict:
        raise InvalidOptionError("--dict-size needs --dict")
    if args.max_shard_size < MIN_SENSIBLE_SHARD_BYTES:
        _note(
            f"warning: --max-shard-size {format_bytes(args.max_shard_size)} is below {format_bytes(MIN_SENSIBLE_SHARD_BYTES)}: "
            "every shard costs a file, a header, a footer and an index entry, so tiny shards waste space and slow "
            "reads; a record larger than it gets a shard of its own"
        )
    source = open_source(Path(args.src), layout=args.layout, recursive=args.recursive)
    print(f"source: {args.src}: {source.description}")
    for item in source.skipped:
        print(f"  skipped: {item}")
    samples = source.samples
    # The writer takes the store's lock in its constructor: a destination that exists (see
    # --mode), is read-only or cannot be created fails here, before anything is encoded.
    storage_options = parse_storage_options(args.storage_option)
    with ShardWriter(
        args.dest,
        storage_options=storage_options,
        codec=args.codec,
        level=args.level,
        max_shard_bytes=args.max_shard_size,
        mode=args.mode,
        dictionary=(args.dict_size or True) if args.dict else False,
        frame_target_bytes=args.frame_size,
        raw_below=args.raw_below,
        num_workers=args.workers,
        compact=args.compact,
    ) as writer:
        rows = source.rows
        if isinstance(rows, FileRows):
            head = rows.preload(64)  # kept: these files are not read again
        elif rows is not None:
            head = [rows[i] for i in range(min(64, len(rows)))]
        else:
            head = list(itertools.islice(samples, 64))
            samples = itertools.chain(head, samples)
        source_bytes = sum(rows.sizes()) if isinstance(rows, FileRows) else source.path.stat().st_size
        from .audit import pack_size_warning

        options: dict[str, Any] = {"codec": args.codec, "level": args.level}
        if args.dict:
            options["dictionary"] = args.dict_size or 16 * 2**10
        if args.frame_size:
            options["frame_target_bytes"] = args.frame_size
        if args.compact:
            options["compact"] = True
        warning = pack_size_warning(head, source.records, source_bytes, options, args.max_shard_size)
        if warning:
            _note(f"warning: {warning}")
        start = time.perf_counter()
        with tqdm(total=source.records, unit="rec", disable=args.quiet, dynamic_ncols=True, file=sys.stderr) as bar:

            def progress(done: int, in_bytes: int) -> None:
                step = bar.n // 64 != done // 64 or done == source.records
                bar.update(done - bar.n)
                if step:
                    seconds = time.perf_counter() - start
                    bar.set_postfix_str(progress_text(in_bytes, writer.stored_bytes_written, seconds), refresh=False)

            # Rows go by position: fork workers then inherit them (nothing pickled); a
            # directory's files are then loaded by the workers, not here.
            writer.write_many(rows if rows is not None else samples, progress)
    info = writer.close()
    new_records = writer.records_written
    print(
        f"packed {info.records:,} records into {_shards_text(info.shards)} at {info.location}: "
        f"{format_bytes(info.raw_bytes)} raw -> {format_bytes(info.file_bytes)} on disk "
        f"(ratio {info.ratio:.2f}, codec {_codec_text(info.codec)})"
    )
    _report_oversized(info.location, info.records - new_records, args.max_shard_size, storage_options)
    return EXIT_OK


def _report_oversized(
    location: str, first_new: int, max_shard_bytes: int, storage_options: dict[str, Any] | None = None
) -> None:
    """Say once which records were larger than the shard cap (each got a shard of its own)."""
    from .reader import open_store

    index = open_store(location, verify=False, storage_options=storage_options).index
    big = [s for s in index.shards if s.first_record >= first_new and s.file_bytes > max_shard_bytes]
    if not big:
        return
    names = [
        f"record {s.first_record}" if s.records == 1 else f"records [{s.first_record}, {s.first_record + s.records})"
        for s in big
    ]
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    _note(
        f"note: {listed} did not fit in --max-shard-size {format_bytes(max_shard_bytes)} "
        f"({', '.join(format_bytes(s.file_bytes) for s in big[:3])}{'...' if len(big) > 3 else ''} on disk): "
        f"{'each has' if len(big) > 1 else 'it has'} a shard of its own"
    )


def _cmd_merge(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from .errors import InvalidOptionError
    from .format import INDEX_NAME, MAX_INDEX_BYTES, parse_index
    from .storage import LocalStorage
    from .merge import merge_stores

    storage_options = parse_storage_options(args.storage_option)
    if storage_options and not any(_is_url(x) for x in (*args.parts, args.dest)):
        raise InvalidOptionError(
            "--storage-option: expected a PART or DEST to be a URL such as s3://bucket/prefix; all are local paths"
        )
    total = 0
    for part in args.parts:  # for the bar's total only; merge_stores checks every part itself
        if _is_url(part):
            total = 0  # not worth a request per part before the merge reads every index anyway
            break
        try:
            # Bounded as every index read (format.md 6.1): a part's oversized index.json is
            # not read here (merge_stores then refuses it, unread too).
            total += parse_index(LocalStorage(part).read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES), part).records
        except (OSError, ValueError):
            total = 0
            break
    start = time.perf_counter()
    moved = {"in": 0, "out": 0}
    with tqdm(total=total or None, unit="rec", disable=args.quiet, dynamic_ncols=True, file=sys.stderr) as bar:

        def progress(records: int, in_bytes: int, out_bytes: int) -> None:
            moved["in"] += in_bytes
            moved["out"] += out_bytes
            bar.update(records)
            bar.set_postfix_str(
                progress_text(moved["in"], moved["out"], time.perf_counter() - start).replace(" of tensors", ""),
                refresh=False,
            )

        info = merge_stores(
            args.parts, args.dest, copy=True if args.copy else None, progress=progress, storage_options=storage_options
        )
    moved_parts = not args.copy and not any(_is_url(p) or Path(p).exists() for p in args.parts)
    mode = "moved" if moved_parts else "copied (parts intact)"
    print(
        f"merged {len(args.parts)} parts ({mode}) into {info.location}: {info.records:,} records in "
        f"{_shards_text(info.shards)}, {format_bytes(info.file_bytes)} on disk (codec {_codec_text(info.codec)})"
    )
    return EXIT_OK


def _written_text(created_by: dict[str, Any]) -> str | None:
    """How a store was written, where it is informative (parallel workers, merged parts)."""
    how = []
    merge = created_by.get("merge")
    if isinstance(merge, dict) and isinstance(merge.get("parts"), list):
        how.append(f"merged from {len(merge['parts'])} parts")
    workers = created_by.get("num_workers")
    if isinstance(workers, int) and workers > 0:
        how.append(f"packed by {workers} worker processes")
    return ", ".join(how) or None


def _cmd_info(args: argparse.Namespace) -> int:
    from .format import FEATURE_COLUMNAR_FRAMES, FEATURE_MULTI_RECORD_FRAMES, FEATURE_RAW_FRAMES
    from .reader import open_store

    reader = open_store(args.store, verify=False, storage_options=parse_storage_options(args.storage_option))
    info = reader.info()
    index = reader.index
    multi = FEATURE_MULTI_RECORD_FRAMES in index.features
    frames = sum(len(reader._footer(si).table) for si in range(len(index.shards))) if multi else info.records
    raw_frames = None
    if FEATURE_RAW_FRAMES in index.features:  # format 1.2: count the frames stored raw (reads every footer)
        raw_frames = sum(
            int(f.raw_mask.sum())
            for f in (reader._footer(si) for si in range(len(index.shards)))
            if f.raw_mask is not None
        )
    columnar_frames = None
    if FEATURE_COLUMNAR_FRAMES in index.features:  # format 1.3: count the column blocks (reads every footer)
        columnar_frames = sum(
            int(f.columnar_mask.sum())
            for f in (reader._footer(si) for si in range(len(index.shards)))
            if f.columnar_mask is not None
        )
    if args.json:
        d = dict(info.__dict__)
        d["ratio"] = info.ratio
        d["features"] = list(index.features)
        d["frames"] = frames
        d["raw_frames"] = raw_frames or 0
        d["columnar_frames"] = columnar_frames or 0
        print(json.dumps(d, indent=2))
        return EXIT_OK
    d = info.codec.get("dict")
    rows = [
        ("store", info.location),
        ("format", f"{info.format_version[0]}.{info.format_version[1]}"
         + (f" (features: {', '.join(index.features)})" if index.features else "")),
        ("records", f"{info.records:,}"),
        ("shards", f"{_shards_text(info.shards)}"),
        ("codec", json.dumps({k: v for k, v in info.codec.items() if k != "dict"})),
        ("dictionary", f"{d.get('name')} ({d.get('bytes', 0):,} bytes, dict_id {d.get('dict_id')})" if isinstance(d, dict) else "none"),
        ("frames", f"{frames:,} multi-record frames (about {info.records / frames if frames else 0:,.1f} records each)"
         if multi else "one per record"),
        ("raw frames", None if raw_frames is None else f"{raw_frames:,} of {frames:,} stored raw (the codec saved too little)"),
        ("columnar", None if columnar_frames is None else f"{columnar_frames:,} of {frames:,} frames are column blocks "
         "(container-free records, --compact)"),
        ("raw", f"{format_bytes(info.raw_bytes)} ({info.raw_bytes:,} bytes)"),
        ("stored", f"{format_bytes(info.stored_bytes)} ({info.stored_bytes:,} bytes)"),
        ("on disk", f"{format_bytes(info.file_bytes)} ({info.file_bytes:,} bytes, shards only)"),
        ("ratio", f"{info.ratio:.2f} (raw / on disk)"),
        ("metadata", json.dumps(info.metadata)),
        ("written", _written_text(info.created_by)),
        ("created by", json.dumps(info.created_by)),
    ]  # fmt: skip
    rows = [(k, v) for k, v in rows if v is not None]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .integrity import verify_store

    report = verify_store(args.store, deep=args.deep, storage_options=parse_storage_options(args.storage_option))
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
        place = " ".join(
            x for x in (p.shard or "index.json", f"record {p.record}" if p.record is not None else "") if x
        )
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

    report = recover_store(
        args.store,
        salvage=args.salvage,
        dry_run=args.dry_run,
        force=args.force,
        storage_options=parse_storage_options(args.storage_option),
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK
    verb = "would keep" if report.dry_run else "kept"
    lost = f", {report.records_lost} record(s) lost" if report.records_lost else ""
    if report.records_unknown:
        lost += f"{' and' if lost else ','} an unknown number of records lost (see the notes)"
    print(
        f"{report.location}: index.json was {report.index_before}; {verb} {report.records} records in "
        f"{len(report.kept)} shard(s){lost}"
    )
    if report.shards:
        print("  per shard file (record numbers as they were before recover):")
        width = max(len(o.name) for o in report.shards)
        for o in report.shards:
            held = (
                f"[{o.first_record}, {o.first_record + o.records})" if o.first_record is not None and o.records else "?"
            )
            ranges = ", ".join(f"[{a}, {b})" for a, b in o.lost)
            lost_text = ranges or "none"
            if o.name in report.records_unknown:
                lost_text = ranges + (", " if ranges else "") + "an unknown number"
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
    storage_options = parse_storage_options(args.storage_option)
    if storage_options:
        options["storage_options"] = storage_options
    if args.layout or args.recursive:
        options.update(layout=args.layout, recursive=args.recursive)
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


def _parts(b: Any, indent: str = "  ") -> list[str]:
    return [
        f"{indent}tensor payload  {b.tensor_bytes:>14,} bytes  {_pct(b.tensor_bytes, b.raw_bytes)}"
        + (f"  (their elements need {b.element_bytes:,} bytes)" if b.element_bytes != b.tensor_bytes else ""),
        f"{indent}pickle          {b.pickle_bytes:>14,} bytes  {_pct(b.pickle_bytes, b.raw_bytes)}",
        f"{indent}zip container   {b.zip_bytes:>14,} bytes  {_pct(b.zip_bytes, b.raw_bytes)}",
        f"{indent}by key (tensor bytes):   "
        + ", ".join(f"{k} {v:,} ({_pct(v, b.tensor_bytes).strip()})" for k, v in b.by_key.items()),
        f"{indent}by dtype (tensor bytes): "
        + ", ".join(f"{k} {v:,} ({_pct(v, b.tensor_bytes).strip()})" for k, v in b.by_dtype.items()),
    ]


def format_audit(report: Any) -> str:
    """Format an :class:`~tensorstore_pt.audit.AuditReport` as text tables. Sizes in bytes."""
    b = report.breakdown
    made_of = {
        "store": f"{_shards_text(len(report.shards))} ({report.files:,} files)",
        "pt_dir": f"{report.files:,} .pt file{'s' if report.files != 1 else ''}",
        "pt_file": "1 .pt file",
    }[report.kind]
    lines = [
        f"{report.kind.replace('_', ' ')}: {report.source}",
        f"records   {report.records:,} in {made_of}",
        f"on disk   {format_bytes(report.disk_bytes)} ({report.disk_bytes:,} bytes"
        + (f"; {report.allocated_bytes:,} bytes in file-system blocks)" if report.allocated_bytes else ")"),
        f"raw       {format_bytes(report.raw_bytes)} ({report.raw_bytes:,} bytes of torch.save buffers"
        + (")" if report.kind == "store" else ", once packed: one buffer per record)"),
    ]
    if report.stored_bytes is not None:
        lines.append(
            f"stored    {format_bytes(report.stored_bytes)} ({report.stored_bytes:,} bytes, codec {_codec_text(report.codec)})"
        )
        lines.append(f"ratio     {report.ratio:.2f} (raw / on disk)")
    if report.shards:
        lines.append("")
        lines.append(f"{'shard':<22}{'records':>9}{'file bytes':>14}{'stored bytes':>14}{'raw bytes':>14}")
        shown = report.shards if len(report.shards) <= 12 else report.shards[:10]
        for sh in shown:
            lines.append(f"{sh.name:<22}{sh.records:>9,}{sh.file_bytes:>14,}{sh.stored_bytes:>14,}{sh.raw_bytes:>14,}")
        if len(shown) < len(report.shards):
            lines.append(f"... {len(report.shards) - len(shown)} more shard(s)")
        for label, n in report.bytes_by_codec.items():
            lines.append(f"codec {label}: {n:,} stored bytes")
    lines.append("")
    if report.kind == "pt_file":
        lines.append(f"where the file's bytes go ({b.raw_bytes:,} bytes, the whole file as torch.save wrote it):")
    elif report.kind == "pt_dir":
        lines.append(f"where the files' bytes go ({b.records:,} file(s) analysed, {b.raw_bytes:,} bytes):")
    else:
        lines.append(f"where the raw bytes go ({b.records:,} record(s) analysed, {b.raw_bytes:,} bytes):")
    lines += _parts(b)
    p = report.packed_breakdown
    if p is not None and p.records:
        n = p.records
        lines += [
            "",
            f"once packed, per record (each record its own torch.save buffer, views compacted; mean of {n:,} record(s)):",
            f"  {p.raw_bytes / n:,.0f} bytes = tensor payload {p.tensor_bytes / n:,.0f} + pickle {p.pickle_bytes / n:,.0f} "
            f"+ zip container {p.zip_bytes / n:,.0f} bytes",
        ]
    elif report.kind == "store" and b.records:
        lines.append(f"  overhead/record {b.overhead_bytes / b.records:>14,.0f} bytes (pickle + zip)")
    lines += ["", "largest records (distinct sizes; raw = torch.save bytes):"]
    for r in report.largest:
        extra = f", stored {r.stored_bytes:,} bytes" if r.stored_bytes is not None else ""
        tens = (
            f", tensor payload {r.tensor_bytes:,} bytes (elements {r.element_bytes:,} bytes)"
            if r.tensor_bytes is not None
            else ""
        )
        same = f"  x{r.same_size:,} records of this size" if r.same_size > 1 else ""
        lines.append(f"  {r.record!s:<24} raw {r.raw_bytes:,} bytes{extra}{tens}{same}")
    if report.bloated:
        lines.append(f"bloated (tensor bytes > {2:g}x their elements' bytes; views saved whole): {len(report.bloated)}")
        for r in report.bloated[:10]:
            lines.append(
                f"  {r.record!s:<24} tensors {r.tensor_bytes:,} bytes for {r.element_bytes:,} bytes of elements"
            )
    sample = report.projections[0].sample_records if report.projections else 0
    lines += [
        "",
        f"codec projections (measured on {sample} record(s); torch.load runs at {report.load_mb_s:,.1f} MB/s on them; "
        "MB/s = 10**6 raw bytes a second, median of the timed passes +- half their range):",
        f"  {'codec':<14}{'bytes on disk':>16}{'ratio':>8}{'compress MB/s':>15}{'decode MB/s':>18}{'bytes read/record':>19}"
        f"{'raw frames':>12}",
    ]
    for pr in report.projections:
        mark = "  <- recommended" if pr.label == report.recommendation else ""
        decode = f"{pr.decode_mb_s:,.0f} +-{100 * pr.decode_spread:.0f}%"
        raw_share = f"{100 * pr.raw_frame_share:.0f}%" if pr.raw_frame_share else "-"
        lines.append(
            f"  {pr.label:<14}{pr.file_bytes:>16,}{pr.ratio:>8.2f}{pr.compress_mb_s:>15,.0f}{decode:>18}"
            f"{pr.read_bytes_per_record:>19,}{raw_share:>12}{mark}"
        )
    raw = [pr for pr in report.projections if pr.raw_frame_share]
    if raw:
        lines.append(
            "  raw frames: the share of frames stored raw (the codec saves < 5% of them; format 1.2), counted raw "
            "above; " + ", ".join(f"{pr.label} {pr.raw_frame_bytes:+,} bytes" for pr in raw) + " against coding them "
            "(tspt pack --raw-below 0)"
        )
    lines += ["", f"recommendation: {report.reason}"]
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _cmd_get(args: argparse.Namespace) -> int:
    from .errors import InvalidOptionError
    from .reader import open_store

    out = Path(args.output)
    if out.is_dir():
        raise InvalidOptionError(f"-o {str(out)!r} is a directory; expected a file path such as record.pt")
    if (out.exists() or out.is_symlink()) and not args.force:
        raise InvalidOptionError(f"-o {str(out)!r} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise InvalidOptionError(f"-o {str(out)!r}: the directory {str(out.parent)!r} does not exist")
    reader = open_store(args.store, storage_options=parse_storage_options(args.storage_option))
    n = len(reader)
    data = reader.read_bytes(args.index)  # RecordIndexError names the range
    real = args.index + n if args.index < 0 else args.index
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write -o {str(out)!r}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    asked = f" (index {args.index})" if args.index != real else ""
    print(f"wrote record {real:,} of {n:,}{asked} ({len(data):,} bytes, a torch.save file) to {out}")
    return EXIT_OK


_BENCH_DESCRIPTION = (
    "Run the benchmark matrix: data kinds x systems (one torch.save file per sample, one torch.save of "
    "the list, tensorstore_pt codecs, and MosaicML Streaming, litdata and WebDataset when installed) x "
    "metrics (bytes on disk, pack time, sequential and random reads warm and cold, DataLoader "
    "throughput, peak RSS). Writes results.json, results.md and PNG plots; see docs/benchmarks.md."
)


def _run_bench(argv: list[str]) -> int:
    """``tspt bench ARGS``: the harness's own parser (imported only here)."""
    from benchmarks.options import add_arguments, run_from_args

    parser = argparse.ArgumentParser(
        prog="tspt bench", description=_BENCH_DESCRIPTION, epilog=_epilog("bench"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, "tspt bench", argv)


def _options(*groups: list[str] | None) -> dict[str, Any] | None:
    """Merge groups of ``KEY=VALUE`` options (:func:`parse_storage_options`); a later group
    wins, key by key (nested keys too). None when nothing was given."""

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merged: dict[str, Any] = {}
    for group in groups:
        merge(merged, parse_storage_options(group) or {})
    return merged or None


def _is_url(location: str) -> bool:
    """Whether a location takes storage options (a URL other than ``file://``)."""
    return "://" in location and not location.lower().startswith("file://")


def _cmd_cp(args: argparse.Namespace) -> int:
    from .copy import copy_store
    from .errors import InvalidOptionError

    # --storage-option is for "both sides": a local side (which takes none) is left out of it,
    # so that `tspt cp ./store s3://b/p --storage-option endpoint_url=...` works.
    shared = args.storage_option
    if shared and not (_is_url(args.src) or _is_url(args.dst)):
        raise InvalidOptionError(
            f"--storage-option: expected SRC or DST to be a URL such as s3://bucket/prefix; both are local paths "
            f"({args.src!r}, {args.dst!r})"
        )
    report = copy_store(
        args.src,
        args.dst,
        src_storage_options=_options(shared if _is_url(args.src) else None, args.src_storage_option),
        dst_storage_options=_options(shared if _is_url(args.dst) else None, args.dst_storage_option),
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
        verify=not args.no_verify,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return EXIT_OK
    skipped = (
        f"; {report.shards_skipped} of {report.shards} shard(s) were already there and verified, skipped"
        if report.files_skipped
        else ""
    )
    print(
        f"copied {report.records:,} records: {report.shards_copied} of {report.shards} shard(s), "
        f"{format_bytes(report.bytes_copied)} in {report.seconds:.2f} s "
        f"({_rate_text(report.bytes_copied, report.seconds)}){skipped}"
    )
    if report.refetched:
        print(f"note: {report.refetched} file(s) arrived damaged and were fetched again")
    if report.removed:
        print(f"removed {len(report.removed)} file(s) of the replaced store")
    state = "written last" if report.index_written else "already there"
    check = ", verified clean" if report.verified else ""
    print(f"{report.destination}: index.json {state} ({report.index_checksum}, same as the source){check}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workdir=args.workdir, repeats=args.repeats, shapes=not args.no_shapes)


# --------------------------------------------------------------------------- parser

#: The codec ids, spelled here so that building the parser imports no codec library.
_CODEC_IDS = ("lz4", "none", "zstd")


def _add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option", action="append", default=None, metavar="KEY=VALUE",
        help="for a store URL (s3://bucket/prefix, gs://..., memory://..., https://... read-only): an fsspec "
        "storage option, repeatable; VALUE is JSON when it parses, else a string (key, secret, endpoint_url "
        "and other credentials are always strings); a dotted KEY nests "
        "(client_kwargs.region_name=eu-west-1). Credentials and endpoints otherwise come from the backend's "
        "environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)",
    )  # fmt: skip


#: writer.DEFAULT_RAW_BELOW, repeated so that ``tspt --help`` imports nothing heavy (a test
#: checks they agree).
_DEFAULT_RAW_BELOW = 0.05


def build_parser() -> argparse.ArgumentParser:
    """The ``tspt`` parser. Imports nothing heavy: ``tspt --help`` answers at once."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="tspt",
        description="tensorstore_pt: pack, inspect and verify sharded, compressed PyTorch sample stores.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tspt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_, description=description or help_, epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    p = add(
        "pack",
        "pack .pt samples into a store",
        "Pack samples into a store. SRC is one of what people torch.save: a tuple of equal-length "
        "tensors, torch.save((data, labels)), one sample (data[i], labels[i]) per row; a list of samples, "
        "torch.save([t0, t1, t2]); a dict of equal-length columns, one sample {key: column[i]} per row; or a "
        "directory of .pt files, one sample each, in natural sort order (with --recursive, its subdirectories "
        "too; other files are listed as skipped). A list or tuple of tensors that share a leading dimension "
        "can be read either way: pass --layout. .pt files are loaded with weights_only=True.",
    )
    p.add_argument("src", help="a .pt file or a directory of .pt files")
    p.add_argument("dest", help="the store to create: a directory or a URL such as s3://bucket/prefix")
    p.add_argument("--codec", choices=_CODEC_IDS, default="zstd", help="frame codec (default: zstd)")
    p.add_argument("--level", type=int, default=None, help="codec level (default: zstd 3, lz4 0)")
    p.add_argument(
        "--max-shard-size", type=parse_size, default=64 * 2**20, metavar="SIZE",
        help="shard size cap, e.g. 64MiB (IEC), 100MB (SI) or bytes (default: 64MiB; below 64KiB warns)",
    )  # fmt: skip
    p.add_argument(
        "--layout", choices=("rows", "columns"), default=None,
        help="for a .pt list/tuple of tensors sharing a leading dimension: rows = each tensor is one sample; "
        "columns = sample i is row i of every tensor",
    )  # fmt: skip
    p.add_argument(
        "--recursive", action="store_true", help="a directory source: also pack its subdirectories' .pt files"
    )
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
    p.add_argument(
        "--compact", action="store_true",
        help="store records container-free in columnar frames (format 1.3): each record's pickle and tensor "
        "bytes, laid out column by column, its exact torch.save bytes rebuilt on read; much smaller for small "
        "records, slower random reads (implies --frame-size 256KiB of content unless given; docs/format.md 5.3, "
        "docs/benchmarks.md)",
    )  # fmt: skip
    p.add_argument(
        "--raw-below", type=float, default=_DEFAULT_RAW_BELOW, metavar="FRACTION",
        help="store a frame raw (no codec frame, read at copy speed) when the codec saves less than FRACTION of "
        f"its bytes (default {_DEFAULT_RAW_BELOW}, measured: docs/benchmarks.md; 0 disables; format 1.2 only "
        "where a frame is stored raw)",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=("create", "overwrite", "append"), default="create",
        help="create (default) refuses an existing store; overwrite replaces it; append adds records",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=0, metavar="N",
        help="serialise and compress in N worker processes (default 0: in this process); the store is the "
        "same byte for byte for any N",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_pack)

    p = add(
        "merge",
        "commit part stores as one store, records in part order",
        "Commit PART stores (each written separately, e.g. by one task each, with the same codec options) as "
        "one store DEST, records in the order the parts are given. On one file system the shards are moved "
        "(renamed; only their footers are rewritten) and the parts are removed; elsewhere, or with --copy, they "
        "are copied and the parts are left intact. The index is written last; if the merge is interrupted, "
        "run the same command again to finish it.",
    )
    p.add_argument("parts", nargs="+", metavar="PART", help="the part stores, in record order")
    p.add_argument("dest", help="the merged store to create")
    p.add_argument("--copy", action="store_true", help="copy the shards and leave the parts intact")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_merge)

    p = add("info", "show a store's records, shards, codec, dictionary, frames, sizes and ratio")
    p.add_argument("store", help="a store directory or URL (s3://bucket/prefix, gs://..., https://...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_info)

    p = add(
        "verify",
        "check every shard and record of a store (exit 0 clean, 1 damaged, 2 unusable input)",
        "Check a store end to end: the index schema; each shard's size and checksum against the index; "
        "headers and footers; every record's checksum, decodability and raw length; record counts. Every "
        "problem is listed with its shard, record, what was expected and what was found.",
    )
    p.add_argument("store", help="a store directory or URL (s3://bucket/prefix, gs://..., https://...)")
    p.add_argument("--deep", action="store_true", help="also load every record (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage_option(p)
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
    p.add_argument("store", help="a store directory or URL (s3://bucket/prefix, gs://..., https://...)")
    p.add_argument("--salvage", action="store_true", help="accepted for compatibility: always on now")
    p.add_argument("--dry-run", action="store_true", help="report what would be done; change nothing")
    p.add_argument(
        "--force", action="store_true",
        help="run even if a temporary file's process id is alive (file systems without locks only)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_recover)

    p = add(
        "audit",
        "where the bytes go, and what packing with each codec would give",
        "Audit a store, a directory of .pt files (one sample each) or one .pt file: bytes per shard and "
        "codec, raw vs stored, tensor payload vs torch.save container overhead by key and dtype (for .pt "
        "sources: of the files as they are, and per record as packing would store them), the largest "
        "records and views saved with their whole storage, and projected size and decode speed for each "
        "codec candidate.",
    )
    p.add_argument("path", help="a store, a directory of .pt files, or a .pt file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--plot", metavar="OUT.png", help="draw bar charts (needs matplotlib: pip install tensorstore_pt[plot])"
    )
    p.add_argument("--sample", type=int, default=64, help="records used for codec projections (default: 64)")
    p.add_argument(
        "--max-records", type=int, default=2000,
        help="records analysed for the byte breakdown (default: 2000)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="largest records to list (default: 10)")
    p.add_argument("--layout", choices=("rows", "columns"), default=None, help="as for pack")
    p.add_argument("--recursive", action="store_true", help="as for pack")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_audit)

    p = add(
        "cp",
        "copy a store between two locations (paths or fsspec URLs), verified, index last, resumable",
        "Copy a store byte for byte: every shard (and the zstd dictionary file) is streamed in parallel, "
        "checked on arrival against the index's size and xxh3_64 (a file that arrives wrong is fetched once "
        "more), the result is verified, and index.json is written last with the source's exact bytes. Shards "
        "already at DST with the right size and checksum are skipped, so an interrupted copy resumes when run "
        "again. A DST holding another store is refused unless --overwrite.",
    )
    p.add_argument("src", help="the source store (a path or URL: s3://bucket/prefix, memory://..., file://...)")
    p.add_argument("dst", help="the destination (a path or URL); created if missing")
    p.add_argument("--workers", type=int, default=4, help="files copied at once (default: 4)")
    p.add_argument("--overwrite", action="store_true", help="replace another store at DST")
    p.add_argument(
        "--storage-option", action="append", default=None, metavar="KEY=VALUE",
        help="an fsspec storage option for SRC and DST, whichever are URLs (repeatable; VALUE is JSON when it "
        "parses, else a "
        "string, and always a string for key, secret, endpoint_url and other credentials; a dotted KEY nests: "
        "client_kwargs.region_name=eu-west-1)",
    )  # fmt: skip
    p.add_argument(
        "--src-storage-option", action="append", default=None, metavar="KEY=VALUE",
        help="an fsspec option for SRC only (repeatable; wins over --storage-option)",
    )  # fmt: skip
    p.add_argument(
        "--dst-storage-option", action="append", default=None, metavar="KEY=VALUE",
        help="an fsspec option for DST only (repeatable; wins over --storage-option)",
    )  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="skip verify_store over the copy before the commit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_cp)

    p = add("get", "write one record as a .pt file (its exact torch.save bytes)")
    p.add_argument("store", help="a store directory or URL (s3://bucket/prefix, gs://..., https://...)")
    p.add_argument("index", type=int, help="record position (negative counts from the end)")
    p.add_argument("-o", "--output", required=True, help="output .pt path")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    _add_storage_option(p)
    p.set_defaults(func=_cmd_get)

    p = add(
        "demo",
        "pack the scikit-learn digits dataset with each codec and compare to one .pt file per sample; "
        "then pack the four shapes people torch.save",
    )
    p.add_argument("--workdir", default=None, help="where to write stores (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=5, help="timed read repetitions; the median is shown (default: 5)")
    p.add_argument("--no-shapes", action="store_true", help="skip the second part (the four torch.save shapes)")
    p.set_defaults(func=_cmd_demo)

    add(
        "bench",
        "benchmark tensorstore_pt against torch.save files and the peers (same as python -m benchmarks)",
        _BENCH_DESCRIPTION + " `tspt bench --help` lists its options.",
    )
    return parser


#: Library words -> the CLI's words in error messages.
_CLI_WORDS = (
    (re.compile(r"\bmode='(create|overwrite|append)'"), r"--mode \1"),
    (re.compile(r"\bmode=\"(create|overwrite|append)\""), r"--mode \1"),
    (re.compile(r"\bmax_shard_bytes\b"), "--max-shard-size"),
    (re.compile(r"\bframe_target_bytes\b"), "--frame-size"),
    (re.compile(r"\braw_below\b"), "--raw-below"),
)
#: Temporary names (``.x.pt.tmp-7061``, ``.index.json.tmp-...``) -> the user's name.
_TMP_NAME = re.compile(r"\.([^/\\\s'\"]+?)\.tmp-[0-9A-Za-z-]+")


def cli_words(message: str) -> str:
    """Say a library message in the CLI's words: ``--mode overwrite``, never a temporary name."""
    for pattern, repl in _CLI_WORDS:
        message = pattern.sub(repl, message)
    return _TMP_NAME.sub(r"\1", message)


def _input_is_source(args: argparse.Namespace) -> bool:
    """Whether the command reads the user's .pt files (unsafe content there is unusable input)."""
    if args.command == "pack":
        return True
    if args.command == "audit":
        if "://" in args.path:
            return False  # a store URL
        p = Path(args.path)
        return not (p.is_dir() and (p / "index.json").exists())
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tspt``; return the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness has its own parser, imported only when asked for
        return _run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    from .errors import CorruptStoreError, TensorStoreError, UnsafePayloadError

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
        print(f"tspt {args.command}: DAMAGED: {cli_words(str(exc))}", file=sys.stderr)
        return EXIT_DAMAGED
    except UnsafePayloadError as exc:
        print(f"tspt {args.command}: REFUSED (unsafe payload, not run): {cli_words(str(exc))}", file=sys.stderr)
        return EXIT_USAGE if _input_is_source(args) else EXIT_DAMAGED
    except (TensorStoreError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"tspt {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # What the system refused that the library does not type (ENAMETOOLONG, EROFS, EIO...):
        # one line naming it, not a traceback. Nothing was published (writers commit last).
        print(f"tspt {args.command}: error: {cli_words(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        resume = "; run the same command again to resume" if args.command == "cp" else ""
        print(f"tspt {args.command}: interrupted; nothing was published{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
