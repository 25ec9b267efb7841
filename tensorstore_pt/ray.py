"""Ray Data: write a store from a ``ray.data.Dataset`` and read a store as one.

Needs the ``[ray]`` extra (``pip install tensorstore_pt[ray]``)::

    import ray
    from tensorstore_pt.ray import TensorStoreDatasink, read_store

    ds = ray.data.read_parquet("s3://bucket/raw").map(preprocess)
    ds.write_datasink(TensorStoreDatasink("/mnt/shared/train", codec="zstd"))
    back = read_store("/mnt/shared/train")        # a ray.data.Dataset, one ``id`` column + the fields

Writing (see docs/ray.md for the whole recipe):

- ``on_write_start`` (driver): checks the destination (a store there is refused unless
  ``mode="overwrite"``), draws an id for this write, and trains the zstd dictionary if asked.
- ``write`` (one call per write task, on the workers): writes the task's rows as ONE part, a
  complete store of its own, at ``<dest>/.parts/<write id>/<task index>-<attempt>``.
- ``on_write_complete`` (driver): merges the parts in task-index order into ``<dest>`` with
  :func:`tensorstore_pt.merge.merge_stores` (shards are moved, one ``index.json`` is written
  last), then removes ``<dest>/.parts/<write id>``.
- ``on_write_failed`` (driver): removes ``<dest>/.parts/<write id>``; nothing is published.

Row -> sample (the default ``to_sample``, :func:`row_to_sample`): a row is a dict of column ->
value as Ray Data holds it (``BlockAccessor.to_batch_format("numpy")``, one row at a time,
so numeric scalars are numpy scalars of the column's dtype). The sample is a dict with the
same keys, in column order:

=====================================  ===============================================
row value                              sample value
=====================================  ===============================================
numpy array (bool, int, uint, float,   ``torch.Tensor`` of the same dtype and shape (a
complex)                               copy the sample owns)
numpy scalar of those kinds            0-dim ``torch.Tensor`` of that dtype
Python bool / int / float / complex    0-dim tensor: bool / int64 / float64 / complex128
str, bytes, numpy str/bytes scalars    ``str`` / ``bytes``
numpy array of str/bytes/objects,      a list (nested for ndim > 1) of the converted
list, tuple                            elements (tuple stays tuple)
dict (an Arrow struct)                 dict of the converted values
None                                   None
``torch.Tensor``                       as is
anything else (dates, Decimals...)     :class:`UnsupportedSampleError`: pass ``to_sample``
=====================================  ===============================================

Reading (:func:`read_store`): one read task per group of consecutive shards (or per slice of
a shard when more tasks than shards are asked for); each record becomes one row with an
``id`` column (int64, the record's position in the store). Sample -> row (:func:`sample_to_row`):
a dict sample with str keys gives one column per key; any other sample one column
``"sample"``. A tensor becomes a numpy array of the same dtype and shape (a 0-dim tensor a
numpy scalar); a tensor numpy cannot hold (bfloat16, float8, complex32, sparse, quantized)
raises :class:`UnsupportedSampleError` (pass ``to_row``); other values are passed as they
are (Ray stores what Arrow cannot hold as Python objects).
"""

from __future__ import annotations

import os
import secrets
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np

try:
    import ray
    from ray.data import Datasink, Datasource, ReadTask
    from ray.data.block import BlockAccessor, BlockMetadata
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tensorstore_pt.ray needs Ray Data: install the extra with `pip install 'tensorstore_pt[ray]'` "
        f"(importing ray failed: {_exc})"
    ) from _exc

from .errors import (
    InvalidOptionError,
    StoreChangedError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
    UnsupportedSampleError,
)
from .format import INDEX_NAME, LOCK_NAME, MAX_INDEX_BYTES, new_writer_token, parse_index
from .storage import LocalStorage, Storage, storage_for
from .storage.abc import removal_failures

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .format import StoreInfo
    from .reader import StoreReader

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "PARTS_DIR",
    "TensorStoreDatasink",
    "TensorStoreDatasource",
    "read_store",
    "row_to_sample",
    "sample_to_row",
]

#: The hidden directory (prefix) of a destination that holds the parts of writes in progress.
PARTS_DIR = ".parts"
_MODES = ("create", "overwrite")
#: Default size (bytes of numpy data) of one block a read task yields.
DEFAULT_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- locations


def _join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URL (both use ``/`` here)."""
    return "/".join([base.rstrip("/"), *names])


def _absolute(path: str | os.PathLike[str]) -> str:
    """A local path made absolute on the driver (tasks run in other working directories, on
    other nodes); a URL as it is.

    Raises:
        InvalidOptionError: ``path`` is not a str or os.PathLike of str.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise InvalidOptionError(f"path: expected a str or os.PathLike of str, found {type(text).__name__}")
    return text if "://" in text else os.path.abspath(text)


