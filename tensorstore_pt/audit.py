"""Storage-size audits: where the bytes of a store, or of a pile of ``.pt`` files, go.

:func:`audit_path` (``tspt audit PATH``) takes a store, a directory of ``.pt`` files (one
sample each) or one ``.pt`` file (a list of samples, or a dict of equal-length columns, as
``tspt pack`` reads it) and returns an :class:`AuditReport`:

- totals: records, bytes on disk (and allocated in file-system blocks, for ``.pt`` files),
  raw bytes (the ``torch.save`` buffers), stored bytes and the ratio; for a store, bytes per
  shard and per codec;
- where the raw bytes go (:class:`ByteBreakdown`): tensor payload bytes by key and by dtype,
  against the ``torch.save`` container overhead (the pickle, and the zip's headers,
  alignment padding and bookkeeping entries);
- the largest records, and the records whose serialized tensor bytes are far above their
  elements' bytes (a view saved with its whole storage: ``torch.save`` of a 10-element
  slice of a 40 MB tensor writes 40 MB). The writer compacts such views; ``.pt`` files
  often hold them;
- a projection for each codec candidate (:data:`DEFAULT_CANDIDATES`): bytes on disk once
  packed, compress and decode throughput measured on a sample of records, and a
  recommendation.

Records are loaded with ``torch.load(weights_only=True)`` semantics; a pickle that asks for
anything else raises :class:`~tensorstore_pt.errors.UnsafePayloadError` and is never run.

Pure functions: nothing here prints or writes files (``tspt audit`` formats the report,
:mod:`._plot` draws it). Throughputs are in MB/s of raw bytes (10**6 bytes a second) on
this machine, from the median of ``repeats`` timed passes over the sample.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checksums import digest_int
from .codecs import Codec
from .columnar import ColumnBlock
from .errors import InvalidOptionError, StoreNotFoundError, UnsafePayloadError
from .format import HEADER_BYTES, INDEX_NAME, RECORD_ENTRY_BYTES, TRAILER_BYTES
from .sources import load_pt_bytes, pt_files

__all__ = [
    "BLOAT_FACTOR",
    "DEFAULT_CANDIDATES",
    "AuditReport",
    "ByteBreakdown",
    "CodecProjection",
    "RecordSize",
    "ShardSize",
    "audit_path",
    "audit_pt",
    "audit_store",
    "codec_label",
    "pack_arguments",
    "pack_size_warning",
]

#: Packing options projected by default, as :func:`~tensorstore_pt.write_store` keywords:
#: none, lz4, zstd levels 1, 3 and 9, then the format 1.1 options: zstd 3 with a trained
#: 16 KiB dictionary, and zstd 3 with 64 KiB multi-record frames, and format 1.3's container-free
#: columnar frames (``compact``, 64 KiB frames). New options join as they land.
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"codec": "none"},
    {"codec": "lz4", "level": 0},
    {"codec": "zstd", "level": 1},
    {"codec": "zstd", "level": 3},
    {"codec": "zstd", "level": 9},
    {"codec": "zstd", "level": 3, "dictionary": 16 * 2**10},
    {"codec": "zstd", "level": 3, "frame_target_bytes": 64 * 2**10},
    {"codec": "zstd", "level": 3, "compact": True},
)
_CANDIDATE_KEYS = frozenset({"codec", "level", "dictionary", "frame_target_bytes", "compact"})

#: A record is flagged as bloated when its serialized tensor bytes exceed its tensors'
#: element bytes by this factor (and by at least ``_BLOAT_MIN_BYTES``).
BLOAT_FACTOR = 2.0
_BLOAT_MIN_BYTES = 4096
#: Candidates within this fraction of the smallest projection count as equally small.
_SIZE_TOLERANCE = 0.05
#: Estimated footer JSON bytes per shard, and index bytes per shard, for projections.
_FOOTER_JSON_BYTES = 200
_INDEX_BYTES_PER_SHARD = 260
_INDEX_BASE_BYTES = 600
_DEFAULT_SHARD_BYTES = 64 * 2**20


def codec_label(options: dict[str, Any]) -> str:
    """A short name for packing options: ``none``, ``lz4-0``, ``zstd-3``, ``zstd-3+dict``,
    ``zstd-3+frames``, ``zstd-3+compact``.

    Accepts :data:`DEFAULT_CANDIDATES`-style options, or a store's codec config (``{"id":
    "zstd", "level": 3, "dict": {...}}``, with ``frames=True`` in it for a store with
    multi-record frames, ``compact=True`` for one with columnar frames).
    """
    codec = options.get("codec", options.get("id"))
    label = str(codec) + (f"-{options['level']}" if options.get("level") is not None else "")
    if options.get("dictionary") or options.get("dict"):
        label += "+dict"
    if options.get("compact"):
        label += "+compact"
    elif options.get("frame_target_bytes") or options.get("frames"):
        label += "+frames"
    return label


def _size_arg(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def pack_arguments(options: dict[str, Any]) -> str:
    """The ``tspt pack`` arguments for packing options (``--codec zstd --level 3 --dict``)."""
    args = [f"--codec {options['codec']}"]
    if options.get("level") is not None:
        args.append(f"--level {options['level']}")
    if options.get("dictionary"):
        args.append("--dict")
        if options["dictionary"] is not True and int(options["dictionary"]) != 16 * 2**10:
            args.append(f"--dict-size {_size_arg(int(options['dictionary']))}")
    if options.get("compact"):
        args.append("--compact")
    if options.get("frame_target_bytes"):
        args.append(f"--frame-size {_size_arg(int(options['frame_target_bytes']))}")
    return " ".join(args)


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class ByteBreakdown:
    """Where the raw (``torch.save``) bytes of the analysed records go. All sizes in bytes.

    ``raw_bytes == tensor_bytes + pickle_bytes + zip_bytes``.

    Attributes:
        records: Records analysed.
        raw_bytes: Their ``torch.save`` buffers.
        tensor_bytes: Tensor storage payload written (each storage once).
        element_bytes: What the tensors' elements need (``numel * element_size``); below
            ``tensor_bytes`` when views were saved with their whole storage.
        pickle_bytes: The pickled object structure (``data.pkl``).
        zip_bytes: The zip container: local and central headers, alignment padding and the
            small bookkeeping entries (``version``, ``byteorder``, ...).
        by_key: Tensor payload bytes per key path in the sample (``"image"``, ``"0"``,
            ``"meta/mask"``; ``"<sample>"`` for a bare tensor).
        by_dtype: Tensor payload bytes per dtype (``"float32"``).
    """

    records: int
    raw_bytes: int
    tensor_bytes: int
    element_bytes: int
    pickle_bytes: int
    zip_bytes: int
    by_key: dict[str, int]
    by_dtype: dict[str, int]

    @property
    def overhead_bytes(self) -> int:
        """Container overhead: pickle plus zip bytes."""
        return self.pickle_bytes + self.zip_bytes


@dataclass(frozen=True)
class RecordSize:
    """One record's sizes, in bytes.

    Attributes:
        record: Its position (store, ``.pt`` list) or file name (directory of ``.pt``).
        raw_bytes: Its ``torch.save`` buffer (for a ``.pt`` file: the file).
        stored_bytes: Its frame in a store; None for ``.pt`` files.
        tensor_bytes: Serialized tensor payload; None if not analysed.
        element_bytes: Tensor element bytes; None if not analysed.
        same_size: How many records (of those sized) have exactly this raw size; ``record``
            is the first of them. :attr:`AuditReport.largest` lists distinct sizes.
    """

    record: int | str
    raw_bytes: int
    stored_bytes: int | None = None
    tensor_bytes: int | None = None
    element_bytes: int | None = None
    same_size: int = 1


@dataclass(frozen=True)
class ShardSize:
    """A store's shard, sizes in bytes."""

    name: str
    records: int
    file_bytes: int
    stored_bytes: int
    raw_bytes: int


