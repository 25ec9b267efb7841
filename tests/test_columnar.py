"""Columnar frames (format 1.3, feature "columnar-frames"): container-free records, column by column.

Every check compares with an independent source: ``torch.save``'s own bytes (the writer's
``dumps``, which is ``torch.save`` to a buffer) and ``torch.load`` of them.
"""

from __future__ import annotations

import collections
import io
import json
import struct
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorstore_pt as ts
from _store_tools import store_files
from strategies import assert_identical, samples
from tensorstore_pt import _ptzip, columnar, fastload
from tensorstore_pt import format as fmt
from tensorstore_pt.errors import (
    CorruptStoreError,
    InvalidOptionError,
    RecordLengthError,
    RecordMetaError,
    ShardFormatError,
    UnsupportedFormatError,
)
from tensorstore_pt.format import RECORD_DTYPE, RECORD_MAP_DTYPE, TRAILER_BYTES, decode_trailer, encode_footer
from tensorstore_pt.integrity import verify_store
from tensorstore_pt.serialization import dumps


def _tokens(n: int = 60) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 30000, (5 + i % 40,), generator=g), torch.tensor(i % 7)) for i in range(n)]


def _mixed() -> list:
    out: list = _tokens(30)
    out += [{"x": torch.randn(16, generator=torch.Generator().manual_seed(i)), "name": f"n{i}", "k": [i, 2.5]}
            for i in range(20)]  # fmt: skip
    out += [torch.arange(12, dtype=torch.float16).reshape(3, 4) * i for i in range(5)]
    out += [{"empty": torch.empty(0, 3), "b": torch.tensor([True, False])}]
    return out


def _loaded(raw: bytes):
    return torch.load(io.BytesIO(raw), weights_only=True)


def _check_store(path: Path, batch: list) -> None:
    reader = ts.open_store(path)
    assert len(reader) == len(batch)
    for i, sample in enumerate(batch):
        raw = reader.read_bytes(i)
        assert raw == dumps(sample), f"record {i}: read_bytes differs from torch.save's bytes"
        assert_identical(_loaded(raw), reader[i], f"record {i}")
    order = list(range(len(batch)))[::-1]
    for res in reader.iter_many(order):
        assert res.error is None
        assert_identical(_loaded(dumps(batch[res.record])), res.sample, f"record {res.record}")


def _columnar_frames(path: Path) -> tuple[int, int]:
    """(column block frames, all frames) over the store's shards."""
    reader = ts.open_store(path)
    blocks = frames = 0
    for si in range(reader.info().shards):
        footer = reader._footer(si)
        frames += len(footer.table)
        blocks += int(footer.columnar_mask.sum()) if footer.columnar_mask is not None else 0
    return blocks, frames


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_round_trip_exact_bytes(tmp_path: Path, codec: str) -> None:
    batch = _mixed()
    info = ts.write_store(
        batch, tmp_path / "s", codec=codec, compact=True, frame_target_bytes=2000, max_shard_bytes=4000
    )
    assert info.format_version == (1, 3)
    assert info.shards > 1
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    # lz4 saves under 5% on some blocks (random floats): those are stored raw (format 1.2 flag).
    assert (
        {"columnar-frames", "multi-record-frames"}
        <= set(index["features"])
        <= {
            "columnar-frames",
            "multi-record-frames",
            "raw-frames",
        }
    )
    assert index["created_by"]["compact"] is True
    blocks, frames = _columnar_frames(tmp_path / "s")
    assert blocks == frames  # every record proves under this torch's layout
    # The index's raw bytes are the records' torch.save bytes, not the blocks'.
    assert info.raw_bytes == sum(len(dumps(s)) for s in batch)
    _check_store(tmp_path / "s", batch)
    report = verify_store(tmp_path / "s", deep=True)
    assert report.ok and report.records_checked == len(batch)


def test_smaller_than_plain_frames(tmp_path: Path) -> None:
    batch = _tokens(400)
    plain = ts.write_store(batch, tmp_path / "p", frame_target_bytes=64 * 1024)
    compact = ts.write_store(batch, tmp_path / "c", compact=True)
    assert compact.raw_bytes == plain.raw_bytes
    assert compact.file_bytes < 0.7 * plain.file_bytes, (compact.file_bytes, plain.file_bytes)


def test_footer_names_layout_and_runs(tmp_path: Path) -> None:
    ts.write_store(_tokens(10), tmp_path / "s", compact=True)
    reader = ts.open_store(tmp_path / "s")
    name = reader.index.shards[0].name
    data = (tmp_path / "s" / name).read_bytes()
    _, _, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), name)
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    assert meta["format_version"] == [1, 3]
    assert meta["columnar_frames"] == [[0, 1]]
    layout = _ptzip.PtLayout.from_json(meta["columnar_layout"])
    assert layout == _ptzip.prove(dumps(torch.zeros(3))).layout
    assert meta["columnar_layout"]["writer"] == f"torch {torch.__version__}"
    assert data[16:24] != columnar.MAGIC  # the block is zstd-coded: its magic is inside the frame
    assert zstandard.ZstdDecompressor().decompress(data[16 : 16 + int(reader._footer(0).table["stored"][0])])[:8] == (
        columnar.MAGIC
    )


def test_other_layout_uses_plain_frames(tmp_path: Path) -> None:
    """Records that do not prove under the writer's layout (here the writer assumes another
    alignment than torch.save's) are stored as they are, in plain frames; the footer names
    no column block."""
    import dataclasses

    real = ts.writer._this_torch_layout

    def other():
        layout = real()
        consts = tuple((n, b"128" if n == ".storage_alignment" else v) for n, v in layout.constants)
        return dataclasses.replace(layout, alignment=128, constants=consts)

    batch = _tokens(12)
    with mock.patch.object(ts.writer, "_this_torch_layout", other):
        ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=400)
    assert _columnar_frames(tmp_path / "s")[0] == 0
    reader = ts.open_store(tmp_path / "s")
    assert reader._footer(0).layout.alignment == 128
    _check_store(tmp_path / "s", batch)
    assert verify_store(tmp_path / "s", deep=True).ok


def test_writer_fallback_when_prove_fails(tmp_path: Path) -> None:
    """A record the writer cannot prove (prove returns None) is stored raw-as-saved in a plain frame."""
    batch = _tokens(9)
    real = _ptzip.prove
    calls = {"n": 0}

    def flaky(buf):
        calls["n"] += 1
        return None if calls["n"] % 3 == 0 else real(buf)

    with mock.patch.object(_ptzip, "prove", flaky):
        ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=300)
    blocks, frames = _columnar_frames(tmp_path / "s")
    assert 0 < blocks < frames
    _check_store(tmp_path / "s", batch)


def test_many_storages_fall_back(tmp_path: Path) -> None:
    big = [torch.tensor([i]) for i in range(columnar.MAX_COLUMNS)]  # MAX_COLUMNS storages: one too many
    batch = [big, _tokens(1)[0]]
    ts.write_store(batch, tmp_path / "s", compact=True)
    blocks, frames = _columnar_frames(tmp_path / "s")
    assert (blocks, frames) == (1, 2)
    _check_store(tmp_path / "s", batch)


