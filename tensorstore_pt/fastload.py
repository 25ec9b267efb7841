"""A fast, safe decoder for ``torch.save`` buffers (the record format of a store).

``torch.load(weights_only=True)`` spends most of its time outside the data: a C++ zip
reader, a pure-Python unpickler that re-checks each opcode against lists, and a
``TypedStorage`` and a copy per storage. For the small samples of a dataset that is
100-300 us per record, while decompression takes a few. :func:`fast_loads` returns the same
objects in 10-30 us (see benchmarks/fastload_micro.py).

How it decodes (the *fast path*):

1. **Zip.** The directory is parsed straight from the buffer: end of central directory,
   the zip64 locator and record that ``torch.save`` always writes, every central
   directory entry and its local header, each offset and length checked against the
   buffer. Only the exact layout ``torch.save`` (miniz) writes is accepted: records stored
   (method 0) back to back from offset 0 in directory order, each followed by its data
   descriptor; flags, versions, times and attributes as miniz writes them (a set DOS
   directory bit, say, makes miniz skip a record); no comments, no zip64 sizes; one
   ``<archive>/`` folder holding ``data.pkl``, ``version`` (``b"3\n"``), ``byteorder``
   (``b"little"``), ``data/<digits>`` and optionally ``.format_version``,
   ``.storage_alignment`` (digits) and ``.data/serialization_id`` (ASCII). A record's data
   starts where its local header says (after the 64-byte alignment padding), as in
   torch's reader. CRC-32 fields are not checked: torch's reader does not check them.
2. **Pickle.** ``data.pkl`` runs in a small interpreter, a port of torch's weights-only
   unpickler (torch/_weights_only_unpickler.py) restricted further: the same opcodes minus
   ``BUILD`` and ``NEWOBJ``, the same container rules (``APPEND`` only to a ``list``,
   ``SETITEM`` only to a ``dict``, ``OrderedDict`` or ``Counter``), the same ``MARK``
   frames. ``GLOBAL`` resolves through torch's own allow-list (``_get_allowed_globals()``);
   a name outside it, or in a blocked module such as ``os``, raises
   :class:`~tensorstore_pt.errors.UnsafePayloadError` at once, before anything in the
   pickle is called. ``REDUCE`` calls only these allowed callables:
   ``_rebuild_tensor_v2``/``_v3`` (done here, see 3.), ``_rebuild_parameter``,
   ``OrderedDict``, ``Counter``, ``set``, ``complex``, ``torch.Size``, ``torch.device``,
   ``bytearray`` (of ``bytes``, or empty) and ``_codecs.encode`` (only as
   ``(str, "latin1")``, the form pickle uses for ``bytes``). A storage from
   ``persistent_load`` may only reach a tensor rebuild. Everything else torch allows
   (sparse, quantized, nested and subclass tensors, legacy tensor types, ``BUILD``
   state, bare storages, globals added with ``torch.serialization.add_safe_globals``) is
   left to the *fallback*.
3. **Tensors** are built over the buffer without a copy: one ``torch.frombuffer`` per
   storage record (the storage is exactly the record's bytes and, like torch's, not
   resizable), then ``set_`` with the pickled offset, size and stride exactly as
   ``torch._utils._rebuild_tensor`` does, then ``requires_grad``, metadata and
   ``_backward_hooks`` as torch sets them. Tensors naming one storage key share the
   storage, as in torch.
4. **Known buffers.** Records of one dataset share their zip layout and, mostly, their
   pickle (shapes are in the pickle, values are not). A layout seen 32 times is kept as a
   regular expression that matches its structural bytes literally and its variable spans
   (pickle, storages, CRC fields, serialization id) by length, so the next buffer's zip is
   checked by one C call. A pickle the interpreter ran to the end is kept (bounded: 4096
   pickles, 32 MiB); the second time it is seen it gets a *plan* that rebuilds its result
   (tuples, lists, dicts, OrderedDicts, tensors, immutable leaves) without interpreting it
   again; other results are replayed by the C unpickler, which takes the same steps on the
   same bytes. A pickle that differs from a known one only in literal *values* (a label,
   an id of the same length, a tensor length) is replayed by the C unpickler too. (Why
   replay is exact: :func:`_unpickle`.) The storage records of each buffer are checked
   again in every case.

The *fallback* is ``torch.load(io.BytesIO(buf), weights_only=True, map_location=...)``.
It runs whenever the fast path meets anything outside the subset above, whenever
``map_location`` is not the CPU, and whenever torch state would change what ``torch.load``
does (a dispatch or function mode such as ``FakeTensorMode`` or ``with torch.device(...)``,
a compile tracing context, ``torch.serialization.skip_data``). The fast path has no side
effects before it gives up (it builds tensors over the buffer and calls the pure callables
above), so the fallback sees the same world.

The contract: when the fast path returns, ``torch.load`` returns an identical result (same
types, dtypes, shapes, strides, storage offsets, storage sizes and bytes,
``requires_grad``, sharing of objects and storages); when ``torch.load`` refuses, this
raises. Known differences: the global ``torch.utils.serialization.config.load.mmap``
switch, with which ``torch.load`` refuses every in-memory buffer, is ignored by the fast
path; and for some broken zips the fast path does not accept, ``torch.load`` itself (so
the fallback) returns uninitialized memory as record contents (miniz skips a record it
takes for a directory) -- records of a store are checksummed before they get here.

Errors (what :func:`fast_loads` raises):

* :class:`~tensorstore_pt.errors.UnsafePayloadError` -- the pickle names a global outside
  torch's weights-only allow-list, or torch's weights-only unpickler refused the buffer
  (any ``UnpicklingError`` of torch.load: an opcode it does not support, a ``BUILD`` or
  ``APPEND`` on a type it does not allow... This includes a buffer that is not a zip at
  all, which torch reads as its legacy format). Nothing from the pickle is run.
* :class:`~tensorstore_pt.errors.RecordDecodeError` (a ``CorruptStoreError``) -- any
  other buffer ``torch.load`` cannot load: a broken zip, a truncated pickle, a storage
  record of the wrong size... The exception from torch is chained (``__cause__``).

Buffer ownership and writability:

* ``bytes`` (or a read-only ``memoryview``): the storage records are copied once, as one
  block, into a new ``bytearray`` that the returned tensors share. The tensors are writable,
  like torch.load's, and writing to them never touches the input or other results.
* ``bytearray`` (or a writable ``memoryview``): *no copy*; the returned tensors alias the
  buffer (writing a tensor writes the buffer, and changing the buffer changes the
  tensors). Hand the buffer over: do not reuse or modify it while the tensors live. The
  tensors hold a ``memoryview`` of it, so it stays alive as long as they do and cannot be
  resized meanwhile (``BufferError``). A storage whose address is not a multiple of its
  element size is copied to aligned memory.

Thread safety: safe from many threads (the caches are dicts updated atomically under the
GIL; results share no mutable object). Fork/spawn safe: no handles, no threads. Memory:
the caches hold at most 256 layouts (patterns of at most 64 KiB of structure) and 32 MiB
of pickles with their plans.
"""

from __future__ import annotations

import array
import collections
import io
import itertools
import math
import pickle
import re
import struct
import sys
import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch._guards
import torch.serialization

from .errors import AllocationBudgetError, RecordDecodeError, UnsafePayloadError

__all__ = [
    "BUDGET_SLACK_BYTES",
    "BUDGET_SLACK_UNITS",
    "check_sparse_tensor",
    "collate_records",
    "fast_loads",
    "torch_loads",
]


