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
 * Threads: Python threads call t2t_start / t2t_stop / t2t_detach / t2t_bytes; they touch a loop only through
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
    T2T_MAX_UPSTREAMS = 64, /* a forward's (a bit each in t2t_bridge.up_skip) */
    T2T_MAX_WEIGHT = 1000,  /* an upstream's weight: 1..this */
};
#define T2T_ACCEPT_BACKOFF_NS 100000000LL /* out of fds: accept again after 100 ms */
/* Draining unread input before close (a close with unread bytes sends RST, which destroys
   what the peer had not yet received): stop after 30 ms of quiet once the peer has acknowledged
   every byte we sent it, at the latest after 250 ms. */
#define T2T_DRAIN_QUIET_NS 30000000LL
#define T2T_DRAIN_LIMIT_NS 250000000LL
#define T2T_DRAIN_POLL_NS 5000000LL /* quiet, but bytes still unacknowledged: look again */
#define T2T_NEVER INT64_MAX

/* In _bridge.REASONS' order after T2T_RUNNING (_core.pyx words them by index). */
enum t2t_reason { T2T_RUNNING = 0, T2T_CLOSED, T2T_IDLE, T2T_ERROR, T2T_STOPPED, T2T_DETACHED };
/* T2T_RECALLING: it ended while direction 1 was lent (see t2t_lend_maybe); waiting to get it back. */
/* T2T_CONNECTING: a listener's client, connecting upstream (or writing our PROXY header);
   T2T_HEADER: one reading the client's PROXY header, then (forwards routing by SNI) peeking at its
   ClientHello (see _loop_listener.h); T2T_HANDSHAKE: one doing a TLS handshake, with the client
   or the upstream (see t2t_tls_side). */
enum t2t_state {
    T2T_QUEUED = 0,
    T2T_RELAYING,
    T2T_DRAINING,
    T2T_DONE,
    T2T_CONNECTING,
    T2T_RECALLING,
    T2T_HEADER,
    T2T_HANDSHAKE
};
/* Why a client was closed without an upstream (t2t_bridge.refusal); _core.pyx words them. */
enum t2t_refusal {
    T2T_ADMITTED = 0,
    T2T_REFUSED_ACCESS,       /* --allow/--deny */
    T2T_REFUSED_PROXY_BAD,    /* a malformed PROXY header: error = the parser's code */
    T2T_REFUSED_PROXY_LONG,   /* no header end within T2T_PROXY_IN_MAX bytes */
    T2T_REFUSED_PROXY_LATE,   /* none complete within --proxy-timeout */
    T2T_REFUSED_PROXY_CLOSED, /* closed before its header ended */
    T2T_REFUSED_PROXY_READ,   /* reading it failed: error = errno */
    T2T_REFUSED_PER_CLIENT,   /* --max-per-client */
    T2T_REFUSED_RATE,         /* --rate-per-client */
    T2T_REFUSED_CLIENTS_FULL, /* the client table is full (T2T_CLIENTS_MAX) */
    T2T_REFUSED_HELLO_BAD,    /* not a TLS ClientHello we can read: see t2t_hello.error */
    T2T_REFUSED_HELLO_LATE,   /* none complete within --proxy-timeout */
    T2T_REFUSED_HELLO_CLOSED, /* closed before its ClientHello ended */
    T2T_REFUSED_HELLO_READ,   /* reading it failed: error = errno */
    T2T_REFUSED_NO_ROUTE,     /* --route-sni-strict, and no route names it: t2t_hello.name */
    T2T_REFUSED_TLS,          /* its TLS handshake failed: see t2t_tls_work */
};
enum { T2T_ASK_START = 1, T2T_ASK_STOP = 2, T2T_ASK_RETURN = 4, T2T_ASK_CONNECT = 8, T2T_ASK_DETACH = 16 };
/* t2t_bridge.detach_outcome, under the engine's lock (see t2t_detach). */
enum { T2T_DETACH_NONE = 0, T2T_DETACH_WAITING, T2T_DETACH_DONE, T2T_DETACH_REFUSED };
enum { T2T_LEND_START = 1, T2T_LEND_RECALL = 2 };

typedef struct t2t_pipe {
    int r, w, capacity;
    struct t2t_pipe *next;
} t2t_pipe;

struct t2t_bridge;
struct t2t_listener;

/* What a poller event's tag is (t2t_side.kind): a side of a bridge, a side lent to this loop
   (see t2t_lend_maybe), a listening socket (see t2t_listen_tag), or the loop's wake fd. */
enum t2t_tag_kind { T2T_TAG_SIDE = 0, T2T_TAG_LENT, T2T_TAG_LISTENER, T2T_TAG_WAKE };

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
    unsigned char kind;     /* a t2t_tag_kind: T2T_TAG_LENT for a bridge's lent_tags */
    unsigned char polled;   /* a listener's client: its fd is in the poller (see t2t_poll_side) */
    unsigned char notifying; /* teardown: its close_notify waits for room, then its FIN */
    void *tls;              /* a TLS side's SSL object (see _loop_tls.h); NULL: plain bytes */
    /* A TLS side: an EOF without close_notify is an end (its socket's suppress_ragged_eofs),
       else an error; cut: it ended so, and no close_notify goes on to anyone. */
    unsigned char ragged_eof_is_end, cut;
} t2t_side;

