"""Which engine ``tcptotcp`` uses: the one place that decides.

The compiled core where it loaded, else the pure twin; ``TCPTOTCP_NO_EXTENSIONS=1`` forces the
pure twin. Everything that needs "the default Bridge" imports it from here.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional, Type

from . import _bridge, pure


def env_flag(name: str) -> bool:
    """An on/off switch in the environment (``TCPTOTCP_*``, ``CI``): unset, empty, "0",
    "false", "no" or "off" mean off; anything else means on."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _load_core() -> Optional[ModuleType]:
    if env_flag("TCPTOTCP_NO_EXTENSIONS"):
        return None
    try:
        from . import _core
    except ImportError:
        return None
    return _core


core = _load_core()

Bridge: Type[_bridge.Bridge]
if core is None:
    BACKEND = "pure"
    Bridge = pure.Bridge
else:
    BACKEND = "cython"
    _core_start = core.start

    class CoreBridge(_bridge.Bridge):
        __doc__ = _bridge.Bridge.__doc__
        fd_engine = staticmethod(_core_start)
        engine_name = "cython"

    Bridge = CoreBridge


connect = _bridge.connect_with(Bridge)
aconnect = _bridge.aconnect_with(Bridge)