def test_compact_option_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="compact"):
        ts.ShardWriter(tmp_path / "s", compact="yes")


def test_old_reader_refuses_with_feature_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.2 reader (its KNOWN_FEATURES) refuses a 1.3 store, naming the newer feature."""
    ts.write_store(_tokens(5), tmp_path / "s", compact=True)
    monkeypatch.setattr(fmt, "KNOWN_FEATURES", frozenset({"multi-record-frames", "zstd-dictionary", "raw-frames"}))
    with pytest.raises(UnsupportedFormatError, match="columnar-frames"):
        ts.open_store(tmp_path / "s")


def test_raw_column_blocks(tmp_path: Path) -> None:
    """Incompressible storages: the block is stored raw (format 1.2 flag) and still reads."""
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=g) for _ in range(12)]
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=20_000)
    reader = ts.open_store(tmp_path / "s")
    footer = reader._footer(0)
    assert footer.raw_mask is not None and footer.raw_mask.any()
    assert footer.columnar_mask[footer.raw_mask].all()
    assert reader.index.features == ("columnar-frames", "multi-record-frames", "raw-frames")
    _check_store(tmp_path / "s", batch)


def test_parallel_pack_byte_identical(tmp_path: Path) -> None:
    batch = _mixed()
    ts.write_store(batch, tmp_path / "a", compact=True, max_shard_bytes=20_000)
    ts.write_store(batch, tmp_path / "b", compact=True, max_shard_bytes=20_000, num_workers=2, start_method="fork")
    a = sorted(p.read_bytes() for p in (tmp_path / "a").glob("*.tspt"))
    b = sorted(p.read_bytes() for p in (tmp_path / "b").glob("*.tspt"))
    assert a == b


def _flaky_prove(every: int):
    """``_ptzip.prove`` that gives up on about one record in ``every``, chosen by its bytes
    (pure, as the real one: records are proved on pool threads, in any order): runs of plain
    frames among the blocks."""
    import zlib

    real = _ptzip.prove

    def flaky(buf):  # type: ignore[no-untyped-def]
        return None if zlib.crc32(buf) % every == 0 else real(buf)

    return flaky


def test_bytes_do_not_depend_on_threads_or_coder_timing(tmp_path: Path, fixed_token: None) -> None:
    """Blocks are assembled and coded on coder threads, their filters chosen on the writer's
    thread: the store is byte for byte the same for 1 or 4 threads, with coders that finish
    out of order (random delays) and with every block coded inline."""
    batch = _mixed() * 3 + [torch.randn(40_000, generator=torch.Generator().manual_seed(9))]
    options = {"codec": "zstd", "compact": True, "frame_target_bytes": 600, "max_shard_bytes": 6_000}
    real = ts.writer._code_plans
    rng = np.random.default_rng(5)
    delays = iter(rng.uniform(0, 0.004, 10_000).tolist())

    def slow(*args):  # type: ignore[no-untyped-def]
        import time

        time.sleep(next(delays))
        return real(*args)

    stores = {}
    for name, threads, code in (("one", 1, real), ("four", 4, slow), ("inline", 2, None)):
        with (
            mock.patch.object(_ptzip, "prove", _flaky_prove(7)),
            mock.patch.object(ts.writer, "_code_plans", code or real),
        ):
            if code is None:  # no coder thread can start: every group is coded on the writer's thread
                with mock.patch.object(ts.writer.cf.ThreadPoolExecutor, "submit", _refuse_coder_tasks()):
                    ts.write_store(batch, tmp_path / name, num_threads=threads, **options)
            else:
                ts.write_store(batch, tmp_path / name, num_threads=threads, **options)
        stores[name] = store_files(tmp_path / name)
    assert len(stores["one"]) > 3  # several shards
    assert stores["four"] == stores["one"]
    assert stores["inline"] == stores["one"]
    blocks, frames = _columnar_frames(tmp_path / "one")
    assert 0 < blocks < frames  # blocks and plain frames
    _check_store(tmp_path / "four", batch)


def _refuse_coder_tasks():  # type: ignore[no-untyped-def]
    """``ThreadPoolExecutor.submit`` that refuses tasks for coder threads, as after
    interpreter shutdown, and takes the others."""
    real = ts.writer.cf.ThreadPoolExecutor.submit

    def submit(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self._thread_name_prefix == "tspt-coder":
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return real(self, fn, *args, **kwargs)

    return submit


def _coder_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("tspt-coder")]


def test_a_coding_error_fails_the_pack_and_publishes_nothing(tmp_path: Path) -> None:
    """An error while a coder thread codes a block is raised to the caller (from a later
    write, or close); nothing is published, the writer's files are removed and no coder
    thread is left."""
    real = ts.writer._code_plans
    calls = {"n": 0}

    def failing(*args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise MemoryError("coding block 4")
        return real(*args)

    with mock.patch.object(ts.writer, "_code_plans", failing), pytest.raises(MemoryError, match="coding block 4"):
        ts.write_store(_tokens(200), tmp_path / "s", compact=True, frame_target_bytes=300, max_shard_bytes=2_000)
    assert calls["n"] >= 4
    assert not (tmp_path / "s").exists() or not [p for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")]
    assert _coder_threads() == []


def test_abort_drops_blocks_being_coded(tmp_path: Path) -> None:
    """Abort with groups still on the coder threads: they are dropped, the coder threads stop
    and every file the writer wrote goes; the store it replaced is untouched."""
    import threading

    ts.write_store(_tokens(5), tmp_path / "s")
    before = store_files(tmp_path / "s")
    gate = threading.Event()
    real = ts.writer._code_plans

    def held(*args):  # type: ignore[no-untyped-def]
        gate.wait(5)
        return real(*args)

    with mock.patch.object(ts.writer, "_code_plans", held):
        w = ts.ShardWriter(tmp_path / "s", mode="overwrite", compact=True, frame_target_bytes=300, num_threads=1)
        for sample in _tokens(200):  # until two groups wait on the coder (a third would block)
            w.write(sample)
            if len(w._coding) == 2:
                break
        assert len(w._coding) == 2 and not any(f.done() for f in w._coding)
        threading.Timer(0.2, gate.set).start()
        assert w.abort() == []
    assert w._coding == collections.deque() and w._coder is None
    assert _coder_threads() == []
    assert store_files(tmp_path / "s") == before


def test_ctrl_c_while_abort_waits_for_the_coders_still_removes_everything(tmp_path: Path) -> None:
    """A (second) Ctrl-C while abort waits for the coder threads: the KeyboardInterrupt is
    raised, and the writer's files and the lock are gone all the same (a later abort has
    nothing left to do)."""
    real_shutdown = ts.writer.cf.ThreadPoolExecutor.shutdown

    def interrupted(self, wait=True, *, cancel_futures=False):  # type: ignore[no-untyped-def]
        real_shutdown(self, wait=False, cancel_futures=cancel_futures)
        if self._thread_name_prefix == "tspt-coder":
            raise KeyboardInterrupt

    w = ts.ShardWriter(tmp_path / "s", compact=True, frame_target_bytes=300, max_shard_bytes=2_000)
    for sample in _tokens(200):
        w.write(sample)
    assert w._shards and w._coder is not None  # shards written, coder threads started
    with mock.patch.object(ts.writer.cf.ThreadPoolExecutor, "shutdown", interrupted):
        with pytest.raises(KeyboardInterrupt):
            w.abort()
    assert w.abort() == []
    assert not (tmp_path / "s").exists()
    ts.write_store(_tokens(3), tmp_path / "s", compact=True)  # no lock left behind
    assert len(ts.open_store(tmp_path / "s")) == 3


def test_an_error_raised_in_the_pool_reaches_the_caller_as_it_is(tmp_path: Path) -> None:
    """An error raised on a pool thread (here while proving a record) is what write or close
    raises, not an error of the except clause that looks for a broken process pool."""
    real = columnar.proved
    calls = {"n": 0}

    def failing(raw, layout):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:
            raise MemoryError("proving record 6")
        return real(raw, layout)

    with mock.patch.object(columnar, "proved", failing), pytest.raises(MemoryError, match="proving record 6"):
        ts.write_store(_tokens(40), tmp_path / "s", compact=True)
    assert not (tmp_path / "s").exists()


def test_merge_and_copy_keep_blocks(tmp_path: Path) -> None:
    p0, p1 = _tokens(20), _mixed()
    ts.write_store(p0, tmp_path / "p0", compact=True)
    ts.write_store(p1, tmp_path / "p1", compact=True, codec="zstd")
    ts.merge_stores([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    _check_store(tmp_path / "m", p0 + p1)
    ts.copy_store(tmp_path / "m", tmp_path / "c")
    _check_store(tmp_path / "c", p0 + p1)
    assert verify_store(tmp_path / "c", deep=True).ok


def test_datasets_read_blocks(tmp_path: Path) -> None:
    batch = _tokens(50)
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=1000)
    ds = ts.StoreIterableDataset(tmp_path / "s", shuffle=False)
    got = list(ds)
    assert len(got) == len(batch)
    for s, g in zip(batch, got):
        assert_identical(_loaded(dumps(s)), g, "sample")


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "filt,size",
    [(columnar.FILTER_NONE, 0)]
    + [(columnar.FILTER_SHUFFLE, e) for e in (2, 4, 8)]
    + [(columnar.FILTER_DELTA, e) for e in (1, 2, 4, 8)],
)
@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 64, 1001])
def test_filters_invert(filt: int, size: int, length: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    stored = columnar._apply(data, filt, size)
    assert len(stored) == len(data)
    assert bytes(columnar._undo(memoryview(stored), filt, size)) == data
    if filt == columnar.FILTER_SHUFFLE and length >= 2 * size:
        whole = length // size * size  # byte 0 of every element first, computed here by slicing
        assert stored[: whole // size] == data[0:whole:size]
    if filt == columnar.FILTER_DELTA and length >= 2 * size:
        v = np.frombuffer(data[: length // size * size], dtype=f"<u{size}").astype(object)
        d = np.frombuffer(stored[: length // size * size], dtype=f"<u{size}").astype(object)
        assert d[1] == (v[1] - v[0]) % (1 << (8 * size))


def test_filter_choice_by_measurement() -> None:
    compress = zstandard.ZstdCompressor(level=3).compress
    ids = np.random.default_rng(0).integers(0, 30000, 8000).astype(np.int64).tobytes()
    assert columnar.choose_filter(ids, compress) == (columnar.FILTER_SHUFFLE, 8)
    ramp = (np.arange(8000, dtype=np.int64) * 977).tobytes()
    assert columnar.choose_filter(ramp, compress)[0] == columnar.FILTER_DELTA
    noise = np.random.default_rng(1).integers(0, 256, 8000, dtype=np.uint8).tobytes()
    assert columnar.choose_filter(noise, compress) == (columnar.FILTER_NONE, 0)
    assert columnar.choose_filter(ids, None) == (columnar.FILTER_NONE, 0)


# --------------------------------------------------------------------------- properties

_FILTERS = [None, (0, 0), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (2, 8)]


def _filtered(col: bytes, filt: int, size: int) -> bytes:
    """A filter from its definition (docs/format.md 5.3), written apart from ``_filters``."""
    whole = len(col) // size * size if size else 0
    if filt == 1:  # byte j of every element, for j = 0 .. size - 1
        body = bytes(col[k] for j in range(size) for k in range(j, whole, size))
    elif filt == 2:  # the first value, then each minus the one before it, modulo 2**(8 size)
        vals = [int.from_bytes(col[k : k + size], "little") for k in range(0, whole, size)]
        diffs = vals[:1] + [(b - a) % (1 << (8 * size)) for a, b in zip(vals, vals[1:])]
        body = b"".join(d.to_bytes(size, "little") for d in diffs)
    else:
        return col
    return body + col[whole:]


@settings(max_examples=80, deadline=None)
@given(
    storages=st.lists(st.lists(st.binary(max_size=70), min_size=2, max_size=2), min_size=1, max_size=5),
    filters=st.lists(st.sampled_from([f for f in _FILTERS if f is not None]), min_size=2, max_size=2),
    offset=st.integers(0, 7),
)
def test_assemble_block_is_the_layout_byte_for_byte(storages, filters, offset):
    """assemble_block (each storage copied once into one buffer, filtered on the way) gives
    the block layout of docs/format.md 5.3 built from its definition: header, column table,
    metadata lengths, storage sizes, then the metadata column and each storage column
    joined and filtered. _apply_into writes the same bytes into an unaligned slice."""
    base = _ptzip.prove(dumps([torch.zeros(1), torch.zeros(1)]))
    parts = [_ptzip.PtParts(base.layout, "archive", base.pickle, tuple(sts), 0, (None,) * 3) for sts in storages]
    metas = [_ptzip.encode_meta(p) for p in parts]
    cols = [b"".join(metas)] + [_filtered(b"".join(p.storages[j] for p in parts), *filters[j]) for j in range(2)]
    want = struct.pack("<8sII", b"TSPTCOLS", len(parts), 3)
    for c, (f, e) in zip(cols, [(0, 0), *filters]):
        want += struct.pack("<QBB6x", len(c), f, e)
    want += b"".join(struct.pack("<I", len(m)) for m in metas)
    want += b"".join(struct.pack("<I", len(st)) for p in parts for st in p.storages)
    want += b"".join(cols)
    got = columnar.assemble_block(parts, tuple(filters))
    assert bytes(got) == want
    assert columnar.encode_block(parts, None) == columnar.assemble_block(parts, ((0, 0), (0, 0)))
    from tensorstore_pt._filters import _apply_into

    col = b"".join(p.storages[0] for p in parts)
    out = np.full(len(col) + offset + 3, 0xEE, dtype=np.uint8)
    _apply_into(memoryview(col), *filters[0], out[offset : offset + len(col)])
    assert out[offset : offset + len(col)].tobytes() == _filtered(col, *filters[0])
    assert (out[:offset] == 0xEE).all() and (out[offset + len(col) :] == 0xEE).all()


def test_filters_chosen_from_a_column_head_as_from_the_column(tmp_path: Path) -> None:
    """block_filters codes only a column's first FILTER_SAMPLE_BYTES, gathered record by
    record: the choice is choose_filter's of the whole joined column."""
    compress = zstandard.ZstdCompressor().compress
    g = torch.Generator().manual_seed(4)
    noise = (torch.randint(-(2**62), 2**62, (30,), generator=g), torch.zeros(1, dtype=torch.int16))
    for sizes in ([10] * 3, [1000] * 12, [5000, 20], [9000, 9000]):
        batch = [noise] + [
            (
                torch.arange(n, dtype=torch.int64) * 3 + i,
                torch.randint(0, 9, (n // 2 + 1,), generator=g).to(torch.int16),
            )
            for i, n in enumerate(sizes)
        ]
        parts = [_ptzip.prove(dumps(s)) for s in batch]
        want = tuple(columnar.choose_filter(b"".join(p.storages[j] for p in parts), compress) for j in range(2))
        assert columnar.block_filters(parts, compress) == want, sizes
        # (the first record's noise alone takes no filter; with the ramps after it, a column does)
        assert columnar.choose_filter(parts[0].storages[0], compress) == (0, 0)
        assert want[0] != (0, 0), sizes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    batch=st.lists(samples(extras=True, sparse=True, max_leaves=5), min_size=1, max_size=8),
    codec=st.sampled_from(["none", "lz4", "zstd"]),
    frame_target_bytes=st.sampled_from([1, 2000, 64 * 1024]),
    forced=st.sampled_from(_FILTERS),
)
def test_property_exact_bytes_and_loads(batch, codec, frame_target_bytes, forced):
    """For any sample and every codec, frame size and filter: read_bytes(i) is torch.save's
    bytes exactly, and store[i] is bit-identical to torch.load of them."""
    patch = (
        mock.patch.object(columnar, "choose_filter", lambda col, compress, *rest: forced)
        if forced is not None
        else mock.patch.object(columnar, "MIN_FILTER_GAIN", columnar.MIN_FILTER_GAIN)
    )
    with tempfile.TemporaryDirectory() as tmp, patch:
        path = Path(tmp) / "s"
        ts.write_store(batch, path, codec=codec, compact=True, frame_target_bytes=frame_target_bytes)
        # The torch.save buffers the writer took (of its snapshot of each sample), as a plain
        # store keeps them byte for byte.
        ts.write_store(batch, Path(tmp) / "plain", codec="none")
        saved = [ts.open_store(Path(tmp) / "plain").read_bytes(i) for i in range(len(batch))]
        reader = ts.open_store(path)
        for i, sample in enumerate(batch):
            raw = reader.read_bytes(i)
            assert raw == saved[i]
            assert_identical(_loaded(raw), reader[i], f"record {i}")
            assert_identical(sample, reader[i], f"record {i}", layout=False)
        for res in reader.iter_many(list(range(len(batch)))[::-1]):
            assert res.error is None
            assert_identical(_loaded(saved[res.record]), res.sample, f"record {res.record}")


# --------------------------------------------------------------------------- hostile blocks


def _block(n: int = 4) -> tuple[bytes, _ptzip.PtLayout, list[bytes]]:
    raws = [dumps(s) for s in _tokens(n)]
    parts = [_ptzip.prove(r) for r in raws]
    return columnar.encode_block(parts, zstandard.ZstdCompressor().compress), parts[0].layout, raws


def _column_entry(block: bytes, j: int) -> int:
    return 16 + 16 * j


def _edit(block: bytes, at: int, fmt_: str, value) -> bytes:
    out = bytearray(block)
    struct.pack_into(fmt_, out, at, value)
    return bytes(out)


def _hostile_blocks() -> dict:
    block, _, _ = _block()
    n, c = struct.unpack_from("<II", block, 8)
    lengths_at = 16 + 16 * c
    col1 = struct.unpack_from("<Q", block, _column_entry(block, 1))[0]
    meta0 = struct.unpack_from("<I", block, lengths_at)[0]
    return {
        "magic": (b"XXXXXXXX" + block[8:], "magic"),
        "record-count-lies": (_edit(block, 8, "<I", n + 1), "holds 5 records"),
        "zero-columns": (_edit(block, 12, "<I", 0), "0 columns"),
        "too-many-columns": (_edit(block, 12, "<I", columnar.MAX_COLUMNS + 1), "columns"),
        "column-past-block": (_edit(block, _column_entry(block, 1), "<Q", col1 + 10**9), "runs past the block"),
        "column-short": (_edit(block, _column_entry(block, 1), "<Q", col1 - 1), "after its last column"),
        "unknown-filter": (_edit(block, _column_entry(block, 1) + 8, "<B", 9), "filter 9"),
        "bad-element-size": (_edit(block, _column_entry(block, 1) + 9, "<B", 3), "element size 3"),
        "column0-filtered": (_edit(block, 16 + 8, "<B", 1), "column 0 has filter 1"),
        "reserved-set": (_edit(block, _column_entry(block, 1) + 12, "<B", 1), "reserved"),
        "meta-lengths-lie": (_edit(block, lengths_at, "<I", meta0 + 1), "metadata lengths add up"),
        "meta-length-huge": (_edit(block, lengths_at, "<I", 2**32 - 1), "metadata lengths add up"),
        "truncated-header": (block[:10], "shorter than its"),
        "tables-past-end": (block[:16] + block[16:40], "need"),
        "trailing-bytes": (block + b"\0", "after its last column"),
    }


@pytest.mark.parametrize("kind", list(_hostile_blocks()))
def test_hostile_block_refused(kind: str) -> None:
    block, layout, _ = _block()
    bad, message = _hostile_blocks()[kind]
    with pytest.raises(RecordMetaError, match=message):
        columnar.ColumnBlock(bad, layout, 4, "t")


def test_plan_mismatch_and_sizes_that_lie() -> None:
    """A record whose metadata lists other storage sizes than the block's size table (the
    plan does not match its columns), and size tables that do not add up to their column,
    are refused: the tables when the block is parsed, a record before it is handed out."""
    raws = [dumps(s) for s in _tokens(3)]
    parts = [_ptzip.prove(r) for r in raws]
    block = columnar.encode_block(parts, None)
    layout = parts[0].layout
    n, c = struct.unpack_from("<II", block, 8)
    sizes_at = 16 + 16 * c + 4 * n
    table = np.frombuffer(block, dtype="<u4", count=n * (c - 1), offset=sizes_at).reshape(n, c - 1)
    assert table[0, 0] != table[1, 0]  # token records of different lengths
    # Swap records 0 and 1 in the size table: the columns still add up, the records do not.
    swapped = table.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    bad = block[:sizes_at] + swapped.tobytes() + block[sizes_at + swapped.nbytes :]
    b = columnar.ColumnBlock(bad, layout, n, "t")
    with pytest.raises(RecordMetaError, match="record 0's metadata lists storages of"):
        b.record_bytes(0, len(raws[0]), 1 << 20)
    with pytest.raises(RecordMetaError, match="size table"):
        b.load_args(1, len(raws[1]))
    assert b.record_bytes(2, len(raws[2]), 1 << 20) == raws[2]  # the others still read
    # A size table that does not add up to its column.
    grown = table.copy()
    grown[2, 0] += 1
    bad = block[:sizes_at] + grown.tobytes() + block[sizes_at + grown.nbytes :]
    with pytest.raises(RecordMetaError, match="add up to"):
        columnar.ColumnBlock(bad, layout, n, "t")
    # A record's metadata that is not metadata (its version byte).
    junk = bytearray(block)
    junk[sizes_at + table.nbytes] = 7
    b = columnar.ColumnBlock(bytes(junk), layout, n, "t")
    with pytest.raises(RecordMetaError, match="record 0"):
        b.parts(0)
    assert b.record_bytes(1, len(raws[1]), 1 << 20) == raws[1]


def test_record_length_lie_refused() -> None:
    block, layout, raws = _block()
    b = columnar.ColumnBlock(block, layout, 4, "t")
    assert b.record_bytes(1, len(raws[1]), 1 << 20) == raws[1]
    with pytest.raises(RecordLengthError, match="rebuilds to"):
        b.record_bytes(1, len(raws[1]) + 1, 1 << 20)


def _shard_parts(path: Path):
    data = path.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    frames = meta["frames"]
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=frames, offset=table_offset).copy()
    at = table_offset + 32 * frames
    if "record_map_bytes" in meta:  # coded (format 1.3)
        rmap = fmt.decode_record_map(data[at : at + meta["record_map_bytes"]], count, str(path))
    else:
        rmap = np.frombuffer(data, dtype=RECORD_MAP_DTYPE, count=count, offset=at).copy()
    return data, table, rmap, meta


