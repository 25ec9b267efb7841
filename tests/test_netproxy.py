"""benchmarks.netproxy: bytes pass unchanged, latency and bandwidth caps apply (lower bounds
only), faults happen on their seeded schedule, and closing leaks no thread."""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
import time

import pytest

from benchmarks.netproxy import FAULT_KINDS, Fault, FaultSchedule, NetProxy

pytestmark = pytest.mark.timeout(60)


def body_of(n: int) -> bytes:
    """n deterministic bytes (not compressible, not periodic)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:n])


def response_of(n: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode() + body_of(n)


class TinyHTTP:
    """A keep-alive HTTP/1.1 server: ``GET /N`` answers N bytes of :func:`body_of`; ``PUT`` answers
    the sha256 hex of its body. Counts the requests it sees."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    lines = head.decode().split("\r\n")
                    method, path, _ = lines[0].split(" ")
                    length = 0
                    for line in lines[1:]:
                        k, _, v = line.partition(":")
                        if k.strip().lower() == "content-length":
                            length = int(v)
                    while len(rest) < length:
                        more = conn.recv(65536)
                        if not more:
                            return
                        rest += more
                    body, buf = rest[:length], rest[length:]
                    self.requests.append(f"{method} {path}")
                    if method == "PUT":
                        digest = hashlib.sha256(body).hexdigest().encode()
                        reply = f"HTTP/1.1 200 OK\r\nContent-Length: {len(digest)}\r\n\r\n".encode() + digest
                    else:
                        reply = response_of(int(path.strip("/")))
                    try:
                        conn.sendall(reply)
                    except OSError:
                        return

    def close(self) -> None:
        self.stop.set()
        self.accepter.join()
        for t in self.threads:
            t.join()
        self.sock.close()


@pytest.fixture
def server():
    s = TinyHTTP()
    yield s
    s.close()


