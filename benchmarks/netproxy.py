"""A small threaded TCP proxy that adds latency, caps bandwidth and injects faults.

Object stores answer in 10-100 ms and sometimes fail; a local S3 endpoint (moto) answers in
well under a millisecond and never does. :class:`NetProxy` sits between a client and such an
endpoint to make it behave like the real thing, for the tests and the benchmarks::

    with NetProxy("127.0.0.1", moto_port, latency_ms=50, bandwidth_bytes_per_s=100e6) as proxy:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url}, ...)
        ...
        proxy.faults = FaultSchedule(seed=7, rate=0.2)   # every knob can change while it runs
        print(proxy.stats().requests, proxy.stats().bytes_down)

Requests. The proxy follows HTTP/1.1 framing on the client-to-server stream (request line and
headers up to the blank line, then a ``Content-Length`` body or a ``chunked`` one), so it
knows where each request starts. Requests are numbered 0, 1, 2... over the whole proxy in the
order their first byte arrives. A stream that does not parse as HTTP/1.x (no request line)
is forwarded opaquely from there on: each client burst that follows server bytes counts as
one request, and no fault is injected on it.

Latency. ``latency_ms`` is added once per request, before its first byte is forwarded to the
server, so the client sees its first response byte at least that much later (first-byte
latency; the server's own time comes on top).

Bandwidth. ``bandwidth_bytes_per_s`` caps the bytes per second of each direction over all
connections together; ``connection_bandwidth_bytes_per_s`` caps each connection's each
direction. Token buckets with a burst of 1/20 s of the rate (at least 16 KiB); None is no cap.

Faults (:class:`FaultSchedule`), decided per request number from a seed, so a schedule is
deterministic whatever the thread timing:

- ``reset``: forward ``after_bytes`` bytes of the response, then reset the client's connection
  (TCP RST: ``ECONNRESET`` at the client);
- ``truncate``: forward ``after_bytes`` bytes of the response, then close the connection
  cleanly (the client sees a short body);
- ``stall``: forward ``after_bytes`` bytes of the response, then send nothing for
  ``stall_s`` seconds (past the client's read timeout), then close;
- ``503``: the request is never forwarded; the client gets ``503 Service Unavailable`` with
  an S3-style ``SlowDown`` XML body (none after a ``HEAD``) and ``Connection: close``.

``after_bytes`` counts response bytes, status line and headers included. Where the response
declares a ``Content-Length``, it is clamped to one byte short of the whole response, so a
scheduled reset, truncation or stall always cuts the response short.

Counters (:meth:`NetProxy.stats`): connections, requests, bytes client->server (``bytes_up``)
and server->client (``bytes_down``) as forwarded (counted as each chunk is handed to the
socket, so bytes a client has received are always counted), and the faults injected by kind.

Threads: one accept thread and two per connection. :meth:`NetProxy.close` (or leaving the
``with`` block) stops accepting, shuts every socket down, wakes stalls and joins every thread
it started: nothing is leaked. Knobs and counters are safe to use from any thread.
"""

from __future__ import annotations

import random
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FAULT_KINDS", "Fault", "FaultSchedule", "NetProxy", "ProxyStats"]

FaultKind = Literal["reset", "truncate", "stall", "503"]
FAULT_KINDS: tuple[str, ...] = ("reset", "truncate", "stall", "503")

