"""ShardWriter: pack samples into fixed-size shards; ``index.json`` is committed last.

Commit protocol (see docs/format.md, "Writing"):

1. Each shard is written under a temporary name, fsynced and renamed to its final name when
   it closes. New shards never reuse the name of a shard the current index references.
2. ``index.json`` is written the same way, last: it is the single commit point. Until it is
   replaced, readers see the old store (append/overwrite) or no store (create).
3. After the commit, an ``overwrite`` removes the shards of the old index.

One writer at a time: a writer holds the store's lock (``.tspt-lock``, see
:meth:`Storage.lock`) from its constructor until it commits or aborts, so a second writer or
``recover`` gets :class:`StoreBusyError` at once. Its shards are named
``shard-<token>-<seq>.tspt`` with a token drawn for this writer alone, so no shard name is
ever used for two contents.

If the ``with`` body raises, or :meth:`ShardWriter.abort` is called, every file this writer
created is removed (continuing past errors such as a full disk) and the old index is
untouched; a file it could not remove is named in a warning and is never adopted by
``recover`` (its token is in no index and no lock record). If the process dies (SIGKILL,
power loss), the shards it already renamed stay behind as unreferenced files; they never
change what a reader sees, and ``tspt recover`` adopts them (the lock file still names the
dead writer's token) unless another writer has written the store since.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import concurrent.futures.process  # noqa: F401 - cf.process.BrokenProcessPool, named in except clauses
import datetime
import io
import itertools
import json
import mmap
import os
import pickle
import socket
import warnings
from types import TracebackType
from typing import Any, Callable, Iterable, NamedTuple, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from . import _version
from .checksums import digest_int, format_digest
from .codecs import Codec, get_codec, make_codec
from .codecs.registry import MAX_DICT_BYTES, read_store_file
from .errors import (
    ConcurrentWriteError,
    IndexFormatError,
    InvalidOptionError,
    MissingShardError,
    NotAStoreError,
    PackWorkerError,
    ReadOnlyStoreError,
    StorageFullError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
    UnsupportedFormatError,
    UnsupportedSampleError,
    WriterClosedError,
)
from .format import (
    FEATURE_COLUMNAR_FRAMES,
    FEATURE_DICTIONARY,
    FEATURE_MULTI_RECORD_FRAMES,
    FEATURE_RAW_FRAMES,
    INDEX_NAME,
    LOCK_NAME,
    MAX_INDEX_BYTES,
    IndexInfo,
    ShardEntry,
    StoreInfo,
    check_shard_name,
    encode_index,
    footer_meta,
    new_writer_token,
    parse_index,
    shard_name,
)
from .serialization import check_sample, clone_exact, dumps, plain_dumps, save_options, storage_view, tensor_bytes
from . import _ptzip, columnar, shardio
from .sources import ColumnRows, FileRows
from .shardio import FrameGrouper, ShardBuilder, dictionary_gain, dictionary_sample, train_dictionary
from .storage import Storage, StoreLock, if_match_kwargs, storage_for, typed_full_disk
from .storage.abc import FULL_ERRNOS, full_disk_error, removal_failures

__all__ = [
    "DEFAULT_DICT_BYTES",
    "DEFAULT_MAX_SHARD_BYTES",
    "DEFAULT_RAW_BELOW",
    "DICT_SAMPLE_BYTES",
    "ShardWriter",
    "train_zstd_dictionary",
    "write_store",
]

DEFAULT_MAX_SHARD_BYTES = 64 * 2**20
#: Default ``raw_below``: a frame the codec shrinks by less than this fraction (5%) is stored
#: raw (format 1.2, "raw-frames"). Measured (docs/benchmarks.md, "Raw frames"): zstd-3 and lz4
#: frames read 2-7x slower than the same bytes stored raw, and a frame that saves under 5% only
#: wins back its decode time on storage slower than about 45 MB/s (zstd) or 110 MB/s (lz4).
DEFAULT_RAW_BELOW = 0.05
#: Default zstd dictionary size (bytes) for ``dictionary=True``.
DEFAULT_DICT_BYTES = 16 * 2**10
#: Raw bytes of leading records buffered to train the dictionary on (the training itself takes
#: a bounded sample of them: ``shardio.DICT_TRAIN_BYTES``, ``shardio.DICT_TRAIN_RECORDS``).
DICT_SAMPLE_BYTES = 16 * 2**20
#: Most worker processes a writer starts (``num_workers``): each holds a torch import and up
#: to two batches in flight, so far more processes than cores only costs memory.
MAX_WORKERS = 256
#: A trained dictionary is used only if it saves at least this fraction of the zstd bytes of
#: held-out buffered records (measured: docs/benchmarks.md, "Bounded dictionary training");
#: otherwise the store is written without it, and a warning and ``created_by`` say why.
DICT_MIN_GAIN = 0.02
_MODES = ("create", "overwrite", "append")
#: Frame target of ``compact=True`` when ``frame_target_bytes`` is not given: bytes of the
#: records' content (pickles and storages, what a column block holds), not of their torch.save
#: containers (about 1.5 KB a record more). Measured against 64 KiB and 1 MiB on every kind of
#: the benchmark (docs/benchmarks.md, "whole-block parsing, 256 KiB blocks"): up to 7% fewer
#: bytes, up to 31% less CPU a sample read in order, reads of every record in random order
#: up to 23% faster, for a single read of a block not read before costing 1.4-2.0x (about
#: 0.45-0.78 ms here; 1 MiB blocks: 1.2-3.5 ms).
COMPACT_FRAME_BYTES = 256 * 2**10


def lock_owner(token: str, role: str, mode: str) -> dict[str, Any]:
    """The owner record a writer or ``recover`` keeps in the lock file while it holds it."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "token": token,
        "role": role,
        "mode": mode,
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _created_by() -> dict[str, Any]:
    import lz4
    import torch
    import zstandard

    return {
        "library": "tensorstore_pt",
        "version": _version.__version__,
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "lz4": lz4.library_version_string(),
    }


def stores_raw(codec: Codec, frame_bytes: int, raw_bytes: int, raw_below: float) -> bool:
    """Whether a frame of ``raw_bytes`` that ``codec`` compressed to ``frame_bytes`` is stored
    raw instead (format 1.2, "raw-frames"): the codec saves less than the fraction
    ``raw_below`` of its bytes (``0`` never; codec ``none`` never: its frames are raw already)."""
    return raw_below > 0 and codec.codec_id != "none" and frame_bytes > raw_bytes * (1.0 - raw_below)


#: One frame coded for writing: the arguments of ``ShardWriter._emit_frame``: (frame bytes,
#: their checksum, the records' raw lengths, stored raw, decoded block bytes or None).
_CodedFrame = tuple[bytes, int, list[int], bool, int | None]


def _coded_frame(data: bytes, lengths: list[int], block: bool, codec: Codec, raw_below: float) -> _CodedFrame:
    """A frame of decoded bytes ``data`` (records of ``lengths`` bytes; ``block``: a column
    block, format 1.3) coded by ``codec``, or kept raw where it saves too little."""
    frame = codec.compress(data)
    stored_raw = stores_raw(codec, len(frame), len(data), raw_below)
    if stored_raw:
        frame = data
    return frame, digest_int(frame), lengths, stored_raw, len(data) if block else None


