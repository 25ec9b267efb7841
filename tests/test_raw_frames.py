"""Frames stored raw (format 1.2, feature "raw-frames") and bounded dictionary training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from _store_tools import reseal_index, store_files

import tensorstore_pt as ts
from tensorstore_pt import format as fmt
from tensorstore_pt import shardio, writer
from tensorstore_pt.cli import _DEFAULT_RAW_BELOW
from tensorstore_pt.errors import CorruptStoreError, InvalidOptionError, ShardFormatError, UnsupportedFormatError
from tensorstore_pt.format import RECORD_DTYPE, TRAILER_BYTES, decode_trailer, encode_footer
from tensorstore_pt.integrity import verify_store
from tensorstore_pt.serialization import dumps


def _samples(n: int = 24) -> list:
    """Every third record is random bytes (no codec saves 5% on them), the others zeros."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"w": torch.randint(0, 256, (100_000,), dtype=torch.uint8, generator=g), "i": i})
        else:
            out.append({"z": torch.zeros(3000), "i": i})
    return out


def _noise(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8)


def _expected_raw(samples: list, codec: str, raw_below: float) -> list[bool]:
    """Which one-record frames the rule stores raw, computed here from the codec directly."""
    c = ts.codecs.make_codec(codec)
    out = []
    for s in samples:
        raw = dumps(s)
        out.append(codec != "none" and raw_below > 0 and len(c.compress(raw)) > len(raw) * (1 - raw_below))
    return out


def _raw_mask(reader) -> list[bool]:
    mask: list[bool] = []
    for si in range(reader.info().shards):
        f = reader._footer(si)
        for fi in range(len(f.table)):
            mask.append(f.is_raw(fi))
    return mask


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_round_trip_mixed_raw_and_coded(tmp_path: Path, codec: str) -> None:
    samples = _samples()
    info = ts.write_store(samples, tmp_path / "s", codec=codec, max_shard_bytes=300_000)
    reader = ts.open_store(tmp_path / "s")
    expected = _expected_raw(samples, codec, writer.DEFAULT_RAW_BELOW)
    assert _raw_mask(reader) == expected
    if codec != "none":
        assert any(expected) and not all(expected)
    assert info.format_version == ((1, 2) if any(expected) else (1, 0))
    assert ("raw-frames" in reader.index.features) == any(expected)
    for i, s in enumerate(samples):
        assert reader.read_bytes(i) == dumps(s)
        assert _same(reader[i], s)
    got = list(reader.iter_many(range(len(samples))[::-1]))
    assert [r.error for r in got] == [None] * len(samples)
    assert all(_same(r.sample, b) for r, b in zip(got, samples[::-1]))
    reader.verify()
    assert verify_store(tmp_path / "s", deep=True).ok
    # A raw frame's stored bytes ARE the record's torch.save bytes, in the shard file.
    for si, entry in enumerate(reader.index.shards):
        f = reader._footer(si)
        data = (tmp_path / "s" / entry.name).read_bytes()
        for fi in range(len(f.table)):
            if f.is_raw(fi):
                row = f.table[fi]
                rec = entry.first_record + fi
                assert data[int(row["offset"]) : int(row["offset"] + row["stored"])] == dumps(samples[rec])


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_multi_record_frames_raw(tmp_path: Path, codec: str) -> None:
    zeros = [{"z": torch.zeros(3000), "i": i} for i in range(10)]
    samples = zeros + [{"w": _noise(100_000), "i": i} for i in range(10)] + zeros
    # Frames of two zero records (they shrink >90%) and of one noise record each (raw).
    ts.write_store(samples, tmp_path / "s", codec=codec, frame_target_bytes=20_000, max_shard_bytes=500_000)
    reader = ts.open_store(tmp_path / "s")
    assert reader.info().format_version == (1, 2)
    assert set(reader.index.features) == {"multi-record-frames", "raw-frames"}
    mask = _raw_mask(reader)
    assert any(mask) and not all(mask)
    for i, s in enumerate(samples):
        assert reader.read_bytes(i) == dumps(s)
        assert _same(reader[i], s)
    assert verify_store(tmp_path / "s", deep=True).ok


