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
#else
            t2t_side *side = (t2t_side *)events[e].udata;
            uint32_t got = 0; /* (only epoll's lent events use it: no lending without splice) */
#endif
            if (side->kind == T2T_TAG_WAKE) {
                woken = 1;
                continue;
            }
            if (side->kind == T2T_TAG_LISTENER) {
                t2t_accept_some(L, (t2t_listen_tag *)side);
                continue;
            }
            if (side->kind == T2T_TAG_LENT) {
                t2t_lent_event(L, side, got);
                continue;
            }
#if T2T_EPOLL
            /* While direction 1 is lent, side 0's output and side 1's input are the borrower's. */
            t2t_bridge *b = side->bridge;
            int reads = !b->lent_to || side == &b->side[0];
            int writes = !b->lent_to || side == &b->side[1];
            if (reads && (got & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) side->readable = 1;
            if (reads && (got & EPOLLPRI)) side->urgent = 1;
            if (reads && (got & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))) side->closing = 1;
            if (writes && (got & (EPOLLOUT | EPOLLHUP | EPOLLERR))) side->writable = 1;
#else
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
        if (__atomic_load_n(&L->barrier_asked, __ATOMIC_RELAXED) != L->barrier_done) { /* (racy read: see below) */
            t2t_engine *E = &t2t_the_engine;
            pthread_mutex_lock(&L->lock);
            unsigned long long asked = L->barrier_asked;
            pthread_mutex_unlock(&L->lock);
            pthread_mutex_lock(&E->lock);
            __atomic_store_n(&L->barrier_done, asked, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&E->barrier_cond);
            pthread_mutex_unlock(&E->lock);
        }
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
   themselves, which the bridge then owns and closes), handed to the least-loaded loop. With
   resume (a detached bridge's idle state), the idle rule goes on from there instead of starting
   with a check. NULL with errno on failure: nothing left open, and adopted fds still the caller's. */
static t2t_bridge *t2t_start(int fd1, int fd2, int adopt, int64_t interval_ns, uint64_t idle_limit,
                             int activity_both, int half_close, int may_splice, uint64_t rate, uint64_t burst,
                             uint64_t quantum, const t2t_idle_state *resume, void *tls1, void *tls2,
                             int ragged_eofs_are_ends, void *owner) {
    t2t_bridge *b = (t2t_bridge *)calloc(1, sizeof(t2t_bridge));
    if (!b || t2t_rate_set(b, rate, burst, quantum, t2t_now()) != 0) {
        free(b);
        errno = ENOMEM;
        return NULL;
    }
    b->side[0].fd = t2t_own_fd(fd1, adopt);
    b->side[1].fd = b->side[0].fd < 0 ? -1 : t2t_own_fd(fd2, adopt);
    if (b->side[1].fd < 0) {
        int saved = errno;
        if (b->side[0].fd >= 0 && !adopt) close(b->side[0].fd);
        free(b->throttle);
        free(b);
        errno = saved;
        return NULL;
    }
    void *tls[2] = {tls1, tls2}; /* (checked by t2t_tls_usable) */
    for (int s = 0; s < 2; s++) {
        if (tls[s]) t2t_tls_adopt(tls[s], b->side[s].fd);
        b->side[s].tls = tls[s];
        b->side[s].ragged_eof_is_end = (unsigned char)((ragged_eofs_are_ends >> s) & 1);
    }
    if (tls1 || tls2) may_splice = 0; /* records go through the buffer */
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
    if (resume) {
        b->resumed = 1;
        b->idle_checks = resume->idle_checks;
        int64_t until = resume->next_check_in_ns < interval_ns ? resume->next_check_in_ns : interval_ns;
        b->next_check_ns = t2t_add(b->started_ns, until > 0 ? until : 0);
        for (int i = 0; i < 2; i++) b->dir[i].active = resume->moved[i] != 0;
    }
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
    pthread_cond_init(&E->barrier_cond, NULL);
    pthread_cond_init(&E->detach_cond, NULL);
    E->claimed = E->claim_told = 0; /* the claiming thread is the parent's; the fd is kept */
    for (t2t_listener *lst = t2t_listeners; lst; lst = lst->next) { /* the parent's forwarders */
        lst->stopping = 1;
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
