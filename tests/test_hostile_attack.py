"""Adversarial review (attack11): hostile records that break the issue-11 promises.

Every test here states the promise it checks and fails while the fault is there. Children
(subprocesses) are used where a fault kills the process (SIGSEGV) or takes unbounded time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _hostile_tools import CHILD_TRY, child_outcome, hand, run_child, store_with, torch_zip

TYPED = ("RecordDecodeError", "AllocationBudgetError", "UnsafePayloadError")


# --------------------------------------------------------------------------- deep nesting


def _deep_tuple(depth: int) -> bytes:
    """EMPTY_TUPLE then TUPLE1 ``depth`` times: one pickle byte per level, no budget units."""
    return b")" + b"\x85" * depth


#: A 200,000-deep tuple used as a dict key: SETITEM hashes it, tuplehash recurses in C with no
#: recursion check, and the process dies of a stack overflow (a 200 KB record).
DEEP_KEY = torch_zip(hand(b"}", _deep_tuple(200_000), b"Ns"))
#: The same tuple put into set([...]) (an allowed call): hashed the same way.
DEEP_SET = torch_zip(hand(b"c__builtin__\nset\n]", _deep_tuple(200_000), b"a\x85R"))


def _read_in_child(store: Path, record: int = 1, timeout: float = 60.0) -> tuple[int, dict, str, float]:
    code = (
        CHILD_TRY
        + f"""
from tensorstore_pt import open_store
r = open_store({str(store)!r})
outcome(lambda: r[{record}])
"""
    )
    rc, out, err, secs = run_child(code, timeout)
    return rc, child_outcome(out), err, secs


@pytest.mark.parametrize("kind", ["dict-key", "set"])
def test_deep_tuple_hashed_by_the_pickle_crashes_the_reader(tmp_path: Path, kind: str) -> None:
    """Promise: a hostile record is refused with a typed error naming it. torch.save cannot write
    a 200,000-deep tuple (RecursionError past ~1000 levels), yet the fast decoder builds it from
    one byte per level and then hashes it (SETITEM / set()): CPython's tuplehash recurses in C
    and the reading process dies of SIGSEGV. Fix: fastload's interpreter should bound nesting
    depth (e.g. refuse containers nested deeper than sys.getrecursionlimit())."""
    store = store_with(tmp_path / "s", DEEP_KEY if kind == "dict-key" else DEEP_SET)
    rc, res, err, _ = _read_in_child(store)
    assert rc == 0, f"reading the hostile record killed the process (returncode {rc}): {err[-300:]}"
    assert res.get("error") in TYPED, f"expected a typed refusal, got {res}"


def test_deep_tuple_hashed_crashes_verify_deep(tmp_path: Path) -> None:
    """Promise: verify_store(deep=True) reports whatever a read refuses. On the deep-tuple-key
    record it dies of SIGSEGV instead of reporting record 1. Fix: as above (fastload)."""
    store = store_with(tmp_path / "s", DEEP_KEY)
    code = (
        CHILD_TRY
        + f"""
from tensorstore_pt import verify_store
rep = verify_store({str(store)!r}, deep=True)
print(json.dumps({{"ok": rep.ok, "records": [p.record for p in rep.problems]}}), flush=True)
"""
    )
    rc, out, err, _ = run_child(code, 60)
    assert rc == 0, f"verify_store(deep=True) killed the process (returncode {rc}): {err[-300:]}"
    res = child_outcome(out)
    assert res.get("records") == [1], f"verify should report record 1, got {res}"


def test_deep_tuple_is_refused_not_returned(tmp_path: Path) -> None:
    """Promise: anything torch.save could not have written is refused with a typed error. A
    20,000-deep tuple (40 KB of pickle; torch.save raises RecursionError at ~1000 levels) is
    returned to the caller, who then crashes on hash() (SIGSEGV), pickling to a DataLoader
    worker's queue or default_collate (RecursionError). Fix: fastload, a nesting-depth bound."""
    from tensorstore_pt import open_store

    store = store_with(tmp_path / "s", torch_zip(hand(_deep_tuple(20_000))))
    r = open_store(store)
    try:
        got = r[1]
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ in TYPED, repr(exc)
        return
    depth = 0
    while isinstance(got, tuple) and got:
        got, depth = got[0], depth + 1
    pytest.fail(f"a {depth}-deep tuple (which torch.save cannot write) was returned instead of refused")


# --------------------------------------------------------------------------- time bombs


def _colliding_int_keys(n: int) -> bytes:
    """A dict of ``n`` int keys k * (2**61 - 1), all with hash 0 (CPython hashes ints modulo the
    Mersenne prime 2**61 - 1, unseeded): each insert probes every earlier key, O(n**2)."""
    m = 2**61 - 1
    ops = bytearray(b"}(")
    for k in range(1, n + 1):
        v = k * m
        b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        ops += b"\x8a" + bytes([len(b)]) + b + b"N"
    ops += b"u"
    return torch_zip(hand(bytes(ops)))


