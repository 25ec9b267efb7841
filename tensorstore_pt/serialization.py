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
3. ``torch.save`` into memory (never a file, so the bytes do not depend on a file name);
   a sample of a plain shape seen before gets the same bytes from a proved template of its
   pickle and container instead (:class:`_SaveTemplates`, about 8x faster on a 12 KB image).

Reading (:func:`loads`) gives what ``torch.load(weights_only=True)`` gives, through the fast
decoder in :mod:`tensorstore_pt.fastload` (which falls back to ``torch.load``).
"""

from __future__ import annotations

import collections
import ctypes
import io
import json
import pickle
import struct
import sys
import zlib
from typing import Any

import torch

from . import _ptzip
from .errors import UnsupportedSampleError
from .fastload import check_sparse_tensor, fast_loads

__all__ = ["check_sample", "compact", "dumps", "loads", "plain_dumps", "save_options", "tensor_bytes"]

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


#: Contiguous CPU tensors of at least this many elements are copied with one ``memmove``
#: (:func:`clone_exact`), not by torch's copy kernel, which splits a copy of at least
#: ``at::internal::GRAIN_SIZE`` (32768) elements over its intra-op (OpenMP) threads. A
#: writer copies on its own threads while its pool serialises and codes on the others: the
#: split copy then waits for team threads that have no core (docs/benchmarks.md, "Copies
#: without torch's intra-op threads": packing speech records took 1.5x as long).
MEMMOVE_MIN_ELEMENTS = 32768


def clone_exact(t: torch.Tensor, *, contiguous: bool = False) -> torch.Tensor:
    """Copy a strided tensor's bytes exactly (``clone`` normalises bool bytes other than 0/1).

    Dense non-overlapping strides are kept unless ``contiguous``; other views become
    contiguous. The result shares no storage with ``t``. A contiguous CPU tensor of at
    least :data:`MEMMOVE_MIN_ELEMENTS` elements (without a conjugate or negative bit, not
    requiring grad) is copied by one ``memmove`` on the calling thread, with the GIL
    released (ctypes), not by torch's intra-op threads. Thread safety: safe from any thread.
    """
    if (
        t.numel() >= MEMMOVE_MIN_ELEMENTS
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
        and not t.requires_grad
    ):
        # (the strides of a size-1 dim too; on the CPU whatever torch's default device is)
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu")
        ctypes.memmove(out.data_ptr(), t.data_ptr(), t.numel() * t.element_size())
        return out
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

    Samples of a shape seen before take a faster road to the same bytes (see
    :class:`_SaveTemplates`): ``torch.save``'s pickle of a sample depends only on its
    structure, never on its tensors' values, so the pickle and container of the first such
    sample, proved byte for byte against ``torch.save``'s own output, are reused with the new
    sample's storages (about 15 us instead of ``torch.save``'s 200 us for a 12 KB image).

    Returns:
        The exact buffer ``torch.save`` writes to an in-memory file; written to disk it is a
        ``.pt`` that plain ``torch.load`` opens.

    Raises:
        UnsupportedSampleError: See :func:`check_sample`; also when ``torch.save`` itself
            refuses the sample (e.g. ``torch.uint1`` tensors).

    Thread safety: safe from many threads (the template cache is a dict updated under the
    GIL; a template two threads make at once is made twice, with the same result).
    Fork safety: a forked child keeps its parent's templates (plain data).
    """
    fast = _TEMPLATES.dumps(sample, save_options())
    if fast is not None:
        return fast
    return _torch_save(sample)


def storage_view(ptr: int, nbytes: int, owner: Any = None) -> memoryview:
    """The ``nbytes`` bytes of memory at address ``ptr`` (a CPU storage's ``data_ptr()``) as a
    read-only-in-practice ``memoryview`` of format ``B``, read in place through ctypes: no
    tensor, array or storage object is made. ``owner`` (the tensor) is kept alive by the view;
    without it, the caller keeps the memory alive while the view is in use. Not thread-safe
    against a resize of the storage (none of ours resizes one)."""
    raw = (ctypes.c_char * nbytes).from_address(ptr)
    if owner is not None:
        raw.owner = owner
    return memoryview(raw).cast("B")


