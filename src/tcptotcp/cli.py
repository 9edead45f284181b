"""``tcptotcp LISTEN UPSTREAM``: the port forwarder; ``tcptotcp demo``: see it work.

The CLI only parses arguments, sets up logging and wires signals; the work is
``tcptotcp.Forwarder``.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import sys
import threading
from typing import List, Optional, Sequence

from . import pure
from ._access import parse_network
from ._activation import inherited_listeners, is_inherited_address
from ._address import Address
from ._backend import BACKEND
from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge
from ._config import Config, ConfigError, ForwardSpec, load_config
from ._jsonlog import JsonFormatter
from ._metrics import Metrics, MetricsUnavailable, parse_hostport
from ._service import Service
from ._version import __version__
from .forwarder import raise_fd_limit

EXAMPLES = """\
examples:
  tcptotcp demo                                  measure a bridge on loopback, no setup
  tcptotcp 127.0.0.1:8080 example.internal:80    forward local port 8080 to a web server
  tcptotcp '[::1]:5432' unix:/run/postgresql/.s.PGSQL.5432
  tcptotcp 127.0.0.1:2222 10.0.0.5:22 --idle-timeout 600 --activity any --half-close
  tcptotcp 0.0.0.0:8080 10.0.0.5:80 10.0.0.6:80 --balance roundrobin --allow 10.0.0.0/8
  tcptotcp 0.0.0.0:443 10.0.0.5:443 --send-proxy v2 --keepalive 60 --user-timeout 30
  tcptotcp systemd:web 127.0.0.1:80 --metrics 127.0.0.1:9464 --log-format json
  tcptotcp --config /etc/tcptotcp.toml           several forwards; SIGHUP reloads the file
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


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def forward_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="tcptotcp",
        usage="tcptotcp LISTEN UPSTREAM [UPSTREAM ...] [options]\n       tcptotcp --config FILE [options]",
        description="Forward every client of LISTEN to an UPSTREAM through a tcptotcp bridge.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "listen",
        metavar="LISTEN",
        nargs="?",
        help="where to accept clients: host:port, [v6addr]:port, unix:/path, or an inherited "
        "listening socket: fd:N, systemd:NAME (socket activation)",
    )
    p.add_argument(
        "upstreams",
        metavar="UPSTREAM",
        nargs="*",
        help="where to connect each client: host:port, [v6addr]:port or unix:/path; several "
        "for failover or --balance roundrobin",
    )
    p.add_argument("--config", metavar="FILE", help="read the forwards from a TOML file (SIGHUP reloads it)")
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
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up on an upstream after this long (default 10)",
    )
    access = p.add_argument_group("who gets in, where they go")
    access.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="NET",
        help="only clients in this network (CIDR or one address; repeatable)",
    )
    access.add_argument(
        "--deny", action="append", default=[], metavar="NET", help="refuse clients in this network (repeatable)"
    )
    access.add_argument(
        "--balance",
        choices=("first", "roundrobin"),
        default="first",
        help="first: the first upstream that accepts (failover, default); roundrobin: each client starts at the next",
    )
    access.add_argument(
        "--upstream-backoff",
        type=_nonnegative_float,
        default=10.0,
        metavar="SECONDS",
        help="skip an upstream this long after its connect failed, unless all are (default 10)",
    )
    access.add_argument(
        "--send-proxy",
        choices=("v1", "v2"),
        help="send each upstream a PROXY protocol header with the client's address first",
    )
    access.add_argument(
        "--accept-proxy", action="store_true", help="every client must begin with a PROXY protocol header (v1 or v2)"
    )
    access.add_argument(
        "--proxy-timeout",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="with --accept-proxy: the header must be complete within this long (default 5)",
    )
    ops = p.add_argument_group("operation")
    ops.add_argument(
        "--keepalive",
        type=_positive_int,
        metavar="IDLE",
        help="TCP keepalive on both sockets of every bridge after IDLE seconds without traffic",
    )
    ops.add_argument("--keepalive-interval", type=_positive_int, metavar="SECONDS", help="between keepalive probes")
    ops.add_argument("--keepalive-count", type=_positive_int, metavar="N", help="unanswered probes before giving up")
    ops.add_argument(
        "--user-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="TCP_USER_TIMEOUT: end a bridge whose peer leaves data unacknowledged this long",
    )
    ops.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: several processes share the port, the kernel spreads"
    )
    ops.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    ops.add_argument(
        "--drain",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM let open bridges finish for this long (default 0)",
    )
    ops.add_argument(
        "--backend",
        choices=("auto", "cython", "pure"),
        default=None,
        help="engine: the compiled core where available (auto), or force one",
    )
    ops.add_argument(
        "--log-level",
        default=None,
        choices=("debug", "info", "warning", "error"),
        help="default info: a line per connection opened and closed",
    )
    ops.add_argument(
        "--log-format", default=None, choices=("text", "json"), help="json: one JSON object per line (default text)"
    )
    p.add_argument("--version", action="version", version=f"tcptotcp {__version__} ({BACKEND})")
    return p