def _rewrite_frame0(store: Path, new_block: bytes | None = None, edit_meta=None, edit_map=None) -> None:
    """Replace shard 0's first frame with ``new_block`` zstd-coded (table and checksums made to
    match, so only the block's own checks can catch it), edit its footer, reseal the index."""
    index = json.loads((store / "index.json").read_text())
    entry = index["shards"][0]
    path = store / entry["name"]
    data, table, rmap, meta = _shard_parts(path)
    frames = [data[int(r["offset"]) : int(r["offset"]) + int(r["stored"])] for r in table]
    if new_block is not None:
        frames[0] = zstandard.ZstdCompressor().compress(new_block)
        table["raw"][0] = len(new_block)
    pos = 16
    for fi, f in enumerate(frames):
        table["offset"][fi], table["stored"][fi], table["checksum"][fi] = pos, len(f), ts.checksums.digest_int(f)
        pos += len(f)
    if edit_meta is not None:
        edit_meta(meta)
    if edit_map is not None:
        edit_map(rmap)
    out = data[:16] + b"".join(frames) + encode_footer(table, meta, rmap)
    path.write_bytes(out)
    entry["file_bytes"] = len(out)
    entry["stored_bytes"] = int(table["stored"].sum())
    entry["raw_bytes"] = int(rmap["raw"].sum())
    entry["checksum"] = f"xxh3_64:{ts.checksums.digest_int(out):016x}"
    index["totals"]["file_bytes"] = sum(s["file_bytes"] for s in index["shards"])
    index["totals"]["stored_bytes"] = sum(s["stored_bytes"] for s in index["shards"])
    index["totals"]["raw_bytes"] = sum(s["raw_bytes"] for s in index["shards"])
    (store / "index.json").write_text(json.dumps(index, indent=1) + "\n")


