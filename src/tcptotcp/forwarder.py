"""A port forwarder: accept local clients and bridge each to an upstream.

The original crate's headline example, as a library class the CLI wires to signals:
``Forwarder(listen, upstream).serve_forever()`` in one thread, ``close()`` from another.

One thread does all of the forwarder's own work: a selector loop that accepts clients,
connects to the upstream without blocking (``connect_timeout`` as a timer), and hands each
connected pair to a ``Bridge`` started in the background. No thread is started per client;
on the compiled backend the bridges run on the engine's loop threads, and each one's end is
logged and counted from its done callback.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

from ._address import Address, format_sockaddr
from ._backend import Bridge as DefaultBridge
from ._backend import core
from ._bridge import Bridge, BridgeResult, check_activity

log = logging.getLogger("tcptotcp")

# Accept errors that mean "out of a resource right now": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_SECONDS = 0.1


def _no_delay(sock: socket.socket) -> None:
    """Forward each read at once: the sending peer already made its own Nagle choice, and a
    relay that delays a message's tail behind a delayed ACK adds 40 ms to request/response."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class ForwarderStats:
    accepted: int = 0
    upstream_failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    active: int = 0


class _Peer:
    """A client's address, formatted only if a log line is written."""

    __slots__ = ("family", "sockaddr")

    def __init__(self, family: int, sockaddr: Any) -> None:
        self.family = family
        self.sockaddr = sockaddr

    def __str__(self) -> str:
        return format_sockaddr(self.family, self.sockaddr)


class _Client:
    """A client between accept and its bridge: waiting for the upstream connect."""

    __slots__ = ("conn_id", "fd", "peer", "upstream", "deadline")

    def __init__(self, conn_id: int, fd: int, peer: _Peer, upstream: socket.socket, deadline: float):
        self.conn_id = conn_id
        self.fd = fd  # the accepted client, as a bare fd until its bridge adopts it
        self.peer = peer
        self.upstream = upstream
        self.deadline = deadline


def raise_fd_limit() -> Tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as haproxy does; (soft, hard) after."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