def get(sock: socket.socket, n: int) -> None:
    sock.sendall(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def read_response(sock: socket.socket) -> bytes:
    """One whole response (by its Content-Length) from a keep-alive socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        more = sock.recv(65536)
        assert more, "connection closed mid-body"
        rest += more
    return head + b"\r\n\r\n" + rest


def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends; and how it ended: 'eof', 'reset' or 'timeout'."""
    buf = b""
    while True:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return buf, "timeout"
        except ConnectionResetError:
            return buf, "reset"
        except OSError as exc:
            if exc.errno == errno.ECONNRESET:
                return buf, "reset"
            raise
        if not data:
            return buf, "eof"
        buf += data


def test_bytes_pass_unchanged_both_ways_and_are_counted(server):
    with NetProxy("127.0.0.1", server.port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            sizes = [0, 1, 1000, 300_000]
            for n in sizes:
                get(s, n)
                assert read_response(s) == response_of(n)
            payload = body_of(200_000)[::-1]
            head = f"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            s.sendall(head + payload)
            assert read_response(s).endswith(hashlib.sha256(payload).hexdigest().encode())
        st = proxy.stats()
    sent = sum(len(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n") for n in sizes) + len(head) + len(payload)
    digest_reply = "HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n".encode()
    assert st.requests == 5 and st.connections == 1
    assert st.bytes_up == sent
    assert st.bytes_down == sum(len(response_of(n)) for n in sizes) + len(digest_reply) + 64
    assert server.requests == [f"GET /{n}" for n in sizes] + ["PUT /x"]


def test_latency_is_added_once_per_request(server):
    with NetProxy("127.0.0.1", server.port, latency_ms=80) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            for n in (10, 100_000, 5):
                t0 = time.perf_counter()
                get(s, n)
                assert read_response(s) == response_of(n)
                assert time.perf_counter() - t0 >= 0.080  # a lower bound only
            proxy.latency_ms = 200  # a knob changed while running
            t0 = time.perf_counter()
            get(s, 7)
            assert read_response(s) == response_of(7)
            assert time.perf_counter() - t0 >= 0.200
        assert proxy.stats().requests == 4


def test_bandwidth_cap_is_a_lower_bound_on_time(server):
    rate = 400_000
    with NetProxy("127.0.0.1", server.port, bandwidth_bytes_per_s=rate) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            n = 300_000
            t0 = time.perf_counter()
            get(s, n)
            assert read_response(s) == response_of(n)
            elapsed = time.perf_counter() - t0
    burst = max(rate / 20, 16 * 2**10)
    assert elapsed >= (n - burst) / rate * 0.95


def test_faults_happen_on_schedule(server):
    n = 50_000
    full = response_of(n)
    schedule = FaultSchedule(
        at={
            1: Fault("reset", after_bytes=1000),
            2: Fault("truncate", after_bytes=20_000),
            3: Fault("503"),
            4: Fault("stall", after_bytes=300, stall_s=30),
            5: Fault("truncate", after_bytes=10**9),  # clamped below the response's length
        }
    )
    with NetProxy("127.0.0.1", server.port, faults=schedule) as proxy:
        outcomes = []
        for _ in range(7):
            with socket.create_connection(("127.0.0.1", proxy.port)) as s:
                s.settimeout(1.0)
                get(s, n)
                outcomes.append(read_until_end_or_whole(s))
        st = proxy.stats()
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 5  # the stalled connection did not hold close() for 30 s
    assert outcomes[0] == (full, "whole")
    data, how = outcomes[1]
    assert how == "reset" and full.startswith(data) and len(data) <= 1000
    assert outcomes[2] == (full[:20_000], "eof")
    assert outcomes[3][0].startswith(b"HTTP/1.1 503 ") and b"SlowDown" in outcomes[3][0] and outcomes[3][1] == "eof"
    assert outcomes[4] == (full[:300], "timeout")
    assert outcomes[5] == (full[:-1], "eof")
    assert outcomes[6] == (full, "whole")
    assert st.requests == 7
    assert st.faults == {"reset": 1, "truncate": 2, "503": 1, "stall": 1}
    # The 503'd request never reached the server; the others did.
    assert len(server.requests) == 6


def read_until_end_or_whole(s: socket.socket) -> tuple[bytes, str]:
    buf, how = b"", ""
    while True:
        try:
            data = s.recv(65536)
        except socket.timeout:
            return buf, "timeout"
        except ConnectionResetError:
            return buf, "reset"
        if not data:
            return buf, "eof"
        buf += data
        if b"\r\n\r\n" in buf and buf.startswith(b"HTTP/1.1 200"):
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(rest) == length:
                return buf, "whole"
    return buf, how  # pragma: no cover


def test_drawn_schedule_is_a_pure_function_of_seed_and_request():
    a = FaultSchedule(seed=11, rate=0.3, after_bytes=(10, 20))
    b = FaultSchedule(seed=11, rate=0.3, after_bytes=(10, 20))
    c = FaultSchedule(seed=12, rate=0.3, after_bytes=(10, 20))
    drawn = [a.fault_for(i) for i in range(2000)]
    assert drawn == [b.fault_for(i) for i in range(2000)]
    assert drawn != [c.fault_for(i) for i in range(2000)]
    faults = [f for f in drawn if f is not None]
    assert 0.25 < len(faults) / 2000 < 0.35
    assert {f.kind for f in faults} == set(FAULT_KINDS)
    assert all(10 <= f.after_bytes <= 20 for f in faults)
    assert FaultSchedule(seed=11, rate=0.3, first_request=5).fault_for(3) is None


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="rate"):
        FaultSchedule(rate=1.5)
    with pytest.raises(ValueError, match="kind"):
        Fault("explode")  # type: ignore[arg-type]
    proxy = NetProxy("127.0.0.1", 9)
    with pytest.raises(ValueError, match="latency_ms"):
        proxy.latency_ms = -1
    with pytest.raises(ValueError, match="bandwidth"):
        proxy.bandwidth_bytes_per_s = 0


def test_close_leaks_no_thread_and_ends_open_connections(server):
    before = set(threading.enumerate())
    proxy = NetProxy("127.0.0.1", server.port).start()
    socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    for s in socks:
        get(s, 10)
        read_response(s)
    proxy.close()
    for s in socks:
        s.settimeout(2)
        assert read_until_end(s)[1] in ("eof", "reset")
        s.close()
    leaked = [t for t in set(threading.enumerate()) - before if t.name.startswith("netproxy")]
    assert leaked == []


def test_non_http_stream_is_forwarded_opaquely():
    echo = socket.create_server(("127.0.0.1", 0))
    port = echo.getsockname()[1]

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    t = threading.Thread(target=serve)
    t.start()
    blob = body_of(100_000)
    with NetProxy("127.0.0.1", port, faults=FaultSchedule(rate=1.0)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.sendall(blob)
            got = b""
            while len(got) < len(blob):
                got += s.recv(65536)
        st = proxy.stats()
    t.join()
    echo.close()
    assert got == blob
    assert st.bytes_up == st.bytes_down == len(blob)
    assert sum(st.faults.values()) == 0


def test_503_after_head_request_has_no_body(server):
    with NetProxy("127.0.0.1", server.port, faults=FaultSchedule(at={0: Fault("503")})) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.settimeout(5)
            s.sendall(b"HEAD /5 HTTP/1.1\r\nHost: x\r\n\r\n")
            data, how = read_until_end(s)
    assert how == "eof" and data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"\r\n\r\n")
    assert server.requests == []


def test_request_framing_finds_every_request_start_however_the_stream_is_split():
    import random

    from benchmarks.netproxy import _RequestFramer

    body = body_of(3000)
    chunked = b"".join(f"{n:x};ext=1\r\n".encode() + body[:n] + b"\r\n" for n in (1, 700, 16)) + b"0\r\nX-T: 1\r\n\r\n"
    requests = [
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + body,
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /e HTTP/1.0\r\ncontent-length: 0\r\n\r\n",
    ]
    stream = b"".join(requests)
    starts = [sum(len(r) for r in requests[:k]) for k in range(len(requests))]
    rng = random.Random(4)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
        framer = _RequestFramer()
        pos, found, out = 0, [], b""
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            for piece, begins in framer.feed(stream[a:b]):
                if begins:
                    found.append(pos)
                pos += len(piece)
                out += piece
        assert out == stream and found == starts and framer.idle and not framer.opaque


def test_503_answers_an_expect_100_continue_request_without_waiting_for_its_body(server):
    with NetProxy("127.0.0.1", server.port, faults=FaultSchedule(at={0: Fault("503")})) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.settimeout(5)
            s.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
            data, how = read_until_end(s)
    assert how == "eof" and data.startswith(b"HTTP/1.1 503 ") and b"SlowDown" in data
    assert server.requests == []


def test_per_connection_bandwidth_cap(server):
    rate = 400_000
    with NetProxy("127.0.0.1", server.port, connection_bandwidth_bytes_per_s=rate) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as s:
            t0 = time.perf_counter()
            get(s, 200_000)
            assert read_response(s) == response_of(200_000)
            elapsed = time.perf_counter() - t0
    assert elapsed >= (200_000 - max(rate / 20, 16 * 2**10)) / rate * 0.95
