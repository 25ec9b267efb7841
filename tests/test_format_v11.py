"""Format 1.1: zstd dictionaries and multi-record frames; 1.0 stays 1.0."""

from __future__ import annotations

import concurrent.futures as cf
import json

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt.format import RECORD_DTYPE, RECORD_MAP_DTYPE, encode_footer, parse_footer
from _store_tools import shard_names
from test_store import assert_same


def _samples(n=300):
    g = torch.Generator().manual_seed(3)
    return [
        {"image": torch.randint(0, 17, (8, 8), dtype=torch.uint8, generator=g), "label": torch.tensor(i % 10), "i": i}
        for i in range(n)
    ]


def _read_all(path):
    reader = ts.open_store(path)
    reader.verify()
    return reader, [reader[i] for i in range(len(reader))]


def test_plain_store_stays_version_1_0(tmp_path):
    ts.write_store(_samples(5), tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["format_version"] == [1, 0] and index["features"] == []
    assert (tmp_path / "s" / shard_names(tmp_path / "s")[0]).read_bytes()[8:10] == b"\x01\x00"


@pytest.mark.parametrize("frame_target_bytes", [1, 3000, 10**9], ids=["tiny", "few-records", "whole-shard"])
@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_multi_record_frames_round_trip(tmp_path, codec, frame_target_bytes):
    samples = _samples()
    info = ts.write_store(
        samples, tmp_path / "s", codec=codec, frame_target_bytes=frame_target_bytes, max_shard_bytes=64 * 1024
    )
    assert info.format_version == (1, 1)
    reader, got = _read_all(tmp_path / "s")
    assert reader.index.features == ("multi-record-frames",)
    for a, b in zip(samples, got):
        assert_same(a, b)
    # Random order and negative indices decode the right record, not the cached frame's neighbour.
    for i in np.random.default_rng(0).permutation(len(samples))[:50].tolist() + [-1, -300]:
        assert_same(samples[i], reader[i])
    assert reader.read_bytes(7) == ts.open_store(tmp_path / "s").read_bytes(7)


def test_frames_group_records_and_shrink_the_store(tmp_path):
    samples = _samples()
    plain = ts.write_store(samples, tmp_path / "plain")
    framed = ts.write_store(samples, tmp_path / "framed", frame_target_bytes=64 * 1024)
    assert framed.file_bytes < plain.file_bytes / 3
    reader = ts.open_store(tmp_path / "framed")
    footer = reader._footer(0)
    assert len(footer.table) < len(samples) / 10  # several records per frame
    assert footer.record_map is not None and len(footer.record_map) == footer.records


def test_frame_cache_is_per_thread(tmp_path):
    samples = _samples(200)
    ts.write_store(samples, tmp_path / "s", frame_target_bytes=2000)
    reader = ts.open_store(tmp_path / "s")
    expected = [ts.open_store(tmp_path / "s").read_bytes(i) for i in range(200)]
    order = np.random.default_rng(1).integers(0, 200, 2000).tolist()
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reader.read_bytes, order))
    assert got == [expected[i] for i in order]


def test_dictionary_round_trip_and_files(tmp_path):
    samples = _samples()
    info = ts.write_store(samples, tmp_path / "s", dictionary=True)
    assert info.format_version == (1, 1)
    assert set(info.codec) == {"id", "level", "dict"}
    ref = info.codec["dict"]
    dict_file = tmp_path / "s" / ref["name"]
    assert dict_file.stat().st_size == ref["bytes"]
    import xxhash
    import zstandard

    data = dict_file.read_bytes()
    assert ref["checksum"] == "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)
    assert zstandard.ZstdCompressionDict(data).dict_id() == ref["dict_id"]
    reader, got = _read_all(tmp_path / "s")
    for a, b in zip(samples, got):
        assert_same(a, b)
    # A frame really needs the dictionary: plain zstd cannot decode it.
    frame_row = reader._footer(0).table[0]
    frame = (tmp_path / "s" / shard_names(tmp_path / "s")[0]).read_bytes()[
        frame_row["offset"] : frame_row["offset"] + frame_row["stored"]
    ]
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(frame)


def test_dictionary_on_the_demo_dataset_is_5x_smaller_than_plain_zstd(tmp_path):
    from tensorstore_pt.demo import digits_samples

    samples = digits_samples()
    plain = ts.write_store(samples, tmp_path / "plain")
    ts.write_store(samples, tmp_path / "dict", dictionary=True)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "dict").iterdir() if p.name != "index.json")
    assert plain.file_bytes / on_disk >= 5.0, (plain.file_bytes, on_disk)


def test_dictionary_and_frames_combined_append_and_overwrite(tmp_path):
    samples = _samples()
    path = tmp_path / "s"
    ts.write_store(samples[:200], path, dictionary=True, frame_target_bytes=4096, max_shard_bytes=8192)
    first = json.loads((path / "index.json").read_text())
    ts.write_store(samples[200:], path, mode="append")  # the store's dictionary, one record per frame
    reader, got = _read_all(path)
    assert reader.index.codec == first["codec"]
    for a, b in zip(samples, got):
        assert_same(a, b)
    dict_name = first["codec"]["dict"]["name"]
    ts.write_store(samples[:3], path, mode="overwrite", codec="lz4")
    assert not (path / dict_name).exists()
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith("shard-")) == [".tspt-lock", "index.json"]


