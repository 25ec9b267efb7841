"""A lock that a forked child gets afresh: for code that rebuilds per-process state in a child.

A ``threading.Lock`` held by one of the parent's threads at a ``fork`` stays held in the child,
where that thread does not exist. :class:`ChildLock` is replaced by a new, free lock in every
child (``os.register_at_fork``), so a child's threads can serialise their one-time rebuild of
state inherited from the parent (a file system client, a reader's handles) on it.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ChildLock"]


class ChildLock:
    """A mutex (``with lock:``), free again in every forked child.

    Thread safety: as ``threading.Lock`` within a process. Fork safety: the point of it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> ChildLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
