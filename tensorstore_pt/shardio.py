"""Shard I/O: the one place where shard bytes are read, checked, decoded and built.

The floor between :mod:`.format` (layouts, no I/O) and its users: the reader, the writer,
``verify`` (:mod:`.integrity`), ``recover`` (:mod:`.recover`) and the audit. Each of them
reads a frame, checks it and decodes it here, so ``verify --deep`` checks exactly what a read
checks and can never call clean what a read would refuse.

- :func:`read_exact`, :func:`file_digest`: bounded positional reads of a :class:`ReadHandle`;
- :func:`open_footer` (a shard on its own terms), :func:`read_footer` (a shard against
  the index), :func:`fetch_footer` (the same with one ranged read of the shard's tail),
  :func:`check_index_sizes`;
- :func:`check_frame`: a frame's xxh3_64, its raw length against the codec's worst case and
  the reader's ``max_record_bytes`` (both before any output buffer exists), the decode, and
  the decoded length; each failure a typed error carrying ``problem = (kind, expected,
  found)`` for ``verify``'s report;
- :func:`frame_records`, :func:`record_slices`: which records a frame holds;
- :class:`ShardBuilder`: writes one shard (header, frames, tables, footer, trailer) under a
  temporary name and publishes it without overwriting; :class:`FrameGrouper`: consecutive
  records into frames of about ``frame_target_bytes`` (format 1.1); :func:`train_dictionary`.

Format facts come from docs/format.md (sections 3-5); checksums are XXH3-64 (xxHash spec).
No torch import. Thread safety: the functions hold no state; a ShardBuilder belongs to one
thread.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Sequence

import numpy as np

from .checksums import ALGORITHM, FileHasher, digest_int, format_digest
from .codecs import Codec
from .errors import (
    AllocationBudgetError,
    ChecksumMismatchError,
    ConcurrentWriteError,
    DecompressionError,
    IndexFormatError,
    RecordLengthError,
    ShardFormatError,
    ShardSizeError,
    UnsupportedFormatError,
)
from .format import (
    COLUMNAR_EXPANSION,
    FEATURE_COLUMNAR_FRAMES,
    FEATURE_RAW_FRAMES,
    HEADER_BYTES,
    MAX_FOOTER_JSON_BYTES,
    RECORD_DTYPE,
    RECORD_ENTRY_BYTES,
    RECORD_MAP_DTYPE,
    RECORD_MAP_ENTRY_BYTES,
    TRAILER_BYTES,
    IndexInfo,
    ShardEntry,
    ShardFooter,
    decode_header,
    decode_trailer,
    encode_footer,
    encode_header,
    parse_footer,
    shown,
    version_for,
)
from .storage import AtomicWriter, ReadHandle, Storage

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "FrameGrouper",
    "ShardBuilder",
    "check_frame",
    "check_index_sizes",
    "check_record_budget",
    "fetch_footer",
    "file_digest",
    "frame_records",
    "open_footer",
    "read_exact",
    "read_footer",
    "record_slices",
    "dictionary_gain",
    "dictionary_sample",
    "train_dictionary",
]

#: Default ``max_record_bytes``: the largest raw record (decompressed ``torch.save`` buffer) a
#: reader decodes, 1 GiB. Checked before any output buffer exists.
DEFAULT_MAX_RECORD_BYTES = 2**30
#: Chunk of a whole-file digest (bytes): memory of :func:`file_digest`.
_DIGEST_CHUNK_BYTES = 8 * 2**20


def _failed(cls: type[Exception], kind: str, expected: str, found: str, message: str) -> Exception:
    """An error of ``cls`` whose ``problem`` is ``(kind, expected, found)`` for verify's report."""
    exc = cls(message)
    exc.problem = (kind, expected, found)  # type: ignore[attr-defined]
    return exc


# --------------------------------------------------------------------------- reads


def read_exact(
    handle: ReadHandle, offset: int, length: int, what: str, where: str, error: type[Exception] = ShardFormatError
) -> bytes:
    """Read exactly ``length`` bytes at ``offset``.

    Raises:
        ShardFormatError (or ``error``): Fewer bytes are there (the file is truncated).
    """
    data = handle.read_range(offset, length)
    if len(data) != length:
        raise error(f"{where}: {what} at byte {offset} needs {length} bytes, found {len(data)} (truncated)")
    return data


def file_digest(handle: ReadHandle, size: int) -> int:
    """XXH3-64 of the first ``size`` bytes of a file, read in 8 MiB chunks."""
    h = FileHasher()
    for off in range(0, size, _DIGEST_CHUNK_BYTES):
        h.update(handle.read_range(off, min(_DIGEST_CHUNK_BYTES, size - off)))
    return h.intdigest()


