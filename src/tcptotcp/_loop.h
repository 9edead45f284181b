/* The compiled engine's event loops: many bridges on a few threads, in C, never touching Python.
 *
 * A fixed set of loop threads (started with the first bridge, kept for the process) each waits
 * on one poller (epoll on Linux, kqueue elsewhere) and relays every bridge assigned to it. Per
 * bridge the loop holds only bookkeeping: bytes are read into the loop's one buffer and written
 * on at once; only the unsent tail of a short write is copied into a buffer of the bridge's own,
 * and that direction then stops reading until the tail is delivered, so backpressure stays in
 * the kernel. A direction whose reads come in 64 KiB or more switches to splice through a pipe
 * taken from the loop's pool while it holds bytes and given back once drained.
 *
 * Readiness is edge-triggered: a side's `readable`/`writable` flag is set by an event and
 * cleared only by the EAGAIN that proves it stale. Interest is registered once; only a source
 * whose direction waits to write is unwatched for input until it can be read again.
 * Everything a bridge does after it starts (idle checks, ending, the bounded drain of unread
 * input, closing its fds) is an event or a timer of its loop; a loop never waits on one bridge.
 * Python learns of ended bridges from the done queue (t2t_done_take), which one Python thread
 * of _core.pyx empties.
 *
 * Threads: Python threads call t2t_start / t2t_stop / t2t_bytes; they touch a loop only through
 * its locked inbox. Everything else about a bridge belongs to its loop's thread.
 */
#ifndef T2T_LOOP_H
#define T2T_LOOP_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>

#if defined(__linux__)
#include <sys/epoll.h>
#include <sys/eventfd.h>
#define T2T_EPOLL 1
#define T2T_HAVE_SPLICE 1
#else
#include <sys/event.h>
#define T2T_EPOLL 0
#define T2T_HAVE_SPLICE 0
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: no flag; CPython already ignores SIGPIPE */
#endif
#ifndef MSG_DONTWAIT
#define MSG_DONTWAIT 0 /* the fds are O_NONBLOCK anyway */
#endif

#if EWOULDBLOCK != EAGAIN
#define T2T_WOULD_BLOCK(e) ((e) == EAGAIN || (e) == EWOULDBLOCK)
#else
#define T2T_WOULD_BLOCK(e) ((e) == EAGAIN)
#endif

enum {
    /* One per loop. 16 KiB (the original's) costs ~2x the syscalls of 128 KiB for bulk on
       loopback; past 256 KiB nothing improves (benchmarks/run.py). */
    T2T_BUFFER_BYTES = 256 * 1024,
    /* A read this large means a queue that deep: a bulk stream, which splice serves with
       15-55% less CPU per GB; smaller messages stay on recv/send (~3 us less per round trip). */
    T2T_SPLICE_AFTER = 64 * 1024,
    T2T_PIPE_BYTES = 1024 * 1024, /* the kernel caps it at /proc/sys/fs/pipe-max-size */
    T2T_DEFAULT_PIPE_BYTES = 64 * 1024,
    T2T_POOLED_PIPES = 8,  /* idle pipes a loop keeps (2 fds each) */
    T2T_MAX_EVENTS = 256,
    T2T_READS_PER_TURN = 8, /* then the bridge waits its turn behind the others */
    T2T_MAX_LOOPS = 64,
    /* A new bridge goes to the first loop that is neither busy (more than half of its recent
       time spent working) nor carrying PACK bridges more than the lightest loop; else to the
       lightest. Light traffic thus stays on few loops, which stay awake and take new bridges
       without a wake-up each (a third less CPU per short connection with 2 loops), while bulk
       streams and crowds still spread over every loop. */
    T2T_PACK = 64,
    T2T_BUSY_PERMILLE = 500,
};
#define T2T_BUSY_WINDOW_NS 20000000LL /* the busy share is measured over 20 ms of a loop's time */
#define T2T_BUSY_STALE_NS 100000000LL /* a measure this old belongs to a loop now asleep: idle */
/* Draining unread input before close (a close with unread bytes sends RST, which destroys
   what the peer had not yet read): stop after 30 ms of quiet, at the latest after 250 ms. */
#define T2T_DRAIN_QUIET_NS 30000000LL
#define T2T_DRAIN_LIMIT_NS 250000000LL
#define T2T_NEVER INT64_MAX

enum t2t_reason { T2T_RUNNING = 0, T2T_CLOSED, T2T_IDLE, T2T_ERROR, T2T_STOPPED };
enum t2t_state { T2T_QUEUED = 0, T2T_RELAYING, T2T_DRAINING, T2T_DONE };
enum { T2T_ASK_START = 1, T2T_ASK_STOP = 2 };

typedef struct t2t_pipe {
    int r, w, capacity;
    struct t2t_pipe *next;
} t2t_pipe;

struct t2t_bridge;

typedef struct t2t_side {
    struct t2t_bridge *bridge;
    int fd;
    unsigned char readable, writable; /* last known readiness (edge-triggered) */
    unsigned char input_masked;       /* not watched for input while its direction waits to write */
    unsigned char fin_sent;           /* we shut it down for writing */
    unsigned char drained, dropped;   /* teardown: done reading it; it had unread bytes */
} t2t_side;

/* One direction: reads side[i], writes side[1 - i]. */
typedef struct t2t_dir {
    unsigned long long bytes; /* delivered in full; read by Python threads (atomic) */
    char *pending;            /* unsent tail of a read (recv/send path) */
    size_t pending_off, pending_len;
    t2t_pipe *pipe;           /* spliced bytes not yet written (held only while in_pipe) */
    size_t in_pipe;
    unsigned char active, ended, bulk, spliced;
} t2t_dir;