class Forwarder:
    """Accepts clients on `listen` and bridges each to `upstream` with one ``Bridge``."""

    #: fds one client costs: its socket and the upstream's, adopted by the bridge; the pure
    #: engine adds its wake pair.
    FDS_PER_CLIENT = {"cython": 2, "pure": 4}

    def __init__(
        self,
        listen: Union[str, Address],
        upstream: Union[str, Address],
        *,
        rate_check_seconds: int = 5,
        idle_timeout_seconds: int = 7200,
        activity: str = "both",
        half_close: bool = False,
        max_connections: int = 1024,
        connect_timeout: float = 10.0,
        bridge_class: Optional[Type[Bridge]] = None,
        backlog: int = 4096,
    ) -> None:
        self.listen = listen if isinstance(listen, Address) else Address.parse(listen, passive=True)
        self.upstream = upstream if isinstance(upstream, Address) else Address.parse(upstream)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._bridge_args: Dict[str, Any] = dict(
            rate_check_seconds=rate_check_seconds,
            keep_alive_delay_time_seconds=idle_timeout_seconds,
            activity=activity,
            half_close=half_close,
        )
        check_activity(activity)  # fail now, not once per client
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.bridge_class: Type[Bridge] = DefaultBridge if bridge_class is None else bridge_class
        self.stats = ForwarderStats()

        self._lock = threading.Lock()
        self._bridges: Set[Bridge] = set()
        self._connecting: Dict[int, _Client] = {}  # by upstream fd
        self._timers: List[Tuple[float, int, int]] = []  # (deadline, conn_id, upstream fd)
        self._closing = threading.Event()
        self._draining = False  # close(drain_seconds > 0) in progress: let bridges run
        self._serving = threading.Lock()  # held while serve_forever() runs
        self._ids = itertools.count(1)
        self._accept_paused_until = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = self._bind(backlog)
        self.address = self._listener.getsockname()

    # -- listening ----------------------------------------------------------------------

    def _bind(self, backlog: int) -> socket.socket:
        sock = socket.socket(self.listen.family, socket.SOCK_STREAM)
        try:
            if self.listen.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.listen.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # nothing wider
            # Accepted sockets inherit it: each read is forwarded at once (see _no_delay).
            _no_delay(sock)
            sock.bind(self.listen.sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._wake_r.close()
            self._wake_w.close()
            raise
        return sock

    @property
    def address_text(self) -> str:
        return format_sockaddr(self.listen.family, self.address)

    def fd_shortfall(self) -> Optional[Tuple[int, int]]:
        """(fds needed for max_connections, fds this process may open) when the first is
        more than the second, else None."""
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX
            return None
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
        needed = self.max_connections * self.FDS_PER_CLIENT.get(getattr(self.bridge_class, "engine_name", ""), 4)
        return (needed, soft - in_use) if needed > soft - in_use else None

    def serve_forever(self) -> None:
        """Accept and bridge clients until ``close()`` (or ``request_stop()``) is called."""
        with self._serving, selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            results = self._claim_results()
            if results is not None:
                selector.register(results, selectors.EVENT_READ)
            listening = False
            try:
                while not self._closing.is_set():
                    want = self._may_accept()
                    if want != listening:
                        if want:
                            selector.register(self._listener, selectors.EVENT_READ)
                        else:
                            selector.unregister(self._listener)
                        listening = want
                    for key, _ in selector.select(self._select_timeout()):
                        if key.fileobj is self._listener:
                            self._accept_some(selector)
                        elif key.fileobj is self._wake_r:
                            self._drain_wake()
                        elif key.fileobj is results:
                            core.deliver_results()  # type: ignore[union-attr]
                        else:
                            self._upstream_ready(selector, key.data)
                    self._expire_connects(selector)
            finally:
                for client in list(self._connecting.values()):
                    self._drop_client(selector, client)
                if results is not None:
                    core.release_results()  # type: ignore[union-attr]

    def _claim_results(self) -> Optional[int]:
        """On the compiled engine, this thread finishes ended bridges itself (an fd to watch):
        no hand-off to the results thread per client, and no GIL traffic between the two."""
        if core is None or getattr(self.bridge_class, "engine_name", "") != "cython":
            return None
        return core.claim_results()  # None while another forwarder holds it

    def _may_accept(self) -> bool:
        # At the connection limit, leave clients in the backlog rather than accepting and
        # dropping them; after EMFILE, wait a moment instead of spinning.
        return self.stats.active < self.max_connections and time.monotonic() >= self._accept_paused_until

    def _select_timeout(self) -> float:
        timeout = 1.0
        if self._timers:
            timeout = min(timeout, self._timers[0][0] - time.monotonic())
        if self._accept_paused_until > time.monotonic():
            timeout = min(timeout, self._accept_paused_until - time.monotonic())
        return max(0.0, timeout)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed

    # -- one client ---------------------------------------------------------------------

    def _accept_some(self, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # then let the other events of this turn run
            if not self._may_accept():
                return
            try:
                # The bare fd: no socket object, no blocking-mode syscall; its bridge adopts it.
                client, peer = self._listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error("accept failed: %s; backing off", exc.strerror)
                    self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
                    return
                raise
            self._accept_paused_until = 0.0
            conn_id = next(self._ids)
            with self._lock:
                self.stats.accepted += 1
                self.stats.active += 1
            self._connect_upstream(selector, conn_id, client, _Peer(self.listen.family, peer))

    def _connect_upstream(self, selector: selectors.BaseSelector, conn_id: int, client: int, peer: _Peer) -> None:
        try:
            upstream = socket.socket(self.upstream.family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
            self._upstream_failed(conn_id, client, peer, exc)
            return
        upstream.setblocking(False)
        _no_delay(upstream)
        err = upstream.connect_ex(self.upstream.sockaddr)
        if err == errno.EINPROGRESS:
            # On a local upstream the handshake has usually completed inside connect() already;
            # asking again (0 once connected) saves a trip through the selector.
            err = upstream.connect_ex(self.upstream.sockaddr)
            if err in (errno.EALREADY, errno.EINPROGRESS):
                err = errno.EINPROGRESS
            elif err == errno.EISCONN:
                err = 0
        if err == 0:
            self._bridge(conn_id, client, peer, upstream)
        elif err == errno.EINPROGRESS or (err == errno.EAGAIN and upstream.family != socket.AF_UNIX):
            # (A Unix socket's EAGAIN is a full backlog: that connect never completes.)
            pending = _Client(conn_id, client, peer, upstream, time.monotonic() + self.connect_timeout)
            self._connecting[upstream.fileno()] = pending
            heapq.heappush(self._timers, (pending.deadline, conn_id, upstream.fileno()))
            selector.register(upstream, selectors.EVENT_WRITE, pending)
        else:
            upstream.close()
            self._upstream_failed(conn_id, client, peer, OSError(err, os.strerror(err)))

    def _upstream_ready(self, selector: selectors.BaseSelector, pending: _Client) -> None:
        selector.unregister(pending.upstream)
        del self._connecting[pending.upstream.fileno()]
        err = pending.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            pending.upstream.close()
            self._upstream_failed(pending.conn_id, pending.fd, pending.peer, OSError(err, os.strerror(err)))
        else:
            self._bridge(pending.conn_id, pending.fd, pending.peer, pending.upstream)

    def _expire_connects(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, conn_id, fd = heapq.heappop(self._timers)
            pending = self._connecting.get(fd)
            if pending is None or pending.conn_id != conn_id:
                continue  # connected or failed already
            selector.unregister(pending.upstream)
            del self._connecting[fd]
            pending.upstream.close()
            self._upstream_failed(conn_id, pending.fd, pending.peer, socket.timeout("timed out"))

    def _drop_client(self, selector: selectors.BaseSelector, pending: _Client) -> None:
        """Closing with a connect still pending: give up on it without a log line per client."""
        selector.unregister(pending.upstream)
        del self._connecting[pending.upstream.fileno()]
        pending.upstream.close()
        os.close(pending.fd)
        self._client_gone()

    def _upstream_failed(self, conn_id: int, client: int, peer: _Peer, exc: OSError) -> None:
        with self._lock:
            self.stats.upstream_failures += 1
        log.error("#%d %s: upstream %s failed: %s", conn_id, peer, self.upstream.text, exc)
        os.close(client)
        self._client_gone()

    def _client_gone(self) -> None:
        with self._lock:
            self.stats.active -= 1
            slot_opened = self.stats.active == self.max_connections - 1
        if slot_opened:
            self._wake()  # the serve loop may take the listener back

    def _bridge(self, conn_id: int, client: int, peer: _Peer, upstream: socket.socket) -> None:
        # Both sockets are ours: the bridge adopts their fds (no checks, dups or extra closes).
        try:
            bridge = self.bridge_class.from_fds(client, upstream.fileno(), **self._bridge_args)
            log.info("#%d open %s -> %s", conn_id, peer, self.upstream.text)
            bridge.start()
        except Exception as exc:  # out of fds or threads (or a custom bridge_class failed)
            log.error("#%d %s: bridge not started: %s", conn_id, peer, exc)
            os.close(client)
            upstream.close()
            if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
                self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
            self._client_gone()
            return
        upstream.detach()  # the bridge closes it
        # close() stops what is in _bridges only once serve_forever() returned: none is missed.
        with self._lock:
            self._bridges.add(bridge)
        bridge.add_done_callback(lambda result: self._bridge_ended(conn_id, peer, bridge, result))

    def _bridge_ended(self, conn_id: int, peer: _Peer, bridge: Bridge, result: BridgeResult) -> None:
        """From the engine's thread, once per bridge."""
        with self._lock:
            self._bridges.discard(bridge)
            self.stats.bytes_up += result.bytes_1_to_2
            self.stats.bytes_down += result.bytes_2_to_1
        log.info(
            "#%d close %s: %d bytes up, %d down, %s after %.3f s",
            conn_id,
            peer,
            result.bytes_1_to_2,
            result.bytes_2_to_1,
            result.reason,
            result.seconds,
        )
        self._client_gone()

    # -- stopping -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Make ``serve_forever()`` return soon; safe from a signal handler or any thread."""
        self._closing.set()
        self._wake()

    def close(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open bridges finish for up to `drain_seconds`, then stop them."""
        with self._lock:
            self._draining = drain_seconds > 0
        self.request_stop()
        # serve_forever() gives up on pending upstream connects as it returns.
        if not self._serving.acquire(timeout=5.0):
            log.error("serve_forever() did not return in time")
        else:
            self._serving.release()
        self._listener.close()
        if self.listen.family == socket.AF_UNIX and isinstance(self.listen.sockaddr, str):
            try:
                os.unlink(self.listen.sockaddr)
            except OSError:
                pass
        deadline = time.monotonic() + max(0.0, drain_seconds)
        while self._draining and time.monotonic() < deadline and self.stats.active:
            time.sleep(0.05)
        with self._lock:
            self._draining = False
            bridges = list(self._bridges)
        for bridge in bridges:
            bridge.stop()
        stop_waiting = time.monotonic() + 2.0
        for bridge in bridges:
            bridge.wait(max(0.0, stop_waiting - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        s = self.stats
        return (
            f"served {s.accepted} connections ({s.upstream_failures} upstream failures), "
            f"{s.bytes_up} bytes up, {s.bytes_down} bytes down"
        )