def _done_future(fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
    """``fn(*args)`` run here and now, as a done future holding its result or its error
    (raised by ``result()``, where a thread's would be): for work no thread can take."""
    done: cf.Future[Any] = cf.Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:  # kept for result(), as a thread's error is
        done.set_exception(exc)
    return done


def _code_plans(plans: list[columnar.FramePlan], codec: Codec, raw_below: float) -> list[_CodedFrame]:
    """The frames of one compact group (:func:`.columnar.build_frame` of each plan, coded).
    Pure: runs on a coder thread."""
    return [_coded_frame(*columnar.build_frame(plan), codec, raw_below) for plan in plans]


def _encode(
    sample: Any, codec: Codec | None, raw_below: float = 0.0
) -> tuple[bytes | None, int, bytes | None, int, bool]:
    """Serialise one sample; with a codec, also compress it as a one-record frame (or keep it
    raw, see :func:`stores_raw`).

    Returns (raw or None, raw length, frame or None, frame checksum, frame stored raw).
    """
    return _frame(dumps(sample), codec, raw_below)


def _frame(
    raw: bytes, codec: Codec | None, raw_below: float = 0.0
) -> tuple[bytes | None, int, bytes | None, int, bool]:
    """:func:`_encode` of a sample already serialised to ``raw``."""
    if codec is None:
        return raw, len(raw), None, 0, False
    frame, checksum, _, stored_raw, _ = _coded_frame(raw, [len(raw)], False, codec, raw_below)
    return None, len(raw), frame, checksum, stored_raw


class ShardWriter:
    """Write samples into a store: fixed-size shards plus a JSON index committed last.

    Args:
        path: The store directory (created if missing, parents too), or an fsspec URL such
            as ``s3://bucket/prefix`` (the bucket must exist; see docs/remote.md).
        codec: ``"zstd"`` (default for a new store), ``"lz4"`` or ``"none"``. In ``append``
            mode the store's codec is used; passing a different one raises.
        level: Codec level; None means the codec's default (zstd 3, lz4 0). zstd accepts
            -7..22, lz4 0..16.
        max_shard_bytes: Cap on a shard's file size in bytes, header and footer included
            (default 64 MiB). A shard closes when the next frame would take it past the cap;
            a frame larger than the cap gets a shard of its own.
        metadata: A JSON-serialisable dict stored in the index. In ``append`` mode it
            updates (``dict.update``) the store's metadata.
        mode: ``"create"`` (the path must not hold a store or other files),
            ``"overwrite"`` (replace an existing store on commit) or ``"append"`` (add
            records after the existing ones; the store must exist).
        num_workers: Worker *processes* that serialise (``torch.save``) and compress; 0
            (default) does that work in this process, on ``num_threads`` threads. The one knob
            for CPU parallelism: threads are held back by the GIL (about 1.3x on 2 cores),
            processes are not. Samples are still checked and taken (snapshotted) here, in
            order, and the store is byte for byte the same for any ``num_workers`` (only the
            informative ``created_by`` records it). At most ``MAX_WORKERS`` (256). See
            "Parallel packing" below.
        num_threads: Threads that serialise and compress in this process when
            ``num_workers`` is 0 (default: 2, or 1 on one core). Not allowed with
            ``num_workers`` >= 1.
        start_method: How worker processes start: ``"fork"``, ``"spawn"`` or
            ``"forkserver"`` (``multiprocessing`` start methods); None (default) takes the
            platform's default. Only with ``num_workers`` >= 1. With spawn and forkserver,
            a script's writing code must sit under ``if __name__ == "__main__":`` (the
            workers import the main module).
        dictionary: zstd only. True trains a zstd dictionary (``zstandard.train_dictionary``)
            of ``DEFAULT_DICT_BYTES`` on a bounded sample of the first records (they are
            buffered up to ``DICT_SAMPLE_BYTES`` of raw bytes; training takes whole records
            evenly spread over them, at most ``shardio.DICT_TRAIN_BYTES`` (4 MiB) and
            ``shardio.DICT_TRAIN_RECORDS``, with fixed COVER parameters: well under a second),
            stores it in the store and uses it for every frame; an int gives the dictionary
            size in bytes. The dictionary is skipped when it saves less than
            ``DICT_MIN_GAIN`` (2%) of the zstd bytes of the buffered records it was not
            trained on, or when zstd cannot train one (too few or too small records): the
            store is then written without it, and a ``UserWarning`` and
            ``created_by["dictionary_skipped"]`` (and :attr:`dictionary_skipped`) say why. In ``append`` mode
            the store's dictionary, if any, is always used. Format 1.1, feature
            "zstd-dictionary". Bytes give a prepared dictionary (ZDICT format, e.g. from
            :func:`train_zstd_dictionary`), used as is: the way to give the parts of one store
            (see :func:`~tensorstore_pt.merge_stores`) one shared dictionary.
        frame_target_bytes: Put consecutive records into one frame until its raw size reaches
            this many bytes (frames never cross shards). Better ratio, but a random read
            decodes the whole frame. None (default) writes one record per frame. Format 1.1,
            feature "multi-record-frames".
        compact: Store records container-free, in columnar frames (format 1.3, feature
            "columnar-frames", docs/format.md section 5.3): each record as its pickle and
            storages, consecutive records with the same number of storages laid out column by
            column (filters chosen per column by measurement), their exact ``torch.save``
            bytes rebuilt on read. Every record is proved first (rebuilt and compared with
            ``torch.save``'s own bytes); one that does not prove is stored as it is, in a
            plain frame. Implies multi-record frames (``frame_target_bytes`` default
            ``COMPACT_FRAME_BYTES``, 256 KiB, counted in content bytes: pickles and storages).
            Measured (docs/benchmarks.md, "Container-free columnar frames"): 0.71-0.96x
            litdata's bytes on every benchmark kind, but slower random reads than one record a
            frame on medium and large records (not the default). Default False.
        raw_below: Store a frame raw (its ``torch.save`` bytes, no codec frame) when the codec
            shrinks it by less than this fraction of its raw bytes; 0 disables. Default
            ``DEFAULT_RAW_BELOW`` (0.05), chosen by measurement (docs/benchmarks.md, "Raw
            frames"): such frames read at copy speed instead of 2-7x slower. Only a store
            that actually holds a raw frame uses format 1.2 (feature "raw-frames"); others
            are written exactly as without the option. Codec ``none`` ignores it.
        storage_options: For a URL: the fsspec file system's options (``endpoint_url``,
            ``key``, ``secret``...; see docs/remote.md). None for a local path.

    Raises:
        InvalidOptionError: Bad codec, level, shard size, mode, metadata, dictionary or
            frame_target_bytes.
        StoreExistsError: ``create`` on a path that holds a store or other files.
        StoreNotFoundError / NotAStoreError: ``append`` to a path without a store.
        StoreBusyError: Another writer or ``recover`` holds the store's lock (raised at once,
            naming its pid and host).
        StorageFullError: From ``write``/``close``: the disk filled up (also an ``OSError``,
            ``errno`` ENOSPC); nothing is published and this writer's files are removed.
        ConcurrentWriteError: From ``close``: another writer committed to the same store
            meanwhile (only where the file system has no locks: then ``index.json`` is
            replaced only if it is still the version read at open, atomically where the
            backend has conditional writes, S3); nothing is published.
        RemoteStorageError: A URL's object store failed past its retries.

    Use as a context manager; the store is published when the ``with`` block exits without
    an exception, and nothing is published if it raises::

        with ShardWriter("data/train", codec="zstd") as w:
            for sample in samples:
                w.write(sample)

    Parallel packing (``num_workers=N``): each sample is checked and pickled in the calling
    process (tensor bytes copied once into the pickle: that is the snapshot), gathered into
    tasks of up to 128 samples or 2 MiB of pickles, and sent to a pool of N processes, which
    take the same snapshot, ``torch.save`` and compress (with ``frame_target_bytes`` or while
    a dictionary is being trained, workers only serialise and frames are compressed here);
    results come back in input order. A list or tuple given to :meth:`write_many` (and so to
    :func:`write_store`, and ``tspt pack``'s rows of a ``.pt`` file) on ``fork`` workers that
    have not started yet is not pickled: the workers fork with it and each task names a range
    of positions (up to 128 samples or 2 MiB of tensor bytes), so the calling process only
    writes frames; the workers read the list as it was when they forked. A directory of
    ``.pt`` files (``tspt pack DIR``, a :class:`~tensorstore_pt.sources.FileRows`) goes the
    same way: tasks of up to 128 files or 2 MiB of file bytes, each file read and loaded
    (weights-only) by the worker that encodes it, so the calling process reads none. With
    ``fork``, workers put a task's frames into shared memory the writer maps before they
    start (one slot of 2.5 MiB per task in flight: ``(2 * N + 3) x 2.5 MiB``, shared by all;
    frames that do not fit come back through the result pipe) and only their lengths and
    checksums travel back. Memory: at most ``2 * N + 2`` tasks are in flight, so the calling
    process holds at most about ``(2 * N + 3) x 2 MiB`` of pickled samples (or that many
    samples when one is larger) plus their results, and each worker holds one task, its samples' ``torch.save`` bytes
    and frames (about 3x the task's raw size) on top of its own interpreter and torch import
    (an inherited list's pages are shared with the calling process until written to). A
    sample a worker cannot save raises the same :class:`UnsupportedSampleError` as
    in-process (from a later ``write`` or from ``close``); a worker that dies raises
    :class:`PackWorkerError`; either way, and on abort or Ctrl-C, the workers are terminated
    and nothing is published. Workers ignore SIGINT (the calling process handles it) and run
    torch with one thread. With ``spawn`` or ``forkserver``, a
    sample that holds a ``set`` is encoded in the calling process (a fresh interpreter hashes
    str with another seed, so its set would be written in another order).

    Memory (``num_workers=0``): at most ``2 * num_threads + 2`` encoded samples are in flight, plus one frame
    group (about ``frame_target_bytes``; with ``compact``, up to ``num_threads + 2`` groups
    (``num_workers + 2`` with workers), each with its block, while coder threads assemble and
    code them), plus, while a dictionary is being trained, the raw
    bytes of the training records (at most ``DICT_SAMPLE_BYTES`` plus one record), plus one
    shard's tables (32 bytes a frame, 24 a record). Publishing: a full shard is finished on
    the calling thread and published (flushed, fsynced and linked under its name; uploaded,
    for a URL) on one background thread while the next shard is written; at most 2 finished
    shards wait to be published (the writer then waits), so temporary files (for a URL, the
    local spool) hold at most 3 shards. ``close`` waits for every publication before it
    commits the index; an error of a publication is raised from a later ``write`` or from
    ``close``, and nothing is published. Thread safety: one writer must be used
    from one thread, and one writer at a time may write a store (a second one is detected and
    refused, never silently merged). Fork safety: do not fork while a writer is open (its thread
    or process pool does not survive fork); the writer's own worker processes are started by
    ``start_method``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Storage,
        *,
        codec: str | None = None,
        level: int | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, Any] | None = None,
        mode: str = "create",
        num_workers: int = 0,
        num_threads: int | None = None,
        start_method: str | None = None,
        dictionary: bool | int | bytes = False,
        frame_target_bytes: int | None = None,
        raw_below: float = DEFAULT_RAW_BELOW,
        storage_options: dict[str, Any] | None = None,
        compact: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise InvalidOptionError(f"mode: expected one of {list(_MODES)}, found {mode!r}")
        _check_positive_int(max_shard_bytes, "max_shard_bytes")
        metadata = check_metadata(metadata)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_WORKERS:
            raise InvalidOptionError(f"num_workers: expected an int in [0, {MAX_WORKERS}], found {num_workers!r}")
        if num_workers and num_threads is not None:
            raise InvalidOptionError(
                f"num_threads={num_threads!r} with num_workers={num_workers}: pass one (num_threads is for "
                "in-process encoding, num_workers=0)"
            )
        if start_method is not None:
            import multiprocessing

            if not num_workers:
                raise InvalidOptionError(f"start_method={start_method!r} needs num_workers >= 1")
            if start_method not in multiprocessing.get_all_start_methods():
                raise InvalidOptionError(
                    f"start_method: expected one of {multiprocessing.get_all_start_methods()}, found {start_method!r}"
                )
        if num_threads is None:
            num_threads = max(1, min(2, os.cpu_count() or 1))
        _check_positive_int(num_threads, "num_threads")
        self.num_workers = num_workers
        self._start_method = start_method
        if frame_target_bytes is not None:
            _check_positive_int(frame_target_bytes, "frame_target_bytes")
        if not isinstance(compact, bool):
            raise InvalidOptionError(f"compact: expected True or False, found {compact!r}")
        #: The container layout records are proved against (compact only; None: plain frames).
        self._layout: _ptzip.PtLayout | None = _this_torch_layout() if compact else None
        #: The filters chosen for recent column blocks (compact only), reused for blocks alike.
        self._filter_memo = columnar.FilterMemo()
        if compact and frame_target_bytes is None:
            frame_target_bytes = COMPACT_FRAME_BYTES
        if isinstance(raw_below, bool) or not isinstance(raw_below, (int, float)) or not 0 <= raw_below < 1:
            raise InvalidOptionError(f"raw_below: expected a fraction in [0, 1) (0 disables), found {raw_below!r}")
        self.raw_below = float(raw_below)
        prepared: bytes | None = None
        if isinstance(dictionary, (bytes, bytearray, memoryview)):
            prepared = _check_prepared_dictionary(bytes(dictionary))
            dict_bytes = 0
        elif dictionary is True:
            dict_bytes = DEFAULT_DICT_BYTES
        elif dictionary is False or dictionary is None:
            dict_bytes = 0
        elif isinstance(dictionary, int) and 256 <= dictionary <= MAX_DICT_BYTES:
            dict_bytes = dictionary
        else:
            raise InvalidOptionError(
                f"dictionary: expected True, False or a size in bytes in [256, {MAX_DICT_BYTES}], or a prepared "
                f"zstd dictionary (bytes), found {dictionary!r}"
            )

        self._storage = storage_for(path, storage_options)
        self.location = self._storage.location
        self.mode = mode
        self.max_shard_bytes = max_shard_bytes
        self.frame_target_bytes = frame_target_bytes
        #: This writer's token: its shards are ``shard-<token>-<seq>.tspt``.
        self.token = new_writer_token()
        self._old: IndexInfo | None = None
        self._created_dir = False
        self._lock: StoreLock | None = None
        self._state = "opening"
        self._index_digest: int | None = None  # of the index.json this writer started from
        self._index_version: str | None = None  # its backend version (an S3 ETag), where there is one
        # Validate user options before touching the file system.
        new_codec = make_codec(codec if codec is not None else "zstd", level) if mode != "append" or codec else None
        if (dict_bytes or prepared) and new_codec is not None and new_codec.codec_id != "zstd":
            raise InvalidOptionError(f"dictionary: only codec 'zstd' takes a dictionary, found codec {codec!r}")
        if getattr(self._storage, "read_only", False):
            raise ReadOnlyStoreError(
                f"store {self.location!r} is read-only (an http(s):// URL); write to s3://, gs://, memory:// or a "
                "local path instead"
            )
        try:
            old_index = self._inspect_target()
            self._setup(old_index, new_codec, codec, level, metadata, dict_bytes, num_threads)
            if prepared is not None:
                self._use_prepared_dictionary(prepared)
        except BaseException:
            self._release(remove_created_dir=True)
            raise

    def _setup(
        self,
        old_index: IndexInfo | None,
        new_codec: Codec | None,
        codec: str | None,
        level: int | None,
        metadata: dict[str, Any] | None,
        dict_bytes: int,
        num_threads: int,
    ) -> None:
        """Everything of the constructor after the lock is taken (its errors release the lock)."""
        self._features: set[str] = set()
        if self.mode == "append" and old_index is not None:  # _inspect_target raised if there is none
            store_codec = get_codec(old_index.codec, self._load_store_file)
            if (
                new_codec is not None
                and new_codec.get_config() != {k: v for k, v in old_index.codec.items() if k != "dict"}
                and (level is not None or new_codec.codec_id != store_codec.codec_id)
            ):
                raise InvalidOptionError(
                    f"append to {self.location!r}: the store uses codec {old_index.codec}, found "
                    f"codec={codec!r}, level={level!r}; omit them or pass the store's own"
                )
            if dict_bytes and store_codec.codec_id != "zstd":
                raise InvalidOptionError(
                    f"append to {self.location!r}: dictionary needs codec 'zstd', the store uses {old_index.codec}"
                )
            if dict_bytes and "dict" not in old_index.codec:
                raise InvalidOptionError(
                    f"append to {self.location!r}: the store has no zstd dictionary and one cannot be added "
                    "to existing shards; write a new store with dictionary=True"
                )
            self._codec = store_codec
            self._metadata = {**old_index.metadata, **(metadata or {})}
            self._shards: list[ShardEntry] = list(old_index.shards)
            self._features.update(old_index.features)
            dict_bytes = 0  # the store's own dictionary (if any) is already in the codec
        else:
            self._codec = new_codec if new_codec is not None else make_codec("zstd")
            self._metadata = metadata or {}
            self._shards = []
        self._old = old_index
        self._base_shards = len(self._shards)
        self._records = sum(s.records for s in self._shards)
        self._seq = 0
        self._dict_bytes = dict_bytes
        self._dict_pending = dict_bytes > 0  # records are buffered until the dictionary is trained
        self._dict_buffer: list[bytes] = []
        #: Why a requested dictionary was not used (None: used, or none was asked for).
        self.dictionary_skipped: str | None = None
        self._dict_buffer_bytes = 0
        self._new_files: list[str] = []  # non-shard files this writer created (the dictionary)
        self._grouper = FrameGrouper(self.frame_target_bytes)
        self._open: ShardBuilder | None = None
        # Finished shards being published (flush, fsync, link; an upload for a URL) on one
        # background thread, oldest first, so that this thread goes on writing frames.
        self._publishing: collections.deque[tuple[ShardBuilder, cf.Future[None]]] = collections.deque()
        self._publisher: cf.ThreadPoolExecutor | None = None
        self._publish_inline = False  # no publisher thread can start (the interpreter is exiting)
        # Compact: groups of records whose column blocks are being assembled and coded on
        # coder threads, oldest first; their frames are written here, in that order. Their
        # filters are chosen here first, group after group (FilterMemo), so that the bytes
        # stored never depend on timing or on the number of threads.
        self._coding: collections.deque[cf.Future[list[_CodedFrame]]] = collections.deque()
        self._coder: cf.ThreadPoolExecutor | None = None
        self._coders = self.num_workers or num_threads
        self._pending: collections.deque[cf.Future[Any]] = collections.deque()
        self._pool: cf.Executor
        if self.num_workers:
            import multiprocessing

            self._max_pending = 2 * self.num_workers + 2  # batches of samples
            context = multiprocessing.get_context(self._start_method)
            # A fresh interpreter (spawn, forkserver) draws its own str hash seed, so a set of
            # str rebuilt there iterates (and torch.save writes it) in another order.
            self._fresh_interpreters = context.get_start_method() != "fork"
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=context,
                initializer=_worker_init,
            )
            _widen_result_pipe(self._pool)
        else:
            self._max_pending = 2 * num_threads + 2
            self._pool = cf.ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tspt-writer")
        self._codec_sent: tuple[int, bytes] | None = None  # (key, pickled codec) for worker processes
        self._batch: list[bytes] = []  # pickled samples not yet sent to the worker processes
        self._pickler = _SamplePickler() if self.num_workers else None
        self._pool_started = False  # whether a task was sent to the pool (fork workers then exist)
        self._pool_parts: _PoolParts | None = None  # taken before close shuts the pool down early
        self._inherited: int | None = None  # the key in _INHERITED of the samples the workers inherit
        self._slots: int | None = None  # the key in _SLOTS of the shared memory fork workers write frames into
        self._free_slots: list[int] = []
        self._batch_bytes = 0
        self._codec_sent_for: Codec | None = None
        self._state = "open"
        #: Counters for progress displays: records, raw and stored bytes written so far.
        self.records_written = 0
        self.raw_bytes_written = 0
        self.stored_bytes_written = 0

    # ------------------------------------------------------------------ setup

    def _load_store_file(self, name: str) -> bytes:
        try:
            return read_store_file(self._storage, name)
        except FileNotFoundError as exc:
            raise MissingShardError(f"store {self.location!r}: file {name!r} named in the index is missing") from exc

    def _inspect_target(self) -> IndexInfo | None:
        """Check the target for the mode, take the store's lock, and read the current index."""
        st = self._storage
        where = self.location
        if st.exists() and not st.is_container():
            raise StoreExistsError(f"{where!r} exists and is not a directory; expected a directory or a new path")
        if self.mode == "append" and not st.exists():
            raise StoreNotFoundError(f"append: no store at {where!r} (the path does not exist); use mode='create'")
        if self.mode == "create":
            self._refuse_existing(st.list() if st.exists() else [])
        self._created_dir = st.ensure()
        self._lock = st.lock(lock_owner(self.token, "writer", self.mode))
        dead = self._lock.previous
        if dead and dead.get("role") == "writer":
            adopt = (
                " (abort this writer and run `tspt recover` first to add its records to the store)"
                if dead.get("mode") == "append"
                else ""
            )
            warnings.warn(
                f"store {where!r}: a previous writer (process {dead.get('pid', '?')} on host {dead.get('host', '?')!r}, "
                f"mode {dead.get('mode')!r}) died without committing; the shards it finished are not part of the "
                f"store and `tspt recover` will quarantine them{adopt}",
                UserWarning,
                stacklevel=4,
            )
        names = [n for n in st.list() if n != LOCK_NAME]
        has_index = INDEX_NAME in names
        if self.mode == "append":
            if not has_index:
                raise NotAStoreError(f"append: {where!r} holds no {INDEX_NAME}; expected an existing store")
            return parse_index(self._read_index_bytes(), f"store {where!r}: {INDEX_NAME}")
        if self.mode == "create":
            self._refuse_existing(names)  # again under the lock: another writer may have been first
            return None
        # overwrite
        if has_index:
            try:
                return parse_index(self._read_index_bytes(), f"store {where!r}: {INDEX_NAME}")
            except (IndexFormatError, UnsupportedFormatError):
                return None  # replaced wholesale; its shards are left in place, never guessed at
        return None

    def _refuse_existing(self, names: list[str]) -> None:
        names = [n for n in names if n != LOCK_NAME]
        if INDEX_NAME in names:
            raise StoreExistsError(
                f"create: a store already exists at {self.location!r}; use mode='overwrite' or mode='append'"
            )
        if names:
            raise StoreExistsError(
                f"create: {self.location!r} is not empty ({len(names)} files, e.g. {names[0]!r}); expected a new "
                "or empty directory"
            )

    def _read_index_bytes(self) -> bytes:
        """Read index.json once at open, remembering its digest for the commit-time comparison."""
        try:
            raw, self._index_version = self._storage.read_versioned(INDEX_NAME, max_bytes=MAX_INDEX_BYTES)
        except TensorStoreError:
            raise
        except ValueError as exc:  # refused before reading, as readers refuse it (format.md 6.1)
            # -1 stands for "an index past the bound" (see _current_index_digest): overwrite
            # replaces it wholesale, and the commit still sees a writer that changes it.
            self._index_digest = -1
            raise IndexFormatError(
                f"store {self.location!r}: {INDEX_NAME}: expected at most {MAX_INDEX_BYTES} bytes ({exc})"
            ) from exc
        self._index_digest = digest_int(raw)
        return raw

    def _current_index_digest(self) -> int | None:
        """The digest of ``index.json`` now; -1 (no digest) for one past ``MAX_INDEX_BYTES``,
        which is not read: it is not the index this writer started from."""
        try:
            return digest_int(self._storage.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES))
        except FileNotFoundError:
            return None
        except TensorStoreError:
            raise
        except ValueError:
            return -1

    # ------------------------------------------------------------------ writing

    def _check_open(self) -> None:
        if self._state != "open":
            raise WriterClosedError(f"writer for {self.location!r} is {self._state}; open a new ShardWriter")

    def write(self, sample: Any) -> None:
        """Queue one sample; it is serialised and compressed in the writer's thread pool (or,
        with ``num_workers``, in its worker processes).

        The sample is checked here, so a bad sample raises from this call (with
        ``num_workers``, the worker checks it: the same error, raised from a later ``write`` or
        from ``close``); its tensors are snapshotted (with ``num_workers``: pickled), so
        changing them after ``write`` returns does not change what is stored.

        Raises:
            UnsupportedSampleError: If ``torch.load(weights_only=True)`` could not load it.
            WriterClosedError: After close, abort or an earlier failure.
        """
        self._check_open()
        if self.num_workers:
            # Pickling copies the tensors' bytes now (the snapshot); the worker takes the
            # same snapshot (_snapshot) of what it unpickles, so the bytes stored are those of
            # the in-process path. The worker checks the sample (dumps -> check_sample): the
            # same error, raised from a later write or close.
            try:
                payload = self._pickler.dumps(sample)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any pickling failure (a local lambda raises AttributeError)
                check_sample(sample)  # the precise message, where the check can tell
                raise UnsupportedSampleError(
                    f"sample: it cannot be sent to a worker process ({type(exc).__name__}: {exc})"
                ) from exc
            if self._fresh_interpreters and _holds_set(sample):
                # Encoded here, in order: the bytes of a set must be this process's (see _setup).
                check_sample(sample)
                try:
                    snapshot = _snapshot(sample)
                except (NotImplementedError, RuntimeError) as exc:
                    raise UnsupportedSampleError(
                        f"sample: its tensors cannot be copied ({type(exc).__name__}: {exc})"
                    ) from exc
                result = _encode(snapshot, self._pool_codec(), self.raw_below)
                self._submit_batch()
                done: cf.Future[Any] = cf.Future()
                done.set_result([result])
                self._pending.append(done)
                while len(self._pending) > self._max_pending:
                    self._drain_one()
                return
            self._batch.append(payload)
            self._batch_bytes += len(payload)
            if len(self._batch) >= _BATCH_RECORDS or self._batch_bytes >= _BATCH_BYTES:
                self._submit_batch()
            return
        check_sample(sample)
        try:
            snapshot = _snapshot(sample)
        except (NotImplementedError, RuntimeError) as exc:  # e.g. torch.uint1 has no copy kernel
            raise UnsupportedSampleError(f"sample: its tensors cannot be copied ({type(exc).__name__}: {exc})") from exc
        if self._layout is not None and not self._dict_pending:  # compact: proved in the pool too
            self._pending.append(self._pool.submit(_encode_proved, snapshot, self._layout))
        else:
            self._pending.append(self._pool.submit(_encode, snapshot, self._pool_codec(), self.raw_below))
        while len(self._pending) > self._max_pending:
            self._drain_one()

    def _pool_codec(self) -> Codec | None:
        """One-record frames with a final codec are compressed in the pool; otherwise the pool
        only serialises and frames are formed in order on this thread (the bytes are the same)."""
        return None if (self._dict_pending or self.frame_target_bytes) else self._codec

    def _submit_batch(self) -> None:
        """Send the pickled samples gathered so far to the worker processes as one task."""
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._submit(_encode_in_worker, batch, self._codec_blob(self._pool_codec()), self.raw_below)
        while len(self._pending) > self._max_pending:
            self._drain_one()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Send one task to the worker processes: ``fn(*args, slot)``. The first task starts
        them; before fork workers start, the shared memory they write frames into is mapped
        (:data:`_SLOTS`: ``max_pending + 1`` slots of ``_SLOT_BYTES``, one per task in flight),
        so that they inherit it. ``slot`` is a free slot's ``(key, index)``, or None."""
        if not self._pool_started and not self._fresh_interpreters:
            count = self._max_pending + 1
            token = next(_INHERIT_TOKENS)
            _SLOTS[token] = mmap.mmap(-1, count * _SLOT_BYTES)  # anonymous and shared: fork keeps it shared
            self._slots, self._free_slots = token, list(range(count))
        slot = (self._slots, self._free_slots.pop()) if self._slots is not None and self._free_slots else None
        try:
            self._pending.append(self._pool.submit(fn, *args, slot))
        except cf.process.BrokenProcessPool as exc:
            self._state = "failed"
            raise self._worker_died() from exc
        except BaseException:
            if slot is not None:
                self._free_slots.append(slot[1])
            raise
        self._pool_started = True

    def write_many(self, samples: Iterable[Any], progress: Callable[[int, int], None] | None = None) -> int:
        """Write every sample of an iterable; return how many were written.

        With ``num_workers`` on ``fork``, a list or tuple (or a pack source's
        :class:`~tensorstore_pt.sources.ColumnRows` or
        :class:`~tensorstore_pt.sources.FileRows`) given to the first call that sends work
        to the workers is not pickled at all: the workers are forked with it and each task
        names a range of its positions (see "Parallel packing" in the class docstring); the
        files of a ``FileRows`` are then loaded by the workers.

        Args:
            samples: The samples, in record order.
            progress: Called as ``progress(samples_handed_over, their_tensor_bytes)`` after
                each sample, or each task of inherited samples, is handed to the writer
                (counted from this call's start; tensor bytes as
                :func:`~tensorstore_pt.serialization.tensor_bytes`; for the inherited files
                of a ``FileRows``, their file sizes).
        """
        if self._inherit_ok(samples):
            return self._write_inherited(samples, progress)  # type: ignore[arg-type]
        n = size = 0
        for sample in samples:
            self.write(sample)
            n += 1
            if progress is not None:
                size += tensor_bytes(sample)
                progress(n, size)
        return n

    def _inherit_ok(self, samples: Iterable[Any]) -> bool:
        """Whether the worker processes can take ``samples`` by inheritance: fork workers not
        started yet (they start at the first task), and a list or tuple (positions to name)."""
        return (
            bool(self.num_workers)
            and not self._fresh_interpreters
            and not self._pool_started
            and self._state == "open"
            and type(samples) in (list, tuple, ColumnRows, FileRows)
        )

    def _write_inherited(self, samples: Sequence[Any], progress: Callable[[int, int], None] | None) -> int:
        """:meth:`write_many` of a list on fork workers: the list is registered before the
        workers fork, so they inherit it; each task is a range of positions (up to
        ``_BATCH_RECORDS`` samples or ``_BATCH_BYTES`` of tensor bytes), encoded by
        :func:`_encode_inherited`. The calling process pickles nothing but the ranges: it only
        writes the frames that come back, in order."""
        self._check_open()
        n = len(samples)
        if n == 0:
            return 0  # no worker starts: registering it would leave it behind once the next list is
        if self._inherited is not None:  # an earlier call failed before any worker started (a file gone)
            _INHERITED.pop(self._inherited, None)
        token = next(_INHERIT_TOKENS)
        _INHERITED[token] = samples
        self._inherited = token
        # Samples of earlier write() calls still batched go first; the workers fork at that
        # first task, so only now that the list is registered (they inherit it).
        self._submit_batch()
        # A directory's files are sized by their file size: only the workers load them.
        item_bytes = samples.item_bytes if type(samples) is FileRows else lambda i: tensor_bytes(samples[i])
        start = total = 0
        while start < n:
            stop, size = start, 0
            while stop < n and stop - start < _BATCH_RECORDS and (stop == start or size < _BATCH_BYTES):
                size += item_bytes(stop)
                stop += 1
            total += size
            self._submit(_encode_inherited, token, start, stop, self._codec_blob(self._pool_codec()), self.raw_below)
            while len(self._pending) > self._max_pending:
                self._drain_one()
            start = stop
            if progress is not None:
                progress(stop, total)
        return n

    def _codec_blob(self, codec: Codec | None) -> tuple[int, bytes] | None:
        """The codec as worker processes get it: (key, pickled codec), pickled once per codec."""
        if codec is None:
            return None
        if self._codec_sent is None or self._codec_sent_for is not codec:
            key = 1 + (self._codec_sent[0] if self._codec_sent is not None else 0)
            self._codec_sent, self._codec_sent_for = (key, pickle.dumps(codec)), codec
        return self._codec_sent

    def _worker_died(self) -> PackWorkerError:
        return PackWorkerError(
            f"writer for {self.location!r}: a worker process died (killed, or out of memory) while encoding; "
            "nothing was published"
        )

    def _drain_one(self) -> None:
        fut = self._pending.popleft()
        try:
            try:
                result = fut.result()
            except cf.process.BrokenProcessPool as exc:
                raise self._worker_died() from exc
            if type(result) is _SlotFrames:
                self._drain_slot(result)
                return
            if type(result) is _Proved:
                self._accept_proved(result)
                return
            results = result if isinstance(result, list) else [result]
            self._emit_results(results)
        except BaseException:
            self._state = "failed"
            raise

    def _drain_slot(self, result: _SlotFrames) -> None:
        """Write the frames a worker left in a shared-memory slot (or sent back, when they did
        not fit), then free the slot."""
        try:
            if result.fallback is not None:
                self._emit_results(result.fallback)
                return
            start = result.slot * _SLOT_BYTES
            with memoryview(_SLOTS[self._slots])[start : start + sum(result.lengths)] as view:  # type: ignore[index]
                if self.frame_target_bytes is None and not any(result.stored_raw):
                    self._emit_run(view, result.lengths, result.raw_lengths, result.checksums)
                    return
                frames = []  # some frames stored raw: frame by frame
                pos = 0
                for n in result.lengths:
                    frames.append(view[pos : pos + n].tobytes())
                    pos += n
                self._emit_results(
                    list(zip([None] * len(frames), result.raw_lengths, frames, result.checksums, result.stored_raw))
                )
        finally:
            self._free_slots.append(result.slot)

    def _emit_results(self, results: list[tuple[bytes | None, int, Any, int, bool]]) -> None:
        """Write the frames (or take the raw records) of one task's results, in order."""
        i = 0
        while i < len(results):
            raw, raw_bytes, frame, checksum, stored_raw = results[i]
            if frame is not None and not stored_raw and self.frame_target_bytes is None:
                j = i + 1  # a run of one-record compressed frames: written in one go
                while j < len(results) and results[j][2] is not None and not results[j][4]:
                    j += 1
                run = results[i:j]
                self._emit_run(
                    b"".join(r[2] for r in run), [len(r[2]) for r in run], [r[1] for r in run], [r[3] for r in run]
                )
                i = j
                continue
            if frame is not None:
                self._emit_frame(frame, checksum, [raw_bytes], stored_raw)
            elif raw is not None:
                self._accept_raw(raw)
            i += 1

    def _accept_raw(self, raw: bytes) -> None:
        if self._dict_pending:
            self._dict_buffer.append(raw)
            self._dict_buffer_bytes += len(raw)
            if self._dict_buffer_bytes >= DICT_SAMPLE_BYTES:
                self._train_dictionary()
            return
        if self._layout is not None:  # compact: frames fill with what a column block holds
            self._accept_proved(_Proved(raw, *columnar.proved(raw, self._layout)))
            return
        self._emit_group(self._grouper.add(raw))

    def _accept_proved(self, record: _Proved) -> None:
        """Take a compact writer's record, proved (:func:`.columnar.proved`), once no
        dictionary is being trained (records are only proved then)."""
        self._emit_group(self._grouper.add((record.raw, record.parts), record.nbytes))

    def _emit_group(self, group: list[bytes] | None) -> None:
        if not group:
            return
        if self._layout is not None:
            self._emit_compact(group)
            return
        self._emit_decoded(group[0] if len(group) == 1 else b"".join(group), [len(r) for r in group])

    def _emit_decoded(self, data: bytes, lengths: list[int]) -> None:
        """Code one frame's decoded bytes ``data`` (records of ``lengths`` bytes) and write it,
        raw where the codec saves too little."""
        self._emit_frame(*_coded_frame(data, lengths, False, self._codec, self.raw_below))

    def _emit_compact(self, group: list[tuple[bytes, Any]]) -> None:
        """Write ``group`` as :func:`.columnar.plan_frames` plans it (format 1.3): column blocks,
        and plain frames for runs of records that do not prove under this writer's layout.

        The filters are chosen here (:func:`.columnar.frame_plans`); the blocks are assembled
        and coded on a coder thread (:func:`_code_plans`: numpy, zstd and lz4 release the GIL)
        while this thread takes the next records, and written in order by
        :meth:`_emit_coded`. At most ``_coders + 1`` groups are in flight."""
        compress = None if self._codec.codec_id == "none" else self._codec.compress
        plans = columnar.frame_plans(group, compress, self._filter_memo)
        self._coding.append(self._submit_code(plans))
        while self._coding and (self._coding[0].done() or len(self._coding) > self._coders + 1):
            self._emit_coded()

    def _submit_code(self, plans: list[columnar.FramePlan]) -> cf.Future[list[_CodedFrame]]:
        """:func:`_code_plans` of ``plans`` on a coder thread; where none can be started (the
        interpreter is exiting), here and now (a done future, its error set)."""
        try:
            if self._coder is None:
                self._coder = cf.ThreadPoolExecutor(max_workers=self._coders, thread_name_prefix="tspt-coder")
            return self._coder.submit(_code_plans, plans, self._codec, self.raw_below)
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            return _done_future(_code_plans, plans, self._codec, self.raw_below)

    def _emit_coded(self) -> None:
        """Write the frames of the oldest group being coded (waiting for it)."""
        for frame in self._coding.popleft().result():
            self._emit_frame(*frame)

    def _stop_coder(self) -> None:
        """Drop the groups being coded and stop the coder threads (after the task they run)."""
        for fut in self._coding:
            fut.cancel()
        self._coding.clear()
        coder, self._coder = self._coder, None
        if coder is not None:
            coder.shutdown(wait=True, cancel_futures=True)

    def _train_dictionary(self) -> None:
        import zstandard

        samples, self._dict_buffer, self._dict_buffer_bytes = self._dict_buffer, [], 0
        self._dict_pending = False
        level = getattr(self._codec, "level", 3)
        # Train on a bounded, evenly spread sample of the buffered records; judge the dictionary
        # on the others (on the sample itself when it took them all: an optimistic gain, so a
        # dictionary is only skipped when even that is small).
        train = dictionary_sample(samples, shardio.DICT_TRAIN_BYTES, shardio.DICT_TRAIN_RECORDS)
        chosen = {id(r) for r in train}
        held_out = [r for r in samples if id(r) not in chosen] or train
        try:
            data, dict_id = train_dictionary(
                train, self._dict_bytes, level, shardio.DICT_TRAIN_BYTES, shardio.DICT_TRAIN_RECORDS
            )
        except zstandard.ZstdError as exc:
            self._skip_dictionary(f"zstd could not train a dictionary from {len(train)} records ({exc})")
        else:
            gain = dictionary_gain(held_out, data, level)
            if gain < DICT_MIN_GAIN:
                self._skip_dictionary(
                    f"the trained dictionary saves {gain:.1%} of the zstd bytes of {len(held_out)} held-out records, "
                    f"below DICT_MIN_GAIN={DICT_MIN_GAIN:.0%}"
                )
            else:
                self._install_dictionary(data, dict_id)
        for raw in samples:
            self._accept_raw(raw)

    def _skip_dictionary(self, why: str) -> None:
        """Write the store without a dictionary: a ``UserWarning`` and ``created_by`` say why."""
        self.dictionary_skipped = why
        warnings.warn(f"dictionary: {why}; {self.location!r} is written without one", UserWarning, stacklevel=4)

    def _install_dictionary(self, data: bytes, dict_id: int) -> None:
        """Write the dictionary file (if new) and switch the codec to use it."""
        from .codecs.zstd import ZstdCodec

        digest = digest_int(data)
        name = f"zstd-dict-{digest:016x}.zdict"
        if name not in self._storage.list():
            with typed_full_disk(self.location, name), self._storage.writer(name) as out:
                out.write(data)
            self._new_files.append(name)
        ref = {"name": name, "checksum": format_digest(digest), "dict_id": dict_id, "bytes": len(data)}
        self._codec = ZstdCodec(getattr(self._codec, "level", 3), data, ref)

    def _use_prepared_dictionary(self, data: bytes) -> None:
        import zstandard

        dict_id = zstandard.ZstdCompressionDict(data).dict_id()
        if self._codec.codec_id != "zstd":
            raise InvalidOptionError(
                f"dictionary: a zstd dictionary needs codec 'zstd', the store uses {self._codec.get_config()}"
            )
        store_dict = getattr(self._codec, "dictionary", None)
        if store_dict is not None:
            if store_dict != data:
                raise InvalidOptionError(
                    f"append to {self.location!r}: the store uses another zstd dictionary "
                    f"({self._codec.get_config().get('dict')}); pass the store's own or none"
                )
            return
        if self.mode == "append" and self._base_shards:
            raise InvalidOptionError(
                f"append to {self.location!r}: the store has no zstd dictionary and one cannot be added to "
                "existing shards; write a new store with the dictionary"
            )
        self._install_dictionary(data, dict_id)

    def _shard_features(self) -> list[str]:
        features = []
        if self.frame_target_bytes is not None:
            features.append(FEATURE_MULTI_RECORD_FRAMES)
        if "dict" in self._codec.get_config():
            features.append(FEATURE_DICTIONARY)
        if self._layout is not None:
            features.append(FEATURE_COLUMNAR_FRAMES)
        return features

    def _emit_frame(
        self,
        frame: bytes,
        checksum: int,
        raw_lengths: list[int],
        stored_raw: bool = False,
        block_bytes: int | None = None,
    ) -> None:
        # typed_full_disk, inlined: this runs once a frame, and try costs nothing until it raises.
        try:
            self._emit_frame_unchecked(frame, checksum, raw_lengths, stored_raw, block_bytes)
        except OSError as exc:
            self._raise_if_full(exc)
            raise

    def _raise_if_full(self, exc: OSError) -> None:
        """Raise a full disk's OSError (not yet typed) as StorageFullError naming the shard."""
        if not isinstance(exc, StorageFullError) and exc.errno in FULL_ERRNOS:
            name = self._open.name if self._open is not None else shard_name(self.token, self._seq)
            raise full_disk_error(exc, self.location, name) from exc

    def _emit_run(
        self, blob: bytes | memoryview, lengths: list[int], raw_lengths: list[int], checksums: list[int]
    ) -> None:
        """:meth:`_emit_frame` of each of a run of one-record frames not stored raw (worker
        results) of ``lengths`` bytes, back to back in ``blob``, with one write per shard they
        go to: the same shards, byte for byte."""
        view = memoryview(blob)
        k = pos = 0
        while k < len(lengths):
            try:
                fresh = self._open is None
                if fresh:
                    self._open_shard()
                shard = self._open
                take = shard.fitting(lengths[k:], self.max_shard_bytes, fresh)  # type: ignore[union-attr]
                if take == 0:
                    self._close_shard()
                    continue
                size = sum(lengths[k : k + take])
                shard.add_run(
                    view[pos : pos + size], lengths[k : k + take], checksums[k : k + take], raw_lengths[k : k + take]
                )  # type: ignore[union-attr]
            except OSError as exc:
                self._raise_if_full(exc)
                raise
            self._count(take, sum(raw_lengths[k : k + take]), size)
            k += take
            pos += size

    def _open_shard(self) -> None:
        features = self._shard_features()
        self._features.update(features)
        meta = footer_meta(features, self._codec.get_config())
        if self._layout is not None:
            meta["columnar_layout"] = self._layout.to_json()
        self._open = ShardBuilder(
            self._storage,
            shard_name(self.token, self._seq),
            self._records,
            meta,
            multi=FEATURE_MULTI_RECORD_FRAMES in features,
        )
        self._seq += 1

    def _emit_frame_unchecked(
        self, frame: bytes, checksum: int, raw_lengths: list[int], stored_raw: bool, block_bytes: int | None = None
    ) -> None:
        if (
            self._open is not None
            and self._open.size_with(len(frame), len(raw_lengths), stored_raw, block_bytes is not None)
            > self.max_shard_bytes
        ):
            self._close_shard()
        if self._open is None:
            self._open_shard()
        self._open.add(frame, checksum, raw_lengths, stored_raw, block_bytes)  # type: ignore[union-attr]
        self._count(len(raw_lengths), sum(raw_lengths), len(frame))

    def _count(self, records: int, raw_bytes: int, stored_bytes: int) -> None:
        """Count frames just added to the open shard: the next record's number and the
        progress counters."""
        self._records += records
        self.records_written += records
        self.raw_bytes_written += raw_bytes
        self.stored_bytes_written += stored_bytes

    def _close_shard(self) -> None:
        """Finish the open shard here and hand its publication to the publisher thread."""
        if self._open is not None:
            shard = self._open
            self._open = None
            try:
                with typed_full_disk(self.location, shard.name):
                    entry = shard.finish()
            except BaseException:
                self._open = shard  # so that abort removes its temporary file
                raise
            if shard.raw_runs:
                self._features.add(FEATURE_RAW_FRAMES)
            self._shards.append(entry)
            self._publishing.append((shard, self._submit_publish(shard)))
            while len(self._publishing) > _MAX_PUBLISHING:
                self._wait_published()

    def _submit_publish(self, shard: ShardBuilder) -> cf.Future[None]:
        """Hand ``shard``'s publication to the publisher thread; where no thread can be
        started or given work (the interpreter is exiting: a writer closed from an atexit
        handler or ``__del__``), publish it here and now (a done future, its error set)."""
        if not self._publish_inline:
            try:
                if self._publisher is None:
                    self._publisher = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tspt-publish")
                return self._publisher.submit(shard.publish)
            except RuntimeError:  # "cannot schedule new futures / can't register atexit after shutdown"
                self._publish_inline = True
        # Its error is raised by _wait_published, as the thread's would be (the shard stays
        # listed, so that abort removes its temporary file).
        return _done_future(shard.publish)

    def _wait_published(self) -> None:
        """Wait for the oldest shard being published; raise its error (a full disk typed as
        :class:`StorageFullError`). A shard whose publication failed stays listed, so that
        abort removes its temporary file."""
        shard, fut = self._publishing[0]
        try:
            with typed_full_disk(self.location, shard.name):
                fut.result()
        except OSError as exc:
            # fsync's EIO says no file: name the shard and the store (errors of ours name them).
            note = f"while publishing shard {shard.name!r} of store {self.location!r} (flush, fsync, link or upload)"
            if not isinstance(exc, TensorStoreError) and note not in getattr(exc, "__notes__", ()):
                exc.add_note(note)
            raise
        self._publishing.popleft()

    # ------------------------------------------------------------------ finishing

    def close(self) -> StoreInfo:
        """Finish: flush pending samples, close the last shard and commit ``index.json``.

        After the commit, an ``overwrite`` removes the old store's shards (a removal that
        fails is named in a warning; the file is unreferenced and ``recover`` quarantines it),
        and the store's lock is released.

        Returns:
            The summary of the published store.

        Raises:
            WriterClosedError: If the writer was aborted or failed.
            StorageFullError: The disk filled up; nothing was published and this writer's
                files were removed.
            ConcurrentWriteError: Another writer changed the store (only possible where the
                file system has no locks); nothing was published.
        """
        if self._state == "closed":
            return self._info
        if self._state == "failed":
            self.abort()  # an earlier write failed: publish nothing, remove what was written
            raise WriterClosedError(f"writer for {self.location!r} failed earlier; nothing was published")
        self._check_open()
        try:
            if self.num_workers:
                self._submit_batch()
            # Nothing more is sent: the workers exit as soon as their last task is done (their
            # teardown overlaps the last shard's writes here, not after the commit). shutdown()
            # drops the pool's references to them, which an abort still needs.
            if isinstance(self._pool, cf.ProcessPoolExecutor):
                self._pool_parts = _pool_parts(self._pool)
            self._pool.shutdown(wait=False)
            while self._pending:
                self._drain_one()
            if self._dict_pending:
                self._train_dictionary()
            self._emit_group(self._grouper.flush())
            while self._coding:
                self._emit_coded()
            self._close_shard()
            while self._publishing:  # every shard is durable before the index names it
                self._wait_published()
            info = IndexInfo.build(
                self._codec.get_config(), self._shards, self._metadata, self._created_by(), tuple(self._features)
            )
            if self._current_index_digest() != self._index_digest:
                raise ConcurrentWriteError(
                    f"{INDEX_NAME} of {self.location!r} was changed by another writer while this one was "
                    "writing; nothing was published (one writer at a time per store)"
                )
            # Atomic where the backend allows: replace only the version read at open, or create
            # only if there is still no index (If-Match / If-None-Match on S3, link(2) locally).
            try:
                with (
                    typed_full_disk(self.location, INDEX_NAME),
                    self._storage.writer(
                        INDEX_NAME, exclusive=self._index_digest is None, **if_match_kwargs(self._index_version)
                    ) as out,
                ):
                    out.write(encode_index(info))
            except FileExistsError as exc:
                raise ConcurrentWriteError(
                    f"{INDEX_NAME} of {self.location!r} was created by another writer while this one was "
                    "writing; nothing was published (one writer at a time per store)"
                ) from exc
        except BaseException as exc:
            left = self.abort()
            if left and hasattr(exc, "add_note"):
                exc.add_note(f"files this writer could not remove (never adopted by recover): {left}")
            raise
        self._state = "closed"
        self._pool.shutdown(wait=True)
        parts, self._pool_parts = self._pool_parts, None  # they hold the result pipe and the workers' fds
        if parts is not None and parts.manager is not None:
            parts.manager.join()  # it reaps the workers (shut down early, above)
        self._stop_coder()
        self._stop_publisher()
        if self._old is not None and self.mode == "overwrite":
            stale = [old.name for old in self._old.shards if old.name not in {s.name for s in self._shards}]
            old_dict = self._old.codec.get("dict")
            new_dict = info.codec.get("dict")
            if isinstance(old_dict, dict) and (new_dict is None or new_dict.get("name") != old_dict.get("name")):
                stale.append(check_shard_name(old_dict.get("name"), "old index: codec.dict.name"))
            left = self._remove_all(stale)
            if left:
                warnings.warn(
                    f"store {self.location!r}: the overwrite is committed, but files of the old store could not be "
                    f"removed: {left}; they are unreferenced (`tspt recover` quarantines them)",
                    UserWarning,
                    stacklevel=2,
                )
        self._release(remove_created_dir=True)
        self._info = StoreInfo.from_index(self.location, info)
        return self._info

    def _created_by(self) -> dict[str, Any]:
        """created_by of the index: the versions, and the writer settings that matter to
        ``merge_stores`` or ``tspt info`` (only where informative)."""
        created = _created_by()
        if self.num_workers:
            created["num_workers"] = self.num_workers
        if self.frame_target_bytes is not None:
            created["frame_target_bytes"] = self.frame_target_bytes
        if self.dictionary_skipped is not None:
            created["dictionary_skipped"] = self.dictionary_skipped
        if FEATURE_RAW_FRAMES in self._features:
            created["raw_below"] = self.raw_below
        if self._layout is not None:
            created["compact"] = True
        return created

    def _remove_all(self, names: list[str]) -> list[str]:
        """Remove every file of ``names``, going on past errors; return ``"name (error)"`` for each
        file that could not be removed."""
        return removal_failures(self._storage.remove_all(names))

    def _release(self, remove_created_dir: bool) -> None:
        """Release the store's lock (clearing its owner record: a clean end). With
        ``remove_created_dir``, also remove the directory this writer created if nothing was
        published in it (it is removed only if empty)."""
        if getattr(self, "_inherited", None) is not None:
            _INHERITED.pop(self._inherited, None)  # the workers are gone: drop the list
            self._inherited = None
        if getattr(self, "_slots", None) is not None:
            _SLOTS.pop(self._slots, None)  # unmapped once the last view of it goes
            self._slots = None
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        if remove_created_dir and self._created_dir and self._state != "closed":
            self._storage.remove_container()

    def abort(self) -> list[str]:
        """Discard everything this writer wrote; the previous store (if any) is untouched.

        Every file this writer created is removed, going on past errors (a full disk, EIO);
        then the lock is released. Files that could not be removed are unreferenced, carry a
        token no index or lock record names, and are never adopted by ``recover``.

        Returns:
            ``"name (error)"`` for each file that could not be removed (empty when all went);
            they are also named in a ``UserWarning``.

        Raises:
            WriterClosedError: The writer already committed its store.
        """
        if self._state == "closed":
            raise WriterClosedError(f"writer for {self.location!r} already committed its store; cannot abort")
        if self._state == "aborted":
            return []
        self._state = "aborted"
        try:
            if isinstance(self._pool, cf.ProcessPoolExecutor):
                # Its futures are left to the executor: it fails them all once the workers are
                # killed, and (Python 3.11) raises in its manager thread on one cancelled here.
                parts, self._pool_parts = getattr(self, "_pool_parts", None), None
                _kill_pool(self._pool, parts)
            else:
                for fut in self._pending:
                    fut.cancel()
                self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            # Even when a Ctrl-C (a second one) interrupts the wait for the pool: a later abort
            # does nothing, so the files and the lock must go now.
            left = self._discard()
        if left:
            warnings.warn(
                f"store {self.location!r}: the failed write could not remove {left}; these files are not part of "
                "the store and `tspt recover` never adopts them (it quarantines them)",
                UserWarning,
                stacklevel=2,
            )
        return left

    def _discard(self) -> list[str]:
        """The rest of :meth:`abort` once the pool is stopped: drop what is buffered, remove this
        writer's files and release the lock; return the files that could not be removed."""
        left: list[str] = []
        self._pending.clear()
        self._batch.clear()
        self._dict_buffer.clear()
        self._grouper.clear()
        if self._open is not None:
            try:
                self._open.out.abort()
            except OSError as exc:
                left.append(f"the temporary file of {self._open.name} ({exc.strerror or exc})")
            self._open = None
        try:
            self._stop_coder()  # (it writes no file: its groups are dropped)
            self._stop_publisher()  # a shard being published is published or failed before its removal
        finally:
            # Also when a (second) Ctrl-C interrupts that wait: a later abort does nothing, so
            # the files and the lock must go now (a shard the thread still links meanwhile is
            # left unreferenced, under this writer's token: recover quarantines it).
            not_ours = set()
            for shard, fut in self._publishing:
                if fut.done() and not fut.cancelled() and isinstance(fut.exception(), ConcurrentWriteError):
                    not_ours.add(shard.name)  # the file of that name is another writer's: never removed
                try:
                    shard.out.abort()  # a failed publication's temporary file (nothing if published)
                except OSError as exc:
                    left.append(f"the temporary file of {shard.name} ({exc.strerror or exc})")
            self._publishing.clear()
            mine = [shard.name for shard in self._shards[self._base_shards :] if shard.name not in not_ours]
            left += self._remove_all(mine + self._new_files)
            del self._shards[self._base_shards :]
            self._release(remove_created_dir=True)
        return left

    def _stop_publisher(self) -> None:
        """Wait for the publisher thread to finish what it was given, and stop it."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.shutdown(wait=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        elif self._state in ("open", "failed"):
            left = self.abort()
            if left and ev is not None and hasattr(ev, "add_note"):
                ev.add_note(f"files this writer could not remove (never adopted by recover): {left}")

    def __del__(self) -> None:  # pragma: no cover - a writer dropped without close/abort
        if getattr(self, "_state", None) in ("open", "failed"):
            try:
                self.abort()
            except (OSError, TensorStoreError):
                pass
        elif getattr(self, "_lock", None) is not None:
            self._release(remove_created_dir=False)


def _worker_init() -> None:
    """Set up a worker process of a parallel pack: SIGINT is left to the calling process
    (which terminates the pool), and torch runs single-threaded."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


