"""The reader in forked, spawned and forkserver DataLoader workers and in 8 threads."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import tensorstore_pt as ts


class _ByIndex(Dataset):
    """Minimal map-style wrapper so this test does not depend on tensorstore_pt.dataset."""

    def __init__(self, reader: ts.StoreReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        return self.reader[i]


def _samples(n: int = 40):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(16, generator=g), "id": torch.tensor(i)} for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("conc") / "s"
    ts.write_store(_samples(), path, max_shard_bytes=8192, codec="lz4")
    return path


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_give_identical_results(store, method):
    reader = ts.open_store(store)
    reader[0]  # open a handle in the parent first: the children must not share it
    loader = DataLoader(_ByIndex(reader), batch_size=4, num_workers=2, multiprocessing_context=mp.get_context(method))
    got = [s for batch in loader for s in zip(batch["id"].tolist(), batch["x"])]
    expected = _samples()
    assert [i for i, _ in got] == list(range(len(expected)))
    for i, x in got:
        assert torch.equal(x, expected[i]["x"])


def test_eight_threads_give_identical_results(store):
    reader = ts.open_store(store)
    expected = [reader.read_bytes(i) for i in range(len(reader))]
    fresh = ts.open_store(store)  # handles and footers opened concurrently by the threads
    order = [i % len(expected) for i in range(len(expected) * 8)]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(fresh.read_bytes, order))
        loaded = list(pool.map(lambda i: int(fresh[i]["id"]), order))
    assert got == [expected[i] for i in order]
    assert loaded == order