_RECV_BYTES = 64 * 2**10
#: How often a pump waiting for data looks whether its connection was closed (seconds).
_POLL_S = 0.05
_MAX_HEAD_BYTES = 64 * 2**10
_REQUEST_LINE = re.compile(rb"^[A-Z]+ \S+ HTTP/1\.[01]\r\n")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate. (injected by netproxy)</Message></Error>"
)


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: ``"reset"``, ``"truncate"``, ``"stall"`` or ``"503"``.
        after_bytes: Response bytes (headers included) forwarded before the fault; ignored by 503.
        stall_s: How long a ``stall`` sends nothing before closing (seconds).
    """

    kind: FaultKind
    after_bytes: int = 0
    stall_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind: expected one of {FAULT_KINDS}, found {self.kind!r}")
        if self.after_bytes < 0 or self.stall_s < 0:
            raise ValueError(f"fault: expected after_bytes >= 0 and stall_s >= 0, found {self}")


@dataclass(frozen=True)
class FaultSchedule:
    """Which request gets which fault: a pure function of ``(seed, request number)``.

    Attributes:
        seed: Seeds one ``random.Random`` per request number.
        rate: Probability in [0, 1] that a request not listed in ``at`` gets a fault.
        kinds: The kinds drawn from (uniformly).
        after_bytes: ``(low, high)``: a drawn fault's ``after_bytes`` is uniform in it.
        stall_s: ``stall_s`` of a drawn stall.
        at: Explicit faults by request number (they win over drawn ones).
        first_request: Requests numbered below it never get a drawn fault (a warm-up).
    """

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    after_bytes: tuple[int, int] = (0, 4096)
    stall_s: float = 30.0
    at: dict[int, Fault] = field(default_factory=dict)
    first_request: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate: expected a probability in [0, 1], found {self.rate!r}")
        if not self.kinds or any(k not in FAULT_KINDS for k in self.kinds):
            raise ValueError(f"kinds: expected a non-empty subset of {FAULT_KINDS}, found {self.kinds!r}")
        lo, hi = self.after_bytes
        if not 0 <= lo <= hi:
            raise ValueError(f"after_bytes: expected (low, high) with 0 <= low <= high, found {self.after_bytes!r}")

    def fault_for(self, request: int) -> Fault | None:
        """The fault of request number ``request`` (0-based), or None."""
        if request in self.at:
            return self.at[request]
        if self.rate <= 0.0 or request < self.first_request:
            return None
        rng = random.Random(f"netproxy:{self.seed}:{request}")
        if rng.random() >= self.rate:
            return None
        kind = rng.choice(self.kinds)
        return Fault(kind, rng.randint(*self.after_bytes), self.stall_s)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters (bytes as forwarded, headers included)."""

    connections: int
    requests: int
    bytes_up: int
    bytes_down: int
    faults: dict[str, int]