class _Fallback(Exception):
    """Internal: the fast path does not handle this buffer.

    ``validated`` is True when the interpreter ran the whole pickle under its checks and its
    allocation budget and met only the named cases torch.load decides (:data:`_NAMED_FALLBACKS`);
    every other ``_Fallback`` becomes a :class:`RecordDecodeError`.
    """

    def __init__(self, reason: str = "", validated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.validated = validated


#: Allocation budget of one record (see :class:`_Source`): the data a pickle builds (string and
#: byte payloads made by calls, tensor elements beyond their storage) may total the record's raw
#: length plus this many bytes.
BUDGET_SLACK_BYTES = 64 * 1024
#: ... and the objects it builds may total the pickle's length in bytes plus this many units.
#: A unit stands for about 16 bytes of Python objects (measured on CPython 3.11, interpreter
#: stack pointers included): empty containers cost 4 units, tensors 32, tuples, dict and list
#: items, numbers and strings as the ``_UNITS_*`` constants below, and copies made by calls per
#: element 8 (set, Counter, OrderedDict), 3 (torch.Size) or 1. Steps that are not charged
#: consume at least one pickle byte each and keep a pointer (8 bytes) or less per byte, except
#: the nesting-depth table (about 80 bytes per container that holds another container).
BUDGET_SLACK_UNITS = 64 * 1024
_UNITS_CONTAINER = 4
_UNITS_TENSOR = 32
#: Objects the interpreter makes, in units (16 bytes; sizes as tracemalloc counts them on
#: CPython 3.11): a 1-tuple 48 bytes, a 2- or 3-tuple 56-64, an n-tuple 40 + 8n; an int made by
#: BININT/BININT2 28-32, a float 24; a str 49 + its length (ASCII) or sys.getsizeof; a dict item
#: up to ~80 bytes of table while the dict grows (both tables live: measured 74-78 bytes per
#: item); a list item 8-9 bytes (over-allocation).
_UNITS_TUPLE1 = 4
_UNITS_TUPLE2 = 5
_UNITS_TUPLE3 = 5
_UNITS_NUMBER = 3
_UNITS_DICT_SLOT = 5
#: A key counted for MAX_KEYS_PER_HASH: a (container id, hash) tuple and a dict slot, ~150 bytes.
_UNITS_COUNTED_KEY = 10
#: Units per element of what an iterating call of the allow-list builds from its argument
#: (measured on CPython 3.11: a set or Counter takes 40-90 bytes per element, an OrderedDict
#: up to about 120 bytes, a torch.Size one 8-byte slot and one int object). Charging one unit
#: per element let a pickle call ``set`` on one memoized list again and again and build about
#: 8 times its budget (issue 11: a 93 KB record peaked at 15 MB).
_UNITS_PER_ELEMENT = {set: 8, collections.Counter: 8, collections.OrderedDict: 8, torch.Size: 3}
#: Nesting depth limit of what a pickle builds (tuples, lists, dicts, sets: an empty container is
#: depth 1). torch.save raises RecursionError past about sys.getrecursionlimit() levels (990 of
#: 1000 with the default limit: measured with nested tuples on CPython 3.11), so nothing it writes
#: is deeper; a deeper pickle (one byte per level with TUPLE1) would make CPython's hash() of it
#: recurse in C and overflow the stack (SIGSEGV), and callers that walk results (default_collate,
#: pickling to a DataLoader worker's queue) fail with RecursionError. Refused: RecordDecodeError.
MAX_NESTING_DEPTH = 1000
#: Keys whose hash a writer can choose to collide (big ints: CPython hashes ints modulo 2**61 - 1,
#: unseeded; tuples; complex...) are counted per hash value in each dict, set, Counter and
#: OrderedDict the pickle builds; more than this many keys with one hash value make inserts
#: quadratic (32,000 colliding int keys: 8.5 s) and are refused: RecordDecodeError. str and bytes
#: hashes are seeded at random per process (not counted unless PYTHONHASHSEED=0), ints of BININT's
#: range never collide (but -1/-2), floats collide at most a few dozen times per hash value.
MAX_KEYS_PER_HASH = 64
_CONTAINERS = frozenset([tuple, list, dict, set, collections.OrderedDict, collections.Counter])
_UNCOUNTED_KEYS = frozenset(
    [float, bool, type(None), torch.Tensor] + ([str, bytes] if sys.flags.hash_randomization else [])
)
#: torch.load(weights_only=True) has known bypasses before torch 2.6 (CVE-2025-32434): the
#: fallback refuses to run on an older torch.
_FALLBACK_MIN_TORCH = (2, 6)


# --------------------------------------------------------------------------- zip layout

_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes: end of central directory
_LOC64 = struct.Struct("<4sIQI")  # 20 bytes: zip64 end of central directory locator
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes: zip64 end of central directory record
_CDH = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes: central directory file header
_LFH = struct.Struct("<4s22xHH")  # 30 bytes: local file header (signature, name and extra lengths)

_SIG_LFH = b"PK\x03\x04"
_SIG_CDH = b"PK\x01\x02"
_SIG_EOCD = b"PK\x05\x06"
_SIG_LOC64 = b"PK\x06\x07"
_SIG_EOCD64 = b"PK\x06\x06"
# What torch.save (miniz) writes, pinned: general purpose flags 0x0808 (bit 3: CRC and sizes
# in a data descriptor after the data, bit 11: UTF-8 name) or 0x0800 for an empty record;
# zero versions, times, dates and attributes; a local header with zero CRC and sizes.
_LFH_FIXED = {flags: b"\0\0" + struct.pack("<H", flags) + bytes(18) for flags in (0x0808, 0x0800)}
_EOCD64_VERSIONS = (0x031E, 45)  # "version made by" and "needed" of the zip64 record
_TAIL_BYTES = _EOCD.size + _LOC64.size + _EOCD64.size  # 98
_KNOWN_RECORDS = frozenset(
    ["data.pkl", "version", "byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"]
)


def _parse_zip(data: Any, n: int) -> tuple[dict[str, tuple[int, int]], int, int, list[int]]:
    """Map each record name (without the archive folder) to ``(data_start, nbytes)``.

    Also returns the half-open byte range ``[lo, hi)`` spanned by the ``data/<key>``
    storage records (``lo == hi`` when there are none) and the offsets of the 4-byte
    CRC-32 fields (central directory and data descriptors; torch's reader ignores them).
    Raises ``_Fallback`` for anything that is not the exact layout torch.save writes.
    """
    if n < _TAIL_BYTES + _LFH.size or data[:4] != _SIG_LFH:
        raise _Fallback
    sig, disk, cd_disk, n_disk, n_total, cd_size32, cd_off32, comment = _EOCD.unpack_from(data, n - 22)
    if sig != _SIG_EOCD or disk or cd_disk or comment or n_disk != n_total:
        raise _Fallback
    sig, z_disk, z_off, z_disks = _LOC64.unpack_from(data, n - 42)
    z_at = n - _TAIL_BYTES
    if sig != _SIG_LOC64 or z_disk or z_disks != 1 or z_off != z_at:
        raise _Fallback
    sig, rec_size, made, need, disk, cd_disk, n_disk64, entries, cd_size, cd_off = _EOCD64.unpack_from(data, z_at)
    if (
        sig != _SIG_EOCD64
        or (made, need) != _EOCD64_VERSIONS
        or rec_size != 44
        or disk
        or cd_disk
        or n_disk64 != entries
        or cd_off + cd_size != z_at
        or n_total not in (entries, 0xFFFF)
        or cd_size32 not in (cd_size, 0xFFFFFFFF)
        or cd_off32 not in (cd_off, 0xFFFFFFFF)
        or entries == 0
    ):
        raise _Fallback
    records: dict[str, tuple[int, int]] = {}
    prefix = b""
    pos = cd_off
    expected_lho = 0  # records lie back to back in directory order, the first at offset 0
    lo = hi = -1
    crcs: list[int] = []
    cdh = _CDH.unpack_from
    lfh = _LFH.unpack_from
    for _ in range(entries):
        if pos + 46 > z_at:
            raise _Fallback
        sig, _made, _need, flags, method, _t, _d, _crc, csize, usize, nlen, elen, clen, disk, _ia, _ea, lho = cdh(
            data, pos
        )
        name_end = pos + 46 + nlen
        if (
            sig != _SIG_CDH
            or (flags != 0x0808 and flags != 0x0800)
            or _made
            or _need
            or method
            or _t
            or _d
            or _ia
            or _ea  # miniz reads bit 4 (DOS directory) and then extracts nothing
            or csize != usize
            or csize == 0xFFFFFFFF
            or elen
            or clen
            or disk
            or lho != expected_lho
            or name_end > z_at
            or lho + 30 > cd_off
        ):
            raise _Fallback
        name = bytes(data[pos + 46 : name_end])
        crcs.append(pos + 16)
        pos = name_end
        lsig, lnlen, lelen = lfh(data, lho)
        start = lho + 30 + lnlen + lelen  # where torch's reader starts the data, too
        end = start + csize
        if (
            lsig != _SIG_LFH
            or lnlen != nlen
            or end > cd_off
            or data[lho + 30 : lho + 30 + nlen] != name
            or data[lho + 4 : lho + 26] != _LFH_FIXED[flags]
        ):
            raise _Fallback
        # bit 3: a 16-byte data descriptor (signature, CRC-32, sizes) follows the data
        if flags & 8:
            crcs.append(end + 4)
            expected_lho = end + 16
        else:
            expected_lho = end
        if not prefix:
            slash = name.find(b"/")
            if slash <= 0:
                raise _Fallback
            prefix = name[: slash + 1]
        elif not name.startswith(prefix):
            raise _Fallback
        rel = name[len(prefix) :].decode("ascii")  # UnicodeDecodeError -> fallback
        if rel.startswith("data/"):
            key = rel[5:]
            if not (key.isdigit() and key.isascii()):
                raise _Fallback
            if lo < 0:
                lo = start
            hi = end
        elif rel not in _KNOWN_RECORDS:
            raise _Fallback
        if rel in records:
            raise _Fallback
        records[rel] = (start, csize)
    if pos != z_at or expected_lho != cd_off:
        raise _Fallback
    if lo < 0:
        lo = hi = 0
    return records, lo, hi, crcs


def _record(data: Any, records: dict[str, tuple[int, int]], name: str) -> bytes | None:
    rec = records.get(name)
    if rec is None:
        return None
    return bytes(data[rec[0] : rec[0] + rec[1]])


def _check_records(data: Any, records: dict[str, tuple[int, int]]) -> None:
    """The small records torch.load reads and validates; raise ``_Fallback`` if any is odd."""
    if "data.pkl" not in records or not _small_records_ok(lambda name: _record(data, records, name)):
        raise _Fallback


def _small_records_ok(record: Callable[[str], bytes | None]) -> bool:
    """Whether the small records torch.load reads (``record(name)``: a record's bytes, or None
    where absent) are the ones the fast path serves: ``version`` ``3``, ``byteorder``
    ``little`` on a little-endian machine (torch.load byte-swaps storages otherwise, or takes
    the byte order from its load-endianness setting where the record is absent), an ASCII
    ``.storage_alignment`` and serialization id. Shared by :func:`fast_loads` (the zip's
    records) and :func:`fast_loads_parts` (a column block's layout constants), so that a
    record loads the same from its parts as from its rebuilt bytes."""
    if record("version") != b"3\n":
        return False
    if sys.byteorder != "little" or record("byteorder") != b"little":
        return False
    align = record(".storage_alignment")
    if align is not None and not (align.isdigit() and align.isascii()):
        return False
    sid = record(".data/serialization_id")
    return sid is None or sid.isascii()


# Buffers of one dataset share their zip layout: same record names, sizes and offsets;
# only the pickle, the storage bytes, the CRC-32 fields and the serialization id differ.
# A layout fully parsed and checked _COMPILE_AFTER times is kept as a regular expression
# that matches every structural byte literally and the variable spans by length (``.{k}``;
# ``[\x00-\x7f]{k}`` for the serialization id, which torch decodes as text), so a later
# buffer is checked by one C call (~1 us instead of ~10-20 us). Compiling one costs about
# 0.5-1 ms, which pays off after ~50 uses, hence the count: a dataset whose layouts vary
# (tensors of many lengths) does not compile a pattern for layouts it meets a few times.
# Keyed by the 98-byte zip tail, which holds the buffer length, entry count and central
# directory offset. At most _MAX_LAYOUTS are kept (the first ones; no
# eviction, so a dataset with very many layouts cannot make it compile over and over).
# Thread safe (dict operations under the GIL).
_LAYOUTS: dict[bytes, tuple[re.Pattern[bytes], dict[str, tuple[int, int]], int, int]] = {}
_LAYOUTS_SEEN: dict[bytes, int] = {}
_MAX_LAYOUTS = 256
_COMPILE_AFTER = 32
_MAX_LAYOUT_STRUCTURE_BYTES = 1 << 16


def _layout_pattern(
    data: Any, n: int, records: dict[str, tuple[int, int]], crcs: list[int]
) -> re.Pattern[bytes] | None:
    spans: list[tuple[int, int, bool]] = [(p, 4, False) for p in crcs]
    for rel, (start, size) in records.items():
        if rel == "data.pkl" or rel.startswith("data/"):
            spans.append((start, size, False))
        elif rel == ".data/serialization_id":
            spans.append((start, size, True))
    spans.sort()
    parts: list[bytes] = []
    cur = fixed = 0
    for start, size, text in spans:
        if size == 0:
            continue
        parts.append(re.escape(bytes(data[cur:start])))
        parts.append(b"[\\x00-\\x7f]{%d}" % size if text else b".{%d}" % size)
        fixed += start - cur
        cur = start + size
    parts.append(re.escape(bytes(data[cur:n])))
    fixed += n - cur
    if fixed > _MAX_LAYOUT_STRUCTURE_BYTES:
        return None
    return re.compile(b"".join(parts), re.DOTALL)


def _layout(data: Any, n: int) -> tuple[dict[str, tuple[int, int]], int, int]:
    """``(records, lo, hi)`` of :func:`_parse_zip` for a buffer that passed every check."""
    tail = bytes(data[n - _TAIL_BYTES : n]) if n >= _TAIL_BYTES else b""
    known = _LAYOUTS.get(tail)
    if known is not None and known[0].fullmatch(data) is not None:
        return known[1], known[2], known[3]
    records, lo, hi, crcs = _parse_zip(data, n)
    _check_records(data, records)
    if known is None and len(_LAYOUTS) < _MAX_LAYOUTS:
        seen = _LAYOUTS_SEEN.get(tail, 0) + 1
        if seen < _COMPILE_AFTER:
            if len(_LAYOUTS_SEEN) >= 16 * _MAX_LAYOUTS:
                _LAYOUTS_SEEN.clear()
            _LAYOUTS_SEEN[tail] = seen
        else:
            _LAYOUTS_SEEN.pop(tail, None)
            pattern = _layout_pattern(data, n, records, crcs)
            if pattern is not None:
                _LAYOUTS[tail] = (pattern, records, lo, hi)
    return records, lo, hi


# --------------------------------------------------------------------------- storages

# dtype -> element size in bytes, for the dtypes the fast path builds directly.
_ELEMENT_SIZES: dict[torch.dtype, int] = {
    dt: torch.empty((0,), dtype=dt).element_size()
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
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
        *(
            getattr(torch, name)
            for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
            if hasattr(torch, name)
        ),
    )
}


