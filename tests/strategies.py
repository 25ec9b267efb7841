"""Hypothesis strategies for samples, and bit-exact comparison helpers.

Reusable by any test (``from strategies import samples, assert_identical``; the tests folder
is on ``sys.path`` under pytest's default rootdir-based import mode).

Strategies:

* :func:`tensors` -- one tensor of any dtype ``torch.save`` writes (:data:`DTYPES`): 0-dim,
  zero-element and up to 4 dims; contents are arbitrary bytes (NaN payloads, signed zeros,
  subnormals; ``bool`` holds 0/1 only); optionally a non-contiguous view (transpose,
  permutation, step slice, narrowed with a storage offset, expanded with stride 0) that
  keeps its whole base storage, as ``torch.save`` does; optionally (float64/32/16,
  bfloat16) ``requires_grad`` or an ``nn.Parameter``.
* :func:`sparse_tensors` -- sparse COO (coalesced or not) and CSR tensors.
* :func:`samples` -- nested tuples, lists and dicts (``str``/``int`` keys) of tensors and
  ``int``/``float``/``bool``/``str``/``bytes``/``None`` leaves (no ``b""``: it pickles
  as a call of ``bytes``, which weights-only loading refuses); with ``extras=True`` also
  ``complex``, ``bytearray``, ``set``, ``OrderedDict``, ``Counter``, ``torch.Size``,
  ``torch.dtype`` and ``torch.device`` leaves, and tensors shared between two places.

Helpers:

* :func:`saved` -- the ``torch.save`` bytes of a sample.
* :func:`tensors_of` -- the tensors in a sample, in order.
* :func:`assert_identical` -- two loaded samples are the same: container types and order,
  leaf values bit for bit (``-0.0`` vs ``0.0`` and NaN payloads count), and for tensors:
  type (``Tensor``/``Parameter``), layout, dtype, shape, values, ``requires_grad``; with
  ``layout=True`` (the default) also stride, storage offset, the whole storage's size and
  bytes, and which tensors share a storage or are the same object. Allowed globals (a
  function, a class, a storage type) must be the same object.
"""

from __future__ import annotations

import collections
import io
import math
import struct
from typing import Any

import torch
from hypothesis import strategies as st

__all__ = [
    "DTYPES",
    "assert_identical",
    "containers",
    "leaves",
    "samples",
    "saved",
    "sparse_tensors",
    "tensor_bytes",
    "tensors",
]

DTYPES: list[torch.dtype] = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    *(
        getattr(torch, name)
        for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
        if hasattr(torch, name)
    ),
    torch.complex64,
    torch.complex128,
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]

