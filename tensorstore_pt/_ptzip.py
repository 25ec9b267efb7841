"""Container-free ``torch.save`` records: split a buffer into its parts, rebuild its exact bytes.

A ``torch.save`` buffer is a zip archive whose container is fully determined by a handful
of things: the archive name, the pickle (``data.pkl``), the storages (``data/<key>``), the
few constant records, the layout constants of the writer, and one 64-bit hash. This module
takes a buffer apart into those (:func:`split`), puts them back together byte for byte
(:func:`rebuild`), and proves the round trip on a given buffer (:func:`prove`). A store can
then keep a record as its pickle and its storages and still hand out ``torch.save``'s own
bytes. No torch import: the layout is data, not the running torch.

The facts this relies on, and where each comes from. "inline_container.cc" is
pytorch/pytorch caffe2/serialize/inline_container.cc (``PyTorchStreamWriter``), and
"serialization.py" is torch/serialization.py (``_save``, ``_open_zipfile_writer*``), both
read in the torch 2.x sources; the zip itself is written by torch's bundled miniz
(``mz_zip_writer_add_mem_ex_v2``, ``mz_zip_writer_finalize_archive``). "Seen" means checked
byte for byte on the output of torch 2.13.0 (CPU) and torch 2.14.1 (cu130), which write
identical bytes for identical input (tests/test_ptzip.py keeps checking it, and its
fixtures written by 2.14.1 are rebuilt under 2.13.0).

* **Archive name.** Every record is named ``<archive>/<name>``. ``torch.save`` to a buffer
  uses ``archive`` (the writer_func constructor sets ``archive_name_("archive")``); to an
  ASCII path it uses the file's basename without its last extension (``basename()`` in
  inline_container.cc); a non-ASCII path is written through a Python stream, so again
  ``archive`` (``_open_zipfile_writer_file``). Seen.
* **Entry order** (``_save`` in serialization.py, then ``writeEndOfFile``):
  ``data.pkl``, ``.format_version`` (``"1"``), ``.storage_alignment`` (``"64"`` by
  default, ``torch.utils.serialization.config.save.storage_alignment``), ``byteorder``
  (``sys.byteorder``; skipped with ``_disable_byteorder_record``), ``data/0`` ...
  ``data/<n-1>`` (storage keys are ``str(len(id_map))`` in order of first appearance in the
  pickle), then from ``writeEndOfFile``: ``version`` (``"3\\n"``: the writer's ``version_``,
  ``kMinProducedFileFormatVersion``, when no ``version``/``.data/version`` was written),
  ``byteorder`` (only if Python did not write it), ``.data/serialization_id``. Seen for
  both byteorder variants. The layout keeps the order as data (:class:`PtLayout`), so
  another order (an older torch wrote ``version`` first) is a different layout, not a
  guess.
* **Entries stored, 64-byte aligned.** ``writeRecord`` passes level 0 (no compression)
  and a local-header extra field from ``getPadding``: id ``b"FB"``, a 16-bit length, then
  that many ``b"Z"`` bytes, so that the data starts at a multiple of the alignment
  (``alignment_``, the value of ``.storage_alignment``). The padding counts the 4 bytes of
  the field's own header; zip64 extra fields only appear for sizes or offsets of 4 GiB and
  more (refused here). Seen, including a padding of 0 (``b"FB\\0\\0"``).
* **Headers** (miniz with ``MZ_ZIP_FLAG_WRITE_ZIP64``, no timestamps): local headers with
  version 0, flags ``0x0808`` (bit 3: sizes and CRC in a data descriptor; bit 11: UTF-8
  name), or ``0x0800`` for an empty entry, which gets no data descriptor; method 0, time
  and date 0, CRC and sizes 0. A 16-byte data descriptor ``PK\\x07\\x08``, CRC-32, 32-bit
  sizes after the data. Central directory entries with versions 0, the same flags, the
  CRC-32 and sizes, no extra field or comment, attributes 0. Then a zip64 end of central
  directory record (size 44, made by ``0x031E``, needed 45), its locator (one disk) and
  the classic end record (entry count capped at ``0xFFFF``), no comment. Seen, the cap
  too (a list of 70,000 tensors); the same constants are pinned by fastload's parser.
* **CRC-32s** are computed unless ``torch.serialization.set_crc32_options(False)``, which
  writes 0 (``compute_crc32_``). Seen both ways.
* **``.data/serialization_id``** (``writeSerializationId`` in inline_container.cc): 40
  ASCII digits, the zero-padded decimal of two 64-bit values: (1) a ``c10::hash_combine``
  of ``c10::hash<std::string>`` of every record name, in the iteration order of the
  writer's ``std::unordered_set`` (depends on the C++ standard library: kept per record
  as :attr:`PtParts.name_hash`); (2) a ``hash_combine`` of the CRC-32 of each data
  descriptor the writer wrote, in write order (``ostream_write_func`` picks them up;
  empty entries have none): recomputed here with the boost-style ``hash_combine(seed, v)
  = seed ^ (v + 0x9e3779b9 + (seed << 6) + (seed >> 2))`` mod 2**64 that c10 uses (the
  formula was not read in c10's source here: it is confirmed by the recomputed second
  half matching torch's own under 2.13 and 2.14, for every buffer the tests prove).

Cost (benchmarks/ptzip_micro.py, one core of a loaded machine): for an 8x8 uint8 image
and a label (1,829 bytes), :func:`rebuild` takes ~6-9 us and :func:`prove` ~13 us where
``torch.save`` takes ~200 us; for a 4 MiB tensor, :func:`rebuild` costs one copy of the
buffer (its CRC-32 is kept with the record, see :data:`CRC_STORED_MIN_BYTES`) and
:func:`prove` a copy and a comparison.

Thread safety: every function is safe from many threads (the template cache is a dict
updated under the GIL). Fork/spawn safe: no handles, no threads. Memory: :func:`rebuild`
allocates the output once; the template cache holds at most ``_MAX_TEMPLATES`` small
templates (headers only, never data).
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RecordMetaError

__all__ = [
    "CRC_STORED_MIN_BYTES",
    "DEFAULT_LAYOUT",
    "PtLayout",
    "PtParts",
    "decode_meta",
    "encode_meta",
    "prove",
    "rebuild",
    "split",
]

# The order tokens of a layout: record names (without the archive folder), and STORAGES
# standing for the run data/0 ... data/<n-1>.
STORAGES = "data/"
PICKLE = "data.pkl"
SERIALIZATION_ID = ".data/serialization_id"
# The constant records a layout may hold, and what their values may be.
_CONSTANT_RECORDS = (".format_version", ".storage_alignment", "byteorder", "version", ".data/version")
_TOKENS = (PICKLE, STORAGES, SERIALIZATION_ID, *_CONSTANT_RECORDS)
_PYTHON_WRITTEN = frozenset([PICKLE, ".format_version", ".storage_alignment", "byteorder"])

# A pickle or storage at least this long keeps its CRC-32 with the record (4 bytes) instead
# of having it recomputed on every rebuild: CRC-32 runs at ~2 GB/s, a copy at ~10 GB/s.
CRC_STORED_MIN_BYTES = 1 << 16

_MAX_ARCHIVE_NAME_BYTES = 255
_MAX_CONSTANT_BYTES = 32
_MAX_WRITER_BYTES = 64
_MAX_ALIGNMENT = 0xFFFF - 4 + 1  # the padding (alignment - 1 at most) plus 4 fits the u16 extra length
_ZIP32_LIMIT = 0xFFFFFFFF  # at or past this, miniz writes zip64 extra fields: not rebuilt here
_M64 = (1 << 64) - 1

_LFH = struct.Struct("<4sHHHHHIIIHH")  # 30: local file header
_CDH = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46: central directory header
_DD = struct.Struct("<4sIII")  # 16: data descriptor
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # 56: zip64 end of central directory record
_LOC64 = struct.Struct("<4sIQI")  # 20: zip64 end of central directory locator
_EOCD = struct.Struct("<4sHHHHIIH")  # 22: end of central directory
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAIL_BYTES = _EOCD64.size + _LOC64.size + _EOCD.size  # 98


def _archive_name_ok(name: bytes) -> bool:
    """A name torch's writer can produce: ASCII, 1-255 bytes, no ``/``, ``\\`` or NUL."""
    return (
        0 < len(name) <= _MAX_ARCHIVE_NAME_BYTES
        and name.isascii()
        and b"/" not in name
        and b"\\" not in name
        and b"\0" not in name
    )