typedef struct t2t_bridge {
    struct t2t_loop *loop;
    t2t_side side[2];
    t2t_dir dir[2];
    int64_t started_ns, ended_ns, interval_ns, next_check_ns, drain_quiet_ns, drain_limit_ns;
    uint64_t idle_limit, idle_checks;
    unsigned char activity_both, half_close, may_splice, state, reason, queued_again, reported;
    int asked;  /* T2T_ASK_* waiting in the inbox (under the loop's lock) */
    int taking; /* T2T_ASK_* taken from the inbox, being handled by the loop */
    int refs;   /* the Python object, the engine until reaped, each inbox entry (atomic) */
    int error;  /* errno behind reason "error" */
    size_t heap_index;
    struct t2t_bridge *inbox_next, *work_next, *again_next, *done_next, *prev, *next;
    void *owner; /* the Python object to tell when done (a strong reference, held by _core) */
} t2t_bridge;

typedef struct t2t_loop {
    int poller, wake_r, wake_w;
    char *buffer;
    pthread_t thread;
    pthread_mutex_t lock;    /* guards inbox and wake_pending */
    t2t_bridge *inbox;
    int wake_pending;
    int load;                /* bridges assigned and not yet done (atomic) */
    t2t_bridge **heap;       /* timers: bridges by their next deadline */
    size_t heap_len, heap_cap;
    t2t_bridge *again;       /* ran out of turns with input left */
    t2t_bridge *done_head, *done_tail;
    t2t_bridge *all;         /* bridges this loop relays (for the fork child) */
    t2t_pipe *pool;
    int pooled;              /* atomic: read by t2t_stats */
    int64_t now;
    int64_t busy_ns, idle_ns; /* this window's time working and waiting */
    int busy_permille;       /* atomic: the last window's share of work */
    int64_t busy_at;         /* atomic: when it was measured */
} t2t_loop;

typedef struct t2t_engine {
    pthread_mutex_t lock;    /* guards starting the loops, the done queue and the claim */
    pthread_cond_t done_cond;
    t2t_bridge *done_head, *done_tail;
    t2t_loop *loops;
    int nloops;
    /* A thread that claimed the done queue (t2t_done_claim) is told of ended bridges through
       claim_r instead of done_cond, and takes them itself: the results thread waits meanwhile. */
    int claimed, claim_told, claim_r, claim_w;
} t2t_engine;

static t2t_engine t2t_the_engine = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, NULL, 0,
                                    0, 0, -1, -1};

/* ---- small helpers ------------------------------------------------------------------------ */

static int64_t t2t_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t t2t_add(int64_t a, int64_t b) { return a > T2T_NEVER - b ? T2T_NEVER : a + b; }

static void t2t_count(t2t_dir *d, size_t n) {
    __atomic_fetch_add(&d->bytes, (unsigned long long)n, __ATOMIC_RELAXED);
    d->active = 1;
}

static int t2t_set_nonblocking(int fd) {
    int on = 1;
    return ioctl(fd, FIONBIO, &on); /* one syscall, where F_GETFL + F_SETFL take two */
}

/* The bridge's own fd for the caller's fd: a private dup, or (adopt) the fd itself. */
static int t2t_own_fd(int fd, int adopt) {
    int own = adopt ? fd : fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return -1;
    if (t2t_set_nonblocking(own) != 0) {
        int saved = errno;
        if (!adopt) close(own);
        errno = saved;
        return -1;
    }
    return own;
}

/* Whether the connection behind fd was reset rather than closed with a FIN. A reset reaches
   one caller as ECONNRESET, and a splice that had moved bytes before the send failed drops
   even that: the reader then sees a plain EOF. Until we send our own FIN, a connection that
   got the peer's FIN is in CLOSE_WAIT, and one that got a reset is closed outright. */
static int t2t_was_reset(int fd) {
#if defined(__linux__) && defined(TCP_INFO)
    struct tcp_info info;
    socklen_t len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 && len > 0)
        return info.tcpi_state == 7; /* TCP_CLOSE */
#else
    (void)fd;
#endif
    return 0; /* not TCP (a Unix socket), or no TCP_INFO here */
}

/* ---- the poller ------------------------------------------------------------------------------ */

static int t2t_poller_new(void) {
#if T2T_EPOLL
    return epoll_create1(EPOLL_CLOEXEC);
#else
    int fd = kqueue();
    if (fd >= 0) fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
#endif
}

/* Watch fd for both readiness kinds, edge-triggered, for the whole life of the bridge. */
static int t2t_poller_add(t2t_loop *L, int fd, void *tag) {
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = tag;
    return epoll_ctl(L->poller, EPOLL_CTL_ADD, fd, &ev);
#else
    struct kevent ev[2];
    EV_SET(&ev[0], fd, EVFILT_READ, EV_ADD | EV_CLEAR, 0, 0, tag);
    EV_SET(&ev[1], fd, EVFILT_WRITE, EV_ADD | EV_CLEAR, 0, 0, tag);
    return kevent(L->poller, ev, 2, NULL, 0, NULL);
#endif
}

/* Watch fd for input or stop: a direction that holds bytes its destination cannot take yet
   reads nothing, so its source's input would only wake the loop for nothing (one wake-up per
   arriving segment in a bulk stream). Output stays watched. Turning input back on reports it at
   once if the fd is readable, so no edge is lost. */
static int t2t_poller_watch_input(t2t_loop *L, int fd, void *tag, int on) {
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = (on ? EPOLLIN | EPOLLRDHUP : 0) | EPOLLOUT | EPOLLET;
    ev.data.ptr = tag;
    return epoll_ctl(L->poller, EPOLL_CTL_MOD, fd, &ev);
#else
    struct kevent ev;
    EV_SET(&ev, fd, EVFILT_READ, on ? EV_ENABLE : EV_DISABLE, 0, 0, tag);
    return kevent(L->poller, &ev, 1, NULL, 0, NULL);
#endif
}

