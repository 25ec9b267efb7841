"""Hostile environments for remote stores, the node-local shard cache and ``tspt cp``.

Each test names the fault it pins down: a cache directory whose names hold links, FIFOs or
directories (never followed, never a hang, typed errors), a cache directory that cannot be
used, URLs without a location, a full spool disk under an object-store writer, a key that is
an object and a prefix at once on S3, a store replaced in place under a streaming consumer,
numeric credentials on the command line, and non-file entries at a copy's destination.
"""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt.cache import CachedStorage, ShardCache, ShardKey
from tensorstore_pt.cli import parse_storage_options
from tensorstore_pt.errors import (
    ChecksumMismatchError,
    InvalidOptionError,
    NotARegularFileError,
    StorageFullError,
    StoreChangedError,
)
from tensorstore_pt.reader import StoreReader
from tensorstore_pt.storage import FsspecStorage, LocalStorage

pytestmark = pytest.mark.timeout(120)


def make(path: Path | str, n: int = 24, version: int = 0, storage_options: dict | None = None) -> Any:
    return ts.write_store(
        ({"i": torch.tensor(i), "v": torch.tensor(version), "x": torch.full((64,), float(i))} for i in range(n)),
        path,
        codec="none",
        max_shard_bytes=4000,
        mode="overwrite",
        storage_options=storage_options,
    )


def first_key(store: Path) -> ShardKey:
    s = ts.open_store(store, verify=False).index.shards[0]
    return ShardKey(s.name, s.file_bytes, s.checksum)


def acquire_in_thread(cache: ShardCache, source: LocalStorage, key: ShardKey, timeout: float = 20) -> Any:
    """cache.acquire in a thread: a hang fails the test instead of blocking it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["h"] = cache.acquire(source, key)
        except BaseException as exc:  # noqa: BLE001
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "ShardCache.acquire hung"
    if "exc" in out:
        raise out["exc"]
    return out["h"]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    make(tmp_path / "store")
    return tmp_path / "store"


def _check_served(h: Any, store: Path, key: ShardKey) -> None:
    try:
        assert h.read_range(0, key.file_bytes) == (store / key.name).read_bytes()
        assert h.path.is_file() and not h.path.is_symlink()
    finally:
        h.close()


# --------------------------------------------------------------------------- the cache's own names


def test_fifo_at_a_cached_name_never_hangs(store: Path, tmp_path: Path) -> None:
    """Fault: _pin opened the cached name with a blocking O_RDONLY, so a FIFO there hung every
    consumer forever. Now the FIFO is removed and the shard downloaded."""
    cache, source, key = ShardCache(tmp_path / "c"), LocalStorage(store), first_key(store)
    final = cache.store_dir(source) / ShardCache.file_name(key)
    os.mkfifo(final)
    _check_served(acquire_in_thread(cache, source, key), store, key)


def test_symlink_at_a_cached_name_is_never_followed(store: Path, tmp_path: Path) -> None:
    """Fault: a symlink to a directory at a cached name raised a raw IsADirectoryError; a link to
    an outside file was followed (and its target pinned). Now the link (only) is removed."""
    cache, source, key = ShardCache(tmp_path / "c"), LocalStorage(store), first_key(store)
    final = cache.store_dir(source) / ShardCache.file_name(key)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, final)
    _check_served(acquire_in_thread(cache, source, key), store, key)
    assert outside.is_dir()
    # a link to a file with the right bytes is not followed either; its target is untouched
    victim = tmp_path / "victim"
    victim.write_bytes((store / key.name).read_bytes())
    os.unlink(final)
    os.symlink(victim, final)
    _check_served(acquire_in_thread(cache, source, key), store, key)
    assert victim.read_bytes() == (store / key.name).read_bytes()


def test_directory_at_a_cached_name(store: Path, tmp_path: Path) -> None:
    """Fault: a directory at a cached name raised a raw IsADirectoryError (from pread, or from
    the publishing rename) on every read. An empty one is removed; one holding files is not
    the cache's to delete: InvalidOptionError naming it, its files kept."""
    cache, source, key = ShardCache(tmp_path / "c"), LocalStorage(store), first_key(store)
    final = cache.store_dir(source) / ShardCache.file_name(key)
    final.mkdir()
    _check_served(acquire_in_thread(cache, source, key), store, key)
    os.unlink(final)
    final.mkdir()
    (final / "keep").write_text("mine")
    with pytest.raises(InvalidOptionError, match="cache_dir: cannot use .*expected a cached shard file"):
        acquire_in_thread(cache, source, key)
    assert (final / "keep").read_text() == "mine"