class _Bucket:
    """A token bucket; ``rate`` None means unlimited. Thread-safe; waits are interruptible."""

    def __init__(self, rate: float | None, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self._stop = stop
        self._rate = rate
        self._tokens = 0.0
        self._last = time.monotonic()

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self._rate = rate
            self._tokens = 0.0
            self._last = time.monotonic()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass."""
        while n > 0 and not self._stop.is_set():
            with self._lock:
                rate = self._rate
                if rate is None:
                    return
                burst = max(rate / 20.0, 16 * 2**10)
                now = time.monotonic()
                self._tokens = min(burst, self._tokens + (now - self._last) * rate)
                self._last = now
                step = min(n, int(burst))
                if self._tokens >= step:
                    self._tokens -= step
                    n -= step
                    continue
                wait = (step - self._tokens) / rate
            self._stop.wait(min(wait, 0.5))


class _Request:
    """Per-request state shared by a connection's two pumps."""

    def __init__(self, number: int, fault: Fault | None, method: bytes) -> None:
        self.number = number
        self.fault = fault
        self.method = method
        self.response_bytes = 0
        self.head = b""  # response bytes seen while looking for the final response head
        self.limit: int | None = fault.after_bytes if fault and fault.kind != "503" else None
        self.head_done = False


class _RequestFramer:
    """Follows HTTP/1.1 request framing on a client-to-server byte stream.

    :meth:`feed` splits data into pieces that each belong to one request:
    ``(piece, starts_request, method)``; ``method`` is only known once the head is complete.
    """

    def __init__(self) -> None:
        self.opaque = False
        self._state = "idle"
        self._head = b""
        self._remaining = 0
        self._line = b""
        self.method = b""
        self.expect_continue = False
        self.head_complete = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        if self.opaque:
            return [(data, False)]
        pieces: list[tuple[bytes, bool]] = []
        i = 0
        start = 0
        starts = False
        while i < len(data):
            if self._state == "idle":
                if i > start:
                    pieces.append((data[start:i], starts))
                start, starts = i, True
                self._state, self._head, self.head_complete = "head", b"", False
                self.expect_continue = False
            if self._state == "head":
                before = len(self._head)
                self._head += data[i:]
                end = self._head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._head) > _MAX_HEAD_BYTES or (
                        len(self._head) >= 16 and not _REQUEST_LINE.match(self._head) and b"\r\n" in self._head
                    ):
                        self.opaque = True
                    i = len(data)
                    break
                i += end + 4 - before
                if not self._parse_head(self._head[: end + 4]):
                    self.opaque = True
                    i = len(data)
                    break
                self.head_complete = True
                continue
            if self._state == "body":
                n = min(self._remaining, len(data) - i)
                i += n
                self._remaining -= n
                if self._remaining == 0:
                    self._state = "idle"
                continue
            if self._state in ("chunk-size", "trailer"):
                j = data.find(b"\n", i)
                if j < 0:
                    self._line += data[i:]
                    i = len(data)
                    break
                line = (self._line + data[i : j + 1]).strip()
                self._line = b""
                i = j + 1
                if self._state == "trailer":
                    if not line:
                        self._state = "idle"
                    continue
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    self.opaque = True
                    i = len(data)
                    break
                if size == 0:
                    self._state = "trailer"
                else:
                    self._state, self._remaining = "chunk-data", size + 2  # data and its CRLF
                continue
            if self._state == "chunk-data":
                n = min(self._remaining, len(data) - i)
                i += n
                self._remaining -= n
                if self._remaining == 0:
                    self._state = "chunk-size"
                continue
        if start < len(data):
            pieces.append((data[start:], starts))
        return pieces

    def _parse_head(self, head: bytes) -> bool:
        if not _REQUEST_LINE.match(head):
            return False
        self.method = head.split(b" ", 1)[0]
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return False
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"expect" and value == b"100-continue":
                self.expect_continue = True
        if chunked:
            self._state, self._line = "chunk-size", b""
        elif length > 0:
            self._state, self._remaining = "body", length
        else:
            self._state = "idle"
        return True

    @property
    def idle(self) -> bool:
        return self._state == "idle"


def _response_length(head: bytes, method: bytes) -> int | None:
    """Whole-response length (head + body) from a final response head, if it says."""
    m = _STATUS_LINE.match(head)
    if not m:
        return None
    status = int(m.group(1))
    if method == b"HEAD" or status in (204, 304):
        return len(head)
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(head) + int(value.strip())
            except ValueError:
                return None
    return None