def _constant_ok(name: str, value: bytes) -> bool:
    if not 0 < len(value) <= _MAX_CONSTANT_BYTES:
        return False
    if name in ("version", ".data/version"):
        return value.endswith(b"\n") and value[:-1].isdigit() and value[:-1].isascii()
    if name == "byteorder":
        return value in (b"little", b"big")
    return value.isdigit() and value.isascii()  # .format_version, .storage_alignment


@dataclass(frozen=True)
class PtLayout:
    """The container constants of one writer: everything of a ``torch.save`` zip that is
    the same for every record it writes.

    Attributes:
        order: The record names in write order; ``"data/"`` stands for the storages
            ``data/0`` ... ``data/<n-1>``. Holds ``"data.pkl"`` and ``"data/"`` once each,
            and ``".data/serialization_id"`` (last) when the writer computes one.
        constants: ``(name, value)`` for each other record of ``order``, in that order
            (e.g. ``("version", b"3\\n")``).
        alignment: Record data starts at a multiple of this many bytes (``.storage_alignment``).
        crc32: Whether CRC-32s are computed (``torch.serialization.get_crc32_options()``).
        writer: A label naming the writer, e.g. ``"torch 2.13.0+cpu"``: informational (not
            compared, not used by :func:`rebuild`); :func:`split` leaves it empty, a store
            sets it with ``dataclasses.replace`` when it records the layout.
    """

    order: tuple[str, ...]
    constants: tuple[tuple[str, bytes], ...]
    alignment: int = 64
    crc32: bool = True
    writer: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.order, self.constants, self.alignment, self.crc32)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]

    def problem(self) -> str | None:
        """None if the layout is one this module can rebuild; otherwise what is wrong."""
        order = self.order
        if type(self.alignment) is not int or not 1 <= self.alignment <= _MAX_ALIGNMENT:
            return f"alignment {self.alignment!r} is not an int in 1..{_MAX_ALIGNMENT}"
        if type(self.crc32) is not bool:
            return f"crc32 {self.crc32!r} is not a bool"
        if len(set(order)) != len(order) or any(t not in _TOKENS for t in order):
            return f"record order {order!r} repeats a name or names one outside {_TOKENS}"
        if PICKLE not in order or STORAGES not in order:
            return f"record order {order!r} lacks {PICKLE!r} or {STORAGES!r}"
        if SERIALIZATION_ID in order and order[-1] != SERIALIZATION_ID:
            return f"{SERIALIZATION_ID!r} is not the last record of {order!r}"
        names = [t for t in order if t in _CONSTANT_RECORDS]
        if [n for n, _ in self.constants] != names:
            return f"constant records {[n for n, _ in self.constants]} do not match the order's {names}"
        for name, value in self.constants:
            if not isinstance(value, bytes) or not _constant_ok(name, value):
                return f"record {name!r} holds {value!r}, not a value torch writes there"
        align = dict(self.constants).get(".storage_alignment")
        if align is not None and int(align) != self.alignment:
            return f".storage_alignment says {align!r} but the alignment is {self.alignment}"
        if not isinstance(self.writer, str) or len(self.writer) > _MAX_WRITER_BYTES or not self.writer.isascii():
            return f"writer label {self.writer!r} is not ASCII of at most {_MAX_WRITER_BYTES} characters"
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (for an index): order, constants (as text), alignment, crc32, writer."""
        return {
            "order": list(self.order),
            "constants": [[n, v.decode("ascii")] for n, v in self.constants],
            "alignment": self.alignment,
            "crc32": self.crc32,
            "writer": self.writer,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PtLayout:
        """The layout :meth:`to_json` described.

        Raises:
            RecordMetaError: ``obj`` is not such a description, or names a layout this
                module cannot rebuild (a record name, order, constant or alignment torch
                does not write).
        """
        try:
            if not isinstance(obj, dict) or set(obj) != {"order", "constants", "alignment", "crc32", "writer"}:
                raise TypeError("expected a dict with the keys order, constants, alignment, crc32, writer")
            order, consts = obj["order"], obj["constants"]
            if not isinstance(order, list) or len(order) > len(_TOKENS) or not all(isinstance(t, str) for t in order):
                raise TypeError(f"order {order!r} is not a list of at most {len(_TOKENS)} names")
            if not isinstance(consts, list) or len(consts) > len(_CONSTANT_RECORDS):
                raise TypeError(f"constants {consts!r} is not a list of at most {len(_CONSTANT_RECORDS)} pairs")
            pairs = []
            for pair in consts:
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                    raise TypeError(f"constant {pair!r} is not a [name, value] pair of strings")
                pairs.append((pair[0], pair[1].encode("ascii")))
            layout = cls(tuple(order), tuple(pairs), obj["alignment"], obj["crc32"], obj["writer"])
        except (TypeError, UnicodeEncodeError) as exc:
            raise RecordMetaError(f"not a container layout description: {exc}") from exc
        problem = layout.problem()
        if problem is not None:
            raise RecordMetaError(f"container layout {obj!r} cannot be rebuilt: {problem}")
        return layout


# The layout torch 2.x's torch.save writes by default (2.13.0 and 2.14.1 seen).
DEFAULT_LAYOUT = PtLayout(
    order=(PICKLE, ".format_version", ".storage_alignment", "byteorder", STORAGES, "version", SERIALIZATION_ID),
    constants=((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"), ("version", b"3\n")),
)


@dataclass(frozen=True, eq=False)
class PtParts:
    """What a container-free record keeps of one ``torch.save`` buffer.

    Attributes:
        layout: The writer's container constants (shared by every record it writes).
        archive: The archive folder name, ASCII (``"archive"`` for buffers).
        pickle: The ``data.pkl`` bytes (a view into the buffer given to :func:`split`).
        storages: ``data/0`` ... ``data/<n-1>``, in key order (views into the buffer given
            to :func:`split`: no copy; keep that buffer unchanged while the parts live).
        name_hash: The first half of ``.data/serialization_id`` (0 if the layout has none).
        crcs: The CRC-32 of the pickle and of each storage (length ``1 + n``), or None
            where it is recomputed: kept only for those of at least
            :data:`CRC_STORED_MIN_BYTES`, and only when the layout computes CRC-32s.
    """

    layout: PtLayout
    archive: str
    pickle: Any
    storages: tuple[Any, ...]
    name_hash: int
    crcs: tuple[int | None, ...]

    @property
    def storage_bytes(self) -> int:
        """The total length of the storages, in bytes."""
        return sum(len(s) for s in self.storages)


# --------------------------------------------------------------------------- templates


class _Template:
    """Every byte of one shape of record (layout, archive name, sizes) but its variable spans.

    Variable values are numbered ``0`` (the pickle), ``1..n`` (the storages) and ``n + 1``
    (the serialization id). The output is ``static[0] + fill[0] + static[1] + ... +
    static[-1]``, where ``slots[k]`` says what ``fill[k]`` is: value ``j`` (``j >= 0``) or
    the 4-byte CRC-32 of value ``~j``. ``at[k]`` is where ``static[k]`` starts in the output.
    """

    __slots__ = (
        "at",
        "cd_vars",
        "combine",
        "crc32",
        "crc_at",
        "data_at",
        "layout",
        "nbytes",
        "pick",
        "sid_at",
        "sizes",
        "slots",
        "static",
    )

    def __init__(self, layout: PtLayout, archive: bytes, sizes: tuple[int, ...]) -> None:
        consts = dict(layout.constants)
        n = len(sizes) - 1  # sizes[0] is the pickle's
        prefix = archive + b"/"
        entries: list[tuple[bytes, int, int | bytes]] = []  # (name, size, variable index or constant value)
        for token in layout.order:
            if token == PICKLE:
                entries.append((prefix + b"data.pkl", sizes[0], 0))
            elif token == STORAGES:
                entries.extend((prefix + b"data/%d" % i, sizes[1 + i], 1 + i) for i in range(n))
            elif token == SERIALIZATION_ID:
                entries.append((prefix + SERIALIZATION_ID.encode(), 40, n + 1))
            else:
                entries.append((prefix + token.encode(), len(consts[token]), consts[token]))
        self.layout, self.sizes, self.crc32 = layout, sizes, layout.crc32
        self.static: list[bytes] = []
        self.slots: list[int] = []
        self.at: list[int] = [0]
        self.data_at = [0] * (n + 2)
        self.crc_at: list[int | None] = [None] * (n + 2)  # the data descriptor's CRC field
        self.combine: list[int] = []  # CRC sources, in write order, before the serialization id: j, or ~crc
        self.sid_at = -1
        cur = bytearray()
        offset = 0

        def cut(slot: int, nbytes: int) -> None:  # end a static run; a variable span of nbytes follows
            self.static.append(bytes(cur))
            self.slots.append(slot)
            self.at.append(self.at[-1] + len(cur) + nbytes)
            cur.clear()

        central = []
        for name, size, what in entries:
            start = offset + _LFH.size + len(name) + 4
            pad = -start % layout.alignment
            flags = 0x0808 if size else 0x0800
            cur += _LFH.pack(b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(name), 4 + pad)
            cur += name + b"FB" + struct.pack("<H", pad) + b"Z" * pad
            if isinstance(what, bytes):
                crc = zlib.crc32(what) if layout.crc32 else 0
                cur += what
                if size:
                    cur += _DD.pack(b"PK\x07\x08", crc, size, size)
                    self.combine.append(~crc)
                central.append((name, size, flags, None, crc, offset))
            else:
                self.data_at[what] = start + pad
                cut(what, size)
                if size:
                    cur += b"PK\x07\x08"
                    self.crc_at[what] = start + pad + size + 4
                    cut(~what, 4)
                    cur += struct.pack("<II", size, size)
                    if what == n + 1:
                        self.sid_at = start + pad
                    else:
                        self.combine.append(what)
                central.append((name, size, flags, what, 0, offset))
            offset = start + pad + size + (_DD.size if size else 0)
        cd_off = offset
        for name, size, flags, var, crc, lho in central:
            head = _CDH.pack(b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc, size, size, len(name), 0, 0, 0, 0, 0, lho)
            if var is None:
                cur += head + name
            else:
                cur += head[:16]
                cut(~var, 4)
                cur += head[20:] + name
            offset += _CDH.size + len(name)
        count = len(entries)
        cd_size = offset - cd_off
        # Where each central directory entry of the pickle and the storages lies, from the
        # directory's start, and its value's index: records of this structure with other
        # sizes have their entries at the same places (see _split_known).
        cd_vars = []
        rel = 0
        for name, _, _, var, _, _ in central:
            if var is not None and var <= n:
                cd_vars.append((rel, var))
            rel += _CDH.size + len(name)
        self.cd_vars = tuple(cd_vars)
        cur += _EOCD64.pack(b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count, cd_size, cd_off)
        cur += _LOC64.pack(b"PK\x06\x07", 0, offset, 1)
        short = min(count, 0xFFFF)
        cur += _EOCD.pack(b"PK\x05\x06", 0, 0, short, short, min(cd_size, _ZIP32_LIMIT), min(cd_off, _ZIP32_LIMIT), 0)
        self.static.append(bytes(cur))
        self.nbytes = offset + _TAIL_BYTES
        # rebuild joins itemgetter(*pick)(static + values + CRC-32s): static run k is item k,
        # value j is item S + j, the CRC-32 of value j is item S + (n + 2) + j.
        runs = len(self.static)
        pick = [0]
        for k, slot in enumerate(self.slots):
            pick.append(runs + slot if slot >= 0 else runs + n + 2 + ~slot)
            pick.append(k + 1)
        self.pick = operator.itemgetter(*pick)

    def parts_of(self, mv: memoryview, archive: str, check: bool = True) -> PtParts | None:
        """The parts of ``mv`` if its every static byte is this template's (not checked with
        ``check=False``: for a caller that compares the rebuilt bytes anyway), else None."""
        if len(mv) != self.nbytes:
            return None
        if check:
            raw = mv.obj if type(mv.obj) in (bytes, bytearray) and len(mv.obj) == len(mv) else None
            for at, run in zip(self.at, self.static):
                # (a memoryview compares with bytes item by item: ~20x slower than bytes with bytes)
                if (raw[at : at + len(run)] if raw is not None else mv[at : at + len(run)].tobytes()) != run:
                    return None
        sizes, data_at = self.sizes, self.data_at
        name_hash = 0
        if self.sid_at >= 0:
            sid = bytes(mv[self.sid_at : self.sid_at + 40])
            if not (sid.isdigit() and sid.isascii()):
                return None
            name_hash = int(sid[:20])
            if name_hash > _M64:
                return None
        crcs: list[int | None] = [None] * len(sizes)
        if self.crc32:
            for j, size in enumerate(sizes):
                if size >= CRC_STORED_MIN_BYTES:
                    crcs[j] = _U32.unpack_from(mv, self.crc_at[j])[0]  # type: ignore[arg-type]
        return PtParts(
            self.layout,
            archive,
            mv[0 + data_at[0] : data_at[0] + sizes[0]],
            tuple(mv[data_at[j] : data_at[j] + sizes[j]] for j in range(1, len(sizes))),
            name_hash,
            tuple(crcs),
        )


# Templates by shape (for rebuild) and by the zip tail of the last buffer split with them
# (for split: buffers of one dataset mostly share a shape, and the 98-byte tail holds the
# length, entry count and central directory offset). Bounded; cleared when full.
_TEMPLATES: dict[tuple[Any, ...], _Template] = {}
_BY_TAIL: dict[bytes, tuple[_Template, str]] = {}
# ... and by the entry count and central directory size of the last buffer split with them
# (a structure: records whose sizes differ).
_BY_SHAPE: dict[tuple[int, int], tuple[_Template, str]] = {}
_MAX_TEMPLATES = 1024


def _template(layout: PtLayout, archive: str, sizes: tuple[int, ...]) -> _Template:
    key = (layout, archive, sizes)
    tpl = _TEMPLATES.get(key)
    if tpl is None:
        try:
            tpl = _Template(layout, archive.encode("ascii"), sizes)
        except struct.error:  # an offset or size past what a zip32 header field holds
            raise RecordMetaError(f"a record of sizes {sizes} is past the 4 GiB this container layout covers") from None
        if tpl.nbytes >= _ZIP32_LIMIT:
            raise RecordMetaError(f"a record of {tpl.nbytes} bytes is past the 4 GiB this container layout covers")
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[key] = tpl
    return tpl


# --------------------------------------------------------------------------- split


def _order_of(rels: list[str]) -> tuple[str, ...] | None:
    """The layout order of the record names ``rels`` (without the archive folder)."""
    order: list[str] = []
    n = 0
    for rel in rels:
        if rel.startswith("data/"):
            if rel != f"data/{n}":
                return None
            if n == 0:
                if STORAGES in order:
                    return None
                order.append(STORAGES)
            elif order[-1] != STORAGES:
                return None
            n += 1
        else:
            order.append(rel)
    if STORAGES not in order:
        # No storages: they would have come right after the records Python writes first.
        if PICKLE not in order:
            return None
        at = order.index(PICKLE) + 1
        while at < len(order) and order[at] in _PYTHON_WRITTEN:
            at += 1
        order.insert(at, STORAGES)
    return tuple(order)


def split(buf: Any) -> PtParts | None:
    """Take a ``torch.save`` buffer apart into the parts :func:`rebuild` needs.

    Structural only: it checks the zip's shape, names and constant records, not that
    :func:`rebuild` gives the same bytes back (CRC-32s, the serialization id); :func:`prove`
    does. A buffer of a shape seen before (same layout, archive name and sizes, as the
    records of one dataset mostly are) is matched against that shape's headers at once.

    Args:
        buf: The buffer (bytes, bytearray or memoryview; not copied).

    Returns:
        The parts, or None for any buffer this module cannot rebuild: not a zip (the legacy
        format, garbage, a truncated buffer), a compressed entry, an entry torch does not
        write, an order or a constant it does not write, sizes past 4 GiB. Never raises.
    """
    try:
        mv = memoryview(buf).cast("B")
        return _split_known(mv, True) or _split(mv)
    except (struct.error, ValueError, TypeError, IndexError, UnicodeDecodeError, OverflowError, RecordMetaError):
        return None


def _split_known(mv: memoryview, check: bool) -> PtParts | None:
    """The parts of a buffer of a structure seen before, or None.

    A buffer whose zip tail was seen before, or whose tail gives the entry count and
    central directory size of a structure seen before (same archive name and entries, other
    sizes: token ids of another length), is read through that structure's template: the
    pickle's and each storage's size are read from their central directory entries (at
    places the structure fixes), and the template for those sizes is used. Anything else
    about the buffer is checked by ``parts_of`` (``check``) or by the caller's comparison."""
    n = len(mv)
    if n < _TAIL_BYTES + _CDH.size:
        return None
    known = _BY_TAIL.get(bytes(mv[-_TAIL_BYTES:]))
    eocd = _EOCD64.unpack_from(mv, n - _TAIL_BYTES)
    if known is None:
        known = _BY_SHAPE.get((eocd[7], eocd[8]))
        if known is None:
            return None
    tpl, archive = known
    cd_off = eocd[9]
    if tpl.cd_vars and not 0 <= cd_off <= n - _TAIL_BYTES - _CDH.size - tpl.cd_vars[-1][0]:
        return None
    sizes = list(tpl.sizes)
    for rel, j in tpl.cd_vars:
        sizes[j] = _CDH.unpack_from(mv, cd_off + rel)[9]
    if tuple(sizes) != tpl.sizes:
        try:
            tpl = _template(tpl.layout, archive, tuple(sizes))
        except RecordMetaError:
            return None
    return tpl.parts_of(mv, archive, check)


