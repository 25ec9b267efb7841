"""Memory bounds under attack: files past a documented bound are refused before they are read.

format.md 6.1: ``index.json`` at most 256 MiB and a dictionary file at most 16 MiB, refused
*before allocating*. Every path that reads these files (reader, verify, writer append and
overwrite, merge) is checked here with a file one byte past the bound (sparse, so the test
writes nothing) and tracemalloc: a path that read the file first would allocate the whole
bound before refusing it.
"""

from __future__ import annotations

import json
import struct
import shutil
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from _store_tools import read_every_record_traced, reseal_index, same, samples

import tensorstore_pt as tspt
from tensorstore_pt.codecs import get_codec
from tensorstore_pt.codecs.registry import MAX_DICT_BYTES
from tensorstore_pt.errors import IndexFormatError, ShardSizeError
from tensorstore_pt.format import (
    INDEX_NAME,
    MAX_FOOTER_JSON_BYTES,
    MAX_INDEX_BYTES,
    RECORD_DTYPE,
    RECORD_MAP_DTYPE,
    TRAILER_BYTES,
    decode_trailer,
    encode_footer,
)

FIXTURES = Path(__file__).parent / "fixtures"
#: Peak Python allocation allowed while refusing an oversized file: far below the bounds
#: (256 MiB, 16 MiB) that reading the file would allocate.
REFUSE_PEAK = 4 * 2**20


def peak_of(fn: Callable[[], Any]) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        try:
            fn()
            err: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 - returned to the test
            err = exc
        return tracemalloc.get_traced_memory()[1], err
    finally:
        tracemalloc.stop()


def small_store(path: Path) -> Path:
    tspt.write_store([{"x": torch.arange(8)} for _ in range(3)], path, codec="zstd")
    return path


def grow(path: Path, size: int) -> None:
    """Make ``path`` exactly ``size`` bytes long (a sparse tail: nothing is written)."""
    with open(path, "r+b") as f:
        f.truncate(size)


def dict_store(tmp_path: Path) -> tuple[Path, Path]:
    dest = tmp_path / "dict-store"
    shutil.copytree(FIXTURES / "v1.1" / "zstd-dict", dest)
    ref = json.loads((dest / INDEX_NAME).read_text())["codec"]["dict"]
    return dest, dest / ref["name"]


# ---------------------------------------------------------------------------- index.json


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_writer_refuses_oversized_index_before_reading(tmp_path: Path, mode: str) -> None:
    store = small_store(tmp_path / "s")
    grow(store / INDEX_NAME, MAX_INDEX_BYTES + 1)

    def go() -> None:
        tspt.write_store([{"x": torch.arange(4)}], store, codec="zstd", mode=mode)

    peak, err = peak_of(go)
    if mode == "append":
        assert isinstance(err, IndexFormatError), err
        assert f"expected at most {MAX_INDEX_BYTES} bytes" in str(err)
    else:  # overwrite: an unreadable index is replaced wholesale
        assert err is None, err
        assert len(tspt.StoreReader(store)) == 1
    assert peak < REFUSE_PEAK, peak


def test_writer_index_exactly_at_bound_is_read(tmp_path: Path) -> None:
    """At the bound the file is read (and then refused as JSON): the bound is inclusive."""
    store = small_store(tmp_path / "s")
    grow(store / INDEX_NAME, 2**16)  # NUL padding: read, then not valid JSON
    with pytest.raises(IndexFormatError) as info:
        tspt.write_store([{"x": torch.arange(4)}], store, codec="zstd", mode="append")
    assert "expected at most" not in str(info.value)


def test_merge_refuses_oversized_part_index_before_reading(tmp_path: Path) -> None:
    a = small_store(tmp_path / "a")
    b = small_store(tmp_path / "b")
    grow(b / INDEX_NAME, MAX_INDEX_BYTES + 1)
    peak, err = peak_of(lambda: tspt.merge_stores([a, b], tmp_path / "m", copy=True))
    assert isinstance(err, IndexFormatError), err
    assert f"expected at most {MAX_INDEX_BYTES} bytes" in str(err)
    assert peak < REFUSE_PEAK, peak


# ---------------------------------------------------------------------------- dictionary file