class _Connection:
    """One client connection and its upstream connection, with two pump threads."""

    def __init__(self, proxy: NetProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.request: _Request | None = None
        self.closed = threading.Event()
        self.client_done = threading.Event()
        self._close_lock = threading.Lock()
        self.up_bucket = _Bucket(proxy.connection_bandwidth_bytes_per_s, proxy._stop)
        self.down_bucket = _Bucket(proxy.connection_bandwidth_bytes_per_s, proxy._stop)
        self.server_spoke = True  # opaque mode: the next client burst is a new request
        self.threads: list[threading.Thread] = []

    def finished(self) -> bool:
        return self.closed.is_set() and not any(t.is_alive() for t in self.threads)

    def start(self) -> None:
        try:
            self.upstream = socket.create_connection(self.proxy.upstream, timeout=10)
            self.upstream.settimeout(None)
        except OSError:
            self.close(reset=True)
            return
        for target, name in ((self._pump_up, "up"), (self._pump_down, "down")):
            t = threading.Thread(target=target, name=f"netproxy-{name}", daemon=True)
            self.threads.append(t)
            t.start()

    def close(self, reset: bool = False) -> None:
        """Close both sockets (``reset``: the client's with an RST). The pumps notice within
        one poll interval (they never block on a socket without ``select`` first)."""
        with self._close_lock:
            if self.closed.is_set():
                return
            self.closed.set()
        if reset:
            try:  # SO_LINGER on, 0 s: close() sends RST instead of FIN
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if not reset or sock is not self.client:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            try:
                sock.close()
            except OSError:
                pass

    def _recv(self, sock: socket.socket) -> bytes | None:
        """Data from ``sock``; b"" at EOF; None once the connection is closed (or fails)."""
        while not self.closed.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], _POLL_S)
                if ready:
                    return sock.recv(_RECV_BYTES)
            except (OSError, ValueError):  # closed by the other pump: fileno -1, EBADF
                return None
        return None

    def _send_client(self, data: bytes) -> None:
        self.down_bucket.take(len(data))
        self.proxy._down_bucket.take(len(data))
        self.proxy._count(bytes_down=len(data))  # before the send: a client holding the bytes sees them counted
        self.client.sendall(data)

    def _send_upstream(self, data: bytes) -> None:
        assert self.upstream is not None
        self.up_bucket.take(len(data))
        self.proxy._up_bucket.take(len(data))
        self.proxy._count(bytes_up=len(data))
        self.upstream.sendall(data)

    def _pump_up(self) -> None:
        framer = _RequestFramer()
        try:
            while True:
                data = self._recv(self.client)
                if data is None:
                    return
                if not data:  # the client finished sending: pass the half-close on
                    self.client_done.set()
                    try:
                        self.upstream.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
                    except OSError:
                        pass
                    return
                dropping = False
                for piece, starts in framer.feed(data):
                    if starts or (framer.opaque and self.server_spoke):
                        self.server_spoke = False
                        req = self.proxy._begin_request(None if framer.opaque else framer)
                        self.request = req
                        self.proxy._sleep_latency()
                    req = self.request
                    dropping = req is not None and req.fault is not None and req.fault.kind == "503"
                    if not dropping:
                        self._send_upstream(piece)
                if dropping and (framer.idle or (framer.head_complete and framer.expect_continue)):
                    self._answer_503(head_only=framer.method == b"HEAD")
                    return
        except OSError:
            self.close()

    def _answer_503(self, head_only: bool) -> None:
        """The injected 503 (no body after a HEAD request, as HTTP requires), then close."""
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(_SLOWDOWN_BODY)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.proxy._count(fault="503")
        try:
            self._send_client(head if head_only else head + _SLOWDOWN_BODY)
        except OSError:
            pass
        self.close()

    def _pump_down(self) -> None:
        try:
            while True:
                data = self._recv(self.upstream)  # type: ignore[arg-type]
                if not data:
                    break
                self.server_spoke = True
                req = self.request
                if req is None or req.limit is None:
                    self._send_client(data)
                    continue
                if not req.head_done:
                    self._learn_length(req, data)
                room = req.limit - req.response_bytes
                if room >= len(data):
                    req.response_bytes += len(data)
                    self._send_client(data)
                    continue
                if room > 0:
                    self._send_client(data[:room])
                self._inject(req)
                return
        except OSError:
            pass
        finally:
            self.close()

    def _learn_length(self, req: _Request, data: bytes) -> None:
        """Clamp the fault's byte count below a response length the head declares."""
        req.head += data
        while True:
            end = req.head.find(b"\r\n\r\n")
            if end < 0:
                if len(req.head) > _MAX_HEAD_BYTES:
                    req.head_done = True
                return
            head = req.head[: end + 4]
            m = _STATUS_LINE.match(head)
            if m and m.group(1).startswith(b"1"):  # an interim response (100 Continue): skip it
                req.head = req.head[end + 4 :]
                continue
            req.head_done = True
            total = _response_length(head, req.method)
            if total is not None and req.limit is not None:
                consumed = req.response_bytes + len(data) - len(req.head)  # bytes before this head
                req.limit = min(req.limit, max(consumed + total - 1, 0))
            return

    def _inject(self, req: _Request) -> None:
        kind = req.fault.kind  # type: ignore[union-attr]
        self.proxy._count(fault=kind)
        if kind == "stall":  # until stall_s passes, the client gives up, or the proxy closes
            deadline = time.monotonic() + req.fault.stall_s  # type: ignore[union-attr]
            while time.monotonic() < deadline and not self.client_done.is_set() and not self.closed.is_set():
                if self.proxy._stop.wait(min(_POLL_S, max(deadline - time.monotonic(), 0))):
                    break
            self.close()
        elif kind == "reset":
            self.close(reset=True)
        else:
            self.close()


