"""Attacks on today's changes: a writer's early pool shutdown, resting pins, one-GET
index reads and bulk header reads."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import tensorstore_pt as ts

pytestmark = pytest.mark.timeout(240)

SAMPLES = [{"x": torch.full((64,), i, dtype=torch.float32), "s": f"record {i}"} for i in range(120)]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _filled(path) -> ts.ShardWriter:
    w = ts.ShardWriter(path, num_workers=2, start_method="fork", max_shard_bytes=4_000)
    for s in SAMPLES:
        w.write(s)
    return w


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_closed_or_aborted_writer_kept_alive_holds_no_pool_fds(tmp_path):
    # close() shuts the pool down early and keeps its parts for abort; once the pool is gone
    # those parts (the result pipe, the workers' sentinels) must not outlive it with the writer.
    kept = [_filled(tmp_path / "warm")]
    kept[0].close()
    gc.collect()
    base = _fds()
    for i in range(3):
        w = _filled(tmp_path / f"s{i}")
        w.close()
        kept.append(w)
    w = _filled(tmp_path / "failing")
    w._current_index_digest = lambda: "changed"  # another writer's index: close raises, then aborts
    with pytest.raises(ts.ConcurrentWriteError):
        w.close()
    kept.append(w)
    gc.collect()
    assert _fds() == base


@pytest.mark.parametrize("max_bytes", [None, 10])
def test_read_all_of_a_directory_on_an_fsspec_backend_with_directories_is_not_a_regular_file(tmp_path, max_bytes):
    # The one-GET read_all met IsADirectoryError (file:// through fsspec) and raised a
    # RemoteStorageError; the HEAD-first read it replaced said NotARegularFileError.
    from tensorstore_pt.storage.remote import FsspecStorage

    (tmp_path / "index.json").mkdir()
    storage = FsspecStorage(f"file://{tmp_path}", {})
    with pytest.raises(ts.NotARegularFileError):
        storage.read_all("index.json", max_bytes=max_bytes)
