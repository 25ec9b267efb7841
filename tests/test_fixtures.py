"""Golden stores of every format version still read, bit-exactly (docs/format.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import tensorstore_pt as ts

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_fixtures import VERSIONS, fixture_samples  # noqa: E402
from test_store import assert_same  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
STORES = sorted(p for p in FIXTURES.glob("v*/*") if p.is_dir())


def test_fixtures_exist_for_every_version():
    expected = {(f"v{version}", name) for version, stores in VERSIONS.items() for name in stores}
    assert {(p.parent.name, p.name) for p in STORES} == expected


@pytest.mark.parametrize("store", STORES, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_golden_store_reads_bit_exact(store):
    reader = ts.open_store(store)
    reader.verify()
    expected = fixture_samples()
    assert len(reader) == len(expected)
    assert reader.info().shards > 1
    version = store.parent.name[1:]
    assert reader.metadata["fixture"] == f"format {version}"
    assert reader.info().format_version == tuple(int(v) for v in version.split("."))
    assert reader.info().codec["id"] == VERSIONS[version][reader.metadata.get("store", store.name)]["codec"]
    for i, sample in enumerate(expected):
        assert_same(sample, reader[i], f"{store.name} record {i}")
