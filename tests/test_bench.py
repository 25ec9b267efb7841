"""The benchmark harness: ``tspt bench --quick`` end to end, and its measuring parts.

The quick run is the harness's smoke test (so it cannot rot); its numbers are not checked
against speed targets, only for being well-formed and consistent with the files on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks.kinds import KIND_NAMES, build_kind, payload_bytes, sample_digest
from benchmarks.report import (
    DEFAULT_TSPT,
    DOCS_BEGIN,
    DOCS_END,
    SAME_BAND,
    markdown,
    recommended_system,
    summary_rows,
    verdicts,
)
from benchmarks.runner import BenchConfig, BenchError, run_benchmark
from benchmarks.systems import BASELINE, PackOptions, all_systems, get_systems
from benchmarks.systems._schema import UnsupportedSample, infer_schema
from benchmarks.timing import Stats, evict, fsync_tree, resident_bytes, tree_size

NON_PEERS = ["pt-files", "pt-list", "tspt-none", "tspt-zstd3"]
THROUGHPUTS = [
    "seq_warm_samples_per_s",
    "seq_cold_samples_per_s",
    "seq_again_warm_samples_per_s",
    "random_warm_samples_per_s",
    "random_cold_samples_per_s",
    "loader_w0_samples_per_s",
    "loader_w2_samples_per_s",
]


# --------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One ``tspt bench --quick`` run (the systems that need no extra packages), kept on disk."""
    from tensorstore_pt.cli import main

    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    docs = out / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nhand-written intro\n\n{DOCS_BEGIN}\nold\n{DOCS_END}\n\nhand-written closing\n")
    code = main(
        ["bench", "--quick", "-q", "--systems", ",".join(NON_PEERS), "--out", str(out), "--workdir", str(work),
         "--keep", "--docs", str(docs)]
    )  # fmt: skip
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def test_quick_covers_every_kind_and_system(quick: tuple[dict, Path]) -> None:
    doc, _ = quick
    assert list(doc["kinds"]) == list(KIND_NAMES)
    cells = {(c["kind"], c["system"]): c for c in doc["cells"]}
    assert set(cells) == {(k, s) for k in KIND_NAMES for s in NON_PEERS}
    assert all(c["status"] == "ok" for c in cells.values()), [c.get("note") for c in cells.values()]
    for c in cells.values():
        m = c["metrics"]
        for key in ["bytes_on_disk", "pack_s", "seq_warm_MB_per_s", *THROUGHPUTS]:
            assert m.get(key) is not None, (c["kind"], c["system"], key)
        for key in ["pack_s", *THROUGHPUTS]:
            s = m[key]
            assert 0 < s["min"] <= s["median"] <= s["max"] < float("inf"), (c["kind"], c["system"], key, s)
        assert len(m["pack_s"]["values"]) == 5  # --quick keeps the method's 5 repetitions
        assert c["seq"]["order_preserved"] is True and c["random"]["order_preserved"] is True
        # the later passes: one open dataset, checked in order, warm only, 3 repetitions
        again = c["seq_again"]
        assert again["order_preserved"] is True and again["same_dataset"] is True
        assert again["warm_records"] == [doc["kinds"][c["kind"]]["records"]] * 3
        assert "cold_rate" not in again and m["seq_again_same_dataset"] is True
        if m.get("seq_peak_rss_delta_bytes") is not None:
            assert 0 <= m["seq_peak_rss_delta_bytes"] < 2**31


def test_quick_records_the_machine_and_method(quick: tuple[dict, Path]) -> None:
    doc, _ = quick
    assert doc["machine"]["cores"] == os.cpu_count()
    assert doc["machine"]["cpu"]
    versions = doc["interpreter"]["versions"]
    assert versions["torch"] == torch.__version__
    assert {"zstandard", "lz4", "numpy", "tensorstore_pt"} <= set(versions)
    assert doc["command"].startswith("tspt bench --quick")
    assert doc["config"]["repeats"] == 5 and doc["config"]["warmup"] == 1
    assert doc["baseline"] == BASELINE == "pt-files"
    # the peers are not installed in the test environment's run: skipped with a note, or
    # not requested at all (as here) -- either way no cell of theirs
    assert not any(c["family"] == "peer" for c in doc["cells"])


