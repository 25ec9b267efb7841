"""Shuffled epochs of stores with multi-record frames: a consumer reads each group of its records
in store order (each frame decoded once) and hands them out in the epoch's order.

Every test compares with what the epoch order and single reads give independently
(``epoch_order``, ``StoreReader.read``), or with the same dataset reading in the order asked
(``_group_records = None``, the path before grouping).
"""

from __future__ import annotations

import re
import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorstore_pt as tspt
from tensorstore_pt import dataset as dataset_module
from tensorstore_pt import reader as reader_module
from tensorstore_pt.dataset import StoreDataLoader, StoreIterableDataset, default_block_window
from tensorstore_pt.format import FEATURE_MULTI_RECORD_FRAMES

from strategies import assert_identical

N = 300


def _samples(n: int) -> list[Any]:
    # fixed shapes: torch's default_collate stacks them
    return [{"i": torch.tensor(i), "x": torch.arange(6, dtype=torch.float32) * i + i % 7} for i in range(n)]


@pytest.fixture(scope="module", params=["compact", "frames"])
def store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "s"
    if request.param == "compact":  # blocks of about 1500 content bytes: some 6 records
        tspt.write_store(_samples(N), path, codec="zstd", frame_target_bytes=1500, max_shard_bytes=8192, compact=True)
    else:  # frames of about 6000 torch.save bytes: some 4 records
        tspt.write_store(_samples(N), path, codec="zstd", frame_target_bytes=6000, max_shard_bytes=16384)
    with tspt.open_store(path) as r:
        assert FEATURE_MULTI_RECORD_FRAMES in r.index.features and len(r.index.shards) > 2
    assert 3 * _frames(path) < N
    return path


def _ds(path: Path, grouped: bool = True, **kw: Any) -> StoreIterableDataset:
    kw = {"shuffle": True, "seed": 5, "block_records": 7, "window_records": 90, **kw}
    ds = StoreIterableDataset(path, **kw)
    if not grouped:
        ds._group_records = None  # read in the order asked: the path before grouping
    return ds


def _frames(path: Path) -> int:
    with tspt.open_store(path) as r:
        return sum(len(r._footer(si).table) for si in range(len(r.index.shards)))


class _DecodeCount:
    """Counts frames checked and decoded by any reader (``reader.check_frame``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = reader_module.check_frame

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(reader_module, "check_frame", counted)


@pytest.mark.parametrize("cap", [None, 13])
def test_a_shuffled_epoch_is_the_epoch_order_read_record_by_record(
    store: Path, cap: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _ds(store)
    if cap is not None:
        ds._group_records = cap  # groups of 13: several sorted reads a window
    ds.set_epoch(2)
    got = list(ds)
    order = ds.epoch_order(2).tolist()
    assert sorted(order) == list(range(N)) and order != sorted(order)
    assert [int(s["i"]) for s in got] == order
    with tspt.open_store(store) as r:
        for pos in (0, 1, 57, 151, N - 1):
            assert_identical(r.read(order[pos]), got[pos])


def test_each_frame_is_decoded_once_a_group(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _frames(store)
    count = _DecodeCount(monkeypatch)
    ds = _ds(store, window_records=N)  # one window: one group, every frame of the store
    assert ds._group_records >= N
    assert len(list(ds)) == N
    assert count.calls == frames  # a local store: no first batch read apart (it would decode twice)
    # Pieces of a few frames (a store much larger than a piece): in the window's order a frame
    # is decoded again for nearly every record; sorted, once (twice where a piece ends in it).
    monkeypatch.setattr(dataset_module, "READ_BYTES", 3000)
    count.calls = 0
    assert len(list(_ds(store, window_records=N))) == N
    grouped = count.calls
    count.calls = 0
    assert len(list(_ds(store, grouped=False, window_records=N))) == N
    assert grouped < 1.5 * frames < 3 * frames < count.calls


@pytest.mark.parametrize("collate", ["default", "list"])
def test_loaders_give_the_batches_of_reading_in_order(store: Path, collate: str) -> None:
    def batches(grouped: bool, workers: int = 0) -> list[Any]:
        ds = _ds(store, grouped)
        ds.set_epoch(1)
        kw: dict[str, Any] = {} if collate == "default" else {"collate_fn": list}
        return list(StoreDataLoader(ds, batch_size=8, num_workers=workers, **kw))

    want = batches(False)
    assert len(want) == (N + 7) // 8
    assert_identical(want, batches(True))
    in_workers = batches(True, workers=2)
    assert_identical(batches(False, workers=2), in_workers)
    assert_identical(want, in_workers, layout=False)  # values; workers' batches are stacked in place


def test_skipped_and_raised_records_keep_their_turn(tmp_path: Path) -> None:
    path = tmp_path / "s"
    tspt.write_store(_samples(N), path, codec="zstd", frame_target_bytes=1500, max_shard_bytes=8192, compact=True)
    with tspt.open_store(path) as r:
        shard = r.index.shards[1]
        row = r._footer(1).table[2]
    f = path / shard.name
    data = bytearray(f.read_bytes())
    data[int(row["offset"]) + int(row["stored"]) // 2] ^= 0xFF  # one frame's records fail their checksum
    f.write_bytes(bytes(data))

    def run(grouped: bool, on_error: str) -> tuple[list[int], BaseException | None, dict[str, int]]:
        ds = _ds(path, grouped, on_error=on_error)
        got: list[int] = []
        try:
            for s in ds:
                got.append(int(s["i"]))
        except tspt.CorruptStoreError as exc:
            return got, exc, ds.skip_counts()
        return got, None, ds.skip_counts()

    got, exc, skips = run(True, "skip")
    want = run(False, "skip")
    assert (got, exc, skips) == want
    assert exc is None and 0 < N - len(got) == sum(skips.values())
    got, exc, _ = run(True, "raise")
    want_got, want_exc, _ = run(False, "raise")
    assert got == want_got and type(exc) is type(want_exc)
    # The same frame's error: it names the record whose read decoded the frame (sorted: its
    # first record; in the window's order: the first one asked for).
    assert re.sub(r"record \d+", "record N", str(exc)) == re.sub(r"record \d+", "record N", str(want_exc))
    order = _ds(path).epoch_order(0).tolist()
    assert got == order[: len(got)] and len(got) < N


def test_resume_and_padded_ranks_match_reading_in_order(store: Path) -> None:
    def rest(grouped: bool) -> tuple[list[Any], list[Any]]:
        ds = _ds(store, grouped)
        loader = StoreDataLoader(ds, batch_size=6)
        head = []
        for k, batch in enumerate(loader):
            head.append(batch)
            if k == 9:
                break
        fresh = StoreDataLoader(_ds(store, grouped), batch_size=6)
        fresh.load_state_dict(loader.state_dict())
        return head, list(fresh)

    head, tail = rest(True)
    want_head, want_tail = rest(False)
    assert_identical(want_head, head)
    assert_identical(want_tail, tail)
    for rank in range(3):  # 300 records over 7 ranks, padded: repeats within a rank's share
        a = [int(s["i"]) for s in _ds(store, True, rank=rank, world_size=7, equalize="pad")]
        b = [int(s["i"]) for s in _ds(store, False, rank=rank, world_size=7, equalize="pad")]
        assert a == b and len(a) == -(-N // 7)


def test_the_auto_window_holds_a_bounded_share_of_decoded_bytes(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mib = 2**20
    # one record a frame: the window as before; multi-record frames: at most 32 MiB of records
    assert default_block_window(10**6, 10**6 * 1000) == (262, 256 * 262)
    assert default_block_window(10**6, 10**6 * 1000, raw_bytes=10**6 * 4096) == (262, 32 * mib // 4096)
    assert default_block_window(100, 100 * 10 * mib, raw_bytes=100 * 64 * mib) == (1, 1)  # never below a block
    ds = StoreIterableDataset(store)
    with tspt.open_store(store) as r:
        mean = sum(s.raw_bytes for s in r.index.shards) / N
    assert ds._group_records == int(32 * mib // mean) and ds.window_records <= max(ds.block_records, N, 2**18)
    monkeypatch.setattr(dataset_module, "WINDOW_DECODED_BYTES", int(40 * mean))
    ds = StoreIterableDataset(store, shuffle=True, block_records=7)
    assert ds._group_records == 40 and ds.window_records == 40
    assert StoreIterableDataset(store, block_records=50).window_records == 50  # never below a block
    assert [int(s["i"]) for s in ds] == ds.epoch_order(0).tolist()


def test_groups_are_cut_at_the_cap_and_only_sorted_when_out_of_order(store: Path) -> None:
    ds = _ds(store)
    ds._group_records = 4
    split, start, chunk, layout, order = ds._walk()
    segments = dataset_module.worker_segments(split, layout.window_records, start, chunk, 1, 0)
    groups = list(ds._read_groups(segments, split, order))
    flat: list[int] = []
    for records, sorter in groups:
        assert 1 <= len(records) <= 4
        assert (np.diff(records) >= 0).all()
        if sorter is None:
            flat.extend(records.tolist())
        else:
            back = np.empty_like(records)
            back[sorter] = records
            assert (np.diff(back) < 0).any()
            flat.extend(back.tolist())
    assert flat == ds.epoch_order(0).tolist()
    plain = StoreIterableDataset(store)  # store order: nothing to sort
    split, start, chunk, layout, order = plain._walk()
    segments = dataset_module.worker_segments(split, layout.window_records, start, chunk, 1, 0)
    assert all(s is None for _, s in plain._read_groups(segments, split, order))


@pytest.mark.parametrize("which", ["last", "middle"])
def test_a_storage_error_comes_after_the_samples_before_it(
    store: Path, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError reading one shard (not a record's error: it ends the epoch) while a group is
    gathered: the group's samples before the first record not read are handed out first, then
    the error. Pieces of one frame each. In the window's order, reading stops at the first
    record of the failing shard; sorted, at the failing shard, so records of later shards are
    not read either: the samples before the error are then a shorter prefix of the order (and
    resuming from the loader's count continues exactly there)."""
    monkeypatch.setattr(dataset_module, "READ_BYTES", 1)
    with tspt.open_store(store) as r:
        bounds = r.shard_bounds().tolist()
    bad = len(bounds) - 1 if which == "last" else len(bounds) - 2
    real = reader_module.StoreReader._read_run

    def read_run(self: Any, si: int, *args: Any) -> Any:
        if si == bad:
            raise OSError(5, "injected read error")
        return real(self, si, *args)

    monkeypatch.setattr(reader_module.StoreReader, "_read_run", read_run)

    def delivered(grouped: bool) -> list[int]:
        got: list[int] = []
        with pytest.raises(OSError, match="injected"):
            for s in _ds(store, grouped, window_records=N):
                got.append(int(s["i"]))
        return got

    order = _ds(store, window_records=N).epoch_order(0).tolist()
    in_order = next(k for k, rec in enumerate(order) if bounds[bad][0] <= rec < bounds[bad][1])
    sorted_stop = next(k for k, rec in enumerate(order) if rec >= bounds[bad][0])
    assert delivered(False) == order[:in_order]
    assert delivered(True) == order[:sorted_stop]
    assert sorted_stop == in_order > 0 if which == "last" else sorted_stop <= in_order


def test_a_group_under_default_collate_holds_samples_not_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With default_collate the batch decoding takes RawRecords, each of which pins its whole
    decoded column block: a group drawing a few records from each of many blocks held dozens of
    blocks (75x the budget in a fresh-eyes attack). A group's records are loaded instead: at a
    batch boundary only the blocks of the piece being decoded are alive."""
    from tensorstore_pt.columnar import ColumnBlock

    path = tmp_path / "s"
    samples = [{"i": torch.tensor(i), "x": torch.full((64,), float(i))} for i in range(2000)]
    tspt.write_store(samples, path, codec="zstd", compact=True, frame_target_bytes=4000, max_shard_bytes=64 * 2**10)
    frames = _frames(path)
    assert frames > 100
    monkeypatch.setattr(dataset_module, "WINDOW_DECODED_BYTES", 60 * 700)  # groups of some 60 records
    ds = StoreIterableDataset(path, shuffle=True, seed=1, window_records=2000)
    assert 20 <= ds._group_records <= 200 and ds.window_records == 2000

    def blocks() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is ColumnBlock)

    gc.collect()
    before = blocks()  # kept by earlier tests' readers (their frame caches)
    live = []
    got = []
    for batch in StoreDataLoader(ds, batch_size=16):
        live.append(blocks() - before)
        got.extend(batch["i"].tolist())
    assert got == ds.epoch_order(0).tolist()
    assert max(live) <= 3, live
