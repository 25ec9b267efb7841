"""Issue 10, "Never lose or invent data": one test per finding, written before the fix.

Each test states the spec's promise (/work/spec-issue10.md) and fails on the code that has
the finding. Names issue 10 adds (``StoreChangedError``, ``StorageFullError``) are looked
up with :func:`_trust_tools.new_error`, so only the tests that need them fail before they exist.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import tensorstore_pt as ts
from _store_tools import layout
from _trust_tools import (
    LOCK_NAME,
    FullDiskStorage,
    assert_never_deleted,
    digests,
    flip_byte,
    new_error,
    readable_records,
    recovered_positions,
    run_with,
    shard_names,
    store_files,
    tagged,
    tagged_list,
    truncate_to,
)
from tensorstore_pt.cli import main
from tensorstore_pt.storage import TEMP_MARKER, LocalStorage

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def _entry_dict(entry: Any) -> dict[str, Any]:
    if isinstance(entry, dict):
        return entry
    if hasattr(entry, "to_json"):
        return entry.to_json()
    from dataclasses import asdict, is_dataclass

    return asdict(entry) if is_dataclass(entry) else dict(vars(entry))


# --------------------------------------------------------------------------- finding 1


def _one_flipped_record(store: Path) -> str:
    """A 500-record zstd store in one shard, with one byte flipped in record 5's frame."""
    ts.write_store(tagged_list(500), store, codec="zstd", metadata={"seed": 1})
    (name,) = shard_names(store)
    _, _, _, table = layout(store / name)
    flip_byte(store / name, int(table["offset"][5]) + int(table["stored"][5]) // 2)
    report = ts.verify_store(store)
    assert report.records_checked == 499 and not report.ok
    return name


def test_recover_keeps_the_intact_records_of_a_damaged_shard(tmp_path: Path) -> None:
    """Finding 1: one flipped byte in record 5 of a 500-record shard must cost record 5 only."""
    store = tmp_path / "s"
    _one_flipped_record(store)
    before = digests(store)
    rec = ts.recover_store(store)
    assert rec.records == 499, f"recover kept {rec.records} of the 499 intact records"
    assert ts.verify_store(store, deep=True).ok
    assert [i for _, i in recovered_positions(store)] == [i for i in range(500) if i != 5]
    assert ts.open_store(store).metadata == {"seed": 1}
    assert_never_deleted(before, store)


def test_recover_dry_run_and_verify_say_what_recover_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 1: dry run reports per shard kept / lost (old numbering); verify's advice names the count."""
    store = tmp_path / "s"
    name = _one_flipped_record(store)
    before = digests(store)
    dry = ts.recover_store(store, dry_run=True)
    assert digests(store) == before, "a dry run changed the store"
    assert dry.records == 499, f"dry run says it would keep {dry.records} records, not 499"
    shards = getattr(dry, "shards", None)
    assert shards is not None, "RecoverReport.shards (per shard: kept / lost) does not exist yet"
    rows = [_entry_dict(e) for e in shards]
    row = next((r for r in rows if r.get("name") == name), None)
    assert row is not None, f"RecoverReport.shards has no row for {name!r}: {rows}"
    assert row.get("kept") == 499, row
    assert [tuple(x) for x in row.get("lost", ())] == [(5, 6)], row
    assert main(["recover", "--dry-run", str(store)]) == 0
    out = capsys.readouterr().out
    assert name in out and "499" in out and "5" in out, f"`recover --dry-run` must print the per-shard table: {out!r}"
    assert digests(store) == before

    assert main(["verify", str(store)]) == 1
    cap = capsys.readouterr()
    text = cap.out + cap.err
    advice = f"tspt recover {store}"
    assert advice in text, f"verify's advice must name `{advice}`: {text!r}"
    after_advice = text[text.index(advice) :].splitlines()[0] + text[: text.index(advice)].splitlines()[-1]
    assert re.search(r"\b499\b", text[text.index(advice) :].splitlines()[0]), (
        f"verify's advice must say how many records recover would keep (499), after naming the command: {after_advice!r}"
    )


# --------------------------------------------------------------------------- finding 2


def _edit(obj: dict[str, Any], how: str) -> None:
    s = obj["shards"]
    if how == "codec-level+1":
        obj["codec"]["level"] += 1
    elif how == "codec-level-1":
        obj["codec"]["level"] -= 1
    elif how == "codec-id":
        obj["codec"] = {"id": "lz4", "level": 0}
    elif how == "shard-name":
        s[1]["name"] = s[1]["name"].replace(".tspt", "x.tspt")
    elif how == "features-emptied":
        obj["features"] = []
    elif how == "first_record":
        s[2]["first_record"] += 1
    elif how == "records":
        s[1]["records"] -= 1
    elif how == "file_bytes":
        s[0]["file_bytes"] += 1
    elif how == "stored_bytes":
        s[3]["stored_bytes"] -= 1
    elif how == "raw_bytes":
        s[2]["raw_bytes"] += 7
    elif how == "checksum":
        s[3]["checksum"] = "xxh3_64:" + "0" * 16
    elif how == "totals-records":
        obj["totals"]["records"] += 1
    elif how == "totals-shards":
        obj["totals"]["shards"] -= 1
    else:  # pragma: no cover
        raise AssertionError(how)


INDEX_EDITS = [
    "codec-level+1",
    "codec-level-1",
    "codec-id",
    "shard-name",
    "features-emptied",
    "first_record",
    "records",
    "file_bytes",
    "stored_bytes",
    "raw_bytes",
    "checksum",
    "totals-records",
    "totals-shards",
]


@pytest.mark.parametrize("how", INDEX_EDITS)
def test_recover_trusts_intact_shards_over_a_damaged_index(tmp_path: Path, how: str) -> None:
    """Finding 2: one edited field of index.json must not cost a single intact record."""
    store = tmp_path / "s"
    options: dict[str, Any] = {"codec": "zstd", "level": 3, "max_shard_bytes": 4000}
    if how == "features-emptied":
        options["frame_target_bytes"] = 1500
    n = 80
    ts.write_store(tagged_list(n), store, metadata={"seed": 7}, num_threads=1, **options)
    assert len(ts.open_store(store).index.shards) >= 4
    obj = json.loads((store / "index.json").read_text())
    _edit(obj, how)
    (store / "index.json").write_text(json.dumps(obj, indent=1))
    before = digests(store)

    rec, exc = run_with(lambda: ts.recover_store(store))
    assert exc is None, f"recover refused a store its shards fully describe: {type(exc).__name__}: {exc}"
    assert rec.records == n, f"recover kept {rec.records} of {n} intact records after the edit {how!r}"
    assert ts.verify_store(store, deep=True).ok
    assert [i for _, i in recovered_positions(store)] == list(range(n))
    assert ts.open_store(store).metadata == {"seed": 7}
    assert_never_deleted(before, store)


# --------------------------------------------------------------------------- finding 3


@pytest.mark.parametrize("frame_target_bytes", [None, 4096], ids=["one-record-frames", "multi-record-frames"])
@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_recover_rebuilds_a_shard_whose_footer_is_lost(
    tmp_path: Path, codec: str, frame_target_bytes: int | None
) -> None:
    """Finding 3: 100 bytes cut off a shard's end lose its footer, not its 500 intact frames
    (zstd and lz4 frames delimit themselves; ``none`` records are zip archives that do)."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(500), store, codec=codec, frame_target_bytes=frame_target_bytes)
    (name,) = shard_names(store)
    size = (store / name).stat().st_size
    truncate_to(store / name, size - 100)
    before = digests(store)
    assert readable_records(store) == []  # the footer is gone: nothing reads before recover

    rec = ts.recover_store(store)
    assert ts.verify_store(store, deep=True).ok
    positions = [i for _, i in recovered_positions(store)]
    assert positions == sorted(set(positions)) and rec.records == len(positions)  # never wrong data
    assert_never_deleted(before, store)
    assert positions == list(range(500)), f"recover kept {len(positions)} of 500 intact frames"


# --------------------------------------------------------------------------- finding 4

_SLOW_WRITER = textwrap.dedent(
    """
    import sys
    import tensorstore_pt as ts
    from _trust_tools import tagged

    store, mode, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = ts.ShardWriter(store, mode=mode, codec="zstd", max_shard_bytes=2000, num_threads=1)
    for i in range(start, start + 30):
        w.write(tagged(i))
    while w._publishing:  # finished shards are published on a thread: let the listing settle
        w._wait_published()
    print("ready", flush=True)
    sys.stdin.readline()  # the test holds the writer here, mid-write
    w.close()
    print("done", flush=True)
    """
)


def _start_slow_writer(store: Path, mode: str, start: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(store), mode, str(start)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the slow writer did not start: {line!r} {err[-2000:]}")
    return proc


def _busy(fn: Any, pid: int) -> str:
    """Run ``fn``; it must raise StoreBusyError at once naming ``pid`` and this host."""
    t0 = time.monotonic()
    result, exc = run_with(fn)
    took = time.monotonic() - t0
    if isinstance(result, ts.ShardWriter):
        result.abort()
    assert isinstance(exc, ts.StoreBusyError), (
        f"expected StoreBusyError while pid {pid} writes; got {type(exc).__name__ if exc else 'no error'}: {exc}"
    )
    msg = str(exc)
    assert str(pid) in msg, f"StoreBusyError must name the holder's pid {pid}: {msg}"
    assert socket.gethostname() in msg, f"StoreBusyError must name the holder's host: {msg}"
    assert took < 5, f"StoreBusyError came after {took:.1f} s, not at once"
    return msg


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["append", "create"])
def test_a_live_writer_excludes_recover_and_other_writers(tmp_path: Path, mode: str) -> None:
    """Finding 4: recover or a second writer during a live write: StoreBusyError at once."""
    store = tmp_path / "s"
    base = 10 if mode == "append" else 0
    if base:
        ts.write_store(tagged_list(base), store, codec="zstd")
    proc = _start_slow_writer(store, mode, base)
    try:
        files = set(os.listdir(store))
        _busy(lambda: ts.recover_store(store), proc.pid)
        _busy(lambda: ts.recover_store(store, force=True), proc.pid)
        if base:
            _busy(lambda: ts.ShardWriter(store, mode="append"), proc.pid)
        _busy(lambda: ts.ShardWriter(store, mode="overwrite"), proc.pid)
        assert set(os.listdir(store)) == files, "a refused recover or writer changed the store"
        if mode == "append":
            assert len(ts.open_store(store)) == base  # readers do not lock
    finally:
        out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0 and "done" in out, err[-3000:]
    assert [i for _, i in recovered_positions(store)] == list(range(base + 30))
    lock = store / LOCK_NAME
    assert not lock.exists() or lock.stat().st_size == 0, "a clean close leaves the lock file empty"


def test_two_writers_in_one_process_second_is_busy(tmp_path: Path) -> None:
    """Finding 4: a second ShardWriter is refused in its constructor, not with ConcurrentWriteError at commit."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(5), store)
    w1 = ts.ShardWriter(store, mode="append", num_threads=1)
    try:
        w1.write(tagged(5))
        _busy(lambda: ts.ShardWriter(store, mode="append", num_threads=1), os.getpid())
    finally:
        w1.close()
    assert [i for _, i in recovered_positions(store)] == list(range(6))


# --------------------------------------------------------------------------- finding 5

BASE_N, NEW_N, SHARD_BYTES = 30, 40, 3000


def _full_disk_op(storage: LocalStorage, mode: str) -> None:
    data = tagged_list(NEW_N, version=1) if mode != "append" else [tagged(BASE_N + i) for i in range(NEW_N)]
    ts.write_store(data, storage, mode=mode, codec="zstd", max_shard_bytes=SHARD_BYTES, num_threads=1)


@pytest.mark.parametrize("where", ["first-shard", "mid-write", "index"])
@pytest.mark.parametrize("mode", ["create", "append", "overwrite"])
def test_full_disk_publishes_nothing(tmp_path: Path, mode: str, where: str) -> None:
    """Finding 5: ENOSPC -> StorageFullError naming store and file; the old store intact; recover adopts nothing."""
    store = tmp_path / "s"
    if mode != "create":
        ts.write_store(tagged_list(BASE_N), store, codec="zstd", max_shard_bytes=SHARD_BYTES, num_threads=1)
    scratch = tmp_path / "count"
    if store.exists():
        shutil.copytree(store, scratch)
    counter = FullDiskStorage(scratch)
    _full_disk_op(counter, mode)
    total = counter.written
    budget = {"first-shard": 50, "mid-write": total // 2, "index": total - 20}[where]
    before = store_files(store)
    old = recovered_positions(store) if mode != "create" else []

    full = FullDiskStorage(store, budget)
    _, exc = run_with(lambda: _full_disk_op(full, mode))
    assert full.failures >= 1 and exc is not None, "the full disk was never hit"

    # The old store is intact, and the failed write left nothing behind.
    assert store_files(store) == before, f"the failed write left files: {sorted(set(store_files(store)) - set(before))}"
    if mode != "create":
        assert ts.verify_store(store).ok
        assert recovered_positions(store) == old
        ts.recover_store(store)
        assert recovered_positions(store) == old, "recover adopted records of the failed write"

    storage_full = new_error("StorageFullError")
    assert isinstance(exc, storage_full), f"expected StorageFullError, got {type(exc).__name__}: {exc}"
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    msg = str(exc)
    assert str(store) in msg, f"StorageFullError must name the store: {msg}"
    assert re.search(r"shard-[0-9a-z-]+\.tspt|index\.json", msg), f"StorageFullError must name the file: {msg}"
    assert TEMP_MARKER not in msg, f"StorageFullError must name the final file, not a temporary one: {msg}"


@pytest.mark.timeout(120)
def test_full_disk_on_a_real_small_filesystem(tmp_path: Path) -> None:
    """Finding 5 on a real 512 KiB tmpfs (skipped where mounting needs privileges we lack)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"mount -t tmpfs failed: {res.stderr.strip()}")
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or res.returncode})")
    try:
        import torch

        store = mnt / "s"
        ts.write_store(tagged_list(20), store, codec="none")
        old = recovered_positions(store)
        before = store_files(store)
        g = torch.Generator().manual_seed(0)
        big = [{"x": torch.randint(0, 2**62, (8192,), generator=g), "v": torch.tensor(1)} for _ in range(16)]
        _, exc = run_with(lambda: ts.write_store(big, store, mode="overwrite", codec="zstd", max_shard_bytes=150_000))
        assert exc is not None, "1 MiB of random data fit on a 512 KiB tmpfs?"
        assert store_files(store) == before
        assert recovered_positions(store) == old
        storage_full = new_error("StorageFullError")
        assert isinstance(exc, storage_full) and exc.errno == errno.ENOSPC, f"{type(exc).__name__}: {exc}"
        assert str(store) in str(exc) and TEMP_MARKER not in str(exc)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------- finding 6


def test_index_read_is_atomic_against_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 6: a smaller index renamed in after index.json was opened must not read short."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(40), store, max_shard_bytes=2500, metadata={"pad": "x" * 4000})
    small = json.loads((store / "index.json").read_text())
    small["metadata"] = {}
    small_bytes = json.dumps(small).encode()
    assert len(small_bytes) < (store / "index.json").stat().st_size
    state = {"swapped": False}

    def swap() -> None:
        if not state["swapped"]:
            state["swapped"] = True
            tmp = store / ".index.json.swap"
            tmp.write_bytes(small_bytes)
            os.replace(tmp, store / "index.json")

    real_open = LocalStorage.open
    real_os_open = os.open

    def storage_open(self: LocalStorage, name: str) -> Any:
        h = real_open(self, name)
        if name == "index.json":
            swap()
        return h

    def os_open(path: Any, flags: int, *a: Any, **k: Any) -> int:
        fd = real_os_open(path, flags, *a, **k)
        if os.fspath(path).endswith("index.json") and not flags & (os.O_WRONLY | os.O_RDWR):
            swap()
        return fd

    monkeypatch.setattr(LocalStorage, "open", storage_open)
    monkeypatch.setattr(os, "open", os_open)
    r, exc = run_with(lambda: ts.open_store(store))
    monkeypatch.undo()
    assert state["swapped"], "the test's hooks never saw index.json being opened; adapt them"
    assert exc is None, f"open_store called a healthy store damaged: {type(exc).__name__}: {exc}"
    assert r.metadata in ({}, {"pad": "x" * 4000}) and len(r) == 40
    assert [check_i for check_i in range(40) if r[check_i]["x"][0] == check_i] == list(range(40))


# --------------------------------------------------------------------------- findings 7 and 8


@pytest.mark.parametrize("via_empty", [True, False], ids=["via-empty-store", "direct"])
def test_an_open_reader_never_returns_another_versions_data(tmp_path: Path, via_empty: bool) -> None:
    """Finding 7: a reader opened on v1 must raise StoreChangedError after overwrites, never read v3."""
    store = tmp_path / "s"
    v1 = tagged_list(12, version=1)
    v3 = [{"x": t["x"], "v": tagged(0, 3)["v"]} for t in v1]  # same sizes: same shard sizes
    ts.write_store(v1, store, codec="none", max_shard_bytes=3000)
    r = ts.open_store(store, verify=False)
    if via_empty:
        ts.write_store([], store, mode="overwrite", codec="none")
    ts.write_store(v3, store, mode="overwrite", codec="none", max_shard_bytes=3000)
    outcomes = []
    for i in range(len(r)):
        got, exc = run_with(lambda i=i: r[i])
        if exc is None:
            v, pos = (int(got["v"]), int(got["x"][0]))
            assert (v, pos) == (1, i), f"the v1 reader returned record {pos} of version {v} at position {i}"
        outcomes.append(exc)
    changed = new_error("StoreChangedError")
    assert isinstance(outcomes[0], changed), (
        f"r[0]: expected StoreChangedError, got {type(outcomes[0]).__name__}: {outcomes[0]}"
    )
    assert all(isinstance(e, changed) for e in outcomes), [type(e).__name__ for e in outcomes]
    msg = str(outcomes[0])
    assert str(store) in msg and "replaced" in msg and "reopen" in msg, msg
    assert isinstance(outcomes[0], RuntimeError)


def test_an_open_racing_an_overwrite_sees_one_version_or_store_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 8: an overwrite committed between reading the index and opening its shards."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(20, version=1), store, max_shard_bytes=2500)
    real_open = LocalStorage.open
    state = {"done": False}

    def open_(self: LocalStorage, name: str) -> Any:
        if name.endswith(".tspt") and not state["done"]:
            state["done"] = True
            ts.write_store(tagged_list(15, version=2), store, mode="overwrite", max_shard_bytes=2500)
        return real_open(self, name)

    monkeypatch.setattr(LocalStorage, "open", open_)
    r, exc = run_with(lambda: ts.open_store(store))
    monkeypatch.undo()
    assert state["done"], "the overwrite never ran between index read and shard open"
    if exc is None:
        versions = {check_sample_v(r[i], i) for i in range(len(r))}
        assert len(versions) == 1
        return
    changed = new_error("StoreChangedError")
    assert isinstance(exc, changed), f"expected success or StoreChangedError, got {type(exc).__name__}: {exc}"
    assert "replaced" in str(exc) and "reopen" in str(exc)


def check_sample_v(got: Any, i: int) -> int:
    from _trust_tools import check_sample

    v, pos = check_sample(got, f"record {i}")
    assert pos == i
    return v


# --------------------------------------------------------------------------- CLI and closed pipes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv", [["info"], ["verify", "--json"], ["info", "--json"]], ids=" ".join)
def test_cli_survives_a_closed_pipe(tmp_path: Path, argv: list[str]) -> None:
    """`tspt info st | head -c 10`: no traceback; exit 0 or SIGPIPE's 141 / -13, like Unix tools."""
    store = tmp_path / "s"
    ts.write_store(tagged_list(30), store, max_shard_bytes=1500, metadata={"k": "v" * 200000})
    cmd = [sys.executable, "-m", "tensorstore_pt.cli", *argv, str(store)]
    # The reader is gone before the command writes a byte: every write meets EPIPE.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    p.stdout.close()
    _, err = p.communicate(timeout=100)
    err_text = err.decode(errors="replace")
    assert "BrokenPipeError" not in err_text and "Traceback" not in err_text, err_text[-3000:]
    assert p.returncode in (0, 141, -signal.SIGPIPE), (p.returncode, err_text[-2000:])
    # And as a real pipeline: head takes 10 bytes and leaves.
    res = subprocess.run(
        " ".join(map(repr, cmd)) + " | head -c 10 >/dev/null; echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=100,
    )
    assert "BrokenPipeError" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stdout.strip() in ("0", "141"), (res.stdout, res.stderr[-2000:])
