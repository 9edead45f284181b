"""The semantics of a bridge, written once for both engines.

Validation, parameter clamping, the idle checker, ending, the result and teardown all live
here. An engine only supplies a ``Pump`` class (see ``PumpProtocol``): one direction's copy
loop, its byte counter and its activity flag. ``tcptotcp.pure`` binds the pure engine
(``_pump.Pump``); ``tcptotcp`` binds the compiled one (``_core.Pump``) where it loaded.
"""

from __future__ import annotations

import errno
import operator
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, List, Optional, Set, Tuple

from . import _pump
from ._pump import EOF, ERROR, STOPPED, PumpProtocol

ACTIVITY_RULES = ("both", "any")
# Draining a closing socket: stop once the peer has been quiet this long, or at the limit.
_DRAIN_QUIET_SECONDS = 0.03
_DRAIN_LIMIT_SECONDS = 0.25
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# Failures that come from a peer or the network, never from our own shutdown (which gives
# EPIPE). A reset makes the kernel report ECONNRESET to one caller only; the other pump on
# that socket then reads a plain EOF, so "closed" may be recorded first for what was a reset.
_PEER_FAILURES = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
_TCP_CLOSE = 7  # tcpi_state of a connection that is gone (Linux's TCP_CLOSE)
# Longer than anyone waits; keeps float deadlines finite for r of any size.
_LONGEST_INTERVAL = 10.0**9


@dataclass(frozen=True)
class BridgeResult:
    """What a finished bridge did."""

    bytes_1_to_2: int
    bytes_2_to_1: int
    reason: str  # "closed" | "idle" | "error" | "stopped"
    seconds: float


def _check_socket(sock: object, name: str) -> socket.socket:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"{name} must be a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise ValueError(f"{name} is closed")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"{name} is not a SOCK_STREAM socket ({sock.type!r})")
    try:
        sock.getpeername()
    except OSError as exc:
        raise ValueError(f"{name} is not connected ({exc.strerror or exc})") from None
    return sock


def _same_connection(a: socket.socket, b: socket.socket) -> bool:
    if a is b or a.fileno() == b.fileno():
        return True
    # Two fds of one TCP connection (a dup) have the same pair of addresses.
    if a.family in (socket.AF_INET, socket.AF_INET6) and a.family == b.family:
        return (a.getsockname(), a.getpeername()) == (b.getsockname(), b.getpeername())
    return False


def _check_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def check_activity(activity: object) -> None:
    if activity not in ACTIVITY_RULES:
        raise ValueError(f"activity must be 'both' or 'any', not {activity!r}")


def _speaks_fd_bytes(sock: socket.socket) -> bool:
    """True when the bytes of `sock` are the bytes of its fd (not TLS, not a wrapper)."""
    cls = type(sock)
    return (
        not isinstance(sock, ssl.SSLSocket)
        and cls.recv_into is socket.socket.recv_into
        and cls.send is socket.socket.send
    )


def _private_dup(sock: socket.socket) -> socket.socket:
    """A socket object on a new fd of the same connection, owned by the bridge alone."""
    fd = os.dup(sock.fileno())
    try:
        return socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    except BaseException:
        os.close(fd)
        raise


def _was_reset(sock: socket.socket) -> bool:
    """Whether the EOF just read on `sock` came from a reset, not a FIN.

    A reset reaches one caller as ECONNRESET, and the kernel can swallow even that: a splice
    that had moved some bytes before the send failed returns the count and drops the error.
    The reading pump then sees a plain EOF. Until we send our own FIN, a connection that got
    the peer's FIN is in CLOSE_WAIT; one that got a reset is closed outright.
    """
    tcp_info = getattr(socket, "TCP_INFO", None)  # Linux
    if tcp_info is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] == _TCP_CLOSE
    except OSError:
        return False


def _shutdown(sock: socket.socket, how: int) -> None:
    # The base method, so an SSLSocket keeps its TLS state for the other direction.
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass  # already disconnected or closed: nothing left to wake


def _read_and_drop(sock: socket.socket) -> Optional[int]:
    """Drop whatever is queued now: the byte count, or None once the peer has closed."""
    dropped = 0
    while True:
        try:
            data = socket.socket.recv(sock, 65536, _MSG_DONTWAIT)  # raw bytes, TLS or not
        except OSError:  # EAGAIN, or the connection is already gone
            return dropped
        if not data:
            return None
        dropped += len(data)


def _discard_unread(sock: socket.socket) -> None:
    """Drop what the peer sent that will never be relayed, before the socket is closed.

    Closing a TCP socket with unread bytes, or receiving bytes after it was closed, makes
    the kernel answer with RST, and an RST destroys what the peer had not yet read of the
    bytes we relayed to it. The common case, nothing unread, costs one non-blocking recv;
    otherwise drop until the peer closes or stays quiet for a moment, within a bound.
    """
    if not _MSG_DONTWAIT or not _read_and_drop(sock):
        return
    deadline = time.monotonic() + _DRAIN_LIMIT_SECONDS
    while time.monotonic() < deadline:
        quiet = min(_DRAIN_QUIET_SECONDS, deadline - time.monotonic())
        if quiet <= 0 or not _pump.wait_ready(sock, for_write=False, timeout=quiet):
            return
        if _read_and_drop(sock) is None:
            return


