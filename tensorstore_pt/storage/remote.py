"""Stores at fsspec URLs: ``s3://``, ``gs://``, ``memory://``, ``file://`` (any fsspec
file system), and ``http(s)://`` read-only.

Requests (one line each, ``N`` = shards):

- :meth:`FsspecStorage.list` and :meth:`FsspecStorage.sizes`: one listing call (``ls``).
- :meth:`FsspecStorage.open`: no request when the name is in this storage's last listing,
  else one ``HEAD``; ``read_range``: one ranged ``GET``.
- :meth:`FsspecStorage.writer`: the bytes are spooled to a local temporary file (bounded
  memory; the spool needs the file's size in free local disk: ENOSPC there raises
  :class:`~tensorstore_pt.errors.StorageFullError` naming the spool; the spool file of a writer
  that died is removed by the next writer's sweep of that directory), and ``commit()`` uploads them
  under the final name: one ``PUT``, or an S3 multipart upload for files of 100 MiB or more
  (s3fs ``put_file``: parts of at least 50 MiB).

Retries: transient failures (timeouts, HTTP 5xx, 408, 429 and throttling codes, connection
resets and aborts, short reads of an object known to be longer) are retried with exponential
backoff and full jitter, at most ``retries`` times after the first attempt and never past
``retry_deadline_s`` seconds from the first attempt. A permanent failure (403, a 404 in the
middle of a read, retries exhausted) raises :class:`~tensorstore_pt.errors.RemoteStorageError`
naming the URL, the file and the byte range, chained from the backend's error. These
settings are the storage options ``tspt_retries`` (int, default 5), ``tspt_retry_deadline_s``
(float, default 60) and ``tspt_retry_base_delay_s`` (float, default 0.1; delay before retry
``k`` is uniform in ``[0, min(base * 2**k, 5 s))``), or the constructor's keyword arguments.

s3fs and botocore retry on their own too (s3fs up to 5 attempts for network errors, botocore
up to 5 for 5xx and throttling): 25 attempts under each of ours. Unless the storage options
set ``config_kwargs.retries`` themselves, :class:`FsspecStorage` turns both off (botocore
``total_max_attempts=1``, s3fs ``retries=1``) so that the bound above is the whole bound.
Each attempt is also bounded by botocore's timeouts (s3fs defaults: connect 5 s, read 15 s).

Commit atomicity and concurrent writers (see docs/remote.md):

- ``writer(name, exclusive=True)`` never replaces an object: on S3 the upload carries
  ``If-None-Match: *`` (refused with 412 if the key exists); elsewhere the key is checked,
  then written (a race window of one request remains).
- ``writer(name, if_match=version)`` replaces ``name`` only if it is still the version read
  by :meth:`FsspecStorage.read_versioned` (S3 ``If-Match`` on the ETag). Backends without
  conditional writes (``memory://``, ``gs://`` in this version) return ``None`` versions and
  write unconditionally; the writer's compare-before-commit then leaves a window of one
  request.
- Object stores have no locks: :meth:`FsspecStorage.lock` returns an unsupported
  :class:`~tensorstore_pt.storage.abc.StoreLock`.

Thread and fork safety: the storage may be used from many threads. It pickles to its URL,
storage options and retry settings; the receiving process builds its own file system.
``memory://`` stores live in the memory of one process (a forked child sees a copy, a
spawned one sees nothing).
"""

from __future__ import annotations

import errno
import fcntl
import http.client
import importlib
import os
import posixpath
import random
import socket
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

from .._forksafe import ChildLock
from ..errors import (
    BackendNotInstalledError,
    ConcurrentWriteError,
    InvalidOptionError,
    NotARegularFileError,
    ReadOnlyStoreError,
    RemoteStorageError,
    StoreNotFoundError,
)
from .abc import FULL_ERRNOS, AtomicWriter, ReadHandle, Storage, StoreLock, full_disk_error

__all__ = ["FsspecStorage", "DEFAULT_RETRIES", "DEFAULT_RETRY_DEADLINE_S", "DEFAULT_RETRY_BASE_DELAY_S"]

#: Retries after the first attempt of one request.
DEFAULT_RETRIES = 5
#: Seconds from the first attempt after which no retry is started.
DEFAULT_RETRY_DEADLINE_S = 60.0
#: Base of the exponential backoff (seconds).
DEFAULT_RETRY_BASE_DELAY_S = 0.1
#: Largest backoff before one retry (seconds).
MAX_RETRY_DELAY_S = 5.0