def tensor_bytes(sample: Any) -> int:
    """The bytes of the strided tensors in a sample (tuples, lists and dicts walked; other
    leaves and sparse tensors count 0): what progress displays call the data read in.

    About 0.5 us for a dict of a few tensors and numbers (a parallel pack sizes every sample
    of its tasks with it, in the calling process); ``Tensor.nbytes`` is ``numel() *
    element_size()`` (torch docs)."""
    if type(sample) is dict:  # the common sample, without the general walk's stack
        total = 0
        for value in sample.values():
            if type(value) is torch.Tensor and value.layout is torch.strided:
                total += value.nbytes
            elif type(value) not in _SCALARS:
                return _tensor_bytes_walk(sample)
        return total
    return _tensor_bytes_walk(sample)


def _tensor_bytes_walk(sample: Any) -> int:
    """:func:`tensor_bytes` of any sample."""
    total = 0
    stack = [sample]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.nbytes if obj.layout == torch.strided else 0
        elif type(obj) in (list, tuple):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
    return total


def save_options() -> tuple[bool, int] | None:
    """The ``torch.save`` options that change a plain sample's bytes besides the sample:
    (CRC-32s computed, storage alignment) from ``torch.utils.serialization.config.save``; None
    under ``torch.serialization.skip_data`` (nothing is templated then). About 10 us: a
    caller saving many samples in one process that does not change them may read them once
    and pass them to :func:`plain_dumps`."""
    from torch.serialization import _serialization_tls
    from torch.utils.serialization import config

    if _serialization_tls.skip_data:
        return None
    return bool(config.save.compute_crc32), int(config.save.storage_alignment)


def plain_dumps(sample: Any, options: tuple[bool, int] | None | bool = True) -> bytes | None:
    """:func:`dumps` of a *plain* sample, else None.

    Plain (see :class:`_SaveTemplates`): tuples, lists and dicts of CPU tensors that are
    exactly ``torch.Tensor`` with no grad, no conj or neg bit, no Python attributes, dense
    and non-overlapping over a storage that is exactly their data, and of int, float, bool,
    None, str and bytes leaves, with no object or storage in two places. Such a sample's
    bytes are the same as its copy's (``clone`` keeps dense strides), so a caller that would
    save a snapshot may save the sample itself.

    Args:
        sample: The sample.
        options: :func:`save_options` as read by the caller, or True (default) to read them
            now.

    Thread and fork safety: as :func:`dumps`.
    """
    return _TEMPLATES.dumps(sample, save_options() if options is True else options)


def _torch_save(sample: Any) -> bytes:
    """:func:`dumps` the slow way: check, compact, ``torch.save``."""
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


# --------------------------------------------------------------------------- save templates

#: At most this many sample shapes keep a template (a pickle and a few numbers each; the
#: cache is emptied when full). Data kinds have one to a few shapes.
_MAX_SAVE_TEMPLATES = 512
#: Templates stop being made once this many shapes were each seen only once and misses
#: outnumber hits (samples whose shapes never repeat: variable lengths, a file name per
#: sample): making one costs a proof (~15 us) on top of ``torch.save``.
_TEMPLATE_MISS_BUDGET = 64
#: ... but one miss in this many still makes a template, so that shapes that do repeat (a
#: later data kind in the same process) get templates again.
_TEMPLATE_RETRY_EVERY = 256
_DOUBLE = struct.Struct("<d")
_KEY_TYPES = (str, int, float, bool, type(None), bytes)
# How pickle (protocol 2, torch.save's default) writes an int or float leaf: the opcode is
# fixed by the value's range, the payload follows it (pickle.py: save_long, save_float).
# Templates key a leaf by its encoder and patch the payload in (see _SaveTemplate.patches).
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_BINFLOAT = struct.Struct(">d")
_PACK_U16, _PACK_I32, _PACK_BINFLOAT = _U16.pack, _I32.pack, _BINFLOAT.pack


def _uint8(v: int) -> bytes:
    return bytes((v,))


def _long1(n: int) -> Any:
    def encode(v: int) -> bytes:
        return v.to_bytes(n, "little", signed=True)

    return encode


_LONG1 = {n: _long1(n) for n in range(1, 10)}  # int64 values take at most 8 bytes


def _int_encoder(v: int) -> Any:
    """The payload encoder of ``v`` as pickle writes it: BININT1, BININT2, BININT or LONG1
    (whose length byte is part of the encoder: pickle.encode_long's minimal two's complement)."""
    if 0 <= v <= 0xFF:
        return _uint8
    if 0 <= v <= 0xFFFF:
        return _PACK_U16
    if -0x80000000 <= v <= 0x7FFFFFFF:
        return _PACK_I32
    return _LONG1[len(pickle.encode_long(v))]  # type: ignore[attr-defined]


