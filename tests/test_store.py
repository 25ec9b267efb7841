"""Core store: round trips, shard roll-over, modes, atomicity, paths, errors."""

from __future__ import annotations

import collections
import io
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
from strategies import assert_identical
from tensorstore_pt.format import HEADER_BYTES, RECORD_ENTRY_BYTES, TRAILER_BYTES
from tensorstore_pt.serialization import dumps

CODECS = ["none", "lz4", "zstd"]


def assert_same(a, b, where="sample"):
    """Values, dtypes, shapes, container types bit-exact (the writer may compact views)."""
    assert_identical(a, b, where, layout=False)


def _every_dtype_tensor(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (3 * 5 * 2 * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2  # only 0 and 1 are valid bool bytes
    return raw.view(dtype).reshape(3, 5, 2)


DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
    torch.complex64, torch.complex128, torch.bool,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]  # fmt: skip


def _sample_kinds():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]])
    return {
        "scalar-0dim": torch.tensor(3.25),
        "empty": torch.empty(0, 7, dtype=torch.int16),
        "transpose": base.t(),
        "step-slice": base[:, ::2],
        "sparse-coo": dense.to_sparse(),
        "sparse-csr": dense.to_sparse_csr(),
        "tuple": (torch.ones(2, 2), torch.tensor(7)),
        "list": [torch.zeros(3), torch.tensor([1, 2])],
        "dict": {"image": torch.ones(1, 4, 4, dtype=torch.uint8), "label": torch.tensor(2)},
        "nested-leaves": {
            "x": [torch.ones(2), (torch.tensor(1), None)],
            "meta": {"id": 17, "score": 0.5, "ok": True, "name": "ünï", "blob": b"\x00\xff", "none": None},
        },
        "ordereddict": collections.OrderedDict(a=torch.ones(1), b=torch.zeros(1)),
        "requires-grad": torch.ones(3, requires_grad=True),
    }


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_dtype_round_trips_bit_exact(tmp_path, codec, dtype):
    t = _every_dtype_tensor(dtype)
    samples = [t, t[1], t.transpose(0, 1), t[:, ::2]]
    ts.write_store(samples, tmp_path / "s", codec=codec)
    reader = ts.open_store(tmp_path / "s")
    assert len(reader) == len(samples)
    for i, s in enumerate(samples):
        assert_same(s, reader[i], f"record {i}")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", list(_sample_kinds()))
def test_sample_kinds_round_trip(tmp_path, codec, kind):
    sample = _sample_kinds()[kind]
    ts.write_store([sample, sample], tmp_path / "s", codec=codec)
    reader = ts.open_store(tmp_path / "s")
    assert_same(sample, reader[0])
    assert_same(sample, reader[-1])


def test_record_bytes_are_a_plain_torch_save_file(tmp_path):
    sample = {"a": torch.arange(10), "b": (torch.ones(2, 2),)}
    ts.write_store([sample], tmp_path / "s")
    raw = ts.open_store(tmp_path / "s").read_bytes(0)
    buf = io.BytesIO()
    torch.save(sample, buf)
    assert raw == buf.getvalue()
    out = tmp_path / "rec.pt"
    out.write_bytes(raw)
    assert_same(sample, torch.load(out, weights_only=True))


def test_views_are_compacted(tmp_path):
    big = torch.randn(10_000_000)  # 40 MB
    samples = [big[i * 10 : i * 10 + 10] for i in range(100)]
    info = ts.write_store(samples, tmp_path / "s", codec="none")
    assert info.raw_bytes < 100 * 2_000, info.raw_bytes  # ~1.3 KB each, not 40 MB each
    reader = ts.open_store(tmp_path / "s")
    for i in (0, 57, 99):
        assert_same(samples[i].clone(), reader[i])


def test_write_snapshots_the_sample(tmp_path):
    buf = torch.zeros(4)
    with ts.ShardWriter(tmp_path / "s") as w:
        for i in range(20):
            buf.fill_(i)
            w.write(buf)
    reader = ts.open_store(tmp_path / "s")
    assert [float(reader[i][0]) for i in range(20)] == [float(i) for i in range(20)]


