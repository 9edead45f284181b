/* ---- listeners: accepting, checking and connecting in the loops -------------------------------

   A forward's listener (docs/contract.md, "The listener"): every loop watches the listening
   socket (on Linux EPOLLEXCLUSIVE, so a new client wakes one loop, not all), accepts, reads the
   client's PROXY header if the forward wants one, checks the access lists, connects to an
   upstream without blocking (in the forward's order, failing over, skipping upstreams in
   back-off), sends our PROXY header, and relays the pair itself. A loop with clearly more bridges
   than another hands a new client to that one through its inbox (see t2t_accept_home).

   No Python per connection: Python learns of each client when it opened, ended, was refused, or
   an upstream failed it, in batches, through the listener's event fd (t2t_listener_take).
   Reloading swaps the listener's settings (t2t_config) whole: clients keep the settings they
   were accepted with, and the connection limit stays one count per forward. A listener is
   freed by t2t_listener_free once it stopped, its last client was reported and taken, and every
   loop finished the turn in which it could still have seen the listening socket. */

#include "_loop_proxy.h"
#include "_loop_balance.h"
#include "_loop_sni.h"

typedef struct t2t_listen_tag {
    t2t_side side; /* side.kind == T2T_TAG_LISTENER */
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

typedef struct t2t_upstream {
    struct sockaddr_storage address;
    socklen_t len;
    unsigned char ip;           /* AF_INET/AF_INET6: the socket options apply; EAGAIN is not final */
    int weight;                 /* 1..T2T_MAX_WEIGHT */
    uint64_t hash;              /* of its text: its identity for --balance source */
    t2t_upstream_state *state;  /* a reference: shared with the listener's other configs */
    char *text;                 /* the forward's name for it, for Python's events */
    char *tls_name;             /* origination: its host name (SNI, the certificate check); NULL: none */
    unsigned char tls_name_ip;  /* tls_name is an IP literal: checked, not sent as SNI */
} t2t_upstream;

/* A forward's settings for new clients. The listener holds the current one; each client holds
   the one it was accepted with until it is freed. Read-only once made, but for back-off. */
typedef struct t2t_config {
    int refs; /* atomic */
    t2t_access access;
    t2t_upstream *upstreams;
    int nupstreams; /* 1..T2T_MAX_UPSTREAMS */
    unsigned char balance, send_proxy, accept_proxy; /* balance: a t2t_balance; send_proxy: 0, 1 (v1) or 2 (v2) */
    unsigned char activity_both, half_close, may_splice;
    int64_t backoff_ns, connect_timeout_ns, proxy_timeout_ns, interval_ns;
    uint64_t idle_limit;
    uint64_t rate, burst, quantum; /* --bandwidth per bridge (see t2t_rate_set); rate 0: none */
    int max_active;
    int max_fails;        /* failed connects within fail_window_ns that mark an upstream down */
    int64_t fail_window_ns;
    int max_per_client;   /* 0: no limit */
    int64_t rate_spacing_ns, rate_burst; /* --rate-per-client's bucket (see t2t_bucket_take); 0: none */
    int prefix6;          /* --client-prefix6 */
    /* --route-sni: upstreams[nserving + i] serves the clients whose ClientHello names a match
       of routes[i]; the first nserving upstreams serve the others (unless route_strict). */
    int nserving, nroutes;
    char **routes;
    unsigned char route_strict;
    int sockopts[T2T_MAX_SOCKOPTS][3]; /* (level, name, value) on every IP upstream socket */
    int nsockopts;
    /* TLS (see _loop_tls.h), each SSL_CTX a reference of ours. Termination: certs[0] unless a
       later one's names (cert_names[k], NULL-terminated) match the client's SNI. Origination:
       client_ctx, checking the upstream's host name where check_host. */
    int ncerts;
    void **certs;
    char ***cert_names;
    void *client_ctx;
    unsigned char check_host;
    int64_t tls_timeout_ns;
} t2t_config;

/* A client's PROXY protocol work: the header it sends us, and ours for the upstream. */
typedef struct t2t_proxying {
    unsigned char in[T2T_PROXY_IN_MAX]; /* its header's bytes taken so far (MSG_PEEK, then read) */
    size_t in_len;
    struct sockaddr_storage destination; /* what its header names as destination, if any */
    socklen_t destination_len;
    unsigned char out[T2T_PROXY_OUT_MAX];
    size_t out_len, out_sent;
    char error[T2T_PROXY_ERROR_MAX]; /* why its header was refused, as the pure parser says it */
} t2t_proxying;

/* A client's ClientHello, peeked at (never read: it reaches the upstream untouched). */
typedef struct t2t_hello {
    unsigned char in[T2T_SNI_IN_MAX];
    char name[T2T_SNI_NAME_MAX];   /* its server name, "" for none */
    char error[T2T_SNI_ERROR_MAX]; /* why it was refused (T2T_REFUSED_HELLO_BAD) */
} t2t_hello;

/* One failed upstream connect, for Python's log and metrics (the client may go on to the next). */
typedef struct t2t_failure {
    struct t2t_failure *next;
    t2t_config *cfg; /* a reference: names the upstream */
    int upstream, error;
    unsigned char timed_out;
    unsigned char marked_down; /* this failure marked the upstream down (max_fails reached) */
    unsigned long long conn_id;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    /* Its TLS handshake failed (tls_failure its words, "" if not): tls_closed, tls_timed_out as
       in t2t_tls_work. */
    char tls_failure[T2T_TLS_INFO_MAX];
    unsigned char tls_closed, tls_timed_out;
} t2t_failure;

typedef struct t2t_listener {
    int fd; /* the listening socket: Python's, closed by Python once t2t_listener_stop returned */
    t2t_config *cfg; /* under lock: for clients from now on */
    unsigned char client_tcp;
    int max_active; /* atomic: the current config's, less the reserved */
    int reserved;   /* under lock: bridges outside the listener that count against its limit */
    int active;     /* atomic: accepted and not yet reported ended */
    int stopping;   /* atomic: accepts no more */
    int cancelling; /* atomic: and its clients not yet connected end as ECANCELED (a close) */
    int armed;      /* atomic: watched by the loops */
    int64_t paused_until; /* atomic: EMFILE back-off */
    unsigned long long next_id; /* atomic */
    unsigned int next_upstream; /* atomic: leastconn's first look, turning (ties go round) */
    pthread_mutex_t lock; /* guards the event lists, arming, cfg, the client table, upstream fails */
    t2t_clients clients;
    pthread_mutex_t balance_lock; /* guards the upstreams' round robin weights */
    t2t_bridge *opened_head, *opened_tail, *done_head, *done_tail;
    t2t_failure *failed_head, *failed_tail;
    int accept_error; /* accept() ran out of a resource (EMFILE...) since the last take */
    int ev_r, ev_w, ev_told;
    unsigned char watching[T2T_MAX_LOOPS];
    t2t_listen_tag tags[T2T_MAX_LOOPS];
    struct t2t_listener *next; /* the engine's list, for EMFILE retries and the fork child */
} t2t_listener;

static t2t_listener *t2t_listeners; /* under the engine's lock */

static void t2t_client_release_locked(t2t_bridge *b);

static void t2t_config_release(t2t_config *c) {
    if (!c || __atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    for (int i = 0; i < 4; i++) free((void *)c->access.lists[i]);
    for (int i = 0; i < c->nroutes; i++) free(c->routes[i]);
    free(c->routes);
    for (int i = 0; i < c->nupstreams; i++) {
        free(c->upstreams[i].text);
        free(c->upstreams[i].tls_name);
        t2t_upstream_state_release(c->upstreams[i].state);
    }
    free(c->upstreams);
    for (int k = 0; k < c->ncerts; k++) {
        t2t_tls.ctx_free(c->certs[k]);
        for (char **name = c->cert_names[k]; name && *name; name++) free(*name);
        free(c->cert_names[k]);
    }
    free(c->certs);
    free(c->cert_names);
    if (c->client_ctx) t2t_tls.ctx_free(c->client_ctx);
    free(c);
}

/* Termination: one more certificate (an SSL_CTX, which gets a reference of ours) and the names
   a client's SNI picks it by. 0, or -1 (ENOMEM). */
static int t2t_config_tls_cert(t2t_config *c, void *ctx, const char *const *names, int nnames) {
    void **certs = (void **)realloc(c->certs, (size_t)(c->ncerts + 1) * sizeof(void *));
    if (certs) c->certs = certs;
    char ***lists = (char ***)realloc(c->cert_names, (size_t)(c->ncerts + 1) * sizeof(char **));
    if (lists) c->cert_names = lists;
    char **copy = (char **)calloc((size_t)nnames + 1, sizeof(char *));
    if (!certs || !lists || !copy) {
        free(copy);
        errno = ENOMEM;
        return -1;
    }
    for (int i = 0; i < nnames; i++)
        if (!(copy[i] = strdup(names[i]))) {
            for (int k = 0; k < i; k++) free(copy[k]);
            free(copy);
            errno = ENOMEM;
            return -1;
        }
    t2t_tls.ctx_up_ref(ctx);
    c->certs[c->ncerts] = ctx;
    c->cert_names[c->ncerts] = copy;
    c->ncerts++;
    return 0;
}

/* Origination: the context (a reference of ours), and upstream i's host name (NULL: none). */
static int t2t_config_tls_client(t2t_config *c, void *ctx, int check_host) {
    t2t_tls.ctx_up_ref(ctx);
    c->client_ctx = ctx;
    c->check_host = (unsigned char)check_host;
    return 0;
}

static int t2t_config_tls_name(t2t_config *c, int i, const char *name, int is_ip) {
    if (name && !(c->upstreams[i].tls_name = strdup(name))) {
        errno = ENOMEM;
        return -1;
    }
    c->upstreams[i].tls_name_ip = (unsigned char)is_ip;
    return 0;
}

/* A config for `nupstreams` upstreams, all else zero; its fields are then set by the caller
   (_core.pyx), the upstreams and lists with the setters below. NULL with errno. */
static t2t_config *t2t_config_new(int nupstreams) {
    if (nupstreams < 1 || nupstreams > T2T_MAX_UPSTREAMS) {
        errno = EINVAL;
        return NULL;
    }
    t2t_config *c = (t2t_config *)calloc(1, sizeof(t2t_config));
    if (c) c->upstreams = (t2t_upstream *)calloc((size_t)nupstreams, sizeof(t2t_upstream));
    if (!c || !c->upstreams) {
        free(c);
        errno = ENOMEM;
        return NULL;
    }
    c->refs = 1;
    c->nupstreams = nupstreams;
    return c;
}

/* `down`: the upstream starts marked down, as by the checks (a name without an address yet), so
   no client is balanced to it before the forward says so. */
static int t2t_config_upstream(t2t_config *c, int i, const struct sockaddr *address, socklen_t len,
                               const char *text, size_t text_len, int weight, int down) {
    if (i < 0 || i >= c->nupstreams || len > sizeof(struct sockaddr_storage) || weight < 1 || weight > T2T_MAX_WEIGHT) {
        errno = EINVAL;
        return -1;
    }
    t2t_upstream *u = &c->upstreams[i];
    u->text = (char *)malloc(text_len + 1);
    if (!u->state) u->state = t2t_upstream_state_new();
    if (!u->text || !u->state) {
        errno = ENOMEM;
        return -1; /* (what was made is freed with the config) */
    }
    memcpy(u->text, text, text_len);
    u->text[text_len] = 0;
    u->hash = t2t_hash_bytes((const unsigned char *)text, text_len);
    u->weight = weight;
    memcpy(&u->address, address, len);
    u->len = len;
    u->ip = address->sa_family == AF_INET || address->sa_family == AF_INET6;
    __atomic_store_n(&u->state->checked_down, down, __ATOMIC_RELAXED);
    return 0;
}

/* Route by SNI (see t2t_config.routes): copies of the patterns, as _sni.check_route_pattern
   made them; 0, or -1 with errno. */
static int t2t_config_routes(t2t_config *c, int nserving, const char *const *patterns, int n, int strict) {
    if (nserving < 0 || n < 0 || nserving + n != c->nupstreams || (n && nserving < 1 && !strict)) {
        errno = EINVAL;
        return -1;
    }
    c->nserving = nserving;
    c->route_strict = (unsigned char)strict;
    if (!n) return 0;
    c->routes = (char **)calloc((size_t)n, sizeof(char *));
    if (!c->routes) {
        errno = ENOMEM;
        return -1;
    }
    c->nroutes = n; /* (those copied are freed with the config, whatever happens next) */
    for (int i = 0; i < n; i++) {
        size_t len = strlen(patterns[i]);
        if (!(c->routes[i] = (char *)malloc(len + 1))) {
            errno = ENOMEM;
            return -1;
        }
        memcpy(c->routes[i], patterns[i], len + 1);
    }
    return 0;
}

/* Copy the access lists in (see t2t_access); 0, or -1 with errno. */
static int t2t_config_access(t2t_config *c, const t2t_access *access) {
    c->access.active = 1;
    c->access.closed = access->closed;
    for (int i = 0; i < 4; i++) {
        size_t width = i < T2T_ALLOW6 ? 4 : 16, bytes = access->counts[i] * 2 * width;
        unsigned char *copy = bytes ? (unsigned char *)malloc(bytes) : NULL;
        if (bytes && !copy) {
            errno = ENOMEM;
            return -1; /* what was copied is freed with the config */
        }
        if (bytes) memcpy(copy, access->lists[i], bytes);
        c->access.lists[i] = copy;
        c->access.counts[i] = access->counts[i];
    }
    return 0;
}

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

/* Start or stop watching the listening socket in loop i's poller; 0 or -1. */
static int t2t_listener_watch(t2t_listener *lst, int i, int on) {
    t2t_loop *L = &t2t_the_engine.loops[i];
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLEXCLUSIVE;
    ev.data.ptr = &lst->tags[i].side;
    return epoll_ctl(L->poller, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, lst->fd, &ev);
#else
    /* kqueue has no exclusive wake-up: every loop wakes, and those that lose the race get
       EAGAIN from accept. Level-triggered, as the accept batch may stop short of the backlog. */
    struct kevent ev;
    EV_SET(&ev, lst->fd, EVFILT_READ, on ? EV_ADD : EV_DELETE, 0, 0, &lst->tags[i].side);
    return kevent(L->poller, &ev, 1, NULL, 0, NULL);
#endif
}

/* Watch the listener in every loop, or in none, as its state asks; the caller holds lst->lock.
   The clock is read here, not taken from a loop's turn: a turn's time can be older than the end
   of a back-off another loop's retry has already re-armed for, and arming with it would stop
   the watching with no retry left to start it again. */
static void t2t_listener_arm_locked(t2t_listener *lst) {
    t2t_engine *E = &t2t_the_engine;
    int64_t now = t2t_now();
    int want = !__atomic_load_n(&lst->stopping, __ATOMIC_SEQ_CST) &&
               __atomic_load_n(&lst->active, __ATOMIC_ACQUIRE) < __atomic_load_n(&lst->max_active, __ATOMIC_RELAXED) &&
               now >= __atomic_load_n(&lst->paused_until, __ATOMIC_RELAXED);
    int watched = 0;
    for (int i = 0; i < E->nloops; i++) {
        if (want && !lst->watching[i]) {
            if (t2t_listener_watch(lst, i, 1) == 0) lst->watching[i] = 1;
        } else if (!want && lst->watching[i]) {
            t2t_listener_watch(lst, i, 0);
            lst->watching[i] = 0;
        }
        watched |= lst->watching[i];
    }
    /* Not armed while no loop could watch it: the next arming tries again. */
    __atomic_store_n(&lst->armed, want && watched, __ATOMIC_RELEASE);
}

static void t2t_listener_arm(t2t_listener *lst) {
    pthread_mutex_lock(&lst->lock);
    t2t_listener_arm_locked(lst);
    pthread_mutex_unlock(&lst->lock);
}

/* Look at the listening socket afresh in every loop that watches it. Another process that
   accepted from it too (a predecessor, on --upgrade) may have taken a client's wake-up
   (EPOLLEXCLUSIVE wakes one watcher) and then stopped without accepting: the client waits in
   the queue until the next one connects. Watching anew polls the socket, and wakes a loop for
   what is queued. */
static void t2t_listener_recheck(t2t_listener *lst) {
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&lst->lock);
    for (int i = 0; i < E->nloops; i++) {
        if (!lst->watching[i]) continue;
        t2t_listener_watch(lst, i, 0);
        if (t2t_listener_watch(lst, i, 1) != 0) lst->watching[i] = 0;
    }
    if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE) || !memchr(lst->watching, 1, (size_t)E->nloops))
        t2t_listener_arm_locked(lst);
    pthread_mutex_unlock(&lst->lock);
}

