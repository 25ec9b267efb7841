"""Batch decoding: batches decoded in one go equal torch.load per record followed by the collate.

Covers :func:`tensorstore_pt.fastload.collate_records` on nested containers and literal leaves,
the decode thread's whole batches with ``num_workers=0`` and the workers' batches, the
fallback to record-by-record loading (mixed plans, what the plans do not cover), and resume.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import _from_bytes, assert_identical, samples, saved, tensors_of
from torch.utils.data import default_collate

import tensorstore_pt as tspt
import tensorstore_pt._shared_batches as sb
import tensorstore_pt.dataset as dataset_module
from tensorstore_pt import StoreDataLoader, StoreIterableDataset, open_store
from tensorstore_pt import fastload
from tensorstore_pt.fastload import collate_records, fast_loads


@pytest.fixture(autouse=True)
def _no_plan_backoff() -> None:
    """Each test starts without collate_records' planning back-off left by another."""
    fastload._PLAN_BACKOFF[:] = [0, 0]


def list_collate(batch: list[Any]) -> list[Any]:
    """A collate that keeps the samples as they are (module level: workers pickle it)."""
    return list(batch)


def _vary(x: Any, i: int) -> Any:
    """``x`` with its plain tensors refilled and its small ints shifted by ``i`` (same structure)."""
    t = type(x)
    if t is torch.Tensor:
        if x.is_contiguous() and not x.requires_grad and x.storage_offset() == 0 and x.numel():
            if x.untyped_storage().nbytes() == x.numel() * x.element_size():
                raw = bytes((b + 37 * i) & 0xFF for b in x.contiguous().view(-1).view(torch.uint8).tolist())
                return _from_bytes(raw, x.dtype, x.numel()).reshape(x.shape)
        return x
    if t is int and abs(x) < 2**60:
        return x + i % 3
    if t is tuple:
        return tuple(_vary(v, i) for v in x)
    if t is list:
        return [_vary(v, i) for v in x]
    if t is dict:
        return {k: _vary(v, i) for k, v in x.items()}
    return x


def _expected_batches(path: Path, batch_size: int, collate: Any) -> list[Any]:
    """torch.load of each record (store order), then ``collate`` of each batch; an exception
    class where the collate raises (and nothing after it)."""
    reader = open_store(path)
    loaded = [torch.load(io.BytesIO(reader.read_bytes(i)), weights_only=True) for i in range(len(reader))]
    out: list[Any] = []
    for lo in range(0, len(loaded), batch_size):
        try:
            out.append(collate(loaded[lo : lo + batch_size]))
        except Exception as exc:  # noqa: BLE001 - the loader must raise the same
            out.append(type(exc))
            break
    return out


def _loader_batches(loader: StoreDataLoader) -> list[Any]:
    out: list[Any] = []
    try:
        for batch in loader:
            out.append(batch)
    except Exception as exc:  # noqa: BLE001
        out.append(type(exc))
    return out


def _assert_batches(expected: list[Any], got: list[Any], layout: bool = True, per_sample: bool = False) -> None:
    """Batches identical; with ``per_sample`` (a list collate), each sample compared on its own:
    the fast decoder shares immutable tuples of literals between records (torch.load makes one
    per record), which only ``is`` can tell apart, across samples only."""
    assert len(got) == len(expected)
    for k, (e, g) in enumerate(zip(expected, got)):
        if isinstance(e, type):
            assert g is e or (isinstance(g, type) and issubclass(g, e)), f"batch {k}: {g} instead of {e}"
        elif per_sample:
            assert type(g) is list and len(g) == len(e)
            for j, (es, gs) in enumerate(zip(e, g)):
                assert_identical(es, gs, f"batch {k}[{j}]", layout=layout)
        else:
            assert_identical(e, g, f"batch {k}", layout=layout)


