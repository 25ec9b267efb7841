"""Measuring: repetition statistics, page-cache eviction and residency, file sizes, RSS.

Linux-specific parts (``posix_fadvise``, ``mincore``, ``/proc/self/status``) degrade to
"not available" elsewhere; the report then says so instead of publishing a wrong number.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = [
    "Stats",
    "evict",
    "fsync_tree",
    "peak_rss_bytes",
    "reset_peak_rss",
    "resident_bytes",
    "rss_bytes",
    "tree_files",
    "tree_size",
]


@dataclass(frozen=True)
class Stats:
    """Median and range of repeated measurements (all in the same unit).

    Attributes:
        median: The median of ``values``.
        min: The smallest value.
        max: The largest value.
        values: Every measurement, in the order taken.
    """

    median: float
    min: float
    max: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        """Stats over at least one value.

        Raises:
            ValueError: No values.
        """
        v = tuple(float(x) for x in values)
        if not v:
            raise ValueError("Stats.of: expected at least one value, found none")
        return cls(median=statistics.median(v), min=min(v), max=max(v), values=v)

    def rate(self, amount: float) -> Stats:
        """Seconds -> ``amount`` per second (the median of the rates is ``amount / median``,
        since the rate is monotonic in the time; min/max swap)."""
        return Stats(
            median=amount / self.median if self.median > 0 else float("inf"),
            min=amount / self.max if self.max > 0 else float("inf"),
            max=amount / self.min if self.min > 0 else float("inf"),
            values=tuple(amount / x if x > 0 else float("inf") for x in self.values),
        )

    def to_json(self) -> dict[str, object]:
        return {"median": self.median, "min": self.min, "max": self.max, "values": list(self.values)}


# --------------------------------------------------------------------------- files


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively), sorted; empty if ``root`` is absent."""
    if not root.exists():
        return []
    out = []
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return sorted(out)


def tree_size(root: Path) -> tuple[int, int]:
    """(total ``st_size`` in bytes, number of files) of the regular files under ``root``.

    A file removed or renamed between the listing and its ``stat`` (a cache being written
    while it is sampled) is not counted."""
    total = count = 0
    for p in tree_files(root):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            continue
        count += 1
    return total, count


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, so eviction can drop its pages (dirty pages stay)."""
    for p in tree_files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- page cache


def evict(paths: Iterable[Path]) -> str | None:
    """Drop the files' pages from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``).

    Returns:
        None on success, else why eviction is not possible here (one line).
    """
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return "os.posix_fadvise is not available on this platform"
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            return f"posix_fadvise(POSIX_FADV_DONTNEED) failed on {str(p)!r}: {exc}"
        finally:
            os.close(fd)
    return None


_libc = None


def _mincore_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_long,
            ]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def resident_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of the files that are in the page cache now (``mincore``), or None if this
    platform cannot tell. Used to check that an eviction worked."""
    lib = _mincore_libc()
    if lib is None:
        return None
    page = mmap.PAGESIZE
    total = 0
    for p in paths:
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            continue
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if lib.mincore(addr, size, vec) != 0:
                    return None
                total += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
            finally:
                lib.munmap(addr, size)
        finally:
            os.close(fd)
    return total


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now, in bytes (None where /proc is absent)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since start or :func:`reset_peak_rss`, bytes.

    Falls back to ``getrusage`` (which cannot be reset) where /proc is absent."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        import sys

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ``/proc/self/clear_refs``, value 5).

    Returns:
        True if reset; False if this kernel or sandbox does not allow it.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
