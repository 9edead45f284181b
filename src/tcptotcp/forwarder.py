"""A port forwarder: accept local clients and bridge each to an upstream.

The original crate's headline example, as a library class the CLI wires to signals:
``Forwarder(listen, upstream).serve_forever()`` in one thread, ``close()`` from another.

One thread does all of the forwarder's own work: a selector loop that accepts clients, checks
them (``allow``/``deny``, a PROXY protocol header with ``accept_proxy``), connects to an upstream
without blocking (failing over between several, ``connect_timeout`` as a timer), sends a PROXY
header with ``send_proxy``, and hands each connected pair to a ``Bridge`` started in the
background. No thread is started per client; on the compiled backend the bridges run on the
engine's loop threads, and this thread also finishes them (logs, counts) as they end.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

from . import _proxy
from ._access import AccessList
from ._address import Address, format_sockaddr
from ._backend import Bridge as DefaultBridge
from ._backend import core, env_flag
from ._bridge import Bridge, BridgeResult, check_activity, plan_of

log = logging.getLogger("tcptotcp")

# Accept errors that mean "out of a resource right now": back off instead of spinning.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_SECONDS = 0.1
_NOT_ALLOWED = "not allowed by --allow/--deny"
_FAST_BATCH = 0.05  # see Forwarder._fast_pause
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # a socket born non-blocking: no ioctl (not Windows)
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS: TCP_KEEPALIVE


def _no_delay(sock: socket.socket) -> None:
    """Forward each read at once: the sending peer already made its own Nagle choice, and a
    relay that delays a message's tail behind a delayed ACK adds 40 ms to request/response."""
    if sock.family in _IP_FAMILIES:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _event(name: str, **fields: Any) -> Dict[str, Any]:
    """`extra` for a log record: the JSON log format writes the event and its fields."""
    return {"event": name, "fields": fields}


@dataclass
class ForwarderStats:
    accepted: int = 0
    refused: int = 0
    upstream_failures: int = 0  # failed connect attempts (a client may fail over several)
    bytes_up: int = 0
    bytes_down: int = 0
    active: int = 0  # clients accepted and not yet gone: checking, connecting or bridged


@dataclass(frozen=True)
class ForwardOptions:
    """What decides how a new client is served; ``Forwarder.reconfigure`` swaps it whole."""

    upstreams: Tuple[Address, ...]
    bridge_args: Dict[str, Any] = field(hash=False)
    max_connections: int = 1024
    connect_timeout: float = 10.0
    access: AccessList = field(default_factory=AccessList)
    balance: str = "first"
    upstream_backoff: float = 10.0
    send_proxy: Optional[str] = None
    accept_proxy: bool = False
    proxy_timeout: float = 5.0
    keepalive: Optional[int] = None
    keepalive_interval: Optional[int] = None
    keepalive_count: Optional[int] = None
    user_timeout: Optional[float] = None


# ForwardOptions fields taken as the caller gave them (checked in Forwarder._options).
_AS_GIVEN = (
    "max_connections",
    "connect_timeout",
    "balance",
    "upstream_backoff",
    "send_proxy",
    "accept_proxy",
    "proxy_timeout",
    "keepalive",
    "keepalive_interval",
    "keepalive_count",
    "user_timeout",
)


class _Peer:
    """A client's address, formatted only if a log line is written."""

    __slots__ = ("family", "sockaddr")

    def __init__(self, family: int, sockaddr: Any) -> None:
        self.family = family
        self.sockaddr = sockaddr

    def __str__(self) -> str:
        return format_sockaddr(self.family, self.sockaddr)


class _Client:
    """A client between accept and its bridge: reading its PROXY header, or connecting."""

    __slots__ = (
        "conn_id",
        "fd",
        "peer",
        "options",
        "destination",
        "header",
        "tries",
        "upstream",
        "upstream_sock",
        "to_send",
        "deadline",
    )

    def __init__(self, conn_id: int, fd: int, peer: _Peer, options: ForwardOptions) -> None:
        self.conn_id = conn_id
        self.fd = fd  # the accepted client, as a bare fd until its bridge adopts it
        self.peer = peer  # its address: the PROXY header's source once one was read
        self.options = options  # as they were when it arrived
        self.destination: Optional[Any] = None  # the address it connected to (PROXY header's)
        self.header = b""  # PROXY header bytes read so far
        self.tries: List[Address] = []  # upstreams still to try
        self.upstream: Optional[Address] = None
        self.upstream_sock: Optional[socket.socket] = None
        self.to_send = b""  # our PROXY header, not yet all sent upstream
        self.deadline = 0.0


class _Open:
    """A running bridge (a ``Bridge``, or a relay the loops accepted), as SIGUSR1 lists it."""

    __slots__ = ("conn_id", "peer", "upstream", "started", "bridge", "counts")

    def __init__(
        self, conn_id: int, peer: _Peer, upstream: Address, bridge: Any, counts: Callable[[], Tuple[int, int]]
    ) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.upstream = upstream
        self.started = time.monotonic()
        self.bridge = bridge  # what stop() ends it with
        self.counts = counts


def _NO_COUNTS() -> Tuple[int, int]:  # an _Open reported only once it had ended
    return (0, 0)


