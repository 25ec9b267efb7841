"""Attacks on the fast packing path: ``serialization.dumps``'s save templates must give
``torch.save``'s own bytes whatever the sample (computed here independently with
``torch.save``), and the parallel writer must give the ``num_workers=0`` store."""

from __future__ import annotations

import io
import re

import pytest
import torch
from _store_tools import store_files, workers_alive

import tensorstore_pt as ts
from tensorstore_pt import serialization as ser
from tensorstore_pt import writer as writer_mod
from tensorstore_pt.sources import ColumnRows

pytestmark = pytest.mark.timeout(240)


def _torch_save(sample):
    buf = io.BytesIO()
    torch.save(ser.compact(sample), buf)
    return buf.getvalue()


def _fresh(word: str) -> str:
    """An equal string that is a new object (not the interned one)."""
    out = "".join(list(word))
    if len(word) > 1:
        assert out is not word  # test premise, not validation
    return out


@pytest.fixture
def templates(monkeypatch):
    fresh = ser._SaveTemplates()
    monkeypatch.setattr(ser, "_TEMPLATES", fresh)
    return fresh


@pytest.mark.parametrize("word", ["storage", "cpu", "latin1"])
@pytest.mark.parametrize("interned_first", [True, False])
def test_user_string_equal_to_a_pickler_string(templates, word, interned_first):
    """torch.save's pickle writes the interned strings 'storage' and 'cpu' (a storage's
    persistent id) and 'latin1' (bytes under protocol 2) through pickle's memo, which works
    by object identity: a user's interned 'storage' becomes a memo reference, an equal string
    built at run time does not. Two samples equal in value but not in that identity must not
    share a template."""
    interned = (torch.arange(4.0), word, b"xy")
    built = (torch.arange(4.0) + 1, _fresh(word), b"xy")
    first, second = (interned, built) if interned_first else (built, interned)
    assert ser.dumps(first) == _torch_save(first)
    assert ser.dumps(second) == _torch_save(second)
    assert ser.dumps(interned) == _torch_save(interned)
    assert ser.dumps(built) == _torch_save(built)


@pytest.mark.parametrize("shared_first", [True, False])
def test_two_tensors_on_one_empty_storage(templates, shared_first):
    """torch.save keys storages by the storage itself (``_cdata``): two tensors on one empty
    storage save one storage record, two empty tensors of their own save two. Both samples
    have the same dtypes, sizes and strides, so the template must tell them apart."""
    empty = torch.empty(0)
    shared = (empty, empty.view(0, 3))
    separate = (torch.empty(0), torch.empty(0, 3))
    assert shared[1].stride() == separate[1].stride()  # test premise
    first, second = (shared, separate) if shared_first else (separate, shared)
    for sample in (first, second, first, second):
        assert ser.dumps(sample) == _torch_save(sample)


def test_an_empty_inherited_list_first_is_not_left_behind(tmp_path, fixed_token):
    """An empty list (or ColumnRows of 0 rows over large columns) given first starts no
    worker, so the next list is inherited too: the first must not stay registered in
    ``_INHERITED`` (where every later fork would copy it) after the writer closes."""
    rows = [(torch.full((8,), i, dtype=torch.uint8), i) for i in range(30)]
    ts.write_store(rows, tmp_path / "ref", codec="zstd", max_shard_bytes=2_000)
    columns = ColumnRows((torch.zeros(1000, 8, dtype=torch.uint8),), 0)
    with ts.ShardWriter(tmp_path / "w", codec="zstd", max_shard_bytes=2_000, num_workers=2, start_method="fork") as w:
        assert w.write_many(columns) == 0
        assert w.write_many([]) == 0
        assert w.write_many(rows) == 30
    assert writer_mod._INHERITED == {}
    assert store_files(tmp_path / "w") == store_files(tmp_path / "ref")
    assert workers_alive() == []


