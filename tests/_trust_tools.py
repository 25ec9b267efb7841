"""Helpers for the issue 10 trust suites (``test_trust.py``, ``test_trust_campaign.py``).

- :func:`tagged` / :func:`identify` / :func:`check_sample`: samples whose values say which
  version and original position they came from, so a wrong read is always caught.
- :class:`FullDiskStorage`: a :class:`LocalStorage` whose writes fail with ``OSError(ENOSPC)``
  after a byte budget, like a full disk (the error names the *temporary* file, as the OS
  would: the library must translate it into ``StorageFullError`` naming the final file).
- Mutations for the damage campaign: byte flips, truncations, zeroed 4 KiB pages, one-field
  edits of ``index.json``, deleted shards.
- :func:`readable_records`: how many records a store gives back before recovery.
- :func:`new_error`: a name issue 10 adds to ``tensorstore_pt``, or a clear test failure
  when it is not there yet (so only the tests that need it fail).
"""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tensorstore_pt as ts
from strategies import assert_identical
from tensorstore_pt.checksums import digest_int
from tensorstore_pt.storage import LocalStorage, TEMP_MARKER

#: The lock file of issue 10 (spec: ".tspt-lock"); never a store file, ignored by checks.
LOCK_NAME = ".tspt-lock"
#: Suffix of quarantined files (spec: "renamed NAME.quarantined").
QUARANTINED = ".quarantined"


def new_error(name: str) -> type[BaseException]:
    """The exception class ``tensorstore_pt.<name>`` that issue 10 adds; fail the test if absent."""
    cls = getattr(ts, name, None)
    if cls is None:
        pytest.fail(f"tensorstore_pt.{name} does not exist yet (issue 10 adds it)")
    assert issubclass(cls, ts.TensorStoreError), f"{name} must derive from TensorStoreError"
    return cls


# --------------------------------------------------------------------------- samples


def tagged(i: int, version: int = 0) -> dict[str, torch.Tensor]:
    """Record ``i`` of version ``version``: sizes vary with ``i``; every value names (version, i)."""
    k = 8 + (i * 7) % 41
    return {"x": torch.full((k,), i, dtype=torch.int64), "v": torch.tensor(version, dtype=torch.int64)}


def tagged_list(n: int, version: int = 0) -> list[dict[str, torch.Tensor]]:
    return [tagged(i, version) for i in range(n)]


def identify(sample: Any) -> tuple[int, int]:
    """(version, position) a record read back claims to be; AssertionError if it is not one of ours."""
    assert isinstance(sample, dict) and set(sample) == {"x", "v"}, f"not a tagged sample: {sample!r}"
    x = sample["x"]
    assert x.dim() == 1 and x.numel() >= 1, f"not a tagged sample: {sample!r}"
    return int(sample["v"]), int(x[0])


def check_sample(got: Any, where: str) -> tuple[int, int]:
    """Check that ``got`` is bit-identical to the tagged sample it claims to be; return (version, i)."""
    version, i = identify(got)
    assert_identical(tagged(i, version), got, where=where, layout=False)
    return version, i


# --------------------------------------------------------------------------- store views


def store_files(store: Path) -> list[str]:
    """Names in the store directory, without the lock file."""
    return sorted(n for n in os.listdir(store) if n != LOCK_NAME) if store.is_dir() else []


def digests(store: Path, skip: tuple[str, ...] = (LOCK_NAME,)) -> dict[str, int]:
    return {
        n: digest_int((store / n).read_bytes()) for n in store_files(store) if n not in skip and (store / n).is_file()
    }


def readable_tagged(store: Path, versions: set[int]) -> list[tuple[int, int]]:
    """(version, position) of every record ``open_store(store, verify=False)[i]`` returns.

    An unopenable store gives []. Any read that returns *wrong* data (another position, a
    version outside ``versions``, or records of two versions from one reader), or fails with
    an error that is not a :class:`TensorStoreError`, fails the test: the reader must never
    do either.
    """
    try:
        r = ts.open_store(store, verify=False)
    except ts.TensorStoreError:
        return []
    out = []
    seen_versions = set()
    for i in range(len(r)):
        try:
            got = r[i]
        except ts.TensorStoreError:
            continue
        v, pos = check_sample(got, f"{store}[{i}]")
        assert pos == i and v in versions, f"{store}[{i}] returned record {pos} of version {v}: wrong data"
        seen_versions.add(v)
        out.append((v, pos))
    r.close()
    assert len(seen_versions) <= 1, f"one reader returned records of versions {seen_versions}"
    return out