def _storage(path: str, storage_options: dict[str, Any] | None) -> Storage:
    """The Storage of a path or URL, with ``storage_options`` for fsspec URLs."""
    if storage_options is None:
        return storage_for(path)
    try:
        return storage_for(path, storage_options=storage_options)  # type: ignore[call-arg]
    except TypeError as exc:  # a version without remote storage
        raise InvalidOptionError(
            f"storage_options: this version of tensorstore_pt opens local paths only, found {storage_options!r}"
        ) from exc


def _remove_tree(path: str, storage_options: dict[str, Any] | None, depth: int) -> list[str]:
    """Remove the files under ``path`` and its sub-directories down to ``depth`` levels, then
    the emptied directories; go on past errors and return ``"path (error)"`` for what is left."""
    left: list[str] = []
    storage = _storage(path, storage_options)
    try:
        if not storage.exists():
            return left
        names = storage.list()
    except OSError as exc:
        return [f"{path} ({exc.strerror or exc})"]
    for name in names:
        child = _join(path, name)
        try:
            if depth > 0 and _storage(child, storage_options).is_container():
                left += _remove_tree(child, storage_options, depth - 1)
            else:
                storage.remove(name)
        except OSError as exc:
            left.append(f"{child} ({exc.strerror or exc})")
    try:
        storage.remove_container()
        if not left and storage.exists():
            left.append(f"{path} (not empty)")
    except OSError as exc:
        left.append(f"{path} ({exc.strerror or exc})")
    return left


# --------------------------------------------------------------------------- rows -> samples


def _unsupported(column: str, value: Any) -> UnsupportedSampleError:
    return UnsupportedSampleError(
        f"row column {column!r}: expected numpy arrays or scalars, numbers, str, bytes, None, lists or dicts, "
        f"found {type(value).__module__}.{type(value).__qualname__}; pass to_sample= to map such rows yourself"
    )


def _numeric_tensor(value: np.ndarray | np.generic, column: str) -> torch.Tensor:
    import torch

    arr = np.asarray(value)
    if arr.dtype.kind not in "biufc":
        raise _unsupported(column, value)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    # A C-contiguous copy the sample owns: Arrow-backed arrays are read-only views of a block.
    t = torch.from_numpy(np.array(arr, copy=True, order="C"))
    if t.numel() == 0:  # numpy gives empty arrays 0 strides; torch's own are row-major
        t = torch.empty(t.shape, dtype=t.dtype)
    return t


def _convert(value: Any, column: str) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc":
            return _numeric_tensor(value, column)
        if value.dtype.kind in "USO":
            return _convert(value.tolist(), column)  # nested lists of str / bytes / objects
        raise _unsupported(column, value)
    if isinstance(value, np.generic):
        if isinstance(value, (np.bool_, np.number)):
            return _numeric_tensor(value, column)
        if isinstance(value, np.str_):
            return str(value)
        if isinstance(value, np.bytes_):
            return bytes(value)
        raise _unsupported(column, value)
    if value is None or isinstance(value, (str, bytes, torch.Tensor)):
        return value
    if isinstance(value, bool):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    if isinstance(value, complex):
        return torch.tensor(value, dtype=torch.complex128)
    if isinstance(value, list):
        return [_convert(v, column) for v in value]
    if isinstance(value, tuple):
        return tuple(_convert(v, column) for v in value)
    if isinstance(value, Mapping):
        return {k: _convert(v, f"{column}.{k}") for k, v in value.items()}
    raise _unsupported(column, value)


def row_to_sample(row: Mapping[str, Any]) -> dict[str, Any]:
    """The default row -> sample mapping of :class:`TensorStoreDatasink` (table in the module doc).

    Args:
        row: Column name -> value, as the datasink passes rows (numeric scalars as numpy
            scalars of the column's dtype, tensors as numpy arrays).

    Returns:
        A dict with the row's keys, in order: numeric arrays and scalars as tensors of their
        dtype (scalars 0-dim), strings and bytes as such, lists and dicts converted element
        by element.

    Raises:
        UnsupportedSampleError: A value with no mapping (a datetime, a Decimal, an object
            array of such values...); the message names the column.

    Thread safety: a pure function.
    """
    if not isinstance(row, Mapping):
        raise UnsupportedSampleError(f"row: expected a mapping of column -> value, found {type(row).__name__}")
    return {str(k): _convert(v, str(k)) for k, v in row.items()}


