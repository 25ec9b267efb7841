"""Property: reading back what was written gives bit-identical samples, for any codec,
shard size, frame size and dictionary choice (issue: core store round trip)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorstore_pt as ts
from strategies import assert_identical, samples

_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_SETTINGS
@given(
    batch=st.lists(samples(extras=True, sparse=True, max_leaves=6), min_size=1, max_size=6),
    codec=st.sampled_from(["none", "lz4", "zstd"]),
    max_shard_bytes=st.sampled_from([1, 700, 4096, 64 * 2**20]),
    frame_target_bytes=st.sampled_from([None, 1, 3000]),
)
def test_round_trip_is_bit_exact(batch, codec, max_shard_bytes, frame_target_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        info = ts.write_store(
            batch, path, codec=codec, max_shard_bytes=max_shard_bytes, frame_target_bytes=frame_target_bytes
        )
        assert info.records == len(batch)
        reader = ts.open_store(path)
        reader.verify()
        for i, sample in enumerate(batch):
            # layout=False: the writer compacts views, so strides/storages may differ; values,
            # dtypes, shapes, container types and leaves must be identical.
            assert_identical(sample, reader[i], f"record {i}", layout=False)
        for i, sample in enumerate(reversed(batch)):  # random order: no state leaks between reads
            assert_identical(sample, reader[len(batch) - 1 - i], f"record {len(batch) - 1 - i}", layout=False)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(samples(max_leaves=4), min_size=12, max_size=30))
def test_round_trip_with_a_dictionary(batch):
    import warnings

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # too little data to train: written without one
            ts.write_store(batch, path, dictionary=512)
        reader = ts.open_store(path)
        for i, sample in enumerate(batch):
            assert_identical(sample, reader[i], f"record {i}", layout=False)
