"""Hostile stores: a lying index, lying footers, decompression bombs and a malicious pickle.

Each must be refused with a typed error before any large allocation, before any file outside
the store is touched, and without running anything from the store.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import torch
import xxhash
import zstandard
from _hostile_tools import peak_bytes
from _store_tools import (
    build_store,
    copy_store,
    layout,
    load_index,
    make_store,
    reseal_index,
    rewrite_shard_table,
    same,
    sample,
    save_index,
    shard_path,
    torch_save_bytes,
)

from tensorstore_pt import (
    DecompressionError,
    IndexFormatError,
    RecordLengthError,
    ShardFormatError,
    ShardSizeError,
    UnsafePayloadError,
    UnsupportedFormatError,
    audit_path,
    open_store,
    recover_store,
    verify_store,
)
from tensorstore_pt.cli import main
from tensorstore_pt.codecs import get_codec
from tensorstore_pt.format import TRAILER_BYTES
from tensorstore_pt.storage.local import LocalStorage

MiB = 2**20


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "store", "zstd")


# --------------------------------------------------------------------------- hostile index


class Opened:
    """Records every name the local storage is asked to open or stat."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        for meth in ("open", "size"):
            orig = getattr(LocalStorage, meth)

            def spy(self_: LocalStorage, name: str, _orig: Any = orig) -> Any:
                self.names.append(name)
                return _orig(self_, name)

            monkeypatch.setattr(LocalStorage, meth, spy)


def _set_name(store: Path, name: object) -> None:
    obj = load_index(store)
    obj["shards"][0]["name"] = name
    save_index(store, obj)


BAD_NAMES = {
    "dotdot-path": "../outside.tspt",
    "absolute": "ABSOLUTE",  # replaced by the absolute path of the outside file
    "separator": "sub/shard-00000.tspt",
    "backslash": "sub\\shard-00000.tspt",
    "dotdot": "..",
    "hidden": ".shard-00000.tspt",
    "empty": "",
    "nul": "shard\x00.tspt",
    "not-a-string": 7,
    "index-name": "index.json",
}