def test_dictionary_files_are_removed_on_abort(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ts.ShardWriter(tmp_path / "s", dictionary=True) as w:
            w.write_many(_samples(50))
            w._train_dictionary()  # force training before the failure
            raise RuntimeError("boom")
    assert not (tmp_path / "s").exists()


def test_dictionary_falls_back_with_a_warning_on_too_few_records(tmp_path):
    with pytest.warns(UserWarning, match="could not train a dictionary from 1 records"):
        info = ts.write_store([torch.ones(3)], tmp_path / "s", dictionary=True)
    assert info.format_version == (1, 0) and "dict" not in info.codec
    assert torch.equal(ts.open_store(tmp_path / "s")[0], torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codec": "lz4", "dictionary": True}, "only codec 'zstd' takes a dictionary"),
        ({"dictionary": 10}, r"dictionary: expected True, False or a size in bytes"),
        ({"frame_target_bytes": 0}, "frame_target_bytes: expected a positive int, found 0"),
    ],
)
def test_invalid_v11_options(tmp_path, kwargs, match):
    with pytest.raises(ts.InvalidOptionError, match=match):
        ts.ShardWriter(tmp_path / "s", **kwargs)


def test_append_cannot_add_a_dictionary(tmp_path):
    ts.write_store(_samples(3), tmp_path / "s")
    with pytest.raises(ts.InvalidOptionError, match="has no zstd dictionary"):
        ts.ShardWriter(tmp_path / "s", mode="append", dictionary=True)


def test_damaged_or_missing_dictionary(tmp_path):
    ts.write_store(_samples(100), tmp_path / "s", dictionary=True)
    name = json.loads((tmp_path / "s" / "index.json").read_text())["codec"]["dict"]["name"]
    data = bytearray((tmp_path / "s" / name).read_bytes())
    data[100] ^= 1
    (tmp_path / "s" / name).write_bytes(bytes(data))
    with pytest.raises(ts.ChecksumMismatchError, match=rf"dictionary file '{name}'"):
        ts.open_store(tmp_path / "s")
    (tmp_path / "s" / name).unlink()
    with pytest.raises(ts.MissingShardError, match=rf"file '{name}' named in the index is missing"):
        ts.open_store(tmp_path / "s")


def _footer_body(record_map):
    table = np.zeros(2, dtype=RECORD_DTYPE)
    table["offset"] = [16, 26]
    table["stored"] = [10, 10]
    table["raw"] = [30, 20]
    meta = {"format": "tensorstore_pt", "format_version": [1, 1], "features": ["multi-record-frames"],
            "records": len(record_map), "frames": 2}  # fmt: skip
    blob = encode_footer(table, meta, record_map)
    import struct

    table_offset, count, js, checksum, _ = struct.unpack("<QQQQ8s", blob[-40:])
    return blob[:-40], table_offset, count, checksum, js


@pytest.mark.parametrize(
    "rows, ok",
    [
        ([(0, 0, 10), (0, 10, 20), (1, 0, 20)], True),
        ([(0, 0, 10), (0, 12, 18), (1, 0, 20)], False),  # gap inside a frame
        ([(0, 0, 30), (1, 0, 25)], False),  # overruns the frame's raw size
        ([(0, 0, 30), (2, 0, 20)], False),  # frame index past the table
        ([(1, 0, 20), (0, 0, 30)], False),  # frames out of order
        ([(0, 0, 30)], False),  # a frame with no record
    ],
    ids=["valid", "gap", "overrun", "bad-frame", "unordered", "unused-frame"],
)
def test_record_map_validation(rows, ok):
    record_map = np.zeros(len(rows), dtype=RECORD_MAP_DTYPE)
    for k, (f, o, r) in enumerate(rows):
        record_map[k] = (f, o, r)
    body, table_offset, count, checksum, js = _footer_body(record_map)
    if ok:
        footer = parse_footer(body, table_offset, count, checksum, "t", js)
        assert footer.locate(1) == (0, 10, 20)
    else:
        with pytest.raises(ts.ShardFormatError, match="record map is inconsistent|'frames' must be an int in"):
            parse_footer(body, table_offset, count, checksum, "t", js)


def test_datasets_read_multi_record_frame_stores(tmp_path):
    from torch.utils.data import DataLoader

    samples = _samples(120)
    ts.write_store(samples, tmp_path / "s", frame_target_bytes=3000, max_shard_bytes=8192)
    ds = ts.StoreIterableDataset(tmp_path / "s", shuffle=True, seed=3)
    got = sorted(s["i"] for s in ds)
    assert got == list(range(120))
    loader = DataLoader(ts.StoreDataset(tmp_path / "s"), batch_size=16, num_workers=2)
    assert sorted(int(i) for b in loader for i in b["i"]) == list(range(120))
    with pytest.raises(ts.InvalidOptionError, match="has multi-record frames"):
        ts.open_store(tmp_path / "s").record_table()
