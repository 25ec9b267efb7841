"""The only place that turns samples into ``torch.save`` bytes and back.

A *sample* is what people ``torch.save`` to build a dataset: a tensor; a tuple, list or dict
of tensors; nested containers of these with ``int``, ``float``, ``bool``, ``complex``,
``str``, ``bytes``, ``None`` leaves (also ``set``, ``bytearray``, ``OrderedDict``,
``Counter``, ``torch.Size``, ``torch.dtype``, ``torch.device`` and ``nn.Parameter``: exactly
the types ``torch.load(weights_only=True)`` accepts, see torch/_weights_only_unpickler.py).

Writing (:func:`dumps`):

1. :func:`check_sample` refuses anything weights-only loading would refuse, naming the place
   inside the sample (``sample["meta"]["arr"]: numpy.ndarray``) and the fix.
2. :func:`compact` copies views whose storage is larger than their data (``torch.save``
   saves a view's *whole* storage: a 10-element slice of a 40 MB tensor costs 40 MB) and
   moves CUDA tensors to CPU. Values, dtypes and shapes are kept bit-exactly; dense
   non-overlapping strides (e.g. a transpose) are kept; other views become contiguous.
3. ``torch.save`` into memory (never a file, so the bytes do not depend on a file name).

Reading (:func:`loads`) gives what ``torch.load(weights_only=True)`` gives, through the fast
decoder in :mod:`tensorstore_pt.fastload` (which falls back to ``torch.load``).
"""

from __future__ import annotations

import collections
import io
import json
import pickle
from typing import Any

import torch

from .errors import UnsupportedSampleError
from .fastload import check_sparse_tensor, fast_loads

__all__ = ["check_sample", "compact", "dumps", "loads"]

_SCALARS = (int, float, bool, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device, torch.Size)


def _fix_hint(obj: object) -> str:
    mod = type(obj).__module__
    if mod == "numpy" or mod.startswith("numpy."):
        if hasattr(obj, "shape") and getattr(obj, "ndim", 0) > 0:
            return "convert it with torch.from_numpy(arr)"
        return "convert it with torch.from_numpy(arr) or .item() for a scalar"
    if isinstance(obj, slice):
        return "store its start/stop/step as ints"
    if isinstance(obj, tuple):  # namedtuple
        return "convert it to a plain tuple or a dict"
    if isinstance(obj, torch.Tensor):
        return "convert it to a plain torch.Tensor with .as_subclass(torch.Tensor)"
    return "convert it to tensors and builtin containers (tuple, list, dict)"


