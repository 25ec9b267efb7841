"""The storage seam: every byte tensorstore_pt reads or writes goes through a :class:`Storage`.

A store lives in one flat namespace of files (``index.json`` and shards). The seam is kept
small on purpose, so that a remote backend (fsspec URLs, S3) can implement it later:

- ``list()``, ``size(name)``: what is there;
- ``open(name).read_range(offset, length)``: positional reads of a half-open byte range;
- ``writer(name)`` -> :class:`AtomicWriter`: write under a temporary name, then ``commit()``
  publishes it atomically (rename on a file system, a single PUT on an object store);
- ``remove(name)``, ``move(name, new_name)``: clean-up and quarantine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

__all__ = ["AtomicWriter", "ReadHandle", "Storage"]


class ReadHandle(ABC):
    """An open file for positional reads. Thread-safe: reads carry their own offset."""

    @abstractmethod
    def read_range(self, offset: int, length: int) -> bytes:
        """Read bytes ``[offset, offset + length)``; fewer only if the file is shorter."""

    @abstractmethod
    def close(self) -> None: ...


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

    def read_all(self, name: str) -> bytes:
        """Read a whole file."""
        handle = self.open(name)
        try:
            return handle.read_range(0, self.size(name))
        finally:
            handle.close()

    @abstractmethod
    def writer(self, name: str, *, exclusive: bool = False) -> AtomicWriter:
        """Start writing ``name`` atomically.

        With ``exclusive=True`` the commit fails with ``FileExistsError`` (and publishes
        nothing) if ``name`` already exists, so two writers never clobber each other's files;
        otherwise the commit replaces any existing file.
        """

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete a file; a missing file is not an error."""

    @abstractmethod
    def move(self, name: str, new_name: str) -> None:
        """Rename a file within the location (for quarantine); never overwrites ``new_name``."""

    @abstractmethod
    def remove_container(self) -> None:
        """Remove the location if it is empty (used to undo a failed create)."""