def open_footer(handle: ReadHandle, size: int, where: str) -> ShardFooter:
    """Parse a shard's trailer and footer on their own terms, the shard ending at byte ``size``.

    Raises:
        ShardFormatError: Too short, or a damaged trailer, record table or footer JSON.
    """
    if size < HEADER_BYTES + TRAILER_BYTES:
        raise ShardFormatError(
            f"{where}: expected at least {HEADER_BYTES + TRAILER_BYTES} bytes (header and trailer), found {size}"
        )
    trailer = read_exact(handle, size - TRAILER_BYTES, TRAILER_BYTES, "the trailer", where)
    table_offset, count, js_bytes, checksum = decode_trailer(trailer, size, where)
    body = read_exact(handle, table_offset, size - TRAILER_BYTES - table_offset, "the footer", where)
    try:
        return parse_footer(body, table_offset, count, checksum, where, js_bytes)
    except (IndexFormatError, UnsupportedFormatError) as exc:
        raise ShardFormatError(f"the footer JSON is not a v1 footer: {exc}") from exc


def read_footer(
    header: bytes,
    trailer: bytes,
    file_bytes: int,
    read_range: Callable[[int, int], bytes],
    index: IndexInfo,
    entry: ShardEntry,
    where: str,
) -> ShardFooter:
    """Check a shard's header, trailer and footer against each other and the index.

    Args:
        header: The first ``HEADER_BYTES`` bytes of the shard.
        trailer: The last ``TRAILER_BYTES`` bytes of the shard.
        file_bytes: The shard's size in bytes.
        read_range: Reads ``(offset, length)`` of the shard; only called for the record table
            and footer JSON, after the trailer has bounded them to lie inside the file.
        index: The store's parsed index.
        entry: The index entry of this shard.
        where: Context for messages.

    Returns:
        The parsed footer.

    Raises:
        ShardFormatError: Bad magic, version, trailer or footer, or a footer that disagrees with
            the index (version, record count, first record, codec, stored/raw byte sums).
    """
    try:
        version = decode_header(header, where)
    except UnsupportedFormatError as exc:
        raise ShardFormatError(f"{exc}, but the index says {index.version[0]}.{index.version[1]}") from exc
    table_offset, count, js_bytes, checksum = decode_trailer(trailer, file_bytes, where)
    if count != entry.records:
        raise ShardFormatError(f"{where}: footer holds {count} records, the index says {entry.records}")
    body = read_range(table_offset, file_bytes - TRAILER_BYTES - table_offset)
    try:
        footer = parse_footer(body, table_offset, count, checksum, where, js_bytes)
    except (IndexFormatError, UnsupportedFormatError) as exc:
        raise ShardFormatError(f"the footer JSON disagrees with the index: {exc}") from exc
    meta = footer.meta
    unknown = set(meta.get("features", [])) - set(index.features)
    if unknown:
        raise ShardFormatError(f"{where}: footer uses feature(s) {sorted(unknown)} the index does not list")
    if not header_version_ok(version, meta):
        raise ShardFormatError(
            f"{where}: header says format {version[0]}.{version[1]}, footer says {shown(meta.get('format_version'))}"
        )
    if meta.get("first_record") != entry.first_record:
        raise ShardFormatError(
            f"{where}: footer says first_record {shown(meta.get('first_record'))}, the index says {entry.first_record} "
            "(shards swapped or renamed?)"
        )
    if meta.get("codec") != index.codec:
        raise ShardFormatError(f"{where}: footer says codec {shown(meta.get('codec'))}, the index says {index.codec}")
    stored = int(footer.table["stored"].sum())
    raw = int(footer.table["raw"].sum())
    if footer.record_map is not None:
        # The records' raw bytes (a column block's records are longer than the block, format 1.3).
        records_raw = int(footer.record_map["raw"].sum())
        if footer.columnar_mask is None and records_raw != raw:
            raise ShardFormatError(f"{where}: record map and frame table disagree on the raw bytes")
        raw = records_raw
    if stored != entry.stored_bytes or raw != entry.raw_bytes:
        raise ShardFormatError(
            f"{where}: footer records add up to {stored} stored / {raw} raw bytes, the index says "
            f"{entry.stored_bytes} / {entry.raw_bytes}"
        )
    return footer


def header_version_ok(version: tuple[int, int], meta: dict[str, Any]) -> bool:
    """Whether a shard header's version fits its footer JSON (docs/format.md, section 5): equal
    to the footer's ``format_version``, or, when the footer lists "raw-frames" (a writer
    learns of a raw frame only after it wrote the header), the lowest version of the
    footer's other features."""
    footer_version = tuple(meta.get("format_version", ()))
    if footer_version == version:
        return True
    features = meta.get("features", [])
    return FEATURE_RAW_FRAMES in features and version == version_for([f for f in features if f != FEATURE_RAW_FRAMES])


