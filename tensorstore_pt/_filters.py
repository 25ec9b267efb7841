"""Byte filters before a codec: byte shuffle and delta (format 1.3, docs/format.md section 5.3).

Column blocks (:mod:`.columnar`) filter each column with one of them, chosen by measurement;
a coded record map (:mod:`.format`) applies delta then byte shuffle to each of its u64
columns. The transforms are defined on the first ``L - L mod e`` bytes of a buffer of ``L``
bytes (``e`` the element size); the rest is kept as it is:

- ``FILTER_SHUFFLE`` (1): byte 0 of every ``e``-byte element, then byte 1 of every element, ...;
- ``FILTER_DELTA`` (2): the buffer read as unsigned little-endian ``e``-byte integers, stored as
  the first followed by each one minus the one before it, modulo ``2**(8e)``.

Thread safety: pure functions. Memory: one output buffer the size of the input.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

FILTER_NONE, FILTER_SHUFFLE, FILTER_DELTA = 0, 1, 2
_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_TORCH_CUMSUM = {1: torch.uint8, 2: torch.int16}


def _apply(col: bytes, filt: int, size: int) -> bytes:
    """The stored form of column bytes ``col`` under filter ``filt`` of element size ``size``."""
    if filt == FILTER_NONE:
        return col
    out = np.empty(len(col), dtype=np.uint8)
    _apply_into(col, filt, size, out)
    return out.tobytes()


def _apply_into(col: bytes | memoryview, filt: int, size: int, out: np.ndarray) -> None:
    """Write the stored form of ``col`` under filter ``filt`` of element size ``size`` into
    ``out`` (a 1-d uint8 array of ``len(col)`` bytes, aligned or not): one pass over ``col``."""
    a = np.frombuffer(col, dtype=np.uint8)
    if filt == FILTER_NONE:
        out[:] = a
        return
    whole = len(a) // size * size
    if filt == FILTER_SHUFFLE:  # one byte plane at a time: 2-7x faster than a transposed copy
        m = whole // size
        for k in range(size):
            out[k * m : (k + 1) * m] = a[k:whole:size]
    else:
        v = a[:whole].view(_DTYPES[size])
        d = out[:whole].view(_DTYPES[size])
        if len(v):
            d[0] = v[0]
            np.subtract(v[1:], v[:-1], out=d[1:])
    out[whole:] = a[whole:]


def _undo(col: memoryview, filt: int, size: int) -> memoryview:
    """The column bytes stored as ``col`` under filter ``filt`` (a fresh buffer, or ``col``)."""
    if filt == FILTER_NONE:
        return col
    whole = len(col) // size * size
    a = np.frombuffer(col, dtype=np.uint8, count=whole)
    out = o = np.empty(len(col), dtype=np.uint8)  # every byte is written below
    if filt == FILTER_SHUFFLE and size == 2 and whole:
        # Two planes as 16-bit words, low | high << 8: about 2x the strided copies below.
        m = whole // 2
        w = o[:whole].view("<u2")  # byte 0 of each element is its low byte (little-endian)
        np.left_shift(a[m:], 8, out=w, dtype="<u2")
        w |= a[:m]
    elif filt == FILTER_SHUFFLE:  # one byte plane at a time: 2-7x faster than a transposed copy
        m = whole // size
        for k in range(size):
            o[k:whole:size] = a[k * m : (k + 1) * m]
    elif size in _TORCH_CUMSUM and whole:
        # torch's cumsum runs 3-4x numpy's on 1- and 2-byte integers (numpy's takes about
        # 2.6 ns a byte for uint8); int16 two's complement wraps as uint16 does.
        dtype = _TORCH_CUMSUM[size]
        if a.ctypes.data % size:  # read as whole elements, aligned
            src = torch.from_numpy(a.copy()).view(dtype)
        else:
            with warnings.catch_warnings():  # read only, never written: torch warns of any such buffer
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(col, dtype=dtype, count=whole // size)
        torch.cumsum(src, 0, dtype=dtype, out=torch.from_numpy(o[:whole]).view(dtype))
    else:
        np.cumsum(a.view(_DTYPES[size]), dtype=_DTYPES[size], out=o[:whole].view(_DTYPES[size]))
    out[whole:] = col[whole:]
    return memoryview(out)
