"""tcptotcp: relay bytes between two connected stream sockets.

``connect(stream1, stream2, rate_check_seconds, keep_alive_delay_time_seconds)`` relays
both ways until a side closes, an I/O error happens, or no traffic passed for too long.
The compiled core (``BACKEND == "cython"``) is used where it loaded; otherwise, or with
``TCPTOTCP_NO_EXTENSIONS=1``, the pure twin ``tcptotcp.pure`` (``BACKEND == "pure"``).
"""

from . import pure
from ._aio import take_socket
from ._backend import BACKEND, Bridge, aconnect, connect
from ._bridge import BridgeResult, BridgeState, Detached
from ._version import __version__
from .forwarder import Forwarder

__all__ = [
    "BACKEND",
    "Bridge",
    "BridgeResult",
    "BridgeState",
    "Detached",
    "Forwarder",
    "aconnect",
    "connect",
    "pure",
    "take_socket",
    "__version__",
]