@pytest.mark.parametrize("char", ["x", "0", "\xe9", "\x00"])
@pytest.mark.parametrize("cached_first", [True, False])
def test_one_character_string_and_bytes(templates, char, cached_first):
    """Under pickle protocol 2 a bytes value pickles as ``_codecs.encode(text, "latin1")``,
    ``text`` decoded from it; a one-character decode can be CPython's cached character, the
    very object a user's one-character string may be (a literal), and then the pickle writes
    a memo reference where an equal string built otherwise (a slice) is written out."""
    cached = bytes([ord(char)]).decode("latin-1")
    others = [c for c in (char, char.lower(), char.upper().lower()) if c == char and c is not cached]
    if not others:
        pytest.skip("this Python gives only its cached one-character strings")
    built = others[0]
    for s in (cached, built):
        first = (torch.ones(1), s, bytes([ord(char)]))
        second = (torch.ones(1), bytes([ord(char)]), s)
        for sample in (first, second):
            assert ser.dumps(sample) == _torch_save(sample)
    pairs = [(cached, built), (built, cached)] if cached_first else [(built, cached), (cached, built)]
    for a, b in pairs:
        for sample in ((torch.zeros(1), a, bytes([ord(char)])), (torch.zeros(1), b, bytes([ord(char)]))):
            assert ser.dumps(sample) == _torch_save(sample)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("where", ["first-shard", "mid-write", "index"])
def test_full_disk_during_a_run_of_frames(tmp_path, num_workers, where):
    """A full disk while worker results are written as runs (``_emit_run``, one write per
    shard) fails as one frame at a time does: StorageFullError naming the store and a shard
    (not its temporary file), nothing published, the workers gone, the list let go."""
    from _trust_tools import FullDiskStorage

    from tensorstore_pt.storage import TEMP_MARKER

    g = torch.Generator().manual_seed(3)
    rows = [(torch.randint(0, 255, (500,), dtype=torch.uint8, generator=g), i) for i in range(200)]
    counter = FullDiskStorage(tmp_path / "count")
    ts.write_store(rows, counter, codec="zstd", max_shard_bytes=20_000)
    budget = {"first-shard": 700, "mid-write": counter.written // 2, "index": counter.written - 3_000}[where]
    store = tmp_path / "s"
    full = FullDiskStorage(store, budget)
    workers = {"num_workers": num_workers, "start_method": "fork"} if num_workers else {}
    with pytest.raises(ts.StorageFullError) as info:
        ts.write_store(rows, full, codec="zstd", max_shard_bytes=20_000, **workers)
    assert full.failures >= 1
    msg = str(info.value)
    assert str(store) in msg and TEMP_MARKER not in msg, msg
    assert re.search(r"while writing 'shard-[0-9a-z-]+\.tspt'" if where != "index" else r"'index\.json'", msg), msg
    assert not store.exists() or [p.name for p in store.iterdir() if not p.name.startswith(".")] == []
    assert writer_mod._INHERITED == {}
    assert workers_alive() == []


def test_save_options_changed_while_a_template_is_made(templates, monkeypatch):
    """torch's save options are process-wide: another thread may turn CRC-32s off while this
    one's first ``torch.save`` of a shape runs (simulated here inside that save). That save's
    bytes must not become the template of the options read before it."""
    real = ser._torch_save
    flips = []

    def save_while_another_thread_flips(sample):
        if not flips:
            flips.append(True)
            torch.serialization.set_crc32_options(False)
        return real(sample)

    monkeypatch.setattr(ser, "_torch_save", save_while_another_thread_flips)
    try:
        ser.dumps((torch.zeros(3), 1))
    finally:
        torch.serialization.set_crc32_options(True)
    sample = (torch.arange(3.0), 1)
    assert ser.dumps(sample) == _torch_save(sample)


def test_templates_come_back_after_a_run_of_shapes_that_never_repeat(templates):
    """Samples whose shapes never repeat (variable lengths) stop the making of templates;
    a later data kind of one fixed shape in the same process (a second ``tspt pack``-like
    run, a notebook) must get templates again instead of ``torch.save`` for good."""
    for n in range(1, 200):
        ser.dumps((torch.zeros(n), n))  # 199 shapes, each seen once
    fixed = [(torch.full((16,), float(i)), 7) for i in range(600)]
    for sample in fixed:
        assert ser.dumps(sample) == _torch_save(sample)
    assert templates.hits >= 300  # the fixed shape gets its template within one retry period (256 misses)
