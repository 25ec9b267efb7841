"""Attacks on format 1.2 (raw frames) and the code that came with it, each a regression test.

- recover of a shard whose footer is lost (truncated, or the footer's bytes damaged) in a
  store that holds raw frames: every record a torch.save archive's CRC-32s still prove is
  kept, raw or coded, in order and bit-identical, and the report names exactly the records
  that were dropped (it used to drop every raw frame and misnumber what it kept).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _store_tools import flip, truncate

import tensorstore_pt as ts
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


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_recover_keeps_raw_frames_of_a_truncated_shard(tmp_path: Path, codec: str) -> None:
    samples = _mixed(9)
    store = tmp_path / "s"
    ts.write_store(samples, store, codec=codec)
    shard, rows = _frames(store)
    assert [raw for _, _, raw in rows] == [i % 3 != 2 for i in range(9)]
    truncate(shard, rows[7][0] + rows[7][1] // 2)  # inside raw frame 7: the footer is lost

    report = ts.recover_store(store)

    assert _records(store) == [dumps(s) for s in samples[:7]]
    assert _lost(report) == [(7, 9)]
    assert report.records_lost == 2
    assert "raw-frames" in ts.open_store(store).index.features
    _, kept_rows = _frames(store)
    assert [raw for _, _, raw in kept_rows] == [i % 3 != 2 for i in range(7)]  # raw frames stay raw
    assert verify_store(store, deep=True).ok


def test_recover_keeps_records_of_multi_record_raw_frames(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 256, (12000,), dtype=torch.uint8, generator=g) for _ in range(10)]
    store = tmp_path / "s"
    ts.write_store(samples, store, codec="zstd", frame_target_bytes=20000, raw_below=0.3)  # 2 a frame, raw
    shard, rows = _frames(store)
    assert len(rows) == 5 and all(raw for _, _, raw in rows)
    truncate(shard, rows[4][0] + 10)  # inside the last frame

    report = ts.recover_store(store)

    assert _records(store) == [dumps(s) for s in samples[:8]]
    assert _lost(report) == [(8, 10)]
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
