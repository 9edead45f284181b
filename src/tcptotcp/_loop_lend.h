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
    /* A throttled bridge moves too little to gain from a second core, and its buckets and
       timer are its home loop's. */
    if (b->lent_once || b->throttle || b->detaching || b->state != T2T_RELAYING || !b->dir[0].bulk || !b->dir[1].bulk || b->dir[0].ended ||
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
        b->lent_tags[s].kind = T2T_TAG_LENT;
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
    } else if (b->detaching) {
        t2t_detach_progress(b); /* recalled for it (an EOF the borrower read waits for the next owner) */
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

