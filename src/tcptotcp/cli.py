"""``tcptotcp LISTEN UPSTREAM``: the port forwarder; ``tcptotcp demo``: see it work.

The CLI only parses arguments, sets up logging and wires signals; the work is
``tcptotcp.Forwarder``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import socket
import sys
import threading
import time
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
from ._options import ACCESS, FORWARD_OPTIONS, OPERATION, OPTIONS, TLS, Option, OptionError, check_forward
from ._service import Service
from ._upgrade import (
    Handed,
    Successor,
    UpgradeFailed,
    handed_over,
    notify,
    remove_pid_file,
    request_upgrade,
    start_successor,
    successor_command,
    write_pid_file,
)
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
  tcptotcp --upgrade --pid-file /run/t2t.pid     hand the running forwarder's ports to a new process
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
    for group in (ACCESS, TLS, OPERATION):
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
    for name in ("backend", "log_level", "log_format", "pid_file", "upgrade_program"):
        _add_option(ops, OPTIONS[name], default=None)
    ops.add_argument(
        "--upgrade",
        action="store_true",
        help="hand the running tcptotcp that --pid-file names over to a new process (as SIGUSR2 "
        "does there), wait for the outcome: exit status 0 once the new one serves",
    )
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


def upgrade(pid_file: Optional[str]) -> int:
    """``--upgrade``: SIGUSR2 to the running process, and its outcome."""
    if pid_file is None:
        print("tcptotcp: error: --upgrade needs --pid-file FILE (the running process's)", file=sys.stderr)
        return 2
    try:
        pid = request_upgrade(pid_file)
    except UpgradeFailed as exc:
        print(f"tcptotcp: upgrade failed: {exc}", file=sys.stderr)
        return 1
    print(f"tcptotcp: upgraded: pid {pid} serves now")
    return 0


def serve(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
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
    elif args.upgrade:
        specs = []  # (the running process has them)
    else:
        specs = _specs_from_args(p, args)
    # The command line wins over the file for process-wide settings.
    backend = args.backend or (config and config.backend) or OPTIONS["backend"].default
    level = args.log_level or (config and config.log_level) or OPTIONS["log_level"].default
    log_format = args.log_format or (config and config.log_format) or OPTIONS["log_format"].default
    metrics_at = args.metrics or (config and config.metrics) or OPTIONS["metrics"].default
    pid_file = args.pid_file or (config and config.pid_file) or None
    upgrade_program = args.upgrade_program or (config and config.upgrade_program) or None
    if args.upgrade:
        return upgrade(pid_file)
    _setup_logging(level, log_format)
    raise_fd_limit()
    try:
        inherited = inherited_listeners()
    except ValueError as exc:
        print(f"tcptotcp: error: socket activation: {exc}", file=sys.stderr)
        return 2
    try:
        handed = handed_over()  # started by a process handing over to us (see _upgrade)
    except ValueError as exc:
        print(f"tcptotcp: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(
            args, specs, config, backend, log_format, metrics_at, pid_file, upgrade_program, argv, inherited, handed
        )
    except BaseException as exc:
        if handed is not None:
            handed.failed(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if handed is not None:
            handed.unused()
            handed.channel.close()


def _serve(
    args: argparse.Namespace,
    specs: List[ForwardSpec],
    config: Optional[Config],
    backend: str,
    log_format: str,
    metrics_at: Optional[str],
    pid_file: Optional[str],
    upgrade_program: Optional[str],
    argv: Sequence[str],
    inherited: Dict[int, str],
    handed: Optional[Handed],
) -> int:
    log = logging.getLogger("tcptotcp")
    metrics: Optional[Metrics] = None
    status_server: Optional[StatusServer] = None
    services: List[Service] = []  # (the service is made below; /ready asks it once it is)

    def ready() -> Tuple[bool, str]:
        return services[0].ready() if services else (False, "starting")

    status_socket = None if handed is None else handed.status_socket
    if metrics_at:
        try:
            host, port = parse_hostport(metrics_at)
            try:
                metrics = Metrics()
            except MetricsUnavailable as exc:
                log.warning("%s; serving only /healthz and /ready on %s", exc, metrics_at)
            if status_socket is not None and port not in (0, status_socket.getsockname()[1]):
                status_socket.close()  # (the predecessor's was elsewhere)
                status_socket = None
            status_server = StatusServer(host, port, metrics, ready, sock=status_socket)
            status_socket = None
            if metrics is not None and handed is not None:
                metrics.carry(handed.counters)  # its counters go on here, not from zero
        except ValueError as exc:
            print(f"tcptotcp: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"tcptotcp: error: cannot serve metrics on {metrics_at}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    wake = threading.Event()
    if status_socket is not None:
        status_socket.close()
    service = Service(
        _backend_bridge(backend),
        inherited=inherited,
        metrics=metrics,
        json_lines=log_format == "json",
        wake=wake,
        handed=None if handed is None else handed.listeners,
    )
    if handed is not None:
        handed.listeners.clear()  # (the service owns them now)
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
    for name in ("SIGHUP", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    try:
        service.start(specs)
    except ValueError as exc:
        print(f"tcptotcp: error: {exc}", file=sys.stderr)
        if handed is not None:
            handed.failed(str(exc))
        return 2
    except OSError as exc:
        print(f"tcptotcp: error: {exc.strerror or exc}", file=sys.stderr)
        if handed is not None:
            handed.failed(str(exc.strerror or exc))
        return 1
    if status_server is not None:
        host, port = status_server.address
        shown = f"[{host}]" if ":" in host else host
        # (/healthz and /ready are served beside /metrics, or alone without prometheus_client.)
        text = (
            f"metrics on http://{shown}:{port}/metrics" if metrics is not None else f"health on http://{shown}:{port}"
        )
        service.announce("metrics", text, address=f"{shown}:{port}")
    if pid_file is not None:
        # Before a successor says it serves: from then on the predecessor may exit at any
        # moment, and `--upgrade` waits for the file to name us (a predecessor that gives up on
        # us after all writes its own pid back).
        _write_pid_file(pid_file)
    if handed is not None:
        handed.serving(list(service.forwards))
        service.announce("took_over", f"took over from pid {handed.from_pid}", from_pid=handed.from_pid)
        threading.Thread(target=_adopt_bridges, args=(service, handed), name="tcptotcp-adopt", daemon=True).start()
    else:
        notify("READY=1")

    upgrading: List[threading.Thread] = []  # the hand-over in flight, if one is
    outcomes: List[Any] = []  # its end: a Successor, or the UpgradeFailed
    successor: Optional[Successor] = None  # once handed over: we only see our bridges out

    def hand_over() -> None:
        try:
            outcomes.append(
                start_successor(
                    successor_command(upgrade_program, argv),
                    service.listening_sockets(),
                    None if status_server is None else status_server.listening_socket,
                    [] if metrics is None else metrics.counters(),
                )
            )
        except UpgradeFailed as exc:
            outcomes.append(exc)
        wake.set()

    try:
        while True:
            wake.wait(0.2 if successor is not None else 1.0)
            wake.clear()
            if service.crashed:
                status = 1
                break
            todo = [asked.pop(0) for _ in range(len(asked))]  # (a handler may append meanwhile)
            if any(signum in stop_signals for signum in todo):
                break
            if outcomes:
                upgrading.pop().join()
                outcome = outcomes.pop()
                if isinstance(outcome, UpgradeFailed):
                    log.error(
                        "upgrade failed, nothing changed: %s", outcome, extra=_event("upgrade_failed", why=str(outcome))
                    )
                    if pid_file is not None:
                        _write_pid_file(pid_file)  # (the stopped successor may have written its own)
                else:
                    successor = outcome
                    _hand_over(service, successor, args.drain)
                    if status_server is not None:
                        status_server.close()  # (the successor serves the port)
                    notify(f"MAINPID={successor.pid}")
            for signum in todo:
                if signum == getattr(signal, "SIGUSR1", None):
                    service.list_open()
                elif signum == getattr(signal, "SIGHUP", None):
                    if successor is not None:
                        log.warning("SIGHUP: handed over to pid %d: reload that one", successor.pid)
                    elif upgrading:
                        asked.append(signum)  # after the upgrade's outcome
                    else:
                        _reload(service, args.config, log)
                elif signum == getattr(signal, "SIGUSR2", None):
                    if successor is not None:
                        log.warning("SIGUSR2: handed over to pid %d already", successor.pid)
                    elif upgrading:
                        log.warning("SIGUSR2: an upgrade is under way already")
                    else:
                        log.info("upgrade: starting %s", " ".join(successor_command(upgrade_program, argv)))
                        upgrading.append(threading.Thread(target=hand_over, name="tcptotcp-upgrade", daemon=True))
                        upgrading[0].start()
            if successor is not None and service.active() == 0:
                break
    finally:
        log.info("stopping%s", f", draining up to {args.drain:g} s" if args.drain > 0 else "")
        service.stop(drain_seconds=args.drain)
        if status_server is not None:
            status_server.close()
        if pid_file is not None and successor is None:  # (after a hand-over it is the successor's)
            remove_pid_file(pid_file)
    return status


def _write_pid_file(path: str) -> None:
    try:
        write_pid_file(path)
    except OSError as exc:
        logging.getLogger("tcptotcp").error("cannot write the pid file %s: %s", path, exc.strerror or exc)


#: A bridge's time to quiesce (stop reading, deliver what it holds) before it stays here: the
#: most a client would wait, on top of the hand-over itself; more with a longer --drain.
DETACH_SECONDS = 0.1
HAND_OVER_SECONDS = 10.0  # no bridge starts detaching later than this (or --drain) after the first


def _hand_over(service: Service, successor: Successor, drain: float) -> None:
    """Stop accepting, hand the open bridges of every forward the successor serves over to it
    one at a time, and say what stays here."""
    started = time.monotonic()
    handed = service.handed_over()
    timeout = max(DETACH_SECONDS, drain)
    deadline = started + max(HAND_OVER_SECONDS, drain)
    moved = staying = 0
    try:
        for key, forwarder in handed.items():
            if key not in successor.keys:
                staying += forwarder.stats.active
                continue
            sent, kept = forwarder.hand_over_bridges(functools.partial(successor.send_bridge, key), timeout, deadline)
            moved += sent
            staying += kept
    finally:
        successor.finish()
        seconds = time.monotonic() - started
        service.announce(
            "handed_over",
            f"handed over to pid {successor.pid}: {len(handed)} listeners, {moved} bridges in {seconds:.3f} s; "
            f"{staying} bridges stay here until they end",
            pid=successor.pid,
            listeners=len(handed),
            bridges_handed=moved,
            bridges_staying=staying,
            seconds=round(seconds, 6),
        )


def _adopt_bridges(service: Service, handed: Handed) -> None:
    """The successor's side: take the predecessor's bridges as they come."""
    started = time.monotonic()
    adopted, failed, longest_pause = handed.receive_bridges(service.adopt, service.recheck_accepting)
    if adopted or failed:
        service.announce(
            "adopted",
            f"adopted {adopted} bridges from pid {handed.from_pid} in {time.monotonic() - started:.3f} s, "
            f"the longest paused {longest_pause * 1000:.1f} ms" + (f" ({failed} failed)" if failed else ""),
            from_pid=handed.from_pid,
            bridges=adopted,
            failed=failed,
            longest_pause=round(longest_pause, 6),
        )


def _event(name: str, **fields: Any) -> Dict[str, Any]:
    return {"event": name, "fields": fields}


def _reload(service: Service, path: Optional[str], log: logging.Logger) -> None:
    if path is None:
        # The command line's forward: only its TLS files can change.
        try:
            count = service.reload_certificates()
        except (OSError, ValueError) as exc:
            log.error(
                "reload failed, the old certificates stay: %s", exc, extra={"event": "reload_failed", "fields": {}}
            )
            return
        if count:
            service.announce("reload", "reloaded: TLS certificates read again", certificates=count)
        else:
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
    return serve(parser, parser.parse_args(args_list), args_list)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