def test_hash_collision_record_is_a_time_bomb(tmp_path: Path) -> None:
    """Promise (issue: "time bombs"): no record takes more than seconds to decode or reject.
    A 400 KB record holding a dict of 32,000 int keys that all hash to 0 takes ~10 s to
    decode (quadratic; 1 MB takes a minute, a 1 GiB record forever), in reads and in
    verify --deep alike, under no budget (the budget counts bytes and objects, not probes).
    Fix: fastload's interpreter (e.g. count dict/set insert probes, or refuse int/float keys
    whose hashes collide beyond a bound; torch.save of a sample never holds such a dict)."""
    store = store_with(tmp_path / "s", _colliding_int_keys(32_000))
    rc, res, err, secs = _read_in_child(store, timeout=12)
    assert rc != -9, f"reading one 400 KB record ran past 12 s (killed): {err[-200:]}"
    assert res.get("seconds", 99) < 5, f"reading one 400 KB record took {res.get('seconds'):.1f} s: {res}"


# --------------------------------------------------------------------------- memory past the budget


def _memory_cases() -> dict[str, bytes]:
    import struct

    n = 400_000
    return {
        # TUPLE1 over the last tuple: one pickle byte makes a 56-byte tuple, charged nothing
        "tuple1-chain": hand(b")" + b"\x85" * n),
        # NONE, TUPLE2: two bytes make a 64-byte tuple
        "tuple2-chain": hand(b")" + b"N\x86" * (n // 2)),
        # NONE, TUPLE1 appended to a list: two bytes, a tuple and a list slot
        "list-of-tuple1": hand(b"](" + b"N\x85" * (n // 2) + b"e"),
        # a dict of distinct BININT keys: six bytes make a 32-byte int and a ~40-byte dict slot
        "dict-distinct-ints": hand(b"}(" + b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(n // 6)) + b"u"),
    }


@pytest.mark.parametrize("kind", list(_memory_cases()))
def test_pickle_builds_past_its_documented_budget(kind: str) -> None:
    """Promise (README trust model, docs/integrity.md 8): a record's pickle may build at most its
    raw length + 64 KiB of data and the pickle's length + 65,536 object units of about 16 bytes.
    One-byte opcodes that make an object (TUPLE1, TUPLE2, a dict slot with a new int) are not
    charged, and a record peaks at 29-49 times its length in Python memory (a 1 GiB record would
    build ~49 GiB). Fix: fastload's interpreter (charge TUPLE1/2/3, TUPLE, SETITEM(S), APPEND(S)
    and int/float/str pushes their object units)."""
    import tracemalloc

    from tensorstore_pt.fastload import BUDGET_SLACK_BYTES, BUDGET_SLACK_UNITS, fast_loads

    pkl = _memory_cases()[kind]
    buf = torch_zip(pkl)
    allowed = len(buf) + BUDGET_SLACK_BYTES + 16 * (len(pkl) + BUDGET_SLACK_UNITS)
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        got = fast_loads(buf)
        outcome = f"returned a {type(got).__name__}"
    except Exception as exc:  # noqa: BLE001
        outcome = f"raised {type(exc).__name__}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        got = None
    assert peak <= allowed, (
        f"{kind}: a {len(buf)}-byte record peaked at {peak} bytes of Python memory "
        f"({peak / len(buf):.0f}x its length), above the documented budget of {allowed} bytes; it {outcome}"
    )


# --------------------------------------------------------------------------- datasets with workers


@pytest.mark.parametrize("kind", ["deep-tuple-key", "deep-tuple-20000"])
def test_dataset_workers_skip_hostile_record(tmp_path: Path, kind: str) -> None:
    """Promise: with on_error="skip" a hostile record is skipped and counted, and the loader goes
    on. With num_workers=2, the deep-tuple-key record kills its worker (SIGSEGV in the decoder:
    "DataLoader worker exited unexpectedly"), and a 20,000-deep tuple is decoded, then fails
    in the worker's collate/pickling with an error on_error cannot skip. Fix: fastload
    (nesting-depth bound, so both are refused with RecordDecodeError and skipped)."""
    raw = DEEP_KEY if kind == "deep-tuple-key" else torch_zip(hand(_deep_tuple(20_000)))
    store = store_with(tmp_path / "s", raw, good=3)  # records 0-2 good, 3 hostile, 4 good
    code = f"""
import torch
from tensorstore_pt import StoreIterableDataset
ds = StoreIterableDataset({str(store)!r}, on_error="skip")
n = 0
try:
    for _ in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
        n += 1
    print(json.dumps({{"ok": True, "n": n, "skipped": ds.skipped}}), flush=True)
except BaseException as e:
    print(json.dumps({{"ok": False, "n": n, "error": type(e).__name__, "msg": str(e)[:300]}}), flush=True)
"""
    rc, out, err, _ = run_child(code, 120)
    res = child_outcome(out)
    assert rc == 0 and res.get("ok"), f"on_error='skip' did not skip the hostile record: rc={rc} {res} {err[-300:]}"
    assert res["n"] == 4 and res["skipped"] == 1, f"expected 4 samples and 1 skip, got {res}"
