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
#include <stddef.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/un.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/types.h>

#if defined(__linux__)
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <linux/sockios.h> /* SIOCOUTQ */
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
    /* Or once a turn moved this much, one full splice: 8 of them held a loop's other bulk
       bridges for milliseconds (8 concurrent bulk streams: +7%, 16 interleaved rounds). */
    T2T_TURN_BYTES = 1024 * 1024,
    T2T_MAX_LOOPS = 64,
    T2T_ACCEPTS_PER_TURN = 64, /* then the loop serves its bridges before accepting more */
    T2T_MAX_SOCKOPTS = 8,
};
#define T2T_ACCEPT_BACKOFF_NS 100000000LL /* out of fds: accept again after 100 ms */
/* Draining unread input before close (a close with unread bytes sends RST, which destroys
   what the peer had not yet received): stop after 30 ms of quiet once the peer has acknowledged
   every byte we sent it, at the latest after 250 ms. */
#define T2T_DRAIN_QUIET_NS 30000000LL
#define T2T_DRAIN_LIMIT_NS 250000000LL
#define T2T_DRAIN_POLL_NS 5000000LL /* quiet, but bytes still unacknowledged: look again */
#define T2T_NEVER INT64_MAX

enum t2t_reason { T2T_RUNNING = 0, T2T_CLOSED, T2T_IDLE, T2T_ERROR, T2T_STOPPED };
/* T2T_RECALLING: it ended while direction 1 was lent (see t2t_lend_maybe); waiting to get it back. */
enum t2t_state { T2T_QUEUED = 0, T2T_RELAYING, T2T_DRAINING, T2T_DONE, T2T_CONNECTING, T2T_RECALLING };
enum { T2T_ASK_START = 1, T2T_ASK_STOP = 2, T2T_ASK_RETURN = 4, T2T_ASK_CONNECT = 8 };
enum { T2T_LEND_START = 1, T2T_LEND_RECALL = 2 };

typedef struct t2t_pipe {
    int r, w, capacity;
    struct t2t_pipe *next;
} t2t_pipe;

struct t2t_bridge;
struct t2t_listener;

typedef struct t2t_side {
    struct t2t_bridge *bridge;
    int fd;
    unsigned char readable, writable; /* last known readiness (edge-triggered) */
    unsigned char input_masked;       /* not watched for input while its direction waits to write */
    unsigned char fin_sent;           /* we shut it down for writing */
    unsigned char drained, dropped;   /* teardown: done reading it; it had unread bytes */
    /* A short recv proves a TCP socket empty, unless recv stopped at an urgent mark or the
       peer's FIN (or an error) came with the same edge: see t2t_pump. */
    unsigned char tcp, urgent, closing;
    unsigned char lent_tag; /* one of a bridge's lent_tags: its fd in the poller of the loop it lent to */
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
    /* A bridge a listener accepted (see t2t_listen): its client's address, its number, and
       the upstream connect's deadline and outcome. */
    struct t2t_listener *listener;
    struct t2t_bridge *open_next;
    unsigned long long conn_id;
    int64_t connect_deadline_ns;
    unsigned char registered, opened, timed_out, refused;
    /* Under the listener's lock: 1 while in its opened list; 2 once it ended before a take
       reported its opening (the take then reports it once, as ended; see t2t_listener_take). */
    unsigned char open_untaken;
    socklen_t peer_len;
    struct sockaddr_storage peer;
    /* Lending (see t2t_lend_maybe): direction 1 relayed by another loop, once, while both are bulk. */
    struct t2t_loop *lent_to;  /* the home loop's: where direction 1 is, until it came back */
    t2t_side lent_tags[2];     /* the fds' tags in lent_to's poller */
    unsigned char lent_once;   /* read by Python (Relay.lent) */
    unsigned char lend_asked;  /* T2T_LEND_* waiting in lent_to's lend inbox (under its lock) */
    unsigned char lend_taking; /* T2T_LEND_* taken from it, being handled by the borrower */
    unsigned char lent_recall; /* atomic: the home loop wants direction 1 back */
    /* The borrower's: relaying direction 1 now; done with it (EOF read, or lent_error). */
    unsigned char lent_running, lent_done, lent_queued_again;
    int lent_error;
    struct t2t_bridge *lend_next, *lend_work_next, *lent_again_next, *return_next;
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
    t2t_bridge *reports;     /* listener bridges ended this turn: told at its end (see t2t_close) */
    t2t_bridge *all;         /* bridges this loop relays (for the fork child) */
    /* Directions lent to this loop (see t2t_lend_maybe): asks (under lock), turns, give-backs. */
    t2t_bridge *lend_inbox, *lent_again, *returns;
    int lent;                /* atomic: directions lent to it now */
    t2t_pipe *pool;
    int pooled;              /* atomic: read by t2t_stats */
    int64_t now;
    int64_t retry_listeners_ns; /* a listener paused by EMFILE here may accept again then */
    int cancel_connects;     /* atomic: a closing listener asks to end its connecting bridges */
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
    __atomic_store_n(&d->active, 1, __ATOMIC_RELAXED); /* a lent direction's: another thread */
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

/* Whether a short read proves fd empty (see t2t_pump): plain TCP, whose recv stops short only
   at the urgent mark or at the end of its queue. Not with an upper-layer protocol (kernel TLS);
   a socket a BPF sockmap redirects is not detected: such sockets belong to the pure engine. */
static int t2t_is_tcp(int fd) {
#if T2T_EPOLL && defined(SO_PROTOCOL)
    int protocol = 0;
    socklen_t len = sizeof(protocol);
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0 || protocol != IPPROTO_TCP) return 0;
#ifdef TCP_ULP
    char ulp[16] = {0};
    len = sizeof(ulp);
    if (getsockopt(fd, IPPROTO_TCP, TCP_ULP, ulp, &len) == 0 && len > 0 && ulp[0]) return 0;
#endif
    return 1;
#else
    (void)fd;
    return 0; /* kqueue: keep the EAGAIN rule */
#endif
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

/* Bytes sent on fd that its peer has not acknowledged yet (Linux; 0 where unknown). An RST
   purges them, while what the peer already received stays readable there before the error. */
static int t2t_unacked(int fd) {
#if defined(__linux__) && defined(SIOCOUTQ)
    int n = 0, domain = 0;
    socklen_t len = sizeof(domain);
    /* TCP only: on a Unix socket SIOCOUTQ counts what the peer has not read, and no RST comes. */
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || (domain != AF_INET && domain != AF_INET6))
        return 0;
    if (ioctl(fd, SIOCOUTQ, &n) == 0) return n;
#else
    (void)fd;
#endif
    return 0;
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
    ev.events = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP | EPOLLET;
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
   arriving segment in a bulk stream). Output stays watched (out), unless the direction writing
   fd is lent to another loop. Turning input back on reports it at once if the fd is readable,
   so no edge is lost. */
