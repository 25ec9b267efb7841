"""Helpers for tests/test_hostile_attack.py: hand-built torch.save buffers, stores and children.

Nothing here checks anything: it crafts what a hostile writer could put in a store.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _store_tools import build_store, sample, torch_save_bytes

from tensorstore_pt.codecs import get_codec

ROOT = Path(__file__).resolve().parents[1]
GOOD = torch_save_bytes(sample(0))
CODECS = {"none": {"id": "none"}, "zstd": {"id": "zstd", "level": 3}, "lz4": {"id": "lz4", "level": 0}}


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A buffer laid out exactly as torch.save lays it out, around any data.pkl."""
    buf = io.BytesIO()
    with torch.serialization._open_zipfile_writer(buf) as zf:
        zf.write_record("data.pkl", pkl, len(pkl))
        zf.write_record(".format_version", "1", 1)
        zf.write_record(".storage_alignment", "64", 2)
        zf.write_record("byteorder", "little", 6)
        for key, data in (storages or {}).items():
            zf.write_record(f"data/{key}", data, len(data))
    return buf.getvalue()


def hand(*ops: bytes) -> bytes:
    """A protocol-2 pickle of hand-written opcodes."""
    return b"\x80\x02" + b"".join(ops) + b"."


def store_with(path: Path, raw: bytes, codec: str = "zstd", good: int = 1) -> Path:
    """A store whose record ``good`` is ``raw`` (checksums intact) between good records."""
    c = get_codec(CODECS[codec])
    frames = [(len(GOOD), c.compress(GOOD)) for _ in range(good)]
    frames.append((len(raw), c.compress(raw)))
    frames.append((len(GOOD), c.compress(GOOD)))
    return build_store(path, [frames], CODECS[codec])


CHILD_PRELUDE = """
import json, sys, time, resource, warnings
warnings.simplefilter("ignore")
"""


def run_child(code: str, timeout: float = 60.0) -> tuple[int, str, str, float]:
    """Run ``code`` in a fresh interpreter (this venv, the worktree on PYTHONPATH).

    Returns ``(returncode, stdout, stderr, seconds)``; returncode is negative when a signal
    killed the child (-11: SIGSEGV), and -9 when it ran past ``timeout`` (killed here).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    try:
        p = subprocess.run(
            [sys.executable, "-c", CHILD_PRELUDE + code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return -9, out, err, time.monotonic() - start
    return p.returncode, p.stdout, p.stderr, time.monotonic() - start


def child_outcome(stdout: str) -> dict[str, Any]:
    """The last JSON line a child printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


#: What a child prints about one call: {"ok": bool, "error": type name, "msg": ...}.
CHILD_TRY = """
def outcome(fn):
    t = time.monotonic()
    try:
        r = fn()
        res = {"ok": True, "type": type(r).__name__}
    except BaseException as e:
        res = {"ok": False, "error": type(e).__name__, "msg": str(e)[:300]}
    res["seconds"] = time.monotonic() - t
    print(json.dumps(res), flush=True)
    return res
"""


def peak_bytes(fn: Any) -> tuple[int, BaseException | None]:
    """Peak Python-tracked allocation (tracemalloc, bytes) while ``fn`` runs, and what it raised."""
    import tracemalloc

    tracemalloc.start()
    tracemalloc.reset_peak()
    err: BaseException | None = None
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - returned to the caller to assert on
        err = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err