class NetProxy:
    """A TCP proxy on ``127.0.0.1`` (a free port) to ``upstream_host:upstream_port``.

    Args:
        upstream_host: The server's host.
        upstream_port: The server's port.
        latency_ms: Added once per request before it is forwarded (ms, >= 0).
        bandwidth_bytes_per_s: Cap per direction over all connections (bytes/s), or None.
        connection_bandwidth_bytes_per_s: Cap per connection and direction (bytes/s), or None;
            a change applies to connections opened afterwards.
        faults: A :class:`FaultSchedule`, or None for none.

    Every knob is an attribute that can be set while the proxy runs. Use as a context manager,
    or call :meth:`start` and :meth:`close`. See the module docstring for the semantics.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        latency_ms: float = 0.0,
        bandwidth_bytes_per_s: float | None = None,
        connection_bandwidth_bytes_per_s: float | None = None,
        faults: FaultSchedule | None = None,
    ) -> None:
        self.upstream = (upstream_host, int(upstream_port))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.latency_ms = latency_ms
        self._up_bucket = _Bucket(None, self._stop)
        self._down_bucket = _Bucket(None, self._stop)
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.connection_bandwidth_bytes_per_s = connection_bandwidth_bytes_per_s
        self.faults = faults
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: list[_Connection] = []
        self.reset_stats()
        self.port = 0

    # ------------------------------------------------------------------ knobs

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return self._bandwidth

    @bandwidth_bytes_per_s.setter
    def bandwidth_bytes_per_s(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError(f"bandwidth_bytes_per_s: expected > 0 or None, found {value!r}")
        self._bandwidth = value
        self._up_bucket.set_rate(value)
        self._down_bucket.set_rate(value)

    @property
    def latency_ms(self) -> float:
        return self._latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"latency_ms: expected >= 0, found {value!r}")
        self._latency_ms = float(value)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the endpoint URL clients use instead of the server's."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ counters

    def reset_stats(self) -> None:
        """Zero every counter (the request numbering used by the fault schedule too)."""
        with self._lock:
            self._connections_total = 0
            self._requests = 0
            self._bytes_up = 0
            self._bytes_down = 0
            self._faults = dict.fromkeys(FAULT_KINDS, 0)

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return ProxyStats(
                self._connections_total, self._requests, self._bytes_up, self._bytes_down, dict(self._faults)
            )

    def _count(self, bytes_up: int = 0, bytes_down: int = 0, fault: str | None = None) -> None:
        with self._lock:
            self._bytes_up += bytes_up
            self._bytes_down += bytes_down
            if fault is not None:
                self._faults[fault] += 1

    def _begin_request(self, framer: _RequestFramer | None) -> _Request:
        with self._lock:
            number = self._requests
            self._requests += 1
        schedule = self.faults
        fault = schedule.fault_for(number) if schedule is not None and framer is not None else None
        method = framer._head.split(b" ", 1)[0] if framer is not None else b""
        return _Request(number, fault, method)

    def _sleep_latency(self) -> None:
        if self._latency_ms > 0:
            self._stop.wait(self._latency_ms / 1000.0)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> NetProxy:
        """Listen on a free port of 127.0.0.1 and start accepting."""
        if self._listener is not None:
            raise RuntimeError("NetProxy.start: already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="netproxy-accept", daemon=True)
        self._accept_thread.start()
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, client)
            with self._lock:
                self._connections_total += 1
                self._connections = [c for c in self._connections if not c.finished()]
                self._connections.append(conn)
            conn.start()

    def close(self) -> None:
        """Stop accepting, close every connection, wake stalls and join every thread."""
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.close()
        for conn in conns:
            for t in conn.threads:
                t.join()
        # Connections whose pumps ended on their own: join them too (they are finished).
        with self._lock:
            rest = [t for c in self._connections for t in c.threads]
        for t in rest:
            t.join()

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
