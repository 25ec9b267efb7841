"""The node-local shard cache: once per node, atomic publish, LRU limit, stale and damaged files.

The "remote" store here is a local store behind a wrapping Storage that logs every byte it
serves to a file (so counts add up across processes), optionally slowly or with flipped bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt import cache as cache_mod
from tensorstore_pt import dataset as dataset_mod
from tensorstore_pt.cache import CachedStorage, ShardCache, ShardKey
from tensorstore_pt.checksums import ALGORITHM, digest_int
from tensorstore_pt.errors import (
    ChecksumMismatchError,
    MissingShardError,
    ShardFormatError,
    ShardSizeError,
    StoreChangedError,
)
from tensorstore_pt.format import TRAILER_BYTES
from tensorstore_pt.reader import StoreReader
from tensorstore_pt.storage import LocalStorage, ReadHandle, Storage

from benchmarks.storage_wrap import ForwardingHandle, ForwardingStorage

from _store_tools import flip, layout, load_index, save_index, truncate
from _trust_tools import fork_and_kill

pytestmark = pytest.mark.timeout(120)


class _Handle(ForwardingHandle):
    def __init__(self, owner: Remote, name: str) -> None:
        super().__init__(owner.inner.open(name))
        self.owner, self.name = owner, name

    def read_range(self, offset: int, length: int) -> bytes:
        o = self.owner
        if o.delay_s:
            time.sleep(o.delay_s)
        data = self.inner.read_range(offset, length)
        if o.corrupt == "always" or (o.corrupt == "once" and not _marked(o, self.name)):
            data = bytes([data[0] ^ 0xFF]) + data[1:] if data else data
        with open(o.log, "a") as f:  # one short append per read: whole lines across processes
            f.write(f"{self.name} {len(data)}\n")
        return data


def _marked(o: Remote, name: str) -> bool:
    """True from the second call on for ``name`` (a per-test marker file records the first)."""
    mark = Path(o.log + f".{name}.corrupted")
    if mark.exists():
        return True
    mark.touch()
    return False


class Remote(ForwardingStorage):
    """A "remote" store: a local directory behind a counting, optionally slow or lying wrapper."""

    def __init__(self, root: Path, log: Path, delay_s: float = 0.0, corrupt: str | None = None) -> None:
        super().__init__(LocalStorage(root), f"remote://{root}")
        self.log, self.delay_s, self.corrupt = str(log), delay_s, corrupt

    def open(self, name: str) -> ReadHandle:
        if name.endswith(".tspt"):
            return _Handle(self, name)
        return self.inner.open(name)

    def read_all(self, name: str, max_bytes: int | None = None) -> bytes:
        if name == "index.json":  # counted apart from the shard bytes of `shard_reads`
            with open(self.log + ".index", "a") as f:
                f.write(f"{os.getpid()}\n")
        return self.inner.read_all(name, max_bytes)


def shard_reads(log: Path) -> dict[str, int]:
    """Bytes served per shard name, from the log."""
    out: dict[str, int] = {}
    if not log.exists():
        return out
    for line in log.read_text().splitlines():
        name, n = line.split()
        out[name] = out.get(name, 0) + int(n)
    return out


def make(path: Path, n: int = 60, version: int = 0, shard_bytes: int = 6000) -> Path:
    """``n`` records of about 520 bytes ({"i": i, "v": version, "x": 64 float64}), small shards."""
    ts.write_store(
        ({"i": torch.tensor(i), "v": torch.tensor(version), "x": torch.full((64,), float(i))} for i in range(n)),
        path,
        codec="none",
        max_shard_bytes=shard_bytes,
        mode="overwrite",
    )
    return path


def cached_reader(remote: Storage, cache: ShardCache, prefetch: int = 2) -> tuple[StoreReader, CachedStorage]:
    plain = ts.open_store(remote, verify=False)
    cs = CachedStorage(remote, cache, plain.index.shards, index_digest=plain.index_digest, prefetch_shards=prefetch)
    return StoreReader(cs, verify=False), cs


def read_all(remote: Storage, cache_dir: Path, limit: int | None = None, prefetch: int = 2) -> list[tuple[int, int]]:
    """(i, version) of every record, read in order through a cache with a plan of every shard."""
    reader, cs = cached_reader(remote, ShardCache(cache_dir, limit), prefetch)
    cs.plan(range(len(reader.index.shards)))
    try:
        return [(int(s["i"]), int(s["v"])) for s in (reader[i] for i in range(len(reader)))]
    finally:
        cs.release()


def shard_sizes(store: Path) -> dict[str, int]:
    return {s.name: s.file_bytes for s in ts.open_store(store).index.shards}


def disk_bytes(cache_dir: Path) -> int:
    total = 0
    for root, _, files in os.walk(cache_dir):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


# --------------------------------------------------------------------------- tests


def test_reads_through_cache_fetch_each_shard_once(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    got = read_all(remote, tmp_path / "cache")
    assert got == [(i, 0) for i in range(60)]
    assert shard_reads(tmp_path / "log") == shard_sizes(store)
    # A second pass (another process would do the same) is served from the cache: no source read.
    (tmp_path / "log").unlink()
    assert read_all(remote, tmp_path / "cache") == got
    assert shard_reads(tmp_path / "log") == {}


def _read_in_child(remote: Storage, cache_dir: Path, out: Path, start: Any) -> None:
    start.wait()
    got = read_all(remote, cache_dir)
    out.write_text(repr(got))


def test_two_processes_download_each_shard_once(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log", delay_s=0.002)  # slow enough for the two to overlap
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_read_in_child, args=(remote, tmp_path / "cache", tmp_path / f"out{k}", start))
        for k in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = [(i, 0) for i in range(60)]
    assert [eval((tmp_path / f"out{k}").read_text()) for k in range(2)] == [want, want]
    assert shard_reads(tmp_path / "log") == shard_sizes(store)  # every byte once, over both


def test_killed_downloader_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make(tmp_path / "s", n=20, shard_bytes=20000)
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 512)  # many slow chunks: the kill lands mid-download
    slow = Remote(store, tmp_path / "log", delay_s=0.05)
    entry = ts.open_store(store).index.shards[0]
    key = ShardKey(entry.name, entry.file_bytes, entry.checksum)
    cache_dir = tmp_path / "cache"

    def download() -> None:
        ShardCache(cache_dir).acquire(slow, key)

    status = fork_and_kill(download, delay=1.0)
    assert os.WIFSIGNALED(status)
    got = shard_reads(tmp_path / "log")
    assert 0 < got[entry.name] < entry.file_bytes  # it died mid-way
    sdir = ShardCache(cache_dir).store_dir(slow)
    final = sdir / ShardCache.file_name(key)
    assert not final.exists()  # nothing under the final name
    temps = [p for p in sdir.iterdir() if ".tmp-" in p.name]
    assert len(temps) == 1  # the dead one's temporary file, which nobody holds now
    # Another process gets a good copy at once (the dead one's lock went with it).
    fast = Remote(store, tmp_path / "log")
    cache = ShardCache(cache_dir)
    pinned = cache.acquire(fast, key)
    try:
        assert pinned.read_range(0, entry.file_bytes) == (store / entry.name).read_bytes()
    finally:
        pinned.close()
    assert final.read_bytes() == (store / entry.name).read_bytes()
    assert not temps[0].exists()  # the orphan was swept
    assert cache.downloads == 1


def test_cache_limit_smaller_than_epoch(tmp_path: Path) -> None:
    store = make(tmp_path / "s", n=120)
    sizes = shard_sizes(store)
    largest = max(sizes.values())
    limit = 4 * largest  # the store has about 12 shards
    assert sum(sizes.values()) > 2 * limit
    cache_dir = tmp_path / "cache"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if cache_dir.exists():  # a scan under the cache's accounting lock: a consistent view
                peak[0] = max(peak[0], ShardCache(cache_dir).usage_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        got = read_all(Remote(store, tmp_path / "log", delay_s=0.001), cache_dir, limit=limit)
    finally:
        stop.set()
        t.join()
    assert got == [(i, 0) for i in range(120)]  # every record exactly once, in order
    assert shard_reads(tmp_path / "log") == sizes  # nothing fetched twice
    assert 0 < peak[0] <= limit  # pins (3 shards) fit, so the limit is never passed
    assert ShardCache(cache_dir).usage_bytes() <= limit
    assert disk_bytes(cache_dir) <= limit + 200  # and on disk (plus the tiny source.txt)


def test_store_replaced_at_same_path_never_serves_stale_files(tmp_path: Path) -> None:
    store = make(tmp_path / "s", version=1)
    remote = Remote(store, tmp_path / "log")
    cache_dir = tmp_path / "cache"
    old_reader, old_cs = cached_reader(remote, ShardCache(cache_dir))
    assert read_all(remote, cache_dir) == [(i, 1) for i in range(60)]  # job A, epoch 1
    make(store, version=2)  # replaced at the same path between epochs (new shard names, checksums)
    assert read_all(remote, cache_dir) == [(i, 2) for i in range(60)]  # job B, and job A reopened
    # A reader still holding version 1's index: its shards are gone at the source, but the cache
    # still holds them under version 1's checksums, so it keeps reading version 1 consistently.
    assert [int(old_reader[i]["v"]) for i in range(60)] == [1] * 60
    old_cs.release()
    # With its cached files gone too, it learns that the store was replaced.
    ShardCache(cache_dir).evict(0)
    with pytest.raises(StoreChangedError, match="replaced"):
        old_reader[0]


def test_corrupt_cached_file_is_detected_and_refetched(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    cache_dir = tmp_path / "cache"
    read_all(remote, cache_dir)
    entry = ts.open_store(store).index.shards[1]
    sdir = ShardCache(cache_dir).store_dir(remote)
    cached = sdir / ShardCache.file_name(ShardKey(entry.name, entry.file_bytes, entry.checksum))
    data = bytearray(cached.read_bytes())
    data[200] ^= 0x01
    cached.write_bytes(bytes(data))
    (tmp_path / "log").unlink()
    cache = ShardCache(cache_dir)  # a new process's view: nothing checked yet
    pinned = cache.acquire(remote, ShardKey(entry.name, entry.file_bytes, entry.checksum))
    try:
        assert pinned.read_range(0, entry.file_bytes) == (store / entry.name).read_bytes()
    finally:
        pinned.close()
    assert (cache.refetches, cache.downloads) == (1, 1)
    assert shard_reads(tmp_path / "log") == {entry.name: entry.file_bytes}
    assert cached.read_bytes() == (store / entry.name).read_bytes()


def test_bytes_damaged_in_transit_are_fetched_again_once(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    entry = ts.open_store(store).index.shards[0]
    key = ShardKey(entry.name, entry.file_bytes, entry.checksum)
    once = ShardCache(tmp_path / "c1")
    pinned = once.acquire(Remote(store, tmp_path / "log1", corrupt="once"), key)
    pinned.close()
    assert (once.downloads, once.refetches, once.fetched_bytes) == (1, 1, 2 * entry.file_bytes)
    always = Remote(store, tmp_path / "log2", corrupt="always")
    with pytest.raises(ChecksumMismatchError) as err:
        ShardCache(tmp_path / "c2").acquire(always, key)
    msg = str(err.value)
    bad = bytearray((store / entry.name).read_bytes())
    bad[0] ^= 0xFF
    from tensorstore_pt.checksums import digest_int

    assert entry.name in msg and f"{entry.checksum:016x}" in msg and f"{digest_int(bytes(bad)):016x}" in msg
    assert shard_reads(tmp_path / "log2") == {entry.name: 2 * entry.file_bytes}  # twice, then gave up
    sdir = ShardCache(tmp_path / "c2").store_dir(always)
    assert [p.name for p in sdir.iterdir() if p.name.endswith(".tspt") or ".tmp-" in p.name] == []


def test_pinned_shard_is_never_evicted(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    entries = ts.open_store(store).index.shards[:2]
    keys = [ShardKey(e.name, e.file_bytes, e.checksum) for e in entries]
    cache = ShardCache(tmp_path / "cache")
    pinned = cache.acquire(remote, keys[0])
    cache.acquire(remote, keys[1]).close()
    assert cache.usage_bytes() == sum(k.file_bytes for k in keys)
    # Eviction runs in another process: the pinned shard survives, the unpinned one goes.
    status = fork_and_kill(lambda: ShardCache(tmp_path / "cache").evict(0), None)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert cache.usage_bytes() == keys[0].file_bytes
    assert pinned.read_range(0, keys[0].file_bytes) == (store / keys[0].name).read_bytes()
    pinned.close()
    assert cache.evict(0) == 0


def test_missing_shard_at_source_is_typed(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    reader, cs = cached_reader(remote, ShardCache(tmp_path / "cache"))
    first = reader.index.shards[0]
    os.unlink(store / first.name)
    with pytest.raises(MissingShardError, match=first.name):
        reader[0]
    cs.release()


# --------------------------------------------------------------------------- through the datasets


def _ids(loader: Any) -> list[tuple[int, int]]:
    return [(int(i), int(v)) for batch in loader for i, v in zip(batch["i"].tolist(), batch["v"].tolist())]


#: Index features of the stores :func:`make_framed` writes (no per-record frame table).
FRAMED = {"multi": "multi-record-frames", "raw": "raw-frames"}


def make_framed(path: Path, frames: str, n: int = 40) -> Path:
    """``n`` records ({"i": i, "v": 0, "x": ...}) with no frame of their own in a shared table:
    ``"multi"``, about 4 records a frame (format 1.1); ``"raw"``, incompressible records whose
    frames are stored raw (format 1.2). About 8 records a shard."""
    if frames == "multi":
        samples = ({"i": torch.tensor(i), "v": torch.tensor(0), "x": torch.full((64,), float(i))} for i in range(n))
        ts.write_store(samples, path, codec="none", max_shard_bytes=20_000, frame_target_bytes=8192)
    else:
        g = torch.Generator().manual_seed(0)
        samples = (
            {
                "i": torch.tensor(i),
                "v": torch.tensor(0),
                "x": torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g),
            }
            for i in range(n)
        )
        ts.write_store(samples, path, codec="zstd", max_shard_bytes=30_000, raw_below=0.5)
    assert FRAMED[frames] in ts.open_store(path).index.features
    return path


@pytest.mark.parametrize("frames", sorted(FRAMED))
def test_framed_store_streams_each_shard_once_and_reads_no_footer_at_open(tmp_path: Path, frames: str) -> None:
    """Multi-record or raw frames (no shared frame table): the dataset's verifying open reads no
    shard byte at the source (no footer), and an epoch with two workers fetches each shard's
    bytes exactly once, footers included (read from the cached copies); the next epoch none."""
    store = make_framed(tmp_path / "s", frames)
    log = tmp_path / "log"
    ds = ts.StoreIterableDataset(Remote(store, log), cache_dir=tmp_path / "cache", shuffle=True, seed=1)  # verify=True
    assert shard_reads(log) == {}, "the open read shards (footers) at the source"
    assert sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=2))) == [(i, 0) for i in range(40)]
    assert shard_reads(log) == shard_sizes(store)
    log.unlink()
    ds.set_epoch(1)
    assert sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=0))) == [(i, 0) for i in range(40)]
    assert shard_reads(log) == {}
    ts.StoreDataset(Remote(store, log))  # map-style, no cache: its verifying open reads every footer
    assert set(shard_reads(log)) == set(shard_sizes(store))


def test_framed_stream_open_still_checks_every_shard_from_the_listing(tmp_path: Path) -> None:
    """With verify=True and no footer read, the open still refuses a shard of another size than
    the index says, or one that is missing, naming it; with verify=False the open does not look."""
    store = make_framed(tmp_path / "s", "multi")
    shards = ts.open_store(store).index.shards
    assert len(shards) >= 3
    short = shards[1]
    truncate(store / short.name, short.file_bytes - 1)
    with pytest.raises(ShardSizeError, match=f"{short.name}.*expected {short.file_bytes} bytes"):
        ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=tmp_path / "cache")
    ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=tmp_path / "cache", verify=False)
    store2 = make_framed(tmp_path / "s2", "multi")
    gone = ts.open_store(store2).index.shards[2]
    os.unlink(store2 / gone.name)
    with pytest.raises(MissingShardError, match=gone.name):
        ts.StoreIterableDataset(Remote(store2, tmp_path / "log2"), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("frames", sorted(FRAMED))
@pytest.mark.parametrize("resealed", [True, False], ids=["index-agrees", "damaged-at-rest"])
def test_damaged_footer_of_a_framed_remote_store_is_found_when_its_shard_is_read(
    tmp_path: Path, frames: str, resealed: bool
) -> None:
    """A damaged footer is no longer found by the dataset's open (it reads no footer) but by
    the first read of its shard. With the index's checksum agreeing with the damaged file (a
    writer's bad footer), the error is the footer's own, the type a verifying ``open_store``
    raises; damaged at rest (the index's checksum is the good file's), the download's whole-file
    check refuses it first, as ``ChecksumMismatchError``. Either way, ``on_error="skip"`` leaves
    out that shard's records and no other."""
    store = make_framed(tmp_path / "s", frames)
    shards = ts.open_store(store).index.shards
    bad = shards[2]
    size, _, footer_json, _ = layout(store / bad.name)
    flip(store / bad.name, size - TRAILER_BYTES - footer_json // 2)  # a byte of the footer's JSON
    if resealed:
        obj = load_index(store)
        data = (store / bad.name).read_bytes()
        obj["shards"][2]["checksum"] = f"{ALGORITHM}:{digest_int(data):016x}"
        save_index(store, obj)
    with pytest.raises(ShardFormatError, match=bad.name) as opened:
        ts.open_store(store)  # verify=True reads every footer
    expected = type(opened.value) if resealed else ChecksumMismatchError
    ds = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=tmp_path / "cache")  # opens
    with pytest.raises(expected, match=bad.name) as read:
        list(ts.StoreDataLoader(ds, batch_size=4, num_workers=0))
    assert type(read.value) is expected
    skipping = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=tmp_path / "cache", on_error="skip")
    got = sorted(_ids(ts.StoreDataLoader(skipping, batch_size=4, num_workers=0)))
    lost = range(bad.first_record, bad.first_record + bad.records)
    assert got == [(i, 0) for i in range(40) if i not in lost]
    assert skipping.skip_counts() == {expected.__name__: bad.records}


