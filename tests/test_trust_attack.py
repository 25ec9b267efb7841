"""Adversarial review of issue 10 (attack10): each test states a promise of
/work/spec-issue10.md (or of recover.py's docstring) and checks it under an attack.

Tests that fail mark faults found by this review; the others record attacks that held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import tensorstore_pt as ts
from _trust_tools import (
    LOCK_NAME,
    assert_never_deleted,
    digests,
    readable_records,
    recovered_positions,
    shard_names,
    tagged_list,
)
from tensorstore_pt.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def _run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=_env(), capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- dictionary


def test_recover_does_not_dismantle_a_store_whose_dictionary_file_is_missing(tmp_path: Path) -> None:
    """Promise: recover never makes a store worse; it keeps what checksums prove.

    A zstd dictionary store whose .zdict file is missing (moved away, not yet restored from a
    backup) has every shard intact. Recover cannot decode them, but it must not commit an
    empty index and quarantine every shard: once the dictionary is back, the store must be
    whole again (directly, or after running recover again)."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(300), store, codec="zstd", dictionary=True, max_shard_bytes=20000, metadata={"m": 1})
    dname = json.loads((store / "index.json").read_text())["codec"]["dict"]["name"]
    saved = tmp_path / "saved.zdict"
    os.rename(store / dname, saved)
    try:
        ts.recover_store(store)
    except ts.TensorStoreError:
        pass  # refusing ("restore the dictionary first") is fine
    os.rename(saved, store / dname)
    try:
        ts.recover_store(store)
    except ts.TensorStoreError:
        pass
    got = len(readable_records(store))
    assert got == 300, (
        "recover on a dictionary store whose .zdict file was missing must leave the shards in place "
        f"(all 300 records are intact); after restoring the dictionary only {got} records are readable: "
        f"files now {sorted(os.listdir(store))}"
    )


# --------------------------------------------------------------------------- races


class _AppendBeforeLock(LocalStorage):
    """A writer commits an append in the instant between recover's listing and its lock."""

    done = False

    def lock(self, owner: Any) -> Any:
        if owner is not None and not self.done:
            self.done = True
            ts.write_store(tagged_list(50)[30:], self.location, mode="append")
        return super().lock(owner)