@pytest.mark.parametrize(
    "options", [{}, {"compact": True}, {"num_workers": 2, "start_method": "fork"}], ids=["plain", "compact", "workers"]
)
def test_a_tensor_twice_in_a_sample_is_stored_once(tmp_path, options):
    """The snapshot copies a tensor that appears twice in a sample once, so the record is
    torch.save's bytes of the sample (one storage, not two) and its loaded tensors share it;
    changing the tensor after write does not reach the store."""
    x = torch.arange(5000, dtype=torch.float32)
    y = torch.ones(3, dtype=torch.int64)
    sample = {"a": x, "b": x, "c": [y, (y, x)]}
    want = dumps(sample)
    with ts.ShardWriter(tmp_path / "s", **options) as w:
        w.write(sample)
        x.add_(1)
    x.sub_(1)
    reader = ts.open_store(tmp_path / "s")
    assert reader.read_bytes(0) == want
    got = reader[0]
    assert torch.equal(got["a"], x) and torch.equal(got["c"][1][0], y)
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    assert got["c"][1][1].untyped_storage().data_ptr() == got["a"].untyped_storage().data_ptr()


def test_slices_lists_iteration_and_metadata(tmp_path):
    samples = [torch.tensor(i) for i in range(30)]
    ts.write_store(samples, tmp_path / "s", max_shard_bytes=4096, metadata={"split": "train", "n": 30})
    reader = ts.open_store(tmp_path / "s")
    assert reader.info().shards > 1
    assert [int(x) for x in reader[5:9]] == [5, 6, 7, 8]
    assert [int(x) for x in reader[::-7]] == [29, 22, 15, 8, 1]
    assert [int(x) for x in reader[[3, -1, 0]]] == [3, 29, 0]
    assert [int(x) for x in reader[np.array([2, 4])]] == [2, 4]
    assert [int(x) for x in reader] == list(range(30))
    assert reader.metadata == {"split": "train", "n": 30}
    assert reader.info().records == 30
    bounds = reader.shard_bounds()
    assert bounds[0, 0] == 0 and bounds[-1, 1] == 30 and np.all(bounds[1:, 0] == bounds[:-1, 1])


# ------------------------------------------------------------------ shard roll-over


def _shard_sizes(path: Path) -> list[int]:
    index = json.loads((path / "index.json").read_text())
    return [s["file_bytes"] for s in index["shards"]], [s["records"] for s in index["shards"]]


def test_roll_over_exactly_at_the_cap(tmp_path):
    samples = [torch.full((100,), i, dtype=torch.uint8) for i in range(9)]
    ts.write_store(samples[:3], tmp_path / "probe", codec="none")
    (one_shard_bytes,), _ = _shard_sizes(tmp_path / "probe")
    # A cap equal to the size of a 3-record shard holds exactly 3 records per shard.
    ts.write_store(samples, tmp_path / "s", codec="none", max_shard_bytes=one_shard_bytes)
    sizes, counts = _shard_sizes(tmp_path / "s")
    assert counts == [3, 3, 3]
    assert max(sizes) == one_shard_bytes
    # One byte less and only 2 fit.
    ts.write_store(samples, tmp_path / "s2", codec="none", max_shard_bytes=one_shard_bytes - 1)
    assert _shard_sizes(tmp_path / "s2")[1] == [2, 2, 2, 2, 1]
    for name in ("s", "s2"):
        assert [int(x[0]) for x in ts.open_store(tmp_path / name)] == list(range(9))


def test_oversize_record_gets_its_own_shard(tmp_path):
    small = torch.zeros(10, dtype=torch.uint8)
    huge = torch.arange(50_000, dtype=torch.int64)
    ts.write_store([small, small, huge, small], tmp_path / "s", codec="none", max_shard_bytes=20_000)
    sizes, counts = _shard_sizes(tmp_path / "s")
    assert counts == [2, 1, 1]
    assert sizes[1] > 20_000
    assert all(s <= 20_000 for i, s in enumerate(sizes) if i != 1)
    assert_same(huge, ts.open_store(tmp_path / "s")[2])