def _block_rows(block: Any) -> Iterator[dict[str, Any]]:
    """The rows of a Ray block as dicts of column -> numpy value (scalars keep their dtype)."""
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    if not isinstance(batch, dict):  # a block of one unnamed column
        batch = {"item": batch}
    columns = list(batch.items())
    n = len(columns[0][1]) if columns else 0
    for i in range(n):
        yield {name: col[i] for name, col in columns}


# --------------------------------------------------------------------------- replacing a store


def _replace_store(staged: Storage, dest: Storage) -> StoreInfo:
    """Publish the store ``staged`` (a directory inside ``dest``) over the store at ``dest``.

    Under ``dest``'s writer lock: the staged shards and dictionary are renamed into ``dest``
    (their names are new: merge tokens, a content-addressed dictionary), ``index.json`` is
    replaced atomically (the commit point: until then readers see the old store), then the
    old store's files that the new index does not name are removed. A crash before the index
    is replaced leaves the old store as it was plus unreferenced shards (``tspt recover``
    quarantines them). Local directories only.
    """
    from .format import StoreInfo
    from .writer import lock_owner

    if not (isinstance(staged, LocalStorage) and isinstance(dest, LocalStorage)):
        raise InvalidOptionError(f"mode='overwrite': supported for local directories only, found {dest.location!r}")
    from .reader import read_index_bytes

    raw = read_index_bytes(staged)  # refuses one past MAX_INDEX_BYTES before reading it
    new = parse_index(raw, f"store {staged.location!r}: {INDEX_NAME}")
    files = [s.name for s in new.shards]
    new_dict = new.codec.get("dict")
    if isinstance(new_dict, dict):
        files.append(new_dict["name"])
    lock = dest.lock(lock_owner(new_writer_token(), "writer", "overwrite"))
    try:
        try:
            old = parse_index(
                dest.read_all(INDEX_NAME, max_bytes=MAX_INDEX_BYTES), f"store {dest.location!r}: {INDEX_NAME}"
            )
        except (FileNotFoundError, TensorStoreError, ValueError):  # ValueError: past MAX_INDEX_BYTES, not read
            old = None  # replaced wholesale; files of an unreadable index are left in place
        for name in files:
            os.replace(staged.root / name, dest.root / name)
        with dest.writer(INDEX_NAME) as out:
            out.write(raw)
        if old is not None:
            keep = set(files)
            stale = [s.name for s in old.shards if s.name not in keep]
            old_dict = old.codec.get("dict")
            if isinstance(old_dict, dict) and old_dict.get("name") not in keep:
                stale.append(old_dict["name"])
            left = removal_failures(dest.remove_all(stale))
            if left:
                warnings.warn(
                    f"store {dest.location!r}: the overwrite is committed, but files of the old store could not be "
                    f"removed: {left}; they are unreferenced (`tspt recover` quarantines them)",
                    UserWarning,
                    stacklevel=3,
                )
    finally:
        lock.release()
    return StoreInfo.from_index(dest.location, new)


# --------------------------------------------------------------------------- the datasink


