"""The tspt CLI: pack sources, info, verify, get, exit codes, sizes."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

import tensorstore_pt as ts
from _store_tools import shard_names
from tensorstore_pt.cli import main, parse_size


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ids(path):
    return [int(s[1]) for s in ts.open_store(path)]


def test_pack_list_file_then_info_verify_get(tmp_path, capsys):
    samples = [(torch.full((4,), i, dtype=torch.uint8), torch.tensor(i)) for i in range(50)]
    torch.save(samples, tmp_path / "all.pt")
    code, out, err = _run(
        capsys, "pack", tmp_path / "all.pt", tmp_path / "s", "--codec", "lz4", "--max-shard-size", "1KiB"
    )
    assert code == 0, err
    assert "packed 50 records into" in out
    assert _ids(tmp_path / "s") == list(range(50))
    assert ts.open_store(tmp_path / "s").info().shards > 1

    code, out, _ = _run(capsys, "info", tmp_path / "s")
    assert code == 0 and "records     50" in out and '"id": "lz4"' in out and "frames      one per record" in out
    code, out, _ = _run(capsys, "info", tmp_path / "s", "--json")
    assert json.loads(out)["records"] == 50

    code, out, _ = _run(capsys, "verify", tmp_path / "s")
    assert code == 0 and "50 records" in out

    code, _, err = _run(capsys, "get", tmp_path / "s", "0", "-o", tmp_path)
    assert code == 2 and "is a directory; expected a file path" in err
    assert not list(tmp_path.glob(".*tmp-*"))
    code, out, _ = _run(capsys, "get", tmp_path / "s", "-1", "-o", tmp_path / "last.pt")
    assert code == 0
    got = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(got[0], samples[-1][0]) and int(got[1]) == 49


def test_pack_dict_of_columns(tmp_path, capsys):
    torch.save({"image": torch.arange(30).reshape(10, 3), "label": list(range(10))}, tmp_path / "cols.pt")
    code, _, err = _run(capsys, "pack", tmp_path / "cols.pt", tmp_path / "s", "-q")
    assert code == 0, err
    reader = ts.open_store(tmp_path / "s")
    assert len(reader) == 10
    assert torch.equal(reader[3]["image"], torch.tensor([9, 10, 11])) and reader[3]["label"] == 3
    # Rows of a column tensor are compacted: each record holds 3 elements, not the whole column.
    assert reader.info().raw_bytes < 10 * 1600


def test_pack_directory_in_natural_order(tmp_path, capsys):
    src = tmp_path / "pts"
    src.mkdir()
    for i in (1, 2, 10, 11, 3):
        torch.save((torch.zeros(2), torch.tensor(i)), src / f"sample_{i}.pt")
    (src / "README.txt").write_text("not a sample")
    code, _, err = _run(capsys, "pack", src, tmp_path / "s", "-q")
    assert code == 0, err
    assert _ids(tmp_path / "s") == [1, 2, 3, 10, 11]


def test_exit_codes_for_unusable_input_and_damage(tmp_path, capsys):
    code, _, err = _run(capsys, "info", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    torch.save({"a": torch.zeros(3), "b": torch.zeros(4)}, tmp_path / "uneven.pt")
    code, _, err = _run(capsys, "pack", tmp_path / "uneven.pt", tmp_path / "s")
    assert code == 2 and "one common length" in err
    assert not (tmp_path / "s").exists()

    ts.write_store([torch.arange(100) for _ in range(3)], tmp_path / "good")
    shard = tmp_path / "good" / shard_names(tmp_path / "good")[0]
    data = bytearray(shard.read_bytes())
    data[30] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = _run(capsys, "verify", tmp_path / "good")
    assert code == 1 and "DAMAGED" in err

    with pytest.raises(SystemExit) as ei:
        main(["pack"])
    assert ei.value.code == 2


@pytest.mark.parametrize("command", ["info", "verify", "pack"])
def test_a_path_the_system_refuses_is_one_line_and_exit_2(tmp_path, capsys, command):
    """An OSError the library does not type (here ENAMETOOLONG: a name past the file system's
    255 bytes) is one line naming the path, exit 2, not a traceback."""
    long = tmp_path / ("n" * 300)
    args = [command, long] if command != "pack" else [command, tmp_path / "src.pt", long]
    if command == "pack":
        torch.save([torch.arange(3)], tmp_path / "src.pt")
    code, out, err = _run(capsys, *args)
    assert code == 2, (code, out, err)
    assert err.startswith(f"tspt {command}: error: ") and "File name too long" in err and "n" * 300 in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == (["src.pt"] if command == "pack" else [])


def test_pack_refuses_unsafe_pt_files(tmp_path, capsys):
    import numpy as np

    torch.save([np.zeros(3)], tmp_path / "np.pt")
    code, _, err = _run(capsys, "pack", tmp_path / "np.pt", tmp_path / "s")
    assert code == 2 and "REFUSED" in err and "torch.from_numpy" in err  # unusable input, not damage
    assert "[0]: numpy.ndarray" in err
    (tmp_path / "junk.pt").write_bytes(b"hello, not a tensor")
    code, _, err = _run(capsys, "pack", tmp_path / "junk.pt", tmp_path / "s")
    assert code == 2 and "not a torch.save file (expected a zip or pickle header, found b'hello, n')" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "text, value",
    [("64MiB", 64 * 2**20), ("100MB", 100_000_000), ("4096", 4096), ("1.5KiB", 1536), ("2gib", 2 * 2**30)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12XB", "-1", "0", "0.5B", "MiB"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        parse_size(text)


def test_pack_with_dictionary_and_frames(tmp_path, capsys):
    samples = [(torch.full((8, 8), i % 17, dtype=torch.uint8), torch.tensor(i)) for i in range(300)]
    torch.save(samples, tmp_path / "all.pt")
    code, out, err = _run(capsys, "pack", "--dict", tmp_path / "all.pt", tmp_path / "s", "--frame-size", "8KiB", "-q")
    assert code == 0, err
    reader = ts.open_store(tmp_path / "s")
    assert reader.index.features == ("multi-record-frames", "zstd-dictionary")
    assert reader.index.codec["dict"]["bytes"] <= 16 * 1024
    assert _ids(tmp_path / "s") == list(range(300))
    code, _, err = _run(
        capsys, "pack", tmp_path / "all.pt", tmp_path / "s2", "--dict", "--dict-size", "2KiB", "--codec", "lz4"
    )
    assert code == 2 and "only codec 'zstd' takes a dictionary" in err