def readable_records(store: Path, version: int = 0) -> list[int]:
    """Positions ``i`` for which ``open_store(store, verify=False)[i]`` returns sample ``i`` of
    ``version`` (see :func:`readable_tagged`)."""
    return [pos for _, pos in readable_tagged(store, {version})]


def recovered_positions(store: Path) -> list[tuple[int, int]]:
    """(version, original position) of every record of a (recovered) store, each checked bit for bit."""
    r = ts.open_store(store)
    out = [check_sample(r[j], f"{store}[{j}]") for j in range(len(r))]
    r.close()
    return out


def assert_never_deleted(before: dict[str, int], store: Path) -> None:
    """Every file there before is still there, under its name or quarantined, with its bytes.

    ``index.json`` is exempt from the content check (recover may rewrite it).
    """
    after_names = set(os.listdir(store))
    after_digests = {}
    for n in after_names:
        p = store / n
        if p.is_file():
            after_digests.setdefault(digest_int(p.read_bytes()), []).append(n)
    for name, d in before.items():
        q = name.lstrip(".") + QUARANTINED
        present = name in after_names or any(a == q or a.startswith(q + "-") for a in after_names)
        if not present and TEMP_MARKER in name:
            # A dead writer's complete temporary shard renamed to its final name (docs/integrity.md).
            final = name.lstrip(".").split(TEMP_MARKER)[0]
            present = final in after_digests.get(d, [])
        assert present, f"recover deleted {name!r}: neither it nor {q!r} is in the store ({sorted(after_names)})"
        if name != "index.json":
            assert d in after_digests, f"the bytes of {name!r} are nowhere in the store any more (changed or deleted)"


# --------------------------------------------------------------------------- full disk


class _FullWriter:
    """Wraps a LocalStorage writer; fails like a full disk once the storage's budget is spent."""

    def __init__(self, inner: Any, storage: FullDiskStorage, name: str) -> None:
        self._inner = inner
        self._storage = storage
        self._name = name

    def _fail(self) -> None:
        tmp = getattr(self._inner, "_tmp", None) or f".{self._name}{TEMP_MARKER}x"
        self._storage.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        room = self._storage.budget - self._storage.written
        if self._storage.budget >= 0 and n > room:
            if room > 0:
                self._inner.write(bytes(data)[:room])  # a real disk takes what fits
                self._storage.written += room
            self._fail()
        self._inner.write(data)
        self._storage.written += n

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()

    def __enter__(self) -> _FullWriter:
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()


class FullDiskStorage(LocalStorage):
    """A directory whose files fail with ENOSPC after ``budget`` bytes (all writers together).

    ``budget < 0`` never fails: use it to count what an operation writes (``written``).
    """

    def __init__(self, root: str | os.PathLike[str], budget: int = -1) -> None:
        super().__init__(root)
        self.budget = budget
        self.written = 0
        self.failures = 0

    def writer(self, name: str, *, exclusive: bool = False) -> Any:
        return _FullWriter(super().writer(name, exclusive=exclusive), self, name)


# --------------------------------------------------------------------------- mutations


def shard_names(store: Path) -> list[str]:
    return [n for n in store_files(store) if n.endswith(".tspt") and not n.startswith(".")]


def flip_byte(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset % len(b)] ^= 0x5A
    path.write_bytes(bytes(b))


def truncate_to(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(0, size))


def zero_page(path: Path, page: int) -> None:
    """Zero the 4 KiB page ``page`` (clipped to the file)."""
    b = bytearray(path.read_bytes())
    start = (page * 4096) % max(1, len(b))
    start -= start % 4096
    end = min(len(b), start + 4096)
    b[start:end] = bytes(end - start)
    path.write_bytes(bytes(b))


