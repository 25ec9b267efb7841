"""Feeding a store to a training loop: map-style and iterable datasets, and a resumable loader.

- :class:`StoreDataset`: a map-style ``torch.utils.data.Dataset`` (random access, any sampler).
- :class:`StoreIterableDataset`: an ``IterableDataset`` that reads contiguous runs of records
  with positional reads, decodes ahead of its consumer (a bounded background thread, or the
  DataLoader worker process, which reads ahead in a thread), splits
  the epoch among ranks and DataLoader workers (each sample exactly once), shuffles by block
  order plus a window shuffle, and makes every rank yield the same number of samples.
- :class:`StoreDataLoader`: a ``DataLoader`` subclass that counts the samples it delivered, so
  that ``state_dict()`` / ``load_state_dict()`` resume a run exactly.
- :func:`consumer_info`: "who am I" -> ``(rank, world_size, worker, num_workers)``.

docs/datasets.md states the guarantees (partitioning, shuffle quality, resume, memory).

Memory: per-record data (the frame table, 32 bytes a record) lives in one shared-memory torch
tensor made in the process that builds the dataset; DataLoader workers map it, whether they
are forked or spawned. A worker's private memory is O(shards + blocks) for the layout, plus
O(window) for the shuffle window's permutation, plus up to 4 read pieces (at most 2 MiB of
compressed frames and gaps each), plus one batch of decoded samples (``prefetch_samples +
32`` in the main process, or, when a StoreDataLoader takes whole batches there,
``max(1, prefetch_samples // batch_size) + 1`` batches with their decompressed records), plus,
for a shuffled store with multi-record frames, up to :data:`WINDOW_DECODED_BYTES` of decoded
samples (a window share read in store order, handed out in the window's order); it does not
grow with the number of records or across epochs.
Worker batches reach the main process through reused shared-memory arenas (see
:class:`StoreDataLoader`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from ._partition import (
    EQUALIZE_MODES,
    BlockLayout,
    EpochOrder,
    EpochPlan,
    RankSplit,
    rest_of_epoch,
    split_by_bytes,
    worker_sample_count,
    worker_segments,
)
from ._prefetch import Prefetcher
from . import _shared_batches
from ._shared_batches import BatchItem, DecodedBatch, SharedBatchCollate, decode_batch, materialize, raw_accepted
from .cache import DEFAULT_PREFETCH_SHARDS, CachedStorage, ShardCache
from .checksums import ALGORITHM
from .errors import (
    AllocationBudgetError,
    ChecksumMismatchError,
    CorruptStoreError,
    DecompressionError,
    InvalidOptionError,
    MissingShardError,
    RecordDecodeError,
    RecordIndexError,
    RecordLengthError,
    ShardFormatError,
    ShardSizeError,
    UnsafePayloadError,
)
from .fastload import _is_cpu
from .format import FEATURE_MULTI_RECORD_FRAMES, FEATURE_RAW_FRAMES, RECORD_DTYPE
from .reader import DEFAULT_MAX_RECORD_BYTES, READ_BYTES, FetchedFrames, RawRecord, RecordResult, StoreReader
from .storage import LocalStorage, Storage, storage_for

__all__ = [
    "ON_ERROR_POLICIES",
    "SKIP_KINDS",
    "ConsumerInfo",
    "PartitionReport",
    "PartitionWarning",
    "StoreDataLoader",
    "StoreDataset",
    "StoreIterableDataset",
    "consumer_info",
]

logger = logging.getLogger("tensorstore_pt.dataset")

#: ``raise``: the first bad record raises. ``skip``: bad records are logged, counted and left out.
ON_ERROR_POLICIES = ("raise", "skip")
#: Error kinds counted by ``on_error="skip"``, most specific first.
SKIP_KINDS = (
    "ChecksumMismatchError",
    "DecompressionError",
    "RecordLengthError",
    "ShardSizeError",
    "ShardFormatError",
    "MissingShardError",
    "UnsafePayloadError",
    "AllocationBudgetError",
    "RecordDecodeError",
    "CorruptStoreError",
)
_SKIP_TYPES = (
    ChecksumMismatchError,
    DecompressionError,
    RecordLengthError,
    ShardSizeError,
    ShardFormatError,
    MissingShardError,
    UnsafePayloadError,
    AllocationBudgetError,
    RecordDecodeError,
    CorruptStoreError,
)
_SKIP_SLOTS = 257  # slot 0: the main process; slot w + 1: DataLoader worker w (mod 256)

#: Target compressed bytes of a block (auto ``block_records``).
BLOCK_TARGET_BYTES = 256 * 2**10
#: Blocks per shuffle window (auto ``window_records``).
WINDOW_BLOCKS = 256
MAX_BLOCK_RECORDS = 4096
#: Cap on the auto window: its permutation costs 16 bytes a position (32 while it is made).
MAX_WINDOW_RECORDS = 2**18
#: Stores with multi-record frames (``frame_target_bytes``, ``compact``), shuffled: a consumer
#: reads its records of a window in store order, so that each frame is decoded once (a column
#: block's records loaded together), and hands them out in the window's order. It gathers at
#: most about this many decoded bytes (the index's raw bytes, at the store's mean a record)
#: before handing them out, and the auto window is at most this many bytes of records.
WINDOW_DECODED_BYTES = 32 * 2**20


def default_block_window(records: int, stored_bytes: int, raw_bytes: int | None = None) -> tuple[int, int]:
    """The default ``(block_records, window_records)`` for a store of this size.

    Blocks hold about ``BLOCK_TARGET_BYTES`` (256 KiB) of compressed frames (1 to 4096
    records); a window is ``WINDOW_BLOCKS`` (256) blocks, at most 2**18 records. Given
    ``raw_bytes`` (the store's decoded bytes, for a store with multi-record frames), a window
    is also at most :data:`WINDOW_DECODED_BYTES` of records (and at least one block).
    """
    mean = stored_bytes / records if records else 1.0
    block = int(min(MAX_BLOCK_RECORDS, max(1, round(BLOCK_TARGET_BYTES / max(mean, 1.0)))))
    return block, _default_window(block, _decoded_cap(records, raw_bytes))


def _decoded_cap(records: int, raw_bytes: int | None) -> int | None:
    """Records of the store's mean decoded size in :data:`WINDOW_DECODED_BYTES` (at least 1),
    or None without ``raw_bytes``."""
    if raw_bytes is None:
        return None
    mean = raw_bytes / records if records else 1.0
    return max(1, int(WINDOW_DECODED_BYTES // max(mean, 1.0)))


def _default_window(block_records: int, cap: int | None = None) -> int:
    window = min(WINDOW_BLOCKS * block_records, max(block_records, MAX_WINDOW_RECORDS))
    return window if cap is None else min(window, max(block_records, cap))


# Slots of the shared control tensor.
_EPOCH, _START, _CHUNK, _RANK, _WORLD, _RESOLVED, _QUIET, _PLAN = range(8)


class PartitionWarning(UserWarning):
    """A consumer (rank or DataLoader worker) gets no samples, or the store is empty."""


class ConsumerInfo(NamedTuple):
    """Who is reading: the rank in the process group and the DataLoader worker in the rank."""

    rank: int
    world_size: int
    worker: int
    num_workers: int


#: The largest batch, block or window size: sizes and positions derived from them stay in int64.
_SIZE_LIMIT = 2**62


def _check_int(name: str, value: Any, low: int, none_ok: bool = False, high: int | None = None) -> int | None:
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidOptionError(f"{name}: expected an int >= {low}, found {value!r}")
    if high is not None and value > high:
        raise InvalidOptionError(f"{name}: expected an int <= {high}, found {value!r}")
    return int(value)


#: Epochs are int64 in the shared control block, and the next epoch (``epoch + 1``) must fit too.
_EPOCH_LIMIT = 2**63 - 1


def _check_epoch(name: str, value: Any) -> int:
    """An epoch: an int in ``[0, 2**63 - 1)`` (it and the next one fit the shared int64 slot)."""
    e = _check_int(name, value, 0)
    if e >= _EPOCH_LIMIT:  # type: ignore[operator]
        raise InvalidOptionError(f"{name}: expected an int in [0, 2**63 - 1), found {e}")
    return e  # type: ignore[return-value]


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidOptionError(f"environment variable {name}: expected an int, found {text!r}") from None


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise InvalidOptionError(
            f"rank and world_size: pass both or neither, found rank={rank!r}, world_size={world_size!r}"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        d_rank, d_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if rank is not None and (rank, world_size) != (d_rank, d_world):
            raise InvalidOptionError(
                f"rank={rank}, world_size={world_size} were passed, but torch.distributed is initialised "
                f"with rank {d_rank} of {d_world}; pass neither, or the same"
            )
        return d_rank, d_world
    if rank is None:
        env_rank, env_world = _env_int("RANK"), _env_int("WORLD_SIZE")
        if env_rank is None or env_world is None:
            return 0, 1
        rank, world_size, source = env_rank, env_world, "environment RANK/WORLD_SIZE"
    else:
        source = "arguments"
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidOptionError(
            f"rank/world_size from {source}: expected 0 <= rank < world_size, "
            f"found rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def consumer_info(rank: int | None = None, world_size: int | None = None) -> ConsumerInfo:
    """Return ``(rank, world_size, worker, num_workers)`` for the calling process.

    ``rank`` and ``world_size`` come from ``torch.distributed`` when it is initialised (explicit
    arguments must then agree with it); otherwise from the arguments; otherwise from the
    ``RANK`` / ``WORLD_SIZE`` environment variables (as set by ``torchrun``); otherwise
    ``(0, 1)``. ``worker`` and ``num_workers`` come from ``torch.utils.data.get_worker_info()``:
    ``(0, 1)`` outside a DataLoader worker.

    Raises:
        InvalidOptionError: Only one of rank/world_size given, values out of range, or
            arguments that disagree with an initialised process group.

    Note: a spawned DataLoader worker does not see the parent's process group; the datasets
    here resolve the rank in the parent and hand it to their workers.
    """
    r, w = _resolve_rank(_check_int("rank", rank, 0, True), _check_int("world_size", world_size, 1, True))
    info = get_worker_info()
    if info is None:
        return ConsumerInfo(r, w, 0, 1)
    return ConsumerInfo(r, w, int(info.id), int(info.num_workers))


# --------------------------------------------------------------------------- shared store view


class _StoreView:
    """What every process needs to read a store: the location, and the frame table in shared memory.

    Pickles to the storage, the index digest and the shared table (shared memory when pickled
    for a DataLoader worker by torch.multiprocessing, by value otherwise). Each process opens
    its own light reader (no footers loaded) on first use; it refuses a store whose
    ``index.json`` changed since the view was made.

    Opening a store by location with ``verify`` checks the index and, from one listing, every
    shard's presence and size. Without a shard cache it also reads every footer
    (:func:`~tensorstore_pt.open_store`). Through a cache (``cache_for`` gives one) the footers
    are not read at open: a view of multi-record or raw frames has no use for them there, and
    each consumer reads them from the shard's cached copy, whose whole-file checksum was
    checked on arrival. A view with a frame table reads every footer to fill the table
    (:meth:`StoreReader.record_table`), which checks them as the open would have.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Storage | StoreReader,
        verify: bool,
        map_location: Any,
        max_record_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_for: Callable[[Storage], ShardCache | None] | None = None,
        prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    ) -> None:
        if isinstance(store, StoreReader):
            reader = store
            if max_record_bytes is not None:
                raise InvalidOptionError("max_record_bytes: set it on the StoreReader passed as store, not here")
            if storage_options is not None:
                raise InvalidOptionError("storage_options: set them on the StoreReader passed as store, not here")
            cache = cache_for(reader.storage) if cache_for is not None else None
        elif isinstance(store, (str, os.PathLike, Storage)):
            storage = storage_for(store, storage_options)
            cache = cache_for(storage) if cache_for is not None else None
            reader = StoreReader(
                storage,
                verify=verify,
                map_location=map_location,
                max_record_bytes=DEFAULT_MAX_RECORD_BYTES if max_record_bytes is None else max_record_bytes,
                _footers_at_open=cache is None,
            )
        else:
            raise InvalidOptionError(
                f"store: expected a path, a Storage or a StoreReader, found {type(store).__name__}"
            )
        self.storage = reader.storage
        self.location = reader.location
        self.map_location = reader.map_location
        self.max_record_bytes = reader.max_record_bytes
        self.digest = reader.index_digest
        self.records = len(reader)
        self.stored_bytes = reader.index.stored_bytes
        self.bounds = reader.shard_bounds()
        # Multi-record frames (format 1.1): records share frames, so there is no per-record frame
        # table; records are read with StoreReader.read, whose per-thread frame cache decodes
        # each frame once when records come in order. Raw frames (format 1.2) take the same
        # path: the shared table's rows cannot mark a frame stored raw; the footers do.
        self.framed = bool({FEATURE_MULTI_RECORD_FRAMES, FEATURE_RAW_FRAMES} & set(reader.index.features))
        #: Records share frames: a shuffled read gathers a group's records in store order.
        self.multi = FEATURE_MULTI_RECORD_FRAMES in reader.index.features
        self.raw_bytes = reader.index.raw_bytes  # the index's total, checked against its shards
        if not self.framed:
            # Every footer is read (and its record count checked against the index) before
            # the table is allocated: an index that claims 2**31 records for a 2 KiB shard
            # made a 64 GiB table first (the footer then refused it).
            reader._fetch_footers(range(len(reader.index.shards)))
        self._table = torch.empty((0 if self.framed else self.records, 4), dtype=torch.int64).share_memory_()
        if not self.framed:
            reader.record_table(out=self.table())  # filled in place: one copy, in shared memory
        # Streaming through a node-local shard cache: this process's reads of shards go to the
        # cache's pinned local files (docs/remote.md, "Node-local shard cache").
        self.cached: CachedStorage | None = None
        if cache is not None:
            self.cached = CachedStorage(
                self.storage, cache, reader.index.shards, index_digest=self.digest, prefetch_shards=prefetch_shards
            )
        self.file_bytes = sum(s.file_bytes for s in reader.index.shards)
        # On remote storage each process's reader starts from this index, not from a fresh read
        # of index.json (six requests, about 0.4 s at 50 ms a request, before a worker's first
        # shard read). A local store's index is read again: cheap, and it refuses a replaced
        # store at once.
        self._opened_index = None if isinstance(self.storage, LocalStorage) else (reader.index, self.digest)
        keep = isinstance(store, StoreReader) and self.cached is None
        self._reader: StoreReader | None = reader if keep else None
        self._direct: StoreReader | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        state["_direct"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def table(self) -> np.ndarray:
        """The shared frame table as a ``RECORD_DTYPE`` array of shape (records,) (no copy)."""
        return self._table.numpy().view(RECORD_DTYPE).reshape(self.records)

    def reader(self, direct: bool = False) -> StoreReader:
        """This process's light reader (opened on first use, reopened after a fork); through
        the shard cache if there is one, unless ``direct``."""
        if direct and self.cached is not None:
            if self._direct is None or self._pid != os.getpid():
                self.reader()  # (re)sets the pid and the cached reader after a fork
                self._direct = StoreReader(
                    self.storage,
                    verify=False,
                    map_location=self.map_location,
                    max_record_bytes=self.max_record_bytes,
                    _expect_index_digest=self.digest,
                    _opened_index=self._opened_index,
                )
            return self._direct
        if self._reader is None or self._pid != os.getpid():
            self._direct = None
            self._reader = StoreReader(
                self.cached if self.cached is not None else self.storage,
                verify=False,
                map_location=self.map_location,
                max_record_bytes=self.max_record_bytes,
                _expect_index_digest=self.digest,
                _opened_index=self._opened_index,
            )
            self._pid = os.getpid()
        return self._reader

    def read(self, i: int) -> Any:
        """Record ``i``: one positional read of its frame, positioned by the shared table
        (multi-record frames: through the reader's footers and per-thread frame cache)."""
        return self.reader().read(i, table=None if self.framed else self.table())

    def iter_many(self, records: list[int]) -> Iterator[RecordResult]:
        """Records ``records`` in one bulk read (:meth:`StoreReader.iter_many`), positioned by
        the shared table (multi-record frames: by the reader's footers), each with its error."""
        return self.reader().iter_many(records, table=None if self.framed else self.table())


# --------------------------------------------------------------------------- map-style


class StoreDataset(Dataset):
    """A map-style dataset over a store: ``ds[i]`` is record ``i``, optionally transformed.

    Works with any sampler (``RandomSampler``, ``DistributedSampler``, ...). Each ``ds[i]``
    is one positional read, a checksum check, a decompression and a ``torch.load``; a
    ``DataLoader`` batch is one bulk read (:meth:`__getitems__`), which on an object store
    keeps many ranged GETs in flight.

    Args:
        store: A store path, an fsspec URL (``s3://bucket/prefix``...), a
            :class:`~tensorstore_pt.storage.Storage`, or a
            :class:`~tensorstore_pt.reader.StoreReader`.
        transform: Optional callable applied to each sample (in the worker that loads it).
        verify: Passed to :func:`~tensorstore_pt.open_store` when ``store`` is a path.
        map_location: Passed to ``torch.load`` (default ``"cpu"``).
        max_record_bytes: The largest raw record in bytes a read decodes when ``store`` is a
            path (default 1 GiB, see :func:`~tensorstore_pt.open_store`); a larger one raises
            :class:`~tensorstore_pt.errors.AllocationBudgetError` before allocating.
        storage_options: For a URL: the fsspec file system's options (docs/remote.md). The
            dataset pickles to the URL and these options, so each worker reopens the store.

    Raises:
        InvalidOptionError: ``store`` or ``transform`` has the wrong type.
        The errors of :func:`~tensorstore_pt.open_store`; ``ds[i]`` raises those of
        :meth:`StoreReader.read <tensorstore_pt.reader.StoreReader.read>`, and
        InvalidOptionError when ``i`` is not a Python or numpy int or a 0-dim integer tensor
        or array, RecordIndexError when it is out of range.

    Memory: the frame table (32 bytes a record) in shared memory, mapped by every worker;
    a worker's private memory does not grow with the number of records.
    Fork/spawn safety: pickles without open files; each process opens its own handles.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Storage | StoreReader,
        *,
        transform: Callable[[Any], Any] | None = None,
        verify: bool = True,
        map_location: Any = "cpu",
        max_record_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if transform is not None and not callable(transform):
            raise InvalidOptionError(f"transform: expected a callable or None, found {type(transform).__name__}")
        self._view = _StoreView(store, verify, map_location, max_record_bytes, storage_options)
        self.transform = transform

    @property
    def location(self) -> str:
        return self._view.location

    def __len__(self) -> int:
        return self._view.records

    def _position(self, index: Any) -> int:
        n = self._view.records
        kind = type(index).__name__
        if getattr(index, "ndim", None) == 0 and hasattr(index, "tolist"):
            index = index.tolist()  # a 0-dim tensor or array (an element of a tensor of indices)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise InvalidOptionError(f"dataset index: expected an int, found {kind}")
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise RecordIndexError(f"record {int(index)} is out of range for store {self.location!r} with {n} records")
        return i

    def __getitem__(self, index: int) -> Any:
        sample = self._view.read(self._position(index))
        return self.transform(sample) if self.transform is not None else sample

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch of records in one bulk read: what ``DataLoader`` calls (torch 2.x's
        ``_MapDatasetFetcher``) instead of ``ds[i]`` per index when it batches.

        The records' frames are fetched with :meth:`StoreReader.iter_many
        <tensorstore_pt.reader.StoreReader.iter_many>`: nearby frames in one read, and on an
        object store up to :attr:`~tensorstore_pt.storage.Storage.read_concurrency` ranged GETs
        in flight, so a shuffled batch of 32 records from 32 shards costs a few round trips,
        not 32 in a row. The samples and errors are those of ``[ds[i] for i in indices]``:
        records are checked and transformed in the order of ``indices``, and the first record
        error or transform exception in that order is raised (except that every index is
        checked before anything is read, and a storage error, an ``OSError``, is raised when
        the read of the piece holding it fails).

        Args:
            indices: Record positions (Python or numpy ints or 0-dim integer tensors, as for
                ``ds[i]``; a 1-D integer tensor works too; negative ones count from the end).

        Returns:
            The samples (transformed), in the order of ``indices``.

        Raises:
            InvalidOptionError: An index is not an int.
            RecordIndexError: An index is out of range (before anything is read).
            The errors of :meth:`StoreReader.read_many
            <tensorstore_pt.reader.StoreReader.read_many>` for the first damaged record, or
            what ``transform`` raises, whichever comes first in the order of ``indices``.
        """
        positions = [self._position(i) for i in indices]
        transform = self.transform
        samples: list[Any] = []
        # In the requested order, each record's error or transform runs before the next record
        # is looked at: the first failure raised is the one ``[ds[i] for i in indices]`` raises.
        for result in self._view.iter_many(positions):
            if result.error is not None:
                raise result.error
            samples.append(transform(result.sample) if transform is not None else result.sample)
        return samples

    def __repr__(self) -> str:
        return f"StoreDataset({self.location!r}, records={len(self)})"


# --------------------------------------------------------------------------- iterable


@dataclass(frozen=True)
class PartitionReport:
    """How one rank's epoch is split, as :meth:`StoreIterableDataset.partition` reports it.

    Attributes:
        epoch: The epoch described.
        records: Records in the store.
        rank, world_size: This rank and the number of ranks.
        equalize: ``"off"``, ``"pad"`` or ``"drop"`` (the mode in effect).
        rank_samples: This rank's samples per epoch (``len(dataset)``).
        padded: Samples repeated across all ranks this epoch (``pad``: wrap-around).
        dropped: Samples left out across all ranks this epoch (``drop``: the end of the order).
        start: The rank position iteration starts from (non-zero after a resume).
        batch_size: The chunk of consecutive samples dealt to each worker in turn.
        worker_samples: Samples each DataLoader worker yields from ``start`` on.
        idle_workers: Workers that yield nothing (fewer chunks left than workers).
        batches: Batches this rank delivers from ``start`` on (``drop_last=False``).
    """

    epoch: int
    records: int
    rank: int
    world_size: int
    equalize: str
    rank_samples: int
    padded: int
    dropped: int
    start: int
    batch_size: int
    worker_samples: tuple[int, ...]
    idle_workers: tuple[int, ...]
    batches: int


#: Decoded samples handed from the background thread to the consumer in one queue item
#: (fewer queue operations and thread switches than one sample at a time).
_HANDOFF_SAMPLES = 16


#: Pieces (about READ_BYTES of frames each) a worker's read thread may hold ahead of decoding.
_READ_AHEAD_PIECES = 2


class _Regroup(NamedTuple):
    """In a consumer's stream of fetched pieces: the next ``len(sorter)`` records come sorted
    (:meth:`StoreIterableDataset._read_groups`); the ``i``-th of them goes to position
    ``sorter[i]`` of the order asked."""

    sorter: np.ndarray


def _handed_out(items: list[Any]) -> Iterator[Any]:
    """The items of ``items`` in order, each dropped from the list once taken (a group's
    samples are freed as the consumer goes, not when the whole group is through)."""
    for i in range(len(items)):
        item, items[i] = items[i], None
        yield item


def _closing(source: Iterator[Any], *also: Any) -> Iterator[Any]:
    """``source``, closing ``also`` (e.g. a Prefetcher feeding it) when it ends or is closed."""
    try:
        yield from source
    finally:
        for other in also:
            other.close()


class _SampleIterator:
    """The iterator a StoreIterableDataset hands out: samples from ``source`` (lists of them), then the transform.

    ``source`` is a Prefetcher or a generator; ``close()`` closes it (stopping its threads).
    """

    def __init__(self, source: Iterator[list[Any]] | None, transform: Callable[[Any], Any] | None) -> None:
        self._prefetcher = source
        self._transform = transform
        self._items: list[Any] = []
        self._next = 0

    def __iter__(self) -> _SampleIterator:
        return self

    def __next__(self) -> Any:
        while self._next >= len(self._items):
            if self._prefetcher is None:
                raise StopIteration
            try:
                self._items, self._next = next(self._prefetcher), 0
            except BaseException:
                self.close()
                raise
        sample = self._items[self._next]
        self._items[self._next] = None  # hand over the only reference
        self._next += 1
        return self._transform(sample) if self._transform is not None else sample

    def close(self) -> None:
        self._items, self._next = [], 0
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self) -> None:  # pragma: no cover - depends on the collector
        try:
            self.close()
        except Exception:
            pass