#: Default speculative tail read of :func:`fetch_footer` when the index gives no usable size hint.
TAIL_BYTES = 64 * 2**10
#: Largest speculative tail read (bytes): 1 MiB covers the footer of a shard of about 32,000
#: frames; a larger footer takes a second read. Kept small because the read is sized by the
#: index before the shard's size is known to match it (a hostile index must not make the
#: reader allocate much).
MAX_TAIL_BYTES = 2**20
#: A shard whose first byte is at most this far before the speculative tail is read whole
#: (one read, header included).
WHOLE_SHARD_SLACK_BYTES = 4 * 2**10


def _tail_span(entry: ShardEntry) -> tuple[int, int]:
    """(offset, length) of the tail :func:`fetch_footer` reads of a shard of ``entry``'s
    ``file_bytes`` (at least ``HEADER_BYTES + TRAILER_BYTES``)."""
    size = entry.file_bytes
    hint = size - HEADER_BYTES - entry.stored_bytes
    want = min(hint, MAX_TAIL_BYTES) if TRAILER_BYTES <= hint <= size - HEADER_BYTES else TAIL_BYTES
    want = min(size, max(want, TRAILER_BYTES))
    if size - want <= WHOLE_SHARD_SLACK_BYTES:
        want = size
    return size - want, want


def fetch_footer(
    handle: ReadHandle,
    index: IndexInfo,
    entry: ShardEntry,
    where: str,
    head: Callable[[ReadHandle], Callable[[], bytes | None]] | None = None,
) -> ShardFooter:
    """Read and check a shard's footer with one ranged read of its tail (usually).

    The tail read is sized by the index: a well-formed shard's footer (record table, record
    map, footer JSON and trailer) is exactly ``file_bytes - HEADER_BYTES - stored_bytes`` bytes
    (docs/format.md, section 5), so that many bytes, at most :data:`MAX_TAIL_BYTES` (or
    :data:`TAIL_BYTES` when the index's numbers are impossible), are read in one request; a
    second read is made only when the trailer says the footer is larger than what was read.
    The shard's header is checked too, with one more read of ``HEADER_BYTES`` bytes, unless
    the shard is at most :data:`WHOLE_SHARD_SLACK_BYTES` larger than the tail: then it is read
    whole, header included, in the one read. The tail read asks for one byte past the
    index's ``file_bytes``, so that a shard longer or shorter than the index says is found
    without a size request.

    Args:
        handle: The open shard.
        index: The store's parsed index.
        entry: The shard's index entry.
        where: Context for messages.
        head: Where the header is read apart from the tail (the shard is not read whole),
            ``head(handle)`` is called just before the tail read, to start reading the
            header at the same time (in another thread); it returns a getter of the
            header's ``HEADER_BYTES`` bytes, or of None when that read failed: the header is
            then read here, after the tail, so the errors are those of reading without it.

    Returns:
        The parsed footer.

    Raises:
        ShardSizeError: The shard's size differs from the index's ``file_bytes``.
        ShardFormatError: As :func:`read_footer`.
    """
    size = entry.file_bytes
    if size < HEADER_BYTES + TRAILER_BYTES:
        raise ShardFormatError(
            f"{where}: expected at least {HEADER_BYTES + TRAILER_BYTES} bytes (header and trailer), found {size}"
        )
    base, want = _tail_span(entry)
    ahead = head(handle) if head is not None and base != 0 else None
    tail = handle.read_range(base, want + 1)
    if len(tail) != want:
        found = handle.size()
        raise ShardSizeError(f"{where}: expected {size} bytes (index), found {found} bytes on disk")
    view = memoryview(tail)

    def read_range(offset: int, length: int) -> bytes:
        if offset >= base:
            return bytes(view[offset - base : offset - base + length])
        return read_exact(handle, offset, length, "the footer", where, error=ShardSizeError)

    if base == 0:
        first = tail[:HEADER_BYTES]
    else:
        got = ahead() if ahead is not None else None
        first = got if got is not None and len(got) == HEADER_BYTES else None
        if first is None:
            first = read_exact(handle, 0, HEADER_BYTES, "the header", where, error=ShardSizeError)
    return read_footer(first, tail[-TRAILER_BYTES:], size, read_range, index, entry, where)


