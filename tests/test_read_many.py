"""StoreReader's bulk read (read_many, iter_many, fetch_many/decode_many) and the cost of random
access in positional reads: what a remote store pays one request each for.

A counting Storage (LocalStorage underneath) counts every ``read_range`` call and its bytes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
import tensorstore_pt.reader as reader_mod
import tensorstore_pt.shardio as shardio
from tensorstore_pt.format import HEADER_BYTES, TRAILER_BYTES
from tensorstore_pt.storage import ReadHandle
from tensorstore_pt.storage.local import LocalStorage

from benchmarks.storage_wrap import ForwardingHandle, ForwardingStorage

N = 300
RECORD_ELEMS = 3000  # incompressible uint8: a frame is about RECORD_ELEMS + torch.save's overhead


class _CountingHandle(ReadHandle):
    def __init__(self, inner: ReadHandle, counts: _Counts) -> None:
        self._inner, self._counts = inner, counts

    def read_range(self, offset: int, length: int) -> bytes:
        data = self._inner.read_range(offset, length)
        self._counts.add(offset, len(data))
        return data

    def size(self) -> int:
        self._counts.sizes += 1
        return self._inner.size()

    def close(self) -> None:
        self._inner.close()


class _Counts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.reads, self.bytes, self.sizes, self.ranges = 0, 0, 0, []

    def add(self, offset: int, n: int) -> None:
        with self._lock:
            self.reads += 1
            self.bytes += n
            self.ranges.append((offset, n))


class CountingStorage(LocalStorage):
    """LocalStorage that counts positional reads (calls and bytes) on every file it opens."""

    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.counts = _Counts()

    def open(self, name: str) -> ReadHandle:
        return _CountingHandle(super().open(name), self.counts)


def _sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randint(0, 256, (RECORD_ELEMS,), dtype=torch.uint8, generator=g), "i": torch.tensor(i)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rm") / "s"
    ts.write_store((_sample(i) for i in range(N)), path, codec="none", max_shard_bytes=400_000)
    return path


@pytest.fixture(scope="module")
def framed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rmf") / "s"
    ts.write_store((_sample(i) for i in range(N)), path, max_shard_bytes=400_000, frame_target_bytes=20_000)
    return path


def _ids(samples: list[Any]) -> list[int]:
    return [int(s["i"]) for s in samples]


def _frame_bytes(path: Path, i: int) -> int:
    return int(ts.open_store(path).record_table()["stored"][i])


def test_store_layout_is_what_the_counts_below_assume(store: Path) -> None:
    r = ts.open_store(store)
    assert len(r.index.shards) >= 2
    entry = r.index.shards[0]
    footer_bytes = entry.file_bytes - HEADER_BYTES - entry.stored_bytes
    # the shard is much larger than its footer: reading it whole would show in the byte counts
    assert entry.file_bytes > 20 * footer_bytes > 0


def test_random_read_is_one_tail_read_then_one_read_a_record(store: Path) -> None:
    st = CountingStorage(store)
    r = ts.open_store(st, verify=False)  # footers load on first use
    st.counts.reset()
    first, end = (int(x) for x in r.shard_bounds()[0])
    i = (first + end) // 2
    entry = r.index.shards[0]
    footer_bytes = entry.file_bytes - HEADER_BYTES - entry.stored_bytes

    assert int(r[i]["i"]) == i
    # cold: the shard's tail (trailer + footer, exactly), its 16-byte header, then the record
    frame = (int(ts.open_store(store).record_table()["offset"][i]), _frame_bytes(store, i))
    assert st.counts.ranges == [(entry.file_bytes - footer_bytes, footer_bytes), (0, HEADER_BYTES), frame]
    assert st.counts.bytes <= frame[1] + footer_bytes + HEADER_BYTES
    assert st.counts.sizes == 0  # no size request either

    st.counts.reset()
    for j in (i + 3, first + 1, end - 1):
        before = st.counts.reads, st.counts.bytes
        assert int(r[j]["i"]) == j
        # warm: one read of exactly the record's frame
        assert (st.counts.reads - before[0], st.counts.bytes - before[1]) == (1, _frame_bytes(store, j))


def test_open_with_verify_then_a_random_read_is_one_read(store: Path) -> None:
    st = CountingStorage(store)
    r = ts.open_store(st)
    i = int(r.shard_bounds()[2, 0]) + 7
    st.counts.reset()
    assert int(r[i]["i"]) == i
    assert (st.counts.reads, st.counts.bytes) == (1, _frame_bytes(store, i))


def test_a_small_shard_is_read_whole_with_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "small"
    ts.write_store(({"i": torch.tensor(i)} for i in range(40)), path, max_shard_bytes=4_000)
    st = CountingStorage(path)
    r = ts.open_store(st, verify=False)
    assert len(r.index.shards) >= 2
    st.counts.reset()
    i = int(r.shard_bounds()[1, 0]) + 1
    assert int(r[i]["i"]) == i
    entry = r.index.shards[1]
    assert st.counts.reads == 2 and st.counts.ranges[0] == (0, entry.file_bytes)  # header, frames and footer


def test_adjacent_records_are_one_read_and_far_ones_are_not_merged(store: Path) -> None:
    st = CountingStorage(store)
    r = ts.open_store(st)  # verify=True: every footer (and header) read at open
    frames = r.record_table()
    first, end = (int(x) for x in r.shard_bounds()[1])
    i = first + 5
    st.counts.reset()
    assert _ids(r[[i, i + 1, i + 2]]) == [i, i + 1, i + 2]
    assert st.counts.reads == 1
    assert st.counts.bytes == int(frames["stored"][i : i + 3].sum())

    st.counts.reset()
    assert _ids(r[[i + 2, i, i + 1, i]]) == [i + 2, i, i + 1, i]  # any order, duplicates: still one read
    assert (st.counts.reads, st.counts.bytes) == (1, int(frames["stored"][i : i + 3].sum()))

    st.counts.reset()
    far = [first, end - 1, int(r.shard_bounds()[0, 0])]  # > 64 KiB apart, or in other shards
    assert _ids(r[far]) == far
    assert st.counts.reads == 3 and st.counts.bytes == int(frames["stored"][far].sum())


def test_open_with_verify_reads_tail_and_header_of_each_shard(store: Path) -> None:
    st = CountingStorage(store)
    st.counts.reset()
    r = ts.open_store(st)
    shard_reads = [(o, n) for o, n in st.counts.ranges if n != len((store / "index.json").read_bytes())]
    assert len(shard_reads) == 2 * len(r.index.shards)
    assert sum(1 for o, n in shard_reads if (o, n) == (0, HEADER_BYTES)) == len(r.index.shards)


def test_read_many_over_a_shard_reads_in_pieces(store: Path) -> None:
    st = CountingStorage(store)
    r = ts.open_store(st)
    first, end = (int(x) for x in r.shard_bounds()[0])
    stored = int(r.record_table()["stored"][first:end].sum())
    read_bytes = 64 * 2**10
    pieces = r.plan_pieces(range(first, end), read_bytes)
    assert np.array_equal(np.concatenate(pieces), np.arange(first, end))
    assert len(pieces) == pytest.approx(stored / read_bytes, abs=1.0)
    st.counts.reset()
    got = r.read_many(range(first, end), read_bytes=read_bytes)
    assert _ids(got) == list(range(first, end))
    assert st.counts.reads == len(pieces)  # one read a piece: O(pieces), not O(records)
    assert st.counts.bytes == stored
    assert max(n for _, n in st.counts.ranges) <= read_bytes + max(_frame_bytes(store, i) for i in range(first, end))

    st.counts.reset()
    assert _ids(list(r)) == list(range(N))  # iteration: default 1 MiB pieces, in store order
    assert st.counts.reads == sum(len(r.plan_pieces(range(a, b))) for a, b in r.shard_bounds().tolist())


def test_a_footer_larger_than_the_tail_read_takes_a_second_read(store: Path, monkeypatch) -> None:
    monkeypatch.setattr(shardio, "MAX_TAIL_BYTES", 100)  # smaller than any footer here
    st = CountingStorage(store)
    r = ts.open_store(st, verify=False)
    st.counts.reset()
    assert int(r[3]["i"]) == 3
    assert st.counts.reads == 4  # the tail (trailer and a bit), the header, the rest of the footer, the record
    assert st.counts.ranges[0][1] == max(100, TRAILER_BYTES)
    assert st.counts.ranges[1] == (0, HEADER_BYTES)


def test_a_shard_of_the_wrong_size_is_found_by_the_tail_read(tmp_path: Path, store: Path) -> None:
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    shard = copy / ts.open_store(copy).index.shards[1].name
    with open(shard, "ab") as f:
        f.write(b"junk")
    r = ts.open_store(copy, verify=False)
    i = int(r.shard_bounds()[1, 0]) + 1
    with pytest.raises(ts.ShardSizeError, match=r"expected \d+ bytes \(index\), found \d+ bytes on disk"):
        r[i]
    with pytest.raises(ts.ShardSizeError):
        ts.open_store(copy)


def test_read_many_matches_read_in_any_order(store: Path) -> None:
    r = ts.open_store(store)
    rng = np.random.default_rng(1)
    req = rng.integers(-N, N, size=200)
    want = [int(x) % N for x in req]
    assert _ids(r.read_many(req)) == want
    assert _ids(r[req]) == want  # a numpy array
    assert _ids(r[torch.from_numpy(req)]) == want
    assert _ids(r[N - 5 :: -37]) == list(range(N - 5, -1, -37))
    assert _ids(r.read_many(req.tolist(), read_bytes=1)) == want  # one record a piece
    samples = r.read_many([7, 7])
    assert samples[0]["x"].data_ptr() != samples[1]["x"].data_ptr()  # duplicates: samples of their own
    assert torch.equal(samples[0]["x"], _sample(7)["x"])
    assert r.read_many([]) == []


def test_read_many_refuses_bad_input(store: Path) -> None:
    r = ts.open_store(store)
    with pytest.raises(ts.RecordIndexError, match=f"record {N} is out of range"):
        r.read_many([0, N])
    with pytest.raises(ts.RecordIndexError, match=f"record {-N - 1} is out of range"):
        r[[-N - 1]]
    with pytest.raises(ts.RecordIndexError, match=f"record {2**70} is out of range"):
        r[[0, 2**70]]
    with pytest.raises(ts.RecordIndexTypeError, match="expected an int, found str"):
        r[[0, "a"]]
    with pytest.raises(ts.RecordIndexTypeError, match="expected an int, found bool"):
        r[[True]]
    with pytest.raises(ts.RecordIndexTypeError, match="1-D"):
        r.read_many([[0, 1]])
    with pytest.raises(ts.InvalidOptionError, match="read_bytes"):
        r.read_many([0], read_bytes=0)
    with pytest.raises(ts.InvalidOptionError, match="on_error"):
        r.read_many([0], on_error="skip")
    with pytest.raises(ts.InvalidOptionError, match="table"):
        r.read_many([0], table=np.zeros(3))


def _damage_record(path: Path, i: int) -> None:
    r = ts.open_store(path)
    si = int(np.searchsorted(r.shard_bounds()[:, 0], i, side="right")) - 1
    off = int(r.record_table()["offset"][i]) + 40
    shard = path / r.index.shards[si].name
    data = bytearray(shard.read_bytes())
    data[off] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_per_record_errors_are_reported_in_place(tmp_path: Path, store: Path) -> None:
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    _damage_record(copy, 11)
    r = ts.open_store(copy)
    results = list(r.iter_many([10, 11, 12, 11]))
    assert [x.record for x in results] == [10, 11, 12, 11]
    assert [x.error is None for x in results] == [True, False, True, False]
    assert isinstance(results[1].error, ts.ChecksumMismatchError) and "record 11" in str(results[1].error)
    assert int(results[2].sample["i"]) == 12
    got = r.read_many([10, 11, 12], on_error="return")
    assert int(got[0]["i"]) == 10 and isinstance(got[1], ts.ChecksumMismatchError) and int(got[2]["i"]) == 12
    with pytest.raises(ts.ChecksumMismatchError, match="record 11"):
        r[[10, 11, 12]]


def test_missing_shard_is_an_error_per_record_and_not_retried(tmp_path: Path, store: Path) -> None:
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    r = ts.open_store(copy, verify=False)
    (copy / r.index.shards[1].name).unlink()
    a, b = (int(x) for x in r.shard_bounds()[1])
    req = [0, a, a + 1, b - 1, b] if b < N else [0, a, a + 1, b - 1]
    results = list(r.iter_many(req, read_bytes=1))
    assert [x.error is not None for x in results] == [False, True, True, True, False][: len(req)]
    assert all(isinstance(x.error, ts.MissingShardError) for x in results[1:4])
    for req in ([a], [a, a + 1]):  # pieces with no readable record at all
        assert [type(x.error) for x in r.iter_many(req, read_bytes=1)] == [ts.MissingShardError] * len(req)
        fetched = r.fetch_many(req)
        assert (fetched.reads, isinstance(fetched.error(a), ts.MissingShardError)) == (0, True)


def test_raw_records_load_like_read(store: Path) -> None:
    r = ts.open_store(store)
    raw = r.read_many([4, 9], raw=True)
    assert all(type(x) is ts.RawRecord and isinstance(x.data, bytearray) for x in raw)
    assert [int(x.load()["i"]) for x in raw] == [4, 9]
    assert bytes(raw[0].data) == r.read_bytes(4)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(raw[0])


def test_fetch_then_decode_in_two_threads(store: Path) -> None:
    st = CountingStorage(store)
    r = ts.open_store(st)
    table = r.record_table()
    st.counts.reset()
    fetched = r.fetch_many([20, 21, 22, 150], table=table)
    assert fetched.reads == st.counts.reads and fetched.stored_bytes == st.counts.bytes
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.extend(r.decode_many(fetched)))
    t.start()
    t.join()
    assert [(x.record, int(x.sample["i"])) for x in out] == [(20, 20), (21, 21), (22, 22), (150, 150)]
    assert st.counts.reads == fetched.reads  # decoding reads nothing


def test_multi_record_frames_are_fetched_and_decoded_once(framed_store: Path, monkeypatch) -> None:
    st = CountingStorage(framed_store)
    r = ts.open_store(st)
    footers = [r._footer(si) for si in range(len(r.index.shards))]
    fm = footers[0].record_map["frame"]
    frame_of = {i: int(f) for i, f in enumerate(fm.tolist())}
    frame0 = [i for i, f in frame_of.items() if f == 0]
    frame1 = [i for i, f in frame_of.items() if f == 1]
    assert len(frame0) >= 3 and frame1

    calls: list[int] = []
    real = reader_mod.check_frame

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(reader_mod, "check_frame", counting)
    req = [frame0[2], frame1[0], frame0[0], frame0[2], frame0[1]]
    st.counts.reset()
    assert _ids(r.read_many(req)) == req
    assert len(calls) == 2  # two frames, each checked and decoded once
    assert st.counts.reads == 1  # adjacent frames: one read
    # whole store in order: each frame decoded once, in pieces
    calls.clear()
    assert _ids(r.read_many(range(N), read_bytes=30_000)) == list(range(N))
    assert len(calls) == sum(len(f.table) for f in footers)


def test_iterable_dataset_skips_per_record_on_a_framed_store(tmp_path: Path, framed_store: Path) -> None:
    """Multi-record frames through the dataset: a damaged frame costs exactly its records, a
    missing shard exactly its records, and the missing shard is tried once an iteration."""
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(framed_store, copy)
    r = ts.open_store(copy)
    f0 = r._footer(0)
    lost_frame = [i for i, f in enumerate(f0.record_map["frame"].tolist()) if f == 1]
    off = int(f0.table["offset"][1]) + 30
    shard0 = copy / r.index.shards[0].name
    data = bytearray(shard0.read_bytes())
    data[off] ^= 0xFF
    shard0.write_bytes(bytes(data))
    a, b = (int(x) for x in r.shard_bounds()[2])
    (copy / r.index.shards[2].name).unlink()

    opens: list[str] = []

    class Tracking(CountingStorage):
        def open(self, name: str) -> ReadHandle:
            opens.append(name)
            return super().open(name)

    ds = ts.StoreIterableDataset(ts.open_store(Tracking(copy), verify=False), on_error="skip", block_records=7)
    got = [int(s["i"]) for s in ds]
    expected = [i for i in range(N) if i not in lost_frame and not a <= i < b]
    assert got == expected
    assert ds.skip_counts() == {"ChecksumMismatchError": len(lost_frame), "MissingShardError": b - a}
    assert opens.count(r.index.shards[2].name) == 1


# --------------------------------------------------------------------------- opening a remote store


class _SlowRemote(ForwardingStorage):
    """A Storage that is not LocalStorage (so the reader treats it as remote), delegating to a
    local directory, with a delay per read (a request's latency) and a record of how many reads
    were in flight at once. State is kept per root in a module dict so pickled copies share it."""

    delay_s = 0.02

    def __init__(self, root: Any) -> None:
        local = LocalStorage(root)
        super().__init__(local, local.location)
        self._key = str(root)
        _SLOW_STATE.setdefault(self._key, {"reads": 0, "inflight": 0, "peak": 0, "lock": threading.Lock()})

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self._key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"])  # type: ignore[misc]

    @property
    def state(self) -> dict[str, Any]:
        return _SLOW_STATE[self._key]

    def open(self, name: str) -> ReadHandle:
        return _SlowHandle(self.inner.open(name), self.state, name)

    def writer(self, name: str, *, exclusive: bool = False, **kw: Any) -> Any:
        raise AssertionError("the reader must not write")

    def remove(self, name: str) -> None:
        raise AssertionError("the reader must not remove")

    def move(self, name: str, new_name: str) -> None:
        raise AssertionError("the reader must not move")

    def remove_container(self) -> None:
        raise AssertionError("the reader must not remove")


_SLOW_STATE: dict[str, dict[str, Any]] = {}


class _SlowHandle(ForwardingHandle):
    def __init__(self, inner: ReadHandle, state: dict[str, Any], name: str) -> None:
        super().__init__(inner)
        self._state, self._name = state, name

    def read_range(self, offset: int, length: int) -> bytes:
        st = self._state
        with st["lock"]:
            st["reads"] += self._name.endswith(".tspt")  # shard reads (not index.json)
            st["inflight"] += 1
            st["peak"] = max(st["peak"], st["inflight"])
        try:
            time.sleep(_SlowRemote.delay_s)
            return self.inner.read_range(offset, length)
        finally:
            with st["lock"]:
                st["inflight"] -= 1


class _TwoInFlight(_SlowRemote):
    """:class:`_SlowRemote` keeping two reads in flight (fewer than the test store's shards)."""

    read_concurrency = 2


def test_remote_open_reads_footers_in_parallel_and_pickled_copies_do_not_sweep_again(store: Path) -> None:
    """A verifying open of a store whose storage keeps reads in flight (``read_concurrency``,
    as an object store) reads its shards' footers that many at a time (each read waits out a
    request's latency), and a pickled copy (a DataLoader worker) opens without a second sweep;
    every record still reads back right through the copy."""
    import pickle

    shards = len(ts.open_store(store).index.shards)
    assert shards > _TwoInFlight.read_concurrency  # enough shards for the limit to show
    remote = _TwoInFlight(store)
    st = remote.state
    st["reads"], st["peak"] = 0, 0
    reader = ts.open_store(remote)  # verify=True
    assert st["reads"] >= shards  # every shard's footer (and header) was read at open
    assert st["peak"] == _TwoInFlight.read_concurrency, st["peak"]  # in flight, never more than that
    st["reads"] = 0
    copy = pickle.loads(pickle.dumps(reader))
    assert st["reads"] == 0, f"the pickled copy swept the shards again ({st['reads']} reads)"
    assert _ids([copy[i] for i in (0, N // 2, N - 1)]) == [0, N // 2, N - 1]
    # the copy keeps the original's verify setting for its own pickles
    assert pickle.loads(pickle.dumps(copy))._verify is True


def test_open_reads_footers_one_at_a_time_where_the_storage_reads_one_at_a_time(store: Path) -> None:
    """The open's footer sweep follows ``read_concurrency`` as bulk reads do: a storage that
    keeps one read in flight (the default, which does not promise thread-safe reads; a
    forwarding wrapper of a local directory) gets its footers read in turn, whatever its class."""
    shards = len(ts.open_store(store).index.shards)
    remote = _SlowRemote(store)
    assert remote.read_concurrency == 1
    st = remote.state
    st["reads"], st["peak"] = 0, 0
    reader = ts.open_store(remote)
    assert st["reads"] >= shards
    assert st["peak"] == 1, f"{st['peak']} footer reads were in flight at once"
    assert _ids([reader[i] for i in (0, N - 1)]) == [0, N - 1]


@pytest.mark.parametrize("width", [1, 8])
def test_remote_open_reports_a_damaged_shard_in_shard_order(tmp_path: Path, width: int) -> None:
    """The parallel open raises the same typed error as the sequential one, for the first bad shard."""
    path = tmp_path / "s"
    ts.write_store((_sample(i) for i in range(60)), path, codec="none", max_shard_bytes=40_000)
    names = [s.name for s in ts.open_store(path).index.shards]
    for name in (names[5], names[2]):
        with open(path / name, "r+b") as f:
            f.seek(0)
            f.write(b"XXXX")  # the header's magic
    cls = _SlowObjectStore if width > 1 else _SlowRemote
    with pytest.raises(ts.ShardFormatError, match=names[2]):
        ts.open_store(cls(path))


# --------------------------------------------------------------------------- bulk reads in flight


class _SlowObjectStore(_SlowRemote):
    """:class:`_SlowRemote` that, like an object store, lets a bulk read keep reads in flight."""

    read_concurrency = 8


def _one_per_shard(path: Path, seed: int) -> list[int]:
    """Two records of each shard, a fifth from either end (too far apart to share a read), in a
    shuffled order (a shuffled batch's reads)."""
    bounds = ts.open_store(path).shard_bounds()
    picks = [int(a + (b - a) * k // 5) for a, b in bounds.tolist() for k in (1, 4)]
    np.random.default_rng(seed).shuffle(picks)
    return picks


def test_remote_bulk_read_keeps_reads_in_flight_and_returns_the_same_samples(store: Path) -> None:
    """On storage with ``read_concurrency`` > 1, read_many issues its positional reads many at a
    time (never more than that), one per run as before, and the samples are read's, in order."""
    picks = _one_per_shard(store, 0)
    assert len(picks) >= 6
    remote = _SlowObjectStore(store)
    reader = ts.open_store(remote, verify=False)
    reader.shard_bounds()
    reader._fetch_footers(range(len(reader.index.shards)))  # footers now, so only frame reads are counted below
    st = remote.state
    st["reads"], st["peak"] = 0, 0
    got = reader.read_many(picks)
    assert _ids(got) == picks
    for i, sample in zip(picks, got):
        assert torch.equal(sample["x"], _sample(i)["x"])
    assert st["reads"] == len(picks)  # one ranged read a record: far apart, never merged
    assert 1 < st["peak"] <= _SlowObjectStore.read_concurrency, st["peak"]
    # storage without concurrency (the default): one read at a time
    plain = _SlowRemote(store)
    r2 = ts.open_store(plain, verify=False)
    r2._fetch_footers(range(len(r2.index.shards)))
    plain.state["peak"] = 0
    assert _ids(r2.read_many(picks)) == picks
    assert plain.state["peak"] == 1


def test_remote_bulk_read_reports_a_missing_shard_per_record(tmp_path: Path, store: Path) -> None:
    """Reads in flight keep the per-record error reporting: the records of a deleted shard carry
    MissingShardError, every other record reads back, and on_error='raise' raises it."""
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store, copy)
    picks = _one_per_shard(copy, 1)
    reader = ts.open_store(_SlowObjectStore(copy), verify=False)
    gone = int(np.searchsorted(reader.shard_bounds()[:, 0], picks[2], side="right")) - 1
    (copy / reader.index.shards[gone].name).unlink()
    lo, hi = (int(x) for x in reader.shard_bounds()[gone])
    got = reader.read_many(picks, on_error="return")
    lost = [lo <= p < hi for p in picks]
    assert sum(lost) == 2
    assert [isinstance(s, ts.MissingShardError) for s in got] == lost
    assert [int(s["i"]) for s, x in zip(got, lost) if not x] == [p for p, x in zip(picks, lost) if not x]
    with pytest.raises(ts.MissingShardError):
        reader.read_many(picks)


def test_dataset_getitems_is_a_bulk_read_with_getitem_semantics(store: Path) -> None:
    """StoreDataset.__getitems__ (what DataLoader calls for a batch) returns [ds[i] for i in batch]
    (transform, negative positions, errors), reading a shuffled batch with reads in flight."""
    remote = _SlowObjectStore(store)
    ds = ts.StoreDataset(remote, verify=False, transform=lambda s: int(s["i"]) * 10)
    picks = _one_per_shard(store, 2)
    remote.state["peak"] = 0
    assert ds.__getitems__(picks + [-1]) == [i * 10 for i in picks] + [(N - 1) * 10]
    assert remote.state["peak"] > 1
    assert ds.__getitems__([]) == []
    reads = remote.state["reads"]
    with pytest.raises(ts.RecordIndexError, match=f"record {N} is out of range"):
        ds.__getitems__([0, N])
    with pytest.raises(ts.InvalidOptionError, match="expected an int, found str"):
        ds.__getitems__([0, "1"])
    assert remote.state["reads"] == reads  # refused before anything was read
    loader = torch.utils.data.DataLoader(ts.StoreDataset(store), batch_size=16, shuffle=True, num_workers=0)
    seen = [int(i) for batch in loader for i in batch["i"]]
    assert sorted(seen) == list(range(N))


def test_dataset_getitems_on_a_framed_store(framed_store: Path) -> None:
    """Multi-record frames have no shared frame table: the bulk read positions them by footers."""
    ds = ts.StoreDataset(framed_store)
    picks = [5, N - 1, 0, 5, 150]
    assert _ids(ds.__getitems__(picks)) == picks
    assert [int(s["i"]) for s in (ds[i] for i in picks)] == picks


class _ManyInFlight(_SlowRemote):
    """:class:`_SlowRemote` keeping more reads in flight than twice the test store's shards."""

    read_concurrency = 64


def test_remote_open_reads_each_footer_and_its_header_at_the_same_time(store: Path) -> None:
    """A shard's footer sweep read the tail, then the 16-byte header: two round trips in a row
    on an object store. With room for both, they are in flight together (half the reads for
    tails, half for headers), and every record still reads back."""
    shards = len(ts.open_store(store).index.shards)
    assert 2 * shards <= _ManyInFlight.read_concurrency
    remote = _ManyInFlight(store)
    st = remote.state
    st["reads"], st["peak"] = 0, 0
    reader = ts.open_store(remote)  # verify=True: every footer at open
    assert st["reads"] == 2 * shards  # a tail and a header each
    assert st["peak"] == 2 * shards, st["peak"]  # all of them at once: one round trip
    assert _ids([reader[i] for i in (0, N // 2, N - 1)]) == [0, N // 2, N - 1]
