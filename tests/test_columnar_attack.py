"""Adversarial checks of columnar frames (format 1.3): hostile-but-checksummed shards, memory
bounds, and differential comparison of compact and plain stores."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import zstandard
from torch.utils.data import default_collate
from test_columnar import _rewrite_frame0, _shard_parts, _tokens

import tensorstore_pt as ts
from tensorstore_pt import _ptzip, columnar, fastload
from tensorstore_pt import format as fmt
from tensorstore_pt.errors import AllocationBudgetError, CorruptStoreError, RecordMetaError, ShardFormatError
from tensorstore_pt.integrity import verify_store
from tensorstore_pt.serialization import dumps, loads


def _frame0_lengths(raws: list[int]):
    """A record-map edit giving frame 0's records the raw lengths ``raws`` (tiling kept)."""

    def edit_map(m):
        f0 = np.flatnonzero(m["frame"] == 0)
        m["raw"][f0] = raws
        m["raw_offset"][f0] = np.concatenate([[0], np.cumsum(raws)[:-1]])

    return edit_map


def _relayout(store: Path, constants: dict[str, str | None]) -> None:
    """Rewrite shard 0's columnar_layout (constants replaced, or removed where None) and its
    record map to match (each record's raw length rebuilt under the new layout): a hostile but
    self-consistent writer, behind valid checksums."""
    reader = ts.open_store(store)
    path = store / reader.index.shards[0].name
    data, table, rmap, meta = _shard_parts(path)
    lay = dict(meta["columnar_layout"])
    consts = [[n, constants.get(n, v)] for n, v in lay["constants"] if constants.get(n, v) is not None]
    lay["constants"] = consts
    lay["order"] = [t for t in lay["order"] if t not in constants or constants[t] is not None]
    layout = _ptzip.PtLayout.from_json(lay)
    frame0 = np.flatnonzero(rmap["frame"] == 0)
    off = int(table["offset"][0])
    block = zstandard.ZstdDecompressor().decompress(data[off : off + int(table["stored"][0])])
    b = columnar.ColumnBlock(block, layout, len(frame0), "t")
    raws = [_ptzip.rebuilt_bytes(b.parts(r)) for r in range(len(frame0))]

    def edit_map(m):
        m["raw"][frame0] = raws
        m["raw_offset"][frame0] = np.concatenate([[0], np.cumsum(raws)[:-1]])

    _rewrite_frame0(store, edit_meta=lambda m: m.__setitem__("columnar_layout", lay), edit_map=edit_map)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the error's type
        return "error", type(exc)


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return a[1] is b[1]
    x, y = a[1], b[1]
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


@pytest.mark.parametrize(
    "constants",
    [
        {"byteorder": "big"},
        {"byteorder": None},
        {"version": "4\n"},
        {"version": None},
        {".format_version": "2"},
    ],
    ids=["byteorder-big", "no-byteorder", "version-4", "no-version", "format-version-2"],
)
def test_parts_load_as_rebuilt_bytes_load(tmp_path: Path, constants) -> None:
    """A record loaded from its parts loads exactly what its rebuilt bytes load (section 5.3),
    whatever the layout's constant records say: a store whose layout says byteorder "big"
    must not hand out little-endian values from reader[i] while read_bytes loads swapped."""
    batch = [torch.arange(6, dtype=torch.int32) + i for i in range(4)]
    ts.write_store(batch, tmp_path / "s", compact=True)
    _relayout(tmp_path / "s", constants)
    reader = ts.open_store(tmp_path / "s")
    for i in range(len(batch)):
        raw = reader.read_bytes(i)
        expected = _outcome(lambda raw=raw: loads(bytearray(raw)))
        assert _same(_outcome(lambda i=i: reader[i]), expected), (i, expected)
        got = next(iter(reader.iter_many([i])))
        assert _same(("error", type(got.error)) if got.error is not None else ("ok", got.sample), expected)
        if expected[0] == "ok":  # and what the reference loader says
            ref = torch.load(io.BytesIO(raw), weights_only=True)
            assert torch.equal(ref, expected[1])
    assert dumps(batch[0])  # the plain store path is untouched