def check_index_sizes(index: IndexInfo, codec: Codec, where: str) -> None:
    """Check that each shard's raw bytes are possible for its stored bytes under ``codec``.

    A hostile index may claim that a few stored bytes hold terabytes of raw data; this refuses
    it before any shard is opened.

    Raises:
        IndexFormatError: A shard's ``raw_bytes`` is above the codec's worst-case bound.
    """
    raw_frames = FEATURE_RAW_FRAMES in index.features
    columnar = FEATURE_COLUMNAR_FRAMES in index.features
    for entry in index.shards:
        bound = codec.max_raw_bytes(entry.stored_bytes, entry.records)
        if raw_frames:  # frames stored raw (format 1.2) hold at most their stored bytes
            bound += entry.stored_bytes
        if columnar:  # a column block's records rebuild to at most COLUMNAR_EXPANSION x it (1.3)
            bound *= COLUMNAR_EXPANSION
        if entry.raw_bytes > bound:
            raise IndexFormatError(
                f"{where}: shard {entry.name!r} says {entry.raw_bytes} raw bytes, but {entry.records} "
                f"{codec.codec_id} frame(s) of {entry.stored_bytes} bytes decode to at most {bound} bytes"
            )


def frame_records(footer: ShardFooter) -> list[tuple[int, int]]:
    """Per frame, the half-open range of the shard's records it holds."""
    frames = len(footer.table)
    if footer.record_map is None:
        return [(k, k + 1) for k in range(frames)]
    bounds = np.searchsorted(footer.record_map["frame"], np.arange(frames + 1), side="left").tolist()
    return [(int(bounds[f]), int(bounds[f + 1])) for f in range(frames)]


def record_slices(footer: ShardFooter, first: int, end: int) -> list[tuple[int, int]]:
    """(raw_offset, raw_bytes) in the decoded frame of each shard record in ``[first, end)``."""
    if footer.record_map is None:
        return [(0, int(footer.table["raw"][first]))]
    rows = footer.record_map[first:end]
    return list(zip(rows["raw_offset"].tolist(), rows["raw"].tolist()))


# --------------------------------------------------------------------------- frames


def check_frame(
    codec: Codec | None,
    row: Any,
    frame: bytes | memoryview,
    where: str,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    writable: bool = False,
    stored_raw: bool = False,
) -> bytes | bytearray | None:
    """Check one stored frame and decode it: the single frame pipeline of every reader.

    In order: the frame's XXH3-64 against the footer's; its raw length against the codec's
    worst-case ratio (docs/format.md, section 6.1) and against ``max_record_bytes``, both before
    any output buffer exists; the decode (the codec checks the header's declared size first
    and never writes past ``raw``); the decoded length.

    Args:
        codec: The store's codec; None checks the checksum only (a missing dictionary).
        row: The frame's footer row (``stored``, ``raw``, ``checksum``: a ``RECORD_DTYPE``
            row, or a mapping with those keys).
        frame: The ``stored`` bytes of the frame.
        where: The place, for messages (store, shard, record).
        max_record_bytes: Refuse a frame that decodes to more than this (bytes).
        writable: Decode into a fresh ``bytearray`` (tensors can be built over it).
        stored_raw: The frame is stored raw (format 1.2, "raw-frames"): its stored bytes are
            its raw bytes, so its raw length must equal its stored length and "decoding" is
            no work (``bytes`` input is returned as is; a ``memoryview`` or ``writable`` gets
            one copy). The codec is not used.

    Returns:
        The decoded bytes; None when ``codec`` is None.

    Raises:
        ChecksumMismatchError: The digest differs (kind ``record_checksum``).
        RecordLengthError: The raw length is impossible for the frame, or the frame decodes to
            another length (kind ``record_length``).
        AllocationBudgetError: The raw length is above ``max_record_bytes``, or decoding ran out
            of memory (kind ``record_budget``); nothing past the check was allocated.
        DecompressionError: The codec refuses the frame (kind ``record_decode``).

    Every error carries ``problem = (kind, expected, found)``.
    """
    stored, raw, expected = int(row["stored"]), int(row["raw"]), int(row["checksum"])
    found = digest_int(frame)
    if found != expected:
        raise _failed(
            ChecksumMismatchError,
            "record_checksum",
            format_digest(expected),
            format_digest(found),
            f"{where}: checksum mismatch ({ALGORITHM}): footer says {expected:016x}, the {stored} stored bytes "
            f"give {found:016x}",
        )
    if codec is None:
        return None
    if stored_raw:
        return _raw_frame(row, frame, where, max_record_bytes, writable)
    bound = codec.max_raw_bytes(stored)
    if raw > bound:
        raise _failed(
            RecordLengthError,
            "record_length",
            f"at most {bound} raw bytes for a {stored}-byte {codec.codec_id} frame",
            f"{raw} raw bytes in the footer",
            f"{where}: the footer says the record is {raw} raw bytes, but a {stored}-byte {codec.codec_id} frame "
            f"decodes to at most {bound} bytes (a hostile or damaged footer; nothing was allocated)",
        )
    check_record_budget(raw, max_record_bytes, where)
    try:
        data = codec.decompress_into(frame, raw) if writable else codec.decompress(frame, raw)
    except DecompressionError as exc:
        raise _failed(
            DecompressionError,
            "record_decode",
            f"a {codec.codec_id} frame of {raw} raw bytes",
            str(exc),
            f"{where}: {exc}",
        ) from exc
    except MemoryError as exc:
        raise _failed(
            AllocationBudgetError,
            "record_budget",
            f"memory for {raw} raw bytes",
            "MemoryError",
            f"{where}: decoding the {stored}-byte frame into {raw} raw bytes ran out of memory",
        ) from exc
    if len(data) != raw:  # codecs check this too; kept as the pipeline's own guarantee
        raise _failed(
            RecordLengthError,
            "record_length",
            f"{raw} bytes",
            f"{len(data)} bytes",
            f"{where}: decoded {len(data)} bytes, the footer says {raw}",
        )
    return data


