"""Storage wrappers for measuring and fault tests: a :class:`Storage` that forwards every call
to another one, and a :class:`ReadHandle` that forwards to another handle.

A wrapper is not a :class:`~tensorstore_pt.storage.LocalStorage`, so the datasets treat it as
a remote store (shards cached on the node) whatever it wraps; it keeps as many reads in flight
as what it wraps (``read_concurrency``: one at a time over a local directory, unless a
subclass sets its own); subclasses override :meth:`ForwardingStorage.open` (or a
handle's :meth:`ForwardingHandle.read_range`) to count, delay or damage what is read.
Locks are not forwarded: a wrapper has the base class's no-lock default.
"""

from __future__ import annotations

from typing import Any

from tensorstore_pt.storage import ReadHandle, Storage

__all__ = ["ForwardingHandle", "ForwardingStorage"]


class ForwardingHandle(ReadHandle):
    """A read handle passing every call to ``inner``."""

    def __init__(self, inner: ReadHandle) -> None:
        self.inner = inner

    def read_range(self, offset: int, length: int) -> bytes:
        return self.inner.read_range(offset, length)

    def size(self) -> int:
        return self.inner.size()

    def close(self) -> None:
        self.inner.close()


class ForwardingStorage(Storage):
    """A storage passing every call to ``inner``; its ``location`` is ``location`` or
    ``wrapped+<inner location>``."""

    def __init__(self, inner: Storage, location: str | None = None) -> None:
        self.inner = inner
        self.location = location or f"wrapped+{inner.location}"

    @property
    def read_concurrency(self) -> int:  # type: ignore[override]
        """The wrapped storage's (a subclass may set its own as a class attribute)."""
        return self.inner.read_concurrency

    def exists(self) -> bool:
        return self.inner.exists()

    def is_container(self) -> bool:
        return self.inner.is_container()

    def ensure(self) -> bool:
        return self.inner.ensure()

    def list(self) -> list[str]:
        return self.inner.list()

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def open(self, name: str) -> ReadHandle:
        return self.inner.open(name)

    def writer(self, name: str, *, exclusive: bool = False, **kw: Any) -> Any:
        return self.inner.writer(name, exclusive=exclusive, **kw)

    def remove(self, name: str) -> None:
        self.inner.remove(name)

    def move(self, name: str, new_name: str) -> None:
        self.inner.move(name, new_name)

    def remove_container(self) -> None:
        self.inner.remove_container()