def test_dataloader_two_workers_download_each_shard_once(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    ds = ts.StoreIterableDataset(remote, cache_dir=tmp_path / "cache", verify=False)
    (tmp_path / "log").unlink()  # the footers read while opening are not part of the epoch
    loader = ts.StoreDataLoader(ds, batch_size=4, num_workers=2)
    assert sorted(_ids(loader)) == [(i, 0) for i in range(60)]
    assert shard_reads(tmp_path / "log") == shard_sizes(store)  # each shard once for both workers
    assert ShardCache(tmp_path / "cache").usage_bytes() == sum(shard_sizes(store).values())


def test_remote_store_uses_the_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSPT_CACHE_DIR", str(tmp_path / "envcache"))
    store = make(tmp_path / "s", n=12)
    ds = ts.StoreIterableDataset(Remote(store, tmp_path / "log"))
    assert [int(s["i"]) for s in ds] == list(range(12))
    assert ShardCache(tmp_path / "envcache").usage_bytes() == sum(shard_sizes(store).values())
    local = ts.StoreIterableDataset(store)  # a local store reads its files directly
    assert local._view.cached is None
    assert [int(s["i"]) for s in local] == list(range(12))


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_exactly_once_over_two_ranks_and_two_workers(tmp_path: Path, shuffle: bool) -> None:
    store = make(tmp_path / "s", n=96)
    remote = Remote(store, tmp_path / "log")
    ranks = [
        ts.StoreIterableDataset(
            remote, rank=rank, world_size=2, shuffle=shuffle, seed=3, block_records=4, cache_dir=tmp_path / "cache"
        )
        for rank in range(2)
    ]
    (tmp_path / "log").unlink()  # count the epoch's reads only
    got: list[tuple[int, int]] = []
    for ds in ranks:
        ds.set_epoch(1)
        got += _ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=2))
    assert sorted(got) == [(i, 0) for i in range(96)]
    assert shard_reads(tmp_path / "log") == shard_sizes(store)  # once per node over 2 ranks x 2 workers


