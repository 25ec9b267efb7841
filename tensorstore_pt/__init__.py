"""tensorstore_pt: a sharded, compressed, checksummed tensor store for PyTorch.

Re-exports only; see the modules for details.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._version import __version__
from .errors import (
    AllocationBudgetError,
    BackendNotInstalledError,
    ChecksumMismatchError,
    ConcurrentWriteError,
    CorruptStoreError,
    DecompressionError,
    IncompatiblePartsError,
    IndexFormatError,
    InvalidOptionError,
    MergeStateError,
    MissingShardError,
    NotARegularFileError,
    NotAStoreError,
    PackWorkerError,
    PartNotCommittedError,
    ReadOnlyStoreError,
    RecordDecodeError,
    RecordIndexError,
    RecordIndexTypeError,
    RecordLengthError,
    RecordMetaError,
    RemoteStorageError,
    ShardFormatError,
    ShardSizeError,
    StorageFullError,
    StoreBusyError,
    StoreChangedError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
    UnsafePayloadError,
    UnsupportedFormatError,
    UnsupportedSampleError,
    WriterClosedError,
)

# The names below import torch: they load on first use (PEP 562), so that importing the
# package (``tspt --help``, ``tspt --version``, the errors) stays fast.
_LAZY = {
    "AuditReport": "audit",
    "audit_path": "audit",
    "audit_pt": "audit",
    "audit_store": "audit",
    "CachedStorage": "cache",
    "ShardCache": "cache",
    "CopyReport": "copy",
    "copy_store": "copy",
    "StoreInfo": "format",
    "RecoverReport": "integrity",
    "VerifyReport": "integrity",
    "recover_store": "integrity",
    "verify_store": "integrity",
    "FetchedFrames": "reader",
    "RawRecord": "reader",
    "RecordResult": "reader",
    "StoreReader": "reader",
    "open_store": "reader",
    "ShardWriter": "writer",
    "write_store": "writer",
    "train_zstd_dictionary": "writer",
    "merge_stores": "merge",
    "StoreDataLoader": "dataset",
    "StoreDataset": "dataset",
    "StoreIterableDataset": "dataset",
}

if _TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditReport, audit_path, audit_pt, audit_store
    from .cache import CachedStorage, ShardCache
    from .copy import CopyReport, copy_store
    from .dataset import StoreDataLoader, StoreDataset, StoreIterableDataset
    from .format import StoreInfo
    from .integrity import RecoverReport, VerifyReport, recover_store, verify_store
    from .merge import merge_stores
    from .reader import FetchedFrames, RawRecord, RecordResult, StoreReader, open_store
    from .writer import ShardWriter, train_zstd_dictionary, write_store


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensorstore_pt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AllocationBudgetError",
    "AuditReport",
    "BackendNotInstalledError",
    "CachedStorage",
    "ChecksumMismatchError",
    "ConcurrentWriteError",
    "CopyReport",
    "CorruptStoreError",
    "DecompressionError",
    "FetchedFrames",
    "IncompatiblePartsError",
    "IndexFormatError",
    "InvalidOptionError",
    "MergeStateError",
    "MissingShardError",
    "NotARegularFileError",
    "NotAStoreError",
    "PackWorkerError",
    "PartNotCommittedError",
    "RawRecord",
    "ReadOnlyStoreError",
    "RecordDecodeError",
    "RecordIndexError",
    "RecordIndexTypeError",
    "RecordLengthError",
    "RecordMetaError",
    "RecordResult",
    "RecoverReport",
    "RemoteStorageError",
    "ShardCache",
    "ShardFormatError",
    "ShardSizeError",
    "ShardWriter",
    "StorageFullError",
    "StoreBusyError",
    "StoreChangedError",
    "StoreDataLoader",
    "StoreDataset",
    "StoreExistsError",
    "StoreInfo",
    "StoreIterableDataset",
    "StoreNotFoundError",
    "StoreReader",
    "TensorStoreError",
    "UnsafePayloadError",
    "UnsupportedFormatError",
    "UnsupportedSampleError",
    "VerifyReport",
    "WriterClosedError",
    "__version__",
    "audit_path",
    "audit_pt",
    "audit_store",
    "copy_store",
    "merge_stores",
    "open_store",
    "recover_store",
    "train_zstd_dictionary",
    "verify_store",
    "write_store",
]
