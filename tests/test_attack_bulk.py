"""Attacks on the bulk read with reads in flight (StoreReader._read_runs on storage with
``read_concurrency`` > 1) and on StoreDataset.__getitems__: errors in the order of the
sequential path, one open a shard, no thread left behind, DataLoader workers after a bulk read."""

from __future__ import annotations

import collections
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt.storage import ReadHandle

from test_read_many import _SlowObjectStore, _SlowRemote, _damage_record, _sample

N = 120


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ab") / "s"
    ts.write_store((_sample(i) for i in range(N)), path, codec="none", max_shard_bytes=100_000)
    return path


_OPENS: collections.Counter[str] = collections.Counter()


class _CountingObjectStore(_SlowObjectStore):
    """An object store whose open is a request (a HEAD: it takes a while), counted per name."""

    def open(self, name: str) -> ReadHandle:
        _OPENS[name] += 1
        time.sleep(_SlowRemote.delay_s)
        return super().open(name)


class _SequentialCountingStore(_CountingObjectStore):
    read_concurrency = 1


def _far_apart(path: Path, per_shard: int) -> list[int]:
    """``per_shard`` records of each shard, spread out so that no two share a read, shuffled."""
    bounds = ts.open_store(path).shard_bounds().tolist()
    picks = [a + (b - a) * k // per_shard for a, b in bounds for k in range(per_shard)]
    np.random.default_rng(0).shuffle(picks)
    return picks


def _fresh(reader: ts.StoreReader) -> ts.StoreReader:
    """A copy with no open handles (what a DataLoader worker gets)."""
    return pickle.loads(pickle.dumps(reader))


def test_reads_in_flight_open_each_shard_once(store: Path) -> None:
    """Several reads of one shard started together must not each open it (on an object store an
    open is a HEAD): as on the sequential path, a bulk read opens each shard once."""
    picks = _far_apart(store, 3)
    for cls in (_CountingObjectStore, _SequentialCountingStore):
        base = ts.open_store(cls(store), verify=False)
        table = base.record_table()
        reader = _fresh(base)
        _OPENS.clear()
        assert [int(s["i"]) for s in reader.read_many(picks, table=table)] == picks
        names = [s.name for s in reader.index.shards]
        assert dict(_OPENS) == {name: 1 for name in names}, cls.__name__


def test_a_missing_shard_is_asked_once_with_reads_in_flight(tmp_path: Path, store: Path) -> None:
    """A shard found missing costs one open (and one index read to tell it from a replaced
    store), not one per read in flight; its records carry MissingShardError."""
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    base = ts.open_store(_CountingObjectStore(copy), verify=False)
    table = base.record_table()
    lo, hi = (int(x) for x in base.shard_bounds()[1])
    name = base.index.shards[1].name
    (copy / name).unlink()
    recs = list(range(lo, hi, 4))  # far enough apart: one read each
    assert len(recs) > 2
    reader = _fresh(base)
    _OPENS.clear()
    got = reader.read_many(recs + [0], table=table, on_error="return")
    assert all(isinstance(g, ts.MissingShardError) for g in got[:-1])
    assert int(got[-1]["i"]) == 0
    assert _OPENS[name] == 1


class _FailingHandle(ReadHandle):
    def __init__(self, inner: ReadHandle) -> None:
        self._inner = inner

    def read_range(self, offset: int, length: int) -> bytes:
        time.sleep(0.01)
        raise ts.RemoteStorageError(5, "injected: the GET failed after its retries")

    def size(self) -> int:
        return self._inner.size()

    def close(self) -> None:
        self._inner.close()


class _OneShardFails(_SlowObjectStore):
    """Reads of ``bad`` fail with RemoteStorageError; opening ``gone`` raises a second one."""

    bad = ""
    gone = ""

    def open(self, name: str) -> ReadHandle:
        if name == self.gone:
            raise ts.RemoteStorageError(5, "injected: the HEAD failed after its retries")
        h = super().open(name)
        return _FailingHandle(h) if name == self.bad else h


class _OneShardFailsInTurn(_OneShardFails):
    read_concurrency = 1


@pytest.mark.parametrize("cls", [_OneShardFailsInTurn, _OneShardFails])
def test_storage_errors_in_flight_raise_the_first_in_file_order_and_leave_no_thread(
    store: Path, cls: type[_OneShardFails], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing GET of one shard and a failing open of a later one: the bulk read raises the
    first in file order (the sequential path's), whatever finishes first, and its pool is gone."""
    names = [s.name for s in ts.open_store(store).index.shards]
    base = ts.open_store(cls(store), verify=False)
    table = base.record_table()
    monkeypatch.setattr(cls, "bad", names[1])  # from now on (the table above read every footer)
    monkeypatch.setattr(cls, "gone", names[2])
    before = threading.active_count()
    picks = _far_apart(store, 3)
    for _ in range(3):
        with pytest.raises(ts.RemoteStorageError, match="the GET failed"):
            _fresh(base).read_many(picks, table=table)
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name.startswith("tspt-read")]


def test_getitems_raises_the_first_failure_in_the_batch_order(tmp_path: Path, store: Path) -> None:
    """``ds.__getitems__(batch)`` raises what ``[ds[i] for i in batch]`` raises: a transform that
    fails on an earlier index wins over a damaged record later in the batch, and the other way round."""
    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    _damage_record(copy, 50)

    def transform(sample: dict[str, torch.Tensor]) -> int:
        if int(sample["i"]) == 7:
            raise KeyError("the transform refuses record 7")
        return int(sample["i"])

    ds = ts.StoreDataset(_SlowObjectStore(copy), verify=False, transform=transform)
    for batch, expected in (([3, 7, 50], KeyError), ([3, 50, 7], ts.ChecksumMismatchError)):
        with pytest.raises(expected):
            [ds[i] for i in batch]
        with pytest.raises(expected):
            ds.__getitems__(batch)
    assert ds.__getitems__([3, -1, 3, np.int64(4)]) == [3, N - 1, 3, 4]


def test_dataloader_fork_workers_after_a_bulk_read_in_the_parent(store: Path) -> None:
    """A bulk read with reads in flight in the parent, then forked DataLoader workers each doing
    bulk reads (batch_sampler, drop_last): every record once, the parent left with no pool thread."""
    remote = _SlowObjectStore(store)
    ds = ts.StoreDataset(remote, verify=False, transform=lambda s: int(s["i"]))
    assert ds.__getitems__(_far_apart(store, 2)) == _far_apart(store, 2)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(N)), batch_size=16, drop_last=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=2, multiprocessing_context="fork", collate_fn=list
    )
    seen = [i for batch in loader for i in batch]
    assert len(seen) == (N // 16) * 16 == len(set(seen))
    assert not [t for t in threading.enumerate() if t.name.startswith("tspt-read")]


def _in_forked_child(body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child (a DataLoader worker's situation); the text it returned,
    once the child has exited cleanly."""
    import os

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.write(write_fd, body().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read_fd, 100).decode()
    os.close(read_fd)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_a_forked_child_rebuilds_the_s3_file_system_once_for_reads_in_flight(s3_bucket: tuple[str, dict]) -> None:
    """Fault: in a forked child (a DataLoader worker) the first bulk read's 16 reads in flight
    each found the parent's fsspec file system and each built a new one (16 clients, a race on
    the listing lock). Now the first thread rebuilds it and the others wait and use it."""

    from tensorstore_pt.storage import remote

    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    ts.write_store((_sample(i) for i in range(60)), url, codec="none", max_shard_bytes=40_000, storage_options=options)
    reader = ts.open_store(url, verify=False, storage_options=options)
    table = reader.record_table()
    assert reader.storage.read_concurrency > 1
    picks = list(range(0, 60, 5))
    calls: list[str] = []
    real = remote.FsspecStorage._make_fs

    def counting(self: remote.FsspecStorage) -> Any:
        calls.append(threading.current_thread().name)
        time.sleep(0.05)  # a client takes a while to build: the window the threads raced in
        return real(self)

    def child() -> str:
        remote.FsspecStorage._make_fs = counting  # type: ignore[method-assign]
        got = [int(s["i"]) for s in reader.read_many(picks, table=table)]
        return f"{len(calls)} {got == picks}"

    assert _in_forked_child(child) == "1 True"


@pytest.fixture(scope="module")
def framed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("abf") / "s"
    ts.write_store((_sample(i) for i in range(N)), path, max_shard_bytes=100_000, frame_target_bytes=20_000)
    return path


def test_footers_of_a_framed_store_are_read_with_reads_in_flight(tmp_path: Path, framed_store: Path) -> None:
    """Fault: a store with no frame table (multi-record frames, format 1.1; raw frames, 1.2) is
    positioned by footers, which a bulk read fetched one shard after another: a fresh worker's
    first batch over k shards of an object store waited out k round trips in a row before its
    reads in flight. Now the footers are read many at a time too; a shard whose footer cannot
    be read still gives its records their error (asked once), the others read back."""
    copy = tmp_path / "s"
    shutil.copytree(framed_store, copy)
    base = ts.open_store(_CountingObjectStore(copy), verify=False)
    bounds = base.shard_bounds().tolist()
    gone = base.index.shards[2].name
    (copy / gone).unlink()
    picks = [a for a, _ in bounds] + [b - 1 for _, b in bounds]
    reader = _fresh(base)  # no footer read yet
    state = reader.storage.state
    state["peak"] = 0
    _OPENS.clear()
    failed: dict[int, BaseException] = {}
    reader._frames_of(np.array(picks), None, failed)
    assert state["peak"] > 1, "footers were read one at a time"
    assert list(failed) == [2] and isinstance(failed[2], ts.MissingShardError)
    assert _OPENS[gone] == 1
    got = _fresh(base).read_many(picks, on_error="return")
    lo, hi = bounds[2]
    for p, g in zip(picks, got):
        if lo <= p < hi:
            assert isinstance(g, ts.MissingShardError)
        else:
            assert int(g["i"]) == p


def test_threads_of_a_forked_child_start_the_reader_afresh_once(store: Path) -> None:
    """Fault: in a forked child, threads reading at once (a bulk read's footers or frames, or
    the user's threads) each found the parent's pid and each reset the reader's handles and
    lock, dropping the handles the others had just opened. Now one thread resets, once."""

    reader = ts.open_store(_SlowObjectStore(store), verify=False)
    reader.read_many([0, N - 1])
    bounds = reader.shard_bounds().tolist()

    def child() -> str:
        calls: list[int] = []
        real = ts.StoreReader._init_process_state

        def slow(self: ts.StoreReader) -> None:
            calls.append(1)
            time.sleep(0.05)  # the window in which the other threads also saw a new pid
            real(self)

        ts.StoreReader._init_process_state = slow  # type: ignore[method-assign]
        got: dict[int, int] = {}
        threads = [threading.Thread(target=lambda a=a: got.update({a: int(reader[a]["i"])})) for a, _ in bounds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = got == {a: a for a, _ in bounds} and len(reader._handles) == len(bounds)
        return f"{len(calls)} {ok}"

    assert _in_forked_child(child) == "1 True"


def test_dataset_indices_are_what_the_reader_takes(store: Path) -> None:
    """Fault: ``ds[torch.tensor(3)]`` and ``ds.__getitems__(torch.tensor([...]))`` (a sampler of
    tensors) were refused though ``reader[torch.tensor(3)]`` reads record 3. Now 0-dim integer
    tensors and arrays are indices, in both paths; bools, floats and strings are still refused."""
    ds = ts.StoreDataset(store, transform=lambda s: int(s["i"]))
    assert ds[torch.tensor(3)] == 3
    assert ds[np.array(-1)] == N - 1
    assert ds.__getitems__(torch.tensor([5, -1, 5])) == [5, N - 1, 5]
    assert ds.__getitems__(np.array([2, 0])) == [2, 0]
    for bad, kind in ((torch.tensor(True), "Tensor"), (torch.tensor(1.0), "Tensor"), (True, "bool"), ("1", "str")):
        with pytest.raises(ts.InvalidOptionError, match=f"expected an int, found {kind}"):
            ds[bad]
        with pytest.raises(ts.InvalidOptionError, match=f"expected an int, found {kind}"):
            ds.__getitems__([0, bad])
    with pytest.raises(ts.RecordIndexError, match=f"record {N} is out of range"):
        ds.__getitems__(torch.tensor([0, N]))


class _BadConcurrency(_SlowObjectStore):
    read_concurrency = "16"  # type: ignore[assignment]


class _ZeroConcurrency(_SlowObjectStore):
    read_concurrency = 0


@pytest.mark.parametrize("cls", [_BadConcurrency, _ZeroConcurrency])
def test_a_storage_with_a_bad_read_concurrency_is_refused_by_name(store: Path, cls: type) -> None:
    """Fault: a storage class of the user's with ``read_concurrency = "16"`` made a bulk read
    fail with a bare TypeError from ``min``, and 0 silently meant one at a time. Now both are an
    InvalidOptionError naming the class, the attribute and the value."""
    reader = ts.open_store(cls(store), verify=False)
    with pytest.raises(ts.InvalidOptionError, match=f"{cls.__name__}.read_concurrency: expected a positive int"):
        reader.read_many([0, N // 2, N - 1])
    assert int(reader[N - 1]["i"]) == N - 1  # a single read needs no concurrency


_READS: collections.Counter[str] = collections.Counter()


class _FirstShardDown(_SlowObjectStore):
    """Reads of ``down`` fail at once (RemoteStorageError); every other read is counted."""

    down = ""

    def open(self, name: str) -> ReadHandle:
        h = super().open(name)
        return _FailingAtOnce(h) if name == self.down else _CountedHandle(h, name)


class _FailingAtOnce(_FailingHandle):
    def read_range(self, offset: int, length: int) -> bytes:
        raise ts.RemoteStorageError(5, "injected: the shard's GET failed after its retries")


class _CountedHandle(ReadHandle):
    def __init__(self, inner: ReadHandle, name: str) -> None:
        self._inner, self._name = inner, name

    def read_range(self, offset: int, length: int) -> bytes:
        _READS[self._name] += 1
        return self._inner.read_range(offset, length)

    def size(self) -> int:
        return self._inner.size()

    def close(self) -> None:
        self._inner.close()


def test_a_storage_error_in_the_footer_reads_stops_the_queued_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault: when a footer read in flight failed (or ^C), the bulk read still waited for every
    queued footer read of the batch (a store of 1000 shards: 60 more round trips) before raising.
    Now the queued ones are cancelled: only those already in flight finish."""
    path = tmp_path / "s"
    ts.write_store((_sample(i) for i in range(40)), path, max_shard_bytes=8_000, frame_target_bytes=4_000)
    reader = ts.open_store(_FirstShardDown(path), verify=False)
    shards = len(reader.index.shards)
    width = _FirstShardDown.read_concurrency
    assert shards > 2 * width
    monkeypatch.setattr(_FirstShardDown, "down", reader.index.shards[0].name)
    _READS.clear()
    with pytest.raises(ts.RemoteStorageError, match="the shard's GET failed"):
        reader.read_many([int(a) for a, _ in reader.shard_bounds()])
    assert len(_READS) <= width, f"{len(_READS)} of {shards - 1} footers were read after the first failed"


def test_a_shard_deleted_under_an_open_handle_is_a_missing_shard(s3_bucket: tuple[str, dict]) -> None:
    """Fault: on an object store, a shard deleted while a reader (a DataLoader worker) had it
    open failed every later bulk read with RemoteStorageError (HTTP 404): on_error="return"
    could not report it per record, skip_corrupt could not skip it, while a reader opened after
    the delete got MissingShardError per record (a footer read under an open handle: the same).
    Now all get MissingShardError per record."""
    import boto3

    bucket, options = s3_bucket
    url = f"s3://{bucket}/s"
    ts.write_store((_sample(i) for i in range(60)), url, codec="none", max_shard_bytes=40_000, storage_options=options)
    table = ts.open_store(url, verify=False, storage_options=options).record_table()
    reader = ts.open_store(url, verify=False, storage_options=options)
    picks = list(range(0, 60, 4))
    assert [int(s["i"]) for s in reader.read_many(picks, table=table)] == picks  # every shard now open
    footless = ts.open_store(url, verify=False, storage_options=options)
    footless.read_many(picks, table=table)  # every shard open, no footer read (the table positions)
    lo, hi = (int(x) for x in reader.shard_bounds()[1])
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"s/{reader.index.shards[1].name}")
    later = ts.open_store(url, verify=False, storage_options=options)
    for r in (reader, later):
        got = r.read_many(picks, table=table, on_error="return")
        assert [isinstance(g, ts.MissingShardError) for g in got] == [lo <= p < hi for p in picks]
        assert [int(g["i"]) for g in got if isinstance(g, dict)] == [p for p in picks if not lo <= p < hi]
        with pytest.raises(ts.MissingShardError, match="the shard file is missing"):
            r[lo]
    with pytest.raises(ts.MissingShardError, match="the shard file is missing"):
        footless[lo]  # its footer's read finds it gone
