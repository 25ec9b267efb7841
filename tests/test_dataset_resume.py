"""StoreDataLoader resume: consumer-side position, any num_workers, epoch boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tensorstore_pt as tspt
from tensorstore_pt import InvalidOptionError, StoreDataLoader, StoreIterableDataset

N = 41
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "s41"
    tspt.write_store(({"id": torch.tensor(i)} for i in range(N)), path, max_shard_bytes=8000)
    return path


def batch_ids(batch) -> list[int]:
    return batch["id"].tolist()


def make(store: Path, **kwargs) -> StoreIterableDataset:
    return StoreIterableDataset(store, shuffle=True, seed=9, rank=1, world_size=2, **kwargs)


def rank_order(ds: StoreIterableDataset, epoch: int) -> list[int]:
    order = ds.epoch_order(epoch).tolist()
    length = len(ds)  # pad: ceil(41 / 2) = 21, rank 1 starts at 21 and wraps to 0
    return [order[(length + j) % N] for j in range(length)]


@pytest.mark.parametrize(("k", "workers_before", "workers_after"), [(2, 2, 2), (3, 2, 0), (1, 1, 3), (5, 3, 2)])
def test_resume_mid_epoch_with_prefetching_workers(
    store: Path, k: int, workers_before: int, workers_after: int
) -> None:
    ds = make(store)
    expected = rank_order(ds, 0)
    loader = StoreDataLoader(
        ds, batch_size=3, num_workers=workers_before, prefetch_factor=4 if workers_before else None
    )
    head: list[int] = []
    it = iter(loader)
    for _ in range(k):
        head += batch_ids(next(it))
    state = loader.state_dict()
    # Workers have prefetched well past the consumer; the state counts what was delivered.
    assert state["epoch"] == 0 and state["samples"] == 3 * k
    state = json.loads(json.dumps(state))
    del it, loader

    fresh = make(store)
    resumed = StoreDataLoader(fresh, batch_size=3, num_workers=workers_after)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # right after loading, the state is the loaded one
    tail = [x for b in resumed for x in batch_ids(b)]
    assert head + tail == expected
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["samples"] == 0


def test_resume_with_another_batch_size_and_drop_last(store: Path) -> None:
    ds = make(store)
    expected = rank_order(ds, 0)
    loader = StoreDataLoader(ds, batch_size=4, num_workers=2)
    it = iter(loader)
    head = batch_ids(next(it)) + batch_ids(next(it))
    state = loader.state_dict()
    del it
    resumed = StoreDataLoader(make(store), batch_size=5, num_workers=2, drop_last=True)
    resumed.load_state_dict(state)
    tail = [x for b in resumed for x in batch_ids(b)]
    assert head + tail == expected[: 8 + (len(expected) - 8) // 5 * 5]
    assert resumed.state_dict()["epoch"] == 1


def test_resume_at_epoch_boundary_starts_next_epoch(store: Path) -> None:
    ds = make(store)
    loader = StoreDataLoader(ds, batch_size=4, num_workers=2)
    batches = list(iter(loader))
    assert [x for b in batches for x in batch_ids(b)] == rank_order(ds, 0)
    state = loader.state_dict()
    assert (state["epoch"], state["samples"]) == (1, 0)
    resumed = StoreDataLoader(make(store), batch_size=4, num_workers=1)
    resumed.load_state_dict(state)
    epoch1 = [x for b in resumed for x in batch_ids(b)]
    assert epoch1 == rank_order(ds, 1) and epoch1 != rank_order(ds, 0)


def test_state_after_last_batch_inside_the_loop_is_the_next_epoch(store: Path) -> None:
    ds = make(store)
    loader = StoreDataLoader(ds, batch_size=7, num_workers=2)
    states = [loader.state_dict() for _ in loader]
    assert [(s["epoch"], s["samples"]) for s in states] == [(0, 7), (0, 14), (1, 0)]


def test_iter_continues_after_break_and_set_epoch_semantics(store: Path) -> None:
    ds = make(store)
    loader = StoreDataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
    first = []
    for b in loader:
        first += batch_ids(b)
        if len(first) == 6:
            break
    ds.set_epoch(0)  # already in epoch 0: keeps the position (a loop may call this every epoch)
    rest = [x for b in loader for x in batch_ids(b)]
    assert first + rest == rank_order(ds, 0)
    assert ds.epoch == 1 and [x for b in loader for x in batch_ids(b)] == rank_order(ds, 1)
    ds.set_epoch(5)
    assert loader.state_dict()["epoch"] == 5
    assert [x for b in loader for x in batch_ids(b)] == rank_order(ds, 5)
    ds.set_epoch(5)  # now at the start of epoch 6: moving back to 5 re-reads it
    assert [x for b in loader for x in batch_ids(b)] == rank_order(ds, 5)


def test_rank_zero_state_restores_every_rank(store: Path) -> None:
    """DDP checkpoints are usually written by rank 0 only; ranks advance in lockstep."""
    loaders = [
        StoreDataLoader(StoreIterableDataset(store, shuffle=True, rank=r, world_size=2), batch_size=4) for r in (0, 1)
    ]
    iters = [iter(x) for x in loaders]
    heads = [batch_ids(next(it)) + batch_ids(next(it)) for it in iters]
    state0 = loaders[0].state_dict()
    assert state0["rank"] == 0 and state0["samples"] == loaders[1].state_dict()["samples"] == 8
    for r in (0, 1):
        ds = StoreIterableDataset(store, shuffle=True, rank=r, world_size=2)
        resumed = StoreDataLoader(ds, batch_size=4, num_workers=2)
        resumed.load_state_dict(state0)
        order = ds.epoch_order(0).tolist()
        assert heads[r] + [x for b in resumed for x in batch_ids(b)] == [order[(r * 21 + j) % N] for j in range(21)]


def test_load_state_dict_refuses_other_runs(store: Path) -> None:
    loader = StoreDataLoader(make(store), batch_size=3)
    state = loader.state_dict()
    other_seed = StoreDataLoader(StoreIterableDataset(store, shuffle=True, seed=10, rank=1, world_size=2), batch_size=3)
    with pytest.raises(InvalidOptionError, match="seed: state has 9, this loader has 10"):
        other_seed.load_state_dict(state)
    other_world = StoreDataLoader(StoreIterableDataset(store, shuffle=True, seed=9, rank=1, world_size=3), batch_size=3)
    other_world.load_state_dict(state)  # another world size: an elastic resume (tests/test_dataset_elastic.py)
    assert other_world.state_dict()["world_size"] == 3 and other_world.state_dict()["plan"] is None
    with pytest.raises(InvalidOptionError, match=r"expected version in \[1, 2\], found 3"):
        loader.load_state_dict({**state, "version": 3})
    with pytest.raises(InvalidOptionError, match="expected a dict from StoreDataLoader.state_dict"):
        loader.load_state_dict({"epoch": 1})
    with pytest.raises(InvalidOptionError, match="state samples: expected at most 21"):
        loader.load_state_dict({**state, "samples": 22})
    with pytest.raises(InvalidOptionError, match="state epoch: expected an int >= 0, found -1"):
        loader.load_state_dict({**state, "epoch": -1})
