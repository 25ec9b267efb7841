"""The main job: `tspt demo` on the real scikit-learn digits dataset."""

import torch

from tensorstore_pt.cli import main
from tensorstore_pt.demo import digits_samples


def test_digits_samples_are_the_real_dataset():
    from sklearn.datasets import load_digits

    samples = digits_samples()
    digits = load_digits()
    assert len(samples) == 1797
    image, label = samples[42]
    assert image.dtype == torch.uint8 and image.shape == (8, 8) and label.dtype == torch.int64
    assert torch.equal(image, torch.from_numpy(digits.images[42]).to(torch.uint8))
    assert int(label) == int(digits.target[42])


def test_demo_prints_the_table_and_passes(tmp_path, capsys):
    code = main(["demo", "--workdir", str(tmp_path), "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for row in (
        "1 .pt file per sample",
        "tensorstore_pt none",
        "tensorstore_pt lz4-0",
        "tensorstore_pt zstd-3 ",
        "tensorstore_pt zstd-3 + dictionary",
        "tensorstore_pt zstd-3 + 64 KiB frames",
    ):
        assert row in out
    assert "every store verified clean and every sample read back bit-exact" in out
    assert "bytes vs base" in out and "allocated vs base" in out  # bytes with bytes, blocks with blocks
    # Part 2: the four torch.save shapes, packed as tspt pack reads them.
    assert "part 2: the four shapes" in out
    for shape, records in (("tuple (images, labels)", "1,797"), ("list of 10", "10"), ("dict of columns", "1,797"),
                           ("dir train/ + val/", "1,797")):  # fmt: skip
        line = next(x for x in out.splitlines() if x.startswith(shape))
        assert f" {records} " in line and line.rstrip().endswith("ok"), line
    assert len(list((tmp_path / "per-sample-pt").glob("*.pt"))) == 1797