def _typename(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _scalar_problem(obj: object) -> str | None:
    """Leaves torch.save writes but torch's weights-only unpickler cannot read back (torch 2.13)."""
    if type(obj) is bytes and not obj:
        return "empty bytes (b'') cannot be loaded with weights_only=True; use None or b'\\x00'"
    if type(obj) is int and obj.bit_length() >= 2040:
        # pickle writes such ints with LONG4, an opcode the weights-only unpickler refuses.
        return f"an int of {obj.bit_length()} bits cannot be loaded with weights_only=True (at most 2039 bits)"
    return None


def check_sample(sample: Any, where: str = "sample") -> None:
    """Raise if ``sample`` holds anything ``torch.load(weights_only=True)`` would refuse.

    Args:
        sample: The sample to check.
        where: The name used for the sample's root in messages.

    Raises:
        UnsupportedSampleError: Naming the first offending place, e.g.
            ``sample["meta"]["arr"]: numpy.ndarray``, and the fix.
    """
    stack: list[tuple[Any, str, int]] = [(sample, where, 0)]
    seen: set[int] = set()
    while stack:
        obj, path, depth = stack.pop()
        if depth > 100:
            raise UnsupportedSampleError(f"{path}: nesting deeper than 100 levels is not supported")
        t = type(obj)
        if t in (torch.Tensor, torch.nn.Parameter):
            if obj.layout != torch.strided:
                try:
                    check_sparse_tensor(obj)
                except RuntimeError as exc:
                    raise UnsupportedSampleError(
                        f"{path}: an invalid {obj.layout} tensor ({exc}); a reader would refuse it"
                    ) from exc
            continue
        if isinstance(obj, torch.Tensor):
            raise UnsupportedSampleError(
                f"{path}: {_typename(obj)} (a tensor subclass) cannot be loaded with weights_only=True; {_fix_hint(obj)}"
            )
        if t in _SCALARS or isinstance(obj, torch.dtype):
            problem = _scalar_problem(obj)
            if problem:
                raise UnsupportedSampleError(f"{path}: {problem}")
            continue
        if t in (list, tuple, set, frozenset, dict, collections.OrderedDict, collections.Counter):
            if t is frozenset:
                raise UnsupportedSampleError(
                    f"{path}: frozenset is not loadable with weights_only=True; use a set or list"
                )
            if id(obj) in seen:
                continue  # shared sub-containers are fine; cycles are caught by pickle itself
            seen.add(id(obj))
            if isinstance(obj, dict):
                for k, v in obj.items():
                    if type(k) not in (str, int, float, bool, type(None), bytes):
                        raise UnsupportedSampleError(
                            f"{path}: dict key {k!r} of type {_typename(k)} is not supported; use str or int keys"
                        )
                    problem = _scalar_problem(k)
                    if problem:
                        raise UnsupportedSampleError(f"{path}: dict key: {problem}")
                    key = json.dumps(k) if isinstance(k, str) else repr(k)
                    stack.append((v, f"{path}[{key}]", depth + 1))
            elif t is set:
                for v in obj:
                    stack.append((v, f"{path}{{{v!r}}}", depth + 1))
            else:
                for i, v in enumerate(obj):
                    stack.append((v, f"{path}[{i}]", depth + 1))
            continue
        raise UnsupportedSampleError(
            f"{path}: {_typename(obj)} is not loadable with torch.load(weights_only=True); {_fix_hint(obj)}"
        )


def clone_exact(t: torch.Tensor, *, contiguous: bool = False) -> torch.Tensor:
    """Copy a strided tensor's bytes exactly (``clone`` normalises bool bytes other than 0/1).

    Dense non-overlapping strides are kept unless ``contiguous``; other views become
    contiguous. The result shares no storage with ``t``.
    """
    src = t.view(torch.uint8) if t.dtype == torch.bool else t
    out = src.contiguous() if contiguous and not src.is_contiguous() else src.clone(memory_format=torch.preserve_format)
    if contiguous and out.data_ptr() == src.data_ptr():
        out = out.clone()
    return out.view(torch.bool) if t.dtype == torch.bool else out


def _compact_tensor(t: torch.Tensor) -> torch.Tensor:
    out = t.detach()
    changed = False
    if out.device.type != "cpu":
        out = out.cpu()
        changed = True
    if out.layout == torch.strided:
        needed = out.numel() * out.element_size()
        if out.storage_offset() != 0 or out.untyped_storage().nbytes() != needed:
            # clone() keeps dense non-overlapping strides (a transpose stays a transpose) and
            # makes anything else contiguous; either way the new storage holds just the data.
            out = clone_exact(out)
            if out.untyped_storage().nbytes() != needed:
                out = clone_exact(out, contiguous=True)
            changed = True
    if not changed:
        return t
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def compact(sample: Any) -> Any:
    """Return ``sample`` with every view compacted and every tensor on CPU.

    Containers are rebuilt with the same types; tensors that need no change are returned as
    they are (no copy). Tensors that share one storage in the input are saved separately.
    """
    t = type(sample)
    if isinstance(sample, torch.Tensor):
        return _compact_tensor(sample)
    if t is list:
        return [compact(v) for v in sample]
    if t is tuple:
        return tuple(compact(v) for v in sample)
    if t in (dict, collections.OrderedDict, collections.Counter):
        return t({k: compact(v) for k, v in sample.items()})  # a mapping: Counter copies counts
    return sample


def dumps(sample: Any) -> bytes:
    """Check, compact and ``torch.save`` one sample into bytes.

    Returns:
        The exact buffer ``torch.save`` writes to an in-memory file; written to disk it is a
        ``.pt`` that plain ``torch.load`` opens.

    Raises:
        UnsupportedSampleError: See :func:`check_sample`; also when ``torch.save`` itself
            refuses the sample (e.g. ``torch.uint1`` tensors).

    Thread safety: safe; it touches no shared state.
    """
    check_sample(sample)
    buf = io.BytesIO()
    try:
        torch.save(compact(sample), buf)
    except (NotImplementedError, RuntimeError, TypeError, pickle.PicklingError) as exc:
        raise UnsupportedSampleError(f"sample: torch.save cannot save it ({type(exc).__name__}: {exc})") from exc
    return buf.getvalue()


def loads(raw: bytes | bytearray | memoryview, map_location: Any = "cpu") -> Any:
    """Load one ``torch.save`` buffer as ``torch.load(weights_only=True)`` would.

    Uses :func:`tensorstore_pt.fastload.fast_loads`: a direct decoder for the buffers
    ``torch.save`` writes that falls back to ``torch.load`` for anything else. A
    ``bytearray`` is aliased by the returned tensors (hand it over); ``bytes`` are copied.

    Raises:
        UnsafePayloadError: If the pickle references a global outside torch's weights-only
            allow-list (the payload is not run).
        RecordDecodeError: For buffers that torch.load cannot load (a
            :class:`~tensorstore_pt.errors.CorruptStoreError`; the cause is chained).
    """
    return fast_loads(raw, map_location)
