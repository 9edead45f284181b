"""Which engine ``tcptotcp`` uses: the one place that decides.

The compiled core where it loaded, else the pure twin; ``TCPTOTCP_NO_EXTENSIONS=1`` forces the
pure twin. Everything that needs "the default Bridge" imports it from here.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from . import _bridge, pure


def env_flag(name: str) -> bool:
    """A ``TCPTOTCP_*`` switch: set to anything but empty or "0" means on."""
    return os.environ.get(name, "") not in ("", "0")


def _load_core() -> Optional[ModuleType]:
    if env_flag("TCPTOTCP_NO_EXTENSIONS"):
        return None
    try:
        from . import _core
    except ImportError:
        return None
    return _core


core = _load_core()

if core is None:
    BACKEND = "pure"
    Bridge: type = pure.Bridge
else:
    BACKEND = "cython"

    class Bridge(_bridge.Bridge):  # type: ignore[no-redef]
        __doc__ = _bridge.Bridge.__doc__
        fd_engine = staticmethod(core.start)
        engine_name = "cython"


connect = _bridge.connect_with(Bridge)
aconnect = _bridge.aconnect_with(Bridge)
