"""The listener seam (docs/contract.md, "The listener"): a forward's accept pipeline.

A listener accepts the clients of one listening socket, reads each one's PROXY header (with
``accept_proxy``), checks the access lists, connects to an upstream without blocking (in the
forward's order, failing over, skipping upstreams in back-off), sends our PROXY header (with
``send_proxy``) and hands the pair over to relaying. It reports what happened as `_events`
records, taken in batches; the forwarder does the rest (counting, metrics, log lines).

Two implementations, one interface (``configure``, ``fileno``, ``take``, ``active``,
``next_id``, ``stop``, ``close``):
- `LoopListener`: the compiled engine's loops do it all, in C, with no Python per connection;
- `PureListener`: the same in one Python thread with a selector, bridging each pair with any
  ``Bridge`` class (the pure engine's threads, or the compiled core's loops).
`open_listener` picks one: the loops, unless a capability they need is missing (then it says
which, for the log).
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Tuple, Type, Union

from . import _balance, _events, _proxy, _sni, _tls
from ._access import AccessList
from ._address import Address
from ._backend import Bridge as DefaultBridge
from ._backend import core, env_flag
from ._bridge import Bridge, BridgeResult, Detached, Plan, plan_of
from ._events import AcceptPaused, Dropped, Ended, Gone, Opened, Peer, Refused, TlsFailed, Unserved, UpstreamFailed
from ._resolve import is_no_address

log = logging.getLogger("tcptotcp")

# Accept errors that mean "out of a resource right now": back off instead of spinning.
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_SECONDS = 0.1
_PEEK_AGAIN_SECONDS = 0.005  # a ClientHello that came in parts: look again this soon
_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # a socket born non-blocking: no ioctl (not Windows)
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # macOS: TCP_KEEPALIVE
_PROXY_VERSIONS = {None: 0, "v1": 1, "v2": 2}


@dataclass(frozen=True)
class ForwardOptions:
    """What decides how a new client is served; ``Forwarder.reconfigure`` swaps it whole."""

    upstreams: Tuple[Address, ...]
    rate_check: int = 5
    idle_timeout: int = 7200
    activity: str = "both"
    half_close: bool = False
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
    max_fails: int = 1
    fail_window: float = 10.0
    routes: Tuple[Tuple[str, Address], ...] = ()  # --route-sni: (pattern, upstream)
    route_sni_strict: bool = False
    check_interval: Optional[float] = None
    check_rise: int = 2
    check_fall: int = 3
    max_per_client: Optional[int] = None
    rate_per_client: Optional[int] = None
    client_prefix6: int = 64
    bandwidth: Optional[int] = None  # bytes/s per direction of each bridge
    # Upstreams written as host names (see _resolve): `upstreams` holds their candidates, one
    # per address. `configured` is the forward's upstreams as written, `found` each name's
    # addresses now (by the upstream's text; empty: none yet, its candidate is NO_ADDRESS).
    configured: Tuple[Address, ...] = ()
    found: Tuple[Tuple[str, Tuple[Any, ...]], ...] = ()
    resolve_interval: float = 30.0
    # TLS (see _tls.Contexts): the context clients handshake with (termination) and the one we
    # handshake upstream with (origination); None: plaintext on that side. The loops' own
    # contexts for termination, and why the loops cannot do the handshakes (None: they can).
    tls_server: Optional[ssl.SSLContext] = None
    tls_client: Optional[ssl.SSLContext] = None
    tls_certs: Tuple[Tuple[Tuple[str, ...], ssl.SSLContext], ...] = ()
    tls_loops_lack: Optional[str] = None
    upstream_sni: Optional[str] = None
    upstream_insecure: bool = False
    tls_handshake_timeout: float = 10.0

    @property
    def tls(self) -> bool:
        """TLS on either side."""
        return self.tls_server is not None or self.tls_client is not None

    def tls_names(self) -> Tuple[Tuple[Optional[str], bool], ...]:
        """Origination: each upstream's host name (SNI and the certificate check; None for a
        Unix socket), and whether it is an IP literal (checked, not sent as SNI)."""
        names: List[Tuple[Optional[str], bool]] = []
        for u in self.all_upstreams:
            name = self.upstream_sni or _tls.upstream_hostname(u)
            names.append((name, name is not None and _is_ip(name)))
        return tuple(names)

    @property
    def bridge_options(self) -> Dict[str, Any]:
        """The keyword arguments of a `Bridge` for this forward (`bandwidth` only when set: a
        custom bridge_class may predate the keyword)."""
        options: Dict[str, Any] = {
            "rate_check_seconds": self.rate_check,
            "keep_alive_delay_time_seconds": self.idle_timeout,
            "activity": self.activity,
            "half_close": self.half_close,
        }
        if self.bandwidth:
            options["bandwidth"] = self.bandwidth
        return options

    @property
    def unresolved(self) -> FrozenSet[str]:
        """The texts of the upstream names without an address (yet)."""
        return frozenset(text for text, addresses in self.found if not addresses)

    @property
    def all_upstreams(self) -> Tuple[Address, ...]:
        """The forward's own upstreams, then each route's: one index space for both."""
        return self.upstreams + tuple(address for _, address in self.routes)

    @property
    def upstream_weights(self) -> Tuple[int, ...]:
        return tuple(u.weight for u in self.all_upstreams)

    @cached_property
    def upstream_hashes(self) -> Tuple[int, ...]:
        """Each upstream's identity for ``balance="source"``: a hash of its text."""
        return tuple(_balance.hash_bytes(u.text.encode("utf-8", "surrogateescape")) for u in self.all_upstreams)

    @property
    def rate_spacing_ns(self) -> int:
        """--rate-per-client as the bucket's spacing (0: no rate limit)."""
        return 0 if not self.rate_per_client else max(1, 1_000_000_000 // self.rate_per_client)

    @property
    def plan(self) -> Plan:
        return plan_of(
            self.rate_check, self.idle_timeout, self.activity, self.half_close, bandwidth=self.bandwidth or 0
        )


def tls_fields(tls: _tls.Contexts) -> Dict[str, Any]:
    """ForwardOptions' TLS fields from a forward's contexts."""
    return dict(tls_server=tls.server, tls_client=tls.client, tls_certs=tls.certs, tls_loops_lack=tls.loops_lack)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def no_delay(sock: socket.socket) -> None:
    """Forward each read at once: the sending peer already made its own Nagle choice, and a
    relay that delays a message's tail behind a delayed ACK adds 40 ms to request/response."""
    if sock.family in _IP_FAMILIES:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _fresh_socket_option(family: int, option: int) -> int:
    """A TCP option's value on a new socket: the system's default (its sysctl), to go back to."""
    with socket.socket(family, socket.SOCK_STREAM) as fresh:
        return fresh.getsockopt(socket.IPPROTO_TCP, option)


def dead_peer_sockopts(options: ForwardOptions, family: int, reset: bool = False) -> List[Tuple[int, int, int]]:
    """(level, name, value) for the keepalive and user timeout options on a socket of `family`;
    with `reset` (a listener, whose accepted sockets inherit what it has), options that are None
    go back to a fresh socket's."""
    if family not in _IP_FAMILIES:
        return []
    opts: List[Tuple[int, int, int]] = []
    if options.keepalive is not None:
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        if _KEEPIDLE is not None:
            opts.append((socket.IPPROTO_TCP, _KEEPIDLE, options.keepalive))
        for name, value in (("TCP_KEEPINTVL", options.keepalive_interval), ("TCP_KEEPCNT", options.keepalive_count)):
            option = getattr(socket, name, None)
            if option is None:
                continue
            if value is None and reset:
                value = _fresh_socket_option(family, option)
            if value is not None:
                opts.append((socket.IPPROTO_TCP, option, value))
    elif reset:
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0))
    if options.user_timeout is not None:
        # Unacknowledged data older than this ends the connection (ETIMEDOUT): a peer that
        # vanished without FIN or RST is noticed even while bytes are in flight.
        opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(options.user_timeout * 1000)))
    elif reset and hasattr(socket, "TCP_USER_TIMEOUT"):
        opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0))  # 0: the system's default
    return opts


