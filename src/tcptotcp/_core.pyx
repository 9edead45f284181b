# cython: language_level=3
# cython: freethreading_compatible=True
"""The compiled engine: every bridge relayed by a few C event loops, without the GIL.

The loops are C (``_loop.h``): a fixed number of threads, started with the first bridge and
kept for the process, each multiplexing many bridges with epoll (kqueue off Linux): relaying,
splice for bulk streams, the idle timer, ending and teardown. A bridge owns no thread and, while
idle, no buffer. This module is their Python face: ``start()`` hands a bridge to a loop and
returns at once; the loops put ended bridges on a done queue that one Python thread
(``tcptotcp-results``) empties, calling each bridge's ``on_end`` with its result.
Same seam as the pure engine (``_pump.start``).
"""

import os
import socket
import ssl
from errno import ECANCELED
import _ssl
import threading
import weakref

from . import _events
from ._bridge import REASONS, EngineDetached, bandwidth_bucket, report_unraisable
from ._events import AcceptPaused, Dropped, Ended, Gone, Opened, Peer, Refused, TlsFailed, Unserved, UpstreamFailed
from ._tls import TlsInfo, failure_label

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_DECREF
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from ._loop cimport *  # noqa: F403 (the engine's C API)

BUFFER_SIZE = BUFFER_BYTES
SPLICE_AVAILABLE = bool(HAVE_SPLICE)
LISTENER_MAX_UPSTREAMS = MAX_UPSTREAMS
ACCEPT_BACKOFF_SECONDS = ACCEPT_BACKOFF_NS / 1e9

# Index = t2t_reason: T2T_RUNNING, then the reasons in _bridge.REASONS' order.
_REASONS = ("running",) + REASONS
# Longer than anyone waits (~31 years): keeps the check interval finite in ns for r of any size.
cdef int64_t LONGEST_INTERVAL_NS = 10**18
cdef uint64_t MOST_CHECKS = 2**63


def _default_loop_threads():
    """One loop per CPU this process may use, at most 4: on loopback a loop moves ~2 GB/s
    alone, and more loops than cores only add wake-ups."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def _configured_loop_threads():
    text = os.environ.get("TCPTOTCP_LOOP_THREADS", "").strip()
    if not text:
        return _default_loop_threads()
    try:
        count = int(text, 10)
    except ValueError:
        raise ValueError(f"TCPTOTCP_LOOP_THREADS must be a whole number, not {text!r}") from None
    if not 1 <= count <= MAX_LOOPS:
        raise ValueError(f"TCPTOTCP_LOOP_THREADS must be between 1 and {MAX_LOOPS}, not {count}")
    return count


cdef class Relay:
    """One bridge in a loop: ``stop()`` from any thread; ``counts()`` while it runs."""

    cdef t2t_bridge *_b
    cdef object _on_end
    cdef object _tls_objects  # a TLS side's SSL object must outlive the bridge's use of it

    def stop(self):
        """End it with reason "stopped" (no-op once it ended); returns at once."""
        if self._b != NULL:
            t2t_stop(self._b)

    def counts(self):
        """Bytes delivered in full so far: (1 -> 2, 2 -> 1)."""
        return (t2t_bytes(self._b, 0), t2t_bytes(self._b, 1))

    def detach(self, double timeout):
        """Quiesce, deliver what is held, hand both fds over unclosed and end, reason
        "detached" (see _bridge.Relay.detach); None if it could not. Waits without the GIL."""
        cdef int fds[2]
        cdef t2t_idle_state state
        cdef int64_t timeout_ns = <int64_t>(min(max(timeout, 0.0), 1e9) * 1e9)
        cdef int done
        if self._b == NULL:
            return None
        with nogil:
            done = t2t_detach(self._b, timeout_ns, fds, &state)
        if not done:
            return None
        b = self._b
        return EngineDetached(fds[0], fds[1], t2t_bytes(b, 0), t2t_bytes(b, 1), (b.ended_ns - b.started_ns) / 1e9,
                              state.idle_checks, state.next_check_in_ns / 1e9, (bool(state.moved[0]),
                              bool(state.moved[1])))

    @property
    def used_splice(self):
        """Per direction, whether bytes went through the zero-copy splice path."""
        return (bool(self._b.dir[0].spliced), bool(self._b.dir[1].spliced))

    @property
    def lent(self):
        """Whether direction 2 -> 1 went to another loop's thread (both ways bulk, a loop idle)."""
        return bool(self._b.lent_once)

    cdef _finish(self, t2t_bridge *b):
        on_end, self._on_end = self._on_end, None
        on_end(t2t_bytes(b, 0), t2t_bytes(b, 1), _REASONS[b.reason], (b.ended_ns - b.started_ns) / 1e9)

    def __dealloc__(self):
        if self._b != NULL:
            t2t_release(self._b)