def test_lowest_version_and_byte_identity_without_raw_frames(tmp_path: Path) -> None:
    zeros = [{"z": torch.zeros(2000), "i": i} for i in range(10)]
    a = ts.write_store(zeros, tmp_path / "a", codec="zstd")
    b = ts.write_store(zeros, tmp_path / "b", codec="zstd", raw_below=0)
    assert a.format_version == (1, 0) and b.format_version == (1, 0)
    assert list(store_files(tmp_path / "a").values())[1:] == list(store_files(tmp_path / "b").values())[1:]
    c = ts.write_store(zeros, tmp_path / "c", codec="zstd", frame_target_bytes=20_000)
    assert c.format_version == (1, 1)
    idx = json.loads((tmp_path / "c" / "index.json").read_text())
    assert "raw_below" not in idx["created_by"]
    # raw_below=0 disables the feature even for noise.
    noise = [_noise(100_000) for _ in range(3)]
    assert ts.write_store(noise, tmp_path / "d", codec="lz4", raw_below=0).format_version == (1, 0)
    e = ts.write_store(noise, tmp_path / "e", codec="lz4")
    assert e.format_version == (1, 2)
    assert json.loads((tmp_path / "e" / "index.json").read_text())["created_by"]["raw_below"] == 0.05


def test_raw_shard_header_and_footer_versions(tmp_path: Path) -> None:
    noise = [_noise(100_000) for _ in range(3)]
    ts.write_store(noise, tmp_path / "s", codec="lz4", frame_target_bytes=10**6)
    reader = ts.open_store(tmp_path / "s")
    data = (tmp_path / "s" / reader.index.shards[0].name).read_bytes()
    # The header was written before the writer knew of the raw frame: the version of the
    # shard's other features (1.1), the footer says 1.2.
    assert fmt.decode_header(data[:16], "t") == (1, 1)
    assert reader._footer(0).meta["format_version"] == [1, 2]
    assert fmt.raw_frames_runs(reader._footer(0).raw_mask) == [[0, 1]]


def test_invalid_raw_below(tmp_path: Path) -> None:
    for bad in (-0.1, 1.0, True, "0.1", None):
        with pytest.raises(InvalidOptionError, match="raw_below"):
            ts.ShardWriter(tmp_path / f"s{bad}", raw_below=bad)
    assert _DEFAULT_RAW_BELOW == writer.DEFAULT_RAW_BELOW