def test_directory_at_a_shard_lock_name(store: Path, tmp_path: Path) -> None:
    cache, source, key = ShardCache(tmp_path / "c"), LocalStorage(store), first_key(store)
    lock = cache.store_dir(source) / (ShardCache.file_name(key) + ".lock")
    lock.mkdir()
    (lock / "keep").write_text("mine")
    with pytest.raises(InvalidOptionError, match="lock file"):
        acquire_in_thread(cache, source, key)
    os.unlink(lock / "keep")  # an empty directory there is removed and the lock made
    _check_served(acquire_in_thread(cache, source, key), store, key)


def test_unusable_cache_dir_is_refused_up_front(store: Path, tmp_path: Path) -> None:
    """Fault: a cache_dir whose accounting lock cannot be opened (unwritable directory, or a
    directory at the lock's name) passed ShardCache() and failed later with a raw OSError."""
    bad = tmp_path / "bad"
    (bad / ".tspt-cache.lock").mkdir(parents=True)
    with pytest.raises(InvalidOptionError, match="cache_dir: cannot use"):
        ShardCache(bad)
    with pytest.raises(InvalidOptionError, match="cache_dir: cannot use"):
        ts.StoreIterableDataset(store, cache_dir=bad)
    # a regular file where the store's cache directory goes
    cache, source = ShardCache(tmp_path / "c"), LocalStorage(store)
    d = cache.store_dir(source)
    os.rename(d, tmp_path / "moved")
    d.write_text("not a directory")
    with pytest.raises(InvalidOptionError, match="a directory of the shard cache"):
        acquire_in_thread(cache, source, first_key(store))


# --------------------------------------------------------------------------- replaced in place


def _cached_reader(source: LocalStorage, cache: ShardCache) -> StoreReader:
    plain = ts.open_store(source, verify=False)
    cs = CachedStorage(source, cache, plain.index.shards, index_digest=plain.index_digest)
    return StoreReader(cs, verify=False)


def test_store_replaced_in_place_with_the_same_shard_names(store: Path, tmp_path: Path) -> None:
    """Fault: a store rewritten at the same location under the same shard names (a legacy
    writer, a copy tool) reached a streaming consumer as ChecksumMismatchError ("in transit"),
    which reads as damage. The index changed: StoreChangedError. Unchanged index: still damage."""
    source = LocalStorage(store)
    reader = _cached_reader(source, ShardCache(tmp_path / "c"))
    name = reader.index.shards[-1].name
    data = bytearray((store / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store / name).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):  # same index: damage at the source
        reader[len(reader) - 1]
    reader2 = _cached_reader(source, ShardCache(tmp_path / "c2"))
    (store / "index.json").write_bytes((store / "index.json").read_bytes() + b" ")
    with pytest.raises(StoreChangedError, match="replaced since it was opened"):
        reader2[len(reader2) - 1]


# --------------------------------------------------------------------------- URLs and options