def _small_store(tmp_path: Path) -> Path:
    """8 token records, the first 4 in frame 0 (a column block)."""
    raws = [dumps(s) for s in _tokens(4)]
    target = sum(columnar.proved(r, _ptzip.prove(r).layout)[1] for r in raws)  # what a compact frame counts
    ts.write_store(_tokens(8), tmp_path / "s", compact=True, frame_target_bytes=target)
    return tmp_path / "s"


@pytest.mark.parametrize("kind", ["column-past-block", "meta-lengths-lie", "unknown-filter", "record-count-lies"])
def test_hostile_block_in_store(tmp_path: Path, kind: str) -> None:
    """A hostile block behind a valid checksum: every read path refuses it with a typed error,
    verify reports it, and the other frames still read."""
    store = _small_store(tmp_path)
    reader = ts.open_store(store)
    footer = reader._footer(0)
    n0 = int(np.sum(footer.record_map["frame"] == 0))
    block, _, _ = _block(n0)
    raws0 = [dumps(s) for s in _tokens(n0)]
    assert [reader.read_bytes(i) for i in range(n0)] == raws0
    assert n0 == 4
    _rewrite_frame0(store, _hostile_blocks()[kind][0])
    reader = ts.open_store(store)
    with pytest.raises(CorruptStoreError):
        reader[0]
    with pytest.raises(CorruptStoreError):
        reader.read_bytes(1)
    results = list(reader.iter_many(range(len(reader))))
    assert all(isinstance(r.error, CorruptStoreError) for r in results[:n0])
    assert all(r.error is None for r in results[n0:])
    report = verify_store(store)
    assert any(p.kind == "record_decode" for p in report.problems)


