"""A tcptotcp relay process for the benchmarks: the library's Forwarder, and optionally a
pure-Python thread spinning in the same process (the "busy interpreter" case).

    python relay.py BACKEND UPSTREAM_PORT [--spin]

Prints the listening port. Reads commands on stdin, one per line:
    spin  -> prints the spinning thread's count per second over the last interval
    cpu   -> prints the process's CPU seconds so far (all threads, nanosecond clock)
    quit  -> exits
"""

import inspect
import os
import sys
import threading
import time

backend, upstream_port, *flags = sys.argv[1:]
if backend == "pure":
    os.environ["TCPTOTCP_NO_EXTENSIONS"] = "1"

import tcptotcp  # noqa: E402

if backend != "pure" and tcptotcp.BACKEND != "cython":
    raise SystemExit("compiled core not available")
if backend == "pure":
    bridge = tcptotcp.pure.Bridge
elif backend == "cython-copy":  # the core's recv/send path, splice off: shows what splice buys
    import functools

    from tcptotcp import _bridge, _core

    class bridge(_bridge.Bridge):
        fd_engine = staticmethod(functools.partial(_core.start, splice=False))
        engine_name = "cython"
else:
    bridge = tcptotcp.Bridge

counter = [0]


def spin():
    n = 0
    while True:  # pure-Python work that wants the GIL all the time
        n += 1
        if not n & 0xFFF:
            counter[0] = n


if "--spin" in flags:
    threading.Thread(target=spin, daemon=True).start()

# A baseline tree before 0.2 names the idle timeout idle_timeout_seconds.
idle = "idle_timeout" if "idle_timeout" in inspect.signature(tcptotcp.Forwarder).parameters else "idle_timeout_seconds"
fwd = tcptotcp.Forwarder(
    "127.0.0.1:0",
    f"127.0.0.1:{upstream_port}",
    bridge_class=bridge,
    half_close=True,
    max_connections=4096,
    rate_check_seconds=60,
    backlog=4096,
    **{idle: 3600},
)
threading.Thread(target=fwd.serve_forever, daemon=True).start()
print(fwd.address[1], flush=True)

last = (time.perf_counter(), counter[0])
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "spin":
        now = (time.perf_counter(), counter[0])
        print((now[1] - last[1]) / (now[0] - last[0]), flush=True)
        last = now
    elif cmd == "cpu":  # /proc's 10 ms ticks are ~4% of one bulk round; this clock is exact
        print(time.process_time(), flush=True)
    elif cmd == "quit":
        break
fwd.close()
