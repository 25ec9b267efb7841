"""Parallel packing under attack: samples the in-process writer takes must be taken the same
way (same bytes) by worker processes, and samples it refuses must be refused with the same
typed error."""

from __future__ import annotations


import pytest
import torch

import tensorstore_pt as ts
from _store_tools import store_files, workers_alive

pytestmark = pytest.mark.timeout(120)


def odd_sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    w = torch.randn(3, 4, generator=g, requires_grad=True)
    z = torch.randn(5, dtype=torch.complex64, generator=g)
    return {
        "nonleaf": w * 2,  # has a grad_fn: takes torch's own pickling
        "nonleaf_view": (w + 1)[1:, ::2],
        "leaf_grad": w,
        "param": torch.nn.Parameter(torch.ones(2) * i),  # requires_grad=True
        "conj": z.conj(),  # conjugate bit set
        "neg": z.conj().imag,  # negative bit set
        "y": i,
    }


def test_odd_tensors_are_stored_the_same_by_worker_processes(tmp_path, fixed_token):
    samples = [odd_sample(i) for i in range(12)]
    ts.write_store(samples, tmp_path / "ref", codec="zstd")
    ts.write_store(samples, tmp_path / "w2", codec="zstd", num_workers=2, start_method="fork")
    assert store_files(tmp_path / "w2") == store_files(tmp_path / "ref")
    got = ts.open_store(tmp_path / "w2")[5]
    want = samples[5]
    for key in ("nonleaf", "nonleaf_view", "leaf_grad", "param", "conj", "neg"):
        assert torch.equal(
            got[key].detach().resolve_conj().resolve_neg(), want[key].detach().resolve_conj().resolve_neg()
        )
    assert got["nonleaf"].requires_grad and got["nonleaf"].grad_fn is None
    assert workers_alive() == []


def _local_lambda_sample() -> dict:
    return {"x": torch.zeros(2), "f": lambda v: v}  # a local object: pickle raises AttributeError


class _Exploding:
    def __reduce__(self):
        raise ValueError("cannot reduce me")


@pytest.mark.parametrize(
    "bad", [_local_lambda_sample(), {"x": torch.zeros(2), "o": _Exploding()}], ids=["lambda", "reduce-raises"]
)
def test_an_unpicklable_sample_gets_the_typed_in_process_error(tmp_path, bad):
    with pytest.raises(ts.UnsupportedSampleError) as in_process:
        ts.write_store([{"x": torch.ones(1)}, bad], tmp_path / "a", num_workers=0)
    with pytest.raises(ts.UnsupportedSampleError) as workers:
        ts.write_store([{"x": torch.ones(1)}, bad], tmp_path / "b", num_workers=2, start_method="fork")
    # The same precise message (the check's, naming the field), not a pickling traceback.
    assert str(workers.value) == str(in_process.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert workers_alive() == []


def _refuse_to_rebuild() -> None:
    raise ValueError("no rebuilding me")


class _Unbuildable:
    def __reduce__(self):
        return _refuse_to_rebuild, ()


def test_a_sample_that_cannot_be_rebuilt_in_a_worker_is_typed(tmp_path):
    bad = {"x": torch.zeros(2), "o": _Unbuildable()}
    with pytest.raises(ts.UnsupportedSampleError) as in_process:
        ts.write_store([bad], tmp_path / "a", num_workers=0)
    # Samples from an iterator travel pickled: the worker cannot rebuild this one.
    with pytest.raises(ts.UnsupportedSampleError, match="rebuilt in a worker"):
        ts.write_store(iter([{"x": torch.ones(1)}, bad]), tmp_path / "b", num_workers=2, start_method="fork")
    # A list is inherited by fork workers, never pickled: the worker's check gives the
    # in-process message.
    with pytest.raises(ts.UnsupportedSampleError) as inherited:
        ts.write_store([{"x": torch.ones(1)}, bad], tmp_path / "c", num_workers=2, start_method="fork")
    assert str(inherited.value) == str(in_process.value)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert workers_alive() == []


def test_sets_of_str_are_byte_identical_with_spawn(tmp_path, fixed_token):
    # A spawned worker has its own str hash seed: a set rebuilt there iterates in another
    # order, and torch.save would write other bytes (equal values, different shards).
    samples = [{"tags": {f"tag{i}-{k}" for k in range(12)}, "x": torch.full((3,), i)} for i in range(10)]
    samples[4] = {"plain": torch.ones(2)}  # samples without a set still go to the worker
    ts.write_store(samples, tmp_path / "ref", codec="zstd")
    ts.write_store(samples, tmp_path / "spawn", codec="zstd", num_workers=1, start_method="spawn")
    assert store_files(tmp_path / "spawn") == store_files(tmp_path / "ref")
    reader = ts.open_store(tmp_path / "spawn")
    assert [reader[i].get("tags") for i in range(10)] == [s.get("tags") for s in samples]
    assert workers_alive() == []
