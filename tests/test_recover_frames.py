"""``recover`` of shards whose footer is lost, where their frames hold many records (format 1.1
multi-record frames, format 1.3 column blocks): every record it keeps must be the record that
was written at the position the report gives it, and the report must name every record it did
not keep (or say that it could not count them). Found by a fresh-eyes attack on the repair
tools (2026-12-05): a walk past a damaged frame numbered the later frames as if the damaged one
held one record, a raw column block's tensor that held a torch.save archive was kept as a
record, and a compact shard with no index to count it was reported as one lost record, or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tensorstore_pt import merge_stores, open_store, recover_store, write_store
from tensorstore_pt.cli import main
from tensorstore_pt.serialization import dumps
from tensorstore_pt.shardio import frame_records, open_footer
from tensorstore_pt.storage import storage_for


def _shards(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.name.endswith(".tspt"))


def _frames(shard: Path) -> list[tuple[int, int, int, int]]:
    """(offset, stored bytes, first record, end record) of each frame, by the shard's footer."""
    handle = storage_for(str(shard.parent)).open(shard.name)
    try:
        footer = open_footer(handle, handle.size(), "test")
    finally:
        handle.close()
    return [
        (int(footer.table[i]["offset"]), int(footer.table[i]["stored"]), a, b)
        for i, (a, b) in enumerate(frame_records(footer))
    ]


