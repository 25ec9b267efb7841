"""ShardWriter: pack samples into fixed-size shards; ``index.json`` is committed last.

Commit protocol (see docs/format.md, "Writing"):

1. Each shard is written under a temporary name, fsynced and renamed to its final name when
   it closes. New shards never reuse the name of a shard the current index references.
2. ``index.json`` is written the same way, last: it is the single commit point. Until it is
   replaced, readers see the old store (append/overwrite) or no store (create).
3. After the commit, an ``overwrite`` removes the shards of the old index.

If the ``with`` body raises, or :meth:`ShardWriter.abort` is called, every file this writer
created is removed and the old index is untouched. If the process dies (SIGKILL, power loss),
shards it already renamed stay behind as unreferenced files; they never change what a reader
sees, and ``tspt recover`` can adopt them.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import re
from types import TracebackType
from typing import Any, Iterable

import numpy as np

from . import _version
from .checksums import ALGORITHM, FileHasher, digest_int
from .codecs import Codec, get_codec, make_codec
from .errors import (
    IndexFormatError,
    InvalidOptionError,
    NotAStoreError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
    UnsupportedFormatError,
    WriterClosedError,
)
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_BYTES,
    INDEX_NAME,
    RECORD_DTYPE,
    RECORD_ENTRY_BYTES,
    SHARD_SUFFIX,
    TRAILER_BYTES,
    IndexInfo,
    ShardEntry,
    StoreInfo,
    encode_footer,
    encode_header,
    parse_index,
    shard_name,
)
from .serialization import check_sample, dumps
from .storage import AtomicWriter, Storage, storage_for

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ShardWriter", "write_store"]

DEFAULT_MAX_SHARD_BYTES = 64 * 2**20
_MODES = ("create", "overwrite", "append")
_SEQ_RE = re.compile(r"^shard-(\d+)" + re.escape(SHARD_SUFFIX) + "$")


def _created_by() -> dict[str, Any]:
    import lz4
    import torch
    import zstandard

    return {
        "library": "tensorstore_pt",
        "version": _version.__version__,
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "lz4": lz4.library_version_string(),
    }


def _encode(sample: Any, codec: Codec) -> tuple[int, bytes, int]:
    raw = dumps(sample)
    frame = codec.compress(raw)
    return len(raw), frame, digest_int(frame)


class _OpenShard:
    """The shard being written: header + frames so far, record rows kept in lists."""

    def __init__(self, storage: Storage, name: str, first_record: int, footer_meta: dict[str, Any]) -> None:
        self.name = name
        self.first_record = first_record
        self.footer_meta = footer_meta
        self.out: AtomicWriter = storage.writer(name)
        self.hasher = FileHasher()
        self.offsets: list[int] = []
        self.stored: list[int] = []
        self.raw: list[int] = []
        self.checksums: list[int] = []
        self.pos = 0
        self._write(encode_header())

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.hasher.update(data)
        self.pos += len(data)

    def meta(self, records: int) -> dict[str, Any]:
        return {**self.footer_meta, "records": records, "first_record": self.first_record}

    def size_with(self, frame_bytes: int) -> int:
        """File size if one more record of ``frame_bytes`` were added and the shard closed."""
        n = len(self.offsets) + 1
        js = len(json.dumps(self.meta(n), sort_keys=True, separators=(",", ":")).encode())
        return self.pos + frame_bytes + n * RECORD_ENTRY_BYTES + js + TRAILER_BYTES

    def add(self, raw_bytes: int, frame: bytes, checksum: int) -> None:
        self.offsets.append(self.pos)
        self.stored.append(len(frame))
        self.raw.append(raw_bytes)
        self.checksums.append(checksum)
        self._write(frame)

    def close(self) -> ShardEntry:
        table = np.zeros(len(self.offsets), dtype=RECORD_DTYPE)
        table["offset"] = self.offsets
        table["stored"] = self.stored
        table["raw"] = self.raw
        table["checksum"] = self.checksums
        self._write(encode_footer(table, self.meta(len(self.offsets))))
        self.out.commit()
        return ShardEntry(
            name=self.name,
            records=len(self.offsets),
            first_record=self.first_record,
            file_bytes=self.pos,
            stored_bytes=sum(self.stored),
            raw_bytes=sum(self.raw),
            checksum=self.hasher.intdigest(),
        )


class ShardWriter:
    """Write samples into a store: fixed-size shards plus a JSON index committed last.

    Args:
        path: The store directory. Created if missing (parents too).
        codec: ``"zstd"`` (default for a new store), ``"lz4"`` or ``"none"``. In ``append``
            mode the store's codec is used; passing a different one raises.
        level: Codec level; None means the codec's default (zstd 3, lz4 0). zstd accepts
            -7..22, lz4 0..16.
        max_shard_bytes: Cap on a shard's file size in bytes, header and footer included
            (default 64 MiB). A shard closes when the next record would take it past the cap;
            a record larger than the cap gets a shard of its own.
        metadata: A JSON-serialisable dict stored in the index. In ``append`` mode it
            updates (``dict.update``) the store's metadata.
        mode: ``"create"`` (the path must not hold a store or other files),
            ``"overwrite"`` (replace an existing store on commit) or ``"append"`` (add
            records after the existing ones; the store must exist).
        num_threads: Threads that serialise and compress (default: 2, or 1 on one core).

    Raises:
        InvalidOptionError: Bad codec, level, shard size, mode or metadata.
        StoreExistsError: ``create`` on a path that holds a store or other files.
        StoreNotFoundError / NotAStoreError: ``append`` to a path without a store.

    Use as a context manager; the store is published when the ``with`` block exits without
    an exception, and nothing is published if it raises::

        with ShardWriter("data/train", codec="zstd") as w:
            for sample in samples:
                w.write(sample)

    Memory: at most ``2 * num_threads + 2`` encoded samples are in flight, plus one shard's
    record table (32 bytes a record). Thread safety: one writer must be used from one thread.
    Fork safety: do not fork while a writer is open (its thread pool does not survive fork).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        *,
        codec: str | None = None,
        level: int | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, Any] | None = None,
        mode: str = "create",
        num_threads: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise InvalidOptionError(f"mode: expected one of {list(_MODES)}, found {mode!r}")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise InvalidOptionError(f"max_shard_bytes: expected a positive int, found {max_shard_bytes!r}")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise InvalidOptionError(f"metadata: expected a dict, found {type(metadata).__name__}")
            try:
                metadata = json.loads(json.dumps(metadata, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise InvalidOptionError(f"metadata: expected a JSON-serialisable dict ({exc})") from exc
        if num_threads is None:
            num_threads = max(1, min(2, os.cpu_count() or 1))
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise InvalidOptionError(f"num_threads: expected a positive int, found {num_threads!r}")

        self._storage = storage_for(path)
        self.location = self._storage.location
        self.mode = mode
        self.max_shard_bytes = max_shard_bytes
        self._old: IndexInfo | None = None
        self._created_dir = False
        # Validate user options before touching the file system.
        new_codec = make_codec(codec if codec is not None else "zstd", level) if mode != "append" or codec else None
        old_index = self._inspect_target()

        if mode == "append" and old_index is not None:  # _inspect_target raised if there is none
            store_codec = get_codec(old_index.codec)
            if new_codec is not None and new_codec.get_config() != old_index.codec and (
                level is not None or new_codec.codec_id != store_codec.codec_id
            ):
                raise InvalidOptionError(
                    f"append to {self.location!r}: the store uses codec {old_index.codec}, found "
                    f"codec={codec!r}, level={level!r}; omit them or pass the store's own"
                )
            self._codec = store_codec
            self._metadata = {**old_index.metadata, **(metadata or {})}
            self._shards: list[ShardEntry] = list(old_index.shards)
        else:
            self._codec = new_codec if new_codec is not None else make_codec("zstd")
            self._metadata = metadata or {}
            self._shards = []
        self._old = old_index
        self._base_shards = len(self._shards)
        self._records = sum(s.records for s in self._shards)
        self._seq = self._next_seq()
        self._footer_meta = {
            "format": FORMAT_NAME,
            "format_version": list(FORMAT_VERSION),
            "features": [],
            "codec": self._codec.get_config(),
            "checksum": ALGORITHM,
        }
        self._open: _OpenShard | None = None
        self._pending: collections.deque[cf.Future[tuple[int, bytes, int]]] = collections.deque()
        self._max_pending = 2 * num_threads + 2
        self._pool = cf.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tspt-writer")
        self._state = "open"
        #: Counters for progress displays: records, raw and stored bytes written so far.
        self.records_written = 0
        self.raw_bytes_written = 0
        self.stored_bytes_written = 0

    # ------------------------------------------------------------------ setup

    def _inspect_target(self) -> IndexInfo | None:
        st = self._storage
        where = self.location
        if st.exists() and not st.is_container():
            raise StoreExistsError(f"{where!r} exists and is not a directory; expected a directory or a new path")
        names = st.list() if st.exists() else []
        has_index = INDEX_NAME in names
        if self.mode == "append":
            if not st.exists():
                raise StoreNotFoundError(f"append: no store at {where!r} (the path does not exist); use mode='create'")
            if not has_index:
                raise NotAStoreError(f"append: {where!r} holds no {INDEX_NAME}; expected an existing store")
            return parse_index(st.read_all(INDEX_NAME), f"store {where!r}: {INDEX_NAME}")
        if self.mode == "create":
            if has_index:
                raise StoreExistsError(
                    f"create: a store already exists at {where!r}; use mode='overwrite' or mode='append'"
                )
            if names:
                raise StoreExistsError(
                    f"create: {where!r} is not empty ({len(names)} files, e.g. {names[0]!r}); expected a new "
                    "or empty directory"
                )
            self._created_dir = st.ensure()
            return None
        # overwrite
        self._created_dir = st.ensure()
        if has_index:
            try:
                return parse_index(st.read_all(INDEX_NAME), f"store {where!r}: {INDEX_NAME}")
            except (IndexFormatError, UnsupportedFormatError):
                return None  # replaced wholesale; its shards are left in place, never guessed at
        return None

    def _next_seq(self) -> int:
        seqs = [int(m.group(1)) for n in self._storage.list() if (m := _SEQ_RE.match(n))]
        return max(seqs, default=-1) + 1

    # ------------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self._state != "open":
            raise WriterClosedError(f"writer for {self.location!r} is {self._state}; open a new ShardWriter")

    def write(self, sample: Any) -> None:
        """Queue one sample; it is serialised and compressed in the writer's thread pool.

        The sample is checked here, so a bad sample raises from this call; its tensors are
        snapshotted, so changing them after ``write`` returns does not change what is stored.

        Raises:
            UnsupportedSampleError: If ``torch.load(weights_only=True)`` could not load it.
            WriterClosedError: After close, abort or an earlier failure.
        """
        self._check_open()
        check_sample(sample)
        snapshot = _snapshot(sample)
        self._pending.append(self._pool.submit(_encode, snapshot, self._codec))
        while len(self._pending) > self._max_pending:
            self._drain_one()

    def write_many(self, samples: Iterable[Any]) -> int:
        """Write every sample of an iterable; return how many were written."""
        n = 0
        for sample in samples:
            self.write(sample)
            n += 1
        return n

    def _drain_one(self) -> None:
        fut = self._pending.popleft()
        try:
            raw_bytes, frame, checksum = fut.result()
        except BaseException:
            self._state = "failed"
            raise
        self._append(raw_bytes, frame, checksum)

    def _append(self, raw_bytes: int, frame: bytes, checksum: int) -> None:
        if self._open is not None and self._open.offsets and self._open.size_with(len(frame)) > self.max_shard_bytes:
            self._close_shard()
        if self._open is None:
            self._open = _OpenShard(self._storage, shard_name(self._seq), self._records, self._footer_meta)
            self._seq += 1
        self._open.add(raw_bytes, frame, checksum)
        self._records += 1
        self.records_written += 1
        self.raw_bytes_written += raw_bytes
        self.stored_bytes_written += len(frame)

    def _close_shard(self) -> None:
        if self._open is not None:
            shard = self._open
            self._open = None
            self._shards.append(shard.close())

    # ------------------------------------------------------------------ finishing

    def close(self) -> StoreInfo:
        """Finish: flush pending samples, close the last shard and commit ``index.json``.

        Returns:
            The summary of the published store.

        Raises:
            WriterClosedError: If the writer was aborted or failed.
        """
        if self._state == "closed":
            return self._info
        self._check_open()
        try:
            while self._pending:
                self._drain_one()
            self._close_shard()
            info = IndexInfo.build(self._codec.get_config(), self._shards, self._metadata, _created_by())
            with self._storage.writer(INDEX_NAME) as out:
                out.write((json.dumps(info.to_json(), indent=1) + "\n").encode())
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._pool.shutdown(wait=True)
        if self._old is not None and self.mode == "overwrite":
            keep = {s.name for s in self._shards}
            for old in self._old.shards:
                if old.name not in keep:
                    self._storage.remove(old.name)
        self._info = StoreInfo.from_index(self.location, info)
        return self._info

    def abort(self) -> None:
        """Discard everything this writer wrote; the previous store (if any) is untouched."""
        if self._state == "closed":
            raise WriterClosedError(f"writer for {self.location!r} already committed its store; cannot abort")
        self._state = "aborted"
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        if self._open is not None:
            self._open.out.abort()
            self._open = None
        for shard in self._shards[self._base_shards :]:
            self._storage.remove(shard.name)
        del self._shards[self._base_shards :]
        if self._created_dir:
            self._storage.remove_container()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        elif self._state in ("open", "failed"):
            self.abort()

    def __del__(self) -> None:  # pragma: no cover - a writer dropped without close/abort
        if getattr(self, "_state", None) in ("open", "failed"):
            try:
                self.abort()
            except (OSError, TensorStoreError):
                pass


def _snapshot(sample: Any) -> Any:
    """Copy the tensors of a sample so later in-place changes by the caller cannot leak in."""
    import torch

    if isinstance(sample, torch.Tensor):
        src = sample.detach()
        copy = src.clone(memory_format=torch.preserve_format) if src.layout == torch.strided else src.clone()
        if isinstance(sample, torch.nn.Parameter):
            return torch.nn.Parameter(copy, requires_grad=sample.requires_grad)
        return copy.requires_grad_(True) if sample.requires_grad else copy
    t = type(sample)
    if t is list:
        return [_snapshot(v) for v in sample]
    if t is tuple:
        return tuple(_snapshot(v) for v in sample)
    if isinstance(sample, dict):
        return t((k, _snapshot(v)) for k, v in sample.items())
    return sample


def write_store(samples: Iterable[Any], path: str | os.PathLike[str] | Storage, **options: Any) -> StoreInfo:
    """Write an iterable of samples as a store in one call.

    Args:
        samples: The samples, in record order.
        path: The store directory.
        **options: Any keyword of :class:`ShardWriter` (codec, level, max_shard_bytes,
            metadata, mode, num_threads).

    Returns:
        The published store's summary.

    Raises:
        See :class:`ShardWriter` and :meth:`ShardWriter.write`. On any error nothing is
        published.
    """
    with ShardWriter(path, **options) as writer:
        writer.write_many(samples)
    return writer.close()
