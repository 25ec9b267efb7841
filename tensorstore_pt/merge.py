"""Parts and merge: independent tasks each write a *part* (an ordinary store), and
:func:`merge_stores` commits the parts as one store, in a given part order.

Writing parts. Each task writes its records with :func:`~tensorstore_pt.write_store` (or a
:class:`~tensorstore_pt.ShardWriter`) into a store of its own, with the same codec options
(``codec``, ``level``, ``frame_target_bytes``, and for zstd the same prepared
``dictionary=`` bytes, see :func:`~tensorstore_pt.train_zstd_dictionary`). A part is
committed when its ``index.json`` is; a task that fails publishes nothing (the writer's
commit protocol), so a failed part is a directory without an index, which ``merge_stores``
refuses (:class:`~tensorstore_pt.errors.PartNotCommittedError`). Each writer draws its own
random token, so shard names never collide across parts.

Merging. Part order, not finish order, decides record order: the records of ``parts[0]``
come first. A shard's footer holds its store-wide ``first_record`` (docs/format.md,
section 5), so a shard of a later part needs a new footer: merge rewrites only the shard's
tail (record table, footer JSON, trailer; a few bytes a record), never its frames, and gives
it a new name (``shard-<merge token>-<seq>.tspt``) since its content changed. Shards whose
footer is already right (those of the first part) keep their names and bytes. Before
anything changes, every shard of every part (and the shared dictionary) is read once and
checked against its part's index (size, footer, xxh3_64): a damaged part is refused whole.

- *Move* (default where every part and the destination are directories on one local file
  system): each shard is renamed into the destination and its tail rewritten in place; the
  frames are neither copied nor rewritten, only read once up front (the check above, and
  the new whole-file checksums). The parts are consumed: when the merge commits, each part
  directory is removed.
- *Copy* (anywhere else, or ``copy=True``): each shard is written to the destination through
  the storage seam (frames streamed, new tail appended, published atomically). The parts
  are left intact.

Atomicity and idempotence. Before changing anything, merge writes a journal
(``.tspt-merge.json`` in the destination: the parts, every shard's old and new name, its new
tail, and the exact ``index.json`` to commit). ``index.json`` is written last, then the
journal is removed, then (move) the parts. If merge dies at any point, run it again with the
same parts and destination: it replays the journal (each step checks whether it was done:
a shard already in the destination has its tail checked and, if a crash cut the rewrite
short, rewritten), or, if the index was already committed, only finishes removing the
parts, or does nothing. Until the index is committed, readers of the destination see no
store; after a move-merge has started, the parts belong to it (finish it by re-running).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .checksums import FileHasher, format_digest, parse_digest
from .errors import (
    ChecksumMismatchError,
    IncompatiblePartsError,
    IndexFormatError,
    InvalidOptionError,
    MergeStateError,
    MissingShardError,
    NotAStoreError,
    PartNotCommittedError,
    ShardFormatError,
    ShardSizeError,
    StoreExistsError,
    StoreNotFoundError,
    TensorStoreError,
)
from .format import (
    INDEX_NAME,
    LOCK_NAME,
    MAX_INDEX_BYTES,
    IndexInfo,
    ShardEntry,
    StoreInfo,
    encode_footer,
    encode_index,
    new_writer_token,
    parse_index,
    shard_name,
)
from .shardio import fetch_footer
from .writer import check_metadata
from .storage import TEMP_MARKER, LocalStorage, Storage, StoreLock, storage_for, typed_full_disk
from .storage.local import _fsync_dir

__all__ = ["JOURNAL_NAME", "merge_stores"]

#: The merge journal in the destination (a dot-file: never a shard or index name).
JOURNAL_NAME = ".tspt-merge.json"
_JOURNAL_FORMAT = "tensorstore_pt-merge"
_CHUNK_BYTES = 8 * 2**20
#: created_by keys of a part's writer that must agree across parts (frame settings).
_WRITER_SETTINGS = ("frame_target_bytes",)

Progress = Callable[[int, int, int], None]


def _settings_lost(index: IndexInfo) -> bool:
    """Whether ``index`` was rebuilt by ``recover`` from an index it could not read, so that its
    writer's settings (``created_by``'s frame settings, see :data:`_WRITER_SETTINGS`) are unknown
    rather than unset: it names ``recovered_by`` and none of them."""
    created = index.created_by
    return "recovered_by" in created and not any(k in created for k in _WRITER_SETTINGS)


def _frames_named(index: IndexInfo) -> str:
    """A part's frame settings in words, for messages: ``compact=True`` or ``frame_target_bytes``
    as its writer was given them, or one record a frame."""
    created = index.created_by
    target = created.get("frame_target_bytes")
    if created.get("compact"):
        return f"compact=True (column blocks of about {target} bytes)"
    return f"frame_target_bytes={target}" if target is not None else "one record a frame (no frame_target_bytes)"


def merge_stores(
    parts: Sequence[str | os.PathLike[str] | Storage],
    dest: str | os.PathLike[str] | Storage,
    *,
    metadata: dict[str, Any] | None = None,
    copy: bool | None = None,
    progress: Progress | None = None,
    storage_options: dict[str, Any] | None = None,
) -> StoreInfo:
    """Commit committed part stores as one new store, records in the order of ``parts``.

    Args:
        parts: The part stores, in record order (each a directory, or a :class:`Storage`).
            Every part must be committed (have an ``index.json``) and written with the same
            codec config (codec, level, zstd dictionary) and frame settings; a part may be
            empty (0 records).
        dest: The new store. It must not exist, or be an empty directory, or hold an
            unfinished merge of the same parts (which is then finished).
        metadata: The merged store's metadata (a JSON-serialisable dict); None takes the
            first part's.
        copy: None (default) moves shards where every part and ``dest`` are directories on
            one local file system and copies otherwise; True always copies (parts left
            intact); False requires a move (raises where it is impossible).
        progress: Called after each shard as ``progress(records, in_bytes, out_bytes)``
            with the shard's record count, the bytes read and the bytes written (ints).
        storage_options: fsspec options (``endpoint_url``, credentials, ``tspt_*`` retry
            options) for every part and ``dest`` given as a URL (``s3://...``); local paths
            and :class:`Storage` objects take none and are left out of it.

    Returns:
        The merged store's summary. Its ``created_by["merge"]`` records the part locations
        and their index checksums.

    Raises:
        InvalidOptionError: No parts, a part given twice, ``dest`` among the parts (a
            directory is one part however it is spelled: symbolic links and relative paths
            are resolved), a bad
            ``metadata``, or ``copy=False`` where a move is impossible.
        StoreNotFoundError: A part does not exist.
        NotAStoreError: A part is a file.
        PartNotCommittedError: A part has no ``index.json`` (failed or still being written).
        IncompatiblePartsError: A part's codec config or frame settings differ from the
            first part's (both are named).
        StoreExistsError: ``dest`` holds a store or other files (and no unfinished merge of
            these parts), or holds the merge of these part locations while one of them holds
            another store now (written again since).
        MergeStateError: ``dest`` holds an unfinished merge of other parts, or a file the
            journal names is gone.
        StoreBusyError: A writer holds ``dest`` or a part.
        IndexFormatError: A part's index is malformed (e.g. an unsafe dictionary file name).
        CorruptStoreError: A part's shard disagrees with its index (size, footer, checksum:
            every shard is read and checked while planning, so nothing is changed), or no
            part holds an intact copy of the shared zstd dictionary.
        StorageFullError: The disk filled up (re-run to finish after freeing space).

    Thread and process safety: one merge per destination at a time (it takes the
    destination's writer lock and each part's). Not safe to fork while running.
    """
    if isinstance(parts, (str, bytes, os.PathLike, Storage)):
        raise InvalidOptionError(f"parts: expected a sequence of part stores, found a single {type(parts).__name__}")
    # Local parts by absolute path: the journal and created_by name them, and a re-run (from
    # another working directory) must name the same directories.
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidOptionError(f"storage_options: expected a dict, found {type(storage_options).__name__}")
    part_st = [storage_for(_absolute(p), _options_for(p, storage_options)) for p in parts]
    if not part_st:
        raise InvalidOptionError("parts: expected at least one part store, found none")
    locations = [st.location for st in part_st]
    idents = [_identity(st) for st in part_st]
    dup = sorted({loc for loc, ident in zip(locations, idents) if idents.count(ident) > 1})
    if dup:
        raise InvalidOptionError(
            f"parts: each part must be given once, found {dup} more than once (the same directory under "
            "different spellings counts as one)"
        )
    dst = storage_for(dest, _options_for(dest, storage_options))
    if _identity(dst) in idents:
        raise InvalidOptionError(f"dest: {dst.location!r} is also one of the parts; merge into a new path")
    metadata = check_metadata(metadata)
    if copy not in (None, True, False):
        raise InvalidOptionError(f"copy: expected None, True or False, found {copy!r}")
    move = _can_move(part_st, dst) if copy is None else not copy
    if copy is False and not _can_move(part_st, dst):
        raise InvalidOptionError(
            "copy=False: moving needs every part and dest to be directories on one local file system; "
            f"found parts {locations} and dest {dst.location!r}"
        )
    if dst.exists() and not dst.is_container():
        raise StoreExistsError(f"dest {dst.location!r} exists and is not a directory")
    created = dst.ensure()
    try:
        merge = _Merge(part_st, dst, move, progress)
    except BaseException:  # a part (or dest) is busy: nothing was changed, nothing stays locked
        if created:
            dst.remove_container()
        raise
    try:
        return merge.run(metadata)
    except BaseException:
        if created and merge.untouched:
            dst.remove_container()
        raise
    finally:
        merge.release()


def _options_for(location: Any, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``storage_options`` for a URL location (other than ``file://``); None for the rest."""
    if storage_options is None or isinstance(location, Storage):
        return None
    text = os.fspath(location)
    if isinstance(text, str) and "://" in text and not text.lower().startswith("file://"):
        return storage_options
    return None


