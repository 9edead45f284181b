"""Every byte arrives, intact and in order, and is counted exactly."""

import os
import socket
import time

import pytest

from helpers import (
    IPV6_OK,
    Background,
    Topology,
    link,
    recv_exactly,
    recv_until_eof,
    send_and_shut,
    sha,
    tls_link,
)

BIG = 64 * 1024 * 1024 + 12345  # 64 MiB+ and not a multiple of any buffer size


def test_bulk_both_ways_at_once_checksummed(engine):
    a_to_b, b_to_a = os.urandom(BIG), os.urandom(BIG // 2 + 7)
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 60, half_close=True).start()
        senders = [send_and_shut(t.peer_a, a_to_b), send_and_shut(t.peer_b, b_to_a)]
        at_b = Background(lambda: recv_until_eof(t.peer_b))
        at_a = Background(lambda: recv_until_eof(t.peer_a))
        assert at_b.result(60) == (len(a_to_b), sha(a_to_b))
        assert at_a.result(60) == (len(b_to_a), sha(b_to_a))
        for s in senders:
            s.result()
        result = bridge.wait(10)
    assert result is not None
    assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (len(a_to_b), len(b_to_a), "closed")


def test_short_writes_with_tiny_send_buffer(engine):
    """A tiny send buffer on a non-blocking fd and a slow reader force partial writes."""
    payload = os.urandom(1024 * 1024 + 1)
    with Topology() as t:
        t.stream2.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.stream2.settimeout(0)  # non-blocking: send() returns short counts and EAGAIN
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 60).start()
        sender = send_and_shut(t.peer_a, payload)
        got = bytearray()
        t.peer_b.settimeout(20)
        while True:
            chunk = t.peer_b.recv(1500)  # small reads keep the window nearly closed
            if not chunk:
                break
            got += chunk
        sender.result()
        result = bridge.wait(10)
    assert sha(bytes(got)) == sha(payload) and len(got) == len(payload)
    assert result is not None and result.bytes_1_to_2 == len(payload) and result.reason == "closed"


@pytest.mark.parametrize("timeout", [0, 0.3, 5])
def test_socket_timeouts_are_no_idle_policy(engine, timeout):
    with Topology() as t:
        t.stream1.settimeout(timeout)
        t.stream2.settimeout(timeout)
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 30, activity="any").start()
        t.peer_a.sendall(b"before")
        assert recv_exactly(t.peer_b, 6) == b"before"
        time.sleep(0.8)  # a lull longer than the 0.3 s socket timeout
        assert bridge.wait(0) is None
        big = os.urandom(2 * 1024 * 1024)
        sender = Background(lambda: t.peer_b.sendall(big))
        assert recv_exactly(t.peer_a, len(big)) == big
        sender.result()
        t.peer_a.sendall(b"after")
        assert recv_exactly(t.peer_b, 5) == b"after"
        bridge.stop()
        result = bridge.wait(5)
    assert result is not None and result.reason == "stopped"
    assert (result.bytes_1_to_2, result.bytes_2_to_1) == (11, len(big))


def test_many_tiny_messages_in_order(backend):
    with Topology() as t:
        bridge = backend.Bridge(t.stream1, t.stream2, 1, 30).start()
        t.peer_b.settimeout(10)
        t.peer_a.settimeout(10)
        for i in range(2000):
            msg = i.to_bytes(4, "big")
            t.peer_a.sendall(msg)
            assert recv_exactly(t.peer_b, 4) == msg
            t.peer_b.sendall(msg[::-1])
            assert recv_exactly(t.peer_a, 4) == msg[::-1]
        bridge.stop()
        result = bridge.wait(5)
    assert result is not None and result.bytes_1_to_2 == result.bytes_2_to_1 == 8000


