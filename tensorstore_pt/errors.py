"""The tensorstore_pt exception tree.

Every error raised on purpose by this package derives from :class:`TensorStoreError`.
Each subclass also inherits the builtin exception that matches it, so an ordinary
``except KeyError`` / ``except FileNotFoundError`` / ``except ValueError`` clause keeps
working for callers who do not know this package::

    TensorStoreError (Exception)
    ├── StoreNotFoundError (FileNotFoundError)     path does not exist
    ├── NotAStoreError (FileNotFoundError, ValueError)  directory without index.json
    ├── StoreExistsError (FileExistsError)         writer mode "create" on an existing store
    ├── IndexFormatError (ValueError)              index.json is not JSON or breaks the schema
    ├── UnsupportedFormatError (ValueError)        newer format version, unknown codec/feature
    ├── InvalidOptionError (ValueError)            a bad argument (codec, level, shard size...)
    │   └── RecordIndexTypeError (TypeError)       store[key] with a key that is not an int, slice or ints
    ├── UnsupportedSampleError (TypeError)         a sample torch.load(weights_only) would refuse
    ├── RecordIndexError (IndexError)              record position out of range
    ├── WriterClosedError (RuntimeError)           write() after close() or after a failure
    ├── ConcurrentWriteError (RuntimeError)        another writer changed the store meanwhile
    ├── UnsafePayloadError (ValueError)            a record's pickle asks for forbidden globals
    ├── StoreBusyError (RuntimeError)              another writer or recover holds the store's lock
    ├── PackWorkerError (RuntimeError)             a worker process of a parallel pack died
    ├── IncompatiblePartsError (ValueError)        merge: parts written with different codec configs
    ├── PartNotCommittedError (FileNotFoundError, ValueError)  merge: a part without a committed index
    ├── MergeStateError (RuntimeError)             merge: an unfinished merge of other parts, or a lost file
    ├── StoreChangedError (RuntimeError)           the store was replaced since it was opened
    ├── StorageFullError (OSError)                 no space left (ENOSPC/EDQUOT) writing a file
    ├── RemoteStorageError (OSError)               an object store failed past its retries (URL, file, bytes)
    ├── ReadOnlyStoreError (PermissionError)       a write to a read-only store URL (http(s)://)
    ├── BackendNotInstalledError (ImportError)     the URL's backend (s3fs, gcsfs) is not installed
    └── CorruptStoreError (ValueError)             stored bytes disagree with what was written
        ├── MissingShardError (FileNotFoundError)  a shard named in the index is absent
        ├── NotARegularFileError (OSError)         a store file is a directory, FIFO, device...
        ├── ShardFormatError                       bad magic, header, footer or trailer
        ├── ShardSizeError                         shard file size differs from the index
        ├── ChecksumMismatchError                  xxh3_64 digest differs
        ├── RecordLengthError                      decompressed length differs from the index
        ├── RecordDecodeError                      a record is not a loadable torch.save buffer
        ├── RecordMetaError                        a container-free record's metadata is malformed
        ├── DecompressionError                     the codec rejected a frame
        └── AllocationBudgetError                  decoding a record would allocate past its budget

Messages say what failed and where (store, shard, record), what was expected and what was
found. Errors raised while handling a lower-level error chain it with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "AllocationBudgetError",
    "BackendNotInstalledError",
    "ChecksumMismatchError",
    "ConcurrentWriteError",
    "CorruptStoreError",
    "DecompressionError",
    "IncompatiblePartsError",
    "IndexFormatError",
    "InvalidOptionError",
    "MergeStateError",
    "MissingShardError",
    "NotARegularFileError",
    "NotAStoreError",
    "PackWorkerError",
    "PartNotCommittedError",
    "RecordDecodeError",
    "RecordIndexError",
    "RecordIndexTypeError",
    "ReadOnlyStoreError",
    "RecordLengthError",
    "RecordMetaError",
    "RemoteStorageError",
    "ShardFormatError",
    "ShardSizeError",
    "StorageFullError",
    "StoreBusyError",
    "StoreChangedError",
    "StoreExistsError",
    "StoreNotFoundError",
    "TensorStoreError",
    "UnsafePayloadError",
    "UnsupportedFormatError",
    "UnsupportedSampleError",
    "WriterClosedError",
]


class TensorStoreError(Exception):
    """Base class of every error raised on purpose by tensorstore_pt."""


class StoreNotFoundError(TensorStoreError, FileNotFoundError):
    """The store path does not exist."""


class NotAStoreError(TensorStoreError, FileNotFoundError, ValueError):
    """The path exists but holds no ``index.json`` (not a store, or an unpublished one).

    A ``FileNotFoundError`` (the file a store needs is not there) and, as before, a
    ``ValueError``.
    """


class StoreExistsError(TensorStoreError, FileExistsError):
    """A writer in mode ``"create"`` was pointed at an existing store or non-empty directory."""


class IndexFormatError(TensorStoreError, ValueError):
    """``index.json`` is not valid JSON or does not follow the schema of docs/format.md."""


class UnsupportedFormatError(TensorStoreError, ValueError):
    """The store uses a format version, codec or feature this reader does not know."""


class InvalidOptionError(TensorStoreError, ValueError):
    """An argument has a value outside what the function accepts."""


class RecordIndexTypeError(InvalidOptionError, TypeError):
    """``store[key]`` with a key that is not an int, a slice or a sequence of ints.

    A ``TypeError``, as for a list indexed with a str, and an :class:`InvalidOptionError`.
    """


class UnsupportedSampleError(TensorStoreError, TypeError):
    """A sample holds an object that ``torch.load(weights_only=True)`` would refuse."""


class RecordIndexError(TensorStoreError, IndexError):
    """A record position is outside ``[-len(store), len(store))``."""


class WriterClosedError(TensorStoreError, RuntimeError):
    """A writer was used after it was closed, aborted, or failed."""


class ConcurrentWriteError(TensorStoreError, RuntimeError):
    """Another writer published to the same store while this writer was open.

    One writer at a time per store is supported; a second one is detected (its shard names
    are published without overwriting, and the index is compared before the commit) and
    refused, publishing nothing.
    """


class UnsafePayloadError(TensorStoreError, ValueError):
    """A record's pickle references globals outside the weights-only allow-list."""