/* Before close: epoll keys its entries by open file, and the caller may still hold a dup of
   ours, so a plain close would leave events coming for a freed bridge. */
static void t2t_poller_del(t2t_loop *L, int fd) {
#if T2T_EPOLL
    struct epoll_event unused;
    epoll_ctl(L->poller, EPOLL_CTL_DEL, fd, &unused);
#else
    (void)L;
    (void)fd; /* kqueue drops a descriptor's events when it is closed */
#endif
}

/* A non-blocking eventfd (one fd in both) or, off Linux, a pipe; 0, or -1 with errno. */
static int t2t_signal_new(int *r, int *w) {
#if T2T_EPOLL
    *r = *w = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return *r < 0 ? -1 : 0;
#else
    int fds[2];
    if (pipe(fds) != 0) return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(fds[i], F_SETFD, FD_CLOEXEC);
        fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
    }
    *r = fds[0];
    *w = fds[1];
    return 0;
#endif
}

static void t2t_signal_fd(int fd) {
#if T2T_EPOLL
    uint64_t one = 1;
    ssize_t unused = write(fd, &one, sizeof(one));
#else
    char one = 1;
    ssize_t unused = write(fd, &one, 1);
#endif
    (void)unused; /* a full counter or pipe wakes its reader just as well */
}

static void t2t_drain_fd(int fd) {
    char scratch[64];
    while (read(fd, scratch, sizeof(scratch)) > 0) {
    }
}

static int t2t_wake_new(t2t_loop *L) {
    if (t2t_signal_new(&L->wake_r, &L->wake_w) != 0) return -1;
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    return epoll_ctl(L->poller, EPOLL_CTL_ADD, L->wake_r, &ev);
#else
    struct kevent ev;
    EV_SET(&ev, L->wake_r, EVFILT_READ, EV_ADD, 0, 0, NULL);
    return kevent(L->poller, &ev, 1, NULL, 0, NULL);
#endif
}

static void t2t_wake(t2t_loop *L) { t2t_signal_fd(L->wake_w); }

static void t2t_unwake(t2t_loop *L) { t2t_drain_fd(L->wake_r); }

/* ---- pipes for splice ---------------------------------------------------------------------- */

#if T2T_HAVE_SPLICE
static t2t_pipe *t2t_pipe_take(t2t_loop *L) {
    t2t_pipe *p = L->pool;
    if (p) {
        L->pool = p->next;
        __atomic_fetch_sub(&L->pooled, 1, __ATOMIC_RELAXED);
        return p;
    }
    int fds[2];
    p = (t2t_pipe *)malloc(sizeof(*p));
    if (!p) return NULL;
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
        free(p);
        return NULL;
    }
    p->r = fds[0];
    p->w = fds[1];
    p->capacity = fcntl(p->w, F_SETPIPE_SZ, T2T_PIPE_BYTES);
    if (p->capacity <= 0) p->capacity = T2T_DEFAULT_PIPE_BYTES;
    return p;
}
#endif

static void t2t_pipe_close(t2t_pipe *p) {
    close(p->r);
    close(p->w);
    free(p);
}

/* Only an empty pipe goes back to the pool: a byte left in it would reach another bridge. */
static void t2t_pipe_give(t2t_loop *L, t2t_pipe *p, size_t still_in_it) {
    if (still_in_it || L->pooled >= T2T_POOLED_PIPES) {
        t2t_pipe_close(p);
        return;
    }
    p->next = L->pool;
    L->pool = p;
    __atomic_fetch_add(&L->pooled, 1, __ATOMIC_RELAXED);
}

