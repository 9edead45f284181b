"""A port forwarder: accept local clients and bridge each to an upstream.

The original crate's headline example, as a library class the CLI wires to signals:
``Forwarder(listen, upstream).serve_forever()`` in one thread, ``close()`` from another.

The accept pipeline (accept, PROXY header, access check, connect with failover, our PROXY
header, hand-over to relaying) is a listener (``_listener``: the engine's loops, or its pure
twin); this module is policy and reporting only. ``serve_forever()`` takes the listener's events
(``_events``) in batches and records each once: into the stats, the metrics and a log line.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

from . import _tls
from ._access import AccessList
from ._address import Address, format_sockaddr
from ._backend import Bridge as DefaultBridge
from ._bridge import Bridge, BridgeResult, BridgeState, Detached, EngineDetached
from ._events import AcceptPaused, Ended, Gone, Opened, Peer, Refused, TlsFailed, Unserved, UpstreamFailed
from ._health import HealthChecker
from ._listener import (
    BridgeRelay,
    ForwardOptions,
    LoopListener,
    PureListener,
    Wakeup,
    open_listener,
    prepare_listening_socket,
    tls_fields,
)
from ._options import DEPRECATED_KEYWORDS, check_forward, forwarder_kwargs, parse_route
from ._pump import wait_ready
from ._resolve import Resolver, Results, address_text_of, addresses_text, expand, host_of, is_no_address

__all__ = ["Forwarder", "ForwarderStats", "ForwardOptions", "raise_fd_limit"]

log = logging.getLogger("tcptotcp")

_BATCH = 0.05  # seconds between two takes of the listener's events (see serve_forever)
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
HAND_OVER_TRIES = 2  # times hand_over_bridges() tries to detach a bridge before it stays
Listener = Union[LoopListener, PureListener]


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
    active: int = 0  # clients accepted and not yet gone: reading a header, connecting or bridged


# ForwardOptions fields taken as the caller gave them (checked in Forwarder._options).
_AS_GIVEN = (
    "idle_timeout",
    "activity",
    "half_close",
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
    "max_fails",
    "fail_window",
    "check_interval",
    "check_rise",
    "check_fall",
    "max_per_client",
    "rate_per_client",
    "client_prefix6",
    "route_sni_strict",
    "bandwidth",
    "resolve_interval",
    "upstream_sni",
    "upstream_insecure",
    "tls_handshake_timeout",
)


def _deprecated_keyword(old: str, value: Any, current: Any, default: Any) -> Any:
    """The value of a keyword argument given by its old name, with a warning; a TypeError if
    the new name was given too."""
    new = DEPRECATED_KEYWORDS[old]
    if current != default:
        raise TypeError(f"{old} and {new} are one option: give {new} only")
    warnings.warn(f"Forwarder's {old} is now {new}", DeprecationWarning, stacklevel=3)
    return value


class _Open:
    """A running bridge, as SIGUSR1 lists it and close() stops it."""

    __slots__ = ("conn_id", "peer", "upstream", "started", "relay")

    def __init__(self, conn_id: int, peer: Peer, upstream: str, relay: Any, age: float = 0.0) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.upstream = upstream
        self.started = time.monotonic() - age
        self.relay = relay


@dataclass(frozen=True)
class HandedBridge:
    """An open bridge, detached to be handed to a successor: its two fds (the client's, the
    upstream's; the caller's to close), where it was, and what the logs call it."""

    fd1: int
    fd2: int
    state: BridgeState
    conn_id: int
    peer: Peer
    upstream: str
    quiesced_at: float = 0.0  # time.monotonic() when it stopped reading: its pause began


def _detach(relay: Any, timeout: float) -> Optional[Tuple[int, int, BridgeState]]:
    """A listener's or an adopted bridge, detached: (fd1, fd2, state), or None if it could not be."""
    detach = getattr(relay, "detach", None)
    got = None if detach is None else detach(timeout)
    if isinstance(got, Detached):  # (a Bridge's: sockets, and the state of all its lives)
        return got.stream1.detach(), got.stream2.detach(), got.state
    if isinstance(got, EngineDetached):  # (the loops listener's own bridge: its first life)
        state = BridgeState(
            got.bytes_1_to_2, got.bytes_2_to_1, got.seconds, got.idle_checks, got.next_check_in, *got.moved
        )
        return got.fd1, got.fd2, state
    return None


def _error_text(error: OSError) -> str:
    """A failed connect's error as the health lines word it: ``connection refused``."""
    if isinstance(error, socket.timeout) or error.errno == errno.ETIMEDOUT:
        return "connect timeout"
    return (error.strerror or str(error)).lower()


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


def _upstream_list(
    upstream: Union[str, Address, Sequence[Union[str, Address]]], strict: bool = True
) -> Tuple[Address, ...]:
    """The upstreams, each with its weight (``HOST:PORT@W``; 1 where none is given). Not
    `strict`: a name that does not resolve is an unresolved Address, not an error."""
    items = [upstream] if isinstance(upstream, (str, Address)) else list(upstream)
    if not items:
        raise ValueError("at least one upstream is needed")
    addresses = tuple(
        item if isinstance(item, Address) else Address.parse_upstream(item, strict=strict) for item in items
    )
    return addresses


