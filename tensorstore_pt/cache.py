"""A node-local shard cache for streaming remote stores, with bounded background prefetch.

:class:`ShardCache` is one directory on a node's local disk, shared by every process that
streams through it (DataLoader workers, ranks, several jobs). :class:`CachedStorage` is a
read-only :class:`~tensorstore_pt.storage.Storage` over a remote store whose shard reads are
served from that cache, with the next ``prefetch_shards`` shards a consumer will read
downloaded ahead of it in daemon threads. docs/remote.md ("Node-local shard cache") is the
user's guide; what follows is the contract.

Layout of ``cache_dir``::

    .tspt-cache.lock                        accounting lock (flock; held for a scan + reservation)
    <store id>/                             16 hex digits: a hash of the store's backend and URL
        <checksum>-<file_bytes>-<shard>     a published shard (checksum: its xxh3_64, 16 hex)
        <checksum>-<file_bytes>-<shard>.lock    the shard's download lock (flock), last use, check record
        .<checksum>-<file_bytes>-<shard>.tmp-<pid>-<random>   a download in progress

A cached file is keyed by the store's identity *and* the shard's content (its whole-file
checksum and size from the index): a store replaced at the same URL has new checksums, so it
never meets the old version's files (they age out by LRU). No lock or file name is keyed on
the store path alone.

Guarantees:

- **Once per node.** A missing shard is downloaded by one process at a time: the first takes
  ``flock(LOCK_EX)`` on the shard's lock file, the others wait for it (polling, so a closing
  consumer stops waiting) and then use its file. The kernel drops the lock of a process that
  dies, however it dies, so a dead downloader never blocks the others: the next one downloads.
- **Atomic publish.** A download streams into a temporary file in the store's cache directory
  (8 MiB per request, hashed as it arrives), is checked against the
  index's size and xxh3_64 checksum, and only then renamed to its final name. No process
  ever opens a partial file under a final name. A shard whose bytes fail the check is fetched
  once more; a second failure raises :class:`~tensorstore_pt.errors.ChecksumMismatchError`
  naming the shard, the expected and the found digest.
- **Only regular files.** A cached file or lock is opened with ``O_NOFOLLOW | O_NONBLOCK``:
  a symbolic link, FIFO, socket or device planted at one of the cache's names is never
  followed or waited on; the name is removed and the shard downloaded again. A directory
  holding files there raises :class:`~tensorstore_pt.errors.InvalidOptionError` naming it.
- **Checked before use.** Each process checks a cached file's size and whole-file checksum
  the first time it pins it (a sequential local read, off the training loop when the shard
  is prefetched), unless it was forked from a process that had checked it (or downloaded
  it), or the shard's check record vouches for it: after a check, a process writes the
  file's (inode, size, mtime, ctime) and the index checksum into the shard's lock file, and
  a process that later finds the file with the same four values skips the whole-file read.
  A cached file is never written to after its publish (pins touch the lock file, not the
  shard), and any write changes its ctime, which no user can set back; a record is written
  only when the file's ctime is at least ``_SETTLED_NS`` in the past, so a write in the same
  clock tick as the check cannot go unseen. A record absent, torn or of another file means a
  full check. (DataLoader workers start afresh each epoch: without the record each would
  read every shard it pins once per epoch.) A file that fails is deleted and downloaded
  again. Afterwards every record
  read from it still has its frame checksum checked, as for any store.
- **Pins.** A reader holds ``flock(LOCK_SH)`` on every cached file it uses. Eviction takes
  ``LOCK_EX | LOCK_NB`` and skips a file it cannot lock, so no file is deleted under a reader.
- **LRU eviction.** With ``limit_bytes``, before each download the cache (every store under
  ``cache_dir``) is brought down to ``limit_bytes`` minus the new shard by deleting the least
  recently used unpinned shards (a shard's last use is its lock file's mtime, touched on each
  pin). Downloads in progress
  reserve their full size (``posix_fallocate``) and count. If pinned files and downloads in
  progress alone exceed the limit, the download goes ahead (over-commit, logged once per
  process): disk use stays at most ``max(limit_bytes, pinned + downloading)``, and a consumer
  pins at most ``prefetch_shards + 1`` shards, so on a node with ``C`` consumers the peak is at
  most ``max(limit_bytes, C * (prefetch_shards + 1) * largest shard)``. (Without a limit a
  consumer also keeps up to :data:`RESTING_PINS` pins of shards it moved on from.)

Memory: a download holds one 8 MiB chunk; a consumer at most ``prefetch_shards`` downloads at
once. Nothing is held per record.

Requirements: ``cache_dir`` on a local file system with ``flock(2)`` (not NFS).
"""

from __future__ import annotations

import atexit
import collections
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from .checksums import ALGORITHM, FileHasher, digest_int
from .errors import (
    ChecksumMismatchError,
    InvalidOptionError,
    MissingShardError,
    ShardSizeError,
    StorageFullError,
    StoreChangedError,
    TensorStoreError,
)
from .format import INDEX_NAME, MAX_INDEX_BYTES
from .storage import AtomicWriter, LocalStorage, ReadHandle, Storage
from .storage.abc import FULL_ERRNOS

__all__ = ["CachedStorage", "DEFAULT_PREFETCH_SHARDS", "ShardCache", "ShardKey", "default_cache_dir"]

logger = logging.getLogger("tensorstore_pt.cache")

