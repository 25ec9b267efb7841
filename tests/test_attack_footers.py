"""Attacks on what an open reader keeps of a footer (reader._kept) and on decode_many's bound
on kept decoded frames (KEPT_FRAME_BYTES)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from _store_tools import load_index, read_every_record_traced, same, samples, save_index

import tensorstore_pt as tspt
import tensorstore_pt.reader as reader_mod
from tensorstore_pt.checksums import ALGORITHM, digest_int
from tensorstore_pt.errors import IndexFormatError
from tensorstore_pt.format import (
    HEADER_BYTES,
    MAX_FOOTER_JSON_BYTES,
    RECORD_DTYPE,
    RECORD_MAP_DTYPE,
    TRAILER_BYTES,
    decode_trailer,
    encode_footer,
)


def _split(data: bytes, where: str) -> tuple[list[bytes], np.ndarray, dict[str, Any], np.ndarray | None]:
    """(stored frames, frame table, footer JSON, record map or None) of an intact shard."""
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), where)
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    multi = "multi-record-frames" in meta["features"]
    frames = meta.get("frames", count) if multi else count
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=frames, offset=table_offset).copy()
    record_map = None
    if multi:
        record_map = np.frombuffer(data, RECORD_MAP_DTYPE, count=count, offset=table_offset + frames * 32).copy()
    blobs = [data[int(r["offset"]) : int(r["offset"]) + int(r["stored"])] for r in table]
    return blobs, table, meta, record_map


def _rewrite(shard: Path, edit: Callable[[list[bytes], dict[str, Any]], list[bytes]]) -> None:
    """Rewrite a shard with ``edit(frames, meta)``'s frames (the table's offsets, stored sizes and
    checksums follow them) and the edited footer JSON: a consistent lie, every checksum right."""
    data = shard.read_bytes()
    blobs, table, meta, record_map = _split(data, str(shard))
    blobs = edit(blobs, meta)
    off = HEADER_BYTES
    for row, blob in zip(table, blobs):
        row["offset"], row["stored"], row["checksum"] = off, len(blob), digest_int(blob)
        off += len(blob)
    shard.write_bytes(data[:HEADER_BYTES] + b"".join(blobs) + encode_footer(table, meta, record_map))


def _reseal(store: Path) -> None:
    """The index's sizes and checksums from the (rewritten) shards."""
    obj = load_index(store)
    for s in obj["shards"]:
        data = (store / s["name"]).read_bytes()
        _, table, _, _ = _split(data, s["name"])
        s["file_bytes"] = len(data)
        s["stored_bytes"] = int(table["stored"].sum())
        s["checksum"] = f"{ALGORITHM}:{digest_int(data):016x}"
    for k in ("stored_bytes", "file_bytes"):
        obj["totals"][k] = sum(s[k] for s in obj["shards"])
    save_index(store, obj)


def test_duplicate_footer_features_are_not_kept_per_shard(tmp_path: Path) -> None:
    """``features`` is a kept key, checked only as a subset of the index's features: a footer
    may repeat "multi-record-frames" ~47,000 times in its 1 MiB of JSON (each a str of its
    own: ~3.6 MiB of Python objects), and the reader kept that list for every shard."""
    store = tmp_path / "s"
    data = samples(12)
    tspt.write_store(data, store, codec="zstd", max_shard_bytes=2_500, frame_target_bytes=1_500)
    shards = sorted(store.glob("*.tspt"))
    assert len(shards) >= 3, shards
    n = (MAX_FOOTER_JSON_BYTES - 4096) // len('"multi-record-frames",')

    def pad(blobs: list[bytes], meta: dict[str, Any]) -> list[bytes]:
        assert meta["features"] == ["multi-record-frames"], meta
        meta["features"] = ["multi-record-frames"] * n
        return blobs

    for shard in shards:
        _rewrite(shard, pad)
    _reseal(store)

    _, got, held, _ = read_every_record_traced(store)
    assert len(got) == len(data) and all(same(a, b) for a, b in zip(got, data))
    assert held < 2 * 2**20, f"{held} bytes held after reading {len(shards)} shards"


