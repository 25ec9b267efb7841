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
