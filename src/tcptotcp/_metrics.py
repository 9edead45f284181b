"""Prometheus metrics for the forwarder, served over HTTP at ``/metrics``.

``prometheus_client`` is an optional extra (``tcptotcp[metrics]``): it is imported only when a
``Metrics`` is made, so the rest of the package, and this module, import without it.

Accounting, per forward (label ``listen``), for the forwarder to call once per event:

* ``accepted()`` for each client accepted; ``upstream_failed()`` for each failed upstream
  connect attempt (a client that fails over to another upstream counts one per attempt);
  ``refused()`` for a client closed without a bridge for any other reason (access lists, PROXY
  header, no bridge could be started); ``opened()`` when its bridge started.
* ``ended()`` once per opened bridge, from its done callback.

``tcptotcp_connections_active`` is therefore exactly the bridges running (``opened`` minus
``ended``), with ``opened = active + sum(bridges_ended)``. Clients waiting for their upstream are
not in the gauge: that wait is bounded by the connect timeout, and a gauge moved from four call
sites would drift as soon as one was missed.
"""

from __future__ import annotations

import http.server
import logging
import selectors
import socket
import socketserver
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Type
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "DURATION_BUCKETS",
    "REASONS",
    "ForwardMetrics",
    "Metrics",
    "MetricsUnavailable",
    "Ready",
    "StatusServer",
    "parse_hostport",
]

#: Bridge lifetimes run from a client that hangs up at once (ms) to long sessions (an hour and more).
DURATION_BUCKETS: Tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: A bridge's end reasons (``BridgeResult.reason``): created up front so each series exists at 0,
#: which ``rate()`` and absence alerts need.
REASONS: Tuple[str, ...] = ("closed", "idle", "error", "stopped", "detached")

log = logging.getLogger("tcptotcp")

_MISSING = "--metrics needs the prometheus_client package: pip install 'tcptotcp[metrics]'"


class MetricsUnavailable(RuntimeError):
    """``prometheus_client`` is not installed; the message says how to install it."""