def test_one_record_per_shard(tmp_path):
    samples = [torch.tensor([i]) for i in range(5)]
    ts.write_store(samples, tmp_path / "s", max_shard_bytes=1)
    sizes, counts = _shard_sizes(tmp_path / "s")
    assert counts == [1] * 5
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    # names: shard-<this writer's token>-<seq>.tspt, seq from 0
    names = [n for n in files if n.endswith(".tspt")]
    assert len({n.split("-")[1] for n in names}) == 1, names
    assert files == [".tspt-lock", "index.json"] + [f"shard-{names[0].split('-')[1]}-{i:05d}.tspt" for i in range(5)]
    for size, p in zip(sizes, files[2:]):
        assert (tmp_path / "s" / p).stat().st_size == size


def test_shard_layout_matches_the_spec(tmp_path):
    """Decode a shard by hand from docs/format.md, independently of the reader."""
    import struct

    import xxhash

    samples = [torch.arange(i + 1) for i in range(4)]
    ts.write_store(samples, tmp_path / "s", codec="zstd")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    shard = index["shards"][0]
    data = (tmp_path / "s" / shard["name"]).read_bytes()
    assert len(data) == shard["file_bytes"]
    assert shard["checksum"] == "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)
    assert data[:8] == b"TSPTSHRD" and struct.unpack("<HHI", data[8:16]) == (1, 0, 0)
    table_offset, count, js_bytes, footer_sum, magic = struct.unpack("<QQQQ8s", data[-TRAILER_BYTES:])
    assert magic == b"TSPTFOOT" and count == 4
    assert table_offset + count * RECORD_ENTRY_BYTES + js_bytes + TRAILER_BYTES == len(data)
    body = data[table_offset : table_offset + count * RECORD_ENTRY_BYTES + js_bytes]
    assert xxhash.xxh3_64_intdigest(body) == footer_sum
    footer = json.loads(body[count * RECORD_ENTRY_BYTES :])
    assert footer["codec"] == {"id": "zstd", "level": 3} and footer["records"] == 4
    import zstandard

    pos = HEADER_BYTES
    for k in range(count):
        off, stored, raw, digest = struct.unpack_from("<QQQQ", body, k * RECORD_ENTRY_BYTES)
        assert off == pos
        frame = data[off : off + stored]
        assert xxhash.xxh3_64_intdigest(frame) == digest
        assert zstandard.frame_content_size(frame) == raw
        assert_same(samples[k], torch.load(io.BytesIO(zstandard.decompress(frame)), weights_only=True))
        pos += stored
    assert pos == table_offset
    assert index["totals"] == {
        "records": 4,
        "shards": 1,
        "stored_bytes": shard["stored_bytes"],
        "raw_bytes": shard["raw_bytes"],
        "file_bytes": len(data),
    }


# ------------------------------------------------------------------ modes and atomicity


def _snapshot_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_append_adds_records_after_the_existing_ones(tmp_path):
    ts.write_store([torch.tensor(i) for i in range(3)], tmp_path / "s", metadata={"a": 1})
    ts.write_store([torch.tensor(i) for i in range(3, 5)], tmp_path / "s", mode="append", metadata={"b": 2})
    reader = ts.open_store(tmp_path / "s")
    assert [int(x) for x in reader] == [0, 1, 2, 3, 4]
    assert reader.metadata == {"a": 1, "b": 2}
    assert reader.info().shards == 2


def test_append_refuses_another_codec(tmp_path):
    ts.write_store([torch.tensor(1)], tmp_path / "s", codec="lz4")
    with pytest.raises(ts.InvalidOptionError, match=r"uses codec \{'id': 'lz4'.*found codec='zstd'"):
        ts.ShardWriter(tmp_path / "s", mode="append", codec="zstd")


def test_overwrite_replaces_and_removes_old_shards(tmp_path):
    ts.write_store([torch.tensor(i) for i in range(3)], tmp_path / "s")
    ts.write_store([torch.tensor(9)], tmp_path / "s", mode="overwrite", codec="lz4")
    reader = ts.open_store(tmp_path / "s")
    assert [int(x) for x in reader] == [9]
    assert reader.info().codec == {"id": "lz4", "level": 0}
    new_name = reader.index.shards[0].name
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".tspt-lock", "index.json", new_name]