static void t2t_listener_tell_locked(t2t_listener *lst) {
    if (!lst->ev_told) {
        lst->ev_told = 1;
        t2t_signal_fd(lst->ev_w);
    }
}

/* A listener's client ended, or never opened: give it to Python, free its slot. */
static void t2t_listener_report(t2t_bridge *b) {
    t2t_listener *lst = b->listener;
    if (b->opened) __atomic_sub_fetch(&b->cfg->upstreams[b->up_index].state->open, 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&lst->lock);
    if (b->client_counted) t2t_client_release_locked(b);
    b->done_next = NULL;
    if (lst->done_tail) lst->done_tail->done_next = b;
    else lst->done_head = b;
    lst->done_tail = b;
    t2t_listener_tell_locked(lst);
    __atomic_sub_fetch(&lst->active, 1, __ATOMIC_ACQ_REL);
    if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) t2t_listener_arm_locked(lst);
    pthread_mutex_unlock(&lst->lock);
}

/* The client is done with without a bridge (refused, unserved, cancelled): told at this turn's end. */
static void t2t_client_gone(t2t_bridge *b, int error) {
    t2t_loop *L = b->loop;
    t2t_heap_remove(L, b);
    for (int s = 0; s < 2; s++) {
        if (b->side[s].fd < 0) continue;
        t2t_poller_del(L, b->side[s].fd);
        close(b->side[s].fd);
        b->side[s].fd = -1;
    }
    if (b->registered) {
        if (b->prev) b->prev->next = b->next;
        else L->all = b->next;
        if (b->next) b->next->prev = b->prev;
        b->prev = b->next = NULL;
        b->registered = 0;
    }
    b->reason = T2T_ERROR;
    b->error = error;
    b->started_ns = b->ended_ns = L->now;
    __atomic_store_n(&b->state, T2T_DONE, __ATOMIC_RELEASE);
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
    t2t_listener_defer(b);
}