class _Storage:
    """One ``data/<key>`` record: what torch's ``persistent_load`` returns, made lazily.

    It only ever reaches ``_rebuild_tensor_v2``/``_v3``; the interpreter falls back if it
    (or an argument tuple holding it) would go anywhere else.
    """

    __slots__ = ("base", "budget", "dtype", "nbytes", "offset", "tensor")

    def __init__(self, base: Any, offset: int, nbytes: int, dtype: torch.dtype, budget: _Budget) -> None:
        self.base = base
        self.offset = offset
        self.nbytes = nbytes
        self.dtype = dtype
        self.budget = budget  # not the _Source: a storage -> source -> storages cycle would keep results alive
        self.tensor: torch.Tensor | None = None

    def charged(self, t: torch.Tensor) -> torch.Tensor:
        """Charge a tensor made over this storage to the record's budget (its elements beyond the
        storage's bytes: a stride-0 view of 4 bytes that claims 2**40 elements; 32 units)."""
        logical = t.numel() * t.element_size()
        self.budget.charge(logical - self.nbytes if logical > self.nbytes else 0, _UNITS_TENSOR, "a tensor", logical)
        return t

    def rebuild(self, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> torch.Tensor:
        """What ``torch._utils._rebuild_tensor`` returns for this storage.

        The first tensor is made by ``torch.frombuffer`` over the record's bytes (so its
        storage is exactly the record) and restrided in place with ``set_``; later tensors
        on the same storage are ``torch.empty((0,)).set_(storage, ...)`` as in torch.
        """
        first = self.tensor
        if first is not None:
            return self.charged(torch.empty((0,), dtype=dtype).set_(first.untyped_storage(), offset, size, stride))
        # Every storage made here is non-resizable, like torch's record storages, so that
        # set_ refuses an out-of-bounds size or stride instead of growing the storage.
        if self.nbytes == 0:
            if _empty_storage is None:
                raise _Fallback
            t = torch.empty((0,), dtype=dtype).set_(_empty_storage(0, _CPU, 0), offset, size, stride)
            self.tensor = t
            return self.charged(t)
        elsize = _ELEMENT_SIZES.get(dtype)
        if elsize is None or self.nbytes % elsize:
            raise _Fallback
        count = self.nbytes // elsize
        t = torch.frombuffer(self.base, dtype=dtype, count=count, offset=self.offset)
        if t.data_ptr() % elsize:  # a misaligned buffer: this storage gets an aligned copy
            copy = bytearray(memoryview(self.base)[self.offset : self.offset + self.nbytes])
            t = torch.frombuffer(copy, dtype=dtype)
            if t.data_ptr() % elsize:
                raise _Fallback
        self.tensor = t
        if (  # the whole storage as a 1-D tensor: frombuffer made what set_ would make
            type(offset) is int
            and offset == 0
            and type(size) is tuple
            and len(size) == 1
            and type(size[0]) is int
            and size[0] == count
            and type(stride) is tuple
            and len(stride) == 1
            and type(stride[0]) is int
            and stride[0] == 1
        ):
            _increment_version(t)  # as set_ would: torch.load's tensors are at version 1
            return self.charged(t)
        return self.charged(t.set_(t, offset, size, stride))


# torch's own empty record storage: no data, 0 bytes, not resizable (None if this torch lacks it)
_empty_storage = getattr(torch._C, "_construct_storage_from_data_pointer", None)
_increment_version = torch.autograd.graph.increment_version
_CPU = torch.device("cpu")


class _Budget:
    """The allocation budget of one record, in bytes of data and units of objects.

    Data: string and byte payloads made by calls (``_codecs.encode``, ``bytearray``) and
    tensor elements beyond the bytes of their storage record, at most the record's raw length
    plus :data:`BUDGET_SLACK_BYTES`. Objects: empty containers, tensors and the elements that
    calls copy, at most the pickle's length plus :data:`BUDGET_SLACK_UNITS`. What torch.save
    writes stays well inside both (a tensor takes about 57 pickle bytes, an empty dict 5).
    """

    __slots__ = ("payload_budget", "payload_left", "raw", "units_budget", "units_left")

    def __init__(self, raw: int, pickle_bytes: int) -> None:
        self.raw = raw
        self.payload_budget = self.payload_left = raw + BUDGET_SLACK_BYTES
        self.units_budget = self.units_left = pickle_bytes + BUDGET_SLACK_UNITS

    def charge(self, nbytes: int, units: int, what: str, size: int | None = None) -> None:
        """Take ``nbytes`` of data and ``units`` of objects, or raise *before* the allocation.

        Raises:
            AllocationBudgetError: The record's pickle would build more than its budget allows.
        """
        self.payload_left -= nbytes
        self.units_left -= units
        if self.payload_left < 0 or self.units_left < 0:
            size_note = f" of {size} bytes" if size is not None else ""
            raise AllocationBudgetError(
                f"the record's pickle would allocate past its budget at {what}{size_note}: a record of "
                f"{self.raw} raw bytes may build at most {self.payload_budget} bytes of data and "
                f"{self.units_budget} object units (see docs/integrity.md); it asked for "
                f"{self.payload_budget - self.payload_left} bytes and {self.units_budget - self.units_left} units "
                "so far; nothing more was allocated"
            )


class _Source:
    """The storage records of one buffer, and ``persistent_load`` over them."""

    __slots__ = (
        "base",
        "budget",
        "data",
        "deferred",
        "hi",
        "keyed",
        "lo",
        "records",
        "shift",
        "storages",
        "storage_types",
        "validating",
    )

    def __init__(
        self,
        data: Any,
        writable: bool,
        records: dict[str, tuple[int, int]],
        lo: int,
        hi: int,
        tables: _Tables,
        validating: bool = False,
        raw_bytes: int | None = None,
    ) -> None:
        self.data = data
        self.records = records
        self.lo = lo
        self.hi = hi
        # The record's allocation budget (see BUDGET_SLACK_BYTES / BUDGET_SLACK_UNITS), by its
        # torch.save length (``raw_bytes`` for a record loaded from its parts, format 1.3).
        self.budget = _Budget(len(data) if raw_bytes is None else raw_bytes, records["data.pkl"][1])
        # With ``validating``, the named cases torch.load decides are noted in ``deferred`` and
        # the interpretation goes on (the result is then not used), so that the whole pickle is
        # checked before torch.load runs it.
        self.validating = validating
        self.deferred: list[str] = []
        # Set when a dict/set key's hash depends on a literal value (see _count_keys): a pickle
        # that differs in literals could collide, so it gets no skeleton (exact bytes only).
        self.keyed = False
        # A writable buffer is used in place; read-only bytes are copied (one block, on first use).
        self.base = data if writable else None
        self.shift = 0 if writable else lo
        self.storages: dict[str, _Storage] = {}
        self.storage_types = tables.storage_types

    def storage(self, key: str, dtype: torch.dtype, elsize: int, numel: int) -> _Storage:
        """A new storage for record ``data/<key>``, checked like torch's ``load_tensor``."""
        rec = self.records.get("data/" + key)
        if rec is None or numel < 0 or rec[1] != numel * elsize:
            found = "no such record" if rec is None else f"{rec[1]} bytes"
            raise _Fallback(f"storage data/{key}: expected {numel} x {elsize} bytes, found {found}")
        if len(rec) > 2:  # a storage in a buffer of its own (fast_loads_parts with buffers)
            st = _Storage(rec[2], rec[0], rec[1], dtype, self.budget)
            self.storages[key] = st
            return st
        base = self.base
        if base is None:
            base = self.base = bytearray(memoryview(self.data)[self.lo : self.hi])
        st = _Storage(base, rec[0] - self.shift, rec[1], dtype, self.budget)
        self.storages[key] = st
        return st

    def charge(self, nbytes: int, units: int, what: str, size: int | None = None) -> None:
        """See :meth:`_Budget.charge`."""
        self.budget.charge(nbytes, units, what, size)

    def persistent_load(self, pid: Any) -> _Storage:
        """torch.serialization._load's ``persistent_load``, for ``("storage", type, key, "cpu", numel)``."""
        if type(pid) is not tuple or len(pid) != 5 or type(pid[0]) is not str or pid[0] != "storage":
            raise _Fallback
        _, stype, key, location, numel = pid
        info = self.storage_types.get(id(stype))
        if info is None or info[0] is not stype:
            raise _Fallback
        if type(key) is not str or type(location) is not str or location != "cpu" or type(numel) is not int:
            raise _Fallback
        st = self.storages.get(key)
        if st is not None:
            if st.nbytes == 0:  # torch caches an empty storage or not by its data pointer
                if not self.validating:
                    raise _Fallback("an empty storage named twice")
                self.deferred.append("an empty storage named twice")
            return st  # torch returns the storage loaded first for a key, whatever the type
        return self.storage(key, info[1], info[2], numel)


def _make_tensor(
    storage: _Storage,
    dtype: torch.dtype,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any,
) -> torch.Tensor:
    """The body of ``_rebuild_tensor_v2`` (outside fake mode, which the fast path excludes)."""
    t = storage.rebuild(dtype, offset, size, stride)
    if requires_grad is not False:
        t.requires_grad = requires_grad
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    t._backward_hooks = hooks
    return t


def _rebuild(args: tuple[Any, ...], how: int, rebuilt: dict[int, tuple[Any, ...]] | None) -> torch.Tensor:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``
    or ``_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])``.

    With ``rebuilt``, records how the tensor was made (for :func:`_compile_plan`).
    """
    storage: _Storage = args[0]
    n = len(args)
    if how == _REBUILD_V2:
        if n == 6:
            metadata = None
        elif n == 7:
            metadata = args[6]
        else:
            raise _Fallback
        dtype = storage.dtype
    else:
        if n == 7:
            metadata = None
        elif n == 8:
            metadata = args[7]
        else:
            raise _Fallback
        dtype = args[6]
        if type(dtype) is not torch.dtype or args[4] is not False:
            raise _Fallback  # requires_grad=True goes through torch.empty(requires_grad=...) in torch
    t = _make_tensor(storage, dtype, args[1], args[2], args[3], args[4], args[5], metadata)
    if rebuilt is not None:
        rebuilt[id(t)] = (t, storage, dtype, args[1], args[2], args[3], args[4], args[5], metadata)
    return t


# --------------------------------------------------------------------------- allow-list

_BLOCKED_MODULES = frozenset(["sys", "os", "posix", "nt"])  # as torch._weights_only_unpickler
_REBUILD_V2 = 1
_REBUILD_V3 = 2
_CALL = 3  # call the allowed callable with the pickled arguments, as torch does
_ENCODE = 4  # _codecs.encode, only as (str, "latin1")
_BYTEARRAY = 5  # bytearray, only of bytes or of nothing


class _Tables:
    """Lookups built once from torch's own allow-list, and the caches of known pickles."""

    def __init__(self) -> None:
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING
        from torch._weights_only_unpickler import _get_allowed_globals

        self.allowed: dict[str, Any] = _get_allowed_globals()
        self.import_mapping = IMPORT_MAPPING
        self.name_mapping = NAME_MAPPING
        # raw b"module\nname" of a GLOBAL -> the allowed object (filled as met)
        self.globals: dict[bytes, Any] = {}
        # (module, name) as pickled -> what the replaying C unpickler's find_class returns:
        # the allowed object, or for the tensor rebuild functions a wrapper of _rebuild.
        self.replay_globals: dict[tuple[str, str], Any] = {}
        # id(callable) -> (callable, how REDUCE handles it)
        reducers: list[tuple[Any, int]] = [
            (torch._utils._rebuild_tensor_v2, _REBUILD_V2),
            (torch._utils._rebuild_tensor_v3, _REBUILD_V3),
            (torch._utils._rebuild_parameter, _CALL),
            (collections.OrderedDict, _CALL),
            (collections.Counter, _CALL),
            (set, _CALL),
            (complex, _CALL),
            (torch.Size, _CALL),
            (torch.device, _CALL),
            (bytearray, _BYTEARRAY),
            (self.allowed["_codecs.encode"], _ENCODE),
        ]
        allowed_ids = {id(v) for v in self.allowed.values()}
        for obj, _ in reducers:
            if id(obj) not in allowed_ids:  # a subset of torch's list, whatever torch does
                raise RuntimeError(f"{obj!r} is not in torch's weights-only allow-list")
        self.reducers: dict[int, tuple[Any, int]] = {id(obj): (obj, how) for obj, how in reducers}
        self.rebuild_v2 = torch._utils._rebuild_tensor_v2
        self.rebuild_v3 = torch._utils._rebuild_tensor_v3
        # Allowed callables the replaying C unpickler gets a checking wrapper of (the
        # interpreter makes sure these are only ever called by REDUCE, never kept as values).
        self.wrapped: dict[int, Any] = {
            id(self.rebuild_v2): _replay_rebuild_v2,
            id(self.rebuild_v3): _replay_rebuild_v3,
            id(self.allowed["_codecs.encode"]): _replay_encode,
            id(bytearray): _replay_bytearray,
        }
        # id(storage type global) -> (object, dtype, element size as torch computes it)
        self.storage_types: dict[int, tuple[Any, torch.dtype, int]] = {}
        for name, obj in self.allowed.items():
            if name == "torch.storage.UntypedStorage":
                self.storage_types[id(obj)] = (obj, torch.uint8, 1)
            elif isinstance(obj, torch.serialization.StorageType) and name.count(".") == 1:
                dtype = obj.dtype
                if dtype in _ELEMENT_SIZES:
                    self.storage_types[id(obj)] = (obj, dtype, torch._utils._element_size(dtype))
        # data.pkl bytes the interpreter ran to the end and found replayable -> _SEEN_ONCE,
        # then (next time) a plan, or None: replay with the C unpickler. Bounded in entries
        # and bytes.
        self.known: dict[bytes, Any] = {}
        self.known_bytes = 0
        # Skeletons: len(pickle) -> [(pickle as an int, mask)] of replayable pickles, where
        # the mask has all bits set but those of literal values (the arguments of BININT*,
        # BINFLOAT, LONG1, and the text of BINUNICODE / SHORT_BINSTRING). A pickle equal to
        # one of them under the mask takes the same steps with other values: replayable.
        self.skeletons: dict[int, list[tuple[int, int]]] = {}
        self.skeleton_count = 0

    def remember(self, pkl: bytes, plan: Any) -> None:
        if len(pkl) > _MAX_KNOWN_PICKLE_BYTES:
            return
        if len(self.known) >= _MAX_KNOWN_PICKLES or self.known_bytes + len(pkl) > _MAX_KNOWN_BYTES:
            self.known.clear()
            self.known_bytes = 0
        self.known[pkl] = plan
        self.known_bytes += len(pkl)

    def add_skeleton(self, pkl: bytes, literals: array.array[int]) -> None:
        """Keep ``pkl``'s skeleton; ``literals`` holds the [start, end) offsets of its literal values."""
        if len(pkl) > _MAX_KNOWN_PICKLE_BYTES:
            return
        mask = bytearray(b"\xff") * len(pkl)
        for i in range(0, len(literals), 2):
            mask[literals[i] : literals[i + 1]] = bytes(literals[i + 1] - literals[i])
        same_length = self.skeletons.setdefault(len(pkl), [])
        if len(same_length) >= _MAX_SKELETONS_PER_LENGTH:
            return
        if self.skeleton_count >= _MAX_SKELETONS:
            self.skeletons.clear()
            self.skeleton_count = 0
            same_length = self.skeletons.setdefault(len(pkl), [])
        same_length.append((int.from_bytes(pkl, "little"), int.from_bytes(mask, "little")))
        self.skeleton_count += 1

    def has_skeleton(self, pkl: bytes) -> bool:
        same_length = self.skeletons.get(len(pkl))
        if not same_length:
            return False
        value = int.from_bytes(pkl, "little")
        return any((value ^ known) & mask == 0 for known, mask in same_length)

    def resolve(self, module_b: bytes, name_b: bytes) -> Any:
        """What torch's weights-only ``GLOBAL`` pushes, or raise."""
        module = raw_module = module_b.decode("utf-8")
        name = raw_name = name_b.decode("utf-8")
        if (module, name) in self.name_mapping:
            module, name = self.name_mapping[(module, name)]
        elif module in self.import_mapping:
            module = self.import_mapping[module]
        full = f"{module}.{name}"
        if module in _BLOCKED_MODULES:
            raise UnsafePayloadError(
                f"the record's pickle asks for GLOBAL {full} (module {module!r} is blocked by "
                "torch.load(weights_only=True)); it was not run"
            )
        if full in self.allowed:
            obj = self.allowed[full]
            self.replay_globals[(raw_module, raw_name)] = self.wrapped.get(id(obj), obj)
            return obj
        from torch._weights_only_unpickler import _get_user_allowed_globals

        if full in _get_user_allowed_globals():
            raise _Fallback(f"GLOBAL {full}, allowed only by torch.serialization.add_safe_globals")
        raise UnsafePayloadError(
            f"the record's pickle asks for GLOBAL {full}, which torch.load(weights_only=True) does not "
            "allow; it was not run"
        )


_MAX_KNOWN_PICKLE_BYTES = 1 << 16
_MAX_KNOWN_PICKLES = 4096
_MAX_KNOWN_BYTES = 1 << 25
_MAX_REPLAY_MEMO_INDEX = 1 << 16
_MAX_SKELETONS = 1024
_MAX_SKELETONS_PER_LENGTH = 8

_tables: _Tables | None = None


def _reset_caches() -> None:
    """Forget every known layout and pickle (for benchmarks of the first-sight path)."""
    _LAYOUTS.clear()
    _LAYOUTS_SEEN.clear()
    if _tables is not None:
        _tables.known.clear()
        _tables.known_bytes = 0


def _get_tables() -> _Tables:
    global _tables
    if _tables is None:
        _tables = _Tables()
    return _tables


# --------------------------------------------------------------------------- named fallbacks

_KEYED_ARGS = (list, tuple)
_KEYING_CALLS = (set, collections.Counter, collections.OrderedDict)
_SIZED = frozenset([list, tuple, dict, set, str, bytes, bytearray, collections.OrderedDict, collections.Counter])
_DEFERRED = object()  # what a call torch.load decides stands for while the pickle is checked
#: The calls of torch's allow-list that the fast path leaves to torch.load, by name. Only the
#: sparse layouts (what the writer stores besides strided tensors); they run under
#: torch.sparse.check_sparse_tensor_invariants (see _fallback_load).
_NAMED_FALLBACKS = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch.serialization._get_layout": "a sparse tensor",  # its layout, pickled by name
}


def _named_fallback_call(func: Any, args: Any, src: _Source) -> Any:
    """REDUCE of an allowed callable the fast path does not run: note it if named, else refuse.

    The interpretation goes on with a placeholder so that the rest of the pickle is checked
    (allow-list, budget) before torch.load runs it; the result is then not used.
    """
    name = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
    what = _NAMED_FALLBACKS.get(name)
    if what is None or not src.validating:
        raise _Fallback(f"a call of {name}, which records this package writes do not hold")
    a0 = args[0] if type(args) is tuple and args else None
    src.charge(0, _UNITS_TENSOR + (len(a0) if type(a0) in _SIZED else 0), what)
    src.deferred.append(what)
    return _DEFERRED


# --------------------------------------------------------------------------- interpreter

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_F64 = struct.Struct(">d")