def test_record_map_length_lie_in_store(tmp_path: Path) -> None:
    store = _small_store(tmp_path)

    def lie(rmap):  # record 0 claims one byte more, the frame's next records move up (tiling kept)
        rmap["raw"][0] += 1
        rest = np.flatnonzero(rmap["frame"] == 0)[1:]
        rmap["raw_offset"][rest] += 1

    _rewrite_frame0(store, edit_map=lie)
    reader = ts.open_store(store)
    with pytest.raises(RecordLengthError):
        reader.read_bytes(0)
    with pytest.raises(RecordLengthError):
        reader[0]
    assert reader.read_bytes(1) == dumps(_tokens(2)[1])
    report = verify_store(store, deep=True)
    assert [p.record for p in report.problems if p.kind == "record_length"] == [0]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.__setitem__("columnar_layout", {"order": []}), "columnar_layout"),
        (lambda m: m.pop("columnar_layout"), "columnar_layout"),
        (lambda m: m.__setitem__("columnar_frames", [[0, 99]]), "columnar_frames"),
        (lambda m: m.__setitem__("columnar_frames", "all"), "columnar_frames"),
        (lambda m: m.__setitem__("features", ["multi-record-frames"]), "does not list the feature"),
        (lambda m: m.__setitem__("features", ["columnar-frames"]), "without 'multi-record-frames'"),
    ],
)
def test_hostile_footer_keys(tmp_path: Path, edit, message: str) -> None:
    store = _small_store(tmp_path)
    _rewrite_frame0(store, edit_meta=edit)
    with pytest.raises((ShardFormatError, UnsupportedFormatError), match=message):
        ts.open_store(store)[0]
    assert not verify_store(store).ok


# --------------------------------------------------------------------------- repair tools


