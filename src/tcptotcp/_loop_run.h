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
    if (!b->resumed) t2t_idle_check(b); /* the check at the start: no traffic yet */
    if (b->state == T2T_RELAYING && t2t_heap_push(b->loop, b) != 0) t2t_fail(b, ENOMEM);
    /* A TLS side's SSL object may already hold bytes (a record read whole for a part of it):
       no edge would tell of them, so its first read is tried at once. */
    int tls = 0;
    for (int s = 0; s < 2; s++)
        if (b->side[s].tls) b->side[s].readable = 1, tls = 1;
    if (tls && b->state == T2T_RELAYING) t2t_again(b->loop, b);
}

struct t2t_config;
static void t2t_config_release(struct t2t_config *c);

static void t2t_release(t2t_bridge *b) {
    if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    if (b->listener) {
        free(b->px);
        free(b->hello);
        free(b->tlsw);
        for (int s = 0; s < 2; s++)
            if (b->tls_owned & (1 << s)) t2t_tls.ssl_free(b->side[s].tls);
        t2t_config_release(b->cfg);
    }
    free(b->throttle);
    free(b);
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
        if (b->taking & T2T_ASK_DETACH) t2t_detach_begin(b);
        b->taking = 0;
        t2t_release(b); /* the inbox entry's reference */
    }
    if (cancel) t2t_cancel_connects(L);
}

static void t2t_fail_over(t2t_bridge *b, int error);
static void t2t_refuse(t2t_bridge *b, int refusal, int error);
static void t2t_tls_timed_out(t2t_bridge *b);

static void t2t_run_timers(t2t_loop *L) {
    while (L->heap_len && t2t_deadline(L->heap[0]) <= L->now) {
        t2t_bridge *b = L->heap[0];
        if (b->state == T2T_CONNECTING) {
            b->timed_out = 1;
            t2t_fail_over(b, ETIMEDOUT);
        } else if (b->state == T2T_HEADER) {
            t2t_refuse(b, b->hello ? T2T_REFUSED_HELLO_LATE : T2T_REFUSED_PROXY_LATE, ETIMEDOUT);
        } else if (b->state == T2T_HANDSHAKE) {
            t2t_tls_timed_out(b);
        } else if (b->state == T2T_RELAYING) {
            if (b->throttle && b->throttle->wake_ns <= L->now) { /* a bucket holds a quantum again */
                b->throttle->wake_ns = T2T_NEVER;
                t2t_heap_fix(L, b->heap_index);
                t2t_service(b); /* may throttle again (later than now), or end it */
            }
            if (b->state == T2T_RELAYING && b->next_check_ns <= L->now) {
                t2t_idle_check(b);
                if (b->state == T2T_RELAYING) t2t_heap_fix(L, b->heap_index);
            }
            if (b->state == T2T_RELAYING && b->detaching && b->detach_deadline_ns <= L->now)
                t2t_detach_give_up(b); /* relays on: fixes its place in the heap */
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

