"""StoreDataset and StoreIterableDataset through real DataLoaders (worker processes included)."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import tensorstore_pt as tspt
from tensorstore_pt import (
    ChecksumMismatchError,
    InvalidOptionError,
    MissingShardError,
    RecordIndexError,
    StoreDataLoader,
    StoreDataset,
    StoreIterableDataset,
)
from tensorstore_pt._prefetch import Prefetcher
from tensorstore_pt.dataset import PartitionWarning, consumer_info

N = 37


def _write(path: Path, n: int, max_shard_bytes: int) -> Path:
    tspt.write_store(
        ({"id": torch.tensor(i), "x": torch.full((3,), float(i))} for i in range(n)),
        path,
        max_shard_bytes=max_shard_bytes,
    )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """37 records in 6 shards."""
    path = _write(tmp_path_factory.mktemp("ds") / "s37", N, 6000)
    assert len(tspt.open_store(path).shard_bounds()) >= 5
    return path


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("ds") / "one", 11, 2**20)


def ids_of(loader) -> list[int]:
    out: list[int] = []
    for batch in loader:
        ids = batch["id"]
        out += [int(ids)] if ids.dim() == 0 else ids.tolist()
    return out


def add_one(sample: dict) -> dict:  # module level: picklable for spawned workers
    return {**sample, "id": sample["id"] + 1000}


# ----------------------------------------------------------------------------- map-style


def test_map_dataset_random_access_samplers_and_transform(store: Path) -> None:
    ds = StoreDataset(store)
    assert len(ds) == N
    assert int(ds[5]["id"]) == 5 and int(ds[-1]["id"]) == N - 1
    with pytest.raises(RecordIndexError, match=f"record {N} is out of range .* {N} records"):
        ds[N]
    with pytest.raises(InvalidOptionError, match="expected an int, found str"):
        ds["3"]
    loader = DataLoader(
        ds, batch_size=4, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)), num_workers=2
    )
    got = ids_of(loader)
    assert sorted(got) == list(range(N)) and got != list(range(N))
    seen = []
    for r in range(3):
        seen += ids_of(
            DataLoader(ds, batch_size=5, sampler=DistributedSampler(ds, num_replicas=3, rank=r, shuffle=True, seed=1))
        )
    assert set(seen) == set(range(N)) and len(seen) == 39  # DistributedSampler pads to 3 x 13
    tds = StoreDataset(tspt.open_store(store), transform=add_one)
    assert int(tds[2]["id"]) == 1002
    with pytest.raises(InvalidOptionError, match="transform: expected a callable"):
        StoreDataset(store, transform=3)
    with pytest.raises(InvalidOptionError, match="store: expected a path, a Storage or a StoreReader, found int"):
        StoreDataset(12)


# ----------------------------------------------------------------------------- iterable: splits


@pytest.mark.filterwarnings("ignore::tensorstore_pt.dataset.PartitionWarning")
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("workers", [0, 1, 2, 5])
def test_exactly_once_for_any_workers_and_world_size(store: Path, workers: int) -> None:
    """World sizes 1..4 (ranks run one after another here), equalize off / pad / drop."""
    reference = StoreIterableDataset(store, shuffle=True, seed=3).epoch_order(0).tolist()
    for world in range(1, 5):
        per_rank: dict[str, list[list[int]]] = {"off": [], "pad": [], "drop": []}
        batches: dict[str, list[int]] = {"off": [], "pad": [], "drop": []}
        for mode in ("off", "pad", "drop") if world > 1 else ("off",):
            for rank in range(world):
                ds = StoreIterableDataset(store, shuffle=True, seed=3, rank=rank, world_size=world, equalize=mode)
                loader = StoreDataLoader(ds, batch_size=3, num_workers=workers)
                got = [ids_of([b]) for b in loader]
                flat = [x for b in got for x in b]
                assert len(flat) == len(ds), (world, rank, mode)  # len() is the truth for this rank
                assert len(got) == len(loader)
                # The rank gets its contiguous share of the one global order, in order.
                split_start = {"off": rank * N // world, "pad": rank * -(-N // world), "drop": rank * (N // world)}[
                    mode
                ]
                assert flat == [reference[(split_start + j) % N] for j in range(len(flat))]
                per_rank[mode].append(flat)
                batches[mode].append(len(got))
        union = sorted(x for r in per_rank["off"] for x in r)
        assert union == list(range(N)), world
        if world > 1:
            assert len(set(batches["pad"])) == 1 and len(set(batches["drop"])) == 1
            pad = [x for r in per_rank["pad"] for x in r]
            assert set(pad) == set(range(N)) and len(pad) == world * -(-N // world)
            drop = [x for r in per_rank["drop"] for x in r]
            assert len(set(drop)) == len(drop) == world * (N // world)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_one_shard_many_consumers_and_idle_workers_are_reported(one_shard: Path) -> None:
    seen = []
    for rank in range(3):  # 3 ranks x 5 workers = 15 consumers for 11 records in one shard
        ds = StoreIterableDataset(one_shard, rank=rank, world_size=3, equalize="off")
        report = ds.partition(5, batch_size=1)
        assert report.idle_workers == ((4,) if report.rank_samples == 4 else (3, 4))
        with pytest.warns(PartitionWarning, match=rf"worker\(s\) \[.*4\] of 5 on rank {rank} get no samples"):
            loader = StoreDataLoader(ds, batch_size=1, num_workers=5)
            seen += ids_of(loader)
    assert sorted(seen) == list(range(11))


def test_more_ranks_than_samples_has_a_defined_outcome(one_shard: Path) -> None:
    got = {}
    for mode in ("pad", "drop", "off"):
        got[mode] = []
        for rank in range(16):
            ds = StoreIterableDataset(one_shard, rank=rank, world_size=16, equalize=mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got[mode].append(ids_of(StoreDataLoader(ds, batch_size=2, num_workers=0)))
            if not got[mode][-1]:
                assert any("gets no samples" in str(w.message) for w in caught)
    assert [len(r) for r in got["pad"]] == [1] * 16 and sorted({x for r in got["pad"] for x in r}) == list(range(11))
    assert [len(r) for r in got["drop"]] == [0] * 16
    assert sorted(x for r in got["off"] for x in r) == list(range(11))


def test_empty_store(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    tspt.write_store([], path)
    for workers in (0, 2):
        ds = StoreIterableDataset(path, shuffle=True, rank=1, world_size=2)
        assert len(ds) == 0
        with pytest.warns(PartitionWarning, match="is empty"):
            loader = StoreDataLoader(ds, batch_size=4, num_workers=workers)
            assert ids_of(loader) == []
        assert loader.state_dict()["epoch"] == 1
    assert len(StoreDataset(path)) == 0


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_start_methods(store: Path, method: str) -> None:
    ds = StoreIterableDataset(store, shuffle=True, seed=5, transform=add_one, rank=1, world_size=2, equalize="off")
    loader = StoreDataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=method)
    expected = [1000 + x for x in ds.epoch_order(0)[N // 2 :].tolist()]
    assert ids_of(loader) == expected


def test_persistent_workers_across_epochs(store: Path) -> None:
    ds = StoreIterableDataset(store, shuffle=True, seed=11)
    loader = StoreDataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    epochs = [ids_of(loader) for _ in range(3)]
    for e, got in enumerate(epochs):
        assert got == ds.epoch_order(e).tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    ds.set_epoch(0)  # the shared epoch reaches the persistent workers
    assert ids_of(loader) == epochs[0]
    plain = StoreIterableDataset(store)
    assert ids_of(StoreDataLoader(plain, batch_size=5, num_workers=2, persistent_workers=True)) == list(range(N))


def test_plain_dataloader_and_direct_iteration(store: Path) -> None:
    ds = StoreIterableDataset(store, shuffle=True, seed=2, batch_size=4)
    assert [int(s["id"]) for s in ds] == ds.epoch_order(0).tolist()
    assert ids_of(DataLoader(ds, batch_size=4, num_workers=2)) == ds.epoch_order(0).tolist()
    ds.set_epoch(1)
    assert ids_of(DataLoader(ds, batch_size=4, num_workers=2)) == ds.epoch_order(1).tolist()
    # Without the matching chunk the order depends on num_workers, but each sample still comes once.
    other = ids_of(DataLoader(StoreIterableDataset(store, shuffle=True, seed=2), batch_size=4, num_workers=2))
    assert sorted(other) == list(range(N))


# ----------------------------------------------------------------------------- error policy


def _corrupt_record(src: Path, dst: Path, record: int) -> None:
    shutil.copytree(src, dst)
    reader = tspt.open_store(dst)
    table = reader.record_table()
    bounds = reader.shard_bounds()
    shard = int(np.searchsorted(bounds[:, 0], record, side="right")) - 1
    name = reader.index.shards[shard].name
    with open(dst / name, "r+b") as f:
        f.seek(int(table["offset"][record]) + int(table["stored"][record]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


# storage/local.py's _LocalHandle.__del__ fails on a handle whose os.open failed (missing
# file); collect those here, so that the collector does not run them later at a worse time.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_on_error_raise_and_skip(store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad"
    _corrupt_record(store, bad, 20)
    ds = StoreIterableDataset(bad, verify=True)
    got = []
    with pytest.raises(ChecksumMismatchError, match="record 20: checksum mismatch"):
        for s in ds:
            got.append(int(s["id"]))
    assert got == list(range(20))  # the error surfaces at the bad record's turn
    children = set(multiprocessing.active_children())
    for persistent in (False, True):
        loader = StoreDataLoader(StoreIterableDataset(bad), batch_size=4, num_workers=2, persistent_workers=persistent)
        with pytest.raises(ChecksumMismatchError, match="record 20"):
            ids_of(loader)
        # The workers were stopped, not left to the cycle collector (5 s a worker).
        assert set(multiprocessing.active_children()) <= children
    with pytest.raises(ChecksumMismatchError, match="record 20"):  # and the loader can be iterated again
        ids_of(loader)
    skip = StoreIterableDataset(bad, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="tensorstore_pt.dataset"):
        assert [int(s["id"]) for s in skip] == [i for i in range(N) if i != 20]
    assert any(
        "skipped record 20" in r.getMessage() and "ChecksumMismatchError" in r.getMessage() for r in caplog.records
    )
    assert skip.skip_counts() == {"ChecksumMismatchError": 1}
    ids = ids_of(StoreDataLoader(skip, batch_size=4, num_workers=2))
    assert sorted(ids) == [i for i in range(N) if i != 20]
    assert skip.skipped == 2  # workers' counts are visible in the main process
    # A shard that disappears after the dataset was made: its records are skipped one by one.
    gone = StoreIterableDataset(bad, on_error="skip")
    gone_raise = StoreIterableDataset(bad)
    first = tspt.open_store(bad).index.shards[0]
    (bad / first.name).unlink()
    assert sorted(ids_of(StoreDataLoader(gone, batch_size=4, num_workers=2))) == [
        i for i in range(first.records, N) if i != 20
    ]
    assert gone.skip_counts() == {"ChecksumMismatchError": 1, "MissingShardError": first.records}
    with pytest.raises(MissingShardError, match=f"{first.name}.*missing"):
        list(gone_raise)
    del gone, gone_raise
    gc.collect()


# ----------------------------------------------------------------------------- background thread


def test_prefetcher_is_bounded_propagates_errors_and_stops() -> None:
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    before = threading.active_count()
    pf = Prefetcher(source(), 4)
    assert next(pf) == 0
    time.sleep(0.2)
    assert len(produced) <= 1 + 4 + 1  # consumed + queued + the one waiting to be put
    pf.close()
    deadline = time.time() + 2
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before

    def failing():
        yield 1
        yield 2
        raise ValueError("boom at 3")

    assert list(_take(Prefetcher(failing(), 8), 2)) == [1, 2]
    pf = Prefetcher(failing(), 8)
    with pytest.raises(ValueError, match="boom at 3"):
        list(pf)


def _take(it, n):
    for _ in range(n):
        yield next(it)


def test_abandoned_iterators_release_their_threads(store: Path) -> None:
    ds = StoreIterableDataset(store, prefetch_samples=2)
    before = threading.active_count()
    for _ in range(5):
        it = iter(ds)
        next(it)
        del it
    deadline = time.time() + 3
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before

    def bad_transform(sample):
        raise KeyError("transform failed")

    with pytest.raises(KeyError, match="transform failed"):
        list(StoreIterableDataset(store, transform=bad_transform))


# ----------------------------------------------------------------------------- options and "who am I"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shuffle": "yes"}, "shuffle: expected a bool, found 'yes'"),
        ({"seed": -1}, "seed: expected an int >= 0, found -1"),
        ({"seed": 2**64}, r"seed: expected an int in \[0, 2\*\*64\)"),
        ({"rank": 1}, "rank and world_size: pass both or neither"),
        ({"rank": 2, "world_size": 2}, "rank: expected 0 <= rank < world_size=2, found 2"),
        ({"equalize": "maybe"}, "equalize: expected None, a bool or one of"),
        ({"on_error": "ignore"}, r"on_error: expected one of \['raise', 'skip'\], found 'ignore'"),
        ({"batch_size": 0}, "batch_size: expected an int >= 1, found 0"),
        ({"block_records": 1.5}, "block_records: expected an int >= 1, found 1.5"),
        ({"prefetch_samples": 0}, "prefetch_samples: expected an int >= 1, found 0"),
        ({"transform": "upper"}, "transform: expected a callable or None, found str"),
    ],
)
def test_bad_options(store: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        StoreIterableDataset(store, **kwargs)


def test_loader_refusals(store: Path) -> None:
    with pytest.raises(InvalidOptionError, match="expected a StoreIterableDataset, found StoreDataset"):
        StoreDataLoader(StoreDataset(store))
    with pytest.raises(InvalidOptionError, match="in_order: expected True"):
        StoreDataLoader(StoreIterableDataset(store), in_order=False)
    with pytest.raises(InvalidOptionError, match="dataset was made with batch_size=4, the loader has batch_size=8"):
        StoreDataLoader(StoreIterableDataset(store, batch_size=4), batch_size=8)


def test_consumer_info_sources(monkeypatch: pytest.MonkeyPatch, store: Path) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert consumer_info() == (0, 1, 0, 1)
    assert consumer_info(2, 3) == (2, 3, 0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert consumer_info() == (1, 2, 0, 1)
    assert consumer_info(0, 4) == (0, 4, 0, 1)  # explicit arguments beat the environment
    ds = StoreIterableDataset(store, equalize="off")
    assert len(ds) == N - N // 2 and ds.partition().rank == 1
    assert ids_of(StoreDataLoader(ds, batch_size=3, num_workers=2)) == list(range(N // 2, N))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(
        InvalidOptionError,
        match="environment RANK/WORLD_SIZE: expected 0 <= rank < world_size, found rank=2, world_size=2",
    ):
        consumer_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(InvalidOptionError, match="environment variable RANK: expected an int, found 'x'"):
        consumer_info()
    with pytest.raises(InvalidOptionError, match="pass both or neither"):
        consumer_info(rank=0)


def test_first_batch_is_read_on_its_own(tmp_path: Path) -> None:
    """A consumer's first batch is a read group of its own (time to first batch: it waits only
    for its own frames, not a whole 1 MiB piece spanning every shard of a shuffled window); the
    rest follows in full pieces, and the records are still the epoch's, each once."""
    path = tmp_path / "s"
    tspt.write_store([torch.full((3000,), i % 251, dtype=torch.uint8) for i in range(600)], path, codec="none",
                     max_shard_bytes=200_000)  # fmt: skip
    ds = StoreIterableDataset(path, shuffle=True, seed=3, batch_size=8)
    split = ds._split(0, 1)
    from tensorstore_pt._partition import EpochOrder, worker_segments

    order = EpochOrder(ds.layout(), shuffle=True, seed=3, epoch=0)
    segments = worker_segments(split, ds.layout().window_records, 0, 8, 1, 0)
    groups = list(ds._first_piece_apart(segments, split, order))
    assert len(groups[0]) == 8
    assert len(groups) >= 2 and sum(len(g) for g in groups[1:]) == 600 - 8
    assert np.concatenate(groups).tolist() == ds.epoch_order().tolist()
    got = [int(s[0]) for s in ds]
    assert got == [r % 251 for r in ds.epoch_order().tolist()]


