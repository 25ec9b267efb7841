"""Faults found by a fresh-eyed review, each fixed as a class and pinned here."""

from __future__ import annotations

import collections
import json
import os
import threading

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
from _store_tools import shard_names
from tensorstore_pt.cli import main


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_second_writer_is_refused_at_once_and_never_clobbers(tmp_path, mode):
    d = tmp_path / "s"
    ts.write_store([torch.zeros(4)], d, codec="none")
    with ts.ShardWriter(d, mode="append") as first:
        first.write(torch.full((4,), 1.0))
        with pytest.raises(ts.StoreBusyError, match=rf"locked by process {os.getpid()} on host .*mode 'append'"):
            ts.ShardWriter(d, mode=mode)
        with pytest.raises(ts.StoreBusyError):
            ts.recover_store(d)
    reader = ts.open_store(d)
    reader.verify()
    assert [float(x[0]) for x in reader] == [0.0, 1.0]
    with ts.ShardWriter(d, mode="append") as again:  # the lock was released at commit
        again.write(torch.full((4,), 2.0))
    assert len(ts.open_store(d)) == 3


def test_second_writer_detected_at_index_commit(tmp_path):
    """Where the lock cannot exclude (a file system without locks, or a tool that edits the
    index by hand), the index compare before the commit still refuses to publish."""
    d = tmp_path / "s"
    ts.write_store([torch.zeros(1)], d)
    late = ts.ShardWriter(d, mode="append")
    late.write(torch.ones(1))
    # Another writer rewrites the index meanwhile (here: by hand, a metadata edit).
    index = json.loads((d / "index.json").read_text())
    index["metadata"] = {"edited": True}
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(ts.ConcurrentWriteError, match="index.json of .* was changed by another writer"):
        late.close()
    assert [float(x[0]) for x in ts.open_store(d)] == [0.0]
    assert sorted(p.name for p in d.iterdir() if p.name != ".tspt-lock") == ["index.json", shard_names(d)[0]]
    assert (d / ".tspt-lock").stat().st_size == 0  # a clean end (abort) cleared the owner record