@pytest.mark.parametrize(
    "url", ["memory://", "memory:///", "s3://", "s3:///", "gs://", "s3://b/a::b", "simplecache::memory://x"]
)
def test_url_without_a_location_is_refused(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: 'memory://' lost its slashes to 'memory:', parsed as a *local relative path*: a
    store meant for memory (or s3) was written into the working directory. A '::' in a URL
    (a key with '::', or an fsspec chain) failed with a TypeError deep inside s3fs."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidOptionError, match="expected a scheme and a location|expected one fsspec URL"):
        FsspecStorage(url)
    with pytest.raises(InvalidOptionError):
        make(url)
    assert list(tmp_path.iterdir()) == []


def test_spool_dir_option_is_checked() -> None:
    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/s"
    for bad in ("/nonexistent/spool", 3, ["x"]):
        with pytest.raises(InvalidOptionError, match="tspt_spool_dir: expected an existing local directory"):
            FsspecStorage(url, {"tspt_spool_dir": bad})


def test_full_spool_disk_is_storage_full(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: an object-store writer spools to local disk; ENOSPC there escaped as a raw
    OSError (copy_store to s3/memory, and ShardWriter's small files). Now StorageFullError
    naming the spool, for every caller; nothing is published."""
    from tensorstore_pt.storage import remote

    real = tempfile.mkstemp

    def full_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real(dir=tmp_path)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), path

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(remote.tempfile, "mkstemp", full_mkstemp)
    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/store"
    with pytest.raises(StorageFullError, match="spooling"):
        ts.copy_store(store, url)
    with pytest.raises(StorageFullError):
        make(url)
    w = FsspecStorage(url).writer("small")
    w.write(b"x" * 10)  # buffered: the full disk shows at the flush in commit
    with pytest.raises(StorageFullError, match="spooling"):
        w.commit()
    monkeypatch.undo()
    assert not FsspecStorage(url).exists() or "index.json" not in FsspecStorage(url).list()


def test_cli_keeps_credentials_as_text() -> None:
    """Fault: `--storage-option secret=12345678` became the int 12345678 (JSON), which the
    backend then rejects deep inside a request."""
    opts = parse_storage_options(
        [
            "key=000123",
            "secret=12345678",
            "endpoint_url=1",
            "client_kwargs.region_name=1",
            "tspt_retries=3",
            "anon=true",
        ]
    )
    assert opts == {
        "key": "000123",
        "secret": "12345678",
        "endpoint_url": "1",
        "client_kwargs": {"region_name": "1"},
        "tspt_retries": 3,
        "anon": True,
    }


# --------------------------------------------------------------------------- S3: object and prefix


def test_key_that_is_an_object_and_a_prefix(s3_bucket: tuple[str, dict]) -> None:
    """Fault: on S3 's3://b/p' can be an object and the prefix 'p/' of a store at once; the
    store was refused as "a file" (reads, appends) because the object won the stat."""
    import fsspec

    bucket, options = s3_bucket
    url = f"s3://{bucket}/dual"
    make(url, storage_options=options)
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(f"{bucket}/dual", b"a stray object")
    fs.invalidate_cache()
    reader = ts.open_store(url, storage_options=options)
    assert [int(reader[i]["i"]) for i in range(len(reader))] == list(range(24))
    assert ts.verify_store(url, storage_options=options).ok
    with ts.ShardWriter(url, mode="append", storage_options=options) as w:
        w.write({"i": torch.tensor(24)})
    assert len(ts.open_store(url, storage_options=options)) == 25
    assert fs.cat_file(f"{bucket}/dual") == b"a stray object"
    # an object alone (no prefix under it) is still not a store
    fs.pipe_file(f"{bucket}/lonely", b"x")
    with pytest.raises(ts.NotAStoreError):
        ts.open_store(f"s3://{bucket}/lonely", storage_options=options)


# --------------------------------------------------------------------------- tspt cp


def test_cp_refuses_a_directory_at_a_file_name(store: Path, tmp_path: Path) -> None:
    """Fault: a directory at the destination under one of the copy's file names failed with a
    raw IsADirectoryError after the other files were written. Now refused up front, typed."""
    dst = tmp_path / "dst"
    dst.mkdir()
    name = ts.open_store(store, verify=False).index.shards[0].name
    (dst / name).mkdir()
    (dst / name / "keep").write_text("mine")
    with pytest.raises(NotARegularFileError, match="expected a regular file"):
        ts.copy_store(store, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir() if p.name != ".tspt-lock") == [name]
    assert (dst / name / "keep").read_text() == "mine"


@pytest.mark.parametrize(
    "options",
    [{"config_kwargs": "x"}, {"client_kwargs": ["a"]}, {"secret": 12345678}, {"endpoint_url": 9000}, {1: "x"}],
)
def test_storage_options_of_the_wrong_type(options: dict) -> None:
    """Fault: config_kwargs="x" raised a raw TypeError (the retry settings are merged into it);
    a numeric secret or endpoint failed inside the first request. Now InvalidOptionError by name."""
    with pytest.raises(InvalidOptionError, match="storage_options"):
        FsspecStorage("s3://bucket/prefix", options)


def test_spool_files_of_killed_writers_are_swept(tmp_path: Path) -> None:
    """Fault: a writer killed between its first write and its upload (SIGKILL, OOM) left its
    whole local spool file behind, forever: a pack killed and restarted filled the disk. The
    next writer removes spool files nobody holds (and none that a live writer holds)."""
    import signal

    spool = tmp_path / "spool"
    spool.mkdir()
    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/s"
    opts = {"tspt_spool_dir": str(spool)}
    live = FsspecStorage(url, opts).writer("live")  # this process: alive, holds its lock
    live.write(b"y" * 100)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        w = FsspecStorage(url, opts).writer("dead")
        w.write(b"x" * 100_000)
        w._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    spools = sorted(spool.iterdir())
    assert len(spools) == 2
    old = 1_000_000_000
    for p in spools:
        os.utime(p, (old, old))
    from tensorstore_pt.storage import remote

    remote._swept_spools.clear()
    FsspecStorage(url, opts).writer("next").abort()
    left = sorted(spool.iterdir())
    assert len(left) == 1 and left[0].stat().st_size <= 100  # the live writer's spool stays
    live.commit()
    assert FsspecStorage(url, opts).read_all("live") == b"y" * 100


def test_fifo_named_like_a_temporary_file_never_hangs_the_sweep(store: Path, tmp_path: Path) -> None:
    """Fault: the sweep of dead downloads opened every '*.tmp-*' name with a blocking open:
    a FIFO there hung the first acquire of each process (and eviction, on a FIFO lock)."""
    cache, source, key = ShardCache(tmp_path / "c", limit_bytes=10**9), LocalStorage(store), first_key(store)
    d = cache.store_dir(source)
    os.mkfifo(d / f".{ShardCache.file_name(key)}.tmp-1-abcd")
    _check_served(acquire_in_thread(cache, source, key), store, key)
    lock = d / (ShardCache.file_name(key) + ".lock")
    os.unlink(lock)
    os.mkfifo(lock)
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(cache.evict(0)), daemon=True)
    t.start()
    t.join(20)
    assert out == [0], "evict hung on a FIFO lock file"


def test_cli_cp_shared_storage_option_with_a_local_side(store: Path, tmp_path: Path, capsys: Any) -> None:
    """Fault: `tspt cp ./store s3://b/p --storage-option endpoint_url=...` (the shared option,
    documented "for both SRC and DST") failed: the local side was handed the options too."""
    from tensorstore_pt.cli import main

    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/copy"
    assert main(["cp", str(store), url, "-q", "--storage-option", "tspt_retries=2"]) == 0
    back = tmp_path / "back"
    assert main(["cp", url, str(back), "-q", "--storage-option", "tspt_retries=2"]) == 0
    assert len(ts.open_store(back)) == 24
    capsys.readouterr()
    assert main(["cp", str(store), str(tmp_path / "x"), "-q", "--storage-option", "anon=true"]) == 2
    assert "both are local paths" in capsys.readouterr().err
    # naming a local side explicitly is still refused
    assert main(["cp", str(store), url + "2", "-q", "--src-storage-option", "anon=true"]) == 2


def test_cached_file_truncated_after_its_check_is_fetched_again(store: Path, tmp_path: Path) -> None:
    """Fault: a cached file truncated after this process had checked it (a disk tool, a user
    "freeing space") made every later read of the shard fail with ShardFormatError "truncated",
    blaming the store, for the rest of the process. Now the local copy is dropped and fetched."""
    cache_dir = tmp_path / "c"
    reader = _cached_reader(LocalStorage(store), ShardCache(cache_dir))
    want = [int(reader[i]["i"]) for i in range(len(reader))]
    reader.storage.release()
    cached = [p for p in cache_dir.rglob("*.tspt") if not p.name.startswith(".")]
    assert cached
    for p in cached:
        os.truncate(p, 100)
    assert [int(reader[i]["i"]) for i in range(len(reader))] == want
    assert all(p.stat().st_size > 100 for p in cached)
    # truncated while pinned (the last shard is still pinned by this consumer)
    for p in cached:
        os.truncate(p, 100)
    assert [int(reader[i]["i"]) for i in reversed(range(len(reader)))] == want[::-1]


@pytest.mark.parametrize("bad", ["", 3, b"/tmp/x"])
def test_cache_dir_of_the_wrong_type_or_empty(bad: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: cache_dir="" became Path("") == the working directory (filled with a cache);
    cache_dir=3 raised a raw TypeError from pathlib."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidOptionError, match="cache_dir: expected a non-empty local directory path"):
        ShardCache(bad)
    assert list(tmp_path.iterdir()) == []