def _too_deep(depth: int, where: str) -> _Fallback:
    return _Fallback(
        f"containers nested {depth} deep at {where}; torch.save writes at most {MAX_NESTING_DEPTH} levels "
        "(deeper nesting would crash hash() and recursion in callers)"
    )


def _nest(value: Any, items: Any, deep: dict[int, int], keep: Any, op: str, at: int) -> None:
    """Note the nesting depth of ``value`` (a container now holding ``items``) in ``deep``.

    ``deep`` maps the id of each container of depth >= 2 to its depth (a container that is
    not in it has depth 1); ``keep`` keeps those containers alive so that their ids stay theirs.
    """
    d = 0
    for x in items:
        if type(x) in _CONTAINERS:
            e = deep.get(id(x), 1)
            if e > d:
                d = e
    if d:
        d += 1
        old = deep.get(id(value))
        if old is None:
            if d > MAX_NESTING_DEPTH:
                raise _too_deep(d, f"{op} (byte {at})")
            keep(value)
            deep[id(value)] = d
        elif d > old:
            if d > MAX_NESTING_DEPTH:
                raise _too_deep(d, f"{op} (byte {at})")
            deep[id(value)] = d


def _count_keys(keys: Any, target: int, counts: dict[tuple[int, int], int], src: _Source, where: str) -> None:
    """Count the keys whose hash a writer can choose (see :data:`MAX_KEYS_PER_HASH`) per hash value
    in the container ``target`` (an id); refuse past the bound. Each new count is charged."""
    for k in keys:
        t = type(k)
        if t in _UNCOUNTED_KEYS or (t is int and -0x80000000 <= k < 0x80000000):
            continue
        src.keyed = True  # a literal could change this key's hash: no skeleton replay
        h = (target, hash(k))
        c = counts.get(h, 0) + 1
        if c == 1:
            src.charge(0, _UNITS_COUNTED_KEY, "a key count")
        elif c > MAX_KEYS_PER_HASH:
            raise _Fallback(
                f"more than {MAX_KEYS_PER_HASH} keys of {where} share one hash value ({h[1]}; a {t.__name__} key): "
                "inserts would take quadratic time; torch.save of a sample does not write such keys"
            )
        counts[h] = c


def _unpickle(
    pkl: bytes,
    src: _Source,
    tables: _Tables,
    rebuilt: dict[int, tuple[Any, ...]] | None = None,
    literals: array.array[int] | None = None,
) -> tuple[Any, bool]:
    """Run ``data.pkl`` with the semantics of torch's weights-only unpickler (a subset).

    Returns the result and whether the same bytes may later be *replayed* by the C
    unpickler (:func:`_replay`). Replaying is exact when every step the C unpickler takes
    on these bytes is one this interpreter took with the same meaning. The interpreter
    already refuses every step where the two differ (containers of another type, BUILD,
    NEWOBJ, other opcodes...), so two conditions remain: the callables that replay swaps
    for checking wrappers (tensor rebuilds, ``_codecs.encode``, ``bytearray``) were only
    ever called by REDUCE and never stored as values (every push of one was consumed by a
    REDUCE), and memo indices are small (the C unpickler sizes its memo array by the
    largest index).

    The same holds for a pickle that differs from a replayable one only in the *values* of
    literals (``literals`` collects their byte ranges): which opcodes run, on which types,
    with which globals, is fixed by the other bytes. Values only reach places that check
    them at run time in replay as here: ``persistent_load`` (key, location, size), ``set_``
    (offset, size, stride on a non-resizable storage), the wrappers (``"latin1"``,
    ``bytes``), or plain data (dict keys, container contents, allowed callables that torch
    calls with any arguments too).
    """
    n = len(pkl)
    pos = 0
    stack: list[Any] = []
    push = stack.append
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    # Storages pushed by BINPERSID and the rebuild-argument tuples holding them are
    # "special": they may only flow into _rebuild_tensor_v2/_v3. ``live`` counts them on
    # the stack; while it is 0 no check is needed. ``args_ids`` keeps the tuples alive.
    # (A BINPUT of a storage is refused; a BINGET of an argument tuple is refused.)
    live = 0
    args_ids: dict[int, tuple[Any, ...]] = {}
    globals_cache = tables.globals
    reducers = tables.reducers
    wrapped = tables.wrapped
    persistent_load = src.persistent_load
    budget = src.budget
    Storage = _Storage
    fn_pushed = fn_reduced = 0  # pushes of a wrapped callable / REDUCEs that called one
    max_memo = 0
    # [start, end) of each literal value, 4 bytes each (a list of ints took ~80 bytes a literal)
    spans = literals if literals is not None else array.array("I")
    lit = spans.extend
    deep: dict[int, int] = {}  # id -> nesting depth of containers of depth >= 2 (see _nest)
    keep = []  # ... kept alive while decoding
    keep_alive = keep.append
    counts: dict[tuple[int, int], int] = {}  # (id(container), hash) -> keys (see _count_keys)
    Containers = _CONTAINERS
    getsizeof = sys.getsizeof
    Uncounted = _UNCOUNTED_KEYS

    # Ordered by how often torch.save emits each opcode. torch.save memoizes nearly every
    # value, so the opcodes that push one also take a BINPUT that follows at once (the
    # value pushed there is never a storage, so BINPUT's check is not needed).
    while True:
        op = pkl[pos]  # IndexError at the end of data: torch raises EOFError
        pos += 1
        if op == 0x71:  # BINPUT
            if live and type(stack[-1]) is Storage:
                raise _Fallback
            memo[pkl[pos]] = stack[-1]
            pos += 1
        elif op == 0x4B:  # BININT1
            push(pkl[pos])
            lit((pos, pos + 1))
            pos += 1
        elif op == 0x58:  # BINUNICODE
            end = pos + 4 + _U32.unpack_from(pkl, pos)[0]
            if end > n:
                raise _Fallback
            value = str(pkl[pos + 4 : end], "utf-8", "surrogatepass")
            budget.units_left -= (end - pos + 69) >> 4 if value.isascii() else (getsizeof(value) + 23) >> 4
            if budget.units_left < 0:
                src.charge(0, 0, "a str (BINUNICODE)", end - pos - 4)
            push(value)
            lit((pos + 4, end))
            pos = end
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x68:  # BINGET
            value = memo[pkl[pos]]
            pos += 1
            if args_ids and id(value) in args_ids:
                raise _Fallback
            if id(value) in wrapped:
                fn_pushed += 1
            push(value)
        elif op == 0x28:  # MARK
            metastack.append(stack)
            stack = []
            push = stack.append
        elif op == 0x74:  # TUPLE
            items = stack
            stack = metastack.pop()
            push = stack.append
            budget.units_left -= (71 + 8 * len(items)) >> 4
            if budget.units_left < 0:
                src.charge(0, 0, "a tuple (TUPLE)")
            if live and items:
                specials = [
                    i for i, x in enumerate(items) if type(x) is Storage or (type(x) is tuple and id(x) in args_ids)
                ]
                if specials:
                    if specials != [0] or type(items[0]) is not Storage or not 6 <= len(items) <= 8:
                        raise _Fallback
                    value = tuple(items)
                    _nest(value, items, deep, keep_alive, "TUPLE", pos - 1)
                    args_ids[id(value)] = value  # the storage is now inside ``value``: live unchanged
                    push(value)
                    if pkl[pos] == 0x71:
                        memo[pkl[pos + 1]] = value
                        pos += 2
                    continue
            value = tuple(items)
            if not Containers.isdisjoint(map(type, items)):
                _nest(value, items, deep, keep_alive, "TUPLE", pos - 1)
            push(value)
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x52:  # REDUCE
            args = stack.pop()
            func = stack[-1]
            entry = reducers.get(id(func))
            if entry is None or entry[0] is not func:
                if live and (type(args) is Storage or id(args) in args_ids):
                    raise _Fallback
                value = _named_fallback_call(func, args, src)
                stack[-1] = value
                if pkl[pos] == 0x71:
                    memo[pkl[pos + 1]] = value
                    pos += 2
                continue
            how = entry[1]
            if how == _REBUILD_V2 or how == _REBUILD_V3:
                if type(args) is not tuple or args_ids.get(id(args)) is not args:
                    raise _Fallback
                live -= 1
                value = _rebuild(args, how, rebuilt)
            else:
                if live and (
                    type(args) is Storage
                    or id(args) in args_ids
                    or (type(args) in (tuple, list) and any(type(a) is Storage or id(a) in args_ids for a in args))
                ):
                    raise _Fallback
                if how == _CALL:
                    # set/Counter/OrderedDict/torch.Size copy their argument: charged per element
                    a0 = args[0] if type(args) is tuple and args else None
                    per = _UNITS_PER_ELEMENT.get(func, 1)
                    if per > 1 and a0 is not None and type(a0) not in _SIZED:
                        # A tensor (or anything else) iterated into elements: torch.save never
                        # writes it, and a tensor's elements (one tensor object each) are not
                        # charged anywhere: refused.
                        raise _Fallback(f"a call of {func!r} over a {type(a0).__name__}")
                    src.charge(
                        0, _UNITS_CONTAINER + (per * len(a0) if type(a0) in _SIZED else 0), f"a call of {func!r}"
                    )
                    if type(a0) in _KEYED_ARGS and func in _KEYING_CALLS:
                        keys = a0
                        if func is collections.OrderedDict:
                            keys = [p[0] for p in a0 if type(p) in _KEYED_ARGS and len(p) == 2]
                        if not Uncounted.issuperset(map(type, keys)):
                            _count_keys(keys, 0, {}, src, f"a call of {func.__name__}")
                    value = func(*args)
                    if type(a0) in Containers and type(value) in Containers:
                        d = deep.get(id(a0))  # what the call copies is no deeper than its argument
                        if d is not None:
                            if d > MAX_NESTING_DEPTH:
                                raise _too_deep(d, f"a call of {func.__name__}")
                            keep_alive(value)
                            deep[id(value)] = d
                elif how == _ENCODE:
                    if type(args) is not tuple or len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
                        raise _Fallback
                    src.charge(len(args[0]), 1, "bytes (_codecs.encode)", len(args[0]))
                    value = args[0].encode("latin1")
                else:  # _BYTEARRAY: pickle writes bytearray(b"") as bytearray()
                    if type(args) is not tuple or len(args) > 1 or (args and type(args[0]) is not bytes):
                        raise _Fallback
                    size = len(args[0]) if args else 0
                    src.charge(size, 1, "a bytearray", size)
                    value = bytearray(*args)
            if how != _CALL:
                fn_reduced += 1  # a wrapped callable
            stack[-1] = value
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x63:  # GLOBAL
            nl1 = pkl.find(b"\n", pos)
            nl2 = pkl.find(b"\n", nl1 + 1) if nl1 >= 0 else -1
            if nl2 < 0:
                raise _Fallback
            raw = pkl[pos:nl2]
            value = globals_cache.get(raw, globals_cache)
            if value is globals_cache:
                value = tables.resolve(pkl[pos:nl1], pkl[nl1 + 1 : nl2])
                globals_cache[raw] = value
            if id(value) in wrapped:
                fn_pushed += 1
            push(value)
            pos = nl2 + 1
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x29:  # EMPTY_TUPLE
            push(())
        elif op == 0x86:  # TUPLE2
            a, b = stack[-2], stack[-1]
            if live and (type(a) is Storage or type(b) is Storage or id(a) in args_ids or id(b) in args_ids):
                raise _Fallback
            budget.units_left -= _UNITS_TUPLE2
            if budget.units_left < 0:
                src.charge(0, 0, "a tuple (TUPLE2)")
            value = (a, b)
            if type(a) in Containers or type(b) in Containers:
                _nest(value, value, deep, keep_alive, "TUPLE2", pos - 1)
            stack[-2:] = [value]
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x51:  # BINPERSID
            pid = stack.pop()
            if live and (type(pid) is Storage or id(pid) in args_ids):
                raise _Fallback
            push(persistent_load(pid))
            live += 1
        elif op == 0x89:  # NEWFALSE
            push(False)
        elif op == 0x85:  # TUPLE1
            a = stack[-1]
            if live and (type(a) is Storage or id(a) in args_ids):
                raise _Fallback
            budget.units_left -= _UNITS_TUPLE1
            if budget.units_left < 0:
                src.charge(0, 0, "a tuple (TUPLE1)")
            value = (a,)
            if type(a) in Containers:
                d = deep.get(id(a), 1) + 1
                if d > MAX_NESTING_DEPTH:
                    raise _too_deep(d, f"TUPLE1 (byte {pos - 1})")
                keep_alive(value)
                deep[id(value)] = d
            stack[-1] = value
            if pkl[pos] == 0x71:
                memo[pkl[pos + 1]] = value
                pos += 2
        elif op == 0x75:  # SETITEMS
            items = stack
            stack = metastack.pop()
            push = stack.append
            target = stack[-1]
            t = type(target)
            if t is not dict and t is not collections.OrderedDict and t is not collections.Counter:
                raise _Fallback
            if live and any(type(x) is Storage or id(x) in args_ids for x in items):
                raise _Fallback
            budget.units_left -= _UNITS_DICT_SLOT * (len(items) >> 1)
            if budget.units_left < 0:
                src.charge(0, 0, f"{len(items) >> 1} dict items (SETITEMS)")
            if not Uncounted.issuperset(map(type, items[::2])):
                _count_keys(items[::2], id(target), counts, src, f"a {t.__name__}")
            if not Containers.isdisjoint(map(type, items)):
                _nest(target, items, deep, keep_alive, "SETITEMS", pos - 1)
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif op == 0x65:  # APPENDS
            items = stack
            stack = metastack.pop()
            push = stack.append
            target = stack[-1]
            if type(target) is not list or (live and any(type(x) is Storage or id(x) in args_ids for x in items)):
                raise _Fallback
            budget.units_left -= len(items)
            if budget.units_left < 0:
                src.charge(0, 0, f"{len(items)} list items (APPENDS)")
            if not Containers.isdisjoint(map(type, items)):
                _nest(target, items, deep, keep_alive, "APPENDS", pos - 1)
            target.extend(items)
        elif op == 0x87:  # TUPLE3
            a, b, c = stack[-3], stack[-2], stack[-1]
            if live and any(type(x) is Storage or id(x) in args_ids for x in (a, b, c)):
                raise _Fallback
            budget.units_left -= _UNITS_TUPLE3
            if budget.units_left < 0:
                src.charge(0, 0, "a tuple (TUPLE3)")
            value = (a, b, c)
            if type(a) in Containers or type(b) in Containers or type(c) in Containers:
                _nest(value, value, deep, keep_alive, "TUPLE3", pos - 1)
            stack[-3:] = [value]
        elif op == 0x88:  # NEWTRUE
            push(True)
        elif op == 0x4E:  # NONE
            push(None)
        elif op == 0x7D:  # EMPTY_DICT
            budget.units_left -= _UNITS_CONTAINER
            if budget.units_left < 0:
                src.charge(0, 0, "an empty dict")
            push({})
        elif op == 0x5D:  # EMPTY_LIST
            budget.units_left -= _UNITS_CONTAINER
            if budget.units_left < 0:
                src.charge(0, 0, "an empty list")
            push([])
        elif op == 0x8F:  # EMPTY_SET
            budget.units_left -= _UNITS_CONTAINER
            if budget.units_left < 0:
                src.charge(0, 0, "an empty set")
            push(set())
        elif op == 0x4D:  # BININT2
            budget.units_left -= _UNITS_NUMBER
            if budget.units_left < 0:
                src.charge(0, 0, "an int (BININT2)")
            push(_U16.unpack_from(pkl, pos)[0])
            lit((pos, pos + 2))
            pos += 2
        elif op == 0x4A:  # BININT
            budget.units_left -= _UNITS_NUMBER
            if budget.units_left < 0:
                src.charge(0, 0, "an int (BININT)")
            push(_I32.unpack_from(pkl, pos)[0])
            lit((pos, pos + 4))
            pos += 4
        elif op == 0x47:  # BINFLOAT
            budget.units_left -= _UNITS_NUMBER
            if budget.units_left < 0:
                src.charge(0, 0, "a float (BINFLOAT)")
            push(_F64.unpack_from(pkl, pos)[0])
            lit((pos, pos + 8))
            pos += 8
        elif op == 0x8A:  # LONG1
            end = pos + 1 + pkl[pos]
            if end > n:
                raise _Fallback
            budget.units_left -= (end - pos + 51) >> 4
            if budget.units_left < 0:
                src.charge(0, 0, "an int (LONG1)")
            push(pickle.decode_long(pkl[pos + 1 : end]))
            lit((pos + 1, end))
            pos = end
        elif op == 0x55:  # SHORT_BINSTRING (torch.load decodes it with encoding="utf-8")
            end = pos + 1 + pkl[pos]
            if end > n:
                raise _Fallback
            value = pkl[pos + 1 : end].decode("utf-8", "strict")
            budget.units_left -= (end - pos + 72) >> 4 if value.isascii() else (getsizeof(value) + 23) >> 4
            if budget.units_left < 0:
                src.charge(0, 0, "a str (SHORT_BINSTRING)", end - pos - 1)
            push(value)
            lit((pos + 1, end))
            pos = end
        elif op == 0x6A:  # LONG_BINGET
            value = memo[_U32.unpack_from(pkl, pos)[0]]
            pos += 4
            if args_ids and id(value) in args_ids:
                raise _Fallback
            if id(value) in wrapped:
                fn_pushed += 1
            push(value)
        elif op == 0x72:  # LONG_BINPUT
            idx = _U32.unpack_from(pkl, pos)[0]
            if live and type(stack[-1]) is Storage:
                raise _Fallback
            memo[idx] = stack[-1]
            if idx > max_memo:
                max_memo = idx
            pos += 4
        elif op == 0x61:  # APPEND
            item = stack.pop()
            target = stack[-1]
            if type(target) is not list or (live and (type(item) is Storage or id(item) in args_ids)):
                raise _Fallback
            budget.units_left -= 1
            if budget.units_left < 0:
                src.charge(0, 0, "a list item (APPEND)")
            if type(item) in Containers:
                _nest(target, (item,), deep, keep_alive, "APPEND", pos - 1)
            target.append(item)
        elif op == 0x73:  # SETITEM
            value = stack.pop()
            key = stack.pop()
            target = stack[-1]
            t = type(target)
            if t is not dict and t is not collections.OrderedDict and t is not collections.Counter:
                raise _Fallback
            if live and any(type(x) is Storage or id(x) in args_ids for x in (key, value)):
                raise _Fallback
            budget.units_left -= _UNITS_DICT_SLOT
            if budget.units_left < 0:
                src.charge(0, 0, "a dict item (SETITEM)")
            if type(key) not in Uncounted:
                _count_keys((key,), id(target), counts, src, f"a {t.__name__}")
            if type(key) in Containers or type(value) in Containers:
                _nest(target, (key, value), deep, keep_alive, "SETITEM", pos - 1)
            target[key] = value
        elif op == 0x80:  # PROTO: torch warns for anything but 2; let it
            if pkl[pos] != 2:
                raise _Fallback(f"pickle protocol {pkl[pos]} (torch.save writes protocol 2)")
            pos += 1
        elif op == 0x2E:  # STOP
            result = stack.pop()
            if live and (type(result) is Storage or id(result) in args_ids):
                raise _Fallback
            return result, fn_pushed == fn_reduced and max_memo < _MAX_REPLAY_MEMO_INDEX
        else:  # BUILD, NEWOBJ and the opcodes torch refuses
            raise _Fallback(f"pickle opcode {op:#04x} at byte {pos - 1}, outside what torch.save writes for samples")