def test_recover_keeps_proven_blocks(tmp_path: Path) -> None:
    """A damaged column block loses its own records only; recover keeps every other record."""
    batch = _tokens(40)
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=600, max_shard_bytes=2500)
    reader = ts.open_store(tmp_path / "s")
    assert reader.info().shards > 1
    footer = reader._footer(1)
    lost = {reader.index.shards[1].first_record + k for k in np.flatnonzero(footer.record_map["frame"] == 0)}
    path = tmp_path / "s" / reader.index.shards[1].name
    data = bytearray(path.read_bytes())
    data[int(footer.table["offset"][0]) + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    report = ts.recover_store(tmp_path / "s")
    assert report is not None
    after = ts.open_store(tmp_path / "s")
    assert len(after) == len(batch) - len(lost)
    kept = [i for i in range(len(batch)) if i not in lost]
    for j, i in enumerate(kept):
        assert after.read_bytes(j) == dumps(batch[i])
    assert "columnar-frames" in after.index.features
    assert verify_store(tmp_path / "s", deep=True).ok


def test_recover_without_index(tmp_path: Path) -> None:
    batch = _tokens(30)
    ts.write_store(batch, tmp_path / "s", compact=True, max_shard_bytes=3000)
    (tmp_path / "s" / "index.json").unlink()
    ts.recover_store(tmp_path / "s")
    after = ts.open_store(tmp_path / "s")
    assert [after.read_bytes(i) for i in range(len(after))] == [dumps(s) for s in batch]


# --------------------------------------------------------------------------- coded record maps


def _map(frames: list[int], raws: list[int]) -> np.ndarray:
    m = np.zeros(len(raws), dtype=RECORD_MAP_DTYPE)
    m["frame"], m["raw"] = frames, raws
    offsets, at, prev = [], 0, None
    for f, n in zip(frames, raws):
        at = 0 if f != prev else at
        offsets.append(at)
        at += n
        prev = f
    m["raw_offset"] = offsets
    return m


def test_record_map_coding_round_trip() -> None:
    rng = np.random.default_rng(0)
    raws = rng.integers(1, 5000, 3000).tolist()
    m = _map(sorted(rng.integers(0, 40, 3000).tolist()), raws)
    coded = fmt.encode_record_map(m)
    assert coded is not None and len(coded) < m.nbytes / 4
    back = fmt.decode_record_map(coded, len(m), "t")
    assert back.tobytes() == m.tobytes()
    # Tiny maps stay plain: coding them would not save the key's bytes.
    assert fmt.encode_record_map(_map([0], [100])) is None


def test_coded_map_in_small_record_store(tmp_path: Path) -> None:
    """The record map of a store of small records is coded: 24 bytes a record would be about
    as large as the records themselves."""
    batch = [(torch.tensor([i % 7], dtype=torch.uint8), torch.tensor(i % 3)) for i in range(3000)]
    ts.write_store(batch, tmp_path / "s", compact=True)
    data, table, rmap, meta = _shard_parts(next((tmp_path / "s").glob("*.tspt")))
    assert meta["record_map_bytes"] < rmap.nbytes / 20
    info = ts.open_store(tmp_path / "s").info()
    assert info.file_bytes < 3000 * 24 / 4
    reader = ts.open_store(tmp_path / "s")
    for i in (0, 1, 1234, 2999):
        assert reader.read_bytes(i) == dumps(batch[i])
    assert [int(s[0][0]) for s in reader] == [i % 7 for i in range(3000)]


@pytest.mark.parametrize(
    "kind,message",
    [
        ("bytes-lie", "footer is"),
        ("not-an-int", "record_map_bytes"),
        ("zero", "record_map_bytes"),
        ("garbage", "coded record map is damaged"),
        ("wrong-content-size", "declares"),
        ("ratio", "do not fit"),  # the trailer check applies the same bound first
    ],
)
def test_hostile_coded_record_map(tmp_path: Path, kind: str, message: str) -> None:
    import zstandard as zstd

    batch = [(torch.tensor([i % 7], dtype=torch.uint8), torch.tensor(i % 3)) for i in range(2000)]
    ts.write_store(batch, tmp_path / "s", compact=True)
    path = next((tmp_path / "s").glob("*.tspt"))
    data, table, rmap, meta = _shard_parts(path)
    table_offset = int(table["offset"][-1] + table["stored"][-1])
    coded = data[table_offset + 32 * len(table) : table_offset + 32 * len(table) + meta["record_map_bytes"]]
    if kind == "bytes-lie":
        meta["record_map_bytes"] += 1
    elif kind == "not-an-int":
        meta["record_map_bytes"] = "12"
    elif kind == "zero":
        meta["record_map_bytes"] = 0
    elif kind == "garbage":
        coded = bytes(len(coded))
    elif kind == "wrong-content-size":
        coded = zstd.ZstdCompressor(write_content_size=True).compress(b"\0" * (24 * len(rmap) - 8))
        meta["record_map_bytes"] = len(coded)
    elif kind == "ratio":  # a map that decodes to far more than 256x its bytes (1 MiB slack aside)
        big = np.zeros(100_000, dtype=RECORD_MAP_DTYPE)
        coded = zstd.ZstdCompressor(write_content_size=True).compress(big.tobytes())
        meta["record_map_bytes"] = len(coded)
        meta["records"] = len(big)
    js = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = table.tobytes() + coded
    count = meta["records"]
    trailer = struct.pack("<QQQQ8s", table_offset, count, len(js), ts.checksums.digest_int(body + js), b"TSPTFOOT")
    path.write_bytes(data[:table_offset] + body + js + trailer)
    size, _ = path.stat().st_size, None
    with pytest.raises(CorruptStoreError, match=message):
        shard_footer(path)
    assert size > 0


def shard_footer(path: Path):
    data = path.read_bytes()
    table_offset, count, js, checksum = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    return fmt.parse_footer(data[table_offset:-TRAILER_BYTES], table_offset, count, checksum, str(path), js)


def test_v13_fixtures_hold_blocks_raw_and_coded_maps() -> None:
    root = Path(__file__).parent / "fixtures" / "v1.3"
    seen = {}
    for store in sorted(p for p in root.iterdir() if p.is_dir()):
        reader = ts.open_store(store)
        footers = [reader._footer(si) for si in range(reader.info().shards)]
        seen[store.name] = (
            all(f.columnar_mask.all() for f in footers),
            any(f.raw_mask is not None for f in footers),
            any(
                "record_map_bytes" in (store / s.name).read_bytes()[-1500:].decode("latin-1")
                for s in reader.index.shards
            ),
        )
    assert seen == {
        "lz4-compact-raw": (True, True, True),
        "none-compact": (True, False, True),
        "zstd-compact": (True, False, True),
    }


def test_recover_lost_footer_reports_blocks(tmp_path: Path) -> None:
    """A compact shard whose footer is lost cannot be proven (no zip containers to find):
    recover keeps the other shards' records and reports that shard's records as lost."""
    batch = _tokens(30)
    ts.write_store(batch, tmp_path / "s", compact=True, frame_target_bytes=600, max_shard_bytes=2500)
    reader = ts.open_store(tmp_path / "s")
    shards = reader.index.shards
    assert len(shards) >= 3
    victim = shards[1]
    path = tmp_path / "s" / victim.name
    path.write_bytes(path.read_bytes()[:-10])  # the trailer is gone
    report = ts.recover_store(tmp_path / "s")
    after = ts.open_store(tmp_path / "s")
    lost = set(range(victim.first_record, victim.first_record + victim.records))
    kept = [i for i in range(len(batch)) if i not in lost]
    assert len(after) == len(kept)
    for j, i in enumerate(kept):
        assert after.read_bytes(j) == dumps(batch[i])
    outcome = next(o for o in report.shards if o.name == victim.name)
    assert (outcome.kept, outcome.lost) == (0, ((victim.first_record, victim.first_record + victim.records),))
    assert "column blocks of format 1.3" in outcome.reason


def test_bad_record_metadata_in_store(tmp_path: Path) -> None:
    """One record's metadata is junk behind a valid checksum: that record is refused on every
    read path, its neighbours read, and verify (not only deep) reports the frame."""
    store = _small_store(tmp_path)
    block, _, raws = _block(4)
    n, c = struct.unpack_from("<II", block, 8)
    junk = bytearray(block)
    junk[16 + 16 * c + 4 * n * c] = 9  # record 0's metadata version byte
    _rewrite_frame0(store, bytes(junk))
    reader = ts.open_store(store)
    with pytest.raises(RecordMetaError, match="record 0"):
        reader[0]
    with pytest.raises(RecordMetaError, match="record 0"):
        reader.read_bytes(0)
    assert reader.read_bytes(1) == raws[1]
    results = list(reader.iter_many([1, 0, 2]))
    assert [type(r.error) for r in results] == [type(None), RecordMetaError, type(None)]
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["record_decode"]


def test_cli_pack_compact_info_get_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorstore_pt.cli import main

    batch = _tokens(40)
    torch.save(batch, tmp_path / "t.pt")
    assert main(["pack", str(tmp_path / "t.pt"), str(tmp_path / "s"), "--compact", "-q"]) == 0
    reader = ts.open_store(tmp_path / "s")
    assert reader.info().format_version == (1, 3)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "frames are column blocks" in out
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["columnar_frames"] >= 1 and info["features"] == ["columnar-frames", "multi-record-frames"]
    assert main(["get", str(tmp_path / "s"), "7", "-o", str(tmp_path / "r7.pt")]) == 0
    assert (tmp_path / "r7.pt").read_bytes() == reader.read_bytes(7)
    assert_identical(torch.load(tmp_path / "r7.pt", weights_only=True), batch[7], "record 7", layout=False)
    assert main(["verify", str(tmp_path / "s"), "--deep"]) == 0
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "s")]) == 0
    assert "zstd-3+compact" in capsys.readouterr().out


