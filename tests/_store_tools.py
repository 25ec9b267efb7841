"""Test helpers for the integrity, hostile-input and recovery suites.

``build_store`` is a deliberately unchecked writer: it lays out shards and an index from given
frames exactly as format v1 says, with consistent checksums, so tests can make stores that the
real writer refuses to make (malicious pickles, lying raw lengths, decompression bombs).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tensorstore_pt import write_store
from tensorstore_pt.checksums import ALGORITHM, digest_int
from tensorstore_pt.format import (
    INDEX_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    RECORD_DTYPE,
    TRAILER_BYTES,
    IndexInfo,
    ShardEntry,
    decode_trailer,
    encode_footer,
    encode_header,
)

CODECS = ("none", "zstd", "lz4")
RECORDS_PER_SHARD = 4
SHARDS = 3


def sample(i: int) -> dict[str, Any]:
    """Record ``i`` of the test stores: equal raw sizes, distinct values."""
    return {"x": torch.arange(64, dtype=torch.float32) * (i + 1), "i": torch.tensor(i)}


def samples(n: int) -> list[dict[str, Any]]:
    return [sample(i) for i in range(n)]


def same(a: Any, b: Any) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_store(path: Path, codec: str, shards: int = SHARDS, per_shard: int = RECORDS_PER_SHARD) -> Path:
    """A store of ``shards`` shards of ``per_shard`` records each (one write, then appends)."""
    data = samples(shards * per_shard)
    for s in range(shards):
        chunk = data[s * per_shard : (s + 1) * per_shard]
        write_store(chunk, path, codec=codec, mode="create" if s == 0 else "append", metadata={"seed": 7})
    return path


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def legacy_shard_name(seq: int) -> str:
    """A shard name as writers before writer tokens made them (``shard-00003.tspt``)."""
    return f"shard-{seq:05d}.tspt"


def shard_names(store: Path) -> list[str]:
    """The shard names the store's index lists, in record order."""
    return [s["name"] for s in json.loads((store / "index.json").read_text())["shards"]]


def shard_path(store: Path, seq: int) -> Path:
    """The ``seq``-th shard of the store's index (0 = the first records)."""
    return store / shard_names(store)[seq]


def layout(path: Path) -> tuple[int, int, int, np.ndarray]:
    """(file_bytes, table_offset, footer_json_bytes, record table) of an intact shard file."""
    data = path.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
    return len(data), table_offset, js, table


def flip(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x5A
    path.write_bytes(bytes(b))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def load_index(store: Path) -> dict[str, Any]:
    return json.loads((store / "index.json").read_text())


def save_index(store: Path, obj: dict[str, Any]) -> None:
    (store / "index.json").write_text(json.dumps(obj, indent=1))


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def build_store(
    path: Path,
    shards: list[list[tuple[int, bytes]]],
    codec: dict[str, Any],
    *,
    version: tuple[int, int] = FORMAT_VERSION,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a store from raw frames, checking nothing: ``shards`` is a list of shards, each a
    list of ``(raw_bytes, frame)``. Checksums, sizes and the index are consistent with them."""
    path.mkdir(parents=True, exist_ok=True)
    entries = []
    first = 0
    for seq, frames in enumerate(shards):
        body = bytearray(encode_header(version))
        table = np.zeros(len(frames), dtype=RECORD_DTYPE)
        for k, (raw_bytes, frame) in enumerate(frames):
            table[k] = (len(body), len(frame), raw_bytes, digest_int(frame))
            body += frame
        meta = {
            "format": FORMAT_NAME,
            "format_version": list(version),
            "features": [],
            "codec": codec,
            "checksum": ALGORITHM,
            "records": len(frames),
            "first_record": first,
        }
        body += encode_footer(table, meta)
        name = legacy_shard_name(seq)
        (path / name).write_bytes(bytes(body))
        entries.append(
            ShardEntry(
                name=name,
                records=len(frames),
                first_record=first,
                file_bytes=len(body),
                stored_bytes=int(table["stored"].sum()),
                raw_bytes=int(table["raw"].sum()),
                checksum=digest_int(bytes(body)),
            )
        )
        first += len(frames)
    info = IndexInfo.build(codec, entries, metadata or {}, {"library": "test"})
    obj = info.to_json()
    obj["format_version"] = list(version)
    (path / "index.json").write_text(json.dumps(obj, indent=1))
    return path


def rewrite_shard_table(path: Path, edit: Any) -> None:
    """Apply ``edit(table)`` to a shard's record table and re-seal its footer checksum (a
    consistent lie: the kind a hostile store would hold)."""
    data = path.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    edit(table)
    new = data[:table_offset] + encode_footer(table, meta)
    path.write_bytes(new)


def reseal_index(store: Path) -> None:
    """Recompute every shard entry of the index from the files (sizes, sums, checksums)."""
    obj = load_index(store)
    first = 0
    for s in obj["shards"]:
        p = store / s["name"]
        size, _, _, table = layout(p)
        s["file_bytes"] = size
        s["stored_bytes"] = int(table["stored"].sum())
        s["raw_bytes"] = int(table["raw"].sum())
        s["checksum"] = f"{ALGORITHM}:{digest_int(p.read_bytes()):016x}"
        s["records"] = len(table)
        s["first_record"] = first
        first += len(table)
    t = obj["totals"]
    t["records"] = first
    for k in ("stored_bytes", "raw_bytes", "file_bytes"):
        t[k] = sum(s[k] for s in obj["shards"])
    save_index(store, obj)


def file_digests(root: Path) -> dict[str, int]:
    """xxh3 of every plain file under ``root`` (recursive), by content, for never-deletes checks."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f == ".tspt-lock":
                continue  # the lock's owner record changes with every writer and recover
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = digest_int(p.read_bytes())
    return out


# --------------------------------------------------------------------------- parallel packing


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (dot-files aside), index.json without its informative created_by."""
    out = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if not p.name.startswith(".")}
    index = json.loads(out[INDEX_NAME])
    index.pop("created_by")
    out[INDEX_NAME] = json.dumps(index, sort_keys=True).encode()
    return out


def workers_alive() -> list:
    return [p for p in multiprocessing.active_children() if p.is_alive()]


def full_disk_at_publication(monkeypatch: Any, nth: int) -> list[str]:
    """Make the ``nth`` shard publication (``ShardBuilder.publish``, counted from 1) fail as a
    full disk (``ENOSPC``); return the list of the shard names published or tried, in order."""
    import errno

    from tensorstore_pt.shardio import ShardBuilder

    publish = ShardBuilder.publish
    calls: list[str] = []

    def failing_publish(self: ShardBuilder) -> None:
        calls.append(self.name)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        publish(self)

    monkeypatch.setattr(ShardBuilder, "publish", failing_publish)
    return calls


def read_every_record_traced(store: Path) -> tuple[Any, list[Any], int, int]:
    """Open ``store`` (``verify=False``) and read every record, under tracemalloc: ``(reader,
    samples, bytes still allocated after, peak bytes)``. What an open reader holds of its
    shards' footers, for the memory attacks."""
    import tracemalloc

    from tensorstore_pt import open_store

    tracemalloc.start()
    try:
        reader = open_store(store, verify=False)
        got = [reader[i] for i in range(len(reader))]  # every footer read
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return reader, got, held, peak