def _local_root(st: Storage) -> Path | None:
    return st.root if isinstance(st, LocalStorage) else None


def _absolute(path: str | os.PathLike[str] | Storage) -> str | Storage:
    """A local path made absolute (a Storage or URL as it is)."""
    if isinstance(path, Storage):
        return path
    text = os.fspath(path)
    if not isinstance(text, str) or "://" in text:
        return text  # storage_for reports a bytes path
    return os.path.abspath(text)


def _identity(st: Storage) -> str:
    """What makes two locations one store: a local directory's real path (symbolic links and
    relative spellings resolved), a URL without its trailing slashes."""
    root = _local_root(st)
    if root is not None:
        return os.path.realpath(root)
    return st.location.rstrip("/")


def _device_of(path: Path) -> int:
    """st_dev of ``path``, or of its nearest existing ancestor."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.stat(probe).st_dev


def _can_move(parts: list[Storage], dst: Storage) -> bool:
    root = _local_root(dst)
    if root is None:
        return False
    dev = _device_of(root)
    return all((r := _local_root(st)) is not None and _device_of(r) == dev for st in parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Merge:
    """One run of merge_stores: plan (read-only), journal, execute, commit, clean up."""

    def __init__(self, parts: list[Storage], dst: Storage, move: bool, progress: Progress | None) -> None:
        from .writer import lock_owner

        self.parts = parts
        self.dst = dst
        self.move = move
        self.progress = progress
        self.token = new_writer_token()
        self.untouched = True  # nothing written to dst yet (so a created dst may be removed)
        self.locks: list[StoreLock] = []
        try:
            self.locks.append(dst.lock(lock_owner(self.token, "merge", "create")))
            for st in parts:  # parts a finished move-merge removed are gone
                if st.is_container():
                    self.locks.append(st.lock(lock_owner(self.token, "merge", "part")))
        except BaseException:
            self.release()  # a busy part: release what was taken (dest first of all)
            raise

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    # -------------------------------------------------------------- driver

    def run(self, metadata: dict[str, Any] | None) -> StoreInfo:
        journal = self._read_journal()
        if journal is None:
            done = self._already_merged()
            if done is not None:
                self._remove_parts(done.created_by["merge"]["part_indexes"])
                return StoreInfo.from_index(self.dst.location, done)
            inner = self._part_dirs_inside_dest()
            leftovers = [n for n in self.dst.list() if n != LOCK_NAME and n not in inner]
            if leftovers:
                raise StoreExistsError(
                    f"dest {self.dst.location!r} is not empty (found {leftovers[:5]}); merge into a new path"
                )
            journal = self._plan(metadata)
            data = json.dumps(journal, sort_keys=True).encode()
            self.untouched = False
            with typed_full_disk(self.dst.location, JOURNAL_NAME), self.dst.writer(JOURNAL_NAME) as out:
                out.write(data)
        else:
            self.untouched = False
            want = [st.location for st in self.parts]
            have = [p["location"] for p in journal["parts"]]
            if want != have:
                raise MergeStateError(
                    f"dest {self.dst.location!r} holds an unfinished merge of parts {have}, found parts {want}; "
                    "re-run merge with those parts (in that order) to finish it"
                )
            self.move = journal["mode"] == "move"
        self.journal_token = journal["token"]
        index_bytes = journal["index"].encode()
        info = parse_index(index_bytes, f"{self.dst.location}/{INDEX_NAME}")
        current = self._read(self.dst, INDEX_NAME)
        if current is not None and current != index_bytes:
            # An index other than the planned one: the merge committed and the store was then
            # written (an append keeps the merged shards first), or it was replaced.
            now = parse_index(current, f"{self.dst.location}/{INDEX_NAME}")
            if [(e.name, e.first_record) for e in now.shards[: len(info.shards)]] != [
                (e.name, e.first_record) for e in info.shards
            ]:
                raise MergeStateError(
                    f"dest {self.dst.location!r} holds an unfinished merge journal ({JOURNAL_NAME}) but its "
                    f"{INDEX_NAME} is not the merged one: the store was replaced meanwhile; nothing was changed "
                    "(inspect it, then remove the journal by hand)"
                )
            self.dst.remove(JOURNAL_NAME)  # committed, then appended to: only the clean-up is left
            self._remove_parts(info.created_by["merge"]["part_indexes"])
            return StoreInfo.from_index(self.dst.location, now)
        self.existing = set(self.dst.list())
        for step in journal["steps"]:
            self._do_step(step)
        if current != index_bytes:
            with typed_full_disk(self.dst.location, INDEX_NAME), self.dst.writer(INDEX_NAME) as out:
                out.write(index_bytes)
        self.dst.remove(JOURNAL_NAME)
        self._remove_parts(info.created_by["merge"]["part_indexes"])
        return StoreInfo.from_index(self.dst.location, info)

    def _part_dirs_inside_dest(self) -> set[str]:
        """Names of dest entries that hold parts (parts may be written inside the destination,
        e.g. ``dest/_parts/part-00003``)."""
        prefix = _identity(self.dst).rstrip("/") + "/"
        idents = [_identity(st) for st in self.parts]
        return {ident[len(prefix) :].split("/")[0] for ident in idents if ident.startswith(prefix)}

    @staticmethod
    def _read(st: Storage, name: str) -> bytes | None:
        """Read ``index.json`` (at most ``MAX_INDEX_BYTES``) or the journal (at most four times
        that: it holds the planned index) whole; a larger file is refused before it is read.

        Raises:
            IndexFormatError: ``index.json`` is larger than ``MAX_INDEX_BYTES``.
            MergeStateError: The journal is larger than its bound.
        """
        limit = MAX_INDEX_BYTES * 4 if name == JOURNAL_NAME else MAX_INDEX_BYTES
        try:
            return st.read_all(name, max_bytes=limit)
        except FileNotFoundError:
            return None
        except TensorStoreError:
            raise
        except ValueError as exc:
            error = MergeStateError if name == JOURNAL_NAME else IndexFormatError
            raise error(f"{st.location!r}: {name}: expected at most {limit} bytes ({exc})") from exc

    def _read_journal(self) -> dict[str, Any] | None:
        data = self._read(self.dst, JOURNAL_NAME)
        if data is None:
            return None
        try:
            journal = json.loads(data)
            if journal.get("format") != _JOURNAL_FORMAT or journal.get("version") != 1:
                raise ValueError(f"not a version-1 merge journal: {journal.get('format')!r}")
            _check_journal(journal)
        except (ValueError, AttributeError, TypeError, KeyError, RecursionError) as exc:
            raise MergeStateError(
                f"dest {self.dst.location!r}: {JOURNAL_NAME} is unreadable or damaged ({type(exc).__name__}: {exc}); "
                "nothing was changed"
            ) from exc
        return journal

    def _already_merged(self) -> IndexInfo | None:
        """The dest's index if it is the committed result of merging exactly these parts."""
        data = self._read(self.dst, INDEX_NAME)
        if data is None:
            return None
        from .checksums import digest_int

        info = parse_index(data, f"{self.dst.location}/{INDEX_NAME}")
        record = info.created_by.get("merge")
        if not (isinstance(record, dict) and record.get("parts") == [st.location for st in self.parts]):
            raise StoreExistsError(f"dest {self.dst.location!r} already holds a store; merge into a new path")
        digests = record.get("part_indexes")
        if not (isinstance(digests, list) and len(digests) == len(self.parts)):
            raise StoreExistsError(
                f"dest {self.dst.location!r} already holds a merge of these part locations, but its index does not "
                "record their index checksums; merge into a new path"
            )
        for st, digest in zip(self.parts, digests):
            part_index = self._read(st, INDEX_NAME) if st.is_container() else None
            if part_index is not None and format_digest(digest_int(part_index)) != digest:
                # The location holds another store than the one merged (written again since):
                # "already merged" would silently leave its records out.
                raise StoreExistsError(
                    f"dest {self.dst.location!r} already holds a merge of these part locations, but part "
                    f"{st.location!r} holds another store now (its {INDEX_NAME} is not the one merged); merge into "
                    "a new path"
                )
        mode = record.get("mode")
        if mode in ("move", "copy"):
            self.move = mode == "move"  # how the merge ran, not how this call would: a copy keeps its parts
        return info

    # -------------------------------------------------------------- planning (read-only)

    def _plan(self, metadata: dict[str, Any] | None) -> dict[str, Any]:
        from .writer import _created_by

        indexes: list[IndexInfo] = []
        digests: list[str] = []
        for st in self.parts:
            if not st.exists():
                raise StoreNotFoundError(f"part {st.location!r} does not exist")
            if not st.is_container():
                raise NotAStoreError(f"part {st.location!r} is a file; expected a store directory")
            data = self._read(st, INDEX_NAME)
            if data is None:
                raise PartNotCommittedError(
                    f"part {st.location!r} has no {INDEX_NAME}: its writer failed or has not committed yet; "
                    "merge adopts committed parts only (re-write that part, then merge)"
                )
            indexes.append(parse_index(data, f"part {st.location}/{INDEX_NAME}"))
            from .checksums import digest_int

            digests.append(format_digest(digest_int(data)))
        first = indexes[0]
        for st, idx in zip(self.parts[1:], indexes[1:]):
            if idx.codec != first.codec:
                raise IncompatiblePartsError(
                    f"part {st.location!r} was written with codec config {idx.codec}, part "
                    f"{self.parts[0].location!r} with {first.codec}; write every part with the same codec, level "
                    "and dictionary"
                )
        # Frame settings, where a part's index knows them: an index that `recover` rebuilt after
        # losing it no longer names its writer's settings, so such a part is compared by the
        # others' (its frames, as its shards' footers describe them, read alike either way).
        known = [(st, idx) for st, idx in zip(self.parts, indexes) if not _settings_lost(idx)]
        first_settings = {k: known[0][1].created_by.get(k) for k in _WRITER_SETTINGS} if known else {}
        for st, idx in known[1:]:
            settings = {k: idx.created_by.get(k) for k in _WRITER_SETTINGS}
            if settings != first_settings:
                raise IncompatiblePartsError(
                    f"part {st.location!r} was written with {_frames_named(idx)}, part {known[0][0].location!r} "
                    f"with {_frames_named(known[0][1])}; write every part with the same frame settings (compact "
                    "and frame_target_bytes)"
                )
        steps: list[dict[str, Any]] = []
        entries: list[ShardEntry] = []
        names: set[str] = set()
        seq = 0
        base = 0
        features: set[str] = set()
        for p, (st, idx) in enumerate(zip(self.parts, indexes)):
            features.update(idx.features)
            for e in idx.shards:
                new_first = base + e.first_record
                step, entry = self._plan_shard(p, st, idx, e, new_first, None if new_first == e.first_record else seq)
                if step["dst"] != step["src"]:
                    seq += 1
                if entry.name in names:
                    raise IncompatiblePartsError(
                        f"part {st.location!r}: shard name {entry.name!r} is also used by an earlier part (a part "
                        "copied from another?); parts must be written by separate writers"
                    )
                names.add(entry.name)
                steps.append(step)
                entries.append(entry)
            base += idx.records
        dict_ref = first.codec.get("dict")
        if "dict" in first.codec:
            owner, name, size = self._dictionary_owner(first.codec)
            steps.insert(0, {"part": owner, "src": name, "dst": name, "table_offset": size, "tail": None,
                             "file_bytes": size, "checksum": dict_ref["checksum"], "records": 0})  # fmt: skip
        created_by = _created_by()
        created_by["merge"] = {
            "parts": [st.location for st in self.parts],
            "part_indexes": digests,
            "mode": "move" if self.move else "copy",
        }
        for k, v in first_settings.items():
            if v is not None:
                created_by[k] = v
        info = IndexInfo.build(
            first.codec,
            entries,
            first.metadata if metadata is None else metadata,
            created_by,
            tuple(features),
        )
        index_bytes = encode_index(info)
        parse_index(index_bytes, "the merged index")  # the plan itself must be a valid index
        return {
            "format": _JOURNAL_FORMAT,
            "version": 1,
            "token": self.token,
            "mode": "move" if self.move else "copy",
            "parts": [{"location": st.location, "index": d} for st, d in zip(self.parts, digests)],
            "steps": steps,
            "index": index_bytes.decode(),
        }

    def _dictionary_owner(self, codec: dict[str, Any]) -> tuple[int, str, int]:
        """The first part whose copy of the shared zstd dictionary matches the codec config's
        reference (name, size, xxh3_64, dict id): (part, file name, bytes).

        Raises:
            IndexFormatError: A malformed reference or unsafe file name (e.g. ``../x``).
            MissingShardError: No part holds the file.
            ChecksumMismatchError: No part's copy matches the reference.
        """
        from .codecs.registry import load_dictionary, read_store_file

        errors: list[Exception] = []
        for p, st in enumerate(self.parts):
            where = f"part {st.location!r}: codec config: dict"

            def load(name: str, st: Storage = st, where: str = where) -> bytes:
                try:
                    return read_store_file(st, name)
                except FileNotFoundError as exc:
                    raise MissingShardError(f"{where}: the dictionary file {name!r} is missing") from exc

            try:
                data = load_dictionary(codec["dict"], load, where)
            except (MissingShardError, ChecksumMismatchError) as exc:
                errors.append(exc)
                continue
            return p, codec["dict"]["name"], len(data)
        raise errors[0]  # every part's copy is missing or damaged: the first part's error

    def _plan_shard(
        self, p: int, st: Storage, idx: IndexInfo, e: ShardEntry, new_first: int, seq: int | None
    ) -> tuple[dict[str, Any], ShardEntry]:
        where = f"part {st.location!r}, shard {e.name!r}"
        try:
            handle = st.open(e.name)
        except FileNotFoundError as exc:
            raise MissingShardError(f"{where}: the file named in the part's index is missing") from exc
        try:
            size = handle.size()
            if size != e.file_bytes:
                raise ShardSizeError(f"{where}: the file is {size} bytes, the part's index says {e.file_bytes}")
            # The reader's own check of a shard against its index (header version, features,
            # codec, first record, counts and byte sums): a part that a reader would refuse
            # must not become a merged store that readers refuse.
            footer = fetch_footer(handle, idx, e, where)
            # Every shard is checked against the part's index here, while nothing is changed yet,
            # the adopted ones too: a move would otherwise consume a damaged part (and a copy stop
            # midway, journal written, on a shard it can never copy).
            tail = (
                None
                if seq is None
                else encode_footer(footer.table, {**footer.meta, "first_record": new_first}, footer.record_map)
            )
            old, new = FileHasher(), FileHasher()
            t = footer.table_offset
            for off in range(0, t, _CHUNK_BYTES):
                chunk = handle.read_range(off, min(_CHUNK_BYTES, t - off))
                old.update(chunk)
                new.update(chunk)
            old.update(handle.read_range(t, size - t))
            if old.intdigest() != e.checksum:
                raise ChecksumMismatchError(
                    f"{where}: the file's xxh3_64 is {old.intdigest():016x}, the part's index says {e.checksum:016x}"
                )
            if tail is None:  # the footer is already right: the shard is adopted as it is
                step = {"part": p, "src": e.name, "dst": e.name, "table_offset": size, "tail": None,
                        "file_bytes": size, "checksum": format_digest(e.checksum), "records": e.records}  # fmt: skip
                return step, e
            new.update(tail)
        finally:
            handle.close()
        name = shard_name(self.token, seq)
        entry = ShardEntry(
            name=name,
            records=e.records,
            first_record=new_first,
            file_bytes=t + len(tail),
            stored_bytes=e.stored_bytes,
            raw_bytes=e.raw_bytes,
            checksum=new.intdigest(),
        )
        step = {"part": p, "src": e.name, "dst": name, "table_offset": t, "tail": _b64(tail),
                "file_bytes": entry.file_bytes, "checksum": format_digest(entry.checksum), "records": e.records}  # fmt: skip
        return step, entry

    # -------------------------------------------------------------- executing

    def _do_step(self, step: dict[str, Any]) -> None:
        st = self.parts[step["part"]]
        name, dst_name = step["src"], step["dst"]
        tail = base64.b64decode(step["tail"]) if step["tail"] is not None else None
        where = f"merge into {self.dst.location!r}: {dst_name!r} (from part {st.location!r}, {name!r})"
        if self.move:
            moved = self._move_step(st, name, dst_name, step, tail, where)
            if self.progress is not None:
                self.progress(step["records"], step["file_bytes"] if moved else 0, len(tail or b""))
            return
        if dst_name in self.existing:
            self._check_done(dst_name, step, tail, where)
            if self.progress is not None:
                self.progress(step["records"], 0, 0)
            return
        expected = parse_digest(step["checksum"], where)
        try:
            handle = st.open(name)
        except FileNotFoundError as exc:
            raise MergeStateError(f"{where}: the part's file is gone and the destination has no copy") from exc
        h = FileHasher()
        t = step["table_offset"]
        try:
            with typed_full_disk(self.dst.location, dst_name), self.dst.writer(dst_name, exclusive=True) as out:
                for off in range(0, t, _CHUNK_BYTES):
                    chunk = handle.read_range(off, min(_CHUNK_BYTES, t - off))
                    if len(chunk) != min(_CHUNK_BYTES, t - off):
                        raise ShardSizeError(f"{where}: the part's file is shorter than {t} bytes")
                    h.update(chunk)
                    out.write(chunk)
                if tail is not None:
                    h.update(tail)
                    out.write(tail)
                if h.intdigest() != expected:
                    raise ChecksumMismatchError(
                        f"{where}: the copy's xxh3_64 is {h.intdigest():016x}, expected {expected:016x} "
                        "(the part changed since the merge was planned)"
                    )
        finally:
            handle.close()
        if self.progress is not None:
            self.progress(step["records"], t, step["file_bytes"])

    def _move_step(
        self, st: Storage, name: str, dst_name: str, step: dict[str, Any], tail: bytes | None, where: str
    ) -> bool:
        """Rename a part's shard into the destination; a shard whose footer changes is renamed
        to a temporary name first, its tail rewritten there (truncate to its frames, write the
        new tail, fsync) and then renamed to its final name, so no file under a shard name is
        ever incomplete (docs/format.md, section 8). Each sub-step is checked on a re-run."""
        src_root, dst_root = _local_root(st), _local_root(self.dst)
        if src_root is None or dst_root is None:
            raise MergeStateError(f"{where}: a move needs local directories; this merge was journalled as a move")
        src, target = src_root / name, dst_root / dst_name
        if target.exists():
            self._check_done(dst_name, step, tail, where)
            return False
        temp = dst_root / f".{dst_name}{TEMP_MARKER}merge-{self.journal_token}" if tail is not None else target
        moved = False
        if not temp.exists():
            if not src.exists():
                raise MergeStateError(f"{where}: the file is gone from both the part and the destination")
            os.rename(src, temp)
            moved = True
        if tail is not None:
            t = step["table_offset"]
            with open(temp, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size < t:
                    raise ShardSizeError(f"{where}: the file is {size} bytes, shorter than its {t} bytes of frames")
                if size != step["file_bytes"] or os.pread(f.fileno(), len(tail), t) != tail:
                    with typed_full_disk(self.dst.location, dst_name):
                        os.ftruncate(f.fileno(), t)
                        os.pwrite(f.fileno(), tail, t)
                        os.fsync(f.fileno())
            os.rename(temp, target)
        _fsync_dir(dst_root)
        if moved:
            _fsync_dir(src_root)
        self._check_done(dst_name, step, tail, where)
        return moved

    def _check_done(self, dst_name: str, step: dict[str, Any], tail: bytes | None, where: str) -> None:
        size = self.dst.size(dst_name)
        if size != step["file_bytes"]:
            raise ShardSizeError(f"{where}: the destination's file is {size} bytes, expected {step['file_bytes']}")
        if tail is not None:
            handle = self.dst.open(dst_name)
            try:
                if handle.read_range(step["table_offset"], len(tail)) != tail:
                    raise ShardFormatError(f"{where}: the destination's file has another footer than planned")
            finally:
                handle.close()

    # -------------------------------------------------------------- clean-up

    def _remove_parts(self, part_indexes: list[str]) -> None:
        """Move mode: remove what is left of each part: the files its index names (its
        dictionary; its shards were moved), then its index, lock file and directory (if empty:
        files that are not the part's are left alone). A part whose index is no longer the one
        merged (a new store was written there since) is left alone."""
        if not self.move:
            return
        from .checksums import digest_int

        for st, digest in zip(self.parts, part_indexes):
            if not st.exists():
                continue
            data = self._read(st, INDEX_NAME)
            if data is None:
                continue
            if format_digest(digest_int(data)) != digest:
                continue
            info = parse_index(data, f"part {st.location}/{INDEX_NAME}")
            dict_ref = info.codec.get("dict")
            for name in [e.name for e in info.shards] + ([dict_ref["name"]] if isinstance(dict_ref, dict) else []):
                st.remove(name)
            st.remove(INDEX_NAME)
        for lock in self.locks[1:]:
            lock.release()
        self.locks = self.locks[:1]
        dst_root = _local_root(self.dst)
        # Deepest first: a part nested in another part's directory goes before the outer one.
        for st in sorted(self.parts, key=lambda st: len(_identity(st)), reverse=True):
            if st.exists() and not [n for n in st.list() if n != LOCK_NAME]:
                st.remove_container()
            root = _local_root(st)
            if root is None or dst_root is None or st.exists():
                continue
            # A part written inside the destination (dest/_parts/00003): remove the folders
            # that held it once they are empty, up to the destination.
            parent = root.absolute().parent
            top = dst_root.absolute()
            while parent != top and top in parent.parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


def _check_journal(journal: dict[str, Any]) -> None:
    """Check the shape of a journal read back (a damaged or planted file must never make merge
    touch a path outside the part and destination directories).

    Raises:
        ValueError, TypeError, KeyError: A field is missing or has a bad type or value.
    """
    from .format import check_shard_name

    def nat(value: Any, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what}: expected an int >= 0, found {value!r}")

    token = journal["token"]  # part of a temporary file name in the destination
    if journal["mode"] not in ("move", "copy") or not (isinstance(token, str) and token.isalnum() and token.isascii()):
        raise ValueError(
            f"mode/token: expected 'move' or 'copy' and letters/digits, found {journal['mode']!r}/{token!r}"
        )
    if not isinstance(journal["index"], str):
        raise TypeError(f"index: expected a str, found {type(journal['index']).__name__}")
    parts = journal["parts"]
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and isinstance(p["location"], str) and isinstance(p["index"], str) for p in parts
    ):
        raise ValueError("parts: expected a list of {location, index}")
    if not isinstance(journal["steps"], list):
        raise TypeError("steps: expected a list")
    for k, step in enumerate(journal["steps"]):
        where = f"steps[{k}]"
        nat(step["part"], f"{where}.part")
        if step["part"] >= len(parts):
            raise ValueError(f"{where}.part: {step['part']} is not one of the {len(parts)} parts")
        check_shard_name(step["src"], f"{where}.src")
        check_shard_name(step["dst"], f"{where}.dst")
        for key in ("table_offset", "file_bytes", "records"):
            nat(step[key], f"{where}.{key}")
        if step["tail"] is not None:
            base64.b64decode(step["tail"], validate=True)
        parse_digest(step["checksum"], f"{where}.checksum")
