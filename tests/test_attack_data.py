"""Hostile loader states, huge requests, and exactly-once over elastic chains on tiny stores.

Each test here failed (or hung, or raised an untyped error) before its fix:

- a state naming a huge world size made ``load_state_dict`` / ``merge_states`` allocate a
  list per rank (MemoryError, or minutes of work) instead of refusing it;
- an epoch past int64 reached the shared control tensor (torch's RuntimeError, untyped);
- a plan out of epoch order was accepted (no saved state has one);
- ``read_many(range(huge))`` allocated the whole range before its bounds were checked;
- ``iter_many`` planned every request at once (about 50 bytes a request);
- ``rest_of_epoch`` walked every rank in Python (seconds for a million ranks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorstore_pt as tspt
import tensorstore_pt.reader as reader_mod
from tensorstore_pt import InvalidOptionError, RecordIndexError, StoreDataLoader, StoreIterableDataset
from tensorstore_pt._partition import EQUALIZE_MODES, EpochPlan, RankSplit, rest_of_epoch

pytestmark = [
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
    pytest.mark.filterwarnings("ignore:DataLoader worker.*get no samples"),
    pytest.mark.filterwarnings("ignore:rank .* gets no samples"),
]

SIZES = (1, 2, 5, 11)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = {}
    for n in SIZES:
        path = tmp_path_factory.mktemp("attack") / f"s{n}"
        tspt.write_store(({"id": torch.tensor(i)} for i in range(n)), path, max_shard_bytes=3000)
        out[n] = path
    return out


def _loader(path: Path, rank: int, world: int, mode: str, batch: int, workers: int = 0) -> StoreDataLoader:
    ds = StoreIterableDataset(
        path, shuffle=True, seed=3, rank=rank, world_size=world, equalize=mode, block_records=2, window_records=3
    )
    return StoreDataLoader(ds, batch_size=batch, num_workers=workers)


def _ids(batches) -> list[int]:
    return [x for b in batches for x in b["id"].tolist()]


# ----------------------------------------------------------------------------- hostile states


def test_a_state_naming_a_huge_world_size_is_refused_at_once(stores: dict[int, Path]) -> None:
    ld = _loader(stores[5], 0, 2, "pad", 1)
    state = ld.state_dict()
    t0 = time.perf_counter()
    for world in (2**40, 10**12):
        with pytest.raises(InvalidOptionError, match=r"state world_size: expected an int in \[1, 1048576\]"):
            ld.load_state_dict({**state, "world_size": world})
        huge = [{**state, "world_size": world, "rank": r} for r in range(2)]
        with pytest.raises(InvalidOptionError, match="state world_size"):
            StoreDataLoader.merge_states(huge)
    assert time.perf_counter() - t0 < 5
    # merge_states counts the states before it lists the ranks a world size names
    with pytest.raises(InvalidOptionError, match="one state from each rank"):
        StoreDataLoader.merge_states([{**state, "world_size": 2**20, "rank": r} for r in range(2)])
    # a bool is not a rank
    with pytest.raises(InvalidOptionError, match="one state from each rank"):
        StoreDataLoader.merge_states([{**state, "rank": False}, {**state, "rank": True, "samples": 1}])


@pytest.mark.parametrize("epoch", [2**63 - 1, 2**63, 2**64, 10**30])
def test_an_epoch_past_int64_is_a_typed_error(stores: dict[int, Path], epoch: int) -> None:
    ld = _loader(stores[5], 0, 1, "off", 1)
    state = ld.state_dict()
    with pytest.raises(InvalidOptionError, match=r"state epoch: expected an int in \[0, 2\*\*63 - 1\)"):
        ld.load_state_dict({**state, "epoch": epoch})
    with pytest.raises(InvalidOptionError, match=r"epoch: expected an int in \[0, 2\*\*63 - 1\)"):
        ld.dataset.set_epoch(epoch)
    with pytest.raises(InvalidOptionError, match=r"state epoch"):
        StoreDataLoader.merge_states([{**state, "epoch": epoch}])
    assert ld.state_dict() == state  # nothing changed
    # the largest epoch accepted still runs, and moves on to the next
    ld.load_state_dict({**state, "epoch": 2**63 - 2})
    assert sorted(_ids(ld)) == list(range(5))
    assert ld.state_dict()["epoch"] == 2**63 - 1


def test_a_plan_out_of_epoch_order_is_refused(stores: dict[int, Path]) -> None:
    ld = _loader(stores[11], 0, 2, "pad", 1)
    state = ld.state_dict()
    for plan in ([[6, 9], [0, 3]], [[4, 5], [2, 3], [7, 8]], [[0, 2], [1, 3]], [[True, 2]], [[np.bool_(True), 2]]):
        with pytest.raises(InvalidOptionError, match="disjoint, ascending"):
            ld.load_state_dict({**state, "plan": plan})
    assert ld.state_dict() == state
    ld.load_state_dict({**state, "plan": [[0, 3], [6, 9]], "world_size": 3})  # ascending: fine


@pytest.mark.parametrize("option", ["batch_size", "block_records", "window_records"])
def test_sizes_past_int64_are_typed_errors(stores: dict[int, Path], option: str) -> None:
    for value in (2**63, 2**64):  # were torch's ValueError / numpy's OverflowError
        with pytest.raises(InvalidOptionError, match=rf"{option}: expected an int <= {2**62}, found {value}"):
            StoreIterableDataset(stores[5], **{option: value})
    ds = StoreIterableDataset(stores[5], shuffle=True, **{option: 2**62})
    assert sorted(int(s["id"]) for s in ds) == list(range(5))
    with pytest.raises(InvalidOptionError, match=r"batch_size: expected an int <= "):
        StoreDataLoader(StoreIterableDataset(stores[5]), batch_size=2**63)
    with pytest.raises(InvalidOptionError, match=r"batch_size: expected an int <= "):
        StoreIterableDataset(stores[5]).partition(2, batch_size=2**63)


# ----------------------------------------------------------------------------- read_many


def test_a_huge_range_is_refused_before_it_is_allocated(stores: dict[int, Path]) -> None:
    r = tspt.open_store(stores[11])
    t0 = time.perf_counter()
    for rng in (range(10**12), range(-(10**12), 0), range(0, 10**15, 7), range(10, -(10**12), -1)):
        with pytest.raises(RecordIndexError, match="out of range for store"):
            r.read_many(rng)
        with pytest.raises(RecordIndexError):
            r.plan_pieces(rng)
    assert time.perf_counter() - t0 < 5
    assert [int(s["id"]) for s in r.read_many(range(-1, -12, -3))] == [10, 7, 4, 1]
    assert r.read_many(range(5, 5)) == []


def test_ints_in_an_object_array_are_read_or_refused_by_what_they_are(stores: dict[int, Path]) -> None:
    r = tspt.open_store(stores[11])
    got = r.read_many(np.array([3, np.int64(-1), 0], dtype=object))
    assert [int(s["id"]) for s in got] == [3, 10, 0]
    with pytest.raises(RecordIndexError, match="record 11 is out of range"):
        r.read_many(np.array([3, 11, 2**70], dtype=object))
    with pytest.raises(RecordIndexError, match=f"record {2**64} is out of range"):
        r.read_many([0, 2**64])
    with pytest.raises(tspt.errors.RecordIndexTypeError, match="expected an int, found bool"):
        r.read_many(np.array([1, True], dtype=object))
    with pytest.raises(tspt.errors.RecordIndexTypeError, match="expected an int, found float"):
        r.read_many([1, 2.0])
    for req in ([None], [1, None], [None, 2**70], np.array([None, 1], dtype=object)):  # was a bare TypeError
        with pytest.raises(tspt.errors.RecordIndexTypeError, match="expected an int, found NoneType"):
            r.read_many(req)
        with pytest.raises(tspt.errors.RecordIndexTypeError):
            r[list(req)]


def test_iter_many_plans_a_bounded_number_of_requests_at_a_time(stores: dict[int, Path], monkeypatch) -> None:
    r = tspt.open_store(stores[11])
    monkeypatch.setattr(reader_mod, "PLAN_RECORDS", 7)
    sizes: list[int] = []
    real = r._plan

    def spy(recs, *args, **kwargs):
        sizes.append(len(recs))
        return real(recs, *args, **kwargs)

    monkeypatch.setattr(r, "_plan", spy)
    req = [3, 3, -1, 0, 10, 5, 5, 5, 2, 9, 1, 0, 4, 8, 6, 7, 3]
    assert [int(s["id"]) for s in r.read_many(req)] == [x % 11 for x in req]
    assert sizes and max(sizes) <= 7 and sum(sizes) == len(req)


# ----------------------------------------------------------------------------- elastic chains


def test_rest_of_epoch_for_a_million_ranks_is_vectorised() -> None:
    w = 2**20
    n = 1000 * w  # pad: no padding, every share 1000 positions
    t0 = time.perf_counter()
    rest = rest_of_epoch(n, w, "pad", 5)
    # every rank delivered 5 of its 1000 positions: one gap per rank
    assert len(rest.intervals) == w and len(rest) == n - 5 * w
    assert rest.intervals[0].tolist() == [5, 1000] and rest.intervals[-1].tolist() == [n - 995, n]
    again = rest_of_epoch(n, w, "off", [1] * w, rest)
    assert len(again) == len(rest) - w
    assert time.perf_counter() - t0 < 10  # a Python loop over the ranks took minutes


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(1, 9),
    st.sampled_from(EQUALIZE_MODES),
    st.data(),
)
def test_vectorised_rest_of_epoch_matches_the_per_rank_model(n: int, w: int, mode: str, data: st.DataObject) -> None:
    plan = None
    if n and data.draw(st.booleans()):
        cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=6))) | {0, n})
        keep = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if data.draw(st.booleans())]
        plan = EpochPlan(np.array(keep, dtype=np.int64).reshape(-1, 2))
    m = n if plan is None else len(plan)
    splits = [RankSplit.compute(n, w, k, mode, plan) for k in range(w)]
    per_rank = data.draw(st.booleans())
    counts = [data.draw(st.integers(0, sp.length)) for sp in splits] if per_rank else data.draw(st.integers(0, m + 3))
    done = set()
    for k, sp in enumerate(splits):
        c = counts[k] if per_rank else min(counts, sp.length)
        done |= set(sp.global_positions(np.arange(c, dtype=np.int64)).tolist())
    seq = list(range(n)) if plan is None else plan.global_positions(np.arange(m)).tolist()
    rest = rest_of_epoch(n, w, mode, counts, plan)
    assert rest.global_positions(np.arange(len(rest))).tolist() == [g for g in seq if g not in done]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(SIZES),
    st.lists(
        st.tuples(st.integers(1, 5), st.sampled_from(EQUALIZE_MODES), st.integers(1, 4), st.integers(0, 3)),
        min_size=1,
        max_size=3,
    ),
    st.integers(1, 5),
    st.sampled_from(EQUALIZE_MODES),
    st.integers(1, 7),
)
def test_elastic_chains_on_tiny_stores_deliver_the_epoch_exactly_once(
    stores: dict[int, Path], n: int, chain: list, w_last: int, m_last: str, b_last: int
) -> None:
    """W -> W' -> ... -> W_last over 1..5 ranks (N < W' included), each step stopping after a
    few batches in lockstep, then finishing: every record is delivered, none twice except the
    pads of each split, and the last step's ranks deliver the same count (pad/drop)."""
    state = None
    delivered: list[int] = []
    pads = 0
    last = None  # the loaders of the split that finished the epoch
    for world, mode, batch, steps in [*chain, (w_last, m_last, b_last, None)]:
        lds = [_loader(stores[n], r, world, mode, batch) for r in range(world)]
        if state is not None:
            for ld in lds:
                ld.load_state_dict(json.loads(json.dumps(state)))
        report = lds[0].dataset.partition()
        pads += report.padded
        if steps is None:  # the last split runs to the end of the epoch
            shares = [_ids(ld) for ld in lds]
            if mode != "off":
                assert len({len(s) for s in shares}) == 1  # equal batches on every rank
            delivered += [x for s in shares for x in s]
            last = (lds, report)
            break
        its = [iter(ld) for ld in lds]
        for _ in range(steps):
            got = [next(it, None) for it in its]
            delivered += _ids(g for g in got if g is not None)
            if any(g is None for g in got):
                assert all(g is None for g in got) or mode == "off"  # pad/drop ranks end together
                break
        state = StoreDataLoader.merge_states([ld.state_dict() for ld in lds])
        del its
        if state["epoch"] != 0:  # this split finished the epoch
            last = (lds, report)
            break
    assert last is not None
    dropped = last[1].dropped
    assert len(delivered) - len(set(delivered)) <= pads  # repeats: only pads
    assert len(set(delivered)) == n - dropped and set(delivered) <= set(range(n))
    for ld in last[0]:
        assert ld.state_dict()["epoch"] == 1