def test_two_jobs_one_cache_store_replaced_between_epochs(tmp_path: Path) -> None:
    store = make(tmp_path / "s", version=1)
    cache_dir = tmp_path / "cache"
    job_a = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=cache_dir, cache_limit_bytes=10**6)
    assert [(int(s["i"]), int(s["v"])) for s in job_a] == [(i, 1) for i in range(60)]
    make(store, version=2)  # replaced at the same URL between epochs
    job_b = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=cache_dir, cache_limit_bytes=10**6)
    assert [(int(s["i"]), int(s["v"])) for s in job_b] == [(i, 2) for i in range(60)]
    # Job A's next epoch still reads the version it opened, whole (its files are in the cache)...
    job_a.set_epoch(1)
    assert [(int(s["i"]), int(s["v"])) for s in job_a] == [(i, 1) for i in range(60)]
    # ...and so do its DataLoader workers, which start from the index job A opened.
    got = [
        (int(i), int(v)) for b in ts.StoreDataLoader(job_a, batch_size=4, num_workers=1) for i, v in zip(b["i"], b["v"])
    ]
    assert got == [(i, 1) for i in range(60)]
    # A job whose version is in no cache, replaced under it: its workers are told, never served version 3.
    job_c = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), cache_dir=tmp_path / "cache-c")
    make(store, version=3)
    with pytest.raises(StoreChangedError):
        list(ts.StoreDataLoader(job_c, batch_size=4, num_workers=1))


