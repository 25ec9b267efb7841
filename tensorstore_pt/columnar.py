"""Columnar frames (format 1.3, feature ``columnar-frames``): container-free records, column by column.

A *column block* is the decoded content of one columnar frame: the records of the frame kept
as their parts (:mod:`._ptzip`: the pickle, the storages, a few numbers), not as ``torch.save``
zip containers, and laid out column by column so that the codec sees like next to like: the
records' metadata (pickles included) back to back in column 0, then storage ``j`` of every
record back to back in column ``j + 1``. Each record's exact ``torch.save`` bytes are rebuilt
on demand (:meth:`ColumnBlock.record_bytes`), and a record can be loaded from its parts
without a zip container at all (:meth:`ColumnBlock.load_args` for
:func:`tensorstore_pt.fastload.fast_loads_parts`).

Block layout (docs/format.md, section 5.3), all integers little-endian::

    0         8        magic b"TSPTCOLS"
    8         4        u32 record count n (>= 1)
    12        4        u32 column count c (>= 1): 1 + the storage count of every record
    16        16 x c   per column: u64 column bytes, u8 filter, u8 element size, 6 zero bytes
    16 + 16c  4 x n    u32 metadata length of each record (column 0 is their concatenation)
    ...       4 x n(c-1) u32 storage sizes, record by record (storage j of record r: column j + 1)
    ...                the columns, back to back; the block ends where the last one ends

Filters (per column, chosen by the writer by measurement, undone by the reader before use):
``0`` none; ``1`` byte shuffle with element size ``e`` in {2, 4, 8} (the first
``L // e * e`` bytes are stored as byte 0 of every element, then byte 1, ...; the rest
verbatim); ``2`` delta of little-endian unsigned ``e``-byte integers, ``e`` in {1, 2, 4, 8}
(the first ``L // e * e`` bytes: the first value, then each difference to the previous modulo
``2**(8e)``; the rest verbatim). A column 0 filter MUST be 0.

Thread safety: functions are pure; a :class:`ColumnBlock` is safe to share between threads:
its checked tables are read-only, and what it fills in lazily (each record's parsed metadata,
rebuilt lengths by shape) is idempotent (two threads may compute an entry twice, never
differently; dict and list updates happen under the GIL). Fork/spawn safe (no handles).
Memory: a block holds its decoded input, one unfiltered copy of each filtered column, the
storage positions (4 bytes a record and storage, as the block's own size table) and the
parsed metadata of the records used so far.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any, Callable

import numpy as np

from . import _ptzip, fastload
from ._filters import FILTER_DELTA, FILTER_NONE, FILTER_SHUFFLE, _apply, _apply_into, _undo
from .errors import RecordLengthError, RecordMetaError
from .format import COLUMNAR_EXPANSION
from .shardio import check_record_budget

__all__ = [
    "FILTER_DELTA",
    "FILTER_NONE",
    "FILTER_REUSE_BLOCKS",
    "FilterMemo",
    "FILTER_SHUFFLE",
    "MAGIC",
    "MIN_FILTER_GAIN",
    "ColumnBlock",
    "assemble_block",
    "block_filters",
    "build_frame",
    "encode_block",
    "frame_plans",
]

#: The first 8 bytes of every column block.
MAGIC = b"TSPTCOLS"
_FILTER_SIZES = {FILTER_NONE: (0,), FILTER_SHUFFLE: (2, 4, 8), FILTER_DELTA: (1, 2, 4, 8)}
_FILTER_NAMES = {FILTER_NONE: "none", FILTER_SHUFFLE: "shuffle", FILTER_DELTA: "delta"}
_HEAD = struct.Struct("<8sII")
_COLUMN = struct.Struct("<QBB6x")
#: A filter is kept only if it shrinks the column's coded bytes by at least this fraction
#: (measured at write time on up to FILTER_SAMPLE_BYTES of the column).
MIN_FILTER_GAIN = 0.02
#: Bytes of a column the writer codes per candidate filter to choose one.
FILTER_SAMPLE_BYTES = 16 * 1024
#: Most columns a block may have (a record with more storages is stored in a plain frame).
MAX_COLUMNS = 4096
#: A block of at least this many records loaded together (:meth:`ColumnBlock.load_all`), or
#: whose third record is read alone, parses all their metadata and checks their rebuilt
#: lengths with numpy at once: about 80 us a block plus 0.7 us a record here, against 3.5-8
#: us a record parsed alone.
PARSE_ALL_RECORDS = 16


# --------------------------------------------------------------------------- filters


#: Every filter a column may get but none, in the order they are tried.
_CANDIDATES = tuple((filt, size) for filt in (FILTER_SHUFFLE, FILTER_DELTA) for size in _FILTER_SIZES[filt])


def choose_filter(
    col: bytes,
    compress: Callable[[bytes], bytes] | None,
    candidates: tuple[tuple[int, int], ...] = _CANDIDATES,
    ranked: list[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """``(filter, element size)`` for a column: the candidate whose coded size (``compress``
    of up to :data:`FILTER_SAMPLE_BYTES` of it) is smallest, if it beats no filter by at least
    :data:`MIN_FILTER_GAIN`; ``(0, 0)`` without a codec (filters only help a codec).
    ``candidates``: the filters to try (all by default); ``ranked``, if given, receives the
    filters tried, smallest coded size first."""
    if compress is None or len(col) < 64:
        return FILTER_NONE, 0
    sample = col[:FILTER_SAMPLE_BYTES]
    plain = len(compress(sample))
    sizes = []
    for filt, size in candidates:
        if filt == FILTER_NONE or len(sample) < 4 * size:
            continue
        sizes.append((len(compress(_apply(sample, filt, size))), len(sizes), (filt, size)))
    sizes.sort()
    if ranked is not None:
        ranked[:] = [c for _, _, c in sizes]
    if sizes and sizes[0][0] <= plain * (1.0 - MIN_FILTER_GAIN):
        return sizes[0][2]
    return FILTER_NONE, 0


#: Between two choices of a column's filter among every candidate, a writer tries only the
#: two that did best in the last one, for this many blocks of records alike
#: (:class:`FilterMemo`).
FILTER_REUSE_BLOCKS = 16
#: A storage type named in a pickle (``torch.FloatStorage``, ``torch.HalfStorage``...).
_STORAGE_TYPE = re.compile(rb"torch\n(\w+Storage)\n")


class FilterMemo:
    """The filters a writer chose for the columns of its recent blocks, so that a run of
    blocks of records alike tries every candidate filter once every
    :data:`FILTER_REUSE_BLOCKS` blocks and, in between, only none and the two that did best
    then: choosing codes up to :data:`FILTER_SAMPLE_BYTES` of a column once per filter tried
    (8 times for all of them, 3 in between).

    Records are *alike* when they have the same number of storages and their pickles name
    the same storage types in the same order (``torch.FloatStorage`` then
    ``torch.LongStorage``...); a block's first record stands for it. A filter only changes
    how well a column codes, never what it decodes to, so a filter missed costs bytes at
    worst. The choices depend only on the records, in order: a store written by any number
    of workers (whose records are framed in order by the writer) gets the same bytes.

    Thread safety: one writer's, not shared.
    """

    def __init__(self) -> None:
        # key -> [the filters to try (besides none), blocks since they were all tried]
        self._chosen: dict[tuple[Any, ...], list[Any]] = {}

    def choose(self, key: tuple[Any, ...], col: bytes, compress: Callable[[bytes], bytes] | None) -> tuple[int, int]:
        """:func:`choose_filter` of ``col`` among every candidate, or, within
        :data:`FILTER_REUSE_BLOCKS` blocks of the last such choice for ``key``, among the two
        that did best in it."""
        got = self._chosen.get(key)
        if got is not None and got[1] < FILTER_REUSE_BLOCKS:
            got[1] += 1
            return choose_filter(col, compress, got[0])
        ranked: list[tuple[int, int]] = []
        choice = choose_filter(col, compress, _CANDIDATES, ranked)
        if len(self._chosen) >= 4096:
            self._chosen.clear()
        # The two filters that coded this column best (whether or not they beat none): a
        # column whose best filter is near the threshold keeps trying it.
        self._chosen[key] = [tuple(ranked[:2]), 1]
        return choice


def _storage_types(pickle: Any) -> tuple[bytes, ...]:
    """The storage types a record's pickle names, in order of first mention."""
    return tuple(dict.fromkeys(_STORAGE_TYPE.findall(bytes(pickle))))


