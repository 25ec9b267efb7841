"""Pack sources: how ``tspt pack`` and ``tspt audit`` read a user's ``.pt`` files.

A source is one of:

- a ``.pt`` file holding a list or tuple of samples;
- a ``.pt`` file holding a dict of equal-length tensors or lists, one sample per row;
- a directory of ``.pt`` files, one sample each, taken in natural sort order
  (``x2.pt`` before ``x10.pt``).

Files are loaded with weights-only semantics (:func:`tensorstore_pt.serialization.loads`):
a file that asks for anything else is refused, never run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidOptionError, StoreNotFoundError, TensorStoreError, UnsafePayloadError

__all__ = ["PT_MAGICS", "load_pt_bytes", "natural_key", "pt_files", "rows", "iter_source"]

#: A torch.save file starts as a zip (torch >= 1.6) or a legacy pickle (protocol 2 opener).
PT_MAGICS = (b"PK\x03\x04", b"\x80\x02")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders digit runs by value: ``x2`` before ``x10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def pt_files(directory: Path) -> list[Path]:
    """The ``.pt`` files of a directory in natural sort order.

    Raises:
        InvalidOptionError: There are none.
    """
    files = sorted((p for p in directory.iterdir() if p.suffix == ".pt" and p.is_file()), key=lambda p: natural_key(p.name))
    if not files:
        raise InvalidOptionError(f"{str(directory)!r}: expected .pt files in the directory, found none")
    return files


def load_pt_bytes(data: bytes, where: str) -> Any:
    """Load the bytes of a ``.pt`` file with weights-only semantics.

    Raises:
        InvalidOptionError: Not a torch.save file (checked from its first bytes, then by loading).
        UnsafePayloadError: Its pickle asks for globals outside torch's weights-only allow-list;
            nothing from it was run.
    """
    from .serialization import loads

    if not data.startswith(PT_MAGICS):
        raise InvalidOptionError(
            f"{where}: not a torch.save file (expected a zip or pickle header, found {data[:8]!r})"
        )
    try:
        return loads(data, "cpu")
    except UnsafePayloadError as exc:
        raise UnsafePayloadError(
            f"{where}: {exc}. If you trust the file, re-save it with only tensors and builtin containers "
            "(e.g. torch.from_numpy for numpy arrays)"
        ) from exc
    except TensorStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises RuntimeError, UnpicklingError, zip errors
        raise InvalidOptionError(f"{where}: not a readable torch.save file ({type(exc).__name__}: {exc})") from exc


def _is_column(v: Any) -> bool:
    import torch

    return isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0)


def rows(obj: Any, where: str) -> tuple[int, Iterator[Any]]:
    """The samples of one loaded ``.pt`` object: (count, iterator).

    Raises:
        InvalidOptionError: ``obj`` is neither a list/tuple nor a dict of equal-length columns.
    """
    if isinstance(obj, (list, tuple)):
        return len(obj), iter(obj)
    if isinstance(obj, dict) and obj:
        lengths = {k: len(v) for k, v in obj.items() if _is_column(v)}
        if len(lengths) != len(obj) or len(set(lengths.values())) != 1:
            raise InvalidOptionError(
                f"{where}: a dict must map every key to a tensor or list of one common length (one "
                f"sample per row), found lengths {lengths} for keys {list(obj)}"
            )
        n = next(iter(lengths.values()))
        return n, ({k: v[i] for k, v in obj.items()} for i in range(n))
    raise InvalidOptionError(
        f"{where}: expected a list/tuple of samples or a dict of equal-length columns, found {type(obj).__name__}"
    )


def iter_source(src: Path) -> tuple[int, Iterator[Any]]:
    """Open a pack source (see the module docstring); return (number of samples, samples).

    Raises:
        StoreNotFoundError: The path does not exist.
        InvalidOptionError: The source has another shape, or a file is not a torch.save file.
        UnsafePayloadError: A file asks for globals outside the weights-only allow-list.
    """
    if not src.exists():
        raise StoreNotFoundError(f"pack source {str(src)!r} does not exist")
    if src.is_dir():
        files = pt_files(src)
        return len(files), (load_pt_bytes(f.read_bytes(), repr(str(f))) for f in files)
    return rows(load_pt_bytes(src.read_bytes(), repr(str(src))), f"pack source {str(src)!r}")