# requires_grad survives torch.save/torch.load only for these: the dtypes without a legacy
# storage type (float8, uint16...) are rebuilt by _rebuild_tensor_v3, where torch.load
# itself fails for requires_grad=True ("a leaf Variable that requires grad is being used
# in an in-place operation").
_GRAD_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _from_bytes(raw: bytes, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements of ``dtype`` holding exactly ``raw``."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool:
        u8 = u8 & 1
    return u8.view(dtype).clone()


@st.composite
def tensors(
    draw: st.DrawFn,
    dtypes: st.SearchStrategy[torch.dtype] | None = None,
    max_dims: int = 4,
    max_side: int = 5,
    views: bool = True,
    grads: bool = True,
) -> torch.Tensor:
    """One strided tensor (see the module docstring)."""
    dtype = draw(dtypes if dtypes is not None else st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_dims)))
    elsize = torch.empty((), dtype=dtype).element_size()
    kind = draw(st.sampled_from(["plain", "transpose", "permute", "step", "narrow", "expand"])) if views else "plain"
    if kind == "step" and shape:
        base_shape = (shape[0] * 2 + draw(st.integers(0, 1)),) + shape[1:]
    elif kind == "narrow" and shape:
        base_shape = (shape[0] + draw(st.integers(1, 3)),) + shape[1:]
    elif kind == "expand":
        base_shape = tuple(1 if i % 2 == 0 else s for i, s in enumerate(shape))
    else:
        base_shape = shape
    base_numel = math.prod(base_shape)
    raw = draw(st.binary(min_size=base_numel * elsize, max_size=base_numel * elsize))
    t = _from_bytes(raw, dtype, base_numel).reshape(base_shape)
    if kind == "transpose" and len(shape) >= 2:
        t = t.reshape(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    elif kind == "permute" and len(shape) >= 2:
        order = draw(st.permutations(range(len(shape))))
        t = t.reshape(tuple(shape[order.index(j)] for j in range(len(shape)))).permute(*order)
    elif kind == "step" and shape:
        t = t[::2][: shape[0]]
    elif kind == "narrow" and shape:
        start = base_shape[0] - shape[0]
        t = t.narrow(0, draw(st.integers(0, start)), shape[0])
    elif kind == "expand":
        t = t.expand(shape) if shape else t
    if grads and dtype in _GRAD_DTYPES and draw(st.integers(0, 5)) == 0:
        if draw(st.booleans()):
            return torch.nn.Parameter(t.contiguous(), requires_grad=draw(st.booleans()))
        return t.detach().requires_grad_(True)
    return t


@st.composite
def sparse_tensors(draw: st.DrawFn) -> torch.Tensor:
    """A sparse COO (coalesced or not) or CSR tensor of float32/float64/int64 values."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64]))
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    nnz = draw(st.integers(0, 6))
    idx = draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, cols - 1)), min_size=nnz, max_size=nnz))
    values = torch.tensor(draw(st.lists(st.integers(-100, 100), min_size=nnz, max_size=nnz)), dtype=dtype)
    indices = torch.tensor(idx, dtype=torch.int64).reshape(-1, 2).t()
    coo = torch.sparse_coo_tensor(indices, values, (rows, cols), check_invariants=True)
    kind = draw(st.sampled_from(["coo", "coalesced", "csr"]))
    if kind == "coalesced":
        return coo.coalesce()
    if kind == "csr":
        return coo.coalesce().to_sparse_csr()
    return coo


_finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


def leaves(extras: bool = False) -> st.SearchStrategy[Any]:
    """Non-tensor leaves; ``extras`` adds the other types weights-only loading allows."""
    base = st.one_of(
        st.integers(-(2**70), 2**70),
        _finite_or_not,
        st.booleans(),
        st.text(max_size=8),
        st.binary(min_size=1, max_size=8),  # b"" pickles as bytes(), which weights_only refuses
        st.none(),
    )
    if not extras:
        return base
    return st.one_of(
        base,
        st.complex_numbers(allow_nan=True),
        st.binary(max_size=8).map(bytearray),
        st.sets(st.integers(-5, 5), max_size=4),
        st.lists(st.integers(0, 9), max_size=4).map(torch.Size),
        st.sampled_from(DTYPES),
        st.sampled_from([torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")]),
        st.dictionaries(st.text(max_size=3), st.integers(0, 5), max_size=3).map(collections.Counter),
    )


def containers(children: st.SearchStrategy[Any], extras: bool = False) -> st.SearchStrategy[Any]:
    """Tuples, lists and dicts of ``children``; ``extras`` adds OrderedDicts."""
    keys = st.one_of(st.text(max_size=6), st.integers(-3, 3))
    options = [
        st.lists(children, max_size=4).map(tuple),
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ]
    if extras:
        options.append(st.dictionaries(keys, children, max_size=3).map(collections.OrderedDict))
    return st.one_of(*options)


@st.composite
def _shared(draw: st.DrawFn) -> Any:
    """A tensor placed twice, or a tensor and a view of the same storage."""
    t = draw(tensors(views=False, grads=False, max_dims=2))
    if draw(st.booleans()) or t.numel() == 0:
        return (t, t)
    return [t, t.reshape(-1)]


def samples(extras: bool = False, sparse: bool = False, max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Samples as people save them: a tensor or nested containers of tensors and leaves."""
    atoms: list[st.SearchStrategy[Any]] = [tensors(), leaves(extras)]
    if sparse:
        atoms.append(sparse_tensors())
    if extras:
        atoms.append(_shared())
    return st.recursive(st.one_of(*atoms), lambda c: containers(c, extras), max_leaves=max_leaves)


def saved(sample: Any) -> bytes:
    """``torch.save(sample)`` into memory."""
    buf = io.BytesIO()
    torch.save(sample, buf)
    return buf.getvalue()


def tensors_of(x: Any) -> list[torch.Tensor]:
    """The tensors in a sample (dicts, lists and tuples walked in order), depth first."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_of(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_of(v)]
    return []


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's values in logical order, as raw bytes (NaN payloads included)."""
    if t.numel() == 0:
        return b""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))  # stride 1, whatever t's
    return flat.view(torch.uint8).numpy().tobytes()


def _bytes_of(storage: torch.UntypedStorage) -> bytes:
    return torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage).numpy().tobytes()


def _storage_bytes(t: torch.Tensor) -> bytes:
    return _bytes_of(t.untyped_storage())


def _leaf_key(x: Any) -> Any:
    """A key that tells apart what ``==`` does not (``-0.0``/``0.0``, NaN payloads)."""
    if type(x) is float:
        return ("f", struct.pack("<d", x))
    if type(x) is complex:
        return ("c", struct.pack("<dd", x.real, x.imag))
    return (type(x), x)


