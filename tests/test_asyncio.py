"""asyncio programs await bridges: aconnect(), wait_async(), async with, cancellation, the
handover of asyncio streams, many bridges on one event loop, and uvloop where it installs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import statistics
import threading
import time

import pytest

from helpers import HAS_PROC, Topology, bridge_fds, link, recv_exactly


def _run(coro, loop_factory=None):
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 120))
    finally:
        loop.close()


async def _pump_through(loop, a: socket.socket, b: socket.socket, payload: bytes) -> bytes:
    """Send payload into a, read len(payload) from b; both non-blocking, on the loop."""
    sender = asyncio.ensure_future(loop.sock_sendall(a, payload))
    got = bytearray()
    while len(got) < len(payload):
        chunk = await loop.sock_recv(b, min(1 << 20, len(payload) - len(got)))
        assert chunk, "EOF before the payload arrived"
        got += chunk
    await sender
    return bytes(got)


def test_aconnect_relays_and_returns_exact_counts(backend):
    async def main():
        loop = asyncio.get_running_loop()
        with Topology() as t:
            for s in (t.peer_a, t.peer_b):
                s.setblocking(False)
            task = asyncio.ensure_future(backend.module.aconnect(t.stream1, t.stream2, 60, 600))
            up, down = os.urandom(3_000_000), os.urandom(1234)
            assert await _pump_through(loop, t.peer_a, t.peer_b, up) == up
            assert await _pump_through(loop, t.peer_b, t.peer_a, down) == down
            t.peer_a.close()
            result = await task
            assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (len(up), len(down), "closed")
            assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1

    _run(main())


def test_cancelling_aconnect_stops_the_bridge_and_closes_both_sockets(backend):
    async def main():
        with Topology() as t:
            fds = bridge_fds()
            task = asyncio.ensure_future(backend.module.aconnect(t.stream1, t.stream2, 60, 600))
            await asyncio.sleep(0.1)
            t.peer_a.sendall(b"before cancel")
            await asyncio.sleep(0.1)
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - cancelled_at < 1.0
            assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1
            assert recv_exactly(t.peer_b, 13) == b"before cancel"
            t.peer_b.settimeout(2)
            assert t.peer_b.recv(1) == b""  # its bridge is gone: FIN
            deadline = time.monotonic() + 2
            while bridge_fds() != fds - 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert bridge_fds() == fds - 2  # the two streams; nothing of the bridge is left

    _run(main())


def test_cancelling_wait_async_leaves_the_bridge_running(backend):
    async def main():
        with Topology() as t:
            bridge = backend.Bridge(t.stream1, t.stream2, 60, 600).start()
            waiters = [asyncio.ensure_future(bridge.wait_async()) for _ in range(3)]
            await asyncio.sleep(0.05)
            waiters[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiters[0]
            assert bridge.running
            t.peer_a.sendall(b"still here")
            assert recv_exactly(t.peer_b, 10) == b"still here"
            bridge.stop()
            results = await asyncio.gather(*waiters[1:])
            assert all(r.reason == "stopped" and r.bytes_1_to_2 == 10 for r in results)
            assert await bridge.wait_async() is results[0]  # after the end: at once

    _run(main())


def test_async_with_starts_and_stops(backend):
    async def main():
        with Topology() as t:
            async with backend.Bridge(t.stream1, t.stream2, 60, 600) as bridge:
                assert bridge.running
                t.peer_b.sendall(b"inside")
                assert recv_exactly(t.peer_a, 6) == b"inside"
            result = bridge.wait(0)
            assert result is not None and (result.reason, result.bytes_2_to_1) == ("stopped", 6)

    _run(main())


def test_wait_async_needs_a_started_bridge(backend):
    async def main():
        with Topology() as t:
            bridge = backend.Bridge(t.stream1, t.stream2, 60, 600)
            with pytest.raises(RuntimeError):
                await bridge.wait_async()

    _run(main())


def test_sockets_from_sock_accept_and_sock_connect(backend):
    """A tiny asyncio port forwarder on raw sockets: accept, connect, aconnect."""

    async def main():
        loop = asyncio.get_running_loop()
        upstream = socket.create_server(("127.0.0.1", 0))
        front = socket.create_server(("127.0.0.1", 0))
        for s in (upstream, front):
            s.setblocking(False)

        async def forward_one():
            client, _ = await loop.sock_accept(front)
            up = socket.socket()
            up.setblocking(False)
            await loop.sock_connect(up, upstream.getsockname())
            return await backend.module.aconnect(client, up, 60, 600)

        try:
            forwarding = asyncio.ensure_future(forward_one())
            user = socket.socket()
            user.setblocking(False)
            await loop.sock_connect(user, front.getsockname())
            far, _ = await loop.sock_accept(upstream)
            far.setblocking(False)
            payload = os.urandom(200_000)
            assert await _pump_through(loop, user, far, payload) == payload
            assert await _pump_through(loop, far, user, payload[:999]) == payload[:999]
            user.close()
            result = await forwarding
            assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (200_000, 999, "closed")
            far.close()
        finally:
            upstream.close()
            front.close()

    _run(main())


def test_stream_handover_loses_no_buffered_byte(backend):
    """start_server / open_connection streams: bytes asyncio already read are handed over with
    the socket, bytes the writer buffered go out first, and the transport leaves the fd open."""

    async def main():
        loop = asyncio.get_running_loop()
        echo_listener = socket.create_server(("127.0.0.1", 0))
        echo_listener.setblocking(False)
        results = []

        async def handle(reader, writer):
            greeting = await reader.readexactly(5)  # asyncio reads more than that: the rest is buffered
            writer.write(b"welcome:" + greeting)
            client, early = await backend.module.take_socket(reader, writer)
            up_reader, up_writer = await asyncio.open_connection(*echo_listener.getsockname())
            upstream, up_early = await backend.module.take_socket(up_reader, up_writer)
            assert up_early == b""
            await loop.sock_sendall(upstream, early)  # the client's bytes asyncio had read
            results.append((len(early), await backend.module.aconnect(client, upstream, 60, 600)))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            user = socket.create_connection(server.sockets[0].getsockname(), timeout=10)
            first = b"hello" + os.urandom(60_000)  # one write: asyncio reads past the greeting
            user.sendall(first)
            far, _ = await loop.sock_accept(echo_listener)
            far.setblocking(False)
            got = bytearray()
            while len(got) < len(first) - 5:
                chunk = await loop.sock_recv(far, 1 << 20)
                assert chunk
                got += chunk
            assert bytes(got) == first[5:]
            await loop.sock_sendall(far, b"reply")
            user.setblocking(False)
            welcome = bytearray()
            while len(welcome) < len(b"welcome:hello") + 5:
                welcome += await loop.sock_recv(user, 100)
            assert bytes(welcome) == b"welcome:hello" + b"reply"
            user.close()
            while not results:
                await asyncio.sleep(0.01)
            early_count, result = results[0]
            assert result.reason == "closed"
            assert early_count + result.bytes_1_to_2 == len(first) - 5
            assert result.bytes_2_to_1 == 5
            far.close()
        finally:
            server.close()
            await server.wait_closed()
            echo_listener.close()

    _run(main())


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@pytest.mark.unix
def test_a_thousand_bridges_awaited_on_one_loop_while_a_ticker_keeps_time(backend):
    count = 1000
    if _raise_fd_limit() < count * 10 + 200:
        pytest.skip("not enough file descriptors")

    async def main():
        loop = asyncio.get_running_loop()
        delays = []
        stop_ticking = asyncio.Event()

        async def ticker():
            while not stop_ticking.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.005)
                delays.append(time.monotonic() - before - 0.005)

        links = [(link("unix"), link("unix")) for _ in range(count)]  # made before the clock runs
        relayed = []
        all_open = asyncio.Event()

        async def one(i: int):
            (a, s1), (s2, b) = links[i]
            for s in (a, b):
                s.setblocking(False)
            await asyncio.sleep(i * 0.001)  # clients arrive over a second, as on a server
            task = asyncio.ensure_future(backend.module.aconnect(s1, s2, 60, 600))
            up, down = os.urandom(2000 + i), os.urandom(500 + i % 100)
            assert hashlib.sha256(await _pump_through(loop, a, b, up)).digest() == hashlib.sha256(up).digest()
            assert await _pump_through(loop, b, a, down) == down
            relayed.append(i)
            if len(relayed) == count:
                all_open.set()
            await all_open.wait()  # 1,000 bridges open and awaited at once
            assert not task.done()
            await asyncio.sleep(i * 0.001)
            a.close()
            result = await task
            b.close()
            return result, len(up), len(down)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        threads_before = threading.active_count()
        outcomes = await asyncio.gather(*(one(i) for i in range(count)))
        stop_ticking.set()
        await tick
        for result, up, down in outcomes:
            assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (up, down, "closed")
        return delays, threads_before

    delays, threads_before = _run(main())
    p99 = statistics.quantiles(delays, n=100)[98]
    if backend.name == "cython":
        assert p99 < 0.020, f"p99 tick delay {p99 * 1000:.1f} ms"
        assert threading.active_count() <= threads_before + 1  # no thread per bridge


@pytest.mark.unix
@pytest.mark.proc
@pytest.mark.skipif(not HAS_PROC, reason="counts threads in /proc")
def test_the_compiled_backend_starts_no_thread_per_awaited_bridge(backend):
    async def main():
        tops = [Topology("unix", "unix") for _ in range(50)]
        try:
            tasks = [asyncio.ensure_future(backend.module.aconnect(t.stream1, t.stream2, 60, 600)) for t in tops]
            await asyncio.sleep(0.2)
            during = len(os.listdir("/proc/self/task"))
            for t in tops:
                t.peer_a.close()
            await asyncio.gather(*tasks)
            return during
        finally:
            for t in tops:
                t.__exit__()

    _run(asyncio.sleep(0))  # an event loop has run (its executor threads, if any, exist)
    with Topology("unix", "unix") as warm:  # and so has a bridge: the engine's threads exist
        backend.Bridge(warm.stream1, warm.stream2, 60, 600).start().stop()
    time.sleep(0.2)
    before = len(os.listdir("/proc/self/task"))
    during = _run(main())
    if backend.name == "cython":
        assert during == before, (before, during)
    else:
        assert during >= before + 150  # the pure twin: three threads a bridge


def test_under_uvloop(backend):
    uvloop = pytest.importorskip("uvloop")

    async def main():
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)

        async def handle(reader, writer):
            client, early = await backend.module.take_socket(reader, writer)
            up = socket.socket()
            up.setblocking(False)
            await loop.sock_connect(up, listener.getsockname())
            await loop.sock_sendall(up, early)
            done.append(await backend.module.aconnect(client, up, 60, 600))

        done = []
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            user = socket.socket()
            user.setblocking(False)
            await loop.sock_connect(user, server.sockets[0].getsockname())
            far, _ = await loop.sock_accept(listener)
            far.setblocking(False)
            payload = os.urandom(500_000)
            assert await _pump_through(loop, user, far, payload) == payload
            user.close()
            while not done:
                await asyncio.sleep(0.01)
            assert done[0].reason == "closed"
            far.close()
        finally:
            server.close()
            listener.close()

    _run(main(), loop_factory=uvloop.new_event_loop)
