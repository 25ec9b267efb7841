"""Elastic resume: a loader state saved with world size W resumes exactly with W' ranks.

Ranks are simulated in one process with explicit ``rank``/``world_size``. The expected rest of
an epoch is computed independently of the implementation: the epoch order (``epoch_order``)
with every record some old rank delivered taken out, in epoch order; the new ranks then cut it
contiguously (``pad`` wrapping to its start, ``drop`` leaving out its end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorstore_pt as tspt
from tensorstore_pt import InvalidOptionError, StoreDataLoader, StoreIterableDataset
from tensorstore_pt._partition import (
    EQUALIZE_MODES,
    EpochPlan,
    RankSplit,
    rest_of_epoch,
    worker_sample_count,
    worker_segments,
)

N = 37
pytestmark = [
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
    pytest.mark.filterwarnings("ignore:DataLoader worker.*get no samples"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("elastic") / "s37"
    tspt.write_store(({"id": torch.tensor(i)} for i in range(N)), path, max_shard_bytes=6000)
    return path


def dataset(store: Path, rank: int, world: int, shuffle: bool, equalize: str = "pad") -> StoreIterableDataset:
    return StoreIterableDataset(
        store,
        shuffle=shuffle,
        seed=5,
        rank=rank,
        world_size=world,
        equalize=equalize,
        block_records=4,
        window_records=8,
    )


def loaders(store: Path, world: int, batch: int, workers: int, shuffle: bool, state=None, **kw) -> list:
    out = []
    for r in range(world):
        ld = StoreDataLoader(
            dataset(store, r, world, shuffle, kw.get("equalize", "pad")),
            batch_size=batch,
            num_workers=workers,
            persistent_workers=kw.get("persistent", False) and workers > 0,
        )
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        out.append(ld)
    return out


def ids(batches) -> list[int]:
    return [x for b in batches for x in b["id"].tolist()]


def take(loader: StoreDataLoader, steps: int) -> list[int]:
    it = iter(loader)
    got = ids(next(it) for _ in range(steps))
    del it
    return got


def common_state(lds: list) -> dict:
    states = [ld.state_dict() for ld in lds]
    for s in states[1:]:
        assert {**s, "rank": 0} == {**states[0], "rank": 0}  # lockstep ranks save the same position
    return states[0]


def cut(seq: list[int], world: int, mode: str) -> list[list[int]]:
    """The contiguous rank shares of ``seq`` (the model of the split)."""
    m = len(seq)
    if mode == "pad":
        length = -(-m // world)
        ext = [seq[i % m] for i in range(world * length)] if m else []
        return [ext[k * length : (k + 1) * length] for k in range(world)]
    if mode == "drop":
        length = m // world
        return [seq[k * length : (k + 1) * length] for k in range(world)]
    return [seq[k * m // world : (k + 1) * m // world] for k in range(world)]


CASES = [
    # (W, W', old batch, steps, new batch, old workers, new workers, shuffle, mode)
    (4, 2, 3, 2, 5, 0, 0, True, "pad"),
    (4, 2, 3, 3, 4, 0, 2, True, "pad"),  # rank 3 has delivered two pad repeats
    (4, 2, 2, 3, 3, 0, 0, False, "drop"),
    (2, 3, 4, 2, 3, 2, 0, True, "pad"),  # old workers prefetched past what was delivered
    (2, 3, 3, 4, 2, 0, 2, True, "drop"),
    (2, 3, 5, 1, 4, 0, 0, False, "pad"),
]


@pytest.mark.parametrize(("w0", "w1", "b0", "steps", "b1", "k0", "k1", "shuffle", "mode"), CASES)
def test_mid_epoch_state_resumes_with_another_world_size(
    store: Path, w0: int, w1: int, b0: int, steps: int, b1: int, k0: int, k1: int, shuffle: bool, mode: str
) -> None:
    old = loaders(store, w0, b0, k0, shuffle, equalize=mode)
    delivered = [take(ld, steps) for ld in old]
    assert all(len(d) == b0 * steps for d in delivered)
    state = common_state(old)
    assert state["version"] == 2 and state["world_size"] == w0 and state["samples"] == b0 * steps
    order = old[0].dataset.epoch_order(0).tolist()
    done = {x for d in delivered for x in d}
    rest = [x for x in order if x not in done]

    new = loaders(store, w1, b1, k1, shuffle, state, equalize=mode)
    got = [ids(ld) for ld in new]
    # Every rank gets its contiguous cut of the rest, in epoch order, all ranks equally many.
    assert got == cut(rest, w1, mode)
    assert len({len(g) for g in got}) == 1
    union = [x for g in got for x in g]
    if mode == "pad":
        assert sorted(set(union)) == sorted(rest) and len(union) - len(rest) < w1
    else:
        assert len(set(union)) == len(union) and len(rest) - len(union) < w1 and set(union) <= set(rest)
    for ld in new:  # the resumed epoch is done: the next is an ordinary one
        assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["plan"] is None and ld.state_dict()["samples"] == 0


@pytest.mark.parametrize(("w0", "w1", "k1", "shuffle"), [(4, 2, 0, True), (2, 3, 2, True), (2, 3, 0, False)])
def test_state_at_an_epoch_boundary_starts_an_ordinary_epoch(
    store: Path, w0: int, w1: int, k1: int, shuffle: bool
) -> None:
    old = loaders(store, w0, 4, 0, shuffle)
    for ld in old:
        assert len(ids(ld)) == -(-N // w0)
    state = common_state(old)
    assert (state["epoch"], state["samples"], state["plan"]) == (1, 0, None)
    new = loaders(store, w1, 3, k1, shuffle, state)
    order = new[0].dataset.epoch_order(1).tolist()
    assert [ids(ld) for ld in new] == cut(order, w1, "pad")


@pytest.mark.parametrize(("w0", "w1"), [(1, 2), (2, 1)])
def test_one_rank_to_many_and_back_with_default_equalize(store: Path, w0: int, w1: int) -> None:
    def make(world: int) -> list[StoreDataLoader]:
        return [
            StoreDataLoader(StoreIterableDataset(store, shuffle=True, seed=5, rank=r, world_size=world), batch_size=4)
            for r in range(world)
        ]

    old = make(w0)
    delivered = [take(ld, 3) for ld in old]
    state = common_state(old)
    assert state["equalize"] == ("off" if w0 == 1 else "pad")
    new = make(w1)
    for ld in new:
        ld.load_state_dict(state)
    done = {x for d in delivered for x in d}
    rest = [x for x in old[0].dataset.epoch_order(0).tolist() if x not in done]
    assert [ids(ld) for ld in new] == cut(rest, w1, "off" if w1 == 1 else "pad")


def test_states_compose_over_several_resumes_and_later_epochs_are_ordinary(store: Path) -> None:
    a = loaders(store, 4, 2, 0, True)
    first = [take(ld, 2) for ld in a]
    s1 = common_state(a)
    order = a[0].dataset.epoch_order(0).tolist()
    b = loaders(store, 2, 3, 0, True, s1)
    second = [take(ld, 2) for ld in b]
    s2 = common_state(b)
    assert s2["world_size"] == 2 and s2["samples"] == 6 and s2["plan"] is not None
    assert json.loads(json.dumps(s2)) == s2 and len(s2["plan"]) <= 4 + 2  # O(W): a few intervals
    c = loaders(store, 3, 2, 2, True, s2)
    third = [ids(ld) for ld in c]
    done = {x for d in first + second for x in d}
    rest = [x for x in order if x not in done]
    assert third == cut(rest, 3, "pad")
    everything = [x for d in first + second + third for x in d]
    assert set(everything) == set(range(N))  # no gap over the whole epoch
    repeats = len(everything) - N
    # Repeats: only the pads of the three splits (4 ranks: 3; 2 ranks: 0 or 1; 3 ranks: < 3).
    assert repeats <= 3 + 1 + 2
    # The next epoch is the ordinary epoch 1 for 3 ranks.
    nxt = [ids(ld) for ld in c]
    assert nxt == cut(c[0].dataset.epoch_order(1).tolist(), 3, "pad")


def test_same_world_size_continues_each_rank_in_place(store: Path) -> None:
    """A resumed (planned) epoch saved and loaded again with the same split continues exactly."""
    a = loaders(store, 4, 3, 0, True)
    first = [take(ld, 1) for ld in a]
    b = loaders(store, 3, 2, 0, True, common_state(a))
    second = [take(ld, 2) for ld in b]
    s = common_state(b)
    full = [ids(ld) for ld in loaders(store, 3, 2, 0, True, common_state(a))]
    again = [ids(ld) for ld in loaders(store, 3, 5, 2, True, s)]
    assert [h + t for h, t in zip(second, again)] == full
    assert first and all(len(x) == len(full[0]) for x in full)


def test_persistent_workers_are_restarted_for_a_new_plan(store: Path) -> None:
    old = loaders(store, 4, 3, 0, True)
    delivered = [take(ld, 2) for ld in old]
    state = common_state(old)
    done = {x for d in delivered for x in d}
    rest = [x for x in old[0].dataset.epoch_order(0).tolist() if x not in done]
    expected = cut(rest, 2, "pad")
    for r in range(2):
        ld = StoreDataLoader(dataset(store, r, 2, True), batch_size=3, num_workers=2, persistent_workers=True)
        take(ld, 1)  # workers start, with no plan
        ld.load_state_dict(state)
        assert ids(ld) == expected[r]


def test_version_1_state_is_read(store: Path) -> None:
    old = loaders(store, 2, 3, 0, True)
    delivered = [take(ld, 2) for ld in old]
    v1 = {k: v for k, v in common_state(old).items() if k != "plan"} | {"version": 1}
    same = loaders(store, 2, 3, 0, True, v1)
    order = old[0].dataset.epoch_order(0).tolist()
    assert [d + ids(ld) for d, ld in zip(delivered, same)] == cut(order, 2, "pad")
    other = loaders(store, 3, 3, 0, True, v1)
    done = {x for d in delivered for x in d}
    assert [ids(ld) for ld in other] == cut([x for x in order if x not in done], 3, "pad")


def test_merge_states_of_ranks_that_delivered_different_amounts(store: Path) -> None:
    old = loaders(store, 3, 2, 0, True, equalize="off")
    delivered = [take(old[0], 3), take(old[1], 1), ids(old[2])]  # rank 2 finished its share
    states = [ld.state_dict() for ld in old]
    assert states[2]["epoch"] == 1 and states[0]["samples"] == 6
    merged = StoreDataLoader.merge_states(list(reversed(states)))
    assert merged["rank"] is None and merged["samples"] == 0 and merged["epoch"] == 0
    done = {x for d in delivered for x in d}
    rest = [x for x in old[0].dataset.epoch_order(0).tolist() if x not in done]
    for world, mode in ((2, "pad"), (3, "off")):
        new = loaders(store, world, 3, 0, True, merged, equalize=mode)
        assert [ids(ld) for ld in new] == cut(rest, world, mode)
    same = [ld.state_dict() for ld in loaders(store, 2, 3, 0, True)]
    assert StoreDataLoader.merge_states(same) == same[0]
    with pytest.raises(InvalidOptionError, match="one state from each rank 0..2"):
        StoreDataLoader.merge_states(states[:2])
    with pytest.raises(InvalidOptionError, match="disagree on"):
        StoreDataLoader.merge_states([states[0], states[1], {**states[2], "seed": 6}])
    with pytest.raises(InvalidOptionError, match="non-empty list"):
        StoreDataLoader.merge_states([])


def test_bad_plans_are_refused(store: Path) -> None:
    ld = loaders(store, 2, 3, 0, True)[0]
    state = ld.state_dict()
    for plan in ([[0, 5], [3, 8]], [[0, N + 1]], [[4, 4]], [[0, "5"]], "all", [[True, 3]]):
        with pytest.raises(InvalidOptionError, match="state plan: expected None or a list of disjoint"):
            ld.load_state_dict({**state, "plan": plan})
    with pytest.raises(InvalidOptionError, match="state equalize: expected one of"):
        ld.load_state_dict({**state, "equalize": "sometimes", "world_size": 3})
    with pytest.raises(InvalidOptionError, match=r"state samples: expected at most 4 \(a rank's share"):
        ld.load_state_dict({**state, "plan": [[0, 4], [10, 14]], "samples": 5})


# ----------------------------------------------------------------------------- pure functions

steps = st.lists(
    st.tuples(st.integers(1, 6), st.sampled_from(EQUALIZE_MODES), st.integers(0, 100)), min_size=1, max_size=4
)


def _positions(split: RankSplit, upto: int) -> list[int]:
    return split.global_positions(np.arange(upto, dtype=np.int64)).tolist() if upto else []


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 60), steps)
def test_rest_of_epoch_is_what_no_rank_delivered(n: int, chain: list) -> None:
    plan: EpochPlan | None = None
    delivered: list[int] = []
    bound = 1
    for world, mode, frac in chain:
        seq = list(range(n)) if plan is None else plan.global_positions(np.arange(len(plan))).tolist()
        assert seq == sorted(set(seq)) and set(seq).isdisjoint(delivered)  # the plan is the rest, in order
        assert seq == [g for g in range(n) if g not in set(delivered)]
        splits = [RankSplit.compute(n, world, k, mode, plan) for k in range(world)]
        shares = [_positions(sp, sp.length) for sp in splits]
        assert shares == cut(seq, world, mode)  # the model of the split
        if mode != "off":
            assert len({sp.length for sp in splits}) == 1
        samples = frac * max(sp.length for sp in splits) // 100
        for sp in splits:
            delivered += _positions(sp, min(samples, sp.length))
        plan = rest_of_epoch(n, world, mode, samples, plan)
        bound += world + 2  # each resume adds at most a gap per rank, one more for a pad wrap
        assert len(plan.intervals) <= bound
    assert sorted(set(delivered) | set(plan.global_positions(np.arange(len(plan))).tolist())) == list(range(n))


@pytest.mark.parametrize(
    ("n", "world", "counts", "rest"),
    [
        (5, 2, [0, 3], [1, 2]),
        (5, 2, [1, 3], [1, 2]),
        (10, 4, [0, 0, 0, 3], [2, 3, 4, 5, 6, 7, 8]),
        (2, 5, [0] * 5, [0, 1]),
    ],
)
def test_rest_of_epoch_when_a_pad_share_wrapped(n: int, world: int, counts: list, rest: list) -> None:
    plan = rest_of_epoch(n, world, "pad", counts)
    assert plan.global_positions(np.arange(len(plan))).tolist() == rest


def test_rest_of_epoch_for_every_small_case() -> None:
    """Exhaustive over N <= 9, W <= 4, every mode and every per-rank count vector."""
    import itertools

    for n, w0, m0 in itertools.product(range(10), range(1, 5), EQUALIZE_MODES):
        splits0 = [RankSplit.compute(n, w0, k, m0) for k in range(w0)]
        shares = [_positions(sp, sp.length) for sp in splits0]
        for counts in itertools.product(*(range(sp.length + 1) for sp in splits0)):
            done = {g for share, c in zip(shares, counts) for g in share[:c]}
            rest = rest_of_epoch(n, w0, m0, list(counts))
            assert rest.global_positions(np.arange(len(rest))).tolist() == [g for g in range(n) if g not in done]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5), st.sampled_from(EQUALIZE_MODES), st.data())
def test_rest_of_epoch_with_per_rank_counts(n: int, w0: int, m0: str, data: st.DataObject) -> None:
    splits0 = [RankSplit.compute(n, w0, k, m0) for k in range(w0)]
    # Full shares are drawn often: a finished pad share wraps around to the epoch's start.
    counts = [data.draw(st.integers(0, sp.length) | st.just(sp.length)) for sp in splits0]
    done = {g for sp, c in zip(splits0, counts) for g in _positions(sp, c)}
    rest = rest_of_epoch(n, w0, m0, counts)
    assert rest.global_positions(np.arange(len(rest))).tolist() == [g for g in range(n) if g not in done]
    with pytest.raises(ValueError, match="one count per rank"):
        rest_of_epoch(n, w0, m0, counts + [0])
    with pytest.raises(ValueError, match="samples of rank 0"):
        rest_of_epoch(n, w0, m0, [splits0[0].length + 1] + counts[1:])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 60),
    steps,
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 12),
    st.integers(0, 10),
)
def test_worker_segments_follow_a_plan(
    n: int, chain: list, world: int, chunk: int, workers: int, window: int, start: int
) -> None:
    plan: EpochPlan | None = None
    for w, mode, frac in chain:
        length = RankSplit.compute(n, w, 0, mode, plan).length
        plan = rest_of_epoch(n, w, mode, frac * length // 100, plan)
    for rank in range(world):
        split = RankSplit.compute(n, world, rank, "pad", plan)
        s = min(start, split.length)
        seen: list[int] = []
        for k in range(workers):
            segs = list(worker_segments(split, window, s, chunk, workers, k))
            mine = np.concatenate(segs).tolist() if segs else []
            assert len(mine) == worker_sample_count(split.length, s, chunk, workers, k)
            assert mine == [j for j in range(s, split.length) if (j - s) // chunk % workers == k]
            for seg in segs:  # one read group: consecutive global positions inside one window
                g = split.global_positions(seg)
                assert len(set((g - seg).tolist())) == 1 and len(set((g // window).tolist())) == 1
            seen += mine
        assert sorted(seen) == list(range(s, split.length))


# ----------------------------------------------------------------------------- a real process group


def _ddp_rank(rank: int, world: int, store: str, out: str, phase: str) -> None:
    import datetime
    import os

    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)  # the rank must come from the process group
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rdv-{phase}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    try:
        loader = StoreDataLoader(StoreIterableDataset(store, shuffle=True, seed=5), batch_size=3)
        if phase == "resume":
            loader.load_state_dict(json.loads(Path(out, "state.json").read_text()))
        got: list[int] = []
        for step, batch in enumerate(loader):
            total = torch.tensor([batch["id"].numel()])
            dist.all_reduce(total)  # equal batches on every rank: no collective hangs
            got += batch["id"].tolist()
            if phase == "save" and step == 1:
                break
        states: list[object] = [None] * world
        dist.all_gather_object(states, loader.state_dict())  # the recipe for uneven ranks
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, got)
        if rank == 0:
            Path(out, f"{phase}.json").write_text(json.dumps(gathered))
            if phase == "save":
                Path(out, "state.json").write_text(json.dumps(StoreDataLoader.merge_states(states)))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gloo_process_groups_two_ranks_then_three(store: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    for phase, world in (("save", 2), ("resume", 3)):
        mp.start_processes(
            _ddp_rank, args=(world, str(store), str(tmp_path), phase), nprocs=world, start_method="fork", join=True
        )
    before = json.loads((tmp_path / "save.json").read_text())
    after = json.loads((tmp_path / "resume.json").read_text())
    assert [len(x) for x in before] == [6, 6]
    order = StoreIterableDataset(store, shuffle=True, seed=5, rank=0, world_size=1).epoch_order(0).tolist()
    done = {x for x in before[0] + before[1]}
    assert after == cut([x for x in order if x not in done], 3, "pad")