@pytest.mark.parametrize(("w1", "workers", "batch"), [(3, 3, 1), (2, 4, 2), (5, 2, 4)])
def test_more_workers_than_batches_after_an_elastic_resume(
    stores: dict[int, Path], w1: int, workers: int, batch: int
) -> None:
    old = [_loader(stores[5], r, 2, "pad", 1) for r in range(2)]
    first = [_ids([next(iter(ld))]) for ld in old]
    state = StoreDataLoader.merge_states([ld.state_dict() for ld in old])
    new = [_loader(stores[5], r, w1, "pad", batch, workers) for r in range(w1)]
    for ld in new:
        ld.load_state_dict(state)
    rest = [_ids(ld) for ld in new]
    assert len({len(s) for s in rest}) == 1
    everything = [x for s in first + rest for x in s]
    assert sorted(set(everything)) == list(range(5))


# ----------------------------------------------------------------------------- threads, multi-record frames

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["v1.1/lz4-frames", "v1.1/zstd-dict-frames", "v1.0/zstd"])
def test_many_threads_read_many_with_duplicates_and_negatives(tmp_path: Path, name: str) -> None:
    import shutil
    import threading

    path = tmp_path / "s"
    shutil.copytree(FIXTURES / name, path)
    r = tspt.open_store(path)
    n = len(r)
    truth = [r.read_bytes(i) for i in range(n)]
    # damage one byte in the middle of a middle shard: its frame's records fail, none else
    shards = r.index.shards
    mid = shards[len(shards) // 2]
    with open(path / mid.name, "r+b") as f:
        f.seek(mid.file_bytes // 2)
        b = f.read(1)
        f.seek(mid.file_bytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    damaged = tspt.open_store(path, verify=False)
    bad = set()
    for i in range(n):
        try:
            assert damaged.read_bytes(i) == truth[i]
        except tspt.CorruptStoreError:
            bad.add(i)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                req = rng.integers(-n, n, size=int(rng.integers(0, 3 * n))).tolist()
                got = damaged.read_many(req, raw=True, on_error="return", read_bytes=int(rng.integers(1, 5000)))
                for i, g in zip(req, got):
                    if i % n in bad:
                        assert isinstance(g, tspt.CorruptStoreError), (i, g)
                    else:
                        assert bytes(g.data) == truth[i % n]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
