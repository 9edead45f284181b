# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: freethreading_compatible=True
"""The compiled engine: one direction's copy loop on raw fds, entirely without the GIL.

Same seam as ``_pump.Pump`` (see ``_pump.PumpProtocol``). The fds are the bridge's private,
non-blocking duplicates; a pump never closes or shuts them down. Every wait is a poll() on
the socket and the bridge's wake socket: the bridge stops a pump by making that readable
(and shuts the sockets down for writing), and closes the fds only after ``run()`` returned.
Reads are never shut down, so a closing bridge can still drain what the peers sent and
end with FIN, not RST.
Counters and the activity flag are C atomics: the pump thread writes them without the GIL
while the bridge's checker reads them from another thread.
"""

from libc.stdlib cimport malloc, free
from libc.errno cimport errno, EINTR, EAGAIN, EINVAL, ENOSYS, ENOMEM

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <unistd.h>
    #include <sys/types.h>
    #include <sys/socket.h>

    #ifndef MSG_NOSIGNAL
    #define MSG_NOSIGNAL 0  /* macOS: no flag; CPython already ignores SIGPIPE */
    #endif
    #define T2T_RECV_FLAGS MSG_DONTWAIT
    #define T2T_SEND_FLAGS (MSG_NOSIGNAL | MSG_DONTWAIT)

    #if defined(__linux__)
    #define T2T_HAVE_SPLICE 1
    static ssize_t t2t_splice(int in_fd, int out_fd, size_t len) {
        /* No SPLICE_F_MORE: it corks the socket and delays the last small segment.
           The sockets are O_NONBLOCK; SPLICE_F_NONBLOCK covers the pipe end. */
        return splice(in_fd, NULL, out_fd, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    }
    static int t2t_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC); }
    static int t2t_grow_pipe(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }
    #else
    #define T2T_HAVE_SPLICE 0
    static ssize_t t2t_splice(int in_fd, int out_fd, size_t len) { errno = ENOSYS; return -1; }
    static int t2t_pipe(int fds[2]) { errno = ENOSYS; return -1; }
    static int t2t_grow_pipe(int fd, int size) { errno = ENOSYS; return -1; }
    #endif

    #if EWOULDBLOCK != EAGAIN
    #define T2T_WOULD_BLOCK(e) ((e) == EAGAIN || (e) == EWOULDBLOCK)
    #else
    #define T2T_WOULD_BLOCK(e) ((e) == EAGAIN)
    #endif

    /* Relaxed is enough: the checker only needs each value eventually, not an order. */
    static inline void t2t_count(unsigned long long *p, unsigned long long n) {
        __atomic_fetch_add(p, n, __ATOMIC_RELAXED);
    }
    static inline unsigned long long t2t_read(unsigned long long *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void t2t_mark(int *flag) {
        /* Load first: no cache-line write per chunk while the flag is already set. */
        if (!__atomic_load_n(flag, __ATOMIC_RELAXED)) __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
    }
    static inline int t2t_take(int *flag) { return __atomic_exchange_n(flag, 0, __ATOMIC_RELAXED); }
    static inline int t2t_claim(int *flag) { return __atomic_exchange_n(flag, 1, __ATOMIC_ACQ_REL); }
    """
    const bint HAVE_SPLICE "T2T_HAVE_SPLICE"
    bint would_block "T2T_WOULD_BLOCK"(int e) nogil
    int RECV_FLAGS "T2T_RECV_FLAGS"
    int SEND_FLAGS "T2T_SEND_FLAGS"
    ssize_t t2t_splice(int in_fd, int out_fd, size_t length) nogil
    int t2t_pipe(int *fds) nogil
    int t2t_grow_pipe(int fd, int size) nogil
    void t2t_count(unsigned long long *p, unsigned long long n) nogil
    unsigned long long t2t_read(unsigned long long *p) nogil
    void t2t_mark(int *flag) nogil
    int t2t_take(int *flag) nogil
    int t2t_claim(int *flag) nogil

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

# recv/send buffer. Measured here (benchmarks/run.py, bulk one way over loopback, 2 cores):
# 16 KiB (the original's) costs ~2x the syscalls of 128 KiB for no gain; past 256 KiB
# nothing improves. Allocated on first use; an idle pump touches none of its pages.
# Pipe capacity for splice, toward haproxy's and Go's choice; the kernel caps it at
# /proc/sys/fs/pipe-max-size and we keep the default 64 KiB when it refuses.
cdef enum:
    COPY_BUFFER_BYTES = 256 * 1024
    PIPE_BYTES = 1024 * 1024
    DEFAULT_PIPE_BYTES = 64 * 1024

BUFFER_SIZE = COPY_BUFFER_BYTES
PIPE_SIZE = PIPE_BYTES
SPLICE_AVAILABLE = bool(HAVE_SPLICE)

# Small messages go through recv/send, bulk through splice. Measured here (64-byte ping-pong
# through a relay process, p50 over 7 runs): recv/send adds ~3 us less per round trip than
# splice (one copy of 64 bytes is cheaper than moving a page reference through a pipe, and a
# pipe costs 4 syscalls to set up), while for bulk splice saves ~15% CPU per GB and ~12%
# throughput. So a pump starts with recv/send and switches to splice for good once a single
# read returns this much: a queue that deep means a bulk stream.
cdef enum:
    SPLICE_AFTER_READ_OF = 64 * 1024

cdef enum Outcome:
    OUT_EOF = 0
    OUT_ERROR = 1
    OUT_STOPPED = 2  # the bridge woke us to stop
    OUT_UNSUPPORTED = 3  # splice refused this pair of fds: use recv/send
    OUT_BULK = 4  # recv/send saw a bulk stream: switch to splice
    OUT_READY = 5  # internal: go on (fd ready, or a chunk fully delivered)


cdef class Pump:
    """Copies src -> dst (socket objects whose fds the caller keeps open) without the GIL."""

    cdef int _src
    cdef int _dst
    cdef int _wake
    cdef bint _try_splice
    cdef char *_buffer
    cdef unsigned long long _bytes
    cdef int _active
    cdef int _claimed
    cdef int _errno
    cdef bint _spliced

    def __cinit__(self, src, dst, wake, *, bint splice=True):
        self._src = src.fileno()
        self._dst = dst.fileno()
        self._wake = wake.fileno()
        if self._src < 0 or self._dst < 0 or self._wake < 0:
            raise ValueError("Pump needs open sockets")
        self._try_splice = splice and HAVE_SPLICE
        self._buffer = NULL

    def __dealloc__(self):
        free(self._buffer)

    @property
    def bytes(self):
        """Bytes written in full to dst so far."""
        return t2t_read(&self._bytes)

    @property
    def used_splice(self):
        """True once bytes went through the zero-copy splice path."""
        return self._spliced

    @property
    def last_errno(self):
        """errno of the failure that ended the pump with "error", else 0."""
        return self._errno

    def take_activity(self):
        """Whether bytes moved since the last call; clears the flag."""
        return t2t_take(&self._active) != 0

    def run(self):
        """Relay until EOF ("eof"), an I/O error ("error") or a wake-up ("stopped").

        Runs once, without the GIL."""
        cdef Outcome outcome
        if t2t_claim(&self._claimed):
            raise RuntimeError("a Pump runs only once")
        with nogil:
            outcome = self._relay_copy(self._try_splice)
            if outcome == OUT_BULK:
                outcome = self._relay_splice()
                if outcome == OUT_UNSUPPORTED:
                    outcome = self._relay_copy(False)
        if outcome == OUT_EOF:
            return "eof"
        return "stopped" if outcome == OUT_STOPPED else "error"

    cdef inline Outcome _failed(self, int err) noexcept nogil:
        self._errno = err
        return OUT_ERROR

    cdef Outcome _wait(self, int fd, short events) noexcept nogil:
        """Block until fd is ready (OUT_READY) or the bridge wakes us (OUT_STOPPED)."""
        cdef pollfd p[2]
        p[0].fd = fd
        p[0].events = events
        p[1].fd = self._wake
        p[1].events = POLLIN
        while True:
            p[0].revents = 0
            p[1].revents = 0
            if poll(p, 2, -1) >= 0:  # no timeout needed: the wake byte is never consumed
                return OUT_STOPPED if p[1].revents else OUT_READY
            if errno != EINTR:
                return self._failed(errno)

    cdef inline Outcome _on_failure(self, int fd, short events) noexcept nogil:
        """A call failed with errno: retry (OUT_READY), stop, or report the error."""
        if errno == EINTR:
            return OUT_READY
        if would_block(errno):
            return self._wait(fd, events)
        return self._failed(errno)

    cdef Outcome _write_all(self, int src, size_t length, bint from_pipe) noexcept nogil:
        """Deliver `length` bytes (from the buffer, or from the pipe read end `src`) to dst."""
        cdef ssize_t n
        cdef size_t done = 0
        cdef Outcome waited
        while done < length:
            if from_pipe:
                n = t2t_splice(src, self._dst, length - done)
            else:
                n = c_send(self._dst, self._buffer + done, length - done, SEND_FLAGS)
            if n < 0:
                waited = self._on_failure(self._dst, POLLOUT)
                if waited != OUT_READY:
                    return waited
                continue
            done += <size_t>n
            t2t_count(&self._bytes, <unsigned long long>n)
        t2t_mark(&self._active)
        return OUT_READY  # all delivered: read on

    cdef Outcome _relay_copy(self, bint until_bulk) noexcept nogil:
        cdef ssize_t n
        cdef Outcome step
        if self._buffer == NULL:
            self._buffer = <char *>malloc(COPY_BUFFER_BYTES)
            if self._buffer == NULL:
                return self._failed(ENOMEM)
        cdef bint emptied = True  # the last read took all there was: wait before reading
        while True:
            if emptied:
                # Saves the read that would only say EAGAIN: for request/response traffic
                # that is one syscall less per message (measured: ~10 us p50 ping-pong here).
                step = self._wait(self._src, POLLIN)
                if step != OUT_READY:
                    return step
            n = c_recv(self._src, self._buffer, COPY_BUFFER_BYTES, RECV_FLAGS)
            if n == 0:
                return OUT_EOF
            if n < 0:
                emptied = False  # _on_failure waits on EAGAIN itself
                step = self._on_failure(self._src, POLLIN)
                if step != OUT_READY:
                    return step
                continue
            step = self._write_all(-1, <size_t>n, False)
            if step != OUT_READY:
                return step
            if until_bulk and n >= SPLICE_AFTER_READ_OF:
                return OUT_BULK
            emptied = n < SPLICE_AFTER_READ_OF

    cdef Outcome _relay_splice(self) noexcept nogil:
        """socket -> pipe -> socket: the bytes stay in kernel pages, never copied to us."""
        cdef int pipe_fds[2]
        cdef int capacity
        cdef ssize_t n
        cdef Outcome outcome
        if t2t_pipe(pipe_fds) != 0:
            return OUT_UNSUPPORTED
        capacity = t2t_grow_pipe(pipe_fds[1], PIPE_BYTES)
        if capacity <= 0:
            capacity = DEFAULT_PIPE_BYTES
        while True:
            n = t2t_splice(self._src, pipe_fds[1], <size_t>capacity)
            if n == 0:
                outcome = OUT_EOF
                break
            if n < 0:
                if not self._spliced and (errno == EINVAL or errno == ENOSYS):
                    outcome = OUT_UNSUPPORTED  # e.g. a kernel or socket type without splice
                    break
                # EAGAIN: the pipe is always drained, so it is the socket that has no data.
                outcome = self._on_failure(self._src, POLLIN)
                if outcome != OUT_READY:
                    break
                continue
            self._spliced = True
            # Drain the pipe completely: a byte left in it would be a byte lost at the end.
            outcome = self._write_all(pipe_fds[0], <size_t>n, True)
            if outcome != OUT_READY:
                break
        close(pipe_fds[0])
        close(pipe_fds[1])
        return outcome