def test_create_refuses_an_existing_store_and_a_non_empty_dir(tmp_path):
    ts.write_store([torch.tensor(1)], tmp_path / "s")
    with pytest.raises(ts.StoreExistsError, match="a store already exists"):
        ts.write_store([torch.tensor(2)], tmp_path / "s")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"is not empty \(1 files, e.g. 'notes.txt'\)"):
        ts.write_store([torch.tensor(2)], tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "x"


class Boom(Exception):
    pass


@pytest.mark.parametrize("mode", ["create", "append", "overwrite"])
def test_exception_in_with_body_publishes_nothing(tmp_path, mode):
    path = tmp_path / "s"
    if mode != "create":
        ts.write_store([torch.tensor(i) for i in range(5)], path, max_shard_bytes=2048)
        before = _snapshot_dir(path)
    with pytest.raises(Boom):
        with ts.ShardWriter(path, mode=mode, max_shard_bytes=2048) as w:
            for i in range(50):  # enough to publish several shards before the failure
                w.write(torch.full((64,), i))
            raise Boom()
    if mode == "create":
        assert not path.exists()
    else:
        assert _snapshot_dir(path) == before
        assert [int(x) for x in ts.open_store(path)] == list(range(5))


def test_close_after_a_failed_write_publishes_nothing(tmp_path, monkeypatch):
    import tensorstore_pt.writer as writer_mod

    calls = {"n": 0}
    real = writer_mod.dumps

    def flaky(sample):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk on fire")
        return real(sample)

    monkeypatch.setattr(writer_mod, "dumps", flaky)
    w = ts.ShardWriter(tmp_path / "s", max_shard_bytes=1)
    with pytest.raises(OSError, match="disk on fire"):
        for i in range(50):
            w.write(torch.tensor(i))
    with pytest.raises(ts.WriterClosedError, match="failed earlier; nothing was published"):
        w.close()
    assert not (tmp_path / "s").exists()


def test_writer_after_failure_is_closed(tmp_path):
    w = ts.ShardWriter(tmp_path / "s")
    w.write(torch.tensor(1))
    w.abort()
    with pytest.raises(ts.WriterClosedError, match="is aborted"):
        w.write(torch.tensor(2))
    assert not (tmp_path / "s").exists()


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, tensorstore_pt as ts
    path, mode = sys.argv[1], sys.argv[2]
    with ts.ShardWriter(path, mode=mode, max_shard_bytes=4096, codec="zstd") as w:
        i = 0
        while True:
            w.write(torch.full((200,), i % 250, dtype=torch.uint8) + torch.randint(0, 3, (200,), dtype=torch.uint8))
            i += 1
            if i == 40:
                print("ready", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["create", "append", "overwrite"])
def test_sigkill_mid_pack_leaves_old_store_or_no_store(tmp_path, mode):
    path = tmp_path / "s"
    if mode != "create":
        ts.write_store([torch.tensor(i) for i in range(7)], path)
        before_index = (path / "index.json").read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)  # let it publish shards and be mid-shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if mode == "create":
        with pytest.raises(ts.NotAStoreError, match=r"shard file\(s\) but no index.*tspt recover"):
            ts.open_store(path)
    else:
        assert (path / "index.json").read_bytes() == before_index
        reader = ts.open_store(path)
        reader.verify()
        assert [int(x) for x in reader] == list(range(7))


# ------------------------------------------------------------------ paths


def test_non_ascii_paths_with_spaces_and_moved_store(tmp_path):
    path = tmp_path / "données d'entraînement ✓" / "store 1"
    samples = [{"x": torch.randn(3)} for _ in range(4)]
    ts.write_store(samples, path)
    moved = tmp_path / "elsewhere" / "日本語 store"
    moved.parent.mkdir()
    shutil.move(str(path), str(moved))
    reader = ts.open_store(moved)
    reader.verify()
    for i, s in enumerate(samples):
        assert_same(s, reader[i])


# ------------------------------------------------------------------ errors