_WORKER_CODECS: dict[int, Codec] = {}
#: A task sent to the worker processes holds up to this many samples, or this many bytes of
#: pickled samples (one larger sample travels alone): fewer, larger tasks keep the calling
#: process's per-task cost (futures, pipes, wake-ups) small next to the workers' encoding.
_BATCH_RECORDS = 128
_BATCH_BYTES = 2 * 2**20
#: Finished shards published (fsync, link; uploaded, for a URL) on the writer's publisher
#: thread while it writes the next one; past this many, the writer waits for the oldest. It
#: bounds the temporary files (and, for a URL, the local spool) to this many shards plus the
#: open one.
_MAX_PUBLISHING = 2


def _worker_codec(codec_blob: tuple[int, bytes] | None) -> Codec | None:
    """The codec a task names, unpickled once per worker process (see ``_codec_blob``)."""
    if codec_blob is None:
        return None
    key, blob = codec_blob
    codec = _WORKER_CODECS.get(key)
    if codec is None:
        _WORKER_CODECS.clear()  # one codec at a time (it changes once, when a dictionary is trained)
        codec = _WORKER_CODECS[key] = pickle.loads(blob)
    return codec


def _encode_in_worker(
    batch: list[bytes],
    codec_blob: tuple[int, bytes] | None,
    raw_below: float = 0.0,
    slot: tuple[int, int] | None = None,
) -> list[tuple[bytes | None, int, bytes | None, int, bool]] | _SlotFrames:
    """Run in a worker process: unpickle each sample (:func:`_pickle_sample`), take the
    writer's snapshot of it and :func:`_encode` it; results in batch order (frames put in
    ``slot``, see :func:`_into_slot`)."""
    codec = _worker_codec(codec_blob)
    out = []
    for payload in batch:
        try:
            obj = pickle.loads(payload)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - an object whose rebuild raises (its class's own code)
            raise UnsupportedSampleError(
                f"sample: it cannot be rebuilt in a worker process ({type(exc).__name__}: {exc}); samples hold "
                "tensors, numbers, strings and containers of them"
            ) from exc
        try:
            sample = _snapshot(obj)
        except (NotImplementedError, RuntimeError) as exc:
            raise UnsupportedSampleError(f"sample: its tensors cannot be copied ({type(exc).__name__}: {exc})") from exc
        out.append(_encode(sample, codec, raw_below))
    return _into_slot(out, slot)


#: Sample lists the fork workers of a writer inherit (:meth:`ShardWriter._write_inherited`),
#: by token; an entry lives from before the workers fork until the writer closes or aborts.
_INHERITED: dict[int, Sequence[Any]] = {}
_INHERIT_TOKENS = itertools.count(1)


def _encode_inherited(
    token: int,
    start: int,
    stop: int,
    codec_blob: tuple[int, bytes] | None,
    raw_below: float = 0.0,
    slot: tuple[int, int] | None = None,
) -> list[tuple[bytes | None, int, bytes | None, int, bool]] | _SlotFrames:
    """Run in a fork worker process: :func:`_encode` samples ``start..stop-1`` of the list it
    inherited (``_INHERITED[token]``); results in order. No snapshot is taken: this process's
    copy of the list is the one it forked with, which nothing changes (the bytes are those of
    the snapshot path: a plain sample, one :func:`~tensorstore_pt.serialization.plain_dumps`
    takes, is the same with or without a snapshot; any other is snapshotted first)."""
    samples = _INHERITED.get(token)
    if samples is None:  # a worker that did not fork from the writer's process
        raise PackWorkerError(f"a pack worker process (pid {os.getpid()}) did not inherit the samples it was sent")
    codec = _worker_codec(codec_blob)
    out = []
    options = save_options()  # once: nothing in this worker changes torch's save options
    for i in range(start, stop):
        raw = plain_dumps(samples[i], options)
        if raw is None:
            try:
                snapshot = _snapshot(samples[i])
            except (NotImplementedError, RuntimeError) as exc:
                raise UnsupportedSampleError(
                    f"sample: its tensors cannot be copied ({type(exc).__name__}: {exc})"
                ) from exc
            raw = dumps(snapshot)
        out.append(_frame(raw, codec, raw_below))
    return _into_slot(out, slot)


#: Shared memory that fork workers write a task's frames into, by key (mapped by the writer
#: before its workers fork, ``mmap(-1, ...)``: anonymous and shared, so fork keeps it shared):
#: ``max_pending + 1`` slots of ``_SLOT_BYTES``, one per task in flight. Only the frames'
#: lengths and checksums then travel back through the result pipe, not their bytes (which
#: cost a pickle, a pipe write, a read, an unpickle and a join: most of the calling process's
#: work per record).
_SLOTS: dict[int, mmap.mmap] = {}
#: A slot holds a task's frames up to this size (a task holds up to ``_BATCH_BYTES`` of tensor
#: bytes, or one larger sample, plus each record's ``torch.save`` container); frames that do
#: not fit travel back through the pipe.
_SLOT_BYTES = _BATCH_BYTES + _BATCH_BYTES // 4


class _Proved(NamedTuple):
    """A compact writer's record serialised and proved in its thread pool
    (:func:`_encode_proved`): its ``torch.save`` bytes, its parts (None: it did not prove)
    and the bytes it adds to a frame."""

    raw: bytes
    parts: _ptzip.PtParts | None
    nbytes: int


def _encode_proved(sample: Any, layout: _ptzip.PtLayout) -> _Proved:
    """Serialise one sample and prove it under ``layout`` (a compact writer's pool task)."""
    raw = dumps(sample)
    return _Proved(raw, *columnar.proved(raw, layout))


class _SlotFrames(NamedTuple):
    """A task's results with their frames in shared-memory slot ``slot`` (back to back, in
    order), or, when they did not fit, the results themselves in ``fallback``."""

    slot: int
    lengths: list[int]
    raw_lengths: list[int]
    checksums: list[int]
    stored_raw: list[bool]
    fallback: list[tuple[bytes | None, int, bytes | None, int, bool]] | None = None


def _into_slot(
    out: list[tuple[bytes | None, int, bytes | None, int, bool]], slot: tuple[int, int] | None
) -> list[tuple[bytes | None, int, bytes | None, int, bool]] | _SlotFrames:
    """Run in a worker: put the frames of a task's results ``out`` into its shared-memory
    ``slot`` (key, index) and return their lengths and checksums; ``out`` itself when there is
    no slot (or this process did not inherit it), and in the slot's result when a record has
    no frame (raw records: compressed by the writer) or the frames do not fit."""
    if slot is None:
        return out
    buf = _SLOTS.get(slot[0])
    index = slot[1]
    if buf is None or any(r[2] is None for r in out) or sum(len(r[2]) for r in out) > _SLOT_BYTES:  # type: ignore[arg-type]
        return _SlotFrames(index, [], [], [], [], out)
    pos = index * _SLOT_BYTES
    lengths = []
    for r in out:
        n = len(r[2])  # type: ignore[arg-type]
        buf[pos : pos + n] = r[2]  # type: ignore[index]
        pos += n
        lengths.append(n)
    return _SlotFrames(index, lengths, [r[1] for r in out], [r[3] for r in out], [r[4] for r in out])


#: The pipe that carries the workers' results is widened to this many bytes (Linux
#: ``F_SETPIPE_SZ``; the default is 64 KiB): a task's results (frames that did not fit its
#: shared-memory slot, or a spawned worker's: up to about 2 MiB) then go in a write per MiB
#: instead of one per 64 KiB, each waiting for the calling process to read.
_RESULT_PIPE_BYTES = 2**20


def _widen_result_pipe(pool: cf.ProcessPoolExecutor) -> None:
    """Widen the pipe of ``pool``'s result queue to ``_RESULT_PIPE_BYTES`` where the platform
    allows (Linux; capped by ``/proc/sys/fs/pipe-max-size``); elsewhere, or when refused
    (a user's pipe quota), it keeps its size: only speed depends on it."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    reader = getattr(getattr(pool, "_result_queue", None), "_reader", None)  # CPython's SimpleQueue
    if setpipe is None or reader is None:
        return
    try:
        fcntl.fcntl(reader.fileno(), setpipe, _RESULT_PIPE_BYTES)
    except (OSError, ValueError):
        pass


class _PoolParts(NamedTuple):
    """What :func:`_kill_pool` needs of a process pool, which ``shutdown()`` forgets."""

    processes: list[Any]
    manager: Any
    result_writer: Any


def _pool_parts(pool: cf.ProcessPoolExecutor) -> _PoolParts:
    return _PoolParts(
        list((getattr(pool, "_processes", None) or {}).values()),
        getattr(pool, "_executor_manager_thread", None),
        getattr(getattr(pool, "_result_queue", None), "_writer", None),
    )


def _kill_pool(pool: cf.ProcessPoolExecutor, parts: _PoolParts | None = None) -> None:
    """Terminate a process pool's workers at once (abort, Ctrl-C) and reap them.

    A worker killed while it sends a result (a chunk of encoded frames is larger than a pipe's
    buffer) leaves the executor's manager thread blocked in ``recv()`` on a half-sent message
    for ever: this process holds the result pipe's write end too, so no end of file comes, and
    both ``shutdown(wait=True)`` and the interpreter's exit (``concurrent.futures`` joins its
    manager threads at exit) then hang. So once the workers are dead, our copy of that write
    end is closed: the manager reads end of file, marks the pool broken and winds down.
    """
    # shutdown() drops these references; take them first (``parts``: taken before an
    # earlier ``shutdown(wait=False)``).
    processes, manager, result_writer = parts if parts is not None else _pool_parts(pool)
    if hasattr(pool, "terminate_workers") and getattr(pool, "_processes", None):  # Python 3.14+
        pool.terminate_workers()
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        for proc in processes:
            proc.join(timeout=5)
    finally:
        # Also when a Ctrl-C (a second one) interrupts the wait above: otherwise the workers
        # may outlive it and the manager thread stay blocked, hanging the interpreter's exit.
        for proc in processes:
            if proc.is_alive():  # it outlived SIGTERM, or the wait was interrupted
                proc.kill()
                proc.join(timeout=5)
        if result_writer is not None and not any(proc.is_alive() for proc in processes):
            try:
                result_writer.close()
            except OSError:
                pass
        if manager is not None:
            manager.join(timeout=5)
            if manager.is_alive():
                # Still blocked (a worker that outlived SIGKILL): let the interpreter exit anyway.
                from concurrent.futures import process as cf_process

                getattr(cf_process, "_threads_wakeups", {}).pop(manager, None)


def _reduce_tensor(obj: Any) -> Any:
    """Pickle reducer (``dispatch_table``) of a tensor sent to a worker process: a plain CPU
    strided tensor travels as its storage bytes (copied once, into the pickle) plus
    (dtype, offset, size, stride, requires_grad); anything else takes torch's own pickling."""
    import torch

    if (
        obj.layout != torch.strided
        or obj.device.type != "cpu"
        or obj.is_quantized
        or obj.dtype.itemsize < 1
        or obj.is_conj()
        or obj.is_neg()
        or obj.grad_fn is not None
        or obj.__dict__
    ):
        return obj.__reduce_ex__(5)
    storage = obj.untyped_storage()
    nbytes = storage.nbytes()
    if nbytes and (obj.storage_offset() != 0 or nbytes != obj.numel() * obj.element_size()):
        # A view of a larger storage: send only its data, as the writer's snapshot keeps it.
        obj = _snapshot(obj)
        storage = obj.untyped_storage()
        nbytes = storage.nbytes()
    meta = (str(obj.dtype)[6:], obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.requires_grad)
    if nbytes == 0:
        return _rebuild_tensor, (bytearray(), *meta, type(obj) is torch.nn.Parameter)
    # The storage's bytes in place, read through ctypes: no tensor, array or storage object is
    # made and dropped here (a temporary tensor over the storage, made with set_ and .numpy(),
    # crashed the cycle collector of another thread now and then: a segfault in the executor's
    # manager thread, reproduced without the writer by pickling samples while another thread
    # collects). The view holds the tensor, so the bytes live while the pickle uses them.
    data = storage_view(storage.data_ptr(), nbytes, owner=obj)
    return _rebuild_tensor, (pickle.PickleBuffer(data), *meta, type(obj) is torch.nn.Parameter)