def test_max_record_bytes_for_records_of_blocks(tmp_path: Path) -> None:
    """``max_record_bytes`` bounds a record of a column block by its rebuilt length (what the
    record map gives), not by its block's: read_bytes, reader[i], iter_many (raw or not) and
    verify all refuse a record above it, as they do for a plain store."""
    batch = [torch.full((1000,), i, dtype=torch.uint8) for i in range(3)]
    ts.write_store(batch, tmp_path / "c", compact=True, frame_target_bytes=1)
    ts.write_store(batch, tmp_path / "p", frame_target_bytes=1)
    footer = ts.open_store(tmp_path / "c")._footer(0)
    raw, block = int(footer.record_map["raw"][0]), int(footer.table["raw"][0])
    budget = (raw + block) // 2
    assert block < budget < raw
    for name in ("c", "p"):
        reader = ts.open_store(tmp_path / name, max_record_bytes=budget)
        with pytest.raises(AllocationBudgetError):
            reader.read_bytes(0)
        with pytest.raises(AllocationBudgetError):
            reader[1]
        for raw_mode in (False, True):
            results = list(reader.iter_many([0, 2, 1], raw=raw_mode))
            assert all(isinstance(r.error, AllocationBudgetError) for r in results), (name, raw_mode)
        report = verify_store(tmp_path / name, deep=True, max_record_bytes=budget)
        assert {p.kind for p in report.problems} == {"record_budget"}, (name, report.problems)
        assert ts.open_store(tmp_path / name, max_record_bytes=raw).read_bytes(0) == dumps(batch[0])


def _expanding_store(tmp_path: Path) -> tuple[Path, int, int]:
    """A store whose frame 0 is a column block of 4 records with 64 one-byte storages each
    and a tiny pickle, under a layout of alignment 65532 (each entry padded by up to 64 KiB):
    records that rebuild to thousands of times their share of the block, consistently
    declared (record map, index) and behind valid checksums. Returns (store, block, rebuilt)."""
    from test_columnar import _small_store

    store = _small_store(tmp_path)
    base = _ptzip.prove(dumps(torch.zeros(1)))
    lay = dict(base.layout.to_json(), alignment=65532)
    lay["constants"] = [[n, "65532" if n == ".storage_alignment" else v] for n, v in lay["constants"]]
    layout = _ptzip.PtLayout.from_json(lay)
    parts = [
        _ptzip.PtParts(layout, "archive", b"\x80\x02K\x01.", tuple(bytes([k]) for k in range(64)), 0, (None,) * 65)
        for _ in range(4)
    ]
    block = columnar.encode_block(parts, None)
    raws = [_ptzip.rebuilt_bytes(p) for p in parts]

    edit_map = _frame0_lengths(raws)

    _rewrite_frame0(store, block, edit_meta=lambda m: m.__setitem__("columnar_layout", lay), edit_map=edit_map)
    return store, len(block), sum(raws)


def test_block_expansion_bound_enforced(tmp_path: Path) -> None:
    """docs/format.md 5.3/6.1: a column block's records rebuild to at most COLUMNAR_EXPANSION
    times its length. A footer that says more is refused as it is parsed, before any record
    is rebuilt (every read path and verify)."""
    store, block, rebuilt = _expanding_store(tmp_path)
    assert rebuilt > fmt.COLUMNAR_EXPANSION * block
    with pytest.raises(ShardFormatError, match="more than 1024 x its length"):
        ts.open_store(store).read_bytes(0)
    report = verify_store(store)
    assert not report.ok and any("1024 x its length" in p.message for p in report.problems)


def test_writer_keeps_expansion_bound(tmp_path: Path) -> None:
    """A run of records that would rebuild to more than COLUMNAR_EXPANSION x its block is
    written as a plain frame (readers would refuse the block)."""
    base = _ptzip.prove(dumps(torch.zeros(1)))
    layout = _ptzip.PtLayout(base.layout.order, base.layout.constants, 64, True)
    parts = [_ptzip.PtParts(layout, "archive", b"\x80\x02K\x01.", (b"",) * 8, 0, (None,) * 9)] * 2
    raws = [_ptzip.rebuild(p) for p in parts]
    with mock.patch.object(fmt, "COLUMNAR_EXPANSION", 2), mock.patch.object(columnar, "COLUMNAR_EXPANSION", 2):
        planned = columnar.plan_frames(list(zip(raws, parts)), None)
    assert [(data, is_block) for data, _, is_block in planned] == [(b"".join(raws), False)]
    assert columnar.plan_frames(list(zip(raws, parts)), None)[0][2] is True


