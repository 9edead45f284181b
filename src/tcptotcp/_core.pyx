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
import threading

from ._bridge import REASONS, report_unraisable

from cpython.ref cimport Py_INCREF, Py_DECREF
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from ._loop cimport *  # noqa: F403 (the engine's C API)

BUFFER_SIZE = BUFFER_BYTES
SPLICE_AVAILABLE = bool(HAVE_SPLICE)

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

    def stop(self):
        """End it with reason "stopped" (no-op once it ended); returns at once."""
        if self._b != NULL:
            t2t_stop(self._b)

    def counts(self):
        """Bytes delivered in full so far: (1 -> 2, 2 -> 1)."""
        return (t2t_bytes(self._b, 0), t2t_bytes(self._b, 1))

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


def start(stream1, stream2, plan, on_end, *, bint splice=True):
    """Relay between private dups of two connected sockets on a loop thread; returns at once.

    Given two fds (ints) instead, the bridge adopts them: no dups; they are its to close.

    `plan` carries ``interval`` (seconds between idle checks), ``idle_limit``,
    ``activity_both`` and ``half_close``. ``on_end(bytes_1_to_2, bytes_2_to_1, reason,
    seconds)`` is called once, from the results thread, after the dups are closed.
    """
    _ensure_engine()
    cdef bint adopt = isinstance(stream1, int) and isinstance(stream2, int)
    cdef int fd1 = stream1 if adopt else stream1.fileno()
    cdef int fd2 = stream2 if adopt else stream2.fileno()
    cdef int64_t interval_ns = min(int(plan.interval) * 1_000_000_000, LONGEST_INTERVAL_NS)
    cdef uint64_t idle_limit = min(int(plan.idle_limit), MOST_CHECKS)
    cdef Relay relay = Relay.__new__(Relay)
    relay._on_end = on_end
    Py_INCREF(relay)  # held for the engine until the results thread finished it
    relay._b = t2t_start(fd1, fd2, adopt, interval_ns, idle_limit, plan.activity_both, plan.half_close,
                         splice, <void *>relay)
    if relay._b == NULL:
        err = errno
        Py_DECREF(relay)
        raise OSError(err, os.strerror(err))
    return relay


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


cdef object _peer_of(t2t_bridge *b):
    """The client's address as Python's accept() gives it."""
    cdef char host[128]
    cdef int port
    cdef unsigned int flowinfo, scope_id
    cdef int family = t2t_peer(b, host, sizeof(host), &port, &flowinfo, &scope_id)
    text = host.decode("utf-8", "surrogateescape")
    if family == socket.AF_INET:
        return (text, port)
    if family == socket.AF_INET6:
        return (text, port, flowinfo, scope_id)
    return text


cdef class Listener:
    """Accepting and connecting in the loops (Linux): see `listen()`."""

    cdef t2t_listener *_l

    def fileno(self):
        """Readable when `take()` has something."""
        return t2t_listener_fd(self._l)

    @property
    def active(self):
        """Clients accepted and not yet reported ended (or failed)."""
        return t2t_listener_active(self._l)

    @property
    def next_id(self):
        """The number the next client will get."""
        return t2t_listener_next_id(self._l)

    def take(self, bint brief=False):
        """What happened since the last take: ``(opened, ended, gone)``. `opened` holds ``(id,
        peer, relay)`` per bridge that started relaying; `ended` holds ``(id, peer, opened,
        bytes_1_to_2, bytes_2_to_1, reason, seconds, errno, timed_out)`` per bridge that ended,
        where `opened` is 1 for a bridge `opened` held in an earlier take, 2 for one that opened
        and ended since the last take (it is in `ended` only: no relay object for a bridge
        already gone), 0 when its upstream connect failed, and 3 when the access lists refused
        the client. With `brief`, the bridges of kind 2 are only summed up in `gone`:
        ``(count, bytes_1_to_2, bytes_2_to_1)``."""
        cdef t2t_bridge *opened_list
        cdef t2t_bridge *done_list
        cdef t2t_bridge *b
        cdef Relay relay
        cdef unsigned long long gone_count = 0, gone_up = 0, gone_down = 0
        with nogil:
            t2t_listener_take(self._l, &opened_list, &done_list)
        opened = []
        while opened_list != NULL:
            b = opened_list
            opened_list = b.open_next
            if b.open_untaken == 2:
                t2t_release(b)  # reported once, as ended, below
                continue
            relay = Relay.__new__(Relay)
            relay._b = b  # the reference the opened list held is the relay's now
            opened.append((b.conn_id, _peer_of(b), relay))
        ended = []
        while done_list != NULL:
            b = done_list
            done_list = b.done_next
            if b.open_untaken == 2 and brief:
                gone_count += 1
                gone_up += t2t_bytes(b, 0)
                gone_down += t2t_bytes(b, 1)
            else:
                opened_state = 3 if b.refused else 2 if b.open_untaken == 2 else b.opened
                ended.append((b.conn_id, _peer_of(b), opened_state, t2t_bytes(b, 0), t2t_bytes(b, 1),
                              _REASONS[b.reason], (b.ended_ns - b.started_ns) / 1e9, b.error, bool(b.timed_out)))
            t2t_release(b)
        return opened, ended, (gone_count, gone_up, gone_down)

    def stop(self, bint cancel_connects=True):
        """Stop accepting; once it returns, the loops no longer touch the listening socket, and
        opened bridges run on. Clients still connecting upstream end as failed (ECANCELED), so
        that no bridge opens after it returned (the next take has them all); or, without
        cancel_connects, they connect as usual and open later."""
        with nogil:
            t2t_listener_stop(self._l, cancel_connects)