#if T2T_HAVE_SPLICE
static ssize_t t2t_splice(int from, int to, size_t n) {
    /* No SPLICE_F_MORE: it corks the socket and delays the last small segment. */
    return splice(from, NULL, to, NULL, n, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}
#endif

/* ---- timers: a binary heap of bridges by deadline ------------------------------------------- */

static int64_t t2t_deadline(const t2t_bridge *b) {
    if (b->state == T2T_RELAYING) return b->next_check_ns;
    return b->drain_quiet_ns < b->drain_limit_ns ? b->drain_quiet_ns : b->drain_limit_ns;
}

static void t2t_heap_place(t2t_loop *L, size_t i, t2t_bridge *b) {
    L->heap[i] = b;
    b->heap_index = i;
}

static void t2t_heap_fix(t2t_loop *L, size_t i) {
    t2t_bridge *b = L->heap[i];
    int64_t key = t2t_deadline(b);
    while (i > 0) { /* up */
        size_t parent = (i - 1) / 2;
        if (t2t_deadline(L->heap[parent]) <= key) break;
        t2t_heap_place(L, i, L->heap[parent]);
        i = parent;
    }
    for (;;) { /* down */
        size_t child = 2 * i + 1;
        if (child >= L->heap_len) break;
        if (child + 1 < L->heap_len && t2t_deadline(L->heap[child + 1]) < t2t_deadline(L->heap[child]))
            child++;
        if (t2t_deadline(L->heap[child]) >= key) break;
        t2t_heap_place(L, i, L->heap[child]);
        i = child;
    }
    t2t_heap_place(L, i, b);
}

static int t2t_heap_push(t2t_loop *L, t2t_bridge *b) {
    if (L->heap_len == L->heap_cap) {
        size_t cap = L->heap_cap ? 2 * L->heap_cap : 64;
        t2t_bridge **grown = (t2t_bridge **)realloc(L->heap, cap * sizeof(*grown));
        if (!grown) return -1;
        L->heap = grown;
        L->heap_cap = cap;
    }
    t2t_heap_place(L, L->heap_len++, b);
    t2t_heap_fix(L, b->heap_index);
    return 0;
}

static void t2t_heap_remove(t2t_loop *L, t2t_bridge *b) {
    size_t i = b->heap_index;
    if (i == SIZE_MAX) return;
    b->heap_index = SIZE_MAX;
    t2t_bridge *last = L->heap[--L->heap_len];
    if (last != b) {
        t2t_heap_place(L, i, last);
        t2t_heap_fix(L, i);
    }
}

/* ---- relaying -------------------------------------------------------------------------------- */

static void t2t_end(t2t_bridge *b, int reason, int error);
static void t2t_drain(t2t_bridge *b);
static void t2t_release(t2t_bridge *b);

static void t2t_fail(t2t_bridge *b, int error) { t2t_end(b, T2T_ERROR, error); }

static void t2t_watch_input(t2t_bridge *b, int s, int on) {
    t2t_side *side = &b->side[s];
    if (side->input_masked == !on) return;
    if (t2t_poller_watch_input(b->loop, side->fd, side, on) == 0) side->input_masked = (unsigned char)!on;
}

static int t2t_flush_held(t2t_bridge *b, int i);

/* Deliver what direction i still holds; 1 once it holds nothing, 0 to wait (or if it failed).
   While it waits, its source is not watched for input. */
static int t2t_flush(t2t_bridge *b, int i) {
    int flushed = t2t_flush_held(b, i);
    if (b->state == T2T_RELAYING) t2t_watch_input(b, i, flushed);
    return flushed;
}

static int t2t_flush_held(t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *dst = &b->side[1 - i];
    while (d->pending_off < d->pending_len) {
        if (!dst->writable) return 0;
        ssize_t n = send(dst->fd, d->pending + d->pending_off, d->pending_len - d->pending_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (T2T_WOULD_BLOCK(errno)) dst->writable = 0;
            else t2t_fail(b, errno);
            return 0;
        }
        d->pending_off += (size_t)n;
        t2t_count(d, (size_t)n);
    }
    if (d->pending) {
        free(d->pending);
        d->pending = NULL;
        d->pending_off = d->pending_len = 0;
    }
#if T2T_HAVE_SPLICE
    while (d->in_pipe) {
        if (!dst->writable) return 0;
        ssize_t n = t2t_splice(d->pipe->r, dst->fd, d->in_pipe);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (T2T_WOULD_BLOCK(errno)) dst->writable = 0;
            else t2t_fail(b, errno);
            return 0;
        }
        d->in_pipe -= (size_t)n;
        t2t_count(d, (size_t)n);
    }
#endif
    if (d->pipe) {
        t2t_pipe_give(b->loop, d->pipe, 0);
        d->pipe = NULL;
    }
    return 1;
}

/* Send what was just read into the loop's buffer; keep the unsent tail as the bridge's own. */
static void t2t_send_read(t2t_bridge *b, int i, size_t n) {
    t2t_dir *d = &b->dir[i];
    t2t_side *dst = &b->side[1 - i];
    const char *data = b->loop->buffer;
    size_t done = 0;
    while (done < n) {
        ssize_t sent = send(dst->fd, data + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (!T2T_WOULD_BLOCK(errno)) {
                t2t_fail(b, errno);
                return;
            }
            dst->writable = 0;
            break;
        }
        done += (size_t)sent;
        t2t_count(d, (size_t)sent);
    }
    if (done < n) {
        d->pending = (char *)malloc(n - done);
        if (!d->pending) {
            t2t_fail(b, ENOMEM);
            return;
        }
        memcpy(d->pending, data + done, n - done);
        d->pending_len = n - done;
        d->pending_off = 0;
    }
}

/* Direction i read EOF: forward it (half-close) or end the bridge, unless it was a reset. */
static void t2t_eof(t2t_bridge *b, int i) {
    t2t_side *src = &b->side[i], *other = &b->side[1 - i];
    b->dir[i].ended = 1;
    /* The other side too: a reset there may not have reached a read yet, and a reset is
       never reported as "closed". */
    if ((!src->fin_sent && t2t_was_reset(src->fd)) || (!other->fin_sent && t2t_was_reset(other->fd))) {
        t2t_fail(b, ECONNRESET);
        return;
    }
    if (b->half_close && !b->dir[1 - i].ended) {
        shutdown(other->fd, SHUT_WR);
        other->fin_sent = 1;
        return;
    }
    t2t_end(b, T2T_CLOSED, 0);
}

static void t2t_again(t2t_bridge *b) {
    if (b->queued_again) return;
    b->queued_again = 1;
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED); /* it may close, and be reaped, before its turn */
    b->again_next = b->loop->again;
    b->loop->again = b;
}

static void t2t_pump(t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *src = &b->side[i];
    t2t_loop *L = b->loop;
    for (int turn = 0; b->state == T2T_RELAYING && !d->ended; turn++) {
        if (!t2t_flush(b, i) || !src->readable) return;
        if (turn == T2T_READS_PER_TURN) {
            t2t_again(b);
            return;
        }
        ssize_t n;
#if T2T_HAVE_SPLICE
        if (d->bulk) {
            if (!d->pipe && !(d->pipe = t2t_pipe_take(L))) {
                d->bulk = 0; /* out of fds for a pipe: recv/send still works */
                continue;
            }
            n = t2t_splice(src->fd, d->pipe->w, (size_t)d->pipe->capacity);
            if (n < 0 && !d->spliced && (errno == EINVAL || errno == ENOSYS)) {
                d->bulk = 0; /* this pair cannot splice */
                b->may_splice = 0;
                continue;
            }
        } else
#endif
        {
            n = recv(src->fd, L->buffer, T2T_BUFFER_BYTES, MSG_DONTWAIT);
        }
        if (n == 0) {
            t2t_eof(b, i);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (T2T_WOULD_BLOCK(errno)) src->readable = 0;
            else t2t_fail(b, errno);
            return;
        }
        /* Only EAGAIN proves the source empty. A short read does not: recv stops at TCP's
           urgent mark and at a Unix message with ancillary data, and a short splice when the
           pipe runs out of slots; no new edge would come for what is already queued. */
        b->side[1 - i].writable = 1; /* try the write once; EAGAIN says otherwise */
        if (d->bulk) {
            d->spliced = 1;
            d->in_pipe = (size_t)n;
        } else {
            t2t_send_read(b, i, (size_t)n);
            if (b->may_splice && (size_t)n >= T2T_SPLICE_AFTER) d->bulk = 1;
        }
    }
}