@pytest.mark.parametrize("path", ["reader", "verify", "append", "merge"])
def test_oversized_dictionary_refused_before_reading(tmp_path: Path, path: str) -> None:
    store, dict_file = dict_store(tmp_path)
    grow(dict_file, MAX_DICT_BYTES + 1)  # one byte past the bound; the index still says its real size
    calls: dict[str, Callable[[], Any]] = {
        "reader": lambda: tspt.StoreReader(store),
        "verify": lambda: tspt.verify_store(store, deep=True),
        "append": lambda: tspt.write_store([{"x": torch.arange(4)}], store, codec="zstd", mode="append"),
        "merge": lambda: tspt.merge_stores([store], tmp_path / "m", copy=True),
    }
    peak, err = peak_of(calls[path])
    if path == "verify":
        assert err is None, err
        report = calls[path]()
        assert not report.ok
        assert "ShardSizeError" in str(report) or "16777216" in str(report)
    else:
        assert isinstance(err, (ShardSizeError, tspt.MissingShardError, tspt.ChecksumMismatchError)), err
        assert isinstance(err, ShardSizeError) or isinstance(err.__cause__, ShardSizeError), repr(err)
    assert peak < REFUSE_PEAK, peak


def test_dictionary_exactly_at_bound_is_read_then_refused_by_size(tmp_path: Path) -> None:
    store, dict_file = dict_store(tmp_path)
    grow(dict_file, MAX_DICT_BYTES)
    with pytest.raises(tspt.ChecksumMismatchError, match=f"found {MAX_DICT_BYTES} bytes"):
        tspt.StoreReader(store)


# ---------------------------------------------------------------------------- recover


def _zstd_rle_frame(blocks: int, block_size: int = 128 * 1024) -> bytes:
    """A zstd frame (RFC 8878) of ``blocks`` RLE blocks of ``block_size`` zero bytes: 4 stored
    bytes per block; the header declares the content size and a 128 KiB window."""
    out = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([3 << 6, (17 - 10) << 3])
    out += struct.pack("<Q", blocks * block_size)
    for i in range(blocks):
        out += struct.pack("<I", (i == blocks - 1) | (1 << 1) | (block_size << 3))[:3] + b"\0"
    return bytes(out)


def test_recover_rebuild_does_not_decode_past_max_record_bytes(tmp_path: Path, monkeypatch: Any) -> None:
    """A shard whose footer is lost is rebuilt by decoding its frames. The only bound was the
    index's raw_bytes (itself bounded by zstd's worst case, 43690:1): 2 KiB of RLE blocks
    decoded to 64 MiB (64 KiB of them would decode to 2 GiB). Now no frame decodes past
    DEFAULT_MAX_RECORD_BYTES (patched to 1 MiB here), as a reader would refuse it."""
    import tensorstore_pt.integrity  # noqa: F401 - imports recover (importing recover first is circular)
    import tensorstore_pt.recover as recover

    from _store_tools import build_store, shard_names, torch_save_bytes

    codec = {"id": "zstd", "level": 3}
    zstd = get_codec(codec)
    good = torch_save_bytes({"x": torch.arange(4)})
    bomb = _zstd_rle_frame(512)  # 2 KiB stored, 64 MiB raw
    store = build_store(tmp_path / "s", [[(len(good), zstd.compress(good)), (512 * 128 * 1024, bomb)]], codec)
    shard = store / shard_names(store)[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the trailer: the footer is lost, the index entry still describes the shard
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(recover, "DEFAULT_MAX_RECORD_BYTES", 2**20)
    peak, err = peak_of(lambda: tspt.recover_store(store, dry_run=True))
    assert err is None, err
    assert peak < REFUSE_PEAK, peak
    report = tspt.recover_store(store, dry_run=True)
    assert report.records == 1  # the good record is proven; the bomb proves nothing


# ---------------------------------------------------------------------------- remote


def test_remote_read_versioned_bounds_a_body_without_content_length(s3_bucket: Any, monkeypatch: Any) -> None:
    """``read_versioned(max_bytes=...)`` (index.json on S3) checked the bound against the
    answer's Content-Length only: a chunked answer without one was read whole first. Now such
    a body is read in pieces and refused once it passes the bound."""
    import boto3

    from tensorstore_pt.storage import storage_for

    bucket, options = s3_bucket
    boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1", **_keys()).put_object(
        Bucket=bucket, Key="store/index.json", Body=b"x" * 1000
    )
    st = storage_for(f"s3://{bucket}/store", options)
    assert st.conditional_writes
    asked: list[Any] = []
    orig = st.fs._call_s3

    async def no_length(method: str, *args: Any, **kwargs: Any) -> Any:
        resp = await orig(method, *args, **kwargs)
        if method == "get_object":
            resp.pop("ContentLength", None)
            body = resp["Body"]

            class Body:
                async def read(self, amt: int | None = None) -> bytes:
                    asked.append(amt)
                    return await body.read(amt) if amt is not None else await body.read()

                def close(self) -> None:
                    body.close()

            resp["Body"] = Body()
        return resp

    monkeypatch.setattr(st.fs, "_call_s3", no_length)
    with pytest.raises(ValueError, match="expected at most 100"):
        st.read_versioned("index.json", max_bytes=100)
    assert asked and all(a is not None and a <= 101 for a in asked), asked
    asked.clear()
    data, version = st.read_versioned("index.json", max_bytes=1000)  # exactly at the bound: read
    assert data == b"x" * 1000 and version
    assert None not in asked


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def test_remote_conditional_upload_does_not_read_a_larger_object_whole(s3_bucket: Any, monkeypatch: Any) -> None:
    """After a conditional PUT whose answer was lost, the retry's 412 is judged by reading the
    object back ("did my attempt land?"). That read had no bound: an object another writer put
    meanwhile (of any size) was read whole. Now it reads at most our own size; a larger object
    is another writer's (ConcurrentWriteError) without being read."""
    import boto3

    from tensorstore_pt.errors import ConcurrentWriteError
    from tensorstore_pt.storage import storage_for

    bucket, options = s3_bucket
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1", **_keys())
    client.put_object(Bucket=bucket, Key="store/index.json", Body=b"{}")
    st = storage_for(f"s3://{bucket}/store", options)
    _, version = st.read_versioned("index.json", max_bytes=100)
    real_call = st.call
    limits: list[Any] = []
    real_read_all = st.read_all

    def read_all(name: str, max_bytes: int | None = None) -> bytes:
        limits.append(max_bytes)
        return real_read_all(name, max_bytes)

    def call(what: str, name: Any, fn: Any, **kwargs: Any) -> Any:
        if what != "upload":
            return real_call(what, name, fn, **kwargs)
        # Another writer replaces the object with a large one; our answer was "lost".
        client.put_object(Bucket=bucket, Key="store/index.json", Body=b" " * 100_000)
        return kwargs["on_retry_error"](OSError("the first answer was lost"))

    monkeypatch.setattr(st, "read_all", read_all)
    monkeypatch.setattr(st, "call", call)
    with pytest.raises(ConcurrentWriteError):
        with st.writer("index.json", if_match=version) as out:
            out.write(b'{"a": 1}')
    assert limits == [8], limits  # bounded by our own 8 bytes