def test_failed_frames_do_not_pin_their_decoded_bytes_past_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode_many keeps a frame's error for the frame's later records at 0 bytes against
    KEPT_FRAME_BYTES. An lz4 frame of 4 MiB+ decodes into a BytesIO before its trailing-data
    check fails: the error's traceback (its __cause__'s frames) holds that BytesIO, so every
    kept error held a whole decoded frame, past the bound."""
    store = tmp_path / "s"
    recs = [torch.zeros(3 * 2**20, dtype=torch.uint8) for _ in range(16)]
    tspt.write_store(recs, store, codec="lz4", frame_target_bytes=5 * 2**20)
    shards = sorted(store.glob("*.tspt"))
    assert len(shards) == 1
    _, table, _, record_map = _split(shards[0].read_bytes(), "s")
    assert record_map is not None and len(table) == 8 and int(table["raw"].min()) >= 4 * 2**20, table
    _rewrite(shards[0], lambda blobs, meta: [b + b"\0" for b in blobs])  # trailing data after each frame
    _reseal(store)
    monkeypatch.setattr(reader_mod, "KEPT_FRAME_BYTES", 2**20)

    reader = tspt.open_store(store)
    order = list(range(0, 16, 2)) + list(range(1, 16, 2))  # every frame first, then each again
    fetched = reader.fetch_many(order)
    tracemalloc.start()
    try:
        it = reader.decode_many(fetched)
        first = [type(next(it).error).__name__ for _ in range(8)]
        held, _ = tracemalloc.get_traced_memory()
        rest = [type(r.error).__name__ for r in it]
    finally:
        tracemalloc.stop()
    assert first == rest == ["DecompressionError"] * 8
    assert held < 16 * 2**20, f"{held} bytes held by decode_many with KEPT_FRAME_BYTES=1 MiB"


def _mixed(i: int) -> dict[str, Any]:
    """Noise (stored raw) or zeros (compressed), 20 kB each, in runs of 6."""
    g = torch.Generator().manual_seed(i)
    n = 20_000
    x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) if i // 6 % 2 else torch.zeros(n, dtype=torch.uint8)
    return {"x": x, "i": torch.tensor(i)}


@pytest.mark.parametrize("bad", [1, 2], ids=["codec frame damaged", "raw frame damaged"])
@pytest.mark.parametrize("cap", [0, 1, 50_000, 64 * 2**20])
def test_decode_many_under_the_bound_matches_single_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int, bad: int
) -> None:
    """Raw and codec multi-record frames, one frame damaged (checksum), orders with repeats,
    reversed and interleaved: every record as a single read gives it, every record of the
    damaged frame the same error, whatever KEPT_FRAME_BYTES is."""
    store = tmp_path / "s"
    data = [_mixed(i) for i in range(60)]
    tspt.write_store(data, store, codec="zstd", frame_target_bytes=50_000, raw_below=0.2)
    shard = sorted(store.glob("*.tspt"))[0]
    raw = shard.read_bytes()
    _, table, meta, record_map = _split(raw, "s")
    assert record_map is not None and "raw_frames" in meta and len(table) >= 6, meta
    assert meta["raw_frames"][0] == [2, 4], meta["raw_frames"]  # frame 1 a codec frame, frame 2 raw
    b = bytearray(raw)
    b[int(table["offset"][bad]) + 5] ^= 0xFF  # the frame's checksum fails
    shard.write_bytes(bytes(b))
    _reseal(store)
    monkeypatch.setattr(reader_mod, "KEPT_FRAME_BYTES", cap)
    reader = tspt.open_store(store)
    bad_records = set(np.flatnonzero(record_map["frame"] == bad).tolist())
    assert bad_records
    rng = np.random.default_rng(cap)
    orders = [
        list(range(60)),
        list(range(59, -1, -1)),
        [i for k in range(5) for i in range(k, 60, 5)],
        rng.integers(0, 60, 200).tolist(),
        [3, 3, 3, *sorted(bad_records), 3, *sorted(bad_records)],
    ]
    for order in orders:
        got = list(reader.decode_many(reader.fetch_many(order)))
        assert [r.record for r in got] == order
        errors = {}
        for r in got:
            if r.record in bad_records:
                assert r.sample is None and isinstance(r.error, tspt.ChecksumMismatchError), r
                errors.setdefault(type(r.error), str(r.error).split(", record")[0])
            else:
                assert r.error is None and same(r.sample, data[r.record]), r
        assert len(errors) <= 1
        got_many = list(reader.iter_many(order))
        assert [r.record for r in got_many] == order
        assert all((r.error is None) == (r.record not in bad_records) for r in got_many)


def test_raw_frame_runs_are_kept_as_the_mask_only(tmp_path: Path) -> None:
    """With raw frames, the reader kept the footer JSON's "raw_frames" runs besides the mask
    made of them: a run is ~150 bytes of Python objects (a list, two ints), so a footer naming
    every other frame of a 120,000-frame shard held 9+ MiB for its 120 kB mask (its frame
    table: 3.7 MiB). The mask is what every read uses."""
    store = tmp_path / "s"
    tspt.write_store(samples(2), store, codec="zstd")
    shard = sorted(store.glob("*.tspt"))[0]
    data = shard.read_bytes()
    _, _, meta, _ = _split(data, "s")
    n = 120_000  # 1-byte frames; every other one listed as stored raw
    table = np.zeros(n, RECORD_DTYPE)
    table["offset"] = HEADER_BYTES + np.arange(n)
    table["stored"] = table["raw"] = 1
    table["checksum"] = digest_int(b"\0")
    meta.update(format_version=[1, 2], features=["raw-frames"], records=n)
    meta["raw_frames"] = [[k, k + 1] for k in range(0, n, 2)]
    shard.write_bytes(data[:HEADER_BYTES] + b"\0" * n + encode_footer(table, meta))
    obj = load_index(store)
    obj.update(format_version=[1, 2], features=["raw-frames"])
    s = obj["shards"][0]
    s.update(records=n, stored_bytes=n, raw_bytes=n)
    obj["totals"].update(records=n, raw_bytes=n)
    save_index(store, obj)
    _reseal(store)
    del data, table, meta, obj

    tracemalloc.start()
    try:
        reader = tspt.open_store(store)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    footer = reader._footer(0)
    assert footer.raw_mask is not None and int(footer.raw_mask.sum()) == n // 2
    assert held < n * 32 + 2 * 2**20, f"{held} bytes held for a {n}-frame shard"


def test_verify_report_does_not_quote_footer_junk_whole(tmp_path: Path) -> None:
    """verify_store quoted a footer's mismatched codec (and first_record) whole, twice a
    problem: a hostile footer's 1 MiB codec value made a report of ~2 MiB a shard."""
    store = tmp_path / "s"
    tspt.write_store(samples(12), store, codec="zstd", max_shard_bytes=2_500)
    shards = sorted(store.glob("*.tspt"))

    def junk(blobs: list[bytes], meta: dict[str, Any]) -> list[bytes]:
        meta["codec"] = {"id": "zstd", "junk": "x" * (MAX_FOOTER_JSON_BYTES - 4096)}
        return blobs

    for shard in shards:
        _rewrite(shard, junk)
    _reseal(store)
    report = tspt.verify_store(store)
    assert not report.ok and len(report.problems) >= len(shards)
    assert all("footer says codec" in p.message for p in report.problems if p.kind == "footer_mismatch")
    text = sum(len(p.message) + len(p.found) + len(p.expected) for p in report.problems)
    assert text < 2_000 * len(report.problems), text


