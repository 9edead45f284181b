"""How a bridge ends: closed, half-closed, error, stopped; promptly; sockets closed."""

import os
import socket
import struct
import threading
import time

import pytest

from helpers import Background, Topology, recv_exactly, recv_until_eof, send_and_shut, sha

PROMPT = 0.5  # "within a small fraction of a second", with room for a loaded machine


@pytest.mark.parametrize("closing", ["a", "b"])
def test_prompt_return_on_peer_close_with_slow_rate_check(backend, closing):
    with Topology() as t:
        running = Background(lambda: backend.connect(t.stream1, t.stream2, 5, 60))
        t.peer_a.sendall(b"hello")
        assert recv_exactly(t.peer_b, 5) == b"hello"
        time.sleep(0.2)
        closed_at = time.monotonic()
        (t.peer_a if closing == "a" else t.peer_b).close()
        result = running.result(5)
        assert time.monotonic() - closed_at < PROMPT
        assert result.reason == "closed" and result.bytes_1_to_2 == 5
        survivor = t.peer_b if closing == "a" else t.peer_a
        survivor.settimeout(2)
        assert survivor.recv(10) == b""  # the other side was shut down too


def test_sockets_are_closed_on_return(backend):
    with Topology() as t:
        t.peer_b.close()
        result = backend.connect(t.stream1, t.stream2, 1, 10)
        assert result.reason == "closed"
        assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1


@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_forwards_eof_and_keeps_other_direction(engine, first):
    request, reply = os.urandom(1_000_003), os.urandom(2_000_003)
    with Topology() as t:
        asker, answerer = (t.peer_a, t.peer_b) if first == "a" else (t.peer_b, t.peer_a)
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 30, half_close=True).start()
        asker.sendall(request)
        asker.shutdown(socket.SHUT_WR)
        assert recv_until_eof(answerer) == (len(request), sha(request))  # EOF forwarded
        assert bridge.wait(0.3) is None  # the other direction still flows
        answerer.sendall(reply)
        answerer.shutdown(socket.SHUT_WR)
        assert recv_until_eof(asker) == (len(reply), sha(reply))
        result = bridge.wait(5)
    assert result is not None and result.reason == "closed"
    counts = (len(request), len(reply)) if first == "a" else (len(reply), len(request))
    assert (result.bytes_1_to_2, result.bytes_2_to_1) == counts


def test_half_close_false_ends_on_first_eof(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 5, 30).start()
        t.peer_a.shutdown(socket.SHUT_WR)
        result = bridge.wait(PROMPT)
        assert result is not None and result.reason == "closed"


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST instead of FIN


@pytest.mark.parametrize("side", ["a", "b"])
def test_reset_is_an_error(backend, side):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 5, 30).start()
        t.peer_a.sendall(b"ping")
        assert recv_exactly(t.peer_b, 4) == b"ping"
        reset_at = time.monotonic()
        _reset(t.peer_a if side == "a" else t.peer_b)
        result = bridge.wait(2)
        assert result is not None and result.reason == "error"
        assert time.monotonic() - reset_at < PROMPT


def test_reset_mid_transfer_is_an_error(engine):
    """Several rounds: the kernel hands ECONNRESET to one caller only (and a partial splice
    can swallow it), so the reading pump often sees a plain EOF. Still "error", every time."""
    reasons = []
    for _ in range(8):
        with Topology() as t:
            bridge = engine.Bridge(t.stream1, t.stream2, 5, 30).start()
            stop = threading.Event()

            def flood():
                chunk = os.urandom(65536)
                while not stop.is_set():
                    try:
                        t.peer_a.sendall(chunk)
                    except OSError:
                        return

            flooder = Background(flood)
            assert len(recv_exactly(t.peer_b, 1 << 20)) == 1 << 20
            _reset(t.peer_b)
            result = bridge.wait(3)
            stop.set()
            flooder.result(5)
            assert result is not None
            reasons.append(result.reason)
    assert reasons == ["error"] * 8


def test_bridge_stop_from_another_thread_is_prompt(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 5, 60)
        running = Background(bridge.run)
        t.peer_b.sendall(b"xyz")
        assert recv_exactly(t.peer_a, 3) == b"xyz"
        stopped_at = time.monotonic()
        threading.Thread(target=bridge.stop).start()
        result = running.result(5)
        assert time.monotonic() - stopped_at < PROMPT
    assert result.reason == "stopped" and result.bytes_2_to_1 == 3


