"""``tcptotcp LISTEN UPSTREAM``: the port forwarder; ``tcptotcp demo``: see it work.

The CLI only parses arguments, sets up logging and wires signals; the work is
``tcptotcp.Forwarder``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Optional, Sequence

from . import pure
from ._address import Address
from ._backend import BACKEND
from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge
from ._version import __version__
from .forwarder import Forwarder, raise_fd_limit

EXAMPLES = """\
examples:
  tcptotcp demo                                  measure a bridge on loopback, no setup
  tcptotcp 127.0.0.1:8080 example.internal:80    forward local port 8080 to a web server
  tcptotcp '[::1]:5432' unix:/run/postgresql/.s.PGSQL.5432
  tcptotcp 127.0.0.1:2222 10.0.0.5:22 --idle-timeout 600 --activity any --half-close
"""


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[name-defined]  # noqa: F821
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _backend_bridge(name: str) -> type[Bridge]:
    if name == "pure":
        return pure.Bridge
    if name == "cython" and BACKEND != "cython":
        raise SystemExit("tcptotcp: error: the compiled core is not available here (try --backend pure)")
    return DefaultBridge


def _address(text: str, passive: bool) -> Address:
    try:
        return Address.parse(text, passive=passive)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def forward_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="tcptotcp",
        description="Forward every client of LISTEN to UPSTREAM through a tcptotcp bridge.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "listen",
        metavar="LISTEN",
        type=lambda t: _address(t, True),
        help="where to accept clients: host:port, [v6addr]:port or unix:/path",
    )
    p.add_argument(
        "upstream",
        metavar="UPSTREAM",
        type=lambda t: _address(t, False),
        help="where to connect each client: host:port, [v6addr]:port or unix:/path",
    )
    p.add_argument(
        "--rate-check",
        type=_nonnegative,
        default=5,
        metavar="N",
        help="seconds between idle checks (default 5; 0 means 1)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_nonnegative,
        default=7200,
        metavar="N",
        help="keep-alive seconds; a bridge ends after (N // rate + 1) * rate idle "
        "seconds (default 7200; below 2 means 2)",
    )
    p.add_argument(
        "--activity",
        choices=("both", "any"),
        default="both",
        help="traffic that keeps a bridge alive: both directions (default) or any",
    )
    p.add_argument("--half-close", action="store_true", help="forward a FIN and keep the other direction open")
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        metavar="N",
        help="bridges at once; further clients wait in the backlog (default 1024)",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=4096,
        metavar="N",
        help="listen backlog: clients the kernel queues before they are accepted (default 4096, "
        "capped by net.core.somaxconn)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on the upstream after this long (default 10)",
    )
    p.add_argument(
        "--drain",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM let open bridges finish for this long (default 0)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "cython", "pure"),
        default="auto",
        help="engine: the compiled core where available (auto), or force one",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="default info: a line per connection opened and closed",
    )
    p.add_argument("--version", action="version", version=f"tcptotcp {__version__} ({BACKEND})")
    return p


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("tcptotcp")
    if args.max_connections < 1:
        print("tcptotcp: error: --max-connections must be at least 1", file=sys.stderr)
        return 2
    raise_fd_limit()
    try:
        forwarder = Forwarder(
            args.listen,
            args.upstream,
            rate_check_seconds=args.rate_check,
            idle_timeout_seconds=args.idle_timeout,
            activity=args.activity,
            half_close=args.half_close,
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
            bridge_class=_backend_bridge(args.backend),
            backlog=max(1, args.backlog),
        )
    except OSError as exc:
        print(f"tcptotcp: error: cannot listen on {args.listen.text}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: object) -> None:
        forwarder.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    shortfall = forwarder.fd_shortfall()
    if shortfall:
        needed, available = shortfall
        log.warning(
            "--max-connections %d may need up to %d file descriptors, but this process can open "
            "only %d more (ulimit -n): clients beyond that are refused until others end",
            args.max_connections,
            needed,
            available,
        )
    # Start and summary lines go out whatever the log level: scripts wait for the first.
    backend = getattr(forwarder.bridge_class, "engine_name", "custom")
    print(
        f"tcptotcp: listening on {forwarder.address_text}, forwarding to {args.upstream.text} (backend {backend})",
        file=sys.stderr,
        flush=True,
    )
    try:
        forwarder.serve_forever()
    finally:
        log.info("stopping%s", f", draining up to {args.drain:g} s" if args.drain > 0 else "")
        forwarder.close(drain_seconds=args.drain)
        print(f"tcptotcp: {forwarder.summary()}", file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        from .demo import demo  # only the demo needs it

        return demo(args_list[1:])
    return serve(forward_parser().parse_args(args_list))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