def test_unsupported_sample_names_the_place_and_the_fix(tmp_path):
    with pytest.raises(ts.UnsupportedSampleError) as ei:
        ts.write_store([{"x": torch.ones(1), "meta": {"arr": np.zeros(3)}}], tmp_path / "s")
    assert 'sample["meta"]["arr"]: numpy.ndarray' in str(ei.value)
    assert "torch.from_numpy" in str(ei.value)
    assert isinstance(ei.value, TypeError)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "bad, where",
    [
        ((torch.ones(1), slice(1, 2)), "sample[1]: slice"),
        ([object()], "sample[0]: object"),
        (
            {"t": torch.ones(1).as_subclass(torch.nn.Buffer) if hasattr(torch.nn, "Buffer") else np.float32(1)},
            'sample["t"]',
        ),
        (collections.namedtuple("P", "a b")(1, 2), "sample: "),
    ],
    ids=["slice", "object", "subclass-or-npscalar", "namedtuple"],
)
def test_unsupported_sample_kinds(tmp_path, bad, where):
    with pytest.raises(ts.UnsupportedSampleError, match="weights_only") as ei:
        ts.write_store([bad], tmp_path / "s")
    assert where in str(ei.value)


def test_store_not_found_and_not_a_store(tmp_path):
    with pytest.raises(ts.StoreNotFoundError, match="the path does not exist") as ei:
        ts.open_store(tmp_path / "missing")
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ts.NotAStoreError, match="expected index.json in it$"):
        ts.open_store(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ts.NotAStoreError, match="is a file"):
        ts.open_store(tmp_path / "file")


def test_opening_a_store_reads_its_index_without_looking_at_the_path_first(tmp_path, monkeypatch):
    """On an object store every look at the path (exists, is_container) is a request of its
    own: a store that opens reads index.json at once, and only a failed read looks."""
    from tensorstore_pt.storage.local import LocalStorage

    ts.write_store([torch.tensor(1)], tmp_path / "s")
    looks = []
    for name in ("exists", "is_container"):
        real = getattr(LocalStorage, name)
        monkeypatch.setattr(LocalStorage, name, lambda self, _real=real, _name=name: looks.append(_name) or _real(self))
    assert len(ts.open_store(tmp_path / "s")) == 1
    assert looks == []
    with pytest.raises(ts.StoreNotFoundError):
        ts.open_store(tmp_path / "missing")
    assert looks == ["exists"]


def test_malformed_index_and_newer_version(tmp_path):
    ts.write_store([torch.tensor(1)], tmp_path / "s")
    index_path = tmp_path / "s" / "index.json"
    good = json.loads(index_path.read_text())
    index_path.write_text("{not json")
    with pytest.raises(ts.IndexFormatError, match="not valid UTF-8 JSON"):
        ts.open_store(tmp_path / "s")
    index_path.write_text(json.dumps({**good, "format_version": [2, 0]}))
    with pytest.raises(ts.UnsupportedFormatError, match=r"format version 2\.0 is not supported.*reads 1\.x"):
        ts.open_store(tmp_path / "s")
    index_path.write_text(json.dumps({**good, "format_version": [1, 7], "features": ["hologram-frames"]}))
    with pytest.raises(ts.UnsupportedFormatError, match=r"format 1\.7 uses feature\(s\) \['hologram-frames'\]"):
        ts.open_store(tmp_path / "s")
    index_path.write_text(json.dumps({**good, "codec": {"id": "zstd", "level": 3, "window_log": 27}}))
    with pytest.raises(ts.UnsupportedFormatError, match=r"unknown option\(s\) \['window_log'\]"):
        ts.open_store(tmp_path / "s")
    bad = json.loads(json.dumps(good))
    bad["shards"][0]["name"] = "../escape.tspt"
    index_path.write_text(json.dumps(bad))
    with pytest.raises(ts.IndexFormatError, match=r"plain shard file name.*'\.\./escape\.tspt'"):
        ts.open_store(tmp_path / "s")


