"""merge_stores: parts committed as one store in part order; moves on one file system,
copies otherwise; refuses mismatched or uncommitted parts; idempotent across crashes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt import merge as merge_mod
from tensorstore_pt.format import INDEX_NAME
from tensorstore_pt.storage import LocalStorage

from _merge_tools import Crash, crash_after_steps, pairs, records, sample
from _merge_tools import write_parts as _write_parts

pytestmark = pytest.mark.timeout(120)


SAMPLES = [sample(i) for i in range(60)]
SPLITS = [(0, 25), (25, 26), (26, 60)]  # uneven, with a one-record part


def write_parts(root: Path, splits=SPLITS, **options) -> list[Path]:
    return _write_parts(root, SAMPLES, splits, **options)


def expected(order=(0, 1, 2)) -> list[tuple[int, bytes]]:
    return [p for k in order for p in pairs(SAMPLES[SPLITS[k][0] : SPLITS[k][1]])]


def shard_bytes(path: Path) -> list[bytes]:
    index = json.loads((path / INDEX_NAME).read_bytes())
    return [(path / s["name"]).read_bytes() for s in index["shards"]]


@pytest.mark.parametrize("copy", [None, True])
def test_merge_equals_one_writer_and_shards_are_byte_identical(tmp_path, copy):
    # max_shard_bytes=1: one record per shard, so every shard boundary of the single writer
    # is also a part boundary and the merged shards must be the single writer's bytes.
    options = {"codec": "zstd", "max_shard_bytes": 1}
    ts.write_store(SAMPLES, tmp_path / "single", **options)
    parts = write_parts(tmp_path, **options)
    info = ts.merge_stores(parts, tmp_path / "merged", copy=copy)
    assert info.records == 60 and info.shards == 60
    assert records(tmp_path / "merged") == expected()
    assert shard_bytes(tmp_path / "merged") == shard_bytes(tmp_path / "single")
    assert ts.verify_store(tmp_path / "merged", deep=True).problems == ()
    assert info.created_by["merge"]["parts"] == [str(p) for p in parts]
    if copy:
        assert all((p / INDEX_NAME).exists() for p in parts)  # copied: parts intact and still readable
        assert records(parts[2]) == expected([2])
    else:
        assert not any(p.exists() for p in parts)  # moved: parts consumed


def test_part_order_not_finish_order_decides_record_order(tmp_path):
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    for k in (2, 0, 1):  # finish order 2, 0, 1
        a, b = SPLITS[k]
        ts.write_store(SAMPLES[a:b], parts[k], max_shard_bytes=3_000)
    ts.merge_stores(parts, tmp_path / "m012", copy=True)
    assert records(tmp_path / "m012") == expected([0, 1, 2])
    ts.merge_stores([parts[2], parts[0], parts[1]], tmp_path / "m201")
    assert records(tmp_path / "m201") == expected([2, 0, 1])
    assert ts.verify_store(tmp_path / "m201", deep=True).problems == ()


def test_multi_record_frames_lz4_and_empty_part(tmp_path):
    options = {"codec": "lz4", "frame_target_bytes": 2_000, "max_shard_bytes": 6_000}
    parts = write_parts(tmp_path, splits=[(0, 30), (30, 30), (30, 60)], **options)
    info = ts.merge_stores(parts, tmp_path / "m")
    assert info.records == 60 and info.created_by["frame_target_bytes"] == 2_000
    assert records(tmp_path / "m") == [(s["y"], s["x"].numpy().tobytes()) for s in SAMPLES]
    assert ts.verify_store(tmp_path / "m", deep=True).problems == ()


def test_shared_dictionary(tmp_path):
    data = ts.train_zstd_dictionary(SAMPLES[::2], dict_bytes=1024)
    ts.write_store(SAMPLES, tmp_path / "single", codec="zstd", dictionary=data, max_shard_bytes=1)
    parts = write_parts(tmp_path, codec="zstd", dictionary=data, max_shard_bytes=1)
    info = ts.merge_stores(parts, tmp_path / "m")
    assert info.codec["dict"]["bytes"] == len(data)
    assert shard_bytes(tmp_path / "m") == shard_bytes(tmp_path / "single")
    assert (tmp_path / "m" / info.codec["dict"]["name"]).read_bytes() == data
    assert ts.verify_store(tmp_path / "m", deep=True).problems == ()


@pytest.mark.parametrize(
    "other, needle",
    [
        ({"codec": "zstd", "level": 5}, "'level': 5"),
        ({"codec": "lz4"}, "'id': 'lz4'"),
        ({"codec": "zstd", "frame_target_bytes": 4_000}, "frame settings"),
        ({"codec": "zstd", "compact": True}, "compact=True"),
        ({"codec": "zstd", "dictionary": "trained"}, "'dict'"),
    ],
)
def test_mismatched_configs_are_refused(tmp_path, other, needle):
    if other.get("dictionary") == "trained":
        other = {**other, "dictionary": ts.train_zstd_dictionary(SAMPLES, dict_bytes=1024)}
    ts.write_store(SAMPLES[:10], tmp_path / "a", codec="zstd")
    ts.write_store(SAMPLES[10:20], tmp_path / "b", **other)
    with pytest.raises(ts.IncompatiblePartsError) as exc:
        ts.merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    msg = str(exc.value)
    assert str(tmp_path / "b") in msg and str(tmp_path / "a") in msg and needle in msg
    assert "{'id': 'zstd', 'level': 3}" in msg or "frame settings" in msg
    assert not (tmp_path / "m").exists()
    assert (tmp_path / "a" / INDEX_NAME).exists() and (tmp_path / "b" / INDEX_NAME).exists()


def test_uncommitted_part_is_refused(tmp_path):
    parts = write_parts(tmp_path)
    # A part whose writer died: shards on disk, no index.
    (parts[1] / INDEX_NAME).unlink()
    with pytest.raises(ts.PartNotCommittedError, match="has no index.json"):
        ts.merge_stores(parts, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert (parts[0] / INDEX_NAME).exists()  # nothing was moved
    with pytest.raises(ts.StoreNotFoundError):
        ts.merge_stores([parts[0], tmp_path / "nowhere"], tmp_path / "m")


def test_bad_arguments_and_existing_dest(tmp_path):
    parts = write_parts(tmp_path)
    with pytest.raises(ts.InvalidOptionError, match="at least one"):
        ts.merge_stores([], tmp_path / "m")
    with pytest.raises(ts.InvalidOptionError, match="a single"):
        ts.merge_stores(str(parts[0]), tmp_path / "m")
    with pytest.raises(ts.InvalidOptionError, match="more than once"):
        ts.merge_stores([parts[0], parts[0]], tmp_path / "m")
    with pytest.raises(ts.InvalidOptionError, match="also one of the parts"):
        ts.merge_stores(parts, parts[1])
    ts.write_store(SAMPLES[:3], tmp_path / "taken")
    with pytest.raises(ts.StoreExistsError):
        ts.merge_stores(parts, tmp_path / "taken")
    assert all((p / INDEX_NAME).exists() for p in parts)


def test_parts_inside_the_destination(tmp_path):
    dest = tmp_path / "train"
    parts = write_parts(dest / "_parts")
    ts.merge_stores(parts, dest)
    assert records(dest) == expected()
    assert not any(p.exists() for p in parts)
    assert not (dest / "_parts").exists()  # the emptied folder that held them went too


def test_rerun_after_success_changes_nothing(tmp_path):
    parts = write_parts(tmp_path)
    ts.merge_stores(parts, tmp_path / "m")
    before = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "m").iterdir() if p.name != ".tspt-lock"
    }
    info = ts.merge_stores(parts, tmp_path / "m")
    after = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "m").iterdir() if p.name != ".tspt-lock"
    }
    assert info.records == 60 and before == after


def _crash_mid_rewrite(monkeypatch, n):
    """The n-th footer rewrite dies after truncating the shard, before writing its new tail."""
    real = os.pwrite
    count = {"n": 0}

    def pwrite(fd, data, offset):
        count["n"] += 1
        if count["n"] == n:
            raise Crash("mid-rewrite")
        return real(fd, data, offset)

    monkeypatch.setattr(merge_mod.os, "pwrite", pwrite)


def _crash_after_move(monkeypatch, n):
    real = os.rename
    count = {"n": 0}

    def rename(a, b):
        real(a, b)
        count["n"] += 1
        if count["n"] == n:
            raise Crash("after a move")

    monkeypatch.setattr(merge_mod.os, "rename", rename)


def _crash_before_journal_removal(monkeypatch, n):
    real = LocalStorage.remove

    def remove(self, name):
        if name == merge_mod.JOURNAL_NAME:
            raise Crash("index committed, journal not removed")
        real(self, name)

    monkeypatch.setattr(LocalStorage, "remove", remove)


def _crash_removing_parts(monkeypatch, n):
    def remove_parts(self, digests):
        raise Crash("removing parts")

    monkeypatch.setattr(merge_mod._Merge, "_remove_parts", remove_parts)


def _crash_planning(monkeypatch, n):
    real = merge_mod._Merge._plan_shard

    def plan_shard(self, *args):
        raise Crash("planning")

    monkeypatch.setattr(merge_mod._Merge, "_plan_shard", plan_shard)
    return real


CRASHES = [
    ("planning", _crash_planning, 0),
    ("journal-written", crash_after_steps, 0),
    ("after-3-steps", crash_after_steps, 3),
    ("after-8-steps", crash_after_steps, 8),
    ("mid-rewrite", _crash_mid_rewrite, 2),
    ("after-move", _crash_after_move, 5),
    ("before-journal-removal", _crash_before_journal_removal, 0),
    ("removing-parts", _crash_removing_parts, 0),
]


@pytest.mark.parametrize("copy", [None, True], ids=["move", "copy"])
@pytest.mark.parametrize("name, inject, n", CRASHES, ids=[c[0] for c in CRASHES])
def test_rerun_after_a_crash_finishes_the_merge(tmp_path, monkeypatch, copy, name, inject, n):
    if copy and inject in (_crash_mid_rewrite, _crash_after_move):
        pytest.skip("a copy neither renames nor rewrites in place")
    parts = write_parts(tmp_path, codec="zstd", max_shard_bytes=3_000)
    dest = tmp_path / "m"
    with monkeypatch.context() as m:
        inject(m, n)
        with pytest.raises(Crash):
            ts.merge_stores(parts, dest, copy=copy)
    if name == "planning":
        assert not dest.exists() and all((p / INDEX_NAME).exists() for p in parts)
    elif name not in ("before-journal-removal", "removing-parts"):
        assert not (dest / INDEX_NAME).exists()  # nothing published before the index
    info = ts.merge_stores(parts, dest, copy=copy)
    assert info.records == 60
    assert records(dest) == expected()
    assert ts.verify_store(dest, deep=True).problems == ()
    assert not (dest / merge_mod.JOURNAL_NAME).exists()
    index = json.loads((dest / INDEX_NAME).read_bytes())
    names = {s["name"] for s in index["shards"]}
    assert {p.name for p in dest.iterdir()} - names - {INDEX_NAME, ".tspt-lock"} == set()  # no strays
    if copy:
        assert all((p / INDEX_NAME).exists() for p in parts)
    else:
        assert not any(p.exists() for p in parts)


def test_unfinished_merge_of_other_parts_is_refused(tmp_path, monkeypatch):
    parts = write_parts(tmp_path)
    with monkeypatch.context() as m:
        crash_after_steps(m, 2)
        with pytest.raises(Crash):
            ts.merge_stores(parts, tmp_path / "m")
    with pytest.raises(ts.MergeStateError, match="unfinished merge of parts"):
        ts.merge_stores(parts[:2], tmp_path / "m")
    assert ts.merge_stores(parts, tmp_path / "m").records == 60


def test_cli_pack_workers_merge_and_info(tmp_path, capsys):
    from tensorstore_pt.cli import main

    torch.save(SAMPLES[:30], tmp_path / "a.pt")
    torch.save(SAMPLES[30:], tmp_path / "b.pt")
    assert main(["pack", str(tmp_path / "a.pt"), str(tmp_path / "pa"), "--workers", "2", "-q"]) == 0
    assert main(["pack", str(tmp_path / "b.pt"), str(tmp_path / "pb"), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "pb")]) == 0
    assert "written" not in capsys.readouterr().out  # a plain store: nothing to say
    assert main(["info", str(tmp_path / "pa")]) == 0
    assert "packed by 2 worker processes" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "pa"), str(tmp_path / "pb"), str(tmp_path / "m"), "--copy", "-q"]) == 0
    assert "merged 2 parts (copied (parts intact))" in capsys.readouterr().out
    assert records(tmp_path / "m") == [(s["y"], s["x"].numpy().tobytes()) for s in SAMPLES]
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "merged from 2 parts" in capsys.readouterr().out
    ts.write_store(SAMPLES[:5], tmp_path / "lz", codec="lz4")
    assert main(["merge", str(tmp_path / "pa"), str(tmp_path / "lz"), str(tmp_path / "m2"), "-q"]) == 2
    assert "written with codec config" in capsys.readouterr().err


def test_prepared_dictionary_options(tmp_path):
    with pytest.raises(ts.InvalidOptionError, match="ZDICT format"):
        ts.ShardWriter(tmp_path / "a", dictionary=b"not a dictionary")
    data = ts.train_zstd_dictionary(SAMPLES, dict_bytes=1024)
    with pytest.raises(ts.InvalidOptionError, match="only codec 'zstd' takes a dictionary"):
        ts.ShardWriter(tmp_path / "a", codec="lz4", dictionary=data)
    with pytest.raises(ts.InvalidOptionError, match="dict_bytes: expected an int"):
        ts.train_zstd_dictionary(SAMPLES, dict_bytes=10)
    with pytest.raises(ts.InvalidOptionError, match="could not train"):
        ts.train_zstd_dictionary(SAMPLES[:1], dict_bytes=1024)
    assert not (tmp_path / "a").exists()
    # Append with the store's own dictionary works; another one, or one on a store without, is refused.
    ts.write_store(SAMPLES[:10], tmp_path / "d", dictionary=data)
    ts.write_store(SAMPLES[10:20], tmp_path / "d", mode="append", dictionary=data)
    assert records(tmp_path / "d")[15][0] == 15
    other = ts.train_zstd_dictionary(SAMPLES[::-1], dict_bytes=2048)
    with pytest.raises(ts.InvalidOptionError, match="another zstd dictionary"):
        ts.write_store(SAMPLES[:1], tmp_path / "d", mode="append", dictionary=other)
    ts.write_store(SAMPLES[:10], tmp_path / "plain")
    with pytest.raises(ts.InvalidOptionError, match="has no zstd dictionary"):
        ts.write_store(SAMPLES[:1], tmp_path / "plain", mode="append", dictionary=data)


def test_rerun_keeps_records_appended_after_the_commit(tmp_path, monkeypatch):
    parts = write_parts(tmp_path)
    dest = tmp_path / "m"
    with monkeypatch.context() as m:
        _crash_before_journal_removal(m, 0)
        with pytest.raises(Crash):
            ts.merge_stores(parts, dest)
    extra = [sample(1000 + i) for i in range(3)]
    ts.write_store(extra, dest, mode="append")  # the merged store is committed: it can be written
    info = ts.merge_stores(parts, dest)
    assert info.records == 63
    assert records(dest) == expected() + [(s["y"], s["x"].numpy().tobytes()) for s in extra]
    assert not (dest / merge_mod.JOURNAL_NAME).exists() and not any(p.exists() for p in parts)
    # A journal next to an index that is not the merged one at all is refused, nothing changed.
    parts2 = write_parts(tmp_path / "again")
    with monkeypatch.context() as m:
        _crash_before_journal_removal(m, 0)
        with pytest.raises(Crash):
            ts.merge_stores(parts2, tmp_path / "m2")
    ts.write_store(SAMPLES[:2], tmp_path / "m2", mode="overwrite")
    before = (tmp_path / "m2" / INDEX_NAME).read_bytes()
    with pytest.raises(ts.MergeStateError, match="replaced meanwhile"):
        ts.merge_stores(parts2, tmp_path / "m2")
    assert (tmp_path / "m2" / INDEX_NAME).read_bytes() == before


def test_cli_merge_parts_at_urls_with_storage_options(tmp_path, s3_bucket, monkeypatch, capsys):
    """``tspt merge`` takes parts and a destination at URLs; ``--storage-option`` reaches every
    URL side (the endpoint is not in the environment, so only the option can name it) and
    leaves the local part alone."""
    from tensorstore_pt.cli import main

    bucket, s3 = s3_bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    parts = [str(tmp_path / "p0"), f"s3://{bucket}/p1", f"s3://{bucket}/p2"]
    for part, (a, b) in zip(parts, SPLITS):
        ts.write_store(SAMPLES[a:b], part, storage_options=None if "://" not in part else s3)
    opts = [a for k in ("endpoint_url", "key", "secret") for a in ("--storage-option", f"{k}={s3[k]}")]
    dest = f"s3://{bucket}/merged"
    assert main(["merge", *parts, dest, "-q", *opts]) == 0
    assert f"merged 3 parts (copied (parts intact)) into {dest}" in capsys.readouterr().out
    reader = ts.open_store(dest, storage_options=s3)
    assert [(r["y"], r["x"].numpy().tobytes()) for r in (reader[i] for i in range(len(reader)))] == expected()
    assert ts.verify_store(dest, deep=True, storage_options=s3).ok
    assert main(["merge", *parts, dest, "-q", *opts]) == 0  # a re-run changes nothing
    all_local = ["merge", parts[0], str(tmp_path / "m"), "-q", "--storage-option", "anon=true"]
    assert main(all_local) == 2
    assert "all are local paths" in capsys.readouterr().err


def test_merge_stores_refuses_storage_options_that_are_not_a_dict(tmp_path):
    parts = write_parts(tmp_path)
    with pytest.raises(ts.errors.InvalidOptionError, match="storage_options: expected a dict"):
        ts.merge_stores(parts, tmp_path / "m", storage_options="endpoint_url=x")