def upstream_sockopts(options: ForwardOptions) -> List[Tuple[int, int, int]]:
    """Every IP upstream socket's options (the loops skip them for a Unix upstream)."""
    return [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] + dead_peer_sockopts(options, socket.AF_INET)


def prepare_listening_socket(sock: socket.socket, options: ForwardOptions) -> None:
    """Accepted sockets inherit these from the listener: no syscalls per client."""
    no_delay(sock)  # each read forwarded at once (see no_delay)
    # reset: a reconfigure() that drops an option must take it off the listener too.
    for level, name, value in dead_peer_sockopts(options, sock.family, reset=True):
        sock.setsockopt(level, name, value)


class Wakeup:
    """A socket pair to wake a selector loop: `set()` from any thread (a signal handler too),
    `clear()` from the loop once woken; `fileno()` to watch."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        return self._r.fileno()

    def set(self) -> None:
        try:
            self._w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or closed

    def clear(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class LoopSettings(NamedTuple):
    """ForwardOptions as `_core.listen` takes them: numbers and numeric addresses only."""

    upstreams: Tuple[Tuple[int, Any, str], ...]  # (family, sockaddr, the forward's name for it)
    weights: Tuple[int, ...]
    down: Tuple[bool, ...]  # marked down from the start: a name without an address yet
    balance: str
    upstream_backoff: float
    max_fails: int
    fail_window: float
    max_per_client: int  # 0: no limit
    rate_spacing_ns: int  # 0: no rate limit
    rate_burst: int
    client_prefix6: int
    serving: int  # upstreams[:serving] are the forward's own, the rest the routes'
    routes: Tuple[str, ...]  # the route patterns, in the routes' order
    route_strict: bool
    send_proxy: int  # 0, 1 or 2
    accept_proxy: bool
    proxy_timeout: float
    connect_timeout: float
    sockopts: List[Tuple[int, int, int]]
    plan: Plan
    splice: bool
    max_connections: int
    access: Optional[Tuple[Any, ...]]
    # TLS: termination's (context, names) per certificate, the first the default; origination's
    # context and each upstream's (host name, is an IP); both handshakes' time limit.
    tls_certs: Tuple[Tuple[ssl.SSLContext, Tuple[str, ...]], ...]
    tls_client: Optional[ssl.SSLContext]
    tls_names: Tuple[Tuple[Optional[str], bool], ...]
    tls_handshake_timeout: float


def loop_settings(options: ForwardOptions) -> LoopSettings:
    return LoopSettings(
        upstreams=tuple((u.family, u.sockaddr, u.text) for u in options.all_upstreams),
        weights=options.upstream_weights,
        down=tuple(is_no_address(u) for u in options.all_upstreams),
        balance=options.balance,
        upstream_backoff=options.upstream_backoff,
        max_fails=options.max_fails,
        fail_window=options.fail_window,
        max_per_client=options.max_per_client or 0,
        rate_spacing_ns=options.rate_spacing_ns,
        rate_burst=options.rate_per_client or 0,
        client_prefix6=options.client_prefix6,
        serving=len(options.upstreams),
        routes=tuple(pattern for pattern, _ in options.routes),
        route_strict=options.route_sni_strict,
        send_proxy=_PROXY_VERSIONS[options.send_proxy],
        accept_proxy=options.accept_proxy,
        proxy_timeout=options.proxy_timeout,
        connect_timeout=options.connect_timeout,
        sockopts=upstream_sockopts(options),
        plan=options.plan,
        splice=True,
        max_connections=options.max_connections,
        access=options.access.tables() if options.access else None,
        tls_certs=tuple((context, names) for names, context in options.tls_certs),
        tls_client=options.tls_client,
        tls_names=options.tls_names() if options.tls_client is not None else (),
        tls_handshake_timeout=options.tls_handshake_timeout,
    )


class LoopListener:
    """The loops' listener (`_core.Listener`) behind the seam's interface."""

    def __init__(self, sock: socket.socket, options: ForwardOptions, first_id: int) -> None:
        assert core is not None
        self._core = core.listen(sock, loop_settings(options), first_id)

    def configure(self, options: ForwardOptions) -> None:
        lacking = loops_lack_tls(options)
        if lacking is not None:
            raise ValueError(f"the loops serve this forward, and {lacking}: that TLS needs a restart")
        self._core.configure(loop_settings(options))

    def reserve(self, count: int) -> None:
        self._core.reserve(count)

    def set_checked(self, index: int, down: bool) -> None:
        self._core.set_checked(index, down)

    def upstream_down(self, index: int) -> bool:
        return bool(self._core.upstream_down(index))

    @property
    def clients(self) -> int:
        count: int = self._core.clients
        return count

    def fileno(self) -> int:
        fd: int = self._core.fileno()
        return fd

    @property
    def active(self) -> int:
        count: int = self._core.active
        return count

    @property
    def next_id(self) -> int:
        number: int = self._core.next_id
        return number

    def take(self, brief: bool = False) -> List[Any]:
        events: List[Any] = self._core.take(brief)
        return events

    def recheck(self) -> None:
        self._core.recheck()

    def stop(self, cancel_connects: bool = True) -> None:
        self._core.stop(cancel_connects)

    def close(self) -> None:
        self._core.close()


def loops_lack(options: ForwardOptions, bridge_class: Type[Bridge]) -> Optional[Tuple[str, bool]]:
    """Why the loops cannot serve this forward, and whether that is a fall-back worth an
    operator's attention (the loops lack a capability) rather than a choice: None when they can."""
    if core is None:
        return ("the compiled core is not installed", False)
    lacking_tls = loops_lack_tls(options)
    if lacking_tls is not None:
        return (lacking_tls, True)
    if bridge_class is not DefaultBridge:
        return (f"bridges of {bridge_class.__name__} run outside the loops", False)
    if env_flag("TCPTOTCP_ACCEPT_IN_PYTHON"):
        return ("TCPTOTCP_ACCEPT_IN_PYTHON is set", False)
    if len(options.all_upstreams) > core.LISTENER_MAX_UPSTREAMS:
        return (f"the loops take at most {core.LISTENER_MAX_UPSTREAMS} upstreams", True)
    return None