def _split(mv: memoryview) -> PtParts | None:
    n = len(mv)
    if n < _TAIL_BYTES + _LFH.size or n >= _ZIP32_LIMIT or mv[:4] != b"PK\x03\x04":
        return None
    sig, _disk, _cd_disk, _n_disk, _n_total, _cd32, _off32, comment = _EOCD.unpack_from(mv, n - 22)
    if sig != b"PK\x05\x06" or comment:
        return None
    sig, _d, z_off, _disks = _LOC64.unpack_from(mv, n - 42)
    if sig != b"PK\x06\x07" or z_off != n - _TAIL_BYTES:
        return None
    sig, _size, _made, _need, _d1, _d2, _e1, entries, cd_size, cd_off = _EOCD64.unpack_from(mv, z_off)
    if sig != b"PK\x06\x06" or cd_off + cd_size != z_off or not 0 < entries <= cd_size // _CDH.size:
        return None
    rels: list[str] = []
    spans: list[tuple[int, int, int]] = []  # (data start, size, crc)
    archive = b""
    pos = cd_off
    for _ in range(entries):
        (sig, _m, _v, _fl, method, _t, _dt, crc, csize, usize, nlen, elen, clen, _dk, _ia, _ea, lho) = _CDH.unpack_from(
            mv, pos
        )
        if sig != b"PK\x01\x02" or method or csize != usize or elen or clen or pos + 46 + nlen > z_off:
            return None
        name = bytes(mv[pos + 46 : pos + 46 + nlen])
        pos += 46 + nlen
        slash = name.find(b"/")
        if slash <= 0:
            return None
        if not archive:
            archive = name[:slash]
            if not _archive_name_ok(archive):
                return None
        elif name[:slash] != archive:
            return None
        lsig, _v, _fl, _m, _t, _dt, _c, _cs, _us, lnlen, lelen = _LFH.unpack_from(mv, lho)
        start = lho + _LFH.size + lnlen + lelen
        if lsig != b"PK\x03\x04" or start + usize > cd_off:
            return None
        rels.append(name[slash + 1 :].decode("ascii"))
        spans.append((start, usize, crc))
    if pos != z_off:
        return None
    order = _order_of(rels)
    if order is None:
        return None
    consts: list[tuple[str, bytes]] = []
    sizes: list[int] = [0]
    nonempty_crcs = []
    for rel, (_start, size, crc) in zip(rels, spans):
        if size:
            nonempty_crcs.append(crc)
        if rel == PICKLE:
            sizes[0] = size
        elif rel.startswith("data/"):
            sizes.append(size)
        elif rel in _CONSTANT_RECORDS:
            consts.append((rel, bytes(mv[_start : _start + size])))
        elif rel != SERIALIZATION_ID:
            return None
    align_value = dict(consts).get(".storage_alignment")
    alignment = int(align_value) if align_value is not None and align_value.isdigit() else 64
    layout = PtLayout(order, tuple(consts), alignment, any(nonempty_crcs))
    if layout.problem() is not None:
        return None
    archive_name = archive.decode("ascii")
    tpl = _template(layout, archive_name, tuple(sizes))
    parts = tpl.parts_of(mv, archive_name)
    if parts is not None:
        if len(_BY_TAIL) >= _MAX_TEMPLATES:
            _BY_TAIL.clear()
            _BY_SHAPE.clear()
        _BY_TAIL[bytes(mv[-_TAIL_BYTES:])] = (tpl, archive_name)
        _BY_SHAPE[(entries, cd_size)] = (tpl, archive_name)
    return parts