def test_context_manager_starts_and_stops(backend):
    with Topology() as t:
        with backend.Bridge(t.stream1, t.stream2, 1, 60) as bridge:
            assert bridge.running
            t.peer_a.sendall(b"inside")
            assert recv_exactly(t.peer_b, 6) == b"inside"
        result = bridge.wait(0)
        assert result is not None and result.reason == "stopped" and result.bytes_1_to_2 == 6
        assert not bridge.running
        assert t.stream1.fileno() == -1 and t.stream2.fileno() == -1
        t.peer_a.settimeout(2)
        assert t.peer_a.recv(1) == b""


def test_stop_before_start_ends_at_once(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 5, 60)
        bridge.stop()
        result = bridge.start().wait(2)
    assert result is not None and result.reason == "stopped"


def test_bridge_runs_once(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 5, 60)
        with pytest.raises(RuntimeError):
            bridge.wait(0)
        bridge.start()
        with pytest.raises(RuntimeError):
            bridge.start()
        bridge.stop()
        assert bridge.wait(5) is not None


def test_caller_closing_its_sockets_changes_nothing(engine):
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 60).start()
        t.stream1.close()
        t.stream2.close()
        # Fresh sockets may now get the freed fd numbers; the bridge must not care.
        strangers = [socket.socket() for _ in range(4)]
        payload = os.urandom(3 * 1024 * 1024)
        sender = Background(lambda: t.peer_a.sendall(payload))
        assert recv_exactly(t.peer_b, len(payload)) == payload
        sender.result()
        t.peer_b.sendall(b"back")
        assert recv_exactly(t.peer_a, 4) == b"back"
        bridge.stop()
        result = bridge.wait(5)
        assert result is not None and result.reason == "stopped"
        for s in strangers:
            assert s.fileno() >= 0
            s.bind(("127.0.0.1", 0))  # still a usable, untouched socket
            s.close()
        t.peer_a.settimeout(2)
        assert t.peer_a.recv(1) == b""


def test_closing_after_unread_input_still_delivers_everything(engine):
    """half_close=False: B is still sending when A finishes. Closing stream2 with B's unread bytes
    would send B an RST that destroys the tail of A's bytes still on their way to B. The drain
    reads B's flood until it stops, and never closes before B has acknowledged the tail."""
    for _ in range(3):
        with Topology() as t:
            t.stream1.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            t.peer_a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # A reads nothing
            bridge = engine.Bridge(t.stream1, t.stream2, 5, 60).start()
            t.peer_b.setblocking(False)
            try:
                for _ in range(64):  # B fills every buffer on its way to A
                    t.peer_b.send(bytes(65536))
            except BlockingIOError:
                pass
            t.peer_b.setblocking(True)
            tail = os.urandom(3 * 1024 * 1024)
            sender = send_and_shut(t.peer_a, tail)
            time.sleep(0.3)  # B reads only after the bridge has ended and closed
            assert recv_until_eof(t.peer_b) == (len(tail), sha(tail))
            sender.result()
            result = bridge.wait(5)
            assert result is not None and result.reason == "closed"
            assert result.bytes_1_to_2 == len(tail)


def test_the_drain_is_bounded_for_the_whole_bridge(engine):
    """Both peers keep sending after the end: the drain gives up on both sides together within
    its 250 ms bound (not 250 ms a side, one after the other), and the bridge ends."""
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 60, 600).start()
        stop_sending = threading.Event()

        def flood(sock: socket.socket) -> None:
            chunk = bytes(65536)
            deadline = time.monotonic() + 10
            try:
                while not stop_sending.is_set() and time.monotonic() < deadline:
                    sock.send(chunk)
            except OSError:
                pass  # reset once the bridge closed on our unread bytes

        def sink(sock: socket.socket) -> None:
            sock.settimeout(10)
            try:
                while sock.recv(1 << 20):
                    pass
            except OSError:
                pass

        workers = [threading.Thread(target=fn, args=(s,)) for fn in (flood, sink) for s in (t.peer_a, t.peer_b)]
        for w in workers:
            w.start()
        try:
            deadline = time.monotonic() + 10
            while min(bridge.counts) < 1 << 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert min(bridge.counts) >= 1 << 20  # both ways flowing
            started = time.monotonic()
            bridge.stop()
            result = bridge.wait(5)
            took = time.monotonic() - started
        finally:
            stop_sending.set()
            for s in (t.peer_a, t.peer_b):
                try:
                    s.shutdown(socket.SHUT_RDWR)  # wakes the sinks
                except OSError:
                    pass  # already reset by the bridge's close
            for w in workers:
                w.join(10)
        assert result is not None and result.reason == "stopped"
        # 250 ms and scheduling; two sides drained one after the other would take 500 ms or more.
        assert took < 0.45, took
