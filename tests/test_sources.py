"""Pack sources: the four shapes people torch.save, ambiguity, empty sources, unsafe places."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensorstore_pt import InvalidOptionError, UnsafePayloadError
from tensorstore_pt.sources import open_source, unsafe_places


def test_tuple_of_equal_length_tensors_is_rows(tmp_path: Path) -> None:
    data, labels = torch.randn(100, 128), torch.arange(100)
    torch.save((data, labels), tmp_path / "data.pt")
    s = open_source(tmp_path / "data.pt")
    assert (s.kind, s.records) == ("columns", 100)
    got = list(s.samples)
    assert len(got) == 100 and torch.equal(got[7][0], data[7]) and int(got[7][1]) == 7
    assert "100 records" in s.description


def test_list_of_different_lengths_is_one_sample_each(tmp_path: Path) -> None:
    ts = [torch.randn(20, 64), torch.randn(15, 64), torch.randn(25, 64)]
    torch.save(ts, tmp_path / "list.pt")
    s = open_source(tmp_path / "list.pt")
    assert (s.kind, s.records) == ("rows", 3)
    assert [t.shape[0] for t in s.samples] == [20, 15, 25]


def test_dict_of_columns(tmp_path: Path) -> None:
    d = {"input": torch.randn(32, 100), "target": torch.arange(32), "auxiliary": torch.randn(32, 50)}
    torch.save(d, tmp_path / "dict.pt")
    s = open_source(tmp_path / "dict.pt")
    assert (s.kind, s.records) == ("dict_columns", 32)
    first = next(s.samples)
    assert set(first) == {"input", "target", "auxiliary"} and first["input"].shape == (100,)


def test_dict_with_a_non_column_names_the_key_and_type(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(4, 2), "name": "hello"}, tmp_path / "bad.pt")
    with pytest.raises(InvalidOptionError, match="key 'name' holds a str"):
        open_source(tmp_path / "bad.pt")


@pytest.mark.parametrize("container", [list, tuple])
def test_ambiguous_asks_for_layout_with_both_readings(tmp_path: Path, container: type) -> None:
    torch.save(container([torch.randn(3, 8), torch.randn(3, 8)]), tmp_path / "amb.pt")
    with pytest.raises(InvalidOptionError) as ei:
        open_source(tmp_path / "amb.pt")
    msg = str(ei.value)
    assert "ambiguous" in msg and "--layout rows" in msg and "(2 records)" in msg and "(3 records of 2-tuples)" in msg
    assert open_source(tmp_path / "amb.pt", layout="rows").records == 2
    cols = open_source(tmp_path / "amb.pt", layout="columns")
    assert cols.records == 3 and len(next(cols.samples)) == 2


def test_layout_columns_needs_a_shared_leading_dimension(tmp_path: Path) -> None:
    torch.save([torch.zeros(2), torch.zeros(3)], tmp_path / "x.pt")
    with pytest.raises(InvalidOptionError, match="--layout columns needs"):
        open_source(tmp_path / "x.pt", layout="columns")


def test_directory_with_subdirectories_and_other_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for sub, n in (("train", 3), ("val", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            torch.save(torch.tensor(i), root / sub / f"{i}.pt")
    torch.save(torch.tensor(99), root / "top.pt")
    (root / "README.txt").write_text("x")
    s = open_source(root)
    assert s.records == 1
    assert any("train/ (a subdirectory, 3 .pt file(s); pass --recursive" in x for x in s.skipped)
    assert "README.txt (not a .pt file)" in s.skipped
    s = open_source(root, recursive=True)
    assert s.records == 6 and [str(f.relative_to(root)) for f in s.files][:2] == ["top.pt", "train/0.pt"]
    assert s.skipped == ("README.txt (not a .pt file)",)


def test_directory_with_only_subdirectories_says_so(tmp_path: Path) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    torch.save(torch.tensor(1), tmp_path / "d" / "train" / "0.pt")
    with pytest.raises(InvalidOptionError, match="nothing to pack.*train/.*--recursive"):
        open_source(tmp_path / "d")


@pytest.mark.parametrize("obj", [[], (), {}, "dir"], ids=["list", "tuple", "dict", "dir"])
def test_empty_sources_are_refused_alike(tmp_path: Path, obj: object) -> None:
    if obj == "dir":
        (tmp_path / "e").mkdir()
        path = tmp_path / "e"
    else:
        path = tmp_path / "e.pt"
        torch.save(obj, path)
    with pytest.raises(InvalidOptionError, match="^nothing to pack: "):
        open_source(path)


class Custom:  # a class torch.load(weights_only=True) refuses
    def __init__(self) -> None:
        self.x = 1


def test_unsafe_places_name_the_key_path(tmp_path: Path) -> None:
    import numpy as np

    torch.save([{"a": torch.zeros(2), "meta": {"arr": np.zeros(3)}}], tmp_path / "np.pt")
    data = (tmp_path / "np.pt").read_bytes()
    assert unsafe_places(data) == [("[0]['meta']['arr']", "numpy.ndarray")]
    with pytest.raises(UnsafePayloadError, match=r"\[0\]\['meta'\]\['arr'\]: numpy.ndarray.*torch.from_numpy"):
        next(open_source(tmp_path / "np.pt").samples)
    torch.save({"x": torch.zeros(2, 1), "obj": [Custom(), Custom()]}, tmp_path / "cls.pt")
    places = unsafe_places((tmp_path / "cls.pt").read_bytes())
    assert places[0] == ("['obj'][0]", f"{__name__}.Custom")


def _reference_scan(directory: Path, recursive: bool) -> tuple[list[Path], list[str]]:
    """The scan as pathlib says it, computed independently: every entry's path, natural-sorted
    by the parts of its path relative to ``directory``."""
    import re

    def key(name: str) -> list:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in re.split(r"(\d+)", name)]

    files, skipped = [], []

    def walk(d: Path) -> None:
        for p in sorted(d.iterdir(), key=lambda p: key(p.name)):
            rel = p.relative_to(directory)
            if p.is_dir():
                if recursive:
                    walk(p)
                else:
                    n = sum(1 for q in p.rglob("*.pt") if q.is_file())
                    skipped.append(f"{rel}/ (a subdirectory, {n} .pt file(s); pass --recursive to pack them)")
            elif p.suffix == ".pt" and p.is_file():
                files.append(p)
            else:
                skipped.append(f"{rel} (not a .pt file)")

    walk(directory)
    files.sort(key=lambda p: [key(part) for part in p.relative_to(directory).parts])
    return files, skipped


@pytest.mark.parametrize("recursive", [False, True])
def test_scan_directory_orders_and_skips_as_pathlib_does(tmp_path: Path, recursive: bool) -> None:
    from tensorstore_pt.sources import scan_directory

    root = tmp_path / "d"
    for rel in ["x10.pt", "x2.pt", "X3.pt", "x01.pt", "a.b.pt", ".pt", "notes.txt", "x2.pt.bak",
                "a/1.pt", "a/10.pt", "a/b/2.pt", "a0.pt", "b10/x.pt", "b9/y.pt", "b9/readme"]:  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"PK\x03\x04")
    (root / "loop.pt").symlink_to(root / "loop.pt")  # a link to itself: neither file nor directory
    (root / "gone.pt").symlink_to(root / "nowhere.pt")
    (root / "c").symlink_to(root / "a", target_is_directory=True)
    files, skipped = scan_directory(root, recursive)
    ref_files, ref_skipped = _reference_scan(root, recursive)
    assert [str(f) for f in files] == [str(f) for f in ref_files]
    assert skipped == ref_skipped
    if not recursive:  # by hand: digit runs by value, case ignored; links to nothing are skipped
        assert [f.name for f in files] == ["a0.pt", "a.b.pt", "x01.pt", "x2.pt", "X3.pt", "x10.pt"]
        assert "gone.pt (not a .pt file)" in skipped and "loop.pt (not a .pt file)" in skipped
    else:  # a directory's files come before a sibling file whose name it begins
        expected = ["a/1.pt", "a/10.pt", "a/b/2.pt", "a0.pt", "a.b.pt", "b9/y.pt"]
        assert [str(f.relative_to(root)) for f in files][:6] == expected