# --------------------------------------------------------------------------- writing


def encode_block(
    parts: list[_ptzip.PtParts], compress: Callable[[bytes], bytes] | None, memo: FilterMemo | None = None
) -> bytes:
    """The column block of records ``parts`` (all with the same storage count and layout):
    :func:`assemble_block` of the filters :func:`block_filters` chooses.

    Args:
        parts: From :func:`._ptzip.prove` of each record, in record order (at least one).
        compress: The store's codec (``Codec.compress``) to choose filters by, or None (codec
            ``none``: no filters).
        memo: The writer's filter choices for blocks of records like these (see
            :class:`FilterMemo`), or None to measure every column.

    Returns:
        The block's bytes (docs/format.md, section 5.3).

    Raises:
        ValueError: ``parts`` is empty, the records differ in storage count, or have more
            than ``MAX_COLUMNS - 1`` storages (the writer stores such records in plain frames).
    """
    return assemble_block(parts, block_filters(parts, compress, memo))


def _check_block_parts(parts: list[_ptzip.PtParts]) -> int:
    """The storage count of records ``parts`` may share a block with; ValueError if they may not."""
    if not parts:
        raise ValueError("a column block holds at least one record")
    count = len(parts[0].storages)
    if any(len(p.storages) != count for p in parts) or count + 1 > MAX_COLUMNS:
        raise ValueError("a column block's records share one storage count, of at most MAX_COLUMNS - 1")
    return count