def listen(listener, upstream_family, upstream_sockaddr, sockopts, plan, connect_timeout, max_active, first_id,
           *, bint splice=True, access=None):
    """Let the loops accept clients of `listener` (a listening socket the caller keeps open and
    closes only after `Listener.stop()`) and relay each to the upstream at `upstream_sockaddr`
    (numeric, as getaddrinfo gives it), setting `sockopts` ``[(level, name, int), ...]`` on each
    upstream socket. Raises OSError (ENOSYS where the loops cannot accept: off Linux)."""
    _ensure_engine()
    cdef sockaddr_storage address
    cdef socklen_t address_len = 0
    cdef int options[8][3]
    cdef int n = 0
    cdef int rc
    if len(sockopts) > MAX_SOCKOPTS:
        raise ValueError(f"at most {MAX_SOCKOPTS} socket options")
    for level, name, value in sockopts:
        options[n][0] = level
        options[n][1] = name
        options[n][2] = value
        n += 1
    if upstream_family == socket.AF_UNIX:
        path = os.fsencode(upstream_sockaddr)
        rc = t2t_sockaddr_unix(path, len(path), &address, &address_len)
    else:
        host = upstream_sockaddr[0].encode("ascii")
        flowinfo = upstream_sockaddr[2] if len(upstream_sockaddr) > 2 else 0
        scope_id = upstream_sockaddr[3] if len(upstream_sockaddr) > 3 else 0
        rc = t2t_sockaddr_ip(upstream_family, host, upstream_sockaddr[1], flowinfo, scope_id, &address,
                             &address_len)
    if rc != 0:
        raise ValueError(f"not a numeric address: {upstream_sockaddr!r}")
    cdef int64_t interval_ns = min(int(plan.interval) * 1_000_000_000, LONGEST_INTERVAL_NS)
    cdef uint64_t idle_limit = min(int(plan.idle_limit), MOST_CHECKS)
    cdef t2t_access rules
    memset(&rules, 0, sizeof(rules))
    tables = None
    if access is not None:  # (closed, allow4, deny4, allow6, deny6): see AccessList.tables()
        closed, *tables = access
        if len(tables) != 4 or not all(isinstance(table, bytes) for table in tables):
            raise ValueError("access: (closed, allow4, deny4, allow6, deny6), the lists as bytes")
        rules.active = 1
        rules.closed = bool(closed)
        for i, (table, width) in enumerate(zip(tables, (4, 4, 16, 16))):
            if len(table) % (2 * width):
                raise ValueError("an access table holds (network, mask) pairs")
            rules.lists[i] = <const unsigned char *>(<bytes>table)  # bytes: checked above
            rules.counts[i] = len(table) // (2 * width)
    cdef Listener result = Listener.__new__(Listener)
    result._l = t2t_listen(listener.fileno(), <sockaddr *>&address, address_len, &options[0][0], n,
                           int(connect_timeout * 1e9), interval_ns, idle_limit, plan.activity_both, plan.half_close,
                           splice, max_active, first_id, &rules)
    if result._l == NULL:
        err = errno
        raise OSError(err, os.strerror(err))
    return result