#: Shards a consumer downloads ahead of the one it reads, by default.
DEFAULT_PREFETCH_SHARDS = 2
#: Downloads in flight at once when a loader warms the cache for its workers' first reads
#: (:meth:`CachedStorage.warm`).
WARM_THREADS = 8
#: Bytes read from the source per request while downloading a shard (the memory per download).
CHUNK_BYTES = 8 * 2**20
_LOCK_NAME = ".tspt-cache.lock"
_TMP = ".tmp-"
_POLL_S = 0.02
#: Upcoming visits a consumer looks ahead at most (when visits alternate between few shards).
_MAX_WINDOW_VISITS = 4096
#: Shards a consumer keeps pinned after it moves on from them, most recently left first, in a
#: cache without a limit (nothing is evicted to make room there, so a pin holds back no
#: download): a shuffled epoch comes back to the shards of its window many times, and each
#: return to an unpinned shard costs a pin (a hand-off to a download thread and the system
#: calls that check the file: about 0.1 ms). An open file each.
RESTING_PINS = 32


class ShardKey(NamedTuple):
    """What the cache needs to know about a shard: its name and, from the index, its size in
    bytes and whole-file xxh3_64 checksum (an int)."""

    name: str
    file_bytes: int
    checksum: int


class _Cancelled(Exception):
    """A download stopped because its consumer closed (internal)."""


def default_cache_dir() -> Path:
    """``$TSPT_CACHE_DIR`` if set, else ``<tempfile.gettempdir()>/tensorstore_pt-cache-<uid>``."""
    env = os.environ.get("TSPT_CACHE_DIR")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"tensorstore_pt-cache-{uid}"


def store_identity(storage: Storage) -> str:
    """The string a store's cache directory is named after: its backend and location (a local
    path made absolute; a URL as the backend spells it, with its ``endpoint_url`` if any)."""
    if isinstance(storage, LocalStorage):
        return f"local:{os.path.realpath(storage.root)}"
    ident = getattr(storage, "cache_identity", None)
    if isinstance(ident, str):
        return ident
    ident = f"{type(storage).__module__}.{type(storage).__qualname__}:{storage.location}"
    options = getattr(storage, "storage_options", None)
    endpoint = options.get("endpoint_url") if isinstance(options, dict) else None
    return f"{ident} endpoint={endpoint}" if endpoint else ident  # the same bucket name on another server


def _flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    return True


#: Opening a name in the cache never follows a link and never waits on a FIFO.
_RDONLY_SAFE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


def _open_cloexec(path: Path | str, flags: int, mode: int = 0o644) -> int:
    return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)


#: The descriptors of this process's exclusive cache locks (the accounting lock, a shard's
#: download lock) while held. A child made by ``fork`` inherits them, and a lock stays held
#: while any descriptor of it is open: the child closes its copies at once (they belong to
#: threads of the parent, which do not run in the child), or a download lock held by the
#: parent at the fork would never be released while the child lives.
_LOCKS_HELD: set[int] = set()


def _hold(fd: int) -> int:
    _LOCKS_HELD.add(fd)
    return fd


def _unhold(fd: int) -> None:
    """Close a descriptor taken with :func:`_hold` (releasing its lock)."""
    _LOCKS_HELD.discard(fd)
    os.close(fd)


def _drop_inherited_locks() -> None:
    fds = list(_LOCKS_HELD)
    _LOCKS_HELD.clear()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


os.register_at_fork(after_in_child=_drop_inherited_locks)


class _Released(ValueError):
    """A read on a :class:`CachedShard` that was already unpinned (internal; the proxy re-pins)."""


