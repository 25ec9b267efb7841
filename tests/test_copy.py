"""copy_store / ``tspt cp``: byte-identical copies (golden fixtures of every format version
included), resume after an interruption, checksum failures at the source, refusing another
store at the destination, overwrite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from tensorstore_pt import (
    ChecksumMismatchError,
    CopyReport,
    InvalidOptionError,
    StoreExistsError,
    copy_store,
    open_store,
    verify_store,
    write_store,
)
from tensorstore_pt.cli import main
from tensorstore_pt.format import LOCK_NAME
from tensorstore_pt.storage import AtomicWriter, LocalStorage, ReadHandle

pytestmark = pytest.mark.timeout(120)

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_STORES = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("v*/*") if (p / "index.json").exists())
ROOT = Path(__file__).resolve().parents[1]


def files_of(store: Path) -> dict[str, bytes]:
    """Every file of a store directory but the writers' lock file, by name."""
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name != LOCK_NAME}


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_same_records(src: Path | str, dst: Path | str) -> None:
    a, b = open_store(src), open_store(dst)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert equal(a[i], b[i]), i


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A store of 10 shards with writer-token names (three writes)."""
    path = tmp_path_factory.mktemp("src") / "many"
    data = [{"x": torch.arange(300, dtype=torch.float32) * i, "i": torch.tensor(i)} for i in range(40)]
    for k in range(3):
        part = data[k * 14 : (k + 1) * 14]
        write_store(part, path, codec="zstd", max_shard_bytes=5000, mode="create" if k == 0 else "append")
    assert len(open_store(path).index.shards) >= 8
    return path


@pytest.mark.parametrize("fixture", FIXTURE_STORES)
def test_fixture_copies_byte_for_byte(fixture, tmp_path):
    src = FIXTURES / fixture
    dst = tmp_path / "copy"
    report = copy_store(src, dst, workers=3)
    assert files_of(dst) == files_of(src)  # shards, dictionary and index.json, each byte-identical
    index = open_store(src).index
    sizes = sum(p.stat().st_size for p in src.iterdir() if p.name != "index.json")
    assert report.shards == report.shards_copied == len(index.shards)
    assert report.files_copied == len(files_of(src)) - 1 and report.shards_skipped == report.files_skipped == 0
    assert report.bytes_copied == sizes
    assert report.index_checksum == f"xxh3_64:{xxhash.xxh3_64_intdigest((src / 'index.json').read_bytes()):016x}"
    assert report.index_written and report.verified and report.refetched == 0
    assert verify_store(dst).ok
    assert_same_records(src, dst)


def test_second_run_skips_everything_and_writes_nothing(many, tmp_path):
    dst = tmp_path / "copy"
    first = copy_store(many, dst)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.iterdir() if p.name != LOCK_NAME}
    again = copy_store(many, dst)
    assert again.shards_skipped == first.shards_copied == again.shards and again.shards_copied == 0
    assert again.bytes_copied == 0 and again.bytes_skipped == first.bytes_copied
    assert not again.index_written
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir() if p.name != LOCK_NAME} == mtimes
    assert files_of(dst) == files_of(many)


def test_progress_callback_and_report(many, tmp_path):
    seen: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen.append(n)

    report = copy_store(many, tmp_path / "copy", progress=progress, chunk_bytes=1000, verify=False)
    shard_bytes = sum(p.stat().st_size for p in many.iterdir() if p.name.endswith(".tspt"))
    assert sum(seen) == shard_bytes == report.bytes_copied
    assert max(seen) <= 1000  # streamed in chunks of at most chunk_bytes
    assert isinstance(report, CopyReport) and not report.verified and report.seconds > 0
    assert report.to_json()["shards_copied"] == report.shards


class FailingAfter(LocalStorage):
    """A destination whose shard commits fail after ``n`` succeeded (a crash, a lost connection)."""

    def __init__(self, root: Path, n: int) -> None:
        super().__init__(root)
        self.n = n
        self.commits = 0
        self.lock_ = threading.Lock()

    def writer(self, name: str, *, exclusive: bool = False, **kwargs: Any) -> AtomicWriter:
        inner = super().writer(name, exclusive=exclusive, **kwargs)
        outer = self

        class W(AtomicWriter):
            def write(self, data):
                inner.write(data)

            def commit(self):
                with outer.lock_:
                    if name.endswith(".tspt") and outer.commits >= outer.n:
                        inner.abort()
                        raise OSError(5, f"injected failure committing {name}")
                    outer.commits += 1
                inner.commit()

            def abort(self):
                inner.abort()

        return W()


def test_interrupted_copy_resumes_and_skips_the_done_shards(many, tmp_path):
    dst = tmp_path / "copy"
    with pytest.raises(OSError, match="injected failure"):
        copy_store(many, FailingAfter(dst, 4), workers=1)
    assert not (dst / "index.json").exists()  # nothing committed
    done = [n for n in files_of(dst) if n.endswith(".tspt")]
    assert len(done) == 4
    report = copy_store(many, dst, workers=3)
    assert report.shards_skipped == 4 and report.shards_copied == report.shards - 4
    assert files_of(dst) == files_of(many)
    assert verify_store(dst).ok
    assert_same_records(many, dst)


def test_copy_killed_mid_file_resumes(many, tmp_path):
    """A real SIGKILL while a file is being written: the finished shards are skipped, the
    killed one's temporary file is cleaned up, and the copy finishes."""
    dst = tmp_path / "copy"
    script = textwrap.dedent(
        """
        import os, signal, sys
        from tensorstore_pt import copy_store
        from tensorstore_pt.storage import AtomicWriter, LocalStorage

        class Killer(LocalStorage):
            commits = 0
            def writer(self, name, *, exclusive=False, **kwargs):
                inner = super().writer(name, exclusive=exclusive, **kwargs)
                outer = self
                class W(AtomicWriter):
                    def write(self, data):
                        inner.write(data)
                        if outer.commits >= 3:
                            os.kill(os.getpid(), signal.SIGKILL)
                    def commit(self):
                        inner.commit()
                        outer.commits += 1
                    def abort(self):
                        inner.abort()
                return W()

        copy_store(sys.argv[1], Killer(sys.argv[2]), workers=1, chunk_bytes=100)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(many), str(dst)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in dst.iterdir())
    assert "index.json" not in names
    assert len([n for n in names if n.endswith(".tspt") and not n.startswith(".")]) == 3
    assert any(".tmp-" in n for n in names)  # the file being written when it was killed
    report = copy_store(many, dst)
    assert report.shards_skipped == 3 and report.shards_copied == report.shards - 3
    assert not [p.name for p in dst.iterdir() if ".tmp-" in p.name]
    assert files_of(dst) == files_of(many)


def test_corrupt_source_shard_fails_with_both_digests_and_commits_nothing(many, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(many, src)
    index = open_store(src).index
    bad = index.shards[5]
    data = bytearray((src / bad.name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (src / bad.name).write_bytes(bytes(data))
    found = f"xxh3_64:{xxhash.xxh3_64_intdigest(bytes(data)):016x}"
    dst = tmp_path / "copy"
    with pytest.raises(ChecksumMismatchError) as info:
        copy_store(src, dst, workers=2)
    msg = str(info.value)
    assert bad.name in msg and f"xxh3_64:{bad.checksum:016x}" in msg and found in msg
    assert not (dst / "index.json").exists()
    assert not (dst / bad.name).exists()  # the damaged bytes were never published under its name
    assert not [p.name for p in dst.iterdir() if ".tmp-" in p.name]


class FlakySource(LocalStorage):
    """A source whose first read of ``name`` returns one flipped byte (damage in transit)."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root)
        self.name = name
        self.opens = 0

    def open(self, name: str) -> ReadHandle:
        inner = super().open(name)
        if name != self.name:
            return inner
        self.opens += 1
        if self.opens > 1:
            return inner

        class H(ReadHandle):
            def read_range(self, offset, length):
                data = bytearray(inner.read_range(offset, length))
                if offset == 0 and data:
                    data[-1] ^= 0xFF
                return bytes(data)

            def size(self):
                return inner.size()

            def close(self):
                inner.close()

        return H()


def test_damage_in_transit_is_fetched_again_once(many, tmp_path):
    name = open_store(many).index.shards[2].name
    src = FlakySource(many, name)
    report = copy_store(src, tmp_path / "copy", workers=2)
    assert src.opens == 2 and report.refetched == 1
    assert files_of(tmp_path / "copy") == files_of(many)


def test_another_store_at_destination_is_refused_then_overwritten(tmp_path):
    a, b = FIXTURES / "v1.0" / "zstd", FIXTURES / "v1.0" / "lz4"  # same legacy shard names, other bytes
    dst = tmp_path / "copy"
    copy_store(a, dst)
    before = files_of(dst)
    with pytest.raises(StoreExistsError, match="another store") as info:
        copy_store(b, dst)
    assert isinstance(info.value, FileExistsError)
    assert files_of(dst) == before  # nothing lost
    report = copy_store(b, dst, overwrite=True)
    assert files_of(dst) == files_of(b)
    assert report.removed == ()  # every old name is a name of the new store
    assert_same_records(b, dst)


def test_overwrite_removes_the_old_stores_files(many, tmp_path):
    dst = tmp_path / "copy"
    old = copy_store(FIXTURES / "v1.1" / "zstd-dict", dst)
    old_names = set(files_of(dst)) - {"index.json"}
    report = copy_store(many, dst, overwrite=True)
    assert set(report.removed) == old_names and len(old_names) == old.files_copied
    assert files_of(dst) == files_of(many)


def test_a_directory_of_other_files_is_refused(many, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not a partial copy"):
        copy_store(many, dst)
    assert files_of(dst) == {"notes.txt": b"mine"}


def test_bad_options_are_refused(many, tmp_path):
    with pytest.raises(InvalidOptionError, match="workers"):
        copy_store(many, tmp_path / "x", workers=0)
    with pytest.raises(InvalidOptionError, match="chunk_bytes"):
        copy_store(many, tmp_path / "x", chunk_bytes=0)
    with pytest.raises(InvalidOptionError, match="same location"):
        copy_store(many, many)
    assert not (tmp_path / "x").exists()


def test_cli_cp(many, tmp_path, capsys):
    dst = tmp_path / "copy"
    assert main(["cp", str(many), str(dst), "-q", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "copied 40 records" in out and "written last" in out
    assert main(["cp", str(many), str(dst), "-q"]) == 0
    assert "were already there and verified, skipped" in capsys.readouterr().out
    assert main(["cp", str(FIXTURES / "v1.0" / "none"), str(dst), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "v1.0" / "none", bad)
    shard = sorted(bad.glob("*.tspt"))[0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    assert main(["cp", str(bad), str(tmp_path / "c2"), "-q"]) == 1
    assert "DAMAGED" in capsys.readouterr().err


def test_cli_storage_options_go_to_their_side(many, tmp_path, capsys):
    # A local path takes no storage options: the side named in the error is the one given them.
    assert main(["cp", str(many), str(tmp_path / "c"), "-q", "--dst-storage-option", "anon=true"]) == 2
    err = capsys.readouterr().err
    assert "dst_storage_options" in err and "anon" in err
    assert main(["cp", str(many), str(tmp_path / "c"), "-q", "--src-storage-option", "anon=true"]) == 2
    assert "src_storage_options" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- object stores


def store_files(url: str, options: dict[str, Any] | None) -> dict[str, bytes]:
    """Every file of a store at any location but the lock file, by name (read through the seam)."""
    from tensorstore_pt.storage import storage_for

    st = storage_for(url, options)
    return {n: st.read_all(n) for n in st.list() if n != LOCK_NAME}


def check_copy(src: Path, url: str, options: dict[str, Any] | None) -> None:
    """The copy at ``url`` holds exactly the source's files, verifies clean and reads back equal."""
    assert store_files(url, options) == files_of(src)
    assert verify_store(url, storage_options=options).ok
    a, b = open_store(src), open_store(url, storage_options=options)
    assert len(a) == len(b) > 0
    assert equal(list(a[:]), list(b[:]))


def test_copies_between_local_memory_and_s3(many, s3_bucket, tmp_path):
    bucket, s3 = s3_bucket
    import uuid

    mem = f"memory://cp-{uuid.uuid4().hex[:8]}/store"
    steps = [
        (str(many), None, f"s3://{bucket}/a", s3),  # local -> s3
        (f"s3://{bucket}/a", s3, mem, {}),  # s3 -> memory
        (f"s3://{bucket}/a", s3, f"s3://{bucket}/b", s3),  # s3 -> s3
        (mem, {}, str(tmp_path / "local"), None),  # memory -> local
    ]
    n = len(open_store(many).index.shards)
    for src, src_opt, dst, dst_opt in steps:
        report = copy_store(src, dst, src_storage_options=src_opt, dst_storage_options=dst_opt, workers=3)
        assert (report.shards_copied, report.shards_skipped, report.index_written) == (n, 0, True), (src, dst)
        check_copy(many, dst, dst_opt)


def test_s3_copy_resumes_and_refuses_another_store(many, s3_bucket):
    from tensorstore_pt.storage import storage_for

    bucket, s3 = s3_bucket
    url = f"s3://{bucket}/store"
    copy_store(many, url, dst_storage_options=s3)
    st = storage_for(url, s3)
    names = [s.name for s in open_store(many).index.shards]
    for name in ("index.json", names[0], names[4], names[-1]):  # an interrupted copy's leftovers
        st.remove(name)
    report = copy_store(many, url, dst_storage_options=s3)
    assert (report.shards_skipped, report.shards_copied) == (len(names) - 3, 3)
    check_copy(many, url, s3)
    before = store_files(url, s3)
    with pytest.raises(StoreExistsError, match="another store"):
        copy_store(FIXTURES / "v1.0" / "none", url, dst_storage_options=s3)
    assert store_files(url, s3) == before


def test_cli_cp_to_and_from_s3(many, s3_bucket, tmp_path, capsys):
    bucket, s3 = s3_bucket
    opts = [f"endpoint_url={s3['endpoint_url']}", f"key={s3['key']}", f"secret={s3['secret']}"]
    to_s3 = ["cp", str(many), f"s3://{bucket}/x", "-q"] + [a for o in opts for a in ("--dst-storage-option", o)]
    assert main(to_s3) == 0
    both = [a for o in opts for a in ("--storage-option", o)]
    assert main(["cp", f"s3://{bucket}/x", f"s3://{bucket}/y", "-q"] + both) == 0
    back = ["cp", f"s3://{bucket}/y", str(tmp_path / "back"), "-q"]
    assert main(back + [a for o in opts for a in ("--src-storage-option", o)]) == 0
    assert "written last" in capsys.readouterr().out
    assert files_of(tmp_path / "back") == files_of(many)


# --------------------------------------------------------------------------- through a faulty network


@pytest.fixture
def s3_behind_proxy(many, s3_bucket):
    """``(url, storage_options through the proxy, proxy)``: ``many`` uploaded to moto, read back
    through a :class:`benchmarks.netproxy.NetProxy` with short client timeouts."""
    from benchmarks.netproxy import NetProxy

    bucket, s3 = s3_bucket
    url = f"s3://{bucket}/store"
    copy_store(many, url, dst_storage_options=s3, verify=False)
    host, port = s3["endpoint_url"].rsplit("//", 1)[1].split(":")
    with NetProxy(host, int(port)) as proxy:
        options = {
            **s3,
            "endpoint_url": proxy.url,
            "config_kwargs": {"read_timeout": 1, "connect_timeout": 1},
            "tspt_retries": 8,
            "tspt_retry_base_delay_s": 0.01,
        }
        yield url, options, proxy


@pytest.mark.parametrize(
    "rate, kinds, retries, reads",
    [(0.3, ("reset", "truncate", "stall", "503"), 8, 30), (0.7, ("reset", "truncate", "503"), 2, 20)],
    ids=["retries-mend", "retries-run-out"],
)
def test_reads_through_resets_truncations_stalls_and_503s_are_exact_or_typed(
    many, s3_behind_proxy, rate, kinds, retries, reads
):
    """Every ranged read through a network that resets, truncates, stalls and answers 503
    returns the exact bytes or raises RemoteStorageError naming the URL and file: never wrong
    bytes. With few faults the retries mend them all; with many, some reads run out of
    retries and say so."""
    import random

    from benchmarks.netproxy import FaultSchedule
    from tensorstore_pt import RemoteStorageError
    from tensorstore_pt.storage import FsspecStorage

    url, options, proxy = s3_behind_proxy
    local = {p.name: p.read_bytes() for p in many.iterdir() if p.name.endswith(".tspt")}
    st = FsspecStorage(url, {**options, "tspt_retries": retries})
    handles = {name: st.open(name) for name in local}  # sizes from one clean listing
    proxy.reset_stats()
    proxy.faults = FaultSchedule(seed=5, rate=rate, kinds=kinds, after_bytes=(0, 3000), stall_s=3.0)
    rng = random.Random(1)
    outcomes = {"exact": 0, "typed": 0}
    for _ in range(int(os.environ.get("TSPT_FAULT_READS", reads))):
        name = rng.choice(sorted(local))
        data = local[name]
        off = rng.randrange(len(data))
        length = rng.randint(1, len(data) - off)
        try:
            got = handles[name].read_range(off, length)
        except RemoteStorageError as exc:
            assert url in str(exc) and name in str(exc) and "retries exhausted" in str(exc)
            outcomes["typed"] += 1
            continue
        assert got == data[off : off + length], (name, off, length)
        outcomes["exact"] += 1
    stats = proxy.stats()
    assert sum(stats.faults.values()) >= 5, stats  # the schedule did inject faults
    assert outcomes["exact"] > 0
    if rate < 0.5:
        assert outcomes["typed"] == 0, outcomes
    else:
        assert outcomes["typed"] > 0, outcomes


def test_cp_from_s3_through_a_faulty_network_is_byte_identical(many, s3_behind_proxy, tmp_path):
    from benchmarks.netproxy import FaultSchedule

    url, options, proxy = s3_behind_proxy
    proxy.faults = FaultSchedule(seed=9, rate=0.25, kinds=("reset", "truncate", "503"), after_bytes=(0, 2000))
    proxy.latency_ms = 5
    report = copy_store(url, tmp_path / "copy", src_storage_options=options, workers=3)
    assert sum(proxy.stats().faults.values()) >= 3
    assert report.shards_copied == report.shards
    assert files_of(tmp_path / "copy") == files_of(many)


def test_a_damaged_or_missing_file_of_a_committed_copy_is_repaired(many, tmp_path):
    dst = tmp_path / "copy"
    copy_store(many, dst)
    names = [s.name for s in open_store(many).index.shards]
    (dst / names[1]).unlink()
    damaged = bytearray((dst / names[2]).read_bytes())
    damaged[100] ^= 0x10
    (dst / names[2]).write_bytes(bytes(damaged))
    assert not verify_store(dst).ok
    report = copy_store(many, dst)
    assert (report.shards_copied, report.shards_skipped, report.index_written) == (2, len(names) - 2, False)
    assert files_of(dst) == files_of(many)


def test_a_destination_held_by_a_writer_is_refused(many, tmp_path):
    from tensorstore_pt import StoreBusyError

    dst = tmp_path / "copy"
    dst.mkdir()
    with LocalStorage(dst).lock({"pid": os.getpid(), "host": "here", "role": "writer"}):
        with pytest.raises(StoreBusyError):
            copy_store(many, dst)
    assert [p.name for p in dst.iterdir()] == [LOCK_NAME]
    copy_store(many, dst)
    assert files_of(dst) == files_of(many)
