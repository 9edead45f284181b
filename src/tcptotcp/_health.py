"""Active upstream health checks: a forward's upstreams, probed with a TCP (or Unix) connect.

Every ``interval`` seconds one round starts a non-blocking connect to each upstream; a connect
that completes is a success (the socket is closed at once, nothing is sent), an error or no
answer within ``timeout`` a failure. ``rise`` consecutive successes bring a down upstream back
up, ``fall`` consecutive failures take an up upstream down; each flip is reported through
``on_change``. One thread and one selector serve all of a forward's upstreams, so the cost of
the checks does not grow in threads with the number of upstreams.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._address import Address
from ._listener import Wakeup

log = logging.getLogger("tcptotcp")

_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timeout",  # the kernel gave up before our timeout did
}
_IN_PROGRESS = {errno.EINPROGRESS, errno.EALREADY}
_JOIN_SECONDS = 1.0  # close() waits this long at most: a stuck on_change must not hang a reload
MAX_DEFAULT_TIMEOUT = 5.0

OnChange = Callable[[Address, bool, str], None]


def reason_of(err: int) -> str:
    return _REASONS.get(err) or os.strerror(err).lower()


def describe(upstream: Address, up: bool, reason: str) -> str:
    """The log line of a flip, e.g. ``upstream 10.0.0.5:80 down: connection refused (3 checks)``."""
    return f"upstream {upstream.text} {'up' if up else 'down'}: {reason}"


def _check_settings(
    interval: Optional[float], rise: Optional[int], fall: Optional[int], timeout: Optional[float]
) -> None:
    for value, what in ((interval, "interval"), (timeout, "timeout")):
        if value is not None and not value > 0:
            raise ValueError(f"health check {what} must be > 0, not {value!r}")
    for count, what in ((rise, "rise"), (fall, "fall")):
        if count is not None and count < 1:
            raise ValueError(f"health check {what} must be >= 1, not {count!r}")


def _where(address: Address) -> Tuple[int, object]:
    return address.family, address.sockaddr


def _counted(what: str, n: int) -> str:
    return f"{what} ({n} check{'' if n == 1 else 's'})"


class _Upstream:
    """One upstream's state: the checker thread writes it under the checker's lock."""

    __slots__ = ("address", "up", "streak", "sock")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.up = True
        self.streak = 0  # consecutive results that disagree with `up`
        self.sock: Optional[socket.socket] = None  # the check in flight

    def record(self, ok: bool, reason: str, rise: int, fall: int) -> Optional[str]:
        """Count one result; the reason of the flip it causes, if it causes one."""
        if ok == self.up:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (rise if ok else fall):
            return None
        n, self.streak, self.up = self.streak, 0, ok
        return _counted("connected" if ok else reason, n)

    def abort(self, selector: Optional[selectors.BaseSelector]) -> None:
        if self.sock is not None:
            if selector is not None:
                selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


class HealthChecker:
    """Checks a forward's upstreams from one daemon thread (``start()`` .. ``close()``).

    All upstreams start UP, so that clients are served before the first round has completed;
    an upstream goes down only after ``fall`` failed checks. ``timeout`` (each connect's)
    defaults to ``min(interval, 5.0)``: a round then ends before the next one is due.
    ``on_change(upstream, up, reason)`` is called from the checker thread on each flip, outside
    the checker's lock (it may call ``states()``); ``describe()`` makes its log line.
    """

    def __init__(
        self,
        upstreams: Sequence[Address],
        *,
        interval: float,
        rise: int,
        fall: int,
        timeout: Optional[float] = None,
        on_change: OnChange,
        name: str = "",
    ) -> None:
        _check_settings(interval, rise, fall, timeout)  # before the wake-up pair is opened
        self._lock = threading.Lock()
        self._on_change = on_change
        self._name = name
        self._upstreams: Dict[str, _Upstream] = {}
        self._retired: List[_Upstream] = []  # removed with a check in flight: the thread closes it
        self._interval, self._rise, self._fall, self._timeout = 1.0, 1, 1, timeout
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._flips: List[Tuple[Address, bool, str]] = []  # the checker thread's, to report
        self._wakeup = Wakeup()
        self.update(upstreams, interval=interval, rise=rise, fall=fall, timeout=timeout)

    # -- control, from any thread -------------------------------------------------------

    def update(
        self,
        upstreams: Sequence[Address],
        *,
        interval: Optional[float] = None,
        rise: Optional[int] = None,
        fall: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """Take a reloaded upstream list; a None setting is left as it was.

        An upstream with the same text and address keeps its state and counts; a new one
        starts UP; a removed one is no longer checked (its check in flight is closed)."""
        _check_settings(interval, rise, fall, timeout)
        with self._lock:
            self._interval = self._interval if interval is None else interval
            self._rise = self._rise if rise is None else rise
            self._fall = self._fall if fall is None else fall
            self._timeout = self._timeout if timeout is None else timeout
            old, self._upstreams = self._upstreams, {}
            for address in upstreams:
                kept = old.get(address.text)
                # Text and sockaddr only: other fields (a balancing weight) do not reset health.
                if kept is not None and _where(kept.address) == _where(address):
                    kept.address = address
                    self._upstreams[address.text] = old.pop(address.text)
                elif address.text not in self._upstreams:
                    self._upstreams[address.text] = _Upstream(address)
            self._retired.extend(u for u in old.values() if u.sock is not None)
        self._wake()

    def start(self) -> None:
        with self._lock:
            if self._closed or self._thread is not None:
                raise RuntimeError("a HealthChecker starts once, before close()")
            self._thread = threading.Thread(
                target=self._run, name=f"tcptotcp-health {self._name}".rstrip(), daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the checks: returns once the thread has closed its sockets, or after about a
        second if an ``on_change`` call holds the thread (it then exits when that returns)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is None:
            self._close_wakeup()
        elif thread is not threading.current_thread():
            thread.join(_JOIN_SECONDS)

    def __enter__(self) -> HealthChecker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def states(self) -> Dict[str, bool]:
        """Each upstream's text -> up (a snapshot)."""
        with self._lock:
            return {text: u.up for text, u in self._upstreams.items()}

    def is_up(self, text: str) -> bool:
        """An upstream this checker does not know (not checked) counts as up."""
        with self._lock:
            u = self._upstreams.get(text)
            return u is None or u.up

    # -- the checker thread -------------------------------------------------------------

    def _connect_timeout(self) -> float:
        return min(self._interval, MAX_DEFAULT_TIMEOUT) if self._timeout is None else self._timeout

    def _wake(self) -> None:
        self._wakeup.set()  # (a no-op once the thread closed it)

    def _close_wakeup(self) -> None:
        self._wakeup.close()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wakeup, selectors.EVENT_READ)
        grid: Optional[float] = None  # the last round's start, on the schedule
        deadline: Optional[float] = None  # the current round's end, while checks are in flight
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    for u in self._retired:
                        u.abort(selector)
                    self._retired.clear()
                    now = time.monotonic()
                    flying = [u for u in self._upstreams.values() if u.sock is not None]
                    if deadline is not None and (not flying or now >= deadline):
                        for u in flying:
                            u.abort(selector)
                            self._result(u, False, "connect timeout")
                        deadline = None
                    due = now if grid is None else grid + self._interval  # a new interval applies at once
                    if deadline is None and now >= due:
                        # On time, or late by less than a round: keep to the schedule (no drift).
                        # An overrun starts the next round at once, and no burst follows it.
                        grid = due if now < due + self._interval else now
                        for u in self._upstreams.values():
                            self._connect(u, selector)
                        due = grid + self._interval
                        if any(u.sock is not None for u in self._upstreams.values()):
                            deadline = now + self._connect_timeout()
                    wait = max(0.0, (due if deadline is None else deadline) - now)
                self._notify()
                for key, _ in selector.select(wait):
                    if key.fileobj is self._wakeup:
                        self._wakeup.clear()
                    else:
                        self._completed(key, selector)
                self._notify()
        finally:
            with self._lock:
                for u in list(self._upstreams.values()) + self._retired:
                    u.abort(None)
            selector.close()
            self._close_wakeup()

    def _connect(self, u: _Upstream, selector: selectors.BaseSelector) -> None:
        try:
            sock = socket.socket(u.address.family, socket.SOCK_STREAM)
        except OSError as exc:
            self._result(u, False, reason_of(exc.errno or errno.EIO))
            return
        sock.setblocking(False)
        try:
            err = sock.connect_ex(u.address.sockaddr)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err in _IN_PROGRESS:
            u.sock = sock
            selector.register(sock, selectors.EVENT_WRITE, u)
            return
        sock.close()
        self._result(u, err == 0, reason_of(err) if err else "connected")

    def _completed(self, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> None:
        u: _Upstream = key.data
        with self._lock:
            if u.sock is not key.fileobj or self._upstreams.get(u.address.text) is not u:
                return  # removed since select() returned: the loop closes its check
            err = u.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            u.abort(selector)
            self._result(u, err == 0, reason_of(err) if err else "connected")

    def _result(self, u: _Upstream, ok: bool, reason: str) -> None:
        flipped = u.record(ok, reason, self._rise, self._fall)
        if flipped is not None:
            self._flips.append((u.address, u.up, flipped))

    def _notify(self) -> None:
        """Outside the lock: on_change may call states(), update() or close()."""
        flips, self._flips = self._flips, []
        for address, up, reason in flips:
            if self._closed:
                break
            try:
                self._on_change(address, up, reason)
            except Exception:
                log.exception("health check: on_change failed for %s", address.text)