def test_counter_and_non_canonical_bool_bytes_round_trip(tmp_path):
    odd_bool = torch.tensor([0, 1, 2, 200], dtype=torch.uint8).view(torch.bool)
    samples = [collections.Counter(a=3, b=1), odd_bool, odd_bool[1:], {"c": collections.Counter("hello")}]
    ts.write_store(samples, tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    assert reader[0] == collections.Counter(a=3, b=1) and type(reader[0]) is collections.Counter
    assert reader[1].view(torch.uint8).tolist() == [0, 1, 2, 200]
    assert reader[2].view(torch.uint8).tolist() == [1, 2, 200]
    assert reader[3]["c"]["l"] == 2


def test_tensor_torch_cannot_copy_is_a_typed_refusal(tmp_path):
    with pytest.raises(ts.UnsupportedSampleError, match="cannot be copied"):
        ts.write_store([torch.zeros(8, dtype=torch.uint1)], tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("victim", ["index.json", "the shard"])
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_store_files_are_refused_without_hanging(tmp_path, victim, kind):
    d = tmp_path / "s"
    ts.write_store([torch.arange(10)], d)
    victim = shard_names(d)[0] if victim == "the shard" else victim
    (d / victim).unlink()
    if kind == "fifo":
        os.mkfifo(d / victim)
    else:
        (d / victim).mkdir()
    result: dict = {}

    def attempt():
        try:
            ts.open_store(d)
        except Exception as exc:  # noqa: BLE001 - the type is checked below
            result["exc"] = exc

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "open_store hung"
    assert isinstance(result.get("exc"), ts.NotARegularFileError), result
    assert f"is a {kind}; expected a regular file" in str(result["exc"]).lower()
    assert main(["verify", str(d)]) == 1


def test_json_with_huge_ints_or_nan_is_an_index_format_error(tmp_path):
    d = tmp_path / "s"
    ts.write_store([torch.ones(1)], d)
    good = (d / "index.json").read_text()
    (d / "index.json").write_text(good.replace('"records": 1,', '"records": ' + "9" * 5000 + ",", 1))
    with pytest.raises(ts.IndexFormatError, match="not valid UTF-8 JSON"):
        ts.open_store(d)
    obj = json.loads(good)
    obj["metadata"] = {"x": float("nan")}
    (d / "index.json").write_text(json.dumps(obj))
    with pytest.raises(ts.IndexFormatError, match="NaN is not JSON"):
        ts.open_store(d)
    obj["metadata"] = {}
    obj["shards"][0]["name"] += "\n"
    (d / "index.json").write_text(json.dumps(obj))
    with pytest.raises(ts.IndexFormatError, match="plain shard file name"):
        ts.open_store(d)
    obj["shards"][0]["name"] = obj["shards"][0]["name"].strip()
    obj["codec"]["level"] = 3.5
    (d / "index.json").write_text(json.dumps(obj))
    with pytest.raises(ts.IndexFormatError, match=r"codec config .*zstd level: expected an int"):
        ts.open_store(d)


def test_store_path_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ts.InvalidOptionError, match="a part of the path is a file"):
        ts.write_store([torch.ones(1)], tmp_path / "afile" / "sub")


def test_reader_index_kinds(tmp_path):
    ts.write_store([torch.tensor(i) for i in range(5)], tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    assert int(reader[torch.tensor(3)]) == 3
    assert int(reader[np.array(4)]) == 4
    assert [int(x) for x in reader[torch.tensor([1, 2])]] == [1, 2]
    with pytest.raises(ts.InvalidOptionError, match="non-zero step"):
        reader[::0]
    with pytest.raises(ts.InvalidOptionError, match="found str"):
        reader["3"]


def test_map_location_needing_cuda_is_an_option_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # pragma: no cover
    ts.write_store([torch.ones(1)], tmp_path / "s")
    with pytest.raises(ts.InvalidOptionError, match="needs CUDA"):
        ts.open_store(tmp_path / "s", map_location="cuda")
    with pytest.raises(ts.InvalidOptionError, match="expected a device"):
        ts.open_store(tmp_path / "s", map_location="gpu-please")


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_large_record_decodes_into_its_own_writable_buffer(tmp_path, codec):
    big = torch.arange(5 * 2**20, dtype=torch.float32)  # 20 MiB: zstd streams into the buffer
    ts.write_store([big, {"x": big[:10]}], tmp_path / "s", codec=codec)
    reader = ts.open_store(tmp_path / "s")
    a, b = reader[0], reader[0]
    assert torch.equal(a, big) and torch.equal(b, big)
    a[0] = -1.0  # writable, and two reads never share memory
    assert b[0] == 0.0 and reader[0][0] == 0.0
    assert reader.read_bytes(0) == reader.read_bytes(0)


@pytest.mark.parametrize(
    "leaf, match",
    [(b"", r"empty bytes \(b''\) cannot be loaded"), (2**2100, "an int of 2101 bits cannot be loaded")],
    ids=["empty-bytes", "huge-int"],
)
def test_leaves_weights_only_cannot_read_back_are_refused_at_write(tmp_path, leaf, match):
    with pytest.raises(ts.UnsupportedSampleError, match=match):
        ts.write_store([{"meta": [leaf]}], tmp_path / "s")


def test_undecodable_record_names_its_place(tmp_path):
    """A checksum-valid record that is not a torch.save buffer (a hostile writer)."""
    from tensorstore_pt.writer import ShardWriter

    import tensorstore_pt.writer as writer_mod

    real = writer_mod.dumps
    writer_mod.dumps = lambda sample: b"PK\x03\x04" + b"\x00" * 60  # a broken zip
    try:
        with ShardWriter(tmp_path / "s", codec="none") as w:
            w.write(torch.ones(1))
    finally:
        writer_mod.dumps = real
    with pytest.raises(
        ts.RecordDecodeError,
        match=r"shard 'shard-[0-9a-f]{12}-00000.tspt', record 0: the record's zip layout \(64 bytes\) is not what torch.save writes",
    ):
        ts.open_store(tmp_path / "s")[0]