def check_record_budget(raw: int, max_record_bytes: int, where: str) -> None:
    """Refuse a frame whose footer row says more than ``max_record_bytes`` raw bytes.

    :func:`check_frame` does this before it allocates any output; a reader calls it before it
    reads the frame too, so that a frame over the budget is not read at all (a raw frame,
    format 1.2, is as large stored as decoded: reading it is the allocation).

    Raises:
        AllocationBudgetError: ``raw > max_record_bytes``; ``problem`` is ``("record_budget",
            ...)``.
    """
    if raw > max_record_bytes:
        raise _failed(
            AllocationBudgetError,
            "record_budget",
            f"at most max_record_bytes={max_record_bytes} raw bytes",
            f"{raw} raw bytes in the footer",
            f"{where}: the footer says the record is {raw} raw bytes, above max_record_bytes={max_record_bytes} "
            "(open the store with a larger max_record_bytes to read it); nothing was allocated",
        )


def _raw_frame(
    row: Any, frame: bytes | memoryview, where: str, max_record_bytes: int, writable: bool
) -> bytes | bytearray:
    """The tail of :func:`check_frame` for a frame stored raw (checksum already checked)."""
    stored, raw = int(row["stored"]), int(row["raw"])
    if raw != stored or len(frame) != stored:
        raise _failed(
            RecordLengthError,
            "record_length",
            f"{stored} raw bytes (a frame stored raw)",
            f"{raw} raw bytes in the footer, {len(frame)} bytes read",
            f"{where}: the frame is stored raw, so its raw length must equal its {stored} stored bytes; the footer "
            f"says {raw} raw bytes and {len(frame)} bytes were read",
        )
    check_record_budget(raw, max_record_bytes, where)
    if writable:
        return bytearray(frame)
    return frame if isinstance(frame, bytes) else bytes(frame)


class FrameGrouper:
    """Groups consecutive raw records into frames of about ``target`` raw bytes (format 1.1,
    "multi-record-frames"): a frame closes once its records reach ``target`` bytes; None
    gives one record per frame. Used by the writer and by the audit's projections alike."""

    def __init__(self, target: int | None) -> None:
        self.target = target
        self._group: list[bytes] = []
        self._bytes = 0

    def add(self, raw: Any, nbytes: int | None = None) -> list[Any] | None:
        """Add a record (counted as ``nbytes``, default ``len(raw)``: a compact writer counts a
        record's pickle and storages, format 1.3); return the records of a frame that just
        closed, if any."""
        if not self.target:
            return [raw]
        self._group.append(raw)
        self._bytes += len(raw) if nbytes is None else nbytes
        return self.flush() if self._bytes >= self.target else None

    def flush(self) -> list[bytes] | None:
        """Close the frame being grouped; return its records (None if empty)."""
        group, self._group, self._bytes = self._group, [], 0
        return group or None

    def clear(self) -> None:
        self._group, self._bytes = [], 0


#: Most raw bytes a zstd dictionary is trained on (bytes); chosen by measurement
#: (docs/benchmarks.md, "Bounded dictionary training").
DICT_TRAIN_BYTES = 4 * 2**20
#: Most records a zstd dictionary is trained on.
DICT_TRAIN_RECORDS = 4096
#: zstd's COVER parameters (segment size k, d-mer size d), fixed instead of searched: the
#: search (zstd's default when both are 0) took 1.4-17 s on 0.25-2 MB of image patches for
#: the same gain as one training with these values in 0.05 s (docs/benchmarks.md).
DICT_TRAIN_K = 1024
DICT_TRAIN_D = 8


