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