def test_refused_footers_do_not_pin_their_parsed_json(tmp_path: Path) -> None:
    """A footer refused after parsing (here: first_record disagrees with the index) raised from
    read_footer, whose frame held the parsed footer: ~20 MiB of objects for 1 MiB of JSON. A
    bulk read keeps each shard's footer error for every record of that shard (and a caller
    keeps the results it collects): 20 MiB a refused shard."""
    store = tmp_path / "s"
    tspt.write_store(samples(12), store, codec="zstd", max_shard_bytes=2_500)
    shards = sorted(store.glob("*.tspt"))
    assert len(shards) >= 3

    def junk(blobs: list[bytes], meta: dict[str, Any]) -> list[bytes]:
        meta["junk"] = [[] for _ in range((MAX_FOOTER_JSON_BYTES - 4096) // 3)]
        meta["first_record"] += 1
        return blobs

    for shard in shards:
        _rewrite(shard, junk)
    _reseal(store)
    reader = tspt.open_store(store, verify=False)
    tracemalloc.start()
    try:
        results = list(reader.iter_many(range(len(reader))))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(isinstance(r.error, tspt.ShardFormatError) for r in results)
    assert held < 4 * 2**20, f"{held} bytes held by {len(shards)} refused footers' errors"


def test_refused_footer_error_does_not_quote_junk_whole(tmp_path: Path) -> None:
    """The error for a footer whose codec disagrees with the index quoted the footer's codec
    whole: 1 MiB of message for every record of the shard that a caller keeps."""
    store = tmp_path / "s"
    tspt.write_store(samples(4), store, codec="zstd")

    def junk(blobs: list[bytes], meta: dict[str, Any]) -> list[bytes]:
        meta["codec"] = {"id": "zstd", "junk": "x" * (MAX_FOOTER_JSON_BYTES - 4096)}
        return blobs

    _rewrite(sorted(store.glob("*.tspt"))[0], junk)
    _reseal(store)
    with pytest.raises(tspt.ShardFormatError, match="footer says codec") as got:
        tspt.open_store(store)
    assert len(str(got.value)) < 2_000, len(str(got.value))


@pytest.mark.parametrize("key", ["records", "raw_frames"])
def test_footer_parse_errors_do_not_quote_junk_whole(tmp_path: Path, key: str) -> None:
    """The twin in the footer's own parsing (format.parse_footer): a junk 'records' or
    'raw_frames' was quoted whole in its error."""
    store = tmp_path / "s"
    tspt.write_store(samples(4), store, codec="zstd", frame_target_bytes=2_000)
    big = "x" * (MAX_FOOTER_JSON_BYTES - 4096)

    def junk(blobs: list[bytes], meta: dict[str, Any]) -> list[bytes]:
        meta[key] = big
        if key == "raw_frames":
            meta["features"] = sorted({*meta["features"], "raw-frames"})
            meta["format_version"] = [1, 2]
        return blobs

    _rewrite(sorted(store.glob("*.tspt"))[0], junk)
    _reseal(store)
    if key == "raw_frames":
        obj = load_index(store)
        obj.update(format_version=[1, 2], features=sorted({*obj["features"], "raw-frames"}))
        save_index(store, obj)
    with pytest.raises(tspt.ShardFormatError, match="'x{50}") as got:
        tspt.open_store(store)
    assert len(str(got.value)) < 2_000, len(str(got.value))


@pytest.mark.parametrize("key", ["format_version", "codec", "totals"])
def test_index_parse_errors_do_not_quote_junk_whole(tmp_path: Path, key: str) -> None:
    """format.parse_index quoted an index value whole in its error (an index may be 256 MiB)."""
    store = tmp_path / "s"
    tspt.write_store(samples(4), store, codec="zstd")
    obj = load_index(store)
    obj[key] = "x" * 1_000_000
    save_index(store, obj)
    with pytest.raises(IndexFormatError) as got:
        tspt.open_store(store)
    assert "characters)" in str(got.value) and len(str(got.value)) < 2_000, len(str(got.value))
