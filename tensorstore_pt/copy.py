"""copy_store(): copy a store between any two locations, streaming, checked on arrival, index last.

``tspt cp SRC DST`` is the command-line face of :func:`copy_store`. A copy:

1. reads the source's ``index.json`` (its exact bytes) and lists the files it names: the
   shards and, with the ``zstd-dictionary`` feature, the dictionary file;
2. takes the destination's writer lock (``.tspt-lock``; where the backend has no locks, the
   destination's ``index.json`` is compared before the commit instead) and decides:
   a destination holding the same ``index.json`` bytes, or no index and only files of this
   source, is resumed; one holding another store's committed index is refused with
   :class:`~tensorstore_pt.errors.StoreExistsError` unless ``overwrite=True``;
3. checks the files already at the destination (size from one listing, then the whole-file
   xxh3_64 the index records, which reads them once): each that matches is skipped;
4. copies the others in ``workers`` threads, each file streamed in chunks of at most
   ``chunk_bytes`` and hashed on the way; a file whose size or digest differs from the index
   is discarded (never published under its name) and fetched again once, then the copy
   fails with :class:`~tensorstore_pt.errors.ChecksumMismatchError` naming the file and
   both digests;
5. runs :func:`~tensorstore_pt.integrity.verify_store` over the destination's files (with the
   new index served from memory, so nothing is committed before it passes);
6. writes the source's ``index.json`` bytes, unchanged, last: the copy's index digest equals
   the source's. Without an index at the start the commit is exclusive (it fails rather than
   replace an index another process committed meanwhile).

Nothing is committed when any step fails: files copied so far stay at the destination under
their final names (they are not part of any store until the index is written) and the next
run skips them. With ``overwrite=True`` the old store stays readable until every file of the
new one has arrived and verified, even where one of the source's file names is also one of
its files with other bytes (legacy names such as ``shard-00000.tspt``): such a file is
streamed to a temporary name first; only then is the old ``index.json`` removed, the old files
replaced by the waiting ones and the new index committed (a crash in that short window leaves
no store, and re-running the copy finishes it). After the commit the old store's files that
the new index does not name are removed.

Memory: at most ``workers x chunk_bytes`` of file data in this process (default 4 x 8 MiB),
plus the index. No file is ever held whole in memory. Local disk: nothing for a local
destination (files are written in place under temporary names); for an object-store
destination the backend spools each file in flight to a local temporary file before its
upload (``FsspecStorage``), so up to ``workers`` files' worth of local disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .checksums import FileHasher, format_digest
from .errors import (
    ChecksumMismatchError,
    ConcurrentWriteError,
    CorruptStoreError,
    InvalidOptionError,
    MissingShardError,
    IndexFormatError,
    NotARegularFileError,
    ShardSizeError,
    StoreExistsError,
)
from .format import INDEX_NAME, LOCK_NAME, MAX_INDEX_BYTES, IndexInfo, check_shard_name, new_writer_token, parse_index
from .storage import TEMP_MARKER, AtomicWriter, ReadHandle, Storage, StoreLock, if_match_kwargs, storage_for
from .storage.abc import removal_failures

__all__ = ["CopyReport", "copy_store"]

#: Default chunk of a streamed file (bytes): the memory one copying thread holds.
DEFAULT_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_store` did.

    Attributes:
        source: The source location.
        destination: The destination location.
        records: Records in the copied store.
        shards: Shards in the copied store.
        shards_copied: Shards streamed from the source.
        shards_skipped: Shards already at the destination with the right size and checksum.
        files_copied: Files streamed (shards and the zstd dictionary file, if any).
        files_skipped: Files skipped (shards and the dictionary).
        bytes_copied: Bytes of the files streamed (each counted once, even if fetched twice).
        bytes_skipped: Bytes of the files skipped.
        refetched: Files whose first transfer arrived with the wrong size or digest and were
            fetched again (successfully).
        seconds: Wall time of the whole copy.
        index_checksum: xxh3_64 of ``index.json`` (``"xxh3_64:<hex>"``), equal at both ends.
        index_written: False when the destination already held these exact index bytes.
        verified: Whether :func:`~tensorstore_pt.integrity.verify_store` checked the result.
        removed: Files of a replaced store (``overwrite=True``) removed after the commit.
    """

    source: str
    destination: str
    records: int
    shards: int
    shards_copied: int
    shards_skipped: int
    files_copied: int
    files_skipped: int
    bytes_copied: int
    bytes_skipped: int
    refetched: int
    seconds: float
    index_checksum: str
    index_written: bool
    verified: bool
    removed: tuple[str, ...] = ()

    @property
    def bytes_per_second(self) -> float:
        """``bytes_copied / seconds`` (0.0 for an instant copy)."""
        return self.bytes_copied / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed"] = list(self.removed)
        return d


