"""Storage backends behind one small seam (see :mod:`.abc`)."""

from __future__ import annotations

import os

from .abc import AtomicWriter, ReadHandle, Storage, StoreLock, typed_full_disk
from .local import TEMP_MARKER, LocalStorage

__all__ = [
    "AtomicWriter",
    "LocalStorage",
    "ReadHandle",
    "Storage",
    "StoreLock",
    "TEMP_MARKER",
    "storage_for",
    "typed_full_disk",
]


def storage_for(path: str | os.PathLike[str] | Storage) -> Storage:
    """Return the storage for a path (only local paths in this version) or a Storage as is."""
    if isinstance(path, Storage):
        return path
    return LocalStorage(path)
