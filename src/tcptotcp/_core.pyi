"""Type stub for the compiled engine (see _core.pyx and _loop.h)."""

import socket
from typing import Callable, Dict, List, Optional, Tuple, Union

from ._bridge import Plan

BUFFER_SIZE: int
SPLICE_AVAILABLE: bool

class Relay:
    """One bridge in a loop."""

    def stop(self) -> None: ...
    def counts(self) -> Tuple[int, int]: ...
    @property
    def used_splice(self) -> Tuple[bool, bool]: ...
    @property
    def lent(self) -> bool: ...

def start(
    stream1: Union[socket.socket, int],
    stream2: Union[socket.socket, int],
    plan: Plan,
    on_end: Callable[[int, int, str, float], None],
    *,
    splice: bool = ...,
) -> Relay: ...
def claim_results() -> Optional[int]: ...
def deliver_results() -> None: ...
def release_results() -> None: ...
def loop_threads() -> int: ...
def stats() -> Dict[str, Union[int, List[int]]]: ...

class Listener:
    """Accepting and connecting in the loops (Linux)."""

    def fileno(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def next_id(self) -> int: ...
    def take(
        self, brief: bool = False
    ) -> Tuple[
        List[Tuple[int, object, Relay]],
        List[Tuple[int, object, int, int, int, str, float, int, bool]],
        Tuple[int, int, int],
    ]: ...
    def stop(self, cancel_connects: bool = True) -> None: ...

def listen(
    listener: socket.socket,
    upstream_family: int,
    upstream_sockaddr: object,
    sockopts: List[Tuple[int, int, int]],
    plan: Plan,
    connect_timeout: float,
    max_active: int,
    first_id: int,
    *,
    splice: bool = ...,
    access: Optional[Tuple[bool, bytes, bytes, bytes, bytes]] = ...,
) -> Listener: ...