class _ExactKey:
    """A dict key that is an int or float: part of a shape by value (not patched in, which
    could make two keys equal), so it travels the walk in this wrapper."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_NAMED = hasattr(torch.Tensor, "names")
#: Strings torch.save's pickle makes itself and writes through pickle's memo, which works by
#: object identity: a storage's persistent id holds the interned literals "storage" and
#: "cpu", and a bytes value under protocol 2 pickles as ``_codecs.encode(text, "latin1")``
#: (the interned "latin1"; ``text`` decoded from the bytes, which for one byte is CPython's
#: cached character, :data:`_LATIN1_CHARS`). A user string that *is* one of these objects
#: becomes a memo reference; an equal string that is another object is written out. So such
#: a string's token says which it is (:func:`_str_token`).
_PICKLER_STRINGS = frozenset({"storage", "cpu", "latin1"})
#: The one-character strings ``bytes.decode("latin-1")`` gives (the pickler's decode).
_LATIN1_CHARS = tuple(bytes([i]).decode("latin-1") for i in range(256))


def _str_token(obj: str) -> tuple[Any, ...]:
    """A string's token: its value and, where torch.save's pickler can hold the very same
    object (see :data:`_PICKLER_STRINGS`), whether it is that object."""
    if len(obj) == 1 and ord(obj) < 256:
        return (str, obj, obj is _LATIN1_CHARS[ord(obj)])
    if obj in _PICKLER_STRINGS:
        return (str, obj, obj is sys.intern(obj))
    return (str, obj)


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether a strided layout is dense and non-overlapping (a permutation of a contiguous
    one): what ``clone(memory_format=torch.preserve_format)`` keeps as it is."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda d: d[1]):
        if size == 0:
            return True  # no elements: nothing overlaps
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


class _SaveTemplate:
    """What :func:`torch.save` wrote for one shape of sample, less its storages' bytes."""

    __slots__ = ("layout", "archive", "pickle", "name_hash", "pickle_crc", "count", "patches")

    def __init__(self, parts: _ptzip.PtParts) -> None:
        self.layout = parts.layout
        self.archive = parts.archive
        self.pickle = bytes(parts.pickle)  # a copy: the proved buffer is not kept
        self.name_hash = parts.name_hash
        # computed once here; rebuild recomputes the storages' CRC-32s (ignored without CRC-32s)
        self.pickle_crc = zlib.crc32(self.pickle) if parts.layout.crc32 else 0
        self.count = len(parts.storages)
        #: (offset in the pickle, payload encoder) of each int or float leaf, in walk order
        self.patches: tuple[tuple[int, Any], ...] = ()

    def parts(self, storages: list[Any], scalars: list[Any]) -> _ptzip.PtParts:
        """The parts of a sample of this shape: its scalars patched into the pickle."""
        pickled, crc = self.pickle, self.pickle_crc
        if self.patches:
            buf = bytearray(pickled)
            for (off, encode), value in zip(self.patches, scalars):
                payload = encode(value)
                buf[off : off + len(payload)] = payload
            pickled = bytes(buf)
            crc = zlib.crc32(pickled) if self.layout.crc32 else 0
        return _ptzip.PtParts(
            self.layout, self.archive, pickled, tuple(storages), self.name_hash, (crc,) + (None,) * self.count
        )