def _column_head(parts: list[_ptzip.PtParts], j: int) -> bytes:
    """The first :data:`FILTER_SAMPLE_BYTES` of storage column ``j`` of a block of ``parts``
    (all of it if shorter): what :func:`choose_filter` codes of the whole column."""
    pieces = []
    left = FILTER_SAMPLE_BYTES
    for p in parts:
        piece = p.storages[j][:left]
        pieces.append(piece)
        left -= len(piece)
        if not left:
            break
    return b"".join(pieces)


def block_filters(
    parts: list[_ptzip.PtParts], compress: Callable[[bytes], bytes] | None, memo: FilterMemo | None = None
) -> tuple[tuple[int, int], ...]:
    """``(filter, element size)`` of each storage column of a block of records ``parts``, as
    :func:`choose_filter` (or ``memo``, see :class:`FilterMemo`) chooses it from the column's
    first :data:`FILTER_SAMPLE_BYTES`. Depends only on ``parts``, ``compress`` and ``memo``
    (whose state it updates): a writer calls it on its own thread, block after block, so that
    the filters are the same however many threads then assemble and code the blocks."""
    count = _check_block_parts(parts)
    kind = (count, _storage_types(parts[0].pickle)) if memo is not None and compress is not None else None
    return tuple(
        choose_filter(_column_head(parts, j), compress)
        if kind is None
        else memo.choose((*kind, j), _column_head(parts, j), compress)  # type: ignore[union-attr]
        for j in range(count)
    )


def assemble_block(parts: list[_ptzip.PtParts], filters: tuple[tuple[int, int], ...]) -> bytearray:
    """The column block of records ``parts`` with storage column ``j`` stored under filter
    ``filters[j]`` (docs/format.md, section 5.3), in one buffer that each storage is copied
    into once, filtered on the way (a column of several records is first joined when a
    filter spans them). Pure: safe in any thread.

    Raises:
        ValueError: As :func:`encode_block`, or ``filters`` does not give one filter per
            storage column.
    """
    count = _check_block_parts(parts)
    if len(filters) != count:
        raise ValueError(f"a block of records with {count} storages needs {count} filters, found {len(filters)}")
    metas = [_ptzip.encode_meta(p) for p in parts]
    meta_lengths = [len(m) for m in metas]
    sizes = np.asarray([[len(st) for st in p.storages] for p in parts], dtype=np.int64).reshape(len(parts), count)
    widths = sizes.sum(axis=0).tolist()
    head = [_HEAD.pack(MAGIC, len(parts), count + 1)]
    head += [_COLUMN.pack(n, f, e) for n, (f, e) in zip([sum(meta_lengths), *widths], ((FILTER_NONE, 0), *filters))]
    head.append(np.asarray(meta_lengths, dtype="<u4").tobytes())
    head.append(sizes.astype("<u4").tobytes())
    head += metas
    head_bytes = b"".join(head)
    block = bytearray(len(head_bytes) + sum(widths))
    out = np.frombuffer(block, dtype=np.uint8)
    out[: len(head_bytes)] = np.frombuffer(head_bytes, dtype=np.uint8)
    pos = len(head_bytes)
    for j, (filt, size) in enumerate(filters):
        n = widths[j]
        if filt == FILTER_NONE:
            for p in parts:  # each storage straight into place
                st = p.storages[j]
                block[pos : pos + len(st)] = st
                pos += len(st)
            continue
        col = parts[0].storages[j] if len(parts) == 1 else b"".join(p.storages[j] for p in parts)
        _apply_into(col, filt, size, out[pos : pos + n])
        pos += n
    return block


def proved(raw: bytes, layout: _ptzip.PtLayout) -> tuple[_ptzip.PtParts | None, int]:
    """``(parts, content bytes)`` of a record a writer of ``layout`` stores compact: its parts
    if it proves under ``layout`` with fewer than ``MAX_COLUMNS`` storages (else None), and
    the bytes it adds to a frame: its metadata and storages (a column block holds no
    container), or its whole length (a plain frame)."""
    parts = _ptzip.prove(raw)
    if parts is None or parts.layout != layout or len(parts.storages) >= MAX_COLUMNS:
        return None, len(raw)
    return parts, len(parts.pickle) + parts.storage_bytes + _META_OVERHEAD_BYTES + 4 * len(parts.storages)


#: About what a record's metadata adds to its pickle (header, name hash, lengths, its own length).
_META_OVERHEAD_BYTES = 16

#: How a compact writer will store one run of records (:func:`frame_plans`): their
#: ``torch.save`` bytes, and their parts with the filter of each storage column (None: a
#: plain frame).
FramePlan = tuple[list[bytes], list[_ptzip.PtParts] | None, tuple[tuple[int, int], ...] | None]