/* One direction: reads side[i], writes side[1 - i]. */
/* A bridge's --bandwidth, allocated only for a bridge that has one: bytes/s per direction, the
   bucket's size and the tokens a direction that emptied it waits for (see
   _bridge.bandwidth_bucket); per direction, the bytes it may read now, as of tokens_ns (a double:
   refills of a fraction of a byte add up, and no product of rate and time overflows); wake_ns,
   when the first direction waiting for tokens may read again (T2T_NEVER: none waits). */
typedef struct t2t_throttle {
    uint64_t rate, burst, quantum;
    int64_t wake_ns;
    double tokens[2];
    int64_t tokens_ns[2];
} t2t_throttle;

/* The idle rule's state, carried from a detached bridge to the one that resumes it: checks in a
   row that found no traffic, the time to the next check, and whether each direction moved bytes
   since the last one. */
typedef struct t2t_idle_state {
    uint64_t idle_checks;
    int64_t next_check_in_ns;
    unsigned char moved[2];
} t2t_idle_state;

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
    struct t2t_throttle *throttle; /* --bandwidth: its buckets (NULL: unlimited; see t2t_rate_set) */
    unsigned char activity_both, half_close, may_splice, state, reason, queued_again, reported;
    /* Detaching (see _loop_detach.h): the loop's, while it quiesces the bridge (until
       detach_deadline_ns); the outcome, for the asking thread (under the engine's lock); the
       time it allows (written before the ask is queued); what it hands over. resumed: the idle
       state came with t2t_start, so no check at the start. */
    unsigned char detaching, resumed;
    int detach_outcome;
    int64_t detach_timeout_ns, detach_deadline_ns;
    t2t_idle_state detached;
    int asked;  /* T2T_ASK_* waiting in the inbox (under the loop's lock) */
    int taking; /* T2T_ASK_* taken from the inbox, being handled by the loop */
    int refs;   /* the Python object, the engine until reaped, each inbox entry (atomic) */
    int error;  /* errno behind reason "error" */
    size_t heap_index;
    struct t2t_bridge *inbox_next, *work_next, *again_next, *done_next, *prev, *next;
    void *owner; /* the Python object to tell when done (a strong reference, held by _core) */
    /* A client a listener accepted (see t2t_listen): its settings, its number, its address (the
       PROXY header's source once one was read), and its way to an upstream. */
    struct t2t_listener *listener;
    struct t2t_config *cfg;   /* a reference */
    struct t2t_proxying *px;  /* PROXY protocol work, until it opens (forwards that have it) */
    struct t2t_hello *hello;  /* its ClientHello, read to route by SNI (forwards that route) */
    struct t2t_tls_work *tlsw; /* its handshakes' outcome (forwards with TLS), until freed */
    unsigned char tls_side;    /* T2T_HANDSHAKE: the side handshaking */
    unsigned char tls_owned;   /* a bit per side: an SSL object the loops made, freed with the bridge */
    struct t2t_bridge *open_next;
    unsigned long long conn_id;
    int64_t connect_deadline_ns; /* connecting, or reading the client's header: gives up then */
    uint64_t up_skip;            /* upstreams down when it was admitted (a bit per index) */
    uint64_t up_tried;           /* upstreams it tried (a bit per index); up_index the last */
    unsigned char up_index;
    unsigned char client_counted; /* it holds a slot in its listener's client table */
    unsigned char registered, opened, timed_out, refusal; /* refusal: a t2t_refusal */
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
    unsigned long long barrier_asked; /* under lock: turns asked to end (see t2t_barrier) */
    unsigned long long barrier_done;  /* atomic, written under the engine's lock */
} t2t_loop;

typedef struct t2t_engine {
    pthread_mutex_t lock;    /* guards starting the loops, the done queue and the claim */
    pthread_cond_t done_cond;
    pthread_cond_t barrier_cond; /* a loop finished a turn someone waits for (t2t_barrier) */
    t2t_bridge *done_head, *done_tail;
    t2t_loop *loops;
    int nloops;
    /* A thread that claimed the done queue (t2t_done_claim) is told of ended bridges through
       claim_r instead of done_cond, and takes them itself: the results thread waits meanwhile. */
    int claimed, claim_told, claim_r, claim_w;
    pthread_cond_t detach_cond; /* a detach was decided (see t2t_detach) */
} t2t_engine;

static t2t_engine t2t_the_engine = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, NULL, 0,
                                    0, 0, -1, -1, PTHREAD_COND_INITIALIZER};

/* The engine by concern, one translation unit (each part uses only what the parts before it
   declare, and the forward declarations in _loop_relay.h):
   poller and small helpers; TLS records; pipes, timers, relaying and ending; lending a direction to another
   loop; detaching a bridge (its fds handed back, unclosed); a loop's inbox, timers and done queue; listeners (accept, check, connect upstream); the
   loop thread itself and the API _core.pyx calls (declared for Cython in _loop.pxd). */
#include "_loop_poller.h"
#include "_loop_tls.h"
#include "_loop_relay.h"
#include "_loop_lend.h"
#include "_loop_detach.h"
#include "_loop_run.h"
#include "_loop_listener.h"
#include "_loop_api.h"

#endif /* T2T_LOOP_H */