def test_wide_block_allocations_bounded() -> None:
    """A block of records with 4095 empty storages and empty pickles spends about one byte per
    (record, storage) pair: parsing it keeps at most a few bytes per pair (the storages'
    positions), not 16 (two int64 tables) and a tuple of CRC-32s: its allocations stay within
    5x the block, plus a few Python objects per column (at most 4096)."""
    import tracemalloc

    layout = _ptzip.DEFAULT_LAYOUT
    n = 70
    part = _ptzip.PtParts(
        layout, "archive", b"", (b"",) * (columnar.MAX_COLUMNS - 1), 0, (None,) * columnar.MAX_COLUMNS
    )
    block = columnar.encode_block([part] * n, None)
    tracemalloc.start()
    try:
        parsed = columnar.ColumnBlock(block, layout, n, "t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 5 * len(block) + 2**21, (peak, len(block))  # (+ a few objects per column)
    assert [len(s) for s in parsed.storages(n - 1)] == [0] * (columnar.MAX_COLUMNS - 1)
    assert _ptzip.rebuild(parsed.parts(7)) == _ptzip.rebuild(part)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(0x80 | (v & 0x7F))
        v >>= 7
    out.append(v)
    return bytes(out)


@pytest.mark.parametrize("size", [2**63, 2**64 + 5, 2**32, 10**6])
def test_storage_size_past_block_is_typed(size: int) -> None:
    """A record's metadata listing a storage larger than the block (up to a 10-byte varint,
    past int64) is a RecordMetaError, not an OverflowError."""
    meta = bytes([1, 0]) + bytes(8) + _varint(1) + _varint(0) + _varint(size) + bytes(4)
    block = columnar._HEAD.pack(columnar.MAGIC, 1, 2) + columnar._COLUMN.pack(len(meta), 0, 0)
    block += columnar._COLUMN.pack(0, 0, 0) + np.asarray([len(meta)], dtype="<u4").tobytes()
    block += np.asarray([0], dtype="<u4").tobytes() + meta  # the size table says 0 bytes
    b = columnar.ColumnBlock(block, _ptzip.DEFAULT_LAYOUT, 1, "t")
    with pytest.raises(RecordMetaError, match="storage"):
        b.parts(0)


def test_kept_crc_that_lies_found_by_deep_verify(tmp_path: Path) -> None:
    """A record keeps the CRC-32 of a storage of 64 KiB or more; rebuilds copy it unchecked.
    One that lies (a writer's fault, behind a valid checksum) makes read_bytes other bytes
    than torch.save's (a zip entry whose CRC-32 does not hold): verify(deep=True) reports it,
    for that record only."""
    import dataclasses
    import zipfile

    from test_columnar import _small_store

    store = _small_store(tmp_path)
    big = torch.arange(20000, dtype=torch.int64)
    parts = [_ptzip.prove(dumps((big + i, torch.tensor(i)))) for i in range(4)]
    assert parts[0].crcs[1] is not None
    parts[0] = dataclasses.replace(parts[0], crcs=(parts[0].crcs[0], parts[0].crcs[1] ^ 1, parts[0].crcs[2]))
    block = columnar.encode_block(parts, None)
    raws = [_ptzip.rebuilt_bytes(p) for p in parts]

    edit_map = _frame0_lengths(raws)

    _rewrite_frame0(store, block, edit_map=edit_map)
    reader = ts.open_store(store)
    assert zipfile.ZipFile(io.BytesIO(reader.read_bytes(0))).testzip() == "archive/data/0"
    assert reader.read_bytes(1) == dumps((big + 1, torch.tensor(1)))
    report = verify_store(store, deep=True)
    assert [(p.kind, p.record) for p in report.problems] == [("record_load", 0)], report.problems
    assert "data/0" in report.problems[0].message
    assert verify_store(store).ok  # (not deep: the frame's checksum holds)


@pytest.mark.parametrize("kind", ["block", "record-length"])
def test_reader_verify_checks_blocks(tmp_path: Path, kind: str) -> None:
    """StoreReader.verify() checks "every record's frame": a column block behind a valid
    checksum is checked as a read checks it (its structure, each record's rebuilt length),
    as verify_store does."""
    from test_columnar import _hostile_blocks, _small_store

    store = _small_store(tmp_path)
    ts.open_store(store).verify()
    if kind == "block":
        _rewrite_frame0(store, _hostile_blocks()["meta-lengths-lie"][0])
    else:

        def lie(rmap):
            rmap["raw"][0] += 1
            rest = np.flatnonzero(rmap["frame"] == 0)[1:]
            rmap["raw_offset"][rest] += 1

        _rewrite_frame0(store, edit_map=lie)
    assert not verify_store(store).ok
    with pytest.raises(CorruptStoreError):
        ts.open_store(store).verify()


def test_recover_does_not_keep_records_that_do_not_rebuild(tmp_path: Path) -> None:
    """A column block whose record map gives a record another length than it rebuilds to
    (behind valid checksums) proves none of its records: recover counts them lost, and the
    store it leaves verifies deep."""
    from test_columnar import _small_store

    store = _small_store(tmp_path)

    def lie(rmap):
        rmap["raw"][0] += 1
        rest = np.flatnonzero(rmap["frame"] == 0)[1:]
        rmap["raw_offset"][rest] += 1

    _rewrite_frame0(store, edit_map=lie)
    report = ts.recover_store(store)
    assert report.records_lost == 4
    after = ts.open_store(store)
    assert [after.read_bytes(i) for i in range(len(after))] == [dumps(s) for s in _tokens(8)[4:]]
    assert verify_store(store, deep=True).ok


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_compact_and_plain_read_alike(tmp_path: Path, codec: str) -> None:
    """Differential: a compact store and a plain store of the same samples give the same
    bytes and samples through every read path, in random order with duplicates."""
    import random

    from strategies import assert_identical
    from test_columnar import _mixed

    batch = _mixed()
    ts.write_store(batch, tmp_path / "c", codec=codec, compact=True, frame_target_bytes=1500, max_shard_bytes=6000)
    ts.write_store(batch, tmp_path / "p", codec=codec, frame_target_bytes=1500, max_shard_bytes=6000)
    c, p = ts.open_store(tmp_path / "c"), ts.open_store(tmp_path / "p")
    order = [random.Random(5).randrange(len(batch)) for _ in range(3 * len(batch))]
    for raw in (False, True):
        for rc, rp in zip(c.iter_many(order, raw=raw), p.iter_many(order, raw=raw)):
            assert rc.record == rp.record and rc.error is None and rp.error is None
            if raw:
                assert bytes(rc.sample.data) == bytes(rp.sample.data) == dumps(batch[rc.record])
            else:
                assert_identical(rp.sample, rc.sample, f"record {rc.record}")
    for i in order[:20]:
        assert c.read_bytes(i) == p.read_bytes(i)
        assert_identical(p[i], c[i], f"record {i}")
    c.verify()
    assert verify_store(tmp_path / "c", deep=True).ok


# ---------------------------------------------------------------- a block's records loaded together


def test_many_specs_in_one_block_never_mix_records(tmp_path: Path) -> None:
    """One block holding more distinct result structures than the spec caches keep (4096):
    the caches clear while the block loads; a structure seen earlier in the call must not
    lend its form to a later one allocated where it was (found by a helper: records came
    back as other records' structures, ``{'k2487': ...}`` for record 5116)."""
    batch: list = []
    shapes = [(2, 3), (3, 2), (6,), (1, 6), (6, 1)]
    for i in range(12000):
        if i % 5 == 0:
            batch.append({"x": torch.arange(6, dtype=torch.float32).reshape(shapes[(i // 5) % 5])})
        else:
            batch.append({f"k{i}": torch.tensor([float(i)])})
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=1 << 26)
    reader = ts.open_store(tmp_path / "s")
    for _ in range(2):  # the second pass finds the pickles planned: the block loads together
        bad = []
        for i, got in enumerate(reader):
            want = batch[i]
            if list(got) != list(want) or any(
                got[k].shape != want[k].shape or not torch.equal(got[k], want[k]) for k in want
            ):
                bad.append(i)
        assert not bad, f"{len(bad)} records wrong, first {bad[:5]}"


def test_block_too_large_to_keep_is_not_loaded_together_per_record(tmp_path: Path) -> None:
    """A column block whose loaded samples would put it past ``KEPT_FRAME_BYTES`` is not
    kept between its records, so it must not be loaded together at all: it would be decoded
    and loaded whole again for each of its records (found by a helper: 10 loads of a 40 MiB
    block for 10 records). Its records load one by one, and hold only their own bytes."""
    import gc
    import tracemalloc

    batch = [torch.full((1 << 20,), float(i)) for i in range(10)]
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=64 << 20)
    reader = ts.open_store(tmp_path / "s")
    list(reader)  # the pickle planned
    loads: list[int] = []
    real = columnar.ColumnBlock.load_all
    with mock.patch.object(
        columnar.ColumnBlock, "load_all", lambda self, raws, *more: loads.append(1) or real(self, raws, *more)
    ):
        gc.collect()
        tracemalloc.start()
        try:
            got = list(reader)
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert all(torch.equal(g, b) for g, b in zip(got, batch))
    assert not loads, f"a block not kept was loaded together {len(loads)} times"
    sample_bytes = sum(g.untyped_storage().nbytes() for g in got)
    assert held < 2 * sample_bytes, f"{held >> 20} MiB held for {sample_bytes >> 20} MiB of samples"


def test_block_loaded_together_once_per_pass(tmp_path: Path) -> None:
    """A block that is kept loads together once for all of its records asked for."""
    batch = [(torch.arange(i, i + 8), torch.tensor(i % 3)) for i in range(300)]
    ts.write_store(batch, tmp_path / "s", codec="zstd", compact=True)
    reader = ts.open_store(tmp_path / "s")
    blocks = sum(int(reader._footer(si).columnar_mask.sum()) for si in range(reader.info().shards))
    list(reader)
    loads: list[int] = []
    real = columnar.ColumnBlock.load_all
    with mock.patch.object(
        columnar.ColumnBlock, "load_all", lambda self, raws, *more: loads.append(self.n) or real(self, raws, *more)
    ):
        got = list(reader)
    assert len(loads) == blocks and sum(loads) == len(batch)
    for i, sample in enumerate(got):
        assert torch.equal(sample[0], batch[i][0]) and torch.equal(sample[1], batch[i][1])


# ---------------------------------------------------------------- zero dict keys (a helper's finds)


def _expected_float_key_batches(path: Path, batch_size: int) -> list[Any]:
    reader = ts.open_store(path)
    loaded = [torch.load(io.BytesIO(reader.read_bytes(i)), weights_only=True) for i in range(len(reader))]
    return [default_collate(loaded[lo : lo + batch_size]) for lo in range(0, len(loaded), batch_size)]


def test_float_dict_keys_zero_and_negative_zero_keep_the_first_records_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """{0.0: t} and {-0.0: t} are different pickles whose batch specs compare equal
    ((float, 0.0) == (float, -0.0)) and are interned as one: a batch whose first record has
    key 0.0 comes back keyed -0.0 (the key of whichever record's spec was interned first).
    default_collate keys the batch by its first record's key."""
    monkeypatch.setattr(fastload, "_PLAN_BACKOFF", [0, 0])
    records = [{(0.0 if i % 2 else -0.0): torch.full((2,), float(i))} for i in range(8)]
    path = tmp_path / "s"
    ts.write_store(records, path, codec="zstd", compact=True)
    expected = _expected_float_key_batches(path, 3)
    for _ in range(2):
        got = list(ts.StoreDataLoader(ts.StoreIterableDataset(path), batch_size=3))
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert [math.copysign(1, k) for k in g] == [math.copysign(1, k) for k in e]
            assert torch.equal(next(iter(g.values())), next(iter(e.values())))


def test_block_loaded_together_keeps_each_records_float_key_sign(tmp_path: Path) -> None:
    """ColumnBlock.load_all / fastload.load_columns groups records by an interned *form*; the
    forms of {0.0: t} and {-0.0: t} compare equal, so every record of the block is assembled
    with one key: records saved with key 0.0 come back keyed -0.0 (wrong data per record,
    through iter_many and hence the dataset's one-by-one loads)."""
    records = [{(0.0 if i % 2 else -0.0): torch.full((2,), float(i))} for i in range(16)]
    path = tmp_path / "s"
    ts.write_store(records, path, codec="zstd", compact=True)
    reader = ts.open_store(path)
    want = [torch.load(io.BytesIO(reader.read_bytes(i)), weights_only=True) for i in range(len(reader))]
    got = [res.sample for res in reader.iter_many(range(len(reader)))]
    assert [math.copysign(1, next(iter(s))) for s in got] == [math.copysign(1, next(iter(s))) for s in want]


def _mixed_block_records() -> list[Any]:
    """Records whose first storage is 3 uint8 bytes or 5 float32s, in turns (so a float
    range in a shared column starts at an odd offset), then records of about 80 KiB (each
    alone in its frame)."""
    small = [
        (torch.tensor([i, i + 1, i + 2], dtype=torch.uint8) if i % 2 else torch.full((5,), i * 0.5), torch.tensor(i))
        for i in range(40)
    ]
    big = [(torch.arange(20000, dtype=torch.float32) * 0.125 + i, torch.tensor(-i)) for i in range(4)]
    return small + big


@pytest.mark.parametrize(
    "forced",
    [(columnar.FILTER_SHUFFLE, 4), (columnar.FILTER_DELTA, 1), (columnar.FILTER_NONE, 0)],
    ids=["shuffle4", "delta1", "none"],
)
def test_spent_blocks_load_in_place_and_samples_stay_their_own(tmp_path: Path, forced: tuple[int, int]) -> None:
    """A block whose records are each asked for once (a pass over the store, a record alone
    in its frame read by store[i]) gives its samples the ranges of the columns a filter wrote,
    in place; a range not aligned for its dtype is copied. Samples written to change neither
    another sample nor a later read, and every tensor is aligned for its dtype."""
    batch = _mixed_block_records()
    path = tmp_path / "s"
    with mock.patch.object(columnar, "choose_filter", lambda col, compress, *rest: forced):
        # (64 KiB frames: each 80 KiB record alone in its frame)
        ts.write_store(batch, path, codec="zstd", compact=True, frame_target_bytes=64 * 2**10)
    want = [_loaded_bytes(dumps(s)) for s in batch]
    spent: list[int] = []
    real = columnar.ColumnBlock.spent_args

    def spy(self: columnar.ColumnBlock, r: int, raw: int) -> Any:
        spent.append(r)
        return real(self, r, raw)

    with ts.open_store(path) as reader, mock.patch.object(columnar.ColumnBlock, "spent_args", spy):
        for _ in range(3):  # (later passes load the blocks together: their pickles are planned)
            got = list(reader)
            for i, sample in enumerate(got):
                _same_sample(want[i], sample, f"record {i}")
                assert all(t.data_ptr() % t.element_size() == 0 for t in sample)
            for sample in got:
                for t in sample:
                    t.fill_(7)
        singles = [reader.read(i) for i in range(len(batch) - 4, len(batch))]
        for k, sample in enumerate(singles):
            _same_sample(want[len(batch) - 4 + k], sample, f"single read {k}")
            sample[0].fill_(3)
        for i in range(len(batch)):
            _same_sample(want[i], reader.read(i), f"record {i} read again")
        results = reader.iter_many([len(batch) - 1, 0, len(batch) - 1, 0])
        for res in results:  # a record asked for twice: its block is not spent
            assert res.error is None
            _same_sample(want[res.record], res.sample, f"record {res.record} asked for twice")
            res.sample[0].fill_(5)
    assert spent, "no record was loaded from a spent block"


def _loaded_bytes(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _same_sample(want: Any, got: Any, what: str) -> None:
    assert type(got) is type(want) and len(got) == len(want), what
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
        assert torch.equal(a, b), what
        assert b.untyped_storage().nbytes() == a.untyped_storage().nbytes(), what


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "frames"])
def test_random_reads_decode_each_frame_once_within_the_cache(tmp_path: Path, compact: bool) -> None:
    """Single reads keep decoded multi-record frames up to ``frame_cache_bytes`` (plus the
    last one): a random pass over a store that fits decodes each frame once, one that does
    not fit stays within the bound, and nothing read aliases a kept frame."""
    batch = [(torch.arange(i, i + 64, dtype=torch.int32) * 3, torch.tensor(i)) for i in range(400)]
    path = tmp_path / "s"
    opts = {"compact": True, "frame_target_bytes": 4096} if compact else {"frame_target_bytes": 4096}
    ts.write_store(batch, path, codec="zstd", **opts)
    order = np.random.default_rng(3).permutation(len(batch)).tolist()
    frames = 0
    with ts.open_store(path) as probe:
        for si in range(probe.info().shards):
            frames += int(probe._footer(si).record_map["frame"].max()) + 1
    assert frames > 4, "the store should have several multi-record frames"

    def count_decodes(reader: ts.StoreReader) -> list[int]:
        seen: list[int] = []
        real = reader._decoded_frame

        def spy(si: int, fi: int, record: int, writable: bool = False) -> Any:
            seen.append(fi)
            return real(si, fi, record, writable)

        reader._decoded_frame = spy  # type: ignore[method-assign]
        return seen

    with ts.open_store(path) as reader:
        seen = count_decodes(reader)
        for i in order:
            sample = reader.read(i)
            assert torch.equal(sample[0], batch[i][0]) and int(sample[1]) == i
            sample[0].fill_(-1)  # a kept frame must not change
        for i in order[:50]:
            assert torch.equal(reader.read(i)[0], batch[i][0])
            assert reader.read_bytes(i) == dumps(batch[i])
        assert len(seen) == frames, f"{len(seen)} decodes of {frames} frames"
    with ts.open_store(path, frame_cache_bytes=0) as reader:
        seen = count_decodes(reader)
        for i in order:
            assert torch.equal(reader.read(i)[0], batch[i][0])
        assert len(seen) > 2 * frames, "with no cache, a random pass decodes frames again"
    with ts.open_store(path) as probe:
        sizes = [len(probe._cached_frame(0, f, 0)) for f in range(2)]
    budget = 2 * max(sizes)
    with ts.open_store(path, frame_cache_bytes=budget) as reader:
        for i in order:
            assert torch.equal(reader.read(i)[0], batch[i][0])
            cache = reader._frame_cache
            last = next(reversed(cache.frames.values()))[1]
            assert cache.bytes == sum(size for _, size in cache.frames.values())
            assert cache.bytes - last <= budget, f"{cache.bytes} bytes kept for a budget of {budget}"


def test_frame_cache_option_checked_and_pickled(tmp_path: Path) -> None:
    import pickle

    ts.write_store([torch.tensor(i) for i in range(10)], tmp_path / "s", compact=True)
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(ts.InvalidOptionError, match="frame_cache_bytes"):
            ts.open_store(tmp_path / "s", frame_cache_bytes=bad)
    reader = ts.open_store(tmp_path / "s", frame_cache_bytes=12345)
    assert pickle.loads(pickle.dumps(reader)).frame_cache_bytes == 12345


def test_spent_blocks_not_kept_pin_no_columns(tmp_path: Path) -> None:
    """A shuffled bulk read whose blocks are each asked for in full but cannot all be kept
    (more than KEPT_FRAME_BYTES in flight) decodes a block again per record: such records
    must not be built over that decode's whole column (found by a helper: 3.2 GiB held for
    80 MiB of samples). Samples kept hold about their own bytes."""
    import gc
    import random
    import tracemalloc

    per, blocks, elems = 16, 12, 4096  # 16 KiB records, 256 KiB blocks
    batch = [{"x": (torch.arange(elems) % 977 + i).float()} for i in range(per * blocks)]
    path = tmp_path / "s"
    ts.write_store(batch, path, codec="zstd", compact=True, frame_target_bytes=256 << 10)
    order = list(range(len(batch)))
    random.Random(0).shuffle(order)
    data_bytes = len(batch) * elems * 4
    with ts.open_store(path) as reader, mock.patch("tensorstore_pt.reader.KEPT_FRAME_BYTES", 1 << 20):
        gc.collect()
        tracemalloc.start()
        try:
            got = [res.sample for res in reader.iter_many(order, read_bytes=1 << 30)]
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    for i, sample in zip(order, got):
        assert torch.equal(sample["x"], batch[i]["x"])
    assert held < 1.5 * data_bytes, f"{held >> 10} KiB held for {data_bytes >> 10} KiB of samples"


def test_small_ranges_of_spent_blocks_are_copied(tmp_path: Path) -> None:
    """In a spent block, a range less than half its column is copied, not used in place: one
    small sample kept from each block holds its own bytes, not the block's column."""
    import gc
    import tracemalloc

    batch = [torch.arange(256, dtype=torch.float32) * 0.5 + i for i in range(2000)]  # 1 KiB records
    path = tmp_path / "s"
    with mock.patch.object(columnar, "choose_filter", lambda col, compress, *rest: (columnar.FILTER_SHUFFLE, 4)):
        ts.write_store(batch, path, codec="zstd", compact=True)
    with ts.open_store(path) as reader:
        list(reader)  # the pickle planned: later passes load blocks together
        gc.collect()
        tracemalloc.start()
        try:
            kept = [t for i, t in enumerate(reader) if i % 60 == 0]
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert all(torch.equal(t, batch[60 * k]) for k, t in enumerate(kept))
    assert held < 64 * 1024 + 8 * len(kept) * 1024, f"{held} bytes held for {len(kept)} samples of 1 KiB"


def test_frame_cache_counts_parsed_metadata(tmp_path: Path) -> None:
    """A kept column block of tiny records is counted with its records' parsed metadata, so
    the cache holds about what it counts (found by a helper: 3x its count)."""
    import gc
    import random
    import tracemalloc

    n = 6000
    batch = [{"i": torch.tensor([i]), "j": torch.tensor([i % 3], dtype=torch.uint8)} for i in range(n)]
    path = tmp_path / "s"
    ts.write_store(batch, path, codec="zstd", compact=True, frame_target_bytes=256 << 10)
    order = list(range(n))
    random.Random(0).shuffle(order)
    with ts.open_store(path) as reader:
        reader[0]
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in order:
                assert int(reader[i]["i"]) == i
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        counted = reader._frame_cache.bytes
    assert held < 1.5 * counted, f"{held} bytes held, {counted} counted"


def _shard0(store: Path) -> Path:
    return store / json.loads((store / "index.json").read_text())["shards"][0]["name"]


def _block_meta_edit(record: int, edit) -> Any:
    """A _rewrite_frame0 block: shard 0's first block with ``edit(meta)`` applied to the
    metadata of its record ``record`` (a bytearray, changed in place; column 0 keeps its
    length)."""

    def make(store: Path) -> bytes:
        data, table, rmap, meta = _shard_parts(_shard0(store))
        raw = bytearray(
            zstandard.ZstdDecompressor().decompress(data[int(table["offset"][0]) :][: int(table["stored"][0])])
        )
        n = int((rmap["frame"] == 0).sum())
        block = columnar.ColumnBlock(bytes(raw), _ptzip.DEFAULT_LAYOUT, n, "test")
        c = len(block.columns)
        col0 = columnar._HEAD.size + columnar._COLUMN.size * c + 4 * n * c
        lo, hi = col0 + int(block._meta_at[record]), col0 + int(block._meta_at[record + 1])
        meta_bytes = bytearray(raw[lo:hi])
        edit(meta_bytes)
        assert len(meta_bytes) == hi - lo
        raw[lo:hi] = meta_bytes
        return bytes(raw)

    return make


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    ("edit", "fails"),
    [
        (lambda m: m.__setitem__(0, 2), True),  # version
        (lambda m: m.__setitem__(1, 1), True),  # flags: an archive name follows
        (lambda m: m.__setitem__(10, m[10] ^ 1), True),  # the storage count
        (lambda m: m.__setitem__(11, m[11] ^ 1), True),  # the pickle length, by one
        (lambda m: m.__setitem__(12, m[12] ^ 1), True),  # the pickle length's or a storage size's byte
        (lambda m: m.__setitem__(2, m[2] ^ 0xFF), False),  # the name hash: loads, rebuilds to other bytes
        (lambda m: None, False),
    ],
    ids=["version", "flags", "count", "pickle-length", "size", "name-hash", "intact"],
)
def test_blocks_parsed_at_once_read_as_parsed_record_by_record(tmp_path: Path, edit, fails: bool, monkeypatch) -> None:
    """A block of many records is parsed and length-checked at once (numpy); one of its
    records' metadata damaged behind valid checksums reads (every record's sample or error,
    and read_bytes) exactly as when each record is parsed alone: the damaged record's
    error, every other record as torch.load of its bytes."""
    batch = _tokens(120)
    store = tmp_path / "s"
    ts.write_store(batch, store, compact=True, frame_target_bytes=1 << 16)
    n0 = int((_shard_parts(_shard0(store))[2]["frame"] == 0).sum())
    assert n0 >= columnar.PARSE_ALL_RECORDS
    _rewrite_frame0(store, _block_meta_edit(7, edit)(store))

    def outcomes() -> list:
        reader = ts.open_store(store)
        got = [
            ("ok", r.sample) if r.error is None else ("error", type(r.error))
            for r in reader.iter_many(range(len(reader)))
        ]
        got += [_outcome(lambda i=i: reader.read_bytes(i)) for i in range(len(reader))]
        single = ts.open_store(store)  # random single reads through the frame cache
        perm = np.random.default_rng(1).permutation(len(single)).tolist()
        return got + [_outcome(lambda i=i: single[i]) for i in perm]

    calls = []
    real = _ptzip.parse_metas
    monkeypatch.setattr(_ptzip, "parse_metas", lambda *a: calls.append(1) or real(*a))
    at_once = outcomes()
    assert calls
    monkeypatch.setattr(columnar, "PARSE_ALL_RECORDS", 10**9)
    calls.clear()
    alone = outcomes()
    assert not calls
    assert [i for i, (a, b) in enumerate(zip(at_once, alone)) if not _eq(a, b)] == []
    for i, sample in enumerate(batch):
        if i != 7:
            assert _eq(at_once[i], ("ok", sample)), i
            assert at_once[len(batch) + i] == ("ok", dumps(sample)), i
    assert at_once[7] == ("error", RecordMetaError) if fails else _eq(at_once[7], ("ok", batch[7])), at_once[7]


def test_random_reads_of_a_block_parsed_at_once_rebuild_exact_bytes(tmp_path: Path, monkeypatch) -> None:
    """Random single reads of a kept block of many records parse its metadata once for all
    records (from the third record read); every record then rebuilds to torch.save's exact
    bytes, CRC-32s kept (pickles and storages of 64 KiB or more) read from their places, and
    loads as torch.load of them; a deep verify agrees."""
    batch = [
        {
            "big": torch.arange(17_000 + i, dtype=torch.float32),
            "i": torch.tensor(i),
            "s": "x" * (70_000 if i % 3 else 5),
        }
        for i in range(40)
    ]
    store = tmp_path / "s"
    ts.write_store(batch, store, compact=True, frame_target_bytes=8 << 20)
    wholes = []
    real = _ptzip.parse_metas
    monkeypatch.setattr(_ptzip, "parse_metas", lambda *a: wholes.append(real(*a)) or wholes[-1])
    alone = []
    real_meta = _ptzip.parse_meta
    monkeypatch.setattr(_ptzip, "parse_meta", lambda *a: alone.append(1) or real_meta(*a))
    reader = ts.open_store(store)
    order = np.random.default_rng(4).permutation(len(batch)).tolist()
    for i in order:
        assert reader.read_bytes(i) == dumps(batch[i]), i
        got = reader[i]
        assert (
            got["s"] == batch[i]["s"]
            and torch.equal(got["big"], batch[i]["big"])
            and torch.equal(got["i"], batch[i]["i"])
        )
    assert any(w is not None for w in wholes), "no block was parsed at once"
    assert len(alone) <= 2 * sum(w is not None for w in wholes) + 2
    assert verify_store(store, deep=True).ok
