"""Pack sources: how ``tspt pack`` and ``tspt audit`` read a user's ``.pt`` files.

A source is what people ``torch.save`` to hold a dataset:

- a ``.pt`` file holding a tuple of equal-length tensors, ``torch.save((data, labels))``
  with ``data`` (N, ...) and ``labels`` (N,): N samples ``(data[i], labels[i])``
  (layout ``"columns"``);
- a ``.pt`` file holding a list or tuple of samples, ``torch.save([t0, t1, t2])``
  (layout ``"rows"``: each element is one sample);
- a ``.pt`` file holding a dict of equal-length columns, ``torch.save({"input": (N, 100),
  "target": (N,)})``: N samples ``{"input": ..., "target": ...}``;
- a directory of ``.pt`` files, one sample each, taken in natural sort order (``x2.pt``
  before ``x10.pt``); with ``recursive=True`` its subdirectories too (``train/``, ``val/``),
  in natural order of their relative paths. Other files, and subdirectories without
  ``recursive``, are reported in :attr:`Source.skipped`, never silently ignored.

A list or tuple whose elements are all tensors sharing a leading dimension, where neither
reading is clearly meant (a list, or a tuple of tensors of one shape), is ambiguous: it is
refused with both readings and their record counts, and ``layout="rows"`` or
``layout="columns"`` says which is meant. An empty source (an empty list, dict or directory)
is refused the same way for files and directories.

Files are loaded with weights-only semantics (:func:`tensorstore_pt.serialization.loads`):
a file that asks for anything else is refused, never run, and the refusal names the place
inside the file (``[3]["meta"]: numpy.ndarray``).
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidOptionError, StoreNotFoundError, TensorStoreError, UnsafePayloadError

__all__ = [
    "LAYOUTS",
    "PT_MAGICS",
    "ColumnRows",
    "FileRows",
    "Source",
    "iter_source",
    "load_pt_bytes",
    "natural_key",
    "open_source",
    "pt_files",
    "rows",
    "scan_directory",
    "unsafe_places",
]

#: A torch.save file starts as a zip (torch >= 1.6) or a legacy pickle (protocol 2 opener).
PT_MAGICS = (b"PK\x03\x04", b"\x80\x02")

#: How a list or tuple of tensors is read: ``rows`` (each element is one sample) or
#: ``columns`` (each element is a column; sample i takes row i of each).
LAYOUTS = ("rows", "columns")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders digit runs by value: ``x2`` before ``x10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


#: errno values pathlib's ``is_dir``/``is_file`` answer False for (a dangling or looping link)
#: where ``os.DirEntry`` raises; the scan answers as pathlib did.
_IGNORED_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def _entry_is(entry: os.DirEntry[str], kind: str) -> bool:
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as exc:
        if exc.errno in _IGNORED_ERRNOS:
            return False
        raise


def scan_directory(directory: Path, recursive: bool = False) -> tuple[list[Path], list[str]]:
    """The ``.pt`` files of a directory, and what was skipped.

    One ``os.scandir`` a directory (entry types from the directory listing, no ``stat`` per
    file where the file system reports them) and one natural-sort key per entry: a directory of
    100,000 files is scanned in well under a second.

    Returns:
        (files, skipped): ``.pt`` files in natural sort order of their path relative to
        ``directory`` (with ``recursive``, those of every subdirectory too); ``skipped``
        names, relative to ``directory``, the other files and, without ``recursive``, the
        subdirectories (``"train/ (12 .pt files)"``).
    """
    found: list[tuple[list[Any], Path]] = []  # (natural key of each part of the relative path, file)
    skipped: list[str] = []

    def walk(d: str, rel: str, key: list[Any]) -> None:
        with os.scandir(d) as it:
            entries = sorted(((natural_key(e.name), e) for e in it), key=lambda ke: ke[0])
        for name_key, e in entries:
            name = e.name
            relname = os.path.join(rel, name) if rel else name
            if _entry_is(e, "dir"):  # follows a link to a directory, as Path.is_dir
                if recursive:
                    walk(e.path, relname, [*key, name_key])
                else:
                    n = sum(1 for q in Path(e.path).rglob("*.pt") if q.is_file())
                    skipped.append(f"{relname}/ (a subdirectory, {n} .pt file(s); pass --recursive to pack them)")
            elif os.path.splitext(name)[1] == ".pt" and _entry_is(e, "file"):  # Path.suffix: ".pt" alone has none
                found.append(([*key, name_key], Path(e.path)))
            else:
                skipped.append(f"{relname} (not a .pt file)")

    walk(os.fspath(directory), "", [])
    found.sort(key=lambda kf: kf[0])
    return [f for _, f in found], skipped


def pt_files(directory: Path, recursive: bool = False) -> list[Path]:
    """The ``.pt`` files of a directory in natural sort order (see :func:`scan_directory`).

    Raises:
        InvalidOptionError: There are none (the message says what the directory holds).
    """
    files, skipped = scan_directory(directory, recursive)
    if not files:
        held = f"; it holds {', '.join(skipped[:5])}" + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        raise InvalidOptionError(
            f"nothing to pack: {str(directory)!r} has no .pt files (expected .pt files, one sample each)"
            + (held if skipped else ": the directory is empty")
        )
    return files


# --------------------------------------------------------------------------- unsafe places


class _Stub:
    """Stands for a global a ``.pt`` file names: built from the pickle, never calls anything."""

    _tspt_global = "?"
    _tspt_safe = True

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def what(self) -> str:
        first = self.args[0] if self.args else None
        if isinstance(first, type) and issubclass(first, _Stub) and not first._tspt_safe:
            return first._tspt_global  # numpy's _reconstruct(ndarray, ...), copyreg's _reconstructor(cls, ...)
        return type(self)._tspt_global


_SAFE_MODULES = ("torch", "builtins", "collections", "_codecs")
_REAL = {("collections", "OrderedDict"): dict, ("builtins", "set"): set, ("builtins", "frozenset"): frozenset}


class _ScanUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL:
            return _REAL[(module, name)]
        safe = module.split(".")[0] in _SAFE_MODULES and module != "copyreg"
        return type(name, (_Stub,), {"_tspt_global": f"{module}.{name}", "_tspt_safe": safe})

    def persistent_load(self, pid: Any) -> Any:
        return None


def _fmt_key(k: Any) -> str:
    return f"[{k!r}]"


def _walk_unsafe(obj: Any, path: str, out: list[tuple[str, str]], depth: int = 0) -> None:
    if depth > 100 or len(out) >= 5:
        return
    if isinstance(obj, _Stub):
        if not type(obj)._tspt_safe or obj.what() != type(obj)._tspt_global:
            out.append((path, obj.what()))
        return
    if isinstance(obj, type) and issubclass(obj, _Stub) and not obj._tspt_safe:
        out.append((path, obj._tspt_global))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk_unsafe(v, path + _fmt_key(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk_unsafe(v, f"{path}[{i}]", out, depth + 1)


def unsafe_places(data: bytes) -> list[tuple[str, str]]:
    """Where a ``.pt`` file's pickle names globals outside the weights-only allow-list.

    The pickle is read with every global replaced by an inert stand-in, so nothing it names
    is imported or run. Returns up to 5 ``(path, global)`` pairs, e.g.
    ``('[3]["meta"]', 'numpy.ndarray')``; empty when the places cannot be told.
    """
    try:
        pkl: bytes | None = None
        if data.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                pkl = zf.read(names[0]) if names else None
        else:
            pkl = data
        if pkl is None:
            return []
        obj = _ScanUnpickler(io.BytesIO(pkl)).load()
    except Exception:  # noqa: BLE001 - best effort: the caller's refusal stands without places
        return []
    out: list[tuple[str, str]] = []
    _walk_unsafe(obj, "", out)
    return [(p or "(the whole file)", g) for p, g in out]


def _fix_for(global_name: str) -> str:
    if global_name.startswith("numpy"):
        return "convert numpy arrays with torch.from_numpy(arr) (or .item() for a scalar) and save again"
    return "save only tensors, builtin containers and int/float/bool/str/bytes/None"


def load_pt_bytes(data: bytes, where: str) -> Any:
    """Load the bytes of a ``.pt`` file with weights-only semantics.

    Raises:
        InvalidOptionError: Not a torch.save file (checked from its first bytes, then by loading).
        UnsafePayloadError: Its pickle asks for globals outside torch's weights-only allow-list;
            nothing from it was run. The message names the places in the file
            (``[0]["meta"]: numpy.ndarray``) where they can be told.
    """
    from .serialization import loads

    if not data.startswith(PT_MAGICS):
        raise InvalidOptionError(
            f"{where}: not a torch.save file (expected a zip or pickle header, found {data[:8]!r})"
        )
    try:
        return loads(data, "cpu")
    except UnsafePayloadError as exc:
        places = unsafe_places(data)
        if places:
            listed = "; ".join(f"{p}: {g}" for p, g in places)
            raise UnsafePayloadError(
                f"{where}: {listed} is not loadable with torch.load(weights_only=True), so it is refused and "
                f"not run; {_fix_for(places[0][1])}"
            ) from exc
        raise UnsafePayloadError(
            f"{where}: {exc}. If you trust the file, re-save it with only tensors and builtin containers "
            "(e.g. torch.from_numpy for numpy arrays)"
        ) from exc
    except TensorStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises RuntimeError, UnpicklingError, zip errors
        raise InvalidOptionError(f"{where}: not a readable torch.save file ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- layouts


def _is_column(v: Any) -> bool:
    import torch

    return isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0)


def _shape(t: Any) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ("," if t.dim() == 1 else "") + ")"


def _shared_leading(obj: list[Any] | tuple[Any, ...]) -> int | None:
    """The leading dimension every element shares, when all are tensors of dim >= 1."""
    import torch

    if not obj or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.layout == torch.strided for t in obj):
        return None
    lead = {t.shape[0] for t in obj}
    return lead.pop() if len(lead) == 1 else None


def _describe_seq(obj: list[Any] | tuple[Any, ...], limit: int = 4) -> str:
    shapes = [_shape(t) for t in obj[:limit]]
    more = f", ... ({len(obj)} in all)" if len(obj) > limit else ""
    return ", ".join(shapes) + more


@dataclass(frozen=True)
class Source:
    """An opened pack source.

    Attributes:
        path: The source path.
        kind: ``"columns"`` (tuple of equal-length tensors), ``"rows"`` (list or tuple of
            samples), ``"dict_columns"`` (dict of equal-length columns) or ``"files"`` (a
            directory of ``.pt`` files).
        records: How many samples it yields.
        description: One line saying how it was read, with the record count.
        skipped: What was not packed, relative to ``path`` (directories only).
        files: The ``.pt`` files, for a directory.
        rows: The samples by position: for a ``.pt`` file the list or tuple itself, or a
            :class:`ColumnRows`; for a directory a :class:`FileRows`. ``samples`` iterates
            over it.
    """

    path: Path
    kind: str
    records: int
    description: str
    samples: Iterator[Any] = field(repr=False)
    skipped: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    rows: Sequence[Any] | None = field(default=None, repr=False)


class ColumnRows(Sequence[Any]):
    """The rows of equal-length columns as a sequence: item ``i`` is ``tuple(t[i] for t in
    columns)`` for a tuple or list of columns, ``{k: v[i] ...}`` for a dict; made on access
    (views of the columns, no copy). Read-only; safe to read from forked processes."""

    def __init__(self, columns: Any, n: int) -> None:
        self.columns = columns
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        i %= self.n
        if isinstance(self.columns, dict):
            return {k: v[i] for k, v in self.columns.items()}
        return tuple(t[i] for t in self.columns)


def _vanished(f: Path) -> StoreNotFoundError:
    return StoreNotFoundError(f"pack source file {str(f)!r} no longer exists (removed after its directory was scanned)")


def _read_scanned(f: Path) -> bytes:
    """The bytes of a file found by :func:`scan_directory`, which may have changed since: one
    removed raises :class:`StoreNotFoundError`, one that is no longer a regular file (a
    directory; a FIFO, which would block the read forever) :class:`InvalidOptionError`, both
    naming it."""
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise _vanished(f) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise InvalidOptionError(
                f"pack source file {str(f)!r} is now {kind} (changed after its directory was scanned); "
                "expected a .pt file"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


class FileRows(Sequence[Any]):
    """The samples of a directory's ``.pt`` files as a sequence: item ``i`` is file ``i``
    loaded with :func:`load_pt_bytes` on access (each access reads the file again, except the
    items :meth:`preload` kept). Fork workers of a parallel pack inherit it and load their own
    files, so the calling process reads none of them. Read-only; safe to read from forked
    processes.

    Raises (on access): what :func:`load_pt_bytes` raises, naming the file.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = tuple(files)
        self._kept: dict[int, Any] = {}
        self._sizes: list[int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.files)))]
        if not -len(self.files) <= i < len(self.files):
            raise IndexError(f"file {i} of {len(self.files)}")
        i %= len(self.files)
        kept = self._kept.get(i)
        if kept is not None:
            return kept
        f = self.files[i]
        return load_pt_bytes(_read_scanned(f), repr(str(f)))

    def preload(self, k: int) -> list[Any]:
        """Load the first ``k`` files (or all, if fewer), keep them, and return them: what is
        looked at before packing is then not read again."""
        for i in range(min(k, len(self.files))):
            if i not in self._kept:
                self._kept[i] = self[i]
        return [self._kept[i] for i in range(min(k, len(self.files)))]

    def sizes(self) -> list[int]:
        """Every file's size in bytes, from one ``stat`` each, taken once and kept (what a
        parallel pack sizes its tasks by, and ``tspt pack`` sums for its size warning).

        Raises:
            StoreNotFoundError: A file was removed after the scan (named).
        """
        if self._sizes is None:
            sizes = []
            for f in self.files:
                try:
                    sizes.append(f.stat().st_size)
                except (FileNotFoundError, NotADirectoryError) as exc:  # as _read_scanned: a parent now a file
                    raise _vanished(f) from exc
            self._sizes = sizes
        return self._sizes

    def item_bytes(self, i: int) -> int:
        """The size in bytes of file ``i`` (see :meth:`sizes`), without loading it."""
        return self.sizes()[i]