def _lose_footer(shard: Path, damage: tuple[int, ...] = ()) -> set[int]:
    """Flip a byte in the middle of each frame of ``damage``, cut the shard right after its last
    frame (its record table and footer are lost); return the shard-relative records of the
    damaged frames."""
    frames = _frames(shard)
    data = bytearray(shard.read_bytes())
    hit: set[int] = set()
    for k in damage:
        offset, stored, first, end = frames[k]
        data[offset + stored // 2] ^= 0x55
        hit |= set(range(first, end))
    offset, stored = frames[-1][:2]
    shard.write_bytes(bytes(data[: offset + stored]))
    return hit


def _check_kept(store: Path, samples: list[Any], report: Any) -> set[int]:
    """Every record of the recovered store is the one written at the position the report
    implies: the records written, less those the report says were lost, in order. Returns the
    lost set (written numbering)."""
    lost: set[int] = set()
    for outcome in report.shards:
        for a, b in outcome.lost:
            lost |= set(range(a, b))
    expected = [i for i in range(len(samples)) if i not in lost]
    with open_store(store) as reader:
        assert len(reader) == len(expected) == report.records
        for pos, i in enumerate(expected):
            assert reader.read_bytes(pos) == dumps(samples[i]), f"position {pos} is not record {i}"
    return lost


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_raw_column_block_holding_archives_proves_no_record(tmp_path: Path, codec: str) -> None:
    """A column block stored raw holds its storages verbatim: uint8 tensors that are whole
    torch.save archives must not be taken for records once the footer is lost."""
    gen = torch.Generator().manual_seed(0)
    inner = [dumps({"secret": torch.randint(0, 256, (40000,), dtype=torch.uint8, generator=gen)}) for _ in range(3)]
    samples = [
        {"blob": torch.frombuffer(bytearray(b), dtype=torch.uint8), "i": torch.tensor(i)} for i, b in enumerate(inner)
    ]
    store = tmp_path / "s"
    write_store(samples, store, compact=True, codec=codec)
    (shard,) = _shards(store)
    _lose_footer(shard)
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert lost == {0, 1, 2} and report.records_lost == 3
    assert "column blocks" in next(o.reason for o in report.shards if o.name == shard.name)


def test_two_damaged_multi_record_frames_never_misplace_records(tmp_path: Path) -> None:
    """Two damaged frames of two records each: the frames between them cannot be placed (the
    first damaged one may have held any number of records), the frames after the second are
    counted back from the shard's end."""
    samples = [torch.full((300,), i, dtype=torch.int32) for i in range(60)]
    store = tmp_path / "s"
    write_store(samples, store, frame_target_bytes=4096, codec="zstd")
    (shard,) = _shards(store)
    damaged = _lose_footer(shard, damage=(1, 3))
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert damaged <= lost
    assert lost == set(range(2, 8))  # frames 1..3: the damaged two and the unplaceable one between
    assert report.records == 54 and report.records_lost == 6
    assert "were not kept" in next(o.reason for o in report.shards if o.name == shard.name)


def test_frames_between_damaged_frames_are_not_placed_by_counting(tmp_path: Path) -> None:
    """With one record a frame, two damaged frames: the frames before the first and after the
    last keep their records; those between are not kept, even though the records lost would
    add up to one a damaged frame (a frame found inside a damaged record, a tensor holding a
    torch.save archive, can make such counts add up with a record that was never written)."""
    samples = [torch.full((64,), i, dtype=torch.int64) for i in range(30)]
    store = tmp_path / "s"
    write_store(samples, store, codec="zstd")
    (shard,) = _shards(store)
    _lose_footer(shard, damage=(5, 17))
    report = recover_store(store)
    assert _check_kept(store, samples, report) == set(range(5, 18))


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_archive_inside_a_damaged_record_is_never_kept(tmp_path: Path, codec: str) -> None:
    """Records 0 and 1 zeroed out, and the head of record 2, whose uint8 tensor holds a whole
    torch.save archive: the walk finds that archive, but it is never kept as a record."""
    gen = torch.Generator().manual_seed(1)
    inner = dumps({"secret": torch.randint(0, 256, (4000,), dtype=torch.uint8, generator=gen)})
    samples: list[Any] = [{"x": torch.full((100,), float(i))} for i in range(6)]
    samples[2] = {"blob": torch.frombuffer(bytearray(inner), dtype=torch.uint8), "pad": torch.zeros(300)}
    store = tmp_path / "s"
    write_store(samples, store, codec=codec)
    (shard,) = _shards(store)
    frames = _frames(shard)
    data = bytearray(shard.read_bytes())
    start, end = frames[0][0], frames[2][0] + 200  # records 0, 1 and the head of record 2
    data[start:end] = bytes(end - start)
    shard.write_bytes(bytes(data))
    _lose_footer(shard)
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert {0, 1, 2} <= lost


def test_compact_shard_of_blocks_and_plain_frames_keeps_nothing_misnumbered(tmp_path: Path) -> None:
    """A compact shard whose record with 4,100 storages broke the run into a plain frame: with
    the footer lost, the plain frames after the first column block cannot be placed."""
    samples: list[Any] = []
    for i in range(100):
        if i % 25 == 12:
            samples.append([torch.tensor(float(i * 10000 + j)) for j in range(4100)])
        else:
            samples.append({"x": torch.full((8,), float(i)), "i": i})
    store = tmp_path / "s"
    write_store(samples, store, compact=True)
    (shard,) = _shards(store)
    _lose_footer(shard)
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert lost == set(range(100)) and report.records_lost == 100


def test_plain_frames_before_the_first_block_are_kept(tmp_path: Path) -> None:
    """Frames proven before the first column block keep their records, at their numbers."""
    samples: list[Any] = [[torch.tensor(float(j)) for j in range(4100)] for _ in range(2)]
    samples += [{"x": torch.full((8,), float(i)), "i": i} for i in range(40)]
    store = tmp_path / "s"
    write_store(samples, store, compact=True)
    (shard,) = _shards(store)
    _lose_footer(shard)
    report = recover_store(store)
    assert _check_kept(store, samples, report) == set(range(2, 42))


@pytest.mark.parametrize("shards", [1, 2])
def test_compact_shard_without_index_is_reported_uncounted(tmp_path: Path, capsys, shards: int) -> None:
    """No index and a compact shard's footer lost: recover cannot count that shard's records.
    It must say so, never "1 record lost" or "lost none"."""
    n = 400 if shards == 1 else 600
    samples = [{"x": torch.randn(64, generator=torch.Generator().manual_seed(i)), "i": i} for i in range(n)]
    store = tmp_path / "s"
    write_store(samples, store, compact=True, max_shard_bytes=64 << 20 if shards == 1 else 8192)
    names = _shards(store)
    assert len(names) >= shards
    (store / "index.json").unlink()
    last = names[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    backup = tmp_path / "backup"
    shutil.copytree(store, backup)
    report = recover_store(store)
    assert report.records_unknown == (last.name,)
    assert report.records_lost == 0
    kept = report.records
    assert kept == sum(int(_frames_count(p)) for p in names[:-1])
    with open_store(store) as reader:
        for i in range(kept):
            assert reader.read_bytes(i) == dumps(samples[i])
    # The CLI headline and table say it, on a fresh copy of the damaged store.
    shutil.rmtree(store)
    shutil.copytree(backup, store)
    assert main(["recover", str(store)]) == 0
    out = capsys.readouterr().out
    assert "an unknown number of records lost" in out
    assert "lost an unknown number" in out
    assert "1 record(s) could not be proven" not in out


def _frames_count(shard: Path) -> int:
    return _frames(shard)[-1][3]


@pytest.mark.parametrize("options", [{"compact": True}, {"frame_target_bytes": 65536}])
def test_merge_takes_a_part_whose_index_recover_rebuilt(tmp_path: Path, options: dict[str, Any]) -> None:
    """A part whose index was lost and rebuilt by recover no longer names its writer's frame
    settings: merge compares it by the other parts' settings instead of refusing it."""
    a, b = tmp_path / "a", tmp_path / "b"
    samples = [torch.arange(i + 1) for i in range(20)]
    write_store(samples, a, **options)
    write_store(samples, b, **options)
    os.remove(b / "index.json")
    assert recover_store(b).records == 20
    info = merge_stores([a, b], tmp_path / "merged", copy=True)
    assert info.records == 40
    with open_store(tmp_path / "merged") as reader:
        for i in range(40):
            assert reader.read_bytes(i) == dumps(samples[i % 20])


def test_archive_damaged_outside_its_crcs_is_not_proven(tmp_path: Path) -> None:
    """A record whose archive was damaged where no CRC-32 looks (here a byte of an entry's
    alignment padding) still passes the zip checks and still loads, but it is not the bytes
    that were written: with the footer lost, recover must not keep it."""
    samples = [{"x": torch.full((200,), float(i)), "i": i} for i in range(12)]
    store = tmp_path / "s"
    write_store(samples, store, codec="none")  # a frame is the record's archive itself
    (shard,) = _shards(store)
    offset, stored, _, _ = _frames(shard)[4]
    data = bytearray(shard.read_bytes())
    pad = data.find(b"ZZZZ", offset, offset + stored)
    assert pad > 0
    data[pad + 1] ^= 0x55
    shard.write_bytes(bytes(data))
    _lose_footer(shard)
    report = recover_store(store)
    assert _check_kept(store, samples, report) == {4}


def test_plain_shard_of_a_store_with_a_compact_append_is_walked_as_plain(tmp_path: Path) -> None:
    """Shards written without column blocks are rebuilt as plain shards even where a later
    compact append made the store list columnar-frames: one damaged record, the rest kept."""
    samples = [{"x": torch.full((200,), float(i)), "i": i} for i in range(60)]
    store = tmp_path / "s"
    write_store(samples[:40], store, codec="zstd", max_shard_bytes=20000)
    write_store(samples[40:], store, mode="append", compact=True)
    with open_store(store) as reader:
        entry = reader.index.shards[1]  # a plain shard of the first writer
    assert entry.records > 3
    victim, first = store / entry.name, entry.first_record
    _lose_footer(victim, damage=(2,))
    report = recover_store(store)
    assert _check_kept(store, samples, report) == {first + 2}


@pytest.mark.parametrize("table_left", [40, 3])
def test_no_index_middle_shard_end_found_by_its_table(tmp_path: Path, table_left: int) -> None:
    """No index, a middle shard's footer lost and one damaged frame: its writer's next shard
    counts its records. Where enough of its record table is left to be recognised right after
    its last frame, that is where its frames end, so the frames after the damaged one are
    counted back from there; with 3 bytes of it left, the end is not known and only the frames
    before the damaged one are kept."""
    samples = [{"x": torch.full((200,), float(i)), "i": i} for i in range(60)]
    store = tmp_path / "s"
    write_store(samples, store, codec="zstd", max_shard_bytes=12000)
    names = _shards(store)
    assert len(names) >= 3
    with open_store(store) as reader:
        first = reader.index.shards[1].first_record
    frames = _frames(names[1])
    data = bytearray(names[1].read_bytes())
    offset, stored = frames[2][:2]
    data[offset + stored - 6] ^= 0x55
    names[1].write_bytes(bytes(data[: frames[-1][0] + frames[-1][1] + table_left]))
    (store / "index.json").unlink()
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert lost == ({first + 2} if table_left >= 16 else set(range(first + 2, first + frames[-1][3])))


def test_no_index_last_shard_of_a_writer_keeps_no_guess(tmp_path: Path) -> None:
    """No index, and the last shard of a writer (another writer appended after it) lost its
    footer and has a damaged frame: nothing counts its records, so the frames after the
    damaged one are not kept at guessed numbers; the report says an unknown number was lost."""
    samples = [{"x": torch.full((200,), float(i)), "i": i} for i in range(60)]
    store = tmp_path / "s"
    write_store(samples[:40], store, codec="zstd", max_shard_bytes=20000)
    write_store(samples[40:], store, mode="append")
    with open_store(store) as reader:
        entries = list(reader.index.shards)
    victim = store / entries[len(entries) - 2].name  # the first writer's last shard
    _lose_footer(victim, damage=(2,))
    (store / "index.json").unlink()
    report = recover_store(store)
    assert victim.name in report.records_unknown
    lost = _check_kept(store, samples, report)
    first = entries[len(entries) - 2].first_record
    assert first + 2 in lost and lost <= set(range(first + 2, 40))


def test_shard_cut_at_a_frame_boundary_is_not_counted_back_from_its_end(tmp_path: Path) -> None:
    """The index gives the shard's record count, but the file was cut at a frame boundary (its
    last frames, table and footer gone) and one earlier frame is damaged: the walk ends on a
    whole frame, yet not where the shard's frames end, so nothing after the damaged frame is
    counted back from the index's count."""
    samples = [{"x": torch.full((100,), float(i))} for i in range(10)]
    store = tmp_path / "s"
    write_store(samples, store, codec="zstd")
    (shard,) = _shards(store)
    frames = _frames(shard)
    data = bytearray(shard.read_bytes())
    offset, stored = frames[2][:2]
    data[offset + stored // 2] ^= 0x55
    shard.write_bytes(bytes(data[: frames[6][0] + frames[6][1]]))
    report = recover_store(store)
    assert _check_kept(store, samples, report) == set(range(2, 10))


def test_no_index_shard_that_proves_nothing_keeps_its_place(tmp_path: Path) -> None:
    """No index: writer A's last shard lost its footer and its first frame; writer B appended a
    shard after it. A's shard proves nothing, but B's intact shard still follows it, and the
    records between are reported lost."""
    samples = [{"x": torch.full((100,), float(i))} for i in range(12)]
    store = tmp_path / "s"
    write_store(samples[:8], store, codec="none", max_shard_bytes=3000)
    write_store(samples[8:], store, mode="append")
    with open_store(store) as reader:
        entries = list(reader.index.shards)
    last_a = [e for e in entries if e.first_record < 8][-1]
    _lose_footer(store / last_a.name, damage=(0,))
    (store / "index.json").unlink()
    report = recover_store(store)
    lost = _check_kept(store, samples, report)
    assert not lost & set(range(8, 12)) and last_a.first_record in lost
    assert report.records == 12 - len(lost)


def test_no_index_shards_that_prove_nothing_are_reported_lost(tmp_path: Path) -> None:
    """No index, and every frame of both shards damaged (their footers intact): nothing is
    kept, and the report counts the 10 records the footers say the shards held."""
    samples = [{"x": torch.randn(200, generator=torch.Generator().manual_seed(i))} for i in range(10)]
    store = tmp_path / "s"
    write_store(samples, store, codec="zstd", max_shard_bytes=5000)
    for shard in _shards(store):
        data = bytearray(shard.read_bytes())
        for offset, stored, _, _ in _frames(shard):
            data[offset + stored // 2] ^= 0x55
        shard.write_bytes(bytes(data))
    (store / "index.json").unlink()
    report = recover_store(store)
    assert report.records == 0 and report.records_lost == 10


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_compact_block_with_damaged_magic_still_walked_as_a_block(tmp_path: Path, codec: str) -> None:
    """A single-shard compact store whose only column block lost its magic (so the walk cannot
    tell it is a block) and its footer: the index lists column blocks, so the shard is walked
    as one, and the torch.save archive that ends the block (a record's uint8 tensor) is never
    kept as a record."""
    from tensorstore_pt.columnar import MAGIC

    gen = torch.Generator().manual_seed(0)
    inner = dumps({"never_written": torch.arange(7)})
    samples: list[Any] = [
        {"blob": torch.randint(0, 256, (len(inner),), dtype=torch.uint8, generator=gen)} for _ in range(2)
    ]
    samples.append({"blob": torch.frombuffer(bytearray(inner), dtype=torch.uint8).clone()})
    store = tmp_path / "s"
    write_store(samples, store, codec=codec, compact=True, raw_below=0.99)  # blocks stored raw
    (shard,) = _shards(store)
    (offset, stored, _, _), *_ = _frames(shard)
    data = bytearray(shard.read_bytes())
    assert bytes(data[offset : offset + len(MAGIC)]) == MAGIC
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    _lose_footer(shard)
    report = recover_store(store)
    assert _check_kept(store, samples, report) == {0, 1, 2}


def test_no_index_table_remnant_of_8_to_15_bytes_places_the_next_shards(tmp_path: Path) -> None:
    """No index: an appending writer's first shard was cut 10 bytes into its record table (all
    its frames intact). That is enough to know where its frames end, so it and the writer's
    later intact shards join the store; nothing is dropped unsaid."""
    gen = torch.Generator().manual_seed(0)
    samples = [{"x": torch.randn(100, generator=gen), "i": i} for i in range(16)]
    store = tmp_path / "s"
    write_store(samples[:8], store, codec="zstd")
    write_store(samples[8:], store, mode="append", codec="zstd", max_shard_bytes=3200)
    with open_store(store) as reader:
        first_b = reader.index.shards[1]
    frames = _frames(store / first_b.name)
    data = (store / first_b.name).read_bytes()
    (store / first_b.name).write_bytes(data[: frames[-1][0] + frames[-1][1] + 10])
    (store / "index.json").unlink()
    report = recover_store(store)
    assert _check_kept(store, samples, report) == set()


def test_dry_run_agrees_with_the_run_when_a_shard_proves_nothing(tmp_path: Path) -> None:
    """No index, a shard that proves nothing keeps its place in the sequence: the dry run and
    the run keep the same shards, and neither lists an empty copy of it."""
    gen = torch.Generator().manual_seed(0)
    samples = [{"x": torch.randn(100, generator=gen), "i": i} for i in range(10)]
    store = tmp_path / "s"
    write_store(samples[:6], store, codec="none", max_shard_bytes=9000)
    write_store(samples[6:], store, mode="append", codec="none")
    with open_store(store) as reader:
        last_a = [e for e in reader.index.shards if e.first_record < 6][-1]
    _lose_footer(store / last_a.name, damage=(0,))
    (store / "index.json").unlink()
    dry = recover_store(store, dry_run=True)
    real = recover_store(store)
    assert [(k.first_record, k.records) for k in dry.kept] == [(k.first_record, k.records) for k in real.kept]
    assert all(k.records for k in real.kept)
    assert dry.records_lost == real.records_lost
    _check_kept(store, samples, real)
