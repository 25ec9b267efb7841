"""A bounded background thread that runs an iterator ahead of its consumer.

Used by :class:`~tensorstore_pt.dataset.StoreIterableDataset` to read, decompress and decode
records while the consumer (the DataLoader worker's collate and IPC, or the training loop)
handles the previous ones.

Guarantees:

- at most ``max_items`` produced items wait in the queue, plus the one the producer holds;
- an exception raised by the producer is re-raised in the consumer, with its traceback, at
  the point in the sequence where it happened (items produced before it are delivered first);
- :meth:`Prefetcher.close` (also run when the consuming generator is closed or collected)
  stops the thread within ``_POLL_S`` seconds of its current item; the thread is a daemon,
  so a process can always exit even if a producer blocks in a system call;
- at interpreter exit (``atexit``), every prefetcher still alive is closed, its thread joined
  for up to 1 s: a daemon thread still inside torch while the interpreter is torn down made
  the process abort ("terminate called without an active exception", exit status 134), as
  when an exception ended a training loop with the dataset's iterator still held by its
  traceback.

Fork safety: the thread exists only in the process that iterates; a child forked while it
runs does not inherit it (as with any thread), so start iterating after forking.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any, Iterator

__all__ = ["Prefetcher"]

_POLL_S = 0.05
_END = object()


#: Prefetchers whose thread may still run, closed at interpreter exit (:func:`_close_live`).
_LIVE: weakref.WeakSet[Prefetcher] = weakref.WeakSet()


def _close_live() -> None:
    for prefetcher in list(_LIVE):
        prefetcher.close()


atexit.register(_close_live)


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """Iterate ``source`` in a daemon thread, at most ``max_items`` items ahead.

    Args:
        source: The producer; it runs entirely in the background thread.
        max_items: Queue bound (>= 1).
        name: Thread name (shows up in stack dumps).
    """

    def __init__(self, source: Iterator[Any], max_items: int, name: str = "tspt-prefetch") -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(max_items)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._done = False
        _LIVE.add(self)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # pragma: no cover - best effort
                    pass

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the thread and drop what it produced ahead. Safe to call twice."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