cdef _finish_all(t2t_bridge *batch):
    """Tell each ended bridge's owner; drop the references the engine held."""
    cdef t2t_bridge *b
    cdef Relay relay
    while batch != NULL:
        b = batch
        batch = b.done_next
        if b.owner == NULL:  # a listener's, inherited by a fork child: nothing to tell
            t2t_release(b)
            continue
        relay = <Relay>b.owner
        Py_DECREF(relay)  # the reference start() took; `relay` holds its own until the next one
        try:
            relay._finish(b)
        except BaseException as exc:  # never let one bridge stop the results thread
            try:
                report_unraisable(exc, "Exception while finishing a tcptotcp bridge", relay)
            except BaseException:
                pass  # a hook that raises: there is nowhere left to report to
        t2t_release(b)


def _deliver_results_forever():
    cdef t2t_bridge *batch
    while True:
        with nogil:
            batch = t2t_done_take()
        _finish_all(batch)


def claim_results():
    """Let the calling thread finish ended bridges itself, sparing the hand-off to the results
    thread (and the GIL's between the two): returns an fd that turns readable when
    `deliver_results()` has work, or None while another thread holds the claim. Undo with
    `release_results()`, from the same thread."""
    _ensure_engine()
    cdef int fd = t2t_done_claim()
    return None if fd < 0 else fd


def deliver_results():
    """The claimer's turn: call `on_end` for every bridge that ended so far; never blocks."""
    cdef t2t_bridge *batch
    with nogil:
        batch = t2t_done_take_now()
    _finish_all(batch)


def release_results():
    """The results thread finishes ended bridges again, those already waiting included."""
    t2t_done_unclaim()


_engine_lock = threading.Lock()
_results_thread = None


def _after_fork_in_child():
    global _results_thread
    _results_thread = None
    _engine_lock._at_fork_reinit()
    _finish_all(t2t_forget_after_fork())


cdef _ensure_engine():
    global _results_thread
    if _results_thread is not None:
        return
    with _engine_lock:
        if _results_thread is not None:
            return
        if t2t_engine_start(_configured_loop_threads()) != 0:
            raise OSError(errno, f"tcptotcp: cannot start the loop threads: {os.strerror(errno)}")
        thread = threading.Thread(target=_deliver_results_forever, name="tcptotcp-results", daemon=True)
        thread.start()
        _results_thread = thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start(stream1, stream2, plan, on_end, *, bint splice=True, resume=None):
    """Relay between private dups of two connected sockets on a loop thread; returns at once.

    Given two fds (ints) instead, the bridge adopts them: no dups; they are its to close.

    `plan` carries ``interval`` (seconds between idle checks), ``idle_limit``,
    ``activity_both``, ``half_close`` and ``bandwidth`` (bytes/s per direction; 0: none).
    ``on_end(bytes_1_to_2, bytes_2_to_1, reason, seconds)`` is called once, from the results
    thread, after the dups are closed. `resume` (a ``_bridge.BridgeState``) continues a detached
    bridge's idle rule.
    """
    _ensure_engine()
    cdef bint adopt = isinstance(stream1, int) and isinstance(stream2, int)
    cdef int fd1 = stream1 if adopt else stream1.fileno()
    cdef int fd2 = stream2 if adopt else stream2.fileno()
    cdef void *tls1 = NULL
    cdef void *tls2 = NULL
    cdef bint is_tls1 = not adopt and isinstance(stream1, ssl.SSLSocket)
    cdef bint is_tls2 = not adopt and isinstance(stream2, ssl.SSLSocket)
    tls_objects = None
    if is_tls1 or is_tls2:
        # The SSL objects, read once and held by the relay: a close of the socket meanwhile
        # drops the socket's reference, never the one the loop uses.
        tls_objects = (stream1._sslobj if is_tls1 else None, stream2._sslobj if is_tls2 else None)
        if is_tls1:
            tls1 = _ssl_in(stream1, tls_objects[0])
        if is_tls2:
            tls2 = _ssl_in(stream2, tls_objects[1])
        if (is_tls1 and tls1 == NULL) or (is_tls2 and tls2 == NULL):
            raise ValueError("the loops cannot relay this TLS socket: see relays_tls_of()")
    cdef int64_t interval_ns = min(int(plan.interval) * 1_000_000_000, LONGEST_INTERVAL_NS)
    cdef uint64_t idle_limit = min(int(plan.idle_limit), MOST_CHECKS)
    cdef uint64_t rate = plan.bandwidth
    burst, quantum = bandwidth_bucket(rate) if rate else (0, 0)
    cdef t2t_idle_state carried
    if resume is not None:
        carried.idle_checks = min(int(resume.idle_checks), MOST_CHECKS)
        carried.next_check_in_ns = <int64_t>(min(float(resume.next_check_in), 1e9) * 1e9)
        carried.moved[0] = bool(resume.moved_1_to_2)
        carried.moved[1] = bool(resume.moved_2_to_1)
    cdef Relay relay = Relay.__new__(Relay)
    relay._on_end = on_end
    if tls1 != NULL or tls2 != NULL:
        relay._tls_objects = tls_objects
    Py_INCREF(relay)  # held for the engine until the results thread finished it
    # A TLS socket's suppress_ragged_eofs: an EOF without close_notify is its end (a cut, which
    # sends no close_notify on), else an error.
    cdef int ragged_eofs_are_ends = 0
    if is_tls1 or is_tls2:
        ragged_eofs_are_ends = ((1 if is_tls1 and stream1.suppress_ragged_eofs else 0)
                                | (2 if is_tls2 and stream2.suppress_ragged_eofs else 0))
    relay._b = t2t_start(fd1, fd2, adopt, interval_ns, idle_limit, plan.activity_both, plan.half_close,
                         splice, rate, burst, quantum, &carried if resume is not None else NULL, tls1, tls2,
                         ragged_eofs_are_ends, <void *>relay)
    if relay._b == NULL:
        err = errno
        Py_DECREF(relay)
        raise OSError(err, os.strerror(err))
    return relay