class CachedShard(ReadHandle):
    """A cached shard file, pinned (``flock(LOCK_SH)``) until :meth:`close`.

    Thread-safe reads (``os.pread``); :meth:`close` waits for no one: a read in progress keeps
    the file open until it ends. Belongs to the process that opened it.
    """

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self._fd = fd
        self.path = path
        self._size = size
        self._mutex = threading.Lock()
        self._users = 0
        self._closing = False

    def read_range(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._mutex:
            if self._fd < 0 or self._closing:
                raise _Released(f"cached shard {str(self.path)!r} was released (unpinned)")
            self._users += 1
            fd = self._fd
        try:
            parts = []
            got = 0
            while got < length:
                data = os.pread(fd, length - got, offset + got)
                if not data:
                    break
                parts.append(data)
                got += len(data)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            with self._mutex:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                self._close_fd()

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        """Unpin: close the file (the kernel drops the shared lock), after reads in progress."""
        with self._mutex:
            self._closing = True
            if self._users:
                return
        self._close_fd()

    def _close_fd(self) -> None:
        with self._mutex:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._fd >= 0:
                os.close(self._fd)
        except (OSError, AttributeError):
            pass


class ShardCache:
    """A node-local cache directory of verified shard files, shared by processes and jobs.

    Args:
        cache_dir: The directory (created if needed); default :func:`default_cache_dir`.
            Must be on a local file system that supports ``flock(2)``.
        limit_bytes: Bytes of shards the directory may hold (every store in it together);
            ``None``: no limit (a full disk raises :class:`~tensorstore_pt.errors.StorageFullError`).
            See the module docstring for the over-commit rule when pins exceed it.

    Attributes:
        fetched_bytes: Bytes this process downloaded from sources (counter).
        downloads: Shards this process downloaded and published.
        hits: Pins this process served from files already in the cache.
        refetches: Downloads repeated after a checksum mismatch in transit, plus cached files
            that failed their check and were deleted.

    Raises:
        InvalidOptionError: ``limit_bytes`` is not a positive int or None, or ``cache_dir``
            cannot be created, written or locked in (its accounting lock file is tried here).

    Thread safety: every method may be called from many threads. Fork/spawn safety: pickles
    to ``(cache_dir, limit_bytes)``; counters and the memo of checked files are per process.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and (
            isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 1
        ):
            raise InvalidOptionError(
                f"cache_limit_bytes: expected a positive int (bytes) or None, found {limit_bytes!r}"
            )
        if cache_dir is not None and (
            not isinstance(cache_dir, (str, os.PathLike))
            or not isinstance(os.fspath(cache_dir), str)
            or not str(cache_dir)
        ):
            # Path("") is the working directory: an empty setting must not fill it with shards
            raise InvalidOptionError(
                f"cache_dir: expected a non-empty local directory path or None, found {cache_dir!r}"
            )
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.limit_bytes = limit_bytes
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidOptionError(
                f"cache_dir: cannot create {str(self.cache_dir)!r} ({exc.strerror or exc}); expected a writable local directory"
            ) from exc
        _unhold(self._accounting())  # a directory we cannot write (or lock in) fails here, typed
        self._init_process()

    def _init_process(self) -> None:
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._checked: set[tuple[int, int]] = set()  # (st_dev, st_ino) of files checked in this process
        self._swept: set[str] = set()
        self._warned = False
        self.fetched_bytes = 0
        self.downloads = 0
        self.hits = 0
        self.refetches = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir, "limit_bytes": self.limit_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache_dir = state["cache_dir"]
        self.limit_bytes = state["limit_bytes"]
        self._init_process()

    def __repr__(self) -> str:
        return f"ShardCache({str(self.cache_dir)!r}, limit_bytes={self.limit_bytes})"

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():
            checked = self._checked
            self._init_process()
            # A forked child keeps the parent's checks: the same files, checked as this process
            # would have checked them (a DataLoader forks its workers afresh every epoch).
            self._checked = set(checked)

    # ------------------------------------------------------------------ layout

    def store_dir(self, storage: Storage) -> Path:
        """The directory of ``storage``'s shards in this cache (created on first use).

        Raises:
            InvalidOptionError: It cannot be created (another file holds its name, no permission).
        """
        ident = store_identity(storage)
        d = self.cache_dir / hashlib.sha256(ident.encode()).hexdigest()[:16]
        if not d.is_dir():
            try:
                d.mkdir(parents=True, exist_ok=True)
                info = d / "source.txt"
                if not info.exists():  # for people looking at the cache; never read back
                    tmp = d / f".source.txt.{os.getpid()}-{secrets.token_hex(4)}"  # no _TMP: never swept
                    tmp.write_text(ident + "\n")
                    os.replace(tmp, info)
            except OSError as exc:
                raise self._unusable(d, exc, "a directory of the shard cache") from exc
        return d

    def _unusable(self, path: Path | str, exc: OSError, expected: str) -> InvalidOptionError | StorageFullError:
        if exc.errno in FULL_ERRNOS:
            return StorageFullError(
                exc.errno,
                f"shard cache {str(self.cache_dir)!r}: no space left on the device ({exc.strerror or exc}) while "
                f"creating {str(path)!r}; free space or set a smaller cache_limit_bytes",
            )
        return InvalidOptionError(
            f"cache_dir: cannot use {str(path)!r} ({exc.strerror or exc}); expected {expected} (cache_dir must be a "
            f"writable local directory, on a file system with flock(2), used only by the shard cache)"
        )

    @staticmethod
    def file_name(key: ShardKey) -> str:
        """``<checksum hex>-<file_bytes>-<name>``: the cached file's name."""
        return f"{key.checksum:016x}-{key.file_bytes}-{key.name}"

    # ------------------------------------------------------------------ accounting

    def _accounting(self) -> int:
        path = self.cache_dir / _LOCK_NAME
        try:
            fd = _open_cloexec(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise self._unusable(path, exc, "a regular lock file (or nothing)") from exc
        _hold(fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._unusable(path, OSError(errno.EINVAL, "not a regular file"), "a regular lock file")
            try:
                _flock(fd, fcntl.LOCK_EX)  # blocking: held only for a directory scan and a reservation
            except OSError as exc:
                raise self._unusable(path, exc, "a file system with flock(2)") from exc
        except BaseException:
            _unhold(fd)
            raise
        return fd

    def _scan(self) -> tuple[int, list[tuple[float, int, Path]]]:
        """(bytes in use, evictable candidates (mtime, size, path)); removes orphaned temp files.
        Call with the accounting lock held."""
        used = 0
        finals: list[tuple[float, int, Path]] = []
        used_at: dict[str, float] = {}
        for sub in os.scandir(self.cache_dir):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(sub.path):
                name = e.name
                if name.endswith(".lock"):
                    try:
                        used_at[name[: -len(".lock")]] = e.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        pass
                    continue
                if "source.txt" in name or not e.is_file(follow_symlinks=False):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if _TMP in name:
                    if self._orphan(e.path):
                        continue
                    used += st.st_size
                    continue
                used += st.st_size
                finals.append((st.st_mtime, st.st_size, Path(e.path)))
        # last use: the lock file's mtime (touched on each pin), else the shard's (its publish)
        finals = [(max(t, used_at.get(p.name, t)), size, p) for t, size, p in finals]
        return used, finals

    @staticmethod
    def _orphan(path: str) -> bool:
        """Remove a temporary file whose writer is gone (no flock on it); True if removed."""
        try:
            fd = _open_cloexec(path, _RDONLY_SAFE)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # a link or a directory named like a temporary file: left alone
        try:
            if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return True
        finally:
            os.close(fd)

    def _evict_one(self, path: Path) -> bool:
        try:
            fd = _open_cloexec(path, _RDONLY_SAFE)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # replaced by a link meanwhile: not evictable
        try:
            if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False  # pinned by a reader
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
        lock = _lock_path(path)
        try:
            lfd = _open_cloexec(lock, _RDONLY_SAFE)
        except OSError:
            return True  # absent, or not a lock file of ours: the shard itself is gone
        try:
            if _flock(lfd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                try:
                    os.unlink(lock)
                except FileNotFoundError:
                    pass
        finally:
            os.close(lfd)
        return True

    def usage_bytes(self) -> int:
        """Bytes of shard files under ``cache_dir`` now: published ones and downloads in
        progress (at their full reserved size); lock files and orphans not counted."""
        fd = self._accounting()
        try:
            return self._scan()[0]
        finally:
            _unhold(fd)

    def evict(self, target_bytes: int = 0) -> int:
        """Delete least-recently-used unpinned shards until at most ``target_bytes`` are in use.

        Returns:
            Bytes in use afterwards (more than ``target_bytes`` when pinned files or downloads
            in progress hold the rest).
        """
        fd = self._accounting()
        try:
            return self._evict_locked(target_bytes)
        finally:
            _unhold(fd)

    def _evict_locked(self, target_bytes: int) -> int:
        used, finals = self._scan()
        if used <= target_bytes:
            return used
        finals.sort(key=lambda t: t[0])
        for _, size, path in finals:
            if used <= target_bytes:
                break
            if self._evict_one(path):
                used -= size
        return used

    def _reserve(self, store_dir: Path, key: ShardKey) -> tuple[int, Path]:
        """Make room (LRU) and create the locked, preallocated temporary file of a download."""
        tmp = store_dir / f".{self.file_name(key)}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
        lock = self._accounting()
        try:
            if self.limit_bytes is not None:
                used = self._evict_locked(max(0, self.limit_bytes - key.file_bytes))
                if used + key.file_bytes > self.limit_bytes and not self._warned:
                    self._warned = True
                    logger.warning(
                        "shard cache %r: %d bytes are pinned or being downloaded, so shard %r (%d bytes) goes past "
                        "cache_limit_bytes=%d (over-commit; raise the limit or lower prefetch_shards)",
                        str(self.cache_dir),
                        used,
                        key.name,
                        key.file_bytes,
                        self.limit_bytes,
                    )
            try:
                fd = _open_cloexec(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                if exc.errno in FULL_ERRNOS:
                    raise self._full(exc, key) from exc
                raise
            _flock(fd, fcntl.LOCK_EX)  # marks it live; a scanner removes temp files nobody locks
            try:
                if key.file_bytes:
                    try:
                        os.posix_fallocate(fd, 0, key.file_bytes)
                    except OSError as exc:
                        if exc.errno in FULL_ERRNOS:
                            raise self._full(exc, key) from exc
                        os.ftruncate(fd, key.file_bytes)  # no fallocate here: still counts its size
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            return fd, tmp
        finally:
            _unhold(lock)

    def _full(self, exc: OSError, key: ShardKey) -> StorageFullError:
        return StorageFullError(
            exc.errno,
            f"shard cache {str(self.cache_dir)!r}: no space left on the device ({exc.strerror or exc}) while "
            f"caching shard {key.name!r} ({key.file_bytes} bytes); free space or set a smaller cache_limit_bytes",
        )

    # ------------------------------------------------------------------ pin / download

    def acquire(self, source: Storage, key: ShardKey, *, cancel: threading.Event | None = None) -> CachedShard:
        """Pin ``key``'s shard of ``source`` in the cache, downloading and publishing it first if
        it is not there (or not good).

        Args:
            source: The store the shard belongs to.
            key: The shard's name, size and checksum from the store's index.
            cancel: If set while waiting or downloading, stop (internal use by consumers).

        Returns:
            A pinned :class:`CachedShard`; :meth:`CachedShard.close` unpins it.

        Raises:
            MissingShardError: The source has no file of that name.
            ShardSizeError: The source's file has another size than the index says.
            ChecksumMismatchError: The downloaded bytes failed the index's checksum twice.
            StorageFullError: The cache's file system is full.
            InvalidOptionError: The cache's own name for the shard (or its lock) holds a
                directory with files in it, or the cache directory cannot be written. A link,
                FIFO, socket or empty directory there is removed (the name only) and replaced.
            RemoteStorageError, OSError: As the source raises them past its retries.
        """
        self._ensure_process()
        store_dir = self.store_dir(source)
        sid = store_dir.name
        if sid not in self._swept:
            self._swept.add(sid)
            lock = self._accounting()  # temp files of dead downloaders from earlier runs
            try:
                for e in os.scandir(store_dir):
                    if _TMP in e.name:
                        self._orphan(e.path)
            finally:
                _unhold(lock)
        final = store_dir / self.file_name(key)
        while True:
            pinned = self._pin(final, key)
            if pinned is not None:
                with self._mutex:
                    self.hits += 1
                return pinned
            lock_fd = self._shard_lock(final, cancel)
            try:
                pinned = self._pin(final, key)
                if pinned is not None:
                    with self._mutex:
                        self.hits += 1
                    return pinned
                return self._download(source, store_dir, final, key, cancel)
            finally:
                _unhold(lock_fd)

    def _shard_lock(self, final: Path, cancel: threading.Event | None) -> int:
        """Take the shard's download lock (polling, so ``cancel`` is honoured)."""
        path = _lock_path(final)
        while True:
            try:
                fd = _open_cloexec(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR) and _remove_foreign(
                    path, "a symbolic link" if exc.errno == errno.ELOOP else "a directory"
                ):
                    continue
                raise self._unusable(path, exc, "a shard's lock file (a regular file, or nothing)") from exc
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                if _remove_foreign(path, "not a regular file"):
                    continue
                raise self._unusable(path, OSError(errno.EISDIR, "a directory"), "a shard's lock file")
            _hold(fd)
            while not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                if cancel is not None and cancel.is_set():
                    _unhold(fd)
                    raise _Cancelled()
                time.sleep(_POLL_S)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False  # evicted with its shard meanwhile: lock the new one
            if same:
                return fd
            _unhold(fd)

    def _pin(self, final: Path, key: ShardKey) -> CachedShard | None:
        """Open, share-lock and check the cached file; None if absent (or deleted as bad).

        Only a regular file is ever used: a symbolic link, FIFO, socket or device at the name is
        removed (the name alone; nothing it points to) and the shard downloaded again; a
        non-empty directory raises InvalidOptionError (it is not the cache's to delete)."""
        try:
            # O_NOFOLLOW: a link is never followed; O_NONBLOCK: opening a FIFO never hangs.
            fd = _open_cloexec(final, _RDONLY_SAFE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP and _remove_foreign(final, "a symbolic link"):
                return None
            raise self._unusable(final, exc, "a cached shard file (a regular file, or nothing)") from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
                fd = -1
                if _remove_foreign(final, "a directory" if stat.S_ISDIR(mode) else "not a regular file"):
                    return None
                raise self._unusable(
                    final, OSError(errno.EISDIR, "a directory with files in it"), "a cached shard file (or nothing)"
                )
            _flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # evicted between open and lock
                os.close(fd)
                return None
            ident = (st.st_dev, st.st_ino)
            with self._mutex:
                checked = ident in self._checked and st.st_size == key.file_bytes  # resized since: again
            record: bytes | None = None
            if not checked and st.st_size == key.file_bytes and _read_check(final) == _check_record(st, key):
                checked = True  # checked by another process, and not written to since
                with self._mutex:
                    self._checked.add(ident)
            if not checked:
                found = _digest_fd(fd, st.st_size)
                if st.st_size != key.file_bytes or found != key.checksum:
                    logger.warning(
                        "shard cache %r: cached %r is %d bytes with %s %016x, expected %d bytes with %016x; "
                        "deleting it and downloading it again",
                        str(final.parent),
                        key.name,
                        st.st_size,
                        ALGORITHM,
                        found,
                        key.file_bytes,
                        key.checksum,
                    )
                    try:
                        if os.stat(final).st_ino == st.st_ino:
                            os.unlink(final)
                    except FileNotFoundError:
                        pass
                    os.close(fd)
                    with self._mutex:
                        self.refetches += 1
                    return None
                with self._mutex:
                    self._checked.add(ident)
                if time.time_ns() - st.st_ctime_ns >= _SETTLED_NS:
                    record = _check_record(st, key)  # checked here and now: vouch for it
            _touch(final, record)  # LRU: the lock file's mtime is the last use
            return CachedShard(fd, final, st.st_size)
        except BaseException:
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass
            raise

    def discard(self, shard: CachedShard) -> None:
        """Forget that ``shard``'s file was checked and delete it from the cache (if it is still
        the file under that name): it was found damaged after its check. Readers that have it
        open keep their open file; the next pin downloads the shard again."""
        self._ensure_process()
        try:
            st = os.fstat(shard._fd)
        except OSError:
            return
        with self._mutex:
            self._checked.discard((st.st_dev, st.st_ino))
            self.refetches += 1
        logger.warning("shard cache: cached file %r changed after it was checked; deleting it", str(shard.path))
        try:
            if os.lstat(shard.path).st_ino == st.st_ino:
                os.unlink(shard.path)
        except FileNotFoundError:
            pass

    def _download(
        self, source: Storage, store_dir: Path, final: Path, key: ShardKey, cancel: threading.Event | None
    ) -> CachedShard:
        where = f"store {source.location!r}, shard {key.name!r}"
        found = 0
        for attempt in (1, 2):
            fd, tmp = self._reserve(store_dir, key)
            try:
                found = self._copy(source, key, fd, where, cancel)
                if found == key.checksum:
                    # Publish: one atomic rename, under the shard's download lock (no other
                    # downloader) and the accounting lock (a usage scan never counts it twice).
                    acct = self._accounting()
                    try:
                        os.rename(tmp, final)
                    finally:
                        _unhold(acct)
                    st = os.fstat(fd)
                    with self._mutex:
                        self._checked.add((st.st_dev, st.st_ino))
                        self.downloads += 1
                    _flock(fd, fcntl.LOCK_SH)  # from the writer's exclusive lock to a reader's pin
                    return CachedShard(fd, final, key.file_bytes)
            except BaseException:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            os.close(fd)
            os.unlink(tmp)
            with self._mutex:
                self.refetches += 1
            logger.warning(
                "%s: downloaded bytes give %s %016x, the index says %016x (attempt %d of 2)",
                where,
                ALGORITHM,
                found,
                key.checksum,
                attempt,
            )
        raise ChecksumMismatchError(
            f"{where}: whole-file checksum mismatch ({ALGORITHM}) in transit, twice: index says "
            f"{key.checksum:016x}, the downloaded bytes give {found:016x}"
        )

    def _copy(self, source: Storage, key: ShardKey, fd: int, where: str, cancel: threading.Event | None) -> int:
        """Stream the shard from ``source`` into ``fd`` in CHUNK_BYTES reads; return its digest."""
        try:
            handle = source.open(key.name)
        except FileNotFoundError as exc:
            raise MissingShardError(f"{where}: the shard file is missing at the source ({exc})") from exc
        try:
            size = handle.size()
            if size != key.file_bytes:
                raise ShardSizeError(f"{where}: expected {key.file_bytes} bytes (index), the source has {size} bytes")
            h = FileHasher()
            off = 0
            while off < size:
                if cancel is not None and cancel.is_set():
                    raise _Cancelled()
                n = min(CHUNK_BYTES, size - off)
                data = handle.read_range(off, n)
                if len(data) != n:
                    raise ShardSizeError(
                        f"{where}: bytes [{off}, {off + n}) came back as {len(data)} bytes (truncated at the source)"
                    )
                h.update(data)
                view = memoryview(data)
                while view:
                    try:
                        w = os.pwrite(fd, view, off)
                    except OSError as exc:
                        if exc.errno in FULL_ERRNOS:
                            raise self._full(exc, key) from exc
                        raise
                    view = view[w:]
                    off += w
                with self._mutex:
                    self.fetched_bytes += n
            return h.intdigest()
        finally:
            handle.close()


def _remove_foreign(path: Path, what: str) -> bool:
    """Remove what sits at one of the cache's own names but is not a regular file (a link,
    FIFO, socket, device: the name only; an empty directory). False if it cannot be removed
    (a directory holding files), True if it is gone."""
    logger.warning("shard cache: %r is %s, expected a regular file; removing it", str(path), what)
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


#: A check record is written only for a file last changed at least this long ago (ns): well
#: past the coarse clock tick (a few ms) file times are taken from.
_SETTLED_NS = 1_000_000_000
#: Bytes of a check record (fixed: rewritten in place, it never leaves a longer one's tail).
_CHECK_BYTES = 128


def _check_record(st: os.stat_result, key: ShardKey) -> bytes:
    """The check record of a cached file as ``st`` finds it, checked against ``key``."""
    text = f"tspt-checked {key.checksum:016x} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"
    return text.encode("ascii").ljust(_CHECK_BYTES, b" ")


def _read_check(final: Path) -> bytes | None:
    """The check record in ``final``'s lock file, or None (absent, unreadable, not a file)."""
    try:
        fd = _open_cloexec(_lock_path(final), _RDONLY_SAFE)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.pread(fd, _CHECK_BYTES + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _touch(final: Path, record: bytes | None) -> None:
    """Mark ``final`` used now (its lock file's mtime) and write its check record if given.
    Best effort: a lock file that cannot be written only costs LRU order or a full check."""
    lock = _lock_path(final)
    if record is None:  # the common pin: one system call (never following a link)
        try:
            os.utime(lock, follow_symlinks=False)
            return
        except FileNotFoundError:
            pass  # no lock file yet: created below
        except OSError:
            return
    try:
        lfd = _open_cloexec(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(lfd).st_mode):
            if record is not None:
                os.pwrite(lfd, record, 0)
            os.utime(lfd)
    except OSError:
        pass
    finally:
        os.close(lfd)


def _lock_path(final: Path) -> Path:
    """A cached shard's lock file: its download lock, last use and check record."""
    return final.with_name(final.name + ".lock")


def _digest_fd(fd: int, size: int) -> int:
    h = FileHasher()
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK_BYTES, size - off), off)
        if not data:
            break
        h.update(data)
        off += len(data)
    return h.intdigest()


# --------------------------------------------------------------------------- consumer side

#: Warm-ups running (:meth:`CachedStorage.warm`): their thread and the event that cancels them.
_warmups: dict[threading.Thread, threading.Event] = {}
_warmups_lock = threading.Lock()
#: Seconds the interpreter's exit waits for cancelled warm-ups to stop (each finishes the read
#: in progress, then removes its temporary file); one still busy after that is left behind
#: (a daemon thread), and the next process to use the cache removes its temporary file.
_EXIT_WAIT_S = 2.0


def _stop_warmups() -> None:
    """At the interpreter's exit: cancel every warm-up and wait (bounded) for it to stop."""
    with _warmups_lock:
        running = list(_warmups.items())
    for _, cancel in running:
        cancel.set()
    deadline = time.monotonic() + _EXIT_WAIT_S
    for thread, _ in running:
        thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_warmups)  # runs at exit: the warm-up threads are daemons, which nothing joins


class _Feed:
    """One process's pins and background downloads for a :class:`CachedStorage`."""

    def __init__(self, owner: CachedStorage) -> None:
        self.owner = owner
        self.cond = threading.Condition()
        self.pinned: dict[str, CachedShard] = {}
        self.inflight: set[str] = set()
        self.errors: dict[str, BaseException] = {}
        self.current: str | None = None
        self.window: collections.deque[str] = collections.deque()
        self.plan: Iterator[str] | None = None
        self.tasks: collections.deque[str] = collections.deque()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        # Pins of shards the consumer moved on from, kept (a subset of ``pinned``, oldest first)
        # where the cache has no limit; see RESTING_PINS.
        self.resting: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.resting_max = RESTING_PINS if owner.cache.limit_bytes is None else 0

    # called with cond held
    def _wanted(self) -> set[str]:
        w = set(self.window)
        if self.current is not None:
            w.add(self.current)
        return w

    def _refill(self) -> None:
        o = self.owner
        ahead = {n for n in self.window if n != self.current}
        while self.plan is not None and len(ahead) < o.prefetch_shards and len(self.window) < _MAX_WINDOW_VISITS:
            try:
                n = next(self.plan)
            except StopIteration:
                self.plan = None
                break
            if (self.window and self.window[-1] == n) or (not self.window and n == self.current):
                continue
            self.window.append(n)
            if n != self.current:
                ahead.add(n)
        added = False
        for n in dict.fromkeys(self.window):
            if n != self.current and n not in self.pinned and n not in self.inflight and n not in self.errors:
                self.inflight.add(n)
                self.tasks.append(n)
                added = True
        while self.tasks and len(self.threads) < o.prefetch_shards:
            t = threading.Thread(target=self._work, name=f"tspt-cache-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        if added:
            # Wakes the download threads for the new tasks; nothing else waits on a refill.
            # (Waking them on every visit, when the shards are all pinned already, cost two
            # thread switches a read: 5 us of CPU and about 12 us of wall time.)
            self.cond.notify_all()

    def _unpin_unwanted(self) -> None:
        wanted = self._wanted()
        for n in wanted:
            self.resting.pop(n, None)
        for n in [n for n in self.pinned if n not in wanted and n not in self.resting]:
            if self.resting_max:
                self.resting[n] = None  # newest last
            else:
                self.pinned.pop(n).close()
        while len(self.resting) > self.resting_max:
            n, _ = self.resting.popitem(last=False)
            self.pinned.pop(n).close()
        for n in [n for n in self.errors if n not in wanted]:
            del self.errors[n]

    def _work(self) -> None:
        o = self.owner
        while True:
            with self.cond:
                while not self.tasks and not self.stop.is_set():
                    self.cond.wait(0.5)
                if self.stop.is_set():
                    return
                n = self.tasks.popleft()
                if n not in self._wanted():
                    self.inflight.discard(n)
                    continue
            try:
                h = o.cache.acquire(o.source, o.keys[n], cancel=self.stop)
            except _Cancelled:
                with self.cond:
                    self.inflight.discard(n)
                    self.cond.notify_all()
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer at its read
                with self.cond:
                    self.inflight.discard(n)
                    if n in self._wanted():
                        self.errors[n] = exc
                    self.cond.notify_all()
                continue
            with self.cond:
                self.inflight.discard(n)
                if n in self._wanted() and n not in self.pinned and not self.stop.is_set():
                    self.pinned[n] = h
                else:
                    h.close()
                self.cond.notify_all()

    def set_plan(self, visits: Iterable[str]) -> None:
        with self.cond:
            self.window.clear()
            self.current = None
            self.plan = iter(visits)
            self._refill()
            self._unpin_unwanted()

    def enter(self, name: str) -> CachedShard:
        o = self.owner
        with self.cond:
            h = self.pinned.get(name)
            if name != self.current or h is None:
                if name in self.window:
                    while self.window.popleft() != name:
                        pass
                self.current = name
                self._refill()
                self._unpin_unwanted()
            while True:
                h = self.pinned.get(name)
                if h is not None:
                    return h
                exc = self.errors.pop(name, None)
                if exc is not None:
                    raise exc
                if name not in self.inflight:
                    break
                self.cond.wait(0.5)
            self.inflight.add(name)
        try:
            h = o.cache.acquire(o.source, o.keys[name])
        finally:
            with self.cond:
                self.inflight.discard(name)
                self.cond.notify_all()
        with self.cond:
            old = self.pinned.get(name)
            if old is not None:
                h.close()
                return old
            self.pinned[name] = h
            return h

    def drop(self, name: str, h: CachedShard) -> None:
        """Unpin ``h`` (a damaged cached file): the next read of ``name`` pins it afresh."""
        with self.cond:
            if self.pinned.get(name) is h:
                del self.pinned[name]
                self.resting.pop(name, None)
        h.close()

    def close(self) -> None:
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
            pinned, self.pinned = self.pinned, {}
            self.resting.clear()
            self.window.clear()
            self.current = None
            self.plan = None
        for h in pinned.values():
            h.close()
        for t in self.threads:
            t.join(timeout=5)


class _ShardProxy(ReadHandle):
    """The handle :meth:`CachedStorage.open` gives for a shard: reads go to the pinned file."""

    def __init__(self, owner: CachedStorage, name: str) -> None:
        self.owner = owner
        self.name = name

    def read_range(self, offset: int, length: int) -> bytes:
        return self.owner._read(self.name, offset, length)

    def size(self) -> int:
        return self.owner._enter(self.name).size()

    def close(self) -> None:
        pass


class CachedStorage(Storage):
    """A read-only view of a store whose shard reads come from a node-local :class:`ShardCache`.

    ``index.json`` and other small files pass through to ``source``; a read from a shard pins
    the shard in the cache (downloading it once per node if needed) and reads the local file.
    :meth:`plan` tells it the order in which this consumer will visit shards: it then keeps the
    next ``prefetch_shards`` distinct shards downloaded and pinned ahead, in as many daemon
    threads, and unpins a shard as soon as the consumer moves to a shard that is not one of the
    upcoming ones (so after the last record it reads from it). A read off the plan is served
    too (downloaded at once): the plan only decides what is fetched early.

    Args:
        source: The store's storage (remote, or local when a cache is asked for anyway).
        cache: The node's :class:`ShardCache`.
        shards: Every shard of the store as a :class:`ShardKey` (``format.ShardEntry`` works).
        index_digest: xxh3_64 of the ``index.json`` the keys come from; a shard missing at the
            source is then reported as :class:`~tensorstore_pt.errors.StoreChangedError` when
            the source's index changed.
        prefetch_shards: Shards downloaded ahead of the one being read (>= 1; default 2).

    Pins per consumer: at most ``prefetch_shards + 1`` shards, plus up to
    :data:`RESTING_PINS` shards it moved on from where ``cache`` has no limit. Memory:
    ``prefetch_shards`` download chunks of 8 MiB; O(shards) for the keys.

    Thread safety: reads may come from any thread; plan and reads belong to one consumer at a
    time. Fork/spawn safety: pickles without threads or open files; each process starts its
    own pins and threads on first use.
    """

    def __init__(
        self,
        source: Storage,
        cache: ShardCache,
        shards: Iterable[Any],
        *,
        index_digest: int | None = None,
        prefetch_shards: int = DEFAULT_PREFETCH_SHARDS,
    ) -> None:
        if isinstance(prefetch_shards, bool) or not isinstance(prefetch_shards, int) or prefetch_shards < 1:
            raise InvalidOptionError(f"prefetch_shards: expected an int >= 1, found {prefetch_shards!r}")
        if not isinstance(source, Storage) or isinstance(source, CachedStorage):
            raise InvalidOptionError(f"source: expected a Storage, found {type(source).__name__}")
        self.source = source
        self.cache = cache
        self.keys = {s.name: ShardKey(s.name, int(s.file_bytes), int(s.checksum)) for s in shards}
        self.index_digest = index_digest
        self.prefetch_shards = prefetch_shards
        self.location = source.location
        self._feed: _Feed | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_feed"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"CachedStorage({self.location!r}, cache={self.cache!r}, prefetch_shards={self.prefetch_shards})"

    @property
    def cache_identity(self) -> str:
        return store_identity(self.source)

    def feed(self) -> _Feed:
        if self._feed is None or self._pid != os.getpid():
            self._feed = _Feed(self)  # a forked child: the parent's threads and pins are not ours
            self._pid = os.getpid()
        return self._feed

    # ------------------------------------------------------------------ consumer API

    def plan(self, visits: Iterable[str | int]) -> None:
        """Set the shards this consumer will read next, in order (names, or positions in the
        index's shard list), lazily consumed: start prefetching the first ``prefetch_shards``.
        Replaces any earlier plan; shards no longer upcoming are unpinned."""
        names = list(self.keys)

        def as_names() -> Iterator[str]:
            for v in visits:
                yield names[v] if isinstance(v, int) else v

        self.feed().set_plan(as_names())

    def warm(self, names: Sequence[str], width: int = WARM_THREADS) -> threading.Thread | None:
        """Download ``names`` into the cache in the background, ``width`` at a time, pinning none.

        For a process that is about to start others which will read these shards (a
        ``DataLoader`` and its workers): the downloads run while they start, so a worker
        finds its first shards on the node, or being downloaded (it then waits for that
        download, once per node as always), instead of first creating its own object-store
        client. Errors are left to the reads that need the shard (a worker raises its own).

        Args:
            names: Shard names of this store (unknown names are ignored).
            width: Downloads in flight at once (>= 1).

        Returns:
            The daemon thread running the downloads, or None if there was nothing to
            download. Join it before a ``fork`` if the child will read these shards soon:
            see fork safety.

        Memory: ``width`` download chunks of 8 MiB. Disk: the shards, as any read would.
        Exit: the downloads never hold up the interpreter's exit; it cancels them and waits
        at most 2 s for the reads in flight (a cancelled download removes its temporary file).
        Thread safety: safe. Fork safety: the downloads belong to this process. A child
        forked meanwhile closes its inherited copies of the download locks at once (so they
        are released when these downloads end) and waits on a shard's lock like any other
        reader; :meth:`StoreDataLoader.__iter__
        <tensorstore_pt.dataset.StoreDataLoader.__iter__>` still joins the downloads before
        ``fork`` workers start, so that they start with their first shards on the node.
        """
        todo = [self.keys[n] for n in dict.fromkeys(names) if n in self.keys]
        if not todo:
            return None
        source, cache = self.source, self.cache
        left = collections.deque(todo)
        cancel = threading.Event()  # set at the interpreter's exit (_stop_warmups)

        def one_by_one() -> None:
            while not cancel.is_set():
                try:
                    key = left.popleft()
                except IndexError:
                    return
                try:
                    cache.acquire(source, key, cancel=cancel).close()
                except Exception:  # noqa: BLE001 - the reader that needs this shard gets the error (_Cancelled: exit)
                    pass

        def run() -> None:
            # Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's
            # threads at exit after they ran every queued download, so a process that failed
            # or was interrupted while its loader started waited for all of them (for ever on
            # a source that stopped answering).
            workers = [
                threading.Thread(target=one_by_one, name=f"tspt-warm-{i}", daemon=True)
                for i in range(max(1, min(width, len(todo))))
            ]
            try:
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            finally:
                with _warmups_lock:
                    _warmups.pop(threading.current_thread(), None)

        thread = threading.Thread(target=run, name="tspt-warm", daemon=True)
        with _warmups_lock:
            _warmups[thread] = cancel
        thread.start()
        return thread

    def release(self) -> None:
        """Unpin every shard, stop the downloads of this process (end of an iteration)."""
        if self._feed is not None and self._pid == os.getpid():
            self._feed.close()
        self._feed = None

    def _enter(self, name: str) -> CachedShard:
        try:
            return self.feed().enter(name)
        except (MissingShardError, ShardSizeError, ChecksumMismatchError) as exc:
            # a shard gone, resized or rewritten at the source: damage, or a store replaced at
            # the same URL (even with the same shard names): the index decides which
            self._raise_if_changed(exc)
            raise

    def _read(self, name: str, offset: int, length: int) -> bytes:
        healed = False
        while True:
            try:
                h = self._enter(name)
                data = h.read_range(offset, length)
            except _Released:
                continue  # unpinned by this consumer's own move to another shard: pin it again
            if healed or len(data) >= max(0, min(length, self.keys[name].file_bytes - offset)):
                return data
            # The cached file shrank after this process checked it (truncated under the cache):
            # the store is fine, the local copy is not. Drop it and fetch the shard once more.
            healed = True
            self.cache.discard(h)
            self.feed().drop(name, h)

    def _raise_if_changed(self, cause: BaseException) -> None:
        if self.index_digest is None:
            return
        try:
            now: int | None = digest_int(self.source.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES))
        except (TensorStoreError, OSError, ValueError):
            now = None
        if now != self.index_digest:
            found = f"{ALGORITHM} {now:016x}" if now is not None else "no index"
            raise StoreChangedError(
                f"store {self.location!r} was replaced since it was opened ({INDEX_NAME} was {ALGORITHM} "
                f"{self.index_digest:016x}, now {found}); reopen it"
            ) from cause

    # ------------------------------------------------------------------ Storage

    def exists(self) -> bool:
        return self.source.exists()

    def is_container(self) -> bool:
        return self.source.is_container()

    def ensure(self) -> bool:
        raise InvalidOptionError(f"store {self.location!r}: a CachedStorage is read-only")

    def list(self) -> list[str]:
        return self.source.list()

    def size(self, name: str) -> int:
        key = self.keys.get(name)
        return key.file_bytes if key is not None else self.source.size(name)

    def open(self, name: str) -> ReadHandle:
        return _ShardProxy(self, name) if name in self.keys else self.source.open(name)

    def writer(self, name: str, *, exclusive: bool = False) -> AtomicWriter:
        raise InvalidOptionError(f"store {self.location!r}: a CachedStorage is read-only (cannot write {name!r})")

    def remove(self, name: str) -> None:
        raise InvalidOptionError(f"store {self.location!r}: a CachedStorage is read-only (cannot remove {name!r})")

    def move(self, name: str, new_name: str) -> None:
        raise InvalidOptionError(f"store {self.location!r}: a CachedStorage is read-only (cannot move {name!r})")

    def remove_container(self) -> None:
        raise InvalidOptionError(f"store {self.location!r}: a CachedStorage is read-only")
