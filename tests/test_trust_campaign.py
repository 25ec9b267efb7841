"""Issue 10 campaigns: the kind of each finding, not only its instance.

- damage: random stores, random damage (byte flips, truncations, zeroed 4 KiB pages, one-field
  index edits, deleted shards); reads never return wrong data, and recover never loses a
  readable record, never invents or duplicates one, never deletes a file;
- killed writers (create, append, overwrite) and killed recovers, then recover (again);
- overwrites racing 8 reader processes: every read is one version's exact record, every
  error is StoreChangedError.

Fixed seeds; the default run takes well under a minute. A bigger run:
``TSPT_CAMPAIGN=500 pytest tests/test_trust_campaign.py`` (runs per campaign; the reader
race then lasts TSPT_CAMPAIGN / 20 seconds, at least 3).
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

import tensorstore_pt as ts
from _trust_tools import (
    assert_never_deleted,
    campaign_runs,
    check_sample,
    digests,
    mutate,
    fork_and_kill,
    readable_tagged,
    recovered_positions,
    run_with,
    shard_names,
    tagged,
    tagged_list,
    truncate_to,
)

CONFIGS: tuple[dict[str, Any], ...] = (
    {"codec": "none"},
    {"codec": "zstd"},
    {"codec": "lz4"},
    {"codec": "zstd", "frame_target_bytes": 700},
    {"codec": "lz4", "frame_target_bytes": 700},
)


def _check_recovered(store: Path, before_ok: int, ctx: str) -> list[tuple[int, int]]:
    report = ts.verify_store(store, deep=True)
    assert report.ok, f"{ctx}: the recovered store does not verify: {[p.message for p in report.problems][:3]}"
    pos = recovered_positions(store)
    idx = [i for _, i in pos]
    assert len({v for v, _ in pos}) <= 1, f"{ctx}: records of several versions: {pos}"
    assert idx == sorted(set(idx)), f"{ctx}: not a strictly increasing subsequence of the originals: {idx}"
    assert len(pos) >= before_ok, f"{ctx}: {before_ok} records were readable before recover, {len(pos)} after"
    return pos


# --------------------------------------------------------------------------- damage


def _damage_run(tmp: Path, seed: int) -> tuple[int, int, int]:
    """One damage run; returns (records written, readable before recover, after)."""
    rng = random.Random(seed)
    config = CONFIGS[seed % len(CONFIGS)]
    n = rng.randrange(20, 50)
    store = tmp / f"m{seed}"
    shard_bytes = rng.choice([1500, 2500, 4000])
    ts.write_store(tagged_list(n), store, max_shard_bytes=shard_bytes, num_threads=1, metadata={"seed": seed}, **config)
    damage = [mutate(store, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    ctx = f"seed {seed}, {config}, {n} records, max_shard_bytes {shard_bytes}: {'; '.join(damage)}"
    before_ok = len(readable_tagged(store, {0}))
    before = digests(store)

    dry, exc = run_with(lambda: ts.recover_store(store, dry_run=True))
    assert exc is None, f"{ctx}: recover --dry-run raised {type(exc).__name__}: {exc}"
    assert digests(store) == before, f"{ctx}: a dry run changed the store"
    rec, exc = run_with(lambda: ts.recover_store(store))
    assert exc is None, f"{ctx}: recover raised {type(exc).__name__}: {exc}"
    pos = _check_recovered(store, before_ok, ctx)
    assert rec.records == len(pos) == dry.records, (
        f"{ctx}: dry run said {dry.records}, recover {rec.records}, store {len(pos)}"
    )
    assert_never_deleted(before, store)
    again = ts.recover_store(store)
    assert not again.changed and recovered_positions(store) == pos, f"{ctx}: a second recover changed the store"
    return n, before_ok, len(pos)


@pytest.mark.timeout(900)
def test_damage_campaign(tmp_path: Path) -> None:
    runs = campaign_runs(50)
    failures = []
    figures = []
    for seed in range(runs):
        try:
            figures.append(_damage_run(tmp_path, seed))
        except Exception as exc:  # noqa: BLE001 - collected: every failing seed is reported
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:600])
        shutil.rmtree(tmp_path / f"m{seed}", ignore_errors=True)
    written, before, after = (sum(f[k] for f in figures) for k in range(3))
    print(
        f"\ndamage campaign: {runs} runs, {written} records written, {before} readable before recover, "
        f"{after} after; runs where recover kept more: {sum(f[2] > f[1] for f in figures)}; wrong data: 0 "
        f"(any would fail the run); failed runs: {len(failures)}"
    )
    assert not failures, f"{len(failures)} of {runs} damage runs failed:\n" + "\n".join(failures[:12])


# --------------------------------------------------------------------------- killed writers

SHARD_BYTES = 2500


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_death(rng: random.Random, how: str) -> None:
    """In a child: die at the m-th rename/link (before or after it), or never (a timer kills)."""
    if how not in ("before-publish", "after-publish"):
        return
    m = rng.randrange(1, 8)
    calls = collections.Counter()  # type: ignore[var-annotated]

    def wrap(real: Any) -> Any:
        def wrapper(src: Any, dst: Any, *a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == m and how == "before-publish":
                _die()
            out = real(src, dst, *a, **k)
            if calls["n"] == m:
                _die()
            return out

        return wrapper

    os.replace = wrap(os.replace)  # type: ignore[assignment]
    os.rename = wrap(os.rename)  # type: ignore[assignment]
    os.link = wrap(os.link)  # type: ignore[assignment]


def _kill_writer_run(tmp: Path, seed: int) -> tuple[int, int]:
    """One killed write; returns (records recovered, records the writer was given in all)."""
    rng = random.Random(seed)
    mode = ("create", "append", "overwrite")[seed % 3]
    how = ("at-record", "before-publish", "after-publish", "timer")[(seed // 3) % 4]
    config = CONFIGS[seed % len(CONFIGS)]
    store = tmp / f"k{seed}"
    base = rng.randrange(5, 25) if mode != "create" else 0
    if base:
        ts.write_store(tagged_list(base), store, max_shard_bytes=SHARD_BYTES, num_threads=1, **config)
    m = rng.randrange(10, 40)
    if mode == "append":
        data, versions = [tagged(base + i) for i in range(m)], {0}
    else:
        data, versions = tagged_list(m, version=1), {0, 1}
    k = rng.randrange(m + 1)

    def child() -> None:
        _install_death(rng, how)

        def gen() -> Any:
            for i, s in enumerate(data):
                if how == "at-record" and i == k:
                    _die()
                yield s

        opts = {key: v for key, v in config.items() if mode != "append" or key == "frame_target_bytes"}
        ts.write_store(gen(), store, mode=mode, max_shard_bytes=SHARD_BYTES, num_threads=1, **opts)

    fork_and_kill(child, rng.uniform(0.0, 0.6) if how == "timer" else None)
    ctx = f"seed {seed}: killed {mode} ({how}), {config}, base {base}, writing {m}"
    before_ok = len(readable_tagged(store, versions)) if store.exists() else 0
    before = digests(store)
    rec, exc = run_with(lambda: ts.recover_store(store))
    if isinstance(exc, (ts.NotAStoreError, ts.StoreNotFoundError)) and mode == "create":
        pos: list[tuple[int, int]] = []  # died before publishing anything
        ts.write_store([tagged(0)], store, mode="create" if not shard_names(store) else "overwrite")
    else:
        assert exc is None, f"{ctx}: recover raised {type(exc).__name__}: {exc}"
        pos = _check_recovered(store, before_ok, ctx)
        if mode == "append":
            assert pos[:base] == [(0, i) for i in range(base)], f"{ctx}: committed records lost: {pos}"
        assert_never_deleted(before, store)
        v = pos[-1][0] if pos else 0
        nxt = pos[-1][1] + 1 if pos else 0
        _, exc = run_with(lambda: ts.write_store([tagged(nxt, v)], store, mode="append", num_threads=1))
        assert exc is None, f"{ctx}: an append after recover failed: {type(exc).__name__}: {exc}"
        pos = pos + [(v, nxt)]
    assert ts.verify_store(store).ok, ctx
    got = recovered_positions(store)
    assert got == pos or (not pos and len(got) == 1), f"{ctx}: after the append {got}, expected {pos}"
    return len(pos) - 1 if pos else 0, base + m if mode == "append" else m


@pytest.mark.timeout(900)
def test_kill_writer_campaign(tmp_path: Path) -> None:
    runs = campaign_runs(30)
    failures = []
    outcomes = []
    for seed in range(runs):
        try:
            outcomes.append(_kill_writer_run(tmp_path, seed))
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:600])
        shutil.rmtree(tmp_path / f"k{seed}", ignore_errors=True)
    assert not failures, f"{len(failures)} of {runs} killed-writer runs failed:\n" + "\n".join(failures[:12])
    # The kills landed mid-write: some recoveries are partial (the campaign is not vacuous).
    assert any(0 < n < total for n, total in outcomes), outcomes


# --------------------------------------------------------------------------- killed recover


def _damaged_for_recover(store: Path, rng: random.Random, config: dict[str, Any]) -> str:
    n = rng.randrange(25, 50)
    ts.write_store(tagged_list(n), store, max_shard_bytes=SHARD_BYTES, num_threads=1, metadata={"k": 1}, **config)
    names = shard_names(store)
    kind = rng.choice(["no-index", "lost-footer", "mutations", "index-field"])
    if kind == "no-index":
        (store / "index.json").unlink()
    elif kind == "lost-footer":
        truncate_to(store / rng.choice(names), (store / names[0]).stat().st_size - 60)
    elif kind == "index-field":
        obj = json.loads((store / "index.json").read_text())
        if "level" in obj["codec"]:
            obj["codec"]["level"] += 1
        else:  # codec none has no options: a level would read as "a newer format"
            obj["shards"][0]["file_bytes"] += 1
        (store / "index.json").write_text(json.dumps(obj))
    else:
        return "; ".join(mutate(store, rng) for _ in range(2))
    return kind


def _kill_recover_run(tmp: Path, seed: int) -> None:
    rng = random.Random(1000 + seed)
    config = CONFIGS[seed % len(CONFIGS)]
    store, ref = tmp / f"r{seed}", tmp / f"ref{seed}"
    what = _damaged_for_recover(store, rng, config)
    shutil.copytree(store, ref)
    ref_rec, exc = run_with(lambda: ts.recover_store(ref))
    ctx = f"seed {seed}: {config}, {what}"
    assert exc is None, f"{ctx}: recover raised {type(exc).__name__}: {exc}"
    expected = recovered_positions(ref)
    before = digests(store)
    how = rng.choice(["before-publish", "after-publish", "timer"])

    def child() -> None:
        _install_death(rng, how)
        ts.recover_store(store)

    fork_and_kill(child, rng.uniform(0.0, 0.15) if how == "timer" else None)
    ctx += f", recover killed ({how})"
    rec, exc = run_with(lambda: ts.recover_store(store))
    assert exc is None, f"{ctx}: the rerun raised {type(exc).__name__}: {exc}"
    assert ts.verify_store(store).ok, ctx
    got = recovered_positions(store)
    assert got == expected, (
        f"{ctx}: rerun kept {[i for _, i in got]}, an uninterrupted recover {[i for _, i in expected]}"
    )
    assert_never_deleted(before, store)


@pytest.mark.timeout(900)
def test_kill_recover_campaign(tmp_path: Path) -> None:
    runs = campaign_runs(20)
    failures = []
    for seed in range(runs):
        try:
            _kill_recover_run(tmp_path, seed)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:600])
        shutil.rmtree(tmp_path / f"r{seed}", ignore_errors=True)
        shutil.rmtree(tmp_path / f"ref{seed}", ignore_errors=True)
    assert not failures, f"{len(failures)} of {runs} killed-recover runs failed:\n" + "\n".join(failures[:12])


# --------------------------------------------------------------------------- readers racing overwrites


def _version_data(v: int) -> list[dict[str, Any]]:
    return tagged_list(10 + (v * 5) % 17, version=v)


def _reader_loop(store: Path, out: Path, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    stats: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    while time.time() < deadline:
        try:
            r = ts.open_store(store, verify=rng.random() < 0.5)
        except Exception as exc:  # noqa: BLE001 - classified below
            key = f"open: {type(exc).__name__}"
            stats[key] += 1
            if type(exc).__name__ != "StoreChangedError":
                bad.append(f"{key}: {exc}")
            continue
        version = None
        for _ in range(rng.randrange(1, 12)):
            i = rng.randrange(len(r)) if len(r) else 0
            try:
                got = r[i]
            except Exception as exc:  # noqa: BLE001
                key = f"read: {type(exc).__name__}"
                stats[key] += 1
                if type(exc).__name__ != "StoreChangedError":
                    bad.append(f"{key}: {exc}")
                continue
            try:
                v, pos = check_sample(got, f"record {i}")
                assert pos == i, f"record {i} came back as record {pos}"
                assert version in (None, v), f"one reader returned versions {version} and {v}"
                assert len(r) == len(_version_data(v)), f"a reader of {len(r)} records returned version {v}"
                version = v
                stats["ok"] += 1
            except AssertionError as exc:
                stats["wrong"] += 1
                bad.append(f"WRONG DATA: {exc}")
        r.close()
    out.write_text(json.dumps({"stats": stats, "bad": bad[:20]}))


@pytest.mark.timeout(300)
def test_overwrite_racing_readers(tmp_path: Path) -> None:
    store = tmp_path / "s"
    ts.write_store(_version_data(0), store, max_shard_bytes=2000, num_threads=1)
    seconds = max(3.0, campaign_runs(0) / 20)
    deadline = time.time() + seconds + 2.0  # readers start while the first overwrites land
    pids = []
    for k in range(8):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                import torch

                torch.set_num_threads(1)
                _reader_loop(store, tmp_path / f"reader{k}.json", k, deadline)
                code = 0
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    v = 0
    while time.time() < deadline - 0.5:
        v += 1
        ts.write_store(
            _version_data(v),
            store,
            mode="overwrite",
            codec=CONFIGS[v % 3]["codec"],
            max_shard_bytes=2000,
            num_threads=1,
        )
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses
    stats: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    for k in range(8):
        res = json.loads((tmp_path / f"reader{k}.json").read_text())
        stats.update(res["stats"])
        bad += res["bad"]
    print(f"\nreaders racing overwrites: {seconds} s, {v} overwrites, 8 reader processes: {dict(stats)}")
    assert v >= 3, f"only {v} overwrites in {seconds} s"
    assert stats["ok"] > 0, stats
    assert stats["wrong"] == 0, f"readers got wrong data: {bad[:5]}"
    assert not bad, f"{len(bad)} untyped or mis-typed errors ({dict(stats)}); e.g. {bad[:4]}"
