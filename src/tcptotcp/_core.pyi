"""Type stub for the compiled engine (see _core.pyx)."""

import socket

BUFFER_SIZE: int
PIPE_SIZE: int
SPLICE_AVAILABLE: bool

class Pump:
    """One direction's copy loop on raw fds, without the GIL (splice on Linux)."""

    def __init__(self, src: socket.socket, dst: socket.socket, *, splice: bool = ...) -> None: ...
    @property
    def bytes(self) -> int: ...
    @property
    def used_splice(self) -> bool: ...
    @property
    def last_errno(self) -> int: ...
    def take_activity(self) -> bool: ...
    def run(self) -> str: ...
