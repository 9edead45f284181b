"""Active health checks (`tcptotcp._health`), on real loopback sockets.

The checks run on their own clock, so the tests never count rounds by wall-clock time: the
exact numbers come from the checker's logic (a flip's reason says how many checks caused it);
everything else is an "eventually" with a generous deadline, polled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sys
import threading
import time
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from helpers import HAS_PROC, open_fds
from tcptotcp._address import Address
from tcptotcp._health import HealthChecker, describe, reason_of

DEADLINE = 20.0  # for "eventually": far beyond what an idle machine needs
HEALTH_THREAD = "tcptotcp-health"

Change = Tuple[str, bool, str]


class Server:
    """A listening socket that the tests drain by hand (no thread): each poll of `wait_until`
    accepts and closes what the checks queued, and counts it."""

    def __init__(self, family: int = socket.AF_INET, path: str = "", backlog: int = 1024) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.sock.bind(path)
            self.address = Address.parse(f"unix:{path}")
        else:
            # SO_REUSEPORT lets `reopen` take the same port back without a race (see there).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.address = Address.parse("127.0.0.1:%d" % self.sock.getsockname()[1])
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.backlog = backlog
        self.spare: Optional[socket.socket] = None
        self.accepted = 0

    def keep_port(self) -> None:
        """Bind a second socket to the port, not listening: once `sock` is closed, connects are
        refused, yet no other socket (a check's own ephemeral port included) can take the port."""
        self.spare = socket.socket()
        self.spare.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.spare.bind(self.sock.getsockname())

    def reopen(self) -> None:
        assert self.spare is not None
        self.sock.close()
        self.sock, self.spare = self.spare, None
        self.sock.listen(self.backlog)
        self.sock.setblocking(False)

    def drain(self) -> int:
        while self.sock.fileno() >= 0:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            conn.close()
            self.accepted += 1
        return self.accepted

    def close(self) -> None:
        self.sock.close()
        if self.spare is not None:
            self.spare.close()


class Recorder:
    """on_change's calls, in order."""

    def __init__(self) -> None:
        self.calls: List[Change] = []
        self.threads: List[str] = []

    def __call__(self, upstream: Address, up: bool, reason: str) -> None:
        self.threads.append(threading.current_thread().name)
        self.calls.append((upstream.text, up, reason))

    def of(self, text: str) -> List[Change]:
        return [c for c in self.calls if c[0] == text]


def wait_until(condition: Callable[[], object], servers: Tuple[Server, ...] = (), what: str = "") -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        for server in servers:
            server.drain()
        if condition():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.01)