class _FastPath:
    """A listener whose clients the engine's loops accept, connect and relay (``core.listen``):
    no Python per connection but the log and the counts, taken from its events in batches."""

    __slots__ = ("listener", "upstream", "options")

    def __init__(self, listener: Any, upstream: Address, options: ForwardOptions) -> None:
        self.listener = listener
        self.upstream = upstream
        self.options = options

    def fileno(self) -> int:
        fd: int = self.listener.fileno()
        return fd


def _fresh_socket_option(family: int, option: int) -> int:
    """A TCP option's value on a new socket: the system's default (its sysctl), to go back to."""
    with socket.socket(family, socket.SOCK_STREAM) as fresh:
        return fresh.getsockopt(socket.IPPROTO_TCP, option)


def raise_fd_limit() -> Tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as haproxy does; (soft, hard) after."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def _as_address(value: Union[str, Address], passive: bool = False) -> Address:
    return value if isinstance(value, Address) else Address.parse(value, passive=passive)


def _upstream_list(upstream: Union[str, Address, Sequence[Union[str, Address]]]) -> Tuple[Address, ...]:
    items = [upstream] if isinstance(upstream, (str, Address)) else list(upstream)
    if not items:
        raise ValueError("at least one upstream is needed")
    return tuple(_as_address(item) for item in items)