# --------------------------------------------------------------------------- replay

# A pickle seen before is not interpreted again. If its result is made of tuples, lists,
# dicts, OrderedDicts, plain tensors and immutable leaves, a *plan* rebuilds it directly:
# a tree of nodes mirroring the first result, where each tensor node holds the arguments
# its rebuild got (the same for the same bytes) and refers to a storage record by key.
# Other results are replayed by the C unpickler. Either way the buffer's own storage
# records are checked again (size and presence), as persistent_load does.

_CONST = 0  # (_CONST, value): an immutable leaf or tuple of them, shared between results
_TUPLE = 1  # (_TUPLE, slot, children)
_LIST = 2  # (_LIST, slot, children)
_DICT = 3  # (_DICT, slot, pairs, cls)
_TENSOR = 4  # (_TENSOR, slot, storage index, dtype, offset, size, stride, requires_grad, hooks node, metadata)
_IMMUTABLE = frozenset([int, float, bool, type(None), str, bytes, complex, torch.dtype, torch.device, torch.Size])
_UNSET = object()
_SEEN_ONCE = object()  # tables.known: interpreted once, replayable; plan on the next sight


class _Plan:
    __slots__ = ("root", "slots", "storages")

    def __init__(self, root: tuple[Any, ...], slots: int, storages: list[tuple[str, torch.dtype, int, int]]) -> None:
        self.root = root
        self.slots = slots
        self.storages = storages  # (key, dtype, element size, numel) in first-use order