class Bridge:
    """Relays bytes between two connected stream sockets until one of the contract's ends.

    ``Bridge(...).run()`` blocks (that is ``connect()``); ``start()`` runs it in the
    background, ``stop()`` ends it from any thread, ``wait()`` collects the result.
    The bridge owns both sockets: they are shut down and closed when it ends.
    """

    #: Pump class for sockets whose bytes are their fd's bytes; engines override it
    #: (a factory function goes in a staticmethod, so that it is not bound to the bridge).
    fd_pump: ClassVar[Callable[..., PumpProtocol]] = _pump.Pump

    def __init__(
        self,
        stream1: socket.socket,
        stream2: socket.socket,
        rate_check_seconds: int,
        keep_alive_delay_time_seconds: int,
        *,
        activity: str = "both",
        half_close: bool = False,
    ) -> None:
        _check_socket(stream1, "stream1")
        _check_socket(stream2, "stream2")
        if _same_connection(stream1, stream2):
            raise ValueError("stream1 and stream2 are the same socket")
        r = _check_int(rate_check_seconds, "rate_check_seconds")
        k = _check_int(keep_alive_delay_time_seconds, "keep_alive_delay_time_seconds")
        check_activity(activity)
        self._streams = (stream1, stream2)
        # The original's clamping: u8 rate check of at least 1 s, keep-alive of at least 2 s.
        self.rate_check_seconds = max(1, r)
        self.keep_alive_delay_time_seconds = max(2, k)
        self.activity = activity
        self.half_close = bool(half_close)

        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._reason: Optional[str] = None
        self._result: Optional[BridgeResult] = None
        self._launched = False  # start()/run() was called
        self._started = False  # ... and everything _wake() needs exists
        self._wires: Tuple[socket.socket, socket.socket] = (stream1, stream2)
        self._own_dups: List[socket.socket] = []
        # Readable once the bridge ends: every pump waits on it beside its socket.
        self._wake_pair: Tuple[socket.socket, ...] = ()
        self._fin_sent: Set[socket.socket] = set()  # wires we half-closed (half_close=True)
        self._pumps: List[PumpProtocol] = []
        self._pump_threads: List[threading.Thread] = []
        self._pumps_running = 0
        self._checker: Optional[threading.Thread] = None
        self._started_at = 0.0

    # -- public API -------------------------------------------------------------------

    def run(self) -> BridgeResult:
        """Relay in the calling thread until the bridge ends; return what happened."""
        self._launch_pumps()
        return self._supervise()

    def start(self) -> "Bridge":
        """Relay in the background; collect the result with ``wait()``."""
        self._launch_pumps()
        self._checker = threading.Thread(target=self._supervise, name="tcptotcp-checker", daemon=True)
        self._checker.start()
        return self

    def stop(self) -> None:
        """End the bridge (reason ``"stopped"``) from any thread; returns at once."""
        self._end("stopped")

    def wait(self, timeout: Optional[float] = None) -> Optional[BridgeResult]:
        """The result, or ``None`` if the bridge still runs after `timeout` seconds."""
        if self._checker is None:
            raise RuntimeError("wait() needs a bridge started with start()")
        self._checker.join(timeout)
        return None if self._checker.is_alive() else self._result

    @property
    def running(self) -> bool:
        return self._launched and self._result is None

    def __enter__(self) -> "Bridge":
        if not self._launched:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._checker is not None:
            self.wait()

    # -- starting -----------------------------------------------------------------------

    def _launch_pumps(self) -> None:
        with self._lock:
            if self._launched:
                raise RuntimeError("a Bridge runs only once")
            self._launched = True
        self._started_at = time.monotonic()
        s1, s2 = self._streams
        if _speaks_fd_bytes(s1) and _speaks_fd_bytes(s2):
            # Private fds: a caller closing its objects can never free an fd number
            # under a running pump.
            self._own_dups = [_private_dup(s1)]
            try:
                self._own_dups.append(_private_dup(s2))
                self._wake_pair = socket.socketpair()
            except BaseException:
                for dup in self._own_dups:
                    dup.close()
                raise
            self._wires = (self._own_dups[0], self._own_dups[1])
            pump_cls = self.fd_pump
        else:
            # TLS (or another wrapper): the bytes are not the fd's bytes, so the pure pump
            # relays through the objects themselves.
            self._wake_pair = socket.socketpair()
            pump_cls = _pump.Pump
        w1, w2 = self._wires
        try:
            # Non-blocking: every wait is a poll() that the wake socket can interrupt, and a
            # socket timeout the caller set can never end the bridge.
            w1.setblocking(False)
            w2.setblocking(False)
            wake = self._wake_pair[0]
            self._pumps = [pump_cls(w1, w2, wake), pump_cls(w2, w1, wake)]
            self._pumps_running = 2
            for index, name in ((0, "1->2"), (1, "2->1")):
                thread = threading.Thread(
                    target=self._pump_main, args=(index,), name=f"tcptotcp-pump {name}", daemon=True
                )
                thread.start()  # "can't start new thread" under load: cleaned up below
                self._pump_threads.append(thread)
        except BaseException:
            # Leave nothing behind: stop a pump that did start, then close what we opened.
            self._wake_pair[1].send(b"!")
            for thread in self._pump_threads:
                thread.join()
            for sock in (*self._own_dups, *self._wake_pair):
                sock.close()
            raise
        with self._lock:
            self._started = True
            ended_already = self._reason is not None  # stop() or a pump's end came first
        if ended_already:
            self._wake()

    def _pump_main(self, index: int) -> None:
        outcome = ERROR
        try:
            outcome = self._pumps[index].run()
        finally:
            self._pump_ended(index, outcome)

    # -- ending -------------------------------------------------------------------------

    def _pump_ended(self, index: int, outcome: str) -> None:
        with self._lock:
            self._pumps_running -= 1
            all_done = self._pumps_running == 0
        if outcome == STOPPED:
            return  # woken by _wake(): the reason is already recorded
        src = self._wires[index]
        if outcome == EOF and self._reason is None and src not in self._fin_sent and _was_reset(src):
            outcome = ERROR
        if outcome == EOF and self.half_close and not all_done:
            # Forward the FIN; the other direction keeps flowing.
            dst = self._wires[1 - index]
            self._fin_sent.add(dst)
            _shutdown(dst, socket.SHUT_WR)
            return
        self._end("closed" if outcome == EOF else "error")

    def _end(self, reason: str) -> None:
        """Record the first reason and wake everything."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            if not self._started:
                return  # _launch_pumps() will see the reason and wake everything itself
        self._wake()

    def _wake(self) -> None:
        """Stop the pumps and the checker; send FIN both ways after what was relayed.

        Reads are not shut down: a pump blocked in a read is woken by the wake socket
        instead, and the sockets keep acknowledging (and advertising window) so the
        teardown can drain what the peers still send and close with FIN, not RST.
        """
        try:
            self._wake_pair[1].send(b"!")
        except OSError:
            pass  # already woken: the byte is never consumed
        for wire in self._wires:  # also fails a pump's pending write at once
            _shutdown(wire, socket.SHUT_WR)
        self._ended.set()

    # -- the idle checker ---------------------------------------------------------------

    def _traffic_since_last_check(self) -> bool:
        moved = [pump.take_activity() for pump in self._pumps]
        return all(moved) if self.activity == "both" else any(moved)

    def _supervise(self) -> BridgeResult:
        """Check for traffic at the start and every r seconds; then tear down."""
        r = self.rate_check_seconds
        idle_limit = self.keep_alive_delay_time_seconds // r
        interval = min(float(r), _LONGEST_INTERVAL)
        idle_checks = 0
        next_check = self._started_at
        try:
            while not self._ended.is_set():
                if self._traffic_since_last_check():
                    idle_checks = 0
                elif idle_checks > idle_limit:
                    self._end("idle")
                    break
                else:
                    idle_checks += 1
                next_check += interval
                self._wait_until(next_check)
        finally:
            # Reached on every way out, KeyboardInterrupt included.
            self._end("stopped")
            self._tear_down()
        assert self._result is not None
        return self._result

    def _wait_until(self, deadline: float) -> None:
        while not self._ended.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._ended.wait(min(remaining, threading.TIMEOUT_MAX))

    def _tear_down(self) -> None:
        interrupted: Optional[BaseException] = None
        for thread in self._pump_threads:
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as exc:  # a second Ctrl-C: finish cleaning up first
                    interrupted = exc
        # Only now that no pump can touch them: close the private fds, then the caller's.
        for wire in self._wires:
            if wire.fileno() >= 0:
                _discard_unread(wire)
        for sock in (*self._own_dups, *self._streams, *self._wake_pair):
            try:
                sock.close()
            except OSError:
                pass
        p12, p21 = self._pumps
        reason = self._reason or "stopped"
        if reason == "closed" and any(p.last_errno in _PEER_FAILURES for p in self._pumps):
            reason = "error"
        self._result = BridgeResult(
            bytes_1_to_2=p12.bytes,
            bytes_2_to_1=p21.bytes,
            reason=reason,
            seconds=time.monotonic() - self._started_at,
        )
        if interrupted is not None:
            raise interrupted


def connect_with(bridge_cls: type) -> Callable[..., BridgeResult]:
    """Build the module-level ``connect`` for a Bridge class bound to one engine."""

    def connect(
        stream1: socket.socket,
        stream2: socket.socket,
        rate_check_seconds: int,
        keep_alive_delay_time_seconds: int,
        *,
        activity: str = "both",
        half_close: bool = False,
    ) -> BridgeResult:
        """Relay bytes both ways between two connected stream sockets until the bridge ends.

        Blocks; returns a :class:`BridgeResult`. Both sockets are shut down and closed on return.
        """
        return bridge_cls(
            stream1,
            stream2,
            rate_check_seconds,
            keep_alive_delay_time_seconds,
            activity=activity,
            half_close=half_close,
        ).run()

    return connect
