"""verify_store() checks a whole store and lists every problem; recover_store() rebuilds its index.

Verification (:func:`verify_store`, ``tspt verify``) checks, in this order, and keeps going
after a problem so that the report lists all of them:

1. ``index.json``: size cap, JSON, the v1 schema, safe shard names, and that no shard claims
   more raw bytes than its codec can decode its stored bytes to;
2. per shard: the file exists; its size equals the index's ``file_bytes``; its whole-file
   xxh3_64 equals the index's ``checksum``; the header (magic, version); the trailer
   and footer (bounds, footer checksum, JSON, record table layout); and that the footer
   agrees with the index (record count, first record, codec, stored and raw byte sums);
3. per record: the raw length is possible for the frame size; the frame's xxh3_64 equals the
   footer's; the frame decodes (header size, no trailing data) to exactly the raw length;
4. with ``deep=True``: every record loads with ``torch.load(weights_only=True)`` semantics;
   a pickle asking for anything else is reported as ``unsafe_payload`` and never run.

Time and memory are bounded by the files themselves: every read is bounded by the file's
size, every record table by the trailer (which must end exactly at the end of the file),
and every decompression by the raw length in the footer, which is itself bounded by the
codec's worst-case ratio. A truncated frame is an error, never a wait for more input.

Recovery (:func:`recover_store`, ``tspt recover``) lives in :mod:`.recover` and is re-exported
here. Both functions hold no global state.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from .checksums import ALGORITHM, format_digest
from .codecs import Codec, get_codec
from .codecs.registry import read_store_file
from .columnar import ColumnBlock
from .errors import (
    AllocationBudgetError,
    CorruptStoreError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotAStoreError,
    RecordLengthError,
    RecordMetaError,
    ShardFormatError,
    StoreNotFoundError,
    TensorStoreError,
    UnsafePayloadError,
    UnsupportedFormatError,
)
from .format import (
    HEADER_BYTES,
    INDEX_NAME,
    SHARD_SUFFIX,
    IndexInfo,
    ShardEntry,
    ShardFooter,
    decode_header,
    parse_index,
    shown,
)
from .reader import _check_max_record_bytes, read_index_bytes
from .shardio import (
    DEFAULT_MAX_RECORD_BYTES,
    check_frame,
    header_version_ok,
    check_index_sizes,
    file_digest,
    frame_records,
    open_footer,
    record_slices,
)
from .storage import TEMP_MARKER, ReadHandle, Storage, storage_for

__all__ = [
    "PROBLEM_KINDS",
    "QUARANTINE_SUFFIX",
    "KeptShard",
    "Problem",
    "QuarantinedFile",
    "RecoverReport",
    "ShardOutcome",
    "VerifyReport",
    "recover_store",
    "verify_store",
]

#: Every ``Problem.kind``, with what it means.
PROBLEM_KINDS: dict[str, str] = {
    "index": "index.json is unreadable, not JSON, breaks the schema, or claims impossible sizes",
    "missing_shard": "a shard named in the index is absent",
    "dictionary": "the zstd dictionary file the codec config names is missing or differs (records not decoded)",
    "shard_size": "a shard's size differs from the index's file_bytes",
    "file_checksum": "a shard's whole-file xxh3_64 differs from the index's checksum",
    "header": "a shard's header has a bad magic or version, or disagrees with its footer's version",
    "footer": "a shard's trailer, record table or footer JSON is damaged",
    "footer_mismatch": "a shard's footer disagrees with the index (first record, codec, features, byte sums)",
    "record_count": "the index and a shard's footer disagree on the number of records",
    "record_checksum": "a frame's xxh3_64 differs from the footer's (all its records are affected)",
    "record_length": "a frame's raw length is impossible for its size, or it decodes to another length",
    "record_decode": "a frame does not decode",
    "record_load": "a record's bytes are not a loadable torch.save buffer (deep)",
    "record_budget": "a record needs more memory than its budget allows (max_record_bytes, or its pickle)",
    "unsafe_payload": "a record's pickle asks for globals outside the weights-only allow-list (deep)",
}

#: Suffix of quarantined file names.
QUARANTINE_SUFFIX = ".quarantined"

_TEMP_RE = re.compile(r"^\.(?P<final>.+)" + re.escape(TEMP_MARKER) + r"(?P<pid>\d+)-[0-9a-f]+$")


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class Problem:
    """One thing :func:`verify_store` found wrong.

    Attributes:
        kind: One of :data:`PROBLEM_KINDS`.
        shard: The shard file name, or None for a store-level problem (the index).
        record: The record's position in the store, or None for a shard-level problem.
        expected: What the index, footer or format says should be there.
        found: What is there.
        message: One sentence naming the place, the expectation and the finding.
        records: The half-open range ``(first, end)`` of record positions the problem makes
            unreadable or unverifiable, when it is known; None otherwise.
    """

    kind: str
    shard: str | None
    record: int | None
    expected: str
    found: str
    message: str
    records: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["records"] = list(self.records) if self.records is not None else None
        return d


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_store`.

    Attributes:
        location: The store.
        deep: Whether every record was also loaded.
        records: Records the index lists (0 if the index is unreadable).
        shards: Shards the index lists (0 if the index is unreadable).
        records_checked: Records whose frame passed every check that was run.
        shards_checked: Shards whose file, header, footer and every record passed.
        problems: Every problem found, in store order.
        notes: Things that are not damage but worth knowing (e.g. unreferenced shard files
            left by an interrupted write).
    """

    location: str
    deep: bool
    records: int
    shards: int
    records_checked: int
    shards_checked: int
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def damaged_shards(self) -> tuple[str, ...]:
        """Names of the shards with at least one problem, in store order."""
        seen: dict[str, None] = {}
        for p in self.problems:
            if p.shard is not None:
                seen.setdefault(p.shard)
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "ok": self.ok,
            "deep": self.deep,
            "records": self.records,
            "shards": self.shards,
            "records_checked": self.records_checked,
            "shards_checked": self.shards_checked,
            "problems": [p.to_json() for p in self.problems],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- shared scanning