class _Spy:
    """Counts the batches decode_batch decoded in one go (and those it declined)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hits = self.misses = 0
        real = sb.decode_batch

        def spy(recs: list[Any], *args: Any) -> Any:
            got = real(recs, *args)
            if got is None:
                self.misses += 1
            else:
                self.hits += 1
            return got

        monkeypatch.setattr(dataset_module, "decode_batch", spy)


def _write(path: Path, records: list[Any], compact: bool = False) -> Path:
    tspt.write_store(records, path, codec="zstd", compact=compact)
    return path


# --------------------------------------------------------------------------- collate_records itself


def _bufs(records: list[Any]) -> list[bytearray]:
    return [bytearray(saved(r)) for r in records]


def test_nested_records_collate_like_default_collate() -> None:
    records = [
        {
            "img": torch.arange(64, dtype=torch.uint8).reshape(8, 8) + i,
            "meta": ({"label": i % 3, "name": "x", "w": 0.5, "ok": True, "raw": b"ab"}, [torch.tensor(i)]),
            "empty": (),
        }
        for i in range(12)
    ]
    bufs = _bufs(records)
    for b in bufs:
        fast_loads(bytearray(b))  # literals vary: the first pickle gets a skeleton, the others replay
    got = collate_records(bufs, lambda shape, dtype: torch.empty(shape, dtype=dtype), sb.collate_leaves)
    assert got is not None
    want = default_collate([torch.load(io.BytesIO(bytes(b)), weights_only=True) for b in bufs])
    assert_identical(want, got)
    assert type(got["meta"]) is list and type(got["meta"][0]["name"]) is list  # default_collate's conversions
    assert got["meta"][0]["label"].tolist() == [i % 3 for i in range(12)]


def test_leaves_in_a_sequence_come_back_as_tuples() -> None:
    # default_collate transposes sequences with zip: str and bytes inside them collate to tuples
    records = [(torch.zeros(2) + i, "s", b"b", [1.5, "t"]) for i in range(6)]
    bufs = _bufs(records)
    for b in bufs * 2:
        fast_loads(bytearray(b))
    got = collate_records(bufs, lambda shape, dtype: torch.empty(shape, dtype=dtype), sb.collate_leaves)
    want = default_collate(records)
    assert_identical(want, got)
    assert type(got[1]) is tuple and type(got[3][1]) is tuple


@pytest.mark.parametrize(
    "odd",
    [
        lambda i: {"x": torch.zeros(2), "n": None},  # None: default_collate raises, not covered
        lambda i: {"x": torch.zeros(2), "c": 1j},  # a leaf of another type
        lambda i: (torch.arange(10)[2:5],),  # a view of a larger storage
        lambda i: {"a": torch.zeros(2), "b": torch.zeros(2)} if i % 2 else {"a": torch.zeros(2)},  # two plans
        lambda i: [torch.zeros(2)] if i % 2 else [torch.zeros(3)],  # two shapes
    ],
)
def test_collate_records_declines_what_it_does_not_cover(odd: Any) -> None:
    bufs = _bufs([odd(i) for i in range(16)])
    for b in bufs * 2:
        fast_loads(bytearray(b))
    allocated: list[Any] = []
    got = collate_records(
        bufs, lambda shape, dtype: allocated.append(shape) or torch.empty(shape, dtype=dtype), sb.collate_leaves
    )
    assert got is None and allocated == []


def test_records_whose_literals_all_differ_are_covered_once_each_was_seen_twice() -> None:
    """A pickle that differs from a known one only in literal values is replayed at first
    sight and planned at its second, like any other recurring pickle: the batch is covered."""
    records = [{"x": torch.zeros(2) + i, "id": f"record-{i}"} for i in range(16)]
    bufs = _bufs(records)
    for b in bufs * 2:
        fast_loads(bytearray(b))
    got = collate_records(bufs, lambda shape, dtype: torch.empty(shape, dtype=dtype), sb.collate_leaves)
    assert got is not None
    assert_identical(default_collate([torch.load(io.BytesIO(bytes(b)), weights_only=True) for b in bufs]), got)
    assert got["id"] == [f"record-{i}" for i in range(16)]


# --------------------------------------------------------------------------- through the loader, property


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    template=samples(max_leaves=6),
    other=st.none() | samples(max_leaves=4),
    batch_size=st.integers(1, 5),
    collate=st.sampled_from(["default", "list"]),
)
def test_batches_equal_torch_load_then_collate(template: Any, other: Any, batch_size: int, collate: str) -> None:
    _check_batches(template, other, batch_size, collate, compact=False)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    template=samples(max_leaves=6),
    other=st.none() | samples(max_leaves=4),
    batch_size=st.integers(1, 5),
    collate=st.sampled_from(["default", "list"]),
)
def test_compact_batches_equal_torch_load_then_collate(
    template: Any, other: Any, batch_size: int, collate: str
) -> None:
    """The same from a compact store (format 1.3): batches decoded from the records' parts."""
    _check_batches(template, other, batch_size, collate, compact=True)


def _check_batches(template: Any, other: Any, batch_size: int, collate: str, compact: bool) -> None:
    records = [_vary(other if other is not None and i % 4 == 3 else template, i) for i in range(11)]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp) / "s", records, compact)
        fn = default_collate if collate == "default" else list_collate
        expected = _expected_batches(path, batch_size, fn)
        for _ in range(2):  # the second epoch runs with every pickle planned
            loader = StoreDataLoader(StoreIterableDataset(path), batch_size=batch_size, collate_fn=fn)
            _assert_batches(expected, _loader_batches(loader), per_sample=collate == "list")


