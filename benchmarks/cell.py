"""One measurement, run inside a fresh process forked by :mod:`benchmarks.server`.

Operations (``task["op"]``):

``probe``
    Which systems can run in this interpreter, their versions, and which kinds each can hold.
``pack``
    Write the kind's samples ``warmup + repeats`` times into a fresh ``data`` directory;
    report the times, the bytes on disk of the last write and the pack's peak RSS above
    the RSS after loading the samples. The warm-up packs use ``shard_bytes``; with
    ``target_shards``, the timed ones use the bytes the warm-up wrote (at least
    ``payload_bytes``) over ``target_shards``, within ``min_shard_bytes``..``max_shard_bytes``,
    so each system spans about that many shards/chunks. With ``pack_budget_s``, the timed repetitions stop
    once they add up to that many seconds (at least one is made), and a warm-up pack that
    alone takes that long is the one timed repetition (``pack_warmup_timed``): a writer
    that trains a zstd dictionary for tens of seconds gets fewer repetitions, not a longer
    run.
``seq``
    Ordered full passes (open included): ``warmup`` untimed passes, the first of which
    checks every sample against the digests written at build time; ``repeats`` warm
    passes; then, if ``cold``, ``repeats`` passes each after evicting every file of the
    system (data and cache) from the page cache, with the residency left after eviction.
    Each timed pass starts with the system's ``cache`` directory emptied (untimed), so a
    system that decompresses shards into a local cache (Streaming) pays for it in every pass
    rather than reading the copy an earlier pass left (that is ``seq_again``).
``seq_again``
    Later passes over the same open dataset: the system's dataset is opened once (outside
    the timing), ``warmup`` untimed passes (the first checked, and the one that fills
    whatever the system keeps: litdata's decompressed chunk in memory, Streaming's
    decompressed shards on disk), then ``repeats`` timed warm passes over that same
    object. Shows what a second epoch costs, apart from the first pass (``seq``), which
    opens the dataset inside the timed pass.
``random``
    Like ``seq`` over a fixed random subset of ``random_reads`` records (in random order),
    through the system's random-access getter (opened inside each timed pass); a pass stops
    early after ``random_cap_s`` seconds and its rate is taken over the reads it made.
    The cache directory is emptied before each timed pass, as for ``seq``.
``loader``
    Epochs of the system's own loader (shuffled, ``batch_size``, ``workers`` persistent
    workers): ``warmup`` epochs (the first checks the samples), then ``repeats`` timed.
``audit``
    Pack the kind with tensorstore_pt's default configuration (:data:`~benchmarks.systems.tspt.AUDITED`)
    and run :func:`tensorstore_pt.audit.audit_store` on that store, as ``tspt audit`` does:
    its recommendation, the reason, each candidate's projection, and the benchmarked
    configuration that packs with the recommended options.

Every timed number is wall-clock seconds from ``time.perf_counter``; read operations also
report each pass's record count and rate (records per second). Peak RSS is this
process's (the DataLoader workers' memory is not included), above its RSS at the start of
the operation, which is the fork server's.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .kinds import sample_digest
from .systems import PackOptions, System, all_systems
from .timing import (
    Stats,
    evict,
    fsync_tree,
    peak_rss_bytes,
    reset_peak_rss,
    resident_bytes,
    rss_bytes,
    tree_files,
    tree_size,
)

__all__ = ["CheckFailed", "run_task"]

Emit = Callable[[dict[str, Any]], None]


class CheckFailed(AssertionError):
    """A system handed back other samples than were written (count or content)."""


def _system(name: str) -> System:
    return {s.name: s for s in all_systems()}[name]


def _load_samples(kind_dir: Path) -> list[Any]:
    import torch

    return torch.load(kind_dir / "samples.pt", weights_only=True)


def _meta(kind_dir: Path) -> dict[str, Any]:
    with open(kind_dir / "meta.json", encoding="utf-8") as f:
        return json.load(f)


def _check(what: str, got: list[int], expected: list[int], universe: list[int] | None = None) -> bool:
    """Raise unless ``got`` holds the samples ``expected``; return whether the order (for
    random access: each record at its position) matched too.

    With ``universe`` (random access to a subset), a system that stored the records in
    another order passes if every sample it returned was written, none more often than it
    was written (so distinct positions gave distinct records).
    """
    import collections

    if len(got) != len(expected):
        raise CheckFailed(f"{what}: expected {len(expected)} samples, found {len(got)}")
    if got == expected:
        return True
    if universe is not None:
        have, pool = collections.Counter(got), collections.Counter(universe)
        bad = sum(max(0, c - pool[d]) for d, c in have.items())
        if bad:
            raise CheckFailed(f"{what}: {bad} of {len(got)} samples read were never written (or read too often)")
        return False
    if sorted(got) != sorted(expected):
        bad = sum((collections.Counter(expected) - collections.Counter(got)).values())  # written, not read back
        raise CheckFailed(f"{what}: {bad} of {len(expected)} samples differ from what was written")
    return False


def _probe(task: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import platform
    import sys

    import lz4
    import numpy
    import torch
    import zstandard

    import tensorstore_pt

    firsts = {}
    for kind, kind_dir in task["kinds"].items():
        firsts[kind] = torch.load(Path(kind_dir) / "first.pt", weights_only=True)
    systems = {}
    for s in all_systems():
        reason = s.unavailable_reason()
        entry: dict[str, Any] = {"family": s.family, "label": s.label, "unavailable": reason, "unsupported": {}}
        if reason is None:
            try:
                entry["versions"] = s.versions()
            except Exception as exc:  # a broken install: say so, do not run it
                entry["unavailable"] = f"import failed: {type(exc).__name__}: {exc}"
            for kind, first in firsts.items():
                why = s.unsupported_reason(first)
                if why:
                    entry["unsupported"][kind] = why
        systems[s.name] = entry
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "zstandard": zstandard.__version__,
            "zstd library": ".".join(map(str, zstandard.ZSTD_VERSION)),
            "lz4": lz4.__version__,
            "lz4 library": lz4.library_version_string(),
            "tensorstore_pt": tensorstore_pt.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "systems": systems,
    }


def _pack(task: dict[str, Any], system: System, emit: Emit) -> dict[str, Any]:
    kind_dir, root = Path(task["kind_dir"]), Path(task["root"])
    samples = _load_samples(kind_dir)
    gc.collect()
    base = rss_bytes()
    reset_ok = reset_peak_rss()
    options = PackOptions(shard_bytes=int(task["shard_bytes"]))
    times = []
    warmup_timed = False
    total = task["warmup"] + task["repeats"]
    data_dir = root / "data"
    for r in range(total):
        emit({"phase": "pack", "rep": r + 1, "of": total})
        shutil.rmtree(root, ignore_errors=True)
        data_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        system.pack(samples, data_dir, options)
        dt = time.perf_counter() - t0
        budget = task.get("pack_budget_s")
        if r >= task["warmup"]:
            times.append(dt)
            if budget and sum(times) >= float(budget):
                break
        elif r == 0 and budget and dt >= float(budget):
            # A pack this long is its own work (a dictionary trained), not first-time costs:
            # the warm-up pack is the one timed repetition.
            times.append(dt)
            warmup_timed = True
            break
        if r == task["warmup"] - 1 and task.get("target_shards"):
            options = _sized(task, system, samples, data_dir, options)
    peak = peak_rss_bytes()
    fsync_tree(data_dir)
    nbytes, nfiles = tree_size(data_dir)
    return {
        "pack_s": Stats.of(times).to_json(),
        "bytes_on_disk": nbytes,
        "files": nfiles,
        "data_files": len(data_files(data_dir)),
        "shard_bytes": options.shard_bytes,
        "pack_warmup_timed": warmup_timed,
        "pack_peak_rss_delta_bytes": (peak - base) if (reset_ok and peak is not None and base is not None) else None,
    }


def _sized(task: dict[str, Any], system: System, samples: list[Any], data_dir: Path, first: PackOptions) -> PackOptions:
    """This system's shard size, from what its warm-up pack (at ``first``) left in ``data_dir``:
    the bytes written (at least the payload) over ``target_shards``, within the bounds. A
    writer with a fixed cost per file (a tar's 10 KiB end blocks) writes far more bytes in
    small shards than in large ones; if the new size then gives fewer than half the target,
    one untimed trial pack shrinks it by the shortfall."""
    target, lo, hi = int(task["target_shards"]), int(task["min_shard_bytes"]), int(task["max_shard_bytes"])

    def clamp(n: int) -> int:
        return int(min(max(n, lo), hi))

    written = sum(p.stat().st_size for p in data_files(data_dir))
    size = clamp(max(written, int(task.get("payload_bytes") or 0)) // target)
    if size > 2 * first.shard_bytes:
        shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True)
        system.pack(samples, data_dir, PackOptions(shard_bytes=size))
        count = len(data_files(data_dir))
        if count < target // 2:
            size = clamp(size * count // target)
    return PackOptions(shard_bytes=size)


def data_files(data_dir: Path) -> list[Path]:
    """The files holding the records (shards, chunks, tars, ``.pt`` files): every file the
    writer left except its metadata (``*.json``: indexes, the adapters' schemas) and hidden
    files (locks). A trained zstd dictionary counts: it is read with the data."""
    return [p for p in tree_files(data_dir) if not p.name.endswith(".json") and not p.name.startswith(".")]


class _Reopening:
    """Each ``iter()`` re-opens the dataset through ``system.iterate``."""

    def __init__(self, system: System, data_dir: Path, cache_dir: Path) -> None:
        self.system, self.data_dir, self.cache_dir = system, data_dir, cache_dir

    def __iter__(self) -> Any:
        return iter(self.system.iterate(self.data_dir, self.cache_dir))


def _sequential_dataset(system: System, data_dir: Path, cache_dir: Path) -> tuple[Any, bool]:
    """(an iterable whose every ``iter()`` is one ordered pass, whether it is one open dataset)."""
    ds = system.sequential_dataset(data_dir, cache_dir)
    if ds is not None:
        return ds, True
    return _Reopening(system, data_dir, cache_dir), False


def _passes(
    task: dict[str, Any],
    emit: Emit,
    name: str,
    one_pass: Callable[[bool, float | None], list[int]],
    expected: list[int],
    files: Callable[[], list[Path]],
    *,
    cap_s: float | None = None,
    after_pass: Callable[[], None] = lambda: None,
    before_timed: Callable[[], None] = lambda: None,
    universe: list[int] | None = None,
) -> dict[str, Any]:
    """Warm-up (the first checked), warm repetitions, and cold repetitions with eviction.

    ``one_pass(check, deadline)`` reads the samples (all of ``expected``, in order, or up to
    ``time.perf_counter() >= deadline`` when ``cap_s`` is set) and returns their digests if
    ``check`` else one placeholder per sample read. Each timed pass is reported as its
    seconds, its record count and its rate (records / seconds). ``after_pass`` (the system's
    ``close``) runs after each pass and ``before_timed`` before each timed pass, both outside
    the timing.
    """
    out: dict[str, Any] = {}
    for r in range(task["warmup"]):
        emit({"phase": f"{name} warm-up", "rep": r + 1, "of": task["warmup"]})
        got = one_pass(r == 0, None if cap_s is None else time.perf_counter() + cap_s)
        after_pass()
        if r == 0:
            out["order_preserved"] = _check(name, got, expected[: len(got)] if cap_s else expected, universe)

    def timed() -> tuple[float, int]:
        before_timed()
        t0 = time.perf_counter()
        count = len(one_pass(False, None if cap_s is None else t0 + cap_s))
        dt = time.perf_counter() - t0
        after_pass()
        if count != len(expected) and not (cap_s and 0 < count < len(expected)):
            raise CheckFailed(f"{name}: expected {len(expected)} samples, found {count}")
        return dt, count

    def record(prefix: str, runs: list[tuple[float, int]]) -> None:
        out[f"{prefix}_s"] = Stats.of(t for t, _ in runs).to_json()
        out[f"{prefix}_records"] = [c for _, c in runs]
        out[f"{prefix}_rate"] = Stats.of(c / t for t, c in runs).to_json()

    runs = []
    for r in range(task["repeats"]):
        emit({"phase": f"{name} warm", "rep": r + 1, "of": task["repeats"]})
        runs.append(timed())
    record("warm", runs)
    if task.get("cold"):
        runs, resident, total = [], [], 0
        note = None
        for r in range(task["repeats"]):
            emit({"phase": f"{name} cold", "rep": r + 1, "of": task["repeats"]})
            paths = files()
            note = evict(paths)
            if note:
                break
            res = resident_bytes(paths)
            total = sum(p.stat().st_size for p in paths)
            if res is not None:
                resident.append(res)
            runs.append(timed())
        if note:
            out["cold_note"] = f"cold reads not measured: {note}"
        else:
            record("cold", runs)
            out["cold_resident_after_evict_bytes"] = max(resident) if resident else None
            out["cold_files_bytes"] = total
    return out


def _read(task: dict[str, Any], system: System, emit: Emit) -> dict[str, Any]:
    import numpy as np

    kind_dir, root = Path(task["kind_dir"]), Path(task["root"])
    data_dir, cache_dir = root / "data", root / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    expected = _meta(kind_dir)["digests"]
    n = len(expected)
    gc.collect()
    base = rss_bytes()
    reset_ok = reset_peak_rss()

    def files() -> list[Path]:
        return tree_files(data_dir) + tree_files(cache_dir)

    def empty_cache() -> None:
        """Each timed ``seq`` and ``random`` pass starts with the system's cache empty, so that
        nobody is timed reading a decompressed copy kept from an earlier pass (Streaming's
        decompressed shards): what a pass keeps within itself it may use."""
        for p in list(cache_dir.iterdir()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    op = task["op"]
    out: dict[str, Any]
    if op == "seq":

        def one_pass(check: bool, deadline: float | None) -> list[int]:
            got = []
            count = 0
            for s in system.iterate(data_dir, cache_dir):
                count += 1
                if check:
                    got.append(sample_digest(s))
            return got if check else [0] * count

        out = _passes(
            task, emit, "sequential", one_pass, expected, files, after_pass=system.close, before_timed=empty_cache
        )
    elif op == "seq_again":
        dataset, same = _sequential_dataset(system, data_dir, cache_dir)

        def one_pass(check: bool, deadline: float | None) -> list[int]:
            got = []
            count = 0
            for s in dataset:
                count += 1
                if check:
                    got.append(sample_digest(s))
            return got if check else [0] * count

        task = {**task, "cold": False}  # a later pass over what is already open: warm only
        out = _passes(task, emit, "sequential again", one_pass, expected, files)
        out["same_dataset"] = same
        del dataset
        system.close()
    elif op == "random":
        probe = system.random_access(data_dir, cache_dir)
        system.close()
        if probe is None:
            return {"not_applicable": f"{system.name} has no random access"}
        del probe
        reads = min(n, int(task.get("random_reads") or n))
        perm = [int(i) for i in np.random.default_rng(task["seed"]).permutation(n)[:reads]]
        expected_perm = [expected[i] for i in perm]
        clock = time.perf_counter

        def one_pass(check: bool, deadline: float | None) -> list[int]:
            get = system.random_access(data_dir, cache_dir)
            if get is None:
                raise CheckFailed(f"{system.name}: random access went away between passes")
            got = []
            for i in perm:
                s = get(i)
                got.append(sample_digest(s) if check else 0)
                if deadline is not None and clock() >= deadline:
                    break
            return got

        out = _passes(
            task, emit, "random", one_pass, expected_perm, files,
            cap_s=task.get("random_cap_s"), after_pass=system.close, before_timed=empty_cache, universe=expected,
        )  # fmt: skip
        out["reads_per_pass"] = reads
    elif op == "loader":
        workers = int(task["workers"])
        loader = system.loader(
            data_dir, cache_dir, num_workers=workers, batch_size=task["batch_size"], seed=task["seed"]
        )

        def one_pass(check: bool, deadline: float | None) -> list[int]:
            got, count = [], 0
            for batch in loader:
                count += len(batch)
                if check:
                    got.extend(sample_digest(s) for s in batch)
            return got if check else [0] * count

        task = {**task, "cold": False}
        out = _passes(task, emit, f"loader w={workers}", one_pass, expected, files)
        # No explicit shutdown: some loaders wait seconds for their workers to join. This
        # process ends with os._exit right after reporting and the server kills its group.
    else:
        raise ValueError(f"unknown op {op!r}")
    peak = peak_rss_bytes()
    out["peak_rss_delta_bytes"] = (peak - base) if (reset_ok and peak is not None and base is not None) else None
    out["rss_base_bytes"] = base
    cache_bytes, _ = tree_size(cache_dir)
    out["cache_bytes"] = cache_bytes
    return out


def _audit(task: dict[str, Any], emit: Emit) -> dict[str, Any]:
    import time as _time

    from tensorstore_pt.audit import audit_store

    from .systems.tspt import AUDITED, system_for_audit

    kind_dir, root = Path(task["kind_dir"]), Path(task["root"])
    data_dir = root / "data"
    shutil.rmtree(root, ignore_errors=True)
    data_dir.mkdir(parents=True)
    emit({"phase": "audit pack", "rep": 1, "of": 1})
    _system(AUDITED).pack(_load_samples(kind_dir), data_dir, PackOptions(shard_bytes=int(task["shard_bytes"])))
    emit({"phase": "audit", "rep": 1, "of": 1})
    t0 = _time.perf_counter()
    report = audit_store(data_dir, repeats=int(task.get("audit_repeats", 3)))
    audit_s = _time.perf_counter() - t0
    best = next((p for p in report.projections if p.label == report.recommendation), None)
    return {
        "store_system": AUDITED,
        "store": str(data_dir),
        "recommendation": report.recommendation,
        "reason": report.reason,
        "options": dict(best.codec) if best else None,
        "system": system_for_audit(best.codec) if best else None,
        "projections": [
            {"label": p.label, "codec": dict(p.codec), "file_bytes": p.file_bytes, "decode_mb_s": p.decode_mb_s}
            for p in report.projections
        ],
        "audit_s": round(audit_s, 3),
    }


def run_task(task: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Run one operation (see the module docstring) and return its JSON-able result.

    Raises:
        CheckFailed: The system handed back other samples than were written.
        Anything the system raises (reported by the server as the cell's error).
    """
    import warnings

    # Some readers hand back read-only numpy buffers; torch.from_numpy warns on each.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if task["op"] == "probe":
        return _probe(task, emit)
    if task["op"] == "audit":
        return _audit(task, emit)
    system = _system(task["system"])
    result = _pack(task, system, emit) if task["op"] == "pack" else _read(task, system, emit)
    if system.notes:
        result["notes"] = list(dict.fromkeys(system.notes))
    return result