def frame_plans(
    records: list[tuple[bytes, _ptzip.PtParts | None]],
    compress: Callable[[bytes], bytes] | None,
    memo: FilterMemo | None = None,
) -> list[FramePlan]:
    """The first, ordered half of :func:`plan_frames`: the runs of ``records`` and the filters
    of each run that may be a column block (:func:`block_filters`, which updates ``memo``).
    :func:`build_frame` of each plan, in any thread and any order, gives the frames."""
    runs: list[tuple[int | None, list[bytes], list[Any]]] = []
    for raw, parts in records:
        key = None if parts is None else len(parts.storages)
        if not runs or runs[-1][0] != key:
            runs.append((key, [], []))
        runs[-1][1].append(raw)
        runs[-1][2].append(parts)
    return [
        (group, None, None) if key is None else (group, parts_list, block_filters(parts_list, compress, memo))
        for key, group, parts_list in runs
    ]


def build_frame(plan: FramePlan) -> tuple[bytes, list[int], bool]:
    """``(decoded frame bytes, the records' raw lengths, is a column block)`` of one
    :data:`FramePlan`: the column block, or a plain frame (the records' bytes back to back)
    for records that did not prove or whose block they would rebuild to more than
    :data:`.format.COLUMNAR_EXPANSION` times (readers refuse such a block). Pure."""
    group, parts_list, filters = plan
    lengths = [len(r) for r in group]
    if parts_list is not None and filters is not None:
        block = assemble_block(parts_list, filters)
        if sum(lengths) <= COLUMNAR_EXPANSION * len(block):
            return block, lengths, True
    return (group[0] if len(group) == 1 else b"".join(group)), lengths, False


def plan_frames(
    records: list[tuple[bytes, _ptzip.PtParts | None]],
    compress: Callable[[bytes], bytes] | None,
    memo: FilterMemo | None = None,
) -> list[tuple[bytes, list[int], bool]]:
    """How a compact writer stores one group of records (``compact=True``): a column block
    for each run of consecutive records that proved (:func:`proved`) with the same storage
    count, a plain frame (their bytes back to back) for each run of records that did not, or
    whose block they would rebuild to more than :data:`.format.COLUMNAR_EXPANSION` times
    (readers refuse such a block). :func:`build_frame` of each of :func:`frame_plans`.

    Args:
        records: ``(torch.save bytes, parts or None)`` of each record, in order.
        compress: The codec's compress, to choose filters by (None: no filters).
        memo: Filter choices to reuse and update (:class:`FilterMemo`), or None.

    Returns:
        ``(decoded frame bytes, the records' raw lengths, is a column block)`` per frame.
    """
    return [build_frame(plan) for plan in frame_plans(records, compress, memo)]


# --------------------------------------------------------------------------- reading


def shown_sizes(sizes: list[int]) -> str:
    """A list of storage sizes for a message, cut after 8."""
    return str(sizes[:8])[:-1] + (f", ... ({len(sizes)} in all)]" if len(sizes) > 8 else "]")


def _bad(where: str, what: str) -> RecordMetaError:
    return RecordMetaError(f"{where}: column block: {what}")


