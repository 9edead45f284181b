"""Many Python threads at once on shared and separate bridges, on every engine.

With the GIL (the regular interpreter) these are ordinary concurrency tests; on a free-threaded
interpreter (3.13t, ``sys._is_gil_enabled()`` false) the Python layer runs truly in parallel
and they are what catches a race in it: ``_bridge.Bridge``'s state (start, stop, wait, done
callbacks, counts), the pure engine's pumps and teardown, the results thread, asyncio waits
from several event loops, the forwarder's event handling under ``reconfigure()`` from several
threads, and metrics scrapes. Every byte is checked (SHA-256 per direction), every result,
every callback exactly once, and no fd or thread is left. Counts and time are bounded: each
test does a fixed amount of work and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import queue
import random
import selectors
import socket
import sys
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

import tcptotcp
from helpers import Topology, no_leaks

DEADLINE = 45.0  # seconds any one test may take before its threads are declared stuck
GIL_STATE = "gil enabled" if getattr(sys, "_is_gil_enabled", lambda: True)() else "gil disabled"


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def exchange(a: socket.socket, b: socket.socket, to_b: bytes, to_a: bytes, shut: bool = False) -> Tuple[bytes, bytes]:
    """Send `to_b` into a and `to_a` into b at once, and read what comes out of the other ends:
    exactly len(to_b)/len(to_a) bytes, or, with `shut` (each side shuts down writing once it
    sent all), up to EOF. One thread, non-blocking, so neither direction waits on the other.
    Returns (what b received, what a received)."""
    outgoing: Dict[socket.socket, Optional[memoryview]] = {a: memoryview(to_b), b: memoryview(to_a)}
    expect = {a: len(to_a), b: len(to_b)}
    got: Dict[socket.socket, bytearray] = {a: bytearray(), b: bytearray()}
    at_eof = {a: False, b: False}
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + 30
    try:
        for s in (a, b):
            s.setblocking(False)
        while True:
            for s in (a, b):
                view = outgoing[s]
                if view is not None and not len(view):
                    if shut:
                        s.shutdown(socket.SHUT_WR)
                    outgoing[s] = None
            wanted = {}
            for s in (a, b):
                events = 0
                if outgoing[s] is not None:
                    events |= selectors.EVENT_WRITE
                if not at_eof[s] and (shut or len(got[s]) < expect[s]):
                    events |= selectors.EVENT_READ
                if events:
                    wanted[s] = events
            if not wanted:
                break
            for s in (a, b):
                key = sel.get_map().get(s)
                if s not in wanted:
                    if key is not None:
                        sel.unregister(s)
                elif key is None:
                    sel.register(s, wanted[s])
                elif key.events != wanted[s]:
                    sel.modify(s, wanted[s])
            left = deadline - time.monotonic()
            assert left > 0, f"exchange stuck: got {len(got[b])}/{len(to_b)} and {len(got[a])}/{len(to_a)}"
            for key, events in sel.select(min(left, 1.0)):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                view = outgoing[s]
                if events & selectors.EVENT_WRITE and view is not None:
                    try:
                        outgoing[s] = view[s.send(view[: 1 << 16]) :]
                    except BlockingIOError:
                        pass
                if events & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if chunk:
                        got[s] += chunk
                    else:
                        at_eof[s] = True
    finally:
        sel.close()
        for s in (a, b):
            s.setblocking(True)
    return bytes(got[b]), bytes(got[a])


class Crew:
    """Threads that run together; the first exception of any is kept, and joined with a deadline."""

    def __init__(self) -> None:
        self.errors: List[BaseException] = []
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, fn: Callable[..., object], *args: object, name: str = "stress") -> threading.Thread:
        def main() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # reported by join()
                with self._lock:
                    self.errors.append(exc)

        thread = threading.Thread(target=main, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def join(self, deadline: float) -> None:
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if self.errors:
            raise self.errors[0]
        assert not stuck, f"threads still running at the deadline: {stuck}"


class Once:
    """Counts calls per key: every done callback must be called exactly once, with one result."""

    def __init__(self) -> None:
        self.calls: Dict[Any, List[Any]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def callback(self, key: Any) -> Callable[[Any], None]:
        def called(result: Any) -> None:
            with self._lock:
                self.calls[key].append(result)

        return called


# -- many threads, many bridges: start, relay, stop from elsewhere, wait from several ----------

MODES = ("closed", "half_close", "stopped", "stop_races_close", "stop_before_start", "connect")
WORKERS = 12
BRIDGES_PER_WORKER = 24
WAITERS = 4
STOPPERS = 3


def test_threads_start_relay_stop_and_wait_on_many_bridges(engine):
    """WORKERS threads each run BRIDGES_PER_WORKER bridges one after the other (288 in all, every
    way to end), while WAITERS threads wait on every bridge and add a done callback to it,
    STOPPERS threads stop the bridges handed to them, and a watcher reads `counts` of every
    running bridge."""
    rng = random.Random(2613)
    plans = [
        [
            (MODES[(w + j) % len(MODES)], rng.randrange(0, 200_000), rng.randrange(0, 200_000))
            for j in range(BRIDGES_PER_WORKER)
        ]
        for w in range(WORKERS)
    ]
    once = Once()
    results: Dict[Tuple[int, int], List[Any]] = collections.defaultdict(list)  # key -> results seen
    expected: Dict[Tuple[int, int], Tuple[str, int, int]] = {}
    results_lock = threading.Lock()
    waiter_queues: List[queue.Queue] = [queue.Queue() for _ in range(WAITERS)]
    stop_queue: queue.Queue = queue.Queue()
    running: Dict[Tuple[int, int], Any] = {}
    counts_seen: Dict[Tuple[int, int], Tuple[int, int]] = {}
    watching = threading.Event()
    start_together = threading.Barrier(WORKERS)

    def record(key: Tuple[int, int], result: Any) -> None:
        with results_lock:
            results[key].append(result)

    def waiter(index: int) -> None:
        q = waiter_queues[index]
        while True:
            item = q.get()
            if item is None:
                return
            key, bridge = item
            bridge.add_done_callback(once.callback((key, f"waiter{index}")))  # before or after its end
            result = bridge.wait(30)
            assert result is not None, f"{key}: wait() timed out"
            record(key, result)

    def stopper() -> None:
        while True:
            bridge = stop_queue.get()
            if bridge is None:
                return
            bridge.stop()
            bridge.stop()  # twice: a no-op

    def watcher() -> None:
        while not watching.is_set():
            with results_lock:
                live = list(running.items())
            for key, bridge in live:
                now = bridge.counts
                before = counts_seen.get(key, (0, 0))
                assert now[0] >= before[0] and now[1] >= before[1], f"{key}: counts went back: {before} -> {now}"
                counts_seen[key] = now
            time.sleep(0.001)

    def worker(w: int) -> None:
        start_together.wait(DEADLINE)
        for j, (mode, n_ab, n_ba) in enumerate(plans[w]):
            key = (w, j)
            to_b, to_a = os.urandom(n_ab), os.urandom(n_ba)
            with Topology() as t:
                if mode == "connect":
                    outcome: List[Any] = []

                    def peers() -> None:
                        got_b, got_a = exchange(t.peer_a, t.peer_b, to_b, to_a)
                        outcome.append((_digest(got_b) == _digest(to_b), _digest(got_a) == _digest(to_a)))
                        t.peer_a.close()

                    helper = threading.Thread(target=peers, name=f"peers {key}")
                    helper.start()
                    result = engine.connect(t.stream1, t.stream2, 60, 600)
                    helper.join(30)
                    assert outcome == [(True, True)], f"{key}: bytes differ ({outcome})"
                    record(key, result)
                    expected[key] = ("closed", n_ab, n_ba)
                    assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1
                    continue
                bridge = engine.Bridge(t.stream1, t.stream2, 60, 600, half_close=mode == "half_close")
                bridge.add_done_callback(once.callback((key, "before start")))
                if mode == "stop_before_start":
                    stop_queue.put(bridge)  # the stopper races this thread's start()
                bridge.start()
                with results_lock:
                    running[key] = bridge
                for q in waiter_queues:
                    q.put((key, bridge))
                if mode == "stop_before_start":
                    result = bridge.wait(30)
                    assert result is not None, f"{key}: not stopped"
                    t.peer_a.settimeout(10)
                    t.peer_b.settimeout(10)
                    assert t.peer_a.recv(1) == b"" and t.peer_b.recv(1) == b"", f"{key}: peers not closed"
                    expected[key] = ("stopped", 0, 0)
                else:
                    got_b, got_a = exchange(t.peer_a, t.peer_b, to_b, to_a, shut=mode == "half_close")
                    assert _digest(got_b) == _digest(to_b), f"{key} {mode}: 1->2 bytes differ ({len(got_b)}/{n_ab})"
                    assert _digest(got_a) == _digest(to_a), f"{key} {mode}: 2->1 bytes differ ({len(got_a)}/{n_ba})"
                    if mode == "closed":
                        t.peer_a.close()
                        expected[key] = ("closed", n_ab, n_ba)
                    elif mode == "half_close":
                        expected[key] = ("closed", n_ab, n_ba)  # both FINs forwarded: it ends by itself
                    elif mode == "stopped":
                        stop_queue.put(bridge)
                        expected[key] = ("stopped", n_ab, n_ba)
                    else:  # stop_races_close: whichever comes first is the reason
                        stop_queue.put(bridge)
                        t.peer_a.close()
                        expected[key] = ("closed|stopped", n_ab, n_ba)
                    result = bridge.wait(30)
                    assert result is not None, f"{key} {mode}: did not end"
                record(key, result)
                bridge.add_done_callback(once.callback((key, "after end")))  # runs here, at once
                assert len(once.calls[(key, "after end")]) == 1, f"{key}: a late callback did not run at once"
                # The bridge closed both of the caller's sockets before its result was set.
                assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1, f"{key}: sockets still open"
                with results_lock:
                    del running[key]

    with no_leaks(settle=5.0):
        deadline = time.monotonic() + DEADLINE
        helpers, workers = Crew(), Crew()
        for i in range(WAITERS):
            helpers.start(waiter, i, name=f"waiter {i}")
        for _ in range(STOPPERS):
            helpers.start(stopper, name="stopper")
        helpers.start(watcher, name="watcher")
        for w in range(WORKERS):
            workers.start(worker, w, name=f"worker {w}")
        try:
            workers.join(deadline)
        finally:
            watching.set()
            for q in waiter_queues:
                q.put(None)
            for _ in range(STOPPERS):
                stop_queue.put(None)
            helpers.join(deadline)

    total = WORKERS * BRIDGES_PER_WORKER
    assert len(expected) == total, GIL_STATE
    for key, (reasons, n_ab, n_ba) in expected.items():
        seen = results[key]
        connect = plans[key[0]][key[1]][0] == "connect"
        assert len(seen) == (1 if connect else 1 + WAITERS), (key, seen)
        first = seen[0]
        assert all(r is first for r in seen), f"{key}: different result objects {seen}"
        assert first.reason in reasons.split("|"), (key, first, GIL_STATE)
        assert (first.bytes_1_to_2, first.bytes_2_to_1) == (n_ab, n_ba), (key, first, GIL_STATE)
        if connect:
            continue
        for tag in ("before start", "after end", *(f"waiter{i}" for i in range(WAITERS))):
            calls = once.calls[(key, tag)]
            assert len(calls) == 1 and calls[0] is first, f"{key}: callback {tag!r} called {len(calls)} times"
        last = counts_seen.get(key, (0, 0))
        assert last[0] <= n_ab and last[1] <= n_ba, f"{key}: counts {last} above the result {first}"
    assert len(once.calls) == sum(2 + WAITERS for k in expected if plans[k[0]][k[1]][0] != "connect")


def test_one_bridge_shared_by_many_threads(backend):
    """16 threads on each of 24 bridges at once: wait, callbacks, counts and stop all race the
    relay and each other; one result, each callback once, and both sockets closed."""
    threads_per_bridge = 16
    once = Once()
    for round_ in range(24):
        with no_leaks(settle=5.0), Topology() as t:
            bridge = backend.Bridge(t.stream1, t.stream2, 60, 600)
            go = threading.Barrier(threads_per_bridge + 1)
            seen: List[Any] = []
            seen_lock = threading.Lock()
            data = os.urandom(50_000 + round_ * 1000)

            def racer(i: int) -> None:
                go.wait(DEADLINE)
                if i % 4 == 0:
                    bridge.add_done_callback(once.callback((round_, i)))
                elif i % 4 == 1:
                    for _ in range(50):
                        a, b = bridge.counts
                        assert 0 <= a <= len(data) and b == 0
                elif i % 4 == 2 and i > 8:
                    time.sleep(0.002 * i)
                    bridge.stop()
                result = bridge.wait(30)
                assert result is not None
                with seen_lock:
                    seen.append(result)

            crew = Crew()
            for i in range(threads_per_bridge):
                crew.start(racer, i, name=f"racer {i}")
            bridge.start()
            go.wait(DEADLINE)
            try:
                t.peer_a.sendall(data)
            except OSError:
                pass  # stopped already: counted below
            crew.join(time.monotonic() + DEADLINE)
            result = bridge.wait(0)
            assert result is not None and result.reason == "stopped", result
            assert all(r is result for r in seen) and len(seen) == threads_per_bridge
            assert result.bytes_2_to_1 == 0 and 0 <= result.bytes_1_to_2 <= len(data)
            t.peer_b.settimeout(10)
            got = bytearray()
            while True:
                chunk = t.peer_b.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            assert bytes(got) == data[: result.bytes_1_to_2], "the bytes relayed are not the bytes sent"
            assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1
            for i in range(0, threads_per_bridge, 4):
                assert once.calls[(round_, i)] == [result], (round_, i)


# -- asyncio: one bridge awaited from several event loops at once --------------------------

LOOPS = 6
SHARED = 64
OWN = 8


def test_bridges_awaited_from_several_event_loops(backend):
    """LOOPS threads each run an event loop that awaits the same SHARED bridges (and cancels a
    second wait on each), and relays OWN bridges of its own with aconnect(); half the shared
    bridges end before the loops await them, half while they do, stopped or closed from 4
    threads. Every loop gets the one result of each."""
    rng = random.Random(26)
    sizes = [(rng.randrange(0, 100_000), rng.randrange(0, 100_000)) for _ in range(SHARED)]
    with no_leaks(settle=5.0):
        tops = [Topology() for _ in range(SHARED)]
        bridges: List[Any] = []
        try:
            bridges += [backend.Bridge(t.stream1, t.stream2, 60, 600).start() for t in tops]
            payloads = [(os.urandom(a), os.urandom(b)) for a, b in sizes]
            awaiting = threading.Barrier(LOOPS + 1)
            outcomes: Dict[int, Any] = {}

            def end(i: int) -> None:
                t, (to_b, to_a) = tops[i], payloads[i]
                got_b, got_a = exchange(t.peer_a, t.peer_b, to_b, to_a)
                assert _digest(got_b) == _digest(to_b) and _digest(got_a) == _digest(to_a), i
                if i % 2:
                    bridges[i].stop()
                else:
                    t.peer_b.close()

            for i in range(0, SHARED, 2):
                end(i)  # ended before any loop awaits it
                assert bridges[i].wait(30) is not None

            async def own_bridge(loop: asyncio.AbstractEventLoop, k: int) -> Tuple[Any, int, int]:
                with Topology() as t:
                    for s in (t.peer_a, t.peer_b):
                        s.setblocking(False)
                    task = asyncio.ensure_future(backend.module.aconnect(t.stream1, t.stream2, 60, 600))
                    up, down = os.urandom(20_000 + k), os.urandom(3_000 + k)
                    await loop.sock_sendall(t.peer_a, up)
                    got = bytearray()
                    while len(got) < len(up):
                        got += await loop.sock_recv(t.peer_b, 1 << 16)
                    await loop.sock_sendall(t.peer_b, down)
                    back = bytearray()
                    while len(back) < len(down):
                        back += await loop.sock_recv(t.peer_a, 1 << 16)
                    assert _digest(bytes(got)) == _digest(up) and _digest(bytes(back)) == _digest(down)
                    t.peer_a.close()
                    result = await task
                    assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1
                    return result, len(up), len(down)

            async def main(n: int) -> Tuple[List[Any], List[Any]]:
                loop = asyncio.get_running_loop()
                waits = [asyncio.ensure_future(b.wait_async()) for b in bridges]
                doomed = [asyncio.ensure_future(b.wait_async()) for b in bridges]
                own = [asyncio.ensure_future(own_bridge(loop, n * OWN + k)) for k in range(OWN)]
                await asyncio.sleep(0)  # every wait has registered its callback
                for d in doomed:
                    d.cancel()  # cancelling a wait leaves the bridge running
                await asyncio.get_running_loop().run_in_executor(None, awaiting.wait, DEADLINE)
                shared = await asyncio.wait_for(asyncio.gather(*waits), DEADLINE)
                mine = await asyncio.wait_for(asyncio.gather(*own), DEADLINE)
                return shared, mine

            def run_loop(n: int) -> None:
                outcomes[n] = asyncio.run(main(n))

            crew = Crew()
            for n in range(LOOPS):
                crew.start(run_loop, n, name=f"event loop {n}")
            awaiting.wait(DEADLINE)
            enders = Crew()
            for part in range(4):  # the other half ends from 4 threads while every loop awaits
                enders.start(lambda p=part: [end(i) for i in range(1 + 2 * p, SHARED, 8)], name="ender")
            enders.join(time.monotonic() + DEADLINE)
            crew.join(time.monotonic() + DEADLINE)
        finally:
            for bridge in bridges:
                bridge.stop()  # (a no-op for those that ended: all of them unless this failed)
            for bridge in bridges:
                bridge.wait(10)
            for t in tops:
                t.close_peers()
    assert sorted(outcomes) == list(range(LOOPS))
    for i, bridge in enumerate(bridges):
        result = bridge.wait(0)
        assert result is not None
        assert result.reason == ("stopped" if i % 2 else "closed"), (i, result)
        assert (result.bytes_1_to_2, result.bytes_2_to_1) == sizes[i], (i, result)
        for n in range(LOOPS):
            assert outcomes[n][0][i] is result, (n, i)
    for n in range(LOOPS):
        for result, up, down in outcomes[n][1]:
            assert (result.reason, result.bytes_1_to_2, result.bytes_2_to_1) == ("closed", up, down), (n, result)


# -- the forwarder: reconfigured from several threads while clients pass ----------------------


class TaggedEcho:
    """An upstream that sends its one-byte tag, then echoes, until its client closes."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.served = 0
        self._lock = threading.Lock()
        self._crew = Crew()
        self._conns: List[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name=f"upstream {tag!r}", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.served += 1
                self._conns.append(conn)
            self._crew.start(self._echo, conn, name="echo")

    def _echo(self, conn: socket.socket) -> None:
        """Every byte back, until the client (its bridge) closes: it reads all before it does."""
        with conn:
            conn.sendall(self.tag)
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                conn.sendall(data)

    def close(self) -> List[BaseException]:
        """Stop accepting, wait for the echo threads; what they raised."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(10)
        try:
            self._crew.join(time.monotonic() + 10)
        except BaseException:
            pass
        return self._crew.errors


CLIENT_THREADS = 8
CLIENTS_PER_THREAD = 25
RECONFIGURERS = 4


def _scrape(port: int) -> Dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: Dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def test_forwarder_reconfigured_from_threads_while_clients_pass(backend):
    """CLIENT_THREADS threads send checksummed bytes through a Forwarder (200 clients: each reads
    its echo in full, then closes) while RECONFIGURERS threads reconfigure it between two
    upstreams and read `stats` and `open_bridges()`, and (with prometheus_client) 2 threads
    scrape its metrics. Every client gets its bytes back from one of the upstreams; the stats
    and the metrics count every client once."""
    from tcptotcp._metrics import Metrics, MetricsUnavailable

    try:
        metrics: Optional[Metrics] = Metrics()
    except MetricsUnavailable:  # no prometheus_client here: the rest runs without scrapes
        metrics = None
    ups = [TaggedEcho(b"A"), TaggedEcho(b"B")]
    choices = [ups[0].address, ups[1].address, [ups[0].address, ups[1].address]]
    total = CLIENT_THREADS * CLIENTS_PER_THREAD
    sent_total = [0]
    sent_lock = threading.Lock()
    scrapes: List[Dict[str, float]] = []
    try:
        with no_leaks(settle=5.0):
            fwd = tcptotcp.Forwarder("127.0.0.1:0", ups[0].address, bridge_class=backend.Bridge, metrics=metrics)
            port = fwd.address[1]
            metrics_port = metrics.serve("127.0.0.1", 0)[1] if metrics is not None else None
            server = threading.Thread(target=fwd.serve_forever, name="serve_forever", daemon=True)
            server.start()
            clients_done = threading.Event()

            def client(c: int) -> None:
                rng = random.Random(c)
                for k in range(CLIENTS_PER_THREAD):
                    data = os.urandom(rng.randrange(1, 150_000))
                    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                        got = _client_exchange(s, data)
                    assert got[:1] in (b"A", b"B"), f"client {c}.{k}: no upstream tag ({got[:10]!r})"
                    assert _digest(got[1:]) == _digest(data), f"client {c}.{k}: {len(got) - 1}/{len(data)} bytes"
                    with sent_lock:
                        sent_total[0] += len(data)

            def reconfigurer(r: int) -> None:
                rng = random.Random(100 + r)
                while not clients_done.is_set():
                    fwd.reconfigure(rng.choice(choices), balance=rng.choice(["first", "roundrobin"]))
                    stats = fwd.stats
                    assert 0 <= stats.active <= total and stats.accepted <= total, stats
                    for entry in fwd.open_bridges():
                        assert isinstance(entry, dict)
                    time.sleep(0.002)

            def scraper() -> None:
                last = 0.0
                while not clients_done.is_set():
                    assert metrics_port is not None
                    totals = _scrape(metrics_port)
                    accepted = totals.get("tcptotcp_connections_accepted_total", 0.0)
                    assert last <= accepted <= total, (last, accepted)
                    last = accepted
                    scrapes.append(totals)
                    time.sleep(0.01)

            helpers, clients = Crew(), Crew()
            deadline = time.monotonic() + DEADLINE
            for r in range(RECONFIGURERS):
                helpers.start(reconfigurer, r, name=f"reconfigure {r}")
            if metrics is not None:
                for _ in range(2):
                    helpers.start(scraper, name="scraper")
            for c in range(CLIENT_THREADS):
                clients.start(client, c, name=f"client {c}")
            try:
                clients.join(deadline)
            finally:
                clients_done.set()
                helpers.join(deadline)
                # Every client read its upstream's EOF: its bridge ended; wait until the
                # forwarder has taken that event (its batches come every 50 ms).
                settle = time.monotonic() + 10
                while time.monotonic() < settle and (fwd.stats.active or fwd.stats.bytes_down < sent_total[0] + total):
                    time.sleep(0.01)
                stats = fwd.stats
                fwd.close()
                server.join(10)
                assert not server.is_alive(), "serve_forever() did not return after close()"
                final = _scrape(metrics_port) if metrics_port is not None else None
                if metrics is not None:
                    metrics.close()
        assert (stats.accepted, stats.refused, stats.upstream_failures, stats.active) == (total, 0, 0, 0), stats
        assert (stats.bytes_up, stats.bytes_down) == (sent_total[0], sent_total[0] + total), stats  # + the tags
        assert sum(u.served for u in ups) == total
        if final is not None:
            assert final["tcptotcp_connections_accepted_total"] == total, final
            assert final["tcptotcp_bytes_up_total"] == sent_total[0], final
            assert final["tcptotcp_bytes_down_total"] == sent_total[0] + total, final
            assert final["tcptotcp_connections_active"] == 0, final
            assert final["tcptotcp_bridges_ended_total"] == total, final
            assert scrapes, "no scrape ran while clients passed"
    finally:
        upstream_errors = [exc for u in ups for exc in u.close()]
    assert not upstream_errors, upstream_errors


def _client_exchange(s: socket.socket, data: bytes) -> bytes:
    """Send `data` while reading what comes back: the upstream's tag byte and the echo."""
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view: Optional[memoryview] = memoryview(data)
    got = bytearray()
    deadline = time.monotonic() + 30
    try:
        while len(got) < len(data) + 1:
            left = deadline - time.monotonic()
            assert left > 0, f"client stuck: {len(got)} bytes back of {len(data) + 1}"
            for _, events in sel.select(min(left, 1.0)):
                if events & selectors.EVENT_WRITE and view is not None:
                    try:
                        view = view[s.send(view[: 1 << 16]) :]
                    except BlockingIOError:
                        pass
                    if not len(view):
                        view = None
                        sel.modify(s, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    assert chunk, f"EOF after {len(got)} bytes back of {len(data) + 1}"
                    got += chunk
    finally:
        sel.close()
    return bytes(got)