#: protocol -> (module that implements it, extra that installs it)
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs"})
_READ_ONLY = frozenset({"http", "https"})
_OPTION_PREFIX = "tspt_"
#: Serializes FsspecStorage.fs's rebuild in a forked child; made afresh in every child (a lock
#: the parent's threads held at the fork would stay held there).
_REBUILD_LOCK = ChildLock()
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError", "ServiceUnavailable"}
)

T = TypeVar("T")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [TimeoutError, ConnectionError, socket.timeout, http.client.IncompleteRead]
    for module, names in (
        ("fsspec.exceptions", ("FSTimeoutError",)),
        ("botocore.exceptions", ("HTTPClientError", "ResponseStreamingError", "ResponseParserError")),
        ("aiohttp", ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types.extend(getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type))
    return tuple(types)


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 8 and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _http_status(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of a backend error, from botocore's or aiohttp's error."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return (int(status) if status else None), code
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status, None
    return None, None


def _is_transient(exc: BaseException) -> bool:
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    status, code = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
    if code in _TRANSIENT_CODES:
        return True
    for e in _chain(exc):
        if isinstance(e, (_ShortRead, *_TRANSIENT)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)):
            return True  # s3fs's translation of ServiceUnavailable / SlowDown / InternalError
    return False


def _precondition_failed(exc: BaseException) -> bool:
    status, code = _http_status(exc)
    return status == 412 or code == "PreconditionFailed"


class _ShortRead(OSError):
    """A ranged GET returned fewer bytes than the object holds (retried)."""


#: Bytes asked of a response body at a time where its length is not known in advance.
_BODY_PIECE_BYTES = 8 * 2**20


class _TooLarge(ValueError):
    """An object is larger than the caller's ``max_bytes`` (passed through, never retried)."""


def _nest(options: dict[str, Any]) -> dict[str, Any]:
    """Copy ``options`` (dicts copied one level deep, so defaults can be merged in)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}


class FsspecStorage(Storage):
    """A store at an fsspec URL (see the module docstring for requests, retries and atomicity).

    Args:
        url: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name``,
            ``file:///path``, ``https://host/path`` (read-only) or any fsspec URL.
        storage_options: Keyword arguments of the fsspec file system (``endpoint_url``,
            ``key``, ``secret``, ``anon``, ``client_kwargs``...); keys starting with ``tspt_``
            are this class's own: ``tspt_retries``, ``tspt_retry_deadline_s``,
            ``tspt_retry_base_delay_s``, ``tspt_spool_dir`` (where writers spool; default the
            system temporary directory). Credentials not given here come from the backend's
            usual environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...).
        retries, retry_deadline_s, retry_base_delay_s: Override the ``tspt_`` options.

    Raises:
        BackendNotInstalledError: The URL's backend package (s3fs, gcsfs) is not installed;
            the message names the extra to install.
        InvalidOptionError: A bad URL or retry option.
    """

    #: Ranged GETs a bulk read keeps in flight: each waits out one request's latency (tens of
    #: milliseconds on an object store), so a batch of random records costs about one round
    #: trip per 16 shards touched instead of one per record (each GET is a stateless
    #: ``cat_file``: thread-safe).
    read_concurrency = 16

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retries: int | None = None,
        retry_deadline_s: float | None = None,
        retry_base_delay_s: float | None = None,
    ) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise InvalidOptionError(f"url: expected an fsspec URL like 's3://bucket/prefix', found {url!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise InvalidOptionError(f"storage_options: expected a dict, found {type(storage_options).__name__}")
        scheme, _, rest = url.partition("://")
        if not scheme or not rest.strip("/"):
            # "s3://" stripped of its slashes would be "s3:", a relative local path
            raise InvalidOptionError(
                f"url: expected a scheme and a location such as 's3://bucket/prefix' or 'memory://name', found {url!r}"
            )
        if "::" in url:
            raise InvalidOptionError(
                f"url: expected one fsspec URL, found {url!r}: fsspec reads '::' as a chain of file systems "
                "('simplecache::s3://...'), which stores do not support, so a key with '::' in it cannot be addressed"
            )
        self.url = url.rstrip("/")
        self.location = self.url
        self.storage_options = dict(storage_options or {})
        _check_option_types(self.storage_options, _protocol(url))
        own = {k[len(_OPTION_PREFIX) :]: v for k, v in self.storage_options.items() if k.startswith(_OPTION_PREFIX)}
        unknown = set(own) - {"retries", "retry_deadline_s", "retry_base_delay_s", "spool_dir"}
        if unknown:
            raise InvalidOptionError(
                f"storage_options: unknown option(s) {sorted(_OPTION_PREFIX + k for k in unknown)}; expected "
                "tspt_retries, tspt_retry_deadline_s, tspt_retry_base_delay_s or tspt_spool_dir"
            )
        self.retries = _check_number(
            retries if retries is not None else own.get("retries", DEFAULT_RETRIES), "retries", int
        )
        self.retry_deadline_s = _check_number(
            retry_deadline_s if retry_deadline_s is not None else own.get("retry_deadline_s", DEFAULT_RETRY_DEADLINE_S),
            "retry_deadline_s",
            float,
        )
        self.retry_base_delay_s = _check_number(
            retry_base_delay_s
            if retry_base_delay_s is not None
            else own.get("retry_base_delay_s", DEFAULT_RETRY_BASE_DELAY_S),
            "retry_base_delay_s",
            float,
        )
        self.spool_dir = own.get("spool_dir")
        if self.spool_dir is not None and (
            not isinstance(self.spool_dir, (str, os.PathLike)) or not os.path.isdir(self.spool_dir)
        ):
            raise InvalidOptionError(
                f"{_OPTION_PREFIX}spool_dir: expected an existing local directory, found {self.spool_dir!r}"
            )
        self.protocol = _protocol(self.url)
        self.read_only = self.protocol in _READ_ONLY
        self.object_store = self.protocol in _OBJECT_STORES
        self.conditional_writes = self.protocol in ("s3", "s3a")
        self._fs, self._root = self._make_fs()
        self._pid = os.getpid()
        self._listed: dict[str, dict[str, Any]] = {}
        self._listed_lock = threading.Lock()

    def _make_fs(self) -> tuple[Any, str]:
        backend = _BACKENDS.get(self.protocol)
        if backend is not None:
            try:
                importlib.import_module(backend[0])
            except ImportError as exc:
                raise BackendNotInstalledError(
                    f"store {self.url!r}: {self.protocol}:// URLs need the package {backend[0]!r}, which is not "
                    f"installed; install it with: pip install 'tensorstore_pt[{backend[1]}]'"
                ) from exc
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a dependency of every extra
            raise BackendNotInstalledError(
                f"store {self.url!r}: URLs need fsspec; install it with: pip install 'tensorstore_pt[s3]'"
            ) from exc
        options = {k: v for k, v in _nest(self.storage_options).items() if not k.startswith(_OPTION_PREFIX)}
        own_retries = False
        if self.protocol in ("s3", "s3a") and "retries" not in options.get("config_kwargs", {}):
            options.setdefault("config_kwargs", {})["retries"] = {"total_max_attempts": 1, "mode": "standard"}
            own_retries = True
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise BackendNotInstalledError(
                f"store {self.url!r}: fsspec has no installed backend for {self.protocol}:// ({exc})"
            ) from exc
        except (ValueError, TypeError) as exc:
            raise InvalidOptionError(f"store {self.url!r}: bad URL or storage_options ({exc})") from exc
        if own_retries:
            fs.retries = 1  # this instance is keyed by the options above, which only we build
        return fs, root.rstrip("/")

    @property
    def fs(self) -> Any:
        """This process's fsspec file system (rebuilt in a forked child: an async backend's
        event loop and connections belong to the process that made them). Rebuilt once, by
        the first of the child's threads to ask (a bulk read's reads in flight all ask at
        once); the others wait for it."""
        if self._pid != os.getpid():
            with _REBUILD_LOCK:
                if self._pid != os.getpid():
                    self._fs, self._root = self._make_fs()
                    self._listed_lock = threading.Lock()
                    self._pid = os.getpid()  # last: a thread that sees it sees the new file system
        return self._fs

    # ------------------------------------------------------------------ pickling

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self.url, self.storage_options, self.retries, self.retry_deadline_s, self.retry_base_delay_s),
        )

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    # ------------------------------------------------------------------ requests and retries

    def _path(self, name: str) -> str:
        return posixpath.join(self._root, name) if self._root else name

    def _where(self, name: str | None, byte_range: tuple[int, int] | None = None) -> str:
        w = f"store {self.url!r}"
        if name is not None:
            w += f", file {name!r}"
        if byte_range is not None:
            w += f", bytes [{byte_range[0]}, {byte_range[1]})"
        return w

    def call(
        self,
        what: str,
        name: str | None,
        fn: Callable[[], T],
        *,
        byte_range: tuple[int, int] | None = None,
        missing_ok: bool = True,
        on_retry_error: Callable[[BaseException], T] | None = None,
    ) -> T:
        """Run one request with the retry policy.

        Args:
            what: The request in words (``"read"``, ``"list"``...), for messages.
            name: The file it concerns (None for the location itself).
            fn: Makes the request.
            byte_range: The half-open byte range read, for messages.
            missing_ok: A ``FileNotFoundError`` passes through as is (True), or becomes a
                :class:`RemoteStorageError` with errno ENOENT (False: the object vanished
                mid-read).
            on_retry_error: Called with a non-transient error met on a retry (not on the
                first attempt); its result is returned (for "did my earlier attempt land?").

        Raises:
            RemoteStorageError: A permanent failure, or retries exhausted.
            FileNotFoundError, FileExistsError: Passed through (see ``missing_ok``).
        """
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except (FileExistsError, ConcurrentWriteError) as exc:
                if attempt and on_retry_error is not None:
                    return on_retry_error(exc)
                raise
            except FileNotFoundError as exc:
                if missing_ok and not isinstance(exc, RemoteStorageError):
                    raise
                raise self._error(what, name, byte_range, exc, attempt) from exc
            except (RemoteStorageError, ReadOnlyStoreError, _TooLarge):
                raise
            except Exception as exc:  # noqa: BLE001 - every backend error is classified here
                transient = _is_transient(exc)
                if not transient and attempt and on_retry_error is not None:
                    return on_retry_error(exc)
                delay = random.uniform(0, min(self.retry_base_delay_s * 2**attempt, MAX_RETRY_DELAY_S))
                if not transient or attempt >= self.retries or time.monotonic() - start + delay > self.retry_deadline_s:
                    raise self._error(what, name, byte_range, exc, attempt, transient) from exc
                attempt += 1
                time.sleep(delay)

    def _error(
        self,
        what: str,
        name: str | None,
        byte_range: tuple[int, int] | None,
        exc: BaseException,
        attempt: int,
        transient: bool = False,
    ) -> RemoteStorageError:
        status, code = _http_status(exc)
        detail = f"HTTP {status}" + (f" {code}" if code else "") if status else type(exc).__name__
        why = (
            f"still failing after {attempt + 1} attempts (retries exhausted)"
            if transient
            else "a permanent error (not retried)"
        )
        err = getattr(exc, "errno", None) or (errno.ENOENT if isinstance(exc, FileNotFoundError) else errno.EIO)
        return RemoteStorageError(err, f"{self._where(name, byte_range)}: {what} failed, {why}: {detail}: {exc}")

    def _refuse_write(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(
                f"store {self.url!r}: {self.protocol}:// stores are read-only; cannot {what} (write to s3://, gs://, "
                "memory:// or a local path instead)"
            )

    # ------------------------------------------------------------------ Storage API: the location

    def _root_info(self) -> dict[str, Any] | None:
        def info() -> dict[str, Any]:
            self._invalidate(self._root)
            return self.fs.info(self._root)

        try:
            return self.call("stat", None, info)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        """Whether the URL holds anything: an object, or a prefix with objects under it.

        For ``http(s)://``: whether ``<url>/index.json`` answers.
        """
        if self.read_only:
            return self._http_has_index()
        return self._root_info() is not None

    def is_container(self) -> bool:
        """Whether the URL is a prefix (``directory``) holding objects (not one object)."""
        if self.read_only:
            return self._http_has_index()
        info = self._root_info()
        if info is None:
            return False
        if info.get("type") == "directory":
            return True
        # On S3/GCS a key can be an object ("p") and a prefix with objects under it ("p/...") at
        # once; a store at the URL is the prefix, so the prefix decides.
        return self.object_store and self._prefix_has_objects()

    def _prefix_has_objects(self) -> bool:
        under = self._root + "/"

        def ls() -> list[Any]:
            self._invalidate(self._root)
            return self.fs.ls(self._root, detail=False)

        try:
            names = self.call("list", None, ls)
        except FileNotFoundError:
            return False
        return any(str(n).startswith(under) for n in names)

    def _http_has_index(self) -> bool:
        try:
            self.call("stat", "index.json", lambda: self.fs.info(self._path("index.json")))
        except FileNotFoundError:
            return False
        return True

    def ensure(self) -> bool:
        """Make the location writable. Object stores need no prefix object: nothing is
        created (returns False) but the bucket must exist.

        Raises:
            StoreNotFoundError: The bucket does not exist (buckets are never created here).
            ReadOnlyStoreError: An ``http(s)://`` URL.
        """
        self._refuse_write("create a store")
        if self.exists():
            return False
        if self.object_store:
            bucket = self._root.split("/", 1)[0]
            try:
                found = self.call("stat", None, lambda: self.fs.exists(bucket))
            except FileNotFoundError:
                found = False
            if not found:
                raise StoreNotFoundError(
                    f"store {self.url!r}: the bucket {bucket!r} does not exist (or is not visible with these "
                    "credentials); create it first"
                )
            return False
        self.call("create", None, lambda: self.fs.makedirs(self._root, exist_ok=True))
        return True

    def remove_container(self) -> None:
        """Remove an empty prefix marker (``memory://``, ``file://``); a no-op on object stores."""
        if self.object_store or self.read_only:
            return
        try:
            if not self.fs.ls(self._root, detail=False):
                self.fs.rmdir(self._root)
        except OSError:
            pass

    def _invalidate(self, path: str | None = None) -> None:
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - a cache is never a reason to fail  # pragma: no cover
            pass

    # ------------------------------------------------------------------ Storage API: listing

    def _listing(self) -> dict[str, dict[str, Any]]:
        """One ``ls`` of the location: name -> fsspec info (also kept for :meth:`open`)."""
        if self.read_only:
            entries = self._http_listing()
        else:

            def ls() -> list[dict[str, Any]]:
                self._invalidate(self._root)
                return self.fs.ls(self._root, detail=True)

            try:
                entries = self.call("list", None, ls)
            except FileNotFoundError:
                entries = []
        listed = {}
        for e in entries:
            name = posixpath.basename(str(e.get("name", "")).rstrip("/"))
            if name:
                listed[name] = e
        with self._listed_lock:
            self._listed = listed
        return listed

    def _http_listing(self) -> list[dict[str, Any]]:
        """HTTP has no listing: the index and the files it names (one HEAD each)."""
        import json

        try:
            raw = self.call("read", "index.json", lambda: self.fs.cat_file(self._path("index.json")))
        except FileNotFoundError:
            return []
        entries = [{"name": self._path("index.json"), "size": len(raw), "type": "file"}]
        try:
            index = json.loads(raw)
            names = [s["name"] for s in index.get("shards", [])]
            dict_name = index.get("codec", {}).get("dict", {}).get("name")
        except (ValueError, TypeError, KeyError, AttributeError):
            return entries
        for name in names + ([dict_name] if dict_name else []):
            if isinstance(name, str) and "/" not in name:
                try:
                    entries.append(self.call("stat", name, lambda n=name: self.fs.info(self._path(n))))
                except FileNotFoundError:
                    pass
        return entries

    def list(self) -> list[str]:
        """Names at the location, sorted (sub-prefixes too; :meth:`size` refuses them). One ``ls``."""
        return sorted(self._listing())

    def sizes(self) -> dict[str, int]:
        """Sizes in bytes of the objects at the location, from one ``ls`` (sub-prefixes left out)."""
        return {n: int(e.get("size") or 0) for n, e in self._listing().items() if e.get("type", "file") == "file"}

    def _info(self, name: str) -> dict[str, Any]:
        info = self.call("stat", name, lambda: self.fs.info(self._path(name)))
        if info.get("type", "file") != "file":
            raise NotARegularFileError(f"{self._where(name)} is a prefix (a directory); expected an object")
        if info.get("size") is None:
            raise RemoteStorageError(errno.EIO, f"{self._where(name)}: the server does not report the object's size")
        return info

    def read_all(self, name: str, max_bytes: int | None = None) -> bytes:
        """Read a whole object with one GET (no ``HEAD`` first: a request less on every store
        open); one GET is one version of the object, so it is never read short or mixed.

        With ``max_bytes``, only the first ``max_bytes + 1`` bytes are asked for (a ranged
        GET), so a larger object raises ``ValueError`` without being downloaded.

        Raises:
            FileNotFoundError: The object is absent.
            NotARegularFileError: ``name`` is a prefix (a directory), not an object (one
                ``HEAD`` says so, after the GET found nothing).
            ValueError: The object is larger than ``max_bytes``.
            RemoteStorageError: As :meth:`call`.
        """
        path = self._path(name)

        def get() -> bytes:
            if max_bytes is None:
                return self.fs.cat_file(path)
            return self.fs.cat_file(path, start=0, end=max_bytes + 1)

        try:
            data = self.call("read", name, get, byte_range=None if max_bytes is None else (0, max_bytes + 1))
        except FileNotFoundError:
            self._info(name)  # a prefix of that name: NotARegularFileError; else absent indeed
            raise
        except RemoteStorageError as exc:
            if isinstance(exc.__cause__, IsADirectoryError):  # a backend with directories (file://)
                self._info(name)  # NotARegularFileError
                raise
            if _http_status(exc.__cause__)[0] != 416:
                raise
            # Range Not Satisfiable: an empty object (S3 refuses a range of nothing).
            return super().read_all(name, max_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError(f"{name!r} is more than {max_bytes} bytes; expected at most {max_bytes}")
        return bytes(data)

    def size(self, name: str) -> int:
        """Size in bytes of an object (one ``HEAD``)."""
        return int(self._info(name)["size"])

    def open(self, name: str) -> ReadHandle:
        """A handle for ranged reads. Its size comes from this storage's last listing if that
        named ``name`` (no request), else from one ``HEAD``."""
        with self._listed_lock:
            entry = self._listed.get(name)
        if entry is None or entry.get("type", "file") != "file" or entry.get("size") is None:
            entry = self._info(name)
        return _FsspecHandle(self, name, int(entry["size"]))

    def read_versioned(self, name: str, max_bytes: int | None = None) -> tuple[bytes, str | None]:
        """Read a whole object and the version that was read (the S3 ETag, from the same GET).

        Raises:
            FileNotFoundError: The object is absent.
            ValueError: It is larger than ``max_bytes``.
        """
        if not self.conditional_writes:
            return self.read_all(name, max_bytes), None
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self._path(name))

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                length = resp.get("ContentLength")
                if max_bytes is not None and length is not None and length > max_bytes:
                    raise _TooLarge(f"{name!r} is {length} bytes; expected at most {max_bytes}")
                if max_bytes is None or length is not None:
                    return await resp["Body"].read(), resp["ETag"]
                # No Content-Length (a chunked answer): read at most max_bytes + 1 bytes, so an
                # endless body is refused after the bound, not read whole first.
                data = bytearray()
                while True:
                    piece = await resp["Body"].read(min(_BODY_PIECE_BYTES, max_bytes + 1 - len(data)))
                    if not piece:
                        return bytes(data), resp["ETag"]
                    data += piece
                    if len(data) > max_bytes:
                        raise _TooLarge(f"{name!r} is more than {max_bytes} bytes; expected at most {max_bytes}")
            finally:
                resp["Body"].close()

        return self.call("read", name, lambda: sync(self.fs.loop, get))

    # ------------------------------------------------------------------ Storage API: writing

    def writer(self, name: str, *, exclusive: bool = False, if_match: str | None = None) -> AtomicWriter:
        """Spool ``name`` to a local temporary file; ``commit()`` uploads it (see the module
        docstring for the conditions each backend honours). With ``if_match`` on S3 the file
        is sent from memory in one PUT (meant for ``index.json``, at most ``MAX_INDEX_BYTES``).

        Raises:
            ReadOnlyStoreError: An ``http(s)://`` URL.
        """
        self._refuse_write(f"write {name!r}")
        return _FsspecWriter(self, name, exclusive, if_match)

    def remove(self, name: str) -> None:
        self._refuse_write(f"remove {name!r}")
        with self._listed_lock:
            self._listed.pop(name, None)
        try:
            self.call("remove", name, lambda: self.fs.rm_file(self._path(name)))
        except FileNotFoundError:
            pass
        self._invalidate(self._root)

    def move(self, name: str, new_name: str) -> None:
        """Copy ``name`` to ``new_name``, then delete ``name`` (object stores have no rename).

        Raises:
            FileExistsError: ``new_name`` exists (checked first; it is never overwritten).
            FileNotFoundError: ``name`` is absent.
        """
        self._refuse_write(f"move {name!r}")
        try:
            self._info(new_name)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(f"{self._where(new_name)} already exists")
        self._info(name)
        self.call("copy", name, lambda: self.fs.cp_file(self._path(name), self._path(new_name)))
        self.remove(name)

    def lock(self, owner: dict | None) -> StoreLock:
        """Object stores have no locks: an unsupported :class:`StoreLock` (writers then rely
        on the conditional commit of ``index.json``; see docs/integrity.md, section 5)."""
        return StoreLock()


def _rebuild(url: str, options: dict[str, Any], retries: int, deadline: float, base: float) -> FsspecStorage:
    return FsspecStorage(url, options, retries=retries, retry_deadline_s=deadline, retry_base_delay_s=base)


#: Options that are dicts of a backend's keyword arguments, wherever they are given.
_DICT_OPTIONS = frozenset({"client_kwargs", "config_kwargs", "s3_additional_kwargs"})
#: s3fs options that are text (or None): credentials and the endpoint.
_S3_TEXT_OPTIONS = frozenset({"key", "secret", "token", "endpoint_url", "profile", "username", "password"})


def _check_option_types(options: dict[str, Any], protocol: str) -> None:
    """Refuse storage options of the wrong type here, by name, rather than deep inside the
    backend's first request (or as a TypeError while the retry settings are merged in)."""
    for k, v in options.items():
        if not isinstance(k, str):
            raise InvalidOptionError(f"storage_options: expected str keys, found {k!r}")
        if k in _DICT_OPTIONS and not isinstance(v, dict):
            raise InvalidOptionError(f"storage_options[{k!r}]: expected a dict of keyword arguments, found {v!r}")
        if protocol in ("s3", "s3a") and k in _S3_TEXT_OPTIONS and v is not None and not isinstance(v, str):
            raise InvalidOptionError(
                f"storage_options[{k!r}]: expected a str, found {type(v).__name__} {v!r} (quote it: a secret of digits "
                "is still text)"
            )


def _check_number(value: Any, what: str, kind: type) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise InvalidOptionError(f"{_OPTION_PREFIX}{what}: expected a non-negative {kind.__name__}, found {value!r}")
    return kind(value)


class _FsspecHandle(ReadHandle):
    """Ranged GETs of one object of known size. Thread-safe (no state beyond the size)."""

    def __init__(self, storage: FsspecStorage, name: str, size: int) -> None:
        self._storage = storage
        self._name = name
        self._size = size

    def size(self) -> int:
        return self._size

    def read_range(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self._size)
        if length <= 0 or offset >= end:
            return b""
        st = self._storage
        path = st._path(self._name)

        def get() -> bytes:
            data = st.fs.cat_file(path, start=offset, end=end)
            if len(data) > end - offset:
                if len(data) != self._size:
                    raise RemoteStorageError(
                        errno.EIO,
                        f"{st._where(self._name, (offset, end))}: the server answered {len(data)} bytes for a range of "
                        f"{end - offset} (the object is {self._size} bytes); refusing bytes that may be misplaced",
                    )
                data = data[offset:end]  # a server that ignores Range sends the whole object
            if len(data) < end - offset:
                raise _ShortRead(
                    errno.EIO, f"short read: {len(data)} of {end - offset} bytes (the object is {self._size} bytes)"
                )
            return bytes(data[: end - offset])

        return st.call("read", self._name, get, byte_range=(offset, end), missing_ok=False)

    def close(self) -> None:
        pass


_SPOOL_PREFIX = "tspt-upload-"
_SPOOL_SUFFIX = ".part"
#: A spool file younger than this is never swept (the instant between its creation and its lock).
_SPOOL_GRACE_S = 60.0
_swept_spools: set[tuple[int, str]] = set()
_swept_lock = threading.Lock()


def _sweep_spool(directory: str) -> None:
    """Remove the spool files of writers that died before their upload (killed, out of memory):
    ``tspt-upload-*.part`` files nobody holds a lock on, older than a minute. Once per process
    and directory; a file another user owns, or one in use, is left alone."""
    key = (os.getpid(), directory)
    with _swept_lock:
        if key in _swept_spools:
            return
        _swept_spools.add(key)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for e in entries:
        if not (e.name.startswith(_SPOOL_PREFIX) and e.name.endswith(_SPOOL_SUFFIX)):
            continue
        try:
            if not e.is_file(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < _SPOOL_GRACE_S:
                continue
            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(e.path)
        except OSError:
            pass  # in use (locked), or not ours to remove
        finally:
            os.close(fd)


class _FsspecWriter(AtomicWriter):
    """Spools to a local temporary file; ``commit`` uploads it in one PUT (or multipart)."""

    def __init__(self, storage: FsspecStorage, name: str, exclusive: bool, if_match: str | None) -> None:
        self._storage = storage
        self._name = name
        self._exclusive = exclusive
        self._if_match = if_match
        self._done = False
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=_SPOOL_PREFIX, suffix=_SPOOL_SUFFIX, dir=storage.spool_dir)
        except OSError as exc:
            raise self._spool_error(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive": a sweep removes only unlocked spools
        except OSError:  # pragma: no cover - a spool directory without flock: never swept
            pass
        self._f = os.fdopen(fd, "wb")
        _sweep_spool(os.path.dirname(self._tmp))

    def _spool_error(self, exc: OSError) -> OSError:
        """A full local spool disk as StorageFullError (naming the spool), other errors as they are."""
        if exc.errno in FULL_ERRNOS:
            spool = self._storage.spool_dir or tempfile.gettempdir()
            return full_disk_error(
                exc,
                self._storage.url,
                self._name,
                f"spooling (in the local directory {str(spool)!r}, storage option "
                f"{_OPTION_PREFIX}spool_dir) before uploading",
            )
        return exc

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            err = self._spool_error(exc)
            if err is exc:
                raise
            raise err from exc

    def commit(self) -> None:
        if self._done:
            return
        st, name = self._storage, self._name
        path = st._path(name)
        try:
            try:
                self._f.close()  # flushes the last buffered bytes: a full spool disk shows here too
            except OSError as exc:
                err = self._spool_error(exc)
                if err is exc:
                    raise
                raise err from exc
            size = os.path.getsize(self._tmp)
            if self._if_match is not None and st.conditional_writes:
                with open(self._tmp, "rb") as f:
                    data = f.read()

                def landed(exc: BaseException) -> None:
                    # A retry refused after an attempt whose answer was lost: ours if the bytes are
                    # ours. An object larger than ours is another writer's: not read (bounded).
                    try:
                        ours = st.read_all(name, max_bytes=size) == data
                    except ValueError:  # larger than ours
                        ours = False
                    if not ours:
                        raise self._conflict(exc) from exc

                def put_if_match() -> None:
                    try:
                        st.fs.pipe_file(path, data, IfMatch=self._if_match)
                    except Exception as exc:  # noqa: BLE001
                        if _precondition_failed(exc):
                            raise self._conflict(exc) from exc
                        raise

                st.call("upload", name, put_if_match, byte_range=(0, size), on_retry_error=landed)
            elif self._exclusive:

                def mine(exc: BaseException) -> None:
                    if st.size(name) != size:
                        raise FileExistsError(f"{st._where(name)} already exists") from exc

                def put_create() -> None:
                    if st.conditional_writes:  # If-None-Match: * (412 -> FileExistsError in s3fs)
                        st.fs.put_file(self._tmp, path, mode="create")
                        return
                    if st.fs.exists(path):  # check-then-put: not every backend takes mode="create"
                        raise FileExistsError(f"{st._where(name)} already exists")
                    st.fs.put_file(self._tmp, path)

                st.call("upload", name, put_create, byte_range=(0, size), on_retry_error=mine)
            else:
                st.call("upload", name, lambda: st.fs.put_file(self._tmp, path), byte_range=(0, size))
        except BaseException:
            self.abort()
            raise
        st._invalidate(st._root)
        self._done = True
        self._unlink()

    def _conflict(self, exc: BaseException) -> ConcurrentWriteError:
        return ConcurrentWriteError(
            f"{self._storage._where(self._name)} changed since version {self._if_match} was read (the conditional "
            f"upload was refused: {exc}); nothing was replaced"
        )

    def _unlink(self) -> None:
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        except OSError:
            pass
        self._unlink()
