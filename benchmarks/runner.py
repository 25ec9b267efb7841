"""Run the matrix: build the data kinds, measure every (kind, system) cell, derive the ratios.

The parent (this module) builds each kind once, writes it to ``<workdir>/<kind>/samples.pt``
with a digest of every sample, and drives one fork server (:mod:`benchmarks.server`) in the
interpreter given by ``python`` (default: this one). Each measurement of each cell runs in a
fresh child of that server. Every ratio is taken against the one-file-per-sample baseline
(``pt-files``) of the same kind in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .kinds import KIND_NAMES, build_kind, load_source, payload_bytes, sample_digest
from .machine import load_average, machine_info
from .systems import BASELINE, get_systems

__all__ = ["BenchConfig", "BenchError", "run_benchmark"]

#: Read ops measured warm and cold; ``seq_again`` (later passes over the same open
#: dataset) is warm only. Throughputs are samples/s.
READ_OPS = ("seq", "random")
#: Every op of a cell, in the order run (``loader_wN`` follow, one per worker count).
CELL_OPS = ("pack", "seq", "seq_again", "random")
#: Smallest and largest shard/chunk size the harness asks for (bytes).
MIN_SHARD_BYTES = 8 * 2**10
MAX_SHARD_BYTES = 64 * 2**20
#: Shards/chunks each sharded system is sized to write per kind (see :func:`_shard_bytes`).
TARGET_SHARDS = 8


class BenchError(RuntimeError):
    """The harness itself could not run (bad options, the cell interpreter failed)."""


@dataclass
class BenchConfig:
    """What to run. Defaults are the published full matrix.

    Attributes:
        quick: Tiny data kinds (a smoke test: about a minute of CPU time without the peers).
        kinds: Kinds to run (default: all built-in kinds, or only ``source`` with ``source``).
        systems: Systems to run (default: all); the ``pt-files`` baseline is always run.
        source: A user's ``.pt`` file, directory of ``.pt`` files, or store to benchmark.
        source_layout: ``rows`` or ``columns`` for a ``source`` file holding a list or tuple
            of equal-length tensors (as ``tspt pack --layout``); None otherwise.
        repeats: Timed repetitions of every measurement (>= 1; the method asks for >= 5).
        warmup: Untimed repetitions before them (>= 1; the first checks every sample).
        workers: DataLoader worker counts measured.
        batch_size: DataLoader batch size.
        cold: Also measure reads after evicting the files from the page cache.
        python: Interpreter that runs the measurements (default: this one); e.g. the
            ``.venv-peers`` interpreter in which the peers are installed.
        workdir: Where stores are written (default: a new temporary directory, removed after).
        keep: Keep the packed data in ``workdir``.
        seed: Seed of the data kinds, the shuffles and the random-access order.
        timeout_s: Limit for one measurement process, in seconds.
        random_reads: Records read by one random-access pass (a fixed random subset of
            this many, the same for every system of a kind; all if fewer).
        random_cap_s: A random-access pass stops after this many seconds (its rate is then
            taken over the reads it made), so a system that decodes a whole chunk per read
            cannot stall the run.
        again_repeats: Timed repetitions of ``seq_again`` (later passes over the same open
            dataset; at most ``repeats``).
        loader_repeats: Timed epochs of each DataLoader measurement (at most ``repeats``).
        pack_budget_s: The timed pack repetitions of a cell stop once they add up to this
            many seconds (at least one is made; a warm-up pack that alone takes this long is
            the one); None: always ``repeats``.
        audit: Run ``tspt audit`` (:func:`tensorstore_pt.audit.audit_store`) on each kind's
            store packed with tensorstore_pt's default configuration, so the report can name
            the option to use.
        progress: Show a progress bar on stderr.
        command: The command line that started the run (recorded in the results).
    """

    quick: bool = False
    kinds: list[str] | None = None
    systems: list[str] | None = None
    source: str | None = None
    source_layout: str | None = None
    repeats: int = 5
    warmup: int = 1
    workers: tuple[int, ...] = (0, 2)
    batch_size: int = 32
    cold: bool = True
    python: str | None = None
    workdir: str | None = None
    keep: bool = False
    seed: int = 0
    timeout_s: float = 900.0
    random_reads: int = 512
    random_cap_s: float = 1.0
    again_repeats: int = 3
    loader_repeats: int = 3
    pack_budget_s: float | None = 10.0
    audit: bool = True
    progress: bool = True
    command: str = ""
    log_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- fork server client


class _Server:
    """The fork server process, driven over its stdin/stdout."""

    def __init__(self, python: str, preload: list[str], log_path: Path) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # so the cells run this very source
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = log_path
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "benchmarks.server", "--preload", ",".join(preload)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                cwd=root,
            )
        except OSError as exc:
            self._log.close()
            raise BenchError(f"cannot start the measurement interpreter {python!r}: {exc}") from exc
        self.hello = self._line()
        if self.hello.get("event") != "hello":
            raise BenchError(f"the measurement interpreter {python!r} did not start; see {str(log_path)!r}")

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = self.proc.stdout.readline()
        if not raw:
            code = self.proc.poll()
            raise BenchError(f"the measurement server exited (status {code}); its log is {str(self.log_path)!r}")
        return json.loads(raw)

    def run(self, task: dict[str, Any], on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Run one task; return ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": ...}``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(task) + "\n").encode())
        self.proc.stdin.flush()
        result: dict[str, Any] | None = None
        while True:
            msg = self._line()
            event = msg.get("event")
            if event == "progress":
                on_progress(msg)
            elif event == "result":
                result = msg
            elif event == "exit":
                if result is None:
                    return {"ok": False, "error": f"the measurement process died ({msg.get('status')})"}
                if not result.get("ok") and "timed out" in str(msg.get("status")):
                    result["error"] = msg["status"]
                return result

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- helpers


def _shard_bytes(payload: int) -> int:
    """The starting shard size of a kind (its warm-up packs, and the audited store): an
    eighth of the raw payload, within [8 KiB, 64 MiB].

    Each system's timed packs then use an eighth of what its warm-up pack wrote (at least
    of the payload): tensorstore_pt stores a ``torch.save`` container per record and counts
    stored bytes, litdata and Streaming count uncompressed column bytes, WebDataset tar
    bytes, so one size for all would give one system 8 shards and another 200. Sized per
    system, each writes about 8 or more shards/chunks: two DataLoader workers always have
    shards to split, and no system reads the whole kind from one cached chunk. The cells
    record the count and the size."""
    return int(min(max(payload // TARGET_SHARDS, MIN_SHARD_BYTES), MAX_SHARD_BYTES))


def _prepare_kind(
    name: str, kind_dir: Path, *, quick: bool, seed: int, source: str | None, layout: str | None = None
) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    kind = load_source(source, layout) if name == "source" else build_kind(name, "quick" if quick else "full", seed)
    build_s = time.perf_counter() - t0
    if not kind.samples:
        raise BenchError(f"kind {name!r}: no samples")
    kind_dir.mkdir(parents=True, exist_ok=True)
    torch.save(kind.samples, kind_dir / "samples.pt")
    torch.save(kind.samples[0], kind_dir / "first.pt")
    payload = sum(payload_bytes(s) for s in kind.samples)
    meta = {
        "name": name,
        "description": kind.description,
        "origin": kind.origin,
        "records": len(kind.samples),
        "payload_bytes": payload,
        "shard_bytes": _shard_bytes(payload),
        "build_s": round(build_s, 3),
        "digests": [sample_digest(s) for s in kind.samples],
    }
    with open(kind_dir / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return meta


def _scaled(stats: dict[str, Any] | None, factor: float) -> dict[str, Any] | None:
    """Rate stats (records/s) times ``factor`` (e.g. MB per record)."""
    if not stats:
        return None
    return {k: (v * factor if k != "values" else [x * factor for x in v]) for k, v in stats.items()}


def _derive(cell: dict[str, Any], kind: dict[str, Any], workers: tuple[int, ...]) -> dict[str, Any]:
    """Per-cell metrics from the raw op results (throughputs in samples/s and MB/s)."""
    n, payload = kind["records"], kind["payload_bytes"]
    m: dict[str, Any] = {}
    pack = cell.get("pack") or {}
    if pack:
        m["bytes_on_disk"] = pack["bytes_on_disk"]
        m["files"] = pack["files"]
        m["data_files"] = pack.get("data_files")
        if cell.get("family") != "baseline":  # one file per sample, or one file: no shard size
            m["shard_bytes"] = pack.get("shard_bytes")
        m["payload_per_disk_byte"] = payload / pack["bytes_on_disk"] if pack["bytes_on_disk"] else None
        m["pack_s"] = pack["pack_s"]
        m["pack_peak_rss_delta_bytes"] = pack.get("pack_peak_rss_delta_bytes")
    for op in READ_OPS:
        r = cell.get(op)
        if not r or "not_applicable" in r:
            continue
        for temp in ("warm", "cold"):
            rate = r.get(f"{temp}_rate")
            if rate:
                m[f"{op}_{temp}_samples_per_s"] = rate
                m[f"{op}_{temp}_MB_per_s"] = _scaled(rate, payload / n / 1e6)
        m[f"{op}_peak_rss_delta_bytes"] = r.get("peak_rss_delta_bytes")
        if r.get("cold_note"):
            m[f"{op}_cold_note"] = r["cold_note"]
    again = cell.get("seq_again")
    if again and again.get("warm_rate"):
        m["seq_again_warm_samples_per_s"] = again["warm_rate"]
        m["seq_again_same_dataset"] = again.get("same_dataset")
    for w in workers:
        r = cell.get(f"loader_w{w}")
        if r and r.get("warm_rate"):
            m[f"loader_w{w}_samples_per_s"] = r["warm_rate"]
            m[f"loader_w{w}_peak_rss_delta_bytes"] = r.get("peak_rss_delta_bytes")
    caches = [
        (cell.get(k) or {}).get("cache_bytes") or 0
        for k in cell
        if k in READ_OPS or k == "seq_again" or k.startswith("loader_w")
    ]
    m["read_cache_bytes"] = max(caches) if caches else 0
    return m


#: Metrics compared with the baseline: key -> True if higher is better.
COMPARED: dict[str, bool] = {
    "bytes_on_disk": False,
    "pack_s": False,
    "seq_warm_samples_per_s": True,
    "seq_cold_samples_per_s": True,
    "seq_again_warm_samples_per_s": True,
    "random_warm_samples_per_s": True,
    "random_cold_samples_per_s": True,
}


def _vs(value: Any, base: Any, higher_is_better: bool) -> float | None:
    """The factor by which ``value`` beats ``base`` (> 1 better, < 1 worse)."""
    v = value["median"] if isinstance(value, dict) else value
    b = base["median"] if isinstance(base, dict) else base
    if v is None or b is None or v == 0 or b == 0:
        return None
    return v / b if higher_is_better else b / v


def _compared(workers: tuple[int, ...]) -> dict[str, bool]:
    return {**COMPARED, **{f"loader_w{w}_samples_per_s": True for w in workers}}


def _iter_cells(kinds: list[str], systems: list[str]) -> Iterator[tuple[str, str]]:
    for k in kinds:
        for s in systems:
            yield k, s


# --------------------------------------------------------------------------- the run


def run_benchmark(config: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the matrix and return the results document (see docs/benchmarks.md, "Results file").

    Args:
        config: What to run.
        log: Where one-line notes go (skips, failures); default: stderr.

    Returns:
        The JSON-able results: config, machine, interpreter, kinds, per-cell raw results,
        derived metrics and ratios against the baseline.

    Raises:
        BenchError: Bad options, or the measurement interpreter could not start.
    """
    if log is None and config.progress and sys.stderr.isatty():
        from tqdm import tqdm

        log = lambda s: tqdm.write(s, file=sys.stderr)  # noqa: E731 (keeps the bar intact)
    say = log or (lambda s: print(s, file=sys.stderr))
    if config.repeats < 1 or config.warmup < 1:
        raise BenchError(f"repeats and warmup must be >= 1, found repeats={config.repeats}, warmup={config.warmup}")
    kinds = list(config.kinds) if config.kinds else (["source"] if config.source else list(KIND_NAMES))
    if config.source and "source" not in kinds:
        kinds.append("source")
    bad = [k for k in kinds if k not in KIND_NAMES and k != "source"]
    if bad:
        raise BenchError(f"unknown kind(s) {bad}; known: {list(KIND_NAMES)} and 'source' (with --source)")
    if "source" in kinds and not config.source:
        raise BenchError("kind 'source' needs --source PATH")
    try:
        systems = get_systems(config.systems)
    except KeyError as exc:
        raise BenchError(str(exc.args[0])) from None

    own_workdir = config.workdir is None
    workdir = Path(config.workdir or tempfile.mkdtemp(prefix="tspt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(config.log_dir) if config.log_dir else workdir
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc: dict[str, Any] = {
        "schema": "tspt-bench/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": config.command,
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress", "extra")},
        "machine": machine_info(workdir),
        "baseline": BASELINE,
        "notes": [],
        "kinds": {},
        "systems": {},
        "cells": [],
    }
    doc["config"]["workers"] = list(config.workers)

    def note(text: str) -> None:
        doc["notes"].append(text)
        say(f"note: {text}")

    server = None
    try:
        # 1. data
        for k in kinds:
            say(f"building kind {k!r}...")
            doc["kinds"][k] = _prepare_kind(
                k,
                workdir / "kinds" / k,
                quick=config.quick,
                seed=config.seed,
                source=config.source,
                layout=config.source_layout,
            )
        # 2. the measurement interpreter
        python = config.python or sys.executable
        preload = sorted({m for s in systems for m in s.modules})
        t_server = time.perf_counter()
        server = _Server(python, preload, log_dir / "server.log")
        doc["server_start_s"] = round(time.perf_counter() - t_server, 2)
        probe = server.run(
            {"op": "probe", "kinds": {k: str(workdir / "kinds" / k) for k in kinds}, "timeout_s": 300}, lambda _: None
        )
        if not probe.get("ok"):
            raise BenchError(
                f"probing the measurement interpreter failed: {probe.get('error')}\n{probe.get('traceback', '')}"
            )
        info = probe["result"]
        doc["interpreter"] = {k: v for k, v in info.items() if k != "systems"}
        runnable: list[str] = []
        for s in systems:
            entry = info["systems"][s.name]
            doc["systems"][s.name] = {
                "family": entry["family"],
                "label": entry["label"],
                "versions": entry.get("versions", {}),
                "unavailable": entry["unavailable"],
            }
            if entry["unavailable"]:
                note(f"{s.name} skipped: {entry['unavailable']} (interpreter {info['executable']})")
            else:
                runnable.append(s.name)
        if BASELINE not in runnable:
            raise BenchError(f"the baseline {BASELINE} cannot run: {doc['systems'][BASELINE]['unavailable']}")
        unsupported = {s: info["systems"][s]["unsupported"] for s in runnable}

        # 3. the option tspt audit recommends, per kind (on a store packed the default way)
        if config.audit:
            for kind in kinds:
                say(f"auditing kind {kind!r}...")
                reply = server.run(
                    {
                        "op": "audit",
                        "kind_dir": str(workdir / "kinds" / kind),
                        "root": str(workdir / "audit" / kind),
                        "shard_bytes": doc["kinds"][kind]["shard_bytes"],
                        "audit_repeats": 1 if config.quick else 3,
                        "timeout_s": config.timeout_s,
                    },
                    lambda _: None,
                )
                if reply.get("ok"):
                    doc["kinds"][kind]["audit"] = reply["result"]
                else:
                    note(f"{kind}: tspt audit failed: {reply.get('error')}")
                if not config.keep:
                    shutil.rmtree(workdir / "audit" / kind, ignore_errors=True)

        # 4. the cells
        ops = [*CELL_OPS, *[f"loader_w{w}" for w in config.workers]]
        total = len(kinds) * len(runnable) * len(ops)
        bar = _progress(total, config.progress)
        for kind, sname in _iter_cells(kinds, runnable):
            meta = doc["kinds"][kind]
            cell: dict[str, Any] = {"kind": kind, "system": sname, "family": doc["systems"][sname]["family"]}
            doc["cells"].append(cell)
            why = unsupported[sname].get(kind)
            if why:
                cell["status"] = "skipped"
                cell["note"] = why
                note(f"{kind}/{sname} skipped: {why}")
                bar.update(len(ops))
                continue
            root = workdir / "cells" / kind / sname
            base_task = {
                "system": sname,
                "kind_dir": str(workdir / "kinds" / kind),
                "root": str(root),
                "repeats": config.repeats,
                "warmup": config.warmup,
                "seed": config.seed,
                "shard_bytes": meta["shard_bytes"],
                "batch_size": config.batch_size,
                "cold": config.cold,
                "timeout_s": config.timeout_s,
                "random_reads": config.random_reads,
                "random_cap_s": config.random_cap_s,
                "pack_budget_s": config.pack_budget_s,
                "target_shards": TARGET_SHARDS,
                "payload_bytes": meta["payload_bytes"],
                "min_shard_bytes": MIN_SHARD_BYTES,
                "max_shard_bytes": MAX_SHARD_BYTES,
            }
            cell["status"] = "ok"
            for op in ops:
                bar.set_description(f"{kind}/{sname} {op}")
                task = dict(base_task, op=op)
                if op == "seq_again":
                    task["repeats"] = max(1, min(config.repeats, config.again_repeats))
                if op.startswith("loader_w"):
                    task["repeats"] = max(1, min(config.repeats, config.loader_repeats))
                if op.startswith("loader_w"):
                    task.update(op="loader", workers=int(op[len("loader_w") :]))

                def on_progress(msg: dict[str, Any], _op: str = op) -> None:
                    bar.set_postfix_str(f"{msg.get('phase')} {msg.get('rep')}/{msg.get('of')}", refresh=True)

                t_op = time.perf_counter()
                reply = server.run(task, on_progress)
                cell.setdefault("op_wall_s", {})[op] = round(time.perf_counter() - t_op, 3)
                bar.update(1)
                if reply.get("ok"):
                    cell[op] = reply["result"]
                    for n in reply["result"].get("notes", []):
                        if n not in cell.setdefault("notes", []):
                            cell["notes"].append(n)
                            note(f"{kind}/{sname}: {n}")
                    continue
                cell["status"] = "failed"
                cell["note"] = f"{op}: {reply.get('error')}"
                cell.setdefault("traceback", reply.get("traceback", ""))
                note(f"{kind}/{sname} failed in {op}: {reply.get('error')}")
                bar.update(len(ops) - 1 - ops.index(op))
                break
            if not config.keep:
                shutil.rmtree(root, ignore_errors=True)
            if cell["status"] == "ok":
                cell["metrics"] = _derive(cell, meta, tuple(config.workers))
        bar.close()
    finally:
        if server is not None:
            server.close()
        if own_workdir and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    # 5. ratios against the baseline of the same kind
    compared = _compared(tuple(config.workers))
    base_by_kind = {c["kind"]: c.get("metrics") for c in doc["cells"] if c["system"] == BASELINE}
    for c in doc["cells"]:
        base = base_by_kind.get(c["kind"])
        if c.get("metrics") and base:
            c["vs_baseline"] = {
                k: _vs(c["metrics"].get(k), base.get(k), hib)
                for k, hib in compared.items()
                if c["metrics"].get(k) is not None
            }
    for meta in doc["kinds"].values():
        meta.pop("digests", None)
    doc["machine"]["load_average_end"] = load_average()
    doc["elapsed_s"] = round(time.time() - started, 1)
    return doc


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, s: str) -> None: ...
    def set_postfix_str(self, s: str, refresh: bool = True) -> None: ...
    def close(self) -> None: ...


class _LineProgress(_NoBar):
    """Progress for logs (stderr is not a terminal): one line per finished measurement."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.desc, self.t0 = total, 0, "", time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if n:
            print(
                f"[{self.done}/{self.total} {time.monotonic() - self.t0:6.0f} s] {self.desc}",
                file=sys.stderr,
                flush=True,
            )

    def set_description(self, s: str) -> None:
        self.desc = s


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return _LineProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="op", file=sys.stderr, dynamic_ncols=True)