def _bounds_codec(config: dict[str, Any]) -> Codec:
    """The codec of ``config`` without its dictionary: enough for raw-length bounds."""
    return get_codec({k: v for k, v in config.items() if k != "dict"})


def _store_loader(storage: Storage) -> Any:
    """A ``get_codec`` file loader: reads a store file by name, refusing oversized files first."""

    def load(name: str) -> bytes:
        try:
            return read_store_file(storage, name)
        except FileNotFoundError as exc:
            raise MissingShardError(
                f"store {storage.location!r}: file {name!r} named in the codec config is missing"
            ) from exc

    return load


@dataclass
class _RecordCheck:
    """Outcome of checking one record's frame: (kind, expected, found, message) or ok."""

    kind: str | None = None
    expected: str = ""
    found: str = ""
    message: str = ""
    data: bytes | None = None


def _check_frame(
    handle: ReadHandle,
    codec: Codec | None,
    row: Any,
    where: str,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    stored_raw: bool = False,
) -> _RecordCheck:
    """Read one frame and run it through the readers' pipeline (:func:`.shardio.check_frame`);
    its typed errors become the report's kinds."""
    offset, stored = int(row["offset"]), int(row["stored"])
    frame = handle.read_range(offset, stored)
    if len(frame) != stored:
        return _RecordCheck(
            "footer",
            f"{stored} frame bytes at byte {offset}",
            f"{len(frame)} bytes",
            f"{where}: the frame at byte {offset} needs {stored} bytes, found {len(frame)} (truncated)",
        )
    try:
        data = check_frame(codec, row, frame, where, max_record_bytes=max_record_bytes, stored_raw=stored_raw)
    except TensorStoreError as exc:
        kind, expected, found = getattr(exc, "problem", ("record_decode", "a decodable frame", str(exc)))
        return _RecordCheck(kind, expected, found, str(exc))
    return _RecordCheck(data=data)  # type: ignore[arg-type]


def _load_check(data: bytes, where: str) -> _RecordCheck:
    from .serialization import loads

    try:
        loads(data, "cpu")
    except UnsafePayloadError as exc:
        return _RecordCheck(
            "unsafe_payload", "only weights-only globals (tensors, builtin containers)", str(exc), f"{where}: {exc}"
        )
    except AllocationBudgetError as exc:
        return _RecordCheck("record_budget", "a record within its allocation budget", str(exc), f"{where}: {exc}")
    except MemoryError as exc:  # as a read reports it: AllocationBudgetError
        return _RecordCheck(
            "record_budget", "memory to load the record", f"MemoryError: {exc}", f"{where}: loading ran out of memory"
        )
    except Exception as exc:  # noqa: BLE001 - torch.load raises RuntimeError, UnpicklingError, zip errors...
        return _RecordCheck(
            "record_load",
            "a torch.save buffer",
            f"{type(exc).__name__}: {exc}",
            f"{where}: the record is not a loadable torch.save buffer ({type(exc).__name__}: {exc})",
        )
    return _RecordCheck(data=data)


