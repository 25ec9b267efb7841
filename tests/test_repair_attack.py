"""Attacks on the repair tools (recover, merge, cp) with fresh eyes: each test is a fault that
was found, written before its fix. The rule they check: repair keeps every record that
checksums prove, says exactly what it could not keep, and leaves a store that verifies clean.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from _store_tools import make_store, sample, same
from tensorstore_pt import copy_store, open_store, recover_store, verify_store, write_store
from tensorstore_pt.errors import ChecksumMismatchError
from tensorstore_pt.recover import RecoverReport
from tensorstore_pt.format import INDEX_NAME


def _shards(store: Path) -> list[str]:
    return sorted(n for n in os.listdir(store) if n.endswith(".tspt"))


def _records(store: Path) -> list:
    return list(open_store(store))


def _recover_twice(store: Path) -> RecoverReport:
    """recover_store, then once more: the second run must find nothing to change."""
    report = recover_store(store)
    again = recover_store(store)
    assert not again.changed and again.records == report.records and again.records_lost == 0
    return report


def test_recover_never_keeps_a_shard_under_a_name_the_index_cannot_hold(tmp_path: Path) -> None:
    # A shard renamed by hand to a name that is not a plain shard name (docs/format.md,
    # section 6: no ".."): recover used to keep it as is and commit an index that every
    # reader refuses. Its records must be kept under a valid name instead.
    store = make_store(tmp_path / "s", "zstd", shards=1)
    (name,) = _shards(store)
    os.remove(store / INDEX_NAME)
    os.rename(store / name, store / "a..b.tspt")
    report = _recover_twice(store)
    assert report.records == 4 and report.records_lost == 0
    assert all(".." not in k.name for k in report.kept)
    assert verify_store(store).ok
    got = _records(store)
    assert len(got) == 4 and all(same(g, sample(i)) for i, g in enumerate(got))
    assert (store / "a..b.tspt.quarantined").exists()  # never deleted


def test_recover_without_index_reports_the_records_of_a_missing_shard(tmp_path: Path) -> None:
    # One writer's shards 0..5, the index and shard 1 gone: the records of shard 1 are lost and
    # the ones after move down. The report used to say records_lost == 0 and no lost range.
    store = tmp_path / "s"
    data = [{"x": torch.full((3000,), float(i))} for i in range(12)]
    write_store(data, store, codec="none", max_shard_bytes=30000)
    names = _shards(store)
    assert len(names) == 6
    os.remove(store / INDEX_NAME)
    os.remove(store / names[1])
    report = _recover_twice(store)
    assert report.records == 10
    assert report.records_lost == 2
    lost = sorted(r for o in report.shards for r in o.lost)
    assert lost == [(2, 4)]
    assert verify_store(store).ok
    got = [int(r["x"][0]) for r in _records(store)]
    assert got == [0, 1] + list(range(4, 12))


def test_recover_without_index_a_duplicate_shard_costs_no_record(tmp_path: Path) -> None:
    # Three writers (a write and two appends), the index lost, and a byte-for-byte copy of the
    # first shard under another name (a backup left in the directory). Recover used to see two
    # sequences ending where the second writer starts, keep records 4..11 only, renumbered
    # 0..7, and report nothing lost. The copy proves the same records: all 12 must stay.
    store = make_store(tmp_path / "s", "zstd")
    first = json.loads((store / INDEX_NAME).read_text())["shards"][0]["name"]
    os.remove(store / INDEX_NAME)
    shutil.copy(store / first, store / "backup.tspt")
    report = _recover_twice(store)
    assert report.records == 12 and report.records_lost == 0
    assert verify_store(store).ok
    got = _records(store)
    assert len(got) == 12 and all(same(g, sample(i)) for i, g in enumerate(got))
    dup = [o for o in report.shards if o.name in ("backup.tspt", first) and o.action == "quarantined"]
    assert len(dup) == 1 and "duplicate" in dup[0].reason


def _numbered(n: int) -> list[dict[str, torch.Tensor]]:
    """Records that do not compress (so each codec makes several shards), tagged by position."""
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(3000, generator=g), "i": torch.tensor(i)} for i in range(n)]


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("victim", ["first", "middle", "last"])
def test_recover_without_index_keeps_the_records_of_a_shard_whose_footer_is_lost(
    tmp_path: Path, codec: str, victim: str
) -> None:
    # One writer's shards, the index lost and one shard cut short by 10 bytes (its trailer
    # gone). Its frames still prove its records (zstd/lz4 frames, zip CRC-32s), and its writer's
    # previous shard says where it starts. Recover used to quarantine it and keep nothing of it
    # (the last shard: 2 records gone and records_lost 0).
    store = tmp_path / "s"
    write_store(_numbered(12), store, codec=codec, max_shard_bytes=30000)
    names = _shards(store)
    assert len(names) == 6
    os.remove(store / INDEX_NAME)
    cut = store / names[{"first": 0, "middle": 1, "last": -1}[victim]]
    os.truncate(cut, cut.stat().st_size - 10)
    report = _recover_twice(store)
    assert report.records == 12 and report.records_lost == 0
    assert verify_store(store).ok
    assert [int(r["i"]) for r in _records(store)] == list(range(12))
    assert (store / (cut.name + ".quarantined")).exists()


def test_recover_without_index_never_guesses_where_a_damaged_first_shard_starts(tmp_path: Path) -> None:
    # The first shard cut short and its last frame damaged too: the frames it proves may end
    # before its true end, so where it starts is unknown. It is not placed by a guess (which
    # would report the wrong records lost); its records are reported lost, the rest kept.
    store = tmp_path / "s"
    write_store(_numbered(12), store, codec="lz4", max_shard_bytes=30000)
    first = _shards(store)[0]
    table = json.loads((store / INDEX_NAME).read_text())["shards"]
    assert table[0]["name"] == first and table[0]["records"] == 2
    os.remove(store / INDEX_NAME)
    path = store / first
    data = bytearray(path.read_bytes())
    data[16 + table[0]["stored_bytes"] - 100] ^= 0xFF  # inside the second (last) frame
    path.write_bytes(bytes(data[:-10]))
    report = _recover_twice(store)
    assert report.records == 10 and report.records_lost == 2
    assert sorted(r for o in report.shards for r in o.lost) == [(0, 2)]
    assert [int(r["i"]) for r in _records(store)] == list(range(2, 12))
    assert verify_store(store).ok


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != ".tspt-lock"}


def test_cp_overwrite_of_a_damaged_source_leaves_the_old_store_whole(tmp_path: Path) -> None:
    # The destination holds a store whose legacy shard names (shard-00000.tspt...) are also the
    # source's, with other bytes. A copy with overwrite=True used to remove the old index, then
    # replace shard-00000.tspt, then fail on the source's damaged shard-00001.tspt: the old
    # store was gone (no index, a shard overwritten) and the copy never committed. Nothing of
    # the old store may change until every file of the new one has arrived and verified.
    fixtures = Path(__file__).parent / "fixtures" / "v1.0"
    dst = tmp_path / "dst"
    copy_store(fixtures / "zstd", dst)
    before = _files(dst)
    src = tmp_path / "src"
    shutil.copytree(fixtures / "lz4", src)
    last = json.loads((src / INDEX_NAME).read_text())["shards"][-1]["name"]
    data = bytearray((src / last).read_bytes())
    data[20] ^= 0xFF
    (src / last).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=last):
        copy_store(src, dst, overwrite=True, workers=1)
    assert {n: b for n, b in _files(dst).items() if not n.startswith(".")} == before
    assert verify_store(dst).ok
    # Repaired, the source replaces it, and no staged file is left behind.
    shutil.copy(fixtures / "lz4" / last, src / last)
    copy_store(src, dst, overwrite=True)
    assert _files(dst) == _files(fixtures / "lz4")
    assert verify_store(dst).ok


def test_recover_moves_aside_an_index_that_is_a_directory(tmp_path: Path) -> None:
    # index.json is a directory (holding a file): recover used to fail renaming its new index
    # over it (IsADirectoryError), leaving a temporary index behind and the store unreadable.
    # It is moved aside as a quarantined file (never deleted) and the index rebuilt.
    store = make_store(tmp_path / "s", "zstd")
    os.remove(store / INDEX_NAME)
    (store / INDEX_NAME).mkdir()
    (store / INDEX_NAME / "note").write_text("mine")
    report = _recover_twice(store)
    assert report.records == 12 and report.index_written and report.records_lost == 0
    assert report.index_backup is not None
    assert (store / report.index_backup / "note").read_text() == "mine"
    assert verify_store(store).ok
    assert [int(r["i"]) for r in _records(store)] == list(range(12))
    assert not [n for n in os.listdir(store) if n.startswith(".index.json")]


def test_recover_without_index_joins_the_next_writer_after_a_shard_whose_end_is_unknown(tmp_path: Path) -> None:
    # A write (records 0..5) and an append (6..11), the index lost, and the write's last shard
    # cut short with its last frame damaged too: its records after the last proven frame are
    # unknown, so it ends "at least" at record 5. The append's first shard starts at 6; recover
    # used to keep only the append's records (6 of the 11 proven), since the write's sequence
    # no longer ended exactly where the append starts. Now the append joins after the gap and
    # only record 5 is lost.
    store = tmp_path / "s"
    data = _numbered(12)
    write_store(data[:6], store, codec="lz4", max_shard_bytes=30000)
    write_store(data[6:], store, codec="lz4", max_shard_bytes=30000, mode="append")
    table = json.loads((store / INDEX_NAME).read_text())["shards"]
    assert [(e["first_record"], e["records"]) for e in table] == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 2)]
    os.remove(store / INDEX_NAME)
    path = store / table[2]["name"]
    raw = bytearray(path.read_bytes())
    raw[16 + table[2]["stored_bytes"] - 100] ^= 0xFF  # inside its last frame
    path.write_bytes(bytes(raw[:-10]))
    report = _recover_twice(store)
    assert report.records == 11 and report.records_lost == 1
    assert sorted(r for o in report.shards for r in o.lost) == [(5, 6)]
    assert [int(r["i"]) for r in _records(store)] == [0, 1, 2, 3, 4, *range(6, 12)]
    assert verify_store(store).ok


def test_recover_refuses_an_unreadable_shard_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shard recover may not read (chmod 000; emulated, since tests may run as root): it is not
    # quarantined as unproven (its records are fine, only unreadable now); recover refuses, says
    # which file and that nothing changed, and runs once it is readable again.
    from tensorstore_pt.storage.local import LocalStorage

    store = make_store(tmp_path / "s", "zstd")
    victim = json.loads((store / INDEX_NAME).read_text())["shards"][1]["name"]
    before = _files(store)
    real_open = LocalStorage.open

    def deny(self: LocalStorage, name: str):  # noqa: ANN202 - a ReadHandle
        if name == victim:
            raise PermissionError(13, "Permission denied", str(self.root / name))
        return real_open(self, name)

    monkeypatch.setattr(LocalStorage, "open", deny)
    with pytest.raises(PermissionError, match=f"{victim}.*nothing was changed"):
        recover_store(store)
    assert _files(store) == before
    monkeypatch.setattr(LocalStorage, "open", real_open)
    assert not _recover_twice(store).changed


def test_recover_takes_a_damaged_frame_from_a_copy_that_proves_it(tmp_path: Path) -> None:
    # A committed shard with one damaged frame, and beside it a copy of that shard taken before
    # the damage (backup.tspt, which the index does not name). The shard's own checksummed
    # footer names the frame's xxh3_64; the copy holds a frame at the same records with that
    # digest, so the record is proven. Recover used to drop it (records_lost 1).
    store = make_store(tmp_path / "s", "lz4")
    entry = json.loads((store / INDEX_NAME).read_text())["shards"][1]
    path = store / entry["name"]
    shutil.copy(path, store / "backup.tspt")
    raw = bytearray(path.read_bytes())
    raw[16 + entry["stored_bytes"] // 2] ^= 0xFF  # inside one of its frames
    path.write_bytes(bytes(raw))
    assert not verify_store(store).ok
    report = _recover_twice(store)
    assert report.records == 12 and report.records_lost == 0
    assert [int(r["i"]) for r in _records(store)] == list(range(12))
    assert verify_store(store).ok
    assert (store / "backup.tspt.quarantined").exists()