static void t2t_service(t2t_bridge *b) {
    if (b->state == T2T_RELAYING) {
        t2t_pump(b, 0);
        t2t_pump(b, 1);
    } else if (b->state == T2T_DRAINING) {
        t2t_drain(b);
    }
}

/* ---- ending ---------------------------------------------------------------------------------- */

static void t2t_drop_held(t2t_bridge *b) {
    for (int i = 0; i < 2; i++) {
        t2t_dir *d = &b->dir[i];
        free(d->pending);
        d->pending = NULL;
        if (d->pipe) t2t_pipe_give(b->loop, d->pipe, d->in_pipe);
        d->pipe = NULL;
        d->in_pipe = 0;
    }
}

/* The first reason wins. FIN both ways after what was relayed; reads stay open so the
   drain can take what the peers still send and the close ends with FIN, not RST. */
static void t2t_end(t2t_bridge *b, int reason, int error) {
    if (b->state != T2T_RELAYING) return;
    b->state = T2T_DRAINING;
    b->reason = (unsigned char)reason;
    b->error = error;
    t2t_drop_held(b);
    for (int s = 0; s < 2; s++) {
        if (b->dir[s].ended) {
            /* Its FIN was read: nothing more can arrive, so close() alone sends ours, cleanly. */
            b->side[s].drained = 1;
            continue;
        }
        t2t_watch_input(b, s, 1); /* the drain reads it */
        if (!b->side[s].fin_sent) shutdown(b->side[s].fd, SHUT_WR);
    }
    b->drain_limit_ns = t2t_add(b->loop->now, T2T_DRAIN_LIMIT_NS);
    b->drain_quiet_ns = T2T_NEVER;
    t2t_drain(b);
}

static void t2t_close(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    t2t_heap_remove(L, b);
    for (int s = 0; s < 2; s++) {
        t2t_poller_del(L, b->side[s].fd);
        close(b->side[s].fd);
        b->side[s].fd = -1;
    }
    if (b->prev) b->prev->next = b->next;
    else L->all = b->next;
    if (b->next) b->next->prev = b->prev;
    b->prev = b->next = NULL;
    b->ended_ns = t2t_now();
    __atomic_store_n(&b->state, T2T_DONE, __ATOMIC_RELEASE);
    b->done_next = NULL;
    if (L->done_tail) L->done_tail->done_next = b;
    else L->done_head = b;
    L->done_tail = b;
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
}

/* Drop what the peers still send. The common case, nothing unread, costs one recv a side. */
static void t2t_drain(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    for (int s = 0; s < 2; s++) {
        t2t_side *side = &b->side[s];
        while (!side->drained) {
            ssize_t n = recv(side->fd, L->buffer, T2T_BUFFER_BYTES, MSG_DONTWAIT);
            if (n > 0) {
                side->dropped = 1;
                b->drain_quiet_ns = t2t_add(L->now, T2T_DRAIN_QUIET_NS);
                continue;
            }
            if (n < 0 && errno == EINTR) continue;
            /* EOF or an error ends it; EAGAIN too if it never had anything unread. */
            if (n == 0 || !T2T_WOULD_BLOCK(errno) || !side->dropped) side->drained = 1;
            break;
        }
    }
    int64_t deadline = t2t_deadline(b);
    if ((b->side[0].drained && b->side[1].drained) || L->now >= deadline) {
        t2t_close(b);
    } else if (b->heap_index != SIZE_MAX) {
        t2t_heap_fix(L, b->heap_index);
    } else if (t2t_heap_push(L, b) != 0) {
        t2t_close(b);
    }
}

/* The contract's idle rule: a check at the start and every r seconds after it. */
static void t2t_idle_check(t2t_bridge *b) {
    unsigned char a = b->dir[0].active, z = b->dir[1].active;
    b->dir[0].active = b->dir[1].active = 0;
    if (b->activity_both ? (a && z) : (a || z)) {
        b->idle_checks = 0;
    } else if (b->idle_checks > b->idle_limit) {
        t2t_end(b, T2T_IDLE, 0);
        return;
    } else {
        b->idle_checks++;
    }
    b->next_check_ns = t2t_add(b->next_check_ns, b->interval_ns);
}

/* ---- the loop -------------------------------------------------------------------------------- */

static void t2t_begin(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    b->state = T2T_RELAYING;
    b->next = L->all;
    if (L->all) L->all->prev = b;
    L->all = b;
    for (int s = 0; s < 2; s++) {
        if (t2t_poller_add(L, b->side[s].fd, &b->side[s]) != 0) {
            t2t_fail(b, errno);
            return;
        }
    }
    t2t_idle_check(b); /* the check at the start: no traffic yet */
    if (b->state == T2T_RELAYING && t2t_heap_push(L, b) != 0) t2t_fail(b, ENOMEM);
}

static void t2t_release(t2t_bridge *b) {
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) free(b);
}

static void t2t_take_inbox(t2t_loop *L) {
    t2t_bridge *work = NULL;
    pthread_mutex_lock(&L->lock);
    t2t_unwake(L);
    L->wake_pending = 0;
    /* Move each ask aside under the lock: a stop() may queue the bridge again at once. */
    for (t2t_bridge *b = L->inbox; b; b = b->inbox_next) {
        b->taking = b->asked;
        b->asked = 0;
        b->work_next = work;
        work = b;
    }
    L->inbox = NULL;
    pthread_mutex_unlock(&L->lock);
    while (work) {
        t2t_bridge *b = work;
        work = b->work_next;
        if (b->taking & T2T_ASK_START) t2t_begin(b);
        if ((b->taking & T2T_ASK_STOP) && b->state == T2T_RELAYING) t2t_end(b, T2T_STOPPED, 0);
        b->taking = 0;
        t2t_release(b); /* the inbox entry's reference */
    }
}