def _specs_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> List[ForwardSpec]:
    """The one forward the command line describes, checked as a config file's would be."""
    if args.listen is None or not args.upstreams:
        p.error("LISTEN and at least one UPSTREAM are needed (or --config FILE)")
    try:
        listen_address = None if is_inherited_address(args.listen) else Address.parse(args.listen, passive=True)
        upstreams = tuple(Address.parse(text) for text in args.upstreams)
    except ValueError as exc:
        p.error(str(exc))
    for net in args.allow + args.deny:
        try:
            parse_network(net)
        except ValueError as exc:
            p.error(str(exc))
    if (args.allow or args.deny) and listen_address is not None and listen_address.family == socket.AF_UNIX:
        p.error("--allow/--deny need an IP listener: clients of a unix: listener have no address")
    if args.max_connections < 1:
        p.error("--max-connections must be at least 1")
    spec = ForwardSpec(
        listen=args.listen,
        upstreams=tuple(args.upstreams),
        rate_check=args.rate_check,
        idle_timeout=args.idle_timeout,
        activity=args.activity,
        half_close=args.half_close,
        max_connections=args.max_connections,
        connect_timeout=args.connect_timeout,
        allow=tuple(args.allow),
        deny=tuple(args.deny),
        balance=args.balance,
        upstream_backoff=args.upstream_backoff,
        send_proxy=args.send_proxy,
        accept_proxy=args.accept_proxy,
        proxy_timeout=args.proxy_timeout,
        backlog=max(1, args.backlog),
        keepalive=args.keepalive,
        keepalive_interval=args.keepalive_interval,
        keepalive_count=args.keepalive_count,
        user_timeout=args.user_timeout,
        reuse_port=args.reuse_port,
        listen_address=listen_address,
        upstream_addresses=upstreams,
    )
    return [spec]


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def serve(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config: Optional[Config] = None
    if args.config is not None:
        if args.listen is not None:
            p.error("give LISTEN UPSTREAM or --config FILE, not both")
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"tcptotcp: error: {exc}", file=sys.stderr)
            return 2
        specs: List[ForwardSpec] = list(config.forwards)
    else:
        specs = _specs_from_args(p, args)
    # The command line wins over the file for process-wide settings.
    backend = args.backend or (config and config.backend) or "auto"
    level = args.log_level or (config and config.log_level) or "info"
    log_format = args.log_format or (config and config.log_format) or "text"
    metrics_at = args.metrics or (config and config.metrics)
    _setup_logging(level, log_format)
    log = logging.getLogger("tcptotcp")
    raise_fd_limit()
    try:
        inherited = inherited_listeners()
    except ValueError as exc:
        print(f"tcptotcp: error: socket activation: {exc}", file=sys.stderr)
        return 2
    metrics = None
    if metrics_at:
        try:
            host, port = parse_hostport(metrics_at)
            metrics = Metrics()
            metrics.serve(host, port)
        except (MetricsUnavailable, ValueError) as exc:
            print(f"tcptotcp: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"tcptotcp: error: cannot serve metrics on {metrics_at}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    wake = threading.Event()
    service = Service(
        _backend_bridge(backend), inherited=inherited, metrics=metrics, json_lines=log_format == "json", wake=wake
    )
    try:
        service.start(specs)
    except ValueError as exc:
        print(f"tcptotcp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tcptotcp: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if metrics is not None and metrics.address is not None:
        host, port = metrics.address
        shown = f"[{host}]" if ":" in host else host
        service.announce("metrics", f"metrics on http://{shown}:{port}/metrics", address=f"{shown}:{port}")

    # Signal handlers only note what was asked; this thread does it.
    asked: List[int] = []
    status = 0

    def on_signal(signum: int, frame: object) -> None:
        asked.append(signum)
        wake.set()

    stop_signals = {int(signal.SIGINT), int(signal.SIGTERM)}
    for stop_signal in stop_signals:
        signal.signal(stop_signal, on_signal)
    for name in ("SIGHUP", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    try:
        while True:
            wake.wait(1.0)
            wake.clear()
            if service.crashed:
                status = 1
                break
            todo, asked[:] = list(asked), []
            if any(signum in stop_signals for signum in todo):
                break
            for signum in todo:
                if signum == getattr(signal, "SIGUSR1", None):
                    service.list_open()
                elif signum == getattr(signal, "SIGHUP", None):
                    _reload(service, args.config, log)
    finally:
        log.info("stopping%s", f", draining up to {args.drain:g} s" if args.drain > 0 else "")
        service.stop(drain_seconds=args.drain)
        if metrics is not None:
            metrics.close()
    return status


def _reload(service: Service, path: Optional[str], log: logging.Logger) -> None:
    if path is None:
        log.warning("SIGHUP: nothing to reload (no --config)")
        return
    try:
        config = load_config(path)
        service.reload(config.forwards)
    except (ConfigError, OSError, ValueError) as exc:
        log.error("reload failed, nothing changed: %s", exc, extra={"event": "reload_failed", "fields": {}})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        from .demo import demo  # only the demo needs it

        return demo(args_list[1:])
    parser = forward_parser()
    return serve(parser, parser.parse_args(args_list))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