@pytest.mark.parametrize("case", list(BAD_NAMES), ids=list(BAD_NAMES))
def test_hostile_shard_names(tmp_path: Path, store: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside.tspt"
    outside.write_bytes(shard_path(store, 0).read_bytes())
    before = outside.stat()
    name = str(outside) if BAD_NAMES[case] == "ABSOLUTE" else BAD_NAMES[case]
    _set_name(store, name)
    spy = Opened(monkeypatch)
    with pytest.raises(IndexFormatError) as info:
        open_store(store)
    assert "plain shard file name" in str(info.value) or "clashes" in str(info.value)
    assert repr(name) in str(info.value)
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["index"]
    # recover rebuilds from the shards in the directory, quarantining the hostile index.
    rec = recover_store(store)
    assert rec.index_before == "damaged" and rec.records == 12
    assert not any("outside" in n or "/" in n or "\\" in n or n == ".." for n in spy.names), spy.names
    after = outside.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert outside.exists() and not (tmp_path / "sub").exists()


def test_duplicate_shard_names(store: Path) -> None:
    obj = load_index(store)
    obj["shards"][1]["name"] = obj["shards"][0]["name"]
    save_index(store, obj)
    with pytest.raises(IndexFormatError, match="used twice"):
        open_store(store)


@pytest.mark.parametrize(
    "field,value",
    [("records", -1), ("first_record", -4), ("file_bytes", -1), ("stored_bytes", -10), ("raw_bytes", -1),
     ("records", 2**63), ("file_bytes", 2**64), ("records", 1.5), ("records", True), ("records", "4")],
    ids=lambda v: str(v),
)  # fmt: skip
def test_hostile_index_numbers_refused_by_schema(store: Path, field: str, value: object) -> None:
    obj = load_index(store)
    obj["shards"][0][field] = value
    save_index(store, obj)
    peak, err = peak_bytes(lambda: open_store(store))
    assert isinstance(err, IndexFormatError), err
    assert repr(value) in str(err) or str(value) in str(err)
    assert peak < 4 * MiB


@pytest.mark.parametrize("field", ["file_bytes", "records"])
def test_huge_but_schema_valid_counts_fail_before_allocating(store: Path, field: str) -> None:
    obj = load_index(store)
    s = obj["shards"][-1]
    big = 2**50
    if field == "records":
        s["records"] += big
        s["file_bytes"] += big * 32  # so the schema's minimum-size rule holds
        obj["totals"]["records"] += big
        obj["totals"]["file_bytes"] += big * 32
    else:
        s["file_bytes"] = big
        obj["totals"]["file_bytes"] = sum(x["file_bytes"] for x in obj["shards"])
    save_index(store, obj)
    peak, err = peak_bytes(lambda: open_store(store))
    assert isinstance(err, ShardSizeError), err
    assert str(big if field == "file_bytes" else s["file_bytes"]) in str(err)
    assert peak < 4 * MiB
    peak, err = peak_bytes(lambda: verify_store(store))
    assert err is None and peak < 4 * MiB


def test_index_raw_bytes_impossible_for_codec(store: Path) -> None:
    obj = load_index(store)
    obj["shards"][0]["raw_bytes"] = 2**40
    obj["totals"]["raw_bytes"] = sum(x["raw_bytes"] for x in obj["shards"])
    save_index(store, obj)
    with pytest.raises(IndexFormatError, match="decode to at most"):
        open_store(store, verify=False)
    assert [p.kind for p in verify_store(store).problems] == ["index"]


def test_newer_format_version_is_unsupported(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    obj = load_index(store)
    obj["format_version"] = [2, 0]
    save_index(store, obj)
    before = (store / "index.json").read_bytes()
    for fn in (open_store, verify_store, recover_store):
        with pytest.raises(UnsupportedFormatError, match="2.0"):
            fn(store)
    assert (store / "index.json").read_bytes() == before  # recover left a newer store alone
    assert main(["verify", str(store)]) == 2
    assert "upgrade" in capsys.readouterr().err


def test_unknown_feature_is_unsupported(store: Path) -> None:
    obj = load_index(store)
    obj["features"] = ["sparse-frames"]
    save_index(store, obj)
    with pytest.raises(UnsupportedFormatError, match="sparse-frames"):
        open_store(store)


def test_deeply_nested_index(store: Path) -> None:
    (store / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IndexFormatError, match="nested too deeply"):
        open_store(store)


def test_index_size_cap(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorstore_pt.reader as reader_mod

    monkeypatch.setattr(reader_mod, "MAX_INDEX_BYTES", 100)
    with pytest.raises(IndexFormatError, match="expected at most 100 bytes"):
        open_store(store)


# --------------------------------------------------------------------------- hostile footers


def test_footer_raw_length_above_codec_bound(store: Path) -> None:
    p = shard_path(store, 1)
    codec = get_codec({"id": "zstd", "level": 3})

    def lie(table: Any) -> None:
        table["raw"][1] = codec.max_raw_bytes(int(table["stored"][1])) + 1

    rewrite_shard_table(p, lie)
    reseal_index(store)
    r = open_store(store)  # the index and footer agree: the lie is consistent
    peak, err = peak_bytes(lambda: r[5])
    assert isinstance(err, RecordLengthError), err
    assert "record 5" in str(err) and "decodes to at most" in str(err)
    assert peak < 4 * MiB
    assert same(r[4], sample(4))
    report = verify_store(store)
    assert [(p.kind, p.record) for p in report.problems] == [("record_length", 5)]


def test_none_codec_raw_length_above_frame(tmp_path: Path) -> None:
    raw = torch_save_bytes(sample(0))
    s = build_store(tmp_path / "s", [[(len(raw) * 1000, raw)]], {"id": "none"})
    with pytest.raises(IndexFormatError, match="decode to at most"):
        open_store(s)


def test_footer_frame_offsets_out_of_range(store: Path) -> None:
    p = shard_path(store, 0)

    def lie(table: Any) -> None:
        table["offset"][2] = 2**40

    rewrite_shard_table(p, lie)
    reseal_index(store)
    with pytest.raises(ShardFormatError, match="table is inconsistent"):
        open_store(store)


@pytest.mark.parametrize("field", ["count", "footer_json_bytes"])
def test_trailer_claims_huge_table(store: Path, field: str) -> None:
    p = shard_path(store, 0)
    data = bytearray(p.read_bytes())
    t = len(data) - TRAILER_BYTES
    table_offset, count, js, checksum, magic = struct.unpack("<QQQQ8s", data[t:])
    if field == "count":
        count = 2**40
    else:
        js = 2**30
    data[t:] = struct.pack("<QQQQ8s", table_offset, count, js, checksum, magic)
    p.write_bytes(bytes(data))
    # The file size is unchanged, so the index still matches it: the trailer is the lie.
    peak, err = peak_bytes(lambda: open_store(store))
    assert isinstance(err, ShardFormatError), err
    assert ("footer JSON is" in str(err)) if field != "count" else (f"{2**40} records" in str(err))
    assert peak < 4 * MiB


# --------------------------------------------------------------------------- decompression bombs

BOMB_BYTES = 32 * MiB


def _zstd_set_content_size(frame: bytes, size: int) -> bytes:
    fhd = frame[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    width = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    value = size - 256 if width == 2 else size
    return frame[:pos] + value.to_bytes(width, "little") + frame[pos + width :]


def _lz4_set_content_size(frame: bytes, size: int) -> bytes:
    desc = bytearray(frame[4:14])  # FLG, BD, 8-byte content size (present: store_size=True)
    struct.pack_into("<Q", desc, 2, size)
    hc = (xxhash.xxh32_intdigest(bytes(desc)) >> 8) & 0xFF
    return frame[:4] + bytes(desc) + bytes([hc]) + frame[15:]


def _bomb(codec: str, declare: str) -> tuple[int, bytes]:
    """(raw length for the footer, frame): the frame inflates to BOMB_BYTES."""
    zeros = bytes(BOMB_BYTES)
    if codec == "zstd":
        frame = zstandard.ZstdCompressor(level=3).compress(zeros)
        assert zstandard.frame_content_size(frame) == BOMB_BYTES
        if declare == "small":
            frame = _zstd_set_content_size(frame, 1000)
            assert zstandard.frame_content_size(frame) == 1000
    else:
        frame = lz4.frame.compress(zeros, store_size=True, content_checksum=False)
        if declare == "small":
            frame = _lz4_set_content_size(frame, 1000)
            assert lz4.frame.get_frame_info(frame)["content_size"] == 1000
    return 1000, frame


@pytest.mark.parametrize("declare", ["claims-huge", "small"], ids=["header-claims-huge", "header-lies-small"])
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_decompression_bomb(tmp_path: Path, codec: str, declare: str) -> None:
    config = {"id": codec, "level": 3 if codec == "zstd" else 0}
    good = get_codec(config).compress(torch_save_bytes(sample(0)))
    raw, frame = _bomb(codec, declare)
    assert len(frame) < BOMB_BYTES // 100
    s = build_store(tmp_path / "s", [[(len(torch_save_bytes(sample(0))), good), (raw, frame)]], config)
    r = open_store(s)
    assert same(r[0], sample(0))
    peak, err = peak_bytes(lambda: r[1])
    assert isinstance(err, DecompressionError), err
    assert "record 1" in str(err)
    assert peak < 8 * MiB, f"{peak} bytes allocated for a {BOMB_BYTES}-byte bomb"
    peak, err = peak_bytes(lambda: verify_store(s))
    assert err is None and peak < 8 * MiB
    report = verify_store(s)
    assert [(p.kind, p.record) for p in report.problems] == [("record_decode", 1)]


# --------------------------------------------------------------------------- malicious pickle


class _TouchViaEval:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",))


class _TouchViaSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


PAYLOADS = {"eval": _TouchViaEval, "os-system": _TouchViaSystem}


@pytest.fixture(params=list(PAYLOADS))
def evil(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, bytes]:
    """(store, marker, payload bytes): record 1 of the store would touch ``marker`` if unpickled."""
    marker = tmp_path / "PWNED"
    payload = torch_save_bytes({"x": torch.ones(2), "evil": PAYLOADS[request.param](marker)})
    # The payload is real: an unrestricted torch.load runs it (then the marker is removed).
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()
    marker.unlink()
    config = {"id": "zstd", "level": 3}
    codec = get_codec(config)
    frames = [(len(b), codec.compress(b)) for b in (torch_save_bytes(sample(0)), payload, torch_save_bytes(sample(2)))]
    return build_store(tmp_path / "evil", [frames], config), marker, payload


def test_malicious_pickle_refused_by_reads(evil: tuple[Path, Path, bytes]) -> None:
    store, marker, payload = evil
    r = open_store(store)
    with pytest.raises(UnsafePayloadError) as info:
        r[1]
    assert "record 1" in str(info.value) and "shard-00000.tspt" in str(info.value)
    with pytest.raises(UnsafePayloadError):
        r.read(-2)
    with pytest.raises(UnsafePayloadError):
        list(r)
    assert r.read_bytes(1) == payload  # raw bytes are handed out, never unpickled
    assert same(r[0], sample(0)) and same(r[2], sample(2))
    assert not marker.exists()


def test_malicious_pickle_refused_by_verify_deep(
    evil: tuple[Path, Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    store, marker, _ = evil
    assert verify_store(store).ok  # bytes are intact; only --deep loads records
    report = verify_store(store, deep=True)
    assert [(p.kind, p.record) for p in report.problems] == [("unsafe_payload", 1)]
    assert main(["verify", "--deep", str(store)]) == 1
    assert "unsafe_payload" in capsys.readouterr().out
    assert not marker.exists()


def test_malicious_pickle_refused_by_audit(
    evil: tuple[Path, Path, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, marker, payload = evil
    with pytest.raises(UnsafePayloadError, match="record 1"):
        audit_path(store, min_seconds=0.0, repeats=1)
    assert main(["audit", str(store)]) == 1
    assert "REFUSED" in capsys.readouterr().err
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(sample(0), pt / "0.pt")
    (pt / "1.pt").write_bytes(payload)
    with pytest.raises(UnsafePayloadError, match="1.pt"):
        audit_path(pt, min_seconds=0.0, repeats=1)
    assert not marker.exists()


def test_malicious_pickle_refused_by_datasets(evil: tuple[Path, Path, bytes]) -> None:
    dataset = pytest.importorskip("tensorstore_pt.dataset")
    store, marker, _ = evil
    ds = dataset.StoreDataset(store)
    with pytest.raises(UnsafePayloadError):
        ds[1]
    with pytest.raises(UnsafePayloadError):
        list(dataset.StoreIterableDataset(store))
    it = dataset.StoreIterableDataset(store, on_error="skip")
    got = list(it)
    assert len(got) == 2 and it.skip_counts() == {"UnsafePayloadError": 1}
    assert not marker.exists()


def test_recover_adopts_but_never_loads(evil: tuple[Path, Path, bytes]) -> None:
    store, marker, _ = evil
    (store / "index.json").unlink()
    rec = recover_store(store)
    assert rec.records == 3  # bytes are intact: recover keeps them; loading them is refused later
    with pytest.raises(UnsafePayloadError):
        open_store(store)[1]
    assert not marker.exists()


def test_index_json_is_never_executed(store: Path) -> None:
    obj = load_index(store)
    obj["metadata"] = {"__reduce__": "os.system", "py/object": "os.system"}
    save_index(store, obj)
    assert open_store(store).metadata == obj["metadata"]  # plain JSON data, nothing more
    assert json.loads((store / "index.json").read_text())["metadata"] == obj["metadata"]


def test_copy_store_helper_is_independent(store: Path, tmp_path: Path) -> None:
    c = copy_store(store, tmp_path / "c")
    size, _, _, _ = layout(shard_path(c, 0))
    assert size == shard_path(store, 0).stat().st_size


def test_oversized_dictionary_file_is_not_read(tmp_path: Path) -> None:
    from tensorstore_pt import write_store

    from _store_tools import samples

    store = tmp_path / "s"
    write_store(samples(12), store, dictionary=1024)
    (zdict,) = store.glob("*.zdict")
    with open(zdict, "r+b") as f:
        f.truncate(64 * MiB)  # sparse: cheap to make, expensive to read
    peak, err = peak_bytes(lambda: open_store(store))
    assert isinstance(err, ShardSizeError) and "expected at most 16777216" in str(err), err
    assert peak < 4 * MiB
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["dictionary"]