# ---------------------------------------------------------------- a block's records loaded together


def _block_mix() -> list:
    """Records of several structures in one block: the ones the block-at-once path covers
    (tuples, dicts, lists, literal leaves, shapes that vary, storages of odd lengths before
    8-byte ones in a column) and ones it leaves to the one-by-one path (a tensor needing
    grad, an empty tensor, a None leaf)."""
    g = torch.Generator().manual_seed(11)
    out: list = []
    # (Records of one storage count share a block: the tuples form blocks, the dicts and
    # lists blocks of two structures.)
    out += [(torch.randint(0, 255, (8, 8), dtype=torch.uint8, generator=g), torch.tensor(i % 10)) for i in range(40)]
    for i in range(40):
        out.append({"tokens": torch.randint(0, 30000, (3 + i % 4,), generator=g), "id": i % 3, "text": f"s{i % 2}"})
        out.append([torch.randn(2, 3, generator=g).to(torch.float16), 2.5 * (i % 2), b"x" * (1 + i % 3), True])
    base = torch.arange(10, dtype=torch.int64)
    out += [
        {"view": base[3:7]},
        {"grad": torch.ones(3, requires_grad=True)},
        {"empty": torch.empty(0, 4)},
        {"none": None, "t": torch.tensor([1.0])},
        (torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor(5)),  # 3 bytes in column 0
        (torch.tensor([7, 8], dtype=torch.int32), torch.tensor(6)),  # int32 after them, off 4-byte bounds
    ]
    out += [(torch.tensor([i, i + 1], dtype=torch.int32), torch.tensor(i)) for i in range(20)]
    return out


