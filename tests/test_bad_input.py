"""Bad input raises before any thread starts, leaks nothing and leaves the sockets as they were."""

import io
import socket
import tempfile

import pytest

from helpers import Topology, link, no_leaks, recv_exactly


def _socket_state(s: socket.socket):
    return (s.fileno(), s.gettimeout(), s.family, s.type)


def _assert_untouched(t: Topology, before) -> None:
    assert [_socket_state(s) for s in (t.stream1, t.stream2)] == before
    # Still connected and working: nothing was shut down.
    t.stream1.sendall(b"?")
    assert recv_exactly(t.peer_a, 1) == b"?"


def _call(backend, how, *args, **kwargs):
    if how == "connect":
        return backend.connect(*args, **kwargs)
    return backend.Bridge(*args, **kwargs)


BAD_SOCKETS = {
    "int": lambda: 5,
    "none": lambda: None,
    "file": lambda: io.BytesIO(b""),
    "socket-like": lambda: type("FakeSocket", (), {"fileno": lambda self: 0, "recv": lambda self, n: b""})(),
}


@pytest.mark.parametrize("how", ["connect", "Bridge"])
@pytest.mark.parametrize("bad", sorted(BAD_SOCKETS))
@pytest.mark.parametrize("position", [0, 1])
def test_not_a_socket_is_type_error(backend, how, bad, position):
    with Topology() as t, no_leaks(settle=0.5):
        before = [_socket_state(s) for s in (t.stream1, t.stream2)]
        args = [t.stream1, t.stream2]
        args[position] = BAD_SOCKETS[bad]()
        with pytest.raises(TypeError):
            _call(backend, how, *args, 1, 2)
        _assert_untouched(t, before)


@pytest.mark.parametrize("how", ["connect", "Bridge"])
@pytest.mark.parametrize(
    "r,k",
    [("5", 2), (1, "5"), (1.5, 2), (1, 2.0), (None, 2), (1, None), (b"1", 2)],
)
def test_non_integer_parameters_are_type_error(backend, how, r, k):
    with Topology() as t, no_leaks(settle=0.5):
        before = [_socket_state(s) for s in (t.stream1, t.stream2)]
        with pytest.raises(TypeError):
            _call(backend, how, t.stream1, t.stream2, r, k)
        _assert_untouched(t, before)


@pytest.mark.parametrize("how", ["connect", "Bridge"])
@pytest.mark.parametrize("activity", ["all", "", None, "BOTH", 1])
def test_unknown_activity_is_value_error(backend, how, activity):
    with Topology() as t, no_leaks(settle=0.5):
        before = [_socket_state(s) for s in (t.stream1, t.stream2)]
        with pytest.raises(ValueError):
            _call(backend, how, t.stream1, t.stream2, 1, 2, activity=activity)
        _assert_untouched(t, before)


def _closed_socket():
    s = socket.socket()
    s.close()
    return s


def _udp_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", 9))  # connected, but not a stream
    return s


def _listening_socket():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


BAD_VALUES = {
    "closed": _closed_socket,
    "datagram": _udp_socket,
    "listening": _listening_socket,
    "unconnected": socket.socket,
}


@pytest.mark.parametrize("how", ["connect", "Bridge"])
@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_unusable_socket_is_value_error(backend, how, bad):
    with Topology() as t:
        odd = BAD_VALUES[bad]()
        try:
            with no_leaks(settle=0.5):
                before = [_socket_state(s) for s in (t.stream1, t.stream2)]
                with pytest.raises(ValueError):
                    _call(backend, how, t.stream1, odd, 1, 2)
                _assert_untouched(t, before)
        finally:
            odd.close()


@pytest.mark.parametrize("how", ["connect", "Bridge"])
def test_same_socket_twice_is_value_error(backend, how):
    with Topology() as t, no_leaks(settle=0.5):
        before = [_socket_state(s) for s in (t.stream1, t.stream2)]
        with pytest.raises(ValueError):
            _call(backend, how, t.stream1, t.stream1, 1, 2)
        # The same connection under another object is the same socket too.
        alias = socket.socket(fileno=t.stream1.fileno())
        try:
            with pytest.raises(ValueError):
                _call(backend, how, t.stream1, alias, 1, 2)
        finally:
            alias.detach()
        _assert_untouched(t, before)


def test_a_regular_file_is_type_error(backend):
    with tempfile.TemporaryFile() as f, Topology() as t:
        with pytest.raises(TypeError):
            backend.connect(f, t.stream2, 1, 2)


def test_already_shut_down_socket_ends_closed(backend):
    """Not an input error: a peer that already left simply ends the bridge."""
    with Topology() as t:
        t.stream1.shutdown(socket.SHUT_RD)
        peer, other = link()
        t.peer_a.close()
        result = backend.connect(t.stream1, t.stream2, 5, 10)
        peer.close()
        other.close()
    assert result.reason in ("closed", "error")