def _rebuild_tensor(
    data: bytearray, dtype: str, offset: int, size: tuple[int, ...], stride: tuple[int, ...], grad: bool, param: bool
) -> Any:
    import torch

    storage = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if len(data) else torch.UntypedStorage(0)
    t = torch.empty(0, dtype=getattr(torch, dtype)).set_(storage, offset, size, stride)
    if param:
        return torch.nn.Parameter(t, requires_grad=grad)
    return t.requires_grad_(True) if grad else t


class _SamplePickler:
    """Pickles samples for the worker processes (protocol 5, tensors by :func:`_reduce_tensor`);
    one per writer, reused (its memo is cleared for each sample). Not thread-safe."""

    def __init__(self) -> None:
        import torch

        self._buf = io.BytesIO()
        self._pickler = pickle.Pickler(self._buf, protocol=5)
        self._pickler.dispatch_table = {torch.Tensor: _reduce_tensor, torch.nn.Parameter: _reduce_tensor}

    def dumps(self, sample: Any) -> bytes:
        self._buf.seek(0)
        self._buf.truncate()
        self._pickler.clear_memo()
        self._pickler.dump(sample)
        return self._buf.getvalue()


def _holds_set(sample: Any) -> bool:
    """Whether a sample holds a set anywhere in its lists, tuples and dicts (the pickler's fast
    path for built-in containers cannot report it)."""
    stack = [sample]
    seen = 0
    while stack:
        obj = stack.pop()
        t = type(obj)
        if t is set:
            return True
        if t in (list, tuple):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        seen += 1
        if seen > 1_000_000:  # pathological nesting: leave it to the worker (values stay equal)
            return False
    return False


