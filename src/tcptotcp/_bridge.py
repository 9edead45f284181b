"""The public bridge, written once for both engines.

Validation, parameter clamping, ownership of the caller's sockets, the API (run, start, stop,
wait, callbacks) and the result live here. An engine relays; the seam is one function
(``Engine``): ``engine(stream1, stream2, plan, on_end) -> Relay``. It relays between private
duplicates of the two sockets in the background, applies the idle rule and the ending rules of
``Plan``, closes its duplicates, and then calls ``on_end`` once with the counts, the reason and
the seconds. ``_pump.start`` is the pure engine (threads per bridge); ``_core.start`` the
compiled one (a few C event loops for every bridge). Both keep docs/contract.md, and one
test suite pins both.
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, ClassVar, List, Optional, Protocol, Tuple, Type, Union

if TYPE_CHECKING:
    import asyncio
    from typing import ParamSpec

    _P = ParamSpec("_P")

from . import _pump

ACTIVITY_RULES = ("both", "any")
REASONS = ("closed", "idle", "error", "stopped", "detached")

# A throttled direction's bucket (see bandwidth_bucket).
_MIN_BURST = 64 * 1024
_WAIT_SLICE = 0.2  # seconds: the longest a signal may wait for its handler during Bridge.wait()
# Up to ~100 GB/s: the loops keep a bucket in a double of bytes and time in int64 ns.
MAX_BANDWIDTH = 100_000_000_000


def bandwidth_bucket(rate: int) -> Tuple[int, int]:
    """(burst, quantum) in bytes for a direction held to `rate` bytes/s, the one rule of both
    engines. The bucket starts full and holds at most `burst`; a direction that emptied it
    reads again once it holds `quantum`, so a bulk stream moves in reads of a quantum instead of
    a read per byte of refill. A quantum is 100 ms of the rate, or up to 500 ms where that is
    less than 64 KiB: a read (and a wake-up) costs the same for few bytes as for many, so slow
    bridges read in larger pieces, while nothing waits more than half a second for its turn.
    The burst is twice the quantum, so a timer that fires late keeps the tokens of its
    lateness (the measured rate stays on target under load), and at least 64 KiB, so that a
    slow bridge still passes a request or a handshake in one go after a pause."""
    quantum = max(1, rate // 10, min(_MIN_BURST, rate // 2))
    return max(2 * quantum, _MIN_BURST), quantum


@dataclass(frozen=True)
class Plan:
    """What an engine must know of a bridge: the idle rule's numbers and the ending rule.

    A check runs at the start and every `interval` seconds; one that finds qualifying traffic
    since the previous check resets the count of idle checks, otherwise the bridge ends
    ("idle") once that count already exceeds `idle_limit`, else the count grows by one.
    """

    interval: int  # r = max(1, rate_check_seconds)
    idle_limit: int  # k // r, with k = max(2, keep_alive_delay_time_seconds)
    activity_both: bool  # traffic qualifies only if both directions moved bytes
    half_close: bool  # forward a FIN and keep the other direction open
    # Bytes/s each direction may read (see bandwidth_bucket); 0: unlimited.
    bandwidth: int = 0


# Bridges of one forward (or one program) share their Plan: it is immutable, and one per bridge
# cost ~100 bytes each with thousands open.
@functools.lru_cache(maxsize=256)
def plan_of(
    rate_check_seconds: int,
    keep_alive_delay_time_seconds: int,
    activity: str,
    half_close: bool,
    *,
    bandwidth: int = 0,
) -> Plan:
    """A bridge's plan from the crate's parameters, checked and clamped as the crate does:
    a rate check of at least 1 s, a keep-alive of at least 2 s, idle after k // r checks.
    `bandwidth` is bytes/s per direction, 0 for unlimited."""
    r = _check_int(rate_check_seconds, "rate_check_seconds")
    k = _check_int(keep_alive_delay_time_seconds, "keep_alive_delay_time_seconds")
    check_activity(activity)
    rate = _check_int(bandwidth, "bandwidth")
    if not 0 <= rate <= MAX_BANDWIDTH:
        raise ValueError(f"bandwidth must be from 1 to {MAX_BANDWIDTH} bytes/s (0: unlimited), not {rate}")
    interval = max(1, r)
    return Plan(
        interval=interval,
        idle_limit=max(2, k) // interval,
        activity_both=activity == "both",
        half_close=bool(half_close),
        bandwidth=rate,
    )


def check_bandwidth(bandwidth: object) -> int:
    """A Bridge's `bandwidth` (bytes/s per direction, or None for unlimited) as a Plan's (0: none)."""
    if bandwidth is None:
        return 0
    if isinstance(bandwidth, bool):
        raise TypeError("bandwidth must be an integer or None, not bool")
    rate = _check_int(bandwidth, "bandwidth")
    if not 1 <= rate <= MAX_BANDWIDTH:
        raise ValueError(f"bandwidth must be from 1 to {MAX_BANDWIDTH} bytes/s, or None, not {rate}")
    return rate


@dataclass(frozen=True)
class BridgeState:
    """Where a detached bridge was: what ``Bridge(..., resume=state)`` carries on from.

    Plain numbers, so that it can be written down and passed to another process beside the fds.
    """

    bytes_1_to_2: int  # delivered so far, in all the bridge's lives
    bytes_2_to_1: int
    seconds: float  # its age
    idle_checks: int  # consecutive idle checks that found no qualifying traffic
    next_check_in: float  # seconds from the detach to the next idle check
    moved_1_to_2: bool  # each direction relayed bytes since the last idle check
    moved_2_to_1: bool


@dataclass(frozen=True)
class Detached:
    """What ``Bridge.detach()`` hands over: the two connections, as blocking sockets the caller
    now owns and must close (they are the fds the engine relayed on, neither shut down nor
    drained: bytes the peers sent and the bridge had not read wait in them), and the state."""

    stream1: socket.socket
    stream2: socket.socket
    state: BridgeState


@dataclass(frozen=True)
class EngineDetached:
    """An engine's side of a detach: its two fds (now the caller's) and the idle state."""

    fd1: int
    fd2: int
    bytes_1_to_2: int
    bytes_2_to_1: int
    seconds: float
    idle_checks: int
    next_check_in: float
    moved: Tuple[bool, bool]


class Relay(Protocol):
    """A running bridge inside an engine."""

    def stop(self) -> None: ...

    def counts(self) -> Tuple[int, int]: ...

    def detach(self, timeout: float) -> Optional[EngineDetached]:
        """Stop reading, deliver what the bridge holds, give up both fds unclosed and end the
        bridge, reason "detached"; None if it ended first, or could not deliver in `timeout` s
        (it then relays on as before). Blocks the calling thread, never the engine's."""
        ...