def test_cli_merge_does_not_read_an_oversized_part_index(tmp_path: Path, capsys: Any) -> None:
    """``tspt merge`` counted each part's records for its progress bar by reading the part's
    index.json whole (``Path.read_bytes``) before merge_stores checked anything."""
    from tensorstore_pt.cli import main

    a = small_store(tmp_path / "a")
    b = small_store(tmp_path / "b")
    grow(b / INDEX_NAME, MAX_INDEX_BYTES + 1)
    code: list[int] = []
    peak, err = peak_of(lambda: code.append(main(["merge", str(a), str(b), str(tmp_path / "m"), "--quiet"])))
    assert err is None, err
    assert code and code[0] != 0
    assert "expected at most" in capsys.readouterr().err
    assert peak < REFUSE_PEAK, peak


# ---------------------------------------------------------------------------- record counts


def _claim_records(store: Path, records: int) -> None:
    """Make the index claim ``records`` records for the last shard (file_bytes grown to fit the
    table those records would need, so the index itself is consistent); nothing else changes."""
    idx = json.loads((store / INDEX_NAME).read_text())
    s = idx["shards"][-1]
    add = records - s["records"]
    s["records"] = records
    s["file_bytes"] += add * 32
    idx["totals"]["records"] += add
    idx["totals"]["file_bytes"] += add * 32
    (store / INDEX_NAME).write_text(json.dumps(idx))


def test_record_table_reads_footers_before_allocating(tmp_path: Path) -> None:
    store = small_store(tmp_path / "s")
    _claim_records(store, 2**22)  # a 128 MiB table for a 2 KiB store
    reader = tspt.StoreReader(store, verify=False)
    assert len(reader) == 2**22
    peak, err = peak_of(reader.record_table)
    assert isinstance(err, (ShardSizeError, tspt.ShardFormatError)), err
    assert peak < REFUSE_PEAK, peak