#: Index fields the damage campaign edits (top-level "format", "format_version" and
#: "checksum" are left alone: a changed version is "a newer store", which recover leaves alone).
def _index_leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not path and k in ("format", "format_version", "checksum"):
                continue
            out += _index_leaves(v, path + (k,))
        if path:
            out.append((path, obj))
    elif isinstance(obj, list):
        for k, v in enumerate(obj):
            out += _index_leaves(v, path + (k,))
        out.append((path, obj))
    else:
        out.append((path, obj))
    return out


def _edited(value: Any, rng: random.Random, codec_ids: tuple[str, ...] = ("none", "zstd", "lz4")) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1 if value > 0 else value + 2, 0 if value else 1, value * 2 + 1])
    if isinstance(value, str):
        if value in codec_ids:
            return rng.choice([c for c in codec_ids if c != value])
        if value.endswith(".tspt"):
            return value.replace("shard-", "shard-x", 1)
        if value.startswith("xxh3_64:"):
            return "xxh3_64:" + ("0" * 16 if value[-16:] != "0" * 16 else "1" * 16)
        return value + "x"
    if isinstance(value, list):
        return [] if value else ["zstd-dictionary"]
    if isinstance(value, dict):
        return {}
    return None


def edit_index_field(store: Path, rng: random.Random) -> str:
    """Change one field of a parseable index.json; return a description."""
    p = store / "index.json"
    try:
        obj = json.loads(p.read_text())
    except ValueError:  # an earlier mutation broke the JSON: damage it further instead
        off = rng.randrange(p.stat().st_size)
        flip_byte(p, off)
        return f"index.json (not JSON): flipped byte {off}"
    leaves = [(path, v) for path, v in _index_leaves(obj) if path]
    path, value = rng.choice(leaves)
    new = _edited(value, rng)
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = new
    p.write_text(json.dumps(obj, indent=1))
    return f"index.json {'/'.join(map(str, path))}: {value!r} -> {new!r}"


def mutate(store: Path, rng: random.Random) -> str:
    """One random mutation of a store's files; return a description."""
    shards = shard_names(store)
    kind = rng.choice(["flip", "flip", "truncate", "zero_page", "index_field", "index_field", "index_flip", "delete"])
    if kind in ("index_field", "index_flip") or not shards:
        if kind == "index_flip":
            p = store / "index.json"
            off = rng.randrange(p.stat().st_size)
            flip_byte(p, off)
            return f"index.json: flipped byte {off}"
        return edit_index_field(store, rng)
    name = rng.choice(shards)
    p = store / name
    size = p.stat().st_size
    if kind == "flip":
        off = rng.randrange(size)
        flip_byte(p, off)
        return f"{name}: flipped byte {off} of {size}"
    if kind == "truncate":
        new = rng.choice([size - 1, size - 40, size // 2, rng.randrange(size)])
        truncate_to(p, new)
        return f"{name}: truncated {size} -> {max(0, new)} bytes"
    if kind == "zero_page":
        page = rng.randrange(max(1, (size + 4095) // 4096))
        zero_page(p, page)
        return f"{name}: zeroed 4 KiB page {page}"
    p.unlink()
    return f"{name}: deleted"


def campaign_runs(default: int) -> int:
    """Runs of a campaign: ``default``, or TSPT_CAMPAIGN=N for a bigger run."""
    value = os.environ.get("TSPT_CAMPAIGN")
    return int(value) if value else default


def run_with(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except BaseException as exc:  # noqa: BLE001 - the caller asserts on the type
        return None, exc


def fork_and_kill(fn: Callable[[], Any], delay: float | None) -> int:
    """Run ``fn`` in a forked child (torch on one thread); SIGKILL it after ``delay`` seconds,
    or let it end (or die by itself) when ``delay`` is None. Returns its wait status."""
    import signal
    import time
    import traceback

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            torch.set_num_threads(1)
            fn()
            code = 0
        except BaseException:  # noqa: BLE001 - reported, then the child exits with 1
            traceback.print_exc()
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    return status
