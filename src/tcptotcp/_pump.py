"""The pure-Python engine: per bridge, two pump threads and a checker thread.

It is the fallback where the compiled core cannot load, the engine of TLS sockets everywhere,
and the reference the compiled engine is tested against. ``start(stream1, stream2, plan,
on_end)`` is the seam both engines share (see ``_bridge.Engine``): it relays between the two
sockets in the background and returns a relay with ``stop()`` and ``counts()``; when the
bridge has ended and its private fds are closed it calls ``on_end(bytes_1_to_2, bytes_2_to_1,
reason, seconds)`` once, from one of its threads.

Inside, a ``Pump`` is one direction's copy loop on a non-blocking socket; it waits with
``poll()`` on its socket and the bridge's wake socket, and never closes or shuts down anything.
The checker applies the idle rule, and the teardown drains unread input and closes.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Set, Tuple, Union

if TYPE_CHECKING:
    from ._bridge import BridgeState, EngineDetached, Plan

EOF = "eof"
ERROR = "error"
STOPPED = "stopped"

# 64 KiB: the pure loop pays a few Python-level calls a chunk; larger buffers gain little
# on loopback and cost memory per idle bridge.
BUFFER_SIZE = 64 * 1024


class Gate(Protocol):
    """A bridge's say over its pumps beyond the wake socket: a detach pauses them (they stop
    reading and wait in `park`), and only an ended bridge stops them."""

    pausing: bool

    def park(self) -> bool:
        """Wait while the pause lasts: True to read on, False once the bridge ended."""
        ...

    def ended(self) -> bool: ...


class PumpProtocol(Protocol):
    bytes: int
    last_errno: int  # errno of the failure behind ERROR, else 0

    def run(self) -> str: ...

    def take_activity(self) -> bool: ...


_POLL = getattr(select, "poll", None)


def wait_ready(sock: Any, for_write: bool, timeout: float) -> bool:
    """Whether `sock` (anything with a ``fileno()``) turned readable/writable within `timeout`
    seconds. poll(), not select(): select() cannot take an fd above 1023, which a busy
    forwarder's sockets reach."""
    if _POLL is not None:
        poller = _POLL()
        poller.register(sock, select.POLLOUT if for_write else select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    fds = [sock]  # pragma: no cover - Windows
    return any(select.select([] if for_write else fds, fds if for_write else [], fds, timeout))


class _Waiter:
    """Blocks until a socket is ready or the bridge's wake socket says stop."""

    def __init__(self, wake: socket.socket) -> None:
        self._wake = wake
        self._wake_fd = wake.fileno()
        self._pollers: Dict[Tuple[int, bool], Any] = {}  # (fd, for_write) -> poll object, built once

    def ready(self, sock: socket.socket, for_write: bool) -> bool:
        """True when `sock` is ready; False when the bridge asked the pump to stop."""
        if _POLL is None:  # pragma: no cover - Windows
            readable, _, _ = select.select(
                [self._wake] if for_write else [self._wake, sock], [sock] if for_write else [], [sock]
            )
            return self._wake not in readable
        key = (sock.fileno(), for_write)
        poller = self._pollers.get(key)
        if poller is None:
            poller = self._pollers[key] = _POLL()
            poller.register(self._wake_fd, select.POLLIN)
            poller.register(sock, select.POLLOUT if for_write else select.POLLIN)
        return all(fd != self._wake_fd for fd, _ in poller.poll())

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False as soon as the bridge asks the pump to stop."""
        if _POLL is None:  # pragma: no cover - Windows
            readable, _, _ = select.select([self._wake], [], [], seconds)
            return not readable
        poller = self._pollers.get((self._wake_fd, False))
        if poller is None:
            poller = self._pollers[(self._wake_fd, False)] = _POLL()
            poller.register(self._wake_fd, select.POLLIN)
        return not poller.poll(max(1, math.ceil(seconds * 1000)))


class Bucket:
    """A direction's --bandwidth allowance: bytes it may read now, refilled at `rate` bytes/s
    up to a burst (see _bridge.bandwidth_bucket, the rule the loops keep too)."""

    def __init__(self, rate: int) -> None:
        from ._bridge import bandwidth_bucket

        self.rate = rate
        self.burst, self.quantum = bandwidth_bucket(rate)
        self.tokens = float(self.burst)  # a bridge starts with a full burst
        self._at = time.monotonic()

    def available(self) -> int:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now
        return int(self.tokens)

    def wait_seconds(self) -> float:
        """How long until the bucket holds a quantum again (after available() found it empty)."""
        return max(0.0, (self.quantum - self.tokens) / self.rate)

    def take(self, n: int) -> None:
        self.tokens -= n


# What a non-blocking call raises when it must wait. TLS may need to read in order to
# write and the reverse (renegotiation, key updates), so the exception says for what.
_MUST_WAIT = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Pump:
    """Copies src -> dst with recv_into on one preallocated buffer and complete writes."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        wake: socket.socket,
        bandwidth: int = 0,
        gate: Optional[Gate] = None,
    ) -> None:
        self._src = src
        self._gate = gate
        self._dst = dst
        self._waiter = _Waiter(wake)
        self._bucket = Bucket(bandwidth) if bandwidth else None
        self._buffer = bytearray(BUFFER_SIZE)
        self._active = False
        self.bytes = 0
        self.last_errno = 0
        #: Its TLS source ended without close_notify, and the socket took that for an end
        #: (see _take_ragged_eofs): a cut, so no close_notify goes on to anyone.
        self.cut = False

    def take_activity(self) -> bool:
        active, self._active = self._active, False
        return active

    def _stopping(self) -> bool:
        """The wake socket fired: True if the bridge ended; False for a detach's pause, which
        the loop's top (or, mid-write, nothing) obeys."""
        gate = self._gate
        return gate is None or gate.ended()

    def _writable(self, dst: socket.socket, for_write: bool) -> bool:
        """Wait until `dst` can take the rest of a write; False once the bridge ended. A
        detach waits for this write to complete, and its pause leaves the wake socket
        readable: then watch `dst` alone, in short waits, looking at the bridge between."""
        while not self._waiter.ready(dst, for_write):
            if self._stopping():
                return False
            if wait_ready(dst, for_write, 0.01):
                return True
        return True

    def run(self) -> str:
        view = memoryview(self._buffer)
        src, dst, ready = self._src, self._dst, self._waiter.ready
        recv_into, send = _one_at_a_time(src, src.recv_into), _one_at_a_time(dst, dst.send)
        # After a short read the queue is empty: wait first instead of paying for a read
        # that raises BlockingIOError (an exception and a syscall per message). Not for
        # TLS, which may hold decrypted bytes that poll() cannot see.
        poll_first = not isinstance(src, ssl.SSLSocket)
        emptied = poll_first
        bucket = self._bucket
        gate = self._gate
        wanted = BUFFER_SIZE
        try:
            while True:
                # A detach: read nothing more (this pump holds nothing here) until it is over.
                if gate is not None and gate.pausing and not gate.park():
                    return STOPPED
                if bucket is not None:
                    # Past the burst, read no faster than the rate: what the peer sends
                    # meanwhile waits in the kernel, whose full buffers hold the sender back.
                    wanted = min(BUFFER_SIZE, bucket.available())
                    if not wanted:
                        if not self._waiter.sleep(bucket.wait_seconds()) and self._stopping():
                            return STOPPED
                        continue
                if emptied and not ready(src, for_write=False):
                    if self._stopping():
                        return STOPPED
                    continue
                try:
                    received = recv_into(view[:wanted] if wanted < BUFFER_SIZE else view)
                except _MUST_WAIT as exc:
                    if not ready(src, for_write=isinstance(exc, ssl.SSLWantWriteError)) and self._stopping():
                        return STOPPED
                    continue
                except ssl.SSLError as exc:  # (after the waits, which are SSLErrors too)
                    if not (_is_ragged_eof(exc) and getattr(src, _RAGGED_EOF_IS_END, False)):
                        raise
                    self.cut = True
                    return EOF
                if not received:
                    return EOF
                if bucket is not None:
                    bucket.take(received)
                sent = 0
                while sent < received:
                    try:
                        just_sent = send(view[sent:received])
                    except _MUST_WAIT as exc:
                        if not self._writable(dst, not isinstance(exc, ssl.SSLWantReadError)):
                            return STOPPED
                        continue
                    sent += just_sent
                    self.bytes += just_sent
                self._active = True
                emptied = poll_first and received < wanted
        except OSError as exc:
            self.last_errno = exc.errno or 0
            return ERROR
        finally:
            view.release()


