"""Format v1: constants, the shard header/footer/trailer layout and the index schema.

This module is the executable half of ``docs/format.md`` (the normative half). It has no
torch import, so tools that only inspect files can use it.

Shard file layout (all integers little-endian)::

    offset 0          header   16 bytes  magic b"TSPTSHRD", u16 major, u16 minor, u32 flags (0)
    offset 16         frames   one frame per record, back to back
    table_offset      frame table   frame_count x 32 bytes: u64 offset, u64 stored_bytes,
                                    u64 raw_bytes, u64 xxh3_64(frame)
    (1.1, feature "multi-record-frames" only)
                      record map    record_count x 24 bytes: u64 frame, u64 raw_offset, u64 raw_bytes
                      footer JSON   UTF-8 JSON object (codec config, features, frames, ...)
    file_bytes-40     trailer       40 bytes: u64 table_offset, u64 record_count,
                                    u64 footer_json_bytes, u64 xxh3_64(tables + footer JSON),
                                    magic b"TSPTFOOT"

Without the "multi-record-frames" feature there is one record per frame, frame_count ==
record_count, and the frame table is the record table (the 1.0 layout).

Format 1.2, feature "raw-frames": the footer JSON's ``raw_frames`` lists runs ``[first, end]``
of frames stored raw (stored bytes == raw bytes, no codec frame); the header of such a shard
may carry the version of its other features (see docs/format.md, section 5.2).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checksums import ALGORITHM, digest_int, parse_digest
from .errors import IndexFormatError, RecordMetaError, ShardFormatError, UnsupportedFormatError

__all__ = [
    "FORMAT_NAME",
    "BASE_VERSION",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "INDEX_NAME",
    "KNOWN_FEATURES",
    "LOCK_NAME",
    "MAX_FOOTER_JSON_BYTES",
    "MAX_INDEX_BYTES",
    "FEATURE_DICTIONARY",
    "FEATURE_MULTI_RECORD_FRAMES",
    "FEATURE_RAW_FRAMES",
    "FEATURE_COLUMNAR_FRAMES",
    "RECORD_DTYPE",
    "RECORD_ENTRY_BYTES",
    "RECORD_MAP_DTYPE",
    "RECORD_MAP_ENTRY_BYTES",
    "SHARD_MAGIC",
    "SHARD_SUFFIX",
    "TRAILER_BYTES",
    "TRAILER_MAGIC",
    "IndexInfo",
    "ShardEntry",
    "ShardFooter",
    "StoreInfo",
    "check_shard_name",
    "decode_header",
    "decode_trailer",
    "encode_footer",
    "encode_header",
    "encode_index",
    "footer_meta",
    "new_writer_token",
    "parse_footer",
    "parse_index",
    "parse_shard_name",
    "raw_frames_mask",
    "raw_frames_runs",
    "shard_name",
    "version_for",
]

FORMAT_NAME = "tensorstore_pt"
#: The newest (major, minor) this version writes. A reader MUST refuse a newer major; a newer
#: minor only through unknown features. A store that uses no feature is written as 1.0.
FORMAT_VERSION: tuple[int, int] = (1, 3)
BASE_VERSION: tuple[int, int] = (1, 0)
#: 1.1: several consecutive records per frame; the footer gains a record map.
FEATURE_MULTI_RECORD_FRAMES = "multi-record-frames"
#: 1.1: a zstd dictionary file in the store, referenced from the codec config.
FEATURE_DICTIONARY = "zstd-dictionary"
#: 1.2: frames the codec barely shrinks are stored as their raw bytes; the footer JSON lists
#: them (``raw_frames``, runs of frame indices).
FEATURE_RAW_FRAMES = "raw-frames"
#: 1.3: multi-record frames whose decoded bytes are a column block of container-free records
#: (tensorstore_pt/columnar.py); the footer JSON names them (``columnar_frames``) and the
#: container layout their records are rebuilt with (``columnar_layout``).
FEATURE_COLUMNAR_FRAMES = "columnar-frames"
#: The version that introduced each optional feature.
FEATURE_VERSIONS: dict[str, tuple[int, int]] = {
    FEATURE_MULTI_RECORD_FRAMES: (1, 1),
    FEATURE_DICTIONARY: (1, 1),
    FEATURE_RAW_FRAMES: (1, 2),
    FEATURE_COLUMNAR_FRAMES: (1, 3),
}
#: Optional features (listed in index and footers) this version can read.
KNOWN_FEATURES: frozenset[str] = frozenset(FEATURE_VERSIONS)


def version_for(features: list[str] | tuple[str, ...] | set[str]) -> tuple[int, int]:
    """The lowest format version that describes a store or shard using ``features``: the
    newest version among those that introduced them (1.0 for none)."""
    return max((FEATURE_VERSIONS[f] for f in features if f in FEATURE_VERSIONS), default=BASE_VERSION)


INDEX_NAME = "index.json"
#: The writers' advisory lock file (docs/format.md, section 8). Its leading "." keeps it from
#: ever being a shard name; readers ignore it.
LOCK_NAME = ".tspt-lock"
SHARD_SUFFIX = ".tspt"
SHARD_MAGIC = b"TSPTSHRD"
TRAILER_MAGIC = b"TSPTFOOT"

_HEADER = struct.Struct("<8sHHI")
_TRAILER = struct.Struct("<QQQQ8s")
HEADER_BYTES = _HEADER.size  # 16
TRAILER_BYTES = _TRAILER.size  # 40
RECORD_DTYPE = np.dtype([("offset", "<u8"), ("stored", "<u8"), ("raw", "<u8"), ("checksum", "<u8")])
RECORD_ENTRY_BYTES = RECORD_DTYPE.itemsize  # 32
RECORD_MAP_DTYPE = np.dtype([("frame", "<u8"), ("raw_offset", "<u8"), ("raw", "<u8")])
RECORD_MAP_ENTRY_BYTES = RECORD_MAP_DTYPE.itemsize  # 24

#: Largest value any size/count field may take (2**62 bytes): keeps arithmetic in int64 range.
MAX_FIELD = 2**62
#: Largest footer JSON a reader accepts (bytes). A v1 writer's footer JSON is about 200 bytes;
#: the cap keeps a hostile trailer from making a reader read a gigabyte of "footer".
MAX_FOOTER_JSON_BYTES = 2**20
#: Largest ``index.json`` a reader accepts (bytes): about a million shards' entries.
MAX_INDEX_BYTES = 256 * 2**20
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


#: The most characters of a value read from a store (index or footer JSON) that an error
#: message or a verify report quotes.
SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` characters: a value read from a hostile
    store's JSON (a footer may hold 1 MiB of it, an index 256 MiB) quoted whole made an error of
    that size, kept by a bulk read for every record of its shard, and a verify report quoting it
    held megabytes a shard (twice: in ``found`` and ``message``)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def strict_json_loads(data: bytes) -> Any:
    """Parse UTF-8 JSON strictly: no NaN/Infinity; ints above 4300 digits raise ValueError.

    Raises:
        ValueError: Not UTF-8, not JSON (json.JSONDecodeError), a NaN/Infinity constant, or an
            int too long to convert.
        RecursionError: Nesting too deep for the parser.
    """
    return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)


#: Hex digits of a writer token (48 random bits).
WRITER_TOKEN_CHARS = 12
_TOKEN_RE = re.compile(rf"^[0-9a-f]{{{WRITER_TOKEN_CHARS}}}$")
_NEW_SHARD_RE = re.compile(rf"^shard-([0-9a-f]{{{WRITER_TOKEN_CHARS}}})-(\d+){re.escape(SHARD_SUFFIX)}$")
_LEGACY_SHARD_RE = re.compile(rf"^shard-(\d+){re.escape(SHARD_SUFFIX)}$")


def new_writer_token() -> str:
    """A fresh random writer token: 12 lowercase hex digits (48 bits from ``secrets``)."""
    import secrets

    return secrets.token_hex(WRITER_TOKEN_CHARS // 2)


def shard_name(token: str, seq: int) -> str:
    """The file name of shard ``seq`` of the writer ``token`` (``shard-5f0c2a9e11d4-00003.tspt``).

    Every writer (one ``ShardWriter`` from open to commit, or one ``recover``) draws its own
    token, so a shard name is never used for two contents: a reader holding an old index
    finds its old shard or nothing, never another version's bytes.
    """
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"writer token: expected {WRITER_TOKEN_CHARS} lowercase hex digits, found {token!r}")
    return f"shard-{token}-{seq:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """``(writer token, seq)`` of a shard name this library writes, or None for another name.

    Names of stores written before writer tokens (``shard-00003.tspt``) give token ``""``.
    """
    m = _NEW_SHARD_RE.match(name)
    if m:
        return m.group(1), int(m.group(2))
    m = _LEGACY_SHARD_RE.match(name)
    return ("", int(m.group(1))) if m else None


def check_shard_name(name: object, where: str) -> str:
    """Return ``name`` if it is a safe, plain file name; else raise.

    Safe means: a str of letters, digits, ``.``, ``_``, ``-``, not starting with ``.``, at most
    200 characters, no path separator, not ``..``. This keeps every file access inside the store
    directory whatever a hostile index says.

    Raises:
        IndexFormatError: If the name is unsafe or not a string.
    """
    if not isinstance(name, str) or not _SHARD_NAME_RE.fullmatch(name) or ".." in name:
        raise IndexFormatError(
            f"{where}: expected a plain shard file name (letters, digits, '.', '_', '-', no path "
            f"separators or '..'), found {shown(name)}"
        )
    return name


# --------------------------------------------------------------------------- shard layout


def encode_header(version: tuple[int, int] = BASE_VERSION) -> bytes:
    return _HEADER.pack(SHARD_MAGIC, version[0], version[1], 0)


def decode_header(data: bytes, where: str) -> tuple[int, int]:
    """Parse a shard header; return the (major, minor) version.

    Raises:
        ShardFormatError: Wrong length or magic.
        UnsupportedFormatError: A major version this reader does not know.
    """
    if len(data) != HEADER_BYTES:
        raise ShardFormatError(f"{where}: expected a {HEADER_BYTES}-byte header, found {len(data)} bytes")
    magic, major, minor, _flags = _HEADER.unpack(data)  # flags: readers MUST ignore them (docs/format.md)
    if magic != SHARD_MAGIC:
        raise ShardFormatError(f"{where}: expected header magic {SHARD_MAGIC!r}, found {magic!r}")
    if major != FORMAT_VERSION[0]:
        raise UnsupportedFormatError(
            f"{where}: shard format version {major}.{minor}; this reader supports major version {FORMAT_VERSION[0]}"
        )
    return major, minor


@dataclass(frozen=True)
class ShardFooter:
    """A parsed shard footer.

    Attributes:
        table: The frame table, a structured array of ``RECORD_DTYPE`` (offset, stored, raw,
            checksum), one row per frame in file order. With one record per frame (format
            1.0) row k is record k.
        meta: The footer JSON object (codec config, checksum algorithm, features, ...).
        table_offset: Byte offset of the frame table (end of the last frame).
        record_map: With the "multi-record-frames" feature, a ``RECORD_MAP_DTYPE`` array
            (frame, raw_offset, raw), one row per record: record k is bytes
            ``[raw_offset, raw_offset + raw)`` of frame ``frame`` decoded. None otherwise.
        raw_mask: With the "raw-frames" feature, a bool array, one per frame: True where the
            frame is stored raw (the footer JSON's ``raw_frames`` runs). None otherwise.
        columnar_mask: With the "columnar-frames" feature, a bool array, one per frame: True
            where the frame decodes to a column block (``columnar_frames``). None otherwise.
        layout: With the "columnar-frames" feature, the ``_ptzip.PtLayout`` of the footer's
            ``columnar_layout``: how the column blocks' records are rebuilt. None otherwise.
    """

    table: np.ndarray
    meta: dict[str, Any]
    table_offset: int
    record_map: np.ndarray | None = None
    raw_mask: np.ndarray | None = None
    columnar_mask: np.ndarray | None = None
    layout: Any = None

    def is_columnar(self, fi: int) -> bool:
        """Whether frame ``fi`` decodes to a column block (format 1.3, "columnar-frames")."""
        return self.columnar_mask is not None and bool(self.columnar_mask[fi])

    def is_raw(self, fi: int) -> bool:
        """Whether frame ``fi`` is stored raw (format 1.2, "raw-frames"): its stored bytes are
        its raw bytes, no codec frame."""
        return self.raw_mask is not None and bool(self.raw_mask[fi])

    @property
    def records(self) -> int:
        return len(self.table) if self.record_map is None else len(self.record_map)

    def locate(self, k: int) -> tuple[int, int, int]:
        """Record k of the shard -> (frame index, raw offset in the decoded frame, raw bytes)."""
        if self.record_map is None:
            return k, 0, int(self.table["raw"][k])
        row = self.record_map[k]
        return int(row["frame"]), int(row["raw_offset"]), int(row["raw"])


def footer_meta(features: list[str], codec: dict[str, Any]) -> dict[str, Any]:
    """The store-wide keys of a shard's footer JSON (section 5): format, the lowest version
    that describes ``features``, the features, the codec config and the checksum algorithm.
    Writers add ``records``, ``first_record`` (and ``frames``) per shard."""
    return {
        "format": FORMAT_NAME,
        "format_version": list(version_for(features)),
        "features": list(features),
        "codec": codec,
        "checksum": ALGORITHM,
    }


def encode_index(info: IndexInfo) -> bytes:
    """The bytes of ``index.json`` for ``info``: UTF-8 JSON, one key a line, newline-terminated."""
    return (json.dumps(info.to_json(), indent=1) + "\n").encode()


#: How many times its decoded bytes a column block's records may rebuild to (format 1.3):
#: the zip container torch.save wraps around a record adds at most a few hundred bytes per
#: storage (local and central headers, both naming the entry; alignment padding; a data
#: descriptor) and about 1.2 KiB per record (the constant entries, the end records), where the
#: block spends at least one byte per storage and 12 per record on them; 1024 bounds both at
#: torch's alignment of 64. A layout of a larger alignment pads each entry by up to that much,
#: so the bound is checked per block (footer parsing: the record map's sums) and a writer
#: stores a run of records as a plain frame where their block would not meet it.
COLUMNAR_EXPANSION = 1024

#: A coded record map (format 1.3, section 5.3) decodes to at most this many times its coded
#: length, plus MAP_SLACK_BYTES: the bound on what a hostile footer can make a reader keep.
MAP_RATIO = 256
MAP_SLACK_BYTES = 2**20


def encode_record_map(record_map: np.ndarray) -> bytes | None:
    """The coded form of a record map (format 1.3, section 5.3): its three columns (frame,
    raw_offset, raw), each as u64 little-endian deltas (modulo 2**64) byte-shuffled, in one
    zstd frame (level 3, content size declared); None when that would decode past the
    ``MAP_RATIO`` bound (the map is then stored plain)."""
    import zstandard

    from ._filters import FILTER_DELTA, FILTER_SHUFFLE, _apply

    n = len(record_map)
    cols = []
    for key in ("frame", "raw_offset", "raw"):
        v = np.ascontiguousarray(record_map[key], dtype="<u8").tobytes()
        cols.append(_apply(_apply(v, FILTER_DELTA, 8), FILTER_SHUFFLE, 8))
    coded = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b"".join(cols))
    if n * RECORD_MAP_ENTRY_BYTES > MAP_RATIO * len(coded) + MAP_SLACK_BYTES:
        return None
    if len(coded) + _MAP_KEY_BYTES >= n * RECORD_MAP_ENTRY_BYTES:  # no smaller (a writer's size bound holds)
        return None
    return coded


#: What the key ``"record_map_bytes":N,`` adds to a footer JSON, at most.
_MAP_KEY_BYTES = 40


def decode_record_map(coded: bytes, count: int, where: str) -> np.ndarray:
    """The record map :func:`encode_record_map` coded, for ``count`` records.

    Raises:
        ShardFormatError: The zstd frame does not declare ``24 x count`` bytes, that is past
            the ``MAP_RATIO`` bound, or it does not decode to exactly that (checked before
            anything of that size is allocated).
    """
    import zstandard

    want = count * RECORD_MAP_ENTRY_BYTES
    if want > MAP_RATIO * len(coded) + MAP_SLACK_BYTES:
        raise ShardFormatError(
            f"{where}: a coded record map of {len(coded)} bytes for {count} records: expected at most "
            f"{MAP_RATIO} x its bytes + {MAP_SLACK_BYTES} decoded, found {want}"
        )
    try:
        declared = zstandard.get_frame_parameters(coded).content_size
        if declared != want:
            raise ValueError(f"its zstd frame declares {declared} bytes, expected {want} ({count} records)")
        raw = zstandard.ZstdDecompressor().decompress(coded, max_output_size=want)
        if len(raw) != want:
            raise ValueError(f"it decodes to {len(raw)} bytes, expected {want}")
    except (zstandard.ZstdError, ValueError) as exc:
        raise ShardFormatError(f"{where}: the coded record map is damaged: {exc}") from None
    from ._filters import FILTER_DELTA, FILTER_SHUFFLE, _undo

    mv = memoryview(raw)
    out = np.zeros(count, dtype=RECORD_MAP_DTYPE)
    for j, key in enumerate(("frame", "raw_offset", "raw")):
        col = _undo(_undo(mv[j * 8 * count : (j + 1) * 8 * count], FILTER_SHUFFLE, 8), FILTER_DELTA, 8)
        out[key] = np.frombuffer(col, dtype="<u8")
    return out


def encode_footer(table: np.ndarray, meta: dict[str, Any], record_map: np.ndarray | None = None) -> bytes:
    """Encode frame table [+ record map] + footer JSON + trailer.

    Args:
        table: Frame rows, ``RECORD_DTYPE``.
        meta: The footer JSON object; must hold ``records`` and ``features``. With
            "columnar-frames" the record map is coded (format 1.3) where :func:`encode_record_map`
            allows, and ``record_map_bytes`` set (else removed).
        record_map: ``RECORD_MAP_DTYPE`` rows, only with the "multi-record-frames" feature.
    """
    if len(table) > 0:
        table_offset = int(table["offset"][-1]) + int(table["stored"][-1])
    else:
        table_offset = HEADER_BYTES
    body = np.ascontiguousarray(table, dtype=RECORD_DTYPE).tobytes()
    records = len(table)
    if record_map is not None:
        coded = encode_record_map(record_map) if FEATURE_COLUMNAR_FRAMES in meta.get("features", ()) else None
        meta = {k: v for k, v in meta.items() if k != "record_map_bytes"}
        if coded is not None:
            meta["record_map_bytes"] = len(coded)
            body += coded
        else:
            body += np.ascontiguousarray(record_map, dtype=RECORD_MAP_DTYPE).tobytes()
        records = len(record_map)
    js = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    trailer = _TRAILER.pack(table_offset, records, len(js), digest_int(body + js), TRAILER_MAGIC)
    return body + js + trailer


def decode_trailer(data: bytes, file_bytes: int, where: str) -> tuple[int, int, int, int]:
    """Parse and bounds-check a trailer; return (table_offset, record_count, footer_json_bytes, checksum).

    The footer body (tables + JSON) is bytes ``[table_offset, file_bytes - 40)``; its last
    ``footer_json_bytes`` bytes are the JSON.

    Raises:
        ShardFormatError: Wrong magic, or fields that do not fit in a file of ``file_bytes``.
    """
    if len(data) != TRAILER_BYTES:
        raise ShardFormatError(f"{where}: expected a {TRAILER_BYTES}-byte trailer, found {len(data)} bytes")
    table_offset, count, js_bytes, checksum, magic = _TRAILER.unpack(data)
    if magic != TRAILER_MAGIC:
        raise ShardFormatError(f"{where}: expected trailer magic {TRAILER_MAGIC!r}, found {magic!r}")
    if js_bytes > MAX_FOOTER_JSON_BYTES:
        raise ShardFormatError(
            f"{where}: trailer says the footer JSON is {js_bytes} bytes; expected at most {MAX_FOOTER_JSON_BYTES}"
        )
    body_bytes = file_bytes - TRAILER_BYTES - table_offset
    if (
        table_offset < HEADER_BYTES
        or count > MAX_FIELD
        or js_bytes > MAX_FIELD
        # The loosest layout: a coded record map (format 1.3); the others are checked exactly later.
        or count * RECORD_MAP_ENTRY_BYTES > MAP_RATIO * (body_bytes - js_bytes) + MAP_SLACK_BYTES
    ):
        raise ShardFormatError(
            f"{where}: trailer says table at {table_offset}, {count} records, {js_bytes} footer JSON bytes, "
            f"which do not fit in a file of {file_bytes} bytes"
        )
    return table_offset, count, js_bytes, checksum


def parse_footer(
    body: bytes,
    table_offset: int,
    count: int,
    checksum: int,
    where: str,
    footer_json_bytes: int | None = None,
) -> ShardFooter:
    """Check and parse the footer body (tables + footer JSON) read from a shard.

    Validates the footer checksum, the JSON, the table sizes, and that every frame lies in
    ``[HEADER_BYTES, table_offset)`` in order without gaps or overlap; with a record map, that
    each frame's records tile its decoded bytes exactly.

    Args:
        body: Bytes ``[table_offset, file_bytes - 40)`` of the shard.
        footer_json_bytes: From the trailer; None means the 1.0 layout (JSON after
            ``count`` 32-byte rows).

    Raises:
        ShardFormatError: On any inconsistency.
        UnsupportedFormatError: On an unknown feature or version in the footer JSON.
    """
    found = digest_int(body)
    if found != checksum:
        raise ShardFormatError(
            f"{where}: footer checksum ({ALGORITHM}) mismatch: trailer says {checksum:016x}, footer bytes give {found:016x}"
        )
    js_bytes = len(body) - count * RECORD_ENTRY_BYTES if footer_json_bytes is None else footer_json_bytes
    if not 0 <= js_bytes <= len(body):
        raise ShardFormatError(f"{where}: footer JSON of {js_bytes} bytes does not fit in a {len(body)}-byte footer")
    try:
        meta = strict_json_loads(body[len(body) - js_bytes :])
    except (ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{where}: footer JSON does not parse ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: footer JSON must be an object, found {type(meta).__name__}")
    _, features = _check_version_and_features(meta, where)
    if meta.get("records") != count:
        raise ShardFormatError(f"{where}: footer JSON says {shown(meta.get('records'))} records, trailer says {count}")
    multi = FEATURE_MULTI_RECORD_FRAMES in features
    if FEATURE_COLUMNAR_FRAMES in features and not multi:
        raise ShardFormatError(
            f"{where}: footer lists {FEATURE_COLUMNAR_FRAMES!r} without {FEATURE_MULTI_RECORD_FRAMES!r}"
        )
    frames = meta.get("frames", count) if multi else count
    if isinstance(frames, bool) or not isinstance(frames, int) or not 0 <= frames <= count:
        raise ShardFormatError(f"{where}: footer JSON 'frames' must be an int in [0, {count}], found {shown(frames)}")
    map_bytes = count * RECORD_MAP_ENTRY_BYTES if multi else 0
    coded_map = "record_map_bytes" in meta
    if coded_map:
        map_bytes = meta["record_map_bytes"]
        if (
            FEATURE_COLUMNAR_FRAMES not in features
            or isinstance(map_bytes, bool)
            or not isinstance(map_bytes, int)
            or not 0 < map_bytes <= len(body)
        ):
            raise ShardFormatError(
                f"{where}: footer JSON 'record_map_bytes' {shown(map_bytes)}: expected an int in [1, {len(body)}], "
                f"only with the feature {FEATURE_COLUMNAR_FRAMES!r}"
            )
    tables_bytes = frames * RECORD_ENTRY_BYTES + map_bytes
    if tables_bytes + js_bytes != len(body):
        raise ShardFormatError(
            f"{where}: footer is {len(body)} bytes, expected {tables_bytes} bytes of tables + {js_bytes} bytes of JSON"
        )
    table = np.frombuffer(body, dtype=RECORD_DTYPE, count=frames) if frames else np.zeros(0, RECORD_DTYPE)
    if frames:
        offsets = table["offset"]
        ends = offsets + table["stored"]
        if (
            int(offsets[0]) != HEADER_BYTES
            or int(table["raw"].max()) > MAX_FIELD
            or int(table["stored"].max()) > MAX_FIELD
            or int(ends[-1]) != table_offset
            or (frames > 1 and not np.array_equal(offsets[1:], ends[:-1]))
        ):
            raise ShardFormatError(
                f"{where}: frame table is inconsistent: frames must be back to back from byte "
                f"{HEADER_BYTES} to byte {table_offset}"
            )
    elif table_offset != HEADER_BYTES:
        raise ShardFormatError(f"{where}: no frames, but the table starts at byte {table_offset}, not {HEADER_BYTES}")
    record_map = None
    columnar_mask = layout = None
    if FEATURE_COLUMNAR_FRAMES in features:
        from ._ptzip import PtLayout  # no torch import; kept local: most stores never need it

        try:
            layout = PtLayout.from_json(meta.get("columnar_layout"))
        except RecordMetaError as exc:
            raise ShardFormatError(f"{where}: footer JSON 'columnar_layout': {shown(str(exc))}") from None
        columnar_mask = frame_runs_mask(meta.get("columnar_frames"), table, where, "columnar_frames", True)
    elif "columnar_frames" in meta or "columnar_layout" in meta:
        raise ShardFormatError(
            f"{where}: footer JSON has 'columnar_frames' or 'columnar_layout' but does not list the feature "
            f"{FEATURE_COLUMNAR_FRAMES!r}"
        )
    if multi:
        at = frames * RECORD_ENTRY_BYTES
        if coded_map:
            record_map = decode_record_map(body[at : at + map_bytes], count, where)
        else:
            record_map = np.frombuffer(body, dtype=RECORD_MAP_DTYPE, count=count, offset=at)
        _check_record_map(record_map, table, where, columnar_mask)
    raw_mask = None
    if FEATURE_RAW_FRAMES in features:
        raw_mask = raw_frames_mask(meta.get("raw_frames"), table, where)
    elif "raw_frames" in meta:
        raise ShardFormatError(
            f"{where}: footer JSON has 'raw_frames' but does not list the feature {FEATURE_RAW_FRAMES!r}"
        )
    return ShardFooter(
        table=table,
        meta=meta,
        table_offset=table_offset,
        record_map=record_map,
        raw_mask=raw_mask,
        columnar_mask=columnar_mask,
        layout=layout,
    )


def raw_frames_mask(runs: Any, table: np.ndarray, where: str) -> np.ndarray:
    """Check a footer's ``raw_frames`` (format 1.2) against its frame table; return the mask.

    ``runs`` must be a non-empty list of ``[first, end]`` int pairs (half-open ranges of frame
    indices), each non-empty, in increasing order, not overlapping or touching (``end`` of one run <
    ``first`` of the next), inside ``[0, frames]``; every frame they name must have
    ``stored == raw`` (its stored bytes are its raw bytes).

    Raises:
        ShardFormatError: Anything else.
    """
    return frame_runs_mask(runs, table, where, "raw_frames", False)


def frame_runs_mask(runs: Any, table: np.ndarray, where: str, key: str, empty_ok: bool) -> np.ndarray:
    """:func:`raw_frames_mask` for the footer key ``key`` (``"raw_frames"`` or
    ``"columnar_frames"``); ``empty_ok``: an empty list is allowed (no frame named)."""
    frames = len(table)
    feature = FEATURE_RAW_FRAMES if key == "raw_frames" else FEATURE_COLUMNAR_FRAMES
    if not isinstance(runs, list):
        raise ShardFormatError(
            f"{where}: footer lists {feature!r} but {key!r} is {shown(runs)}; expected a list of "
            "[first, end] frame ranges"
        )
    if not runs and not empty_ok:
        raise ShardFormatError(
            f"{where}: footer lists {FEATURE_RAW_FRAMES!r} but 'raw_frames' names no frame; a shard without raw "
            "frames does not list the feature"
        )
    mask = np.zeros(frames, dtype=bool)
    prev_end = -1
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in run)
        ):
            raise ShardFormatError(f"{where}: {key!r} entry {shown(run)}: expected [first, end] (two ints)")
        first, end = run
        if not prev_end < first < end <= frames:
            raise ShardFormatError(
                f"{where}: {key!r} run {shown(run)}: expected runs in increasing order, non-empty, not overlapping "
                f"or touching the previous one (which ends at {max(prev_end, 0)}), within the {frames} frames"
            )
        mask[first:end] = True
        prev_end = end
    if mask.any() and key == "raw_frames":
        bad = np.flatnonzero(mask & (table["stored"] != table["raw"]))
        if len(bad):
            fi = int(bad[0])
            raise ShardFormatError(
                f"{where}: frame {fi} is stored raw ('raw_frames') but its table row says {int(table['stored'][fi])} "
                f"stored bytes and {int(table['raw'][fi])} raw bytes; a raw frame's two lengths are equal"
            )
    return mask


def raw_frames_runs(mask: list[bool] | np.ndarray) -> list[list[int]]:
    """The ``raw_frames`` runs (``[first, end]`` pairs) of a per-frame bool mask."""
    runs: list[list[int]] = []
    for fi, raw in enumerate(mask):
        if raw:
            if runs and runs[-1][1] == fi:
                runs[-1][1] = fi + 1
            else:
                runs.append([fi, fi + 1])
    return runs


def _check_record_map(
    record_map: np.ndarray, table: np.ndarray, where: str, columnar_mask: np.ndarray | None = None
) -> None:
    """Each frame's records must tile its decoded bytes [0, raw) in order, every frame used
    (a column block's records tile ``[0, sum of their raw bytes)`` instead, format 1.3)."""
    if not len(record_map):
        if len(table):
            raise ShardFormatError(f"{where}: {len(table)} frames but no records")
        return
    frame = record_map["frame"]
    raw_offset = record_map["raw_offset"]
    raw = record_map["raw"]
    bad = (
        int(frame[0]) != 0
        or int(frame[-1]) != len(table) - 1
        or int(raw.max()) > MAX_FIELD
        or int(raw_offset.max()) > MAX_FIELD
        or np.any(np.diff(frame.astype(np.int64)) < 0)
        or np.any(np.diff(frame.astype(np.int64)) > 1)
    )
    if not bad:
        starts = np.ones(len(record_map), dtype=bool)
        starts[1:] = frame[1:] != frame[:-1]
        expected_offset = np.zeros(len(record_map), dtype=np.uint64)
        expected_offset[1:] = np.where(starts[1:], 0, raw_offset[:-1] + raw[:-1])
        sums = np.zeros(len(table), dtype=np.uint64)
        np.add.at(sums, frame.astype(np.int64), raw)
        plain = slice(None) if columnar_mask is None else ~columnar_mask
        bad = not np.array_equal(raw_offset, expected_offset) or not np.array_equal(sums[plain], table["raw"][plain])
    if bad:
        raise ShardFormatError(
            f"{where}: record map is inconsistent: records must tile each frame's decoded bytes in order"
        )
    if columnar_mask is not None and columnar_mask.any():
        # A column block's records rebuild to at most COLUMNAR_EXPANSION x the block (5.3, 6.1).
        blocks = np.flatnonzero(columnar_mask)
        over = sums[blocks] > table["raw"][blocks].astype(np.uint64) * np.uint64(COLUMNAR_EXPANSION)
        if over.any():
            fi = int(blocks[np.flatnonzero(over)[0]])
            raise ShardFormatError(
                f"{where}: frame {fi} is a column block of {int(table['raw'][fi])} bytes whose records rebuild to "
                f"{int(sums[fi])} bytes (record map), more than {COLUMNAR_EXPANSION} x its length"
            )


# --------------------------------------------------------------------------- index schema


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the index describes it. Sizes are bytes."""

    name: str
    records: int
    first_record: int
    file_bytes: int
    stored_bytes: int
    raw_bytes: int
    checksum: int  # xxh3_64 of the whole shard file

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "records": self.records,
            "first_record": self.first_record,
            "file_bytes": self.file_bytes,
            "stored_bytes": self.stored_bytes,
            "raw_bytes": self.raw_bytes,
            "checksum": f"{ALGORITHM}:{self.checksum:016x}",
        }


@dataclass(frozen=True)
class IndexInfo:
    """A validated ``index.json``."""

    version: tuple[int, int]
    features: tuple[str, ...]
    codec: dict[str, Any]
    shards: tuple[ShardEntry, ...]
    records: int
    stored_bytes: int
    raw_bytes: int
    file_bytes: int
    metadata: dict[str, Any]
    created_by: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": list(self.version),
            "features": list(self.features),
            "codec": self.codec,
            "checksum": ALGORITHM,
            "totals": {
                "records": self.records,
                "shards": len(self.shards),
                "stored_bytes": self.stored_bytes,
                "raw_bytes": self.raw_bytes,
                "file_bytes": self.file_bytes,
            },
            "shards": [s.to_json() for s in self.shards],
            "metadata": self.metadata,
            "created_by": self.created_by,
        }

    @classmethod
    def build(
        cls,
        codec: dict[str, Any],
        shards: list[ShardEntry],
        metadata: dict[str, Any],
        created_by: dict[str, Any],
        features: tuple[str, ...] = (),
    ) -> IndexInfo:
        features = tuple(sorted(set(features)))
        return cls(
            version=version_for(features),
            features=features,
            codec=dict(codec),
            shards=tuple(shards),
            records=sum(s.records for s in shards),
            stored_bytes=sum(s.stored_bytes for s in shards),
            raw_bytes=sum(s.raw_bytes for s in shards),
            file_bytes=sum(s.file_bytes for s in shards),
            metadata=metadata,
            created_by=created_by,
        )


@dataclass(frozen=True)
class StoreInfo:
    """A store's summary, as ``StoreReader.info()`` and ``write_store`` return it.

    Attributes:
        location: Where the store is (a directory path).
        format_version: ``(major, minor)``.
        codec: The codec config, e.g. ``{"id": "zstd", "level": 3}``.
        records: Number of records.
        shards: Number of shards.
        raw_bytes: Sum of the records' torch.save buffer sizes.
        stored_bytes: Sum of the stored frame sizes.
        file_bytes: Sum of the shard file sizes (headers and footers included); the index
            file is not counted.
        metadata: The user metadata.
        created_by: Library and torch versions of the writer.
    """

    location: str
    format_version: tuple[int, int]
    codec: dict[str, Any]
    records: int
    shards: int
    raw_bytes: int
    stored_bytes: int
    file_bytes: int
    metadata: dict[str, Any]
    created_by: dict[str, Any]

    @property
    def ratio(self) -> float:
        """raw_bytes / file_bytes (higher is better); 0.0 for an empty store."""
        return self.raw_bytes / self.file_bytes if self.file_bytes else 0.0

    @classmethod
    def from_index(cls, location: str, index: IndexInfo) -> StoreInfo:
        return cls(
            location=location,
            format_version=index.version,
            codec=dict(index.codec),
            records=index.records,
            shards=len(index.shards),
            raw_bytes=index.raw_bytes,
            stored_bytes=index.stored_bytes,
            file_bytes=index.file_bytes,
            metadata=index.metadata,
            created_by=index.created_by,
        )


def _int_field(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FIELD:
        raise IndexFormatError(f"{where}: expected '{key}' to be an int in [0, 2**62], found {shown(value)}")
    return value


def _check_version_and_features(obj: dict[str, Any], where: str) -> tuple[tuple[int, int], tuple[str, ...]]:
    version = obj.get("format_version")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in version)
    ):
        raise IndexFormatError(f"{where}: expected 'format_version' as [major, minor], found {shown(version)}")
    major, minor = version
    if major != FORMAT_VERSION[0]:
        raise UnsupportedFormatError(
            f"{where}: format version {major}.{minor} is not supported; this tensorstore_pt reads "
            f"{FORMAT_VERSION[0]}.x (upgrade tensorstore_pt to read newer stores)"
        )
    features = obj.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise IndexFormatError(f"{where}: expected 'features' to be a list of strings, found {shown(features)}")
    unknown = sorted(set(features) - KNOWN_FEATURES)
    if unknown:
        raise UnsupportedFormatError(
            f"{where}: format {major}.{minor} uses feature(s) {unknown} that this tensorstore_pt does "
            "not know (upgrade tensorstore_pt)"
        )
    needed = version_for(features)
    if (major, minor) < needed:
        # A version older than its features (docs/format.md, section 7): a reader of that
        # version would not know them. A damaged or hostile object, never a writer's.
        raise IndexFormatError(
            f"{where}: 'format_version' is [{major}, {minor}], but features {sorted(features)} need at least "
            f"[{needed[0]}, {needed[1]}]"
        )
    return (major, minor), tuple(features)


def parse_index(raw: bytes, where: str) -> IndexInfo:
    """Parse and validate ``index.json`` bytes against the v1 schema.

    Every field is type- and range-checked, shard names are checked to be plain file names,
    and the per-shard record counts, first records and totals must agree, before anything is
    allocated from these numbers or any shard file is opened.

    Raises:
        IndexFormatError: Not JSON, or breaks the schema.
        UnsupportedFormatError: A newer major version, unknown feature or unknown codec.
    """
    if len(raw) > MAX_INDEX_BYTES:
        raise IndexFormatError(f"{where}: expected at most {MAX_INDEX_BYTES} bytes of index, found {len(raw)}")
    try:
        obj = strict_json_loads(raw)
    except ValueError as exc:
        raise IndexFormatError(f"{where}: index is not valid UTF-8 JSON ({exc})") from exc
    except RecursionError as exc:
        raise IndexFormatError(f"{where}: index JSON is nested too deeply to parse") from exc
    if not isinstance(obj, dict):
        raise IndexFormatError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if obj.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{where}: expected 'format': {FORMAT_NAME!r}, found {shown(obj.get('format'))}")
    version, features = _check_version_and_features(obj, where)
    if obj.get("checksum") != ALGORITHM:
        raise UnsupportedFormatError(f"{where}: expected 'checksum': {ALGORITHM!r}, found {shown(obj.get('checksum'))}")
    codec = obj.get("codec")
    if not isinstance(codec, dict):
        raise IndexFormatError(f"{where}: expected 'codec' to be an object, found {shown(codec)}")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise IndexFormatError(f"{where}: expected 'metadata' to be an object, found {type(metadata).__name__}")
    created_by = obj.get("created_by", {})
    if not isinstance(created_by, dict):
        raise IndexFormatError(f"{where}: expected 'created_by' to be an object, found {type(created_by).__name__}")
    shards_raw = obj.get("shards")
    if not isinstance(shards_raw, list):
        raise IndexFormatError(f"{where}: expected 'shards' to be a list, found {type(shards_raw).__name__}")
    shards: list[ShardEntry] = []
    seen: set[str] = set()
    next_first = 0
    for i, s in enumerate(shards_raw):
        sw = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise IndexFormatError(f"{sw}: expected an object, found {type(s).__name__}")
        name = check_shard_name(s.get("name"), sw)
        if name == INDEX_NAME or name in seen:
            raise IndexFormatError(f"{sw}: shard name {name!r} is used twice or clashes with {INDEX_NAME!r}")
        seen.add(name)
        entry = ShardEntry(
            name=name,
            records=_int_field(s, "records", sw),
            first_record=_int_field(s, "first_record", sw),
            file_bytes=_int_field(s, "file_bytes", sw),
            stored_bytes=_int_field(s, "stored_bytes", sw),
            raw_bytes=_int_field(s, "raw_bytes", sw),
            checksum=parse_digest(s.get("checksum"), f"{sw}.checksum"),
        )
        if entry.records == 0:
            raise IndexFormatError(f"{sw}: shard {name!r} has 0 records; the format has no empty shards")
        if entry.first_record != next_first:
            raise IndexFormatError(
                f"{sw}: shard {name!r} says first_record {entry.first_record}, expected {next_first} "
                "(the sum of the record counts before it)"
            )
        # With multi-record frames a shard may have one frame (32 bytes) and a 24-byte map row a
        # record; with columnar frames the map may be coded (format 1.3: MAP_RATIO).
        per_record = RECORD_MAP_ENTRY_BYTES if FEATURE_MULTI_RECORD_FRAMES in features else RECORD_ENTRY_BYTES
        tables = entry.records * per_record
        if FEATURE_COLUMNAR_FRAMES in features:
            tables = max(0, tables - MAP_SLACK_BYTES) // MAP_RATIO
        min_file = HEADER_BYTES + entry.stored_bytes + tables + TRAILER_BYTES
        if entry.file_bytes < min_file:
            raise IndexFormatError(
                f"{sw}: shard {name!r} says file_bytes {entry.file_bytes}, but {entry.records} records of "
                f"{entry.stored_bytes} stored bytes need at least {min_file} bytes"
            )
        next_first += entry.records
        shards.append(entry)
    totals = obj.get("totals")
    if not isinstance(totals, dict):
        raise IndexFormatError(f"{where}: expected 'totals' to be an object, found {shown(totals)}")
    info = IndexInfo(
        version=version,
        features=features,
        codec=codec,
        shards=tuple(shards),
        records=_int_field(totals, "records", f"{where}: totals"),
        stored_bytes=_int_field(totals, "stored_bytes", f"{where}: totals"),
        raw_bytes=_int_field(totals, "raw_bytes", f"{where}: totals"),
        file_bytes=_int_field(totals, "file_bytes", f"{where}: totals"),
        metadata=metadata,
        created_by=created_by,
    )
    expected = {
        "records": next_first,
        "stored_bytes": sum(s.stored_bytes for s in shards),
        "raw_bytes": sum(s.raw_bytes for s in shards),
        "file_bytes": sum(s.file_bytes for s in shards),
        "shards": len(shards),
    }
    for key, value in expected.items():
        if totals.get(key) != value:
            raise IndexFormatError(
                f"{where}: totals.{key} is {shown(totals.get(key))}, but the shard entries add up to {value}"
            )
    return info