def _spy_load_columns(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(records, records loaded together) of each block loaded at once."""
    calls: list[tuple[int, int]] = []
    real = fastload.load_columns

    def spy(pickles, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(pickles, *args, **kwargs)
        calls.append((len(pickles), 0 if out is None else sum(x is not fastload.DECLINED for x in out)))
        return out

    monkeypatch.setattr(fastload, "load_columns", spy)
    return calls


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_block_records_loaded_together_match_torch_load(
    tmp_path: Path, codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _block_mix()
    ts.write_store(batch, tmp_path / "s", codec=codec, compact=True)
    calls = _spy_load_columns(monkeypatch)
    passes = 3  # the first pass plans the pickles it has not seen; later ones reuse them (the
    # last is the one counted: the decoder's bounded caches may clear during another)
    for _ in range(passes):
        with ts.open_store(tmp_path / "s") as reader:
            got = list(reader)
        assert len(got) == len(batch)
        for i, sample in enumerate(got):
            assert_identical(_loaded(dumps(batch[i])), sample, f"record {i}")
    assert calls and len(calls) % passes == 0, "no block was loaded at once"
    together = sum(k for _, k in calls[-len(calls) // passes :])
    # Every record but the three it does not cover (needs grad, empty, a None leaf; the
    # writer stores the view's own bytes, so it is covered); at least the 120 regular ones.
    assert together >= 120, f"the last pass loaded only {together} records together: {calls}"
    assert together <= len(batch) - 3, "records the path does not cover were loaded together"


def test_block_samples_are_their_own(tmp_path: Path) -> None:
    """Each sample's tensors own their bytes: writing to one changes no other sample, no
    later read, and a record asked for twice in one request comes back as two objects."""
    batch = [(torch.full((4,), i, dtype=torch.int64), torch.tensor(i)) for i in range(50)]
    ts.write_store(batch, tmp_path / "s", codec="zstd", compact=True)
    with ts.open_store(tmp_path / "s") as reader:
        first = reader.read_many([3, 3, 4, 5])
        first[0][0].fill_(-1)
        assert first[1][0].tolist() == [3] * 4
        assert first[2][0].tolist() == [4] * 4
        assert first[0][0].untyped_storage().nbytes() == 32  # its own storage, as torch.load's
        assert all(t.data_ptr() % t.element_size() == 0 for sample in first for t in sample)
        assert first[0][0].untyped_storage().data_ptr() != first[2][0].untyped_storage().data_ptr()
        again = list(reader)
    assert [int(t[1]) for t in again] == list(range(50))
    assert again[3][0].tolist() == [3] * 4


def test_sample_written_to_does_not_change_a_repeat_of_it(tmp_path: Path) -> None:
    """A record asked for twice in one request, its first sample written to before the
    second is made: the second still holds the stored values (the block's columns are never
    handed to a sample)."""
    batch = [(torch.arange(i, i + 256, dtype=torch.float32) * 0.25, torch.tensor(i)) for i in range(40)]
    ts.write_store(batch, tmp_path / "s", codec="zstd", compact=True)
    with ts.open_store(tmp_path / "s") as reader:
        results = reader.iter_many([5, 6, 7, 5, 6])
        for res in results:
            assert res.error is None
            assert_identical(_loaded(dumps(batch[res.record])), res.sample, f"record {res.record}")
            res.sample[0].fill_(-1.0)  # before the repeat is made


def test_block_with_damaged_record_length_still_raises(tmp_path: Path) -> None:
    """A record whose rebuilt length disagrees with the record map is left to the
    one-by-one path, which raises for it; its block's other records still load."""
    batch = [(torch.arange(i, i + 4), torch.tensor(i)) for i in range(30)]
    ts.write_store(batch, tmp_path / "s", codec="zstd", compact=True)
    with ts.open_store(tmp_path / "s") as reader:
        footer = reader._footer(0)
        footer.record_map["raw"][7] += 1
        results = list(reader.iter_many(range(30)))
    assert isinstance(results[7].error, RecordLengthError)
    for res in results[:7] + results[8:]:
        assert res.error is None
        assert_identical(_loaded(dumps(batch[res.record])), res.sample, f"record {res.record}")


def test_collate_from_storage_views_plans_new_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``collate_records`` over ``(pickle, storage views)`` inputs (a column block's records,
    no copy): pickles like a validated one but for a literal are planned over the views'
    bytes, and the batch equals ``default_collate`` of ``torch.load`` of each record."""
    from torch.utils.data import default_collate

    g = torch.Generator().manual_seed(5)
    batch = [{"x": torch.randint(0, 99, (2, 3), generator=g), "w": torch.rand(4, generator=g), "y": 1000 + i % 3}
             for i in range(12)]  # fmt: skip
    ts.write_store(batch, tmp_path / "s", codec="zstd", compact=True)
    planned: list[int] = []
    real = fastload._plan_one
    monkeypatch.setattr(fastload, "_plan_one", lambda buf, *a: planned.append(len(buf)) or real(buf, *a))
    monkeypatch.setattr(fastload, "_PLAN_BACKOFF", [0, 0])  # no back-off left over from other tests
    with ts.open_store(tmp_path / "s") as reader:
        block = reader._cached_frame(0, 0, 0)
        raws = reader._footer(0).record_map["raw"].tolist()
        assert (
            fastload.fast_loads_parts(*block.load_args(0, raws[0]), raws[0], block.constants) is not fastload.DECLINED
        )
        inputs = [block.collate_args(r, raws[r]) for r in range(1, 12)]
        assert all(isinstance(v, memoryview) for _, views in inputs for v in views)
        got = fastload.collate_records(inputs, lambda shape, dtype: torch.empty(shape, dtype=dtype), default_collate)
        expected = default_collate([_loaded(reader.read_bytes(r)) for r in range(1, 12)])
    assert got is not None and planned, "the views' pickles were not planned"
    assert all(n == 6 * 8 + 4 * 4 for n in planned)  # the storages joined: 48 + 16 bytes
    assert_identical(expected, got, "batch")


def test_filter_memo_tries_recent_winners_and_everything_again_periodically() -> None:
    """Between full choices (every FILTER_REUSE_BLOCKS blocks alike), a column tries only
    none and the two filters that did best; what it picks still beats none by the margin,
    and a column that stops compressing better filtered goes back to none at once."""
    calls: list[int] = []
    cctx = zstandard.ZstdCompressor(level=3)

    def compress(b: bytes) -> bytes:
        calls.append(len(b))
        return cctx.compress(b)

    ramp = np.arange(4096, dtype=np.int64).tobytes()  # delta-8 (or shuffle-8) codes it best
    noise = np.random.default_rng(0).integers(0, 256, 32768, dtype=np.uint8).tobytes()
    memo = columnar.FilterMemo()
    full = columnar.choose_filter(ramp, compress)
    assert full != (columnar.FILTER_NONE, 0)
    calls.clear()
    assert memo.choose(("k", 0), ramp, compress) == full
    assert len(calls) == 1 + len(columnar._CANDIDATES)  # none and every filter
    for _ in range(columnar.FILTER_REUSE_BLOCKS - 1):
        calls.clear()
        assert memo.choose(("k", 0), ramp, compress) == full
        assert len(calls) == 3  # none and the two best
    calls.clear()
    memo.choose(("k", 0), ramp, compress)
    assert len(calls) == 1 + len(columnar._CANDIDATES)  # tried in full again
    assert memo.choose(("k", 0), noise, compress) == (columnar.FILTER_NONE, 0)
    calls.clear()
    assert memo.choose(("other", 0), ramp, compress) == full  # another key: measured on its own
    assert len(calls) == 1 + len(columnar._CANDIDATES)


def test_compact_pack_measures_filters_less_with_the_same_bytes(tmp_path: Path) -> None:
    """Compact packing codes fewer filter samples with the memo than measuring every block
    in full, and writes a store within 1% of the bytes (and the same records)."""
    batch = [
        {
            "x": torch.arange(i, i + 2048, dtype=torch.int32),
            "y": torch.randn(512, generator=torch.Generator().manual_seed(i)),
        }
        for i in range(120)
    ]
    counts = {}
    sizes = {}
    for reuse in (0, columnar.FILTER_REUSE_BLOCKS):
        n = [0]
        real = columnar.choose_filter

        def counting(col, compress, *rest, real=real, n=n):  # type: ignore[no-untyped-def]
            def counted(b: bytes) -> bytes:
                n[0] += 1
                return compress(b)

            return real(col, counted, *rest)

        with (
            mock.patch.object(columnar, "FILTER_REUSE_BLOCKS", reuse),
            mock.patch.object(columnar, "choose_filter", counting),
        ):
            info = ts.write_store(batch, tmp_path / f"s{reuse}", codec="zstd", compact=True, frame_target_bytes=16384)
        counts[reuse], sizes[reuse] = n[0], info.file_bytes
        reader = ts.open_store(tmp_path / f"s{reuse}")
        for i in range(len(batch)):
            assert reader.read_bytes(i) == dumps(batch[i])
    assert counts[columnar.FILTER_REUSE_BLOCKS] < counts[0] / 2, counts
    assert sizes[columnar.FILTER_REUSE_BLOCKS] <= sizes[0] * 1.01, sizes


def test_meta_read_like_the_last_equals_a_full_parse(tmp_path: Path) -> None:
    """ColumnBlock._meta reads a record laid out like the one before it at the same offsets
    (name hash, CRC-32s, pickle); each result equals parse_meta's, whatever the archive name,
    the CRC-32s kept (storages of 64 KiB or more) and the sizes."""
    raws = []
    for i in range(12):
        sample = (torch.full((20000 if i % 3 else 4,), float(i)), torch.arange(3) + i)
        if i in (4, 5, 9):  # torch.save to a file names the archive after it
            path = tmp_path / f"rec{i}.pt"
            torch.save(sample, path)
            raws.append(path.read_bytes())
        else:
            raws.append(dumps(sample))
    parts = [_ptzip.prove(raw) for raw in raws]
    assert all(p is not None for p in parts)
    assert {p.archive for p in parts} != {"archive"}, "no record with another archive name"
    assert any(c is not None for p in parts for c in p.crcs), "no record keeps a CRC-32"
    block = columnar.ColumnBlock(columnar.encode_block(parts, None), parts[0].layout, len(parts), "t")
    for r, p in enumerate(parts):
        archive, pickle, name_hash, crcs, sizes, _ = block._meta(r)
        assert (archive, bytes(pickle), name_hash, tuple(crcs), list(sizes)) == (
            p.archive,
            bytes(p.pickle),
            p.name_hash,
            tuple(p.crcs),
            [len(s) for s in p.storages],
        ), f"record {r}"
        assert _ptzip.rebuild(block.parts(r)) == raws[r]