# --------------------------------------------------------------------------- rebuild


def rebuild(parts: PtParts) -> bytes:
    """The exact ``torch.save`` bytes the parts came from.

    Args:
        parts: From :func:`split` (or :func:`decode_meta`).

    Returns:
        The buffer, as ``torch.save`` under ``parts.layout`` writes it: for parts from
        :func:`prove`, byte-identical to the buffer proved. Costs one copy of the pickle
        and storages, plus a CRC-32 of each one whose CRC the parts do not carry.

    Raises:
        RecordMetaError: The parts would make a zip of 4 GiB or more (never from
            :func:`split`).
    """
    datas = [parts.pickle, *parts.storages]
    tpl = _template(parts.layout, parts.archive, tuple(map(len, datas)))
    if tpl.crc32:
        crcs = [zlib.crc32(d) if c is None else c for d, c in zip(datas, parts.crcs)]
    else:
        crcs = [0] * len(datas)
    if tpl.sid_at >= 0:
        seed = 0
        for j in tpl.combine:
            v = crcs[j] if j >= 0 else ~j
            seed = (seed ^ (v + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & _M64  # c10::hash_combine, mod 2**64
        sid = b"%020d%020d" % (parts.name_hash, seed)
        datas.append(sid)
        crcs.append(zlib.crc32(sid) if tpl.crc32 else 0)
    else:
        datas.append(b"")
        crcs.append(0)
    pack = _U32.pack
    return b"".join(tpl.pick(tpl.static + datas + [pack(c) for c in crcs]))


def rebuilt_bytes(parts: PtParts) -> int:
    """The length of :func:`rebuild`'s output for ``parts``, without building it.

    Raises:
        RecordMetaError: As :func:`rebuild`.
    """
    return rebuilt_length(parts.layout, parts.archive, len(parts.pickle), tuple(map(len, parts.storages)))


def rebuilt_length(layout: PtLayout, archive: str, pickle_bytes: int, storage_bytes: tuple[int, ...]) -> int:
    """:func:`rebuilt_bytes` of a record from its sizes alone: a pickle of ``pickle_bytes``
    and storages of ``storage_bytes`` (in key order) under ``archive`` in ``layout``.

    Raises:
        RecordMetaError: As :func:`rebuild`.
    """
    return _template(layout, archive, (pickle_bytes, *storage_bytes)).nbytes


def rebuilt_lengths(layout: PtLayout, archive: str, sizes: np.ndarray) -> np.ndarray | None:
    """:func:`rebuilt_length` of many records of one archive name and storage count at once.

    Args:
        layout: The layout they were split under.
        archive: Their archive name.
        sizes: int64 array of shape ``(n, 1 + storages)``: each record's pickle length, then
            its storage sizes in key order, all non-negative.

    Returns:
        int64 array of shape ``(n,)``: each record's rebuilt length, the same as
        :func:`rebuilt_length` gives it; or None if any would be 4 GiB or more (for which
        :func:`rebuilt_length` raises).
    """
    if len(sizes) and int(sizes.max()) >= _ZIP32_LIMIT:  # (and the sums below stay far from int64's end)
        return None
    steps, tail = _length_steps(layout, archive, sizes.shape[1] - 1)
    align = layout.alignment
    offset = np.zeros(len(sizes), dtype=np.int64)
    for step in steps:
        if type(step) is tuple:  # an entry of variable size: (column of sizes, bytes before its data)
            j, head = step
            size = sizes[:, j]
            start = offset + head
            offset = start + (-start) % align + size + _DD.size * (size > 0)
        else:  # a run of entries of constant size: bytes each adds, by offset modulo alignment
            offset = offset + step[offset % align]
    total = offset + tail
    if len(total) and int(total.max()) >= _ZIP32_LIMIT:
        return None
    return total


def _length_steps(layout: PtLayout, archive: str, count: int) -> tuple[list[Any], int]:
    """How :func:`rebuilt_lengths` lays out the entries of a record of ``count`` storages
    (as :class:`_Template` does): per entry of variable size ``(its column in sizes, its
    local header's bytes)``; per run of constant entries, an int64 array of the bytes the
    run adds at each offset modulo the alignment (their paddings depend on nothing else);
    and the bytes after the last entry (central directory and tail). Cached."""
    key = (layout, archive, count)
    got = _LENGTH_STEPS.get(key)
    if got is not None:
        return got
    consts = dict(layout.constants)
    prefix = len(archive.encode("ascii")) + 1
    align = layout.alignment
    entries: list[tuple[int, int | None, int]] = []  # (name length, column or None, constant size)
    for token in layout.order:
        if token == PICKLE:
            entries.append((prefix + len(PICKLE), 0, 0))
        elif token == STORAGES:
            entries.extend((prefix + len(b"data/%d" % i), 1 + i, 0) for i in range(count))
        elif token == SERIALIZATION_ID:
            entries.append((prefix + len(SERIALIZATION_ID), None, 40))
        else:
            entries.append((prefix + len(token), None, len(consts[token])))
    steps: list[Any] = []
    run: list[tuple[int, int]] = []

    def close_run() -> None:
        if run:
            adds = []
            for first in range(align):
                offset = first
                for name_bytes, size in run:
                    start = offset + _LFH.size + name_bytes + 4
                    offset = start + (-start) % align + size + (_DD.size if size else 0)
                adds.append(offset - first)
            steps.append(np.array(adds, dtype=np.int64))
            run.clear()

    for name_bytes, column, size in entries:
        if column is None:
            run.append((name_bytes, size))
        else:
            close_run()
            steps.append((column, _LFH.size + name_bytes + 4))
    close_run()
    tail = sum(_CDH.size + name_bytes for name_bytes, _, _ in entries) + _TAIL_BYTES
    if len(_LENGTH_STEPS) >= _MAX_TEMPLATES:
        _LENGTH_STEPS.clear()
    _LENGTH_STEPS[key] = got = (steps, tail)
    return got


_LENGTH_STEPS: dict[tuple[Any, ...], tuple[list[Any], int]] = {}


def prove(buf: Any) -> PtParts | None:
    """:func:`split`, then :func:`rebuild` and compare: the parts only if the bytes match.

    Args:
        buf: A ``torch.save`` buffer (not copied; the parts view it).

    Returns:
        Parts whose :func:`rebuild` is byte-identical to ``buf``, or None (never raises).
    """
    try:
        mv = memoryview(buf).cast("B")
        # bytes == memoryview compares item by item (~100x slower than two bytes objects)
        raw = buf if type(buf) in (bytes, bytearray) else mv.tobytes()
        # A buffer of a known shape: its headers are checked by the comparison below.
        parts = _split_known(mv, False)
        if parts is not None and rebuild(parts) == raw:
            return parts
        # Otherwise (or if the shape matched on its tail was not the buffer's), parse it in full.
        parts = _split(mv)
        return parts if parts is not None and rebuild(parts) == raw else None
    except (struct.error, ValueError, TypeError, IndexError, UnicodeDecodeError, OverflowError, RecordMetaError):
        return None


# --------------------------------------------------------------------------- meta

# encode_meta's bytes, all integers little-endian, varints as in protobuf (LEB128):
#   u8 version (1) | u8 flags (bit 0: archive name follows; else "archive")
#   [u8 length | archive name]  | u64 name hash
#   varint storage count | varint pickle length | varint size of each storage
#   u32 CRC-32 of the pickle and of each storage of at least CRC_STORED_MIN_BYTES (in that
#       order; none when the layout computes no CRC-32s)
#   the pickle (exactly the rest)
# One encoding per record: decode_meta refuses overlong varints and the name "archive"
# spelled out.
_META_VERSION = 1
_FLAG_ARCHIVE = 1
_MAX_VARINT_BYTES = 10


def encode_meta(parts: PtParts) -> bytes:
    """The non-storage parts of a record as compact bytes (the layout is not included:
    a store keeps it once; pass it back to :func:`decode_meta`).

    Args:
        parts: From :func:`split` or :func:`prove`.

    Returns:
        About 12 bytes plus the pickle (plus 4 bytes per pickle or storage of at least
        :data:`CRC_STORED_MIN_BYTES`).
    """
    out = bytearray((_META_VERSION, 0 if parts.archive == "archive" else _FLAG_ARCHIVE))
    if out[1]:
        name = parts.archive.encode("ascii")
        out.append(len(name))
        out += name
    out += _U64.pack(parts.name_hash)
    sizes = [len(parts.pickle), *(len(s) for s in parts.storages)]
    _varint(out, len(parts.storages))
    for size in sizes:
        _varint(out, size)
    if parts.layout.crc32:
        for size, crc in zip(sizes, parts.crcs):
            if size >= CRC_STORED_MIN_BYTES:
                out += _U32.pack(crc if crc is not None else 0)
    out += parts.pickle
    return bytes(out)


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def _short(what: str, pos: int, need: int, have: int) -> RecordMetaError:
    return RecordMetaError(
        f"record metadata ends inside its {what}: {need} bytes needed at offset {pos}, {max(have - pos, 0)} left"
    )


def _read_varint(mv: memoryview, pos: int, what: str) -> tuple[int, int]:
    """``(value, next position)`` of the LEB128 varint at ``pos``."""
    n = len(mv)
    if pos >= n:
        raise _short(what, pos, 1, n)
    byte = mv[pos]
    if byte < 0x80:
        return byte, pos + 1
    value = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT_BYTES, n)):
        byte = mv[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0:
                raise RecordMetaError(f"record metadata: the {what} at offset {pos} is an overlong varint")
            return value, i + 1
        shift += 7
    if n - pos < _MAX_VARINT_BYTES:
        raise _short(what, pos, n - pos + 1, n)
    raise RecordMetaError(f"record metadata: the {what} at offset {pos} runs past {_MAX_VARINT_BYTES} bytes")


def decode_meta(meta: Any, storages: Any, layout: PtLayout) -> PtParts:
    """The parts :func:`encode_meta` encoded, over the record's storage bytes.

    Args:
        meta: What :func:`encode_meta` returned (bytes-like; the pickle is a view of it).
        storages: The storages' bytes back to back, in key order (bytes-like; viewed, not
            copied).
        layout: The layout the record was split under (a store keeps it).

    Returns:
        Parts for :func:`rebuild`.

    Raises:
        RecordMetaError: Anything malformed: an unknown version or flag, an archive name
            ``torch.save`` would not write, a length or count that runs past the bytes
            present, storage sizes that do not add up to ``len(storages)``, bytes left over,
            a non-canonical encoding (an overlong varint, ``"archive"`` spelled out).
            Allocations are bounded by ``len(meta)``.
    """
    archive, name_hash, sizes, crcs, pickle = parse_meta(meta, layout)
    blob = memoryview(storages).cast("B")
    if sum(sizes) != len(blob):
        raise RecordMetaError(f"storage sizes add up to {sum(sizes)} bytes, the storage bytes are {len(blob)}")
    views = []
    at = 0
    for size in sizes:
        views.append(blob[at : at + size])
        at += size
    return PtParts(layout, archive, pickle, tuple(views), name_hash, crcs)


def meta_fields_at(
    archive: str, crcs: tuple[int | None, ...], prefix_bytes: int
) -> tuple[int, int, tuple[int | None, ...]]:
    """Where the fields that differ between records of one shape lie in a metadata that
    :func:`parse_meta` parsed (its ``archive`` and ``crcs``, its pickle at ``prefix_bytes``):
    ``(offset of the name hash, end of the varints, offset of each CRC-32 or None)``, the
    last ``()`` when no CRC-32 is kept. Another record's metadata with the same bytes
    everywhere else parses to the same archive and sizes (:func:`read_meta_fields`)."""
    head = 2 if archive == "archive" else 3 + len(archive)
    kept = sum(c is not None for c in crcs)
    sizes_end = prefix_bytes - 4 * kept
    if not kept:
        return head, sizes_end, ()
    slots: list[int | None] = []
    at = sizes_end
    for c in crcs:
        slots.append(None if c is None else at)
        at += 0 if c is None else 4
    return head, sizes_end, tuple(slots)


def read_meta_fields(
    mv: Any, lo: int, head: int, crc_slots: tuple[int | None, ...], count: int
) -> tuple[int, tuple[int | None, ...]]:
    """``(name hash, CRC-32s)`` of the metadata at ``lo`` of ``mv``, at the offsets
    :func:`meta_fields_at` gave for a record of its shape (``count`` storages)."""
    name_hash = _U64.unpack_from(mv, lo + head)[0]
    if not crc_slots:
        return name_hash, (None,) * (count + 1)
    return name_hash, tuple(None if at is None else _U32.unpack_from(mv, lo + at)[0] for at in crc_slots)


def parse_metas(
    col: Any, bounds: np.ndarray, layout: PtLayout, table: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`parse_meta` of many metadata back to back, each expected to list the storage
    sizes of its row of ``table`` under the default archive name, with numpy: ``(where each
    pickle starts, each pickle's length)``, int64 arrays of shape ``(n,)``; or None if any
    metadata is not one :func:`parse_meta` would take, lists other sizes than its row or
    has a varint of more than 8 bytes (parse each alone: it raises, or says what differs).
    Name hashes and CRC-32s are not read.

    Args:
        col: The metadata, back to back (bytes-like).
        bounds: int64 array of shape ``(n + 1,)``: where each metadata starts in ``col``,
            then where the last ends (non-decreasing, within ``col``).
        layout: The layout they were split under.
        table: Integer array of shape ``(n, storages)``: the storage sizes each must list.
    """
    b = np.frombuffer(col, dtype=np.uint8)
    lo, hi = bounds[:-1], bounds[1:]
    n, count = table.shape
    if not n:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if int((hi - lo).min()) < 12 or int(bounds[0]) < 0 or int(bounds[-1]) > len(b):
        return None  # (the header, hash, count, pickle length and a pickle byte take 12 bytes)
    try:
        # Each varint is read where the one before it ended, without a bound: one that runs
        # past its metadata's end leaves ``cur`` past it, which the last check finds (every
        # length read is non-negative); one past the column raises IndexError.
        if (b[lo] != _META_VERSION).any() or b[lo + 1].any():
            return None
        cur = lo + 10
        for j in range(-1, count):
            want: Any = count if j < 0 else table[:, j]
            if (count if j < 0 else int(want.max())) < 0x80:  # one byte each
                if (b[cur] != want).any():
                    return None
                cur = cur + 1
            else:
                got = _varints(b, cur)
                if got is None or (got[0] != want).any():
                    return None
                cur = got[1]
            if j < 0:
                got = _varints(b, cur)
                if got is None:
                    return None
                pickle_bytes, cur = got
    except IndexError:
        return None
    if layout.crc32:
        big = (np.asarray(table) >= CRC_STORED_MIN_BYTES).sum(axis=1) + (pickle_bytes >= CRC_STORED_MIN_BYTES)
        cur = cur + 4 * big
    if (cur + pickle_bytes != hi).any():
        return None
    return cur, pickle_bytes


def _varints(b: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The LEB128 varint at each ``cur`` of ``b``: ``(values, next positions)``, or None if
    one is overlong or takes more than 8 bytes. Raises IndexError past ``b``."""
    value = b[cur].astype(np.int64)
    more = value >= 0x80
    if not more.any():
        return value, cur + 1
    value &= 0x7F
    for k in range(1, 8):
        cur = cur + more  # a finished varint's stays on its last byte
        nxt = b[cur].astype(np.int64)
        value += ((nxt & 0x7F) << (7 * k)) * more
        last = more & (nxt < 0x80)
        if (last & (nxt == 0)).any():  # overlong: parse_meta says so
            return None
        more &= ~last
        if not more.any():
            return value, cur + 1
    return None


def parse_meta(meta: Any, layout: PtLayout) -> tuple[str, int, list[int], tuple[int | None, ...], memoryview]:
    """:func:`decode_meta` without the storage bytes: ``(archive, name hash, storage sizes,
    CRC-32s, pickle view)``, with the same checks on ``meta`` (see there)."""
    mv = memoryview(meta).cast("B")
    n = len(mv)
    if n < 10:
        raise _short("header", 0, 10, n)
    version, flags = mv[0], mv[1]
    if version != _META_VERSION:
        raise RecordMetaError(f"record metadata version {version}, expected {_META_VERSION}")
    if flags & ~_FLAG_ARCHIVE:
        raise RecordMetaError(f"record metadata flags {flags:#04x}: unknown bits set")
    archive = "archive"
    pos = 2
    if flags & _FLAG_ARCHIVE:
        end = 3 + mv[2]
        if end > n:
            raise _short("archive name", 3, mv[2], n)
        name = mv[3:end].tobytes()
        if name == b"archive":
            raise RecordMetaError("record metadata names the default archive name 'archive' explicitly")
        if not _archive_name_ok(name):
            raise RecordMetaError(f"archive name {name!r} is not one torch.save writes (ASCII, no '/', '\\\\', NUL)")
        archive = name.decode("ascii")
        pos = end
    if pos + 8 > n:
        raise _short("serialization-id hash", pos, 8, n)
    (name_hash,) = _U64.unpack_from(mv, pos)
    count, pos = _read_varint(mv, pos + 8, "storage count")
    if count >= n - pos:  # the pickle length and each size take at least one byte
        raise RecordMetaError(f"record metadata lists {count} storages in {n - pos} bytes")
    sizes = [0] * (count + 1)
    for i in range(count + 1):
        sizes[i], pos = _read_varint(mv, pos, "pickle length" if i == 0 else f"size of storage {i - 1}")
    crcs: list[int | None] = [None] * (count + 1)
    if layout.crc32:
        for i, size in enumerate(sizes):
            if size >= CRC_STORED_MIN_BYTES:
                if pos + 4 > n:
                    raise _short("CRC-32", pos, 4, n)
                (crcs[i],) = _U32.unpack_from(mv, pos)
                pos += 4
    if pos + sizes[0] != n:
        if pos + sizes[0] > n:
            raise _short("pickle", pos, sizes[0], n)
        raise RecordMetaError(f"record metadata has {n - pos - sizes[0]} bytes after its pickle")
    return archive, name_hash, sizes[1:], tuple(crcs), mv[pos:]