def test_backends_stream_through_the_cache(remote_store: tuple[str, Any], tmp_path: Path) -> None:
    """Local (cache asked for), memory:// and S3 (moto): an epoch with 2 workers fills the cache
    with each shard once; with the shards then deleted at the source, the next epoch is served
    from the cache alone."""
    from tensorstore_pt.storage import storage_for

    url, options = remote_store
    ts.write_store(
        ({"i": torch.tensor(i), "v": torch.tensor(0), "x": torch.full((64,), float(i))} for i in range(40)),
        url,
        storage_options=options,
        codec="none",
        max_shard_bytes=6000,
    )
    ds = ts.StoreIterableDataset(url, storage_options=options, cache_dir=tmp_path / "cache", prefetch_shards=1)
    shards = ts.open_store(url, storage_options=options).index.shards
    assert len(shards) > 3
    assert sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=2))) == [(i, 0) for i in range(40)]
    assert ShardCache(tmp_path / "cache").usage_bytes() == sum(s.file_bytes for s in shards)
    source = storage_for(url, options)
    for s in shards:
        source.remove(s.name)
    ds.set_epoch(1)
    assert sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=0))) == [(i, 0) for i in range(40)]


def test_shuffled_epoch_larger_than_the_cache_reads_ranges(tmp_path: Path) -> None:
    """Shuffled, with a cache smaller than the store: whole-shard downloads would be evicted
    between a shard's many visits, so frames are fetched with ranged reads (each once)."""
    store = make(tmp_path / "s", n=120)
    sizes = shard_sizes(store)
    limit = 4 * max(sizes.values())
    ds = ts.StoreIterableDataset(
        Remote(store, tmp_path / "log"), shuffle=True, seed=5, cache_dir=tmp_path / "cache", cache_limit_bytes=limit
    )
    (tmp_path / "log").unlink()
    assert sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=2))) == [(i, 0) for i in range(120)]
    fetched = sum(shard_reads(tmp_path / "log").values())
    frames = ts.open_store(store).index.stored_bytes
    assert frames <= fetched <= 2 * frames  # each frame once, plus merged gaps of at most as many bytes
    assert ShardCache(tmp_path / "cache").usage_bytes() == 0
    # Without a limit (or one that holds the store), the same epoch goes through the cache.
    (tmp_path / "log").unlink()
    ds2 = ts.StoreIterableDataset(Remote(store, tmp_path / "log"), shuffle=True, seed=5, cache_dir=tmp_path / "c2")
    (tmp_path / "log").unlink()
    assert sorted(_ids(ts.StoreDataLoader(ds2, batch_size=4, num_workers=2))) == [(i, 0) for i in range(120)]
    assert shard_reads(tmp_path / "log") == sizes