@dataclass(frozen=True)
class _File:
    name: str
    size: int
    checksum: int
    shard: bool


class _Cancelled(Exception):
    """Another copying thread failed: stop this one (never escapes :func:`copy_store`)."""


def _open_storage(path: str | os.PathLike[str] | Storage, options: dict[str, Any] | None, side: str) -> Storage:
    try:
        return storage_for(path, options)
    except InvalidOptionError as exc:
        raise InvalidOptionError(f"{side}_storage_options: {exc}") from exc


def _files_of(index: IndexInfo, where: str) -> list[_File]:
    """The files ``index`` names: the dictionary first (if any), then the shards."""
    files = []
    ref = index.codec.get("dict")
    if ref is not None:
        from .codecs.registry import DICT_REF_KEYS
        from .checksums import parse_digest

        if not isinstance(ref, dict) or set(ref) != DICT_REF_KEYS:
            raise IndexFormatError(f"{where}: codec.dict: expected keys {sorted(DICT_REF_KEYS)}, found {ref!r}")
        size = ref["bytes"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise IndexFormatError(f"{where}: codec.dict.bytes: expected a non-negative int, found {size!r}")
        name = check_shard_name(ref["name"], f"{where}: codec.dict.name")
        files.append(_File(name, size, parse_digest(ref["checksum"], f"{where}: codec.dict.checksum"), False))
    files += [_File(s.name, s.file_bytes, s.checksum, True) for s in index.shards]
    return files


def _is_temp_of(name: str, wanted: set[str]) -> bool:
    """Whether ``name`` is a temporary file (``.<final>.tmp-...``) of one of ``wanted``."""
    if not name.startswith(".") or TEMP_MARKER not in name:
        return False
    return name[1:].rsplit(TEMP_MARKER, 1)[0] in wanted


class _WithIndex(Storage):
    """A read-only view of ``inner`` in which ``index.json`` is ``raw`` (not yet written)."""

    def __init__(self, inner: Storage, raw: bytes, staged: dict[str, str] | None = None) -> None:
        self._inner = inner
        self._raw = raw
        self._staged = staged or {}  # a file's name -> the name it waits under (not yet in place)
        self.location = inner.location

    def exists(self) -> bool:
        return self._inner.exists()

    def is_container(self) -> bool:
        return self._inner.is_container()

    def ensure(self) -> bool:  # pragma: no cover - never called by verify
        return False

    def list(self) -> list[str]:
        return sorted(set(self._inner.list()) | set(self._staged) | {INDEX_NAME})

    def size(self, name: str) -> int:
        return len(self._raw) if name == INDEX_NAME else self._inner.size(self._staged.get(name, name))

    def sizes(self) -> dict[str, int]:
        sizes = self._inner.sizes()
        return {**sizes, **{n: sizes[s] for n, s in self._staged.items() if s in sizes}, INDEX_NAME: len(self._raw)}

    def open(self, name: str) -> ReadHandle:
        return _BytesHandle(self._raw) if name == INDEX_NAME else self._inner.open(self._staged.get(name, name))

    def writer(
        self, name: str, *, exclusive: bool = False, if_match: str | None = None
    ) -> AtomicWriter:  # pragma: no cover
        raise PermissionError(f"{self.location!r}: read-only view")

    def remove(self, name: str) -> None:  # pragma: no cover
        raise PermissionError(f"{self.location!r}: read-only view")

    def move(self, name: str, new_name: str) -> None:  # pragma: no cover
        raise PermissionError(f"{self.location!r}: read-only view")

    def remove_container(self) -> None:  # pragma: no cover
        raise PermissionError(f"{self.location!r}: read-only view")


class _BytesHandle(ReadHandle):
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_range(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + max(length, 0)]

    def size(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass


class _Progress:
    """Byte progress: a tqdm bar (bytes, MB/s) on stderr, a callback, or nothing. Thread-safe."""

    def __init__(self, progress: bool | Callable[[int], None] | None, total: int) -> None:
        self._lock = threading.Lock()
        self._bar = None
        self._callback = None
        if callable(progress):
            self._callback = progress
        elif progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc="cp",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def add(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)
            if self._callback is not None:
                self._callback(n)

    def grow(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.total += n
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _digest_of(storage: Storage, f: _File, chunk_bytes: int, stop: threading.Event, progress: _Progress) -> bool:
    """Whether ``f`` (listed at ``storage`` with its size) has its whole-file xxh3_64 there."""
    try:
        handle = storage.open(f.name)
    except (FileNotFoundError, NotARegularFileError):
        return False
    try:
        h = FileHasher()
        for off in range(0, f.size, chunk_bytes):
            if stop.is_set():
                raise _Cancelled
            data = handle.read_range(off, min(chunk_bytes, f.size - off))
            if not data:
                return False
            h.update(data)
            progress.add(len(data))
        return handle.size() == f.size and h.intdigest() == f.checksum
    finally:
        handle.close()


def _transfer(
    src: Storage,
    dst: Storage,
    f: _File,
    chunk_bytes: int,
    stop: threading.Event,
    progress: _Progress,
    as_name: str | None = None,
) -> tuple[int, int]:
    """Stream ``f`` from ``src`` to ``dst`` (under ``as_name`` if given), publishing it only if
    its size and digest match the index; return ``(size, digest)`` of what arrived."""
    where = f"store {src.location!r}: {'shard' if f.shard else 'dictionary file'} {f.name!r}"
    try:
        handle = src.open(f.name)
    except FileNotFoundError as exc:
        raise MissingShardError(f"{where} named in the index is missing") from exc
    try:
        size = handle.size()
        if size != f.size:
            raise ShardSizeError(f"{where}: expected {f.size} bytes (index), found {size}")
        h = FileHasher()
        got = 0
        out = dst.writer(as_name or f.name)
        try:
            while got < f.size:
                if stop.is_set():
                    raise _Cancelled
                data = handle.read_range(got, min(chunk_bytes, f.size - got))
                if not data:
                    break  # the file shrank while it was read: a wrong size, fetched again
                h.update(data)
                out.write(data)
                got += len(data)
                progress.add(len(data))
            digest = h.intdigest()
            if got == f.size and digest == f.checksum:
                out.commit()
            else:
                out.abort()  # never published under its name
        except BaseException:
            out.abort()
            raise
        return got, digest
    finally:
        handle.close()


def _copy_one(
    src: Storage,
    dst: Storage,
    f: _File,
    chunk_bytes: int,
    stop: threading.Event,
    progress: _Progress,
    as_name: str | None = None,
) -> bool:
    """Copy one file (under ``as_name`` if given), fetching it again once if it arrives wrong;
    return whether it was refetched."""
    for attempt in (1, 2):
        got, digest = _transfer(src, dst, f, chunk_bytes, stop, progress, as_name)
        if got == f.size and digest == f.checksum:
            return attempt == 2
        if attempt == 1:
            progress.grow(f.size)
    what = "shard" if f.shard else "dictionary file"
    if got != f.size:
        raise ShardSizeError(
            f"store {src.location!r}: {what} {f.name!r}: expected {f.size} bytes (index), {got} arrived, twice; "
            f"nothing was committed at {dst.location!r}"
        )
    raise ChecksumMismatchError(
        f"store {src.location!r}: {what} {f.name!r} (xxh3_64): index says {format_digest(f.checksum)}, the bytes "
        f"that arrived give {format_digest(digest)} (fetched twice); nothing was committed at {dst.location!r}"
    )


def _run_parallel(tasks: list[Callable[[], Any]], workers: int, stop: threading.Event) -> list[Any]:
    """Run ``tasks`` in ``workers`` threads; on the first failure stop the others and raise it."""
    if not tasks:
        return []
    results: list[Any] = [None] * len(tasks)
    first: BaseException | None = None
    with cf.ThreadPoolExecutor(max_workers=min(workers, len(tasks)), thread_name_prefix="tspt-cp") as pool:
        futures = {pool.submit(t): i for i, t in enumerate(tasks)}
        try:
            for fut in cf.as_completed(futures):
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is None:
                    results[futures[fut]] = fut.result()
                elif not isinstance(exc, _Cancelled) and first is None:
                    first = exc
                    stop.set()
                    for other in futures:
                        other.cancel()
        except BaseException:  # KeyboardInterrupt in the waiting thread: stop the workers
            stop.set()
            for other in futures:
                other.cancel()
            raise
    if first is not None:
        raise first
    return results


def copy_store(
    src: str | os.PathLike[str] | Storage,
    dst: str | os.PathLike[str] | Storage,
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    workers: int = 4,
    overwrite: bool = False,
    progress: bool | Callable[[int], None] | None = None,
    verify: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CopyReport:
    """Copy a store from ``src`` to ``dst`` (any two locations), byte for byte, index last.

    Every file the source's index names (shards, and the zstd dictionary file of a format 1.1
    store) is streamed to the destination under the same name and checked on arrival against
    the index's size and whole-file xxh3_64; ``index.json`` is written last with the source's
    exact bytes. Files already at the destination with the right size and digest are skipped,
    so a copy that was interrupted resumes where it stopped. See the module docstring for the
    protocol, and ``docs/remote.md`` ("tspt cp").

    Args:
        src: The source store: a path, an fsspec URL, or a :class:`~tensorstore_pt.storage.Storage`.
        dst: The destination: a path, URL or Storage; created if missing.
        src_storage_options: fsspec options for ``src`` (credentials, ``endpoint_url``...).
        dst_storage_options: fsspec options for ``dst``.
        workers: Files copied at once (threads), >= 1.
        overwrite: Replace another store committed at ``dst``; without it that is refused.
        progress: True for a tqdm bar on stderr (bytes, MB/s), a callable to receive each
            increment of bytes read, or None/False for nothing.
        verify: Run :func:`~tensorstore_pt.integrity.verify_store` over the destination's
            files before the commit (reads every byte copied once more); default True.
        chunk_bytes: Largest read of one streamed file (bytes), >= 1; default 8 MiB.

    Returns:
        A :class:`CopyReport`.

    Raises:
        StoreNotFoundError, NotAStoreError: ``src`` is not a store.
        IndexFormatError, UnsupportedFormatError: The source's index is damaged or newer.
        StoreExistsError: ``dst`` holds another store's index, or files that are not a
            partial copy of this source, and ``overwrite`` is False; or it is a file.
        ChecksumMismatchError: A file arrived twice with a digest other than the index's (the
            message names the file and both digests); nothing was committed.
        ShardSizeError, MissingShardError: A source file has another size or is absent.
        CorruptStoreError: The destination's files failed ``verify_store``; nothing committed.
        ConcurrentWriteError: Another writer committed at ``dst`` during the copy.
        StoreBusyError: Another writer holds the destination's lock.
        InvalidOptionError: ``workers``, ``chunk_bytes`` or storage options are invalid, or
            ``src`` and ``dst`` are the same location.
        RemoteStorageError: A remote backend failed past its retries.

    Memory: at most ``workers x chunk_bytes`` of file data, plus the index; an object-store
    destination also spools up to ``workers`` whole files to local disk before uploading
    them. Thread safety: safe to call from several threads for different destinations; one
    copy to one destination at a time (the destination's lock, where the backend has one).
    """
    from .integrity import verify_store  # imports torch: before the clock starts
    from .reader import read_index_bytes
    from .writer import lock_owner

    start = time.perf_counter()
    for name, value in (("workers", workers), ("chunk_bytes", chunk_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidOptionError(f"{name}: expected an int >= 1, found {value!r}")
    source = _open_storage(src, src_storage_options, "src")
    target = _open_storage(dst, dst_storage_options, "dst")
    if type(source) is type(target) and source.location == target.location:
        raise InvalidOptionError(f"source and destination are the same location {source.location!r}")
    raw = read_index_bytes(source)
    where = f"store {source.location!r}: {INDEX_NAME}"
    index = parse_index(raw, where)
    files = _files_of(index, where)
    source.sizes()  # one listing; on an object store it spares a HEAD per file opened below
    wanted = {f.name for f in files}
    if target.exists() and not target.is_container():
        raise StoreExistsError(f"{target.location!r} exists and is not a directory; expected a directory or a new path")
    created = target.ensure()
    token = new_writer_token()
    lock: StoreLock | None = target.lock(lock_owner(token, "copy", "overwrite" if overwrite else "create"))
    committed = False
    try:
        names = [n for n in target.list() if n != LOCK_NAME]
        old_raw = _read_old_index(target) if INDEX_NAME in names else None
        same_index = old_raw == raw
        old_files: set[str] = set()
        if old_raw is not None and not same_index:
            if not overwrite:
                raise StoreExistsError(
                    f"{target.location!r} holds another store (its {INDEX_NAME} differs from the source's: "
                    f"{_digest_text(old_raw)}, source {_digest_text(raw)}); pass overwrite=True (`tspt cp "
                    "--overwrite`) to replace it"
                )
            old_files = _old_store_files(old_raw, target.location)
        elif old_raw is None and not overwrite:
            strangers = [n for n in names if n not in wanted and not _is_temp_of(n, wanted)]
            if strangers:
                raise StoreExistsError(
                    f"{target.location!r} is not empty and is not a partial copy of {source.location!r} "
                    f"({len(strangers)} other file(s), e.g. {strangers[0]!r}); expected a new or empty directory, "
                    "or pass overwrite=True"
                )
        if lock.supported:  # the lock excludes every writer: temporary files of our names are stale
            for n in names:
                if _is_temp_of(n, wanted):
                    target.remove(n)
        present = target.sizes()  # one listing: regular files and their sizes
        odd = sorted(n for n in names if n in wanted and n not in present)
        if odd:  # a directory (prefix), FIFO... under a name the copy must write: never ours to delete
            raise NotARegularFileError(
                f"{target.location!r}: {odd[0]!r} (one of the copy's file names) is not a regular file; expected a "
                f"regular file or nothing there ({len(odd)} such name(s)); remove it and copy again. Nothing was changed"
            )
        stop = threading.Event()
        bar = _Progress(progress, sum(f.size for f in files))
        try:
            to_check = [f for f in files if present.get(f.name) == f.size]
            ok = _run_parallel(
                [lambda f=f: _digest_of(target, f, chunk_bytes, stop, bar) for f in to_check], workers, stop
            )
            skipped = {f.name for f, good in zip(to_check, ok) if good}
            to_copy = [f for f in files if f.name not in skipped]
            bar.grow(sum(f.size for f in to_check if f.name not in skipped))
            # A file of the old store that the copy replaces waits under a temporary name until
            # every file has arrived and verified: a copy that fails leaves the old store whole.
            staged = {
                f.name: f".{f.name}{TEMP_MARKER}cp-{token}"
                for f in to_copy
                if old_raw is not None and not same_index and f.name in old_files
            }
            refetched = _run_parallel(
                [lambda f=f: _copy_one(source, target, f, chunk_bytes, stop, bar, staged.get(f.name)) for f in to_copy],
                workers,
                stop,
            )
        finally:
            bar.close()
        if verify:
            report = verify_store(_WithIndex(target, raw, staged))
            if not report.ok:
                first = report.problems[0]
                raise CorruptStoreError(
                    f"copy at {target.location!r} failed verification ({len(report.problems)} problem(s); first: "
                    f"{first.message}); nothing was committed. The source likely has the same damage (`tspt verify` "
                    "it); verify=False (`tspt cp --no-verify`) copies it as it is"
                )
        if staged:
            # The old store stops being one now: its index goes first, then its files are replaced.
            _check_unchanged(target, old_raw)
            target.remove(INDEX_NAME)
            old_raw = None
            for name, temp in staged.items():
                target.remove(name)
                target.move(temp, name)
        index_written = _commit(target, raw, old_raw, same_index)
        committed = True
        removed = _remove_old(target, old_files - wanted) if old_files else ()
    finally:
        if lock is not None:
            lock.release()
        if created and not committed:
            target.remove_container()
    copied = [f for f in files if f.name not in skipped]
    return CopyReport(
        source=source.location,
        destination=target.location,
        records=index.records,
        shards=len(index.shards),
        shards_copied=sum(1 for f in copied if f.shard),
        shards_skipped=sum(1 for f in files if f.shard and f.name in skipped),
        files_copied=len(copied),
        files_skipped=len(skipped),
        bytes_copied=sum(f.size for f in copied),
        bytes_skipped=sum(f.size for f in files if f.name in skipped),
        refetched=sum(1 for r in refetched if r),
        seconds=time.perf_counter() - start,
        index_checksum=_digest_text(raw),
        index_written=index_written,
        verified=verify,
        removed=removed,
    )


def _digest_text(raw: bytes) -> str:
    from .checksums import digest_int

    return format_digest(digest_int(raw))


def _read_old_index(target: Storage) -> bytes | None:
    """The destination's ``index.json`` bytes; a directory or oversized file counts as another
    store's index (b"" stands for one that cannot be read as bytes)."""
    try:
        return target.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES)
    except FileNotFoundError:
        return None
    except (ValueError, NotARegularFileError):
        return b""


def _old_store_files(old_raw: bytes, location: str) -> set[str]:
    """Names of the files a replaced store's index names (none if it does not parse)."""
    try:
        old = parse_index(old_raw, f"store {location!r}: {INDEX_NAME}")
        return {f.name for f in _files_of(old, location)}
    except (ValueError, TypeError):
        return set()


def _commit(target: Storage, raw: bytes, old_raw: bytes | None, same_index: bool) -> bool:
    """Write ``index.json`` (``raw``) unless it is there already; return whether it was written.

    The write is conditional: exclusive where there was no index (S3 ``If-None-Match``), and
    where one is replaced, only if it is still the version compared here (S3 ``If-Match``);
    backends without conditional writes keep the compare-before-commit window of one request."""
    current, version = _current_index(target)
    if same_index and current == raw:
        return False
    if current != (None if same_index else old_raw):
        raise _changed(target)
    try:
        with target.writer(INDEX_NAME, exclusive=current is None, **if_match_kwargs(version)) as out:
            out.write(raw)
    except FileExistsError as exc:
        raise ConcurrentWriteError(
            f"another writer committed {INDEX_NAME} at {target.location!r} during the copy; nothing was committed"
        ) from exc
    return True


def _check_unchanged(target: Storage, old_raw: bytes | None) -> None:
    """Refuse to replace the destination's files if its ``index.json`` is no longer ``old_raw``
    (another writer committed during the copy, where the backend has no lock).

    Raises:
        ConcurrentWriteError: The index changed.
    """
    if _current_index(target)[0] != old_raw:
        raise _changed(target)


def _current_index(target: Storage) -> tuple[bytes | None, Any]:
    """The destination's ``index.json`` now and its version (for ``If-Match``): None if there
    is none, ``b""`` if it is not a readable file (a directory, too large)."""
    try:
        return target.read_versioned(INDEX_NAME, MAX_INDEX_BYTES)
    except FileNotFoundError:
        return None, None
    except (ValueError, NotARegularFileError):
        return b"", None


def _changed(target: Storage) -> ConcurrentWriteError:
    return ConcurrentWriteError(
        f"{INDEX_NAME} of {target.location!r} was changed by another writer during the copy; nothing was "
        "committed (one writer at a time per store)"
    )


def _remove_old(target: Storage, names: set[str]) -> tuple[str, ...]:
    """Remove a replaced store's files (after the commit); a failure is a warning."""
    import warnings

    failed = target.remove_all(sorted(names))
    removed = [name for name in sorted(names) if name not in failed]
    left = removal_failures(failed)
    if left:
        warnings.warn(
            f"store {target.location!r}: the copy is committed, but files of the replaced store could not be "
            f"removed: {left}; they are unreferenced (`tspt recover` quarantines them)",
            UserWarning,
            stacklevel=3,
        )
    return tuple(removed)
