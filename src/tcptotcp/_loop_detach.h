/* ---- detaching: a bridge's connections handed back, whole ----------------------------------

   For a hand-over to another owner (another process) without a reset, a FIN or a lost byte:
   the home loop stops reading both sides, delivers what the bridge holds (a short write's tail,
   a pipe's bytes; a lent direction is recalled first), and once both directions hold nothing
   takes the fds out of its poller and ends the bridge, reason T2T_DETACHED, without closing
   them or reading what the peers still send: that waits in the kernel for the next owner. If
   the bridge cannot deliver by its deadline (a peer that does not read), it relays on as before.
   The asking thread waits for the outcome on the engine's detach_cond. */

/* The outcome, for the thread waiting in t2t_detach (once per ask). */
static void t2t_detach_decided(t2t_bridge *b, int outcome) {
    t2t_engine *E = &t2t_the_engine;
    b->detaching = 0;
    pthread_mutex_lock(&E->lock);
    b->detach_outcome = outcome;
    pthread_cond_broadcast(&E->detach_cond);
    pthread_mutex_unlock(&E->lock);
}

/* Both directions hold nothing: hand the fds over. */
static void t2t_detach_finish(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    int64_t until = b->next_check_ns - L->now;
    b->detached.idle_checks = b->idle_checks;
    b->detached.next_check_in_ns = until > 0 ? until : 0;
    for (int i = 0; i < 2; i++) b->detached.moved[i] = __atomic_load_n(&b->dir[i].active, __ATOMIC_RELAXED);
    b->reason = T2T_DETACHED;
    b->detaching = 0;
    t2t_finish(b, 1);
    t2t_detach_decided(b, T2T_DETACH_DONE);
}

/* Deliver what is held; finish once nothing is. Waits for output events (or the lent direction's
   return) otherwise. */
static void t2t_detach_progress(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    if (b->lent_to) return; /* recalled: t2t_lend_returned comes back here */
    for (int s = 0; s < 2; s++) t2t_watch_input(L, b, s, 0);
    int empty = 1;
    for (int i = 0; i < 2 && b->state == T2T_RELAYING; i++)
        if (!t2t_flush_held(L, b, i)) empty = 0;
    if (b->state != T2T_RELAYING || !b->detaching) return; /* a write failed: it ended */
    if (empty) t2t_detach_finish(b);
}

/* The ask, in the home loop. A bridge that is not relaying, or one that has read or forwarded a
   FIN, is refused: its state is more than counts and an idle count. So is a TLS bridge: its
   state is in its SSL objects too. A listener's bridge ends as
   any of its bridges does (its slot freed, its end told to the listener's take), only with its
   fds kept. */
static void t2t_detach_begin(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    if (b->state != T2T_RELAYING || b->detaching || b->dir[0].ended || b->dir[1].ended ||
        b->side[0].fin_sent || b->side[1].fin_sent || b->side[0].tls || b->side[1].tls) {
        t2t_detach_decided(b, T2T_DETACH_REFUSED);
        return;
    }
    b->detaching = 1;
    b->detach_deadline_ns = t2t_add(L->now, b->detach_timeout_ns);
    if (b->heap_index != SIZE_MAX) t2t_heap_fix(L, b->heap_index);
    if (b->lent_to) {
        /* Side 1's input is the borrower's until it gives direction 1 back. */
        t2t_watch_input(L, b, 0, 0);
        t2t_lend_ask(b, T2T_LEND_RECALL);
        return;
    }
    t2t_detach_progress(b);
}

/* Past the deadline with bytes still held: relay on, reading again where nothing is held. */
static void t2t_detach_give_up(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    for (int i = 0; i < 2; i++) {
        if (b->lent_to && i == 1) continue; /* still the borrower's: its return re-arms it */
        t2t_dir *d = &b->dir[i];
        t2t_watch_input(L, b, i, d->pending_off >= d->pending_len && !d->in_pipe);
    }
    t2t_detach_decided(b, T2T_DETACH_REFUSED);
    if (b->heap_index != SIZE_MAX) t2t_heap_fix(L, b->heap_index);
    t2t_service(b); /* what arrived meanwhile (its `readable` flags were kept) */
}

/* From a Python thread, without the GIL: detach b, waiting for the outcome (the loop bounds it
   by timeout_ns). 1 once detached: fds[] are the bridge's two fds, now the caller's to close,
   and *state its idle state; 0 if it ended first, was refused, or could not deliver in time. */
static int t2t_detach(t2t_bridge *b, int64_t timeout_ns, int fds[2], t2t_idle_state *state) {
    t2t_engine *E = &t2t_the_engine;
    if (__atomic_load_n(&b->state, __ATOMIC_ACQUIRE) == T2T_DONE) return 0;
    pthread_mutex_lock(&E->lock);
    if (b->detach_outcome == T2T_DETACH_WAITING) { /* another thread's detach is under way */
        pthread_mutex_unlock(&E->lock);
        return 0;
    }
    b->detach_outcome = T2T_DETACH_WAITING;
    b->detach_timeout_ns = timeout_ns < 0 ? 0 : timeout_ns;
    pthread_mutex_unlock(&E->lock);
    t2t_post(b->loop, b, T2T_ASK_DETACH);
    pthread_mutex_lock(&E->lock);
    while (b->detach_outcome == T2T_DETACH_WAITING) pthread_cond_wait(&E->detach_cond, &E->lock);
    int done = b->detach_outcome == T2T_DETACH_DONE;
    b->detach_outcome = T2T_DETACH_NONE;
    pthread_mutex_unlock(&E->lock);
    if (done) {
        fds[0] = b->side[0].fd;
        fds[1] = b->side[1].fd;
        *state = b->detached;
    }
    return done;
}