def assert_identical(expected: Any, got: Any, where: str = "sample", layout: bool = True) -> None:
    """Raise AssertionError, naming the place, if ``got`` differs from ``expected``.

    Args:
        expected: E.g. what ``torch.load(weights_only=True)`` returns, or the sample written.
        got: What is compared with it.
        where: The name of the root in messages (``sample["x"][2]: dtype ...``).
        layout: Also compare how tensors lie in memory: strides, storage offset, the whole
            storage (size and bytes) and which tensors share a storage. ``False`` for a
            store round trip, where ``serialization.compact`` may copy views.
    """
    _Comparer(layout).compare(expected, got, where)


class _Comparer:
    def __init__(self, layout: bool = True) -> None:
        self.layout = layout
        self.pairs: dict[int, int] = {}  # id(expected object) -> id(got object)
        self.keep: list[Any] = []  # keep compared objects alive so ids stay unique
        self.storages: dict[int, int] = {}  # expected storage data_ptr -> got storage data_ptr

    def compare(self, a: Any, b: Any, where: str) -> None:
        assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
        if type(a) in (int, bool, str, bytes, type(None), float, complex):
            assert _leaf_key(a) == _leaf_key(b), f"{where}: {a!r} != {b!r}"
            return
        if self.layout:  # the same sharing of objects
            if id(a) in self.pairs:
                assert self.pairs[id(a)] == id(b), f"{where}: shared in the expected result, not in the other"
                return
            assert id(b) not in self.pairs.values(), f"{where}: an object is shared that is not shared in the expected"
            self.pairs[id(a)] = id(b)
            self.keep += [a, b]
        if isinstance(a, torch.Tensor):
            self._tensor(a, b, where)
        elif type(a) in (tuple, list, torch.Size):
            assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                self.compare(x, y, f"{where}[{i}]")
        elif isinstance(a, dict):
            assert [_leaf_key(k) for k in a] == [_leaf_key(k) for k in b], f"{where}: keys {list(a)} != {list(b)}"
            for (ka, va), (kb, vb) in zip(a.items(), b.items()):
                self.compare(ka, kb, f"{where} key {ka!r}")
                self.compare(va, vb, f"{where}[{ka!r}]")
        elif type(a) is set:
            assert {_leaf_key(x) for x in a} == {_leaf_key(x) for x in b}, f"{where}: {a!r} != {b!r}"
        elif type(a) is bytearray or type(a) is torch.device or type(a) is torch.dtype:
            assert a == b, f"{where}: {a!r} != {b!r}"
        elif type(a) is torch.storage.TypedStorage:  # a bare storage, as torch.load returns it
            assert a.dtype == b.dtype, f"{where}: storage dtype {a.dtype} != {b.dtype}"
            assert _bytes_of(a._untyped_storage) == _bytes_of(b._untyped_storage), f"{where}: storage bytes differ"
        elif a is not b:  # allowed globals (functions, classes, storage types) load as themselves
            raise AssertionError(f"{where}: {type(a).__name__} {a!r} is not {b!r}")

    def _tensor(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        assert a.layout == b.layout, f"{where}: layout {a.layout} != {b.layout}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad {a.requires_grad} != {b.requires_grad}"
        assert a.device == b.device, f"{where}: device {a.device} != {b.device}"
        if a.layout == torch.sparse_coo:
            assert a.is_coalesced() == b.is_coalesced(), f"{where}: coalesced flags differ"
            self.compare(a._indices(), b._indices(), f"{where}.indices")
            self.compare(a._values(), b._values(), f"{where}.values")
            return
        if a.layout == torch.sparse_csr:
            for name in ("crow_indices", "col_indices", "values"):
                self.compare(getattr(a, name)(), getattr(b, name)(), f"{where}.{name}")
            return
        if not self.layout:
            assert tensor_bytes(a) == tensor_bytes(b), f"{where}: values differ"
            return
        assert a.stride() == b.stride(), f"{where}: stride {a.stride()} != {b.stride()}"
        assert a.storage_offset() == b.storage_offset(), (
            f"{where}: storage offset {a.storage_offset()} != {b.storage_offset()}"
        )
        assert a.is_leaf == b.is_leaf, f"{where}: is_leaf differs"
        assert a._version == b._version, f"{where}: version counter {a._version} != {b._version}"
        sa, sb = a.untyped_storage(), b.untyped_storage()
        assert sa.nbytes() == sb.nbytes(), f"{where}: storage of {sa.nbytes()} bytes != {sb.nbytes()} bytes"
        assert _storage_bytes(a) == _storage_bytes(b), f"{where}: storage bytes differ"
        if a.dtype in DTYPES:  # (the storage and strides compared above determine the values anyway)
            assert tensor_bytes(a) == tensor_bytes(b), f"{where}: values differ"
        if sa.nbytes():
            pa, pb = sa.data_ptr(), sb.data_ptr()
            if pa in self.storages:
                assert self.storages[pa] == pb, f"{where}: shares a storage in the expected result, not in the other"
            else:
                assert pb not in self.storages.values(), f"{where}: shares a storage the expected result does not"
                self.storages[pa] = pb
