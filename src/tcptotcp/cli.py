"""``tcptotcp LISTEN UPSTREAM``: the port forwarder; ``tcptotcp demo``: see it work.

The CLI only parses arguments, sets up logging and wires signals; the work is
``tcptotcp.Forwarder``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import pure
from ._activation import inherited_listeners, is_inherited_address
from ._address import Address
from ._backend import BACKEND
from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge
from ._config import Config, ConfigError, ForwardSpec, load_config
from ._jsonlog import JsonFormatter
from ._metrics import Metrics, MetricsUnavailable, StatusServer, parse_hostport
from ._options import ACCESS, FORWARD_OPTIONS, OPERATION, OPTIONS, Option, OptionError, check_forward
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
  tcptotcp 0.0.0.0:5432 db.internal:5432 --balance roundrobin --resolve-interval 10
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


def _argument_type(option: Option) -> Any:
    """argparse's `type` for `option`: the table's parse and check, so that the command line
    refuses what a config file refuses, in the same words."""

    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    parse.__name__ = option.name  # (argparse names the type in some messages)
    return parse


def _add_option(group: Any, option: Option, *, default: Any) -> None:
    """`option`'s flag(s), as the table declares them."""
    if option.type is bool:
        group.add_argument(*option.flags, dest=option.name, action="store_true", help=option.help)
        return
    kwargs: Dict[str, Any] = dict(dest=option.name, type=_argument_type(option), default=default, help=option.help)
    if option.choices:
        kwargs["choices"] = option.choices
    if option.metavar is not None:
        kwargs["metavar"] = option.metavar
    if option.repeatable:
        kwargs["action"] = "append"
    group.add_argument(*option.flags, **kwargs)


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
    # The forward options, from the one table (see _options), in its order.
    groups: Dict[Optional[str], Any] = {None: p}
    for group in (ACCESS, OPERATION):
        groups[group] = p.add_argument_group(group)
    for option in FORWARD_OPTIONS:
        _add_option(groups[option.group], option, default=[] if option.repeatable else option.default)
    # Process-wide settings: None when not given, so that a config file's setting applies.
    ops = groups[OPERATION]
    _add_option(ops, OPTIONS["metrics"], default=None)
    ops.add_argument(
        "--drain",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM let open bridges finish for this long (default 0)",
    )
    for name in ("backend", "log_level", "log_format"):
        _add_option(ops, OPTIONS[name], default=None)
    p.add_argument("--version", action="version", version=f"tcptotcp {__version__} ({BACKEND})")
    return p


def _specs_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> List[ForwardSpec]:
    """The one forward the command line describes, checked as a config file's would be."""
    if args.listen is None or not args.upstreams:
        p.error("LISTEN and at least one UPSTREAM are needed (or --config FILE)")
    try:
        listen_address = None if is_inherited_address(args.listen) else Address.parse(args.listen, passive=True)
        # A name that does not resolve yet is followed unless told otherwise (see _resolve).
        strict = args.resolve_strict or not args.resolve_interval
        upstreams = tuple(Address.parse_upstream(text, strict=strict) for text in args.upstreams)
    except ValueError as exc:
        p.error(str(exc))
    if (args.allow or args.deny) and listen_address is not None and listen_address.family == socket.AF_UNIX:
        p.error("--allow/--deny need an IP listener: clients of a unix: listener have no address")
    try:  # (argparse checked each value already: this makes lists tuples)
        settings = check_forward({option.name: getattr(args, option.name) for option in FORWARD_OPTIONS})
    except OptionError as exc:  # pragma: no cover - argparse's types refuse these first
        p.error(str(exc))
    spec = ForwardSpec(
        listen=args.listen,
        upstreams=tuple(args.upstreams),
        listen_address=listen_address,
        upstream_addresses=upstreams,
        **settings,
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
    backend = args.backend or (config and config.backend) or OPTIONS["backend"].default
    level = args.log_level or (config and config.log_level) or OPTIONS["log_level"].default
    log_format = args.log_format or (config and config.log_format) or OPTIONS["log_format"].default
    metrics_at = args.metrics or (config and config.metrics) or OPTIONS["metrics"].default
    _setup_logging(level, log_format)
    log = logging.getLogger("tcptotcp")
    raise_fd_limit()
    try:
        inherited = inherited_listeners()
    except ValueError as exc:
        print(f"tcptotcp: error: socket activation: {exc}", file=sys.stderr)
        return 2
    metrics: Optional[Metrics] = None
    status_server: Optional[StatusServer] = None
    services: List[Service] = []  # (the service is made below; /ready asks it once it is)

    def ready() -> Tuple[bool, str]:
        return services[0].ready() if services else (False, "starting")

    if metrics_at:
        try:
            host, port = parse_hostport(metrics_at)
            try:
                metrics = Metrics()
            except MetricsUnavailable as exc:
                log.warning("%s; serving only /healthz and /ready on %s", exc, metrics_at)
            status_server = StatusServer(host, port, metrics, ready)
        except ValueError as exc:
            print(f"tcptotcp: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"tcptotcp: error: cannot serve metrics on {metrics_at}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    wake = threading.Event()
    service = Service(
        _backend_bridge(backend), inherited=inherited, metrics=metrics, json_lines=log_format == "json", wake=wake
    )
    services.append(service)
    # Signal handlers only note what was asked; this thread does it. Installed before the forwards
    # start: a SIGHUP sent once "listening on" was printed must not find the default action
    # (which ends the process).
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
        service.start(specs)
    except ValueError as exc:
        print(f"tcptotcp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tcptotcp: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if status_server is not None:
        host, port = status_server.address
        shown = f"[{host}]" if ":" in host else host
        # (/healthz and /ready are served beside /metrics, or alone without prometheus_client.)
        text = (
            f"metrics on http://{shown}:{port}/metrics" if metrics is not None else f"health on http://{shown}:{port}"
        )
        service.announce("metrics", text, address=f"{shown}:{port}")

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
        if status_server is not None:
            status_server.close()
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
