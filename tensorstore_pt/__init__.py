"""tensorstore_pt: a sharded, compressed, checksummed tensor store for PyTorch.

Re-exports only; see the modules for details.
"""

from ._version import __version__
from .dataset import StoreDataLoader, StoreDataset, StoreIterableDataset
from .errors import (
    AllocationBudgetError,
    ChecksumMismatchError,
    ConcurrentWriteError,
    CorruptStoreError,
    DecompressionError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotARegularFileError,
    NotAStoreError,
    RecordDecodeError,
    RecordIndexError,
    RecordLengthError,
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
from .audit import AuditReport, audit_path, audit_pt, audit_store
from .format import StoreInfo
from .integrity import RecoverReport, VerifyReport, recover_store, verify_store
from .reader import StoreReader, open_store
from .writer import ShardWriter, write_store

__all__ = [
    "AllocationBudgetError",
    "AuditReport",
    "ChecksumMismatchError",
    "ConcurrentWriteError",
    "CorruptStoreError",
    "DecompressionError",
    "IndexFormatError",
    "InvalidOptionError",
    "MissingShardError",
    "NotARegularFileError",
    "NotAStoreError",
    "RecordDecodeError",
    "RecordIndexError",
    "RecordLengthError",
    "RecoverReport",
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
    "open_store",
    "recover_store",
    "verify_store",
    "write_store",
]
