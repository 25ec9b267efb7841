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
        w._flush_group()
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