def test_recover_does_not_drop_an_append_committed_just_before_it_locked(tmp_path: Path) -> None:
    """Promise: records readable after recover >= before; one writer or recover at a time.

    recover_store lists the directory *before* it takes the lock. A writer that commits in
    between (it held the lock, recover had not yet asked) leaves an index naming a shard the
    listing does not have: recover then writes an index without it, losing committed records."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    ts.recover_store(_AppendBeforeLock(store))
    got = len(readable_records(store))
    assert got == 50, (
        f"an append committed 50 records just before recover took the lock; after recover only {got} are "
        "readable (recover must list the store after taking its lock)"
    )


# --------------------------------------------------------------------------- dead overwrite


def test_recover_does_not_adopt_a_dead_overwrite_into_an_empty_store(tmp_path: Path) -> None:
    """Promise: recover never adopts another version's shards when a valid index exists.

    A committed, empty store (0 records, metadata v=0). An overwrite writer (new version, v=1)
    is SIGKILLed after finishing shards. Its shards start at record 0, which "continues" the
    empty sequence, so recover adopts them: the store now serves uncommitted records of the
    new version under the old version's metadata."""
    store = tmp_path / "s"
    ts.write_store([], store, metadata={"v": 0})
    child = _run_child(
        f"""
        import os, signal
        import tensorstore_pt as ts
        from _trust_tools import tagged_list
        w = ts.ShardWriter({str(store)!r}, mode="overwrite", max_shard_bytes=2000, metadata={{"v": 1}}, num_threads=1)
        for x in tagged_list(60, version=1):
            w.write(x)
        while w._pending:
            w._drain_one()
        w._emit_group(w._grouper.flush())
        w._close_shard()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert shard_names(store), "the killed overwrite left no shards: the attack did not run"
    assert len(readable_records(store)) == 0
    ts.recover_store(store)
    r = ts.open_store(store)
    versions = {int(r[i]["v"]) for i in range(len(r))}
    meta = r.metadata
    r.close()
    assert versions <= {0}, (
        f"recover adopted {len(r)} records of an overwrite (version 1) that never committed into the committed "
        f"empty version 0 (metadata {meta}): the lock record says mode 'overwrite', its shards are a new version"
    )


# --------------------------------------------------------------------------- odd lock files


def test_recover_dry_run_does_not_hang_on_a_fifo_lock_file(tmp_path: Path) -> None:
    """Promise: a second writer/recover gets StoreBusyError *at once*; recover --dry-run changes
    nothing and answers. With ``.tspt-lock`` replaced by a FIFO, the dry run's lock probe opens
    it O_RDONLY without O_NONBLOCK and blocks forever (waiting for a FIFO writer)."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    os.unlink(store / LOCK_NAME)
    os.mkfifo(store / LOCK_NAME)
    code = f"""
        import tensorstore_pt as ts
        try:
            print("records", ts.recover_store({str(store)!r}, dry_run=True).records)
        except ts.TensorStoreError as exc:
            print("refused", type(exc).__name__)
        except OSError as exc:
            print("oserror", exc)
        """
    try:
        child = _run_child(code, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(
            "recover_store(dry_run=True) hung for 30 s on a store whose .tspt-lock is a FIFO (open without O_NONBLOCK)"
        )
    assert child.returncode == 0, child.stderr


def test_a_symlinked_lock_file_never_truncates_its_target(tmp_path: Path) -> None:
    """Promise: recover never makes a store worse, never deletes (or truncates) a file.

    ``.tspt-lock`` is a symlink (left by a sync tool, a copy with ``cp -s``, or hostile) to
    ``index.json``. The lock is opened O_RDWR|O_CREAT without O_NOFOLLOW: recover writes its
    owner record into index.json (then reads that as a damaged index), and an append writer
    truncates index.json to 0 bytes on release: the committed store is gone."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    os.unlink(store / LOCK_NAME)
    os.symlink("index.json", store / LOCK_NAME)
    for attempt in (
        lambda: ts.recover_store(store),
        lambda: ts.write_store(tagged_list(40)[30:], store, mode="append"),
    ):
        try:
            attempt()
        except (ts.TensorStoreError, OSError):
            pass  # refusing an odd lock file is fine
    got = len(readable_records(store))
    assert got >= 30, (
        f"recover then an append with .tspt-lock -> index.json (a symlink) left {got} of 30 readable records; index.json is now "
        f"{(store / 'index.json').stat().st_size} bytes (the lock's owner record was written through the symlink)"
    )


def test_a_symlinked_lock_file_never_truncates_a_file_outside_the_store(tmp_path: Path) -> None:
    """Same attack on a writer: ``.tspt-lock`` links to a file outside the store; an append must
    not write its owner record into that file nor truncate it."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    precious = tmp_path / "precious.txt"
    precious.write_text("do not touch\n")
    os.unlink(store / LOCK_NAME)
    os.symlink(precious, store / LOCK_NAME)
    try:
        ts.write_store(tagged_list(40)[30:], store, mode="append")
    except (ts.TensorStoreError, OSError):
        pass
    assert precious.read_text() == "do not touch\n", (
        f"an append truncated/overwrote {precious} through a symlinked .tspt-lock: now {precious.read_bytes()!r}"
    )


def test_recover_dry_run_predicts_a_lock_file_that_is_a_directory(tmp_path: Path) -> None:
    """Promise: dry-run predicts the result. With ``.tspt-lock`` a directory the dry run reports
    success (and what it would keep), while the real recover cannot create its lock and raises
    IsADirectoryError: the dry run should say so (or recover should cope)."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    os.unlink(store / LOCK_NAME)
    os.mkdir(store / LOCK_NAME)
    dry_exc = real_exc = None
    try:
        ts.recover_store(store, dry_run=True)
    except Exception as exc:  # noqa: BLE001
        dry_exc = exc
    try:
        ts.recover_store(store)
    except Exception as exc:  # noqa: BLE001
        real_exc = exc
    assert (dry_exc is None) == (real_exc is None), (
        f"dry run: {type(dry_exc).__name__ if dry_exc else 'succeeded'}; real recover: "
        f"{type(real_exc).__name__ if real_exc else 'succeeded'} ({real_exc}): the dry run does not predict the result"
    )


def test_garbage_and_huge_lock_files_do_not_stop_writers_or_recover(tmp_path: Path) -> None:
    """Held: a lock file holding 10 MiB of junk is treated as a dead holder's unreadable record."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store)
    (store / LOCK_NAME).write_bytes(b"\xff" * (10 * 2**20))
    assert ts.recover_store(store, dry_run=True).records == 30
    assert ts.recover_store(store).records == 30
    (store / LOCK_NAME).write_bytes(b"{not json" * 1000)
    ts.write_store(tagged_list(40)[30:], store, mode="append")
    assert readable_records(store) == list(range(40))


# --------------------------------------------------------------------------- lost footer + damage


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_lost_footer_and_one_damaged_frame_keeps_the_frames_after_it(tmp_path: Path, codec: str) -> None:
    """Promise (recover.py): every record a shard still proves (for a lost footer: its frames
    decode and every zip entry matches its CRC-32) is in the recovered store.

    One shard of 100 one-record frames; record 10's frame has a flipped byte AND the footer is
    lost (file truncated at the record table). The frame walk stops at the damaged frame, so
    records 11..99, whose frames decode and whose CRC-32s match, are all lost. zstd frames
    (magic 28 b5 2f fd), lz4 frames (04 22 4d 18) and zip records (PK 03 04) can be found
    again by their magic: the walk should resynchronise past a damaged frame."""
    from _store_tools import layout

    from _trust_tools import flip_byte, truncate_to

    store = tmp_path / "s"
    ts.write_store(tagged_list(100), store, codec=codec, num_threads=1)
    (name,) = shard_names(store)
    _, table_offset, _, table = layout(store / name)
    flip_byte(store / name, int(table["offset"][10]) + int(table["stored"][10]) // 2)
    truncate_to(store / name, table_offset)
    rec = ts.recover_store(store)
    kept = [i for _, i in recovered_positions(store)]
    assert kept[:10] == list(range(10)), kept[:12]
    missing_after = [i for i in range(11, 100) if i not in kept]
    assert not missing_after, (
        f"codec {codec}: recover kept {rec.records} records; records 11..99 (intact frames after the damaged record "
        f"10, footer lost) were dropped: {len(missing_after)} provable records lost"
    )


# --------------------------------------------------------------------------- versions without an index


def test_recover_without_an_index_never_mixes_two_versions(tmp_path: Path) -> None:
    """Promise (recover.py): "It never invents or mixes ... no shard of another version";
    without an index "the longest record sequence is kept" - of ONE version.

    Version 1: shard A0 (records 0..9). Overwrite -> version 2: B0 (0..9), then an append C0
    (10..19). A0 is left behind (the overwrite's removal of old shards failed, or it was killed
    after its commit) and index.json is then lost. The chains A0+C0 and B0+C0 both prove 20
    records; the tie is broken by the shard name, i.e. by the random writer token, so about
    half the time recover serves version 1's records 0..9 followed by version 2's 10..19."""
    store = tmp_path / "s"
    scratch = tmp_path / "v1"
    ts.write_store(tagged_list(10, version=2), store)
    ts.write_store(tagged_list(20, version=2)[10:], store, mode="append")
    for _ in range(200):  # a version-1 writer whose random token sorts before version 2's (p ~ 1/2 per try)
        shutil.rmtree(scratch, ignore_errors=True)
        ts.write_store(tagged_list(10, version=1), scratch)
        (a0,) = shard_names(scratch)
        if a0 < min(shard_names(store)):
            break
    else:  # pragma: no cover
        pytest.skip("could not draw a token order (astronomically unlikely)")
    shutil.copy(scratch / a0, store / a0)
    os.unlink(store / "index.json")
    ts.recover_store(store)
    got = recovered_positions(store)
    versions = sorted({v for v, _ in got})
    assert len(versions) == 1, (
        f"recover (no index) served records of versions {versions}: {got[:3]} ... {got[-3:]} "
        "(version 1's first shard chained with version 2's append)"
    )


# --------------------------------------------------------------------------- hostile index edits


def _hostile_edit(store: Path, how: str) -> None:
    obj = json.loads((store / "index.json").read_text())
    s = obj["shards"]
    if how == "shard-twice":
        s.insert(2, dict(s[1]))
    elif how == "out-of-order":
        s[1], s[2] = s[2], s[1]
    elif how == "first-record-gap":
        for e in s[2:]:
            e["first_record"] += 5
    elif how == "non-shard-name":
        s[1]["name"] = "index.json"
    elif how == "quarantined-name":
        os.rename(store / s[1]["name"], store / (s[1]["name"] + ".quarantined"))
        s[1]["name"] = s[1]["name"] + ".quarantined"
    elif how == "codec-brotli":
        obj["codec"] = {"id": "brotli", "level": 5}
    elif how == "unknown-feature":
        obj["features"] = ["multi-record-framesx"]
        obj["format_version"] = [1, 1]
    elif how == "records-disagree":
        s[1]["records"] += 3
    elif how == "same-shard-two-names":
        new = s[1]["name"].replace("-00001.tspt", "-00099.tspt")
        shutil.copy(store / s[1]["name"], store / new)
        s.insert(2, {**s[1], "name": new})
    elif how == "huge-index":
        obj["metadata"] = {"pad": "x" * (40 * 2**20)}
    else:  # pragma: no cover
        raise AssertionError(how)
    (store / "index.json").write_text(json.dumps(obj, indent=1))


@pytest.mark.parametrize(
    "how",
    ["shard-twice", "out-of-order", "first-record-gap", "non-shard-name", "quarantined-name", "codec-brotli",
     "unknown-feature", "records-disagree", "same-shard-two-names", "huge-index"],
)  # fmt: skip
def test_hostile_index_edits_recover_invariants(tmp_path: Path, how: str) -> None:
    """Promises: readable after >= before; an in-order subsequence, bit-identical, no duplicates;
    nothing deleted; dry run changes nothing and predicts the count; a rerun changes nothing."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(60), store, max_shard_bytes=4000, num_threads=1, metadata={"k": 1})
    assert len(shard_names(store)) >= 4
    _hostile_edit(store, how)
    before_n = len(readable_records(store))
    before = digests(store)
    # codec-brotli: an unknown codec in the index while every footer names a known one is a
    # damaged index (a newer writer's store would have newer footers too): recover repairs it.
    dry = ts.recover_store(store, dry_run=True)
    assert digests(store) == before, f"{how}: the dry run changed the store"
    rec = ts.recover_store(store)
    assert dry.records == rec.records, f"{how}: dry run predicted {dry.records} records, recover kept {rec.records}"
    got = [i for _, i in recovered_positions(store)]
    assert got == sorted(set(got)), (
        f"{how}: recovered records are not an in-order subsequence without duplicates: {got}"
    )
    assert len(got) >= before_n, f"{how}: {before_n} records readable before recover, {len(got)} after"
    assert len(got) == 60, f"{how}: every shard is intact, yet recover kept {len(got)} of 60 records"
    assert_never_deleted(before, store)
    again = digests(store)
    rerun = ts.recover_store(store)
    assert not rerun.changed and digests(store) == again, (
        f"{how}: a second recover changed the store: {rerun.to_json()}"
    )


# --------------------------------------------------------------------------- attacks that held (recorded)


def test_two_recovers_at_once_one_is_busy(tmp_path: Path) -> None:
    """Held: two recover processes started together; at most one runs, the other is StoreBusyError; result intact."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(200), store, max_shard_bytes=4000, num_threads=1)
    os.unlink(store / "index.json")
    code = f"""
        import tensorstore_pt as ts
        try:
            print("ok", ts.recover_store({str(store)!r}).records)
        except ts.StoreBusyError as exc:
            print("busy", exc)
        """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert any(o.startswith("ok 200") for o, _ in outs), outs
    assert readable_records(store) == list(range(200))
    assert not ts.recover_store(store).changed


def test_every_shard_damaged_and_zero_record_store(tmp_path: Path) -> None:
    """Held: every shard's middle byte flipped -> recover keeps only proven records, never fewer than
    before; a zero-record store with a damaged index recovers to an empty store."""
    from _trust_tools import flip_byte

    store = tmp_path / "s"
    ts.write_store(tagged_list(40), store, max_shard_bytes=4000, num_threads=1)
    for n in shard_names(store):
        flip_byte(store / n, (store / n).stat().st_size // 2)
    before_n = len(readable_records(store))
    before = digests(store)
    rec = ts.recover_store(store)
    got = [i for _, i in recovered_positions(store)]
    assert got == sorted(set(got)) and len(got) >= before_n and rec.records == len(got)
    assert_never_deleted(before, store)
    empty = tmp_path / "e"
    ts.write_store([], empty)
    (empty / "index.json").write_text("{broken")
    rec = ts.recover_store(empty)
    assert rec.records == 0 and len(ts.open_store(empty)) == 0


def test_legacy_shards_then_an_append_lose_the_index(tmp_path: Path) -> None:
    """Held: a legacy store (shard-NNNNN.tspt) appended with new-style names; index lost; recover keeps all."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(20), store, max_shard_bytes=4000, num_threads=1)
    obj = json.loads((store / "index.json").read_text())
    for k, e in enumerate(obj["shards"]):
        legacy = f"shard-{k:05d}.tspt"
        os.rename(store / e["name"], store / legacy)
        e["name"] = legacy
    (store / "index.json").write_text(json.dumps(obj, indent=1))
    assert readable_records(store) == list(range(20))
    ts.write_store(tagged_list(40)[20:], store, mode="append", max_shard_bytes=4000)
    assert readable_records(store) == list(range(40))
    os.unlink(store / "index.json")
    rec = ts.recover_store(store)
    assert rec.records == 40 and [i for _, i in recovered_positions(store)] == list(range(40))


def test_recover_killed_at_every_step_rerun_finishes(tmp_path: Path) -> None:
    """Held: recover (copying shards after a lost record) SIGKILLed right after each storage
    write/move; a rerun finishes with the same records, never fewer than before."""
    from _store_tools import layout

    from _trust_tools import flip_byte

    for step in range(1, 12):
        store = tmp_path / f"s{step}"
        ts.write_store(tagged_list(60), store, max_shard_bytes=4000, num_threads=1)
        first = sorted(shard_names(store))[0]
        _, _, _, table = layout(store / first)
        flip_byte(store / first, int(table["offset"][1]) + 3)
        child = _run_child(
            f"""
            import os, signal
            import tensorstore_pt as ts
            from tensorstore_pt.storage import LocalStorage
            n = [0]
            class S(LocalStorage):
                def _tick(self):
                    n[0] += 1
                    if n[0] == {step}:
                        os.kill(os.getpid(), signal.SIGKILL)
                def move(self, a, b):
                    super().move(a, b); self._tick()
                def writer(self, name, exclusive=False):
                    w = super().writer(name, exclusive=exclusive)
                    c = w.commit
                    def commit():
                        c(); self._tick()
                    w.commit = commit
                    return w
            ts.recover_store(S({str(store)!r}))
            """
        )
        assert child.returncode in (0, -signal.SIGKILL), child.stderr
        ts.recover_store(store)
        got = [i for _, i in recovered_positions(store)]
        assert got == [i for i in range(60) if i != 1], f"killed at step {step}: {got}"
        assert not ts.recover_store(store).changed, f"killed at step {step}: a third run still changed the store"


def test_report_does_not_count_a_duplicate_shard_as_lost_records(tmp_path: Path) -> None:
    """Promise: the report says per shard which records were kept and lost. The index lists a
    shard and a byte-identical copy under another name (same first_record). Recover keeps all 60
    records, yet the quarantined copy's range is reported as lost and counted in records_lost
    (and in the note "N record(s) could not be proven")."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(60), store, max_shard_bytes=4000, num_threads=1)
    _hostile_edit(store, "same-shard-two-names")
    rec = ts.recover_store(store)
    assert rec.records == 60
    assert rec.records_lost == 0, (
        f"recover kept all 60 records but reports records_lost={rec.records_lost}: "
        f"{[s.to_json() for s in rec.shards if s.lost]}"
    )


def test_a_newer_writers_store_is_left_untouched(tmp_path: Path) -> None:
    """A store whose index AND shard footers name a feature this version does not know is a
    newer writer's store: recover refuses it (UnsupportedFormatError) and changes nothing."""
    import numpy as np

    from tensorstore_pt.checksums import digest_int
    from tensorstore_pt.format import RECORD_DTYPE, TRAILER_BYTES, decode_trailer, encode_footer

    store = tmp_path / "s"
    ts.write_store(tagged_list(10), store, max_shard_bytes=4000)
    obj = json.loads((store / "index.json").read_text())
    obj["features"], obj["format_version"] = ["from-the-future"], [1, 9]
    for s in obj["shards"]:  # footers that say so too, with valid footer checksums
        p = store / s["name"]
        data = p.read_bytes()
        table_offset, count, js, _ = decode_trailer(data[-TRAILER_BYTES:], len(data), str(p))
        table = np.frombuffer(data, dtype=RECORD_DTYPE, count=count, offset=table_offset).copy()
        meta = json.loads(data[len(data) - TRAILER_BYTES - js : len(data) - TRAILER_BYTES])
        meta["features"], meta["format_version"] = ["from-the-future"], [1, 9]
        new = data[:table_offset] + encode_footer(table, meta)
        p.write_bytes(new)
        s["file_bytes"], s["checksum"] = len(new), f"xxh3_64:{digest_int(new):016x}"
    obj["totals"]["file_bytes"] = sum(s["file_bytes"] for s in obj["shards"])
    (store / "index.json").write_text(json.dumps(obj, indent=1))
    before = digests(store)
    with pytest.raises(ts.UnsupportedFormatError, match="from-the-future"):
        ts.recover_store(store)
    assert digests(store) == before
