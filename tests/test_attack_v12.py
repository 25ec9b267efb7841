"""Attacks on format 1.2 (raw frames) and the code that came with it, each a regression test.

- recover of a shard whose footer is lost (truncated, or the footer's bytes damaged) in a
  store that holds raw frames: every record a torch.save archive's CRC-32s still prove is
  kept, raw or coded, in order and bit-identical, and the report names exactly the records
  that were dropped (it used to drop every raw frame and misnumber what it kept).
- a footer or index whose ``format_version`` is older than its features (raw-frames at 1.0
  or 1.1), and a footer that lists raw-frames but names no raw frame, are refused as
  format errors (they were read).
- a read refuses a frame over ``max_record_bytes`` from its footer row before reading it: a
  raw frame is as large stored as decoded, so the read was the allocation the budget bounds.
- the audit picks its dictionary-training records in O(sample) memory, not O(store).
- merge checks each part's shards against the part's index as a reader does (header version,
  features, codec, byte sums): it used to merge, and move, a part that readers refuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _hostile_tools import peak_bytes
from _store_tools import flip, load_index, reseal_index, save_index, store_files, truncate

import tensorstore_pt as ts
from tensorstore_pt.errors import AllocationBudgetError, IndexFormatError, ShardFormatError
from tensorstore_pt.format import (
    HEADER_BYTES,
    RECORD_DTYPE,
    TRAILER_BYTES,
    decode_trailer,
    encode_footer,
    encode_header,
)
from tensorstore_pt.integrity import verify_store
from tensorstore_pt.serialization import dumps

# --------------------------------------------------------------------------- recover: raw frames, footer lost


def _mixed(n: int, seed: int = 1) -> list[torch.Tensor]:
    """Records 0, 1 (mod 3) are random bytes (stored raw by the default raw_below), 2 (mod 3)
    compressible (coded); each record distinct."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (20000,), dtype=torch.uint8, generator=g) if i % 3 != 2 else torch.full((3000,), float(i))
        for i in range(n)
    ]


def _frames(store: Path) -> tuple[Path, list[tuple[int, int, bool]]]:
    """The store's one shard and its frames as (offset, stored bytes, stored raw)."""
    reader = ts.open_store(store)
    assert len(reader.index.shards) == 1
    footer = reader._footer(0)
    rows = [(int(r["offset"]), int(r["stored"]), footer.is_raw(fi)) for fi, r in enumerate(footer.table)]
    return store / reader.index.shards[0].name, rows


def _records(store: Path) -> list[bytes]:
    reader = ts.open_store(store)
    return [reader.read_bytes(i) for i in range(len(reader))]


def _lost(report: ts.RecoverReport) -> list[tuple[int, int]]:
    return [r for s in report.shards for r in s.lost]


