"""Parallel packing (``num_workers``): the store is byte for byte the same for any number of
worker processes and either start method; errors are typed, abort and Ctrl-C kill the pool
and publish nothing."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch

import tensorstore_pt as ts
from _store_tools import store_files, workers_alive
from tensorstore_pt import writer as writer_mod

pytestmark = pytest.mark.timeout(240)


def sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "x": torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8, generator=g),
        "y": i,
        "t": torch.randn(4, 3, generator=g).t(),  # a transposed view: strides kept
        "v": torch.arange(20, dtype=torch.int16)[i % 5 : i % 5 + 7],  # a view: compacted
        "b": torch.tensor([True, False, i % 2 == 0]),
        "p": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "s": f"record {i}",
    }


SAMPLES = [sample(i) for i in range(120)]


@pytest.mark.parametrize(
    "options",
    [
        {"codec": "zstd", "max_shard_bytes": 20_000},
        {"codec": "lz4", "max_shard_bytes": 7_000, "frame_target_bytes": 5_000},
        {"codec": "none", "max_shard_bytes": 1},
    ],
    ids=["zstd", "lz4-multi", "none-one-per-shard"],
)
def test_byte_identical_for_any_worker_count_fork(tmp_path, fixed_token, options):
    ref = ts.write_store(SAMPLES, tmp_path / "ref", **options)
    expected = store_files(tmp_path / "ref")
    assert ref.shards > 1
    for n in (1, 2, 3):
        dest = tmp_path / f"w{n}"
        info = ts.write_store(SAMPLES, dest, num_workers=n, start_method="fork", **options)
        assert store_files(dest) == expected, n
        assert info.created_by["num_workers"] == n
        assert "num_workers" not in ref.created_by
    reader = ts.open_store(tmp_path / "w3")
    for i in (0, 57, 119):
        got = reader[i]
        assert got["y"] == i and got["s"] == f"record {i}"
        assert torch.equal(got["x"], SAMPLES[i]["x"]) and torch.equal(got["v"], SAMPLES[i]["v"])
        assert got["t"].stride() == SAMPLES[i]["t"].stride()


def test_byte_identical_with_spawn_and_a_shared_dictionary(tmp_path, fixed_token):
    data = ts.train_zstd_dictionary(SAMPLES[:100], dict_bytes=1024)
    options = {"codec": "zstd", "dictionary": data, "max_shard_bytes": 20_000}
    ts.write_store(SAMPLES, tmp_path / "ref", **options)
    # One spawned worker: each one imports torch afresh (seconds), the path is the same for N.
    info = ts.write_store(SAMPLES, tmp_path / "spawn", num_workers=1, start_method="spawn", **options)
    assert "dict" in info.codec
    assert store_files(tmp_path / "spawn") == store_files(tmp_path / "ref")
    assert ts.verify_store(tmp_path / "spawn", deep=True).problems == ()


def test_records_in_input_order_when_workers_finish_out_of_order(tmp_path):
    # Big and small records alternate: a worker finishes a small one before the other the big one.
    samples = [torch.full((200_000 if i % 3 == 0 else 10,), i, dtype=torch.int32) for i in range(30)]
    ts.write_store(samples, tmp_path / "s", num_workers=3, start_method="fork", codec="zstd", level=9)
    reader = ts.open_store(tmp_path / "s")
    assert [int(reader[i][0]) for i in range(30)] == list(range(30))


def _refusing_dumps(real):
    def dumps(s):
        if isinstance(s, dict) and s.get("s") == "record 40":
            raise ts.UnsupportedSampleError("sample: refused in the worker (test)")
        return real(s)

    return dumps


def test_worker_error_is_typed_and_nothing_is_published(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "dumps", _refusing_dumps(writer_mod.dumps))  # forked workers inherit it
    dest = tmp_path / "s"
    with pytest.raises(ts.UnsupportedSampleError, match="refused in the worker"):
        ts.write_store(SAMPLES, dest, num_workers=2, start_method="fork", max_shard_bytes=4_000)
    assert not dest.exists()
    assert workers_alive() == []


def test_unsupported_sample_gets_the_in_process_error(tmp_path):
    dest = tmp_path / "s"
    bad = SAMPLES[:10] + [{"x": np.zeros(3)}]
    with pytest.raises(ts.UnsupportedSampleError, match=r"sample\[\"x\"\]: numpy.ndarray"):
        ts.write_store(bad, dest, num_workers=2, start_method="fork")
    assert not dest.exists()
    assert workers_alive() == []


def test_dead_worker_raises_pack_worker_error(tmp_path, monkeypatch):
    real = writer_mod.dumps

    def dumps(s):
        if isinstance(s, dict) and s.get("s") == "record 30":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(s)

    monkeypatch.setattr(writer_mod, "dumps", dumps)
    dest = tmp_path / "s"
    with pytest.raises(ts.PackWorkerError, match="worker process died"):
        ts.write_store(SAMPLES, dest, num_workers=2, start_method="fork", max_shard_bytes=4_000)
    assert not dest.exists()
    assert workers_alive() == []


def test_abort_and_ctrl_c_kill_the_pool(tmp_path):
    w = ts.ShardWriter(tmp_path / "a", num_workers=2, start_method="fork", max_shard_bytes=4_000)
    w.write_many(SAMPLES[:50])
    pids = [p.pid for p in workers_alive()]
    assert len(pids) == 2
    assert w.abort() == []
    assert workers_alive() == []
    assert not (tmp_path / "a").exists()

    def interrupted():
        yield from SAMPLES[:60]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ts.write_store(interrupted(), tmp_path / "k", num_workers=2, start_method="fork", max_shard_bytes=4_000)
    assert workers_alive() == []
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"num_workers": -1}, r"num_workers: expected an int in \[0, 256\], found -1"),
        ({"num_workers": True}, r"num_workers: expected an int in \[0, 256\]"),
        ({"num_workers": 257}, r"num_workers: expected an int in \[0, 256\], found 257"),
        ({"num_workers": 2, "num_threads": 2}, "pass one"),
        ({"start_method": "fork"}, "needs num_workers >= 1"),
        ({"num_workers": 2, "start_method": "telepathy"}, "start_method: expected one of"),
    ],
)
def test_bad_worker_options(tmp_path, options, match):
    with pytest.raises(ts.InvalidOptionError, match=match):
        ts.ShardWriter(tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()


def test_pickled_sample_round_trips_exactly():
    """The transport to workers keeps dtype, bytes (bool bytes other than 0/1 too), offset,
    strides, requires_grad and Parameter-ness."""
    raw_bool = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).view(torch.bool)
    t = torch.arange(24, dtype=torch.float64).reshape(4, 6).t()
    s = {"b": raw_bool, "t": t, "g": torch.ones(3, requires_grad=True), "p": torch.nn.Parameter(torch.zeros(2))}
    back = writer_mod.pickle.loads(writer_mod._pickle_sample(s))
    assert torch.equal(back["b"].view(torch.uint8), torch.tensor([0, 1, 2, 255], dtype=torch.uint8))
    assert back["t"].stride() == (1, 6) and torch.equal(back["t"], t)
    assert back["g"].requires_grad and type(back["p"]) is torch.nn.Parameter and back["p"].requires_grad
    assert writer_mod.dumps(back) == writer_mod.dumps(s)


def test_shard_size_estimate_matches_the_footer_it_will_write():
    """ShardBuilder.size_with caches the footer JSON's length; it must equal the direct
    computation for counts across digit boundaries (it decides where shards close)."""
    from tensorstore_pt.format import FEATURE_MULTI_RECORD_FRAMES, TRAILER_BYTES, footer_meta
    from tensorstore_pt.shardio import ShardBuilder

    class NullStorage:
        def writer(self, name, exclusive=False):
            return type("W", (), {"write": lambda self, data: None})()

    for multi in (False, True):
        meta = footer_meta([FEATURE_MULTI_RECORD_FRAMES] if multi else [], {"id": "zstd", "level": 3})
        b = ShardBuilder(NullStorage(), "x", 123_456, meta, multi)
        for n in (0, 1, 9, 10, 99, 100, 12_345, 999_999):
            b.offsets = [0] * n
            b.rec_raw = [0] * (2 * n) if multi else []
            records = b.records + 1
            js = json.dumps(b.meta(records, n + 1), sort_keys=True, separators=(",", ":")).encode()
            tables = (n + 1) * 32 + (records * 24 if multi else 0)
            assert b.size_with(7, 1) == b.pos + 7 + tables + len(js) + TRAILER_BYTES, (multi, n)


def _refuse_pickling(self, sample):
    raise AssertionError("a sample was pickled for a worker")


@pytest.mark.parametrize("kind", ["list", "tuple", "columns", "iterator"])
def test_fork_workers_inherit_a_list_instead_of_pickling_it(tmp_path, fixed_token, monkeypatch, kind):
    from tensorstore_pt.sources import ColumnRows

    images = torch.stack([s["x"] for s in SAMPLES])
    labels = torch.arange(len(SAMPLES))
    rows = [(images[i], labels[i]) for i in range(len(SAMPLES))]
    source = {"list": rows, "tuple": tuple(rows), "columns": ColumnRows((images, labels), len(rows))}.get(kind)
    ts.write_store(rows, tmp_path / "ref", codec="zstd", max_shard_bytes=20_000)
    if kind == "iterator":
        source = iter(rows)  # no positions: pickled as before
    else:
        monkeypatch.setattr(writer_mod._SamplePickler, "dumps", _refuse_pickling)  # forked workers see it too
    seen = []
    with ts.ShardWriter(tmp_path / "w2", codec="zstd", max_shard_bytes=20_000, num_workers=2, start_method="fork") as w:
        assert w.write_many(source, progress=lambda n, b: seen.append((n, b))) == len(rows)
    assert store_files(tmp_path / "w2") == store_files(tmp_path / "ref")
    assert seen[-1] == (len(rows), sum(r[0].numel() + 8 for r in rows))  # images + int64 labels
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert writer_mod._INHERITED == {}  # the writer let go of the list
    assert workers_alive() == []


def test_a_list_after_single_writes_is_pickled_and_stays_identical(tmp_path, fixed_token):
    ts.write_store(SAMPLES, tmp_path / "ref", codec="zstd", max_shard_bytes=20_000)
    with ts.ShardWriter(tmp_path / "w", codec="zstd", max_shard_bytes=20_000, num_workers=2, start_method="fork") as w:
        for s in SAMPLES[:40]:
            w.write(s)
        w._submit_batch()  # the pool starts: a list given now cannot be inherited any more
        assert not w._inherit_ok(SAMPLES[40:])
        w.write_many(SAMPLES[40:])
    assert store_files(tmp_path / "w") == store_files(tmp_path / "ref")


def test_a_failing_inherited_pack_publishes_nothing_and_lets_go(tmp_path):
    bad = [*SAMPLES[:50], {"x": torch.ones(2), "f": lambda: 1}, *SAMPLES[50:]]
    with pytest.raises(ts.UnsupportedSampleError, match=r'sample\["f"\]'):
        ts.write_store(bad, tmp_path / "s", num_workers=2, start_method="fork")
    assert not (tmp_path / "s").exists()
    assert writer_mod._INHERITED == {}
    assert workers_alive() == []


def test_an_aborted_pool_leaves_no_thread_and_lets_the_interpreter_exit(tmp_path):
    # Workers killed while they send a large result once left the executor's manager thread
    # blocked on a half-sent message for ever: leaked here, and the interpreter's exit (which
    # joins that thread) hung. Records of 16 KiB that do not compress make each result larger than a pipe's buffer.
    script = f"""
