"""open_store() -> StoreReader: random access to the records of a store.

Every read checks the frame's xxh3_64 digest *before* decompressing, checks the frame
header's declared size against the raw length in the shard footer *before* allocating, and
checks the decompressed length after. Records are loaded with
``torch.load(weights_only=True)``.

Bulk reads (:meth:`StoreReader.read_many`, ``store[list]``, ``store[slice]``, and the
datasets) go through one pipeline: :meth:`StoreReader.plan_pieces` (pieces of about
:data:`READ_BYTES` of frames), :meth:`StoreReader.fetch_many` (the I/O: frames sorted by
shard and offset, nearby ones merged into one positional read) and
:meth:`StoreReader.decode_many` (the checks, decompression and loading, with per-record
errors returned as :class:`RecordResult`). Every read goes through the store's
:class:`~tensorstore_pt.storage.Storage`, so a remote store pays one ranged request a
positional read: one for a shard's footer (its tail, once), then one a record or run.
"""

from __future__ import annotations

import errno
import os
import threading
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ._forksafe import ChildLock
from .checksums import ALGORITHM, digest_int
from .codecs import Codec, get_codec
from .codecs.registry import read_store_file
from .errors import (
    AllocationBudgetError,
    ChecksumMismatchError,
    CorruptStoreError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotAStoreError,
    RecordDecodeError,
    RecordIndexError,
    RecordIndexTypeError,
    RemoteStorageError,
    ShardFormatError,
    ShardSizeError,
    StoreChangedError,
    StoreNotFoundError,
    TensorStoreError,
    UnsafePayloadError,
)
from .columnar import ColumnBlock
from .fastload import DECLINED, _is_cpu, fast_loads_parts, small_records_ok
from .format import (
    FEATURE_COLUMNAR_FRAMES,
    HEADER_BYTES,
    INDEX_NAME,
    FEATURE_MULTI_RECORD_FRAMES,
    FEATURE_RAW_FRAMES,
    MAX_INDEX_BYTES,
    RECORD_DTYPE,
    SHARD_SUFFIX,
    IndexInfo,
    ShardEntry,
    ShardFooter,
    StoreInfo,
    parse_index,
)
from .serialization import loads
from ._partition import plan_runs, split_by_bytes
from .shardio import (
    DEFAULT_MAX_RECORD_BYTES,
    check_frame,
    check_index_sizes,
    check_record_budget,
    fetch_footer,
    file_digest,
    read_exact,
    read_footer,
)
from .storage import ReadHandle, Storage, storage_for

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "MERGE_GAP_BYTES",
    "READ_BYTES",
    "FetchedFrames",
    "RawRecord",
    "RecordResult",
    "StoreReader",
    "check_index_sizes",
    "open_store",
    "read_footer",
]

#: Bulk reads (:meth:`StoreReader.iter_many`) fetch and decode records in pieces of about this
#: many stored (compressed) bytes.
READ_BYTES = 2**20
#: Frames of one shard less than this many bytes apart may be fetched with one positional read
#: (the gap is read and dropped), as long as the gaps of a piece add up to at most its own bytes.
MERGE_GAP_BYTES = 64 * 2**10
#: Serializes StoreReader._ensure_process's fresh start in a forked child; made afresh in every
#: child (a lock a parent's thread held at the fork would stay held there).
_PROCESS_LOCK = ChildLock()

#: What a bulk read reports per record instead of raising: the store's damage
#: (``CorruptStoreError`` and its subclasses) and refused pickles (``UnsafePayloadError``).
RECORD_ERRORS: tuple[type[BaseException], ...] = (CorruptStoreError, UnsafePayloadError)
#: Requests :meth:`StoreReader.iter_many` plans at a time (its planning memory: about 50 bytes each).
PLAN_RECORDS = 2**16
#: With multi-record frames, a bulk read keeps a decoded frame that later records of the same
#: piece still need, up to this many decoded bytes in all; past it a frame is decoded again
#: when a later record needs it. A piece of 1 MiB stored bytes can hold thousands of frames,
#: each decoding to up to ``max_record_bytes``: kept without a bound, frames that compress
#: well (or a hostile store's) could take gigabytes.
KEPT_FRAME_BYTES = 64 * 2**20
#: Single reads (``store[i]``, :meth:`StoreReader.read`, :meth:`~StoreReader.read_bytes`) of
#: a store with multi-record frames keep the frames they decoded, per thread, up to this many
#: decoded bytes (the least recently used go first; the last one is always kept), so random
#: reads of records that share a frame decode it once, not once a record. A reader's
#: ``frame_cache_bytes`` sets it (0: the last frame only).
FRAME_CACHE_BYTES = 32 * 2**20
#: What a kept column block is counted per record beyond its bytes: the record's metadata,
#: parsed when it is first read (a tuple of views and ints, about 450 bytes).
BLOCK_RECORD_BYTES = 512


def _check_frame_cache_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(f"frame_cache_bytes: expected an int >= 0 (bytes), found {value!r}")
    return value


def _check_max_record_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"max_record_bytes: expected a positive int (bytes), found {value!r}")
    return value


def _check_map_location(map_location: Any) -> Any:
    """Refuse a device string torch cannot map to here (so it is not mistaken for damage later)."""
    import torch

    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return map_location
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as exc:
        raise InvalidOptionError(
            f"map_location: expected a device like 'cpu' or 'cuda:0', found {map_location!r}"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"map_location: {map_location!r} needs CUDA, which is not available in this process")
    return map_location


#: Starts reading a shard's header from its handle; gives a getter of it (None: failed).
_HeadAhead = Callable[[ReadHandle], Callable[[], "bytes | None"]]


def _in_flight(fn: Callable[[Any], Any], items: Sequence[Any], width: int, name: str) -> list[Any]:
    """``[fn(x) for x in items]`` with ``width`` calls in flight, in threads named ``name``: the
    first exception in the order of ``items`` raises, and after it (or a ``KeyboardInterrupt``)
    the calls not started yet are cancelled, so no more requests go out."""
    pool = ThreadPoolExecutor(width, thread_name_prefix=name)
    try:
        return [future.result() for future in [pool.submit(fn, x) for x in items]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_index_bytes(storage: Storage) -> bytes:
    """Read ``index.json`` atomically (size and bytes from one open file), refusing one past
    ``MAX_INDEX_BYTES`` before reading it.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory without ``index.json``.
        IndexFormatError: ``index.json`` is larger than ``MAX_INDEX_BYTES``.
    """
    where = storage.location
    # The index is read first; only when it is not there is the path looked at, to say why
    # (on an object store each look is a request, and a store that opens pays none of them).
    try:
        return storage.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES)
    except TensorStoreError:
        raise  # NotARegularFileError: a directory or FIFO named index.json
    except ValueError as exc:
        raise IndexFormatError(
            f"store {where!r}: {INDEX_NAME}: expected at most {MAX_INDEX_BYTES} bytes ({exc})"
        ) from exc
    except OSError as exc:
        missing = isinstance(exc, (FileNotFoundError, NotADirectoryError))
        if not missing and exc.errno != errno.ELOOP:
            raise
        # The path is looked at as before the index was read first: a path through a symlink
        # loop (ELOOP on index.json) does not exist, as Path.exists says.
        if not storage.exists():
            raise StoreNotFoundError(f"no store at {where!r}: the path does not exist") from None
        if not storage.is_container():
            raise NotAStoreError(f"{where!r} is a file; expected a store directory holding {INDEX_NAME}") from None
        if not missing:
            raise  # index.json itself is a symlink loop: the OSError names it
        shards = [n for n in storage.list() if n.endswith(SHARD_SUFFIX)]
        hint = (
            f"; it holds {len(shards)} shard file(s) but no index: an unfinished write, or a lost index "
            "(`tspt recover` rebuilds it)"
            if shards
            else ""
        )
        raise NotAStoreError(f"{where!r} is not a store: expected {INDEX_NAME} in it{hint}") from None


def _read_index(storage: Storage) -> tuple[IndexInfo, int]:
    raw = read_index_bytes(storage)
    return parse_index(raw, f"store {storage.location!r}: {INDEX_NAME}"), digest_int(raw)


#: How many times opening a store is retried when it is replaced while being opened.
_OPEN_ATTEMPTS = 5


class RecordResult(NamedTuple):
    """One record of a bulk read (:meth:`StoreReader.iter_many`, :meth:`StoreReader.decode_many`).

    Attributes:
        record: The record's position in the store (``0 <= record < len(store)``; a negative
            request is reported as its non-negative position).
        sample: The loaded sample (a :class:`RawRecord` with ``raw=True``); None when ``error``
            is set.
        error: None, or why the record cannot be read: a
            :class:`~tensorstore_pt.errors.CorruptStoreError` (checksum, length, decode,
            missing or damaged shard...) or :class:`~tensorstore_pt.errors.UnsafePayloadError`,
            naming the store, shard and record. The error is returned, not raised.
    """

    record: int
    sample: Any
    error: BaseException | None


