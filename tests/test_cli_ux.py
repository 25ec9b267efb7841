"""The tspt CLI as a new user meets it (issue 15): the process (exit codes, import time), the
tutorial shapes, messages in CLI words, get, shard sizes, info, progress rates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensorstore_pt as ts
from tensorstore_pt.cli import cli_words, main, progress_text

ROOT = Path(__file__).resolve().parents[1]


def tspt(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tensorstore_pt.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- the process


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from tensorstore_pt.cli import build_parser, main\n"
        "build_parser()\n"
        "for argv in (['--help'], ['--version'], ['pack', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'benchmarks', 'zstandard') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stderr
    # No wall-clock bound here (speed lives in benchmarks): the import check above is the test.
    r = tspt("--help")
    assert r.returncode == 0 and "verify: 0 clean, 1 damaged, 2 unusable input" in r.stdout
    r = tspt("--version")
    assert r.returncode == 0 and r.stdout.startswith("tspt ")


@pytest.mark.parametrize("command", ["pack", "info", "verify", "recover", "audit", "get", "demo"])
def test_each_command_help_lists_its_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out and "  0  " in out


def test_unsafe_pt_content_is_unusable_input_with_key_path(tmp_path: Path) -> None:
    import numpy as np

    torch.save([{"x": torch.zeros(2), "meta": {"arr": np.zeros(3)}}], tmp_path / "np.pt")
    for argv in (("pack", tmp_path / "np.pt", tmp_path / "s"), ("audit", tmp_path / "np.pt")):
        r = tspt(*argv)
        assert r.returncode == 2, r.stderr
        assert "[0]['meta']['arr']: numpy.ndarray" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_ambiguous_and_empty_sources_exit_2(tmp_path: Path) -> None:
    torch.save([torch.zeros(3, 8), torch.ones(3, 8)], tmp_path / "amb.pt")
    r = tspt("pack", tmp_path / "amb.pt", tmp_path / "s", "-q")
    assert r.returncode == 2 and "(2 records)" in r.stderr and "(3 records of 2-tuples)" in r.stderr
    r = tspt("pack", tmp_path / "amb.pt", tmp_path / "s", "-q", "--layout", "columns")
    assert r.returncode == 0, r.stderr
    assert len(ts.open_store(tmp_path / "s")) == 3
    torch.save([], tmp_path / "empty.pt")
    (tmp_path / "emptydir").mkdir()
    for src in ("empty.pt", "emptydir"):
        r = tspt("pack", tmp_path / src, tmp_path / f"s-{src}", "-q")
        assert r.returncode == 2 and "nothing to pack" in r.stderr


# --------------------------------------------------------------------------- pack


def test_pack_the_tutorial_tuple_as_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, labels = torch.randn(100, 128), torch.randint(0, 10, (100,))
    torch.save((data, labels), tmp_path / "data.pt")
    code, out, err = _run(capsys, "pack", tmp_path / "data.pt", tmp_path / "s", "-q")
    assert code == 0, err
    assert "packed 100 records into 1 shard + index" in out and "read as columns: 100 records" in out
    x, y = ts.open_store(tmp_path / "s")[42]
    assert torch.equal(x, data[42]) and torch.equal(y, labels[42])


def test_pack_directory_lists_skipped_and_recursive_packs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "d"
    for sub in ("train", "val"):
        (src / sub).mkdir(parents=True)
        for i in range(2):
            torch.save(torch.tensor(i), src / sub / f"{i}.pt")
    torch.save(torch.tensor(7), src / "top.pt")
    (src / "notes.txt").write_text("x")
    code, out, err = _run(capsys, "pack", src, tmp_path / "s", "-q")
    assert code == 0, err
    assert "skipped: train/ (a subdirectory, 2 .pt file(s); pass --recursive" in out
    assert "skipped: notes.txt (not a .pt file)" in out and len(ts.open_store(tmp_path / "s")) == 1
    code, out, err = _run(capsys, "pack", src, tmp_path / "s2", "-q", "--recursive")
    assert code == 0, err
    assert len(ts.open_store(tmp_path / "s2")) == 5 and "train/" not in out


def test_pack_warns_before_writing_when_packing_grows_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"input": torch.randn(1000, 100), "target": torch.randn(1000, 50)}, tmp_path / "cols.pt")
    code, out, err = _run(capsys, "pack", tmp_path / "cols.pt", tmp_path / "s", "-q")
    assert code == 0, err
    assert "warning: packing makes this data bigger" in err and "601,677 bytes now" in err
    # the option that avoids it (the smallest projected: container-free columnar frames, format 1.3)
    assert "--compact projects" in err or "--frame-size 64KiB projects" in err or "--dict projects" in err


def test_errors_in_cli_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save([torch.zeros(2)], tmp_path / "a.pt")
    assert _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "s", "-q")[0] == 0
    code, _, err = _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "s", "-q")
    assert code == 2 and "use --mode overwrite or --mode append" in err and "mode='" not in err
    assert cli_words("cannot write '/x/.rec.pt.tmp-7061': denied") == "cannot write '/x/rec.pt': denied"


def test_destination_checked_before_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorstore_pt.serialization as ser

    calls = []
    real = ser.dumps
    monkeypatch.setattr(ser, "dumps", lambda s: calls.append(1) or real(s))
    torch.save([torch.zeros(2)] * 10, tmp_path / "a.pt")
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "file" / "store", "-q")
    assert code == 2 and "error" in err and calls == []
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        code, _, err = _run(capsys, "pack", tmp_path / "a.pt", ro / "store", "-q")
        assert code == 2 and calls == []


def test_shard_size_warning_and_oversized_record_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = [torch.zeros(10, dtype=torch.uint8) for _ in range(5)]
    samples[3] = torch.randint(0, 256, (200_000,), dtype=torch.uint8)
    torch.save(samples, tmp_path / "a.pt")
    code, out, err = _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "s", "-q", "--max-shard-size", "64KiB")
    assert code == 0, err
    assert err.count("did not fit") == 1 and "note: record 3 did not fit in --max-shard-size 64.00 KiB" in err
    code, _, err = _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "s2", "-q", "--max-shard-size", "4KiB")
    assert code == 0 and "warning: --max-shard-size 4.00 KiB is below 64.00 KiB" in err


def test_info_shows_codec_dictionary_and_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(
        [(torch.full((8, 8), i % 17, dtype=torch.uint8), torch.tensor(i)) for i in range(300)], tmp_path / "a.pt"
    )
    code, out, err = _run(capsys, "pack", tmp_path / "a.pt", tmp_path / "s", "-q", "--dict", "--frame-size", "8KiB")
    assert code == 0, err
    assert 'codec {"id": "zstd", "level": 3}, dictionary zstd-dict-' in out and "{'" not in out
    code, out, _ = _run(capsys, "info", tmp_path / "s")
    assert code == 0
    assert 'codec       {"id": "zstd", "level": 3}' in out
    assert "dictionary  zstd-dict-" in out and "16,384 bytes" in out
    assert "multi-record frames" in out and "features: multi-record-frames, zstd-dictionary" in out


def test_progress_rates_are_never_zero() -> None:
    # 1,600 records/s of 264 bytes: 0.42 MB/s, shown as kB/s rather than "0.0 MB/s".
    assert progress_text(1600 * 264, 0, 1.0) == "in 422.4 kB/s of tensors, out stored: pending"
    assert progress_text(500, 100, 1.0) == "in 0.500 kB/s of tensors, out 0.100 kB/s stored"
    assert progress_text(2_000_000_000, 50_000_000, 2.0) == "in 1,000 MB/s of tensors, out 25.0 MB/s stored"


# --------------------------------------------------------------------------- get


def test_get_reports_the_real_index_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ts.write_store([torch.tensor(i) for i in range(50)], tmp_path / "s")
    code, out, _ = _run(capsys, "get", tmp_path / "s", "-1", "-o", tmp_path / "r.pt")
    assert code == 0 and "wrote record 49 of 50 (index -1)" in out
    code, _, err = _run(capsys, "get", tmp_path / "s", "0", "-o", tmp_path / "r.pt")
    assert code == 2 and "exists; pass --force" in err
    assert int(torch.load(tmp_path / "r.pt", weights_only=True)) == 49
    code, out, _ = _run(capsys, "get", tmp_path / "s", "0", "-o", tmp_path / "r.pt", "--force")
    assert code == 0 and int(torch.load(tmp_path / "r.pt", weights_only=True)) == 0
    code, _, err = _run(capsys, "get", tmp_path / "s", "0", "-o", tmp_path / "nodir" / "r.pt")
    assert code == 2 and "does not exist" in err and ".tmp-" not in err


# --------------------------------------------------------------------------- conventions


def test_store_key_type_error_and_not_a_store(tmp_path: Path) -> None:
    ts.write_store([torch.tensor(1)], tmp_path / "s")
    store = ts.open_store(tmp_path / "s")
    with pytest.raises(TypeError, match="found str"):
        store["a"]
    with pytest.raises(ts.InvalidOptionError):
        store["a"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        ts.open_store(tmp_path / "empty")
    with pytest.raises(ValueError):
        ts.open_store(tmp_path / "empty")