class TensorStoreDatasink(Datasink):
    """A ``ray.data.Datasink`` writing a dataset as one store: one part per write task, one index.

    ``ds.write_datasink(TensorStoreDatasink(path, ...))`` writes every write task's rows as
    one part (a complete store) under ``<path>/.parts/<write id>/``, and when every task has
    succeeded, merges the parts in write-task order into ``path``: shards are moved (no copy
    on one file system) and one ``index.json`` is committed last. If any task raises, or the
    merge fails, nothing is published and the parts are removed.

    Record order: part ``k`` holds the rows of the write task with ``TaskContext.task_idx ==
    k``, and parts are merged by ``task_idx``. Ray Data numbers write tasks in the order their
    input blocks reach the write operator: the dataset's block order when the dataset's
    ``DataContext.execution_options.preserve_order`` is True, or when the write is fused with
    the read (``read -> map -> write``, one task per read task). With ``preserve_order`` False
    and a non-fused upstream operator, blocks reach the write in the order upstream tasks
    finish, and the record order of the store follows that order.

    Retries: Ray retries a write task whose worker died (``max_retries=-1`` for Ray Data
    tasks); an exception raised by the task is not retried unless ``ray_remote_args`` says
    so. Every attempt writes a directory of its own (``<task_idx>-<random>``), and only the
    attempt that returned is merged: a stale attempt is never adopted and is removed with
    the parts area.

    Args:
        path: The destination store: a local directory, or an fsspec URL (``s3://bucket/x``,
            with ``storage_options``). Every write task and the driver must reach it (a shared
            file system or a bucket).
        codec: ``"zstd"`` (default), ``"lz4"`` or ``"none"``.
        level: Codec level (None: the codec's default).
        max_shard_bytes: Cap on a shard file's size in bytes (default 64 MiB).
        frame_target_bytes: Group consecutive records into frames of about this many raw
            bytes (see :class:`~tensorstore_pt.ShardWriter`); None writes one record a frame.
        metadata: A JSON-serialisable dict stored in the merged store's index.
        mode: ``"create"`` (default: refuse a destination holding a store or other files) or
            ``"overwrite"`` (replace the store there when the merge commits; until then
            readers see the old store).
        to_sample: ``row -> sample``; by default :func:`row_to_sample`. It runs in the write
            tasks, so it must pickle (a module-level function or a picklable callable). The
            row's arrays may be read-only views of Ray's block: copy one before changing it
            (the writer itself snapshots the sample's tensors).
        dictionary: zstd only. Bytes: a prepared dictionary (from
            :func:`~tensorstore_pt.train_zstd_dictionary`) every part uses. True: train one
            in ``on_write_start``, on the driver, from ``dictionary_rows``. The datasink sees
            no rows on the driver (Ray passes ``on_write_start`` the schema only), so the
            sample must come from the caller: ``dictionary_rows=ds.take(1000)`` (which runs
            the pipeline for those rows; its scalars are Python numbers where write tasks see
            numpy scalars, which changes the dictionary's fit a little, never its validity) or
            any representative rows. The dictionary travels to the write tasks inside the
            pickled datasink.
        dictionary_rows: Rows (as ``to_sample`` takes them) to train on, with ``dictionary=True``.
        dict_bytes: Size in bytes of the trained dictionary, in [256, 16 MiB] (default 16 KiB).
        num_threads: Threads each write task uses to serialise and compress (default: the
            writer's default).
        storage_options: fsspec options for URL destinations (``endpoint_url``, ``key``...);
            None for local paths.

    Raises:
        InvalidOptionError: A bad mode, codec, level, size or dictionary (raised here, on the
            driver); from ``on_write_start``: zstd could not train a dictionary from
            ``dictionary_rows``, or ``mode="overwrite"`` of a store that is not a local directory.
        StoreExistsError: From ``on_write_start``: ``mode="create"`` and the destination
            holds a store or other files.
        UnsupportedSampleError: From a write task: a row ``to_sample`` cannot map, or a
            sample the store cannot hold.

    Memory per write task: what :class:`~tensorstore_pt.ShardWriter` holds (a few encoded
    samples in flight and one shard's tables) plus the block Ray hands it. The driver holds
    one small dict per write task. Thread/fork safety: the datasink is used by Ray as
    documented for ``Datasink`` (callbacks on the driver, ``write`` in task processes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: str = "zstd",
        level: int | None = None,
        max_shard_bytes: int | None = None,
        frame_target_bytes: int | None = None,
        metadata: dict[str, Any] | None = None,
        mode: str = "create",
        to_sample: Callable[[dict[str, Any]], Any] | None = None,
        dictionary: bool | bytes = False,
        dictionary_rows: Iterable[Mapping[str, Any]] | None = None,
        dict_bytes: int | None = None,
        num_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from .codecs import make_codec
        from .codecs.registry import MAX_DICT_BYTES
        from .writer import DEFAULT_DICT_BYTES

        if mode not in _MODES:
            raise InvalidOptionError(f"mode: expected one of {list(_MODES)}, found {mode!r}")
        if to_sample is not None and not callable(to_sample):
            raise InvalidOptionError(f"to_sample: expected a callable row -> sample, found {type(to_sample).__name__}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise InvalidOptionError(
                f"storage_options: expected a dict or None, found {type(storage_options).__name__}"
            )
        make_codec(codec, level)  # validates codec and level here, on the driver
        self.path = _absolute(path)
        self.mode = mode
        self.storage_options = storage_options
        self._to_sample = to_sample
        self._writer_options: dict[str, Any] = {"codec": codec, "level": level}
        for name, value in (
            ("max_shard_bytes", max_shard_bytes),
            ("frame_target_bytes", frame_target_bytes),
            ("num_threads", num_threads),
        ):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidOptionError(f"{name}: expected a positive int, found {value!r}")
                self._writer_options[name] = value
        if metadata is not None:
            import json

            if not isinstance(metadata, dict):
                raise InvalidOptionError(f"metadata: expected a dict, found {type(metadata).__name__}")
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidOptionError(f"metadata: expected a JSON-serialisable dict ({exc})") from exc
        self.metadata = metadata
        if isinstance(dictionary, (bytes, bytearray, memoryview)):
            self._dictionary: bytes | None = bytes(dictionary)
            self._dictionary_rows: list[Mapping[str, Any]] | None = None
        elif dictionary is True:
            if dictionary_rows is None:
                raise InvalidOptionError(
                    "dictionary=True: pass dictionary_rows= (e.g. ds.take(1000)); a Datasink sees no rows on the "
                    "driver, and the dictionary must be trained once, before the write tasks start"
                )
            self._dictionary = None
            self._dictionary_rows = list(dictionary_rows)
        elif dictionary is False:
            self._dictionary = None
            self._dictionary_rows = None
        else:
            raise InvalidOptionError(f"dictionary: expected True, False or dictionary bytes, found {dictionary!r}")
        if (dictionary is not False) and codec != "zstd":
            raise InvalidOptionError(f"dictionary: only codec 'zstd' takes a dictionary, found codec {codec!r}")
        self._dict_bytes = DEFAULT_DICT_BYTES if dict_bytes is None else dict_bytes
        if (
            isinstance(self._dict_bytes, bool)
            or not isinstance(self._dict_bytes, int)
            or not (256 <= self._dict_bytes <= MAX_DICT_BYTES)
        ):
            raise InvalidOptionError(f"dict_bytes: expected an int in [256, {MAX_DICT_BYTES}], found {dict_bytes!r}")
        self._write_id: str | None = None
        #: The parts, in order, of a merge that stopped midway (kept so that
        #: ``merge_stores(unfinished_parts, path)`` can finish it); empty otherwise.
        self.unfinished_parts: list[str] = []
        #: The merged store's summary, set by ``on_write_complete``.
        self.result: StoreInfo | None = None

    # ------------------------------------------------------------------ driver: start

    @property
    def parts_path(self) -> str:
        """Where this write's parts are (``<path>/.parts/<write id>``); set by ``on_write_start``."""
        if self._write_id is None:
            raise InvalidOptionError("parts_path: this datasink has not started a write yet")
        return _join(self.path, PARTS_DIR, self._write_id)

    def _check_destination(self) -> None:
        storage = _storage(self.path, self.storage_options)
        if not storage.exists():
            return
        if not storage.is_container():
            raise StoreExistsError(f"{self.path!r} exists and is not a directory; expected a directory or a new path")
        names = [n for n in storage.list() if n not in (LOCK_NAME, PARTS_DIR)]
        if self.mode == "overwrite" and INDEX_NAME in names and not isinstance(storage, LocalStorage):
            raise InvalidOptionError(
                f"mode='overwrite': replacing a store is supported for local directories only, found {self.path!r}; "
                "write to a new location"
            )
        if self.mode == "create":
            if INDEX_NAME in names:
                raise StoreExistsError(f"create: a store already exists at {self.path!r}; use mode='overwrite'")
            if names:
                raise StoreExistsError(
                    f"create: {self.path!r} is not empty ({len(names)} files, e.g. {names[0]!r}); expected a new or "
                    "empty directory"
                )

    def on_write_start(self, schema: Any = None) -> None:
        """Check the destination and draw this write's id (on the driver, before any task).

        Raises:
            StoreExistsError: ``mode="create"`` and the destination holds a store or files.
        """
        from .writer import train_zstd_dictionary

        self._check_destination()
        if self._dictionary_rows is not None:
            to_sample = self._to_sample or row_to_sample
            level = self._writer_options["level"]
            self._dictionary = train_zstd_dictionary(
                (to_sample(row) for row in self._dictionary_rows),
                dict_bytes=self._dict_bytes,
                level=3 if level is None else level,
            )
            self._dictionary_rows = None  # trained once; the rows need not travel to the tasks
        self._write_id = secrets.token_hex(8)
        self.unfinished_parts = []
        self.result = None

    # ------------------------------------------------------------------ workers: write

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        """Write this task's rows as one part; runs in a write task.

        Returns:
            ``{"task_idx", "part", "records"}``: the task's index, the part's location and
            how many records it holds.

        Raises:
            UnsupportedSampleError: A row cannot be mapped, or a sample cannot be stored.
        """
        from .writer import ShardWriter

        to_sample = self._to_sample or row_to_sample
        task_idx = int(ctx.task_idx)
        # One directory per attempt: a retried task never writes into a stale attempt's part.
        part = _join(self.parts_path, f"{task_idx:06d}-{secrets.token_hex(4)}")
        storage = _storage(part, self.storage_options)
        options = dict(self._writer_options)
        if self._dictionary is not None:
            options["dictionary"] = self._dictionary
        with ShardWriter(storage, mode="create", **options) as writer:
            for block in blocks:
                for row in _block_rows(block):
                    writer.write(to_sample(row))
        info = writer.close()
        return {"task_idx": task_idx, "part": part, "records": info.records}

    # ------------------------------------------------------------------ driver: finish

    def on_write_complete(self, write_result: Any) -> None:
        """Merge the parts in task-index order into the destination, then remove the parts area.

        With ``mode="overwrite"`` of an existing store, the parts are merged next to it
        (``<parts area>/merged``), then its shards are moved in and ``index.json`` replaced
        (the one commit point), and the old store's files are removed.

        Raises:
            StoreExistsError, StoreBusyError: From the merge (another writer got there
                first); nothing of this write is published.
        """
        from .merge import JOURNAL_NAME, merge_stores
        from .writer import write_store

        if self._write_id is None:  # no input block reached the write (an empty dataset)
            self.on_write_start()
        returns = sorted(write_result.write_returns, key=lambda r: r["task_idx"])
        seen = [r["task_idx"] for r in returns]
        if len(set(seen)) != len(seen):
            raise TensorStoreError(f"write {self._write_id}: a write task reported twice (task indices {seen})")
        dest = _storage(self.path, self.storage_options)
        replace = self.mode == "overwrite" and dest.exists() and INDEX_NAME in dest.list()
        target = _storage(_join(self.parts_path, "merged"), self.storage_options) if replace else dest
        if returns:
            parts = [_storage(r["part"], self.storage_options) for r in returns]
            try:
                info = merge_stores(parts, target, metadata=self.metadata or {})
            except StoreNotFoundError as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(
                        "a part a write task committed is not visible from the driver: the destination must be on "
                        "storage every node reaches (a shared file system, or an object-store URL)"
                    )
                raise
            except BaseException as exc:
                if target.exists() and JOURNAL_NAME in target.list():
                    # The merge changed things before it failed: the parts now belong to it.
                    self.unfinished_parts = [r["part"] for r in returns]
                    if hasattr(exc, "add_note"):
                        exc.add_note(
                            f"the merge into {target.location!r} stopped midway; finish it with "
                            f"tensorstore_pt.merge_stores({self.unfinished_parts!r}, {target.location!r}) (the parts are "
                            "kept for that)"
                        )
                raise
        else:
            options = dict(self._writer_options)
            if self._dictionary is not None:
                options["dictionary"] = self._dictionary
            info = write_store([], target, metadata=self.metadata, **options)
        self.result = _replace_store(target, dest) if replace else info
        self._cleanup()

    def on_write_failed(self, error: Exception) -> None:
        """Remove this write's parts area; nothing is published.

        Exception: if the merge failed after it began moving shards (its journal is in the
        destination), the parts belong to that merge and are kept; a ``UserWarning`` names
        the ``merge_stores`` call that finishes it (merge is idempotent).
        """
        if self.unfinished_parts:
            warnings.warn(
                f"store {self.path!r}: the merge stopped midway ({type(error).__name__}: {error}); the parts are kept: "
                f"finish it with tensorstore_pt.merge_stores({self.unfinished_parts!r}, ...) as the error's note says",
                UserWarning,
                stacklevel=2,
            )
            return
        if self._write_id is not None:
            self._cleanup()

    def _cleanup(self) -> None:
        left = _remove_tree(self.parts_path, self.storage_options, depth=1)
        parts_root = _storage(_join(self.path, PARTS_DIR), self.storage_options)
        try:
            if parts_root.exists() and not parts_root.list():
                parts_root.remove_container()
        except OSError:
            pass
        if left:
            warnings.warn(
                f"store {self.path!r}: could not remove parts of write {self._write_id}: {left}; they are never "
                "part of the store (remove them by hand)",
                UserWarning,
                stacklevel=3,
            )

    def get_name(self) -> str:
        return "TensorStore"