class RawRecord:
    """A record checked and decompressed but not yet unpickled (bulk reads with ``raw=True``).

    Attributes:
        shard: The index of the record's shard in the store's index.
        record: The record's position in the store.
        data: The record's ``torch.save`` buffer, a ``bytearray`` of its own (tensors built
            over it share it, without a copy).

    :meth:`load` unpickles it as :meth:`StoreReader.read` would. Batch decoders
    (``tensorstore_pt.fastload.collate_records``) take ``data`` directly. A RawRecord refers to
    its reader and is not pickled (it stays in the process that read it).
    """

    __slots__ = ("_block", "_data", "_reader", "record", "shard")

    def __init__(
        self,
        reader: StoreReader,
        shard: int,
        record: int,
        data: bytearray | None,
        block: tuple[ColumnBlock, int, int] | None = None,
    ) -> None:
        self._reader, self.shard, self.record, self._data, self._block = reader, shard, record, data, block

    @property
    def data(self) -> bytearray:
        """The record's ``torch.save`` buffer (for a container-free record, format 1.3, rebuilt
        on first use)."""
        if self._data is None:
            block, r, raw = self._block  # type: ignore[misc]
            self._data = bytearray(block.record_bytes(r, raw, self._reader.max_record_bytes))
        return self._data

    def batch_input(self) -> Any:
        """What ``tensorstore_pt.fastload.collate_records`` takes for this record: its buffer,
        or for a container-free record its ``(pickle, storages)`` (views into its column
        block: no container rebuilt and no copy, format 1.3).

        Raises:
            RecordLengthError: A container-free record's rebuilt length is not the record map's.
        """
        if self._block is None or self._data is not None:
            return self._data
        block, r, raw = self._block
        if not small_records_ok(block.constants):  # (its rebuilt bytes: collated as torch.load reads them)
            return self.data
        self._reader._check_budget(raw, self.shard, self.record)
        return block.collate_args(r, raw)

    def load(self) -> Any:
        """Unpickle the record (``weights_only`` semantics, the reader's ``map_location``).

        Raises:
            UnsafePayloadError, RecordDecodeError, AllocationBudgetError: As :meth:`StoreReader.read`.
        """
        if self._block is not None and self._data is None:
            block, r, raw = self._block
            return self._reader._load_from_block(self.shard, self.record, block, r, raw)
        return self._reader._load(self.shard, self.record, self.data)

    def __reduce__(self) -> Any:
        raise TypeError("a RawRecord belongs to the process that read it; it is not sent between processes")

    def __repr__(self) -> str:
        size = len(self._data) if self._data is not None else self._block[2]  # type: ignore[index]
        return f"RawRecord(record={self.record}, shard={self.shard}, bytes={size})"


class FetchedFrames:
    """The stored frames of some records, fetched but not yet checked or decoded.

    Made by :meth:`StoreReader.fetch_many` (the I/O half of a bulk read) and consumed by
    :meth:`StoreReader.decode_many` (the CPU half), so that the two can run in different
    threads. It holds the bytes of its positional reads (frames plus merged gaps).

    Attributes:
        records: int64 array of shape (n,): the records, in the requested order (duplicates
            kept), all in ``[0, len(store))``.
        stored_bytes: Bytes fetched (frames and merged gaps, plus a shard header when one was
            checked on the way).
        reads: Positional reads made (not counting footer reads).
    """

    __slots__ = ("records", "stored_bytes", "reads", "_frames", "_errors", "_framed", "_last_use")

    def __init__(self, records: np.ndarray) -> None:
        self.records = records
        self.stored_bytes = 0
        self.reads = 0
        # one record per frame: record -> (shard, footer row, stored frame);
        # multi-record frames: record -> (shard, frame, raw offset, raw bytes) and
        # (shard, frame) -> (footer row, stored frame) in _framed
        self._frames: dict[int, tuple[Any, ...]] = {}
        self._errors: dict[Any, BaseException] = {}
        self._framed: dict[tuple[int, int], tuple[Any, memoryview]] | None = None
        self._last_use: dict[tuple[int, int], int] = {}

    def error(self, record: int) -> BaseException | None:
        """The error that kept ``record``'s frame from being fetched (missing shard, short
        read, damaged footer...), or None."""
        return self._errors.get(record)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"FetchedFrames(records={len(self.records)}, bytes={self.stored_bytes}, reads={self.reads})"


