"""Load generator and upstream for the benchmarks: separate processes, big buffers.

    python peers.py upstream           serve on 127.0.0.1:0, print the port, run until stdin closes
    python peers.py bulk HOST PORT N   send N bytes, print JSON {seconds}
    python peers.py duplex HOST PORT N send and receive N bytes at once, print JSON {seconds}
    python peers.py pingpong HOST PORT COUNT   64-byte round trips, print JSON {p50_us, p99_us}
    python peers.py fanout HOST PORT CONNS N   CONNS connections at once, N bytes each, JSON {seconds}
    python peers.py hold HOST PORT CONNS       open CONNS bridged connections, print "ready", hold until stdin closes

A connection's first byte tells the upstream what to do: S sink (reply with the count at EOF),
D duplex (send N bytes while sinking, N in the next 8 bytes), E echo, H hold (wait for EOF),
G an HTTP/1.0 GET (answered "ok", then closed).
S and D answer "+" first: the clock starts once the whole path (relay included) is up, so a
timing measures relaying, not connection setup.
Every transfer is counted; a short count is an error, not a number.
"""

import json
import socket
import struct
import sys
import threading
import time

CHUNK = 4 * 1024 * 1024
_PAYLOAD = memoryview(bytes(CHUNK))


def _recv_exactly(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _sink(sock):
    buf = bytearray(CHUNK)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total
        total += n


def _send(sock, n):
    while n > 0:
        k = min(n, CHUNK)
        sock.sendall(_PAYLOAD[:k])
        n -= k


def _serve_conn(conn):
    with conn:
        try:
            mode = _recv_exactly(conn, 1)
            if mode in (b"S", b"D"):
                conn.sendall(b"+")
            if mode == b"S":
                total = _sink(conn)
                conn.sendall(struct.pack("!Q", total))
            elif mode == b"D":
                (n,) = struct.unpack("!Q", _recv_exactly(conn, 8))
                sender = threading.Thread(target=_send, args=(conn, n))
                sender.start()
                total = _sink(conn)
                sender.join()
                conn.shutdown(socket.SHUT_WR)
            elif mode == b"E":
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            elif mode == b"H":
                _sink(conn)
            elif mode == b"G":  # an HTTP/1.0 GET (openssl s_time -www): a small answer, then the close
                request = mode
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    data = conn.recv(65536)
                    if not data:
                        break
                    request += data
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except OSError:
            pass


def upstream():
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(listener.getsockname()[1], flush=True)

    def accept_loop():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    sys.stdin.read()  # until the orchestrator closes our stdin


def _connect(host, port):
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def bulk(host, port, n):
    n = int(n)
    with _connect(host, port) as s:
        s.sendall(b"S")
        _recv_exactly(s, 1)  # the path is up
        started = time.perf_counter()
        _send(s, n)
        s.shutdown(socket.SHUT_WR)
        (total,) = struct.unpack("!Q", _recv_exactly(s, 8))
        seconds = time.perf_counter() - started
    if total != n:
        raise SystemExit(f"bulk: upstream got {total} of {n} bytes")
    return {"seconds": seconds, "bytes": n}


def duplex(host, port, n):
    n = int(n)
    with _connect(host, port) as s:
        s.sendall(b"D" + struct.pack("!Q", n))
        _recv_exactly(s, 1)  # the path is up
        started = time.perf_counter()
        sender = threading.Thread(target=lambda: (_send(s, n), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = _sink(s)
        sender.join()
        seconds = time.perf_counter() - started
    if got != n:
        raise SystemExit(f"duplex: got {got} of {n} bytes back")
    return {"seconds": seconds, "bytes": 2 * n}


def pingpong(host, port, count):
    count = int(count)
    msg = b"x" * 64
    samples = []
    with _connect(host, port) as s:
        s.sendall(b"E")
        for i in range(count + 200):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            _recv_exactly(s, 64)
            if i >= 200:  # warm-up excluded
                samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] / 1000, "p99_us": samples[int(len(samples) * 0.99)] / 1000}


def fanout(host, port, conns, n):
    conns, n = int(conns), int(n)
    errors = []

    def one():
        try:
            r = bulk(host, port, n)
            assert r["bytes"] == n
        except BaseException as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(conns)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"fanout: {len(errors)} failed, e.g. {errors[0]}")
    return {"seconds": seconds, "bytes": conns * n}


def hold(host, port, conns):
    socks = []
    for _ in range(int(conns)):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"H")
        socks.append(s)
    # One round trip per socket is not possible in hold mode; give the relay a moment to
    # accept and bridge everything.
    time.sleep(1.0)
    print("ready", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    return None


def main():
    cmd, *args = sys.argv[1:]
    if cmd == "upstream":
        upstream()
        return
    result = {"bulk": bulk, "duplex": duplex, "pingpong": pingpong, "fanout": fanout, "hold": hold}[cmd](*args)
    if result is not None:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
