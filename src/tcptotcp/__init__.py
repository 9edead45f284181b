"""tcptotcp: relay bytes between two connected stream sockets.

``connect(stream1, stream2, rate_check_seconds, keep_alive_delay_time_seconds)`` relays
both ways until a side closes, an I/O error happens, or no traffic passed for too long.
The compiled core (``BACKEND == "cython"``) is used where it loaded; otherwise, or with
``TCPTOTCP_NO_EXTENSIONS=1``, the pure twin ``tcptotcp.pure`` (``BACKEND == "pure"``).
"""

import os

from . import _bridge, pure
from ._bridge import BridgeResult

__all__ = ["BACKEND", "Bridge", "BridgeResult", "Forwarder", "connect", "pure", "__version__"]
__version__ = "0.1.0"


def _load_core():
    if os.environ.get("TCPTOTCP_NO_EXTENSIONS", "") not in ("", "0"):
        return None
    try:
        from . import _core
    except ImportError:
        return None
    return _core


_core = _load_core()

if _core is None:
    BACKEND = "pure"
    Bridge = pure.Bridge
else:
    BACKEND = "cython"

    class Bridge(_bridge.Bridge):  # type: ignore[no-redef]
        __doc__ = _bridge.Bridge.__doc__
        fd_pump = _core.Pump


connect = _bridge.connect_with(Bridge)

from .forwarder import Forwarder  # noqa: E402  (needs Bridge above)
del _load_core, os