OnEnd = Callable[[int, int, str, float], None]


class Engine(Protocol):
    """Given sockets, an engine relays on private dups of them; given fds (ints), it adopts them.
    With `resume` (only passed when given), the idle rule goes on from that state instead of
    starting with a check."""

    def __call__(
        self,
        stream1: Union[socket.socket, int],
        stream2: Union[socket.socket, int],
        plan: Plan,
        on_end: OnEnd,
        *,
        resume: Optional[BridgeState] = None,
    ) -> Relay: ...


@dataclass(frozen=True)
class BridgeResult:
    """What a finished bridge did."""

    bytes_1_to_2: int
    bytes_2_to_1: int
    reason: str  # "closed" | "idle" | "error" | "stopped" | "detached"
    seconds: float


def _check_resume(resume: object) -> Optional[BridgeState]:
    if resume is None:
        return None
    if isinstance(resume, Detached):
        resume = resume.state
    if not isinstance(resume, BridgeState):
        raise TypeError(f"resume must be a BridgeState or Detached, not {type(resume).__name__}")
    counts = (resume.bytes_1_to_2, resume.bytes_2_to_1, resume.idle_checks)
    if any(_check_int(n, "resume counts") < 0 for n in counts):
        raise ValueError("resume: counts must not be negative")
    if not (resume.seconds >= 0 and resume.next_check_in >= 0):  # (NaN fails too)
        raise ValueError("resume: seconds and next_check_in must not be negative")
    return resume


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