# -- one bridge: two pumps and a checker ------------------------------------------------------

# Draining a closing socket: stop once the peer has been quiet this long, or at the limit.
_DRAIN_QUIET_SECONDS = 0.03
_DRAIN_LIMIT_SECONDS = 0.25
_DRAIN_POLL_SECONDS = 0.005  # quiet, but our bytes not yet acknowledged: look again this soon
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# Failures that come from a peer or the network, never from our own shutdown (which gives
# EPIPE). A reset makes the kernel report ECONNRESET to one caller only; the other pump on
# that socket then reads a plain EOF, so "closed" may be recorded first for what was a reset.
_PEER_FAILURES = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
_TCP_CLOSE = 7  # tcpi_state of a connection that is gone (Linux's TCP_CLOSE)
# Longer than anyone waits; keeps float deadlines finite for r of any size.
_LONGEST_INTERVAL = 10.0**9

OnEnd = Callable[[int, int, str, float], None]


_TLS_LOCK = "_tcptotcp_io_lock"
# A TLS socket's own suppress_ragged_eofs, which the bridge takes over: an EOF without
# close_notify then reaches the pump as SSLEOFError, an end (the socket's setting) that it
# remembers as a cut.
_RAGGED_EOF_IS_END = "_tcptotcp_ragged_eof_is_end"