class StoreBusyError(TensorStoreError, RuntimeError):
    """Another writer or ``recover`` holds the store's lock (or, where the file system has no
    locks, a process that is still running owns temporary files in the store)."""


class PackWorkerError(TensorStoreError, RuntimeError):
    """A worker process of a parallel pack (``num_workers``) died (killed, out of memory);
    nothing was published."""


class IncompatiblePartsError(TensorStoreError, ValueError):
    """Parts given to ``merge_stores`` were written with different codec configs (codec,
    level, dictionary, frame settings); the message names the part and both configs."""


class PartNotCommittedError(TensorStoreError, FileNotFoundError, ValueError):
    """A part given to ``merge_stores`` has no committed ``index.json`` (its writer failed or
    is still writing); merge adopts committed parts only."""


class MergeStateError(TensorStoreError, RuntimeError):
    """``merge_stores`` found an unfinished merge of other parts at the destination, or a
    file its journal names is gone from both the part and the destination."""


class StoreChangedError(TensorStoreError, RuntimeError):
    """The store was replaced (overwritten, recovered) since this reader opened it.

    A shard the reader's index names is gone or differs, and ``index.json`` is no longer the
    one the reader parsed. Shard names are never reused, so the reader never mixes versions;
    reopen the store to read the new one.
    """


class StorageFullError(TensorStoreError, OSError):
    """The file system ran out of space (``ENOSPC``) or quota (``EDQUOT``) while writing.

    ``errno`` is set as in the ``OSError`` it wraps; the message names the store and the
    file. A writer that hits it publishes nothing and leaves the previous store intact.
    """


class RemoteStorageError(TensorStoreError, OSError):
    """A remote store (an fsspec URL) failed in a way retrying does not mend: a permanent
    error, or a transient one that outlasted its retries. The message names the URL, the
    file and the byte range."""


class ReadOnlyStoreError(TensorStoreError, PermissionError):
    """A write (a writer, ``recover``, a remove) aimed at a store URL that is read-only
    (``http://``, ``https://``)."""


class BackendNotInstalledError(TensorStoreError, ImportError):
    """The package that implements a store URL's scheme (s3fs for ``s3://``, gcsfs for
    ``gs://``) is not installed; the message names the extra to install."""


class CorruptStoreError(TensorStoreError, ValueError):
    """Stored bytes differ from what the writer produced (damage, truncation, tampering)."""


class MissingShardError(CorruptStoreError, FileNotFoundError):
    """A shard file named in the index does not exist."""


class NotARegularFileError(CorruptStoreError, OSError):
    """A file the store needs is a directory, FIFO, device or another non-regular file."""


class ShardFormatError(CorruptStoreError):
    """A shard's header, footer or trailer is malformed or disagrees with the index."""


class ShardSizeError(CorruptStoreError):
    """A shard's file size differs from the size recorded in the index."""


class ChecksumMismatchError(CorruptStoreError):
    """An xxh3_64 digest computed over stored bytes differs from the recorded one."""


class RecordLengthError(CorruptStoreError):
    """A record's decompressed (raw) length differs from the length in the index."""


class RecordDecodeError(CorruptStoreError):
    """A record's bytes are not a loadable ``torch.save`` buffer (bad zip layout or pickle)."""


class RecordMetaError(CorruptStoreError):
    """The stored metadata of a container-free record (its pickle, archive name, storage
    sizes, serialization-id hash, or the container layout it names) is malformed: a length
    that runs past the bytes present, a count past its limit, a name ``torch.save`` would
    not write, storage bytes that do not add up to the sizes listed."""


class DecompressionError(CorruptStoreError):
    """The codec could not decode a frame, or its header disagrees with the index."""


class AllocationBudgetError(CorruptStoreError):
    """Decoding a record would allocate more memory than its budget allows.

    Raised *before* the allocation: when a frame's raw length is above the reader's
    ``max_record_bytes``, when what a record's pickle would build (strings, bytes, tensor
    sizes, containers) is above the record's allocation budget (see docs/integrity.md), and
    in place of a ``MemoryError`` met while decoding a record.
    """
