"""Which engine ``tcptotcp`` uses: the one place that decides.

The compiled core where it loaded, else the pure twin; ``TCPTOTCP_NO_EXTENSIONS=1`` forces the
pure twin. Everything that needs "the default Bridge" imports it from here.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Optional, Type

from . import _bridge, _pump, pure


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
    _relays_tls_of = core.relays_tls_of

    def _core_tls_start(
        stream1: Any, stream2: Any, plan: _bridge.Plan, on_end: Any, *, resume: Optional[_bridge.BridgeState] = None
    ) -> Any:
        """A bridge with a TLS side: its records relayed by the loops where they can use its SSL
        objects (see _core.tls_unavailable), else by the pure engine. A resumed bridge is plain."""
        if resume is None and _relays_tls_of(stream1) and _relays_tls_of(stream2):
            return _core_start(stream1, stream2, plan, on_end)
        return _pump.start(stream1, stream2, plan, on_end, resume=resume)

    class CoreBridge(_bridge.Bridge):
        __doc__ = _bridge.Bridge.__doc__
        fd_engine = staticmethod(_core_start)
        tls_engine = staticmethod(_core_tls_start)
        engine_name = "cython"

    Bridge = CoreBridge


connect = _bridge.connect_with(Bridge)
aconnect = _bridge.aconnect_with(Bridge)


def tls_unavailable() -> Optional[str]:
    """Why the loops cannot do TLS (handshakes, records) here; None where they can."""
    why: Optional[str] = core.tls_unavailable() if core is not None else "the compiled core is not installed"
    return why


def tls_relay_text() -> str:
    """Where the compiled backend relays a TLS bridge's records, as the start-up log says it."""
    why = tls_unavailable()
    return "TLS records in the loops" if why is None else f"TLS bridges on the pure engine: {why}"