def test_limit_below_what_is_pinned_overcommits_by_the_pins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make(tmp_path / "s")
    sizes = shard_sizes(store)
    limit = max(sizes.values())  # one shard, while a consumer pins up to prefetch_shards + 1 = 3
    cache_dir = tmp_path / "cache"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if cache_dir.exists():
                peak[0] = max(peak[0], ShardCache(cache_dir).usage_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    with caplog.at_level("WARNING", logger="tensorstore_pt.cache"):
        try:
            got = read_all(Remote(store, tmp_path / "log", delay_s=0.001), cache_dir, limit=limit)
        finally:
            stop.set()
            t.join()
    assert got == [(i, 0) for i in range(60)]
    assert shard_reads(tmp_path / "log") == sizes
    assert limit < peak[0] <= 3 * limit  # over-committed by at most the pins (1 read + 2 ahead)
    assert "over-commit" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_limit_bytes": 0}, "cache_limit_bytes: expected a positive int"),
        ({"cache_limit_bytes": 1.5}, "cache_limit_bytes: expected a positive int"),
        ({"prefetch_shards": 0}, "prefetch_shards"),
    ],
    ids=["zero-limit", "float-limit", "zero-prefetch"],
)
def test_bad_cache_options_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    store = make(tmp_path / "s", n=4)
    with pytest.raises(ts.InvalidOptionError, match=message):
        ts.StoreIterableDataset(store, cache_dir=tmp_path / "cache", **kwargs)


