"""tensorstore_pt: a sharded, compressed, checksummed tensor store for PyTorch.

Re-exports only; see the modules for details.
"""

from ._version import __version__
from .dataset import StoreDataLoader, StoreDataset, StoreIterableDataset
from .errors import (
    ChecksumMismatchError,
    CorruptStoreError,
    DecompressionError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotAStoreError,
    RecordIndexError,
    RecordLengthError,
    ShardFormatError,
    ShardSizeError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
    UnsafePayloadError,
    UnsupportedFormatError,
    UnsupportedSampleError,
    WriterClosedError,
)
from .format import StoreInfo
from .reader import StoreReader, open_store
from .writer import ShardWriter, write_store

__all__ = [
    "ChecksumMismatchError",
    "CorruptStoreError",
    "DecompressionError",
    "IndexFormatError",
    "InvalidOptionError",
    "MissingShardError",
    "NotAStoreError",
    "RecordIndexError",
    "RecordLengthError",
    "ShardFormatError",
    "ShardSizeError",
    "ShardWriter",
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
    "WriterClosedError",
    "__version__",
    "open_store",
    "write_store",
]
