"""The pure-Python twin: the same API as ``tcptotcp``, over the pure engine only.

It is also what ``tcptotcp`` becomes where the compiled core cannot load, or with
``TCPTOTCP_NO_EXTENSIONS=1`` in the environment.
"""

from . import _bridge, _pump
from ._aio import take_socket
from ._bridge import BridgeResult, BridgeState, Detached

__all__ = ["BACKEND", "Bridge", "BridgeResult", "BridgeState", "Detached", "aconnect", "connect", "take_socket"]

BACKEND = "pure"


class Bridge(_bridge.Bridge):
    __doc__ = _bridge.Bridge.__doc__
    fd_engine = staticmethod(_pump.start)
    engine_name = "pure"


connect = _bridge.connect_with(Bridge)
aconnect = _bridge.aconnect_with(Bridge)
