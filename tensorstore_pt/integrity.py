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

Recovery (:func:`recover_store`, ``tspt recover``) rebuilds ``index.json`` from the shards,
which describe themselves (each footer holds its codec, format version, first record and
record table). It understands the writer's commit protocol (see :mod:`.writer`):

- shards are renamed into place only when complete, so a shard file under its final name is
  complete unless damaged later; a complete shard is kept if it continues the record
  sequence (its footer's ``first_record`` equals the records kept before it);
- a temporary file (``.<name>.tmp-<pid>-<hex>``) whose writer died after writing and before
  the rename holds a complete shard: it is renamed to its final name and kept;
- every other temporary file, every damaged file, every shard that does not continue the
  sequence (e.g. the new shards of an interrupted overwrite) and a damaged ``index.json``
  are *quarantined*: renamed to ``<name>.quarantined`` (a leading ``.`` dropped, ``-2``,
  ``-3``... added if taken). Nothing is ever deleted.

The user metadata lives only in ``index.json``. If it is lost, it is taken from a complete
temporary index or from the damaged index when it still parses as JSON; otherwise it
cannot be recovered and the report says so.

Thread/fork safety: the functions hold no global state. Do not run :func:`recover_store`
while a writer is writing to the store; it refuses (:class:`StoreBusyError`) when a
temporary file belongs to a process that is still running on this machine.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import _version
from .checksums import ALGORITHM, FileHasher, digest_int
from .codecs import Codec, get_codec
from .codecs.registry import MAX_DICT_BYTES
from .errors import (
    AllocationBudgetError,
    CorruptStoreError,
    DecompressionError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotAStoreError,
    ShardFormatError,
    ShardSizeError,
    StoreBusyError,
    StoreNotFoundError,
    TensorStoreError,
    UnsafePayloadError,
    UnsupportedFormatError,
)
from .format import (
    strict_json_loads,
    HEADER_BYTES,
    INDEX_NAME,
    MAX_INDEX_BYTES,
    SHARD_SUFFIX,
    TRAILER_BYTES,
    IndexInfo,
    ShardEntry,
    ShardFooter,
    check_shard_name,
    decode_header,
    decode_trailer,
    parse_footer,
    parse_index,
)
from .reader import check_index_sizes
from .storage import TEMP_MARKER, ReadHandle, Storage, storage_for

__all__ = [
    "PROBLEM_KINDS",
    "QUARANTINE_SUFFIX",
    "KeptShard",
    "Problem",
    "QuarantinedFile",
    "RecoverReport",
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
_CHUNK_BYTES = 8 * 2**20


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


@dataclass(frozen=True)
class KeptShard:
    """A shard in the recovered index.

    Attributes:
        name: Its file name.
        first_record: Its first record's position.
        records: How many records it holds.
        how: ``"indexed"`` (in the old index), ``"adopted"`` (a complete shard the old index
            did not list) or ``"renamed"`` (a complete temporary file renamed into place).
        source: For ``"renamed"``, the temporary file's name; else the same as ``name``.
    """

    name: str
    first_record: int
    records: int
    how: str
    source: str


@dataclass(frozen=True)
class QuarantinedFile:
    """A file :func:`recover_store` moved aside (renamed, never deleted).

    Attributes:
        name: Its name before.
        new_name: Its name now (``name`` if ``dry_run``).
        reason: Why it is not part of the recovered store.
        records: Records it holds if its footer is readable, else None.
    """

    name: str
    new_name: str
    reason: str
    records: int | None = None


@dataclass(frozen=True)
class RecoverReport:
    """The result of :func:`recover_store`.

    Attributes:
        location: The store.
        index_before: ``"valid"``, ``"damaged"`` or ``"missing"``.
        records: Records in the recovered store.
        kept: The shards of the recovered store, in record order.
        quarantined: Files moved aside.
        metadata: Where the user metadata came from: ``"index"`` (the old valid index),
            ``"temporary index"``, ``"damaged index"``, or ``"lost"`` (the recovered index has
            empty metadata).
        index_written: Whether a new ``index.json`` was written (False when the old one was
            already right, or with ``dry_run``).
        index_backup: Where a copy of a valid index that was replaced was kept, else None.
        dry_run: True if nothing was changed on disk.
        notes: Further facts in plain sentences.
    """

    location: str
    index_before: str
    records: int
    kept: tuple[KeptShard, ...]
    quarantined: tuple[QuarantinedFile, ...]
    metadata: str
    index_written: bool
    dry_run: bool
    index_backup: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        """Whether the store would change (or changed): a new index, renames or quarantines."""
        return self.index_written or bool(self.quarantined) or any(k.how == "renamed" for k in self.kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "index_before": self.index_before,
            "records": self.records,
            "kept": [asdict(k) for k in self.kept],
            "quarantined": [asdict(q) for q in self.quarantined],
            "metadata": self.metadata,
            "index_written": self.index_written,
            "index_backup": self.index_backup,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- shared scanning


def _hex(value: int) -> str:
    return f"{ALGORITHM}:{value:016x}"


def _file_digest(handle: ReadHandle, size: int) -> int:
    h = FileHasher()
    for off in range(0, size, _CHUNK_BYTES):
        h.update(handle.read_range(off, min(_CHUNK_BYTES, size - off)))
    return h.intdigest()


def _read_exact(handle: ReadHandle, offset: int, length: int, what: str, where: str) -> bytes:
    data = handle.read_range(offset, length)
    if len(data) != length:
        raise ShardFormatError(f"{where}: {what} at byte {offset} needs {length} bytes, found {len(data)}")
    return data


def _open_footer(handle: ReadHandle, size: int, where: str) -> ShardFooter:
    """Parse a shard's trailer and footer, assuming the shard ends at byte ``size``."""
    if size < HEADER_BYTES + TRAILER_BYTES:
        raise ShardFormatError(
            f"{where}: expected at least {HEADER_BYTES + TRAILER_BYTES} bytes (header and trailer), found {size}"
        )
    trailer = _read_exact(handle, size - TRAILER_BYTES, TRAILER_BYTES, "the trailer", where)
    table_offset, count, js_bytes, checksum = decode_trailer(trailer, size, where)
    body = _read_exact(handle, table_offset, size - TRAILER_BYTES - table_offset, "the footer", where)
    try:
        return parse_footer(body, table_offset, count, checksum, where, js_bytes)
    except (IndexFormatError, UnsupportedFormatError) as exc:
        raise ShardFormatError(f"the footer JSON is not a v1 footer: {exc}") from exc


def _frame_records(footer: ShardFooter) -> list[tuple[int, int]]:
    """Per frame, the half-open range of the shard's records it holds."""
    frames = len(footer.table)
    if footer.record_map is None:
        return [(k, k + 1) for k in range(frames)]
    bounds = np.searchsorted(footer.record_map["frame"], np.arange(frames + 1), side="left").tolist()
    return [(int(bounds[f]), int(bounds[f + 1])) for f in range(frames)]


def _record_slices(footer: ShardFooter, first: int, end: int) -> list[tuple[int, int]]:
    """(raw_offset, raw_bytes) in the decoded frame of each shard record in ``[first, end)``."""
    if footer.record_map is None:
        return [(0, int(footer.table["raw"][first]))]
    rows = footer.record_map[first:end]
    return list(zip(rows["raw_offset"].tolist(), rows["raw"].tolist()))


def _bounds_codec(config: dict[str, Any]) -> Codec:
    """The codec of ``config`` without its dictionary: enough for raw-length bounds."""
    return get_codec({k: v for k, v in config.items() if k != "dict"})


def _store_loader(storage: Storage) -> Any:
    """A ``get_codec`` file loader: reads a store file by name, refusing oversized files first."""

    def load(name: str) -> bytes:
        try:
            size = storage.size(name)
        except FileNotFoundError as exc:
            raise MissingShardError(f"store {storage.location!r}: file {name!r} named in the codec config is missing") from exc
        if size > MAX_DICT_BYTES:
            raise ShardSizeError(f"store {storage.location!r}: file {name!r} is {size} bytes; expected at most {MAX_DICT_BYTES}")
        return storage.read_all(name)

    return load


@dataclass
class _RecordCheck:
    """Outcome of checking one record's frame: (kind, expected, found, message) or ok."""

    kind: str | None = None
    expected: str = ""
    found: str = ""
    message: str = ""
    data: bytes | None = None
    frame: bytes | None = None


def _check_frame(handle: ReadHandle, codec: Codec | None, row: Any, where: str) -> _RecordCheck:
    """Check one frame: raw bound, checksum, decode (``codec`` None: checksum only)."""
    offset, stored, raw, expected = int(row["offset"]), int(row["stored"]), int(row["raw"]), int(row["checksum"])
    bound = codec.max_raw_bytes(stored) if codec is not None else raw
    if codec is not None and raw > bound:
        return _RecordCheck(
            "record_length",
            f"at most {bound} raw bytes for a {stored}-byte {codec.codec_id} frame",
            f"{raw} raw bytes in the footer",
            f"{where}: the footer says {raw} raw bytes, but a {stored}-byte {codec.codec_id} frame decodes to "
            f"at most {bound} bytes (not decoded)",
        )
    frame = handle.read_range(offset, stored)
    if len(frame) != stored:
        return _RecordCheck(
            "footer",
            f"{stored} frame bytes at byte {offset}",
            f"{len(frame)} bytes",
            f"{where}: the frame at byte {offset} needs {stored} bytes, found {len(frame)} (truncated)",
        )
    found = digest_int(frame)
    if found != expected:
        return _RecordCheck(
            "record_checksum",
            _hex(expected),
            _hex(found),
            f"{where}: checksum mismatch ({ALGORITHM}): footer says {expected:016x}, the {stored} stored bytes "
            f"give {found:016x}",
        )
    if codec is None:
        return _RecordCheck(frame=frame)
    from .reader import DEFAULT_MAX_RECORD_BYTES

    if raw > DEFAULT_MAX_RECORD_BYTES:
        return _RecordCheck(
            "record_budget",
            f"at most {DEFAULT_MAX_RECORD_BYTES} raw bytes (a reader's default max_record_bytes)",
            f"{raw} raw bytes in the footer",
            f"{where}: the footer says {raw} raw bytes, above the default max_record_bytes={DEFAULT_MAX_RECORD_BYTES} "
            "(not decoded; readers refuse it unless opened with a larger max_record_bytes)",
        )
    try:
        data = codec.decompress(frame, raw)
    except MemoryError as exc:
        return _RecordCheck(
            "record_budget", f"a {codec.codec_id} frame of {raw} raw bytes", f"MemoryError: {exc}", f"{where}: decoding ran out of memory"
        )
    except DecompressionError as exc:
        return _RecordCheck("record_decode", f"a {codec.codec_id} frame of {raw} raw bytes", str(exc), f"{where}: {exc}")
    if len(data) != raw:
        return _RecordCheck(
            "record_length", f"{raw} bytes", f"{len(data)} bytes", f"{where}: decoded {len(data)} bytes, the footer says {raw}"
        )
    return _RecordCheck(data=data, frame=frame)


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
    except Exception as exc:  # noqa: BLE001 - torch.load raises RuntimeError, UnpicklingError, zip errors...
        return _RecordCheck(
            "record_load",
            "a torch.save buffer",
            f"{type(exc).__name__}: {exc}",
            f"{where}: the record is not a loadable torch.save buffer ({type(exc).__name__}: {exc})",
        )
    return _RecordCheck(data=data)


def _storage_checked(path: str | os.PathLike[str] | Storage) -> Storage:
    storage = storage_for(path)
    if not storage.exists():
        raise StoreNotFoundError(f"no store at {storage.location!r}: the path does not exist")
    if not storage.is_container():
        raise NotAStoreError(f"{storage.location!r} is a file; expected a store directory holding {INDEX_NAME}")
    return storage


def _parse_temp(name: str) -> tuple[str, int] | None:
    m = _TEMP_RE.match(name)
    return (m.group("final"), int(m.group("pid"))) if m else None


# --------------------------------------------------------------------------- verify


def verify_store(path: str | os.PathLike[str] | Storage, *, deep: bool = False) -> VerifyReport:
    """Check a store end to end and report every problem found.

    Args:
        path: The store directory (or a :class:`~tensorstore_pt.storage.Storage`).
        deep: Also load every record (``weights_only=True`` semantics). A pickle that asks for
            anything else is reported as ``unsafe_payload``; it is never run.

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
    storage = _storage_checked(path)
    where = f"store {storage.location!r}"
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
        size = storage.size(INDEX_NAME)
        if size > MAX_INDEX_BYTES:
            raise IndexFormatError(f"expected at most {MAX_INDEX_BYTES} bytes, found {size} bytes")
        index = parse_index(storage.read_all(INDEX_NAME), f"{where}: {INDEX_NAME}")
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
        records_checked += _verify_shard(storage, index, codec, entry, deep, problems)
        if len(problems) == before:
            shards_checked += 1
    notes = _stray_notes(names, tuple(s.name for s in index.shards))
    return VerifyReport(
        storage.location, deep, index.records, len(index.shards), records_checked, shards_checked, tuple(problems), notes
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
    storage: Storage, index: IndexInfo, codec: Codec | None, entry: ShardEntry, deep: bool, problems: list[Problem]
) -> int:
    """Check one shard; append its problems; return how many of its records passed."""
    name = entry.name
    where = f"store {storage.location!r}, shard {name!r}"
    span = (entry.first_record, entry.first_record + entry.records)
    span_text = f"records [{span[0]}, {span[1]})"

    def add(kind: str, expected: str, found: str, message: str, record: int | None = None, records: Any = None) -> None:
        problems.append(Problem(kind, name, record, expected, found, message, records))

    try:
        size = storage.size(name)
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
            digest = _file_digest(handle, size)
            if digest != entry.checksum:
                add(
                    "file_checksum",
                    _hex(entry.checksum),
                    _hex(digest),
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
                footer = _open_footer(handle, end, where)
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
                f"first_record {meta.get('first_record')!r} (footer)",
                f"{where}: footer says first_record {meta.get('first_record')!r}, the index says "
                f"{entry.first_record} (shards swapped or renamed?)",
                records=span,
            )
        if meta.get("codec") != index.codec:
            add(
                "footer_mismatch",
                f"codec {index.codec} (index)",
                f"codec {meta.get('codec')} (footer)",
                f"{where}: footer says codec {meta.get('codec')}, the index says {index.codec}",
                records=span,
            )
        unknown = sorted(set(meta.get("features", [])) - set(index.features))
        if unknown:
            add(
                "footer_mismatch",
                f"features within {list(index.features)} (index)",
                f"features {meta.get('features')} (footer)",
                f"{where}: footer uses feature(s) {unknown} the index does not list",
                records=span,
            )
        if header_version is not None and tuple(meta.get("format_version", ())) != header_version:
            add(
                "header",
                f"format {meta.get('format_version')} (footer)",
                f"format {list(header_version)} (header)",
                f"{where}: header says format {header_version[0]}.{header_version[1]}, footer says "
                f"{meta.get('format_version')}",
            )
        stored = int(footer.table["stored"].sum())
        raw = int(footer.table["raw"].sum())
        if stored != entry.stored_bytes or raw != entry.raw_bytes:
            add(
                "footer_mismatch",
                f"{entry.stored_bytes} stored / {entry.raw_bytes} raw bytes (index)",
                f"{stored} stored / {raw} raw bytes (footer)",
                f"{where}: footer records add up to {stored} stored / {raw} raw bytes, the index says "
                f"{entry.stored_bytes} / {entry.raw_bytes}",
            )

        passed = 0
        for fi, (a, b) in enumerate(_frame_records(footer)):
            j = entry.first_record + a
            many = b - a > 1
            fwhere = f"{where}, records [{j}, {entry.first_record + b}) (frame {fi})" if many else f"{where}, record {j}"
            check = _check_frame(handle, codec, footer.table[fi], fwhere)
            if check.kind is not None:
                add(check.kind, check.expected, check.found, check.message, record=j,
                    records=(j, entry.first_record + b) if many else None)  # fmt: skip
                continue
            if not deep or check.data is None:
                passed += b - a if check.data is not None or codec is None else 0
                continue
            for k, (off, n) in zip(range(a, b), _record_slices(footer, a, b)):
                rec = entry.first_record + k
                loaded = _load_check(check.data[off : off + n], f"{where}, record {rec}")
                if loaded.kind is not None:
                    add(loaded.kind, loaded.expected, loaded.found, loaded.message, record=rec)
                else:
                    passed += 1
        return passed
    finally:
        handle.close()


# --------------------------------------------------------------------------- recover


@dataclass
class _Scan:
    """A shard file read on its own terms (no index)."""

    name: str  # the file's current name
    final: str  # its name in the store (differs for a temporary file)
    ok: bool
    reason: str = ""
    entry: ShardEntry | None = None
    codec: dict[str, Any] | None = None
    features: tuple[str, ...] = ()
    records: int | None = None


def _scan_shard(storage: Storage, name: str, final: str, codecs: dict[str, Codec] | None = None) -> _Scan:
    """Check a shard file by its own header, footer and frames; build its index entry.

    ``codecs`` caches codecs by their JSON config across calls (a dictionary is loaded once).
    """
    where = f"store {storage.location!r}, file {name!r}"
    try:
        size = storage.size(name)
        handle = storage.open(name)
    except FileNotFoundError:
        return _Scan(name, final, False, "the file vanished while recover ran")
    try:
        try:
            version = decode_header(_read_exact(handle, 0, HEADER_BYTES, "the header", where), where)
            footer = _open_footer(handle, size, where)
        except (CorruptStoreError, UnsupportedFormatError) as exc:
            return _Scan(name, final, False, f"incomplete or damaged: {exc}")
        meta = footer.meta
        count = footer.records
        first = meta.get("first_record")
        if tuple(meta.get("format_version", ())) != version:
            return _Scan(name, final, False, f"header says format {version}, footer says {meta.get('format_version')}", records=count)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            return _Scan(name, final, False, f"footer has no valid first_record ({first!r})", records=count)
        if count == 0:
            return _Scan(name, final, False, "the shard holds no records (the format has no empty shards)", records=0)
        key = json.dumps(meta.get("codec"), sort_keys=True)
        codecs = {} if codecs is None else codecs
        try:
            codec = codecs[key] if key in codecs else get_codec(meta.get("codec"), _store_loader(storage))
        except (TensorStoreError, FileNotFoundError) as exc:
            return _Scan(name, final, False, f"footer codec: {exc}", records=count)
        codecs[key] = codec
        for k in range(len(footer.table)):
            check = _check_frame(handle, codec, footer.table[k], f"{where}, frame {k}")
            if check.kind is not None:
                return _Scan(name, final, False, f"damaged: {check.message}", records=count)
        entry = ShardEntry(
            name=final,
            records=count,
            first_record=first,
            file_bytes=size,
            stored_bytes=int(footer.table["stored"].sum()),
            raw_bytes=int(footer.table["raw"].sum()),
            checksum=_file_digest(handle, size),
        )
        features = tuple(sorted(meta.get("features", [])))
        return _Scan(name, final, True, entry=entry, codec=meta.get("codec"), features=features, records=count)
    finally:
        handle.close()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _quarantine_name(name: str, taken: set[str]) -> str:
    base = name.lstrip(".") + QUARANTINE_SUFFIX
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


_SEQ_RE = re.compile(r"^shard-(\d+)" + re.escape(SHARD_SUFFIX) + "$")


def _seq(name: str) -> int | None:
    m = _SEQ_RE.match(name)
    return int(m.group(1)) if m else None


def _continues(prev: _Scan | None, cand: _Scan, present_seqs: set[int]) -> bool:
    """Whether ``cand`` can be the writer's next shard after ``prev`` (by sequence number).

    The writer numbers the shards of one write consecutively, after the highest number in the
    directory. So the next shard of the same write has the next number, unless numbers in
    between are absent from the directory altogether (then it is the first shard of a later
    append). A shard whose number follows a file that is present but not ``prev`` belongs to
    another write (e.g. an interrupted overwrite) even if its first record happens to fit.
    """
    if prev is None:
        return True
    a, b = _seq(prev.final), _seq(cand.final)
    if a is None or b is None:
        return cand.final > prev.final
    return b > a and not any(x in present_seqs for x in range(a + 1, b))


def _chain(
    start: list[_Scan], pool: list[_Scan], codec: dict[str, Any] | None, present_seqs: set[int]
) -> list[_Scan]:
    """Extend ``start`` with shards of ``pool`` that continue its record sequence and numbering."""
    chain = list(start)
    used = {s.final for s in chain}
    next_first = sum(s.entry.records for s in chain if s.entry is not None)
    while True:
        prev = chain[-1] if chain else None
        nxt = next(
            (
                s
                for s in pool
                if s.final not in used
                and s.entry is not None
                and s.entry.first_record == next_first
                and (codec is None or s.codec == codec)
                and _continues(prev, s, present_seqs)
            ),
            None,
        )
        if nxt is None or nxt.entry is None:
            return chain
        chain.append(nxt)
        used.add(nxt.final)
        next_first += nxt.entry.records
        codec = nxt.codec


def _longest_chain(
    pool: list[_Scan], codec: dict[str, Any] | None, present_seqs: set[int]
) -> tuple[list[_Scan], int]:
    """The longest chain from a shard whose first record is 0; also how many such chains exist."""
    chains = [
        _chain([s], pool, s.codec, present_seqs)
        for s in pool
        if s.entry is not None and s.entry.first_record == 0 and (codec is None or s.codec == codec)
    ]
    if not chains:
        return [], 0
    chains.sort(key=lambda c: (-sum(x.entry.records for x in c if x.entry is not None), c[0].final))
    return chains[0], len(chains)


def recover_store(
    path: str | os.PathLike[str] | Storage, *, salvage: bool = False, dry_run: bool = False, force: bool = False
) -> RecoverReport:
    """Rebuild ``index.json`` from the self-describing shards; quarantine what cannot be kept.

    See the module docstring for the rules. The result is a store that :func:`verify_store`
    finds clean, holding records ``[0, report.records)`` in the order they were written.

    Args:
        path: The store directory.
        salvage: When a shard listed in a valid index is damaged or missing, the store is
            cut there by default (the shards after it are quarantined whole, their records
            kept in the quarantined files). With ``salvage=True`` every record after the cut
            that still verifies (frame checksum and decode) is copied, frames unchanged, into
            new shards that continue the sequence, so no complete record leaves the store;
            those records are renumbered (moved down by the number of records lost before
            them). Needs a valid ``index.json`` to know the order of the shards.
        dry_run: Only report what would be done; change nothing.
        force: Run even if a temporary file belongs to a process that is still alive (use
            when that process id was reused by an unrelated process).

    Returns:
        A :class:`RecoverReport`.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory with no index, shard or temporary
            file of a store.
        UnsupportedFormatError: The index is a newer format version (left untouched).
        StoreBusyError: A temporary file belongs to a process still running (a live writer).

    Never deletes a file: files that are not kept are renamed (quarantined). The new index
    is committed atomically, last; if recover itself is interrupted, running it again
    finishes the job.
    """
    storage = _storage_checked(path)
    where = f"store {storage.location!r}"
    names = storage.list()
    temps = {n: t for n in names if (t := _parse_temp(n))}
    shard_names = [n for n in names if n.endswith(SHARD_SUFFIX) and not n.startswith(".")]
    if INDEX_NAME not in names and not shard_names and not temps:
        raise NotAStoreError(f"{storage.location!r} holds no {INDEX_NAME}, shard or temporary file: nothing to recover")
    busy = sorted(n for n, (_, pid) in temps.items() if _pid_alive(pid))
    if busy and not force:
        raise StoreBusyError(
            f"{where}: {busy[0]!r} belongs to process {temps[busy[0]][1]}, which is still running (a writer at "
            "work?); stop it first, or pass force=True (--force) if that process id was reused"
        )
    notes: list[str] = []

    # The old index and any temporary index (metadata source).
    old: IndexInfo | None = None
    index_before = "missing"
    meta_source = "lost"
    metadata: dict[str, Any] = {}
    created_by: dict[str, Any] | None = None
    if INDEX_NAME in names:
        index_before = "damaged"
        raw_index = storage.read_all(INDEX_NAME) if storage.size(INDEX_NAME) <= MAX_INDEX_BYTES else b""
        try:
            old = parse_index(raw_index, f"{where}: {INDEX_NAME}")
            check_index_sizes(old, _bounds_codec(old.codec), f"{where}: {INDEX_NAME}")
            index_before = "valid"
            metadata, created_by, meta_source = dict(old.metadata), dict(old.created_by), "index"
        except IndexFormatError as exc:
            old = None
            notes.append(f"{INDEX_NAME} is damaged ({exc})")
            loose = _loose_metadata(raw_index)
            if loose is not None:
                metadata, meta_source = loose, "damaged index"
    if old is None:
        for tname, (final, _pid) in sorted(temps.items()):
            if final != INDEX_NAME:
                continue
            try:
                tmp_index = parse_index(storage.read_all(tname), f"{where}: {tname}")
            except (IndexFormatError, UnsupportedFormatError, OSError):
                continue
            metadata, created_by, meta_source = dict(tmp_index.metadata), dict(tmp_index.created_by), "temporary index"
            break

    # Scan every shard file and every temporary shard file.
    codecs: dict[str, Codec] = {}
    scans: dict[str, _Scan] = {n: _scan_shard(storage, n, n, codecs) for n in shard_names}
    temp_scans: list[_Scan] = []
    for tname, (final, _pid) in sorted(temps.items()):
        if final == INDEX_NAME:
            continue
        try:
            check_shard_name(final, tname)
        except IndexFormatError:
            temp_scans.append(_Scan(tname, final, False, "not a shard's temporary file"))
            continue
        if not final.endswith(SHARD_SUFFIX):
            temp_scans.append(_Scan(tname, final, False, "an unfinished temporary file (its writer died)"))
            continue
        scan = _scan_shard(storage, tname, final, codecs)
        if scan.ok and final in scans:
            scan = _Scan(tname, final, False, f"a complete copy of {final!r}, which exists", records=scan.records)
        elif not scan.ok:
            scan.reason = f"an unfinished shard (its writer died before closing it): {scan.reason}"
        temp_scans.append(scan)
    complete = sorted(
        [s for s in scans.values() if s.ok] + [s for s in temp_scans if s.ok], key=lambda s: s.final
    )

    # Choose the record sequence to keep.
    present_seqs = {sq for n in list(scans) + [t.final for t in temp_scans] if (sq := _seq(n)) is not None}
    if old is not None:
        start: list[_Scan] = []
        for entry in old.shards:
            s = scans.get(entry.name)
            if s is None or not s.ok or s.entry is None:
                why = "missing" if s is None else s.reason
            elif (
                s.entry.first_record != entry.first_record
                or s.codec != old.codec
                or not set(s.features) <= set(old.features)
            ):
                why = "disagrees with the index (first record, codec or features)"
            else:
                start.append(s)
                continue
            notes.append(
                f"indexed shard {entry.name!r} (records [{entry.first_record}, {entry.first_record + entry.records})) "
                f"is {why}; the store is cut there"
            )
            break
        if old.shards and not start:
            chain: list[_Scan] = []
        elif start:
            chain = _chain(start, complete, old.codec, present_seqs)
        else:
            chain, _ = _longest_chain(complete, old.codec, present_seqs)
        codec_config: dict[str, Any] | None = old.codec
    else:
        chain, n_chains = _longest_chain(complete, None, present_seqs)
        if n_chains > 1:
            notes.append(
                f"{n_chains} record sequences start at record 0 (an interrupted overwrite?); kept the longest, "
                f"starting at {chain[0].final!r}"
            )
        codec_config = chain[0].codec if chain else None
        if codec_config is None:
            codec_config = next((s.codec for s in complete if s.codec), None) or {"id": "zstd", "level": 3}
            notes.append(f"no complete shard starts at record 0; the recovered store is empty, with codec {codec_config}")
    indexed = {s.name for s in old.shards} if old is not None else set()
    salvage_entries: list[ShardEntry] = []
    salvaged = 0
    if salvage and old is not None and len(start) < len(old.shards):
        chain = start  # nothing adopted past the cut: the salvaged shards continue the sequence
        salvage_entries, salvaged, lost = _salvage(
            storage, old, chain, present_seqs | {sq for n in names if (sq := _seq(n)) is not None}, dry_run
        )
        cut_at = sum(s.entry.records for s in chain if s.entry is not None)
        notes.append(
            f"salvage: {salvaged} record(s) after record {cut_at} still verify and were "
            f"{'to be ' if dry_run else ''}copied into {len(salvage_entries) if not dry_run else 'new'} new "
            f"shard(s); {lost} record(s) could not be salvaged; records after {cut_at} are renumbered"
        )
    elif salvage and old is None:
        notes.append("salvage needs a valid index to know the order of the shards; kept the complete prefix only")
    kept = tuple(
        KeptShard(
            name=s.final,
            first_record=s.entry.first_record if s.entry else 0,
            records=s.entry.records if s.entry else 0,
            how="renamed" if s.name != s.final else "indexed" if s.final in indexed else "adopted",
            source=s.name,
        )
        for s in chain
    ) + tuple(KeptShard(e.name, e.first_record, e.records, "salvaged", e.name) for e in salvage_entries)
    entries = [s.entry for s in chain if s.entry is not None] + salvage_entries
    if codec_config is None:  # only when the old index is missing or damaged and no shard is complete
        codec_config = {"id": "zstd", "level": 3}
    features = {f for s in chain for f in s.features} | (set(old.features) if salvage_entries and old is not None else set())
    new_index = IndexInfo.build(
        codec_config,
        entries,
        metadata,
        {**(created_by or _created_by()), "recovered_by": f"tensorstore_pt {_version.__version__}"},
        tuple(sorted(features)),
    )
    if (
        old is not None
        and created_by is not None
        and old.shards == tuple(entries)
        and old.codec == codec_config
        and old.features == new_index.features
    ):
        index_needed = False
    else:
        index_needed = True

    # What to quarantine: everything of the store's kinds that is not kept.
    kept_sources = {s.name for s in chain}
    taken = set(names)
    to_quarantine: list[tuple[str, str, int | None]] = []
    if index_before == "damaged":
        to_quarantine.append((INDEX_NAME, "a damaged index (see the notes)", None))
    indexed_records = {e.name: e.records for e in old.shards} if old is not None else {}
    for n in shard_names:
        if n in kept_sources:
            continue
        s = scans[n]
        reason = s.reason if not s.ok else "a complete shard that does not continue the kept record sequence"
        to_quarantine.append((n, reason, s.records if s.records is not None else indexed_records.get(n)))
    for s in temp_scans:
        if s.name not in kept_sources:
            reason = s.reason if not s.ok else "a complete shard that does not continue the kept record sequence"
            to_quarantine.append((s.name, reason, s.records))
    for tname, (final, _pid) in sorted(temps.items()):
        if final == INDEX_NAME:
            to_quarantine.append((tname, "an unpublished index (its writer died before committing it)", None))
    quarantined = tuple(
        QuarantinedFile(n, n if dry_run else _quarantine_name(n, taken), reason, recs)
        for n, reason, recs in to_quarantine
    )
    if meta_source == "lost":
        notes.append(
            "the user metadata lived only in the lost index and cannot be recovered; the new index has "
            "empty metadata (set it again with a writer in append mode)"
        )
    if any(q.records for q in quarantined):
        held = sum(q.records or 0 for q in quarantined)
        notes.append(
            f"the quarantined files hold {held} record(s), kept on disk"
            + (" (their verifying records were salvaged into the store)" if salvage_entries or (dry_run and salvaged) else "; they are not in the recovered store")
        )

    index_backup: str | None = None
    if not dry_run:
        for s in chain:
            if s.name != s.final:
                storage.move(s.name, s.final)
        for q in quarantined:
            storage.move(q.name, q.new_name)
        if index_needed and old is not None:
            # The old index is valid but about to be replaced: keep a copy (never delete).
            index_backup = _quarantine_name(INDEX_NAME, taken)
            with storage.writer(index_backup) as out:
                out.write(raw_index)
        if index_needed:
            with storage.writer(INDEX_NAME) as out:
                out.write((json.dumps(new_index.to_json(), indent=1) + "\n").encode())
    return RecoverReport(
        location=storage.location,
        index_before=index_before,
        records=new_index.records + (salvaged if dry_run else 0),
        kept=kept,
        quarantined=quarantined,
        metadata=meta_source,
        index_written=index_needed and not dry_run,
        index_backup=index_backup,
        dry_run=dry_run,
        notes=tuple(notes),
    )


def _salvage(
    storage: Storage, old: IndexInfo, chain: list[_Scan], present_seqs: set[int], dry_run: bool
) -> tuple[list[ShardEntry], int, int]:
    """Copy every verifying frame of the indexed shards after the cut into new shards.

    Returns:
        (entries of the new shards, records salvaged, records known lost).
    """
    from .format import (
        FEATURE_MULTI_RECORD_FRAMES,
        FORMAT_NAME,
        shard_name,
        version_for,
    )
    from .writer import _OpenShard

    codec = get_codec(old.codec, _store_loader(storage))
    next_first = sum(s.entry.records for s in chain if s.entry is not None)
    seq = max(present_seqs, default=-1) + 1
    cap = max(s.file_bytes for s in old.shards)
    features = sorted(old.features)
    multi = FEATURE_MULTI_RECORD_FRAMES in features
    footer_meta = {
        "format": FORMAT_NAME,
        "format_version": list(version_for(features)),
        "features": features,
        "codec": old.codec,
        "checksum": ALGORITHM,
    }
    entries: list[ShardEntry] = []
    out: _OpenShard | None = None
    salvaged = lost = 0
    for entry in old.shards[len(chain) :]:
        where = f"store {storage.location!r}, shard {entry.name!r}"
        try:
            size = storage.size(entry.name)
            handle = storage.open(entry.name)
        except FileNotFoundError:
            lost += entry.records
            continue
        try:
            footer = None
            for end in dict.fromkeys((size, entry.file_bytes) if size > entry.file_bytes else (size,)):
                try:
                    footer = _open_footer(handle, end, where)
                    break
                except ShardFormatError:
                    continue
            if footer is None or footer.meta.get("codec") != old.codec:
                lost += entry.records
                continue
            lost += max(0, entry.records - footer.records)
            for fi, (a, b) in enumerate(_frame_records(footer)):
                check = _check_frame(handle, codec, footer.table[fi], where)
                if check.kind is not None or check.frame is None:
                    lost += b - a
                    continue
                salvaged += b - a
                if dry_run:
                    continue
                frame, row = check.frame, footer.table[fi]
                raw_lengths = [n for _, n in _record_slices(footer, a, b)]
                if out is not None and out.offsets and out.size_with(len(frame), len(raw_lengths)) > cap:
                    entries.append(out.close())
                    out = None
                if out is None:
                    out = _OpenShard(storage, shard_name(seq), next_first, footer_meta, multi=multi)
                    seq += 1
                out.add(frame, int(row["checksum"]), raw_lengths)
                next_first += len(raw_lengths)
        finally:
            handle.close()
    if out is not None:
        entries.append(out.close())
    return entries, salvaged, lost


def _loose_metadata(raw: bytes) -> dict[str, Any] | None:
    """The ``metadata`` object of a damaged index, if its JSON still parses."""
    try:
        obj = strict_json_loads(raw)
    except (ValueError, RecursionError):
        return None
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else None


def _created_by() -> dict[str, Any]:
    from .writer import _created_by as writer_created_by

    return writer_created_by()

