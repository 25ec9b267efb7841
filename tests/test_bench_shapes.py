"""``tspt bench --source`` on every common sample shape, with every peer installed here.

Each shape is written the way people save it (a ``torch.save`` of a list of samples, of a
dict of columns, or one file per sample), run through the harness with tensorstore_pt and
every peer, and every cell must either run (its first pass of every read operation checked
sample by sample against what was written, by ``sample_digest``) or be skipped with a
one-line reason. Peers that are not installed are skipped with their note.

Records are ~8 KiB of random bytes and 32 per shape, so the harness's smallest shard size
(64 KiB) still splits each system's data into a few shards. ``TSPT_BENCH_SHAPES_WORKERS``
(e.g. ``0,2``) measures more DataLoader worker counts than the default ``0``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from benchmarks.kinds import load_source, sample_digest
from benchmarks.systems import all_systems

N = 32
PEERS = [s.name for s in all_systems() if s.family == "peer"]
WORKERS = os.environ.get("TSPT_BENCH_SHAPES_WORKERS", "0")


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.rand(shape, generator=g, dtype=dtype)
    return torch.randint(0, 100 if dtype == torch.int64 else 127, shape, generator=g, dtype=dtype)


def _save(obj: Any, tmp: Path) -> Path:
    torch.save(obj, tmp / "src.pt")
    return tmp / "src.pt"


def _files(samples: list[Any], tmp: Path) -> Path:
    d = tmp / "src"
    d.mkdir()
    for i, s in enumerate(samples):
        torch.save(s, d / f"{i:04d}.pt")
    return d


# name -> (write the source under tmp_path and return its path, --layout, systems expected
# to skip it)
SHAPES: dict[str, tuple[Callable[[Path], Path], str | None, set[str]]] = {
    # bare tensors of one shape: a list of equal-length tensors is ambiguous, --layout rows
    "tensor": (lambda t: _save([_rand(2048, dtype=torch.float32, seed=i) for i in range(N)], t), "rows", set()),
    # the tutorial way: (image, 0-dim int64 label, 0-dim float32 weight)
    "tuple": (
        lambda t: _save(
            [(_rand(64, 128, dtype=torch.uint8, seed=i), torch.tensor(i % 10), torch.tensor(i / 3)) for i in range(N)],
            t,
        ),
        None,
        set(),
    ),
    "list": (
        lambda t: _save([[_rand(4096, dtype=torch.int16, seed=i), torch.tensor(i % 7)] for i in range(N)], t),
        None,
        set(),
    ),
    # every leaf type a column store has: tensors (float32, bool), int, float, str, bytes
    "dict": (
        lambda t: _save(
            [
                {
                    "x": _rand(2048, dtype=torch.float32, seed=i),
                    "mask": _rand(64, dtype=torch.float32, seed=-i) > 0.5,
                    "label": i * 1000,
                    "score": i / 7,
                    "text": f"record {i} ünïcode",
                    "raw": bytes([i, 0, 255, 10]) * (i + 1),
                }
                for i in range(N)
            ],
            t,
        ),
        None,
        set(),
    ),
    # variable-length tensors (token ids): no two neighbours share a length
    "varlen": (lambda t: _save([_rand(512 + 97 * i, dtype=torch.int64, seed=i) for i in range(N)], t), None, set()),
    # one torch.save of {"x": [N, ...], "y": [N]}: read as N dicts of rows (y 0-dim)
    "columns": (
        lambda t: _save({"x": _rand(N, 64, 128, dtype=torch.uint8, seed=1), "y": torch.arange(N) % 10}, t),
        None,
        set(),
    ),
    # a directory of .pt files, one sample each: (tensor, int)
    "directory": (lambda t: _files([(_rand(2048, dtype=torch.float32, seed=i), i) for i in range(N)], t), None, set()),
    # nested containers: MDS and WebDataset columns cannot hold them without pickling
    "nested": (
        lambda t: _save([{"x": _rand(2048, dtype=torch.float32, seed=i), "meta": {"id": i}} for i in range(N)], t),
        None,
        {"mds-zstd", "wds-tar"},
    ),
}


def _run(src: Path, layout: str | None, systems: list[str], tmp: Path) -> tuple[int, dict[str, Any]]:
    from tensorstore_pt.cli import main

    out = tmp / "out"
    argv = ["bench", "--quick", "--source", str(src), "--systems", ",".join(systems), "--repeats", "1",
            "--warmup", "1", "--no-cold", "--workers", WORKERS, "-q", "--out", str(out)]  # fmt: skip
    code = main([*argv, *(["--layout", layout] if layout else [])])
    return code, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_runs_with_every_peer(shape: str, tmp_path: Path) -> None:
    write, layout, skips = SHAPES[shape]
    src = write(tmp_path)
    code, doc = _run(src, layout, ["tspt-zstd3", *PEERS], tmp_path)
    assert code == 0, [(c["system"], c.get("note")) for c in doc["cells"]]
    assert doc["kinds"]["source"]["records"] == N
    cells = {c["system"]: c for c in doc["cells"]}
    assert cells["pt-files"]["status"] == "ok" and cells["tspt-zstd3"]["status"] == "ok"
    for p in PEERS:
        if doc["systems"][p]["unavailable"]:
            assert p not in cells
            assert any(n.startswith(f"{p} skipped:") and "bench-peers" in n for n in doc["notes"])
        elif p in skips:
            assert cells[p]["status"] == "skipped", cells[p]
            note = cells[p]["note"]
            assert "\n" not in note and "without pickling" in note and "dict" in note, note
        else:
            c = cells[p]
            assert c["status"] == "ok", (p, c.get("note"), c.get("traceback", "")[-2000:])
            # every read op ran and its first pass was checked sample by sample
            assert c["seq"]["order_preserved"] in (True, False)
            assert c["loader_w0"]["warm_records"] == [N]
            assert c["metrics"]["files"] >= 1
    if shape != "nested":  # the shard size splits the sharded systems' data
        assert cells["tspt-zstd3"]["metrics"]["files"] > 3


def test_column_rows_come_back_as_their_own_tensors(tmp_path: Path) -> None:
    """A dict-of-columns file yields one dict per row, with 0-dim labels, whose tensors do
    not hold the whole column (a torch.save per sample would write all of it each time)."""
    x, y = torch.arange(N * 6, dtype=torch.int32).reshape(N, 2, 3), torch.arange(N) * 10
    src = _save({"x": x, "y": y}, tmp_path)
    samples = load_source(src).samples
    assert len(samples) == N
    for i, s in enumerate(samples):
        assert list(s) == ["x", "y"]
        assert s["x"].shape == (2, 3) and s["x"].dtype == torch.int32 and torch.equal(s["x"], x[i])
        assert s["y"].shape == () and s["y"].dtype == torch.int64 and int(s["y"]) == 10 * i
        assert s["x"].untyped_storage().nbytes() == 2 * 3 * 4
        assert s["y"].untyped_storage().nbytes() == 8


def test_ambiguous_source_says_which_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A list of equal-length tensors needs --layout: exit 2 with the error, no traceback."""
    from tensorstore_pt.cli import main

    src = _save([torch.zeros(4) for _ in range(5)], tmp_path)
    code = main(["bench", "--quick", "--source", str(src), "-q", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tspt bench: error: " in err and "ambiguous" in err and "--layout rows" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------------- the check


def test_digest_check_catches_dropped_and_mangled_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters that drop one record or flip one byte, in the sequential read or in the
    loader, fail their cells with the check's error; the run exits 1."""
    import _bench_broken as broken

    here = str(Path(__file__).parent)
    monkeypatch.setenv("TSPT_BENCH_BROKEN", "1")
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    broken.install(monkeypatch.setattr)
    # the mangled byte changes the digest (so the check below cannot pass by accident)
    sample = (torch.zeros(3, dtype=torch.float32), torch.tensor(1))
    assert sample_digest(broken.mangle(sample)) != sample_digest(sample)

    src = _save([(_rand(256, dtype=torch.float32, seed=i), torch.tensor(i)) for i in range(N)], tmp_path)
    names = [cls.name for cls in broken.BROKEN]
    code, doc = _run(src, None, names, tmp_path)
    assert code == 1
    cells = {c["system"]: c for c in doc["cells"]}
    assert cells["pt-files"]["status"] == "ok"
    expected = {
        "broken-drop-seq": f"seq: CheckFailed: sequential: expected {N} samples, found {N - 1}",
        "broken-mangle-seq": f"seq: CheckFailed: sequential: 1 of {N} samples differ from what was written",
        "broken-drop-loader": f"loader_w0: CheckFailed: loader w=0: expected {N} samples, found {N - 1}",
        "broken-mangle-loader": f"loader_w0: CheckFailed: loader w=0: 1 of {N} samples differ from what was written",
    }
    for name, note in expected.items():
        assert cells[name]["status"] == "failed" and cells[name]["note"] == note, cells[name]
    # broken in the loader only: the sequential and random reads ran and passed their check
    for name in ("broken-drop-loader", "broken-mangle-loader"):
        assert cells[name]["seq"]["order_preserved"] is True and cells[name]["random"]["order_preserved"] is True
