"""recover_store(): rebuild a store from what checksums prove; never make it worse.

``recover_store`` (``tspt recover``) rebuilds ``index.json`` after a crash, a lost or damaged
index, or damaged shards. Its guarantee, tested by property over every damage kind:

- **It never makes a store worse.** After recover (default options) at least as many records
  are readable as before, and every record a shard still proves (its frame's xxh3_64 in an
  intact footer; for a shard whose footer is lost, its frames decode and every zip entry of
  the ``torch.save`` record matches its CRC-32) is in the recovered store. Nothing is deleted:
  a file that is not kept is renamed ``NAME.quarantined``. Memory: a frame of a shard whose
  footer is lost is decoded only up to ``DEFAULT_MAX_RECORD_BYTES`` (1 GiB, what a reader
  decodes by default); one that decodes further proves nothing, whatever the index claims.
- **It never invents or mixes.** The recovered records are, in order, a subsequence of the
  records that were written, each bit-identical; no record twice; no shard of another version.

How it decides:

- **The index is evidence, not truth.** Shard footers (checksummed) give each shard's codec,
  first record, record count and features; where the index disagrees, the footers win. The
  index gives the shard names it committed (so their writers' tokens), the user metadata,
  and what is needed to rebuild a shard whose footer is lost (its first record and sizes).
- **Which unreferenced shards may join.** With a valid index: shards of a writer whose
  token the index names, and shards of a writer that died holding the lock (the lock file
  still names its token, see :meth:`Storage.lock`), when they continue the record sequence
  exactly. Leftovers of a failed writer, copies made by a recover that died, and shards of
  an older version are quarantined. Without a usable index every complete shard is a
  candidate; versions cannot then be told apart, so the longest record sequence is kept.
- **Damaged records are dropped, the rest kept.** A shard with damaged frames keeps its
  other records; so does a shard whose footer is lost (rebuilt from its frames: zstd and lz4
  frames delimit themselves; ``none`` records and the records of raw frames (format 1.2)
  are zip archives, which do; where it starts is the index's entry or, with the index lost,
  the end of its writer's previous shard). A file that proves exactly another file's
  records (a copy) is quarantined as its duplicate. The format has no
  holes, so the records after a lost one move down: such shards are copied (frames
  unchanged, checksums kept) into new shards of this recover's own token, and the report
  says, per shard file, which records (in the old numbering) were kept and which were lost,
  and names with a ``"missing"`` row the records of the kept sequence no file proves.

Crash safety: recover holds the store's lock for its whole run. It writes the copied shards
and a copy of the old index first, then renames complete temporary shards into place,
commits the new index (the single commit point), and only then quarantines what the new
index does not reference. Killed at any point, running it again finishes the job. On a
full disk it removes what it wrote and raises :class:`StorageFullError` saying how many
bytes it needs; the store is unchanged.

Thread/fork safety: no global state; one recover (or writer) at a time per store.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _ptzip, _version
from ._zipwalk import check_zip, find_zip_end
from .checksums import digest_int
from .codecs import Codec, get_codec
from .columnar import MAGIC as COLUMN_MAGIC
from .columnar import ColumnBlock
from .errors import (
    ConcurrentWriteError,
    CorruptStoreError,
    DecompressionError,
    IndexFormatError,
    MergeStateError,
    NotARegularFileError,
    NotAStoreError,
    ReadOnlyStoreError,
    StorageFullError,
    StoreBusyError,
    TensorStoreError,
    UnsupportedFormatError,
)
from .format import (
    FEATURE_COLUMNAR_FRAMES,
    FEATURE_DICTIONARY,
    FORMAT_VERSION,
    FEATURE_MULTI_RECORD_FRAMES,
    FEATURE_RAW_FRAMES,
    HEADER_BYTES,
    INDEX_NAME,
    MAX_INDEX_BYTES,
    SHARD_SUFFIX,
    IndexInfo,
    ShardEntry,
    check_shard_name,
    decode_header,
    encode_index,
    footer_meta,
    new_writer_token,
    parse_index,
    parse_shard_name,
    shard_name,
    strict_json_loads,
)
from .integrity import QUARANTINE_SUFFIX, _bounds_codec, _parse_temp, _storage_checked, _store_loader
from .shardio import (
    DEFAULT_MAX_RECORD_BYTES,
    ShardBuilder,
    check_frame,
    header_version_ok,
    check_index_sizes,
    file_digest,
    frame_records,
    open_footer,
    read_exact,
    record_slices,
)
from .storage import Storage, if_match_kwargs, storage_for, typed_full_disk
from .storage.local import _pid_alive
from .writer import DEFAULT_MAX_SHARD_BYTES, _created_by, lock_owner

__all__ = ["KeptShard", "QuarantinedFile", "RecoverReport", "ShardOutcome", "recover_store"]


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class KeptShard:
    """A shard in the recovered index.

    Attributes:
        name: Its file name.
        first_record: Its first record's position in the recovered store.
        records: How many records it holds.
        how: ``"indexed"`` (in the old index, kept as is), ``"adopted"`` (a complete shard the
            old index did not list, kept as is), ``"renamed"`` (a complete temporary file
            renamed into place) or ``"copied"`` (a new shard holding the proven frames of
            ``source``, renumbered).
        source: The file its records come from (for ``"renamed"`` the temporary file).
    """

    name: str
    first_record: int
    records: int
    how: str
    source: str


@dataclass(frozen=True)
class QuarantinedFile:
    """A file :func:`recover_store` moved aside (renamed, never deleted).

    Attributes:
        name: Its name before.
        new_name: Its name now (``name`` if ``dry_run``).
        reason: Why it is not part of the recovered store as it is.
        records: Records it holds if known, else None.
    """

    name: str
    new_name: str
    reason: str
    records: int | None = None


@dataclass(frozen=True)
class ShardOutcome:
    """What recover did with one shard file (the per-shard table of ``tspt recover``).

    Attributes:
        name: The file as found.
        action: ``"kept"`` (as is), ``"renamed"``, ``"copied"`` (its proven records copied into
            new shards, renumbered; the file is quarantined) or ``"quarantined"`` (nothing
            kept from it).
        first_record: Its first record in the old numbering, if known.
        records: Records it held (per its footer, or the index for a lost footer), if known.
        kept: Records kept from it.
        lost: Half-open ranges of records (old numbering) it held that could not be proven.
        reason: Why, in a sentence (empty for a shard kept as is).
    """

    name: str
    action: str
    first_record: int | None
    records: int | None
    kept: int
    lost: tuple[tuple[int, int], ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lost"] = [list(r) for r in self.lost]
        return d


@dataclass(frozen=True)
class RecoverReport:
    """The result of :func:`recover_store`.

    Attributes:
        location: The store.
        index_before: ``"valid"``, ``"damaged"`` or ``"missing"``.
        records: Records in the recovered store.
        kept: The shards of the recovered store, in record order.
        quarantined: Files moved aside.
        metadata: Where the user metadata came from: ``"index"`` (the old valid index),
            ``"temporary index"``, ``"damaged index"``, or ``"lost"`` (the recovered index has
            empty metadata).
        index_written: Whether a new ``index.json`` was written (False when the old one was
            already right, or with ``dry_run``).
        dry_run: True if nothing was changed on disk.
        index_backup: Where a copy of the replaced index was kept, else None.
        notes: Further facts in plain sentences.
        shards: Per shard file found, what was done and which records were kept and lost.
        records_lost: Records the shards held (by their footers or the index) that could not
            be proven and are not in the recovered store.
        records_unknown: Shard files that held records recover could not count (a footer lost,
            and no index entry for it): their records from the first one not proven on are not
            in the recovered store, and are not in ``records_lost``; the quarantined files keep
            their bytes.
    """

    location: str
    index_before: str
    records: int
    kept: tuple[KeptShard, ...]
    quarantined: tuple[QuarantinedFile, ...]
    metadata: str
    index_written: bool
    dry_run: bool
    index_backup: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    shards: tuple[ShardOutcome, ...] = field(default_factory=tuple)
    records_lost: int = 0
    records_unknown: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the store would change (or changed): a new index, renames, copies or quarantines."""
        return self.index_written or bool(self.quarantined) or any(k.how in ("renamed", "copied") for k in self.kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "index_before": self.index_before,
            "records": self.records,
            "records_lost": self.records_lost,
            "records_unknown": list(self.records_unknown),
            "kept": [asdict(k) for k in self.kept],
            "quarantined": [asdict(q) for q in self.quarantined],
            "shards": [s.to_json() for s in self.shards],
            "metadata": self.metadata,
            "index_written": self.index_written,
            "index_backup": self.index_backup,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- evidence


@dataclass
class _Evidence:
    """What an index (valid, damaged but parseable, or none) says."""

    valid: bool = False
    names: list[str] = field(default_factory=list)  # shard names, in the index's order
    entries: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> its int fields
    codec: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    created_by: dict[str, Any] | None = None
    raw: bytes = b""
    newer: UnsupportedFormatError | None = None  # the index names what this version does not know
    present: bool = False  # an index.json was there (valid or not)
    version: str | None = None  # its backend version (an S3 ETag), for the conditional replace
    features: tuple[str, ...] | None = None  # the features it lists (None: unknown)


def _ints(obj: dict[str, Any]) -> dict[str, int]:
    keys = ("records", "first_record", "file_bytes", "stored_bytes", "raw_bytes")
    return {k: v for k in keys if isinstance(v := obj.get(k), int) and not isinstance(v, bool) and 0 <= v <= 2**62}


def _read_evidence(storage: Storage, notes: list[str]) -> tuple[str, _Evidence]:
    """(index_before, evidence) from ``index.json``.

    An index that names a format version, feature or codec this version does not know is
    kept as ``ev.newer``: it is a newer writer's store (left untouched) only if the shards'
    footers say so too; otherwise it is a damaged index (see :func:`_recover_locked`).
    """
    where = f"store {storage.location!r}"
    try:
        raw, version = storage.read_versioned(INDEX_NAME, max_bytes=MAX_INDEX_BYTES)
    except FileNotFoundError:
        return "missing", _Evidence()
    except (ValueError, NotARegularFileError) as exc:
        notes.append(f"{INDEX_NAME} is unusable ({exc})")
        return "damaged", _Evidence(present=True)
    ev = _Evidence(raw=raw, present=True, version=version)
    try:
        index = parse_index(raw, f"{where}: {INDEX_NAME}")
        check_index_sizes(index, _bounds_codec(index.codec), f"{where}: {INDEX_NAME}")
    except (IndexFormatError, UnsupportedFormatError) as exc:
        try:
            obj = strict_json_loads(raw)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(exc, UnsupportedFormatError):
            version = obj.get("format_version") if isinstance(obj, dict) else None
            if not (isinstance(version, list) and version[:1] == [FORMAT_VERSION[0]]):
                raise exc  # another major version may change anything: never guessed at
            # A newer minor version names its features in the shard footers too (format.md
            # section 7): whether this is one or a damaged index, the footers decide.
            ev.newer = exc
        notes.append(f"{INDEX_NAME} is damaged ({exc}); it is used as evidence only, the shards' footers decide")
        if not isinstance(obj, dict):
            return "damaged", ev
        features = obj.get("features")
        if isinstance(features, list) and all(isinstance(f, str) for f in features):
            ev.features = tuple(features)
        for s in obj.get("shards", []) if isinstance(obj.get("shards"), list) else []:
            if isinstance(s, dict):
                try:
                    name = check_shard_name(s.get("name"), INDEX_NAME)
                except IndexFormatError:
                    continue
                if name not in ev.entries:
                    ev.names.append(name)
                    ev.entries[name] = _ints(s)
        ev.codec = obj["codec"] if isinstance(obj.get("codec"), dict) else None
        ev.metadata = dict(obj["metadata"]) if isinstance(obj.get("metadata"), dict) else None
        ev.created_by = dict(obj["created_by"]) if isinstance(obj.get("created_by"), dict) else None
        return "damaged", ev
    ev.valid = True
    ev.names = [s.name for s in index.shards]
    ev.entries = {s.name: _ints(s.to_json()) for s in index.shards}
    ev.codec, ev.metadata, ev.created_by = dict(index.codec), dict(index.metadata), dict(index.created_by)
    ev.features = index.features
    ev.index = index  # type: ignore[attr-defined]
    return "valid", ev


# --------------------------------------------------------------------------- shard scans


@dataclass
class _Frame:
    offset: int  # in the source file
    stored: int
    checksum: int
    raw_lengths: list[int]
    first: int  # shard-relative position of its first record
    raw: bool = False  # stored raw (format 1.2, "raw-frames")
    source: str | None = None  # the file it is read from, if not its piece's own (a copy's)
    block: int | None = None  # decodes to a column block of this many bytes (format 1.3, "columnar-frames")


@dataclass
class _Piece:
    """A shard file read on its own terms: which of its records it proves."""

    name: str  # the file's current name
    final: str  # its name in the store (differs for a temporary file)
    first_record: int | None = None
    records: int | None = None
    codec: dict[str, Any] | None = None
    features: tuple[str, ...] = ()
    frames: list[_Frame] = field(default_factory=list)
    intact: bool = False  # kept as is if it also lands at its own first_record
    newer: bool = False  # its header or footer is of a version or feature this one does not know
    entry: ShardEntry | None = None
    footer_lost: bool = False
    reason: str = ""
    layout: Any = None  # the footer's columnar_layout (format 1.3), when it lists "columnar-frames"
    file_bytes: int = 0
    open_end: bool = False  # rebuilt without an index: records after its last proven frame unknown
    wanted: list[_Frame] = field(default_factory=list)  # damaged frames, as its intact footer names them

    @property
    def token(self) -> str | None:
        parsed = parse_shard_name(self.final)
        return parsed[0] if parsed else None

    @property
    def seq(self) -> int | None:
        parsed = parse_shard_name(self.final)
        return parsed[1] if parsed else None

    @property
    def good(self) -> int:
        return sum(len(f.raw_lengths) for f in self.frames)

    @property
    def end(self) -> int:
        return (self.first_record or 0) + (self.records if self.records is not None else self.good)

    def lost(self) -> tuple[tuple[int, int], ...]:
        """Ranges (old numbering) of the records it held that it does not prove."""
        if self.first_record is None or self.records is None:
            return ()
        out: list[tuple[int, int]] = []
        pos = 0
        for f in self.frames:
            if f.first > pos:
                out.append((self.first_record + pos, self.first_record + f.first))
            pos = f.first + len(f.raw_lengths)
        if self.records > pos:
            out.append((self.first_record + pos, self.first_record + self.records))
        return tuple(out)


class _Scanner:
    """Reads shard files, caching codecs by config (a dictionary file is loaded once)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.codecs: dict[str, Codec | None] = {}
        self.errors: dict[str, str] = {}  # why a codec config cannot be used

    def codec(self, config: Any) -> Codec | None:
        key = json.dumps(config, sort_keys=True)
        if key not in self.codecs:
            try:
                self.codecs[key] = get_codec(config, _store_loader(self.storage))
            except (TensorStoreError, FileNotFoundError, TypeError, AttributeError) as exc:
                self.codecs[key] = None
                self.errors[key] = str(exc)
        return self.codecs[key]

    def scan(self, name: str, final: str) -> _Piece:
        piece = _Piece(name, final)
        where = f"store {self.storage.location!r}, file {name!r}"
        try:
            handle = self.storage.open(name)
        except FileNotFoundError:
            piece.reason = "the file vanished while recover ran"
            return piece
        except NotARegularFileError as exc:
            piece.reason = str(exc)
            return piece
        except PermissionError as exc:
            # Unreadable is not unproven: quarantining it would drop records that are fine.
            raise PermissionError(
                exc.errno,
                f"{where}: recover cannot read it ({exc.strerror}); nothing was changed: make it readable "
                "(or move it out of the store) and run `tspt recover` again",
            ) from exc
        try:
            size = piece.file_bytes = handle.size()
            header = handle.read_range(0, HEADER_BYTES)
            header_problem = ""
            try:
                version = decode_header(header, where)
                if header[12:16] != b"\0\0\0\0":
                    header_problem = "its header flags are not 0"
            except (CorruptStoreError, UnsupportedFormatError) as exc:
                version, header_problem = None, str(exc)
            try:
                footer = open_footer(handle, size, where)
            except (CorruptStoreError, UnsupportedFormatError) as exc:
                # A footer whose checksum holds but whose JSON names a newer version or an
                # unknown feature was written by a newer tensorstore_pt, not damaged.
                piece.newer = isinstance(exc, UnsupportedFormatError) or isinstance(
                    exc.__cause__, UnsupportedFormatError
                )
                piece.footer_lost = True
                piece.reason = f"its footer is lost ({exc})"
                return piece
            meta = footer.meta
            first = meta.get("first_record")
            if isinstance(first, bool) or not isinstance(first, int) or first < 0 or footer.records == 0:
                piece.footer_lost = True
                piece.reason = f"its footer has no valid first_record or no records ({first!r}, {footer.records})"
                return piece
            piece.first_record, piece.records = first, footer.records
            piece.codec = meta.get("codec")
            piece.features = tuple(sorted(meta.get("features", [])))
            codec = self.codec(piece.codec)
            if codec is None:
                piece.reason = f"its footer's codec {piece.codec} cannot be used"
                return piece
            if version is not None and not header_version_ok(version, meta):
                header_problem = f"its header says format {version}, its footer {meta.get('format_version')}"
            bad: list[str] = []
            for fi, (a, b) in enumerate(frame_records(footer)):
                row = footer.table[fi]
                try:
                    frame = read_exact(handle, int(row["offset"]), int(row["stored"]), f"frame {fi}", where)
                    # The checksum proves a frame; it is also decoded where a reader would decode it.
                    small = int(row["raw"]) <= DEFAULT_MAX_RECORD_BYTES
                    data = check_frame(
                        codec if small else None, row, frame, f"{where}, frame {fi}", stored_raw=footer.is_raw(fi)
                    )
                    if footer.is_columnar(fi):  # checked as a reader checks it before use (format 1.3)
                        if data is not None:
                            block = ColumnBlock(data, footer.layout, b - a, f"{where}, frame {fi}")
                            for r, (_, n) in enumerate(record_slices(footer, a, b)):
                                block.check_length(r, n)  # each record: its metadata and rebuilt length
                        piece.layout = footer.layout
                except TensorStoreError as exc:
                    bad.append(str(exc))
                    if footer.is_columnar(fi):
                        piece.layout = footer.layout
                    piece.wanted.append(
                        _Frame(int(row["offset"]), int(row["stored"]), int(row["checksum"]),
                               [n for _, n in record_slices(footer, a, b)], a, footer.is_raw(fi),
                               block=int(row["raw"]) if footer.is_columnar(fi) else None)
                    )  # fmt: skip
                    continue
                lengths = [n for _, n in record_slices(footer, a, b)]
                piece.frames.append(
                    _Frame(int(row["offset"]), int(row["stored"]), int(row["checksum"]), lengths, a, footer.is_raw(fi),
                           block=int(row["raw"]) if footer.is_columnar(fi) else None)
                )  # fmt: skip
            piece.intact = not bad and not header_problem
            if piece.intact:
                piece.entry = ShardEntry(
                    name=final,
                    records=footer.records,
                    first_record=first,
                    file_bytes=size,
                    stored_bytes=int(footer.table["stored"].sum()),
                    raw_bytes=int(
                        footer.table["raw"].sum() if footer.record_map is None else footer.record_map["raw"].sum()
                    ),
                    checksum=file_digest(handle, size),
                )
            else:
                piece.reason = "; ".join(([header_problem] if header_problem else []) + bad[:3]) + (
                    f" (and {len(bad) - 3} more damaged frames)" if len(bad) > 3 else ""
                )
            return piece
        finally:
            handle.close()

    def rebuild(
        self,
        piece: _Piece,
        evidence: dict[str, int],
        codec_config: dict[str, Any],
        raw_frames: bool = True,
        columnar: bool = False,
    ) -> None:
        """Find the frames of a shard whose footer is lost, from byte 16, with the index's
        knowledge of the shard (first record, record count, stored and raw bytes); with
        ``raw_frames``, frames stored raw (format 1.2) too.

        A frame is proven where its records are: the frames before the first damaged (or
        unprovable) stretch keep the numbers the walk gives them. After a stretch, the number
        of records it held is unknown: the frames after the last stretch are counted back from
        the shard's end (``records`` in ``evidence``) where the walk provably ends where the
        shard's frames end, and frames between two stretches are never kept
        (:meth:`_place`). Frames it cannot place are not kept (their records are reported
        lost; the file is quarantined, its bytes kept).

        In a shard that may hold column blocks (format 1.3: ``columnar``, or a block found on
        the walk), only the frames before the first stretch are kept: a column block holds no
        zip container to prove it by, and a block stored raw holds its storages verbatim, where
        a tensor's bytes may well be a torch.save archive that was never a record.
        """
        codec = self.codec(codec_config)
        if codec is None or "first_record" not in evidence:
            piece.reason += "; it cannot be rebuilt (no usable codec or index entry)"
            return
        piece.first_record = evidence["first_record"]
        piece.records = evidence.get("records")
        piece.codec = codec_config
        try:
            handle = self.storage.open(piece.name)
        except (FileNotFoundError, NotARegularFileError):
            return
        try:
            size = handle.size()
            end = min(size, HEADER_BYTES + evidence["stored_bytes"]) if "stored_bytes" in evidence else size
            region = handle.read_range(HEADER_BYTES, max(0, end - HEADER_BYTES))
        finally:
            handle.close()
        raw_left = evidence.get("raw_bytes", codec.max_raw_bytes(len(region)))
        magic = _FRAME_MAGIC.get(codec.codec_id, _ZIP_MAGIC)
        # A frame stored raw (format 1.2) is its records' torch.save archives, with no codec
        # header: found, and proven, by the zip structure and CRC-32s, as codec none frames are.
        raw_too = raw_frames and magic != _ZIP_MAGIC
        pos = rel = 0
        stretches: list[int] = []  # per damaged stretch, the index of the first frame after it
        in_gap = False
        gap_at = 0  # where the last stretch starts
        while pos < len(region):
            # A frame that decodes past DEFAULT_MAX_RECORD_BYTES is not decoded (as the intact
            # path does not decode it, and a reader refuses it): the index's raw_bytes (or the
            # codec's worst-case ratio) alone let 64 KiB of zstd blocks claim and decode to GiBs.
            budget = min(raw_left, DEFAULT_MAX_RECORD_BYTES)
            found = self._frame_at(codec, region, pos, budget)
            stored_raw = False
            if found is None and raw_too and region.startswith(_ZIP_MAGIC, pos):
                found = self._raw_frame_at(region, pos)
                stored_raw = found is not None
            if found is None:
                # A damaged or unprovable frame: resynchronise at the next frame magic (zstd and
                # lz4 frames, and zip archives, start with one). A stretch counts one record as
                # walked; the end of the walk decides which later frames can be placed.
                if not columnar and self._column_block_at(codec, region, pos, budget):
                    columnar = True
                if not in_gap:
                    rel += 1
                    stretches.append(len(piece.frames))
                    gap_at = pos
                in_gap = True
                nxt = region.find(magic, pos + 1)
                if raw_too:  # the next frame may be a raw one
                    nxt_raw = region.find(_ZIP_MAGIC, pos + 1)
                    if nxt_raw >= 0 and (nxt < 0 or nxt_raw < nxt):
                        nxt = nxt_raw
                if nxt < 0:
                    pos = len(region)
                    break
                pos = nxt
                continue
            n, raw, lengths = found
            in_gap = False
            piece.frames.append(
                _Frame(HEADER_BYTES + pos, n, digest_int(region[pos : pos + n]), lengths, rel, stored_raw)
            )
            rel += len(lengths)
            pos += n
            raw_left -= len(raw)
        # Whether the last frame found ends exactly where the shard's frames end: the index's
        # stored bytes are all there and the walk ended on a frame; or, without them, the walk
        # crossed into the record table, which starts right after the last frame.
        if "stored_bytes" in evidence:
            end_exact = not in_gap and len(region) == evidence["stored_bytes"]
        else:
            end_exact = (
                in_gap
                and bool(piece.frames)
                and gap_at == piece.frames[-1].offset + piece.frames[-1].stored - HEADER_BYTES
                and _table_starts(region, gap_at, piece.frames)
            )
            if end_exact:
                stretches.pop()  # the table, not a damaged frame
        unplaced = self._place(piece, stretches, end_exact, columnar)
        proven = sum(len(f.raw_lengths) for f in piece.frames)
        piece.reason += f"; rebuilt from its frames: {proven} record(s) proven by their zip CRC-32s"
        if unplaced:
            piece.reason += (
                f"; {unplaced} more record(s) in frames that prove them were not kept: the damaged stretches "
                "before them hid how many records came first"
            )
        if columnar and stretches:
            piece.reason += (
                " (column blocks of format 1.3, --compact, hold no zip containers, and the layout and record "
                "lengths that prove them were in the lost footer: nothing from the first block or damaged frame on "
                "can be proven without it)"
            )

    @staticmethod
    def _place(piece: _Piece, stretches: list[int], end_exact: bool, columnar: bool) -> int:
        """Keep the frames of a walk whose record numbers are certain (see :meth:`rebuild`) and
        set ``piece.records`` where the index did not give it; return the records proven by the
        frames dropped.

        ``stretches``: per damaged stretch, the index of the first frame after it; ``end_exact``:
        the last frame ends where the shard's frames end. Frames between two stretches are
        never kept: a stretch may hide any number of records, and a frame found inside a
        damaged record (a tensor that holds a torch.save archive) proves bytes that were never
        a record, so no count of stretches and records can place them."""
        frames = piece.frames
        count = [len(f.raw_lengths) for f in frames]
        proven = sum(count)
        if not stretches:
            if piece.records is None:
                piece.records = proven
            return 0
        first, last = stretches[0], stretches[-1]
        keep = frames[:first]
        if piece.records is None:
            # Nothing counts the records of the stretches: those after the head are unknown.
            piece.open_end = True
            piece.reason += "; how many records it held from its first damaged frame on is unknown (no index)"
            piece.records = sum(count[:first])
        elif end_exact and not columnar and piece.records - proven >= len(stretches):
            # The frames after the last stretch end the shard: counted back from its end. (A
            # frame found inside a damaged record is followed by the rest of that record, never
            # by the shard's end, so it is not among them.)
            tail = frames[last:]
            if tail:
                shift = piece.records - (tail[-1].first + len(tail[-1].raw_lengths))
                for f in tail:
                    f.first += shift
            keep = keep + tail
        piece.frames = keep
        return proven - sum(len(f.raw_lengths) for f in keep)

    @staticmethod
    def _column_block_at(codec: Codec, region: bytes, pos: int, raw_left: int) -> bool:
        """Whether a column block (format 1.3) starts at ``pos``: stored raw, or a frame of the
        codec that decodes to one."""
        if region.startswith(COLUMN_MAGIC, pos):
            return True
        try:
            got = codec.first_frame(memoryview(region)[pos:], raw_left)
        except DecompressionError:
            return False
        return got is not None and bytes(memoryview(got[1])[: len(COLUMN_MAGIC)]) == COLUMN_MAGIC

    @staticmethod
    def _frame_at(codec: Codec, region: bytes, pos: int, raw_left: int) -> tuple[int, bytes, list[int]] | None:
        """(stored length, decoded bytes, record lengths) of a proven frame at ``pos``, or None."""
        try:
            got = codec.first_frame(memoryview(region)[pos:], raw_left)
        except DecompressionError:
            return None
        if got is None:  # codec none: a frame is the record itself, a zip archive
            stop = find_zip_end(region, pos)
            if stop is None:
                return None
            got = (stop - pos, region[pos:stop])
        lengths = _split_records(got[1])
        return None if lengths is None else (got[0], got[1], lengths)

    @staticmethod
    def _raw_frame_at(region: bytes, pos: int) -> tuple[int, bytes, list[int]] | None:
        """(stored length, bytes, [length]) of one record stored raw at ``pos`` (a torch.save zip
        archive whose CRC-32s hold), or None. A raw frame of several records (multi-record
        frames) is found one record at a time; each becomes a raw frame of its own."""
        stop = find_zip_end(region, pos)
        if stop is None or not _proven_archive(memoryview(region)[pos:stop]):
            return None
        return stop - pos, region[pos:stop], [stop - pos]


def _fill_from_copies(chain: list[_Piece], pieces: list[_Piece]) -> None:
    """Give a kept shard's damaged frames back from another file that proves them: a frame at
    the same records whose xxh3_64, stored length, record lengths and raw flag are the ones the
    shard's own intact (checksummed) footer names is the frame its writer wrote (a copy of the
    shard taken before the damage, for example). The shard is then copied, that frame read
    from the other file."""
    found: dict[tuple[int, int, int, tuple[int, ...], bool, int | None], tuple[_Piece, _Frame]] = {}
    for q in pieces:
        if q.first_record is None:
            continue
        for f in q.frames:
            if f.source is None:
                key = (q.first_record + f.first, f.checksum, f.stored, tuple(f.raw_lengths), f.raw, f.block)
                found.setdefault(key, (q, f))
    for p in chain:
        if not p.wanted or p.first_record is None:
            continue
        for w in p.wanted:
            hit = found.get((p.first_record + w.first, w.checksum, w.stored, tuple(w.raw_lengths), w.raw, w.block))
            if hit is None or hit[0] is p:
                continue
            q, f = hit
            if f.block is not None and q.layout != p.layout:  # rebuilt with another layout: not the same records
                continue
            p.frames.append(
                _Frame(f.offset, f.stored, f.checksum, list(f.raw_lengths), w.first, f.raw, q.name, f.block)
            )
            p.reason += f"; its damaged frame at record {p.first_record + w.first} was taken from {q.name!r}"
        p.frames.sort(key=lambda f: f.first)


def _rebuild_by_neighbours(
    pieces: list[_Piece],
    ev: _Evidence,
    scanner: _Scanner,
    codec_config: dict[str, Any],
    raw_frames: bool,
    columnar: set[str | None],
) -> None:
    """Rebuild the shards whose footer is lost and that no index entry describes (the index is
    lost or damaged) from their frames, where the same writer's shard numbered one before has
    an intact footer: the lost shard starts where that one ends (a writer numbers its shards in
    record order, one after another), and ends where the writer's next shard starts, if that one
    is intact too (else at its last proven frame). ``columnar``: the writer tokens whose intact
    footers list column blocks (their shards are walked as :meth:`_Scanner.rebuild` walks
    shards with column blocks)."""
    own: dict[tuple[str, int], _Piece] = {}
    for p in pieces:
        if p.token is not None and p.seq is not None and p.first_record is not None and p.records:
            own[(p.token, p.seq)] = p
    for q in pieces:
        if not q.footer_lost or q.newer or q.final in ev.entries or q.token is None or q.seq is None:
            continue
        prev = own.get((q.token, q.seq - 1))
        nxt = own.get((q.token, q.seq + 1))
        if prev is None or prev.records is None or prev.first_record is None:
            if q.seq == 0 and nxt is not None and nxt.first_record is not None:
                _rebuild_first(q, nxt.first_record, scanner, codec_config, raw_frames, q.token in columnar)
            continue
        evidence = {"first_record": prev.first_record + prev.records}
        if nxt is not None and nxt.first_record is not None and nxt.first_record > evidence["first_record"]:
            evidence["records"] = nxt.first_record - evidence["first_record"]
        scanner.rebuild(q, evidence, codec_config, raw_frames, q.token in columnar)
        if "records" not in evidence and not q.open_end and not (q.frames and _table_follows(scanner.storage, q)):
            q.open_end = True
            q.reason += "; records after its last proven frame, if it held any, are unknown (no index)"


def _table_follows(storage: Storage, q: _Piece) -> bool:
    """Whether the record (or frame) table starts right after the last frame ``q``'s walk found:
    its first row names the first frame (offset 16, the same stored length), so the walk found
    every frame up to the table and the shard held exactly the records it proves."""
    if not q.frames:
        return False
    last = q.frames[-1]
    try:
        handle = storage.open(q.name)
    except (FileNotFoundError, NotARegularFileError):
        return False
    try:
        at = last.offset + last.stored
        row = handle.read_range(at, max(0, min(16, handle.size() - at)))
    finally:
        handle.close()
    return _table_starts(row, 0, q.frames)


def _table_starts(region: bytes, at: int, frames: list[_Frame]) -> bool:
    """Whether a shard's record (or frame) table starts at ``at`` of ``region`` (its bytes from
    byte 16): its first row names the first frame, at offset 16, with the stored length of the
    first frame found if that one is at offset 16. Only the bytes left are compared (a cut
    file may keep part of a row), 8 at least."""
    row = HEADER_BYTES.to_bytes(8, "little")
    if frames and frames[0].offset == HEADER_BYTES:
        row += frames[0].stored.to_bytes(8, "little")
    got = region[at : at + len(row)]
    return len(got) >= 8 and row.startswith(got)


def _rebuild_first(
    q: _Piece, end: int, scanner: _Scanner, codec_config: dict[str, Any], raw_frames: bool, columnar: bool = False
) -> None:
    """Rebuild a writer's first shard (seq 0) whose footer is lost from its frames, where the
    writer's second shard starts at ``end``: only if every frame found proves its records with
    no damaged stretch between them, so that it ends exactly at ``end`` (else nothing tells
    where it starts, and it stays unproven)."""
    scanner.rebuild(q, {"first_record": 0}, codec_config, raw_frames, columnar)
    clean = q.frames and not q.open_end and q.good == q.records and q.good <= end and _table_follows(scanner.storage, q)
    if clean and all(f.first == k for f, k in zip(q.frames, _starts(q.frames))):
        q.first_record = end - q.good
        return
    q.first_record, q.records, q.frames = None, None, []
    q.reason += "; where it starts is unknown (damaged frames, no index)"


def _starts(frames: list[_Frame]) -> list[int]:
    """The shard-relative first record of each of ``frames`` if they follow one another."""
    out, k = [], 0
    for f in frames:
        out.append(k)
        k += len(f.raw_lengths)
    return out


#: The first bytes of a frame: zstd's Magic_Number 0xFD2FB528 (RFC 8878) and LZ4's 0x184D2204
#: (LZ4 Frame Format), little-endian; ``none`` frames are zip archives (PKWARE local header).
_ZIP_MAGIC = b"PK\x03\x04"
_FRAME_MAGIC = {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x04\x22\x4d\x18", "none": _ZIP_MAGIC}


def _split_records(raw: bytes) -> list[int] | None:
    """Lengths of the consecutive torch.save zip archives that make up ``raw``, each proven
    (:func:`_proven_archive`); None if ``raw`` is not exactly such a sequence."""
    lengths = []
    pos = 0
    while pos < len(raw):
        stop = find_zip_end(raw, pos)
        if stop is None or not _proven_archive(memoryview(raw)[pos:stop]):
            return None
        lengths.append(stop - pos)
        pos = stop
    return lengths or None


def _proven_archive(buf: memoryview) -> bool:
    """Whether ``buf`` is a record's torch.save archive, byte for byte, with no footer checksum
    to prove it: its entries are stored and match their CRC-32s (:func:`._zipwalk.check_zip`),
    and it is exactly what torch.save writes for those entries (:func:`._ptzip.prove`: the
    container rebuilt from its parts is the same bytes). The CRC-32s alone leave entry names,
    headers, padding and the end records unchecked, and a damaged zstd or lz4 frame (they carry
    no content checksum here) may decode to a zip that is consistent but was never written."""
    return check_zip(buf) is None and _ptzip.prove(buf) is not None


# --------------------------------------------------------------------------- choosing


def _may_follow(prev: _Piece | None, q: _Piece, present: set[tuple[str, int]]) -> bool:
    """Whether ``q`` can be the next shard written after ``prev`` (by writer token and seq).

    A writer numbers its own shards 0, 1, 2...; a later writer starts its own at 0. So the
    next shard is a later one of the same writer (the numbers between are its own missing or
    damaged shards), or another writer's first when ``prev``'s writer wrote nothing after
    ``prev``. Legacy names (token "") are one global numbering over all writes, so there a
    number in between that is present belongs to another write and breaks the sequence.
    """
    if prev is None:
        return True
    pt, ps, qt, qs = prev.token, prev.seq, q.token, q.seq
    if pt is None or qt is None or ps is None or qs is None:
        return q.final > prev.final
    if pt == qt and pt:
        return qs > ps  # one writer's own shards: a gap is its missing or damaged shards
    if pt == qt:  # legacy names: numbers in between that are present belong to another write
        return qs > ps and not any((pt, x) in present for x in range(ps + 1, qs))
    if qt == "":
        return False  # a legacy shard never follows a shard with a writer token
    later = any(t == pt and s > ps for t, s in present)
    return qs == 0 and not later


def _chain(
    candidates: list[_Piece], committed: set[str], adoptable: Any, present: set[tuple[str, int]], seed: _Piece | None
) -> list[_Piece]:
    """Walk the candidates in record order, keeping what continues the sequence.

    A shard the index committed is taken wherever it starts at or after the current end (a
    gap is the records of a missing or unproven shard). Any other shard must be adoptable,
    follow the last kept shard by writer token and number (:func:`_may_follow`), and start
    exactly at the current end, or after a gap of its own writer's missing shards.
    """
    chain: list[_Piece] = [seed] if seed is not None else []
    end = seed.end if seed is not None else 0
    for q in candidates:
        if q is seed or q.first_record is None or q.first_record < end:
            continue
        last = chain[-1] if chain else None
        if q.final not in committed:
            if not adoptable(q) or not _may_follow(last, q, present):
                continue
            if q.first_record != end and (last is None or (last.token != q.token and not last.open_end)):
                # (After a shard whose end is unknown, the next writer's shard may start later:
                # the records between are that shard's lost tail.)
                continue
            if (
                last is not None
                and last.token != q.token
                and any(
                    o is not last and o.token not in (q.token, last.token) and o.end == q.first_record
                    for o in candidates
                    if o.first_record is not None
                )
            ):
                # Shards of two other writers end where q's writer started: which store it
                # appended to is unknown (an old version left by an overwrite?). Never mix.
                continue
        chain.append(q)
        end = q.end
    return chain


def _subtract(ranges: tuple[tuple[int, int], ...], covered: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The parts of half-open ``ranges`` that no range of sorted ``covered`` overlaps."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        for c, d in covered:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return tuple(out)


def _priority(q: _Piece, committed: set[str], dead: dict[str, str]) -> tuple[Any, ...]:
    return (
        q.first_record,
        0 if q.final in committed else 1 if q.token in dead else 2,
        0 if q.intact else 1,
        -q.good,
        0 if q.token is not None and _plain_name(q.final) else 1,  # a name this library writes
        q.final,
    )


# --------------------------------------------------------------------------- recover


def recover_store(
    path: str | os.PathLike[str] | Storage,
    *,
    salvage: bool = True,
    dry_run: bool = False,
    force: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> RecoverReport:
    """Rebuild a store from what its shards prove; quarantine what cannot be kept.

    See the module docstring for the guarantees and rules.

    Args:
        path: The store directory.
        salvage: Kept for compatibility; recover always keeps every proven record now (a
            shard's damaged records are dropped and the rest kept, renumbered).
        dry_run: Only report what would be done (per shard: records kept and lost); change
            nothing. Takes no lock, but refuses while a writer holds it.
        force: Run even if a temporary file belongs to a process id that is alive (use when
            that id was reused by an unrelated process; only matters where the file system
            has no locks).
        storage_options: For a URL: the fsspec file system's options (docs/remote.md). On an
            object store recover takes no lock (there is none); it replaces ``index.json``
            only if no writer committed meanwhile (atomic on S3, checked elsewhere) and
            raises ``ConcurrentWriteError`` otherwise.

    Returns:
        A :class:`RecoverReport`.

    Raises:
        StoreNotFoundError: The path does not exist.
        NotAStoreError: The path is a file, or a directory with no index, shard or temporary
            file of a store.
        UnsupportedFormatError: The index is a newer format version (left untouched).
        StoreBusyError: A writer or another recover holds the store's lock (named by pid and
            host), or a temporary file belongs to a process still running.
        StorageFullError: No space for the copied shards or the index; nothing was changed.
        PermissionError: A shard file cannot be read (named in the message); nothing was changed.
    """
    del salvage  # always on
    storage = storage_for(path, storage_options)
    if getattr(storage, "read_only", False) and not dry_run:
        raise ReadOnlyStoreError(
            f"store {storage.location!r} is read-only (an http(s):// URL): recover cannot rewrite it; copy it to "
            "a writable location and recover that (or pass dry_run=True to only report)"
        )
    storage = _storage_checked(storage)
    where = f"store {storage.location!r}"
    names = storage.list()
    _refuse_unfinished_merge(storage, names)
    temps = {n: t for n in names if (t := _parse_temp(n))}
    shard_files = [n for n in names if n.endswith(SHARD_SUFFIX) and not n.startswith(".")]
    if INDEX_NAME not in names and not shard_files and not temps:
        raise NotAStoreError(f"{storage.location!r} holds no {INDEX_NAME}, shard or temporary file: nothing to recover")
    token = new_writer_token()
    owner = lock_owner(token, "recover", "recover")
    lock = storage.lock(None if dry_run else owner)  # dry run: only a probe (refuses while held)
    previous = lock.previous or {}
    # A writer that died holding the lock: its shards may be adopted. Only an append's can
    # join a committed store (an overwrite or create that never committed replaced nothing).
    dead: dict[str, str] = {}
    if previous.get("role") == "writer" and isinstance(previous.get("token"), str):
        dead[previous["token"]] = str(previous.get("mode"))
    if previous.get("role") == "recover" and isinstance(previous.get("adopt"), list):
        dead.update((t, "append") for t in previous["adopt"] if isinstance(t, str))  # passed on by a recover that died
    adopt = sorted(t for t, mode in dead.items() if mode == "append")
    if adopt and not dry_run:
        lock.update({**owner, "adopt": adopt})  # so that a recover killed now passes them on too
    try:
        # Listed again under the lock: a writer may have committed before the lock was taken.
        names = storage.list()
        _refuse_unfinished_merge(storage, names)
        temps = {n: t for n in names if (t := _parse_temp(n))}
        shard_files = [n for n in names if n.endswith(SHARD_SUFFIX) and not n.startswith(".")]
        return _recover_locked(storage, where, names, temps, shard_files, token, dead, dry_run, force)
    finally:
        lock.release()


def _refuse_unfinished_merge(storage: Storage, names: list[str]) -> None:
    """A merge journal in the store: ``merge_stores`` stopped midway, some of the merged shards
    are here and the rest still in the parts. A recover would commit an index of the shards
    found here (a part of the records) and the re-run of the merge, which finishes the job,
    would then be refused; so recover refuses and names the call that finishes it.

    Raises:
        MergeStateError: ``names`` holds the merge journal.
    """
    from .merge import JOURNAL_NAME

    if JOURNAL_NAME not in names:
        return
    parts: Any = "the same parts, in the same order"
    try:
        journal = json.loads(storage.read_all(JOURNAL_NAME, max_bytes=MAX_INDEX_BYTES * 4))
        parts = [p["location"] for p in journal["parts"]]
    except (OSError, ValueError, TypeError, KeyError, RecursionError, TensorStoreError):
        pass  # an unreadable journal: the message still says what to do
    raise MergeStateError(
        f"store {storage.location!r} holds an unfinished merge ({JOURNAL_NAME}): some of its shards are still in "
        f"the parts; finish it with merge_stores({parts!r}, {storage.location!r}) (or `tspt merge`), which is "
        "idempotent, instead of recovering a part of it. Only if those parts are lost for good, remove "
        f"{JOURNAL_NAME} by hand, then recover."
    )


def _recover_locked(
    storage: Storage,
    where: str,
    names: list[str],
    temps: dict[str, tuple[str, int]],
    shard_files: list[str],
    token: str,
    dead: dict[str, str],
    dry_run: bool,
    force: bool,
) -> RecoverReport:
    busy = sorted(n for n, (_, pid) in temps.items() if _pid_alive(pid))
    if busy and not force:
        raise StoreBusyError(
            f"{where}: {busy[0]!r} belongs to process {temps[busy[0]][1]}, which is still running (a writer at "
            "work on a file system without locks?); stop it first, or pass force=True (--force) if that "
            "process id was reused"
        )
    notes: list[str] = []
    index_before, ev = _read_evidence(storage, notes)
    metadata, created_by, meta_source = ev.metadata, ev.created_by, ("index" if ev.valid else "damaged index")
    if metadata is None:
        meta_source = "lost"
        for tname, (final, _pid) in sorted(temps.items()):
            if final == INDEX_NAME:
                try:
                    tmp = parse_index(storage.read_all(tname, max_bytes=MAX_INDEX_BYTES), f"{where}: {tname}")
                except (IndexFormatError, UnsupportedFormatError, ValueError, OSError):
                    continue
                metadata, created_by, meta_source = dict(tmp.metadata), dict(tmp.created_by), "temporary index"
                break

    # Read every shard file (and every file the index names) and every temporary shard file.
    scanner = _Scanner(storage)
    listed = set(names)
    shard_files = shard_files + [n for n in ev.names if n in listed and n not in shard_files and n != INDEX_NAME]
    pieces: list[_Piece] = [scanner.scan(n, n) for n in shard_files]
    unusable_temps: list[tuple[str, str]] = []
    for tname, (final, _pid) in sorted(temps.items()):
        if final == INDEX_NAME:
            continue
        if not final.endswith(SHARD_SUFFIX) or final.startswith("."):
            unusable_temps.append((tname, "an unfinished temporary file (its writer died)"))
            continue
        p = scanner.scan(tname, final)
        if final in shard_files:
            unusable_temps.append((tname, f"a copy of {final!r}, which exists"))
        elif not p.intact:
            unusable_temps.append((tname, f"an unfinished shard (its writer died before closing it): {p.reason}"))
        else:
            pieces.append(p)

    if ev.newer is not None and (any(p.newer for p in pieces) or not any(p.records for p in pieces)):
        raise ev.newer  # a newer writer's store, by its index and its shards: left untouched
    if ev.newer is not None:
        notes.append(
            f"{INDEX_NAME} names a version, feature or codec this tensorstore_pt does not know, but no shard "
            "footer does: it is treated as a damaged index"
        )

    # The store's codec: what the footers say (weighted by records), else the index's.
    weights: dict[str, int] = {}
    for p in pieces:
        if p.codec is not None and p.records:
            key = json.dumps(p.codec, sort_keys=True)
            weights[key] = weights.get(key, 0) + p.records
    if weights:
        codec_config = json.loads(max(weights, key=lambda k: (weights[k], k == json.dumps(ev.codec, sort_keys=True))))
    elif ev.codec is not None and scanner.codec(ev.codec) is not None:
        codec_config = ev.codec
    else:
        codec_config = {"id": "zstd", "level": 3}
    if scanner.codec(codec_config) is None:
        # Most likely the zstd dictionary file is missing or damaged: without it no frame can
        # be checked, and keeping nothing would make the store worse. Refuse instead.
        raise CorruptStoreError(
            f"{where}: the shards' codec {codec_config} cannot be used ({scanner.errors.get(json.dumps(codec_config, sort_keys=True))}); "
            "recover cannot check any record without it, so it changed nothing: restore the dictionary file "
            "(from a backup or a copy of the store) and run `tspt recover` again"
        )
    if ev.codec is not None and ev.codec != codec_config:
        notes.append(f"the index says codec {ev.codec}, the shards' footers say {codec_config}: the footers win")

    # Shards whose footer is lost: rebuild them from the index's entry and their frames. They
    # may hold raw frames (format 1.2) unless the index says that no shard does.
    raw_frames = ev.features is None or FEATURE_RAW_FRAMES in ev.features
    # Writers whose shards hold column blocks (format 1.3), by their intact footers: their
    # shards whose footer is lost are walked as such (a walk also finds blocks by their magic).
    # A writer none of whose footers is intact is taken to write them where the index lists
    # column blocks, or where there is no index to say: a block whose magic is damaged is
    # not found on the walk, and its tensors' bytes may hold torch.save archives.
    plain = {p.token for p in pieces if p.records and not p.footer_lost and FEATURE_COLUMNAR_FRAMES not in p.features}
    columnar = {p.token for p in pieces if FEATURE_COLUMNAR_FRAMES in p.features}
    if ev.features is None or FEATURE_COLUMNAR_FRAMES in ev.features:
        columnar |= {p.token for p in pieces if p.footer_lost and p.token not in plain}
    for p in pieces:
        if p.footer_lost and p.final in ev.entries:
            scanner.rebuild(p, ev.entries[p.final], codec_config, raw_frames, p.token in columnar)
    if not ev.valid:
        # No index entry to go by: the shard's writer's previous shard says where it starts.
        _rebuild_by_neighbours(pieces, ev, scanner, codec_config, raw_frames, columnar)

    committed = set(ev.names)
    committed_tokens = {t for n in ev.names if (parsed := parse_shard_name(n)) for t in [parsed[0]]}
    present = {(t, s) for p in pieces if (t := p.token) is not None and (s := p.seq) is not None}
    # Without an index, a shard that proves no record still holds its place in its writer's
    # sequence where its first record is known (its footer, or its writer's previous shard):
    # the next shards can follow it, and its records are reported lost, never dropped unsaid.
    usable = [
        p
        for p in pieces
        if p.first_record is not None
        and p.codec == codec_config
        and (p.frames or (not ev.valid and not p.newer and (p.records or p.open_end)))
    ]

    def adoptable(q: _Piece) -> bool:
        if not ev.valid:
            return True
        return q.token in committed_tokens or dead.get(q.token or "") == "append"

    usable.sort(key=lambda q: _priority(q, committed, dead))
    # A file that proves exactly the records another one proves (a copy left in the directory)
    # adds nothing: only the first by priority is a candidate, so that a copy never looks like
    # a second writer whose shards end where the next writer started (see _chain).
    duplicates: dict[str, str] = {}
    seen: dict[tuple[Any, ...], _Piece] = {}
    for q in usable:
        key = (q.first_record, tuple((f.first, f.stored, f.checksum, tuple(f.raw_lengths)) for f in q.frames))
        if key in seen:
            duplicates[q.name] = seen[key].name
        else:
            seen[key] = q
    usable = [q for q in usable if q.name not in duplicates]
    if ev.valid or any(p.final in committed for p in usable):
        chain = _chain(usable, committed, adoptable, present, None)
    else:
        # No index to go by: every shard that no shard of its own writer precedes starts a
        # candidate sequence; the one that proves the most records wins.
        first_seq: dict[str, int] = {}
        for q in usable:
            if q.token is not None and q.seq is not None:
                first_seq[q.token] = min(first_seq.get(q.token, q.seq), q.seq)
        seeds = [q for q in usable if q.token is None or q.seq == first_seq.get(q.token)]
        chains = [_chain(usable, set(), adoptable, present, s) for s in seeds]
        chains.sort(key=lambda c: (-sum(x.good for x in c), c[0].first_record if c else 0, c[0].final if c else ""))
        chain = chains[0] if chains else []
        if len(chains) > 1 and chain:
            notes.append(
                f"{len(chains)} candidate record sequences (an interrupted overwrite?); kept the one proving the most "
                f"records, starting at {chain[0].final!r}; the others are quarantined, not deleted"
            )

    _fill_from_copies(chain, pieces)

    # Plan the new store: keep a shard as is where it lands at its own first record, else copy.
    cap = max([p.file_bytes for p in chain] + [0]) or DEFAULT_MAX_SHARD_BYTES
    kept: list[KeptShard] = []
    entries: list[ShardEntry | _Piece] = []
    position = 0
    for p in chain:
        if p.intact and p.entry is not None and p.first_record == position and _plain_name(p.final):
            how = "renamed" if p.name != p.final else "indexed" if p.final in committed else "adopted"
            kept.append(KeptShard(p.final, position, p.good, how, p.name))
            entries.append(p.entry)
        else:
            entries.append(p)
        position += p.good
    chain_names = {p.name for p in chain}
    kept_as_is = {k.source for k in kept}

    # Per shard file: what happens to it.
    outcomes: list[ShardOutcome] = []
    to_quarantine: list[tuple[str, str, int | None]] = []
    for p in sorted(pieces, key=lambda q: ((q.first_record if q.first_record is not None else 2**63), q.final)):
        if p.name in kept_as_is:
            action = "renamed" if p.name != p.final else "kept"
            outcomes.append(ShardOutcome(p.name, action, p.first_record, p.records, p.good, p.lost(), p.reason))
            continue
        if p.name in chain_names and not p.frames:
            # Kept in the sequence for its place only (no index): it proves no record.
            why = p.reason or "it proves no record"
            outcomes.append(ShardOutcome(p.name, "quarantined", p.first_record, p.records, 0, p.lost(), why))
            to_quarantine.append((p.name, why, p.records))
            continue
        if p.name in chain_names:
            why = p.reason or (
                "its records move down (records before it were lost)"
                if _plain_name(p.final)
                else "its name is not a plain shard file name (docs/format.md, section 6), so no index can hold it"
            )
            outcomes.append(ShardOutcome(p.name, "copied", p.first_record, p.records, p.good, p.lost(), why))
            to_quarantine.append((p.name, f"its proven records were copied into new shards; {why}", p.records))
            continue
        if p.first_record is None or not p.frames:
            why = p.reason or "it proves no record"
        elif p.name in duplicates:
            why = f"a duplicate of {duplicates[p.name]!r} (it proves the same records, by the same checksums)"
        elif p.codec != codec_config:
            why = f"its codec {p.codec} is not the store's {codec_config}"
        elif not adoptable(p):
            why = (
                "a shard of a writer that never committed (a failed write, or a copy by an interrupted recover), "
                "or of an older version"
            )
        else:
            why = "it does not continue the kept record sequence (another version, or records kept from elsewhere)"
        # Its records count as lost only if the store had them: a shard the index named or,
        # without an index, any shard file of the store (which of them the store held is not
        # known; records that a kept shard holds are not counted, see covered below).
        ours = p.final in committed or (not ev.valid and p.token is not None)
        held = (p.first_record, p.end) if p.first_record is not None and p.records and ours else None
        outcomes.append(ShardOutcome(p.name, "quarantined", p.first_record, p.records, 0, (held,) if held else (), why))
        to_quarantine.append((p.name, why, p.records))
    found = {p.final for p in pieces}
    for name in ev.names:
        if name not in found:
            e = ev.entries.get(name, {})
            span = (
                ((e["first_record"], e["first_record"] + e["records"]),)
                if {"first_record", "records"} <= e.keys()
                else ()
            )
            outcomes.append(ShardOutcome(name, "missing", e.get("first_record"), e.get("records"), 0, span,
                                         "named in the index, but there is no such file"))  # fmt: skip
    for tname, why in unusable_temps:
        outcomes.append(ShardOutcome(tname, "quarantined", None, None, 0, (), why))
        to_quarantine.append((tname, why, None))
    for tname, (final, _pid) in sorted(temps.items()):
        if final == INDEX_NAME:
            to_quarantine.append((tname, "an unpublished index (its writer died before committing it)", None))

    if meta_source == "lost":
        notes.append(
            "the user metadata lived only in the lost index and cannot be recovered; the new index has "
            "empty metadata (set it again with a writer in append mode)"
        )
    # A range is lost only if no kept shard holds those records (a duplicate shard loses nothing).
    covered = sorted(
        (p.first_record + f.first, p.first_record + f.first + len(f.raw_lengths))
        for p in chain
        if p.first_record is not None
        for f in p.frames
    )
    outcomes = [
        ShardOutcome(o.name, o.action, o.first_record, o.records, o.kept, _subtract(o.lost, covered), o.reason)
        for o in outcomes
    ]
    # Records of the kept sequence that no file holds any more (before its first kept shard, or
    # between two kept shards: a shard file gone without an index to name it) move down too:
    # they are lost, and the report says so.
    reported = sorted([r for o in outcomes for r in o.lost] + covered)
    start = 0
    before: _Piece | None = None
    for p in chain:
        if p.first_record is not None and p.first_record > start:
            name, why = (
                "(no file)",
                (
                    "no file proves these records of the kept sequence (a shard file gone, or one that "
                    "could not be rebuilt with no index to go by)"
                ),
            )
            if before is not None and before.open_end:
                name, why = (
                    f"{before.name} (after its last proven record)",
                    (
                        "its footer is lost and no index counts its records: these are the records from its first "
                        "unproven one up to the next kept shard, or of shard files gone in between"
                    ),
                )
            for a, b in _subtract(((start, p.first_record),), reported):
                outcomes.append(ShardOutcome(name, "missing", a, b - a, 0, ((a, b),), why))
        start = max(start, p.end)
        before = p
    lost_total = 0
    end = -1
    for a, b in sorted(r for o in outcomes for r in o.lost):  # the union's length: overlaps count once
        lost_total += max(0, b - max(a, end))
        end = max(end, b)
    if lost_total:
        notes.append(
            f"{lost_total} record(s) could not be proven and are not in the recovered store; the quarantined "
            "files keep their bytes"
        )
    # Shards whose records could not be counted: a footer lost with no index entry to count
    # them (not rebuilt at all, or rebuilt only up to a damaged frame or column block).
    unknown = tuple(
        sorted(
            p.name
            for p in pieces
            if not p.newer and (p.open_end or (not ev.valid and p.footer_lost and p.records is None))
        )
    )
    for p in pieces:
        if p.name not in unknown:
            continue
        at = f"from record {p.end} on" if p.first_record is not None else "(where they start is unknown too)"
        notes.append(
            f"{p.name}: its footer is lost and no index counts its records: an unknown number of records {at} "
            "could not be proven and are not in the recovered store (the quarantined file keeps its bytes; with "
            "the index, or a copy of the shard, recover could count or prove them)"
        )
    if any(not isinstance(e, ShardEntry) for e in entries):
        notes.append("records after a lost record move down (the format has no holes): see the per-shard table")

    # Write: copies and an index backup first, then renames, the index, and quarantines.
    new_files: list[str] = []
    index_backup: str | None = None
    taken = set(names)
    new_entries: list[ShardEntry] = []
    features: set[str] = set()
    index_written = False
    try:
        seq = 0
        position = 0
        for item in entries:
            if isinstance(item, ShardEntry):
                new_entries.append(ShardEntry(item.name, item.records, position, item.file_bytes,
                                              item.stored_bytes, item.raw_bytes, item.checksum))  # fmt: skip
                piece = next(p for p in chain if p.entry is item)
                features.update(piece.features)
                position += item.records
                continue
            if not item.frames:
                continue  # a place in the sequence only: nothing to copy
            with typed_full_disk(storage.location, shard_name(token, seq)):
                made, seq = _copy_piece(storage, item, token, seq, position, codec_config, cap, dry_run, scanner)
            for e, feats in made:
                new_files.append(e.name)
                new_entries.append(e)
                features.update(feats)
                kept.append(KeptShard(e.name, e.first_record, e.records, "copied", item.name))
            position += item.good
        kept.sort(key=lambda k: k.first_record)
        new_index = IndexInfo.build(
            codec_config,
            new_entries,
            metadata or {},
            {**(created_by or _created_by()), "recovered_by": f"tensorstore_pt {_version.__version__}"},
            tuple(sorted(features)),
        )
        old: IndexInfo | None = getattr(ev, "index", None)
        index_needed = not (
            old is not None
            and old.shards == new_index.shards
            and old.codec == new_index.codec
            and old.features == new_index.features
        )
        if not dry_run and index_needed and ev.raw:
            index_backup = _quarantine_name(INDEX_NAME, taken)
            with typed_full_disk(storage.location, index_backup), storage.writer(index_backup) as out:
                out.write(ev.raw)
            new_files.append(index_backup)
        # An index.json that cannot be read as bytes (a directory, an oversized file) cannot be
        # copied: it is moved aside, never deleted, just before the new index is written.
        aside = not dry_run and index_needed and ev.present and not ev.raw
        if aside:
            index_backup = _quarantine_name(INDEX_NAME, taken)
        if not dry_run:
            for p in chain:
                if p.name != p.final and p.name in kept_as_is:
                    storage.move(p.name, p.final)
            if index_needed:
                # Object stores have no lock: replace only the index read above (S3 If-Match),
                # or create one only where there was none (If-None-Match / link(2)).
                if aside and index_backup is not None:
                    storage.move(INDEX_NAME, index_backup)
                try:
                    with (
                        typed_full_disk(storage.location, INDEX_NAME),
                        storage.writer(
                            INDEX_NAME, exclusive=aside or not ev.present, **if_match_kwargs(ev.version)
                        ) as out,
                    ):
                        out.write(encode_index(new_index))
                except FileExistsError as exc:
                    raise ConcurrentWriteError(
                        f"{where}: a writer committed {INDEX_NAME} while recover ran; nothing was replaced: run "
                        "`tspt recover` again"
                    ) from exc
                index_written = True
    except StorageFullError as exc:
        if not index_written:
            for name in new_files:
                try:
                    storage.remove(name)
                except OSError:
                    pass
        copies = [p for p in entries if isinstance(p, _Piece)]
        need = sum(f.stored + 32 * len(f.raw_lengths) for p in copies for f in p.frames) + 4096 * len(copies)
        raise StorageFullError(
            exc.errno or errno.ENOSPC,
            f"{where}: recover needs about {need + len(ev.raw) * 2 + 2**16} bytes free (copied shards, the new index "
            f"and a copy of the old one) and the disk is full ({exc}); nothing was changed: free space and run "
            "`tspt recover` again",
        ) from exc
    quarantined = tuple(
        QuarantinedFile(n, n if dry_run else _quarantine_name(n, taken), reason, recs)
        for n, reason, recs in to_quarantine
    )
    if not dry_run:
        for q in quarantined:
            try:
                storage.move(q.name, q.new_name)
            except FileNotFoundError:
                pass
    return RecoverReport(
        location=storage.location,
        index_before=index_before,
        records=new_index.records,
        kept=tuple(kept),
        quarantined=quarantined,
        metadata=meta_source,
        index_written=index_written,
        dry_run=dry_run,
        index_backup=index_backup,
        notes=tuple(notes),
        shards=tuple(outcomes),
        records_lost=lost_total,
        records_unknown=unknown,
    )


def _copy_piece(
    storage: Storage,
    piece: _Piece,
    token: str,
    seq: int,
    first: int,
    codec_config: dict[str, Any],
    cap: int,
    dry_run: bool,
    scanner: _Scanner,
) -> tuple[list[tuple[ShardEntry, list[str]]], int]:
    """Copy a piece's proven frames (bytes and checksums unchanged) into new shards of this
    recover's token, numbered from ``first``; return ([(entry, features)], next seq)."""
    multi = any(len(f.raw_lengths) != 1 for f in piece.frames) or FEATURE_MULTI_RECORD_FRAMES in piece.features
    features = sorted(
        ({FEATURE_MULTI_RECORD_FRAMES} if multi else set())
        | ({FEATURE_DICTIONARY} if "dict" in codec_config else set())
    )
    blocks = any(f.block is not None for f in piece.frames)
    if blocks:  # column blocks are copied as they are, with the layout they are rebuilt with
        features = sorted({*features, FEATURE_COLUMNAR_FRAMES})
    meta = footer_meta(features, codec_config)
    if blocks:
        meta["columnar_layout"] = piece.layout.to_json()
    made: list[tuple[ShardEntry, list[str]]] = []
    if dry_run:
        n = piece.good
        raw = any(f.raw for f in piece.frames)
        made.append(
            (
                ShardEntry(shard_name(token, seq), n, first, 0, 0, 0, 0),
                sorted({*features, FEATURE_RAW_FRAMES}) if raw else features,
            )
        )
        return made, seq + 1
    handles = {piece.name: storage.open(piece.name)}
    out: ShardBuilder | None = None
    try:
        for f in piece.frames:
            source = f.source or piece.name
            if source not in handles:
                handles[source] = storage.open(source)
            frame = read_exact(handles[source], f.offset, f.stored, "a frame", source)
            if digest_int(frame) != f.checksum:  # changed under us: never copy what was not proven
                raise CorruptStoreError(f"{source!r}: a frame at byte {f.offset} changed while recover ran")
            block = f.block
            if (
                out is not None
                and out.records
                and out.size_with(len(frame), len(f.raw_lengths), f.raw, block is not None) > cap
            ):
                made.append((out.close(), _with_raw(features, out)))
                out = None
            if out is None:
                out = ShardBuilder(storage, shard_name(token, seq), first, meta, multi=multi)
                seq += 1
            out.add(frame, f.checksum, f.raw_lengths, f.raw, block)
            first += len(f.raw_lengths)
        if out is not None:
            made.append((out.close(), _with_raw(features, out)))
            out = None
    finally:
        for handle in handles.values():
            handle.close()
        if out is not None:
            out.out.abort()
    return made, seq


def _with_raw(features: list[str], out: ShardBuilder) -> list[str]:
    """A copied shard's features: those of its piece, plus "raw-frames" if it holds a raw frame."""
    return sorted({*features, FEATURE_RAW_FRAMES}) if out.raw_runs else features


def _plain_name(name: str) -> bool:
    """Whether an index may name ``name`` as a shard (docs/format.md, section 6): a shard found
    under another name (renamed by hand: ``a..b.tspt``) is copied under a new name, never kept
    as is, since an index naming it would be refused by every reader."""
    try:
        check_shard_name(name, INDEX_NAME)
    except IndexFormatError:
        return False
    return True


def _quarantine_name(name: str, taken: set[str]) -> str:
    base = name.lstrip(".") + QUARANTINE_SUFFIX
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate
