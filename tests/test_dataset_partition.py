"""Properties of the epoch order and the rank/worker split (pure numpy, no processes).

The DataLoader's delivery is emulated exactly as torch does it for an IterableDataset with
``in_order=True``: batches of ``batch_size`` are taken from the active workers in turn, and a
worker that returns an empty (or, with ``drop_last``, a partial) batch is retired.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorstore_pt._partition import (
    EQUALIZE_MODES,
    BlockLayout,
    EpochOrder,
    RankSplit,
    keyed_permutation,
    mix_key,
    worker_sample_count,
    worker_segments,
)


def _bounds(sizes: list[int]) -> np.ndarray:
    ends = np.cumsum(sizes, dtype=np.int64)
    return np.stack([ends - np.asarray(sizes, np.int64), ends], axis=1) if sizes else np.zeros((0, 2), np.int64)


def worker_stream(split, order, window, start, chunk, k, w) -> list[int]:
    segs = list(worker_segments(split, window, start, chunk, k, w))
    if not segs:
        return []
    return order.records_at(split.global_positions(np.concatenate(segs))).tolist()


def emulate_dataloader(streams: list[list[int]], batch_size: int, drop_last: bool) -> list[list[int]]:
    """Batches in the order torch's DataLoader delivers them from per-worker sample streams."""
    pos = [0] * len(streams)
    active = [True] * len(streams)
    out: list[list[int]] = []
    for w in itertools.cycle(range(len(streams))):
        if not any(active):
            return out
        if not active[w]:
            continue
        batch = streams[w][pos[w] : pos[w] + batch_size]
        pos[w] += len(batch)
        if not batch or (drop_last and len(batch) < batch_size):
            active[w] = False
            continue
        out.append(batch)
    raise AssertionError("unreachable")


scenario = st.fixed_dictionaries(
    {
        "shards": st.lists(st.integers(1, 9), min_size=0, max_size=6),
        "world": st.integers(1, 5),
        "mode": st.sampled_from(EQUALIZE_MODES),
        "workers": st.integers(1, 6),
        "chunk": st.integers(1, 5),
        "block": st.integers(1, 6),
        "window": st.integers(1, 20),
        "shuffle": st.booleans(),
        "seed": st.integers(0, 2**64 - 1),
        "epoch": st.integers(0, 3),
    }
)


@settings(max_examples=250, deadline=None)
@given(scenario)
def test_every_sample_once_and_delivery_follows_global_order(s: dict) -> None:
    layout = BlockLayout.build(_bounds(s["shards"]), s["block"], s["window"])
    n = layout.records
    order = EpochOrder(layout, shuffle=s["shuffle"], seed=s["seed"], epoch=s["epoch"])
    full = order.all_records()
    assert sorted(full.tolist()) == list(range(n))
    delivered_all: list[int] = []
    lengths = set()
    for rank in range(s["world"]):
        split = RankSplit.compute(n, s["world"], rank, s["mode"])
        lengths.add(split.length)
        expected = full[split.global_positions(np.arange(split.length))].tolist() if split.length else []
        streams = [
            worker_stream(split, order, s["window"], 0, s["chunk"], s["workers"], w) for w in range(s["workers"])
        ]
        for w, stream in enumerate(streams):
            assert len(stream) == worker_sample_count(split.length, 0, s["chunk"], s["workers"], w)
        batches = emulate_dataloader(streams, s["chunk"], drop_last=False)
        delivered = [x for b in batches for x in b]
        # The rank receives its share of the global order, in order, whatever the worker count.
        assert delivered == expected
        assert len(batches) == -(-split.length // s["chunk"])
        delivered_all += delivered
    counts = np.bincount(np.asarray(delivered_all, dtype=np.int64), minlength=n) if n else np.zeros(0)
    if s["mode"] == "off":
        assert (counts == 1).all()
        assert max(lengths) - min(lengths) <= 1
    elif s["mode"] == "pad":
        assert len(lengths) == 1 and (counts >= 1).all()
        assert counts.sum() - n == RankSplit.compute(n, s["world"], 0, "pad").padded
    else:
        assert len(lengths) == 1 and (counts <= 1).all()
        assert n - counts.sum() == RankSplit.compute(n, s["world"], 0, "drop").dropped
        # What is dropped is the end of the epoch order.
        assert set(np.flatnonzero(counts == 0).tolist()) == set(full[n - (n - int(counts.sum())) :].tolist())


@settings(max_examples=150, deadline=None)
@given(scenario, st.integers(0, 60), st.integers(1, 6), st.integers(1, 5), st.booleans())
def test_resume_from_any_position_with_other_workers(
    s: dict, cut: int, workers2: int, chunk2: int, drop_last: bool
) -> None:
    layout = BlockLayout.build(_bounds(s["shards"]), s["block"], s["window"])
    n = layout.records
    order = EpochOrder(layout, shuffle=s["shuffle"], seed=s["seed"], epoch=s["epoch"])
    split = RankSplit.compute(n, s["world"], s["world"] - 1, s["mode"])
    full = order.all_records()[split.global_positions(np.arange(split.length))].tolist() if split.length else []
    start = min(cut, split.length)
    streams = [worker_stream(split, order, s["window"], start, chunk2, workers2, w) for w in range(workers2)]
    rest = [x for b in emulate_dataloader(streams, chunk2, drop_last) for x in b]
    tail = full[start:]
    if drop_last:
        tail = tail[: len(tail) // chunk2 * chunk2]
    assert rest == tail


def test_blocks_never_cross_shards_and_cover_the_store() -> None:
    sizes = [5, 1, 12, 7]
    layout = BlockLayout.build(_bounds(sizes), 4, 9)
    ends = np.cumsum(sizes)
    for start, length in zip(layout.starts.tolist(), layout.lengths.tolist()):
        shard = int(np.searchsorted(ends, start, side="right"))
        assert start + length <= ends[shard]
    covered = np.concatenate([np.arange(a, a + ln) for a, ln in zip(layout.starts, layout.lengths)])
    assert covered.tolist() == list(range(sum(sizes)))
    assert layout.lengths.tolist() == [4, 1, 1, 4, 4, 4, 4, 3]


def test_keyed_permutation_is_deterministic_and_keyed() -> None:
    a = keyed_permutation(1000, mix_key(1, 2, 3))
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, keyed_permutation(1000, mix_key(1, 2, 3)))
    assert not np.array_equal(a, keyed_permutation(1000, mix_key(1, 2, 4)))
    assert keyed_permutation(0, 5).shape == (0,)


# seed 7, epoch 2, shards of 6, 6, 4 records, blocks of 3, windows of 5 (format of tensorstore_pt 0.1).
GOLDEN_ORDER = [6, 7, 8, 3, 4, 2, 1, 0, 9, 5, 12, 11, 13, 15, 10, 14]


def test_epoch_order_golden() -> None:
    """The order is pinned: a change here changes every user's shuffle (bump a version if intended)."""
    layout = BlockLayout.build(_bounds([6, 6, 4]), 3, 5)
    order = EpochOrder(layout, shuffle=True, seed=7, epoch=2)
    assert order.all_records().tolist() == GOLDEN_ORDER
    plain = EpochOrder(layout, shuffle=False, seed=7, epoch=2)
    assert plain.all_records().tolist() == list(range(16))


def neighbour_distances(order: np.ndarray, layout: BlockLayout) -> np.ndarray:
    """|pos(i+1) - pos(i)| for store neighbours i, i+1 inside one block."""
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    same_block = np.ones(len(order) - 1, bool)
    same_block[(layout.starts[1:] - 1)] = False
    d = np.abs(pos[1:] - pos[:-1])
    return d[same_block]


def test_shuffle_separates_store_neighbours_and_changes_with_epoch() -> None:
    layout = BlockLayout.build(_bounds([5000] * 4), 50, 3200)
    o0 = EpochOrder(layout, shuffle=True, seed=0, epoch=0).all_records()
    o1 = EpochOrder(layout, shuffle=True, seed=0, epoch=1).all_records()
    d = neighbour_distances(o0, layout)
    # Two uniform positions in a window of W are W/3 apart on average.
    assert np.median(d) > 3200 / 5
    assert np.mean(d) == pytest.approx(3200 / 3, rel=0.15)
    assert (np.abs(np.argsort(o0) - np.argsort(o1)) > 0).mean() > 0.99
    plain = EpochOrder(layout, shuffle=False, seed=0, epoch=0).all_records()
    assert (neighbour_distances(plain, layout) == 1).all()


def test_rank_split_edges() -> None:
    assert RankSplit.compute(0, 3, 2, "pad").length == 0
    s = RankSplit.compute(2, 5, 4, "pad")  # more ranks than samples: each gets one, wrapping
    assert (s.length, s.padded, s.global_positions(np.array([0])).tolist()) == (1, 3, [0])
    d = RankSplit.compute(2, 5, 4, "drop")
    assert (d.length, d.dropped) == (0, 2)
    o = [RankSplit.compute(10, 4, r, "off").length for r in range(4)]
    assert o == [2, 3, 2, 3] and sum(o) == 10
    with pytest.raises(ValueError, match="equalize mode"):
        RankSplit.compute(3, 1, 0, "sometimes")


def test_split_by_bytes_and_plan_runs() -> None:
    from tensorstore_pt._partition import plan_runs, split_by_bytes

    assert split_by_bytes(np.array([3, 3, 3, 3, 3]), 6) == [(0, 2), (2, 4), (4, 5)]
    assert split_by_bytes(np.array([10, 1, 1]), 4) == [(0, 1), (1, 3)]
    assert split_by_bytes(np.zeros(0, np.int64), 4) == []
    offsets = np.array([0, 10, 25, 100, 0, 5], np.int64)
    ends = np.array([10, 20, 30, 110, 5, 9], np.int64)
    shard = np.array([0, 0, 0, 0, 1, 1], np.int64)
    # gaps: 0, 5, 70 (too big), shard change, 0
    assert plan_runs(offsets, ends, shard, 64, 1000).tolist() == [3, 4]
    # a budget of 4 gap bytes: only the zero gaps merge
    assert plan_runs(offsets, ends, shard, 64, 4).tolist() == [2, 3, 4]
    assert plan_runs(offsets[:1], ends[:1], shard[:1], 64, 4).tolist() == []
