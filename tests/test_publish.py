"""Finished shards are published (flush, fsync, link) on the writer's publisher thread while
the writer goes on: the index is still committed only after every shard is durable, a failed
publication fails the write with nothing published, and abort waits for the thread and
removes everything."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

import tensorstore_pt as ts
import tensorstore_pt.writer as writer_mod
from tensorstore_pt.shardio import ShardBuilder

from _store_tools import full_disk_at_publication


def _samples(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 255, (600,), dtype=torch.uint8, generator=g) for _ in range(n)]


def _publisher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tspt-publish")]


def test_the_index_is_written_after_every_shard_is_published(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    publish = ShardBuilder.publish

    def slow_publish(self: ShardBuilder) -> None:
        time.sleep(0.02)  # slower than the writer: publications queue up behind it
        publish(self)
        events.append(("published", self.name))

    encode_index = writer_mod.encode_index

    def recording_encode_index(info):  # the writer encodes the index just before committing it
        events.append(("index", ""))
        return encode_index(info)

    monkeypatch.setattr(ShardBuilder, "publish", slow_publish)
    monkeypatch.setattr(writer_mod, "encode_index", recording_encode_index)
    info = ts.write_store(_samples(200), tmp_path / "s", codec="none", max_shard_bytes=8000, num_threads=1)
    assert info.shards >= 10
    assert events[-1] == ("index", "")
    published = [name for kind, name in events if kind == "published"]
    assert sorted(published) == sorted(s.name for s in ts.open_store(tmp_path / "s").index.shards)
    assert ts.verify_store(tmp_path / "s", deep=True).problems == ()
    assert not _publisher_threads()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_failed_publication_fails_the_write_and_publishes_nothing(tmp_path: Path, monkeypatch, num_workers) -> None:
    calls = full_disk_at_publication(monkeypatch, 3)
    dest = tmp_path / "s"
    with pytest.raises(ts.StorageFullError) as info:
        ts.write_store(_samples(300), dest, codec="zstd", max_shard_bytes=8000, num_workers=num_workers)
    assert calls[2] in str(info.value)  # the error names the shard that could not be published
    assert not dest.exists() or os.listdir(dest) == []  # nothing published, no temporary file left
    assert not _publisher_threads()


def test_abort_waits_for_the_publisher_and_removes_its_shards(tmp_path: Path, monkeypatch) -> None:
    publish = ShardBuilder.publish
    started = threading.Event()

    def slow_publish(self: ShardBuilder) -> None:
        started.set()
        time.sleep(0.2)
        publish(self)

    monkeypatch.setattr(ShardBuilder, "publish", slow_publish)
    base = tmp_path / "s"
    ts.write_store(_samples(5), base, codec="none")
    before = sorted(os.listdir(base))
    w = ts.ShardWriter(base, mode="append", max_shard_bytes=8000, num_threads=1)
    w.write_many(_samples(40))
    assert started.wait(5)  # a shard is being published now
    assert w.abort() == []
    assert sorted(os.listdir(base)) == before  # the published ones removed, no temporary file left
    assert len(ts.open_store(base)) == 5
    assert not _publisher_threads()


def test_a_second_ctrl_c_while_abort_waits_for_the_publisher_still_releases_the_lock(tmp_path, monkeypatch) -> None:
    publish = ShardBuilder.publish

    def slow_publish(self: ShardBuilder) -> None:
        time.sleep(0.3)
        publish(self)

    stop_publisher = writer_mod.ShardWriter._stop_publisher
    interrupted = []

    def interrupted_wait(self) -> None:  # Ctrl-C lands while the first abort waits for the thread
        if interrupted:
            return stop_publisher(self)
        interrupted.append(True)
        self._publisher = None
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardBuilder, "publish", slow_publish)
    base = tmp_path / "s"
    ts.write_store(_samples(5), base, codec="none")
    w = ts.ShardWriter(base, mode="append", max_shard_bytes=8000, num_threads=1)
    w.write_many(_samples(20))
    monkeypatch.setattr(writer_mod.ShardWriter, "_stop_publisher", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        w.abort()
    other = ts.ShardWriter(base, mode="append")  # the lock was released all the same
    other.abort()
    for t in _publisher_threads():
        t.join(5)
    assert len(ts.open_store(base)) == 5  # the store is as it was
    assert not [n for n in os.listdir(base) if n.startswith(".") and "tmp" in n]  # no temporary file left
