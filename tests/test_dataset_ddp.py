"""A real process group: 2 ranks (gloo, CPU), each with 2 DataLoader workers.

Rank and world size come from ``torch.distributed`` (no explicit arguments). With equalize
off, the ranks together see every sample exactly once; with equalize on (the default for
world_size > 1), every rank runs the same number of batches, and a collective per batch
proves that no rank waits forever.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tensorstore_pt as tspt
from tensorstore_pt import StoreDataLoader, StoreIterableDataset

N = 29  # odd, so that equalize has something to do
WORLD = 2


def _rank_main(rank: int, store: str, out_dir: str) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)  # the rank must come from the process group
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result: dict[str, object] = {}
        # equalize off: every sample exactly once across ranks x workers.
        ds = StoreIterableDataset(store, shuffle=True, seed=4, equalize=False)
        loader = StoreDataLoader(ds, batch_size=3, num_workers=2)
        result["off"] = [i for b in loader for i in b["id"].tolist()]
        result["off_len"] = len(ds)
        # equalize on (default): same number of batches; an all_reduce per batch must not hang.
        ds = StoreIterableDataset(store, shuffle=True, seed=4)
        loader = StoreDataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True)
        batches = 0
        ids = []
        for _epoch in range(2):  # the loader moves to the next epoch by itself
            for b in loader:
                total = torch.tensor([b["id"].numel()])
                dist.all_reduce(total)
                batches += 1
                ids += b["id"].tolist()
        result["on_batches"] = batches
        result["on_ids"] = ids
        result["on_len"] = len(ds)
        result["report"] = [ds.partition(2).rank, ds.partition(2).world_size, ds.partition(2).padded]
        gathered: list[object] = [None] * WORLD
        dist.all_gather_object(gathered, result)
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_rank_gloo_process_group(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tspt.write_store(({"id": torch.tensor(i)} for i in range(N)), store, max_shard_bytes=5000)
    mp.start_processes(_rank_main, args=(str(store), str(tmp_path)), nprocs=WORLD, start_method="fork", join=True)
    results = json.loads((tmp_path / "result.json").read_text())
    off = [i for r in results for i in r["off"]]
    assert sorted(off) == list(range(N))  # every sample exactly once
    assert [r["off_len"] for r in results] == [len(r["off"]) for r in results] == [14, 15]
    assert [r["on_batches"] for r in results] == [2 * 5, 2 * 5]  # ceil(15 / 3) per epoch, on both ranks
    assert [r["on_len"] for r in results] == [15, 15]
    assert [r["report"] for r in results] == [[0, 2, 1], [1, 2, 1]]
    epoch0 = results[0]["on_ids"][:15] + results[1]["on_ids"][:15]
    assert set(epoch0) == set(range(N)) and len(epoch0) == N + 1  # one sample repeated by padding
    assert results[0]["on_ids"][15:] != results[0]["on_ids"][:15]  # epoch 1 is reshuffled