class Bridge:
    """Relays bytes between two connected stream sockets until one of the contract's ends.

    ``Bridge(...).run()`` blocks (that is ``connect()``); ``start()`` runs it in the
    background, ``stop()`` ends it from any thread, ``wait()`` collects the result.
    The bridge owns both sockets: they are shut down and closed when it ends.
    ``bandwidth`` (bytes/s, or None) holds each direction to that rate: past a burst, the
    bridge reads no faster, so a faster sender is held back by its own socket's buffers.
    """

    #: The engine for sockets whose bytes are their fd's bytes; a face module binds it (a
    #: function goes in a staticmethod).
    fd_engine: ClassVar[Engine] = staticmethod(_pump.start)
    #: The engine for a bridge with a TLS side (or another wrapper): one that relays records
    #: itself where it can, and hands what it cannot to the pure engine.
    tls_engine: ClassVar[Engine] = staticmethod(_pump.start)
    #: Which engine fd_engine is: "cython" or "pure".
    engine_name: ClassVar[str] = "pure"

    def __init__(
        self,
        stream1: socket.socket,
        stream2: socket.socket,
        rate_check_seconds: int,
        keep_alive_delay_time_seconds: int,
        *,
        activity: str = "both",
        half_close: bool = False,
        bandwidth: Optional[int] = None,
        resume: Union[BridgeState, Detached, None] = None,
    ) -> None:
        _check_socket(stream1, "stream1")
        _check_socket(stream2, "stream2")
        if _same_connection(stream1, stream2):
            raise ValueError("stream1 and stream2 are the same socket")
        self._setup(
            (stream1, stream2),
            rate_check_seconds,
            keep_alive_delay_time_seconds,
            activity,
            half_close,
            bandwidth,
            resume,
        )

    @classmethod
    def from_fds(
        cls,
        fd1: int,
        fd2: int,
        rate_check_seconds: int,
        keep_alive_delay_time_seconds: int,
        *,
        activity: str = "both",
        half_close: bool = False,
        bandwidth: Optional[int] = None,
        resume: Union[BridgeState, Detached, None] = None,
    ) -> Bridge:
        """A bridge that adopts two fds of connected stream sockets: it relays on them without
        duplicating them, and closes them when it ends. If ``start()``/``run()`` raises, they
        are still the caller's. The fds are not checked beyond being distinct integers: a
        bad one makes the bridge end with reason "error". What a forwarder that made the
        sockets itself uses, to save the checks, the dups and their closes."""
        fds = (_check_int(fd1, "fd1"), _check_int(fd2, "fd2"))
        if fds[0] < 0 or fds[1] < 0 or fds[0] == fds[1]:
            raise ValueError(f"two distinct open fds needed, not {fds[0]} and {fds[1]}")
        bridge = cls.__new__(cls)
        bridge._setup(fds, rate_check_seconds, keep_alive_delay_time_seconds, activity, half_close, bandwidth, resume)
        return bridge

    def _setup(
        self,
        streams: Tuple[Union[socket.socket, int], Union[socket.socket, int]],
        rate_check_seconds: int,
        keep_alive_delay_time_seconds: int,
        activity: str,
        half_close: bool,
        bandwidth: Optional[int],
        resume: object,
    ) -> None:
        self._resume = _check_resume(resume)
        self._plan = plan_of(
            rate_check_seconds,
            keep_alive_delay_time_seconds,
            activity,
            half_close,
            bandwidth=check_bandwidth(bandwidth),
        )
        self._streams = streams
        self.rate_check_seconds = self._plan.interval
        self.keep_alive_delay_time_seconds = max(2, int(keep_alive_delay_time_seconds))
        self.activity = activity
        self.half_close = self._plan.half_close
        self.bandwidth = self._plan.bandwidth or None
        self._lock = threading.Lock()
        self._launched = False  # start()/run() was called
        self._stop_asked = False
        self._relay: Optional[Relay] = None
        self._result: Optional[BridgeResult] = None
        self._ended: Optional[threading.Event] = None  # made by the first wait() that must block
        self._callbacks: List[Callable[[BridgeResult], object]] = []
        self._detaching: Optional[threading.Lock] = None  # one detach() at a time (made by the first)

    # -- public API -------------------------------------------------------------------

    def run(self) -> BridgeResult:
        """Relay until the bridge ends, blocking the calling thread; return what happened.

        An exception in the waiting thread (KeyboardInterrupt) stops the bridge and is
        raised once both sockets are closed.
        """
        launched: List[bool] = []  # [True] once the engine relays
        try:
            self._launch(launched)  # in the try: an interrupt just after the start stops it too
            result = self.wait()
        except BaseException:
            if launched:
                self.stop()
                self._wait_through_interrupts()
            raise
        assert result is not None
        return result

    def start(self) -> Bridge:
        """Relay in the background; collect the result with ``wait()``."""
        self._launch()
        return self

    def stop(self) -> None:
        """End the bridge (reason ``"stopped"``) from any thread; returns at once."""
        with self._lock:
            self._stop_asked = True
            relay = self._relay
        if relay is not None:
            relay.stop()

    def detach(self, timeout: float = 1.0) -> Optional[Detached]:
        """Quiesce the bridge and hand its two connections over, unclosed, with its state.

        The engine stops reading both sides, delivers what it holds (a short write's tail, a
        pipe's bytes), then gives up both fds without a shutdown, a FIN or a read of what the
        peers still send; the bridge ends, reason ``"detached"``. The socket objects given to
        ``Bridge()`` are closed as at any end; the returned ``Detached`` holds new blocking
        sockets on the engine's fds, which the caller owns. ``Bridge(..., resume=detached)``
        goes on relaying them. From any thread; blocks (without the GIL) for at most about
        `timeout` seconds.

        None, with the bridge left as it is: if it was never started, has ended (or ends
        meanwhile), has half-closed a side, relays TLS, or could not deliver what it holds
        within `timeout` (a peer that does not read): reading then resumes, nothing lost.
        """
        timeout = float(timeout)
        if not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout}")
        with self._lock:  # (a lock per bridge only where one is detached: most never are)
            if self._detaching is None:
                self._detaching = threading.Lock()
            detaching = self._detaching
        with detaching:
            with self._lock:
                relay = self._relay
                if relay is None or self._result is not None or self._stop_asked:
                    return None
            detach = getattr(relay, "detach", None)
            got = detach(timeout) if detach is not None else None
            if got is None:
                return None
            streams: List[socket.socket] = []
            for fd in (got.fd1, got.fd2):
                try:
                    sock = socket.socket(fileno=fd)
                    sock.setblocking(True)  # the engine made it non-blocking
                except BaseException:
                    for made in streams:
                        made.close()
                    os.close(got.fd1)
                    os.close(got.fd2)
                    raise
                streams.append(sock)
            carried = self._resume
            state = BridgeState(
                bytes_1_to_2=got.bytes_1_to_2 + (carried.bytes_1_to_2 if carried else 0),
                bytes_2_to_1=got.bytes_2_to_1 + (carried.bytes_2_to_1 if carried else 0),
                seconds=got.seconds + (carried.seconds if carried else 0.0),
                idle_checks=got.idle_checks,
                next_check_in=got.next_check_in,
                moved_1_to_2=got.moved[0],
                moved_2_to_1=got.moved[1],
            )
            return Detached(streams[0], streams[1], state)

    def wait(self, timeout: Optional[float] = None) -> Optional[BridgeResult]:
        """The result, or ``None`` if the bridge still runs after `timeout` seconds.

        From any thread, any number of times, also after ``run()`` returned.
        """
        with self._lock:
            if not self._launched:
                raise RuntimeError("wait() needs a bridge started with start() or run()")
            if self._result is not None:
                return self._result
            if self._ended is None:
                self._ended = threading.Event()
            ended = self._ended
        # In slices: a signal (Ctrl-C) whose handler flag is set just before the wait blocks
        # does not wake it, and Python would run the handler only when the wait ends.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
            if ended.wait(max(0.0, left)) or (deadline is not None and time.monotonic() >= deadline):
                return self._result

    def add_done_callback(self, fn: Callable[[BridgeResult], object]) -> None:
        """Call ``fn(result)`` once the bridge ended: from the engine's thread, or at once
        in this thread if it already has. Exceptions it raises go to ``sys.unraisablehook``."""
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                return
            result = self._result
        _call_back(fn, result)

    @property
    def running(self) -> bool:
        return self._launched and self._result is None

    @property
    def counts(self) -> Tuple[int, int]:
        """Bytes delivered so far: (1 -> 2, 2 -> 1); the result's once ended."""
        if self._result is not None:
            return (self._result.bytes_1_to_2, self._result.bytes_2_to_1)
        relay = self._relay
        counts = relay.counts() if relay is not None else (0, 0)
        carried = self._resume
        if carried is None:
            return counts
        return (counts[0] + carried.bytes_1_to_2, counts[1] + carried.bytes_2_to_1)

    def __enter__(self) -> Bridge:
        if not self._launched:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._launched:
            self._wait_through_interrupts()

    # -- asyncio ------------------------------------------------------------------------

    async def wait_async(self) -> BridgeResult:
        """Await the result without blocking the event loop (no thread is started for it).

        Any number of coroutines may await one bridge. Cancelling one of them only stops
        that wait: the bridge runs on (``stop()`` ends it).
        """
        import asyncio

        with self._lock:
            if not self._launched:
                raise RuntimeError("wait_async() needs a bridge started with start()")
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BridgeResult] = loop.create_future()

        def deliver(result: BridgeResult) -> None:  # from the engine's thread, or right here
            try:
                loop.call_soon_threadsafe(_settle, ended, result)
            except RuntimeError:
                pass  # the loop was closed: nobody is waiting any more

        self.add_done_callback(deliver)
        return await ended

    async def __aenter__(self) -> Bridge:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        if self._launched:
            await _await_end(self)

    # -- inside -------------------------------------------------------------------------

    def _launch(self, launched: Optional[List[bool]] = None) -> None:
        """Start the engine; `launched` (run()'s) gets True as soon as the engine relays."""
        with self._lock:
            if self._launched:
                raise RuntimeError("a Bridge runs only once")
            self._launched = True
        s1, s2 = self._streams
        # TLS (or another wrapper): the bytes are not the fd's, so they go through the objects
        # themselves. Adopted fds are fd bytes.
        fd_bytes = isinstance(s1, int) or (
            isinstance(s1, socket.socket)
            and isinstance(s2, socket.socket)
            and _pump.speaks_fd_bytes(s1)
            and _pump.speaks_fd_bytes(s2)
        )
        engine = self.fd_engine if fd_bytes else self.tls_engine
        relay: Optional[Relay] = None
        try:
            if self._resume is None:
                relay = engine(s1, s2, self._plan, self._on_end)
            else:
                relay = engine(s1, s2, self._plan, self._on_end, resume=self._resume)
            if launched is not None:
                launched.append(True)
            with self._lock:
                self._relay = relay
                stop = self._stop_asked
        except BaseException:
            if relay is None:
                with self._lock:
                    self._launched = False  # nothing started: the sockets are as they were
            else:  # interrupted just after the start: the bridge must still end
                relay.stop()
            raise
        if stop:
            relay.stop()

    def _on_end(self, bytes_1_to_2: int, bytes_2_to_1: int, reason: str, seconds: float) -> None:
        """The engine's report, once, from its thread: its fds are closed; close the caller's."""
        for sock in self._streams:
            if isinstance(sock, socket.socket):  # adopted fds: the engine closed them
                try:
                    sock.close()
                except OSError:
                    pass
        carried = self._resume
        if carried is not None:
            bytes_1_to_2 += carried.bytes_1_to_2
            bytes_2_to_1 += carried.bytes_2_to_1
            seconds += carried.seconds
        result = BridgeResult(bytes_1_to_2, bytes_2_to_1, reason, seconds)
        with self._lock:
            self._result = result
            ended, callbacks, self._callbacks = self._ended, self._callbacks, []
        if ended is not None:
            ended.set()
        for fn in callbacks:
            _call_back(fn, result)

    def _wait_through_interrupts(self) -> None:
        """Wait for the end even through a second Ctrl-C; raise that one afterwards."""
        interrupted: Optional[BaseException] = None
        while True:
            try:
                self.wait()
                break
            except BaseException as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted


def _call_back(fn: Callable[[BridgeResult], object], result: BridgeResult) -> None:
    try:
        fn(result)
    except Exception as exc:
        report_unraisable(exc, "Exception in a tcptotcp Bridge done callback", fn)


class _Unraisable:
    def __init__(self, exc: BaseException, message: str, obj: object) -> None:
        self.exc_type, self.exc_value, self.exc_traceback = type(exc), exc, exc.__traceback__
        self.err_msg = message
        self.object = obj


def report_unraisable(exc: BaseException, message: str, obj: object = None) -> None:
    """Hand an exception no caller can receive (it arose in an engine's thread) to
    ``sys.unraisablehook``, which prints it by default."""
    sys.unraisablehook(_Unraisable(exc, message, obj))  # type: ignore[arg-type]


def _settle(future: asyncio.Future[BridgeResult], result: BridgeResult) -> None:
    if not future.done():  # a cancelled waiter
        future.set_result(result)


async def _await_end(bridge: Bridge) -> BridgeResult:
    """Await a bridge that was told to stop, even through cancellation (it ends within
    moments); a cancellation that came meanwhile is raised afterwards."""
    import asyncio

    ending = asyncio.ensure_future(bridge.wait_async())
    cancelled: Optional[BaseException] = None
    while True:
        try:
            result = await asyncio.shield(ending)
            break
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return result