_FROZEN = multiprocessing.get_context("fork").Value("q", -1)


def _record_freeze_count(worker_id: int) -> None:
    _FROZEN.value = gc.get_freeze_count()


def test_fork_workers_inherit_the_parents_objects_frozen(store):
    """A fork worker's cycle collector never walks the objects it inherited (gc.freeze around
    the fork), and the training process is left unfrozen."""
    marker = [object() for _ in range(1000)]  # objects of the training process
    ds = tspt.StoreIterableDataset(store, shuffle=True, seed=0)
    loader = StoreDataLoader(
        ds, batch_size=4, num_workers=1, multiprocessing_context="fork", worker_init_fn=_record_freeze_count
    )
    assert len(ids_of(loader)) == N
    assert _FROZEN.value >= len(marker)  # at least the marker list's objects
    assert gc.get_freeze_count() == 0


_BUSY_EXIT = """
import torch
from tensorstore_pt._prefetch import Prefetcher

def busy():  # always inside torch when the interpreter exits
    while True:
        x = torch.ones(64, 64)
        for _ in range(200):
            x = torch.nn.functional.relu(x @ x) / 64
        yield x

p = Prefetcher(busy(), 10**6, name="tspt-test")
next(p)
raise NameError("the training loop ended with an error")
"""

_DATASET_EXIT = """
import sys
from tensorstore_pt import StoreIterableDataset
ds = StoreIterableDataset(sys.argv[1], shuffle=True, seed=0, window_records=50)
out = [undefined_name for x in ds]  # NameError at the first sample: the iterator outlives the loop
"""


def test_an_error_ending_a_loop_exits_the_process_cleanly(tmp_path: Path) -> None:
    """An exception ends the loop over a dataset at the top level: the interpreter exits with the
    iterator alive (the traceback holds it) and its decode thread busy. With a thread inside
    torch while the interpreter was torn down, the process aborted ("terminate called without
    an active exception", status 134): every time with a producer busy in torch, 1-6 times in 8
    through a dataset (found by a fresh-eyes attack). Live prefetch threads are now stopped at
    exit (atexit), before the teardown."""
    import subprocess
    import sys

    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", _BUSY_EXIT], capture_output=True, text=True)
        assert run.returncode == 1, run.stderr[-2000:]
        assert "NameError" in run.stderr and "terminate called" not in run.stderr
    path = _write(tmp_path / "s", 200, 2048)
    run = subprocess.run([sys.executable, "-c", _DATASET_EXIT, str(path)], capture_output=True, text=True)
    assert run.returncode == 1 and "NameError" in run.stderr and "terminate called" not in run.stderr, run.stderr