def test_unacknowledged_burst_of_one_byte_writes(backend):
    with Topology() as t:
        for s in (t.peer_a, t.peer_b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bridge = backend.Bridge(t.stream1, t.stream2, 1, 30).start()
        expected = bytes(i % 251 for i in range(20000))
        sender = Background(lambda: [t.peer_a.send(expected[i : i + 1]) for i in range(len(expected))])
        assert recv_exactly(t.peer_b, len(expected)) == expected
        sender.result()
        bridge.stop()
        assert bridge.wait(5) is not None


FAMILY_PAIRS = [
    ("tcp", "tcp"),
    ("tcp6", "tcp6"),
    ("unix", "unix"),
    ("unix-path", "tcp"),
    ("tcp", "tcp6"),
    ("tcp6", "unix"),
]


@pytest.mark.unix
@pytest.mark.parametrize("kind1,kind2", FAMILY_PAIRS)
def test_address_families_and_mixed_pairs(engine, kind1, kind2, socket_dir):
    if "tcp6" in (kind1, kind2) and not IPV6_OK:
        pytest.skip("no ::1 on this machine")
    one, two = os.urandom(1024 * 1024 + 3), os.urandom(777777)
    with Topology(kind1, kind2, socket_dir) as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 30, half_close=True).start()
        senders = [send_and_shut(t.peer_a, one), send_and_shut(t.peer_b, two)]
        assert recv_until_eof(t.peer_b) == (len(one), sha(one))
        assert recv_until_eof(t.peer_a) == (len(two), sha(two))
        for s in senders:
            s.result()
        result = bridge.wait(10)
    assert result is not None and result.reason == "closed"
    assert (result.bytes_1_to_2, result.bytes_2_to_1) == (len(one), len(two))


def test_tls_on_one_side_relays_plaintext(backend):
    tls_peer, tls_bridge_end = tls_link()
    plain_peer, plain_bridge_end = link("tcp")
    try:
        bridge = backend.Bridge(tls_bridge_end, plain_bridge_end, 1, 30).start()
        request = os.urandom(300000)
        tls_peer.sendall(request)
        assert recv_exactly(plain_peer, len(request)) == request  # plaintext came out
        reply = os.urandom(200000)
        plain_peer.sendall(reply)
        assert recv_exactly(tls_peer, len(reply)) == reply  # and went back encrypted
        plain_peer.close()
        result = bridge.wait(10)
        assert result is not None and result.reason == "closed"
        assert (result.bytes_1_to_2, result.bytes_2_to_1) == (len(request), len(reply))
    finally:
        for s in (tls_peer, plain_peer, tls_bridge_end, plain_bridge_end):
            s.close()


def test_exact_counts_and_every_byte_before_close(engine):
    """half_close=False: the closing peer's last bytes still all reach the other side."""
    tail = os.urandom(5 * 1024 * 1024 + 11)
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 30).start()
        t.peer_b.sendall(b"x" * 1000)
        assert recv_exactly(t.peer_a, 1000) == b"x" * 1000
        t.peer_a.sendall(tail)
        t.peer_a.close()
        assert recv_until_eof(t.peer_b) == (len(tail), sha(tail))
        result = bridge.wait(10)
    assert result is not None
    assert (result.bytes_1_to_2, result.bytes_2_to_1, result.reason) == (len(tail), 1000, "closed")


def test_bulk_goes_through_splice_and_small_messages_do_not(engine):
    """The core's hybrid: recv/send for small messages, splice (Linux) once a stream is bulk."""
    with Topology() as t:
        bridge = engine.Bridge(t.stream1, t.stream2, 1, 30).start()
        for _ in range(50):
            t.peer_a.sendall(b"ping")
            assert recv_exactly(t.peer_b, 4) == b"ping"
        bulk = os.urandom(16 * 1024 * 1024)
        sender = Background(lambda: t.peer_b.sendall(bulk))
        assert recv_exactly(t.peer_a, len(bulk)) == bulk
        sender.result()
        splices = engine.name == "cython" and engine.module._core.SPLICE_AVAILABLE
        assert getattr(bridge._relay, "used_splice", (False, False)) == (False, bool(splices))
        bridge.stop()
        result = bridge.wait(5)
    assert result is not None and (result.bytes_1_to_2, result.bytes_2_to_1) == (200, len(bulk))


def test_urgent_data_never_stalls_what_is_queued_behind_it(engine):
    """recv stops at TCP's urgent mark: a short read is no proof that the queue is empty, so
    the bytes queued behind the mark are relayed without waiting for another segment."""
    with Topology() as t:
        t.peer_a.send(b"abc", socket.MSG_OOB)  # "c" is the urgent byte, out of band
        t.peer_a.sendall(b"def")
        time.sleep(0.1)  # all of it queued before the bridge's first read
        bridge = engine.Bridge(t.stream1, t.stream2, 60, 600).start()
        assert recv_exactly(t.peer_b, 5, timeout=5) == b"abdef"
        bridge.stop()
        result = bridge.wait(5)
    assert result is not None and result.bytes_1_to_2 == 5