def test_old_reader_refuses_with_feature_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.1 reader (its KNOWN_FEATURES) refuses a store with raw frames, naming the feature."""
    ts.write_store(_samples(6), tmp_path / "s", codec="lz4")
    monkeypatch.setattr(fmt, "KNOWN_FEATURES", frozenset({"multi-record-frames", "zstd-dictionary"}))
    with pytest.raises(UnsupportedFormatError, match="raw-frames"):
        ts.open_store(tmp_path / "s")


def test_parallel_pack_byte_identical(tmp_path: Path) -> None:
    samples = _samples(18)
    ts.write_store(samples, tmp_path / "a", codec="zstd", max_shard_bytes=300_000)
    ts.write_store(samples, tmp_path / "b", codec="zstd", max_shard_bytes=300_000, num_workers=2, start_method="fork")
    fa, fb = store_files(tmp_path / "a"), store_files(tmp_path / "b")
    assert list(fa.values())[1:] == list(fb.values())[1:]  # shards (names hold each writer's token)
    assert json.loads(fa["index.json"])["features"] == ["raw-frames"]


def test_merge_feature_union(tmp_path: Path) -> None:
    zeros = [{"z": torch.zeros(1000), "i": i} for i in range(4)]
    noise = [_noise(100_000) for _ in range(4)]
    ts.write_store(zeros, tmp_path / "p0", codec="lz4")
    ts.write_store(noise, tmp_path / "p1", codec="lz4")
    info = ts.merge_stores([tmp_path / "p0", tmp_path / "p1"], tmp_path / "m")
    assert info.format_version == (1, 2)
    reader = ts.open_store(tmp_path / "m")
    assert reader.index.features == ("raw-frames",)
    for i, s in enumerate(zeros + noise):
        assert _same(reader[i], s)
    assert verify_store(tmp_path / "m", deep=True).ok


def test_recover_without_index(tmp_path: Path) -> None:
    samples = _samples(12)
    ts.write_store(samples, tmp_path / "s", codec="zstd", max_shard_bytes=300_000)
    (tmp_path / "s" / "index.json").unlink()
    ts.recover_store(tmp_path / "s")
    reader = ts.open_store(tmp_path / "s")
    assert "raw-frames" in reader.index.features
    for i, s in enumerate(samples):
        assert reader.read_bytes(i) == dumps(s)


def test_verify_deep_finds_damaged_raw_frame(tmp_path: Path) -> None:
    noise = [_noise(100_000) for _ in range(3)]
    ts.write_store(noise, tmp_path / "s", codec="zstd")
    reader = ts.open_store(tmp_path / "s")
    assert _raw_mask(reader) == [True, True, True]
    p = tmp_path / "s" / reader.index.shards[0].name
    data = bytearray(p.read_bytes())
    off = int(reader._footer(0).table[1]["offset"]) + 100
    data[off] ^= 0xFF
    p.write_bytes(bytes(data))
    report = verify_store(tmp_path / "s", deep=True)
    assert not report.ok
    assert any(pr.kind == "record_checksum" and pr.record == 1 for pr in report.problems)
    with pytest.raises(CorruptStoreError):
        ts.open_store(tmp_path / "s")[1]


# --------------------------------------------------------------------------- hostile footers


def _noise_store(tmp_path: Path) -> tuple[Path, Path]:
    ts.write_store(
        [_noise(100_000) if i % 2 else torch.zeros(3000) for i in range(4)],
        tmp_path / "s",
        codec="lz4",
    )
    name = json.loads((tmp_path / "s" / "index.json").read_text())["shards"][0]["name"]
    return tmp_path / "s", tmp_path / "s" / name


def _rewrite(path: Path, edit_meta, edit_table=None) -> None:
    data = path.read_bytes()
    table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(path))
    table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
    meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
    edit_meta(meta)
    if edit_table is not None:
        edit_table(table)
    path.write_bytes(data[:table_offset] + encode_footer(table, meta))


def _set(key, value):
    def edit(meta):
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    return edit


HOSTILE = {
    "index-past-frame-count": (_set("raw_frames", [[1, 2], [3, 5]]), None, "within the 4 frames"),
    "duplicate-runs": (_set("raw_frames", [[1, 2], [1, 2], [3, 4]]), None, "increasing order"),
    "overlapping-runs": (_set("raw_frames", [[1, 3], [2, 4]]), None, "increasing order"),
    "touching-runs": (_set("raw_frames", [[1, 2], [2, 4]]), None, "touching"),
    "empty-run": (_set("raw_frames", [[1, 1], [3, 4]]), None, "non-empty"),
    "not-a-pair": (_set("raw_frames", [[1, 2, 3]]), None, "two ints"),
    "bool-index": (_set("raw_frames", [[True, 2]]), None, "two ints"),
    "missing-list": (_set("raw_frames", None), None, "expected a list"),
    "coded-frame-flagged-raw": (_set("raw_frames", [[0, 2], [3, 4]]), None, "frame 0 is stored raw"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_raw_frames_footer(tmp_path: Path, kind: str) -> None:
    store, shard = _noise_store(tmp_path)
    assert _raw_mask(ts.open_store(store)) == [False, True, False, True]
    edit_meta, edit_table, message = HOSTILE[kind]
    _rewrite(shard, edit_meta, edit_table)
    reseal_index(store)
    with pytest.raises(ShardFormatError, match=message):
        ts.open_store(store)[1]
    assert not verify_store(store, deep=True).ok


def test_hostile_raw_frame_length_lie(tmp_path: Path) -> None:
    """A raw-flagged frame whose table row says a raw length other than its stored length."""
    store, shard = _noise_store(tmp_path)

    def grow(table):
        table["raw"][1] = int(table["stored"][1]) + 8

    _rewrite(shard, lambda meta: None, grow)
    reseal_index(store)
    with pytest.raises(ShardFormatError, match="stored raw"):
        ts.open_store(store)[1]
    # check_frame refuses it too, before handing out any bytes.
    row = {"stored": 10, "raw": 18, "checksum": shardio.digest_int(b"0123456789")}
    with pytest.raises(CorruptStoreError, match="stored raw"):
        shardio.check_frame(ts.codecs.make_codec("zstd"), row, b"0123456789", "t", stored_raw=True)


def test_raw_frames_key_without_feature(tmp_path: Path) -> None:
    store, shard = _noise_store(tmp_path)

    def strip(meta):
        meta["features"] = []
        meta["format_version"] = [1, 0]

    _rewrite(shard, strip)
    reseal_index(store)
    with pytest.raises(CorruptStoreError):
        ts.open_store(store)[1]


def test_shards_respect_cap_with_many_raw_runs(tmp_path: Path) -> None:
    samples = _samples(60)
    cap = 600_000
    ts.write_store(samples, tmp_path / "s", codec="lz4", max_shard_bytes=cap)
    reader = ts.open_store(tmp_path / "s")
    for si, entry in enumerate(reader.index.shards):
        assert entry.file_bytes <= cap or len(reader._footer(si).table) == 1
    masks = [reader._footer(si).raw_mask for si in range(len(reader.index.shards))]
    assert any(len(fmt.raw_frames_runs(m)) > 1 for m in masks if m is not None)


# --------------------------------------------------------------------------- bounded dictionary training


def test_dictionary_training_sample_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[tuple[int, int]] = []
    real = zstandard.train_dictionary

    def counting(dict_size, samples, **kwargs):
        handed.append((len(samples), sum(map(len, samples))))
        return real(dict_size, samples, **kwargs)

    monkeypatch.setattr(zstandard, "train_dictionary", counting)
    monkeypatch.setattr(shardio, "DICT_TRAIN_BYTES", 64 * 1024)
    monkeypatch.setattr(shardio, "DICT_TRAIN_RECORDS", 40)
    # Small, repetitive records: a dictionary helps; 600 records of ~1.5 KB buffered.
    recs = [{"x": (torch.arange(64, dtype=torch.uint8) * (i % 7)).reshape(8, 8), "y": i % 10} for i in range(600)]
    ts.write_store(recs, tmp_path / "s", codec="zstd", dictionary=True)
    assert len(handed) == 1
    n, total = handed[0]
    assert n <= 40 and total <= 64 * 1024
    assert n >= 20  # evenly spread over the buffer, not a handful
    reader = ts.open_store(tmp_path / "s")
    assert "zstd-dictionary" in reader.index.features
    assert _same(reader[599], recs[599])


def test_dictionary_sample_even_and_capped() -> None:
    recs = [bytes([i]) * 100 for i in range(50)]
    picked = shardio.dictionary_sample(recs, 1000, 1000)
    assert len(picked) == 10 and sum(map(len, picked)) == 1000
    assert [p[0] for p in picked] == list(range(0, 50, 5))
    assert len(shardio.dictionary_sample(recs, 10**6, 7)) == 7
    assert shardio.dictionary_sample([b"x" * 5000], 100, 10) == [b"x" * 5000]  # at least one
    assert shardio.dictionary_sample([], 100, 10) == []


def test_dictionary_skipped_when_it_does_not_pay(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    noise = [torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=g) for _ in range(100)]
    with pytest.warns(UserWarning, match="held-out records, below DICT_MIN_GAIN=2%"):
        info = ts.write_store(noise, tmp_path / "s", codec="zstd", dictionary=True, raw_below=0)
    assert "dict" not in info.codec
    assert info.format_version == (1, 0)
    assert "below DICT_MIN_GAIN" in info.created_by["dictionary_skipped"]
    reader = ts.open_store(tmp_path / "s")
    assert torch.equal(reader[99], noise[99])


def test_dictionary_used_when_it_pays(tmp_path: Path) -> None:
    recs = [{"x": (torch.arange(64, dtype=torch.uint8) * (i % 7)).reshape(8, 8), "y": i % 10} for i in range(400)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = ts.write_store(recs, tmp_path / "s", codec="zstd", dictionary=True)
    assert "dict" in info.codec
    assert "dictionary_skipped" not in info.created_by


# --------------------------------------------------------------------------- datasets and the CLI


def test_datasets_read_raw_frames(tmp_path: Path) -> None:
    samples = _samples(12)
    ts.write_store(samples, tmp_path / "s", codec="zstd", max_shard_bytes=300_000)
    reader = ts.open_store(tmp_path / "s")
    assert "raw-frames" in reader.index.features
    with pytest.raises(InvalidOptionError, match="stored raw"):
        reader.record_table()
    ds = ts.StoreDataset(tmp_path / "s")
    assert all(_same(ds[i], s) for i, s in enumerate(samples))
    it = ts.StoreIterableDataset(tmp_path / "s")
    got = list(it)
    assert len(got) == len(samples) and all(_same(a, b) for a, b in zip(got, samples))


def test_cli_pack_raw_below(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorstore_pt.cli import main

    noise = [{"w": _noise(100_000)} for _ in range(3)]
    torch.save(noise, tmp_path / "n.pt")
    assert main(["pack", str(tmp_path / "n.pt"), str(tmp_path / "a"), "--codec", "lz4"]) == 0
    assert main(["pack", str(tmp_path / "n.pt"), str(tmp_path / "b"), "--codec", "lz4", "--raw-below", "0"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "3 of 3 stored raw" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["raw_frames"] == 0
    assert ts.open_store(tmp_path / "a").info().format_version == (1, 2)
    assert ts.open_store(tmp_path / "b").info().format_version == (1, 0)
    assert main(["pack", str(tmp_path / "n.pt"), str(tmp_path / "c"), "--raw-below", "1.5"]) != 0
    assert "--raw-below" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lz4-raw", "zstd-raw-frames"])
def test_v12_fixtures_mix_raw_and_coded_frames(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).parent / "fixtures" / "v1.2" / name
    reader = ts.open_store(path)
    mask = _raw_mask(reader)
    assert any(mask) and not all(mask)
    assert ("multi-record-frames" in reader.index.features) == (name == "zstd-raw-frames")
    monkeypatch.setattr(fmt, "KNOWN_FEATURES", frozenset({"multi-record-frames", "zstd-dictionary"}))
    with pytest.raises(UnsupportedFormatError, match=r"format 1\.2 uses feature\(s\) \['raw-frames'\]"):
        ts.open_store(path)