@dataclass(frozen=True)
class CodecProjection:
    """What packing with one codec would give, measured on a sample of records.

    Attributes:
        codec: The packing options, as :func:`~tensorstore_pt.write_store` keywords
            (``{"codec": "zstd", "level": 3}``).
        label: Their short name (``zstd-3``, ``zstd-3+dict``, ``zstd-3+frames``).
        stored_bytes: Projected total frame bytes for all records.
        file_bytes: Projected store size: frames, tables, headers, footers, dictionary and index.
        ratio: Raw bytes / ``file_bytes``.
        compress_mb_s: Compression throughput, MB/s of raw bytes.
        decode_mb_s: Sequential decode throughput as the reader does it (checksum the frame,
            then decompress), MB/s of raw bytes.
        read_bytes_per_record: Raw bytes decoded to read one record at random: the record
            itself, or its whole frame with multi-record frames.
        sample_records: Records the measurement used.
        decode_spread: Half the range of the timed decode passes over their median (0.1 =
            +-10%): how far ``decode_mb_s`` can be trusted.
        raw_frame_share: Fraction of the sampled frames the writer would store raw (format
            1.2: the codec saves less than ``writer.DEFAULT_RAW_BELOW`` of them); the bytes and
            decode speed above already count them raw.
        raw_frame_bytes: Projected extra bytes of those frames stored raw instead of coded
            (all records; what ``raw_below=0`` would save, at their read speed's cost).
    """

    codec: dict[str, Any]
    label: str
    stored_bytes: int
    file_bytes: int
    ratio: float
    compress_mb_s: float
    decode_mb_s: float
    read_bytes_per_record: int
    sample_records: int
    decode_spread: float = 0.0
    raw_frame_share: float = 0.0
    raw_frame_bytes: int = 0


@dataclass(frozen=True)
class AuditReport:
    """The result of an audit. Sizes in bytes; throughputs in MB/s (10**6 bytes/s).

    Attributes:
        source: The audited path.
        kind: ``"store"``, ``"pt_dir"`` or ``"pt_file"``.
        records: Records in the source.
        disk_bytes: Bytes the source takes now (file sizes; for a store, shards + index).
        allocated_bytes: File-system blocks the files occupy (``st_blocks * 512``); None
            where the platform does not say.
        files: Files the source is made of.
        raw_bytes: ``torch.save`` bytes of all records: exact for a store; for ``.pt``
            sources, what the writer would serialize (views compacted), estimated from the
            sample when not every record was serialized.
        stored_bytes: For a store, its frame bytes; None for ``.pt`` sources.
        codec: For a store, its codec config; None for ``.pt`` sources.
        shards: For a store, each shard's sizes.
        bytes_by_codec: Stored bytes per codec label (a store has one codec).
        breakdown: Where the bytes of the analysed records go: for a store, its raw records;
            for ``.pt`` sources, the files as they are (for one ``.pt`` file, the breakdown
            adds up to the file's size).
        largest: The largest records by raw bytes, largest first, one per distinct size
            (:attr:`RecordSize.same_size` counts the records of that size).
        bloated: Analysed records whose tensor bytes exceed ``BLOAT_FACTOR`` x their element
            bytes.
        projections: One per codec candidate, in the order given.
        load_mb_s: ``torch.load`` throughput over the sample's raw bytes (the same for every
            codec; compare it with ``decode_mb_s``).
        recommendation: The recommended codec's label.
        reason: Why, in one or two sentences with the numbers.
        notes: Further facts (sampling, estimates, warnings).
        packed_breakdown: For ``.pt`` sources, where the bytes of the analysed records go
            once packed: each record serialized on its own, views compacted (what the
            store's raw bytes will be). None for a store (its breakdown is that already).
        grows: For ``.pt`` sources, whether packing with the default options (zstd 3) makes
            the data bigger than the source is now.
    """

    source: str
    kind: str
    records: int
    disk_bytes: int
    allocated_bytes: int | None
    files: int
    raw_bytes: int
    stored_bytes: int | None
    codec: dict[str, Any] | None
    shards: tuple[ShardSize, ...]
    bytes_by_codec: dict[str, int]
    breakdown: ByteBreakdown
    largest: tuple[RecordSize, ...]
    bloated: tuple[RecordSize, ...]
    projections: tuple[CodecProjection, ...]
    load_mb_s: float
    recommendation: str
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)
    packed_breakdown: ByteBreakdown | None = None
    grows: bool = False

    @property
    def ratio(self) -> float:
        """Raw bytes / bytes on disk now (0.0 for an empty source)."""
        return self.raw_bytes / self.disk_bytes if self.disk_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["breakdown"]["overhead_bytes"] = self.breakdown.overhead_bytes
        if self.packed_breakdown is not None:
            d["packed_breakdown"]["overhead_bytes"] = self.packed_breakdown.overhead_bytes
        return d