def _pickle_sample(sample: Any) -> bytes:
    """Pickle one sample for a worker process (see :class:`_SamplePickler`)."""
    return _SamplePickler().dumps(sample)


def check_metadata(metadata: Any) -> dict[str, Any] | None:
    """A store's user metadata as it will be stored: None, or a JSON round trip of a dict.

    Raises:
        InvalidOptionError: Not a dict, or not JSON-serialisable (NaN and infinities included).
    """
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidOptionError(f"metadata: expected a dict, found {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"metadata: expected a JSON-serialisable dict ({exc})") from exc


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name}: expected a positive int, found {value!r}")


def _check_prepared_dictionary(data: bytes) -> bytes:
    """Check that ``data`` is a zstd dictionary in ZDICT format (magic 0xEC30A437) of a size
    the format allows."""
    if not 8 <= len(data) <= MAX_DICT_BYTES or data[:4] != b"\x37\xa4\x30\xec":
        raise InvalidOptionError(
            f"dictionary: expected a zstd dictionary in ZDICT format (starting with magic 37 a4 30 ec, at most "
            f"{MAX_DICT_BYTES} bytes, as train_zstd_dictionary makes it), found {len(data)} bytes starting "
            f"{data[:4].hex(' ')}"
        )
    return data


def train_zstd_dictionary(samples: Iterable[Any], *, dict_bytes: int = DEFAULT_DICT_BYTES, level: int = 3) -> bytes:
    """Train a zstd dictionary on samples, to share among writers (the parts of one store).

    Each sample is serialised as the writer would (``torch.save`` bytes, views compacted) and
    ``zstandard.train_dictionary`` trains on them. Pass the result to every part's writer as
    ``write_store(..., codec="zstd", dictionary=data)``: all parts then hold the same
    dictionary file and codec config, as :func:`~tensorstore_pt.merge_stores` requires.

    Args:
        samples: The samples to train on (a few thousand representative records, or about
            100 x ``dict_bytes`` of raw bytes, is typical). Training uses a bounded, evenly
            spread sample of them (``shardio.DICT_TRAIN_BYTES``, ``shardio.DICT_TRAIN_RECORDS``),
            so its time is bounded whatever is passed.
        dict_bytes: The dictionary's size in bytes, in [256, 16 MiB].
        level: The zstd level the writers will use.

    Returns:
        The dictionary (ZDICT format), at most ``dict_bytes`` bytes.

    Raises:
        InvalidOptionError: ``dict_bytes`` out of range, or zstd could not train a dictionary
            from these samples (too few or too small).
        UnsupportedSampleError: A sample cannot be stored.
    """
    import zstandard

    if isinstance(dict_bytes, bool) or not isinstance(dict_bytes, int) or not 256 <= dict_bytes <= MAX_DICT_BYTES:
        raise InvalidOptionError(f"dict_bytes: expected an int in [256, {MAX_DICT_BYTES}], found {dict_bytes!r}")
    raws = [dumps(s) for s in samples]
    try:
        data, _ = train_dictionary(raws, dict_bytes, level)
    except zstandard.ZstdError as exc:
        raise InvalidOptionError(
            f"train_zstd_dictionary: zstd could not train a dictionary from {len(raws)} samples ({exc})"
        ) from exc
    return data