def dictionary_sample(samples: list[bytes], max_bytes: int, max_records: int) -> list[bytes]:
    """Whole records of ``samples``, evenly spread over them (first one included, order kept),
    at most ``max_records`` of them and at most ``max_bytes`` bytes in all (at least one)."""
    if not samples:
        return []
    mean = max(1, sum(map(len, samples)) // len(samples))
    want = max(1, min(len(samples), max_records, max_bytes // mean))
    picked: list[bytes] = []
    total = 0
    for k in range(want):
        rec = samples[k * len(samples) // want]
        if picked and total + len(rec) > max_bytes:
            continue
        picked.append(rec)
        total += len(rec)
    return picked


def train_dictionary(
    samples: list[bytes],
    dict_bytes: int,
    level: int,
    max_bytes: int = DICT_TRAIN_BYTES,
    max_records: int = DICT_TRAIN_RECORDS,
) -> tuple[bytes, int]:
    """Train a zstd dictionary (``zstandard.train_dictionary``, zstd's ZDICT format) on a
    bounded sample of ``samples`` (:func:`dictionary_sample`: at most ``max_bytes`` bytes and
    ``max_records`` records) with fixed COVER parameters (``DICT_TRAIN_K``, ``DICT_TRAIN_D``),
    so that training takes a bounded time on any input.

    Returns:
        ``(dictionary bytes, its Dictionary_ID)``.

    Raises:
        zstandard.ZstdError: zstd cannot train one from these samples (too few, too small).
    """
    import zstandard

    sample = dictionary_sample(samples, max_bytes, max_records)
    try:
        trained = zstandard.train_dictionary(
            dict_bytes, sample, k=DICT_TRAIN_K, d=DICT_TRAIN_D, level=level, threads=-1
        )
    except zstandard.ZstdError:  # too little data for these parameters: zstd searches (a small sample: quick)
        trained = zstandard.train_dictionary(dict_bytes, sample, level=level, threads=-1)
    return trained.as_bytes(), trained.dict_id()


def dictionary_gain(samples: list[bytes], dictionary: bytes, level: int, max_bytes: int = DICT_TRAIN_BYTES) -> float:
    """The fraction of zstd bytes a dictionary saves on a bounded, evenly spread sample of
    ``samples`` (``1 - bytes with / bytes without``; 0.0 for no samples)."""
    import zstandard

    sample = dictionary_sample(samples, max_bytes, DICT_TRAIN_RECORDS)
    plain = zstandard.ZstdCompressor(level=level)
    with_dict = zstandard.ZstdCompressor(level=level, dict_data=zstandard.ZstdCompressionDict(dictionary))
    without = sum(len(plain.compress(r)) for r in sample)
    return 1 - sum(len(with_dict.compress(r)) for r in sample) / without if without else 0.0


# --------------------------------------------------------------------------- building


class ShardBuilder:
    """One shard being written: header and frames so far; frame and record rows in lists.

    The file is written under a temporary name (``Storage.writer(name, exclusive=True)``) and
    published by :meth:`close` without ever overwriting a file of that name.

    Memory: 32 bytes a frame and 24 a record of Python ints until :meth:`close`.
    """

    def __init__(
        self, storage: Storage, name: str, first_record: int, footer_meta: dict[str, Any], multi: bool
    ) -> None:
        self.name = name
        self.first_record = first_record
        self.footer_meta = footer_meta
        self.multi = multi
        self.out: AtomicWriter = storage.writer(name, exclusive=True)
        self.hasher = FileHasher()
        self.offsets: list[int] = []
        self.stored: list[int] = []
        self.raw: list[int] = []
        self.checksums: list[int] = []
        self.rec_frame: list[int] = []
        self.rec_offset: list[int] = []
        self.rec_raw: list[int] = []
        self.pos = 0
        self._js_zero: int | None = None
        self._js_raw_zero: int | None = None
        #: Frames stored raw (format 1.2), as the footer's ``raw_frames`` runs.
        self.raw_runs: list[list[int]] = []
        self._runs_js = 2  # len(json of raw_runs), "[]" while there is none
        #: Frames that decode to a column block (format 1.3), as ``columnar_frames`` runs.
        self.columnar = FEATURE_COLUMNAR_FRAMES in footer_meta["features"]
        self.col_runs: list[list[int]] = []
        self._cols_js = 2
        self._write(encode_header(version_for(footer_meta["features"])))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.hasher.update(data)
        self.pos += len(data)

    @property
    def records(self) -> int:
        return len(self.rec_raw) if self.multi else len(self.offsets)

    def meta(
        self,
        records: int,
        frames: int,
        raw_runs: list[list[int]] | None = None,
        col_runs: list[list[int]] | None = None,
    ) -> dict[str, Any]:
        """The shard's footer JSON object; with ``raw_runs`` (even empty), as a shard holding
        raw frames: feature "raw-frames" added, its version, and ``raw_frames``; in a shard
        that may hold column blocks, ``columnar_frames`` is ``col_runs`` (None: none yet)."""
        meta = {**self.footer_meta, "records": records, "first_record": self.first_record}
        if self.multi:
            meta["frames"] = frames
        if self.columnar:
            meta["columnar_frames"] = col_runs or []
        if raw_runs is not None:
            features = [*meta["features"], FEATURE_RAW_FRAMES]
            meta["features"] = features
            meta["format_version"] = list(version_for(features))
            meta["raw_frames"] = raw_runs
        return meta

    def _runs_js_with(self, raw: bool) -> int:
        """len(JSON of raw_runs) once frame ``len(self.offsets)`` is added (raw or not)."""
        return _runs_js_with(self.raw_runs, self._runs_js, raw, len(self.offsets))

    def _js_base(self, runs_js: int, cols_js: int | None = None) -> int:
        """len(footer JSON) with records = frames = 0, a ``raw_frames`` of ``runs_js``
        characters (2: ``[]``, none: the key is left out) and a ``columnar_frames`` of
        ``cols_js`` (default: as it is); each encoded once."""
        cols = (self._cols_js if cols_js is None else cols_js) - 2
        if runs_js > 2:
            if self._js_raw_zero is None:
                self._js_raw_zero = len(json.dumps(self.meta(0, 0, []), sort_keys=True, separators=(",", ":")).encode())
            return self._js_raw_zero + runs_js - 2 + cols
        if self._js_zero is None:
            self._js_zero = len(json.dumps(self.meta(0, 0), sort_keys=True, separators=(",", ":")).encode())
        return self._js_zero + cols

    def size_with(self, frame_bytes: int, records: int, raw: bool = False, columnar: bool = False) -> int:
        """File size if one more frame of ``records`` records (stored raw: ``raw``; a column
        block: ``columnar``) were added and the shard closed. A footer JSON past ``MAX_FOOTER_JSON_BYTES`` (readers refuse it;
        only reachable with tens of thousands of separate raw-frame runs) reports a size of
        ``2**63``, so the writer closes the shard first."""
        return self._closed_size(
            self.pos + frame_bytes,
            len(self.offsets) + 1,
            self.records + records,
            self._js_base(
                self._runs_js_with(raw), _runs_js_with(self.col_runs, self._cols_js, columnar, len(self.offsets))
            ),
        )

    def _closed_size(self, pos: int, n_frames: int, n_records: int, js_base: int) -> int:
        """File size once closed with ``pos`` bytes of header and frames, ``n_frames`` frames,
        ``n_records`` records and a footer JSON of :meth:`_js_base` ``js_base`` (``2**63`` if
        that JSON would pass ``MAX_FOOTER_JSON_BYTES``)."""
        # Only the digits of the two counts change: each adds len(str(n)) - 1 to that length.
        js = js_base + len(str(n_records)) - 1 + (len(str(n_frames)) - 1 if self.multi else 0)
        if js > MAX_FOOTER_JSON_BYTES:
            return 2**63
        tables = n_frames * RECORD_ENTRY_BYTES + (n_records * RECORD_MAP_ENTRY_BYTES if self.multi else 0)
        return pos + tables + js + TRAILER_BYTES

    def fitting(self, lengths: Sequence[int], cap: int, first_free: bool) -> int:
        """How many frames of ``lengths`` bytes (one record each, none stored raw; not multi),
        from the first, fit before the shard's size (:meth:`size_with` after each) would pass
        ``cap``: the frames :meth:`add` one at a time would take before the writer closes the
        shard. ``first_free``: the first frame is taken whatever its size (a fresh shard)."""
        base = self._js_base(self._runs_js)  # frames not stored raw leave raw_frames as it is
        pos, n = self.pos, len(self.offsets)
        k = len(lengths)
        # The closed size only grows as frames are added: if all of them fit, every prefix does.
        if self._closed_size(pos + sum(lengths), n + k, n + k, base) <= cap:
            return k
        taken = 0
        for length in lengths:
            pos += length
            n += 1  # one record a frame
            if not (first_free and taken == 0) and self._closed_size(pos, n, n, base) > cap:
                break
            taken += 1
        return taken

    def add_run(
        self, blob: bytes | memoryview, lengths: Sequence[int], checksums: list[int], raw_lengths: list[int]
    ) -> None:
        """:meth:`add` of one-record frames (not raw, not multi) of ``lengths`` bytes, back to
        back in ``blob``, in one write."""
        if not lengths:
            return
        self.offsets.extend(itertools.accumulate(lengths[:-1], initial=self.pos))
        self.stored.extend(lengths)
        self.raw.extend(raw_lengths)
        self.checksums.extend(checksums)
        self._write(blob)

    def add(
        self,
        frame: bytes,
        checksum: int,
        raw_lengths: list[int],
        raw: bool = False,
        block_bytes: int | None = None,
    ) -> None:
        """Append one frame holding records of ``raw_lengths`` bytes (one, unless multi);
        ``raw``: the frame is its decoded bytes themselves (format 1.2, "raw-frames");
        ``block_bytes``: the frame decodes to a column block of that many bytes holding those
        records (format 1.3, "columnar-frames"); None: to the records' bytes back to back."""
        columnar = block_bytes is not None
        decoded = sum(raw_lengths) if block_bytes is None else block_bytes
        if columnar:
            if not self.columnar:
                raise ValueError("a column block in a shard whose footer does not list 'columnar-frames'")
            self._cols_js = _runs_js_with(self.col_runs, self._cols_js, True, len(self.offsets))
            _extend_runs(self.col_runs, len(self.offsets))
        if raw:
            if len(frame) != decoded:
                raise ValueError(f"a raw frame is its decoded bytes: {len(frame)} bytes for {decoded}")
            self._runs_js = self._runs_js_with(True)
            _extend_runs(self.raw_runs, len(self.offsets))
        if self.multi:
            offset = 0
            for n in raw_lengths:
                self.rec_frame.append(len(self.offsets))
                self.rec_offset.append(offset)
                self.rec_raw.append(n)
                offset += n
        self.offsets.append(self.pos)
        self.stored.append(len(frame))
        self.raw.append(decoded)
        self.checksums.append(checksum)
        self._write(frame)

    def close(self) -> ShardEntry:
        """Write the tables, footer and trailer; publish the shard; return its index entry.

        Raises:
            ConcurrentWriteError: A file of this name appeared meanwhile (never overwritten).
        """
        entry = self.finish()
        self.publish()
        return entry

    def finish(self) -> ShardEntry:
        """Write the tables, footer and trailer (nothing is published yet); return the shard's
        index entry. :meth:`publish` then commits the file; it may run on another thread (the
        builder is not touched again here)."""
        table = np.zeros(len(self.offsets), dtype=RECORD_DTYPE)
        table["offset"] = self.offsets
        table["stored"] = self.stored
        table["raw"] = self.raw
        table["checksum"] = self.checksums
        record_map = None
        if self.multi:
            record_map = np.zeros(len(self.rec_raw), dtype=RECORD_MAP_DTYPE)
            record_map["frame"] = self.rec_frame
            record_map["raw_offset"] = self.rec_offset
            record_map["raw"] = self.rec_raw
        meta = self.meta(self.records, len(self.offsets), self.raw_runs or None, self.col_runs)
        self._write(encode_footer(table, meta, record_map))
        return ShardEntry(
            name=self.name,
            records=self.records,
            first_record=self.first_record,
            file_bytes=self.pos,
            stored_bytes=sum(self.stored),
            raw_bytes=sum(self.rec_raw) if self.multi else sum(self.raw),
            checksum=self.hasher.intdigest(),
        )

    def publish(self) -> None:
        """Commit the finished file under its name (flush, fsync, link: see the storage's
        ``AtomicWriter.commit``).

        Raises:
            ConcurrentWriteError: A file of this name appeared meanwhile (never overwritten).
            OSError: From the storage (a full disk: ``errno`` ENOSPC).
        """
        try:
            self.out.commit()
        except FileExistsError as exc:
            raise ConcurrentWriteError(
                f"shard {self.name!r} was published by another writer while this one was writing; "
                "one writer at a time per store"
            ) from exc


def _runs_js_with(runs: list[list[int]], js: int, flag: bool, fi: int) -> int:
    """len(JSON of ``runs``, now ``js``) once frame ``fi`` (the next) is added, in the runs
    (``flag``) or not."""
    if not flag:
        return js
    if runs and runs[-1][1] == fi:  # extends the last run: its end gains digits
        return js + len(str(fi + 1)) - len(str(fi))
    return js + len(f"[{fi},{fi + 1}]") + (1 if runs else 0)


def _extend_runs(runs: list[list[int]], fi: int) -> None:
    """Add frame ``fi`` (the next) to ``[first, end]`` runs."""
    if runs and runs[-1][1] == fi:
        runs[-1][1] = fi + 1
    else:
        runs.append([fi, fi + 1])
