"""The pure-Python engine: one direction's copy loop.

The seam between the semantics (``_bridge``) and an engine is ``PumpProtocol``: construct
with (src, dst), ``run()`` blocks until the direction ends and says how (``EOF`` or
``ERROR``), ``bytes`` counts what was delivered, ``take_activity()`` reads-and-clears the
"bytes moved" flag. A pump never closes or shuts down anything: the bridge does.
"""

from __future__ import annotations

import select
import socket
from typing import Protocol

EOF = "eof"
ERROR = "error"

# 64 KiB: the pure loop pays ~2 Python-level calls a chunk; larger buffers gain little
# on loopback and cost memory per idle bridge.
BUFFER_SIZE = 64 * 1024


class PumpProtocol(Protocol):
    bytes: int

    def run(self) -> str: ...

    def take_activity(self) -> bool: ...


_POLL = getattr(select, "poll", None)


def _wait_ready(sock: socket.socket, for_write: bool) -> None:
    """Wait (bounded) until `sock` is readable/writable; a shutdown also wakes it."""
    if _POLL is not None:
        poller = _POLL()
        poller.register(sock, select.POLLOUT if for_write else select.POLLIN)
        poller.poll(1000)
    else:  # pragma: no cover - Windows
        fds = [sock]
        select.select([] if for_write else fds, fds if for_write else [], fds, 1.0)


class Pump:
    """Copies src -> dst with recv_into on one preallocated buffer and complete writes."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self._src = src
        self._dst = dst
        self._buffer = bytearray(BUFFER_SIZE)
        self._active = False
        self.bytes = 0
        # The bridge owns these sockets now: a caller's timeout is no idle policy, and a
        # blocking fd lets the loop below wait in the kernel instead of in Python.
        src.settimeout(None)
        dst.settimeout(None)

    def take_activity(self) -> bool:
        active, self._active = self._active, False
        return active

    def run(self) -> str:
        view = memoryview(self._buffer)
        recv_into = self._src.recv_into
        send = self._dst.send
        try:
            while True:
                try:
                    received = recv_into(view)
                except (BlockingIOError, socket.timeout):
                    # Someone made the fd non-blocking again: wait it out.
                    _wait_ready(self._src, for_write=False)
                    continue
                if not received:
                    return EOF
                sent = 0
                while sent < received:
                    try:
                        just_sent = send(view[sent:received])
                    except (BlockingIOError, socket.timeout):
                        _wait_ready(self._dst, for_write=True)
                        continue
                    sent += just_sent
                    self.bytes += just_sent
                self._active = True
        except OSError:
            return ERROR
        finally:
            view.release()