def parse_hostport(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[v6addr]:PORT`` for the metrics listener, unresolved.

    An empty host (``:9464``, the exporters' convention) means every IPv4 interface.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected host:port or [v6addr]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"{text!r}: empty IPv6 address in brackets")
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is out of range")
    return host, port


class ForwardMetrics:
    """One forward's metric children, their labels resolved once so each event is one call.

    Thread-safe: the forwarder's loop and the engine threads (``ended``) call it concurrently.
    """

    __slots__ = (
        "listen",
        "upstream",
        "_accepted",
        "_refused",
        "_refused_family",
        "_active",
        "_bytes_up",
        "_bytes_down",
        "_duration",
        "_failures_family",
        "_ended_family",
        "_failures",
        "_ended",
        "_up_family",
        "_up",
        "_resolutions_family",
        "_resolutions",
        "_tls_failures_family",
        "_tls_failures",
    )

    def __init__(self, owner: Metrics, listen: str, upstream: Optional[str]) -> None:
        self.listen = listen
        self.upstream = upstream
        self._accepted: Counter = owner._accepted.labels(listen)
        self._refused_family: Counter = owner._refused
        self._refused: Dict[str, Counter] = {}
        self._active: Gauge = owner._active.labels(listen)
        self._bytes_up: Counter = owner._bytes_up.labels(listen)
        self._bytes_down: Counter = owner._bytes_down.labels(listen)
        self._duration: Histogram = owner._duration.labels(listen)
        self._failures_family: Counter = owner._upstream_failures
        self._ended_family: Counter = owner._ended
        self._failures: Dict[str, Counter] = {}
        self._ended: Dict[str, Counter] = {reason: owner._ended.labels(listen, reason) for reason in REASONS}
        if upstream is not None:
            self._failures[upstream] = owner._upstream_failures.labels(listen, upstream)
        self._up_family: Gauge = owner._upstream_up
        self._up: Dict[str, Gauge] = {}
        self._resolutions_family: Counter = owner._resolutions
        self._resolutions: Dict[Tuple[str, str], Counter] = {}
        self._tls_failures_family: Counter = owner._tls_failures
        self._tls_failures: Dict[Tuple[str, str], Counter] = {}

    def tls_failed(self, side: str, reason: str) -> None:
        """A TLS handshake failed: `side` is ``client`` (ours as the server) or ``upstream``;
        `reason` one of ``_tls.FAILURE_REASONS`` or ``other``."""
        key = (side, reason)
        child = self._tls_failures.get(key)
        if child is None:
            child = self._tls_failures[key] = self._tls_failures_family.labels(self.listen, side, reason)
        child.inc()

    def upstreams(self, texts: Sequence[str], is_up: Callable[[str], bool]) -> None:
        """The forward's upstreams now: ``tcptotcp_upstream_up`` asks `is_up` at each scrape
        (1 or 0); upstreams no longer named leave the exposition."""
        for text in set(self._up) - set(texts):
            if self._up.pop(text, None) is not None:
                try:
                    self._up_family.remove(self.listen, text)
                except KeyError:  # (gone already)
                    pass
        for text in texts:
            if text not in self._up:
                child = self._up[text] = self._up_family.labels(self.listen, text)
                child.set_function(_up_function(is_up, text))

    def resolved(self, upstream: str, result: str) -> None:
        """An upstream written as a host name was looked up again: `result` is ``changed``
        (new addresses), ``unchanged`` or ``failed`` (the last good ones kept)."""
        key = (upstream, result)
        child = self._resolutions.get(key)
        if child is None:
            child = self._resolutions[key] = self._resolutions_family.labels(self.listen, upstream, result)
        child.inc()

    def accepted(self) -> None:
        """A client was accepted."""
        self._accepted.inc()

    def refused(self, reason: str = "other") -> None:
        """An accepted client was closed without a bridge, not for an upstream failure: `reason`
        is the refusal's kind (``_events.Refused.kind``)."""
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self._refused_family.labels(self.listen, reason)
        child.inc()

    def upstream_failed(self, upstream: Optional[str] = None) -> None:
        """An accepted client's upstream connect failed or timed out (the client was closed).

        `upstream` defaults to the one given to ``Metrics.forward()``.
        """
        name = self.upstream if upstream is None else upstream
        if name is None:
            raise ValueError(f"{self.listen}: upstream_failed() needs the upstream (none given to forward())")
        child = self._failures.get(name)
        if child is None:
            child = self._failures[name] = self._failures_family.labels(self.listen, name)
        child.inc()

    def opened(self) -> None:
        """A client's bridge started: it counts as active until its ``ended()``."""
        self._active.inc()

    def ended(self, reason: str, bytes_up: int, bytes_down: int, seconds: float) -> None:
        """An opened bridge ended (its ``BridgeResult``): bytes client->upstream, back, lifetime."""
        self._active.dec()
        self._bytes_up.inc(bytes_up)
        self._bytes_down.inc(bytes_down)
        self._duration.observe(seconds)
        child = self._ended.get(reason)
        if child is None:
            child = self._ended[reason] = self._ended_family.labels(self.listen, reason)
        child.inc()


def _up_function(is_up: Callable[[str], bool], text: str) -> Callable[[], float]:
    return lambda: 1.0 if is_up(text) else 0.0


class Metrics:
    """The forwarder's metrics in a registry of their own.

    Not the global registry: several instances (tests, several forwards in one process) would
    clash on names there, and library users' own metrics stay out of ours.
    """

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise MetricsUnavailable(_MISSING) from None

        self.registry: CollectorRegistry = CollectorRegistry()
        reg = self.registry
        listen = ("listen",)
        self._accepted = Counter("tcptotcp_connections_accepted", "Clients accepted.", listen, registry=reg)
        self._refused = Counter(
            "tcptotcp_connections_refused",
            "Accepted clients closed without a bridge, other than for an upstream failure, by reason.",
            ("listen", "reason"),
            registry=reg,
        )
        self._upstream_up = Gauge(
            "tcptotcp_upstream_up",
            "1 while an upstream gets new clients, 0 while it is marked down (failed connects or checks).",
            ("listen", "upstream"),
            registry=reg,
        )
        self._resolutions = Counter(
            "tcptotcp_upstream_resolutions",
            "Lookups of upstreams written as host names, by result: changed, unchanged, failed.",
            ("listen", "upstream", "result"),
            registry=reg,
        )
        self._tls_failures = Counter(
            "tcptotcp_tls_handshake_failures",
            "TLS handshakes that failed, by side (client, upstream) and the SSL error's reason.",
            ("listen", "side", "reason"),
            registry=reg,
        )
        self._active = Gauge("tcptotcp_connections_active", "Bridges running now.", listen, registry=reg)
        self._upstream_failures = Counter(
            "tcptotcp_upstream_connect_failures",
            "Upstream connects that failed or timed out (the client was closed).",
            ("listen", "upstream"),
            registry=reg,
        )
        self._bytes_up = Counter(
            "tcptotcp_bytes_up", "Bytes forwarded client to upstream, by ended bridges.", listen, registry=reg
        )
        self._bytes_down = Counter(
            "tcptotcp_bytes_down", "Bytes forwarded upstream to client, by ended bridges.", listen, registry=reg
        )
        self._ended = Counter("tcptotcp_bridges_ended", "Bridges ended, by reason.", ("listen", "reason"), registry=reg)
        self._duration = Histogram(
            "tcptotcp_bridge_duration_seconds", "Bridge lifetimes.", listen, registry=reg, buckets=tuple(buckets)
        )
        self._forwards: Dict[str, ForwardMetrics] = {}
        self._lock = threading.Lock()
        self._server: Optional[StatusServer] = None

    # -- recording ----------------------------------------------------------------------

    def forward(self, listen: str, upstream: Optional[str] = None) -> ForwardMetrics:
        """The children for one forward, made on first use (its series then export as 0).

        The same object for the same `listen`; `upstream`, if given, is the default for
        ``upstream_failed()`` and its failure series is created at once.
        """
        with self._lock:
            fm = self._forwards.get(listen)
            if fm is None:
                fm = self._forwards[listen] = ForwardMetrics(self, listen, upstream)
            return fm

    def accepted(self, listen: str) -> None:
        self.forward(listen).accepted()

    def refused(self, listen: str, reason: str = "other") -> None:
        self.forward(listen).refused(reason)

    def upstream_failed(self, listen: str, upstream: str) -> None:
        self.forward(listen).upstream_failed(upstream)

    def opened(self, listen: str) -> None:
        self.forward(listen).opened()

    def ended(self, listen: str, reason: str, bytes_up: int, bytes_down: int, seconds: float) -> None:
        self.forward(listen).ended(reason, bytes_up, bytes_down, seconds)

    def counters(self) -> List[Tuple[str, Dict[str, str], float]]:
        """Every counter's value by labels: what a successor process continues from (see
        ``carry``). The duration histogram and the gauges start afresh."""
        values = []
        for family in self.registry.collect():
            if family.type != "counter":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    values.append((family.name, dict(sample.labels), float(sample.value)))
        return values

    def carry(self, values: Sequence[Any]) -> None:
        """Add a predecessor's ``counters()``; names this version does not have are skipped."""
        families = {
            counter._name: counter  # (prometheus_client keeps the name without "_total")
            for counter in (self._accepted, self._refused, self._upstream_failures, self._bytes_up)
            + (self._bytes_down, self._ended, self._tls_failures)
        }
        for name, labels, value in values:
            family = families.get(name)
            if family is None or value <= 0:
                continue
            try:
                family.labels(**labels).inc(value)
            except ValueError:  # its labels differ in this version
                continue

    def exposition(self, accept: str = "") -> Tuple[bytes, str]:
        """(body, content type) for a scrape with this ``Accept`` header (text format by default)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- serving ------------------------------------------------------------------------

    def serve(self, host: str, port: int, ready: Optional[Ready] = None) -> Tuple[str, int]:
        """Serve ``/metrics`` (and the health endpoints, see `StatusServer`) from a daemon
        thread; returns the bound (host, port)."""
        if self._server is not None:
            raise RuntimeError("metrics are already being served")
        self._server = StatusServer(host, port, self, ready)
        return self._server.address

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """The bound (host, port) while serving, else None."""
        return None if self._server is None else self._server.address

    def close(self) -> None:
        """Stop serving and free the port; safe to call more than once."""
        server, self._server = self._server, None
        if server is not None:
            server.close()


#: Whether the process is ready for clients: (ready, a one-line reason when it is not).
Ready = Callable[[], Tuple[bool, str]]


class StatusServer:
    """The ``--metrics`` port: ``/metrics`` (with prometheus_client), ``/healthz`` (200 while
    the process serves) and ``/ready`` (200, or 503 with the reason `ready` gives), from a
    daemon thread.

    Our own server rather than ``start_http_server``: its return value differs across
    prometheus_client versions, and the bound port is needed when `port` is 0.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Optional[Metrics] = None,
        ready: Optional[Ready] = None,
        *,
        sock: Optional[socket.socket] = None,
    ) -> None:
        """`sock`: a listening socket to serve instead of binding `host`:`port` (one a process
        handing over gave us; see _upgrade)."""
        self._server = _server_for(host, port, metrics, ready) if sock is None else _server_on(sock, metrics, ready)
        self._thread = threading.Thread(target=self._server.run, name="tcptotcp-metrics", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def listening_socket(self) -> socket.socket:
        """The listening socket (to hand over to a successor)."""
        return self._server.socket

    @property
    def address(self) -> Tuple[str, int]:
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop serving and free the port; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._server.wake()
        self._thread.join(timeout=5.0)
        self._server.server_close()


class _MetricsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    timeout = 1.0  # handle_request()'s wait, should a ready client vanish before accept
    metrics: Optional[Metrics]
    ready: Optional[Ready]

    def __init__(
        self, address: Tuple[Any, ...], handler: Type[http.server.BaseHTTPRequestHandler], bind: bool = True
    ) -> None:
        # Before binding: a failed bind calls server_close(), which closes these.
        self._wake_r, self._wake_w = socket.socketpair()
        super().__init__(address, handler, bind_and_activate=bind)

    def run(self) -> None:
        """``serve_forever()`` without its 0.5 s poll: ``wake()`` ends it at once."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self.handle_request()

    def wake(self) -> None:
        self._wake_w.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that hung up mid-response: a debug line, not a traceback on stderr."""
        log.debug("metrics request from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() calls getfqdn(), a reverse DNS lookup that can stall startup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _MetricsServer

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        metrics, ready = self.server.metrics, self.server.ready
        if path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/ready":
            ok, why = (True, "") if ready is None else ready()
            self._send(200, b"ready\n") if ok else self._send(503, why.encode("utf-8", "replace") + b"\n")
        elif path == "/metrics" and metrics is not None:
            body, content_type = metrics.exposition(self.headers.get("Accept", ""))
            self._send(200, body, content_type)
        elif path == "/metrics":
            self._send(404, (_MISSING + "\n").encode())
        else:
            self._send(404, b"served here: /metrics, /healthz, /ready\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a line per scrape on stderr would interleave with (JSON) logs."""


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


def _server_for(host: str, port: int, metrics: Optional[Metrics], ready: Optional[Ready]) -> _MetricsServer:
    """A server bound to `host`:`port`, in the family the host resolves to (IPv4 for "")."""
    server_class = _MetricsServer
    address: Tuple[Any, ...] = (host, port)
    if host:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host!r} ({exc.strerror})") from None
        if info[0] == socket.AF_INET6:
            server_class = _MetricsServer6
        address = tuple(info[4])
    server = server_class(address, _Handler)
    server.metrics = metrics
    server.ready = ready
    return server


def _server_on(sock: socket.socket, metrics: Optional[Metrics], ready: Optional[Ready]) -> _MetricsServer:
    """A server on a socket that is listening already."""
    server_class = _MetricsServer6 if sock.family == socket.AF_INET6 else _MetricsServer
    server = server_class(sock.getsockname(), _Handler, bind=False)
    server.socket.close()
    sock.setblocking(True)  # (socketserver's accept expects a blocking socket, as it makes them)
    server.socket = sock
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = str(server.server_address[0]), int(server.server_address[1])
    server.metrics = metrics
    server.ready = ready
    return server