def test_record_index_error(tmp_path):
    ts.write_store([torch.tensor(1), torch.tensor(2)], tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    with pytest.raises(ts.RecordIndexError, match="record 2 is out of range .* with 2 records") as ei:
        reader[2]
    assert isinstance(ei.value, IndexError)
    with pytest.raises(IndexError):
        reader[-3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codec": "brotli"}, r"codec: expected one of \['lz4', 'none', 'zstd'\], found 'brotli'"),
        ({"codec": "zstd", "level": 99}, r"zstd level: expected an int in \[-7, 22\], found 99"),
        ({"codec": "none", "level": 1}, "takes no level"),
        ({"max_shard_bytes": 0}, "max_shard_bytes: expected a positive int, found 0"),
        ({"mode": "replace"}, "mode: expected one of"),
        ({"metadata": {"x": object()}}, "metadata: expected a JSON-serialisable dict"),
    ],
)
def test_invalid_writer_options(tmp_path, kwargs, match):
    with pytest.raises(ts.InvalidOptionError, match=match):
        ts.ShardWriter(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def _damage(path: Path, name: str, fn) -> None:
    p = path / name
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(fn(data)))


def test_damage_raises_typed_errors(tmp_path):
    path = tmp_path / "s"
    ts.write_store([torch.arange(100) for _ in range(6)], path, max_shard_bytes=2000, codec="zstd")
    shards = [s["name"] for s in json.loads((path / "index.json").read_text())["shards"]]
    assert len(shards) >= 3

    def flip(data, at):
        data[at] ^= 0xFF
        return data

    _damage(path, shards[0], lambda d: flip(d, HEADER_BYTES + 5))  # inside the first frame
    reader = ts.open_store(path)
    with pytest.raises(
        ts.ChecksumMismatchError, match=rf"shard '{shards[0]}', record 0: checksum mismatch \(xxh3_64\)"
    ):
        reader[0]
    assert_same(torch.arange(100), reader[-1])  # other shards still read

    _damage(path, shards[1], lambda d: d[:-1])
    with pytest.raises(ts.ShardSizeError, match=r"expected \d+ bytes \(index\), found \d+ bytes on disk"):
        ts.open_store(path)
    (path / shards[1]).unlink()
    with pytest.raises(ts.MissingShardError, match="the shard file is missing"):
        ts.open_store(path)
    reader = ts.open_store(path, verify=False)
    with pytest.raises(ts.MissingShardError):
        reader[reader.shard_bounds()[1, 0]]

    _damage(path, shards[2], lambda d: d[:8] + b"XXXX" + d[12:])
    # A shard header whose version disagrees with the index's is damage (exit 1, skippable),
    # not an unsupported format: the index, not a shard, says which format the store is.
    with pytest.raises(ts.ShardFormatError, match="but the index says 1.0"):
        ts.open_store(path, verify=False)[int(ts.open_store(path, verify=False).shard_bounds()[2, 0])]


def test_hostile_frame_header_is_rejected_before_allocation(tmp_path):
    """A frame that declares a huge content size is refused against the footer's raw length."""
    import zstandard

    from tensorstore_pt.codecs import make_codec

    codec = make_codec("zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * 10_000_000)
    with pytest.raises(ts.DecompressionError, match="declares a content size of 10000000 bytes, expected 100 bytes"):
        codec.decompress(bomb, 100)
    lz = make_codec("lz4")
    frame = lz.compress(b"abc" * 1000)
    with pytest.raises(ts.DecompressionError, match="declares a content size of 3000 bytes, expected 10 bytes"):
        lz.decompress(frame, 10)
    with pytest.raises(ts.DecompressionError, match="trailing data|unused data"):
        lz.decompress(frame + frame, 3000)
    with pytest.raises(ts.DecompressionError):
        codec.decompress(codec.compress(b"x" * 100) + b"junk", 100)


def test_record_length_error_on_a_lying_footer(tmp_path):
    """A none-codec frame whose raw length in the footer is wrong is refused."""
    from tensorstore_pt.codecs import make_codec

    with pytest.raises(ts.DecompressionError, match="expected a frame of 5 bytes"):
        make_codec("none").decompress(b"abcdef", 5)
    assert issubclass(ts.RecordLengthError, ts.CorruptStoreError)


def test_reader_pickle_refuses_a_changed_store(tmp_path):
    import pickle

    ts.write_store([torch.tensor(1)], tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    blob = pickle.dumps(reader)
    assert int(pickle.loads(blob)[0]) == 1
    ts.write_store([torch.tensor(2)], tmp_path / "s", mode="overwrite")
    with pytest.raises(ts.StoreChangedError, match="was replaced since this reader was pickled"):
        pickle.loads(blob)
