"""The pure-Python engine: one direction's copy loop.

The seam between the semantics (``_bridge``) and an engine is ``PumpProtocol``: construct
with (src, dst, wake): two non-blocking sockets and a socket that turns readable when the
bridge wants the pump to stop. ``run()`` blocks until the direction ends and says how
(``EOF``, ``ERROR`` or ``STOPPED``); ``bytes`` counts what was delivered in full,
``last_errno`` says what failed, and ``take_activity()`` reads-and-clears the "bytes moved"
flag. A pump never closes or shuts down anything: the bridge does.
"""

from __future__ import annotations

import select
import socket
import ssl
from typing import Protocol

EOF = "eof"
ERROR = "error"
STOPPED = "stopped"

# 64 KiB: the pure loop pays a few Python-level calls a chunk; larger buffers gain little
# on loopback and cost memory per idle bridge.
BUFFER_SIZE = 64 * 1024


class PumpProtocol(Protocol):
    bytes: int
    last_errno: int  # errno of the failure behind ERROR, else 0

    def run(self) -> str: ...

    def take_activity(self) -> bool: ...


_POLL = getattr(select, "poll", None)


def wait_ready(sock: socket.socket, for_write: bool, timeout: float) -> bool:
    """Whether `sock` turned readable/writable within `timeout` seconds."""
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
        self._pollers: dict = {}  # (fd, for_write) -> poll object, built once

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


# What a non-blocking call raises when it must wait. TLS may need to read in order to
# write and the reverse (renegotiation, key updates), so the exception says for what.
_MUST_WAIT = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Pump:
    """Copies src -> dst with recv_into on one preallocated buffer and complete writes."""

    def __init__(self, src: socket.socket, dst: socket.socket, wake: socket.socket) -> None:
        self._src = src
        self._dst = dst
        self._waiter = _Waiter(wake)
        self._buffer = bytearray(BUFFER_SIZE)
        self._active = False
        self.bytes = 0
        self.last_errno = 0

    def take_activity(self) -> bool:
        active, self._active = self._active, False
        return active

    def run(self) -> str:
        view = memoryview(self._buffer)
        src, dst, ready = self._src, self._dst, self._waiter.ready
        recv_into, send = src.recv_into, dst.send
        # After a short read the queue is empty: wait first instead of paying for a read
        # that raises BlockingIOError (an exception and a syscall per message). Not for
        # TLS, which may hold decrypted bytes that poll() cannot see.
        poll_first = not isinstance(src, ssl.SSLSocket)
        emptied = poll_first
        try:
            while True:
                if emptied and not ready(src, for_write=False):
                    return STOPPED
                try:
                    received = recv_into(view)
                except _MUST_WAIT as exc:
                    if not ready(src, for_write=isinstance(exc, ssl.SSLWantWriteError)):
                        return STOPPED
                    continue
                if not received:
                    return EOF
                sent = 0
                while sent < received:
                    try:
                        just_sent = send(view[sent:received])
                    except _MUST_WAIT as exc:
                        if not ready(dst, for_write=not isinstance(exc, ssl.SSLWantReadError)):
                            return STOPPED
                        continue
                    sent += just_sent
                    self.bytes += just_sent
                self._active = True
                emptied = poll_first and received < BUFFER_SIZE
        except OSError as exc:
            self.last_errno = exc.errno or 0
            return ERROR
        finally:
            view.release()