# --------------------------------------------------------------------------- per record


@dataclass
class _Acc:
    """Accumulates a :class:`ByteBreakdown`."""

    records: int = 0
    raw: int = 0
    tensor: int = 0
    element: int = 0
    pickle: int = 0
    zip: int = 0
    by_key: dict[str, int] = field(default_factory=dict)
    by_dtype: dict[str, int] = field(default_factory=dict)

    def freeze(self) -> ByteBreakdown:
        def order(d: dict[str, int]) -> dict[str, int]:
            return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))

        return ByteBreakdown(
            self.records,
            self.raw,
            self.tensor,
            self.element,
            self.pickle,
            self.zip,
            order(self.by_key),
            order(self.by_dtype),
        )


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield (path or "<sample>"), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}" if path else str(i))


def _dtype_name(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _analyse(raw: bytes, obj: Any, acc: _Acc) -> tuple[int, int]:
    """Add one record to ``acc``; return (tensor bytes, element bytes)."""
    import torch

    tensor = element = 0
    seen: set[tuple[int, int]] = set()
    for key, t in _tensors(obj):
        if t.layout != torch.strided:
            if t.layout == torch.sparse_coo:
                parts = [t._values(), t._indices()]
            elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
                parts = [t.values(), t.crow_indices(), t.col_indices()]
            elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
                parts = [t.values(), t.ccol_indices(), t.row_indices()]
            else:
                parts = []
            nbytes = sum(p.numel() * p.element_size() for p in parts)
            tensor += nbytes
            element += nbytes
            acc.by_key[key] = acc.by_key.get(key, 0) + nbytes
            acc.by_dtype[_dtype_name(t)] = acc.by_dtype.get(_dtype_name(t), 0) + nbytes
            continue
        element += t.numel() * t.element_size()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if ident in seen:
            continue
        seen.add(ident)
        nbytes = storage.nbytes()
        tensor += nbytes
        acc.by_key[key] = acc.by_key.get(key, 0) + nbytes
        acc.by_dtype[_dtype_name(t)] = acc.by_dtype.get(_dtype_name(t), 0) + nbytes
    pickle_bytes = 0
    zip_tensor = None
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            zip_tensor = 0
            for info in zf.infolist():
                if info.filename.endswith("/data.pkl") or info.filename == "data.pkl":
                    pickle_bytes += info.compress_size
                elif "/data/" in info.filename:
                    zip_tensor += info.compress_size
    except zipfile.BadZipFile:  # a legacy (pre-1.6, non-zip) torch.save file: no zip container
        pickle_bytes = max(0, len(raw) - tensor)
    if zip_tensor is not None:
        tensor = zip_tensor  # the container's own count is authoritative
    acc.records += 1
    acc.raw += len(raw)
    acc.tensor += tensor
    acc.element += element
    acc.pickle += pickle_bytes
    acc.zip += max(0, len(raw) - tensor - pickle_bytes)
    return tensor, element


def _storage_bytes(obj: Any) -> int:
    """Bytes of the distinct storages behind a sample's strided tensors (what torch.save writes)."""
    import torch

    seen: dict[tuple[int, int], int] = {}
    for _, t in _tensors(obj):
        if t.layout == torch.strided:
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
    return sum(seen.values())


def _train_positions(n: int, sample: list[int], candidates: tuple[dict[str, Any], ...], k: int = 256) -> list[int]:
    """Up to ``k`` positions outside ``sample``, evenly spread over the others, to train
    candidate dictionaries on. Memory and time O(len(sample) + k), not O(n): the j-th
    position outside ``sample`` is j plus the number of sampled positions before it."""
    if not any(c.get("dictionary") for c in candidates):
        return []
    taken = np.unique(np.asarray(sample, dtype=np.int64))
    free = n - len(taken)
    if free <= 0:
        return []
    ranks = np.asarray(_evenly(free, k), dtype=np.int64)
    before = taken - np.arange(len(taken), dtype=np.int64)  # positions outside sample before each sampled one
    return (ranks + np.searchsorted(before, ranks, side="right")).tolist()


def _is_bloated(tensor: int, element: int) -> bool:
    return tensor > BLOAT_FACTOR * element and tensor - element >= _BLOAT_MIN_BYTES


def _evenly(n: int, k: int | None) -> list[int]:
    """``min(n, k)`` positions spread evenly over ``range(n)`` (all of them if k is None)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return sorted({int(x) for x in np.linspace(0, n - 1, k)})


# --------------------------------------------------------------------------- projections


def _timed(fn: Any, repeats: int, min_seconds: float) -> float:
    """Median seconds of one call of ``fn``: each of ``repeats`` runs loops for ``min_seconds``."""
    return _timed_spread(fn, repeats, min_seconds)[0]


def _timed_spread(fn: Any, repeats: int, min_seconds: float) -> tuple[float, float]:
    """(median seconds of one call, half the range of the runs over the median).

    One untimed call first: lazy set-up (codec contexts, page cache) is not a pass's cost.
    """
    fn()
    times = []
    for _ in range(repeats):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        times.append(elapsed / n)
    med = statistics.median(times)
    return med, ((max(times) - min(times)) / 2 / med if med else 0.0)


def _check_candidates(candidates: tuple[dict[str, Any], ...]) -> None:
    from .codecs import make_codec

    for c in candidates:
        if not isinstance(c, dict) or "codec" not in c or set(c) - _CANDIDATE_KEYS:
            raise InvalidOptionError(
                f"candidates: expected dicts with 'codec' and optionally {sorted(_CANDIDATE_KEYS - {'codec'})}, found {c!r}"
            )
        make_codec(c["codec"], c.get("level"))  # InvalidOptionError for a bad codec or level
        if c.get("dictionary") and c["codec"] != "zstd":
            raise InvalidOptionError(f"candidates: only zstd takes a dictionary, found {c!r}")


def _candidate_codec(options: dict[str, Any], train: list[bytes]) -> tuple[Codec, int]:
    """Build the candidate's codec; train its dictionary on ``train``. Returns (codec, dictionary bytes)."""
    from .codecs import make_codec
    from .codecs.zstd import ZstdCodec

    codec = make_codec(options["codec"], options.get("level"))
    if not options.get("dictionary"):
        return codec, 0
    from .shardio import train_dictionary

    level = getattr(codec, "level", 3)
    data, dict_id = train_dictionary(list(train), int(options["dictionary"]), level)
    ref = {
        "name": "audit.zdict",
        "checksum": f"xxh3_64:{digest_int(data):016x}",
        "dict_id": dict_id,
        "bytes": len(data),
    }
    return ZstdCodec(level, data, ref), len(data)


def _frames_of(raws: list[bytes], target: int | None) -> tuple[list[bytes], list[int]]:
    """Group consecutive records into frames as the writer does (:class:`.shardio.FrameGrouper`).

    Returns the frames' raw bytes and how many records each holds.
    """
    from .shardio import FrameGrouper

    grouper = FrameGrouper(target)
    groups = [g for r in raws if (g := grouper.add(r))]
    if (last := grouper.flush()) is not None:
        groups.append(last)
    return [b"".join(g) for g in groups], [len(g) for g in groups]


_LAYOUT: list[Any] = []  # this torch's container layout, once known (compact projections)


def _compact_frames_of(
    raws: list[bytes], target: int | None, codec: Codec
) -> tuple[list[bytes], list[int], list[bool]]:
    """:func:`_frames_of` as ``compact=True`` writes them: the decoded frames (column blocks,
    or plain frames for records that do not prove), how many records each holds, which are
    blocks."""
    from .columnar import FilterMemo, plan_frames, proved
    from .shardio import FrameGrouper
    from .writer import COMPACT_FRAME_BYTES, _this_torch_layout

    if not _LAYOUT:
        _LAYOUT.append(_this_torch_layout())
    layout = _LAYOUT[0]
    units: list[bytes] = []
    counts: list[int] = []
    blocks: list[bool] = []
    if layout is None:  # this torch's container is not one the writer can rebuild: plain frames
        units, counts = _frames_of(raws, target or COMPACT_FRAME_BYTES)
        return units, counts, [False] * len(units)
    compress = None if codec.codec_id == "none" else codec.compress
    grouper = FrameGrouper(target or COMPACT_FRAME_BYTES)
    groups = []
    for raw in raws:
        parts, nbytes = proved(raw, layout)
        if (g := grouper.add((raw, parts), nbytes)) is not None:
            groups.append(g)
    if (last := grouper.flush()) is not None:
        groups.append(last)
    memo = FilterMemo()  # as the writer chooses them
    for group in groups:
        for data, lengths, is_block in plan_frames(group, compress, memo):
            units.append(data)
            counts.append(len(lengths))
            blocks.append(is_block)
    return units, counts, blocks


def _project(
    raws: list[bytes],
    train: list[bytes],
    total_raw: int,
    records: int,
    candidates: tuple[dict[str, Any], ...],
    repeats: int,
    min_seconds: float,
    max_shard_bytes: int,
    notes: list[str],
) -> tuple[CodecProjection, ...]:
    """Measure each candidate on ``raws``; a dictionary is trained on ``train`` (other records)."""
    import zstandard

    from .format import RECORD_MAP_ENTRY_BYTES

    sample_raw = sum(len(r) for r in raws)
    out = []
    for options in candidates:
        label = codec_label(options)
        try:
            codec, dict_bytes = _candidate_codec(options, train or raws)
        except zstandard.ZstdError as exc:
            notes.append(
                f"{label}: zstd could not train a dictionary on {len(train or raws)} records ({exc}); not projected"
            )
            continue
        from .shardio import check_frame
        from .writer import DEFAULT_RAW_BELOW, stores_raw

        blocks: list[bool] = []
        if options.get("compact"):
            units, counts, blocks = _compact_frames_of(raws, options.get("frame_target_bytes"), codec)
        else:
            units, counts = _frames_of(raws, options.get("frame_target_bytes"))
        frames = [codec.compress(u) for u in units]
        # As the writer stores them by default: a frame the codec barely shrinks stays raw.
        raw_flags = [stores_raw(codec, len(f), len(u), DEFAULT_RAW_BELOW) for f, u in zip(frames, units)]
        raw_extra = sum(len(u) - len(f) for f, u, r in zip(frames, units, raw_flags) if r)
        frames = [u if r else f for f, u, r in zip(frames, units, raw_flags)]
        sample_stored = sum(len(f) for f in frames)

        def compress_all(codec: Codec = codec, units: list[bytes] = units) -> None:
            for u in units:
                codec.compress(u)

        frame_rows = [{"stored": len(f), "raw": len(u), "checksum": digest_int(f)} for f, u in zip(frames, units)]

        def decode_all(
            codec: Codec = codec,
            frames: list[bytes] = frames,
            rows: list[dict[str, int]] = frame_rows,
            flags: list[bool] = raw_flags,
            blocks: list[bool] = blocks,
            counts: list[int] = counts,
        ) -> None:
            for k, (f, row, r) in enumerate(zip(frames, rows, flags)):  # a reader's pipeline: checksum, bounds, decode
                data = check_frame(codec, row, f, "audit", max_record_bytes=2**62, stored_raw=r)
                if blocks and blocks[k]:  # and a column block's checks (format 1.3)
                    ColumnBlock(data, _LAYOUT[0], counts[k], "audit").check_all()

        t_c = _timed(compress_all, repeats, min_seconds) if raws else 0.0
        t_d, spread = _timed_spread(decode_all, repeats, min_seconds) if raws else (0.0, 0.0)
        scale = total_raw / sample_raw if sample_raw else 0.0
        stored = round(sample_stored * scale)
        n_frames = math.ceil(len(frames) * records / len(raws)) if raws else 0
        multi = bool(options.get("frame_target_bytes") or options.get("compact"))
        shards = max(1, math.ceil(stored / max_shard_bytes)) if records else 0
        file_bytes = (
            stored
            + n_frames * RECORD_ENTRY_BYTES
            + (records * RECORD_MAP_ENTRY_BYTES if multi else 0)
            + shards * (HEADER_BYTES + TRAILER_BYTES + _FOOTER_JSON_BYTES + _INDEX_BYTES_PER_SHARD)
            + _INDEX_BASE_BYTES
            + dict_bytes
        )
        per_read = round(sum(n * len(u) for n, u in zip(counts, units)) / len(raws)) if raws else 0
        out.append(
            CodecProjection(
                codec=dict(options),
                label=label,
                stored_bytes=stored,
                file_bytes=file_bytes,
                ratio=total_raw / file_bytes if file_bytes else 0.0,
                compress_mb_s=sample_raw / t_c / 1e6 if t_c else 0.0,
                decode_mb_s=sample_raw / t_d / 1e6 if t_d else 0.0,
                read_bytes_per_record=per_read,
                sample_records=len(raws),
                decode_spread=spread,
                raw_frame_share=sum(raw_flags) / len(frames) if frames else 0.0,
                raw_frame_bytes=round(raw_extra * scale),
            )
        )
    if any(c.get("dictionary") for c in candidates) and not train:
        notes.append("the dictionary was trained on the measured records themselves: its projection is optimistic")
    return tuple(out)


def _recommend(projections: tuple[CodecProjection, ...], current: str | None) -> tuple[str, str]:
    """Pick a codec: the fastest-decoding among those within 5% of the smallest projection.

    ``none`` wins when it is itself within 5% (compression does not pay); the store's current
    codec wins when it is within 5% (re-packing would not pay).
    """
    if not projections:
        return "", "no codec candidates were measured"
    smallest = min(p.file_bytes for p in projections)
    close = [p for p in projections if p.file_bytes <= smallest * (1 + _SIZE_TOLERANCE)]
    none = next((p for p in projections if p.codec.get("codec") == "none"), None)
    cur = next((p for p in projections if p.label == current), None)
    if none is not None and none in close:
        return none.label, (
            f"none: compression saves under {_SIZE_TOLERANCE:.0%} here (smallest projection {smallest:,} bytes, "
            f"uncompressed {none.file_bytes:,}), so decoding stays free"
        )
    if cur is not None and cur in close:
        return cur.label, (
            f"{cur.label} (keep the store's codec): {cur.file_bytes:,} bytes projected (ratio {cur.ratio:.2f}), within "
            f"{_SIZE_TOLERANCE:.0%} of the smallest candidate ({smallest:,} bytes); re-packing would not pay"
        )
    best = max(close, key=lambda p: (p.decode_mb_s, -p.file_bytes))
    others = ", ".join(p.label for p in close if p is not best)
    why = (
        f"{best.label}: {best.file_bytes:,} bytes projected (ratio {best.ratio:.2f}), decodes at "
        f"{best.decode_mb_s:,.0f} MB/s; "
        + (
            f"the fastest-decoding of the candidates within {_SIZE_TOLERANCE:.0%} of the smallest (also: {others})"
            if others
            else "the smallest by more than 5%"
        )
    )
    if best.codec.get("frame_target_bytes"):
        why += (
            f"; note that a random read then decodes about {best.read_bytes_per_record:,} bytes (a whole frame): "
            "best for sequential reading (StoreIterableDataset)"
        )
    why += f". Pack with: tspt pack SRC DEST {pack_arguments(best.codec)}"
    if cur is not None and cur.file_bytes:
        why += f". The store uses {cur.label} ({cur.file_bytes:,} bytes projected): re-packing saves {1 - best.file_bytes / cur.file_bytes:.0%}"
    return best.label, why


# --------------------------------------------------------------------------- sources


def _check_options(
    max_records: int | None, sample_records: int, repeats: int, top: int, candidates: tuple[dict[str, Any], ...]
) -> None:
    _check_candidates(candidates)
    for name, value, low in (("sample_records", sample_records, 1), ("repeats", repeats, 1), ("top", top, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidOptionError(f"{name}: expected an int >= {low}, found {value!r}")
    if max_records is not None and (
        isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1
    ):
        raise InvalidOptionError(f"max_records: expected None or an int >= 1, found {max_records!r}")


def audit_store(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    max_records: int | None = 2000,
    sample_records: int = 64,
    candidates: tuple[dict[str, Any], ...] = DEFAULT_CANDIDATES,
    top: int = 10,
    repeats: int = 3,
    min_seconds: float = 0.02,
) -> AuditReport:
    """Audit a store.

    Args:
        path: The store directory, or an fsspec URL (``s3://bucket/prefix``...).
        storage_options: For a URL: the fsspec file system's options (docs/remote.md).
        max_records: Records analysed for the byte breakdown and bloat, evenly spread; None
            for all. Sizes per shard, totals and the largest records always cover every record.
        sample_records: Records used for the codec projections and timings.
        candidates: Codec configs to project.
        top: How many of the largest records to list.
        repeats: Timed passes per measurement (the median is kept).
        min_seconds: Each timed pass loops over the sample for at least this long.

    Returns:
        An :class:`AuditReport`.

    Raises:
        StoreNotFoundError, NotAStoreError, IndexFormatError, UnsupportedFormatError: As
            :func:`~tensorstore_pt.open_store`.
        CorruptStoreError: A record read fails its checks.
        UnsafePayloadError: A record's pickle asks for forbidden globals (it is not run).
        InvalidOptionError: Bad options.
    """
    from .reader import open_store
    from .serialization import loads

    _check_options(max_records, sample_records, repeats, top, candidates)
    reader = open_store(path, storage_options=storage_options)
    index = reader.index
    shards = tuple(ShardSize(s.name, s.records, s.file_bytes, s.stored_bytes, s.raw_bytes) for s in index.shards)
    # Per-record sizes from the footers (32 bytes a record, no record data read).
    # With multi-record frames a record has no frame of its own: its stored size is -1 (unknown).
    raw_sizes = np.zeros(len(reader), dtype=np.int64)
    stored_sizes = np.full(len(reader), -1, dtype=np.int64)
    for si, entry in enumerate(index.shards):
        footer = reader._footer(si)
        span = slice(entry.first_record, entry.first_record + entry.records)
        if footer.record_map is None:
            raw_sizes[span] = footer.table["raw"].astype(np.int64)
            stored_sizes[span] = footer.table["stored"].astype(np.int64)
        else:
            raw_sizes[span] = footer.record_map["raw"].astype(np.int64)

    acc = _Acc()
    analysed: dict[int, tuple[int, int]] = {}
    bloated = []
    load_seconds = 0.0
    for i in _evenly(len(reader), max_records):
        raw = reader.read_bytes(i)
        t0 = time.perf_counter()
        try:
            obj = loads(raw, "cpu")
        except UnsafePayloadError as exc:
            si, _ = reader._locate(i)
            raise UnsafePayloadError(
                f"store {reader.location!r}, shard {index.shards[si].name!r}, record {i}: {exc}"
            ) from exc
        load_seconds += time.perf_counter() - t0
        tensor, element = _analyse(raw, obj, acc)
        analysed[i] = (tensor, element)
        if _is_bloated(tensor, element):
            bloated.append(RecordSize(i, len(raw), _known(stored_sizes[i]), tensor, element))
    largest = tuple(
        RecordSize(i, size, _known(stored_sizes[i]), *(analysed.get(i, (None, None))), same_size=count)
        for i, size, count in _distinct_largest(raw_sizes, top)
    )
    sample_idx = _evenly(len(reader), sample_records)
    sample = [reader.read_bytes(i) for i in sample_idx]
    train = [reader.read_bytes(i) for i in _train_positions(len(reader), sample_idx, candidates)]
    notes: list[str] = []
    projections = _project(
        sample, train, index.raw_bytes, len(reader), candidates, repeats, min_seconds,
        max([s.file_bytes for s in index.shards] + [1]), notes,
    )  # fmt: skip
    from .format import FEATURE_COLUMNAR_FRAMES, FEATURE_MULTI_RECORD_FRAMES

    current = codec_label(
        {
            **index.codec,
            "frames": FEATURE_MULTI_RECORD_FRAMES in index.features,
            "compact": FEATURE_COLUMNAR_FRAMES in index.features,
        }
    )
    recommendation, reason = _recommend(projections, current)
    disk = index.file_bytes + reader.storage.size(INDEX_NAME)
    if acc.records < len(reader):
        notes.append(f"byte breakdown from {acc.records} of {len(reader)} records, evenly spread")
    return AuditReport(
        source=reader.location,
        kind="store",
        records=len(reader),
        disk_bytes=disk,
        allocated_bytes=_allocated(
            [Path(reader.location) / s.name for s in index.shards] + [Path(reader.location) / INDEX_NAME]
        ),
        files=len(index.shards) + 1,
        raw_bytes=index.raw_bytes,
        stored_bytes=index.stored_bytes,
        codec=dict(index.codec),
        shards=shards,
        bytes_by_codec={current: index.stored_bytes},
        breakdown=acc.freeze(),
        largest=largest,
        bloated=tuple(bloated),
        projections=projections,
        load_mb_s=acc.raw / load_seconds / 1e6 if load_seconds else 0.0,
        recommendation=recommendation,
        reason=reason,
        notes=tuple(notes),
    )


def _known(stored: Any) -> int | None:
    return int(stored) if stored >= 0 else None


def _allocated(paths: list[Path]) -> int | None:
    total = 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return None
        blocks = getattr(st, "st_blocks", None)
        if blocks is None:
            return None
        total += blocks * 512
    return total


def _distinct_largest(sizes: np.ndarray, top: int) -> list[tuple[int, int, int]]:
    """(first position, size, how many have it) for the ``top`` largest distinct sizes."""
    if not len(sizes) or top <= 0:
        return []
    values, first, counts = np.unique(sizes, return_index=True, return_counts=True)
    order = np.argsort(-values, kind="stable")[:top]
    return [(int(first[j]), int(values[j]), int(counts[j])) for j in order]


def _default_label() -> str:
    return "zstd-3"


def _growth_note(
    projections: tuple[CodecProjection, ...], source_bytes: int, packed: ByteBreakdown | None, what: str
) -> str | None:
    """A warning when the default packing makes the data bigger, naming what avoids it (or None)."""
    default = next((p for p in projections if p.label == _default_label()), None)
    if default is None or not source_bytes or default.file_bytes <= source_bytes:
        return None
    best = min(projections, key=lambda p: p.file_bytes)
    per = ""
    if packed is not None and packed.records:
        per = (
            f": each record carries about {packed.overhead_bytes / packed.records:,.0f} bytes of torch.save container "
            f"(pickle + zip) for {packed.tensor_bytes / packed.records:,.0f} bytes of tensors"
        )
    text = (
        f"packing {what} with the default ({default.label}) makes it bigger, about {default.file_bytes:,} bytes "
        f"against {source_bytes:,} bytes now{per}. "
    )
    if best.file_bytes < source_bytes:
        text += f"{best.label} avoids it ({best.file_bytes:,} bytes): tspt pack SRC DEST {pack_arguments(best.codec)}"
    else:
        text += (
            f"Every option grows it (the smallest, {best.label}, {best.file_bytes:,} bytes): records this small cost "
            "more in container than compression saves; fewer, larger records (a batch per record) avoid it"
        )
    return text


def pack_size_warning(
    head: list[Any],
    records: int,
    source_bytes: int,
    options: dict[str, Any],
    max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
) -> str | None:
    """Whether packing makes a source bigger, projected from its first samples; what avoids it.

    Args:
        head: The first samples of the source (a few dozen are enough).
        records: How many samples the source holds.
        source_bytes: What the source takes now (file sizes, bytes).
        options: The packing options, as :data:`DEFAULT_CANDIDATES` entries (``level`` may
            be None for the codec's default).
        max_shard_bytes: The shard size cap (bytes).

    Returns:
        A one-paragraph warning with the numbers and the option that avoids the growth, or
        None when packing with ``options`` does not make the data bigger.
    """
    from .serialization import compact, dumps

    if not head or not records or not source_bytes:
        return None
    raws = [dumps(s) for s in head]
    acc = _Acc()
    for raw, s in zip(raws, head):
        _analyse(raw, compact(s), acc)
    per = acc.freeze()
    total_raw = round(sum(len(r) for r in raws) / len(raws) * records)
    chosen = {k: v for k, v in options.items() if v is not None}
    if "level" not in chosen and chosen.get("codec") != "none":
        from .codecs import make_codec

        level = getattr(make_codec(chosen["codec"], None), "level", None)
        if level is not None:
            chosen["level"] = level
    cands = [chosen] + [
        c
        for c in (
            {"codec": "zstd", "level": 3, "compact": True},
            {"codec": "zstd", "level": 3, "frame_target_bytes": 64 * 2**10},
            {"codec": "zstd", "level": 3, "dictionary": 16 * 2**10},
        )
        if codec_label(c) != codec_label(chosen)
    ]
    _check_candidates(tuple(cands))
    projections = _project(raws, [], total_raw, records, tuple(cands), 1, 0.0, max_shard_bytes, [])
    mine = projections[0] if projections and projections[0].label == codec_label(chosen) else None
    if mine is None or mine.file_bytes <= source_bytes:
        return None
    others = [p for p in projections[1:] if p.file_bytes < mine.file_bytes]
    best = min(others, key=lambda p: p.file_bytes) if others else None
    text = (
        f"packing makes this data bigger: {records:,} records with {mine.label} project to about {mine.file_bytes:,} "
        f"bytes against {source_bytes:,} bytes now; each record carries about {per.overhead_bytes / per.records:,.0f} "
        f"bytes of torch.save container (pickle + zip) for {per.tensor_bytes / per.records:,.0f} bytes of tensors."
    )
    if best is not None:
        text += f" {pack_arguments(best.codec)} projects {best.file_bytes:,} bytes" + (
            " (smaller than now)" if best.file_bytes < source_bytes else ""
        )
    return text + "; `tspt audit SRC` compares every option"


def audit_pt(
    path: str | os.PathLike[str],
    *,
    max_records: int | None = 2000,
    sample_records: int = 64,
    candidates: tuple[dict[str, Any], ...] = DEFAULT_CANDIDATES,
    top: int = 10,
    repeats: int = 3,
    min_seconds: float = 0.02,
    max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
    layout: str | None = None,
    recursive: bool = False,
) -> AuditReport:
    """Audit ``.pt`` files before packing: a directory of them (one sample each) or one file.

    The breakdown describes the files as they are (views saved with their whole storage show
    up as bloat; for one ``.pt`` file it adds up to the file's size). ``packed_breakdown``
    and the projections serialize the records the way the writer would (each record on its
    own, views compacted) and compress them with each candidate.

    Args:
        path: A directory of ``.pt`` files, or one ``.pt`` file, read as ``tspt pack`` reads
            it (:mod:`tensorstore_pt.sources`).
        max_records: Records analysed for the breakdown, evenly spread; None for all.
        sample_records: Records used for the projections and timings.
        candidates: Codec configs to project.
        top: How many of the largest records to list (distinct sizes).
        repeats: Timed passes per measurement (the median is kept).
        min_seconds: Each timed pass loops over the sample for at least this long.
        max_shard_bytes: The shard size the projection assumes (bytes).
        layout: For an ambiguous list/tuple of tensors, ``"rows"`` or ``"columns"``.
        recursive: For a directory, also its subdirectories' ``.pt`` files.

    Returns:
        An :class:`AuditReport`.

    Raises:
        StoreNotFoundError: The path does not exist.
        InvalidOptionError: No ``.pt`` files, an empty or ambiguous source, a file that is
            not a torch.save file, or bad options.
        UnsafePayloadError: A file's pickle asks for forbidden globals (it is not run).
    """
    from .serialization import compact, dumps
    from .sources import read_layout

    _check_options(max_records, sample_records, repeats, top, candidates)
    src = Path(path)
    if not src.exists():
        raise StoreNotFoundError(f"audit: {str(src)!r} does not exist")
    acc = _Acc()
    packed_acc = _Acc()
    bloated: list[RecordSize] = []
    analysed: dict[int | str, tuple[int, int]] = {}
    load_seconds = 0.0
    notes: list[str] = []
    if src.is_dir():
        files = pt_files(src, recursive)
        names = [str(f.relative_to(src)) for f in files]
        kind = "pt_dir"
        sizes = [p.stat().st_size for p in files]
        disk = sum(sizes)
        allocated = _allocated(files)
        records = len(files)
        packed: dict[int, int] = {}  # file position -> bytes the writer would serialize
        for i in _evenly(records, max_records):
            raw = files[i].read_bytes()
            t0 = time.perf_counter()
            obj = load_pt_bytes(raw, f"{str(files[i])!r}")
            load_seconds += time.perf_counter() - t0
            packed_raw = dumps(obj)
            packed[i] = len(packed_raw)
            _analyse(packed_raw, compact(obj), packed_acc)
            tensor, element = _analyse(raw, obj, acc)
            analysed[names[i]] = (tensor, element)
            if _is_bloated(tensor, element):
                bloated.append(RecordSize(names[i], len(raw), None, tensor, element))
        largest = tuple(
            RecordSize(names[i], size, None, *(analysed.get(names[i], (None, None))), same_size=count)
            for i, size, count in _distinct_largest(np.array(sizes, dtype=np.int64), top)
        )
        sample_idx = _evenly(records, sample_records)
        raws = [dumps(load_pt_bytes(files[i].read_bytes(), f"{str(files[i])!r}")) for i in sample_idx]
        train = [
            dumps(load_pt_bytes(files[i].read_bytes(), f"{str(files[i])!r}"))
            for i in _train_positions(records, sample_idx, candidates)
        ]
        # Exact for the analysed files; the others scaled by the median packed/file ratio (a
        # median, so that a few bloated files do not skew the estimate).
        ratio = statistics.median(packed[i] / sizes[i] for i in packed) if packed else 1.0
        total_raw = sum(packed.values()) + round(sum(sizes[i] for i in range(records) if i not in packed) * ratio)
        load_raw = acc.raw
        if len(packed) < records:
            notes.append(
                f"raw bytes once packed: exact for {len(packed)} of {records} files, the rest estimated "
                f"from their file sizes (median packed/file ratio {ratio:.3f})"
            )
        what = f"these {records:,} files"
    else:
        kind = "pt_file"
        raw_file = src.read_bytes()
        disk = len(raw_file)
        allocated = _allocated([src])
        obj = load_pt_bytes(raw_file, f"{str(src)!r}")
        # The file as it is: its tensors (each storage once), pickle and zip add up to its size.
        tensor, element = _analyse(raw_file, obj, acc)
        if _is_bloated(tensor, element):
            bloated.append(RecordSize(src.name, disk, None, tensor, element))
        _, records, how, rows_iter = read_layout(obj, f"audit: {str(src)!r}", layout)
        samples = list(rows_iter)
        per_record: dict[int, bytes] = {}
        for i in _evenly(records, max_records):
            raw = dumps(samples[i])
            per_record[i] = raw
            analysed[i] = _analyse(raw, compact(samples[i]), packed_acc)
        for raw in list(per_record.values())[:sample_records]:
            t0 = time.perf_counter()
            load_pt_bytes(raw, f"{str(src)!r}")
            load_seconds += time.perf_counter() - t0
        load_raw = sum(len(r) for r in list(per_record.values())[:sample_records])
        keys = list(per_record)
        largest = tuple(
            RecordSize(keys[j], size, None, *analysed[keys[j]], same_size=count)
            for j, size, count in _distinct_largest(np.array([len(per_record[k]) for k in keys], dtype=np.int64), top)
        )
        sample_idx = _evenly(records, sample_records)
        raws = [per_record[i] if i in per_record else dumps(samples[i]) for i in sample_idx]
        train = [
            per_record[i] if i in per_record else dumps(samples[i])
            for i in _train_positions(records, sample_idx, candidates)
        ]
        mean = sum(len(r) for r in raws) / len(raws) if raws else 0.0
        total_raw = sum(len(r) for r in per_record.values()) if len(per_record) == records else round(mean * records)
        if len(per_record) < records:
            notes.append(f"largest records and raw bytes estimated from {len(per_record)} of {records} records")
        notes.append(
            f"the file holds {how}; the breakdown is the file as it is, and 'once packed' is each record "
            "serialized on its own"
        )
        what = f"this file's {records:,} records"
    projections = _project(raws, train, total_raw, records, candidates, repeats, min_seconds, max_shard_bytes, notes)
    recommendation, reason = _recommend(projections, None)
    best = next((p for p in projections if p.label == recommendation), None)
    if best is not None and disk and best.file_bytes:
        now = allocated if allocated else disk
        shards = max(1, math.ceil(best.stored_bytes / max_shard_bytes))
        change = (
            f"{now / best.file_bytes:.1f}x smaller" if best.file_bytes < now else f"{best.file_bytes / now:.2f}x BIGGER"
        )
        reason += (
            f". Packing turns {len(files) if kind == 'pt_dir' else 1:,} file(s) taking {now:,} bytes on disk into "
            f"about {shards:,} shard{'s' if shards != 1 else ''} + index of {best.file_bytes:,} bytes ({change})"
        )
    packed_breakdown = packed_acc.freeze()
    growth = _growth_note(projections, disk, packed_breakdown, what)
    if growth:
        notes.insert(0, growth)
    if bloated:
        waste = sum((b.tensor_bytes or 0) - (b.element_bytes or 0) for b in bloated)
        notes.append(
            f"{len(bloated)} analysed file(s) save views with their whole storage ({waste:,} bytes beyond their "
            "elements); packing compacts them"
        )
    load_mb_s = load_raw / load_seconds / 1e6 if load_seconds else 0.0
    return AuditReport(
        source=str(src),
        kind=kind,
        records=records,
        disk_bytes=disk,
        allocated_bytes=allocated,
        files=len(files) if kind == "pt_dir" else 1,
        raw_bytes=total_raw,
        stored_bytes=None,
        codec=None,
        shards=(),
        bytes_by_codec={},
        breakdown=acc.freeze(),
        largest=largest,
        bloated=tuple(bloated),
        projections=projections,
        load_mb_s=load_mb_s,
        recommendation=recommendation,
        reason=reason,
        notes=tuple(notes),
        packed_breakdown=packed_breakdown,
        grows=growth is not None,
    )


def audit_path(path: str | os.PathLike[str], **options: Any) -> AuditReport:
    """Audit a store, a directory of ``.pt`` files or one ``.pt`` file (chosen by what is there).

    A URL (``s3://bucket/prefix``...) is a store; pass its ``storage_options`` in ``options``.

    A directory holding ``index.json`` is a store (:func:`audit_store`); any other directory
    or file goes to :func:`audit_pt`. ``options`` are passed on (``max_shard_bytes``,
    ``layout`` and ``recursive`` only apply to ``.pt`` sources).

    Raises:
        StoreNotFoundError: The path does not exist.
        And whatever the chosen function raises.
    """
    if isinstance(path, str) and "://" in path and not path.lower().startswith("file://"):
        for key in ("max_shard_bytes", "layout", "recursive"):
            options.pop(key, None)
        return audit_store(path, **options)
    if isinstance(path, str) and path.lower().startswith("file://"):
        path = path[len("file://") :]
    if options.get("storage_options"):
        raise InvalidOptionError(f"storage_options: only URLs take them; {str(path)!r} is a local path")
    options.pop("storage_options", None)
    p = Path(path)
    if not p.exists():
        raise StoreNotFoundError(f"audit: {str(p)!r} does not exist")
    if p.is_dir() and (p / INDEX_NAME).exists():
        for key in ("max_shard_bytes", "layout", "recursive"):
            options.pop(key, None)
        return audit_store(p, **options)
    return audit_pt(p, **options)