class StoreReader:
    """Random access to a store's records.

    Use :func:`open_store` to create one.

    Thread safety: all methods may be called from many threads at once (reads are
    positional, ``ReadHandle.read_range``; lazily opened handles are guarded by a lock, and a
    footer two threads load at once is loaded twice, with the same result).
    Fork/spawn safety: file handles belong to the process that opened them; after a fork the
    child opens its own on first use. A reader pickles to its location and options, so it can
    be sent to spawned DataLoader workers; the worker re-reads ``index.json`` and refuses a
    store that changed since (:class:`~tensorstore_pt.errors.CorruptStoreError`).

    Memory: per shard, the footer's record table is kept as one numpy array (32 bytes a
    frame; with multi-record frames also a record map, 24 bytes a record) once a record of that
    shard has been read; no Python object per record, and none of the footer JSON's other keys.
    With multi-record frames, single reads keep decoded frames per thread, up to
    ``frame_cache_bytes`` (:data:`FRAME_CACHE_BYTES`) plus the last one; a frame of one
    record is not kept.

    Reads on a remote store (one request per ``read_range``): a shard's footer is fetched once,
    with one ranged read of the shard's tail sized by the index
    (:func:`~tensorstore_pt.shardio.fetch_footer`), plus one of its 16-byte header (unless the
    tail read covers the whole shard; at the same time as the tail where footers are read in
    bulk), and cached: at open with ``verify=True``, else on the first read of the shard. The
    open's footer reads, like a bulk read's, keep
    :attr:`Storage.read_concurrency <tensorstore_pt.storage.Storage.read_concurrency>` reads
    in flight (16 on an object store, one after another on a local disk). Then ``store[i]`` is
    one ranged read of the record's frame, and a bulk read (``store[list]``,
    :meth:`read_many`) one ranged read per run of nearby frames. No read fetches a whole
    shard, except one small enough that its footer read covers it. (A
    :class:`~tensorstore_pt.dataset.StoreIterableDataset` that streams through a shard cache
    opens its store with ``verify=True`` but reads no footer from it: each footer comes from
    the shard's checksum-verified cached copy.)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        *,
        verify: bool = True,
        map_location: Any = "cpu",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        storage_options: dict[str, Any] | None = None,
        frame_cache_bytes: int = FRAME_CACHE_BYTES,
        _expect_index_digest: int | None = None,
        _opened_index: tuple[IndexInfo, int] | None = None,
        _footers_at_open: bool = True,
    ) -> None:
        self.max_record_bytes = _check_max_record_bytes(max_record_bytes)
        self.frame_cache_bytes = _check_frame_cache_bytes(frame_cache_bytes)
        self._storage = storage_for(path, storage_options)
        self.location = self._storage.location
        self._verify = bool(verify)
        # False: verify checks the listing only (every shard present with its index size) and
        # footers are read when their shard is first read; for a reader over a shard cache,
        # where each shard's whole-file checksum is checked on arrival (StoreIterableDataset).
        self._footers_at_open = bool(_footers_at_open)
        self.map_location = _check_map_location(map_location)
        if _opened_index is not None:
            # The index another reader of this store parsed (a dataset's worker): no request
            # before the first shard read. A store replaced since then is still found: its
            # shards are gone or fail their checksums, and _raise_if_changed names it.
            self._open_index(*_opened_index)
            return
        for attempt in range(_OPEN_ATTEMPTS):
            index, digest = _read_index(self._storage)
            if _expect_index_digest is not None and digest != _expect_index_digest:
                raise StoreChangedError(
                    f"store {self.location!r} was replaced since this reader was pickled ({INDEX_NAME} was "
                    f"{ALGORITHM} {_expect_index_digest:016x}, is {digest:016x} now); reopen it"
                )
            try:
                self._open_index(index, digest)
                return
            except StoreChangedError:
                # A writer replaced the store between reading the index and opening its shards
                # (an overwrite deletes the old shards): read the new index and try again.
                if _expect_index_digest is not None or attempt == _OPEN_ATTEMPTS - 1:
                    raise

    def _open_index(self, index: IndexInfo, digest: int) -> None:
        self._index = index
        self._index_digest = digest
        self._codec: Codec = get_codec(index.codec, self._load_store_file)
        check_index_sizes(index, self._codec, f"store {self.location!r}: {INDEX_NAME}")
        self._starts = np.array([s.first_record for s in index.shards], dtype=np.int64)
        self._footers: list[ShardFooter | None] = [None] * len(index.shards)
        self._raw_frames = FEATURE_RAW_FRAMES in index.features
        self._columnar = FEATURE_COLUMNAR_FRAMES in index.features
        self._cpu = _is_cpu(self.map_location)
        self._init_process_state()
        if self._verify:
            # One listing for every shard's size (one request on an object store, where each
            # handle then takes its size from it); the footers are read below.
            sizes = self._storage.sizes()
            for si, entry in enumerate(index.shards):
                if entry.name in sizes and sizes[entry.name] != entry.file_bytes:
                    exc = ShardSizeError(
                        f"{self._where(si)}: expected {entry.file_bytes} bytes (index), found {sizes[entry.name]} bytes on disk"
                    )
                    self._raise_if_changed(exc)
                    raise exc
                if entry.name not in sizes and not self._footers_at_open:
                    # Not listed (absent, or not a regular file): opening it raises the typed
                    # error the footer read would have (one HEAD on an object store).
                    self._handle(si)
            if self._footers_at_open:
                self._fetch_footers(range(len(index.shards)))

    def _fetch_footers(self, shards: Iterable[int]) -> None:
        """Read and cache the footers of ``shards``, :attr:`Storage.read_concurrency` at a time
        as a bulk read's frames (:meth:`_read_width`): one after another on a local store, 16 at
        a time on an object store, where each read waits out a request's latency (so a store of
        N shards opens in about N / 16 round trips). Errors raise in shard order."""
        todo = [si for si in shards if self._footers[si] is None]
        width = self._read_width(2 * len(todo))  # a tail and a header a shard
        if width < 2:
            for si in todo:
                self._footer(si)
            return
        if not self._verify and len(todo) > 1:
            self._storage.sizes()  # one listing, from which the handles take their sizes (no HEAD each)
        self._ensure_process()
        self._footers_in_flight(self._footer, todo, width)

    def _footers_in_flight(
        self, one: Callable[[int, _HeadAhead | None], Any], todo: list[int], width: int
    ) -> list[Any]:
        """``[one(si, head) for si in todo]`` (:func:`_in_flight`) with ``width`` (at least 2)
        reads in flight in all: half of them for the footers, half for the headers ``head``
        reads at the same time (see :func:`~tensorstore_pt.shardio.fetch_footer`). Up to
        ``width // 2`` shards then cost one round trip, not two in a row; more cost as many as
        before."""
        half = width // 2
        pool = ThreadPoolExecutor(half, thread_name_prefix="tspt-header")

        def ahead(handle: ReadHandle) -> Callable[[], bytes | None]:
            fut = pool.submit(handle.read_range, 0, HEADER_BYTES)
            return lambda: None if fut.exception() is not None else fut.result()

        try:
            return _in_flight(lambda si: one(si, ahead), todo, half, "tspt-footer")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ per-process state

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, ReadHandle] = {}
        # Per thread: .frames, (shard, frame) -> decoded frame, least recently used first;
        # .bytes, their decoded bytes (see FRAME_CACHE_BYTES).
        self._frame_cache = threading.local()
        self._pid = os.getpid()  # last: a thread that sees this process's pid sees the state above

    def _load_store_file(self, name: str) -> bytes:
        try:
            # Refused before reading (one open file: a file growing meanwhile is not read whole).
            return read_store_file(self._storage, name)
        except FileNotFoundError as exc:
            self._raise_if_changed(exc)
            raise MissingShardError(f"store {self.location!r}: file {name!r} named in the index is missing") from exc

    def _raise_if_changed(self, cause: BaseException) -> None:
        """Raise StoreChangedError (from ``cause``) if ``index.json`` is no longer the one this
        reader parsed: a shard that is missing or differs then means "replaced", not "damaged"."""
        try:
            now: int | None = digest_int(read_index_bytes(self._storage))
        except (TensorStoreError, OSError):
            now = None  # no index now (a create in progress, or it was removed)
        if now != getattr(self, "_index_digest", None):
            found = f"{ALGORITHM} {now:016x}" if now is not None else "no index"
            raise StoreChangedError(
                f"store {self.location!r} was replaced since it was opened ({INDEX_NAME} was {ALGORITHM} "
                f"{self._index_digest:016x}, now {found}); reopen it"
            ) from cause

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's lock may be held by a thread that does not exist
            # here, and its handles are the parent's. Start afresh (the fds stay with the parent),
            # once: threads that get here together (reads in flight) must not each start afresh
            # and drop the handles the others opened meanwhile.
            with _PROCESS_LOCK:
                if self._pid != os.getpid():
                    self._init_process_state()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "storage": self._storage,
            "verify": self._verify,
            "map_location": self.map_location,
            "max_record_bytes": self.max_record_bytes,
            "frame_cache_bytes": self.frame_cache_bytes,
            "index_digest": self._index_digest,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The copy opens the index the original verified (its digest must match), so it does
        # not sweep every shard again: on a remote store each DataLoader worker would otherwise
        # repeat two requests a shard. Footers are read as shards are first used, and every
        # record is still checked against its checksum.
        self.__init__(  # type: ignore[misc]
            state["storage"],
            verify=False,
            map_location=state["map_location"],
            max_record_bytes=state.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES),
            frame_cache_bytes=state.get("frame_cache_bytes", FRAME_CACHE_BYTES),
            _expect_index_digest=state["index_digest"],
        )
        self._verify = state["verify"]

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read)."""
        self._ensure_process()
        with self._lock:
            handles, self._handles = self._handles, {}
        for h in handles.values():
            h.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ metadata

    def __len__(self) -> int:
        return self._index.records

    def __repr__(self) -> str:
        return f"StoreReader({self.location!r}, records={len(self)}, shards={len(self._index.shards)}, codec={self._index.codec})"

    @property
    def metadata(self) -> dict[str, Any]:
        """The user metadata stored in the index (a JSON object)."""
        return self._index.metadata

    @property
    def index(self) -> IndexInfo:
        """The parsed, validated ``index.json``."""
        return self._index

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def storage(self) -> Storage:
        return self._storage

    def info(self) -> StoreInfo:
        """The store's summary: records, shards, codec, sizes (bytes), ratio, metadata."""
        return StoreInfo.from_index(self.location, self._index)

    def shard_bounds(self) -> np.ndarray:
        """Record ranges of the shards: int64 array of shape (shards, 2), rows ``[first, end)``."""
        counts = np.array([s.records for s in self._index.shards], dtype=np.int64)
        return np.stack([self._starts, self._starts + counts], axis=1) if len(counts) else np.zeros((0, 2), np.int64)

    # ------------------------------------------------------------------ locating records

    def _where(self, si: int, record: int | None = None) -> str:
        w = f"store {self.location!r}, shard {self._index.shards[si].name!r}"
        return w if record is None else f"{w}, record {record}"

    def _normalize(self, i: int) -> int:
        n = self._index.records
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise InvalidOptionError(f"record index: expected an int, found {type(i).__name__}")
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise RecordIndexError(f"record {int(i)} is out of range for store {self.location!r} with {n} records")
        return j

    def _locate(self, i: int) -> tuple[int, int]:
        si = int(np.searchsorted(self._starts, i, side="right")) - 1
        return si, i - int(self._starts[si])

    def _handle(self, si: int) -> ReadHandle:
        self._ensure_process()
        h = self._handles.get(si)
        if h is not None:
            return h
        # Opened outside the lock: on a remote store an open may be a request (a HEAD), and
        # threads opening different shards should not wait on each other's.
        name = self._index.shards[si].name
        try:
            h = self._storage.open(name)
        except FileNotFoundError as exc:
            self._raise_if_changed(exc)
            raise MissingShardError(
                f"{self._where(si)}: the shard file is missing (the index lists it with "
                f"{self._index.shards[si].records} records)"
            ) from exc
        with self._lock:
            kept = self._handles.setdefault(si, h)
        if kept is not h:
            h.close()  # another thread opened it first
        return kept

    def _read_exact(self, si: int, offset: int, length: int, what: str) -> bytes:
        entry = self._index.shards[si]
        where = f"{self._where(si)} (the index says {entry.file_bytes} bytes)"
        handle = self._handle(si)
        try:
            return read_exact(handle, offset, length, what, where, error=ShardSizeError)
        except RemoteStorageError as exc:
            self._raise_if_vanished(si, handle, exc)
            raise

    def _raise_if_vanished(self, si: int, handle: ReadHandle, exc: RemoteStorageError) -> None:
        """If ``exc`` says shard ``si`` is gone (ENOENT: an object store's shard deleted under an
        open handle), raise StoreChangedError if the store was replaced, else MissingShardError,
        as for a shard found missing at open: a record error (reported per record by bulk reads,
        skipped by skip_corrupt), not a failed request. The stale handle is dropped (not closed:
        other threads may still be reading through it)."""
        if exc.errno != errno.ENOENT:
            return
        self._raise_if_changed(exc)
        with self._lock:
            if self._handles.get(si) is handle:
                del self._handles[si]
        raise MissingShardError(
            f"{self._where(si)}: the shard file is missing (it went away while open; the index "
            f"lists it with {self._index.shards[si].records} records)"
        ) from exc

    def _footer(self, si: int, head: _HeadAhead | None = None) -> ShardFooter:
        """Shard ``si``'s footer, fetched once (``head``: its header read ahead, see
        :func:`~tensorstore_pt.shardio.fetch_footer`)."""
        footer = self._footers[si]
        if footer is not None:
            return footer
        entry: ShardEntry = self._index.shards[si]
        handle = self._handle(si)
        try:
            footer = fetch_footer(handle, self._index, entry, self._where(si), head)
        except (ShardSizeError, ShardFormatError) as exc:
            # The checks' frames held the parsed footer (up to ~20 MiB for 1 MiB of JSON), kept
            # alive by the error wherever it is kept (a bulk read's every record of the shard).
            _without_locals(exc)
            self._raise_if_changed(exc)  # a legacy store's shard name reused by a later writer
            raise
        except RemoteStorageError as exc:
            self._raise_if_vanished(si, handle, exc)
            raise
        footer = _kept(footer)
        self._footers[si] = footer
        return footer

    # ------------------------------------------------------------------ reading

    def _decoded_frame(self, si: int, fi: int, record: int, writable: bool = False) -> bytes | bytearray:
        """Read, check and decode frame ``fi`` of shard ``si`` (``record`` is for messages).

        With ``writable`` the result is a fresh ``bytearray`` the caller owns, so tensors can be
        built over it without a copy.
        """
        footer = self._footer(si)
        row = footer.table[fi]
        check_record_budget(int(row["raw"]), self.max_record_bytes, self._where(si, record))  # before the read
        frame = self._read_exact(si, int(row["offset"]), int(row["stored"]), f"record {record}'s frame")
        return self._decode(si, record, row, frame, writable, footer.is_raw(fi))

    def _decode(
        self,
        si: int,
        j: int,
        row: np.void | np.ndarray,
        frame: bytes | memoryview,
        writable: bool = False,
        stored_raw: bool = False,
    ) -> bytes | bytearray:
        """Check and decode a frame through :func:`.shardio.check_frame` (``j`` is for messages;
        ``stored_raw``: the frame is stored raw, format 1.2)."""
        data = check_frame(self._codec, row, frame, self._where(si, j), max_record_bytes=self.max_record_bytes,
                           writable=writable, stored_raw=stored_raw)  # fmt: skip
        return data  # type: ignore[return-value]

    def _is_raw(self, si: int, fi: int) -> bool:
        """Whether frame ``fi`` of shard ``si`` is stored raw (loads the footer only in a store
        that lists "raw-frames")."""
        return self._raw_frames and self._footer(si).is_raw(fi)

    def _read_raw(self, i: int, writable: bool) -> tuple[int, int, bytes | bytearray]:
        """(record position, shard, raw bytes) of record ``i``; see :meth:`read_bytes`."""
        j = self._normalize(i)
        si, k = self._locate(j)
        footer = self._footer(si)
        if footer.record_map is None:
            return j, si, self._decoded_frame(si, k, j, writable)
        fi, raw_offset, raw = footer.locate(k)
        if _alone_in_frame(footer, k, fi):  # serves this record only: not kept
            columnar = footer.is_columnar(fi)
            data = self._frame_content(si, fi, self._decoded_frame(si, fi, j, writable and not columnar), j)
            if not columnar and raw_offset == 0 and len(data) == raw:
                return j, si, data
        else:
            data = self._cached_frame(si, fi, j)
        if isinstance(data, ColumnBlock):
            return j, si, bytearray(data.record_bytes(k - data.first, raw, self.max_record_bytes))
        # A copy: tensors of one record must not pin (or alias) the whole cached frame.
        return j, si, data[raw_offset : raw_offset + raw]

    def _cached_frame(self, si: int, fi: int, j: int) -> bytes | bytearray | ColumnBlock:
        """Frame ``fi`` of shard ``si`` decoded (a :class:`ColumnBlock` for a column block),
        through the per-thread cache of decoded frames (``j``: a record, for messages).

        The cache keeps the frames last used, up to ``frame_cache_bytes`` bytes plus the
        frame just used (a column block counts its decoded bytes, the buffers its filters
        wrote, and :data:`BLOCK_RECORD_BYTES` a record for the metadata it parses). Nothing
        read from a kept frame aliases it: records are copied out (:meth:`_read_raw`,
        :meth:`ColumnBlock.load_args`).
        """
        self._ensure_process()
        cache = self._frame_cache
        frames: OrderedDict[tuple[int, int], tuple[Any, int]] | None = getattr(cache, "frames", None)
        if frames is None:
            frames = cache.frames = OrderedDict()
            cache.bytes = 0
        key = (si, fi)
        got = frames.get(key)
        if got is not None:
            frames.move_to_end(key)
            return got[0]  # type: ignore[no-any-return]
        data = self._frame_content(si, fi, self._decoded_frame(si, fi, j), j)
        # A column block also keeps each record's metadata once parsed (about 0.5 KB).
        size = len(data) + (BLOCK_RECORD_BYTES * data.n if type(data) is ColumnBlock else 0)
        frames[key] = (data, size)
        cache.bytes += size
        budget = self.frame_cache_bytes
        while len(frames) > 1 and cache.bytes - size > budget:
            cache.bytes -= frames.popitem(last=False)[1][1]
        return data

    def _frame_content(self, si: int, fi: int, data: Any, j: int) -> Any:
        """``data`` (frame ``fi`` of shard ``si``, decoded), or its :class:`ColumnBlock` if the
        footer names it a column block (format 1.3): its tables checked, each record's
        metadata when the record is first used."""
        footer = self._footer(si)
        if not footer.is_columnar(fi):
            return data
        first = _first_record_of_frame(footer, fi)
        count = _first_record_of_frame(footer, fi + 1) - first
        block = ColumnBlock(data, footer.layout, count, f"{self._where(si, j)}, frame {fi}")
        block.first = first
        return block

    def _check_budget(self, raw: int, si: int, j: int) -> None:
        """:func:`.shardio.check_record_budget` of record ``j`` of shard ``si`` (``raw`` bytes),
        its message made only when it fails (a record's path runs this once per record)."""
        if raw > self.max_record_bytes:
            check_record_budget(raw, self.max_record_bytes, self._where(si, j))

    def _load_from_block(self, si: int, j: int, block: ColumnBlock, r: int, raw: int) -> Any:
        """Load record ``r`` of column block ``block`` (store position ``j``, ``raw`` bytes as
        ``torch.save`` wrote it): from its parts when the fast path takes it, else from its
        rebuilt ``torch.save`` bytes (:meth:`_load`, which types any error)."""
        self._check_budget(raw, si, j)
        if self._cpu:
            args = block.spent_args(r, raw) if block.spent else block.load_args(r, raw)
            sample = fast_loads_parts(*args, raw, block.constants)
            if sample is not DECLINED:
                return sample
        return self._load(si, j, bytearray(block.record_bytes(r, raw, self.max_record_bytes)))

    def _load_block(self, si: int, block: ColumnBlock, spent: bool = False) -> None:
        """Load every record of ``block`` (a frame of shard ``si``) together into
        ``block.loaded`` (:meth:`.ColumnBlock.load_all`, with ``spent``; records it leaves,
        and every record of a block it leaves, load one by one)."""
        footer = self._footer(si)
        raws = footer.record_map["raw"][block.first : block.first + block.n]  # type: ignore[index]
        try:
            block.loaded = block.load_all(raws.tolist(), spent) or None
        except Exception:  # noqa: BLE001 - a shortcut only: each record loads alone, which raises what it finds
            block.loaded = None

    def read_bytes(self, i: int) -> bytes:
        """Return record ``i``'s exact ``torch.save`` buffer (decompressed, checksum-verified).

        With multi-record frames, the last decoded frame is cached per thread, so in-order
        reads decode each frame once.

        Args:
            i: Record position; negative counts from the end.

        Returns:
            The bytes ``torch.save`` produced for the sample at write time.

        Raises:
            RecordIndexError: ``i`` out of range.
            MissingShardError, ShardSizeError, ShardFormatError: The shard is absent, truncated
                or its footer is damaged.
            ChecksumMismatchError: The frame's xxh3_64 digest differs from the footer's.
            DecompressionError / RecordLengthError: The frame does not decode to the raw length.
        """
        return bytes(self._read_raw(i, writable=False)[2])

    def read(self, i: int, *, table: np.ndarray | None = None) -> Any:
        """Read one record by its position and load it.

        Args:
            i: Record position, ``-len(store) <= i < len(store)``.
            table: Optional result of :meth:`record_table` (for instance in shared memory) to
                take the record's frame position, length and checksum from, so that this
                reader loads no footer (one positional read in all).

        Returns:
            The sample as written: tensors with their stored dtype and shape, on
            ``map_location`` (CPU by default).

        Raises:
            Everything :meth:`read_bytes` raises, and
            UnsafePayloadError: The record's pickle asks for globals outside the weights-only
                allow-list; nothing from it is run.
            RecordDecodeError: The bytes are not a loadable torch.save buffer.
            InvalidOptionError: ``table`` has the wrong dtype or shape, or the store has
                multi-record frames (no per-record table).

        Memory: the decoded record is one buffer the returned tensors share (no further copy
        for contiguous storages); records of multi-record frames are copied out of the frame.
        """
        if table is not None:
            table = self._check_table(table)
            j = self._normalize(i)
            si, _ = self._locate(j)
            row = table[j]
            check_record_budget(int(row["raw"]), self.max_record_bytes, self._where(si, j))  # before the read
            frame = self._read_exact(si, int(row["offset"]), int(row["stored"]), f"record {j}'s frame")
            return self._load(si, j, self._decode(si, j, row, frame, writable=True))
        if self._columnar:  # a record of a column block loads from its parts (format 1.3)
            j = self._normalize(i)
            si, k = self._locate(j)
            footer = self._footer(si)
            fi, _, raw = footer.locate(k)
            if footer.is_columnar(fi):
                if _alone_in_frame(footer, k, fi):  # decoded for this read only: used in place
                    block = self._frame_content(si, fi, self._decoded_frame(si, fi, j), j)
                    block.spent = True
                else:
                    block = self._cached_frame(si, fi, j)
                return self._load_from_block(si, j, block, k - block.first, raw)
        # A writable buffer of its own lets the decoder build tensors over it without a copy.
        j, si, data = self._read_raw(i, writable=True)
        return self._load(si, j, data)

    def _load(self, si: int, j: int, data: bytes | bytearray | memoryview) -> Any:
        try:
            return loads(data, self.map_location)
        except (UnsafePayloadError, RecordDecodeError, AllocationBudgetError) as exc:
            raise type(exc)(f"{self._where(si, j)}: {exc}") from exc
        except MemoryError as exc:
            raise AllocationBudgetError(f"{self._where(si, j)}: loading the record ran out of memory") from exc
        except TensorStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - the decoder maps its errors; this is a last guard
            raise RecordDecodeError(
                f"{self._where(si, j)}: the record is not a loadable torch.save buffer ({type(exc).__name__}: {exc})"
            ) from exc

    # ------------------------------------------------------------------ bulk reads (datasets)

    @property
    def index_digest(self) -> int:
        """xxh3_64 of the ``index.json`` bytes this reader parsed (identifies the store version)."""
        return self._index_digest

    def record_table(self, out: np.ndarray | None = None) -> np.ndarray:
        """Every record's footer row, in store order.

        Args:
            out: Optional array to fill (for instance a view of shared memory): a
                ``RECORD_DTYPE`` array of shape ``(len(store),)``.

        Returns:
            ``out``, or a new structured array of ``format.RECORD_DTYPE`` (fields ``offset``,
            ``stored``, ``raw``, ``checksum``; 32 bytes a record) of shape ``(len(store),)``.
            Offsets are byte offsets inside the record's own shard.

        Raises:
            InvalidOptionError: ``out`` has the wrong dtype or shape, or the store has
                multi-record frames (format 1.1), where records share frames.
            MissingShardError, ShardSizeError, ShardFormatError: A shard's footer cannot be read.

        Memory: 32 bytes a record unless ``out`` is given (plus the per-shard footers this
        reader caches).
        """
        if FEATURE_MULTI_RECORD_FRAMES in self._index.features:
            raise InvalidOptionError(
                f"record_table: store {self.location!r} has multi-record frames; its records have no "
                "frame of their own (read them with read(i), which caches the decoded frame)"
            )
        if self._raw_frames:
            raise InvalidOptionError(
                f"record_table: store {self.location!r} has frames stored raw (format 1.2), which the "
                "table's rows cannot mark; read records with read(i), which takes that from the footers"
            )
        if out is not None and (out.dtype != RECORD_DTYPE or out.shape != (len(self),)):
            raise InvalidOptionError(
                f"out: expected a {RECORD_DTYPE} array of shape ({len(self)},), found {out.dtype} {out.shape}"
            )
        # The footers first (many at a time on a remote store): each checks its record count
        # against the index, so the table is allocated for counts the shards prove, never for
        # an index that claims billions of records for a few bytes.
        self._fetch_footers(range(len(self._index.shards)))
        if out is None:
            out = np.zeros(len(self), dtype=RECORD_DTYPE)
        for si, entry in enumerate(self._index.shards):
            out[entry.first_record : entry.first_record + entry.records] = self._footer(si).table
        return out

    def _rows(self, start: int, stop: int, table: np.ndarray | None) -> tuple[int, np.ndarray]:
        n = len(self)
        for name, value in (("start", start), ("stop", stop)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidOptionError(f"record range {name}: expected an int, found {type(value).__name__}")
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= n:
            raise RecordIndexError(
                f"record range [{start}, {stop}) is empty or out of range for store {self.location!r} with {n} records"
            )
        si, k = self._locate(start)
        end = int(self._starts[si]) + self._index.shards[si].records
        if stop > end:
            raise InvalidOptionError(
                f"record range [{start}, {stop}): expected records of one shard, but "
                f"{self._where(si)} ends at record {end}"
            )
        if table is None:
            return si, self._footer(si).table[k : k + stop - start]
        if table.dtype != RECORD_DTYPE or table.shape != (n,):
            raise InvalidOptionError(
                f"table: expected a {RECORD_DTYPE} array of shape ({n},) from record_table(), found "
                f"{table.dtype} {table.shape}"
            )
        return si, table[start:stop]

    def read_frames(self, start: int, stop: int, *, table: np.ndarray | None = None) -> list[memoryview]:
        """Read the stored (compressed) frames of records ``[start, stop)`` with one positional read.

        The records must lie in one shard. Frames are not checked here; pass each one to
        :meth:`decode_frame`.

        Args:
            start: First record, ``0 <= start < stop``.
            stop: One past the last record, ``stop <= len(store)``.
            table: Optional result of :meth:`record_table` (for instance in shared memory) to
                take the frame positions from, so that this reader loads no footer.

        Returns:
            One read-only memoryview per record, slices of a single buffer of
            ``sum(stored bytes)`` bytes.

        Raises:
            RecordIndexError: The range is empty or out of range.
            InvalidOptionError: The range spans shards, or ``table`` has the wrong type or shape.
            MissingShardError, ShardSizeError: The shard is absent or truncated.

        Thread safety: safe (positional reads).
        """
        si, rows = self._rows(start, stop, table)
        offsets = rows["offset"].astype(np.int64)
        sizes = rows["stored"].astype(np.int64)
        base = int(offsets[0])
        length = int(offsets[-1] + sizes[-1]) - base
        buf = memoryview(self._read_exact(si, base, length, f"the frames of records [{start}, {stop})"))
        rel = (offsets - base).tolist()
        return [buf[o : o + s] for o, s in zip(rel, sizes.tolist())]

    def decode_frame(self, i: int, frame: bytes | memoryview, *, table: np.ndarray | None = None) -> bytes:
        """Check and decompress record ``i``'s stored frame (as :meth:`read_frames` returns it).

        Args:
            i: Record position; negative counts from the end.
            frame: The record's stored bytes.
            table: Optional :meth:`record_table` result to take the record's checksum and raw
                length from (otherwise the shard footer is loaded).

        Returns:
            The record's ``torch.save`` buffer, as :meth:`read_bytes` returns it.

        Raises:
            ChecksumMismatchError, DecompressionError, RecordLengthError: As :meth:`read_bytes`.
        """
        j = self._normalize(i)
        si, k = self._locate(j)
        if table is not None:
            table = self._check_table(table)
        _, rows = self._rows(j, j + 1, table)
        return self._decode(si, j, rows[0], frame, stored_raw=table is None and self._is_raw(si, k))

    def load_record(self, i: int, raw: bytes | bytearray | memoryview) -> Any:
        """Load record ``i``'s ``torch.save`` buffer with ``weights_only=True`` semantics.

        Raises:
            UnsafePayloadError: The pickle asks for forbidden globals; nothing from it is run.
            RecordDecodeError: The bytes are not a loadable torch.save buffer.
        """
        j = self._normalize(i)
        si, _ = self._locate(j)
        return self._load(si, j, raw)

    # ------------------------------------------------------------------ bulk reads (read_many)

    def _check_table(self, table: np.ndarray) -> np.ndarray:
        if FEATURE_MULTI_RECORD_FRAMES in self._index.features:
            raise InvalidOptionError(
                f"table: store {self.location!r} has multi-record frames, which have no per-record frame table"
            )
        if self._raw_frames:
            raise InvalidOptionError(
                f"table: store {self.location!r} has frames stored raw (format 1.2), which a record table "
                "cannot mark; pass no table"
            )
        if not isinstance(table, np.ndarray) or table.dtype != RECORD_DTYPE or table.shape != (len(self),):
            found = f"{table.dtype} {table.shape}" if isinstance(table, np.ndarray) else type(table).__name__
            raise InvalidOptionError(
                f"table: expected a {RECORD_DTYPE} array of shape ({len(self)},) from record_table(), found {found}"
            )
        return table

    def _records_array(self, records: Any) -> np.ndarray:
        """``records`` as an int64 array of non-negative positions (negative ones count from the end)."""
        n = len(self)
        kind = type(records).__name__
        if isinstance(records, range):
            # Bounds first, in O(1): range(10**12) must not allocate 8 TB before it is refused.
            for end in (records[0], records[-1]) if len(records) else ():
                if not -n <= end < n:
                    raise RecordIndexError(f"record {end} is out of range for store {self.location!r} with {n} records")
            arr = np.arange(records.start, records.stop, records.step, dtype=np.int64)
        elif isinstance(records, (str, bytes)) or isinstance(records, (int, np.integer)):
            raise RecordIndexTypeError(f"records: expected a 1-D sequence of ints, found {kind}")
        else:
            if hasattr(records, "detach"):  # a torch tensor
                records = records.detach().cpu().numpy()
            try:
                arr = np.asarray(records)
            except (TypeError, ValueError) as exc:
                raise RecordIndexTypeError(f"records: expected a 1-D sequence of ints, found {kind} ({exc})") from exc
        if arr.ndim != 1:
            raise RecordIndexTypeError(f"records: expected a 1-D sequence of ints, found {arr.ndim}-D {kind}")
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            values = arr.tolist()
            bad = [x for x in values if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))]
            if bad:  # (a list, not next(..., None): None itself is a bad index)
                raise RecordIndexTypeError(f"record index: expected an int, found {type(bad[0]).__name__}")
            # ints in an object array: Python ints too large for int64, or ints of an object-dtype
            # array or column, which may all be in range
            outside = next((int(x) for x in values if not -n <= int(x) < n), None)
            if outside is not None:
                raise RecordIndexError(f"record {outside} is out of range for store {self.location!r} with {n} records")
            arr = np.array([int(x) for x in values], dtype=np.int64)
        if arr.dtype.kind == "u" and int(arr.max()) >= n:
            raise RecordIndexError(
                f"record {int(arr.max())} is out of range for store {self.location!r} with {n} records"
            )
        arr = arr.astype(np.int64, copy=False)
        bad = (arr < -n) | (arr >= n)
        if bad.any():
            raise RecordIndexError(
                f"record {int(arr[bad][0])} is out of range for store {self.location!r} with {n} records"
            )
        return np.where(arr < 0, arr + n, arr)

    def _frames_of(
        self, recs: np.ndarray, table: np.ndarray | None, failed: dict[int, BaseException]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Per record of ``recs``: its shard, its frame's footer row, and (multi-record frames) an
        int64 array (n, 3) of frame index, raw offset and raw bytes. Records of a shard whose
        footer cannot be read get shard -1 (the error in ``failed``, by shard) and a zero row."""
        shard = np.searchsorted(self._starts, recs, side="right") - 1
        if table is not None:
            return shard, table[recs], None
        if not len(recs):
            return shard, np.zeros(0, dtype=RECORD_DTYPE), None
        multi = FEATURE_MULTI_RECORD_FRAMES in self._index.features
        rows = np.zeros(len(recs), dtype=RECORD_DTYPE)
        where = np.zeros((len(recs), 3), dtype=np.int64) if multi else None
        order = np.argsort(shard, kind="stable")
        ss = shard[order]
        cuts = np.flatnonzero(ss[1:] != ss[:-1]) + 1
        self._prefetch_footers(ss[np.append(0, cuts)].tolist(), failed)
        for idx in np.split(order, cuts):
            si = int(shard[idx[0]])
            try:
                exc = failed.get(si)
                if exc is not None:
                    raise exc
                footer = self._footer(si)
            except RECORD_ERRORS as exc:
                failed[si] = exc
                shard[idx] = -1
                continue
            k = recs[idx] - self._starts[si]
            if footer.record_map is None:
                rows[idx] = footer.table[k]
                if where is not None:
                    where[idx, 0], where[idx, 1], where[idx, 2] = k, 0, footer.table["raw"][k]
            else:
                rm = footer.record_map[k]
                fi = rm["frame"].astype(np.int64)
                rows[idx] = footer.table[fi]
                where[idx, 0], where[idx, 1], where[idx, 2] = fi, rm["raw_offset"], rm["raw"]  # type: ignore[index]
        return shard, rows, where

    def plan_pieces(
        self,
        records: Sequence[int] | np.ndarray,
        read_bytes: int = READ_BYTES,
        *,
        table: np.ndarray | None = None,
        missing: dict[int, BaseException] | None = None,
    ) -> list[np.ndarray]:
        """Cut ``records`` (kept in their order) into consecutive pieces of about ``read_bytes``
        stored bytes, the unit in which :meth:`iter_many` fetches and decodes.

        A record counts its frame's stored bytes; with multi-record frames (format 1.1), a run
        of consecutive requested records sharing one frame counts it once and is never cut,
        so the frame is fetched and decoded once for the run. A piece holds at least one
        record (or run), and at most ``read_bytes`` plus one frame.

        Args:
            records: Record positions (a sequence, range, 1-D integer array or tensor); any
                order, duplicates allowed, negative positions count from the end.
            read_bytes: Target stored bytes a piece, a positive int.
            table: Optional :meth:`record_table` result to take frame sizes from (no footer
                is loaded). Not for stores with multi-record frames.
            missing: As for :meth:`fetch_many`: shards known to be unreadable (their records
                count 0 bytes; their footers are not tried again), updated here.

        Returns:
            int64 arrays of non-negative positions whose concatenation is ``records``.

        Raises:
            RecordIndexError, RecordIndexTypeError, InvalidOptionError: As :meth:`read_many`.
        """
        read_bytes = _check_read_bytes(read_bytes)
        recs = self._records_array(records)
        if table is not None:
            table = self._check_table(table)
        plan = self._plan(recs, read_bytes, table, {} if missing is None else missing)
        return [recs[lo:hi] for lo, hi in plan]

    def _plan(
        self, recs: np.ndarray, read_bytes: int, table: np.ndarray | None, missing: dict[int, BaseException]
    ) -> list[tuple[int, int]]:
        if table is not None:
            return split_by_bytes(table["stored"][recs], read_bytes)
        shard, rows, where = self._frames_of(recs, None, missing)
        if where is None:
            return split_by_bytes(rows["stored"], read_bytes)
        if not len(recs):
            return []
        key = shard * (1 << 40) + where[:, 0]
        starts = np.concatenate([[0], np.flatnonzero(key[1:] != key[:-1]) + 1])
        groups = split_by_bytes(rows["stored"][starts], read_bytes)
        edges = np.append(starts, len(recs)).tolist()
        return [(edges[lo], edges[hi]) for lo, hi in groups]

    def fetch_many(
        self,
        records: Sequence[int] | np.ndarray,
        *,
        table: np.ndarray | None = None,
        missing: dict[int, BaseException] | None = None,
    ) -> FetchedFrames:
        """Fetch the stored frames of ``records`` with as few positional reads as possible.

        The I/O half of a bulk read. Frames are read in file order: sorted by shard and offset,
        each frame once however often it is requested (and, with multi-record frames, however
        many requested records share it); neighbouring frames of a shard less than
        :data:`MERGE_GAP_BYTES` apart are fetched with one read, the smallest gaps first, with
        at most as many gap bytes as frame bytes in all
        (:func:`~tensorstore_pt._partition.plan_runs`). Nothing is checked or decoded here:
        pass the result to :meth:`decode_many`. Call it on pieces of :meth:`plan_pieces` to
        bound memory.

        Args:
            records: Record positions, as for :meth:`read_many`.
            table: Optional :meth:`record_table` result to take frame positions from (no
                footer is loaded). Not for stores with multi-record frames.
            missing: Optional dict of shards known to be unreadable in this pass (shard index
                to its error): their records get that error without a new attempt, and shards
                found missing here are added. Pass the same dict to successive calls.

        Returns:
            A :class:`FetchedFrames`. A record whose shard is missing, truncated or has a
            damaged footer carries that error (:meth:`FetchedFrames.error`); nothing is raised
            for it.

        Raises:
            RecordIndexError: A position is out of range.
            RecordIndexTypeError: ``records`` is not a 1-D sequence of ints.
            InvalidOptionError: ``table`` has the wrong dtype or shape.
            StoreChangedError: The store was replaced since this reader opened it.
            OSError: The storage failed (for a remote store, after its retries).

        Memory: the bytes read (the frames plus merged gaps), held by the result.
        Thread safety: safe; the result may be decoded in another thread.
        """
        recs = self._records_array(records)
        if table is not None:
            table = self._check_table(table)
        return self._fetch(recs, table, {} if missing is None else missing)

    def _read_width(self, reads: int) -> int:
        """Reads to keep in flight for ``reads`` reads: the storage's ``read_concurrency``
        (checked: a storage class of the user's may set anything), at most ``reads``."""
        value = getattr(self._storage, "read_concurrency", 1)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidOptionError(
                f"store {self.location!r}: {type(self._storage).__name__}.read_concurrency: expected a "
                f"positive int (reads in flight), found {value!r}"
            )
        return min(int(value), reads)

    def _prefetch_footers(self, shards: list[int], failed: dict[int, BaseException]) -> None:
        """Where the storage keeps reads in flight, read the footers of ``shards`` (ascending)
        not read yet that many at a time, as :meth:`_read_runs` does frames: a batch over many
        shards of a remote store with no frame table (multi-record or raw frames) then waits
        out a few round trips for its footers, not one per shard in a row. A shard's record
        error goes to ``failed``; another error raises, the first in shard order."""
        todo = [si for si in shards if si not in failed and self._footers[si] is None]
        width = self._read_width(2 * len(todo))  # a tail and a header a shard
        if width < 2:
            return  # read in turn by the caller
        self._ensure_process()

        def one(si: int, head: _HeadAhead | None) -> BaseException | None:
            try:
                self._footer(si, head)
            except RECORD_ERRORS as exc:
                return exc  # a non-record error raises: the first in shard order
            return None

        for si, exc in zip(todo, self._footers_in_flight(one, todo, width)):
            if exc is not None:
                failed[si] = exc

    def _fetch(self, recs: np.ndarray, table: np.ndarray | None, missing: dict[int, BaseException]) -> FetchedFrames:
        out = FetchedFrames(recs)
        if not len(recs):
            return out
        u = np.unique(recs)
        shard, rows, where = self._frames_of(u, table, missing)
        errors = out._errors
        bad = shard < 0
        if bad.any():
            for rec in u[bad].tolist():
                errors[rec] = missing[int(np.searchsorted(self._starts, rec, side="right")) - 1]
            keep = ~bad
            u, shard, rows = u[keep], shard[keep], rows[keep]
            where = where[keep] if where is not None else None
            if not len(u):
                return out
        if where is not None:
            # Multi-record frames: fetch each frame once.
            fkey = shard * (1 << 40) + where[:, 0]
            _, first = np.unique(fkey, return_index=True)
            t_shard, t_rows, t_frame = shard[first], rows[first], where[first, 0]
        else:
            t_shard, t_rows, t_frame = shard, rows, None
        failed_frames: dict[tuple[int, int], BaseException] = {}
        over = t_rows["raw"] > self.max_record_bytes
        if over.any():
            # Frames over the budget are refused before they are read (a raw frame, format 1.2,
            # is as large stored as decoded).
            for k in np.flatnonzero(over).tolist():
                si = int(t_shard[k])
                rec = int(u[k]) if t_frame is None else int(u[first[k]])
                try:
                    check_record_budget(int(t_rows[k]["raw"]), self.max_record_bytes, self._where(si, rec))
                except AllocationBudgetError as exc:
                    if t_frame is None:
                        errors[rec] = exc
                    else:
                        failed_frames[(si, int(t_frame[k]))] = exc
            keep = ~over
            t_shard, t_rows = t_shard[keep], t_rows[keep]
            if t_frame is None:
                u = u[keep]
            else:
                t_frame = t_frame[keep]
        offsets = t_rows["offset"].astype(np.int64)
        sizes = t_rows["stored"].astype(np.int64)
        ends = offsets + sizes
        framed: dict[tuple[int, int], tuple[Any, memoryview]] = {}
        frames = out._frames
        runs = np.split(np.arange(len(offsets)), plan_runs(offsets, ends, t_shard, MERGE_GAP_BYTES, int(sizes.sum())))
        jobs = []
        for run in runs if len(offsets) else []:
            a, b = int(run[0]), int(run[-1])
            if a == b:
                what = f"record {int(u[a])}'s frame" if t_frame is None else f"frame {int(t_frame[a])}"
            else:
                what = (
                    f"the frames of records [{int(u[a])}, {int(u[b]) + 1})"
                    if t_frame is None
                    else f"frames [{int(t_frame[a])}, {int(t_frame[b]) + 1})"
                )
            jobs.append((int(t_shard[a]), int(offsets[a]), int(ends[b] - offsets[a]), what))
        read = self._read_runs(jobs, missing)
        for run, (si, base, _, _), got in zip(runs, jobs, read):
            try:
                if isinstance(got, BaseException):
                    raise got
                buf = got
            except RECORD_ERRORS as exc:
                if isinstance(exc, MissingShardError):
                    missing[si] = exc
                if t_frame is None:
                    for rec in u[run].tolist():
                        errors[rec] = exc
                else:
                    for f in t_frame[run].tolist():
                        failed_frames[(si, f)] = exc
                continue
            out.reads += 1
            out.stored_bytes += len(buf)
            view = buf if isinstance(buf, memoryview) else memoryview(buf)
            rel = (offsets[run] - base).tolist()
            if t_frame is None:
                for k, o, z, rec in zip(run.tolist(), rel, sizes[run].tolist(), u[run].tolist()):
                    frames[rec] = (si, t_rows[k], view[o : o + z])
            else:
                for k, o, z, f in zip(run.tolist(), rel, sizes[run].tolist(), t_frame[run].tolist()):
                    framed[(si, f)] = (t_rows[k], view[o : o + z])
        if where is not None:
            out._framed = framed
            for rec, si, (f, off, n) in zip(u.tolist(), shard.tolist(), where.tolist()):
                exc = failed_frames.get((si, f))
                if exc is not None:
                    errors[rec] = exc
                else:
                    frames[rec] = (si, f, off, n)
        return out

    def _read_run(self, si: int, base: int, length: int, what: str, missing: dict[int, BaseException]) -> Any:
        exc = missing.get(si)
        if exc is not None:
            raise exc
        return self._read_exact(si, base, length, what)

    def _read_runs(self, jobs: list[tuple[int, int, int, str]], missing: dict[int, BaseException]) -> Iterator[Any]:
        """The reads of :meth:`_fetch`, one per ``(shard, offset, length, what)``, in order, each
        a buffer or its record error (other errors raise, the first in order): where the storage
        keeps several in flight (:attr:`Storage.read_concurrency`), all of them at the first
        ``next``; otherwise each when it is asked for, so that a shard the caller found missing
        (``missing``) is not asked again."""
        width = self._read_width(len(jobs))
        if width < 2:
            for job in jobs:
                try:
                    yield self._read_run(*job, missing)
                except RECORD_ERRORS as exc:
                    yield exc
            return

        # Each shard is opened once, before its reads (an open may be a request, a HEAD; a
        # missing shard's is two, with the index read that tells "missing" from "replaced"):
        # reads of one shard started together would otherwise each open it, or each find it
        # missing. An open's error goes to that shard's reads, in their place in the order.
        self._ensure_process()
        failed: dict[int, BaseException] = {}

        def open_one(si: int) -> None:
            try:
                self._handle(si)
            except Exception as exc:  # kept for the shard's reads, raised there in order
                failed[si] = exc

        def one(job: tuple[int, int, int, str]) -> Any:
            try:
                exc = failed.get(job[0])
                if exc is not None:
                    raise exc
                return self._read_run(*job, missing)
            except RECORD_ERRORS as exc:
                return exc

        to_open = sorted({job[0] for job in jobs if job[0] not in missing and job[0] not in self._handles})
        _in_flight(open_one, to_open, width, "tspt-read")
        yield from _in_flight(one, jobs, width, "tspt-read")

    def decode_many(self, fetched: FetchedFrames, *, raw: bool = False) -> Iterator[RecordResult]:
        """Check, decompress and load the records of ``fetched``, in its order.

        The CPU half of a bulk read (see :meth:`fetch_many`). Each frame goes through the
        same checks as :meth:`read` (checksum before decompression, raw length before
        allocation, decoded length after); with multi-record frames, each frame is checked and
        decoded once for all the records of ``fetched`` that share it, and each record is
        copied out into a buffer of its own. A column block (format 1.3) of which ``fetched``
        asks for at least a quarter of the records loads all of them together
        (:meth:`.ColumnBlock.load_all`: each tensor over a copy of its own bytes, no pickle
        run per record), each sample handed out once; records that path does not cover load
        one by one.

        Args:
            fetched: What :meth:`fetch_many` of this reader returned.
            raw: Yield :class:`RawRecord` samples (checked and decompressed, not unpickled).

        Yields:
            A :class:`RecordResult` per requested record, in order. Per-record damage
            (``CorruptStoreError``, ``UnsafePayloadError``) is in ``error``, never raised.

        Memory: one decoded record at a time beyond what the caller keeps; with multi-record
        frames, also the decoded frames still needed by later records of ``fetched`` (one
        when records come in store order), at most :data:`KEPT_FRAME_BYTES` of them plus the
        frame in use: past that bound a frame is decoded again for each later record. A
        column block loaded together counts its samples' storages too.
        Thread safety: safe; one iterator per thread.
        """
        frames = fetched._frames
        errors = fetched._errors
        codec, budget = self._codec, self.max_record_bytes
        if fetched._framed is None:
            load = self._load
            for rec in fetched.records.tolist():
                got = frames.get(rec)
                if got is None:
                    yield RecordResult(rec, None, errors[rec])
                    continue
                si, row, frame = got
                try:
                    stored_raw = self._raw_frames and self._footer(si).is_raw(rec - int(self._starts[si]))
                    data = check_frame(codec, row, frame, self._where(si, rec), max_record_bytes=budget, writable=True,
                                       stored_raw=stored_raw)  # fmt: skip
                    sample = RawRecord(self, si, rec, data) if raw else load(si, rec, data)  # type: ignore[arg-type]
                except RECORD_ERRORS as exc:
                    yield RecordResult(rec, None, exc)
                    continue
                yield RecordResult(rec, sample, None)
            return
        framed = fetched._framed
        records = fetched.records.tolist()
        starts = self._starts.tolist() if self._columnar else []
        last: dict[tuple[int, int], int] = {}
        uses: dict[tuple[int, int], int] = {}
        for pos, rec in enumerate(records):
            got = frames.get(rec)
            if got is not None:
                key = (got[0], got[1])
                last[key] = pos
                uses[key] = uses.get(key, 0) + 1
        decoded: dict[tuple[int, int], Any] = {}
        kept_bytes = 0  # decoded bytes in ``decoded`` (KEPT_FRAME_BYTES at most)
        distinct: bool | None = None  # whether no record is asked for twice (found when needed)
        for pos, rec in enumerate(records):
            got = frames.get(rec)
            if got is None:
                yield RecordResult(rec, None, errors[rec])
                continue
            si, f, off, n = got
            key = (si, f)
            data = decoded.get(key)
            if data is None:
                row, frame = framed[key]
                try:
                    stored_raw = self._is_raw(si, f)
                    data = check_frame(codec, row, frame, self._where(si, rec), max_record_bytes=budget,
                                       stored_raw=stored_raw)  # fmt: skip
                    data = self._frame_content(si, f, data, rec)
                    if type(data) is ColumnBlock and not raw and self._cpu:
                        used = uses[key]
                        if used == data.n and used > 1 and distinct is None:
                            distinct = len(set(records)) == len(records)
                        kept = kept_bytes + 2 * len(data) <= KEPT_FRAME_BYTES
                        # Every record of the block asked for once, and the block decoded once
                        # for all of them (asked for once, or kept for its later records): it
                        # is dropped after its last one, so its samples may use its own
                        # buffers in place. (A block not kept is decoded again for each record.)
                        data.spent = used == data.n and (used == 1 or (bool(distinct) and kept))
                        if 4 * used >= data.n > 1 and used > 1 and kept:
                            # Most of the block is asked for, and it will be kept for its later
                            # records (its loaded samples count too): its records load together,
                            # each handed out once below. (A block that would not be kept would
                            # be decoded and loaded again for each of its records.)
                            self._load_block(si, data, data.spent)
                except RECORD_ERRORS as exc:
                    data = _without_locals(exc)  # kept at 0 bytes: must not pin a decoded buffer
                size = 0 if isinstance(data, BaseException) else len(data)
                if last[key] != pos and kept_bytes + size <= KEPT_FRAME_BYTES:
                    decoded[key] = data
                    kept_bytes += size
            elif last[key] == pos:
                del decoded[key]
                kept_bytes -= 0 if isinstance(data, BaseException) else len(data)
            if isinstance(data, BaseException):
                yield RecordResult(rec, None, data)
                continue
            try:
                if isinstance(data, ColumnBlock):
                    r = rec - starts[si] - data.first
                    if raw:  # its torch.save bytes are rebuilt only if asked for (RawRecord.data)
                        self._check_budget(n, si, rec)
                        data.check_length(r, n)
                        sample = RawRecord(self, si, rec, None, (data, r, n))
                    else:
                        loaded = data.loaded
                        sample = loaded[r] if loaded else DECLINED
                        if sample is DECLINED:
                            sample = self._load_from_block(si, rec, data, r, n)
                        else:
                            self._check_budget(n, si, rec)
                            loaded[r] = DECLINED  # a request of it again gets a sample of its own
                else:
                    buf = bytearray(memoryview(data)[off : off + n])
                    sample = RawRecord(self, si, rec, buf) if raw else self._load(si, rec, buf)
            except RECORD_ERRORS as exc:
                yield RecordResult(rec, None, exc)
                continue
            yield RecordResult(rec, sample, None)

    def iter_many(
        self,
        records: Sequence[int] | np.ndarray,
        *,
        raw: bool = False,
        read_bytes: int = READ_BYTES,
        table: np.ndarray | None = None,
    ) -> Iterator[RecordResult]:
        """Read many records, yielding each one's sample or error in the requested order.

        :meth:`plan_pieces`, then for each piece :meth:`fetch_many` and :meth:`decode_many`:
        pieces of about ``read_bytes`` stored bytes, each fetched with as few positional reads
        as possible (sorted by shard and offset, nearby frames merged), then checked, decoded
        and loaded in the requested order.

        Args:
            records: Record positions (a sequence, range, 1-D integer array or tensor); any
                order, duplicates allowed (each occurrence gets a sample of its own, the frame
                is read once a piece), negative positions count from the end.
            raw: Yield :class:`RawRecord` samples (checked and decompressed, not unpickled).
            read_bytes: Target stored bytes a piece (default :data:`READ_BYTES`, 1 MiB).
            table: Optional :meth:`record_table` result to take frame positions from (no
                footer is loaded). Not for stores with multi-record frames.

        Yields:
            A :class:`RecordResult` per requested record. Damage to a record or its shard
            (``CorruptStoreError``) and refused pickles (``UnsafePayloadError``) are reported
            in ``error``, not raised, so the caller decides to skip or raise.

        Raises:
            RecordIndexError: A position is out of range (before anything is read).
            RecordIndexTypeError: ``records`` is not a 1-D sequence of ints.
            InvalidOptionError: ``read_bytes`` or ``table`` is invalid.
            StoreChangedError: The store was replaced since this reader opened it.
            OSError: The storage failed (for a remote store, after its retries).

        Memory: the requested positions (8 bytes each), the plan of :data:`PLAN_RECORDS` of
        them at a time (about 50 bytes each), one piece of fetched bytes (at most
        ``2 * read_bytes`` plus one frame: frames and merged gaps), plus the sample being
        yielded (and, with multi-record frames, the decoded frames the piece still needs). A
        shard a piece finds missing is not opened again by later pieces.
        Thread safety: safe; each iterator belongs to one thread.
        """
        read_bytes = _check_read_bytes(read_bytes)
        recs = self._records_array(records)
        if table is not None:
            table = self._check_table(table)
        return self._iter_many(recs, raw, read_bytes, table)

    def _iter_many(
        self, recs: np.ndarray, raw: bool, read_bytes: int, table: np.ndarray | None
    ) -> Iterator[RecordResult]:
        missing: dict[int, BaseException] = {}
        # Planned PLAN_RECORDS requests at a time: planning holds about 50 bytes a request (frame
        # rows, shards, a sort), which for a list of 10**8 records would be gigabytes at once.
        # (A run of records sharing a multi-record frame cut at a chunk's edge decodes it twice.)
        for at in range(0, len(recs), PLAN_RECORDS):
            part = recs[at : at + PLAN_RECORDS]
            for lo, hi in self._plan(part, read_bytes, table, missing):
                yield from self.decode_many(self._fetch(part[lo:hi], table, missing), raw=raw)

    def read_many(
        self,
        records: Sequence[int] | np.ndarray,
        *,
        raw: bool = False,
        on_error: str = "raise",
        read_bytes: int = READ_BYTES,
        table: np.ndarray | None = None,
    ) -> list[Any]:
        """Read many records at once: ``store[list]``, ``store[slice]`` and ``store[array]`` use it.

        Frames are fetched with as few positional reads as possible (see :meth:`iter_many`):
        on a remote store, a run of nearby records is one ranged read, and a footer is
        fetched once per shard.

        Args:
            records: Record positions (a sequence, range, 1-D integer array or tensor); any
                order, duplicates allowed, negative positions count from the end.
            raw: Return :class:`RawRecord` samples (checked and decompressed, not unpickled).
            on_error: ``"raise"`` (default): the first damaged record in the requested order
                raises its error. ``"return"``: its error (a ``CorruptStoreError`` or
                ``UnsafePayloadError`` instance) takes its place in the list.
            read_bytes: Target stored bytes fetched and decoded at a time (default
                :data:`READ_BYTES`, 1 MiB).
            table: Optional :meth:`record_table` result to take frame positions from.

        Returns:
            A list of samples, one per requested position, in the requested order.

        Raises:
            Everything :meth:`read` and :meth:`iter_many` raise; and
            InvalidOptionError: ``on_error`` is not ``"raise"`` or ``"return"``.

        Memory: the returned samples, plus one piece (:meth:`iter_many`).
        Thread safety: safe.
        """
        if on_error not in ("raise", "return"):
            raise InvalidOptionError(f"on_error: expected 'raise' or 'return', found {on_error!r}")
        out: list[Any] = []
        for result in self.iter_many(records, raw=raw, read_bytes=read_bytes, table=table):
            if result.error is not None:
                if on_error == "raise":
                    raise result.error
                out.append(result.error)
            else:
                out.append(result.sample)
        return out

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> Any:
        """``store[i]`` reads one record; a slice or a sequence of ints reads a list of them.

        ``i`` may be a Python or numpy int or a 0-dim integer tensor/array; sequences may be
        lists, tuples, 1-D integer arrays or tensors.

        Raises:
            RecordIndexError: An index is out of range.
            RecordIndexTypeError: A key of another type (``store["a"]``); also a ``TypeError``
                and an :class:`InvalidOptionError`.
            InvalidOptionError: A slice step of 0.
        """
        if isinstance(key, slice):
            if key.step == 0:
                raise InvalidOptionError("store slice: expected a non-zero step, found 0")
            return self.read_many(range(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self.read(int(key))
        kind = type(key).__name__
        if hasattr(key, "tolist") and not isinstance(key, (str, bytes)):
            key = key.tolist()  # 0-dim arrays/tensors become a scalar, others a list
            if isinstance(key, int) and not isinstance(key, bool):
                return self.read(key)
        if isinstance(key, (list, tuple)):
            return self.read_many(key)
        raise RecordIndexTypeError(f"store index: expected an int, slice or sequence of ints, found {kind}")

    def __iter__(self) -> Iterator[Any]:
        """Yield every record in order: shard by shard, in pieces of about :data:`READ_BYTES`
        (one positional read each).

        Raises:
            The first record's error, as :meth:`read`.
        """
        for first, end in self.shard_bounds().tolist():
            for result in self._iter_many(np.arange(first, end, dtype=np.int64), False, READ_BYTES, None):
                if result.error is not None:
                    raise result.error
                yield result.sample

    def verify(self) -> None:
        """Check every shard's size and whole-file checksum and every record's frame (a column
        block, format 1.3, as a read checks it: its tables, and each record's metadata and
        rebuilt length).

        Raises:
            The first :class:`~tensorstore_pt.errors.CorruptStoreError` found.
        """
        for si, entry in enumerate(self._index.shards):
            self._footer(si)
            digest = file_digest(self._handle(si), entry.file_bytes)
            if digest != entry.checksum:
                raise ChecksumMismatchError(
                    f"{self._where(si)}: whole-file checksum mismatch ({ALGORITHM}): index says "
                    f"{entry.checksum:016x}, the file gives {digest:016x}"
                )
            footer = self._footer(si)
            for fi in range(len(footer.table)):
                first = _first_record_of_frame(footer, fi)
                j = entry.first_record + first
                data = self._frame_content(si, fi, self._decoded_frame(si, fi, j), j)
                if isinstance(data, ColumnBlock):  # as a read checks it: every record's metadata and length
                    raws = footer.record_map["raw"][first : _first_record_of_frame(footer, fi + 1)].tolist()
                    for r, raw in enumerate(raws):
                        data.check_length(r, raw)


def _check_read_bytes(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidOptionError(f"read_bytes: expected a positive int (bytes), found {value!r}")
    return int(value)


#: The footer JSON keys a reader keeps (each one checked against the index or the tables by
#: :func:`~tensorstore_pt.shardio.fetch_footer`); "frames" only with multi-record frames. Not
#: "raw_frames": its runs (up to one every other frame, ~150 bytes of Python objects each) are
#: kept as the footer's ``raw_mask`` (1 byte a frame).
_KEPT_FOOTER_KEYS = ("format_version", "features", "codec", "records", "first_record")


def _kept(footer: ShardFooter) -> ShardFooter:
    """What a reader keeps of a checked footer, for as long as it is open: its tables copied out
    of the footer's bytes (a view would keep the whole footer alive, JSON included) and the
    footer JSON's checked keys only. A footer JSON may be up to 1 MiB (``MAX_FOOTER_JSON_BYTES``)
    of keys a reader ignores, which parse to some 20 MiB of Python objects (``[[],[],...]``);
    kept for every shard, a hostile store of many shards held that much per shard. Kept now:
    32 bytes a frame, 24 a record (multi-record frames), 1 a frame (raw frames)."""
    meta = footer.meta
    keys = _KEPT_FOOTER_KEYS + (("frames",) if footer.record_map is not None else ())
    kept = {k: meta[k] for k in keys if k in meta}
    if "features" in kept:  # checked as a subset of the index's only: repeats would be kept
        kept["features"] = list(dict.fromkeys(kept["features"]))
    return ShardFooter(
        table=footer.table.copy(),
        meta=kept,
        table_offset=footer.table_offset,
        record_map=None if footer.record_map is None else footer.record_map.copy(),
        raw_mask=footer.raw_mask,
        columnar_mask=footer.columnar_mask,
        layout=footer.layout,
    )


def _without_locals(exc: BaseException) -> BaseException:
    """``exc`` with the finished frames of its traceback (and of its causes' and contexts')
    cleared of their locals: a codec that fails after decoding (trailing data, a short frame)
    left its output buffer (up to ``max_record_bytes``) in a frame of the error's cause's
    traceback, so a kept error held a whole decoded frame; a refused footer's checks left the
    parsed footer JSON. The messages are unchanged."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # skips the frames still executing
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return exc


def _alone_in_frame(footer: ShardFooter, k: int, fi: int) -> bool:
    """Whether record ``k`` of a shard with a record map is the only record of its frame ``fi``."""
    frame = footer.record_map["frame"]  # type: ignore[index]
    return (k == 0 or int(frame[k - 1]) != fi) and (k + 1 >= len(frame) or int(frame[k + 1]) != fi)


def _first_record_of_frame(footer: ShardFooter, fi: int) -> int:
    if footer.record_map is None:
        return fi
    return int(np.searchsorted(footer.record_map["frame"], fi, side="left"))


def open_store(
    path: str | os.PathLike[str] | Storage,
    *,
    verify: bool = True,
    map_location: Any = "cpu",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    storage_options: dict[str, Any] | None = None,
    frame_cache_bytes: int = FRAME_CACHE_BYTES,
) -> StoreReader:
    """Open a store for reading.

    Args:
        path: The store directory, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``https://...``; see docs/remote.md).
        verify: If True (default), check at open time that every shard exists with the size
            the index records and that its header and footer agree with the index (O(shards)
            small reads, :attr:`Storage.read_concurrency` at a time; no record data is read).
            Per-record checksums are checked on every read regardless.
            :meth:`StoreReader.verify` checks everything. (A
            :class:`~tensorstore_pt.dataset.StoreIterableDataset` streaming through a shard
            cache checks less at open, the listing only, and each footer from the shard's
            checksum-verified cached copy; see its ``verify``.)
        map_location: Passed to ``torch.load``; ``"cpu"`` by default.
        max_record_bytes: The largest raw record, in bytes, a read decodes (default
            :data:`DEFAULT_MAX_RECORD_BYTES`, 1 GiB). A frame whose raw length is above it
            raises :class:`~tensorstore_pt.errors.AllocationBudgetError` before any output
            buffer exists. Decoding a record's pickle has its own budget (docs/integrity.md).
        storage_options: For a URL: the fsspec file system's options (``endpoint_url``,
            ``key``, ``secret``, ``anon``..., and ``tspt_retries``...). None for a local path.
        frame_cache_bytes: With multi-record frames (``frame_target_bytes``, ``compact``),
            the decoded frames single reads keep per thread, in bytes (default
            :data:`FRAME_CACHE_BYTES`, 32 MiB; least recently used dropped first; 0 keeps
            only the last frame), so that random reads of records sharing a frame decode it
            once. Bulk reads keep what they need on their own (:data:`KEPT_FRAME_BYTES`).

    Returns:
        A :class:`StoreReader`.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory without ``index.json``.
        IndexFormatError: ``index.json`` is not JSON or breaks the schema.
        UnsupportedFormatError: A newer format version, unknown feature or codec.
        MissingShardError, ShardSizeError, ShardFormatError: With ``verify=True``, a shard is
            missing, has the wrong size, or its header/footer is damaged.
        StoreChangedError: Writers kept replacing the store while it was being opened (an open
            that races one overwrite reads the new index and opens that version instead).
        InvalidOptionError: ``max_record_bytes`` or ``frame_cache_bytes`` is not an int in
            range.

    Readers take no lock: a store on a read-only mount opens. A reader keeps the version it
    opened; if a later overwrite removed a shard it still needs, reads raise
    ``StoreChangedError`` (never another version's bytes): reopen the store.
    """
    return StoreReader(
        path,
        verify=verify,
        map_location=map_location,
        max_record_bytes=max_record_bytes,
        storage_options=storage_options,
        frame_cache_bytes=frame_cache_bytes,
    )