static int t2t_poller_watch_input(t2t_loop *L, int fd, void *tag, int on, int out) {
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = (on ? EPOLLIN | EPOLLPRI | EPOLLRDHUP : 0) | (out ? EPOLLOUT : 0) | EPOLLET;
    ev.data.ptr = tag;
    return epoll_ctl(L->poller, EPOLL_CTL_MOD, fd, &ev);
#else
    struct kevent ev;
    (void)out; /* kqueue: no lending (no splice), so output stays watched */
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

/* Whether the caller must wake L for what it just queued (it holds L->lock): once per take of
   L's inbox, which clears wake_pending. */
static int t2t_wake_due(t2t_loop *L) {
    int wake = !L->wake_pending;
    L->wake_pending = 1;
    return wake;
}

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
    if (b->state == T2T_CONNECTING) return b->connect_deadline_ns;
    if (b->state == T2T_RECALLING) return T2T_NEVER; /* (not in the heap meanwhile) */
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

/* A direction runs in a loop L: its bridge's own (b->loop), or, for direction 1 while it is
   lent (see t2t_lend_maybe), the borrowing loop. L's buffer, pipe pool and turn queue serve it. */

static void t2t_end(t2t_bridge *b, int reason, int error);
static void t2t_drain(t2t_bridge *b);
static void t2t_release(t2t_bridge *b);

static void t2t_fail(t2t_bridge *b, int error) { t2t_end(b, T2T_ERROR, error); }
static void t2t_lend_ask(t2t_bridge *b, int ask);

static int t2t_borrowed(const t2t_loop *L, const t2t_bridge *b) { return L != b->loop; }

/* Direction i failed: end the bridge, or, in a borrowing loop, give the direction back with
   the error (only the home loop ends a bridge). */
static void t2t_dir_fail(t2t_loop *L, t2t_bridge *b, int error) {
    if (!t2t_borrowed(L, b)) {
        t2t_fail(b, error);
        return;
    }
    b->lent_error = error;
    b->lent_done = 1;
}

/* Whether direction i may go on relaying in L. */
static int t2t_relaying(t2t_loop *L, t2t_bridge *b, int i) {
    if (!t2t_borrowed(L, b)) return b->state == T2T_RELAYING && !b->dir[i].ended;
    return b->lent_running && !b->lent_done && !__atomic_load_n(&b->lent_recall, __ATOMIC_ACQUIRE);
}

static void t2t_watch_input(t2t_loop *L, t2t_bridge *b, int s, int on) {
    t2t_side *side = &b->side[s];
    if (side->input_masked == !on) return;
    int borrowed = t2t_borrowed(L, b);
    /* Home: output is watched unless the direction that writes this side is lent away. */
    int out = borrowed ? 0 : !(b->lent_to && s == 0);
    if (t2t_poller_watch_input(L, side->fd, borrowed ? &b->lent_tags[s] : side, on, out) == 0)
        side->input_masked = (unsigned char)!on;
}

static int t2t_flush_held(t2t_loop *L, t2t_bridge *b, int i);

/* Deliver what direction i still holds; 1 once it holds nothing, 0 to wait (or if it failed).
   While it waits, its source is not watched for input. */
static int t2t_flush(t2t_loop *L, t2t_bridge *b, int i) {
    int flushed = t2t_flush_held(L, b, i);
    if (t2t_borrowed(L, b) ? t2t_relaying(L, b, i) : b->state == T2T_RELAYING) t2t_watch_input(L, b, i, flushed);
    return flushed;
}

static int t2t_flush_held(t2t_loop *L, t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *dst = &b->side[1 - i];
    while (d->pending_off < d->pending_len) {
        if (!dst->writable) return 0;
        ssize_t n = send(dst->fd, d->pending + d->pending_off, d->pending_len - d->pending_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (T2T_WOULD_BLOCK(errno)) dst->writable = 0;
            else t2t_dir_fail(L, b, errno);
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
            else t2t_dir_fail(L, b, errno);
            return 0;
        }
        d->in_pipe -= (size_t)n;
        t2t_count(d, (size_t)n);
    }
#endif
    if (d->pipe) {
        t2t_pipe_give(L, d->pipe, 0);
        d->pipe = NULL;
    }
    return 1;
}

/* Send what was just read into L's buffer; keep the unsent tail as the bridge's own. */
static void t2t_send_read(t2t_loop *L, t2t_bridge *b, int i, size_t n) {
    t2t_dir *d = &b->dir[i];
    t2t_side *dst = &b->side[1 - i];
    const char *data = L->buffer;
    size_t done = 0;
    while (done < n) {
        ssize_t sent = send(dst->fd, data + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (!T2T_WOULD_BLOCK(errno)) {
                t2t_dir_fail(L, b, errno);
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
            t2t_dir_fail(L, b, ENOMEM);
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

/* Out of turns with input left: once more after the others (a reference keeps it, as it may
   close and be reaped before then). */
static void t2t_again(t2t_loop *L, t2t_bridge *b) {
    int borrowed = t2t_borrowed(L, b);
    unsigned char *queued = borrowed ? &b->lent_queued_again : &b->queued_again;
    if (*queued) return;
    *queued = 1;
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
    if (borrowed) {
        b->lent_again_next = L->lent_again;
        L->lent_again = b;
    } else {
        b->again_next = L->again;
        L->again = b;
    }
}

static void t2t_pump(t2t_loop *L, t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *src = &b->side[i];
    size_t moved = 0;
    for (int turn = 0; t2t_relaying(L, b, i); turn++) {
        if (!t2t_flush(L, b, i) || !src->readable) return;
        if (turn == T2T_READS_PER_TURN || moved >= T2T_TURN_BYTES) {
            t2t_again(L, b);
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
                if (!t2t_borrowed(L, b)) b->may_splice = 0; /* (the home loop's to change) */
                continue;
            }
        } else
#endif
        {
            n = recv(src->fd, L->buffer, T2T_BUFFER_BYTES, MSG_DONTWAIT);
        }
        if (n == 0) {
            if (t2t_borrowed(L, b)) b->lent_done = 1; /* the home loop reads the EOF again */
            else t2t_eof(b, i);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (T2T_WOULD_BLOCK(errno)) src->readable = 0;
            else t2t_dir_fail(L, b, errno);
            return;
        }
        /* In general only EAGAIN proves the source empty. A short read does not: recv stops at
           TCP's urgent mark and at a Unix message with ancillary data, and a short splice when
           the pipe runs out of slots; no new edge would come for what is already queued. */
        b->side[1 - i].writable = 1; /* try the write once; EAGAIN says otherwise */
        moved += (size_t)n;
        if (d->bulk) {
            d->spliced = 1;
            d->in_pipe = (size_t)n;
        } else {
            /* Except on TCP, as far as we know: there recv stops short only at the urgent mark
               (EPOLLPRI told us of it) or at the end of what is queued, and whatever arrives
               after this edge brings a new one. Saves the read that would say EAGAIN. The FIN
               (or an error) reported with this edge is already queued: read on to it. */
            if (src->tcp && !src->urgent && !src->closing && (size_t)n < T2T_BUFFER_BYTES) src->readable = 0;
            t2t_send_read(L, b, i, (size_t)n);
            if (b->may_splice && (size_t)n >= T2T_SPLICE_AFTER) d->bulk = 1;
        }
    }
}

static void t2t_connect_check(t2t_bridge *b);
static void t2t_lend_maybe(t2t_bridge *b);

static void t2t_service(t2t_bridge *b) {
    if (b->state == T2T_CONNECTING) t2t_connect_check(b);
    if (b->state == T2T_RELAYING) {
        t2t_pump(b->loop, b, 0);
        if (!b->lent_to) t2t_pump(b->loop, b, 1);
        t2t_lend_maybe(b);
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
    b->reason = (unsigned char)reason;
    b->error = error;
    if (b->lent_to) { /* direction 1 comes back first (see t2t_lend_returned) */
        b->state = T2T_RECALLING;
        t2t_heap_remove(b->loop, b);
        t2t_lend_ask(b, T2T_LEND_RECALL);
        return;
    }
    b->state = T2T_DRAINING;
    t2t_drop_held(b);
    for (int s = 0; s < 2; s++) {
        if (b->dir[s].ended) {
            /* Its FIN was read: nothing more can arrive, so close() alone sends ours, cleanly. */
            b->side[s].drained = 1;
            continue;
        }
        t2t_watch_input(b->loop, b, s, 1); /* the drain reads it */
        if (!b->side[s].fin_sent) shutdown(b->side[s].fd, SHUT_WR);
    }
    b->drain_limit_ns = t2t_add(b->loop->now, T2T_DRAIN_LIMIT_NS);
    b->drain_quiet_ns = T2T_NEVER;
    t2t_drain(b);
}

/* A listener bridge that ended is told to Python only at the end of this loop turn, like any
   other (see t2t_publish_done): a take may free it at once, while events of this turn's batch
   (or the rest of its t2t_service) may still name it. */
static void t2t_listener_defer(t2t_bridge *b) {
    b->done_next = b->loop->reports;
    b->loop->reports = b;
}

static void t2t_listener_report(t2t_bridge *b);

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
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
    if (b->listener) {
        t2t_listener_defer(b);
        return;
    }
    b->done_next = NULL;
    if (L->done_tail) L->done_tail->done_next = b;
    else L->done_head = b;
    L->done_tail = b;
}

/* Drop what the peers still send. The common case, nothing unread, costs one recv a side. */
static void t2t_drain(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    for (int s = 0; s < 2; s++) {
        t2t_side *side = &b->side[s];
        for (int reads = 0; !side->drained; reads++) {
            if (reads == T2T_READS_PER_TURN) { /* a peer that keeps sending: the others first */
                t2t_again(L, b);
                break;
            }
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
    int done = (b->side[0].drained && b->side[1].drained) || L->now >= b->drain_limit_ns;
    if (!done && L->now >= b->drain_quiet_ns) {
        /* Quiet: closing now sends RST, harmless only once the peer holds all we sent. */
        done = 1;
        for (int s = 0; s < 2; s++)
            if (!b->side[s].drained && t2t_unacked(b->side[s].fd) > 0) done = 0;
        if (!done) b->drain_quiet_ns = t2t_add(L->now, T2T_DRAIN_POLL_NS);
    }
    if (done) {
        t2t_close(b);
    } else if (b->heap_index != SIZE_MAX) {
        t2t_heap_fix(L, b->heap_index);
    } else if (t2t_heap_push(L, b) != 0) {
        t2t_close(b);
    }
}

/* The contract's idle rule: a check at the start and every r seconds after it. */
static void t2t_idle_check(t2t_bridge *b) {
    unsigned char a = __atomic_exchange_n(&b->dir[0].active, 0, __ATOMIC_RELAXED);
    unsigned char z = __atomic_exchange_n(&b->dir[1].active, 0, __ATOMIC_RELAXED);
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

/* ---- lending: a bridge bulk both ways on two cores ---------------------------------------------

   A loop serves a bridge's two directions in turn. On loopback, where the kernel's TCP work
   runs in the sending thread, a bridge streaming both ways so gets one core where 0.1.0's two
   pump threads got two. So once both directions are bulk and another loop has nothing to do,
   the bridge lends direction 1 to it, once: that loop (the borrower) watches the direction's
   source for input and its destination for output and relays it with its own buffer, pipes
   and turns, while the home loop keeps the rest (direction 0, the idle timer, stop, ending).
   The borrower never ends a bridge: at EOF, on an error, or when the home loop recalls it
   (the bridge ends), it gives the direction back, and the home loop handles what it found. */

static int t2t_ask(t2t_loop *L, t2t_bridge *b, int ask);

/* Queue an ask for b in L's inbox, from any thread, and wake L if it needs it. */
static void t2t_post(t2t_loop *L, t2t_bridge *b, int ask) {
    pthread_mutex_lock(&L->lock);
    int wake = t2t_ask(L, b, ask);
    pthread_mutex_unlock(&L->lock);
    if (wake) t2t_wake(L);
}

/* From the home loop to the borrower (a reference per queued bridge, as in t2t_ask). */
static void t2t_lend_ask(t2t_bridge *b, int ask) {
    t2t_loop *X = b->lent_to;
    pthread_mutex_lock(&X->lock);
    if (ask == T2T_LEND_RECALL) __atomic_store_n(&b->lent_recall, 1, __ATOMIC_RELEASE);
    if (!b->lend_asked) {
        __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
        b->lend_next = X->lend_inbox;
        X->lend_inbox = b;
    }
    b->lend_asked |= (unsigned char)ask;
    int wake = t2t_wake_due(X);
    pthread_mutex_unlock(&X->lock);
    if (wake) t2t_wake(X);
}

static void t2t_lend_maybe(t2t_bridge *b) {
#if T2T_EPOLL && T2T_HAVE_SPLICE
    if (b->lent_once || b->state != T2T_RELAYING || !b->dir[0].bulk || !b->dir[1].bulk || b->dir[0].ended ||
        b->dir[1].ended)
        return;
    t2t_engine *E = &t2t_the_engine;
    t2t_loop *L = b->loop, *X = NULL;
    for (int k = 0; k < E->nloops && !X; k++) {
        t2t_loop *C = &E->loops[k];
        if (C != L && !__atomic_load_n(&C->load, __ATOMIC_RELAXED) && !__atomic_load_n(&C->lent, __ATOMIC_RELAXED))
            X = C;
    }
    if (!X) return;
    /* Home keeps side 0's input and side 1's output (direction 0); X takes the others. */
    if (t2t_poller_watch_input(L, b->side[0].fd, &b->side[0], !b->side[0].input_masked, 0) != 0) return;
    if (t2t_poller_watch_input(L, b->side[1].fd, &b->side[1], 0, 1) != 0) {
        t2t_poller_watch_input(L, b->side[0].fd, &b->side[0], !b->side[0].input_masked, 1);
        return;
    }
    b->lent_once = 1;
    b->lent_to = X;
    b->side[1].input_masked = 0; /* the borrower's from now on */
    for (int s = 0; s < 2; s++) {
        b->lent_tags[s].bridge = b;
        b->lent_tags[s].fd = b->side[s].fd;
        b->lent_tags[s].lent_tag = 1;
    }
    __atomic_fetch_add(&X->lent, 1, __ATOMIC_RELAXED);
    t2t_lend_ask(b, T2T_LEND_START);
#else
    (void)b;
#endif
}

/* The borrower is done with direction 1: out of its poller now, back to the home loop at the
   end of this turn (events of this turn's batch may still name the bridge). */
static void t2t_borrow_end(t2t_loop *L, t2t_bridge *b) {
    t2t_poller_del(L, b->side[1].fd);
    t2t_poller_del(L, b->side[0].fd);
    b->lent_running = 0;
    __atomic_fetch_sub(&L->lent, 1, __ATOMIC_RELAXED);
    b->return_next = L->returns;
    L->returns = b;
}

static void t2t_lent_pump(t2t_loop *L, t2t_bridge *b) {
    if (!b->lent_running) return; /* given back: a late event or turn */
    t2t_pump(L, b, 1);
    if (b->lent_done || __atomic_load_n(&b->lent_recall, __ATOMIC_ACQUIRE)) t2t_borrow_end(L, b);
}

static void t2t_borrow_begin(t2t_loop *L, t2t_bridge *b) {
#if T2T_EPOLL
    struct epoll_event in, out;
    in.events = EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLET;
    in.data.ptr = &b->lent_tags[1];
    out.events = EPOLLOUT | EPOLLET;
    out.data.ptr = &b->lent_tags[0];
    b->lent_running = 1;
    if (epoll_ctl(L->poller, EPOLL_CTL_ADD, b->side[1].fd, &in) != 0 ||
        epoll_ctl(L->poller, EPOLL_CTL_ADD, b->side[0].fd, &out) != 0)
        b->lent_done = 1; /* back unused: the home loop relays it as before */
    b->side[1].readable = b->side[0].writable = 1; /* tried once; EAGAIN says otherwise */
    t2t_lent_pump(L, b);
#else
    (void)L, (void)b;
#endif
}

/* An event for a lent direction, in the borrower: only direction 1's flags are its own. */
static void t2t_lent_event(t2t_loop *L, t2t_side *tag, uint32_t got) {
#if T2T_EPOLL
    t2t_bridge *b = tag->bridge;
    if (!b->lent_running) return;
    if (tag == &b->lent_tags[1]) {
        t2t_side *src = &b->side[1];
        if (got & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) src->readable = 1;
        if (got & EPOLLPRI) src->urgent = 1;
        if (got & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) src->closing = 1;
    } else if (got & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
        b->side[0].writable = 1;
    }
    t2t_lent_pump(L, b);
#else
    (void)L, (void)tag, (void)got;
#endif
}

/* In the home loop: direction 1 is back. Watch both fds for everything again (re-arming
   reports what is ready now), then go on, or end as asked meanwhile. */
static void t2t_lend_returned(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    int error = b->lent_error;
    b->lent_to = NULL;
    b->side[1].readable = b->side[0].writable = 1;
    if (t2t_poller_watch_input(L, b->side[0].fd, &b->side[0], !b->side[0].input_masked, 1) != 0 && !error)
        error = errno;
    /* Side 1 as the home poller has it now: output only, input unwatched. */
    b->side[1].input_masked = 1;
    t2t_watch_input(L, b, 1, 1);
    if (b->side[1].input_masked && !error) error = errno;
    if (b->state == T2T_RECALLING) {
        b->state = T2T_RELAYING;
        t2t_end(b, b->reason, b->error);
    } else if (error) {
        t2t_fail(b, error);
    } else {
        t2t_service(b); /* reads the EOF the borrower stopped at */
    }
}

/* In the borrower: asks from home loops, taken with the inbox. */
static void t2t_take_lend_asks(t2t_loop *L, t2t_bridge *work) {
    while (work) {
        t2t_bridge *b = work;
        work = b->lend_work_next;
        if (b->lend_taking & T2T_LEND_START) t2t_borrow_begin(L, b);
        if ((b->lend_taking & T2T_LEND_RECALL) && b->lent_running) t2t_borrow_end(L, b);
        b->lend_taking = 0;
        t2t_release(b);
    }
}

/* At the end of the borrower's turn: each direction given back goes to its home loop. */
static void t2t_give_back(t2t_loop *L) {
    while (L->returns) {
        t2t_bridge *b = L->returns;
        L->returns = b->return_next;
        t2t_post(b->loop, b, T2T_ASK_RETURN);
    }
}

/* ---- the loop -------------------------------------------------------------------------------- */

/* Into the loop's list and its poller; 0, or an errno (what was added is undone by the close). */
static int t2t_register(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    b->next = L->all;
    if (L->all) L->all->prev = b;
    L->all = b;
    b->registered = 1;
    for (int s = 0; s < 2; s++)
        if (t2t_poller_add(L, b->side[s].fd, &b->side[s]) != 0) return errno;
    return 0;
}

static void t2t_begin(t2t_bridge *b) {
    b->state = T2T_RELAYING;
    int error = t2t_register(b);
    if (error) {
        t2t_fail(b, error);
        return;
    }
    t2t_idle_check(b); /* the check at the start: no traffic yet */
    if (b->state == T2T_RELAYING && t2t_heap_push(b->loop, b) != 0) t2t_fail(b, ENOMEM);
}

static void t2t_release(t2t_bridge *b) {
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) free(b);
}

static void t2t_connect_handed(t2t_bridge *b);
static void t2t_cancel_connects(t2t_loop *L);

static void t2t_take_inbox(t2t_loop *L) {
    t2t_bridge *work = NULL, *lend_work = NULL;
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
    for (t2t_bridge *b = L->lend_inbox; b; b = b->lend_next) {
        b->lend_taking = b->lend_asked;
        b->lend_asked = 0;
        b->lend_work_next = lend_work;
        lend_work = b;
    }
    L->lend_inbox = NULL;
    pthread_mutex_unlock(&L->lock);
    t2t_take_lend_asks(L, lend_work);
    int cancel = __atomic_exchange_n(&L->cancel_connects, 0, __ATOMIC_SEQ_CST);
    while (work) {
        t2t_bridge *b = work;
        work = b->work_next;
        if (b->taking & T2T_ASK_START) t2t_begin(b);
        if (b->taking & T2T_ASK_CONNECT) t2t_connect_handed(b);
        if (b->taking & T2T_ASK_RETURN) t2t_lend_returned(b);
        if ((b->taking & T2T_ASK_STOP) && b->state == T2T_RELAYING) t2t_end(b, T2T_STOPPED, 0);
        b->taking = 0;
        t2t_release(b); /* the inbox entry's reference */
    }
    if (cancel) t2t_cancel_connects(L);
}

static void t2t_connect_failed(t2t_bridge *b, int error);

static void t2t_run_timers(t2t_loop *L) {
    while (L->heap_len && t2t_deadline(L->heap[0]) <= L->now) {
        t2t_bridge *b = L->heap[0];
        if (b->state == T2T_CONNECTING) {
            b->timed_out = 1;
            t2t_connect_failed(b, ETIMEDOUT);
        } else if (b->state == T2T_RELAYING) {
            t2t_idle_check(b);
            if (b->state == T2T_RELAYING) t2t_heap_fix(L, 0);
        } else {
            t2t_drain(b); /* at its deadline: closes it */
        }
    }
}

static int t2t_timeout_ms(t2t_loop *L) {
    if (L->again || L->lent_again) return 0;
    int64_t next = L->heap_len ? t2t_deadline(L->heap[0]) : T2T_NEVER;
    if (L->retry_listeners_ns && L->retry_listeners_ns < next) next = L->retry_listeners_ns;
    if (next == T2T_NEVER) return -1;
    int64_t wait = next - L->now;
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
    t2t_give_back(L);
    t2t_bridge *told = L->reports, *later = NULL;
    L->reports = NULL;
    while (told) { /* back in the order they ended */
        t2t_bridge *b = told;
        told = b->done_next;
        b->done_next = later;
        later = b;
    }
    while (later) {
        t2t_bridge *b = later;
        later = b->done_next;
        t2t_listener_report(b);
    }
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

/* ---- listeners: accepting and connecting in the loops -------------------------------------------

   The forwarder's fast path (Linux): every loop watches the listening socket (EPOLLEXCLUSIVE, so
   a new client wakes one loop, not all), accepts, connects to the upstream without blocking and
   relays the pair itself, unless it has clearly more bridges than another loop: then that loop
   gets the client through its inbox (see t2t_accept_home). No Python per connection: Python learns of
   each bridge when it opened and when it ended (or that its upstream failed), in batches,
   through the listener's event fd. A listener is kept for the process once made: a loop may
   still hold an event for it after it stopped. */

typedef struct t2t_listen_tag {
    t2t_side side; /* side.bridge == NULL marks a listener's tag in the poller */
    struct t2t_listener *lst;
    int loop;
} t2t_listen_tag;

/* A forward's --allow/--deny, as _access.AccessList prepares it: per list, (network, mask)
   pairs of big-endian bytes, 4 + 4 for IPv4 (mapped IPv6 clients included), 16 + 16 for IPv6.
   A deny match refuses; with allow entries (closed) only an allow match passes. */
enum { T2T_ALLOW4, T2T_DENY4, T2T_ALLOW6, T2T_DENY6 };
typedef struct t2t_access {
    int active, closed;
    const unsigned char *lists[4];
    size_t counts[4]; /* pairs per list */
} t2t_access;

typedef struct t2t_listener {
    int fd; /* the listening socket: Python's, never closed here */
    t2t_access access; /* its lists copied (kept for the process, like the listener) */
    struct sockaddr_storage upstream;
    socklen_t upstream_len;
    int sockopts[T2T_MAX_SOCKOPTS][3]; /* (level, name, value) set on every upstream socket */
    int nsockopts;
    int64_t connect_timeout_ns, interval_ns;
    uint64_t idle_limit;
    unsigned char activity_both, half_close, may_splice, client_tcp, upstream_tcp;
    int max_active;
    int active;     /* atomic: accepted and not yet reported ended */
    int stopping;   /* atomic: accepts no more */
    int cancelling; /* atomic: and its clients not yet connected end as ECANCELED (a close) */
    int in_accept;  /* atomic: loops inside t2t_accept_some for it */
    int handing;    /* atomic: clients handed to another loop and not yet connected there */
    int armed;      /* atomic: watched by the loops */
    int64_t paused_until; /* atomic: EMFILE back-off */
    unsigned long long next_id; /* atomic */
    pthread_mutex_t lock; /* guards the event lists and arming */
    t2t_bridge *opened_head, *opened_tail, *done_head, *done_tail;
    int ev_r, ev_w, ev_told;
    unsigned char watching[T2T_MAX_LOOPS];
    t2t_listen_tag tags[T2T_MAX_LOOPS];
    struct t2t_listener *next; /* the engine's list, for EMFILE retries */
} t2t_listener;

static t2t_listener *t2t_listeners; /* under the engine's lock */

static int t2t_inside(const unsigned char *address, size_t width, const unsigned char *pairs, size_t count) {
    for (size_t i = 0; i < count; i++, pairs += 2 * width) {
        size_t k = 0;
        while (k < width && (address[k] & pairs[width + k]) == pairs[k]) k++;
        if (k == width) return 1;
    }
    return 0;
}

/* Whether the access lists let this client in (see t2t_access and _access.AccessList). */
static int t2t_permits(const t2t_access *a, const struct sockaddr_storage *peer) {
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    unsigned char address[16];
    size_t width;
    if (!a->active) return 1;
    if (peer->ss_family == AF_INET) {
        memcpy(address, &((const struct sockaddr_in *)peer)->sin_addr, 4);
        width = 4;
    } else if (peer->ss_family == AF_INET6) {
        const unsigned char *bytes = ((const struct sockaddr_in6 *)peer)->sin6_addr.s6_addr;
        width = memcmp(bytes, mapped, 12) == 0 ? 4 : 16; /* a mapped client is its IPv4 host */
        memcpy(address, width == 4 ? bytes + 12 : bytes, width);
    } else {
        return !a->closed; /* not an IP address: inside no network */
    }
    int allow = width == 4 ? T2T_ALLOW4 : T2T_ALLOW6, deny = width == 4 ? T2T_DENY4 : T2T_DENY6;
    if (t2t_inside(address, width, a->lists[deny], a->counts[deny])) return 0;
    return !a->closed || t2t_inside(address, width, a->lists[allow], a->counts[allow]);
}

/* Watch the listener in every loop, or in none, as its state asks; the caller holds lst->lock. */
static void t2t_listener_arm_locked(t2t_listener *lst, int64_t now) {
#if T2T_EPOLL
    t2t_engine *E = &t2t_the_engine;
    int want = !__atomic_load_n(&lst->stopping, __ATOMIC_SEQ_CST) &&
               __atomic_load_n(&lst->active, __ATOMIC_ACQUIRE) < lst->max_active &&
               now >= __atomic_load_n(&lst->paused_until, __ATOMIC_RELAXED);
    int watched = 0;
    for (int i = 0; i < E->nloops; i++) {
        if (want && !lst->watching[i]) {
            struct epoll_event ev;
            ev.events = EPOLLIN | EPOLLEXCLUSIVE;
            ev.data.ptr = &lst->tags[i].side;
            if (epoll_ctl(E->loops[i].poller, EPOLL_CTL_ADD, lst->fd, &ev) == 0) lst->watching[i] = 1;
        } else if (!want && lst->watching[i]) {
            struct epoll_event unused;
            epoll_ctl(E->loops[i].poller, EPOLL_CTL_DEL, lst->fd, &unused);
            lst->watching[i] = 0;
        }
        watched |= lst->watching[i];
    }
    /* Not armed while no loop could watch it: the next arming tries again. */
    __atomic_store_n(&lst->armed, want && watched, __ATOMIC_RELEASE);
#else
    (void)lst;
    (void)now; /* t2t_listen is Linux only: no listener exists here */
#endif
}

static void t2t_listener_arm(t2t_listener *lst, int64_t now) {
    pthread_mutex_lock(&lst->lock);
    t2t_listener_arm_locked(lst, now);
    pthread_mutex_unlock(&lst->lock);
}

static void t2t_listener_tell_locked(t2t_listener *lst) {
    if (!lst->ev_told) {
        lst->ev_told = 1;
        t2t_signal_fd(lst->ev_w);
    }
}

/* A listener's bridge ended, or never opened: give it to Python, free its slot. */
static void t2t_listener_report(t2t_bridge *b) {
    t2t_listener *lst = b->listener;
    pthread_mutex_lock(&lst->lock);
    b->done_next = NULL;
    if (lst->done_tail) lst->done_tail->done_next = b;
    else lst->done_head = b;
    lst->done_tail = b;
    t2t_listener_tell_locked(lst);
    __atomic_sub_fetch(&lst->active, 1, __ATOMIC_ACQ_REL);
    if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) t2t_listener_arm_locked(lst, t2t_now());
    pthread_mutex_unlock(&lst->lock);
}

/* The upstream connect failed (or timed out, or the listener stopped meanwhile). */
static void t2t_connect_failed(t2t_bridge *b, int error) {
    t2t_loop *L = b->loop;
    t2t_heap_remove(L, b);
    for (int s = 0; s < 2; s++) {
        if (b->side[s].fd < 0) continue;
        if (b->registered) t2t_poller_del(L, b->side[s].fd);
        close(b->side[s].fd);
        b->side[s].fd = -1;
    }
    if (b->registered) {
        if (b->prev) b->prev->next = b->next;
        else L->all = b->next;
        if (b->next) b->next->prev = b->prev;
        b->prev = b->next = NULL;
    }
    b->reason = T2T_ERROR;
    b->error = error;
    b->started_ns = b->ended_ns = L->now;
    __atomic_store_n(&b->state, T2T_DONE, __ATOMIC_RELEASE);
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
    t2t_listener_defer(b);
}

/* Connected: relaying starts now (the idle rule's start), and Python hears of it. */
static void t2t_connect_done(t2t_bridge *b) {
    t2t_listener *lst = b->listener;
    t2t_loop *L = b->loop;
    /* Under the lock t2t_listener_stop takes after setting `cancelling`: a bridge that opened once
       a closing stop() had returned would be missed by the forwarder's last take, and nobody
       would stop it. */
    pthread_mutex_lock(&lst->lock);
    if (__atomic_load_n(&lst->cancelling, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&lst->lock);
        t2t_connect_failed(b, ECANCELED);
        return;
    }
    t2t_heap_remove(L, b);
    b->state = T2T_RELAYING;
    b->started_ns = b->next_check_ns = L->now;
    b->opened = 1;
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED); /* the opened list's, taken over by Python */
    b->open_next = NULL;
    b->open_untaken = 1;
    if (lst->opened_tail) lst->opened_tail->open_next = b;
    else lst->opened_head = b;
    lst->opened_tail = b;
    t2t_listener_tell_locked(lst);
    pthread_mutex_unlock(&lst->lock);
    int error = b->registered ? 0 : t2t_register(b);
    if (error) {
        t2t_fail(b, error);
        return;
    }
    t2t_idle_check(b);
    if (b->state == T2T_RELAYING && t2t_heap_push(L, b) != 0) t2t_fail(b, ENOMEM);
    t2t_service(b); /* what the client sent while we connected */
}

static void t2t_connect_check(t2t_bridge *b) {
    if (!b->side[1].writable) return;
    int error = 0;
    socklen_t len = sizeof(error);
    if (getsockopt(b->side[1].fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    if (error) t2t_connect_failed(b, error);
    else t2t_connect_done(b);
}

/* Connect a listener's new bridge to the upstream, in its loop (b->loop). A client accepted
   before the listener stopped is connected as usual, even if handed over after, unless the stop
   cancels connects (see t2t_listener_stop). */
static void t2t_connect_upstream(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    t2t_listener *lst = b->listener;
#if T2T_EPOLL
    b->side[1].fd = socket(lst->upstream.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#else
    b->side[1].fd = -1;
    errno = ENOSYS;
#endif
    if (b->side[1].fd < 0) {
        t2t_connect_failed(b, errno);
        return;
    }
    /* Asked, not assumed from the family: a preloaded library may make it MPTCP. */
    b->side[1].tcp = (unsigned char)(lst->upstream_tcp && t2t_is_tcp(b->side[1].fd));
    for (int i = 0; i < lst->nsockopts; i++)
        setsockopt(b->side[1].fd, lst->sockopts[i][0], lst->sockopts[i][1], &lst->sockopts[i][2], sizeof(int));
    int rc = connect(b->side[1].fd, (struct sockaddr *)&lst->upstream, lst->upstream_len);
    if (rc != 0 && errno == EINPROGRESS) {
        /* On a local upstream the handshake has usually completed inside connect() already:
           asking again tells at once, and saves a trip through the poller. */
        rc = connect(b->side[1].fd, (struct sockaddr *)&lst->upstream, lst->upstream_len);
        if (rc != 0 && errno == EISCONN) rc = 0;
        else if (rc != 0 && errno == EALREADY) errno = EINPROGRESS;
    }
    if (rc == 0) {
        t2t_connect_done(b);
        return;
    }
    if (errno != EINPROGRESS && !(errno == EAGAIN && lst->upstream.ss_family != AF_UNIX)) {
        t2t_connect_failed(b, errno); /* (a Unix socket's EAGAIN is a full backlog: final) */
        return;
    }
    b->connect_deadline_ns = t2t_add(L->now, lst->connect_timeout_ns);
    int error = t2t_register(b);
    if (!error && t2t_heap_push(L, b) != 0) error = ENOMEM;
    if (error) t2t_connect_failed(b, error);
}

/* A loop's bridges, where a direction lent to it counts as one. */
static int t2t_loop_weight(t2t_loop *L) {
    return __atomic_load_n(&L->load, __ATOMIC_RELAXED) + __atomic_load_n(&L->lent, __ATOMIC_RELAXED);
}

/* The loop with the least weight, if below *least (which it then holds); else NULL. */
static t2t_loop *t2t_least_loaded(int *least) {
    t2t_engine *E = &t2t_the_engine;
    t2t_loop *found = NULL;
    for (int i = 0; i < E->nloops; i++) {
        int weight = t2t_loop_weight(&E->loops[i]);
        if (weight < *least) {
            *least = weight;
            found = &E->loops[i];
        }
    }
    return found;
}

/* Where a client accepted in L goes. Clients that connect together wake one loop (the listener
   is EPOLLEXCLUSIVE), which would keep them all: two bulk clients then shared one loop thread
   while the other sat idle, in most trials. So L hands a client to the least loaded loop once
   L has more bridges than that one by a quarter of its own count (by one at least). Within that
   margin it keeps it: a hand-over costs the other loop a wake-up. */
static t2t_loop *t2t_accept_home(t2t_loop *L) {
    int weight = t2t_loop_weight(L) - 1, least = weight; /* (the client is counted in L already) */
    t2t_loop *M = t2t_least_loaded(&least);
    int margin = weight / 4 > 1 ? weight / 4 : 1;
    return M && M != L && weight - least >= margin ? M : L;
}

/* End the bridges still connecting upstream for a listener that cancels its connects: their
   connect may not report for seconds (a SYN waiting for its retransmission). */
static void t2t_cancel_connects(t2t_loop *L) {
    for (t2t_bridge *b = L->all, *next; b; b = next) {
        next = b->next; /* (t2t_connect_failed unlinks b) */
        if (b->state == T2T_CONNECTING && b->listener &&
            __atomic_load_n(&b->listener->cancelling, __ATOMIC_SEQ_CST))
            t2t_connect_failed(b, ECANCELED);
    }
}

/* A client another loop handed to this one (see t2t_accept_home). */
static void t2t_connect_handed(t2t_bridge *b) {
    t2t_listener *lst = b->listener;
    t2t_connect_upstream(b);
    __atomic_sub_fetch(&lst->handing, 1, __ATOMIC_SEQ_CST);
}

static void t2t_accept_one(t2t_loop *L, t2t_listener *lst, int client, struct sockaddr_storage *peer,
                           socklen_t peer_len) {
    t2t_bridge *b = (t2t_bridge *)calloc(1, sizeof(t2t_bridge));
    if (!b) {
        close(client);
        return;
    }
    __atomic_add_fetch(&lst->active, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_add(&L->load, 1, __ATOMIC_RELAXED);
    b->loop = L;
    b->listener = lst;
    b->conn_id = __atomic_fetch_add(&lst->next_id, 1, __ATOMIC_RELAXED);
    memcpy(&b->peer, peer, peer_len);
    b->peer_len = peer_len;
    b->interval_ns = lst->interval_ns;
    b->idle_limit = lst->idle_limit;
    b->activity_both = lst->activity_both;
    b->half_close = lst->half_close;
    b->may_splice = lst->may_splice;
    b->heap_index = SIZE_MAX;
    b->refs = 1; /* the engine's, until Python took its end */
    b->state = T2T_CONNECTING;
    for (int s = 0; s < 2; s++) b->side[s].bridge = b;
    b->side[0].fd = client;
    b->side[1].fd = -1;
    b->side[0].tcp = lst->client_tcp;
    if (!t2t_permits(&lst->access, peer)) {
        b->refused = 1;
        t2t_connect_failed(b, EACCES);
        return;
    }
    t2t_loop *home = t2t_accept_home(L);
    if (home == L) {
        t2t_connect_upstream(b);
        return;
    }
    /* Nothing of L's holds it yet (not registered, no timer): it becomes home's outright.
       Counted until home connected it, so that t2t_listener_stop still returns only once
       every client it accepted is opened, connecting or failed. */
    __atomic_add_fetch(&lst->handing, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&home->load, 1, __ATOMIC_RELAXED);
    b->loop = home;
    t2t_post(home, b, T2T_ASK_CONNECT);
}

static void t2t_accept_some(t2t_loop *L, t2t_listen_tag *tag) {
    t2t_listener *lst = tag->lst;
    __atomic_add_fetch(&lst->in_accept, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < T2T_ACCEPTS_PER_TURN && !__atomic_load_n(&lst->stopping, __ATOMIC_SEQ_CST); i++) {
        if (__atomic_load_n(&lst->active, __ATOMIC_ACQUIRE) >= lst->max_active) {
            t2t_listener_arm(lst, L->now); /* full: leave clients in the backlog */
            break;
        }
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer);
#if T2T_EPOLL
        int client = accept4(lst->fd, (struct sockaddr *)&peer, &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
        int client = -1;
        errno = ENOSYS;
        (void)peer_len;
#endif
        if (client < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of fds for now: wait a moment instead of spinning on a ready listener. */
                __atomic_store_n(&lst->paused_until, L->now + T2T_ACCEPT_BACKOFF_NS, __ATOMIC_RELAXED);
                t2t_listener_arm(lst, L->now);
                L->retry_listeners_ns = L->now + T2T_ACCEPT_BACKOFF_NS;
            }
            break;
        }
        t2t_accept_one(L, lst, client, &peer, peer_len);
    }
    __atomic_sub_fetch(&lst->in_accept, 1, __ATOMIC_SEQ_CST);
}

static void t2t_retry_listeners(t2t_loop *L) {
    L->retry_listeners_ns = 0;
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    for (t2t_listener *lst = t2t_listeners; lst; lst = lst->next)
        if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) t2t_listener_arm(lst, L->now);
    pthread_mutex_unlock(&E->lock);
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
            if (!side->bridge) { /* a listener's tag (see t2t_listen_tag) */
                t2t_accept_some(L, (t2t_listen_tag *)side);
                continue;
            }
            if (side->lent_tag) {
                t2t_lent_event(L, side, got);
                continue;
            }
            /* While direction 1 is lent, side 0's output and side 1's input are the borrower's. */
            t2t_bridge *b = side->bridge;
            int reads = !b->lent_to || side == &b->side[0];
            int writes = !b->lent_to || side == &b->side[1];
            if (reads && (got & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) side->readable = 1;
            if (reads && (got & EPOLLPRI)) side->urgent = 1;
            if (reads && (got & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))) side->closing = 1;
            if (writes && (got & (EPOLLOUT | EPOLLHUP | EPOLLERR))) side->writable = 1;
#else
            t2t_side *side = (t2t_side *)events[e].udata;
            if (!side) {
                woken = 1;
                continue;
            }
            if (side->lent_tag) { /* (never: no lending without splice) */
                t2t_lent_event(L, side, 0);
                continue;
            }
            if (events[e].filter == EVFILT_READ) side->readable = 1;
            else side->writable = 1;
            if (events[e].flags & (EV_EOF | EV_ERROR)) side->readable = side->writable = side->closing = 1;
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
        t2t_bridge *lent_again = L->lent_again;
        L->lent_again = NULL;
        while (lent_again) {
            t2t_bridge *b = lent_again;
            lent_again = b->lent_again_next;
            b->lent_queued_again = 0;
            t2t_lent_pump(L, b);
            t2t_release(b);
        }
        t2t_run_timers(L);
        if (L->retry_listeners_ns && L->now >= L->retry_listeners_ns) t2t_retry_listeners(L);
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
    return t2t_wake_due(L);
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

/* A new bridge on private non-blocking dups of fd1 and fd2 (or, with adopt, on fd1 and fd2
   themselves, which the bridge then owns and closes), handed to the least-loaded loop.
   NULL with errno on failure: nothing left open, and adopted fds still the caller's. */
static t2t_bridge *t2t_start(int fd1, int fd2, int adopt, int64_t interval_ns, uint64_t idle_limit,
                             int activity_both, int half_close, int may_splice, void *owner) {
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
    int least = INT_MAX;
    t2t_loop *L = t2t_least_loaded(&least); /* (a loop at least: the engine started) */
    __atomic_fetch_add(&L->load, 1, __ATOMIC_RELAXED);
    b->loop = L;
    for (int s = 0; s < 2; s++) {
        b->side[s].bridge = b;
        b->side[s].tcp = (unsigned char)t2t_is_tcp(b->side[s].fd);
    }
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
    t2t_post(L, b, T2T_ASK_START);
    return b;
}


/* ---- listeners (see t2t_listen_tag) ---- */

/* Accept on `fd` (a listening socket, left open for the caller) in every loop and relay each
   client to `upstream`. NULL with errno (ENOSYS off Linux). */
static t2t_listener *t2t_listen(int fd, const struct sockaddr *upstream, socklen_t upstream_len,
                                const int *sockopts, int nsockopts, int64_t connect_timeout_ns,
                                int64_t interval_ns, uint64_t idle_limit, int activity_both, int half_close,
                                int may_splice, int max_active, unsigned long long first_id,
                                const t2t_access *access) {
#if T2T_EPOLL
    t2t_engine *E = &t2t_the_engine;
    if (upstream_len > sizeof(struct sockaddr_storage) || nsockopts > T2T_MAX_SOCKOPTS || !E->nloops) {
        errno = EINVAL;
        return NULL;
    }
    t2t_listener *lst = (t2t_listener *)calloc(1, sizeof(t2t_listener));
    if (!lst) {
        errno = ENOMEM;
        return NULL;
    }
    if (t2t_signal_new(&lst->ev_r, &lst->ev_w) != 0) {
        int saved = errno;
        free(lst);
        errno = saved;
        return NULL;
    }
    lst->fd = fd;
    if (access && access->active) {
        lst->access.active = 1;
        lst->access.closed = access->closed;
        for (int i = 0; i < 4; i++) {
            size_t width = i < T2T_ALLOW6 ? 4 : 16, bytes = access->counts[i] * 2 * width;
            unsigned char *copy = bytes ? (unsigned char *)malloc(bytes) : NULL;
            if (bytes && !copy) {
                for (int j = 0; j < i; j++) free((void *)lst->access.lists[j]);
                close(lst->ev_r); /* an eventfd: one fd for both ends */
                free(lst);
                errno = ENOMEM;
                return NULL;
            }
            if (bytes) memcpy(copy, access->lists[i], bytes);
            lst->access.lists[i] = copy;
            lst->access.counts[i] = access->counts[i];
        }
    }
    memcpy(&lst->upstream, upstream, upstream_len);
    lst->upstream_len = upstream_len;
    memcpy(lst->sockopts, sockopts, sizeof(int) * 3 * (size_t)nsockopts);
    lst->nsockopts = nsockopts;
    lst->connect_timeout_ns = connect_timeout_ns;
    lst->interval_ns = interval_ns;
    lst->idle_limit = idle_limit;
    lst->activity_both = (unsigned char)(activity_both != 0);
    lst->half_close = (unsigned char)(half_close != 0);
    lst->may_splice = (unsigned char)(may_splice != 0);
    lst->client_tcp = (unsigned char)t2t_is_tcp(fd);
    lst->upstream_tcp = upstream->sa_family == AF_INET || upstream->sa_family == AF_INET6;
    lst->max_active = max_active;
    lst->next_id = first_id;
    pthread_mutex_init(&lst->lock, NULL);
    for (int i = 0; i < T2T_MAX_LOOPS; i++) {
        lst->tags[i].side.fd = -1;
        lst->tags[i].lst = lst;
        lst->tags[i].loop = i;
    }
    pthread_mutex_lock(&E->lock);
    lst->next = t2t_listeners;
    t2t_listeners = lst;
    pthread_mutex_unlock(&E->lock);
    t2t_listener_arm(lst, t2t_now());
    if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&lst->stopping, 1, __ATOMIC_SEQ_CST); /* kept (see above), but inert */
        errno = EINVAL; /* not a socket the loops could watch */
        return NULL;
    }
    return lst;
#else
    (void)fd, (void)upstream, (void)upstream_len, (void)sockopts, (void)nsockopts, (void)connect_timeout_ns;
    (void)interval_ns, (void)idle_limit, (void)activity_both, (void)half_close, (void)may_splice;
    (void)max_active, (void)first_id, (void)access;
    errno = ENOSYS;
    return NULL;
#endif
}


/* Addresses between Python's tuples and the kernel's structs (numeric hosts only). */
static int t2t_sockaddr_ip(int family, const char *host, int port, unsigned int flowinfo, unsigned int scope_id,
                           struct sockaddr_storage *out, socklen_t *len) {
    memset(out, 0, sizeof(*out));
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)out;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        *len = sizeof(*a);
        return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)out;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        a->sin6_flowinfo = htonl(flowinfo);
        a->sin6_scope_id = scope_id;
        *len = sizeof(*a);
        return inet_pton(AF_INET6, host, &a->sin6_addr) == 1 ? 0 : -1;
    }
    return -1;
}

static int t2t_sockaddr_unix(const char *path, size_t n, struct sockaddr_storage *out, socklen_t *len) {
    struct sockaddr_un *a = (struct sockaddr_un *)out;
    memset(out, 0, sizeof(*out));
    if (n >= sizeof(a->sun_path)) return -1;
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path, path, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (n && path[0] ? 1 : 0));
    return 0;
}

/* The family of a bridge's client; its host text (IP families) and port. */
static int t2t_peer(const t2t_bridge *b, char *host, size_t n, int *port, unsigned int *flowinfo,
                    unsigned int *scope_id) {
    host[0] = 0;
    *port = 0;
    *flowinfo = *scope_id = 0;
    int family = b->peer_len ? b->peer.ss_family : AF_UNSPEC;
    if (family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&b->peer;
        inet_ntop(AF_INET, &a->sin_addr, host, (socklen_t)n);
        *port = ntohs(a->sin_port);
    } else if (family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&b->peer;
        inet_ntop(AF_INET6, &a->sin6_addr, host, (socklen_t)n);
        *port = ntohs(a->sin6_port);
        *flowinfo = ntohl(a->sin6_flowinfo);
        *scope_id = a->sin6_scope_id;
    } else if (family == AF_UNIX) {
        const struct sockaddr_un *a = (const struct sockaddr_un *)&b->peer;
        size_t len = b->peer_len > offsetof(struct sockaddr_un, sun_path)
                         ? b->peer_len - offsetof(struct sockaddr_un, sun_path) : 0;
        if (len >= n) len = n - 1;
        memcpy(host, a->sun_path, len);
        host[len] = 0;
    }
    return family;
}

/* The fd that turns readable when t2t_listener_take has something. */
static int t2t_listener_fd(t2t_listener *lst) { return lst->ev_r; }

static int t2t_listener_active(t2t_listener *lst) { return __atomic_load_n(&lst->active, __ATOMIC_ACQUIRE); }

static unsigned long long t2t_listener_next_id(t2t_listener *lst) {
    return __atomic_load_n(&lst->next_id, __ATOMIC_RELAXED);
}

/* Bridges opened and bridges ended (or failed to connect) since the last take, in order. Each
   opened one carries a reference for the caller; each ended one the engine's, which the caller
   releases once done with it. A bridge in both lists (most short ones, under load) is marked
   open_untaken == 2: the caller may report it once, as ended, and just release its opening. */
static void t2t_listener_take(t2t_listener *lst, t2t_bridge **opened, t2t_bridge **done) {
    pthread_mutex_lock(&lst->lock);
    if (lst->ev_told) {
        t2t_drain_fd(lst->ev_r);
        lst->ev_told = 0;
    }
    for (t2t_bridge *b = lst->done_head; b; b = b->done_next)
        if (b->open_untaken == 1) b->open_untaken = 2; /* done: the loop no longer touches it */
    for (t2t_bridge *b = lst->opened_head; b; b = b->open_next)
        if (b->open_untaken == 1) b->open_untaken = 0; /* runs on: only ever written under the lock */
    *opened = lst->opened_head;
    *done = lst->done_head;
    lst->opened_head = lst->opened_tail = lst->done_head = lst->done_tail = NULL;
    pthread_mutex_unlock(&lst->lock);
}

/* Stop accepting. Once this returns no loop touches the listening fd again, so the caller may
   close it. Bridges that opened run on. Clients accepted and not yet connected connect as usual
   and open later (a reconfigure: their events keep coming) or, with cancel_connects (a close),
   end as failed (ECANCELED): then no bridge of it opens once this returned, and the next take
   has every one that did. Called again with cancel_connects, it cancels what is still connecting. */
static void t2t_listener_stop(t2t_listener *lst, int cancel_connects) {
    if (cancel_connects) __atomic_store_n(&lst->cancelling, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&lst->stopping, 1, __ATOMIC_SEQ_CST);
    t2t_listener_arm(lst, t2t_now());
    while (__atomic_load_n(&lst->in_accept, __ATOMIC_SEQ_CST) || __atomic_load_n(&lst->handing, __ATOMIC_SEQ_CST)) {
        struct timespec pause = {0, 100000}; /* an accept batch (~µs) or a hand-over (a turn) */
        nanosleep(&pause, NULL);
    }
    if (!cancel_connects) return;
    /* Those still connecting end now (their ends come with the next takes), not whenever
       their connect reports. */
    t2t_engine *E = &t2t_the_engine;
    for (int i = 0; i < E->nloops; i++) {
        t2t_loop *L = &E->loops[i];
        __atomic_store_n(&L->cancel_connects, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_lock(&L->lock);
        int wake = t2t_wake_due(L);
        pthread_mutex_unlock(&L->lock);
        if (wake) t2t_wake(L);
    }
}

/* End a bridge with reason "stopped" (if it has not ended); from any thread, any number of times. */
static void t2t_stop(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    if (__atomic_load_n(&b->state, __ATOMIC_ACQUIRE) == T2T_DONE) return;
    t2t_post(L, b, T2T_ASK_STOP);
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
    if (!b->owner) return; /* a listener's: its forwarder does not run in the child */
    b->done_next = *out;
    *out = b;
}

static t2t_bridge *t2t_forget_after_fork(void) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_init(&E->lock, NULL);
    pthread_cond_init(&E->done_cond, NULL);
    E->claimed = E->claim_told = 0; /* the claiming thread is the parent's; the fd is kept */
    for (t2t_listener *lst = t2t_listeners; lst; lst = lst->next) { /* the parent's forwarders */
        lst->stopping = 1;
        lst->in_accept = lst->handing = 0; /* counts of the parent's loops: none runs here */
        memset(lst->watching, 0, sizeof(lst->watching));
        pthread_mutex_init(&lst->lock, NULL);
    }
    t2t_listeners = NULL;
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
