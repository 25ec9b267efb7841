"""The storage seam: every byte tensorstore_pt reads or writes goes through a :class:`Storage`.

A store lives in one flat namespace of files (``index.json`` and shards). Two backends
implement the seam: :class:`~tensorstore_pt.storage.local.LocalStorage` (a directory) and
:class:`~tensorstore_pt.storage.remote.FsspecStorage` (an fsspec URL: ``s3://``, ``gs://``,
``memory://``, ``http(s)://`` read-only). ``storage_for(path, storage_options)`` picks one.

- ``list()``, ``sizes()``, ``size(name)``: what is there. ``list`` and ``sizes`` cost one
  listing request on an object store; ``size`` one request per file.
- ``open(name).read_range(offset, length)``: positional reads of a half-open byte range
  (one ranged GET each on an object store);
- ``read_versioned(name)``: a whole file and the version read (an S3 ETag), for a later
  conditional replace; None where the backend has no conditional writes;
- ``writer(name, exclusive=..., if_match=...)`` -> :class:`AtomicWriter`: write under a
  temporary name (or a local spool file), then ``commit()`` publishes it atomically (rename on
  a file system, a single PUT or a completed multipart upload on an object store);
  ``exclusive`` never replaces an existing file, ``if_match`` replaces only the version read;
- ``remove(name)``, ``move(name, new_name)``: clean-up and quarantine (copy + delete on an
  object store);
- ``lock(owner)`` -> :class:`StoreLock`: the one-writer-at-a-time lock (writers and
  ``recover`` take it; readers never do). Object stores have none (``supported`` False):
  writers then rely on the conditional commit of ``index.json``.
"""

from __future__ import annotations

import contextlib
import errno
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Iterable, Iterator

from ..errors import NotARegularFileError, StorageFullError

__all__ = [
    "AtomicWriter",
    "FULL_ERRNOS",
    "ReadHandle",
    "Storage",
    "StoreLock",
    "full_disk_error",
    "removal_failures",
    "typed_full_disk",
]

#: errno values that mean "no space left" (a full device, or an exhausted quota).
FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def full_disk_error(exc: OSError, location: str, name: str, what: str = "writing") -> StorageFullError:
    """The :class:`StorageFullError` for an ENOSPC/EDQUOT ``exc`` while ``what`` file ``name``
    (the final name, never a temporary one) of the store at ``location``."""
    return StorageFullError(
        exc.errno,
        f"store {location!r}: no space left on the device ({exc.strerror or exc}) while {what} {name!r}; "
        "free some space and write again (the previous store, if any, is unchanged)",
    )


def removal_failures(failed: dict[str, OSError]) -> list[str]:
    """``"name (error)"`` for each file :meth:`Storage.remove_all` could not remove (for messages)."""
    return [f"{name} ({exc.strerror or exc})" for name, exc in failed.items()]


@contextlib.contextmanager
def typed_full_disk(location: str, name: str, what: str = "writing") -> Iterator[None]:
    """Turn an ENOSPC/EDQUOT ``OSError`` raised inside the block (by any backend) into a
    :class:`StorageFullError` naming the store and ``name``."""
    try:
        yield
    except StorageFullError:
        raise
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise full_disk_error(exc, location, name, what) from exc
        raise


class ReadHandle(ABC):
    """An open file for positional reads. Thread-safe: reads carry their own offset."""

    @abstractmethod
    def read_range(self, offset: int, length: int) -> bytes:
        """Read bytes ``[offset, offset + length)``; fewer only if the file is shorter."""

    @abstractmethod
    def size(self) -> int:
        """Size in bytes of the open file (not of whatever the name points to now)."""

    @abstractmethod
    def close(self) -> None: ...


class StoreLock:
    """The store's writer lock, held from :meth:`Storage.lock` until :meth:`release`.

    Attributes:
        supported: False where the backend or file system has no locks; then nothing is
            excluded and writers fall back to comparing ``index.json`` before their commit.
        previous: The owner record a previous holder left when it died holding the lock
            (a dict with ``pid``, ``host``, ``token``, ``role``...), or None after a clean end.
    """

    supported = False
    previous: dict | None = None

    def update(self, owner: dict) -> None:
        """Replace the owner record kept with the lock (while holding it)."""

    def release(self) -> None:
        """Clear the owner record (a clean end) and unlock. Safe to call twice."""

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AtomicWriter(ABC):
    """A file being written; invisible under its final name until :meth:`commit`."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the file durable and publish it under its final name, replacing any old one."""

    @abstractmethod
    def abort(self) -> None:
        """Discard what was written. Safe to call twice or after commit (then a no-op)."""

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()


