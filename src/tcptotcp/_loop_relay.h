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
    if (b->state == T2T_RELAYING) {
        int64_t next = b->throttle && b->throttle->wake_ns < b->next_check_ns ? b->throttle->wake_ns : b->next_check_ns;
        return b->detaching && b->detach_deadline_ns < next ? b->detach_deadline_ns : next;
    }
    if (b->state == T2T_CONNECTING || b->state == T2T_HEADER || b->state == T2T_HANDSHAKE) return b->connect_deadline_ns;
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
static void t2t_finish_sides(t2t_bridge *b);
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

/* Bytes to a side: its fd's, or a TLS side's plaintext (EAGAIN: wait until writable). A TLS
   side's unsent tail must be offered again as it was, which the pending tail is. */
static ssize_t t2t_side_send(t2t_side *dst, const char *data, size_t n) {
    if (dst->tls) return t2t_tls_send(dst->tls, data, n);
    return send(dst->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* Whether the home loop is quiescing b for a detach: it reads nothing meanwhile. */
static int t2t_quiescing(const t2t_loop *L, const t2t_bridge *b) { return !t2t_borrowed(L, b) && b->detaching; }

/* Deliver what direction i still holds; 1 once it holds nothing, 0 to wait (or if it failed).
   While it waits (or the bridge is being detached), its source is not watched for input. */
static int t2t_flush(t2t_loop *L, t2t_bridge *b, int i) {
    int flushed = t2t_flush_held(L, b, i);
    if (t2t_borrowed(L, b) ? t2t_relaying(L, b, i) : b->state == T2T_RELAYING)
        t2t_watch_input(L, b, i, flushed && !t2t_quiescing(L, b));
    return flushed;
}

static int t2t_flush_held(t2t_loop *L, t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *dst = &b->side[1 - i];
    while (d->pending_off < d->pending_len) {
        if (!dst->writable) return 0;
        ssize_t n = t2t_side_send(dst, d->pending + d->pending_off, d->pending_len - d->pending_off);
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
        ssize_t sent = t2t_side_send(dst, data + done, n - done);
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

/* A new bridge's --bandwidth (rate 0: none), both buckets full; 0, or -1 (ENOMEM). */
static int t2t_rate_set(t2t_bridge *b, uint64_t rate, uint64_t burst, uint64_t quantum, int64_t now) {
    if (!rate) return 0;
    t2t_throttle *th = (t2t_throttle *)calloc(1, sizeof(t2t_throttle));
    if (!th) {
        errno = ENOMEM;
        return -1;
    }
    th->rate = rate;
    th->burst = burst;
    th->quantum = quantum < 1 ? 1 : quantum;
    th->wake_ns = T2T_NEVER;
    for (int i = 0; i < 2; i++) {
        th->tokens[i] = (double)burst;
        th->tokens_ns[i] = now;
    }
    b->throttle = th;
    return 0;
}

/* --bandwidth: whole bytes direction i may read now, its bucket refilled up to now. With none,
   the bridge's timer is set for when the bucket holds a quantum again: the source stays unread
   (its `readable` flag set) meanwhile, so what its peer sends waits in the kernel, and the
   peer's own full buffers hold it back. Throttled bridges are never lent, so L is b's loop. */
static size_t t2t_tokens(t2t_loop *L, t2t_bridge *b, int i) {
    t2t_throttle *th = b->throttle;
    double *tokens = &th->tokens[i];
    if (L->now > th->tokens_ns[i]) {
        *tokens += (double)(L->now - th->tokens_ns[i]) * (double)th->rate / 1e9;
        if (*tokens > (double)th->burst) *tokens = (double)th->burst;
        th->tokens_ns[i] = L->now;
    }
    /* Reads of a quantum at least: a read of the few bytes earned since the last one, at each
       new segment from the peer, made a throttled bridge cost more CPU than a free one. */
    if (*tokens >= (double)th->quantum || *tokens >= (double)th->burst) return (size_t)*tokens;
    /* Rounded up, and at least 1 ns ahead: the timer then finds the quantum there, and a timer
       that services this bridge never finds it due again within the same turn. */
    double wait_ns = ((double)th->quantum - *tokens) * 1e9 / (double)th->rate;
    int64_t when = t2t_add(L->now, wait_ns < 1.0 ? 1 : (int64_t)wait_ns + 1);
    if (when < th->wake_ns) {
        th->wake_ns = when;
        if (b->heap_index != SIZE_MAX) t2t_heap_fix(L, b->heap_index); /* (else pushed with it) */
    }
    return 0;
}

static void t2t_pump(t2t_loop *L, t2t_bridge *b, int i) {
    t2t_dir *d = &b->dir[i];
    t2t_side *src = &b->side[i];
    size_t moved = 0;
    for (int turn = 0; t2t_relaying(L, b, i); turn++) {
        if (!t2t_flush(L, b, i) || !src->readable || t2t_quiescing(L, b)) return;
        if (turn == T2T_READS_PER_TURN || moved >= T2T_TURN_BYTES) {
            t2t_again(L, b);
            return;
        }
        /* A read takes at most this much: the buffer, the pipe, or a throttled bridge's tokens. */
        size_t allowed = SIZE_MAX;
        if (b->throttle && !(allowed = t2t_tokens(L, b, i))) return;
        ssize_t n;
        size_t asked;
#if T2T_HAVE_SPLICE
        if (d->bulk) {
            if (!d->pipe && !(d->pipe = t2t_pipe_take(L))) {
                d->bulk = 0; /* out of fds for a pipe: recv/send still works */
                continue;
            }
            asked = (size_t)d->pipe->capacity < allowed ? (size_t)d->pipe->capacity : allowed;
            n = t2t_splice(src->fd, d->pipe->w, asked);
            if (n < 0 && !d->spliced && (errno == EINVAL || errno == ENOSYS)) {
                d->bulk = 0; /* this pair cannot splice */
                if (!t2t_borrowed(L, b)) b->may_splice = 0; /* (the home loop's to change) */
                continue;
            }
        } else
#endif
        {
            asked = T2T_BUFFER_BYTES < allowed ? T2T_BUFFER_BYTES : allowed;
            n = src->tls ? t2t_tls_recv(src, L->buffer, asked) : recv(src->fd, L->buffer, asked, MSG_DONTWAIT);
        }
        if (n == 0) {
            if (t2t_borrowed(L, b)) b->lent_done = 1; /* the home loop reads the EOF again */
            else t2t_eof(b, i);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            /* A TLS read that must write first (a key update's answer, say): its side's
               writability brings the bridge back, still readable. */
            if (errno == EINPROGRESS && src->tls) src->writable = 0;
            else if (T2T_WOULD_BLOCK(errno)) src->readable = 0;
            else t2t_dir_fail(L, b, errno);
            return;
        }
        /* In general only EAGAIN proves the source empty. A short read does not: recv stops at
           TCP's urgent mark and at a Unix message with ancillary data, and a short splice when
           the pipe runs out of slots; no new edge would come for what is already queued. */
        b->side[1 - i].writable = 1; /* try the write once; EAGAIN says otherwise */
        moved += (size_t)n;
        if (b->throttle) b->throttle->tokens[i] -= (double)n;
        if (d->bulk) {
            d->spliced = 1;
            d->in_pipe = (size_t)n;
        } else {
            /* Except on TCP, as far as we know: there recv stops short only at the urgent mark
               (EPOLLPRI told us of it) or at the end of what is queued, and whatever arrives
               after this edge brings a new one. Saves the read that would say EAGAIN. The FIN
               (or an error) reported with this edge is already queued: read on to it. */
            /* Not for TLS: the SSL object may hold decrypted bytes the socket no longer shows. */
            if (src->tcp && !src->tls && !src->urgent && !src->closing && (size_t)n < asked) src->readable = 0;
            t2t_send_read(L, b, i, (size_t)n);
            if (b->may_splice && (size_t)n >= T2T_SPLICE_AFTER) d->bulk = 1;
        }
    }
}

static void t2t_connect_check(t2t_bridge *b);
static void t2t_header_read(t2t_bridge *b);
static void t2t_tls_handshake(t2t_bridge *b);
static void t2t_lend_maybe(t2t_bridge *b);
static void t2t_detach_progress(t2t_bridge *b);
static void t2t_detach_decided(t2t_bridge *b, int outcome);

static void t2t_service(t2t_bridge *b) {
    if (b->state == T2T_HANDSHAKE) t2t_tls_handshake(b);
    if (b->state == T2T_HEADER) t2t_header_read(b);
    if (b->state == T2T_CONNECTING) t2t_connect_check(b);
    if (b->state == T2T_RELAYING) {
        t2t_pump(b->loop, b, 0);
        if (!b->lent_to) t2t_pump(b->loop, b, 1);
        if (b->detaching && b->state == T2T_RELAYING) t2t_detach_progress(b);
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
    if (b->detaching) t2t_detach_decided(b, T2T_DETACH_REFUSED); /* it ended first */
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
        t2t_side *side = &b->side[s];
        /* A TLS side of a bridge that ended cleanly gets close_notify before its FIN, so its
           peer can tell the end of the stream from a cut. After an error, a stop, an idle end
           or a cut TLS side the FIN goes alone: the alert must not vouch for a truncated
           stream. */
        if (side->tls && reason == T2T_CLOSED && !side->fin_sent && !b->side[0].cut && !b->side[1].cut)
            side->notifying = 1;
        if (b->dir[s].ended) {
            /* Its FIN was read: nothing more can arrive, so close() alone sends ours, cleanly. */
            side->drained = 1;
            continue;
        }
        t2t_watch_input(b->loop, b, s, 1); /* the drain reads it */
    }
    t2t_finish_sides(b);
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

/* The bridge is done: out of its loop, onto the done queue. Its fds are closed, unless they
   are handed over (keep_fds: a detach), and then only out of the poller. */
static void t2t_finish(t2t_bridge *b, int keep_fds) {
    t2t_loop *L = b->loop;
    t2t_heap_remove(L, b);
    for (int s = 0; s < 2; s++) {
        t2t_poller_del(L, b->side[s].fd);
        if (keep_fds) continue;
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

static void t2t_close(t2t_bridge *b) { t2t_finish(b, 0); }

/* FIN to each side that has not had one, a TLS side's close_notify first once there is room
   for it (at the latest, the drain's limit closes it without). */
static void t2t_finish_sides(t2t_bridge *b) {
    for (int s = 0; s < 2; s++) {
        t2t_side *side = &b->side[s];
        if (side->notifying) {
            if (!t2t_tls_close_notify(side->tls)) continue;
            side->notifying = 0;
        }
        if (!side->fin_sent && !b->dir[s].ended) {
            shutdown(side->fd, SHUT_WR);
            side->fin_sent = 1;
        }
    }
}

/* Drop what the peers still send. The common case, nothing unread, costs one recv a side. */
static void t2t_drain(t2t_bridge *b) {
    t2t_loop *L = b->loop;
    t2t_finish_sides(b);
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
    /* A close_notify still waiting for room keeps the bridge until the limit: closing would
       drop it, and the FIN alone would tell the peer of a cut. */
    int notifying = b->side[0].notifying || b->side[1].notifying;
    int done = (b->side[0].drained && b->side[1].drained && !notifying) || L->now >= b->drain_limit_ns;
    if (!done && !notifying && L->now >= b->drain_quiet_ns) {
        /* Quiet: closing now sends RST, harmless only once the peer holds all we sent. */
        done = 1;
        for (int s = 0; s < 2; s++)
            if (!b->side[s].drained && t2t_unacked(b->side[s].fd) > 0) done = 0;
        if (!done) b->drain_quiet_ns = t2t_add(L->now, T2T_DRAIN_POLL_NS);
    } else if (!done && notifying && L->now >= b->drain_quiet_ns) {
        b->drain_quiet_ns = t2t_add(L->now, T2T_DRAIN_POLL_NS); /* (a timer never due at once again) */
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

