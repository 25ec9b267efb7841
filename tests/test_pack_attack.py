"""Parallel packing, background publication, directory packing and the reader's first read
under attack: a failure publishes nothing and removes only this writer's files, errors are
typed and name the file."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import tensorstore_pt as ts
import tensorstore_pt.writer as writer_mod
from _store_tools import full_disk_at_publication, workers_alive
from tensorstore_pt.shardio import ShardBuilder

pytestmark = pytest.mark.timeout(60)


def _samples(n: int, size: int = 600) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 255, (size,), dtype=torch.uint8, generator=g) for _ in range(n)]


def _publisher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tspt-publish")]


# --------------------------------------------------------------------------- publication


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_name_taken_by_another_writer_keeps_that_writers_file(tmp_path: Path, monkeypatch, num_workers) -> None:
    publish = ShardBuilder.publish
    dest = tmp_path / "s"
    dest.mkdir()
    taken: list[str] = []

    def clashing_publish(self: ShardBuilder) -> None:
        if not taken:  # another writer publishes a file of this shard's name first
            (dest / self.name).write_bytes(b"another writer's shard")
            taken.append(self.name)
        publish(self)

    monkeypatch.setattr(ShardBuilder, "publish", clashing_publish)
    with pytest.raises(ts.ConcurrentWriteError) as info:
        ts.write_store(_samples(60), dest, codec="none", max_shard_bytes=8000, num_workers=num_workers)
    assert taken[0] in str(info.value)
    left = sorted(n for n in os.listdir(dest) if n != ".tspt-lock")
    assert left == [taken[0]]  # ours removed, theirs kept, no temporary file
    assert (dest / taken[0]).read_bytes() == b"another writer's shard"
    assert not _publisher_threads()
    assert writer_mod._SLOTS == {} and workers_alive() == []


def test_an_append_whose_shard_name_clashes_leaves_the_store_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_mod, "new_writer_token", lambda: "0123456789ab")  # both writers: one name
    base = tmp_path / "s"
    ts.write_store(_samples(5), base, codec="none")
    before = {p.name: p.read_bytes() for p in base.iterdir() if not p.name.startswith(".")}
    with pytest.raises(ts.ConcurrentWriteError):
        with ts.ShardWriter(base, mode="append", codec="none") as w:
            w.write_many(_samples(20))
    after = {p.name: p.read_bytes() for p in base.iterdir() if not p.name.startswith(".")}
    assert after == before  # the first store's shard of that name was not removed
    assert ts.verify_store(base, deep=True).problems == ()
    assert len(ts.open_store(base)) == 5


# --------------------------------------------------------------------------- reader: the first read


def test_a_store_path_that_is_a_symlink_loop_is_not_found(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # index.json under it: ELOOP, where Path.exists says False
    with pytest.raises(ts.StoreNotFoundError, match="the path does not exist") as info:
        ts.open_store(loop)
    assert str(loop) in str(info.value)


def test_an_index_that_is_a_symlink_loop_names_the_index(tmp_path: Path) -> None:
    store = tmp_path / "s"
    ts.write_store(_samples(2), store, codec="none")
    (store / "index.json").unlink()
    os.symlink(store / "index.json", store / "index.json")
    with pytest.raises(OSError) as info:
        ts.open_store(store)
    assert not isinstance(info.value, ts.NotAStoreError)  # the index is there: not "expected index.json"
    assert "index.json" in str(info.value)


@pytest.mark.parametrize("url", [False, True], ids=["local", "memory"])
def test_the_first_read_says_why_a_path_is_not_a_store(tmp_path: Path, url: bool) -> None:
    import fsspec

    if url:
        fs = fsspec.filesystem("memory")
        root = f"/pa-{os.getpid()}-{id(tmp_path)}"
        fs.pipe(f"{root}/file", b"x")
        fs.pipe(f"{root}/shards/shard-0123456789ab-00000.tspt", b"x")
        fs.pipe(f"{root}/idxdir/index.json/x", b"x")
        base = f"memory://{root.lstrip('/')}"
    else:
        (tmp_path / "file").write_bytes(b"x")
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "shard-0123456789ab-00000.tspt").write_bytes(b"x")
        (tmp_path / "idxdir" / "index.json").mkdir(parents=True)
        (tmp_path / "empty").mkdir()
        base = str(tmp_path)
    with pytest.raises(ts.StoreNotFoundError, match="does not exist"):
        ts.open_store(f"{base}/missing")
    with pytest.raises(ts.StoreNotFoundError, match="does not exist"):
        ts.open_store(f"{base}/file/sub")
    with pytest.raises(ts.NotAStoreError, match="is a file"):
        ts.open_store(f"{base}/file")
    with pytest.raises(ts.NotAStoreError, match="1 shard file"):
        ts.open_store(f"{base}/shards")
    with pytest.raises(ts.NotARegularFileError, match="index.json"):
        ts.open_store(f"{base}/idxdir")
    if not url:
        with pytest.raises(ts.NotAStoreError, match="expected index.json in it$"):
            ts.open_store(f"{base}/empty")


class _ExitingExecutor:
    """A ThreadPoolExecutor as it is while the interpreter exits (atexit handlers, __del__):
    it takes no work."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def submit(self, *args, **kwargs):
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        pass