def health_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(HEALTH_THREAD)]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Closes what a test opened, checkers first (a LIFO stack), even when the test fails."""
    with contextlib.ExitStack() as s:
        yield s
    assert not health_threads()


def server(stack: contextlib.ExitStack, **kwargs: object) -> Server:
    s = Server(**kwargs)  # type: ignore[arg-type]
    stack.callback(s.close)
    return s


def checker(stack: contextlib.ExitStack, upstreams: List[Address], **kwargs: object) -> Tuple[HealthChecker, Recorder]:
    rec = Recorder()
    hc = HealthChecker(upstreams, on_change=rec, name="test", **kwargs)  # type: ignore[arg-type]
    stack.callback(hc.close)
    return hc, rec


def unanswered(stack: contextlib.ExitStack) -> Address:
    """A loopback address whose connects hang. Loopback answers a closed port with RST, but a
    listener whose accept queue is full drops SYNs (Linux): listen(0), never accept, and fill
    the queue with a few clients. Skips where the kernel answers anyway (probed first)."""
    listener = socket.socket()
    stack.callback(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    sockaddr = listener.getsockname()
    for _ in range(4):  # the last one is the probe
        client = socket.socket()
        stack.callback(client.close)
        client.setblocking(False)
        client.connect_ex(sockaddr)
    _, writable, _ = select.select([], [client], [], 0.5)
    if writable:
        pytest.skip("this kernel answers connects to a listener with a full accept queue")
    return Address.parse("127.0.0.1:%d" % sockaddr[1])


# -- flips ------------------------------------------------------------------------------


def test_tcp_upstream_goes_down_after_fall_and_up_after_rise(stack: contextlib.ExitStack) -> None:
    srv = server(stack)
    srv.keep_port()
    hc, rec = checker(stack, [srv.address], interval=0.05, rise=2, fall=3)
    assert hc.states() == {srv.address.text: True}  # up before any check
    hc.start()
    wait_until(lambda: srv.accepted >= 5, (srv,), "five successful checks")
    assert rec.calls == [] and hc.is_up(srv.address.text)

    srv.sock.close()  # connects are refused from now on (the spare socket holds the port)
    wait_until(lambda: rec.calls, what="the down flip")
    assert rec.calls == [(srv.address.text, False, "connection refused (3 checks)")]
    assert rec.threads == ["tcptotcp-health test"]
    assert hc.states() == {srv.address.text: False} and not hc.is_up(srv.address.text)

    srv.reopen()
    wait_until(lambda: len(rec.calls) == 2, (srv,), "the up flip")
    assert rec.calls[1] == (srv.address.text, True, "connected (2 checks)")
    assert hc.is_up(srv.address.text)


def test_unanswered_connect_is_a_timeout(stack: contextlib.ExitStack) -> None:
    hanging = unanswered(stack)
    hc, rec = checker(stack, [hanging], interval=0.1, rise=1, fall=2)  # timeout: min(0.1, 5.0)
    hc.start()
    wait_until(lambda: rec.calls, what="the down flip")
    assert rec.calls == [(hanging.text, False, "connect timeout (2 checks)")]


def test_slow_upstream_does_not_hold_up_the_others(stack: contextlib.ExitStack) -> None:
    """One round checks all upstreams at once: a refused one flips while another hangs."""
    hanging = unanswered(stack)
    refused = server(stack)
    refused.keep_port()
    refused.sock.close()
    hc, rec = checker(stack, [hanging, refused.address], interval=0.1, rise=1, fall=1, timeout=3.0)
    hc.start()
    wait_until(lambda: rec.calls, what="the refused upstream's flip")
    assert rec.calls[0] == (refused.address.text, False, "connection refused (1 check)")
    wait_until(lambda: len(rec.calls) == 2, what="the hanging upstream's flip")
    assert rec.calls[1] == (hanging.text, False, "connect timeout (1 check)")


@pytest.mark.unix
@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no AF_UNIX")
def test_unix_upstream(stack: contextlib.ExitStack, socket_dir: str) -> None:
    path = f"{socket_dir}/up.sock"
    srv = server(stack, family=socket.AF_UNIX, path=path)
    hc, rec = checker(stack, [srv.address], interval=0.05, rise=1, fall=2)
    hc.start()
    wait_until(lambda: srv.accepted >= 3, (srv,), "three successful checks")
    assert rec.calls == []

    srv.sock.close()  # the path stays: refused
    wait_until(lambda: rec.calls, what="the down flip")
    assert rec.calls == [(srv.address.text, False, "connection refused (2 checks)")]

    os.unlink(path)
    srv2 = server(stack, family=socket.AF_UNIX, path=path)
    wait_until(lambda: len(rec.calls) == 2, (srv2,), "the up flip")
    assert rec.calls[1] == (srv.address.text, True, "connected (1 check)")

    os.unlink(path)  # the listener is still open, but nothing can reach it
    wait_until(lambda: len(rec.calls) == 3, what="the second down flip")
    assert rec.calls[2] == (srv.address.text, False, "no such file or directory (2 checks)")


# -- update -----------------------------------------------------------------------------


def test_update_keeps_unchanged_states_and_closes_removed_checks(stack: contextlib.ExitStack) -> None:
    """A long interval: one round at start, then none while the test looks, so states() is
    exact. The hanging upstream's check is still in flight when update() removes it."""
    good = server(stack)
    refused, moved = server(stack), server(stack)
    for s in (refused, moved):
        s.keep_port()
        s.sock.close()
    hanging = unanswered(stack)
    new = server(stack)
    new.keep_port()
    new.sock.close()  # refused, but not checked before the next round, 30 s away
    fds = open_fds()
    hc, rec = checker(
        stack, [good.address, refused.address, moved.address, hanging], interval=30, rise=1, fall=1, timeout=25
    )
    hc.start()
    wait_until(lambda: len(rec.calls) == 2, what="the refused upstreams' flips")
    assert sorted(rec.calls) == sorted(
        [
            (refused.address.text, False, "connection refused (1 check)"),
            (moved.address.text, False, "connection refused (1 check)"),
        ]
    )
    if HAS_PROC:  # the selector, the wake-up pair, and the hanging upstream's check in flight
        wait_until(lambda: open_fds() == fds + 4, what="only the hanging check in flight")

    # The same text resolving elsewhere is a new upstream: it starts up.
    relocated = Address(moved.address.family, good.address.sockaddr, moved.address.text)
    hc.update([good.address, refused.address, relocated, new.address])
    assert hc.states() == {
        good.address.text: True,
        refused.address.text: False,
        moved.address.text: True,
        new.address.text: True,
    }
    assert hc.is_up(hanging.text)  # not this checker's any more: not vetoed
    if HAS_PROC:
        wait_until(lambda: open_fds() == fds + 3, what="the removed upstream's check closed")
    assert len(rec.calls) == 2

    # A shorter interval applies at once, not after the 30 s round that was due.
    hc.update([good.address, refused.address, relocated, new.address], interval=0.05)
    wait_until(lambda: len(rec.calls) == 3, what="the new upstream's flip")
    assert rec.calls[2] == (new.address.text, False, "connection refused (1 check)")
    hc.close()
    if HAS_PROC:
        assert open_fds() == fds


