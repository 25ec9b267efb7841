"""The damage suite: every kind of damage, for every codec, is found by verify_store (and
``tspt verify``) and by reads of the affected records with a typed error, while records in
intact shards still read correctly."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _store_tools import (
    CODECS,
    RECORDS_PER_SHARD,
    SHARDS,
    copy_store,
    flip,
    layout,
    load_index,
    make_store,
    same,
    sample,
    samples,
    save_index,
    shard_names,
    shard_path,
    truncate,
)

from tensorstore_pt import (
    ChecksumMismatchError,
    CorruptStoreError,
    IndexFormatError,
    MissingShardError,
    NotAStoreError,
    ShardFormatError,
    ShardSizeError,
    StoreNotFoundError,
    open_store,
    recover_store,
    verify_store,
    write_store,
)
from tensorstore_pt.cli import main
from tensorstore_pt.format import HEADER_BYTES, TRAILER_BYTES
from tensorstore_pt.integrity import PROBLEM_KINDS

N = SHARDS * RECORDS_PER_SHARD
#: The codecs, plus the format 1.1 options: a zstd dictionary, and multi-record frames.
VARIANTS = (*CODECS, "zstd-dict", "lz4-frames")


def make_variant(path: Path, variant: str) -> Path:
    if variant in CODECS:
        return make_store(path, variant)
    if variant == "zstd-dict":
        write_store(samples(N), path, codec="zstd", dictionary=1024, max_shard_bytes=2600, metadata={"seed": 7})
        assert "dict" in open_store(path).index.codec
    else:  # two records a frame
        write_store(samples(N), path, codec="lz4", frame_target_bytes=3000, max_shard_bytes=3500, metadata={"seed": 7})
        assert open_store(path).index.features == ("multi-record-frames",)
    assert len(open_store(path).index.shards) >= 3
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {v: make_variant(root / v, v) for v in VARIANTS}


def shard_of(store: Path, i: int) -> int:
    bounds = open_store(store, verify=False).shard_bounds()
    return min(int(np.searchsorted(bounds[:, 0], i, side="right")) - 1, len(bounds) - 1)


def frame_records(store: Path, seq: int, fi: int) -> set[int]:
    """Global positions of the records in frame ``fi`` of shard ``seq``."""
    r = open_store(store, verify=False)
    footer = r._footer(seq)
    first = int(r.shard_bounds()[seq, 0])
    if footer.record_map is None:
        return {first + fi}
    return {first + k for k in np.flatnonzero(footer.record_map["frame"] == fi).tolist()}


@dataclass
class Expect:
    """What a damage must produce.

    shards: shard numbers whose records must fail to read (None: the index itself is damaged).
    error: the exact error type reads of those records raise (None: reads still succeed).
    kinds: problem kinds verify must report (at least these).
    records: if set, only these records fail; the rest of the shard reads fine.
    open_error: the error open_store(verify=True) raises, if any.
    """

    shards: set[int] | None
    error: type[Exception] | None
    kinds: set[str]
    records: set[int] | None = None
    open_error: type[Exception] | None = None
    whole_store: bool = False  # nothing opens (a shared file, e.g. the dictionary, is damaged)


def _frame_of(store: Path, seq: int, k: int) -> tuple[int, int]:
    _, _, _, table = layout(shard_path(store, seq))
    return int(table["offset"][k]), int(table["stored"][k])


def d_truncate(fraction: str) -> Callable[[Path], Expect]:
    def damage(store: Path) -> Expect:
        p = shard_path(store, 1)
        size = p.stat().st_size
        truncate(p, {"1byte": size - 1, "half": size // 2, "zero": 0}[fraction])
        kinds = {"shard_size", "footer"} | ({"header"} if fraction == "zero" else set())
        return Expect({1}, ShardSizeError, kinds, open_error=ShardSizeError)

    return damage


def d_flip_frame(store: Path) -> Expect:
    records = frame_records(store, 1, 1)
    offset, stored = _frame_of(store, 1, 1)
    flip(shard_path(store, 1), offset + stored // 2)
    return Expect({1}, ChecksumMismatchError, {"record_checksum", "file_checksum"}, records=records)


def d_flip_footer(part: str) -> Callable[[Path], Expect]:
    def damage(store: Path) -> Expect:
        p = shard_path(store, 1)
        size, table_offset, js, _ = layout(p)
        where = {
            "table": table_offset + 9,  # inside record 0's stored length
            "json": size - TRAILER_BYTES - js // 2,
            "trailer": size - TRAILER_BYTES + 25,  # the footer checksum field
        }[part]
        flip(p, where)
        return Expect({1}, ShardFormatError, {"footer", "file_checksum"}, open_error=ShardFormatError)

    return damage


def d_flip_header(field: str) -> Callable[[Path], Expect]:
    def damage(store: Path) -> Expect:
        flip(shard_path(store, 1), {"magic": 2, "major": 8, "minor": 10, "flags": 12}[field])
        if field == "flags":
            # docs/format.md: readers MUST ignore the flags. The records are intact and read
            # correctly; the whole-file checksum in verify sees the change.
            return Expect({1}, None, {"file_checksum"})
        return Expect({1}, ShardFormatError, {"header", "file_checksum"}, open_error=ShardFormatError)

    return damage


def d_delete(store: Path) -> Expect:
    shard_path(store, 1).unlink()
    return Expect({1}, MissingShardError, {"missing_shard"}, open_error=MissingShardError)


def d_append_junk(store: Path) -> Expect:
    with open(shard_path(store, 1), "ab") as f:
        f.write(b"junk" * 10)
    return Expect({1}, ShardSizeError, {"shard_size"}, open_error=ShardSizeError)


def d_index_more_records(store: Path) -> Expect:
    obj = load_index(store)
    obj["shards"][-1]["records"] += 1
    obj["totals"]["records"] += 1
    save_index(store, obj)
    return Expect({len(obj["shards"]) - 1}, ShardFormatError, {"record_count"}, open_error=ShardFormatError)


def d_index_checksum(store: Path) -> Expect:
    obj = load_index(store)
    digest = obj["shards"][1]["checksum"]
    obj["shards"][1]["checksum"] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    save_index(store, obj)
    # The data is intact (frames verify against the footer, the footer against its trailer):
    # reads return the right records; only the whole-file check in verify sees the edit.
    return Expect({1}, None, {"file_checksum"})


def d_swap(store: Path) -> Expect:
    a, b = shard_path(store, 0), shard_path(store, 1)
    same_size = a.stat().st_size == b.stat().st_size
    tmp = store / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    if same_size:
        return Expect({0, 1}, ShardFormatError, {"footer_mismatch", "file_checksum"}, open_error=ShardFormatError)
    return Expect({0, 1}, ShardSizeError, {"shard_size"}, open_error=ShardSizeError)


def d_index_truncated(store: Path) -> Expect:
    raw = (store / "index.json").read_bytes()
    (store / "index.json").write_bytes(raw[: len(raw) // 2])
    return Expect(None, IndexFormatError, {"index"}, open_error=IndexFormatError)


def d_index_not_json(store: Path) -> Expect:
    (store / "index.json").write_bytes(b"\x89PNG\r\n\x1a\n not an index")
    return Expect(None, IndexFormatError, {"index"}, open_error=IndexFormatError)


def d_dict(how: str) -> Callable[[Path], Expect]:
    def damage(store: Path) -> Expect:
        (p,) = store.glob("*.zdict")
        if how == "deleted":
            p.unlink()
            return Expect(None, MissingShardError, {"dictionary"}, open_error=MissingShardError, whole_store=True)
        flip(p, p.stat().st_size // 2)
        return Expect(None, ChecksumMismatchError, {"dictionary"}, open_error=ChecksumMismatchError, whole_store=True)

    return damage


DAMAGES: dict[str, Callable[[Path], Expect]] = {
    "truncate-1-byte": d_truncate("1byte"),
    "truncate-half": d_truncate("half"),
    "truncate-to-0": d_truncate("zero"),
    "flip-frame-byte": d_flip_frame,
    "flip-footer-table": d_flip_footer("table"),
    "flip-footer-json": d_flip_footer("json"),
    "flip-footer-trailer": d_flip_footer("trailer"),
    "flip-header-magic": d_flip_header("magic"),
    "flip-header-major": d_flip_header("major"),
    "flip-header-minor": d_flip_header("minor"),
    "flip-header-flags": d_flip_header("flags"),
    "delete-shard": d_delete,
    "append-junk": d_append_junk,
    "index-claims-more-records": d_index_more_records,
    "index-edited-checksum": d_index_checksum,
    "swap-two-shards": d_swap,
    "index-truncated": d_index_truncated,
    "index-not-json": d_index_not_json,
    "dictionary-deleted": d_dict("deleted"),
    "dictionary-flipped": d_dict("flipped"),
}
CASES = [
    pytest.param(v, d, id=f"{v}-{d}")
    for v in VARIANTS
    for d in DAMAGES
    if not d.startswith("dictionary") or v == "zstd-dict"
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant,damage", CASES)
def test_damage_is_detected(
    pristine: dict[str, Path], tmp_path: Path, variant: str, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = copy_store(pristine[variant], tmp_path / "store")
    shard_of_record = [shard_of(pristine[variant], i) for i in range(N + 1)]
    shard_file = shard_names(pristine[variant])  # by position in the index
    expect = DAMAGES[damage](store)

    # verify_store reports it, naming the shard, and tspt verify exits 1.
    report = verify_store(store)
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert expect.kinds <= kinds, report.problems
    assert kinds <= set(PROBLEM_KINDS)
    for p in report.problems:
        assert p.expected and p.found and p.message
    if expect.shards is not None:
        names = {shard_file[s] for s in expect.shards}
        assert set(report.damaged_shards) == names
        for p in report.problems:
            assert p.shard in p.message
    if expect.records is not None:
        rec_problems = [p for p in report.problems if p.record is not None]
        affected = {i for p in rec_problems for i in (range(*p.records) if p.records else [p.record])}
        assert affected == expect.records
        assert all(f"record {p.record}" in p.message or f"records [{p.record}, " in p.message for p in rec_problems)
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    captured = capsys.readouterr()
    assert "DAMAGED" in captured.err and p.kind in captured.out
    assert main(["verify", "--json", str(store)]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False

    # Opening with verification fails with the typed error (or not, for frame-level damage).
    if expect.open_error is not None:
        with pytest.raises(expect.open_error) as info:
            open_store(store)
        if expect.shards is not None:
            assert any(shard_file[s] in str(info.value) for s in expect.shards)
    if expect.whole_store:
        with pytest.raises(expect.open_error):  # type: ignore[arg-type]
            open_store(store, verify=False)
        return
    if expect.shards is None:
        # The index itself is damaged: nothing can be read until `tspt recover`, which
        # rebuilds it from the intact shards; then every record reads back.
        rec = recover_store(store)
        assert rec.index_before == "damaged" and rec.records == N
        assert verify_store(store).ok
        r = open_store(store)
        assert all(same(r[i], sample(i)) for i in range(N))
        return

    reader = open_store(store, verify=False)
    for i in range(len(reader)):
        shard = shard_of_record[i]  # a phantom record (index-claims-more-records) is the last shard's
        failing = shard in expect.shards and expect.error is not None
        if expect.records is not None:
            failing = i in expect.records
        if failing:
            assert expect.error is not None
            with pytest.raises(expect.error) as info:
                reader[i]
            msg = str(info.value)
            assert shard_file[shard] in msg
            if expect.records is not None:
                assert f"record {i}" in msg
            assert isinstance(info.value, CorruptStoreError)
        else:
            assert same(reader[i], sample(i)), f"record {i} read back wrong after {damage}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_clean_store_verifies(pristine: dict[str, Path], variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_store(pristine[variant], deep=True)
    shards = len(open_store(pristine[variant]).index.shards)
    assert report.ok and report.problems == ()
    assert (report.records, report.shards, report.records_checked, report.shards_checked) == (N, shards, N, shards)
    assert main(["verify", "--deep", str(pristine[variant])]) == 0
    assert "OK" in capsys.readouterr().out


def test_every_problem_is_reported(pristine: dict[str, Path], tmp_path: Path) -> None:
    store = copy_store(pristine["zstd"], tmp_path / "s")
    for k in (0, 3):
        offset, stored = _frame_of(store, 0, k)
        flip(shard_path(store, 0), offset + stored // 2)
    truncate(shard_path(store, 1), 100)
    shard_path(store, 2).unlink()
    report = verify_store(store)
    n0, n1, n2 = shard_names(store)[:3]
    by = [(p.kind, p.shard, p.record) for p in report.problems]
    assert ("record_checksum", n0, 0) in by
    assert ("record_checksum", n0, 3) in by
    assert ("shard_size", n1, None) in by
    assert ("missing_shard", n2, None) in by
    sz = next(p for p in report.problems if p.kind == "shard_size")
    assert sz.found == "100 bytes" and sz.expected.endswith(" bytes") and sz.records == (4, 8)
    cs = next(p for p in report.problems if p.kind == "record_checksum")
    assert cs.expected.startswith("xxh3_64:") and cs.found.startswith("xxh3_64:") and cs.expected != cs.found
    assert report.records_checked == 2  # records 1 and 2 of shard 0
    assert report.damaged_shards == (n0, n1, n2)


def test_append_junk_still_checks_records(pristine: dict[str, Path], tmp_path: Path) -> None:
    store = copy_store(pristine["lz4"], tmp_path / "s")
    with open(shard_path(store, 1), "ab") as f:
        f.write(b"\0" * 7)
    report = verify_store(store)
    assert [p.kind for p in report.problems] == ["shard_size"]
    assert report.records_checked == N  # the footer was found where the index says the shard ends


def test_unusable_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StoreNotFoundError):
        verify_store(tmp_path / "nope")
    assert main(["verify", str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError):
        verify_store(tmp_path / "empty")
    assert main(["verify", str(tmp_path / "empty")]) == 2


def test_lost_index_hint(pristine: dict[str, Path], tmp_path: Path) -> None:
    store = copy_store(pristine["none"], tmp_path / "s")
    (store / "index.json").unlink()
    with pytest.raises(NotAStoreError, match="tspt recover"):
        verify_store(store)


def test_verify_notes_unreferenced_and_temp_files(pristine: dict[str, Path], tmp_path: Path) -> None:
    store = copy_store(pristine["zstd"], tmp_path / "s")
    (store / "shard-00009.tspt").write_bytes(shard_path(store, 0).read_bytes())
    (store / ".shard-00010.tspt.tmp-1-abcd").write_bytes(b"partial")
    report = verify_store(store)
    assert report.ok
    assert any("shard-00009.tspt" in n for n in report.notes)
    assert any(".shard-00010.tspt.tmp-1-abcd" in n for n in report.notes)


def test_header_bytes_constant() -> None:
    assert HEADER_BYTES == 16  # the header offsets flipped above assume the v1 layout