@pytest.mark.parametrize("fail", [False, True], ids=["publishes", "publication-fails"])
def test_a_writer_closed_while_the_interpreter_exits_publishes_its_shards(tmp_path: Path, monkeypatch, fail) -> None:
    import concurrent.futures as cf

    dest = tmp_path / "s"
    w = ts.ShardWriter(dest, codec="none", max_shard_bytes=8000)  # its own pools started before the exit
    monkeypatch.setattr(cf, "ThreadPoolExecutor", _ExitingExecutor)
    if fail:
        full_disk_at_publication(monkeypatch, 2)
        with pytest.raises(ts.StorageFullError):
            w.write_many([torch.full((100,), i) for i in range(50)])
            w.close()
        w.abort()
        assert not dest.exists()  # nothing published, no temporary file left
        return
    w.write_many([torch.full((100,), i) for i in range(50)])
    assert w.close().records == 50  # published here: no publisher thread can start
    assert not [n for n in os.listdir(dest) if ".tmp-" in n]
    assert ts.verify_store(dest, deep=True).problems == ()
    assert torch.equal(ts.open_store(dest)[49], torch.full((100,), 49))


# --------------------------------------------------------------------------- fork workers


@pytest.mark.parametrize("rows", ["list", "files"])
def test_write_then_write_many_of_a_list_on_fork_workers(tmp_path: Path, fixed_token, rows) -> None:
    from _store_tools import store_files
    from tensorstore_pt.sources import FileRows

    samples = [torch.full((50,), i) for i in range(40)]
    if rows == "files":
        (tmp_path / "src").mkdir()
        for i, t in enumerate(samples[1:]):
            torch.save(t, tmp_path / "src" / f"{i:03d}.pt")
        rest = FileRows(sorted((tmp_path / "src").iterdir()))
    else:
        rest = samples[1:]
    for workers in (0, 2):
        with ts.ShardWriter(
            tmp_path / f"w{workers}", codec="zstd", num_workers=workers, start_method="fork" if workers else None
        ) as w:
            w.write(samples[0])  # batched: the workers start at write_many's first task
            w.write_many(rest)
    assert store_files(tmp_path / "w2") == store_files(tmp_path / "w0")
    assert torch.equal(ts.open_store(tmp_path / "w2")[39], samples[39])
    assert writer_mod._SLOTS == {} and writer_mod._INHERITED == {} and workers_alive() == []


# --------------------------------------------------------------------------- a directory of .pt files


