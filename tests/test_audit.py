"""Storage-size audits of stores, directories of .pt files and single .pt files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _store_tools import make_store, samples

from tensorstore_pt import (
    InvalidOptionError,
    StoreNotFoundError,
    audit_path,
    audit_pt,
    audit_store,
    write_store,
)
from tensorstore_pt.audit import BLOAT_FACTOR, DEFAULT_CANDIDATES, codec_label
from tensorstore_pt.cli import main

FAST = {"repeats": 1, "min_seconds": 0.0, "sample_records": 8}
LABELS = ["none", "lz4-0", "zstd-1", "zstd-3", "zstd-9", "zstd-3+dict", "zstd-3+frames", "zstd-3+compact"]


def check_breakdown(report: object) -> None:
    b = report.breakdown  # type: ignore[attr-defined]
    assert b.raw_bytes == b.tensor_bytes + b.pickle_bytes + b.zip_bytes
    assert sum(b.by_key.values()) == b.tensor_bytes == sum(b.by_dtype.values())
    assert b.pickle_bytes > 0 and b.zip_bytes > 0


def test_audit_store(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "zstd")
    r = audit_store(store, **{**FAST, "sample_records": 12})
    assert (r.kind, r.records, len(r.shards), r.files) == ("store", 12, 3, 4)
    assert r.raw_bytes == sum(s.raw_bytes for s in r.shards) and r.stored_bytes == sum(s.stored_bytes for s in r.shards)
    assert r.disk_bytes == sum(s.file_bytes for s in r.shards) + (store / "index.json").stat().st_size
    assert r.bytes_by_codec == {"zstd-3": r.stored_bytes}
    check_breakdown(r)
    b = r.breakdown
    # Each record: x = 64 float32 (256 bytes), i = one int64 (8 bytes).
    assert b.records == 12 and b.by_key == {"x": 12 * 256, "i": 12 * 8}
    assert b.by_dtype == {"float32": 12 * 256, "int64": 12 * 8}
    assert b.element_bytes == b.tensor_bytes == 12 * 264
    assert r.bloated == ()
    assert [p.label for p in r.projections] == LABELS
    none = r.projections[0]
    assert none.stored_bytes == r.raw_bytes  # 'none' stores the raw bytes exactly
    zstd3 = r.projections[3]
    assert zstd3.stored_bytes == r.stored_bytes  # the sample is the whole store here
    assert all(p.decode_mb_s > 0 and p.compress_mb_s > 0 and p.sample_records == 12 for p in r.projections)
    assert r.recommendation in LABELS and r.reason.startswith(r.recommendation)
    # Distinct sizes, largest first; same_size counts the records of each size.
    sizes = [x.raw_bytes for x in r.largest]
    assert sizes == sorted(set(sizes), reverse=True) and sum(x.same_size for x in r.largest) <= 12
    json.dumps(r.to_json())


def test_breakdown_sampling_note(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "lz4")
    r = audit_store(store, max_records=5, **FAST)
    assert r.breakdown.records == 5 and any("5 of 12" in n for n in r.notes)


def test_audit_pt_dir_flags_bloated_views(tmp_path: Path) -> None:
    d = tmp_path / "pt"
    d.mkdir()
    for i, s in enumerate(samples(6)):
        torch.save(s, d / f"{i}.pt")
    big = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    torch.save({"row": big[3], "label": torch.tensor(1)}, d / "10-view.pt")  # a 4 KiB view of a 256 KiB storage
    (d / "notes.txt").write_text("ignored")
    r = audit_pt(d, **FAST)
    assert (r.kind, r.records, r.files) == ("pt_dir", 7, 7)
    assert r.disk_bytes == sum(p.stat().st_size for p in d.glob("*.pt"))
    check_breakdown(r)
    assert r.breakdown.by_key["row"] == 64 * 1024 * 4
    assert [b.record for b in r.bloated] == ["10-view.pt"]
    bl = r.bloated[0]
    assert (bl.tensor_bytes, bl.element_bytes) == (64 * 1024 * 4 + 8, 1024 * 4 + 8)
    assert bl.tensor_bytes > BLOAT_FACTOR * bl.element_bytes
    assert r.largest[0].record == "10-view.pt"
    # Packing compacts the view: the projected raw bytes are far below the files' bytes.
    assert r.raw_bytes < r.disk_bytes / 10
    assert any("packing compacts" in n for n in r.notes)
    assert "Packing turns 7 file(s)" in r.reason


def test_audit_pt_file(tmp_path: Path) -> None:
    f = tmp_path / "all.pt"
    torch.save(samples(5), f)
    r = audit_path(f, **FAST)
    assert (r.kind, r.records, r.files) == ("pt_file", 5, 1)
    check_breakdown(r)
    assert r.breakdown.raw_bytes == f.stat().st_size  # the file as it is
    assert r.packed_breakdown.by_key == {"x": 5 * 256, "i": 5 * 8}  # per record, once packed
    cols = tmp_path / "cols.pt"
    torch.save({"x": torch.zeros(9, 4), "y": torch.arange(9)}, cols)
    r = audit_path(cols, **FAST)
    assert r.records == 9 and set(r.breakdown.by_key) == {"x", "y"} == set(r.packed_breakdown.by_key)
    bad = tmp_path / "one.pt"
    torch.save(torch.zeros(3), bad)  # a bare tensor is neither a list of samples nor columns
    with pytest.raises(InvalidOptionError, match="list/tuple of samples"):
        audit_path(bad, **FAST)


def test_audit_recommends_none_for_incompressible_data(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    store = tmp_path / "s"
    write_store(
        [torch.randint(0, 256, (65536,), generator=g, dtype=torch.uint8) for _ in range(6)], store, codec="none"
    )
    r = audit_store(store, **FAST)
    assert r.recommendation == "none" and "under 5%" in r.reason


def test_audit_bad_input(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        audit_path(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidOptionError, match="expected .pt files"):
        audit_path(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(
        InvalidOptionError, match=r"not a torch.save file \(expected a zip or pickle header, found b.not a to.\)"
    ):
        audit_path(tmp_path / "junk.pt")
    with pytest.raises(InvalidOptionError, match="sample_records"):
        audit_path(tmp_path / "junk.pt", sample_records=0)


def test_codec_labels() -> None:
    assert [codec_label(c) for c in DEFAULT_CANDIDATES] == LABELS


def test_cli_audit_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits()
    data = [
        (torch.tensor(img, dtype=torch.uint8), torch.tensor(int(t))) for img, t in zip(d.images[:300], d.target[:300])
    ]
    store = tmp_path / "digits"
    write_store(data, store)
    pts = tmp_path / "pts"
    pts.mkdir()
    for i, s in enumerate(data[:100]):
        torch.save(s, pts / f"{i}.pt")
    assert main(["audit", str(store), "--sample", "8"]) == 0
    out = capsys.readouterr().out
    for fact in (
        "records   300 in 1 shard + index", "zip container", "by dtype (tensor bytes): uint8 19,200", "int64 2,400",
        "zstd-9", "recommendation:",
    ):  # fmt: skip
        assert fact in out, fact
    assert main(["audit", str(pts), "--json", "--sample", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kind"] == "pt_dir" and rep["records"] == 100
    assert rep["breakdown"]["by_key"] == {"0": 6400, "1": 800}


def test_cli_audit_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    store = make_store(tmp_path / "s", "zstd")
    png = tmp_path / "audit.png"
    assert main(["audit", str(store), "--plot", str(png), "--sample", "4"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in capsys.readouterr().out


def test_plot_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "s", "none")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["audit", str(store), "--plot", str(tmp_path / "x.png"), "--sample", "2"]) == 2
    assert "pip install 'tensorstore_pt[plot]'" in capsys.readouterr().err


def test_audit_v11_store(tmp_path: Path) -> None:
    store = tmp_path / "frames"
    write_store(samples(12), store, codec="lz4", frame_target_bytes=3000)
    r = audit_store(store, **FAST)
    assert r.bytes_by_codec == {"lz4-0+frames": r.stored_bytes}
    assert all(x.stored_bytes is None for x in r.largest)  # records share frames
    assert r.breakdown.records == 12 and r.breakdown.by_key == {"x": 12 * 256, "i": 12 * 8}
    frames = next(p for p in r.projections if p.label == "zstd-3+frames")
    single = next(p for p in r.projections if p.label == "zstd-3")
    assert frames.read_bytes_per_record > single.read_bytes_per_record
    assert frames.codec == {"codec": "zstd", "level": 3, "frame_target_bytes": 65536}


def test_candidates_are_checked(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s", "none")
    with pytest.raises(InvalidOptionError, match="candidates"):
        audit_store(store, candidates=({"id": "zstd"},), **FAST)
    with pytest.raises(InvalidOptionError, match="only zstd takes a dictionary"):
        audit_store(store, candidates=({"codec": "lz4", "dictionary": 1024},), **FAST)
    r = audit_store(store, candidates=({"codec": "zstd", "level": 19},), **FAST)
    assert [p.label for p in r.projections] == ["zstd-19"] and "--level 19" in r.reason


def test_audit_of_a_columns_file_adds_up_to_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1,000 rows of (100,) and (50,) float32: the file, not the row views the audit makes."""
    f = tmp_path / "cols.pt"
    torch.save({"input": torch.randn(1000, 100), "target": torch.randn(1000, 50)}, f)
    r = audit_path(f, **FAST)
    b = r.breakdown
    assert b.raw_bytes == f.stat().st_size == b.tensor_bytes + b.pickle_bytes + b.zip_bytes
    assert b.by_key == {"input": 400_000, "target": 200_000} and r.bloated == ()
    p = r.packed_breakdown
    assert p.records == 1000 and p.tensor_bytes == 1000 * 600 and p.by_key == {"input": 400_000, "target": 200_000}
    assert len(r.largest) == 1 and r.largest[0].same_size == 1000  # one distinct size, not ten copies
    assert (
        r.grows and "makes it bigger" in r.notes[0] and "the smallest, zstd-3+" in r.notes[0] and "avoid" in r.notes[0]
    )
    assert all(pr.decode_spread >= 0 for pr in r.projections)
    assert main(["audit", str(f), "--sample", "8"]) == 0
    out = capsys.readouterr().out
    assert "records   1,000 in 1 .pt file" in out and "x1,000 records of this size" in out
    assert "once packed, per record" in out and "tensor payload 600" in out and "+-" in out