def _is_ragged_eof(exc: ssl.SSLError) -> bool:
    """An EOF without close_notify: SSLEOFError, or (Python 3.9 with OpenSSL 3) an SSLError
    with OpenSSL's reason for it."""
    return isinstance(exc, ssl.SSLEOFError) or getattr(exc, "reason", None) == "UNEXPECTED_EOF_WHILE_READING"


def _take_ragged_eofs(sock: socket.socket) -> None:
    if isinstance(sock, ssl.SSLSocket) and not hasattr(sock, _RAGGED_EOF_IS_END):
        setattr(sock, _RAGGED_EOF_IS_END, bool(getattr(sock, "suppress_ragged_eofs", True)))
        setattr(sock, "suppress_ragged_eofs", False)  # noqa: B010 (not in typeshed's SSLSocket)


def _one_at_a_time(sock: socket.socket, call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` on a TLS socket serialised with the other pump's calls on it: one SSL object
    must not be read and written by two threads at once (OpenSSL's rule; the ssl module
    drops the GIL inside, and free-threaded builds have none). The calls never block (the
    sockets are non-blocking), so the lock is held only for one record's work."""
    lock = getattr(sock, _TLS_LOCK, None)
    if lock is None:
        return call

    def locked(*args: Any) -> Any:
        with lock:
            return call(*args)

    return locked


def speaks_fd_bytes(sock: socket.socket) -> bool:
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


def _close_notify(sock: socket.socket, deadline: float) -> None:
    """Before the FIN that ends a TLS side cleanly: its close_notify alert, so that the peer
    can tell the end of the stream from a cut (a strict TLS peer takes a FIN alone for a
    truncation). Waits for room to send it, until `deadline`; best effort, as the peer may be
    gone. Called once no pump can touch the socket.

    Only when the whole bridge ends, never to forward a half-close: OpenSSL's shutdown goes on
    to read the peer's alert, and application data it meets there fails the connection (seen
    with TLS 1.2 and 1.3). Through the TLS object's own shutdown, as unwrap() drops the TLS
    state and leaves the socket reading raw records."""
    tls = getattr(sock, "_sslobj", None) if isinstance(sock, ssl.SSLSocket) else None
    if tls is None:
        return
    while True:
        try:
            tls.shutdown()
            return  # the peer's alert was there already
        except ssl.SSLWantWriteError:
            pass  # the send buffer is full of what the bridge relayed: wait for room
        except ssl.SSLWantReadError:
            return  # sent; the peer's alert is not waited for (the socket is non-blocking)
        except (OSError, ValueError):
            return
        left = deadline - time.monotonic()
        if left <= 0 or not wait_ready(sock, for_write=True, timeout=left):
            return


def _read_and_drop(sock: socket.socket, deadline: float) -> Optional[int]:
    """Drop whatever is queued now (until `deadline`, but one read at least: bytes left
    unread make the close an RST): the byte count, or None once the peer has closed."""
    dropped = 0
    while True:
        try:
            data = socket.socket.recv(sock, 65536, _MSG_DONTWAIT)  # raw bytes, TLS or not
        except OSError:  # EAGAIN, or the connection is already gone
            return dropped
        if not data:
            return None
        dropped += len(data)
        if time.monotonic() >= deadline:
            return dropped


if sys.platform.startswith("linux"):
    import fcntl
    import termios

    def _unacked(sock: socket.socket) -> int:
        """Bytes sent on TCP `sock` that its peer has not acknowledged yet (SIOCOUTQ, the same
        number as TIOCOUTQ). Not for a Unix socket: there it counts what the peer has not read,
        and no RST comes."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)), sys.byteorder, signed=True)
        except OSError:
            return 0

else:

    def _unacked(sock: socket.socket) -> int:
        return 0  # unknown here: quiet alone decides


def _discard_unread(sock: socket.socket, deadline: float) -> None:
    """Drop what the peer sent that will never be relayed, before the socket is closed.

    Closing a TCP socket with unread bytes, or receiving bytes after it was closed, makes
    the kernel answer with RST, and an RST purges what we sent that the peer has not yet
    received (what it received stays readable there, before the error). The common case,
    nothing unread and every byte acknowledged, costs one non-blocking recv and an ioctl;
    otherwise drop until the peer closes, or stays quiet for a moment once it has acknowledged
    every byte we sent, until `deadline` (one for the bridge's two sides together, as the
    contract bounds the whole drain). Bytes still unacknowledged are waited for even when
    nothing is unread: a peer that speaks after our close (a TLS server's session tickets,
    sent unasked after its handshake) would otherwise get an RST that purges them.
    """
    if not _MSG_DONTWAIT:
        return
    dropped = _read_and_drop(sock, deadline)
    if dropped is None or (not dropped and not _unacked(sock)):
        return
    wait = _DRAIN_QUIET_SECONDS
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if wait_ready(sock, for_write=False, timeout=min(wait, left)):
            if _read_and_drop(sock, deadline) is None:
                return
            wait = _DRAIN_QUIET_SECONDS
        elif not _unacked(sock):
            return
        else:
            wait = _DRAIN_POLL_SECONDS


# Bridges between launch and teardown: what a forked child must finish (see _after_fork_in_child).
_live: weakref.WeakSet[ThreadRelay] = weakref.WeakSet()


class ThreadRelay:
    """One bridge of the pure engine. Built and started by ``start()``."""

    def __init__(
        self,
        stream1: socket.socket,
        stream2: socket.socket,
        plan: Plan,
        on_end: OnEnd,
        pump_cls: Callable[..., PumpProtocol],
        resume: Optional[BridgeState] = None,
    ) -> None:
        self._plan = plan
        self._on_end = on_end
        self._pump_cls = pump_cls
        self._lock = threading.Lock()
        # Notified when a pump parks, a FIN is forwarded, the bridge ends or a detach is over.
        self._changed = threading.Condition(self._lock)
        self.pausing = False  # a detach asked the pumps to stop reading (Gate)
        self._parked = 0  # pumps waiting in park()
        self._ended = threading.Event()
        self._reason: Optional[str] = None
        self._started = False  # everything _wake() needs exists
        self._wires: Tuple[socket.socket, socket.socket] = (stream1, stream2)
        self._owned: List[socket.socket] = []  # closed by the teardown
        # Readable once the bridge ends: every pump waits on it beside its socket.
        self._wake_pair: Tuple[socket.socket, ...] = ()
        self._fin_sent: Set[socket.socket] = set()  # wires we half-closed (half_close=True)
        self._pumps: List[PumpProtocol] = []
        self._pump_threads: List[threading.Thread] = []
        self._pumps_running = 0
        self._started_at = time.monotonic()
        # The idle rule's state (under the lock): checks without traffic in a row, when the
        # next one runs, and traffic a detached bridge had seen since its last check.
        self._resumed = resume is not None
        interval = min(float(plan.interval), _LONGEST_INTERVAL)
        self._idle_checks = resume.idle_checks if resume else 0
        self._next_check = self._started_at + (min(resume.next_check_in, interval) if resume else 0.0)
        self._carried_moved = [resume.moved_1_to_2, resume.moved_2_to_1] if resume else [False, False]

    def stop(self) -> None:
        self._end("stopped")

    def counts(self) -> Tuple[int, int]:
        return (self._pumps[0].bytes, self._pumps[1].bytes) if self._pumps else (0, 0)

    # -- detaching (Gate for the pumps) -------------------------------------------------

    def ended(self) -> bool:
        return self._reason is not None

    def park(self) -> bool:
        with self._changed:
            self._parked += 1
            self._changed.notify_all()
            while self.pausing and self._reason is None:
                self._changed.wait()
            self._parked -= 1
            return self._reason is None

    def detach(self, timeout: float) -> Optional[EngineDetached]:
        """See _bridge.Relay.detach. Both pumps park at their next read (a pump finishes the
        write it is in first: the bridge then holds nothing); then the fds are taken out of
        their socket objects, unclosed, and the checker ends the bridge without a shutdown."""
        from ._bridge import EngineDetached

        if len(self._owned) != 2:  # TLS: its state lives in the objects, not in the fds
            return None
        deadline = time.monotonic() + timeout
        with self._changed:
            if not self._started or self._reason is not None or self._fin_sent or self.pausing:
                return None
            self.pausing = True
            try:
                self._wake_pair[1].send(b"!")  # out of poll() (the pumps' _stopping says why)
            except OSError:
                self.pausing = False
                return None
            while self._parked < 2 and self._reason is None and not self._fin_sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self._parked < 2 or self._reason is not None or self._fin_sent:
                # Not quiet in time, or it ended: undo the pause (its byte first, so that no
                # pump that sees the pause over finds the wake socket readable for it).
                if self._reason is None:
                    self._wake_pair[0].recv(1)
                self.pausing = False
                self._changed.notify_all()
                return None
            self._reason = "detached"
            fds = (self._owned[0].detach(), self._owned[1].detach())
            moved = [pump.take_activity() or carried for pump, carried in zip(self._pumps, self._carried_moved)]
            result = EngineDetached(
                fd1=fds[0],
                fd2=fds[1],
                bytes_1_to_2=self._pumps[0].bytes,
                bytes_2_to_1=self._pumps[1].bytes,
                seconds=time.monotonic() - self._started_at,
                idle_checks=self._idle_checks,
                next_check_in=max(0.0, self._next_check - time.monotonic()),
                moved=(moved[0], moved[1]),
            )
            self._changed.notify_all()  # the parked pumps return
        self._ended.set()  # the checker tears down: no drain, nothing to close but its own
        return result

    # -- starting -----------------------------------------------------------------------

    def launch(self, adopt: bool = False) -> None:
        s1, s2 = self._wires
        if adopt:
            self._owned = [s1, s2]
            self._wake_pair = socket.socketpair()
        elif speaks_fd_bytes(s1) and speaks_fd_bytes(s2):
            # Private fds: a caller closing its objects can never free an fd number
            # under a running pump.
            self._owned = [_private_dup(s1)]
            try:
                self._owned.append(_private_dup(s2))
                self._wake_pair = socket.socketpair()
            except BaseException:
                for dup in self._owned:
                    dup.close()
                raise
            self._wires = (self._owned[0], self._owned[1])
        else:
            # TLS (or another wrapper): the bytes are not the fd's bytes, so the pumps
            # relay through the objects themselves.
            self._wake_pair = socket.socketpair()
        w1, w2 = self._wires
        for wire in (w1, w2):  # (before the pumps start: they share it, see _one_at_a_time)
            if isinstance(wire, ssl.SSLSocket) and getattr(wire, _TLS_LOCK, None) is None:
                setattr(wire, _TLS_LOCK, threading.Lock())
            _take_ragged_eofs(wire)
        try:
            # Non-blocking: every wait is a poll() that the wake socket can interrupt, and a
            # socket timeout the caller set can never end the bridge.
            w1.setblocking(False)
            w2.setblocking(False)
            wake = self._wake_pair[0]
            rate = self._plan.bandwidth
            more: Dict[str, Any] = {"bandwidth": rate} if rate else {}  # (a test's pump may take neither)
            if self._pump_cls is Pump:
                more["gate"] = self
            self._pumps = [self._pump_cls(w1, w2, wake, **more), self._pump_cls(w2, w1, wake, **more)]
            self._pumps_running = 2
            for index, name in ((0, "1->2"), (1, "2->1")):
                thread = threading.Thread(
                    target=self._pump_main, args=(index,), name=f"tcptotcp-pump {name}", daemon=True
                )
                thread.start()  # "can't start new thread" under load: cleaned up below
                self._pump_threads.append(thread)
            checker = threading.Thread(target=self._supervise, name="tcptotcp-checker", daemon=True)
            checker.start()
        except BaseException:
            # Leave nothing behind: stop a pump that did start, then close what we opened.
            with self._lock:
                self._reason = self._reason or "error"  # (a pump stops only for an ended bridge)
            self._wake_pair[1].send(b"!")
            for thread in self._pump_threads:
                thread.join()
            for sock in self._wake_pair if adopt else (*self._owned, *self._wake_pair):
                sock.close()  # (adopted fds stay open: start() hands them back)
            raise
        _live.add(self)
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
        src, other = self._wires[index], self._wires[1 - index]
        if outcome == EOF and self._reason is None:
            # Either side: a reset there may not have reached a read yet. Under the lock the
            # other pump forwards its FIN with: a socket we sent a FIN on closes once the peer
            # acknowledges it, which must not pass for a reset (it did, between the membership
            # test and the state read, on free-threaded 3.13).
            with self._lock:
                if any(w not in self._fin_sent and _was_reset(w) for w in (src, other)):
                    outcome = ERROR
        if outcome == EOF and self._plan.half_close and not all_done:
            # Forward the FIN; the other direction keeps flowing.
            with self._lock:
                self._fin_sent.add(other)
                _shutdown(other, socket.SHUT_WR)
                self._changed.notify_all()  # a detach waiting for the pumps gives up
            return
        self._end("closed" if outcome == EOF else "error")

    def _end(self, reason: str) -> None:
        """Record the first reason and wake everything."""
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            self._changed.notify_all()  # parked pumps return; a detach gives up
            if not self._started:
                return  # launch() will see the reason and wake everything itself
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
            if not isinstance(wire, ssl.SSLSocket):  # (a TLS side's FIN follows its close_notify)
                _shutdown(wire, socket.SHUT_WR)
        self._ended.set()

    # -- the idle checker ---------------------------------------------------------------

    def _traffic_since_last_check(self) -> bool:
        moved = [pump.take_activity() or carried for pump, carried in zip(self._pumps, self._carried_moved)]
        self._carried_moved = [False, False]
        return all(moved) if self._plan.activity_both else any(moved)

    def _supervise(self) -> None:
        """The contract's idle rule: a check at the start (or, resumed, when the detached
        bridge's next one was due) and every r seconds; then tear down."""
        idle_limit = self._plan.idle_limit
        interval = min(float(self._plan.interval), _LONGEST_INTERVAL)
        try:
            if self._resumed:
                self._wait_until(self._next_check)
            while not self._ended.is_set():
                with self._lock:  # (a detach reads the idle state)
                    if self._reason is not None:
                        break
                    idle = False
                    if self._traffic_since_last_check():
                        self._idle_checks = 0
                    elif self._idle_checks > idle_limit:
                        idle = True
                    else:
                        self._idle_checks += 1
                    if not idle:
                        self._next_check += interval
                if idle:
                    self._end("idle")
                    break
                self._wait_until(self._next_check)
        finally:
            self._end("stopped")
            self._tear_down()

    def _wait_until(self, deadline: float) -> None:
        while not self._ended.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._ended.wait(min(remaining, threading.TIMEOUT_MAX))

    def _tear_down(self) -> None:
        for thread in self._pump_threads:
            thread.join()
        _live.discard(self)
        # Only now that no pump can touch them: drain, then close the private fds (a detached
        # bridge's are the caller's already: what is unread stays for their next owner).
        p12, p21 = self._pumps
        reason = self._reason or "stopped"
        if reason == "closed" and any(p.last_errno in _PEER_FAILURES for p in self._pumps):
            reason = "error"
        deadline = time.monotonic() + _DRAIN_LIMIT_SECONDS
        wires = [wire for wire in self._wires if wire.fileno() >= 0 and reason != "detached"]
        for wire in wires:  # both ends first, then the drains: one side's drain can take it all
            if isinstance(wire, ssl.SSLSocket):
                # The alert says the stream is whole: only for a bridge that ended cleanly. A
                # reset, a stop, an idle end or a cut TLS side gets the FIN alone, which a TLS
                # peer takes for a cut (as nginx does on errors and timeouts).
                if reason == "closed" and not any(getattr(p, "cut", False) for p in self._pumps):
                    _close_notify(wire, deadline)
                _shutdown(wire, socket.SHUT_WR)
        for wire in wires:
            _discard_unread(wire, deadline)
        for sock in (*self._owned, *self._wake_pair):
            try:
                sock.close()
            except OSError:
                pass
        self._on_end(p12.bytes, p21.bytes, reason, time.monotonic() - self._started_at)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pump threads: close the child's copies of each
    running bridge's fds (the parent's connections are untouched) and report the bridge
    ended, "stopped", with the counts at the fork."""
    for relay in list(_live):
        _live.discard(relay)
        for sock in (*relay._owned, *relay._wake_pair):
            sock.close()
        b12, b21 = relay.counts()
        relay._on_end(b12, b21, "stopped", time.monotonic() - relay._started_at)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start(
    stream1: Union[socket.socket, int],
    stream2: Union[socket.socket, int],
    plan: Plan,
    on_end: OnEnd,
    *,
    pump: Callable[..., PumpProtocol] = Pump,
    resume: Optional[BridgeState] = None,
) -> ThreadRelay:
    """The pure engine's side of the seam: relay in the background; see the module doc.

    Given two fds (ints) instead of sockets, the bridge adopts them: no dups; they are its
    to close (unless start raises)."""
    if isinstance(stream1, int) and isinstance(stream2, int):
        adopt = True
        sock1 = socket.socket(fileno=stream1)
        try:
            sock2 = socket.socket(fileno=stream2)
        except BaseException:
            sock1.detach()
            raise
    elif isinstance(stream1, socket.socket) and isinstance(stream2, socket.socket):
        adopt, sock1, sock2 = False, stream1, stream2
    else:
        raise TypeError("two sockets or two fds")
    relay = ThreadRelay(sock1, sock2, plan, on_end, pump, resume)
    try:
        relay.launch(adopt)
    except BaseException:
        if adopt:  # nothing started: the fds stay the caller's, never closed behind its back
            sock1.detach()
            sock2.detach()
        raise
    return relay
