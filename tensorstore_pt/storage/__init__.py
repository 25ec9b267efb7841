"""Storage backends behind one small seam (see :mod:`.abc`): :class:`LocalStorage` for local
paths, :class:`~.remote.FsspecStorage` for fsspec URLs (imported on first use)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError
from .abc import AtomicWriter, ReadHandle, Storage, StoreLock, typed_full_disk
from .local import TEMP_MARKER, LocalStorage

if TYPE_CHECKING:
    from .remote import FsspecStorage

__all__ = [
    "AtomicWriter",
    "FsspecStorage",
    "LocalStorage",
    "ReadHandle",
    "Storage",
    "StoreLock",
    "TEMP_MARKER",
    "if_match_kwargs",
    "storage_for",
    "typed_full_disk",
]


def __getattr__(name: str) -> Any:
    if name == "FsspecStorage":
        from .remote import FsspecStorage

        return FsspecStorage
    raise AttributeError(name)


def if_match_kwargs(version: str | None) -> dict[str, str]:
    """``{"if_match": version}``, or ``{}`` when there is no version, so that a Storage written
    before ``writer`` took ``if_match`` (and backends without versions) keeps working."""
    return {} if version is None else {"if_match": version}


def storage_for(path: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage for a location.

    Args:
        path: A local path or ``file://`` URL (-> :class:`LocalStorage`, with its ``flock``
            writer lock), any other fsspec URL such as ``s3://bucket/prefix``, ``gs://...``,
            ``memory://...`` or ``https://...`` (-> :class:`~.remote.FsspecStorage`), or a
            :class:`Storage`, returned as is.
        storage_options: For URLs: the fsspec file system's options (``endpoint_url``,
            ``key``, ``secret``...) and this package's ``tspt_*`` retry options. Must be None
            for a local path or a Storage.

    Raises:
        InvalidOptionError: ``storage_options`` given with a local path or a Storage, or not a dict.
        BackendNotInstalledError: The URL's backend package (s3fs, gcsfs) is missing.
    """
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidOptionError(f"storage_options: expected a dict, found {type(storage_options).__name__}")
    if isinstance(path, Storage):
        if storage_options:
            raise InvalidOptionError(
                f"storage_options: given with a Storage ({path.location!r}), which already has its own; pass one or the other"
            )
        return path
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise InvalidOptionError(f"path: expected a str or os.PathLike of str, found bytes {text!r}")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme == "file":
            return _local(text[len("file://") :], storage_options, text)
        from .remote import FsspecStorage

        return FsspecStorage(text, storage_options)
    return _local(text, storage_options, text)


def _local(path: str, storage_options: dict[str, Any] | None, given: str) -> LocalStorage:
    if storage_options:
        raise InvalidOptionError(
            f"storage_options: only URLs such as 's3://bucket/prefix' take them; {given!r} is a local path, "
            f"found {sorted(storage_options)}"
        )
    return LocalStorage(path)