# --------------------------------------------------------------------------- samples -> rows


def _to_numpy(value: Any, rid: int, key: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise UnsupportedSampleError(
            f"record {rid}, field {key!r}: a {t.layout} {'quantized ' if t.is_quantized else ''}tensor has no numpy "
            "form; pass to_row= to map it yourself"
        )
    try:
        arr = t.cpu().resolve_conj().resolve_neg().contiguous().numpy()
    except (TypeError, RuntimeError) as exc:
        raise UnsupportedSampleError(
            f"record {rid}, field {key!r}: torch dtype {t.dtype} has no numpy equivalent ({exc}); pass to_row= "
            "to map it yourself (e.g. .float())"
        ) from exc
    return arr[()] if arr.ndim == 0 else arr


def sample_to_row(sample: Any, record_id: int = -1) -> dict[str, Any]:
    """The default sample -> row mapping of :func:`read_store` (without the ``id`` column).

    Args:
        sample: A sample as read from the store.
        record_id: The record's position, for error messages.

    Returns:
        For a dict sample with str keys, one entry per key; otherwise ``{"sample": ...}``.
        Tensors become numpy arrays of the same dtype and shape (0-dim: numpy scalars);
        other values pass as they are.

    Raises:
        UnsupportedSampleError: A tensor numpy cannot hold (bfloat16, float8, sparse...).
    """
    if isinstance(sample, dict) and sample and all(isinstance(k, str) for k in sample):
        return {k: _to_numpy(v, record_id, k) for k, v in sample.items()}
    return {"sample": _to_numpy(sample, record_id, "sample")}


def _column(values: list[Any]) -> np.ndarray:
    """One column of a batch: stacked when every value is a numeric numpy array or scalar of
    one dtype and shape, else an object array holding the values as they are."""
    first = values[0]
    if isinstance(first, (np.ndarray, np.generic)) and first.dtype.kind in "biufc":
        if all(
            isinstance(v, (np.ndarray, np.generic)) and v.dtype == first.dtype and v.shape == first.shape
            for v in values
        ):
            return np.stack(values) if isinstance(first, np.ndarray) else np.array(values, dtype=first.dtype)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def _rows_to_block(ids: list[int], rows: list[dict[str, Any]], id_column: str) -> Any:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    batch = {id_column: np.array(ids, dtype=np.int64)}
    for key in keys:
        batch[key] = _column([row.get(key) for row in rows])
    return BlockAccessor.batch_to_block(batch)


def _read_records(
    reader: StoreReader,
    start: int,
    stop: int,
    to_row: Callable[[Any], dict[str, Any]] | None,
    id_column: str,
    block_bytes: int,
) -> Iterator[Any]:
    """Read records ``[start, stop)`` and yield them as blocks of about ``block_bytes`` raw bytes."""
    ids: list[int] = []
    rows: list[dict[str, Any]] = []
    pending = 0
    for i in range(start, stop):
        sample = reader[i]
        row = to_row(sample) if to_row is not None else sample_to_row(sample, i)
        if not isinstance(row, dict):
            raise InvalidOptionError(f"to_row: expected a dict of column -> value for record {i}, found {type(row)}")
        if id_column in row:
            raise InvalidOptionError(
                f"record {i}: the row already has a column {id_column!r}; pass another id_column= to read_store"
            )
        ids.append(i)
        rows.append(row)
        pending += sum(v.nbytes for v in row.values() if isinstance(v, (np.ndarray, np.generic))) + 8
        if pending >= block_bytes:
            yield _rows_to_block(ids, rows, id_column)
            ids, rows, pending = [], [], 0
    if rows:
        yield _rows_to_block(ids, rows, id_column)


def _split(bounds: np.ndarray, parallelism: int) -> list[tuple[int, int, list[int]]]:
    """Contiguous record ranges ``(start, stop, shard indices)`` for at most ``parallelism`` tasks,
    in store order: runs of whole shards when there are enough shards, else slices of shards."""
    shards = [si for si in range(len(bounds)) if bounds[si, 1] > bounds[si, 0]]
    if not shards:
        return []
    parallelism = max(1, parallelism)
    if len(shards) >= parallelism:
        total = sum(int(bounds[si, 1] - bounds[si, 0]) for si in shards)
        out: list[tuple[int, int, list[int]]] = []
        group: list[int] = []
        done = 0
        for k, si in enumerate(shards):
            group.append(si)
            done += int(bounds[si, 1] - bounds[si, 0])
            left_tasks = parallelism - len(out) - 1
            left_shards = len(shards) - k - 1
            if left_shards == left_tasks or (left_tasks > 0 and done * parallelism >= total * (len(out) + 1)):
                out.append((int(bounds[group[0], 0]), int(bounds[group[-1], 1]), group))
                group = []
        if group:
            out.append((int(bounds[group[0], 0]), int(bounds[group[-1], 1]), group))
        return out
    base, extra = divmod(parallelism, len(shards))
    out = []
    for k, si in enumerate(shards):
        lo, hi = int(bounds[si, 0]), int(bounds[si, 1])
        slices = min(base + (k < extra), hi - lo)
        cuts = np.linspace(lo, hi, slices + 1).round().astype(int)
        out += [(int(a), int(b), [si]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return out


class TensorStoreDatasource(Datasource):
    """A ``ray.data.Datasource`` over one store; :func:`read_store` is the usual entry point.

    The store is opened (and, with ``verify``, its shards checked) on the driver when the
    datasource is made; read tasks reopen it by location and refuse a store replaced since
    (:class:`~tensorstore_pt.errors.StoreChangedError`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        to_row: Callable[[Any], dict[str, Any]] | None = None,
        id_column: str = "id",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        from .reader import open_store

        super().__init__()
        if to_row is not None and not callable(to_row):
            raise InvalidOptionError(f"to_row: expected a callable sample -> dict, found {type(to_row).__name__}")
        if not isinstance(id_column, str) or not id_column:
            raise InvalidOptionError(f"id_column: expected a non-empty str, found {id_column!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
            raise InvalidOptionError(f"block_bytes: expected a positive int, found {block_bytes!r}")
        self.path = _absolute(path)
        storage = _storage(self.path, storage_options)
        checked = open_store(storage, verify=verify)
        # The reader shipped to the tasks: no per-task footer checks (the driver did them);
        # unpickled in a task it reopens the store and refuses another version of it.
        self._reader = open_store(storage, verify=False)
        if self._reader.index_digest != checked.index_digest:
            raise StoreChangedError(f"store {self.path!r} was replaced while it was being opened; read it again")
        checked.close()
        self._to_row = to_row
        self._id_column = id_column
        self._block_bytes = block_bytes
        self._bounds = self._reader.shard_bounds()
        self._raw = [s.raw_bytes for s in self._reader.index.shards]
        self._names = [s.name for s in self._reader.index.shards]

    def __len__(self) -> int:
        return len(self._reader)

    def estimate_inmemory_data_size(self) -> int | None:
        return int(sum(self._raw))

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        reader, to_row, id_column, block_bytes = self._reader, self._to_row, self._id_column, self._block_bytes
        for start, stop, shards in _split(self._bounds, parallelism):
            whole = sum(int(self._bounds[si, 1] - self._bounds[si, 0]) for si in shards)
            raw = int(sum(self._raw[si] for si in shards) * (stop - start) / max(1, whole))
            meta = BlockMetadata(
                num_rows=stop - start,
                size_bytes=raw,
                input_files=[self._names[si] for si in shards],
                exec_stats=None,
            )

            def read_fn(start: int = start, stop: int = stop) -> Iterator[Any]:
                return _read_records(reader, start, stop, to_row, id_column, block_bytes)

            tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "TensorStore"


def read_store(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    verify: bool = True,
    to_row: Callable[[Any], dict[str, Any]] | None = None,
    id_column: str = "id",
    preserve_order: bool = True,
    override_num_blocks: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    ray_remote_args: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """Read a store as a ``ray.data.Dataset``, shard-parallel, one row per record.

    Args:
        path: The store: a local directory, or an fsspec URL (``s3://bucket/x``...).
        storage_options: fsspec options for URL stores.
        verify: Check on the driver, before any task runs, that every shard exists with the
            size and footer the index records (per-record checksums are checked on every
            read regardless).
        to_row: ``sample -> dict`` of column -> value; by default :func:`sample_to_row`.
            Runs in the read tasks (it must pickle).
        id_column: Name of the int64 column holding each record's position in the store.
        preserve_order: Keep the store's record order in the dataset (sets the dataset's
            ``DataContext.execution_options.preserve_order``; ids are exact either way).
        override_num_blocks: Number of read tasks (default: Ray's choice). Each task reads a
            run of whole consecutive shards, or a slice of one shard when there are more
            tasks than shards.
        block_bytes: A task yields a block every this many bytes of numpy data (default
            64 MiB).
        ray_remote_args: Passed to the read tasks (``num_cpus``, ``memory``...).

    Returns:
        The dataset: column ``id_column`` (int64) plus the sample's columns (module doc).

    Raises:
        StoreNotFoundError, NotAStoreError, IndexFormatError, UnsupportedFormatError,
        MissingShardError, ShardSizeError, ShardFormatError: As :func:`~tensorstore_pt.open_store`,
            raised here on the driver.
        InvalidOptionError: A bad option.
        StoreChangedError: From a read task: the store was replaced after this call.
        UnsupportedSampleError: From a read task: a tensor with no numpy form.

    Memory per read task: one block of rows (about ``block_bytes``) plus the reader's footer
    tables of the shards it reads (32 bytes a record).
    """
    source = TensorStoreDatasource(
        path,
        storage_options=storage_options,
        verify=verify,
        to_row=to_row,
        id_column=id_column,
        block_bytes=block_bytes,
    )
    ds = ray.data.read_datasource(source, override_num_blocks=override_num_blocks, ray_remote_args=ray_remote_args)
    if preserve_order:
        ds.context.execution_options.preserve_order = True
    return ds