static void t2t_refuse(t2t_bridge *b, int refusal, int error) {
    b->refusal = (unsigned char)refusal;
    t2t_client_gone(b, error);
}

/* Into the loop's list of its bridges (for cancelling, and the fork child). */
static void t2t_link(t2t_bridge *b) {
    if (b->registered) return;
    t2t_loop *L = b->loop;
    b->next = L->all;
    if (L->all) L->all->prev = b;
    L->all = b;
    b->registered = 1;
}

/* Wait for one of b's sides in the poller (once: interest stays until its fd is closed). */
static int t2t_poll_side(t2t_bridge *b, int s) {
    if (b->side[s].polled) return 0;
    if (t2t_poller_add(b->loop, b->side[s].fd, &b->side[s]) != 0) return errno;
    b->side[s].polled = 1;
    return 0;
}

static void t2t_wait_until(t2t_bridge *b, int64_t deadline) {
    b->connect_deadline_ns = deadline;
    if (b->heap_index != SIZE_MAX) t2t_heap_fix(b->loop, b->heap_index);
    else if (t2t_heap_push(b->loop, b) != 0) t2t_client_gone(b, ENOMEM);
}

static void t2t_try_upstreams(t2t_bridge *b);

/* Record a failed upstream connect for Python. The max_fails-th within the fail window marks
   the upstream down for the back-off (passive health); its state is shared with the configs of
   later reloads that name the same address. */
static void t2t_upstream_failed(t2t_bridge *b, int error) {
    t2t_listener *lst = b->listener;
    t2t_config *c = b->cfg;
    t2t_upstream_state *st = c->upstreams[b->up_index].state;
    t2t_failure *f = (t2t_failure *)calloc(1, sizeof(t2t_failure));
    int64_t now = b->loop->now;
    int marked = 0;
    pthread_mutex_lock(&lst->lock);
    if (c->backoff_ns > 0) {
        if (st->fails == 0 || now - st->fails_since > c->fail_window_ns) {
            st->fails = 0;
            st->fails_since = now;
        }
        if (++st->fails >= c->max_fails) {
            st->fails = 0;
            marked = __atomic_load_n(&st->down_until, __ATOMIC_RELAXED) <= now;
            __atomic_store_n(&st->down_until, t2t_add(now, c->backoff_ns), __ATOMIC_RELAXED);
        }
    }
    if (f) { /* (out of memory: the failure goes unlogged, the client is still served or ended) */
        __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
        f->cfg = c;
        f->upstream = b->up_index;
        f->error = error;
        f->timed_out = error == ETIMEDOUT && b->timed_out;
        f->marked_down = (unsigned char)marked;
        f->conn_id = b->conn_id;
        memcpy(&f->peer, &b->peer, b->peer_len);
        f->peer_len = b->peer_len;
        t2t_tls_work *w = b->tlsw;
        if (w && w->failed_side == 2) {
            memcpy(f->tls_failure, w->failure, sizeof(f->tls_failure));
            f->tls_closed = w->closed;
            f->tls_timed_out = w->timed_out;
        }
        if (lst->failed_tail) lst->failed_tail->next = f;
        else lst->failed_head = f;
        lst->failed_tail = f;
        t2t_listener_tell_locked(lst);
    }
    pthread_mutex_unlock(&lst->lock);
    /* Its words were this failure's alone: the next upstream's failure is its own. */
    t2t_tls_work *w = b->tlsw;
    if (w) {
        w->failed_side = w->closed = w->timed_out = 0;
        w->failure[0] = 0;
    }
}

/* The upstream being tried failed: close it, report it, go on to the next. */
static void t2t_fail_over(t2t_bridge *b, int error) {
    if (b->side[1].fd >= 0) {
        if (b->side[1].polled) t2t_poller_del(b->loop, b->side[1].fd);
        close(b->side[1].fd);
        b->side[1].fd = -1;
    }
    if (b->px) b->px->out_len = b->px->out_sent = 0; /* our header goes to the next one whole */
    t2t_upstream_failed(b, error);
    b->timed_out = 0;
    t2t_try_upstreams(b);
}

/* Connected, and our PROXY header (if any) written: relaying starts now (the idle rule's
   start), and Python hears of it. */
static void t2t_open(t2t_bridge *b) {
    t2t_listener *lst = b->listener;
    t2t_loop *L = b->loop;
    /* Under the lock t2t_listener_stop takes after setting `cancelling`: a bridge that opened once
       a closing stop() had returned would be missed by the forwarder's last take, and nobody
       would stop it. */
    pthread_mutex_lock(&lst->lock);
    if (__atomic_load_n(&lst->cancelling, __ATOMIC_SEQ_CST)) {
        pthread_mutex_unlock(&lst->lock);
        t2t_client_gone(b, ECANCELED);
        return;
    }
    t2t_heap_remove(L, b);
    free(b->px);
    b->px = NULL;
    free(b->hello);
    b->hello = NULL;
    /* A TLS side may hold plaintext already (records that came with the handshake's last
       flight): no edge would tell, so its first read is tried at once. Its EOF without
       close_notify ends the bridge "closed" and is passed on as a cut (suppress_ragged_eofs,
       as the pure listener's sockets have it). */
    for (int s = 0; s < 2; s++)
        if (b->side[s].tls) b->side[s].readable = b->side[s].ragged_eof_is_end = 1;
    b->state = T2T_RELAYING;
    b->started_ns = b->next_check_ns = L->now;
    b->opened = 1;
    __atomic_add_fetch(&b->cfg->upstreams[b->up_index].state->open, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED); /* the opened list's, taken over by Python */
    b->open_next = NULL;
    b->open_untaken = 1;
    if (lst->opened_tail) lst->opened_tail->open_next = b;
    else lst->opened_head = b;
    lst->opened_tail = b;
    t2t_listener_tell_locked(lst);
    pthread_mutex_unlock(&lst->lock);
    t2t_link(b);
    int error = t2t_poll_side(b, 0);
    if (!error) error = t2t_poll_side(b, 1);
    if (error) {
        t2t_fail(b, error);
        return;
    }
    t2t_idle_check(b);
    if (b->state == T2T_RELAYING && t2t_heap_push(L, b) != 0) t2t_fail(b, ENOMEM);
    t2t_service(b); /* what the client sent while we connected */
}