class Storage(ABC):
    """A flat namespace of files at one location (a directory, a bucket prefix)."""

    #: Human-readable location used in error messages.
    location: str
    #: True where nothing can be written (``http(s)://``): writers and ``recover`` refuse at once.
    read_only: bool = False
    #: Positional reads a bulk read (:meth:`StoreReader.read_many
    #: <tensorstore_pt.reader.StoreReader.read_many>`) keeps in flight at once: 1 (one after
    #: another) for storage that answers in microseconds, more where each read waits out a
    #: request's latency (an object store). Reads run in threads, so the storage's
    #: :meth:`ReadHandle.read_range` must be thread-safe where this is above 1.
    read_concurrency: int = 1

    @abstractmethod
    def exists(self) -> bool:
        """Whether the location itself exists."""

    @abstractmethod
    def is_container(self) -> bool:
        """Whether the location exists and can hold files (a directory, a prefix)."""

    @abstractmethod
    def ensure(self) -> bool:
        """Create the location if needed; return True if it was created by this call."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the entries at the location, sorted (a non-regular entry is listed too;
        :meth:`size` and :meth:`open` refuse it)."""

    @abstractmethod
    def size(self, name: str) -> int:
        """Size of a file in bytes.

        Raises:
            FileNotFoundError: The file is absent.
            NotARegularFileError: It is a directory, FIFO, device or socket.
        """

    @abstractmethod
    def open(self, name: str) -> ReadHandle:
        """Open a file for positional reads (never blocks on a FIFO).

        Raises:
            FileNotFoundError: The file is absent.
            NotARegularFileError: It is a directory, FIFO, device or socket.
        """

    def sizes(self) -> dict[str, int]:
        """Sizes in bytes of the regular files at the location: name -> bytes.

        Backends that list sizes in one request override this (an object store's ``ls``);
        this default asks :meth:`size` of each listed name and leaves out names that are
        absent by then or not regular files (:meth:`size` and :meth:`open` still refuse them).
        """
        out = {}
        for name in self.list():
            try:
                out[name] = self.size(name)
            except (FileNotFoundError, NotARegularFileError):
                continue
        return out

    def read_versioned(self, name: str, max_bytes: int | None = None) -> tuple[bytes, str | None]:
        """Read a whole file (as :meth:`read_all`) and the version read, to pass later as
        ``writer(name, if_match=version)``. This default returns version None (the backend has
        no conditional writes; its lock or the caller's compare-before-commit excludes writers)."""
        return self.read_all(name, max_bytes), None

    def read_all(self, name: str, max_bytes: int | None = None) -> bytes:
        """Read a whole file atomically: its size and bytes come from one open file, so a
        file renamed over ``name`` meanwhile is never read short.

        Args:
            name: The file.
            max_bytes: If given, a file larger than this raises ``ValueError`` before reading.

        Raises:
            FileNotFoundError, NotARegularFileError: As :meth:`open`.
            ValueError: The file is larger than ``max_bytes``.
        """
        handle = self.open(name)
        try:
            size = handle.size()
            if max_bytes is not None and size > max_bytes:
                raise ValueError(f"{name!r} is {size} bytes; expected at most {max_bytes}")
            data = handle.read_range(0, size)
            if len(data) != size:  # pragma: no cover - a file truncated while it was being read
                raise OSError(f"{name!r} shrank from {size} to {len(data)} bytes while it was read")
            return data
        finally:
            handle.close()

    @abstractmethod
    def writer(self, name: str, *, exclusive: bool = False, if_match: str | None = None) -> AtomicWriter:
        """Start writing ``name`` atomically.

        With ``exclusive=True`` the commit fails with ``FileExistsError`` (and publishes
        nothing) if ``name`` already exists, so two writers never clobber each other's files;
        otherwise the commit replaces any existing file. With ``if_match`` (a version from
        :meth:`read_versioned`), a backend with conditional writes commits only if ``name`` is
        still that version, else raises ``ConcurrentWriteError``; others ignore it.
        """

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete a file; a missing file is not an error."""

    def remove_all(self, names: Iterable[str]) -> dict[str, OSError]:
        """Remove every file of ``names`` (a missing one is not an error), going on past errors.

        Returns:
            The files that could not be removed, each with its error (empty when all went).
        """
        failed: dict[str, OSError] = {}
        for name in names:
            try:
                self.remove(name)
            except OSError as exc:
                failed[name] = exc
        return failed

    @abstractmethod
    def move(self, name: str, new_name: str) -> None:
        """Rename a file within the location (for quarantine); never overwrites ``new_name``."""

    @abstractmethod
    def remove_container(self) -> None:
        """Remove the location if it is empty (used to undo a failed create)."""

    def lock(self, owner: dict) -> StoreLock:
        """Take the store's exclusive writer lock at once, or raise.

        Args:
            owner: JSON-serialisable facts about the holder (``pid``, ``host``, ``token``,
                ``role``), kept with the lock so that others can name the holder, and so that
                ``recover`` can tell whose shards a holder that died left behind.

        Raises:
            StoreBusyError: Another writer or ``recover`` holds it.

        This default has no locks (``supported`` False): backends that can lock override it.
        """
        return StoreLock()