class Forwarder:
    """Accepts clients on `listen` and bridges each to one of `upstream` with one ``Bridge``.

    `upstream` is an address or a list of them, each with an optional weight (``HOST:PORT@W``):
    ``balance="first"`` tries them in order (failover), ``"roundrobin"`` in turn by weight,
    ``"leastconn"`` the one with the fewest bridges per weight, ``"source"`` by the client's
    address. `max_fails` failed connects within `fail_window` seconds mark one down for
    `upstream_backoff` seconds, and `check_interval` checks them actively (`check_rise`,
    `check_fall`); a down one is skipped unless all are. `max_per_client`, `rate_per_client` and
    `client_prefix6` limit each client; `route_sni` routes TLS clients by the server name of their
    ClientHello. An upstream written as a host name stands for every address it has, and is
    looked up again every `resolve_interval` seconds (0: never), from one thread, for new
    clients (see ``_resolve``); one that does not resolve is an error only with
    `resolve_strict` (or `resolve_interval` 0), else its clients are refused until it does.
    `allow`/`deny` are networks (CIDR or one address);
    `send_proxy` ("v1"/"v2") sends the upstream a PROXY protocol header first; `accept_proxy`
    requires one from every client, within `proxy_timeout` seconds. `keepalive` (idle seconds,
    with `keepalive_interval` and `keepalive_count`) and `user_timeout` (seconds) find peers
    that vanished. `bandwidth` (bytes/s as an integer, or ``"10M"``) holds each direction of
    every bridge to that rate. `listen_socket` serves an inherited listening socket instead of
    binding `listen`. `metrics` is a ``_metrics.Metrics`` to count into.

    TLS (see ``_tls``): `tls_cert`/`tls_key` (files; several certificates are chosen by SNI),
    `tls_client_ca`, `tls_min_version`, `tls_ciphers`, `tls_alpn` terminate it; `upstream_tls`
    (with `upstream_ca`, `upstream_sni`, `upstream_cert`/`upstream_key`, `upstream_insecure`)
    originates it; `tls_handshake_timeout` bounds both handshakes. `tls_context` (a server-side
    ``ssl.SSLContext``) and `upstream_tls_context` (a client-side one) take the caller's own
    contexts instead of files. A forward with TLS is served by the pure listener and engine.
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
        idle_timeout: int = 7200,
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
        max_fails: int = 1,
        fail_window: float = 10.0,
        check_interval: Optional[float] = None,
        check_rise: int = 2,
        check_fall: int = 3,
        max_per_client: Optional[int] = None,
        rate_per_client: Optional[int] = None,
        client_prefix6: int = 64,
        route_sni: Sequence[str] = (),
        route_sni_strict: bool = False,
        bandwidth: Optional[Union[int, str]] = None,
        resolve_interval: float = 30.0,
        resolve_strict: bool = False,
        tls_cert: Sequence[str] = (),
        tls_key: Sequence[str] = (),
        tls_client_ca: Optional[str] = None,
        tls_min_version: str = "1.2",
        tls_ciphers: Optional[str] = None,
        tls_alpn: Sequence[str] = (),
        tls_handshake_timeout: float = 10.0,
        upstream_tls: bool = False,
        upstream_ca: Optional[str] = None,
        upstream_sni: Optional[str] = None,
        upstream_cert: Optional[str] = None,
        upstream_key: Optional[str] = None,
        upstream_insecure: bool = False,
        tls_context: Optional[ssl.SSLContext] = None,
        upstream_tls_context: Optional[ssl.SSLContext] = None,
        reuse_port: bool = False,
        listen_socket: Optional[socket.socket] = None,
        metrics: Optional[Any] = None,
        idle_timeout_seconds: Optional[int] = None,
    ) -> None:
        if idle_timeout_seconds is not None:  # its name in 0.1
            idle_timeout = _deprecated_keyword("idle_timeout_seconds", idle_timeout_seconds, idle_timeout, 7200)
        self._inherited = listen_socket is not None
        if listen_socket is not None:
            family, sockaddr = listen_socket.family, listen_socket.getsockname()
            text = listen if isinstance(listen, str) else listen.text
            self.listen = Address(family, sockaddr, text)
        else:
            self.listen = _as_address(listen, passive=True)
        self._settings: Dict[str, Any] = dict(
            rate_check_seconds=rate_check_seconds,
            idle_timeout=idle_timeout,
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
            max_fails=max_fails,
            fail_window=fail_window,
            check_interval=check_interval,
            check_rise=check_rise,
            check_fall=check_fall,
            max_per_client=max_per_client,
            rate_per_client=rate_per_client,
            client_prefix6=client_prefix6,
            route_sni=route_sni,
            route_sni_strict=route_sni_strict,
            bandwidth=bandwidth,
            resolve_interval=resolve_interval,
            resolve_strict=resolve_strict,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            tls_min_version=tls_min_version,
            tls_ciphers=tls_ciphers,
            tls_alpn=tls_alpn,
            tls_handshake_timeout=tls_handshake_timeout,
            upstream_tls=upstream_tls,
            upstream_ca=upstream_ca,
            upstream_sni=upstream_sni,
            upstream_cert=upstream_cert,
            upstream_key=upstream_key,
            upstream_insecure=upstream_insecure,
            tls_context=tls_context,
            upstream_tls_context=upstream_tls_context,
        )
        self._resolver: Optional[Resolver] = None  # with upstream names, while serving
        self._configuring = threading.Lock()  # one options change at a time: a reload's or a lookup's
        # One take of the listener's events at a time, recorded before the next: a hand-over's
        # take must find every bridge the serving thread's took just before (and an Ended is
        # never recorded ahead of its Opened).
        self._taking = threading.RLock()
        self._failing: Set[str] = set()  # upstream names whose last lookup failed (logged once)
        self.options = self._options(upstream, **self._settings)
        self._note_unresolved(self.options)
        self.bridge_class: Type[Bridge] = DefaultBridge if bridge_class is None else bridge_class
        self._stats = ForwarderStats()

        self._lock = threading.Lock()
        self._listener: Optional[Listener] = None  # made by serve_forever() (see _listener.open_listener)
        self._listener_closed = False
        self._open: Dict[int, _Open] = {}  # bridges opened and not yet ended, by id
        self._pump: Optional[threading.Thread] = None  # after stop_accepting(): see _pump_until_done
        self._pump_stop = threading.Event()  # close() takes over from it
        self._closing = threading.Event()
        self._draining = False  # close(drain_seconds > 0) in progress: let bridges run
        self._serving = threading.Lock()  # held while serve_forever() runs
        self._wakeup = Wakeup()  # serve_forever() has something to look at
        self._checker: Optional[HealthChecker] = None  # with check_interval, while serving
        self._following = threading.Lock()  # held by _follow_upstreams
        self._adopted = 0  # bridges a predecessor process handed over, running (see adopt)
        self._next_adopted = -1  # their keys in _open (negative: apart from the listener's ids)
        if listen_socket is not None:
            self._sock = listen_socket
            self._sock.setblocking(False)
        else:
            self._sock = self._bind(backlog, reuse_port)
        try:
            prepare_listening_socket(self._sock, self.options)
        except BaseException:
            self._close_sockets()
            raise
        self.address = self._sock.getsockname()
        self._metrics = None if metrics is None else metrics.forward(self.address_text)
        if self.options.upstream_insecure:
            log.warning(
                "%s: --upstream-insecure: the upstream's TLS certificate is NOT verified: anyone on the way "
                "can read and change the traffic",
                self.address_text,
                extra=_event("upstream_insecure", listen=self.address_text),
            )

    # -- options ------------------------------------------------------------------------

    def _options(self, upstream: Union[str, Address, Sequence[Union[str, Address]]], **kw: Any) -> ForwardOptions:
        # A caller's own SSLContexts are not options of the table (no file, no flag).
        tls_context = kw.pop("tls_context", None)
        upstream_tls_context = kw.pop("upstream_tls_context", None)
        # The option table's checks and bounds, as the command line and the config file apply them.
        kw = forwarder_kwargs(check_forward(kw, fill=False))
        # The certificates are read here: at start, and again on every reconfigure (a reload).
        tls = _tls.contexts(kw, tls_context, upstream_tls_context)
        if kw["user_timeout"] is not None and not hasattr(socket, "TCP_USER_TIMEOUT"):
            raise ValueError("user_timeout needs TCP_USER_TIMEOUT, which this platform lacks")
        access = AccessList(kw["allow"], kw["deny"])
        if access and self.listen.family not in _IP_FAMILIES:
            raise ValueError(f"allow/deny need an IP listener: clients of {self.listen.text} have no address")
        routes = tuple((pattern, Address.parse_upstream(to)) for pattern, to in map(parse_route, kw["route_sni"]))
        if routes and self.listen.family not in _IP_FAMILIES:
            raise ValueError(f"route_sni needs a TCP listener, not {self.listen.text}")
        strict = kw["resolve_strict"] or not kw["resolve_interval"]
        configured = _upstream_list(upstream, strict)
        if tls.client is not None and tls.client.check_hostname and not kw["upstream_sni"]:
            for u in configured + tuple(address for _, address in routes):
                if _tls.upstream_hostname(u) is None:
                    raise ValueError(
                        f"upstream_tls: {u.text} has no host name to verify: give upstream_sni (or upstream_insecure)"
                    )
        found = self._found(configured, strict)
        return ForwardOptions(
            upstreams=expand(configured, found),
            configured=configured,
            found=tuple(found.items()),
            routes=routes,
            access=access,
            rate_check=kw["rate_check_seconds"],
            **tls_fields(tls),
            **{name: kw[name] for name in _AS_GIVEN},
        )

    def reload_certificates(self) -> bool:
        """Read the TLS files again (SIGHUP): new clients get the new certificates, open
        bridges keep theirs. ValueError (naming the file and why) leaves the old ones in
        place. False for a forward without TLS files (nothing to read)."""
        if not any(self._settings.get(name) for name in ("tls_cert", "upstream_tls")):
            return False
        with self._configuring:
            tls = _tls.contexts(
                forwarder_kwargs(
                    check_forward({k: v for k, v in self._settings.items() if not k.endswith("_context")}, fill=False)
                ),
                self._settings.get("tls_context"),
                self._settings.get("upstream_tls_context"),
            )
            with self._lock:
                new = replace(self.options, **tls_fields(tls))
                if self._listener is not None and not self._listener_closed:
                    self._listener.configure(new)
                self.options = new
        return True

    def _found(self, configured: Tuple[Address, ...], strict: bool) -> Dict[str, Tuple[Any, ...]]:
        """Each upstream name's addresses: as parsed just now, else the last good ones (a name
        that did not resolve this time keeps what it had), else none yet."""
        previous: Dict[str, Tuple[Any, ...]] = dict(self.options.found) if hasattr(self, "options") else {}
        found: Dict[str, Tuple[Any, ...]] = {}
        for u in configured:
            where = host_of(u)
            if where is None:
                continue
            if u.resolved:
                addresses: Tuple[Any, ...] = u.resolved
            elif u.unresolved:
                addresses = previous.get(u.text, ())
            else:  # an Address made by hand: its own address, until a lookup says more
                addresses = previous.get(u.text) or ((u.family, u.sockaddr),)
            if not addresses and strict:
                raise ValueError(f"{u.text!r}: cannot resolve {where[0]!r}")
            found[u.text] = addresses
        return found

    def _note_unresolved(self, options: ForwardOptions) -> None:
        """Log each upstream name without an address once (until it has one)."""
        for text in sorted(options.unresolved - self._failing):
            self._failing.add(text)
            log.warning(
                "upstream %s has no address yet: its clients are refused until it resolves%s",
                text,
                f" (looked up every {options.resolve_interval:g} s)" if options.resolve_interval else "",
                extra=_event("upstream_unresolved", listen=self.listen.text, upstream=text, error="no address"),
            )

    def reconfigure(self, upstream: Union[str, Address, Sequence[Union[str, Address]]], **options: Any) -> None:
        """New options (the constructor's, less the listener's own) for clients from now on;
        clients already connecting or bridged keep theirs. The connection limit stays one count
        for the forward: bridges opened before count against the new limit."""
        for old, name in DEPRECATED_KEYWORDS.items():
            if old in options:
                options[name] = _deprecated_keyword(old, options.pop(old), options.get(name), None)
        unknown = set(options) - set(self._settings)
        if unknown:
            raise TypeError(f"reconfigure() got unexpected options: {', '.join(sorted(unknown))}")
        with self._configuring:
            settings = {**self._settings, **options}
            new = self._options(upstream, **settings)
            prepare_listening_socket(self._sock, new)
            with self._lock:
                # The listener first: options it refuses change nothing.
                if self._listener is not None and not self._listener_closed:
                    self._listener.configure(new)
                self._settings = settings
                self.options = new
            self._failing &= set(dict(new.found))
            self._note_unresolved(new)
        if self._listener is not None:
            self._follow_upstreams()

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
            self._wakeup.close()
            raise
        return sock

    @property
    def address_text(self) -> str:
        if self.listen.family == socket.AF_UNIX and self._inherited:
            return self.listen.text
        return format_sockaddr(self.listen.family, self.address)

    @property
    def listener_kind(self) -> Optional[str]:
        """Who accepts this forward's clients: "loops" (the compiled engine's, no Python per
        connection) or "python" (the pure listener's thread); None before serve_forever()."""
        listener = self._listener
        if listener is None:
            return None
        return "loops" if isinstance(listener, LoopListener) else "python"

    @property
    def stats(self) -> ForwarderStats:
        """The counts so far; `active` is the clients accepted and not yet gone (reading a
        header, connecting upstream or bridged), as the listener counts them."""
        self._stats.active = self._active()
        return self._stats

    def _active(self) -> int:
        with self._lock:
            listener = None if self._listener_closed else self._listener
            adopted = self._adopted
        return adopted + (0 if listener is None else listener.active)

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
            with self._lock:
                if self._closing.is_set() or self._listener_closed:
                    return
                if self._listener is None:
                    self._listener = open_listener(self._sock, self.options, self.bridge_class)
                listener = self._listener
            self._reserve_adopted()  # (bridges adopted before it listened)
            self._follow_upstreams()
            selector.register(self._wakeup, selectors.EVENT_READ)
            selector.register(listener, selectors.EVENT_READ)
            watching, resume_at = True, 0.0
            try:
                while not self._closing.is_set():
                    timeout = 1.0 if watching else max(0.0, resume_at - time.monotonic())
                    for key, _ in selector.select(timeout):
                        if key.fileobj is self._wakeup:
                            self._wakeup.clear()
                        else:
                            self._take(listener)
                            # Take at most every _BATCH seconds: under load each take then holds
                            # many events, and this thread wakes ~20 times a second, not twice
                            # per connection.
                            selector.unregister(listener)
                            watching, resume_at = False, time.monotonic() + _BATCH
                    if not watching and time.monotonic() >= resume_at:
                        selector.register(listener, selectors.EVENT_READ)
                        watching = True
            finally:
                # Before close() closes the listening socket. Clients on their way go on: their
                # events still come (close() cancels them).
                listener.stop(cancel_connects=False)

    # -- the recorder: each event once into stats, metrics and log lines -------------------

    def _take(self, listener: Listener) -> None:
        # Without open and close lines or metrics, bridges that came and went since the last
        # take are only counted: no Python objects per connection.
        brief = self._metrics is None and not log.isEnabledFor(logging.INFO)
        with self._taking:
            self._record(listener.take(brief))

    def _record(self, events: List[Any]) -> None:
        stats, metrics = self._stats, self._metrics
        item: Optional[_Open]
        for e in events:
            kind = type(e)
            if kind is Opened:
                item = _Open(e.conn_id, e.peer, e.upstream, e.relay)
                with self._lock:
                    stats.accepted += 1
                    self._open[e.conn_id] = item
                if metrics is not None:
                    metrics.accepted()
                    metrics.opened()
                self._log_open(e.conn_id, e.peer, e.upstream, e.tls)
            elif kind is Ended:
                with self._lock:
                    item = self._open.pop(e.conn_id, None)
                    if item is None:
                        stats.accepted += 1
                    stats.bytes_up += e.bytes_up
                    stats.bytes_down += e.bytes_down
                if item is None:  # opened and ended since the last take: both told now
                    if metrics is not None:
                        metrics.accepted()
                        metrics.opened()
                    self._log_open(e.conn_id, e.peer, e.upstream, e.tls)
                if metrics is not None:
                    metrics.ended(e.reason, e.bytes_up, e.bytes_down, e.seconds)
                self._log_close(e)
            elif kind is TlsFailed:
                # (the Refused or UpstreamFailed that follows writes the log line)
                if metrics is not None:
                    metrics.tls_failed(e.side, e.reason)
            elif kind is UpstreamFailed:
                with self._lock:
                    stats.upstream_failures += 1
                if metrics is not None:
                    metrics.upstream_failed(e.upstream)
                if e.upstream in self.options.unresolved:  # its candidate is NO_ADDRESS (see _resolve)
                    log.error(
                        "#%d %s: upstream %s has no address yet",
                        e.conn_id,
                        e.peer,
                        e.upstream,
                        extra=_event(
                            "upstream_failed", id=e.conn_id, client=str(e.peer), upstream=e.upstream, error="no address"
                        ),
                    )
                    continue
                log.error(
                    "#%d %s: upstream %s failed: %s",
                    e.conn_id,
                    e.peer,
                    e.upstream,
                    e.error,
                    extra=_event(
                        "upstream_failed", id=e.conn_id, client=str(e.peer), upstream=e.upstream, error=str(e.error)
                    ),
                )
                if e.marked_down:
                    options = self.options
                    self._log_upstream_state(
                        e.upstream,
                        False,
                        f"{_error_text(e.error)} ({options.max_fails} failed connects within "
                        f"{options.fail_window:g} s; skipped for {options.upstream_backoff:g} s)",
                    )
            elif kind is Refused:
                with self._lock:
                    stats.accepted += 1
                    stats.refused += 1
                if metrics is not None:
                    metrics.accepted()
                    metrics.refused(e.kind)
                log.warning(
                    "#%d %s: refused: %s",
                    e.conn_id,
                    e.peer,
                    e.why,
                    extra=_event("refused", id=e.conn_id, client=str(e.peer), why=e.why, reason=e.kind),
                )
            elif kind is AcceptPaused:
                log.error(
                    "accept failed: %s; backing off",
                    e.error.strerror or e.error,
                    extra=_event("accept_failed", error=str(e.error), seconds=e.seconds),
                )
            elif kind is Gone:
                with self._lock:
                    stats.accepted += e.bridges
                    stats.bytes_up += e.bytes_up
                    stats.bytes_down += e.bytes_down
            else:  # Unserved, Dropped: closed without a bridge, each failure already told
                with self._lock:
                    stats.accepted += 1
                if metrics is not None:
                    metrics.accepted()
                if kind is Unserved and len(self.options.upstreams) > 1:
                    log.error(
                        "#%d %s: every upstream failed",
                        e.conn_id,
                        e.peer,
                        extra=_event("unserved", id=e.conn_id, client=str(e.peer)),
                    )

    # -- upstream health -------------------------------------------------------------------

    def upstream_states(self) -> Dict[str, bool]:
        """Each upstream of the current options, by its text: False while it is marked down (by
        failed connects or by the checks)."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
            upstreams = self.options.all_upstreams
        if listener is None:
            return {u.text: True for u in upstreams}
        states = {}
        for i, u in enumerate(upstreams):
            if is_no_address(u):  # a name without an address serves no one
                states[u.text] = False
                continue
            try:
                states[u.text] = not listener.upstream_down(i)
            except IndexError:  # (options swapped meanwhile)
                states[u.text] = True
        return states

    def _follow_upstreams(self) -> None:
        """Start, update or stop the active checks as the options say, and export the
        upstreams' state (serving, and after each reconfigure)."""
        # One at a time: reconfigure() may be called from several threads at once.
        # The lookups first, outside the lock below: stopping them waits for their thread, which
        # may itself be on its way into this method.
        self._follow_names(self.options)
        with self._following:
            options = self.options
            # A name without an address has nothing to check.
            checked = tuple(u for u in options.all_upstreams if not is_no_address(u))
            with self._lock:
                checker = self._checker
                if options.check_interval is None:
                    self._checker = None
                elif checker is None and not self._closing.is_set():
                    self._checker = HealthChecker(
                        checked,
                        interval=options.check_interval,
                        rise=options.check_rise,
                        fall=options.check_fall,
                        on_change=self._checked,
                        name=self.address_text,
                    )
                    self._checker.start()
            if options.check_interval is None and checker is not None:
                checker.close()
                listener = self._listener
                if listener is not None and not self._listener_closed:
                    for i, u in enumerate(options.all_upstreams):
                        if not is_no_address(u):
                            listener.set_checked(i, False)  # nothing checks them now
            elif options.check_interval is not None and checker is not None:
                checker.update(
                    checked,
                    interval=options.check_interval,
                    rise=options.check_rise,
                    fall=options.check_fall,
                )
            if self._metrics is not None:
                texts = [u.text for u in options.all_upstreams]
                self._metrics.upstreams(texts, lambda text: self.upstream_states().get(text, True))

    # -- upstream names ----------------------------------------------------------------------

    def _follow_names(self, options: ForwardOptions) -> None:
        """Start, update or stop the lookups of the upstream names as the options say."""
        names: Dict[str, Tuple[str, int]] = {}
        for u in options.configured:
            where = host_of(u)
            if where is not None:
                names[u.text] = where
        wanted = bool(names) and options.resolve_interval > 0
        with self._lock:
            resolver = self._resolver
            if not wanted:
                self._resolver = None
            elif resolver is None and not self._closing.is_set():
                self._resolver = Resolver(
                    names, interval=options.resolve_interval, on_result=self._resolved, name=self.address_text
                )
                self._resolver.start()
        if not wanted and resolver is not None:
            resolver.close()
        elif wanted and resolver is not None:
            resolver.update(names, options.resolve_interval)

    def _resolved(self, resolver: Resolver, results: Results) -> None:
        """A round of lookups (from the resolver's thread): a name's new addresses are its
        candidates for new clients from now on, applied as a reload applies options."""
        with self._configuring:
            if resolver is not self._resolver or resolver.closed or self._closing.is_set():
                return  # (stopped or replaced while it looked up)
            options = self.options
            found = dict(options.found)
            changed = False
            for text, result in results.items():
                old = found.get(text)
                if old is None:
                    continue  # a reload removed it meanwhile
                if isinstance(result, str):
                    self._count_resolution(text, "failed")
                    if text not in self._failing:  # once per streak of failures
                        self._failing.add(text)
                        log.warning(
                            "upstream %s: cannot resolve it (%s); %s",
                            text,
                            result,
                            f"keeping {addresses_text(old)}" if old else "it has no address yet",
                            extra=_event("upstream_unresolved", listen=self.address_text, upstream=text, error=result),
                        )
                    continue
                if text in self._failing:
                    self._failing.discard(text)
                    if result == old:
                        log.info("upstream %s resolves again: %s", text, addresses_text(result))
                if result == old:
                    self._count_resolution(text, "unchanged")
                    continue
                self._count_resolution(text, "changed")
                log.warning(
                    "upstream %s now %s (was %s)",
                    text,
                    addresses_text(result),
                    addresses_text(old),
                    extra=_event(
                        "upstream_resolved",
                        listen=self.address_text,
                        upstream=text,
                        addresses=[address_text_of(w) for w in result],
                        was=[address_text_of(w) for w in old],
                    ),
                )
                found[text] = result
                changed = True
            if not changed:
                return
            new = replace(options, upstreams=expand(options.configured, found), found=tuple(found.items()))
            with self._lock:
                listener = None if self._listener_closed else self._listener
                try:
                    if listener is not None:
                        listener.configure(new)
                except ValueError as exc:  # (more candidates than the loops take)
                    log.error("%s: new upstream addresses not applied: %s", self.address_text, exc)
                    return
                self.options = new
        self._follow_upstreams()

    def _count_resolution(self, upstream: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.resolved(upstream, result)

    def _checked(self, upstream: Address, up: bool, why: str) -> None:
        """The checks flipped an upstream's state (from the checker's thread)."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
            upstreams = self.options.all_upstreams
        for i, u in enumerate(upstreams):
            if u.text == upstream.text and (u.family, u.sockaddr) == (upstream.family, upstream.sockaddr):
                if listener is not None:
                    listener.set_checked(i, not up)
                self._log_upstream_state(upstream.text, up, why)
                return

    def _log_upstream_state(self, upstream: str, up: bool, why: str) -> None:
        """An upstream marked down (by failed connects or by the checks) or up again."""
        log.log(
            logging.INFO if up else logging.WARNING,
            "upstream %s %s: %s",
            upstream,
            "up" if up else "down",
            why,
            extra=_event(
                "upstream_up" if up else "upstream_down", listen=self.address_text, upstream=upstream, why=why
            ),
        )

    def _log_open(self, conn_id: int, peer: Peer, upstream: str, tls: Optional[_tls.TlsInfo] = None) -> None:
        if log.isEnabledFor(logging.INFO):
            if tls is None:
                log.info(
                    "#%d open %s -> %s",
                    conn_id,
                    peer,
                    upstream,
                    extra=_event("open", id=conn_id, client=str(peer), upstream=upstream),
                )
                return
            log.info(
                "#%d open %s -> %s%s",
                conn_id,
                peer,
                upstream,
                tls.text(),
                extra=_event("open", id=conn_id, client=str(peer), upstream=upstream, **tls.fields()),
            )

    def _log_close(self, e: Ended) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info(
                "#%d close %s -> %s: %d bytes up, %d down, %s after %.3f s",
                e.conn_id,
                e.peer,
                e.upstream,
                e.bytes_up,
                e.bytes_down,
                e.reason,
                e.seconds,
                extra=_event(
                    "close",
                    id=e.conn_id,
                    client=str(e.peer),
                    upstream=e.upstream,
                    bytes_up=e.bytes_up,
                    bytes_down=e.bytes_down,
                    reason=e.reason,
                    seconds=round(e.seconds, 6),
                ),
            )

    # -- seeing and stopping ------------------------------------------------------------

    def open_bridges(self) -> List[Dict[str, Any]]:
        """Every running bridge: id, client, upstream, age in seconds, bytes each way so far."""
        with self._lock:
            items = list(self._open.values())
        now = time.monotonic()
        listing = []
        for item in sorted(items, key=lambda o: o.conn_id):
            up, down = item.relay.counts()
            listing.append(
                dict(
                    id=item.conn_id,
                    client=str(item.peer),
                    upstream=item.upstream,
                    seconds=round(now - item.started, 3),
                    bytes_up=up,
                    bytes_down=down,
                )
            )
        return listing

    # -- hand-over to a successor process (see _upgrade) ----------------------------------

    def hand_over_bridges(
        self, send: Callable[[HandedBridge], None], timeout: float, deadline: float
    ) -> Tuple[int, int]:
        """Detach the open bridges one at a time (each within `timeout` s, none begun after
        `deadline`, ``time.monotonic()``) and give each to `send` (which must not keep the fds:
        they are closed after it), for a successor to go on relaying. Call after
        ``stop_accepting()``. (Handed over, staying here): a bridge that cannot be detached, and
        a client still connecting upstream, run on here to their end (each bridge is tried
        `HAND_OVER_TRIES` times). If `send` raises OSError, that bridge and the rest stay."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
        if listener is not None:
            self._take(listener)  # (bridges opened since the last take)
        clients = self._active()
        with self._lock:
            items = sorted(self._open.values(), key=lambda item: item.conn_id)
        moved = 0
        # A bridge busy past its timeout (a write in progress, its threads not scheduled in time)
        # gets a second try after the others, a second pause as short as the first.
        for _ in range(HAND_OVER_TRIES):
            busy = []
            for n, item in enumerate(items):
                began = time.monotonic()
                if began >= deadline:
                    busy.extend(items[n:])
                    break
                got = _detach(item.relay, timeout)
                if got is None:
                    busy.append(item)
                    continue
                bridge = HandedBridge(got[0], got[1], got[2], item.conn_id, item.peer, item.upstream, began)
                try:
                    send(bridge)
                except OSError as exc:  # the successor is gone: this one and the rest go on here
                    log.error("upgrade: bridge #%d not handed over: %s", item.conn_id, exc)
                    self.adopt(bridge.fd1, bridge.fd2, bridge.state, bridge.conn_id, bridge.peer, bridge.upstream)
                    return moved, max(0, clients - moved)
                os.close(bridge.fd1)
                os.close(bridge.fd2)
                moved += 1
            items = busy
        with self._lock:
            still_open = {id(open_) for open_ in self._open.values()}
        staying = [item for item in items if id(item) in still_open]
        for item in staying:
            log.warning(
                "upgrade: #%d %s -> %s stays here until it ends: not quiet within %g s (a peer not reading, "
                "or a side closed)",
                item.conn_id,
                item.peer,
                item.upstream,
                timeout,
                extra=_event("bridge_stays", id=item.conn_id, client=str(item.peer), upstream=item.upstream),
            )
        return moved, max(0, clients - moved)

    def adopt(self, fd1: int, fd2: int, state: BridgeState, conn_id: int, peer: Peer, upstream: str) -> None:
        """Go on relaying a bridge a predecessor process detached (its fds are ours now): with
        this forward's current bridge options, its counters and idle state carried. No check
        or limit applies again; it counts as active until it ends."""
        options = self.options
        try:
            bridge = self.bridge_class.from_fds(fd1, fd2, resume=state, **options.bridge_options)
        except BaseException:
            os.close(fd1)
            os.close(fd2)
            raise
        with self._lock:
            key, self._next_adopted = self._next_adopted, self._next_adopted - 1
            self._open[key] = _Open(conn_id, peer, upstream, BridgeRelay(bridge), state.seconds)
            self._adopted += 1
        self._reserve_adopted()
        if self._metrics is not None:
            self._metrics.opened()
        log.info(
            "#%d adopted %s -> %s: %d bytes up, %d down, %.3f s so far",
            conn_id,
            peer,
            upstream,
            state.bytes_1_to_2,
            state.bytes_2_to_1,
            state.seconds,
            extra=_event("adopted", id=conn_id, client=str(peer), upstream=upstream, seconds=round(state.seconds, 6)),
        )
        bridge.add_done_callback(lambda result: self._adopted_ended(key, conn_id, peer, upstream, result))
        try:
            bridge.start()
        except BaseException:  # (the fds are still ours)
            with self._lock:
                if self._open.pop(key, None) is not None:
                    self._adopted -= 1
            self._reserve_adopted()
            if self._metrics is not None:
                self._metrics.ended("error", 0, 0, 0.0)
            os.close(fd1)
            os.close(fd2)
            raise

    def _reserve_adopted(self) -> None:
        """The adopted bridges count against the listener's connection limit (one count for
        the forward, as across reloads)."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
            adopted = self._adopted
        if listener is not None:
            listener.reserve(adopted)

    def _adopted_ended(self, key: int, conn_id: int, peer: Peer, upstream: str, result: BridgeResult) -> None:
        with self._lock:
            if self._open.pop(key, None) is None:
                return
            self._adopted -= 1
            self._stats.bytes_up += result.bytes_1_to_2
            self._stats.bytes_down += result.bytes_2_to_1
        self._reserve_adopted()
        if self._metrics is not None:
            self._metrics.ended(result.reason, result.bytes_1_to_2, result.bytes_2_to_1, result.seconds)
        self._log_close(
            Ended(
                conn_id, peer, upstream, result.bytes_1_to_2, result.bytes_2_to_1, result.reason, result.seconds, True
            )
        )

    def request_stop(self) -> None:
        """Make ``serve_forever()`` return soon; safe from a signal handler or any thread."""
        self._closing.set()
        self._wakeup.set()

    @property
    def listening_socket(self) -> socket.socket:
        """The socket clients connect to (to hand over to a successor process)."""
        return self._sock

    def recheck_accepting(self) -> None:
        """Another process that accepted from our socket stopped (a predecessor, on
        --upgrade): look at the socket afresh, for a client whose wake-up it took."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
        if listener is not None:
            listener.recheck()

    def stop_accepting(self, handed_over: bool = False) -> None:
        """Stop accepting and close the listener; open bridges run on to their own end.

        `handed_over`: another process accepts from the same socket now, so a unix: listener's
        path stays (it is theirs)."""
        if handed_over:
            self._inherited = True  # (no unlink in _close_listener)
        self.request_stop()
        if not self._serving.acquire(timeout=5.0):
            log.error("serve_forever() did not return in time")
        else:
            self._serving.release()
        self._close_listener()
        with self._lock:
            checker, self._checker = self._checker, None
            resolver, self._resolver = self._resolver, None
        if checker is not None:
            checker.close()
        if resolver is not None:
            resolver.close()
        self._wakeup.close()  # (only serve_forever() is ever woken)
        if self._pump is None and not self._pump_stop.is_set() and self._listener is not None:
            # Bridges run on (a forward a reload removed), but serve_forever() no longer takes
            # their events: without this their ends would wait for close().
            self._pump = threading.Thread(
                target=self._pump_until_done, name=f"tcptotcp-retired {self.address_text}", daemon=True
            )
            self._pump.start()

    def _pump_events(self, timeout: float) -> None:
        """Wait up to `timeout` for the listener's events and record them."""
        listener = self._listener
        if listener is None or self._listener_closed:
            time.sleep(timeout)
            return
        if wait_ready(listener, False, timeout):
            self._take(listener)

    def _pump_until_done(self) -> None:
        """Record a stopped listener's events until its last client is gone (or close() takes
        over), then free it."""
        while not self._pump_stop.is_set():
            running = self._active()
            self._pump_events(0.05)
            if not running:
                self._finish_listener()
                return

    def _finish_listener(self) -> None:
        """The last events of a listener with no client left, and the listener freed."""
        with self._lock:
            listener = None if self._listener_closed else self._listener
        if listener is None:
            return
        self._take(listener)
        if listener.active:
            return
        with self._lock:
            self._listener_closed = True
        listener.close()

    def _close_listener(self) -> None:
        self._sock.close()
        if self.listen.family == socket.AF_UNIX and isinstance(self.listen.sockaddr, str) and not self._inherited:
            try:
                os.unlink(self.listen.sockaddr)
            except OSError:
                pass

    def _close_sockets(self) -> None:
        self._sock.close()
        self._wakeup.close()

    def close(self, drain_seconds: float = 0.0) -> None:
        """Stop accepting; let open bridges finish for up to `drain_seconds`, then stop them."""
        with self._lock:
            self._draining = drain_seconds > 0
        self._pump_stop.set()  # from here on this thread records the listener's events
        if self._pump is not None:
            self._pump.join(5.0)
        # serve_forever() stops the listener (without cancelling) as it returns.
        self.stop_accepting()
        listener = None if self._listener_closed else self._listener
        if listener is not None:
            deadline = time.monotonic() + max(0.0, drain_seconds)
            while self._draining and time.monotonic() < deadline and self._active():
                self._pump_events(0.05)
            listener.stop(cancel_connects=True)  # clients still on their way: dropped, none opens later
            self._take(listener)  # bridges opened since the last take
            with self._lock:
                self._draining = False
                items = list(self._open.values())
            for item in items:
                item.relay.stop()
            # Their ends (bytes, close lines) are recorded before the summary is written.
            stop_waiting = time.monotonic() + 2.0
            while self._active() and time.monotonic() < stop_waiting:
                self._pump_events(0.01)
            self._finish_listener()
        self._wakeup.close()

    def _still_open(self) -> bool:
        return self._active() > 0

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