class Forwarder:
    """Accepts clients on `listen` and bridges each to one of `upstream` with one ``Bridge``.

    `upstream` is an address or a list of them: ``balance="first"`` tries them in order (failover),
    ``"roundrobin"`` starts each client at the next. One that failed is skipped for
    `upstream_backoff` seconds unless all are. `allow`/`deny` are networks (CIDR or one address);
    `send_proxy` ("v1"/"v2") sends the upstream a PROXY protocol header first; `accept_proxy`
    requires one from every client, within `proxy_timeout` seconds. `keepalive` (idle seconds,
    with `keepalive_interval` and `keepalive_count`) and `user_timeout` (seconds) find peers
    that vanished. `listen_socket` serves an inherited listening socket instead of binding
    `listen`. `metrics` is a ``_metrics.Metrics`` to count into.
    """

    #: fds one client costs: its socket and the upstream's, adopted by the bridge; the pure
    #: engine adds its wake pair.
    FDS_PER_CLIENT = {"cython": 2, "pure": 4}

    def __init__(
        self,
        listen: Union[str, Address],
        upstream: Union[str, Address, Sequence[Union[str, Address]]],
        *,
        rate_check_seconds: int = 5,
        idle_timeout_seconds: int = 7200,
        activity: str = "both",
        half_close: bool = False,
        max_connections: int = 1024,
        connect_timeout: float = 10.0,
        bridge_class: Optional[Type[Bridge]] = None,
        backlog: int = 4096,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        balance: str = "first",
        upstream_backoff: float = 10.0,
        send_proxy: Optional[str] = None,
        accept_proxy: bool = False,
        proxy_timeout: float = 5.0,
        keepalive: Optional[int] = None,
        keepalive_interval: Optional[int] = None,
        keepalive_count: Optional[int] = None,
        user_timeout: Optional[float] = None,
        reuse_port: bool = False,
        listen_socket: Optional[socket.socket] = None,
        metrics: Optional[Any] = None,
    ) -> None:
        self._inherited = listen_socket is not None
        if listen_socket is not None:
            family, sockaddr = listen_socket.family, listen_socket.getsockname()
            text = listen if isinstance(listen, str) else listen.text
            self.listen = Address(family, sockaddr, text)
        else:
            self.listen = _as_address(listen, passive=True)
        self._settings: Dict[str, Any] = dict(
            rate_check_seconds=rate_check_seconds,
            idle_timeout_seconds=idle_timeout_seconds,
            activity=activity,
            half_close=half_close,
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            allow=allow,
            deny=deny,
            balance=balance,
            upstream_backoff=upstream_backoff,
            send_proxy=send_proxy,
            accept_proxy=accept_proxy,
            proxy_timeout=proxy_timeout,
            keepalive=keepalive,
            keepalive_interval=keepalive_interval,
            keepalive_count=keepalive_count,
            user_timeout=user_timeout,
        )
        self.options = self._options(upstream, **self._settings)
        self.bridge_class: Type[Bridge] = DefaultBridge if bridge_class is None else bridge_class
        self.stats = ForwarderStats()

        self._lock = threading.Lock()
        self._bridges: Dict[object, _Open] = {}  # by what stop() ends it with
        self._fast: Optional[_FastPath] = None  # the loops accept for us (see _fast_path_for)
        self._fast_all: List[_FastPath] = []  # and those stopped with events still to come
        self._fast_open: Dict[int, _Open] = {}  # their open bridges, by id
        self._fast_paused: Dict[_FastPath, float] = {}  # not watched until then (see _fast_pause)
        self._fast_pump: Optional[threading.Thread] = None  # after stop_accepting(): see _pump_until_done
        self._fast_pump_stop = threading.Event()  # close() takes over from it
        self._pending: Dict[int, Tuple[_Client, str]] = {}  # fd watched -> (client, what for)
        self._timers: List[Tuple[float, int, _Client]] = []  # (deadline, conn_id, client)
        self._backoff: Dict[str, float] = {}  # upstream text -> monotonic time it may be tried again
        self._next_upstream = 0  # round robin's turn
        self._closing = threading.Event()
        self._draining = False  # close(drain_seconds > 0) in progress: let bridges run
        self._serving = threading.Lock()  # held while serve_forever() runs
        self._ids = itertools.count(1)
        self._accept_paused_until = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if listen_socket is not None:
            self._listener = listen_socket
            self._listener.setblocking(False)
        else:
            self._listener = self._bind(backlog, reuse_port)
        try:
            self._apply_listener_options(self.options)
        except BaseException:
            self._close_sockets()
            raise
        self.address = self._listener.getsockname()
        self._metrics = None if metrics is None else metrics.forward(self.address_text)

    # -- options ------------------------------------------------------------------------

    def _options(self, upstream: Union[str, Address, Sequence[Union[str, Address]]], **kw: Any) -> ForwardOptions:
        if kw["max_connections"] < 1:
            raise ValueError("max_connections must be at least 1")
        check_activity(kw["activity"])  # fail now, not once per client
        if kw["balance"] not in ("first", "roundrobin"):
            raise ValueError(f"balance must be 'first' or 'roundrobin', not {kw['balance']!r}")
        if kw["send_proxy"] not in (None, "v1", "v2"):
            raise ValueError(f"send_proxy must be 'v1' or 'v2', not {kw['send_proxy']!r}")
        if kw["connect_timeout"] <= 0 or kw["proxy_timeout"] <= 0 or kw["upstream_backoff"] < 0:
            raise ValueError("connect_timeout and proxy_timeout must be positive, upstream_backoff not negative")
        if kw["user_timeout"] is not None and not hasattr(socket, "TCP_USER_TIMEOUT"):
            raise ValueError("user_timeout needs TCP_USER_TIMEOUT, which this platform lacks")
        access = AccessList(kw["allow"], kw["deny"])
        if access and self.listen.family not in _IP_FAMILIES:
            raise ValueError(f"allow/deny need an IP listener: clients of {self.listen.text} have no address")
        return ForwardOptions(
            upstreams=_upstream_list(upstream),
            bridge_args=dict(
                rate_check_seconds=kw["rate_check_seconds"],
                keep_alive_delay_time_seconds=kw["idle_timeout_seconds"],
                activity=kw["activity"],
                half_close=kw["half_close"],
            ),
            access=access,
            **{name: kw[name] for name in _AS_GIVEN},
        )

    def reconfigure(self, upstream: Union[str, Address, Sequence[Union[str, Address]]], **options: Any) -> None:
        """New options (the constructor's, less the listener's own) for clients from now on;
        clients already connecting or bridged keep theirs."""
        unknown = set(options) - set(self._settings)
        if unknown:
            raise TypeError(f"reconfigure() got unexpected options: {', '.join(sorted(unknown))}")
        settings = {**self._settings, **options}
        new = self._options(upstream, **settings)
        self._apply_listener_options(new)
        self._settings = settings
        self.options = new  # one assignment: the serve thread sees the old or the new, whole
        self._wake()

    # -- listening ----------------------------------------------------------------------

    def _bind(self, backlog: int, reuse_port: bool) -> socket.socket:
        sock = socket.socket(self.listen.family, socket.SOCK_STREAM)
        try:
            if self.listen.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                # Several processes on one port: the kernel spreads new clients over them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.listen.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # nothing wider
            sock.bind(self.listen.sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._wake_r.close()
            self._wake_w.close()
            raise
        return sock

    def _apply_listener_options(self, options: ForwardOptions) -> None:
        """Accepted sockets inherit these from the listener: no syscalls per client."""
        _no_delay(self._listener)  # each read forwarded at once (see _no_delay)
        # reset: a reconfigure() that drops an option must take it off the listener too.
        self._dead_peer_options(self._listener, options, reset=True)

    @staticmethod
    def _dead_peer_options(sock: socket.socket, options: ForwardOptions, reset: bool = False) -> None:
        """Set the keepalive and user timeout options; with `reset` (a listener, whose accepted
        sockets inherit what it has), options that are None go back to a fresh socket's."""
        if sock.family not in _IP_FAMILIES:
            return
        default = _fresh_socket_option if reset else None
        if options.keepalive is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if _KEEPIDLE is not None:
                sock.setsockopt(socket.IPPROTO_TCP, _KEEPIDLE, options.keepalive)
            for name, value in (
                ("TCP_KEEPINTVL", options.keepalive_interval),
                ("TCP_KEEPCNT", options.keepalive_count),
            ):
                option = getattr(socket, name, None)
                if option is None:
                    continue
                if value is None and default is not None:
                    value = default(sock.family, option)
                if value is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
        elif reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        if options.user_timeout is not None:
            # Unacknowledged data older than this ends the connection (ETIMEDOUT): a peer that
            # vanished without FIN or RST is noticed even while bytes are in flight.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(options.user_timeout * 1000))
        elif reset and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)  # 0: the system's default

    @property
    def address_text(self) -> str:
        if self.listen.family == socket.AF_UNIX and self._inherited:
            return self.listen.text
        return format_sockaddr(self.listen.family, self.address)

    def fd_shortfall(self) -> Optional[Tuple[int, int]]:
        """(fds needed for max_connections, fds this process may open) when the first is
        more than the second, else None."""
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX
            return None
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 16
        per_client = self.FDS_PER_CLIENT.get(getattr(self.bridge_class, "engine_name", ""), 4)
        needed = self.options.max_connections * per_client
        return (needed, soft - in_use) if needed > soft - in_use else None

    def serve_forever(self) -> None:
        """Accept and bridge clients until ``close()`` (or ``request_stop()``) is called."""
        with self._serving, selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            results = self._claim_results()
            if results is not None:
                selector.register(results, selectors.EVENT_READ)
            listening = False
            options_seen: Optional[ForwardOptions] = None
            try:
                while not self._closing.is_set():
                    if self.options is not options_seen:  # at the start, and after reconfigure()
                        options_seen = self.options
                        self._choose_path(selector, options_seen)
                    want = self._fast is None and self._may_accept()
                    if want != listening:
                        if want:
                            selector.register(self._listener, selectors.EVENT_READ)
                        else:
                            selector.unregister(self._listener)
                        listening = want
                    for key, _ in selector.select(self._select_timeout()):
                        if key.fileobj is self._listener:
                            self._accept_some(selector)
                        elif key.fileobj is self._wake_r:
                            self._drain_wake()
                        elif key.fileobj is results:
                            core.deliver_results()  # type: ignore[union-attr]
                        elif isinstance(key.fileobj, _FastPath):
                            self._fast_events(key.fileobj, selector)
                            self._fast_pause(selector, key.fileobj)
                        else:
                            self._ready(selector, key.fd)
                    self._expire(selector)
                    self._fast_resume(selector)
            finally:
                for client, _ in list(self._pending.values()):
                    self._drop_client(selector, client)
                if self._fast is not None:  # before close() closes the listening socket
                    self._fast.listener.stop(cancel_connects=False)  # close() cancels them
                    self._fast = None
                if results is not None:
                    core.release_results()  # type: ignore[union-attr]

    def _claim_results(self) -> Optional[int]:
        """On the compiled engine, this thread finishes ended bridges itself (an fd to watch):
        no hand-off to the results thread per client, and no GIL traffic between the two."""
        if core is None or getattr(self.bridge_class, "engine_name", "") != "cython":
            return None
        fd: Optional[int] = core.claim_results()  # None while another forwarder holds it
        return fd

    # -- the fast path: the loops accept --------------------------------------------------

    def _fast_path_for(self, options: ForwardOptions) -> bool:
        """Whether the engine's loops can serve these options alone: the default compiled
        engine, on Linux, one upstream, no PROXY protocol (access lists are checked there)."""
        return (
            core is not None
            and self.bridge_class is DefaultBridge
            and sys.platform.startswith("linux")
            and len(options.upstreams) == 1
            and not options.send_proxy
            and not options.accept_proxy
            and not env_flag("TCPTOTCP_ACCEPT_IN_PYTHON")
        )

    def _upstream_sockopts(self, options: ForwardOptions, family: int) -> List[Tuple[int, int, int]]:
        if family not in _IP_FAMILIES:
            return []
        opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        if options.keepalive is not None:
            opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
            if _KEEPIDLE is not None:
                opts.append((socket.IPPROTO_TCP, _KEEPIDLE, options.keepalive))
            if options.keepalive_interval is not None:
                opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, options.keepalive_interval))
            if options.keepalive_count is not None:
                opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, options.keepalive_count))
        if options.user_timeout is not None:
            opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(options.user_timeout * 1000)))
        return opts

    def _choose_path(self, selector: selectors.BaseSelector, options: ForwardOptions) -> None:
        """Accept in the loops where the options allow it, else in this thread."""
        if self._fast is not None:
            # Its open bridges run on, and its clients still connecting upstream connect with
            # the options they came with: their events still come.
            self._fast.listener.stop(cancel_connects=False)
            self._ids = itertools.count(self._fast.listener.next_id)
            self._fast = None
        if not self._fast_path_for(options):
            return
        upstream = options.upstreams[0]
        try:
            listener = core.listen(  # type: ignore[union-attr]
                self._listener,
                upstream.family,
                upstream.sockaddr,
                self._upstream_sockopts(options, upstream.family),
                plan_of(
                    options.bridge_args["rate_check_seconds"],
                    options.bridge_args["keep_alive_delay_time_seconds"],
                    options.bridge_args["activity"],
                    options.bridge_args["half_close"],
                ),
                options.connect_timeout,
                options.max_connections,
                next(self._ids),
                access=options.access.tables() if options.access else None,
            )
        except (OSError, ValueError) as exc:
            log.debug("accepting in Python: %s", exc)
            return
        self._fast = _FastPath(listener, upstream, options)
        self._fast_all.append(self._fast)
        selector.register(self._fast, selectors.EVENT_READ)

    def _fast_events(self, fast: _FastPath, selector: Optional[selectors.BaseSelector] = None) -> None:
        # Without open and close lines or metrics, bridges that came and went since the last
        # take are only counted: no Python objects per connection.
        brief = self._metrics is None and not log.isEnabledFor(logging.INFO)
        # Read before the take: a bridge whose end is counted here is in this take's lists.
        still_active = fast.listener.active
        opened, ended, (gone, gone_up, gone_down) = fast.listener.take(brief)
        if gone:
            with self._lock:
                self.stats.accepted += gone
                self.stats.bytes_up += gone_up
                self.stats.bytes_down += gone_down
        for conn_id, address, relay in opened:
            item = _Open(conn_id, _Peer(self.listen.family, address), fast.upstream, relay, relay.counts)
            with self._lock:
                self._bridges[relay] = item
            self._fast_open[conn_id] = item
            self._fast_opened(item)
        for conn_id, address, was_opened, up, down, reason, seconds, err, timed_out in ended:
            if was_opened == 1:
                item = self._fast_open.pop(conn_id)
                with self._lock:
                    self._bridges.pop(item.bridge, None)
                self._ended(item, up, down, reason, seconds)
                continue
            if was_opened == 2:  # opened and ended since the last take: reported here only
                item = _Open(conn_id, _Peer(self.listen.family, address), fast.upstream, None, _NO_COUNTS)
                self._fast_opened(item)
                self._ended(item, up, down, reason, seconds)
                continue
            with self._lock:
                self.stats.accepted += 1
            if self._metrics is not None:
                self._metrics.accepted()
            if was_opened == 3:  # the loop refused it (--allow/--deny) and closed it
                self._log_refused(conn_id, _Peer(self.listen.family, address), _NOT_ALLOWED)
                continue
            if err == errno.ECANCELED and self._closing.is_set():
                continue  # given up on as the forwarder closes: no line per client
            exc: OSError = socket.timeout("timed out") if timed_out else OSError(err, os.strerror(err))
            self._log_upstream_failure(conn_id, _Peer(self.listen.family, address), fast.upstream, exc)
        if fast is not self._fast and not still_active and selector is not None:
            if self._fast_paused.pop(fast, None) is None:
                selector.unregister(fast)  # stopped, and nothing more to come
            self._fast_all.remove(fast)

    def _fast_opened(self, item: _Open) -> None:
        with self._lock:
            self.stats.accepted += 1
            self.stats.active += 1
        if self._metrics is not None:
            self._metrics.accepted()
            self._metrics.opened()
        self._log_open(item.conn_id, item.peer, item.upstream)

    def _fast_pause(self, selector: selectors.BaseSelector, fast: _FastPath) -> None:
        """Take a listener's events at most every _FAST_BATCH seconds: under load each take
        then holds many opens and ends, and this thread wakes ~20 times a second, not
        twice per connection."""
        if fast in self._fast_all and fast not in self._fast_paused:
            selector.unregister(fast)
            self._fast_paused[fast] = time.monotonic() + _FAST_BATCH

    def _fast_resume(self, selector: selectors.BaseSelector) -> None:
        if not self._fast_paused:
            return
        now = time.monotonic()
        for fast, until in list(self._fast_paused.items()):
            if until <= now:
                del self._fast_paused[fast]
                selector.register(fast, selectors.EVENT_READ)

    def _pump_fast(self, timeout: float) -> None:
        """From close(): take the stopped listeners' events (serve_forever() no longer does)."""
        if not self._fast_all:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(self._fast_all, [], [], timeout)
        for fast in ready:
            self._fast_events(fast)

    def _may_accept(self) -> bool:
        # At the connection limit, leave clients in the backlog rather than accepting and
        # dropping them; after EMFILE, wait a moment instead of spinning.
        return self.stats.active < self.options.max_connections and time.monotonic() >= self._accept_paused_until

    def _select_timeout(self) -> float:
        timeout = _FAST_BATCH if self._fast_paused else 1.0
        if self._timers:
            timeout = min(timeout, self._timers[0][0] - time.monotonic())
        if self._accept_paused_until > time.monotonic():
            timeout = min(timeout, self._accept_paused_until - time.monotonic())
        return max(0.0, timeout)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed

    # -- one client: accept, check, connect, hand over ------------------------------------

    def _accept_some(self, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # then let the other events of this turn run
            if not self._may_accept():
                return
            try:
                # The bare fd: no socket object, no blocking-mode syscall; its bridge adopts it.
                fd, sockaddr = self._listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error("accept failed: %s; backing off", exc.strerror)
                    self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
                    return
                raise
            self._accept_paused_until = 0.0
            client = _Client(next(self._ids), fd, _Peer(self.listen.family, sockaddr), self.options)
            with self._lock:
                self.stats.accepted += 1
                self.stats.active += 1
            if self._metrics is not None:
                self._metrics.accepted()
            if client.options.accept_proxy:
                self._watch(selector, client, fd, selectors.EVENT_READ, "header")
                self._set_timer(client, client.options.proxy_timeout)
            else:
                self._admit(selector, client)

    def _admit(self, selector: selectors.BaseSelector, client: _Client) -> None:
        access = client.options.access
        if access and not access.permits(client.peer.sockaddr[0]):
            self._refuse(client, _NOT_ALLOWED)
            return
        client.tries = self._upstream_order(client.options)
        self._try_next_upstream(selector, client)

    def _upstream_order(self, options: ForwardOptions) -> List[Address]:
        ups = list(options.upstreams)
        if options.balance == "roundrobin" and len(ups) > 1:
            start = self._next_upstream % len(ups)
            self._next_upstream = start + 1
            ups = ups[start:] + ups[:start]
        if self._backoff:
            now = time.monotonic()
            ready = [u for u in ups if self._backoff.get(u.text, 0.0) <= now]
            if ready:  # when every upstream is in back-off, all are tried
                ups = ready
        return ups

    def _try_next_upstream(self, selector: selectors.BaseSelector, client: _Client) -> None:
        while client.tries:
            upstream = client.tries.pop(0)
            client.upstream = upstream
            try:
                sock = socket.socket(upstream.family, socket.SOCK_STREAM | _NONBLOCK)
                if not _NONBLOCK:
                    sock.setblocking(False)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
                self._upstream_failed(client, exc)
                continue
            try:
                _no_delay(sock)
                self._dead_peer_options(sock, client.options)
                err = sock.connect_ex(upstream.sockaddr)
                if err == errno.EINPROGRESS:
                    # On a local upstream the handshake has usually completed inside connect()
                    # already; asking again (0 once connected) saves a trip through the selector.
                    err = sock.connect_ex(upstream.sockaddr)
                    if err in (errno.EALREADY, errno.EINPROGRESS):
                        err = errno.EINPROGRESS
                    elif err == errno.EISCONN:
                        err = 0
            except OSError as exc:
                sock.close()
                self._upstream_failed(client, exc)
                continue
            client.upstream_sock = sock
            if err == 0:
                self._connected(selector, client)
                return
            if err == errno.EINPROGRESS or (err == errno.EAGAIN and upstream.family != socket.AF_UNIX):
                # (A Unix socket's EAGAIN is a full backlog: that connect never completes.)
                self._watch(selector, client, sock.fileno(), selectors.EVENT_WRITE, "connect")
                self._set_timer(client, client.options.connect_timeout)
                return
            client.upstream_sock = None
            sock.close()
            self._upstream_failed(client, OSError(err, os.strerror(err)))
        # Every upstream failed.
        if len(client.options.upstreams) > 1:
            log.error(
                "#%d %s: every upstream failed",
                client.conn_id,
                client.peer,
                extra=_event("unserved", id=client.conn_id, client=str(client.peer)),
            )
        client.deadline = 0.0  # a connect timer of the last attempt may still be queued: void it
        os.close(client.fd)
        self._client_gone()

    def _fail_over(self, selector: selectors.BaseSelector, client: _Client, exc: OSError) -> None:
        """The upstream being connected failed: close it, report it, try the next one."""
        sock = client.upstream_sock
        assert sock is not None
        client.upstream_sock = None
        sock.close()
        self._upstream_failed(client, exc)
        self._try_next_upstream(selector, client)

    def _connected(self, selector: selectors.BaseSelector, client: _Client) -> None:
        sock = client.upstream_sock
        assert sock is not None and client.upstream is not None
        self._backoff.pop(client.upstream.text, None)
        if client.options.send_proxy:
            client.to_send = self._proxy_header(client)
            try:
                sent = sock.send(client.to_send)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._fail_over(selector, client, exc)
                return
            client.to_send = client.to_send[sent:]
            if client.to_send:  # the upstream's buffer is full already: wait for room
                self._watch(selector, client, sock.fileno(), selectors.EVENT_WRITE, "send")
                self._set_timer(client, client.options.connect_timeout)
                return
        self._bridge(client)

    def _proxy_header(self, client: _Client) -> bytes:
        family = client.peer.family
        source = client.peer.sockaddr if family in _IP_FAMILIES else None
        destination = client.destination
        if destination is None and source is not None:
            with socket.socket(family, socket.SOCK_STREAM, 0, client.fd) as view:
                try:
                    destination = view.getsockname()
                finally:
                    view.detach()  # the fd stays the client's
        encode = _proxy.encode_v1 if client.options.send_proxy == "v1" else _proxy.encode_v2
        return encode(family, source, destination)

    def _read_header(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """Read the client's PROXY header: every byte of it and none after it, so what the
        client sent next stays in the socket for the bridge."""
        with socket.socket(self.listen.family, socket.SOCK_STREAM, 0, client.fd) as view:
            try:
                try:
                    seen = view.recv(_proxy.MAX_HEADER_BYTES - len(client.header), socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, f"PROXY header not read: {exc.strerror or exc}")
                    return
                if not seen:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, "closed before its PROXY header ended")
                    return
                try:
                    header = _proxy.parse(client.header + seen)
                except _proxy.ProxyHeaderError as exc:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, f"bad PROXY header: {exc}")
                    return
                # A prefix of a header is all header: take it. A whole one: take just its bytes.
                take = len(seen) if header is None else header.length - len(client.header)
                client.header += view.recv(take)
            finally:
                view.detach()
        if header is None:
            if len(client.header) >= _proxy.MAX_HEADER_BYTES:
                self._unwatch(selector, client.fd)
                self._refuse(client, "PROXY header too long")
            return
        self._unwatch(selector, client.fd)
        client.deadline = 0.0  # its timer is void
        if header.source is not None and header.family in _IP_FAMILIES:
            client.peer = _Peer(header.family, header.source)
            client.destination = header.destination
        self._admit(selector, client)

    def _ready(self, selector: selectors.BaseSelector, fd: int) -> None:
        client, what = self._pending[fd]
        if what == "header":
            self._read_header(selector, client)
            return
        sock = client.upstream_sock
        assert sock is not None
        if what == "connect":
            self._unwatch(selector, fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail_over(selector, client, OSError(err, os.strerror(err)))
            else:
                self._connected(selector, client)
            return
        try:  # "send": the rest of our PROXY header
            sent = sock.send(client.to_send)
        except BlockingIOError:
            return
        except OSError as exc:
            self._unwatch(selector, fd)
            self._fail_over(selector, client, exc)
            return
        client.to_send = client.to_send[sent:]
        if not client.to_send:
            self._unwatch(selector, fd)
            self._bridge(client)

    def _watch(self, selector: selectors.BaseSelector, client: _Client, fd: int, events: int, what: str) -> None:
        self._pending[fd] = (client, what)
        selector.register(fd, events)

    def _unwatch(self, selector: selectors.BaseSelector, fd: int) -> None:
        del self._pending[fd]
        selector.unregister(fd)

    def _set_timer(self, client: _Client, seconds: float) -> None:
        client.deadline = time.monotonic() + seconds
        heapq.heappush(self._timers, (client.deadline, client.conn_id, client))

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, client = heapq.heappop(self._timers)
            if client.deadline != deadline:
                continue  # moved on (or gone) since this timer was set
            client.deadline = 0.0
            if client.upstream_sock is None:  # still on its PROXY header
                self._unwatch(selector, client.fd)
                self._refuse(client, "no complete PROXY header in time")
                continue
            self._unwatch(selector, client.upstream_sock.fileno())
            self._fail_over(selector, client, socket.timeout("timed out"))

    def _drop_client(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """Closing with a client still pending: give up on it without a log line per client."""
        for fd in [fd for fd, (c, _) in self._pending.items() if c is client]:
            self._unwatch(selector, fd)
        if client.upstream_sock is not None:
            client.upstream_sock.close()
        client.deadline = 0.0
        os.close(client.fd)
        self._client_gone()

    def _refuse(self, client: _Client, why: str) -> None:
        self._log_refused(client.conn_id, client.peer, why)
        client.deadline = 0.0
        os.close(client.fd)
        self._client_gone()

    def _log_refused(self, conn_id: int, peer: _Peer, why: str) -> None:
        with self._lock:
            self.stats.refused += 1
        if self._metrics is not None:
            self._metrics.refused()
        log.warning(
            "#%d %s: refused: %s",
            conn_id,
            peer,
            why,
            extra=_event("refused", id=conn_id, client=str(peer), why=why),
        )

    def _upstream_failed(self, client: _Client, exc: OSError) -> None:
        upstream = client.upstream
        assert upstream is not None
        if client.options.upstream_backoff > 0:
            self._backoff[upstream.text] = time.monotonic() + client.options.upstream_backoff
        self._log_upstream_failure(client.conn_id, client.peer, upstream, exc)

    def _log_upstream_failure(self, conn_id: int, peer: _Peer, upstream: Address, exc: OSError) -> None:
        with self._lock:
            self.stats.upstream_failures += 1
        if self._metrics is not None:
            self._metrics.upstream_failed(upstream.text)
        log.error(
            "#%d %s: upstream %s failed: %s",
            conn_id,
            peer,
            upstream.text,
            exc,
            extra=_event("upstream_failed", id=conn_id, client=str(peer), upstream=upstream.text, error=str(exc)),
        )

    def _client_gone(self) -> None:
        with self._lock:
            self.stats.active -= 1
            slot_opened = self.stats.active == self.options.max_connections - 1
        if slot_opened:
            self._wake()  # the serve loop may take the listener back

    def _bridge(self, client: _Client) -> None:
        upstream, sock = client.upstream, client.upstream_sock
        assert upstream is not None and sock is not None
        client.deadline = 0.0
        conn_id, peer = client.conn_id, client.peer
        # Both sockets are ours: the bridge adopts their fds (no checks, dups or extra closes).
        try:
            bridge = self.bridge_class.from_fds(client.fd, sock.fileno(), **client.options.bridge_args)
            self._log_open(conn_id, peer, upstream)
            bridge.start()
        except Exception as exc:  # out of fds or threads (or a custom bridge_class failed)
            log.error("#%d %s: bridge not started: %s", conn_id, peer, exc)
            os.close(client.fd)
            sock.close()
            if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
                self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
            with self._lock:
                self.stats.refused += 1
            if self._metrics is not None:
                self._metrics.refused()
            self._client_gone()
            return
        sock.detach()  # the bridge closes it
        if self._metrics is not None:
            self._metrics.opened()
        opened = _Open(conn_id, peer, upstream, bridge, lambda: bridge.counts)
        # close() stops what is in _bridges only once serve_forever() returned: none is missed.
        with self._lock:
            self._bridges[bridge] = opened
        bridge.add_done_callback(lambda result: self._bridge_ended(opened, result))

    def _bridge_ended(self, opened: _Open, result: BridgeResult) -> None:
        """From the thread that finishes bridges, once per bridge."""
        with self._lock:
            self._bridges.pop(opened.bridge, None)
        self._ended(opened, result.bytes_1_to_2, result.bytes_2_to_1, result.reason, result.seconds)

    def _log_open(self, conn_id: int, peer: _Peer, upstream: Address) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "#%d open %s -> %s",
                conn_id,
                peer,
                upstream.text,
                extra=_event("open", id=conn_id, client=str(peer), upstream=upstream.text),
            )

    def _ended(self, opened: _Open, up: int, down: int, reason: str, seconds: float) -> None:
        with self._lock:
            self.stats.bytes_up += up
            self.stats.bytes_down += down
        if self._metrics is not None:
            self._metrics.ended(reason, up, down, seconds)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "#%d close %s -> %s: %d bytes up, %d down, %s after %.3f s",
                opened.conn_id,
                opened.peer,
                opened.upstream.text,
                up,
                down,
                reason,
                seconds,
                extra=_event(
                    "close",
                    id=opened.conn_id,
                    client=str(opened.peer),
                    upstream=opened.upstream.text,
                    bytes_up=up,
                    bytes_down=down,
                    reason=reason,
                    seconds=round(seconds, 6),
                ),
            )
        self._client_gone()

    # -- seeing and stopping ------------------------------------------------------------

    def open_bridges(self) -> List[Dict[str, Any]]:
        """Every running bridge: id, client, upstream, age in seconds, bytes each way so far."""
        with self._lock:
            items = list(self._bridges.values())
        now = time.monotonic()
        listing = []
        for item in sorted(items, key=lambda o: o.conn_id):
            up, down = item.counts()
            listing.append(
                dict(
                    id=item.conn_id,
                    client=str(item.peer),
                    upstream=item.upstream.text,
                    seconds=round(now - item.started, 3),
                    bytes_up=up,
                    bytes_down=down,
                )
            )
        return listing

    def request_stop(self) -> None:
        """Make ``serve_forever()`` return soon; safe from a signal handler or any thread."""
        self._closing.set()
        self._wake()

    def stop_accepting(self) -> None:
        """Stop accepting and close the listener; open bridges run on to their own end."""
        self.request_stop()
        if not self._serving.acquire(timeout=5.0):
            log.error("serve_forever() did not return in time")
        else:
            self._serving.release()
        self._close_listener()
        if self._fast_pump is None and not self._fast_pump_stop.is_set() and self._fast_all:
            # Bridges the loops accepted run on (a forward a reload removed), but serve_forever()
            # no longer takes their events: without this their ends would wait for close().
            self._fast_pump = threading.Thread(
                target=self._pump_until_done, name=f"tcptotcp-retired {self.address_text}", daemon=True
            )
            self._fast_pump.start()

    def _pump_until_done(self) -> None:
        """Take the stopped listeners' opens and ends until every bridge has ended, or close()."""
        while not self._fast_pump_stop.is_set():
            running = any(fast.listener.active for fast in self._fast_all)
            self._pump_fast(0.05)
            if not running:
                for fast in list(self._fast_all):  # the last ends, reported before `running`
                    self._fast_events(fast)
                return

    def _close_listener(self) -> None:
        self._listener.close()
        if self.listen.family == socket.AF_UNIX and isinstance(self.listen.sockaddr, str) and not self._inherited:
            try:
                os.unlink(self.listen.sockaddr)
            except OSError:
                pass

    def _close_sockets(self) -> None:
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def close(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open bridges finish for up to `drain_seconds`, then stop them."""
        with self._lock:
            self._draining = drain_seconds > 0
        self._fast_pump_stop.set()  # from here on this thread takes the loops' events
        if self._fast_pump is not None:
            self._fast_pump.join(5.0)
        # serve_forever() gives up on pending clients as it returns.
        self.stop_accepting()
        deadline = time.monotonic() + max(0.0, drain_seconds)
        while self._draining and time.monotonic() < deadline and self._still_open():
            self._pump_fast(0.05)
        for fast in list(self._fast_all):
            fast.listener.stop()  # clients still connecting upstream: given up on, none opens later
            self._fast_events(fast)  # bridges the loops opened since the last take
        with self._lock:
            self._draining = False
            items = list(self._bridges.values())
        for item in items:
            item.bridge.stop()
        stop_waiting = time.monotonic() + 2.0
        for item in items:
            if isinstance(item.bridge, Bridge):
                item.bridge.wait(max(0.0, stop_waiting - time.monotonic()))
        # wait() returns once a bridge's result is set, before its done callback has counted its
        # bytes and logged its close line: wait for those too (the last thing each does is
        # _client_gone()), so that nothing is written after, or into, the summary.
        while self._still_open() and time.monotonic() < stop_waiting:
            self._pump_fast(0.01)
        for fast in list(self._fast_all):  # what ended since the last take: for the summary
            self._fast_events(fast)
        self._wake_r.close()
        self._wake_w.close()

    def _still_open(self) -> bool:
        return self.stats.active > 0 or any(fast.listener.active for fast in self._fast_all)

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        s = self.stats
        return (
            f"served {s.accepted} connections ({s.upstream_failures} upstream failures, {s.refused} refused), "
            f"{s.bytes_up} bytes up, {s.bytes_down} bytes down"
        )
