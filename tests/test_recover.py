"""Crash recovery: SIGKILL a writer at random points, then ``recover_store`` must give a store
that verifies clean, holds a prefix of the input, and keeps every record of every shard that
was complete when the writer died. Nothing is ever deleted."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tensorstore_pt.storage import TEMP_MARKER
from _trust_tools import fork_and_kill
from _store_tools import (
    copy_store,
    file_digests,
    flip,
    layout,
    make_store,
    same,
    sample,
    samples,
    shard_path,
)

from tensorstore_pt import (
    NotAStoreError,
    StoreBusyError,
    StoreNotFoundError,
    open_store,
    recover_store,
    verify_store,
    write_store,
)
from tensorstore_pt.cli import main
from tensorstore_pt.format import SHARD_SUFFIX
from tensorstore_pt.recover import _Scanner
from tensorstore_pt.storage import LocalStorage

N = 48
SHARD_BYTES = 6000  # a few records a shard: many shard boundaries to die at
CODEC_CYCLE = ("zstd", "lz4", "none")
#: Writer options cycled over the seeds: each codec, and the format 1.1 options.
CONFIGS: tuple[dict[str, Any], ...] = (
    {"codec": "zstd"},
    {"codec": "lz4"},
    {"codec": "none"},
    {"codec": "zstd", "dictionary": 1024},
    {"codec": "lz4", "frame_target_bytes": 3000},
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child(store: Path, data: list[Any], seed: int, mode: str, how: str, config: dict[str, Any]) -> None:
    """Runs in the forked writer: write ``data``; die as ``how`` says."""
    rng = random.Random(seed)
    if how == "at-record":
        k = rng.randrange(len(data) + 1)

        def gen() -> Any:
            for i, s in enumerate(data):
                if i == k:
                    _die()
                yield s

        source: Any = gen()
    else:
        source = data
    if how in ("in-commit", "after-commit"):
        # Die inside the commit protocol: just before or just after the m-th rename (shard
        # renames, then the index's), i.e. with a complete temporary file or a fresh rename.
        calls = collections.Counter()  # type: ignore[var-annotated]
        real_replace = os.replace
        m = rng.randrange(1, len(data) // 2)

        real_link = os.link

        def publish(real: Any) -> Any:
            # Shards are published with link(2) (never clobbering), the index with rename(2).
            def wrapper(src: Any, dst: Any) -> None:
                calls["n"] += 1
                if calls["n"] == m and how == "in-commit":
                    _die()
                real(src, dst)
                if calls["n"] == m:
                    _die()

            return wrapper

        os.replace = publish(real_replace)  # type: ignore[assignment]
        os.link = publish(real_link)  # type: ignore[assignment]
    if how == "in-cleanup":
        real_unlink = os.unlink

        def unlink(path: Any, *a: Any, **k: Any) -> None:
            if TEMP_MARKER in os.fspath(path):
                real_unlink(path, *a, **k)  # a published shard's temporary name
            else:
                _die()  # overwrite's removal of the old shards

        os.unlink = unlink  # type: ignore[assignment]
    write_store(source, store, max_shard_bytes=SHARD_BYTES, mode=mode, metadata={"seed": seed}, num_threads=1, **config)


def run_killed_writer(
    store: Path,
    data: list[Any],
    seed: int,
    mode: str = "create",
    how: str = "timer",
    delay: float = 0.0,
    config: dict[str, Any] | None = None,
) -> int:
    """Fork a writer, let it die (or kill it after ``delay`` s); return its wait status."""
    return fork_and_kill(lambda: _child(store, data, seed, mode, how, config or {}), delay if how == "timer" else None)


def complete_shard_ends(store: Path) -> int:
    """Records covered by the shard files under their final names (complete by the protocol)."""
    end = 0
    if store.is_dir():
        storage = LocalStorage(store)
        for p in store.iterdir():
            if p.name.endswith(SHARD_SUFFIX) and not p.name.startswith("."):
                scan = _Scanner(storage).scan(p.name, p.name)
                assert scan.intact and scan.entry is not None, (
                    f"{p.name} under its final name is not complete: {scan.reason}"
                )
                end = max(end, scan.entry.first_record + scan.entry.records)
    return end


def recovered_count(store: Path) -> int:
    try:
        rec = recover_store(store)
    except (NotAStoreError, StoreNotFoundError):
        return 0  # died before writing anything: an empty prefix
    assert rec.records == len(open_store(store))
    return rec.records


def check_prefix(store: Path, data: list[Any], at_least: int) -> int:
    n = recovered_count(store)
    if n == 0 and not (store / "index.json").exists():
        assert at_least == 0
        return 0
    report = verify_store(store, deep=True)
    assert report.ok, report.problems
    r = open_store(store)
    assert len(r) == n
    assert n >= at_least, f"recover kept {n} records, but complete shards held {at_least}"
    assert n <= len(data)
    for i in range(n):
        assert same(r[i], data[i]), f"record {i} is not input record {i}"
    again = recover_store(store)
    assert not again.changed, again
    return n


@pytest.mark.timeout(120)
def test_kill_and_recover_many_seeds(tmp_path: Path) -> None:
    data = samples(N)
    t0 = time.perf_counter()
    write_store(data, tmp_path / "calibrate", codec="zstd", max_shard_bytes=SHARD_BYTES, num_threads=1)
    full = time.perf_counter() - t0
    hows = ("timer", "at-record", "in-commit", "after-commit")
    kept = []
    for seed in range(24):
        store = tmp_path / f"s{seed}"
        how = hows[seed % len(hows)]
        delay = random.Random(seed).uniform(0.0, 1.2 * full)
        run_killed_writer(store, data, seed, how=how, delay=delay, config=CONFIGS[seed % len(CONFIGS)])
        before = file_digests(store) if store.exists() else {}
        must = complete_shard_ends(store)
        n = check_prefix(store, data, must)
        kept.append((how, n))
        after = file_digests(store) if store.exists() else {}
        assert collections.Counter(before.values()) - collections.Counter(after.values()) == collections.Counter(), (
            "recover deleted or changed a file"
        )
    # The seeds reached both partial and complete outcomes.
    assert any(0 < n < N for _, n in kept), kept
    assert any(n == N for _, n in kept) or any(n >= N // 2 for _, n in kept), kept


@pytest.mark.parametrize("how", ["at-record", "in-commit", "after-commit"])
def test_killed_append_keeps_old_records_and_complete_new_shards(tmp_path: Path, how: str) -> None:
    old, new = samples(N)[:20], samples(N)[20:]
    store = tmp_path / "s"
    for seed in range(3):
        if store.exists():
            import shutil

            shutil.rmtree(store)
        write_store(old, store, codec=CODEC_CYCLE[seed % 3], max_shard_bytes=SHARD_BYTES)
        run_killed_writer(store, new, seed, mode="append", how=how)
        must = max(complete_shard_ends(store), 20)
        n = check_prefix(store, old + new, must)
        assert n >= 20


def test_killed_overwrite_restores_one_whole_store(tmp_path: Path) -> None:
    old = samples(N)[:20]
    new = [sample(100 + i) for i in range(30)]
    for seed, how in enumerate(("at-record", "in-commit", "after-commit", "in-cleanup")):
        store = tmp_path / f"s{seed}"
        write_store(old, store, codec=CODEC_CYCLE[seed % 3], max_shard_bytes=SHARD_BYTES)
        run_killed_writer(store, new, seed, mode="overwrite", how=how)
        rec = recover_store(store)
        r = open_store(store)
        assert verify_store(store).ok
        expect = new if how == "in-cleanup" or len(r) == len(new) else old
        assert [same(r[i], expect[i]) for i in range(len(r))] == [True] * len(expect), how
        if how == "in-cleanup":
            assert rec.quarantined and all("older version" in q.reason for q in rec.quarantined)


@pytest.mark.parametrize("config", CONFIGS[3:], ids=["zstd-dict", "lz4-frames"])
def test_lost_index_of_a_v11_store(tmp_path: Path, config: dict[str, Any]) -> None:
    store = tmp_path / "s"
    write_store(samples(N), store, max_shard_bytes=SHARD_BYTES, **config)
    before = open_store(store).index
    (store / "index.json").unlink()
    rec = recover_store(store)
    after = open_store(store).index
    assert (after.codec, after.features, after.version, after.shards) == (
        before.codec,
        before.features,
        before.version,
        before.shards,
    )
    assert rec.records == N and verify_store(store, deep=True).ok
    r = open_store(store)
    assert all(same(r[i], sample(i)) for i in range(N))


def test_lost_index_is_rebuilt_but_metadata_is_lost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store(tmp_path / "s", "zstd")
    (store / "index.json").unlink()
    assert main(["recover", str(store)]) == 0
    out = capsys.readouterr().out
    assert "index.json was missing" in out and "kept 12 records" in out and "cannot be recovered" in out
    r = open_store(store)
    assert r.metadata == {} and len(r) == 12
    assert all(same(r[i], sample(i)) for i in range(12))


def test_damaged_index_metadata_is_salvaged_when_json_parses(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "lz4")
    obj = json.loads((store / "index.json").read_text())
    obj["shards"][0]["checksum"] = "md5:0"
    (store / "index.json").write_text(json.dumps(obj))
    rec = recover_store(store)
    assert rec.index_before == "damaged" and rec.metadata == "damaged index"
    assert open_store(store).metadata == {"seed": 7}
    assert (store / "index.json.quarantined").exists()


def test_temporary_index_gives_back_metadata(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "none")
    index = (store / "index.json").read_bytes()
    (store / "index.json").unlink()
    (store / ".index.json.tmp-999999999-abcd").write_bytes(index)
    rec = recover_store(store)
    assert rec.metadata == "temporary index" and open_store(store).metadata == {"seed": 7}


def test_complete_temporary_shard_is_renamed(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "zstd")
    last = shard_path(store, 2)
    (store / "index.json").unlink()
    last.rename(store / f".{last.name}.tmp-999999999-0123abcd")
    rec = recover_store(store)
    assert [k.how for k in rec.kept] == ["adopted", "adopted", "renamed"]
    assert rec.records == 12 and last.exists()


def test_live_writer_blocks_recover(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "zstd")
    tmp = store / f".shard-00003.tspt.tmp-{os.getppid()}-abcd"
    tmp.write_bytes(b"partial")
    with pytest.raises(StoreBusyError, match=str(os.getppid())):
        recover_store(store)
    assert tmp.exists()
    rec = recover_store(store, force=True)
    assert [q.name for q in rec.quarantined] == [tmp.name]
    assert (store / f"shard-00003.tspt.tmp-{os.getppid()}-abcd.quarantined").exists()


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "zstd")
    (store / "index.json").unlink()
    (store / ".shard-00003.tspt.tmp-999999999-ab").write_bytes(b"x" * 100)
    before = sorted(os.listdir(store)), file_digests(store)
    rec = recover_store(store, dry_run=True)
    assert rec.dry_run and rec.changed and rec.records == 12 and not rec.index_written
    assert (sorted(os.listdir(store)), file_digests(store)) == before


def test_damaged_middle_shard_keeps_its_other_records(tmp_path: Path) -> None:
    """A damaged record costs that record only; ``salvage`` is accepted and changes nothing."""
    base = make_store(tmp_path / "base", "zstd")
    _, _, _, table = layout(shard_path(base, 1))
    names = [shard_path(base, k).name for k in range(3)]
    for salvage in (False, True):
        store = copy_store(base, tmp_path / f"s{salvage}")
        flip(shard_path(store, 1), int(table["offset"][1]) + 3)  # record 5
        before = collections.Counter(file_digests(store).values())
        rec = recover_store(store, salvage=salvage)
        assert verify_store(store).ok
        r = open_store(store)
        expect = [i for i in range(12) if i != 5]
        assert rec.records == 11 and rec.records_lost == 1
        by_name = {o.name: o for o in rec.shards}
        assert (by_name[names[0]].action, by_name[names[0]].kept, by_name[names[0]].lost) == ("kept", 4, ())
        assert (by_name[names[1]].action, by_name[names[1]].kept, by_name[names[1]].lost) == ("copied", 3, ((5, 6),))
        assert (by_name[names[2]].action, by_name[names[2]].kept) == ("copied", 4)  # renumbered: 8-11 -> 7-10
        assert {q.name for q in rec.quarantined} == {names[1], names[2]}
        assert rec.index_backup == "index.json.quarantined" and (store / "index.json.quarantined").exists()
        assert [same(r[j], sample(i)) for j, i in enumerate(expect)] == [True] * len(expect)
        after = collections.Counter(file_digests(store).values())
        assert before - after == collections.Counter()  # the originals are all still there


def test_recover_on_clean_store_is_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store(tmp_path / "s", "none")
    before = file_digests(store)
    rec = recover_store(store)
    assert not rec.changed and rec.index_before == "valid" and rec.metadata == "index"
    assert file_digests(store) == before
    assert main(["recover", "--json", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] is False


def test_recover_unusable_input(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        recover_store(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="nothing to recover"):
        recover_store(tmp_path / "empty")
    assert main(["recover", str(tmp_path / "empty")]) == 2


def test_lost_index_and_a_damaged_middle_shard_keep_the_shards_after_it(tmp_path: Path) -> None:
    """Without an index, a writer's shards bridge a damaged shard of their own writer
    (campaign seed 300: recover kept records 0-22 of 36, a rerun kept 35)."""
    store = tmp_path / "s"
    data = samples(30)
    write_store(data, store, max_shard_bytes=1)  # one record a shard
    victim = shard_path(store, 10)
    _, _, _, table = layout(victim)
    (store / "index.json").unlink()
    flip(victim, int(table["offset"][0]) + 5)
    rec = recover_store(store)
    r = open_store(store)
    expect = [i for i in range(30) if i != 10]
    assert rec.records == 29 and rec.records_lost == 1
    assert [same(r[j], data[i]) for j, i in enumerate(expect)] == [True] * 29
    assert verify_store(store).ok
