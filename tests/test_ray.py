"""tensorstore_pt.ray on a local Ray cluster: the datasink (parts + merge) and read_store.

One small cluster (2 CPUs, no dashboard) serves the whole module: ``ray.init`` takes seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Data is not installed (pip install 'tensorstore_pt[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'tensorstore_pt[ray]')")

from tensorstore_pt import open_store, verify_store, write_store  # noqa: E402
from tensorstore_pt.errors import InvalidOptionError, StoreExistsError, UnsupportedSampleError  # noqa: E402
from tensorstore_pt.ray import PARTS_DIR, TensorStoreDatasink, read_store, row_to_sample, sample_to_row  # noqa: E402

# Ray's own DataContext copies touch its deprecated settings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

N = 2000
SHARD_BYTES = 64 * 2**10  # several shards per part


@pytest.fixture(scope="module")
def cluster():
    # Keep the local cluster light: no dashboard, no usage report, no log streaming.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=256 * 2**20,
    )
    # The to_sample functions below live in this test module, which the workers cannot import:
    # pickle them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def make_rows(n: int = N) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    return [
        {
            "x": rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8),
            "label": np.int64(i),
            "w": np.float16(i / 7),
            "name": f"r{i}",
            "blob": bytes([i % 256, 7]),
            "v": np.arange(i % 5, dtype=np.int16),
        }
        for i in range(n)
    ]


def expected_sample(row: dict[str, Any]) -> dict[str, Any]:
    """The documented mapping, written out by hand for these columns."""
    return {
        "x": torch.tensor(row["x"].tolist(), dtype=torch.uint8),
        "label": torch.tensor(int(row["label"]), dtype=torch.int64),
        "w": torch.tensor(float(row["w"]), dtype=torch.float16),
        "name": str(row["name"]),
        "blob": bytes(row["blob"]),
        "v": torch.tensor(row["v"].tolist(), dtype=torch.int16),
    }


def dataset(rows: list[dict[str, Any]], blocks: int = 4) -> Any:
    ds = ray.data.from_items(rows).repartition(blocks)
    ds.context.execution_options.preserve_order = True
    return ds


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_same_store(got: Path, ref: Path) -> None:
    a, b = open_store(got), open_store(ref)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a.read_bytes(i) == b.read_bytes(i), f"record {i} differs"


def parts_left(dest: Path) -> list[str]:
    parts = dest / PARTS_DIR
    return sorted(str(p.relative_to(dest)) for p in parts.rglob("*")) if parts.exists() else []


# --------------------------------------------------------------------------- pure mappings (no cluster)


def test_row_to_sample_mapping():
    row = {
        "t": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i8": np.int8(-3),
        "b": np.bool_(True),
        "py_int": 5,
        "py_float": 0.5,
        "s": np.str_("abc"),
        "raw": b"\x00\x01",
        "none": None,
        "strs": np.array(["a", "bc"]),
        "nested": {"k": np.uint16(9)},
    }
    got = row_to_sample(row)
    want = {
        "t": torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], dtype=torch.float32),
        "i8": torch.tensor(-3, dtype=torch.int8),
        "b": torch.tensor(True),
        "py_int": torch.tensor(5, dtype=torch.int64),
        "py_float": torch.tensor(0.5, dtype=torch.float64),
        "s": "abc",
        "raw": b"\x00\x01",
        "none": None,
        "strs": ["a", "bc"],
        "nested": {"k": torch.tensor(9, dtype=torch.uint16)},
    }
    assert same_value(got, want)
    src = np.zeros(3, dtype=np.int32)
    t = row_to_sample({"a": src})["a"]
    src[0] = 5
    assert int(t[0]) == 0  # the sample owns a copy


def test_row_to_sample_refuses_unmapped_values():
    with pytest.raises(UnsupportedSampleError, match=r"row column 'when'.*datetime64.*to_sample"):
        row_to_sample({"when": np.datetime64("2026-01-01")})
    with pytest.raises(UnsupportedSampleError, match="expected a mapping"):
        row_to_sample([1, 2])


def test_sample_to_row_mapping():
    row = sample_to_row({"x": torch.arange(4, dtype=torch.int16), "y": torch.tensor(2.5), "s": "a"})
    assert row["x"].dtype == np.int16 and row["x"].tolist() == [0, 1, 2, 3]
    assert isinstance(row["y"], np.float32) and row["y"] == np.float32(2.5)
    assert row["s"] == "a"
    assert list(sample_to_row(torch.ones(2))) == ["sample"]
    assert sample_to_row((1, "a")) == {"sample": (1, "a")}
    with pytest.raises(UnsupportedSampleError, match=r"record 4, field 'h'.*bfloat16.*to_row"):
        sample_to_row({"h": torch.ones(2, dtype=torch.bfloat16)}, 4)


@pytest.mark.parametrize(
    "counts, parallelism",
    [([10] * 10, 3), ([10] * 10, 10), ([10] * 3, 7), ([1, 100, 1, 1], 2), ([0, 5, 0, 5], 3), ([5], 20), ([], 3)],
)
def test_read_tasks_cover_the_store_once_in_order(counts, parallelism):
    from tensorstore_pt.ray import _split

    ends = np.cumsum([0, *counts])
    bounds = np.stack([ends[:-1], ends[1:]], axis=1) if counts else np.zeros((0, 2), np.int64)
    ranges = _split(bounds, parallelism)
    covered = [i for start, stop, _ in ranges for i in range(start, stop)]
    assert covered == list(range(sum(counts)))  # every record once, in store order
    assert len(ranges) <= max(parallelism, sum(1 for c in counts if c))
    for start, stop, shards in ranges:  # a task names exactly the shards its records are in
        assert shards == [si for si in range(len(counts)) if ends[si] < stop and ends[si + 1] > start]


def test_options_are_checked_on_the_driver(tmp_path):
    with pytest.raises(InvalidOptionError, match="mode"):
        TensorStoreDatasink(tmp_path / "s", mode="append")
    with pytest.raises(InvalidOptionError, match="max_shard_bytes"):
        TensorStoreDatasink(tmp_path / "s", max_shard_bytes=0)
    with pytest.raises(InvalidOptionError, match="to_sample"):
        TensorStoreDatasink(tmp_path / "s", to_sample=3)
    with pytest.raises(InvalidOptionError):
        TensorStoreDatasink(tmp_path / "s", codec="gzip")
    with pytest.raises(InvalidOptionError, match="metadata"):
        TensorStoreDatasink(tmp_path / "s", metadata={"a": object()})
    with pytest.raises(InvalidOptionError, match="dictionary_rows"):
        TensorStoreDatasink(tmp_path / "s", dictionary=True)
    with pytest.raises(InvalidOptionError, match="dict_bytes"):
        TensorStoreDatasink(tmp_path / "s", dictionary=True, dictionary_rows=[], dict_bytes=10)
    with pytest.raises(InvalidOptionError, match="only codec 'zstd'"):
        TensorStoreDatasink(tmp_path / "s", codec="lz4", dictionary=True, dictionary_rows=[])


# --------------------------------------------------------------------------- on the cluster


def test_write_equals_single_process_store(cluster, tmp_path):
    rows = make_rows()
    dest = tmp_path / "train"
    sink = TensorStoreDatasink(dest, codec="zstd", max_shard_bytes=SHARD_BYTES, metadata={"split": "train"})
    dataset(rows).write_datasink(sink)

    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref, codec="zstd", max_shard_bytes=SHARD_BYTES)
    assert_same_store(dest, ref)
    store = open_store(dest)
    assert store.metadata.get("split") == "train"
    assert len(store.index.shards) >= 4  # at least one shard per part
    assert all(same_value(store[i], expected_sample(rows[i])) for i in (0, 1, 777, N - 1))
    assert sink.result is not None and sink.result.records == N
    assert verify_store(dest).ok
    assert parts_left(dest) == []
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(
        ["index.json", *[s.name for s in store.index.shards]]
    )

    # read it back: ids are record positions, order kept, columns as the documented mapping
    back = read_store(dest, override_num_blocks=3)
    got = back.take_all()
    assert [int(r["id"]) for r in got] == list(range(N))
    for i in (0, 5, 1234, N - 1):
        want = rows[i]
        assert np.array_equal(got[i]["x"], want["x"]) and got[i]["x"].dtype == np.uint8
        assert int(got[i]["label"]) == i
        assert np.float16(got[i]["w"]) == want["w"]
        assert got[i]["name"] == want["name"] and got[i]["blob"] == want["blob"]
        assert np.array_equal(got[i]["v"], want["v"])


def numbered(row: dict[str, Any]) -> dict[str, Any]:
    i = int(row["id"])
    if i < 250:  # the first read task is the slowest: it finishes last
        import time

        time.sleep(0.004)
    return {"i": np.int64(i), "sq": np.full((2,), i * i, dtype=np.int64)}


def test_fused_read_write_keeps_read_order_without_preserve_order(cluster, tmp_path):
    """read -> map -> write fuse into one task per read task, numbered in read order: the
    store keeps that order even with preserve_order off and tasks finishing out of order."""
    ds = ray.data.range(1000, override_num_blocks=4).map(numbered)
    assert ds.context.execution_options.preserve_order is False
    dest = tmp_path / "s"
    ds.write_datasink(TensorStoreDatasink(dest))
    store = open_store(dest)
    assert [int(store[i]["i"]) for i in range(1000)] == list(range(1000))
    assert torch.equal(store[999]["sq"], torch.tensor([999 * 999] * 2))


def test_create_refuses_a_store_and_overwrite_replaces_it(cluster, tmp_path):
    dest = tmp_path / "s"
    write_store([{"a": torch.tensor(1)}], dest)
    with pytest.raises(StoreExistsError, match="already exists"):
        dataset(make_rows(40), blocks=2).write_datasink(TensorStoreDatasink(dest))
    assert len(open_store(dest)) == 1
    rows = make_rows(40)
    dataset(rows, blocks=2).write_datasink(TensorStoreDatasink(dest, mode="overwrite"))
    store = open_store(dest)
    assert len(store) == 40 and same_value(store[39], expected_sample(rows[39]))
    assert verify_store(dest).ok and parts_left(dest) == []


def explode_at_1234(row: dict[str, Any]) -> Any:
    if int(row["label"]) == 1234:
        raise RuntimeError("boom at row 1234")
    return row_to_sample(row)


def test_a_failing_task_publishes_nothing(cluster, tmp_path):
    dest = tmp_path / "s"
    with pytest.raises(Exception, match="boom at row 1234"):
        dataset(make_rows()).write_datasink(TensorStoreDatasink(dest, to_sample=explode_at_1234))
    assert not (dest / "index.json").exists()
    assert parts_left(dest) == []
    assert not dest.exists() or [p.name for p in dest.iterdir() if p.name != ".tspt-lock"] == []


def die_once(marker: str) -> Any:
    """A to_sample that kills its worker process at row 700, the first time only."""

    def to_sample(row: dict[str, Any]) -> Any:
        if int(row["label"]) == 700 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return row_to_sample(row)

    return to_sample


def test_a_retried_task_leaves_no_duplicate_part(cluster, tmp_path):
    rows = make_rows()
    dest = tmp_path / "s"
    marker = tmp_path / "died"
    sink = TensorStoreDatasink(dest, max_shard_bytes=SHARD_BYTES, to_sample=die_once(str(marker)))
    dataset(rows).write_datasink(sink)
    assert marker.exists()  # the first attempt of one task died mid-write
    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref, max_shard_bytes=SHARD_BYTES)
    assert_same_store(dest, ref)
    assert verify_store(dest).ok and parts_left(dest) == []


def test_a_merge_that_stops_midway_keeps_its_parts(cluster, tmp_path, monkeypatch):
    import tensorstore_pt.merge as merge_mod
    from tensorstore_pt import merge_stores

    rows = make_rows(200)
    dest = tmp_path / "s"
    real_step = merge_mod._Merge._do_step
    calls = []

    def failing_step(self: Any, step: Any) -> Any:
        calls.append(step)
        if len(calls) == 2:
            raise OSError(5, "injected I/O error")
        return real_step(self, step)

    monkeypatch.setattr(merge_mod._Merge, "_do_step", failing_step)
    sink = TensorStoreDatasink(dest, max_shard_bytes=8 * 2**10)
    with pytest.warns(UserWarning, match="the parts are kept"):
        with pytest.raises(OSError, match="injected") as err:
            dataset(rows, blocks=2).write_datasink(sink)
    if sys.version_info >= (3, 11):  # exception notes
        assert "merge_stores(" in "".join(err.value.__notes__)
    assert not (dest / "index.json").exists()
    assert len(sink.unfinished_parts) == 2
    monkeypatch.undo()
    merge_stores(sink.unfinished_parts, dest)  # finishes the merge the datasink started
    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref)
    assert_same_store(dest, ref)
    assert verify_store(dest).ok


def test_custom_to_sample_and_to_row(cluster, tmp_path):
    rows = make_rows(300)
    dest = tmp_path / "s"

    def to_sample(row: dict[str, Any]) -> Any:
        return (torch.from_numpy(row["x"].astype(np.float32)), int(row["label"]))

    dataset(rows, blocks=3).write_datasink(TensorStoreDatasink(dest, codec="lz4", to_sample=to_sample))
    store = open_store(dest)
    assert len(store) == 300
    for i in (0, 150, 299):
        x, label = store[i]
        assert label == i and x.dtype == torch.float32 and torch.equal(x, torch.tensor(rows[i]["x"].tolist()).float())

    back = read_store(dest, to_row=lambda s: {"mean": float(s[0].mean()), "label": s[1]}).take_all()
    assert [r["id"] for r in back] == list(range(300))
    assert [r["label"] for r in back] == list(range(300))
    assert back[9]["mean"] == pytest.approx(float(rows[9]["x"].astype(np.float64).mean()), rel=1e-6)
    # non-dict samples with the default mapping: one "sample" column
    assert "sample" in read_store(dest).schema().names


def test_shared_dictionary_trained_on_the_driver(cluster, tmp_path):
    rows = make_rows(400)
    dest = tmp_path / "s"
    sink = TensorStoreDatasink(dest, dictionary=True, dictionary_rows=rows[:200], dict_bytes=4096)
    dataset(rows, blocks=3).write_datasink(sink)
    store = open_store(dest)
    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref)
    assert_same_store(dest, ref)  # the same records, whatever the dictionary
    ref_dict = store.index.codec["dict"]
    assert ref_dict["bytes"] <= 4096
    assert [p.name for p in dest.iterdir() if p.suffix == ".zdict"] == [ref_dict["name"]]  # one, shared
    assert verify_store(dest).ok and parts_left(dest) == []


def test_empty_dataset_writes_an_empty_store(cluster, tmp_path):
    dest = tmp_path / "s"
    ray.data.range(0).write_datasink(TensorStoreDatasink(dest))
    assert len(open_store(dest)) == 0 and parts_left(dest) == []
    assert read_store(dest).count() == 0


def test_read_store_splits_by_shard_and_keeps_order(cluster, tmp_path):
    src = tmp_path / "s"
    samples = [{"x": torch.full((4,), i, dtype=torch.int32), "y": torch.tensor(i * 0.5)} for i in range(120)]
    write_store(samples, src, max_shard_bytes=4096)
    shards = len(open_store(src).index.shards)
    assert shards >= 4
    for blocks in (2, shards, 3 * shards):  # groups of shards, one per shard, slices of shards
        got = read_store(src, override_num_blocks=blocks).take_all()
        assert [int(r["id"]) for r in got] == list(range(120)), blocks
        assert all(r["x"].dtype == np.int32 and r["x"].tolist() == [i] * 4 for i, r in enumerate(got))
        assert all(float(r["y"]) == i * 0.5 for i, r in enumerate(got))


def test_write_and_read_on_s3(cluster, tmp_path, s3_bucket):
    """The same on the moto S3 endpoint: parts under s3://bucket/train/.parts, copied by the merge."""
    import fsspec

    bucket, options = s3_bucket
    url = f"s3://{bucket}/train"
    rows = make_rows(300)
    sink = TensorStoreDatasink(url, max_shard_bytes=SHARD_BYTES, storage_options=options)
    dataset(rows, blocks=3).write_datasink(sink)

    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref, max_shard_bytes=SHARD_BYTES)
    got, want = open_store(url, storage_options=options), open_store(ref)
    assert len(got) == len(want) == 300
    assert all(got.read_bytes(i) == want.read_bytes(i) for i in range(300))
    assert verify_store(url, storage_options=options).ok
    fs = fsspec.filesystem("s3", **options)
    fs.invalidate_cache()
    assert not [k for k in fs.find(f"{bucket}/train") if f"/{PARTS_DIR}/" in k]  # the parts are gone

    back = read_store(url, storage_options=options, override_num_blocks=2).take_all()
    assert [int(r["id"]) for r in back] == list(range(300))
    assert np.array_equal(back[123]["x"], rows[123]["x"])


def test_a_relative_path_means_the_drivers_directory(cluster, tmp_path, monkeypatch):
    # Write tasks and read tasks run in the workers' working directory (another node's, on a
    # cluster): a relative path must be resolved on the driver, where the user wrote it.
    monkeypatch.chdir(tmp_path)
    sink = TensorStoreDatasink("rel-train", codec="lz4")
    assert sink.path == str(tmp_path / "rel-train")
    rows = make_rows(40)
    dataset(rows, blocks=2).write_datasink(sink)
    ref = tmp_path / "ref"
    write_store([expected_sample(r) for r in rows], ref, codec="lz4")
    assert_same_store(tmp_path / "rel-train", ref)
    monkeypatch.chdir(tmp_path / "rel-train")  # the driver moves on; the dataset is lazy
    back = read_store("../rel-train")
    os.chdir(tmp_path)
    assert [int(r["id"]) for r in back.take_all()] == list(range(40))