def _columns(obj: Any, n: int) -> Iterator[Any]:
    return iter(ColumnRows(obj, n))


def read_layout(obj: Any, where: str, layout: str | None = None) -> tuple[str, int, str, Iterator[Any]]:
    """How a loaded ``.pt`` object is read: (kind, records, description, samples).

    Raises:
        InvalidOptionError: An empty object; an ambiguous list/tuple without ``layout`` (the
            message shows both readings with their record counts); a dict whose values are not
            all columns of one length (naming the key and its type); another type.
    """
    if layout is not None and layout not in LAYOUTS:
        raise InvalidOptionError(f"layout: expected one of {LAYOUTS}, found {layout!r}")
    kind_name = type(obj).__name__
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise InvalidOptionError(f"nothing to pack: {where} holds an empty {kind_name}")
        lead = _shared_leading(obj)
        if layout == "columns":
            if lead is None:
                raise InvalidOptionError(
                    f"{where}: --layout columns needs a list/tuple of tensors sharing a leading dimension, "
                    f"found a {kind_name} of {len(obj)} element(s) that do not"
                )
            return (
                "columns",
                lead,
                (
                    f"a {kind_name} of {len(obj)} tensors ({_describe_seq(obj)}) read as columns: {lead:,} records of "
                    f"{len(obj)}-tuples (row i of each)"
                ),
                _columns(obj, lead),
            )
        rows_desc = f"a {kind_name} of {len(obj):,} samples read as rows: {len(obj):,} records (one per element)"
        if layout == "rows" or lead is None or len(obj) == 1:
            return "rows", len(obj), rows_desc, iter(obj)
        # Every element is a tensor and they share a leading dimension.
        if isinstance(obj, tuple) and len({tuple(t.shape) for t in obj}) > 1:
            # torch.save((data, labels)): a tuple of columns of different shapes is what people save.
            return (
                "columns",
                lead,
                (
                    f"a tuple of {len(obj)} equal-length tensors ({_describe_seq(obj)}) read as columns: {lead:,} "
                    f"records of {len(obj)}-tuples (row i of each); --layout rows packs the {len(obj)} tensors as "
                    f"{len(obj)} records instead"
                ),
                _columns(obj, lead),
            )
        raise InvalidOptionError(
            f"{where}: ambiguous: a {kind_name} of {len(obj):,} tensors that share a leading dimension of {lead:,} "
            f"({_describe_seq(obj)}). Say which is meant: --layout rows packs each tensor as one sample "
            f"({len(obj):,} records); --layout columns packs row i of every tensor as sample i ({lead:,} records "
            f"of {len(obj):,}-tuples)"
        )
    if isinstance(obj, dict):
        if layout is not None:
            raise InvalidOptionError(f"{where}: --layout applies to a list or tuple; this file holds a dict of columns")
        if not obj:
            raise InvalidOptionError(f"nothing to pack: {where} holds an empty dict")
        for k, v in obj.items():
            if not _is_column(v):
                what = "a 0-dim tensor" if hasattr(v, "dim") else f"a {type(v).__name__}"
                raise InvalidOptionError(
                    f"{where}: a dict of columns must map every key to a tensor or list with one entry per sample; "
                    f"key {k!r} holds {what}" + (f" ({v!r:.40})" if isinstance(v, (str, int, float, bool)) else "")
                )
        lengths = {k: len(v) for k, v in obj.items()}
        if len(set(lengths.values())) != 1:
            raise InvalidOptionError(
                f"{where}: a dict must map every key to a tensor or list of one common length (one "
                f"sample per row), found lengths {lengths}"
            )
        n = next(iter(lengths.values()))
        if n == 0:
            raise InvalidOptionError(f"nothing to pack: {where} holds a dict of empty columns")
        return (
            "dict_columns",
            n,
            (
                f"a dict of {len(obj)} columns ({', '.join(map(str, list(obj)[:6]))}) read as {n:,} records of dicts "
                "(row i of each)"
            ),
            _columns(obj, n),
        )
    raise InvalidOptionError(
        f"{where}: expected a list/tuple of samples, a tuple of equal-length tensors or a dict of equal-length "
        f"columns, found {kind_name}"
    )