def _compile_plan(result: Any, src: _Source, rebuilt: dict[int, tuple[Any, ...]]) -> _Plan | None:
    """A plan that rebuilds ``result`` from another buffer, or None if it has other types."""
    specs: list[tuple[str, torch.dtype, int, int]] = []
    for key, st in src.storages.items():
        elsize = _ELEMENT_SIZES[st.dtype]  # storage dtypes all come from this table
        specs.append((key, st.dtype, elsize, st.nbytes // elsize))
    builder = _PlanBuilder(src, rebuilt)
    try:
        root = builder.build(result, 0)
    except _Fallback:
        return None
    return _Plan(root, builder.slots, specs)


class _PlanBuilder:
    """Turns a result into plan nodes; an object met twice gets one node (one slot)."""

    def __init__(self, src: _Source, rebuilt: dict[int, tuple[Any, ...]]) -> None:
        self.order = {id(st): i for i, st in enumerate(src.storages.values())}
        self.rebuilt = rebuilt
        self.nodes: dict[int, tuple[Any, ...]] = {}
        self.busy: set[int] = set()
        self.slots = 0

    def build(self, obj: Any, depth: int) -> tuple[Any, ...]:
        t = type(obj)
        if t in _IMMUTABLE:
            return (_CONST, obj)
        known = self.nodes.get(id(obj))
        if known is not None:
            return known
        if id(obj) in self.busy or depth > 100:
            raise _Fallback  # a cycle, or too deep: not planned
        self.busy.add(id(obj))
        build = self.build
        if t is tuple:
            children = tuple(build(x, depth + 1) for x in obj)
            if all(c[0] == _CONST for c in children):
                node: tuple[Any, ...] = (_CONST, obj)
            else:
                node = (_TUPLE, self._slot(), children)
        elif t is list:
            node = (_LIST, self._slot(), tuple(build(x, depth + 1) for x in obj))
        elif t is dict or t is collections.OrderedDict:
            pairs = tuple((build(k, depth + 1), build(v, depth + 1)) for k, v in obj.items())
            node = (_DICT, self._slot(), pairs, t)
        elif t is torch.Tensor:
            info = self.rebuilt.get(id(obj))
            if info is None or info[0] is not obj:
                raise _Fallback
            _, st, dtype, offset, size, stride, requires_grad, hooks, metadata = info
            if type(hooks) is not collections.OrderedDict or type(metadata) not in (dict, type(None)):
                raise _Fallback
            hooks_node = build(hooks, depth + 1)
            storage_index = self.order[id(st)]
            node = (
                _TENSOR,
                self._slot(),
                storage_index,
                dtype,
                offset,
                size,
                stride,
                requires_grad,
                hooks_node,
                metadata,
            )
        else:
            raise _Fallback
        self.busy.discard(id(obj))
        self.nodes[id(obj)] = node
        return node

    def _slot(self) -> int:
        self.slots += 1
        return self.slots - 1


def _run_plan(plan: _Plan, src: _Source) -> Any:
    storage = src.storage
    storages = [storage(key, dtype, elsize, numel) for key, dtype, elsize, numel in plan.storages]
    return _run_node(plan.root, [_UNSET] * plan.slots, storages)


def _run_node(node: tuple[Any, ...], memo: list[Any], storages: list[_Storage]) -> Any:
    # A module-level function, not a closure: a recursive closure is a reference cycle
    # that would keep every result alive until the cyclic garbage collector runs.
    kind = node[0]
    if kind == _CONST:
        return node[1]
    value = memo[node[1]]
    if value is not _UNSET:
        return value
    if kind == _TENSOR:  # _make_tensor, inlined
        _, _, si, dtype, offset, size, stride, requires_grad, hooks, metadata = node
        value = storages[si].rebuild(dtype, offset, size, stride)
        if requires_grad is not False:
            value.requires_grad = requires_grad
        if metadata:
            torch._utils.set_tensor_metadata(value, metadata)
        if hooks[0] == _DICT and not hooks[2]:  # the usual empty OrderedDict
            h = memo[hooks[1]]
            if h is _UNSET:
                h = memo[hooks[1]] = hooks[3]()
            value._backward_hooks = h
        else:
            value._backward_hooks = _run_node(hooks, memo, storages)
    elif kind == _TUPLE:
        value = tuple([_run_node(c, memo, storages) for c in node[2]])
    elif kind == _LIST:
        value = [_run_node(c, memo, storages) for c in node[2]]
    else:
        value = node[3]()
        for k, v in node[2]:
            value[_run_node(k, memo, storages)] = _run_node(v, memo, storages)
    memo[node[1]] = value
    return value


def _replay_rebuild_v2(*args: Any) -> torch.Tensor:
    return _rebuild(args, _REBUILD_V2, None)


def _replay_rebuild_v3(*args: Any) -> torch.Tensor:
    return _rebuild(args, _REBUILD_V3, None)


# The source of the buffer the C unpickler is replaying in this thread (for the budget).
_REPLAY = threading.local()


def _replay_encode(*args: Any) -> bytes:
    """``_codecs.encode`` as the interpreter allows it: ``(str, "latin1")`` only."""
    if len(args) != 2 or type(args[0]) is not str or args[1] != "latin1":
        raise _Fallback
    _REPLAY.src.charge(len(args[0]), 1, "bytes (_codecs.encode)", len(args[0]))
    return args[0].encode("latin1")


def _replay_bytearray(*args: Any) -> bytearray:
    """``bytearray`` as the interpreter allows it: of ``bytes``, or of nothing."""
    if len(args) > 1 or (args and type(args[0]) is not bytes):
        raise _Fallback
    size = len(args[0]) if args else 0
    _REPLAY.src.charge(size, 1, "a bytearray", size)
    return bytearray(*args)


class _ReplayUnpickler(pickle.Unpickler):
    """The C unpickler, for pickles :func:`_unpickle` ran and found replayable.

    ``find_class`` only returns what the interpreter resolved for the same names.
    """

    def find_class(self, module: str, name: str) -> Any:
        return _get_tables().replay_globals[(module, name)]


def _replay(pkl: bytes, src: _Source) -> Any:
    unpickler = _ReplayUnpickler(io.BytesIO(pkl), fix_imports=False, encoding="utf-8", errors="strict")
    unpickler.persistent_load = src.persistent_load  # type: ignore[method-assign]
    outer = getattr(_REPLAY, "src", None)
    _REPLAY.src = src
    try:
        return unpickler.load()
    finally:
        _REPLAY.src = outer


# --------------------------------------------------------------------------- entry points


# Thread-local torch state that changes what torch.load does (read on every call: the
# public helpers, torch._guards.detect_fake_mode and the config module, cost microseconds).
_GUARDS_TLS = torch._guards._TLS  # TracingContext (torch.compile) lives here
_SERIALIZATION_TLS = torch.serialization._serialization_tls  # skip_data


def _torch_state_is_plain() -> bool:
    """No mode, tracing context or ``skip_data`` that changes what torch.load would do."""
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or getattr(_GUARDS_TLS, "tracing_context", None) is not None
        or _SERIALIZATION_TLS.skip_data
    )


def _fast_path(buf: bytes | bytearray | memoryview, check_state: bool = True) -> Any:
    """Decode ``buf`` on the CPU or raise ``_Fallback`` (or a typed error).

    A ``_Fallback`` with ``validated`` set means the whole pickle was checked and only the
    named cases torch.load decides remain; any other ``_Fallback`` means "refuse".
    """
    if check_state and not _torch_state_is_plain():
        raise _Fallback("torch state (a mode, tracing context or skip_data)", validated=True)
    t = type(buf)
    if t is bytes:
        data: Any = buf
        writable = False
    elif t is bytearray:
        # Through a memoryview: torch.frombuffer keeps a reference to the object it is given
        # but releases its buffer export, so a bare bytearray could be resized (moved) under
        # the tensors. A memoryview holds the export for as long as the tensors live.
        data = memoryview(buf)
        writable = True
    else:
        mv = memoryview(buf)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        data = mv
        writable = not mv.readonly
    try:
        records, lo, hi = _layout(data, len(data))
    except _Fallback as exc:
        raise RecordDecodeError(
            f"the record's zip layout ({len(data)} bytes) is not what torch.save writes (entry kinds, flags, "
            "names, order, alignment, sizes, duplicate or overlapping entries); it was not loaded"
        ) from exc
    start, nbytes = records["data.pkl"]
    pkl = bytes(data[start : start + nbytes])
    return _run_pickle(pkl, data, writable, records, lo, hi, None)


def _run_pickle(
    pkl: bytes,
    data: Any,
    writable: bool,
    records: dict[str, tuple[int, int]],
    lo: int,
    hi: int,
    raw_bytes: int | None,
) -> Any:
    """The pickle half of :func:`_fast_path`: ``pkl`` over the storage records of ``data``."""
    tables = _get_tables()
    src = _Source(data, writable, records, lo, hi, tables, raw_bytes=raw_bytes)
    known = tables.known.get(pkl, _UNSET)
    if known is _UNSET:  # first sight
        if tables.has_skeleton(pkl):  # another pickle like it but for literal values ran before
            try:
                result = _replay(pkl, src)
                # Seen once: if it recurs (a label among a few classes), it gets a plan as below.
                tables.remember(pkl, _SEEN_ONCE)
                return result
            except AllocationBudgetError:
                raise
            except Exception:  # the interpreter decides (a fresh source: nothing of this is reused)
                pass
        src = _Source(data, writable, records, lo, hi, tables, validating=True, raw_bytes=raw_bytes)
        literals = array.array("I")
        result, replayable = _unpickle(pkl, src, tables, None, literals)
        if src.deferred:
            raise _Fallback(", ".join(sorted(set(src.deferred))), validated=True)
        if replayable:
            tables.remember(pkl, _SEEN_ONCE)
            if not src.keyed:
                tables.add_skeleton(pkl, literals)
        return result
    if known is _SEEN_ONCE:  # second sight: a pickle that recurs; plan it
        rebuilt: dict[int, tuple[Any, ...]] = {}
        src.validating = True
        result, replayable = _unpickle(pkl, src, tables, rebuilt)
        if src.deferred:  # not reached: a pickle with deferred calls is never remembered
            raise _Fallback(", ".join(sorted(set(src.deferred))), validated=True)
        if replayable:
            tables.known[pkl] = _compile_plan(result, src, rebuilt)
        return result
    if known is None:
        return _replay(pkl, src)
    return _run_plan(known, src)


#: What :func:`fast_loads_parts` returns when the fast path declines a record.
DECLINED = object()
#: The storage-record tables of container-free records, by pickle length and storage spans
#: (one per shape of record; emptied past _MAX_PARTS_RECORDS). Dict updates under the GIL.
_PARTS_RECORDS: dict[tuple[Any, ...], dict[str, tuple[int, int]]] = {}
_MAX_PARTS_RECORDS = 1024


def fast_loads_parts(
    pickle: Any,
    blob: bytearray | tuple[Any, ...],
    spans: list[tuple[int, int]],
    raw_bytes: int,
    constants: dict[str, bytes],
) -> Any:
    """Load a container-free record (format 1.3) from its parts, on the CPU, without a zip.

    The same decoder as :func:`fast_loads`, over a pickle and storages that were never in a
    zip container: storage ``data/<j>`` is bytes ``spans[j]`` of ``blob`` (aliased by the
    returned tensors: hand it over). Only the plain case is served: the CPU, torch's state
    plain, a pickle the fast path decides alone; everything else (and every error) returns
    :data:`DECLINED`, and the caller loads the record's rebuilt ``torch.save`` bytes with
    :func:`fast_loads`, which decides and types the error.

    Args:
        pickle: The record's ``data.pkl`` bytes.
        blob: The storages, in one writable buffer; or a tuple of writable buffers (each a
            ``bytearray`` or a view of one), storage ``j`` in ``blob[j]``, each handed over
            like a single buffer (a storage whose bytes are not aligned for its dtype is
            copied).
        spans: ``(offset, length)`` of each storage in ``blob`` (in ``blob[j]``), in key order.
        raw_bytes: The record's ``torch.save`` length (its allocation budget, as for
            :func:`fast_loads` of those bytes).
        constants: The container layout's constant records (``dict(PtLayout.constants)``:
            ``version``, ``byteorder``...), which the rebuilt bytes hold: a layout whose
            records :func:`fast_loads` would not serve (a ``byteorder`` of ``big``, which
            torch.load byte-swaps) is declined, so that both load the same.

    Returns:
        The sample, or :data:`DECLINED`.

    Thread safety: as :func:`fast_loads`.
    """
    if not _torch_state_is_plain() or not small_records_ok(constants):
        return DECLINED
    if type(blob) is tuple:  # a buffer a storage: the table is this record's own
        records: dict[str, tuple[Any, ...]] = {"data.pkl": (0, len(pickle))}
        for j, ((off, n), buf) in enumerate(zip(spans, blob)):
            records[f"data/{j}"] = (off, n, buf)
        blob = bytearray()
    else:
        records = _parts_records(len(pickle), spans)
    try:
        return _run_pickle(pickle if type(pickle) is bytes else bytes(pickle), memoryview(blob), True, records, 0,
                           len(blob), raw_bytes)  # fmt: skip
    except Exception:  # noqa: BLE001 - declined: fast_loads of the rebuilt bytes decides and types it
        return DECLINED


def small_records_ok(constants: dict[str, bytes]) -> bool:
    """Whether a container layout's constant records (``dict(PtLayout.constants)``) are ones
    the fast path serves (see :func:`_small_records_ok`): only then is a container-free record
    loaded, or collated, from its parts; otherwise from its rebuilt ``torch.save`` bytes."""
    return _small_records_ok(constants.get)


def _parts_records(pickle_bytes: int, spans: list[tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """The storage-record table of a container-free record (``data.pkl`` and ``data/<j>`` at
    ``spans[j]`` of its storage buffer), shared by every record of that shape: read-only."""
    key = (pickle_bytes, *spans)
    records = _PARTS_RECORDS.get(key)
    if records is None:
        records = {"data.pkl": (0, pickle_bytes)}
        for j, span in enumerate(spans):
            records[f"data/{j}"] = span
        if len(_PARTS_RECORDS) >= _MAX_PARTS_RECORDS:
            _PARTS_RECORDS.clear()
        _PARTS_RECORDS[key] = records
    return records


def _is_cpu(map_location: Any) -> bool:
    """``None`` (records are CPU), ``"cpu"`` or ``torch.device("cpu")``: what the fast path serves."""
    if map_location is None:
        return True
    if type(map_location) is str:
        return map_location == "cpu"
    return type(map_location) is torch.device and map_location == _CPU


def torch_loads(buf: bytes | bytearray | memoryview, map_location: Any = "cpu") -> Any:
    """``torch.load(io.BytesIO(buf), weights_only=True, map_location=map_location)`` with
    the errors mapped to this package's tree: the reference path and the fallback.

    Raises:
        UnsafePayloadError: torch's weights-only unpickler refused the pickle.
        RecordDecodeError: torch.load failed in any other way (chained).
    """
    try:
        return torch.load(io.BytesIO(buf), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "unsupported" in msg.lower():
            first = msg.strip().splitlines()[0] if msg.strip() else msg
            for line in msg.splitlines():
                if "Unsupported" in line or "GLOBAL" in line:
                    first = line.strip()
                    break
            raise UnsafePayloadError(
                "the record's pickle asks for something torch.load(weights_only=True) refuses; "
                f"it was not run ({first})"
            ) from exc
        raise RecordDecodeError(f"the record is not a loadable torch.save buffer (UnpicklingError: {msg})") from exc
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise RecordDecodeError(
            f"the record is not a loadable torch.save buffer ({type(exc).__name__}: {lines[0] if lines else ''})"
        ) from exc


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _fallback_load(buf: bytes | bytearray | memoryview, map_location: Any, why: str) -> Any:
    """torch.load for a buffer the fast path checked, on a torch without known bypasses.

    Sparse tensors are loaded under ``torch.sparse.check_sparse_tensor_invariants``, so that
    indices out of range are refused (torch only checks them with the switch on).

    Raises:
        UnsafePayloadError: This torch is older than 2.6, whose weights-only unpickler has
            known bypasses (CVE-2025-32434); or torch.load's unpickler refused the pickle.
        RecordDecodeError: torch.load failed in any other way (chained).
    """
    if _torch_version() < _FALLBACK_MIN_TORCH:
        raise UnsafePayloadError(
            f"the record needs torch.load(weights_only=True) ({why}), which has known bypasses before torch "
            f"{'.'.join(map(str, _FALLBACK_MIN_TORCH))} (CVE-2025-32434); this is torch {torch.__version__}: "
            "upgrade torch to load it"
        )
    with torch.sparse.check_sparse_tensor_invariants(True):
        return _check_sparse_in(_torch_loads_unchecked_sparse(buf, map_location))


def _torch_loads_unchecked_sparse(buf: bytes | bytearray | memoryview, map_location: Any) -> Any:
    # torch's own check of loaded sparse tensors refuses some it wrote itself (a size-1
    # col_indices view of stride 2: "expected col_indices to be a contiguous tensor per batch"),
    # so torch.load runs with it off and every sparse tensor is checked after, on contiguous
    # components, by the same validators (_check_sparse_in). Nothing is returned unchecked.
    with torch.sparse.check_sparse_tensor_invariants(False):
        return torch_loads(buf, map_location)


_SPARSE_COMPRESSED = {
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}


def check_sparse_tensor(t: torch.Tensor) -> None:
    """Check a sparse tensor's invariants as ``torch.sparse.check_sparse_tensor_invariants`` does.

    COO: indices within the size, and really coalesced if the tensor says so. Compressed
    layouts (CSR, CSC, BSR, BSC): compressed indices monotone from 0 to nnz, plain indices
    within the size and sorted per row (column). Strided tensors, and tensors on the meta
    device, are not checked.

    Raises:
        RuntimeError: From torch's validators, saying which invariant fails.
    """
    layout = t.layout
    if layout == torch.strided or t.device.type == "meta":
        return
    if layout == torch.sparse_coo:
        torch._validate_sparse_coo_tensor_args(t._indices(), t._values(), t.size(), t.is_coalesced())
        return
    names = _SPARSE_COMPRESSED.get(layout)
    if names is None:
        raise RuntimeError(f"a tensor of layout {layout}, which this package does not store")
    # fresh contiguous copies: torch's check refuses a size-1 view of stride 2 that torch.save wrote
    compressed, plain = (
        torch.empty(c.shape, dtype=c.dtype, device=c.device).copy_(c) for c in (getattr(t, n)() for n in names)
    )
    torch._validate_sparse_compressed_tensor_args(compressed, plain, t.values(), t.size(), layout)


def _check_sparse_in(result: Any) -> Any:
    """Check every sparse tensor in a loaded result (containers walked, at most 1000 deep)."""
    stack = [(result, 0)]
    seen: set[int] = set()
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            check_sparse_tensor(obj)
            continue
        t = type(obj)
        if t not in (list, tuple, set, dict, collections.OrderedDict, collections.Counter) or id(obj) in seen:
            continue
        if depth > 1000:
            raise RecordDecodeError("the record's containers nest more than 1000 deep")
        seen.add(id(obj))
        items = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
        stack.extend((x, depth + 1) for x in items)
    return result


class _PlainState:
    """Torch's dispatch and function modes and ``skip_data`` switched off (for checking a buffer)."""

    def __enter__(self) -> None:
        from torch.utils._python_dispatch import _disable_current_modes

        self._skip = _SERIALIZATION_TLS.skip_data
        self._tracing = getattr(_GUARDS_TLS, "tracing_context", None)
        _SERIALIZATION_TLS.skip_data = False
        _GUARDS_TLS.tracing_context = None
        self._modes = _disable_current_modes()
        self._modes.__enter__()
        self._function = torch._C.DisableTorchFunction()
        self._function.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._function.__exit__(*exc)
        self._modes.__exit__(*exc)
        _GUARDS_TLS.tracing_context = self._tracing
        _SERIALIZATION_TLS.skip_data = self._skip


def _refused(exc: _Fallback) -> RecordDecodeError:
    reason = f": {exc.reason}" if exc.reason else ""
    return RecordDecodeError(
        f"the record's pickle is not one torch.save writes for the samples this package stores{reason}; "
        "it was not loaded (torch.load is only asked about sparse tensors, non-CPU map_location and torch modes)"
    )


def fast_loads(buf: bytes | bytearray | memoryview, map_location: Any = "cpu") -> Any:
    """Load one ``torch.save`` buffer like ``torch.load(weights_only=True)``, fast and bounded.

    Only what ``torch.save`` writes for the samples of a store is loaded: a zip laid out as
    torch.save lays it out, and a pickle within the fast path's subset of torch's
    weights-only allow-list. ``torch.load`` is asked only in named cases, each *after* the
    fast path checked the whole buffer (zip layout, allow-list, allocation budget): sparse
    tensors (loaded under ``torch.sparse.check_sparse_tensor_invariants``), a
    ``map_location`` other than the CPU, and torch modes or ``skip_data`` that change what
    torch.load does. It never runs on a torch older than 2.6.

    Args:
        buf: The whole buffer ``torch.save`` wrote (a ``.pt`` file's bytes). ``bytes`` are
            copied once (the storage block); a ``bytearray`` or writable ``memoryview`` is
            *aliased* by the returned tensors (see the module docstring).
        map_location: ``"cpu"``, ``torch.device("cpu")`` or ``None`` (a CPU record) use the
            fast path; anything else is passed to ``torch.load`` once the fast path accepted
            the buffer.

    Returns:
        What ``torch.load(io.BytesIO(buf), weights_only=True, map_location=...)`` returns:
        the same container types, tensors with the same dtype, shape, stride, storage offset,
        bytes and ``requires_grad``; tensors are writable.

    Raises:
        UnsafePayloadError: The pickle asks for a global outside torch's weights-only
            allow-list (or torch's weights-only unpickler refused it); nothing was run. Also
            when the buffer needs torch.load and this torch is older than 2.6.
        RecordDecodeError: The zip layout or the pickle is not what torch.save writes, or
            the buffer does not load (truncated pickle, wrong storage sizes, invalid sparse
            indices...); the cause is chained.
        AllocationBudgetError: Decoding would allocate past the record's budget: data (string
            and byte payloads made by calls, tensor elements beyond their storage) above
            ``len(buf) + BUDGET_SLACK_BYTES`` bytes, or objects above ``len(data.pkl) +
            BUDGET_SLACK_UNITS`` units (docs/integrity.md); raised before the allocation. Also
            in place of a ``MemoryError``.

    Thread safety: safe from many threads. Peak memory: the input plus, for ``bytes``, one
    copy of the storage records, plus what the budget allows.
    """
    try:
        if _is_cpu(map_location) and _torch_state_is_plain():
            try:
                return _fast_path(buf)
            except _Fallback as exc:
                if not exc.validated:
                    raise _refused(exc) from exc
                why = exc.reason
        else:  # check the buffer on the CPU with torch's modes off, then let torch.load map it
            why = "a map_location other than the CPU" if not _is_cpu(map_location) else "torch state"
            try:
                with _PlainState():
                    _fast_path(buf, check_state=False)
            except _Fallback as exc:
                if not exc.validated:
                    raise _refused(exc) from exc
                why = exc.reason
        return _fallback_load(buf, map_location, why)
    except (UnsafePayloadError, RecordDecodeError, AllocationBudgetError):
        raise
    except MemoryError as exc:
        raise AllocationBudgetError(
            f"decoding the record ({len(buf)} raw bytes) ran out of memory (MemoryError); nothing was returned"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a broken pickle: IndexError, KeyError, RuntimeError from set_...
        lines = str(exc).strip().splitlines()
        raise RecordDecodeError(
            f"the record is not a loadable torch.save buffer ({type(exc).__name__}: {lines[0] if lines else ''})"
        ) from exc


# --------------------------------------------------------------------------- batches of records

# How a batch of records is collated without a tensor per record (see collate_records): a planned
# pickle's *batch spec* is its plan's result with the literal leaves taken out. Nodes:
#   (_B_TENSOR, storage key, dtype, nbytes, size): a tensor that is the whole of its own storage
#   (offset 0, contiguous, of the storage's dtype), no requires_grad, hooks or metadata;
#   (_B_LEAF, type, in a sequence): a literal int, float, bool, str or bytes (its value is per
#   record); default_collate hands a leaf's values over as a tuple inside lists and tuples (it
#   transposes them with zip), as a list elsewhere, and str and bytes come back as that object;
#   (_B_DICT, cls, ((key type, key), ...), children): a dict or OrderedDict with literal keys;
#   (_B_LIST, children), (_B_TUPLE, children).
# Specs are interned, so records whose pickles differ only in leaf values (a label, an id)
# share one spec object and batch together.
_B_TENSOR, _B_LEAF, _B_DICT, _B_LIST, _B_TUPLE = range(5)
_BATCH_LEAVES = frozenset([int, float, bool, str, bytes])
# pickle -> (interned spec, leaf values in spec order), or False (no spec: collate_records declines).
# Bounded like tables.known (pickles of at most 64 KiB; cleared when it holds _MAX_KNOWN_PICKLES
# entries or _MAX_KNOWN_BYTES of pickles).
_BATCH_SPECS: dict[bytes, Any] = {}
_BATCH_SPECS_BYTES = 0
# [calls left that plan no new pickle, current back-off]: see collate_records.
_PLAN_BACKOFF = [0, 0]
_MAX_PLAN_BACKOFF = 64
_SPEC_INTERN: dict[Any, Any] = {}


class _NoSpec(Exception):
    """Internal: a plan whose result collate_records does not cover."""


def _batch_spec(plan: _Plan) -> tuple[Any, tuple[Any, ...]] | None:
    """``(spec, leaf values)`` of ``plan`` (see above), or None if its result has anything else:
    a tensor that is a view, shares a storage or needs grad, hooks or metadata; a leaf of
    another type (None, complex, torch.dtype...); a non-literal dict key."""
    values: list[Any] = []
    used: set[int] = set()
    containers: set[int] = set()  # a container the result holds twice (one object): not covered

    def const(v: Any, in_seq: bool) -> Any:
        t = type(v)
        if t in _BATCH_LEAVES:
            values.append(v)
            return (_B_LEAF, t, in_seq)
        if t is tuple:
            return (_B_TUPLE, tuple(const(x, True) for x in v))
        raise _NoSpec

    def node(n: tuple[Any, ...], in_seq: bool) -> Any:
        kind = n[0]
        if kind == _CONST:
            return const(n[1], in_seq)
        if kind == _TENSOR:
            _, _, si, dtype, offset, size, stride, requires_grad, hooks, metadata = n
            key, st_dtype, elsize, numel = plan.storages[si]
            size = tuple(size)
            if (
                si in used
                or dtype != st_dtype
                or offset != 0
                or requires_grad is not False
                or metadata
                or not (hooks[0] == _DICT and not hooks[2])
                or tuple(stride) != tuple(torch.empty(size, device="meta").stride())
                or math.prod(size) != numel
            ):
                raise _NoSpec
            used.add(si)
            return (_B_TENSOR, key, dtype, numel * elsize, size)
        if id(n) in containers:
            raise _NoSpec
        containers.add(id(n))
        if kind == _TUPLE:
            return (_B_TUPLE, tuple(node(c, True) for c in n[2]))
        if kind == _LIST:
            return (_B_LIST, tuple(node(c, True) for c in n[2]))
        keys = []
        children = []
        for k, v in n[2]:
            if k[0] != _CONST or (type(k[1]) is float and k[1] == 0.0):
                # (0.0 and -0.0 compare equal: specs that differ only in a zero key's sign
                # would be interned as one, and records built with the other sign)
                raise _NoSpec
            keys.append((type(k[1]), k[1]))
            children.append(node(v, False))
        return (_B_DICT, n[3], tuple(keys), tuple(children))

    try:
        spec = node(plan.root, False)
        spec = _SPEC_INTERN.setdefault(spec, spec)
    except (_NoSpec, TypeError):  # TypeError: an unhashable key value (cannot happen for literals)
        return None
    if len(_SPEC_INTERN) >= _MAX_KNOWN_PICKLES:
        _SPEC_INTERN.clear()
    return spec, tuple(values)


def _remember_spec(pkl: bytes, plan: _Plan | None) -> Any:
    """``_BATCH_SPECS[pkl]``: ``plan``'s ``(spec, leaf values)``, or False (none), kept within
    the cache's bounds."""
    global _BATCH_SPECS_BYTES
    got = (_batch_spec(plan) if plan is not None else None) or False
    if len(_BATCH_SPECS) >= _MAX_KNOWN_PICKLES or _BATCH_SPECS_BYTES + len(pkl) > _MAX_KNOWN_BYTES:
        _BATCH_SPECS.clear()
        _BATCH_SPECS_BYTES = 0
    _BATCH_SPECS[pkl] = got
    _BATCH_SPECS_BYTES += len(pkl)
    return got


def _spec_parts(spec: Any, out: list[tuple[str, torch.dtype, int, tuple[int, ...]]], in_seq: list[bool]) -> None:
    """The tensor nodes of ``spec`` in order, ``(storage key, dtype, nbytes, size)``, into ``out``,
    and whether each leaf lies in a sequence, into ``in_seq``."""
    kind = spec[0]
    if kind == _B_TENSOR:
        out.append(spec[1:])
    elif kind == _B_LEAF:
        in_seq.append(spec[2])
    else:
        for c in spec[3] if kind == _B_DICT else spec[1]:
            _spec_parts(c, out, in_seq)


def _plan_one(
    buf: bytearray, pkl: bytes, records: dict[str, tuple[int, int]], lo: int, hi: int, tables: _Tables
) -> _Plan | None:
    """The plan of ``pkl`` (the interpreter's second-sight path, see :func:`_fast_path`), or None.

    Not remembered in ``tables`` (fast_loads keeps replaying such pickles); the result made over
    ``buf`` is dropped."""
    src = _Source(memoryview(buf), True, records, lo, hi, tables, validating=True)
    rebuilt: dict[int, tuple[Any, ...]] = {}
    try:
        result, replayable = _unpickle(pkl, src, tables, rebuilt)
    except Exception:  # refused or broken: the one-by-one path reports it
        return None
    if src.deferred or not replayable:
        return None
    return _compile_plan(result, src, rebuilt)


def _build_batch(spec: Any, tensors: Any, leaves: Any) -> Any:
    """default_collate's result for ``spec``: tuples become lists, dicts keep their class and key
    order; tensors and collated leaves come from the iterators ``tensors`` and ``leaves``."""
    kind = spec[0]
    if kind == _B_TENSOR:
        return next(tensors)
    if kind == _B_LEAF:
        return next(leaves)
    if kind == _B_DICT:
        out = spec[1]()
        for (_, k), c in zip(spec[2], spec[3]):
            out[k] = _build_batch(c, tensors, leaves)
        return out
    return [_build_batch(c, tensors, leaves) for c in spec[1]]


def collate_records(bufs: list[bytearray], alloc: Any, leaf: Any = None, dicts_only: bool = False) -> Any:
    """``default_collate([fast_loads(b) for b in bufs])`` without making a tensor per record, or None.

    Applies when every buffer's pickle is one this process has already planned (seen at least
    twice by :func:`fast_loads`), all of one *batch spec*: the same structure of dicts (and
    OrderedDicts) with literal keys, lists and tuples, nested, with the same tensors (dtype,
    shape, each the whole of its own contiguous storage, no ``requires_grad``, hooks or
    metadata) and literal leaves (int, float, bool, str, bytes) of the same types in the same
    places; the leaf values may differ (a label, a name). Pickles that differ from planned ones
    only in literal values are planned here, at most ``max(4, len(bufs) // 2)`` a call; a call
    that needs more declines and the next 1, 2, 4... (at most 64) calls plan none, so that
    records whose literals never repeat (unique ids) cost little. Each buffer gets the same checks as on
    :func:`fast_loads`'s planned path (zip layout and small records, storage record sizes); the
    leaves are collated with ``leaf``, then each batch tensor is allocated with ``alloc(shape,
    dtype)`` and filled row by row from the storage records. Returns None, having allocated
    nothing with ``alloc``, when anything differs: the caller then loads the records one by one
    (and gets their errors).

    Args:
        bufs: The records' ``torch.save`` buffers (``bytearray``; read, not modified or kept),
            or for a container-free record (format 1.3) its ``(pickle, storages)``: ``bytes``
            and a tuple of one buffer per storage, in key order (read only).
        alloc: ``alloc(shape, dtype)`` -> a contiguous CPU tensor to fill (e.g. ``torch.empty``).
        leaf: ``leaf(values)`` collates the list of one leaf position's values over the batch
            (what ``default_collate`` does with it: ``torch.tensor`` for ints and bools, float64
            for floats, the list itself for str and bytes). None: records with leaves decline.
            An exception from it makes this decline (the one-by-one path raises it again).
        dicts_only: Decline anything but a plain ``dict`` of str -> tensor (what this function
            covered before nested containers and leaves; for benchmarks).

    Returns:
        What ``default_collate`` makes of the loaded records: tensors stacked to shape
        ``(len(bufs), *record shape)`` with the records' dtype (contiguous), leaves as ``leaf``
        collates them, dicts and OrderedDicts of their class in the records' key order, lists
        and tuples as lists.

    Thread safety: safe from many threads (the spec cache is a dict updated under the GIL).
    """
    if not bufs or not _torch_state_is_plain():
        return None
    tables = _get_tables()
    starts: list[list[int]] = []
    leaf_rows: list[tuple[Any, ...]] = []
    spec = None
    tensors: list[tuple[str, torch.dtype, int, tuple[int, ...]]] = []
    last_pkl = None
    got = None
    planned = 0
    skip_planning = _PLAN_BACKOFF[0] > 0
    if skip_planning:
        _PLAN_BACKOFF[0] -= 1
    leaf_in_seq: list[bool] = []
    datas: list[Any] = []  # where each record's storages are (its buffer, or its storage views)
    key_index: list[int] = []  # each tensor's storage index (for records given as storage views)
    for buf in bufs:
        views = None
        if type(buf) is tuple:  # a container-free record's (pickle, storage views), format 1.3
            if len(buf) != 2:
                return None
            pkl_b, views = buf
            if type(pkl_b) is not bytes or type(views) is not tuple:
                return None
            records, lo, hi, start, nbytes = None, 0, 0, 0, len(pkl_b)
            same = last_pkl is not None and pkl_b == last_pkl
        else:
            if type(buf) is not bytearray:
                return None
            try:
                records, lo, hi = _layout(buf, len(buf))
            except Exception:  # _Fallback or a malformed buffer: the one-by-one path reports it
                return None
            start, nbytes = records["data.pkl"]
            pkl_b = None
            same = last_pkl is not None and memoryview(buf)[start : start + nbytes] == last_pkl
        datas.append(buf if views is None else views)
        if not same:
            if nbytes > _MAX_KNOWN_PICKLE_BYTES:
                return None
            pkl = pkl_b if pkl_b is not None else bytes(buf[start : start + nbytes])
            got = _BATCH_SPECS.get(pkl)
            if got is None:
                plan = tables.known.get(pkl)
                if type(plan) is not _Plan:
                    # Not planned by fast_loads: a pickle seen once, or one like a known one but
                    # for literal values (a label), which fast_loads replays and never plans.
                    # Those are planned here, a few a batch (records whose literals all differ,
                    # such as unique ids, would cost an interpretation each: declined).
                    planned += 1
                    if skip_planning or not tables.has_skeleton(pkl):
                        return None
                    if planned > max(4, len(bufs) // 2):
                        # Too many new pickles in one batch: back off (skip planning for 1, 2, 4...
                        # up to 64 calls) so that records whose literals never repeat cost little.
                        _PLAN_BACKOFF[1] = min(_MAX_PLAN_BACKOFF, max(1, 2 * _PLAN_BACKOFF[1]))
                        _PLAN_BACKOFF[0] = _PLAN_BACKOFF[1]
                        return None
                    if views is not None:  # planning runs over one buffer of the storages
                        buf = bytearray(b"".join(views))
                        ends = list(itertools.accumulate(map(len, views)))
                        records = _parts_records(len(pkl), [(e - len(v), len(v)) for e, v in zip(ends, views)])
                        hi = len(buf)
                    plan = _plan_one(buf, pkl, records, lo, hi, tables)
                got = _remember_spec(pkl, plan)
            if got is False:
                return None
            last_pkl = pkl
            if spec is None:
                spec = got[0]
                if dicts_only and not (
                    spec[0] == _B_DICT
                    and spec[1] is dict
                    and all(k[0] is str for k in spec[2])
                    and all(c[0] == _B_TENSOR for c in spec[3])
                ):
                    return None
                _spec_parts(spec, tensors, leaf_in_seq)
                key_index = [_storage_index(key) for key, _, _, _ in tensors]
            elif got[0] is not spec:
                return None
        leaf_rows.append(got[1])  # type: ignore[index]
        row = []
        if views is not None:
            for j, (_, _, size_bytes, _) in zip(key_index, tensors):
                if not 0 <= j < len(views) or len(views[j]) != size_bytes:
                    return None
                row.append(j)
        else:
            for key, _, size_bytes, _ in tensors:
                rec = records.get("data/" + key)
                if rec is None or rec[1] != size_bytes:
                    return None
                row.append(rec[0])
        starts.append(row)
    n = len(bufs)
    collated_leaves: list[Any] = []
    if leaf_rows[0]:
        if leaf is None:
            return None
        try:
            collated_leaves = [leaf(col if seq else list(col)) for col, seq in zip(zip(*leaf_rows), leaf_in_seq)]
        except Exception:  # default_collate would raise it too: the one-by-one path does
            return None
    out_tensors = []
    for j, (_, dtype, size_bytes, size) in enumerate(tensors):
        t = alloc((n, *size), dtype)
        if size_bytes:
            dst = t.view(-1).view(torch.uint8).view(n, size_bytes).numpy()
            for i, buf in enumerate(datas):
                s = starts[i][j]
                dst[i] = buf[s] if type(buf) is tuple else memoryview(buf)[s : s + size_bytes]
        out_tensors.append(t)
    if planned:
        _PLAN_BACKOFF[1] = 0  # planning paid off
    return _build_batch(spec, iter(out_tensors), iter(collated_leaves))


def load_columns(
    pickles: list[bytes | None],
    columns: list[Any],
    sizes: Any,
    starts: Any,
    parts: Callable[[int], tuple[bytes, bytearray, list[tuple[int, int]]]],
    constants: dict[str, bytes],
    owned: Sequence[bool] | None = None,
) -> list[Any] | None:
    """Load the records of a column block (format 1.3) together, from its columns.

    Records whose pickle this process has planned (or can plan: one like a pickle the
    decoder has validated but for literal values, at most ``max(4, n // 2)`` new ones a
    call) and whose result :func:`collate_records` covers (tuples, lists, dicts with literal
    keys, literal leaves, each tensor the whole of its own contiguous storage without grad,
    hooks or metadata) are built column by column: each tensor over a copy of its bytes in
    its column, so a block costs a copy and a tensor per storage, not a pickle run per
    record. Records of one result structure (a *batch spec*, shapes aside) are assembled
    together; records of several structures may share a block.

    Args:
        pickles: Each record's ``data.pkl`` bytes, in block order; None for a record the
            caller loads one by one.
        columns: Storage column ``j`` of the block for each ``j`` (every record's storage
            ``j`` in record order, back to back: :attr:`.columnar.ColumnBlock.columns[1:]`);
            read, never kept or handed out.
        sizes: ``(n, len(columns))`` integer array: record ``r``'s storage ``j`` is
            ``sizes[r, j]`` bytes (a column adds up to its rows).
        starts: ``(n, len(columns))`` integer array: where record ``r``'s storage ``j``
            starts in column ``j`` (the cumulative sums of ``sizes``).
        parts: ``parts(r)`` -> record ``r``'s ``(pickle, storage buffer, spans)`` as for
            :func:`fast_loads_parts`, to plan a pickle not planned yet.
        constants: The container layout's constant records (see :func:`fast_loads_parts`).
        owned: Per column, whether it is a writable buffer (``bytearray`` or a view of one)
            that nothing but the samples returned here will read or write again: each
            record's bytes in it are then used in place (a tensor over that range, with a
            storage of exactly that range) when the range starts at a multiple of the
            tensor's element size in memory and is at least half the column (a sample kept
            pins at most twice its bytes), instead of a copy. The caller hands the columns
            over: a block whose records are each asked for once.

    Returns:
        One entry per record: its sample, as :func:`fast_loads_parts` loads it (each tensor
        with a storage of its own, at version 1), or :data:`DECLINED` for a record this path
        does not cover (load it one by one). None when the block is not covered at all
        (torch's state is not plain, a layout the fast path does not serve).

    Memory: a buffer per tensor (the block's storage bytes in all at most), none for the
    ranges of ``owned`` columns used in place; a sample kept pins only its own bytes, or,
    for a tensor over an owned column, that column (at most twice the tensor's bytes).
    Thread safety: as :func:`collate_records`.
    """
    n = len(pickles)
    if not n or not _torch_state_is_plain() or not small_records_ok(constants):
        return None
    tables = _get_tables()
    limit = max(4, n // 2)
    planned = 0
    sizes = np.asarray(sizes)
    rows = sizes.tolist()
    at = np.asarray(starts).tolist()
    ncols = len(columns)
    # Per spec seen in this call, by id: (the spec, (form, its tensor nodes [(column, dtype,
    # nbytes, size, element size)]) or False). A spec's *form* is the spec without its tensors' sizes: records that differ only
    # in their tensors' shapes (token ids of any length) are assembled together.
    shapes: dict[int, Any] = {}
    groups: dict[int, tuple[Any, list[int], list[tuple[Any, ...]], list[Any]]] = {}  # id(form) -> ...
    last_pkl: bytes | None = None
    got: Any = False
    info: Any = False
    for r, pkl in enumerate(pickles):
        if pkl is None:  # the caller loads it one by one
            last_pkl, got = None, False
            continue
        if pkl is not last_pkl and pkl != last_pkl:
            last_pkl = pkl
            got = _BATCH_SPECS.get(pkl)
            if got is None:
                plan = tables.known.get(pkl)
                if type(plan) is not _Plan:
                    # Planned here only if a pickle like it but for literal values was
                    # validated by the decoder; else its record loads one by one (which
                    # interprets and remembers it).
                    if planned >= limit or len(pkl) > _MAX_KNOWN_PICKLE_BYTES or not tables.has_skeleton(pkl):
                        got = False
                        continue
                    planned += 1
                    p, blob, spans = parts(r)
                    plan = _plan_one(blob, p, _parts_records(len(p), spans), 0, len(blob), tables)
                got = _remember_spec(pkl, plan)
            if got is not False:
                seen = shapes.get(id(got[0]))
                if seen is not None and seen[0] is got[0]:
                    info = seen[1]
                else:
                    info = _form_of(got[0])
                    if info and not all(0 <= node[0] < ncols for node in info[1]):
                        info = False  # a storage the block does not have: one by one (which says so)
                    # The spec is kept with its entry: the caches may clear during the call,
                    # and a spec freed meanwhile could leave its id to another.
                    shapes[id(got[0])] = (got[0], info)
        if got is False or info is False:
            continue
        row = rows[r]
        for j, _, nbytes, _, _ in info[1]:
            if row[j] != nbytes or not nbytes:  # (an empty storage: one by one)
                break
        else:
            group = groups.get(id(info[0]))
            if group is None:
                group = groups[id(info[0])] = (info[0], [], [], [])
            group[1].append(r)
            group[2].append(got[1])
            group[3].append(info[1])
    out: list[Any] = [DECLINED] * n
    if not groups:
        return out
    # Each tensor gets a buffer of its own, copied out of its column (writable; none
    # aliases the block, which may still serve a record asked for again, and a sample kept
    # pins only its own bytes), and a storage over all of it (as torch.load makes: offset 0,
    # the storage's length).
    # With ``owned``, a range of an owned column is used in place where it is aligned for
    # its dtype (the column's address plus the range's offset) and at least half the column
    # (a sample kept pins at most twice its bytes; small ones cost little to copy).
    frombuffer = torch.frombuffer
    addresses = [_address(c) if owned is not None and owned[j] else None for j, c in enumerate(columns)]
    for form, records, leaf_rows, node_rows in groups.values():
        cols = []
        for k, (j, dtype, _, _, esize) in enumerate(node_rows[0]):
            column = columns[j]
            address = addresses[j]
            col = []
            for r, nodes in zip(records, node_rows):
                _, _, nbytes, size, _ = nodes[k]
                lo = at[r][j]
                if address is not None and (address + lo) % esize == 0 and used_in_place(nbytes, len(column)):
                    t = frombuffer(column, dtype=dtype, count=nbytes // esize, offset=lo)
                else:
                    t = frombuffer(bytearray(column[lo : lo + nbytes]), dtype=dtype)
                # (view(*size), squeeze(0): ~0.7 us less than view(size), view(()))
                col.append(t if len(size) == 1 else t.view(*size) if size else t.squeeze(0))
            _increment_version(col)  # as set_ would: torch.load's tensors are at version 1
            cols.append(col)
        leaf_cols = list(zip(*leaf_rows)) if leaf_rows[0] else []
        objs = _assemble(form, iter(cols), iter(leaf_cols), len(records))
        for r, obj in zip(records, objs):
            out[r] = obj
    return out


def used_in_place(nbytes: int, column_bytes: int) -> bool:
    """Whether a record's range of ``nbytes`` in a column of ``column_bytes`` that a block
    hands over may become its tensor's storage in place (:func:`load_columns`' ``owned``,
    :meth:`.columnar.ColumnBlock.spent_args`): only if it is at least half the column, so a
    sample kept pins at most twice its bytes."""
    return 2 * nbytes >= column_bytes


def _storage_index(key: str) -> int:
    """Storage ``key`` of a container-free record as its index (``"3"`` -> 3), or -1 for a
    key that is not a canonical decimal (storages are named ``0``, ``1``...)."""
    return int(key) if key.isdigit() and str(int(key)) == key else -1


def _address(buf: Any) -> int | None:
    """The memory address of writable buffer ``buf``'s first byte, or None if it is not
    writable (a column of read-only bytes is never used in place)."""
    view = memoryview(buf)
    if view.readonly or not view.c_contiguous:
        return None
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else None


def _form_of(spec: Any) -> Any:
    """``(form, nodes)`` of a batch spec (cached by spec): the spec with each tensor node's
    storage size and shape left out (interned), and its tensor nodes ``(storage index,
    dtype, nbytes, size, element size)`` in order; or False if a storage key is not a
    storage index."""
    got = _FORMS.get(id(spec))
    if got is not None and got[0] is spec:
        return got[1]
    tensors: list[tuple[str, torch.dtype, int, tuple[int, ...]]] = []
    _spec_parts(spec, tensors, [])
    nodes = []
    for key, dtype, nbytes, size in tensors:
        j = _storage_index(key)
        if j < 0:
            info: Any = False
            break
        nodes.append((j, dtype, nbytes, size, _ELEMENT_SIZES[dtype]))
    else:

        def strip(node: Any) -> Any:
            kind = node[0]
            if kind == _B_TENSOR:
                return (_B_TENSOR, node[1], node[2])
            if kind == _B_LEAF:
                return node
            if kind == _B_DICT:
                return (_B_DICT, node[1], node[2], tuple(strip(c) for c in node[3]))
            return (kind, tuple(strip(c) for c in node[1]))

        form = strip(spec)
        info = (_FORM_INTERN.setdefault(form, form), nodes)
    if len(_FORMS) >= _MAX_KNOWN_PICKLES:
        _FORMS.clear()
        _FORM_INTERN.clear()
    _FORMS[id(spec)] = (spec, info)  # the spec is kept with it: its id is not reused meanwhile
    return info


#: Batch spec id -> (spec, its form and tensor nodes, or False): see :func:`_form_of`.
_FORMS: dict[int, tuple[Any, Any]] = {}
_FORM_INTERN: dict[Any, Any] = {}


def _assemble(spec: Any, tensors: Any, leaves: Any, m: int) -> list[Any]:
    """``m`` results of batch spec ``spec``, built column by column: each tensor node takes the
    next list of ``m`` tensors from ``tensors``, each leaf the next ``m`` values from ``leaves``."""
    kind = spec[0]
    if kind == _B_TENSOR:
        return list(next(tensors))
    if kind == _B_LEAF:
        return list(next(leaves))
    if kind == _B_DICT:
        cls = spec[1]
        keys = [k for _, k in spec[2]]
        children = [_assemble(c, tensors, leaves, m) for c in spec[3]]
        if not children:
            return [cls() for _ in range(m)]
        return [cls(zip(keys, row)) for row in zip(*children)]
    children = [_assemble(c, tensors, leaves, m) for c in spec[1]]
    if kind == _B_TUPLE:
        return list(zip(*children)) if children else [()] * m
    return [list(row) for row in zip(*children)] if children else [[] for _ in range(m)]