@pytest.mark.parametrize("change", ["removed", "directory", "fifo"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_changed_after_the_scan_is_named_in_a_typed_error(tmp_path: Path, change, workers) -> None:
    from tensorstore_pt.sources import open_source

    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        torch.save(torch.full((8,), i), src / f"{i:03d}.pt")
    rows = open_source(src).rows
    victim = src / "020.pt"
    victim.unlink()
    expected: type[Exception] = ts.StoreNotFoundError
    if change == "directory":
        victim.mkdir()
        expected = ts.InvalidOptionError
    elif change == "fifo":
        os.mkfifo(victim)  # a read would block forever
        expected = ts.InvalidOptionError
    dest = tmp_path / "out"
    with pytest.raises(expected) as info:
        with ts.ShardWriter(dest, num_workers=workers, start_method="fork" if workers else None) as w:
            w.write_many(rows)
    assert str(victim) in str(info.value)
    assert not dest.exists()  # nothing published
    assert writer_mod._SLOTS == {} and writer_mod._INHERITED == {} and workers_alive() == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_io_error_publishing_a_shard_names_the_shard_and_store(tmp_path: Path, monkeypatch, num_workers) -> None:
    import errno

    failed: list[str] = []

    def eio_publish(self: ShardBuilder) -> None:
        failed.append(self.name)
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # as fsync raises it: no file named

    monkeypatch.setattr(ShardBuilder, "publish", eio_publish)
    dest = tmp_path / "s"
    with pytest.raises(OSError) as info:
        ts.write_store(_samples(60), dest, codec="none", max_shard_bytes=8000, num_workers=num_workers)
    assert info.value.errno == errno.EIO
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and failed[0] in notes[0] and str(dest) in notes[0]
    assert not dest.exists()  # nothing published, no temporary file left
    assert not _publisher_threads()


def test_a_list_registered_by_a_write_many_that_failed_first_is_dropped(tmp_path: Path, fixed_token) -> None:
    from _store_tools import store_files
    from tensorstore_pt.sources import FileRows

    gone = FileRows([tmp_path / "gone.pt"])  # sized before the workers start: fails before any task
    samples = [torch.full((10,), i) for i in range(20)]
    with ts.ShardWriter(tmp_path / "w", num_workers=2, start_method="fork") as w:
        with pytest.raises(ts.StoreNotFoundError, match="gone.pt"):
            w.write_many(gone)
        w.write_many(samples)
        assert list(writer_mod._INHERITED) == [w._inherited]  # the first list is not kept alive
    ts.write_store(samples, tmp_path / "ref")
    assert store_files(tmp_path / "w") == store_files(tmp_path / "ref")
    assert writer_mod._INHERITED == {} and writer_mod._SLOTS == {}


def _mixed(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    out: list = []
    for i in range(n):
        k = i % 5
        if k == 0:
            out.append(torch.empty(0))
        elif k == 1:
            out.append({"a": [torch.tensor(i)] * 30})  # many tiny tensors
        elif k == 2:
            out.append(torch.zeros(5000))  # compresses well
        elif k == 3:
            out.append(torch.randn(300, generator=g))  # barely compresses: stored raw below 0.95
        else:
            out.append(torch.randint(0, 255, (i * 100,), dtype=torch.uint8, generator=g))
    out[7] = torch.randint(0, 255, (3 * 2**20,), dtype=torch.uint8, generator=g)  # larger than a slot
    return out


@pytest.mark.parametrize("cap", [1, 50_000, 2**40])
def test_eight_workers_store_mixed_samples_as_in_process(tmp_path: Path, fixed_token, cap) -> None:
    from _store_tools import store_files

    samples = _mixed(60)
    options = dict(codec="zstd", raw_below=0.95, max_shard_bytes=cap)
    ts.write_store(samples, tmp_path / "ref", **options)
    ts.write_store(samples, tmp_path / "w8", num_workers=8, start_method="fork", **options)
    with ts.ShardWriter(tmp_path / "it", num_workers=8, start_method="fork", **options) as w:
        w.write_many(iter(samples[:30]))  # pickled, in slots
        w.write_many(samples[30:])  # the pool has started: pickled too
    for name in ("w8", "it"):
        assert store_files(tmp_path / name) == store_files(tmp_path / "ref")
    assert ts.verify_store(tmp_path / "w8", deep=True).problems == ()
    assert b"raw-frames" in (tmp_path / "w8" / "index.json").read_bytes()  # a mix of raw and compressed frames
    assert writer_mod._SLOTS == {} and writer_mod._INHERITED == {} and workers_alive() == []


def test_a_source_file_whose_directory_became_a_file_is_a_typed_error_when_sized(tmp_path: Path) -> None:
    """``FileRows.sizes`` typed a removed file but not one whose parent directory was replaced by
    a file after the scan (``stat`` raises NotADirectoryError there); reading it was typed."""
    from tensorstore_pt.sources import FileRows

    sub = tmp_path / "src" / "part"
    sub.mkdir(parents=True)
    torch.save(torch.arange(3), sub / "a.pt")
    rows = FileRows([sub / "a.pt"])
    shutil.rmtree(sub)
    sub.write_bytes(b"now a file")
    with pytest.raises(ts.StoreNotFoundError, match="a.pt"):
        rows.sizes()