def loops_lack_tls(options: ForwardOptions) -> Optional[str]:
    """Why the loops cannot do this forward's TLS handshakes; None where they can (or it has no TLS)."""
    if not options.tls:
        return None
    if options.tls_loops_lack is not None:
        return options.tls_loops_lack
    assert core is not None
    unavailable: Optional[str] = core.tls_unavailable()
    return f"the loops cannot use OpenSSL: {unavailable}" if unavailable is not None else None


def open_listener(
    sock: socket.socket, options: ForwardOptions, bridge_class: Type[Bridge], first_id: int = 1
) -> Union[LoopListener, PureListener]:
    """The loops' listener where they can serve the forward, else the pure one (and the log says why)."""
    lacking = loops_lack(options, bridge_class)
    if lacking is None:
        try:
            return LoopListener(sock, options, first_id)
        except (OSError, ValueError) as exc:
            lacking = (f"the loops cannot watch this socket ({exc})", True)
    why, fall_back = lacking
    log.log(logging.WARNING if fall_back else logging.DEBUG, "accepting in Python: %s", why)
    return PureListener(sock, options, bridge_class, first_id)


class _Client:
    """A client between accept and its bridge: reading its PROXY header, or connecting."""

    __slots__ = (
        "conn_id",
        "fd",
        "peer",
        "options",
        "destination",
        "header",
        "upstream",
        "upstream_sock",
        "to_send",
        "deadline",
        "tried",
        "skip",
        "client_key",
        "state",
        "reading_hello",
        "among",
        "tls",
        "handshaking",
        "tls_info",
    )

    def __init__(self, conn_id: int, fd: int, peer: Peer, options: ForwardOptions) -> None:
        self.conn_id = conn_id
        self.fd = fd  # the accepted client, as a bare fd until its bridge adopts it
        self.peer = peer  # its address: the PROXY header's source once one was read
        self.options = options  # as they were when it arrived
        self.destination: Optional[Any] = None  # the address it connected to (PROXY header's)
        self.header = b""  # PROXY header bytes read so far
        self.upstream: Optional[Address] = None
        self.upstream_sock: Optional[socket.socket] = None
        self.to_send = b""  # our PROXY header, not yet all sent upstream
        self.deadline = 0.0
        self.tried: List[int] = []  # upstream indices tried, the last one now
        self.skip: List[int] = []  # down when it was admitted
        self.client_key: Optional[bytes] = None  # holds a slot in the client table under this key
        self.state: Optional[_balance.UpstreamState] = None  # its upstream's, once opened
        self.reading_hello = False  # peeking at its ClientHello (a forward that routes by SNI)
        self.among: List[int] = []  # the upstreams to try once its TLS handshake is done
        # The client's socket object once one owns its fd: its TLS socket (termination), or
        # the plain one a TLS bridge relays through.
        self.tls: Optional[socket.socket] = None
        self.handshaking = ""  # "client" or "upstream": a TLS handshake under way
        self.tls_info: Optional[_tls.TlsInfo] = None  # what its handshakes negotiated


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class BridgeRelay:
    """A ``Bridge`` as `Opened.relay` (the pure listener's, and the forwarder's adopted ones):
    ``stop()``, ``counts()`` and ``detach()``."""

    __slots__ = ("bridge",)

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def stop(self) -> None:
        self.bridge.stop()

    def counts(self) -> Tuple[int, int]:
        return self.bridge.counts

    def detach(self, timeout: float) -> Optional[Detached]:
        return self.bridge.detach(timeout)