static void t2t_tls_begin(t2t_bridge *b, int s);

/* Connected, and our PROXY header (if any) sent in plaintext: the TLS handshake upstream for a
   forward that originates TLS, else the bridge opens. */
static void t2t_upstream_ready(t2t_bridge *b) {
    if (b->cfg->client_ctx) t2t_tls_begin(b, 1);
    else t2t_open(b);
}

/* Write what is left of our PROXY header; then open. A full socket buffer waits for room. */
static void t2t_send_header(t2t_bridge *b) {
    t2t_proxying *px = b->px;
    while (px && px->out_sent < px->out_len) {
        ssize_t n = send(b->side[1].fd, px->out + px->out_sent, px->out_len - px->out_sent, MSG_NOSIGNAL);
        if (n > 0) {
            px->out_sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && T2T_WOULD_BLOCK(errno)) {
            b->side[1].writable = 0;
            t2t_link(b); /* (a close cancels it meanwhile: see t2t_cancel_connects) */
            int error = t2t_poll_side(b, 1);
            if (error) t2t_fail_over(b, error);
            else t2t_wait_until(b, t2t_add(b->loop->now, b->cfg->connect_timeout_ns));
            return;
        }
        t2t_fail_over(b, n < 0 ? errno : EPIPE);
        return;
    }
    t2t_upstream_ready(b);
}

/* The upstream accepted the connection. */
static void t2t_connected(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    t2t_upstream_state *st = c->upstreams[b->up_index].state;
    if (__atomic_load_n(&st->down_until, __ATOMIC_RELAXED) || st->fails) {
        pthread_mutex_lock(&b->listener->lock);
        st->fails = 0;
        __atomic_store_n(&st->down_until, 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&b->listener->lock);
    }
    if (!c->send_proxy) {
        t2t_upstream_ready(b);
        return;
    }
    t2t_proxying *px = b->px;
    const struct sockaddr *source = NULL, *destination = NULL;
    struct sockaddr_storage here;
    int family = b->peer.ss_family;
    if (family == AF_INET || family == AF_INET6) {
        source = (const struct sockaddr *)&b->peer;
        if (px->destination_len) {
            destination = (const struct sockaddr *)&px->destination;
        } else {
            socklen_t len = sizeof(here);
            if (getsockname(b->side[0].fd, (struct sockaddr *)&here, &len) != 0) {
                t2t_fail_over(b, errno);
                return;
            }
            destination = (const struct sockaddr *)&here;
        }
    }
    px->out_len = t2t_proxy_encode(c->send_proxy, family, source, destination, px->out, sizeof(px->out));
    px->out_sent = 0;
    if (!px->out_len) { /* (addresses of another family than the client's: never, from accept) */
        t2t_fail_over(b, EINVAL);
        return;
    }
    t2t_send_header(b);
}