def _no_grad(sample: Any) -> bool:
    """No tensor needs grad: torch's collate in a worker stacks into shared memory with ``out=``,
    which refuses such tensors, while the main process's stack accepts them (torch's own difference)."""
    return not any(t.requires_grad for t in tensors_of(sample))


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    template=samples(max_leaves=5).filter(_no_grad),
    collate=st.sampled_from(["default", "list"]),
    compact=st.booleans(),
)
def test_worker_batches_equal_torch_load_then_collate_property(template: Any, collate: str, compact: bool) -> None:
    records = [_vary(template, i) for i in range(24)]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp) / "s", records, compact)
        fn = default_collate if collate == "default" else list_collate
        expected = _expected_batches(path, 4, fn)
        loader = StoreDataLoader(
            StoreIterableDataset(path), batch_size=4, num_workers=2, collate_fn=fn, persistent_workers=True
        )
        for _ in range(2):  # the second epoch: raw records and plans in both workers
            _assert_batches(expected, _loader_batches(loader), layout=False, per_sample=collate == "list")
        del loader


# --------------------------------------------------------------------------- num_workers=0: whole batches


def _digits(n: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 17, (8, 8), generator=g, dtype=torch.uint8), torch.tensor(i % 10)) for i in range(n)]


@pytest.mark.parametrize("compact", [False, True], ids=["frames", "compact"])
def test_decode_thread_hands_over_whole_decoded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compact: bool
) -> None:
    path = _write(tmp_path / "digits", _digits(50), compact)
    spy = _Spy(monkeypatch)
    expected = _expected_batches(path, 8, default_collate)
    loader = StoreDataLoader(StoreIterableDataset(path), batch_size=8)
    _assert_batches(expected, _loader_batches(loader))
    _assert_batches(expected, _loader_batches(loader))  # next epoch
    assert spy.hits >= 2 * 7 - 2  # all but the first batch or two (plans are made on the way)
    assert type(expected[0]) is list  # tuples collate to lists


def test_mixed_plans_fall_back_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def record(i: int) -> Any:
        x = torch.arange(16, dtype=torch.float32).reshape(4, 4) + i
        if i % 7 == 3:
            x = x.t()  # a view: another plan, the same values once collated
        r = {"x": x, "y": i % 2}
        if i % 11 == 5:
            r["extra"] = torch.zeros(1)  # default_collate ignores keys the first sample lacks
        return r

    path = _write(tmp_path / "mixed", [record(i) for i in range(40)])
    spy = _Spy(monkeypatch)
    expected = _expected_batches(path, 4, default_collate)
    for _ in range(2):
        _assert_batches(expected, _loader_batches(StoreDataLoader(StoreIterableDataset(path), batch_size=4)))
    assert spy.misses >= 4 and spy.hits >= 4  # both paths were taken


def test_a_record_that_fails_to_load_raises_at_its_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "digits", _digits(20))
    real = tspt.reader.StoreReader._load

    def load(self: Any, shard: int, record: int, data: Any) -> Any:
        if record == 13:
            raise tspt.RecordDecodeError("record 13 is broken (test)")
        return real(self, shard, record, data)

    monkeypatch.setattr(tspt.reader.StoreReader, "_load", load)
    monkeypatch.setattr(dataset_module, "decode_batch", lambda recs: None)  # every batch one by one
    got = []
    with pytest.raises(tspt.RecordDecodeError, match="record 13"):
        for batch in StoreDataLoader(StoreIterableDataset(path), batch_size=4):
            got.append(batch)
    assert len(got) == 3  # the batches before the one holding record 13


def test_resume_mid_epoch_gives_the_rest_as_without_batching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "digits", _digits(70))

    def rest(mode: str) -> tuple[list[Any], list[Any]]:
        monkeypatch.setattr(sb, "BATCH_DECODE", mode)
        ds = StoreIterableDataset(path, shuffle=True, seed=3, block_records=4, window_records=16)
        ds.set_epoch(1)
        loader = StoreDataLoader(ds, batch_size=6)
        head = []
        for k, batch in enumerate(loader):
            head.append(batch)
            if k == 4:
                break
        state = loader.state_dict()
        fresh = StoreDataLoader(
            StoreIterableDataset(path, shuffle=True, seed=3, block_records=4, window_records=16), batch_size=6
        )
        fresh.load_state_dict(state)
        return head, list(fresh)

    spy = _Spy(monkeypatch)
    head_on, rest_on = rest("all")
    assert spy.hits > 0
    head_off, rest_off = rest("off")
    assert len(rest_on) == len(rest_off) == 12 - 5
    _assert_batches(head_off, head_on)
    _assert_batches(rest_off, rest_on)