def test_dataset_reads_footers_before_allocating_its_table(tmp_path: Path, monkeypatch: Any) -> None:
    """The dataset's shared frame table (32 bytes a record) was allocated, and filled with
    zeros into shared memory, from the index's record count before any footer was read: an
    index claiming 20 million records for a 2 KiB store took 611 MiB before it was refused."""
    store = small_store(tmp_path / "s")
    _claim_records(store, 2**22)
    shapes: list[Any] = []
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(args[0] if args else kwargs.get("size"))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises((ShardSizeError, tspt.ShardFormatError)):
        tspt.StoreIterableDataset(store, verify=False, cache_dir=tmp_path / "cache")
    assert not [s for s in shapes if isinstance(s, tuple) and s and s[0] >= 2**22], shapes


# ---------------------------------------------------------------------------- footer JSON


def _pad_footer_json(shard: Path, junk: Any) -> None:
    """Add a key a reader ignores, ``"junk": junk``, to a shard's footer JSON and re-seal the
    footer checksum (a consistent lie, as a hostile writer would make it)."""
    data = shard.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(shard))
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    frames = meta.get("frames", count)
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=frames, offset=table_offset)
    record_map = None
    if frames != count or "multi-record-frames" in meta["features"]:
        record_map = np.frombuffer(data, dtype=RECORD_MAP_DTYPE, count=count, offset=table_offset + frames * 32)
    meta["junk"] = junk
    shard.write_bytes(data[:table_offset] + encode_footer(table, meta, record_map))


@pytest.mark.parametrize("frames", ["one record a frame", "multi-record frames"])
def test_a_reader_keeps_none_of_the_footer_json_it_ignores(tmp_path: Path, frames: str) -> None:
    """A footer JSON may hold up to 1 MiB of keys a reader ignores; ``[[],[],...]`` parses to
    over 20 MiB of Python objects. The reader kept each shard's parsed JSON (and its tables as
    views of the footer's bytes) while open: per shard of a hostile store, that much. It keeps
    its checked tables and keys only."""
    store = tmp_path / "s"
    data = samples(12)
    extra = {"frame_target_bytes": 1_500} if frames == "multi-record frames" else {}
    tspt.write_store(data, store, codec="zstd", max_shard_bytes=2_500, **extra)
    shards = sorted(store.glob("*.tspt"))
    assert len(shards) >= 3, shards
    junk = [[] for _ in range((MAX_FOOTER_JSON_BYTES - 4096) // 3)]  # "[]," a list: 3 bytes of JSON
    for shard in shards:
        _pad_footer_json(shard, junk)
    reseal_index(store)
    del junk

    reader, got, held, peak = read_every_record_traced(store)
    assert len(got) == len(data) and all(same(a, b) for a, b in zip(got, data))
    assert peak > 16 * 2**20, peak  # the attack's cost while parsing one footer: real, and transient
    assert held < 2 * 2**20, f"{held} bytes held after reading {len(shards)} shards"
    kept = reader._footers[0]
    assert kept is not None and "junk" not in kept.meta and kept.table.base is None


def test_a_bulk_read_keeps_a_bounded_amount_of_decoded_frames(tmp_path: Path, monkeypatch: Any) -> None:
    """With multi-record frames, a bulk read kept every decoded frame that a later record of
    the piece still needed: records in an order that visits every frame before any frame's
    second record held all of them decoded at once, whatever their number (frames that compress
    well make that many times the bytes read). Past ``KEPT_FRAME_BYTES`` a frame is decoded again."""
    import tensorstore_pt.reader as reader_mod

    store = tmp_path / "s"
    per, rec_bytes = 4, 2**18
    data = [{"x": torch.full((rec_bytes,), i // per, dtype=torch.uint8)} for i in range(16 * per)]
    tspt.write_store(data, store, codec="zstd", frame_target_bytes=per * rec_bytes)
    reader = tspt.open_store(store, verify=False)
    frames = {(si, int(f)) for si in range(len(reader.index.shards)) for f in reader._footer(si).record_map["frame"]}
    assert len(frames) >= 12, frames  # multi-record frames, each about 1 MiB decoded
    order = [f * per + j for j in range(per) for f in range(len(data) // per)]  # every frame, then again
    monkeypatch.setattr(reader_mod, "KEPT_FRAME_BYTES", 2 * per * rec_bytes)

    def read_all() -> None:
        for res in reader.iter_many(order):
            assert res.error is None and torch.equal(res.sample["x"], data[res.record]["x"]), res.record

    peak, err = peak_of(read_all)
    assert err is None, err
    assert peak < 8 * 2**20, f"peak {peak} bytes for 2 MiB of kept frames"