def _storage_checked(path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None) -> Storage:
    storage = storage_for(path, storage_options)
    if not storage.exists():
        raise StoreNotFoundError(f"no store at {storage.location!r}: the path does not exist")
    if not storage.is_container():
        raise NotAStoreError(f"{storage.location!r} is a file; expected a store directory holding {INDEX_NAME}")
    return storage


def _parse_temp(name: str) -> tuple[str, int] | None:
    m = _TEMP_RE.match(name)
    return (m.group("final"), int(m.group("pid"))) if m else None


# --------------------------------------------------------------------------- verify


def verify_store(
    path: str | os.PathLike[str] | Storage,
    *,
    deep: bool = False,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    storage_options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Check a store end to end and report every problem found.

    Args:
        path: The store directory, an fsspec URL (``s3://bucket/prefix``...), or a
            :class:`~tensorstore_pt.storage.Storage`.
        deep: Also load every record (``weights_only=True`` semantics). A pickle that asks for
            anything else is reported as ``unsafe_payload``; it is never run.
        max_record_bytes: As for :func:`open_store` (default 1 GiB): a record that decodes to
            more is reported as ``record_budget`` (a reader with this limit refuses it), not
            decoded. Pass the limit your readers use.
        storage_options: For a URL: the fsspec file system's options (docs/remote.md).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True for a clean store. Damage is reported,
        not raised.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory without ``index.json``.
        UnsupportedFormatError: The index is a newer format version, or names a feature or
            codec this version does not know (it cannot be judged).

    Time and memory: O(store bytes) reads in chunks of at most 8 MiB or one frame; one record
    decoded at a time. Thread safety: safe; it opens its own file handles.
    """
    max_record_bytes = _check_max_record_bytes(max_record_bytes)
    storage = _storage_checked(path, storage_options)
    where = f"store {storage.location!r}"
    sizes = storage.sizes()  # one listing: names and sizes (one request on an object store)
    names = storage.list()
    if INDEX_NAME not in names:
        shards = [n for n in names if n.endswith(SHARD_SUFFIX)]
        hint = f"; it holds {len(shards)} shard file(s): `tspt recover` rebuilds the index" if shards else ""
        raise NotAStoreError(f"{storage.location!r} is not a store: expected {INDEX_NAME} in it{hint}")
    problems: list[Problem] = []

    def index_problem(exc: Exception) -> VerifyReport:
        problems.append(
            Problem("index", None, None, "a valid v1 index.json", str(exc), f"{where}: {INDEX_NAME}: {exc}")
        )
        return VerifyReport(storage.location, deep, 0, 0, 0, 0, tuple(problems), _stray_notes(names, ()))

    try:
        index = parse_index(read_index_bytes(storage), f"{where}: {INDEX_NAME}")
    except IndexFormatError as exc:
        return index_problem(exc)
    codec: Codec | None
    try:
        codec = get_codec(index.codec, _store_loader(storage))  # UnsupportedFormatError: cannot judge -> raised
        bounds = codec
    except (IndexFormatError, InvalidOptionError) as exc:
        return index_problem(exc)
    except CorruptStoreError as exc:  # the dictionary file is missing or differs
        ref = index.codec.get("dict", {})
        problems.append(
            Problem(
                "dictionary",
                None,
                None,
                f"dictionary file {ref.get('name')!r} of {ref.get('bytes')} bytes with {ref.get('checksum')}",
                str(exc),
                f"{where}: {exc}; frames are checked against their checksums but not decoded",
            )
        )
        codec = None
        bounds = _bounds_codec(index.codec)
    try:
        check_index_sizes(index, bounds, f"{where}: {INDEX_NAME}")
    except IndexFormatError as exc:
        return index_problem(exc)

    records_checked = 0
    shards_checked = 0
    for entry in index.shards:
        before = len(problems)
        records_checked += _verify_shard(storage, index, codec, entry, deep, problems, max_record_bytes, sizes)
        if len(problems) == before:
            shards_checked += 1
    notes = _stray_notes(names, tuple(s.name for s in index.shards))
    return VerifyReport(
        storage.location,
        deep,
        index.records,
        len(index.shards),
        records_checked,
        shards_checked,
        tuple(problems),
        notes,
    )


def _stray_notes(names: list[str], referenced: tuple[str, ...]) -> tuple[str, ...]:
    ref = set(referenced)
    unreferenced = [n for n in names if n.endswith(SHARD_SUFFIX) and n not in ref and not n.startswith(".")]
    temps = [n for n in names if _parse_temp(n)]
    quarantined = [n for n in names if QUARANTINE_SUFFIX in n]
    notes = []
    if unreferenced:
        notes.append(
            f"{len(unreferenced)} shard file(s) not in the index ({', '.join(unreferenced[:5])}"
            f"{', ...' if len(unreferenced) > 5 else ''}): left by an interrupted append or overwrite; "
            "`tspt recover` adopts or quarantines them"
        )
    if temps:
        notes.append(
            f"{len(temps)} temporary file(s) ({', '.join(temps[:5])}{', ...' if len(temps) > 5 else ''}): a write "
            "in progress or an interrupted one; `tspt recover` finishes or quarantines them"
        )
    if quarantined:
        notes.append(f"{len(quarantined)} quarantined file(s) from an earlier `tspt recover`")
    return tuple(notes)


def _verify_shard(
    storage: Storage,
    index: IndexInfo,
    codec: Codec | None,
    entry: ShardEntry,
    deep: bool,
    problems: list[Problem],
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    sizes: dict[str, int] | None = None,
) -> int:
    """Check one shard; append its problems; return how many of its records passed.

    ``sizes`` (from one :meth:`Storage.sizes` listing) saves a request per shard; a name
    absent from it is asked of the storage (which then names a missing or irregular file)."""
    name = entry.name
    where = f"store {storage.location!r}, shard {name!r}"
    span = (entry.first_record, entry.first_record + entry.records)
    span_text = f"records [{span[0]}, {span[1]})"

    def add(kind: str, expected: str, found: str, message: str, record: int | None = None, records: Any = None) -> None:
        problems.append(Problem(kind, name, record, expected, found, message, records))

    try:
        size = sizes[name] if sizes is not None and name in sizes else storage.size(name)
        handle = storage.open(name)
    except FileNotFoundError:
        add(
            "missing_shard",
            f"a file of {entry.file_bytes} bytes",
            "no file",
            f"{where}: the shard file is missing; {span_text} are lost",
            records=span,
        )
        return 0
    try:
        if size != entry.file_bytes:
            add(
                "shard_size",
                f"{entry.file_bytes} bytes",
                f"{size} bytes",
                f"{where}: expected {entry.file_bytes} bytes (index), found {size} bytes on disk "
                f"({'truncated' if size < entry.file_bytes else f'{size - entry.file_bytes} extra bytes'})",
                records=span,
            )
        else:
            digest = file_digest(handle, size)
            if digest != entry.checksum:
                add(
                    "file_checksum",
                    format_digest(entry.checksum),
                    format_digest(digest),
                    f"{where}: whole-file checksum mismatch ({ALGORITHM}): index says {entry.checksum:016x}, "
                    f"the file gives {digest:016x}",
                )
        header_version: tuple[int, int] | None = None
        header = handle.read_range(0, HEADER_BYTES)
        try:
            header_version = decode_header(header, where)
        except (ShardFormatError, UnsupportedFormatError) as exc:
            add(
                "header",
                "a v1 shard header (magic b'TSPTSHRD', version 1.x)",
                f"bytes {header.hex()}" if header else "no header bytes (empty file)",
                str(exc),
            )

        # The footer: at the end of the file, or, when bytes were appended, where the index says it ends.
        footer: ShardFooter | None = None
        footer_error: Exception | None = None
        for end in dict.fromkeys((size, entry.file_bytes) if size > entry.file_bytes else (size,)):
            try:
                footer = open_footer(handle, end, where)
                break
            except ShardFormatError as exc:
                footer_error = footer_error or exc
        if footer is None:
            add(
                "footer",
                "a v1 trailer and footer at the end of the file",
                str(footer_error),
                f"{footer_error}; {span_text} cannot be checked",
                records=span,
            )
            return 0

        meta = footer.meta
        count = footer.records
        if count != entry.records:
            missing = (entry.first_record + min(count, entry.records), entry.first_record + entry.records)
            add(
                "record_count",
                f"{entry.records} records (index)",
                f"{count} records (footer)",
                f"{where}: the index says {entry.records} records, the footer holds {count}"
                + (f"; records [{missing[0]}, {missing[1]}) do not exist" if missing[1] > missing[0] else ""),
                records=missing if missing[1] > missing[0] else None,
            )
        if meta.get("first_record") != entry.first_record:
            add(
                "footer_mismatch",
                f"first_record {entry.first_record} (index)",
                f"first_record {shown(meta.get('first_record'))} (footer)",
                f"{where}: footer says first_record {shown(meta.get('first_record'))}, the index says "
                f"{entry.first_record} (shards swapped or renamed?)",
                records=span,
            )
        if meta.get("codec") != index.codec:
            add(
                "footer_mismatch",
                f"codec {index.codec} (index)",
                f"codec {shown(meta.get('codec'))} (footer)",
                f"{where}: footer says codec {shown(meta.get('codec'))}, the index says {index.codec}",
                records=span,
            )
        unknown = sorted(set(meta.get("features", [])) - set(index.features))
        if unknown:
            add(
                "footer_mismatch",
                f"features within {list(index.features)} (index)",
                f"features {shown(meta.get('features'))} (footer)",
                f"{where}: footer uses feature(s) {unknown} the index does not list",
                records=span,
            )
        if header_version is not None and not header_version_ok(header_version, meta):
            add(
                "header",
                f"format {shown(meta.get('format_version'))} (footer)",
                f"format {list(header_version)} (header)",
                f"{where}: header says format {header_version[0]}.{header_version[1]}, footer says "
                f"{shown(meta.get('format_version'))}",
            )
        stored = int(footer.table["stored"].sum())
        # The records' raw bytes (with a record map: a column block's records outgrow it, 1.3).
        raw = int(footer.table["raw"].sum() if footer.record_map is None else footer.record_map["raw"].sum())
        if stored != entry.stored_bytes or raw != entry.raw_bytes:
            add(
                "footer_mismatch",
                f"{entry.stored_bytes} stored / {entry.raw_bytes} raw bytes (index)",
                f"{stored} stored / {raw} raw bytes (footer)",
                f"{where}: footer records add up to {stored} stored / {raw} raw bytes, the index says "
                f"{entry.stored_bytes} / {entry.raw_bytes}",
            )

        passed = 0
        for fi, (a, b) in enumerate(frame_records(footer)):
            j = entry.first_record + a
            many = b - a > 1
            fwhere = (
                f"{where}, records [{j}, {entry.first_record + b}) (frame {fi})" if many else f"{where}, record {j}"
            )
            check = _check_frame(handle, codec, footer.table[fi], fwhere, max_record_bytes, footer.is_raw(fi))
            if check.kind is not None:
                add(check.kind, check.expected, check.found, check.message, record=j,
                    records=(j, entry.first_record + b) if many else None)  # fmt: skip
                continue
            block = None
            if check.data is not None and footer.is_columnar(fi):
                try:
                    block = ColumnBlock(check.data, footer.layout, b - a, fwhere)
                    block.check_all()
                except RecordMetaError as exc:
                    add("record_decode", "a column block (docs/format.md, section 5.3)", str(exc), str(exc), record=j,
                        records=(j, entry.first_record + b) if many else None)  # fmt: skip
                    continue
            if not deep and block is not None:  # each record's rebuilt length (computed, not built)
                ok = b - a
                for k, (_, n) in zip(range(a, b), record_slices(footer, a, b)):
                    try:
                        block.check_length(k - a, n)
                    except (RecordLengthError, RecordMetaError) as exc:
                        kind, expected, found = getattr(exc, "problem", ("record_decode", "a record", str(exc)))
                        add(kind, expected, found, str(exc), record=entry.first_record + k)
                        ok -= 1
                passed += ok
                continue
            if not deep or check.data is None:
                passed += b - a if check.data is not None or codec is None else 0
                continue
            for k, (off, n) in zip(range(a, b), record_slices(footer, a, b)):
                rec = entry.first_record + k
                if block is not None:
                    try:
                        data = block.record_bytes(k - a, n, max_record_bytes)
                        block.check_crcs(k - a)
                    except (RecordLengthError, RecordMetaError, AllocationBudgetError) as exc:
                        kind, expected, found = getattr(exc, "problem", ("record_decode", "a record", str(exc)))
                        add(kind, expected, found, str(exc), record=rec)
                        continue
                else:
                    data = check.data[off : off + n]
                loaded = _load_check(data, f"{where}, record {rec}")
                if loaded.kind is not None:
                    add(loaded.kind, loaded.expected, loaded.found, loaded.message, record=rec)
                else:
                    passed += 1
        return passed
    finally:
        handle.close()


# Recovery lives in .recover; re-exported here, where it was first published.
from .recover import KeptShard, QuarantinedFile, RecoverReport, ShardOutcome, recover_store  # noqa: E402