def rows(obj: Any, where: str, layout: str | None = None) -> tuple[int, Iterator[Any]]:
    """The samples of one loaded ``.pt`` object: (count, iterator). See :func:`read_layout`."""
    _, n, _, it = read_layout(obj, where, layout)
    return n, it


def open_source(src: str | Path, layout: str | None = None, recursive: bool = False) -> Source:
    """Open a pack source (see the module docstring).

    Args:
        src: A ``.pt`` file or a directory of ``.pt`` files.
        layout: For an ambiguous list/tuple of tensors: ``"rows"`` or ``"columns"``.
        recursive: For a directory, also take the ``.pt`` files of its subdirectories.

    Raises:
        StoreNotFoundError: The path does not exist.
        InvalidOptionError: An empty source, an ambiguous one without ``layout``, another
            shape, or a file that is not a torch.save file.
        UnsafePayloadError: A file asks for globals outside the weights-only allow-list.
    """
    src = Path(src)
    if not src.exists():
        raise StoreNotFoundError(f"pack source {str(src)!r} does not exist")
    if src.is_dir():
        if layout is not None:
            raise InvalidOptionError("--layout applies to one .pt file; a directory holds one sample per file")
        files, skipped = scan_directory(src, recursive)
        if not files:
            pt_files(src, recursive)  # raises, saying what the directory holds
        subdirs = len({os.path.dirname(f) for f in files})
        desc = f"a directory of {len(files):,} .pt files read as {len(files):,} records (one per file)" + (
            f", from {subdirs} directories" if subdirs > 1 else ""
        )
        by_position = FileRows(files)
        return Source(src, "files", len(files), desc, iter(by_position), tuple(skipped), tuple(files), by_position)
    obj = load_pt_bytes(src.read_bytes(), repr(str(src)))
    kind, n, desc, samples = read_layout(obj, f"{str(src)!r}", layout)
    by_position = obj if kind == "rows" else ColumnRows(obj, n)
    return Source(src, kind, n, desc, samples, rows=by_position)


def iter_source(src: Path, layout: str | None = None, recursive: bool = False) -> tuple[int, Iterator[Any]]:
    """Open a pack source; return (number of samples, samples). See :func:`open_source`."""
    s = open_source(src, layout, recursive)
    return s.records, s.samples