def _signed(fn: Callable[..., object], bridge_cls: Type[Bridge], returns: object) -> None:
    """Give fn the signature of ``Bridge(...)`` (written once, in ``Bridge.__init__``)."""
    fn.__signature__ = inspect.signature(bridge_cls).replace(return_annotation=returns)  # type: ignore[attr-defined]


def connect_with(bridge_cls: Callable[_P, Bridge]) -> Callable[_P, BridgeResult]:
    """Build the module-level ``connect`` for a Bridge class bound to one engine."""

    def connect(*args: _P.args, **kwargs: _P.kwargs) -> BridgeResult:
        """Relay bytes both ways between two connected stream sockets until the bridge ends.

        ``connect(stream1, stream2, rate_check_seconds, keep_alive_delay_time_seconds, *,
        activity="both", half_close=False, bandwidth=None)``: blocks; returns a :class:`BridgeResult`. Both
        sockets are shut down and closed on return. It is ``Bridge(...).run()``.
        """
        return bridge_cls(*args, **kwargs).run()

    _signed(connect, bridge_cls, BridgeResult)  # type: ignore[arg-type]
    return connect


def aconnect_with(bridge_cls: Callable[_P, Bridge]) -> Callable[_P, Awaitable[BridgeResult]]:
    """Build the module-level ``aconnect`` for a Bridge class bound to one engine."""

    async def aconnect(*args: _P.args, **kwargs: _P.kwargs) -> BridgeResult:
        """``connect()`` for asyncio: relay until the bridge ends, without blocking the event loop.

        Same arguments as ``connect()``. Cancelling the awaiting task stops the bridge (reason
        "stopped"), waits for both sockets to be closed, and raises ``CancelledError``.
        """
        bridge = bridge_cls(*args, **kwargs).start()
        try:
            return await bridge.wait_async()
        except BaseException:
            bridge.stop()
            await _await_end(bridge)
            raise

    _signed(aconnect, bridge_cls, BridgeResult)  # type: ignore[arg-type]
    return aconnect
