"""Shards are filled the same whether frames are added one at a time (``ShardBuilder.add``
after ``size_with``) or in runs (``fitting`` + ``add_run``, what the writer does with a
worker's results): every shard is as full as the cap allows, and never past it unless it
holds a single frame."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorstore_pt as ts
from tensorstore_pt.format import footer_meta
from tensorstore_pt.shardio import ShardBuilder
from tensorstore_pt.storage import storage_for


def _builder(tmp_path, name: str) -> ShardBuilder:
    storage = storage_for(tmp_path)
    storage.ensure()
    return ShardBuilder(storage, name, 0, footer_meta([], {"id": "zstd", "level": 3}), multi=False)


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(st.tuples(st.integers(0, 3000), st.booleans()), max_size=30),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    cap=st.integers(0, 60_000),
    first_free=st.booleans(),
    data=st.data(),
)
def test_fitting_takes_what_size_with_one_at_a_time_takes(tmp_path_factory, before, sizes, cap, first_free, data):
    tmp = tmp_path_factory.mktemp("fill")
    shard = _builder(tmp, f"shard-0123456789ab-{data.draw(st.integers(0, 99999)):05d}.tspt")
    try:
        for size, raw in before:  # frames already in the shard, some stored raw (a raw_frames list)
            shard.add(bytes(size), 0, [size], raw)
        frames = [os.urandom(n) for n in sizes]
        expected = 0
        for frame in frames:  # the writer's one-at-a-time rule
            if (first_free and expected == 0) or shard.size_with(len(frame), 1) <= cap:
                expected += 1
                shard.add(frame, 0, [len(frame)])
            else:
                break
        taken = [shard.offsets.pop() for _ in range(expected)]  # undo: fitting must see the shard as before
        shard.pos = taken[-1] if taken else shard.pos
        for lst in (shard.stored, shard.raw, shard.checksums):
            del lst[len(lst) - expected :]
        assert shard.fitting([len(f) for f in frames], cap, first_free) == expected
    finally:
        shard.out.abort()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=60), cap=st.integers(1, 40_000))
def test_workers_fill_shards_to_the_cap_and_no_further(tmp_path_factory, sizes, cap):
    tmp = tmp_path_factory.mktemp("shards")
    samples = [
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)) for n in sizes
    ]
    info = ts.write_store(samples, tmp / "w", codec="zstd", max_shard_bytes=cap, num_workers=2, start_method="fork")
    reader = ts.open_store(tmp / "w")
    shards = reader.index.shards
    for k, entry in enumerate(shards):
        if entry.records > 1:
            assert entry.file_bytes <= cap
        if k + 1 < len(shards):  # the next shard's first frame (and its 32-byte row) did not fit
            nxt = int(reader._footer(k + 1).table[0]["stored"])
            assert entry.file_bytes + nxt + 32 >= cap
    assert sum(e.records for e in shards) == info.records == len(samples)
    for i in (0, len(samples) - 1):
        assert torch.equal(reader[i], samples[i])