static void t2t_run_timers(t2t_loop *L) {
    while (L->heap_len && t2t_deadline(L->heap[0]) <= L->now) {
        t2t_bridge *b = L->heap[0];
        if (b->state == T2T_RELAYING) {
            t2t_idle_check(b);
            if (b->state == T2T_RELAYING) t2t_heap_fix(L, 0);
        } else {
            t2t_drain(b); /* at its deadline: closes it */
        }
    }
}

static int t2t_timeout_ms(t2t_loop *L) {
    if (L->again) return 0;
    if (!L->heap_len) return -1;
    int64_t wait = t2t_deadline(L->heap[0]) - L->now;
    if (wait <= 0) return 0;
    int64_t ms = (wait + 999999) / 1000000; /* round up: never wake before the deadline */
    return ms > 3600000 ? 3600000 : (int)ms;
}

/* Someone has ended bridges to take: the claimer (once per take), else the results thread.
   The caller holds E->lock. */
static void t2t_done_tell(t2t_engine *E) {
    if (!E->claimed) {
        pthread_cond_signal(&E->done_cond);
    } else if (!E->claim_told) {
        E->claim_told = 1;
        t2t_signal_fd(E->claim_w);
    }
}

static void t2t_publish_done(t2t_loop *L) {
    if (!L->done_head) return;
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    if (E->done_tail) E->done_tail->done_next = L->done_head;
    else E->done_head = L->done_head;
    E->done_tail = L->done_tail;
    t2t_done_tell(E);
    pthread_mutex_unlock(&E->lock);
    L->done_head = L->done_tail = NULL;
}

static void t2t_measure_busy(t2t_loop *L, int64_t waiting_since) {
    L->idle_ns += L->now - waiting_since;
    int64_t total = L->busy_ns + L->idle_ns;
    if (total < T2T_BUSY_WINDOW_NS) return;
    __atomic_store_n(&L->busy_permille, (int)(L->busy_ns * 1000 / total), __ATOMIC_RELAXED);
    __atomic_store_n(&L->busy_at, L->now, __ATOMIC_RELAXED);
    L->busy_ns = L->idle_ns = 0;
}

static void *t2t_loop_main(void *arg) {
    t2t_loop *L = (t2t_loop *)arg;
#if T2T_EPOLL
    struct epoll_event events[T2T_MAX_EVENTS];
#else
    struct kevent events[T2T_MAX_EVENTS];
#endif
    for (;;) {
        int timeout = t2t_timeout_ms(L);
        int64_t waiting_since = t2t_now();
        L->busy_ns += waiting_since - L->now;
#if T2T_EPOLL
        int n = epoll_wait(L->poller, events, T2T_MAX_EVENTS, timeout);
#else
        struct timespec ts, *tsp = NULL;
        if (timeout >= 0) {
            ts.tv_sec = timeout / 1000;
            ts.tv_nsec = (long)(timeout % 1000) * 1000000L;
            tsp = &ts;
        }
        int n = kevent(L->poller, NULL, 0, events, T2T_MAX_EVENTS, tsp);
#endif
        L->now = t2t_now();
        t2t_measure_busy(L, waiting_since);
        if (n < 0) {
            if (errno != EINTR) {
                struct timespec pause = {0, 10000000}; /* never spin on a broken poller */
                nanosleep(&pause, NULL);
            }
            n = 0;
        }
        int woken = 0;
        for (int e = 0; e < n; e++) {
#if T2T_EPOLL
            t2t_side *side = (t2t_side *)events[e].data.ptr;
            uint32_t got = events[e].events;
            if (!side) {
                woken = 1;
                continue;
            }
            if (got & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) side->readable = 1;
            if (got & (EPOLLOUT | EPOLLHUP | EPOLLERR)) side->writable = 1;
#else
            t2t_side *side = (t2t_side *)events[e].udata;
            if (!side) {
                woken = 1;
                continue;
            }
            if (events[e].filter == EVFILT_READ) side->readable = 1;
            else side->writable = 1;
            if (events[e].flags & (EV_EOF | EV_ERROR)) side->readable = side->writable = 1;
#endif
            t2t_service(side->bridge); /* a closed bridge ignores late events of this batch */
        }
        if (woken) t2t_take_inbox(L);
        t2t_bridge *again = L->again;
        L->again = NULL;
        while (again) {
            t2t_bridge *b = again;
            again = b->again_next;
            b->queued_again = 0;
            t2t_service(b); /* nothing for a bridge that closed meanwhile */
            t2t_release(b);
        }
        t2t_run_timers(L);
        t2t_publish_done(L);
    }
    return NULL;
}

static int t2t_loop_init(t2t_loop *L) {
    memset(L, 0, sizeof(*L));
    L->wake_r = L->wake_w = -1;
    L->poller = t2t_poller_new();
    L->buffer = (char *)malloc(T2T_BUFFER_BYTES);
    if (L->poller < 0 || !L->buffer || t2t_wake_new(L) != 0) return -1;
    pthread_mutex_init(&L->lock, NULL);
    L->now = t2t_now();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&L->thread, &attr, t2t_loop_main, L);
    pthread_attr_destroy(&attr);
    if (failed) {
        errno = failed;
        return -1;
    }
    return 0;
}

/* ---- the API for _core.pyx ---------------------------------------------------------------------- */