/* Writable while connecting: the connect's outcome, or room for the rest of our header. */
static void t2t_connect_check(t2t_bridge *b) {
    if (!b->side[1].writable) return;
    if (b->px && b->px->out_len) {
        t2t_send_header(b);
        return;
    }
    int error = 0;
    socklen_t len = sizeof(error);
    if (getsockopt(b->side[1].fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
    if (error) t2t_fail_over(b, error);
    else t2t_connected(b);
}

/* Where a new fd cannot be born close-on-exec and non-blocking (no SOCK_NONBLOCK, no accept4):
   make it so, or close it. -1 (with errno) for -1 or a failure. */
static int t2t_cloexec_nonblocking(int fd) {
    if (fd >= 0 && (fcntl(fd, F_SETFD, FD_CLOEXEC) != 0 || t2t_set_nonblocking(fd) != 0)) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static int t2t_new_socket(int family) {
#if defined(SOCK_NONBLOCK) && defined(SOCK_CLOEXEC)
    return socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#else
    return t2t_cloexec_nonblocking(socket(family, SOCK_STREAM, 0));
#endif
}

/* The first n upstreams, a bit each. */
static uint64_t t2t_first_bits(int n) { return n >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << n) - 1; }

/* The upstream b tries next, among those it has not tried and that were not down when it was
   admitted; -1 when none is left. A first try goes by the forward's balance; a failover goes
   on in that balance's order: the next index for first and roundrobin, the next fewest bridges
   for leastconn, the next highest score for source. */
static int t2t_pick_upstream(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    int n = c->nupstreams;
    uint64_t left = t2t_first_bits(n) & ~b->up_tried & ~b->up_skip;
    if (!left) return -1;
#define T2T_LEFT(i) (left & ((uint64_t)1 << (i)))
    int best = -1;
    if (c->balance == T2T_BALANCE_LEASTCONN) {
        /* Fewest bridges per weight: a/wa < b/wb as a*wb < b*wa. Ties go round. */
        int from = (int)(__atomic_fetch_add(&b->listener->next_upstream, 1, __ATOMIC_RELAXED) % (unsigned int)n);
        long long best_open = 0, best_weight = 1;
        for (int k = 0; k < n; k++) {
            int i = (from + k) % n;
            if (!T2T_LEFT(i)) continue;
            long long open = __atomic_load_n(&c->upstreams[i].state->open, __ATOMIC_RELAXED);
            if (best < 0 || open * best_weight < best_open * c->upstreams[i].weight) {
                best = i;
                best_open = open;
                best_weight = c->upstreams[i].weight;
            }
        }
    } else if (c->balance == T2T_BALANCE_SOURCE) {
        unsigned char key[T2T_CLIENT_KEY_MAX];
        uint64_t client = t2t_hash_bytes(key, t2t_client_key(&b->peer, c->prefix6, key));
        double best_score = 0;
        for (int i = 0; i < n; i++) {
            if (!T2T_LEFT(i)) continue;
            double score = t2t_rendezvous_score(client, c->upstreams[i].hash, c->upstreams[i].weight);
            if (best < 0 || score > best_score) {
                best = i;
                best_score = score;
            }
        }
    } else if (c->balance == T2T_BALANCE_ROUNDROBIN && !b->up_tried) {
        /* Smooth weighted round robin: each candidate gains its weight, the highest goes and
           pays back the candidates' total. Equal weights take turns in index order. */
        int64_t total = 0, best_current = 0;
        pthread_mutex_lock(&b->listener->balance_lock);
        for (int i = 0; i < n; i++) {
            if (!T2T_LEFT(i)) continue;
            t2t_upstream_state *st = c->upstreams[i].state;
            st->current += c->upstreams[i].weight;
            total += c->upstreams[i].weight;
            if (best < 0 || st->current > best_current) {
                best = i;
                best_current = st->current;
            }
        }
        c->upstreams[best].state->current -= total;
        pthread_mutex_unlock(&b->listener->balance_lock);
    } else {
        int from = b->up_tried ? b->up_index + 1 : 0; /* first: in order; a failover: the next */
        for (int k = 0; k < n && best < 0; k++)
            if (T2T_LEFT((from + k) % n)) best = (from + k) % n;
    }
#undef T2T_LEFT
    return best;
}

/* Connect to the next upstream in the client's order; with none left, close the client. */
static void t2t_try_upstreams(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    t2t_loop *L = b->loop;
    if (__atomic_load_n(&b->listener->cancelling, __ATOMIC_SEQ_CST)) {
        t2t_client_gone(b, ECANCELED);
        return;
    }
    for (int i; (i = t2t_pick_upstream(b)) >= 0;) {
        t2t_upstream *u = &c->upstreams[i];
        b->up_tried |= (uint64_t)1 << i;
        b->up_index = (unsigned char)i;
        /* A fresh side: nothing the last upstream's socket showed applies to this one. */
        memset(&b->side[1], 0, sizeof(b->side[1]));
        b->side[1].bridge = b;
        b->side[1].fd = t2t_new_socket(u->address.ss_family);
        if (b->side[1].fd < 0) {
            t2t_upstream_failed(b, errno);
            continue;
        }
        /* Asked, not assumed from the family: a preloaded library may make it MPTCP. */
        b->side[1].tcp = (unsigned char)(u->ip && t2t_is_tcp(b->side[1].fd));
        if (u->ip)
            for (int k = 0; k < c->nsockopts; k++)
                setsockopt(b->side[1].fd, c->sockopts[k][0], c->sockopts[k][1], &c->sockopts[k][2], sizeof(int));
        int rc = connect(b->side[1].fd, (struct sockaddr *)&u->address, u->len);
        if (rc != 0 && errno == EINPROGRESS) {
            /* On a local upstream the handshake has usually completed inside connect() already:
               asking again tells at once, and saves a trip through the poller. */
            rc = connect(b->side[1].fd, (struct sockaddr *)&u->address, u->len);
            if (rc != 0 && errno == EISCONN) rc = 0;
            else if (rc != 0 && errno == EALREADY) errno = EINPROGRESS;
        }
        if (rc == 0) {
            t2t_connected(b);
            return;
        }
        int error = errno;
        if (error == EINPROGRESS || (error == EAGAIN && u->ip)) { /* (a Unix socket's EAGAIN: a full backlog, final) */
            t2t_link(b);
            error = t2t_poll_side(b, 1);
            if (!error) {
                t2t_wait_until(b, t2t_add(L->now, c->connect_timeout_ns));
                return;
            }
        }
        close(b->side[1].fd);
        b->side[1].fd = -1;
        t2t_upstream_failed(b, error);
    }
    t2t_client_gone(b, b->up_tried ? ECONNREFUSED : EINVAL); /* every upstream failed */
}

/* The client's place in the client table, if the forward limits clients: a refusal
   (T2T_REFUSED_*) if it may not open another bridge now, else 0 (and it holds a slot). */
static int t2t_client_admit(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    t2t_listener *lst = b->listener;
    unsigned char key[T2T_CLIENT_KEY_MAX];
    size_t len = t2t_client_key(&b->peer, c->prefix6, key);
    int refusal = 0;
    pthread_mutex_lock(&lst->lock);
    t2t_client *e = t2t_clients_get(&lst->clients, key, len, b->loop->now);
    if (!e) refusal = T2T_REFUSED_CLIENTS_FULL;
    else if (c->max_per_client && e->open >= c->max_per_client) refusal = T2T_REFUSED_PER_CLIENT;
    else if (c->rate_spacing_ns && !t2t_bucket_take(&e->tat, b->loop->now, c->rate_spacing_ns, c->rate_burst))
        refusal = T2T_REFUSED_RATE;
    else {
        e->open++;
        b->client_counted = 1;
    }
    pthread_mutex_unlock(&lst->lock);
    return refusal;
}

/* Give back the client's slot (its bridge ended, or it never got one); under the listener's lock. */
static void t2t_client_release_locked(t2t_bridge *b) {
    unsigned char key[T2T_CLIENT_KEY_MAX];
    size_t len = t2t_client_key(&b->peer, b->cfg->prefix6, key);
    t2t_client *e = t2t_clients_slot(b->listener->clients.slots, b->listener->clients.cap, key, len);
    if (e->key_len && e->open > 0) e->open--;
    b->client_counted = 0;
}

/* Try the upstreams of `among` (a bit per index): those down (marked by failed connects or by
   the checks) are skipped unless every one of them is. */
static void t2t_connect_among(t2t_bridge *b, uint64_t among) {
    t2t_config *c = b->cfg;
    if (c->ncerts && !b->side[0].tls) { /* a forward that terminates TLS: the client's handshake first */
        b->up_skip = among; /* (kept here until then) */
        t2t_tls_begin(b, 0);
        return;
    }
    uint64_t down = 0;
    for (int i = 0; i < c->nupstreams; i++)
        if ((among & ((uint64_t)1 << i)) && t2t_upstream_is_down(c->upstreams[i].state, b->loop->now))
            down |= (uint64_t)1 << i;
    b->up_skip = ~among | (down == among ? 0 : down);
    b->up_tried = 0;
    b->state = T2T_CONNECTING;
    t2t_try_upstreams(b);
}

static void t2t_hello_read(t2t_bridge *b);

/* ---- TLS handshakes (forwards that terminate or originate TLS; see _loop_tls.h) ---- */

/* Termination with several certificates: the one for the client's SNI, from its ClientHello
   peeked at into the loop's buffer; -1 while it is not whole yet. A hello that cannot be read
   gets the first one, and the handshake then fails with OpenSSL's own words. */
static int t2t_tls_pick(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    char name[T2T_SNI_NAME_MAX];
    size_t hello_len = 0;
    ssize_t n;
    do n = recv(b->side[0].fd, b->loop->buffer, T2T_SNI_IN_MAX, MSG_PEEK);
    while (n < 0 && errno == EINTR);
    if (n < 0 && T2T_WOULD_BLOCK(errno)) {
        b->side[0].readable = 0;
        return -1;
    }
    if (n <= 0) return 0;
    int got = t2t_sni_parse((const unsigned char *)b->loop->buffer, (size_t)n, name, sizeof(name), &hello_len);
    if (got == 0 && !b->side[0].closing) { /* (a peek sees the whole queue: wait for more) */
        b->side[0].readable = 0;
        return -1;
    }
    if (got <= 0 || !name[0]) return 0; /* (a client that closed: the handshake says so) */
    for (int k = 1; k < c->ncerts; k++)
        for (char **pattern = c->cert_names[k]; *pattern; pattern++)
            if (t2t_tls_name_matches(*pattern, name)) return k;
    return 0;
}

/* A handshake failed (its words in b->tlsw): a client's is refused; an upstream's counts as
   that upstream failing, and the next one is tried. */
static void t2t_tls_failed(t2t_bridge *b) {
    t2t_tls_work *w = b->tlsw;
    if (b->tls_side == 0) {
        w->failed_side = 1;
        t2t_refuse(b, T2T_REFUSED_TLS, EPROTO);
        return;
    }
    if (b->tls_owned & 2) t2t_tls.ssl_free(b->side[1].tls);
    b->side[1].tls = NULL;
    b->tls_owned &= (unsigned char)~2;
    w->failed_side = 2;
    b->state = T2T_CONNECTING;
    t2t_fail_over(b, EPROTO); /* (reports the words, and clears them) */
}

static void t2t_tls_timed_out(t2t_bridge *b) {
    b->tlsw->timed_out = 1;
    snprintf(b->tlsw->failure, sizeof(b->tlsw->failure), "timed out");
    t2t_tls_failed(b);
}

/* One step of the handshake under way; on to the upstreams (the client's is done) or the
   bridge (the upstream's) once it is done. */
static void t2t_tls_handshake(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    int s = b->tls_side;
    t2t_side *side = &b->side[s];
    if (!side->tls) { /* (the client's: made once its certificate is known) */
        int k = c->ncerts > 1 ? t2t_tls_pick(b) : 0;
        if (k < 0) return;
        if (!(side->tls = t2t_tls_new(c->certs[k], side->fd, 1))) {
            snprintf(b->tlsw->failure, sizeof(b->tlsw->failure), "%s", strerror(ENOMEM));
            t2t_tls_failed(b);
            return;
        }
        b->tls_owned |= 1;
    }
    int r = t2t_tls_step(side->tls, b->tlsw, s == 1 ? c->upstreams[b->up_index].tls_name : NULL);
    if (r == EAGAIN) {
        side->readable = 0;
        return;
    }
    if (r == EINPROGRESS) {
        side->writable = 0;
        return;
    }
    if (r != 0) {
        t2t_tls_failed(b);
        return;
    }
    t2t_tls_describe(side->tls, b->tlsw, s == 0);
    if (s == 0) t2t_connect_among(b, b->up_skip);
    else t2t_open(b);
}

/* Start side s's handshake: the client's (termination), or the upstream's just connected
   (origination), within the forward's --tls-handshake-timeout. */
static void t2t_tls_begin(t2t_bridge *b, int s) {
    t2t_config *c = b->cfg;
    if (!b->tlsw && !(b->tlsw = (t2t_tls_work *)calloc(1, sizeof(t2t_tls_work)))) {
        if (s == 0) t2t_client_gone(b, ENOMEM);
        else t2t_fail_over(b, ENOMEM);
        return;
    }
    b->state = T2T_HANDSHAKE;
    b->tls_side = (unsigned char)s;
    if (s == 1) {
        t2t_upstream *u = &c->upstreams[b->up_index];
        void *ssl = t2t_tls_new(c->client_ctx, b->side[1].fd, 0);
        if (ssl) {
            b->side[1].tls = ssl;
            b->tls_owned |= 2;
        }
        const char *why = !ssl ? strerror(ENOMEM)
                          : t2t_tls_name_upstream(ssl, u->tls_name, u->tls_name_ip, c->check_host) != 0
                              ? "the upstream's name cannot be checked"
                              : NULL;
        if (why) {
            snprintf(b->tlsw->failure, sizeof(b->tlsw->failure), "%s", why);
            t2t_tls_failed(b);
            return;
        }
    }
    t2t_link(b);
    int error = t2t_poll_side(b, s);
    if (error) {
        snprintf(b->tlsw->failure, sizeof(b->tlsw->failure), "%s", strerror(error));
        t2t_tls_failed(b);
        return;
    }
    t2t_wait_until(b, t2t_add(b->loop->now, c->tls_timeout_ns));
    if (b->state == T2T_HANDSHAKE) t2t_tls_handshake(b);
}

/* Check the client; then route it by its ClientHello (forwards with --route-sni), or connect. */
static void t2t_admit(t2t_bridge *b) {
    t2t_config *c = b->cfg;
    if (!t2t_permits(&c->access, &b->peer)) {
        t2t_refuse(b, T2T_REFUSED_ACCESS, EACCES);
        return;
    }
    if (c->max_per_client || c->rate_spacing_ns) {
        int refusal = t2t_client_admit(b);
        if (refusal) {
            t2t_refuse(b, refusal, EACCES);
            return;
        }
    }
    if (!c->nroutes) {
        t2t_connect_among(b, t2t_first_bits(c->nupstreams));
        return;
    }
    if (!(b->hello = (t2t_hello *)malloc(sizeof(t2t_hello)))) {
        t2t_client_gone(b, ENOMEM);
        return;
    }
    b->hello->name[0] = b->hello->error[0] = 0;
    b->state = T2T_HEADER;
    t2t_link(b);
    int error = t2t_poll_side(b, 0);
    if (error) {
        t2t_client_gone(b, error);
        return;
    }
    t2t_wait_until(b, t2t_add(b->loop->now, c->proxy_timeout_ns));
    /* After a PROXY header the hello may have come with it: no new edge would tell. */
    if (b->side[0].readable && b->state == T2T_HEADER) t2t_hello_read(b);
}

/* Readable while peeking at the client's ClientHello: once it is whole, route by its name. */
static void t2t_hello_read(t2t_bridge *b) {
    t2t_hello *h = b->hello;
    t2t_config *c = b->cfg;
    if (!b->side[0].readable) return;
    ssize_t n;
    do n = recv(b->side[0].fd, h->in, sizeof(h->in), MSG_PEEK);
    while (n < 0 && errno == EINTR);
    if (n < 0 && T2T_WOULD_BLOCK(errno)) {
        b->side[0].readable = 0;
        return;
    }
    if (n < 0) {
        t2t_refuse(b, T2T_REFUSED_HELLO_READ, errno);
        return;
    }
    if (n == 0) {
        t2t_refuse(b, T2T_REFUSED_HELLO_CLOSED, 0);
        return;
    }
    size_t hello_len = 0;
    int got = t2t_sni_parse(h->in, (size_t)n, h->name, sizeof(h->name), &hello_len);
    if (got < 0) {
        t2t_sni_error_text(got, h->in, (size_t)n, h->error, sizeof(h->error));
        t2t_refuse(b, T2T_REFUSED_HELLO_BAD, EPROTO);
        return;
    }
    if (got == 0) { /* all there is so far (a peek sees the whole queue): wait for more */
        b->side[0].readable = 0;
        return;
    }
    int route = t2t_sni_match(h->name, (const char *const *)c->routes, c->nroutes);
    if (route < 0 && c->route_strict) {
        t2t_refuse(b, T2T_REFUSED_NO_ROUTE, EACCES);
        return;
    }
    t2t_connect_among(b, route >= 0 ? (uint64_t)1 << (c->nserving + route) : t2t_first_bits(c->nserving));
}

/* Readable while reading the client's PROXY header: every byte of it and none after it, so
   what the client sent next stays in the socket for the bridge. */
static void t2t_header_read(t2t_bridge *b) {
    t2t_proxying *px = b->px;
    if (b->hello) {
        t2t_hello_read(b);
        return;
    }
    if (!b->side[0].readable) return;
    for (;;) {
        ssize_t n = recv(b->side[0].fd, px->in + px->in_len, sizeof(px->in) - px->in_len, MSG_PEEK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && T2T_WOULD_BLOCK(errno)) {
            b->side[0].readable = 0;
            return;
        }
        if (n < 0) {
            t2t_refuse(b, T2T_REFUSED_PROXY_READ, errno);
            return;
        }
        if (n == 0) {
            t2t_refuse(b, T2T_REFUSED_PROXY_CLOSED, 0);
            return;
        }
        size_t seen = px->in_len + (size_t)n;
        t2t_proxy_header header;
        int got = t2t_proxy_parse(px->in, seen, &header);
        if (got < 0) {
            t2t_proxy_error_text(got, &header, px->in, px->error, sizeof(px->error));
            t2t_refuse(b, T2T_REFUSED_PROXY_BAD, -got);
            return;
        }
        /* A prefix of a header is all header: take it. A whole one: take just its bytes. */
        size_t take = got == 0 ? (size_t)n : (size_t)got - px->in_len;
        ssize_t r;
        do r = recv(b->side[0].fd, px->in + px->in_len, take, 0);
        while (r < 0 && errno == EINTR);
        if (r != (ssize_t)take) { /* peeked bytes are there to read: only an error stops it */
            t2t_refuse(b, T2T_REFUSED_PROXY_READ, r < 0 ? errno : EIO);
            return;
        }
        px->in_len += take;
        if (got == 0) {
            if (px->in_len >= T2T_PROXY_IN_MAX) {
                t2t_refuse(b, T2T_REFUSED_PROXY_LONG, 0);
                return;
            }
            continue; /* (a short peek; the next one says EAGAIN) */
        }
        if (header.has_addresses && (header.family == AF_INET || header.family == AF_INET6)) {
            memcpy(&b->peer, &header.source, header.source_len);
            b->peer_len = header.source_len;
            memcpy(&px->destination, &header.destination, header.destination_len);
            px->destination_len = header.destination_len;
        }
        t2t_admit(b);
        return;
    }
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

/* End the clients still connecting upstream (or reading their header) for a listener that
   cancels: their connect may not report for seconds (a SYN waiting for its retransmission). */
static void t2t_cancel_connects(t2t_loop *L) {
    for (t2t_bridge *b = L->all, *next; b; b = next) {
        next = b->next; /* (t2t_client_gone unlinks b) */
        if ((b->state == T2T_CONNECTING || b->state == T2T_HEADER || b->state == T2T_HANDSHAKE) && b->listener &&
            __atomic_load_n(&b->listener->cancelling, __ATOMIC_SEQ_CST))
            t2t_client_gone(b, ECANCELED);
    }
}

/* A new client, in the loop that keeps it. */
static void t2t_client_begin(t2t_bridge *b) {
    if (!b->cfg->accept_proxy) {
        t2t_admit(b);
        return;
    }
    b->state = T2T_HEADER;
    t2t_link(b);
    int error = t2t_poll_side(b, 0);
    if (error) t2t_client_gone(b, error);
    else t2t_wait_until(b, t2t_add(b->loop->now, b->cfg->proxy_timeout_ns));
}

/* A client another loop handed to this one (see t2t_accept_home). */
static void t2t_connect_handed(t2t_bridge *b) { t2t_client_begin(b); }

/* Give back a slot taken for a client that never came (or could not be kept). Re-arm: another
   loop may have found the listener full meanwhile and stopped watching it. Under the lock, as
   in t2t_listener_report: outside it, that loop could read the count before this decrement and
   disarm after this one read `armed`, and the listener would stay unwatched with a free slot. */
static void t2t_listener_unreserve(t2t_listener *lst) {
    pthread_mutex_lock(&lst->lock);
    __atomic_sub_fetch(&lst->active, 1, __ATOMIC_ACQ_REL);
    if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) t2t_listener_arm_locked(lst);
    pthread_mutex_unlock(&lst->lock);
}

/* A new client, its slot in lst->active already taken (see t2t_accept_some). */
static void t2t_accept_one(t2t_loop *L, t2t_listener *lst, int client, struct sockaddr_storage *peer,
                           socklen_t peer_len) {
    t2t_bridge *b = (t2t_bridge *)calloc(1, sizeof(t2t_bridge));
    if (!b) {
        close(client);
        t2t_listener_unreserve(lst);
        return;
    }
    pthread_mutex_lock(&lst->lock);
    t2t_config *c = lst->cfg;
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lst->lock);
    if (((c->accept_proxy || c->send_proxy) && !(b->px = (t2t_proxying *)calloc(1, sizeof(t2t_proxying)))) ||
        t2t_rate_set(b, c->rate, c->burst, c->quantum, L->now) != 0) {
        t2t_config_release(c);
        free(b->px);
        free(b);
        close(client);
        t2t_listener_unreserve(lst);
        return;
    }
    __atomic_fetch_add(&L->load, 1, __ATOMIC_RELAXED);
    b->loop = L;
    b->listener = lst;
    b->cfg = c;
    b->conn_id = __atomic_fetch_add(&lst->next_id, 1, __ATOMIC_RELAXED);
    memcpy(&b->peer, peer, peer_len);
    b->peer_len = peer_len;
    b->interval_ns = c->interval_ns;
    b->idle_limit = c->idle_limit;
    b->activity_both = c->activity_both;
    b->half_close = c->half_close;
    b->may_splice = c->may_splice && !c->ncerts && !c->client_ctx; /* (records go through the buffer) */
    b->heap_index = SIZE_MAX;
    b->refs = 1; /* the engine's, until Python took its end */
    b->state = T2T_CONNECTING;
    for (int s = 0; s < 2; s++) b->side[s].bridge = b;
    b->side[0].fd = client;
    b->side[1].fd = -1;
    b->side[0].tcp = lst->client_tcp;
    t2t_loop *home = t2t_accept_home(L);
    if (home == L) {
        t2t_client_begin(b);
        return;
    }
    /* Nothing of L's holds it yet (not linked, polled or timed): it becomes home's outright.
       Home begins it within the turn that takes its inbox, which t2t_listener_stop waits for. */
    __atomic_fetch_sub(&L->load, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&home->load, 1, __ATOMIC_RELAXED);
    b->loop = home;
    t2t_post(home, b, T2T_ASK_CONNECT);
}

static int t2t_accept_fd(int fd, struct sockaddr_storage *peer, socklen_t *peer_len) {
#if defined(__linux__)
    return accept4(fd, (struct sockaddr *)peer, peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    return t2t_cloexec_nonblocking(accept(fd, (struct sockaddr *)peer, peer_len));
#endif
}

static void t2t_accept_some(t2t_loop *L, t2t_listen_tag *tag) {
    t2t_listener *lst = tag->lst;
    for (int i = 0; i < T2T_ACCEPTS_PER_TURN && !__atomic_load_n(&lst->stopping, __ATOMIC_SEQ_CST); i++) {
        /* Take the client's slot before accepting it: loops accept side by side, and checking
           first would let each of them take the last slot. */
        if (__atomic_add_fetch(&lst->active, 1, __ATOMIC_ACQ_REL) > __atomic_load_n(&lst->max_active, __ATOMIC_RELAXED)) {
            __atomic_sub_fetch(&lst->active, 1, __ATOMIC_ACQ_REL);
            t2t_listener_arm(lst); /* full: leave clients in the backlog */
            break;
        }
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof(peer);
        int client = t2t_accept_fd(lst->fd, &peer, &peer_len);
        if (client < 0) {
            int error = errno;
            if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM) {
                /* Out of fds for now: wait a moment instead of spinning on a ready listener,
                   and tell Python (once per take, however many loops paused). */
                int64_t until = t2t_now() + T2T_ACCEPT_BACKOFF_NS; /* (the clock arming reads) */
                __atomic_store_n(&lst->paused_until, until, __ATOMIC_RELAXED);
                L->retry_listeners_ns = until;
                pthread_mutex_lock(&lst->lock);
                lst->accept_error = error;
                t2t_listener_tell_locked(lst);
                pthread_mutex_unlock(&lst->lock);
            }
            t2t_listener_unreserve(lst);
            if (error == EINTR || error == ECONNABORTED) continue;
            if (__atomic_load_n(&lst->paused_until, __ATOMIC_RELAXED) > L->now) t2t_listener_arm(lst);
            break;
        }
        t2t_accept_one(L, lst, client, &peer, peer_len);
    }
}

static void t2t_retry_listeners(t2t_loop *L) {
    L->retry_listeners_ns = 0;
    t2t_engine *E = &t2t_the_engine;
    pthread_mutex_lock(&E->lock);
    for (t2t_listener *lst = t2t_listeners; lst; lst = lst->next)
        if (!__atomic_load_n(&lst->armed, __ATOMIC_ACQUIRE)) t2t_listener_arm(lst);
    pthread_mutex_unlock(&E->lock);
}

/* Wait until every loop finished a turn that began after this call: what a loop saw before
   (an event of a listening socket no poller watches any more, a client posted to its inbox)
   has then been handled. A loop acknowledges at its turn's end (see t2t_loop_main). */
static void t2t_barrier(void) {
    t2t_engine *E = &t2t_the_engine;
    unsigned long long ticket[T2T_MAX_LOOPS];
    for (int i = 0; i < E->nloops; i++) {
        t2t_loop *L = &E->loops[i];
        pthread_mutex_lock(&L->lock);
        ticket[i] = ++L->barrier_asked;
        int wake = t2t_wake_due(L);
        pthread_mutex_unlock(&L->lock);
        if (wake) t2t_wake(L);
    }
    pthread_mutex_lock(&E->lock);
    for (int i = 0; i < E->nloops; i++)
        while (__atomic_load_n(&E->loops[i].barrier_done, __ATOMIC_ACQUIRE) < ticket[i])
            pthread_cond_wait(&E->barrier_cond, &E->lock);
    pthread_mutex_unlock(&E->lock);
}

/* ---- listeners: the API for _core.pyx ---- */

/* Accept on `fd` (a listening socket, left open for the caller) in every loop and serve each
   client as `cfg` says; the listener takes the caller's reference to cfg. NULL with errno. */
static t2t_listener *t2t_listen(int fd, t2t_config *cfg, unsigned long long first_id) {
    t2t_engine *E = &t2t_the_engine;
    if (!E->nloops) {
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
    lst->cfg = cfg;
    lst->max_active = cfg->max_active;
    lst->client_tcp = (unsigned char)t2t_is_tcp(fd);
    lst->next_id = first_id;
    pthread_mutex_init(&lst->lock, NULL);
    pthread_mutex_init(&lst->balance_lock, NULL);
    for (int i = 0; i < T2T_MAX_LOOPS; i++) {
        lst->tags[i].side.fd = -1;
        lst->tags[i].side.kind = T2T_TAG_LISTENER;
        lst->tags[i].lst = lst;
        lst->tags[i].loop = i;
    }
    /* Linked first, so that a loop's retry after a back-off finds it; armed and checked under
       both locks, so that no retry arms it between the check and the unlinking, and no loop
       that accepted from it (and found it full) can have disarmed it before the check. */
    pthread_mutex_lock(&E->lock);
    lst->next = t2t_listeners;
    t2t_listeners = lst;
    pthread_mutex_lock(&lst->lock);
    t2t_listener_arm_locked(lst);
    int watched = lst->armed;
    if (!watched) t2t_listeners = lst->next;
    pthread_mutex_unlock(&lst->lock);
    pthread_mutex_unlock(&E->lock);
    if (!watched) { /* not a socket the loops could watch (no loop ever did: nothing holds lst) */
        pthread_mutex_destroy(&lst->lock);
        pthread_mutex_destroy(&lst->balance_lock);
        close(lst->ev_r);
        if (lst->ev_w != lst->ev_r) close(lst->ev_w);
        free(lst);
        errno = EINVAL;
        return NULL; /* (cfg stays the caller's) */
    }
    return lst;
}

static int t2t_limit_less(int limit, int reserved) { return reserved <= 0 ? limit : limit > reserved ? limit - reserved : 0; }

/* `n` bridges the listener did not open (handed over by a predecessor process) count against
   its connection limit from now on: it accepts again as they end. */
static void t2t_listener_reserve(t2t_listener *lst, int n) {
    pthread_mutex_lock(&lst->lock);
    lst->reserved = n;
    __atomic_store_n(&lst->max_active, t2t_limit_less(lst->cfg->max_active, n), __ATOMIC_RELAXED);
    t2t_listener_arm_locked(lst);
    pthread_mutex_unlock(&lst->lock);
}

/* Settings for clients from now on (a reload); takes the caller's reference to cfg. Clients
   already accepted keep theirs. Back-off carries over to the same upstream addresses. */
static void t2t_listener_configure(t2t_listener *lst, t2t_config *cfg) {
    pthread_mutex_lock(&lst->lock);
    t2t_config *old = lst->cfg;
    /* An address both name keeps its state: health, bridges open, its round robin turn. */
    for (int i = 0; i < cfg->nupstreams; i++)
        for (int j = 0; j < old->nupstreams; j++)
            if (old->upstreams[j].len == cfg->upstreams[i].len &&
                !memcmp(&old->upstreams[j].address, &cfg->upstreams[i].address, cfg->upstreams[i].len)) {
                t2t_upstream_state_release(cfg->upstreams[i].state);
                cfg->upstreams[i].state = old->upstreams[j].state;
                __atomic_add_fetch(&cfg->upstreams[i].state->refs, 1, __ATOMIC_RELAXED);
                break;
            }
    lst->cfg = cfg;
    __atomic_store_n(&lst->max_active, t2t_limit_less(cfg->max_active, lst->reserved), __ATOMIC_RELAXED);
    t2t_listener_arm_locked(lst); /* a higher limit may let it accept again */
    pthread_mutex_unlock(&lst->lock);
    t2t_config_release(old);
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

/* The family of an address; its host text (IP families) or path (Unix), and port. */
static int t2t_address_text(const struct sockaddr_storage *address, socklen_t address_len, char *host, size_t n,
                            int *port, unsigned int *flowinfo, unsigned int *scope_id) {
    host[0] = 0;
    *port = 0;
    *flowinfo = *scope_id = 0;
    int family = address_len ? address->ss_family : AF_UNSPEC;
    if (family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)address;
        inet_ntop(AF_INET, &a->sin_addr, host, (socklen_t)n);
        *port = ntohs(a->sin_port);
    } else if (family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)address;
        inet_ntop(AF_INET6, &a->sin6_addr, host, (socklen_t)n);
        *port = ntohs(a->sin6_port);
        *flowinfo = ntohl(a->sin6_flowinfo);
        *scope_id = a->sin6_scope_id;
    } else if (family == AF_UNIX) {
        const struct sockaddr_un *a = (const struct sockaddr_un *)address;
        size_t len = address_len > offsetof(struct sockaddr_un, sun_path)
                         ? address_len - offsetof(struct sockaddr_un, sun_path) : 0;
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

/* Clients opened, ended (or gone without a bridge) and failed upstream connects since the last
   take, in order, and the error of an accept paused for lack of a resource (0: none). Each opened one carries a reference for the caller; each ended one the
   engine's, which the caller releases once done with it; the caller frees each failure with
   t2t_failure_free. A bridge in both lists (most short ones, under load) is marked
   open_untaken == 2: the caller may report it once, as ended, and just release its opening. */
static void t2t_listener_take(t2t_listener *lst, t2t_bridge **opened, t2t_bridge **done, t2t_failure **failed,
                              int *accept_error) {
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
    *failed = lst->failed_head;
    *accept_error = lst->accept_error;
    lst->accept_error = 0;
    lst->opened_head = lst->opened_tail = lst->done_head = lst->done_tail = NULL;
    lst->failed_head = lst->failed_tail = NULL;
    pthread_mutex_unlock(&lst->lock);
}

/* Mark the current config's upstream i down (or up again) by the active checks. */
static void t2t_listener_set_checked(t2t_listener *lst, int i, int down) {
    pthread_mutex_lock(&lst->lock);
    if (i >= 0 && i < lst->cfg->nupstreams)
        __atomic_store_n(&lst->cfg->upstreams[i].state->checked_down, down, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&lst->lock);
}

/* Whether the current config's upstream i is down (either way), -1 for no such upstream. */
static int t2t_listener_upstream_down(t2t_listener *lst, int i) {
    int down = -1;
    pthread_mutex_lock(&lst->lock);
    if (i >= 0 && i < lst->cfg->nupstreams) down = t2t_upstream_is_down(lst->cfg->upstreams[i].state, t2t_now());
    pthread_mutex_unlock(&lst->lock);
    return down;
}

/* Clients the table still holds (after dropping those with nothing open and a full bucket). */
static size_t t2t_listener_clients(t2t_listener *lst) {
    pthread_mutex_lock(&lst->lock);
    size_t n = t2t_clients_held(&lst->clients, t2t_now());
    pthread_mutex_unlock(&lst->lock);
    return n;
}

/* What was wrong with a refused client's ClientHello (T2T_REFUSED_HELLO_BAD), or the name no
   route took (T2T_REFUSED_NO_ROUTE). */
static const char *t2t_bridge_hello_error(const t2t_bridge *b) { return b->hello ? b->hello->error : ""; }
static const char *t2t_bridge_hello_name(const t2t_bridge *b) { return b->hello ? b->hello->name : ""; }

/* What was wrong with a refused client's PROXY header (T2T_REFUSED_PROXY_BAD). */
static const char *t2t_bridge_proxy_error(const t2t_bridge *b) { return b->px ? b->px->error : ""; }

static const char *t2t_failure_upstream(const t2t_failure *f) { return f->cfg->upstreams[f->upstream].text; }

static void t2t_failure_free(t2t_failure *f) {
    t2t_config_release(f->cfg);
    free(f);
}

/* The upstream a bridge was connected to, as its forward names it (NULL for a plain bridge or
   a client that never got one). */
static const char *t2t_bridge_upstream(const t2t_bridge *b) {
    return b->cfg && b->opened ? b->cfg->upstreams[b->up_index].text : NULL;
}

/* Stop accepting. Once this returns no loop touches the listening fd again, so the caller may
   close it. Bridges that opened run on. Clients accepted and not yet connected connect as usual
   and open later (a reconfigure: their events keep coming) or, with cancel_connects (a close),
   end as cancelled (ECANCELED): then no bridge of it opens once this returned, and the next take
   has every one that did. Called again with cancel_connects, it cancels what is still connecting. */
static void t2t_listener_stop(t2t_listener *lst, int cancel_connects) {
    if (cancel_connects) __atomic_store_n(&lst->cancelling, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&lst->stopping, 1, __ATOMIC_SEQ_CST);
    t2t_listener_arm(lst);
    /* The first turn ends every accept batch already running (and its hand-overs are posted);
       the second, that each loop took its inbox: every client accepted is begun. */
    t2t_barrier();
    t2t_barrier();
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

/* Free a stopped listener whose every client was reported and taken (active 0): its event fd,
   its settings. 0, or -1 with EBUSY while it still has clients (nothing is freed then). */
static int t2t_listener_free(t2t_listener *lst) {
    t2t_engine *E = &t2t_the_engine;
    if (!__atomic_load_n(&lst->stopping, __ATOMIC_SEQ_CST) || __atomic_load_n(&lst->active, __ATOMIC_ACQUIRE)) {
        errno = EBUSY;
        return -1;
    }
    pthread_mutex_lock(&E->lock);
    for (t2t_listener **p = &t2t_listeners; *p; p = &(*p)->next)
        if (*p == lst) {
            *p = lst->next;
            break;
        }
    pthread_mutex_unlock(&E->lock);
    t2t_barrier(); /* a loop still in t2t_retry_listeners, or its report's arming, is done */
    t2t_bridge *opened, *done;
    t2t_failure *failed;
    int accept_error;
    t2t_listener_take(lst, &opened, &done, &failed, &accept_error); /* (none, after the caller's last take) */
    while (opened) {
        t2t_bridge *b = opened;
        opened = b->open_next;
        t2t_release(b);
    }
    while (done) {
        t2t_bridge *b = done;
        done = b->done_next;
        t2t_release(b);
    }
    while (failed) {
        t2t_failure *f = failed;
        failed = f->next;
        t2t_failure_free(f);
    }
    close(lst->ev_r);
    if (lst->ev_w != lst->ev_r) close(lst->ev_w);
    pthread_mutex_destroy(&lst->lock);
    pthread_mutex_destroy(&lst->balance_lock);
    t2t_clients_free(&lst->clients);
    t2t_config_release(lst->cfg);
    free(lst);
    return 0;
}