class ColumnBlock:
    """A parsed column block, its tables checked (see the module docstring).

    Args:
        data: The decoded frame (bytes-like; kept and viewed, not copied).
        layout: The container layout of the shard (its footer's ``columnar_layout``).
        records: The number of records the shard's record map gives the frame.
        where: Context for messages.

    Raises:
        RecordMetaError: Anything malformed in the block's tables: magic, counts (against
            ``records``), column entries (unknown filter, element size, a column 0 filter),
            lengths that do not add up to the block (a column that runs past the block, bytes
            left over), metadata lengths or storage sizes that do not add up to their column.
            All checked here. A record's own metadata (its checks, see
            :func:`._ptzip.decode_meta`, and that it lists exactly the storage sizes of the
            size table) is parsed and checked when the record is first used, so a random read
            parses one record's metadata, not the block's; the methods raise it then.
            Allocations are bounded by the block's length (one unfiltered copy per filtered
            column, and a few ints per record).
    """

    __slots__ = (
        "_all",
        "_alone",
        "_last",
        "_lengths",
        "_meta_at",
        "_metas",
        "_nbytes",
        "_spans",
        "_fresh",
        "_starts",
        "_table_sizes",
        "columns",
        "constants",
        "first",
        "layout",
        "loaded",
        "n",
        "spent",
        "where",
    )

    def __init__(self, data: Any, layout: _ptzip.PtLayout, records: int, where: str) -> None:
        mv = memoryview(data).cast("B")
        size = len(mv)
        self.where = where
        self.layout = layout
        #: The layout's constant records by name (``version``, ``byteorder``...).
        self.constants = dict(layout.constants)
        if size < _HEAD.size:
            raise _bad(where, f"{size} bytes, shorter than its {_HEAD.size}-byte header")
        magic, n, c = _HEAD.unpack_from(mv, 0)
        if magic != MAGIC:
            raise _bad(where, f"magic {magic!r}, expected {MAGIC!r}")
        if n != records or n < 1:
            raise _bad(where, f"holds {n} records, the record map gives the frame {records}")
        if not 1 <= c <= MAX_COLUMNS:
            raise _bad(where, f"{c} columns, expected 1..{MAX_COLUMNS}")
        tables = _HEAD.size + _COLUMN.size * c
        pos = tables + 4 * n * c
        if pos > size:
            raise _bad(where, f"its column and length tables need {pos} bytes, the block has {size}")
        specs = [_COLUMN.unpack_from(mv, _HEAD.size + _COLUMN.size * j) for j in range(c)]
        meta_lengths = np.frombuffer(mv, dtype="<u4", count=n, offset=tables).astype(np.int64)
        # Views of the block's table (4 bytes a record and storage, not copied).
        sizes = np.frombuffer(mv, dtype="<u4", count=n * (c - 1), offset=tables + 4 * n).reshape(n, c - 1)
        cols: list[memoryview] = []
        for j, (length, filt, esize) in enumerate(specs):
            if filt not in _FILTER_SIZES or esize not in _FILTER_SIZES[filt] or (j == 0 and filt != FILTER_NONE):
                raise _bad(where, f"column {j} has filter {filt} with element size {esize}, not one of {_FILTER_NAMES}")
            if bytes(mv[_HEAD.size + _COLUMN.size * j + 10 : _HEAD.size + _COLUMN.size * (j + 1)]) != bytes(6):
                raise _bad(where, f"column {j}'s entry has non-zero reserved bytes")
            if length > size - pos:
                raise _bad(where, f"column {j} of {length} bytes runs past the block ({size - pos} bytes left)")
            cols.append(_undo(mv[pos : pos + length], filt, esize))
            pos += length
        if pos != size:
            raise _bad(where, f"{size - pos} bytes after its last column")
        if int(meta_lengths.sum()) != len(cols[0]):
            raise _bad(
                where, f"record metadata lengths add up to {int(meta_lengths.sum())} bytes, column 0 has {len(cols[0])}"
            )
        totals = sizes.sum(axis=0, dtype=np.int64).tolist()
        for j, total in enumerate(totals):
            if total != len(cols[j + 1]):
                raise _bad(where, f"storage {j}'s sizes add up to {total} bytes, its column has {len(cols[j + 1])}")
        self.columns = cols
        #: Per storage column, whether it is a buffer of its own (a filter's output), not a
        #: view of the decoded frame (see :meth:`load_all`'s ``spent``).
        self._fresh = [spec[1] != FILTER_NONE for spec in specs[1:]]
        self.n = n
        self._nbytes = size + sum(len(col) for col, spec in zip(cols, specs) if spec[1] != FILTER_NONE)
        # Where each record's metadata and storages start: every table is checked above, each
        # record's metadata when the record is first used (against the size table), so a
        # random read parses one record's metadata, not the block's (from a block's third
        # record used, or when it loads together, all are parsed at once: _parse_all).
        meta_at = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(meta_lengths, out=meta_at[1:])
        # Where each storage starts in its column: 4 bytes a record and storage (the columns
        # add up to less than the block, checked above), as many as the block's table spends.
        starts = np.zeros((n, c - 1), dtype=np.uint32 if size < 2**32 else np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], axis=0, dtype=starts.dtype, out=starts[1:])
        self._meta_at = meta_at
        self._table_sizes = sizes
        self._starts = starts
        self._metas: list[Any] = [None] * n
        # The last metadata parsed: (length, where its name hash starts, the bytes before it,
        # where its varints end, the varints, where its pickle starts, archive, storage sizes,
        # where each CRC-32 is or None). Records of one shape differ only in their name hash,
        # CRC-32s (kept for storages of 64 KiB or more) and pickle bytes.
        self._last: tuple[Any, ...] | None = None
        self._lengths: dict[tuple[str, tuple[int, ...], int], int] = {}  # rebuilt length by shape
        # Every record's (pickle starts, pickle lengths, rebuilt lengths) as lists, from one
        # parse of the whole metadata column (:meth:`_parse_all`); None before it ran, False
        # if it did not take the block.
        self._all: tuple[list[int], list[int], list[int]] | bool | None = None
        self._alone = 0  # records whose metadata was parsed one by one
        self._spans: dict[tuple[int, ...], tuple[list[tuple[int, int]], int]] = {}  # storage blob by sizes
        #: The frame's first record in its shard (set by the reader).
        self.first = 0
        #: The records loaded together (:meth:`load_all`, set by the reader), or None.
        self.loaded: list[Any] | None = None
        #: Set by a reader that serves each record of the block once and then drops it: its
        #: records' tensors may use the block's own buffers in place (:meth:`spent_args`).
        self.spent = False

    def _meta(self, r: int) -> tuple[str, Any, int, tuple[int | None, ...], tuple[int, ...], tuple[int, ...]]:
        """Record ``r``'s (archive, pickle view, name hash, CRC-32s, storage sizes, storage
        starts in their columns), its metadata parsed and checked against the size table once.

        Raises:
            RecordMetaError: The metadata is malformed, or lists other storages than the table.
        """
        got = self._metas[r]
        if got is not None:
            return got  # type: ignore[no-any-return]
        if not 0 <= r < self.n:
            raise IndexError(f"record {r} of a block of {self.n}")
        lo, hi = int(self._meta_at[r]), int(self._meta_at[r + 1])
        col0 = self.columns[0]
        table = self._table_sizes[r].tolist()
        parsed = self._all
        if parsed is None and self._alone >= 2:
            # A third record of the block asked for (random reads over a block kept in a
            # reader's frame cache): parse them all at once, not one by one.
            parsed = self._parse_all()
        if parsed:  # the whole column parsed and checked: read this record's fields
            at, size = parsed[0][r], parsed[1][r]  # type: ignore[index]
            # Its name hash and kept CRC-32s where a metadata of these sizes holds them
            # (a CRC-32 for the pickle and each storage of CRC_STORED_MIN_BYTES or more).
            min_bytes = _ptzip.CRC_STORED_MIN_BYTES if self.layout.crc32 else None
            kept = tuple(0 if min_bytes is not None and v >= min_bytes else None for v in (size, *table))
            head, _, slots = _ptzip.meta_fields_at("archive", kept, at - lo)
            name_hash, crcs = _ptzip.read_meta_fields(col0, lo, head, slots, len(table))
            got = ("archive", col0[at : at + size], name_hash, crcs, tuple(table), tuple(self._starts[r].tolist()))
            self._metas[r] = got
            return got
        self._alone += 1
        last = self._last
        if (  # laid out as the last record parsed: the same bytes but for its name hash, its
            # CRC-32s and its pickle (records of one shape): those are read where they were
            last is not None
            and hi - lo == last[0]
            and col0[lo : lo + last[1]] == last[2]
            and col0[lo + last[1] + 8 : lo + last[3]] == last[4]
        ):
            _, head, _, sizes_end, _, prefix_bytes, archive, rec_sizes, crc_slots = last
            name_hash, crcs = _ptzip.read_meta_fields(col0, lo, head, crc_slots, len(rec_sizes))
            pickle = col0[lo + prefix_bytes : hi]
        else:
            try:
                archive, name_hash, rec_sizes, crcs, pickle = _ptzip.parse_meta(col0[lo:hi], self.layout)
            except RecordMetaError as exc:
                raise _bad(self.where, f"record {r}: {exc}") from None
            prefix_bytes = hi - lo - len(pickle)
            head, sizes_end, slots = _ptzip.meta_fields_at(archive, crcs, prefix_bytes)
            self._last = (
                hi - lo,
                head,
                bytes(col0[lo : lo + head]),
                sizes_end,
                bytes(col0[lo + head + 8 : lo + sizes_end]),
                prefix_bytes,
                archive,
                rec_sizes,
                slots,
            )
        if rec_sizes != table:
            raise _bad(
                self.where,
                f"record {r}'s metadata lists storages of {shown_sizes(rec_sizes)} bytes, the block's size table "
                f"{shown_sizes(table)} (the block's plan has {len(table)} storages)",
            )
        got = (archive, pickle, name_hash, crcs, tuple(table), tuple(self._starts[r].tolist()))
        self._metas[r] = got
        return got

    def check_all(self) -> None:
        """Parse and check every record's metadata now (what each record's first use does).

        Raises:
            RecordMetaError: The first record whose metadata is malformed or disagrees with
                the size table.
        """
        for r in range(self.n):
            self._meta(r)

    def __len__(self) -> int:
        """Bytes the block holds: the decoded frame plus the unfiltered copies of its columns
        (and, once :meth:`load_all` ran, its samples' storages)."""
        return self._nbytes

    def storages(self, r: int) -> tuple[memoryview, ...]:
        """Record ``r``'s storages, in key order (views into the block)."""
        _, _, _, _, sizes, starts = self._meta(r)
        cols = self.columns
        return tuple(cols[j + 1][lo : lo + n] for j, (lo, n) in enumerate(zip(starts, sizes)))

    def pickle(self, r: int) -> memoryview:
        """Record ``r``'s ``data.pkl`` bytes (a view)."""
        return self._meta(r)[1]

    def parts(self, r: int) -> _ptzip.PtParts:
        """Record ``r``'s parts (views into the block)."""
        archive, pickle, name_hash, crcs, _, _ = self._meta(r)
        return _ptzip.PtParts(self.layout, archive, pickle, self.storages(r), name_hash, crcs)

    def check_length(self, r: int, raw_bytes: int) -> None:
        """Check record ``r``'s rebuilt length (computed, not built) against ``raw_bytes``, the
        record map's.

        Raises:
            RecordLengthError: The record rebuilds to another length (kind ``record_length``).
            RecordMetaError: The parts would make a zip of 4 GiB or more.
        """
        parsed = self._all
        if parsed:
            length = parsed[2][r]  # type: ignore[index]
        else:
            archive, pickle, _, _, sizes, _ = self._meta(r)
            key = (archive, sizes, len(pickle))
            length = self._lengths.get(key)
            if length is None:
                length = self._lengths[key] = _ptzip.rebuilt_length(self.layout, archive, len(pickle), sizes)
        if length != raw_bytes:
            exc = RecordLengthError(
                f"{self.where}: record {r} of the column block rebuilds to {length} bytes, the record map says "
                f"{raw_bytes}"
            )
            exc.problem = ("record_length", f"{raw_bytes} raw bytes (record map)", f"{length} bytes rebuilt")  # type: ignore[attr-defined]
            raise exc

    def record_bytes(self, r: int, raw_bytes: int, max_record_bytes: int) -> bytes:
        """Record ``r``'s exact ``torch.save`` bytes, which the record map says are ``raw_bytes``
        long (checked before they are built), if that is at most ``max_record_bytes``.

        The reader's budget is checked here, not only on the block: a record rebuilds to more
        bytes than it takes in its block (its zip container), up to ``COLUMNAR_EXPANSION``
        times as many.

        Raises:
            AllocationBudgetError: ``raw_bytes > max_record_bytes`` (problem ``record_budget``);
                nothing was built.
            RecordLengthError, RecordMetaError: As :meth:`check_length`.
        """
        check_record_budget(raw_bytes, max_record_bytes, f"{self.where}: record {r} of the column block")
        self.check_length(r, raw_bytes)
        return _ptzip.rebuild(self.parts(r))

    def check_crcs(self, r: int) -> None:
        """Check the CRC-32s record ``r`` keeps (of its pickle and storages of at least
        ``_ptzip.CRC_STORED_MIN_BYTES``) against its bytes. A rebuild copies them into the zip
        unchecked (the frame's checksum covers them, and computing them is what keeping them
        saves): one that lies (a writer's fault) would make :meth:`record_bytes` other bytes
        than ``torch.save`` wrote, with a zip entry whose CRC-32 does not hold. For deep checks.

        Raises:
            RecordMetaError: A kept CRC-32 differs from its bytes' (``problem``: kind
                ``record_load``).
        """
        _, pickle, _, crcs, _, _ = self._meta(r)
        if all(crc is None for crc in crcs):
            return
        for j, (crc, data) in enumerate(zip(crcs, (pickle, *self.storages(r)))):
            if crc is not None and zlib.crc32(data) != crc:
                name = "data.pkl" if j == 0 else f"data/{j - 1}"
                found = zlib.crc32(data)
                exc = RecordMetaError(
                    f"{self.where}: record {r} of the column block keeps CRC-32 {crc:#010x} for {name}, its "
                    f"{len(data)} bytes have {found:#010x}: it would not rebuild to torch.save's bytes"
                )
                exc.problem = ("record_load", f"CRC-32 {found:#010x} of {name}", f"{crc:#010x} kept")  # type: ignore[attr-defined]
                raise exc

    def collate_args(self, r: int, raw_bytes: int) -> tuple[bytes, tuple[memoryview, ...]]:
        """What :func:`~tensorstore_pt.fastload.collate_records` takes for record ``r``
        without a copy: its pickle and its storages (views into the block, read only), after
        :meth:`check_length` against ``raw_bytes``."""
        self.check_length(r, raw_bytes)
        return bytes(self._meta(r)[1]), self.storages(r)

    def load_args(self, r: int, raw_bytes: int) -> tuple[bytes, bytearray, list[tuple[int, int]]]:
        """What :func:`~tensorstore_pt.fastload.fast_loads_parts` takes for record ``r``: its
        pickle, and its storages copied into one fresh buffer, each at a multiple of the
        layout's alignment (as in the zip), with ``(offset, length)`` of each; after
        :meth:`check_length` against ``raw_bytes``."""
        self.check_length(r, raw_bytes)
        _, pickle, _, _, sizes, starts = self._meta(r)
        got = self._spans.get(sizes)
        if got is None:
            align = self.layout.alignment
            spans = []
            at = 0
            for n in sizes:
                spans.append((at, n))
                at += (n + align - 1) // align * align
            got = self._spans[sizes] = (spans, at)
        spans, total = got
        blob = bytearray(total)
        cols = self.columns
        for j, ((off, n), lo) in enumerate(zip(spans, starts)):
            blob[off : off + n] = cols[j + 1][lo : lo + n]
        return bytes(pickle), blob, spans

    def spent_args(self, r: int, raw_bytes: int) -> tuple[bytes, tuple[Any, ...], list[tuple[int, int]]]:
        """:meth:`load_args` for a block that serves record ``r`` once (see :meth:`load_all`'s
        ``spent``): a buffer a storage, the record's range of a column a filter wrote used in
        place if it is at least half that column (a sample kept pins at most twice its bytes),
        a copy of the others' (after :meth:`check_length` against ``raw_bytes``)."""
        self.check_length(r, raw_bytes)
        _, pickle, _, _, sizes, starts = self._meta(r)
        cols = self.columns
        bufs: list[Any] = []
        spans: list[tuple[int, int]] = []
        for j, (lo, n) in enumerate(zip(starts, sizes)):
            if self._fresh[j] and fastload.used_in_place(n, len(cols[j + 1])):
                bufs.append(cols[j + 1])
                spans.append((lo, n))
            else:
                bufs.append(bytearray(cols[j + 1][lo : lo + n]))
                spans.append((0, n))
        return bytes(pickle), tuple(bufs), spans

    def _parse_all(self) -> tuple[list[int], list[int], list[int]] | bool:
        """Parse and check every record's metadata at once, and compute every rebuilt length
        (:func:`._ptzip.parse_metas`, :func:`._ptzip.rebuilt_lengths`: the checks each
        record's first use makes, :meth:`_meta`), once a block: ``(pickle starts, pickle
        lengths, rebuilt lengths)``, or False when that parse does not take the block (fewer
        than :data:`PARSE_ALL_RECORDS` records, an archive name, a metadata that does not
        parse or lists other sizes than the size table, a record of 4 GiB or more):
        :meth:`_meta` then parses each record alone, which raises what it finds."""
        self._all = False
        if self.n < PARSE_ALL_RECORDS:
            return False
        got = _ptzip.parse_metas(self.columns[0], self._meta_at, self.layout, self._table_sizes)
        if got is None:
            return False
        at, pickle_bytes = got
        lengths = _ptzip.rebuilt_lengths(
            self.layout, "archive", np.column_stack((pickle_bytes, self._table_sizes.astype(np.int64)))
        )
        if lengths is None:
            return False
        self._all = (at.tolist(), pickle_bytes.tolist(), lengths.tolist())
        return self._all

    def _pickles(self, raw_bytes: Any) -> list[bytes | None] | None:
        """Every record's pickle, or None for a record whose rebuilt length is not
        ``raw_bytes[r]``, from the whole-block parse (:meth:`_parse_all`); None when that
        parse does not take the block."""
        parsed = self._all if self._all is not None else self._parse_all()
        if not parsed:
            return None
        at, pickle_bytes, lengths = parsed  # type: ignore[misc]
        col0 = self.columns[0]
        return [
            bytes(col0[a : a + p]) if length == int(want) else None
            for a, p, length, want in zip(at, pickle_bytes, lengths, raw_bytes)
        ]

    def load_all(self, raw_bytes: Any, spent: bool = False) -> list[Any] | None:
        """Every record of the block loaded together (:func:`.fastload.load_columns`): each
        tensor over a copy of its own bytes in its column (or, with ``spent``, over that
        range in place), not a pickle run per record.

        Each record's metadata is checked as its first use checks it, and its rebuilt length
        against ``raw_bytes[r]`` (the record map's), before anything is loaded.

        Args:
            raw_bytes: Each record's ``torch.save`` length from the record map (``n`` ints).
            spent: The caller hands each record out once and then drops the block: tensors
                are made over the ranges of the columns a filter wrote (buffers of the
                block's own) in place, not over copies, where a range is at least half its
                column (``owned`` of :func:`~.fastload.load_columns`). The block must not
                serve a record again.

        Returns:
            A list of ``n`` samples with :data:`.fastload.DECLINED` for the records to load
            one by one (among them any whose length disagrees: loading it alone raises the
            error), or None when the block is left to the one-by-one path (a record's
            metadata is malformed, torch's state is not plain...).
        """
        pickles = self._pickles(raw_bytes)
        if pickles is None:
            try:
                metas = [self._meta(r) for r in range(self.n)]
            except RecordMetaError:
                return None
            pickles = []
            for r, meta in enumerate(metas):
                try:
                    self.check_length(r, int(raw_bytes[r]))
                except (RecordLengthError, RecordMetaError):
                    pickles.append(None)
                    continue
                pickles.append(bytes(meta[1]))
        loaded = fastload.load_columns(
            pickles,
            self.columns[1:],
            self._table_sizes,
            self._starts,
            lambda r: self.load_args(r, int(raw_bytes[r])),
            self.constants,
            self._fresh if spent else None,
        )
        if loaded is not None:  # the samples' storages (copies of the columns' bytes), until handed out
            self._nbytes += sum(len(col) for col, fresh in zip(self.columns[1:], self._fresh) if not (spent and fresh))
        return loaded
