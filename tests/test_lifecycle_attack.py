"""Lifecycle under attack: after an error, a Ctrl-C, a killed worker or a normal end, nothing
may be left behind (threads, child processes, open files, temporary files) and neither a later
call nor the interpreter's exit may hang.

Each scenario runs in a fresh interpreter (``subprocess.run`` with a timeout), so a hang fails
the test instead of holding up the run, and the leak checks see only what the scenario made.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``script`` in a fresh interpreter (the repository and tests/ on its path); return the
    result and the time of its end (``time.time()``, so it can be set against what it printed)."""
    prelude = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    return proc, time.time()


def test_warming_the_cache_does_not_hold_up_the_interpreter_exit(tmp_path):
    # CachedStorage.warm (the head start a StoreDataLoader gives its workers' first shards) ran
    # its downloads in a ThreadPoolExecutor, whose threads the interpreter joins at exit after
    # running every download queued: a training script that failed (or was interrupted) during
    # start-up waited for all of them, for ever on a source that stopped answering. Here: 30
    # shards at 0.5 s a read, 2 at a time, so the exit waited about 7.5 s.
    script = f"""
import time, threading
from pathlib import Path
import tensorstore_pt as ts
from tensorstore_pt.cache import CachedStorage, ShardCache
from test_cache import Remote, make
root = Path({str(tmp_path)!r})
make(root / "s", n=60, shard_bytes=6000)
remote = Remote(root / "s", root / "log", delay_s=0.5)
plain = ts.open_store(remote, verify=False)
cs = CachedStorage(remote, ShardCache(root / "cache"), plain.index.shards, index_digest=plain.index_digest)
assert len(plain.index.shards) == 30, len(plain.index.shards)
cs.warm([s.name for s in plain.index.shards], width=2)
time.sleep(0.3)
print("exit at", time.time(), flush=True)
"""
    proc, end = run_script(script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = float(proc.stdout.split("exit at")[1])
    assert end - said < 2.5, f"the exit took {end - said:.1f} s"
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], leftovers


def test_a_second_ctrl_c_while_a_pack_aborts_still_stops_the_workers_and_lets_go(tmp_path):
    # A Ctrl-C that lands while ShardWriter.abort waits for the killed workers (a second
    # Ctrl-C, the first having started the abort) skipped the rest of the abort, and a later
    # abort or close did nothing (the writer already said "aborted"): the store stayed locked
    # in this process, the writer's files stayed, the inherited sample list stayed registered,
    # and the executor's manager thread could stay blocked on a half-sent result. Simulated:
    # the first join of a worker raises KeyboardInterrupt, as a Ctrl-C there would.
    script = f"""
import multiprocessing, os, threading, time
import torch, tensorstore_pt as ts
from tensorstore_pt import writer as W
from multiprocessing.process import BaseProcess
root = {str(tmp_path)!r}
rows = [{{"x": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))}} for i in range(300)]
threads = set(threading.enumerate())
fds = set(os.listdir("/proc/self/fd"))
join = BaseProcess.join
hits = []
def interrupted_join(self, timeout=None):
    if not hits and threading.current_thread() is threading.main_thread():  # where a Ctrl-C lands
        hits.append(1)
        raise KeyboardInterrupt
    return join(self, timeout)
# Several positions of the bad sample on fork: some abort while a worker sends a result
# larger than a pipe's buffer (records of 16 KiB that do not compress); one run on spawn.
runs = [("fork", 40 + 20 * i) for i in range(12)] + [("spawn", 150)]
for n, (method, at) in enumerate(runs):
    hits.clear()
    BaseProcess.join = interrupted_join
    path = root + f"/{{method}}{{n}}"
    try:
        ts.write_store([*rows[:at], {{"f": lambda: 1}}, *rows[at:]], path, num_workers=2, start_method=method)
    except KeyboardInterrupt:
        pass
    else:
        raise SystemExit("the abort was not interrupted")
    finally:
        BaseProcess.join = join
    print(method, "inherited", len(W._INHERITED), flush=True)
    print(method, "files", sorted(os.listdir(path)) if os.path.exists(path) else [])
    ts.write_store(rows[:3], path, mode="overwrite")  # the store is not locked
    print(method, "records", len(ts.open_store(path)))
time.sleep(0.5)
print("children", len(multiprocessing.active_children()), flush=True)
left = [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]
print("threads", left)
print("exit at", time.time(), flush=True)
"""
    proc, end = run_script(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:-3] == [
        f"{m} {what}" for m in ["fork"] * 12 + ["spawn"] for what in ("inherited 0", "files []", "records 3")
    ]
    assert lines[-3:-1] == ["children 0", "threads []"], proc.stdout
    assert end - float(lines[-1].split()[-1]) < 3, proc.stdout