def test_bytes_on_disk_equal_the_files_sizes(quick: tuple[dict, Path]) -> None:
    doc, _ = quick
    work = Path(doc["config"]["workdir"])
    for c in doc["cells"]:
        data = work / "cells" / c["kind"] / c["system"] / "data"
        files = [p for p in data.rglob("*") if p.is_file()]
        assert c["metrics"]["bytes_on_disk"] == sum(p.stat().st_size for p in files) > 0
        assert c["metrics"]["files"] == len(files)
        # data files: the shards / .pt files, not the index or the writer's lock
        if c["system"].startswith("tspt-"):
            shards = [p for p in files if p.suffix == ".tspt"]
            assert (
                c["metrics"]["data_files"]
                == len(shards)
                == len(json.loads((data / "index.json").read_text())["shards"])
            )
        else:
            assert c["metrics"]["data_files"] == len([p for p in files if p.suffix == ".pt"])
    n_small = doc["kinds"]["small"]["records"]
    assert (
        next(c for c in doc["cells"] if c["kind"] == "small" and c["system"] == "pt-files")["metrics"]["files"]
        == n_small
    )
    # each system's shard size: an eighth of what its warm-up pack wrote (at least of the
    # payload), never below the kind's starting size
    for c in doc["cells"]:
        kind = doc["kinds"][c["kind"]]
        if c["system"].startswith("tspt-"):
            data = work / "cells" / c["kind"] / c["system"] / "data"
            written = sum(p.stat().st_size for p in data.iterdir() if p.suffix == ".tspt")
            expected = min(max(max(written, kind["payload_bytes"]) // 8, 8 * 2**10), 64 * 2**20)
            # the timed packs wrote about what the warm-up wrote (the index names the shards)
            assert c["metrics"]["shard_bytes"] == pytest.approx(expected, rel=0.05)
        if c["family"] == "baseline":
            assert "shard_bytes" not in c["metrics"]
        else:
            assert c["metrics"]["shard_bytes"] >= kind["shard_bytes"]
    # the shard size lets every sharded system span several shards even on the quick data
    for c in doc["cells"]:
        if c["system"].startswith("tspt-") and c["kind"] != "large":
            assert c["metrics"]["data_files"] >= 2, (c["kind"], c["system"])


def test_ratios_are_against_the_baseline_of_the_same_kind(quick: tuple[dict, Path]) -> None:
    doc, _ = quick
    for c in doc["cells"]:
        base = next(b for b in doc["cells"] if b["kind"] == c["kind"] and b["system"] == BASELINE)["metrics"]
        vs, m = c["vs_baseline"], c["metrics"]
        assert vs["bytes_on_disk"] == pytest.approx(base["bytes_on_disk"] / m["bytes_on_disk"])
        assert vs["pack_s"] == pytest.approx(base["pack_s"]["median"] / m["pack_s"]["median"])
        for key in THROUGHPUTS:
            assert vs[key] == pytest.approx(m[key]["median"] / base[key]["median"])
        if c["system"] == BASELINE:
            assert all(v == pytest.approx(1.0) for v in vs.values())
        # throughput = records / median seconds, MB/s = payload / median seconds
        kind = doc["kinds"][c["kind"]]
        secs = c["seq"]["warm_s"]["median"]
        assert m["seq_warm_samples_per_s"]["median"] == pytest.approx(kind["records"] / secs)
        assert m["seq_warm_MB_per_s"]["median"] == pytest.approx(kind["payload_bytes"] / 1e6 / secs)


def test_cold_reads_evicted_the_files(quick: tuple[dict, Path]) -> None:
    doc, _ = quick
    for c in doc["cells"]:
        seq = c["seq"]
        assert seq.get("cold_note") is None
        resident = seq["cold_resident_after_evict_bytes"]
        if resident is not None:  # mincore available: eviction left (almost) nothing behind
            assert resident <= 0.05 * seq["cold_files_bytes"] + 64 * 2**10


def test_outputs_and_docs(quick: tuple[dict, Path]) -> None:
    doc, out = quick
    md = (out / "results.md").read_text()
    for kind in KIND_NAMES:
        assert f"### {kind}:" in md
    for system in NON_PEERS:
        assert f"| {system} |" in md
    assert "tspt-zstd3" in md and "Summary" in md
    docs = (out / "benchmarks.md").read_text()
    assert docs.startswith("# Benchmarks\n\nhand-written intro\n\n" + DOCS_BEGIN)
    assert docs.rstrip().endswith(DOCS_END + "\n\nhand-written closing")
    assert "old\n" not in docs and doc["command"] in docs
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "throughput_vs_size_seq_warm.png" in pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_recommended_option_is_what_tspt_audit_recommends(quick: tuple[dict, Path]) -> None:
    """The summary speaks per kind for the option `tspt audit` recommends on that kind's
    default store (re-audited here, independently of the run)."""
    from tensorstore_pt.audit import audit_store

    from benchmarks.systems.tspt import CONFIGS

    doc, out = quick
    work = Path(doc["config"]["workdir"])
    md = (out / "results.md").read_text()
    rows = summary_rows(doc)
    ran = {c["system"] for c in doc["cells"] if c.get("metrics")}
    for kind, meta in doc["kinds"].items():
        audit = meta["audit"]
        store = work / "audit" / kind / "data"
        assert audit["store_system"] == DEFAULT_TSPT and Path(audit["store"]) == store
        again = audit_store(store)
        if again.recommendation != audit["recommendation"]:
            # only a tie on size (candidates within 5% of the smallest) may be broken the other
            # way by decode speed, which moves between runs; sizes are exact
            sizes = {p.label: p.file_bytes for p in again.projections}
            smallest = min(sizes.values())
            assert sizes[again.recommendation] <= 1.05 * smallest and sizes[audit["recommendation"]] <= 1.05 * smallest
            continue
        best = next(p for p in again.projections if p.label == again.recommendation)
        # the benchmarked configuration packs with exactly those options
        row = next(r for r in CONFIGS if r[0] == audit["system"])
        _, codec, level, extra = row
        assert codec == best.codec["codec"]
        assert (level if level is not None else {"lz4": 0, "zstd": 3}[codec]) == best.codec.get(
            "level", {"lz4": 0, "zstd": 3}.get(codec)
        )
        assert bool(extra.get("dictionary")) == bool(best.codec.get("dictionary"))
        assert bool(extra.get("frame_target_bytes")) == bool(best.codec.get("frame_target_bytes"))
        expected = audit["system"] if audit["system"] in ran else DEFAULT_TSPT
        assert recommended_system(doc, kind)[0] == expected
        assert {r["system"] for r in rows if r["kind"] == kind} == {expected}
        assert f"| {kind} | `{expected}`" in md


# --------------------------------------------------------------------------- parts


def _verdict_doc(values: dict[str, tuple[float, float]]) -> dict:
    """A results doc of one kind: for each metric key, (the option's value, the peer's)."""
    from benchmarks.report import SUMMARY

    def stats(v: float) -> dict:
        return {"median": v, "min": v, "max": v, "values": [v]}

    mine, peer, base = {}, {}, {}
    for key, _, _ in SUMMARY:
        if key in values:
            a, b = values[key]
            mine[key], peer[key], base[key] = (a, b, a) if key == "bytes_on_disk" else (stats(a), stats(b), stats(a))
    audit = {"store_system": "tspt-zstd3", "store": "x", "recommendation": "zstd-3+frames", "reason": "r",
             "system": "tspt-zstd3-frames64k", "options": {}, "projections": []}  # fmt: skip
    return {
        "created": "now",
        "command": "synthetic",
        "baseline": "pt-files",
        "config": {"repeats": 1, "warmup": 1, "batch_size": 32},
        "machine": {"cpu": "c", "cores": 2, "os": "o"},
        "systems": {},
        "notes": [],
        "kinds": {
            "k": {
                "description": "d",
                "records": 10,
                "payload_bytes": 100,
                "origin": "o",
                "shard_bytes": 8192,
                "audit": audit,
            }
        },  # fmt: skip
        "cells": [
            {"kind": "k", "system": "pt-files", "family": "baseline", "status": "ok", "metrics": base},
            {"kind": "k", "system": "tspt-zstd3", "family": "tensorstore_pt", "status": "ok", "metrics": peer},
            {
                "kind": "k",
                "system": "tspt-zstd3-frames64k",
                "family": "tensorstore_pt",
                "status": "ok",
                "metrics": mine,
            },
            {"kind": "k", "system": "peer-a", "family": "peer", "status": "ok", "metrics": peer},
        ],  # fmt: skip
    }


def test_wins_and_losses_follow_the_numbers() -> None:
    lo, hi = SAME_BAND
    assert (lo, hi) == (0.8, 1.25)
    doc = _verdict_doc(
        {
            "bytes_on_disk": (300, 100),  # 3x the peer's bytes: loses
            "pack_s": (1.0, 1.2),  # 0.83x the peer's time: 1.2x better, about the same
            "seq_warm_samples_per_s": (125.0, 100.0),  # exactly 1.25x: wins
            "seq_cold_samples_per_s": (80.0, 100.0),  # exactly 0.8x: about the same
            "random_warm_samples_per_s": (400.0, 100.0),  # wins
            "loader_w2_samples_per_s": (79.0, 100.0),  # just below 0.8x: loses
        }
    )
    rows = summary_rows(doc)
    assert {r["system"] for r in rows} == {"tspt-zstd3-frames64k"}  # the audited option, not the default
    v = verdicts(rows)["k"]
    assert [r["metric"] for r in v["wins"]] == ["seq_warm_samples_per_s", "random_warm_samples_per_s"]
    assert [r["metric"] for r in v["same"]] == ["pack_s", "seq_cold_samples_per_s"]
    assert [r["metric"] for r in v["loses"]] == ["bytes_on_disk", "loader_w2_samples_per_s"]
    md = markdown(doc)
    line = next(x for x in md.splitlines() if x.startswith("- **k**"))
    assert line.startswith("- **k**, `tspt-zstd3-frames64k` (`tspt audit` recommends zstd-3+frames)")
    wins, rest = line.split("wins: ")[1].split("; about the same: ")
    same, loses = rest.split("; loses: ")
    assert wins == "sequential read, warm 1.25x peer-a's, random access, warm 4x peer-a's"
    assert same == "pack time 0.833x peer-a's, sequential read, cold 0.8x peer-a's"
    assert loses == "bytes on disk 3x peer-a's, DataLoader, 2 workers 0.79x peer-a's."
    assert "| k | `tspt-zstd3-frames64k` |" in md
    assert "| | `tspt-zstd3`<br><sub>default</sub> |" in md  # the default's row follows, for comparison
    # without that option in the run, the summary falls back to the default and says why
    doc["cells"] = [c for c in doc["cells"] if c["system"] != "tspt-zstd3-frames64k"]
    assert recommended_system(doc, "k") == (
        DEFAULT_TSPT,
        "`tspt audit` recommends zstd-3+frames (`tspt-zstd3-frames64k`), not run here",
    )
    assert {r["system"] for r in summary_rows(doc)} == {DEFAULT_TSPT}
    assert "audit: zstd-3+frames, not run" in markdown(doc)


def test_rows_of_the_summary() -> None:
    def cell(system: str, family: str, nbytes: int, rate: float) -> dict:
        r = {"median": rate, "min": rate, "max": rate}
        return {"kind": "k", "system": system, "family": family, "status": "ok",
                "metrics": {"bytes_on_disk": nbytes, "seq_warm_samples_per_s": r}}  # fmt: skip

    doc = {
        "baseline": "pt-files",
        "kinds": {"k": {}},
        "cells": [
            cell("pt-files", "baseline", 1000, 100.0),
            cell("tspt-zstd3", "tensorstore_pt", 250, 300.0),
            cell("peer-a", "peer", 200, 150.0),
            cell("peer-b", "peer", 500, 600.0),
        ],
    }
    rows = {r["metric"]: r for r in summary_rows(doc)}
    assert rows["bytes_on_disk"]["vs_baseline"] == pytest.approx(4.0)
    assert (rows["bytes_on_disk"]["peer"], rows["bytes_on_disk"]["vs_peer"]) == ("peer-a", pytest.approx(0.8))
    assert rows["seq_warm_samples_per_s"]["vs_baseline"] == pytest.approx(3.0)
    assert (rows["seq_warm_samples_per_s"]["peer"], rows["seq_warm_samples_per_s"]["vs_peer"]) == (
        "peer-b",
        pytest.approx(0.5),
    )


def test_pack_repetitions_stop_at_the_budget(tmp_path: Path) -> None:
    """A slow writer gets fewer timed packs (at least one), not a longer run."""
    import time

    from benchmarks.cell import _pack
    from benchmarks.systems.abc import System

    class Slow(System):
        name, family, label = "slow", "baseline", "sleeps 0.5 s a pack"

        calls = 0

        def pack(self, samples, data_dir, options):  # noqa: ANN001
            Slow.calls += 1
            time.sleep(0.5)
            (data_dir / "part-0.bin").write_bytes(b"x" * len(samples))

        def iterate(self, data_dir, cache_dir):  # noqa: ANN001
            return iter(())

        def loader(self, data_dir, cache_dir, **kw):  # noqa: ANN001
            return []

    (tmp_path / "kind").mkdir()
    torch.save([torch.zeros(2)] * 3, tmp_path / "kind" / "samples.pt")
    task = {"kind_dir": str(tmp_path / "kind"), "root": str(tmp_path / "cell"), "warmup": 1, "repeats": 5,
            "shard_bytes": 8192, "pack_budget_s": 0.8}  # fmt: skip
    out = _pack(task, Slow(), lambda _: None)
    assert len(out["pack_s"]["values"]) == 2  # 0.5 s, then 1 s >= 0.8 s: stop
    assert out["data_files"] == out["files"] == 1 and out["bytes_on_disk"] == 3
    assert out["pack_warmup_timed"] is False
    out = _pack({**task, "repeats": 3, "pack_budget_s": None}, Slow(), lambda _: None)
    assert len(out["pack_s"]["values"]) == 3
    # a warm-up pack over the budget is the one timed repetition: one pack in all
    Slow.calls = 0
    out = _pack({**task, "pack_budget_s": 0.4}, Slow(), lambda _: None)
    assert len(out["pack_s"]["values"]) == 1 and out["pack_warmup_timed"] is True
    assert Slow.calls == 1


def test_stats_rate_swaps_min_and_max() -> None:
    s = Stats.of([2.0, 1.0, 4.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 4.0)
    r = s.rate(100)
    assert (r.median, r.min, r.max) == (50.0, 25.0, 100.0)
    with pytest.raises(ValueError, match="at least one"):
        Stats.of([])


def test_eviction_drops_pages(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(4 * 2**20))
    fsync_tree(tmp_path)
    p.read_bytes()
    before = resident_bytes([p])
    if before is None:
        pytest.skip("mincore is not available here")
    assert before > 0
    assert evict([p]) is None
    after = resident_bytes([p])
    assert after is not None and after < before
    assert tree_size(tmp_path) == (4 * 2**20, 1)


def test_kinds_are_deterministic_and_shaped() -> None:
    for name in KIND_NAMES:
        a, b = build_kind(name, "quick", seed=3), build_kind(name, "quick", seed=3)
        assert [sample_digest(s) for s in a.samples] == [sample_digest(s) for s in b.samples]
        assert a.samples and all(payload_bytes(s) > 0 for s in a.samples)
    small = build_kind("small", "quick").samples[0]
    assert isinstance(small, tuple) and len(small) == 2  # the tutorial way: (image, label)
    assert small[0].dtype == torch.uint8 and small[0].shape == (8, 8)
    assert small[1].dtype == torch.int64 and small[1].dim() == 0
    medium = build_kind("medium", "quick").samples[0]
    assert medium["image"].dtype == torch.uint8 and medium["image"].shape == (3, 64, 64)
    tokens = build_kind("tokens", "quick").samples
    assert all(t["tokens"].dtype == torch.int64 and 10 <= len(t["tokens"]) <= 512 for t in tokens)
    large = build_kind("large", "quick").samples[0]
    assert large["spec"].dtype == torch.float16 and large["spec"].shape[0] == 80
    assert large["audio"].dtype == torch.int16 and large["audio"].numel() == 160 * large["spec"].shape[1]
    embed = build_kind("embed", "quick").samples
    for s in embed:
        assert s["embedding"].dtype == torch.float32 and s["embedding"].shape == (384,)
        assert float(s["embedding"].norm()) == pytest.approx(1.0, abs=1e-4)
        assert isinstance(s["text"], str) and 20 <= len(s["text"]) <= 300
    assert len({s["text"] for s in embed}) == len(embed)
    # real text: sentences that share words get closer vectors than ones that share none
    embed = build_kind("embed", "full").samples[:300]  # the same fitted model; more sentences
    assert len(build_kind("small", "full").samples) == 1797  # every digit scikit-learn ships
    e = torch.stack([s["embedding"] for s in embed])
    words = [set(s["text"].lower().split()) for s in embed]
    sims = e @ e.T
    share = [(i, j) for i in range(len(embed)) for j in range(i) if len(words[i] & words[j]) >= 3]
    disjoint = [(i, j) for i in range(len(embed)) for j in range(i) if not words[i] & words[j]]
    assert share and disjoint
    assert sum(float(sims[i, j]) for i, j in share) / len(share) > sum(float(sims[i, j]) for i, j in disjoint) / len(
        disjoint
    )
    state = build_kind("state", "quick").samples
    assert all(isinstance(s["name"], str) and isinstance(s["tensor"], torch.Tensor) for s in state)


def test_digest_sees_dtype_shape_and_values() -> None:
    t = torch.arange(6, dtype=torch.int32)
    base = sample_digest({"a": t})
    assert sample_digest({"a": t.clone()}) == base
    assert sample_digest({"a": t.to(torch.int64)}) != base
    assert sample_digest({"a": t.reshape(2, 3)}) != base
    assert sample_digest({"a": t + 1}) != base
    assert sample_digest({"b": t}) != base
    assert sample_digest((t,)) != sample_digest([t])


def test_schema_refuses_what_columns_cannot_hold() -> None:
    ok = infer_schema([{"x": torch.zeros(3), "y": 1}, {"x": torch.zeros(4), "y": 2}])
    assert [c.shape for c in ok.columns] == [None, None]
    with pytest.raises(UnsupportedSample, match="bfloat16"):
        infer_schema([{"x": torch.zeros(2, dtype=torch.bfloat16)}])
    with pytest.raises(UnsupportedSample, match="another structure"):
        infer_schema([{"x": 1}, {"y": 1}])
    with pytest.raises(UnsupportedSample, match="NoneType"):
        infer_schema([{"x": None}])


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
def test_adapters_round_trip(system, tmp_path: Path) -> None:
    """Every adapter gives back what it was given (peers: where installed, e.g. in the
    ``make bench-peers`` venv; elsewhere skipped)."""
    why = system.unavailable_reason()
    if why:
        pytest.skip(why)
    samples = build_kind("tokens", "quick").samples
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    system.pack(samples, data, PackOptions(shard_bytes=64 * 2**10))
    expected = [sample_digest(s) for s in samples]
    assert sorted(sample_digest(s) for s in system.iterate(data, cache)) == sorted(expected)
    system.close()
    get = system.random_access(data, cache)
    if get is not None:
        assert {sample_digest(get(i)) for i in (5, 0, 3)} <= set(expected)
        del get
        system.close()
    got = [sample_digest(s) for batch in system.loader(data, cache, num_workers=0, batch_size=4, seed=0) for s in batch]
    assert sorted(got) == sorted(expected)
    system.close()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown kind"):
        run_benchmark(BenchConfig(quick=True, kinds=["nope"], progress=False))
    with pytest.raises(BenchError, match="unknown system"):
        run_benchmark(BenchConfig(quick=True, systems=["nope"], progress=False))
    with pytest.raises(BenchError, match="needs --source"):
        run_benchmark(BenchConfig(quick=True, kinds=["source"], progress=False))
    with pytest.raises(BenchError, match="repeats"):
        run_benchmark(BenchConfig(quick=True, repeats=0, progress=False))
    with pytest.raises(BenchError, match="cannot start"):
        run_benchmark(BenchConfig(quick=True, kinds=["tokens"], python=str(tmp_path / "no-python"), progress=False))
    assert get_systems(["tspt-zstd3"])[0].name == BASELINE  # the baseline always runs


def test_source_and_peer_skip_note(tmp_path: Path) -> None:
    """--source benchmarks the user's own .pt file; a peer that is not installed is skipped
    with a note that says how to get it."""
    src = tmp_path / "mine.pt"
    torch.save([{"x": torch.full((4,), i, dtype=torch.int16)} for i in range(12)], src)
    peers = [s.name for s in all_systems() if s.family == "peer"]
    doc = run_benchmark(
        BenchConfig(
            source=str(src), systems=["tspt-zstd3", *peers], repeats=1, workers=(0,), cold=False, progress=False
        ),
        log=lambda _: None,
    )
    assert list(doc["kinds"]) == ["source"] and doc["kinds"]["source"]["records"] == 12
    ran = {c["system"] for c in doc["cells"] if c["status"] == "ok"}
    assert {"pt-files", "tspt-zstd3"} <= ran
    for p in peers:
        if doc["systems"][p]["unavailable"]:
            assert any(n.startswith(f"{p} skipped:") and "bench-peers" in n for n in doc["notes"])
        else:
            assert p in ran
    assert markdown(doc)  # renders without the optional columns


def test_pack_compact_script_reports_every_kind_and_stage(tmp_path: Path) -> None:
    """benchmarks/pack_compact.py runs: one table row per kind and checkout, whose ratio is
    compact's time over zstd-3's; and with --stages, all 13 lines of the kind, where one
    record a frame (each with its torch.save container) takes more zstd bytes than the
    column blocks of the same records."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.pack_compact", "--kinds", "small", "--rounds", "1"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| small")]
    assert len(rows) == 1
    compact, zstd, ratio = float(rows[0][2]), float(rows[0][3]), float(rows[0][4].strip()[:-1])
    assert compact > 0 and zstd > 0 and abs(ratio - compact / zstd) < 0.01
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.pack_compact", "--kinds", "small", "--stages"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stages = dict(line.split(": ", 2)[1:] for line in out.splitlines())
    assert {"torch.save", "prove", "choose the filters", "assemble the blocks"} <= set(stages)
    assert len(stages) == 13
    sizes = {k: float(v.replace(",", "")) for k, v in stages.items() if k.startswith("bytes")}
    assert all(v > 0 for v in sizes.values())
    assert sizes["bytes of one record a frame"] > sizes["bytes of filtered blocks"]  # containers gone


def test_loader_compact_script_reports_every_kind_and_worker_count(tmp_path: Path) -> None:
    """benchmarks/loader_compact.py runs: one row per kind and worker count, a positive rate per
    checkout, every epoch having delivered the kind's every record (the script checks)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.loader_compact", "--kinds", "small",
         "--workers", "0", "--rounds", "1", "--epochs", "3"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| small")]
    assert len(rows) == 1 and rows[0][1].strip() == "0"
    assert float(rows[0][2].replace(",", "")) > 0
