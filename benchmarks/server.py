"""Fork server: runs each measurement in a fresh child of one warm process.

``python -m benchmarks.server [--preload MOD,...]`` imports torch, numpy, tensorstore_pt and
the given modules once, then reads one JSON task per line on stdin. For each it forks a
child, which runs :func:`benchmarks.cell.run_task` in its own process group and writes JSON
lines to the server's stdout: ``{"event": "progress", ...}`` while it runs and
``{"event": "result", ...}`` at the end. The server then writes
``{"event": "exit", "status": ...}`` and kills what is left of the child's process group
(stray DataLoader workers). A child that runs past the task's ``timeout_s`` is killed.

Why a fork server: a fresh process per measurement isolates peak RSS, shared memory and
global state (one library sets the multiprocessing start method for the whole process),
while the ~2-5 s import of torch and the peers is paid once. The child's stdout is pointed
at stderr, so nothing a library prints can corrupt the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

__all__ = ["main"]


def _write(fd: int, obj: dict[str, Any]) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _child(task: dict[str, Any], proto: int) -> None:
    from .cell import run_task

    def emit(event: dict[str, Any]) -> None:
        _write(proto, {"event": "progress", **event})

    try:
        result = run_task(task, emit)
        _write(proto, {"event": "result", "ok": True, "result": result})
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        _write(
            proto,
            {
                "event": "result",
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            },
        )


def _run(task: dict[str, Any], out: int) -> None:
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.setpgid(0, 0)
            proto = os.dup(out)
            os.dup2(2, 1)
            sys.stdout = sys.stderr
            _child(task, proto)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    timeout = float(task.get("timeout_s") or 0) or None
    start = time.monotonic()
    status: str
    while True:
        done, wstatus = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(wstatus):
                status = f"killed by signal {os.WTERMSIG(wstatus)}"
            else:
                status = f"exit {os.WEXITSTATUS(wstatus)}"
            break
        if timeout is not None and time.monotonic() - start > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            status = f"timed out after {timeout:.0f} s"
            break
        time.sleep(0.01)
    try:
        os.killpg(pid, signal.SIGKILL)  # leftover workers of the child
    except (ProcessLookupError, PermissionError):
        pass
    _write(out, {"event": "exit", "status": status})


def _prewarm() -> None:
    """First calls that initialise lazily (torch.load's unpickler tables, codec contexts, the
    DataLoader modules), done once here instead of in every child."""
    import io

    import torch
    import torch.utils.data  # noqa: F401

    from tensorstore_pt.codecs import make_codec

    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2), "y": 1, "z": "s"}, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for codec in ("none", "lz4", "zstd"):
        c = make_codec(codec)
        c.decompress(c.compress(b"x" * 100), 100)


def main(argv: list[str] | None = None) -> int:
    """Serve tasks from stdin until it closes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.server")
    parser.add_argument("--preload", default="", help="comma-separated modules to import before forking")
    args = parser.parse_args(argv)
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    loaded, failed = [], {}
    for mod in ["torch", "numpy", "tensorstore_pt", "benchmarks.cell", *filter(None, args.preload.split(","))]:
        try:
            importlib.import_module(mod)
            loaded.append(mod)
        except Exception as exc:  # reported in the hello; the probe says what is unusable
            failed[mod] = f"{type(exc).__name__}: {exc}"
    try:
        _prewarm()
    except Exception as exc:  # never fatal: children then pay the first calls themselves
        failed["prewarm"] = f"{type(exc).__name__}: {exc}"
    import gc

    gc.collect()
    gc.freeze()  # children never scan (and so never copy) the preloaded objects
    _write(
        out, {"event": "hello", "pid": os.getpid(), "executable": sys.executable, "loaded": loaded, "failed": failed}
    )
    for line in sys.stdin:
        line = line.strip()
        if line:
            _run(json.loads(line), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