import threading, torch, tensorstore_pt as ts
rows = [{{"x": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))}} for i in range(300)]
before = set(threading.enumerate())
for i in range(12):
    bad = [*rows[: 40 + 20 * i], {{"f": lambda: 1}}, *rows[40 + 20 * i :]]
    try:
        ts.write_store(bad, {str(tmp_path)!r} + f"/s{{i}}", num_workers=2, start_method="fork")
    except ts.UnsupportedSampleError:
        pass
    else:
        raise SystemExit("the pack did not fail")
left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
print("left", left)
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "left []", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["rows", "directory"])
def test_cli_pack_with_workers_inherits_the_rows(tmp_path, fixed_token, monkeypatch, kind):
    from tensorstore_pt.cli import main

    if kind == "rows":
        src = tmp_path / "rows.pt"
        torch.save(SAMPLES, src)
    else:
        src = _sample_dir(tmp_path, len(SAMPLES))
    assert main(["pack", str(src), str(tmp_path / "w0"), "--quiet"]) == 0
    monkeypatch.setattr(writer_mod._SamplePickler, "dumps", _refuse_pickling)
    assert main(["pack", str(src), str(tmp_path / "w2"), "--workers", "2", "--quiet"]) == 0
    assert store_files(tmp_path / "w2") == store_files(tmp_path / "w0")


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes (F_SETPIPE_SZ) are a Linux feature")
def test_the_result_pipe_is_widened_where_the_system_allows(tmp_path) -> None:
    import fcntl

    with open("/proc/sys/fs/pipe-max-size") as f:
        allowed = int(f.read()) >= writer_mod._RESULT_PIPE_BYTES or os.geteuid() == 0
    w = ts.ShardWriter(tmp_path / "s", num_workers=1)
    try:
        size = fcntl.fcntl(w._pool._result_queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
        assert size == (writer_mod._RESULT_PIPE_BYTES if allowed else 65536)
        w.write_many(SAMPLES[:40])
    finally:
        w.close()
    assert [r["y"] for r in ts.open_store(tmp_path / "s")] == list(range(40))


def _sample_dir(tmp_path, n: int):
    d = tmp_path / "src"
    d.mkdir()
    for i in range(n):
        torch.save(sample(i), d / f"s{i}.pt")
    return d


def test_a_directory_of_files_is_loaded_by_the_workers_not_here(tmp_path, fixed_token, monkeypatch):
    """``tspt pack DIR --workers N``: the fork workers inherit the file list and load their own
    files; the calling process reads only the files it looked at before packing (the size
    warning's first 64), and the store is the same bytes as packing the loaded list in-process."""
    from tensorstore_pt import sources

    src = _sample_dir(tmp_path, 100)
    ref = tmp_path / "ref"
    ts.write_store([torch.load(src / f"s{i}.pt", weights_only=True) for i in range(100)], ref, max_shard_bytes=20_000)
    expected = store_files(ref)
    loads_here = []
    load = sources.load_pt_bytes
    me = os.getpid()

    def counting_load(data, where):
        if os.getpid() == me:
            loads_here.append(where)
        return load(data, where)

    monkeypatch.setattr(sources, "load_pt_bytes", counting_load)
    source = sources.open_source(src)
    assert isinstance(source.rows, sources.FileRows) and len(source.rows) == 100
    head = source.rows.preload(10)
    assert [s["y"] for s in head] == list(range(10)) and len(loads_here) == 10
    dest = tmp_path / "w2"
    done = []
    with ts.ShardWriter(dest, max_shard_bytes=20_000, num_workers=2, start_method="fork") as w:
        w.write_many(source.rows, lambda n, b: done.append((n, b)))
    assert len(loads_here) == 10  # every other file was read by a worker
    assert store_files(dest) == expected
    assert done[-1] == (100, sum((src / f"s{i}.pt").stat().st_size for i in range(100)))
    assert [r["y"] for r in ts.open_store(dest)] == list(range(100))


def test_an_unsafe_file_read_by_a_worker_fails_the_pack_naming_it(tmp_path):
    import numpy as np

    src = _sample_dir(tmp_path, 60)
    torch.save({"x": np.zeros(3)}, src / "s41.pt")
    from tensorstore_pt import sources

    dest = tmp_path / "w2"
    with pytest.raises(ts.UnsafePayloadError, match=r"s41\.pt.*numpy"):
        with ts.ShardWriter(dest, num_workers=2, start_method="fork") as w:
            w.write_many(sources.open_source(src).rows)
    assert not dest.exists() or os.listdir(dest) == []
    assert not workers_alive()


def test_frames_that_do_not_fit_their_shared_memory_slot_come_back_through_the_pipe(tmp_path, fixed_token, monkeypatch):
    """Fork workers put a task's frames into a shared-memory slot; a task whose frames are
    larger than a slot sends them back instead. Either way the store is the same bytes, and
    the writer's shared memory is dropped when it closes."""
    g = torch.Generator().manual_seed(7)
    samples = [
        torch.randint(0, 255 if i % 3 else 2, (100 + 50 * (i % 7),), dtype=torch.uint8, generator=g) for i in range(90)
    ]
    ref = ts.write_store(samples, tmp_path / "ref", max_shard_bytes=9000)
    seen = []
    drain = writer_mod.ShardWriter._drain_slot

    def recording(self, result):
        seen.append(result.fallback is None)
        return drain(self, result)

    monkeypatch.setattr(writer_mod.ShardWriter, "_drain_slot", recording)
    monkeypatch.setattr(writer_mod, "_SLOT_BYTES", 4100)  # some tasks' frames fit (3,800-4,300 bytes), others do not
    monkeypatch.setattr(writer_mod, "_BATCH_RECORDS", 5)
    ts.write_store(samples, tmp_path / "w2", max_shard_bytes=9000, num_workers=2, start_method="fork")
    assert any(seen) and not all(seen)  # both ways were taken: some slots used, some fallbacks
    assert store_files(tmp_path / "w2") == store_files(tmp_path / "ref")
    assert ref.records == 90 and writer_mod._SLOTS == {}
    reader = ts.open_store(tmp_path / "w2")
    assert all(torch.equal(reader[i], samples[i]) for i in range(90))


def test_spawned_workers_get_no_slot_and_send_their_frames_back(tmp_path, fixed_token):
    """Shared memory is only inherited through fork: spawned workers send frames back."""
    w = ts.ShardWriter(tmp_path / "s", num_workers=1, start_method="spawn")
    try:
        w.write_many(SAMPLES[:10])
        assert w._slots is None
    finally:
        w.close()
    assert [r["y"] for r in ts.open_store(tmp_path / "s")] == list(range(10))


def test_the_sample_pickler_round_trips_tensors_without_temporary_tensors() -> None:
    """Samples sent to workers: a tensor travels as its storage bytes read in place (no
    temporary tensor over the storage: one made and dropped there crashed another thread's
    cycle collector now and then), and comes back equal, with its dtype, shape, strides and
    type; an empty tensor too."""
    import pickle

    base = torch.arange(24, dtype=torch.float32)
    sample = {
        "empty": torch.empty(0),
        "empty2d": torch.empty(3, 0, dtype=torch.int16),
        "view": base[5:17].view(3, 4),  # a view of a larger storage: its own bytes only
        "t": torch.randn(4, 3).t(),  # dense, not contiguous: strides kept
        "bf16": torch.ones(5, dtype=torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "p": torch.nn.Parameter(torch.ones(2), requires_grad=False),
    }
    got = pickle.loads(writer_mod._SamplePickler().dumps(sample))
    for key, t in sample.items():
        assert type(got[key]) is type(t) and got[key].dtype == t.dtype, key
        assert got[key].shape == t.shape and torch.equal(got[key], t), key
    assert got["t"].stride() == sample["t"].stride()
    assert got["view"].untyped_storage().nbytes() == 12 * 4


def _dumps_at(real, record: str, action):
    def dumps(s):
        if isinstance(s, dict) and s.get("s") == record:
            action()
        return real(s)

    return dumps


def test_close_reaps_the_workers_it_lets_go_before_its_last_tasks_end(tmp_path, fixed_token):
    # close() shuts the pool down as soon as the last task is sent; by its return the workers
    # are gone, and the store is the one a single process writes.
    w = ts.ShardWriter(tmp_path / "s", num_workers=2, start_method="fork", max_shard_bytes=4_000)
    for s in SAMPLES:
        w.write(s)  # one batch, sent by close()
    w.close()
    assert workers_alive() == []
    ts.write_store(SAMPLES, tmp_path / "one", max_shard_bytes=4_000)
    assert store_files(tmp_path / "s") == store_files(tmp_path / "one")


def test_a_worker_dying_after_close_shut_the_pool_down_still_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "dumps", _dumps_at(writer_mod.dumps, "record 119", lambda: os.kill(os.getpid(), 9)))
    w = ts.ShardWriter(tmp_path / "s", num_workers=2, start_method="fork", max_shard_bytes=4_000)
    for s in SAMPLES:
        w.write(s)
    with pytest.raises(ts.PackWorkerError, match="worker process died"):
        w.close()
    assert workers_alive() == []
    assert not (tmp_path / "s").exists()


def test_ctrl_c_while_close_waits_for_the_last_tasks_kills_the_workers(tmp_path, monkeypatch):
    # The last task never ends by itself: the abort that the Ctrl-C triggers must still find
    # and kill the workers that close() already let go of (shutdown() forgets them).
    monkeypatch.setattr(writer_mod, "dumps", _dumps_at(writer_mod.dumps, "record 119", lambda: time.sleep(600)))
    w = ts.ShardWriter(tmp_path / "s", num_workers=2, start_method="fork", max_shard_bytes=4_000)
    for s in SAMPLES:
        w.write(s)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            w.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert workers_alive() == []
    assert not (tmp_path / "s").exists()