class PureListener:
    """The listener in one Python thread: a selector loop that accepts, checks, connects and
    starts a ``bridge_class`` bridge per client; its events are queued for `take()`."""

    def __init__(
        self, sock: socket.socket, options: ForwardOptions, bridge_class: Type[Bridge], first_id: int = 1
    ) -> None:
        self._sock = sock
        self._family = sock.family
        self.options = options
        self._bridge_class = bridge_class
        self._next_id = first_id
        self._lock = threading.Lock()
        self._events: List[Any] = []
        self._active = 0
        self._stopping = False  # accepts no more
        self._cancelling = False  # and gives up on clients still on their way
        self._stopped = threading.Event()  # the thread no longer touches the listening socket
        self._pending: Dict[int, Tuple[_Client, str]] = {}  # fd watched -> (client, what for)
        self._timers: List[Tuple[float, int, _Client]] = []  # (deadline, conn_id, client)
        self._states: Dict[Any, _balance.UpstreamState] = {}  # by (family, sockaddr)
        self._upstream_states = self._states_for(options)
        self._clients = _balance.ClientTable()
        self._turn = 0  # leastconn's first look, turning (ties go round)
        self._hello_waiting: List[_Client] = []  # ClientHellos not yet whole (see _peek_again)
        self._accept_paused_until = 0.0
        self._reserved = 0  # see reserve()
        self._events_ready = Wakeup()  # take() has something
        self._wakeup = Wakeup()  # the thread has something to look at
        self._told = False
        self._thread = threading.Thread(target=self._run, name="tcptotcp-accept", daemon=True)
        self._thread.start()

    # -- the seam ------------------------------------------------------------------------

    def configure(self, options: ForwardOptions) -> None:
        states = self._states_for(options)
        with self._lock:
            # One assignment each: the thread sees the old or the new, whole.
            self._upstream_states = states
            self.options = options
        self._wake()

    def _states_for(self, options: ForwardOptions) -> List[_balance.UpstreamState]:
        """The upstreams' states: an address the forward named before keeps its own (health,
        bridges open, round robin turn)."""
        states = []
        for u in options.all_upstreams:
            key = (u.family, u.sockaddr)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _balance.UpstreamState()
                # A name without an address yet: down before any client can be sent to it.
                state.checked_down = is_no_address(u)
            states.append(state)
        kept = {(u.family, u.sockaddr) for u in options.all_upstreams}
        self._states = {k: v for k, v in self._states.items() if k in kept}
        return states

    def reserve(self, count: int) -> None:
        """`count` bridges opened elsewhere (a predecessor's, adopted) count against the
        connection limit, until the next call."""
        self._reserved = count
        self._wake()

    def set_checked(self, index: int, down: bool) -> None:
        """The active checks marked the current options' upstream `index` down (or up)."""
        states = self._upstream_states
        if 0 <= index < len(states):
            states[index].checked_down = down

    def upstream_down(self, index: int) -> bool:
        return self._upstream_states[index].is_down(time.monotonic())

    @property
    def clients(self) -> int:
        """Entries the client table holds (after dropping those that hold nothing)."""
        with self._lock:
            return self._clients.held(time.monotonic_ns())

    def fileno(self) -> int:
        return self._events_ready.fileno()

    @property
    def active(self) -> int:
        return self._active

    @property
    def next_id(self) -> int:
        return self._next_id

    def take(self, brief: bool = False) -> List[Any]:
        with self._lock:
            events, self._events = self._events, []
            self._told = False
            self._events_ready.clear()
        # A bridge that opened and ended since the last take is reported once, as ended
        # (as the loops' listener does).
        opened_now = {e.conn_id: e for e in events if type(e) is Opened}
        both = {e.conn_id for e in events if type(e) is Ended and e.conn_id in opened_now}
        if not both:
            return events
        out: List[Any] = []
        count = up = down = 0
        for e in events:
            if getattr(e, "conn_id", None) in both:
                if type(e) is Opened:
                    continue
                if type(e) is Ended:
                    if brief:
                        count, up, down = count + 1, up + e.bytes_up, down + e.bytes_down
                        continue
                    e = e._replace(announced=False, tls=opened_now[e.conn_id].tls)
            out.append(e)
        if count:
            out.append(Gone(count, up, down))
        return out

    def recheck(self) -> None:
        """Nothing to do: its selector is level-triggered and not exclusive, so it sees what is
        queued on its next wait, whoever else watched the socket."""

    def stop(self, cancel_connects: bool = True) -> None:
        with self._lock:
            self._stopping = True
            self._cancelling = self._cancelling or cancel_connects
        self._wake()
        if threading.current_thread() is not self._thread and not self._stopped.wait(10.0):
            log.error("the accept thread did not stop in time")
        if cancel_connects:
            self._wake()  # (it drops what is pending at once, and exits)

    def close(self) -> None:
        if self._active:
            raise OSError(errno.EBUSY, "the listener still has clients")
        self.stop(cancel_connects=True)
        self._thread.join(5.0)
        self._events_ready.close()
        self._wakeup.close()

    # -- the thread -----------------------------------------------------------------------

    def _emit(self, event: Any, gone: Optional[_Client] = None) -> None:
        """Queue an event; `gone`: the client it ends, whose slot and counts it gives back."""
        with self._lock:
            self._events.append(event)
            if gone is not None:
                self._active -= 1
                if gone.client_key is not None:
                    self._clients.release(gone.client_key)
                    gone.client_key = None
                if gone.state is not None:
                    gone.state.open -= 1
                    gone.state = None
            if not self._told:
                self._told = True
                self._events_ready.set()

    def _wake(self) -> None:
        self._wakeup.set()

    def _claim_results(self) -> Optional[int]:
        """On the compiled engine, this thread finishes ended bridges itself (an fd to watch):
        no hand-off to the results thread per client, and no GIL traffic between the two."""
        if core is None or getattr(self._bridge_class, "engine_name", "") != "cython":
            return None
        fd: Optional[int] = core.claim_results()  # None while another thread holds it
        return fd

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wakeup, selectors.EVENT_READ)
            results = self._claim_results()
            if results is not None:
                selector.register(results, selectors.EVENT_READ)
            listening = False
            try:
                while True:
                    if self._cancelling:
                        for client, _ in list(self._pending.values()):
                            self._drop_client(selector, client)
                        for client in self._hello_waiting:
                            self._drop_client(selector, client)
                        self._hello_waiting = []
                    if self._stopping and not self._stopped.is_set():
                        if listening:
                            selector.unregister(self._sock)
                            listening = False
                        self._stopped.set()
                    if self._stopping and not self._pending and not self._hello_waiting:
                        return  # (bridges still open end through their callbacks)
                    want = not self._stopping and self._may_accept()
                    if want != listening:
                        if want:
                            selector.register(self._sock, selectors.EVENT_READ)
                        else:
                            selector.unregister(self._sock)
                        listening = want
                    for key, _ in selector.select(self._select_timeout()):
                        if key.fileobj is self._sock:
                            self._accept_some(selector)
                        elif key.fileobj is self._wakeup:
                            self._wakeup.clear()
                        elif key.fileobj is results:
                            core.deliver_results()  # type: ignore[union-attr]
                        else:
                            self._ready(selector, key.fd)
                    self._expire(selector)
                    if self._hello_waiting:
                        self._peek_again(selector)
            finally:
                self._stopped.set()
                if results is not None:
                    core.release_results()  # type: ignore[union-attr]

    def _may_accept(self) -> bool:
        # At the connection limit, leave clients in the backlog rather than accepting and
        # dropping them; after EMFILE, wait a moment instead of spinning.
        limit = self.options.max_connections - self._reserved
        return self._active < limit and time.monotonic() >= self._accept_paused_until

    def _select_timeout(self) -> Optional[float]:
        timeout = _PEEK_AGAIN_SECONDS if self._hello_waiting else 1.0
        if self._timers:
            timeout = min(timeout, self._timers[0][0] - time.monotonic())
        if self._accept_paused_until > time.monotonic():
            timeout = min(timeout, self._accept_paused_until - time.monotonic())
        return max(0.0, timeout)

    # -- one client: accept, check, connect, hand over ------------------------------------

    def _accept_some(self, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # then let the other events of this turn run
            if not self._may_accept():
                return
            try:
                # The bare fd: no socket object, no blocking-mode syscall; its bridge adopts it.
                fd, sockaddr = self._sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._emit(AcceptPaused(exc, _BACKOFF_SECONDS))
                    self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
                    return
                raise
            self._accept_paused_until = 0.0
            conn_id = self._next_id
            self._next_id += 1
            client = _Client(conn_id, fd, Peer(self._family, sockaddr), self.options)
            with self._lock:
                self._active += 1
            if client.options.accept_proxy:
                self._watch(selector, client, fd, selectors.EVENT_READ, "header")
                self._set_timer(client, client.options.proxy_timeout)
            else:
                self._admit(selector, client)

    def _admit(self, selector: selectors.BaseSelector, client: _Client) -> None:
        options = client.options
        access = options.access
        if access and not access.permits(client.peer.host):
            self._refuse(client, _events.NOT_ALLOWED)
            return
        if options.max_per_client or options.rate_per_client:
            why = self._client_admit(client)
            if why:
                self._refuse(client, why)
                return
        if not options.routes:
            self._serve(selector, client, range(len(options.upstreams)))
            return
        client.reading_hello = True
        self._watch(selector, client, client.fd, selectors.EVENT_READ, "header")
        self._set_timer(client, options.proxy_timeout)
        self._read_hello(selector, client)  # (it may have come with the PROXY header)

    def _peek_again(self, selector: selectors.BaseSelector) -> None:
        """Look again at the ClientHellos that were not whole: their sockets are not watched
        meanwhile (a peeked socket stays readable, and the selector would spin on it)."""
        waiting, self._hello_waiting = self._hello_waiting, []
        for client in waiting:
            if client.reading_hello and client.deadline:
                self._watch(selector, client, client.fd, selectors.EVENT_READ, "header")
                self._read_hello(selector, client)

    def _read_hello(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """Peek at the client's ClientHello (it reaches the upstream untouched); once it is
        whole, route by its server name."""
        with socket.socket(self._family, socket.SOCK_STREAM, 0, client.fd) as view:
            try:
                seen = view.recv(_sni.MAX_INPUT, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._unwatch(selector, client.fd)
                self._refuse(client, _events.HELLO_NOT_READ.format(exc.strerror or exc))
                return
            finally:
                view.detach()
        if not seen:
            self._unwatch(selector, client.fd)
            self._refuse(client, _events.HELLO_CLOSED)
            return
        try:
            hello = _sni.parse_client_hello(seen)
        except _sni.SniError as exc:
            self._unwatch(selector, client.fd)
            self._refuse(client, _events.HELLO_BAD.format(exc))
            return
        if hello is None:  # all there is so far: look again in a moment
            self._unwatch(selector, client.fd)
            self._hello_waiting.append(client)
            return
        self._unwatch(selector, client.fd)
        client.deadline = 0.0  # its timer is void
        client.reading_hello = False
        options = client.options
        route = _sni.match_route(hello.server_name, [pattern for pattern, _ in options.routes])
        if route < 0 and options.route_sni_strict:
            self._refuse(client, _events.no_route(hello.server_name))
            return
        serving = len(options.upstreams)
        self._serve(selector, client, [serving + route] if route >= 0 else range(serving))

    def _serve(self, selector: selectors.BaseSelector, client: _Client, among: Iterable[int]) -> None:
        """Admitted (and routed): the TLS handshake with the client first, if the forward
        terminates TLS, then the upstreams `among`."""
        if client.options.tls_server is None:
            self._connect_among(selector, client, among)
            return
        client.among = list(among)
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, client.fd)
        try:
            sock.setblocking(False)
            client.tls = client.options.tls_server.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            if sock.fileno() >= 0:
                sock.detach()  # still a bare fd: _refuse closes it
            else:
                client.fd = -1  # closed with the failed wrap
            client.handshaking = "client"
            self._tls_failed(selector, client, exc)
            return
        client.handshaking = "client"
        self._set_timer(client, client.options.tls_handshake_timeout)
        self._handshake(selector, client)

    def _start_upstream_tls(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """Connected (and our PROXY header sent, in plaintext): the TLS handshake upstream, if
        the forward originates TLS; then the bridge."""
        options = client.options
        if options.tls_client is None:
            self._bridge(client)
            return
        sock = client.upstream_sock
        assert sock is not None and client.upstream is not None
        client.handshaking = "upstream"
        hostname = options.upstream_sni or _tls.upstream_hostname(client.upstream)
        try:
            client.upstream_sock = options.tls_client.wrap_socket(
                sock, server_side=False, do_handshake_on_connect=False, server_hostname=hostname
            )
        except (OSError, ValueError) as exc:
            client.upstream_sock = sock if sock.fileno() >= 0 else None
            self._tls_failed(selector, client, exc)
            return
        self._set_timer(client, options.tls_handshake_timeout)
        self._handshake(selector, client)

    def _handshake(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """One step of a TLS handshake, without blocking: on to the next state once it is done."""
        side = client.handshaking
        sock = client.tls if side == "client" else client.upstream_sock
        assert isinstance(sock, ssl.SSLSocket)
        fd = sock.fileno()
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._rewatch(selector, client, fd, selectors.EVENT_READ, "tls")
            return
        except ssl.SSLWantWriteError:
            self._rewatch(selector, client, fd, selectors.EVENT_WRITE, "tls")
            return
        except (OSError, ValueError) as exc:  # (ssl.SSLError is an OSError)
            if fd in self._pending:
                self._unwatch(selector, fd)
            self._tls_failed(selector, client, exc)
            return
        if fd in self._pending:
            self._unwatch(selector, fd)
        client.deadline = 0.0  # its timer is void
        client.handshaking = ""
        if side == "client":
            client.tls_info = _tls.client_info(sock)
            self._connect_among(selector, client, client.among)
        else:
            client.tls_info = _tls.with_upstream(client.tls_info, sock)
            self._bridge(client)

    def _tls_failed(self, selector: selectors.BaseSelector, client: _Client, exc: BaseException) -> None:
        """A handshake failed (or timed out): the client is refused, or the upstream failed
        (and the next one is tried)."""
        side, client.handshaking = client.handshaking, ""
        text = _tls.failure_text(exc)
        self._emit(TlsFailed(client.conn_id, client.peer, side, _tls.failure_reason(exc), text))
        if side == "client":
            self._refuse(client, _events.TLS_FAILED.format(text))
            return
        client.deadline = 0.0
        sock, client.upstream_sock = client.upstream_sock, None
        if sock is not None:
            sock.close()
        self._upstream_failed(client, OSError(f"TLS handshake failed: {text}"))
        self._try_next_upstream(selector, client)

    def _connect_among(self, selector: selectors.BaseSelector, client: _Client, among: Iterable[int]) -> None:
        """Try the upstreams `among` (indices): those down (marked by failed connects or by the
        checks) are skipped unless every one of them is."""
        states = self._states_of(client)
        now = time.monotonic()
        candidates = set(among)
        down = {i for i in candidates if states[i].is_down(now)}
        skip = set(range(len(states))) - candidates
        client.skip = sorted(skip if down == candidates else skip | down)
        client.tried = []
        self._try_next_upstream(selector, client)

    def _states_of(self, client: _Client) -> List[_balance.UpstreamState]:
        # (A client accepted before a reload keeps its options, and their upstreams' states.)
        states = self._upstream_states
        upstreams = client.options.all_upstreams
        if client.options is not self.options or len(states) != len(upstreams):
            states = [self._states.get((u.family, u.sockaddr)) or _balance.UpstreamState() for u in upstreams]
        return states

    def _client_admit(self, client: _Client) -> str:
        """Take the client's place in the client table: '' if it may open a bridge now, else why not."""
        options = client.options
        key = _balance.client_key(client.peer.family, client.peer.sockaddr, options.client_prefix6)
        now = time.monotonic_ns()
        with self._lock:
            entry = self._clients.get(key, now)
            if entry is None:
                return _events.CLIENTS_FULL
            if options.max_per_client and entry.open >= options.max_per_client:
                return _events.PER_CLIENT
            if options.rate_per_client:
                tat = _balance.bucket_take(entry.tat, now, options.rate_spacing_ns, options.rate_per_client)
                if tat is None:
                    return _events.RATE_LIMITED
                entry.tat = tat
            entry.open += 1
        client.client_key = key
        return ""

    def _next_upstream(self, client: _Client) -> Optional[int]:
        options = client.options
        n = len(options.all_upstreams)
        left = [i for i in range(n) if i not in client.tried and i not in client.skip]
        if not left:
            return None
        client_hash = 0
        if options.balance == "source":
            key = _balance.client_key(client.peer.family, client.peer.sockaddr, options.client_prefix6)
            client_hash = _balance.hash_bytes(key)
        turn = self._turn
        self._turn = (turn + 1) % n
        return _balance.pick(
            options.balance,
            self._states_of(client),
            options.upstream_weights,
            options.upstream_hashes if options.balance == "source" else (),
            left,
            client.tried[-1] if client.tried else None,
            turn,
            client_hash,
        )

    def _try_next_upstream(self, selector: selectors.BaseSelector, client: _Client) -> None:
        while True:
            index = self._next_upstream(client)
            if index is None:
                break
            client.tried.append(index)
            upstream = client.options.all_upstreams[index]
            client.upstream = upstream
            try:
                sock = socket.socket(upstream.family, socket.SOCK_STREAM | _NONBLOCK)
                if not _NONBLOCK:
                    sock.setblocking(False)
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
                self._upstream_failed(client, exc)
                continue
            try:
                if upstream.family in _IP_FAMILIES:
                    for level, name, value in upstream_sockopts(client.options):
                        sock.setsockopt(level, name, value)
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
        client.deadline = 0.0  # a connect timer of the last attempt may still be queued: void it
        self._close_client(client)
        self._emit(Unserved(client.conn_id, client.peer, len(client.options.upstreams)), gone=client)

    def _upstream_failed(self, client: _Client, exc: OSError) -> None:
        """Report a failed connect; the max_fails-th within the fail window marks the upstream
        down for the back-off (passive health)."""
        upstream = client.upstream
        assert upstream is not None
        options = client.options
        state = self._states_of(client)[client.tried[-1]]
        marked = False
        if options.upstream_backoff > 0:
            now = time.monotonic()
            if state.fails == 0 or now - state.fails_since > options.fail_window:
                state.fails, state.fails_since = 0, now
            state.fails += 1
            if state.fails >= options.max_fails:
                state.fails = 0
                marked = state.down_until <= now
                state.down_until = now + options.upstream_backoff
        self._emit(UpstreamFailed(client.conn_id, client.peer, upstream.text, exc, marked))

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
        state = self._states_of(client)[client.tried[-1]]
        state.fails = 0
        state.down_until = 0.0
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
        self._start_upstream_tls(selector, client)

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
        with socket.socket(self._family, socket.SOCK_STREAM, 0, client.fd) as view:
            try:
                try:
                    seen = view.recv(_proxy.MAX_HEADER_BYTES - len(client.header), socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, _events.PROXY_NOT_READ.format(exc.strerror or exc))
                    return
                if not seen:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, _events.PROXY_CLOSED)
                    return
                try:
                    header = _proxy.parse(client.header + seen)
                except _proxy.ProxyHeaderError as exc:
                    self._unwatch(selector, client.fd)
                    self._refuse(client, _events.PROXY_BAD.format(exc))
                    return
                # A prefix of a header is all header: take it. A whole one: take just its bytes.
                take = len(seen) if header is None else header.length - len(client.header)
                client.header += view.recv(take)
            finally:
                view.detach()
        if header is None:
            if len(client.header) >= _proxy.MAX_HEADER_BYTES:
                self._unwatch(selector, client.fd)
                self._refuse(client, _events.PROXY_TOO_LONG)
            return
        self._unwatch(selector, client.fd)
        client.deadline = 0.0  # its timer is void
        if header.source is not None and header.family in _IP_FAMILIES:
            client.peer = Peer(header.family, header.source)
            client.destination = header.destination
        self._admit(selector, client)

    def _ready(self, selector: selectors.BaseSelector, fd: int) -> None:
        client, what = self._pending[fd]
        if what == "tls":
            self._handshake(selector, client)
            return
        if what == "header":
            if client.reading_hello:
                self._read_hello(selector, client)
            else:
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
            self._start_upstream_tls(selector, client)

    def _watch(self, selector: selectors.BaseSelector, client: _Client, fd: int, events: int, what: str) -> None:
        self._pending[fd] = (client, what)
        selector.register(fd, events)

    def _rewatch(self, selector: selectors.BaseSelector, client: _Client, fd: int, events: int, what: str) -> None:
        """Watch `fd` for `events` now, whether it was watched (for others) or not."""
        if fd in self._pending:
            self._pending[fd] = (client, what)
            selector.modify(fd, events)
        else:
            self._watch(selector, client, fd, events, what)

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
            if client.handshaking:  # a TLS handshake, with the client or the upstream
                sock = client.tls if client.handshaking == "client" else client.upstream_sock
                if sock is not None and sock.fileno() in self._pending:
                    self._unwatch(selector, sock.fileno())
                self._tls_failed(selector, client, TimeoutError("timed out"))
                continue
            if client.upstream_sock is None:  # still on its PROXY header or ClientHello
                if client.fd in self._pending:  # (not while a ClientHello waits to be looked at again)
                    self._unwatch(selector, client.fd)
                self._refuse(client, _events.HELLO_LATE if client.reading_hello else _events.PROXY_LATE)
                continue
            self._unwatch(selector, client.upstream_sock.fileno())
            self._fail_over(selector, client, socket.timeout("timed out"))

    def _drop_client(self, selector: selectors.BaseSelector, client: _Client) -> None:
        """A cancelling stop with a client still pending: give up on it."""
        for fd in [fd for fd, (c, _) in self._pending.items() if c is client]:
            self._unwatch(selector, fd)
        if client.upstream_sock is not None:
            client.upstream_sock.close()
        client.deadline = 0.0
        self._close_client(client)
        self._emit(Dropped(client.conn_id, client.peer), gone=client)

    @staticmethod
    def _close_client(client: _Client) -> None:
        """Close the client's connection (its TLS socket, or its bare fd)."""
        if client.tls is not None:
            client.tls.close()
        elif client.fd >= 0:
            os.close(client.fd)
        client.fd = -1

    def _refuse(self, client: _Client, why: str) -> None:
        client.deadline = 0.0
        self._close_client(client)
        self._emit(Refused(client.conn_id, client.peer, why), gone=client)

    def _bridge(self, client: _Client) -> None:
        upstream, sock = client.upstream, client.upstream_sock
        assert upstream is not None and sock is not None
        client.deadline = 0.0
        if self._cancelling:  # (a stop that cancels: nothing opens once it returned)
            sock.close()
            self._close_client(client)
            self._emit(Dropped(client.conn_id, client.peer), gone=client)
            return
        conn_id, peer = client.conn_id, client.peer
        options = client.options
        streams: Optional[Tuple[socket.socket, socket.socket]] = None
        try:
            if options.tls:
                # A TLS socket's bytes are not its fd's: the bridge relays through the objects.
                client_sock = client.tls or socket.socket(self._family, socket.SOCK_STREAM, 0, client.fd)
                client.tls = client_sock  # (closed as the client's from here on)
                streams = (client_sock, sock)
                bridge = self._bridge_class(client_sock, sock, **options.bridge_options)
            else:
                # Both sockets are ours: the bridge adopts their fds (no checks, dups or extra closes).
                bridge = self._bridge_class.from_fds(client.fd, sock.fileno(), **options.bridge_options)
        except Exception as exc:  # out of fds or threads (or a custom bridge_class failed)
            # Or a TLS client reset right after its handshake (a prober, `openssl s_time`, one
            # that leaves its session tickets unread): a bridge that ended at once, as a plain
            # bridge whose client resets does, not a refusal.
            reset = client.tls is not None and not _connected(client.tls)
            self._close_client(client)
            sock.close()
            if reset:
                self._emit(Ended(conn_id, peer, upstream.text, 0, 0, "error", 0.0, False, client.tls_info), gone=client)
                return
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
            self._emit(Refused(conn_id, peer, _events.BRIDGE_NOT_STARTED.format(exc)), gone=client)
            return
        upstream_fd = -1 if streams is not None else sock.detach()  # the bridge's now
        state = self._states_of(client)[client.tried[-1]]
        with self._lock:
            state.open += 1
            client.state = state
        bridge.add_done_callback(lambda result: self._bridge_ended(client, upstream.text, result))
        # before any end of it
        self._emit(Opened(conn_id, peer, upstream.text, BridgeRelay(bridge), client.tls_info))
        try:
            bridge.start()
        except Exception as exc:  # out of threads
            log.error("#%d %s: bridge not started: %s", conn_id, peer, exc)
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                self._accept_paused_until = time.monotonic() + _BACKOFF_SECONDS
            if streams is not None:
                for stream in streams:
                    stream.close()
            else:
                for fd in (client.fd, upstream_fd):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._emit(Ended(conn_id, peer, upstream.text, 0, 0, "error", 0.0, True), gone=client)

    def _bridge_ended(self, client: _Client, upstream: str, result: BridgeResult) -> None:
        """From the thread that finishes bridges, once per bridge."""
        self._emit(
            Ended(
                client.conn_id,
                client.peer,
                upstream,
                result.bytes_1_to_2,
                result.bytes_2_to_1,
                result.reason,
                result.seconds,
                True,
            ),
            gone=client,
        )