def _job(store: str, cache_dir: Path, out: Path, workers: int, start: Any) -> None:
    start.wait()
    ds = ts.StoreIterableDataset(store, cache_dir=cache_dir)
    out.write_text(repr(sorted(_ids(ts.StoreDataLoader(ds, batch_size=4, num_workers=workers)))))


def test_two_jobs_share_a_cache_one_through_a_read_only_url(tmp_path: Path) -> None:
    """Job A streams a local store (cache asked for), job B the same files over read-only
    HTTP, at the same time, with one cache_dir: both get every record once; nothing is written
    at either source; each URL has its own cache directory (files are keyed by store and
    content), with each shard once."""
    import functools
    import http.server

    store = make(tmp_path / "s")
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s"
        ctx = mp.get_context("fork")
        start = ctx.Event()
        jobs = [
            ctx.Process(target=_job, args=(str(store), tmp_path / "cache", tmp_path / "a", 2, start)),
            ctx.Process(target=_job, args=(url, tmp_path / "cache", tmp_path / "b", 2, start)),
        ]
        for p in jobs:
            p.start()
        start.set()
        for p in jobs:
            p.join(90)
            assert p.exitcode == 0
    finally:
        server.shutdown()
        server.server_close()
    want = [(i, 0) for i in range(60)]
    assert eval((tmp_path / "a").read_text()) == want and eval((tmp_path / "b").read_text()) == want
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before  # no source was written
    dirs = [d for d in (tmp_path / "cache").iterdir() if d.is_dir()]
    assert len(dirs) == 2
    sizes = shard_sizes(store)
    for d in dirs:
        cached = {p.name.split("-", 2)[2]: p.stat().st_size for p in d.iterdir() if p.name.endswith(".tspt")}
        assert cached == sizes


def test_workers_start_from_the_datasets_index(tmp_path: Path) -> None:
    """DataLoader workers of a remote dataset read no index.json of their own (six requests
    before their first shard read on an object store): they start from the one the dataset
    opened, and still read every record exactly once."""
    store = make(tmp_path / "s", version=4)
    log = tmp_path / "log"
    ds = ts.StoreIterableDataset(Remote(store, log), cache_dir=tmp_path / "cache", shuffle=True, seed=3)
    opened = Path(str(log) + ".index").read_text().split()
    assert opened and set(opened) == {str(os.getpid())}  # the dataset's own open, in this process
    got = [
        (int(i), int(v)) for b in ts.StoreDataLoader(ds, batch_size=4, num_workers=2) for i, v in zip(b["i"], b["v"])
    ]
    assert sorted(got) == [(i, 4) for i in range(60)]
    assert Path(str(log) + ".index").read_text().split() == opened, "a worker read index.json again"
    mds = ts.StoreDataset(Remote(store, log))
    got = [int(i) for b in torch.utils.data.DataLoader(mds, batch_size=7, num_workers=2) for i in b["i"]]
    assert got == list(range(60))
    assert set(Path(str(log) + ".index").read_text().split()) == {str(os.getpid())}


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_loader_downloads_the_workers_first_shards_while_they_start(tmp_path: Path, start: str) -> None:
    """A StoreDataLoader with workers downloads each worker's first shards in the main process
    (with fork, before the workers start: they would inherit the download locks), and the
    epoch still fetches every shard exactly once per node and reads every record once."""
    store = make(tmp_path / "s", version=5)
    log = tmp_path / "log"
    ds = ts.StoreIterableDataset(Remote(store, log), cache_dir=tmp_path / "cache", shuffle=True, seed=1)
    loader = ts.StoreDataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=start)
    ds._control[dataset_mod._CHUNK] = 4  # the loader sets it at iter: the batch size
    first = ds._first_shards(2)
    assert 1 <= len(first) <= len(ts.open_store(store).index.shards)
    log.unlink()  # the open's footer reads
    got = [(int(i), int(v)) for b in loader for i, v in zip(b["i"], b["v"])]
    assert sorted(got) == [(i, 5) for i in range(60)]
    cache = ds._view.cached.cache
    assert cache.downloads == len(first)  # in this process: the head start, nothing else
    assert shard_reads(log) == shard_sizes(store)  # still once per node