/* Queue an ask for the loop; the caller holds L->lock. 1 when the loop must be woken. */
static int t2t_ask(t2t_loop *L, t2t_bridge *b, int ask) {
    if (b->asked) {
        b->asked |= ask; /* already queued */
        return 0;
    }
    b->asked = ask;
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
    b->inbox_next = L->inbox;
    L->inbox = b;
    int wake = !L->wake_pending;
    L->wake_pending = 1;
    return wake;
}

/* Start the loops once; 0, or -1 with errno. */
static int t2t_engine_start(int nloops) {
    t2t_engine *E = &t2t_the_engine;
    int result = 0;
    pthread_mutex_lock(&E->lock);
    if (!E->nloops) {
        if (nloops < 1) nloops = 1;
        if (nloops > T2T_MAX_LOOPS) nloops = T2T_MAX_LOOPS;
        t2t_loop *loops = (t2t_loop *)calloc((size_t)nloops, sizeof(t2t_loop));
        int started = 0;
        if (!loops) {
            errno = ENOMEM;
            result = -1;
        }
        while (loops && started < nloops) {
            if (t2t_loop_init(&loops[started]) != 0) {
                int saved = errno;
                t2t_loop *L = &loops[started];
                if (L->poller >= 0) close(L->poller);
                if (L->wake_r >= 0) close(L->wake_r);
                if (L->wake_w >= 0 && L->wake_w != L->wake_r) close(L->wake_w);
                free(L->buffer);
                errno = saved;
                break;
            }
            started++;
        }
        if (started) { /* a loop that runs is kept, however many could start */
            E->loops = loops;
            E->nloops = started;
        } else {
            free(loops);
            result = -1;
        }
    }
    pthread_mutex_unlock(&E->lock);
    return result;
}

static int t2t_loop_count(void) { return t2t_the_engine.nloops; }

/* Bridges assigned to loop i and not yet ended. */
static int t2t_loop_load(int i) {
    return i < t2t_the_engine.nloops ? __atomic_load_n(&t2t_the_engine.loops[i].load, __ATOMIC_RELAXED) : 0;
}

/* See T2T_PACK. */
static t2t_loop *t2t_choose_loop(t2t_engine *E) {
    t2t_loop *lightest = &E->loops[0];
    for (int i = 1; i < E->nloops; i++)
        if (__atomic_load_n(&E->loops[i].load, __ATOMIC_RELAXED) < __atomic_load_n(&lightest->load, __ATOMIC_RELAXED))
            lightest = &E->loops[i];
    int most = __atomic_load_n(&lightest->load, __ATOMIC_RELAXED) + T2T_PACK;
    int64_t now = t2t_now();
    for (int i = 0; i < E->nloops; i++) {
        t2t_loop *L = &E->loops[i];
        if (__atomic_load_n(&L->load, __ATOMIC_RELAXED) >= most) continue;
        int busy = now - __atomic_load_n(&L->busy_at, __ATOMIC_RELAXED) > T2T_BUSY_STALE_NS
                       ? 0
                       : __atomic_load_n(&L->busy_permille, __ATOMIC_RELAXED);
        if (busy < T2T_BUSY_PERMILLE) return L;
    }
    return lightest;
}

/* A new bridge on private non-blocking dups of fd1 and fd2 (or, with adopt, on fd1 and fd2
   themselves, which the bridge then owns and closes), handed to the least-loaded loop.
   NULL with errno on failure: nothing left open, and adopted fds still the caller's. */
static t2t_bridge *t2t_start(int fd1, int fd2, int adopt, int64_t interval_ns, uint64_t idle_limit,
                             int activity_both, int half_close, int may_splice, void *owner) {
    t2t_engine *E = &t2t_the_engine;
    t2t_bridge *b = (t2t_bridge *)calloc(1, sizeof(t2t_bridge));
    if (!b) {
        errno = ENOMEM;
        return NULL;
    }
    b->side[0].fd = t2t_own_fd(fd1, adopt);
    b->side[1].fd = b->side[0].fd < 0 ? -1 : t2t_own_fd(fd2, adopt);
    if (b->side[1].fd < 0) {
        int saved = errno;
        if (b->side[0].fd >= 0 && !adopt) close(b->side[0].fd);
        free(b);
        errno = saved;
        return NULL;
    }
    t2t_loop *L = t2t_choose_loop(E);
    __atomic_fetch_add(&L->load, 1, __ATOMIC_RELAXED);
    b->loop = L;
    for (int s = 0; s < 2; s++) b->side[s].bridge = b;
    b->started_ns = t2t_now();
    b->interval_ns = interval_ns;
    b->next_check_ns = b->started_ns;
    b->idle_limit = idle_limit;
    b->activity_both = (unsigned char)(activity_both != 0);
    b->half_close = (unsigned char)(half_close != 0);
    b->may_splice = (unsigned char)(may_splice != 0 && T2T_HAVE_SPLICE);
    b->heap_index = SIZE_MAX;
    b->owner = owner;
    b->refs = 2; /* the caller's and the engine's (dropped once the done queue was taken) */
    pthread_mutex_lock(&L->lock);
    int wake = t2t_ask(L, b, T2T_ASK_START);
    pthread_mutex_unlock(&L->lock);
    if (wake) t2t_wake(L);
    return b;
}

/* End a bridge with reason "stopped" (if it has not ended); from any thread, any number of times. */
static void t2t_stop(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    if (__atomic_load_n(&b->state, __ATOMIC_ACQUIRE) == T2T_DONE) return;
    pthread_mutex_lock(&L->lock);
    int wake = t2t_ask(L, b, T2T_ASK_STOP);
    pthread_mutex_unlock(&L->lock);
    if (wake) t2t_wake(L);
}

static unsigned long long t2t_bytes(t2t_bridge *b, int i) {
    return __atomic_load_n(&b->dir[i].bytes, __ATOMIC_RELAXED);
}

