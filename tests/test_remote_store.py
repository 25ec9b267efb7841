"""Stores at URLs: the same store suite against a local path, ``memory://`` and a real S3
endpoint (moto's server, see conftest.py). Nothing inside the project is mocked; request
counts and injected failures come from wrapping the fsspec file system in the test."""

from __future__ import annotations

import collections
import errno
import json
import sys
import uuid
from typing import Any

import fsspec
import pytest
import torch
from torch.utils.data import DataLoader

import tensorstore_pt as tspt
from tensorstore_pt import (
    BackendNotInstalledError,
    ChecksumMismatchError,
    ConcurrentWriteError,
    InvalidOptionError,
    NotARegularFileError,
    ReadOnlyStoreError,
    RemoteStorageError,
    ShardWriter,
    StoreDataLoader,
    StoreDataset,
    StoreExistsError,
    StoreIterableDataset,
    StoreNotFoundError,
)
from tensorstore_pt.cli import main, parse_storage_options
from tensorstore_pt.format import HEADER_BYTES
from tensorstore_pt.storage import FsspecStorage, LocalStorage, storage_for

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

N = 16


def sample(i: int) -> dict[str, Any]:
    """Varied records: dtypes, shapes, 0-dim, empty, nested containers."""
    return {
        "id": torch.tensor(i),
        "x": torch.arange(i % 7 + 1, dtype=torch.float32) * (i + 1),
        "b": torch.full((2, 3), i % 2 == 0),
        "h": torch.ones(i % 3, dtype=torch.bfloat16),
        "meta": [i, f"r{i}", (i, 2.5)],
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def fs_of(url: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    """An fsspec file system of the test's own (not the project's) and the store's root path."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, root.rstrip("/")


def names_at(url: str, options: dict[str, Any] | None) -> list[str]:
    fs, root = fs_of(url, options)
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    except FileNotFoundError:
        return []


def write(url: str, options: dict[str, Any] | None, n: int = N, **kwargs: Any) -> tspt.StoreInfo:
    return tspt.write_store((sample(i) for i in range(n)), url, storage_options=options, **kwargs)


def write_uniform(url: str, options: dict[str, Any] | None) -> None:
    """Records that batch (equal shapes): for the dataset tests."""
    tspt.write_store(
        ({"id": torch.tensor(i), "x": torch.full((3,), float(i))} for i in range(N)),
        url,
        storage_options=options,
        max_shard_bytes=4096,
    )


def ids_of(loader: Any) -> list[int]:
    out: list[int] = []
    for batch in loader:
        out += batch["id"].reshape(-1).tolist()
    return out


class Counting:
    """Wraps an fsspec file system and counts the calls that make requests."""

    REQUESTS = frozenset(
        {"ls", "info", "exists", "cat_file", "put_file", "pipe_file", "rm_file", "cp_file", "_call_s3"}
    )

    def __init__(self, fs: Any) -> None:
        self.inner = fs
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.REQUESTS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


# ----------------------------------------------------------------------------- round trips


def test_round_trip_and_roll_over(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    info = write(url, options, max_shard_bytes=4096)
    assert info.records == N and info.shards >= 4  # rolled over to many shards
    reader = tspt.open_store(url, storage_options=options)
    assert len(reader) == N
    for i in range(N):
        assert same(reader[i], sample(i)), i
    assert [int(s["id"]) for s in reader[3:9]] == list(range(3, 9))
    picks = [N - 1, 0, N // 2, 1, N - 2, N // 3]  # a shuffled batch over shards: reads in flight on a remote store
    assert all(same(got, sample(i)) for got, i in zip(reader.read_many(picks), picks))
    assert tspt.verify_store(url, deep=True, storage_options=options).ok
    on_store = names_at(url, options)
    assert "index.json" in on_store and sum(n.endswith(".tspt") for n in on_store) == info.shards


def test_overwrite_and_append(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    write(url, options, n=5, max_shard_bytes=4096)
    first_shards = [n for n in names_at(url, options) if n.endswith(".tspt")]
    with pytest.raises(StoreExistsError, match="already exists"):
        write(url, options, n=2)
    tspt.write_store((sample(100 + i) for i in range(4)), url, storage_options=options, mode="overwrite")
    reader = tspt.open_store(url, storage_options=options)
    assert [int(r["id"]) for r in reader[:]] == [100, 101, 102, 103]
    assert not set(first_shards) & set(names_at(url, options))  # the old shards were removed
    tspt.write_store((sample(200 + i) for i in range(3)), url, storage_options=options, mode="append")
    assert [int(r["id"]) for r in tspt.open_store(url, storage_options=options)[:]] == [
        100,
        101,
        102,
        103,
        200,
        201,
        202,
    ]


def test_failed_body_leaves_nothing(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(url, max_shard_bytes=2048, storage_options=options) as w:
            for i in range(12):  # several shards uploaded before the failure
                w.write(sample(i))
            w._drain_one() if w._pending else None  # noqa: SLF001 - make sure shards went out
            raise RuntimeError("boom")
    assert names_at(url, options) == []
    with pytest.raises((StoreNotFoundError, tspt.NotAStoreError)):
        tspt.open_store(url, storage_options=options)


# ----------------------------------------------------------------------------- requests


def _fresh_location(kind: str, request: pytest.FixtureRequest, name: str) -> tuple[str, dict[str, Any]]:
    """``(url, storage_options)`` of ``name`` in a fresh S3 bucket (``kind`` "s3") or a fresh
    ``memory://`` prefix (``kind`` "memory")."""
    if kind == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        return f"s3://{bucket}/{name}", options
    return f"memory://tspt-{uuid.uuid4().hex[:12]}/{name}", {}


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_open_costs_a_constant_number_of_requests(kind: str, request: pytest.FixtureRequest) -> None:
    base, options = _fresh_location(kind, request, "")
    base = base.rstrip("/")
    counts = {}
    for shards in (2, 12):
        url = f"{base}/s{shards}"
        write(url, options, n=shards, max_shard_bytes=600)  # one record a shard
        assert tspt.open_store(url, storage_options=options).index.shards.__len__() == shards
        for verify in (False, True):
            storage = FsspecStorage(url, options)
            counting = Counting(storage.fs)
            storage._fs = counting  # noqa: SLF001 - the test's own wrapper around the backend
            reader = tspt.open_store(storage, verify=verify)
            assert same(reader[shards - 1], sample(shards - 1))
            counts[shards, verify] = dict(counting.calls)
    assert counts[2, False] == counts[12, False]  # O(1) in shards without verify
    # open: one GET of the index (no HEAD); then one random read: a HEAD of its shard and
    # ranged GETs of header, trailer, footer and the frame
    assert counts[2, False].get("ls", 0) == 0 and sum(counts[2, False].values()) <= 6, counts[2, False]
    assert counts[2, False].get("info", 0) <= 1, counts[2, False]
    # verify: one listing gives every size (no HEAD per shard); the footers are ranged GETs
    assert counts[2, True].get("ls") == counts[12, True].get("ls") == 1
    assert counts[2, True].get("info", 0) == counts[12, True].get("info", 0) == 0


class ByteCounting(Counting):
    """:class:`Counting` that also adds up the bytes each ``cat_file`` returns, per object name,
    and records the ranged ones (``start`` given) as ``(name, start, end)``."""

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        self.got: collections.Counter[str] = collections.Counter()
        self.ranges: list[tuple[str, int, int | None]] = []

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        self.calls["cat_file"] += 1
        data = self.inner.cat_file(path, start=start, end=end, **kw)
        name = path.rsplit("/", 1)[-1]
        self.got[name] += len(data)
        if start is not None:
            self.ranges.append((name, start, end))
        return data


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_streaming_a_framed_store_fetches_each_shard_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """A store with multi-record frames streamed from a URL through the shard cache: the
    dataset's verifying open makes no ranged read (no footer: one listing checks every shard's
    size), and the epoch fetches each shard's bytes exactly once, its footer included (read
    from the cached copy). A second epoch fetches nothing."""
    url, options = _fresh_location(kind, request, "framed")
    records = 40
    tspt.write_store(
        ({"id": torch.tensor(i), "x": torch.full((64,), float(i))} for i in range(records)),
        url,
        storage_options=options,
        codec="none",
        max_shard_bytes=12_000,
        frame_target_bytes=4096,
    )
    index = tspt.open_store(url, storage_options=options, verify=False).index
    assert "multi-record-frames" in index.features and len(index.shards) >= 3
    storage = FsspecStorage(url, options)
    counting = ByteCounting(storage.fs)
    storage._fs = counting  # noqa: SLF001 - the test's own wrapper around the backend
    ds = StoreIterableDataset(storage, cache_dir=tmp_path / "cache", shuffle=True, seed=2)  # verify=True
    shards = {s.name: s.file_bytes for s in index.shards}
    opened = [r for r in counting.ranges if r[0] in shards]
    assert opened == [], f"the open read ranges of shards (footers): {opened}"
    assert not set(counting.got) & set(shards)
    assert counting.calls["ls"] == 1  # the sizes, from one listing
    loader = StoreDataLoader(ds, batch_size=4, num_workers=0)
    assert sorted(ids_of(loader)) == list(range(records))
    assert {n: counting.got[n] for n in shards} == shards  # each shard's bytes once, nothing more
    counting.got.clear()
    ds.set_epoch(1)
    assert sorted(ids_of(loader)) == list(range(records))
    assert not set(counting.got) & set(shards)


# ----------------------------------------------------------------------------- damage


def test_verify_clean_then_damage_detected(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    write(url, options, max_shard_bytes=4096)
    assert tspt.verify_store(url, storage_options=options).ok
    index = tspt.open_store(url, storage_options=options).index
    shard = index.shards[1]
    fs, root = fs_of(url, options)
    path = f"{root}/{shard.name}"
    data = bytearray(fs.cat_file(path))
    data[HEADER_BYTES + 3] ^= 0xFF  # a byte of the shard's first frame
    fs.pipe_file(path, bytes(data))
    report = tspt.verify_store(url, storage_options=options)
    assert not report.ok
    kinds = {p.kind for p in report.problems if p.shard == shard.name}
    assert "file_checksum" in kinds, report.problems
    reader = tspt.open_store(url, storage_options=options)
    with pytest.raises(ChecksumMismatchError, match=shard.name):
        reader[shard.first_record]
    assert same(reader[0], sample(0))  # other shards still read


def test_recover_rebuilds_a_lost_index(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    write(url, options, max_shard_bytes=4096)
    fs, root = fs_of(url, options)
    fs.rm_file(f"{root}/index.json")
    report = tspt.recover_store(url, storage_options=options)
    assert report.records == N
    reader = tspt.open_store(url, storage_options=options)
    assert [int(r["id"]) for r in reader[:]] == list(range(N))


# ----------------------------------------------------------------------------- datasets


def test_datasets_exactly_once_with_workers_and_ranks(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    write_uniform(url, options)
    ds = StoreDataset(url, storage_options=options)
    got = ids_of(DataLoader(ds, batch_size=4, num_workers=2))
    assert sorted(got) == list(range(N))
    union: list[int] = []
    for rank in range(2):
        it = StoreIterableDataset(
            url, shuffle=True, seed=1, rank=rank, world_size=2, equalize="off", storage_options=options
        )
        union += ids_of(StoreDataLoader(it, batch_size=3, num_workers=2))
    assert sorted(union) == list(range(N))


def test_loader_resume(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    write_uniform(url, options)

    def make() -> StoreIterableDataset:
        return StoreIterableDataset(url, shuffle=True, seed=5, storage_options=options)

    expected = make().epoch_order(0).tolist()
    loader = StoreDataLoader(make(), batch_size=3, num_workers=2)
    it = iter(loader)
    head = ids_of([next(it), next(it)])
    state = json.loads(json.dumps(loader.state_dict()))
    del it, loader
    resumed = StoreDataLoader(make(), batch_size=3, num_workers=0)
    resumed.load_state_dict(state)
    assert head + ids_of(resumed) == expected


# ----------------------------------------------------------------------------- S3 semantics


def test_two_writers_one_commits(s3_bucket: tuple[str, dict]) -> None:
    bucket, options = s3_bucket
    url = f"s3://{bucket}/race"
    a = ShardWriter(url, storage_options=options, max_shard_bytes=2048)
    b = ShardWriter(url, storage_options=options, max_shard_bytes=2048)
    for i in range(6):
        a.write(sample(i))
        b.write(sample(100 + i))
    a.close()
    with pytest.raises(ConcurrentWriteError, match="another writer"):
        b.close()
    reader = tspt.open_store(url, storage_options=options)
    assert [int(r["id"]) for r in reader[:]] == list(range(6))  # exactly a's data
    # b removed its shards: only a's shards and the index are left
    assert sorted(names_at(url, options)) == sorted(["index.json", *(s.name for s in reader.index.shards)])


def test_conditional_commit_is_atomic_on_s3(s3_bucket: tuple[str, dict]) -> None:
    """The race the compare-before-commit cannot close: the index changes between the compare
    and the PUT. S3 refuses the conditional PUT (If-Match / If-None-Match) with 412."""
    bucket, options = s3_bucket
    st = FsspecStorage(f"s3://{bucket}/cond", options)
    with st.writer("index.json", exclusive=True) as out:
        out.write(b"v1")
    late = st.writer("index.json", exclusive=True)
    late.write(b"v2")
    with pytest.raises(FileExistsError):
        late.commit()
    data, version = st.read_versioned("index.json")
    assert data == b"v1" and version
    with pytest.raises(ValueError, match="expected at most 1") as too_big:
        st.read_versioned("index.json", max_bytes=1)
    assert not isinstance(too_big.value, RemoteStorageError)
    with st.writer("index.json") as out:  # another writer replaces it meanwhile
        out.write(b"other")
    stale = st.writer("index.json", if_match=version)
    stale.write(b"mine")
    with pytest.raises(ConcurrentWriteError, match="changed since"):
        stale.commit()
    assert st.read_all("index.json") == b"other"
    _, now = st.read_versioned("index.json")
    with st.writer("index.json", if_match=now) as out:
        out.write(b"mine")
    assert st.read_all("index.json") == b"mine"
    assert sorted(st.list()) == ["index.json"]  # nothing spooled is left behind


def test_move_never_overwrites(remote_store: tuple[str, dict | None]) -> None:
    url, options = remote_store
    st = storage_for(url, options)
    st.ensure()
    for name, data in (("a", b"1"), ("b", b"2")):
        with st.writer(name) as out:
            out.write(data)
    with pytest.raises(FileExistsError):
        st.move("a", "b")
    st.move("a", "c")
    assert st.list() == ["b", "c"] and st.read_all("c") == b"1"
    assert st.sizes() == {"b": 1, "c": 1}


def test_missing_bucket_is_store_not_found(s3_bucket: tuple[str, dict]) -> None:
    _, options = s3_bucket
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/store"
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        tspt.open_store(url, storage_options=options)
    with pytest.raises(StoreNotFoundError, match="bucket .* does not exist"):
        write(url, options, n=1)


# ----------------------------------------------------------------------------- retries


class Flaky(Counting):
    """Fails the first ``fail`` ranged reads with ``exc``; ``short`` returns truncated bytes."""

    def __init__(self, fs: Any, exc: BaseException | None, fail: int, short: bool = False) -> None:
        super().__init__(fs)
        self.exc, self.fail, self.short = exc, fail, short

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        self.calls["cat_file"] += 1
        data = self.inner.cat_file(path, start=start, end=end, **kw)
        if self.fail > 0 and start is not None:
            self.fail -= 1
            if self.short:
                return data[: len(data) // 2]
            raise self.exc  # type: ignore[misc]
        return data


def _flaky_reader(url: str, options: dict, exc: BaseException | None, fail: int, short: bool = False):
    storage = FsspecStorage(url, {**options, "tspt_retry_base_delay_s": 0.001, "tspt_retries": 3})
    flaky = Flaky(storage.fs, exc, fail, short)
    reader = tspt.open_store(storage, verify=False)
    storage._fs = flaky  # noqa: SLF001 - the test's wrapper around the backend
    return reader, flaky


@pytest.mark.parametrize(
    "exc",
    [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow"), None],
    ids=["reset", "timeout", "short"],
)
def test_transient_failures_are_retried(exc: BaseException | None) -> None:
    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/store"
    write(url, {}, n=3)
    reader, flaky = _flaky_reader(url, {}, exc, fail=2, short=exc is None)
    assert same(reader[1], sample(1))
    assert flaky.calls["cat_file"] >= 3


def test_permanent_failure_and_exhausted_retries_raise_remote_storage_error() -> None:
    url = f"memory://tspt-{uuid.uuid4().hex[:12]}/store"
    write(url, {}, n=3)
    reader, flaky = _flaky_reader(url, {}, PermissionError(errno.EACCES, "403 Forbidden"), fail=1)
    name = reader.index.shards[0].name
    with pytest.raises(RemoteStorageError, match=rf"{url}.*file '{name}', bytes \[\d+, \d+\).*permanent") as info:
        reader[0]
    assert isinstance(info.value.__cause__, PermissionError) and flaky.calls["cat_file"] == 1
    reader, flaky = _flaky_reader(url, {}, ConnectionResetError(errno.ECONNRESET, "reset"), fail=10)
    with pytest.raises(RemoteStorageError, match="after 4 attempts"):
        reader[0]
    assert flaky.calls["cat_file"] == 4  # the first attempt and 3 retries


# ----------------------------------------------------------------------------- refusals


def test_http_is_read_only() -> None:
    st = storage_for("http://127.0.0.1:9/store")
    assert isinstance(st, FsspecStorage) and st.read_only
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        st.writer("index.json")
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        tspt.write_store([sample(0)], "https://127.0.0.1:9/store")
    with pytest.raises(ReadOnlyStoreError, match="read-only"):
        tspt.recover_store("http://127.0.0.1:9/store")


def test_missing_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(BackendNotInstalledError, match=r"pip install 'tensorstore_pt\[s3\]'") as info:
        tspt.open_store("s3://bucket/store")
    assert isinstance(info.value, ImportError)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(BackendNotInstalledError, match=r"tensorstore_pt\[gcs\]"):
        storage_for("gs://bucket/store")


def test_storage_for_and_options() -> None:
    assert isinstance(storage_for("/tmp/x"), LocalStorage)
    assert isinstance(storage_for("file:///tmp/x"), LocalStorage) and storage_for("file:///tmp/x").location == "/tmp/x"
    with pytest.raises(InvalidOptionError, match="only URLs"):
        storage_for("/tmp/x", {"key": "k"})
    with pytest.raises(InvalidOptionError, match="unknown option"):
        storage_for("memory://x", {"tspt_retires": 2})
    with pytest.raises(InvalidOptionError, match="tspt_retries"):
        storage_for("memory://x", {"tspt_retries": -1})
    assert parse_storage_options(None) is None
    assert parse_storage_options(["a=1", "b=true", "c=text", "client_kwargs.region_name=eu-west-1", 'd={"x": 2}']) == {
        "a": 1,
        "b": True,
        "c": "text",
        "client_kwargs": {"region_name": "eu-west-1"},
        "d": {"x": 2},
    }
    with pytest.raises(InvalidOptionError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])


def test_pickled_storage_reopens_by_url(s3_bucket: tuple[str, dict]) -> None:
    import pickle

    bucket, options = s3_bucket
    url = f"s3://{bucket}/p"
    write(url, options, n=4)
    reader = pickle.loads(pickle.dumps(tspt.open_store(url, storage_options=options)))
    assert reader.storage.url == url and reader.storage.storage_options == options
    assert same(reader[3], sample(3))


# ----------------------------------------------------------------------------- CLI


def test_cli_pack_info_verify_against_s3(s3_bucket: tuple[str, dict], tmp_path: Any, capsys: Any) -> None:
    bucket, options = s3_bucket
    src = tmp_path / "src.pt"
    torch.save([torch.arange(i + 1) for i in range(9)], src)
    url = f"s3://{bucket}/cli"
    opts = ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "key=testing"]
    opts += ["--storage-option", "secret=testing"]
    assert main(["pack", str(src), url, "-q", *opts]) == 0
    assert f"packed 9 records into 1 shard + index at {url}" in capsys.readouterr().out
    assert main(["info", url, "--json", *opts]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["records"] == 9
    assert main(["verify", url, *opts]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["audit", url, "--json", "--sample", "4", "--top", "2", *opts]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 9
    assert main(["get", url, "3", "-o", str(tmp_path / "r3.pt"), *opts]) == 0
    assert torch.equal(torch.load(tmp_path / "r3.pt", weights_only=True), torch.arange(4))
    assert main(["info", url, "--storage-option", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_http_store_reads_and_verifies(tmp_path: Any) -> None:
    """A store served over plain HTTP (Python's http.server: HEAD, GET, no Range support, so
    every ranged read gets the whole object and must still return exactly its bytes)."""
    import functools
    import http.server
    import threading

    write(str(tmp_path / "store"), None, max_shard_bytes=4096)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/store"
        reader = tspt.open_store(url)
        assert all(same(reader[i], sample(i)) for i in range(N))
        assert tspt.verify_store(url).ok
        with pytest.raises(ReadOnlyStoreError):
            tspt.write_store([sample(0)], url, mode="overwrite")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_reader_of_a_replaced_store_raises_store_changed(kind: str, request: pytest.FixtureRequest) -> None:
    """A shard deleted by an overwrite while a reader holds it open: StoreChangedError (the
    object store answers 404 mid-read), never another version's bytes."""
    url, options = _fresh_location(kind, request, "replaced")
    write(url, options, n=4)  # one shard
    reader = tspt.open_store(url, storage_options=options)
    assert same(reader[0], sample(0))
    tspt.write_store((sample(50 + i) for i in range(4)), url, storage_options=options, mode="overwrite")
    with pytest.raises(tspt.StoreChangedError, match="replaced since it was opened"):
        reader[1]
    assert int(tspt.open_store(url, storage_options=options)[1]["id"]) == 51


def test_recover_salvages_a_damaged_shard(remote_store: tuple[str, dict | None]) -> None:
    """recover on each backend: copies the damaged shard's good records to a new shard,
    quarantines the original (copy + delete on object stores) and commits a new index."""
    url, options = remote_store
    write(url, options, max_shard_bytes=4096)
    index = tspt.open_store(url, storage_options=options).index
    shard = index.shards[0]
    fs, root = fs_of(url, options)
    data = bytearray(fs.cat_file(f"{root}/{shard.name}"))
    data[HEADER_BYTES + 3] ^= 0xFF  # record 0's frame
    fs.pipe_file(f"{root}/{shard.name}", bytes(data))
    report = tspt.recover_store(url, storage_options=options)
    assert report.index_written and report.records == N - 1 and report.records_lost == 1
    assert shard.name in [q.name for q in report.quarantined]  # (later shards are renumbered too)
    after = names_at(url, options)
    for q in report.quarantined:
        assert q.name not in after and q.new_name in after
    assert report.index_backup in after
    reader = tspt.open_store(url, storage_options=options)
    assert [int(r["id"]) for r in reader[:]] == list(range(1, N))
    assert tspt.verify_store(url, storage_options=options).ok


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_read_all_is_one_get_and_keeps_its_errors(kind: str, request: pytest.FixtureRequest) -> None:
    # A whole object in one GET (a store's open reads index.json so, with no HEAD first); an
    # empty object, a prefix, an absent name and an object past max_bytes still say what they are.
    url, options = _fresh_location(kind, request, "r")
    storage = FsspecStorage(url, options)
    fs, root = storage.fs, url.split("://", 1)[1]
    fs.pipe_file(f"{root}/data.bin", bytes(range(256)) * 4)
    fs.pipe_file(f"{root}/empty.bin", b"")
    fs.pipe_file(f"{root}/dir.json/inside", b"x")
    counting = Counting(fs)
    storage._fs = counting  # noqa: SLF001 - the test's own wrapper around the backend
    assert storage.read_all("data.bin") == bytes(range(256)) * 4
    assert storage.read_all("data.bin", max_bytes=1024) == bytes(range(256)) * 4
    assert dict(counting.calls) == {"cat_file": 2}
    with pytest.raises(ValueError, match="expected at most 1023"):
        storage.read_all("data.bin", max_bytes=1023)
    assert storage.read_all("empty.bin", max_bytes=10) == b""
    assert storage.read_all("empty.bin") == b""
    with pytest.raises(NotARegularFileError):
        storage.read_all("dir.json", max_bytes=10)
    with pytest.raises(FileNotFoundError):
        storage.read_all("absent.json", max_bytes=10)
