"""merge_stores under attack: busy parts, aliased parts, damaged or hostile parts, re-runs
that must not lie or delete, and recover on a half-merged destination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tensorstore_pt as ts
from tensorstore_pt import merge as merge_mod
from tensorstore_pt.format import HEADER_BYTES, INDEX_NAME

from _merge_tools import Crash, crash_after_steps, pairs, records, sample
from _merge_tools import write_parts as _write_parts

pytestmark = pytest.mark.timeout(120)


SAMPLES = [sample(i) for i in range(40)]
SPLITS = [(0, 15), (15, 16), (16, 40)]


def write_parts(root: Path, splits=SPLITS, **options) -> list[Path]:
    return _write_parts(root, SAMPLES, splits, **options)


def expected(samples=SAMPLES) -> list[tuple[int, bytes]]:
    return pairs(samples)


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".tspt-lock"}


def first_shard(part: Path) -> Path:
    return part / json.loads((part / INDEX_NAME).read_bytes())["shards"][0]["name"]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_busy_part_leaves_nothing_locked_or_created(tmp_path):
    parts = write_parts(tmp_path)
    dest = tmp_path / "m"
    writer = ts.ShardWriter(parts[1], mode="append")  # holds part-1's lock
    try:
        with pytest.raises(ts.StoreBusyError):
            ts.merge_stores(parts, dest)
        assert not dest.exists()  # the directory merge created is gone again
    finally:
        writer.abort()
    # The failed call must not keep dest locked (its exception is still alive here).
    info = ts.merge_stores(parts, dest)
    assert info.records == 40 and records(dest) == expected()


def test_one_part_under_two_spellings_is_refused(tmp_path, monkeypatch):
    parts = write_parts(tmp_path)
    link = tmp_path / "alias"
    link.symlink_to(parts[0], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    before = {p: files(p) for p in parts}
    for spelled in (link, Path("part-0"), tmp_path / "x" / ".." / "part-0"):
        with pytest.raises(ts.InvalidOptionError, match="more than once"):
            ts.merge_stores([parts[0], parts[1], spelled], tmp_path / "m")
    with pytest.raises(ts.InvalidOptionError, match="also one of the parts"):
        ts.merge_stores(parts, link)
    with pytest.raises(ts.InvalidOptionError, match="also one of the parts"):
        ts.merge_stores([link, parts[1]], Path("part-0"))
    assert not (tmp_path / "m").exists()
    assert {p: files(p) for p in parts} == before


@pytest.mark.parametrize("copy", [None, True], ids=["move", "copy"])
def test_a_damaged_shard_of_the_first_part_is_refused_while_planning(tmp_path, copy):
    # The first part's shards keep their footers (adopted as they are): they must be checked
    # against the part's index as well, before anything is moved or the journal is written.
    parts = write_parts(tmp_path, max_shard_bytes=2_000)
    flip(first_shard(parts[0]), HEADER_BYTES + 3)  # a frame byte: the footer still parses
    before = {p: files(p) for p in parts}
    with pytest.raises(ts.ChecksumMismatchError, match="part's index says"):
        ts.merge_stores(parts, tmp_path / "m", copy=copy)
    assert not (tmp_path / "m").exists()
    assert {p: files(p) for p in parts} == before  # nothing consumed


def test_a_hostile_dictionary_name_never_reaches_outside_the_part(tmp_path):
    data = ts.train_zstd_dictionary(SAMPLES * 3, dict_bytes=1024)
    part = tmp_path / "part"
    ts.write_store([], part, codec="zstd", dictionary=data)
    index = json.loads((part / INDEX_NAME).read_bytes())
    victim = tmp_path / "victim.bin"
    victim.write_bytes(data)  # the size the reference claims, next to both part and dest
    index["codec"]["dict"]["name"] = "../victim.bin"
    (part / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ts.IndexFormatError, match="plain shard file name"):
        ts.merge_stores([part], tmp_path / "m")
    assert victim.read_bytes() == data
    assert not (tmp_path / "m").exists() and (part / INDEX_NAME).exists()


def test_a_damaged_dictionary_copy_is_not_adopted(tmp_path):
    data = ts.train_zstd_dictionary(SAMPLES * 3, dict_bytes=1024)
    parts = write_parts(tmp_path, codec="zstd", dictionary=data)
    name = json.loads((parts[0] / INDEX_NAME).read_bytes())["codec"]["dict"]["name"]
    flip(parts[0] / name, len(data) - 5)  # same size, other bytes
    ts.merge_stores(parts, tmp_path / "m")  # takes part-1's intact copy
    assert (tmp_path / "m" / name).read_bytes() == data
    assert records(tmp_path / "m") == expected()
    assert ts.verify_store(tmp_path / "m", deep=True).problems == ()

    parts = write_parts(tmp_path / "again", splits=SPLITS[:1], codec="zstd", dictionary=data)
    flip(parts[0] / name, len(data) - 5)
    with pytest.raises(ts.ChecksumMismatchError, match="dictionary file"):
        ts.merge_stores(parts, tmp_path / "m2")
    assert not (tmp_path / "m2").exists() and (parts[0] / INDEX_NAME).exists()


def test_rerunning_a_copy_merge_keeps_its_parts(tmp_path):
    parts = write_parts(tmp_path)
    ts.merge_stores(parts, tmp_path / "m", copy=True)
    before = {p: files(p) for p in parts}
    info = ts.merge_stores(parts, tmp_path / "m")  # default mode would move: the parts must stay
    assert info.records == 40
    assert {p: files(p) for p in parts} == before
    assert info.created_by["merge"]["mode"] == "copy"


@pytest.mark.parametrize("copy", [None, True], ids=["move", "copy"])
def test_rerun_after_a_part_location_was_written_again_is_refused(tmp_path, copy):
    parts = write_parts(tmp_path)
    ts.merge_stores(parts, tmp_path / "m", copy=copy)
    merged = files(tmp_path / "m")
    # The part location now holds another store: "already merged" would silently leave it out.
    ts.write_store(SAMPLES[30:], parts[1], mode="overwrite" if copy else "create")
    with pytest.raises(ts.StoreExistsError, match="holds another store now"):
        ts.merge_stores(parts, tmp_path / "m", copy=copy)
    assert files(tmp_path / "m") == merged
    assert records(parts[1]) == expected(SAMPLES[30:])  # the new part is not consumed either


def test_recover_refuses_a_half_merged_destination_and_merge_finishes(tmp_path, monkeypatch):
    parts = write_parts(tmp_path, max_shard_bytes=2_000)
    dest = tmp_path / "m"
    with monkeypatch.context() as m:
        crash_after_steps(m, 4)
        with pytest.raises(Crash):
            ts.merge_stores(parts, dest)
    before = files(dest)
    for dry_run in (True, False):
        with pytest.raises(ts.MergeStateError, match="unfinished merge") as exc:
            ts.recover_store(dest, dry_run=dry_run)
        assert str(parts[0]) in str(exc.value)  # it names the call that finishes the job
    assert files(dest) == before and not (dest / INDEX_NAME).exists()
    info = ts.merge_stores(parts, dest)
    assert info.records == 40 and records(dest) == expected()
    assert ts.verify_store(dest, deep=True).problems == ()


def test_cli_recover_on_a_half_merged_destination_exits_with_the_merge_to_run(tmp_path, monkeypatch, capsys):
    from tensorstore_pt.cli import main

    parts = write_parts(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(merge_mod._Merge, "_do_step", lambda self, s: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError):
            ts.merge_stores(parts, tmp_path / "m")
    code = main(["recover", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code != 0 and "unfinished merge" in err and "merge_stores" in err


def test_a_part_nested_in_another_part_is_merged_and_both_removed(tmp_path):
    outer = tmp_path / "outer"
    ts.write_store(SAMPLES[:10], outer)
    inner = outer / "inner"
    ts.write_store(SAMPLES[10:], inner)
    info = ts.merge_stores([outer, inner], tmp_path / "m")
    assert info.records == 40 and records(tmp_path / "m") == expected()
    assert not outer.exists()


def test_merged_index_names_the_mode(tmp_path):
    parts = write_parts(tmp_path)
    assert ts.merge_stores(parts, tmp_path / "m").created_by["merge"]["mode"] == "move"


def test_a_part_that_is_a_file_gets_a_typed_error(tmp_path):
    parts = write_parts(tmp_path, splits=SPLITS[:1])
    (tmp_path / "file").write_bytes(b"not a store")
    with pytest.raises(ts.NotAStoreError, match="is a file"):
        ts.merge_stores([parts[0], tmp_path / "file"], tmp_path / "m")
    assert not (tmp_path / "m").exists() and (parts[0] / INDEX_NAME).exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda j: j["steps"][1].update(src="../../victim.bin"),
        lambda j: j["steps"][1].update(part=7),
        lambda j: j["steps"][1].update(tail="not base64!"),
        lambda j: j["steps"][1].pop("table_offset"),
        lambda j: j.update(steps={"a": 1}),
        lambda j: j.update(token="../../x"),
    ],
    ids=["unsafe-name", "part-out-of-range", "bad-tail", "missing-field", "steps-not-a-list", "unsafe-token"],
)
def test_a_damaged_journal_is_refused_and_touches_nothing(tmp_path, monkeypatch, damage):
    parts = write_parts(tmp_path / "p", max_shard_bytes=2_000)
    dest = tmp_path / "m"
    with monkeypatch.context() as m:
        m.setattr(merge_mod._Merge, "_do_step", lambda self, s: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError):
            ts.merge_stores(parts, dest)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    journal = json.loads((dest / merge_mod.JOURNAL_NAME).read_bytes())
    damage(journal)
    (dest / merge_mod.JOURNAL_NAME).write_text(json.dumps(journal))
    before = {p: files(p) for p in parts}
    with pytest.raises(ts.MergeStateError, match="damaged"):
        ts.merge_stores(parts, dest)
    assert victim.read_bytes() == b"keep me"
    assert {p: files(p) for p in parts} == before


def test_cli_merge_errors_are_one_clear_line(tmp_path, capsys):
    from tensorstore_pt.cli import main

    parts = write_parts(tmp_path, splits=SPLITS[:2])
    cases = [
        ([str(parts[0]), str(tmp_path / "nowhere"), str(tmp_path / "m")], "does not exist"),
        ([str(parts[0]), f"{tmp_path}/x/../part-0", str(tmp_path / "m")], "more than once"),
        ([str(parts[0]), str(parts[1]), str(parts[1])], "also one of the parts"),
    ]
    for argv, needle in cases:
        code = main(["merge", "--quiet", *argv])
        err = capsys.readouterr().err
        assert code != 0 and needle in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "m").exists()
    assert all((p / INDEX_NAME).exists() for p in parts)


def test_a_rerun_from_another_directory_finishes_a_merge_started_with_relative_paths(tmp_path, monkeypatch):
    parts = write_parts(tmp_path, max_shard_bytes=2_000)
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        crash_after_steps(m, 3)
        with pytest.raises(Crash):
            ts.merge_stores([p.name for p in parts], "m")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    info = ts.merge_stores(parts, tmp_path / "m")  # the same directories, spelled absolutely
    assert info.records == 40 and records(tmp_path / "m") == expected()
    assert info.created_by["merge"]["parts"] == [str(p) for p in parts]