/* Take the whole done queue; the caller holds E->lock. */
static t2t_bridge *t2t_done_list(t2t_engine *E) {
    t2t_bridge *list = E->done_head;
    E->done_head = E->done_tail = NULL;
    for (t2t_bridge *b = list; b; b = b->done_next) b->reported = 1; /* see t2t_forget */
    return list;
}

/* Wait for ended bridges (their fds closed) and take them all; blocks without the GIL.
   While a thread holds the claim, it takes them instead. */
static t2t_bridge *t2t_done_take(void) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    while (!E->done_head || E->claimed) pthread_cond_wait(&E->done_cond, &E->lock);
    t2t_bridge *list = t2t_done_list(E);
    pthread_mutex_unlock(&E->lock);
    return list;
}

/* The claimer's take: what ended so far (NULL if nothing), without waiting. */
static t2t_bridge *t2t_done_take_now(void) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    if (E->claimed && E->claim_told) {
        t2t_drain_fd(E->claim_r);
        E->claim_told = 0;
    }
    t2t_bridge *list = t2t_done_list(E);
    pthread_mutex_unlock(&E->lock);
    return list;
}

/* From now on the calling thread takes ended bridges (t2t_done_take_now) when the returned fd
   is readable, sparing a hand-off to the results thread; -1 with errno EBUSY if another
   thread holds the claim. The fd stays the engine's. */
static int t2t_done_claim(void) {
    t2t_engine *E = &t2t_the_engine;
    int fd = -1;
    pthread_mutex_lock(&E->lock);
    if (E->claimed) {
        errno = EBUSY;
    } else if (E->claim_r >= 0 || t2t_signal_new(&E->claim_r, &E->claim_w) == 0) {
        E->claimed = 1;
        E->claim_told = 0;
        if (E->done_head) t2t_done_tell(E);
        fd = E->claim_r;
    }
    pthread_mutex_unlock(&E->lock);
    return fd;
}

/* Give the done queue back to the results thread, with whatever is on it. */
static void t2t_done_unclaim(void) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    if (E->claimed) {
        E->claimed = 0;
        E->claim_told = 0;
        t2t_drain_fd(E->claim_r);
        pthread_cond_signal(&E->done_cond);
    }
    pthread_mutex_unlock(&E->lock);
}

static int t2t_pooled_pipes(void) {
    int total = 0;
    for (int i = 0; i < t2t_the_engine.nloops; i++)
        total += __atomic_load_n(&t2t_the_engine.loops[i].pooled, __ATOMIC_RELAXED);
    return total;
}

/* The fds the engine itself holds: each loop's poller and wake fds, and its idle pipes. */
static int t2t_engine_fds(void) {
    int total = 2 * t2t_pooled_pipes();
    t2t_engine *E = &t2t_the_engine;
    if (E->claim_r >= 0) total += E->claim_w == E->claim_r ? 1 : 2;
    for (int i = 0; i < t2t_the_engine.nloops; i++) {
        t2t_loop *L = &t2t_the_engine.loops[i];
        total += 1 + (L->wake_w == L->wake_r ? 1 : 2);
    }
    return total;
}

static int t2t_bridges_open(void) {
    int total = 0;
    for (int i = 0; i < t2t_the_engine.nloops; i++)
        total += __atomic_load_n(&t2t_the_engine.loops[i].load, __ATOMIC_RELAXED);
    return total;
}

/* In a forked child, whose only thread is the one that forked: the loop threads are gone.
   Close the child's copies of every inherited fd (the parent's connections are untouched and
   still end with the parent's close), end every inherited bridge as "stopped" and return them
   all, done ones included, as a done list for Python to finish. The next bridge starts new
   loops. (A bridge the parent's loop was taking from its inbox at the fork is not seen.) */
static void t2t_forget(t2t_bridge *b, t2t_bridge **out, int64_t now) {
    if (b->reported) return;
    b->reported = 1;
    if (b->state != T2T_DONE) {
        for (int s = 0; s < 2; s++)
            if (b->side[s].fd >= 0) close(b->side[s].fd);
        for (int d = 0; d < 2; d++) {
            free(b->dir[d].pending);
            b->dir[d].pending = NULL;
            if (b->dir[d].pipe) t2t_pipe_close(b->dir[d].pipe);
            b->dir[d].pipe = NULL;
        }
        if (b->reason == T2T_RUNNING) b->reason = T2T_STOPPED;
        b->state = T2T_DONE;
        b->ended_ns = now;
    }
    b->done_next = *out;
    *out = b;
}

static t2t_bridge *t2t_forget_after_fork(void) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_init(&E->lock, NULL);
    pthread_cond_init(&E->done_cond, NULL);
    E->claimed = E->claim_told = 0; /* the claiming thread is the parent's; the fd is kept */
    t2t_bridge *out = NULL, *b, *next;
    int64_t now = t2t_now();
    for (b = E->done_head; b; b = next) {
        next = b->done_next;
        t2t_forget(b, &out, now);
    }
    E->done_head = E->done_tail = NULL;
    for (int i = 0; i < E->nloops; i++) {
        t2t_loop *L = &E->loops[i];
        for (b = L->done_head; b; b = next) {
            next = b->done_next;
            t2t_forget(b, &out, now);
        }
        for (b = L->all; b; b = next) {
            next = b->next;
            t2t_forget(b, &out, now);
        }
        for (b = L->inbox; b; b = next) {
            next = b->inbox_next;
            t2t_forget(b, &out, now);
        }
        while (L->pool) {
            t2t_pipe *p = L->pool;
            L->pool = p->next;
            t2t_pipe_close(p);
        }
        close(L->poller);
        close(L->wake_r);
        if (L->wake_w != L->wake_r) close(L->wake_w);
        free(L->buffer);
        free(L->heap);
    }
    free(E->loops);
    E->loops = NULL;
    E->nloops = 0;
    return out;
}

#endif /* T2T_LOOP_H */