class StoreIterableDataset(IterableDataset):
    """An iterable dataset over a store: sequential reads, background decoding, exact splits.

    Order: an epoch's order is a function of ``(store, shuffle, seed, epoch, block_records,
    window_records)`` alone. Without ``shuffle`` it is store order. With it, blocks of
    ``block_records`` consecutive records (never crossing a shard) are permuted, and the
    result is shuffled within consecutive windows of ``window_records`` positions.

    Partitioning: the epoch order is cut into ``world_size`` contiguous rank shares (equal
    length with ``equalize``); a rank's share is dealt to its DataLoader workers round-robin
    in chunks of ``batch_size``, which is what the DataLoader collects from each worker in
    turn, so the rank receives its share in order whatever ``num_workers`` is. Every sample is
    yielded exactly once per epoch across all ranks and workers (``equalize="pad"`` repeats
    ``padded`` samples, ``"drop"`` leaves out ``dropped``; :meth:`partition` reports both).

    Args:
        store: A store path, an fsspec URL (``s3://bucket/prefix``...), a
            :class:`~tensorstore_pt.storage.Storage`, or a
            :class:`~tensorstore_pt.reader.StoreReader`.
        shuffle: Shuffle each epoch (see above); ``set_epoch`` changes the shuffle.
        seed: Shuffle seed, an int in ``[0, 2**64)``.
        rank, world_size: This process's rank and the number of ranks; taken from
            ``torch.distributed`` when it is initialised, else from these arguments, else
            from the ``RANK``/``WORLD_SIZE`` environment variables, else ``(0, 1)``.
        equalize: ``None`` (default): ``"pad"`` when ``world_size > 1``, else off. ``True`` /
            ``"pad"``: every rank gets ``ceil(N / world_size)`` samples, wrapping around to the
            start of the epoch order. ``"drop"``: every rank gets ``floor(N / world_size)``;
            the last ``N % world_size`` positions of the order are left out. ``False`` /
            ``"off"``: ranks get ``floor`` or ``ceil`` of ``N / world_size``.
        batch_size: The chunk dealt to each worker in turn: set it to the DataLoader's
            ``batch_size`` for an order independent of ``num_workers``. :class:`StoreDataLoader`
            sets it for you. ``None`` means 1 (or the loader's).
        transform: Optional callable applied to each sample, in the consuming thread.
        on_error: ``"raise"`` (default): a corrupt record raises its
            :class:`~tensorstore_pt.errors.CorruptStoreError` (or ``UnsafePayloadError``) when
            its turn comes. ``"skip"``: it is logged (logger ``tensorstore_pt.dataset``,
            level WARNING, with the reason), counted (:meth:`skip_counts`) and left out. A
            skipped record shifts its worker's later batch boundaries by one sample; see
            docs/datasets.md.
        block_records: Records per block (default: about 256 KiB of compressed frames,
            1 to 4096 records).
        window_records: Shuffle window in samples (default: 256 blocks, about 64 MiB of
            frames, at most 2**18 records; with multi-record frames also at most
            :data:`WINDOW_DECODED_BYTES`, 32 MiB, of decoded records). It costs 16 bytes a
            position, not frame memory, except with multi-record frames: a consumer then
            reads its share of a window in store order, each frame decoded once, and holds
            up to :data:`WINDOW_DECODED_BYTES` of it decoded to hand it out in order (a larger
            window is read in parts of that size, each in store order).
        prefetch_samples: Decoded samples the background decode thread may hold ahead
            (default 32). Used in the main process (``num_workers=0``); DataLoader workers
            run ahead by the DataLoader's ``prefetch_factor`` batches instead. When a
            :class:`StoreDataLoader` takes whole batches from the thread, it holds
            ``max(1, prefetch_samples // batch_size)`` batches ahead plus the one it decodes.
        verify: When ``store`` is a path, URL or Storage: check at open that the index is
            sound and, from one listing, that every shard exists with the size the index
            records (a shard the listing does not name is opened: one request). Through a
            shard cache (a remote store, or ``cache_dir`` given) no footer is read at open:
            each shard's whole-file checksum is checked when it arrives in the cache, and its
            footer is read and checked from the cached copy when the shard is first read, so
            a damaged shard raises then (as every record's frame checksum is checked on every
            read regardless). A store without multi-record or raw frames still reads every
            footer at open, to build its frame table. Without a cache, as
            :func:`~tensorstore_pt.open_store`: every footer too.
        map_location: Passed to ``torch.load``.
        max_record_bytes: The largest raw record in bytes a read decodes when ``store`` is a
            path (default 1 GiB, see :func:`~tensorstore_pt.open_store`); a larger one raises
            :class:`~tensorstore_pt.errors.AllocationBudgetError` before allocating.
        storage_options: For a URL: the fsspec file system's options (docs/remote.md). The
            dataset pickles to the URL and these options, so each worker reopens the store.
        cache_dir: The node-local shard cache (:class:`~tensorstore_pt.cache.ShardCache`)
            streaming reads go through. A remote store (any Storage that is not local) always
            streams through a cache: by default ``$TSPT_CACHE_DIR``, else a per-user directory
            under ``tempfile.gettempdir()``. A local store reads its files directly unless
            ``cache_dir`` or ``cache_limit_bytes`` is given. Share one directory between every
            rank, worker and job of a node: each shard is then downloaded once per node.
        cache_limit_bytes: Bytes the cache may hold (every store in it together), LRU-evicted;
            None: no limit. Pinned shards are never evicted: each consumer pins at most
            ``prefetch_shards + 1``, and where pins exceed the limit it is over-committed by
            them (docs/remote.md). Without a limit a consumer also keeps the pins of up to
            32 shards it moved on from (it returns to them in a shuffled epoch). A shuffled
            epoch of a store larger than the limit bypasses the cache and fetches frames with
            ranged reads (whole shards would be evicted between a shard's many visits and
            downloaded again).
        prefetch_shards: Shards each consumer downloads ahead of the one it reads, in as many
            background threads (default 2, at least 1). A shard is unpinned once the consumer
            has read its last record of it in the epoch (or moves past the shards it looks
            ahead at). Memory: one 8 MiB chunk per download in flight.

    Raises:
        InvalidOptionError: An argument out of range or of the wrong type.
        The errors of :func:`~tensorstore_pt.open_store`.

    Background work: with ``num_workers=0`` a daemon thread reads, checks, decompresses and
    decodes ahead of the training loop. In a DataLoader worker a daemon thread reads ahead
    (up to 3 pieces: 2 queued, 1 being read) and the worker decodes in its own thread: the
    worker process is itself the decoder running ahead, and a decode thread there only added
    thread switches (docs/datasets.md).

    Memory (per consumer, i.e. per DataLoader worker or the main process when
    ``num_workers=0``): read pieces of about 1 MiB of compressed frames plus at most as many
    gap bytes (neighbouring frames less than 64 KiB apart are read in one go), i.e. at most
    2 MiB plus one frame each: one in the main process, up to 4 in a worker (3 read ahead,
    1 being decoded); plus, in the main process, ``prefetch_samples + 32`` decoded samples
    (the queue, the list being filled and the list being consumed, 16 samples each), or
    when a :class:`StoreDataLoader` takes whole batches, ``max(1, prefetch_samples //
    batch_size)`` queued batches plus the one being decoded, each with its decompressed
    records; in a worker one batch; with multi-record frames and ``shuffle``, the decoded
    samples of the window share being handed out (at most about :data:`WINDOW_DECODED_BYTES`
    of records at the store's mean size); plus 40 bytes a block and 32 bytes a window position
    (the window permutation and its sort keys, while it is made). The frame table (32 bytes a record) is
    in shared memory.

    Thread safety: iterate one iterator per process at a time. Fork/spawn safety: pickles
    without open files; the rank is resolved in the parent before pickling.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Storage | StoreReader,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        equalize: bool | str | None = None,
        batch_size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_error: str = "raise",
        block_records: int | None = None,
        window_records: int | None = None,
        prefetch_samples: int = 32,
        verify: bool = True,
        map_location: Any = "cpu",
        max_record_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit_bytes: int | None = None,
        prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    ) -> None:
        if not isinstance(shuffle, (bool, np.bool_)):
            raise InvalidOptionError(f"shuffle: expected a bool, found {shuffle!r}")
        seed = _check_int("seed", seed, 0)
        if seed >= 2**64:  # type: ignore[operator]
            raise InvalidOptionError(f"seed: expected an int in [0, 2**64), found {seed!r}")
        self._rank_arg = _check_int("rank", rank, 0, True)
        self._world_arg = _check_int("world_size", world_size, 1, True)
        if (self._rank_arg is None) != (self._world_arg is None):
            raise InvalidOptionError(
                f"rank and world_size: pass both or neither, found rank={rank!r}, world_size={world_size!r}"
            )
        if self._rank_arg is not None and self._rank_arg >= self._world_arg:  # type: ignore[operator]
            raise InvalidOptionError(f"rank: expected 0 <= rank < world_size={world_size}, found {rank}")
        if not (equalize is None or isinstance(equalize, bool) or equalize in EQUALIZE_MODES):
            raise InvalidOptionError(
                f"equalize: expected None, a bool or one of {list(EQUALIZE_MODES)}, found {equalize!r}"
            )
        if on_error not in ON_ERROR_POLICIES:
            raise InvalidOptionError(f"on_error: expected one of {list(ON_ERROR_POLICIES)}, found {on_error!r}")
        if transform is not None and not callable(transform):
            raise InvalidOptionError(f"transform: expected a callable or None, found {type(transform).__name__}")
        self._batch_arg = _check_int("batch_size", batch_size, 1, True, _SIZE_LIMIT)
        block_records = _check_int("block_records", block_records, 1, True, _SIZE_LIMIT)
        window_records = _check_int("window_records", window_records, 1, True, _SIZE_LIMIT)
        self.prefetch_samples = _check_int("prefetch_samples", prefetch_samples, 1)
        prefetch_shards = _check_int("prefetch_shards", prefetch_shards, 1)
        asked = cache_dir is not None or cache_limit_bytes is not None
        if asked:
            ShardCache(cache_dir, cache_limit_bytes)  # bad options fail before the store is opened

        def cache_for(storage: Storage) -> ShardCache | None:
            if asked or not isinstance(storage, LocalStorage):
                return ShardCache(cache_dir, cache_limit_bytes)
            return None

        self._view = _StoreView(
            store,
            verify,
            map_location,
            max_record_bytes,
            storage_options,
            cache_for,
            prefetch_shards,  # type: ignore[arg-type]
        )
        self.shuffle = bool(shuffle)
        self.seed = int(seed)  # type: ignore[arg-type]
        self.equalize = equalize
        self.transform = transform
        self.on_error = on_error
        view = self._view
        cap = _decoded_cap(view.records, view.raw_bytes) if view.multi else None
        auto_block, _ = default_block_window(view.records, view.stored_bytes)  # the window follows the block
        self.block_records = block_records if block_records is not None else auto_block
        self.window_records = window_records if window_records is not None else _default_window(self.block_records, cap)
        #: Multi-record frames: the most records a consumer gathers before handing them out
        #: in order (:meth:`_read_groups`); None: records are read in the order asked.
        self._group_records = cap
        self._control = torch.zeros(8, dtype=torch.int64).share_memory_()
        self._control[_CHUNK] = self._batch_arg or 1
        self._skips = torch.zeros((_SKIP_SLOTS, len(SKIP_KINDS)), dtype=torch.int64).share_memory_()
        self._layout: BlockLayout | None = None
        # The plan of an elastically resumed epoch (None: the whole epoch order) and its serial
        # number; _control[_PLAN] holds the serial of the plan in effect (0: none).
        self._plan: EpochPlan | None = None
        self._plan_serial = 0
        self._set_epoch_calls = 0
        self._id = uuid.uuid4().hex  # names this dataset to its StoreDataLoader's collate in workers
        # Set by a StoreDataLoader with num_workers=0 for the one iter() it makes: (batch size,
        # whether its collate is default_collate); the decode thread then hands over whole batches.
        self._batch_request: tuple[int, bool] | None = None

    # ------------------------------------------------------------------ configuration

    def __getstate__(self) -> dict[str, Any]:
        if get_worker_info() is None:
            self._resolve()  # spawned workers cannot see the parent's process group
        state = self.__dict__.copy()
        state["_layout"] = None
        state["_batch_request"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def location(self) -> str:
        return self._view.location

    @property
    def records(self) -> int:
        """Records in the store."""
        return self._view.records

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._control[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration reads (and so its shuffle).

        Moving to another epoch starts it from its first sample. Setting the epoch the dataset
        is already positioned in keeps the position, so a loop that calls ``set_epoch(e)`` at
        the top of every epoch keeps a position restored by
        :meth:`StoreDataLoader.load_state_dict`.

        Raises:
            InvalidOptionError: ``epoch`` is not an int >= 0.

        Takes effect in DataLoader workers, persistent ones included, at their next iteration
        (the epoch lives in shared memory).
        """
        e = _check_epoch("epoch", epoch)
        self._set_epoch_calls += 1
        if e != self.epoch:
            self._control[_EPOCH] = e
            self._control[_START] = 0
            self._control[_PLAN] = 0

    def _set_position(self, epoch: int, start: int, plan: EpochPlan | None = None) -> None:
        """Position the next iteration at rank position ``start`` of ``epoch``, split from ``plan``."""
        if plan is not None and plan.is_whole(self.records):
            plan = None
        if plan is not None and plan != self._plan:
            self._plan_serial += 1
            self._plan = plan
        self._control[_EPOCH] = epoch
        self._control[_START] = start
        self._control[_PLAN] = 0 if plan is None else self._plan_serial

    def _current_plan(self) -> EpochPlan | None:
        serial = int(self._control[_PLAN])
        if serial == 0:
            return None
        if serial != self._plan_serial:
            # A persistent worker started before the plan was set (StoreDataLoader restarts them).
            raise RuntimeError(
                f"this DataLoader worker holds epoch plan {self._plan_serial}, the loader is at plan {serial}: "
                "restart the workers (StoreDataLoader does this for you)"
            )
        return self._plan

    def _mode(self, world_size: int) -> str:
        eq = self.equalize
        if eq is None:
            return "pad" if world_size > 1 else "off"
        if eq is True:
            return "pad"
        if eq is False:
            return "off"
        return str(eq)

    def _resolve(self) -> tuple[int, int]:
        """Resolve rank/world_size here (the main process) and publish them to the workers."""
        rank, world = _resolve_rank(self._rank_arg, self._world_arg)
        c = self._control
        c[_RANK], c[_WORLD], c[_RESOLVED] = rank, world, 1
        return rank, world

    def _rank_world(self) -> tuple[int, int]:
        if get_worker_info() is None:
            return self._resolve()
        c = self._control
        if int(c[_RESOLVED]):
            return int(c[_RANK]), int(c[_WORLD])
        return _resolve_rank(self._rank_arg, self._world_arg)

    def _split(self, rank: int, world: int) -> RankSplit:
        return RankSplit.compute(self._view.records, world, rank, self._mode(world), self._current_plan())

    def layout(self) -> BlockLayout:
        """The block layout (cached per process)."""
        if self._layout is None:
            self._layout = BlockLayout.build(self._view.bounds, self.block_records, self.window_records)
        return self._layout

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch order as records (int64 (N,)). O(N) memory: for inspection and tests."""
        e = self.epoch if epoch is None else _check_epoch("epoch", epoch)
        return EpochOrder(self.layout(), shuffle=self.shuffle, seed=self.seed, epoch=e).all_records()  # type: ignore[arg-type]

    def __len__(self) -> int:
        """This rank's samples per epoch (equal on every rank with ``equalize``).

        The same every epoch, except an epoch resumed with another world size: then this rank's
        share of the rest of that epoch (see :meth:`StoreDataLoader.load_state_dict`).
        """
        return self._split(*self._rank_world()).length

    def partition(self, num_workers: int = 0, *, batch_size: int | None = None) -> PartitionReport:
        """Report how this rank's current epoch is split among ``num_workers`` DataLoader workers.

        Args:
            num_workers: As given to the DataLoader (0: the main process reads).
            batch_size: The chunk dealt to each worker; default: the dataset's.
        """
        k = max(1, _check_int("num_workers", num_workers, 0))  # type: ignore[type-var]
        chunk = _check_int("batch_size", batch_size, 1, True, _SIZE_LIMIT) or int(self._control[_CHUNK])
        rank, world = self._rank_world()
        split = self._split(rank, world)
        start = min(int(self._control[_START]), split.length)
        counts = tuple(worker_sample_count(split.length, start, chunk, k, w) for w in range(k))
        idle = tuple(w for w, c in enumerate(counts) if c == 0) if split.length > start else ()
        return PartitionReport(
            epoch=self.epoch,
            records=split.records,
            rank=rank,
            world_size=world,
            equalize=split.mode,
            rank_samples=split.length,
            padded=split.padded,
            dropped=split.dropped,
            start=start,
            batch_size=chunk,
            worker_samples=counts,
            idle_workers=idle,
            batches=math.ceil((split.length - start) / chunk),
        )

    def _say(self, report: PartitionReport, worker: int | None) -> None:
        """Warn about idle consumers and log padding/dropping (``worker`` None: for all workers)."""
        r = report
        if r.records == 0:
            warnings.warn(
                f"store {self.location!r} is empty: every rank and worker yields nothing",
                PartitionWarning,
                stacklevel=3,
            )
        elif r.rank_samples == 0:
            warnings.warn(
                f"rank {r.rank} of {r.world_size} gets no samples: the store has {r.records} records and "
                f"equalize={r.equalize!r} (use equalize='pad' to give every rank a sample)",
                PartitionWarning,
                stacklevel=3,
            )
        elif r.idle_workers and (worker is None or worker in r.idle_workers):
            idle = r.idle_workers if worker is None else (worker,)
            warnings.warn(
                f"DataLoader worker(s) {list(idle)} of {len(r.worker_samples)} on rank {r.rank} get no samples: "
                f"{r.rank_samples - r.start} samples in chunks of {r.batch_size} are fewer chunks than workers",
                PartitionWarning,
                stacklevel=3,
            )
        if worker in (None, 0) and (r.padded or r.dropped):
            logger.info(
                "store %r, epoch %d: equalize=%s over %d ranks: %d samples repeated, %d left out; rank %d gets %d",
                self.location,
                r.epoch,
                r.equalize,
                r.world_size,
                r.padded,
                r.dropped,
                r.rank,
                r.rank_samples,
            )

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, k = (0, 1) if info is None else (int(info.id), int(info.num_workers))
        split, start, chunk, layout, order = self._walk()
        if not int(self._control[_QUIET]):
            self._say(self.partition(k), worker)
        segments = worker_segments(split, layout.window_records, start, chunk, k, worker)
        # The same walk again, for the shard cache's prefetch plan (a second, lazy pass: O(1) memory).
        plan = worker_segments(split, layout.window_records, start, chunk, k, worker)
        slot = 0 if info is None else 1 + worker % (_SKIP_SLOTS - 1)
        if worker_sample_count(split.length, start, chunk, k, worker) == 0:
            return _SampleIterator(None, None)
        direct = self._bypass_cache()
        step = min(_HANDOFF_SAMPLES, self.prefetch_samples)
        request, self._batch_request = getattr(self, "_batch_request", None), None
        # CPU records only: the batch decoding fills CPU memory, with no map_location.
        raw = self.transform is None and self.on_error == "raise" and _is_cpu(self._view.map_location)
        if info is None and request is not None:
            # The main process under a StoreDataLoader (num_workers=0): the decode thread reads,
            # decompresses and decodes whole batches of the loader's batch size, ahead of the
            # training loop, in the order the loader's fetcher takes them. With torch's
            # default_collate, each batch is decoded in one go from its records' parts; with
            # another collate (or a transform, a skip policy, a map_location), samples are
            # loaded as a bulk read loads them (a column block's records together), not one
            # record's pickle at a time.
            chunk, default = request
            pieces = self._pieces(segments, split, order, plan, direct)
            if raw and default:
                producer = self._produce_batches(self._decode(pieces, slot, raw, direct, always=True), chunk)
            else:
                producer = self._produce(self._decode(pieces, slot, direct=direct), chunk)
            source: Iterator[list[Any]] = Prefetcher(
                producer, max(1, self.prefetch_samples // chunk), name="tspt-decode"
            )
        elif info is None:
            # The main process: read, decompress and decode in a background thread, ahead of
            # the training loop.
            producer = self._produce(
                self._decode(self._pieces(segments, split, order, plan, direct), slot, direct=direct), step
            )
            source = Prefetcher(producer, max(1, self.prefetch_samples // step), name="tspt-decode")
        else:
            # A DataLoader worker is itself a process decoding ahead of the training loop
            # (prefetch_factor batches); a decode thread there only adds thread switches
            # (measured: docs/datasets.md). Reads still run ahead in a thread, so that one
            # piece's I/O overlaps the previous piece's decoding.
            pieces = Prefetcher(
                self._pieces(segments, split, order, plan, direct), _READ_AHEAD_PIECES, name=f"tspt-read-w{worker}"
            )
            # Under a StoreDataLoader, records go to its collate unpickled, which decodes a
            # batch of them at once (no transform to apply, and no skip to decide here).
            source = _closing(self._produce(self._decode(pieces, slot, raw, direct), step), pieces)
        return _SampleIterator(source, self.transform)

    def _produce(self, samples: Iterator[Any], step: int) -> Iterator[list[Any]]:
        """Yield ``samples`` in lists of up to ``step``."""
        out: list[Any] = []
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except BaseException:
                if out:
                    yield out  # the samples before the error come first
                raise
            out.append(sample)
            if len(out) >= step:
                yield out
                out = []
        if out:
            yield out

    def _produce_batches(self, records: Iterator[Any], chunk: int) -> Iterator[list[Any]]:
        """Yield ``records`` (RawRecords, or samples already loaded: a regrouped read's, see
        :meth:`_decode`) in batches of ``chunk``, each decoded in one go for a loader whose
        collate is ``default_collate``.

        A batch of RawRecords that :func:`~tensorstore_pt._shared_batches.decode_batch` covers
        comes as :class:`~tensorstore_pt._shared_batches.BatchItem` samples of the collated
        batch; one it declines is loaded record by record here, and loaded samples pass as they
        are. An error comes after the samples before it, as from :meth:`_produce`.
        """
        while True:
            batch: list[Any] = []
            failure: BaseException | None = None
            try:
                while len(batch) < chunk:
                    batch.append(next(records))
            except StopIteration:
                pass
            except BaseException as exc:  # noqa: BLE001 - raised after the samples before it
                failure = exc
            if batch:
                raws = failure is None and all(type(rec) is RawRecord for rec in batch)
                collated = decode_batch(batch) if raws else None
                if collated is not None:
                    whole = DecodedBatch(collated, batch)
                    yield [BatchItem(whole, i) for i in range(len(batch))]
                else:
                    loaded: list[Any] = []
                    for rec in batch:
                        try:
                            loaded.append(rec.load() if type(rec) is RawRecord else rec)
                        except BaseException:
                            if loaded:
                                yield loaded
                            raise
                    yield loaded
            if failure is not None:
                raise failure
            if len(batch) < chunk:
                return

    def _pieces(
        self,
        segments: Iterator[np.ndarray],
        split: RankSplit,
        order: EpochOrder,
        plan: Iterator[np.ndarray] | None = None,
        direct: bool = False,
    ) -> Iterator[FetchedFrames | _Regroup]:
        """The consumer's records in order, in pieces of about ``READ_BYTES`` with their frames
        fetched: the I/O half of the reader's bulk read (:meth:`StoreReader.plan_pieces`,
        :meth:`StoreReader.fetch_many`), run ahead of decoding.

        Positions come from the shared frame table (no footer in a worker), except for
        multi-record-frame stores (format 1.1), which have none: their reader loads footers.
        A shard found missing is not opened again in this iteration. Records read out of the
        order asked (:meth:`_read_groups`) come after a :class:`_Regroup` that says where each
        goes; :meth:`_decode` puts them back.

        Through a shard cache, ``plan`` (the same segments, walked again) tells the cache the
        order in which shards will be visited, so that it downloads the next ones ahead; every
        shard is unpinned when the iteration ends. With ``direct`` (see :meth:`_bypass_cache`)
        frames are fetched from the store itself, with ranged reads.
        """
        cached = self._view.cached
        if cached is None or plan is None or direct:
            yield from self._fetch_pieces(segments, split, order, direct)
            return
        cached.plan(self._shard_plan(plan, split, order))
        try:
            yield from self._fetch_pieces(segments, split, order)
        finally:
            cached.release()

    def _shard_plan(self, segments: Iterator[np.ndarray], split: RankSplit, order: EpochOrder) -> Iterator[int]:
        """The shards :meth:`_fetch_pieces` will read, in the order it reads them (visits: no
        consecutive repeats). ``fetch_many`` reads a piece in file order, so shards ascend within
        a piece. (Multi-record-frame stores: shards in record order, as their pieces are cut on
        footers this walk must not load; a visit off the plan is still served, only not early.)"""
        starts = self._view.bounds[:, 0]
        stored = None if self._view.framed else self._view.table()["stored"]
        last = -1
        for records, _ in self._read_groups(segments, split, order):
            if stored is None:
                runs = [np.searchsorted(starts, records, side="right") - 1]
            else:
                runs = [
                    np.unique(np.searchsorted(starts, records[lo:hi], side="right") - 1)
                    for lo, hi in split_by_bytes(stored[records], READ_BYTES)
                ]
            for shards in runs:
                for si in shards.tolist():
                    if si != last:
                        yield si
                        last = si

    def _walk(self) -> tuple[RankSplit, int, int, BlockLayout, EpochOrder]:
        """Where this rank's walk of the epoch stands now: its split, the start position in it,
        the loader's chunk (batch size), the block layout and the epoch's order. What every
        consumer of the rank computes its records from (:meth:`__iter__`), and what the
        loader's head start (:meth:`_first_shards`) must compute them from too."""
        rank, world = self._rank_world()
        c = self._control
        epoch, start, chunk = int(c[_EPOCH]), int(c[_START]), int(c[_CHUNK])
        split = self._split(rank, world)
        layout = self.layout()
        order = EpochOrder(layout, shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        return split, min(start, split.length), chunk, layout, order

    def _first_shards(self, k: int) -> list[str]:
        """The shards each of ``k`` workers reads for its first batch (the read group
        :meth:`_first_piece_apart` cuts off), worker by worker, at the current position: what
        :meth:`StoreDataLoader.__iter__` downloads in the main process while the workers start.
        Empty when there is no shard cache in use. At most half the cache's limit of bytes."""
        cached = self._view.cached
        if cached is None or k < 1 or self._bypass_cache():
            return []
        split, start, chunk, layout, order = self._walk()
        starts = self._view.bounds[:, 0]
        keys = list(cached.keys.values())  # every shard of the index, in its order
        limit = cached.cache.limit_bytes
        budget = None if limit is None else limit // 2
        out: dict[str, None] = {}
        for w in range(k):
            if worker_sample_count(split.length, start, chunk, k, w) == 0:
                continue
            segments = worker_segments(split, layout.window_records, start, chunk, k, w)
            first = next(iter(self._first_piece_apart(segments, split, order)), None)
            if first is None:
                continue
            for si in np.unique(np.searchsorted(starts, first, side="right") - 1).tolist():
                name, size = keys[si].name, keys[si].file_bytes
                if name in out:
                    continue
                if budget is not None:
                    if size > budget:
                        return list(out)
                    budget -= size
                out[name] = None
        return list(out)

    def _bypass_cache(self) -> bool:
        """Whether this epoch reads a remote store with ranged reads instead of through its
        shard cache: when it is shuffled and the store is larger than ``cache_limit_bytes``.

        The window shuffle makes consecutive records come from different shards, so a consumer
        visits most shards many times an epoch; whole shards downloaded into a cache that cannot
        hold them all are evicted between visits and downloaded again (measured: 31x the store's
        bytes for a cache a third of the store). Ranged reads fetch each frame once.
        """
        cached = self._view.cached
        if cached is None or not self.shuffle or cached.cache.limit_bytes is None:
            return False
        return cached.cache.limit_bytes < self._view.file_bytes

    def _fetch_pieces(
        self, segments: Iterator[np.ndarray], split: RankSplit, order: EpochOrder, direct: bool = False
    ) -> Iterator[FetchedFrames | _Regroup]:
        io = self._view.reader(direct)
        table = None if self._view.framed else self._view.table()
        missing: dict[int, BaseException] = {}
        for records, sorter in self._read_groups(segments, split, order):
            if sorter is not None:
                yield _Regroup(sorter)
            for piece in io.plan_pieces(records, READ_BYTES, table=table, missing=missing):
                yield io.fetch_many(piece, table=table, missing=missing)

    def _read_groups(
        self, segments: Iterator[np.ndarray], split: RankSplit, order: EpochOrder
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The consumer's records (:meth:`_first_piece_apart`) as read groups: ``(records, None)``
        read in the order given, or, with multi-record frames and records out of store order
        (a shuffled window), ``(records sorted, sorter)`` with ``sorter`` the stable argsort,
        in parts of at most ``_group_records`` records.

        A shuffled window sends each record to another frame: read in the window's order, a
        frame (a 256 KiB column block) was decoded once for each of its records, and each
        record loaded alone (measured: 7x slower than an ordered pass). Read sorted, each frame
        of the group is decoded once and a block's records load together; :meth:`_decode`
        puts them back in the window's order."""
        cap = self._group_records
        for records in self._first_piece_apart(segments, split, order):
            if cap is None or len(records) < 2:
                yield records, None
                continue
            for lo in range(0, len(records), cap):
                part = records[lo : lo + cap]
                if len(part) > 1 and bool((part[1:] < part[:-1]).any()):
                    sorter = np.argsort(part, kind="stable")
                    yield part[sorter], sorter
                else:
                    yield part, None

    def _first_piece_apart(
        self, segments: Iterator[np.ndarray], split: RankSplit, order: EpochOrder
    ) -> Iterator[np.ndarray]:
        """The consumer's records, segment by segment, with its first batch (``batch_size``
        records) cut off the first segment as a read group of its own.

        A piece of ``READ_BYTES`` can span every shard of a shuffled window, and its first
        sample waits for all of it: on a remote store, for every one of those shards to be
        downloaded. Reading the first batch on its own gets it to the training loop after only
        its own shards (time to first batch); later pieces keep their full size. The cache's
        shard plan walks the same cut, so prefetching follows the reads.

        Not for a local store with multi-record frames (no shard cache): its records are read
        in groups (:meth:`_read_groups`), and a first batch read apart decodes the frames of its
        records twice (once more in the rest of the group); for the benchmark's shuffled
        epochs of up to a few hundred records that was 1.5-2x the decoding of the epoch. Its
        first batch then waits for the decoding of the first group, not for downloads.
        """
        first = self._group_records is None or self._view.cached is not None
        for seg in segments:
            records = order.records_at(split.global_positions(seg))
            if first:
                first = False
                head = min(len(records), max(1, int(self._control[_CHUNK])))
                if 0 < head < len(records):
                    yield records[:head]
                    records = records[head:]
            yield records

    def _decode(
        self,
        pieces: Iterator[FetchedFrames | _Regroup],
        slot: int,
        raw: bool = False,
        direct: bool = False,
        always: bool = False,
    ) -> Iterator[Any]:
        """Check, decompress and load the records of ``pieces`` in order (skipping as ``on_error``
        says): the CPU half of the reader's bulk read (:meth:`StoreReader.decode_many`).

        With ``raw``, once this worker's collate takes them (:func:`raw_accepted`, checked
        per piece), records are yielded checked and decompressed but not unpickled, as
        :class:`~tensorstore_pt.reader.RawRecord`; with ``always`` too, from the first piece.
        """
        io = self._view.reader(direct)
        skip = self.on_error == "skip"
        group: list[Any] | None = None  # a regrouped read's results, in the order asked
        sorter: list[int] = []
        got = 0
        try:
            for piece in pieces:
                if type(piece) is _Regroup:
                    sorter = piece.sorter.tolist()
                    group, got = [None] * len(sorter), 0
                    continue
                # A group's records are loaded, never RawRecords: a RawRecord of a column block
                # pins the whole decoded block until it is handed out, and a group may draw a
                # few records from each of many blocks (measured: 75x WINDOW_DECODED_BYTES with
                # a large window). Loaded (a block's records together), a group holds its
                # samples' own bytes; on the benchmark's compact stores it also batches 1.2-2.5x
                # faster than the RawRecords' batch decoding.
                use_raw = raw and group is None and (always or raw_accepted(self._id))
                results = io.decode_many(piece, raw=use_raw)
                if group is None:
                    yield from self._settle(results, slot, skip)
                    continue
                for result in results:
                    group[sorter[got]] = result
                    got += 1
                if got == len(group):
                    done, group = group, None
                    yield from self._settle(_handed_out(done), slot, skip)
        except Exception:
            # A storage error (not a record's: those are results) while a group was gathered:
            # the group's samples before the first one not read come first, as reading in
            # order would have handed them out before the error.
            if group is not None:
                done, group = group, None
                read = next((i for i, result in enumerate(done) if result is None), len(done))
                yield from self._settle(_handed_out(done[:read]), slot, skip)
            raise

    def _settle(self, results: Iterator[RecordResult], slot: int, skip: bool) -> Iterator[Any]:
        """The samples of ``results`` in order: an error raises in its turn, or (``skip``) is
        counted and left out."""
        for record, sample, error in results:
            if error is not None:
                if not skip:
                    raise error
                self._count_skip(slot, record, error)
                continue
            yield sample

    def _count_skip(self, slot: int, record: int, exc: BaseException) -> None:
        kind = next(i for i, t in enumerate(_SKIP_TYPES) if isinstance(exc, t))
        self._skips[slot, kind] += 1
        logger.warning("skipped record %d of store %r (%s): %s", record, self.location, type(exc).__name__, exc)

    def skip_counts(self) -> dict[str, int]:
        """Records skipped so far under ``on_error="skip"``, by error kind, over every process.

        Counts are cumulative over the dataset's life (all epochs), kept in shared memory so
        that the main process sees its workers' counts. Kinds are :data:`SKIP_KINDS`.
        """
        totals = self._skips.sum(dim=0).tolist()
        return {kind: int(n) for kind, n in zip(SKIP_KINDS, totals) if n}

    @property
    def skipped(self) -> int:
        """Total records skipped so far (see :meth:`skip_counts`)."""
        return int(self._skips.sum())

    def __repr__(self) -> str:
        return (
            f"StoreIterableDataset({self.location!r}, records={self.records}, shuffle={self.shuffle}, "
            f"seed={self.seed}, block_records={self.block_records}, window_records={self.window_records})"
        )


# --------------------------------------------------------------------------- loader

_STATE_FORMAT = "tensorstore_pt.StoreDataLoader"
#: Version 2 adds ``plan`` and resumes with another world size; version 1 states are still read.
_STATE_VERSION = 2
_STATE_VERSIONS = (1, 2)
#: The largest world size a state may name. Resuming elastically costs O(world size) (the rest
#: of an epoch has up to one interval per saving rank), so a state naming billions of ranks
#: would exhaust memory or hang; no job has more than a few hundred thousand ranks.
MAX_STATE_WORLD_SIZE = 2**20
#: What every resume must match; world_size and equalize may differ (an elastic resume).
_STATE_INVARIANTS = ("store", "records", "shuffle", "seed", "block_records", "window_records")


def _plan_from_state(raw: Any, records: int) -> EpochPlan | None:
    """Check a state's ``plan``: None or ``[[lo, hi], ...]``, non-empty intervals within
    ``[0, records)``, disjoint and ascending (epoch order, as every saved plan is)."""
    if raw is None:
        return None
    ok = isinstance(raw, (list, tuple)) and all(
        isinstance(iv, (list, tuple))
        and len(iv) == 2
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in iv)
        and 0 <= iv[0] < iv[1] <= records
        for iv in raw
    )
    if ok:
        iv = np.asarray(raw, dtype=np.int64).reshape(-1, 2)
        ok = bool(np.all(iv[1:, 0] >= iv[:-1, 1]))
    if not ok:
        raise InvalidOptionError(
            f"state plan: expected None or a list of disjoint, ascending [lo, hi] intervals with "
            f"0 <= lo < hi <= {records}, found {raw!r:.200}"
        )
    plan = EpochPlan(iv)
    return None if plan.is_whole(records) else plan


def _state_split(state: dict[str, Any], records: int) -> tuple[int, str, EpochPlan | None]:
    """A state's world size, equalize mode and plan (checked)."""
    world = _check_int("state world_size", state.get("world_size"), 1)
    if world > MAX_STATE_WORLD_SIZE:  # type: ignore[operator]
        raise InvalidOptionError(
            f"state world_size: expected an int in [1, {MAX_STATE_WORLD_SIZE}] (2**20), found {world}"
        )
    mode = state.get("equalize")
    if mode not in EQUALIZE_MODES:
        raise InvalidOptionError(f"state equalize: expected one of {list(EQUALIZE_MODES)}, found {mode!r}")
    plan = _plan_from_state(state.get("plan"), records) if state.get("version") != 1 else None
    return world, mode, plan  # type: ignore[return-value]


class _LoaderIterator:
    """Wraps a DataLoader iterator and advances the loader's position per delivered batch.

    The position lives in the loader (main process) while batches flow; the dataset's shared
    control block, which workers read when they start an iteration, is only written when no
    worker can still be about to read it: at ``iter()`` and after the epoch is exhausted.
    """

    def __init__(
        self, loader: StoreDataLoader, inner: Iterator[Any], epoch: int, start: int, length: int, end: int
    ) -> None:
        self._loader = loader
        self._inner = inner
        self._epoch = epoch
        self._pos = start
        self._length = length
        self._end = end
        self._ended = False

    def __iter__(self) -> _LoaderIterator:
        return self

    def __len__(self) -> int:
        """Batches left in this epoch on this rank."""
        return math.ceil(max(0, self._end - self._pos) / self._loader._chunk)

    def __next__(self) -> Any:
        if self._ended:
            raise StopIteration
        try:
            batch = materialize(next(self._inner))
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._abandon()
            raise
        loader = self._loader
        self._pos = min(self._pos + loader._chunk, self._length)
        if loader._is_live(self):
            if self._pos >= self._end:
                loader._epoch, loader._samples, loader._plan = self._epoch + 1, 0, None
            else:
                loader._epoch, loader._samples = self._epoch, self._pos
        return batch

    def _abandon(self) -> None:
        """Stop the workers now that an error ends this iteration.

        The propagating exception's traceback refers to the DataLoader iterator, which would
        otherwise be finalised by the cycle collector, at a time when its queues may already be
        closed: each worker then costs a 5 s join timeout.
        """
        self._ended = True
        shutdown = getattr(self._inner, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if getattr(self._loader, "_iterator", None) is self._inner:
            self._loader._iterator = None  # persistent workers: start afresh next time

    def _finish(self) -> None:
        self._ended = True
        loader = self._loader
        if isinstance(loader.collate_fn, SharedBatchCollate):
            loader.collate_fn.forget_dead_workers()  # non-persistent workers have just exited
        if loader._is_live(self):
            loader._epoch, loader._samples, loader._plan = self._epoch + 1, 0, None
            loader.dataset._set_position(self._epoch + 1, 0)  # type: ignore[attr-defined]


class StoreDataLoader(DataLoader):
    """A ``DataLoader`` for :class:`StoreIterableDataset` that counts what it delivered.

    ``state_dict()`` is the consumer-side position: the epoch and the number of this rank's
    samples delivered to the training loop (not what workers prefetched). A new loader given
    that state with ``load_state_dict()`` continues with exactly the rest of the epoch, in the
    same order, with any ``num_workers``. Once the last batch of an epoch is delivered the
    state is the start of the next epoch, and the next ``iter()`` reads it (with its shuffle).

    ``iter()`` continues from the current position: after a ``break`` it resumes where the
    loop stopped; after a finished epoch it starts the next one. ``dataset.set_epoch(e)``
    moves to the start of epoch ``e`` (a no-op if the loader is already in epoch ``e``).

    Worker batches (``num_workers > 0``, on x86-64) travel through a ring of reused
    shared-memory arenas per worker instead of one new shared-memory segment and file
    descriptor per tensor (torch's default), which cost a quarter to a third of all CPU time
    a sample on medium records. Batches arrive as views of an arena (one storage per tensor of
    exactly its bytes, not resizable); an arena is reused only once every tensor of its last
    batch is gone, so keeping batches is safe (kept batches make later ones use torch's
    transport). With ``pin_memory`` the pinned copy is taken from the arena. Each worker holds
    ``prefetch_factor + 3`` arenas, each at most twice its largest batch and 1 GiB. See ``tensorstore_pt._shared_batches``.

    With the default collate, a dataset without ``transform`` and ``on_error="raise"`` (and CPU
    records), records are unpickled a batch at a time: in workers with the ring, straight into
    the arena; with ``num_workers=0`` and a ``batch_size``, by the dataset's decode thread, which
    hands over whole batches (with another collate, whole batches of records loaded one by one).
    A batch of records of one structure (nested dicts, lists and tuples of whole-storage tensors
    and int, float, bool, str or bytes leaves) is decoded in one go
    (:func:`tensorstore_pt.fastload.collate_records`); anything else is loaded record by record.
    The batches are the same either way: what the collate makes of the records ``torch.load``
    gives, bit for bit and type for type.

    Args:
        dataset: A :class:`StoreIterableDataset`.
        batch_ring: Use the shared-memory ring for worker batches (default True); False
            gives torch's own transport.
        **dataloader_kwargs: As for ``torch.utils.data.DataLoader``. ``batch_size`` also sets
            the chunk dealt to each worker. ``in_order=False`` is refused (it breaks the
            order guarantee). ``collate_fn`` is wrapped when the ring is on or
            ``num_workers=0`` (the wrapper's ``collate_fn`` attribute is yours).

    Raises:
        InvalidOptionError: ``dataset`` is not a StoreIterableDataset, ``in_order=False``,
            ``batch_ring`` is not a bool, or the dataset's own ``batch_size`` differs from
            the loader's.

    Thread safety: use one iterator at a time (a new ``iter()`` supersedes the previous one).
    """

    def __init__(self, dataset: StoreIterableDataset, *, batch_ring: bool = True, **dataloader_kwargs: Any) -> None:
        if not isinstance(dataset, StoreIterableDataset):
            raise InvalidOptionError(
                f"dataset: expected a StoreIterableDataset, found {type(dataset).__name__} "
                "(use a plain DataLoader for map-style datasets)"
            )
        if dataloader_kwargs.get("in_order", True) is False:
            raise InvalidOptionError(
                "in_order: expected True; in_order=False delivers batches out of order, so neither the "
                "order nor resume could be exact"
            )
        if not isinstance(batch_ring, (bool, np.bool_)):
            raise InvalidOptionError(f"batch_ring: expected a bool, found {batch_ring!r}")
        super().__init__(dataset, **dataloader_kwargs)
        if (batch_ring and self.num_workers > 0) or self.num_workers == 0:
            # slots: prefetch_factor batches in flight, the batch being handed out, the one the
            # training loop still holds while it asks for the next, and one to spare. With
            # num_workers=0 it takes the batches the decode thread decoded whole.
            self.collate_fn = SharedBatchCollate(self.collate_fn, (self.prefetch_factor or 2) + 3, dataset._id)
        chunk = self.batch_size if self.batch_size is not None else 1
        if chunk > _SIZE_LIMIT:
            raise InvalidOptionError(f"batch_size: expected an int <= {_SIZE_LIMIT}, found {chunk}")
        if dataset._batch_arg is not None and dataset._batch_arg != chunk:
            raise InvalidOptionError(
                f"batch_size: the dataset was made with batch_size={dataset._batch_arg}, the loader has "
                f"batch_size={self.batch_size}; pass the same, or leave the dataset's unset"
            )
        self._chunk = chunk
        self._epoch = dataset.epoch
        self._samples = int(dataset._control[_START])
        self._plan = dataset._current_plan()  # the plan this epoch is split from (None: the whole order)
        self._workers_plan = 0  # the plan serial the persistent workers, if any, were started with
        self._seen_set_epoch = dataset._set_epoch_calls
        # A weak reference: a dropped iterator must shut its workers down at once, not when the
        # cycle collector gets to it (by then its queues may be finalised and workers hang).
        self._live: weakref.ref[_LoaderIterator] | None = None
        dataset._control[_QUIET] = 1  # the loader reports for its workers

    def _sync_from_dataset(self) -> None:
        ds: StoreIterableDataset = self.dataset  # type: ignore[assignment]
        if ds._set_epoch_calls != self._seen_set_epoch:
            self._seen_set_epoch = ds._set_epoch_calls
            if ds.epoch != self._epoch:
                self._epoch, self._samples, self._plan = ds.epoch, 0, None

    def _warm_first_shards(self, ds: StoreIterableDataset) -> None:
        """Download the workers' first shards into the node's cache here, in this process's
        object-store client, while the workers start: a worker then finds them on the node
        instead of first creating a client of its own (about 0.5 s for s3fs) and fetching them.

        Workers started by ``fork`` inherit this process's open files, and with them the files
        of downloads in flight (the cache closes its inherited download locks in a forked
        child, but a half-written download's file would stay pinned there while the worker
        lives): with ``fork``, the downloads end before the workers start (they run in
        parallel, :data:`~tensorstore_pt.cache.WARM_THREADS` at a time, so this costs about
        what a worker's own first download would). ``spawn`` and ``forkserver`` workers
        inherit no open file (the cache opens every file close-on-exec), so the downloads
        overlap their start.
        """
        try:
            thread = ds._view.cached.warm(ds._first_shards(self.num_workers))  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - only a head start: the workers read as always
            logger.debug("no head start for the workers' first shards: %r", exc)
            return
        if thread is None:
            return
        if self._forks_workers():
            thread.join()

    def _forks_workers(self) -> bool:
        """Whether this loader's workers start by ``fork`` (its multiprocessing context, or
        torch's default)."""
        context = self.multiprocessing_context or torch.multiprocessing.get_context()
        return context.get_start_method() == "fork"

    def _get_iterator(self) -> Any:
        """DataLoader's iterator, whose ``__init__`` starts the workers. With ``fork``, this
        process's objects are frozen (``gc.freeze``) while the workers fork and unfrozen at
        once after: a worker inherits them in the permanent generation, so its cycle collector
        never walks them. Without this, each full collection in a worker walks every object
        the training process had (hundreds of thousands once s3fs and its client are loaded),
        writing to each header and so copying its memory page: about 0.3 s of a 2 s epoch
        measured on the benchmark's small kind. The Python docs (``gc.freeze``) recommend it
        before fork for the same copy-on-write reason. Objects a worker inherits are then not
        collected in that worker (cycles among them stay until it exits)."""
        if self.num_workers == 0 or not self._forks_workers():
            return super()._get_iterator()
        gc.freeze()
        try:
            return super()._get_iterator()
        finally:
            gc.unfreeze()

    def __iter__(self) -> _LoaderIterator:  # type: ignore[override]
        ds: StoreIterableDataset = self.dataset  # type: ignore[assignment]
        self._sync_from_dataset()
        ds._set_position(self._epoch, 0, self._plan)
        length = len(ds)
        start = min(self._samples, length)
        end = (
            start + (length - start) // self._chunk * self._chunk
            if self.batch_size is not None and self.drop_last
            else length
        )
        ds._set_position(self._epoch, start, self._plan)
        ds._control[_CHUNK] = self._chunk
        ds._say(ds.partition(self.num_workers), None)
        serial = int(ds._control[_PLAN])
        if self._iterator is not None and serial not in (0, self._workers_plan):
            # Persistent workers hold a copy of the dataset made before this plan was set.
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
        if self._iterator is None:
            self._workers_plan = ds._plan_serial
        if (
            self.num_workers == 0
            and self.batch_size is not None
            and isinstance(self.collate_fn, SharedBatchCollate)
            and _shared_batches.BATCH_DECODE == "all"
        ):
            ds._batch_request = (self._chunk, self.collate_fn.collate_fn is default_collate)
        if self.num_workers > 0 and ds._view.cached is not None:
            self._warm_first_shards(ds)
        try:
            inner = super().__iter__()  # with num_workers=0 this calls iter(ds), which takes the request
        finally:
            ds._batch_request = None
        if isinstance(self.collate_fn, SharedBatchCollate):
            self.collate_fn.forget_dead_workers()
        live = _LoaderIterator(self, inner, self._epoch, start, length, end)
        self._live = weakref.ref(live)
        return live

    def _is_live(self, it: _LoaderIterator) -> bool:
        return self._live is not None and self._live() is it

    def state_dict(self) -> dict[str, Any]:
        """The consumer-side position and what it is valid for.

        Returns:
            A JSON-serialisable dict (version 2): ``epoch``, ``samples`` (this rank's samples
            delivered in that epoch), ``plan`` (None, or the ``[[lo, hi], ...]`` global-position
            intervals this epoch's rank shares are cut from after an elastic resume: at most a
            few per rank of each world size resumed with this epoch), the rank (for
            information), and the split and the facts a resume must match (world_size, equalize
            mode; store digest, records, shuffle, seed, block and window sizes).
        """
        self._sync_from_dataset()
        ds: StoreIterableDataset = self.dataset  # type: ignore[assignment]
        rank, world = ds._rank_world()
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "samples": self._samples,
            "rank": rank,
            **self._fingerprint(world),
            "plan": None if self._plan is None else self._plan.to_list(),
        }

    def _fingerprint(self, world: int) -> dict[str, Any]:
        """What a position is valid for. Not the rank: ranks advance in lockstep (see load_state_dict)."""
        ds: StoreIterableDataset = self.dataset  # type: ignore[assignment]
        return {
            "store": f"{ALGORITHM}:{ds._view.digest:016x}",
            "records": ds.records,
            "world_size": world,
            "equalize": ds._mode(world),
            "shuffle": ds.shuffle,
            "seed": ds.seed,
            "block_records": ds.block_records,
            "window_records": ds.window_records,
        }

    @staticmethod
    def _check_state(state: Any) -> dict[str, Any]:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise InvalidOptionError(f"state: expected a dict from StoreDataLoader.state_dict(), found {state!r:.200}")
        if state.get("version") not in _STATE_VERSIONS:
            raise InvalidOptionError(
                f"state: expected version in {list(_STATE_VERSIONS)}, found {state.get('version')!r}"
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next ``iter()`` yields the rest of its epoch.

        ``num_workers``, ``batch_size``, ``prefetch_factor`` and ``persistent_workers`` may
        differ from the run that saved the state, and so may the world size and the equalize
        mode (an **elastic resume**).

        The state may come from another rank of the same job: in DDP every rank delivers the
        same number of samples per step (with ``equalize``), so the state rank 0 saved
        restores every rank. With the saving run's world size and equalize mode, each rank
        continues with the rest of its own share, in the same order as if never stopped.
        Otherwise the rest of the epoch over all the saving ranks (every position of the epoch
        none of them delivered, each once, in epoch order: see docs/datasets.md) is split
        afresh among this job's ranks, contiguously and with this loader's equalize mode; the
        split is a function of the state and (rank, world_size) alone. After an elastic load,
        :meth:`state_dict` describes this loader's split (``plan`` the rest, ``samples`` 0).
        For ranks that delivered different numbers of samples, see :meth:`merge_states`.

        States of version 1 are read too (their plan is the whole epoch order).

        Raises:
            InvalidOptionError: The state is malformed, past its split's end, or was saved for
                another store, shuffle, seed or block/window size.
        """
        state = self._check_state(state)
        ds: StoreIterableDataset = self.dataset  # type: ignore[assignment]
        _, world = ds._rank_world()
        expected = self._fingerprint(world)
        wrong = {k: (state.get(k), expected[k]) for k in _STATE_INVARIANTS if state.get(k) != expected[k]}
        if wrong:
            detail = ", ".join(f"{k}: state has {a!r}, this loader has {b!r}" for k, (a, b) in sorted(wrong.items()))
            raise InvalidOptionError(f"state does not fit this loader ({detail})")
        epoch = _check_epoch("state epoch", state.get("epoch"))
        samples = _check_int("state samples", state.get("samples"), 0)
        saved_world, saved_mode, plan = _state_split(state, ds.records)
        longest = max(
            RankSplit.compute(ds.records, saved_world, k, saved_mode, plan).length for k in (0, saved_world - 1)
        )
        if samples > longest:  # type: ignore[operator]
            raise InvalidOptionError(
                f"state samples: expected at most {longest} (a rank's share of the saved split), found {samples}"
            )
        if (saved_world, saved_mode) != (world, ds._mode(world)):
            rest = rest_of_epoch(ds.records, saved_world, saved_mode, samples, plan)  # type: ignore[arg-type]
            if len(rest) == 0:
                epoch, plan = epoch + 1, None  # type: ignore[operator]
            else:
                plan = None if rest.is_whole(ds.records) else rest
            samples = 0
        self._epoch, self._samples, self._plan = epoch, samples, plan  # type: ignore[assignment]
        self._live = None
        ds._set_position(epoch, samples, plan)  # type: ignore[arg-type]
        self._seen_set_epoch = ds._set_epoch_calls

    @staticmethod
    def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One state from the states all ranks of one job saved at the same step.

        Needed when ranks delivered different numbers of samples (no ``equalize``, a rank that
        stopped early, ``on_error="skip"`` aside): each rank's own state then restores only
        that rank. The merged state records the rest of the epoch over all of them (every
        position none of them delivered, each once, in epoch order) and resumes every rank of
        any world size exactly (:meth:`load_state_dict`). If every rank delivered the same
        number of samples, it is the (rank-independent) state they all saved.

        Args:
            states: Exactly one :meth:`state_dict` from each rank ``0 .. world_size - 1`` (any
                order), all for the same store, split and epoch, or the next epoch's start
                for a rank that finished the epoch (it delivered its whole share; with
                ``drop_last``, the partial batch it left out counts as delivered).

        Returns:
            A JSON-serialisable state (version 2); ``rank`` is None when the states differed.

        Raises:
            InvalidOptionError: A state is malformed, the states disagree on the store, split
                or epoch, or the ranks are not each present once.
        """
        states = [StoreDataLoader._check_state(s) for s in states] if isinstance(states, (list, tuple)) else []
        if not states:
            raise InvalidOptionError("states: expected a non-empty list of StoreDataLoader.state_dict() results")
        first = states[0]
        keys = (*_STATE_INVARIANTS, "world_size", "equalize")
        for st in states[1:]:
            wrong = [k for k in keys if st.get(k) != first.get(k)]
            if wrong:
                raise InvalidOptionError(f"states: ranks disagree on {wrong} ({st.get('rank')} vs {first.get('rank')})")
        records = _check_int("state records", first.get("records"), 0)
        world, mode, _ = _state_split(first, records)  # type: ignore[arg-type]
        ranks = sorted(st.get("rank") for st in states if type(st.get("rank")) is int)
        if len(states) != world or ranks != list(range(world)):  # (the length first: world may be huge)
            raise InvalidOptionError(
                f"states: expected one state from each rank 0..{world - 1}, found ranks {[s.get('rank') for s in states]}"
            )
        by_rank = sorted(states, key=lambda st: st["rank"])
        epochs = [_check_epoch("state epoch", st.get("epoch")) for st in by_rank]
        counts = [_check_int("state samples", st.get("samples"), 0) for st in by_rank]
        epoch = min(epochs)  # type: ignore[type-var]
        current = [st for st, e in zip(by_rank, epochs) if e == epoch]
        if any(e not in (epoch, epoch + 1) or (e != epoch and c) for e, c in zip(epochs, counts)):  # type: ignore[operator]
            raise InvalidOptionError(
                f"states: expected every rank in epoch {epoch}, or at the start of epoch {epoch + 1} "  # type: ignore[operator]
                f"(finished), found (epoch, samples) {list(zip(epochs, counts))}"
            )
        plans = {json.dumps(st.get("plan") if st.get("version") != 1 else None) for st in current}
        if len(plans) != 1:
            raise InvalidOptionError(f"states: ranks in epoch {epoch} disagree on the plan")
        if len(set(epochs)) == 1 and len(set(counts)) == 1:
            return dict(first)
        plan = _state_split(current[0], records)[2]  # type: ignore[arg-type]
        delivered = []
        for k, (e, c) in enumerate(zip(epochs, counts)):
            length = RankSplit.compute(records, world, k, mode, plan).length  # type: ignore[arg-type]
            if c > length:  # type: ignore[operator]
                raise InvalidOptionError(f"state samples of rank {k}: expected at most {length}, found {c}")
            delivered.append(length if e != epoch else c)
        rest = rest_of_epoch(records, world, mode, delivered, plan)  # type: ignore[arg-type]
        merged = {**first, "version": _STATE_VERSION, "rank": None, "samples": 0}
        if len(rest) == 0:
            merged.update(epoch=epoch + 1, plan=None)  # type: ignore[operator]
        else:
            merged.update(epoch=epoch, plan=None if rest.is_whole(records) else rest.to_list())  # type: ignore[arg-type]
        return merged