def tls_unavailable():
    """None when the loops relay TLS records themselves (through the OpenSSL that Python's ssl
    module loaded), else why not: TLS bridges then run on the pure engine."""
    cdef const char *why = NULL
    if os.environ.get("TCPTOTCP_PURE_TLS", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return "TCPTOTCP_PURE_TLS is set"
    path = getattr(_ssl, "__file__", None)
    if path is None:
        return "the ssl module is built into the interpreter"
    if "OpenSSL" not in ssl.OPENSSL_VERSION or ssl.OPENSSL_VERSION_INFO < (1, 1, 1):
        return f"the ssl module uses {ssl.OPENSSL_VERSION}, not OpenSSL 1.1.1 or later"
    encoded = os.fsencode(path)
    if t2t_tls_bind(encoded, &why) != 0:
        return why.decode()
    return None


cdef void *_ssl_in(sock, tls):
    """The SSL object inside `tls`, the ``_ssl._SSLSocket`` of the ssl.SSLSocket `sock`, found by
    the layout of CPython's struct (its reference to the socket, then the SSL pointer); NULL if
    the loops must not take it. The layout is checked before the pointer is read (the
    reference must be a weak reference to `sock`), and the pointer after (OpenSSL must say it
    reads `sock`'s fd through a socket BIO). The caller holds `tls` for as long as it uses the
    pointer."""
    if type(sock) is not ssl.SSLSocket or tls is None or type(tls) is not _ssl._SSLSocket:
        return NULL
    # A handshake still to do, or a context that calls Python on every record, would run Python
    # from a loop thread; kernel TLS would need the loops to write plaintext to the socket.
    if sock.version() is None or getattr(sock.context, "_msg_callback", None) is not None:
        return NULL
    if sock.context.options & getattr(ssl, "OP_ENABLE_KTLS", 0):
        return NULL
    if tls_unavailable() is not None:
        return NULL
    cdef char *base = <char *><PyObject *>tls
    cdef PyObject *owner = (<PyObject **>(base + sizeof(PyObject)))[0]
    if owner == NULL or type(<object>owner) is not weakref.ReferenceType or (<object>owner)() is not sock:
        return NULL
    cdef void *p = (<void **>(base + sizeof(PyObject) + sizeof(void *)))[0]
    if p == NULL or not t2t_tls_usable(p, sock.fileno()):
        return NULL
    return p


# ssl.CERT_* as SSL_CTX_get_verify_mode says them (CERT_REQUIRED also fails without a certificate).
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


cdef void *_context_in(context) except? NULL:
    """The SSL_CTX of the ssl.SSLContext `context`, found by the layout of CPython's struct (the
    pointer right after the object header, in every CPython 3.7 to 3.13) and checked: OpenSSL
    must report the context's own options and verify mode for it. ValueError if it is not."""
    if not isinstance(context, ssl.SSLContext) or tls_unavailable() is not None:
        raise ValueError("the loops cannot use this context")
    if context.options & getattr(ssl, "OP_ENABLE_KTLS", 0):  # (its records would bypass the loops' reads)
        raise ValueError("the loops cannot use a context with kernel TLS")
    cdef char *base = <char *><PyObject *>context
    cdef void *p = (<void **>(base + sizeof(PyObject)))[0]
    if p == NULL or not t2t_tls_context_is(p, int(context.options), _VERIFY_MODES[context.verify_mode]):
        raise ValueError("the loops cannot use this context: its layout is not CPython's")
    return p


def serve_alpn(context, protocols):
    """Let `context`, built for the loops' handshakes and not used yet, choose the first of
    `protocols` (names) that a client also offers, in C: the ssl module's own choice would
    tie the context to its Python object. ValueError if the loops cannot use the context."""
    wire = b"".join(bytes([len(name)]) + name for name in (p.encode("utf-8", "surrogateescape") for p in protocols))
    if not protocols or len(wire) > 65535:
        raise ValueError("1 to 65535 bytes of protocol names")
    if t2t_tls_serve_alpn(_context_in(context), wire, len(wire)) != 0:
        raise MemoryError()


def relays_tls_of(sock):
    """Whether the loops can relay `sock` as a side of a bridge: its fd's bytes, or an
    ``ssl.SSLSocket`` (the class itself: a subclass may change what its reads and writes mean)
    after its handshake, whose SSL object the loops can use."""
    if not isinstance(sock, ssl.SSLSocket):
        cls = type(sock)
        plain = cls.recv_into is socket.socket.recv_into and cls.send is socket.socket.send
        return isinstance(sock, socket.socket) and plain
    return _ssl_in(sock, sock._sslobj) != NULL


def loop_threads():
    """How many loop threads run (0 until the first bridge starts them)."""
    return t2t_loop_count()


def stats():
    """Engine-wide figures: loop threads, bridges not yet ended, idle pooled pipes, and the
    fds the engine holds itself (pollers, wake fds, pooled pipes: none of them a bridge's)."""
    return {
        "loops": t2t_loop_count(),
        "bridges": t2t_bridges_open(),
        "bridges_per_loop": [t2t_loop_load(i) for i in range(t2t_loop_count())],
        "pooled_pipes": t2t_pooled_pipes(),
        "engine_fds": t2t_engine_fds(),
    }


cdef object _sockaddr_object(int family, char *host, int port, unsigned int flowinfo, unsigned int scope_id):
    text = host.decode("utf-8", "surrogateescape")
    if family == socket.AF_INET:
        return (text, port)
    if family == socket.AF_INET6:
        return (text, port, flowinfo, scope_id)
    return text


cdef object _peer_of(const sockaddr_storage *address, socklen_t address_len, int listen_family):
    """A client's address as Python's accept() gives it (the PROXY header's, once read)."""
    cdef char host[128]
    cdef int port
    cdef unsigned int flowinfo, scope_id
    cdef int family = t2t_address_text(address, address_len, host, sizeof(host), &port, &flowinfo, &scope_id)
    return Peer(family if family else listen_family, _sockaddr_object(family, host, port, flowinfo, scope_id))


# Refusals whose words are fixed; the others carry a detail (see _refusal_text).
_REFUSALS = {
    T2T_REFUSED_ACCESS: _events.NOT_ALLOWED,
    T2T_REFUSED_PROXY_LONG: _events.PROXY_TOO_LONG,
    T2T_REFUSED_PROXY_LATE: _events.PROXY_LATE,
    T2T_REFUSED_PROXY_CLOSED: _events.PROXY_CLOSED,
    T2T_REFUSED_PER_CLIENT: _events.PER_CLIENT,
    T2T_REFUSED_RATE: _events.RATE_LIMITED,
    T2T_REFUSED_CLIENTS_FULL: _events.CLIENTS_FULL,
    T2T_REFUSED_HELLO_LATE: _events.HELLO_LATE,
    T2T_REFUSED_HELLO_CLOSED: _events.HELLO_CLOSED,
}


cdef object _refusal_text(t2t_bridge *b):
    text = _REFUSALS.get(b.refusal)
    if text is not None:
        return text
    if b.refusal == T2T_REFUSED_PROXY_BAD:
        return _events.PROXY_BAD.format(t2t_bridge_proxy_error(b).decode("utf-8", "replace"))
    if b.refusal == T2T_REFUSED_HELLO_BAD:
        return _events.HELLO_BAD.format(t2t_bridge_hello_error(b).decode("utf-8", "replace"))
    if b.refusal == T2T_REFUSED_HELLO_READ:
        return _events.HELLO_NOT_READ.format(os.strerror(b.error))
    if b.refusal == T2T_REFUSED_NO_ROUTE:
        return _events.no_route(t2t_bridge_hello_name(b).decode("ascii", "replace") or None)
    return _events.PROXY_NOT_READ.format(os.strerror(b.error))  # T2T_REFUSED_PROXY_READ


_BALANCES = {
    "first": T2T_BALANCE_FIRST,
    "roundrobin": T2T_BALANCE_ROUNDROBIN,
    "leastconn": T2T_BALANCE_LEASTCONN,
    "source": T2T_BALANCE_SOURCE,
}


cdef const char **_c_strings(list encoded) except NULL:
    """A C array of the bytes in `encoded`, which the caller keeps alive, and frees the array
    with PyMem_Free."""
    cdef const char **strings = <const char **>PyMem_Malloc(max(1, len(encoded)) * sizeof(char *))
    if strings == NULL:
        raise MemoryError()
    for i, item in enumerate(encoded):
        strings[i] = <const char *>(<bytes>item)
    return strings


cdef t2t_config *_config_of(settings) except NULL:
    """A t2t_config from a `ListenerSettings` (see _listener.py); the caller owns its reference."""
    upstreams = settings.upstreams
    if not 1 <= len(upstreams) <= MAX_UPSTREAMS:
        raise ValueError(f"the loops take 1 to {MAX_UPSTREAMS} upstreams, not {len(upstreams)}")
    if len(settings.sockopts) > MAX_SOCKOPTS:
        raise ValueError(f"at most {MAX_SOCKOPTS} socket options")
    cdef t2t_config *c = t2t_config_new(len(upstreams))
    if c == NULL:
        raise MemoryError()
    cdef sockaddr_storage address
    cdef socklen_t address_len = 0
    cdef int rc
    cdef const char **patterns
    cdef t2t_access rules
    try:
        weights = settings.weights
        if len(weights) != len(upstreams) or not all(1 <= w <= MAX_WEIGHT for w in weights):
            raise ValueError(f"a weight per upstream, each 1 to {MAX_WEIGHT}")
        down = settings.down
        if len(down) != len(upstreams):
            raise ValueError("a down flag per upstream")
        for i, (family, where, text) in enumerate(upstreams):
            if family == socket.AF_UNIX:
                path = os.fsencode(where)
                rc = t2t_sockaddr_unix(path, len(path), &address, &address_len)
            else:
                host = where[0].encode("ascii")
                flowinfo = where[2] if len(where) > 2 else 0
                scope_id = where[3] if len(where) > 3 else 0
                rc = t2t_sockaddr_ip(family, host, where[1], flowinfo, scope_id, &address, &address_len)
            if rc != 0:
                raise ValueError(f"not a numeric address: {where!r}")
            name = text.encode("utf-8", "surrogateescape")
            if t2t_config_upstream(c, i, <sockaddr *>&address, address_len, name, len(name), weights[i], down[i]) != 0:
                raise OSError(errno, os.strerror(errno))
        for n, (level, option, value) in enumerate(settings.sockopts):
            c.sockopts[n][0] = level
            c.sockopts[n][1] = option
            c.sockopts[n][2] = value
        c.nsockopts = len(settings.sockopts)
        plan = settings.plan
        c.interval_ns = min(int(plan.interval) * 1_000_000_000, LONGEST_INTERVAL_NS)
        c.idle_limit = min(int(plan.idle_limit), MOST_CHECKS)
        c.activity_both = plan.activity_both
        c.half_close = plan.half_close
        c.rate = plan.bandwidth
        if plan.bandwidth:
            c.burst, c.quantum = bandwidth_bucket(plan.bandwidth)
        c.may_splice = settings.splice
        c.balance = _BALANCES[settings.balance]
        c.send_proxy = settings.send_proxy
        c.accept_proxy = settings.accept_proxy
        c.backoff_ns = int(settings.upstream_backoff * 1e9)
        c.connect_timeout_ns = int(settings.connect_timeout * 1e9)
        c.proxy_timeout_ns = int(settings.proxy_timeout * 1e9)
        c.max_active = settings.max_connections
        c.max_fails = settings.max_fails
        c.fail_window_ns = int(settings.fail_window * 1e9)
        c.max_per_client = settings.max_per_client
        c.rate_spacing_ns = settings.rate_spacing_ns
        c.rate_burst = settings.rate_burst
        c.prefix6 = settings.client_prefix6
        routes = [pattern.encode("ascii") for pattern in settings.routes]
        patterns = _c_strings(routes)
        try:
            if t2t_config_routes(c, settings.serving, patterns, len(routes), settings.route_strict) != 0:
                raise OSError(errno, os.strerror(errno))
        finally:
            PyMem_Free(patterns)
        _config_tls(c, settings)
        if settings.access is not None:  # (closed, allow4, deny4, allow6, deny6): see AccessList.tables()
            closed, *tables = settings.access
            if len(tables) != 4 or not all(isinstance(table, bytes) for table in tables):
                raise ValueError("access: (closed, allow4, deny4, allow6, deny6), the lists as bytes")
            memset(&rules, 0, sizeof(rules))
            rules.active = 1
            rules.closed = bool(closed)
            for i, (table, width) in enumerate(zip(tables, (4, 4, 16, 16))):
                if len(table) % (2 * width):
                    raise ValueError("an access table holds (network, mask) pairs")
                rules.lists[i] = <const unsigned char *>(<bytes>table)  # bytes: checked above
                rules.counts[i] = len(table) // (2 * width)
            if t2t_config_access(c, &rules) != 0:
                raise MemoryError()
    except BaseException:
        t2t_config_release(c)
        raise
    return c


cdef int _config_tls(t2t_config *c, settings) except -1:
    """The TLS part of a t2t_config: each certificate's context and names (termination), the
    upstream context and each upstream's host name (origination)."""
    cdef const char **names
    c.tls_timeout_ns = int(settings.tls_handshake_timeout * 1e9)
    for context, patterns in settings.tls_certs:
        encoded = [pattern.encode("ascii") for pattern in patterns]
        names = _c_strings(encoded)
        try:
            if t2t_config_tls_cert(c, _context_in(context), names, len(encoded)) != 0:
                raise MemoryError()
        finally:
            PyMem_Free(names)
    if settings.tls_client is not None:
        t2t_config_tls_client(c, _context_in(settings.tls_client), settings.tls_client.check_hostname)
        for i, (name, is_ip) in enumerate(settings.tls_names):
            if name is None:
                continue
            encoded = name.encode("idna")
            if t2t_config_tls_name(c, i, <const char *>(<bytes>encoded), is_ip) != 0:
                raise MemoryError()
    return 0


cdef object _text(const char *text):
    return text.decode("utf-8", "replace") or None


cdef object _tls_info(t2t_bridge *b):
    """What b's handshakes negotiated (a `TlsInfo`), None for a plaintext bridge."""
    cdef t2t_tls_work *w = b.tlsw
    if w == NULL:
        return None
    return TlsInfo(_text(w.version), _text(w.cipher), _text(w.sni), _text(w.subject), _text(w.alpn),
                   _text(w.up_version), _text(w.up_cipher))


cdef class Listener:
    """A forward's clients accepted, checked, connected and relayed in the loops: see `listen()`
    and docs/contract.md ("The listener")."""

    cdef t2t_listener *_l
    cdef int _family

    def fileno(self):
        """Readable when `take()` has something."""
        return t2t_listener_fd(self._l)

    @property
    def active(self):
        """Clients accepted and not yet reported gone: reading a header, connecting or bridged."""
        return t2t_listener_active(self._l) if self._l != NULL else 0

    @property
    def next_id(self):
        """The number the next client will get."""
        return t2t_listener_next_id(self._l)

    def configure(self, settings):
        """Settings for clients from now on; clients already accepted keep theirs."""
        cdef t2t_config *c = _config_of(settings)
        t2t_listener_configure(self._l, c)

    def reserve(self, int count):
        """`count` bridges opened elsewhere (a predecessor's, adopted) count against this
        listener's connection limit, until the next call."""
        t2t_listener_reserve(self._l, count)

    def set_checked(self, int index, bint down):
        """The active checks marked the current settings' upstream `index` down (or up)."""
        t2t_listener_set_checked(self._l, index, down)

    def upstream_down(self, int index):
        """Whether upstream `index` is down now (marked by failed connects or by the checks)."""
        cdef int down = t2t_listener_upstream_down(self._l, index)
        if down < 0:
            raise IndexError(index)
        return bool(down)

    @property
    def clients(self):
        """Entries the client table holds, after dropping those with nothing open and a full bucket."""
        cdef size_t n
        with nogil:
            n = t2t_listener_clients(self._l)
        return n

    def take(self, bint brief=False):
        """The events since the last take, in order per client (see _events). With `brief`,
        bridges that opened and ended in between are summed up in one `Gone` record."""
        cdef t2t_bridge *opened_list
        cdef t2t_bridge *done_list
        cdef t2t_failure *failed_list
        cdef t2t_bridge *b
        cdef t2t_failure *f
        cdef Relay relay
        cdef unsigned long long gone_count = 0, gone_up = 0, gone_down = 0
        cdef int accept_error = 0
        with nogil:
            t2t_listener_take(self._l, &opened_list, &done_list, &failed_list, &accept_error)
        events = []
        if accept_error:
            events.append(AcceptPaused(OSError(accept_error, os.strerror(accept_error)), ACCEPT_BACKOFF_SECONDS))
        # Failures first: each came before its client's opening or end.
        while failed_list != NULL:
            f = failed_list
            failed_list = f.next
            error = socket.timeout("timed out") if f.timed_out else OSError(f.error, os.strerror(f.error))
            if f.tls_failure[0]:
                words = f.tls_failure.decode("utf-8", "replace")
                events.append(TlsFailed(f.conn_id, _peer_of(&f.peer, f.peer_len, self._family), "upstream",
                                        failure_label(words, f.tls_closed, f.tls_timed_out), words))
                error = OSError(_events.TLS_FAILED.format(words))
            events.append(UpstreamFailed(f.conn_id, _peer_of(&f.peer, f.peer_len, self._family),
                                         t2t_failure_upstream(f).decode("utf-8", "surrogateescape"), error,
                                         bool(f.marked_down)))
            t2t_failure_free(f)
        while opened_list != NULL:
            b = opened_list
            opened_list = b.open_next
            if b.open_untaken == 2:
                t2t_release(b)  # reported once, as ended, below
                continue
            relay = Relay.__new__(Relay)
            relay._b = b  # the reference the opened list held is the relay's now
            events.append(Opened(b.conn_id, _peer_of(&b.peer, b.peer_len, self._family),
                                 t2t_bridge_upstream(b).decode("utf-8", "surrogateescape"), relay, _tls_info(b)))
        while done_list != NULL:
            b = done_list
            done_list = b.done_next
            if b.opened and b.open_untaken == 2 and brief:
                gone_count += 1
                gone_up += t2t_bytes(b, 0)
                gone_down += t2t_bytes(b, 1)
            elif b.opened:
                events.append(Ended(b.conn_id, _peer_of(&b.peer, b.peer_len, self._family),
                                    t2t_bridge_upstream(b).decode("utf-8", "surrogateescape"),
                                    t2t_bytes(b, 0), t2t_bytes(b, 1), _REASONS[b.reason],
                                    (b.ended_ns - b.started_ns) / 1e9, b.open_untaken != 2,
                                    _tls_info(b) if b.open_untaken == 2 else None))
            elif b.refusal == T2T_REFUSED_TLS:
                words = b.tlsw.failure.decode("utf-8", "replace")
                peer = _peer_of(&b.peer, b.peer_len, self._family)
                label = failure_label(words, b.tlsw.closed, b.tlsw.timed_out)
                events.append(TlsFailed(b.conn_id, peer, "client", label, words))
                events.append(Refused(b.conn_id, peer, _events.TLS_FAILED.format(words)))
            elif b.refusal:
                events.append(Refused(b.conn_id, _peer_of(&b.peer, b.peer_len, self._family), _refusal_text(b)))
            elif b.error == ECANCELED:
                events.append(Dropped(b.conn_id, _peer_of(&b.peer, b.peer_len, self._family)))
            else:
                events.append(Unserved(b.conn_id, _peer_of(&b.peer, b.peer_len, self._family), 0))
            t2t_release(b)
        if gone_count:
            events.append(Gone(gone_count, gone_up, gone_down))
        return events

    def recheck(self):
        """Watch the listening socket afresh in every loop (see t2t_listener_recheck): after
        another process that accepted from it stopped."""
        with nogil:
            t2t_listener_recheck(self._l)

    def stop(self, bint cancel_connects=True):
        """Stop accepting; once it returns, the loops no longer touch the listening socket, and
        opened bridges run on. Clients still connecting upstream (or sending their header) are
        dropped (`Dropped`), so that no bridge opens after it returned (the next take has them
        all); or, without cancel_connects, they go on as usual and open later."""
        with nogil:
            t2t_listener_stop(self._l, cancel_connects)

    def close(self):
        """Free the listener: after `stop()`, once `active` is 0 and the last `take()` was made.
        Raises OSError (EBUSY) while clients remain."""
        if self._l == NULL:
            return
        cdef int rc
        with nogil:
            rc = t2t_listener_free(self._l)
        if rc != 0:
            raise OSError(errno, os.strerror(errno))
        self._l = NULL


def listen(listener, settings, first_id):
    """Let the loops accept clients of `listener` (a listening socket the caller keeps open and
    closes only after `Listener.stop()`) and serve each as `settings` say (a `ListenerSettings`:
    numeric upstream addresses, as getaddrinfo gives them). Raises OSError or ValueError."""
    _ensure_engine()
    cdef t2t_config *c = _config_of(settings)
    cdef Listener result = Listener.__new__(Listener)
    result._family = listener.family
    result._l = t2t_listen(listener.fileno(), c, first_id)
    if result._l == NULL:
        err = errno
        t2t_config_release(c)
        raise OSError(err, os.strerror(err))
    return result


# ---- PROXY protocol in C (tests) ----
# _loop_proxy.h's parser and encoder, bound for tests/test_proxy_corpus.py, which holds them to
# _proxy.parse/encode_v1/encode_v2: the same results, error texts and bytes.
import ipaddress as _ipaddress

cdef extern from "_loop_proxy.h" nogil:
    enum:
        T2T_PROXY_OUT_MAX
        T2T_PROXY_ERROR_MAX
    ctypedef struct proxy_sockaddr "struct sockaddr":
        pass
    ctypedef struct proxy_sockaddr_storage "struct sockaddr_storage":
        pass
    ctypedef struct t2t_proxy_header:
        size_t length
        int family
        proxy_sockaddr_storage source
        proxy_sockaddr_storage destination
    int t2t_proxy_parse(const unsigned char *data, size_t n, t2t_proxy_header *out)
    size_t t2t_proxy_error_text(int code, const t2t_proxy_header *h, const unsigned char *data, char *buf,
                                size_t cap)
    size_t t2t_proxy_encode(int version, int family, const proxy_sockaddr *source, const proxy_sockaddr *destination,
                            unsigned char *out, size_t cap)
    unsigned int t2t_proxy_sockaddr(const unsigned char *ip, size_t size, unsigned int port,
                                    proxy_sockaddr_storage *out)
    size_t t2t_proxy_address(const proxy_sockaddr_storage *sa, unsigned char *ip, unsigned int *port)


cdef object _proxy_endpoint(const proxy_sockaddr_storage *sa):
    cdef unsigned char ip[16]
    cdef unsigned int port
    cdef size_t size = t2t_proxy_address(sa, ip, &port)
    if size == 0:
        return None
    return (_ipaddress.ip_address((<char *>ip)[:size]).compressed, port)  # as _proxy.parse words it


def proxy_parse(data):
    """_proxy.parse in C: None (a prefix), (length, family, source, destination), or ValueError."""
    cdef bytes raw = bytes(data)
    cdef t2t_proxy_header h
    cdef char text[T2T_PROXY_ERROR_MAX]
    cdef int got = t2t_proxy_parse(<const unsigned char *>raw, len(raw), &h)
    if got < 0:
        t2t_proxy_error_text(got, &h, <const unsigned char *>raw, text, sizeof(text))
        raise ValueError(text.decode("ascii"))
    if got == 0:
        return None
    return (h.length, h.family, _proxy_endpoint(&h.source), _proxy_endpoint(&h.destination))


def proxy_encode(version, family, source, destination):
    """_proxy.encode_v1 (version "v1") or encode_v2 ("v2") in C, from sockaddr tuples."""
    cdef proxy_sockaddr_storage ends[2]
    cdef const proxy_sockaddr *given[2]
    cdef unsigned char out[T2T_PROXY_OUT_MAX]
    # As _proxy: bad addresses matter only for an IP family with both given (the C sees the rest).
    strict = family in (socket.AF_INET, socket.AF_INET6) and source is not None and destination is not None
    for i, end in enumerate((source, destination)):
        given[i] = NULL
        try:
            ip = _ipaddress.ip_address(end[0].partition("%")[0]).packed
            port = end[1]
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(port)
        except (AttributeError, IndexError, TypeError, ValueError):
            if strict:
                raise ValueError(f"not an address and port: {end!r}") from None
            continue
        t2t_proxy_sockaddr(ip, len(ip), port, &ends[i])
        given[i] = <const proxy_sockaddr *>&ends[i]
    cdef int v = 1 if version == "v1" else 2 if version == "v2" else 0
    cdef size_t n = t2t_proxy_encode(v, family, given[0], given[1], out, sizeof(out))
    if n == 0:
        raise ValueError(f"{version!r} header: addresses {source!r}, {destination!r} do not fit family {family!r}")
    return (<char *>out)[:n]
# ---- end PROXY protocol in C ----


# ---- client table in C (tests) ----
# A test hook: _loop_balance.h's client table driven with synthetic keys, for tests/test_limits.py
# (however many distinct clients come, the table holds only those that still hold something).
# Declared from _loop.h, which includes _loop_balance.h (that one has no include guard of its own).
cdef extern from "_loop.h" nogil:
    ctypedef struct hook_client "t2t_client":
        int open
        int64_t tat
    ctypedef struct hook_clients "t2t_clients":
        size_t count
    hook_client *t2t_clients_get(hook_clients *t, const unsigned char *key, size_t len, int64_t now)
    size_t t2t_clients_held(hook_clients *t, int64_t now)
    void t2t_clients_free(hook_clients *t)


def clients_table_probe(size_t n, size_t hold_every=0):
    """Look up `n` distinct keys (IPv6 /64 keys) at one instant, each left holding nothing (a full
    bucket, nothing open) but every `hold_every`-th, which keeps one bridge open. Returns (the most
    entries the table counted at any point, the entries held at the end); (-1, i) if the i-th
    lookup found the table full."""
    cdef hook_clients t
    cdef hook_client *e
    cdef unsigned char key[17]
    cdef size_t i, most = 0, held
    memset(&t, 0, sizeof(t))
    memset(key, 0, sizeof(key))
    key[0] = 6
    try:
        for i in range(n):
            for k in range(8):
                key[1 + k] = (i >> (8 * (7 - k))) & 0xFF
            e = t2t_clients_get(&t, key, 17, 1)
            if e == NULL:
                return (-1, i)
            if hold_every and i % hold_every == 0:
                e.open = 1
            if t.count > most:
                most = t.count
        held = t2t_clients_held(&t, 1)
        return (most, held)
    finally:
        t2t_clients_free(&t)
# ---- end client table in C ----
