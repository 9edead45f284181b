"""A port forwarder: accept local clients and bridge each to an upstream.

The original crate's headline example, as a library class the CLI wires to signals:
``Forwarder(listen, upstream).serve_forever()`` in one thread, ``close()`` from another.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Set, Tuple, Union

from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge, BridgeResult, check_activity

log = logging.getLogger("tcptotcp")

SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int], str]
# Accept errors that mean "out of a resource right now": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_SECONDS = 0.1


@dataclass(frozen=True)
class Address:
    """A parsed ``host:port``, ``[v6addr]:port`` or ``unix:/path``."""

    family: int
    sockaddr: SockAddr
    text: str

    @classmethod
    def parse(cls, text: str, *, passive: bool = False) -> "Address":
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ValueError(f"{text!r}: unix: needs a path")
            return cls(socket.AF_UNIX, path, text)
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected host:port, [v6addr]:port or unix:/path")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
        try:
            port = int(port_text, 10)
        except ValueError:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range")
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0
            )[0]
        except socket.gaierror as exc:
            raise ValueError(f"{text!r}: cannot resolve {host!r} ({exc.strerror})") from None
        return cls(family, sockaddr, text)


def format_sockaddr(family: int, sockaddr: Any) -> str:
    if family == socket.AF_UNIX:
        return f"unix:{sockaddr}" if sockaddr else "unix:(unnamed)"
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return f"{sockaddr[0]}:{sockaddr[1]}"


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


class Forwarder:
    """Accepts clients on `listen` and bridges each to `upstream` with one ``Bridge``."""

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
        bridge_class: Optional[type] = None,
        backlog: int = 128,
    ) -> None:
        self.listen = listen if isinstance(listen, Address) else Address.parse(listen, passive=True)
        self.upstream = upstream if isinstance(upstream, Address) else Address.parse(upstream)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._bridge_args = dict(
            rate_check_seconds=rate_check_seconds,
            keep_alive_delay_time_seconds=idle_timeout_seconds,
            activity=activity,
            half_close=half_close,
        )
        check_activity(activity)  # fail now, not once per client
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.bridge_class: type = DefaultBridge if bridge_class is None else bridge_class
        self.stats = ForwarderStats()

        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._bridges: Set[Bridge] = set()
        self._handlers: Dict[int, threading.Thread] = {}
        self._closing = threading.Event()
        self._draining = False  # close(drain_seconds > 0) in progress: let bridges run
        self._next_id = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
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

    def serve_forever(self) -> None:
        """Accept and bridge clients until ``close()`` (or ``request_stop()``) is called."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._closing.is_set():
                # At the connection limit, leave clients in the backlog rather than
                # accepting and dropping them.
                if not self._slots.acquire(timeout=0.2):
                    continue
                accepted = False
                try:
                    if any(key.fileobj is self._listener for key, _ in selector.select(1.0)):
                        accepted = self._accept_one()
                finally:
                    if not accepted:
                        self._slots.release()

    def _accept_one(self) -> bool:
        try:
            client, peer = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                log.error("accept failed: %s; backing off", exc.strerror)
                self._closing.wait(_BACKOFF_SECONDS)
                return False
            raise
        with self._lock:
            self._next_id += 1
            conn_id = self._next_id
            self.stats.accepted += 1
            self.stats.active += 1
        handler = threading.Thread(
            target=self._handle, args=(conn_id, client, peer), name=f"tcptotcp-conn-{conn_id}", daemon=True
        )
        with self._lock:
            self._handlers[conn_id] = handler
        handler.start()
        return True

    # -- one client ---------------------------------------------------------------------

    def _connect_upstream(self) -> socket.socket:
        sock = socket.socket(self.upstream.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.upstream.sockaddr)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _handle(self, conn_id: int, client: socket.socket, peer: Any) -> None:
        peer_text = format_sockaddr(client.family, peer)
        upstream: Optional[socket.socket] = None
        try:
            client.setblocking(True)
            try:
                upstream = self._connect_upstream()
            except OSError as exc:
                with self._lock:
                    self.stats.upstream_failures += 1
                log.error("#%d %s: upstream %s failed: %s", conn_id, peer_text, self.upstream.text, exc)
                return
            try:
                for sock in (client, upstream):
                    _no_delay(sock)
                bridge = self.bridge_class(client, upstream, **self._bridge_args)
            except (OSError, ValueError) as exc:  # e.g. the client already left
                log.info("#%d %s: not bridged: %s", conn_id, peer_text, exc)
                return
            with self._lock:
                self._bridges.add(bridge)
                if self._closing.is_set() and not self._draining:
                    bridge.stop()
            log.info("#%d open %s -> %s", conn_id, peer_text, self.upstream.text)
            try:
                result: BridgeResult = bridge.run()
            except (OSError, RuntimeError) as exc:  # out of fds or threads: nothing started
                log.error("#%d %s: bridge not started: %s", conn_id, peer_text, exc)
                return
            finally:
                with self._lock:
                    self._bridges.discard(bridge)
            with self._lock:
                self.stats.bytes_up += result.bytes_1_to_2
                self.stats.bytes_down += result.bytes_2_to_1
            log.info(
                "#%d close %s: %d bytes up, %d down, %s after %.3f s",
                conn_id,
                peer_text,
                result.bytes_1_to_2,
                result.bytes_2_to_1,
                result.reason,
                result.seconds,
            )
        except Exception:
            log.exception("#%d %s: unexpected failure", conn_id, peer_text)
        finally:
            client.close()  # no-ops once the bridge has closed them
            if upstream is not None:
                upstream.close()
            with self._lock:
                self.stats.active -= 1
                self._handlers.pop(conn_id, None)
            self._slots.release()

    # -- stopping -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Make ``serve_forever()`` return soon; safe from a signal handler or any thread."""
        self._closing.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open bridges finish for up to `drain_seconds`, then stop them."""
        with self._lock:
            self._draining = drain_seconds > 0
        self.request_stop()
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
        # Handlers end promptly once their bridge is stopped; one still connecting
        # upstream is bounded by connect_timeout, and is a daemon thread.
        stop_waiting = time.monotonic() + 2.0
        with self._lock:
            handlers = list(self._handlers.values())
        for handler in handlers:
            handler.join(max(0.0, stop_waiting - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "Forwarder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        s = self.stats
        return (
            f"served {s.accepted} connections ({s.upstream_failures} upstream failures), "
            f"{s.bytes_up} bytes up, {s.bytes_down} bytes down"
        )