class _SaveTemplates:
    """``torch.save`` bytes of samples whose shape was seen before, without ``torch.save``.

    A sample's *shape* (:meth:`_signature`) is everything ``torch.save``'s pickle depends
    on: container types and lengths, dict keys, str, bytes, bool and None leaves by value,
    int and float leaves by the opcode pickle writes them with (an int's range: BININT1,
    BININT2, BININT or LONG1 and its length; BINFLOAT), their values being patched into the
    template's pickle at offsets found when it is made (:meth:`_make`), which
    string objects repeat (pickle's memo works by object identity) and which are the very
    objects torch's pickler writes itself (:func:`_str_token`), no two tensors on one storage
    (even an empty one), and per tensor its dtype, size and stride. Tensor values are not
    part of it: ``_save`` in torch/serialization.py pickles a storage as a persistent id
    (``("storage", storage type, key, "cpu", numel)``, keys numbered in order of first
    appearance) and writes its bytes as the record ``data/<key>``; ``Tensor.__reduce_ex__``
    (torch/_tensor.py) pickles ``_rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad, OrderedDict())`` plus a metadata dict only for the conj and neg bits. Only
    the plainest samples get a shape: tuples, lists and dicts (exact types; str or int keys)
    of CPU strided tensors (exact ``torch.Tensor``, no grad, no Python attributes, no names,
    no conj or neg bit, storage exactly its data: what :func:`compact` leaves unchanged, no
    storage or object shared) and int, float, bool, None, str and non-empty bytes; anything
    else takes ``torch.save``.

    The first sample of a shape is saved with ``torch.save``; its buffer is split into pickle
    and storages (:mod:`tensorstore_pt._ptzip`), and the template is kept only if rebuilding
    the container from that pickle and *this walk's* storages gives the buffer back byte for
    byte. Later samples of the shape are the template's pickle and container around their own
    storages, with CRC-32s and the serialization id recomputed (:func:`_ptzip.rebuild`).
    Templates are keyed by the save options that change the container too (CRC-32s on or
    off, storage alignment); under ``torch.serialization.skip_data`` nothing is templated.

    Thread safety: see :func:`dumps`.
    """

    def __init__(self) -> None:
        self._templates: dict[Any, _SaveTemplate | None] = {}
        self.hits = 0
        self.misses = 0

    def _signature(self, sample: Any) -> tuple[tuple[Any, ...], list[Any], list[Any]] | None:
        """The sample's shape, its storages' bytes and its int and float leaves (each in
        pickling order), or None."""
        tokens: list[Any] = []
        storages: list[Any] = []
        scalars: list[Any] = []
        seen: set[int] = set()  # containers, tensors and storages: none may repeat
        strings: dict[int, int] = {}  # id -> its first token (pickle memoizes str and bytes)
        stack: list[Any] = [sample]
        while stack:
            obj = stack.pop()
            t = type(obj)
            if t is torch.Tensor:
                if (
                    obj.layout is not torch.strided
                    or not obj.is_cpu
                    or obj.requires_grad
                    or obj.is_quantized
                    or obj.is_conj()
                    or obj.is_neg()
                    or (_NAMED and any(n is not None for n in obj.names))  # torch 2.13 has no named tensors
                    or obj.__dict__
                    or obj.storage_offset() != 0
                ):
                    return None
                if not obj.is_contiguous() and not _dense(obj.shape, obj.stride()):
                    return None  # overlapping or with gaps: a copy would change its strides
                storage = obj.untyped_storage()
                nbytes = storage.nbytes()
                ptr = storage.data_ptr()
                # torch.save keys a storage by its StorageImpl (``_cdata``): two tensors on one
                # storage (even an empty one, whose data pointer is 0) save one record.
                cdata = ("storage", storage._cdata)
                if nbytes != obj.nbytes or id(obj) in seen or cdata in seen or (nbytes and ptr in seen):
                    return None
                seen.add(id(obj))
                seen.add(cdata)
                if nbytes:
                    seen.add(ptr)
                tokens.append((obj.dtype, obj.shape, obj.stride()))
                # The storage's bytes in place (torch.save writes the whole storage, which is
                # exactly the tensor's data here); kept alive by ``sample`` while in use.
                storages.append(storage_view(ptr, nbytes) if nbytes else b"")
            elif t is tuple or t is list:
                if id(obj) in seen or len(tokens) > 100_000:
                    return None
                seen.add(id(obj))
                tokens.append((t, len(obj)))
                stack.extend(reversed(obj))
            elif t is dict:
                if id(obj) in seen or len(tokens) > 100_000:
                    return None
                seen.add(id(obj))
                tokens.append((dict, len(obj)))
                for k, v in reversed(obj.items()):
                    tk = type(k)
                    if tk not in _KEY_TYPES:
                        return None  # check_sample names the problem
                    stack.append(v)
                    stack.append(_ExactKey(k) if tk is int or tk is float else k)
            elif t is str or t is bytes:
                if not obj:
                    if t is bytes:
                        return None  # refused by check_sample
                    tokens.append("")
                    continue
                first = strings.get(id(obj))
                if first is not None:
                    tokens.append(("memo", first))
                else:
                    strings[id(obj)] = len(tokens)
                    tokens.append(_str_token(obj) if t is str else (t, obj))
            elif t is int:
                if not -(2**63) <= obj < 2**63:
                    return None
                tokens.append(_int_encoder(obj))
                scalars.append(obj)
            elif t is float:
                tokens.append(_PACK_BINFLOAT)
                scalars.append(obj)
            elif t is bool or obj is None:
                tokens.append(obj)
            elif t is _ExactKey:
                key = obj.value
                tokens.append((type(key), _DOUBLE.pack(key) if type(key) is float else key))  # -0.0, NaNs apart
            else:
                return None
        return tuple(tokens), storages, scalars

    def dumps(self, sample: Any, options: tuple[bool, int] | None) -> bytes | None:
        """``torch.save``'s bytes of ``sample`` if its shape has a template (or gets one now:
        then they are ``torch.save``'s own), else None (the caller saves it the slow way).
        ``options``: :func:`save_options` (None: no template)."""
        if options is None:
            return None
        found = self._signature(sample)
        if found is None:
            return None
        tokens, storages, scalars = found
        key = (tokens, options)
        tpl = self._templates.get(key, False)
        if tpl is None:
            return None  # a shape whose template failed its proof
        if tpl is not False:
            self.hits += 1
            return _ptzip.rebuild(tpl.parts(storages, scalars))
        self.misses += 1
        if self.misses > _TEMPLATE_MISS_BUDGET and self.misses > self.hits and self.misses % _TEMPLATE_RETRY_EVERY:
            return None  # shapes that do not repeat: templates would not pay
        raw = _torch_save(sample)
        if save_options() == options:  # the options are process-wide: another thread may change them meanwhile
            tpl = self._make(raw, sample, storages, scalars)
            if save_options() == options:
                if len(self._templates) >= _MAX_SAVE_TEMPLATES:
                    self._templates.clear()
                self._templates[key] = tpl
        return raw

    @staticmethod
    def _make(raw: bytes, sample: Any, storages: list[Any], scalars: list[Any]) -> _SaveTemplate | None:
        """The template of ``sample``'s shape from its ``torch.save`` bytes ``raw``, or None
        if it does not prove.

        Proof: the template rebuilt around this walk's storages gives ``raw`` back byte for
        byte. With int or float leaves, a twin of the sample whose every such leaf differs in
        exactly one payload byte (the low bit of an int, the sign of a float: the value keeps
        its pickle opcode) is saved too; the pickles must differ in exactly one byte per leaf,
        which gives each leaf's offset in walk order, and the template patched with the twin's
        leaves must give the twin's bytes back byte for byte as well.
        """
        parts = _ptzip.split(raw)
        if parts is None or len(parts.storages) != len(storages):
            return None
        tpl = _SaveTemplate(parts)
        if _ptzip.rebuild(tpl.parts(storages, scalars)) != raw:
            return None
        if not scalars:
            return tpl
        twin_scalars = [_twin(v) for v in scalars]
        feed = iter(twin_scalars)
        twin_raw = _torch_save(_with_scalars(sample, feed))
        twin = _ptzip.split(twin_raw)
        if twin is None or len(twin.pickle) != len(tpl.pickle):
            return None
        a, b = tpl.pickle, bytes(twin.pickle)
        offsets = [i for i in range(len(a)) if a[i] != b[i]]
        if len(offsets) != len(scalars):
            return None
        tpl.patches = tuple(
            (off, _PACK_BINFLOAT if type(v) is float else _int_encoder(v)) for off, v in zip(offsets, scalars)
        )
        if _ptzip.rebuild(tpl.parts(storages, twin_scalars)) != twin_raw:
            return None
        if _ptzip.rebuild(tpl.parts(storages, scalars)) != raw:
            return None
        return tpl


def _twin(value: Any) -> Any:
    """A leaf that pickles with the same opcode and length as ``value`` and differs from it in
    exactly its first payload byte: an int with its low bit flipped (little-endian payloads),
    a float with its sign flipped (BINFLOAT is big-endian; the bits are flipped, so a NaN's
    payload is kept)."""
    if type(value) is float:
        (bits,) = struct.unpack(">Q", _BINFLOAT.pack(value))
        return _BINFLOAT.unpack(struct.pack(">Q", bits ^ (1 << 63)))[0]
    return value ^ 1


def _with_scalars(obj: Any, feed: Any) -> Any:
    """A copy of a plain sample's containers with its int and float leaves (not dict keys)
    taken from ``feed`` in walk order; every other object is the same object."""
    t = type(obj)
    if t is int or t is float:
        return next(feed)
    if t is list:
        return [_with_scalars(v, feed) for v in obj]
    if t is tuple:
        return tuple(_with_scalars(v, feed) for v in obj)
    if t is dict:
        return {k: _with_scalars(v, feed) for k, v in obj.items()}
    return obj


_TEMPLATES = _SaveTemplates()