def test_update_checks_new_upstreams_and_forgets_removed_ones(stack: contextlib.ExitStack) -> None:
    kept, removed = server(stack), server(stack)
    added = server(stack)
    added.keep_port()
    added.sock.close()
    hc, rec = checker(stack, [kept.address, removed.address], interval=0.05, rise=1, fall=2)
    hc.start()
    wait_until(lambda: removed.accepted >= 2, (kept, removed), "checks of the upstream to remove")

    hc.update([kept.address, added.address], interval=0.04, fall=3)
    assert set(hc.states()) == {kept.address.text, added.address.text}
    wait_until(lambda: rec.calls, (kept, removed), "the added upstream's flip")
    assert rec.calls == [(added.address.text, False, "connection refused (3 checks)")]
    # Three rounds have started since update(): what reached `removed` came before it.
    seen = removed.drain()
    base = kept.drain()
    wait_until(lambda: kept.accepted >= base + 3, (kept, removed), "three more rounds")
    assert removed.drain() == seen
    assert rec.of(removed.address.text) == []


def test_update_rejects_bad_settings() -> None:
    up = [Address.parse("127.0.0.1:9")]
    with pytest.raises(ValueError):
        HealthChecker(up, interval=0, rise=1, fall=1, on_change=Recorder())
    hc = HealthChecker(up, interval=1, rise=1, fall=1, on_change=Recorder())
    try:
        for bad in ({"rise": 0}, {"fall": 0}, {"timeout": -1.0}, {"interval": -2.0}):
            with pytest.raises(ValueError):
                hc.update(up, **bad)  # type: ignore[arg-type]
    finally:
        hc.close()


# -- lifecycle --------------------------------------------------------------------------


def test_close_is_prompt_and_leaves_nothing_behind(stack: contextlib.ExitStack) -> None:
    hanging = unanswered(stack)
    fds, threads = open_fds(), len(threading.enumerate())
    hc, rec = checker(stack, [hanging], interval=30, rise=1, fall=1)  # a 5 s connect timeout
    hc.start()
    assert [t.name for t in health_threads()] == ["tcptotcp-health test"]
    assert health_threads()[0].daemon
    if HAS_PROC:
        wait_until(lambda: open_fds() == fds + 4, what="the check in flight")
    started = time.monotonic()
    hc.close()
    assert time.monotonic() - started < 2.0
    assert health_threads() == [] and len(threading.enumerate()) == threads
    if HAS_PROC:
        assert open_fds() == fds
    hc.close()  # idempotent
    assert rec.calls == []
    with pytest.raises(RuntimeError):
        hc.start()


def test_close_before_start_and_context_manager(stack: contextlib.ExitStack) -> None:
    srv = server(stack)
    fds = open_fds()
    HealthChecker([srv.address], interval=1, rise=1, fall=1, on_change=Recorder()).close()
    rec = Recorder()
    with HealthChecker([srv.address], interval=0.05, rise=1, fall=1, on_change=rec) as hc:
        assert len(health_threads()) == 1
        wait_until(lambda: srv.accepted >= 2, (srv,), "two checks")
        assert hc.states() == {srv.address.text: True}
    assert health_threads() == []
    if HAS_PROC:
        assert open_fds() == fds
    assert rec.calls == []


def test_one_thread_for_twenty_upstreams(stack: contextlib.ExitStack) -> None:
    servers = tuple(server(stack) for _ in range(20))
    threads = len(threading.enumerate())
    hc, rec = checker(stack, [s.address for s in servers], interval=0.05, rise=1, fall=1)
    hc.start()
    wait_until(lambda: all(s.accepted >= 3 for s in servers), servers, "three checks of each upstream")
    assert len(threading.enumerate()) == threads + 1
    assert all(hc.states().values()) and len(hc.states()) == 20
    hc.close()
    assert len(threading.enumerate()) == threads
    assert rec.calls == []


def test_on_change_may_call_back_and_close(stack: contextlib.ExitStack) -> None:
    """on_change runs outside the checker's lock: it may read states() and even close()."""
    srv = server(stack)
    srv.keep_port()
    srv.sock.close()
    seen: List[bool] = []

    def on_change(upstream: Address, up: bool, reason: str) -> None:
        seen.append(hc.is_up(upstream.text))
        hc.close()

    hc = HealthChecker([srv.address], interval=0.05, rise=1, fall=1, on_change=on_change)
    stack.callback(hc.close)
    hc.start()
    wait_until(lambda: not health_threads(), what="the checker thread's exit")
    assert seen == [False]


# -- texts ------------------------------------------------------------------------------


def test_texts() -> None:
    upstream = Address.parse("10.0.0.5:80")
    assert describe(upstream, False, "connection refused (3 checks)") == (
        "upstream 10.0.0.5:80 down: connection refused (3 checks)"
    )
    assert describe(upstream, True, "connected (2 checks)") == "upstream 10.0.0.5:80 up: connected (2 checks)"
    assert reason_of(errno.ECONNREFUSED) == "connection refused"
    assert reason_of(errno.EHOSTUNREACH) == "no route to host"
    assert reason_of(errno.ENETUNREACH) == "network unreachable"
    assert reason_of(errno.ETIMEDOUT) == "connect timeout"
    if sys.platform.startswith("linux"):
        assert reason_of(errno.ENOENT) == "no such file or directory"