def test_iterating_the_dataset_itself_still_yields_samples(tmp_path: Path) -> None:
    path = _write(tmp_path / "digits", _digits(10))
    ds = StoreIterableDataset(path)
    loader = StoreDataLoader(ds, batch_size=4)
    next(iter(loader))
    got = list(ds)  # not through the loader: plain samples
    want = [torch.load(io.BytesIO(open_store(path).read_bytes(i)), weights_only=True) for i in range(10)]
    assert_identical(want, got)


# --------------------------------------------------------------------------- workers (few: they are slow)


@pytest.mark.parametrize("collate", ["default", "list"])
def test_worker_batches_equal_torch_load_then_collate(
    tmp_path: Path, collate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hits = torch.zeros(1, dtype=torch.int64).share_memory_()  # batches workers decoded in one go
    real = sb.decode_batch

    def counting(recs: list[Any], *args: Any) -> Any:
        got = real(recs, *args)
        if got is not None:
            hits[0] += 1
        return got

    monkeypatch.setattr(sb, "decode_batch", counting)  # forked workers inherit it
    records = [
        {"tok": torch.arange(5, dtype=torch.int64) * i, "pair": (torch.tensor(float(i)), i % 4), "name": "n"}
        for i in range(30)
    ]
    path = _write(tmp_path / "nested", records)
    fn = default_collate if collate == "default" else list_collate
    expected = _expected_batches(path, 5, fn)
    loader = StoreDataLoader(
        StoreIterableDataset(path), batch_size=5, num_workers=2, collate_fn=fn, persistent_workers=True
    )
    for _ in range(2):
        got = _loader_batches(loader)
        _assert_batches(expected, got, layout=False, per_sample=collate == "list")
        for e, g in zip(expected, got):  # arena views: same strides and offsets, storage aside
            for te, tg in zip(tensors_of(e), tensors_of(g)):
                assert te.stride() == tg.stride() and te.storage_offset() == tg.storage_offset()
    if sb.transport_supported():
        # raw records reach the collate once it has run in a worker, and plans are made on the way
        assert (int(hits[0]) >= 2) == (collate == "default")


# --------------------------------------------------------------------------- another collate


def test_another_collate_gets_samples_the_bulk_read_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a collate other than default_collate nothing decodes a batch of RawRecords in one
    go: the dataset loads samples as a bulk read does (a column block's records together), not
    one record's pickle at a time through RawRecord.load (measured: 3-4x slower)."""
    path = _write(tmp_path / "digits", _digits(40), compact=True)
    loads = []
    real = tspt.reader.RawRecord.load

    def load(self: Any) -> Any:
        loads.append(self)
        return real(self)

    monkeypatch.setattr(tspt.reader.RawRecord, "load", load)
    got = [s for batch in StoreDataLoader(StoreIterableDataset(path), batch_size=8, collate_fn=list) for s in batch]
    assert not loads
    want = [torch.load(io.BytesIO(open_store(path).read_bytes(i)), weights_only=True) for i in range(40)]
    assert_identical(want, got)
    next(iter(StoreDataLoader(StoreIterableDataset(path), batch_size=8)))  # default_collate: RawRecords
    assert not loads  # decoded as a batch, not loaded one by one


@pytest.mark.parametrize("collate, taken", [(default_collate, True), (list, False)])
def test_only_default_collate_makes_workers_yield_raw_records(
    monkeypatch: pytest.MonkeyPatch, collate: Any, taken: bool
) -> None:
    monkeypatch.setattr(sb, "get_worker_info", lambda: object())  # as in a DataLoader worker
    monkeypatch.setattr(sb, "_raw_accepted", set())
    monkeypatch.setattr(sb, "transport_supported", lambda: False)  # no ring: collate in place
    wrapped = sb.SharedBatchCollate(collate, 3, "ds-1")
    wrapped([torch.arange(3), torch.arange(3)])
    assert sb.raw_accepted("ds-1") is False  # no ring, no batch decoding: loaded samples
    monkeypatch.setattr(sb, "transport_supported", lambda: True)
    monkeypatch.setattr(sb, "_WorkerRing", lambda token, slots: _NoSlot())
    monkeypatch.setattr(sb, "_worker_rings", {})
    wrapped([torch.arange(3), torch.arange(3)])
    assert sb.raw_accepted("ds-1") is taken


class _NoSlot:
    def start_batch(self) -> None:
        return None  # the main process holds every arena: the batch goes through torch's transport

    def close(self) -> None:
        pass