@pytest.mark.parametrize(("codec", "index"), [("zstd", "valid"), ("lz4", "valid"), ("zstd", "damaged")])
def test_recover_keeps_raw_frames_of_a_truncated_shard(tmp_path: Path, codec: str, index: str) -> None:
    samples = _mixed(9)
    store = tmp_path / "s"
    ts.write_store(samples, store, codec=codec)
    shard, rows = _frames(store)
    assert [raw for _, _, raw in rows] == [i % 3 != 2 for i in range(9)]
    truncate(shard, rows[7][0] + rows[7][1] // 2)  # inside raw frame 7: the footer is lost
    if index == "damaged":  # evidence only: its shard entries and features still count
        obj = load_index(store)
        obj["totals"]["records"] += 1
        save_index(store, obj)

    report = ts.recover_store(store)

    assert report.index_before == index

    assert _records(store) == [dumps(s) for s in samples[:7]]
    assert _lost(report) == [(7, 9)]
    assert report.records_lost == 2
    assert "raw-frames" in ts.open_store(store).index.features
    _, kept_rows = _frames(store)
    assert [raw for _, _, raw in kept_rows] == [i % 3 != 2 for i in range(7)]  # raw frames stay raw
    assert verify_store(store, deep=True).ok


def test_recover_keeps_records_of_multi_record_raw_frames(tmp_path: Path) -> None:
    """Multi-record frames, raw and coded in turn: a raw frame's records are found one by one."""
    g = torch.Generator().manual_seed(3)
    samples = [
        torch.randint(0, 256, (12000,), dtype=torch.uint8, generator=g)
        if i // 2 % 2 == 0
        else torch.full((3000,), float(i))
        for i in range(16)
    ]
    store = tmp_path / "s"
    ts.write_store(samples, store, codec="zstd", frame_target_bytes=20000, raw_below=0.3)  # 2 records a frame
    shard, rows = _frames(store)
    assert [raw for _, _, raw in rows] == [True, False] * 4
    truncate(shard, rows[7][0] + 10)  # inside the last frame

    report = ts.recover_store(store)

    assert _records(store) == [dumps(s) for s in samples[:14]]
    assert _lost(report) == [(14, 16)]
    assert set(ts.open_store(store).index.features) == {"multi-record-frames", "raw-frames"}
    assert verify_store(store, deep=True).ok


def test_recover_drops_only_a_damaged_raw_frame_when_the_footer_is_lost(tmp_path: Path) -> None:
    samples = _mixed(9, seed=5)
    store = tmp_path / "s"
    ts.write_store(samples, store, codec="zstd")
    shard, rows = _frames(store)
    size = shard.stat().st_size
    flip(shard, rows[3][0] + rows[3][1] // 2)  # tensor bytes of raw record 3: its CRC-32 fails
    flip(shard, size - 3)  # the trailer: the footer is lost

    report = ts.recover_store(store)

    assert _records(store) == [dumps(s) for i, s in enumerate(samples) if i != 3]
    assert _lost(report) == [(3, 4)]
    assert verify_store(store, deep=True).ok


# --------------------------------------------------------------------------- versions that lie about raw frames


def _footer_edit(shard: Path, edit: Any, header: tuple[int, int] | None = None) -> None:
    """Apply ``edit(meta)`` to a shard's footer JSON (and set its header version), re-sealed."""
    data = shard.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(shard))
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    edit(meta)
    head = data[:HEADER_BYTES] if header is None else encode_header(header)
    shard.write_bytes(head + data[HEADER_BYTES:table_offset] + encode_footer(table, meta))


def _raw_store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "s"
    ts.write_store(_mixed(4), store, codec="zstd")
    shard, rows = _frames(store)
    assert [raw for _, _, raw in rows] == [True, True, False, True]
    return store, shard


@pytest.mark.parametrize("version", [(1, 0), (1, 1)])
def test_footer_listing_raw_frames_with_an_older_version_is_refused(tmp_path: Path, version: tuple[int, int]) -> None:
    """docs/format.md 5.2: such a footer MUST have format_version [1, 2] (header and footer
    both say the older version here, so the header check alone passes)."""
    store, shard = _raw_store(tmp_path)
    _footer_edit(shard, lambda meta: meta.update(format_version=list(version)), header=version)
    reseal_index(store)
    with pytest.raises(ShardFormatError, match=r"need at least \[1, 2\]"):
        ts.open_store(store)[0]
    assert not verify_store(store, deep=True).ok


def test_footer_listing_raw_frames_without_any_is_refused(tmp_path: Path) -> None:
    """A shard without raw frames MUST NOT list the feature: refused as a footer problem
    before any frame reaches the codec (it used to fail as a zstd decode error)."""
    store, shard = _raw_store(tmp_path)
    _footer_edit(shard, lambda meta: meta.update(raw_frames=[]))
    reseal_index(store)
    with pytest.raises(ShardFormatError, match="names no frame"):
        ts.open_store(store)[0]
    assert not verify_store(store, deep=True).ok


@pytest.mark.parametrize(
    ("features", "version"), [(["raw-frames"], [1, 1]), (["raw-frames"], [1, 0]), (["multi-record-frames"], [1, 0])]
)
def test_index_version_older_than_its_features_is_refused(tmp_path: Path, features: list[str], version: list) -> None:
    store = tmp_path / "s"
    multi = "multi-record-frames" in features
    ts.write_store(
        _mixed(3), store, codec="zstd", frame_target_bytes=10_000 if multi else None, raw_below=0 if multi else 0.05
    )
    obj = load_index(store)
    assert obj["features"] == features
    obj["format_version"] = version
    save_index(store, obj)
    with pytest.raises(IndexFormatError, match="need at least"):
        ts.open_store(store)
    assert not verify_store(store).ok


# --------------------------------------------------------------------------- merge checks parts as a reader does


def test_merge_refuses_a_part_whose_footer_lists_raw_frames_its_index_omits(tmp_path: Path) -> None:
    """A reader refuses such a part; merge used to accept it (moving its shards) and publish a
    merged store that every reader refused."""
    raw_part, plain = tmp_path / "a", tmp_path / "b"
    ts.write_store(_mixed(3), raw_part, codec="zstd")
    ts.write_store([torch.zeros(100) for _ in range(3)], plain, codec="zstd")
    obj = load_index(raw_part)
    assert obj["features"] == ["raw-frames"]
    obj["features"], obj["format_version"] = [], [1, 0]
    save_index(raw_part, obj)
    with pytest.raises(ShardFormatError, match="does not list"):
        ts.open_store(raw_part)[0]
    before = store_files(raw_part)

    with pytest.raises(ShardFormatError, match="does not list"):
        ts.merge_stores([plain, raw_part], tmp_path / "m")  # a move where it can

    assert store_files(raw_part) == before  # nothing taken from the part
    assert not (tmp_path / "m" / "index.json").exists()


# --------------------------------------------------------------------------- max_record_bytes before the read


@pytest.mark.parametrize("kind", ["raw", "coded", "multi"])
def test_frame_over_max_record_bytes_is_refused_before_it_is_read(tmp_path: Path, kind: str) -> None:
    """A raw frame is as large stored as decoded, so reading it was the allocation that
    max_record_bytes bounds: every read path refuses a frame over the budget from its footer
    row, before reading it (it used to read all of it first, coded frames too)."""
    big_bytes = 4 << 20
    g = torch.Generator().manual_seed(4)
    big = torch.randint(0, 256, (big_bytes,), dtype=torch.uint8, generator=g)
    options = {"raw": {}, "coded": {"raw_below": 0}, "multi": {"frame_target_bytes": 1 << 20}}[kind]
    store = tmp_path / "s"
    ts.write_store([big, torch.zeros(4), torch.ones(4)], store, codec="zstd", **options)
    _, rows = _frames(store)
    assert rows[0][1] > big_bytes and rows[0][2] == (kind != "coded")  # the frame holding record 0
    reader = ts.open_store(store, max_record_bytes=big_bytes // 4)
    assert torch.equal(reader[1], torch.zeros(4))
    list(reader.read_many([1]))  # warm: read_many's first call imports numpy.ma (about 1 MB)

    for read in (lambda: reader[0], lambda: reader.read_bytes(0)):
        peak, err = peak_bytes(read)
        assert isinstance(err, AllocationBudgetError) and "record 0" in str(err), repr(err)
        assert peak < big_bytes // 8, f"peak {peak} bytes"
    got: list[Any] = []
    peak, err = peak_bytes(lambda: got.extend(reader.read_many([0, 1, 2], on_error="return")))
    assert err is None and peak < big_bytes // 8, f"peak {peak} bytes"
    assert isinstance(got[0], AllocationBudgetError) and "record 0" in str(got[0])
    assert torch.equal(got[1], torch.zeros(4)) and torch.equal(got[2], torch.ones(4))


# --------------------------------------------------------------------------- audit: dictionary training positions


def test_audit_dictionary_training_positions_do_not_scale_with_the_store() -> None:
    """Which records the audit trains candidate dictionaries on: evenly spread over those not
    in the measured sample, as before, but without a Python list of every record position
    (about 36 bytes a record: 3.6 GB for a store of 100 million records)."""
    from tensorstore_pt.audit import _evenly, _train_positions

    wants_dict = ({"id": "zstd", "level": 3, "dictionary": 1024},)
    for n, sample, k in [(50, [0, 7, 8, 49], 10), (10, list(range(10)), 5), (300, _evenly(300, 64), 256), (5, [], 3)]:
        rest = [i for i in range(n) if i not in set(sample)]
        assert _train_positions(n, sample, wants_dict, k) == [rest[j] for j in _evenly(len(rest), k)]
    n = 2_000_000
    sample = _evenly(n, 64)
    got: list[int] = []
    peak, err = peak_bytes(lambda: got.extend(_train_positions(n, sample, wants_dict)))
    assert err is None and peak < 256 * 1024, f"peak {peak} bytes"
    assert len(got) == 256 and not set(got) & set(sample) and got == sorted(got) and got[-1] < n