def test_warm_downloads_named_shards_and_skips_unknown_ones(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    cache = ShardCache(tmp_path / "cache")
    plain = ts.open_store(remote, verify=False)
    cs = CachedStorage(remote, cache, plain.index.shards, index_digest=plain.index_digest)
    names = [s.name for s in plain.index.shards]
    assert cs.warm(["no-such-shard"]) is None
    thread = cs.warm([names[1], names[0], names[1], "no-such-shard"])
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert set(shard_reads(tmp_path / "log")) == {names[0], names[1]}
    assert cache.downloads == 2
    cache.acquire(remote, cs.keys[names[0]]).close()
    assert cache.hits >= 1 and cache.downloads == 2


def test_a_forked_child_does_not_keep_its_parents_download_lock(tmp_path: Path) -> None:
    """A download lock the parent holds when it forks is released when the parent releases it,
    even while the child lives: the child closes its inherited copies at once (else a worker
    forked during a download would block that shard for everyone until it exits)."""
    import fcntl
    import time

    cache = ShardCache(tmp_path / "cache")
    final = tmp_path / "cache" / "x.tspt"
    fd = cache._shard_lock(final, None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: alive for a while, holding whatever it inherited
        os.write(w, b"1")  # fork has returned here: the at-fork handlers have run
        time.sleep(3)
        os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        cache_mod._unhold(fd)
        again = os.open(str(final) + ".lock", os.O_RDWR)
        try:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child kept it
        finally:
            os.close(again)
        assert not cache_mod._LOCKS_HELD
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_forked_child_keeps_its_parents_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard the parent downloaded or checked is not read in full again by a child forked
    after (DataLoader workers are forked every epoch); a shard the parent never checked is."""
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    entries = ts.open_store(store).index.shards
    keys = [ShardKey(e.name, e.file_bytes, e.checksum) for e in entries[:2]]
    ShardCache(tmp_path / "cache").acquire(remote, keys[1]).close()  # cached by "another process"
    cache = ShardCache(tmp_path / "cache")
    cache.acquire(remote, keys[0]).close()  # downloaded (and checked) by this process
    digests = tmp_path / "digests"

    def counting(fd: int, size: int) -> int:
        with open(digests, "a") as f:
            f.write(f"{os.getpid()} {size}\n")
        return digest(fd, size)

    digest = cache_mod._digest_fd
    monkeypatch.setattr(cache_mod, "_digest_fd", counting)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for key in keys:
                cache.acquire(remote, key).close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert digests.read_text().split() == [str(pid), str(keys[1].file_bytes)]  # only the unchecked one
    assert shard_reads(tmp_path / "log") == {k.name: k.file_bytes for k in keys}  # nothing downloaded twice


def test_a_check_record_spares_a_full_read_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a process checked a settled cached file, other processes (fresh ShardCache
    objects here) trust the check record in its lock file instead of reading it in full, until
    the file is written to (in place, same size, even with its mtime set back), or the record
    is torn or another shard's."""
    monkeypatch.setattr(cache_mod, "_SETTLED_NS", 50_000_000)  # 50 ms: past the clock tick
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    entries = ts.open_store(store).index.shards
    key, other = (ShardKey(e.name, e.file_bytes, e.checksum) for e in entries[:2])
    counted: list[int] = []
    digest = cache_mod._digest_fd
    monkeypatch.setattr(cache_mod, "_digest_fd", lambda fd, size: counted.append(size) or digest(fd, size))

    def pin(k: ShardKey = key) -> ShardCache:
        cache = ShardCache(tmp_path / "cache")  # another process's view: nothing checked in memory
        cache.acquire(remote, k).close()
        return cache

    pin(), pin(other)  # downloaded: checked while they arrived, but too fresh to vouch for
    time.sleep(0.06)
    assert counted == []
    pin(), pin(other)  # checked in full, settled: both get a record
    assert counted == [key.file_bytes, other.file_bytes]
    pin(), pin(), pin(other)
    assert len(counted) == 2  # vouched for by the records

    cached = ShardCache(tmp_path / "cache").store_dir(remote) / ShardCache.file_name(key)
    lock = cached.with_name(cached.name + ".lock")
    before = os.stat(cached)
    data = bytearray(cached.read_bytes())
    data[100] ^= 0x01
    with open(cached, "r+b") as f:  # in place, same size
        f.write(data)
    os.utime(cached, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime set back; ctime cannot be
    cache = pin()
    assert len(counted) == 3 and (cache.refetches, cache.downloads) == (1, 1)
    assert cached.read_bytes() == (store / key.name).read_bytes()

    time.sleep(0.06)
    pin()  # the new file: checked in full once, then vouched for
    pin()
    assert len(counted) == 4
    good = lock.read_bytes()
    other_lock = cached.with_name(ShardCache.file_name(other) + ".lock")
    for record in (b"tspt-checked torn", other_lock.read_bytes(), b""):
        lock.write_bytes(record)
        pin()
        assert lock.read_bytes() == good  # read in full, and vouched for again
    assert len(counted) == 7
    assert shard_reads(tmp_path / "log") == {key.name: 2 * key.file_bytes, other.name: other.file_bytes}


def test_pins_touch_the_lock_file_and_eviction_follows_the_last_pin(tmp_path: Path) -> None:
    store = make(tmp_path / "s")
    remote = Remote(store, tmp_path / "log")
    entries = ts.open_store(store).index.shards
    first, second = (ShardKey(e.name, e.file_bytes, e.checksum) for e in entries[:2])
    cache = ShardCache(tmp_path / "cache")
    cache.acquire(remote, first).close()
    time.sleep(0.02)
    cache.acquire(remote, second).close()
    sdir = cache.store_dir(remote)
    shard = sdir / ShardCache.file_name(first)
    published = os.stat(shard)
    time.sleep(0.02)
    cache.acquire(remote, first).close()  # used last now
    now = os.stat(shard)
    assert (now.st_mtime_ns, now.st_ctime_ns) == (published.st_mtime_ns, published.st_ctime_ns)
    assert os.stat(str(shard) + ".lock").st_mtime_ns > published.st_mtime_ns
    cache.evict(cache.usage_bytes() - 1)  # room for one less byte: the least recently used goes
    assert shard.exists() and not (sdir / ShardCache.file_name(second)).exists()


@pytest.mark.parametrize("limited", [False, True], ids=["no-limit", "limit"])
def test_returning_to_a_shard_keeps_its_pin_only_in_a_cache_without_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limited: bool
) -> None:
    # A shuffled epoch visits the shards of its window in turn, many times: without a limit the
    # consumer keeps the pins of shards it left (RESTING_PINS), so it pins each shard once; with
    # one, it keeps only the shard it reads and those it fetches ahead, as documented.
    store = make(tmp_path / "s")
    acquired: list[str] = []
    real = ShardCache.acquire

    def acquire(self: ShardCache, source: Storage, key: ShardKey, **kw: Any) -> Any:
        acquired.append(key.name)
        return real(self, source, key, **kw)

    monkeypatch.setattr(ShardCache, "acquire", acquire)
    limit = 100 * sum(shard_sizes(store).values()) if limited else None
    reader, cs = cached_reader(Remote(store, tmp_path / "log"), ShardCache(tmp_path / "cache", limit))
    shards = len(reader.index.shards)
    assert shards >= 5
    visits = list(range(shards)) * 4
    cs.plan(visits)
    peak = 0
    try:
        for si in visits:
            first = sum(e.records for e in reader.index.shards[:si])
            assert int(reader[first]["i"]) == first
            peak = max(peak, len(cs.feed().pinned))
    finally:
        cs.release()
    counts = {n: acquired.count(n) for n in set(acquired)}
    if limited:
        assert max(counts.values()) > 1  # a return to a shard pins it again
        assert peak <= 2 + 1
    else:
        assert sorted(counts.values()) == [1] * shards  # each shard pinned once for the whole walk
        assert peak <= min(shards, 2 + 1 + cache_mod.RESTING_PINS)


def test_visits_to_pinned_shards_wake_no_download_thread(tmp_path: Path) -> None:
    # Each visit to another shard refilled the look-ahead and woke the download threads, even
    # with every shard pinned already: two thread switches a read (the warm-cache epoch ran
    # about 10% slower than the same store read from its own files).
    store = make(tmp_path / "s")
    reader, cs = cached_reader(Remote(store, tmp_path / "log"), ShardCache(tmp_path / "cache"))
    shards = len(reader.index.shards)
    firsts = [sum(e.records for e in reader.index.shards[:si]) for si in range(shards)]
    visits = list(range(shards)) * 3
    cs.plan(visits)
    try:
        feed = cs.feed()
        for si in visits[:shards]:  # the first pass downloads and pins every shard
            assert int(reader[firsts[si]]["i"]) == firsts[si]
        assert len(feed.pinned) == shards
        # Count on the feed's own condition (its download threads wait on that object).
        wakeups: list[int] = []
        notify_all = feed.cond.notify_all

        def counted() -> None:
            wakeups.append(1)
            notify_all()

        feed.cond.notify_all = counted  # type: ignore[method-assign]
        for si in visits[shards:]:
            assert int(reader[firsts[si]]["i"]) == firsts[si]
        assert wakeups == []
    finally:
        cs.release()