def _snapshot(sample: Any, memo: dict[int, Any] | None = None) -> Any:
    """Copy the tensors of a sample so later in-place changes by the caller cannot leak in.
    A tensor that appears more than once (``{"a": x, "b": x}``) is copied once and appears
    as that one copy each time, so ``torch.save`` still writes its storage once (``memo``:
    id of each tensor copied so far -> its copy)."""
    import torch

    if memo is None:
        memo = {}
    if isinstance(sample, torch.Tensor):
        copied = memo.get(id(sample))
        if copied is not None:
            return copied
        src = sample.detach()
        copy = clone_exact(src) if src.layout == torch.strided else src.clone()
        if isinstance(sample, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=sample.requires_grad)
        elif sample.requires_grad:
            copy.requires_grad_(True)
        memo[id(sample)] = copy
        return copy
    t = type(sample)
    if t is list:
        return [_snapshot(v, memo) for v in sample]
    if t is tuple:
        return tuple(_snapshot(v, memo) for v in sample)
    if isinstance(sample, dict):
        return t({k: _snapshot(v, memo) for k, v in sample.items()})  # a mapping: Counter copies counts
    return sample


def _this_torch_layout() -> _ptzip.PtLayout | None:
    """The container layout this torch's ``torch.save`` writes (proved on a small record,
    labelled with the torch version), or None with a warning if it is not one ``_ptzip`` can
    rebuild (then ``compact`` writes plain frames)."""
    import dataclasses

    import torch

    parts = _ptzip.prove(dumps({"probe": torch.zeros(2, dtype=torch.int16)}))
    if parts is None:
        warnings.warn(
            f"compact: torch {torch.__version__}'s torch.save writes a container this tensorstore_pt cannot "
            "rebuild byte for byte; records are stored in plain frames",
            UserWarning,
            stacklevel=3,
        )
        return None
    return dataclasses.replace(parts.layout, writer=f"torch {torch.__version__}")


def write_store(samples: Iterable[Any], path: str | os.PathLike[str] | Storage, **options: Any) -> StoreInfo:
    """Write an iterable of samples as a store in one call.

    Args:
        samples: The samples, in record order.
        path: The store directory, or an fsspec URL (``s3://bucket/prefix``...).
        **options: Any keyword of :class:`ShardWriter` (codec, level, max_shard_bytes,
            metadata, mode, num_workers, num_threads, start_method, dictionary,
            frame_target_bytes, raw_below, storage_options, compact).

    Returns:
        The published store's summary.

    Raises:
        See :class:`ShardWriter` and :meth:`ShardWriter.write`. On any error nothing is
        published.
    """
    with ShardWriter(path, **options) as writer:
        writer.write_many(samples)
    return writer.close()
