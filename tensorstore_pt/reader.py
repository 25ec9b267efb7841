"""open_store() -> StoreReader: random access to the records of a store.

Every read checks the frame's xxh3_64 digest *before* decompressing, checks the frame
header's declared size against the raw length in the shard footer *before* allocating, and
checks the decompressed length after. Records are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from .checksums import ALGORITHM, digest_int
from .codecs import Codec, get_codec
from .codecs.registry import MAX_DICT_BYTES
from .errors import (
    AllocationBudgetError,
    ChecksumMismatchError,
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
from .format import (
    HEADER_BYTES,
    INDEX_NAME,
    FEATURE_MULTI_RECORD_FRAMES,
    MAX_INDEX_BYTES,
    RECORD_DTYPE,
    SHARD_SUFFIX,
    TRAILER_BYTES,
    IndexInfo,
    ShardEntry,
    ShardFooter,
    StoreInfo,
    parse_index,
)
from .serialization import loads
from .shardio import DEFAULT_MAX_RECORD_BYTES, check_frame, check_index_sizes, file_digest, read_exact, read_footer
from .storage import ReadHandle, Storage, storage_for

__all__ = ["DEFAULT_MAX_RECORD_BYTES", "StoreReader", "check_index_sizes", "open_store", "read_footer"]


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


def read_index_bytes(storage: Storage) -> bytes:
    """Read ``index.json`` atomically (size and bytes from one open file), refusing one past
    ``MAX_INDEX_BYTES`` before reading it.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory without ``index.json``.
        IndexFormatError: ``index.json`` is larger than ``MAX_INDEX_BYTES``.
    """
    where = storage.location
    if not storage.exists():
        raise StoreNotFoundError(f"no store at {where!r}: the path does not exist")
    if not storage.is_container():
        raise NotAStoreError(f"{where!r} is a file; expected a store directory holding {INDEX_NAME}")
    try:
        return storage.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES)
    except TensorStoreError:
        raise  # NotARegularFileError: a directory or FIFO named index.json
    except ValueError as exc:
        raise IndexFormatError(
            f"store {where!r}: {INDEX_NAME}: expected at most {MAX_INDEX_BYTES} bytes ({exc})"
        ) from exc
    except FileNotFoundError:
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


class StoreReader:
    """Random access to a store's records.

    Use :func:`open_store` to create one.

    Thread safety: all methods may be called from many threads at once (reads are
    positional, ``os.pread``; lazily opened handles and footers are guarded by a lock).
    Fork/spawn safety: file handles belong to the process that opened them; after a fork the
    child opens its own on first use. A reader pickles to its location and options, so it can
    be sent to spawned DataLoader workers; the worker re-reads ``index.json`` and refuses a
    store that changed since (:class:`~tensorstore_pt.errors.CorruptStoreError`).

    Memory: per shard, the footer's record table is kept as one numpy array (32 bytes a
    record) once a record of that shard has been read; no Python object per record.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        *,
        verify: bool = True,
        map_location: Any = "cpu",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        storage_options: dict[str, Any] | None = None,
        _expect_index_digest: int | None = None,
    ) -> None:
        self.max_record_bytes = _check_max_record_bytes(max_record_bytes)
        self._storage = storage_for(path, storage_options)
        self.location = self._storage.location
        self._verify = bool(verify)
        self.map_location = _check_map_location(map_location)
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
            for si in range(len(index.shards)):
                self._footer(si)

    # ------------------------------------------------------------------ per-process state

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._handles: dict[int, ReadHandle] = {}
        self._frame_cache = threading.local()  # (shard, frame) -> decoded bytes, one per thread

    def _load_store_file(self, name: str) -> bytes:
        try:
            size = self._storage.size(name)
            if size > MAX_DICT_BYTES:  # checked before reading: a hostile store cannot make us read gigabytes
                raise ShardSizeError(
                    f"store {self.location!r}: file {name!r} is {size} bytes; expected at most {MAX_DICT_BYTES}"
                )
            return self._storage.read_all(name)
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
            # here, and its handles are the parent's. Start afresh (the fds stay with the parent).
            self._init_process_state()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "storage": self._storage,
            "verify": self._verify,
            "map_location": self.map_location,
            "max_record_bytes": self.max_record_bytes,
            "index_digest": self._index_digest,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["storage"],
            verify=state["verify"],
            map_location=state["map_location"],
            max_record_bytes=state.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES),
            _expect_index_digest=state["index_digest"],
        )

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
        with self._lock:
            h = self._handles.get(si)
            if h is None:
                name = self._index.shards[si].name
                try:
                    h = self._storage.open(name)
                except FileNotFoundError as exc:
                    self._raise_if_changed(exc)
                    raise MissingShardError(
                        f"{self._where(si)}: the shard file is missing (the index lists it with "
                        f"{self._index.shards[si].records} records)"
                    ) from exc
                self._handles[si] = h
        return h

    def _read_exact(self, si: int, offset: int, length: int, what: str) -> bytes:
        entry = self._index.shards[si]
        where = f"{self._where(si)} (the index says {entry.file_bytes} bytes)"
        try:
            return read_exact(self._handle(si), offset, length, what, where, error=ShardSizeError)
        except RemoteStorageError as exc:
            if exc.errno == errno.ENOENT:  # an object store's shard deleted under an open handle
                self._raise_if_changed(exc)
            raise

    def _footer(self, si: int) -> ShardFooter:
        footer = self._footers[si]
        if footer is not None:
            return footer
        entry: ShardEntry = self._index.shards[si]
        where = self._where(si)
        try:
            size = self._handle(si).size()  # of the file this reader holds open, not of the name now
            if size != entry.file_bytes:
                raise ShardSizeError(f"{where}: expected {entry.file_bytes} bytes (index), found {size} bytes on disk")
            header = self._read_exact(si, 0, HEADER_BYTES, "the header")
            trailer = self._read_exact(si, size - TRAILER_BYTES, TRAILER_BYTES, "the trailer")
            footer = read_footer(
                header,
                trailer,
                size,
                lambda offset, length: self._read_exact(si, offset, length, "the footer"),
                self._index,
                entry,
                where,
            )
        except (ShardSizeError, ShardFormatError) as exc:
            self._raise_if_changed(exc)  # a legacy store's shard name reused by a later writer
            raise
        self._footers[si] = footer
        return footer

    # ------------------------------------------------------------------ reading

    def _decoded_frame(self, si: int, fi: int, record: int, writable: bool = False) -> bytes | bytearray:
        """Read, check and decode frame ``fi`` of shard ``si`` (``record`` is for messages).

        With ``writable`` the result is a fresh ``bytearray`` the caller owns, so tensors can be
        built over it without a copy.
        """
        row = self._footer(si).table[fi]
        frame = self._read_exact(si, int(row["offset"]), int(row["stored"]), f"record {record}'s frame")
        return self._decode(si, record, row, frame, writable)

    def _decode(
        self, si: int, j: int, row: np.void | np.ndarray, frame: bytes | memoryview, writable: bool = False
    ) -> bytes | bytearray:
        """Check and decode a frame through :func:`.shardio.check_frame` (``j`` is for messages)."""
        data = check_frame(self._codec, row, frame, self._where(si, j), max_record_bytes=self.max_record_bytes,
                           writable=writable)  # fmt: skip
        return data  # type: ignore[return-value]

    def _read_raw(self, i: int, writable: bool) -> tuple[int, int, bytes | bytearray]:
        """(record position, shard, raw bytes) of record ``i``; see :meth:`read_bytes`."""
        j = self._normalize(i)
        si, k = self._locate(j)
        footer = self._footer(si)
        if footer.record_map is None:
            return j, si, self._decoded_frame(si, k, j, writable)
        fi, raw_offset, raw = footer.locate(k)
        self._ensure_process()
        cache = self._frame_cache
        if getattr(cache, "key", None) == (si, fi):
            data = cache.data
        else:
            data = self._decoded_frame(si, fi, j)
            cache.key, cache.data = (si, fi), data
        # A copy: tensors of one record must not pin (or alias) the whole cached frame.
        return j, si, data[raw_offset : raw_offset + raw]

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

    def read(self, i: int) -> Any:
        """Read one record by its position and load it.

        Args:
            i: Record position, ``-len(store) <= i < len(store)``.

        Returns:
            The sample as written: tensors with their stored dtype and shape, on
            ``map_location`` (CPU by default).

        Raises:
            Everything :meth:`read_bytes` raises, and
            UnsafePayloadError: The record's pickle asks for globals outside the weights-only
                allow-list; nothing from it is run.
            RecordDecodeError: The bytes are not a loadable torch.save buffer.

        Memory: the decoded record is one buffer the returned tensors share (no further copy
        for contiguous storages); records of multi-record frames are copied out of the frame.
        """
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
        if out is None:
            out = np.zeros(len(self), dtype=RECORD_DTYPE)
        elif out.dtype != RECORD_DTYPE or out.shape != (len(self),):
            raise InvalidOptionError(
                f"out: expected a {RECORD_DTYPE} array of shape ({len(self)},), found {out.dtype} {out.shape}"
            )
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
        _, rows = self._rows(j, j + 1, table)
        return self._decode(si, j, rows[0], frame)

    def _load_frame(self, j: int, si: int, row: np.void, frame: bytes | memoryview) -> Any:
        """Check, decode and load record ``j`` (in shard ``si``) from its stored frame.

        The datasets' per-record path: ``j`` and ``si`` are already known to be right (from
        :meth:`record_table` and :meth:`shard_bounds`), so no index search or range check is
        repeated. The frame is decoded into a buffer of its own (no copy for the tensors).
        """
        return self._load(si, j, self._decode(si, j, row, frame, writable=True))

    def load_record(self, i: int, raw: bytes | bytearray | memoryview) -> Any:
        """Load record ``i``'s ``torch.save`` buffer with ``weights_only=True`` semantics.

        Raises:
            UnsafePayloadError: The pickle asks for forbidden globals; nothing from it is run.
            RecordDecodeError: The bytes are not a loadable torch.save buffer.
        """
        j = self._normalize(i)
        si, _ = self._locate(j)
        return self._load(si, j, raw)

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
            return [self.read(i) for i in range(*key.indices(len(self)))]
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            return self.read(int(key))
        kind = type(key).__name__
        if hasattr(key, "tolist") and not isinstance(key, (str, bytes)):
            key = key.tolist()  # 0-dim arrays/tensors become a scalar, others a list
            if isinstance(key, int) and not isinstance(key, bool):
                return self.read(key)
        if isinstance(key, (list, tuple)):
            return [self.read(i) for i in key]
        raise RecordIndexTypeError(f"store index: expected an int, slice or sequence of ints, found {kind}")

    def __iter__(self) -> Iterator[Any]:
        """Yield every record in order (shard by shard, sequential reads)."""
        for i in range(len(self)):
            yield self.read(i)

    def verify(self) -> None:
        """Check every shard's size and whole-file checksum and every record's frame.

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
                self._decoded_frame(si, fi, entry.first_record + _first_record_of_frame(footer, fi))


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
) -> StoreReader:
    """Open a store for reading.

    Args:
        path: The store directory, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``https://...``; see docs/remote.md).
        verify: If True (default), check at open time that every shard exists with the size
            the index records and that its header and footer agree with the index (O(shards)
            small reads; no record data is read). Per-record checksums are checked on every
            read regardless. :meth:`StoreReader.verify` checks everything.
        map_location: Passed to ``torch.load``; ``"cpu"`` by default.
        max_record_bytes: The largest raw record, in bytes, a read decodes (default
            :data:`DEFAULT_MAX_RECORD_BYTES`, 1 GiB). A frame whose raw length is above it
            raises :class:`~tensorstore_pt.errors.AllocationBudgetError` before any output
            buffer exists. Decoding a record's pickle has its own budget (docs/integrity.md).
        storage_options: For a URL: the fsspec file system's options (``endpoint_url``,
            ``key``, ``secret``, ``anon``..., and ``tspt_retries``...). None for a local path.

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
    )
